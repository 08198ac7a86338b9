//! `reel run` end to end: the real binary, the process runner plugin and the agent.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use reel_tests::{
    assert_nothing_left, events, interrupt_run_until_cancelled, json, reel, start_run_until_stdout,
    stored_artifacts, text, time_after, workspace_root,
};

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn hello_runs_end_to_end_and_every_lifecycle_event_is_in_the_log() {
    let state = tempfile::tempdir().unwrap();
    let out = reel(state.path(), &["run", "examples/hello.yml"], &[]);
    assert!(
        out.status.success(),
        "{} / {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(stdout.contains("Hello from reel"), "{stdout}");
    assert!(stdout.contains("succeeded"), "{stdout}");
    let names = events(state.path(), 1);
    let expected = [
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
        "StepStarted",
        "StepFinished",
        "StepStarted",
        "StepFinished",
        "TeardownStarted",
        "Drained",
        "PoweredOff",
        "CleanupStarted",
        "Cleaned",
        "Succeeded",
    ];
    let filtered: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| *n != "RunnerNotice")
        .collect();
    assert_eq!(filtered, expected);
    assert_nothing_left(state.path(), "run");
}

#[test]
fn output_read_back_from_the_log_is_byte_exact() {
    output_is_stored_byte_exact_per_stream(None);
}

/// With a secret set, each stream is masked on its own: what a masker holds
/// back at the end of stdout is stored as stdout, not under the stderr tag of
/// the chunk that follows.
#[test]
fn output_read_back_from_the_log_is_byte_exact_with_a_secret_set() {
    output_is_stored_byte_exact_per_stream(Some("zz-not-in-output-zz!"));
}

fn output_is_stored_byte_exact_per_stream(secret: Option<&str>) {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    // 20 MiB of a repeating pattern, then invalid UTF-8 on stdout and stderr.
    let secrets = if secret.is_some() {
        "secrets: [TOKEN]\n"
    } else {
        ""
    };
    let job = write(
        files.path(),
        "big.yml",
        &format!(
            "name: big\n{secrets}steps:\n  - name: lots\n    command: |\n      yes 0123456789abcdef | head -c 20971520\n      printf '\\377\\376\\n'\n      printf 'err\\200\\n' >&2\n"
        ),
    );
    let env: Vec<(&str, &str)> = secret
        .map(|v| ("REEL_SECRET_TOKEN", v))
        .into_iter()
        .collect();
    let out = reel(state.path(), &["run", "-q", &job], &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stored = reel(state.path(), &["output", "1"], &[]);
    assert!(stored.status.success());
    let mut expected: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(20 * 1024 * 1024)
        .collect();
    expected.extend_from_slice(b"\xff\xfe\n");
    // The two streams interleave in the combined output in the order the agent
    // read them, so check each stream's own bytes, and the combined length.
    assert_eq!(stored.stdout.len(), expected.len() + 5);
    let log = reel_engine::store::LogReader::open_copy(state.path()).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut next = 0;
    for chunk in log.output(1, 0, 0) {
        let chunk = chunk.unwrap();
        assert_eq!(
            chunk.offset, next,
            "a gap or an overlap in the stored stream"
        );
        next += chunk.bytes.len() as u64;
        match chunk.stream {
            reel_engine::store::Stream::Stdout => out.extend_from_slice(&chunk.bytes),
            reel_engine::store::Stream::Stderr => err.extend_from_slice(&chunk.bytes),
        }
    }
    assert!(out == expected, "stdout differs from what the step printed");
    assert_eq!(err, b"err\x80\n");
    assert_nothing_left(state.path(), "run");
}

/// `reel output --stream` gives each stream's own bytes, the secret masked
/// where it was printed; `--json` gives the chunks with stream and offset, and
/// `--offset` starts inside the combined output.
#[test]
fn output_by_stream_keeps_each_stream_and_masks_the_secret() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let job = write(
        files.path(),
        "streams.yml",
        "name: streams\nsecrets: [TOKEN]\nsteps:\n  - name: both\n    command: |\n      printf OUT; sleep 0.3; printf ERR >&2; sleep 0.3; printf \"$TOKEN\"\n",
    );
    let env = [("REEL_SECRET_TOKEN", "hunter2-secret")];
    let out = reel(state.path(), &["run", "-q", &job], &env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = reel(
        state.path(),
        &["output", "1", "--step", "1", "--stream", "stdout"],
        &[],
    );
    assert!(stdout.status.success(), "{}", text(&stdout.stderr));
    assert_eq!(text(&stdout.stdout), "OUT**************");
    let stderr = reel(
        state.path(),
        &["output", "1", "--step", "1", "--stream", "stderr"],
        &[],
    );
    assert_eq!(text(&stderr.stdout), "ERR");
    let all = reel(
        state.path(),
        &["output", "1", "--step", "1", "--offset", "2"],
        &[],
    );
    assert_eq!(text(&all.stdout), "TERR**************");
    let lines: Vec<serde_json::Value> =
        text(&reel(state.path(), &["output", "1", "--json"], &[]).stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    // Runs of one stream, however the chunks were cut: (stream, offset, text).
    let mut streams: Vec<(String, u64, String)> = Vec::new();
    for c in &lines {
        assert_eq!(c["step"], 1);
        let (stream, offset, t) = (
            c["stream"].as_str().unwrap(),
            c["offset"].as_u64().unwrap(),
            c["text"].as_str().unwrap(),
        );
        match streams.last_mut() {
            Some(last) if last.0 == stream && last.1 + last.2.len() as u64 == offset => {
                last.2.push_str(t);
            }
            _ => streams.push((stream.to_string(), offset, t.to_string())),
        }
    }
    let streams: Vec<(&str, u64, &str)> = streams
        .iter()
        .map(|(s, o, t)| (s.as_str(), *o, t.as_str()))
        .collect();
    assert_eq!(
        streams,
        [
            ("stdout", 0, "OUT"),
            ("stderr", 3, "ERR"),
            ("stdout", 6, "**************")
        ]
    );
    assert_nothing_left(state.path(), "run");
}

#[test]
fn a_failing_step_ends_the_job_failed_after_a_logged_teardown() {
    let state = tempfile::tempdir().unwrap();
    let out = reel(state.path(), &["run", "examples/failing.yml"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("step 3 is never reached"), "{stdout}");
    let names = events(state.path(), 1);
    assert_eq!(names.iter().filter(|n| *n == "StepStarted").count(), 2);
    let tail: Vec<&str> = names
        .iter()
        .rev()
        .take(6)
        .rev()
        .map(String::as_str)
        .collect();
    assert_eq!(
        tail,
        [
            "TeardownStarted",
            "Drained",
            "PoweredOff",
            "CleanupStarted",
            "Cleaned",
            "Failed"
        ]
    );
    let inspect = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
    assert_eq!(inspect["steps"][1]["exit_code"], 3);
    assert!(
        inspect["reason"]
            .as_str()
            .unwrap()
            .contains("exited with code 3")
    );
    assert_nothing_left(state.path(), "run");
}

#[test]
fn a_step_timeout_kills_the_step_and_the_job_times_out() {
    let state = tempfile::tempdir().unwrap();
    let began = Instant::now();
    let out = reel(state.path(), &["run", "examples/timeout.yml"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "took {:?}",
        began.elapsed()
    );
    let names = events(state.path(), 1);
    assert_eq!(names.last().map(String::as_str), Some("TimedOut"));
    let inspect = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
    assert_eq!(inspect["steps"][0]["timed_out"], true);
    assert_nothing_left(state.path(), "run");
}

#[test]
fn a_secret_value_appears_nowhere_under_the_state_directory() {
    let state = tempfile::tempdir().unwrap();
    let secret = "s3cr3t-0f-the-test-4242";
    let out = reel(
        state.path(),
        &["run", "examples/secret.yml"],
        &[("REEL_SECRET_REEL_DEMO_TOKEN", secret)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(secret));
    assert!(
        text(&out.stdout).contains("the token is: ***"),
        "{}",
        text(&out.stdout)
    );
    let stored = reel(state.path(), &["output", "1"], &[]);
    assert!(text(&stored.stdout).contains("***"));
    for entry in walk(state.path()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the secret is in {}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn a_real_spindle_workflow_runs_and_missing_tools_fail_like_a_shell() {
    let state = tempfile::tempdir().unwrap();
    let wf = workspace_root().join("engine/tests/data/jobfiles/spindle/tangled-core-test.yml");
    let out = reel(state.path(), &["run", wf.to_str().unwrap()], &[]);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("warning"),
        "spindle fields are warned about: {stderr}"
    );
    // Its first step (mkdir/touch) works; `go` is not on this machine.
    let stdout = text(&out.stdout);
    if Command::new("sh")
        .args(["-c", "command -v go"])
        .output()
        .unwrap()
        .status
        .success()
    {
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("go: not found"), "{stdout}");
    let inspect = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
    assert_eq!(inspect["steps"][0]["exit_code"], 0);
    assert_eq!(inspect["steps"][1]["exit_code"], 127);
    assert_nothing_left(state.path(), "run");
}

#[test]
fn a_batch_runs_in_parallel_with_prefixed_output_and_a_summary() {
    let state = tempfile::tempdir().unwrap();
    let out = reel(
        state.path(),
        &[
            "run",
            "-j",
            "2",
            "examples/hello.yml",
            "examples/failing.yml",
            "examples/spindle.yml",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("hello#1 | Hello from reel"), "{stdout}");
    assert!(stdout.contains("batch: 3 jobs"), "{stdout}");
    assert!(stdout.contains("1 failed"), "{stdout}");
    let jobs = json(&reel(state.path(), &["jobs", "--json"], &[]));
    assert_eq!(jobs.as_array().unwrap().len(), 3);
    assert_nothing_left(state.path(), "run");
}

#[test]
fn ctrl_c_cancels_the_job_and_cleans_the_sandbox() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let job = write(
        files.path(),
        "slow.yml",
        "name: slow\nsteps:\n  - name: wait\n    command: echo started; sleep 60\n  - name: after\n    command: echo never\n",
    );
    // Wait until the step runs, then interrupt like a terminal would.
    let mut child = start_run_until_stdout(state.path(), &job, "started", Duration::from_secs(30));
    let (names, _) = interrupt_run_until_cancelled(&mut child, state.path());
    assert!(names.contains(&"CancelRequested".to_string()), "{names:?}");
    assert!(names.contains(&"Cleaned".to_string()));
    assert_eq!(names.iter().filter(|n| *n == "StepStarted").count(), 1);
    assert_nothing_left(state.path(), "run");
}

#[test]
fn bad_input_is_refused_before_anything_runs() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let bad = write(
        files.path(),
        "bad.yml",
        "name: x\nsteps:\n  - name: a\n    comand: true\n",
    );
    let out = reel(state.path(), &["run", "examples/hello.yml", &bad], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("bad.yml:4:5"), "{stderr}");
    assert!(stderr.contains("nothing was started"), "{stderr}");
    // No job was recorded.
    assert!(
        !state.path().join("log").exists()
            || json(&reel(state.path(), &["jobs", "--json"], &[]))
                .as_array()
                .unwrap()
                .is_empty()
    );
    let missing = reel(state.path(), &["run", "examples/secret.yml"], &[]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing.stderr).contains("REEL_DEMO_TOKEN"),
        "{}",
        text(&missing.stderr)
    );
}

/// The `PATH` a step gets when its job sets none (documented in
/// `plugins/README.md`, "The environment of the agent and of a step").
const MINIMAL_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The engine's environment, secrets included, reaches neither the agent nor a
/// step: the agent starts with `PATH` and `HOME` only, and a step with its job's
/// variables, its declared secrets and the documented `CI`/`REEL_JOB_ID`/`HOME`/
/// `PATH`. Read the way a hostile step would: from the agent's
/// `/proc/$PPID/environ`.
#[test]
fn neither_the_agent_nor_a_step_inherits_the_engines_environment() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let job = write(
        files.path(),
        "env.yml",
        "name: env\nenvironment: { JOB_VAR: from-job }\nsecrets: [DECLARED]\nsteps:\n  - name: look\n    command: |\n      tr '\\0' '\\n' < /proc/$PPID/environ\n      echo ---\n      env\n",
    );
    let undeclared = "undeclared-engine-secret-7731";
    let declared = "declared-secret-value-5519";
    let out = reel(
        state.path(),
        &["run", "-q", &job],
        &[
            ("REEL_SECRET_TOKEN", undeclared),
            ("REEL_SECRET_DECLARED", declared),
            ("ENGINE_ONLY_VAR", "engine-only-value"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stored = text(&reel(state.path(), &["output", "1"], &[]).stdout);
    assert!(!stored.contains(undeclared), "{stored}");
    assert!(!stored.contains(declared), "{stored}");
    assert!(!stored.contains("engine-only-value"), "{stored}");
    let (agent, step) = stored.split_once("---\n").expect("the step printed both");
    let workdir = std::path::absolute(state.path())
        .unwrap()
        .join("sandboxes/1/work");
    let mut agent: Vec<&str> = agent.lines().collect();
    agent.sort_unstable();
    assert_eq!(
        agent,
        [
            format!("HOME={}", workdir.display()),
            format!("PATH={MINIMAL_PATH}")
        ],
        "the agent's environment"
    );
    let mut step: Vec<&str> = step.lines().collect();
    step.sort_unstable();
    assert_eq!(
        step,
        [
            "CI=true".to_owned(),
            // Declared, so the step has it; masked in the stored output.
            format!("DECLARED={}", "*".repeat(declared.len())),
            format!("HOME={}", workdir.display()),
            "JOB_VAR=from-job".to_owned(),
            format!("PATH={MINIMAL_PATH}"),
            // Set by sh itself.
            format!("PWD={}", workdir.display()),
            "REEL_JOB_ID=1".to_owned(),
        ],
        "the step's environment"
    );
    assert_nothing_left(state.path(), "run");
}

/// A step the kernel's OOM killer ends inside the job's memory cgroup ends with
/// that cause, not with the bare exit code 137 it leaves behind.
#[test]
fn a_step_killed_for_memory_ends_with_the_cause_and_the_limit() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let job = write(
        files.path(),
        "hog.yml",
        "name: hog\nresources: { memory: 64M }\nsteps:\n  - name: hog\n    command: perl -e '$x = \"a\" x (300 << 20); print length $x'\n",
    );
    let out = reel(state.path(), &["run", &job], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout} / {}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("out of memory (limit 64 MiB)"),
        "the job's end names the cause (this test needs the memory cgroup the \
         process runner sets up as root): {stdout}"
    );
    let inspect = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
    let reason = inspect["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("out of memory (limit 64 MiB)") && reason.contains("137"),
        "the cause is on the job's record: {inspect}"
    );
    assert_nothing_left(state.path(), "run");
}

/// A full disk stops the engine with the cause named, and loses nothing: no
/// output that was not stored was acknowledged to the agent, so once space
/// returns `reel recover` finishes the job with its complete output. (A real
/// 20 MiB tmpfs that a step printing 60 MB fills.)
#[test]
fn a_full_disk_stops_the_engine_plainly_and_recover_finishes_with_every_byte() {
    let mnt = tempfile::tempdir().unwrap();
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=20m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(mount.success(), "mount needs root (CI is root)");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(mnt.path());
    let state = mnt.path().join("state");
    let files = tempfile::tempdir().unwrap();
    let job = write(
        files.path(),
        "big.yml",
        "name: big\nsteps:\n  - name: lots\n    command: yes 0123456789abcdef | head -c 40000000\n",
    );
    let out = reel(&state, &["run", "-q", &job], &[]);
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{said}");
    let line = said
        .lines()
        .find(|l| l.starts_with("reel: job 1:"))
        .unwrap_or_default();
    assert!(
        line.contains("No space left on device") && line.contains(&format!("{}", state.display())),
        "the cause and the path are not named: {said}"
    );
    let grow = Command::new("mount")
        .args(["-o", "remount,size=300m"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(grow.success());
    let recover = reel(&state, &["recover", "-q"], &[]);
    assert_eq!(
        recover.status.code(),
        Some(0),
        "{} / {}",
        text(&recover.stdout),
        text(&recover.stderr)
    );
    let stored = reel(&state, &["output", "1"], &[]).stdout;
    let expected: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(40_000_000)
        .collect();
    assert!(stored == expected, "{} bytes stored", stored.len());
    assert_nothing_left(&state, "full disk");
}

/// A step exactly at the engine's size limit (768 KiB of command and
/// environment) reaches the real agent in one message and runs; the same job
/// one byte larger is refused before anything starts.
#[test]
fn a_step_at_the_size_limit_runs_and_one_byte_more_is_refused() {
    use reel_engine::model::spec::{MAX_STEP_BYTES, command_exec_size, variable_exec_size};
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let value = "v".repeat(120 * 1024);
    let command = "test ${#V0} -eq 122880 && test ${#S} -gt 0 && echo at the limit";
    let used = 6 * variable_exec_size("V0", &value) + command_exec_size(command);
    let filler = "s".repeat(MAX_STEP_BYTES - used - variable_exec_size("S", ""));
    let job = |filler: &str| {
        let vars: String = (0..6).map(|i| format!("  V{i}: {value}\n")).collect();
        format!(
            "environment:\n{vars}steps:\n  - name: wide\n    command: '{command}'\n    environment:\n      S: {filler}\n"
        )
    };
    let at_limit = write(files.path(), "limit.yml", &job(&filler));
    let out = reel(state.path(), &["run", &at_limit], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("at the limit"),
        "{}",
        text(&out.stdout)
    );

    let over = write(files.path(), "over.yml", &job(&format!("{filler}s")));
    let out = reel(state.path(), &["run", &over], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!(
            "take {} bytes, over the 768 KiB (786432 bytes) limit on one step",
            MAX_STEP_BYTES + 1
        )),
        "{}",
        text(&out.stderr)
    );
    // Only the first job is in the log.
    assert_eq!(
        json(&reel(state.path(), &["jobs", "--json"], &[]))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_nothing_left(state.path(), "run");
}

/// `seq 1 N` as bytes.
fn seq(n: u32) -> Vec<u8> {
    (1..=n)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect()
}

/// A job's declared artifacts are copied out after the drain, before poweroff,
/// also when a step failed: whole (a file of several agent chunks among them),
/// in name order, each with one `ArtifactStored`; a symbolic link out of the
/// work directory is not followed, a pattern that matches nothing is a notice;
/// `inspect` and `replay` show them.
#[test]
fn a_failed_jobs_artifacts_are_stored_whole_after_the_drain() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let job = write(
        files.path(),
        "build.yml",
        "name: build\nartifacts: [dist/*.tar.gz, report.xml, \"dist/missing-*\"]\nsteps:\n  \
         - name: build\n    command: mkdir -p dist && seq 1 100000 > dist/app.tar.gz && \
         echo '<ok/>' > report.xml && ln -s /etc/passwd dist/leak.tar.gz && \
         echo notes > dist/notes.txt\n  - name: test\n    command: exit 3\n",
    );
    let out = reel(state.path(), &["run", &job], &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{} / {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("artifact report.xml (6 bytes) stored"),
        "{stdout}"
    );
    let names = events(state.path(), 1);
    let at = |n: &str| {
        names
            .iter()
            .position(|e| e == n)
            .unwrap_or_else(|| panic!("{n}: {names:?}"))
    };
    let stored: Vec<usize> = names
        .iter()
        .enumerate()
        .filter(|(_, n)| *n == "ArtifactStored")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stored.len(), 2, "{names:?}");
    assert!(
        stored
            .iter()
            .all(|&i| at("Drained") < i && i < at("PoweredOff")),
        "{names:?}"
    );
    assert_eq!(names.last().map(String::as_str), Some("Failed"));
    let artifacts = stored_artifacts(state.path(), 1);
    assert_eq!(
        artifacts,
        [
            ("dist/app.tar.gz".to_owned(), seq(100_000)),
            ("report.xml".to_owned(), b"<ok/>\n".to_vec()),
        ]
    );
    let inspect = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
    let notices: Vec<&str> = inspect["notices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert!(
        notices
            .iter()
            .any(|n| n.contains("\"dist/missing-*\" matched no file")),
        "{notices:?}"
    );
    let text_view = text(&reel(state.path(), &["inspect", "1"], &[]).stdout);
    assert!(
        text_view.contains("artifacts: 2 stored (3 declared paths)"),
        "{text_view}"
    );
    let replay = text(&reel(state.path(), &["replay", "1"], &[]).stdout);
    let line = replay
        .lines()
        .find(|l| l.contains("ArtifactStored") && l.contains("report.xml"))
        .unwrap_or_else(|| panic!("{replay}"));
    assert!(
        line.contains(&format!(
            "report.xml (6 bytes, crc32c {:08x})",
            crc32c::crc32c(b"<ok/>\n")
        )),
        "{line}"
    );
    assert_nothing_left(state.path(), "artifacts");
}

/// `cancel_grace` reaches the runner: a cancelled step that traps SIGINT and
/// SIGTERM gets the job's grace after each (2 s here, twice the runner's
/// default, so a grace that did not arrive would show), then SIGKILL, and the
/// job ends cancelled.
#[test]
fn ctrl_c_signals_a_step_cancel_grace_apart() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let job = write(
        files.path(),
        "graceful.yml",
        "name: graceful\ncancel_grace: 2s\nsteps:\n  - name: trap\n    command: |\n      \
         trap 'echo \"INT $(date +%s.%N)\"' INT\n      \
         trap 'echo \"TERM $(date +%s.%N)\"' TERM\n      \
         echo started\n      while :; do sleep 0.02; done\n",
    );
    let mut child = start_run_until_stdout(state.path(), &job, "started", Duration::from_secs(30));
    let (_, took) = interrupt_run_until_cancelled(&mut child, state.path());
    let took = took.as_secs_f64();
    let output = text(&reel(state.path(), &["output", "1"], &[]).stdout);
    let (int, term) = (time_after(&output, "INT "), time_after(&output, "TERM "));
    let gap = term - int;
    assert!(
        (1.95..2.8).contains(&gap),
        "SIGTERM came {gap:.3} s after SIGINT, not the job's 2 s: {output:?}"
    );
    // INT, 2 s, TERM, 2 s, KILL, then teardown: not the default's 1 s steps,
    // and nothing waits much past the ladder.
    assert!((3.9..7.0).contains(&took), "the cancel took {took:.3} s");
    let inspect = json(&reel(state.path(), &["inspect", "1", "--json"], &[]));
    assert_eq!(inspect["steps"][0]["signal"], 9, "{inspect}");
    assert_nothing_left(state.path(), "cancel grace");
}
