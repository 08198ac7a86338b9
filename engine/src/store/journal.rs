//! The event journal: a plain append-only file holding a second copy of every
//! event, written by the log's writer in the same round as sled.
//!
//! Why it exists: sled protects its own log with per-message CRCs, and when it
//! opens a log with a corrupt message it treats the message as the torn end of
//! the log and *silently drops every later write* (it even shreds the rest of
//! that segment). One flipped byte on disk would then lose the history of every
//! job written after it, with no error. The journal lets the log notice that,
//! restore what sled dropped, and name the exact job and seq of a corrupt copy.
//!
//! ```text
//!  0       2        6        14       18              18+n     22+n
//!  +-------+--------+--------+--------+---------------+--------+
//!  | "RJ"  | len n  | job    | seq    | event envelope| crc32c |
//!  | u16BE | u32 BE | u64 BE | u32 BE | (n bytes)     | u32 BE |
//!  +-------+--------+--------+--------+---------------+--------+
//!           crc32c covers everything from the magic to the envelope
//! ```
//!
//! The envelope is byte-for-byte the value stored in sled's `events` tree. A
//! frame with job 0 and an empty envelope is a commit marker (see [`marker`]).
//! A frame that fails its CRC is skipped by scanning forward for the next magic
//! whose frame checks out, so one bad frame never hides the frames after it.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::durable;
use crate::model::codec::MAX_ENVELOPE;
use crate::model::event::{JobId, Seq};

const MAGIC: [u8; 2] = *b"RJ";
const HEAD: usize = 18;
const TAIL: usize = 4;

/// The journal file's name inside the state directory.
pub const FILE_NAME: &str = "journal";

/// Encodes one journal frame.
pub fn frame(job: JobId, seq: Seq, envelope: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD + envelope.len() + TAIL);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&(envelope.len() as u32).to_be_bytes());
    out.extend_from_slice(&job.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(envelope);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// A commit marker: a frame with job 0 (never a job id) whose 16-byte
/// envelope holds two journal offsets, big-endian: `acked`, before which every
/// event frame was acknowledged to its caller, and `indexed`, before which
/// every event was durable in sled (its flush had completed). The writer puts
/// one in its next write whenever `acked` has moved, and one on close.
///
/// Markers written before format 2 of the journal have an empty envelope and
/// vouch for every frame before themselves on both counts ([`Marker::of`]).
pub fn marker(acked: u64, indexed: u64) -> Vec<u8> {
    let mut env = [0u8; 16];
    env[..8].copy_from_slice(&acked.to_be_bytes());
    env[8..].copy_from_slice(&indexed.to_be_bytes());
    frame(0, 0, &env)
}

/// What a commit marker vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// Every event frame before this offset was acknowledged.
    pub acked: u64,
    /// Every event before this offset was durable in sled.
    pub indexed: u64,
}

impl Marker {
    /// The marker frame at `offset` with `envelope`.
    pub fn of(offset: u64, envelope: &[u8]) -> Marker {
        match envelope.len() {
            16 => Marker {
                acked: u64::from_be_bytes(envelope[..8].try_into().unwrap_or_default()),
                indexed: u64::from_be_bytes(envelope[8..].try_into().unwrap_or_default()),
            },
            // An old marker: the writer acknowledged and stored in sled before
            // it wrote one, so it vouches for everything before itself.
            _ => Marker {
                acked: offset,
                indexed: offset,
            },
        }
    }
}

/// The length of the frame holding `envelope`.
pub fn frame_len(envelope: &[u8]) -> u64 {
    (HEAD + envelope.len() + TAIL) as u64
}

/// One frame read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A frame that checks out.
    Frame {
        /// Where it starts in the file.
        offset: u64,
        /// The job.
        job: JobId,
        /// The seq.
        seq: Seq,
        /// The event envelope.
        envelope: Vec<u8>,
    },
    /// Bytes that are not a valid frame, from `offset` for `len` bytes. `claimed`
    /// is the (job, seq) the damaged header names, when its magic is intact;
    /// the header itself may be what is damaged, so treat it as a hint.
    Damaged {
        /// Where the damage starts.
        offset: u64,
        /// How many bytes were skipped.
        len: u64,
        /// The (job, seq) the header names, if it has a magic.
        claimed: Option<(JobId, Seq)>,
    },
}

/// Parses a frame at the start of `buf`: `Some(len)` if a whole valid frame is there.
fn valid_frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < HEAD + TAIL || buf[..2] != MAGIC {
        return None;
    }
    let n = u32::from_be_bytes(buf[2..6].try_into().ok()?) as usize;
    if n > MAX_ENVELOPE || buf.len() < HEAD + n + TAIL {
        return None;
    }
    let body = &buf[..HEAD + n];
    let crc = u32::from_be_bytes(buf[HEAD + n..HEAD + n + TAIL].try_into().ok()?);
    (crc32c::crc32c(body) == crc).then_some(HEAD + n + TAIL)
}

/// Reads every frame of `bytes` (the journal from `base` on), resynchronising
/// after damage. A damaged or partial run at the very end is reported as
/// `Damaged` too; the caller decides whether it is a torn tail. Zero bytes
/// after the last frame are the space the writer wrote ahead of its frames
/// ([`Journal::ensure_len`]), not damage: parsing stops at them.
pub fn parse(bytes: &[u8], base: u64) -> Vec<Item> {
    let mut items = Vec::new();
    let mut pos = 0usize;
    // Everything from `zeros` on is zero bytes.
    let zeros = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    while pos < bytes.len() {
        if let Some(len) = valid_frame_len(&bytes[pos..]) {
            let b = &bytes[pos..];
            items.push(Item::Frame {
                offset: base + pos as u64,
                job: u64::from_be_bytes(b[6..14].try_into().unwrap_or_default()),
                seq: u32::from_be_bytes(b[14..18].try_into().unwrap_or_default()),
                envelope: b[HEAD..len - TAIL].to_vec(),
            });
            pos += len;
            continue;
        }
        if pos >= zeros {
            break;
        }
        let start = pos;
        let claimed = (bytes.len() - pos >= HEAD && bytes[pos..pos + 2] == MAGIC).then(|| {
            let b = &bytes[pos..];
            (
                u64::from_be_bytes(b[6..14].try_into().unwrap_or_default()),
                u32::from_be_bytes(b[14..18].try_into().unwrap_or_default()),
            )
        });
        pos += 1;
        while pos < zeros && valid_frame_len(&bytes[pos..]).is_none() {
            pos += 1;
        }
        items.push(Item::Damaged {
            offset: base + start as u64,
            len: (pos - start) as u64,
            claimed,
        });
    }
    items
}

/// Where the written part of a journal file ends, without parsing it: 16
/// bytes past its last non-zero byte (a frame may end in zero bytes, its
/// checksums, never in sixteen), or the file's length if that is nearer. What
/// follows is the zeros the writer keeps ahead of its frames
/// ([`Journal::ensure_len`]). Reads back from the end, a MiB at a time.
pub fn written_end(file: &File) -> std::io::Result<u64> {
    let len = file.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 1 << 20];
    while end > 0 {
        let n = end.min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], end - n as u64)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b != 0) {
            return Ok((end - n as u64 + i as u64 + 1 + 16).min(len));
        }
        end -= n as u64;
    }
    Ok(0)
}

/// The journal file, opened for appending at a known end.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
    /// This open created the file: there was no journal before.
    created: bool,
}

impl Journal {
    /// Opens (creating) the journal in `state_dir`. With `sync`, a journal
    /// this creates has the state directory synced, so its name is durable
    /// before any event in it is acknowledged.
    pub fn open(state_dir: &Path, sync: bool) -> std::io::Result<Journal> {
        let path = state_dir.join(FILE_NAME);
        let (file, created) = durable::open_or_create(&path, sync)?;
        Ok(Journal {
            file,
            path,
            created,
        })
    }

    /// Names the file by `path` in messages (an offline reader's copy is
    /// named after the original it was copied from).
    pub fn shown_as(mut self, path: PathBuf) -> Journal {
        self.path = path;
        self
    }

    /// The file's path, as messages name it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether opening created the file (there was no journal before).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The file's current length.
    pub fn file_len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Makes the file at least `len` bytes long by writing zeros after its
    /// end (real writes, so the blocks are allocated: a later `fdatasync` of
    /// frames written over them has no size or extent change to commit).
    /// Returns the new length. Not synced: the next [`Journal::sync`] is.
    pub fn ensure_len(&self, len: u64) -> std::io::Result<u64> {
        let mut at = self.file_len()?;
        let zeros = vec![0u8; 1 << 20];
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(at)
    }

    /// Reads the journal from `from` to its end.
    pub fn read_from(&self, from: u64) -> std::io::Result<Vec<u8>> {
        let mut f = &self.file;
        let len = self.file_len()?;
        let mut buf = Vec::with_capacity(len.saturating_sub(from) as usize);
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from.min(len)))?;
        f.read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// Cuts the file at `len` (dropping a torn tail nobody was told about).
    pub fn truncate(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }

    /// Waits for `fdatasync` of the file.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Writes `bytes` at `offset` (not synced: see [`Journal::sync`]).
    pub fn write_at(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(bytes, offset)
    }

    /// Calls `each` with every item of the journal between `from` and `to`
    /// (frame boundaries), in order, with the item's bytes as they are in
    /// the file. Reads [`SCAN_WINDOW`] bytes at a time, so memory stays
    /// bounded however long the journal is: a frame cut by the end of a
    /// window is read again at the start of the next, and a window that a
    /// frame longer than it starts is doubled until it holds it (up to
    /// [`MAX_SCAN_WINDOW`]).
    pub fn scan(
        &self,
        from: u64,
        to: u64,
        each: impl FnMut(&Item, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        self.scan_in(SCAN_WINDOW, from, to, each)
    }

    fn scan_in(
        &self,
        window: usize,
        from: u64,
        to: u64,
        mut each: impl FnMut(&Item, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut at = from;
        let mut buf = Vec::new();
        let mut size = window;
        while at < to {
            let n = (to - at).min(size as u64) as usize;
            buf.resize(n, 0);
            self.file.read_exact_at(&mut buf, at)?;
            let last = at + n as u64 == to;
            let items = parse(&buf, at);
            if !last
                && size < MAX_SCAN_WINDOW.max(window)
                && items
                    .first()
                    .is_some_and(|i| i.is_damaged() && i.span().0 == at)
            {
                // A frame longer than the window, or damage: look further.
                size *= 2;
                continue;
            }
            size = window;
            let mut next = at + n as u64;
            for (i, item) in items.iter().enumerate() {
                let (offset, len) = item.span();
                // Damage at the end of a window that is not the last may be
                // a whole frame the window cut: read it again from there
                // (unless it starts the window, which the largest window
                // holds a whole frame at: then it is damage, passed on).
                if !last && i + 1 == items.len() && item.is_damaged() && offset > at {
                    next = offset;
                    break;
                }
                let start = (offset - at) as usize;
                each(item, &buf[start..start + len as usize])?;
                next = offset + len;
            }
            if next <= at {
                next = at + n as u64;
            }
            at = next;
        }
        Ok(())
    }
}

/// How much of the journal [`Journal::scan`] reads at a time.
pub const SCAN_WINDOW: usize = 4 << 20;

/// The most [`Journal::scan`] reads at once: more than the largest frame.
pub const MAX_SCAN_WINDOW: usize = 2 * MAX_ENVELOPE + 2 * (HEAD + TAIL);

impl Item {
    /// Where the item starts and how many bytes it covers.
    pub fn span(&self) -> (u64, u64) {
        match self {
            Item::Frame {
                offset, envelope, ..
            } => (*offset, frame_len(envelope)),
            Item::Damaged { offset, len, .. } => (*offset, *len),
        }
    }

    /// Whether it is damage, not a frame.
    pub fn is_damaged(&self) -> bool {
        matches!(self, Item::Damaged { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_damage_is_skipped() {
        let mut bytes = frame(1, 1, b"one");
        let second = bytes.len();
        bytes.extend(frame(1, 2, b"two"));
        let third = bytes.len();
        bytes.extend(frame(2, 1, b"three"));
        bytes[second + 20] ^= 0xff;
        let items = parse(&bytes, 100);
        assert_eq!(items.len(), 3);
        assert!(
            matches!(&items[0], Item::Frame { job: 1, seq: 1, envelope, .. } if envelope == b"one")
        );
        assert_eq!(
            items[1],
            Item::Damaged {
                offset: 100 + second as u64,
                len: (third - second) as u64,
                claimed: Some((1, 2))
            }
        );
        assert!(
            matches!(&items[2], Item::Frame { job: 2, seq: 1, offset, .. } if *offset == 100 + third as u64)
        );
    }

    #[test]
    fn zeros_after_the_last_frame_are_not_damage() {
        let mut bytes = frame(1, 1, b"one");
        bytes.extend(marker(7, 3));
        let end = bytes.len();
        bytes.extend(vec![0u8; 4096]);
        let items = parse(&bytes, 0);
        assert_eq!(items.len(), 2, "{items:?}");
        assert!(
            matches!(&items[1], Item::Frame { job: 0, envelope, offset, .. }
                if Marker::of(*offset, envelope) == Marker { acked: 7, indexed: 3 }
                    && *offset + frame_len(envelope) == end as u64)
        );
        // A torn frame before the zeros is damage that ends where the zeros begin.
        let mut torn = frame(1, 1, b"one");
        let whole = torn.len();
        torn.extend(&frame(u64::MAX, 2, b"two")[..10]);
        let garbage_end = torn.len();
        torn.extend(vec![0u8; 100]);
        assert!(
            matches!(parse(&torn, 0).last(), Some(&Item::Damaged { offset, len, .. })
                if offset == whole as u64 && len == (garbage_end - whole) as u64),
            "{:?}",
            parse(&torn, 0)
        );
        assert_eq!(
            Marker::of(40, &[]),
            Marker {
                acked: 40,
                indexed: 40
            }
        );
    }

    #[test]
    fn a_scan_in_small_windows_sees_what_one_parse_sees() {
        let tmp = tempfile::tempdir().unwrap();
        let j = Journal::open(tmp.path(), false).unwrap();
        let mut bytes = Vec::new();
        for i in 1..=40u32 {
            bytes.extend(frame(
                u64::from(i % 7),
                i,
                &vec![i as u8; (i * 3) as usize % 50],
            ));
            if i % 9 == 0 {
                bytes.extend(marker(bytes.len() as u64, 0));
            }
        }
        // A frame longer than the smaller windows.
        bytes.extend(frame(3, 41, &[7u8; 300]));
        bytes.extend(frame(3, 42, b"after"));
        let damaged = bytes.len() / 3;
        bytes[damaged] ^= 0x55;
        j.write_at(&bytes, 0).unwrap();
        let whole = parse(&bytes, 0);
        assert!(whole.iter().any(Item::is_damaged));
        for window in [80, 100, 257, 4096] {
            let mut seen = Vec::new();
            let mut copy = Vec::new();
            j.scan_in(window, 0, bytes.len() as u64, |item, raw| {
                seen.push(item.clone());
                copy.extend_from_slice(raw);
                Ok(())
            })
            .unwrap();
            assert_eq!(seen, whole, "window {window}");
            assert_eq!(copy, bytes, "window {window}");
        }
    }

    #[test]
    fn the_written_end_is_past_the_last_frame_and_before_the_zeros() {
        let tmp = tempfile::tempdir().unwrap();
        let j = Journal::open(tmp.path(), false).unwrap();
        let f = frame(1, 1, b"one");
        j.write_at(&f, 0).unwrap();
        let file = File::open(j.path()).unwrap();
        assert_eq!(written_end(&file).unwrap(), f.len() as u64);
        j.ensure_len(3 << 20).unwrap();
        assert_eq!(written_end(&file).unwrap(), f.len() as u64 + 16);
        j.truncate(0).unwrap();
        assert_eq!(written_end(&file).unwrap(), 0);
    }

    #[test]
    fn a_torn_tail_is_damage_at_the_end() {
        let mut bytes = frame(1, 1, b"one");
        let whole = bytes.len();
        bytes.extend(&frame(1, 2, b"two")[..10]);
        let items = parse(&bytes, 0);
        assert!(
            matches!(items.last(), Some(Item::Damaged { offset, .. }) if *offset == whole as u64)
        );
    }
}
