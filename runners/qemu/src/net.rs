//! `network: user`: the guest's outbound NAT, with the host and private ranges out
//! of its reach.
//!
//! QEMU runs in a network namespace of its own, `reel-vm-<root tag>-<sandbox_id>`
//! (`ip netns`, so it is found by name at `/run/netns/<name>` after any crash). The
//! namespace's one way out is `slirp4netns` (a tap device `tap0`, 10.0.2.0/24, NATed
//! through the host's sockets, `--disable-host-loopback`), and its routing table
//! has a `prohibit` route for every range the guest must not reach: the private,
//! shared, link-local (cloud metadata), multicast and reserved ranges of
//! [`BLOCKED`], and each IPv4 address of the host itself, read when the namespace
//! is made, and slirp4netns's gateway (the host's loopback were it enabled). Its
//! own loopback is up with nothing listening: QEMU maps the guest's gateway
//! address there, so a connection to it is refused at once. QEMU gives the guest user networking on its own
//! 10.0.3.0/24 ([`GUEST_ADDRESS`], gateway [`GUEST_GATEWAY`]) with IPv6 off; the
//! guest's resolver is slirp4netns's DNS forwarder, [`GUEST_DNS`], the one
//! address of 10.0.0.0/8 it reaches (its route is more specific than the block).
//!
//! So a guest's connection becomes a socket of QEMU in the namespace, which the
//! namespace's routes refuse or send through slirp4netns: the host's loopback,
//! its own addresses and every private range answer "prohibited", and anything
//! else is reached as the host would reach it.
//!
//! slirp4netns runs in the job's cgroups, in a session of its own (a Ctrl-C of
//! `reel run` does not reach it), and outlives the engine as QEMU does, so a
//! reattached VM keeps its network. Cleanup kills it with the job's processes and
//! deletes the namespace.

use std::fs::OpenOptions;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reel_agent::procfs::{self, Process};
use reel_plugin_sdk::RunnerError;
use reel_runner_kit::Cgroup;
use serde::{Deserialize, Serialize};

use crate::ProcId;
use crate::spec::Machine;

/// What the guest may never reach, besides the host's own addresses.
pub const BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];
/// The guest's address on QEMU's user network.
pub const GUEST_ADDRESS: &str = "10.0.3.15/24";
/// QEMU's side of the guest's network.
pub const GUEST_GATEWAY: &str = "10.0.3.2";
/// The resolver the guest uses: slirp4netns's DNS forwarder.
pub const GUEST_DNS: &str = "10.0.2.3";
/// slirp4netns's gateway in the namespace (the host's loopback, were it enabled).
const SLIRP_GATEWAY: &str = "10.0.2.2/32";
/// How long slirp4netns may take to configure the namespace.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The `PATH` the runner's helpers get.
const HELPER_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// The job's network namespace and its slirp4netns (in the handle).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNet {
    /// The `ip netns` name.
    pub name: String,
    /// slirp4netns's log, in the sandbox directory.
    pub log: PathBuf,
    /// The ranges blocked when the namespace was made (set by `prepare`).
    pub blocked: Vec<String>,
    /// slirp4netns (set by `boot`).
    pub(crate) slirp: Option<ProcId>,
}

impl VmNet {
    /// The namespace a job's VM gets: named after the sandbox root and id, as the
    /// job's cgroup is (namespace names are the host's, not one engine's).
    pub fn plan(root: &Path, dir: &Path, sandbox_id: u32) -> VmNet {
        VmNet {
            name: format!("reel-vm-{}-{sandbox_id}", reel_runner_kit::root_tag(root)),
            log: dir.join("slirp4netns.log"),
            blocked: Vec::new(),
            slirp: None,
        }
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// The lines of the job's plan.
    pub fn resources(&self) -> Vec<String> {
        let blocked = if self.blocked.is_empty() {
            format!("{} and the host's addresses", BLOCKED.join(" "))
        } else {
            self.blocked.join(" ")
        };
        vec![
            format!(
                "netns {} (network user: guest {GUEST_ADDRESS} via {GUEST_GATEWAY}, dns {GUEST_DNS}; \
                 prohibited: {blocked} {SLIRP_GATEWAY})",
                self.path().display()
            ),
            format!(
                "slirp4netns (tap0 in {}, host loopback disabled; log {})",
                self.name,
                self.log.display()
            ),
        ]
    }

    /// Makes the namespace afresh (one left by an earlier attempt is deleted
    /// first) with its prohibit routes; records what it blocked.
    pub fn create(&mut self) -> Result<(), RunnerError> {
        self.remove()?;
        let mut blocked: Vec<String> = BLOCKED.iter().map(|r| (*r).to_owned()).collect();
        blocked.extend(
            parse_addresses(&ip(&["-o", "-4", "addr", "show"], None)?)
                .into_iter()
                .filter(|a| !a.starts_with("127."))
                .map(|a| format!("{a}/32")),
        );
        ip(&["netns", "add", &self.name], None)?;
        // Every route in one `ip` (a job's prepare is on every job's path).
        let routes: String = blocked
            .iter()
            .map(|range| format!("route add prohibit {range}\n"))
            .collect();
        ip(&["-n", &self.name, "-batch", "-"], Some(&routes))?;
        self.blocked = blocked;
        Ok(())
    }

    /// Deletes the namespace if it exists.
    pub fn remove(&self) -> Result<(), RunnerError> {
        if std::fs::symlink_metadata(self.path()).is_err() {
            return Ok(());
        }
        ip(&["netns", "delete", &self.name], None).map(drop)
    }

    /// The live slirp4netns processes of this namespace: the one in the handle
    /// and any whose command line names the namespace (one started before the
    /// engine logged it), from the job's cgroups (from the host's processes
    /// only on a host without cgroups).
    pub fn slirps(&self, cgroups: &[Cgroup]) -> Vec<Process> {
        let path = self.path();
        let ours = |pid: i32| procfs::has_arg_pair(pid, "--netns-type=path", &path);
        let mut found: Vec<Process> = Vec::new();
        if let Some(p) = self.slirp.and_then(ProcId::live)
            && ours(p.pid)
        {
            found.push(p);
        }
        let me = std::process::id() as i32;
        // slirp4netns joins the job's cgroups before its first instruction: only
        // without them are the host's processes scanned.
        let candidates = match cgroups {
            [] => procfs::all_pids(),
            _ => cgroups.iter().flat_map(Cgroup::procs).collect(),
        };
        found.extend(
            candidates
                .into_iter()
                .filter(|&pid| pid != me && ours(pid))
                .filter_map(Process::of),
        );
        found.sort_unstable();
        found.dedup();
        found
    }

    /// The namespace's slirp4netns: the one that runs (an earlier boot's, which
    /// a retried boot keeps), else a new one, in `cgroups`, once it configured
    /// `tap0` and its gateway is prohibited.
    pub fn ensure_slirp(&mut self, binary: &Path, cgroups: &[Cgroup]) -> Result<(), RunnerError> {
        if let Some(running) = self.slirps(cgroups).first() {
            self.slirp = Some(ProcId::from(*running));
            return Ok(());
        }
        let until = Instant::now() + READY_TIMEOUT;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| RunnerError::failed(format!("cannot open {}: {e}", self.log.display())))?;
        let (ready_read, ready_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| RunnerError::failed(format!("pipe: {e}")))?;
        let ready_fd = ready_write.as_raw_fd();
        let mut cmd = Command::new(binary);
        cmd.env_clear()
            .env("PATH", HELPER_PATH)
            .args([
                "--configure",
                "--mtu=65520",
                "--disable-host-loopback",
                &format!("--ready-fd={ready_fd}"),
                "--netns-type=path",
            ])
            .arg(self.path())
            .arg("tap0")
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| RunnerError::failed(e.to_string()))?,
            )
            .stderr(log);
        let procs = reel_runner_kit::cgroup::join_on_exec(&mut cmd, cgroups)?;
        // SAFETY: the closure only makes system calls on a descriptor opened before
        // the fork (async-signal-safe, no allocation).
        unsafe {
            cmd.pre_exec(move || {
                let ready = std::os::fd::BorrowedFd::borrow_raw(ready_fd);
                rustix::io::fcntl_setfd(ready, rustix::io::FdFlags::empty())
                    .map_err(std::io::Error::from)?;
                rustix::process::setsid().map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            RunnerError::failed(format!(
                "cannot start {}: {e} (network: user needs slirp4netns: install it with \
                 scripts/install-vm-deps)",
                binary.display()
            ))
        })?;
        drop(ready_write);
        drop(procs);
        let pid = child.id() as i32;
        let start_time = procfs::start_time(pid);
        // Reaped when it ends (at cleanup), by a thread of its own: it outlives
        // every call of the runner.
        std::thread::Builder::new()
            .name("reel-slirp-wait".into())
            .spawn(move || child.wait())
            .map_err(|e| RunnerError::failed(format!("cannot start a thread: {e}")))?;
        let said = wait_ready(&ready_read, until);
        if let Err(why) = said {
            let tail = crate::console::tail(&self.log, 1024);
            return Err(RunnerError::failed(format!(
                "slirp4netns did not configure {}: {why}: {}",
                self.name,
                String::from_utf8_lossy(&tail).trim()
            )));
        }
        self.slirp = start_time.map(|start_time| ProcId { pid, start_time });
        // slirp4netns's gateway would be the host's loopback, which
        // --disable-host-loopback turns into a silent drop: refused at once instead
        // (the default route through it was made above and still holds).
        ip(
            &["-n", &self.name, "route", "add", "prohibit", SLIRP_GATEWAY],
            None,
        )?;
        Ok(())
    }

    /// Opens the namespace for [`enter`] in a child.
    pub fn open(&self) -> Result<OwnedFd, RunnerError> {
        std::fs::File::open(self.path())
            .map(OwnedFd::from)
            .map_err(|e| {
                RunnerError::failed(format!(
                    "cannot open the network namespace {}: {e} (prepare did not run?)",
                    self.path().display()
                ))
            })
    }
}

/// Moves the calling thread (a child between fork and exec) into the network
/// namespace `fd` names.
pub fn enter(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
    rustix::thread::move_into_link_name_space(fd, Some(rustix::thread::LinkNameSpaceType::Network))
        .map_err(std::io::Error::from)
}

/// QEMU's arguments for the guest's NIC on user networking.
pub fn qemu_args(machine: Machine) -> Vec<String> {
    let device = match machine {
        Machine::Microvm => "virtio-net-device",
        Machine::Q35 => "virtio-net-pci",
    };
    vec![
        "-netdev".to_owned(),
        format!("user,id=net0,net=10.0.3.0/24,host={GUEST_GATEWAY},ipv6=off"),
        "-device".to_owned(),
        format!("{device},netdev=net0"),
    ]
}

/// The guest init's `reel.net=` argument: address, gateway, resolver.
pub fn cmdline_arg() -> String {
    format!("reel.net={GUEST_ADDRESS},{GUEST_GATEWAY},{GUEST_DNS}")
}

/// What stops `network: user` on this host, if anything: the helpers, the tun
/// device, a writable `/run`.
pub fn check_host(slirp4netns: &Path) -> Result<(), RunnerError> {
    let found = |p: &Path| {
        if p.components().count() > 1 {
            p.is_file()
        } else {
            HELPER_PATH
                .split(':')
                .any(|d| Path::new(d).join(p).is_file())
        }
    };
    if !found(slirp4netns) {
        return Err(RunnerError::invalid_input(format!(
            "network: user needs slirp4netns, and {} is not installed (scripts/install-vm-deps \
             installs it; the runner option slirp4netns names another)",
            slirp4netns.display()
        )));
    }
    if !found(Path::new("ip")) {
        return Err(RunnerError::invalid_input(
            "network: user needs ip (iproute2), which is not installed",
        ));
    }
    if !Path::new("/dev/net/tun").exists() {
        return Err(RunnerError::invalid_input(
            "network: user needs /dev/net/tun, which this host does not have",
        ));
    }
    Ok(())
}

/// Waits for slirp4netns's byte on its ready pipe.
fn wait_ready(fd: &OwnedFd, until: Instant) -> Result<(), String> {
    use rustix::event::{PollFd, PollFlags, poll};
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("not ready after {READY_TIMEOUT:?}"));
        }
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        let timeout = rustix::time::Timespec::try_from(left).ok();
        match poll(&mut fds, timeout.as_ref()) {
            Ok(0) => continue,
            Ok(_) => {
                let mut byte = [0u8; 1];
                return match rustix::io::read(fd.as_fd(), &mut byte) {
                    Ok(1) => Ok(()),
                    Ok(_) => Err("it exited".to_owned()),
                    Err(e) => Err(e.to_string()),
                };
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Runs `ip ARGS` (with `input` on its standard input) and returns what it
/// printed; its stderr is in the error.
fn ip(args: &[&str], input: Option<&str>) -> Result<String, RunnerError> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .env_clear()
        .env("PATH", HELPER_PATH)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RunnerError::failed(format!("cannot run ip: {e} (install iproute2)")))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| RunnerError::failed(format!("ip {}: {e}", args.join(" "))))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| RunnerError::failed(format!("ip {}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(RunnerError::failed(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The host's IPv4 addresses, from `ip -o -4 addr show`.
fn parse_addresses(text: &str) -> Vec<String> {
    let mut list: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            let addr = words.next()?.split('/').next()?;
            addr.parse::<std::net::Ipv4Addr>().ok()?;
            Some(addr.to_owned())
        })
        .collect();
    list.sort();
    list.dedup();
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_addresses_are_read_from_ip_o_addr() {
        let text = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                    4: eth0    inet 192.0.2.2/24 brd 192.0.2.255 scope global eth0\\  x\n\
                    5: br0    inet 203.0.113.9/32 scope global br0\n\
                    6: bad    inet nonsense/24\n";
        assert_eq!(
            parse_addresses(text),
            ["127.0.0.1", "192.0.2.2", "203.0.113.9"]
        );
    }

    #[test]
    fn the_namespace_is_named_after_the_root_and_the_sandbox() {
        let a = VmNet::plan(Path::new("/var/lib/reel/sandboxes"), Path::new("/x/7"), 7);
        let b = VmNet::plan(Path::new("/tmp/other"), Path::new("/x/7"), 7);
        assert!(
            a.name.starts_with("reel-vm-") && a.name.ends_with("-7"),
            "{}",
            a.name
        );
        assert_ne!(a.name, b.name);
        assert_eq!(a.path(), Path::new("/run/netns").join(&a.name));
        assert_eq!(a.log, Path::new("/x/7/slirp4netns.log"));
    }
}
