//! The sled trees and their keys: opening them, and the reads both the writer
//! and the readers use. Keys are raw big-endian bytes, never bincode, so they
//! sort numerically.

use std::path::Path;

use sled::IVec;

use crate::model::codec;
use crate::model::event::{Event, JobId, Record, Seq};
use crate::model::state::JobState;
use crate::store::LogError;

/// `job ++ seq`, big-endian.
pub fn event_key(job: JobId, seq: Seq) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&job.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

pub(super) fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

#[derive(Clone)]
pub(super) struct Trees {
    pub db: sled::Db,
    pub events: sled::Tree,
    pub jobs: sled::Tree,
    pub live: sled::Tree,
    pub meta: sled::Tree,
    /// Jobs a `reel gc` chose to delete and has not finished deleting
    /// (`gc.rs`): empty but while a gc runs or after one was interrupted.
    pub gc: sled::Tree,
}

pub(super) const PID_FILE: &str = "engine.pid";
pub(super) const DB_DIR: &str = "log";

/// Whether a state directory holds a log.
pub fn exists(state_dir: &Path) -> bool {
    state_dir.join(DB_DIR).join("conf").exists()
}

/// The engine that recorded its pid when it opened the log.
pub(super) fn read_holder(state_dir: &Path) -> super::Holder {
    std::fs::read_to_string(state_dir.join(PID_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map_or(super::Holder::Unknown, super::Holder::Engine)
}

fn open_db(state_dir: &Path) -> Result<sled::Db, LogError> {
    sled::Config::new()
        .path(state_dir.join(DB_DIR))
        .cache_capacity(super::CACHE_BYTES)
        .flush_every_ms(None)
        .open()
        .map_err(|e| {
            // sled reports a held lock as an IO error; whether another process
            // holds it is asked of the lock itself, not read from the message.
            match (&e, super::snapshot::check_unlocked(state_dir)) {
                (sled::Error::Io(_), Err(locked @ LogError::Locked { .. })) => locked,
                _ => LogError::Storage(e),
            }
        })
}

/// The sled trees of the log, in the order `open_trees` opens them.
pub const TREES: [&str; 5] = ["meta", "events", "jobs", "live", "gc"];

pub(super) fn open_trees(state_dir: &Path) -> Result<Trees, LogError> {
    let db = super::snapshot::patient(|| open_db(state_dir))?;
    let meta = db.open_tree("meta")?;
    match meta.get("format")? {
        Some(v) => {
            let found =
                u16::from_be_bytes(v.as_ref().try_into().map_err(|_| LogError::BadKey {
                    tree: "meta",
                    len: v.len(),
                })?);
            if found != codec::FORMAT_VERSION {
                return Err(LogError::Format {
                    found,
                    expected: codec::FORMAT_VERSION,
                });
            }
        }
        None => {
            meta.insert("format", &codec::FORMAT_VERSION.to_be_bytes())?;
        }
    }
    Ok(Trees {
        events: db.open_tree("events")?,
        jobs: db.open_tree("jobs")?,
        live: db.open_tree("live")?,
        gc: db.open_tree("gc")?,
        meta,
        db,
    })
}

pub(super) fn live_ids(live: &sled::Tree) -> Result<Vec<JobId>, LogError> {
    live.iter()
        .keys()
        .map(|k| {
            let k = k?;
            be_u64(&k).ok_or(LogError::BadKey {
                tree: "live",
                len: k.len(),
            })
        })
        .collect()
}

/// A sled iterator that ends after its first error. sled's own iterators
/// return the same error for ever once a read fails (they do not move past a
/// page they cannot read), so a caller that reports an error and goes on
/// would never finish.
pub(super) fn until_failed<I>(iter: I) -> impl Iterator<Item = sled::Result<(IVec, IVec)>>
where
    I: Iterator<Item = sled::Result<(IVec, IVec)>>,
{
    let mut failed = false;
    iter.map_while(move |item| {
        if failed {
            return None;
        }
        failed = item.is_err();
        Some(item)
    })
}

/// A job's stored envelopes in seq order, undecoded.
pub(super) fn raw_events_of(
    events: &sled::Tree,
    job: JobId,
) -> impl Iterator<Item = Result<(Seq, sled::IVec), LogError>> + '_ {
    until_failed(events.range(event_key(job, 0)..=event_key(job, Seq::MAX))).map(move |item| {
        let (k, v) = item?;
        let seq = be_u32(&k[8..]).ok_or(LogError::BadKey {
            tree: "events",
            len: k.len(),
        })?;
        Ok((seq, v))
    })
}

pub(super) fn events_of(
    events: &sled::Tree,
    job: JobId,
) -> impl Iterator<Item = Result<Record, LogError>> + '_ {
    raw_events_of(events, job).map(move |item| {
        let (seq, v) = item?;
        let (at_ms, event) =
            Event::decode(&v).map_err(|source| LogError::Corrupt { job, seq, source })?;
        Ok(Record {
            job,
            seq,
            at_ms,
            event,
        })
    })
}

pub(super) fn fold_from(events: &sled::Tree, job: JobId) -> Result<JobState, LogError> {
    let mut state = JobState::new(job);
    for r in events_of(events, job) {
        let r = r?;
        state.apply_mut(r.at_ms, &r.event)?;
    }
    if state.seq == 0 {
        return Err(LogError::UnknownJob(job));
    }
    Ok(state)
}
