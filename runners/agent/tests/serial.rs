//! The agent on a real virtio-serial port: the guest image (`scripts/build-guest-image`,
//! cached after its first build) booted with QEMU (TCG), reached through QEMU's
//! chardev socket with [`AgentClient::connect_serial`].
//!
//! Needs QEMU 10 and the image build's tools: `scripts/install-vm-deps`. Without them
//! the test fails saying so; it is never skipped.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use reel_agent::proto::{self, Message, Role};
use reel_agent::{AgentClient, ClientError, ExecRequest};

const T: Duration = Duration::from_secs(60);

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(out.status.success(), "{what} failed: {}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

/// The image's directory, built (or found cached) by the repository's script, with
/// QEMU installed first where it is missing.
fn image() -> PathBuf {
    reel_test_artefacts::guest_image()
}

/// A booted guest; QEMU is killed when this is dropped, whatever the test did.
struct Vm {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    fn boot(image: &Path, spec: &serde_json::Value) -> (Vm, Duration) {
        let dir = tempfile::tempdir().unwrap();
        let mut qemu = reel_test_artefacts::bare_guest(
            image,
            dir.path(),
            spec["memory_mib"].as_u64().unwrap_or(512),
            1024,
            &["-accel", "tcg"],
        );
        let start = Instant::now();
        let child = qemu
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("qemu.log")).unwrap())
            .spawn()
            .expect("cannot start qemu-system-x86_64");
        let mut vm = Vm { child, dir };
        let deadline = start + T;
        while !vm.console().contains("reel-guest: agent started") {
            if let Some(status) = vm.child.try_wait().unwrap() {
                panic!(
                    "QEMU exited ({status}) before the agent started:\n{}\n{}",
                    vm.console(),
                    std::fs::read_to_string(vm.dir.path().join("qemu.log")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no marker within {T:?}:\n{}",
                vm.console()
            );
            thread::sleep(Duration::from_millis(5));
        }
        (vm, start.elapsed())
    }

    fn console(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("console.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("a.sock")
    }

    fn client(&self, timeout: Duration) -> Result<AgentClient, ClientError> {
        let mut c = AgentClient::connect_serial(self.socket(), timeout)?;
        c.init("job-serial", "token-serial")?;
        Ok(c)
    }
}

/// A plain connection to the chardev socket, once QEMU listens on it.
fn connect_raw(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + T;
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < deadline, "cannot connect: {e}"),
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn sh(exec_id: u64, script: &str) -> ExecRequest {
    ExecRequest {
        exec_id,
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into())],
        cwd: None,
        timeout_ms: 0,
    }
}

fn run_to_string(c: &mut AgentClient, req: &ExecRequest) -> (String, Option<i32>) {
    let mut out = Vec::new();
    let outcome = c
        .run_exec(req, |_, _, bytes| out.extend_from_slice(bytes))
        .unwrap();
    (String::from_utf8(out).unwrap(), outcome.code)
}

/// Handshake, the guest's own kernel, a step whose host goes away mid-output and a
/// second host that resumes it, and poweroff, on a real virtio-serial port.
#[test]
fn the_agent_serves_a_real_virtio_serial_port_across_hosts() {
    let image = image();
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(image.join("spec.json")).unwrap()).unwrap();
    let (vm, boot) = Vm::boot(&image, &spec);

    // A host that dies mid-frame: garbage, then a torn Hello. The agent skips it
    // and answers the next host's Hello.
    let connect = Instant::now();
    {
        let mut dead = connect_raw(&vm.socket());
        let hello = proto::encode_frame(&Message::Hello {
            min_version: 1,
            max_version: 2,
            role: Role::Host,
        })
        .unwrap();
        dead.write_all(b"\x00\x00\x00\x03garbage\xff").unwrap();
        dead.write_all(&hello[..hello.len() - 2]).unwrap();
    }
    let mut c = vm.client(T).unwrap();
    eprintln!(
        "boot to marker {boot:?}; connect_serial + Init {:?}",
        connect.elapsed()
    );
    let hello = Instant::now();
    c.ping(T).unwrap();
    eprintln!("ping round trip {:?}", hello.elapsed());

    // The guest's kernel, not the host's; the volume on /work.
    let (release, code) = run_to_string(&mut c, &sh(1, "uname -r"));
    assert_eq!(code, Some(0));
    assert_eq!(release.trim(), spec["kernel_version"].as_str().unwrap());
    let host = run(Command::new("uname").arg("-r"), "uname -r");
    assert_ne!(release.trim(), host.trim());
    let (mounts, _) = run_to_string(&mut c, &sh(2, "grep ' /work ' /proc/mounts; pwd"));
    assert!(mounts.contains("/dev/vda /work ext4"), "{mounts}");
    assert!(mounts.ends_with("/work\n"), "{mounts}");

    // While this client is connected, a second one waits in the chardev's backlog.
    let waited = Instant::now();
    match AgentClient::connect_serial(vm.socket(), Duration::from_millis(500)) {
        Err(ClientError::Timeout("Hello")) => {}
        other => panic!("a second client got {other:?}"),
    }
    assert!(waited.elapsed() >= Duration::from_millis(500));

    // A step with a lot of output; the host goes away in the middle of it, having
    // acknowledged what it received, while the agent is still writing.
    let lines = 200_000;
    let expected: String = (1..=lines).map(|i| format!("{i}\n")).collect();
    c.set_ack_every(0);
    c.exec_start(&sh(3, &format!("seq 1 {lines}; sleep 1")))
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 100_000 {
        match c
            .recv(Some(T))
            .unwrap()
            .expect("no output within the timeout")
        {
            Message::Output { offset, bytes, .. } => {
                assert_eq!(offset, got.len() as u64);
                got.extend_from_slice(&bytes);
            }
            Message::ExecStarted { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let acked = got.len() as u64;
    c.ack(3, acked).unwrap();
    c.ping(T).unwrap();
    drop(c);

    // A new host: whatever the agent's writer had begun for the old one is skipped,
    // and the output continues at the offset the new host asks for, with no gap and
    // no byte twice.
    let reconnect = Instant::now();
    let mut c = vm.client(T).unwrap();
    eprintln!("reconnect + Init {:?}", reconnect.elapsed());
    let from = got.len() as u64;
    let outcome = c
        .resume_exec(3, from, |_, offset, bytes| {
            assert_eq!(offset, got.len() as u64);
            got.extend_from_slice(bytes);
        })
        .unwrap();
    assert_eq!(outcome.code, Some(0));
    assert_eq!(outcome.total_bytes, expected.len() as u64);
    assert!(got == expected.as_bytes(), "the resumed output differs");
    // Output below the acknowledgement is gone; from it on, it is still there.
    match c.resume_exec(3, 0, |_, _, _| {}) {
        Err(ClientError::Agent { code, .. }) => {
            assert_eq!(code, reel_agent::proto::ErrorCode::OutputDropped)
        }
        other => panic!("resume below the ack: {other:?}"),
    }

    // Poweroff ends the agent, and the init powers the VM off: QEMU exits.
    let off = Instant::now();
    c.poweroff(T).unwrap();
    let mut vm = vm;
    let status = loop {
        if let Some(s) = vm.child.try_wait().unwrap() {
            break s;
        }
        assert!(off.elapsed() < T, "QEMU still runs after Poweroff");
        thread::sleep(Duration::from_millis(5));
    };
    eprintln!("poweroff to QEMU exit {:?}", off.elapsed());
    assert!(status.success(), "QEMU: {status}\n{}", vm.console());
}
