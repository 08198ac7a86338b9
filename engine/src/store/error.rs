//! Why a log operation failed: one enum for the whole store, its doc comments
//! the messages.

use std::path::PathBuf;

use crate::model::codec::DecodeError;
use crate::model::event::{JobId, Seq};
use crate::model::spec::SpecError;
use crate::model::state::IllegalTransition;
use crate::store::output;

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Another process (a running engine) has the log open.
    #[error(
        "the log at {} is in use by another process{holder}; stop it, or ask the running engine instead",
        path.display()
    )]
    Locked {
        /// The log directory.
        path: PathBuf,
        /// Who holds it, as far as can be told.
        holder: crate::store::Holder,
    },
    /// No log exists at the path (only for read-only opens).
    #[error("no reel log at {}", .0.display())]
    Missing(PathBuf),
    /// sled failed.
    #[error("the log's storage failed")]
    Storage(#[from] sled::Error),
    /// sled found the store corrupt and the journal holds nothing to rebuild
    /// it from.
    #[error(
        "the sled store in {} is damaged ({reason}) and the journal {} is empty or missing: \
         there is nothing to rebuild it from",
        path.display(),
        journal.display()
    )]
    Unrebuildable {
        /// The sled directory.
        path: PathBuf,
        /// What sled said.
        reason: String,
        /// The journal's path.
        journal: PathBuf,
    },
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
        what: &'static str,
        /// What is wrong with the bytes.
        #[source]
        source: DecodeError,
    },
    /// A step's output file is damaged.
    #[error("job {job} step {}: stored output is corrupt", step + 1)]
    CorruptOutput {
        /// The job.
        job: JobId,
        /// The step's index in the spec (from 0; messages number steps from 1).
        step: u32,
        /// Where the damage is.
        #[source]
        source: output::FrameError,
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
    /// The job is too large to store or to run ([`crate::model::spec`] has the
    /// limits); nothing was written, and no job id was used up.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The job does not exist.
    #[error("no job {0} in the log")]
    UnknownJob(JobId),
    /// The job has no stored artifact of that name (no `ArtifactStored` event).
    #[error("job {job} has no artifact {name:?}")]
    NoSuchArtifact {
        /// The job.
        job: JobId,
        /// The name asked for.
        name: String,
    },
    /// The job was set aside when the log was opened: its history cannot be
    /// read, so nothing more is appended to it.
    #[error("job {0} is set aside: its stored history cannot be read")]
    SetAside(JobId),
    /// Output would leave a gap in a step's stream.
    #[error("job {job} step {}: output at offset {offset} leaves a gap after {end}", step + 1)]
    OutputGap {
        /// The job.
        job: JobId,
        /// The step's index in the spec (from 0; messages number steps from 1).
        step: u32,
        /// The chunk's offset.
        offset: u64,
        /// Where the stored stream ends.
        end: u64,
    },
    /// The writer stopped (after a storage failure, or on close). The failure is
    /// shared by every waiting caller, so it is said in full here (with its
    /// causes, e.g. "No space left on device") rather than as a source.
    #[error("the log writer has stopped{}", .0.as_ref().map(|r| format!(": {}", super::error_line(r))).unwrap_or_default())]
    WriterStopped(Option<std::sync::Arc<LogError>>),
}
