//! Tearing a job's sandbox down: the decision (`TeardownStarted` with its
//! outcome) is durable first; then drain, the collection of the job's
//! artifacts (in phase `Drained`), poweroff and cleanup run for what the log
//! says exists, each logged; the terminal event comes last. Recovery resumes
//! an interrupted teardown from the logged phase with the same code.

use std::sync::Arc;
use std::time::Duration;

use super::artifacts::declared;
use super::executor::{ExecError, JobRun, to_sdk};
use crate::model::event::{Event, Outcome};
use crate::plugin::{self, LoadedRunner};
use crate::store::LogError;

/// How long a graceful poweroff may take before the runner must force it.
const POWEROFF_DEADLINE_MS: u64 = 10_000;
/// Cleanup attempts before the job is left live for `reel recover`.
const CLEANUP_ATTEMPTS: u32 = 3;

impl JobRun<'_> {
    /// Records the decision, drains a connected sandbox's buffered output, and
    /// tears down what the log says exists. A `Lost` outcome (recovery reaping
    /// a dead sandbox) has nothing to drain and also records `Reaped`.
    pub(crate) async fn start_teardown(
        &mut self,
        outcome: Outcome,
        reason: &str,
    ) -> Result<(), ExecError> {
        let connected = self.phase.agent_connected();
        let asked = self
            .ex
            .log()
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
        if connected && outcome != Outcome::Lost {
            self.drain().await?;
        } else if outcome == Outcome::Lost && !self.spec.artifacts.is_empty() {
            let ran = self
                .ex
                .log()
                .live_with(self.job, |s| !s.steps.is_empty())
                .unwrap_or(false);
            if ran {
                let m = format!(
                    "the sandbox was lost: {} not collected",
                    declared(self.spec.artifacts.len())
                );
                self.note(m).await?;
            }
        }
        self.teardown(outcome, reason).await
    }

    /// Asks the runner to flush the agent's buffered output; a failure is put
    /// on the record as a notice (and then no artifact is collected: they are
    /// collected only from a drained sandbox).
    pub(crate) async fn drain(&mut self) -> Result<(), LogError> {
        let (Ok(runner), Some(handle)) = (self.ex.runner(&self.spec.runner), &self.handle) else {
            return Ok(());
        };
        let h = to_sdk(handle);
        match self.call_runner(&runner, move |r| r.drain(&h)).await? {
            Ok(()) => self.append(Event::Drained {}).await,
            Err(e) => {
                let mut m = format!("drain failed: {e}");
                if !self.spec.artifacts.is_empty() {
                    m.push_str(&format!(
                        "; {} not collected",
                        declared(self.spec.artifacts.len())
                    ));
                }
                self.note(m).await
            }
        }
    }

    /// Carries out a decided teardown from where the log says it stands
    /// (`TearingDown`, `Drained`, `PoweredOff`, `CleaningUp` or `Cleaned`) and
    /// ends the job: the artifacts not stored yet in phase `Drained`, poweroff
    /// while the log says an agent may be running, cleanup while a lease is
    /// held, then `Reaped` (for `Lost`) and the terminal event.
    pub(crate) async fn teardown(
        &mut self,
        outcome: Outcome,
        reason: &str,
    ) -> Result<(), ExecError> {
        self.collect_artifacts().await?;
        let runner = self.ex.runner(&self.spec.runner).ok();
        if let (Some(runner), Some(handle)) = (runner, self.handle.clone()) {
            let h = to_sdk(&handle);
            let agent = self
                .ex
                .log()
                .live_with(self.job, |s| s.agent_may_be_running())
                .unwrap_or(false);
            if agent {
                self.poweroff(&runner, &h).await?;
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

    /// Powers the sandbox off gracefully (never past `POWEROFF_DEADLINE_MS`,
    /// after which the runner forces it) and records it; a failure is recorded
    /// as a notice, since cleanup kills what is left.
    async fn poweroff(
        &mut self,
        runner: &Arc<LoadedRunner>,
        h: &plugin::Handle,
    ) -> Result<(), LogError> {
        let hh = h.clone();
        match self
            .call_runner(runner, move |r| r.poweroff(&hh, true, POWEROFF_DEADLINE_MS))
            .await?
        {
            Ok(()) => self.append(Event::PoweredOff {}).await,
            Err(e) => {
                self.note(format!(
                    "poweroff failed, cleanup will kill what is left: {e}"
                ))
                .await
            }
        }
    }

    /// `CleanupStarted`, the runner's idempotent cleanup (retried), `Cleaned`.
    /// A cleanup that keeps failing leaves the job live for `reel recover` and
    /// never claims `Cleaned`.
    async fn cleanup(
        &mut self,
        runner: &Arc<LoadedRunner>,
        h: &plugin::Handle,
    ) -> Result<(), ExecError> {
        self.append(Event::CleanupStarted {}).await?;
        let mut last = None;
        for attempt in 0..CLEANUP_ATTEMPTS {
            let hh = h.clone();
            match self.call_runner(runner, move |r| r.cleanup(&hh)).await? {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    smol::Timer::after(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
        if let Some(source) = last {
            self.append(Event::RunnerNotice {
                message: format!("cleanup failed: {source}"),
            })
            .await?;
            return Err(ExecError::CleanupFailed {
                job: self.job,
                source,
            });
        }
        self.append(Event::Cleaned {}).await?;
        Ok(())
    }
}
