//! Following a step's stored output while the step runs.
//!
//! A follower reads the step's output file from its offset, frame by frame,
//! and when it has read everything stored it waits for the executor to store
//! more (the service's observer wakes it) or for the step to end. Offsets are
//! the step's combined stream, so a follower that starts again at the offset
//! it reached gets no gap and no duplicate. Memory stays a batch of frames,
//! whatever the output's size.

use std::collections::VecDeque;
use std::time::Duration;

use super::Service;
use crate::model::event::JobId;
use crate::model::state::{JobState, Phase};
use crate::store::output::FrameError;
use crate::store::{LogError, OutputChunk};

/// The most one read of a follower takes from the file.
const BATCH_BYTES: usize = 1024 * 1024;

/// How long a follower waits for a wake-up before looking again anyway.
const RECHECK: Duration = Duration::from_secs(2);

/// A step's output from an offset, then (when following) as it is stored:
/// see [`Service::follow`]. Counted in [`Counters::followers`](super::Counters)
/// from its creation to its drop.
#[derive(Debug)]
pub struct Follow {
    svc: Service,
    job: JobId,
    index: u32,
    pos: u64,
    keep_following: bool,
    pending: VecDeque<OutputChunk>,
    done: bool,
    gone: Gone,
}

/// What says the follower's reader has gone ([`Follow::until_gone`]).
struct Gone(Option<Box<dyn Fn() -> bool + Send>>);

impl std::fmt::Debug for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Gone(set)"
        } else {
            "Gone(none)"
        })
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        self.svc
            .counters()
            .followers
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether the step can store no more output: it finished, or the job is
/// past running steps without it.
fn step_over(state: &JobState, index: u32) -> bool {
    if let Some(s) = state.steps.iter().find(|s| s.index == index) {
        return s.finished_ms.is_some() || state.phase == Phase::Terminal;
    }
    // Not started: over once no step can start any more.
    state.phase == Phase::Terminal || state.phase.tearing_down() || state.phase == Phase::Reaped
}

impl Follow {
    pub(super) fn new(
        svc: Service,
        job: JobId,
        index: u32,
        offset: u64,
        keep_following: bool,
    ) -> Follow {
        svc.counters()
            .followers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Follow {
            svc,
            job,
            index,
            pos: offset,
            keep_following,
            pending: VecDeque::new(),
            done: false,
            gone: Gone(None),
        }
    }

    /// Ends the follow (`next` gives `None`) once `gone` says yes, looked at
    /// each time the follower wakes while it waits for output (at least every
    /// two seconds): a reader that went away while the step is silent does not
    /// keep the follow alive until the step prints or ends.
    pub fn until_gone(mut self, gone: impl Fn() -> bool + Send + 'static) -> Follow {
        self.gone = Gone(Some(Box::new(gone)));
        self
    }

    /// Where the next byte comes from: the offset after everything returned.
    pub fn offset(&self) -> u64 {
        self.pos
    }

    /// The next chunk (starting at the offset asked for, never before it), or
    /// `None` at the end: everything stored was read and, when following, the
    /// step ended.
    pub async fn next(&mut self) -> Option<Result<OutputChunk, LogError>> {
        loop {
            if let Some(c) = self.pending.pop_front() {
                return Some(Ok(c));
            }
            if self.done {
                return None;
            }
            if self.gone.0.as_ref().is_some_and(|gone| gone()) {
                self.done = true;
                return None;
            }
            let watcher = self
                .keep_following
                .then(|| self.svc.watcher(self.job))
                .flatten();
            let listener = watcher.as_ref().map(|w| w.listen());
            match self.read().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            if !self.keep_following {
                self.done = true;
                continue;
            }
            let over = match self.svc.state(self.job) {
                Ok(s) => step_over(&s, self.index),
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            if over {
                // Anything stored between the read and the look at the state.
                self.keep_following = false;
                continue;
            }
            if let Some(l) = listener {
                smol::future::or(
                    async {
                        l.await;
                    },
                    async {
                        smol::Timer::after(RECHECK).await;
                    },
                )
                .await;
            }
        }
    }

    /// Reads the next batch of stored frames into `pending`. `Ok(false)` when
    /// nothing new is stored. A frame still being written (a torn tail) is
    /// nothing new yet.
    async fn read(&mut self) -> Result<bool, LogError> {
        let log = self.svc.log().clone();
        let (job, index, from) = (self.job, self.index, self.pos);
        let read = blocking::unblock(move || {
            let mut got = Vec::new();
            let mut bytes = 0;
            for chunk in log.output(job, index, from) {
                match chunk {
                    Ok(c) => {
                        bytes += c.bytes.len();
                        got.push(c);
                        if bytes >= BATCH_BYTES {
                            break;
                        }
                    }
                    Err(LogError::CorruptOutput {
                        source: FrameError::Torn { .. },
                        ..
                    }) => break,
                    Err(e) => return Err(e),
                }
            }
            Ok(got)
        })
        .await?;
        let mut any = false;
        for mut c in read {
            let end = c.offset + c.bytes.len() as u64;
            if end <= self.pos {
                continue;
            }
            // The chunk that straddles the offset starts at it.
            let skip = usize::try_from(self.pos.saturating_sub(c.offset)).unwrap_or(usize::MAX);
            if skip > 0 {
                c.bytes.drain(..skip.min(c.bytes.len()));
                c.offset = self.pos;
            }
            self.pos = end;
            any = true;
            self.pending.push_back(c);
        }
        Ok(any)
    }
}
