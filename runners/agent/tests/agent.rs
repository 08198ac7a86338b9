//! Integration tests against the real `reel-agent` binary.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use reel_agent::proto::{
    self, ErrorCode, FrameReader, MAX_VERSION, Message, ProtoError, Role, Stream,
};
use reel_agent::{AgentClient, ClientError, ExecOutcome, ExecRequest};
use rustix::process::{Pid, test_kill_process, test_kill_process_group};

const BIN: &str = env!("CARGO_BIN_EXE_reel-agent");
const T: Duration = Duration::from_secs(10);

struct Agent {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Agent {
    fn start(extra: &[&str]) -> Agent {
        Agent::start_under(&[], extra)
    }

    /// Starts the agent as the last argument of `wrapper` (empty: directly).
    fn start_under(wrapper: &[&str], extra: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .arg("--socket")
            .arg(&socket)
            .arg("--workdir")
            .arg(dir.path())
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let agent = Agent {
            child,
            _dir: dir,
            socket,
        };
        let deadline = Instant::now() + T;
        while UnixStream::connect(&agent.socket).is_err() {
            assert!(Instant::now() < deadline, "agent did not start");
            thread::sleep(Duration::from_millis(10));
        }
        agent
    }

    fn client(&self) -> AgentClient {
        let mut c = AgentClient::connect(&self.socket, T).unwrap();
        c.init("job-1", "token-1").unwrap();
        c
    }

    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sh(exec_id: u64, cmd: &str) -> ExecRequest {
    ExecRequest {
        exec_id,
        argv: vec!["sh".into(), "-c".into(), cmd.into()],
        env: vec![(
            "PATH".into(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        )],
        cwd: None,
        timeout_ms: 0,
    }
}

type Chunks = Vec<(Stream, u64, Vec<u8>)>;

/// Runs `req` with the low-level API; returns (pid, chunks, outcome).
fn run_low(c: &mut AgentClient, req: &ExecRequest) -> (u32, Chunks, ExecOutcome) {
    c.exec_start(req).unwrap();
    let mut pid = 0;
    let mut chunks = Vec::new();
    loop {
        match c
            .recv(Some(Duration::from_secs(60)))
            .unwrap()
            .expect("timed out")
        {
            Message::ExecStarted { exec_id, pid: p } if exec_id == req.exec_id => pid = p,
            Message::Output {
                exec_id,
                stream,
                offset,
                bytes,
            } if exec_id == req.exec_id => {
                chunks.push((stream, offset, bytes));
            }
            Message::ExecExit {
                exec_id,
                code,
                signal,
                timed_out,
                total_bytes,
            } if exec_id == req.exec_id => {
                return (
                    pid,
                    chunks,
                    ExecOutcome {
                        exec_id,
                        code,
                        signal,
                        timed_out,
                        total_bytes,
                    },
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn group_gone(pid: u32) -> bool {
    let pid = Pid::from_raw(pid as i32).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if test_kill_process_group(pid).is_err() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

fn raw_read_all(s: &mut UnixStream) -> (Vec<Message>, bool) {
    s.set_read_timeout(Some(T)).unwrap();
    let mut r = FrameReader::new();
    let mut msgs = Vec::new();
    loop {
        match r.read_message(s) {
            Ok(Some(m)) => msgs.push(m),
            Ok(None) => return (msgs, false),
            Err(ProtoError::Closed) | Err(ProtoError::Io(_)) => return (msgs, true),
            Err(e) => panic!("agent sent a bad frame: {e}"),
        }
    }
}

fn raw_hello(s: &mut UnixStream) {
    proto::write_message(
        s,
        &Message::Hello {
            min_version: 1,
            max_version: 1,
            role: Role::Host,
        },
    )
    .unwrap();
    let mut r = FrameReader::new();
    s.set_read_timeout(Some(T)).unwrap();
    assert!(matches!(
        r.read_message(s).unwrap(),
        Some(Message::Hello {
            role: Role::Agent,
            ..
        })
    ));
}

#[test]
fn handshake_and_ping() {
    let agent = Agent::start(&[]);
    let mut c = agent.client();
    assert_eq!(c.version(), MAX_VERSION);
    c.ping(T).unwrap();
}

/// CI runs in a container whose processes belong to a session led from outside their
/// pid namespace: `getsid` answers 0 there. The agent once panicked on that (rustix's
/// `Pid` cannot be 0) before it listened; it must start, run a step and power off.
#[test]
fn agent_starts_in_a_session_led_from_outside_its_pid_namespace() {
    let wrapper: &[&str] = if rustix::process::geteuid().is_root() {
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    } else {
        &[
            "unshare",
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
        ]
    };
    let mut agent = Agent::start_under(wrapper, &[]);
    let mut c = agent.client();
    let (_, chunks, exit) = run_low(&mut c, &sh(1, "ps -o sid= -p $$ 2>/dev/null; echo ran"));
    assert_eq!(exit.code, Some(0));
    let out: Vec<u8> = chunks.into_iter().flat_map(|(_, _, b)| b).collect();
    assert!(out.ends_with(b"ran\n"), "{}", String::from_utf8_lossy(&out));
    c.poweroff(T).unwrap();
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent did not exit");
    assert!(status.success(), "{status:?}");
    assert!(!agent.socket.exists());
}

#[test]
fn version_mismatch_refused() {
    let agent = Agent::start(&[]);
    let err = AgentClient::connect_with_versions(&agent.socket, T, 5, 9).unwrap_err();
    match err {
        ClientError::Agent { message, .. } => {
            assert!(message.contains("No common protocol version"), "{message}")
        }
        other => panic!("unexpected {other:?}"),
    }
    // Overlapping ranges pick the highest common version.
    let c = AgentClient::connect_with_versions(&agent.socket, T, 0, 7).unwrap();
    assert_eq!(c.version(), MAX_VERSION);
    let c = AgentClient::connect_with_versions(&agent.socket, T, 0, 1).unwrap();
    assert_eq!(c.version(), 1);
}

#[test]
fn message_before_hello_refused() {
    let agent = Agent::start(&[]);
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    proto::write_message(&mut s, &Message::Ping {}).unwrap();
    let (msgs, closed) = raw_read_all(&mut s);
    assert!(closed);
    assert!(
        matches!(&msgs[..], [Message::Error { message, .. }] if message.contains("Hello")),
        "{msgs:?}"
    );
    // Exec messages before Init are refused too.
    let mut c = AgentClient::connect(&agent.socket, T).unwrap();
    c.exec_start(&sh(1, "true")).unwrap();
    assert!(
        matches!(c.recv(Some(T)).unwrap(), Some(Message::Failure { code: ErrorCode::NotInitialized, message, .. }) if message.contains("Init"))
    );
    // A different session token is refused.
    c.init("job-1", "token-1").unwrap();
    let mut c2 = AgentClient::connect(&agent.socket, T).unwrap();
    assert!(matches!(
        c2.init("job-1", "other"),
        Err(ClientError::Agent {
            code: ErrorCode::WrongSession,
            ..
        })
    ));
}

#[test]
fn output_is_byte_exact_with_offsets() {
    let agent = Agent::start(&[]);
    let mut c = agent.client();
    let mut req = sh(
        1,
        r"printf 'a\377\376b'; sleep 0.05; printf 'err\200' >&2; sleep 0.05; printf 'tail'; printf '%s' $FOO; test -z $HOME",
    );
    req.env.push(("FOO".into(), "bar".into()));
    let (_, chunks, exit) = run_low(&mut c, &req);
    assert_eq!(exit.code, Some(0));
    let mut next = 0;
    let (mut out, mut err, mut all) = (Vec::new(), Vec::new(), Vec::new());
    for (stream, offset, bytes) in &chunks {
        assert_eq!(*offset, next);
        next += bytes.len() as u64;
        all.extend_from_slice(bytes);
        match stream {
            Stream::Stdout => out.extend_from_slice(bytes),
            Stream::Stderr => err.extend_from_slice(bytes),
        }
    }
    assert_eq!(out, b"a\xff\xfebtailbar");
    assert_eq!(err, b"err\x80");
    assert_eq!(all, b"a\xff\xfeberr\x80tailbar");
    assert_eq!(exit.total_bytes, next);
}

#[test]
fn twenty_mib_streamed_exactly() {
    let agent = Agent::start(&[]);
    let mut c = agent.client();
    let n = 20 << 20;
    let req = sh(1, &format!("yes 0123456789abcdef | head -c {n}"));
    let mut got = Vec::with_capacity(n);
    let exit = c
        .run_exec(&req, |_, offset, bytes| {
            assert_eq!(offset, got.len() as u64);
            got.extend_from_slice(bytes);
        })
        .unwrap();
    assert_eq!(exit.code, Some(0));
    assert_eq!(exit.total_bytes, n as u64);
    let expected: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect();
    assert!(got == expected, "output differs");
}

#[test]
fn exit_code_signal_and_timeout() {
    let agent = Agent::start(&["--timeout-grace-ms", "200"]);
    let mut c = agent.client();
    let exit = c.run_exec(&sh(1, "exit 3"), |_, _, _| {}).unwrap();
    assert_eq!(
        (exit.code, exit.signal, exit.timed_out),
        (Some(3), None, false)
    );
    let exit = c.run_exec(&sh(2, "kill -9 $$"), |_, _, _| {}).unwrap();
    assert_eq!((exit.code, exit.signal), (None, Some(9)));

    // The background sleep ignores SIGINT (non-interactive shell), so the ladder must
    // escalate; the whole group must be gone afterwards.
    let mut req = sh(3, "sleep 30 & sleep 30");
    req.timeout_ms = 300;
    let started = Instant::now();
    let (pid, _, exit) = run_low(&mut c, &req);
    assert!(exit.timed_out);
    assert!(exit.code.is_none() || exit.signal.is_some() || exit.code != Some(0));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(group_gone(pid), "process group survived the timeout");
}

#[test]
fn cancel_ladder_escalates() {
    let agent = Agent::start(&[]);
    let mut c = agent.client();
    let handle = c.cancel_handle();
    let (tx, rx) = mpsc::channel::<()>();
    let canceller = thread::spawn(move || {
        rx.recv().unwrap();
        handle.cancel(1, Duration::from_millis(200)).unwrap();
        rx.recv().unwrap();
        handle.cancel(2, Duration::from_millis(200)).unwrap();
    });
    // Traps INT: dies by TERM.
    let tx1 = tx.clone();
    let mut sent = false;
    let exit = c
        .run_exec(
            &sh(
                1,
                "trap 'echo got-int' INT; echo ready; while :; do sleep 0.05; done",
            ),
            |_, _, b| {
                if !sent && b.starts_with(b"ready") {
                    sent = true;
                    tx1.send(()).unwrap();
                }
            },
        )
        .unwrap();
    assert_eq!(exit.signal, Some(15), "{exit:?}");
    // Ignores INT and TERM: dies by KILL.
    let mut sent = false;
    let started = Instant::now();
    let exit = c
        .run_exec(
            &sh(
                2,
                "trap '' INT TERM; echo ready; while :; do sleep 0.05; done",
            ),
            |_, _, b| {
                if !sent && b.starts_with(b"ready") {
                    sent = true;
                    tx.send(()).unwrap();
                }
            },
        )
        .unwrap();
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert!(started.elapsed() >= Duration::from_millis(400));
    canceller.join().unwrap();
}

fn expected_lines(n: u32) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| format!("line-{i}\n").into_bytes())
        .collect()
}

#[test]
fn reconnect_and_resume_without_gap_or_duplicate() {
    let agent = Agent::start(&[]);
    let req = sh(
        1,
        "i=1; while [ $i -le 300 ]; do echo line-$i; i=$((i+1)); sleep 0.003; done",
    );
    let mut first = Vec::new();
    {
        let mut c = agent.client();
        c.exec_start(&req).unwrap();
        while first.len() < 200 {
            match c.recv(Some(T)).unwrap().unwrap() {
                Message::Output { offset, bytes, .. } => {
                    assert_eq!(offset, first.len() as u64);
                    first.extend_from_slice(&bytes);
                }
                Message::ExecStarted { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        // Disconnect mid-exec (dropping the client closes the socket).
    }
    thread::sleep(Duration::from_millis(100));
    let mut c = agent.client();
    // Resume a little before what we have, as if only part had been persisted.
    let keep = first.len() - 50;
    first.truncate(keep);
    let exit = c
        .resume_exec(1, keep as u64, |_, offset, bytes| {
            assert_eq!(offset, first.len() as u64);
            first.extend_from_slice(bytes);
        })
        .unwrap();
    assert_eq!(exit.code, Some(0));
    assert_eq!(first, expected_lines(300));
}

#[test]
fn exit_collected_after_reconnect() {
    let agent = Agent::start(&[]);
    {
        let mut c = agent.client();
        c.exec_start(&sh(4, "echo hi; echo there >&2; exit 7"))
            .unwrap();
    }
    thread::sleep(Duration::from_millis(300));
    let mut c = agent.client();
    let mut got = Vec::new();
    let exit = c
        .resume_exec(4, 0, |_, _, b| got.extend_from_slice(b))
        .unwrap();
    assert_eq!(exit.code, Some(7));
    assert_eq!(got.len(), 9);
    // Acked output cannot be resumed any more, and that is an error, not a gap.
    thread::sleep(Duration::from_millis(100));
    let mut c = agent.client();
    let err = c.resume_exec(4, 0, |_, _, _| {}).unwrap_err();
    assert!(err.to_string().contains("acknowledged"), "{err}");
}

#[test]
fn a_full_buffer_slows_the_step_down_and_loses_nothing() {
    const BOUND: u64 = 256 * 1024;
    let agent = Agent::start(&["--max-buffer", &BOUND.to_string()]);
    let mut c = agent.client();
    c.exec_start(&sh(1, "head -c 1000000 /dev/zero; echo done"))
        .unwrap();
    // Nothing is acknowledged: the agent stops at its bound and the step waits.
    let mut received = 0u64;
    let mut exited = false;
    while let Some(m) = c.recv(Some(Duration::from_millis(700))).unwrap() {
        match m {
            Message::Output { offset, bytes, .. } => {
                assert_eq!(offset, received, "a gap or a duplicate");
                received += bytes.len() as u64;
            }
            Message::ExecExit { .. } => exited = true,
            Message::Error { message, .. } | Message::Failure { message, .. } => {
                panic!("unexpected error: {message}")
            }
            _ => {}
        }
    }
    assert!(
        !exited,
        "the step finished although its output was not taken"
    );
    assert!(
        received <= BOUND,
        "{received} bytes buffered past the {BOUND}-byte bound"
    );
    assert!(received > 0);
    // Acknowledging lets it go on, to the last byte.
    c.ack(1, received).unwrap();
    let total = loop {
        match c.recv(Some(T)).unwrap().expect("the step never finished") {
            Message::Output { offset, bytes, .. } => {
                assert_eq!(offset, received, "a gap or a duplicate");
                received += bytes.len() as u64;
                c.ack(1, received).unwrap();
            }
            Message::ExecExit {
                code, total_bytes, ..
            } => {
                assert_eq!(code, Some(0));
                break total_bytes;
            }
            Message::Error { message, .. } | Message::Failure { message, .. } => {
                panic!("unexpected error: {message}")
            }
            _ => {}
        }
    };
    assert_eq!(total, 1_000_005);
    assert_eq!(received, total);
}

#[test]
fn bad_frames_close_connection_and_agent_keeps_serving() {
    let agent = Agent::start(&[]);
    let mut host = agent.client();

    let ping = proto::encode_frame(&Message::Ping {}).unwrap();
    let mut bad_crc = ping.clone();
    *bad_crc.last_mut().unwrap() ^= 0xff;
    let mut oversized = Vec::new();
    oversized.extend_from_slice(&u32::MAX.to_be_bytes());
    oversized.extend_from_slice(&[0, 1, 0, 15]);
    let mut unknown = vec![0, 0, 0, 0, 0, 1, 0x12, 0x34];
    let crc = crc32c_of(&unknown[4..]);
    unknown.extend_from_slice(&crc.to_be_bytes());
    let mut malformed = vec![0, 0, 0, 2, 0, 1, 0, 2, 0xff, 0xff];
    let crc = crc32c_of(&malformed[4..]);
    malformed.extend_from_slice(&crc.to_be_bytes());

    for (i, junk) in [bad_crc, oversized, unknown, malformed]
        .into_iter()
        .enumerate()
    {
        for after_hello in [false, true] {
            let mut s = UnixStream::connect(&agent.socket).unwrap();
            if after_hello {
                raw_hello(&mut s);
            }
            s.write_all(&junk).unwrap();
            let (msgs, closed) = raw_read_all(&mut s);
            assert!(closed, "case {i}: connection not closed");
            assert!(
                msgs.iter().any(|m| matches!(m, Message::Error { .. })),
                "case {i}: no error in {msgs:?}"
            );
        }
    }
    // Random garbage without a handshake does not disturb anything either.
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    let _ = s.write_all(&[7u8; 100]);
    drop(s);
    // The last good connection was replaced by the raw ones that completed Hello, so a
    // fresh client must work.
    drop(host.ping(Duration::from_millis(200)));
    let mut c = agent.client();
    c.ping(T).unwrap();
    let exit = c.run_exec(&sh(1, "echo ok"), |_, _, _| {}).unwrap();
    assert_eq!(exit.code, Some(0));
}

fn crc32c_of(b: &[u8]) -> u32 {
    // Same checksum as the protocol: build a frame with the real encoder would hide bugs,
    // so compute CRC-32C bitwise here.
    let mut crc = !0u32;
    for &byte in b {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn poweroff_kills_steps_and_exits() {
    let mut agent = Agent::start(&[]);
    let mut c = agent.client();
    c.exec_start(&sh(1, "sleep 100 & sleep 100")).unwrap();
    let pid = loop {
        if let Message::ExecStarted { pid, .. } = c.recv(Some(T)).unwrap().unwrap() {
            break pid;
        }
    };
    c.poweroff(T).unwrap();
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent did not exit");
    assert!(status.success());
    assert!(group_gone(pid));
    assert!(!agent.socket.exists());
}

#[test]
fn daemonized_agent_survives_parent() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let pidfile = dir.path().join("d.pid");
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(&socket)
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--daemonize")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let from_file: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(printed, from_file);
    let pid = Pid::from_raw(from_file).unwrap();
    // The parent has exited; the agent lives on in its own session.
    test_kill_process(pid).unwrap();
    assert_eq!(rustix::process::getsid(Some(pid)).unwrap(), pid);
    let mut c = AgentClient::connect(&socket, T).unwrap();
    c.init("j", "t").unwrap();
    c.ping(T).unwrap();
    c.poweroff(T).unwrap();
    assert!(process_gone(from_file), "daemon did not exit");
    assert!(!pidfile.exists());
}

/// A daemonized agent that cannot start (here: its socket's directory does
/// not exist) fails its parent at once, with the child's reason in the log,
/// and leaves no process behind.
#[test]
fn a_daemonized_agent_that_cannot_listen_fails_its_parent_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("agent.log");
    let started = Instant::now();
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(dir.path().join("missing/d.sock"))
        .arg("--pidfile")
        .arg(dir.path().join("d.pid"))
        .arg("--log")
        .arg(&log)
        .arg("--daemonize")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the parent waited for a child that had failed"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exited during startup"), "{err}");
    assert!(out.stdout.is_empty(), "no pid is printed");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("Cannot listen on"), "{logged}");
    assert!(!dir.path().join("d.pid").exists());
}

fn process_gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        match stat {
            Err(_) => return true,
            Ok(s)
                if s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return true;
            }
            Ok(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
    false
}

#[test]
fn drain_flushes_buffered_output_first() {
    let agent = Agent::start(&[]);
    let mut c = agent.client();
    c.exec_start(&sh(1, "printf abc; printf def >&2; sleep 1"))
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    c.drain(T).unwrap();
    // Everything produced before Drain was received before Drained (queued for recv).
    let mut got = Vec::new();
    while let Some(m) = c.recv(Some(Duration::from_millis(1))).unwrap() {
        if let Message::Output { bytes, .. } = m {
            got.extend_from_slice(&bytes);
        }
    }
    assert_eq!(got.len(), 6);
    // Follow the rest from where we are (offset 6): no more output, then the exit.
    let exit = c.resume_exec(1, 6, |_, _, _| {}).unwrap();
    assert_eq!((exit.code, exit.total_bytes), (Some(0), 6));
}

#[test]
fn spawn_failure_is_reported() {
    let agent = Agent::start(&[]);
    let mut c = agent.client();
    let req = ExecRequest {
        exec_id: 9,
        argv: vec!["/nonexistent/prog".into()],
        ..Default::default()
    };
    match c.run_exec(&req, |_, _, _| {}) {
        Err(ClientError::Agent {
            exec_id: Some(9),
            code: ErrorCode::SpawnFailed,
            message,
        }) => {
            assert!(message.contains("Failed to start exec 9"), "{message}")
        }
        other => panic!("unexpected {other:?}"),
    }
    // Duplicate exec ids are refused.
    c.run_exec(&sh(10, "true"), |_, _, _| {}).unwrap();
    assert!(matches!(
        c.run_exec(&sh(10, "true"), |_, _, _| {}),
        Err(ClientError::Agent {
            exec_id: Some(10),
            code: ErrorCode::ExecExists,
            ..
        })
    ));
}

#[test]
fn errors_carry_codes_on_version_2_and_text_only_on_version_1() {
    let agent = Agent::start(&[]);
    for version in [1, 2] {
        let mut c = AgentClient::connect_with_versions(&agent.socket, T, 1, version).unwrap();
        assert_eq!(c.version(), version);
        c.init("job-1", "token-1").unwrap();
        let id = u64::from(version) * 100;
        c.run_exec(&sh(id, "true"), |_, _, _| {}).unwrap();
        c.exec_start(&sh(id, "true")).unwrap();
        c.ack(id + 1, 0).unwrap();
        let mut errors = Vec::new();
        while errors.len() < 2 {
            // A kind the version does not have would be a protocol error here.
            match c.recv(Some(T)).unwrap().expect("no answer") {
                m @ (Message::Error { .. } | Message::Failure { .. }) => errors.push(m),
                other => panic!("unexpected {other:?}"),
            }
        }
        let exists = format!("Exec {id} already exists.");
        let unknown = format!("Ack for unknown exec {}.", id + 1);
        if version == 1 {
            assert_eq!(
                errors,
                [
                    Message::Error {
                        exec_id: Some(id),
                        message: exists,
                    },
                    Message::Error {
                        exec_id: Some(id + 1),
                        message: unknown,
                    },
                ]
            );
        } else {
            assert_eq!(
                errors,
                [
                    Message::Failure {
                        exec_id: Some(id),
                        code: ErrorCode::ExecExists,
                        message: exists,
                    },
                    Message::Failure {
                        exec_id: Some(id + 1),
                        code: ErrorCode::UnknownExec,
                        message: unknown,
                    },
                ]
            );
        }
    }
}

/// Tests that set `ns_last_pid` take turns, so as not to take each other's pid.
static PID_REUSE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Starts `argv` with the pid `pid`, as pid reuse would give it, by setting the
/// pid namespace's last allocated pid (`/proc/sys/kernel/ns_last_pid`, root
/// only) just below it. Other processes of the host fork too, so it retries.
fn spawn_with_pid(pid: u32, argv: &[&str]) -> Child {
    let _turn = PID_REUSE.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("cannot write /proc/sys/kernel/ns_last_pid (these tests run as root)");
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        if child.id() == pid {
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start {argv:?} with pid {pid}");
}

fn alive(child: &mut Child) -> bool {
    child.try_wait().unwrap().is_none()
}

/// A finished step's process group id, now the pid (and group and session) of an
/// unrelated `setsid` process, is not the job's any more: poweroff leaves it alone.
#[test]
fn poweroff_spares_an_unrelated_process_holding_a_finished_steps_group_id() {
    let mut agent = Agent::start(&[]);
    let mut c = agent.client();
    let (pid, _, exit) = run_low(&mut c, &sh(1, "exit 0"));
    assert_eq!(exit.code, Some(0));
    // The step's leader is reaped and its group is empty: its id is free for reuse.
    let mut stranger = spawn_with_pid(pid, &["setsid", "sleep", "300"]);
    thread::sleep(Duration::from_millis(50));
    assert_eq!(
        rustix::process::getpgid(Pid::from_raw(pid as i32)).unwrap(),
        Pid::from_raw(pid as i32).unwrap(),
        "the stranger leads a process group with the step's old id"
    );
    c.poweroff(T).unwrap();
    agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent did not exit");
    let spared = alive(&mut stranger);
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(
        spared,
        "the agent killed an unrelated process that reused a finished step's group id"
    );
}

/// What a finished step left running in its own process group is still the job's:
/// poweroff kills it.
#[test]
fn poweroff_kills_what_a_finished_step_left_in_its_group() {
    let mut agent = Agent::start(&[]);
    let mut c = agent.client();
    let (leader, chunks, exit) = run_low(&mut c, &sh(1, "sleep 300 >/dev/null 2>&1 & echo $!"));
    assert_eq!(exit.code, Some(0));
    let out: Vec<u8> = chunks.into_iter().flat_map(|(_, _, b)| b).collect();
    let left: i32 = String::from_utf8_lossy(&out).trim().parse().unwrap();
    assert_eq!(
        rustix::process::getpgid(Pid::from_raw(left)).unwrap(),
        Pid::from_raw(leader as i32).unwrap()
    );
    c.poweroff(T).unwrap();
    agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent did not exit");
    assert!(
        process_gone(left),
        "the finished step's sleep survived poweroff"
    );
}

/// A process pinned by `procfs` and then gone gets no signal, and neither does the
/// unrelated process that was given its pid since.
#[test]
fn a_pinned_process_whose_pid_was_reused_is_not_signalled() {
    let mut first = Command::new("true").spawn().unwrap();
    let pid = first.id();
    let pinned = reel_agent::procfs::Pinned::new(pid as i32).unwrap();
    first.wait().unwrap();
    let mut stranger = spawn_with_pid(pid, &["sleep", "300"]);
    let sent = pinned.signal(rustix::process::Signal::KILL);
    thread::sleep(Duration::from_millis(50));
    let spared = alive(&mut stranger);
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert!(
        !sent && spared,
        "a signal for a gone process reached the one that reused its pid"
    );
}

/// Version 3: the files artifact patterns match are listed in name order and
/// read in chunks, byte for byte; no symbolic link is followed, nothing outside
/// the workdir is reached, and a refusal is an error that keeps the connection.
#[test]
fn artifact_files_are_listed_and_read_without_leaving_the_workdir() {
    let agent = Agent::start(&[]);
    let mut c = agent.client();
    assert_eq!(c.version(), 3);
    let (_, _, out) = run_low(
        &mut c,
        &sh(
            1,
            "mkdir -p dist/sub && head -c 600000 /dev/urandom > dist/big.bin && \
             printf hi > dist/sub/a.txt && ln -s /etc/hostname dist/link && ln -s / dist/root && \
             mkfifo dist/fifo",
        ),
    );
    assert_eq!(out.code, Some(0));
    let files = c
        .list_files(&["dist".into(), "nothing-*".into()], T)
        .unwrap();
    assert_eq!(
        files,
        [
            ("dist/big.bin".to_owned(), 600_000),
            ("dist/sub/a.txt".to_owned(), 2)
        ]
    );
    // Read in chunks of at most MAX_FILE_CHUNK, whatever is asked for.
    let mut bytes = Vec::new();
    let mut reads = 0;
    loop {
        let (chunk, eof) = c
            .read_file("dist/big.bin", bytes.len() as u64, 1 << 20, T)
            .unwrap();
        assert!(chunk.len() <= proto::MAX_FILE_CHUNK);
        bytes.extend(chunk);
        reads += 1;
        if eof {
            break;
        }
    }
    assert_eq!(reads, 3, "600,000 bytes in chunks of 256 KiB");
    assert!(bytes == std::fs::read(agent._dir.path().join("dist/big.bin")).unwrap());
    assert_eq!(
        c.read_file("dist/sub/a.txt", 0, 10, T).unwrap(),
        (b"hi".to_vec(), true)
    );
    assert_eq!(
        c.read_file("dist/sub/a.txt", 2, 10, T).unwrap(),
        (vec![], true)
    );
    for refused in [
        "dist/link",
        "dist/root/etc/hostname",
        "../x",
        "/etc/hostname",
        "dist",
        "dist/fifo",
    ] {
        match c.read_file(refused, 0, 10, T) {
            Err(ClientError::Agent {
                code: ErrorCode::FileRefused,
                ..
            }) => {}
            other => panic!("{refused}: {other:?}"),
        }
    }
    match c.list_files(&["dist".into(), "/etc".into()], T) {
        Err(ClientError::Agent {
            code: ErrorCode::BadPattern,
            message,
            ..
        }) => assert!(message.contains("absolute"), "{message}"),
        other => panic!("{other:?}"),
    }
    match c.read_file("dist/missing", 0, 10, T) {
        Err(ClientError::Agent {
            code: ErrorCode::FileUnreadable,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    // The connection still serves.
    c.ping(T).unwrap();
    // A version-2 host has no file messages: the client refuses to ask, and the
    // agent refuses them on such a connection.
    let mut old = AgentClient::connect_with_versions(&agent.socket, T, 1, 2).unwrap();
    old.init("job-1", "token-1").unwrap();
    assert!(matches!(
        old.list_files(&["dist".into()], T),
        Err(ClientError::Unsupported {
            needs: 3,
            version: 2,
            ..
        })
    ));
    old.send(&Message::ListFiles {
        patterns: vec!["dist".into()],
        after: None,
    })
    .unwrap();
    match old.recv(Some(T)).unwrap() {
        Some(Message::Failure {
            code: ErrorCode::UnexpectedMessage,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

/// A listing larger than one answer comes in pages, and the client asks for
/// every one.
#[test]
fn a_long_listing_comes_in_pages() {
    let agent = Agent::start(&[]);
    let mut c = agent.client();
    // 3,000 names of ~200 bytes: more than one answer's MAX_LIST_BYTES.
    let long = "n".repeat(190);
    let (_, _, out) = run_low(
        &mut c,
        &sh(
            1,
            &format!("mkdir many && cd many && for i in $(seq 1000 3999); do : > {long}$i; done"),
        ),
    );
    assert_eq!(out.code, Some(0));
    let files = c.list_files(&["many".into()], T).unwrap();
    assert_eq!(files.len(), 3000);
    assert!(files.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(files[0].0, format!("many/{long}1000"));
}

/// A step gets default signal dispositions whatever the agent inherited: the
/// guest's init starts the agent in the background, where SIGINT and SIGQUIT
/// are ignored, and a step would then never see the cancel ladder's SIGINT.
#[test]
fn a_step_sees_the_ladders_sigint_even_if_the_agent_ignores_it() {
    let agent = Agent::start_under(&["sh", "-c", "trap '' INT QUIT; exec \"$@\"", "sh"], &[]);
    let mut c = agent.client();
    let handle = c.cancel_handle();
    let mut sent = false;
    let mut out = Vec::new();
    let exit = c
        .run_exec(
            &sh(
                1,
                "trap 'echo got-int' INT; echo ready; while :; do sleep 0.05; done",
            ),
            |_, _, b| {
                out.extend_from_slice(b);
                if !sent && out.starts_with(b"ready") {
                    sent = true;
                    handle.cancel(1, Duration::from_millis(300)).unwrap();
                }
            },
        )
        .unwrap();
    assert_eq!(exit.signal, Some(15), "{exit:?}");
    assert!(
        String::from_utf8_lossy(&out).contains("got-int"),
        "the step never saw SIGINT: {}",
        String::from_utf8_lossy(&out)
    );
}
