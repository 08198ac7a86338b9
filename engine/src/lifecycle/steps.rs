//! Running a job's steps: `StepStarted` before each exec, output masked per
//! stream and made durable chunk by chunk before the runner's sink returns,
//! `StepFinished` with the exit status, and the outcome the steps decide.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::executor::{Abort, JobRun, Resume, fmt_ms, to_sdk};
use super::observer::Report;
use crate::input::secrets::{MASK_BYTE, Masker, ResolvedSecrets, StreamMasker};
use crate::model::event::{Event, Handle, Outcome};
use crate::model::spec::StepSpec;
use crate::model::state::StepState;
use crate::plugin::{self, LoadedRunner, RunnerError};
use crate::store::{LogError, Stream};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl JobRun<'_> {
    /// Runs the steps not finished yet (resuming the one `resume` names, which is
    /// running in a reattached sandbox); returns the decided outcome.
    pub(crate) async fn run_steps(
        &mut self,
        secrets: &ResolvedSecrets,
        deadline: Option<Instant>,
        resume: Option<Resume>,
    ) -> Result<(Outcome, String), Abort> {
        let runner = self.runner()?;
        let masker = secrets.masker();
        let mut base_env = self.spec.environment.clone();
        for (name, value) in secrets.iter() {
            base_env.insert(name.to_string(), value.to_string());
        }
        // A step that ended before this run (a resumed job) and failed decides
        // the outcome: no further step may start.
        let (started, finished): (usize, Vec<StepState>) = self
            .ex
            .log()
            .live_with(self.job, |s| {
                let finished = s.steps.iter().filter(|st| st.finished_ms.is_some());
                (s.steps.len(), finished.cloned().collect())
            })
            .unwrap_or_default();
        for st in &finished {
            let Some(spec) = self.spec.steps.get(st.index as usize) else {
                continue;
            };
            let label = format!("step {} {:?}", st.index + 1, spec.name);
            if let Some(end) = verdict(&label, spec, st.exit_code, st.signal, st.timed_out) {
                return Ok(end);
            }
        }
        let first = match &resume {
            Some(r) => r.index as usize,
            None => started,
        };
        for (index, step) in self.spec.steps.iter().enumerate().skip(first) {
            let index = index as u32;
            let resuming = resume.as_ref().filter(|r| r.index == index);
            let (exec_id, resume_from) = match resuming {
                Some(r) => (r.exec_id, r.from),
                None => {
                    if let Some(stop) = self.stop_reason(deadline) {
                        return Ok(stop);
                    }
                    let exec_id = u64::from(index) + 1;
                    self.append(Event::StepStarted { index, exec_id }).await?;
                    (exec_id, 0)
                }
            };
            self.observer.report(Report::StepStarted {
                job: self.job,
                index,
                name: &step.name,
            });
            let mut env = base_env.clone();
            env.extend(step.environment.clone());
            let req = plugin::StepRequest {
                exec_id,
                index,
                name: step.name.clone(),
                command: step.command.clone(),
                environment: env,
                timeout_ms: step.timeout_ms,
                resume_from,
            };
            let began = Instant::now();
            let (result, stored, stopped_by) =
                self.exec_step(&runner, req, &masker, deadline).await?;
            let (exit_code, signal, timed_out) = match &result {
                Ok(r) => (r.exit_code, r.signal, r.timed_out),
                Err(_) => (None, None, false),
            };
            self.append(Event::StepFinished {
                index,
                exit_code,
                signal,
                timed_out,
                output_bytes: stored,
            })
            .await?;
            self.observer.report(Report::StepFinished {
                job: self.job,
                index,
                name: &step.name,
                exit_code,
                signal,
                timed_out,
                duration: began.elapsed(),
                bytes: stored,
            });
            let label = format!("step {} {:?}", index + 1, step.name);
            if let Some(stop) = stopped_by {
                return Ok(stop);
            }
            match result {
                Err(e) if e.kind == plugin::ErrorKind::Failed => {
                    // The runner's sentence says what failed; "failed: " would repeat it.
                    return Ok((Outcome::Failed, format!("{label}: {}", e.message)));
                }
                Err(e) => return Ok((Outcome::Failed, format!("{label}: the runner failed: {e}"))),
                Ok(r) => {
                    if let Some(end) = verdict(&label, step, r.exit_code, r.signal, r.timed_out) {
                        return Ok(end);
                    }
                }
            }
        }
        Ok((Outcome::Succeeded, String::new()))
    }

    /// Runs one step; stores its masked output durably as it streams. Returns the
    /// runner's result, the bytes stored, and what stopped it early (a cancel or
    /// the job's deadline), if anything did.
    async fn exec_step(
        &mut self,
        runner: &Arc<LoadedRunner>,
        req: plugin::StepRequest,
        masker: &Masker,
        deadline: Option<Instant>,
    ) -> Result<
        (
            Result<plugin::ExecResult, RunnerError>,
            u64,
            Option<(Outcome, String)>,
        ),
        LogError,
    > {
        let handle = to_sdk(self.handle.as_ref().unwrap_or(&Handle::default()));
        let (index, exec_id, resume_from) = (req.index, req.exec_id, req.resume_from);
        let log = self.ex.log();
        let stored = match log.output_end(self.job, index) {
            Ok(end) => end,
            // Damaged stored output (found when a step is resumed): the step
            // cannot go on without a gap; it fails and the job is torn down.
            Err(e @ LogError::CorruptOutput { .. }) => {
                let end = super::recover::intact_output_end(log, self.job, index);
                return Ok((
                    Err(RunnerError::failed(format!(
                        "its stored output is damaged, it cannot be resumed: {}",
                        crate::store::error_line(&e)
                    ))),
                    end,
                    None,
                ));
            }
            Err(e) => return Err(e),
        };
        // Chunks go from the runner's thread to this task; the runner's sink
        // waits for each chunk to be durable before it returns. Notices the
        // runner raises on that thread while the step runs are collected there
        // and put on the record once the exec returns, before `StepFinished`.
        let (chunk_tx, chunk_rx) = async_channel::bounded::<Chunk>(1);
        let exec = {
            let handle = handle.clone();
            let runner = runner.clone();
            smol::spawn(async move {
                runner
                    .unblock(move |r| {
                        let mut sink = DurableSink {
                            tx: chunk_tx,
                            stored: plugin::Stored::Upto(resume_from),
                        };
                        plugin::capture_notices(|| r.exec(&handle, &req, &mut sink))
                    })
                    .await
            })
        };

        // Watcher: on cancel or the job deadline, put the intent on the record
        // (`CancelRequested` / `DeadlinePassed`), and only once it is durable
        // tell the runner to stop the step; recovery honours a logged intent.
        let stopped: Arc<Mutex<Option<(Outcome, String)>>> = Arc::default();
        let watcher = {
            let runner = runner.clone();
            let cancel = self.cancel.clone();
            let stopped = stopped.clone();
            let timeout_ms = self.spec.timeout_ms.unwrap_or(0);
            let (log, job) = (self.ex.log().clone(), self.job);
            smol::spawn(async move {
                let reason = smol::future::or(
                    async {
                        cancel.cancelled().await;
                        (Outcome::Cancelled, cancel.reason().unwrap_or_default())
                    },
                    async {
                        match deadline {
                            Some(d) => {
                                smol::Timer::at(d).await;
                            }
                            None => std::future::pending::<()>().await,
                        }
                        (
                            Outcome::TimedOut,
                            format!("the job ran past its timeout of {}", fmt_ms(timeout_ms)),
                        )
                    },
                )
                .await;
                let intent = match reason.0 {
                    Outcome::TimedOut => Event::DeadlinePassed {
                        reason: reason.1.clone(),
                    },
                    _ => Event::CancelRequested {
                        reason: reason.1.clone(),
                    },
                };
                *lock(&stopped) = Some(reason);
                if log.append(job, intent).await.is_ok() {
                    let notices = if runner.has(plugin::Capability::Cancel) {
                        let (_, notices) = runner
                            .unblock(move |r| {
                                plugin::capture_notices(|| r.cancel(&handle, exec_id))
                            })
                            .await;
                        notices
                    } else {
                        // Nothing can stop the step: say so, and wait for its end.
                        vec![(
                            "no-cancel".to_owned(),
                            format!(
                                "runner `{}` does not declare `cancel`: the running step is \
                                 left to end by itself",
                                runner.name()
                            ),
                        )]
                    };
                    for (kind, message) in notices {
                        let message = format!("{kind}: {message}");
                        let _ = log.append(job, Event::RunnerNotice { message }).await;
                    }
                }
            })
        };

        let mut out = StepOutput::new(masker, stored);
        if out.stored > 0 && masker.max_secret_len() > 0 {
            // A resumed stream: if the stored output ends inside a masked secret,
            // the rest of that secret arrives first (on the same stream) and must
            // be masked too.
            let last = log
                .output(self.job, index, out.stored.saturating_sub(1))
                .last()
                .and_then(Result::ok);
            if let Some(c) = last.filter(|c| c.bytes.last() == Some(&MASK_BYTE)) {
                out.masker(c.stream).resume_inside_secret();
            }
        }
        let mut failure = None;
        while let Ok((stream, offset, bytes, done)) = chunk_rx.recv().await {
            if failure.is_none()
                && let Err(e) = self
                    .store_output(&mut out, index, stream, offset, &bytes)
                    .await
            {
                failure = Some(e);
            }
            // Only what the log holds may be dropped by the agent: never the
            // bytes a masker holds back, nothing at all once storing failed.
            let stored = match failure {
                None => plugin::Stored::Upto(out.stored),
                Some(_) => plugin::Stored::Refused,
            };
            let _ = done.send(stored).await;
        }
        let (mut result, notices) = exec.await;
        if lock(&stopped).is_some() {
            // It fired: let it finish recording (its cancel returns promptly).
            watcher.await;
        } else {
            drop(watcher);
        }
        self.record_notices(notices).await?;
        match failure {
            // A runner that skips output breaks its contract: the step fails,
            // the job is torn down; what it stored is what the log holds.
            Some(LogError::OutputGap { offset, end, .. }) => {
                result = Err(RunnerError::failed(format!(
                    "it sent output at offset {offset}, past the {end} bytes stored: a gap"
                )));
            }
            Some(e) => return Err(e),
            None => {}
        }
        self.flush_output(&mut out, index, None).await?;
        let stored = out.stored;
        let stopped_by = lock(&stopped).take();
        Ok((result, stored, stopped_by))
    }

    /// Masks and stores one chunk the runner gave at `offset`. Bytes below
    /// what is already stored or held (a resumed stream re-sending them) are
    /// skipped; a chunk past that leaves a gap, which the log refuses.
    async fn store_output(
        &mut self,
        out: &mut StepOutput,
        index: u32,
        stream: Stream,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(), LogError> {
        if out.holding.is_some_and(|s| s != stream) {
            self.flush_output(out, index, out.holding).await?;
        }
        let held = out.masker(stream).held() as u64;
        let next = out.stored + held;
        let skip = usize::try_from(next.saturating_sub(offset)).unwrap_or(usize::MAX);
        let Some(new) = bytes.get(skip..).filter(|b| !b.is_empty()) else {
            return Ok(());
        };
        // The masker's output starts with the bytes it held, at `offset - held`.
        let at = offset.max(next) - held;
        let masked = out.masker(stream).push(new);
        out.holding = (out.masker(stream).held() > 0).then_some(stream);
        self.store_masked(out, index, at, stream, masked).await
    }

    /// Releases what the maskers hold (of `stream`, or of both at the step's
    /// end) and stores it.
    async fn flush_output(
        &mut self,
        out: &mut StepOutput,
        index: u32,
        stream: Option<Stream>,
    ) -> Result<(), LogError> {
        let streams = match stream {
            Some(s) => vec![s],
            None => vec![Stream::Stdout, Stream::Stderr],
        };
        for s in streams {
            let tail = out.masker(s).finish();
            let at = out.stored;
            self.store_masked(out, index, at, s, tail).await?;
        }
        out.holding = None;
        Ok(())
    }

    async fn store_masked(
        &mut self,
        out: &mut StepOutput,
        index: u32,
        at: u64,
        stream: Stream,
        masked: Vec<u8>,
    ) -> Result<(), LogError> {
        if masked.is_empty() {
            return Ok(());
        }
        out.stored = self
            .ex
            .log()
            .append_output(self.job, index, at, stream, masked.clone())
            .await?;
        self.observer.report(Report::Output {
            job: self.job,
            index,
            stream,
            bytes: &masked,
        });
        Ok(())
    }
}

/// The outcome a finished step decides for its job, if it ends the job: its
/// own timeout, a signal, a non-zero exit or no exit status at all.
fn verdict(
    label: &str,
    step: &StepSpec,
    exit_code: Option<i32>,
    signal: Option<i32>,
    timed_out: bool,
) -> Option<(Outcome, String)> {
    if timed_out {
        return Some((
            Outcome::TimedOut,
            format!(
                "{label} ran past its timeout of {}",
                fmt_ms(step.timeout_ms.unwrap_or(0))
            ),
        ));
    }
    let how = match (exit_code, signal) {
        (Some(0), None) => return None,
        (_, Some(s)) => format!("was killed by signal {s}"),
        (Some(c), None) => format!("exited with code {c}"),
        (None, None) => "ended without an exit status".to_string(),
    };
    Some((Outcome::Failed, format!("{label} {how}")))
}

/// A chunk on its way from the runner's sink to the job's task: stream, the
/// runner's offset in the step's combined output, the bytes, and where to say
/// what is durable once the chunk is handled.
type Chunk = (Stream, u64, Vec<u8>, async_channel::Sender<plugin::Stored>);

/// The sink given to the runner: hands each chunk, with the runner's own
/// offset, to the executor task and waits until it is handled; then it knows
/// how much of the step's output is durable (the maskers may hold a few bytes
/// back), which the runner asks before it lets its agent drop output.
struct DurableSink {
    tx: async_channel::Sender<Chunk>,
    stored: plugin::Stored,
}

impl plugin::OutputSink for DurableSink {
    fn chunk(&mut self, stream: plugin::Stream, offset: u64, bytes: &[u8]) {
        let stream = match stream {
            plugin::Stream::Stdout => Stream::Stdout,
            plugin::Stream::Stderr => Stream::Stderr,
        };
        let (done_tx, done_rx) = async_channel::bounded(1);
        self.stored = match self
            .tx
            .send_blocking((stream, offset, bytes.to_vec(), done_tx))
        {
            Ok(()) => done_rx.recv_blocking().unwrap_or(plugin::Stored::Refused),
            Err(_) => plugin::Stored::Refused,
        };
    }

    fn stored(&self) -> plugin::Stored {
        self.stored
    }
}

/// A step's output on its way to the log: one masker per stream, and where
/// the stored stream ends.
///
/// Offsets are positions in the step's combined output (stdout and stderr
/// interleaved as the agent read them). Masking keeps lengths, so a masked byte
/// is stored at the offset the runner gave it. A masker may hold back the tail
/// of its stream (it could be the start of a secret); before bytes of the
/// other stream are stored, that tail is released under its own stream's tag,
/// so the combined stream stays gap-free and every byte keeps its stream. (A
/// secret that the step interleaves with output on the other stream is
/// therefore not recognised; one written whole is, however the reads split it.)
struct StepOutput {
    stdout: StreamMasker,
    stderr: StreamMasker,
    /// The stream whose masker holds bytes back, if one does.
    holding: Option<Stream>,
    /// Where the stored stream ends: the offset of the next byte to store.
    stored: u64,
}

impl StepOutput {
    fn new(masker: &Masker, stored: u64) -> StepOutput {
        StepOutput {
            stdout: masker.stream(),
            stderr: masker.stream(),
            holding: None,
            stored,
        }
    }

    fn masker(&mut self, stream: Stream) -> &mut StreamMasker {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }
}
