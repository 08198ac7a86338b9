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

use super::durable;
use super::journal::Journal;
use super::output::{self, OutputChunk, Stream};
use super::rebuild::{Opening, clear_unfinished_snapshots, is_corrupt, rebuild};
use super::reconcile::{Repair, reconcile};
use super::snapshot::Snapshot;
use super::summary::JobSummary;
use super::trees::{
    Trees, be_u64, events_of, fold_from, live_ids, open_trees, raw_events_of, until_failed,
};
use super::writer::Progress;
use crate::model::event::{JobId, Record, Seq};
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
    /// A running engine's writer, whose answered rounds sled's trees may
    /// not hold yet for a moment: every read of the trees waits for them.
    progress: Option<Arc<Progress>>,
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
    /// Every record of the copy is read once, so that a store sled finds
    /// corrupt is found now and the copy rebuilt from the journal (said in
    /// [`LogReader::repairs`]), rather than failing a later read.
    /// Refuses (with [`LogError::Locked`]) a log another process holds, and
    /// (with [`LogError::Missing`]) a state directory without a log.
    pub fn open_copy(state_dir: &Path) -> Result<LogReader, LogError> {
        let copy = Snapshot::take(state_dir)?;
        let opened = open_reconciled(
            copy.dir(),
            Opening::Copy {
                original: state_dir,
            },
            read_everything,
        )?;
        Ok(LogReader {
            trees: opened.trees,
            dir: state_dir.to_path_buf(),
            journal: opened.journal,
            output_dir: state_dir.join(output::DIR_NAME),
            repairs: opened.repairs,
            _copy: Some(copy),
            progress: None,
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
            progress: None,
        }
    }

    /// Makes every read of the trees wait for `progress` to settle (a
    /// running engine's reader).
    pub(super) fn settling_on(mut self, progress: Arc<Progress>) -> LogReader {
        self.progress = Some(progress);
        self
    }

    /// Waits until sled's trees hold every write the writer answered.
    pub(super) fn settled(&self) -> &Trees {
        if let Some(p) = &self.progress {
            p.settle();
        }
        &self.trees
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How far back the log's history goes: `None` if no gc ever deleted
    /// a job from it.
    pub fn retention(&self) -> Result<Option<super::Retention>, LogError> {
        super::gc::retention(self.settled())
    }

    /// What opening the log found and repaired (events restored from the
    /// journal after sled lost them, a torn journal tail cut), one sentence each.
    pub fn repairs(&self) -> &[Repair] {
        &self.repairs
    }

    /// Ids of every non-terminal job, ascending. Reads only the `live` tree.
    pub fn live_jobs(&self) -> Result<Vec<JobId>, LogError> {
        live_ids(&self.settled().live)
    }

    /// Every job's summary, ascending by id. A corrupt summary is an `Err` item;
    /// the iteration goes on past it. A storage failure is the last item.
    pub fn jobs(&self) -> impl Iterator<Item = Result<JobSummary, LogError>> + '_ {
        until_failed(self.settled().jobs.iter()).map(summary_item)
    }

    /// Job summaries newest first, starting below `before` (every job when
    /// `None`): the daemon's paged listing. Errors as for [`LogReader::jobs`].
    pub fn jobs_before(
        &self,
        before: Option<JobId>,
    ) -> impl Iterator<Item = Result<JobSummary, LogError>> + '_ {
        let range = match before {
            Some(b) => self.settled().jobs.range(..b.to_be_bytes()),
            None => self.settled().jobs.range::<[u8; 8], _>(..),
        };
        until_failed(range.rev()).map(summary_item)
    }

    /// A job's summary.
    pub fn summary(&self, job: JobId) -> Result<JobSummary, LogError> {
        let v = self
            .settled()
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
    /// seq; the iteration goes on past it. A storage failure is the last item.
    pub fn events(&self, job: JobId) -> impl Iterator<Item = Result<Record, LogError>> + '_ {
        events_of(&self.settled().events, job)
    }

    /// A job's events as stored (their envelopes, undecoded), in seq order:
    /// what the daemon hands a remote replay tool, which decodes them itself.
    pub fn raw_events(
        &self,
        job: JobId,
    ) -> impl Iterator<Item = Result<(Seq, Vec<u8>), LogError>> + '_ {
        raw_events_of(&self.settled().events, job).map(|r| r.map(|(s, v)| (s, v.to_vec())))
    }

    /// Folds a job's whole history.
    pub fn fold(&self, job: JobId) -> Result<JobState, LogError> {
        fold_from(&self.settled().events, job)
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

    /// A step's stored output from `from` on, in offset order, read from its
    /// file one frame at a time (memory stays one frame, whatever the output's
    /// size). Damage in the step's file is an `Err` item after the chunks
    /// before it, and ends the iteration.
    pub fn output(&self, job: JobId, step: u32, from: u64) -> OutputChunks {
        OutputChunks {
            job,
            step,
            from,
            dir: self.output_dir.clone(),
            frames: None,
            done: false,
        }
    }

    /// Where a step's stored output ends (the next offset to write), found
    /// from the file's tail ([`output::find_end`]). A torn last frame was never
    /// acknowledged and does not count; a damaged tail is an error.
    pub fn output_end(&self, job: JobId, step: u32) -> Result<u64, LogError> {
        let io = |source| LogError::Io {
            what: "cannot read the output file",
            path: output::path(&self.output_dir, job, step),
            source,
        };
        let Some(file) = output::open(&self.output_dir, job, step).map_err(io)? else {
            return Ok(0);
        };
        let tail = output::find_end(&file).map_err(io)?;
        match tail.stopped {
            // A torn tail was never acknowledged; the writer cuts it.
            None | Some(output::FrameError::Torn { .. }) => Ok(tail.end),
            Some(source) => Err(LogError::CorruptOutput { job, step, source }),
        }
    }

    /// Bytes the log occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, LogError> {
        Ok(self.settled().db.size_on_disk()?)
    }
}

/// One entry of the `jobs` tree, decoded.
fn summary_item(item: sled::Result<(sled::IVec, sled::IVec)>) -> Result<JobSummary, LogError> {
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
}

/// A step's stored output, read from its file frame by frame: see
/// [`LogReader::output`].
#[derive(Debug)]
pub struct OutputChunks {
    job: JobId,
    step: u32,
    from: u64,
    dir: PathBuf,
    /// The open file, once the first chunk is asked for.
    frames: Option<output::FrameReader>,
    done: bool,
}

impl Iterator for OutputChunks {
    type Item = Result<OutputChunk, LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let (job, step) = (self.job, self.step);
        let io = |dir: &Path, source| LogError::Io {
            what: "cannot read the output file",
            path: output::path(dir, job, step),
            source,
        };
        if self.frames.is_none() {
            let opened = output::open(&self.dir, job, step)
                .and_then(|f| f.map(output::FrameReader::new).transpose());
            match opened {
                Ok(Some(r)) => self.frames = Some(r),
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(source) => {
                    self.done = true;
                    return Some(Err(io(&self.dir, source)));
                }
            }
        }
        let frames = self.frames.as_mut()?;
        let item = match frames.next_from(self.from)? {
            Ok((offset, stream, bytes)) => Ok(OutputChunk {
                offset,
                stream: Stream::from_byte(stream),
                bytes,
            }),
            Err(output::ReadError::Frame(source)) => {
                Err(LogError::CorruptOutput { job, step, source })
            }
            Err(output::ReadError::Io(source)) => Err(io(&self.dir, source)),
        };
        self.done = item.is_err();
        Some(item)
    }
}

/// A log opened and reconciled: what [`open_reconciled`] returns.
pub(super) struct Opened<T> {
    pub trees: Trees,
    pub journal: Arc<Journal>,
    /// Where the journal's next frame goes.
    pub journal_end: u64,
    /// What was found damaged and repaired.
    pub repairs: Vec<Repair>,
    /// What the caller's `load` read from the trees.
    pub loaded: T,
}

/// Opens the sled trees and the journal in `dir`, reconciles them (events
/// sled lost restored, an interrupted round completed, a torn journal tail
/// cut) and runs `load` over the trees (an engine folds its live jobs; an
/// offline reader reads every record of its copy).
///
/// sled's unfinished snapshot files are cleared first. If sled reports its
/// store corrupt at any point of this — refusing to open it, or failing a
/// read while reconciling or loading — the store is rebuilt from the journal
/// (`rebuild`) and reconciled and loaded again; any other failure (a held
/// lock, a full disk) is returned as it is.
pub(super) fn open_reconciled<T>(
    dir: &Path,
    how: Opening<'_>,
    load: impl Fn(&Trees) -> Result<T, LogError>,
) -> Result<Opened<T>, LogError> {
    clear_unfinished_snapshots(dir, how)?;
    let fresh = !super::exists(dir);
    let first = match open_trees(dir) {
        Ok(t) => Ok(t),
        Err(e) if is_corrupt(&e) => Err(e),
        Err(e) => return Err(e),
    };
    // A gc killed while it switched journals is finished before the
    // journal is opened (`gc.rs`).
    let first = match first {
        Ok(t) => match super::gc::finish_switch(dir, &t) {
            Ok(()) => Ok(t),
            Err(e) if is_corrupt(&e) => Err(e),
            Err(e) => return Err(e),
        },
        Err(e) => Err(e),
    };
    let journal = Journal::open(dir, how.durable()).map_err(|source| LogError::Io {
        what: "cannot open the journal in",
        path: dir.to_path_buf(),
        source,
    })?;
    let journal = Arc::new(match how {
        Opening::Engine => journal,
        Opening::Copy { original } => journal.shown_as(original.join(super::journal::FILE_NAME)),
    });
    if fresh && how.durable() {
        // sled created `log/` and its files: make their names durable too.
        let log = dir.join(super::trees::DB_DIR);
        for d in [log.as_path(), dir] {
            durable::sync_dir(d).map_err(|source| LogError::Io {
                what: "cannot sync",
                path: d.to_path_buf(),
                source,
            })?;
        }
    }
    let why = match first.and_then(|trees| settle(trees, &journal, &load)) {
        Ok(opened) => return Ok(opened),
        Err(e) if is_corrupt(&e) => e,
        Err(e) => return Err(e),
    };
    // The failed attempt's trees are dropped by now, so sled has closed them.
    let (trees, repair) = rebuild(dir, &journal, &why, how)?;
    let mut opened = settle(trees, &journal, &load)?;
    opened.repairs.insert(0, repair);
    Ok(opened)
}

fn settle<T>(
    trees: Trees,
    journal: &Arc<Journal>,
    load: impl Fn(&Trees) -> Result<T, LogError>,
) -> Result<Opened<T>, LogError> {
    let (journal_end, repairs) = reconcile(&trees, journal)?;
    let loaded = load(&trees)?;
    Ok(Opened {
        trees,
        journal: journal.clone(),
        journal_end,
        repairs,
        loaded,
    })
}

/// Reads every record of every tree, so that a page sled cannot read is found
/// now, while the copy can still be rebuilt, rather than by a later listing.
fn read_everything(t: &Trees) -> Result<(), LogError> {
    for tree in [&t.meta, &t.events, &t.jobs, &t.live] {
        for item in tree.iter() {
            item?;
        }
    }
    Ok(())
}
