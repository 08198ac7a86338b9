//! The guest's serial console log: why a VM died, and what it said last.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

/// How much of the console's end a failed step gets on its stderr.
pub const TAIL_BYTES: u64 = 8 * 1024;

/// The console log's length now (0 if it does not exist).
pub fn len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Up to `max` bytes of the log from `from` on.
pub fn read_from(path: &Path, from: u64, max: u64) -> Vec<u8> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_ok() {
        let _ = f.take(max).read_to_end(&mut out);
    }
    out
}

/// The last `max` bytes of the log.
pub fn tail(path: &Path, max: u64) -> Vec<u8> {
    let end = len(path);
    read_from(path, end.saturating_sub(max), max)
}

/// What the guest kernel said about the end of a step, read from the console text
/// it printed meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Said {
    /// `Kernel panic - not syncing: ...`: the line.
    Panic(String),
    /// The guest's OOM killer ended processes: how many, and the first line.
    OutOfMemory(usize, String),
}

/// Reads `text` (console output) for a kernel panic or OOM kills; a panic wins.
pub fn said(text: &[u8]) -> Option<Said> {
    let text = String::from_utf8_lossy(text);
    let lines = || text.lines().map(|l| strip_timestamp(l).trim());
    if let Some(l) = lines().find(|l| l.starts_with("Kernel panic")) {
        return Some(Said::Panic(l.to_owned()));
    }
    let kills: Vec<&str> = lines()
        .filter(|l| {
            l.starts_with("Out of memory: Killed process")
                || l.starts_with("Memory cgroup out of memory: Killed process")
        })
        .collect();
    kills
        .first()
        .map(|first| Said::OutOfMemory(kills.len(), (*first).to_owned()))
}

/// `[   12.345678] text` → `text`.
fn strip_timestamp(line: &str) -> &str {
    match line.trim_start().strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(line, |(_, t)| t),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_and_oom_kills_are_found_with_or_without_timestamps() {
        let panic = b"[    1.23] Run /init as init process\n[    2.5] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009\n";
        assert_eq!(
            said(panic),
            Some(Said::Panic(
                "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009".into()
            ))
        );
        let oom = b"x\nOut of memory: Killed process 77 (python3) total-vm:1kB\n[ 3.0] Out of memory: Killed process 78 (sh)\n";
        assert_eq!(
            said(oom),
            Some(Said::OutOfMemory(
                2,
                "Out of memory: Killed process 77 (python3) total-vm:1kB".into()
            ))
        );
        assert_eq!(said(b"all well\n"), None);
    }

    #[test]
    fn the_tail_is_the_logs_last_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(tail(&p, 4), b"6789");
        assert_eq!(tail(&p, 40), b"0123456789");
        assert_eq!(read_from(&p, 3, 2), b"34");
        assert!(tail(&dir.path().join("none"), 4).is_empty());
    }
}
