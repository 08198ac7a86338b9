//! What a job is: the specification a user submits.
//!
//! A `JobSpec` is stored whole in the `Submitted` event, so it is part of the on-disk
//! format: fields are only ever appended (with `#[serde(default)]`-free bincode this
//! means a new event variant, see `event.rs`). It holds secret *names* only; their
//! values are resolved at run time and never reach the log.
//!
//! # Size limits
//!
//! A job whose stored form could not be read back, or whose steps could not be
//! started, is refused before anything is written ([`JobSpec::check_size`], called
//! by the job-file parser and again by [`EventLog::submit`]):
//!
//! | limit | what it bounds | why |
//! |---|---|---|
//! | [`MAX_SPEC_BYTES`] (8 MiB) | the spec as stored in its `Submitted` event | half of the envelope's decode limit ([`MAX_ENVELOPE`], 16 MiB): the event, and any runner handle that copies part of the spec, stay readable |
//! | [`MAX_STEP_BYTES`] (768 KiB) | one step's command and environment | a runner sends them to its agent in one message of at most 1 MiB |
//! | [`MAX_EXEC_STRING`] (128 KiB) | the command, or one `NAME=value` | Linux refuses to exec a longer argument or environment string |
//!
//! [`EventLog::submit`]: crate::store::EventLog::submit
//! [`MAX_ENVELOPE`]: crate::model::codec::MAX_ENVELOPE

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::codec;

/// The most a job's specification may take in the log: its bincode payload as
/// stored in the `Submitted` event. Half of the envelope's 16 MiB decode limit, so
/// that event and any runner handle holding part of the spec (the process
/// runner's keeps the job's environment) are always readable again.
pub const MAX_SPEC_BYTES: usize = 8 * 1024 * 1024;

/// The most one step's command and environment may take together, counted as
/// `exec` counts them: the command and every `NAME=value` of the step's
/// environment (the job's under the step's own), each with its terminating NUL.
///
/// A runner hands all of it to its agent in one `ExecStart` message, and the
/// agent protocol caps a message at 1 MiB (`reel_agent::proto::MAX_PAYLOAD`). The
/// other 256 KiB is room for what is added at run time: secret values, `PATH`,
/// `HOME`, `CI`, `REEL_JOB_ID` and the message's own encoding. The engine does
/// not depend on the agent, so `tests/all/limits.rs` (which sees both) fails if
/// the agent's cap ever drops below this limit plus that room.
pub const MAX_STEP_BYTES: usize = 768 * 1024;

/// The most one exec string may take, its terminating NUL included: a step's
/// command, or one `NAME=value` of its environment. Every runner starts a step as
/// `sh -c COMMAND`, and Linux refuses to exec an argument or environment string
/// longer than 32 pages (`MAX_ARG_STRLEN`, 128 KiB with 4 KiB pages).
pub const MAX_EXEC_STRING: usize = 128 * 1024;

/// The resources a job asks for, the unit the scheduler budgets in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    /// Paths (globs relative to the work directory) copied out of the sandbox
    /// when its steps are done, before it is powered off (see
    /// [`check_artifact_pattern`]).
    pub artifacts: Vec<String>,
    /// When the engine runs the job again by itself.
    pub retry: Retry,
    /// How long a cancelled step gets after each of SIGINT and SIGTERM before
    /// the next signal (`None`: the runner's default).
    pub cancel_grace_ms: Option<u64>,
    /// Where the job came from: its idempotency key and, for a retry, the
    /// attempt it repeats.
    pub origin: Origin,
    /// The network its sandbox gets (format 3).
    pub network: Network,
}

/// The network a job's sandbox gets (`network:` in a job file): the plugin
/// SDK's type, so the runner sees exactly what the log holds. Its encoding is
/// part of the log's format (kind 32) as of the ABI's: variants are only
/// appended.
pub use reel_plugin_sdk::Network;

/// When a job is run again without being asked (`retry:` in a job file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// How many more attempts a job that ends `Lost` (its engine died and its
    /// sandbox could not be taken back) gets. A failed step is never retried.
    pub lost: u32,
}

/// Where a job came from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The submitter's idempotency key: a second submission with the same key
    /// names this job instead of making another.
    pub idempotency_key: Option<String>,
    /// The job this one is a new attempt of (a retry after `Lost`).
    pub retry_of: Option<u64>,
    /// Earlier attempts of this job: 0 for a first submission, 1 for its
    /// first retry, and so on.
    pub retries: u32,
}

/// A job's specification as stored by kind 1 (`Submitted`, format 1), before
/// artifacts, retries, cancel grace and origin existed. Read only, upcast to
/// [`JobSpec`] with those empty.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct JobSpecV1 {
    name: String,
    runner: String,
    image: Option<String>,
    resources: Resources,
    environment: BTreeMap<String, String>,
    secrets: Vec<String>,
    steps: Vec<StepSpec>,
    timeout_ms: Option<u64>,
    owner: String,
}

/// A job's specification as stored by kind 29 (`Submitted`, format 2), before
/// the network choice existed. Read only, upcast to [`JobSpec`] with the
/// runner's default network.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct JobSpecV2 {
    name: String,
    runner: String,
    image: Option<String>,
    resources: Resources,
    environment: BTreeMap<String, String>,
    secrets: Vec<String>,
    steps: Vec<StepSpec>,
    timeout_ms: Option<u64>,
    owner: String,
    artifacts: Vec<String>,
    retry: Retry,
    cancel_grace_ms: Option<u64>,
    origin: Origin,
}

impl From<JobSpecV2> for JobSpec {
    fn from(v: JobSpecV2) -> JobSpec {
        JobSpec {
            name: v.name,
            runner: v.runner,
            image: v.image,
            resources: v.resources,
            environment: v.environment,
            secrets: v.secrets,
            steps: v.steps,
            timeout_ms: v.timeout_ms,
            owner: v.owner,
            artifacts: v.artifacts,
            retry: v.retry,
            cancel_grace_ms: v.cancel_grace_ms,
            origin: v.origin,
            network: Network::Default,
        }
    }
}

/// Each old format is read as its successor, and that as the next: a new
/// format adds one conversion and leaves the older ones alone.
impl From<JobSpecV1> for JobSpecV2 {
    fn from(v: JobSpecV1) -> JobSpecV2 {
        JobSpecV2 {
            name: v.name,
            runner: v.runner,
            image: v.image,
            resources: v.resources,
            environment: v.environment,
            secrets: v.secrets,
            steps: v.steps,
            timeout_ms: v.timeout_ms,
            owner: v.owner,
            artifacts: Vec::new(),
            retry: Retry::default(),
            cancel_grace_ms: None,
            origin: Origin::default(),
        }
    }
}

impl From<JobSpecV1> for JobSpec {
    fn from(v: JobSpecV1) -> JobSpec {
        JobSpecV2::from(v).into()
    }
}

/// Why a job is too large to be accepted. Nothing of it was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The stored spec would be over [`MAX_SPEC_BYTES`].
    #[error(
        "the job takes {size} bytes when stored, over the {} limit on a job",
        size_text(MAX_SPEC_BYTES)
    )]
    TooLarge {
        /// The spec's stored size in bytes.
        size: usize,
    },
    /// A step's command and environment would be over [`MAX_STEP_BYTES`].
    #[error("{}", step_too_large(*.step, .name, *.size))]
    StepTooLarge {
        /// The step's index in the spec (from 0; messages number steps from 1);
        /// `None` for the job's own environment, which every step carries.
        step: Option<usize>,
        /// The step's name.
        name: String,
        /// Its command and environment in bytes, counted as `exec` counts them.
        size: usize,
    },
    /// A command or one environment variable would be over [`MAX_EXEC_STRING`].
    #[error("{}: {}", step_label(*.step, .name), exec_string_problem(.what, *.size))]
    ExecStringTooLong {
        /// The step's index, or `None` for the job's environment.
        step: Option<usize>,
        /// The step's name.
        name: String,
        /// `the command` or `environment variable NAME`.
        what: String,
        /// Its size with the terminating NUL (and `=` for a variable).
        size: usize,
    },
}

fn step_too_large(step: Option<usize>, name: &str, size: usize) -> String {
    let limit = size_text(MAX_STEP_BYTES);
    let what = match step {
        Some(_) => format!(
            "{}: its command and environment (the job's under its own) take",
            step_label(step, name)
        ),
        None => "the job's environment, which every step carries, takes".to_string(),
    };
    format!(
        "{what} {size} bytes, over the {limit} limit on one step: a runner's agent receives a step in one message of at most 1 MiB"
    )
}

fn step_label(step: Option<usize>, name: &str) -> String {
    match step {
        Some(i) => format!("step {} \"{}\"", i + 1, name.escape_default()),
        None => "the job's environment".to_string(),
    }
}

/// What is wrong with a command or variable over [`MAX_EXEC_STRING`]: `what` is
/// `the command` or `environment variable NAME`, `size` its exec size.
pub fn exec_string_problem(what: &str, size: usize) -> String {
    format!(
        "{what} takes {size} bytes, over the {} limit on one command or variable: Linux cannot start a process with a longer argument or environment string",
        size_text(MAX_EXEC_STRING)
    )
}

/// `8 MiB (8388608 bytes)`: a limit in the unit it is documented in, and exactly.
pub fn size_text(bytes: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB ({bytes} bytes)", bytes / MIB)
    } else if bytes.is_multiple_of(KIB) {
        format!("{} KiB ({bytes} bytes)", bytes / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// Checks one artifact pattern of a job: a path relative to the job's work
/// directory (`*`, `?` and `**` allowed), not empty, not absolute, without a
/// `..` segment or a NUL, at most 4 KiB. The runner checks it again, against
/// what is really in the sandbox.
pub fn check_artifact_pattern(pattern: &str) -> Result<(), String> {
    let p = pattern.escape_default();
    if pattern.contains('\0') {
        return Err(format!("artifact \"{p}\" holds a NUL byte"));
    }
    if pattern.len() > 4096 {
        return Err(format!("artifact \"{p}\" is longer than 4096 bytes"));
    }
    if pattern.starts_with('/') {
        return Err(format!(
            "artifact \"{p}\" is an absolute path: artifacts are relative to the work directory"
        ));
    }
    if pattern.split('/').any(|s| s == "..") {
        return Err(format!(
            "artifact \"{p}\" has a \"..\" segment: artifacts stay inside the work directory"
        ));
    }
    if pattern.split('/').all(|s| s.is_empty() || s == ".") {
        return Err(format!(
            "artifact \"{p}\" names no path inside the work directory (\"**\" means every file)"
        ));
    }
    Ok(())
}

/// The size of a command as `exec` sees it: its bytes and a NUL.
pub fn command_exec_size(command: &str) -> usize {
    command.len() + 1
}

/// The size of an environment variable as `exec` sees it: `NAME=value` and a NUL.
pub fn variable_exec_size(name: &str, value: &str) -> usize {
    name.len() + value.len() + 2
}

/// Checks one command against [`MAX_EXEC_STRING`]; the parser calls it on each
/// command as it reads it, so the error can point at the line.
pub fn check_command(command: &str) -> Result<(), usize> {
    let size = command_exec_size(command);
    if size > MAX_EXEC_STRING {
        return Err(size);
    }
    Ok(())
}

/// Checks one environment variable against [`MAX_EXEC_STRING`].
pub fn check_variable(name: &str, value: &str) -> Result<(), usize> {
    let size = variable_exec_size(name, value);
    if size > MAX_EXEC_STRING {
        return Err(size);
    }
    Ok(())
}

impl JobSpec {
    /// The spec's size as stored in its `Submitted` event (the bincode payload).
    pub fn stored_size(&self) -> usize {
        codec::encoded_len(self)
    }

    /// Refuses a job that could not be stored and read back, or whose steps could
    /// not be started: see the module documentation for the limits. The one
    /// check, called before anything of the job is written (by the job-file
    /// parser, and by `EventLog::submit` for every front end).
    pub fn check_size(&self) -> Result<(), SpecError> {
        let mut job_env = 0;
        for (var, value) in &self.environment {
            variable_limit(None, "", var, value)?;
            job_env += variable_exec_size(var, value);
        }
        if job_env > MAX_STEP_BYTES {
            return Err(SpecError::StepTooLarge {
                step: None,
                name: String::new(),
                size: job_env,
            });
        }
        for (i, step) in self.steps.iter().enumerate() {
            if let Err(size) = check_command(&step.command) {
                return Err(SpecError::ExecStringTooLong {
                    step: Some(i),
                    name: step.name.clone(),
                    what: "the command".to_string(),
                    size,
                });
            }
            // The step's environment replaces the job's variables of the same name.
            let mut size = job_env + command_exec_size(&step.command);
            for (var, value) in &step.environment {
                variable_limit(Some(i), &step.name, var, value)?;
                size += variable_exec_size(var, value);
                if let Some(under) = self.environment.get(var) {
                    size -= variable_exec_size(var, under);
                }
            }
            if size > MAX_STEP_BYTES {
                return Err(SpecError::StepTooLarge {
                    step: Some(i),
                    name: step.name.clone(),
                    size,
                });
            }
        }
        let size = self.stored_size();
        if size > MAX_SPEC_BYTES {
            return Err(SpecError::TooLarge { size });
        }
        Ok(())
    }
}

fn variable_limit(
    step: Option<usize>,
    name: &str,
    var: &str,
    value: &str,
) -> Result<(), SpecError> {
    check_variable(var, value).map_err(|size| SpecError::ExecStringTooLong {
        step,
        name: name.to_string(),
        what: format!("environment variable {}", var.escape_default()),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(command: &str, env: &[(&str, &str)]) -> StepSpec {
        StepSpec {
            name: "s".into(),
            command: command.into(),
            environment: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            timeout_ms: None,
        }
    }

    #[test]
    fn a_variable_at_the_exec_limit_passes_and_one_byte_more_is_refused() {
        let name = "V";
        let fits = "x".repeat(MAX_EXEC_STRING - name.len() - 2);
        let mut spec = JobSpec {
            steps: vec![step("true", &[(name, &fits)])],
            ..JobSpec::default()
        };
        assert_eq!(spec.check_size(), Ok(()));
        spec.steps[0].environment.insert(name.into(), fits + "x");
        assert_eq!(
            spec.check_size(),
            Err(SpecError::ExecStringTooLong {
                step: Some(0),
                name: "s".into(),
                what: "environment variable V".into(),
                size: MAX_EXEC_STRING + 1,
            })
        );
    }

    #[test]
    fn a_step_counts_the_job_environment_under_its_own() {
        let value = "x".repeat(120 * 1024);
        let var = |name: &str| variable_exec_size(name, &value);
        // Six job variables of 120 KiB; the step replaces one of them with a short
        // value and adds one of its own. Counting the replaced value as well
        // would take it over the limit.
        let job: BTreeMap<String, String> =
            (0..6).map(|i| (format!("J{i}"), value.clone())).collect();
        let mut spec = JobSpec {
            environment: job,
            steps: vec![step("true", &[("J0", "short"), ("S1", &value)])],
            ..JobSpec::default()
        };
        assert!(6 * var("J0") + var("S1") + 5 > MAX_STEP_BYTES);
        assert_eq!(spec.check_size(), Ok(()));
        // A second variable of its own takes the step over.
        spec.steps[0].environment.insert("S2".into(), value.clone());
        let size = 5 * var("J1") + variable_exec_size("J0", "short") + 2 * var("S1") + 5;
        assert!(size > MAX_STEP_BYTES);
        assert_eq!(
            spec.check_size(),
            Err(SpecError::StepTooLarge {
                step: Some(0),
                name: "s".into(),
                size,
            })
        );
    }

    #[test]
    fn a_spec_over_the_stored_limit_is_refused_with_its_size() {
        let command = "x".repeat(100 * 1024);
        let spec = JobSpec {
            steps: (0..90).map(|_| step(&command, &[])).collect(),
            ..JobSpec::default()
        };
        let size = spec.stored_size();
        assert_eq!(size, codec::encode_payload(&spec).len());
        assert!(size > MAX_SPEC_BYTES);
        assert_eq!(spec.check_size(), Err(SpecError::TooLarge { size }));
        assert!(
            SpecError::TooLarge { size }
                .to_string()
                .contains("over the 8 MiB (8388608 bytes) limit"),
        );
    }
}
