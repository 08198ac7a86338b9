//! Step output, stored in plain append-only files beside the sled log.
//!
//! One file per step: `<state dir>/output/<job>/<step>.out`, a sequence of
//! frames:
//!
//! ```text
//!  0       2        3        7        15              15+n     19+n
//!  +-------+--------+--------+--------+---------------+--------+
//!  | "RO"  | stream | len n  | offset | bytes         | crc32c |
//!  | u16BE | u8     | u32 BE | u64 BE | (n bytes)     | u32 BE |
//!  +-------+--------+--------+--------+---------------+--------+
//!           crc32c covers everything from the magic to the bytes
//! ```
//!
//! `offset` is the position of the first byte in the step's combined output;
//! frames follow each other without gap or overlap (the log's writer trims
//! re-sent bytes and refuses gaps before it writes). `stream` is 0 for stdout,
//! 1 for stderr. A frame is at most [`MAX_FRAME_BYTES`] of output.
//!
//! Why not a sled tree (the starting design): measured with a step printing
//! 200 MiB, sled kept ~150 MiB of it in the engine's memory whatever its cache
//! size, and slowed as the tree grew (leaf nodes of up to 16 chunks are rewritten
//! as they consolidate). Plain files cost what the disk costs, are read without
//! opening sled (so offline tools read them in place), and keep the same
//! guarantees: the writer syncs them before it acknowledges, and every frame
//! carries its CRC.
//!
//! A torn last frame (a crash in the middle of a write that was never
//! acknowledged) is cut when the writer next opens the file.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::model::event::JobId;

const MAGIC: [u8; 2] = *b"RO";
const HEAD: usize = 15;
const TAIL: usize = 4;

/// The most output bytes one frame holds.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// The directory under the state directory.
pub const DIR_NAME: &str = "output";

/// Which stream a chunk of output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A stored piece of a step's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// Byte offset of the first byte in the step's combined output.
    pub offset: u64,
    /// Which stream.
    pub stream: Stream,
    /// The bytes, exactly as the step wrote them (after secret masking).
    pub bytes: Vec<u8>,
}

impl Stream {
    /// The stream's byte in a frame header.
    pub fn byte(self) -> u8 {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }

    /// The stream a frame header's byte names (anything but 0 is stderr).
    pub fn from_byte(b: u8) -> Stream {
        if b == 0 {
            Stream::Stdout
        } else {
            Stream::Stderr
        }
    }
}

/// One frame as read back: `(offset, stream byte, bytes)`.
pub type Frame = (u64, u8, Vec<u8>);

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame's checksum does not match, or its header is impossible.
    #[error("damaged frame at byte {at} of the file")]
    Damaged {
        /// Position in the file.
        at: u64,
    },
    /// The file ends in the middle of a frame.
    #[error("the file ends inside a frame at byte {at}")]
    Torn {
        /// Position in the file.
        at: u64,
    },
}

/// Encodes one frame.
pub fn frame(offset: u64, stream: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD + bytes.len() + TAIL);
    out.extend_from_slice(&MAGIC);
    out.push(stream);
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(bytes);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Parses the frames of a whole file. Returns the frames that check out, in
/// order, the byte length they cover, and the error that stopped the parse.
pub fn parse(buf: &[u8]) -> (Vec<Frame>, u64, Option<FrameError>) {
    let mut frames = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let at = pos as u64;
        let rest = &buf[pos..];
        if rest.len() < HEAD + TAIL {
            return (frames, at, Some(FrameError::Torn { at }));
        }
        if rest[..2] != MAGIC || rest[2] > 1 {
            return (frames, at, Some(FrameError::Damaged { at }));
        }
        let n = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]) as usize;
        if n > MAX_FRAME_BYTES {
            return (frames, at, Some(FrameError::Damaged { at }));
        }
        if rest.len() < HEAD + n + TAIL {
            return (frames, at, Some(FrameError::Torn { at }));
        }
        let body = &rest[..HEAD + n];
        let crc = u32::from_be_bytes([
            rest[HEAD + n],
            rest[HEAD + n + 1],
            rest[HEAD + n + 2],
            rest[HEAD + n + 3],
        ]);
        if crc32c::crc32c(body) != crc {
            return (frames, at, Some(FrameError::Damaged { at }));
        }
        let mut off = [0u8; 8];
        off.copy_from_slice(&rest[7..15]);
        frames.push((
            u64::from_be_bytes(off),
            rest[2],
            rest[HEAD..HEAD + n].to_vec(),
        ));
        pos += HEAD + n + TAIL;
    }
    (frames, pos as u64, None)
}

/// The path of a step's output file.
pub fn path(dir: &Path, job: JobId, step: u32) -> PathBuf {
    dir.join(job.to_string()).join(format!("{step}.out"))
}

/// Reads a step's file whole; a missing file is no output.
pub fn read(dir: &Path, job: JobId, step: u32) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    match File::open(path(dir, job, step)) {
        Ok(mut f) => {
            f.read_to_end(&mut buf)?;
            Ok(buf)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(buf),
        Err(e) => Err(e),
    }
}

/// A step's file, open for appending.
#[derive(Debug)]
pub struct Appender {
    file: File,
    /// Bytes of the file that hold whole frames.
    len: u64,
    /// The stream offset after the last frame.
    end: u64,
}

impl Appender {
    /// The stream offset the next frame starts at.
    pub fn end(&self) -> u64 {
        self.end
    }
}

/// The writer's open output files.
#[derive(Debug, Default)]
pub struct Appenders {
    dir: PathBuf,
    open: HashMap<(JobId, u32), Arc<Mutex<Appender>>>,
}

impl Appenders {
    /// Appenders for files under `dir`.
    pub fn new(dir: PathBuf) -> Appenders {
        Appenders {
            dir,
            open: HashMap::new(),
        }
    }

    /// The open file of a step, opening (and creating) it on first use. A torn
    /// last frame, never acknowledged, is cut.
    pub fn get(&mut self, job: JobId, step: u32) -> std::io::Result<Arc<Mutex<Appender>>> {
        if let Some(a) = self.open.get(&(job, step)) {
            return Ok(a.clone());
        }
        let p = path(&self.dir, job, step);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let (frames, len, stopped) = parse(&buf);
        if let Some(e) = stopped {
            tracing::warn!(file = %p.display(), error = %e, "output file cut after its last whole frame");
            file.set_len(len)?;
        }
        let end = frames.last().map_or(0, |(off, _, b)| off + b.len() as u64);
        let a = Arc::new(Mutex::new(Appender { file, len, end }));
        self.open.insert((job, step), a.clone());
        Ok(a)
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Forgets the files of a job that ended.
    pub fn close_job(&mut self, job: JobId) {
        self.open.retain(|(j, _), _| *j != job);
    }
}

/// Appends `frames` (already encoded, for one file) and returns the new end;
/// syncs if asked.
pub fn append(a: &Mutex<Appender>, bytes: &[u8], new_end: u64, sync: bool) -> std::io::Result<()> {
    let mut a = a.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    a.file.write_all_at(bytes, a.len)?;
    if sync {
        a.file.sync_data()?;
    }
    a.len += bytes.len() as u64;
    a.end = new_end;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_stops_the_parse() {
        let mut buf = frame(0, 0, b"hello ");
        let second = buf.len();
        buf.extend(frame(6, 1, b"\xffworld"));
        let (frames, len, err) = parse(&buf);
        assert_eq!(err, None);
        assert_eq!(len, buf.len() as u64);
        assert_eq!(frames[1], (6, 1, b"\xffworld".to_vec()));
        let mut torn = buf.clone();
        torn.truncate(buf.len() - 2);
        let (frames, len, err) = parse(&torn);
        assert_eq!((frames.len(), len), (1, second as u64));
        assert_eq!(err, Some(FrameError::Torn { at: second as u64 }));
        buf[second + 17] ^= 1;
        assert_eq!(
            parse(&buf).2,
            Some(FrameError::Damaged { at: second as u64 })
        );
    }
}
