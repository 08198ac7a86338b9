//! The template passes the SDK's conformance kit in-process, and the kit's
//! recovery check catches the two ways a runner gets recovery wrong.

use std::path::Path;

use reel_plugin_sdk::conformance::{Report, Suite, Violation};
use reel_plugin_sdk::{
    Description, ExecResult, Handle, JobRequest, OutputSink, Probe, Runner, RunnerConfig,
    RunnerError, StepRequest, Stored, Stream,
};
use reel_runner_template::TemplateRunner;

fn config(root: &Path) -> RunnerConfig {
    RunnerConfig {
        sandbox_root: root.to_owned(),
        ..RunnerConfig::default()
    }
}

#[test]
fn template_conforms() {
    let root = tempfile::tempdir().unwrap();
    let report = Suite::default()
        .run_new::<TemplateRunner>(&config(root.path()))
        .unwrap_or_else(|v| panic!("{v}"));
    assert!(report.passed.contains(&"recovery"), "{report:?}");
    assert!(report.passed.contains(&"cleanup"), "{report:?}");
    // The template does not collect artifacts (see its module doc).
    let skipped: Vec<&str> = report.skipped.iter().map(|(check, _)| *check).collect();
    assert_eq!(skipped, ["collect"], "{report:?}");
}

/// How [`Broken`] breaks the contract.
#[derive(Clone, Copy)]
enum Fault {
    /// Runs a step it is asked to resume as a new one (as a runner that keys
    /// steps by anything but their exec id in the sandbox would).
    RerunsOnResume,
    /// Hides the host's answer from the template: output is never refused.
    IgnoresRefusal,
}

/// The template with one fault.
struct Broken {
    inner: TemplateRunner,
    fault: Fault,
}

/// A sink that says every byte is stored, whatever the host says.
struct Deaf<'a>(&'a mut dyn OutputSink);

impl OutputSink for Deaf<'_> {
    fn chunk(&mut self, stream: Stream, offset: u64, bytes: &[u8]) {
        self.0.chunk(stream, offset, bytes);
    }
    fn stored(&self) -> Stored {
        Stored::All
    }
}

impl Runner for Broken {
    fn new(_: &RunnerConfig) -> Result<Self, RunnerError> {
        Err(RunnerError::unsupported("made by `broken`"))
    }
    fn describe(&self) -> Description {
        self.inner.describe()
    }
    fn validate(&self, job: &JobRequest) -> Result<Vec<String>, RunnerError> {
        self.inner.validate(job)
    }
    fn plan(&self, job: &JobRequest) -> Result<Handle, RunnerError> {
        self.inner.plan(job)
    }
    fn prepare(&self, h: &Handle) -> Result<Handle, RunnerError> {
        self.inner.prepare(h)
    }
    fn boot(&self, h: &Handle) -> Result<Handle, RunnerError> {
        self.inner.boot(h)
    }
    fn connect(&self, h: &Handle) -> Result<Handle, RunnerError> {
        self.inner.connect(h)
    }
    fn exec(
        &self,
        h: &Handle,
        step: &StepRequest,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecResult, RunnerError> {
        match self.fault {
            Fault::RerunsOnResume if step.resume_from > 0 => {
                let fresh = StepRequest {
                    exec_id: step.exec_id + 1000,
                    ..step.clone()
                };
                self.inner.exec(h, &fresh, sink)
            }
            Fault::IgnoresRefusal => self.inner.exec(h, step, &mut Deaf(sink)),
            Fault::RerunsOnResume => self.inner.exec(h, step, sink),
        }
    }
    fn cancel(&self, h: &Handle, exec_id: u64) -> Result<(), RunnerError> {
        self.inner.cancel(h, exec_id)
    }
    fn drain(&self, h: &Handle) -> Result<(), RunnerError> {
        self.inner.drain(h)
    }
    fn poweroff(&self, h: &Handle, graceful: bool, deadline_ms: u64) -> Result<(), RunnerError> {
        self.inner.poweroff(h, graceful, deadline_ms)
    }
    fn cleanup(&self, h: &Handle) -> Result<(), RunnerError> {
        self.inner.cleanup(h)
    }
    fn probe(&self, h: &Handle) -> Result<Probe, RunnerError> {
        self.inner.probe(h)
    }
    fn reattach(&self, h: &Handle) -> Result<Handle, RunnerError> {
        self.inner.reattach(h)
    }
}

fn run_broken(fault: Fault) -> (Result<Report, Violation>, tempfile::TempDir) {
    let root = tempfile::tempdir().unwrap();
    let config = config(root.path());
    let result = Suite::default().run_with(&|| {
        Ok(std::sync::Arc::new(Broken {
            inner: TemplateRunner::new(&config)?,
            fault,
        }))
    });
    (result, root)
}

#[test]
fn a_runner_that_runs_a_resumed_step_again_fails_the_recovery_check() {
    let (result, root) = run_broken(Fault::RerunsOnResume);
    let v = result.expect_err("a runner that reruns a resumed step passed");
    assert_eq!(v.check, "recovery", "{v}");
    assert!(v.message.contains("ran again"), "{v}");
    // The suite cleans up after a violation: only the job's planless leftovers
    // could remain, and there are none.
    let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert!(left.is_empty(), "a failed suite left {left:?}");
}

#[test]
fn a_runner_that_ignores_a_refusal_fails_the_recovery_check() {
    let (result, _root) = run_broken(Fault::IgnoresRefusal);
    let v = result.expect_err("a runner that ignores Stored::Refused passed");
    assert_eq!(v.check, "recovery", "{v}");
    assert!(v.message.contains("stored()"), "{v}");
}
