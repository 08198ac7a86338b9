//! Shared test helpers.
//!
//! The agent binary: `REEL_AGENT_BIN` if set, else the `reel-agent` cargo built for
//! this test run (`cargo test --workspace` builds it for the agent's own
//! integration tests), else one built once by a nested cargo into
//! `target/test-artefacts` (see `reel-test-artefacts`).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use reel_plugin_sdk::{
    Handle, JobRequest, OutputSink, Resources, Runner, RunnerConfig, StepRequest, Stream,
};
use reel_runner_process::ProcessRunner;

pub fn agent_binary() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| match std::env::var_os("REEL_AGENT_BIN") {
            Some(p) => PathBuf::from(p),
            None => reel_test_artefacts::file("reel-agent"),
        })
        .clone()
}

/// The cgroup parent a test uses, unique per test process and sandbox.
pub fn cgroup_parent(sandbox_id: u32) -> String {
    format!("reel-test-{}-{sandbox_id}", std::process::id())
}

pub fn config(root: &Path, sandbox_id: u32) -> RunnerConfig {
    RunnerConfig {
        sandbox_root: root.to_owned(),
        plugin_dir: PathBuf::new(),
        options: BTreeMap::from([
            (
                "agent_path".to_owned(),
                agent_binary().display().to_string(),
            ),
            ("cgroup_parent".to_owned(), cgroup_parent(sandbox_id)),
            ("pids_max".to_owned(), "500".to_owned()),
        ]),
    }
}

pub fn job(sandbox_id: u32) -> JobRequest {
    JobRequest {
        job_id: 9000 + u64::from(sandbox_id),
        sandbox_id,
        name: format!("test-{sandbox_id}"),
        image: None,
        resources: Resources {
            memory_mib: 128,
            vcpus: 0,
            disk_mib: 0,
        },
        environment: BTreeMap::from([("JOB_VAR".to_owned(), "from-job".to_owned())]),
        cancel_grace_ms: None,
        network: Default::default(),
    }
}

pub fn step(exec_id: u64, command: &str) -> StepRequest {
    StepRequest {
        exec_id,
        index: exec_id as u32,
        name: format!("step-{exec_id}"),
        command: command.to_owned(),
        environment: BTreeMap::new(),
        timeout_ms: None,
        resume_from: 0,
    }
}

/// Records output and checks offsets are contiguous from `start`.
#[derive(Clone, Debug, Default)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Combined output in offset order.
    pub combined: Vec<u8>,
    pub start: u64,
    pub next: u64,
    pub gaps: Vec<String>,
}

impl Output {
    pub fn from_offset(start: u64) -> Output {
        Output {
            start,
            next: start,
            ..Output::default()
        }
    }
}

impl OutputSink for Output {
    fn chunk(&mut self, stream: Stream, offset: u64, bytes: &[u8]) {
        if offset != self.next {
            self.gaps
                .push(format!("chunk at {offset}, expected {}", self.next));
        }
        self.next = offset + bytes.len() as u64;
        self.combined.extend_from_slice(bytes);
        match stream {
            Stream::Stdout => self.stdout.extend_from_slice(bytes),
            Stream::Stderr => self.stderr.extend_from_slice(bytes),
        }
    }
}

/// A sink shared with the test thread.
#[derive(Clone, Default)]
pub struct Shared(pub Arc<Mutex<Output>>);

impl OutputSink for Shared {
    fn chunk(&mut self, stream: Stream, offset: u64, bytes: &[u8]) {
        self.0.lock().unwrap().chunk(stream, offset, bytes);
    }
}

/// The cgroup directories a job of this test would use on this host (v1 here).
pub fn v1_cgroup(controller: &str, sandbox_id: u32) -> PathBuf {
    PathBuf::from(format!(
        "/sys/fs/cgroup/{controller}/{}/sbx-{sandbox_id}",
        cgroup_parent(sandbox_id)
    ))
}

pub fn v1_available() -> bool {
    Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists()
        && Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists()
        && !Path::new("/sys/fs/cgroup/unified/memory.max").exists()
}

fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(3)?.parse().ok()
}

/// Live processes whose cgroup names this test's job or whose session is `agent_sid`.
pub fn job_processes(sandbox_id: u32, agent_sid: Option<i32>) -> Vec<(i32, String)> {
    let marker = format!("{}/sbx-{sandbox_id}", cgroup_parent(sandbox_id));
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Some(sid) = session_of(pid) else { continue };
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cgroups.contains(&marker) || Some(sid) == agent_sid {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    found
}

pub fn assert_nothing_left(root: &Path, sandbox_id: u32, agent_sid: Option<i32>) {
    let left = job_processes(sandbox_id, agent_sid);
    assert!(left.is_empty(), "processes of the job remain: {left:?}");
    assert!(
        !root.join(sandbox_id.to_string()).exists(),
        "the sandbox dir remains"
    );
    for controller in ["memory", "pids", "freezer"] {
        let cg = v1_cgroup(controller, sandbox_id);
        assert!(!cg.exists(), "{} remains", cg.display());
    }
}

/// Removes the test's cgroup parents (the runner leaves the shared parent alone).
pub fn remove_cgroup_parent(sandbox_id: u32) {
    for controller in ["memory", "pids", "freezer"] {
        let _ = std::fs::remove_dir(format!(
            "/sys/fs/cgroup/{controller}/{}",
            cgroup_parent(sandbox_id)
        ));
    }
}

/// A runner with a job planned, prepared, booted and connected.
pub struct Fixture {
    pub root: tempfile::TempDir,
    pub sandbox_id: u32,
    pub runner: ProcessRunner,
    pub plan: Handle,
    pub prepared: Handle,
    pub handle: Handle,
}

impl Fixture {
    pub fn new(sandbox_id: u32) -> Fixture {
        Fixture::with_job(job(sandbox_id))
    }

    /// A fixture for `job` (its `sandbox_id` names the sandbox).
    pub fn with_job(job: JobRequest) -> Fixture {
        let sandbox_id = job.sandbox_id;
        let root = tempfile::tempdir().unwrap();
        let runner = ProcessRunner::new(&config(root.path(), sandbox_id)).unwrap();
        let plan = runner.plan(&job).unwrap();
        let prepared = runner.prepare(&plan).unwrap();
        let booted = runner.boot(&prepared).unwrap();
        let handle = runner.connect(&booted).unwrap();
        Fixture {
            root,
            sandbox_id,
            runner,
            plan,
            prepared,
            handle,
        }
    }

    pub fn new_runner(&self) -> ProcessRunner {
        ProcessRunner::new(&config(self.root.path(), self.sandbox_id)).unwrap()
    }

    pub fn agent_pid(&self) -> i32 {
        std::fs::read_to_string(
            self.root
                .path()
                .join(format!("{}/agent.pid", self.sandbox_id)),
        )
        .unwrap()
        .trim()
        .parse()
        .unwrap()
    }

    pub fn dir(&self) -> PathBuf {
        self.root.path().join(self.sandbox_id.to_string())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.runner.cleanup(&self.handle);
        remove_cgroup_parent(self.sandbox_id);
    }
}
