//! Job-file parsing against data: the real spindle workflows in
//! `tests/data/jobfiles/spindle/` (with expectations in `spindle-expected/`), good
//! reel files (`good/NAME.yml` with `good/NAME.expected.json`), bad files
//! (`bad/NAME.yml` with the exact error line in `bad/NAME.error`), and every file
//! in the workspace's `examples/`.
//!
//! Run with `REEL_BLESS=1` to (re)write the expectation files from the current
//! output; review the diff before keeping it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use reel_engine::input::jobfile::{
    Format, JobFileError, Location, ParsedJob, parse_job_file, parse_job_str,
};
use reel_engine::model::spec::{JobSpec, Network};
use serde_json::json;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/jobfiles")
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn bless() -> bool {
    std::env::var_os("REEL_BLESS").is_some_and(|v| v == "1")
}

/// The `.yml` files of a directory, sorted.
fn yml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no job files in {}", dir.display());
    files
}

fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Parses `path` with an origin relative to the data directory, so that expected
/// messages do not depend on where the tree is checked out.
fn parse_data_file(path: &Path) -> Result<ParsedJob, JobFileError> {
    let origin = path.strip_prefix(data_dir()).unwrap().display().to_string();
    let text = std::fs::read_to_string(path).unwrap();
    parse_job_str(&text, &origin)
}

fn to_json(parsed: &ParsedJob) -> serde_json::Value {
    json!({
        "format": match parsed.format {
            Format::Reel => "reel",
            Format::Spindle => "spindle",
        },
        "warnings": parsed.warnings,
        "spec": parsed.spec,
    })
}

/// Compares `parsed` with the JSON expectation in `expected` (or writes it).
fn check_expected(path: &Path, parsed: &ParsedJob, expected: &Path) {
    let actual = to_json(parsed);
    if bless() {
        let text = serde_json::to_string_pretty(&actual).unwrap() + "\n";
        std::fs::write(expected, text).unwrap();
        return;
    }
    let text = std::fs::read_to_string(expected).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with REEL_BLESS=1 to create it)",
            expected.display()
        )
    });
    let wanted: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        actual,
        wanted,
        "{} does not match {}:\n{}",
        path.display(),
        expected.display(),
        serde_json::to_string_pretty(&actual).unwrap()
    );
    // The expectation is a valid spec too.
    let _: JobSpec = serde_json::from_value(wanted["spec"].clone()).unwrap();
}

#[test]
fn every_spindle_workflow_parses_with_its_warnings() {
    let dir = data_dir().join("spindle");
    for path in yml_files(&dir) {
        let parsed = parse_data_file(&path)
            .unwrap_or_else(|e| panic!("{} should parse: {e}", path.display()));
        assert_eq!(parsed.format, Format::Spindle, "{}", path.display());
        assert_eq!(parsed.spec.runner, "process");
        assert_eq!(parsed.spec.name, stem(&path));
        let expected = data_dir()
            .join("spindle-expected")
            .join(format!("{}.json", stem(&path)));
        check_expected(&path, &parsed, &expected);
    }
}

#[test]
fn spindle_sources_list_every_workflow() {
    let dir = data_dir().join("spindle");
    let sources = std::fs::read_to_string(dir.join("SOURCES.md")).unwrap();
    let listed: BTreeSet<String> = sources
        .lines()
        .filter_map(|line| line.strip_prefix("| "))
        .filter_map(|rest| rest.split(' ').next())
        .filter(|name| name.ends_with(".yml"))
        .map(str::to_string)
        .collect();
    let present: BTreeSet<String> = yml_files(&dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, present);
}

/// Whatever a spindle file says that the process runner cannot honour is named in
/// a warning: every top-level key but `environment`, `steps` and `timeout`.
#[test]
fn spindle_files_never_drop_a_key_silently() {
    let mut files = yml_files(&data_dir().join("spindle"));
    files.extend(yml_files(&data_dir().join("good")));
    files.push(examples_dir().join("spindle.yml"));
    for path in files {
        let parsed = parse_job_file(&path).unwrap();
        if parsed.format != Format::Spindle {
            continue;
        }
        let value: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for key in value.as_mapping().unwrap().keys() {
            let key = key.as_str().unwrap();
            if ["environment", "steps", "timeout"].contains(&key) {
                continue;
            }
            if key == "clone" && value["clone"]["skip"] == serde_yaml::Value::Bool(true) {
                continue;
            }
            let needle = format!(": {key}: ");
            assert!(
                parsed.warnings.iter().any(|w| w.contains(&needle)),
                "{}: no warning about {key:?}: {:#?}",
                path.display(),
                parsed.warnings
            );
        }
    }
}

#[test]
fn good_files_give_the_expected_specs() {
    let dir = data_dir().join("good");
    for path in yml_files(&dir) {
        let parsed = parse_data_file(&path)
            .unwrap_or_else(|e| panic!("{} should parse: {e}", path.display()));
        let expected = dir.join(format!("{}.expected.json", stem(&path)));
        check_expected(&path, &parsed, &expected);
    }
}

/// `ORIGIN:LINE:COLUMN: ...` → the location in an expected error line.
fn location_in(line: &str) -> Option<Location> {
    let mut parts = line.splitn(4, ':');
    let _origin = parts.next()?;
    let line_no = parts.next()?.parse().ok()?;
    let column = parts.next()?.parse().ok()?;
    Some(Location {
        line: line_no,
        column,
    })
}

#[test]
fn bad_files_give_the_expected_errors() {
    let dir = data_dir().join("bad");
    for path in yml_files(&dir) {
        let err = match parse_data_file(&path) {
            Ok(parsed) => panic!("{} should not parse: {parsed:#?}", path.display()),
            Err(err) => err,
        };
        let message = err.to_string();
        assert!(!message.contains('\n'), "{message:?} is not one line");
        let expected = dir.join(format!("{}.error", stem(&path)));
        if bless() {
            std::fs::write(&expected, format!("{message}\n")).unwrap();
            continue;
        }
        let wanted = std::fs::read_to_string(&expected).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with REEL_BLESS=1 to create it)",
                expected.display()
            )
        });
        let wanted = wanted.trim_end_matches('\n');
        assert_eq!(message, wanted, "{}", path.display());
        // The line and column are also available as data.
        assert_eq!(err.location(), location_in(wanted), "{}", path.display());
    }
}

#[test]
fn the_documented_error_shape() {
    let text = "name: bad\nsteps:\n  - name: one\n    command: echo one\n\n  - name: two\n    timeout: 5s\n";
    let err = parse_job_str(text, "examples/bad.yml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "examples/bad.yml:6:5: steps[1]: missing field \"command\""
    );
    assert_eq!(err.location(), Some(Location { line: 6, column: 5 }));
}

#[test]
fn file_errors_name_the_path_as_given() {
    let err = parse_job_file(Path::new("does/not/exist.yml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("does/not/exist.yml: cannot read job file: "),
        "{err}"
    );
    assert!(matches!(err, JobFileError::Read { .. }));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.yml");
    std::fs::write(&path, "steps:\n  - command: echo\n    timout: 5s\n").unwrap();
    let err = parse_job_file(&path).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "{}:3:5: steps[0]: unknown field \"timout\"",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn every_example_parses() {
    let mut seen = BTreeSet::new();
    for path in yml_files(&examples_dir()) {
        let parsed = parse_job_file(&path)
            .unwrap_or_else(|e| panic!("{} should parse: {e}", path.display()));
        let name = stem(&path);
        assert_eq!(parsed.spec.name, name, "{}", path.display());
        let runner = if name.starts_with("vm-") {
            "qemu"
        } else {
            "process"
        };
        assert_eq!(parsed.spec.runner, runner, "{}", path.display());
        assert!(!parsed.spec.steps.is_empty(), "{}", path.display());
        let spec = &parsed.spec;
        match name.as_str() {
            "hello" => {
                assert_eq!(parsed.format, Format::Reel);
                assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
                assert_eq!(spec.steps.len(), 3);
                assert!(spec.steps[1].command.contains("uname"));
                assert!(spec.steps[2].command.contains("ls"));
            }
            "failing" => {
                assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
                assert_eq!(spec.steps.len(), 3);
                assert!(spec.steps[1].command.contains("exit 3"));
                assert!(!spec.steps[0].command.contains("exit"));
                assert!(!spec.steps[2].command.contains("exit"));
            }
            "timeout" => {
                assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
                assert_eq!(spec.steps[0].command, "sleep 30");
                assert_eq!(spec.steps[0].timeout_ms, Some(2000));
            }
            "spindle" => {
                assert_eq!(parsed.format, Format::Spindle);
                assert_eq!(spec.environment["BUILD_NUMBER"], "42");
                for key in ["when", "engine", "dependencies"] {
                    assert!(
                        parsed
                            .warnings
                            .iter()
                            .any(|w| w.contains(&format!(": {key}: "))),
                        "no {key} warning: {:?}",
                        parsed.warnings
                    );
                }
                assert_eq!(parsed.warnings.len(), 3, "{:?}", parsed.warnings);
            }
            "vm-net" => {
                assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
                assert_eq!(spec.network, Network::User);
            }
            "secret" => {
                assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
                assert_eq!(spec.secrets, ["REEL_DEMO_TOKEN"]);
                assert!(spec.steps[0].command.contains("$REEL_DEMO_TOKEN"));
            }
            "vm-hello" => {
                assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
                assert_eq!(spec.image, None, "the default image");
                assert_eq!(spec.resources.memory_mib, 256);
                assert_eq!(spec.resources.disk_mib, 256);
                assert_eq!(spec.steps[0].command, "uname -a");
            }
            other => panic!("unexpected example {other}: add it to this test"),
        }
        seen.insert(name);
    }
    assert_eq!(
        seen,
        [
            "failing", "hello", "secret", "spindle", "timeout", "vm-hello", "vm-net"
        ]
        .map(String::from)
        .into()
    );
}

/// The example commands are plain POSIX sh: check their syntax with `sh -n`.
#[test]
fn example_commands_are_valid_sh() {
    for path in yml_files(&examples_dir()) {
        let parsed = parse_job_file(&path).unwrap();
        for step in &parsed.spec.steps {
            let status = std::process::Command::new("sh")
                .args(["-n", "-c", &step.command])
                .status()
                .expect("sh runs");
            assert!(
                status.success(),
                "{}: step {:?} is not valid sh",
                path.display(),
                step.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// Hostile input: too large, too deep, too repetitive, or not runnable. Each is
// refused with a one-line error naming the limit, quickly and in bounded memory.

use std::time::{Duration, Instant};

use reel_engine::input::jobfile::{MAX_JOB_FILE_BYTES, MAX_NESTING, MAX_VALUES};
use reel_engine::model::spec::{MAX_EXEC_STRING, MAX_SPEC_BYTES, MAX_STEP_BYTES};

/// Generous: each of these used to take from seconds to minutes (or gigabytes);
/// refused, they take milliseconds.
const QUICKLY: Duration = Duration::from_secs(10);

fn refused(text: &str) -> JobFileError {
    let began = Instant::now();
    let err = parse_job_str(text, "hostile.yml").expect_err("should be refused");
    assert!(
        began.elapsed() < QUICKLY,
        "took {:?}: {err}",
        began.elapsed()
    );
    assert!(!err.to_string().contains('\n'), "{err}");
    err
}

#[test]
fn a_file_over_the_size_limit_is_refused_by_its_size_unread() {
    let dir = tempfile::tempdir().unwrap();
    // A real 17 MB environment value, as the bug was found.
    let path = dir.path().join("big.yml");
    let body = format!(
        "environment:\n  BIG: {}\nsteps:\n  - command: echo\n",
        "x".repeat(17_000_000)
    );
    std::fs::write(&path, &body).unwrap();
    let err = parse_job_file(&path).unwrap_err();
    let JobFileError::TooLarge { size, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(*size, Some(body.len() as u64));
    assert_eq!(
        err.to_string(),
        format!(
            "{}: the job file is {} bytes, over the 4 MiB (4194304 bytes) limit on job files",
            path.display(),
            body.len()
        )
    );

    // Exactly at the limit is read; one byte more is not.
    let job = "steps:\n  - command: echo\n";
    let mut at_limit = job.to_string();
    while at_limit.len() < MAX_JOB_FILE_BYTES as usize {
        let room = MAX_JOB_FILE_BYTES as usize - at_limit.len();
        at_limit.push_str(&format!("#{}\n", "c".repeat(room.clamp(2, 80) - 2)));
    }
    assert_eq!(at_limit.len() as u64, MAX_JOB_FILE_BYTES);
    std::fs::write(&path, &at_limit).unwrap();
    assert_eq!(parse_job_file(&path).unwrap().spec.steps[0].command, "echo");
    std::fs::write(&path, format!("{at_limit}\n")).unwrap();
    assert!(matches!(
        parse_job_file(&path),
        Err(JobFileError::TooLarge {
            size: Some(n),
            ..
        }) if n == MAX_JOB_FILE_BYTES + 1
    ));
}

/// `reel run /dev/zero` used to read until memory ran out (10 GB in 20 s).
#[test]
fn an_endless_device_or_pipe_is_read_only_up_to_the_limit() {
    let began = Instant::now();
    let err = parse_job_file(Path::new("/dev/zero")).unwrap_err();
    assert!(began.elapsed() < QUICKLY);
    assert!(
        matches!(err, JobFileError::TooLarge { size: None, .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "/dev/zero: the job file goes on past the 4 MiB (4194304 bytes) limit on job files \
         (it is not a regular file; reading stopped there)"
    );

    // A FIFO: one that keeps writing is refused at the limit, one that holds a
    // job file is read (`reel run <(generate-job)` works).
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("job.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let writer = |body: Vec<u8>| {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            // The reader stops early in the first case: the pipe breaks.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .open(&fifo)
                .and_then(|mut f| f.write_all(&body));
        })
    };
    let endless = writer(vec![b'#'; 3 * MAX_JOB_FILE_BYTES as usize]);
    let err = parse_job_file(&fifo).unwrap_err();
    assert!(
        matches!(err, JobFileError::TooLarge { size: None, .. }),
        "{err}"
    );
    endless.join().unwrap();
    let job = writer(b"steps:\n  - command: echo from a pipe\n".to_vec());
    let parsed = parse_job_file(&fifo).unwrap();
    assert_eq!(parsed.spec.steps[0].command, "echo from a pipe");
    job.join().unwrap();
}

#[test]
fn deep_nesting_is_refused_before_the_yaml_parser_runs() {
    // 100,000 `[` took 21 s of CPU before serde_yaml's recursion error, and
    // 100,000 `{a: ` minutes.
    let err = refused(&"[".repeat(100_000));
    assert_eq!(
        err.to_string(),
        format!(
            "hostile.yml:1:{}: collections nest more than {MAX_NESTING} levels deep here, the limit for job files",
            MAX_NESTING + 1
        )
    );
    let err = refused(&format!("steps: {}", "{a: ".repeat(100_000)));
    assert_eq!(
        err.location(),
        Some(Location {
            line: 1,
            column: 8 + 4 * (MAX_NESTING - 1)
        })
    );
    // Block nesting too, written compactly.
    let err = refused(&format!("steps:\n{}x\n", "- ".repeat(100_000)));
    assert!(err.to_string().contains("levels deep"), "{err}");
    // Brackets that are text do not count.
    let text = format!(
        "steps:\n  - command: |\n{}",
        "      [[[[[[[[ {{{{{{{{ \"'\n".repeat(50)
    );
    assert!(parse_job_str(&text, "text.yml").is_ok());
}

#[test]
fn aliases_are_counted_as_what_they_repeat() {
    // A 180 KB file whose aliases expanded to 20 million values (>60 s, >1.4 GB).
    let text = format!(
        "a: &a [{}]\nb: [{}]\nsteps:\n  - command: echo\n",
        ["xxxxxxxx"; 20_000].join(","),
        ["*a"; 1000].join(",")
    );
    let err = refused(&text);
    assert!(
        err.to_string().contains(&format!(
            "the job file holds more than {MAX_VALUES} values here (an alias counts as the values it repeats)"
        )),
        "{err}"
    );
    // Few values, but long ones: 40 aliases of a 500 KiB value are 20 MB of text.
    let text = format!(
        "x: &x {}\ny: [{}]\nsteps:\n  - command: echo\n",
        "v".repeat(500 * 1024),
        ["*x"; 40].join(", ")
    );
    let err = refused(&text);
    assert!(
        err.to_string()
            .contains("more than 16 MiB (16777216 bytes) of text here"),
        "{err}"
    );
    // Too many values without aliases are found by the scan, before the parser
    // holds them all.
    let err = refused(&format!("[{}]", ["a"; 2 * MAX_VALUES].join(",")));
    assert_eq!(
        err.location(),
        Some(Location {
            line: 1,
            column: 2 * MAX_VALUES
        })
    );
}

/// A job whose stored form is over the limit, written small with aliases: the
/// file is 110 KB, the job 9.2 MB.
#[test]
fn a_job_over_the_stored_limit_is_refused_with_its_size() {
    let command = "c".repeat(100 * 1024);
    let mut text = format!("steps:\n  - command: &c {command}\n");
    for _ in 0..89 {
        text.push_str("  - command: *c\n");
    }
    let err = refused(&text);
    let message = err.to_string();
    let size: usize = message
        .split("takes ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {message}"));
    assert!(size > MAX_SPEC_BYTES && size < 90 * 103 * 1024, "{size}");
    assert_eq!(
        message,
        format!(
            "hostile.yml: the job takes {size} bytes when stored, over the 8 MiB (8388608 bytes) limit on a job"
        )
    );
    // With 80 steps it fits.
    let fits: String = text.lines().take(81).map(|l| format!("{l}\n")).collect();
    assert_eq!(
        parse_job_str(&fits, "fits.yml").unwrap().spec.steps.len(),
        80
    );
}

/// A value or command over 128 KiB used to fail only when the step started
/// ("Argument list too long"), and one over the agent's 1 MiB frame as "Cannot
/// encode message": both are refused where they are written.
#[test]
fn a_command_or_variable_too_long_to_exec_is_refused_where_it_is_written() {
    // `NAME=value` and its NUL: exactly at the limit passes.
    let at_limit = "v".repeat(MAX_EXEC_STRING - "BIG".len() - 2);
    let text = format!("environment:\n  BIG: {at_limit}\nsteps:\n  - command: echo\n");
    assert!(parse_job_str(&text, "ok.yml").is_ok());
    let text = format!("environment:\n  BIG: {at_limit}v\nsteps:\n  - command: echo\n");
    let err = refused(&text);
    assert_eq!(
        err.to_string(),
        format!(
            "hostile.yml:2:8: environment.BIG: the variable (NAME=value) takes {} bytes, over the \
             128 KiB (131072 bytes) limit on one command or variable: Linux cannot start a process \
             with a longer argument or environment string",
            MAX_EXEC_STRING + 1
        )
    );
    // In a step's environment, and a command.
    let text = format!(
        "steps:\n  - command: echo\n    environment:\n      V: {}\n",
        "v".repeat(2 << 20)
    );
    assert_eq!(
        refused(&text).location(),
        Some(Location {
            line: 4,
            column: 10
        })
    );
    let text = format!(
        "steps:\n  - command: echo {}\n",
        "c".repeat(MAX_EXEC_STRING)
    );
    let err = refused(&text);
    assert!(
        err.to_string()
            .starts_with("hostile.yml:2:14: steps[0].command: the command takes 131078 bytes"),
        "{err}"
    );
}

#[test]
fn a_step_over_the_agent_message_limit_is_refused_with_the_limit() {
    // Seven variables of 120 KiB: each fits exec, together they are over 768 KiB.
    let value = "v".repeat(120 * 1024);
    let vars: String = (0..7).map(|i| format!("      V{i}: {value}\n")).collect();
    let text = format!("steps:\n  - name: build\n    command: echo\n    environment:\n{vars}");
    let size = 7 * ("V0=".len() + value.len() + 1) + "echo".len() + 1;
    assert!(size > MAX_STEP_BYTES);
    assert_eq!(
        refused(&text).to_string(),
        format!(
            "hostile.yml: step 1 \"build\": its command and environment (the job's under its own) \
             take {size} bytes, over the 768 KiB (786432 bytes) limit on one step: a runner's agent \
             receives a step in one message of at most 1 MiB"
        )
    );
    // The job's environment is every step's.
    let text = format!(
        "environment:\n{}steps:\n  - command: echo\n",
        vars.replace("      ", "  ")
    );
    assert!(
        refused(&text)
            .to_string()
            .starts_with("hostile.yml: the job's environment, which every step carries, takes"),
    );
}
