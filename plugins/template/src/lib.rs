//! The template runner: runs each step as `sh -c` in a per-job workdir on the host.
//!
//! It is the smallest runner that keeps every promise of the contract, and the one to
//! copy. There is no VM: `boot` starts a placeholder process standing in for the
//! agent, so that `probe`, `poweroff` and `reattach` have something real to find by
//! pid and start time.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reel_plugin_sdk::{
    Description, ExecResult, Handle, JobRequest, OutputSink, Probe, Runner, RunnerConfig,
    RunnerError, StepRequest, Stream,
};
use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};

reel_plugin_sdk::export_runner!(TemplateRunner);

/// The format version of [`JobState`] inside a [`Handle`].
const HANDLE_VERSION: u32 = 1;

/// Everything the template knows about a job; lives in the handle, not in memory, so
/// a restarted engine can hand it back.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct JobState {
    workdir: PathBuf,
    environment: BTreeMap<String, String>,
    /// The placeholder agent: pid and start time (clock ticks since boot), which
    /// together name one process even after the pid is reused.
    agent: Option<(i32, u64)>,
}

/// The template runner.
pub struct TemplateRunner {
    sandbox_root: PathBuf,
    /// Process groups of running execs by exec id, for `cancel`.
    running: Mutex<HashMap<u64, Running>>,
    /// Agents this instance started, so it can reap them.
    agents: Mutex<HashMap<i32, Child>>,
}

struct Running {
    pgid: i32,
    cancelled: bool,
}

impl TemplateRunner {
    fn state(handle: &Handle) -> Result<JobState, RunnerError> {
        handle.decode(HANDLE_VERSION)
    }

    /// Whether the agent named in the state is the same live process.
    fn agent_alive(agent: (i32, u64)) -> bool {
        start_time(agent.0) == Some(agent.1)
    }

    fn kill_agent(&self, agent: (i32, u64), signal: Signal) {
        if Self::agent_alive(agent)
            && let Some(pid) = Pid::from_raw(agent.0)
        {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }

    fn reap_agent(&self, pid: i32, deadline: Instant) -> bool {
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        let Some(child) = agents.get_mut(&pid) else {
            // Not ours (started before a restart): it is reaped by its parent.
            return true;
        };
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                agents.remove(&pid);
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

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

impl Runner for TemplateRunner {
    fn new(config: &RunnerConfig) -> Result<Self, RunnerError> {
        Ok(TemplateRunner {
            sandbox_root: config.sandbox_root.clone(),
            running: Mutex::new(HashMap::new()),
            agents: Mutex::new(HashMap::new()),
        })
    }

    fn describe(&self) -> Description {
        Description {
            name: "template".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            abi_major: reel_plugin_sdk::abi::ABI_MAJOR,
            abi_minor: reel_plugin_sdk::abi::ABI_MINOR,
            capabilities: vec![
                "cancel".to_owned(),
                "timeout".to_owned(),
                "reattach".to_owned(),
            ],
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
            workdir: self
                .sandbox_root
                .join(format!("template-{}-{}", job.job_id, job.sandbox_id)),
            environment: job.environment.clone(),
            agent: None,
        };
        Handle::encode(HANDLE_VERSION, &state)
    }

    fn prepare(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let state = Self::state(handle)?;
        std::fs::create_dir_all(&state.workdir)?;
        Ok(handle.clone())
    }

    fn boot(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let mut state = Self::state(handle)?;
        if let Some(agent) = state.agent
            && Self::agent_alive(agent)
        {
            return Ok(handle.clone());
        }
        let child = Command::new("sleep")
            .arg("2147483647")
            .current_dir(&state.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let pid = child.id() as i32;
        let started = start_time(pid)
            .ok_or_else(|| RunnerError::failed("the agent exited as soon as it started"))?;
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pid, child);
        state.agent = Some((pid, started));
        tracing::debug!(pid, "template agent started");
        Handle::encode(HANDLE_VERSION, &state)
    }

    fn connect(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let state = Self::state(handle)?;
        match state.agent {
            Some(agent) if Self::agent_alive(agent) => Ok(handle.clone()),
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
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&step.command)
            .current_dir(&state.workdir)
            .envs(&state.environment)
            .envs(&step.environment)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so cancel and timeout reach its children too.
            .process_group(0)
            .spawn()?;
        let pgid = child.id() as i32;
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                step.exec_id,
                Running {
                    pgid,
                    cancelled: false,
                },
            );

        let (tx, rx) = mpsc::channel::<(Stream, Vec<u8>)>();
        let readers = [
            child
                .stdout
                .take()
                .map(|r| (Stream::Stdout, Box::new(r) as Box<dyn Read + Send>)),
            child
                .stderr
                .take()
                .map(|r| (Stream::Stderr, Box::new(r) as Box<dyn Read + Send>)),
        ];
        for (stream, mut reader) in readers.into_iter().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = reader.read(&mut buf) {
                    if tx.send((stream, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);

        let deadline = step
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let mut offset = 0u64;
        let mut timed_out = false;
        loop {
            let wait = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50)),
                None => Duration::from_millis(50),
            };
            match rx.recv_timeout(wait) {
                Ok((stream, bytes)) => {
                    // Chunks before `resume_from` are already stored by the engine.
                    let end = offset + bytes.len() as u64;
                    if end > step.resume_from {
                        let skip = step.resume_from.saturating_sub(offset) as usize;
                        sink.chunk(stream, offset + skip as u64, &bytes[skip..]);
                    }
                    offset = end;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if !timed_out && deadline.is_some_and(|d| Instant::now() >= d) {
                timed_out = true;
                kill_group(pgid);
            }
        }
        let status = child.wait()?;
        let cancelled = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&step.exec_id)
            .is_some_and(|r| r.cancelled);
        tracing::debug!(
            exec_id = step.exec_id,
            ?status,
            cancelled,
            timed_out,
            "step ended"
        );
        Ok(ExecResult {
            exit_code: status.code(),
            signal: status.signal(),
            timed_out,
            output_bytes: offset,
        })
    }

    fn cancel(&self, _handle: &Handle, exec_id: u64) -> Result<(), RunnerError> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = running.get_mut(&exec_id) {
            r.cancelled = true;
            kill_group(r.pgid);
        }
        Ok(())
    }

    fn drain(&self, handle: &Handle) -> Result<(), RunnerError> {
        // Steps run one at a time and nothing is queued: there is nothing to wait for.
        Self::state(handle).map(drop)
    }

    fn poweroff(
        &self,
        handle: &Handle,
        graceful: bool,
        deadline_ms: u64,
    ) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        let Some(agent) = state.agent else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_millis(deadline_ms);
        if graceful {
            self.kill_agent(agent, Signal::TERM);
            if self.reap_agent(agent.0, deadline) && !Self::agent_alive(agent) {
                return Ok(());
            }
        }
        self.kill_agent(agent, Signal::KILL);
        self.reap_agent(agent.0, deadline);
        Ok(())
    }

    fn cleanup(&self, handle: &Handle) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        if let Some(agent) = state.agent {
            self.kill_agent(agent, Signal::KILL);
            self.reap_agent(agent.0, Instant::now() + Duration::from_secs(1));
        }
        match std::fs::remove_dir_all(&state.workdir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn probe(&self, handle: &Handle) -> Result<Probe, RunnerError> {
        let state = Self::state(handle)?;
        Ok(match state.agent {
            Some(agent) if Self::agent_alive(agent) => Probe {
                alive: true,
                reattachable: true,
                detail: format!("agent pid {} is running", agent.0),
            },
            Some(agent) => Probe {
                alive: false,
                reattachable: false,
                detail: format!("agent pid {} with start time {} is gone", agent.0, agent.1),
            },
            None => Probe {
                alive: false,
                reattachable: false,
                detail: "no agent was started".to_owned(),
            },
        })
    }

    fn reattach(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        // Everything lives in the handle; a live agent is all there is to take back.
        self.connect(handle)
    }
}

fn kill_group(pgid: i32) {
    if let Some(pid) = Pid::from_raw(pgid) {
        let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    }
}
