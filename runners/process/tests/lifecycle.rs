//! The process runner's lifecycle with the real agent: output, environment, exit
//! codes, timeout, cancel, cgroups, crash recovery, reattach and resume.

mod common;

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::{Fixture, Output, Shared, job, step};
use reel_plugin_sdk::{ErrorKind, OutputSink, Runner, RunnerConfig, Stream};
use reel_runner_process::{ProcessRunner, plan_resources};

#[test]
fn full_lifecycle_is_byte_exact() {
    let f = Fixture::new(101);
    let cmd = r"printf 'a\377\376b\n'; printf 'err\200\n' >&2; seq 1 100000";
    let mut out = Output::default();
    let result = f.runner.exec(&f.handle, &step(1, cmd), &mut out).unwrap();
    assert!(result.success(), "{result:?}");
    assert!(out.gaps.is_empty(), "{:?}", out.gaps);
    let mut expected = b"a\xff\xfeb\n".to_vec();
    for i in 1..=100_000 {
        expected.extend_from_slice(format!("{i}\n").as_bytes());
    }
    assert_eq!(out.stdout, expected);
    assert_eq!(out.stderr, b"err\x80\n");
    assert_eq!(result.output_bytes, (expected.len() + 5) as u64);
    assert_eq!(result.output_bytes, out.next);

    f.runner.drain(&f.handle).unwrap();
    let agent = f.agent_pid();
    let start = Instant::now();
    f.runner.poweroff(&f.handle, true, 5000).unwrap();
    assert!(start.elapsed() < Duration::from_secs(6));
    assert!(!f.runner.probe(&f.handle).unwrap().alive);
    f.runner.cleanup(&f.handle).unwrap();
    f.runner.cleanup(&f.handle).unwrap();
    common::assert_nothing_left(f.root.path(), f.sandbox_id, Some(agent));
}

#[test]
fn step_environment() {
    let f = Fixture::new(102);
    let mut s = step(1, "env");
    s.environment
        .insert("STEP_VAR".to_owned(), "from step = with spaces".to_owned());
    s.environment
        .insert("JOB_VAR".to_owned(), "overridden".to_owned());
    let mut out = Output::default();
    let result = f.runner.exec(&f.handle, &s, &mut out).unwrap();
    assert!(result.success(), "{result:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let vars: Vec<&str> = text.lines().collect();
    let workdir = f.dir().join("work");
    assert!(
        vars.contains(&format!("HOME={}", workdir.display()).as_str()),
        "{text}"
    );
    assert!(vars.contains(&"CI=true"), "{text}");
    assert!(
        vars.contains(&format!("REEL_JOB_ID={}", job(102).job_id).as_str()),
        "{text}"
    );
    assert!(vars.contains(&"STEP_VAR=from step = with spaces"), "{text}");
    assert!(vars.contains(&"JOB_VAR=overridden"), "{text}");
    let path = format!("PATH={}", reel_runner_process::DEFAULT_PATH);
    assert!(vars.contains(&path.as_str()), "{text}");
    // Nothing of the engine's own environment leaks in.
    assert!(!text.contains("CARGO_MANIFEST_DIR"), "{text}");
    // Nor into the agent, whose environment every step can read.
    let agent = std::fs::read(format!("/proc/{}/environ", f.agent_pid())).unwrap();
    let mut agent: Vec<String> = agent
        .split(|&b| b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    agent.sort_unstable();
    assert_eq!(agent, [format!("HOME={}", workdir.display()), path]);

    // The step runs in work/, and HOME and PATH given by the engine are kept.
    let mut s = step(2, "pwd; echo $HOME; echo $PATH");
    s.environment
        .insert("HOME".to_owned(), "/custom".to_owned());
    s.environment
        .insert("PATH".to_owned(), "/bin:/usr/bin".to_owned());
    let mut out = Output::default();
    f.runner.exec(&f.handle, &s, &mut out).unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{}\n/custom\n/bin:/usr/bin\n", workdir.display())
    );
}

#[test]
fn failing_step_exit_code() {
    let f = Fixture::new(103);
    let result = f
        .runner
        .exec(
            &f.handle,
            &step(1, "echo before; exit 42"),
            &mut Output::default(),
        )
        .unwrap();
    assert_eq!(result.exit_code, Some(42));
    assert!(!result.success());
    let result = f
        .runner
        .exec(&f.handle, &step(2, "kill -TERM $$"), &mut Output::default())
        .unwrap();
    assert_eq!(result.signal, Some(15), "{result:?}");
}

#[test]
fn step_timeout() {
    let f = Fixture::new(104);
    let mut s = step(1, "echo started; sleep 30");
    s.timeout_ms = Some(300);
    let start = Instant::now();
    let mut out = Output::default();
    let result = f.runner.exec(&f.handle, &s, &mut out).unwrap();
    assert!(result.timed_out, "{result:?}");
    assert!(!result.success());
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(out.stdout, b"started\n");
    // The job is still usable.
    let result = f
        .runner
        .exec(&f.handle, &step(2, "true"), &mut Output::default())
        .unwrap();
    assert!(result.success());
}

#[test]
fn cancel_from_another_thread() {
    let f = Fixture::new(105);
    let s = step(7, "echo running; sleep 30");
    let (result, waited) = std::thread::scope(|scope| {
        let exec = scope.spawn(|| f.runner.exec(&f.handle, &s, &mut Output::default()));
        std::thread::sleep(Duration::from_millis(400));
        let at = Instant::now();
        f.runner.cancel(&f.handle, 7).unwrap();
        let result = exec.join().unwrap();
        (result, at.elapsed())
    });
    let result = result.unwrap();
    assert!(!result.success(), "{result:?}");
    assert!(result.signal.is_some(), "{result:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    // Unknown and finished exec ids are fine.
    f.runner.cancel(&f.handle, 7).unwrap();
    f.runner.cancel(&f.handle, 12345).unwrap();
    let result = f
        .runner
        .exec(&f.handle, &step(8, "echo ok"), &mut Output::default())
        .unwrap();
    assert!(result.success(), "{result:?}");
}

/// When the SIGINT and the SIGTERM of a cancel reached a step that traps both
/// (the step prints the time of each), and how long the cancel took.
fn cancel_signal_times(sandbox_id: u32, grace_ms: Option<u64>) -> (f64, f64, Duration) {
    let f = Fixture::with_job(reel_plugin_sdk::JobRequest {
        cancel_grace_ms: grace_ms,
        ..job(sandbox_id)
    });
    let s = step(
        3,
        "trap 'echo INT $(date +%s.%N)' INT; trap 'echo TERM $(date +%s.%N)' TERM; \
         echo ready; while :; do sleep 0.02; done",
    );
    let out = Shared::default();
    let f = &f;
    let (result, took) = std::thread::scope(|scope| {
        let mut sink = out.clone();
        let exec = scope.spawn(move || f.runner.exec(&f.handle, &s, &mut sink));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&out.0.lock().unwrap().stdout).contains("ready") {
            assert!(Instant::now() < deadline, "the step never got ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        let at = Instant::now();
        f.runner.cancel(&f.handle, 3).unwrap();
        let result = exec.join().unwrap();
        (result, at.elapsed())
    });
    let result = result.unwrap();
    // Neither signal ended it: the ladder's SIGKILL did.
    assert_eq!(result.signal, Some(9), "{result:?}");
    let stdout = String::from_utf8_lossy(&out.0.lock().unwrap().stdout).into_owned();
    let at = |word: &str| -> f64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(word))
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {word} line in {stdout:?}"))
    };
    (at("INT "), at("TERM "), took)
}

/// A cancel's SIGINT → SIGTERM → SIGKILL ladder waits the job's
/// `cancel_grace_ms` between the signals: shorter and longer than the runner's
/// default of one second, and the default when the job sets none.
#[test]
fn a_cancel_waits_the_jobs_grace_between_its_signals() {
    for (sandbox_id, grace_ms) in [(120, Some(300)), (121, Some(2500)), (122, None)] {
        let (int, term, took) = cancel_signal_times(sandbox_id, grace_ms);
        let grace = grace_ms.unwrap_or(1000) as f64 / 1000.0;
        let gap = term - int;
        assert!(
            gap >= grace - 0.05 && gap < grace + 0.6,
            "grace {grace_ms:?}: SIGTERM came {gap:.3} s after SIGINT"
        );
        // INT, a grace, TERM, a grace, KILL.
        let took = took.as_secs_f64();
        assert!(
            took >= 2.0 * grace - 0.05 && took < 2.0 * grace + 1.5,
            "grace {grace_ms:?}: the cancelled exec returned after {took:.3} s"
        );
    }
}

/// `collect` through the agent: a file of several chunks and a small one, byte
/// for byte with their CRCs, in place and nothing partial left; links out of the
/// work directory are not followed; a refused or unmatched pattern is a notice,
/// not an error; the cap stops before the file that would pass it.
#[test]
fn artifacts_are_collected_through_the_agent() {
    use reel_plugin_sdk::CollectRequest;
    let f = Fixture::new(123);
    let made = f
        .runner
        .exec(
            &f.handle,
            &step(
                1,
                "mkdir -p dist && head -c 700000 /dev/urandom > dist/app.bin && \
                 echo '<ok/>' > report.xml && ln -s /etc/passwd dist/passwd && \
                 ln -s / dist/root",
            ),
            &mut Output::default(),
        )
        .unwrap();
    assert!(made.success(), "{made:?}");
    let work = f.dir().join("work");
    let out = tempfile::tempdir().unwrap();
    let request = |run: &str, cap: u64, already: Vec<String>| {
        let req = CollectRequest {
            patterns: vec![
                "dist/**".into(),
                "*.xml".into(),
                "/etc/*".into(),
                "none/*".into(),
            ],
            dest_dir: out.path().join(run),
            partial_dir: out.path().join(format!("{run}.part")),
            max_total_bytes: cap,
            already,
        };
        std::fs::create_dir_all(&req.dest_dir).unwrap();
        std::fs::create_dir_all(&req.partial_dir).unwrap();
        req
    };
    let req = request("all", 1 << 30, vec![]);
    let got = f.runner.collect(&f.handle, &req).unwrap();
    let names: Vec<&str> = got.collected.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["dist/app.bin", "report.xml"]);
    assert_eq!((got.matched, got.cap_reached_at.as_deref()), (2, None));
    for c in &got.collected {
        let copy = std::fs::read(req.dest_dir.join(&c.name)).unwrap();
        assert!(
            copy == std::fs::read(work.join(&c.name)).unwrap(),
            "{}",
            c.name
        );
        assert_eq!(
            (c.size, c.crc32c),
            (copy.len() as u64, crc32c::crc32c(&copy))
        );
    }
    assert_eq!(std::fs::read_dir(&req.partial_dir).unwrap().count(), 0);
    assert!(!req.dest_dir.join("dist/passwd").exists());
    assert!(!req.dest_dir.join("dist/root").exists());

    // A cap below the big file: nothing is copied, and the cap names it.
    let req = request("capped", 699_999, vec![]);
    let got = f.runner.collect(&f.handle, &req).unwrap();
    assert_eq!(got.collected, []);
    assert_eq!(got.cap_reached_at.as_deref(), Some("dist/app.bin"));
    assert_eq!(std::fs::read_dir(&req.dest_dir).unwrap().count(), 0);
    // With the big file stored already, only the rest is copied.
    let req = request("rest", 1 << 30, vec!["dist/app.bin".into()]);
    let got = f.runner.collect(&f.handle, &req).unwrap();
    let names: Vec<&str> = got.collected.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["report.xml"]);
}

#[test]
fn a_cancel_that_arrives_before_its_exec_is_not_lost() {
    let f = Fixture::new(115);
    // The engine's cancel can race ahead of the exec call it is meant for.
    f.runner.cancel(&f.handle, 9).unwrap();
    let at = Instant::now();
    let mut out = Output::default();
    let result = f
        .runner
        .exec(&f.handle, &step(9, "echo ran; sleep 30"), &mut out)
        .unwrap();
    assert!(at.elapsed() < Duration::from_secs(3), "{:?}", at.elapsed());
    assert!(!result.success(), "{result:?}");
    assert!(out.stdout.is_empty(), "the cancelled step ran");
}

#[test]
fn cgroup_v1_limits_and_removal() {
    if !common::v1_available() {
        eprintln!("skipped: this host has no cgroup v1 memory+pids hierarchies");
        return;
    }
    let f = Fixture::new(106);
    let memory = common::v1_cgroup("memory", 106);
    let pids = common::v1_cgroup("pids", 106);
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap().trim().to_owned();
    assert_eq!(
        read(memory.join("memory.limit_in_bytes")),
        (128u64 << 20).to_string()
    );
    assert_eq!(read(pids.join("pids.max")), "500");
    let agent = f.agent_pid();
    for cg in [&memory, &pids] {
        let procs = read(cg.join("cgroup.procs"));
        assert!(
            procs.split_whitespace().any(|p| p == agent.to_string()),
            "agent {agent} not in {}: {procs}",
            cg.display()
        );
    }
    let mut out = Output::default();
    f.runner
        .exec(&f.handle, &step(1, "cat /proc/self/cgroup"), &mut out)
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let marker = format!("{}/sbx-106", common::cgroup_parent(106));
    assert!(
        text.lines()
            .any(|l| l.contains(":memory:") && l.contains(&marker))
            && text
                .lines()
                .any(|l| l.contains(":pids:") && l.contains(&marker)),
        "{text}"
    );
    let resources = plan_resources(&f.plan);
    assert!(
        resources
            .iter()
            .any(|r| r.contains(&memory.display().to_string())
                && r.contains("memory.limit_in_bytes=134217728")),
        "{resources:?}"
    );
    // A background process survives its step; cleanup still removes it and the cgroups.
    f.runner
        .exec(
            &f.handle,
            &step(2, "sleep 300 >/dev/null 2>&1 &"),
            &mut Output::default(),
        )
        .unwrap();
    assert!(common::job_processes(106, Some(agent)).len() >= 2);
    f.runner.cleanup(&f.handle).unwrap();
    common::assert_nothing_left(f.root.path(), 106, Some(agent));
}

/// A step the OOM killer ends in the job's memory cgroup (128 MiB in these tests)
/// fails with that cause; a step that survives the loss of a child is left alone.
#[test]
fn a_step_killed_for_memory_fails_with_the_cause() {
    let f = Fixture::new(117);
    if !plan_resources(&f.plan)
        .iter()
        .any(|r| r.starts_with("cgroup-v1-memory") || r.starts_with("cgroup-v2"))
    {
        eprintln!("skipped: this host gives the runner no memory cgroup");
        return;
    }
    let hog = "perl -e '$x = \"a\" x (600 << 20); print length $x'";
    let err = f
        .runner
        .exec(&f.handle, &step(1, hog), &mut Output::default())
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Failed);
    assert!(
        err.message.starts_with(
            "out of memory (limit 128 MiB): the kernel's OOM killer ended 1 process of the job; \
             the step "
        ) && err.message.contains("137"),
        "{err}"
    );
    let survivor = format!("{hog}; echo survived");
    let mut out = Output::default();
    let result = f
        .runner
        .exec(&f.handle, &step(2, &survivor), &mut out)
        .unwrap();
    assert!(result.success(), "{result:?}");
    assert_eq!(out.stdout, b"survived\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Killed"),
        "the child was not OOM-killed: {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn agent_killed_then_probe_and_cleanup() {
    let f = Fixture::new(107);
    f.runner
        .exec(
            &f.handle,
            &step(1, "sleep 300 >/dev/null 2>&1 &"),
            &mut Output::default(),
        )
        .unwrap();
    let agent = f.agent_pid();
    assert!(f.runner.probe(&f.handle).unwrap().alive);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(agent).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.runner.probe(&f.handle).unwrap().alive {
        assert!(Instant::now() < deadline, "probe still says alive");
        std::thread::sleep(Duration::from_millis(20));
    }
    let probe = f.runner.probe(&f.handle).unwrap();
    assert!(!probe.reattachable, "{probe:?}");
    // The orphaned sleep is still there until cleanup.
    assert!(!common::job_processes(107, Some(agent)).is_empty());
    assert_eq!(
        f.runner.reattach(&f.handle).unwrap_err().kind,
        ErrorKind::NotFound
    );
    f.runner.cleanup(&f.handle).unwrap();
    common::assert_nothing_left(f.root.path(), 107, Some(agent));
}

#[test]
fn cleanup_from_plan_handle_after_lost_prepare() {
    let root = tempfile::tempdir().unwrap();
    let runner = ProcessRunner::new(&common::config(root.path(), 108)).unwrap();
    let plan = runner.plan(&job(108)).unwrap();
    assert_eq!(plan, runner.plan(&job(108)).unwrap());
    assert!(!root.path().join("108").exists(), "plan had a side effect");
    // Cleanup of a plan whose resources never existed.
    runner.cleanup(&plan).unwrap();
    let _lost = runner.prepare(&plan).unwrap();
    assert!(root.path().join("108/work").is_dir());
    if common::v1_available() {
        assert!(common::v1_cgroup("memory", 108).is_dir());
        assert!(common::v1_cgroup("pids", 108).is_dir());
    }
    let probe = runner.probe(&plan).unwrap();
    assert!(!probe.alive, "{probe:?}");
    runner.cleanup(&plan).unwrap();
    runner.cleanup(&plan).unwrap();
    common::assert_nothing_left(root.path(), 108, None);
    common::remove_cgroup_parent(108);
}

#[test]
fn boot_handle_lost_prepare_handle_finds_agent() {
    let root = tempfile::tempdir().unwrap();
    let runner = ProcessRunner::new(&common::config(root.path(), 109)).unwrap();
    let plan = runner.plan(&job(109)).unwrap();
    let prepared = runner.prepare(&plan).unwrap();
    let _lost = runner.boot(&prepared).unwrap();
    let agent: i32 = std::fs::read_to_string(root.path().join("109/agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // A new engine only has the prepare handle (BootRequested, no VmBooted).
    let engine2 = ProcessRunner::new(&common::config(root.path(), 109)).unwrap();
    let probe = engine2.probe(&prepared).unwrap();
    assert!(probe.alive && probe.reattachable, "{probe:?}");
    // It can take the job back from that handle too ...
    let handle = engine2.reattach(&prepared).unwrap();
    let mut out = Output::default();
    let result = engine2
        .exec(&handle, &step(1, "echo hi"), &mut out)
        .unwrap();
    assert!(result.success() && out.stdout == b"hi\n", "{result:?}");
    // ... or reap it from the prepare handle, and even from the plan handle.
    engine2.poweroff(&prepared, false, 2000).unwrap();
    engine2.cleanup(&prepared).unwrap();
    assert!(!engine2.probe(&prepared).unwrap().alive);
    assert!(!engine2.probe(&plan).unwrap().alive);
    common::assert_nothing_left(root.path(), 109, Some(agent));
    common::remove_cgroup_parent(109);
}

#[test]
fn cleanup_from_plan_handle_kills_a_booted_agent() {
    let root = tempfile::tempdir().unwrap();
    let runner = ProcessRunner::new(&common::config(root.path(), 110)).unwrap();
    let plan = runner.plan(&job(110)).unwrap();
    let prepared = runner.prepare(&plan).unwrap();
    let booted = runner.boot(&prepared).unwrap();
    let handle = runner.connect(&booted).unwrap();
    runner
        .exec(
            &handle,
            &step(1, "sleep 300 >/dev/null 2>&1 &"),
            &mut Output::default(),
        )
        .unwrap();
    let agent: i32 = std::fs::read_to_string(root.path().join("110/agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(runner.probe(&plan).unwrap().alive);
    runner.cleanup(&plan).unwrap();
    common::assert_nothing_left(root.path(), 110, Some(agent));
    common::remove_cgroup_parent(110);
}

/// A step that moves itself two levels down into child cgroups of the job's in
/// every hierarchy, and there starts, in a session of its own, a loop that forks
/// as fast as it can: cleanup from the plan handle alone (as recovery does) kills
/// all of it and removes the cgroups, children first.
#[test]
fn cleanup_kills_what_escaped_into_child_cgroups_and_removes_them() {
    if !common::v1_available() {
        eprintln!("skipped: this host has no cgroup v1 memory+pids hierarchies");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let runner = ProcessRunner::new(&common::config(root.path(), 119)).unwrap();
    let plan = runner.plan(&job(119)).unwrap();
    let prepared = runner.prepare(&plan).unwrap();
    let booted = runner.boot(&prepared).unwrap();
    let handle = runner.connect(&booted).unwrap();
    let agent = std::fs::read_to_string(root.path().join("119/agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let escape = r#"
        grep sbx-119 /proc/self/cgroup | while IFS=: read -r id controllers path; do
          dir=/sys/fs/cgroup/${controllers#name=}$path/escape/deeper
          mkdir -p "$dir" && echo $$ > "$dir/cgroup.procs" && echo "moved into $dir"
        done
        setsid sh -c 'i=0; while [ $i -lt 2000 ]; do sleep 300 & i=$((i+1)); done; wait' \
          >/dev/null 2>&1 &
        sleep 0.2
    "#;
    let mut out = Output::default();
    let result = runner.exec(&handle, &step(1, escape), &mut out).unwrap();
    assert!(result.success(), "{result:?} {out:?}");
    let moved = String::from_utf8_lossy(&out.stdout)
        .matches("moved into ")
        .count();
    assert!(
        moved >= 2,
        "the step did not leave the job's cgroups: {out:?}"
    );
    let escaped = common::job_processes(119, None).len();
    assert!(escaped > 10, "the loop did not fork: {escaped} processes");
    let cleaned = runner.cleanup(&plan);
    let left = common::job_processes(119, Some(agent));
    for (pid, _) in &left {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_raw(*pid).unwrap(),
            rustix::process::Signal::KILL,
        );
    }
    cleaned.unwrap();
    common::assert_nothing_left(root.path(), 119, Some(agent));
    common::remove_cgroup_parent(119);
}

/// Collects the expected output of the counting step.
fn counting(n: u32) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect()
}

#[test]
fn reattach_mid_step_and_resume() {
    let f = Fixture::new(111);
    let cmd = "i=1; while [ $i -le 60 ]; do echo line $i; [ $((i % 2)) = 0 ] && echo line $i >&2 || true; i=$((i+1)); sleep 0.03; done";
    // Expected combined content per stream.
    let first = Shared::default();
    let s = step(21, cmd);
    let agent = f.agent_pid();
    let (stored, result_a) = std::thread::scope(|scope| {
        let mut sink = first.clone();
        let s = &s;
        let f = &f;
        let a = scope.spawn(move || f.runner.exec(&f.handle, s, &mut sink));
        // Wait for some output, then a "new engine" takes over.
        let deadline = Instant::now() + Duration::from_secs(10);
        while first.0.lock().unwrap().next < 200 {
            assert!(Instant::now() < deadline, "no output");
            std::thread::sleep(Duration::from_millis(10));
        }
        let engine2 = f.new_runner();
        let probe = engine2.probe(&f.handle).unwrap();
        assert!(probe.alive && probe.reattachable, "{probe:?}");
        let handle2 = engine2.reattach(&f.handle).unwrap();
        // What the old engine had stored when it "died".
        let stored = first.0.lock().unwrap().clone();
        assert!(stored.next >= 200 && stored.next < counting(60).len() as u64);
        let mut resumed = Output::from_offset(stored.next);
        let mut s2 = s.clone();
        s2.resume_from = stored.next;
        let result = engine2.exec(&handle2, &s2, &mut resumed).unwrap();
        let result_a = a.join().unwrap();
        let mut all = stored.clone();
        all.gaps.extend(resumed.gaps.clone());
        all.combined.extend_from_slice(&resumed.combined);
        all.stdout.extend_from_slice(&resumed.stdout);
        all.stderr.extend_from_slice(&resumed.stderr);
        assert!(result.success(), "{result:?}");
        assert_eq!(result.output_bytes, all.combined.len() as u64);
        engine2.cleanup(&handle2).unwrap();
        (all, result_a)
    });
    assert!(
        result_a.is_err(),
        "the replaced connection's exec should fail: {result_a:?}"
    );
    assert!(stored.gaps.is_empty(), "{:?}", stored.gaps);
    assert_eq!(stored.stdout, counting(60));
    let evens: Vec<u8> = (1..=60)
        .filter(|i| i % 2 == 0)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    assert_eq!(stored.stderr, evens);
    common::assert_nothing_left(f.root.path(), 111, Some(agent));
}

/// A sink that blocks on its first chunk until released: the engine "hangs" and
/// dies while the step runs to its end.
struct Stuck {
    inner: Output,
    gate: Arc<Barrier>,
    stored: Arc<Mutex<Option<Output>>>,
}

impl OutputSink for Stuck {
    fn chunk(&mut self, stream: Stream, offset: u64, bytes: &[u8]) {
        let first = self.inner.next == 0;
        self.inner.chunk(stream, offset, bytes);
        if first {
            *self.stored.lock().unwrap() = Some(self.inner.clone());
            self.gate.wait();
        }
    }
}

#[test]
fn reattach_after_step_ended_collects_exit() {
    let f = Fixture::new(112);
    let cmd = "echo first; sleep 0.3; seq 1 5000; echo done >&2; exit 7";
    let gate = Arc::new(Barrier::new(2));
    let stored = Arc::new(Mutex::new(None));
    let s = step(31, cmd);
    std::thread::scope(|scope| {
        let mut sink = Stuck {
            inner: Output::default(),
            gate: Arc::clone(&gate),
            stored: Arc::clone(&stored),
        };
        let (f, s) = (&f, &s);
        let a = scope.spawn(move || f.runner.exec(&f.handle, s, &mut sink));
        let deadline = Instant::now() + Duration::from_secs(10);
        while stored.lock().unwrap().is_none() {
            assert!(Instant::now() < deadline, "no output");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The step ends while the "engine" is stuck.
        std::thread::sleep(Duration::from_millis(1500));
        let kept = stored.lock().unwrap().clone().unwrap();
        let engine2 = f.new_runner();
        let handle2 = engine2.reattach(&f.handle).unwrap();
        gate.wait();
        let mut s2 = s.clone();
        s2.resume_from = kept.next;
        let mut rest = Output::from_offset(kept.next);
        let result = engine2.exec(&handle2, &s2, &mut rest).unwrap();
        assert_eq!(result.exit_code, Some(7), "{result:?}");
        assert!(rest.gaps.is_empty(), "{:?}", rest.gaps);
        let mut stdout = kept.stdout.clone();
        stdout.extend_from_slice(&rest.stdout);
        let mut expected = b"first\n".to_vec();
        for i in 1..=5000 {
            expected.extend_from_slice(format!("{i}\n").as_bytes());
        }
        assert_eq!(stdout, expected);
        assert_eq!([kept.stderr, rest.stderr].concat(), b"done\n");
        assert_eq!(result.output_bytes, expected.len() as u64 + 5);
        let _ = a.join().unwrap();
        engine2.cleanup(&handle2).unwrap();
    });
    common::assert_nothing_left(f.root.path(), 112, None);
}

#[test]
fn socket_path_too_long_is_refused() {
    let long = std::env::temp_dir().join("x".repeat(120));
    let config = RunnerConfig {
        sandbox_root: long,
        ..RunnerConfig::default()
    };
    let runner = ProcessRunner::new(&config).unwrap();
    let err = runner.plan(&job(113)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    assert!(err.message.contains("107 bytes"), "{err}");
    assert!(runner.validate(&job(113)).is_err());
}

#[test]
fn missing_agent_binary_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let mut config = common::config(root.path(), 114);
    config.options.insert(
        "agent_path".to_owned(),
        "/nonexistent/reel-agent".to_owned(),
    );
    let runner = ProcessRunner::new(&config).unwrap();
    let plan = runner.plan(&job(114)).unwrap();
    let prepared = runner.prepare(&plan).unwrap();
    let err = runner.boot(&prepared).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert!(err.message.contains("/nonexistent/reel-agent"), "{err}");
    runner.cleanup(&plan).unwrap();
    common::assert_nothing_left(root.path(), 114, None);
    common::remove_cgroup_parent(114);
}

#[test]
fn poweroff_while_a_step_runs() {
    let f = Fixture::new(115);
    let agent = f.agent_pid();
    let s = step(1, "sleep 30 & sleep 30");
    let (result, took) = std::thread::scope(|scope| {
        let exec = scope.spawn(|| f.runner.exec(&f.handle, &s, &mut Output::default()));
        std::thread::sleep(Duration::from_millis(400));
        let start = Instant::now();
        f.runner.poweroff(&f.handle, true, 3000).unwrap();
        let took = start.elapsed();
        (exec.join().unwrap(), took)
    });
    assert!(took < Duration::from_millis(3500), "{took:?}");
    assert!(result.is_err() || !result.unwrap().success());
    assert!(!f.runner.probe(&f.handle).unwrap().alive);
    assert!(common::job_processes(115, Some(agent)).is_empty());
    f.runner.cleanup(&f.handle).unwrap();
    common::assert_nothing_left(f.root.path(), 115, Some(agent));
}

#[test]
fn forced_poweroff_with_no_time() {
    let f = Fixture::new(116);
    let agent = f.agent_pid();
    f.runner
        .exec(
            &f.handle,
            &step(1, "sleep 300 >/dev/null 2>&1 &"),
            &mut Output::default(),
        )
        .unwrap();
    let start = Instant::now();
    f.runner.poweroff(&f.handle, false, 0).unwrap();
    assert!(start.elapsed() < Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(3);
    while !common::job_processes(116, Some(agent)).is_empty() {
        assert!(Instant::now() < deadline, "SIGKILL did not take");
        std::thread::sleep(Duration::from_millis(20));
    }
    f.runner.cleanup(&f.handle).unwrap();
    common::assert_nothing_left(f.root.path(), 116, Some(agent));
}
