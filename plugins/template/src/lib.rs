//! The template runner: runs each step as `sh -c` in a per-job directory on the host.
//!
//! It is the smallest runner that keeps every promise of the contract in
//! `plugins/README.md`, recovery included, and the one to copy. There is no VM:
//! `boot` starts a placeholder process standing in for the agent, so that `probe`,
//! `poweroff` and `reattach` have something real to find by pid and start time.
//!
//! # Steps survive the engine
//!
//! An engine that dies (or whose storage fails) leaves its running step behind,
//! and the next engine takes it back with `exec` of the same `exec_id` and
//! `resume_from` = the bytes it stored. So nothing about a step lives only in this
//! process: each run of a step has a directory `<job dir>/execs/<exec_id>/`, and
//! the step's shell writes its streams and its exit status there itself:
//!
//! | file | written by | holds |
//! |---|---|---|
//! | `stdout`, `stderr` | the step | its two streams, as it writes them |
//! | `status` | the step's shell, as it ends | `$?` and a newline |
//! | `pid` | the runner, once the shell runs | `<pid> <start time> <started, unix ms>` |
//! | `order` | the runner, before it passes bytes on | how the streams interleave in the combined output: 9-byte records, stream (0/1) and length (`u64` LE) |
//! | `cancelled`, `timed-out` | the runner, before it kills the step | nothing: they say why the step has no `status` |
//!
//! `exec` creates the directory atomically (`mkdir`): if it exists, this `exec_id`
//! was already started in this sandbox and is taken back, never run again. The
//! combined output is the `order` records read against the stream files, so every
//! instance, before or after a restart, sees the same bytes at the same offsets;
//! nothing is dropped before `cleanup`, so output is there from any `resume_from`.
//!
//! The shell runs in its own process group, found by its pid and start time;
//! `cancel`, the timeout, `poweroff` and `cleanup` kill that group. What a step
//! leaves running in the background after its shell has ended is not tracked: a
//! runner that must catch those puts the job in a cgroup (as the process runner
//! does).
//!
//! # What it leaves out
//!
//! - **Artifacts**: it does not declare `collect` and keeps the SDK's default
//!   `Runner::collect` (which says "unsupported"), so a job's `artifacts:` are
//!   not collected: the engine records a notice saying so, and the conformance
//!   kit skips its `collect` check. A runner that collects implements it with
//!   the SDK's `artifacts::PartialFile` (see `plugins/README.md`).
//! - **Cancel grace**: `cancel` kills the step's group at once, so
//!   `JobRequest::cancel_grace_ms` is not used; a runner with a signal ladder
//!   keeps it in its handle (the process runner does).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::FileExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reel_plugin_sdk::{
    Capability, Description, ExecResult, Handle, JobRequest, OutputSink, Probe, Runner,
    RunnerConfig, RunnerError, StepRequest, Stream, host,
};
use rustix::process::{Pid, Signal, WaitOptions};
use serde::{Deserialize, Serialize};

reel_plugin_sdk::export_runner!(TemplateRunner);

/// The format version of [`JobState`] inside a [`Handle`]. Version 1 (a single
/// work directory, steps as children of the engine) is not read: no engine ever
/// logged one it could still take back.
const HANDLE_VERSION: u32 = 2;

/// The `PATH` of a step whose job sets none. Steps never see the engine's own
/// environment (it holds the values of every job's secrets).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How often a following `exec` looks for new output and for the step's end.
const POLL: Duration = Duration::from_millis(20);

/// The most bytes read from a stream file for one chunk.
const CHUNK: usize = 64 * 1024;

/// The step's shell: `$0` is the exec directory (which also makes its command
/// line unique, so it can be found without its pid file), `$1` the command.
const SHELL_SCRIPT: &str =
    r#"sh -c "$1" >"$0/stdout" 2>"$0/stderr" </dev/null; echo $? >"$0/status""#;

/// Everything the template knows about a job; lives in the handle, not in memory, so
/// a restarted engine can hand it back.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct JobState {
    /// The job's directory: `work/` (the steps' cwd and `HOME`) and `execs/`.
    dir: PathBuf,
    environment: BTreeMap<String, String>,
    /// The placeholder agent: pid and start time (clock ticks since boot), which
    /// together name one process even after the pid is reused.
    agent: Option<(i32, u64)>,
}

impl JobState {
    fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    fn execs(&self) -> PathBuf {
        self.dir.join("execs")
    }

    /// The files of every exec this sandbox has.
    fn all_execs(&self) -> Vec<ExecFiles> {
        let Ok(entries) = std::fs::read_dir(self.execs()) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| ExecFiles { dir: e.path() })
            .collect()
    }
}

/// The template runner. It keeps nothing in memory: every call works from the
/// handle and the files it names, from any instance.
pub struct TemplateRunner {
    sandbox_root: PathBuf,
}

impl TemplateRunner {
    fn state(handle: &Handle) -> Result<JobState, RunnerError> {
        handle.decode(HANDLE_VERSION)
    }

    /// SIGKILLs every live step and waits, until `deadline`, for each to be gone.
    fn kill_steps(state: &JobState, deadline: Instant) {
        for exec in state.all_execs() {
            if let Some(shell) = exec.shell() {
                kill_group(shell);
                wait_gone(shell, deadline);
            }
        }
    }
}

/// A process named by pid and start time.
type ProcessId = (i32, u64);

/// The start time of a live (not zombie) process, from `/proc/<pid>/stat`.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the
    // last ')'. After it come state (field 3) ... starttime (field 22).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn alive(p: ProcessId) -> bool {
    start_time(p.0) == Some(p.1)
}

/// Reaps `pid` if it is an exited child of this process (the instance that
/// started it may be gone; the process is not). Anything else is left alone.
fn reap(pid: i32) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = rustix::process::waitpid(Some(pid), WaitOptions::NOHANG);
    }
}

/// Waits until `p` is gone (a zombie counts as gone, and is reaped if ours), or
/// `deadline` passes; true if it is gone.
fn wait_gone(p: ProcessId, deadline: Instant) -> bool {
    loop {
        reap(p.0);
        if !alive(p) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kill_process(p: ProcessId, signal: Signal) {
    if alive(p)
        && let Some(pid) = Pid::from_raw(p.0)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// SIGKILLs the process group a step's shell leads, if the shell is still the
/// process its pid and start time name (a pid, and so a group id, is reused once
/// the group is gone).
fn kill_group(shell: ProcessId) {
    if alive(shell)
        && let Some(pid) = Pid::from_raw(shell.0)
    {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The files of one run of a step (see the module doc).
struct ExecFiles {
    dir: PathBuf,
}

/// How a step's `pid` file names its shell.
struct Shell {
    id: ProcessId,
    started_ms: u64,
}

impl ExecFiles {
    fn new(state: &JobState, exec_id: u64) -> ExecFiles {
        ExecFiles {
            dir: state.execs().join(exec_id.to_string()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn has(&self, name: &str) -> bool {
        self.path(name).exists()
    }

    fn mark(&self, name: &str) -> Result<(), RunnerError> {
        File::create(self.path(name))?;
        Ok(())
    }

    /// The exit code the shell wrote, once it wrote all of it.
    fn status(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.path("status")).ok()?;
        text.strip_suffix('\n')?.trim().parse().ok()
    }

    fn read_pid(&self) -> Option<Shell> {
        let text = std::fs::read_to_string(self.path("pid")).ok()?;
        let mut words = text.split_whitespace().map(str::parse::<u64>);
        let (Some(Ok(pid)), Some(Ok(start)), Some(Ok(started_ms))) =
            (words.next(), words.next(), words.next())
        else {
            return None;
        };
        Some(Shell {
            id: (i32::try_from(pid).ok()?, start),
            started_ms,
        })
    }

    /// Records the shell, atomically (a reader never sees half a file).
    fn write_pid(&self, shell: ProcessId, started_ms: u64) -> Result<(), RunnerError> {
        let tmp = self.path("pid.tmp");
        std::fs::write(&tmp, format!("{} {} {started_ms}\n", shell.0, shell.1))?;
        std::fs::rename(&tmp, self.path("pid"))?;
        Ok(())
    }

    /// The step's shell, while it runs.
    fn shell(&self) -> Option<ProcessId> {
        self.read_pid()
            .map(|s| s.id)
            .or_else(|| self.find_shell())
            .filter(|&p| alive(p))
    }

    /// The step's shell found by its command line (`sh -c <script> <exec dir>`),
    /// for an engine that died between starting it and writing its pid file.
    fn find_shell(&self) -> Option<ProcessId> {
        let want = self.dir.as_os_str().as_bytes();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let argv: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            if argv.len() >= 4
                && argv[2] == SHELL_SCRIPT.as_bytes()
                && argv[3] == want
                && let Some(start) = start_time(pid)
            {
                return Some((pid, start));
            }
        }
        None
    }

    /// Starts the step's shell in its own process group and records it.
    fn start(&self, state: &JobState, step: &StepRequest) -> Result<(), RunnerError> {
        let work = state.work();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(SHELL_SCRIPT)
            .arg(&self.dir)
            .arg(&step.command)
            .current_dir(&work)
            // The engine's environment holds every job's secrets: start from none.
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("HOME", &work)
            .envs(&state.environment)
            .envs(&step.environment)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so cancel and timeout reach its children too.
            .process_group(0);
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        // The child is reaped by pid (`reap`), by whichever instance sees it end.
        drop(child);
        let Some(start) = start_time(pid) else {
            // It ended at once; its status file says how.
            reap(pid);
            return Ok(());
        };
        self.write_pid((pid, start), now_ms())?;
        // A cancel that came while the shell started found no pid to kill.
        if self.has("cancelled") {
            kill_group((pid, start));
        }
        Ok(())
    }

    /// Takes back an exec this sandbox already has, or starts it if the engine
    /// that created its directory died before it started the shell.
    fn take_back(&self, state: &JobState, step: &StepRequest) -> Result<(), RunnerError> {
        if self.read_pid().is_some() || self.has("status") || self.has("cancelled") {
            return Ok(());
        }
        if let Some(shell) = self.find_shell() {
            return self.write_pid(shell, now_ms());
        }
        // No shell, no status, no pid: it ended without a trace only if it wrote
        // output (the shell opens the stream files before the command runs).
        if self.has("stdout") || self.status().is_some() {
            return Ok(());
        }
        self.start(state, step)
    }

    /// Follows the exec from `step.resume_from` to its end (see [`Follower`]).
    fn follow(
        &self,
        step: &StepRequest,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecResult, RunnerError> {
        let mut f = Follower::open(self)?;
        f.replay(step.resume_from, sink)?;
        let shell = self.read_pid();
        let deadline = match (&shell, step.timeout_ms) {
            (Some(s), Some(ms)) => Some(s.started_ms.saturating_add(ms)),
            _ => None,
        };
        loop {
            if f.pump(sink)? {
                continue;
            }
            let running = shell.as_ref().is_some_and(|s| {
                reap(s.id.0);
                alive(s.id)
            });
            if !running || self.status().is_some() {
                // Whatever it wrote before it ended.
                while f.pump(sink)? {}
                break;
            }
            if deadline.is_some_and(|d| now_ms() >= d) && !self.has("timed-out") {
                self.mark("timed-out")?;
                if let Some(s) = &shell {
                    kill_group(s.id);
                }
            }
            std::thread::sleep(POLL);
        }
        let timed_out = self.has("timed-out");
        let killed = timed_out || self.has("cancelled");
        let (exit_code, signal) = match self.status() {
            Some(code) => (Some(code), None),
            // The runner killed it: SIGKILL is what it sent.
            None if killed && shell.is_some() => (None, Some(9)),
            // It never ran (cancelled first), or it ended and nobody knows how
            // (its shell was killed by someone else): no exit status.
            None => (None, None),
        };
        Ok(ExecResult {
            exit_code,
            signal,
            timed_out,
            output_bytes: f.end,
        })
    }
}

/// Reads an exec's combined output: the `order` records against the stream files.
struct Follower {
    order: File,
    out: File,
    err: File,
    /// Bytes of each stream (stdout, stderr) the `order` records cover.
    taken: [u64; 2],
    /// Where the combined output the records cover ends.
    end: u64,
}

/// Opens (creating if need be) a file an exec's follower reads.
fn open_rw(path: &Path) -> Result<File, RunnerError> {
    Ok(OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?)
}

impl Follower {
    const RECORD: usize = 9;

    fn open(exec: &ExecFiles) -> Result<Follower, RunnerError> {
        let mut order = open_rw(&exec.path("order"))?;
        // A record torn by a crash was never passed on (records are written
        // before their bytes are): cut it, so new records stay aligned.
        let len = order.seek(SeekFrom::End(0))?;
        let whole = len - len % Self::RECORD as u64;
        if whole != len {
            order.set_len(whole)?;
        }
        Ok(Follower {
            order,
            // The step's shell creates these; create them first, so reading never
            // races its redirections (appending to an empty file changes nothing).
            out: open_rw(&exec.path("stdout"))?,
            err: open_rw(&exec.path("stderr"))?,
            taken: [0, 0],
            end: 0,
        })
    }

    fn file(&self, stream: Stream) -> &File {
        match stream {
            Stream::Stdout => &self.out,
            Stream::Stderr => &self.err,
        }
    }

    fn index(stream: Stream) -> usize {
        match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    /// Passes `bytes` (of `stream`, at the combined offset `self.end`) to the sink
    /// and asks what it stored: on `Refused`, the step goes on in the sandbox and
    /// a later `exec` takes it back.
    fn pass(
        &mut self,
        stream: Stream,
        bytes: &[u8],
        sink: &mut dyn OutputSink,
    ) -> Result<(), RunnerError> {
        let at = self.end;
        sink.chunk(stream, at, bytes);
        self.end += bytes.len() as u64;
        // Nothing is dropped before cleanup, so `Upto` needs no action here; a
        // runner whose sandbox buffers output tells it to drop what lies below.
        if sink.stored().end(self.end).is_none() {
            return Err(RunnerError::failed(
                "the engine refused the step's output (its storage failed); the step goes on \
                 in the sandbox and is taken back by the next exec of its exec id",
            ));
        }
        Ok(())
    }

    /// Passes what the `order` records cover from `from` on, as first recorded.
    fn replay(&mut self, from: u64, sink: &mut dyn OutputSink) -> Result<(), RunnerError> {
        let mut records = Vec::new();
        self.order.seek(SeekFrom::Start(0))?;
        self.order.read_to_end(&mut records)?;
        for record in records.chunks_exact(Self::RECORD) {
            let stream = if record[0] == 0 {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            let len = u64::from_le_bytes(record[1..].try_into().unwrap_or_default());
            let i = Self::index(stream);
            let (start, pos) = (self.end, self.taken[i]);
            self.taken[i] += len;
            if start + len <= from {
                self.end += len;
                continue;
            }
            let skip = from.saturating_sub(start);
            self.end += skip;
            let mut left = len - skip;
            let mut at = pos + skip;
            while left > 0 {
                let mut buf = vec![0; left.min(CHUNK as u64) as usize];
                self.file(stream).read_exact_at(&mut buf, at)?;
                self.pass(stream, &buf, sink)?;
                at += buf.len() as u64;
                left -= buf.len() as u64;
            }
        }
        Ok(())
    }

    /// Passes new output of either stream; true if there was any.
    fn pump(&mut self, sink: &mut dyn OutputSink) -> Result<bool, RunnerError> {
        let mut any = false;
        for stream in [Stream::Stdout, Stream::Stderr] {
            let i = Self::index(stream);
            let mut buf = vec![0; CHUNK];
            let n = self.file(stream).read_at(&mut buf, self.taken[i])?;
            if n == 0 {
                continue;
            }
            // The record first: bytes passed on are always covered by one.
            let mut record = [0u8; Self::RECORD];
            record[0] = i as u8;
            record[1..].copy_from_slice(&(n as u64).to_le_bytes());
            self.order.write_all(&record)?;
            self.taken[i] += n as u64;
            self.pass(stream, &buf[..n], sink)?;
            any = true;
        }
        Ok(any)
    }
}

impl Runner for TemplateRunner {
    fn new(config: &RunnerConfig) -> Result<Self, RunnerError> {
        Ok(TemplateRunner {
            sandbox_root: config.sandbox_root.clone(),
        })
    }

    fn describe(&self) -> Description {
        Description {
            name: "template".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            abi_major: reel_plugin_sdk::abi::ABI_MAJOR,
            abi_minor: reel_plugin_sdk::abi::ABI_MINOR,
            capabilities: Capability::names(&[
                Capability::Cancel,
                Capability::Timeout,
                Capability::Reattach,
                Capability::Resume,
            ]),
        }
    }

    fn validate(&self, job: &JobRequest) -> Result<Vec<String>, RunnerError> {
        let mut warnings = Vec::new();
        if job.image.is_some() {
            warnings.push("image is ignored: steps run on the host".to_owned());
        }
        if job.resources.memory_mib != 0 || job.resources.vcpus != 0 {
            warnings.push("resources are not enforced".to_owned());
        }
        Ok(warnings)
    }

    fn plan(&self, job: &JobRequest) -> Result<Handle, RunnerError> {
        let state = JobState {
            dir: self
                .sandbox_root
                .join(format!("template-{}-{}", job.job_id, job.sandbox_id)),
            environment: job.environment.clone(),
            agent: None,
        };
        // Name what the job will have, for the engine's record of the intent.
        host::planned_resource("job-dir", &state.dir.display().to_string());
        host::planned_resource(
            "agent-process",
            "(pid and start time in the handle once booted)",
        );
        host::planned_resource(
            "step-processes",
            &format!(
                "(a process group per step, pid in {}/<exec id>/pid)",
                state.execs().display()
            ),
        );
        Handle::encode(HANDLE_VERSION, &state)
    }

    fn prepare(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let state = Self::state(handle)?;
        std::fs::create_dir_all(state.work())?;
        std::fs::create_dir_all(state.execs())?;
        Ok(handle.clone())
    }

    fn boot(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let mut state = Self::state(handle)?;
        if let Some(agent) = state.agent
            && alive(agent)
        {
            return Ok(handle.clone());
        }
        let child = Command::new("sleep")
            .arg("2147483647")
            .current_dir(&state.dir)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let pid = child.id() as i32;
        // Reaped by pid in `poweroff`/`cleanup`, by whichever instance runs them.
        drop(child);
        let started = start_time(pid)
            .ok_or_else(|| RunnerError::failed("the agent exited as soon as it started"))?;
        state.agent = Some((pid, started));
        tracing::debug!(pid, "template agent started");
        Handle::encode(HANDLE_VERSION, &state)
    }

    fn connect(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let state = Self::state(handle)?;
        match state.agent {
            Some(agent) if alive(agent) => Ok(handle.clone()),
            _ => Err(RunnerError::not_found("the agent is not running")),
        }
    }

    fn exec(
        &self,
        handle: &Handle,
        step: &StepRequest,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecResult, RunnerError> {
        let state = Self::state(handle)?;
        std::fs::create_dir_all(state.execs())?;
        let exec = ExecFiles::new(&state, step.exec_id);
        // One exec id is one run of a step in this sandbox: a new one starts, a
        // known one (an engine restarted, or a cancel came first) is taken back.
        match std::fs::create_dir(&exec.dir) {
            Ok(()) => exec.start(&state, step)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                exec.take_back(&state, step)?;
            }
            Err(e) => return Err(e.into()),
        }
        let result = exec.follow(step, sink)?;
        tracing::debug!(exec_id = step.exec_id, ?result, "step ended");
        Ok(result)
    }

    fn cancel(&self, handle: &Handle, exec_id: u64) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        if !state.execs().is_dir() {
            // Not prepared, or cleaned up: nothing can run.
            return Ok(());
        }
        let exec = ExecFiles::new(&state, exec_id);
        // Marked first, so an exec that has not started yet never runs it, and
        // one that is starting kills it as soon as it has a pid (see `start`).
        match std::fs::create_dir(&exec.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e.into()),
            _ => {}
        }
        if exec.status().is_none() {
            exec.mark("cancelled")?;
        }
        if let Some(shell) = exec.shell() {
            kill_group(shell);
        }
        Ok(())
    }

    fn drain(&self, handle: &Handle) -> Result<(), RunnerError> {
        // Output goes straight to files: nothing is buffered, and running steps
        // are left to poweroff.
        Self::state(handle).map(drop)
    }

    fn poweroff(
        &self,
        handle: &Handle,
        graceful: bool,
        deadline_ms: u64,
    ) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        let deadline = Instant::now() + Duration::from_millis(deadline_ms);
        // Every process of the job goes: the steps, then the agent.
        Self::kill_steps(&state, deadline);
        let Some(agent) = state.agent else {
            return Ok(());
        };
        if graceful {
            kill_process(agent, Signal::TERM);
            let grace = Instant::now() + Duration::from_millis(deadline_ms / 2);
            if wait_gone(agent, grace.min(deadline)) {
                return Ok(());
            }
        }
        kill_process(agent, Signal::KILL);
        if !wait_gone(agent, deadline) {
            return Err(RunnerError::timeout(format!(
                "the agent (pid {}) survived SIGKILL until the poweroff deadline",
                agent.0
            )));
        }
        Ok(())
    }

    fn cleanup(&self, handle: &Handle) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        Self::kill_steps(&state, deadline);
        if let Some(agent) = state.agent {
            kill_process(agent, Signal::KILL);
            if !wait_gone(agent, deadline) {
                return Err(RunnerError::timeout(format!(
                    "the agent (pid {}) survived SIGKILL for 5 s",
                    agent.0
                )));
            }
        }
        match std::fs::remove_dir_all(&state.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn probe(&self, handle: &Handle) -> Result<Probe, RunnerError> {
        let state = Self::state(handle)?;
        let steps = state
            .all_execs()
            .iter()
            .filter(|e| e.shell().is_some())
            .count();
        let agent = state.agent.filter(|&a| alive(a));
        Ok(match (agent, state.agent) {
            (Some(a), _) => Probe {
                alive: true,
                reattachable: state.work().is_dir(),
                detail: format!("agent pid {} is running, with {steps} step(s) running", a.0),
            },
            (None, Some(a)) => Probe {
                alive: steps > 0,
                reattachable: false,
                detail: format!(
                    "agent pid {} with start time {} is gone ({steps} step(s) still running)",
                    a.0, a.1
                ),
            },
            (None, None) => Probe {
                alive: steps > 0,
                reattachable: false,
                detail: format!("no agent was started ({steps} step(s) running)"),
            },
        })
    }

    fn reattach(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        // Everything lives in the handle and the job's files; a live agent is all
        // there is to take back, and `exec` takes back a running step.
        self.connect(handle)
    }
}
