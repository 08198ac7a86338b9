//! What front ends see of running jobs: [`Report`]s through the [`Observer`]
//! they implement, and the [`Cancel`] signal they hold.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::model::event::{JobId, Outcome};
use crate::store::Stream;

/// What the executor tells whoever watches a job (the CLI prints it).
#[derive(Debug)]
pub enum Report<'a> {
    /// A batch gave the job a slot: it starts now.
    Dispatched {
        /// The job.
        job: JobId,
    },
    /// The job acquired its sandbox and is about to run its first step.
    Started {
        /// The job.
        job: JobId,
        /// Its leased sandbox id.
        cid: u32,
    },
    /// A step started.
    StepStarted {
        /// The job.
        job: JobId,
        /// Step index.
        index: u32,
        /// Step name.
        name: &'a str,
    },
    /// Masked output of a running step, as stored.
    Output {
        /// The job.
        job: JobId,
        /// Step index.
        index: u32,
        /// Which stream.
        stream: Stream,
        /// The bytes.
        bytes: &'a [u8],
    },
    /// A step ended.
    StepFinished {
        /// The job.
        job: JobId,
        /// Step index.
        index: u32,
        /// Step name.
        name: &'a str,
        /// Exit code, if it exited.
        exit_code: Option<i32>,
        /// Signal, if one ended it.
        signal: Option<i32>,
        /// Whether a timeout ended it.
        timed_out: bool,
        /// How long it ran.
        duration: Duration,
        /// Bytes of output stored.
        bytes: u64,
    },
    /// An artifact of the job is stored (its `ArtifactStored` is durable).
    ArtifactStored {
        /// The job.
        job: JobId,
        /// Its path relative to the job's work directory.
        name: &'a str,
        /// Its size in bytes.
        size: u64,
    },
    /// A runner warning or notice.
    Notice {
        /// The job.
        job: JobId,
        /// What it says.
        message: &'a str,
    },
    /// The job ended.
    Finished {
        /// The job.
        job: JobId,
        /// How.
        outcome: Outcome,
        /// Why, for anything but success.
        reason: &'a str,
        /// Submission to end.
        duration: Duration,
    },
}

/// Receives [`Report`]s. Called from executor tasks; keep it quick.
pub trait Observer: Send + Sync {
    /// One report.
    fn report(&self, report: Report<'_>);
}

/// A cancellation signal shared by whoever may cancel a job and the job itself.
#[derive(Clone, Debug)]
pub struct Cancel {
    reason: Arc<Mutex<Option<String>>>,
    tx: async_channel::Sender<()>,
    rx: async_channel::Receiver<()>,
}

impl Default for Cancel {
    fn default() -> Self {
        let (tx, rx) = async_channel::bounded(1);
        Cancel {
            reason: Arc::default(),
            tx,
            rx,
        }
    }
}

impl Cancel {
    /// Asks for cancellation; the first reason given is kept.
    pub fn cancel(&self, reason: &str) {
        lock(&self.reason).get_or_insert_with(|| reason.to_string());
        self.tx.close();
    }

    /// The reason, once cancelled.
    pub fn reason(&self) -> Option<String> {
        lock(&self.reason).clone()
    }

    /// Resolves when cancelled.
    pub async fn cancelled(&self) {
        let _ = self.rx.recv().await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
