//! The envelope: how boundary types are encoded across the ABI.
//!
//! An envelope is the bincode 2 standard-configuration encoding of one boundary type
//! (see [`crate::types`]), with no header: the ABI version is checked once, at load.
//! Decoding refuses more than [`MAX_ENVELOPE_BYTES`] and trailing bytes, so a corrupt
//! length prefix cannot make either side allocate without bound.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::types::RunnerError;

/// The largest envelope either side decodes.
pub const MAX_ENVELOPE_BYTES: usize = 64 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ENVELOPE_BYTES>()
}

/// Encodes a value.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, RunnerError> {
    bincode::serde::encode_to_vec(value, config())
        .map_err(|e| RunnerError::invalid_input(format!("cannot encode envelope: {e}")))
}

/// Decodes a value, refusing trailing bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RunnerError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| RunnerError::invalid_input(format!("cannot decode envelope: {e}")))?;
    if used != bytes.len() {
        return Err(RunnerError::invalid_input(format!(
            "envelope has {} trailing bytes",
            bytes.len() - used
        )));
    }
    Ok(value)
}
