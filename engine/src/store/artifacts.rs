//! A job's artifacts on disk: `<state>/artifacts/<job>/<name>`, and the
//! partial copies of a collection in `<state>/artifacts/<job>.part/`.
//!
//! ```text
//! <state>/artifacts/<job>/<name>     whole copies; <name> is the file's path
//!                                     relative to the job's work directory
//! <state>/artifacts/<job>.part/      the runner's partial copies, emptied by the
//!                                     engine before and after each collection
//! ```
//!
//! **A partial artifact is never listed.** The runner writes each file into the
//! partial directory, syncs it and renames it into place (the SDK's
//! `artifacts::PartialFile`); the engine then checks it (a regular file of the
//! size the runner reported), syncs it and the directories above it again, and
//! only then appends `ArtifactStored`. The list of a job's artifacts is the
//! names with that event ([`LogReader::artifacts`]), never a directory listing:
//! a file a crash left in place before its event was appended is not the job's
//! artifact, and is removed when the collection is run again or finished.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use reel_plugin_sdk::artifacts as sdk;

use super::durable;
use super::reader::LogReader;
use crate::model::event::JobId;
use crate::model::state::ArtifactState;
use crate::store::LogError;

/// The directory of every job's artifacts, under the state directory.
pub const DIR_NAME: &str = "artifacts";

/// The most bytes one job's artifacts may take in all (1 GiB): a collection
/// stops before the first file that would pass it, keeping what was copied, and
/// says so in a notice.
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;

/// `<state>/artifacts/<job>`: where a job's artifacts are.
pub fn job_dir(state_dir: &Path, job: JobId) -> PathBuf {
    state_dir.join(DIR_NAME).join(job.to_string())
}

/// `<state>/artifacts/<job>.part`: where a collection's partial copies go.
pub fn partial_dir(state_dir: &Path, job: JobId) -> PathBuf {
    state_dir.join(DIR_NAME).join(format!("{job}.part"))
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LogError {
    let path = path.to_path_buf();
    move |source| LogError::Io { what, path, source }
}

impl LogReader {
    /// Where job `job`'s artifacts are stored.
    pub fn artifacts_dir(&self, job: JobId) -> PathBuf {
        job_dir(self.dir(), job)
    }

    /// Job `job`'s stored artifacts (those with an `ArtifactStored` event), in
    /// the order they were stored.
    pub fn artifacts(&self, job: JobId) -> Result<Vec<ArtifactState>, LogError> {
        Ok(self.fold(job)?.artifacts)
    }

    /// The file of job `job`'s artifact `name`, for serving it: only a name with
    /// an `ArtifactStored` event has one (a partial copy, or any other file in
    /// the job's directory, is never served), and its path never leaves the
    /// job's directory. [`LogError::NoSuchArtifact`] otherwise.
    pub fn artifact_path(&self, job: JobId, name: &str) -> Result<PathBuf, LogError> {
        let state = self.fold(job)?;
        let missing = || LogError::NoSuchArtifact {
            job,
            name: name.to_owned(),
        };
        state.artifact(name).ok_or_else(missing)?;
        sdk::path_in(&self.artifacts_dir(job), name).map_err(|_| missing())
    }
}

/// Creates the job's artifact directory and an empty partial directory
/// (removing what an interrupted collection left there), with their names
/// durable. Returns `(dest_dir, partial_dir)`.
pub(crate) fn prepare(state_dir: &Path, job: JobId) -> Result<(PathBuf, PathBuf), LogError> {
    let (dest, partial) = (job_dir(state_dir, job), partial_dir(state_dir, job));
    clear_partial(state_dir, job)?;
    for d in [&dest, &partial] {
        durable::create_dir_all(d, true).map_err(io_error("cannot create", d))?;
    }
    Ok((dest, partial))
}

/// Removes the job's partial directory and what is in it.
pub(crate) fn clear_partial(state_dir: &Path, job: JobId) -> Result<(), LogError> {
    let partial = partial_dir(state_dir, job);
    super::durable::gone_is_fine(std::fs::remove_dir_all(&partial))
        .map_err(io_error("cannot remove", &partial))
}

/// Checks that the runner's copy of `name` is in place, a regular file of
/// `size` bytes, and makes it durable again from the engine's side (the file,
/// then each directory from its own up to the job's): what must hold before its
/// `ArtifactStored` is appended. The error is a sentence for a notice.
pub(crate) fn check_stored(
    state_dir: &Path,
    job: JobId,
    name: &str,
    size: u64,
) -> Result<(), String> {
    let dest = job_dir(state_dir, job);
    let path = sdk::path_in(&dest, name)?;
    let meta = std::fs::symlink_metadata(&path)
        .map_err(|e| format!("the copy {} cannot be read: {e}", path.display()))?;
    if !meta.file_type().is_file() {
        return Err(format!("the copy {} is not a regular file", path.display()));
    }
    if meta.len() != size {
        return Err(format!(
            "the copy {} has {} bytes, the runner said {size}",
            path.display(),
            meta.len()
        ));
    }
    File::open(&path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", path.display()))?;
    let mut dir = path.parent();
    while let Some(d) = dir {
        sdk::sync_dir(d).map_err(|e| format!("cannot sync {}: {e}", d.display()))?;
        if d == dest {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

/// Reads the file of a stored artifact and checks it against its event: there,
/// of its size, with its CRC-32C (what `reel verify` does for every artifact).
/// The error is a sentence.
pub fn check_file(state_dir: &Path, job: JobId, a: &ArtifactState) -> Result<(), String> {
    use std::io::Read as _;
    let path = sdk::path_in(&job_dir(state_dir, job), &a.name)?;
    let mut file = File::open(&path)
        .map_err(|e| format!("artifact {:?}: cannot read {}: {e}", a.name, path.display()))?;
    let (mut size, mut crc) = (0u64, 0u32);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(format!(
                    "artifact {:?}: cannot read {}: {e}",
                    a.name,
                    path.display()
                ));
            }
        };
        size += n as u64;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
    if (size, crc) != (a.size, a.crc32c) {
        return Err(format!(
            "artifact {:?} is {size} bytes with crc32c {crc:08x}, its ArtifactStored says {} bytes \
             with crc32c {:08x}",
            a.name, a.size, a.crc32c
        ));
    }
    Ok(())
}

/// Ends a collection: the partial directory is removed, and every file of the
/// job's directory that is not a stored artifact (`keep`) — a copy whose event
/// never landed, or that failed its check — is removed with the directories
/// left empty. Returns how many files were removed.
pub(crate) fn sweep(state_dir: &Path, job: JobId, keep: &[String]) -> Result<usize, LogError> {
    clear_partial(state_dir, job)?;
    let dest = job_dir(state_dir, job);
    let mut removed = 0;
    sweep_dir(&dest, "", keep, &mut removed).map_err(io_error("cannot clean", &dest))?;
    Ok(removed)
}

/// Removes the files under `dir` (named `prefix<name>` relative to the job's
/// directory) not in `keep`; true if `dir` is left empty.
fn sweep_dir(dir: &Path, prefix: &str, keep: &[String], removed: &mut usize) -> io::Result<bool> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    let mut empty = true;
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if entry.file_type()?.is_dir() {
            if sweep_dir(&path, &format!("{name}/"), keep, removed)? {
                std::fs::remove_dir(&path)?;
            } else {
                empty = false;
            }
        } else if keep.contains(&name) {
            empty = false;
        } else {
            std::fs::remove_file(&path)?;
            *removed += 1;
        }
    }
    Ok(empty)
}

/// `1 GiB`, `512 MiB`, `3 KiB`, `10 B`: a cap for a message.
pub fn bytes_text(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if n >= unit && n.is_multiple_of(unit) {
            return format!("{} {name}", n / unit);
        }
    }
    format!("{n} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_keeps_only_stored_artifacts() {
        let tmp = tempfile::tempdir().unwrap();
        let (dest, partial) = prepare(tmp.path(), 3).unwrap();
        assert_eq!(dest, tmp.path().join("artifacts/3"));
        std::fs::create_dir_all(dest.join("dist/sub")).unwrap();
        std::fs::create_dir_all(dest.join("gone/deep")).unwrap();
        for f in ["dist/a.tar.gz", "dist/sub/b", "gone/deep/c", "report.xml"] {
            std::fs::write(dest.join(f), f).unwrap();
        }
        std::fs::write(partial.join("0.part"), "half").unwrap();
        let keep = vec!["dist/a.tar.gz".to_owned(), "report.xml".to_owned()];
        assert_eq!(sweep(tmp.path(), 3, &keep).unwrap(), 2);
        assert!(dest.join("dist/a.tar.gz").is_file());
        assert!(dest.join("report.xml").is_file());
        assert!(!dest.join("dist/sub").exists());
        assert!(!dest.join("gone").exists());
        assert!(!partial.exists());
        // Preparing again empties a partial directory a crash left.
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(partial.join("1.part"), "x").unwrap();
        prepare(tmp.path(), 3).unwrap();
        assert_eq!(std::fs::read_dir(&partial).unwrap().count(), 0);
    }

    #[test]
    fn a_copy_is_checked_against_what_the_runner_said() {
        let tmp = tempfile::tempdir().unwrap();
        let (dest, _) = prepare(tmp.path(), 1).unwrap();
        std::fs::create_dir_all(dest.join("d")).unwrap();
        std::fs::write(dest.join("d/f"), "12345").unwrap();
        assert_eq!(check_stored(tmp.path(), 1, "d/f", 5), Ok(()));
        let short = check_stored(tmp.path(), 1, "d/f", 6).unwrap_err();
        assert!(short.contains("has 5 bytes, the runner said 6"), "{short}");
        assert!(check_stored(tmp.path(), 1, "d/missing", 0).is_err());
        assert!(check_stored(tmp.path(), 1, "../1.part", 0).is_err());
        std::os::unix::fs::symlink("/etc/hostname", dest.join("link")).unwrap();
        let link = check_stored(tmp.path(), 1, "link", 0).unwrap_err();
        assert!(link.contains("not a regular file"), "{link}");
    }

    #[test]
    fn verify_reads_an_artifact_against_its_event() {
        let tmp = tempfile::tempdir().unwrap();
        let (dest, _) = prepare(tmp.path(), 2).unwrap();
        std::fs::write(dest.join("a"), "abc").unwrap();
        let mut a = ArtifactState {
            name: "a".into(),
            size: 3,
            crc32c: crc32c::crc32c(b"abc"),
        };
        assert_eq!(check_file(tmp.path(), 2, &a), Ok(()));
        a.crc32c ^= 1;
        let bad = check_file(tmp.path(), 2, &a).unwrap_err();
        assert!(bad.contains("its ArtifactStored says 3 bytes"), "{bad}");
        a.name = "gone".into();
        assert!(
            check_file(tmp.path(), 2, &a)
                .unwrap_err()
                .contains("cannot read")
        );
    }

    #[test]
    fn caps_read_in_their_largest_unit() {
        assert_eq!(bytes_text(MAX_ARTIFACT_BYTES), "1 GiB");
        assert_eq!(bytes_text(512 << 20), "512 MiB");
        assert_eq!(bytes_text(3 << 10), "3 KiB");
        assert_eq!(bytes_text(10), "10 B");
        assert_eq!(bytes_text(1500), "1500 B");
    }
}
