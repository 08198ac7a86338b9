//! Creating files and directories so that their names survive a power cut.
//!
//! `fdatasync` of a file makes its contents durable, not the directory entry
//! that names it: a new file, or a new directory, exists after a power cut
//! only once its parent directory has been synced too. ext4's ordered mode
//! happens to commit the entry with the file's data; other filesystems (XFS,
//! btrfs, ext4 with other options) need the parent synced. So every file or
//! directory the log creates and later acknowledges data in is created here,
//! and its parent is synced once, right after it is created and before any
//! caller is told that data in it is durable. Appends to a file that already
//! exists sync nothing here.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// Syncs a directory, so the entries created in it are durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()?;
    tracing::debug!(dir = %dir.display(), "synced the directory");
    Ok(())
}

/// Creates `dir` and any missing parents, syncing the parent of each directory
/// it creates (when `sync` is set). Returns the directories it created,
/// outermost first.
pub(super) fn create_dir_all(dir: &Path, sync: bool) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", at.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(at.to_path_buf());
                match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => at = p,
                    _ => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    missing.reverse();
    for d in &missing {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            // Another process made it meanwhile: whoever made it syncs it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        if sync {
            sync_dir(parent_of(d))?;
        }
    }
    Ok(missing)
}

/// Opens `path` for reading and writing, creating it if it does not exist;
/// a file it creates has its parent directory synced (when `sync` is set).
/// Returns the file and whether this call created it.
pub(super) fn open_or_create(path: &Path, sync: bool) -> io::Result<(File, bool)> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => {
            if sync {
                sync_dir(parent_of(path))?;
            }
            Ok((f, true))
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let f = OpenOptions::new().read(true).write(true).open(path)?;
            Ok((f, false))
        }
        Err(e) => Err(e),
    }
}

/// A removal's result, with a target that was already gone counted as removed.
pub(super) fn gone_is_fine(removed: io::Result<()>) -> io::Result<()> {
    match removed {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_is_missing_is_created() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a").join("b").join("c");
        let made = create_dir_all(&deep, true).unwrap();
        assert_eq!(
            made,
            vec![
                tmp.path().join("a"),
                tmp.path().join("a").join("b"),
                deep.clone()
            ]
        );
        assert!(deep.is_dir());
        assert!(create_dir_all(&deep, true).unwrap().is_empty());

        let file = deep.join("f");
        let (_, created) = open_or_create(&file, true).unwrap();
        assert!(created);
        let (_, created) = open_or_create(&file, true).unwrap();
        assert!(!created);

        let err = create_dir_all(&file, true).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }
}
