//! Retention: `reel gc` deletes the jobs that ended before a horizon — their
//! events, summaries, journal frames, output files and artifacts — and never
//! touches a job that has not ended.
//!
//! A gc holds the log as an engine does (sled's lock), so it runs while no
//! engine does; a running daemon does steps 1 to 3 itself
//! ([`forget_online`]) and leaves the journal to the next such gc. It goes in
//! steps, each made durable before the next, and the
//! first one records what the rest will do, so a gc killed at any point
//! leaves a log that opens and verifies clean, and the next gc finishes it.
//! Before it opens sled it cuts the journal's written-ahead zeros
//! ([`give_back_reserve`]), so that it can run on a full disk.
//!
//! 1. **Chosen.** Every ended job whose end is before the horizon is put in
//!    the `gc` tree (job id → its state: chosen, then forgotten, then
//!    deleted), and the horizon in `meta/gc_horizon`; sled is flushed. From here on the jobs are as good as gone: the journal
//!    audit skips their frames.
//! 2. **Forgotten.** Each chosen job's summary (first, so no listing shows a
//!    job with part of its events) and then its events leave sled; flushed.
//! 3. **Files.** Its `output/<job>/` and `artifacts/<job>{,.part}/` are removed.
//! 4. **Journal.** The journal is copied, frame by frame and a window at a
//!    time, to `journal.gc` without the chosen jobs' frames and without commit
//!    markers (everything in it is in sled: the copy ends at sled's
//!    checkpoint); the copy is synced, its length recorded in `meta/gc_journal`
//!    (flushed), then renamed over `journal` and the directory synced, and
//!    the checkpoint set to its length. An open that finds `meta/gc_journal`
//!    finishes the switch ([`finish_switch`]): the rename if `journal.gc` is
//!    still there, the checkpoint either way. A `journal.gc` without it is a
//!    copy never recorded, and is removed.
//! 5. **Done.** The `gc` tree is cleared.
//! 6. **Compacted** (when the gc deleted at least as many jobs as it kept:
//!    sled never gives a file's space back, it only reuses it). Every tree is
//!    copied into a new sled store `log.gc/` (flushed, synced), which is
//!    swapped with `log/` in one `renameat2(RENAME_EXCHANGE)`, and the old
//!    store (now `log.gc/`) is removed. Both hold the same data, and gc holds
//!    both stores' locks throughout, so whichever is `log/` after a crash is
//!    the log; an open that holds `log/`'s lock removes a `log.gc/` left
//!    behind.
//!
//! Memory stays bounded: the jobs are read from sled one at a time, the chosen
//! set lives in sled, and the journal is read a window at a time.

use std::path::Path;

use super::durable;
use super::journal::{self, Item, Journal};
use super::reader::open_reconciled;
use super::rebuild::Opening;
use super::summary::JobSummary;
use super::trees::{DB_DIR, PID_FILE, TREES, Trees, be_u64, event_key, until_failed};
use super::{artifacts, output};
use crate::model::event::{JobId, Seq};
use crate::store::LogError;
use crate::testkit::crashpoint;

/// The new journal a gc writes beside the old one before it renames it over.
pub const NEW_JOURNAL: &str = "journal.gc";

/// sled's cache for the store a compaction writes.
const COMPACT_CACHE_BYTES: u64 = 4 << 20;

/// The new sled store a gc's compaction writes beside `log/`.
pub const NEW_DB_DIR: &str = "log.gc";

/// What a gc did; serialized (`reel gc --json`, `POST /v1/gc`) with the
/// names given.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// Jobs deleted.
    #[serde(rename = "deleted_jobs")]
    pub jobs: u64,
    /// Of them, jobs an earlier, interrupted gc had chosen.
    #[serde(rename = "resumed_jobs")]
    pub resumed: u64,
    /// Their events.
    #[serde(rename = "deleted_events")]
    pub events: u64,
    /// Bytes of output files and artifacts removed.
    #[serde(rename = "deleted_file_bytes")]
    pub file_bytes: u64,
    /// The journal's length (its frames) before and after.
    #[serde(rename = "journal_bytes_before")]
    pub journal_before: u64,
    /// See `journal_before`.
    #[serde(rename = "journal_bytes_after")]
    pub journal_after: u64,
    /// Jobs kept: every job that had not ended, or ended after the horizon.
    #[serde(rename = "kept_jobs")]
    pub kept: u64,
    /// Of them, jobs that have not ended.
    #[serde(rename = "kept_live_jobs")]
    pub live: u64,
    /// Jobs that ended before this time (Unix ms) are gone.
    pub horizon_ms: u64,
    /// Bytes of sled's directory before and after; the same unless the
    /// store was compacted.
    #[serde(rename = "index_bytes_before")]
    pub index_before: u64,
    /// See `index_before`.
    #[serde(rename = "index_bytes_after")]
    pub index_after: u64,
    /// Done by a running engine: the deleted jobs' journal frames (and sled's
    /// freed space) stay until a gc that has the log to itself.
    pub online: bool,
}

/// How far back a log's history goes: what its last gc deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Jobs that ended before this time (Unix ms) were deleted.
    pub horizon_ms: u64,
}

/// Whether a gc with `horizon_ms` deletes the job `summary` describes (`live`:
/// the job is in the live set): it has ended, before the horizon.
pub fn due(summary: &JobSummary, live: bool, horizon_ms: u64) -> bool {
    !live && summary.finished_ms.is_some_and(|f| f < horizon_ms)
}

/// Deletes every job of the log in `state_dir` that ended before `horizon_ms`
/// (Unix ms), after finishing any gc that was interrupted.
pub fn collect(state_dir: &Path, horizon_ms: u64) -> Result<GcReport, LogError> {
    if !super::exists(state_dir) {
        return Err(LogError::Missing(state_dir.to_path_buf()));
    }
    give_back_reserve(state_dir)?;
    let opened = open_reconciled(state_dir, Opening::Engine, |_| Ok(()))?;
    let _ = std::fs::write(state_dir.join(PID_FILE), std::process::id().to_string());
    let (t, journal, journal_end) = (opened.trees, opened.journal, opened.journal_end);
    for r in &opened.repairs {
        tracing::warn!(log = %state_dir.display(), "{r}");
    }
    let mut report = GcReport {
        journal_before: journal_end,
        ..GcReport::default()
    };
    forget(state_dir, &t, horizon_ms, &|_| false, &mut report)?;
    // Every job the `gc` tree names has frames in the journal: this gc's, an
    // interrupted one's, and those an online gc deleted.
    // Nothing chosen, now or before: nothing to rewrite.
    let pending = t.gc.len() as u64;
    let index = state_dir.join(DB_DIR);
    report.index_before = tree_size(&index);
    report.index_after = report.index_before;
    report.journal_after = journal_end;
    if pending > 0 {
        // 4. Journal.
        report.journal_after = rewrite_journal(state_dir, &t, &journal, journal_end)?;
        // 5. Done.
        t.gc.clear()?;
        t.db.flush()?;
        // 6. Compacted.
        if pending >= report.kept {
            compact(state_dir, &t)?;
            report.index_after = tree_size(&index);
        }
    }
    Ok(report)
}

/// The bytes of the files under `dir`.
fn tree_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => tree_size(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

/// Step 6: a new sled store with every record of the trees, swapped in for
/// the old one.
fn compact(state_dir: &Path, t: &Trees) -> Result<(), LogError> {
    let new_dir = state_dir.join(NEW_DB_DIR);
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| LogError::Io { what, path, source }
    };
    remove_new_store(state_dir)?;
    // Only written to: a small cache, so the two stores together take little
    // more than the old one's.
    let db = sled::Config::new()
        .path(&new_dir)
        .cache_capacity(COMPACT_CACHE_BYTES)
        .flush_every_ms(None)
        .open()?;
    for name in TREES {
        let (from, to) = (t.db.open_tree(name)?, db.open_tree(name)?);
        for item in until_failed(from.iter()) {
            let (k, v) = item?;
            to.insert(k, v)?;
        }
    }
    db.flush()?;
    durable::sync_dir(&new_dir).map_err(io("cannot sync", &new_dir))?;
    crashpoint::gc("compacted");
    let old = state_dir.join(DB_DIR);
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        &old,
        rustix::fs::CWD,
        &new_dir,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .map_err(|e| io("cannot swap in the compacted store for", &old)(e.into()))?;
    durable::sync_dir(state_dir).map_err(io("cannot sync", state_dir))?;
    crashpoint::gc("exchanged");
    // `log.gc/` is the old store now; this process still has it open.
    remove_new_store(state_dir)?;
    drop(db);
    Ok(())
}

/// Removes `log.gc/` (a compaction's new store never swapped in, or the old
/// store one swapped out). Only a process holding `log/`'s lock calls it: no
/// gc is running then.
fn remove_new_store(state_dir: &Path) -> Result<(), LogError> {
    let dir = state_dir.join(NEW_DB_DIR);
    durable::gone_is_fine(std::fs::remove_dir_all(&dir)).map_err(|source| LogError::Io {
        what: "cannot remove an earlier gc's store copy",
        path: dir,
        source,
    })
}

/// Cuts the zeros the writer keeps ahead of the journal's last frame (8 MiB,
/// [`super::writer`]), holding the log's lock: on a full disk — when a gc is
/// most wanted — they are the room sled needs to open and to record what gc
/// chose. The next engine writes them again. The file is cut at
/// [`journal::written_end`].
fn give_back_reserve(state_dir: &Path) -> Result<(), LogError> {
    let Some(_lock) = super::rebuild::lock_db(state_dir)? else {
        return Ok(());
    };
    let path = state_dir.join(journal::FILE_NAME);
    let io = |what: &'static str| {
        let path = path.clone();
        move |source| LogError::Io { what, path, source }
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("cannot open")(e)),
    };
    let len = file.metadata().map_err(io("cannot read"))?.len();
    let keep = journal::written_end(&file).map_err(io("cannot read"))?;
    if keep < len {
        file.set_len(keep)
            .map_err(io("cannot cut the zeros after the frames of"))?;
    }
    Ok(())
}

/// Steps 1 to 3 on the trees `t` of the log in `state_dir`: chooses every job
/// that ended before `horizon_ms` (and that `running` does not name: the
/// jobs an engine holds in memory), then forgets it in sled and removes its
/// files, with the jobs an interrupted gc had chosen. Fills in `report`'s
/// counts of jobs, events, files and kept jobs.
fn forget(
    state_dir: &Path,
    t: &Trees,
    horizon_ms: u64,
    running: &dyn Fn(JobId) -> bool,
    report: &mut GcReport,
) -> Result<(), LogError> {
    report.resumed = unfinished(t)?;
    report.horizon_ms = horizon_ms;
    // 1. Chosen.
    let mut dirty = 0;
    let earlier = t.meta.get("gc_horizon")?.and_then(|v| be_u64(&v));
    for item in until_failed(t.jobs.iter()) {
        let (k, v) = item?;
        let live = t.live.contains_key(&k)? || running(job_of(&k)?);
        if JobSummary::decode(&v)
            .ok()
            .is_some_and(|s| due(&s, live, horizon_ms))
        {
            // A job chosen before keeps the state it reached.
            let _ = t.gc.compare_and_swap(&k, None::<&[u8]>, Some(CHOSEN))?;
            bounded(t, &mut dirty)?;
        } else if !t.gc.contains_key(&k)? {
            report.kept += 1;
            report.live += u64::from(live);
        }
    }
    if horizon_ms > 0 && earlier.is_none_or(|e| e < horizon_ms) {
        t.meta.insert("gc_horizon", &horizon_ms.to_be_bytes())?;
    }
    t.db.flush()?;
    crashpoint::gc("chosen");
    report.jobs = unfinished(t)?;
    // 2. Forgotten.
    for item in t.gc.iter() {
        let (k, state) = item?;
        if state != CHOSEN {
            continue;
        }
        let job = job_of(&k)?;
        t.jobs.remove(job.to_be_bytes())?;
        let mut batch = sled::Batch::default();
        for item in until_failed(t.events.range(event_key(job, 0)..=event_key(job, Seq::MAX))) {
            batch.remove(item?.0);
            report.events += 1;
        }
        t.events.apply_batch(batch)?;
        t.gc.insert(&k, FORGOTTEN)?;
        bounded(t, &mut dirty)?;
        crashpoint::gc("forgetting");
    }
    t.db.flush()?;
    crashpoint::gc("forgotten");
    // 3. Files.
    let out = state_dir.join(output::DIR_NAME);
    for item in t.gc.iter() {
        let (k, state) = item?;
        if state != FORGOTTEN {
            continue;
        }
        let job = job_of(&k)?;
        for dir in [
            out.join(job.to_string()),
            artifacts::job_dir(state_dir, job),
            artifacts::partial_dir(state_dir, job),
        ] {
            report.file_bytes += remove_tree(&dir)?;
        }
        t.gc.insert(&k, DELETED)?;
        bounded(t, &mut dirty)?;
        crashpoint::gc("files");
    }
    t.db.flush()?;
    Ok(())
}

/// Flushes sled every [`FLUSH_EVERY`] jobs a step changed: sled cannot
/// evict a page it has not written (peak RSS of a gc of 30,000 jobs: 68 MiB
/// without, 60 MiB with; what still grows with the history is sled's own
/// bookkeeping of the pages it touched, whatever its cache size). A flush
/// only makes more of the step durable, which is always safe.
fn bounded(t: &Trees, dirty: &mut u32) -> Result<(), LogError> {
    *dirty += 1;
    if *dirty >= FLUSH_EVERY {
        t.db.flush()?;
        *dirty = 0;
    }
    Ok(())
}

/// See [`bounded`].
const FLUSH_EVERY: u32 = 500;

/// A job's state in the `gc` tree: chosen, forgotten by sled, its files
/// deleted too (only its journal frames are left: an online gc stops here).
const CHOSEN: &[u8] = b"";
const FORGOTTEN: &[u8] = b"s";
const DELETED: &[u8] = b"d";

/// Jobs in the `gc` tree whose summary, events or files may still be there.
fn unfinished(t: &Trees) -> Result<u64, LogError> {
    let mut n = 0;
    for item in t.gc.iter() {
        n += u64::from(item?.1 != DELETED);
    }
    Ok(n)
}

/// Steps 1 to 3 on a running engine's log (`EventLog::gc_online`): the jobs'
/// summaries, events and files go now; their journal frames stay, skipped by
/// every audit while the `gc` tree names them, until the next gc that has
/// the log to itself rewrites the journal.
pub(super) fn forget_online(
    state_dir: &Path,
    t: &Trees,
    horizon_ms: u64,
    running: &dyn Fn(JobId) -> bool,
) -> Result<GcReport, LogError> {
    let mut report = GcReport {
        online: true,
        ..GcReport::default()
    };
    forget(state_dir, t, horizon_ms, running, &mut report)?;
    let index = tree_size(&state_dir.join(DB_DIR));
    (report.index_before, report.index_after) = (index, index);
    Ok(report)
}

fn job_of(key: &[u8]) -> Result<JobId, LogError> {
    be_u64(key).ok_or(LogError::BadKey {
        tree: "gc",
        len: key.len(),
    })
}

/// Removes `dir` and everything in it; returns the bytes its files held.
/// A directory that is not there is nothing to do.
fn remove_tree(dir: &Path) -> Result<u64, LogError> {
    let io = |what| {
        move |source| LogError::Io {
            what,
            path: dir.to_path_buf(),
            source,
        }
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io("cannot read")(e)),
    };
    let mut bytes = 0;
    for entry in entries {
        let entry = entry.map_err(io("cannot read"))?;
        let meta = entry.metadata().map_err(io("cannot read"))?;
        if meta.is_dir() {
            bytes += remove_tree(&entry.path())?;
        } else {
            bytes += meta.len();
            durable::gone_is_fine(std::fs::remove_file(entry.path()))
                .map_err(io("cannot remove a file in"))?;
        }
    }
    durable::gone_is_fine(std::fs::remove_dir(dir)).map_err(io("cannot remove"))?;
    Ok(bytes)
}

/// Step 4: the journal without the chosen jobs' frames. Returns its length.
fn rewrite_journal(
    state_dir: &Path,
    t: &Trees,
    journal: &Journal,
    journal_end: u64,
) -> Result<u64, LogError> {
    let new_path = state_dir.join(NEW_JOURNAL);
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| LogError::Io { what, path, source }
    };
    let new = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&new_path)
        .map_err(io("cannot create", &new_path))?;
    let mut len = 0u64;
    let mut failed: Option<LogError> = None;
    journal
        .scan(0, journal_end, |item, bytes| {
            let keep = match item {
                Item::Frame { job: 0, .. } => false,
                Item::Frame { job, .. } => match t.gc.contains_key(job.to_be_bytes()) {
                    Ok(chosen) => !chosen,
                    Err(e) => {
                        failed = Some(e.into());
                        return Err(std::io::Error::other("sled"));
                    }
                },
                // Damage stays as it was found, so audits still report it.
                Item::Damaged { .. } => true,
            };
            if keep {
                std::os::unix::fs::FileExt::write_all_at(&new, bytes, len)?;
                len += bytes.len() as u64;
            }
            Ok(())
        })
        .map_err(|e| match failed.take() {
            Some(f) => f,
            None => io("cannot copy the journal to", &new_path)(e),
        })?;
    new.sync_all().map_err(io("cannot sync", &new_path))?;
    drop(new);
    crashpoint::gc("copied");
    t.meta.insert("gc_journal", &len.to_be_bytes())?;
    t.db.flush()?;
    crashpoint::gc("staged");
    switch(state_dir, t, len)?;
    Ok(len)
}

/// Renames the new journal over the old (if it is still beside it), syncs
/// the directory, and moves sled's checkpoint to its end.
fn switch(state_dir: &Path, t: &Trees, len: u64) -> Result<(), LogError> {
    let new_path = state_dir.join(NEW_JOURNAL);
    if new_path.exists() {
        let old = state_dir.join(journal::FILE_NAME);
        std::fs::rename(&new_path, &old).map_err(|source| LogError::Io {
            what: "cannot rename the new journal over",
            path: old.clone(),
            source,
        })?;
        durable::sync_dir(state_dir).map_err(|source| LogError::Io {
            what: "cannot sync",
            path: state_dir.to_path_buf(),
            source,
        })?;
    }
    crashpoint::gc("switched");
    t.meta.insert("journal_end", &len.to_be_bytes())?;
    t.meta.remove("gc_journal")?;
    t.db.flush()?;
    crashpoint::gc("checkpointed");
    Ok(())
}

/// Called by every open once it holds sled's lock, before the journal is
/// opened: removes a compaction's `log.gc/` left behind, finishes the switch
/// to a gc's new journal if one was recorded (`meta/gc_journal`), and removes
/// a new journal that never was.
pub(super) fn finish_switch(state_dir: &Path, t: &Trees) -> Result<(), LogError> {
    remove_new_store(state_dir)?;
    let staged = t.meta.get("gc_journal")?.and_then(|v| be_u64(&v));
    match staged {
        Some(len) => {
            tracing::info!(log = %state_dir.display(), "finishing an interrupted gc's switch to its new journal");
            switch(state_dir, t, len)
        }
        None => durable::gone_is_fine(std::fs::remove_file(state_dir.join(NEW_JOURNAL))).map_err(
            |source| LogError::Io {
                what: "cannot remove an unfinished gc's journal copy",
                path: state_dir.join(NEW_JOURNAL),
                source,
            },
        ),
    }
}

/// How far back the history of the log behind `t` goes.
pub(super) fn retention(t: &Trees) -> Result<Option<Retention>, LogError> {
    Ok(t.meta
        .get("gc_horizon")?
        .and_then(|v| be_u64(&v))
        .map(|horizon_ms| Retention { horizon_ms }))
}
