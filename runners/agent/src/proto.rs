//! The agent protocol: framed, versioned, checksummed messages on a byte stream.
//!
//! # Frame layout
//!
//! Every message travels in exactly one frame. All integers are big-endian.
//!
//! ```text
//!  offset 0        4          6        8                  8+n        12+n
//!         +--------+----------+--------+------------------+----------+
//!         |  len   |  format  |  kind  |  payload         |  crc32c  |
//!         |  u32   |   u16    |  u16   |  n = len bytes   |   u32    |
//!         +--------+----------+--------+------------------+----------+
//!         \______ header (8 bytes) ____/                   \_trailer_/
//! ```
//!
//! - `len` is the payload length `n` only (not the header or trailer). A frame whose
//!   `len` exceeds [`MAX_PAYLOAD`] is refused before anything is allocated for it.
//! - `format` is the payload encoding; [`FORMAT_BINCODE`] (bincode 2, standard
//!   configuration, with a decode limit of [`MAX_PAYLOAD`]) is the only one defined.
//! - `kind` says which [`Message`] the payload is (see [`Message::kind`]); the payload is
//!   the message's fields encoded in declaration order as a tuple.
//! - `crc32c` is the CRC-32C (Castagnoli) of `format`, `kind` and the payload bytes.
//!
//! A malformed, oversized, bad-CRC, unknown-format or unknown-kind frame is a
//! [`ProtoError`]; whoever reads it sends an error (see below) if it still can and
//! closes the connection. Decoding never panics on any input.
//!
//! # Versions
//!
//! | version | what it adds |
//! |---:|---|
//! | 1 | kinds 1 to 17 |
//! | 2 | kind 18, [`Message::Failure`]: an error with an [`ErrorCode`] |
//! | 3 | kinds 19 to 22: listing the files artifact patterns match ([`Message::ListFiles`] → [`Message::FileList`]) and reading one in chunks ([`Message::ReadFile`] → [`Message::FileChunk`]); codes [`ErrorCode::BadPattern`], [`ErrorCode::FileRefused`], [`ErrorCode::FileUnreadable`] |
//!
//! A kind's payload never changes once defined: a message that needs another field is
//! a new kind, introduced with a new version. `Hello` agrees on one version, and from
//! then on each side sends only the kinds that version has ([`Message::since_version`]);
//! receiving a newer kind is a protocol violation. So an agent reports errors as
//! `Failure` to a version-2 host and as kind 17 `Error` (text only) to a version-1
//! host ([`Message::failure`] picks the form). Before `Hello` has agreed on a version,
//! and when it fails, errors are always kind 17 `Error`, which every version reads.
//! A host decides by the code, never by the message text, which is for people.
//!
//! # Conversation
//!
//! 1. The host sends `Hello { min_version, max_version, role: Host }`. The agent picks the
//!    highest version both support and answers `Hello { min_version: v, max_version: v,
//!    role: Agent }`; with no overlap it answers `Error` and closes. Any other message
//!    before a successful `Hello` is answered with `Error` and the connection is closed.
//! 2. The host sends `Init { job_id, session_token }`; the agent remembers the first token
//!    and answers `Initialized`. A later connection must present the same token, otherwise
//!    it gets an error ([`ErrorCode::WrongSession`]) and is closed. Exec messages before
//!    `Init` are refused ([`ErrorCode::NotInitialized`]).
//! 3. `ExecStart` starts a step; its output arrives as `Output` frames whose `offset` is the
//!    byte offset in the exec's combined output (stdout and stderr interleaved in the order
//!    the agent read them), then one `ExecExit`. A connection only receives output of the
//!    execs it started or `Resume`d (from the offset it asked for), so nothing is
//!    duplicated across reconnects.
//! 4. `Ack` lets the agent drop buffered output below an offset. Unacknowledged output is
//!    bounded by the agent's `--max-buffer`; past it the exec's output is marked lost and
//!    the host gets an error naming the exec ([`ErrorCode::OutputLost`], never silent
//!    truncation).
//! 5. `Cancel`, `Drain` → `Drained`, `Poweroff` → `PoweringOff`, `Ping` → `Pong`.
//! 6. (Version 3.) `ListFiles { patterns, after }` → `FileList { files, more }`: the
//!    regular files below the agent's workdir that the patterns match (see
//!    [`crate::glob`]: relative paths only, no symbolic link followed), in name order,
//!    after `after`, at most [`MAX_LIST_BYTES`] of names per answer (`more` says
//!    another page follows). `ReadFile { path, offset, len }` → `FileChunk { offset,
//!    bytes, eof }`: at most [`MAX_FILE_CHUNK`] bytes of one such file, opened
//!    component by component without following a link. A refused pattern or path is
//!    a `Failure` with [`ErrorCode::BadPattern`] or [`ErrorCode::FileRefused`], an
//!    I/O error [`ErrorCode::FileUnreadable`]; neither closes the connection.

use std::io::{self, Read, Write};

use bincode::config::{Config, standard};
use serde::{Deserialize, Serialize};

/// Lowest protocol version this build speaks.
pub const MIN_VERSION: u16 = 1;
/// Highest protocol version this build speaks.
pub const MAX_VERSION: u16 = 3;
/// The first version with [`Message::Failure`] (errors with an [`ErrorCode`]).
pub const FAILURE_VERSION: u16 = 2;
/// The first version with the file messages (kinds 19 to 22: listing and
/// reading artifacts).
pub const FILES_VERSION: u16 = 3;
/// The most file bytes one [`Message::FileChunk`] carries (a quarter of the
/// frame cap, so a chunk and its header always fit).
pub const MAX_FILE_CHUNK: usize = 256 * 1024;
/// The most bytes of names one [`Message::FileList`] carries (half the frame cap;
/// a name is at most 4 KiB, so a page always fits).
pub const MAX_LIST_BYTES: usize = MAX_PAYLOAD / 2;
/// The only payload format defined: bincode 2, standard configuration.
pub const FORMAT_BINCODE: u16 = 1;
/// Hard maximum payload size of one frame (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Size of the frame header (`len`, `format`, `kind`).
pub const HEADER_LEN: usize = 8;
/// Size of the frame trailer (`crc32c`).
pub const TRAILER_LEN: usize = 4;
/// Hard maximum size of a whole frame.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD + TRAILER_LEN;
/// Largest `Output` chunk the agent sends in one frame.
pub const MAX_OUTPUT_CHUNK: usize = 64 * 1024;

fn config() -> impl Config {
    standard().with_limit::<MAX_PAYLOAD>()
}

/// Which side of the conversation a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The engine (or a runner plugin on its behalf).
    Host,
    /// The agent inside the sandbox.
    Agent,
}

/// Which output stream a chunk was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    /// The step's standard output.
    Stdout,
    /// The step's standard error.
    Stderr,
}

/// What went wrong, in a form a program can decide on: the code of a
/// [`Message::Failure`]. On the wire it is a `u16`; numbers are never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No code: a kind 17 `Error` (from a version-1 peer, or sent before `Hello`
    /// agreed on a version).
    Unspecified,
    /// A frame could not be read; the connection is closed.
    BadFrame,
    /// A message the protocol does not allow here (a second `Hello`, or one only the
    /// agent sends); the connection may be closed.
    UnexpectedMessage,
    /// An exec message arrived before `Init`.
    NotInitialized,
    /// `Init` named another job or session token than the agent's; the connection is
    /// closed.
    WrongSession,
    /// `ExecStart` for an exec id the agent already has (running or finished); the
    /// host can `Resume` it instead.
    ExecExists,
    /// The step could not be started (the program is missing, for example).
    SpawnFailed,
    /// `Resume`, `Ack` or `Cancel` for an exec id the agent does not have.
    UnknownExec,
    /// More output was buffered than `--max-buffer` allows, so some was dropped.
    OutputLost,
    /// Output the host asked for was acknowledged and dropped already.
    OutputDropped,
    /// `Resume` from past the end of the exec's output.
    OffsetPastEnd,
    /// (Version 3.) An artifact pattern is refused: absolute, with a `..`
    /// segment, or empty.
    BadPattern,
    /// (Version 3.) A path `ReadFile` names is not a regular file below the
    /// workdir reached without a symbolic link.
    FileRefused,
    /// (Version 3.) The workdir or a file could not be read.
    FileUnreadable,
    /// A code this build does not know (from a newer peer), with its wire number.
    Other(u16),
}

impl ErrorCode {
    /// The code's number on the wire.
    pub fn number(self) -> u16 {
        match self {
            ErrorCode::Unspecified => 0,
            ErrorCode::BadFrame => 1,
            ErrorCode::UnexpectedMessage => 2,
            ErrorCode::NotInitialized => 3,
            ErrorCode::WrongSession => 4,
            ErrorCode::ExecExists => 5,
            ErrorCode::SpawnFailed => 6,
            ErrorCode::UnknownExec => 7,
            ErrorCode::OutputLost => 8,
            ErrorCode::OutputDropped => 9,
            ErrorCode::OffsetPastEnd => 10,
            ErrorCode::BadPattern => 11,
            ErrorCode::FileRefused => 12,
            ErrorCode::FileUnreadable => 13,
            ErrorCode::Other(n) => n,
        }
    }

    /// The code with wire number `n`; a number this build does not know is
    /// [`ErrorCode::Other`].
    pub fn from_number(n: u16) -> ErrorCode {
        match n {
            0 => ErrorCode::Unspecified,
            1 => ErrorCode::BadFrame,
            2 => ErrorCode::UnexpectedMessage,
            3 => ErrorCode::NotInitialized,
            4 => ErrorCode::WrongSession,
            5 => ErrorCode::ExecExists,
            6 => ErrorCode::SpawnFailed,
            7 => ErrorCode::UnknownExec,
            8 => ErrorCode::OutputLost,
            9 => ErrorCode::OutputDropped,
            10 => ErrorCode::OffsetPastEnd,
            11 => ErrorCode::BadPattern,
            12 => ErrorCode::FileRefused,
            13 => ErrorCode::FileUnreadable,
            n => ErrorCode::Other(n),
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.number())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        u16::deserialize(deserializer).map(ErrorCode::from_number)
    }
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The underlying stream failed.
    #[error("I/O error on the agent connection: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection.
    #[error("The agent connection was closed by the peer.")]
    Closed,
    /// A frame announced a payload larger than [`MAX_PAYLOAD`].
    #[error("Frame payload of {0} bytes exceeds the maximum of {MAX_PAYLOAD} bytes.")]
    Oversized(usize),
    /// The frame's checksum did not match its contents.
    #[error("Frame checksum mismatch: expected {expected:#010x}, computed {actual:#010x}.")]
    BadCrc {
        /// Checksum carried by the frame.
        expected: u32,
        /// Checksum computed over the received bytes.
        actual: u32,
    },
    /// The frame's format is not one this build understands.
    #[error("Unknown frame format {0}.")]
    UnknownFormat(u16),
    /// The frame's kind is not a known message.
    #[error("Unknown message kind {0}.")]
    UnknownKind(u16),
    /// The payload could not be decoded as the message its kind names.
    #[error("Malformed payload for message kind {kind}: {reason}.")]
    Malformed {
        /// The frame's kind.
        kind: u16,
        /// Why decoding failed.
        reason: String,
    },
    /// A message could not be encoded (for example it is larger than a frame allows).
    #[error("Cannot encode message: {0}.")]
    Encode(String),
}

macro_rules! messages {
    ($(
        $(#[$meta:meta])*
        $kind:literal => $name:ident { $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)? }
    ),* $(,)?) => {
        /// A protocol message. See the module documentation for the conversation.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Message {
            $( $(#[$meta])* $name { $( $(#[$fmeta])* $field: $ty ),* }, )*
        }

        impl Message {
            /// The frame `kind` of this message.
            pub fn kind(&self) -> u16 {
                match self { $( Message::$name { .. } => $kind, )* }
            }

            /// The message's name, for diagnostics.
            pub fn name(&self) -> &'static str {
                match self { $( Message::$name { .. } => stringify!($name), )* }
            }

            fn encode_payload(&self) -> Result<Vec<u8>, ProtoError> {
                match self {
                    $( Message::$name { $( $field ),* } => {
                        bincode::serde::encode_to_vec(( $( $field, )* ), config())
                            .map_err(|e| ProtoError::Encode(e.to_string()))
                    } )*
                }
            }

            fn decode_payload(kind: u16, payload: &[u8]) -> Result<Message, ProtoError> {
                match kind {
                    $( $kind => {
                        #[allow(unused_parens)]
                        let (( $( $field, )* ), used): (( $( $ty, )* ), usize) =
                            bincode::serde::decode_from_slice(payload, config()).map_err(|e| {
                                ProtoError::Malformed { kind, reason: e.to_string() }
                            })?;
                        if used != payload.len() {
                            return Err(ProtoError::Malformed {
                                kind,
                                reason: format!("{} trailing bytes", payload.len() - used),
                            });
                        }
                        Ok(Message::$name { $( $field ),* })
                    } )*
                    other => Err(ProtoError::UnknownKind(other)),
                }
            }
        }
    };
}

messages! {
    /// Version negotiation; the first message in each direction.
    1 => Hello { min_version: u16, max_version: u16, role: Role },
    /// Binds the connection to a job; the agent remembers the first token.
    2 => Init { job_id: String, session_token: String },
    /// The agent accepted `Init`.
    3 => Initialized { job_id: String },
    /// Start a step. `cwd` is relative to the agent's workdir (or absolute); `None` means
    /// the workdir. The step gets exactly `env`. `timeout_ms` of 0 means no timeout.
    4 => ExecStart {
        exec_id: u64,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        timeout_ms: u64,
    },
    /// The agent started the step as process group `pid`.
    5 => ExecStarted { exec_id: u64, pid: u32 },
    /// A chunk of a step's output at byte `offset` of its combined output.
    6 => Output { exec_id: u64, stream: Stream, offset: u64, bytes: Vec<u8> },
    /// The step ended; sent after all of its output.
    7 => ExecExit {
        exec_id: u64,
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        total_bytes: u64,
    },
    /// Resend an exec's output from `from_offset`, then continue live, then `ExecExit`.
    8 => Resume { exec_id: u64, from_offset: u64 },
    /// The host durably stored the exec's output below `offset`.
    9 => Ack { exec_id: u64, offset: u64 },
    /// Stop a step: SIGINT, wait `grace_ms`, SIGTERM, wait `grace_ms`, SIGKILL.
    10 => Cancel { exec_id: u64, grace_ms: u64 },
    /// Flush all buffered output of this connection's execs; answered by `Drained`.
    11 => Drain {},
    /// Everything buffered when `Drain` arrived has been sent.
    12 => Drained {},
    /// Kill every remaining step and exit; answered by `PoweringOff`.
    13 => Poweroff {},
    /// The agent is about to kill its steps and exit.
    14 => PoweringOff {},
    /// Liveness probe.
    15 => Ping {},
    /// Answer to `Ping`.
    16 => Pong {},
    /// Something went wrong; `exec_id` names the exec it concerns, if any. Version 1's
    /// error, and every error sent before `Hello` agreed on a version: text only.
    17 => Error { exec_id: Option<u64>, message: String },
    /// Something went wrong (version 2 on): what, as a `code` to decide on, and a
    /// `message` for people; `exec_id` names the exec it concerns, if any.
    18 => Failure { exec_id: Option<u64>, code: ErrorCode, message: String },
    /// (Version 3.) List the regular files below the workdir that `patterns` match
    /// (relative globs: `*`, `?`, `**`; a pattern naming a directory matches the
    /// files below it), in name order, from after `after`. Answered by `FileList`.
    19 => ListFiles { patterns: Vec<String>, after: Option<String> },
    /// (Version 3.) Matching files `(path, size)` in name order; `more`: another
    /// page follows (ask again with `after` = the last path).
    20 => FileList { files: Vec<(String, u64)>, more: bool },
    /// (Version 3.) Read up to `len` bytes (at most [`MAX_FILE_CHUNK`]) of the file
    /// at `path` (relative to the workdir) from `offset`. Answered by `FileChunk`.
    21 => ReadFile { path: String, offset: u64, len: u32 },
    /// (Version 3.) The bytes of the file from `offset`; `eof`: they reach its end.
    22 => FileChunk { offset: u64, bytes: Vec<u8>, eof: bool },
}

impl Message {
    /// The protocol version that introduced this message's kind. A peer sends it
    /// only on a connection of that version or later.
    pub fn since_version(&self) -> u16 {
        match self {
            Message::Failure { .. } => FAILURE_VERSION,
            Message::ListFiles { .. }
            | Message::FileList { .. }
            | Message::ReadFile { .. }
            | Message::FileChunk { .. } => FILES_VERSION,
            _ => 1,
        }
    }

    /// An error for a connection speaking `version`: a [`Message::Failure`] with its
    /// code from [`FAILURE_VERSION`] on, else a kind 17 [`Message::Error`] with the
    /// message only.
    pub fn failure(
        version: u16,
        exec_id: Option<u64>,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Message {
        let message = message.into();
        if version >= FAILURE_VERSION {
            Message::Failure {
                exec_id,
                code,
                message,
            }
        } else {
            Message::Error { exec_id, message }
        }
    }

    /// The parts of an error message of either kind: `(exec_id, code, message)`; a
    /// kind 17 `Error` has [`ErrorCode::Unspecified`]. `None` for any other message.
    pub fn as_error(&self) -> Option<(Option<u64>, ErrorCode, &str)> {
        match self {
            Message::Error { exec_id, message } => {
                Some((*exec_id, ErrorCode::Unspecified, message.as_str()))
            }
            Message::Failure {
                exec_id,
                code,
                message,
            } => Some((*exec_id, *code, message.as_str())),
            _ => None,
        }
    }
}

/// Encodes `msg` as one complete frame.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, ProtoError> {
    let payload = msg.encode_payload()?;
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtoError::Encode(format!(
            "{} message payload of {} bytes exceeds the maximum of {MAX_PAYLOAD} bytes",
            msg.name(),
            payload.len()
        )));
    }
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    let len = u32::try_from(payload.len()).map_err(|e| ProtoError::Encode(e.to_string()))?;
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&FORMAT_BINCODE.to_be_bytes());
    frame.extend_from_slice(&msg.kind().to_be_bytes());
    frame.extend_from_slice(&payload);
    let crc = crc32c::crc32c(&frame[4..]);
    frame.extend_from_slice(&crc.to_be_bytes());
    Ok(frame)
}

/// Tries to decode one frame from the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some((message, used)))` when a
/// frame of `used` bytes was decoded, and an error for anything malformed. An oversized
/// length is reported as soon as the header is complete.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Message, usize)>, ProtoError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtoError::Oversized(len));
    }
    let total = HEADER_LEN + len + TRAILER_LEN;
    if buf.len() < total {
        return Ok(None);
    }
    let format = u16::from_be_bytes([buf[4], buf[5]]);
    let kind = u16::from_be_bytes([buf[6], buf[7]]);
    let body = &buf[4..HEADER_LEN + len];
    let t = &buf[HEADER_LEN + len..total];
    let expected = u32::from_be_bytes([t[0], t[1], t[2], t[3]]);
    let actual = crc32c::crc32c(body);
    if expected != actual {
        return Err(ProtoError::BadCrc { expected, actual });
    }
    if format != FORMAT_BINCODE {
        return Err(ProtoError::UnknownFormat(format));
    }
    let msg = Message::decode_payload(kind, &buf[HEADER_LEN..HEADER_LEN + len])?;
    Ok(Some((msg, total)))
}

/// Writes one frame for `msg` to `w` and flushes it.
pub fn write_message(w: &mut impl Write, msg: &Message) -> Result<(), ProtoError> {
    let frame = encode_frame(msg)?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Kind number of [`Message::Hello`] (for [`resync`]'s filters).
pub const KIND_HELLO: u16 = 1;
/// Kind number of [`Message::Error`].
pub const KIND_ERROR: u16 = 17;
/// Kind number of [`Message::Failure`].
pub const KIND_FAILURE: u16 = 18;
/// The largest payload a `Hello` can have (two varint `u16`s and the role), with room
/// to spare: what the agent allows a `Hello` candidate while it resynchronizes.
pub const HELLO_MAX_PAYLOAD: usize = 16;

/// What [`resync`] found in a buffer.
#[derive(Debug, PartialEq)]
pub enum Resync {
    /// A valid frame `len` bytes long, after `skip` bytes that start none.
    Frame {
        /// Bytes before the frame.
        skip: usize,
        /// The frame's length.
        len: usize,
        /// Its message.
        msg: Message,
    },
    /// No valid frame is complete yet. The first `skip` bytes cannot start one and
    /// may be dropped; a frame may still start at `skip` once more bytes arrive.
    NeedMore {
        /// Bytes that may be dropped.
        skip: usize,
    },
}

/// Whether `prefix` (the first bytes of a would-be frame, possibly fewer than a
/// header) could begin a frame of one of `kinds` with at most `max_payload` bytes.
fn plausible_header(prefix: &[u8], kinds: &[u16], max_payload: usize) -> bool {
    if prefix.len() >= 4 {
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        if usize::try_from(len).map_or(true, |l| l > max_payload) {
            return false;
        }
    }
    if prefix.len() >= 6 && u16::from_be_bytes([prefix[4], prefix[5]]) != FORMAT_BINCODE {
        return false;
    }
    prefix.len() < HEADER_LEN || kinds.contains(&u16::from_be_bytes([prefix[6], prefix[7]]))
}

/// Finds the first valid frame of one of `kinds`, with a payload of at most
/// `max_payload` bytes, anywhere in `buf`: the way back into the conversation on a
/// byte stream that may begin with garbage.
///
/// A virtio-serial port is one stream for a VM's whole life: a host that died
/// mid-frame leaves the rest of that frame to whoever reads next, and a peer's
/// writer may have sent part of a frame to a host that is gone. So a session's
/// first frame is searched for byte by byte: a plausible header (a length within
/// `max_payload`, the known format, a kind the reader waits for), then a CRC that
/// checks and a payload that decodes. The bounds keep garbage from stalling the
/// search: a candidate that claims more bytes than have arrived is passed over when
/// a complete valid frame follows it (the peer sent its first frame and now waits
/// for the answer, so nothing would ever complete the candidate), and only such a
/// candidate, at most `max_payload` plus the frame overhead from the end, is kept.
/// Never panics, whatever `buf` holds.
pub fn resync(buf: &[u8], kinds: &[u16], max_payload: usize) -> Resync {
    let mut incomplete = None;
    for skip in 0..buf.len() {
        let rest = &buf[skip..];
        if !plausible_header(&rest[..rest.len().min(HEADER_LEN)], kinds, max_payload) {
            continue;
        }
        if rest.len() < HEADER_LEN {
            incomplete.get_or_insert(skip);
            continue;
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let total = HEADER_LEN + len + TRAILER_LEN;
        if rest.len() < total {
            incomplete.get_or_insert(skip);
            continue;
        }
        if let Ok(Some((msg, used))) = decode_frame(&rest[..total]) {
            return Resync::Frame {
                skip,
                len: used,
                msg,
            };
        }
    }
    Resync::NeedMore {
        skip: incomplete.unwrap_or(buf.len()),
    }
}

/// Incremental frame reader keeping partial frames across reads (and read timeouts).
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// A reader with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A reader that starts with `bytes` already read (what followed the frame
    /// [`resync`] found).
    pub fn with_buffered(bytes: Vec<u8>) -> Self {
        Self { buf: bytes }
    }

    /// Decodes a frame already buffered, if there is a complete one.
    pub fn try_decode(&mut self) -> Result<Option<Message>, ProtoError> {
        match decode_frame(&self.buf)? {
            Some((msg, used)) => {
                self.buf.drain(..used);
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }

    /// Reads until one whole message is available.
    ///
    /// Returns `Ok(None)` if the read timed out (`WouldBlock`/`TimedOut`); buffered
    /// partial frames are kept for the next call. End of stream is
    /// [`ProtoError::Closed`].
    pub fn read_message(&mut self, r: &mut impl Read) -> Result<Option<Message>, ProtoError> {
        loop {
            if let Some(msg) = self.try_decode()? {
                return Ok(Some(msg));
            }
            if !read_some(r, &mut self.buf)? {
                return Ok(None);
            }
        }
    }
}

/// One read from `r` appended to `buf` (retried when a signal interrupts it):
/// true when bytes came, false when the read timed out (a socket's read timeout,
/// or nothing to read on a non-blocking one). End of stream is
/// [`ProtoError::Closed`].
pub fn read_some(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<bool, ProtoError> {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match r.read(&mut chunk) {
            Ok(0) => return Err(ProtoError::Closed),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(true);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(ProtoError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                min_version: 1,
                max_version: 3,
                role: Role::Host,
            },
            Message::Init {
                job_id: "j".into(),
                session_token: "t".into(),
            },
            Message::ExecStart {
                exec_id: 7,
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("sub".into()),
                timeout_ms: 100,
            },
            Message::Output {
                exec_id: 7,
                stream: Stream::Stderr,
                offset: 12,
                bytes: vec![0xff, 0xfe, 0, 1],
            },
            Message::ExecExit {
                exec_id: 7,
                code: None,
                signal: Some(9),
                timed_out: true,
                total_bytes: 99,
            },
            Message::Drain {},
            Message::Pong {},
            Message::Error {
                exec_id: None,
                message: "x".into(),
            },
            Message::Failure {
                exec_id: Some(7),
                code: ErrorCode::ExecExists,
                message: "y".into(),
            },
            Message::Failure {
                exec_id: None,
                code: ErrorCode::Other(999),
                message: String::new(),
            },
            Message::ListFiles {
                patterns: vec!["dist/*.tar.gz".into(), "**/report.xml".into()],
                after: Some("dist/a.tar.gz".into()),
            },
            Message::FileList {
                files: vec![("dist/b.tar.gz".into(), 1 << 33), ("report.xml".into(), 0)],
                more: true,
            },
            Message::ReadFile {
                path: "dist/b.tar.gz".into(),
                offset: 1 << 33,
                len: MAX_FILE_CHUNK as u32,
            },
            Message::FileChunk {
                offset: 7,
                bytes: vec![0, 1, 0xff],
                eof: true,
            },
        ]
    }

    #[test]
    fn error_frames_are_byte_exact() {
        // Kind 17 keeps its version-1 layout; kind 18 adds the code as a varint u16.
        let error = Message::Error {
            exec_id: Some(7),
            message: "hi".into(),
        };
        let failure = Message::Failure {
            exec_id: Some(7),
            code: ErrorCode::ExecExists,
            message: "hi".into(),
        };
        let golden: [(&Message, &[u8]); 2] = [
            (
                &error,
                &[
                    0, 0, 0, 5, 0, 1, 0, 17, 1, 7, 2, b'h', b'i', 0xb7, 0x67, 0x65, 0xd8,
                ],
            ),
            (
                &failure,
                &[
                    0, 0, 0, 6, 0, 1, 0, 18, 1, 7, 5, 2, b'h', b'i', 0xf1, 0x0c, 0x87, 0x1e,
                ],
            ),
        ];
        for (msg, bytes) in golden {
            assert_eq!(encode_frame(msg).unwrap(), bytes, "{msg:?}");
        }
    }

    #[test]
    fn file_messages_are_version_3_and_byte_exact() {
        for m in &samples()[samples().len() - 4..] {
            assert_eq!(m.since_version(), FILES_VERSION, "{m:?}");
        }
        let read = Message::ReadFile {
            path: "a".into(),
            offset: 2,
            len: 3,
        };
        assert_eq!(
            encode_frame(&read).unwrap(),
            [
                0, 0, 0, 4, 0, 1, 0, 21, 1, b'a', 2, 3, 0xd9, 0x6d, 0xae, 0x9c
            ]
        );
        // The largest chunk with the longest offset fits in a frame.
        let chunk = Message::FileChunk {
            offset: u64::MAX,
            bytes: vec![0; MAX_FILE_CHUNK],
            eof: false,
        };
        assert!(encode_frame(&chunk).is_ok());
    }

    #[test]
    fn error_code_numbers_are_frozen() {
        let codes = [
            (ErrorCode::Unspecified, 0),
            (ErrorCode::BadFrame, 1),
            (ErrorCode::UnexpectedMessage, 2),
            (ErrorCode::NotInitialized, 3),
            (ErrorCode::WrongSession, 4),
            (ErrorCode::ExecExists, 5),
            (ErrorCode::SpawnFailed, 6),
            (ErrorCode::UnknownExec, 7),
            (ErrorCode::OutputLost, 8),
            (ErrorCode::OutputDropped, 9),
            (ErrorCode::OffsetPastEnd, 10),
            (ErrorCode::BadPattern, 11),
            (ErrorCode::FileRefused, 12),
            (ErrorCode::FileUnreadable, 13),
        ];
        for (code, n) in codes {
            assert_eq!(code.number(), n, "{code:?}");
            assert_eq!(ErrorCode::from_number(n), code);
        }
        // A code from a newer peer is kept, not refused.
        assert_eq!(ErrorCode::from_number(14), ErrorCode::Other(14));
        assert_eq!(ErrorCode::Other(14).number(), 14);
    }

    #[test]
    fn an_error_takes_the_form_of_the_connections_version() {
        let v1 = Message::failure(1, Some(3), ErrorCode::UnknownExec, "Unknown exec 3.");
        assert_eq!(
            v1,
            Message::Error {
                exec_id: Some(3),
                message: "Unknown exec 3.".into(),
            }
        );
        assert_eq!(v1.since_version(), 1);
        assert_eq!(
            v1.as_error(),
            Some((Some(3), ErrorCode::Unspecified, "Unknown exec 3."))
        );
        let v2 = Message::failure(2, Some(3), ErrorCode::UnknownExec, "Unknown exec 3.");
        assert_eq!(
            v2,
            Message::Failure {
                exec_id: Some(3),
                code: ErrorCode::UnknownExec,
                message: "Unknown exec 3.".into(),
            }
        );
        assert_eq!(v2.since_version(), FAILURE_VERSION);
        assert_eq!(
            v2.as_error(),
            Some((Some(3), ErrorCode::UnknownExec, "Unknown exec 3."))
        );
        assert_eq!(Message::Ping {}.as_error(), None);
    }

    #[test]
    fn round_trip() {
        for msg in samples() {
            let frame = encode_frame(&msg).unwrap();
            assert_eq!(&frame[4..6], &FORMAT_BINCODE.to_be_bytes());
            let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
            assert_eq!(frame.len(), HEADER_LEN + len + TRAILER_LEN);
            // Every strict prefix needs more bytes.
            for cut in 0..frame.len() {
                assert!(decode_frame(&frame[..cut]).unwrap().is_none());
            }
            let (back, used) = decode_frame(&frame).unwrap().unwrap();
            assert_eq!(used, frame.len());
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn frame_reader_handles_concatenated_frames() {
        let mut bytes = Vec::new();
        for msg in samples() {
            bytes.extend(encode_frame(&msg).unwrap());
        }
        let mut r = FrameReader::new();
        let mut cursor = io::Cursor::new(bytes);
        let mut got = Vec::new();
        loop {
            match r.read_message(&mut cursor) {
                Ok(Some(m)) => got.push(m),
                Err(ProtoError::Closed) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, samples());
    }

    #[test]
    fn bad_crc_oversized_unknown() {
        let mut frame = encode_frame(&Message::Ping {}).unwrap();
        let last = frame.len() - 1;
        frame[last] ^= 1;
        assert!(matches!(
            decode_frame(&frame),
            Err(ProtoError::BadCrc { .. })
        ));

        let mut big = Vec::new();
        big.extend_from_slice(&((MAX_PAYLOAD as u32) + 1).to_be_bytes());
        big.extend_from_slice(&[0, 1, 0, 1]);
        assert!(matches!(decode_frame(&big), Err(ProtoError::Oversized(_))));

        let mut unknown = Vec::new();
        unknown.extend_from_slice(&0u32.to_be_bytes());
        unknown.extend_from_slice(&FORMAT_BINCODE.to_be_bytes());
        unknown.extend_from_slice(&999u16.to_be_bytes());
        let crc = crc32c::crc32c(&unknown[4..]);
        unknown.extend_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            decode_frame(&unknown),
            Err(ProtoError::UnknownKind(999))
        ));

        let too_big = Message::Output {
            exec_id: 1,
            stream: Stream::Stdout,
            offset: 0,
            bytes: vec![0; MAX_PAYLOAD + 1],
        };
        assert!(matches!(encode_frame(&too_big), Err(ProtoError::Encode(_))));
    }

    fn host_hello() -> Message {
        Message::Hello {
            min_version: 1,
            max_version: 2,
            role: Role::Host,
        }
    }

    /// Runs `resync` for a host's `Hello` as the agent does, feeding `bytes` in
    /// pieces of `step`: the frame found and the bytes left after it.
    fn agent_resync(bytes: &[u8], step: usize) -> Option<(Message, Vec<u8>)> {
        let mut buf = Vec::new();
        for piece in bytes.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match resync(&buf, &[KIND_HELLO], HELLO_MAX_PAYLOAD) {
                    Resync::Frame { skip, len, msg } => {
                        if matches!(
                            msg,
                            Message::Hello {
                                role: Role::Host,
                                ..
                            }
                        ) {
                            return Some((msg, buf[skip + len..].to_vec()));
                        }
                        buf.drain(..skip + len);
                    }
                    Resync::NeedMore { skip } => {
                        buf.drain(..skip);
                        break;
                    }
                }
            }
            assert!(buf.len() < HEADER_LEN + HELLO_MAX_PAYLOAD + TRAILER_LEN);
        }
        None
    }

    #[test]
    fn kind_constants_match_the_messages() {
        assert_eq!(host_hello().kind(), KIND_HELLO);
        let e = Message::Error {
            exec_id: None,
            message: String::new(),
        };
        assert_eq!(e.kind(), KIND_ERROR);
        let f = Message::failure(2, None, ErrorCode::BadFrame, "");
        assert_eq!(f.kind(), KIND_FAILURE);
        assert!(
            encode_frame(&host_hello()).unwrap().len()
                <= HEADER_LEN + HELLO_MAX_PAYLOAD + TRAILER_LEN
        );
        let widest = Message::Hello {
            min_version: u16::MAX,
            max_version: u16::MAX,
            role: Role::Agent,
        };
        let len = encode_frame(&widest).unwrap().len() - HEADER_LEN - TRAILER_LEN;
        assert!(len <= HELLO_MAX_PAYLOAD, "{len}");
    }

    /// What a host that died mid-frame, or a writer cut off, leaves before the next
    /// host's `Hello`: the `Hello` is found behind each, fed whole or byte by byte,
    /// and what follows it is kept.
    #[test]
    fn resync_finds_the_hello_behind_garbage_and_torn_frames() {
        let hello = encode_frame(&host_hello()).unwrap();
        let init = encode_frame(&Message::Init {
            job_id: "j".into(),
            session_token: "t".into(),
        })
        .unwrap();
        let ack = encode_frame(&Message::Ack {
            exec_id: 1,
            offset: 9,
        })
        .unwrap();
        let mut bad_crc = hello.clone();
        let last = bad_crc.len() - 1;
        bad_crc[last] ^= 0x55;
        let prefixes: Vec<(&str, Vec<u8>)> = vec![
            ("nothing", vec![]),
            ("garbage", b"\x00\xff garbage \x02\x21\x4c\x18".to_vec()),
            ("a torn Hello", hello[..hello.len() - 3].to_vec()),
            ("a Hello header alone", hello[..HEADER_LEN].to_vec()),
            ("a Hello with a bad CRC", bad_crc),
            ("a whole Ack", ack.clone()),
            ("a torn Ack", ack[..5].to_vec()),
            ("zeros", vec![0; 100]),
            (
                "a header claiming the largest payload",
                [&(MAX_PAYLOAD as u32).to_be_bytes()[..], &[0, 1, 0, 1]].concat(),
            ),
        ];
        for (what, prefix) in prefixes {
            let mut bytes = prefix.clone();
            bytes.extend_from_slice(&hello);
            bytes.extend_from_slice(&init);
            for step in [1, 3, bytes.len()] {
                let (msg, rest) = agent_resync(&bytes, step)
                    .unwrap_or_else(|| panic!("no Hello after {what} (step {step})"));
                assert_eq!(msg, host_hello(), "{what}");
                // Fed whole, everything after the Hello is left for the session.
                if step == bytes.len() {
                    assert_eq!(rest, init, "{what}");
                }
            }
        }
    }

    #[test]
    fn resync_reports_where_a_candidate_may_start() {
        let hello = encode_frame(&host_hello()).unwrap();
        assert_eq!(resync(&[], &[KIND_HELLO], 16), Resync::NeedMore { skip: 0 });
        // Bytes that cannot begin a Hello header are dropped; a possible start kept.
        let mut buf = vec![0xff; 10];
        buf.extend_from_slice(&hello[..5]);
        assert_eq!(
            resync(&buf, &[KIND_HELLO], 16),
            Resync::NeedMore { skip: 10 }
        );
        // A frame of a kind not waited for is skipped over like garbage.
        let ping = encode_frame(&Message::Ping {}).unwrap();
        assert_eq!(
            resync(&ping, &[KIND_HELLO], 16),
            Resync::NeedMore {
                skip: ping.len() - 3
            }
        );
    }

    #[test]
    fn resync_never_panics_on_crafted_bytes() {
        let mut state: u64 = 0x1234_5678_9abc_def1;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let hello = encode_frame(&host_hello()).unwrap();
        for i in 0..5_000 {
            let len = (next() % 80) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 3 == 0 {
                // Plausible headers with lengths near the bounds.
                let n = [0u32, 1, 15, 16, 17, u32::MAX][(next() % 6) as usize];
                buf.splice(0..0, [&n.to_be_bytes()[..], &[0, 1, 0, 1]].concat());
            }
            if i % 2 == 0 {
                let at = (next() as usize) % (buf.len() + 1);
                buf.splice(at..at, hello.iter().copied());
            }
            for kinds in [&[KIND_HELLO][..], &[KIND_HELLO, KIND_ERROR, KIND_FAILURE]] {
                for max in [0, 16, MAX_PAYLOAD, usize::MAX] {
                    match resync(&buf, kinds, max) {
                        Resync::Frame { skip, len, .. } => assert!(skip + len <= buf.len()),
                        Resync::NeedMore { skip } => assert!(skip <= buf.len()),
                    }
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift64*: deterministic pseudo-random inputs.
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let valid: Vec<Vec<u8>> = samples().iter().map(|m| encode_frame(m).unwrap()).collect();
        for i in 0..20_000 {
            let mut buf = if i % 2 == 0 {
                let len = (next() % 64) as usize;
                (0..len).map(|_| next() as u8).collect::<Vec<u8>>()
            } else {
                valid[(next() as usize) % valid.len()].clone()
            };
            // Corrupt a few bytes, then fix up the CRC half of the time so the payload
            // decoder itself sees garbage.
            if !buf.is_empty() {
                for _ in 0..(1 + next() % 3) {
                    let at = (next() as usize) % buf.len();
                    buf[at] = next() as u8;
                }
            }
            if i % 4 == 1 && buf.len() >= HEADER_LEN + TRAILER_LEN {
                let n = buf.len() - TRAILER_LEN;
                let len = (n - HEADER_LEN) as u32;
                buf[..4].copy_from_slice(&len.to_be_bytes());
                buf[4..6].copy_from_slice(&FORMAT_BINCODE.to_be_bytes());
                let crc = crc32c::crc32c(&buf[4..n]);
                buf[n..].copy_from_slice(&crc.to_be_bytes());
            }
            let _ = decode_frame(&buf);
        }
    }
}
