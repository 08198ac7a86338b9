//! Auditing a log offline: the journal compared with sled event by event, each
//! job's history read with the journal's intact copy standing in for a corrupt
//! stored event, and the whole-log check behind `reel verify`.

use std::collections::HashMap;

use super::journal;
use super::reader::LogReader;
use super::trees::event_key;
use crate::model::event::{Event, JobId, Record, Seq};
use crate::model::state::JobState;
use crate::store::LogError;

/// Intact journal copies (envelopes) of events whose stored copy is corrupt.
pub type GoodCopies = HashMap<(JobId, Seq), Vec<u8>>;

/// A disagreement between the journal and the sled store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalFinding {
    /// The journal's copy of an event is damaged; sled's copy is the one in use.
    JournalDamaged {
        /// Offset of the damage in the journal file.
        offset: u64,
        /// The (job, seq) the damaged frame's header names, if readable.
        claimed: Option<(JobId, Seq)>,
    },
    /// The two copies of an event differ.
    Mismatch {
        /// The job.
        job: JobId,
        /// The seq.
        seq: Seq,
        /// Whether the sled copy decodes (if not, the journal copy is the good one).
        sled_ok: bool,
        /// Whether the journal copy decodes.
        journal_ok: bool,
    },
}

impl JournalFinding {
    /// The job the finding concerns, if known.
    pub fn job(&self) -> Option<JobId> {
        match self {
            JournalFinding::JournalDamaged { claimed, .. } => claimed.map(|c| c.0),
            JournalFinding::Mismatch { job, .. } => Some(*job),
        }
    }
}

impl std::fmt::Display for JournalFinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JournalFinding::JournalDamaged {
                offset,
                claimed: Some((j, s)),
            } => write!(
                f,
                "job {j} seq {s}: the journal's copy (offset {offset}) is corrupt; the stored event is used"
            ),
            JournalFinding::JournalDamaged {
                offset,
                claimed: None,
            } => {
                write!(
                    f,
                    "the journal is damaged at offset {offset} (frame header unreadable)"
                )
            }
            JournalFinding::Mismatch {
                job,
                seq,
                sled_ok,
                journal_ok,
            } => write!(
                f,
                "job {job} seq {seq}: the stored event and its journal copy differ (stored copy {}, journal copy {})",
                if *sled_ok { "decodes" } else { "is corrupt" },
                if *journal_ok { "decodes" } else { "is corrupt" },
            ),
        }
    }
}

impl LogReader {
    /// Reads the whole journal and compares it with the stored events. Returns
    /// every disagreement, and the intact journal copy of each event whose
    /// stored copy is corrupt. Cost: one pass over the journal (an offline check).
    pub fn check_journal(&self) -> Result<(Vec<JournalFinding>, GoodCopies), LogError> {
        let bytes = self.journal.read_from(0).map_err(|source| LogError::Io {
            what: "cannot read the journal",
            path: self.journal.path().to_path_buf(),
            source,
        })?;
        let mut findings = Vec::new();
        let mut good_copies = HashMap::new();
        // Empty but during or after an interrupted or online gc: then, and
        // only then, each frame's job is looked up in it.
        let gc = &self.settled().gc;
        let gc_empty = gc.is_empty();
        for item in journal::parse(&bytes, 0) {
            match item {
                journal::Item::Frame { job: 0, .. } => {}
                journal::Item::Frame {
                    job, seq, envelope, ..
                } => {
                    // A job an interrupted gc chose is as good as gone:
                    // sled may have forgotten it already (`gc.rs`).
                    if !gc_empty && gc.contains_key(job.to_be_bytes())? {
                        continue;
                    }
                    let stored = self.settled().events.get(event_key(job, seq))?;
                    if stored.as_deref() == Some(envelope.as_slice()) {
                        continue;
                    }
                    let sled_ok = stored.as_deref().is_some_and(|v| Event::decode(v).is_ok());
                    let journal_ok = Event::decode(&envelope).is_ok();
                    findings.push(JournalFinding::Mismatch {
                        job,
                        seq,
                        sled_ok,
                        journal_ok,
                    });
                    if journal_ok && !sled_ok {
                        good_copies.insert((job, seq), envelope);
                    }
                }
                journal::Item::Damaged {
                    offset, claimed, ..
                } => {
                    findings.push(JournalFinding::JournalDamaged { offset, claimed });
                }
            }
        }
        Ok((findings, good_copies))
    }

    /// What opening repaired and what the journal disagrees on, together: the
    /// starting point of every offline read that must report damage.
    pub fn audit(&self) -> Result<Audit, LogError> {
        let mut problems: Vec<(Option<JobId>, String)> = self
            .repairs()
            .iter()
            .map(|r| (r.job, r.message.clone()))
            .collect();
        let (findings, good_copies) = self.check_journal()?;
        problems.extend(findings.iter().map(|f| (f.job(), f.to_string())));
        Ok(Audit {
            problems,
            good_copies,
        })
    }
}

/// Problems a log's opening and its journal check found, and the journal's
/// intact copies of corrupt stored events.
#[derive(Debug, Default)]
pub struct Audit {
    /// Each problem, with the job it concerns (if one).
    pub problems: Vec<(Option<JobId>, String)>,
    good_copies: GoodCopies,
}

impl Audit {
    /// Problems not tied to one job.
    pub fn general(&self) -> impl Iterator<Item = &String> {
        self.problems
            .iter()
            .filter(|(j, _)| j.is_none())
            .map(|(_, p)| p)
    }

    /// Problems about `job`.
    pub fn of_job(&self, job: JobId) -> impl Iterator<Item = &String> {
        self.problems
            .iter()
            .filter(move |(j, _)| *j == Some(job))
            .map(|(_, p)| p)
    }

    /// A job's history: the events that decode (a corrupt one replaced by the
    /// journal's intact copy where there is one, with a note saying so), and the
    /// errors of those that cannot be read at all.
    pub fn history(&self, log: &LogReader, job: JobId) -> Result<History, LogError> {
        let mut h = History {
            records: Vec::new(),
            errors: Vec::new(),
            notes: self.of_job(job).cloned().collect(),
            restored: 0,
        };
        for item in log.events(job) {
            match item {
                Ok(r) => h.records.push(r),
                Err(e @ LogError::Corrupt { .. }) => {
                    let LogError::Corrupt { seq, .. } = e else {
                        continue;
                    };
                    match self.good_copies.get(&(job, seq)).map(|b| Event::decode(b)) {
                        Some(Ok((at_ms, event))) => {
                            h.notes.push(format!(
                                "{}; the journal's intact copy is used",
                                error_line(&e)
                            ));
                            h.restored += 1;
                            h.records.push(Record {
                                job,
                                seq,
                                at_ms,
                                event,
                            });
                        }
                        _ => h.errors.push(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        if h.records.is_empty() && h.errors.is_empty() {
            return Err(LogError::UnknownJob(job));
        }
        Ok(h)
    }
}

/// One job's events as an offline reader sees them.
#[derive(Debug)]
pub struct History {
    /// The events that could be read, in seq order.
    pub records: Vec<Record>,
    /// Events that cannot be read (no intact copy anywhere).
    pub errors: Vec<LogError>,
    /// Damage found and worked around, one sentence each.
    pub notes: Vec<String>,
    /// How many notes are events read from the journal's copy.
    restored: usize,
}

impl History {
    /// A history read somewhere else than a local log (a daemon's stored
    /// events, sent as they are stored): `records` in seq order, `errors` the
    /// events whose envelopes do not decode ([`LogError::Corrupt`]). It folds
    /// and reports exactly as one read from the log does.
    pub fn from_records(records: Vec<Record>, errors: Vec<LogError>) -> History {
        History {
            records,
            errors,
            notes: Vec::new(),
            restored: 0,
        }
    }

    /// Whether anything about this job was found damaged (repaired or not).
    pub fn damaged(&self) -> bool {
        !self.errors.is_empty() || !self.notes.is_empty()
    }

    /// The lowest seq that cannot be read.
    pub fn first_corrupt_seq(&self) -> Option<Seq> {
        self.errors.iter().filter_map(corrupt_seq).min()
    }

    /// Folds the readable records up to `at` (all, if `None`). A corrupt record
    /// stops the fold (the state after it would be a guess); the second value
    /// says where and why a fold stopped early.
    pub fn fold(&self, job: JobId, at: Option<Seq>) -> (JobState, Option<String>) {
        let mut state = JobState::new(job);
        let first_bad = self.first_corrupt_seq();
        let stopped = |bad: Seq| Some(format!("fold stopped before corrupt seq {bad}"));
        for r in &self.records {
            if at.is_some_and(|at| r.seq > at) {
                break;
            }
            if let Some(bad) = first_bad.filter(|bad| r.seq > *bad) {
                return (state, stopped(bad));
            }
            if let Err(e) = state.apply_mut(r.at_ms, &r.event) {
                return (state, Some(e.to_string()));
            }
        }
        if let Some(bad) = first_bad.filter(|b| at.is_none_or(|at| *b <= at)) {
            return (state, stopped(bad));
        }
        (state, None)
    }
}

/// The seq a [`LogError::Corrupt`] names.
pub fn corrupt_seq(e: &LogError) -> Option<Seq> {
    match e {
        LogError::Corrupt { seq, .. } => Some(*seq),
        _ => None,
    }
}

/// An error and its sources on one line.
pub fn error_line(e: &LogError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// What `verify` found: counts, and every problem as a sentence.
#[derive(Debug, Default)]
pub struct Verification {
    /// Jobs checked.
    pub jobs: u64,
    /// Events read.
    pub events: u64,
    /// Output chunks read.
    pub output_chunks: u64,
    /// Stored artifacts whose file was read and checked against its event.
    pub artifacts: u64,
    /// Every problem found.
    pub problems: Vec<String>,
}

/// Checks every stored job summary, event and output chunk of the log, that
/// each finished step's stored output is as long as its `StepFinished` says,
/// and that each stored artifact's file has the size and CRC-32C of its
/// `ArtifactStored`.
pub fn verify(log: &LogReader, audit: &Audit) -> Result<Verification, LogError> {
    let mut v = Verification {
        problems: audit.problems.iter().map(|(_, p)| p.clone()).collect(),
        ..Verification::default()
    };
    for item in log.jobs() {
        let summary = match item {
            Ok(s) => s,
            Err(e) => {
                v.problems.push(error_line(&e));
                continue;
            }
        };
        v.jobs += 1;
        let h = audit.history(log, summary.id)?;
        v.events += h.records.len() as u64;
        v.problems.extend(h.errors.iter().map(error_line));
        // Events read from the journal's copy: the stored copy is damaged.
        let restored = h.notes.len() - h.restored;
        v.problems.extend(h.notes[restored..].iter().cloned());
        let (state, problem) = h.fold(summary.id, None);
        if let Some(p) = problem.filter(|_| h.errors.is_empty()) {
            v.problems.push(format!("job {}: {p}", summary.id));
        }
        for s in &state.steps {
            let mut stored = 0u64;
            for c in log.output(summary.id, s.index, 0) {
                match c {
                    Ok(c) => {
                        v.output_chunks += 1;
                        stored = stored.max(c.offset + c.bytes.len() as u64);
                    }
                    Err(e) => v.problems.push(error_line(&e)),
                }
            }
            if s.finished_ms.is_some() && stored != s.output_bytes {
                v.problems.push(format!(
                    "job {} step {}: {stored} bytes of output stored, the step produced {}",
                    summary.id,
                    s.index + 1,
                    s.output_bytes
                ));
            }
        }
        for a in &state.artifacts {
            v.artifacts += 1;
            if let Err(p) = super::artifacts::check_file(log.dir(), summary.id, a) {
                v.problems.push(format!("job {}: {p}", summary.id));
            }
        }
    }
    Ok(v)
}
