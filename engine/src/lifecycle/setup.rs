//! Setting a job's sandbox up: from the slot to the connected agent, each
//! runner call preceded by the event that names what it will create.

use std::time::Instant;

use super::executor::{
    Abort, Executor, JobRun, PLANNED_RESOURCE, UNNAMED_SANDBOX, from_sdk, runner_reason, to_sdk,
};
use super::observer::Report;
use crate::model::event::{Event, Outcome};
use crate::model::state::Phase;
use crate::plugin::{self, LoadedRunner, RunnerError};

impl JobRun<'_> {
    /// Sets up the sandbox. `Some(outcome)` if the job must end instead of
    /// running its steps.
    pub(crate) async fn setup(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<(Outcome, String)>, Abort> {
        let runner = self.runner()?;
        if self.phase == Phase::Queued {
            // A batch grants a job what it asked for; the daemon's scheduler
            // appends its own grant (with the defaults it charged) first.
            let charged = self.spec.resources;
            self.append(Event::SlotGranted { charged }).await?;
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
        // The runner names what it is about to create as notices of this kind
        // (`host::planned_resource`); they are the human-readable half of the
        // intent. A runner that names nothing gets no guessed path: only the
        // handle, which the engine cannot read, knows where its sandbox is.
        let (named, others): (Vec<_>, Vec<_>) = notices
            .into_iter()
            .partition(|(kind, _)| kind == PLANNED_RESOURCE);
        let mut resources: Vec<String> = named.into_iter().map(|(_, m)| m).collect();
        if resources.is_empty() {
            resources.push(UNNAMED_SANDBOX.to_owned());
        }
        // `VolumesFormatted` names the volumes the plan named (resources of kind
        // `volume`): a runner without volumes formats none.
        let volumes: Vec<String> = resources
            .iter()
            .filter_map(|r| r.strip_prefix("volume ").map(str::to_owned))
            .collect();
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
            let result = self.call_runner(&runner, move |r| call(r, &h)).await?;
            let h = match result {
                Ok(h) => from_sdk(h),
                Err(e) => return Ok(Some((Outcome::Failed, runner_reason(what, &e)))),
            };
            self.handle = Some(h.clone());
            match i {
                0 => {
                    self.append(Event::WorkDirCreated { handle: h }).await?;
                    let volumes = volumes.clone();
                    self.append(Event::VolumesFormatted { volumes }).await?;
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
}
