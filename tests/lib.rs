//! Helpers shared by the workspace integration tests.
//!
//! End-to-end tests run the real `reel` binary, the real `reel-agent` and the real
//! process runner plugin, side by side as they are installed (`reel` loads plugins
//! from its own directory; the process runner finds `reel-agent` beside the plugin).
//! [`target_dir`] finds what cargo built for this test run, or builds it once
//! (see `reel-test-artefacts`), so `cargo test --workspace` needs no build first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A directory holding `reel`, `reel-agent`, `libreel_runner_process.so` and
/// `libreel_runner_qemu.so` side by side: `target/<profile>/` after `cargo build --workspace`, else links to what
/// `cargo test` built, else a nested build (see `reel_test_artefacts::dir_with`).
pub fn target_dir() -> PathBuf {
    reel_test_artefacts::dir_with(&[
        "reel",
        "reel-agent",
        "libreel_runner_process.so",
        "libreel_runner_qemu.so",
    ])
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `reel --state-dir STATE ARGS...` with extra environment, waited for.
pub fn reel(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(target_dir().join("reel"));
    cmd.arg("--state-dir").arg(state).args(args);
    cmd.env_remove("RUST_LOG").env_remove("REEL_PLUGIN_DIR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.current_dir(workspace_root());
    cmd.output().expect("cannot run reel")
}

/// Starts `reel run -q JOB` (with `env`, output discarded) and waits until the
/// first step's stored output holds at least `stored` bytes (one at least): the
/// running engine holds the log, so this watches the output file itself. Panics
/// if that takes longer than `within`.
pub fn start_run_until_output(
    state: &Path,
    job: &Path,
    env: &[(&str, &str)],
    stored: u64,
    within: Duration,
) -> std::process::Child {
    let mut cmd = Command::new(target_dir().join("reel"));
    cmd.arg("--state-dir")
        .arg(state)
        .args(["run", "-q"])
        .arg(job)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("cannot run reel");
    let out_file = state.join("output/1/0.out");
    let deadline = Instant::now() + within;
    while std::fs::metadata(&out_file).map_or(0, |m| m.len()) < stored.max(1) {
        assert!(
            Instant::now() < deadline,
            "the step's output never reached the log"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Text of a byte buffer, for assertions.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Pids of processes whose environment names this state directory's sandbox root,
/// i.e. processes a job of this state directory started (steps inherit the
/// sandbox's `HOME`). Zombies and unreadable processes are skipped.
pub fn processes_under(root: &Path) -> Vec<u32> {
    processes_naming(&root.to_string_lossy())
}

/// The processes whose command line or environment holds `needle`.
pub fn processes_naming(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let hay = [cmdline, environ].concat();
        if hay.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// SIGKILLs every process of this state directory's sandboxes (an agent and its
/// steps, as an OOM killer might), until none is left or 5 s have passed.
pub fn kill_sandboxes(state: &Path) {
    let root = state.join("sandboxes");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = processes_under(&root);
        for pid in &procs {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(*pid as i32).unwrap(),
                rustix::process::Signal::KILL,
            );
        }
        if procs.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Directories the process runner's cgroups could leave behind for sandbox ids
/// under the `reel` cgroup parent (v1 memory/pids, or v2).
pub fn reel_cgroups() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for parent in [
        "/sys/fs/cgroup/memory/reel",
        "/sys/fs/cgroup/pids/reel",
        "/sys/fs/cgroup/freezer/reel",
        "/sys/fs/cgroup/reel",
    ] {
        if let Ok(entries) = std::fs::read_dir(parent) {
            out.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path()),
            );
        }
    }
    out
}

/// A command's stdout as JSON, or a panic showing what it printed.
pub fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} / {}", text(&out.stdout), text(&out.stderr)))
}

/// The tag the runners put in cgroup names for this sandbox root.
pub use reel_runner_kit::root_tag;

/// No process, workdir, cgroup or lease of this state directory remains.
pub fn assert_nothing_left(state: &Path, context: &str) {
    let root = state.join("sandboxes");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = processes_under(&root);
        if procs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{context}: processes remain: {procs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let dirs: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        dirs.is_empty(),
        "{context}: sandbox directories remain: {dirs:?}"
    );
    // The process runner's cgroups are `sbx-<tag>-<id>`, the QEMU runner's `vm-<tag>-<id>`.
    let tag = root_tag(&std::path::absolute(&root).unwrap());
    // A VM with `network: user` has the namespace `reel-vm-<tag>-<id>` and a
    // slirp4netns naming it.
    let netns = format!("/run/netns/reel-vm-{tag}-");
    let slirps = processes_naming(&netns);
    assert!(
        slirps.is_empty(),
        "{context}: slirp4netns remains: {slirps:?}"
    );
    let namespaces: Vec<_> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().starts_with(&netns))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        namespaces.is_empty(),
        "{context}: network namespaces remain: {namespaces:?}"
    );
    let ours = |name: &str| {
        name.strip_prefix("sbx-")
            .or_else(|| name.strip_prefix("vm-"))
            .is_some_and(|rest| rest.starts_with(&format!("{tag}-")))
    };
    for parent in [
        "/sys/fs/cgroup/memory/reel",
        "/sys/fs/cgroup/pids/reel",
        "/sys/fs/cgroup/freezer/reel",
        "/sys/fs/cgroup/reel",
    ] {
        if let Ok(entries) = std::fs::read_dir(parent) {
            let left: Vec<_> = entries
                .flatten()
                .filter(|e| ours(&e.file_name().to_string_lossy()))
                .map(|e| e.path())
                .collect();
            assert!(left.is_empty(), "{context}: cgroups remain: {left:?}");
        }
    }
    if state.join("log").exists() {
        let live = json(&reel(state, &["recover", "--dry-run", "--json"], &[]));
        assert_eq!(
            live,
            Value::Array(vec![]),
            "{context}: jobs still hold leases"
        );
        let verify = reel(state, &["verify"], &[]);
        assert!(
            verify.status.success(),
            "{context}: the log does not verify: {}",
            text(&verify.stdout)
        );
    }
}

/// The event names of a job's timeline, in order.
pub fn events(state: &Path, job: u64) -> Vec<String> {
    let v = json(&reel(state, &["replay", &job.to_string(), "--json"], &[]));
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect()
}

pub use reel_test_artefacts::guest_image;

/// The guest image's `spec.json`, parsed.
pub fn guest_spec() -> Value {
    let text = std::fs::read_to_string(guest_image().join("spec.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A job's stored artifacts as `reel inspect --json` lists them (names with an
/// `ArtifactStored` event), each `(name, bytes)` read from
/// `<state>/artifacts/<job>/<name>`, in the order they were stored. Asserts that
/// each file has the size and CRC-32C its event says, that no other file is in
/// the job's artifact directory (a partial copy would be one) and that no
/// partial directory is left.
pub fn stored_artifacts(state: &Path, job: u64) -> Vec<(String, Vec<u8>)> {
    let v = json(&reel(state, &["inspect", &job.to_string(), "--json"], &[]));
    let dir = state.join("artifacts").join(job.to_string());
    let mut listed = Vec::new();
    for a in v["artifacts"].as_array().cloned().unwrap_or_default() {
        let name = a["name"].as_str().unwrap().to_owned();
        let bytes = std::fs::read(dir.join(&name))
            .unwrap_or_else(|e| panic!("artifact {name} is listed but cannot be read: {e}"));
        assert_eq!(a["size"].as_u64(), Some(bytes.len() as u64), "{name}: size");
        assert_eq!(
            a["crc32c"].as_u64(),
            Some(u64::from(crc32c::crc32c(&bytes))),
            "{name}: crc32c"
        );
        listed.push((name, bytes));
    }
    fn files(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut on_disk = Vec::new();
    files(&dir, &dir, &mut on_disk);
    on_disk.sort();
    let mut names: Vec<String> = listed.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(
        on_disk,
        names,
        "files in {} that are not listed",
        dir.display()
    );
    let partial = state.join("artifacts").join(format!("{job}.part"));
    assert!(!partial.exists(), "{} is left", partial.display());
    listed
}

/// Starts `reel run JOB` with its stdout piped and reads it until `needle`
/// appears (the step is running). Panics if reel exits first or `within`
/// passes.
pub fn start_run_until_stdout(
    state: &Path,
    job: &str,
    needle: &str,
    within: Duration,
) -> std::process::Child {
    let mut child = Command::new(target_dir().join("reel"))
        .arg("--state-dir")
        .arg(state)
        .args(["run", job])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run reel");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut seen = Vec::new();
    let deadline = Instant::now() + within;
    while !text(&seen).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the step never printed {needle:?}: {}",
            text(&seen)
        );
        let mut buf = [0u8; 256];
        let n = std::io::Read::read(&mut stdout, &mut buf).expect("cannot read reel's stdout");
        assert!(n > 0, "reel exited early: {}", text(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    child
}

/// Interrupts `reel run` like a terminal's Ctrl-C (SIGINT) and checks it
/// exits 4 with job 1 ended `Cancelled`. Returns the job's events and how
/// long reel took to exit after the signal.
pub fn interrupt_run_until_cancelled(
    child: &mut std::process::Child,
    state: &Path,
) -> (Vec<String>, Duration) {
    let sent = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_child(child),
        rustix::process::Signal::INT,
    )
    .expect("cannot signal reel");
    let status = child.wait().expect("cannot wait for reel");
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(4), "{status:?}");
    let names = events(state, 1);
    assert_eq!(
        names.last().map(String::as_str),
        Some("Cancelled"),
        "{names:?}"
    );
    (names, took)
}

/// The time printed on the line of `output` that starts with `word` (a step
/// that traps signals prints `INT <time>`, `TERM <time>`).
pub fn time_after(output: &str, word: &str) -> f64 {
    output
        .lines()
        .find_map(|l| l.strip_prefix(word))
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {word:?} line in {output:?}"))
}

/// Panics with the command's exit code and output unless `out` is a success.
pub fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}\n{}\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Copies the directories and regular files under `from` to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        let ty = e.file_type().unwrap();
        if ty.is_dir() {
            copy_dir(&e.path(), &target);
        } else if ty.is_file() {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The ids `reel jobs --json` lists.
pub fn job_ids(state: &Path) -> Vec<u64> {
    let out = reel(state, &["jobs", "--json"], &[]);
    json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect()
}
