//! Opening a log whose live jobs cannot all be read.
//!
//! A live job whose stored history does not fold (a corrupt stored event, or
//! one over the decode limit written by an older build) must not keep the
//! store from opening, or no other job could be recovered. Each such job is
//! repaired from the journal's intact copies of its events where they exist;
//! a job that still does not fold is set aside: reported, kept out of the
//! writer's memory (so nothing more is appended to it), and its sandbox id
//! stays reserved from the part of its history that folds.

use std::collections::{BTreeMap, HashMap};

use super::audit::error_line;
use super::journal::{self, Journal};
use super::reconcile::Repair;
use super::trees::{Trees, event_key, events_of, fold_from};
use crate::model::event::{Event, JobId, Seq};
use crate::model::state::JobState;
use crate::store::LogError;

/// The live jobs of a log, folded: those that can be appended to, and those
/// set aside (with the state their readable prefix folds to).
pub(super) struct LiveJobs {
    pub live: HashMap<JobId, JobState>,
    pub set_aside: HashMap<JobId, JobState>,
}

/// Folds every live job; repairs or sets aside those that do not fold.
pub(super) fn fold_live(
    trees: &Trees,
    journal: &Journal,
    live_ids: &[JobId],
    repairs: &mut Vec<Repair>,
) -> Result<LiveJobs, LogError> {
    let mut jobs = LiveJobs {
        live: HashMap::new(),
        set_aside: HashMap::new(),
    };
    let mut damaged = Vec::new();
    for &id in live_ids {
        match fold_from(&trees.events, id) {
            Ok(state) => {
                jobs.live.insert(id, state);
            }
            Err(LogError::Corrupt { .. } | LogError::Illegal(_)) => damaged.push(id),
            Err(e) => return Err(e),
        }
    }
    if damaged.is_empty() {
        return Ok(jobs);
    }
    let restored = restore_from_journal(trees, journal, &damaged)?;
    for id in damaged {
        match fold_from(&trees.events, id) {
            Ok(state) => {
                let n = restored.get(&id).copied().unwrap_or(0);
                repairs.push(Repair {
                    job: Some(id),
                    message: format!(
                        "job {id}: {n} corrupt stored event(s) replaced by the journal's intact copies"
                    ),
                });
                jobs.live.insert(id, state);
            }
            Err(e) => {
                repairs.push(Repair {
                    job: Some(id),
                    message: format!(
                        "job {id} is set aside: its history cannot be read ({}); nothing more is \
                         appended to it, its sandbox id stays reserved, every other job goes on; \
                         `reel replay {id}` shows what is readable",
                        error_line(&e)
                    ),
                });
                jobs.set_aside.insert(id, readable_prefix(trees, id));
            }
        }
    }
    Ok(jobs)
}

/// Writes the journal's intact copy over every stored event of `jobs` that does
/// not decode. Returns how many were replaced per job. One pass over the
/// journal, only when damage was found.
fn restore_from_journal(
    trees: &Trees,
    journal: &Journal,
    jobs: &[JobId],
) -> Result<BTreeMap<JobId, usize>, LogError> {
    let mut bad: BTreeMap<(JobId, Seq), ()> = BTreeMap::new();
    for &job in jobs {
        let prefix = job.to_be_bytes();
        for item in trees.events.scan_prefix(prefix) {
            let (k, v) = item?;
            if Event::decode(&v).is_err()
                && let Some(seq) = k.get(8..12).and_then(|b| b.try_into().ok())
            {
                bad.insert((job, u32::from_be_bytes(seq)), ());
            }
        }
    }
    let mut replaced = BTreeMap::new();
    if bad.is_empty() {
        return Ok(replaced);
    }
    let bytes = journal.read_from(0).map_err(|source| LogError::Io {
        what: "cannot read the journal",
        path: journal.path().to_path_buf(),
        source,
    })?;
    let mut batch = sled::Batch::default();
    for item in journal::parse(&bytes, 0) {
        if let journal::Item::Frame {
            job, seq, envelope, ..
        } = item
            && bad.remove(&(job, seq)).is_some()
            && Event::decode(&envelope).is_ok()
        {
            batch.insert(&event_key(job, seq), envelope);
            *replaced.entry(job).or_insert(0) += 1;
        }
    }
    trees.events.apply_batch(batch)?;
    trees.db.flush()?;
    Ok(replaced)
}

/// The state the readable events of a job fold to, up to the first that does
/// not decode or fold.
fn readable_prefix(trees: &Trees, job: JobId) -> JobState {
    let mut state = JobState::new(job);
    for r in events_of(&trees.events, job) {
        let Ok(r) = r else { break };
        if state.apply_mut(r.at_ms, &r.event).is_err() {
            break;
        }
    }
    state
}
