//! Bringing sled up to date with the journal when a log is opened.
//!
//! The journal is the write-ahead log: a round is acknowledged once its
//! frames are synced there and applied to sled in memory; sled flushes
//! behind it. Opening compares the journal from sled's checkpoint on with
//! sled and writes back every event sled lacks. Events past the point the
//! commit markers say sled had flushed are its unflushed tail (normal after a
//! crash, applied quietly); events sled lacks *before* that point were lost by
//! sled (a torn or damaged store) and are restored, saying so. A damaged run
//! past everything acknowledged is the torn end of the last round and is cut.

use std::collections::{BTreeMap, BTreeSet};

use super::journal::{self, Journal};
use super::summary::JobSummary;
use super::trees::{Trees, be_u64, event_key, events_of, fold_from};
use crate::model::event::{JobId, Seq};
use crate::model::state::JobState;
use crate::store::LogError;

/// Compares the journal's tail (from sled's checkpoint on) with sled, restores
/// every event sled lost, and cuts a torn journal tail. Returns where the next
/// journal frame goes and what was repaired.
pub(super) fn reconcile(t: &Trees, journal: &Journal) -> Result<(u64, Vec<Repair>), LogError> {
    let io = |source| LogError::Io {
        what: "cannot read the journal",
        path: journal.path().to_path_buf(),
        source,
    };
    let checkpoint = match t.meta.get("journal_end")? {
        Some(v) => be_u64(&v).unwrap_or(0),
        None => 0,
    };
    let len = journal.file_len().map_err(io)?;
    let mut repairs = Vec::new();
    if len < checkpoint {
        let path = journal.path().display();
        repairs.push(Repair::general(if journal.created() {
            format!(
                "the journal {path} is missing (the log had recorded {checkpoint} bytes of it): the \
                 events written so far have no second copy; a new journal holds the events from here on"
            )
        } else {
            format!(
                "the journal {path} ends at byte {len} but the log recorded {checkpoint}: its last \
                 round was lost; later events are journaled from here on"
            )
        }));
        // The checkpoint follows the journal that is there now, so the loss
        // is reported once, not on every open until the next round.
        t.meta.insert("journal_end", &len.to_be_bytes())?;
        t.db.flush()?;
        return Ok((len, repairs));
    }
    let tail = journal.read_from(checkpoint).map_err(io)?;
    let items = journal::parse(&tail, checkpoint);
    drop(tail);
    // What the commit markers vouch for: every frame before `acked` was
    // acknowledged, every event before `indexed` was durable in sled. sled
    // holds everything before its checkpoint.
    let (mut acked, mut indexed) = (checkpoint, checkpoint);
    for item in &items {
        if let journal::Item::Frame {
            offset,
            job: 0,
            envelope,
            ..
        } = item
        {
            let m = journal::Marker::of(*offset, envelope);
            acked = acked.max(m.acked);
            indexed = indexed.max(m.indexed);
        }
    }
    let mut end = checkpoint;
    let mut restored: BTreeMap<JobId, Vec<Seq>> = BTreeMap::new();
    let mut touched: BTreeSet<JobId> = BTreeSet::new();
    let mut first_lost: Option<(JobId, Seq, u64)> = None;
    let mut batch = sled::Batch::default();
    for item in &items {
        match item {
            journal::Item::Frame {
                offset,
                job: 0,
                envelope,
                ..
            } => end = offset + journal::frame_len(envelope),
            journal::Item::Frame {
                offset,
                job,
                seq,
                envelope,
            } => {
                end = offset + journal::frame_len(envelope);
                touched.insert(*job);
                if t.events.get(event_key(*job, *seq))?.is_none() {
                    if first_lost.is_none() {
                        first_lost = Some((*job, *seq, *offset));
                    }
                    batch.insert(&event_key(*job, *seq), envelope.as_slice());
                    restored.entry(*job).or_default().push(*seq);
                }
            }
            journal::Item::Damaged { offset, len, .. } if *offset >= acked => {
                // Past every acknowledged frame: the round the engine (or
                // the machine) stopped in, written in part and never
                // acknowledged. Nothing after it was acknowledged either.
                repairs.push(Repair::general(format!(
                    "cut a torn journal tail at offset {offset} ({len} damaged bytes, never acknowledged)"
                )));
                journal.truncate(*offset).map_err(io)?;
                break;
            }
            journal::Item::Damaged {
                offset,
                len,
                claimed,
            } => repairs.push(Repair {
                job: claimed.map(|c| c.0),
                message: format!(
                    "journal bytes {offset}..{} are damaged{}",
                    offset + len,
                    claimed
                        .map(|(j, s)| format!(" (frame header names job {j} seq {s})"))
                        .unwrap_or_default()
                ),
            }),
        }
    }
    // sled flushes behind the journal, so after a crash it lacks the events
    // of its last unflushed rounds: they are applied now, as every open
    // does. An event sled lacks *before* a point a marker says sled had
    // flushed was lost by sled (a torn or damaged store).
    let torn = first_lost.is_some_and(|(_, _, offset)| offset < indexed);
    if let (Some((job, seq, _)), true) = (first_lost, torn) {
        let total: usize = restored.values().map(Vec::len).sum();
        repairs.push(Repair {
            job: Some(job),
            message: format!(
                "the sled store was torn at job {job} seq {seq}: it had lost {total} events from there on \
                 (damage on disk near that event is the likely cause); all were restored from the journal"
            ),
        });
    }
    if !restored.is_empty() {
        t.events.apply_batch(batch)?;
    }
    if torn {
        for (job, seqs) in &restored {
            repairs.push(Repair {
                job: Some(*job),
                message: format!(
                    "job {job} seq {}: restored from the journal; the sled store had lost {} (torn or corrupt on disk)",
                    ranges(seqs),
                    if seqs.len() == 1 { "it" } else { "them" }
                ),
            });
        }
    } else if !restored.is_empty() {
        let events: usize = restored.values().map(Vec::len).sum();
        tracing::info!(
            events,
            jobs = restored.len(),
            "brought the index (sled) up to date from the journal: the engine stopped before sled had stored these events"
        );
    }
    // Jobs the last rounds touched, and any job sled holds events of beyond the
    // recorded id counter: rebuild their summaries and live-set membership,
    // which a crash between the per-tree batches may have left behind.
    let mut next_job = t
        .meta
        .get("next_job")?
        .and_then(|v| be_u64(&v))
        .unwrap_or(1);
    for item in t.events.range(event_key(next_job, 0)..) {
        let (k, _) = item?;
        if let Some(job) = be_u64(&k) {
            touched.insert(job);
        }
    }
    for job in &touched {
        let state = match fold_from(&t.events, *job) {
            Ok(s) => s,
            Err(e) => {
                // Without a summary the job would vanish from listings (a
                // rebuilt store has none): keep one of the events that fold.
                // A job that had not ended is live, so the engine's open
                // salvages it (`salvage.rs`: set aside, its sandbox id still
                // reserved) and recovery sees it.
                let listed = t.jobs.get(job.to_be_bytes())?.is_some();
                let partial = (!listed).then(|| fold_prefix(&t.events, *job)).flatten();
                if let Some(state) = &partial {
                    t.jobs
                        .insert(job.to_be_bytes(), JobSummary::of(state).encode())?;
                    if !state.is_terminal() {
                        t.live.insert(job.to_be_bytes(), &[])?;
                    }
                }
                repairs.push(Repair {
                    job: Some(*job),
                    message: format!(
                        "job {job}: cannot rebuild its summary: {}{}",
                        super::audit::error_line(&e),
                        if partial.is_some() {
                            format!(
                                "; it is listed as of seq {}, the last event that folds",
                                partial.as_ref().map_or(0, |s| s.seq)
                            )
                        } else {
                            String::new()
                        }
                    ),
                });
                next_job = next_job.max(job + 1);
                continue;
            }
        };
        let stale = t
            .jobs
            .get(job.to_be_bytes())?
            .and_then(|v| JobSummary::decode(&v).ok())
            .is_none_or(|old| old.finished_ms.is_none() && state.is_terminal());
        if stale || restored.contains_key(job) {
            t.jobs
                .insert(job.to_be_bytes(), JobSummary::of(&state).encode())?;
        }
        if state.is_terminal() {
            t.live.remove(job.to_be_bytes())?;
        } else {
            t.live.insert(job.to_be_bytes(), &[])?;
        }
        next_job = next_job.max(job + 1);
    }
    t.meta.insert("next_job", &next_job.to_be_bytes())?;
    t.meta.insert("journal_end", &end.to_be_bytes())?;
    t.db.flush()?;
    Ok((end, repairs))
}

/// A job's state folded up to the first event that does not decode or fold;
/// `None` if not even its first event does.
fn fold_prefix(events: &sled::Tree, job: JobId) -> Option<JobState> {
    let mut state = JobState::new(job);
    for r in events_of(events, job) {
        let Ok(r) = r else { break };
        if state.apply_mut(r.at_ms, &r.event).is_err() {
            break;
        }
    }
    (state.seq > 0).then_some(state)
}

/// Something opening the log found damaged and repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// The job it concerns, if one.
    pub job: Option<JobId>,
    /// What was found and done, as a sentence.
    pub message: String,
}

impl Repair {
    fn general(message: String) -> Repair {
        Repair { job: None, message }
    }
}

impl std::fmt::Display for Repair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// `1..3, 7` for `[1, 2, 3, 7]`.
fn ranges(seqs: &[Seq]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let mut j = i;
        while j + 1 < seqs.len() && seqs[j + 1] == seqs[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            seqs[i].to_string()
        } else {
            format!("{}..{}", seqs[i], seqs[j])
        });
        i = j + 1;
    }
    out.join(", ")
}
