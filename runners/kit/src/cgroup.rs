//! The job's cgroup(s): cgroup v2 where the host has a writable cgroup2 hierarchy with
//! the `memory` and `pids` controllers, else the v1 `memory` and `pids` hierarchies
//! (hybrid hosts) and the v1 `freezer` where it is mounted, else none.
//!
//! Detection only reads `/proc/self/mountinfo` and checks write access, so `plan` can
//! call it and name the cgroups before anything exists.
//!
//! A job's cgroup is a subtree, not one directory: a step (as root) may make child
//! cgroups under its own and move into them. Everything here that looks for
//! processes or removes directories walks the whole subtree ([`Cgroup::subtree`]),
//! children before parents. Stopping a subtree: v2 `cgroup.kill` (Linux 5.14) kills
//! it at once; otherwise the cgroup is frozen where it can be (v2 `cgroup.freeze`,
//! the v1 freezer, which freezes its descendants too) so that nothing forks while
//! its processes are killed, and the runner repeats kill passes until none is left.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Makes the child `cmd` spawns join `cgroups` between fork and exec, so that it
/// and everything it starts are in them from its first instruction: the child
/// writes `0` (itself) into each cgroup's `cgroup.procs`. This is what lets a
/// runner find every process of a job from its cgroups alone, with no scan of
/// the host's processes. The returned descriptors must live until `cmd` has
/// spawned (drop them after).
pub fn join_on_exec(
    cmd: &mut std::process::Command,
    cgroups: &[Cgroup],
) -> Result<Vec<std::os::fd::OwnedFd>, reel_plugin_sdk::RunnerError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let procs: Vec<std::os::fd::OwnedFd> = cgroups
        .iter()
        .map(|c| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(c.path.join("cgroup.procs"))
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| {
                    reel_plugin_sdk::RunnerError::failed(format!(
                        "cannot open {}/cgroup.procs: {e} (prepare did not run?)",
                        c.path.display()
                    ))
                })
        })
        .collect::<Result<_, _>>()?;
    let raw: Vec<i32> = procs.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure only calls write(2) on descriptors opened before the
    // fork (async-signal-safe, no allocation).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &raw {
                let fd = std::os::fd::BorrowedFd::borrow_raw(fd);
                rustix::io::write(fd, b"0").map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
    Ok(procs)
}

/// Which hierarchy a cgroup directory lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A cgroup v2 directory with the `memory` and `pids` controllers enabled.
    V2,
    /// A directory of the v1 `memory` hierarchy.
    V1Memory,
    /// A directory of the v1 `pids` hierarchy.
    V1Pids,
    /// A directory of the v1 `freezer` hierarchy (no limits; it stops the job's
    /// processes from forking while they are killed).
    V1Freezer,
}

/// One cgroup directory of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    /// The hierarchy.
    pub kind: Kind,
    /// The hierarchy's mount point.
    pub root: PathBuf,
    /// The job's directory in it.
    pub path: PathBuf,
}

/// The outcome of [`detect`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Detected {
    /// The cgroup directories the job will use.
    pub cgroups: Vec<Cgroup>,
    /// What could not be used, if anything (for a notice).
    pub note: Option<String>,
}

struct Mount {
    point: PathBuf,
    fstype: String,
    options: Vec<String>,
}

fn mounts() -> Vec<Mount> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional...] - fstype source super-options
            let (left, right) = line.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_owned();
            let _source = r.next();
            let options = r
                .next()
                .unwrap_or_default()
                .split(',')
                .map(str::to_owned)
                .collect();
            Some(Mount {
                point: PathBuf::from(unescape(point)),
                fstype,
                options,
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.clone().take(3).collect();
            if code.len() == 3
                && let Ok(v) = u8::from_str_radix(&code, 8)
            {
                out.push(char::from(v));
                for _ in 0..3 {
                    chars.next();
                }
                continue;
            }
        }
        out.push(c);
    }
    out
}

fn writable(path: &Path) -> bool {
    rustix::fs::access(path, rustix::fs::Access::WRITE_OK).is_ok()
}

/// Finds where the job's cgroup `<parent>/<name>` would live. Reads only.
pub fn detect(parent: &str, name: &str) -> Detected {
    let mounts = mounts();
    let relative = Path::new(parent).join(name);
    for m in mounts.iter().filter(|m| m.fstype == "cgroup2") {
        let controllers =
            std::fs::read_to_string(m.point.join("cgroup.controllers")).unwrap_or_default();
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if has("memory") && has("pids") && writable(&m.point) {
            return Detected {
                cgroups: vec![Cgroup {
                    kind: Kind::V2,
                    root: m.point.clone(),
                    path: m.point.join(&relative),
                }],
                note: None,
            };
        }
    }
    let mut detected = Detected::default();
    let mut missing = Vec::new();
    for (controller, kind) in [("memory", Kind::V1Memory), ("pids", Kind::V1Pids)] {
        let found = mounts.iter().find(|m| {
            m.fstype == "cgroup" && m.options.iter().any(|o| o == controller) && writable(&m.point)
        });
        match found {
            Some(m) => detected.cgroups.push(Cgroup {
                kind,
                root: m.point.clone(),
                path: m.point.join(&relative),
            }),
            None => missing.push(controller),
        }
    }
    // Optional: without it, cleanup kills in repeated passes without freezing.
    if let Some(m) = mounts.iter().find(|m| {
        m.fstype == "cgroup" && m.options.iter().any(|o| o == "freezer") && writable(&m.point)
    }) {
        detected.cgroups.push(Cgroup {
            kind: Kind::V1Freezer,
            root: m.point.clone(),
            path: m.point.join(&relative),
        });
    }
    if !missing.is_empty() {
        detected.note = Some(format!(
            "no writable cgroup2 hierarchy with the memory and pids controllers, and no \
             writable cgroup v1 hierarchy for {}: the job runs without {} limits",
            missing.join(" and "),
            missing.join(" and ")
        ));
    }
    detected
}

/// Where a runner puts its jobs' cgroups: the `cgroup_parent` option (default
/// `reel`), and whether leaf names carry a tag of the sandbox root. Sandbox ids are
/// unique per engine state directory, not per host, so with the default, shared
/// parent each leaf is `<prefix>-<root tag>-<sandbox_id>` and two engines (or two
/// test runs) on one host never share a cgroup; an explicit parent is trusted to
/// be this engine's own, and the leaf is `<prefix>-<sandbox_id>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    parent: String,
    tagged: bool,
}

impl Placement {
    /// From a runner's options; refuses a parent that is empty, absolute or
    /// climbs with `..`.
    pub fn from_options(
        options: &std::collections::BTreeMap<String, String>,
    ) -> Result<Placement, reel_plugin_sdk::RunnerError> {
        let parent = options
            .get("cgroup_parent")
            .cloned()
            .unwrap_or_else(|| "reel".to_owned());
        if parent.is_empty()
            || Path::new(&parent)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(reel_plugin_sdk::RunnerError::invalid_input(format!(
                "option cgroup_parent {parent:?} must be a relative path without `..`"
            )));
        }
        Ok(Placement {
            tagged: !options.contains_key("cgroup_parent"),
            parent,
        })
    }

    /// The cgroup(s) of sandbox `sandbox_id` under sandbox root `root` (see
    /// [`detect`]), leaves named `<prefix>-...`.
    pub fn detect(&self, root: &Path, prefix: &str, sandbox_id: u32) -> Detected {
        let leaf = if self.tagged {
            format!("{prefix}-{}-{sandbox_id}", crate::root_tag(root))
        } else {
            format!("{prefix}-{sandbox_id}")
        };
        detect(&self.parent, &leaf)
    }
}

/// Removes `cgroups` (each subtree, children first), retrying until `deadline`
/// while an exiting process keeps one busy; `kill_again` runs between tries (a
/// process may have been moved into any of the job's cgroups since).
pub fn remove_all(
    cgroups: &[Cgroup],
    deadline: std::time::Instant,
    mut kill_again: impl FnMut(),
) -> io::Result<()> {
    for cg in cgroups {
        let mut round = 0;
        loop {
            match cg.remove() {
                Ok(()) => break,
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => {
                    kill_again();
                    std::thread::sleep(crate::backoff(&mut round));
                }
            }
        }
    }
    Ok(())
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot write {value:?} to {}: {e}", path.display()),
        )
    })
}

impl Cgroup {
    /// The limit files this cgroup gets, with their values (0 = left at the default).
    pub fn limits(&self, memory_bytes: u64, pids_max: u64) -> Vec<(&'static str, u64)> {
        let files: &[(&'static str, u64)] = match self.kind {
            Kind::V2 => &[("memory.max", memory_bytes), ("pids.max", pids_max)],
            Kind::V1Memory => &[("memory.limit_in_bytes", memory_bytes)],
            Kind::V1Pids => &[("pids.max", pids_max)],
            Kind::V1Freezer => &[],
        };
        files.iter().copied().filter(|&(_, v)| v != 0).collect()
    }

    /// A one-line description for the resource list.
    pub fn describe(&self, memory_bytes: u64, pids_max: u64) -> String {
        let kind = match self.kind {
            Kind::V2 => "cgroup-v2",
            Kind::V1Memory => "cgroup-v1-memory",
            Kind::V1Pids => "cgroup-v1-pids",
            Kind::V1Freezer => "cgroup-v1-freezer",
        };
        let limits: Vec<String> = self
            .limits(memory_bytes, pids_max)
            .iter()
            .map(|(f, v)| format!("{f}={v}"))
            .collect();
        if limits.is_empty() {
            format!("{kind} {} (no limits)", self.path.display())
        } else {
            format!("{kind} {} ({})", self.path.display(), limits.join(", "))
        }
    }

    /// Creates the directory (idempotent) and writes the limits.
    pub fn create(&self, memory_bytes: u64, pids_max: u64) -> io::Result<()> {
        if self.kind == Kind::V2 {
            // Enable the controllers on every level from the root down to the parent.
            let parent = self.path.parent().unwrap_or(&self.root);
            std::fs::create_dir_all(parent)?;
            let mut dir = self.root.clone();
            let rest = parent.strip_prefix(&self.root).unwrap_or(Path::new(""));
            write(&dir.join("cgroup.subtree_control"), "+memory +pids")?;
            for part in rest.components() {
                dir.push(part);
                write(&dir.join("cgroup.subtree_control"), "+memory +pids")?;
            }
        }
        match std::fs::create_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot create cgroup {}: {e}", self.path.display()),
                ));
            }
            _ => {}
        }
        for (file, value) in self.limits(memory_bytes, pids_max) {
            write(&self.path.join(file), &value.to_string())?;
        }
        Ok(())
    }

    /// Whether the directory exists.
    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    /// Every directory of the cgroup's subtree, each after all of its descendants
    /// (the order to remove them in); empty if the cgroup does not exist. Walked
    /// without recursion: a step decides how deep its child cgroups nest. A
    /// directory whose link count is 2 has no subdirectories (cgroupfs keeps a
    /// directory's count at 2 + its subdirectories, as ext4 and tmpfs do) and is
    /// not listed: one `stat` instead of reading its dozens of control files'
    /// entries. Any other count (a filesystem that does not keep it) is listed.
    pub fn subtree(&self) -> Vec<PathBuf> {
        use std::os::unix::fs::MetadataExt as _;
        let mut parents_first = Vec::new();
        let mut stack = vec![self.path.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = std::fs::symlink_metadata(&dir) else {
                continue;
            };
            if !meta.is_dir() {
                continue;
            }
            if meta.nlink() != 2
                && let Ok(entries) = std::fs::read_dir(&dir)
            {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            parents_first.push(dir);
        }
        // Each directory was listed before anything below it.
        parents_first.reverse();
        parents_first
    }

    /// The processes in the cgroup and every cgroup below it (empty if it does not
    /// exist).
    pub fn procs(&self) -> Vec<i32> {
        self.subtree()
            .iter()
            .flat_map(|dir| {
                std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect()
    }

    /// Kills every process of the subtree at once where the kernel can (v2
    /// `cgroup.kill`, Linux 5.14 and later); false where it cannot.
    pub fn kill_subtree(&self) -> bool {
        let file = self.path.join("cgroup.kill");
        self.kind == Kind::V2 && file.exists() && write(&file, "1").is_ok()
    }

    /// Freezes (or thaws) the subtree where this cgroup can: v1 freezer
    /// `freezer.state`, v2 `cgroup.freeze` (Linux 5.2). False where it cannot.
    pub fn set_frozen(&self, frozen: bool) -> bool {
        let (file, value) = match (self.kind, frozen) {
            (Kind::V1Freezer, true) => ("freezer.state", "FROZEN"),
            (Kind::V1Freezer, false) => ("freezer.state", "THAWED"),
            (Kind::V2, true) => ("cgroup.freeze", "1"),
            (Kind::V2, false) => ("cgroup.freeze", "0"),
            _ => return false,
        };
        let file = self.path.join(file);
        file.exists() && write(&file, value).is_ok()
    }

    /// Whether the subtree is frozen (every process of it stopped).
    pub fn is_frozen(&self) -> bool {
        match self.kind {
            Kind::V1Freezer => std::fs::read_to_string(self.path.join("freezer.state"))
                .is_ok_and(|s| s.trim() == "FROZEN"),
            Kind::V2 => std::fs::read_to_string(self.path.join("cgroup.events"))
                .is_ok_and(|s| s.lines().any(|l| l == "frozen 1")),
            Kind::V1Memory | Kind::V1Pids => false,
        }
    }

    /// How many processes of this cgroup the kernel's OOM killer has ended so far:
    /// the `oom_kill` count of `memory.events` (v2) or `memory.oom_control` (v1,
    /// kernels from 4.13 on). `None` for a `pids` cgroup, a kernel without the
    /// count, or a cgroup that is gone.
    pub fn oom_kills(&self) -> Option<u64> {
        let file = match self.kind {
            Kind::V2 => "memory.events",
            Kind::V1Memory => "memory.oom_control",
            Kind::V1Pids | Kind::V1Freezer => return None,
        };
        parse_oom_kills(&std::fs::read_to_string(self.path.join(file)).ok()?)
    }

    /// Removes the directory and every cgroup below it, children first; a missing
    /// one is fine. Fails while a process is left in any of them.
    pub fn remove(&self) -> io::Result<()> {
        // Most often the group has no children: gone in one rmdir.
        match std::fs::remove_dir(&self.path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(_) => {}
        }
        for dir in self.subtree() {
            match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot remove cgroup {}: {e}", dir.display()),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The `oom_kill N` line of `memory.events` or `memory.oom_control` (whose
/// `oom_kill_disable` line is another key).
fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == "oom_kill").then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_parent_tags_leaves_and_a_bad_parent_is_refused() {
        use std::collections::BTreeMap;
        let tagged = Placement::from_options(&BTreeMap::new()).unwrap();
        assert_eq!(tagged.parent, "reel");
        assert!(tagged.tagged);
        let own: BTreeMap<String, String> = [("cgroup_parent".into(), "ci/reel".into())].into();
        let own = Placement::from_options(&own).unwrap();
        assert_eq!((own.parent.as_str(), own.tagged), ("ci/reel", false));
        for bad in ["", "/abs", "../up", "a/../b"] {
            let opts: BTreeMap<String, String> = [("cgroup_parent".into(), bad.into())].into();
            let err = Placement::from_options(&opts).unwrap_err();
            assert!(
                err.message.contains("relative path"),
                "{bad:?}: {}",
                err.message
            );
        }
    }

    #[test]
    fn reads_the_oom_kill_count_of_either_hierarchy() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_oom_kills(v1), Some(3));
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(1));
        // A v1 kernel older than 4.13 has no count.
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
    }

    #[test]
    fn unescapes_mountinfo() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/plain"), "/plain");
    }

    /// Children come before their parents, at every depth, and nothing but
    /// directories is listed.
    #[test]
    fn a_subtree_lists_children_before_parents() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("sbx-1");
        for d in ["a/b/c", "a/d", "e"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("a/cgroup.procs"), "").unwrap();
        let cg = Cgroup {
            kind: Kind::V1Memory,
            root: dir.path().to_owned(),
            path: root.clone(),
        };
        let order = cg.subtree();
        let at = |d: &str| {
            order
                .iter()
                .position(|p| *p == root.join(d))
                .unwrap_or_else(|| panic!("{d} missing from {order:?}"))
        };
        assert_eq!(order.len(), 6, "{order:?}");
        assert!(at("a/b/c") < at("a/b") && at("a/b") < at("a"));
        assert!(at("a/d") < at("a") && at("a") < at(""));
        assert!(at("e") < at(""));
        assert_eq!(order.last(), Some(&root));
        let gone = Cgroup {
            path: dir.path().join("missing"),
            ..cg
        };
        assert!(gone.subtree().is_empty());
    }

    #[test]
    fn detect_is_deterministic() {
        assert_eq!(detect("reel", "sbx-1"), detect("reel", "sbx-1"));
    }
}
