//! Steps of a sandbox's life that every agent-based runner takes the same way:
//! naming its resources, its socket path's length, a step's environment, killing
//! what a scan found without hitting a reused pid, and removing it all.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use reel_agent::procfs::{Pinned, Process};
use reel_plugin_sdk::{RunnerError, StepRequest};
use rustix::process::Signal;

use crate::cgroup::{self, Cgroup};

/// The longest unix socket path (`sun_path` is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Names each resource line (`<kind> <name> [(details)]`) as a planned-resource
/// notice, which the engine logs with the plan.
pub fn announce(resources: &[String]) {
    for line in resources {
        let (kind, name) = line.split_once(' ').unwrap_or((line, ""));
        reel_plugin_sdk::host::planned_resource(kind, name);
    }
}

/// Refuses a socket path too long for a unix socket, saying what to change.
pub fn check_socket_path(socket: &Path, what: &str) -> Result<(), RunnerError> {
    let len = socket.as_os_str().as_bytes().len();
    if len > MAX_SOCKET_PATH {
        return Err(RunnerError::invalid_input(format!(
            "the {what} path {} is {len} bytes, longer than the {MAX_SOCKET_PATH} \
             bytes a unix socket path may have: choose a shorter sandbox_root",
            socket.display()
        )));
    }
    Ok(())
}

/// The pid a pidfile names, if it names one.
pub fn read_pidfile(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A step's whole environment (the agent clears its own before it starts the
/// step): the job's variables (`base`), then the step's as the engine gives them
/// (the job's again, its declared secrets, the step's own), `HOME` and `PATH`
/// unless the job sets them, and always `CI=true` and `REEL_JOB_ID`. Nothing of
/// the engine's own environment: its `PATH` could name directories only the
/// engine's user should run from, and its `REEL_SECRET_*` variables hold the
/// secrets of every job.
pub fn step_environment(
    base: &BTreeMap<String, String>,
    step: &StepRequest,
    job_id: u64,
    home: &str,
    path: &str,
) -> BTreeMap<String, String> {
    let mut env = base.clone();
    env.extend(step.environment.clone());
    env.entry("HOME".to_owned())
        .or_insert_with(|| home.to_owned());
    env.entry("PATH".to_owned())
        .or_insert_with(|| path.to_owned());
    env.insert("CI".to_owned(), "true".to_owned());
    env.insert("REEL_JOB_ID".to_owned(), job_id.to_string());
    env
}

/// How long a kill pass waits for the job's cgroups to freeze (a process in an
/// uninterruptible sleep delays it) before it kills them unfrozen.
pub const FREEZE_PATIENCE: Duration = Duration::from_millis(200);

/// SIGKILLs every process of the job — what `find` returns, sorted — until none is
/// left or `deadline` passes, and returns the pids still left. Signals every
/// process at least once, even with `deadline` already past.
///
/// A pass that finds processes first stops the job's `cgroups` where the kernel
/// can: v2 `cgroup.kill` kills a subtree at once; otherwise a freezable cgroup is
/// frozen (for up to [`FREEZE_PATIENCE`]) so that nothing forks meanwhile, and
/// thawed after the pass, when the killed processes die. Then every process found
/// is pinned and the job's processes are found again: a pinned process found
/// again is the job's (its pid cannot have been reused while it is pinned), and
/// only those are signalled — never a process that took the pid of one that
/// exited since the first look.
pub fn kill_until_gone(
    cgroups: &[Cgroup],
    find: impl Fn() -> Vec<Process>,
    deadline: Instant,
) -> Vec<i32> {
    let mut round = 0;
    loop {
        // Most often the agent took its steps down and nothing is left.
        if find().is_empty() {
            return Vec::new();
        }
        let killed_at_once = cgroups.iter().any(Cgroup::kill_subtree);
        let frozen: Vec<&Cgroup> = if killed_at_once {
            Vec::new()
        } else {
            cgroups.iter().filter(|c| c.set_frozen(true)).collect()
        };
        let freeze_deadline = Instant::now() + FREEZE_PATIENCE;
        let mut wait = 0;
        while !frozen.iter().all(|c| c.is_frozen()) && Instant::now() < freeze_deadline {
            std::thread::sleep(crate::backoff(&mut wait));
        }
        let found = find();
        let pinned: Vec<(Process, Pinned)> = found
            .iter()
            .filter_map(|&p| Some((p, Pinned::new(p.pid)?)))
            .collect();
        if !pinned.is_empty() {
            let again = find();
            for (p, pin) in &pinned {
                if again.binary_search(p).is_ok() {
                    pin.signal(Signal::KILL);
                }
            }
        }
        for cg in &frozen {
            cg.set_frozen(false);
        }
        if Instant::now() >= deadline {
            return find().iter().map(|p| p.pid).collect();
        }
        std::thread::sleep(crate::backoff(&mut round));
    }
}

/// Removes a sandbox: kills its processes with `kill_all(deadline)` (which returns
/// the pids left) for up to `patience`, then its cgroups (retrying while an
/// exiting process keeps one busy, with another kill pass between tries), then
/// `dir`. Idempotent: what is already gone is no error.
pub fn remove(
    cgroups: &[Cgroup],
    dir: &Path,
    patience: Duration,
    kill_all: impl Fn(Instant) -> Vec<i32>,
) -> Result<(), RunnerError> {
    let deadline = Instant::now() + patience;
    let left = kill_all(deadline);
    if !left.is_empty() {
        return Err(RunnerError::timeout(format!(
            "processes {left:?} of the job survived SIGKILL for {patience:?}"
        )));
    }
    cgroup::remove_all(cgroups, deadline, || {
        kill_all(Instant::now());
    })
    .map_err(|e| RunnerError::failed(e.to_string()))?;
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RunnerError::failed(format!(
            "cannot remove {}: {e}",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Says (as a warning) which processes were SIGKILLed but not yet gone when a
/// poweroff's deadline passed; cleanup waits for them.
pub fn warn_left_at_poweroff(left: &[i32], sandbox_id: u32) {
    if !left.is_empty() {
        tracing::warn!(
            ?left,
            sandbox = sandbox_id,
            "processes of the job were SIGKILLed but not yet gone at the poweroff deadline"
        );
    }
}
