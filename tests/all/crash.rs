//! Crash recovery, the way it fails in real life: the real `reel` process is
//! killed with SIGKILL at a chosen lifecycle event (`REEL_TEST_CRASH_AT`) or at
//! random moments, then `reel recover` finishes the work. Every job must end
//! exactly once, with its output complete and nothing left behind.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reel_tests::{
    assert_nothing_left, events, json, kill_sandboxes, processes_under, reel,
    start_run_until_output, stored_artifacts, target_dir, text,
};

/// Two steps printing numbered lines slowly, so crashes land mid-step.
pub(crate) const JOB: &str = "\
name: lines
steps:
  - name: one
    command: for i in 1 2 3 4 5; do echo \"one $i\"; sleep 0.1; done
  - name: two
    command: for i in 1 2 3; do echo \"two $i\"; sleep 0.1; done
";

pub(crate) fn expected_output() -> String {
    let mut s = String::new();
    for i in 1..=5 {
        s.push_str(&format!("one {i}\n"));
    }
    for i in 1..=3 {
        s.push_str(&format!("two {i}\n"));
    }
    s
}

const TERMINALS: [&str; 5] = ["Succeeded", "Failed", "Cancelled", "TimedOut", "Lost"];

/// The lifecycle events of a successful run, in order.
pub(crate) const POINTS: [&str; 18] = [
    "Submitted",
    "Queued",
    "SlotGranted",
    "CidAllocated",
    "SandboxPlanned",
    "WorkDirCreated",
    "VolumesFormatted",
    "BootRequested",
    "VmBooted",
    "AgentConnected",
    "StepStarted",
    "StepFinished",
    "TeardownStarted",
    "Drained",
    "PoweredOff",
    "CleanupStarted",
    "Cleaned",
    "Succeeded",
];

/// Crash points where the sandbox was set up partly, with no agent to reattach:
/// the job must be reaped. Everywhere else it must succeed.
pub(crate) fn must_be_lost(point: &str, when: &str) -> bool {
    matches!(
        (point, when),
        ("CidAllocated", "after")
            | ("SandboxPlanned", _)
            | ("WorkDirCreated", _)
            | ("VolumesFormatted", _)
            | ("BootRequested", _)
    )
}

#[test]
fn every_lifecycle_event_before_and_after_a_sigkill_recovers() {
    run_path(&Path {
        name: "success",
        job: JOB.into(),
        env: vec![],
        cancel: false,
        points: POINTS.iter().map(|p| (*p, 1)).collect(),
        outcome: "Succeeded",
        output: expected_output(),
        artifacts: vec![],
    });
}

/// A small deterministic generator, so a failing chaos run can be repeated.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn chaos_fifty_jobs_ten_sigkills_every_job_ends_once_and_nothing_leaks() {
    chaos(&Chaos {
        jobs: 50,
        kills: 10,
        header: String::new(),
        parallel: 4,
        first_wait_ms: 1500,
        wait_ms: 200,
        jitter_ms: 900,
    });
}

/// A chaos run: `jobs` random jobs (with `header` on top of each file), `reel run
/// -j parallel`, then `reel recover -j parallel`, SIGKILLed `kills` times after
/// random waits (the first run gets `first_wait_ms` to submit every job), then a
/// final recover.
pub(crate) struct Chaos {
    pub jobs: u64,
    pub kills: u32,
    pub header: String,
    pub parallel: u32,
    pub first_wait_ms: u64,
    pub wait_ms: u64,
    pub jitter_ms: u64,
}

pub(crate) fn chaos(c: &Chaos) {
    let seed = std::env::var("REEL_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_127);
    let mut rng = Lcg(seed);
    let state = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut expected = Vec::new();
    for j in 0..c.jobs {
        let steps = 1 + rng.next(3);
        let mut yaml = format!("name: chaos{j}\n{}steps:\n", c.header);
        let mut out = String::new();
        for s in 0..steps {
            let lines = 1 + rng.next(4);
            yaml.push_str(&format!(
                "  - name: s{s}\n    command: for i in $(seq 1 {lines}); do echo \"j{j} s{s} $i\"; sleep 0.05; done\n"
            ));
            for i in 1..=lines {
                out.push_str(&format!("j{j} s{s} {i}\n"));
            }
        }
        let path = state.path().join(format!("chaos{j}.yml"));
        std::fs::write(&path, yaml).unwrap();
        files.push(path.to_string_lossy().into_owned());
        expected.push(out);
    }
    let spawn = |args: &[String]| {
        Command::new(target_dir().join("reel"))
            .arg("--state-dir")
            .arg(state.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let parallel = c.parallel.to_string();
    let mut first: Vec<String> = vec!["run".into(), "-j".into(), parallel.clone()];
    first.extend(files.iter().cloned());
    let recover: Vec<String> = vec!["recover".into(), "-j".into(), parallel.clone()];
    for kill in 0..c.kills {
        let mut child = spawn(if kill == 0 { &first } else { &recover });
        // The first run submits every job before running any; let it.
        let base = if kill == 0 {
            c.first_wait_ms
        } else {
            c.wait_ms
        };
        let wait = Duration::from_millis(base + rng.next(c.jitter_ms));
        std::thread::sleep(wait);
        let _ = child.kill();
        let _ = child.wait();
    }
    let last = reel(state.path(), &["recover", "-j", &parallel], &[]);
    assert!(
        matches!(last.status.code(), Some(0 | 1)),
        "final recover: {} / {}",
        text(&last.stdout),
        text(&last.stderr)
    );
    let jobs = json(&reel(state.path(), &["jobs", "--json"], &[]));
    let jobs = jobs.as_array().unwrap();
    assert_eq!(
        jobs.len() as u64,
        c.jobs,
        "every job was submitted by the first run"
    );
    let (mut reattached, mut lost, mut recovered) = (0, 0, 0);
    for j in jobs {
        let id = j["id"].as_u64().unwrap();
        let names = events(state.path(), id);
        reattached += usize::from(names.iter().any(|n| n == "Reattached"));
        lost += usize::from(names.iter().any(|n| n == "Lost"));
        recovered += usize::from(names.iter().any(|n| n == "RecoveryStarted"));
        let terminals: Vec<&String> = names
            .iter()
            .filter(|n| TERMINALS.contains(&n.as_str()))
            .collect();
        assert_eq!(terminals.len(), 1, "job {id}: {names:?}");
        assert!(
            ["Succeeded", "Lost"].contains(&terminals[0].as_str()),
            "job {id}: {names:?}"
        );
        if terminals[0] == "Succeeded" {
            let name = j["name"].as_str().unwrap();
            let index: usize = name.trim_start_matches("chaos").parse().unwrap();
            let output = text(&reel(state.path(), &["output", &id.to_string()], &[]).stdout);
            assert_eq!(
                output, expected[index],
                "job {id} ({name}): output incomplete"
            );
        }
    }
    eprintln!(
        "chaos (seed {seed}): {} jobs, {recovered} taken over by a recovering engine, \
         {reattached} reattached to a live sandbox, {lost} lost",
        c.jobs
    );
    assert_nothing_left(state.path(), "chaos");
}

#[test]
fn a_sandbox_killed_with_its_engine_is_reaped_lost_and_nothing_is_left() {
    let state = tempfile::tempdir().unwrap();
    let job = state.path().join("slow.yml");
    std::fs::write(
        &job,
        "name: slow\nsteps:\n  - name: wait\n    command: echo started; sleep 30\n",
    )
    .unwrap();
    let run = reel(
        state.path(),
        &["run", job.to_str().unwrap()],
        &[("REEL_TEST_CRASH_AT", "StepStarted:after")],
    );
    assert_eq!(run.status.signal(), Some(9));
    // Kill the sandbox too: the agent and the step, as an OOM killer might.
    kill_sandboxes(state.path());
    let files = |s: &std::path::Path| {
        let mut v: Vec<(std::path::PathBuf, Vec<u8>)> = Vec::new();
        for dir in [s.join("log"), s.join("log/blobs")] {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.path().is_file() {
                    v.push((e.path(), std::fs::read(e.path()).unwrap()));
                }
            }
        }
        v.push((s.join("journal"), std::fs::read(s.join("journal")).unwrap()));
        v.sort();
        v
    };
    let before = files(state.path());
    let dry = json(&reel(
        state.path(),
        &["recover", "--dry-run", "--json"],
        &[],
    ));
    assert!(
        before == files(state.path()),
        "a dry run changed the log's files"
    );
    assert_eq!(dry[0]["action"], "reap", "{dry}");
    assert_eq!(dry[0]["alive"], false, "{dry}");
    let out = reel(state.path(), &["recover"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let names = events(state.path(), 1);
    assert_eq!(names.last().map(String::as_str), Some("Lost"), "{names:?}");
    assert!(names.contains(&"Reaped".to_string()));
    assert_nothing_left(state.path(), "killed sandbox");
}

/// The bytes a secret masker holds back (they could begin the secret) are not
/// durable, so they are never acknowledged to the agent: SIGKILL the engine
/// while a step sleeps after printing 300,000 bytes and the first bytes of a
/// 20-byte secret; `reel recover` reattaches, the agent sends those bytes
/// again, and the job succeeds with its output byte-exact (the secret masked
/// across the crash).
#[test]
fn output_a_masker_holds_back_survives_a_sigkill_of_the_engine() {
    let state = tempfile::tempdir().unwrap();
    let job = state.path().join("held.yml");
    std::fs::write(
        &job,
        "name: held\nsecrets: [TOKEN]\nsteps:\n  - name: print\n    command: |\n      head -c 300000 /dev/zero | tr '\\0' x\n      printf 's3cret-to'\n      sleep 3\n      printf 'ken-2026-ab\\n'\n",
    )
    .unwrap();
    let secret = ("REEL_SECRET_TOKEN", "s3cret-token-2026-ab");
    // Wait until the 300,000 bytes are stored (the secret's start is held), then kill.
    let status = run_until_output(
        state.path(),
        &job,
        &[secret],
        300_000,
        Duration::from_millis(300),
        Some(rustix::process::Signal::KILL),
    );
    assert_eq!(status.signal(), Some(9));
    let recover = reel(state.path(), &["recover"], &[secret]);
    assert_eq!(
        recover.status.code(),
        Some(0),
        "{} / {}",
        text(&recover.stdout),
        text(&recover.stderr)
    );
    let names = events(state.path(), 1);
    assert!(names.contains(&"Reattached".to_string()), "{names:?}");
    assert_eq!(
        names.last().map(String::as_str),
        Some("Succeeded"),
        "{names:?}"
    );
    let output = reel(state.path(), &["output", "1"], &[]).stdout;
    let mut expected = vec![b'x'; 300_000];
    expected.extend_from_slice(&[b'*'; 20]);
    expected.push(b'\n');
    assert!(
        output == expected,
        "stored output differs: {} bytes, ends {:?}",
        output.len(),
        text(&output[output.len().saturating_sub(40)..])
    );
    assert_nothing_left(state.path(), "held-back output");
}

/// Starts `reel run JOB` with `env`, waits until its first step's output file
/// holds at least `stored` bytes (and then `settle` more), and sends it `signal`
/// (if one); returns how it ended.
fn run_until_output(
    state: &std::path::Path,
    job: &std::path::Path,
    env: &[(&str, &str)],
    stored: u64,
    settle: Duration,
    signal: Option<rustix::process::Signal>,
) -> std::process::ExitStatus {
    let mut child = start_run_until_output(state, job, env, stored, Duration::from_secs(20));
    std::thread::sleep(settle);
    if let Some(sig) = signal {
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }
    child.wait().unwrap()
}

/// The job's terminal event after `reel recover`, which must succeed; nothing
/// of the job may be left.
fn recover_to_end(state: &std::path::Path, context: &str) -> String {
    let recover = reel(state, &["recover"], &[]);
    assert!(
        matches!(recover.status.code(), Some(0 | 1 | 3 | 4)),
        "{context}: recover failed: {} / {}",
        text(&recover.stdout),
        text(&recover.stderr)
    );
    let names = events(state, 1);
    let terminals: Vec<&String> = names
        .iter()
        .filter(|n| TERMINALS.contains(&n.as_str()))
        .collect();
    assert_eq!(terminals.len(), 1, "{context}: {names:?}");
    assert!(
        names.contains(&"Cleaned".to_string()),
        "{context}: {names:?}"
    );
    assert_nothing_left(state, context);
    terminals[0].clone()
}

/// A job whose failed step was logged before the engine died ends `Failed` when
/// recovered, its teardown done, instead of trying to run on.
#[test]
fn recovery_after_a_failed_step_ends_the_job_failed() {
    let state = tempfile::tempdir().unwrap();
    let run = reel(
        state.path(),
        &["run", "examples/failing.yml"],
        &[("REEL_TEST_CRASH_AT", "StepFinished:after:2")],
    );
    assert_eq!(run.status.signal(), Some(9), "{}", text(&run.stderr));
    assert_eq!(recover_to_end(state.path(), "failed step"), "Failed");
    let v = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
    assert_eq!(v["outcome"], "failed");
    assert!(
        v["reason"].as_str().unwrap().contains("exited with code 3"),
        "{v}"
    );
    assert_eq!(v["steps"].as_array().unwrap().len(), 2, "step 3 never runs");
}

const SLEEPER: &str =
    "name: sleeper\nsteps:\n  - name: wait\n    command: echo started; sleep 3; echo done\n";

/// A cancel is on the record before any signal reaches the step: an engine
/// killed right after `CancelRequested` is durable leaves a job that recovery
/// ends `Cancelled`; one killed right before it has sent no signal, and the
/// recovered step runs to its end.
#[test]
fn a_cancel_is_durable_before_the_step_is_signalled_and_recovery_honours_it() {
    for (when, expected) in [("after", "Cancelled"), ("before", "Succeeded")] {
        let context = format!("CancelRequested:{when}");
        let state = tempfile::tempdir().unwrap();
        let job = state.path().join("sleeper.yml");
        std::fs::write(&job, SLEEPER).unwrap();
        let status = run_until_output(
            state.path(),
            &job,
            &[("REEL_TEST_CRASH_AT", &context)],
            0,
            Duration::ZERO,
            Some(rustix::process::Signal::TERM),
        );
        assert_eq!(status.signal(), Some(9), "{context}");
        assert_eq!(
            recover_to_end(state.path(), &context),
            expected,
            "{context}"
        );
        let v = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
        let step = &v["steps"][0];
        if expected == "Succeeded" {
            assert_eq!(
                step["exit_code"], 0,
                "{context}: the step was signalled: {v}"
            );
            assert_eq!(
                text(&reel(state.path(), &["output", "1"], &[]).stdout),
                "started\ndone\n"
            );
        } else {
            assert!(v["cancel_requested"].is_string(), "{context}: {v}");
        }
    }
}

/// The job's deadline is an intent too (`DeadlinePassed`), durable before the
/// step is stopped; recovery ends the job `TimedOut`.
#[test]
fn a_passed_deadline_is_durable_before_the_step_is_stopped_and_recovery_honours_it() {
    let state = tempfile::tempdir().unwrap();
    let job = state.path().join("late.yml");
    std::fs::write(
        &job,
        "name: late\ntimeout: 1s\nsteps:\n  - name: wait\n    command: echo started; sleep 5\n",
    )
    .unwrap();
    let status = run_until_output(
        state.path(),
        &job,
        &[("REEL_TEST_CRASH_AT", "DeadlinePassed:after")],
        0,
        Duration::ZERO,
        None,
    );
    assert_eq!(status.signal(), Some(9));
    assert_eq!(recover_to_end(state.path(), "deadline"), "TimedOut");
}

/// Damage in a running step's stored output is decided on, not looped on:
/// recovery cannot resume the step without a gap (the agent dropped what was
/// acknowledged), so it reaps the job, once, with the reason, and nothing is left.
#[test]
fn damaged_output_of_a_running_step_is_reaped_once_not_resumed_for_ever() {
    let state = tempfile::tempdir().unwrap();
    let job = state.path().join("two.yml");
    std::fs::write(
        &job,
        "name: two\nsteps:\n  - name: print\n    command: echo first; sleep 0.5; echo second; sleep 5\n",
    )
    .unwrap();
    // Two frames: 15 bytes of header and 4 of CRC around each line.
    run_until_output(
        state.path(),
        &job,
        &[],
        19 + 6 + 19 + 7,
        Duration::ZERO,
        Some(rustix::process::Signal::KILL),
    );
    let out_file = state.path().join("output/1/0.out");
    let mut bytes = std::fs::read(&out_file).unwrap();
    bytes[15] ^= 0x01; // the first byte of "first\n"
    std::fs::write(&out_file, bytes).unwrap();

    let dry = json(&reel(
        state.path(),
        &["recover", "--dry-run", "--json"],
        &[],
    ));
    assert_eq!(dry[0]["action"], "reap", "{dry}");
    assert!(
        dry[0]["reason"].as_str().unwrap().contains("damaged"),
        "{dry}"
    );
    let recover = reel(state.path(), &["recover"], &[]);
    assert_eq!(recover.status.code(), Some(1), "{}", text(&recover.stdout));
    let names = events(state.path(), 1);
    assert_eq!(names.last().map(String::as_str), Some("Lost"), "{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "RecoveryStarted").count(), 1);
    let again = json(&reel(
        state.path(),
        &["recover", "--dry-run", "--json"],
        &[],
    ));
    assert_eq!(again, serde_json::json!([]), "the job is still live");
    let root = state.path().join("sandboxes");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_under(&root).is_empty() {
        assert!(Instant::now() < deadline, "processes remain");
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "sandbox directories remain: {left:?}");
}

/// One path of the extended crash matrix: a job, how it is driven, the
/// lifecycle events it passes (each `(event, n)`: the n-th of that kind), and
/// how it must end.
pub(crate) struct Path {
    pub name: &'static str,
    pub job: String,
    pub env: Vec<(&'static str, &'static str)>,
    /// SIGTERM once the first step printed (a cancel mid-step).
    pub cancel: bool,
    pub points: Vec<(&'static str, u32)>,
    /// The terminal event when the sandbox survives the crash.
    pub outcome: &'static str,
    /// What the steps print, as stored (secrets masked).
    pub output: String,
    /// The artifacts the job must end with when its sandbox survives, `(name,
    /// bytes)` in the order they are stored (name order): each exactly once.
    pub artifacts: Vec<(&'static str, Vec<u8>)>,
}

/// The setup events every path passes before its first step.
pub(crate) const SETUP: [&str; 10] = [
    "Submitted",
    "Queued",
    "SlotGranted",
    "CidAllocated",
    "SandboxPlanned",
    "WorkDirCreated",
    "VolumesFormatted",
    "BootRequested",
    "VmBooted",
    "AgentConnected",
];

pub(crate) fn teardown_points(terminal: &'static str) -> Vec<(&'static str, u32)> {
    [
        "TeardownStarted",
        "Drained",
        "PoweredOff",
        "CleanupStarted",
        "Cleaned",
        terminal,
    ]
    .into_iter()
    .map(|p| (p, 1))
    .collect()
}

/// Runs one crash case of `path`: the engine SIGKILLs itself `when` the n-th
/// `point` is durable; `reel recover` must end the job exactly once, as the path
/// says, with its output byte-exact, and leave nothing behind.
fn path_case(path: &Path, point: &str, n: u32, when: &str) {
    let context = format!("{}: crash {when} {point} #{n}", path.name);
    let state = tempfile::tempdir().unwrap();
    let job = state.path().join("job.yml");
    std::fs::write(&job, &path.job).unwrap();
    let crash = format!("{point}:{when}:{n}");
    let mut env = path.env.clone();
    env.push(("REEL_TEST_CRASH_AT", &crash));
    if path.cancel {
        let status = run_until_output(
            state.path(),
            &job,
            &env,
            0,
            Duration::ZERO,
            Some(rustix::process::Signal::TERM),
        );
        assert_eq!(
            status.signal(),
            Some(9),
            "{context}: reel run was not killed"
        );
    } else {
        let run = reel(state.path(), &["run", job.to_str().unwrap()], &env);
        assert_eq!(
            run.status.signal(),
            Some(9),
            "{context}: reel run was not killed: {} / {}",
            text(&run.stdout),
            text(&run.stderr)
        );
    }
    let recover = reel(state.path(), &["recover"], &path.env);
    // Any exit status a finished batch can have (2 means recovery itself failed).
    assert!(
        matches!(recover.status.code(), Some(0 | 1 | 3 | 4)),
        "{context}: recover failed: {} / {}",
        text(&recover.stdout),
        text(&recover.stderr)
    );
    if point == "Submitted" && when == "before" {
        let jobs = json(&reel(state.path(), &["jobs", "--json"], &[]));
        assert_eq!(jobs.as_array().map_or(0, Vec::len), 0, "{context}");
        assert_nothing_left(state.path(), &context);
        return;
    }
    let names = events(state.path(), 1);
    let terminals: Vec<&String> = names
        .iter()
        .filter(|n| TERMINALS.contains(&n.as_str()))
        .collect();
    assert_eq!(terminals.len(), 1, "{context}: {names:?}");
    let output = text(&reel(state.path(), &["output", "1"], &[]).stdout);
    if must_be_lost(point, when) {
        assert_eq!(terminals[0], "Lost", "{context}: {names:?}");
        assert!(!names.contains(&"Reattached".to_string()), "{context}");
        assert_eq!(output, "", "{context}: no step ran");
    } else if path.cancel && point == "CancelRequested" && when == "before" {
        // The engine died before the cancel was on the record: no signal was
        // sent, and the recovered job runs to its end.
        assert_eq!(terminals[0], "Succeeded", "{context}: {names:?}");
    } else {
        assert_eq!(terminals[0], path.outcome, "{context}: {names:?}");
        assert_eq!(
            output, path.output,
            "{context}: output has a gap or a duplicate"
        );
        let stored = stored_artifacts(state.path(), 1);
        let want: Vec<(String, Vec<u8>)> = path
            .artifacts
            .iter()
            .map(|(n, b)| ((*n).to_owned(), b.clone()))
            .collect();
        assert!(
            stored == want,
            "{context}: artifacts {:?}, expected {:?}",
            stored.iter().map(|(n, b)| (n, b.len())).collect::<Vec<_>>(),
            want.iter().map(|(n, b)| (n, b.len())).collect::<Vec<_>>()
        );
        let events_stored = names.iter().filter(|n| *n == "ArtifactStored").count();
        assert_eq!(events_stored, want.len(), "{context}: {names:?}");
    }
    assert_nothing_left(state.path(), &context);
}

/// Every case of `path`, a few at a time, failures collected.
pub(crate) fn run_path(path: &Path) {
    let mut cases: Vec<(&str, u32, &str)> = Vec::new();
    for (p, n) in &path.points {
        cases.push((p, *n, "before"));
        cases.push((p, *n, "after"));
    }
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for chunk in cases.chunks(cases.len().div_ceil(3)) {
            let failures = &failures;
            s.spawn(move || {
                for (point, n, when) in chunk {
                    let r = std::panic::catch_unwind(|| path_case(path, point, *n, when));
                    if let Err(e) = r {
                        let msg = e
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        failures.lock().unwrap().push(msg);
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn crash_matrix_a_job_whose_step_fails() {
    let mut points: Vec<(&str, u32)> = SETUP.iter().map(|p| (*p, 1)).collect();
    points.extend([
        ("StepStarted", 1),
        ("StepFinished", 1),
        ("StepStarted", 2),
        ("StepFinished", 2),
    ]);
    points.extend(teardown_points("Failed"));
    run_path(&Path {
        name: "failing step",
        job: "name: fails\nsteps:\n  - name: one\n    command: echo one; sleep 0.2\n  - name: two\n    command: echo two; sleep 0.2; exit 3\n  - name: three\n    command: echo never\n".into(),
        env: vec![],
        cancel: false,
        points,
        outcome: "Failed",
        output: "one\ntwo\n".into(),
        artifacts: vec![],
    });
}

#[test]
fn crash_matrix_a_job_cancelled_mid_step() {
    let mut points = vec![("CancelRequested", 1)];
    points.extend(teardown_points("Cancelled"));
    run_path(&Path {
        name: "cancelled",
        job: "name: cancelled\nsteps:\n  - name: wait\n    command: echo started; sleep 2\n".into(),
        env: vec![],
        cancel: true,
        points,
        outcome: "Cancelled",
        output: "started\n".into(),
        artifacts: vec![],
    });
}

#[test]
fn crash_matrix_a_job_whose_step_times_out() {
    let mut points: Vec<(&str, u32)> = SETUP.iter().map(|p| (*p, 1)).collect();
    points.extend([("StepStarted", 1), ("StepFinished", 1)]);
    points.extend(teardown_points("TimedOut"));
    run_path(&Path {
        name: "timed out",
        job: "name: slow\nsteps:\n  - name: wait\n    command: echo started; sleep 5\n    timeout: 1s\n".into(),
        env: vec![],
        cancel: false,
        points,
        outcome: "TimedOut",
        output: "started\n".into(),
        artifacts: vec![],
    });
}

#[test]
fn crash_matrix_a_job_with_a_secret_printing_past_the_hold_back() {
    let mut points: Vec<(&str, u32)> = SETUP.iter().map(|p| (*p, 1)).collect();
    points.extend([
        ("StepStarted", 1),
        ("StepFinished", 1),
        ("StepStarted", 2),
        ("StepFinished", 2),
    ]);
    points.extend(teardown_points("Succeeded"));
    let secret = "tok-0123456789-abcdef";
    let mut output = "x".repeat(100_000);
    output.push_str(&"*".repeat(secret.len()));
    output.push_str("\nafter ");
    output.push_str(&"*".repeat(secret.len()));
    output.push('\n');
    run_path(&Path {
        name: "secret",
        job: "name: secret\nsecrets: [TOKEN]\nsteps:\n  - name: print\n    command: |\n      head -c 100000 /dev/zero | tr '\\0' x\n      printf 'tok-0123'; sleep 0.3; printf '456789-abcdef\\n'\n  - name: again\n    command: printf 'after %s\\n' \"$TOKEN\"\n".into(),
        env: vec![("REEL_SECRET_TOKEN", secret)],
        cancel: false,
        points,
        outcome: "Succeeded",
        output,
        artifacts: vec![],
    });
}

/// A job with artifacts, SIGKILLed before and after each event from its step to
/// its end — `Drained` and the first and second `ArtifactStored` among them:
/// `reel recover` finishes the collection from where the log stopped (draining
/// first a job that died before `Drained`), and every artifact is stored exactly
/// once, byte for byte, with nothing partial left.
#[test]
fn crash_matrix_a_job_with_artifacts() {
    let mut points = vec![("StepStarted", 1), ("StepFinished", 1)];
    for p in teardown_points("Succeeded") {
        points.push(p);
        if p.0 == "Drained" {
            points.extend([("ArtifactStored", 1), ("ArtifactStored", 2)]);
        }
    }
    let numbers: Vec<u8> = (1..=100_000)
        .flat_map(|i: u32| format!("{i}\n").into_bytes())
        .collect();
    run_path(&Path {
        name: "artifacts",
        job: "name: arts\nartifacts: [dist, report.txt]\nsteps:\n  - name: build\n    \
              command: mkdir -p dist/sub && seq 1 100000 > dist/numbers.txt && \
              echo hi > dist/sub/hi.txt && echo report > report.txt && echo built\n"
            .into(),
        env: vec![],
        cancel: false,
        points,
        outcome: "Succeeded",
        output: "built\n".into(),
        artifacts: vec![
            ("dist/numbers.txt", numbers),
            ("dist/sub/hi.txt", b"hi\n".to_vec()),
            ("report.txt", b"report\n".to_vec()),
        ],
    });
}

/// A sandbox killed with its engine after `Drained`, before its artifacts were
/// collected: recovery finishes the teardown with the outcome already decided,
/// and a notice says the artifacts were lost with the sandbox; none is listed.
#[test]
fn artifacts_not_stored_are_lost_with_a_sandbox_killed_with_its_engine() {
    let state = tempfile::tempdir().unwrap();
    let job = state.path().join("arts.yml");
    std::fs::write(
        &job,
        "name: arts\nartifacts: [out.txt]\nsteps:\n  - name: make\n    command: echo x > out.txt\n",
    )
    .unwrap();
    let run = reel(
        state.path(),
        &["run", job.to_str().unwrap()],
        &[("REEL_TEST_CRASH_AT", "Drained:after")],
    );
    assert_eq!(run.status.signal(), Some(9));
    kill_sandboxes(state.path());
    let recover = reel(state.path(), &["recover"], &[]);
    assert_eq!(recover.status.code(), Some(0), "{}", text(&recover.stdout));
    let names = events(state.path(), 1);
    assert_eq!(
        names.last().map(String::as_str),
        Some("Succeeded"),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n == "ArtifactStored"), "{names:?}");
    let v = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
    let notices = v["notices"].to_string();
    assert!(notices.contains("were lost with it"), "{notices}");
    assert_eq!(stored_artifacts(state.path(), 1), []);
    assert_nothing_left(state.path(), "artifacts lost with the sandbox");
}

/// Found by the chaos test: an engine that dies while reaping a job that only
/// held a lease (after its `TeardownStarted`, before `Cleaned`) leaves a
/// teardown with no sandbox named; the next recovery finishes that teardown
/// instead of trying to decide it again.
#[test]
fn a_recovery_killed_mid_reap_of_a_lease_only_job_is_finished_by_the_next() {
    let state = tempfile::tempdir().unwrap();
    let job = state.path().join("job.yml");
    std::fs::write(&job, JOB).unwrap();
    let run = reel(
        state.path(),
        &["run", job.to_str().unwrap()],
        &[("REEL_TEST_CRASH_AT", "CidAllocated:after")],
    );
    assert_eq!(run.status.signal(), Some(9));
    let first = reel(
        state.path(),
        &["recover"],
        &[("REEL_TEST_CRASH_AT", "TeardownStarted:after")],
    );
    assert_eq!(first.status.signal(), Some(9), "{}", text(&first.stdout));
    let second = reel(state.path(), &["recover"], &[]);
    assert_eq!(
        second.status.code(),
        Some(1),
        "{} / {}",
        text(&second.stdout),
        text(&second.stderr)
    );
    let names = events(state.path(), 1);
    assert_eq!(names.last().map(String::as_str), Some("Lost"), "{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "TeardownStarted").count(), 1);
    assert_nothing_left(state.path(), "mid-reap");
}
