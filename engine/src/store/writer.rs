//! The writer: the one thread that mutates the log.
//!
//! Callers send [`Request`]s over a bounded `async_channel`. Each round the
//! writer takes every request waiting (up to a cap), checks each event against
//! the job's folded state (an event the state machine rejects is refused and
//! never written), writes the round's journal frames, applies one batch per
//! tree (the `meta` checkpoint last), awaits `flush_async` while writing output
//! frames and syncing them and the journal (in [`Durability::Fsync`] mode), and
//! only then answers every caller: group commit. A storage failure stops the
//! writer; every waiting and later caller gets an error.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

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
use crate::time::now_ms;

/// Requests the writer takes in one round at most.
const MAX_BATCH: usize = 4096;
/// Output bytes the writer takes in one round at most (a round may exceed it by one chunk).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Depth of the request channel: submitters wait (backpressure) beyond it.
pub(super) const CHANNEL_DEPTH: usize = 8192;

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

/// The writer: owns every mutation of the trees.
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
    sync_files: bool,
    /// The last round was acknowledged and its commit marker is not written yet.
    marker_due: bool,
    stats: Arc<LogStats>,
}

impl Writer {
    /// A writer over `trees` (opened and reconciled) that answers requests
    /// from `rx`; the next job id comes from the `meta` tree.
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
        Ok(Writer {
            trees,
            rx,
            live,
            next_job,
            appenders,
            journal,
            journal_end,
            sync_files,
            marker_due: false,
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

    fn fail(self, why: &Arc<LogError>) {
        let err = || LogError::WriterStopped(Some(why.clone()));
        match self {
            Reply::Job(tx, _) => drop(tx.try_send(Err(err()))),
            Reply::Seq(tx, _) => drop(tx.try_send(Err(err()))),
            Reply::End(tx, _) => drop(tx.try_send(Err(err()))),
        }
    }
}

impl Writer {
    /// Counts into `stats` (the log's, which readers see).
    pub(super) fn with_stats(mut self, stats: Arc<LogStats>) -> Writer {
        self.stats = stats;
        self
    }

    pub(super) async fn run(mut self) {
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
            self.stats.round(replies.len());
            if let Err(e) = self.commit(round).await {
                tracing::error!(error = %super::error_line(&e), "log commit failed; the writer stops");
                let why = Arc::new(e);
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
                .write_at(&marker, self.journal_end)
                .and_then(|()| {
                    if self.sync_files {
                        self.journal.sync()
                    } else {
                        Ok(())
                    }
                })
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
                    if let Some(o) = state.outcome {
                        self.stats.ended(o);
                    }
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
                Ok(s) => LogError::Illegal(IllegalTransition {
                    job,
                    seq: s.last_seq,
                    phase: "terminal",
                    event: event.name(),
                    why: "the job has already ended".into(),
                }),
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
            written = output::append(&staged.file, &staged.frames, staged.end, self.sync_files);
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
            .write_at(&round.journal, self.journal_end)
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
