//! Job summaries: what listings show, one per job in the `jobs` tree.

use serde::{Deserialize, Serialize};

use crate::model::codec::{self, DecodeError};
use crate::model::event::{JobId, Outcome, Seq};
use crate::model::state::JobState;

/// Envelope kind of a job summary in the `jobs` tree.
pub const KIND_SUMMARY: u16 = 0x8001;

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
    pub(super) fn of(state: &JobState) -> JobSummary {
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

    pub(super) fn encode(&self) -> Vec<u8> {
        codec::wrap(KIND_SUMMARY, &codec::encode_payload(self))
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<JobSummary, DecodeError> {
        let env = codec::unwrap(bytes)?;
        if env.kind != KIND_SUMMARY {
            return Err(DecodeError::UnknownKind(env.kind));
        }
        codec::decode_payload(env.kind, env.payload)
    }
}
