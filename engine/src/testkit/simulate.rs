//! A scripted job lifecycle, appended to a real log without running anything.
//!
//! This exists so the log, the replay tool and the benchmarks have realistic
//! histories to work on independently of any runner: it appends exactly the
//! events the executor appends for a job, with plausible output, and nothing
//! else. It never touches a sandbox.

use crate::model::event::{Event, Handle, JobId, Outcome};
use crate::model::spec::{JobSpec, StepSpec};
use crate::store::{EventLog, LogError, Stream};

/// How a simulated job should end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Every step exits 0.
    Success,
    /// Step `n` exits 1.
    FailAt(u32),
    /// Stop after `n` steps have finished, leaving the job live (as a crashed engine would).
    StopAfter(u32),
}

/// A spec with `steps` steps that print numbered lines.
pub fn spec(name: &str, steps: u32) -> JobSpec {
    JobSpec {
        name: name.to_string(),
        runner: "process".to_string(),
        owner: "simulator".to_string(),
        steps: (0..steps)
            .map(|i| StepSpec {
                name: format!("step {i}"),
                command: format!("for n in 1 2 3; do echo step {i} line $n; done"),
                ..StepSpec::default()
            })
            .collect(),
        ..JobSpec::default()
    }
}

/// Appends a job's lifecycle; returns its id.
pub async fn run_job(
    log: &EventLog,
    spec: JobSpec,
    cid: u32,
    ending: Ending,
) -> Result<JobId, LogError> {
    let steps = u32::try_from(spec.steps.len()).unwrap_or(u32::MAX);
    let job = log.submit(spec).await?;
    let workdir = format!("{}/sandboxes/{cid}", log.dir().display());
    let handle = |stage: &str| Handle {
        version: 1,
        bytes: format!("{workdir}|{stage}").into_bytes(),
    };
    log.append(job, Event::Queued {}).await?;
    log.append(
        job,
        Event::SlotGranted {
            charged: Default::default(),
        },
    )
    .await?;
    log.append(job, Event::CidAllocated { cid }).await?;
    log.append(
        job,
        Event::SandboxPlanned {
            handle: handle("planned"),
            resources: vec![format!("workdir {workdir}"), format!("cgroup reel-{cid}")],
        },
    )
    .await?;
    log.append(
        job,
        Event::WorkDirCreated {
            handle: handle("prepared"),
        },
    )
    .await?;
    log.append(job, Event::VolumesFormatted { volumes: vec![] })
        .await?;
    log.append(job, Event::BootRequested {}).await?;
    log.append(
        job,
        Event::VmBooted {
            handle: handle("booted"),
        },
    )
    .await?;
    log.append(
        job,
        Event::AgentConnected {
            handle: handle("connected"),
        },
    )
    .await?;
    let mut outcome = Outcome::Succeeded;
    let mut reason = String::new();
    for index in 0..steps {
        if ending == Ending::StopAfter(index) {
            return Ok(job);
        }
        log.append(
            job,
            Event::StepStarted {
                index,
                exec_id: u64::from(index) + 1,
            },
        )
        .await?;
        let mut offset = 0;
        for n in 1..=3 {
            let line = format!("step {index} line {n}\n").into_bytes();
            let len = line.len() as u64;
            log.append_output(job, index, offset, Stream::Stdout, line)
                .await?;
            offset += len;
        }
        let failed = ending == Ending::FailAt(index);
        log.append(
            job,
            Event::StepFinished {
                index,
                exit_code: Some(i32::from(failed)),
                signal: None,
                timed_out: false,
                output_bytes: offset,
            },
        )
        .await?;
        if failed {
            outcome = Outcome::Failed;
            reason = format!("step {index} exited with code 1");
            break;
        }
    }
    if ending == Ending::StopAfter(steps) {
        return Ok(job);
    }
    log.append(
        job,
        Event::TeardownStarted {
            outcome,
            reason: reason.clone(),
        },
    )
    .await?;
    log.append(job, Event::Drained {}).await?;
    log.append(job, Event::PoweredOff {}).await?;
    log.append(job, Event::CleanupStarted {}).await?;
    log.append(job, Event::Cleaned {}).await?;
    log.append(job, Event::terminal(outcome, reason)).await?;
    Ok(job)
}

/// A log of three jobs in `dir`, for the replay tools' tests: job 1
/// succeeds, job 2 fails at step 1, job 3 stops mid-way (left live, as an
/// engine that died would leave it).
pub fn write_sample_log(dir: &std::path::Path) -> Result<(), LogError> {
    let log = EventLog::open(dir, crate::store::LogOptions::default())?;
    smol::block_on(async {
        run_job(&log, spec("ok", 3), 1, Ending::Success).await?;
        run_job(&log, spec("bad", 3), 2, Ending::FailAt(1)).await?;
        run_job(&log, spec("stuck", 3), 3, Ending::StopAfter(1)).await
    })?;
    log.close();
    Ok(())
}
