//! The replay tool, run as the real `reel` binary against logs written by the
//! scripted driver: JSON shapes, `--at`, corruption on disk, a held log. And
//! `reel run` refusing hostile job files, which it does before loading any
//! plugin or opening the log.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use reel_engine::store::{EventLog, LogOptions};
use serde_json::Value;

fn reel(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_reel"))
        .arg("--state-dir")
        .arg(dir)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Job 1 succeeds, job 2 fails at step 1, job 3 stops mid-way (live).
fn write_log(dir: &Path) {
    reel_engine::testkit::simulate::write_sample_log(dir).unwrap();
}

#[test]
fn jobs_lists_every_job_with_state_and_times() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path());
    let out = reel(dir.path(), &["jobs", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    let jobs = v.as_array().unwrap();
    assert_eq!(jobs.len(), 3);
    assert_eq!(jobs[0]["name"], "ok");
    assert_eq!(jobs[0]["outcome"], "succeeded");
    assert_eq!(jobs[1]["outcome"], "failed");
    assert_eq!(jobs[2]["state"], "connected");
    assert!(jobs[2]["finished"].is_null());
    assert!(jobs[0]["finished"].as_str().unwrap().ends_with('Z'));
    let text = reel(dir.path(), &["jobs"]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("stuck") && text.contains("succeeded"),
        "{text}"
    );
}

#[test]
fn replay_shows_the_timeline_in_order_and_at_gives_the_earlier_state() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path());
    let v = json(&reel(dir.path(), &["replay", "2", "--json"]));
    let events = v["events"].as_array().unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(names.first(), Some(&"Submitted"));
    assert_eq!(names.last(), Some(&"Failed"));
    assert!(names.contains(&"TeardownStarted") && names.contains(&"Cleaned"));
    assert_eq!(v["state"]["phase"], "terminal");
    assert_eq!(v["state"]["outcome"], "failed");
    assert_eq!(v["state"]["steps"].as_array().unwrap().len(), 2);
    assert!(events[1]["delta_ms"].is_u64());

    // Seq 12 is the first StepFinished: one step done, sandbox connected.
    let at = json(&reel(dir.path(), &["replay", "2", "--json", "--at", "12"]));
    assert_eq!(at["events"].as_array().unwrap().len(), 12);
    assert_eq!(at["state"]["phase"], "connected");
    assert_eq!(at["state"]["seq"], 12);
    assert_eq!(at["state"]["steps"].as_array().unwrap().len(), 1);
    assert!(at["state"]["outcome"].is_null());

    let bad = reel(dir.path(), &["replay", "2", "--at", "999"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("outside them"));
    let text = String::from_utf8(reel(dir.path(), &["replay", "2"]).stdout).unwrap();
    assert!(
        text.contains("StepFinished") && text.contains("exit 1"),
        "{text}"
    );
}

#[test]
fn inspect_says_what_a_live_job_holds_and_export_prints_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path());
    let v = json(&reel(dir.path(), &["inspect", "3", "--json"]));
    assert_eq!(v["phase"], "connected");
    assert_eq!(v["cid"], 3);
    let held: Vec<&str> = v["held_resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    assert!(held.iter().any(|h| h.contains("lease 3")), "{held:?}");
    assert!(held.iter().any(|h| h.starts_with("workdir")), "{held:?}");
    assert!(
        v["recovery"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r.as_str().unwrap().contains("reattach"))
    );
    let done = json(&reel(dir.path(), &["inspect", "1", "--json"]));
    assert!(done["held_resources"].as_array().unwrap().is_empty());

    let out = reel(dir.path(), &["export", "1"]);
    assert!(out.status.success());
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.first().unwrap()["event"], "Submitted");
    assert_eq!(lines.last().unwrap()["event"], "Succeeded");
    assert!(lines.iter().all(|l| l["job"] == 1));
}

fn flip(path: &Path, needle: &[u8], which: usize) -> usize {
    let mut bytes = std::fs::read(path).unwrap();
    let hits: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    let at = match which {
        usize::MAX => *hits.last().expect("needle not found"),
        n => hits[n],
    } + needle.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
    at
}

#[test]
fn a_flipped_byte_in_the_journal_names_the_job_and_seq() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path());
    // The Failed event of job 2 carries this reason (so does its TeardownStarted,
    // seq 15, which comes first in the journal).
    flip(&dir.path().join("journal"), b"step 1 exited with code 1", 0);
    let out = reel(dir.path(), &["jobs", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "corruption is reported in the exit status"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("job 2 seq 15"), "{stderr}");
    let v = json(&out);
    assert!(v[1]["corrupt"].is_array());
    assert!(v[0].get("corrupt").is_none() && v[2].get("corrupt").is_none());
    // The other jobs are intact and fully readable; job 2 still folds from its stored copy.
    assert!(reel(dir.path(), &["replay", "1"]).status.success());
    let two = json(&reel(dir.path(), &["replay", "2", "--json"]));
    assert_eq!(two["state"]["outcome"], "failed");
}

#[test]
fn a_flipped_byte_in_the_sled_store_is_reported_and_repaired_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path());
    let before = std::fs::read(dir.path().join("log/db")).unwrap();
    // The newest copy of job 2's failure reason in sled's own log.
    flip(
        &dir.path().join("log/db"),
        b"step 1 exited with code 1",
        usize::MAX,
    );
    let corrupted = std::fs::read(dir.path().join("log/db")).unwrap();
    assert_ne!(before, corrupted);
    let out = reel(dir.path(), &["jobs", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sled store was torn at job"), "{stderr}");
    assert!(stderr.contains("restored from the journal"), "{stderr}");
    let v = json(&out);
    assert_eq!(v.as_array().unwrap().len(), 3, "no job is lost");
    assert_eq!(v[1]["outcome"], "failed");
    assert_eq!(v[2]["state"], "connected");
    // Looking never changes the dead engine's files.
    assert_eq!(std::fs::read(dir.path().join("log/db")).unwrap(), corrupted);
}

/// Child side of the lock test: holds the log open until killed.
#[test]
fn child_holder() {
    let Some(dir) = std::env::var_os("REEL_TEST_HOLD_DIR") else {
        return;
    };
    let _log = EventLog::open(Path::new(&dir), LogOptions::default()).unwrap();
    println!("holding");
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn a_log_held_by_a_running_engine_is_refused_plainly() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_holder", "--exact", "--nocapture", "--test-threads=1"])
        .env("REEL_TEST_HOLD_DIR", dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    while !lines.next().unwrap().unwrap().contains("holding") {}
    let out = reel(dir.path(), &["jobs"]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is in use by another process"), "{stderr}");
    assert!(
        !stderr.contains("WouldBlock") && !stderr.contains("os error"),
        "{stderr}"
    );
    // Once the engine is gone, the log opens directly.
    assert!(reel(dir.path(), &["jobs"]).status.success());
}

#[test]
fn a_missing_log_and_an_unknown_job_are_plain_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = reel(&dir.path().join("nope"), &["jobs"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no reel log in"));
    write_log(dir.path());
    let out = reel(dir.path(), &["inspect", "42"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job 42"));
}

/// Steps are numbered from 1 wherever a person or a script reads them:
/// timelines, the state's step list, JSON and `output --step`.
#[test]
fn steps_are_numbered_from_one_in_replay_inspect_and_json() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path());
    let text = String::from_utf8(reel(dir.path(), &["replay", "1"]).stdout).unwrap();
    let started: Vec<&str> = text.lines().filter(|l| l.contains("StepStarted")).collect();
    assert_eq!(started.len(), 3, "{text}");
    // The scripted steps are named "step 0", "step 1"...: the number comes first.
    assert!(started[0].contains("step 1 \"step 0\""), "{}", started[0]);
    assert!(started[2].contains("step 3 \"step 2\""), "{}", started[2]);
    let inspect = String::from_utf8(reel(dir.path(), &["inspect", "1"]).stdout).unwrap();
    assert!(
        inspect.contains("    [1] \"step 0\"") && inspect.contains("    [3] "),
        "{inspect}"
    );
    assert!(!inspect.contains("[0]"), "{inspect}");
    let v = json(&reel(dir.path(), &["inspect", "1", "--json"]));
    let steps: Vec<u64> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3]);
    let v = json(&reel(dir.path(), &["replay", "1", "--json"]));
    assert_eq!(v["state"]["steps"][0]["step"], 1);
}

// ---------------------------------------------------------------------------------
// `reel run` and hostile job files: each is refused with exit status 2 and one
// clear line, quickly, and nothing is written to the state directory.

/// Runs `reel` and kills it if it takes longer than `limit` (the bugs below
/// took from 20 s to minutes, or memory until killed).
fn reel_within(dir: &Path, args: &[&str], limit: std::time::Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_reel"))
        .arg("--state-dir")
        .arg(dir)
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let began = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if began.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "reel {args:?} still running after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

const LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Asserts `reel run` refused its input: exit 2, the expected line, no log.
fn assert_refused(state: &Path, out: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
    assert!(stderr.contains("nothing was started"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !state.join("log").exists() && !state.join("journal").exists(),
        "something was written to {}",
        state.display()
    );
}

fn write_job(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn run_reads_an_endless_file_only_up_to_the_size_limit() {
    let state = tempfile::tempdir().unwrap();
    let out = reel_within(state.path(), &["run", "/dev/zero"], LIMIT);
    assert_refused(
        state.path(),
        &out,
        "reel: /dev/zero: the job file goes on past the 4 MiB (4194304 bytes) limit on job files",
    );
}

/// The bug as found: a 17 MB environment value was accepted, then its events
/// were over the 16 MiB decode limit and read back as corrupt for ever.
#[test]
fn run_refuses_a_17_mb_environment_value_before_anything_is_written() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let body = format!(
        "name: big\nenvironment:\n  BIG: {}\nsteps:\n  - command: echo hi\n",
        "x".repeat(17_000_000)
    );
    let big = write_job(files.path(), "big.yml", &body);
    let out = reel_within(state.path(), &["run", &big], LIMIT);
    assert_refused(
        state.path(),
        &out,
        &format!(
            "big.yml: the job file is {} bytes, over the 4 MiB (4194304 bytes) limit",
            body.len()
        ),
    );
}

/// A small file whose job is over the 8 MiB a stored job may take (aliases
/// repeat one 100 KiB command): refused with its size, and the good job in the
/// same batch does not start either.
#[test]
fn a_batch_with_one_job_too_large_to_store_starts_nothing() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let good = write_job(files.path(), "good.yml", "steps:\n  - command: echo hi\n");
    let mut body = format!("steps:\n  - command: &c {}\n", "c".repeat(100 * 1024));
    for _ in 0..89 {
        body.push_str("  - command: *c\n");
    }
    let large = write_job(files.path(), "large.yml", &body);
    let out = reel_within(state.path(), &["run", &good, &large], LIMIT);
    assert_refused(state.path(), &out, "large.yml: the job takes ");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("bytes when stored, over the 8 MiB (8388608 bytes) limit on a job"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_refuses_deep_nesting_and_alias_bombs_quickly() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let deep = write_job(files.path(), "deep.yml", &"{a: ".repeat(100_000));
    let out = reel_within(state.path(), &["run", &deep], LIMIT);
    assert_refused(
        state.path(),
        &out,
        "deep.yml:1:129: collections nest more than 32 levels deep here",
    );
    let bomb = write_job(
        files.path(),
        "bomb.yml",
        &format!(
            "a: &a [{}]\nb: [{}]\nsteps:\n  - command: echo\n",
            ["xxxxxxxx"; 20_000].join(","),
            ["*a"; 1000].join(",")
        ),
    );
    let out = reel_within(state.path(), &["run", &bomb], LIMIT);
    assert_refused(state.path(), &out, "holds more than 100000 values here");
}

/// These used to pass validation and fail only when the step started: a NUL
/// (exit 1, "nul byte found"), a value over 128 KiB ("Argument list too long"),
/// a step over the agent's 1 MiB message ("Cannot encode message").
#[test]
fn run_refuses_what_no_step_could_be_started_with() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let nul = write_job(
        files.path(),
        "nul.yml",
        "steps:\n  - command: \"echo a\\0b\"\n",
    );
    let out = reel_within(state.path(), &["run", &nul], LIMIT);
    assert_refused(
        state.path(),
        &out,
        "nul.yml:2:14: steps[0].command: a command cannot contain NUL",
    );
    let long = write_job(
        files.path(),
        "long.yml",
        &format!(
            "environment:\n  BIG: {}\nsteps:\n  - command: echo\n",
            "x".repeat(2 << 20)
        ),
    );
    let out = reel_within(state.path(), &["run", &long], LIMIT);
    assert_refused(
        state.path(),
        &out,
        "long.yml:2:8: environment.BIG: the variable (NAME=value) takes 2097157 bytes, over the 128 KiB (131072 bytes) limit",
    );
    let value = "v".repeat(120 * 1024);
    let vars: String = (0..7).map(|i| format!("      V{i}: {value}\n")).collect();
    let wide = write_job(
        files.path(),
        "wide.yml",
        &format!("steps:\n  - name: build\n    command: echo\n    environment:\n{vars}"),
    );
    let out = reel_within(state.path(), &["run", &wide], LIMIT);
    assert_refused(
        state.path(),
        &out,
        "wide.yml: step 1 \"build\": its command and environment (the job's under its own) take 860193 bytes, over the 768 KiB (786432 bytes) limit on one step",
    );
}
