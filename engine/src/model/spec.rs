//! What a job is: the specification a user submits.
//!
//! A `JobSpec` is stored whole in the `Submitted` event, so it is part of the on-disk
//! format: fields are only ever appended (with `#[serde(default)]`-free bincode this
//! means a new event variant, see `event.rs`). It holds secret *names* only; their
//! values are resolved at run time and never reach the log.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The resources a job asks for, the unit the scheduler budgets in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Memory limit in MiB (0: runner default).
    pub memory_mib: u64,
    /// Virtual CPUs (0: runner default).
    pub vcpus: u32,
    /// Scratch disk in MiB (0: runner default).
    pub disk_mib: u64,
}

/// One step: a shell command run with `sh -c` in the sandbox's work directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Human name shown in headers and the timeline.
    pub name: String,
    /// The shell command (may span several lines).
    pub command: String,
    /// Step-level environment, applied over the job's.
    pub environment: BTreeMap<String, String>,
    /// Step timeout in milliseconds; `None` means only the job timeout applies.
    pub timeout_ms: Option<u64>,
}

/// A job: a named list of steps, the runner that runs them and what it may use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Human name of the job (not unique; the job id is).
    pub name: String,
    /// Runner plugin name, e.g. `process` or `qemu`.
    pub runner: String,
    /// Image the sandbox boots (ignored by runners without images).
    pub image: Option<String>,
    /// Requested resources.
    pub resources: Resources,
    /// Job-level environment for every step.
    pub environment: BTreeMap<String, String>,
    /// Names of secrets to inject; values never appear in the log.
    pub secrets: Vec<String>,
    /// The steps, run in order; the first failure ends the job.
    pub steps: Vec<StepSpec>,
    /// Whole-job timeout in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Who submitted the job (fair-share key).
    pub owner: String,
}
