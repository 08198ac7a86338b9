//! Temporary copies of a log for offline readers, and the lock probe that tells
//! whether a running engine holds a log.
//!
//! Offline tools never open a dead engine's sled directory in place: opening
//! sled can rewrite it (and would shred a damaged segment), so they open a copy
//! of the sled directory and the journal. Step output files are append-only
//! and are read in place, file by file, without keeping a handle open.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::trees::{DB_DIR, read_holder};
use crate::store::{LogError, journal};

/// A temporary copy of a log, removed when dropped.
#[derive(Debug)]
pub struct Snapshot {
    dir: PathBuf,
}

impl Snapshot {
    /// Copies the log of an engine that is not running (its sled directory and
    /// journal) to a new temporary directory. Refuses a log another process
    /// holds ([`LogError::Locked`]) and a state directory without a log.
    pub fn take(state_dir: &Path) -> Result<Snapshot, LogError> {
        if !super::exists(state_dir) {
            return Err(LogError::Missing(state_dir.to_path_buf()));
        }
        patient(|| check_unlocked(state_dir))?;
        let dir = std::env::temp_dir().join(format!(
            "reel-snapshot-{}-{}",
            std::process::id(),
            crate::time::now_ms()
        ));
        // Owned from here: a failed copy removes what it copied.
        let snapshot = Snapshot { dir };
        copy_dir(&state_dir.join(DB_DIR), &snapshot.dir.join(DB_DIR))?;
        // The journal, and the new one an interrupted gc may have left
        // beside it (the copy's open finishes that gc's switch).
        for name in [journal::FILE_NAME, super::gc::NEW_JOURNAL] {
            let journal = state_dir.join(name);
            if journal.exists() {
                std::fs::copy(&journal, snapshot.dir.join(name)).map_err(|source| {
                    LogError::Io {
                        what: "cannot copy",
                        path: journal.clone(),
                        source,
                    }
                })?;
            }
        }
        Ok(snapshot)
    }

    /// Where the copy is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `open` again while the log's lock is held by no live engine: by this
/// very process (a log it closed a moment ago stays locked until sled's
/// threads finish their last flush; at most 3 s), or after its engine died (at
/// most 10 s). A child an engine was starting holds a copy of every descriptor
/// of the engine, sled's locked one too, from its fork until its exec, and
/// goes on to exec after a SIGKILL of the engine; on a loaded machine that can
/// take a while. A lock still held then is refused naming who holds it. A lock
/// a live engine holds is refused at once, and any other result returned.
pub(super) fn patient<T>(mut open: impl FnMut() -> Result<T, LogError>) -> Result<T, LogError> {
    use std::time::{Duration, Instant};
    let started = Instant::now();
    loop {
        let locked = match open() {
            Err(LogError::Locked { path, holder }) => (path, holder),
            other => return other,
        };
        let limit = match locked.1 {
            Holder::Engine(pid) if pid == std::process::id() => Duration::from_secs(3),
            Holder::Engine(pid) if !running(pid) => Duration::from_secs(10),
            _ => Duration::ZERO,
        };
        if started.elapsed() >= limit {
            let (path, holder) = locked;
            let holder = match holder {
                Holder::Engine(engine) if engine != std::process::id() && !running(engine) => {
                    Holder::Left {
                        engine,
                        by: holders_of(&path.join("db")),
                    }
                }
                other => other,
            };
            return Err(LogError::Locked { path, holder });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Who holds a log's lock, as far as can be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// No engine recorded its pid.
    Unknown,
    /// The engine that recorded its pid when it opened the log.
    Engine(u32),
    /// The engine that recorded its pid is gone; these processes (pid and
    /// command) have the lock's file open.
    Left {
        /// The gone engine's pid.
        engine: u32,
        /// `pid command` of each process that has the file open.
        by: Vec<String>,
    },
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Holder::Unknown => Ok(()),
            Holder::Engine(pid) => write!(f, " (engine pid {pid})"),
            Holder::Left { engine, by } if by.is_empty() => write!(
                f,
                " (the engine that recorded its pid, {engine}, is gone; no process with the lock's file open was found)"
            ),
            Holder::Left { engine, by } => write!(
                f,
                " (the engine that recorded its pid, {engine}, is gone; the lock's file is open in: {})",
                by.join("; ")
            ),
        }
    }
}

/// Whether a process with this pid runs (a zombie holds no files: it does not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) S ...`: the state follows the last `)`.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// `pid command` of every process with `file` open (read from `/proc/*/fd`;
/// only asked when a lock is refused).
fn holders_of(file: &Path) -> Vec<String> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == file))
        {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            found.push(format!("pid {pid} {}", cmd.trim()));
        }
    }
    found
}

pub(super) fn check_unlocked(state_dir: &Path) -> Result<(), LogError> {
    let db = state_dir.join(DB_DIR).join("db");
    let file = match File::open(&db) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(LogError::Io {
                what: "cannot open",
                path: db,
                source,
            });
        }
    };
    // sled holds an exclusive flock on `db` while open; a shared, non-blocking
    // try tells whether a live process holds it without disturbing it.
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            let _ = rustix::fs::flock(&file, rustix::fs::FlockOperation::Unlock);
            Ok(())
        }
        Err(_) => Err(LogError::Locked {
            path: state_dir.join(DB_DIR),
            holder: read_holder(state_dir),
        }),
    }
}

pub(super) fn copy_dir(from: &Path, to: &Path) -> Result<(), LogError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| LogError::Io { what, path, source }
    };
    std::fs::create_dir_all(to).map_err(io("cannot create", to))?;
    for entry in std::fs::read_dir(from).map_err(io("cannot read", from))? {
        let entry = entry.map_err(io("cannot read", from))?;
        let target = to.join(entry.file_name());
        let ty = entry
            .file_type()
            .map_err(io("cannot stat", &entry.path()))?;
        if ty.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if ty.is_file() {
            std::fs::copy(entry.path(), &target).map_err(io("cannot copy", &entry.path()))?;
        }
    }
    Ok(())
}
