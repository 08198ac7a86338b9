//! The daemon's engine side: a long-lived [`Service`] over one state directory
//! that takes jobs at any time, queues them in the log, lets the fair
//! [`Scheduler`] decide when each starts, runs them with the executor, and
//! survives `kill -9` because every decision is an event.
//!
//! A front end (`reel serve`'s HTTP API) only translates requests into the
//! calls here; every rule about jobs lives in this room or below it.
//!
//! ```text
//! submit ──► Submitted, Queued (durable) ──► scheduler.enqueue ──► poke
//!                                                                   │
//! dispatcher: decide() on every poke, job end and aging timer ──► SlotGranted{charged}
//!                                                                   │
//!                                     executor.run / recover ◄──────┘
//!                                                │ end
//!                             scheduler.release, retry if `Lost`, poke
//! ```
//!
//! On start, every live job is taken back before any new one is accepted:
//! jobs still waiting are queued again in their original order (their
//! `Queued` time kept, so aging and fair share carry on); jobs that hold a
//! sandbox are reattached, finished or reaped by recovery, and their grant is
//! charged against the budget while they run. A job that ends `Lost` with
//! retries left (`retry: { lost: N }`) is submitted again as a new attempt
//! whose origin names it; the attempt's idempotency key (`reel:retry-of:<id>`)
//! makes that happen once, even across a crash between the two.
//!
//! Shutdown ([`Service::drain`]): stop accepting and granting, let running
//! jobs go on until the deadline, then cancel the rest cleanly; jobs still
//! queued stay queued in the log for the next start.

mod follow;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use follow::Follow;

use crate::input::jobfile::{JobFileError, parse_job_str};
use crate::input::secrets::{ResolvedSecrets, SecretError, SecretSource};
use crate::lifecycle::executor::{ExecError, Executor};
use crate::lifecycle::observer::{Cancel, Observer, Report};
use crate::lifecycle::recover::{self, Action};
use crate::lifecycle::sched::{Grant, Policy, SchedView, Scheduler, TooLarge, Waiting};
use crate::model::event::{Event, JobId, Outcome, Record};
use crate::model::spec::{JobSpec, Origin};
use crate::model::state::{JobState, Phase};
use crate::store::{EventLog, JobSummary, LogError};
use crate::time::now_ms;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The most an idempotency key may hold, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;

/// Keys beginning with this are the daemon's own (retries); a submitter's are refused.
const RESERVED_KEY_PREFIX: &str = "reel:";

/// The owner of a job submitted without one.
pub const DEFAULT_OWNER: &str = "anonymous";

/// How the service is set up.
pub struct ServiceOptions {
    /// The scheduler's budget, defaults and aging.
    pub policy: Policy,
    /// Where jobs' secrets come from.
    pub secrets: SecretSource,
}

impl std::fmt::Debug for ServiceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceOptions").finish_non_exhaustive()
    }
}

/// A submission as it arrives.
#[derive(Clone, Debug, Default)]
pub struct Submission {
    /// The job file's text (reel YAML, JSON, or a spindle workflow).
    pub text: String,
    /// The name messages use for it (and the job's default name).
    pub file: String,
    /// The owner (fair-share key); `None`: the file's, else [`DEFAULT_OWNER`].
    pub owner: Option<String>,
    /// The submitter's idempotency key.
    pub idempotency_key: Option<String>,
}

/// A submission taken.
#[derive(Clone, Debug)]
pub struct Accepted {
    /// The job.
    pub job: JobId,
    /// `false` when the idempotency key named a job submitted before.
    pub created: bool,
    /// Runner warnings about fields it cannot honour.
    pub warnings: Vec<String>,
}

/// Why a submission was refused. Nothing of it was written.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The daemon is shutting down.
    #[error("the daemon is shutting down and takes no new jobs")]
    Draining,
    /// The job file does not parse (its message names file, line and column).
    #[error(transparent)]
    JobFile(#[from] JobFileError),
    /// The job cannot run here: unknown runner, refused spec, missing
    /// secret, bad idempotency key.
    #[error("{0}")]
    Refused(String),
    /// The job asks for more than the whole budget.
    #[error("{file}: {source}")]
    TooLarge {
        /// The file's name.
        file: String,
        /// The numbers.
        source: TooLarge,
    },
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// What a cancel did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// The job was waiting: it ended `Cancelled` at once.
    WhileQueued,
    /// The job runs: its cancel is under way.
    Requested,
}

/// Why a cancel was refused.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such job.
    #[error("no job {0}")]
    Unknown(JobId),
    /// It already ended.
    #[error("job {job} already ended ({})", outcome.as_str())]
    Ended {
        /// The job.
        job: JobId,
        /// How.
        outcome: Outcome,
    },
    /// The job is live but this daemon does not run it (its runner is not
    /// loaded, or its history cannot be read).
    #[error("job {0} is not run by this daemon (see `reel recover --dry-run`)")]
    NotHere(JobId),
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// Which jobs a listing shows.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// By lifecycle state word (`queued`, `running`, `ended`).
    pub state: Option<StateWord>,
    /// By owner.
    pub owner: Option<String>,
    /// By outcome.
    pub outcome: Option<Outcome>,
}

/// A job's place in its life, in one word: what listings filter on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateWord {
    /// Waiting for its slot.
    Queued,
    /// Holds a sandbox, or is tearing it down.
    Running,
    /// Ended.
    Ended,
}

impl StateWord {
    /// The word for `phase`.
    pub fn of(phase: Phase) -> StateWord {
        match phase {
            Phase::New | Phase::Submitted | Phase::Queued => StateWord::Queued,
            Phase::Terminal => StateWord::Ended,
            _ => StateWord::Running,
        }
    }

    /// The word as written.
    pub fn as_str(self) -> &'static str {
        match self {
            StateWord::Queued => "queued",
            StateWord::Running => "running",
            StateWord::Ended => "ended",
        }
    }

    /// Parses a word.
    pub fn parse(s: &str) -> Option<StateWord> {
        Some(match s {
            "queued" => StateWord::Queued,
            "running" => StateWord::Running,
            "ended" => StateWord::Ended,
            _ => return None,
        })
    }
}

/// Counters of what the service did since it started.
#[derive(Debug, Default)]
pub struct Counters {
    /// Jobs submitted (new ones, not idempotent repeats).
    pub submitted: AtomicU64,
    /// Jobs taken back from a dead engine by reattaching to their sandbox.
    pub reattached: AtomicU64,
    /// Jobs whose sandbox recovery reaped (ended `Lost`).
    pub reaped: AtomicU64,
    /// Jobs whose teardown recovery finished.
    pub teardowns_finished: AtomicU64,
    /// Jobs queued again after a restart.
    pub requeued: AtomicU64,
    /// New attempts of jobs that ended `Lost`.
    pub retried: AtomicU64,
    /// Jobs the engine could not finish (an engine error, e.g. a failed cleanup).
    pub engine_errors: AtomicU64,
    /// Step-output follows open now ([`Follow`]s not yet dropped).
    pub followers: AtomicU64,
}

/// A job this daemon queued or runs.
struct Active {
    cancel: Cancel,
    spec: Arc<JobSpec>,
    secrets: Arc<Result<ResolvedSecrets, SecretError>>,
}

struct Inner {
    ex: Arc<Executor>,
    sched: Mutex<Scheduler>,
    poke_tx: async_channel::Sender<()>,
    poke_rx: async_channel::Receiver<()>,
    active: Mutex<HashMap<JobId, Active>>,
    /// Idempotency key → job, for every job in the log that has one.
    keys: Mutex<Keys>,
    /// Notified when a claimed key is released.
    key_done: event_listener::Event,
    /// Job → its next attempt.
    retried_as: Mutex<HashMap<JobId, JobId>>,
    /// A gc is running (`Service::gc`): one at a time.
    collecting: AtomicBool,
    watchers: Mutex<HashMap<JobId, Arc<event_listener::Event>>>,
    secrets: SecretSource,
    accepting: AtomicBool,
    granting: AtomicBool,
    /// Jobs whose task has not finished (for drain).
    running: AtomicU64,
    idle: event_listener::Event,
    counters: Counters,
    /// Jobs that had ended before the log opened, per outcome.
    ended_before: Mutex<HashMap<Outcome, u64>>,
}

/// The daemon's engine. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

/// What start-up found and did.
#[derive(Debug, Default)]
pub struct StartReport {
    /// Live jobs taken back, per action word (`requeue`, `reattach`, …).
    pub recovered: Vec<(JobId, &'static str, String)>,
    /// Jobs resubmitted because they ended `Lost` with retries left.
    pub retried: Vec<(JobId, JobId)>,
}

/// The observer the service gives the executor: wakes the job's followers.
struct Wake(Arc<Inner>);

impl Observer for Wake {
    fn report(&self, report: Report<'_>) {
        let job = match report {
            Report::Output { job, .. }
            | Report::StepStarted { job, .. }
            | Report::StepFinished { job, .. }
            | Report::Finished { job, .. }
            | Report::Started { job, .. }
            | Report::ArtifactStored { job, .. } => job,
            Report::Notice { job, message } => {
                tracing::info!(job, "{message}");
                return;
            }
            Report::Dispatched { .. } => return,
        };
        self.0.wake(job);
    }
}

impl Inner {
    /// Wakes `job`'s followers; once the job has ended, forgets its watcher
    /// (a follower looks at the state after every wake-up, and sees the end).
    fn wake(&self, job: JobId) {
        let mut watchers = lock(&self.watchers);
        if let Some(w) = watchers.get(&job) {
            w.notify(usize::MAX);
            if self.ex.log().live_with(job, |_| ()).is_none() {
                watchers.remove(&job);
            }
        }
    }

    fn poke(&self) {
        let _ = self.poke_tx.try_send(());
    }
}

impl Service {
    /// Starts the service over `ex`: builds the idempotency index, takes back
    /// every live job (recovery), resubmits lost jobs with retries left, and
    /// starts the dispatcher. Accepts submissions once it returns.
    pub async fn start(
        ex: Arc<Executor>,
        opts: ServiceOptions,
    ) -> Result<(Service, StartReport), LogError> {
        let (poke_tx, poke_rx) = async_channel::bounded(1);
        let inner = Arc::new(Inner {
            ex,
            sched: Mutex::new(Scheduler::new(opts.policy)),
            poke_tx,
            poke_rx,
            active: Mutex::new(HashMap::new()),
            keys: Mutex::new(Keys::default()),
            key_done: event_listener::Event::new(),
            retried_as: Mutex::new(HashMap::new()),
            collecting: AtomicBool::new(false),
            watchers: Mutex::new(HashMap::new()),
            secrets: opts.secrets,
            accepting: AtomicBool::new(false),
            granting: AtomicBool::new(true),
            running: AtomicU64::new(0),
            idle: event_listener::Event::new(),
            counters: Counters::default(),
            ended_before: Mutex::new(HashMap::new()),
        });
        let svc = Service { inner };
        let mut report = StartReport::default();
        let lost = svc.index().await?;
        svc.take_back(&mut report).await?;
        for job in lost {
            if let Some(next) = svc.retry_if_due(job).await? {
                report.retried.push((job, next));
            }
        }
        let dispatcher = svc.clone();
        smol::spawn(async move { dispatcher.dispatch().await }).detach();
        svc.inner.accepting.store(true, Ordering::SeqCst);
        svc.inner.poke();
        Ok((svc, report))
    }

    /// The log.
    pub fn log(&self) -> &EventLog {
        self.inner.ex.log()
    }

    /// The executor.
    pub fn executor(&self) -> &Arc<Executor> {
        &self.inner.ex
    }

    /// What the service counted.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// The scheduler's budget and queues now.
    pub fn sched_view(&self) -> SchedView {
        lock(&self.inner.sched).view()
    }

    /// Whether submissions are taken.
    pub fn accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::SeqCst)
    }

    /// Jobs ended, per outcome: those in the log when the service started and
    /// those since.
    pub fn ended_counts(&self) -> Vec<(Outcome, u64)> {
        let before = lock(&self.inner.ended_before);
        self.log()
            .stats()
            .ended_since_open()
            .iter()
            .map(|&(o, n)| (o, n + before.get(&o).copied().unwrap_or(0)))
            .collect()
    }

    /// The job that repeats `job` after it was lost, if one was submitted.
    pub fn retried_as(&self, job: JobId) -> Option<JobId> {
        lock(&self.inner.retried_as).get(&job).copied()
    }

    /// Reads every job's origin: idempotency keys and retry links. Returns
    /// the jobs that ended `Lost` (they may be due a retry).
    async fn index(&self) -> Result<Vec<JobId>, LogError> {
        let log = self.log().clone();
        let (keys, links, lost, ended) = blocking::unblock(move || -> Result<_, LogError> {
            let mut keys = HashMap::new();
            let mut links = HashMap::new();
            let mut lost = Vec::new();
            let mut ended: HashMap<Outcome, u64> = HashMap::new();
            for summary in log.jobs() {
                let Ok(summary) = summary else { continue };
                if let Some(o) = summary.outcome
                    && summary.finished_ms.is_some()
                {
                    *ended.entry(o).or_default() += 1;
                }
                if summary.outcome == Some(Outcome::Lost) {
                    lost.push(summary.id);
                }
                let first = log.events(summary.id).next();
                if let Some(Ok(Record {
                    event: Event::Submitted { spec },
                    ..
                })) = first
                {
                    if let Some(k) = spec.origin.idempotency_key {
                        keys.insert(k, summary.id);
                    }
                    if let Some(of) = spec.origin.retry_of {
                        links.insert(of, summary.id);
                    }
                }
            }
            Ok((keys, links, lost, ended))
        })
        .await?;
        *lock(&self.inner.ended_before) = ended;
        lock(&self.inner.keys).done = keys;
        *lock(&self.inner.retried_as) = links;
        Ok(lost)
    }

    /// Takes back every live job a dead engine left (see the module doc).
    async fn take_back(&self, report: &mut StartReport) -> Result<(), LogError> {
        let ex = self.inner.ex.clone();
        let (states, unreadable) = ex.log().live_states()?;
        for (job, e) in &unreadable {
            tracing::warn!(
                job,
                "set aside: its history cannot be read ({}); it is left for `reel recover`",
                crate::store::error_line(e)
            );
        }
        for state in states {
            let job = state.id;
            let spec = Arc::new(state.spec.clone().unwrap_or_default());
            let secrets = Arc::new(self.inner.secrets.resolve(&spec.secrets));
            let a = recover::assess(ex.runners(), ex.log(), &state).await;
            let word = match &a.action {
                Action::Requeue => "requeue",
                Action::Reattach { .. } => "reattach",
                Action::FinishTeardown { .. } => "finish",
                Action::Reap { .. } => "reap",
                Action::Skip { .. } => "skip",
            };
            report.recovered.push((job, word, a.why.clone()));
            tracing::info!(job, action = word, "{}", a.why);
            match &a.action {
                Action::Skip { .. } => continue,
                Action::Requeue => {
                    self.inner.counters.requeued.fetch_add(1, Ordering::Relaxed);
                    if let Some(outcome) = recover::take_back_unstarted(&ex, &state).await? {
                        tracing::info!(job, "ended {} while it waited", outcome.as_str());
                        continue;
                    }
                    let phase = ex.log().live_with(job, |s| s.phase);
                    self.register(job, spec.clone(), secrets.clone());
                    if phase == Some(Phase::SlotGranted) {
                        // Granted before the crash: it keeps its grant.
                        let charged = self.charged_for(&state);
                        lock(&self.inner.sched).charge_running(job, &spec.owner, charged);
                        self.spawn_run(job, None);
                    } else {
                        let queued_ms = state.queued_ms.unwrap_or_else(now_ms);
                        let waiting = Waiting {
                            job,
                            owner: spec.owner.clone(),
                            asked: spec.resources,
                            queued_ms,
                        };
                        let queued = lock(&self.inner.sched).enqueue(waiting);
                        if let Err(e) = queued {
                            // The budget shrank below the job since it was queued.
                            self.inner.unregister(job);
                            ex.end_unstarted(job, Outcome::Failed, &e.to_string())
                                .await?;
                        }
                    }
                }
                _ => {
                    let charged = self.charged_for(&state);
                    lock(&self.inner.sched).charge_running(job, &spec.owner, charged);
                    self.register(job, spec.clone(), secrets.clone());
                    self.spawn_run(job, Some(Box::new(a)));
                }
            }
        }
        Ok(())
    }

    /// What a job holding its slot counts against the budget: its grant, or
    /// (a grant logged before grants carried it) its request with defaults.
    fn charged_for(&self, state: &JobState) -> crate::model::spec::Resources {
        let sched = lock(&self.inner.sched);
        match state.charged {
            Some(c) if c != Default::default() => c,
            _ => sched
                .policy()
                .charge(&state.spec.as_ref().map(|s| s.resources).unwrap_or_default()),
        }
    }

    fn register(
        &self,
        job: JobId,
        spec: Arc<JobSpec>,
        secrets: Arc<Result<ResolvedSecrets, SecretError>>,
    ) {
        lock(&self.inner.active).insert(
            job,
            Active {
                cancel: Cancel::default(),
                spec,
                secrets,
            },
        );
    }

    /// Takes a job: parsed, checked against the runner and the budget, its
    /// secrets resolved, then `Submitted` and `Queued` made durable. Returns
    /// only once both are.
    pub async fn submit(&self, sub: Submission) -> Result<Accepted, SubmitError> {
        if !self.accepting() {
            return Err(SubmitError::Draining);
        }
        if let Some(k) = &sub.idempotency_key {
            check_key(k)?;
        }
        // A key is claimed across its submission, so two submissions with one
        // key make one job; submissions without a key (or with different
        // keys) overlap, and share the log's group-commit rounds.
        let claim = match &sub.idempotency_key {
            None => None,
            Some(k) => match self.inner.claim_key(k).await {
                Claimed::Existing(job) => {
                    return Ok(Accepted {
                        job,
                        created: false,
                        warnings: Vec::new(),
                    });
                }
                Claimed::Claim(c) => Some(c),
            },
        };
        let parsed = parse_job_str(&sub.text, &sub.file)?;
        let mut spec = parsed.spec;
        let mut warnings = parsed.warnings;
        if let Some(o) = sub.owner.filter(|o| !o.trim().is_empty()) {
            spec.owner = o;
        }
        if spec.owner.trim().is_empty() {
            spec.owner = DEFAULT_OWNER.into();
        }
        spec.origin = Origin {
            idempotency_key: sub.idempotency_key.clone(),
            retry_of: None,
            retries: 0,
        };
        let ex = &self.inner.ex;
        if ex.plugins().get(&spec.runner).is_none() {
            let loaded: Vec<String> = ex.plugins().plugins().map(|i| i.name.clone()).collect();
            return Err(SubmitError::Refused(format!(
                "{}: runner `{}` is not loaded by this daemon (loaded: {})",
                sub.file,
                spec.runner,
                if loaded.is_empty() {
                    "none".into()
                } else {
                    loaded.join(", ")
                }
            )));
        }
        match ex.validate(&spec).await {
            Ok(w) => warnings.extend(w),
            Err(e) => return Err(SubmitError::Refused(format!("{}: {e}", sub.file))),
        }
        lock(&self.inner.sched)
            .check(&spec.resources)
            .map_err(|source| SubmitError::TooLarge {
                file: sub.file.clone(),
                source,
            })?;
        let secrets = self
            .inner
            .secrets
            .resolve(&spec.secrets)
            .map_err(|e| SubmitError::Refused(format!("{}: {e}", sub.file)))?;
        let job = self.enqueue_new(spec, Ok(secrets)).await?;
        if let Some(c) = claim {
            c.done(job);
        }
        self.inner
            .counters
            .submitted
            .fetch_add(1, Ordering::Relaxed);
        Ok(Accepted {
            job,
            created: true,
            warnings,
        })
    }

    /// Submits and queues `spec`, registers it with the scheduler and pokes
    /// the dispatcher.
    async fn enqueue_new(
        &self,
        spec: JobSpec,
        secrets: Result<ResolvedSecrets, SecretError>,
    ) -> Result<JobId, LogError> {
        let log = self.log();
        let owner = spec.owner.clone();
        let asked = spec.resources;
        let job = log.submit(spec.clone()).await?;
        log.append(job, Event::Queued {}).await?;
        let queued_ms = log
            .live_with(job, |s| s.queued_ms)
            .flatten()
            .unwrap_or_else(now_ms);
        self.register(job, Arc::new(spec), Arc::new(secrets));
        let waiting = Waiting {
            job,
            owner,
            asked,
            queued_ms,
        };
        let queued = lock(&self.inner.sched).enqueue(waiting);
        if let Err(e) = queued {
            // Checked before; only a retry whose budget shrank gets here.
            self.inner.unregister(job);
            self.inner
                .ex
                .end_unstarted(job, Outcome::Failed, &e.to_string())
                .await?;
            return Ok(job);
        }
        self.inner.poke();
        Ok(job)
    }

    /// Deletes the jobs that ended before `horizon_ms` while the daemon runs
    /// ([`EventLog::gc_online`]), and forgets their idempotency keys and retry
    /// links. `None` if a gc is already running.
    pub async fn gc(&self, horizon_ms: u64) -> Option<Result<crate::store::GcReport, LogError>> {
        if self.inner.collecting.swap(true, Ordering::SeqCst) {
            return None;
        }
        let svc = self.clone();
        let report = blocking::unblock(move || {
            let log = svc.log();
            let report = log.gc_online(horizon_ms)?;
            // Which jobs the maps name are gone is read from the log without
            // their locks held, so submissions are not held up meanwhile.
            let named: Vec<JobId> = {
                let keys = lock(&svc.inner.keys);
                let links = lock(&svc.inner.retried_as);
                keys.done.values().chain(links.keys()).copied().collect()
            };
            let gone: std::collections::HashSet<JobId> = named
                .into_iter()
                .filter(|job| matches!(log.summary(*job), Err(LogError::UnknownJob(_))))
                .collect();
            lock(&svc.inner.keys)
                .done
                .retain(|_, job| !gone.contains(job));
            lock(&svc.inner.retried_as).retain(|of, _| !gone.contains(of));
            Ok(report)
        })
        .await;
        self.inner.collecting.store(false, Ordering::SeqCst);
        Some(report)
    }

    /// Cancels a job: a queued one ends `Cancelled` now; a running one is
    /// stopped (its `CancelRequested` is logged before any signal).
    pub async fn cancel(&self, job: JobId, reason: &str) -> Result<Cancelled, CancelError> {
        let log = self.log();
        let Some(phase) = log.live_with(job, |s| s.phase) else {
            return match log.summary(job) {
                Ok(s) => Err(CancelError::Ended {
                    job,
                    outcome: s.outcome.unwrap_or(Outcome::Cancelled),
                }),
                Err(LogError::UnknownJob(_)) => Err(CancelError::Unknown(job)),
                Err(e) => Err(e.into()),
            };
        };
        let removed = lock(&self.inner.sched).remove(job);
        if removed {
            self.inner.unregister(job);
            self.inner
                .ex
                .end_unstarted(job, Outcome::Cancelled, reason)
                .await?;
            self.inner.wake(job);
            self.inner.poke();
            return Ok(Cancelled::WhileQueued);
        }
        let cancel = lock(&self.inner.active).get(&job).map(|a| a.cancel.clone());
        match cancel {
            Some(c) => {
                c.cancel(reason);
                Ok(Cancelled::Requested)
            }
            None if phase == Phase::Terminal => Err(CancelError::Ended {
                job,
                outcome: Outcome::Cancelled,
            }),
            None => Err(CancelError::NotHere(job)),
        }
    }

    /// A job's folded state: from memory for a live job, else its history.
    pub fn state(&self, job: JobId) -> Result<JobState, LogError> {
        match self.log().live_state(job) {
            Some(s) => Ok(s),
            None => self.log().fold(job),
        }
    }

    /// A job's events, in order.
    pub fn events(&self, job: JobId) -> Result<Vec<Record>, LogError> {
        let _ = self.log().summary(job)?;
        self.log().events(job).collect()
    }

    /// Jobs matching `filter`, newest first, `limit` of them, starting below
    /// `before` (a cursor from the previous page). Returns the page and the
    /// next cursor (`None` on the last page).
    pub fn list(
        &self,
        filter: &Filter,
        limit: usize,
        before: Option<JobId>,
    ) -> Result<(Vec<JobState>, Option<JobId>), LogError> {
        let log = self.log();
        let mut page = Vec::new();
        let mut last = None;
        for summary in log.jobs_before(before) {
            let summary: JobSummary = summary?;
            if filter.owner.as_ref().is_some_and(|o| *o != summary.owner) {
                continue;
            }
            let state = match log.live_state(summary.id) {
                Some(s) => s,
                None => {
                    if filter.outcome.is_some() && summary.outcome != filter.outcome {
                        continue;
                    }
                    if filter.state.is_some_and(|w| w != StateWord::Ended) {
                        continue;
                    }
                    log.fold(summary.id)?
                }
            };
            if filter
                .state
                .is_some_and(|w| w != StateWord::of(state.phase))
                || (filter.outcome.is_some() && state.outcome != filter.outcome)
            {
                continue;
            }
            if page.len() == limit {
                return Ok((page, last));
            }
            last = Some(summary.id);
            page.push(state);
        }
        Ok((page, None))
    }

    /// Follows step `index`'s output from `offset`; see [`Follow`].
    pub fn follow(&self, job: JobId, index: u32, offset: u64, keep_following: bool) -> Follow {
        Follow::new(self.clone(), job, index, offset, keep_following)
    }

    /// What wakes `job`'s followers; `None` once the job has ended (nothing
    /// more will be stored). Looked up under the same lock `wake` forgets it
    /// under, so an ended job never gets a watcher again.
    fn watcher(&self, job: JobId) -> Option<Arc<event_listener::Event>> {
        let mut watchers = lock(&self.inner.watchers);
        self.log().live_with(job, |_| ())?;
        Some(
            watchers
                .entry(job)
                .or_insert_with(|| Arc::new(event_listener::Event::new()))
                .clone(),
        )
    }

    /// Stops taking jobs and starting queued ones; lets running jobs go on
    /// until `deadline` (or until `now` resolves: a second signal), then
    /// cancels those still running and waits for their teardown. Queued jobs
    /// stay queued in the log.
    pub async fn drain(&self, deadline: Duration, now: impl std::future::Future<Output = ()>) {
        let inner = &self.inner;
        inner.accepting.store(false, Ordering::SeqCst);
        inner.granting.store(false, Ordering::SeqCst);
        inner.poke();
        let all_done = self.until_idle();
        let cancel_now = async {
            smol::future::or(
                async {
                    smol::Timer::after(deadline).await;
                },
                now,
            )
            .await;
            false
        };
        let done = smol::future::or(
            async {
                all_done.await;
                true
            },
            cancel_now,
        )
        .await;
        if !done {
            let cancels: Vec<Cancel> = lock(&inner.active)
                .values()
                .map(|a| a.cancel.clone())
                .collect();
            tracing::warn!(
                jobs = cancels.len(),
                "drain deadline passed: cancelling the jobs still running"
            );
            for c in cancels {
                c.cancel("cancelled: the daemon shut down before the job ended");
            }
            self.until_idle().await;
        }
    }

    /// Resolves when no job task runs.
    async fn until_idle(&self) {
        loop {
            let l = self.inner.idle.listen();
            if self.inner.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            l.await;
        }
    }

    /// Jobs whose task runs now.
    pub fn running(&self) -> u64 {
        self.inner.running.load(Ordering::SeqCst)
    }

    async fn dispatch(&self) {
        let inner = &self.inner;
        loop {
            if inner.granting.load(Ordering::SeqCst) {
                let now = now_ms();
                let grants = lock(&inner.sched).decide(now);
                for g in grants {
                    self.grant(g).await;
                }
            }
            let wake_at = lock(&inner.sched).next_wakeup(now_ms());
            let wait = wake_at
                .map(|t| Duration::from_millis(t.saturating_sub(now_ms()).max(1)))
                .unwrap_or(Duration::from_secs(5));
            let rx = inner.poke_rx.clone();
            let poked = smol::future::or(async { rx.recv().await.is_ok() }, async {
                smol::Timer::after(wait).await;
                true
            })
            .await;
            if !poked {
                return;
            }
        }
    }

    /// Logs a grant and starts the job.
    async fn grant(&self, g: Grant) {
        let job = g.job;
        if let Err(e) = self
            .log()
            .append(job, Event::SlotGranted { charged: g.charged })
            .await
        {
            tracing::error!(
                job,
                "cannot log the grant: {}",
                crate::store::error_line(&e)
            );
            lock(&self.inner.sched).release(job);
            return;
        }
        tracing::debug!(job, owner = %g.owner, waited_ms = g.waited_ms, aged = g.aged, "granted");
        self.spawn_run(job, None);
    }

    /// Runs (or, with an assessment, recovers) a registered job in its own task.
    fn spawn_run(&self, job: JobId, assessment: Option<Box<recover::Assessment>>) {
        let Some((cancel, spec, secrets)) = lock(&self.inner.active)
            .get(&job)
            .map(|a| (a.cancel.clone(), a.spec.clone(), a.secrets.clone()))
        else {
            return;
        };
        self.inner.running.fetch_add(1, Ordering::SeqCst);
        let svc = self.clone();
        smol::spawn(async move {
            let observer = Wake(svc.inner.clone());
            let ex = svc.inner.ex.clone();
            let result: Result<Option<Outcome>, ExecError> = match &assessment {
                Some(a) => {
                    let counter = match a.action {
                        Action::Reattach { .. } => Some(&svc.inner.counters.reattached),
                        Action::Reap { .. } => Some(&svc.inner.counters.reaped),
                        Action::FinishTeardown { .. } => {
                            Some(&svc.inner.counters.teardowns_finished)
                        }
                        _ => None,
                    };
                    if let Some(c) = counter {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    recover::recover(&ex, a, &secrets, &cancel, &observer).await
                }
                None => match &*secrets {
                    Ok(s) => ex.run(job, &spec, s, &cancel, &observer).await.map(Some),
                    Err(e) => {
                        let reason = recover::secrets_reason(e);
                        ex.end_unstarted(job, Outcome::Failed, &reason)
                            .await
                            .map(|()| Some(Outcome::Failed))
                            .map_err(ExecError::from)
                    }
                },
            };
            svc.finished(job, result).await;
        })
        .detach();
    }

    async fn finished(&self, job: JobId, result: Result<Option<Outcome>, ExecError>) {
        let inner = &self.inner;
        match &result {
            Ok(Some(o)) => tracing::info!(job, outcome = o.as_str(), "job ended"),
            Ok(None) => {}
            Err(e) => {
                inner.counters.engine_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(job, "the engine could not finish the job: {e}");
            }
        }
        lock(&inner.sched).release(job);
        inner.unregister(job);
        inner.wake(job);
        if matches!(result, Ok(Some(Outcome::Lost))) {
            match self.retry_if_due(job).await {
                Ok(Some(next)) => tracing::info!(job, next, "lost: submitted again"),
                Ok(None) => {}
                Err(e) => tracing::error!(
                    job,
                    "cannot submit the retry: {}",
                    crate::store::error_line(&e)
                ),
            }
        }
        inner.running.fetch_sub(1, Ordering::SeqCst);
        inner.idle.notify(usize::MAX);
        inner.poke();
    }

    /// Submits a new attempt of `job` if it ended `Lost` with retries left
    /// and none was submitted yet. Returns the new job.
    async fn retry_if_due(&self, job: JobId) -> Result<Option<JobId>, LogError> {
        let state = self.log().fold(job)?;
        let Some(spec) = state.spec.as_ref() else {
            return Ok(None);
        };
        if state.outcome != Some(Outcome::Lost) || spec.origin.retries >= spec.retry.lost {
            return Ok(None);
        }
        let key = format!("{RESERVED_KEY_PREFIX}retry-of:{job}");
        let Claimed::Claim(claim) = self.inner.claim_key(&key).await else {
            return Ok(None);
        };
        let mut next = spec.clone();
        next.origin = Origin {
            idempotency_key: Some(key.clone()),
            retry_of: Some(job),
            retries: spec.origin.retries + 1,
        };
        let secrets = self.inner.secrets.resolve(&next.secrets);
        let id = self.enqueue_new(next, secrets).await?;
        claim.done(id);
        lock(&self.inner.retried_as).insert(job, id);
        self.inner.counters.retried.fetch_add(1, Ordering::Relaxed);
        Ok(Some(id))
    }
}

impl Inner {
    fn unregister(&self, job: JobId) {
        lock(&self.active).remove(&job);
    }

    /// The job `key` names, or a claim on it while its submission is under
    /// way (waiting for another submission of the same key to finish first).
    async fn claim_key(&self, key: &str) -> Claimed<'_> {
        loop {
            let listener = {
                let mut keys = lock(&self.keys);
                if let Some(&job) = keys.done.get(key) {
                    return Claimed::Existing(job);
                }
                if keys.pending.insert(key.to_string()) {
                    return Claimed::Claim(KeyClaim {
                        inner: self,
                        key: key.to_string(),
                    });
                }
                // Registered under the lock: the release cannot be missed.
                self.key_done.listen()
            };
            listener.await;
        }
    }
}

/// Idempotency keys: those that name a job, and those being submitted now.
#[derive(Default)]
struct Keys {
    done: HashMap<String, JobId>,
    pending: std::collections::HashSet<String>,
}

enum Claimed<'a> {
    Existing(JobId),
    Claim(KeyClaim<'a>),
}

/// A key being submitted; released when dropped (a failed submission leaves
/// the key free for the next try).
struct KeyClaim<'a> {
    inner: &'a Inner,
    key: String,
}

impl KeyClaim<'_> {
    /// The submission made `job`: the key names it from now on.
    fn done(self, job: JobId) {
        lock(&self.inner.keys).done.insert(self.key.clone(), job);
    }
}

impl Drop for KeyClaim<'_> {
    fn drop(&mut self) {
        lock(&self.inner.keys).pending.remove(&self.key);
        self.inner.key_done.notify(usize::MAX);
    }
}

fn check_key(k: &str) -> Result<(), SubmitError> {
    if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY {
        return Err(SubmitError::Refused(format!(
            "an idempotency key takes 1 to {MAX_IDEMPOTENCY_KEY} bytes; this one has {}",
            k.len()
        )));
    }
    if !k.chars().all(|c| c.is_ascii_graphic()) {
        return Err(SubmitError::Refused(
            "an idempotency key takes printable ASCII characters only, no spaces".into(),
        ));
    }
    if k.starts_with(RESERVED_KEY_PREFIX) {
        return Err(SubmitError::Refused(format!(
            "idempotency keys beginning with {RESERVED_KEY_PREFIX:?} are the daemon's own"
        )));
    }
    Ok(())
}
