//! Recovery: taking over the live jobs of an engine that died.
//!
//! For each job in the log's live set, [`assess`] folds its events, asks the
//! runner to `probe` the sandbox the log names (by pid *and* start time), and
//! decides:
//!
//! - **requeue** — the job never had a sandbox (`Submitted`, `Queued`,
//!   `SlotGranted`): it runs again from the queue, in its original order;
//! - **reattach** — the probe says alive *and* reattachable, and the runner
//!   declares `reattach` (and `resume`, if a step was running): the job carries
//!   on; `reattach`, then `exec` of the running step with its `exec_id` and
//!   `resume_from` = the bytes the log holds, which the runner takes back
//!   (nothing lost, nothing duplicated, its exit status collected); the
//!   remaining steps run;
//! - **finish teardown** — teardown had been decided: it goes on from where the
//!   log says it stopped and the job ends with the outcome already decided;
//! - **reap** — the sandbox is gone (or never finished being set up, or is alive
//!   but the runner cannot take it back): whatever
//!   is left is powered off and cleaned up from the handle the log holds (the
//!   runner's intent names every resource, so even one created just before the
//!   crash is found), then `Reaped` and a terminal `Lost` with the reason.
//!
//! Every action starts with `RecoveryStarted` and is logged like any other run,
//! so a crash during recovery is itself recovered.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::executor::{Abort, ExecError, Executor, JobRun, Resume, Runners, from_sdk, to_sdk};
use super::observer::{Cancel, Observer, Report};
use crate::input::secrets::{ResolvedSecrets, SecretError};
use crate::model::event::{Event, JobId, Outcome};
use crate::model::state::{Held, JobState, Phase};
use crate::plugin::Capability;
use crate::store::output::FrameError;
use crate::store::{LogError, LogReader, error_line};
use crate::time::now_ms;

/// What recovery will do with one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Run the job from the queue.
    Requeue,
    /// Reattach to the live sandbox and carry on.
    Reattach {
        /// The running step to resume (index) and the output offset it resumes at.
        resume_step: Option<u32>,
        /// Bytes of that step's output the log already holds.
        resume_from: u64,
        /// Steps still to run after it.
        steps_left: usize,
    },
    /// Finish the teardown that was decided, ending with its outcome.
    FinishTeardown {
        /// The outcome teardown decided.
        outcome: Outcome,
    },
    /// Remove what is left and end the job `Lost`.
    Reap {
        /// Why the job cannot go on.
        reason: String,
    },
    /// Nothing can be done now (the runner is not loaded); the job stays live.
    Skip {
        /// Why.
        reason: String,
    },
}

/// What recovery found about one live job and what it will do.
#[derive(Clone, Debug, Serialize)]
pub struct Assessment {
    /// The job.
    pub job: JobId,
    /// Its name.
    pub name: String,
    /// Its phase in the log.
    pub phase: &'static str,
    /// Whether the sandbox's agent/VM is alive, if it was probed.
    pub alive: Option<bool>,
    /// What the probe said.
    pub probe: Option<String>,
    /// What the job holds, per the log.
    pub holds: Vec<String>,
    /// The decision.
    #[serde(flatten)]
    pub action: Action,
    /// Why, in a sentence.
    pub why: String,
}

/// What the log alone says recovery will do with a job: the one answer to
/// "what would recovery do?", used by [`assess`] (which then probes) and by the
/// replay tools (which only read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The job has ended: nothing.
    Nothing,
    /// It never had a sandbox: run it again from the queue.
    Requeue,
    /// Only the lease exists: release it, end the job lost.
    ReleaseLease,
    /// The sandbox was being set up and no agent can run: remove what exists.
    RemoveSetup,
    /// An agent may be running: probe it; reattach if alive, else reap.
    ProbeAgent,
    /// Teardown was decided: finish it with the decided outcome.
    FinishTeardown {
        /// The outcome teardown decided.
        outcome: Outcome,
    },
    /// It was reaped: only the terminal event is missing.
    AppendTerminal,
}

/// Decides, from the log alone, what recovery does with a job in `state`.
pub fn plan(state: &JobState) -> Plan {
    let p = state.phase;
    if p == Phase::Terminal {
        Plan::Nothing
    } else if p.before_sandbox() {
        Plan::Requeue
    } else if p == Phase::CidAllocated {
        Plan::ReleaseLease
    } else if p == Phase::Reaped {
        Plan::AppendTerminal
    } else if p.tearing_down() {
        Plan::FinishTeardown {
            outcome: state.outcome.unwrap_or(Outcome::Lost),
        }
    } else if p.agent_may_run() {
        Plan::ProbeAgent
    } else {
        Plan::RemoveSetup
    }
}

/// What recovery would do with a job in `state`, step by step in words (for
/// `inspect` and `replay`, which do not probe).
pub fn outlook(state: &JobState) -> Vec<String> {
    let removals = |v: &mut Vec<String>| {
        for h in state.held() {
            match h {
                Held::Agent => v.push("power the agent/VM off".into()),
                other => v.push(format!("remove {other}")),
            }
        }
    };
    let mut v = Vec::new();
    match plan(state) {
        Plan::Nothing => v.push("nothing: the job has ended".into()),
        Plan::Requeue if state.phase == Phase::SlotGranted => {
            v.push("release the slot and queue the job again".into());
        }
        Plan::Requeue => v.push("queue the job again in its original order".into()),
        Plan::ReleaseLease | Plan::RemoveSetup => {
            removals(&mut v);
            v.push("end the job lost".into());
        }
        Plan::ProbeAgent => {
            v.push(
                "probe the sandbox (pid and start time); reattach and resume if it is alive".into(),
            );
            v.push("otherwise power it off".into());
            for h in state.held().into_iter().filter(|h| *h != Held::Agent) {
                v.push(format!("remove {h}"));
            }
        }
        Plan::FinishTeardown { outcome } => {
            v.push(format!(
                "finish the teardown decided before the crash (outcome {})",
                outcome.as_str()
            ));
            if let Some(n) = artifacts_to_collect(state) {
                v.push(format!(
                    "collect the artifacts not stored yet ({} stored; {})",
                    state.artifacts.len(),
                    super::artifacts::declared(n)
                ));
            }
            removals(&mut v);
        }
        Plan::AppendTerminal => v.push("append the terminal event".into()),
    }
    v
}

/// Decides what to do with a live job: [`plan`], then a probe of the sandbox
/// (by pid *and* start time) where one may exist. Changes nothing, so it runs
/// as well on a read-only copy of a dead engine's log (`recover --dry-run`).
pub async fn assess(runners: &Runners, log: &LogReader, state: &JobState) -> Assessment {
    let spec = state.spec.clone().unwrap_or_default();
    let mut a = Assessment {
        job: state.id,
        name: spec.name.clone(),
        phase: state.phase.as_str(),
        alive: None,
        probe: None,
        holds: state.held_resources(),
        action: Action::Requeue,
        why: String::new(),
    };
    let teardown_from = state.phase_before_teardown.unwrap_or(Phase::New);
    let plan = plan(state);
    match plan {
        Plan::Nothing | Plan::Requeue => {
            a.why = match &state.cancel_requested {
                Some(r) => format!("it was cancelled while it waited ({r}): it ends cancelled"),
                None => {
                    "it never had a sandbox: it runs again from the queue, in its original order"
                        .into()
                }
            };
            return a;
        }
        Plan::ReleaseLease => {
            a.action = Action::Reap {
                reason: "the engine died before the runner planned the sandbox; nothing was created but the lease".into(),
            };
            a.why = "no sandbox exists; the lease is released".into();
            return a;
        }
        Plan::AppendTerminal => {
            a.action = Action::Reap {
                reason: state.reason.clone().unwrap_or_else(|| "reaped".into()),
            };
            a.why = "it was reaped; only its terminal event is missing".into();
            return a;
        }
        Plan::RemoveSetup | Plan::ProbeAgent | Plan::FinishTeardown { .. } => {}
    }
    let runner = match runners.get(&spec.runner) {
        Ok(r) => r,
        Err(e) => {
            a.action = Action::Skip {
                reason: e.to_string(),
            };
            a.why = format!("cannot reach its sandbox: {e}; it stays unfinished");
            return a;
        }
    };
    let Some(handle) = state.handle.clone() else {
        if let Plan::FinishTeardown { outcome } = plan {
            // Teardown was decided before any sandbox was named (only a lease
            // at most): it is finished, with nothing to probe.
            a.action = Action::FinishTeardown { outcome };
            a.why = format!(
                "teardown was decided ({}) before the engine died, with no sandbox named; it is finished from where the log stopped",
                outcome.as_str()
            );
            return a;
        }
        a.action = Action::Reap {
            reason: "no sandbox handle was logged".into(),
        };
        a.why = "nothing of the sandbox is named in the log".into();
        return a;
    };
    let h = to_sdk(&handle);
    let probe = runner.unblock(move |r| r.probe(&h)).await;
    let (alive, reattachable, detail) = match probe {
        Ok(p) => (p.alive, p.reattachable, p.detail),
        Err(e) => (false, false, format!("probe failed: {e}")),
    };
    a.alive = Some(alive);
    a.probe = Some(detail.clone());
    if let Plan::FinishTeardown { outcome } = plan {
        a.action = Action::FinishTeardown { outcome };
        a.why = format!(
            "teardown was decided ({}) before the engine died (from phase {}); it is finished from where the log stopped",
            outcome.as_str(),
            teardown_from.as_str()
        );
        return a;
    }
    let running = state.running_step().map(|s| s.index);
    // Any damaged frame of the running step's output (a torn tail excepted:
    // it was never acknowledged, and is cut), read in bounded memory.
    let damaged = running.and_then(|i| {
        log.output(state.id, i, 0)
            .find_map(|c| match c {
                Err(LogError::CorruptOutput {
                    source: FrameError::Torn { .. },
                    ..
                })
                | Ok(_) => None,
                Err(e) => Some(e),
            })
            .map(|e| (i, e))
    });
    if let (Some((i, e)), true) = (&damaged, alive && reattachable && plan == Plan::ProbeAgent) {
        // Output the agent was told to drop is gone: resuming would leave a gap.
        let reason = format!(
            "the stored output of step {} is damaged ({}); it cannot be resumed without a gap",
            i + 1,
            error_line(e)
        );
        a.why = format!("{reason}; the sandbox is removed and the job ends lost");
        a.action = Action::Reap { reason };
        return a;
    }
    // Only what the runner declares is asked of it: a runner that cannot
    // reattach, or cannot take a running step back, has its live sandbox removed.
    let cannot = if !runner.has(Capability::Reattach) {
        Some("it does not declare `reattach`, so the sandbox cannot be taken back".to_owned())
    } else {
        running
            .filter(|_| !runner.has(Capability::Resume))
            .map(|i| {
                format!(
                    "it does not declare `resume`, so the running step {} cannot be taken back",
                    i + 1
                )
            })
    };
    if let (Some(cannot), true) = (&cannot, alive && reattachable && plan == Plan::ProbeAgent) {
        let reason = format!(
            "the sandbox is alive ({detail}), but runner `{}` {cannot}",
            spec.runner
        );
        a.why = format!("{reason}; it is removed and the job ends lost");
        a.action = Action::Reap { reason };
        return a;
    }
    if alive && reattachable && plan == Plan::ProbeAgent {
        let from = match running {
            Some(i) => log.output_end(state.id, i).unwrap_or(0),
            None => 0,
        };
        let done = state.steps_finished();
        let steps_left = state
            .step_count()
            .saturating_sub(done + usize::from(running.is_some()));
        a.why = match running {
            Some(i) => format!(
                "the sandbox is alive ({detail}): reattach, resume step {} from byte {from}, then {steps_left} more step(s)",
                i + 1
            ),
            None => format!(
                "the sandbox is alive ({detail}): reattach and run the {steps_left} remaining step(s)"
            ),
        };
        a.action = Action::Reattach {
            resume_step: running,
            resume_from: from,
            steps_left,
        };
        return a;
    }
    let reason = if plan == Plan::ProbeAgent && alive {
        format!("the sandbox is alive but the runner cannot reattach it: {detail}")
    } else if plan == Plan::ProbeAgent {
        format!("the sandbox is gone: {detail}")
    } else {
        format!(
            "the engine died while setting the sandbox up (phase {}); {detail}",
            state.phase.as_str()
        )
    };
    a.why = format!("{reason}; what is left is removed and the job ends lost");
    a.action = Action::Reap { reason };
    a
}

/// The job's deadline as an `Instant`, from its submission time and timeout.
fn deadline(state: &JobState) -> Option<Instant> {
    let timeout = state.spec.as_ref()?.timeout_ms?;
    let end_ms = state.submitted_ms? + timeout;
    let now = now_ms();
    Some(Instant::now() + Duration::from_millis(end_ms.saturating_sub(now)))
}

/// Carries out an assessment. Returns the job's outcome once its terminal event
/// is durable (or `None` for a skipped job).
/// Takes back a job a dead engine left before it had a sandbox (the
/// `Requeue` action): logs `RecoveryStarted`, queues it if it never was, and
/// ends it `Cancelled` if a cancel had been asked for. `Some(outcome)` when it
/// ended; `None` when it waits for its slot again (phase `Queued`) or already
/// holds one (phase `SlotGranted`: the caller runs it without a new grant).
pub async fn take_back_unstarted(
    ex: &Executor,
    state: &JobState,
) -> Result<Option<Outcome>, LogError> {
    let (log, job) = (ex.log(), state.id);
    log.append(
        job,
        Event::RecoveryStarted {
            engine_pid: std::process::id(),
        },
    )
    .await?;
    if state.phase == Phase::Submitted {
        log.append(job, Event::Queued {}).await?;
    }
    if let Some(reason) = &state.cancel_requested {
        // Cancelled while it waited: it does not run again.
        ex.end_unstarted(job, Outcome::Cancelled, reason).await?;
        return Ok(Some(Outcome::Cancelled));
    }
    Ok(None)
}

pub async fn recover(
    ex: &Executor,
    assessment: &Assessment,
    secrets: &Result<ResolvedSecrets, SecretError>,
    cancel: &Cancel,
    observer: &dyn Observer,
) -> Result<Option<Outcome>, ExecError> {
    let job = assessment.job;
    let log = ex.log();
    let Some(state) = log.live_state(job) else {
        return Ok(None);
    };
    let spec = state.spec.clone().unwrap_or_default();
    if let Action::Skip { .. } = assessment.action {
        return Ok(None);
    }
    let started = Instant::now();
    if assessment.action == Action::Requeue {
        if let Some(outcome) = take_back_unstarted(ex, &state).await? {
            return Ok(Some(outcome));
        }
        return match secrets {
            Ok(s) => ex.run(job, &spec, s, cancel, observer).await.map(Some),
            Err(e) => {
                ex.end_unstarted(job, Outcome::Failed, &secrets_reason(e))
                    .await?;
                Ok(Some(Outcome::Failed))
            }
        };
    }
    log.append(
        job,
        Event::RecoveryStarted {
            engine_pid: std::process::id(),
        },
    )
    .await?;
    let mut run = JobRun {
        ex,
        job,
        spec: &spec,
        observer,
        cancel,
        handle: state.handle.clone(),
        phase: state.phase,
        cid: state.cid,
    };
    let (outcome, reason) = match &assessment.action {
        Action::FinishTeardown { outcome } => {
            finish_teardown(&mut run, &state, *outcome).await?;
            (*outcome, state.reason.clone().unwrap_or_default())
        }
        Action::Reap { reason } => {
            reap(&mut run, &state, reason).await?;
            (Outcome::Lost, reason.clone())
        }
        Action::Reattach {
            resume_step,
            resume_from,
            ..
        } => {
            let decided =
                reattach_and_run(&mut run, &state, *resume_step, *resume_from, secrets).await;
            let (outcome, reason) = match decided {
                Ok(x) => x,
                Err(Abort::Log(e)) => return Err(e.into()),
                Err(Abort::Runner(e)) => return Err(e),
            };
            run.start_teardown(outcome, &reason).await?;
            (outcome, reason)
        }
        // Handled above.
        Action::Requeue | Action::Skip { .. } => return Ok(None),
    };
    observer.report(Report::Finished {
        job,
        outcome,
        reason: &reason,
        duration: started.elapsed(),
    });
    Ok(Some(outcome))
}

/// Why a job whose secrets the recovering engine cannot resolve ends failed.
/// Why a job whose secrets cannot be resolved fails, as the log records it.
pub fn secrets_reason(e: &SecretError) -> String {
    format!("the recovering engine cannot resolve the job's secrets: {e}")
}

async fn reattach_and_run(
    run: &mut JobRun<'_>,
    state: &JobState,
    resume_step: Option<u32>,
    resume_from: u64,
    secrets: &Result<ResolvedSecrets, SecretError>,
) -> Result<(Outcome, String), Abort> {
    let runner = run.runner()?;
    let h = to_sdk(run.handle.as_ref().unwrap_or(&Default::default()));
    let reattached = run.call_runner(&runner, move |r| r.reattach(&h)).await?;
    let handle = match reattached {
        Ok(h) => from_sdk(h),
        Err(e) => {
            end_running_step(run, state, resume_from).await?;
            return Ok((
                Outcome::Lost,
                format!("the sandbox was alive but reattaching failed: {e}"),
            ));
        }
    };
    run.handle = Some(handle.clone());
    run.append(Event::Reattached {
        handle: handle.clone(),
    })
    .await?;
    if run.phase == Phase::Booting {
        run.append(Event::VmBooted {
            handle: handle.clone(),
        })
        .await?;
    }
    if run.phase == Phase::Booted {
        run.append(Event::AgentConnected { handle }).await?;
    }
    // A logged intent to stop is honoured: the dead engine may have died
    // before (or after) it signalled the step.
    let stop = match (secrets, &state.cancel_requested, &state.deadline_passed) {
        (_, Some(reason), _) => Some((Outcome::Cancelled, reason.clone())),
        (_, None, Some(reason)) => Some((Outcome::TimedOut, reason.clone())),
        (Err(e), None, None) => Some((Outcome::Failed, secrets_reason(e))),
        (Ok(_), None, None) => None,
    };
    if let Some(stop) = stop {
        // The step still runs in the sandbox; teardown stops it.
        end_running_step(run, state, resume_from).await?;
        return Ok(stop);
    }
    let Ok(secrets) = secrets else {
        return Ok((Outcome::Failed, "secrets unavailable".into()));
    };
    let resume = resume_step.and_then(|index| {
        state.running_step().map(|s| Resume {
            index,
            exec_id: s.exec_id,
            from: resume_from,
        })
    });
    run.run_steps(secrets, deadline(state), resume).await
}

/// Records the step that was running as ended without an exit status; its
/// output is what the log holds. Teardown needs no step running.
async fn end_running_step(
    run: &mut JobRun<'_>,
    state: &JobState,
    stored: u64,
) -> Result<(), Abort> {
    if let Some(step) = state.running_step() {
        run.append(Event::StepFinished {
            index: step.index,
            exit_code: None,
            signal: None,
            timed_out: false,
            output_bytes: stored,
        })
        .await?;
    }
    Ok(())
}

async fn finish_teardown(
    run: &mut JobRun<'_>,
    state: &JobState,
    outcome: Outcome,
) -> Result<(), ExecError> {
    let reason = state.reason.clone().unwrap_or_default();
    // The output of finished steps is already stored; a sandbox that was to be
    // drained is drained now only for its artifacts, which are collected from
    // a drained sandbox (`teardown` collects them in phase `Drained`, also when
    // the engine died in the middle of collecting).
    if undrained_artifacts(state) {
        run.drain().await?;
    }
    run.teardown(outcome, &reason).await
}

/// Whether the job died between its `TeardownStarted` and its `Drained`, with
/// artifacts to collect from a sandbox that was connected: recovery drains it
/// first.
fn undrained_artifacts(state: &JobState) -> bool {
    state.phase == Phase::TearingDown
        && state
            .phase_before_teardown
            .is_some_and(Phase::agent_connected)
        && state.outcome != Some(Outcome::Lost)
        && state.spec.as_ref().is_some_and(|s| !s.artifacts.is_empty())
}

/// The declared artifact patterns of a job recovery would still collect from,
/// if it would: in phase `Drained` (or about to be drained again).
fn artifacts_to_collect(state: &JobState) -> Option<usize> {
    let n = state.spec.as_ref()?.artifacts.len();
    (n > 0 && (state.phase == Phase::Drained || undrained_artifacts(state))).then_some(n)
}

async fn reap(run: &mut JobRun<'_>, state: &JobState, reason: &str) -> Result<(), ExecError> {
    if state.phase.tearing_down() {
        // A teardown already decided is finished, never decided twice.
        let outcome = state.outcome.unwrap_or(Outcome::Lost);
        return run.teardown(outcome, reason).await;
    }
    if state.phase == Phase::Reaped {
        run.append(Event::Lost {
            reason: reason.to_string(),
        })
        .await?;
        return Ok(());
    }
    // The step's sandbox is gone: it ended without an exit status, with the
    // output stored up to any damage.
    let stored = match state.running_step() {
        Some(step) => intact_output_end(run.ex.log(), run.job, step.index),
        None => 0,
    };
    end_running_step(run, state, stored).await?;
    run.start_teardown(Outcome::Lost, reason).await
}

/// Where a step's stored output ends, up to the first damaged frame if any.
pub(crate) fn intact_output_end(log: &LogReader, job: JobId, step: u32) -> u64 {
    log.output(job, step, 0)
        .map_while(Result::ok)
        .last()
        .map_or(0, |c| c.offset + c.bytes.len() as u64)
}
