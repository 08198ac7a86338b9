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
//! Drained, PoweredOff            runner.drain / runner.poweroff
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
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::event::{Event, Handle, JobId, Outcome};
use crate::log::{EventLog, LogError, Stream};
use crate::plugin::{self, LoadedRunner, PluginSet, RunnerConfig, RunnerError};
use crate::secrets::{Masker, ResolvedSecrets};
use crate::spec::JobSpec;
use crate::state::Phase;

/// How long a graceful poweroff may take before the runner must force it.
const POWEROFF_DEADLINE_MS: u64 = 10_000;
/// Signal grace the runner's cancel gets before the next, harsher signal.
const CLEANUP_ATTEMPTS: u32 = 3;

/// What the executor tells whoever watches a job (the CLI prints it).
#[derive(Debug)]
pub enum Report<'a> {
    /// The job acquired its sandbox and is about to run its first step.
    Started {
        /// The job.
        job: JobId,
        /// Its leased sandbox id.
        cid: u32,
    },
    /// A step started.
    StepStarted {
        /// The job.
        job: JobId,
        /// Step index.
        index: u32,
        /// Step name.
        name: &'a str,
    },
    /// Masked output of a running step, as stored.
    Output {
        /// The job.
        job: JobId,
        /// Step index.
        index: u32,
        /// Which stream.
        stream: Stream,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// A step ended.
    StepFinished {
        /// The job.
        job: JobId,
        /// Step index.
        index: u32,
        /// Step name.
        name: &'a str,
        /// Exit code, if it exited.
        exit_code: Option<i32>,
        /// Signal, if one ended it.
        signal: Option<i32>,
        /// Whether a timeout ended it.
        timed_out: bool,
        /// How long it ran.
        duration: Duration,
        /// Bytes of output stored.
        bytes: u64,
    },
    /// A runner warning or notice.
    Notice {
        /// The job.
        job: JobId,
        /// What it says.
        message: &'a str,
    },
    /// The job ended.
    Finished {
        /// The job.
        job: JobId,
        /// How.
        outcome: Outcome,
        /// Why, for anything but success.
        reason: &'a str,
        /// Submission to end.
        duration: Duration,
    },
}

/// Receives [`Report`]s. Called from executor tasks; keep it quick.
pub trait Observer: Send + Sync {
    /// One report.
    fn report(&self, report: Report<'_>);
}

/// A cancellation signal shared by whoever may cancel a job and the job itself.
#[derive(Clone, Debug)]
pub struct Cancel {
    reason: Arc<Mutex<Option<String>>>,
    tx: async_channel::Sender<()>,
    rx: async_channel::Receiver<()>,
}

impl Default for Cancel {
    fn default() -> Self {
        let (tx, rx) = async_channel::bounded(1);
        Cancel {
            reason: Arc::default(),
            tx,
            rx,
        }
    }
}

impl Cancel {
    /// Asks for cancellation; the first reason given is kept.
    pub fn cancel(&self, reason: &str) {
        lock(&self.reason).get_or_insert_with(|| reason.to_string());
        self.tx.close();
    }

    /// The reason, once cancelled.
    pub fn reason(&self) -> Option<String> {
        lock(&self.reason).clone()
    }

    /// Resolves when cancelled.
    pub async fn cancelled(&self) {
        let _ = self.rx.recv().await;
    }
}

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
    /// Cleanup failed; the job stays live for `reel recover`.
    #[error("job {job}: cleanup failed, the job stays unfinished for `reel recover`: {message}")]
    CleanupFailed {
        /// The job.
        job: JobId,
        /// The runner's error.
        message: String,
    },
}

/// The engine side of running jobs: the log, the runners and the lease table.
pub struct Executor {
    log: EventLog,
    plugins: PluginSet,
    runners: Mutex<HashMap<String, Arc<LoadedRunner>>>,
    sandbox_root: PathBuf,
    options: BTreeMap<String, String>,
    /// Sandbox ids held by live jobs (ours and any a dead engine left).
    leases: Mutex<BTreeSet<u32>>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("sandbox_root", &self.sandbox_root)
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
fn runner_reason(stage: &str, e: &RunnerError) -> String {
    format!("{stage} failed: {e}")
}

impl Executor {
    /// An executor over `log`, with runners from `plugins`, keeping sandboxes under
    /// `sandbox_root`. Every sandbox id a live job holds (including jobs of an
    /// engine that died) stays reserved.
    pub fn new(
        log: EventLog,
        plugins: PluginSet,
        sandbox_root: PathBuf,
        options: BTreeMap<String, String>,
    ) -> Result<Executor, LogError> {
        let mut leases = BTreeSet::new();
        for job in log.live_jobs()? {
            if let Some(cid) = log.live_with(job, |s| s.cid).flatten() {
                leases.insert(cid);
            }
        }
        Ok(Executor {
            log,
            plugins,
            runners: Mutex::new(HashMap::new()),
            sandbox_root,
            options,
            leases: Mutex::new(leases),
        })
    }

    /// The log.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// The loaded plugins.
    pub fn plugins(&self) -> &PluginSet {
        &self.plugins
    }

    /// The runner instance for `name`, created on first use.
    pub fn runner(&self, name: &str) -> Result<Arc<LoadedRunner>, plugin::PluginError> {
        let mut runners = lock(&self.runners);
        if let Some(r) = runners.get(name) {
            return Ok(r.clone());
        }
        let config = RunnerConfig {
            sandbox_root: self.sandbox_root.clone(),
            plugin_dir: self.plugins.dir().to_path_buf(),
            options: self.options.clone(),
        };
        let r = self.plugins.instantiate(name, &config)?;
        runners.insert(name.to_string(), r.clone());
        Ok(r)
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
        }
    }

    /// Runner warnings for fields of `spec` it cannot honour.
    pub async fn validate(&self, spec: &JobSpec) -> Result<Vec<String>, String> {
        let runner = self.runner(&spec.runner).map_err(|e| e.to_string())?;
        let req = Executor::job_request(0, 0, spec);
        runner
            .unblock(move |r| r.validate(&req))
            .await
            .map_err(|e| format!("runner `{}` refuses the job: {e}", spec.runner))
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
        if outcome == Outcome::Cancelled {
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
        run.teardown(outcome, &reason).await?;
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

    fn stop_reason(&self, deadline: Option<Instant>) -> Option<(Outcome, String)> {
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

    /// Sets up the sandbox. `Some(outcome)` if the job must end instead of
    /// running its steps.
    pub(crate) async fn setup(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<(Outcome, String)>, Abort> {
        let runner = self.runner()?;
        if self.phase == Phase::Queued {
            self.append(Event::SlotGranted {}).await?;
        }
        if let Some(stop) = self.stop_reason(deadline) {
            return Ok(Some(stop));
        }
        let cid = self.ex.lease();
        self.cid = Some(cid);
        self.append(Event::CidAllocated { cid }).await?;

        let req = Executor::job_request(self.job, cid, self.spec);
        let (planned, notices) = runner
            .unblock(move |r| plugin::capture_notices(|| r.plan(&req)))
            .await;
        let planned = match planned {
            Ok(h) => from_sdk(h),
            Err(e) => {
                return Ok(Some((
                    Outcome::Failed,
                    runner_reason("planning the sandbox", &e),
                )));
            }
        };
        // The runner names what it is about to create as notices of this kind;
        // they are the human-readable half of the intent.
        let (named, others): (Vec<_>, Vec<_>) = notices
            .into_iter()
            .partition(|(kind, _)| kind == PLANNED_RESOURCE);
        let mut resources: Vec<String> = named.into_iter().map(|(_, m)| m).collect();
        if resources.is_empty() {
            resources.push(format!(
                "sandbox {} (named in the runner's handle)",
                self.ex.sandbox_root.join(cid.to_string()).display()
            ));
        }
        self.append(Event::SandboxPlanned {
            handle: planned.clone(),
            resources,
        })
        .await?;
        self.record_notices(others).await?;
        self.handle = Some(planned.clone());

        // Each stage: call the runner with the latest handle, then log its result.
        type Stage = fn(&LoadedRunner, &plugin::Handle) -> Result<plugin::Handle, RunnerError>;
        let stages: [(&str, Stage); 3] = [
            ("preparing the sandbox", |r, h| r.prepare(h)),
            ("booting the sandbox", |r, h| r.boot(h)),
            ("connecting to the agent", |r, h| r.connect(h)),
        ];
        for (i, (what, call)) in stages.into_iter().enumerate() {
            if i == 1 {
                self.append(Event::BootRequested {}).await?;
            }
            let h = to_sdk(self.handle.as_ref().unwrap_or(&planned));
            let (result, notices) = runner
                .unblock(move |r| plugin::capture_notices(|| call(r, &h)))
                .await;
            self.record_notices(notices).await?;
            let h = match result {
                Ok(h) => from_sdk(h),
                Err(e) => return Ok(Some((Outcome::Failed, runner_reason(what, &e)))),
            };
            self.handle = Some(h.clone());
            match i {
                0 => {
                    self.append(Event::WorkDirCreated { handle: h }).await?;
                    self.append(Event::VolumesFormatted { volumes: vec![] })
                        .await?;
                }
                1 => self.append(Event::VmBooted { handle: h }).await?,
                _ => self.append(Event::AgentConnected { handle: h }).await?,
            }
            if let Some(stop) = self.stop_reason(deadline) {
                return Ok(Some(stop));
            }
        }
        self.observer.report(Report::Started { job: self.job, cid });
        Ok(None)
    }

    /// Runs the steps not finished yet (resuming the one `resume` names, which is
    /// running in a reattached sandbox); returns the decided outcome.
    pub(crate) async fn run_steps(
        &mut self,
        secrets: &ResolvedSecrets,
        deadline: Option<Instant>,
        resume: Option<Resume>,
    ) -> Result<(Outcome, String), Abort> {
        let runner = self.runner()?;
        let masker = secrets.masker();
        let mut base_env = self.spec.environment.clone();
        for (name, value) in secrets.iter() {
            base_env.insert(name.to_string(), value.to_string());
        }
        let first = match &resume {
            Some(r) => r.index as usize,
            None => self
                .ex
                .log
                .live_with(self.job, |s| s.steps.len())
                .unwrap_or(0),
        };
        for (index, step) in self.spec.steps.iter().enumerate().skip(first) {
            let index = index as u32;
            let resuming = resume.as_ref().filter(|r| r.index == index);
            let (exec_id, resume_from) = match resuming {
                Some(r) => (r.exec_id, r.from),
                None => {
                    if let Some(stop) = self.stop_reason(deadline) {
                        return Ok(stop);
                    }
                    let exec_id = u64::from(index) + 1;
                    self.append(Event::StepStarted { index, exec_id }).await?;
                    (exec_id, 0)
                }
            };
            self.observer.report(Report::StepStarted {
                job: self.job,
                index,
                name: &step.name,
            });
            let mut env = base_env.clone();
            env.extend(step.environment.clone());
            let req = plugin::StepRequest {
                exec_id,
                index,
                name: step.name.clone(),
                command: step.command.clone(),
                environment: env,
                timeout_ms: step.timeout_ms,
                resume_from,
            };
            let began = Instant::now();
            let (result, stored, stopped_by) =
                self.exec_step(&runner, req, &masker, deadline).await?;
            let (exit_code, signal, timed_out) = match &result {
                Ok(r) => (r.exit_code, r.signal, r.timed_out),
                Err(_) => (None, None, false),
            };
            self.append(Event::StepFinished {
                index,
                exit_code,
                signal,
                timed_out,
                output_bytes: stored,
            })
            .await?;
            self.observer.report(Report::StepFinished {
                job: self.job,
                index,
                name: &step.name,
                exit_code,
                signal,
                timed_out,
                duration: began.elapsed(),
                bytes: stored,
            });
            let label = format!("step {} {:?}", index + 1, step.name);
            if let Some(stop) = stopped_by {
                return Ok(stop);
            }
            match result {
                Err(e) => return Ok((Outcome::Failed, format!("{label}: the runner failed: {e}"))),
                Ok(r) if r.timed_out => {
                    return Ok((
                        Outcome::TimedOut,
                        format!(
                            "{label} ran past its timeout of {}",
                            fmt_ms(step.timeout_ms.unwrap_or(0))
                        ),
                    ));
                }
                Ok(r) if r.exit_code != Some(0) => {
                    let how = match (r.exit_code, r.signal) {
                        (_, Some(s)) => format!("was killed by signal {s}"),
                        (Some(c), None) => format!("exited with code {c}"),
                        (None, None) => "ended without an exit status".to_string(),
                    };
                    return Ok((Outcome::Failed, format!("{label} {how}")));
                }
                Ok(_) => {}
            }
        }
        Ok((Outcome::Succeeded, String::new()))
    }

    /// Runs one step; stores its masked output durably as it streams. Returns the
    /// runner's result, the bytes stored, and what stopped it early (a cancel or
    /// the job's deadline), if anything did.
    async fn exec_step(
        &mut self,
        runner: &Arc<LoadedRunner>,
        req: plugin::StepRequest,
        masker: &Masker,
        deadline: Option<Instant>,
    ) -> Result<
        (
            Result<plugin::ExecResult, RunnerError>,
            u64,
            Option<(Outcome, String)>,
        ),
        LogError,
    > {
        let handle = to_sdk(self.handle.as_ref().unwrap_or(&Handle::default()));
        let (index, exec_id) = (req.index, req.exec_id);
        // Chunks go from the runner's thread to this task; the runner's sink
        // waits for each chunk to be durable before it returns.
        let (chunk_tx, chunk_rx) =
            async_channel::bounded::<(Stream, Vec<u8>, async_channel::Sender<()>)>(1);
        let exec = {
            let handle = handle.clone();
            let runner = runner.clone();
            smol::spawn(async move {
                runner
                    .unblock(move |r| {
                        let mut sink = DurableSink { tx: chunk_tx };
                        r.exec(&handle, &req, &mut sink)
                    })
                    .await
            })
        };

        // Watcher: on cancel or the job deadline, tell the runner to stop the step.
        let stopped: Arc<Mutex<Option<(Outcome, String)>>> = Arc::default();
        let watcher = {
            let runner = runner.clone();
            let cancel = self.cancel.clone();
            let stopped = stopped.clone();
            let timeout_ms = self.spec.timeout_ms.unwrap_or(0);
            smol::spawn(async move {
                let reason = smol::future::or(
                    async {
                        cancel.cancelled().await;
                        (Outcome::Cancelled, cancel.reason().unwrap_or_default())
                    },
                    async {
                        match deadline {
                            Some(d) => {
                                smol::Timer::at(d).await;
                            }
                            None => std::future::pending::<()>().await,
                        }
                        (
                            Outcome::TimedOut,
                            format!("the job ran past its timeout of {}", fmt_ms(timeout_ms)),
                        )
                    },
                )
                .await;
                *lock(&stopped) = Some(reason);
                let _ = runner.unblock(move |r| r.cancel(&handle, exec_id)).await;
                // Stay alive (and cancelled) until the step ends and drops us.
                std::future::pending::<()>().await;
            })
        };

        let mut stored = self.ex.log.output_end(self.job, index)?;
        let mut stream_masker = masker.stream();
        if stored > 0 && masker.max_secret_len() > 0 {
            // A resumed stream: if the stored output ends inside a masked secret,
            // the rest of that secret arrives first and must be masked too.
            let tail_masked = self
                .ex
                .log
                .output(self.job, index, stored.saturating_sub(1))
                .last()
                .and_then(Result::ok)
                .and_then(|c| c.bytes.last().copied())
                == Some(crate::secrets::MASK_BYTE);
            if tail_masked {
                stream_masker.resume_inside_secret();
            }
        }
        let mut last_stream = Stream::Stdout;
        let mut failure = None;
        while let Ok((stream, bytes, done)) = chunk_rx.recv().await {
            last_stream = stream;
            let masked = stream_masker.push(&bytes);
            if failure.is_none() && !masked.is_empty() {
                match self
                    .ex
                    .log
                    .append_output(self.job, index, stored, stream, masked.clone())
                    .await
                {
                    Ok(end) => {
                        stored = end;
                        self.observer.report(Report::Output {
                            job: self.job,
                            index,
                            stream,
                            bytes: &masked,
                        });
                    }
                    Err(e) => failure = Some(e),
                }
            }
            let _ = done.send(()).await;
        }
        let result = exec.await;
        drop(watcher);
        if let Some(e) = failure {
            return Err(e);
        }
        let tail = stream_masker.finish();
        if !tail.is_empty() {
            stored = self
                .ex
                .log
                .append_output(self.job, index, stored, last_stream, tail.clone())
                .await?;
            self.observer.report(Report::Output {
                job: self.job,
                index,
                stream: last_stream,
                bytes: &tail,
            });
        }
        let stopped_by = lock(&stopped).take();
        Ok((result, stored, stopped_by))
    }

    /// Powers the sandbox off (never past `POWEROFF_DEADLINE_MS`) and records
    /// it; a failure is recorded as a notice, since cleanup kills what is left.
    pub(crate) async fn poweroff(
        &mut self,
        runner: &Arc<LoadedRunner>,
        h: &plugin::Handle,
        graceful: bool,
    ) -> Result<(), LogError> {
        let hh = h.clone();
        match runner
            .unblock(move |r| r.poweroff(&hh, graceful, POWEROFF_DEADLINE_MS))
            .await
        {
            Ok(()) => self.append(Event::PoweredOff {}).await,
            Err(e) => {
                let m = format!("poweroff failed, cleanup will kill what is left: {e}");
                self.notice(&m);
                self.append(Event::RunnerNotice { message: m }).await
            }
        }
    }

    /// `CleanupStarted`, the runner's idempotent cleanup (retried), `Cleaned`.
    /// A cleanup that keeps failing leaves the job live for `reel recover` and
    /// never claims `Cleaned`.
    pub(crate) async fn cleanup(
        &mut self,
        runner: &Arc<LoadedRunner>,
        h: &plugin::Handle,
    ) -> Result<(), ExecError> {
        self.append(Event::CleanupStarted {}).await?;
        let mut last = None;
        for attempt in 0..CLEANUP_ATTEMPTS {
            let hh = h.clone();
            match runner.unblock(move |r| r.cleanup(&hh)).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    last = Some(e.to_string());
                    smol::Timer::after(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        if let Some(message) = last {
            self.append(Event::RunnerNotice {
                message: format!("cleanup failed: {message}"),
            })
            .await?;
            return Err(ExecError::CleanupFailed {
                job: self.job,
                message,
            });
        }
        self.append(Event::Cleaned {}).await?;
        Ok(())
    }

    /// Records the decision and tears down what the log says exists. A `Lost`
    /// outcome (recovery reaping a dead sandbox) also records `Reaped`.
    pub(crate) async fn teardown(
        &mut self,
        outcome: Outcome,
        reason: &str,
    ) -> Result<(), ExecError> {
        let before = self.phase;
        let asked = self
            .ex
            .log
            .live_with(self.job, |s| s.cancel_requested.is_some())
            .unwrap_or(false);
        if outcome == Outcome::Cancelled && !asked {
            // Put the request itself on the record before acting on it.
            self.append(Event::CancelRequested {
                reason: reason.to_string(),
            })
            .await?;
        }
        self.append(Event::TeardownStarted {
            outcome,
            reason: reason.to_string(),
        })
        .await?;
        self.tear_down(before, outcome, reason, true).await
    }

    /// Carries out a decided teardown from where the log says it stands
    /// (`self.phase`: `TearingDown`, `Drained`, `PoweredOff`, `CleaningUp` or
    /// `Cleaned`), given the phase the job was in when teardown was decided, and
    /// ends the job. Recovery resumes an interrupted teardown with it.
    pub(crate) async fn tear_down(
        &mut self,
        before: Phase,
        outcome: Outcome,
        reason: &str,
        drain: bool,
    ) -> Result<(), ExecError> {
        let runner = self.ex.runner(&self.spec.runner).ok();
        let handle = self.handle.clone();
        let had_agent = matches!(
            before,
            Phase::Booting | Phase::Booted | Phase::Connected | Phase::Running
        );
        if let (Some(runner), Some(handle)) = (runner, handle) {
            let h = to_sdk(&handle);
            // A lost sandbox (recovery reaping it) has nothing to drain.
            if drain
                && self.phase == Phase::TearingDown
                && matches!(before, Phase::Connected | Phase::Running)
                && outcome != Outcome::Lost
            {
                let hh = h.clone();
                match runner.unblock(move |r| r.drain(&hh)).await {
                    Ok(()) => self.append(Event::Drained {}).await?,
                    Err(e) => {
                        let m = format!("drain failed: {e}");
                        self.notice(&m);
                        self.append(Event::RunnerNotice { message: m }).await?;
                    }
                }
            }
            if had_agent && matches!(self.phase, Phase::TearingDown | Phase::Drained) {
                self.poweroff(&runner, &h, true).await?;
            }
            if self.cid.is_some() {
                self.cleanup(&runner, &h).await?;
            }
        } else if self.cid.is_some() {
            // No runner or no plan: nothing was created beyond the lease.
            self.append(Event::CleanupStarted {}).await?;
            self.append(Event::Cleaned {}).await?;
        }
        if let Some(cid) = self.cid.take() {
            self.ex.release(cid);
        }
        if outcome == Outcome::Lost {
            self.append(Event::Reaped {
                reason: reason.to_string(),
            })
            .await?;
        }
        self.append(Event::terminal(outcome, reason.to_string()))
            .await?;
        Ok(())
    }
}

/// The notice kind a runner's `plan` uses to name each resource it will create
/// (the process runner's `RESOURCE_NOTICE`).
pub const PLANNED_RESOURCE: &str = "planned-resource";

/// `2s`, `1m30s`.
fn fmt_ms(ms: u64) -> String {
    crate::time::format_duration_ms(ms)
}

/// The sink given to the runner: hands each chunk to the executor task and waits
/// until it is durable.
struct DurableSink {
    tx: async_channel::Sender<(Stream, Vec<u8>, async_channel::Sender<()>)>,
}

impl plugin::OutputSink for DurableSink {
    fn chunk(&mut self, stream: plugin::Stream, _offset: u64, bytes: &[u8]) {
        let stream = match stream {
            plugin::Stream::Stdout => Stream::Stdout,
            plugin::Stream::Stderr => Stream::Stderr,
        };
        let (done_tx, done_rx) = async_channel::bounded(1);
        if self
            .tx
            .send_blocking((stream, bytes.to_vec(), done_tx))
            .is_ok()
        {
            let _ = done_rx.recv_blocking();
        }
    }
}
