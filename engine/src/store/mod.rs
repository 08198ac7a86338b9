//! The durable event log: the only room that opens sled.
//!
//! # Layout
//!
//! One sled `Db` in `<state dir>/log/`, with five trees. Keys are raw big-endian
//! bytes (never bincode) so they sort numerically; values are envelopes
//! (`model/codec.rs`).
//!
//! | tree     | key                                   | value                            |
//! |----------|---------------------------------------|----------------------------------|
//! | `events` | job id u64 ++ seq u32                 | event envelope (kind 1..=0x7fff) |
//! | `jobs`   | job id u64                            | [`JobSummary`] (kind 0x8001)     |
//! | `live`   | job id u64                            | empty: the job is not terminal   |
//! | `gc`     | job id u64                            | its state in a gc (`gc.rs`)      |
//! | `meta`   | `format`, `next_job`, `journal_end`   | u16 BE, u64 BE, u64 BE           |
//! |          | `gc_horizon`, `gc_journal` (`gc.rs`)  | u64 BE, u64 BE                   |
//!
//! Beside it, `<state dir>/journal` holds a second copy of every event
//! ([`journal`]), so that damage sled would silently truncate is found and
//! repaired, `<state dir>/output/` holds step output in append-only files
//! ([`output`]), written by the same writer in the same rounds, and
//! `<state dir>/artifacts/` the jobs' collected files ([`artifacts`]).
//!
//! # The files of this room
//!
//! | file | concern |
//! |---|---|
//! | `event_log.rs` | [`EventLog`]: open a log for a running engine, submit, append |
//! | `writer.rs` | the writer: rounds, journal first, group commit, sled applied behind, background flush |
//! | `reader.rs` | [`LogReader`]: every read; `open_copy` for offline tools |
//! | `reconcile.rs` | completing or restoring sled from the journal on open |
//! | `rebuild.rs` | a store sled finds corrupt rebuilt from the journal; sled's unfinished snapshots cleared |
//! | `durable.rs` | creating files and directories with their parent directory synced |
//! | `audit.rs` | journal vs sled, histories with intact copies, `verify` |
//! | `trees.rs` | the sled trees, their keys, the reads shared by writer and readers |
//! | `summary.rs` | [`JobSummary`], the per-job listing record |
//! | `journal.rs` | the journal file format |
//! | `output.rs` | step output files |
//! | `artifacts.rs` | a job's artifact files: where they are, the checks before `ArtifactStored`, the sweep of partial copies |
//! | `salvage.rs` | live jobs that do not fold: repaired from the journal or set aside |
//! | `gc.rs` | retention: deleting ended jobs past a horizon, crash-safe, in bounded memory |
//! | `snapshot.rs` | temporary copies for offline readers; the lock probe |
//! | `error.rs` | [`LogError`] |
//!
//! # Writing: the journal first, sled behind
//!
//! All mutation goes through the writer (`writer.rs`): a stage thread takes
//! every request waiting (up to a cap), checks each event against the job's
//! folded state (an event the state machine rejects is refused and never
//! written) and writes the round's journal and output frames; a sync thread
//! syncs them (in [`Durability::Fsync`] mode, once for every round written
//! meanwhile), answers the callers and then inserts the rounds into sled's
//! trees (the `meta` checkpoint last); a flush thread flushes sled in the
//! background. An append that returned `Ok` is durable in the journal; one
//! that returned `Err` was not written. Opening the log brings sled up to
//! date from the journal (`reconcile`). Reads of a running engine's log wait
//! for sled to hold every answered round, so a caller reads its own writes.
//! ARCHITECTURE.md has the durability promise in full.
//!
//! # Reading
//!
//! Readers hold a [`LogReader`], which has no way to append: offline tools open
//! one over a copy ([`LogReader::open_copy`]), so a dry run is read-only by
//! construction. An [`EventLog`] dereferences to the `LogReader` over its own
//! trees. A value that fails its checksum or does not decode is reported as
//! [`LogError::Corrupt`] naming the job and seq (or output offset); other jobs
//! stay readable. Step output is read one frame at a time, so a reader's
//! memory does not grow with a step's output.
//!
//! # Damage sled cannot get past
//!
//! When sled finds its own store corrupt while a log is opened (it refuses to
//! open it, or a read fails while reconciling or loading), the store is
//! rebuilt from the journal and the damaged directory kept aside
//! (`rebuild.rs`); an offline reader rebuilds only its copy. sled's unfinished
//! snapshot files, which a full disk leaves and which sled would read as its
//! newest snapshot, are removed before sled opens.

pub mod artifacts;
mod audit;
mod durable;
mod error;
mod event_log;
mod gc;
pub mod journal;
pub mod output;
mod reader;
mod rebuild;
mod reconcile;
mod salvage;
mod snapshot;
pub mod stats;
mod summary;
mod trees;
mod writer;

pub use audit::{
    Audit, GoodCopies, History, JournalFinding, Verification, corrupt_seq, error_line, verify,
};
pub use error::LogError;
pub use event_log::EventLog;
pub use gc::{GcReport, NEW_JOURNAL, Retention, collect as gc, due as gc_due};
pub use output::{ChunkView, OutputChunk, Stream};
pub use reader::{LogReader, OutputChunks};
pub use reconcile::Repair;
pub use snapshot::Holder;
pub use summary::{JobSummary, KIND_SUMMARY};
pub use trees::{TREES, event_key, exists};

use std::sync::Mutex;

/// sled's page cache. Written pages stay cached up to this size, so it bounds
/// what a long step's stored output costs in engine memory.
pub const CACHE_BYTES: u64 = 48 * 1024 * 1024;

/// How hard an acknowledged append is pushed to stable storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map half-updated in a way
    // that matters (inserts and removes are single operations), so recover it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
