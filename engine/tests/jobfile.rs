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
use reel_engine::model::spec::JobSpec;
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
        assert_eq!(parsed.spec.runner, "process", "{}", path.display());
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
            "secret" => {
                assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
                assert_eq!(spec.secrets, ["REEL_DEMO_TOKEN"]);
                assert!(spec.steps[0].command.contains("$REEL_DEMO_TOKEN"));
            }
            other => panic!("unexpected example {other}: add it to this test"),
        }
        seen.insert(name);
    }
    assert_eq!(
        seen,
        ["failing", "hello", "secret", "spindle", "timeout"]
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
