//! Writing artifacts the way [`Runner::collect`](crate::Runner::collect) must:
//! a file under the request's `dest_dir` is always a whole, synced copy.
//!
//! ```text
//! partial_dir/<n>.part   written, CRC-32C and size counted, fsync'd
//!        │ rename (after the directories below dest_dir are created and synced)
//!        ▼
//! dest_dir/<name>        then dest_dir/<name>'s directory is fsync'd
//! ```
//!
//! A copy that fails or is dropped before [`PartialFile::finish`] removes its
//! partial file and leaves nothing under `dest_dir`; one the process dies in the
//! middle of is left in `partial_dir`, which the engine empties before and after
//! each collection. So the engine, which records an artifact only once `collect`
//! has returned it, never records a partial file, and a crash never leaves one
//! where artifacts are read from.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use crate::types::{CollectRequest, Collected};

/// The longest artifact name accepted (Linux's `PATH_MAX`).
pub const MAX_NAME_BYTES: usize = 4096;

/// Checks an artifact name: a relative, `/`-separated path of at most
/// [`MAX_NAME_BYTES`] bytes whose segments are neither empty, `.` nor `..`, with
/// no NUL. What the engine accepts from a runner, and what it serves.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".to_owned());
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "the name is {} bytes, over the {MAX_NAME_BYTES} a path may have",
            name.len()
        ));
    }
    if name.contains('\0') {
        return Err("the name holds a NUL byte".to_owned());
    }
    if name.starts_with('/') {
        return Err("the name is an absolute path".to_owned());
    }
    for segment in name.split('/') {
        match segment {
            "" => return Err("the name has an empty segment".to_owned()),
            "." | ".." => return Err(format!("the name has a `{segment}` segment")),
            _ => {}
        }
    }
    Ok(())
}

/// `dir/<name>` for a name [`check_name`] accepts.
pub fn path_in(dir: &Path, name: &str) -> Result<PathBuf, String> {
    check_name(name)?;
    let rel = Path::new(name);
    debug_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
    Ok(dir.join(rel))
}

/// Syncs a directory, so the entries created in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// One artifact being copied: a partial file in the request's `partial_dir`,
/// with the CRC-32C and size of what was written so far. See the module doc.
#[derive(Debug)]
pub struct PartialFile {
    file: Option<File>,
    path: PathBuf,
    size: u64,
    crc: u32,
}

impl PartialFile {
    /// Creates `partial_dir/<seq>.part` (replacing a leftover of that name).
    pub fn create(request: &CollectRequest, seq: usize) -> io::Result<PartialFile> {
        let path = request.partial_dir.join(format!("{seq}.part"));
        let file = File::create(&path)?;
        Ok(PartialFile {
            file: Some(file),
            path,
            size: 0,
            crc: 0,
        })
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("the partial file was already finished"))?;
        file.write_all(bytes)?;
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Syncs the copy, creates (and syncs) the directories of `name` below the
    /// request's `dest_dir`, renames the copy to `dest_dir/<name>` and syncs the
    /// directory holding it. Only then is the artifact whole and durable.
    pub fn finish(mut self, request: &CollectRequest, name: &str) -> io::Result<Collected> {
        let dest = path_in(&request.dest_dir, name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("the partial file was already finished"))?;
        file.sync_all()?;
        drop(file);
        let parent = dest.parent().unwrap_or(&request.dest_dir).to_path_buf();
        create_dirs_below(&request.dest_dir, &parent)?;
        std::fs::rename(&self.path, &dest)?;
        sync_dir(&parent)?;
        Ok(Collected {
            name: name.to_owned(),
            size: self.size,
            crc32c: self.crc,
        })
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates `dir` (below `base`, which exists) and its missing parents, syncing
/// the parent of each directory it creates.
fn create_dirs_below(base: &Path, dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while at != base && !at.is_dir() {
        missing.push(at.to_path_buf());
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => sync_dir(d.parent().unwrap_or(base))?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_relative_paths_without_dot_segments() {
        for good in ["a", "dist/app.tar.gz", ".hidden/x", "a..b/c"] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            "a/.",
            "a\0b",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name(&"a".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    fn request(root: &Path) -> CollectRequest {
        let (dest, partial) = (root.join("dest"), root.join("partial"));
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::create_dir_all(&partial).unwrap();
        CollectRequest {
            dest_dir: dest,
            partial_dir: partial,
            ..CollectRequest::default()
        }
    }

    #[test]
    fn a_file_appears_under_dest_only_when_finished() {
        let tmp = tempfile::tempdir().unwrap();
        let req = request(tmp.path());
        let mut f = PartialFile::create(&req, 0).unwrap();
        f.write(b"hello ").unwrap();
        f.write(b"world").unwrap();
        assert!(!req.dest_dir.join("out/deep/a.txt").exists());
        let c = f.finish(&req, "out/deep/a.txt").unwrap();
        assert_eq!(
            c,
            Collected {
                name: "out/deep/a.txt".into(),
                size: 11,
                crc32c: crc32c::crc32c(b"hello world"),
            }
        );
        assert_eq!(
            std::fs::read(req.dest_dir.join("out/deep/a.txt")).unwrap(),
            b"hello world"
        );
        assert_eq!(std::fs::read_dir(&req.partial_dir).unwrap().count(), 0);

        // Dropped before it is finished: nothing anywhere.
        let mut g = PartialFile::create(&req, 1).unwrap();
        g.write(b"half").unwrap();
        drop(g);
        assert_eq!(std::fs::read_dir(&req.partial_dir).unwrap().count(), 0);
        // A bad name is refused and leaves nothing under dest either.
        let h = PartialFile::create(&req, 2).unwrap();
        assert!(h.finish(&req, "../escape").is_err());
        assert!(!tmp.path().join("escape").exists());
        assert_eq!(std::fs::read_dir(&req.partial_dir).unwrap().count(), 0);
    }
}
