//! [`EventLog`]: a running engine's log — a [`LogReader`] that can also append,
//! through the one writer thread.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::durable;
use super::output::Stream;
use super::reader::{LogReader, open_reconciled};
use super::rebuild::Opening;
use super::salvage::{LiveJobs, fold_live};
use super::stats::LogStats;
use super::trees::{PID_FILE, fold_from, live_ids};
use super::writer::{CHANNEL_DEPTH, Request, Writer};
use super::{LogOptions, lock};
use crate::model::event::{Event, JobId, Seq};
use crate::model::spec::JobSpec;
use crate::model::state::JobState;
use crate::store::LogError;
use crate::testkit::crashpoint;

struct Shared {
    reader: LogReader,
    tx: async_channel::Sender<Request>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// In-memory state of every live job, shared with the writer for reads.
    live: Arc<Mutex<HashMap<JobId, JobState>>>,
    /// Live jobs whose history cannot be read: the state their readable part
    /// folds to (never appended to; see `salvage.rs`).
    set_aside: HashMap<JobId, JobState>,
    stats: Arc<LogStats>,
}

/// The event log of a running engine. Cheap to clone; the writer stops when
/// the last clone drops. Every read method of [`LogReader`] is available on it.
#[derive(Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("dir", &self.shared.reader.dir())
            .finish()
    }
}

impl std::ops::Deref for EventLog {
    type Target = LogReader;

    fn deref(&self) -> &LogReader {
        &self.shared.reader
    }
}

impl EventLog {
    /// Opens (creating if needed) the log in `state_dir` and starts its writer.
    ///
    /// Folds every live job into memory so appends can be checked; the cost is
    /// proportional to the live jobs' histories, not to the whole log.
    pub fn open(state_dir: &Path, options: LogOptions) -> Result<EventLog, LogError> {
        durable::create_dir_all(state_dir, true).map_err(|source| LogError::Io {
            what: "cannot create the state directory",
            path: state_dir.to_path_buf(),
            source,
        })?;
        // Reading every live job's history surfaces sled corruption (which
        // makes the store be rebuilt from the journal); a job whose events do
        // not decode or fold is salvaged below, not a reason to rebuild.
        let opened = open_reconciled(state_dir, Opening::Engine, |trees| {
            let ids = live_ids(&trees.live)?;
            for &id in &ids {
                match fold_from(&trees.events, id) {
                    Ok(_) | Err(LogError::Corrupt { .. } | LogError::Illegal(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(ids)
        })?;
        let live_ids = opened.loaded;
        let (trees, journal, journal_end, mut repairs) = (
            opened.trees,
            opened.journal,
            opened.journal_end,
            opened.repairs,
        );
        let _ = std::fs::write(state_dir.join(PID_FILE), std::process::id().to_string());
        let LiveJobs { live, set_aside } = fold_live(&trees, &journal, &live_ids, &mut repairs)?;
        for r in &repairs {
            tracing::warn!(log = %state_dir.display(), "{r}");
        }
        let live = Arc::new(Mutex::new(live));
        let (tx, rx) = async_channel::bounded(CHANNEL_DEPTH);
        let stats = Arc::new(LogStats::default());
        let writer = Writer::new(
            trees.clone(),
            rx,
            live.clone(),
            &state_dir.join(super::output::DIR_NAME),
            journal.clone(),
            journal_end,
            options.durability,
        )?
        .with_stats(stats.clone());
        let reader =
            LogReader::over(trees, state_dir, journal, repairs).settling_on(writer.progress());
        let handle = std::thread::Builder::new()
            .name("reel-log-writer".into())
            .spawn(move || smol::block_on(writer.run()))
            .map_err(|source| LogError::Io {
                what: "cannot start the log writer thread for",
                path: state_dir.to_path_buf(),
                source,
            })?;
        Ok(EventLog {
            shared: Arc::new(Shared {
                reader,
                tx,
                writer: Mutex::new(Some(handle)),
                live,
                set_aside,
                stats,
            }),
        })
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(async_channel::Sender<Result<T, LogError>>) -> Request,
    ) -> Result<T, LogError> {
        let (reply, answer) = async_channel::bounded(1);
        self.shared
            .tx
            .send(make(reply))
            .await
            .map_err(|_| LogError::WriterStopped(None))?;
        answer
            .recv()
            .await
            .map_err(|_| LogError::WriterStopped(None))?
    }

    /// Submits a job: allocates its id and appends `Submitted`. Returns once durable.
    ///
    /// A job over the size limits ([`JobSpec::check_size`]) is refused with
    /// [`LogError::Spec`] before it reaches the writer: nothing is written and no
    /// id is used up, so the log never holds an event it could not read back.
    pub async fn submit(&self, spec: JobSpec) -> Result<JobId, LogError> {
        spec.check_size()?;
        let probe = Event::Submitted {
            spec: JobSpec::default(),
        };
        crashpoint::check(&probe, crashpoint::When::Before);
        let id = self
            .request(|reply| Request::Submit {
                spec: Box::new(spec),
                reply,
            })
            .await?;
        crashpoint::check(&probe, crashpoint::When::After);
        Ok(id)
    }

    /// Appends an event to a job. Returns its seq once it is durable; an event the
    /// state machine refuses is not written and returns [`LogError::Illegal`].
    pub async fn append(&self, job: JobId, event: Event) -> Result<Seq, LogError> {
        crashpoint::check(&event, crashpoint::When::Before);
        let armed = crashpoint::armed().then(|| event.clone());
        let asked = std::time::Instant::now();
        let seq = self
            .request(|reply| Request::Append { job, event, reply })
            .await?;
        self.shared.stats.appended(asked.elapsed());
        if let Some(event) = armed {
            crashpoint::check(&event, crashpoint::When::After);
        }
        Ok(seq)
    }

    /// Stores a piece of a step's output at `offset` in its combined stream.
    /// Returns the stream's stored end once durable. Bytes below the stored end
    /// are duplicates (a resumed stream) and are skipped; a chunk starting past
    /// the end is refused with [`LogError::OutputGap`].
    pub async fn append_output(
        &self,
        job: JobId,
        step: u32,
        offset: u64,
        stream: Stream,
        bytes: Vec<u8>,
    ) -> Result<u64, LogError> {
        self.request(|reply| Request::Output {
            job,
            step,
            offset,
            stream,
            bytes,
            reply,
        })
        .await
    }

    /// Blocking form of [`EventLog::append`], for threads outside an executor.
    pub fn append_blocking(&self, job: JobId, event: Event) -> Result<Seq, LogError> {
        smol::block_on(self.append(job, event))
    }

    /// Blocking form of [`EventLog::submit`].
    pub fn submit_blocking(&self, spec: JobSpec) -> Result<JobId, LogError> {
        smol::block_on(self.submit(spec))
    }

    /// The log's own measurements (append latency, group-commit rounds).
    pub fn stats(&self) -> &LogStats {
        &self.shared.stats
    }

    /// The folded state of a live job, from memory (a copy).
    pub fn live_state(&self, job: JobId) -> Option<JobState> {
        self.live_with(job, JobState::clone)
    }

    /// Live jobs set aside on open because their history cannot be read, with
    /// the state their readable part folds to (for the sandbox id they hold).
    pub fn set_aside(&self) -> &HashMap<JobId, JobState> {
        &self.shared.set_aside
    }

    /// Reads a live job's folded state in place, without copying it (the
    /// executor reads its phase after every append).
    pub fn live_with<T>(&self, job: JobId, f: impl FnOnce(&JobState) -> T) -> Option<T> {
        lock(&self.shared.live).get(&job).map(f)
    }

    /// Deletes the jobs that ended before `horizon_ms` while this engine runs
    /// (`reel gc` through the daemon): their summaries, events, output and
    /// artifacts go now; their journal frames stay, skipped by audits, until
    /// a gc that has the log to itself rewrites the journal (`gc.rs`). A job
    /// in the live set or in memory is never touched. Blocking: call it off
    /// the executor.
    pub fn gc_online(&self, horizon_ms: u64) -> Result<super::GcReport, LogError> {
        let live = &self.shared.live;
        super::gc::forget_online(
            self.dir(),
            self.shared.reader.settled(),
            horizon_ms,
            &|job| lock(live).contains_key(&job),
        )
    }

    /// Stops the writer after it has answered every request sent before, and
    /// flushes. Further appends fail with [`LogError::WriterStopped`].
    pub fn close(&self) {
        self.shared.tx.close();
        if let Some(h) = lock(&self.shared.writer).take() {
            let _ = h.join();
        }
        let _ = self.shared.reader.trees.db.flush();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.tx.close();
        if let Some(h) = lock(&self.writer).take() {
            let _ = h.join();
        }
    }
}
