//! The envelope every stored value is wrapped in.
//!
//! ```text
//!  0        2        4                      4+n      8+n
//!  +--------+--------+----------------------+--------+
//!  | format | kind   | payload (n bytes)    | crc32c |
//!  | u16 BE | u16 BE | bincode 2, standard  | u32 BE |
//!  +--------+--------+----------------------+--------+
//!            crc32c covers format, kind and payload
//! ```
//!
//! * `format` is [`FORMAT_VERSION`]. A reader refuses any other value with
//!   [`DecodeError::UnknownFormat`] instead of guessing.
//! * `kind` says what the payload is: an event variant (1..=0x7fff, see
//!   `event.rs`) or a job summary (0x8001, see `store/summary.rs`).
//! * `payload` is bincode 2 in its standard configuration (varint integers,
//!   little-endian), decoded with a hard limit of [`MAX_ENVELOPE`] bytes so a
//!   corrupt length prefix can never make the reader allocate without bound.
//! * the trailing CRC-32C detects torn or flipped bytes before any decoding.
//!
//! Decoding never panics: truncated, oversized, corrupt or unknown-version input
//! is a [`DecodeError`].

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The envelope format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// The largest envelope accepted, header and checksum included (16 MiB).
pub const MAX_ENVELOPE: usize = 16 * 1024 * 1024;

const HEADER: usize = 4;
const TRAILER: usize = 4;

/// Why stored bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The value is shorter than an envelope's header and checksum.
    #[error("value is {len} bytes, shorter than the 8-byte envelope")]
    Truncated {
        /// Length of the value seen.
        len: usize,
    },
    /// The value is larger than any envelope this build writes.
    #[error("value is {len} bytes, over the {MAX_ENVELOPE}-byte limit")]
    TooLarge {
        /// Length of the value seen.
        len: usize,
    },
    /// The checksum does not match: the bytes were altered after writing.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// CRC stored in the envelope.
        stored: u32,
        /// CRC computed over the bytes read.
        computed: u32,
    },
    /// Written by a format this build does not know.
    #[error("unknown envelope format version {0} (this build reads version {FORMAT_VERSION})")]
    UnknownFormat(u16),
    /// The kind is not one this build knows, or not the one expected here.
    #[error("unknown kind {0}")]
    UnknownKind(u16),
    /// The payload does not decode as its kind says it should.
    #[error("payload of kind {kind} does not decode: {detail}")]
    Payload {
        /// The envelope's kind.
        kind: u16,
        /// What bincode said.
        detail: String,
    },
    /// The payload decoded but left bytes over.
    #[error("payload of kind {kind} has {extra} trailing bytes")]
    Trailing {
        /// The envelope's kind.
        kind: u16,
        /// Bytes left after decoding.
        extra: usize,
    },
}

/// An envelope whose checksum and header checked out; the payload is not decoded yet.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// The payload's kind.
    pub kind: u16,
    /// The payload bytes.
    pub payload: &'a [u8],
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ENVELOPE>()
}

/// Wraps an already-encoded payload in an envelope.
pub fn wrap(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len() + TRAILER);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Checks an envelope's size, checksum and format, and returns its kind and payload.
pub fn unwrap(bytes: &[u8]) -> Result<Envelope<'_>, DecodeError> {
    if bytes.len() < HEADER + TRAILER {
        return Err(DecodeError::Truncated { len: bytes.len() });
    }
    if bytes.len() > MAX_ENVELOPE {
        return Err(DecodeError::TooLarge { len: bytes.len() });
    }
    let (body, crc) = bytes.split_at(bytes.len() - TRAILER);
    let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(DecodeError::Checksum { stored, computed });
    }
    let format = u16::from_be_bytes([body[0], body[1]]);
    if format != FORMAT_VERSION {
        return Err(DecodeError::UnknownFormat(format));
    }
    let kind = u16::from_be_bytes([body[2], body[3]]);
    Ok(Envelope {
        kind,
        payload: &body[HEADER..],
    })
}

/// Encodes a serde value as a bincode payload.
pub fn encode_payload<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Encoding into a Vec only fails for types serde cannot express in bincode
    // (maps with unknown length and the like), which none of ours are; the types
    // encoded here are fixed at compile time, so this is a programming error.
    bincode::serde::encode_to_vec(value, bincode_config())
        .expect("reel's stored types always encode with bincode")
}

/// The length of a serde value's bincode payload, counted without building it.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut size = bincode::enc::write::SizeWriter::default();
    // As in `encode_payload`: reel's stored types always encode.
    bincode::serde::encode_into_writer(value, &mut size, bincode_config())
        .expect("reel's stored types always encode with bincode");
    size.bytes_written
}

/// Decodes a bincode payload, refusing trailing bytes.
pub fn decode_payload<T: DeserializeOwned>(kind: u16, payload: &[u8]) -> Result<T, DecodeError> {
    let (value, used) =
        bincode::serde::decode_from_slice(payload, bincode_config()).map_err(|e| {
            DecodeError::Payload {
                kind,
                detail: e.to_string(),
            }
        })?;
    if used != payload.len() {
        return Err(DecodeError::Trailing {
            kind,
            extra: payload.len() - used,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let payload = encode_payload(&(7u64, "x".to_string()));
        let bytes = wrap(3, &payload);
        let env = unwrap(&bytes).unwrap();
        assert_eq!(env.kind, 3);
        let (a, b): (u64, String) = decode_payload(3, env.payload).unwrap();
        assert_eq!((a, b.as_str()), (7, "x"));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = wrap(3, &encode_payload(&(7u64, "hello".to_string())));
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(unwrap(&b).is_err(), "flip of bit {i} went unnoticed");
        }
    }

    #[test]
    fn truncation_and_versions_are_errors() {
        let bytes = wrap(3, &[1, 2, 3]);
        for n in 0..bytes.len() {
            assert!(unwrap(&bytes[..n]).is_err());
        }
        let mut v2 = bytes.clone();
        v2[1] = 2;
        let body = v2.len() - 4;
        let crc = crc32c::crc32c(&v2[..body]).to_be_bytes();
        v2[body..].copy_from_slice(&crc);
        assert_eq!(unwrap(&v2).unwrap_err(), DecodeError::UnknownFormat(2));
    }

    #[test]
    fn encoded_len_is_the_payload_length() {
        let value = (7u64, "hello".to_string(), vec![1u32, 300, 70_000]);
        assert_eq!(encoded_len(&value), encode_payload(&value).len());
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // A Vec<u8> whose varint length claims u64::MAX bytes.
        let payload = [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        let err = decode_payload::<Vec<u8>>(1, &payload).unwrap_err();
        assert!(matches!(err, DecodeError::Payload { .. }), "{err:?}");
    }
}
