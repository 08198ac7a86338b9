//! The conformance kit: runs a runner through the contract of [`Runner`] and reports
//! the first violation in a sentence.
//!
//! A plugin author calls it from their own test, in-process:
//!
//! ```text
//! #[test]
//! fn conforms() {
//!     let root = tempfile::tempdir().unwrap();
//!     let config = RunnerConfig { sandbox_root: root.path().into(), ..Default::default() };
//!     reel_plugin_sdk::conformance::Suite::default().run_new::<MyRunner>(&config).unwrap();
//! }
//! ```
//!
//! The engine's tests run the same suite against the loaded cdylib (anything that
//! implements [`Runner`], including the engine's `LoadedRunner`, can be checked).
//!
//! The default steps are `sh` command lines; a runner that does not run `sh` sets its
//! own in [`Suite`].

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use crate::glue::panic_message;
use crate::types::{
    ErrorKind, Handle, JobRequest, OutputSink, Resources, Runner, RunnerConfig, RunnerError,
    StepRequest, Stream,
};

/// The job and steps the suite runs, and how long it waits for the runner.
#[derive(Clone, Debug)]
pub struct Suite {
    /// The job to plan and run.
    pub job: JobRequest,
    /// A step that succeeds and writes to both streams.
    pub output_command: String,
    /// Text the output step must write to stdout (it uses the job's environment).
    pub expected_stdout: String,
    /// Text the output step must write to stderr.
    pub expected_stderr: String,
    /// A step that exits with code 3.
    pub failing_command: String,
    /// A step that runs far longer than `deadline`, to cancel and to time out.
    pub long_command: String,
    /// How long cancel, timeout and poweroff may take to return.
    pub deadline: Duration,
}

impl Default for Suite {
    fn default() -> Suite {
        Suite {
            job: JobRequest {
                job_id: 4242,
                sandbox_id: 7,
                name: "conformance".to_owned(),
                image: None,
                resources: Resources {
                    memory_mib: 256,
                    vcpus: 1,
                    disk_mib: 256,
                },
                environment: BTreeMap::from([(
                    "REEL_CONFORMANCE".to_owned(),
                    "job-env".to_owned(),
                )]),
            },
            output_command: "echo \"out $REEL_CONFORMANCE\"; echo 'err line' >&2".to_owned(),
            expected_stdout: "out job-env".to_owned(),
            expected_stderr: "err line".to_owned(),
            failing_command: "exit 3".to_owned(),
            long_command: "sleep 20".to_owned(),
            deadline: Duration::from_secs(5),
        }
    }
}

/// The checks that passed, in order.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// One entry per passed check.
    pub passed: Vec<&'static str>,
}

/// The first broken promise.
#[derive(Clone, Debug, thiserror::Error)]
#[error("conformance check `{check}` failed: {message}")]
pub struct Violation {
    /// The check's name.
    pub check: &'static str,
    /// What the runner did wrong.
    pub message: String,
}

fn violation(check: &'static str, message: impl Into<String>) -> Violation {
    Violation {
        check,
        message: message.into(),
    }
}

/// Calls `f`, turning an in-process panic into a `Panicked` error so that panics
/// read the same in-process and through the ABI.
fn guard<T>(f: impl FnOnce() -> Result<T, RunnerError>) -> Result<T, RunnerError> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|payload| Err(RunnerError::panicked(panic_message(&*payload))))
}

/// Calls an operation that must succeed.
fn must<T>(
    check: &'static str,
    what: &str,
    f: impl FnOnce() -> Result<T, RunnerError>,
) -> Result<T, Violation> {
    guard(f).map_err(|e| violation(check, format!("{what} returned an error: {e}")))
}

/// Collects output and checks that offsets are contiguous.
#[derive(Default)]
struct Collector {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    next_offset: u64,
    gap: Option<String>,
}

impl OutputSink for Collector {
    fn chunk(&mut self, stream: Stream, offset: u64, bytes: &[u8]) {
        if offset != self.next_offset && self.gap.is_none() {
            self.gap = Some(format!(
                "chunk at offset {offset}, expected {} (offsets count bytes of both streams)",
                self.next_offset
            ));
        }
        self.next_offset = offset + bytes.len() as u64;
        match stream {
            Stream::Stdout => self.stdout.extend_from_slice(bytes),
            Stream::Stderr => self.stderr.extend_from_slice(bytes),
        }
    }
}

impl Suite {
    fn step(&self, exec_id: u64, command: &str, timeout_ms: Option<u64>) -> StepRequest {
        StepRequest {
            exec_id,
            index: exec_id as u32,
            name: format!("conformance-{exec_id}"),
            command: command.to_owned(),
            environment: BTreeMap::new(),
            timeout_ms,
            resume_from: 0,
        }
    }

    /// Creates a runner of type `R` from `config` and runs the suite on it.
    pub fn run_new<R: Runner>(&self, config: &RunnerConfig) -> Result<Report, Violation> {
        let runner = must("new", "new", || R::new(config))?;
        self.run(&runner)
    }

    /// Runs the suite on `runner`.
    pub fn run(&self, runner: &dyn Runner) -> Result<Report, Violation> {
        let mut report = Report::default();
        let job = &self.job;

        let d = must("describe", "describe", || Ok(runner.describe()))?;
        if d.name.is_empty() {
            return Err(violation("describe", "the description has an empty name"));
        }
        if d.abi_major != reel_plugin_abi::ABI_MAJOR {
            return Err(violation(
                "describe",
                format!(
                    "describe says ABI major {}, the SDK is {}",
                    d.abi_major,
                    reel_plugin_abi::ABI_MAJOR
                ),
            ));
        }
        report.passed.push("describe");

        must("validate", "validate", || runner.validate(job))?;
        report.passed.push("validate");

        let plan = must("plan", "plan", || runner.plan(job))?;
        let again = must("plan", "a second plan of the same job", || runner.plan(job))?;
        if plan != again {
            return Err(violation(
                "plan",
                "planning the same job twice gave different handles; plan must be deterministic",
            ));
        }
        let probe = must("plan", "probe of a planned job", || runner.probe(&plan))?;
        if probe.alive {
            return Err(violation(
                "plan",
                format!(
                    "probe says a job that was only planned is alive ({})",
                    probe.detail
                ),
            ));
        }
        must("plan", "cleanup of a job that was only planned", || {
            runner.cleanup(&plan)
        })?;
        report.passed.push("plan");

        let handle = must("lifecycle", "prepare", || runner.prepare(&plan))?;
        let handle = must("lifecycle", "boot", || runner.boot(&handle))?;
        let handle = must("lifecycle", "connect", || runner.connect(&handle))?;
        let probe = must("lifecycle", "probe of a connected job", || {
            runner.probe(&handle)
        })?;
        if !probe.alive {
            return Err(violation(
                "lifecycle",
                format!("probe says a connected job is not alive ({})", probe.detail),
            ));
        }
        report.passed.push("lifecycle");

        self.check_output(runner, &handle)?;
        report.passed.push("exec output");

        let step = self.step(2, &self.failing_command, None);
        let result = must("exec exit code", "exec of the failing step", || {
            runner.exec(&handle, &step, &mut Collector::default())
        })?;
        if result.exit_code != Some(3) {
            return Err(violation(
                "exec exit code",
                format!("`{}` gave {result:?}, expected exit code 3", step.command),
            ));
        }
        report.passed.push("exec exit code");

        self.check_cancel(runner, &handle)?;
        report.passed.push("cancel");

        self.check_timeout(runner, &handle)?;
        report.passed.push("timeout");

        must("shutdown", "drain", || runner.drain(&handle))?;
        let deadline_ms = self.deadline.as_millis() as u64;
        let start = Instant::now();
        must("shutdown", "poweroff", || {
            runner.poweroff(&handle, true, deadline_ms)
        })?;
        if start.elapsed() > self.deadline + Duration::from_secs(1) {
            return Err(violation(
                "shutdown",
                format!(
                    "poweroff took {:?}, past its deadline of {deadline_ms} ms",
                    start.elapsed()
                ),
            ));
        }
        report.passed.push("shutdown");

        must("cleanup", "cleanup", || runner.cleanup(&handle))?;
        must(
            "cleanup",
            "a second cleanup (cleanup must be idempotent)",
            || runner.cleanup(&handle),
        )?;
        must("cleanup", "cleanup from the plan handle", || {
            runner.cleanup(&plan)
        })?;
        let probe = must("cleanup", "probe after cleanup", || runner.probe(&handle))?;
        if probe.alive {
            return Err(violation(
                "cleanup",
                format!(
                    "probe says the job is alive after cleanup ({})",
                    probe.detail
                ),
            ));
        }
        report.passed.push("cleanup");

        self.check_malformed(runner)?;
        report.passed.push("malformed handle");
        Ok(report)
    }

    fn check_output(&self, runner: &dyn Runner, handle: &Handle) -> Result<(), Violation> {
        const CHECK: &str = "exec output";
        let step = self.step(1, &self.output_command, None);
        let mut out = Collector::default();
        let result = must(CHECK, "exec of the output step", || {
            runner.exec(handle, &step, &mut out)
        })?;
        if !result.success() {
            return Err(violation(
                CHECK,
                format!("`{}` gave {result:?}, expected exit code 0", step.command),
            ));
        }
        if let Some(gap) = out.gap {
            return Err(violation(CHECK, gap));
        }
        if result.output_bytes != out.next_offset {
            return Err(violation(
                CHECK,
                format!(
                    "output_bytes is {} but the chunks end at offset {}",
                    result.output_bytes, out.next_offset
                ),
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stdout.contains(&self.expected_stdout) {
            return Err(violation(
                CHECK,
                format!(
                    "stdout {stdout:?} does not contain {:?}",
                    self.expected_stdout
                ),
            ));
        }
        if !stderr.contains(&self.expected_stderr) {
            return Err(violation(
                CHECK,
                format!(
                    "stderr {stderr:?} does not contain {:?}",
                    self.expected_stderr
                ),
            ));
        }
        Ok(())
    }

    fn check_cancel(&self, runner: &dyn Runner, handle: &Handle) -> Result<(), Violation> {
        const CHECK: &str = "cancel";
        must(CHECK, "cancel of an exec id that is not running", || {
            runner.cancel(handle, 999_999)
        })?;
        let step = self.step(4, &self.long_command, None);
        let (result, waited) = std::thread::scope(|scope| {
            let exec =
                scope.spawn(|| guard(|| runner.exec(handle, &step, &mut Collector::default())));
            std::thread::sleep(Duration::from_millis(300));
            let cancelled_at = Instant::now();
            let cancel = guard(|| runner.cancel(handle, step.exec_id));
            let result = exec
                .join()
                .unwrap_or_else(|payload| Err(RunnerError::panicked(panic_message(&*payload))));
            (cancel.and(result), cancelled_at.elapsed())
        });
        let result = result.map_err(|e| {
            violation(
                CHECK,
                format!("cancel or the cancelled exec returned an error: {e}"),
            )
        })?;
        if result.success() {
            return Err(violation(
                CHECK,
                format!("a cancelled exec reported success: {result:?}"),
            ));
        }
        if waited > self.deadline {
            return Err(violation(
                CHECK,
                format!(
                    "exec returned {waited:?} after cancel, past the {:?} deadline",
                    self.deadline
                ),
            ));
        }
        Ok(())
    }

    fn check_timeout(&self, runner: &dyn Runner, handle: &Handle) -> Result<(), Violation> {
        const CHECK: &str = "timeout";
        let step = self.step(5, &self.long_command, Some(300));
        let start = Instant::now();
        let result = must(CHECK, "exec with a 300 ms timeout", || {
            runner.exec(handle, &step, &mut Collector::default())
        })?;
        if !result.timed_out || result.success() {
            return Err(violation(
                CHECK,
                format!("a step past its timeout gave {result:?}, expected timed_out"),
            ));
        }
        if start.elapsed() > self.deadline {
            return Err(violation(
                CHECK,
                format!(
                    "a 300 ms timeout took {:?} to end the step",
                    start.elapsed()
                ),
            ));
        }
        Ok(())
    }

    fn check_malformed(&self, runner: &dyn Runner) -> Result<(), Violation> {
        const CHECK: &str = "malformed handle";
        let bad = Handle {
            version: u32::MAX,
            bytes: vec![0xff; 7],
        };
        match guard(|| runner.prepare(&bad)) {
            Ok(_) => return Err(violation(CHECK, "prepare accepted a malformed handle")),
            Err(e) if e.kind == ErrorKind::Panicked => {
                return Err(violation(
                    CHECK,
                    format!("prepare panicked on a malformed handle: {}", e.message),
                ));
            }
            Err(_) => {}
        }
        match guard(|| runner.probe(&bad)) {
            Ok(p) if p.alive => {
                return Err(violation(CHECK, "probe says a malformed handle is alive"));
            }
            Err(e) if e.kind == ErrorKind::Panicked => {
                return Err(violation(
                    CHECK,
                    format!("probe panicked on a malformed handle: {}", e.message),
                ));
            }
            _ => {}
        }
        if let Err(e) = guard(|| runner.cleanup(&bad))
            && e.kind == ErrorKind::Panicked
        {
            return Err(violation(
                CHECK,
                format!("cleanup panicked on a malformed handle: {}", e.message),
            ));
        }
        Ok(())
    }
}

/// Runs the default suite on `runner` and panics with the violation, for tests.
pub fn assert_conforms(runner: &dyn Runner) -> Report {
    match Suite::default().run(runner) {
        Ok(report) => report,
        Err(v) => panic!("{v}"),
    }
}
