//! The durable event log: the only module that opens sled.
//!
//! # Layout
//!
//! One sled `Db` in `<state dir>/log/`, with four trees. Keys are raw big-endian
//! bytes (never bincode) so they sort numerically; values are envelopes
//! (`codec.rs`).
//!
//! | tree     | key                                   | value                            |
//! |----------|---------------------------------------|----------------------------------|
//! | `events` | job id u64 ++ seq u32                 | event envelope (kind 1..=0x7fff) |
//! | `jobs`   | job id u64                            | [`JobSummary`] (kind 0x8001)     |
//! | `live`   | job id u64                            | empty: the job is not terminal   |
//! | `meta`   | `format`, `next_job`, `journal_end`   | u16 BE, u64 BE, u64 BE           |
//!
//! Beside it, `<state dir>/journal` holds a second copy of every event
//! (`journal.rs`), so that damage sled would silently truncate is found and
//! repaired, and `<state dir>/output/` holds step output in append-only files
//! (`outstore.rs`), written by the same writer in the same rounds.
//!
//! # Writing: one writer, group commit
//!
//! All mutation goes through one writer thread (running an async task on its
//! own `smol::block_on`). Callers send requests over a bounded `async_channel`.
//! Each round the writer takes every request waiting (up to a cap), checks each
//! event against the job's folded state (an event the state machine rejects is
//! refused and never written), writes the round's journal frames, applies one
//! batch per tree (the `meta` checkpoint last), awaits `flush_async` while
//! syncing the journal (in [`Durability::Fsync`] mode), and only then answers
//! every caller. An append that returned `Ok` is durable; one that returned
//! `Err` was not written. A crash between the batches is completed from the
//! journal when the log is next opened (`reconcile`). ARCHITECTURE.md has the
//! durability promise in full.
//!
//! # Reading
//!
//! Readers go straight to the trees. A value that fails its checksum or does not
//! decode is reported as [`LogError::Corrupt`] naming the job and seq (or output
//! offset); other jobs stay readable.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError};
use crate::crashpoint;
use crate::event::{Event, JobId, Outcome, Record, Seq};
use crate::journal::{self, Journal};
use crate::outstore;
use crate::spec::JobSpec;
use crate::state::{IllegalTransition, JobState, Phase};
use crate::time::now_ms;

/// Envelope kind of a job summary in the `jobs` tree.
pub const KIND_SUMMARY: u16 = 0x8001;

/// sled's page cache. Written pages stay cached up to this size, so it bounds
/// what a long step's stored output costs in engine memory.
pub const CACHE_BYTES: u64 = 48 * 1024 * 1024;

/// Requests the writer takes in one round at most.
const MAX_BATCH: usize = 4096;
/// Output bytes the writer takes in one round at most (a round may exceed it by one chunk).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Depth of the request channel: submitters wait (backpressure) beyond it.
const CHANNEL_DEPTH: usize = 8192;

/// How hard an acknowledged append is pushed to stable storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// sled's `flush` (`pwrite` + `sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER)`
    /// on the written range); the journal and output files are written, not
    /// synced. Survives a crash of the process; survives power loss only if the
    /// drive has no volatile write cache and the files' sizes and extents were
    /// already on disk.
    Flush,
    /// `flush`, and `fdatasync` of the journal (every event) and of each output
    /// file written: survives power loss on a drive that honours cache flushes
    /// (a sled store torn by the power cut is restored from the journal on open).
    /// The default.
    #[default]
    Fsync,
}

/// Options for opening a log.
#[derive(Clone, Debug, Default)]
pub struct LogOptions {
    /// Durability of acknowledged appends.
    pub durability: Durability,
}

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Another process (a running engine) has the log open.
    #[error(
        "the log at {} is in use by another process{}; stop it, or ask the running engine instead",
        path.display(),
        holder.map(|p| format!(" (engine pid {p})")).unwrap_or_default()
    )]
    Locked {
        /// The log directory.
        path: PathBuf,
        /// The pid recorded by the engine that holds it, if known.
        holder: Option<u32>,
    },
    /// No log exists at the path (only for read-only opens).
    #[error("no reel log at {}", .0.display())]
    Missing(PathBuf),
    /// sled failed.
    #[error("the log's storage failed")]
    Storage(#[from] sled::Error),
    /// A filesystem operation around the log failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A stored event does not decode.
    #[error("job {job} seq {seq}: stored event is corrupt")]
    Corrupt {
        /// The job.
        job: JobId,
        /// The seq of the corrupt event.
        seq: Seq,
        /// What is wrong with the bytes.
        #[source]
        source: DecodeError,
    },
    /// A stored job summary or output chunk does not decode.
    #[error("job {job}: stored {what} is corrupt")]
    CorruptRecord {
        /// The job.
        job: JobId,
        /// What kind of record.
        what: String,
        /// What is wrong with the bytes.
        #[source]
        source: DecodeError,
    },
    /// A step's output file is damaged.
    #[error("job {job} step {step}: stored output is corrupt")]
    CorruptOutput {
        /// The job.
        job: JobId,
        /// The step index.
        step: u32,
        /// Where the damage is.
        #[source]
        source: outstore::FrameError,
    },
    /// A key that does not have the layout its tree uses.
    #[error("malformed key in tree {tree}: {len} bytes")]
    BadKey {
        /// The tree.
        tree: &'static str,
        /// The key's length.
        len: usize,
    },
    /// The log was written by a newer or unknown format.
    #[error("the log is format {found}; this build reads format {expected}")]
    Format {
        /// Format found in `meta`.
        found: u16,
        /// Format this build reads.
        expected: u16,
    },
    /// The state machine refused the event; nothing was written.
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    /// The job does not exist.
    #[error("no job {0} in the log")]
    UnknownJob(JobId),
    /// Output would leave a gap in a step's stream.
    #[error("job {job} step {step}: output at offset {offset} leaves a gap after {end}")]
    OutputGap {
        /// The job.
        job: JobId,
        /// The step index.
        step: u32,
        /// The chunk's offset.
        offset: u64,
        /// Where the stored stream ends.
        end: u64,
    },
    /// The writer stopped (after a storage failure, or on close).
    #[error("the log writer has stopped{}", .0.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    WriterStopped(Option<String>),
}

/// Which stream a chunk of output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A stored piece of a step's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// Byte offset of the first byte in the step's combined output.
    pub offset: u64,
    /// Which stream.
    pub stream: Stream,
    /// The bytes, exactly as the step wrote them (after secret masking).
    pub bytes: Vec<u8>,
}

/// What `reel jobs` lists, kept per job in the `jobs` tree.
///
/// Written twice in a job's life: when it is submitted and when it ends (so the
/// hot path of an append writes one key, not two). For a live job the `phase`
/// and `last_seq` here are as of submission; its current state is the fold of
/// its events, which listing tools compute for the (few) live jobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    /// The job.
    pub id: JobId,
    /// The job's name.
    pub name: String,
    /// Its runner.
    pub runner: String,
    /// Who submitted it.
    pub owner: String,
    /// Current phase (snake case).
    pub phase: String,
    /// Outcome, once decided.
    pub outcome: Option<Outcome>,
    /// Submission time, Unix ms.
    pub submitted_ms: u64,
    /// End time, Unix ms.
    pub finished_ms: Option<u64>,
    /// Seq of the last event.
    pub last_seq: Seq,
    /// Steps in the spec.
    pub steps: u32,
}

impl JobSummary {
    fn of(state: &JobState) -> JobSummary {
        let spec = state.spec.as_ref();
        JobSummary {
            id: state.id,
            name: spec.map(|s| s.name.clone()).unwrap_or_default(),
            runner: spec.map(|s| s.runner.clone()).unwrap_or_default(),
            owner: spec.map(|s| s.owner.clone()).unwrap_or_default(),
            phase: state.phase.as_str().to_string(),
            outcome: state.outcome,
            submitted_ms: state.submitted_ms.unwrap_or(0),
            finished_ms: state.finished_ms,
            last_seq: state.seq,
            steps: u32::try_from(state.step_count()).unwrap_or(u32::MAX),
        }
    }

    fn encode(&self) -> Vec<u8> {
        codec::wrap(KIND_SUMMARY, &codec::encode_payload(self))
    }

    fn decode(bytes: &[u8]) -> Result<JobSummary, DecodeError> {
        let env = codec::unwrap(bytes)?;
        if env.kind != KIND_SUMMARY {
            return Err(DecodeError::UnknownKind(env.kind));
        }
        codec::decode_payload(env.kind, env.payload)
    }
}

/// `job ++ seq`, big-endian.
pub fn event_key(job: JobId, seq: Seq) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&job.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// A request to the writer.
enum Request {
    Submit {
        spec: Box<JobSpec>,
        reply: async_channel::Sender<Result<JobId, LogError>>,
    },
    Append {
        job: JobId,
        event: Event,
        reply: async_channel::Sender<Result<Seq, LogError>>,
    },
    Output {
        job: JobId,
        step: u32,
        offset: u64,
        stream: Stream,
        bytes: Vec<u8>,
        reply: async_channel::Sender<Result<u64, LogError>>,
    },
}

struct Trees {
    db: sled::Db,
    events: sled::Tree,
    jobs: sled::Tree,
    live: sled::Tree,
    meta: sled::Tree,
}

struct Shared {
    trees: Trees,
    dir: PathBuf,
    tx: async_channel::Sender<Request>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// In-memory state of every live job, shared with the writer for reads.
    live: Arc<Mutex<HashMap<JobId, JobState>>>,
    /// The journal (second copy of every event).
    journal: Arc<Journal>,
    /// Where step output files are.
    output_dir: PathBuf,
    /// What opening found and repaired.
    repairs: Vec<Repair>,
}

/// The event log. Cheap to clone; the writer stops when the last clone drops.
#[derive(Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

const PID_FILE: &str = "engine.pid";
const DB_DIR: &str = "log";

/// Whether a state directory holds a log.
pub fn exists(state_dir: &Path) -> bool {
    state_dir.join(DB_DIR).join("conf").exists()
}

fn read_holder(state_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(state_dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// The sled trees of the log, in the order `open_trees` opens them.
pub const TREES: [&str; 4] = ["meta", "events", "jobs", "live"];

fn open_trees(state_dir: &Path) -> Result<Trees, LogError> {
    let path = state_dir.join(DB_DIR);
    let db = sled::Config::new()
        .path(&path)
        .cache_capacity(CACHE_BYTES)
        .flush_every_ms(None)
        .open()
        .map_err(|e| {
            if is_lock_error(&e) {
                LogError::Locked {
                    path: path.clone(),
                    holder: read_holder(state_dir),
                }
            } else {
                LogError::Storage(e)
            }
        })?;
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
        meta,
        db,
    })
}

impl EventLog {
    /// Opens (creating if needed) the log in `state_dir` and starts its writer.
    ///
    /// Folds every live job into memory so appends can be checked; the cost is
    /// proportional to the live jobs' histories, not to the whole log.
    pub fn open(state_dir: &Path, options: LogOptions) -> Result<EventLog, LogError> {
        let log = EventLog::open_inner(state_dir, options, state_dir.join(outstore::DIR_NAME))?;
        for r in log.repairs() {
            tracing::warn!(log = %state_dir.display(), "{r}");
        }
        Ok(log)
    }

    fn open_inner(
        state_dir: &Path,
        options: LogOptions,
        output_dir: PathBuf,
    ) -> Result<EventLog, LogError> {
        std::fs::create_dir_all(state_dir).map_err(|source| LogError::Io {
            what: "cannot create the state directory",
            path: state_dir.to_path_buf(),
            source,
        })?;
        let trees = open_trees(state_dir)?;
        let _ = std::fs::write(state_dir.join(PID_FILE), std::process::id().to_string());
        let journal = Arc::new(Journal::open(state_dir).map_err(|source| LogError::Io {
            what: "cannot open the journal in",
            path: state_dir.to_path_buf(),
            source,
        })?);
        let (journal_end, repairs) = reconcile(&trees, &journal)?;
        let mut live = HashMap::new();
        for id in live_ids(&trees.live)? {
            let state = fold_from(&trees.events, id)?;
            live.insert(id, state);
        }
        let next_job = match trees.meta.get("next_job")? {
            Some(v) => be_u64(&v).ok_or(LogError::BadKey {
                tree: "meta",
                len: v.len(),
            })?,
            None => 1,
        };
        let live = Arc::new(Mutex::new(live));
        let (tx, rx) = async_channel::bounded(CHANNEL_DEPTH);
        let writer = Writer {
            trees: Trees {
                db: trees.db.clone(),
                events: trees.events.clone(),
                jobs: trees.jobs.clone(),
                live: trees.live.clone(),
                meta: trees.meta.clone(),
            },
            rx,
            live: live.clone(),
            next_job,
            appenders: outstore::Appenders::new(output_dir.clone()),
            journal: journal.clone(),
            journal_end,
            sync_files: options.durability == Durability::Fsync,
            marker_due: false,
        };
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
                trees,
                dir: state_dir.to_path_buf(),
                tx,
                writer: Mutex::new(Some(handle)),
                live,
                journal,
                output_dir,
                repairs,
            }),
        })
    }

    /// Opens the log of an engine that is not running, for reading, without
    /// changing a byte of it: the sled directory and the journal are copied to a
    /// temporary directory and the copy is opened (step output is read in place). Refuses (with [`LogError::Locked`]) a
    /// log another process holds.
    pub fn open_snapshot(state_dir: &Path) -> Result<(EventLog, Snapshot), LogError> {
        let src = state_dir.join(DB_DIR);
        if !exists(state_dir) {
            return Err(LogError::Missing(state_dir.to_path_buf()));
        }
        check_unlocked(state_dir)?;
        let tmp =
            std::env::temp_dir().join(format!("reel-snapshot-{}-{}", std::process::id(), now_ms()));
        copy_dir(&src, &tmp.join(DB_DIR))?;
        let journal = state_dir.join(journal::FILE_NAME);
        if journal.exists() {
            std::fs::copy(&journal, tmp.join(journal::FILE_NAME)).map_err(|source| {
                LogError::Io {
                    what: "cannot copy",
                    path: journal.clone(),
                    source,
                }
            })?;
        }
        // Output files are plain append-only files: read in place, not copied.
        let log = EventLog::open_inner(
            &tmp,
            LogOptions {
                durability: Durability::Flush,
            },
            state_dir.join(outstore::DIR_NAME),
        )?;
        Ok((log, Snapshot { dir: tmp }))
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// What opening the log found and repaired (events restored from the
    /// journal after sled lost them, a torn journal tail cut), one sentence each.
    pub fn repairs(&self) -> &[Repair] {
        &self.shared.repairs
    }

    /// Reads the whole journal and compares it with the stored events. Returns
    /// every disagreement, and the intact journal copy of each event whose
    /// stored copy is corrupt. Cost: one pass over the journal (an offline check).
    pub fn check_journal(&self) -> Result<(Vec<JournalFinding>, GoodCopies), LogError> {
        let bytes = self
            .shared
            .journal
            .read_from(0)
            .map_err(|source| LogError::Io {
                what: "cannot read the journal",
                path: self.shared.journal.path().to_path_buf(),
                source,
            })?;
        let mut findings = Vec::new();
        let mut good_copies = HashMap::new();
        for item in journal::parse(&bytes, 0) {
            match item {
                journal::Item::Frame { job: 0, .. } => {}
                journal::Item::Frame {
                    job, seq, envelope, ..
                } => {
                    let stored = self.shared.trees.events.get(event_key(job, seq))?;
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
    pub async fn submit(&self, spec: JobSpec) -> Result<JobId, LogError> {
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
        let seq = self
            .request(|reply| Request::Append { job, event, reply })
            .await?;
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

    /// The folded state of a live job, from memory (a copy).
    pub fn live_state(&self, job: JobId) -> Option<JobState> {
        self.live_with(job, JobState::clone)
    }

    /// Reads a live job's folded state in place, without copying it (the
    /// executor reads its phase after every append).
    pub fn live_with<T>(&self, job: JobId, f: impl FnOnce(&JobState) -> T) -> Option<T> {
        lock(&self.shared.live).get(&job).map(f)
    }

    /// Ids of every non-terminal job, ascending. Reads only the `live` tree.
    pub fn live_jobs(&self) -> Result<Vec<JobId>, LogError> {
        live_ids(&self.shared.trees.live)
    }

    /// Every job's summary, ascending by id. A corrupt summary is an `Err` item;
    /// the iteration goes on past it.
    pub fn jobs(&self) -> impl Iterator<Item = Result<JobSummary, LogError>> + '_ {
        self.shared.trees.jobs.iter().map(|item| {
            let (k, v) = item?;
            let id = be_u64(&k).ok_or(LogError::BadKey {
                tree: "jobs",
                len: k.len(),
            })?;
            JobSummary::decode(&v).map_err(|source| LogError::CorruptRecord {
                job: id,
                what: "job summary".into(),
                source,
            })
        })
    }

    /// A job's summary.
    pub fn summary(&self, job: JobId) -> Result<JobSummary, LogError> {
        let v = self
            .shared
            .trees
            .jobs
            .get(job.to_be_bytes())?
            .ok_or(LogError::UnknownJob(job))?;
        JobSummary::decode(&v).map_err(|source| LogError::CorruptRecord {
            job,
            what: "job summary".into(),
            source,
        })
    }

    /// A job's events in seq order. A corrupt event is an `Err` item naming its
    /// seq; the iteration goes on past it.
    pub fn events(&self, job: JobId) -> impl Iterator<Item = Result<Record, LogError>> + '_ {
        events_of(&self.shared.trees.events, job)
    }

    /// Folds a job's whole history.
    pub fn fold(&self, job: JobId) -> Result<JobState, LogError> {
        fold_from(&self.shared.trees.events, job)
    }

    /// Folds a job's history up to and including `seq`.
    pub fn fold_at(&self, job: JobId, seq: Seq) -> Result<JobState, LogError> {
        let mut state = JobState::new(job);
        for r in self.events(job) {
            let r = r?;
            if r.seq > seq {
                break;
            }
            state.apply_mut(r.at_ms, &r.event)?;
        }
        if state.seq == 0 {
            return Err(LogError::UnknownJob(job));
        }
        Ok(state)
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
            match outstore::read(&self.shared.output_dir, job, step) {
                Err(source) => vec![Err(LogError::Io {
                    what: "cannot read the output file",
                    path: outstore::path(&self.shared.output_dir, job, step),
                    source,
                })],
                Ok(buf) => {
                    let (frames, _, stopped) = outstore::parse(&buf);
                    let mut items: Vec<_> = frames
                        .into_iter()
                        .filter(|(offset, _, bytes)| offset + bytes.len() as u64 > from)
                        .map(|(offset, stream, bytes)| {
                            Ok(OutputChunk {
                                offset,
                                stream: if stream == 0 {
                                    Stream::Stdout
                                } else {
                                    Stream::Stderr
                                },
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
                    source: outstore::FrameError::Torn { .. },
                    ..
                }) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(end)
    }

    /// Bytes the log occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, LogError> {
        Ok(self.shared.trees.db.size_on_disk()?)
    }

    /// Stops the writer after it has answered every request sent before, and
    /// flushes. Further appends fail with [`LogError::WriterStopped`].
    pub fn close(&self) {
        self.shared.tx.close();
        if let Some(h) = lock(&self.shared.writer).take() {
            let _ = h.join();
        }
        let _ = self.shared.trees.db.flush();
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

/// A temporary copy of a log, removed when dropped.
#[derive(Debug)]
pub struct Snapshot {
    dir: PathBuf,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map half-updated in a way
    // that matters (inserts and removes are single operations), so recover it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn check_unlocked(state_dir: &Path) -> Result<(), LogError> {
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

fn copy_dir(from: &Path, to: &Path) -> Result<(), LogError> {
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

fn live_ids(live: &sled::Tree) -> Result<Vec<JobId>, LogError> {
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

fn events_of(
    events: &sled::Tree,
    job: JobId,
) -> impl Iterator<Item = Result<Record, LogError>> + '_ {
    events
        .range(event_key(job, 0)..=event_key(job, Seq::MAX))
        .map(move |item| {
            let (k, v) = item?;
            let seq = be_u32(&k[8..]).ok_or(LogError::BadKey {
                tree: "events",
                len: k.len(),
            })?;
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

fn fold_from(events: &sled::Tree, job: JobId) -> Result<JobState, LogError> {
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

/// Compares the journal's tail (from sled's checkpoint on) with sled, restores
/// every event sled lost, and cuts a torn journal tail. Returns where the next
/// journal frame goes and what was repaired.
fn reconcile(t: &Trees, journal: &Journal) -> Result<(u64, Vec<Repair>), LogError> {
    let io = |source| LogError::Io {
        what: "cannot read the journal",
        path: journal.path().to_path_buf(),
        source,
    };
    let checkpoint = match t.meta.get("journal_end")? {
        Some(v) => be_u64(&v).unwrap_or(0),
        None => 0,
    };
    let len = journal.len().map_err(io)?;
    let mut repairs = Vec::new();
    if len < checkpoint {
        repairs.push(Repair::general(format!(
            "the journal ends at byte {len} but the log recorded {checkpoint}: its last round was lost; \
             later events are journaled from here on"
        )));
        return Ok((len, repairs));
    }
    let tail = journal.read_from(checkpoint).map_err(io)?;
    let items = journal::parse(&tail, checkpoint);
    let mut end = checkpoint;
    let mut restored: BTreeMap<JobId, Vec<Seq>> = BTreeMap::new();
    let mut touched: std::collections::BTreeSet<JobId> = std::collections::BTreeSet::new();
    let mut first_lost: Option<(JobId, Seq, u64)> = None;
    let mut acked_upto = 0u64;
    let mut batch = sled::Batch::default();
    for (i, item) in items.iter().enumerate() {
        match item {
            journal::Item::Frame { offset, job: 0, .. } => {
                // A commit marker: every frame before it was acknowledged.
                end = offset + journal::marker().len() as u64;
                acked_upto = *offset;
            }
            journal::Item::Frame {
                offset,
                job,
                seq,
                envelope,
            } => {
                end = offset + journal::frame(*job, *seq, envelope).len() as u64;
                touched.insert(*job);
                if t.events.get(event_key(*job, *seq))?.is_none() {
                    if first_lost.is_none() {
                        first_lost = Some((*job, *seq, *offset));
                    }
                    batch.insert(&event_key(*job, *seq), envelope.as_slice());
                    restored.entry(*job).or_default().push(*seq);
                }
            }
            journal::Item::Damaged { offset, len, .. } if i + 1 == items.len() => {
                // A partial last round: written but never acknowledged.
                repairs.push(Repair::general(format!(
                    "cut a torn journal tail of {len} bytes at offset {offset} (never acknowledged)"
                )));
                journal.truncate(*offset).map_err(io)?;
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
    // A crash in the middle of a round leaves events the journal has and sled
    // lacks, all after the last commit marker. A lost event *before* a marker
    // was acknowledged: sled lost it (a torn or damaged store).
    let torn = first_lost.is_some_and(|(_, _, offset)| offset < acked_upto);
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
    for (job, seqs) in &restored {
        repairs.push(Repair {
            job: Some(*job),
            message: if torn {
                format!(
                    "job {job} seq {}: restored from the journal; the sled store had lost {} (torn or corrupt on disk)",
                    ranges(seqs),
                    if seqs.len() == 1 { "it" } else { "them" }
                )
            } else {
                format!(
                    "job {job} seq {}: completed from the journal (the engine stopped in the middle of writing it)",
                    ranges(seqs)
                )
            },
        });
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
                repairs.push(Repair {
                    job: Some(*job),
                    message: format!("job {job}: cannot rebuild its summary: {e}"),
                });
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

/// The writer: owns every mutation of the trees.
struct Writer {
    trees: Trees,
    rx: async_channel::Receiver<Request>,
    live: Arc<Mutex<HashMap<JobId, JobState>>>,
    next_job: JobId,
    /// Open output files of live steps.
    appenders: outstore::Appenders,
    journal: Arc<Journal>,
    /// Where the next journal frame goes.
    journal_end: u64,
    sync_files: bool,
    /// The last round was acknowledged and its commit marker is not written yet.
    marker_due: bool,
}

/// A round's frames for one step's output file.
struct StagedOutput {
    file: Arc<Mutex<outstore::Appender>>,
    frames: Vec<u8>,
    end: u64,
}

/// One round's writes, grouped per tree.
#[derive(Default)]
struct Round {
    events: sled::Batch,
    /// Jobs submitted this round (their first summary is written at commit).
    submitted: Vec<JobId>,
    /// Final summaries of jobs that ended this round.
    ended: BTreeMap<JobId, Vec<u8>>,
    live_add: Vec<JobId>,
    live_remove: Vec<JobId>,
    /// Output frames per step file, and the stream end after them.
    output: BTreeMap<(JobId, u32), StagedOutput>,
    next_job: Option<JobId>,
    replies: Vec<Reply>,
    output_bytes: usize,
    /// This round's journal frames.
    journal: Vec<u8>,
}

enum Reply {
    Job(async_channel::Sender<Result<JobId, LogError>>, JobId),
    Seq(async_channel::Sender<Result<Seq, LogError>>, Seq),
    End(async_channel::Sender<Result<u64, LogError>>, u64),
}

impl Reply {
    fn ok(self) {
        // A caller that gave up waiting has dropped its receiver; nothing to do.
        match self {
            Reply::Job(tx, v) => drop(tx.try_send(Ok(v))),
            Reply::Seq(tx, v) => drop(tx.try_send(Ok(v))),
            Reply::End(tx, v) => drop(tx.try_send(Ok(v))),
        }
    }

    fn fail(self, why: &str) {
        let err = || LogError::WriterStopped(Some(why.to_string()));
        match self {
            Reply::Job(tx, _) => drop(tx.try_send(Err(err()))),
            Reply::Seq(tx, _) => drop(tx.try_send(Err(err()))),
            Reply::End(tx, _) => drop(tx.try_send(Err(err()))),
        }
    }
}

impl Writer {
    async fn run(mut self) {
        while let Ok(first) = self.rx.recv().await {
            let mut round = Round::default();
            self.take(first, &mut round);
            while round.replies.len() < MAX_BATCH && round.output_bytes < MAX_BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(req) => self.take(req, &mut round),
                    Err(_) => break,
                }
            }
            if round.replies.is_empty() {
                continue;
            }
            let replies = std::mem::take(&mut round.replies);
            if let Err(e) = self.commit(round).await {
                let why = e.to_string();
                tracing::error!(error = %why, "log commit failed; the writer stops");
                for r in replies {
                    r.fail(&why);
                }
                self.rx.close();
                while let Ok(req) = self.rx.try_recv() {
                    let reply = match req {
                        Request::Submit { reply, .. } => Reply::Job(reply, 0),
                        Request::Append { reply, .. } => Reply::Seq(reply, 0),
                        Request::Output { reply, .. } => Reply::End(reply, 0),
                    };
                    reply.fail(&why);
                }
                // Memory may be ahead of the disk now; nobody may read it as truth.
                lock(&self.live).clear();
                return;
            }
            for r in replies {
                r.ok();
            }
        }
        // Closed: mark the last round as acknowledged, so a later open can tell
        // a torn store from an interrupted write.
        if self.marker_due {
            let marker = journal::marker();
            if self
                .journal
                .write_at(&marker, self.journal_end, self.sync_files)
                .is_ok()
            {
                let end = self.journal_end + marker.len() as u64;
                let _ = self.trees.meta.insert("journal_end", &end.to_be_bytes());
                let _ = self.trees.db.flush();
            }
        }
    }

    /// Checks one request and stages its writes, or answers it with an error.
    /// The state machine runs here, before anything is staged: a refused event
    /// changes neither memory nor disk.
    fn take(&mut self, req: Request, round: &mut Round) {
        let at = now_ms();
        match req {
            Request::Submit { spec, reply } => {
                let id = self.next_job;
                let mut state = JobState::new(id);
                let event = Event::Submitted { spec: *spec };
                if let Err(e) = state.apply_mut(at, &event) {
                    let _ = reply.try_send(Err(e.into()));
                    return;
                }
                self.next_job += 1;
                round.next_job = Some(self.next_job);
                let envelope = event.encode(at);
                round.journal.extend(journal::frame(id, 1, &envelope));
                round.events.insert(&event_key(id, 1), envelope);
                round.submitted.push(id);
                round.live_add.push(id);
                lock(&self.live).insert(id, state);
                round.replies.push(Reply::Job(reply, id));
            }
            Request::Append { job, event, reply } => {
                let mut live = lock(&self.live);
                let Some(state) = live.get_mut(&job) else {
                    drop(live);
                    let err = self.not_live(job, &event);
                    let _ = reply.try_send(Err(err));
                    return;
                };
                if let Err(e) = state.apply_mut(at, &event) {
                    let _ = reply.try_send(Err(e.into()));
                    return;
                }
                let seq = state.seq;
                let envelope = event.encode(at);
                round.journal.extend(journal::frame(job, seq, &envelope));
                round.events.insert(&event_key(job, seq), envelope);
                if state.phase == Phase::Terminal {
                    // Its final summary is written now: the job leaves memory.
                    round.ended.insert(job, JobSummary::of(state).encode());
                    round.live_remove.push(job);
                    live.remove(&job);
                    self.appenders.close_job(job);
                }
                round.replies.push(Reply::Seq(reply, seq));
            }
            Request::Output {
                job,
                step,
                offset,
                stream,
                bytes,
                reply,
            } => {
                if !lock(&self.live).contains_key(&job) {
                    let _ = reply.try_send(Err(self.not_live(job, &Event::Queued {})));
                    return;
                }
                let file = match self.appenders.get(job, step) {
                    Ok(f) => f,
                    Err(source) => {
                        let _ = reply.try_send(Err(LogError::Io {
                            what: "cannot open the output file",
                            path: outstore::path(Path::new(""), job, step),
                            source,
                        }));
                        return;
                    }
                };
                let staged = round.output.entry((job, step)).or_insert_with(|| {
                    let end = lock(&file).end();
                    StagedOutput {
                        file: file.clone(),
                        frames: Vec::new(),
                        end,
                    }
                });
                let end = staged.end;
                if offset > end {
                    let _ = reply.try_send(Err(LogError::OutputGap {
                        job,
                        step,
                        offset,
                        end,
                    }));
                    return;
                }
                let skip = usize::try_from(end - offset).unwrap_or(usize::MAX);
                if skip < bytes.len() {
                    let stream_byte = match stream {
                        Stream::Stdout => 0,
                        Stream::Stderr => 1,
                    };
                    for piece in bytes[skip..].chunks(outstore::MAX_FRAME_BYTES) {
                        staged
                            .frames
                            .extend(outstore::frame(staged.end, stream_byte, piece));
                        staged.end += piece.len() as u64;
                        round.output_bytes += piece.len();
                    }
                }
                let new_end = staged.end;
                round.replies.push(Reply::End(reply, new_end));
            }
        }
    }

    fn not_live(&self, job: JobId, event: &Event) -> LogError {
        match self.trees.jobs.get(job.to_be_bytes()) {
            Ok(Some(v)) => match JobSummary::decode(&v) {
                Ok(s) => LogError::Illegal(IllegalTransition {
                    job,
                    seq: s.last_seq,
                    phase: "terminal",
                    event: event.name(),
                    why: "the job has already ended".into(),
                }),
                Err(source) => LogError::CorruptRecord {
                    job,
                    what: "job summary".into(),
                    source,
                },
            },
            Ok(None) => LogError::UnknownJob(job),
            Err(e) => LogError::Storage(e),
        }
    }

    async fn commit(&mut self, mut round: Round) -> Result<(), LogError> {
        // Every event has a journal frame, so no frames means no sled change:
        // an output-only round touches only output files.
        let has_events = !round.journal.is_empty();
        if self.marker_due && has_events {
            // Piggy-back the previous round's commit marker on this write.
            let mut with_marker = journal::marker();
            with_marker.append(&mut round.journal);
            round.journal = with_marker;
            self.marker_due = false;
        }
        let journal_end = self.journal_end + round.journal.len() as u64;
        let output = std::mem::take(&mut round.output);
        if has_events {
            self.stage_in_sled(round, journal_end)?;
        }
        // sled's flush runs on sled's own thread pool (polling `flush_async` once
        // hands it over); meanwhile this thread writes the output frames and
        // syncs them and the journal. The round is acknowledged only when all
        // of it is done.
        let mut flush = std::pin::pin!(self.trees.db.flush_async());
        let early = if has_events {
            smol::future::poll_once(&mut flush).await
        } else {
            Some(Ok(0))
        };
        let mut written = Ok(());
        for (_, staged) in output {
            written = outstore::append(&staged.file, &staged.frames, staged.end, self.sync_files);
            if written.is_err() {
                break;
            }
        }
        let synced = if self.sync_files && has_events {
            self.journal.sync()
        } else {
            Ok(())
        };
        let flushed = match early {
            Some(r) => r,
            None => flush.await,
        };
        flushed?;
        written.map_err(|source| LogError::Io {
            what: "cannot write step output under",
            path: self.appenders.dir().to_path_buf(),
            source,
        })?;
        synced.map_err(|source| LogError::Io {
            what: "cannot sync the journal",
            path: self.journal.path().to_path_buf(),
            source,
        })?;
        if has_events {
            self.journal_end = journal_end;
            self.marker_due = true;
        }
        Ok(())
    }

    /// Writes a round's events: the journal copy first (written, not yet
    /// synced), so that whatever prefix of the sled writes a crash leaves on
    /// disk, the journal holds the round and `reconcile` completes it on open;
    /// then one batch per tree, the checkpoint (`meta`) last.
    fn stage_in_sled(&mut self, round: Round, journal_end: u64) -> Result<(), LogError> {
        let mut jobs = sled::Batch::default();
        {
            let live = lock(&self.live);
            for id in &round.submitted {
                if let Some(state) = live.get(id) {
                    jobs.insert(&id.to_be_bytes(), JobSummary::of(state).encode());
                }
            }
        }
        for (id, v) in round.ended {
            jobs.insert(&id.to_be_bytes(), v);
        }
        let mut live = sled::Batch::default();
        for id in &round.live_add {
            live.insert(&id.to_be_bytes(), &[]);
        }
        for id in &round.live_remove {
            live.remove(&id.to_be_bytes());
        }
        let mut meta = sled::Batch::default();
        if let Some(n) = round.next_job {
            meta.insert("next_job", &n.to_be_bytes());
        }
        meta.insert("journal_end", &journal_end.to_be_bytes());
        self.journal
            .write_at(&round.journal, self.journal_end, false)
            .map_err(|source| LogError::Io {
                what: "cannot write the journal",
                path: self.journal.path().to_path_buf(),
                source,
            })?;
        let t = &self.trees;
        t.events.apply_batch(round.events)?;
        t.jobs.apply_batch(jobs)?;
        t.live.apply_batch(live)?;
        t.meta.apply_batch(meta)?;
        Ok(())
    }
}
