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
//! A torn last frame (a crash or a full disk in the middle of a write that
//! was never acknowledged) is cut when the writer next opens the file: when a
//! resumed step stores more output, or when an engine opens the log and the
//! step's job is still live. The file's end is found from its tail
//! ([`find_end`]), and readers go through it frame by frame ([`FrameReader`]):
//! neither holds more than one frame, whatever the file's size.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::durable;
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

/// A stored chunk as `reel output --json` prints it and the API's
/// `logs?format=chunks` sends it: step (from 1), stream, offset, length and
/// the bytes — as `text` when they are UTF-8, else as `bytes_hex`.
#[derive(Debug, Serialize)]
pub struct ChunkView<'a> {
    /// The step, numbered from 1.
    pub step: u32,
    /// Which stream.
    pub stream: Stream,
    /// Byte offset in the step's combined output.
    pub offset: u64,
    /// How many bytes.
    pub len: usize,
    /// The bytes, when they are UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    /// The bytes in hex, when they are not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_hex: Option<String>,
}

impl OutputChunk {
    /// The chunk as [`ChunkView`]; `index` is the step's index (from 0).
    pub fn view(&self, index: u32) -> ChunkView<'_> {
        let text = std::str::from_utf8(&self.bytes).ok();
        ChunkView {
            step: index + 1,
            stream: self.stream,
            offset: self.offset,
            len: self.bytes.len(),
            text,
            bytes_hex: text
                .is_none()
                .then(|| self.bytes.iter().map(|b| format!("{b:02x}")).collect()),
        }
    }
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

/// Checks a frame header: `Ok(Some((stream, len, offset)))` for a plausible
/// header, `Ok(None)` if it is not one.
fn header(head: &[u8; HEAD]) -> Option<(u8, usize, u64)> {
    if head[..2] != MAGIC || head[2] > 1 {
        return None;
    }
    let n = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
    if n > MAX_FRAME_BYTES {
        return None;
    }
    let mut off = [0u8; 8];
    off.copy_from_slice(&head[7..15]);
    Some((head[2], n, u64::from_be_bytes(off)))
}

/// Why reading frames stopped early.
#[derive(Debug)]
pub enum ReadError {
    /// The file's bytes are not a valid frame there.
    Frame(FrameError),
    /// Reading the file failed.
    Io(std::io::Error),
}

/// Bytes read ahead from an output file: enough for many small frames in one
/// read, while a large frame's bytes are read straight into its own buffer.
const READ_AHEAD: usize = 64 * 1024;

/// Reads a step's output file frame by frame, holding one frame at a time
/// (at most [`MAX_FRAME_BYTES`] of output) whatever the file's size.
#[derive(Debug)]
pub struct FrameReader {
    file: BufReader<File>,
    /// Where the next frame starts.
    pos: u64,
    len: u64,
    done: bool,
    /// Whether the frames before the first `from` asked for were stepped over.
    skipped: bool,
}

impl FrameReader {
    /// Reads `file` from its start.
    pub fn new(file: File) -> std::io::Result<FrameReader> {
        let len = file.metadata()?.len();
        Ok(FrameReader {
            file: BufReader::with_capacity(READ_AHEAD, file),
            pos: 0,
            len,
            done: false,
            skipped: false,
        })
    }

    /// Steps over the frames wholly before `from` by their headers alone, one
    /// positioned read of a header each, without reading (or checking) their
    /// bytes: reading the last page of a large output touches its headers,
    /// not every byte before it. Stops at the first header that is not whole
    /// or not plausible, where [`FrameReader::step`] reports it.
    fn skip_before(&mut self, from: u64) -> std::io::Result<()> {
        let mut pos = self.pos;
        let mut head = [0u8; HEAD];
        while self.len - pos >= (HEAD + TAIL) as u64 {
            self.file.get_ref().read_exact_at(&mut head, pos)?;
            let Some((_, n, offset)) = header(&head) else {
                break;
            };
            let whole = (HEAD + n + TAIL) as u64;
            if offset + n as u64 > from || self.len - pos < whole {
                break;
            }
            pos += whole;
        }
        if pos != self.pos {
            self.file.seek(SeekFrom::Start(pos))?;
            self.pos = pos;
        }
        Ok(())
    }

    /// Where the next frame starts (after the last one read, once stopped:
    /// where the bad bytes begin).
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// The next frame whose output reaches past stream offset `from`; frames
    /// wholly before it are stepped over by their headers, without reading
    /// (or checking) their bytes. `None` at the end of the file; after an
    /// error, every later call returns `None`.
    pub fn next_from(&mut self, from: u64) -> Option<Result<Frame, ReadError>> {
        if !self.skipped && !self.done {
            self.skipped = true;
            if let Err(e) = self.skip_before(from) {
                self.done = true;
                return Some(Err(ReadError::Io(e)));
            }
        }
        while !self.done && self.pos < self.len {
            match self.step(from) {
                Ok(Some(f)) => return Some(Ok(f)),
                Ok(None) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }

    /// Reads one frame: `Some` if it reaches past `from`, `None` if skipped.
    fn step(&mut self, from: u64) -> Result<Option<Frame>, ReadError> {
        let at = self.pos;
        let torn = ReadError::Frame(FrameError::Torn { at });
        if self.len - at < (HEAD + TAIL) as u64 {
            return Err(torn);
        }
        let mut head = [0u8; HEAD];
        self.file.read_exact(&mut head).map_err(ReadError::Io)?;
        let (stream, n, offset) =
            header(&head).ok_or(ReadError::Frame(FrameError::Damaged { at }))?;
        let whole = (HEAD + n + TAIL) as u64;
        if self.len - at < whole {
            return Err(torn);
        }
        if offset + n as u64 <= from {
            self.file
                .seek_relative((n + TAIL) as i64)
                .map_err(ReadError::Io)?;
            self.pos += whole;
            return Ok(None);
        }
        let mut bytes = vec![0u8; n + TAIL];
        self.file.read_exact(&mut bytes).map_err(ReadError::Io)?;
        let crc = u32::from_be_bytes([bytes[n], bytes[n + 1], bytes[n + 2], bytes[n + 3]]);
        bytes.truncate(n);
        let mut sum = crc32c::crc32c(&head);
        sum = crc32c::crc32c_append(sum, &bytes);
        if sum != crc {
            return Err(ReadError::Frame(FrameError::Damaged { at }));
        }
        self.pos += whole;
        Ok(Some((offset, stream, bytes)))
    }
}

/// Where a step's file ends: what [`find_end`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// Bytes of the file that hold whole frames (the rest is to be cut).
    pub len: u64,
    /// The stream offset after the last whole frame: the next one to write.
    pub end: u64,
    /// Why the bytes after `len` are not a frame, if there are any.
    pub stopped: Option<FrameError>,
}

/// Finds where a step's output ends, reading from the file's tail in bounded
/// memory.
///
/// A file the writer left whole ends with a frame that ends exactly at the
/// file's end, starts at most one frame's length before it, and sits where
/// the frames before it put it (each frame adds its length plus 19 bytes of
/// header and CRC to the file, and its length to the stream, so a frame at
/// file position `p` with stream offset `o` has `p - o` a multiple of 19).
/// The search goes back from the end for such a frame whose CRC checks; the
/// nearest is the last frame. Only if there is none — the last write was torn
/// or the tail is damaged — is the file read from its start, frame by frame,
/// to find exactly where its last whole frame ends (memory stays one frame).
pub fn find_end(file: &File) -> std::io::Result<Tail> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Tail {
            len: 0,
            end: 0,
            stopped: None,
        });
    }
    if let Some(end) = last_frame_end(file, len)? {
        return Ok(Tail {
            len,
            end,
            stopped: None,
        });
    }
    let mut frames = FrameReader::new(file.try_clone()?)?;
    let mut end = 0;
    loop {
        match frames.next_from(0) {
            None => {
                return Ok(Tail {
                    len: frames.pos(),
                    end,
                    stopped: None,
                });
            }
            Some(Ok((offset, _, bytes))) => end = offset + bytes.len() as u64,
            Some(Err(ReadError::Frame(e))) => {
                return Ok(Tail {
                    len: frames.pos(),
                    end,
                    stopped: Some(e),
                });
            }
            Some(Err(ReadError::Io(e))) => return Err(e),
        }
    }
}

/// The stream end after the frame that ends exactly at `len`, found by
/// scanning back from the end; `None` if no frame ends there.
fn last_frame_end(file: &File, len: u64) -> std::io::Result<Option<u64>> {
    let overhead = (HEAD + TAIL) as u64;
    let lowest = len.saturating_sub(overhead + MAX_FRAME_BYTES as u64);
    let mut block = vec![0u8; READ_AHEAD + HEAD];
    // Blocks overlap by a header's length, so a header that straddles two
    // blocks is read whole from the lower one.
    let mut hi = len;
    while hi > lowest {
        let lo = hi.saturating_sub(READ_AHEAD as u64).max(lowest);
        let upto = (hi + HEAD as u64).min(len);
        let buf = &mut block[..(upto - lo) as usize];
        file.read_exact_at(buf, lo)?;
        let mut i = (hi - lo) as usize;
        while i > 0 {
            i -= 1;
            if buf[i] != MAGIC[0] || buf.get(i + 1) != Some(&MAGIC[1]) {
                continue;
            }
            let p = lo + i as u64;
            let mut head = [0u8; HEAD];
            match buf.get(i..i + HEAD) {
                Some(h) => head.copy_from_slice(h),
                None => continue,
            }
            let Some((_, n, offset)) = header(&head) else {
                continue;
            };
            let ends_at_len = p + overhead + n as u64 == len;
            let in_place = p >= offset && (p - offset).is_multiple_of(overhead);
            if ends_at_len && in_place && crc_checks(file, p, n)? {
                return Ok(Some(offset + n as u64));
            }
        }
        hi = lo;
    }
    Ok(None)
}

/// Whether the frame at `p` with `n` bytes of output has a matching CRC,
/// read in bounded pieces.
fn crc_checks(file: &File, p: u64, n: usize) -> std::io::Result<bool> {
    let body = (HEAD + n) as u64;
    let mut piece = vec![0u8; READ_AHEAD];
    let mut sum = 0u32;
    let mut at = 0u64;
    while at < body {
        let take = (body - at).min(READ_AHEAD as u64) as usize;
        file.read_exact_at(&mut piece[..take], p + at)?;
        sum = crc32c::crc32c_append(sum, &piece[..take]);
        at += take as u64;
    }
    let mut crc = [0u8; TAIL];
    file.read_exact_at(&mut crc, p + body)?;
    Ok(sum == u32::from_be_bytes(crc))
}

/// The path of a step's output file.
pub fn path(dir: &Path, job: JobId, step: u32) -> PathBuf {
    dir.join(job.to_string()).join(format!("{step}.out"))
}

/// Opens a step's file for reading; `None` if there is none (no output).
pub fn open(dir: &Path, job: JobId, step: u32) -> std::io::Result<Option<File>> {
    match File::open(path(dir, job, step)) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A step's file, open for appending.
#[derive(Debug)]
pub struct Appender {
    /// Shared with the writer's sync stage, which syncs it without the lock.
    file: Arc<File>,
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
    /// Sync each new file's and directory's parent before it is used.
    sync: bool,
    open: HashMap<(JobId, u32), Arc<Mutex<Appender>>>,
}

impl Appenders {
    /// Appenders for files under `dir`; with `sync`, each file and directory
    /// they create has its parent directory synced before it is written.
    pub fn new(dir: PathBuf, sync: bool) -> Appenders {
        Appenders {
            dir,
            sync,
            open: HashMap::new(),
        }
    }

    /// The open file of a step, opening (and creating) it on first use. Its
    /// end is found from its tail ([`find_end`]); a torn last frame, never
    /// acknowledged, is cut.
    pub fn get(&mut self, job: JobId, step: u32) -> std::io::Result<Arc<Mutex<Appender>>> {
        if let Some(a) = self.open.get(&(job, step)) {
            return Ok(a.clone());
        }
        let p = path(&self.dir, job, step);
        if let Some(parent) = p.parent() {
            durable::create_dir_all(parent, self.sync)?;
        }
        let (file, _) = durable::open_or_create(&p, self.sync)?;
        let tail = find_end(&file)?;
        if let Some(e) = &tail.stopped {
            tracing::warn!(
                file = %p.display(),
                error = %e,
                "output file cut after its last whole frame ({} bytes; the cut bytes were never acknowledged)",
                tail.len
            );
            file.set_len(tail.len)?;
        }
        let a = Arc::new(Mutex::new(Appender {
            file: Arc::new(file),
            len: tail.len,
            end: tail.end,
        }));
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

/// Appends `frames` (already encoded, for one file) and moves the file's
/// end to `new_end`. Not synced: returns the file, for the caller to sync
/// before it acknowledges the frames.
pub fn write(a: &Mutex<Appender>, bytes: &[u8], new_end: u64) -> std::io::Result<Arc<File>> {
    let mut a = a.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    a.file.write_all_at(bytes, a.len)?;
    a.len += bytes.len() as u64;
    a.end = new_end;
    Ok(a.file.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let file = File::open(f.path()).unwrap();
        (f, file)
    }

    fn read_all(bytes: &[u8], from: u64) -> (Vec<Frame>, Option<FrameError>) {
        let (_keep, file) = file_of(bytes);
        let mut r = FrameReader::new(file).unwrap();
        let mut frames = Vec::new();
        while let Some(item) = r.next_from(from) {
            match item {
                Ok(f) => frames.push(f),
                Err(ReadError::Frame(e)) => return (frames, Some(e)),
                Err(ReadError::Io(e)) => panic!("{e}"),
            }
        }
        (frames, None)
    }

    fn tail_of(bytes: &[u8]) -> Tail {
        let (_keep, file) = file_of(bytes);
        find_end(&file).unwrap()
    }

    #[test]
    fn frames_round_trip_and_damage_stops_the_read() {
        let mut buf = frame(0, 0, b"hello ");
        let second = buf.len();
        buf.extend(frame(6, 1, b"\xffworld"));
        let (frames, err) = read_all(&buf, 0);
        assert_eq!(err, None);
        assert_eq!(frames[1], (6, 1, b"\xffworld".to_vec()));
        assert_eq!(read_all(&buf, 6).0, vec![(6, 1, b"\xffworld".to_vec())]);
        let mut torn = buf.clone();
        torn.truncate(buf.len() - 2);
        let (frames, err) = read_all(&torn, 0);
        assert_eq!(frames.len(), 1);
        assert_eq!(err, Some(FrameError::Torn { at: second as u64 }));
        buf[second + 17] ^= 1;
        assert_eq!(
            read_all(&buf, 0).1,
            Some(FrameError::Damaged { at: second as u64 })
        );
    }

    #[test]
    fn frames_before_the_offset_are_stepped_over_by_their_headers() {
        // 300 frames of 1,000 bytes, the streams alternating.
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for i in 0..300u64 {
            starts.push(buf.len());
            buf.extend(frame(
                i * 1000,
                (i % 2) as u8,
                &vec![b'a' + (i % 26) as u8; 1000],
            ));
        }
        // From inside frame 250: that frame first (whole), then the rest.
        let (frames, err) = read_all(&buf, 250_500);
        assert_eq!(err, None);
        assert_eq!(frames.len(), 50);
        assert_eq!(frames[0].0, 250_000);
        assert_eq!(frames[49].0, 299_000);
        // A frame's bytes before the offset are not read, so damage there is
        // not seen; a damaged header is, where it is.
        let mut bytes_hit = buf.clone();
        bytes_hit[starts[10] + HEAD + 3] ^= 1;
        assert_eq!(read_all(&bytes_hit, 250_500).0.len(), 50);
        let mut header_hit = buf.clone();
        header_hit[starts[10]] ^= 0xff;
        assert_eq!(
            read_all(&header_hit, 250_500).1,
            Some(FrameError::Damaged {
                at: starts[10] as u64
            })
        );
        // Past the end: nothing, no error.
        assert_eq!(read_all(&buf, 400_000), (vec![], None));
    }

    #[test]
    fn the_end_is_found_from_the_tail_and_a_torn_tail_is_measured() {
        assert_eq!(
            tail_of(b""),
            Tail {
                len: 0,
                end: 0,
                stopped: None
            }
        );
        let mut buf = Vec::new();
        let mut offset = 0u64;
        for i in 0..200u32 {
            // Output that itself looks like frames must not be taken for one.
            let bytes = frame(offset, 0, format!("RO line {i}\n").as_bytes());
            buf.extend(frame(offset, (i % 2) as u8, &bytes));
            offset += bytes.len() as u64;
        }
        let whole = buf.len() as u64;
        assert_eq!(
            tail_of(&buf),
            Tail {
                len: whole,
                end: offset,
                stopped: None
            }
        );
        // A torn last write: the end is the last whole frame's.
        buf.extend(&frame(offset, 0, b"never acknowledged")[..20]);
        assert_eq!(
            tail_of(&buf),
            Tail {
                len: whole,
                end: offset,
                stopped: Some(FrameError::Torn { at: whole })
            }
        );
        // Damage in the middle does not hide a whole tail.
        let mut damaged = buf[..whole as usize].to_vec();
        damaged[100] ^= 0x40;
        assert_eq!(tail_of(&damaged).end, offset);
    }

    #[test]
    fn a_frame_larger_than_a_read_block_is_found() {
        let big = vec![b'R'; 3 * READ_AHEAD + 7];
        let mut buf = frame(0, 0, b"x");
        buf.extend(frame(1, 1, &big));
        assert_eq!(tail_of(&buf).end, 1 + big.len() as u64);
        assert_eq!(read_all(&buf, 2).0[0].2, big);
    }
}
