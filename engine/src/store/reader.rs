//! Reading the log: [`LogReader`], the type every reader holds.
//!
//! A `LogReader` has no way to append. Offline tools (`jobs`, `replay`,
//! `inspect`, `output`, `verify`, `recover --dry-run`) open one over a
//! temporary copy of a dead engine's log ([`LogReader::open_copy`]): no writer
//! is started, no output file is opened for writing, nothing of the original
//! state directory changes. A running engine's [`EventLog`](super::EventLog)
//! is a `LogReader` that can also append (it dereferences to one), so readers
//! of a live log use the same methods.
//!
//! A value that fails its checksum or does not decode is reported as
//! [`LogError::Corrupt`] naming the job and seq (or the output file); other jobs
//! stay readable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::journal::Journal;
use super::output::{self, OutputChunk, Stream};
use super::reconcile::{Repair, reconcile};
use super::snapshot::Snapshot;
use super::summary::JobSummary;
use super::trees::{Trees, be_u64, events_of, fold_from, live_ids, open_trees};
use crate::model::event::{JobId, Record};
use crate::model::state::JobState;
use crate::store::LogError;

/// Live jobs whose history cannot be read or folded, each with why.
pub type Unreadable = Vec<(JobId, LogError)>;

/// Read access to a log: listings, histories, folds, step output.
pub struct LogReader {
    pub(super) trees: Trees,
    /// The state directory the log belongs to (the original, for a copy).
    dir: PathBuf,
    pub(super) journal: Arc<Journal>,
    /// Where step output files are (read in place, one read at a time).
    output_dir: PathBuf,
    /// What opening found and repaired.
    repairs: Vec<Repair>,
    /// The temporary copy this reader reads, removed after the trees close.
    _copy: Option<Snapshot>,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader").field("dir", &self.dir).finish()
    }
}

impl LogReader {
    /// Opens the log of an engine that is not running, for reading, without
    /// changing a byte of it: the sled directory and the journal are copied to a
    /// temporary directory (removed when the reader drops) and the copy is
    /// opened and reconciled with its journal; step output is read in place.
    /// Refuses (with [`LogError::Locked`]) a log another process holds, and
    /// (with [`LogError::Missing`]) a state directory without a log.
    pub fn open_copy(state_dir: &Path) -> Result<LogReader, LogError> {
        let copy = Snapshot::take(state_dir)?;
        let (trees, journal, _, repairs) = open_reconciled(copy.dir())?;
        Ok(LogReader {
            trees,
            dir: state_dir.to_path_buf(),
            journal,
            output_dir: state_dir.join(output::DIR_NAME),
            repairs,
            _copy: Some(copy),
        })
    }

    /// A reader over trees the caller opened and reconciled (the writer's).
    pub(super) fn over(
        trees: Trees,
        dir: &Path,
        journal: Arc<Journal>,
        repairs: Vec<Repair>,
    ) -> LogReader {
        LogReader {
            trees,
            dir: dir.to_path_buf(),
            journal,
            output_dir: dir.join(output::DIR_NAME),
            repairs,
            _copy: None,
        }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where step output files are.
    pub(super) fn output_dir(&self) -> &Path {
        &self.output_dir
    }

    /// What opening the log found and repaired (events restored from the
    /// journal after sled lost them, a torn journal tail cut), one sentence each.
    pub fn repairs(&self) -> &[Repair] {
        &self.repairs
    }

    /// Ids of every non-terminal job, ascending. Reads only the `live` tree.
    pub fn live_jobs(&self) -> Result<Vec<JobId>, LogError> {
        live_ids(&self.trees.live)
    }

    /// Every job's summary, ascending by id. A corrupt summary is an `Err` item;
    /// the iteration goes on past it.
    pub fn jobs(&self) -> impl Iterator<Item = Result<JobSummary, LogError>> + '_ {
        self.trees.jobs.iter().map(|item| {
            let (k, v) = item?;
            let id = be_u64(&k).ok_or(LogError::BadKey {
                tree: "jobs",
                len: k.len(),
            })?;
            JobSummary::decode(&v).map_err(|source| LogError::CorruptRecord {
                job: id,
                what: "job summary",
                source,
            })
        })
    }

    /// A job's summary.
    pub fn summary(&self, job: JobId) -> Result<JobSummary, LogError> {
        let v = self
            .trees
            .jobs
            .get(job.to_be_bytes())?
            .ok_or(LogError::UnknownJob(job))?;
        JobSummary::decode(&v).map_err(|source| LogError::CorruptRecord {
            job,
            what: "job summary",
            source,
        })
    }

    /// A job's events in seq order. A corrupt event is an `Err` item naming its
    /// seq; the iteration goes on past it.
    pub fn events(&self, job: JobId) -> impl Iterator<Item = Result<Record, LogError>> + '_ {
        events_of(&self.trees.events, job)
    }

    /// Folds a job's whole history.
    pub fn fold(&self, job: JobId) -> Result<JobState, LogError> {
        fold_from(&self.trees.events, job)
    }

    /// The folded state of every live job, ascending by id, and apart from them
    /// each live job whose history cannot be read or folded, with why.
    pub fn live_states(&self) -> Result<(Vec<JobState>, Unreadable), LogError> {
        let (mut states, mut unreadable) = (Vec::new(), Vec::new());
        for job in self.live_jobs()? {
            match self.fold(job) {
                Ok(s) => states.push(s),
                Err(e @ (LogError::Corrupt { .. } | LogError::Illegal(_))) => {
                    unreadable.push((job, e));
                }
                Err(e) => return Err(e),
            }
        }
        Ok((states, unreadable))
    }

    /// A step's stored output from `from` on, in offset order. Damage in the
    /// step's file is an `Err` item after the chunks before it.
    pub fn output(
        &self,
        job: JobId,
        step: u32,
        from: u64,
    ) -> impl Iterator<Item = Result<OutputChunk, LogError>> + '_ {
        let items: Vec<Result<OutputChunk, LogError>> =
            match output::read(&self.output_dir, job, step) {
                Err(source) => vec![Err(LogError::Io {
                    what: "cannot read the output file",
                    path: output::path(&self.output_dir, job, step),
                    source,
                })],
                Ok(buf) => {
                    let (frames, _, stopped) = output::parse(&buf);
                    let mut items: Vec<_> = frames
                        .into_iter()
                        .filter(|(offset, _, bytes)| offset + bytes.len() as u64 > from)
                        .map(|(offset, stream, bytes)| {
                            Ok(OutputChunk {
                                offset,
                                stream: Stream::from_byte(stream),
                                bytes,
                            })
                        })
                        .collect();
                    if let Some(source) = stopped {
                        items.push(Err(LogError::CorruptOutput { job, step, source }));
                    }
                    items
                }
            };
        items.into_iter()
    }

    /// Where a step's stored output ends (the next offset to write).
    pub fn output_end(&self, job: JobId, step: u32) -> Result<u64, LogError> {
        let mut end = 0;
        for chunk in self.output(job, step, 0) {
            match chunk {
                Ok(c) => end = c.offset + c.bytes.len() as u64,
                // A torn tail was never acknowledged; the writer cuts it.
                Err(LogError::CorruptOutput {
                    source: output::FrameError::Torn { .. },
                    ..
                }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(end)
    }

    /// Bytes the log occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, LogError> {
        Ok(self.trees.db.size_on_disk()?)
    }
}

/// Opens the sled trees and the journal in `dir` and reconciles them (events
/// sled lost restored, an interrupted round completed, a torn journal tail cut).
/// Returns the trees, the journal, where the journal's next frame goes, and
/// what was repaired.
pub(super) fn open_reconciled(
    dir: &Path,
) -> Result<(Trees, Arc<Journal>, u64, Vec<Repair>), LogError> {
    let trees = open_trees(dir)?;
    let journal = Arc::new(Journal::open(dir).map_err(|source| LogError::Io {
        what: "cannot open the journal in",
        path: dir.to_path_buf(),
        source,
    })?);
    let (journal_end, repairs) = reconcile(&trees, &journal)?;
    Ok((trees, journal, journal_end, repairs))
}
