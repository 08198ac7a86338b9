//! The writer: the threads that mutate the log. The journal is the log's
//! write-ahead log; sled is the index readers use, kept up to date behind it.
//!
//! Three threads, one pipeline:
//!
//! 1. **Stage** (`reel-log-writer`). Callers send [`Request`]s over a bounded
//!    `async_channel`. Each round it takes every request waiting (up to a
//!    cap), checks each event against the job's folded state (an event the
//!    state machine rejects is refused and never written), writes the round's
//!    journal frames and output frames (`pwrite`, not synced) and hands the
//!    round to the sync stage. It does not wait: while round N syncs, round
//!    N+1 is gathered and written.
//! 2. **Sync** (`reel-log-sync`). Takes every round handed over so far, syncs
//!    the journal and the output files they wrote once for all of them
//!    ([`Durability::Fsync`]), applies each round to sled's trees in memory
//!    (one batch per tree, the `meta` checkpoint last) and only then answers
//!    the rounds' callers: group commit. An answered event is durable in the
//!    journal and visible to every reader.
//! 3. **Flush** (`reel-log-flush`). Flushes sled in the background whenever it
//!    has rounds it has not flushed, at most every [`FLUSH_GAP`]. Opening the
//!    log brings sled up to date from the journal past its checkpoint
//!    (`reconcile`), which is what a crash before a flush leaves.
//!
//! Commit markers in the journal record how far rounds were acknowledged and
//! how far sled had flushed ([`journal::marker`]), so opening can tell the
//! tail sled had not flushed yet (normal after a crash) from events sled lost
//! after it had flushed them (a torn or damaged store).
//!
//! A storage failure stops the writer: every waiting and later caller gets an
//! error, and the in-memory state of live jobs is dropped.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::journal::{self, Journal};
use super::output::{self, Stream};
use super::stats::LogStats;
use super::summary::JobSummary;
use super::trees::{Trees, be_u64, event_key};
use super::{Durability, lock};
use crate::model::event::{Event, JobId, Seq};
use crate::model::spec::JobSpec;
use crate::model::state::{IllegalTransition, JobState, Phase};
use crate::store::LogError;
use crate::testkit::crashpoint::{self, Stage};
use crate::time::now_ms;

/// Requests the writer takes in one round at most.
const MAX_BATCH: usize = 4096;
/// Output bytes the writer takes in one round at most (a round may exceed it by one chunk).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Depth of the request channel: submitters wait (backpressure) beyond it.
pub(super) const CHANNEL_DEPTH: usize = 8192;
/// Rounds written and waiting for the sync stage at most: the stage stage
/// waits beyond it, so memory stays bounded when the disk is slow.
const ROUNDS_IN_FLIGHT: usize = 4;
/// A round with at most this many callers is committed on the stage thread
/// when no round is in flight.
const INLINE_MAX: usize = 4;
/// The journal is kept this far ahead of its last frame with zeros written
/// to disk ([`Journal::ensure_len`]), so that syncing a round commits data
/// only, not a new file size.
const AHEAD: u64 = 8 << 20;
/// How long the stage thread polls for a request before it sleeps.
const SPIN: Duration = Duration::from_micros(50);
/// The shortest time between two of sled's background flushes.
pub(super) const FLUSH_GAP: Duration = Duration::from_millis(50);

/// A request to the writer.
pub(super) enum Request {
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

/// Journal offsets the three stages share, and the first failure.
#[derive(Default)]
pub(super) struct Progress {
    /// Rounds handed to the sync thread and not committed yet.
    in_flight: std::sync::atomic::AtomicUsize,
    applied_lock: Mutex<()>,
    applied_cv: Condvar,
    /// Every event frame before it was acknowledged.
    acked: AtomicU64,
    /// Every event before it is in sled's trees (in memory).
    applied: AtomicU64,
    /// Every event before it is durable in sled (a flush completed).
    indexed: AtomicU64,
    failed: Mutex<Option<Arc<LogError>>>,
    /// Sled has rounds the flush stage has not flushed; or it should stop.
    flush: Mutex<FlushState>,
    wake: Condvar,
}

#[derive(Default)]
struct FlushState {
    dirty: bool,
    stop: bool,
}

impl Progress {
    fn failure(&self) -> Option<Arc<LogError>> {
        lock(&self.failed).clone()
    }

    fn fail(&self, e: LogError) -> Arc<LogError> {
        let mut f = lock(&self.failed);
        f.get_or_insert_with(|| {
            tracing::error!(error = %super::error_line(&e), "log commit failed; the writer stops");
            Arc::new(e)
        })
        .clone()
    }
}

/// The writer's stage thread: owns the requests and the journal's end.
pub(super) struct Writer {
    trees: Trees,
    rx: async_channel::Receiver<Request>,
    live: Arc<Mutex<HashMap<JobId, JobState>>>,
    next_job: JobId,
    /// Open output files of live steps.
    appenders: output::Appenders,
    journal: Arc<Journal>,
    /// Where the next journal frame goes.
    journal_end: u64,
    /// Bytes of the journal file written so far (frames, then zeros).
    journal_len: u64,
    sync_files: bool,
    /// The `acked` offset the last marker written vouched for.
    vouched: u64,
    /// Jobs that ended in a round sled does not have yet, with their last
    /// seq (so an append to one is refused as "already ended").
    ended: Arc<Mutex<HashMap<JobId, Seq>>>,
    progress: Arc<Progress>,
    stats: Arc<LogStats>,
}

impl Writer {
    /// A writer over `trees` (opened and reconciled: sled holds every journal
    /// frame before `journal_end`) that answers requests from `rx`; the next
    /// job id comes from the `meta` tree.
    pub(super) fn new(
        trees: Trees,
        rx: async_channel::Receiver<Request>,
        live: Arc<Mutex<HashMap<JobId, JobState>>>,
        output_dir: &Path,
        journal: Arc<Journal>,
        journal_end: u64,
        durability: Durability,
    ) -> Result<Writer, LogError> {
        let next_job = match trees.meta.get("next_job")? {
            Some(v) => be_u64(&v).ok_or(LogError::BadKey {
                tree: "meta",
                len: v.len(),
            })?,
            None => 1,
        };
        let sync_files = durability == Durability::Fsync;
        let mut appenders = output::Appenders::new(output_dir.to_path_buf(), sync_files);
        // The output file of a live job's step may end in a torn frame (a
        // write cut short by a crash or a full disk, never acknowledged).
        // Opening it for appending cuts that tail now, whether or not the step
        // is resumed: a reaped step gets no more output, and would keep it.
        let started: Vec<(JobId, u32)> = lock(&live)
            .values()
            .flat_map(|s| s.steps.iter().map(|step| (s.id, step.index)))
            .collect();
        for (job, step) in started {
            let p = output::path(output_dir, job, step);
            if p.exists() {
                appenders.get(job, step).map_err(|source| LogError::Io {
                    what: "cannot open the output file",
                    path: p,
                    source,
                })?;
            }
        }
        let journal_len = journal.file_len().map_err(|source| LogError::Io {
            what: "cannot read the journal",
            path: journal.path().to_path_buf(),
            source,
        })?;
        Ok(Writer {
            trees,
            rx,
            live,
            next_job,
            appenders,
            journal,
            journal_end,
            journal_len: journal_len.max(journal_end),
            sync_files,
            vouched: journal_end,
            ended: Arc::default(),
            progress: Progress::reconciled_to(journal_end),
            stats: Arc::default(),
        })
    }
}

/// A round's frames for one step's output file.
struct StagedOutput {
    file: Arc<Mutex<output::Appender>>,
    frames: Vec<u8>,
    end: u64,
}

/// One round as the stage thread gathers it.
#[derive(Default)]
struct Round {
    events: Vec<([u8; 12], Vec<u8>)>,
    /// Summaries written this round: a submitted job's first, an ended job's final.
    summaries: BTreeMap<JobId, Vec<u8>>,
    live_add: Vec<JobId>,
    live_remove: Vec<JobId>,
    /// Jobs that ended this round.
    ended: Vec<JobId>,
    /// Output frames per step file, and the stream end after them.
    output: BTreeMap<(JobId, u32), StagedOutput>,
    next_job: Option<JobId>,
    replies: Vec<Reply>,
    output_bytes: usize,
    /// This round's journal frames.
    journal: Vec<u8>,
}

/// A round written to the journal and the output files, waiting to be
/// synced, applied to sled and answered.
struct Written {
    /// The journal's end after this round; `None` for a round of output only.
    journal_end: Option<u64>,
    sled: SledRound,
    /// Output files the round wrote to.
    files: Vec<Arc<File>>,
    ended: Vec<JobId>,
    replies: Vec<Reply>,
}

/// A round's writes to sled's trees, applied as single inserts in this order
/// (the `meta` checkpoint last). Not as `sled::Batch`es: sled writes and
/// syncs its IO buffer around every `apply_batch` (two `pwrite`s and
/// `sync_file_range`s each, measured), which made the trees cost more than
/// the journal's sync. Atomicity is not needed: sled recovers a prefix of
/// its writes in order, and opening replays the journal from the checkpoint,
/// which covers every write after it.
#[derive(Default)]
struct SledRound {
    events: Vec<([u8; 12], Vec<u8>)>,
    jobs: Vec<(JobId, Vec<u8>)>,
    live_add: Vec<JobId>,
    live_remove: Vec<JobId>,
    next_job: Option<JobId>,
    journal_end: u64,
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

    fn fail(self, why: &Arc<LogError>) {
        let err = || LogError::WriterStopped(Some(why.clone()));
        match self {
            Reply::Job(tx, _) => drop(tx.try_send(Err(err()))),
            Reply::Seq(tx, _) => drop(tx.try_send(Err(err()))),
            Reply::End(tx, _) => drop(tx.try_send(Err(err()))),
        }
    }

    fn of_failed(req: Request) -> Reply {
        match req {
            Request::Submit { reply, .. } => Reply::Job(reply, 0),
            Request::Append { reply, .. } => Reply::Seq(reply, 0),
            Request::Output { reply, .. } => Reply::End(reply, 0),
        }
    }
}

impl Writer {
    /// Where the writer says how far it got: what the log's reader waits on.
    pub(super) fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Counts into `stats` (the log's, which readers see).
    pub(super) fn with_stats(mut self, stats: Arc<LogStats>) -> Writer {
        self.stats = stats;
        self
    }

    /// Starts the sync and flush stages and runs the stage loop until the
    /// request channel closes (or storage fails), then finishes every round
    /// written, flushes sled and writes the closing commit marker.
    pub(super) async fn run(mut self) {
        let (to_sync, from_stage) = std::sync::mpsc::sync_channel::<Written>(ROUNDS_IN_FLIGHT);
        let committer = Arc::new(Committer {
            trees: self.trees.clone(),
            journal: self.journal.clone(),
            sync_files: self.sync_files,
            live: self.live.clone(),
            ended: self.ended.clone(),
            progress: self.progress.clone(),
            stats: self.stats.clone(),
            requests: self.rx.clone(),
        });
        let flusher = Flusher {
            db: self.trees.db.clone(),
            progress: self.progress.clone(),
        };
        let sync = {
            let c = committer.clone();
            std::thread::Builder::new()
                .name("reel-log-sync".into())
                .spawn(move || c.run(from_stage))
        };
        let flush = std::thread::Builder::new()
            .name("reel-log-flush".into())
            .spawn(move || flusher.run());
        let (sync, flush) = match (sync, flush) {
            (Ok(s), Ok(f)) => (s, f),
            (s, f) => {
                let why = self.progress.fail(LogError::Io {
                    what: "cannot start the log's threads for",
                    path: self.journal.path().to_path_buf(),
                    source: std::io::Error::other("thread spawn failed"),
                });
                self.stop(&why);
                drop(to_sync);
                self.progress.stop_flusher();
                for h in [s.ok(), f.ok()].into_iter().flatten() {
                    let _ = h.join();
                }
                return;
            }
        };
        loop {
            let first = match self.next_request().await {
                Some(r) => r,
                None => break,
            };
            if let Some(why) = self.progress.failure() {
                Reply::of_failed(first).fail(&why);
                self.stop(&why);
                break;
            }
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
            let small = round.replies.len() <= INLINE_MAX;
            match self.write(round) {
                // Nothing in flight and few callers: handing the round to the
                // sync thread would cost a thread wake-up and overlap nothing.
                Ok(written) if small && self.progress.in_flight.load(Ordering::SeqCst) == 0 => {
                    if !committer.commit(vec![written]) {
                        let why = self
                            .progress
                            .failure()
                            .unwrap_or_else(|| self.progress.fail(LogError::WriterStopped(None)));
                        self.stop(&why);
                        break;
                    }
                }
                Ok(written) => {
                    self.progress.in_flight.fetch_add(1, Ordering::SeqCst);
                    if let Err(std::sync::mpsc::SendError(w)) = to_sync.send(written) {
                        let why = self
                            .progress
                            .failure()
                            .unwrap_or_else(|| self.progress.fail(LogError::WriterStopped(None)));
                        for r in w.replies {
                            r.fail(&why);
                        }
                        self.stop(&why);
                        break;
                    }
                }
                Err((e, replies)) => {
                    let why = self.progress.fail(e);
                    for r in replies {
                        r.fail(&why);
                    }
                    self.stop(&why);
                    break;
                }
            }
        }
        // Every round written is synced, applied and answered before the end.
        drop(to_sync);
        let _ = sync.join();
        self.progress.stop_flusher();
        let _ = flush.join();
        if self.progress.failure().is_none() {
            self.close_journal();
        }
    }

    /// The next request; `None` once the channel is closed and empty. Polls
    /// for up to [`SPIN`] before it sleeps: a caller answered a moment ago
    /// often sends its next request within that, and waking a sleeping
    /// thread costs tens of microseconds. (A longer poll, 250 µs, measured no
    /// better with one submitter: 0.58x against 0.54x one-at-a-time fsync,
    /// within the runs' spread.)
    async fn next_request(&self) -> Option<Request> {
        let start = std::time::Instant::now();
        loop {
            match self.rx.try_recv() {
                Ok(r) => return Some(r),
                Err(async_channel::TryRecvError::Closed) => return None,
                Err(async_channel::TryRecvError::Empty) if start.elapsed() < SPIN => {
                    std::hint::spin_loop();
                }
                Err(async_channel::TryRecvError::Empty) => return self.rx.recv().await.ok(),
            }
        }
    }

    /// After a failure: refuses every request waiting and every later one,
    /// and forgets the live jobs (memory may be ahead of the disk now; nobody
    /// may read it as truth).
    fn stop(&mut self, why: &Arc<LogError>) {
        self.rx.close();
        while let Ok(req) = self.rx.try_recv() {
            Reply::of_failed(req).fail(why);
        }
        lock(&self.live).clear();
    }

    /// On close: sled flushed up to the journal's end, then a commit marker
    /// vouching for all of it, then the checkpoint past the marker.
    fn close_journal(&mut self) {
        if self.trees.db.flush().is_err() {
            return;
        }
        let end = self.journal_end;
        if self.vouched == end {
            return;
        }
        let marker = journal::marker(end, end);
        let written = self.journal.write_at(&marker, end).and_then(|()| {
            if self.sync_files {
                self.journal.sync()
            } else {
                Ok(())
            }
        });
        if written.is_ok() {
            let after = end + marker.len() as u64;
            let _ = self.trees.meta.insert("journal_end", &after.to_be_bytes());
            let _ = self.trees.db.flush();
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
                round.events.push((event_key(id, 1), envelope));
                round.summaries.insert(id, JobSummary::of(&state).encode());
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
                round.events.push((event_key(job, seq), envelope));
                if state.phase == Phase::Terminal {
                    // Its final summary is written now: the job leaves memory.
                    round.summaries.insert(job, JobSummary::of(state).encode());
                    if let Some(o) = state.outcome {
                        self.stats.ended(o);
                    }
                    round.live_remove.push(job);
                    round.ended.push(job);
                    lock(&self.ended).insert(job, seq);
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
                            path: output::path(self.appenders.dir(), job, step),
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
                    let stream_byte = stream.byte();
                    for piece in bytes[skip..].chunks(output::MAX_FRAME_BYTES) {
                        staged
                            .frames
                            .extend(output::frame(staged.end, stream_byte, piece));
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
        let ended = |seq| {
            LogError::Illegal(IllegalTransition {
                job,
                seq,
                phase: "terminal",
                event: event.name(),
                why: "the job has already ended".into(),
            })
        };
        if let Some(&seq) = lock(&self.ended).get(&job) {
            return ended(seq);
        }
        if self
            .trees
            .live
            .contains_key(job.to_be_bytes())
            .unwrap_or(false)
        {
            // Live on disk but not in memory: set aside on open (unreadable).
            return LogError::SetAside(job);
        }
        match self.trees.jobs.get(job.to_be_bytes()) {
            Ok(Some(v)) => match JobSummary::decode(&v) {
                Ok(s) => ended(s.last_seq),
                Err(source) => LogError::CorruptRecord {
                    job,
                    what: "job summary",
                    source,
                },
            },
            Ok(None) => LogError::UnknownJob(job),
            Err(e) => LogError::Storage(e),
        }
    }

    /// Writes a round's journal frames (preceded by a commit marker when
    /// more rounds were acknowledged since the last one) and output frames,
    /// not synced, and prepares its sled batches for the sync stage.
    fn write(&mut self, mut round: Round) -> Result<Written, (LogError, Vec<Reply>)> {
        let replies = std::mem::take(&mut round.replies);
        let has_events = !round.journal.is_empty();
        let mut journal_end = None;
        if has_events {
            let acked = self.progress.acked.load(Ordering::SeqCst);
            if acked > self.vouched {
                let indexed = self.progress.indexed.load(Ordering::SeqCst);
                let mut with_marker = journal::marker(acked, indexed);
                with_marker.append(&mut round.journal);
                round.journal = with_marker;
                self.vouched = acked;
            }
            let end = self.journal_end + round.journal.len() as u64;
            let io = |source| LogError::Io {
                what: "cannot write the journal",
                path: self.journal.path().to_path_buf(),
                source,
            };
            if end > self.journal_len {
                match self.journal.ensure_len(end + AHEAD) {
                    Ok(len) => self.journal_len = len,
                    Err(e) => return Err((io(e), replies)),
                }
            }
            if let Err(e) = self.journal.write_at(&round.journal, self.journal_end) {
                return Err((io(e), replies));
            }
            self.journal_end = end;
            journal_end = Some(end);
            crashpoint::writer(Stage::Written);
        }
        let mut files = Vec::with_capacity(round.output.len());
        for (_, staged) in std::mem::take(&mut round.output) {
            match output::write(&staged.file, &staged.frames, staged.end) {
                Ok(f) => files.push(f),
                Err(source) => {
                    let e = LogError::Io {
                        what: "cannot write step output under",
                        path: self.appenders.dir().to_path_buf(),
                        source,
                    };
                    return Err((e, replies));
                }
            }
        }
        let sled = match journal_end {
            Some(end) => SledRound {
                events: round.events,
                jobs: round.summaries.into_iter().collect(),
                live_add: round.live_add,
                live_remove: round.live_remove,
                next_job: round.next_job,
                journal_end: end,
            },
            None => SledRound::default(),
        };
        Ok(Written {
            journal_end,
            sled,
            files,
            ended: round.ended,
            replies,
        })
    }
}

/// Syncs, answers and applies rounds: on the sync thread, or inline on the
/// stage thread when nothing is in flight.
struct Committer {
    trees: Trees,
    journal: Arc<Journal>,
    sync_files: bool,
    live: Arc<Mutex<HashMap<JobId, JobState>>>,
    ended: Arc<Mutex<HashMap<JobId, Seq>>>,
    progress: Arc<Progress>,
    stats: Arc<LogStats>,
    /// The callers' channel, closed when storage fails.
    requests: async_channel::Receiver<Request>,
}

impl Committer {
    /// The sync thread: every round handed over so far, committed together.
    fn run(&self, rounds: std::sync::mpsc::Receiver<Written>) {
        while let Ok(first) = rounds.recv() {
            let mut batch = vec![first];
            while let Ok(more) = rounds.try_recv() {
                batch.push(more);
            }
            let n = batch.len();
            let ok = self.commit(batch);
            self.progress.in_flight.fetch_sub(n, Ordering::SeqCst);
            if !ok {
                // The stage thread sees the failure at its next round, or
                // when a send finds this receiver gone.
                let why = self.progress.failure();
                for w in rounds.try_iter() {
                    for r in w.replies {
                        if let Some(why) = &why {
                            r.fail(why);
                        }
                    }
                }
                return;
            }
        }
    }

    /// Syncs what the rounds wrote (once for all of them), answers their
    /// callers, then applies each round to sled's trees, in order. False if
    /// storage failed: the writer stops.
    fn commit(&self, mut batch: Vec<Written>) -> bool {
        let end = batch.iter().filter_map(|w| w.journal_end).max();
        if let Err(e) = self.sync(&batch) {
            let why = self.progress.fail(e);
            self.requests.close();
            for w in batch {
                for r in w.replies {
                    r.fail(&why);
                }
            }
            lock(&self.live).clear();
            self.progress.applied_or_failed();
            return false;
        }
        // Durable: answer. Readers wait for `applied` to reach `acked`
        // (`Progress::settle`), so an answered caller reads its own writes.
        if let Some(end) = end {
            self.progress.acked.store(end, Ordering::SeqCst);
        }
        let mut answered = 0;
        for w in &mut batch {
            answered += w.replies.len();
            for r in w.replies.drain(..) {
                r.ok();
            }
        }
        self.stats.round(answered);
        let Some(end) = end else {
            return true;
        };
        crashpoint::writer(Stage::Acked);
        if let Err(e) = self.apply(&mut batch) {
            // Every answered event is in the journal; the next open brings
            // sled up to date from it.
            self.progress.fail(e);
            self.requests.close();
            lock(&self.live).clear();
            self.progress.applied_or_failed();
            return false;
        }
        {
            let mut ended = lock(&self.ended);
            for job in batch.iter().flat_map(|w| &w.ended) {
                ended.remove(job);
            }
        }
        self.progress.applied.store(end, Ordering::SeqCst);
        self.progress.applied_or_failed();
        self.progress.mark_dirty();
        true
    }

    fn sync(&self, batch: &[Written]) -> Result<(), LogError> {
        if !self.sync_files {
            return Ok(());
        }
        if batch.iter().any(|w| w.journal_end.is_some()) {
            self.journal.sync().map_err(|source| LogError::Io {
                what: "cannot sync the journal",
                path: self.journal.path().to_path_buf(),
                source,
            })?;
            crashpoint::writer(Stage::Synced);
        }
        let mut synced: Vec<*const File> = Vec::new();
        for f in batch.iter().flat_map(|w| &w.files) {
            let p = Arc::as_ptr(f);
            if synced.contains(&p) {
                continue;
            }
            synced.push(p);
            f.sync_data().map_err(|source| LogError::Io {
                what: "cannot sync step output in",
                path: self.journal.path().with_file_name("output"),
                source,
            })?;
        }
        Ok(())
    }

    fn apply(&self, batch: &mut [Written]) -> Result<(), LogError> {
        let t = &self.trees;
        for w in batch.iter_mut() {
            if w.journal_end.is_none() {
                continue;
            }
            let s = std::mem::take(&mut w.sled);
            for (k, v) in s.events {
                t.events.insert(k, v)?;
            }
            crashpoint::writer(Stage::Events);
            for (id, v) in s.jobs {
                t.jobs.insert(id.to_be_bytes(), v)?;
            }
            crashpoint::writer(Stage::Jobs);
            for id in s.live_add {
                t.live.insert(id.to_be_bytes(), &[])?;
            }
            for id in s.live_remove {
                t.live.remove(id.to_be_bytes())?;
            }
            crashpoint::writer(Stage::Live);
            if let Some(n) = s.next_job {
                t.meta.insert("next_job", &n.to_be_bytes())?;
            }
            t.meta.insert("journal_end", &s.journal_end.to_be_bytes())?;
        }
        crashpoint::writer(Stage::Applied);
        Ok(())
    }
}

impl Progress {
    /// The progress of a log whose sled holds (and has flushed) every
    /// journal frame before `journal_end`, as reconciling leaves it.
    pub(super) fn reconciled_to(journal_end: u64) -> Arc<Progress> {
        let p = Progress::default();
        for at in [&p.acked, &p.applied, &p.indexed] {
            at.store(journal_end, Ordering::SeqCst);
        }
        Arc::new(p)
    }

    /// Waits until sled's trees hold every acknowledged event (or the
    /// writer failed): what a read of the trees calls first, so a caller
    /// whose append was answered reads it back. Costs two atomic loads when
    /// sled is up to date, which is almost always.
    pub(super) fn settle(&self) {
        let target = self.acked.load(Ordering::SeqCst);
        if self.applied.load(Ordering::SeqCst) >= target {
            return;
        }
        let mut g = lock(&self.applied_lock);
        while self.applied.load(Ordering::SeqCst) < target && lock(&self.failed).is_none() {
            g = self
                .applied_cv
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn applied_or_failed(&self) {
        let _g = lock(&self.applied_lock);
        self.applied_cv.notify_all();
    }

    fn mark_dirty(&self) {
        lock(&self.flush).dirty = true;
        self.wake.notify_one();
    }

    fn stop_flusher(&self) {
        lock(&self.flush).stop = true;
        self.wake.notify_one();
    }
}

/// The flush stage: sled's flush, off the callers' path.
struct Flusher {
    db: sled::Db,
    progress: Arc<Progress>,
}

impl Flusher {
    fn run(self) {
        let p = &self.progress;
        loop {
            {
                let mut st = lock(&p.flush);
                while !st.dirty && !st.stop {
                    st = p
                        .wake
                        .wait(st)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if st.stop {
                    return;
                }
                st.dirty = false;
            }
            // Everything applied before the flush starts is durable when it returns.
            let target = p.applied.load(Ordering::SeqCst);
            match self.db.flush() {
                Ok(_) => p.indexed.store(target, Ordering::SeqCst),
                Err(e) => {
                    // The journal still holds every acknowledged event; a
                    // later open brings sled up to date from it.
                    tracing::warn!(error = %e, "sled's background flush failed; the journal holds the events");
                }
            }
            // At most one flush per gap, however often rounds are applied.
            let until = std::time::Instant::now() + FLUSH_GAP;
            let mut st = lock(&p.flush);
            while !st.stop {
                let now = std::time::Instant::now();
                if now >= until {
                    break;
                }
                st = p
                    .wake
                    .wait_timeout(st, until - now)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        }
    }
}
