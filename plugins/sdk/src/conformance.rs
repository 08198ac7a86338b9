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
//! and against the built `.so`, through the engine's loader (the engine's
//! `LoadedRunner` implements [`Runner`]; `reel_engine::plugin` loads it):
//!
//! ```text
//! let set = reel_engine::plugin::load_dir(dir);
//! let new = || -> Result<Arc<dyn Runner>, RunnerError> {
//!     set.instantiate("mine", &config)
//!         .map(|r| r as Arc<dyn Runner>)
//!         .map_err(|e| RunnerError::failed(e.to_string()))
//! };
//! Suite::default().run_with(&new)
//! ```
//!
//! (as `tests/all/plugins.rs` does for the template). [`Suite::run_new`] and
//! [`Suite::run_with`] run every check, including **recovery**, which needs a
//! second instance: the suite drops the first one in the middle of a step, as an
//! engine that dies does, and takes the step back with a new one. [`Suite::run`]
//! checks one instance and skips recovery.
//!
//! Checks that need a [`Capability`] the runner does not declare are skipped and
//! listed in [`Report::skipped`].
//!
//! The default steps are `sh` command lines; a runner that does not run `sh` sets its
//! own in [`Suite`].

use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::glue::panic_message;
use crate::types::{
    Capability, CollectRequest, Collected, Description, ErrorKind, Handle, JobRequest, Network,
    OutputSink, Resources, Runner, RunnerConfig, RunnerError, StepRequest, Stored, Stream,
};

/// Makes a new runner instance, as an engine does when it starts.
pub type NewRunner<'a> = &'a dyn Fn() -> Result<Arc<dyn Runner>, RunnerError>;

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
    /// The step the recovery check takes back with a new instance. It must print
    /// `begin <token>` on stdout at once, then, about two seconds later, `middle
    /// <token>` on stderr and `end <token>` on stdout, and exit with
    /// `resumable_exit_code`; `<token>` must differ from one run of the command to
    /// the next (the default prints the shell's pid), so that a runner which runs
    /// it again instead of taking it back is caught.
    pub resumable_command: String,
    /// The exit code of `resumable_command`.
    pub resumable_exit_code: i32,
    /// A step that leaves the files of `artifacts` in the work directory (and
    /// symbolic links that must not be collected), for the `collect` check.
    pub artifacts_command: String,
    /// The patterns the `collect` check asks for: they must match exactly the
    /// files of `artifacts` (the rest match nothing, or must be refused).
    pub artifact_patterns: Vec<String>,
    /// The artifacts `artifact_patterns` must collect, `(name, bytes)` in name
    /// order.
    pub artifacts: Vec<(String, Vec<u8>)>,
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
                cancel_grace_ms: None,
                network: Network::Default,
            },
            output_command: "echo \"out $REEL_CONFORMANCE\"; echo 'err line' >&2".to_owned(),
            expected_stdout: "out job-env".to_owned(),
            expected_stderr: "err line".to_owned(),
            failing_command: "exit 3".to_owned(),
            long_command: "sleep 20".to_owned(),
            resumable_command:
                "echo \"begin $$\"; sleep 2; echo \"middle $$\" >&2; echo \"end $$\"; exit 5"
                    .to_owned(),
            resumable_exit_code: 5,
            artifacts_command: "mkdir -p out/sub && printf alpha > out/a.txt && \
                                printf beta > out/sub/b.txt && printf x > top.log && \
                                ln -sf /etc/hostname out/link && ln -sfn /etc out/etc"
                .to_owned(),
            artifact_patterns: vec![
                "out".to_owned(),
                "*.log".to_owned(),
                "/etc/hostname".to_owned(),
                "../*".to_owned(),
                "missing-*".to_owned(),
            ],
            artifacts: vec![
                ("out/a.txt".to_owned(), b"alpha".to_vec()),
                ("out/sub/b.txt".to_owned(), b"beta".to_vec()),
                ("top.log".to_owned(), b"x".to_vec()),
            ],
            deadline: Duration::from_secs(5),
        }
    }
}

/// The checks that passed, in order, and those skipped.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// One entry per passed check.
    pub passed: Vec<&'static str>,
    /// Checks not run, each with why (a capability the runner does not declare,
    /// or no way to make a second instance).
    pub skipped: Vec<(&'static str, String)>,
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

/// Collects output and checks that offsets are contiguous, as the engine's log
/// does: chunks follow each other without gap or overlap; a resumed exec (one
/// that starts at `start` > 0) may re-send bytes below `start`, which are dropped.
/// It stores every chunk before `chunk` returns, until it is set to refuse.
#[derive(Default)]
struct Collector {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// The `resume_from` of the exec.
    start: u64,
    next_offset: u64,
    gap: Option<String>,
    /// Refuse (answer [`Stored::Refused`]) once this many bytes are stored.
    refuse_after: Option<u64>,
    /// When `stored` first answered `Refused` (a `Cell`: `stored` takes `&self`).
    refused_at: Cell<Option<Instant>>,
    /// Chunks passed after a `Refused` answer.
    after_refusal: usize,
}

impl Collector {
    fn resuming(start: u64) -> Collector {
        Collector {
            start,
            next_offset: start,
            ..Collector::default()
        }
    }

    fn refusing_after(bytes: u64) -> Collector {
        Collector {
            refuse_after: Some(bytes),
            ..Collector::default()
        }
    }

    fn refusing(&self) -> bool {
        self.refuse_after
            .is_some_and(|n| self.next_offset - self.start >= n)
    }
}

impl OutputSink for Collector {
    fn chunk(&mut self, stream: Stream, offset: u64, bytes: &[u8]) {
        if self.refused_at.get().is_some() {
            self.after_refusal += 1;
            return;
        }
        let end = offset + bytes.len() as u64;
        let resent_below_start = offset < self.next_offset && self.next_offset == self.start;
        if self.gap.is_none() && offset != self.next_offset && !resent_below_start {
            self.gap = Some(if offset > self.next_offset {
                format!(
                    "chunk at offset {offset}, expected {}: a gap (offsets count bytes of \
                     both streams)",
                    self.next_offset
                )
            } else {
                format!(
                    "chunk at offset {offset} repeats bytes up to {} that were already passed",
                    self.next_offset
                )
            });
        }
        if end <= self.next_offset {
            return;
        }
        let new = &bytes[(self.next_offset.saturating_sub(offset)) as usize..];
        self.next_offset = end;
        match stream {
            Stream::Stdout => self.stdout.extend_from_slice(new),
            Stream::Stderr => self.stderr.extend_from_slice(new),
        }
    }

    fn stored(&self) -> Stored {
        if self.refused_at.get().is_none() && self.refusing() {
            self.refused_at.set(Some(Instant::now()));
        }
        if self.refused_at.get().is_some() {
            return Stored::Refused;
        }
        Stored::All
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

    /// Creates runners of type `R` from `config` and runs the whole suite on them
    /// (see [`Suite::run_with`]).
    pub fn run_new<R: Runner>(&self, config: &RunnerConfig) -> Result<Report, Violation> {
        self.run_with(&|| R::new(config).map(|r| Arc::new(r) as Arc<dyn Runner>))
    }

    /// Runs the whole suite on instances made by `new`: one for the checks up to
    /// recovery, which drops it in the middle of a step and makes a second one to
    /// take the step back, and that second one for the rest.
    pub fn run_with(&self, new: NewRunner<'_>) -> Result<Report, Violation> {
        let mut report = Report::default();
        let mut current = Some(must("new", "creating an instance", new)?);
        let mut latest = None;
        let result = self.run_checks(&mut current, Some(new), &mut latest, &mut report);
        if result.is_err()
            && let (Some(runner), Some(handle)) = (&current, &latest)
        {
            // Leave nothing running behind a failed suite (best effort).
            let _ = guard(|| runner.cleanup(handle));
        }
        result.map(|()| report)
    }

    /// Runs the suite on one instance, `runner`; the recovery check, which needs a
    /// second instance, is skipped (use [`Suite::run_new`] or [`Suite::run_with`]).
    pub fn run(&self, runner: &dyn Runner) -> Result<Report, Violation> {
        let mut report = Report::default();
        let mut latest = None;
        let result = self
            .check_setup(runner, &mut latest, &mut report)
            .and_then(|plan| {
                report.skipped.push((
                    "recovery",
                    "it needs a second instance: use Suite::run_new or Suite::run_with".to_owned(),
                ));
                self.check_teardown(runner, &plan, &mut latest, &mut report)
            });
        if result.is_err()
            && let Some(handle) = &latest
        {
            let _ = guard(|| runner.cleanup(handle));
        }
        result.map(|()| report)
    }

    /// Every check in order on `current` (which recovery replaces), keeping the
    /// latest handle in `latest`.
    fn run_checks(
        &self,
        current: &mut Option<Arc<dyn Runner>>,
        new: Option<NewRunner<'_>>,
        latest: &mut Option<Handle>,
        report: &mut Report,
    ) -> Result<(), Violation> {
        let Some(runner) = current.clone() else {
            return Ok(());
        };
        let plan = self.check_setup(&*runner, latest, report)?;
        drop(runner);
        if let Some(new) = new {
            self.check_recovery(current, new, latest, report)?;
        }
        let Some(runner) = current.clone() else {
            return Ok(());
        };
        self.check_teardown(&*runner, &plan, latest, report)
    }

    /// describe … timeout: returns the plan handle, and keeps the connected one in
    /// `latest`.
    fn check_setup(
        &self,
        runner: &dyn Runner,
        latest: &mut Option<Handle>,
        report: &mut Report,
    ) -> Result<Handle, Violation> {
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
        if d.has(Capability::Resume) && !d.has(Capability::Reattach) {
            return Err(violation(
                "describe",
                "the runner declares `resume` but not `reattach`: a step can only be taken \
                 back in a sandbox that was reattached",
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

        *latest = Some(plan.clone());
        let handle = must("lifecycle", "prepare", || runner.prepare(&plan))?;
        *latest = Some(handle.clone());
        let handle = must("lifecycle", "boot", || runner.boot(&handle))?;
        *latest = Some(handle.clone());
        let handle = must("lifecycle", "connect", || runner.connect(&handle))?;
        *latest = Some(handle.clone());
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

        self.check_output(runner, &handle, 1)?;
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

        if d.has(Capability::Cancel) {
            self.check_cancel(runner, &handle)?;
            report.passed.push("cancel");
        } else {
            report
                .skipped
                .push(("cancel", undeclared(Capability::Cancel)));
        }

        if d.has(Capability::Timeout) {
            self.check_timeout(runner, &handle)?;
            report.passed.push("timeout");
        } else {
            report
                .skipped
                .push(("timeout", undeclared(Capability::Timeout)));
        }

        if d.has(Capability::Collect) {
            // The files `collect` is asked for after the drain.
            let step = self.step(8, &self.artifacts_command, None);
            let result = must("collect", "exec of the artifacts step", || {
                runner.exec(&handle, &step, &mut Collector::default())
            })?;
            if !result.success() {
                return Err(violation(
                    "collect",
                    format!("`{}` gave {result:?}, expected exit code 0", step.command),
                ));
            }
        }
        Ok(plan)
    }

    /// What an engine restart asks of a runner (see `plugins/README.md`,
    /// "Recovery"): the step's output is refused mid-step (as when the engine's
    /// storage fails: exec must return an error and leave the step running), the
    /// instance is dropped (as when the engine dies), and a new instance must
    /// probe the sandbox alive and reattachable, reattach, and — given the same
    /// `exec_id` and `resume_from` = the bytes stored — take the running step
    /// back: no second run of the command, no gap or duplicate in its output, and
    /// its own exit status. Leaves the new instance in `current` and its handle in
    /// `latest`.
    fn check_recovery(
        &self,
        current: &mut Option<Arc<dyn Runner>>,
        new: NewRunner<'_>,
        latest: &mut Option<Handle>,
        report: &mut Report,
    ) -> Result<(), Violation> {
        const CHECK: &str = "recovery";
        let (Some(first), Some(handle)) = (current.as_deref(), latest.clone()) else {
            return Ok(());
        };
        let d: Description = first.describe();
        if !d.has(Capability::Reattach) {
            report
                .skipped
                .push((CHECK, undeclared(Capability::Reattach)));
            return Ok(());
        }
        let resume = d.has(Capability::Resume);
        let step = self.step(6, &self.resumable_command, None);
        let mut before = Collector::refusing_after(1);
        if resume {
            let result = guard(|| first.exec(&handle, &step, &mut before));
            let returned_at = Instant::now();
            match result {
                Ok(r) if before.refused_at.get().is_none() => {
                    return Err(violation(
                        CHECK,
                        format!(
                            "exec never asked the sink what it stored and returned {r:?}: after \
                             each chunk it must ask `stored()`, and on Stored::Refused stop"
                        ),
                    ));
                }
                Ok(r) => {
                    return Err(violation(
                        CHECK,
                        format!(
                            "exec went on after the host refused its output and returned {r:?}: \
                             on Stored::Refused it must stop following, acknowledge nothing \
                             more and return an error, leaving the step running"
                        ),
                    ));
                }
                Err(e) if e.kind == ErrorKind::Panicked => {
                    return Err(violation(CHECK, format!("exec panicked: {}", e.message)));
                }
                Err(e) if before.refused_at.get().is_none() => {
                    return Err(violation(
                        CHECK,
                        format!(
                            "exec of `{}` returned an error before the host refused anything \
                             (it must pass output and ask `stored()` after each chunk): {e}",
                            step.command
                        ),
                    ));
                }
                Err(_) => {}
            }
            if before.after_refusal > 0 {
                return Err(violation(
                    CHECK,
                    format!(
                        "exec passed {} more chunk(s) after the host answered Stored::Refused",
                        before.after_refusal
                    ),
                ));
            }
            if let Some(at) = before.refused_at.get()
                && returned_at - at > self.deadline
            {
                return Err(violation(
                    CHECK,
                    format!(
                        "exec took {:?} to return after the host refused its output",
                        returned_at - at
                    ),
                ));
            }
        }
        // The engine dies: its runner instance goes with it.
        *current = None;
        let runner = must(CHECK, "creating a second instance", new)?;
        *current = Some(runner.clone());
        let probe = must(CHECK, "probe from a new instance", || runner.probe(&handle))?;
        if !probe.alive || !probe.reattachable {
            return Err(violation(
                CHECK,
                format!(
                    "a new instance's probe of a live sandbox{} says alive: {}, reattachable: \
                     {} ({}); recovery would remove the sandbox and end the job lost",
                    if resume { " with a step running" } else { "" },
                    probe.alive,
                    probe.reattachable,
                    probe.detail
                ),
            ));
        }
        let handle = must(CHECK, "reattach from a new instance", || {
            runner.reattach(&handle)
        })?;
        *latest = Some(handle.clone());
        if !resume {
            report.skipped.push((
                "recovery: resume",
                format!(
                    "{}; only a reattach between steps was checked",
                    undeclared(Capability::Resume)
                ),
            ));
            self.check_output(&*runner, &handle, 6)?;
            report.passed.push(CHECK);
            return Ok(());
        }

        let resumed = StepRequest {
            resume_from: before.next_offset,
            ..step
        };
        let mut after = Collector::resuming(resumed.resume_from);
        let result = must(CHECK, "exec resuming the running step", || {
            runner.exec(&handle, &resumed, &mut after)
        })?;
        if let Some(gap) = after.gap {
            return Err(violation(
                CHECK,
                format!("resuming from byte {}: {gap}", resumed.resume_from),
            ));
        }
        if result.output_bytes != after.next_offset {
            return Err(violation(
                CHECK,
                format!(
                    "the resumed exec says output_bytes {} but its output ends at offset {}",
                    result.output_bytes, after.next_offset
                ),
            ));
        }
        let stdout = String::from_utf8_lossy(&[before.stdout, after.stdout].concat()).into_owned();
        let stderr = String::from_utf8_lossy(&[before.stderr, after.stderr].concat()).into_owned();
        let tokens = |text: &str, word: &str| -> Vec<String> {
            text.lines()
                .filter_map(|l| l.strip_prefix(word))
                .map(|t| t.trim().to_owned())
                .collect()
        };
        let (begins, middles, ends) = (
            tokens(&stdout, "begin "),
            tokens(&stderr, "middle "),
            tokens(&stdout, "end "),
        );
        if begins.len() != 1 || middles.len() != 1 || ends.len() != 1 {
            return Err(violation(
                CHECK,
                format!(
                    "the step's output, before and after it was taken back, is stdout {stdout:?} \
                     and stderr {stderr:?}: expected one `begin`, one `middle` and one `end` \
                     line (a duplicate or a lost line)"
                ),
            ));
        }
        if begins[0] != middles[0] || begins[0] != ends[0] {
            return Err(violation(
                CHECK,
                format!(
                    "the step ran again instead of being taken back: it began as {:?} and \
                     went on as {:?}/{:?} (stdout {stdout:?}, stderr {stderr:?}); exec with an \
                     exec_id the sandbox already runs must follow that run from resume_from",
                    begins[0], middles[0], ends[0]
                ),
            ));
        }
        if result.exit_code != Some(self.resumable_exit_code) || result.signal.is_some() {
            return Err(violation(
                CHECK,
                format!(
                    "the step that was taken back gave {result:?}, expected its own exit code {}",
                    self.resumable_exit_code
                ),
            ));
        }
        report.passed.push(CHECK);
        Ok(())
    }

    /// drain, poweroff, cleanup, probe after cleanup, malformed handles.
    fn check_teardown(
        &self,
        runner: &dyn Runner,
        plan: &Handle,
        latest: &mut Option<Handle>,
        report: &mut Report,
    ) -> Result<(), Violation> {
        let Some(handle) = latest.clone() else {
            return Ok(());
        };
        let handle = &handle;
        must("shutdown", "drain", || runner.drain(handle))?;
        if runner.describe().has(Capability::Collect) {
            self.check_collect(runner, handle)?;
            report.passed.push("collect");
        } else {
            report
                .skipped
                .push(("collect", undeclared(Capability::Collect)));
        }
        let deadline_ms = self.deadline.as_millis() as u64;
        let start = Instant::now();
        must("shutdown", "poweroff", || {
            runner.poweroff(handle, true, deadline_ms)
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

        must("cleanup", "cleanup", || runner.cleanup(handle))?;
        must(
            "cleanup",
            "a second cleanup (cleanup must be idempotent)",
            || runner.cleanup(handle),
        )?;
        must("cleanup", "cleanup from the plan handle", || {
            runner.cleanup(plan)
        })?;
        let probe = must("cleanup", "probe after cleanup", || runner.probe(handle))?;
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
        Ok(())
    }

    fn check_output(
        &self,
        runner: &dyn Runner,
        handle: &Handle,
        exec_id: u64,
    ) -> Result<(), Violation> {
        const CHECK: &str = "exec output";
        let step = self.step(exec_id, &self.output_command, None);
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

    /// `collect` after the drain: every file the patterns match and nothing else
    /// (no symbolic link followed, refused patterns refused, not failed), whole,
    /// with its size and CRC-32C, nothing left in the partial directory; then
    /// again with one name already stored and a cap the third file passes.
    fn check_collect(&self, runner: &dyn Runner, handle: &Handle) -> Result<(), Violation> {
        const CHECK: &str = "collect";
        let root = std::env::temp_dir().join(format!(
            "reel-conformance-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let result = self.collect_twice(runner, handle, &root);
        let _ = std::fs::remove_dir_all(&root);
        result.map_err(|m| violation(CHECK, m))
    }

    fn collect_twice(
        &self,
        runner: &dyn Runner,
        handle: &Handle,
        root: &Path,
    ) -> Result<(), String> {
        let request = |run: &str, max_total_bytes, already: Vec<String>| {
            let req = CollectRequest {
                patterns: self.artifact_patterns.clone(),
                dest_dir: root.join(run).join("dest"),
                partial_dir: root.join(run).join("partial"),
                max_total_bytes,
                already,
            };
            std::fs::create_dir_all(&req.dest_dir)
                .and_then(|()| std::fs::create_dir_all(&req.partial_dir))
                .map(|()| req)
                .map_err(|e| format!("cannot create the test's directories: {e}"))
        };
        let expect = |want: &[(String, Vec<u8>)]| -> Vec<Collected> {
            want.iter()
                .map(|(name, bytes)| Collected {
                    name: name.clone(),
                    size: bytes.len() as u64,
                    crc32c: crc32c::crc32c(bytes),
                })
                .collect()
        };
        let total = self.artifacts.len() as u64;

        let req = request("all", u64::MAX, Vec::new())?;
        let got = guard(|| runner.collect(handle, &req))
            .map_err(|e| format!("collect returned an error: {e}"))?;
        if got.collected != expect(&self.artifacts) {
            return Err(format!(
                "collect of {:?} copied {:?}, expected {:?} (in name order; symbolic links                  are not followed, absolute and `..` patterns are refused)",
                self.artifact_patterns,
                got.collected,
                expect(&self.artifacts)
            ));
        }
        if got.matched != total || got.cap_reached_at.is_some() {
            return Err(format!(
                "collect says {} files matched (expected {total}) and cap_reached_at {:?}                  (expected none)",
                got.matched, got.cap_reached_at
            ));
        }
        check_dir(&req, &self.artifacts)?;

        // An earlier collection stored the first file; the cap lets the second
        // one through and stops at the third.
        let (first, rest) = self
            .artifacts
            .split_first()
            .ok_or("no artifacts to check")?;
        let Some((second, third)) = rest.first().zip(rest.get(1)) else {
            return Err("the check needs three artifacts".to_owned());
        };
        let cap = (first.1.len() + second.1.len()) as u64;
        let req = request("capped", cap, vec![first.0.clone()])?;
        let got = guard(|| runner.collect(handle, &req))
            .map_err(|e| format!("collect with a cap returned an error: {e}"))?;
        if got.collected != expect(std::slice::from_ref(second))
            || got.cap_reached_at.as_deref() != Some(third.0.as_str())
            || got.matched != total
        {
            return Err(format!(
                "with {:?} already stored and a cap of {cap} bytes, collect gave {got:?}:                  expected only {:?} copied, cap_reached_at {:?} and {total} matched (names                  in `already` are not copied again but count against the cap)",
                first.0, second.0, third.0
            ));
        }
        check_dir(&req, std::slice::from_ref(second))
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

/// Whether `req.dest_dir` holds exactly `want` (relative names and bytes) and
/// `req.partial_dir` nothing.
fn check_dir(req: &CollectRequest, want: &[(String, Vec<u8>)]) -> Result<(), String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, Vec<u8>)>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                walk(&path, base, out)?;
            } else {
                let name = path.strip_prefix(base).unwrap_or(&path);
                out.push((name.to_string_lossy().into_owned(), std::fs::read(&path)?));
            }
        }
        Ok(())
    }
    let mut found = Vec::new();
    walk(&req.dest_dir, &req.dest_dir, &mut found).map_err(|e| e.to_string())?;
    found.sort();
    if found != want {
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        return Err(format!(
            "the destination directory holds {names:?} (or other bytes) after collect,              expected exactly the collected files"
        ));
    }
    let mut partial = Vec::new();
    walk(&req.partial_dir, &req.partial_dir, &mut partial).map_err(|e| e.to_string())?;
    if !partial.is_empty() {
        return Err(format!(
            "partial copies were left in the partial directory: {:?}",
            partial.iter().map(|(n, _)| n).collect::<Vec<_>>()
        ));
    }
    Ok(())
}

/// Why a check that needs `capability` was skipped.
fn undeclared(capability: Capability) -> String {
    format!("the runner does not declare the `{capability}` capability")
}

/// Runs the default suite on `runner` and panics with the violation, for tests.
pub fn assert_conforms(runner: &dyn Runner) -> Report {
    match Suite::default().run(runner) {
        Ok(report) => report,
        Err(v) => panic!("{v}"),
    }
}
