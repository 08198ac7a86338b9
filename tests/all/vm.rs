//! The QEMU runner with real microVMs (TCG here: these machines have no usable
//! KVM): the guest image built by `scripts/build-guest-image`, the real `reel`
//! binary, real QEMU processes, real SIGKILLs of the engine and of QEMU.

use std::os::unix::process::ExitStatusExt;

use reel_tests::{
    assert_nothing_left, events, guest_image, guest_spec, interrupt_run_until_cancelled, json,
    processes_under, reel, start_run_until_output, stored_artifacts, text, time_after,
    workspace_root,
};

use crate::crash::{Chaos, JOB, POINTS, Path, chaos, expected_output, run_path};

/// VM tests take turns: each boots up to three TCG guests at once (the crash
/// matrix), and more on a 2-core machine would slow every other test down.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// `runner: qemu` with the built image and small resources (TCG boots faster
/// with less memory to set up).
fn header(memory: &str) -> String {
    format!(
        "runner: qemu\nimage: {}\nresources: {{ memory: {memory}, disk: 64M }}\n",
        guest_image().display()
    )
}

/// `JOB` (two steps printing numbered lines slowly) in a VM.
fn vm_job() -> String {
    let (name, rest) = JOB.split_once('\n').unwrap();
    format!("{name}\n{}{rest}", header("256M"))
}

fn write_job(dir: &std::path::Path, name: &str, yaml: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path.to_string_lossy().into_owned()
}

/// The README's command: `examples/vm-hello.yml` prints the guest's kernel (the
/// image's, not the host's), and nothing of the VM is left.
#[test]
fn vm_hello_prints_the_guest_kernel_and_leaves_nothing() {
    let _turn = turn();
    let spec = guest_spec();
    let state = tempfile::tempdir().unwrap();
    let example = workspace_root().join("examples/vm-hello.yml");
    // The example relies on the default image (`target/guest/current`).
    let out = reel(state.path(), &["run", example.to_str().unwrap()], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout} / {}", text(&out.stderr));
    let guest = spec["kernel_version"].as_str().unwrap();
    assert!(
        stdout.contains(guest),
        "not the guest's kernel {guest}: {stdout}"
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    if host.trim() != guest {
        assert!(!stdout.contains(host.trim()), "the host's kernel: {stdout}");
    }
    assert!(stdout.contains("working in /work"), "{stdout}");
    let names = events(state.path(), 1);
    for e in [
        "CidAllocated",
        "VolumesFormatted",
        "VmBooted",
        "AgentConnected",
        "PoweredOff",
        "Cleaned",
    ] {
        assert!(names.iter().any(|n| n == e), "{e} missing: {names:?}");
    }
    let inspect = json(&reel(state.path(), &["replay", "1", "--json"], &[]));
    let timeline = inspect.to_string();
    assert!(
        timeline.contains("work.img"),
        "the volume is on the record: {timeline}"
    );
    assert_nothing_left(state.path(), "vm-hello");
}

/// Every lifecycle event of a VM job, SIGKILL before and after it: `reel recover`
/// reattaches to the live VM (and resumes the running step with no gap and no
/// duplicate) or reaps it, and nothing is left: no QEMU, cgroup or file.
#[test]
fn vm_crash_matrix_every_lifecycle_event_before_and_after_a_sigkill() {
    let _turn = turn();
    run_path(&Path {
        name: "vm success",
        job: vm_job(),
        env: vec![],
        cancel: false,
        points: POINTS.iter().map(|p| (*p, 1)).collect(),
        outcome: "Succeeded",
        output: expected_output(),
        artifacts: vec![],
    });
}

/// Eight VM jobs, two at a time, the engine SIGKILLed four times at random
/// moments: every job ends exactly once, every succeeded job's output is
/// complete, nothing leaks.
#[test]
fn vm_chaos_eight_jobs_four_sigkills() {
    let _turn = turn();
    chaos(&Chaos {
        jobs: 8,
        kills: 4,
        header: header("256M"),
        parallel: 2,
        first_wait_ms: 3000,
        wait_ms: 1500,
        jitter_ms: 3000,
    });
}

/// A step that allocates past the guest's memory ends with the cause "out of
/// memory", the guest's memory named, not a bare exit status.
#[test]
fn a_guest_that_runs_out_of_memory_says_so() {
    let _turn = turn();
    let state = tempfile::tempdir().unwrap();
    let job = write_job(
        state.path(),
        "hog.yml",
        &format!(
            "name: hog\n{}steps:\n  - name: hog\n    command: x=$(head -c 400000000 /dev/zero | tr '\\0' x); echo ${{#x}}\n",
            header("128M")
        ),
    );
    let out = reel(state.path(), &["run", &job], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout} / {}",
        text(&out.stderr)
    );
    let inspect = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
    let reason = inspect["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("out of memory (the guest has 128 MiB)"),
        "the cause is on the job's record: {inspect}"
    );
    assert_nothing_left(state.path(), "guest oom");
}

/// QEMU killed under a running step: the step fails with the cause, the
/// console's last lines are on its stderr, and teardown leaves nothing.
#[test]
fn a_vm_killed_mid_step_fails_the_step_with_the_cause_and_the_console() {
    let _turn = turn();
    let state = tempfile::tempdir().unwrap();
    let job = write_job(
        state.path(),
        "slow.yml",
        &format!(
            "name: slow\n{}steps:\n  - name: wait\n    command: echo started; sleep 60\n",
            header("256M")
        ),
    );
    // Kill QEMU once the step's first line is stored.
    let mut child = start_run_until_output(
        state.path(),
        std::path::Path::new(&job),
        &[],
        1,
        std::time::Duration::from_secs(120),
    );
    let root = state.path().join("sandboxes");
    let all = processes_under(&root);
    let qemus: Vec<u32> = all
        .iter()
        .copied()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"qemu-system"))
        })
        .collect();
    assert_eq!(qemus.len(), 1, "one QEMU runs the job: {all:?} {qemus:?}");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(qemus[0] as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let inspect = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
    assert_eq!(status.code(), Some(1), "{inspect}");
    let reason = inspect["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("QEMU exited unexpectedly"), "{inspect}");
    let output = text(&reel(state.path(), &["output", "1"], &[]).stdout);
    assert!(
        output.contains("the guest console's last lines") && output.contains("reel-guest"),
        "the console tail is in the step's output: {output}"
    );
    assert_nothing_left(state.path(), "killed vm");
}

/// A guest kernel panic ends the step with "the guest kernel panicked".
#[test]
fn a_guest_kernel_panic_is_named_as_the_cause() {
    let _turn = turn();
    let state = tempfile::tempdir().unwrap();
    let job = write_job(
        state.path(),
        "panic.yml",
        &format!(
            "name: panic\n{}steps:\n  - name: crash\n    command: echo c > /proc/sysrq-trigger; sleep 30\n",
            header("256M")
        ),
    );
    let out = reel(state.path(), &["run", &job], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let inspect = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
    let reason = inspect["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("the guest kernel panicked"), "{inspect}");
    assert_nothing_left(state.path(), "panic");
}

/// A job naming an image that does not exist is refused before anything is
/// created, with the path and how to build an image.
#[test]
fn a_missing_image_is_refused_with_how_to_build_one() {
    let _turn = turn();
    let state = tempfile::tempdir().unwrap();
    let job = write_job(
        state.path(),
        "noimage.yml",
        "name: noimage\nrunner: qemu\nimage: /nonexistent/image\nsteps:\n  - name: a\n    command: true\n",
    );
    let out = reel(state.path(), &["run", &job], &[]);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(
        all.contains("/nonexistent/image") && all.contains("scripts/build-guest-image"),
        "{all}"
    );
    assert!(out.status.signal().is_none());
}

/// A VM step past its timeout is stopped by the guest agent (INT → TERM → KILL)
/// and the job ends `TimedOut`; Ctrl-C of `reel run` cancels a running VM step
/// and the job ends `Cancelled`. Either way the VM is torn down completely.
#[test]
fn a_vm_step_times_out_and_a_vm_job_is_cancelled_and_nothing_is_left() {
    let _turn = turn();
    let state = tempfile::tempdir().unwrap();
    let slow = write_job(
        state.path(),
        "timeout.yml",
        &format!(
            "name: timeout\n{}steps:\n  - name: wait\n    command: echo started; sleep 60\n    timeout: 2s\n",
            header("256M")
        ),
    );
    let out = reel(state.path(), &["run", &slow], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    let names = events(state.path(), 1);
    assert_eq!(
        names.last().map(String::as_str),
        Some("TimedOut"),
        "{names:?}"
    );
    assert_nothing_left(state.path(), "vm timeout");

    let state = tempfile::tempdir().unwrap();
    let job = write_job(
        state.path(),
        "cancel.yml",
        &format!(
            "name: cancel\n{}steps:\n  - name: wait\n    command: echo started; sleep 60\n  - name: after\n    command: echo never\n",
            header("256M")
        ),
    );
    let mut child = start_run_until_output(
        state.path(),
        std::path::Path::new(&job),
        &[],
        1,
        std::time::Duration::from_secs(120),
    );
    interrupt_run_until_cancelled(&mut child, state.path());
    let output = text(&reel(state.path(), &["output", "1"], &[]).stdout);
    assert!(!output.contains("never"), "{output}");
    assert_nothing_left(state.path(), "vm cancel");
}

/// A VM job's artifacts are read out of the guest's work directory by the guest
/// agent (protocol version 3) after the drain, also when the step failed:
/// whole, in name order, and a link is not followed.
#[test]
fn a_vm_jobs_artifacts_come_out_of_the_guest_whole() {
    let _turn = turn();
    let state = tempfile::tempdir().unwrap();
    let job = write_job(
        state.path(),
        "arts.yml",
        &format!(
            "name: arts\n{}artifacts: [out, \"*.log\"]\nsteps:\n  - name: build\n    \
             command: mkdir -p out && seq 1 100000 > out/numbers.txt && echo guest > run.log && \
             ln -s /etc/hostname out/host && exit 2\n",
            header("256M")
        ),
    );
    let out = reel(state.path(), &["run", &job], &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{} / {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let numbers: Vec<u8> = (1..=100_000)
        .flat_map(|i: u32| format!("{i}\n").into_bytes())
        .collect();
    assert!(
        stored_artifacts(state.path(), 1)
            == [
                ("out/numbers.txt".to_owned(), numbers),
                ("run.log".to_owned(), b"guest\n".to_vec())
            ],
        "{:?}",
        json(&reel(state.path(), &["inspect", "1", "--json"], &[]))
    );
    assert_nothing_left(state.path(), "vm artifacts");
}

/// Ctrl-C of a VM job with `cancel_grace: 2s`: the guest agent's ladder gives
/// the step that traps SIGINT and SIGTERM 2 s after each (the guest's uptime
/// stamps them), then SIGKILL, and the job ends cancelled.
#[test]
fn ctrl_c_of_a_vm_job_signals_its_step_cancel_grace_apart() {
    let _turn = turn();
    let state = tempfile::tempdir().unwrap();
    let job = write_job(
        state.path(),
        "graceful.yml",
        &format!(
            "name: graceful\n{}cancel_grace: 2s\nsteps:\n  - name: trap\n    command: |\n      \
             trap 'echo \"INT $(cut -d\" \" -f1 /proc/uptime)\"' INT\n      \
             trap 'echo \"TERM $(cut -d\" \" -f1 /proc/uptime)\"' TERM\n      \
             echo started\n      while :; do sleep 1; done\n",
            header("256M")
        ),
    );
    let mut child = start_run_until_output(
        state.path(),
        std::path::Path::new(&job),
        &[],
        1,
        std::time::Duration::from_secs(120),
    );
    interrupt_run_until_cancelled(&mut child, state.path());
    let output = text(&reel(state.path(), &["output", "1"], &[]).stdout);
    let gap = time_after(&output, "TERM ") - time_after(&output, "INT ");
    assert!(
        (1.9..3.0).contains(&gap),
        "SIGTERM came {gap:.2} s after SIGINT in the guest, not the job's 2 s: {output:?}"
    );
    assert_nothing_left(state.path(), "vm cancel grace");
}

/// `machine: q35` in the image's spec boots the bzImage on a PC with PCI virtio
/// devices instead of microvm; the same job runs.
#[test]
fn a_q35_spec_boots_a_pc_and_runs_the_job() {
    let _turn = turn();
    let image = guest_image();
    let state = tempfile::tempdir().unwrap();
    let mut spec = guest_spec();
    spec["machine"] = "q35".into();
    for key in ["kernel", "kernel_bzimage", "initrd"] {
        let file = image.join(spec[key].as_str().unwrap());
        spec[key] = file.to_string_lossy().into_owned().into();
    }
    let q35 = state.path().join("q35");
    std::fs::create_dir(&q35).unwrap();
    std::fs::write(q35.join("spec.json"), spec.to_string()).unwrap();
    let job = write_job(
        state.path(),
        "q35.yml",
        &format!(
            "name: q35\nrunner: qemu\nimage: {}\nresources: {{ memory: 256M, disk: 64M }}\nsteps:\n  - name: pci\n    command: ls /sys/bus/pci/devices | wc -l; cat /proc/mounts | grep -c ' /work '\n",
            q35.display()
        ),
    );
    let out = reel(state.path(), &["run", &job], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout} / {}", text(&out.stderr));
    let output = text(&reel(state.path(), &["output", "1"], &[]).stdout);
    let lines: Vec<&str> = output.lines().collect();
    assert!(
        lines.len() == 2 && lines[0].parse::<u32>().unwrap_or(0) > 0 && lines[1] == "1",
        "PCI devices and the /work volume: {output}"
    );
    assert_nothing_left(state.path(), "q35");
}

/// `--runner-option KEY=VALUE` reaches the runners: a bad `accel` and a missing
/// `image` are refused with the runner's reason, a malformed option by the
/// command line, all before anything runs.
#[test]
fn runner_options_reach_the_runner_and_bad_ones_are_refused() {
    let state = tempfile::tempdir().unwrap();
    let job = write_job(
        state.path(),
        "t.yml",
        "name: t\nrunner: qemu\nsteps:\n  - name: a\n    command: \"true\"\n",
    );
    for (option, says) in [
        (
            "accel=bogus",
            "option accel \"bogus\" is not one of auto, tcg, kvm",
        ),
        ("image=/nonexistent/img", "/nonexistent/img"),
        ("foo", "is not KEY=VALUE"),
    ] {
        let out = reel(state.path(), &["run", "--runner-option", option, &job], &[]);
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(2), "{option}: {all}");
        assert!(all.contains(says), "{option}: {all}");
    }
    let jobs = json(&reel(state.path(), &["jobs", "--json"], &[]));
    assert_eq!(
        jobs.as_array().map_or(0, Vec::len),
        0,
        "nothing was submitted"
    );
}

/// A stand-in for the internet beside this host: a network namespace joined to
/// the host by a veth pair, with a public address (TEST-NET-2, routed like any
/// outside host) and a private one (10/8) on the same link, and busybox httpd
/// serving `token` on both. Removed when dropped.
struct Outside {
    netns: String,
    host_link: String,
    httpd: std::process::Child,
    /// The host's own address on the link (a host address the guest must not reach).
    host_address: &'static str,
    public: &'static str,
    private: &'static str,
}

impl Outside {
    fn new(token: &str, www: &std::path::Path) -> Outside {
        let id = std::process::id() % 100_000;
        let netns = format!("reel-test-out-{id}");
        let host_link = format!("rto{id}h");
        let peer = format!("rto{id}o");
        let sh = |args: &[&str]| {
            let out = ip(args);
            assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
        };
        // What an earlier run of this test may have left.
        ip(&["netns", "delete", &netns]);
        ip(&["link", "delete", &host_link]);
        sh(&["netns", "add", &netns]);
        sh(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", &peer,
        ]);
        sh(&["link", "set", &peer, "netns", &netns]);
        sh(&["addr", "add", "198.51.100.201/30", "dev", &host_link]);
        sh(&["addr", "add", "10.213.0.1/30", "dev", &host_link]);
        sh(&["link", "set", &host_link, "up"]);
        for a in ["198.51.100.202/30", "10.213.0.2/30"] {
            sh(&["-n", &netns, "addr", "add", a, "dev", &peer]);
        }
        sh(&["-n", &netns, "link", "set", &peer, "up"]);
        sh(&["-n", &netns, "link", "set", "lo", "up"]);
        std::fs::write(www.join("token"), token).unwrap();
        let httpd = std::process::Command::new("ip")
            .args([
                "netns", "exec", &netns, "busybox", "httpd", "-f", "-p", "8080", "-h",
            ])
            .arg(www)
            .spawn()
            .expect("busybox httpd (scripts/install-vm-deps installs busybox-static)");
        let outside = Outside {
            netns,
            host_link,
            httpd,
            host_address: "198.51.100.201",
            public: "198.51.100.202",
            private: "10.213.0.2",
        };
        // From the host, both addresses answer.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for address in [outside.public, outside.private] {
            while std::net::TcpStream::connect((address, 8080)).is_err() {
                assert!(std::time::Instant::now() < deadline, "httpd on {address}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        outside
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.httpd.kill();
        let _ = self.httpd.wait();
        ip(&["link", "delete", &self.host_link]);
        ip(&["netns", "delete", &self.netns]);
    }
}

/// Runs `ip ARGS` and returns what it did.
fn ip(args: &[&str]) -> std::process::Output {
    std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)")
}

/// A shell function for a step: `try NAME URL` prints `NAME reached: BODY` or
/// `NAME blocked: WHY` (busybox wget, 5 s at most).
const TRY: &str = "try() { if out=$(timeout 5 wget -q -O - \"$2\" 2>&1); then echo \"$1 reached: $out\"; \
                   else echo \"$1 blocked: $out\"; fi; }";

/// `network: user` gives the guest outbound NAT: a host outside is reached, while
/// a private address on the same link, the host's own addresses and its
/// loopback (through either NAT's gateway) are not. The choice is in the plan
/// and the timeline, and the namespace and slirp4netns are gone afterwards. A
/// job without `network:` has no NIC at all.
#[test]
fn network_user_reaches_outside_but_not_the_host_or_private_ranges() {
    let _turn = turn();
    let state = tempfile::tempdir().unwrap();
    let www = tempfile::tempdir().unwrap();
    let token = format!("outside-{}", std::process::id());
    let outside = Outside::new(&token, www.path());
    // A server on every host address: whatever the guest reaches of the host,
    // this answers.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            use std::io::Write as _;
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nHOST");
        }
    });
    let probes = [
        ("public", format!("http://{}:8080/token", outside.public)),
        ("private", format!("http://{}:8080/token", outside.private)),
        (
            "host-address",
            format!("http://{}:{port}/", outside.host_address),
        ),
        ("slirp-gateway", format!("http://10.0.2.2:{port}/")),
        ("qemu-gateway", format!("http://10.0.3.2:{port}/")),
        ("metadata", "http://169.254.169.254/".to_owned()),
    ];
    let command: String = std::iter::once(TRY.to_owned())
        .chain(probes.iter().map(|(name, url)| format!("try {name} {url}")))
        .collect::<Vec<_>>()
        .join("\n");
    let indented = command.replace('\n', "\n      ");
    let job = write_job(
        state.path(),
        "net.yml",
        &format!(
            "name: net\n{}network: user\nsteps:\n  - name: probe\n    command: |\n      {indented}\n",
            header("256M")
        ),
    );
    let out = reel(state.path(), &["run", &job], &[]);
    assert!(
        out.status.success(),
        "{} / {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let output = text(&reel(state.path(), &["output", "1"], &[]).stdout);
    assert!(
        output.contains(&format!("public reached: {token}")),
        "the outside host: {output}"
    );
    for (name, _) in &probes[1..] {
        assert!(
            output.contains(&format!("{name} blocked:")),
            "{name} must be unreachable: {output}"
        );
    }
    assert!(
        !output.contains("HOST"),
        "the guest reached the host: {output}"
    );
    let replay = text(&reel(state.path(), &["replay", "1"], &[]).stdout);
    for says in ["network=user", "netns /run/netns/reel-vm-", "slirp4netns"] {
        assert!(
            replay.contains(says),
            "{says} missing from the timeline: {replay}"
        );
    }
    assert_nothing_left(state.path(), "network user");

    // Without `network:`, the guest has only its loopback.
    let state = tempfile::tempdir().unwrap();
    let job = write_job(
        state.path(),
        "none.yml",
        &format!(
            "name: none\n{}steps:\n  - name: probe\n    command: |\n      {TRY}\n      \
             ls /sys/class/net\n      try public http://{}:8080/token\n",
            header("256M"),
            outside.public
        ),
    );
    let out = reel(state.path(), &["run", &job], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let output = text(&reel(state.path(), &["output", "1"], &[]).stdout);
    assert!(
        output.starts_with("lo\npublic blocked:"),
        "no NIC without network: user: {output}"
    );
    let replay = text(&reel(state.path(), &["replay", "1"], &[]).stdout);
    assert!(replay.contains("network none"), "{replay}");
    assert_nothing_left(state.path(), "network none");
}

/// A `network: user` VM job through the crash points where its namespace and
/// slirp4netns come and go: planned, made, booted, mid-step (the VM reattached
/// with its network), powered off, cleaned. Nothing of either is left.
#[test]
fn vm_network_crash_points_leave_no_namespace_or_slirp4netns() {
    let _turn = turn();
    let (name, rest) = JOB.split_once('\n').unwrap();
    run_path(&Path {
        name: "vm network",
        job: format!("{name}\n{}network: user\n{rest}", header("256M")),
        env: vec![],
        cancel: false,
        points: [
            "SandboxPlanned",
            "WorkDirCreated",
            "BootRequested",
            "VmBooted",
            "StepStarted",
            "PoweredOff",
            "Cleaned",
        ]
        .iter()
        .map(|p| (*p, 1))
        .collect(),
        outcome: "Succeeded",
        output: expected_output(),
        artifacts: vec![],
    });
}
