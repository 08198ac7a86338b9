//! Getting a sled directory that will not open back into service: sled's
//! unfinished snapshot files are cleared before it is opened, and a store
//! sled refuses as corrupt is rebuilt from the journal.
//!
//! **Unfinished snapshots.** sled 0.34.7 writes a snapshot of its page table
//! only while it opens: to `log/snap.<lsn>.generating`, synced, then renamed
//! to `log/snap.<lsn>`; older snapshots are removed after the rename. When the
//! write fails (a full disk), the `.generating` file stays. sled's next open
//! lists every `snap.*` file, sorts the names and reads the last — and
//! `snap.X.generating` sorts after `snap.X` and every older snapshot, so it
//! reads the partial file and refuses to open ("corrupted data") for ever. A
//! `.generating` file is by construction one sled never finished: the
//! snapshot it would have replaced is still there (or the log is replayed
//! from its start), so removing it loses nothing. It is removed only while
//! holding the log's lock, so an engine opening the same directory at the same
//! moment never loses the file it is writing.
//!
//! **Rebuilding.** When sled finds its store corrupt while the log is opened
//! — it refuses to open it (a damaged byte in `log/db` that its snapshot
//! points into, a truncated file), or a read of a damaged page fails while
//! reconciling or loading — the journal still holds every event in the order
//! it was written. The damaged
//! directory is renamed aside (`log.damaged-<unix ms>`, never deleted), a new
//! store is created, and every event of the journal is written into it;
//! `reconcile` then rebuilds every job's summary and the live set from the
//! events, sets the id counter past the highest job and the journal
//! checkpoint at the journal's end, exactly as it does for the jobs an
//! interrupted round touched. An offline reader does the same on its
//! temporary copy and leaves the state directory as it found it.

use std::path::{Path, PathBuf};

use super::durable;
use super::journal::{self, Journal};
use super::reconcile::Repair;
use super::trees::{DB_DIR, Trees, event_key, open_trees, read_holder};
use crate::store::LogError;

/// Events written to the new store per sled batch.
const BATCH: usize = 8192;

/// Who is opening a log, which decides what may change on disk.
#[derive(Debug, Clone, Copy)]
pub(super) enum Opening<'a> {
    /// A running engine, in its own state directory: repairs are made in
    /// place, new files and directories are synced.
    Engine,
    /// An offline reader, on a temporary copy of `original`'s log.
    Copy {
        /// The state directory the copy was taken from.
        original: &'a Path,
    },
}

impl Opening<'_> {
    pub(super) fn durable(self) -> bool {
        matches!(self, Opening::Engine)
    }
}

/// Removes sled's unfinished snapshot files (`log/snap.*.generating`) from
/// the log in `dir`, holding the log's lock while it does. Refuses a log
/// another process holds.
pub(super) fn clear_unfinished_snapshots(dir: &Path, how: Opening<'_>) -> Result<(), LogError> {
    let log = dir.join(DB_DIR);
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| LogError::Io { what, path, source }
    };
    let stale: Vec<PathBuf> = match std::fs::read_dir(&log) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("snap.") && n.ends_with(".generating"))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(LogError::Io {
                what: "cannot read",
                path: log,
                source,
            });
        }
    };
    if stale.is_empty() {
        return Ok(());
    }
    // sled takes an exclusive flock on `db` before it writes a snapshot; taking
    // it here first means no engine is in the middle of writing this one.
    let lock = lock_db(dir)?;
    for p in &stale {
        let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        std::fs::remove_file(p).map_err(io("cannot remove", p))?;
        match how {
            Opening::Engine => tracing::warn!(
                file = %p.display(),
                bytes = size,
                "removed an unfinished sled snapshot (left by an open that failed, e.g. on a full disk); \
                 sled rebuilds its snapshot from its log"
            ),
            Opening::Copy { original } => tracing::debug!(
                log = %original.display(),
                file = %p.display(),
                "ignored an unfinished sled snapshot in the copy; the next engine to open the log removes it"
            ),
        }
    }
    if how.durable() {
        durable::sync_dir(&log).map_err(io("cannot sync", &log))?;
    }
    // Dropping the file releases the lock; sled takes its own on open.
    drop(lock);
    Ok(())
}

/// Takes the exclusive `flock` sled takes on `log/db` (waiting as every open
/// does for a dead engine's), so no engine has the log open while it is held;
/// released when the file is dropped. `None` if there is no `log/db`.
pub(super) fn lock_db(dir: &Path) -> Result<Option<std::fs::File>, LogError> {
    let log = dir.join(DB_DIR);
    let db = log.join("db");
    let lock = match std::fs::File::open(&db) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LogError::Io {
                what: "cannot open",
                path: db,
                source,
            });
        }
    };
    super::snapshot::patient(|| {
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |_| LogError::Locked {
                path: log.clone(),
                holder: read_holder(dir),
            },
        )
    })?;
    Ok(Some(lock))
}

/// Whether a failure means sled found its store on disk corrupt (and
/// rebuilding it from the journal is the way forward).
pub(super) fn is_corrupt(e: &LogError) -> bool {
    matches!(e, LogError::Storage(sled::Error::Corruption { .. }))
}

/// Rebuilds the store in `dir` from `journal` after sled found it corrupt
/// (`why`): the damaged directory is moved aside, a new store is created and
/// every journaled event written into it. Summaries, the live set, the id
/// counter and the checkpoint are left to `reconcile`, which the caller runs
/// next. Refuses when the journal holds no event: there is nothing to rebuild from.
pub(super) fn rebuild(
    dir: &Path,
    journal: &Journal,
    why: &LogError,
    how: Opening<'_>,
) -> Result<(Trees, Repair), LogError> {
    let shown = match how {
        Opening::Engine => dir.join(DB_DIR),
        Opening::Copy { original } => original.join(DB_DIR),
    };
    let reason = reason(why);
    let jio = |source| LogError::Io {
        what: "cannot read the journal",
        path: journal.path().to_path_buf(),
        source,
    };
    let bytes = journal.read_from(0).map_err(jio)?;
    let items = journal::parse(&bytes, 0);
    drop(bytes);
    if !items
        .iter()
        .any(|i| matches!(i, journal::Item::Frame { job, .. } if *job != 0))
    {
        return Err(LogError::Unrebuildable {
            path: shown,
            reason,
            journal: journal.path().to_path_buf(),
        });
    }
    let log = dir.join(DB_DIR);
    let aside = dir.join(format!("{DB_DIR}.damaged-{}", crate::time::now_ms()));
    std::fs::rename(&log, &aside).map_err(|source| LogError::Io {
        what: "cannot move the damaged store aside from",
        path: log.clone(),
        source,
    })?;
    let trees = open_trees(dir)?;
    if how.durable() {
        for d in [&log, dir] {
            durable::sync_dir(d).map_err(|source| LogError::Io {
                what: "cannot sync",
                path: d.to_path_buf(),
                source,
            })?;
        }
    }
    let mut events = 0u64;
    let mut jobs = std::collections::BTreeSet::new();
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    for item in items {
        if let journal::Item::Frame {
            job, seq, envelope, ..
        } = item
            && job != 0
        {
            batch.insert(&event_key(job, seq), envelope);
            in_batch += 1;
            events += 1;
            jobs.insert(job);
            if in_batch == BATCH {
                trees.events.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
    }
    trees.events.apply_batch(batch)?;
    trees.db.flush()?;
    let restored = format!(
        "{events} event{} of {} job{}",
        if events == 1 { "" } else { "s" },
        jobs.len(),
        if jobs.len() == 1 { "" } else { "s" }
    );
    let message = match how {
        Opening::Engine => format!(
            "the sled store in {} is damaged ({reason}); it was moved aside to {} \
             (kept, not deleted) and a new store was rebuilt from the journal: {restored} restored",
            shown.display(),
            aside.display()
        ),
        Opening::Copy { .. } => format!(
            "the sled store in {} is damaged ({reason}); this read rebuilt its copy from the \
             journal ({restored}); the store on disk stays as it is until an engine opens it, which \
             rebuilds it the same way and keeps the damaged one aside",
            shown.display()
        ),
    };
    Ok((trees, Repair { job: None, message }))
}

/// What sled said, without its backtrace field.
fn reason(e: &LogError) -> String {
    match e {
        LogError::Storage(sled::Error::Corruption { at: Some(at), .. }) => {
            format!("sled found corrupt data at {at:?}")
        }
        LogError::Storage(sled::Error::Corruption { at: None, .. }) => {
            "sled found corrupt data".to_string()
        }
        other => super::audit::error_line(other),
    }
}
