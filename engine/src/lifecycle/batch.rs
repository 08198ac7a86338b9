//! Running a batch of jobs N at a time: the slot logic `reel run -j N` and
//! `reel recover -j N` share (and the daemon's scheduler will grow from).
//!
//! Jobs are dispatched in the order given. A job that needs a slot waits for
//! one; when the batch is cancelled first, a queued job ends `Cancelled`
//! without ever taking a slot (its `CancelRequested` is logged before that).
//! Recovered jobs that already hold a sandbox (reattach, finish teardown,
//! reap) need no slot and proceed at once. Every job's outcome is collected,
//! with the reason the log records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::executor::{ExecError, Executor};
use super::observer::{Cancel, Observer, Report};
use super::recover::{Action, Assessment, recover};
use crate::input::secrets::{ResolvedSecrets, SecretError};
use crate::model::event::{JobId, Outcome};
use crate::model::spec::JobSpec;

/// What to do with one job of a batch.
#[derive(Debug)]
pub enum Work {
    /// A queued job: run it when a slot is free.
    Run {
        /// Its spec, as submitted.
        spec: Box<JobSpec>,
        /// Its secrets' values.
        secrets: ResolvedSecrets,
    },
    /// A job a dead engine left: carry out its assessment.
    Recover {
        /// What recovery decided.
        assessment: Box<Assessment>,
        /// Its secrets' values, or why the recovering engine has none.
        secrets: Result<ResolvedSecrets, SecretError>,
    },
}

impl Work {
    /// Whether the job must wait for a slot: a job that never had a sandbox.
    fn needs_slot(&self) -> bool {
        match self {
            Work::Run { .. } => true,
            Work::Recover { assessment, .. } => assessment.action == Action::Requeue,
        }
    }
}

/// One job of a batch.
#[derive(Debug)]
pub struct BatchJob {
    /// The job (already in the log).
    pub job: JobId,
    /// Its name.
    pub name: String,
    /// What to do.
    pub work: Work,
}

/// How one job of a batch ended.
#[derive(Debug)]
pub struct Finished {
    /// The job.
    pub job: JobId,
    /// Its name.
    pub name: String,
    /// How it ended (`Failed` when the engine could not finish it).
    pub outcome: Outcome,
    /// Why, as the log records it.
    pub reason: String,
    /// From dispatch to end.
    pub duration: Duration,
    /// Why the engine could not finish it, if it could not.
    pub error: Option<ExecError>,
}

/// Runs `jobs` with at most `parallel` of those that need a slot at a time
/// (at least one), in order; returns how each ended, in order. A skipped
/// recovery (its runner is not loaded) has no entry.
pub async fn run(
    executor: &Arc<Executor>,
    jobs: Vec<BatchJob>,
    parallel: u32,
    cancel: &Cancel,
    observer: Arc<dyn Observer>,
) -> Vec<Finished> {
    let parallel = parallel.max(1) as usize;
    let (slots_tx, slots_rx) = async_channel::bounded::<()>(parallel);
    for _ in 0..parallel {
        // Cannot fail: the channel has room for every slot and is open.
        let _ = slots_tx.try_send(());
    }
    let mut tasks = Vec::new();
    for item in jobs {
        let slot = if item.work.needs_slot() {
            smol::future::or(async { slots_rx.recv().await.ok() }, async {
                cancel.cancelled().await;
                None
            })
            .await
        } else {
            None
        };
        let (executor, cancel, observer) = (executor.clone(), cancel.clone(), observer.clone());
        let slots_tx = slots_tx.clone();
        tasks.push(smol::spawn(async move {
            let result = run_one(&executor, &item, slot.is_some(), &cancel, &*observer).await;
            if slot.is_some() {
                let _ = slots_tx.send(()).await;
            }
            result
        }));
    }
    let mut finished = Vec::new();
    for t in tasks {
        if let Some(f) = t.await {
            finished.push(f);
        }
    }
    finished
}

async fn run_one(
    executor: &Executor,
    item: &BatchJob,
    has_slot: bool,
    cancel: &Cancel,
    observer: &dyn Observer,
) -> Option<Finished> {
    let started = Instant::now();
    let job = item.job;
    let result = match &item.work {
        Work::Run { .. } if !has_slot || cancel.reason().is_some() => {
            // The batch was cancelled before the job started.
            let reason = cancel.reason().unwrap_or_else(|| "cancelled".into());
            executor
                .end_unstarted(job, Outcome::Cancelled, &reason)
                .await
                .map(|()| Some(Outcome::Cancelled))
                .map_err(ExecError::from)
        }
        Work::Run { spec, secrets } => {
            observer.report(Report::Dispatched { job });
            executor
                .run(job, spec, secrets, cancel, observer)
                .await
                .map(Some)
        }
        Work::Recover {
            assessment,
            secrets,
        } => {
            if has_slot {
                observer.report(Report::Dispatched { job });
            }
            recover(executor, assessment, secrets, cancel, observer).await
        }
    };
    let (outcome, error) = match result {
        Ok(Some(o)) => (o, None),
        Ok(None) => return None,
        Err(e) => (Outcome::Failed, Some(e)),
    };
    let reason = executor
        .log()
        .fold(job)
        .ok()
        .and_then(|s| s.reason)
        .unwrap_or_default();
    Some(Finished {
        job,
        name: item.name.clone(),
        outcome,
        reason,
        duration: started.elapsed(),
        error,
    })
}
