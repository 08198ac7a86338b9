//! The QEMU runner: each job in its own microVM, with the reel agent inside.
//!
//! Each job gets a directory `<sandbox_root>/<sandbox_id>` holding
//!
//! - `<volume>.img`: one sparse ext4 file per volume of the image's spec, attached as
//!   virtio-blk disks (`vda`, `vdb`, ...) and mounted by the guest's init where the
//!   kernel command line's `reel.volumes=` says;
//! - `a.sock`: QEMU's chardev socket of the virtio-serial port the guest agent
//!   speaks on (`virtserialport name=agent0`); `q.sock`: QMP;
//! - `qemu.pid` (QEMU's `-pidfile`), `console.log` (the guest's serial console),
//!   `qemu.log` (what QEMU printed before it daemonized);
//! - with `network: user`, `slirp4netns.log`, beside the network namespace
//!   `/run/netns/reel-vm-<root tag>-<sandbox_id>` ([`net`]);
//!
//! and a cgroup (`<parent>/vm-<root tag>-<sandbox_id>`, v2 or the v1 memory, pids
//! and freezer hierarchies) that QEMU is in from its first instruction: the child
//! writes itself into the cgroup between `fork` and `exec`. Its memory limit is the
//! guest's memory plus [`QEMU_OVERHEAD_MIB`] for QEMU itself, so a guest cannot take
//! the host down and QEMU's own death by OOM is told apart from the guest's.
//!
//! # Lifecycle
//!
//! | call | what it does | event the engine logs after it |
//! |---|---|---|
//! | `plan` | names every resource from the job and the image spec; the guest CID is `sandbox_id + 3` (the engine's lease: never two live VMs with one CID) | `SandboxPlanned`, `CidAllocated` |
//! | `prepare` | directory, volumes (`mkfs.ext4`, no journal where the spec says), cgroup, session token; with `network: user` the network namespace and its prohibit routes | `VolumesFormatted` |
//! | `boot` | with `network: user` slirp4netns first; `qemu-system-x86_64 -daemonize` in the cgroup (and the namespace); QMP polled until `query-status` says `running`; pid and start time in the handle | `VmBooted` |
//! | `connect` | the agent's `Hello` over the chardev socket (stale bytes of an earlier host skipped), `Init` with the token; a boot that hangs before `Hello` is retried once (notice `boot-retry`) | `AgentConnected` |
//! | `exec` | the step through the agent, as the process runner does ([`reel_runner_kit::session`]) | step events |
//! | `drain` | the agent's `Drain` | `Drained` |
//! | `collect` | the job's artifacts read from the guest's work directory through the agent (`ListFiles`, `ReadFile`), as the process runner does ([`Sessions::collect`]) | `ArtifactStored` each |
//! | `poweroff` | agent `Poweroff` (the guest's init then runs `poweroff -f`) → QMP `system_powerdown` → SIGKILL, each with a share of the deadline | `PoweredOff` |
//! | `cleanup` | every QEMU (and slirp4netns) of the job killed (by handle, pidfile, cgroup, or command line), cgroup, directory and network namespace removed | `Cleaned` |
//!
//! A cancel is the guest agent's SIGINT → SIGTERM → SIGKILL ladder with the job's
//! `cancel_grace` between the signals (kept in the handle, from format version
//! 2; a version 1 handle is still read, with the default grace).
//!
//! # Why a step failed
//!
//! When QEMU dies during a step, the step fails with its cause, and the last
//! [`console::TAIL_BYTES`] of the console go to the step's stderr: out of memory
//! (QEMU killed by the OOM killer in its cgroup), a guest kernel panic (read from
//! the console), or an unexpected exit. A step that fails while the guest's own
//! OOM killer ended processes (the console says `Out of memory: Killed process`)
//! fails with "out of memory" and the guest's memory size.
//!
//! # Options (`RunnerConfig.options`; `reel run --runner-option KEY=VALUE`)
//!
//! - `image`: the guest image directory (holding `spec.json`) when the job names
//!   none; default `guest/current` in the plugin directory's parent or the one
//!   above, which `scripts/build-guest-image` makes in a checkout
//!   (`target/guest/current` beside `target/debug`). A job's `image:` is such a
//!   directory (or its `spec.json`).
//! - `qemu`: the QEMU binary (default `qemu-system-x86_64` on `PATH`);
//! - `bios`: the firmware for microvm (default `/usr/share/qemu/qboot.rom`);
//! - `accel`: `tcg`, `kvm` or `auto` (default): `auto` uses KVM only where
//!   `/dev/kvm` opens and a guest of this image booted under it to its agent
//!   within [`KVM_PROBE_TIMEOUT`] — probed once per host kernel, QEMU and image
//!   kernel and remembered in `$TMPDIR/reel-qemu-accel-probe` (the answer is the
//!   host's, not one engine's) — else TCG. Each boot says which, in a notice.
//! - `slirp4netns`: the slirp4netns binary for `network: user` (default
//!   `slirp4netns` on `PATH`);
//! - `cgroup_parent`: as the process runner's (default `reel`).
//!
//! # Network
//!
//! A job's `network:` is `none` by default (no NIC in the guest); `user` gives
//! it outbound NAT with the host and private ranges unreachable ([`net`]).

mod console;
pub mod net;
pub mod qmp;
pub mod spec;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reel_agent::procfs::{self, Process};
use reel_agent::{AgentClient, ExecRequest};
use reel_plugin_sdk::{
    Capability, CollectRequest, Collection, Description, ExecResult, Handle, JobRequest, Network,
    OutputSink, Probe, Runner, RunnerConfig, RunnerError, StepRequest, Stored, Stream,
};
use reel_runner_kit::oom::{OOM_NOTICE, how_it_ended, memory_limit, out_of_memory, with_oom_cause};
use reel_runner_kit::session::Key;
use reel_runner_kit::{
    Cgroup, Session, Sessions, backoff, cgroup, client_error, lock, random_token, sandbox,
};
use serde::{Deserialize, Serialize};

use crate::spec::{Machine, Spec, VolumeSpec};

reel_plugin_sdk::export_runner!(QemuRunner);

/// The format version of the handle bytes: 2 appends the job's cancel grace to
/// version 1's `VmState`, 3 the job's network namespace after that (both older
/// versions are still read, as jobs without a network).
pub const HANDLE_VERSION: u32 = 3;
/// The `PATH` of a step in the guest whose job sets none.
pub const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The guest's home and the steps' working directory (the image's first volume).
pub const GUEST_WORKDIR: &str = "/work";
/// What QEMU needs beside the guest's memory (its code, TCG's translation cache of
/// [`TB_SIZE_MIB`], device buffers), in the job's memory cgroup.
pub const QEMU_OVERHEAD_MIB: u64 = 320;
/// TCG's translation block cache (QEMU's default is 1 GiB, most of it never used by a
/// small guest, but it counts against the cgroup once touched).
pub const TB_SIZE_MIB: u64 = 128;
/// How long a KVM probe boot may take before KVM is taken as unusable.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// From starting QEMU to its QMP saying `running`.
const QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// From `running` to the agent's `Hello` (a TCG boot takes 1-3 s; a loaded host more).
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);
/// Reconnecting to an agent that already said `Hello` once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a step whose agent connection broke waits for QEMU to exit, to tell a
/// dead VM from a broken connection.
const DYING_PATIENCE: Duration = Duration::from_secs(3);
/// How long `cleanup` keeps killing before it gives up.
const CLEANUP_PATIENCE: Duration = Duration::from_secs(5);
/// The notice kind of a boot retried because the guest hung before its agent started.
pub const BOOT_RETRY_NOTICE: &str = "boot-retry";
/// The notice kind that says which accelerator a VM got.
pub const ACCEL_NOTICE: &str = "accelerator";

/// A process of the job in its handle (QEMU, slirp4netns): pid and start time
/// (clock ticks after boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct ProcId {
    pid: i32,
    start_time: u64,
}

impl ProcId {
    /// The process, if it still runs (same pid and start time).
    fn live(self) -> Option<Process> {
        (procfs::start_time(self.pid) == Some(self.start_time)).then_some(Process {
            pid: self.pid,
            start_time: self.start_time,
        })
    }
}

impl From<Process> for ProcId {
    fn from(p: Process) -> ProcId {
        ProcId {
            pid: p.pid,
            start_time: p.start_time,
        }
    }
}

/// One volume of the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Volume {
    spec: VolumeSpec,
    /// `<dir>/<name>.img`.
    path: PathBuf,
    size_mib: u64,
}

/// Everything the runner knows about a job; lives in the handle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct VmState {
    job_id: u64,
    sandbox_id: u32,
    /// `<sandbox_root>/<sandbox_id>`.
    dir: PathBuf,
    spec: Spec,
    memory_mib: u64,
    vcpus: u32,
    /// The guest's vsock CID, were vsock used (`sandbox_id + 3`).
    cid: u32,
    volumes: Vec<Volume>,
    agent_socket: PathBuf,
    qmp_socket: PathBuf,
    pidfile: PathBuf,
    console: PathBuf,
    qemu_log: PathBuf,
    cgroups: Vec<Cgroup>,
    cgroup_note: Option<String>,
    environment: BTreeMap<String, String>,
    /// Set by `prepare`.
    session_token: Option<String>,
    /// Set by `boot`.
    qemu: Option<ProcId>,
    /// `tcg` or `kvm`, set by `boot`.
    accel: Option<String>,
    /// QEMU starts so far (a hung boot is retried once).
    boots: u32,
    /// The job's `cancel_grace_ms` (handle version 2, after the fields above).
    #[serde(skip)]
    cancel_grace_ms: Option<u64>,
    /// `network: user`: the VM's network namespace (handle version 3, after
    /// the grace).
    #[serde(skip)]
    net: Option<net::VmNet>,
}

impl VmState {
    fn decode(handle: &Handle) -> Result<VmState, RunnerError> {
        let (mut state, grace, net): (VmState, Option<u64>, Option<net::VmNet>) =
            if handle.version == HANDLE_VERSION {
                reel_plugin_sdk::codec::decode(&handle.bytes).map_err(|e| {
                    RunnerError::invalid_input(format!("malformed handle: {}", e.message))
                })?
            } else {
                let (state, grace) = reel_runner_kit::decode_handle(handle)?;
                (state, grace, None)
            };
        state.cancel_grace_ms = grace;
        state.net = net;
        // A handle names paths this runner removes: refuse one that does not look
        // like ours rather than delete something else.
        let inside = |p: &Path| p.parent() == Some(state.dir.as_path());
        if state.dir.file_name() != Some(state.sandbox_id.to_string().as_ref())
            || !inside(&state.agent_socket)
            || !inside(&state.qmp_socket)
            || !inside(&state.pidfile)
            || !state.volumes.iter().all(|v| inside(&v.path))
            || state.net.as_ref().is_some_and(|n| {
                !inside(&n.log) || !n.name.ends_with(&format!("-{}", state.sandbox_id))
            })
        {
            return Err(RunnerError::invalid_input(
                "malformed handle: its paths are not those of a QEMU-runner sandbox",
            ));
        }
        Ok(state)
    }

    fn encode(&self) -> Result<Handle, RunnerError> {
        Handle::encode(HANDLE_VERSION, &(self, self.cancel_grace_ms, &self.net))
    }

    fn key(&self) -> Key {
        (self.job_id, self.sandbox_id)
    }

    /// The grace between the signals of a cancel of this job's steps.
    fn grace(&self) -> Duration {
        reel_runner_kit::session::cancel_grace(self.cancel_grace_ms)
    }

    /// The job's memory cgroup limit: the guest's memory and QEMU's own.
    fn cgroup_memory_bytes(&self) -> u64 {
        (self.memory_mib + QEMU_OVERHEAD_MIB) << 20
    }

    fn oom_kills(&self) -> Option<u64> {
        self.cgroups.iter().find_map(Cgroup::oom_kills)
    }

    fn token(&self) -> Result<&str, RunnerError> {
        self.session_token.as_deref().ok_or_else(|| {
            RunnerError::invalid_input("the handle has no session token: prepare did not run")
        })
    }

    fn resources(&self) -> Vec<String> {
        let mut list = vec![format!("workdir {}", self.dir.display())];
        list.extend(self.volumes.iter().map(|v| {
            format!(
                "volume {} ({} MiB ext4{}, guest {})",
                v.path.display(),
                v.size_mib,
                if v.spec.journal {
                    ""
                } else {
                    " without journal"
                },
                v.spec.mount
            )
        }));
        list.extend([
            format!("vm-cid {}", self.cid),
            format!("agent-socket {}", self.agent_socket.display()),
            format!("qmp-socket {}", self.qmp_socket.display()),
            format!("qemu-pidfile {}", self.pidfile.display()),
            format!("console-log {}", self.console.display()),
            format!(
                "qemu-process (pid in {}; {} MiB, {} vCPU, {:?}, kernel {})",
                self.pidfile.display(),
                self.memory_mib,
                self.vcpus,
                self.spec.machine,
                self.spec.kernel_version
            ),
        ]);
        match &self.net {
            Some(net) => list.extend(net.resources()),
            None => list.push("network none (the guest has no NIC)".to_owned()),
        }
        let memory = self.cgroup_memory_bytes();
        list.extend(self.cgroups.iter().map(|c| c.describe(memory, 0)));
        if let Some(note) = &self.cgroup_note {
            list.push(format!("cgroup-missing {note}"));
        }
        list
    }
}

/// The human-readable list of every resource a handle names (the lines `plan`
/// sends as planned-resource notices). Empty for a handle this runner cannot read.
pub fn plan_resources(handle: &Handle) -> Vec<String> {
    VmState::decode(handle)
        .map(|s| s.resources())
        .unwrap_or_default()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AccelChoice {
    Auto,
    Tcg,
    Kvm,
}

struct Settings {
    sandbox_root: PathBuf,
    plugin_dir: PathBuf,
    image: Option<PathBuf>,
    qemu: PathBuf,
    bios: PathBuf,
    /// slirp4netns, for `network: user` (option `slirp4netns`).
    slirp4netns: PathBuf,
    accel: AccelChoice,
    /// Where the jobs' cgroups go (option `cgroup_parent`).
    cgroups: cgroup::Placement,
}

/// The QEMU runner.
pub struct QemuRunner {
    settings: Settings,
    sessions: Sessions,
    /// The answer of `auto` once probed: (accelerator, why).
    accel: Mutex<Option<(String, String)>>,
}

impl QemuRunner {
    fn state(handle: &Handle) -> Result<VmState, RunnerError> {
        VmState::decode(handle)
    }

    /// The image a job boots: its own `image`, else the `image` option, else the
    /// checkout's `target/guest/current`: `guest/current` in the plugin directory's
    /// parent or one above (`target/debug/`, `target/<dir>/debug/`).
    fn image_path(&self, job: &JobRequest) -> PathBuf {
        if let Some(image) = &job.image {
            return PathBuf::from(image);
        }
        if let Some(image) = &self.settings.image {
            return image.clone();
        }
        let candidates: Vec<PathBuf> = self
            .settings
            .plugin_dir
            .ancestors()
            .skip(1)
            .take(2)
            .map(|d| d.join("guest/current"))
            .collect();
        candidates
            .iter()
            .find(|c| c.join("spec.json").is_file())
            .or(candidates.first())
            .cloned()
            .unwrap_or_else(|| PathBuf::from("guest/current"))
    }

    fn plan_state(&self, job: &JobRequest) -> Result<VmState, RunnerError> {
        let spec = spec::load(&self.image_path(job))
            .map_err(|e| RunnerError::invalid_input(e.to_string()))?;
        let root = std::path::absolute(&self.settings.sandbox_root).map_err(|e| {
            RunnerError::invalid_input(format!(
                "sandbox root {}: {e}",
                self.settings.sandbox_root.display()
            ))
        })?;
        let dir = root.join(job.sandbox_id.to_string());
        let agent_socket = dir.join("a.sock");
        // QMP's `q.sock` beside it is as long.
        sandbox::check_socket_path(&agent_socket, "agent socket")?;
        let mut volumes: Vec<Volume> = spec
            .volumes
            .iter()
            .map(|v| Volume {
                spec: v.clone(),
                path: dir.join(format!("{}.img", v.name)),
                size_mib: v.size_mib,
            })
            .collect();
        if job.resources.disk_mib != 0
            && let Some(first) = volumes.first_mut()
        {
            if job.resources.disk_mib < 16 {
                return Err(RunnerError::invalid_input(format!(
                    "disk_mib {} is below the 16 MiB an ext4 volume needs",
                    job.resources.disk_mib
                )));
            }
            first.size_mib = job.resources.disk_mib;
        }
        let memory_mib = match job.resources.memory_mib {
            0 => spec.memory_mib,
            m if m < 64 => {
                return Err(RunnerError::invalid_input(format!(
                    "memory {m} MiB is below the 64 MiB a guest needs"
                )));
            }
            m => m,
        };
        let vcpus = match job.resources.vcpus {
            0 => spec.vcpus,
            v if v > 64 => {
                return Err(RunnerError::invalid_input(format!(
                    "{v} vCPUs are more than the 64 a guest gets"
                )));
            }
            v => v,
        };
        let detected = self.settings.cgroups.detect(&root, "vm", job.sandbox_id);
        let net = match job.network {
            Network::User => Some(net::VmNet::plan(&root, &dir, job.sandbox_id)),
            Network::None | Network::Default => None,
        };
        Ok(VmState {
            job_id: job.job_id,
            sandbox_id: job.sandbox_id,
            cid: job.sandbox_id.saturating_add(3),
            volumes,
            agent_socket,
            qmp_socket: dir.join("q.sock"),
            pidfile: dir.join("qemu.pid"),
            console: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            dir,
            spec,
            memory_mib,
            vcpus,
            cgroups: detected.cgroups,
            cgroup_note: detected.note,
            environment: job.environment.clone(),
            session_token: None,
            qemu: None,
            accel: None,
            boots: 0,
            cancel_grace_ms: job.cancel_grace_ms,
            net,
        })
    }

    /// The live QEMU processes of the job: the one in the handle (same pid and start
    /// time), the one the pidfile names if its command line names this job's
    /// pidfile, and any process of the job's cgroups; on a host without cgroups,
    /// also any process whose command line names this job's pidfile (a QEMU that
    /// had not written it yet). Sorted.
    fn qemus(state: &VmState) -> Vec<Process> {
        let mut found: Vec<Process> = state.qemu.and_then(ProcId::live).into_iter().collect();
        let names_us = |pid: i32| procfs::has_arg_pair(pid, "-pidfile", &state.pidfile);
        if let Some(pid) = sandbox::read_pidfile(&state.pidfile)
            && names_us(pid)
            && let Some(p) = Process::of(pid)
        {
            found.push(p);
        }
        found.extend(
            state
                .cgroups
                .iter()
                .flat_map(Cgroup::procs)
                .filter_map(Process::of),
        );
        let me = std::process::id() as i32;
        // QEMU joins the job's cgroups before its first instruction: only without
        // them are the host's processes scanned.
        if state.cgroups.is_empty() {
            found.extend(
                procfs::all_pids()
                    .into_iter()
                    .filter(|&pid| pid != me && names_us(pid))
                    .filter_map(Process::of),
            );
        }
        found.sort_unstable();
        found.dedup();
        found.retain(|p| p.pid != me);
        if let Some(net) = &state.net {
            // slirp4netns shares the job's cgroups.
            let path = net.path();
            found.retain(|p| !procfs::has_arg_pair(p.pid, "--netns-type=path", &path));
        }
        found
    }

    /// Every process of the job: its QEMU and its slirp4netns. Sorted.
    fn processes(state: &VmState) -> Vec<Process> {
        let mut found = Self::qemus(state);
        if let Some(net) = &state.net {
            found.extend(net.slirps(&state.cgroups));
            found.sort_unstable();
            found.dedup();
        }
        found
    }

    /// The job's QEMU as the handle or the pidfile names it, if it runs.
    fn qemu_alive(state: &VmState) -> Option<ProcId> {
        if let Some(q) = state.qemu
            && q.live().is_some()
        {
            return Some(q);
        }
        let pid = sandbox::read_pidfile(&state.pidfile)?;
        if !procfs::has_arg_pair(pid, "-pidfile", &state.pidfile) {
            return None;
        }
        procfs::start_time(pid).map(|start_time| ProcId { pid, start_time })
    }

    /// SIGKILLs every process of the job until none is left or `deadline` passes
    /// ([`sandbox::kill_until_gone`]); returns the pids left.
    fn kill_all(state: &VmState, deadline: Instant) -> Vec<i32> {
        sandbox::kill_until_gone(&state.cgroups, || Self::processes(state), deadline)
    }

    /// Waits until the job has no QEMU left, up to `until`; true if none is left.
    fn wait_gone(state: &VmState, until: Instant) -> bool {
        let mut round = 0;
        loop {
            if Self::qemus(state).is_empty() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(backoff(&mut round));
        }
    }

    /// Which accelerator to boot with, and why.
    fn accel(&self, state: &VmState) -> (String, String) {
        match self.settings.accel {
            AccelChoice::Tcg => ("tcg".into(), "option accel=tcg".into()),
            AccelChoice::Kvm => ("kvm".into(), "option accel=kvm".into()),
            AccelChoice::Auto => {
                let mut cached = lock(&self.accel);
                if let Some(c) = cached.as_ref() {
                    return c.clone();
                }
                let answer = self.probe_kvm(state);
                *cached = Some(answer.clone());
                answer
            }
        }
    }

    /// `auto`: KVM only if `/dev/kvm` opens and a guest of this image boots under it
    /// to its agent within [`KVM_PROBE_TIMEOUT`]; the answer is remembered per host
    /// kernel, QEMU and image kernel in `$TMPDIR/reel-qemu-accel-probe`.
    fn probe_kvm(&self, state: &VmState) -> (String, String) {
        if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            return ("tcg".into(), format!("/dev/kvm cannot be opened ({e})"));
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let key = format!(
            "{} {} {}",
            host.trim(),
            self.settings.qemu.display(),
            state.spec.kernel.display()
        );
        let cache = std::env::temp_dir().join("reel-qemu-accel-probe");
        if let Ok(text) = std::fs::read_to_string(&cache)
            && let Some((k, answer)) = text.split_once('\n')
            && k == key
            && let Some((accel, why)) = answer.trim_end().split_once(' ')
        {
            return (accel.to_owned(), format!("{why} (probed earlier)"));
        }
        let answer = self.kvm_probe_boot(state);
        let _ = std::fs::write(&cache, format!("{key}\n{} {}\n", answer.0, answer.1));
        answer
    }

    /// Boots a throwaway guest of the image under KVM and waits for its init's marker.
    fn kvm_probe_boot(&self, state: &VmState) -> (String, String) {
        let Ok(dir) = tempdir_in(&std::env::temp_dir(), "reel-kvm-probe") else {
            return ("tcg".into(), "no directory for a KVM probe".into());
        };
        let console = dir.join("console.log");
        let mut cmd = Command::new(&self.settings.qemu);
        cmd.env_clear()
            .args(machine_args(&state.spec, &self.settings.bios))
            .args(["-accel", "kvm", "-cpu", "host", "-m", "256", "-smp", "1"])
            .arg("-kernel")
            .arg(&state.spec.kernel)
            .arg("-initrd")
            .arg(&state.spec.initrd)
            .arg("-append")
            .arg(kernel_cmdline(&state.spec, &[]))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let start = Instant::now();
        let answer = match cmd.spawn() {
            Err(e) => ("tcg".into(), format!("QEMU did not start under KVM ({e})")),
            Ok(mut child) => {
                let answer = loop {
                    let text = console::read_from(&console, 0, 1 << 20);
                    if text.windows(MARKER.len()).any(|w| w == MARKER) {
                        break (
                            "kvm".into(),
                            format!("a KVM guest reached its agent in {:?}", start.elapsed()),
                        );
                    }
                    if let Ok(Some(status)) = child.try_wait() {
                        break ("tcg".into(), format!("QEMU under KVM exited ({status})"));
                    }
                    if start.elapsed() > KVM_PROBE_TIMEOUT {
                        break (
                            "tcg".into(),
                            format!("a KVM guest did not reach its agent in {KVM_PROBE_TIMEOUT:?}"),
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                };
                let _ = child.kill();
                let _ = child.wait();
                answer
            }
        };
        let _ = std::fs::remove_dir_all(&dir);
        answer
    }

    /// Starts the job's QEMU (in its cgroup, daemonized) and waits until it runs.
    fn start_qemu(&self, state: &mut VmState) -> Result<(), RunnerError> {
        for stale in [&state.agent_socket, &state.qmp_socket, &state.pidfile] {
            let _ = std::fs::remove_file(stale);
        }
        let (accel, why) = self.accel(state);
        reel_plugin_sdk::host::notice(
            ACCEL_NOTICE,
            &format!("sandbox {} boots with {accel}: {why}", state.sandbox_id),
        );
        let volumes: Vec<(String, String)> = state
            .volumes
            .iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    format!("vd{}", (b'a' + i as u8) as char),
                    v.spec.mount.clone(),
                )
            })
            .collect();
        // The guest's way out runs before the guest does.
        let netns = match &mut state.net {
            Some(net) => {
                net.ensure_slirp(&self.settings.slirp4netns, &state.cgroups)?;
                Some(net.open()?)
            }
            None => None,
        };
        let mut cmdline = kernel_cmdline(&state.spec, &volumes);
        if state.net.is_some() {
            cmdline.push(' ');
            cmdline.push_str(&net::cmdline_arg());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&state.qemu_log)
            .map_err(|e| {
                RunnerError::failed(format!("cannot open {}: {e}", state.qemu_log.display()))
            })?;
        let mut cmd = Command::new(&self.settings.qemu);
        // QEMU needs nothing of the engine's environment, which holds every job's
        // secrets.
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .current_dir(&state.dir)
            .args(["-name", &format!("reel-{}", state.sandbox_id)])
            .args(machine_args(&state.spec, &self.settings.bios))
            .args(match accel.as_str() {
                "kvm" => vec![
                    "-accel".to_owned(),
                    "kvm".to_owned(),
                    "-cpu".into(),
                    "host".into(),
                ],
                _ => vec![
                    "-accel".to_owned(),
                    format!("tcg,tb-size={TB_SIZE_MIB}"),
                    "-cpu".into(),
                    "max".into(),
                ],
            })
            .args(["-m", &state.memory_mib.to_string()])
            .args(["-smp", &state.vcpus.to_string()])
            .arg("-kernel")
            .arg(&state.spec.kernel)
            .arg("-initrd")
            .arg(&state.spec.initrd)
            .arg("-append")
            .arg(cmdline)
            .arg("-serial")
            .arg(format!("file:{}", state.console.display()))
            .arg("-chardev")
            .arg(format!(
                "socket,id=agent,path={},server=on,wait=off",
                state.agent_socket.display()
            ))
            .args(serial_device_args(state.spec.machine))
            .args([
                "-device",
                &format!(
                    "virtserialport,chardev=agent,name={}",
                    state.spec.agent_port
                ),
            ]);
        for (i, v) in state.volumes.iter().enumerate() {
            cmd.arg("-drive")
                .arg(format!(
                    "id=vol{i},file={},format=raw,if=none,cache=unsafe,discard=unmap",
                    v.path.display()
                ))
                .args([
                    "-device",
                    &format!("{},drive=vol{i}", blk_device(state.spec.machine)),
                ]);
        }
        if state.net.is_some() {
            cmd.args(net::qemu_args(state.spec.machine));
        }
        cmd.arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                state.qmp_socket.display()
            ))
            .arg("-pidfile")
            .arg(&state.pidfile)
            .arg("-daemonize")
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| RunnerError::failed(e.to_string()))?,
            )
            .stderr(log);
        // QEMU is in the job's cgroups from its first instruction.
        let procs = cgroup::join_on_exec(&mut cmd, &state.cgroups)?;
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        if let Some(fd) = netns_fd {
            // SAFETY: the closure only calls setns(2) on a descriptor opened before
            // the fork (async-signal-safe, no allocation).
            unsafe {
                cmd.pre_exec(move || net::enter(std::os::fd::BorrowedFd::borrow_raw(fd)));
            }
        }
        state.boots += 1;
        let status = cmd.status().map_err(|e| {
            RunnerError::failed(format!(
                "cannot start {}: {e} (install QEMU with scripts/install-vm-deps)",
                self.settings.qemu.display()
            ))
        })?;
        drop(procs);
        drop(netns);
        if !status.success() {
            let said = console::tail(&state.qemu_log, 2048);
            return Err(RunnerError::failed(format!(
                "QEMU failed to start ({status}): {}",
                String::from_utf8_lossy(&said).trim()
            )));
        }
        let pid = sandbox::read_pidfile(&state.pidfile).ok_or_else(|| {
            RunnerError::failed(format!(
                "QEMU started but wrote no pid to {}",
                state.pidfile.display()
            ))
        })?;
        let start_time = procfs::start_time(pid)
            .ok_or_else(|| RunnerError::failed("QEMU exited as soon as it started"))?;
        state.qemu = Some(ProcId { pid, start_time });
        state.accel = Some(accel);
        tracing::debug!(pid, sandbox = state.sandbox_id, "qemu started");
        self.wait_running(state)
    }

    /// Polls QMP until `query-status` says `running`.
    fn wait_running(&self, state: &VmState) -> Result<(), RunnerError> {
        let deadline = Instant::now() + QMP_TIMEOUT;
        let mut last = String::new();
        let mut round = 0;
        while Instant::now() < deadline {
            if Self::qemu_alive(state).is_none() {
                return Err(RunnerError::failed(format!(
                    "QEMU exited while booting: {}",
                    String::from_utf8_lossy(&console::tail(&state.console, 2048)).trim()
                )));
            }
            match qmp::Qmp::connect(&state.qmp_socket, Duration::from_secs(2))
                .and_then(|mut q| q.status())
            {
                Ok(s) if s == "running" => return Ok(()),
                Ok(s) => last = format!("status {s}"),
                Err(e) => last = e,
            }
            std::thread::sleep(backoff(&mut round).max(Duration::from_millis(5)));
        }
        Err(RunnerError::timeout(format!(
            "QEMU was not running {QMP_TIMEOUT:?} after it started ({last})"
        )))
    }

    /// Connects to the guest agent and binds the connection to the job.
    fn open_session(
        &self,
        state: &VmState,
        timeout: Duration,
    ) -> Result<Arc<Session>, RunnerError> {
        let token = state.token()?;
        let client = connect_guest(&state.agent_socket, timeout)?;
        self.sessions.open(state.key(), client, token)
    }

    /// Why a VM that should be running is not, in one sentence.
    /// `said`: what the console said meanwhile.
    fn why_dead(state: &VmState, oom_before: Option<u64>, said: Option<console::Said>) -> String {
        if let (Some(before), Some(after)) = (oom_before, state.oom_kills())
            && after > before
        {
            return format!(
                "out of memory: the host's OOM killer ended QEMU in the job's cgroup ({})",
                memory_limit(state.cgroup_memory_bytes())
            );
        }
        match said {
            Some(console::Said::Panic(line)) => format!("the guest kernel panicked: {line}"),
            _ => "QEMU exited unexpectedly".to_owned(),
        }
    }
}

/// Connects to the guest agent through QEMU's chardev socket of its virtio-serial
/// port, skipping what an earlier host left unread before the agent's `Hello`.
fn connect_guest(socket: &Path, timeout: Duration) -> Result<AgentClient, RunnerError> {
    AgentClient::connect_serial(socket, timeout)
        .map_err(|e| client_error("connecting to the guest agent", e))
}

/// The marker the guest's init prints once its agent runs.
const MARKER: &[u8] = b"reel-guest: agent started";

/// `-M`, firmware and the defaults every VM of the runner gets.
fn machine_args(spec: &Spec, bios: &Path) -> Vec<String> {
    let mut args = match spec.machine {
        Machine::Microvm => vec![
            "-M".to_owned(),
            "microvm".to_owned(),
            "-bios".to_owned(),
            bios.display().to_string(),
        ],
        Machine::Q35 => vec!["-M".to_owned(), "q35".to_owned()],
    };
    args.extend(
        [
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-sandbox",
            "on",
        ]
        .map(str::to_owned),
    );
    args
}

fn serial_device_args(machine: Machine) -> [&'static str; 2] {
    match machine {
        Machine::Microvm => ["-device", "virtio-serial-device"],
        Machine::Q35 => ["-device", "virtio-serial-pci"],
    }
}

fn blk_device(machine: Machine) -> &'static str {
    match machine {
        Machine::Microvm => "virtio-blk-device",
        Machine::Q35 => "virtio-blk-pci",
    }
}

/// The spec's command line, `tsc_early_khz` on microvm (without it about 4% of boots
/// hang calibrating the delay loop: microvm has no HPET or PM timer) and the volumes.
fn kernel_cmdline(spec: &Spec, volumes: &[(String, String)]) -> String {
    let mut line = spec.cmdline.clone();
    if spec.machine == Machine::Microvm
        && !line.contains("tsc_early_khz=")
        && let Some(khz) = host_khz()
    {
        line.push_str(&format!(" tsc_early_khz={khz}"));
    }
    if !volumes.is_empty() {
        let list: Vec<String> = volumes.iter().map(|(d, m)| format!("{d}:{m}")).collect();
        line.push_str(&format!(" reel.volumes={}", list.join(",")));
    }
    line
}

/// The host CPU's clock in kHz (`cpu MHz` of `/proc/cpuinfo`).
fn host_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = text
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

fn tempdir_in(root: &Path, prefix: &str) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(root)?;
    let dir = root.join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// Formats `volume` as ext4 on a sparse file of its size.
fn format_volume(volume: &Volume) -> Result<(), RunnerError> {
    let file = std::fs::File::create(&volume.path).map_err(|e| {
        RunnerError::failed(format!("cannot create {}: {e}", volume.path.display()))
    })?;
    file.set_len(volume.size_mib << 20)
        .map_err(|e| RunnerError::failed(format!("cannot size {}: {e}", volume.path.display())))?;
    drop(file);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .args(["-F", "-q", "-L", &volume.spec.name]);
    if !volume.spec.journal {
        cmd.args(["-O", "^has_journal"]);
    }
    let out = cmd
        .arg(&volume.path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            RunnerError::failed(format!(
                "cannot run mkfs.ext4: {e} (install e2fsprogs with scripts/install-vm-deps)"
            ))
        })?;
    if !out.status.success() {
        return Err(RunnerError::failed(format!(
            "mkfs.ext4 {} failed ({}): {}",
            volume.path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A step's whole environment in the guest ([`sandbox::step_environment`]):
/// `HOME` is [`GUEST_WORKDIR`] and `PATH` [`GUEST_PATH`] unless the job sets them.
fn step_environment(state: &VmState, step: &StepRequest) -> BTreeMap<String, String> {
    sandbox::step_environment(
        &state.environment,
        step,
        state.job_id,
        GUEST_WORKDIR,
        GUEST_PATH,
    )
}

/// A sink that remembers where the output it passed on ends.
struct Tracking<'a> {
    inner: &'a mut dyn OutputSink,
    end: u64,
}

impl OutputSink for Tracking<'_> {
    fn chunk(&mut self, stream: Stream, offset: u64, bytes: &[u8]) {
        self.end = self.end.max(offset + bytes.len() as u64);
        self.inner.chunk(stream, offset, bytes);
    }

    fn stored(&self) -> Stored {
        self.inner.stored()
    }
}

impl Runner for QemuRunner {
    fn new(config: &RunnerConfig) -> Result<Self, RunnerError> {
        let accel = match config.options.get("accel").map(String::as_str) {
            None | Some("auto") => AccelChoice::Auto,
            Some("tcg") => AccelChoice::Tcg,
            Some("kvm") => AccelChoice::Kvm,
            Some(other) => {
                return Err(RunnerError::invalid_input(format!(
                    "option accel {other:?} is not one of auto, tcg, kvm"
                )));
            }
        };
        let cgroups = cgroup::Placement::from_options(&config.options)?;
        Ok(QemuRunner {
            settings: Settings {
                sandbox_root: config.sandbox_root.clone(),
                plugin_dir: config.plugin_dir.clone(),
                image: config.options.get("image").map(PathBuf::from),
                qemu: config
                    .options
                    .get("qemu")
                    .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from),
                bios: config
                    .options
                    .get("bios")
                    .map_or_else(|| PathBuf::from("/usr/share/qemu/qboot.rom"), PathBuf::from),
                slirp4netns: config
                    .options
                    .get("slirp4netns")
                    .map_or_else(|| PathBuf::from("slirp4netns"), PathBuf::from),
                accel,
                cgroups,
            },
            sessions: Sessions::default(),
            accel: Mutex::new(None),
        })
    }

    fn describe(&self) -> Description {
        Description {
            name: "qemu".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            abi_major: reel_plugin_sdk::abi::ABI_MAJOR,
            abi_minor: reel_plugin_sdk::abi::ABI_MINOR,
            capabilities: {
                let mut c = Capability::names(&[
                    Capability::Cancel,
                    Capability::Timeout,
                    Capability::Reattach,
                    Capability::Resume,
                    Capability::Collect,
                ]);
                c.extend(["cgroup".to_owned(), "microvm".to_owned()]);
                c
            },
        }
    }

    fn validate(&self, job: &JobRequest) -> Result<Vec<String>, RunnerError> {
        let state = self.plan_state(job)?;
        if state.net.is_some() {
            net::check_host(&self.settings.slirp4netns)?;
        }
        if state.spec.machine == Machine::Microvm && !self.settings.bios.is_file() {
            return Err(RunnerError::invalid_input(format!(
                "the microvm firmware {} does not exist (QEMU 10 needs qboot.rom: install QEMU \
                 with scripts/install-vm-deps, or set the runner option bios)",
                self.settings.bios.display()
            )));
        }
        let mut warnings = Vec::new();
        if let Some(note) = state.cgroup_note {
            warnings.push(note);
        }
        Ok(warnings)
    }

    fn plan(&self, job: &JobRequest) -> Result<Handle, RunnerError> {
        let state = self.plan_state(job)?;
        sandbox::announce(&state.resources());
        state.encode()
    }

    fn prepare(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let mut state = Self::state(handle)?;
        std::fs::create_dir_all(&state.dir).map_err(|e| {
            RunnerError::failed(format!("cannot create {}: {e}", state.dir.display()))
        })?;
        for volume in &state.volumes {
            format_volume(volume)?;
        }
        let memory = state.cgroup_memory_bytes();
        for cg in &state.cgroups {
            cg.create(memory, 0)
                .map_err(|e| RunnerError::failed(e.to_string()))?;
        }
        if let Some(note) = &state.cgroup_note {
            reel_plugin_sdk::host::notice("cgroup-skipped", note);
        }
        if let Some(net) = &mut state.net {
            net.create()?;
        }
        if state.session_token.is_none() {
            state.session_token = Some(random_token()?);
        }
        state.encode()
    }

    fn boot(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let mut state = Self::state(handle)?;
        if let Some(q) = Self::qemu_alive(&state) {
            state.qemu = Some(q);
            return state.encode();
        }
        if !state.dir.is_dir() {
            return Err(RunnerError::not_found(format!(
                "the sandbox directory {} does not exist: prepare did not run",
                state.dir.display()
            )));
        }
        self.start_qemu(&mut state)?;
        state.encode()
    }

    fn connect(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let mut state = Self::state(handle)?;
        if state.qemu.is_none() {
            state.qemu = Self::qemu_alive(&state);
        }
        self.sessions.remove(state.key());
        match self.open_session(&state, HELLO_TIMEOUT) {
            Ok(_) => state.encode(),
            Err(e) => {
                let alive = Self::qemu_alive(&state).is_some();
                let said = console::said(&console::read_from(&state.console, 0, 1 << 20));
                if !alive || matches!(said, Some(console::Said::Panic(_))) {
                    let oom_before = state.oom_kills().map(|_| 0);
                    let why = Self::why_dead(&state, oom_before, said);
                    return Err(RunnerError::failed(format!(
                        "the guest agent never said Hello: {why}; the console ended with: {}",
                        String::from_utf8_lossy(&console::tail(&state.console, 1024)).trim()
                    )));
                }
                if state.boots >= 2 {
                    return Err(e);
                }
                // QEMU runs and the guest neither panicked nor reached its agent:
                // a hang outside reel (early boot). Once more, from scratch.
                reel_plugin_sdk::host::notice(
                    BOOT_RETRY_NOTICE,
                    &format!(
                        "sandbox {}: the guest did not reach its agent ({e}); booting it again",
                        state.sandbox_id
                    ),
                );
                Self::kill_all(&state, Instant::now() + CLEANUP_PATIENCE);
                let _ = std::fs::rename(&state.console, state.dir.join("console.1.log"));
                self.start_qemu(&mut state)?;
                self.open_session(&state, HELLO_TIMEOUT)?;
                state.encode()
            }
        }
    }

    fn exec(
        &self,
        handle: &Handle,
        step: &StepRequest,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecResult, RunnerError> {
        let state = Self::state(handle)?;
        let session = self.sessions.get_or_open(state.key(), state.token()?, || {
            connect_guest(&state.agent_socket, CONNECT_TIMEOUT)
        })?;
        let console_from = console::len(&state.console);
        let oom_before = match step.resume_from {
            0 => state.oom_kills(),
            _ => state.oom_kills().map(|_| 0),
        };
        let mut tracking = Tracking {
            inner: sink,
            end: step.resume_from,
        };
        let result = self.sessions.exec(
            &session,
            step,
            state.grace(),
            || ExecRequest {
                exec_id: step.exec_id,
                argv: vec![
                    state.spec.shell.clone(),
                    "-c".to_owned(),
                    step.command.clone(),
                ],
                env: step_environment(&state, step).into_iter().collect(),
                cwd: None,
                timeout_ms: step.timeout_ms.unwrap_or(0),
            },
            &mut tracking,
        );
        if result.as_ref().is_ok_and(ExecResult::success) {
            return result;
        }
        // A VM that is dying (a guest panic, QEMU killed) first drops the agent's
        // connection; QEMU may take a moment to exit after that.
        if result.is_err() {
            let until = Instant::now() + DYING_PATIENCE;
            let mut round = 0;
            while Self::qemu_alive(&state).is_some() && Instant::now() < until {
                std::thread::sleep(backoff(&mut round).max(Duration::from_millis(5)));
            }
        }
        let said = console::said(&console::read_from(&state.console, console_from, 1 << 20));
        if Self::qemu_alive(&state).is_none() {
            // The VM died under the step: say why, with the console's last words.
            self.sessions.remove(state.key());
            let why = Self::why_dead(&state, oom_before, said);
            let mut tail =
                format!("\n[reel: {why}; the guest console's last lines:]\n").into_bytes();
            tail.extend(console::tail(&state.console, console::TAIL_BYTES));
            let end = tracking.end;
            tracking.chunk(Stream::Stderr, end, &tail);
            if why.starts_with("out of memory") {
                reel_plugin_sdk::host::notice(OOM_NOTICE, &why);
            }
            return Err(RunnerError::failed(why));
        }
        // The guest's own OOM killer: the console says so.
        if let Some(console::Said::OutOfMemory(n, first)) = said
            && let Some(ended) = how_it_ended(&result)
        {
            return Err(out_of_memory(
                &format!("the guest has {} MiB", state.memory_mib),
                "the guest kernel's",
                n as u64,
                &format!(" ({first})"),
                &ended,
            ));
        }
        with_oom_cause(
            state.cgroup_memory_bytes(),
            oom_before,
            state.oom_kills(),
            result,
        )
    }

    fn cancel(&self, handle: &Handle, exec_id: u64) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        self.sessions.cancel(state.key(), exec_id, state.grace())
    }

    fn collect(
        &self,
        handle: &Handle,
        request: &CollectRequest,
    ) -> Result<Collection, RunnerError> {
        let state = Self::state(handle)?;
        if Self::qemu_alive(&state).is_none() {
            return Err(RunnerError::not_found("the job's VM is not running"));
        }
        let session = self.sessions.get_or_open(state.key(), state.token()?, || {
            connect_guest(&state.agent_socket, CONNECT_TIMEOUT)
        })?;
        self.sessions.collect(&session, request)
    }

    fn drain(&self, handle: &Handle) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        self.sessions.drain(state.key(), Duration::from_secs(30))
    }

    fn poweroff(
        &self,
        handle: &Handle,
        graceful: bool,
        deadline_ms: u64,
    ) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        let start = Instant::now();
        let deadline = start
            .checked_add(Duration::from_millis(deadline_ms))
            .unwrap_or(start + Duration::from_secs(86_400));
        if graceful && Self::qemu_alive(&state).is_some() {
            // Half the time for the agent (the guest's init powers the VM off when
            // it exits), a quarter for ACPI, the rest for SIGKILL.
            let agent_budget = Duration::from_millis(deadline_ms / 2);
            let acked = self.sessions.poweroff(
                state.key(),
                state.session_token.as_deref(),
                agent_budget,
                |budget| connect_guest(&state.agent_socket, budget).ok(),
            );
            let mut gone = acked && Self::wait_gone(&state, start + agent_budget);
            if !gone {
                let acpi_until = start + Duration::from_millis(deadline_ms / 4 * 3);
                if let Ok(mut q) = qmp::Qmp::connect(&state.qmp_socket, Duration::from_secs(1))
                    && q.execute("system_powerdown").is_ok()
                {
                    gone = Self::wait_gone(&state, acpi_until);
                }
            }
            if gone {
                self.sessions.remove(state.key());
                if state.net.is_some() {
                    // The guest is gone; its way out goes too.
                    let left = Self::kill_all(&state, deadline);
                    sandbox::warn_left_at_poweroff(&left, state.sandbox_id);
                }
                return Ok(());
            }
        }
        self.sessions.remove(state.key());
        let left = Self::kill_all(&state, deadline);
        sandbox::warn_left_at_poweroff(&left, state.sandbox_id);
        Ok(())
    }

    fn cleanup(&self, handle: &Handle) -> Result<(), RunnerError> {
        let state = Self::state(handle)?;
        self.sessions.remove(state.key());
        sandbox::remove(&state.cgroups, &state.dir, CLEANUP_PATIENCE, |deadline| {
            Self::kill_all(&state, deadline)
        })?;
        match &state.net {
            Some(net) => net.remove(),
            None => Ok(()),
        }
    }

    fn probe(&self, handle: &Handle) -> Result<Probe, RunnerError> {
        let state = Self::state(handle)?;
        let Some(q) = Self::qemu_alive(&state) else {
            let leftovers: Vec<i32> = Self::processes(&state).iter().map(|p| p.pid).collect();
            let detail = match (state.qemu, leftovers.is_empty()) {
                (_, false) => format!(
                    "the VM's QEMU is gone but processes {leftovers:?} of the job remain (cleanup kills them)"
                ),
                (Some(q), true) => format!(
                    "QEMU pid {} with start time {} is gone",
                    q.pid, q.start_time
                ),
                (None, true) => "no QEMU is running".to_owned(),
            };
            return Ok(Probe {
                alive: !leftovers.is_empty(),
                reattachable: false,
                detail,
            });
        };
        let status = qmp::Qmp::connect(&state.qmp_socket, Duration::from_secs(2))
            .and_then(|mut c| c.status());
        let running = matches!(&status, Ok(s) if s == "running");
        Ok(Probe {
            alive: true,
            reattachable: running && state.session_token.is_some(),
            detail: match status {
                Ok(s) => format!("QEMU pid {} is {s}", q.pid),
                Err(e) => format!("QEMU pid {} runs but QMP does not answer: {e}", q.pid),
            },
        })
    }

    fn reattach(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        let mut state = Self::state(handle)?;
        let Some(q) = Self::qemu_alive(&state) else {
            return Err(RunnerError::not_found("the job's VM is not running"));
        };
        state.qemu = Some(q);
        self.sessions.remove(state.key());
        self.open_session(&state, CONNECT_TIMEOUT)?;
        state.encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handle logged before cancel grace existed (version 1) is read with the
    /// default grace; a version 2 handle keeps the job's, and both read as jobs
    /// without a network; a version 3 handle keeps the job's network namespace.
    #[test]
    fn older_handles_are_read_with_the_default_grace_and_no_network() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"\x7fELF").unwrap();
        std::fs::write(dir.path().join("initrd.img"), b"x").unwrap();
        std::fs::write(
            dir.path().join("spec.json"),
            r#"{"format":1,"kernel":"vmlinux","initrd":"initrd.img","cmdline":"console=ttyS0",
               "memory_mib":256,"vcpus":1,"machine":"microvm","agent_port":"agent0"}"#,
        )
        .unwrap();
        let runner = QemuRunner::new(&RunnerConfig {
            sandbox_root: dir.path().join("sandboxes"),
            ..RunnerConfig::default()
        })
        .unwrap();
        let job = JobRequest {
            job_id: 5,
            sandbox_id: 3,
            image: Some(dir.path().display().to_string()),
            cancel_grace_ms: Some(250),
            ..JobRequest::default()
        };
        let state = runner.plan_state(&job).unwrap();
        let v3 = state.encode().unwrap();
        assert_eq!(v3.version, 3);
        let read = VmState::decode(&v3).unwrap();
        assert_eq!(read, state);
        assert_eq!(read.grace(), Duration::from_millis(250));
        let networked = runner
            .plan_state(&JobRequest {
                network: Network::User,
                ..job.clone()
            })
            .unwrap();
        let read = VmState::decode(&networked.encode().unwrap()).unwrap();
        assert!(read.net.as_ref().is_some_and(|n| n.name.ends_with("-3")));
        assert_eq!(read, networked);
        let v2 = reel_runner_kit::encode_handle(&networked, Some(250)).unwrap();
        assert_eq!(v2.version, 2);
        let read = VmState::decode(&v2).unwrap();
        assert_eq!((read.net, read.cancel_grace_ms), (None, Some(250)));
        let v1 = Handle::encode(1, &state).unwrap();
        let read = VmState::decode(&v1).unwrap();
        assert_eq!(read.cancel_grace_ms, None);
        assert_eq!(read.grace(), reel_runner_kit::session::CANCEL_GRACE);
    }

    #[test]
    fn the_kernel_command_line_gets_the_clock_and_the_volumes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"\x7fELF").unwrap();
        std::fs::write(dir.path().join("initrd.img"), b"x").unwrap();
        let spec = spec::parse(
            r#"{"format":1,"kernel":"vmlinux","initrd":"initrd.img","cmdline":"console=ttyS0",
               "memory_mib":256,"vcpus":1,"machine":"microvm","agent_port":"agent0"}"#,
            dir.path(),
        )
        .unwrap();
        let line = kernel_cmdline(&spec, &[("vda".into(), "/work".into())]);
        assert!(line.starts_with("console=ttyS0 "), "{line}");
        assert!(line.ends_with(" reel.volumes=vda:/work"), "{line}");
        if host_khz().is_some() {
            assert!(line.contains(" tsc_early_khz="), "{line}");
        }
    }
}
