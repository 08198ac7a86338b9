//! The job's cgroup(s): cgroup v2 where the host has a writable cgroup2 hierarchy with
//! the `memory` and `pids` controllers, else the v1 `memory` and `pids` hierarchies
//! (hybrid hosts), else none.
//!
//! Detection only reads `/proc/self/mountinfo` and checks write access, so `plan` can
//! call it and name the cgroups before anything exists.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Which hierarchy a cgroup directory lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A cgroup v2 directory with the `memory` and `pids` controllers enabled.
    V2,
    /// A directory of the v1 `memory` hierarchy.
    V1Memory,
    /// A directory of the v1 `pids` hierarchy.
    V1Pids,
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
        };
        files.iter().copied().filter(|&(_, v)| v != 0).collect()
    }

    /// A one-line description for the resource list.
    pub fn describe(&self, memory_bytes: u64, pids_max: u64) -> String {
        let kind = match self.kind {
            Kind::V2 => "cgroup-v2",
            Kind::V1Memory => "cgroup-v1-memory",
            Kind::V1Pids => "cgroup-v1-pids",
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

    /// Moves `pid` into the cgroup.
    pub fn add(&self, pid: i32) -> io::Result<()> {
        write(&self.path.join("cgroup.procs"), &pid.to_string())
    }

    /// The processes in the cgroup (empty if it does not exist).
    pub fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// How many processes of this cgroup the kernel's OOM killer has ended so far:
    /// the `oom_kill` count of `memory.events` (v2) or `memory.oom_control` (v1,
    /// kernels from 4.13 on). `None` for a `pids` cgroup, a kernel without the
    /// count, or a cgroup that is gone.
    pub fn oom_kills(&self) -> Option<u64> {
        let file = match self.kind {
            Kind::V2 => "memory.events",
            Kind::V1Memory => "memory.oom_control",
            Kind::V1Pids => return None,
        };
        parse_oom_kills(&std::fs::read_to_string(self.path.join(file)).ok()?)
    }

    /// Removes the directory; a missing one is fine.
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io::Error::new(
                e.kind(),
                format!("cannot remove cgroup {}: {e}", self.path.display()),
            )),
            _ => Ok(()),
        }
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

    #[test]
    fn detect_is_deterministic() {
        assert_eq!(detect("reel", "sbx-1"), detect("reel", "sbx-1"));
    }
}
