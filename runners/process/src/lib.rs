//! The process runner: the embedded default sandbox.
//!
//! Each job gets a directory `<sandbox_root>/<sandbox_id>` holding
//!
//! - `work/`: the steps' working directory (and `HOME`);
//! - `agent.sock`, `agent.pid`, `agent.log`: the agent's socket, pidfile and log;
//!
//! a cgroup (v2 `<mount>/<cgroup_parent>/sbx-<root tag>-<sandbox_id>` where the host has a writable
//! cgroup2 hierarchy with `memory` and `pids`, else the v1 `memory` and `pids`
//! hierarchies and the v1 `freezer` where it is mounted, else none, with a notice),
//! and one `reel-agent` process in its own session, in the cgroup(s) from its first
//! instruction (the forked child joins them before `exec`). Steps run through the agent as `sh -c <command>` in `work/`.
//!
//! # Stopping a job
//!
//! `poweroff` and `cleanup` kill every process of the job: everything in its
//! cgroups **and the cgroups a step made below them** (a step may move into a child
//! cgroup of its own), and the agent. Nothing else on the host is looked at: the
//! agent joined the cgroups before its first instruction, so all the job's
//! processes are there. Only a job without cgroups (a host without them) is
//! looked for in `/proc`: everything in the agent's session, and an agent by its
//! socket argument. Each pass
//! kills a v2 subtree at once with `cgroup.kill` where the kernel has it, else
//! freezes what it can (v2 `cgroup.freeze`, the v1 freezer) so nothing forks
//! meanwhile; passes repeat until nothing is left, then `cleanup` removes the
//! cgroups children first. A pid found by a scan is pinned (pidfd) and the job's
//! processes found again before it is signalled, so a signal never reaches a
//! process that took the pid of one that exited in between.
//!
//! # Environment
//!
//! Nothing of the engine's environment reaches the job. The agent starts with
//! `PATH=`[`DEFAULT_PATH`] and `HOME=<work dir>` only (never `REEL_SECRET_*`, never
//! the engine's `PATH`), and starts each step with exactly the environment the
//! step's `ExecStart` carries, built by `step_environment`: the job's variables and
//! declared secrets and the step's own (as the engine gives them), `HOME` and
//! `PATH` as above unless the job sets them, `CI=true` and `REEL_JOB_ID=<job id>`.
//!
//! # Out of memory
//!
//! A step that fails while the kernel's OOM killer ends processes of the job's
//! memory cgroup (the `oom_kill` count of v2 `memory.events` or v1
//! `memory.oom_control` rose during the step) fails with the cause — `out of
//! memory (limit 64 MiB): the kernel's OOM killer ended 1 process of the job; the
//! step exited with code 137` — as `exec`'s error (the SDK's `ExecResult` has no
//! field for a cause; the engine records the error as the job's reason), and a
//! notice of kind [`OOM_NOTICE`]. A step that succeeds although a child of it was
//! killed is left as it is.
//!
//! # The handle
//!
//! The handle (format version [`HANDLE_VERSION`]) is the bincode encoding of a private
//! `JobState`: job id, sandbox id, the directory, work dir, socket, pidfile and log
//! paths, the cgroup directories with their limits and the job's environment (all
//! fixed by `plan`; the environment is only a base under each step's, which the engine
//! gives complete, and so must hold no secret values), then the
//! session token (added by `prepare`) and the agent's pid and start time (added by
//! `boot`), followed (version 2) by the job's `cancel_grace_ms`. A version 1 handle
//! (logged before cancel grace existed) is still read, with the default grace.
//!
//! # Cancel and artifacts
//!
//! A cancel is the agent's SIGINT → SIGTERM → SIGKILL ladder with the job's
//! `cancel_grace` between the signals (default
//! [`CANCEL_GRACE`](reel_runner_kit::session::CANCEL_GRACE)). `collect` goes through
//! the agent too ([`Sessions::collect`]): the work directory is on the host, but
//! the agent is what already knows it and reads it without following a link, and
//! the QEMU runner, whose work directory is in a guest, does exactly the same. Since every path is in the plan handle, `probe` and `cleanup` work from any
//! earlier handle: they find the agent through the pidfile (trusted only when the
//! process's command line names this job's socket and it started no later than the
//! pidfile was written), and by the job's cgroups (without cgroups: by scanning
//! `/proc` for the agent's command line).
//!
//! # The resource list
//!
//! The engine cannot decode the handle. `plan` names each resource with the SDK's
//! `host::planned_resource` (a notice of kind [`RESOURCE_NOTICE`], message `<kind>
//! <path> [(details)]`), which the engine logs with the plan as what the job
//! holds, and [`plan_resources`] gives the same list from a handle to Rust callers.
//!
//! # Options (`RunnerConfig.options`; `reel run --runner-option KEY=VALUE`)
//!
//! - `agent_path`: the `reel-agent` binary (default: `<plugin_dir>/reel-agent`, else
//!   beside the current executable);
//! - `cgroup_parent`: the parent cgroup name (default `reel`, and then each leaf
//!   is `sbx-<tag>-<sandbox_id>` with `<tag>` a hash of the sandbox root, because
//!   sandbox ids are unique per engine state directory, not per host; with an
//!   explicit parent the leaf is `sbx-<sandbox_id>`);
//! - `pids_max`: the `pids.max` of each job (default 0: no limit; `Resources` has no
//!   pid count).

pub use reel_agent::procfs;

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use reel_agent::procfs::Process;
use reel_agent::{AgentClient, ExecRequest};
use reel_plugin_sdk::{
    Capability, CollectRequest, Collection, Description, ExecResult, Handle, JobRequest, Network,
    OutputSink, Probe, Runner, RunnerConfig, RunnerError, StepRequest,
};
use reel_runner_kit::oom::with_oom_cause;
use reel_runner_kit::session::Key;
use reel_runner_kit::{Session, Sessions, backoff, cgroup, client_error, random_token, sandbox};
use serde::{Deserialize, Serialize};

pub use reel_runner_kit::oom::OOM_NOTICE;
pub use reel_runner_kit::{Cgroup, CgroupKind};

reel_plugin_sdk::export_runner!(ProcessRunner);

/// The format version of the handle bytes: 2 appends the job's cancel grace to
/// version 1's `JobState` (which is still read).
pub const HANDLE_VERSION: u32 = reel_runner_kit::HANDLE_VERSION;
/// The notice kind `plan` uses for each resource it names (the SDK's).
pub const RESOURCE_NOTICE: &str = reel_plugin_sdk::host::PLANNED_RESOURCE;
pub use reel_runner_kit::sandbox::MAX_SOCKET_PATH;

/// The `PATH` of the agent, and of a step whose job sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long `connect` waits for the agent's socket and handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `cleanup` keeps killing before it gives up on a busy cgroup.
const CLEANUP_PATIENCE: Duration = Duration::from_secs(5);

/// The agent process: pid and start time (clock ticks after boot), which together
/// name one process even after the pid is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct AgentId {
    pid: i32,
    start_time: u64,
}

/// Everything the runner knows about a job; lives in the handle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct JobState {
    job_id: u64,
    sandbox_id: u32,
    /// `<sandbox_root>/<sandbox_id>`.
    dir: PathBuf,
    /// `dir/work`: the steps' cwd and `HOME`.
    workdir: PathBuf,
    socket: PathBuf,
    pidfile: PathBuf,
    log: PathBuf,
    cgroups: Vec<Cgroup>,
    /// Why there is no (complete) cgroup, if so.
    cgroup_note: Option<String>,
    memory_bytes: u64,
    pids_max: u64,
    /// The job's environment, under each step's (which the engine already gives
    /// complete, so this only matters to callers that do not merge it).
    environment: BTreeMap<String, String>,
    /// Set by `prepare`.
    session_token: Option<String>,
    /// Set by `boot`.
    agent: Option<AgentId>,
    /// The job's `cancel_grace_ms` (handle version 2, after the fields above).
    #[serde(skip)]
    cancel_grace_ms: Option<u64>,
}

impl JobState {
    fn decode(handle: &Handle) -> Result<JobState, RunnerError> {
        let (mut state, grace): (JobState, Option<u64>) = reel_runner_kit::decode_handle(handle)?;
        state.cancel_grace_ms = grace;
        // A handle names paths this runner removes: refuse one that does not look
        // like ours rather than delete something else.
        if state.dir.file_name() != Some(state.sandbox_id.to_string().as_ref())
            || !state.workdir.starts_with(&state.dir)
            || !state.socket.starts_with(&state.dir)
            || !state.pidfile.starts_with(&state.dir)
        {
            return Err(RunnerError::invalid_input(
                "malformed handle: its paths are not those of a process-runner sandbox",
            ));
        }
        Ok(state)
    }

    fn encode(&self) -> Result<Handle, RunnerError> {
        reel_runner_kit::encode_handle(self, self.cancel_grace_ms)
    }

    fn key(&self) -> Key {
        (self.job_id, self.sandbox_id)
    }

    /// The grace between the signals of a cancel of this job's steps.
    fn grace(&self) -> Duration {
        reel_runner_kit::session::cancel_grace(self.cancel_grace_ms)
    }

    /// OOM kills in the job's memory cgroup so far, if it has one that counts them.
    fn oom_kills(&self) -> Option<u64> {
        self.cgroups.iter().find_map(Cgroup::oom_kills)
    }

    fn resources(&self) -> Vec<String> {
        let mut list = vec![
            format!("workdir {}", self.dir.display()),
            format!("agent-socket {}", self.socket.display()),
            format!("agent-pidfile {}", self.pidfile.display()),
            format!("agent-log {}", self.log.display()),
            format!(
                "agent-process (pid in {}, own session)",
                self.pidfile.display()
            ),
        ];
        list.extend(
            self.cgroups
                .iter()
                .map(|c| c.describe(self.memory_bytes, self.pids_max)),
        );
        if let Some(note) = &self.cgroup_note {
            list.push(format!("cgroup-missing {note}"));
        }
        list
    }
}

/// The human-readable list of every resource a handle names (the same lines `plan`
/// sends as [`RESOURCE_NOTICE`] notices). Empty for a handle this runner cannot read.
pub fn plan_resources(handle: &Handle) -> Vec<String> {
    JobState::decode(handle)
        .map(|s| s.resources())
        .unwrap_or_default()
}

struct Settings {
    sandbox_root: PathBuf,
    plugin_dir: PathBuf,
    agent_path: Option<PathBuf>,
    /// Where the jobs' cgroups go (option `cgroup_parent`).
    cgroups: cgroup::Placement,
    pids_max: u64,
}

/// The process runner.
pub struct ProcessRunner {
    settings: Settings,
    sessions: Sessions,
}

impl ProcessRunner {
    fn state(handle: &Handle) -> Result<JobState, RunnerError> {
        JobState::decode(handle)
    }

    /// The agent binary, in the documented order.
    pub fn agent_binary(&self) -> Result<PathBuf, RunnerError> {
        if let Some(p) = &self.settings.agent_path {
            return if p.is_file() {
                Ok(p.clone())
            } else {
                Err(RunnerError::not_found(format!(
                    "the agent binary {} (option agent_path) does not exist",
                    p.display()
                )))
            };
        }
        let mut tried = Vec::new();
        if !self.settings.plugin_dir.as_os_str().is_empty() {
            tried.push(self.settings.plugin_dir.join("reel-agent"));
        }
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_owned))
        {
            tried.push(dir.join("reel-agent"));
        }
        if let Some(found) = tried.iter().find(|p| p.is_file()) {
            return Ok(found.clone());
        }
        let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        Err(RunnerError::not_found(format!(
            "cannot find the reel-agent binary: set the runner option agent_path, or install \
             it beside the plugin or the engine (tried: {})",
            tried.join(", ")
        )))
    }

    /// The live agent processes of a job: the one named in the handle (same pid and
    /// start time), the one named by the pidfile (if its command line names this
    /// job's socket and it started no later than the pidfile was written), and any
    /// process whose command line names this job's socket (a half-started agent).
    fn agents(state: &JobState) -> Vec<AgentId> {
        let mut found = Vec::new();
        if let Some(a) = state.agent
            && procfs::start_time(a.pid) == Some(a.start_time)
        {
            found.push(a);
        }
        if let Some(pid) = sandbox::read_pidfile(&state.pidfile)
            && !found.iter().any(|a| a.pid == pid)
            && let Some(start) = procfs::start_time(pid)
            && state.agent.is_none_or(|a| a.pid != pid)
            && procfs::has_arg_pair(pid, "--socket", &state.socket)
            && started_before_file(start, &state.pidfile)
        {
            found.push(AgentId {
                pid,
                start_time: start,
            });
        }
        found
    }

    /// Every process of the job still alive: those in its cgroup(s) or any cgroup
    /// below them, and its agent (by handle or pidfile). The agent joins the
    /// cgroups before its first instruction, so nothing of the job is outside
    /// them and the host's other processes are never looked at; only a job
    /// without cgroups is looked for in `/proc` ([`Self::scanned`]). Sorted.
    fn job_processes(state: &JobState) -> Vec<Process> {
        let me = std::process::id() as i32;
        let agents = Self::agents(state);
        let mut pids: Vec<i32> = state.cgroups.iter().flat_map(Cgroup::procs).collect();
        pids.extend(agents.iter().map(|a| a.pid));
        if state.cgroups.is_empty() {
            pids.extend(Self::scanned(state, &agents));
        }
        pids.sort_unstable();
        pids.dedup();
        pids.into_iter()
            .filter(|&p| p != me)
            .filter_map(Process::of)
            .collect()
    }

    /// A job without cgroups, from a scan of `/proc`: every live process in an
    /// agent's session, and any agent (a half-started one too) found by its
    /// socket argument.
    fn scanned(state: &JobState, agents: &[AgentId]) -> Vec<i32> {
        let me = std::process::id() as i32;
        // Sessions whose leader is (or was) the agent. A pid is not reused while it
        // still names a session, so a dead agent's pid still names only its session,
        // unless the pid now belongs to another live process.
        let mut sessions: Vec<(i32, u64)> = agents.iter().map(|a| (a.pid, a.start_time)).collect();
        if let Some(a) = state.agent
            && procfs::start_time(a.pid).is_none()
        {
            sessions.push((a.pid, a.start_time));
        }
        procfs::all_pids()
            .into_iter()
            .filter(|&pid| pid != me)
            .filter(|&pid| {
                let Some(stat) = procfs::stat(pid) else {
                    return false;
                };
                if stat.state == 'Z' {
                    return false;
                }
                let in_session = sessions
                    .iter()
                    .any(|&(sid, start)| stat.session == sid && stat.start_time >= start);
                in_session || procfs::has_arg_pair(pid, "--socket", &state.socket)
            })
            .collect()
    }

    /// SIGKILLs every process of the job until none is left or `deadline` passes
    /// ([`sandbox::kill_until_gone`]), and returns the pids still left.
    fn kill_all(state: &JobState, deadline: Instant) -> Vec<i32> {
        sandbox::kill_until_gone(&state.cgroups, || Self::job_processes(state), deadline)
    }

    fn token(state: &JobState) -> Result<&str, RunnerError> {
        state.session_token.as_deref().ok_or_else(|| {
            RunnerError::invalid_input("the handle has no session token: prepare did not run")
        })
    }

    fn connect_agent(state: &JobState, timeout: Duration) -> Result<AgentClient, RunnerError> {
        AgentClient::connect(&state.socket, timeout)
            .map_err(|e| client_error("connecting to the agent", e))
    }

    /// Connects to the agent and binds the connection to the job.
    fn open_session(&self, state: &JobState) -> Result<Arc<Session>, RunnerError> {
        let token = Self::token(state)?;
        let client = Self::connect_agent(state, CONNECT_TIMEOUT)?;
        self.sessions.open(state.key(), client, token)
    }

    /// Asks the agent to power off within `budget`; true once it acknowledged.
    fn agent_poweroff(&self, state: &JobState, budget: Duration) -> bool {
        self.sessions.poweroff(
            state.key(),
            state.session_token.as_deref(),
            budget,
            |budget| AgentClient::connect(&state.socket, budget).ok(),
        )
    }
}

/// A step's whole environment ([`sandbox::step_environment`]): `HOME` is the
/// work dir and `PATH` [`DEFAULT_PATH`] unless the job sets them.
fn step_environment(state: &JobState, step: &StepRequest) -> BTreeMap<String, String> {
    let home = state.workdir.display().to_string();
    sandbox::step_environment(&state.environment, step, state.job_id, &home, DEFAULT_PATH)
}

/// Whether a process that started `start` ticks after boot started no later than
/// `file` was last modified (with one second of slack for the clocks' resolution).
fn started_before_file(start: u64, file: &Path) -> bool {
    let Some(boot) = procfs::boot_time() else {
        return true;
    };
    let Some(mtime) = std::fs::metadata(file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
    else {
        return false;
    };
    boot + start / procfs::CLOCK_TICKS <= mtime.as_secs() + 1
}

impl Runner for ProcessRunner {
    fn new(config: &RunnerConfig) -> Result<Self, RunnerError> {
        let pids_max = match config.options.get("pids_max") {
            Some(v) => v.parse().map_err(|e| {
                RunnerError::invalid_input(format!("option pids_max {v:?} is not a number: {e}"))
            })?,
            None => 0,
        };
        let cgroups = cgroup::Placement::from_options(&config.options)?;
        Ok(ProcessRunner {
            settings: Settings {
                sandbox_root: config.sandbox_root.clone(),
                plugin_dir: config.plugin_dir.clone(),
                agent_path: config.options.get("agent_path").map(PathBuf::from),
                cgroups,
                pids_max,
            },
            sessions: Sessions::default(),
        })
    }

    fn describe(&self) -> Description {
        Description {
            name: "process".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            abi_major: reel_plugin_sdk::abi::ABI_MAJOR,
            abi_minor: reel_plugin_sdk::abi::ABI_MINOR,
            capabilities: {
                let mut c = Capability::names(&[
                    Capability::Cancel,
                    Capability::Timeout,
                    Capability::Reattach,
                    Capability::Resume,
                    Capability::Collect,
                ]);
                // Informational (`reel plugins` shows it; the engine does not act on it).
                c.push("cgroup".to_owned());
                c
            },
        }
    }

    fn validate(&self, job: &JobRequest) -> Result<Vec<String>, RunnerError> {
        // Refuses what plan would refuse (a socket path that is too long).
        let state = self.plan_state(job)?;
        let mut warnings = Vec::new();
        if job.image.is_some() {
            warnings.push("image is ignored: steps run on the host".to_owned());
        }
        if job.resources.vcpus != 0 {
            warnings.push("vcpus is not enforced by the process runner".to_owned());
        }
        if job.resources.disk_mib != 0 {
            warnings.push("disk_mib is not enforced by the process runner".to_owned());
        }
        if let Some(note) = state.cgroup_note {
            warnings.push(note);
        }
        Ok(warnings)
    }

    fn plan(&self, job: &JobRequest) -> Result<Handle, RunnerError> {
        let state = self.plan_state(job)?;
        sandbox::announce(&state.resources());
        state.encode()
    }

    fn prepare(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let mut state = Self::state(handle)?;
        std::fs::create_dir_all(&state.workdir).map_err(|e| {
            RunnerError::failed(format!("cannot create {}: {e}", state.workdir.display()))
        })?;
        for cg in &state.cgroups {
            cg.create(state.memory_bytes, state.pids_max)
                .map_err(|e| RunnerError::failed(e.to_string()))?;
        }
        if let Some(note) = &state.cgroup_note {
            reel_plugin_sdk::host::notice("cgroup-skipped", note);
        }
        if state.session_token.is_none() {
            state.session_token = Some(random_token()?);
        }
        state.encode()
    }

    fn boot(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let mut state = Self::state(handle)?;
        if let Some(agent) = Self::agents(&state).first() {
            state.agent = Some(*agent);
            return state.encode();
        }
        if !state.workdir.is_dir() {
            return Err(RunnerError::not_found(format!(
                "the work dir {} does not exist: prepare did not run",
                state.workdir.display()
            )));
        }
        let binary = self.agent_binary()?;
        // The agent starts from an empty environment: the engine's holds its own
        // settings and every `REEL_SECRET_*` value, and a step can read its
        // agent's environment from `/proc/$PPID/environ`. The agent needs only
        // `PATH` (to find `sh`) and `HOME`; each step gets its environment
        // complete in its `ExecStart`.
        let mut cmd = Command::new(&binary);
        // The agent, and every step it starts, is in the job's cgroup(s) from its
        // first instruction: a crash at any point leaves nothing of the job outside
        // them, so its processes are found from its cgroups alone.
        let procs = cgroup::join_on_exec(&mut cmd, &state.cgroups)?;
        let output = cmd
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("HOME", &state.workdir)
            .arg("--daemonize")
            .arg("--socket")
            .arg(&state.socket)
            .arg("--pidfile")
            .arg(&state.pidfile)
            .arg("--workdir")
            .arg(&state.workdir)
            .arg("--log")
            .arg(&state.log)
            .current_dir(&state.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| {
                RunnerError::failed(format!("cannot start the agent {}: {e}", binary.display()))
            })?;
        drop(procs);
        if !output.status.success() {
            let log = std::fs::read_to_string(&state.log).unwrap_or_default();
            return Err(RunnerError::failed(format!(
                "the agent {} failed to start ({}): {}{}",
                binary.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                log.lines()
                    .last()
                    .map(|l| format!(" (agent log: {l})"))
                    .unwrap_or_default()
            )));
        }
        let pid: i32 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|e| RunnerError::failed(format!("the agent printed no pid: {e}")))?;
        let start_time = procfs::start_time(pid)
            .ok_or_else(|| RunnerError::failed("the agent exited as soon as it started"))?;
        let agent = AgentId { pid, start_time };
        tracing::debug!(pid, start_time, sandbox = state.sandbox_id, "agent started");
        state.agent = Some(agent);
        state.encode()
    }

    fn connect(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let mut state = Self::state(handle)?;
        if state.agent.is_none() {
            state.agent = Self::agents(&state).first().copied();
        }
        self.sessions.remove(state.key());
        self.open_session(&state)?;
        state.encode()
    }

    fn exec(
        &self,
        handle: &Handle,
        step: &StepRequest,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecResult, RunnerError> {
        let state = Self::state(handle)?;
        let session = self
            .sessions
            .get_or_open(state.key(), Self::token(&state)?, || {
                Self::connect_agent(&state, CONNECT_TIMEOUT)
            })?;
        // A resumed step's count when it started is not known to this engine: any
        // OOM kill in the job's cgroup so far is taken as the step's (a step that ran
        // before it and lost a process to the OOM killer yet succeeded is the rare
        // case this gets wrong).
        let before = match step.resume_from {
            0 => state.oom_kills(),
            _ => state.oom_kills().map(|_| 0),
        };
        let result = self.sessions.exec(
            &session,
            step,
            state.grace(),
            || ExecRequest {
                exec_id: step.exec_id,
                argv: vec!["sh".to_owned(), "-c".to_owned(), step.command.clone()],
                env: step_environment(&state, step).into_iter().collect(),
                cwd: None,
                timeout_ms: step.timeout_ms.unwrap_or(0),
            },
            sink,
        );
        with_oom_cause(state.memory_bytes, before, state.oom_kills(), result)
    }

    fn cancel(&self, handle: &Handle, exec_id: u64) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        self.sessions.cancel(state.key(), exec_id, state.grace())
    }

    fn collect(
        &self,
        handle: &Handle,
        request: &CollectRequest,
    ) -> Result<Collection, RunnerError> {
        let state = Self::state(handle)?;
        if Self::agents(&state).is_empty() {
            // Gone, and the reader of its files with it: say so at once rather
            // than after the connect timeout.
            return Err(RunnerError::not_found("the job's agent is not running"));
        }
        let session = self
            .sessions
            .get_or_open(state.key(), Self::token(&state)?, || {
                Self::connect_agent(&state, CONNECT_TIMEOUT)
            })?;
        self.sessions.collect(&session, request)
    }

    fn drain(&self, handle: &Handle) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        self.sessions.drain(state.key(), Duration::from_secs(30))
    }

    fn poweroff(
        &self,
        handle: &Handle,
        graceful: bool,
        deadline_ms: u64,
    ) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        let start = Instant::now();
        let deadline = start
            .checked_add(Duration::from_millis(deadline_ms))
            .unwrap_or(start + Duration::from_secs(86_400));
        let agents = Self::agents(&state);
        if graceful && !agents.is_empty() {
            // Two thirds of the time for the agent to stop its steps and exit.
            let budget = Duration::from_millis(deadline_ms / 3 * 2);
            if self.agent_poweroff(&state, budget) {
                let mut round = 0;
                while start.elapsed() < budget && !Self::agents(&state).is_empty() {
                    std::thread::sleep(backoff(&mut round));
                }
            }
        }
        self.sessions.remove(state.key());
        let left = Self::kill_all(&state, deadline);
        sandbox::warn_left_at_poweroff(&left, state.sandbox_id);
        Ok(())
    }

    fn cleanup(&self, handle: &Handle) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        self.sessions.remove(state.key());
        sandbox::remove(&state.cgroups, &state.dir, CLEANUP_PATIENCE, |deadline| {
            Self::kill_all(&state, deadline)
        })
    }

    fn probe(&self, handle: &Handle) -> Result<Probe, RunnerError> {
        let state = Self::state(handle)?;
        let agents = Self::agents(&state);
        let Some(agent) = agents.first() else {
            let leftovers: Vec<i32> = Self::job_processes(&state).iter().map(|p| p.pid).collect();
            let detail = match (state.agent, leftovers.is_empty()) {
                (_, false) => format!(
                    "the agent is gone but processes {leftovers:?} of the job remain (cleanup kills them)"
                ),
                (Some(a), true) => format!(
                    "agent pid {} with start time {} is gone",
                    a.pid, a.start_time
                ),
                (None, true) => "no agent is running".to_owned(),
            };
            return Ok(Probe {
                alive: false,
                reattachable: false,
                detail,
            });
        };
        let listening = UnixStream::connect(&state.socket).is_ok();
        Ok(Probe {
            alive: true,
            reattachable: listening && state.session_token.is_some(),
            detail: if listening {
                format!(
                    "agent pid {} is running and listening on {}",
                    agent.pid,
                    state.socket.display()
                )
            } else {
                format!(
                    "agent pid {} is running but {} accepts no connection",
                    agent.pid,
                    state.socket.display()
                )
            },
        })
    }

    fn reattach(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let mut state = Self::state(handle)?;
        let Some(agent) = Self::agents(&state).first().copied() else {
            return Err(RunnerError::not_found("the job's agent is not running"));
        };
        if state.session_token.is_none() {
            return Err(RunnerError::not_found(
                "the handle has no session token (prepare never completed)",
            ));
        }
        state.agent = Some(agent);
        self.sessions.remove(state.key());
        self.open_session(&state)?;
        state.encode()
    }
}

impl ProcessRunner {
    fn plan_state(&self, job: &JobRequest) -> Result<JobState, RunnerError> {
        if job.network != Network::Default {
            return Err(RunnerError::invalid_input(format!(
                "network: {}: the process runner runs steps in the host's network and can \
                 neither cut nor NAT it (runner: qemu can)",
                job.network
            )));
        }
        let root = std::path::absolute(&self.settings.sandbox_root).map_err(|e| {
            RunnerError::invalid_input(format!(
                "sandbox root {}: {e}",
                self.settings.sandbox_root.display()
            ))
        })?;
        let dir = root.join(job.sandbox_id.to_string());
        let socket = dir.join("agent.sock");
        sandbox::check_socket_path(&socket, "agent socket")?;
        let detected = self.settings.cgroups.detect(&root, "sbx", job.sandbox_id);
        Ok(JobState {
            job_id: job.job_id,
            sandbox_id: job.sandbox_id,
            workdir: dir.join("work"),
            pidfile: dir.join("agent.pid"),
            log: dir.join("agent.log"),
            socket,
            dir,
            cgroups: detected.cgroups,
            cgroup_note: detected.note,
            memory_bytes: job.resources.memory_mib.saturating_mul(1 << 20),
            pids_max: self.settings.pids_max,
            environment: job.environment.clone(),
            session_token: None,
            agent: None,
            cancel_grace_ms: job.cancel_grace_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handle logged before cancel grace existed (version 1) is read with the
    /// default grace; a version 2 handle keeps the job's.
    #[test]
    fn a_version_1_handle_is_read_with_the_default_grace() {
        let root = tempfile::tempdir().unwrap();
        let runner = ProcessRunner::new(&RunnerConfig {
            sandbox_root: root.path().to_owned(),
            ..RunnerConfig::default()
        })
        .unwrap();
        let job = JobRequest {
            job_id: 5,
            sandbox_id: 3,
            cancel_grace_ms: Some(4500),
            ..JobRequest::default()
        };
        let state = runner.plan_state(&job).unwrap();
        let v2 = state.encode().unwrap();
        assert_eq!(v2.version, 2);
        let read = JobState::decode(&v2).unwrap();
        assert_eq!(read, state);
        assert_eq!(read.grace(), Duration::from_millis(4500));
        // Version 1: the same fields without the grace.
        let v1 = Handle::encode(1, &state).unwrap();
        let read = JobState::decode(&v1).unwrap();
        assert_eq!(read.cancel_grace_ms, None);
        assert_eq!(read.grace(), reel_runner_kit::session::CANCEL_GRACE);
        assert!(JobState::decode(&Handle { version: 3, ..v2 }).is_err());
    }
}
