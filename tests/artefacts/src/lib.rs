//! Where tests and benches find the workspace's built artefacts — the `reel` and
//! `reel-agent` binaries and the runner plugins (`libreel_runner_*.so`) — by file
//! name, never by the package that builds them (so a binary can move between
//! packages without a test noticing).
//!
//! `cargo test` builds what the test code links against, not what it runs: it
//! builds a package's binaries only when that package has integration tests (and
//! then puts them in `target/<profile>/`), and it leaves a workspace cdylib in
//! `target/<profile>/deps/` (only `cargo build` names it as a root and copies it up
//! to `target/<profile>/`). So for each file name [`dir_with`] and [`file`] look in
//! the running test binary's profile directory and its `deps/`, take the newer
//! copy, and then:
//!
//! - when every file is in the profile directory itself (after `cargo build
//!   --workspace`, which `scripts/test` runs first), use it: nothing is built,
//!   copied or linked;
//! - when every file was found but not all in one place (a plain `cargo test
//!   --workspace` on a fresh clone), [`dir_with`] hard-links them side by side into
//!   `target/test-artefacts/found-<profile>/`, refreshed by every test process;
//! - when a file is missing (for example `cargo test -p reel-tests` on a fresh
//!   clone), one nested `cargo build --workspace` into its own target directory,
//!   `target/test-artefacts/`, builds every artefact of the workspace, and says so
//!   on stderr. Its own directory, because a nested cargo must never wait on the
//!   outer build's lock, nor overwrite the outer build's artefacts.
//!
//! All of that happens under an exclusive `flock` on
//! `target/test-artefacts/.reel-artefacts.lock`, so test binaries run in parallel
//! neither race nor build at once (the second one finds the build done and cargo
//! checks it in a fraction of a second); within one process the answer is cached.

pub mod browser;

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

/// Why artefacts could not be found or built.
#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn error(message: impl Into<String>) -> Error {
    Error(message.into())
}

/// The workspace root (this crate lives in `<root>/tests/artefacts`).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .expect("tests/artefacts has two parents")
        .to_path_buf()
}

/// A directory holding all of `names` side by side, for the profile of the
/// running test binary; see the crate documentation. Panics with the reason if
/// they can be neither found nor built.
pub fn dir_with(names: &[&str]) -> PathBuf {
    cached(names, Placement::SideBySide)
}

/// The path of one artefact, for the profile of the running test binary; see the
/// crate documentation. Panics with the reason if it can be neither found nor
/// built.
pub fn file(name: &str) -> PathBuf {
    cached(&[name], Placement::Anywhere).join(name)
}

/// Builds every artefact of the workspace with `profile` into `target_dir` (a
/// nested `cargo build --workspace`, saying so on stderr) and returns the
/// directory that holds `names` side by side. Cargo makes it a no-op when nothing
/// changed. For benches, which want release builds in a directory of their own.
pub fn build(target_dir: &Path, profile: &str, names: &[&str]) -> Result<PathBuf, Error> {
    let _lock = Lock::take(target_dir)?;
    build_locked(target_dir, profile, names, "requested")
}

/// Whether the files must share one directory.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Placement {
    SideBySide,
    Anywhere,
}

fn cached(names: &[&str], placement: Placement) -> PathBuf {
    type Key = (Vec<String>, Placement);
    static CACHE: Mutex<Vec<(Key, PathBuf)>> = Mutex::new(Vec::new());
    let key: Key = (names.iter().map(|n| (*n).to_owned()).collect(), placement);
    // Held while locating: other threads of this process wait for the answer.
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, dir)) = cache.iter().find(|(k, _)| *k == key) {
        return dir.clone();
    }
    let dir = locate(names, placement).unwrap_or_else(|e| panic!("{e}"));
    cache.push((key, dir.clone()));
    dir
}

/// The layout around the running test binary: `<target>/<profile>/deps/<test>`.
#[derive(Debug)]
struct Layout {
    /// `<target>/<profile>`, where cargo puts binaries and build roots.
    profile_dir: PathBuf,
    /// `<target>/<profile>/deps`, where cargo leaves everything else.
    deps: PathBuf,
    /// The directory name of the profile (`debug` for `dev`).
    profile_dir_name: String,
    /// `<target>`.
    target: PathBuf,
}

impl Layout {
    fn of_current_exe() -> Result<Layout, Error> {
        let exe = std::env::current_exe()
            .map_err(|e| error(format!("cannot name the running test binary: {e}")))?;
        Layout::of(&exe)
    }

    fn of(exe: &Path) -> Result<Layout, Error> {
        let not_cargo = || {
            error(format!(
                "{} is not a test binary in a cargo target directory \
                 (<target>/<profile>/deps/)",
                exe.display()
            ))
        };
        let parent = exe.parent().ok_or_else(not_cargo)?;
        let profile_dir = match parent.file_name().and_then(|n| n.to_str()) {
            Some("deps" | "examples") => parent.parent().ok_or_else(not_cargo)?,
            _ => parent,
        };
        let profile_dir_name = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(not_cargo)?
            .to_owned();
        let target = profile_dir.parent().ok_or_else(not_cargo)?.to_path_buf();
        Ok(Layout {
            deps: profile_dir.join("deps"),
            profile_dir: profile_dir.to_path_buf(),
            profile_dir_name,
            target,
        })
    }

    /// Where the nested build and the side-by-side links go.
    fn own_dir(&self) -> PathBuf {
        self.target.join("test-artefacts")
    }
}

/// The `--profile` that puts its output in a directory of this name.
fn profile_of_dir(dir_name: &str) -> &str {
    match dir_name {
        "debug" => "dev",
        other => other,
    }
}

/// The directory a profile's output lands in (the inverse of [`profile_of_dir`];
/// `test` and `bench` share `dev`'s and `release`'s).
fn dir_of_profile(profile: &str) -> &str {
    match profile {
        "dev" | "test" => "debug",
        "bench" => "release",
        other => other,
    }
}

/// The newest existing copy of `name` cargo left for this profile: in the profile
/// directory (uplifted) or in `deps/` (a cdylib cargo did not uplift). On a tie
/// (the same file, hard-linked) the profile directory's.
fn newest(layout: &Layout, name: &str) -> Option<PathBuf> {
    let mut best: Option<(SystemTime, PathBuf)> = None;
    for dir in [&layout.profile_dir, &layout.deps] {
        let path = dir.join(name);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, path));
        }
    }
    best.map(|(_, p)| p)
}

fn locate(names: &[&str], placement: Placement) -> Result<PathBuf, Error> {
    let layout = Layout::of_current_exe()?;
    let own = layout.own_dir();
    let _lock = Lock::take(&own)?;
    let found: Vec<(&str, Option<PathBuf>)> =
        names.iter().map(|n| (*n, newest(&layout, n))).collect();
    let missing: Vec<&str> = found
        .iter()
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        let why = format!(
            "{} not beside the test binary in {}",
            missing.join(", "),
            layout.profile_dir.display()
        );
        return build_locked(&own, profile_of_dir(&layout.profile_dir_name), names, &why);
    }
    let found: Vec<(&str, PathBuf)> = found
        .into_iter()
        .filter_map(|(n, p)| p.map(|p| (n, p)))
        .collect();
    if found
        .iter()
        .all(|(_, p)| p.parent() == Some(&layout.profile_dir))
    {
        return Ok(layout.profile_dir.clone());
    }
    match placement {
        Placement::Anywhere => {
            // `file` asks for one name at a time.
            let (_, path) = &found[0];
            Ok(path
                .parent()
                .expect("a found file has a parent")
                .to_path_buf())
        }
        Placement::SideBySide => {
            let dir = own.join(format!("found-{}", layout.profile_dir_name));
            link_side_by_side(&dir, &found)?;
            Ok(dir)
        }
    }
}

/// Hard-links (or, across file systems, copies) each `(name, source)` to
/// `dir/name`, replacing what was there atomically (a process running the old
/// file keeps it).
fn link_side_by_side(dir: &Path, files: &[(&str, PathBuf)]) -> Result<(), Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| error(format!("cannot create {}: {e}", dir.display())))?;
    for (name, source) in files {
        let dest = dir.join(name);
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        if std::fs::hard_link(source, &tmp).is_err() {
            std::fs::copy(source, &tmp).map_err(|e| {
                error(format!(
                    "cannot link or copy {} to {}: {e}",
                    source.display(),
                    tmp.display()
                ))
            })?;
        }
        std::fs::rename(&tmp, &dest).map_err(|e| {
            error(format!(
                "cannot rename {} to {}: {e}",
                tmp.display(),
                dest.display()
            ))
        })?;
    }
    Ok(())
}

/// `cargo build --workspace --profile PROFILE --target-dir TARGET_DIR`, then checks
/// that every name is in the profile's directory. The caller holds the lock.
fn build_locked(
    target_dir: &Path,
    profile: &str,
    names: &[&str],
    why: &str,
) -> Result<PathBuf, Error> {
    let root = workspace_root();
    // Straight to the terminal: libtest captures `eprintln!` of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "reel-test-artefacts: building the workspace ({profile} profile) into {} \
         for {} ({why})",
        target_dir.display(),
        names.join(", ")
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .current_dir(&root)
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--workspace", "--profile", profile])
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .map_err(|e| error(format!("cannot run {}: {e}", cargo.to_string_lossy())))?;
    if !status.success() {
        return Err(error(format!(
            "the nested `cargo build --workspace` into {} failed: {status}",
            target_dir.display()
        )));
    }
    let dir = target_dir.join(dir_of_profile(profile));
    let absent: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !dir.join(n).is_file())
        .collect();
    if !absent.is_empty() {
        return Err(error(format!(
            "`cargo build --workspace` did not produce {} in {}: does a workspace \
             package still build it?",
            absent.join(", "),
            dir.display()
        )));
    }
    Ok(dir)
}

/// An exclusive `flock` on `<dir>/.reel-artefacts.lock`, released on drop.
struct Lock {
    _file: File,
}

impl Lock {
    fn take(dir: &Path) -> Result<Lock, Error> {
        std::fs::create_dir_all(dir)
            .map_err(|e| error(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(".reel-artefacts.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| error(format!("cannot open {}: {e}", path.display())))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| error(format!("cannot lock {}: {e}", path.display())))?;
        Ok(Lock { _file: file })
    }
}

/// Runs `scripts/install-vm-deps` (as root, from Debian's repositories: QEMU,
/// the image's tools, curl, Chromium); panics saying `what` was needed if it
/// fails.
pub(crate) fn install_deps(what: &str) {
    let install = workspace_root().join("scripts/install-vm-deps");
    let status = Command::new(&install)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", install.display()));
    assert!(
        status.success(),
        "{} failed ({status}): {what} are needed (run it as root)",
        install.display()
    );
}

/// The QEMU runner's guest image directory (holding `spec.json`), built by
/// `scripts/build-guest-image` (cached by its inputs, so cheap after the first
/// time) once per test process. On a machine without QEMU 10 it first runs
/// `scripts/install-vm-deps` (as root, from Debian's repositories), so a plain
/// `cargo test --workspace` on a fresh Debian 12 machine works. Panics with the
/// reason if the image cannot be had.
pub fn guest_image() -> PathBuf {
    static IMAGE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut image = IMAGE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = image.as_ref() {
        return dir.clone();
    }
    let root = workspace_root();
    let qemu10 = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("version 10."));
    if !qemu10 {
        install_deps("QEMU 10 and the image's tools");
    }
    let script = root.join("scripts/build-guest-image");
    let out = Command::new(&script)
        .current_dir(&root)
        .env_remove("CARGO_TARGET_DIR")
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): run scripts/install-vm-deps first",
        script.display(),
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        dir.join("spec.json").is_file(),
        "{} printed no image directory: {stdout}",
        script.display()
    );
    *image = Some(dir.clone());
    dir
}

/// A bare QEMU of the guest image at `image`, without reel, for tests and the
/// VM benchmark's baseline: `-M microvm` with qboot, `memory_mib` of RAM, one
/// vCPU, `accel` (for example `["-accel", "tcg"]`), the spec's kernel, initramfs
/// and command line (with `tsc_early_khz` of this host and `/work` on the first
/// disk), in `dir`: a `volume_mib` ext4 volume `work.img` (formatted here, before
/// the caller's clock starts), the agent's chardev socket `a.sock`, the console
/// `console.log`. The caller spawns it (and kills it).
pub fn bare_guest(
    image: &Path,
    dir: &Path,
    memory_mib: u64,
    volume_mib: u64,
    accel: &[&str],
) -> Command {
    let text = std::fs::read_to_string(image.join("spec.json")).expect("the image has a spec");
    let spec: serde_json::Value = serde_json::from_str(&text).expect("the spec is JSON");
    let field = |key: &str| spec[key].as_str().unwrap_or_default().to_owned();
    let volume = dir.join("work.img");
    std::fs::File::create(&volume)
        .and_then(|f| f.set_len(volume_mib << 20))
        .expect("cannot create the volume");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal"])
        .arg(&volume)
        .status()
        .expect("cannot run mkfs.ext4");
    assert!(mkfs.success(), "mkfs.ext4: {mkfs}");
    let khz = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")?
                .split(':')
                .nth(1)?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|mhz| format!(" tsc_early_khz={}", (mhz * 1000.0).round() as u64))
        .unwrap_or_default();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm", "-bios", "/usr/share/qemu/qboot.rom"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args(accel)
        .args(["-m", &memory_mib.to_string(), "-smp", "1"])
        .arg("-kernel")
        .arg(image.join(field("kernel")))
        .arg("-initrd")
        .arg(image.join(field("initrd")))
        .arg("-append")
        .arg(format!("{}{khz} reel.volumes=vda:/work", field("cmdline")))
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()))
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            dir.join("a.sock").display()
        ))
        .args(["-device", "virtio-serial-device"])
        .args(["-device", "virtserialport,chardev=agent,name=agent0"])
        .arg("-drive")
        .arg(format!(
            "id=vol0,file={},format=raw,if=none,cache=unsafe,discard=unmap",
            volume.display()
        ))
        .args(["-device", "virtio-blk-device,drive=vol0"]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(root: &Path) -> Layout {
        Layout::of(&root.join("target/debug/deps/all-0123")).unwrap()
    }

    #[test]
    fn the_layout_is_read_from_the_test_binary_path() {
        let l = layout(Path::new("/w"));
        assert_eq!(l.profile_dir, Path::new("/w/target/debug"));
        assert_eq!(l.deps, Path::new("/w/target/debug/deps"));
        assert_eq!(l.target, Path::new("/w/target"));
        assert_eq!(l.own_dir(), Path::new("/w/target/test-artefacts"));
        assert_eq!(profile_of_dir(&l.profile_dir_name), "dev");
        let bench = Layout::of(Path::new("/w/target/release/deps/run-9")).unwrap();
        assert_eq!(profile_of_dir(&bench.profile_dir_name), "release");
        for p in ["dev", "release", "custom"] {
            assert_eq!(profile_of_dir(dir_of_profile(p)), p);
        }
    }

    #[test]
    fn the_newest_copy_wins_and_a_tie_goes_to_the_profile_dir() {
        let t = tempfile::tempdir().unwrap();
        let l = layout(t.path());
        std::fs::create_dir_all(&l.deps).unwrap();
        assert_eq!(newest(&l, "libx.so"), None);

        std::fs::write(l.deps.join("libx.so"), "new").unwrap();
        assert_eq!(newest(&l, "libx.so"), Some(l.deps.join("libx.so")));

        std::fs::hard_link(l.deps.join("libx.so"), l.profile_dir.join("libx.so")).unwrap();
        assert_eq!(newest(&l, "libx.so"), Some(l.profile_dir.join("libx.so")));

        // A stale uplifted copy loses to the one the last build left in deps.
        let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::remove_file(l.profile_dir.join("libx.so")).unwrap();
        std::fs::write(l.profile_dir.join("libx.so"), "old").unwrap();
        File::options()
            .write(true)
            .open(l.profile_dir.join("libx.so"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(newest(&l, "libx.so"), Some(l.deps.join("libx.so")));
    }

    #[test]
    fn links_replace_what_was_there() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::write(&a, "one").unwrap();
        std::fs::write(&b, "two").unwrap();
        let dir = t.path().join("side");
        link_side_by_side(&dir, &[("x", a)]).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("x")).unwrap(), "one");
        link_side_by_side(&dir, &[("x", b)]).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("x")).unwrap(), "two");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
