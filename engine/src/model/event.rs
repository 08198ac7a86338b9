//! The lifecycle events of a job: the vocabulary of the log.
//!
//! Every variant has a fixed `kind` number that is part of the on-disk format
//! (see `codec.rs` for the envelope). Variants are append-only: a kind number is
//! never reused and a variant's fields never change; a schema change adds a new
//! variant (and, if old records must read as the new shape, an upcast in
//! [`Event::decode`]). Golden byte fixtures under `engine/tests/golden/` pin the
//! encoding of every kind.
//!
//! The payload of an event record is the bincode encoding of the tuple
//! `(at_ms, (field1, field2, ...))`: the record's wall-clock time followed by the
//! variant's fields in declaration order.

use serde::{Deserialize, Serialize};

use crate::model::codec::{self, DecodeError};
use crate::model::spec::{JobSpec, JobSpecV1, JobSpecV2, Resources};

/// A job's identifier: the log's own counter, so ids sort by submission order.
pub type JobId = u64;

/// A record's position in its job's history, starting at 1.
pub type Seq = u32;

/// The runner's opaque, versioned handle for a sandbox. The engine stores it and
/// gives it back after a restart; only the runner that made it reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    /// The runner's own version of the handle layout.
    pub version: u32,
    /// The runner's bytes.
    pub bytes: Vec<u8>,
}

/// How a job ended (or is decided to end, once teardown starts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every step exited 0.
    Succeeded,
    /// A step failed, or the sandbox could not be set up.
    Failed,
    /// Someone cancelled the job.
    Cancelled,
    /// A step or the job ran past its timeout.
    TimedOut,
    /// The engine died and the sandbox could not be recovered.
    Lost,
}

impl Outcome {
    /// Every outcome, in declaration order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::Cancelled,
        Outcome::TimedOut,
        Outcome::Lost,
    ];

    /// The outcome [`Outcome::as_str`] names.
    pub fn parse(name: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == name)
    }

    /// The lower-case name used in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::TimedOut => "timed_out",
            Outcome::Lost => "lost",
        }
    }
}

macro_rules! events {
    ($(
        $(#[doc = $doc:literal])*
        $kind:literal => $name:ident { $( $(#[$fattr:meta])* $field:ident : $ty:ty ),* $(,)? }
    )*) => {
        /// A lifecycle event. See the module documentation for the encoding.
        #[derive(Clone, Debug, PartialEq, Serialize)]
        #[serde(tag = "event")]
        pub enum Event {
            $(
                $(#[doc = $doc])*
                $name { $( $(#[$fattr])* $field: $ty ),* },
            )*
        }

        impl Event {
            /// Every kind number with its variant name, in kind order.
            pub const KINDS: &'static [(u16, &'static str)] = &[$(($kind, stringify!($name))),*];

            /// This event's kind number (part of the on-disk format).
            pub fn kind(&self) -> u16 {
                match self { $( Event::$name { .. } => $kind, )* }
            }

            /// This event's variant name.
            pub fn name(&self) -> &'static str {
                match self { $( Event::$name { .. } => stringify!($name), )* }
            }

            fn encode_payload(&self, at_ms: u64) -> Vec<u8> {
                match self {
                    $( Event::$name { $($field),* } => codec::encode_payload(&(at_ms, ($($field,)*))), )*
                }
            }

            fn decode_payload(kind: u16, payload: &[u8]) -> Result<(u64, Event), DecodeError> {
                match kind {
                    $(
                        $kind => {
                            #[allow(unused_parens, clippy::unused_unit)]
                            let (at_ms, ($($field,)*)): (u64, ($($ty,)*)) =
                                codec::decode_payload(kind, payload)?;
                            Ok((at_ms, Event::$name { $($field),* }))
                        }
                    )*
                    other => decode_retired(other, payload),
                }
            }
        }
    };
}

events! {
    /// The job waits for resources.
    2 => Queued {}
    /// A sandbox id (the CID of a VM) is leased to the job until `Cleaned`.
    4 => CidAllocated { cid: u32 }
    /// Intent: the runner's plan names every resource it is about to create
    /// (workdir, cgroup, sockets) so recovery can find them even if the engine
    /// dies before `WorkDirCreated`.
    5 => SandboxPlanned { handle: Handle, resources: Vec<String> }
    /// The work directory (and cgroup) exist.
    6 => WorkDirCreated { handle: Handle }
    /// The job's volumes are formatted (may be none for the process runner).
    7 => VolumesFormatted { volumes: Vec<String> }
    /// Intent: the VM or agent process is about to start.
    8 => BootRequested {}
    /// The VM or agent process runs; the handle names it (pid and start time).
    9 => VmBooted { handle: Handle }
    /// The agent answered the handshake.
    10 => AgentConnected { handle: Handle }
    /// Step `index` started as exec `exec_id`.
    11 => StepStarted { index: u32, exec_id: u64 }
    /// Step `index` ended.
    12 => StepFinished { index: u32, exit_code: Option<i32>, signal: Option<i32>, timed_out: bool, output_bytes: u64 }
    /// Someone asked for the job to be cancelled.
    13 => CancelRequested { reason: String }
    /// The decision to tear the sandbox down and the outcome it will end with.
    14 => TeardownStarted { outcome: Outcome, reason: String }
    /// The agent flushed all buffered output.
    15 => Drained {}
    /// The VM or agent and every process of the job are gone.
    16 => PoweredOff {}
    /// Intent: the runner is about to remove the sandbox's resources.
    17 => CleanupStarted {}
    /// Workdir, volumes, cgroup and lease are gone.
    18 => Cleaned {}
    /// Terminal: every step succeeded.
    19 => Succeeded {}
    /// Terminal: the job failed.
    20 => Failed { reason: String }
    /// Terminal: the job was cancelled.
    21 => Cancelled { reason: String }
    /// Terminal: the job ran out of time.
    22 => TimedOut { reason: String }
    /// Terminal: the engine died and the job could not be resumed.
    23 => Lost { reason: String }
    /// A new engine (pid) took over a job left by a dead one.
    24 => RecoveryStarted { engine_pid: u32 }
    /// The new engine reconnected to the job's live sandbox.
    25 => Reattached { handle: Handle }
    /// Recovery removed what the dead engine left behind.
    26 => Reaped { reason: String }
    /// Something the runner wants on the record (e.g. a skipped cgroup).
    27 => RunnerNotice { message: String }
    /// Intent: the job ran past its deadline; the engine is about to stop its
    /// running step, and the job ends `TimedOut` (recovery honours it).
    28 => DeadlinePassed { reason: String }
    /// The scheduler granted the job its resources: what it charged against
    /// the budget (the request with the runner defaults filled in), which a
    /// restarted scheduler counts again for a job still holding its sandbox.
    /// (Kind 3 had no fields; it reads as this with nothing charged.)
    30 => SlotGranted { charged: Resources }
    /// One artifact of the job is whole and durable at
    /// `<state>/artifacts/<job>/<name>` (`name` is its path relative to the
    /// job's work directory): appended only after the runner's copy was synced
    /// and renamed into place and the engine synced it again, between `Drained`
    /// and `PoweredOff`, once per name. Only names with this event are the job's
    /// artifacts; any other file there is a partial copy.
    31 => ArtifactStored { name: String, size: u64, crc32c: u32 }
    /// A job entered the system; its full specification (secret names only).
    /// (Format 3 of the spec, with the network choice: kinds 1 and 29 held
    /// formats 1 and 2, read as this.)
    32 => Submitted { spec: JobSpec }
}

/// Kinds no longer written, with what they read as. A kind number is never
/// reused, so old logs keep reading.
pub const RETIRED_KINDS: &[(u16, &str)] = &[
    (1, "Submitted (spec format 1)"),
    (3, "SlotGranted (no fields)"),
    (29, "Submitted (spec format 2)"),
];

/// Decodes a retired kind as the current event it became (its upcast).
fn decode_retired(kind: u16, payload: &[u8]) -> Result<(u64, Event), DecodeError> {
    match kind {
        1 => {
            let (at_ms, (spec,)): (u64, (JobSpecV1,)) = codec::decode_payload(kind, payload)?;
            Ok((at_ms, Event::Submitted { spec: spec.into() }))
        }
        29 => {
            let (at_ms, (spec,)): (u64, (JobSpecV2,)) = codec::decode_payload(kind, payload)?;
            Ok((at_ms, Event::Submitted { spec: spec.into() }))
        }
        3 => {
            let (at_ms, ()): (u64, ()) = codec::decode_payload(kind, payload)?;
            Ok((
                at_ms,
                Event::SlotGranted {
                    charged: Resources::default(),
                },
            ))
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

impl Event {
    /// Whether this event ends the job.
    pub fn is_terminal(&self) -> bool {
        self.terminal_outcome().is_some()
    }

    /// The outcome a terminal event records.
    pub fn terminal_outcome(&self) -> Option<Outcome> {
        Some(match self {
            Event::Succeeded {} => Outcome::Succeeded,
            Event::Failed { .. } => Outcome::Failed,
            Event::Cancelled { .. } => Outcome::Cancelled,
            Event::TimedOut { .. } => Outcome::TimedOut,
            Event::Lost { .. } => Outcome::Lost,
            _ => return None,
        })
    }

    /// The terminal event that records `outcome`.
    pub fn terminal(outcome: Outcome, reason: String) -> Event {
        match outcome {
            Outcome::Succeeded => Event::Succeeded {},
            Outcome::Failed => Event::Failed { reason },
            Outcome::Cancelled => Event::Cancelled { reason },
            Outcome::TimedOut => Event::TimedOut { reason },
            Outcome::Lost => Event::Lost { reason },
        }
    }

    /// Encodes this event, stamped with `at_ms`, as a stored envelope.
    pub fn encode(&self, at_ms: u64) -> Vec<u8> {
        codec::wrap(self.kind(), &self.encode_payload(at_ms))
    }

    /// Decodes a stored envelope into its timestamp and event.
    pub fn decode(bytes: &[u8]) -> Result<(u64, Event), DecodeError> {
        let env = codec::unwrap(bytes)?;
        Event::decode_payload(env.kind, env.payload)
    }
}

/// One event as stored: where it sits in its job's history and when it happened.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Record {
    /// The job.
    pub job: JobId,
    /// Position in the job's history, from 1.
    pub seq: Seq,
    /// Wall-clock time it was appended, Unix ms.
    pub at_ms: u64,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_unique_and_dense() {
        let mut kinds: Vec<u16> = Event::KINDS
            .iter()
            .chain(RETIRED_KINDS)
            .map(|k| k.0)
            .collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), Event::KINDS.len() + RETIRED_KINDS.len());
        assert_eq!(kinds, (1..=kinds.len() as u16).collect::<Vec<_>>());
    }

    #[test]
    fn events_round_trip() {
        let e = Event::StepFinished {
            index: 2,
            exit_code: Some(3),
            signal: None,
            timed_out: false,
            output_bytes: 1 << 40,
        };
        let bytes = e.encode(123);
        assert_eq!(Event::decode(&bytes).unwrap(), (123, e));
    }

    #[test]
    fn unknown_kind_is_an_error() {
        let bytes = codec::wrap(999, &codec::encode_payload(&(1u64, ())));
        assert_eq!(
            Event::decode(&bytes).unwrap_err(),
            DecodeError::UnknownKind(999)
        );
    }
}
