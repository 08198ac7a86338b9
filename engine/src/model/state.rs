//! The job state machine: a pure fold of a job's events. No IO.
//!
//! [`apply`] is the only way a [`JobState`] changes. The event log runs every
//! event through it before writing, so an event the machine rejects never
//! reaches the disk, and the engine's in-memory job table is always the fold of
//! the log.
//!
//! The legal order is
//!
//! ```text
//! Submitted → Queued → SlotGranted → CidAllocated → SandboxPlanned
//!   → WorkDirCreated → VolumesFormatted → BootRequested → VmBooted
//!   → AgentConnected → (StepStarted → StepFinished)*
//!   → TeardownStarted → [Drained → ArtifactStored*] → [PoweredOff] → CleanupStarted+ → Cleaned
//!   → [Reaped] → terminal (Succeeded | Failed | Cancelled | TimedOut | Lost)
//! ```
//!
//! `TeardownStarted` may come from any phase before it (a failed prepare, a
//! cancel while queued); a job that never leased a sandbox id goes from
//! `TeardownStarted` straight to its terminal event. `CancelRequested`,
//! `DeadlinePassed`, `RunnerNotice` and `RecoveryStarted` may come in any
//! non-terminal phase; no step starts after a `CancelRequested` or
//! `DeadlinePassed`.
//! `Reattached` and `Reaped` need a `RecoveryStarted` before them.
//! `ArtifactStored` comes only in phase `Drained` (the steps are done and the
//! sandbox still exists), once per name.

use serde::Serialize;

use crate::model::event::{Event, Handle, JobId, Outcome, Record, Seq};
use crate::model::spec::{JobSpec, Resources};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No event yet.
    New,
    /// `Submitted`.
    Submitted,
    /// Waiting for resources.
    Queued,
    /// Resources granted.
    SlotGranted,
    /// A sandbox id is leased.
    CidAllocated,
    /// The runner named its resources.
    Planned,
    /// Workdir (and cgroup) exist.
    WorkDirCreated,
    /// Volumes are ready.
    VolumesFormatted,
    /// The VM or agent is being started.
    Booting,
    /// The VM or agent runs.
    Booted,
    /// The agent answered; between steps.
    Connected,
    /// A step runs.
    Running,
    /// Teardown decided.
    TearingDown,
    /// Output drained.
    Drained,
    /// VM / agent gone.
    PoweredOff,
    /// Cleanup under way.
    CleaningUp,
    /// Everything removed.
    Cleaned,
    /// Recovery reaped the job.
    Reaped,
    /// The job ended.
    Terminal,
}

impl Phase {
    /// The snake-case name used in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::New => "new",
            Phase::Submitted => "submitted",
            Phase::Queued => "queued",
            Phase::SlotGranted => "slot_granted",
            Phase::CidAllocated => "cid_allocated",
            Phase::Planned => "planned",
            Phase::WorkDirCreated => "workdir_created",
            Phase::VolumesFormatted => "volumes_formatted",
            Phase::Booting => "booting",
            Phase::Booted => "booted",
            Phase::Connected => "connected",
            Phase::Running => "running",
            Phase::TearingDown => "tearing_down",
            Phase::Drained => "drained",
            Phase::PoweredOff => "powered_off",
            Phase::CleaningUp => "cleaning_up",
            Phase::Cleaned => "cleaned",
            Phase::Reaped => "reaped",
            Phase::Terminal => "terminal",
        }
    }

    /// Whether, before any teardown, the runner may have started the VM or
    /// agent in this phase: from `BootRequested` (the agent may exist before its
    /// `VmBooted` lands) to the last step. The one answer to "may an agent be
    /// running?"; during teardown ask [`JobState::agent_may_be_running`], which
    /// looks at the phase teardown started from.
    pub fn agent_may_run(self) -> bool {
        matches!(
            self,
            Phase::Booting | Phase::Booted | Phase::Connected | Phase::Running
        )
    }

    /// Whether the engine holds a connection to the agent in this phase (so
    /// there is buffered output to drain).
    pub fn agent_connected(self) -> bool {
        matches!(self, Phase::Connected | Phase::Running)
    }

    /// Whether teardown has been decided (and not finished): recovery finishes it.
    pub fn tearing_down(self) -> bool {
        matches!(
            self,
            Phase::TearingDown
                | Phase::Drained
                | Phase::PoweredOff
                | Phase::CleaningUp
                | Phase::Cleaned
        )
    }

    /// Whether the job never had a sandbox: it can simply run again.
    pub fn before_sandbox(self) -> bool {
        matches!(
            self,
            Phase::New | Phase::Submitted | Phase::Queued | Phase::SlotGranted
        )
    }
}

/// The result of one step, as far as the log knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StepState {
    /// Step index in the spec.
    pub index: u32,
    /// The agent's exec id.
    pub exec_id: u64,
    /// When it started, Unix ms.
    pub started_ms: u64,
    /// When it ended, Unix ms, once it has.
    pub finished_ms: Option<u64>,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal, if a signal ended it.
    pub signal: Option<i32>,
    /// Whether its timeout ended it.
    pub timed_out: bool,
    /// Bytes of output it produced.
    pub output_bytes: u64,
}

impl StepState {
    /// Whether the step finished with exit code 0.
    pub fn succeeded(&self) -> bool {
        self.finished_ms.is_some() && self.exit_code == Some(0) && !self.timed_out
    }
}

/// One artifact of a job, stored whole (`ArtifactStored`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ArtifactState {
    /// Its path relative to the job's work directory.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The CRC-32C of its bytes.
    pub crc32c: u32,
}

/// The folded state of one job.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobState {
    /// The job.
    pub id: JobId,
    /// Seq of the last event folded (0: none).
    pub seq: Seq,
    /// Where the job is.
    pub phase: Phase,
    /// The phase before the last `TeardownStarted` (what teardown must undo).
    pub phase_before_teardown: Option<Phase>,
    /// The specification, from `Submitted`.
    pub spec: Option<JobSpec>,
    /// When it was submitted, Unix ms.
    pub submitted_ms: Option<u64>,
    /// When it ended, Unix ms.
    pub finished_ms: Option<u64>,
    /// The leased sandbox id, held until `Cleaned`.
    pub cid: Option<u32>,
    /// The runner's latest handle.
    pub handle: Option<Handle>,
    /// Resources the runner's plan named.
    pub planned_resources: Vec<String>,
    /// Volumes formatted for the job.
    pub volumes: Vec<String>,
    /// Steps started so far, in order.
    pub steps: Vec<StepState>,
    /// Outcome decided by `TeardownStarted` (or recorded by the terminal event).
    pub outcome: Option<Outcome>,
    /// Why the job is ending or ended.
    pub reason: Option<String>,
    /// A cancel was requested.
    pub cancel_requested: Option<String>,
    /// The job's deadline passed (why).
    pub deadline_passed: Option<String>,
    /// A recovering engine took the job over (its pid).
    pub recovered_by: Option<u32>,
    /// The recovering engine reattached to the live sandbox.
    pub reattached: bool,
    /// Runner notices, in order.
    pub notices: Vec<String>,
    /// When it was queued, Unix ms (the scheduler's order and aging).
    pub queued_ms: Option<u64>,
    /// When the scheduler granted its slot, Unix ms.
    pub granted_ms: Option<u64>,
    /// What its slot charged against the budget (`SlotGranted`).
    pub charged: Option<Resources>,
    /// Its artifacts stored so far, in the order they were stored.
    pub artifacts: Vec<ArtifactState>,
}

/// An event the state machine refuses in the job's current state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("job {job}: {event} is not allowed in phase {phase} (after seq {seq}): {why}")]
pub struct IllegalTransition {
    /// The job.
    pub job: JobId,
    /// Seq of the last event the state had folded.
    pub seq: Seq,
    /// The phase the job was in.
    pub phase: &'static str,
    /// The refused event's name.
    pub event: &'static str,
    /// Why it was refused.
    pub why: String,
}

impl JobState {
    /// The state of a job with no events yet.
    pub fn new(id: JobId) -> JobState {
        JobState {
            id,
            seq: 0,
            phase: Phase::New,
            phase_before_teardown: None,
            spec: None,
            submitted_ms: None,
            finished_ms: None,
            cid: None,
            handle: None,
            planned_resources: Vec::new(),
            volumes: Vec::new(),
            steps: Vec::new(),
            outcome: None,
            reason: None,
            cancel_requested: None,
            deadline_passed: None,
            recovered_by: None,
            reattached: false,
            notices: Vec::new(),
            queued_ms: None,
            granted_ms: None,
            charged: None,
            artifacts: Vec::new(),
        }
    }

    /// The stored artifact named `name`, if there is one.
    pub fn artifact(&self, name: &str) -> Option<&ArtifactState> {
        self.artifacts.iter().find(|a| a.name == name)
    }

    /// Whether the job has ended.
    pub fn is_terminal(&self) -> bool {
        self.phase == Phase::Terminal
    }

    /// Number of steps in the spec.
    pub fn step_count(&self) -> usize {
        self.spec.as_ref().map_or(0, |s| s.steps.len())
    }

    /// Steps that finished.
    pub fn steps_finished(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.finished_ms.is_some())
            .count()
    }

    /// The step that is running, if one is.
    pub fn running_step(&self) -> Option<&StepState> {
        (self.phase == Phase::Running)
            .then(|| self.steps.last())
            .flatten()
    }

    /// The phase that decides what is held: during teardown, the phase it started from.
    fn holding_phase(&self) -> Phase {
        match self.phase {
            Phase::TearingDown => self.phase_before_teardown.unwrap_or(Phase::New),
            p => p,
        }
    }

    /// Whether the job's agent or VM may be running now: before teardown, as
    /// [`Phase::agent_may_run`] says; during teardown, until `PoweredOff`, if it
    /// may have run when teardown started. Used by the state machine, the
    /// executor's teardown, recovery and the replay tools alike.
    pub fn agent_may_be_running(&self) -> bool {
        match self.phase {
            Phase::TearingDown | Phase::Drained => {
                self.phase_before_teardown.is_some_and(Phase::agent_may_run)
            }
            p => p.agent_may_run(),
        }
    }

    /// What the job holds now and recovery would have to undo, in teardown order.
    pub fn held_resources(&self) -> Vec<String> {
        self.held().into_iter().map(|h| h.to_string()).collect()
    }

    /// What the job holds now, in teardown order.
    pub fn held(&self) -> Vec<Held<'_>> {
        let mut held = Vec::new();
        if matches!(self.phase, Phase::Terminal | Phase::Cleaned | Phase::Reaped) {
            return held;
        }
        let p = self.holding_phase();
        if self.agent_may_be_running() {
            held.push(Held::Agent);
        }
        if self.cid.is_some() && !matches!(p, Phase::CidAllocated) {
            for r in &self.planned_resources {
                held.push(Held::Planned(r));
            }
            // A volume the plan named already (`volume <v>`) is held once.
            for v in &self.volumes {
                let planned = self
                    .planned_resources
                    .iter()
                    .any(|r| r.strip_prefix("volume ") == Some(v.as_str()));
                if !planned {
                    held.push(Held::Volume(v));
                }
            }
        }
        if let Some(cid) = self.cid {
            held.push(Held::Lease(cid));
        }
        held
    }
}

/// One thing a job holds that recovery would have to undo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held<'a> {
    /// The agent or VM process (powered off).
    Agent,
    /// A resource the runner's plan named (workdir, cgroup, socket...).
    Planned(&'a str),
    /// A formatted volume.
    Volume(&'a str),
    /// The sandbox id lease.
    Lease(u32),
}

impl std::fmt::Display for Held<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Held::Agent => f.write_str("agent/VM process (poweroff)"),
            Held::Planned(r) => f.write_str(r),
            Held::Volume(v) => write!(f, "volume {v}"),
            Held::Lease(cid) => write!(f, "sandbox id lease {cid}"),
        }
    }
}

fn illegal(state: &JobState, event: &Event, why: impl Into<String>) -> IllegalTransition {
    IllegalTransition {
        job: state.id,
        seq: state.seq,
        phase: state.phase.as_str(),
        event: event.name(),
        why: why.into(),
    }
}

/// Folds one record into a state, returning the new state. Pure.
pub fn apply(state: &JobState, record: &Record) -> Result<JobState, IllegalTransition> {
    let mut next = state.clone();
    next.apply_mut(record.at_ms, &record.event)?;
    Ok(next)
}

/// Folds a whole history, stopping at the first illegal event.
pub fn fold<'a>(
    id: JobId,
    records: impl IntoIterator<Item = &'a Record>,
) -> Result<JobState, IllegalTransition> {
    let mut state = JobState::new(id);
    for r in records {
        state.apply_mut(r.at_ms, &r.event)?;
    }
    Ok(state)
}

impl JobState {
    /// Checks `event` against the current state without changing it.
    pub fn check(&self, event: &Event) -> Result<(), IllegalTransition> {
        use Phase as P;
        let phase = self.phase;
        let need = |ok: bool, why: &str| {
            if ok {
                Ok(())
            } else {
                Err(illegal(self, event, why))
            }
        };
        if phase == P::Terminal {
            return Err(illegal(self, event, "the job has already ended"));
        }
        match event {
            Event::Submitted { .. } => need(phase == P::New, "a job is submitted once"),
            _ if phase == P::New => Err(illegal(self, event, "the job was never submitted")),
            Event::Queued {} => need(phase == P::Submitted, "only a submitted job is queued"),
            Event::SlotGranted { .. } => {
                need(phase == P::Queued, "only a queued job is granted a slot")
            }
            Event::CidAllocated { .. } => need(
                phase == P::SlotGranted,
                "a sandbox id is leased right after the slot",
            ),
            Event::SandboxPlanned { .. } => need(
                phase == P::CidAllocated,
                "the sandbox is planned after its id is leased",
            ),
            Event::WorkDirCreated { .. } => need(
                phase == P::Planned,
                "the workdir is created after the plan is logged",
            ),
            Event::VolumesFormatted { .. } => {
                need(phase == P::WorkDirCreated, "volumes come after the workdir")
            }
            Event::BootRequested {} => {
                need(phase == P::VolumesFormatted, "boot comes after the volumes")
            }
            Event::VmBooted { .. } => {
                need(phase == P::Booting, "VmBooted needs a BootRequested first")
            }
            Event::AgentConnected { .. } => {
                need(phase == P::Booted, "the agent connects after boot")
            }
            Event::StepStarted { index, .. } => {
                need(
                    phase == P::Connected,
                    "steps start only when connected and no step runs",
                )?;
                need(
                    *index as usize == self.steps.len(),
                    &format!("the next step is {}, not {index}", self.steps.len()),
                )?;
                need(
                    (*index as usize) < self.step_count(),
                    "the spec has no such step",
                )?;
                need(
                    self.steps.iter().all(StepState::succeeded),
                    "a step failed; no further step may start",
                )?;
                need(self.cancel_requested.is_none(), "a cancel was requested")?;
                need(self.deadline_passed.is_none(), "the job's deadline passed")
            }
            Event::StepFinished { index, .. } => {
                need(phase == P::Running, "no step is running")?;
                need(
                    self.steps.last().map(|s| s.index) == Some(*index),
                    "it is not the running step",
                )
            }
            Event::CancelRequested { .. }
            | Event::DeadlinePassed { .. }
            | Event::RunnerNotice { .. }
            | Event::RecoveryStarted { .. } => Ok(()),
            Event::TeardownStarted { outcome, .. } => {
                need(
                    !phase.tearing_down() && phase != P::Reaped,
                    "teardown already started",
                )?;
                need(
                    phase != P::Running,
                    "a step still runs; it must finish first",
                )?;
                if *outcome == Outcome::Succeeded {
                    need(
                        self.steps.len() == self.step_count()
                            && self.steps.iter().all(StepState::succeeded),
                        "success needs every step finished with exit 0",
                    )?;
                }
                if *outcome == Outcome::Lost {
                    need(
                        self.recovered_by.is_some(),
                        "only recovery declares a job lost",
                    )?;
                }
                Ok(())
            }
            Event::Drained {} => need(
                phase == P::TearingDown,
                "drain comes right after teardown starts",
            ),
            Event::PoweredOff {} => need(
                matches!(phase, P::TearingDown | P::Drained),
                "poweroff comes after teardown starts",
            ),
            Event::ArtifactStored { name, .. } => {
                need(
                    phase == P::Drained,
                    "artifacts are stored after the drain, before poweroff",
                )?;
                need(
                    self.artifact(name).is_none(),
                    &format!("artifact {name:?} is already stored"),
                )
            }
            Event::CleanupStarted {} => need(
                matches!(
                    phase,
                    P::TearingDown | P::Drained | P::PoweredOff | P::CleaningUp
                ),
                "cleanup comes after teardown starts",
            ),
            Event::Cleaned {} => need(
                phase == P::CleaningUp,
                "Cleaned needs a CleanupStarted first",
            ),
            Event::Reattached { .. } => {
                need(
                    self.recovered_by.is_some(),
                    "reattach happens only during recovery",
                )?;
                need(
                    self.agent_may_be_running(),
                    "there is no sandbox to reattach to",
                )
            }
            Event::Reaped { .. } => {
                need(
                    self.recovered_by.is_some(),
                    "reaping happens only during recovery",
                )?;
                need(
                    phase == P::Cleaned || (phase == P::TearingDown && self.cid.is_none()),
                    "reaped after cleanup",
                )
            }
            Event::Succeeded {}
            | Event::Failed { .. }
            | Event::Cancelled { .. }
            | Event::TimedOut { .. }
            | Event::Lost { .. } => {
                let outcome = event.terminal_outcome().unwrap_or(Outcome::Lost);
                let ended_cleanly = matches!(phase, P::Cleaned | P::Reaped)
                    || (phase == P::TearingDown && self.cid.is_none());
                need(
                    ended_cleanly,
                    "a job ends only after its sandbox is cleaned",
                )?;
                if outcome == Outcome::Lost {
                    need(
                        self.recovered_by.is_some(),
                        "only recovery declares a job lost",
                    )
                } else {
                    need(
                        self.outcome == Some(outcome),
                        &format!(
                            "teardown decided {}",
                            self.outcome.map_or("nothing", Outcome::as_str)
                        ),
                    )
                }
            }
        }
    }

    /// Folds one event in place. On error the state is unchanged.
    pub fn apply_mut(&mut self, at_ms: u64, event: &Event) -> Result<(), IllegalTransition> {
        self.check(event)?;
        self.seq += 1;
        match event {
            Event::Submitted { spec } => {
                self.spec = Some(spec.clone());
                self.submitted_ms = Some(at_ms);
                self.phase = Phase::Submitted;
            }
            Event::Queued {} => {
                self.queued_ms = Some(at_ms);
                self.phase = Phase::Queued;
            }
            Event::SlotGranted { charged } => {
                self.charged = Some(*charged);
                self.granted_ms = Some(at_ms);
                self.phase = Phase::SlotGranted;
            }
            Event::CidAllocated { cid } => {
                self.cid = Some(*cid);
                self.phase = Phase::CidAllocated;
            }
            Event::SandboxPlanned { handle, resources } => {
                self.handle = Some(handle.clone());
                self.planned_resources = resources.clone();
                self.phase = Phase::Planned;
            }
            Event::WorkDirCreated { handle } => {
                self.handle = Some(handle.clone());
                self.phase = Phase::WorkDirCreated;
            }
            Event::VolumesFormatted { volumes } => {
                self.volumes = volumes.clone();
                self.phase = Phase::VolumesFormatted;
            }
            Event::BootRequested {} => self.phase = Phase::Booting,
            Event::VmBooted { handle } => {
                self.handle = Some(handle.clone());
                self.phase = Phase::Booted;
            }
            Event::AgentConnected { handle } => {
                self.handle = Some(handle.clone());
                self.phase = Phase::Connected;
            }
            Event::StepStarted { index, exec_id } => {
                self.steps.push(StepState {
                    index: *index,
                    exec_id: *exec_id,
                    started_ms: at_ms,
                    ..StepState::default()
                });
                self.phase = Phase::Running;
            }
            Event::StepFinished {
                exit_code,
                signal,
                timed_out,
                output_bytes,
                ..
            } => {
                if let Some(step) = self.steps.last_mut() {
                    step.finished_ms = Some(at_ms);
                    step.exit_code = *exit_code;
                    step.signal = *signal;
                    step.timed_out = *timed_out;
                    step.output_bytes = *output_bytes;
                }
                self.phase = Phase::Connected;
            }
            Event::CancelRequested { reason } => {
                self.cancel_requested.get_or_insert_with(|| reason.clone());
            }
            Event::DeadlinePassed { reason } => {
                self.deadline_passed.get_or_insert_with(|| reason.clone());
            }
            Event::TeardownStarted { outcome, reason } => {
                self.phase_before_teardown = Some(self.phase);
                self.outcome = Some(*outcome);
                self.reason = Some(reason.clone());
                self.phase = Phase::TearingDown;
            }
            Event::Drained {} => self.phase = Phase::Drained,
            Event::ArtifactStored { name, size, crc32c } => self.artifacts.push(ArtifactState {
                name: name.clone(),
                size: *size,
                crc32c: *crc32c,
            }),
            Event::PoweredOff {} => self.phase = Phase::PoweredOff,
            Event::CleanupStarted {} => self.phase = Phase::CleaningUp,
            Event::Cleaned {} => {
                self.cid = None;
                self.phase = Phase::Cleaned;
            }
            Event::Succeeded {}
            | Event::Failed { .. }
            | Event::Cancelled { .. }
            | Event::TimedOut { .. }
            | Event::Lost { .. } => {
                if let Event::Lost { reason } = event {
                    self.outcome = Some(Outcome::Lost);
                    self.reason = Some(reason.clone());
                }
                self.finished_ms = Some(at_ms);
                self.phase = Phase::Terminal;
            }
            Event::RecoveryStarted { engine_pid } => self.recovered_by = Some(*engine_pid),
            Event::Reattached { handle } => {
                self.handle = Some(handle.clone());
                self.reattached = true;
            }
            Event::Reaped { .. } => self.phase = Phase::Reaped,
            Event::RunnerNotice { message } => self.notices.push(message.clone()),
        }
        Ok(())
    }
}
