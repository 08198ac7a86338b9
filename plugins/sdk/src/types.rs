//! The boundary types: everything a plugin and the engine exchange, and nothing else.
//!
//! They cross the C ABI as bincode envelopes (see [`crate::codec`]). The engine also
//! stores [`Handle`]s in its event log, so changing a field here changes what the log
//! holds: add fields only with a new ABI minor and keep old ones decodable.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A runner's opaque, versioned record of the resources of one job.
///
/// The engine never looks inside: it logs the handle after each step of the
/// lifecycle and gives it back, possibly to a new process after a restart. `version`
/// is the runner's own format version of `bytes`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Handle {
    /// The runner's format version of `bytes`.
    pub version: u32,
    /// The runner's state, in a format only the runner reads.
    pub bytes: Vec<u8>,
}

impl Handle {
    /// Encodes `state` as the bytes of a handle with the given format version.
    pub fn encode<T: Serialize>(version: u32, state: &T) -> Result<Handle, RunnerError> {
        Ok(Handle {
            version,
            bytes: crate::codec::encode(state)?,
        })
    }

    /// Decodes the state, refusing a handle of another format version.
    pub fn decode<T: DeserializeOwned>(&self, version: u32) -> Result<T, RunnerError> {
        if self.version != version {
            return Err(RunnerError::invalid_input(format!(
                "handle format version {} is not the version {version} this runner reads",
                self.version
            )));
        }
        crate::codec::decode(&self.bytes)
            .map_err(|e| RunnerError::invalid_input(format!("malformed handle: {}", e.message)))
    }
}

/// What a runner says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Description {
    /// The runner's name, as jobs select it (e.g. `"process"`).
    pub name: String,
    /// The runner's own version.
    pub version: String,
    /// The ABI major the runner was built against.
    pub abi_major: u32,
    /// The ABI minor the runner was built against.
    pub abi_minor: u32,
    /// What the runner can do, by name: the [`Capability`] names the engine acts
    /// on (build them with [`Capability::names`]), and any other strings, which
    /// `reel plugins` shows and the engine ignores.
    pub capabilities: Vec<String>,
}

impl Description {
    /// Whether the description declares `capability`.
    pub fn has(&self, capability: Capability) -> bool {
        Capability::declared(&self.capabilities, capability)
    }
}

/// A capability the engine acts on. On the wire (in [`Description::capabilities`])
/// each is its [`name`](Capability::name); a runner that lacks one is still run,
/// and the engine does without it as each variant says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// `"cancel"`: [`Runner::cancel`] makes a running `exec` return promptly with a
    /// non-success result. Without it the engine still records a cancel or a
    /// passed job deadline (`CancelRequested` / `DeadlinePassed`), but never calls
    /// `cancel`: it records a notice and waits for the step to end by itself.
    Cancel,
    /// `"timeout"`: `exec` enforces [`StepRequest::timeout_ms`] itself and reports
    /// `timed_out`. Without it the engine warns, when a job is validated, about
    /// every step that sets a timeout (nobody will enforce it).
    Timeout,
    /// `"reattach"`: after an engine restart, [`Runner::probe`] can report a live
    /// sandbox as `reattachable` and [`Runner::reattach`] takes it back. Without it
    /// recovery never calls `reattach`: a live sandbox is powered off and cleaned
    /// up, and its job ends lost.
    Reattach,
    /// `"resume"`: after `reattach`, `exec` with the running step's `exec_id` and
    /// `resume_from` > 0 takes that step back (it never runs it again), streams its
    /// output from `resume_from` on and returns its exit status, even when it ended
    /// while no engine ran. Without it, recovery reattaches only a sandbox with no
    /// step running; one with a running step is reaped and its job ends lost.
    Resume,
    /// `"collect"` (ABI 1.2): [`Runner::collect`] copies the files a job declares
    /// as artifacts out of its sandbox, as [`CollectRequest`] says. Without it (or
    /// from a plugin built against an older minor, whose table has no `collect`)
    /// the engine records a notice that the job's declared paths were not
    /// collected, and goes on.
    Collect,
}

impl Capability {
    /// Every capability the engine acts on.
    pub const ALL: [Capability; 5] = [
        Capability::Cancel,
        Capability::Timeout,
        Capability::Reattach,
        Capability::Resume,
        Capability::Collect,
    ];

    /// The capability's name in [`Description::capabilities`].
    pub const fn name(self) -> &'static str {
        match self {
            Capability::Cancel => "cancel",
            Capability::Timeout => "timeout",
            Capability::Reattach => "reattach",
            Capability::Resume => "resume",
            Capability::Collect => "collect",
        }
    }

    /// The capability named `name`, if the engine knows it.
    pub fn from_name(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The names of `capabilities`, for [`Description::capabilities`].
    pub fn names(capabilities: &[Capability]) -> Vec<String> {
        capabilities.iter().map(|c| c.name().to_owned()).collect()
    }

    /// Whether `names` (a description's capability strings) declares `capability`.
    pub fn declared(names: &[String], capability: Capability) -> bool {
        names.iter().any(|n| n == capability.name())
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Configuration given once, when the engine creates a runner instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerConfig {
    /// The directory under which the runner keeps per-job state (workdirs, sockets).
    pub sandbox_root: PathBuf,
    /// The directory the plugin was loaded from.
    pub plugin_dir: PathBuf,
    /// Runner-specific options from the engine configuration.
    pub options: BTreeMap<String, String>,
}

/// Resources a job asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Scratch disk in MiB.
    pub disk_mib: u64,
}

/// One job, as the runner sees it.
///
/// Fields are only appended, each with an ABI minor: an engine encodes the
/// request in the form of the plugin's minor ([`JobRequest::encode_for_minor`]),
/// and the SDK's glue decodes either form ([`JobRequest::decode_any`]), filling
/// a field the engine did not send with its default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    /// The engine's job id.
    pub job_id: u64,
    /// The engine's sandbox slot; unique among live jobs.
    pub sandbox_id: u32,
    /// The job's name.
    pub name: String,
    /// The image to boot, for runners that boot one.
    pub image: Option<String>,
    /// Requested resources.
    pub resources: Resources,
    /// Environment for every step.
    pub environment: BTreeMap<String, String>,
    /// 1.2: how long a cancelled step gets after each signal of the cancel
    /// ladder (SIGINT, then SIGTERM, then SIGKILL) before the next one (the job
    /// file's `cancel_grace`). `None`: the runner's own default. A runner keeps
    /// it with the job (in its handle: a recovering engine's cancel must use it
    /// too) and uses it for every [`Runner::cancel`] of the job's steps. From an
    /// engine of ABI 1.1 or older it is always `None`.
    pub cancel_grace_ms: Option<u64>,
    /// 1.3: the network the job's sandbox gets (the job file's `network:`).
    /// [`Network::Default`] is the runner's own choice; a runner refuses in
    /// `validate` a choice it cannot honour. An engine of ABI 1.2 or older
    /// always sends `Default`, and an engine of 1.3 refuses a job that asks
    /// for more of a plugin of an older minor.
    pub network: Network,
}

/// The network a job's sandbox gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The runner's default (none for a microVM; the host's for the process runner).
    #[default]
    Default,
    /// No network at all.
    None,
    /// Outbound NAT to the internet, the host itself and private ranges unreachable.
    User,
}

impl Network {
    /// Every choice.
    pub const ALL: [Network; 3] = [Network::Default, Network::None, Network::User];

    /// The job file's spelling: `default`, `none` or `user`.
    pub fn name(self) -> &'static str {
        match self {
            Network::Default => "default",
            Network::None => "none",
            Network::User => "user",
        }
    }

    /// The choice a job file's word names.
    pub fn parse(word: &str) -> Option<Network> {
        Network::ALL.into_iter().find(|n| n.name() == word)
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// [`JobRequest`] as ABI 1.2 encodes it: without `network`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequestV1_2 {
    /// See [`JobRequest::job_id`].
    pub job_id: u64,
    /// See [`JobRequest::sandbox_id`].
    pub sandbox_id: u32,
    /// See [`JobRequest::name`].
    pub name: String,
    /// See [`JobRequest::image`].
    pub image: Option<String>,
    /// See [`JobRequest::resources`].
    pub resources: Resources,
    /// See [`JobRequest::environment`].
    pub environment: BTreeMap<String, String>,
    /// See [`JobRequest::cancel_grace_ms`].
    pub cancel_grace_ms: Option<u64>,
}

impl From<JobRequestV1_2> for JobRequest {
    fn from(v: JobRequestV1_2) -> JobRequest {
        JobRequest {
            job_id: v.job_id,
            sandbox_id: v.sandbox_id,
            name: v.name,
            image: v.image,
            resources: v.resources,
            environment: v.environment,
            cancel_grace_ms: v.cancel_grace_ms,
            network: Network::Default,
        }
    }
}

impl From<&JobRequest> for JobRequestV1_2 {
    fn from(j: &JobRequest) -> JobRequestV1_2 {
        JobRequestV1_2 {
            job_id: j.job_id,
            sandbox_id: j.sandbox_id,
            name: j.name.clone(),
            image: j.image.clone(),
            resources: j.resources.clone(),
            environment: j.environment.clone(),
            cancel_grace_ms: j.cancel_grace_ms,
        }
    }
}

/// [`JobRequest`] as ABI 1.0 and 1.1 encode it: without `cancel_grace_ms`. An
/// engine sends this form to a plugin of an older minor; the glue reads it from
/// an older engine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequestV1_1 {
    /// See [`JobRequest::job_id`].
    pub job_id: u64,
    /// See [`JobRequest::sandbox_id`].
    pub sandbox_id: u32,
    /// See [`JobRequest::name`].
    pub name: String,
    /// See [`JobRequest::image`].
    pub image: Option<String>,
    /// See [`JobRequest::resources`].
    pub resources: Resources,
    /// See [`JobRequest::environment`].
    pub environment: BTreeMap<String, String>,
}

// Each older form converts to and from its successor only, so a new minor
// adds one pair of conversions and leaves the older ones alone.
impl From<JobRequestV1_1> for JobRequestV1_2 {
    fn from(v: JobRequestV1_1) -> JobRequestV1_2 {
        JobRequestV1_2 {
            job_id: v.job_id,
            sandbox_id: v.sandbox_id,
            name: v.name,
            image: v.image,
            resources: v.resources,
            environment: v.environment,
            cancel_grace_ms: None,
        }
    }
}

impl From<JobRequestV1_2> for JobRequestV1_1 {
    fn from(v: JobRequestV1_2) -> JobRequestV1_1 {
        JobRequestV1_1 {
            job_id: v.job_id,
            sandbox_id: v.sandbox_id,
            name: v.name,
            image: v.image,
            resources: v.resources,
            environment: v.environment,
        }
    }
}

impl From<JobRequestV1_1> for JobRequest {
    fn from(v: JobRequestV1_1) -> JobRequest {
        JobRequestV1_2::from(v).into()
    }
}

impl From<&JobRequest> for JobRequestV1_1 {
    fn from(j: &JobRequest) -> JobRequestV1_1 {
        JobRequestV1_2::from(j).into()
    }
}

impl JobRequest {
    /// The envelope of this request for a plugin built against ABI minor
    /// `minor`: the 1.2 form (without `network`) for 1.2, the 1.1 form
    /// (without the fields appended since) below. The fields left out must be
    /// at their defaults: a plugin that cannot see a choice cannot honour it.
    pub fn encode_for_minor(&self, minor: u32) -> Result<Vec<u8>, RunnerError> {
        if minor < 3 && self.network != Network::Default {
            return Err(RunnerError::invalid_input(format!(
                "the job asks for network: {}, but the runner was built against ABI 1.{minor}, \
                 which has no network choice (1.3 has)",
                self.network
            )));
        }
        match minor {
            0..=1 => crate::codec::encode(&JobRequestV1_1::from(self)),
            2 => crate::codec::encode(&JobRequestV1_2::from(self)),
            _ => crate::codec::encode(self),
        }
    }

    /// Decodes a request an engine of any 1.x minor encoded: the current form,
    /// else the 1.2 or the 1.1 form with the fields appended since left at
    /// their defaults. (Exactly one of them decodes: each older form is a
    /// strict prefix of the newer.)
    pub fn decode_any(bytes: &[u8]) -> Result<JobRequest, RunnerError> {
        match crate::codec::decode::<JobRequest>(bytes) {
            Ok(job) => Ok(job),
            Err(current) => crate::codec::decode::<JobRequestV1_2>(bytes)
                .map(JobRequest::from)
                .or_else(|_| crate::codec::decode::<JobRequestV1_1>(bytes).map(JobRequest::from))
                .map_err(|_| current),
        }
    }
}

/// One step to execute inside a prepared, booted and connected job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRequest {
    /// The engine's id of this execution; `cancel` names it.
    pub exec_id: u64,
    /// The step's position in the job.
    pub index: u32,
    /// The step's name.
    pub name: String,
    /// The command line, interpreted by the runner (usually `sh -c`).
    pub command: String,
    /// Environment on top of the job's.
    pub environment: BTreeMap<String, String>,
    /// Kill the step after this long and report `timed_out`.
    pub timeout_ms: Option<u64>,
    /// Output offset already stored by the engine; chunks before it may be skipped.
    pub resume_from: u64,
}

/// What the engine asks of [`Runner::collect`]: copy the files the job's
/// `patterns` match out of its sandbox into `dest_dir`, within a byte cap.
///
/// A runner must
///
/// - match each pattern against paths relative to the job's work directory
///   (`*` and `?` within one path segment, `**` for any number of segments; a
///   pattern that names a directory collects every file below it), refusing a
///   pattern that is absolute or has a `..` segment (with a notice, not an
///   error) and never reading outside the work directory: symbolic links are
///   not followed, and only regular files are collected;
/// - copy each file to `dest_dir/<name>` (`name` its path relative to the work
///   directory, `/`-separated) **only through a partial copy in `partial_dir`**
///   that is synced and then renamed into place (with the directories below
///   `dest_dir` created and synced): a file under `dest_dir` is always a whole
///   copy ([`crate::artifacts::PartialFile`] does exactly this);
/// - copy the files in name order, skipping those in `already` (stored by an
///   earlier, interrupted collection of the job) but counting their sizes, and
///   stop before the first file that would take the total past
///   `max_total_bytes`, naming it in [`Collection::cap_reached_at`]; what was
///   copied stays.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectRequest {
    /// Globs relative to the job's work directory (the job file's `artifacts`).
    pub patterns: Vec<String>,
    /// Where each artifact goes, as `dest_dir/<name>`. Exists.
    pub dest_dir: PathBuf,
    /// Where partial copies are written until they are complete and synced;
    /// outside `dest_dir`. Exists; the engine empties it before and after.
    pub partial_dir: PathBuf,
    /// The most bytes the job's artifacts may take in all, `already` included.
    pub max_total_bytes: u64,
    /// Names already stored for this job: not copied again, counted against the cap.
    pub already: Vec<String>,
}

/// One artifact [`Runner::collect`] copied: whole, synced and in place under the
/// request's `dest_dir`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    /// Its path relative to the job's work directory, `/`-separated; the file is
    /// `dest_dir/<name>`.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The CRC-32C (Castagnoli) of its bytes.
    pub crc32c: u32,
}

/// What [`Runner::collect`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collection {
    /// The files copied by this call, in the order they were copied.
    pub collected: Vec<Collected>,
    /// How many files the patterns matched, copied or not (`already` included).
    pub matched: u64,
    /// The first file not copied because it would have taken the total past
    /// `max_total_bytes`, if the cap stopped the collection.
    pub cap_reached_at: Option<String>,
}

/// Which output stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a step ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The exit code, if the step exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the step, if one did.
    pub signal: Option<i32>,
    /// Whether the runner ended the step because `timeout_ms` passed.
    pub timed_out: bool,
    /// Total bytes of combined output, equal to the end offset of the last chunk.
    pub output_bytes: u64,
}

impl ExecResult {
    /// Whether the step exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && self.signal.is_none() && !self.timed_out
    }
}

/// What a runner can tell about a job's resources from its handle alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Whether anything the handle names is still running.
    pub alive: bool,
    /// Whether `reattach` would succeed.
    pub reattachable: bool,
    /// A one-line human explanation.
    pub detail: String,
}

/// The class of a [`RunnerError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request or handle was malformed or contradictory.
    InvalidInput,
    /// Something the handle names does not exist.
    NotFound,
    /// The runner does not implement this operation or option.
    Unsupported,
    /// A deadline passed.
    Timeout,
    /// The operation failed.
    Failed,
    /// The plugin panicked; the message is the panic message.
    Panicked,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::NotFound => "not found",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Failed => "failed",
            ErrorKind::Panicked => "panicked",
        })
    }
}

/// An error from a runner operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RunnerError {
    /// The class of error.
    pub kind: ErrorKind,
    /// A sentence explaining it.
    pub message: String,
}

impl RunnerError {
    /// An error of the given kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> RunnerError {
        RunnerError {
            kind,
            message: message.into(),
        }
    }

    /// An [`ErrorKind::InvalidInput`] error.
    pub fn invalid_input(message: impl Into<String>) -> RunnerError {
        RunnerError::new(ErrorKind::InvalidInput, message)
    }

    /// An [`ErrorKind::NotFound`] error.
    pub fn not_found(message: impl Into<String>) -> RunnerError {
        RunnerError::new(ErrorKind::NotFound, message)
    }

    /// An [`ErrorKind::Unsupported`] error.
    pub fn unsupported(message: impl Into<String>) -> RunnerError {
        RunnerError::new(ErrorKind::Unsupported, message)
    }

    /// An [`ErrorKind::Timeout`] error.
    pub fn timeout(message: impl Into<String>) -> RunnerError {
        RunnerError::new(ErrorKind::Timeout, message)
    }

    /// An [`ErrorKind::Failed`] error.
    pub fn failed(message: impl Into<String>) -> RunnerError {
        RunnerError::new(ErrorKind::Failed, message)
    }

    /// An [`ErrorKind::Panicked`] error.
    pub fn panicked(message: impl Into<String>) -> RunnerError {
        RunnerError::new(ErrorKind::Panicked, message)
    }
}

impl From<std::io::Error> for RunnerError {
    fn from(e: std::io::Error) -> RunnerError {
        let kind = match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                ErrorKind::InvalidInput
            }
            _ => ErrorKind::Failed,
        };
        RunnerError::new(kind, e.to_string())
    }
}

/// Where a runner writes a step's output while `exec` runs.
pub trait OutputSink {
    /// One chunk; `offset` is the byte offset of `bytes` in the exec's combined output,
    /// so consecutive chunks have consecutive offsets across both streams.
    fn chunk(&mut self, stream: Stream, offset: u64, bytes: &[u8]);

    /// How much of the output passed so far the host holds durably. A runner tells
    /// its sandbox to drop output only below [`Stored::Upto`]'s offset, and stops
    /// following the exec on [`Stored::Refused`] (returning an error, leaving the
    /// step running and its output in the sandbox for a later engine). The host
    /// may hold back a few bytes it was given (the possible start of a secret it
    /// must mask), so this can lag behind the chunks passed. The default,
    /// [`Stored::All`], is for sinks that store every chunk before `chunk` returns.
    fn stored(&self) -> Stored {
        Stored::All
    }
}

/// What an [`OutputSink`] holds durably of an exec's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// Every byte passed to `chunk` so far.
    All,
    /// Every byte below this offset of the exec's combined output.
    Upto(u64),
    /// The host takes no more output of this exec (its storage failed).
    Refused,
}

impl Stored {
    /// The offset below which output is durable, given where the passed output
    /// ends; `None` when the host refused.
    pub fn end(self, passed_end: u64) -> Option<u64> {
        match self {
            Stored::All => Some(passed_end),
            Stored::Upto(n) => Some(n.min(passed_end)),
            Stored::Refused => None,
        }
    }
}

/// A runner backend. One instance serves many jobs concurrently: every call names
/// the job by its handle, and `cancel` arrives on another thread while `exec` blocks.
///
/// Every operation blocks the calling thread (the engine calls them on a thread pool)
/// and must return within any deadline it is given.
pub trait Runner: Send + Sync + 'static {
    /// Creates an instance. Must have no side effects: the engine also creates an
    /// instance only to call `describe` when it lists plugins.
    fn new(config: &RunnerConfig) -> Result<Self, RunnerError>
    where
        Self: Sized;
    /// Name, version, ABI and capabilities.
    fn describe(&self) -> Description;
    /// Checks a job; `Ok(warnings)` names fields the runner cannot honour.
    fn validate(&self, job: &JobRequest) -> Result<Vec<String>, RunnerError>;
    /// Names every resource of the job deterministically, with no side effect. The
    /// engine logs the result as its intent before `prepare`.
    fn plan(&self, job: &JobRequest) -> Result<Handle, RunnerError>;
    /// Creates the workdir, volumes, cgroup.
    fn prepare(&self, handle: &Handle) -> Result<Handle, RunnerError>;
    /// Starts the VM or agent.
    fn boot(&self, handle: &Handle) -> Result<Handle, RunnerError>;
    /// Completes the agent handshake.
    fn connect(&self, handle: &Handle) -> Result<Handle, RunnerError>;
    /// Runs one step to its end, streaming output into `sink`.
    fn exec(
        &self,
        handle: &Handle,
        step: &StepRequest,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecResult, RunnerError>;
    /// Ends a running `exec` (called from another thread). Unknown or finished exec
    /// ids are not an error.
    fn cancel(&self, handle: &Handle, exec_id: u64) -> Result<(), RunnerError>;
    /// Stops accepting steps and lets running ones finish.
    fn drain(&self, handle: &Handle) -> Result<(), RunnerError>;
    /// Stops the VM or agent, gracefully if asked, never blocking past `deadline_ms`.
    fn poweroff(
        &self,
        handle: &Handle,
        graceful: bool,
        deadline_ms: u64,
    ) -> Result<(), RunnerError>;
    /// Removes everything the handle names. Idempotent, and works from the `plan`
    /// handle alone.
    fn cleanup(&self, handle: &Handle) -> Result<(), RunnerError>;
    /// Reports whether the handle's resources are alive, by pid and start time or
    /// equivalent, never by the handle's say-so.
    fn probe(&self, handle: &Handle) -> Result<Probe, RunnerError>;
    /// Takes back a live job after an engine restart.
    fn reattach(&self, handle: &Handle) -> Result<Handle, RunnerError>;
    /// Copies the job's artifacts out of its sandbox (see [`CollectRequest`] for
    /// what that must guarantee). Called after `drain`, before `poweroff`, and
    /// only on a runner that declares [`Capability::Collect`]; may be called
    /// again by a recovering engine (with the names stored so far in
    /// `already`). A file that cannot be copied is a notice, not an error; an
    /// error means nothing more could be copied (the sandbox is gone). The
    /// default says the runner cannot.
    fn collect(
        &self,
        handle: &Handle,
        request: &CollectRequest,
    ) -> Result<Collection, RunnerError> {
        let _ = (handle, request);
        Err(RunnerError::unsupported(
            "this runner does not collect artifacts",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_their_names_on_the_wire_and_back() {
        for c in Capability::ALL {
            assert_eq!(Capability::from_name(c.name()), Some(c));
            assert_eq!(c.to_string(), c.name());
        }
        assert_eq!(Capability::from_name("cgroup"), None);
        let d = Description {
            name: "x".into(),
            version: "1".into(),
            abi_major: 1,
            abi_minor: 1,
            capabilities: {
                let mut c = Capability::names(&[Capability::Reattach]);
                c.push("cgroup".into());
                c
            },
        };
        assert_eq!(d.capabilities, ["reattach", "cgroup"]);
        assert!(d.has(Capability::Reattach));
        assert!(!d.has(Capability::Resume));
    }

    fn request() -> JobRequest {
        JobRequest {
            job_id: 9,
            sandbox_id: 2,
            name: "j".into(),
            image: Some("img".into()),
            resources: Resources {
                memory_mib: 64,
                vcpus: 1,
                disk_mib: 0,
            },
            environment: BTreeMap::from([("A".into(), "b".into())]),
            cancel_grace_ms: Some(1500),
            network: Network::Default,
        }
    }

    #[test]
    fn a_job_request_reads_in_the_form_of_either_minor() {
        let job = request();
        // A 1.2 engine to a 1.2 plugin: every field.
        let now = job.encode_for_minor(2).unwrap();
        assert_eq!(JobRequest::decode_any(&now).unwrap(), job);
        // To a 1.1 plugin: the 1.1 form, which a 1.1 plugin decodes exactly ...
        let old = job.encode_for_minor(1).unwrap();
        let v1_1: JobRequestV1_1 = crate::codec::decode(&old).unwrap();
        assert_eq!(v1_1, JobRequestV1_1::from(&job));
        assert!(crate::codec::decode::<JobRequestV1_1>(&now).is_err());
        // ... and a 1.2 plugin reads from a 1.1 engine with the grace unset.
        let read = JobRequest::decode_any(&old).unwrap();
        assert_eq!(read.cancel_grace_ms, None);
        assert_eq!(
            read,
            JobRequest {
                cancel_grace_ms: None,
                ..job
            }
        );
        assert!(JobRequest::decode_any(&now[..now.len() - 1]).is_err());
    }

    #[test]
    fn a_network_choice_reaches_a_1_3_plugin_and_is_refused_for_an_older_one() {
        let job = JobRequest {
            network: Network::User,
            ..request()
        };
        let now = job.encode_for_minor(3).unwrap();
        assert_eq!(JobRequest::decode_any(&now).unwrap(), job);
        for minor in [0, 1, 2] {
            let e = job.encode_for_minor(minor).unwrap_err();
            assert!(e.message.contains("network: user"), "{e}");
            assert!(e.message.contains(&format!("ABI 1.{minor}")), "{e}");
        }
        // A 1.2 engine's request (no network field) reads as the default.
        let plain = request();
        let v1_2 = plain.encode_for_minor(2).unwrap();
        assert!(crate::codec::decode::<JobRequest>(&v1_2).is_err());
        assert_eq!(JobRequest::decode_any(&v1_2).unwrap(), plain);
        assert!(crate::codec::decode::<JobRequestV1_2>(&now).is_err());
    }
}
