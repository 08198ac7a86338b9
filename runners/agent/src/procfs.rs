//! Just enough of `/proc` to name processes by pid **and** start time, and to signal
//! a process found by a scan without hitting a later one that reuses its pid.
//!
//! A pid read from `/proc` (or from a cgroup's `cgroup.procs`) may name another
//! process by the time a signal is sent: the process exits, the pid is given to a
//! new one. [`Pinned`] holds the process by a pidfd, so a signal reaches that
//! process or none, and what decided that the process is a target is checked
//! again once it is pinned ([`signal_if`]). Used by the agent (a finished step's
//! process group) and by the process runner (a job's processes).

use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags, Signal, kill_process, pidfd_open, pidfd_send_signal};

/// The fields of `/proc/<pid>/stat` reel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Process state (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Process group id (field 5).
    pub pgrp: i32,
    /// Session id (field 6).
    pub session: i32,
    /// Start time in clock ticks after boot (field 22).
    pub start_time: u64,
}

impl Stat {
    /// Whether the process still runs: not a zombie (`Z`) and not dead (`X`).
    pub fn live(&self) -> bool {
        self.state != 'Z' && self.state != 'X'
    }
}

/// Reads `/proc/<pid>/stat`; `None` if the process does not exist.
pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<Stat> {
    // The command name may contain spaces and parentheses: fields resume after the
    // last ')'. After it: state (3), ppid (4), pgrp (5), session (6) ... starttime (22).
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The session id of the calling process, as `/proc` names it.
///
/// Not `getsid(0)` through rustix: where the session's leader lies outside the
/// caller's pid namespace (a container started from a host session) the kernel
/// answers 0, which rustix's `Pid` cannot hold and panics on. `/proc` reports the
/// same 0, and it is the view the agent compares its steps' groups against.
pub fn own_session() -> Option<i32> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&text).map(|s| s.session)
}

/// The start time of a live (not zombie) process.
pub fn start_time(pid: i32) -> Option<u64> {
    stat(pid).filter(Stat::live).map(|s| s.start_time)
}

/// Every pid currently in `/proc`.
pub fn all_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The arguments of a process (empty for kernel threads and vanished processes).
pub fn cmdline(pid: i32) -> Vec<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(<[u8]>::to_vec)
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid`'s command line has `flag` immediately followed by `value`.
pub fn has_arg_pair(pid: i32, flag: &str, value: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let args = cmdline(pid);
    args.windows(2)
        .any(|w| w[0] == flag.as_bytes() && w[1] == value.as_os_str().as_bytes())
}

/// The boot time in seconds since the epoch (`btime` of `/proc/stat`).
pub fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Clock ticks per second of `/proc/<pid>/stat` times. Linux exports USER_HZ to user
/// space, which is 100 on every architecture reel runs on.
pub const CLOCK_TICKS: u64 = 100;

/// One process, held so that signals reach it and never a later process with its
/// pid: by a pidfd (Linux 5.3 and later); on an older kernel by its pid alone, so
/// there the check before [`Pinned::signal`] leaves the window of one system call.
#[derive(Debug)]
pub struct Pinned {
    pid: i32,
    fd: Option<OwnedFd>,
}

impl Pinned {
    /// Pins process `pid`; `None` if there is no such process.
    pub fn new(pid: i32) -> Option<Pinned> {
        let raw = Pid::from_raw(pid)?;
        match pidfd_open(raw, PidfdFlags::empty()) {
            Ok(fd) => Some(Pinned { pid, fd: Some(fd) }),
            Err(Errno::NOSYS) => Some(Pinned { pid, fd: None }),
            Err(_) => None,
        }
    }

    /// The pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// `/proc/<pid>/stat` of the pinned process. While it exists its pid cannot be
    /// given to another, so this describes it; should it have exited since it was
    /// pinned, the stat may describe a newcomer, but then [`Pinned::signal`] reaches
    /// no one.
    pub fn stat(&self) -> Option<Stat> {
        stat(self.pid)
    }

    /// Sends `signal` to the pinned process; false if it is gone.
    pub fn signal(&self, signal: Signal) -> bool {
        match &self.fd {
            Some(fd) => pidfd_send_signal(fd, signal).is_ok(),
            None => Pid::from_raw(self.pid).is_some_and(|p| kill_process(p, signal).is_ok()),
        }
    }
}

/// Sends `signal` to process `pid` if, read once the process is pinned, its stat
/// still satisfies `is_target` (for a process found by a scan: the same start
/// time, the same group). True if the signal was sent.
pub fn signal_if(pid: i32, signal: Signal, is_target: impl FnOnce(&Stat) -> bool) -> bool {
    let Some(pinned) = Pinned::new(pid) else {
        return false;
    };
    match pinned.stat() {
        Some(s) if is_target(&s) => pinned.signal(signal),
        _ => false,
    }
}

/// A process named by its pid and start time, which together name one process
/// even after the pid is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Process {
    /// The pid.
    pub pid: i32,
    /// Start time in clock ticks after boot.
    pub start_time: u64,
}

impl Process {
    /// The live process that has pid `pid` now, if any.
    pub fn of(pid: i32) -> Option<Process> {
        start_time(pid).map(|start_time| Process { pid, start_time })
    }

    /// Sends `signal` to this process if it still runs, rechecking its start time
    /// once it is pinned; true if the signal was sent.
    pub fn signal(&self, signal: Signal) -> bool {
        signal_if(self.pid, signal, |s| {
            s.live() && s.start_time == self.start_time
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_parens_and_spaces() {
        let line = "42 (a) b (c) S 1 40 41 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 12345 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.pgrp, 40);
        assert_eq!(s.session, 41);
        assert_eq!(s.start_time, 12345);
    }

    #[test]
    fn own_process_is_alive() {
        let me = std::process::id() as i32;
        assert!(start_time(me).is_some());
        assert!(all_pids().contains(&me));
    }

    /// A signal for a process found earlier reaches it only while it is that
    /// process: a stale start time or a process that is gone gets nothing.
    #[test]
    fn a_signal_for_a_scanned_process_is_sent_only_to_that_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap();
        let found = Process::of(child.id() as i32).unwrap();
        // A process with this pid but another start time is not the one found.
        let other = Process {
            start_time: found.start_time + 1,
            ..found
        };
        assert!(!other.signal(Signal::KILL));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the wrong start time was signalled"
        );
        assert!(found.signal(Signal::KILL));
        child.wait().unwrap();
        assert!(!found.signal(Signal::KILL));
    }

    /// A pinned process that exited gets no signal (`tests/agent.rs` gives its pid
    /// to another process first and checks that one is spared).
    #[test]
    fn a_pinned_process_that_exited_gets_no_signal() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pinned = Pinned::new(child.id() as i32).unwrap();
        child.wait().unwrap();
        assert!(!pinned.signal(Signal::KILL));
    }
}
