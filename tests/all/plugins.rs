//! Runner plugins through the real loader: cdylibs built by these tests, loaded with
//! `reel_engine::plugin::load_dir`, and called across the C ABI.
//!
//! The template is the `libreel_runner_template.so` cargo built for this test run
//! (found by `reel-test-artefacts`, which builds it only if cargo did not). The
//! fixture plugins are workspaces of their own, so no outer cargo builds them: a
//! nested cargo builds them once per test binary into their own target directory
//! (`target/plugin-tests`), never the outer build's.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use std::time::Duration;

use reel_engine::input::secrets::ResolvedSecrets;
use reel_engine::lifecycle::executor::{Executor, Runners};
use reel_engine::lifecycle::observer::Cancel;
use reel_engine::model::event::{Event, JobId, Outcome};
use reel_engine::model::spec::{JobSpec, Network, StepSpec};
use reel_engine::plugin::{self, ErrorKind, Handle, JobRequest, RunnerConfig, StepRequest};
use reel_engine::store::{EventLog, LogOptions};
use reel_plugin_sdk::conformance::Suite;
use reel_plugin_sdk::{OutputSink, Stream};

/// The built plugin files.
struct Built {
    template: PathBuf,
    panicky: PathBuf,
    abi_v2: PathBuf,
    not_a_plugin: PathBuf,
    firehose: PathBuf,
    old_minor: PathBuf,
}

fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    match here.parent() {
        Some(root) if root.join("plugins/template/Cargo.toml").exists() => root.to_path_buf(),
        _ => PathBuf::from(
            std::env::var("REEL_WORKSPACE_ROOT")
                .expect("the tests crate is not in the reel workspace; set REEL_WORKSPACE_ROOT"),
        ),
    }
}

fn cargo_build(root: &Path, target: &Path, args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .arg("build")
        .args(args)
        .current_dir(root)
        .env("CARGO_TARGET_DIR", target)
        .output()
        .expect("cannot run cargo");
    assert!(
        output.status.success(),
        "cargo build {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let template = reel_test_artefacts::file("libreel_runner_template.so");
        let root = workspace_root();
        let target = root.join("target/plugin-tests");
        let fixtures = ["panicky", "abi-v2", "not-a-plugin", "firehose", "old-minor"];
        // Straight to the terminal: libtest captures `eprintln!` of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "plugin tests: building the fixture plugins {fixtures:?} into {}",
            target.display()
        );
        for fixture in fixtures {
            let manifest = root
                .join("tests/fixtures/plugins")
                .join(fixture)
                .join("Cargo.toml");
            cargo_build(
                &root,
                &target,
                &["--manifest-path", manifest.to_str().unwrap()],
            );
        }
        let lib = |name: &str| target.join("debug").join(format!("lib{name}.so"));
        Built {
            template,
            panicky: lib("reel_fixture_panicky"),
            abi_v2: lib("reel_fixture_abi_v2"),
            not_a_plugin: lib("reel_fixture_not_a_plugin"),
            firehose: lib("reel_fixture_firehose"),
            old_minor: lib("reel_fixture_old_minor"),
        }
    })
}

/// A plugin directory holding copies of `files`, each `(source, name, mode)`.
fn plugin_dir(files: &[(&Path, &str, u32)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (source, name, mode) in files {
        let dest = dir.path().join(name);
        std::fs::copy(source, &dest).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    dir
}

fn config(sandbox_root: &Path, plugin_dir: &Path) -> RunnerConfig {
    RunnerConfig {
        sandbox_root: sandbox_root.to_path_buf(),
        plugin_dir: plugin_dir.to_path_buf(),
        options: Default::default(),
    }
}

#[test]
fn template_passes_conformance_through_the_cdylib() {
    let b = built();
    let dir = plugin_dir(&[(&b.template, "libreel_runner_template.so", 0o755)]);
    let set = plugin::load_dir(dir.path());
    assert_eq!(set.refusals(), &[], "nothing should be refused");
    let info = set.get("template").expect("template plugin not loaded");
    // The template is built against this workspace's ABI (1.2 since collect).
    assert_eq!(
        (info.abi_major, info.abi_minor),
        (1, plugin::abi::ABI_MINOR)
    );
    // Every capability but `collect`, which the template leaves out.
    for c in plugin::Capability::ALL {
        assert_eq!(
            info.has(c),
            c != plugin::Capability::Collect,
            "{c}: {info:?}"
        );
    }

    let sandbox = tempfile::tempdir().unwrap();
    let config = config(sandbox.path(), dir.path());
    // Each instance is a `LoadedRunner` of the loaded library: the recovery check
    // drops the first one mid-step and takes the step back with a second.
    let new = || -> Result<Arc<dyn reel_plugin_sdk::Runner>, plugin::RunnerError> {
        set.instantiate("template", &config)
            .map(|r| r as Arc<dyn reel_plugin_sdk::Runner>)
            .map_err(|e| plugin::RunnerError::failed(e.to_string()))
    };
    let report = Suite::default()
        .run_with(&new)
        .unwrap_or_else(|v| panic!("through the cdylib: {v}"));
    assert!(report.passed.contains(&"recovery"), "{report:?}");
    let skipped: Vec<&str> = report.skipped.iter().map(|(check, _)| *check).collect();
    assert_eq!(skipped, ["collect"], "{report:?}");
    assert_eq!(
        report.passed.last(),
        Some(&"malformed handle"),
        "{report:?}"
    );
    // Everything the job created is gone after cleanup.
    let left: Vec<_> = std::fs::read_dir(sandbox.path()).unwrap().collect();
    assert!(left.is_empty(), "cleanup left {left:?}");
}

#[test]
fn bad_files_are_refused_with_one_line_each_while_the_others_load() {
    let b = built();
    let text = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(text.path(), "this is not an ELF file\n").unwrap();
    let dir = plugin_dir(&[
        (&b.template, "libreel_runner_template.so", 0o644),
        (&b.panicky, "libreel_fixture_panicky.so", 0o755),
        (&b.abi_v2, "libfuture.so", 0o755),
        (&b.template, "libworld.so", 0o666),
        (&b.template, "libgroup.so", 0o664),
        (&b.not_a_plugin, "libunrelated.so", 0o755),
        (text.path(), "notes.so", 0o644),
        (text.path(), "README.txt", 0o644),
    ]);
    let set = plugin::load_dir(dir.path());

    let names: Vec<&str> = set.plugins().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["panicky", "template"]);

    let reasons: Vec<(String, String)> = set
        .refusals()
        .iter()
        .map(|r| {
            let line = r.to_string();
            assert!(!line.contains('\n'), "refusal is not one line: {line:?}");
            assert!(line.starts_with(&r.path.display().to_string()), "{line}");
            (
                r.path.file_name().unwrap().to_string_lossy().into_owned(),
                r.reason.clone(),
            )
        })
        .collect();
    let expected: [(&str, &[&str]); 5] = [
        ("libfuture.so", &["ABI major 2", "ABI major 1"]),
        ("libgroup.so", &["group-writable", "0664"]),
        (
            "libunrelated.so",
            &["not a reel plugin", "reel_runner_entry_v1"],
        ),
        ("libworld.so", &["world-writable", "0666"]),
        ("notes.so", &["not a loadable shared library"]),
    ];
    assert_eq!(reasons.len(), expected.len(), "{reasons:#?}");
    for ((file, reason), (want_file, want)) in reasons.iter().zip(expected) {
        assert_eq!(file, want_file, "{reasons:#?}");
        for needle in want {
            assert!(
                reason.contains(needle),
                "{file}: {reason:?} lacks {needle:?}"
            );
        }
    }
}

#[test]
fn a_panic_in_a_plugin_is_an_error_carrying_its_message() {
    let b = built();
    let dir = plugin_dir(&[(&b.panicky, "libreel_fixture_panicky.so", 0o755)]);
    let set = plugin::load_dir(dir.path());
    let sandbox = tempfile::tempdir().unwrap();
    let runner = set
        .instantiate("panicky", &config(sandbox.path(), dir.path()))
        .unwrap();
    let handle = Handle {
        version: 1,
        bytes: vec![],
    };

    let err = runner.probe(&handle).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Panicked);
    assert_eq!(err.message, "probe exploded on purpose");

    struct Keep(Vec<(Stream, u64, Vec<u8>)>);
    impl OutputSink for Keep {
        fn chunk(&mut self, stream: Stream, offset: u64, bytes: &[u8]) {
            self.0.push((stream, offset, bytes.to_vec()));
        }
    }
    let mut out = Keep(Vec::new());
    let step = StepRequest {
        name: "boom".to_owned(),
        ..StepRequest::default()
    };
    let err = runner.exec(&handle, &step, &mut out).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Panicked);
    assert_eq!(err.message, "exec exploded in step boom");
    assert_eq!(out.0, [(Stream::Stdout, 0, b"before the panic\n".to_vec())]);

    // The host and the instance survive: the next call works.
    assert_eq!(runner.describe().name, "panicky");
    assert_eq!(runner.cleanup(&handle), Ok(()));
}

/// Loads a fresh copy of the panicky fixture and has it validate a job named
/// `name` (it raises a notice and logs a warning while doing so).
fn validate_with_panicky(name: &str) -> Result<Vec<String>, reel_engine::plugin::RunnerError> {
    let b = built();
    let dir = plugin_dir(&[(&b.panicky, "libreel_fixture_panicky.so", 0o755)]);
    let set = plugin::load_dir(dir.path());
    let sandbox = tempfile::tempdir().unwrap();
    let runner = set
        .instantiate("panicky", &config(sandbox.path(), dir.path()))
        .unwrap();
    runner.validate(&JobRequest {
        name: name.to_owned(),
        ..JobRequest::default()
    })
}

#[test]
fn plugin_notices_reach_the_host() {
    static NOTICES: Mutex<Vec<String>> = Mutex::new(Vec::new());
    assert!(plugin::set_notice_hook(|plugin, kind, message| {
        NOTICES
            .lock()
            .unwrap()
            .push(format!("{plugin}/{kind}/{message}"));
    }));
    assert_eq!(validate_with_panicky("j1"), Ok(vec![]));
    let notices = NOTICES.lock().unwrap();
    assert!(
        notices.iter().any(|n| n == "panicky/validated/job j1"),
        "{notices:?}"
    );
}

/// Records the messages of every `tracing` event the host emits.
struct Capture;

static LOGS: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        let line = format!(
            "{} {} {}",
            event.metadata().level(),
            event.metadata().target(),
            m.0
        );
        LOGS.lock().unwrap().push(line);
    }
}

#[test]
fn plugin_tracing_logs_reach_the_host() {
    use tracing_subscriber::layer::SubscriberExt;
    // Installed before the plugin loads: a plugin forwards logs up to the level
    // the host has enabled when it is loaded.
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture));
    validate_with_panicky("logged").unwrap();
    let logs = LOGS.lock().unwrap();
    assert!(
        logs.iter().any(|l| l.starts_with("WARN reel::plugin")
            && l.contains("validating in the panicky plugin")),
        "{logs:?}"
    );
}

#[test]
fn plugins_listing_reports_loaded_and_refused() {
    let b = built();
    let dir = plugin_dir(&[
        (&b.template, "libreel_runner_template.so", 0o755),
        (&b.abi_v2, "libfuture.so", 0o755),
    ]);
    let set = plugin::load_dir(dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    let json = reel_cli::views::plugins_json(&set);
    assert_eq!(
        json,
        serde_json::json!({
            "plugin_dir": dir.path().display().to_string(),
            "loaded": [{
                "name": "template",
                "version": env!("CARGO_PKG_VERSION"),
                "abi": format!("1.{}", plugin::abi::ABI_MINOR),
                "abi_major": 1,
                "abi_minor": plugin::abi::ABI_MINOR,
                "capabilities": ["cancel", "timeout", "reattach", "resume"],
                "path": path("libreel_runner_template.so"),
            }],
            "refused": [{
                "path": path("libfuture.so"),
                "reason": "built for plugin ABI major 2, but this reel speaks ABI major 1",
            }],
        })
    );
    let text = reel_cli::views::plugins_text(&set);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            format!("plugin directory: {}", dir.path().display()),
            format!(
                "loaded   template {} (ABI 1.{}) [cancel, timeout, reattach, resume] {}",
                env!("CARGO_PKG_VERSION"),
                plugin::abi::ABI_MINOR,
                path("libreel_runner_template.so")
            ),
            format!(
                "refused  {}: built for plugin ABI major 2, but this reel speaks ABI major 1",
                path("libfuture.so")
            ),
        ]
    );
}

#[test]
fn an_unknown_plugin_name_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let set = plugin::load_dir(dir.path());
    assert_eq!(set.plugins().count(), 0);
    let err = set
        .instantiate("qemu", &config(dir.path(), dir.path()))
        .unwrap_err();
    assert_eq!(err.to_string(), "no runner plugin named `qemu` is loaded");
}

struct Quiet;

impl reel_engine::lifecycle::observer::Observer for Quiet {
    fn report(&self, _report: reel_engine::lifecycle::observer::Report<'_>) {}
}

/// A log in a fresh state directory and an executor over it whose only plugin is
/// the firehose fixture, created with `options`.
struct Firehose {
    state: tempfile::TempDir,
    _plugins: tempfile::TempDir,
    log: EventLog,
    ex: Executor,
}

impl Firehose {
    fn new(options: &[(&str, &str)]) -> Firehose {
        let b = built();
        Firehose::with_plugin(&b.firehose, "libreel_fixture_firehose.so", options)
    }

    /// The harness over another plugin file than the firehose.
    fn with_plugin(file: &Path, name: &str, options: &[(&str, &str)]) -> Firehose {
        let plugins = plugin_dir(&[(file, name, 0o755)]);
        let state = tempfile::tempdir().unwrap();
        let log = EventLog::open(state.path(), LogOptions::default()).unwrap();
        let runners = Runners::new(
            plugin::load_dir(plugins.path()),
            state.path().join("sandboxes"),
            options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        let ex = Executor::new(log.clone(), runners).unwrap();
        Firehose {
            state,
            _plugins: plugins,
            log,
            ex,
        }
    }

    fn spec(commands: &[&str]) -> JobSpec {
        JobSpec {
            name: "firehose".into(),
            runner: "firehose".into(),
            steps: commands
                .iter()
                .map(|c| StepSpec {
                    name: c.to_string(),
                    command: c.to_string(),
                    ..StepSpec::default()
                })
                .collect(),
            ..JobSpec::default()
        }
    }

    /// Submits and runs a job of one step per command; `cancel` is cancelled
    /// after `cancel_after` if given.
    fn run(&self, commands: &[&str], cancel_after: Option<Duration>) -> (JobId, Outcome) {
        self.run_spec(Firehose::spec(commands), cancel_after)
    }

    /// Submits and runs `spec` (see [`Firehose::run`]).
    fn run_spec(&self, spec: JobSpec, cancel_after: Option<Duration>) -> (JobId, Outcome) {
        let cancel = Cancel::default();
        smol::block_on(async {
            let id = self.log.submit(spec.clone()).await.unwrap();
            self.log.append(id, Event::Queued {}).await.unwrap();
            let _canceller = cancel_after.map(|after| {
                let cancel = cancel.clone();
                smol::spawn(async move {
                    smol::Timer::after(after).await;
                    cancel.cancel("cancelled by the test");
                })
            });
            let outcome = self
                .ex
                .run(id, &spec, &ResolvedSecrets::default(), &cancel, &Quiet)
                .await
                .unwrap();
            (id, outcome)
        })
    }

    /// The job's events, notices as `notice <message>` and the rest by name.
    fn timeline(&self, id: JobId) -> Vec<String> {
        self.log
            .events(id)
            .map(|r| match r.unwrap().event {
                Event::RunnerNotice { message } => format!("notice {message}"),
                e => e.name().to_owned(),
            })
            .collect()
    }
}

/// The executor passes the runner's own output offsets to the log, whose writer
/// refuses a gap: a runner that skips bytes fails its step instead of having
/// its output silently stored as if it were contiguous.
#[test]
fn a_runner_that_leaves_a_gap_in_its_output_fails_the_step() {
    let f = Firehose::new(&[]);
    let (id, outcome) = f.run(&["gap"], None);
    assert_eq!(outcome, Outcome::Failed);
    let end = f.log.fold(id).unwrap();
    let reason = end.reason.unwrap_or_default();
    assert!(
        reason.contains("offset 100") && reason.contains("gap"),
        "{reason}"
    );
    let stored: Vec<u8> = f
        .log
        .output(id, 0, 0)
        .flat_map(|c| c.unwrap().bytes)
        .collect();
    assert_eq!(stored, b"first ");
    assert_eq!(end.steps[0].output_bytes, 6);
    f.log.close();
}

/// A notice a runner raises while a step runs, or while the job is torn down,
/// is on the job's record (what `reel export` prints), in the order it was
/// raised: before the event that records the call's effect. Its plan named no
/// resource, and the record says so without guessing a path.
#[test]
fn notices_raised_during_exec_and_teardown_are_on_the_job_record() {
    let f = Firehose::new(&[]);
    let (id, outcome) = f.run(&["notice"], None);
    assert_eq!(outcome, Outcome::Succeeded);
    let timeline = f.timeline(id);
    let at = |name: &str| {
        timeline
            .iter()
            .position(|e| e == name)
            .unwrap_or_else(|| panic!("no {name:?} in {timeline:#?}"))
    };
    assert!(at("StepStarted") < at("notice exec-note: raised while the step ran"));
    assert!(at("notice exec-note: raised while the step ran") < at("StepFinished"));
    assert!(at("notice teardown-note: drain") < at("Drained"));
    assert!(at("notice teardown-note: poweroff") < at("PoweredOff"));
    assert!(at("CleanupStarted") < at("notice teardown-note: cleanup"));
    assert!(at("notice teardown-note: cleanup") < at("Cleaned"));

    let planned = f
        .log
        .events(id)
        .find_map(|r| match r.unwrap().event {
            Event::SandboxPlanned { resources, .. } => Some(resources),
            _ => None,
        })
        .unwrap();
    assert_eq!(planned, ["sandbox (named in the runner's handle)"]);
    let sandboxes = f.state.path().join("sandboxes").display().to_string();
    assert!(!planned[0].contains(&sandboxes), "{planned:?}");
    f.log.close();
}

/// The engine calls `cancel` only on a runner that declares it; for one that
/// does not, the cancel is recorded, with a notice that the step is left to end
/// by itself, and the job ends cancelled once it has.
#[test]
fn a_runner_without_the_cancel_capability_is_not_asked_to_cancel() {
    let f = Firehose::new(&[]);
    let (id, outcome) = f.run(&["wait 1500", "notice"], Some(Duration::from_millis(300)));
    assert_eq!(outcome, Outcome::Cancelled);
    let timeline = f.timeline(id);
    let notice = timeline
        .iter()
        .position(|e| e.contains("does not declare `cancel`"))
        .unwrap_or_else(|| panic!("no notice of the missing capability: {timeline:#?}"));
    assert!(timeline.iter().position(|e| e == "CancelRequested") < Some(notice));
    let end = f.log.fold(id).unwrap();
    // The step ran to its own end (exit 0), and no later step started.
    assert_eq!(end.steps.len(), 1, "{timeline:#?}");
    assert_eq!(end.steps[0].exit_code, Some(0));
    f.log.close();
}

/// A job that declares artifacts on a runner that cannot collect them still
/// ends as its steps decide, with a notice saying why nothing was collected:
/// the plugin's table decides (a 1.1 table has no `collect`, whatever its
/// description declares), then the capability.
#[test]
fn a_runner_that_cannot_collect_leaves_a_notice_and_the_job_goes_on() {
    let b = built();
    let spec = |runner: &str| JobSpec {
        runner: runner.into(),
        artifacts: vec!["dist/*.tar.gz".into(), "report.xml".into()],
        ..Firehose::spec(&["1"])
    };
    let cases = [
        (
            Firehose::with_plugin(&b.old_minor, "libreel_fixture_old_minor.so", &[]),
            "old-minor",
            "runner `old-minor` cannot collect artifacts (it was built against plugin ABI 1.1, \
             before `collect`); 2 declared paths not collected",
        ),
        (
            Firehose::new(&[("capabilities", "cancel")]),
            "firehose",
            "runner `firehose` cannot collect artifacts (it does not declare `collect`); 2 \
             declared paths not collected",
        ),
    ];
    for (f, runner, notice) in cases {
        let info = f.ex.plugins().get(runner).unwrap().clone();
        let (id, outcome) = f.run_spec(spec(runner), None);
        assert_eq!(outcome, Outcome::Succeeded, "{runner}");
        let timeline = f.timeline(id);
        let at = |name: &str| {
            timeline
                .iter()
                .position(|e| e == name)
                .unwrap_or_else(|| panic!("no {name:?} in {timeline:#?}"))
        };
        let said = at(&format!("notice {notice}"));
        assert!(
            at("Drained") < said && said < at("PoweredOff"),
            "{timeline:#?}"
        );
        assert!(
            !timeline.iter().any(|e| e == "ArtifactStored"),
            "{timeline:#?}"
        );
        if runner == "old-minor" {
            assert_eq!((info.abi_major, info.abi_minor), (1, 1));
            assert!(info.has(plugin::Capability::Collect), "{info:?}");
        }
        f.log.close();
    }
}

/// A job's `network:` choice is refused, before anything of the job exists, by
/// a runner that cannot honour it: a plugin of ABI 1.1 (which cannot even see
/// the field) by the engine, the process runner (which does not isolate the
/// network) by itself. Without a choice, both take the job.
#[test]
fn a_network_choice_is_refused_by_a_runner_that_cannot_honour_it() {
    let b = built();
    let old = Firehose::with_plugin(&b.old_minor, "libreel_fixture_old_minor.so", &[]);
    let process = {
        let state = tempfile::tempdir().unwrap();
        let log = EventLog::open(state.path(), LogOptions::default()).unwrap();
        let runners = Runners::new(
            plugin::load_dir(&reel_tests::target_dir()),
            state.path().join("sandboxes"),
            Default::default(),
        );
        (Executor::new(log, runners).unwrap(), state)
    };
    let cases = [
        (
            &old.ex,
            "old-minor",
            "the job asks for network: user, but the runner was built against ABI 1.1, which \
             has no network choice (1.3 has)",
        ),
        (
            &process.0,
            "process",
            "network: user: the process runner runs steps in the host's network and can \
             neither cut nor NAT it (runner: qemu can)",
        ),
    ];
    for (ex, runner, says) in cases {
        let spec = JobSpec {
            runner: runner.into(),
            ..Firehose::spec(&["1"])
        };
        assert!(smol::block_on(ex.validate(&spec)).is_ok(), "{runner}");
        for network in [Network::User, Network::None] {
            let asks = JobSpec {
                network,
                ..spec.clone()
            };
            let e = smol::block_on(ex.validate(&asks)).unwrap_err().to_string();
            let says = says.replace("network: user", &format!("network: {}", network.name()));
            assert!(e.contains(&says), "{runner}: {e}");
        }
    }
    old.log.close();
}

/// The per-job cap (here 8 KiB instead of the engine's 1 GiB): the process
/// runner copies in name order and stops before the file that would pass it;
/// what was copied stays, and a notice says where it stopped.
#[test]
fn the_artifact_cap_stops_the_collection_where_it_is_reached() {
    let plugins = reel_tests::target_dir();
    let state = tempfile::tempdir().unwrap();
    let log = EventLog::open(state.path(), LogOptions::default()).unwrap();
    let runners = Runners::new(
        plugin::load_dir(&plugins),
        state.path().join("sandboxes"),
        Default::default(),
    );
    let ex = Executor::new(log.clone(), runners)
        .unwrap()
        .with_artifact_cap(8 << 10);
    let spec = JobSpec {
        name: "capped".into(),
        runner: "process".into(),
        artifacts: vec!["*.bin".into()],
        steps: vec![StepSpec {
            name: "make".into(),
            command: "head -c 4000 /dev/zero > a.bin && head -c 8000 /dev/zero > b.bin && \
                      head -c 100 /dev/zero > c.bin"
                .into(),
            ..StepSpec::default()
        }],
        ..JobSpec::default()
    };
    let outcome = smol::block_on(async {
        let id = log.submit(spec.clone()).await.unwrap();
        log.append(id, Event::Queued {}).await.unwrap();
        ex.run(
            id,
            &spec,
            &ResolvedSecrets::default(),
            &Cancel::default(),
            &Quiet,
        )
        .await
        .unwrap()
    });
    assert_eq!(outcome, Outcome::Succeeded);
    let end = log.fold(1).unwrap();
    let names: Vec<&str> = end.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["a.bin"]);
    assert!(
        end.notices
            .iter()
            .any(|n| n == "artifact cap of 8 KiB reached at b.bin: 1 of 3 artifacts collected"),
        "{:#?}",
        end.notices
    );
    assert_eq!(
        log.artifact_path(1, "a.bin").unwrap(),
        state.path().join("artifacts/1/a.bin")
    );
    assert!(
        log.artifact_path(1, "b.bin").is_err(),
        "a name never stored has no path"
    );
    assert!(log.artifact_path(1, "../1.part/0.part").is_err());
    log.close();
    drop((ex, log));
    let artifacts = reel_tests::stored_artifacts(state.path(), 1);
    assert_eq!(artifacts, [("a.bin".to_owned(), vec![0; 4000])]);
    reel_tests::assert_nothing_left(state.path(), "cap");
}

/// Appends the events of a job the engine died running: its first step started.
fn a_job_left_running(f: &Firehose) -> JobId {
    let handle = reel_engine::model::event::Handle {
        version: 1,
        bytes: vec![],
    };
    smol::block_on(async {
        let id = f.log.submit(Firehose::spec(&["1"])).await.unwrap();
        for event in [
            Event::Queued {},
            Event::SlotGranted {
                charged: Default::default(),
            },
            Event::CidAllocated { cid: 1 },
            Event::SandboxPlanned {
                handle: handle.clone(),
                resources: vec![],
            },
            Event::WorkDirCreated {
                handle: handle.clone(),
            },
            Event::VolumesFormatted { volumes: vec![] },
            Event::BootRequested {},
            Event::VmBooted {
                handle: handle.clone(),
            },
            Event::AgentConnected { handle },
            Event::StepStarted {
                index: 0,
                exec_id: 1,
            },
        ] {
            f.log.append(id, event).await.unwrap();
        }
        id
    })
}

/// Recovery reattaches only with a runner that declares `reattach`, and takes a
/// running step back only with one that also declares `resume`: the fixture's
/// probe says every sandbox is alive and reattachable, and only what it declares
/// decides.
#[test]
fn recovery_reattaches_only_what_the_runner_declares_it_can_take_back() {
    use reel_engine::lifecycle::recover::{Action, assess};
    for (capabilities, expect) in [
        ("cancel", Some("does not declare `reattach`")),
        (
            "reattach",
            Some("does not declare `resume`, so the running step 1"),
        ),
        ("reattach,resume", None),
    ] {
        let f = Firehose::new(&[("capabilities", capabilities)]);
        let id = a_job_left_running(&f);
        let state = f.log.live_state(id).unwrap();
        let a = smol::block_on(assess(f.ex.runners(), &f.log, &state));
        match (expect, &a.action) {
            (None, Action::Reattach { resume_step, .. }) => assert_eq!(*resume_step, Some(0)),
            (Some(why), Action::Reap { reason }) => {
                assert!(reason.contains(why), "{capabilities}: {reason}");
                assert_eq!(a.alive, Some(true));
            }
            (_, other) => panic!("{capabilities}: {other:?} ({})", a.why),
        }
        f.log.close();
    }
}

/// A step timeout that the job's runner does not enforce is a warning when the
/// job is validated, not a silent promise.
#[test]
fn a_step_timeout_a_runner_cannot_enforce_is_a_warning() {
    let f = Firehose::new(&[]);
    let mut spec = Firehose::spec(&["1"]);
    spec.steps[0].timeout_ms = Some(60_000);
    let warnings = smol::block_on(f.ex.validate(&spec)).unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("step 1") && w.contains("does not declare `timeout`")),
        "{warnings:?}"
    );
    let f = Firehose::new(&[("capabilities", "timeout")]);
    assert_eq!(
        smol::block_on(f.ex.validate(&spec)).unwrap(),
        Vec::<String>::new()
    );
    f.log.close();
}

/// `reel plugins --json --plugin-dir DIR`, run as the real binary with stderr piped.
fn reel_plugins(dir: &Path) -> (serde_json::Value, std::process::Output) {
    let state = tempfile::tempdir().unwrap();
    let out = reel_tests::reel(
        state.path(),
        &["plugins", "--json", "--plugin-dir", dir.to_str().unwrap()],
        &[],
    );
    assert!(
        out.status.success(),
        "reel plugins ended with {}: {}",
        out.status,
        reel_tests::text(&out.stderr)
    );
    (reel_tests::json(&out), out)
}

/// A plugin cut short (a partial copy, a full disk) would be mapped by `dlopen`
/// past its end, and the first touch of a missing page kills reel with SIGBUS. It
/// is refused from its ELF headers before `dlopen`, in one line, and the intact
/// plugin beside it still loads and runs a job.
#[test]
fn a_truncated_plugin_is_refused_before_it_is_loaded() {
    let process = reel_tests::target_dir().join("libreel_runner_process.so");
    let whole = std::fs::read(&process).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [("libcut100k.so", 100_000), ("libcut4k.so", 4096)] {
        let path = dir.path().join(name);
        std::fs::write(&path, &whole[..len]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let intact = dir.path().join("libreel_runner_process.so");
    std::fs::write(&intact, &whole).unwrap();
    std::fs::set_permissions(&intact, std::fs::Permissions::from_mode(0o755)).unwrap();

    let (listing, _) = reel_plugins(dir.path());
    let loaded: Vec<&str> = listing["loaded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(loaded, ["process"], "{listing}");
    let refused = listing["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 2, "{listing}");
    for (entry, len) in refused.iter().zip([100_000u64, 4096]) {
        let reason = entry["reason"].as_str().unwrap();
        let prefix = format!("truncated: {len} bytes, segments need ");
        let need: u64 = reason
            .strip_prefix(&prefix)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{reason:?} is not {prefix:?} and a number"));
        assert!(
            need > len && need <= whole.len() as u64,
            "{reason:?}: the segments of a {}-byte library",
            whole.len()
        );
    }

    let state = tempfile::tempdir().unwrap();
    let run = reel_tests::reel(
        state.path(),
        &[
            "run",
            "-q",
            "--plugin-dir",
            dir.path().to_str().unwrap(),
            "examples/hello.yml",
        ],
        &[],
    );
    assert!(
        run.status.success(),
        "reel run ended with {}: {}",
        run.status,
        reel_tests::text(&run.stderr)
    );
}

/// Whoever may write to the plugin directory (or rename one of its ancestors)
/// can put a library of their own in it, whatever the modes of the files: such a
/// directory is refused as a whole, in one line naming it.
#[test]
fn a_plugin_directory_others_may_write_to_is_refused() {
    let b = built();
    for (mode, word) in [
        (0o777, "world-writable"),
        (0o775, "group-writable"),
        (0o1777, "world-writable"),
    ] {
        let dir = plugin_dir(&[(&b.template, "libreel_runner_template.so", 0o644)]);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        let set = plugin::load_dir(dir.path());
        assert_eq!(set.plugins().count(), 0, "mode {mode:o}");
        let refusals = set.refusals();
        assert_eq!(refusals.len(), 1, "mode {mode:o}: {refusals:?}");
        assert_eq!(refusals[0].path, dir.path());
        let reason = &refusals[0].reason;
        assert!(
            reason.contains(word) && reason.contains(&format!("{mode:04o}")),
            "mode {mode:o}: {reason:?}"
        );
    }

    // An ancestor others may write to without the sticky bit lets them swap the
    // whole directory.
    let outer = tempfile::tempdir().unwrap();
    let open = outer.path().join("open");
    let inner = open.join("plugins");
    std::fs::create_dir_all(&inner).unwrap();
    std::fs::copy(&b.template, inner.join("libreel_runner_template.so")).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let set = plugin::load_dir(&inner);
    assert_eq!(set.plugins().count(), 0);
    let reason = &set.refusals()[0].reason;
    assert!(
        reason.contains(&open.display().to_string()) && reason.contains("world-writable"),
        "{reason:?}"
    );
    // With the sticky bit (like /tmp, where these directories live) only the
    // owner may rename what is in it.
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let set = plugin::load_dir(&inner);
    assert_eq!(set.refusals(), &[]);
    assert_eq!(set.plugins().count(), 1);
}

/// reel's own log lines carry no ANSI colour codes when stderr is not a terminal
/// (a CI log, a file, a pipe).
#[test]
fn log_lines_on_a_piped_stderr_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.so"), "not an ELF file\n").unwrap();
    let (_, out) = reel_plugins(dir.path());
    let stderr = reel_tests::text(&out.stderr);
    assert!(stderr.contains("runner plugin refused"), "{stderr:?}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
}

/// A runner written from the guide, through the real engine: a template job
/// whose engine is SIGKILLed while its first step runs is taken back by `reel
/// recover` — the step is not run again (its two lines carry the same pid), its
/// output is whole, the job goes on to its second step and succeeds. The plugin
/// lives only in `--plugin-dir` (or `REEL_PLUGIN_DIR`), which `run`, `recover`
/// and `recover --dry-run` honour; `inspect`, `replay` and the dry run show the
/// resources the template's plan named, not a path the engine guessed.
#[test]
fn a_template_job_is_taken_back_after_its_engine_is_killed() {
    use std::os::unix::process::ExitStatusExt as _;
    use std::process::Stdio;
    use std::time::Instant;

    let b = built();
    let plugins = plugin_dir(&[(&b.template, "libreel_runner_template.so", 0o644)]);
    let pdir = plugins.path().to_str().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let job = state.path().join("resume.yml");
    std::fs::write(
        &job,
        "name: resume\nrunner: template\nsteps:\n  - name: long\n    command: |\n      \
         echo \"begin $$\"\n      sleep 2\n      echo \"end $$\"\n  - name: after\n    \
         command: echo after\n",
    )
    .unwrap();
    let mut child = Command::new(reel_tests::target_dir().join("reel"))
        .arg("--state-dir")
        .arg(state.path())
        .args(["run", "-q", "--plugin-dir", pdir, job.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .env_remove("REEL_PLUGIN_DIR")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out_file = state.path().join("output/1/0.out");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&out_file).map_or(0, |m| m.len()) == 0 {
        assert!(Instant::now() < deadline, "the step never printed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(9));

    let job_dir = format!(
        "job-dir {}",
        state.path().join("sandboxes/template-1-1").display()
    );
    let guessed = state.path().join("sandboxes/1").display().to_string();
    let holds_named = |holds: &serde_json::Value, what: &str| {
        let holds: Vec<&str> = holds
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no list in {holds}"))
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect();
        assert!(holds.contains(&job_dir.as_str()), "{what}: {holds:?}");
        assert!(
            !holds.iter().any(|h| h.contains(&guessed)),
            "{what}: {holds:?}"
        );
    };
    let inspect = reel_tests::json(&reel_tests::reel(
        state.path(),
        &["inspect", "1", "--json"],
        &[],
    ));
    holds_named(&inspect["held_resources"], "inspect");

    let dry = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = vec!["recover", "--dry-run", "--json"];
        all.extend_from_slice(args);
        reel_tests::json(&reel_tests::reel(state.path(), &all, env))
    };
    let by_flag = dry(&["--plugin-dir", pdir], &[]);
    assert_eq!(by_flag[0]["action"], "reattach", "{by_flag}");
    assert_eq!(by_flag[0]["alive"], true, "{by_flag}");
    holds_named(&by_flag[0]["holds"], "recover --dry-run");
    let by_env = dry(&[], &[("REEL_PLUGIN_DIR", pdir)]);
    assert_eq!(by_env[0]["action"], "reattach", "{by_env}");
    let elsewhere = dry(&["--plugin-dir", empty.path().to_str().unwrap()], &[]);
    assert_eq!(elsewhere[0]["action"], "skip", "{elsewhere}");

    let recover = reel_tests::reel(state.path(), &["recover", "--plugin-dir", pdir], &[]);
    assert_eq!(
        recover.status.code(),
        Some(0),
        "{} / {}",
        reel_tests::text(&recover.stdout),
        reel_tests::text(&recover.stderr)
    );
    let names = reel_tests::events(state.path(), 1);
    assert!(names.contains(&"Reattached".to_string()), "{names:?}");
    assert_eq!(
        names.last().map(String::as_str),
        Some("Succeeded"),
        "{names:?}"
    );

    let output = |step: &str| {
        reel_tests::text(
            &reel_tests::reel(state.path(), &["output", "1", "--step", step], &[]).stdout,
        )
    };
    let first = output("1");
    let lines: Vec<&str> = first.lines().collect();
    assert_eq!(lines.len(), 2, "{first:?}");
    let pid = lines[0].strip_prefix("begin ").expect("begin line");
    assert_eq!(
        lines[1],
        format!("end {pid}"),
        "the step ran again: {first:?}"
    );
    assert_eq!(output("2"), "after\n");

    // The record of the intent, as replay shows it at SandboxPlanned.
    let replay = reel_tests::json(&reel_tests::reel(
        state.path(),
        &["replay", "1", "--json"],
        &[],
    ));
    let planned = replay["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "SandboxPlanned")
        .unwrap();
    let seq = planned["seq"].to_string();
    let then = reel_tests::json(&reel_tests::reel(
        state.path(),
        &["replay", "1", "--json", "--at", &seq],
        &[],
    ));
    holds_named(&then["state"]["held_resources"], "replay --at");
    reel_tests::assert_nothing_left(state.path(), "template recovered");
}

/// The manifest the guide gives for a runner in a repository of its own,
/// written out from `plugins/README.md`, builds a copy of the template against
/// copies of the SDK and the ABI outside any workspace (they inherit nothing
/// from reel's), and the `.so` it makes passes the conformance kit, recovery
/// included, through the engine's loader.
#[test]
fn a_copy_of_the_template_builds_outside_the_repository_from_the_guide() {
    let root = workspace_root();
    let guide = std::fs::read_to_string(root.join("plugins/README.md")).unwrap();
    let section = guide
        .split_once("### In your own repository")
        .expect("the guide has its section")
        .1;
    let manifest = section
        .split_once("```toml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("the section has a toml block")
        .0;

    let outside = tempfile::tempdir().unwrap();
    let copy = |from: &str, to: &Path| {
        let status = Command::new("cp")
            .arg("-r")
            .arg(root.join(from))
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success(), "cp {from}");
    };
    let reel = outside.path().join("reel/plugins");
    std::fs::create_dir_all(&reel).unwrap();
    copy("plugins/abi", &reel.join("abi"));
    copy("plugins/sdk", &reel.join("sdk"));
    let mine = outside.path().join("my-runner");
    std::fs::create_dir_all(&mine).unwrap();
    copy("plugins/template/src", &mine.join("src"));
    copy("plugins/template/tests", &mine.join("tests"));
    let manifest = manifest.replace(
        "/path/to/reel/plugins/sdk",
        &reel.join("sdk").display().to_string(),
    );
    std::fs::write(mine.join("Cargo.toml"), manifest).unwrap();
    // The workspace's lock pins the same versions (cargo drops what is unused),
    // so the build needs nothing the registry cache lacks.
    std::fs::copy(root.join("Cargo.lock"), mine.join("Cargo.lock")).unwrap();

    // Shares the fixtures' target directory: the dependencies are built once.
    let target = root.join("target/plugin-tests");
    cargo_build(
        &mine,
        &target,
        &[
            "--offline",
            "--manifest-path",
            mine.join("Cargo.toml").to_str().unwrap(),
        ],
    );
    let dir = plugin_dir(&[(
        &target.join("debug/libmy_runner.so"),
        "libmy_runner.so",
        0o644,
    )]);
    let set = plugin::load_dir(dir.path());
    assert_eq!(set.refusals(), &[]);
    let sandbox = tempfile::tempdir().unwrap();
    let config = config(sandbox.path(), dir.path());
    let new = || -> Result<Arc<dyn reel_plugin_sdk::Runner>, plugin::RunnerError> {
        set.instantiate("template", &config)
            .map(|r| r as Arc<dyn reel_plugin_sdk::Runner>)
            .map_err(|e| plugin::RunnerError::failed(e.to_string()))
    };
    let report = Suite::default()
        .run_with(&new)
        .unwrap_or_else(|v| panic!("the copy built outside: {v}"));
    assert!(report.passed.contains(&"recovery"), "{report:?}");
}
