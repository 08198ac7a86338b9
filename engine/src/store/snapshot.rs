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
        let journal = state_dir.join(journal::FILE_NAME);
        if journal.exists() {
            std::fs::copy(&journal, snapshot.dir.join(journal::FILE_NAME)).map_err(|source| {
                LogError::Io {
                    what: "cannot copy",
                    path: journal.clone(),
                    source,
                }
            })?;
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

/// Runs `open` again while it fails because this very process holds the log's
/// lock: a log this process closed a moment ago stays locked until sled's
/// threads finish their last flush. Waits at most 3 s; any other result,
/// including a lock another process holds, is returned at once.
pub(super) fn patient<T>(mut open: impl FnMut() -> Result<T, LogError>) -> Result<T, LogError> {
    let poll = std::time::Duration::from_millis(20);
    let mut waited = std::time::Duration::ZERO;
    loop {
        match open() {
            Err(LogError::Locked {
                holder: Some(pid), ..
            }) if pid == std::process::id() && waited < std::time::Duration::from_secs(3) => {
                std::thread::sleep(poll);
                waited += poll;
            }
            other => return other,
        }
    }
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
