//! Just enough of `/proc` to name processes by pid **and** start time.

use std::path::Path;

/// The fields of `/proc/<pid>/stat` the runner uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Process state (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Session id (field 6).
    pub session: i32,
    /// Start time in clock ticks after boot (field 22).
    pub start_time: u64,
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
        session: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The start time of a live (not zombie) process.
pub fn start_time(pid: i32) -> Option<u64> {
    stat(pid)
        .filter(|s| s.state != 'Z' && s.state != 'X')
        .map(|s| s.start_time)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_parens_and_spaces() {
        let line = "42 (a) b (c) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 12345 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.session, 42);
        assert_eq!(s.start_time, 12345);
    }

    #[test]
    fn own_process_is_alive() {
        let me = std::process::id() as i32;
        assert!(start_time(me).is_some());
        assert!(all_pids().contains(&me));
    }
}
