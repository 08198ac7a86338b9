//! The executor: drives a job through its lifecycle with a runner, appending
//! every event durably before the effect it announces.
//!
//! For each job, in order (each line: the event made durable, then the call):
//!
//! ```text
//! Queued, SlotGranted            (the caller's scheduler decides when)
//! CidAllocated{cid}              lease a sandbox id (never one a live job holds)
//! SandboxPlanned{handle}         runner.plan  — the intent: names every resource
//! WorkDirCreated{handle}         after runner.prepare
//! VolumesFormatted               (the process runner formats none)
//! BootRequested                  then runner.boot
//! VmBooted{handle}               after boot
//! AgentConnected{handle}         after runner.connect
//! StepStarted / StepFinished     around runner.exec, output stored as it streams
//! TeardownStarted{outcome}       the decision, with the outcome it will end with
//! Drained                        runner.drain
//! ArtifactStored{name}*          runner.collect, each copy checked and synced first
//! PoweredOff                     runner.poweroff
//! CleanupStarted, Cleaned        runner.cleanup (idempotent)
//! Succeeded | Failed | Cancelled | TimedOut
//! ```
//!
//! A failure at any stage records `TeardownStarted` with the outcome and then
//! tears down only what the log says exists. If cleanup itself fails, the job
//! stays live in the log (it never claims `Cleaned`), so `reel recover` can
//! finish it.
//!
//! Runner calls run on the `blocking` pool: no plugin call stalls the executor.
//! Step output is masked for secrets and made durable chunk by chunk *before*
//! the runner's sink returns, so the agent is only ever told to drop output the
//! log already holds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::observer::{Cancel, Observer, Report};
use crate::input::secrets::ResolvedSecrets;
use crate::model::event::{Event, Handle, JobId, Outcome};
use crate::model::spec::JobSpec;
use crate::model::state::Phase;
use crate::plugin::{self, LoadedRunner, PluginSet, RunnerConfig, RunnerError};
use crate::store::{EventLog, LogError};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Why the executor could not run a job at all.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The log refused or failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The job names a runner that is not loaded.
    #[error("job {job}: {source}")]
    Runner {
        /// The job.
        job: JobId,
        /// Why.
        #[source]
        source: plugin::PluginError,
    },
    /// The runner refuses the job's spec.
    #[error("runner `{runner}` refuses the job: {source}")]
    Refused {
        /// The runner.
        runner: String,
        /// Its reason.
        source: RunnerError,
    },
    /// Cleanup failed; the job stays live for `reel recover`.
    #[error("job {job}: cleanup failed, the job stays unfinished for `reel recover`: {source}")]
    CleanupFailed {
        /// The job.
        job: JobId,
        /// The runner's error.
        source: RunnerError,
    },
}

/// The runner instances of an engine: one per plugin, created on first use.
pub struct Runners {
    plugins: PluginSet,
    config: RunnerConfig,
    instances: Mutex<HashMap<String, Arc<LoadedRunner>>>,
}

impl std::fmt::Debug for Runners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runners")
            .field("sandbox_root", &self.config.sandbox_root)
            .finish()
    }
}

impl Runners {
    /// Runners from `plugins`, keeping sandboxes under `sandbox_root`.
    pub fn new(
        plugins: PluginSet,
        sandbox_root: PathBuf,
        options: BTreeMap<String, String>,
    ) -> Runners {
        let config = RunnerConfig {
            sandbox_root,
            plugin_dir: plugins.dir().to_path_buf(),
            options,
        };
        Runners {
            plugins,
            config,
            instances: Mutex::new(HashMap::new()),
        }
    }

    /// The loaded plugins.
    pub fn plugins(&self) -> &PluginSet {
        &self.plugins
    }

    /// Where sandboxes are kept.
    pub fn sandbox_root(&self) -> &Path {
        &self.config.sandbox_root
    }

    /// The runner instance for `name`, created on first use.
    pub fn get(&self, name: &str) -> Result<Arc<LoadedRunner>, plugin::PluginError> {
        let mut instances = lock(&self.instances);
        if let Some(r) = instances.get(name) {
            return Ok(r.clone());
        }
        let r = self.plugins.instantiate(name, &self.config)?;
        instances.insert(name.to_string(), r.clone());
        Ok(r)
    }
}

/// The engine side of running jobs: the log, the runners and the lease table.
pub struct Executor {
    log: EventLog,
    runners: Runners,
    /// Sandbox ids held by live jobs (ours and any a dead engine left).
    leases: Mutex<BTreeSet<u32>>,
    /// The most bytes one job's artifacts may take.
    artifact_cap: u64,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("runners", &self.runners)
            .finish()
    }
}

pub(crate) fn to_sdk(h: &Handle) -> plugin::Handle {
    plugin::Handle {
        version: h.version,
        bytes: h.bytes.clone(),
    }
}

pub(crate) fn from_sdk(h: plugin::Handle) -> Handle {
    Handle {
        version: h.version,
        bytes: h.bytes,
    }
}

/// The runner's error, as a reason sentence.
pub(super) fn runner_reason(stage: &str, e: &RunnerError) -> String {
    format!("{stage} failed: {e}")
}

impl Executor {
    /// An executor over `log` with `runners`. Every sandbox id a live job holds
    /// (including jobs of an engine that died) stays reserved.
    pub fn new(log: EventLog, runners: Runners) -> Result<Executor, LogError> {
        let mut leases = BTreeSet::new();
        for job in log.live_jobs()? {
            if let Some(cid) = log.live_with(job, |s| s.cid).flatten() {
                leases.insert(cid);
            }
        }
        // A job set aside (its history unreadable) may still hold a sandbox.
        leases.extend(log.set_aside().values().filter_map(|s| s.cid));
        Ok(Executor {
            log,
            runners,
            leases: Mutex::new(leases),
            artifact_cap: crate::store::artifacts::MAX_ARTIFACT_BYTES,
        })
    }

    /// This executor with another cap on each job's artifacts than
    /// [`MAX_ARTIFACT_BYTES`](crate::store::artifacts::MAX_ARTIFACT_BYTES).
    pub fn with_artifact_cap(mut self, bytes: u64) -> Executor {
        self.artifact_cap = bytes;
        self
    }

    /// The most bytes one job's artifacts may take.
    pub fn artifact_cap(&self) -> u64 {
        self.artifact_cap
    }

    /// The log.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// The runners.
    pub fn runners(&self) -> &Runners {
        &self.runners
    }

    /// The loaded plugins.
    pub fn plugins(&self) -> &PluginSet {
        self.runners.plugins()
    }

    /// The runner instance for `name`, created on first use.
    pub fn runner(&self, name: &str) -> Result<Arc<LoadedRunner>, plugin::PluginError> {
        self.runners.get(name)
    }

    /// The job request a runner sees for `spec`.
    pub fn job_request(job: JobId, cid: u32, spec: &JobSpec) -> plugin::JobRequest {
        plugin::JobRequest {
            job_id: job,
            sandbox_id: cid,
            name: spec.name.clone(),
            image: spec.image.clone(),
            resources: plugin::Resources {
                memory_mib: spec.resources.memory_mib,
                vcpus: spec.resources.vcpus,
                disk_mib: spec.resources.disk_mib,
            },
            environment: spec.environment.clone(),
            cancel_grace_ms: spec.cancel_grace_ms,
            network: spec.network,
        }
    }

    /// Runner warnings for fields of `spec` it cannot honour.
    pub async fn validate(&self, spec: &JobSpec) -> Result<Vec<String>, ExecError> {
        let runner = self
            .runner(&spec.runner)
            .map_err(|source| ExecError::Runner { job: 0, source })?;
        let req = Executor::job_request(0, 0, spec);
        let mut warnings = runner
            .unblock(move |r| r.validate(&req))
            .await
            .map_err(|source| ExecError::Refused {
                runner: spec.runner.clone(),
                source,
            })?;
        if !runner.has(plugin::Capability::Timeout) {
            for (i, step) in spec.steps.iter().enumerate() {
                if let Some(ms) = step.timeout_ms {
                    warnings.push(format!(
                        "step {} {:?} has a timeout of {}, but runner `{}` does not enforce step \
                         timeouts (it does not declare `timeout`): the step may run past it",
                        i + 1,
                        step.name,
                        fmt_ms(ms),
                        spec.runner
                    ));
                }
            }
        }
        Ok(warnings)
    }

    pub(crate) fn lease(&self) -> u32 {
        let mut leases = lock(&self.leases);
        let cid = (1..).find(|c| !leases.contains(c)).unwrap_or(u32::MAX);
        leases.insert(cid);
        cid
    }

    pub(crate) fn release(&self, cid: u32) {
        lock(&self.leases).remove(&cid);
    }

    /// Ends a job that never got a sandbox (cancelled while queued).
    pub async fn end_unstarted(
        &self,
        job: JobId,
        outcome: Outcome,
        reason: &str,
    ) -> Result<(), LogError> {
        let asked = self
            .log
            .live_with(job, |s| s.cancel_requested.is_some())
            .unwrap_or(false);
        if outcome == Outcome::Cancelled && !asked {
            self.log
                .append(
                    job,
                    Event::CancelRequested {
                        reason: reason.to_string(),
                    },
                )
                .await?;
        }
        self.log
            .append(
                job,
                Event::TeardownStarted {
                    outcome,
                    reason: reason.to_string(),
                },
            )
            .await?;
        self.log
            .append(job, Event::terminal(outcome, reason.to_string()))
            .await?;
        Ok(())
    }

    /// Runs a queued job (its `SlotGranted` is appended here) to its end.
    /// Returns the outcome once the terminal event is durable.
    pub async fn run(
        &self,
        job: JobId,
        spec: &JobSpec,
        secrets: &ResolvedSecrets,
        cancel: &Cancel,
        observer: &dyn Observer,
    ) -> Result<Outcome, ExecError> {
        let started = Instant::now();
        let deadline = spec
            .timeout_ms
            .map(|ms| started + Duration::from_millis(ms));
        let phase = self
            .log
            .live_with(job, |s| s.phase)
            .unwrap_or(Phase::Queued);
        let mut run = JobRun {
            ex: self,
            job,
            spec,
            observer,
            cancel,
            handle: None,
            phase,
            cid: None,
        };
        let decided = match run.setup(deadline).await {
            Ok(None) => run.run_steps(secrets, deadline, None).await,
            Ok(Some(stop)) => Ok(stop),
            Err(e) => Err(e),
        };
        let (outcome, reason) = match decided {
            Ok(x) => x,
            Err(Abort::Log(e)) => return Err(e.into()),
            Err(Abort::Runner(e)) => return Err(e),
        };
        run.start_teardown(outcome, &reason).await?;
        observer.report(Report::Finished {
            job,
            outcome,
            reason: &reason,
            duration: started.elapsed(),
        });
        Ok(outcome)
    }
}

/// A step that was running when the engine died and that a reattached sandbox
/// still runs: resume its output at `from` (the bytes the log holds).
#[derive(Clone, Debug)]
pub(crate) struct Resume {
    pub index: u32,
    pub exec_id: u64,
    pub from: u64,
}

/// Why a run stopped without deciding an outcome.
pub(crate) enum Abort {
    Log(LogError),
    Runner(ExecError),
}

impl From<LogError> for Abort {
    fn from(e: LogError) -> Self {
        Abort::Log(e)
    }
}

impl From<Abort> for ExecError {
    fn from(a: Abort) -> Self {
        match a {
            Abort::Log(e) => e.into(),
            Abort::Runner(e) => e,
        }
    }
}

/// One job's run: where it is, and what it holds.
pub(crate) struct JobRun<'a> {
    pub ex: &'a Executor,
    pub job: JobId,
    pub spec: &'a JobSpec,
    pub observer: &'a dyn Observer,
    pub cancel: &'a Cancel,
    pub handle: Option<Handle>,
    pub phase: Phase,
    pub cid: Option<u32>,
}

impl JobRun<'_> {
    pub(crate) async fn append(&mut self, event: Event) -> Result<(), LogError> {
        self.ex.log.append(self.job, event).await?;
        if let Some(phase) = self.ex.log.live_with(self.job, |s| s.phase) {
            self.phase = phase;
        }
        Ok(())
    }

    pub(crate) fn notice(&self, message: &str) {
        self.observer.report(Report::Notice {
            job: self.job,
            message,
        });
    }

    /// Calls the runner on the blocking pool and puts every notice it raised
    /// during the call on the job's record (after the call returns, before the
    /// caller logs the call's effect).
    pub(crate) async fn call_runner<T: Send + 'static>(
        &mut self,
        runner: &Arc<LoadedRunner>,
        f: impl FnOnce(&LoadedRunner) -> T + Send + 'static,
    ) -> Result<T, LogError> {
        let (out, notices) = runner
            .unblock(move |r| plugin::capture_notices(|| f(r)))
            .await;
        self.record_notices(notices).await?;
        Ok(out)
    }

    /// Puts runner notices on the job's record and tells the observer.
    pub(crate) async fn record_notices(
        &mut self,
        notices: Vec<(String, String)>,
    ) -> Result<(), LogError> {
        for (kind, message) in notices {
            let message = format!("{kind}: {message}");
            self.notice(&message);
            self.append(Event::RunnerNotice { message }).await?;
        }
        Ok(())
    }

    pub(super) fn stop_reason(&self, deadline: Option<Instant>) -> Option<(Outcome, String)> {
        if let Some(r) = self.cancel.reason() {
            return Some((Outcome::Cancelled, r));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Some((
                Outcome::TimedOut,
                format!(
                    "the job ran past its timeout of {}",
                    fmt_ms(self.spec.timeout_ms.unwrap_or(0))
                ),
            ));
        }
        None
    }

    pub(crate) fn runner(&self) -> Result<Arc<LoadedRunner>, Abort> {
        self.ex.runner(&self.spec.runner).map_err(|source| {
            Abort::Runner(ExecError::Runner {
                job: self.job,
                source,
            })
        })
    }
}

/// The notice kind a runner's `plan` uses to name each resource it will create
/// (the SDK's `host::planned_resource` sends it).
pub const PLANNED_RESOURCE: &str = reel_plugin_sdk::host::PLANNED_RESOURCE;

/// What `SandboxPlanned` says the job holds when the runner's plan named nothing:
/// the engine cannot read the handle, so it names no path of its own.
pub const UNNAMED_SANDBOX: &str = "sandbox (named in the runner's handle)";

/// `2s`, `1m30s`.
pub(super) fn fmt_ms(ms: u64) -> String {
    crate::time::format_duration_ms(ms)
}
