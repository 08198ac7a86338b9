//! What reel's agent-based runners share, so that each rule lives in one place.
//!
//! Both the process runner and the QEMU runner run their steps through a
//! `reel-agent` — a host process in one, a guest process behind a virtio-serial
//! port in the other — and both put the job's processes into cgroups. What differs
//! is how the sandbox is built and how the agent is reached; what happens once an
//! [`AgentClient`](reel_agent::AgentClient) is connected is the same, and lives here:
//!
//! - [`session`]: a job's agent session, and `exec` (fresh or resumed), `cancel`
//!   (with the job's cancel grace), `collect` (the job's artifacts),
//!   `drain` and poweroff through it, with the bookkeeping that never loses a cancel;
//! - [`cgroup`]: a job's cgroup(s) on v2, v1 or hybrid hosts;
//! - [`oom`]: naming "out of memory" as the cause of a step's failure;
//! - [`sandbox`]: naming a sandbox's resources, a step's environment, killing
//!   what a scan found and removing a sandbox;
//! - small helpers: [`random_token`], [`backoff`], [`root_tag`], [`lock`].

pub mod cgroup;
pub mod oom;
pub mod sandbox;
pub mod session;

use std::io::Read as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use reel_agent::ClientError;
use reel_plugin_sdk::RunnerError;

pub use cgroup::{Cgroup, Kind as CgroupKind};
pub use session::{Session, Sessions};

/// Locks `m`, taking the data of a poisoned lock as it is (a panic elsewhere must
/// not stop teardown).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The runner's error for a failed agent call: a timeout stays a timeout, a refused
/// connection is "not found" (recovery takes the sandbox as gone), the rest failed.
pub fn client_error(what: &str, e: ClientError) -> RunnerError {
    match e {
        ClientError::Timeout(_) => RunnerError::timeout(format!("{what}: {e}")),
        ClientError::Connect { .. } => RunnerError::not_found(format!("{what}: {e}")),
        _ => RunnerError::failed(format!("{what}: {e}")),
    }
}

/// 16 random bytes from `/dev/urandom` as 32 hex digits: an agent session token.
pub fn random_token() -> Result<String, RunnerError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| RunnerError::failed(format!("cannot read /dev/urandom: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A short, stable tag of a sandbox root (FNV-1a of its path, 8 hex digits).
/// Sandbox ids are unique per engine state directory, not per host: names shared by
/// the host (cgroups) carry this tag so two engines never share one.
pub fn root_tag(root: &Path) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in root.as_os_str().as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// Polling interval for waits on process exit: 1 ms, doubling to 16 ms, so a
/// quick exit is noticed quickly and a slow one costs few `/proc` scans.
pub fn backoff(round: &mut u32) -> Duration {
    let d = Duration::from_millis(1 << (*round).min(4));
    *round += 1;
    d
}

/// The handle format version both runners write: the runner's state, then the
/// job's cancel grace.
pub const HANDLE_VERSION: u32 = 2;

/// Decodes a runner's handle: format 1 (the state alone, from before cancel
/// grace existed) or 2 (the state and the job's cancel grace, as
/// [`encode_handle`] writes it). Any other version, or bytes that do not
/// decode, is a "malformed handle" error.
pub fn decode_handle<T: serde::de::DeserializeOwned>(
    handle: &reel_plugin_sdk::Handle,
) -> Result<(T, Option<u64>), RunnerError> {
    let malformed =
        |e: RunnerError| RunnerError::invalid_input(format!("malformed handle: {}", e.message));
    match handle.version {
        1 => Ok((
            reel_plugin_sdk::codec::decode(&handle.bytes).map_err(malformed)?,
            None,
        )),
        HANDLE_VERSION => reel_plugin_sdk::codec::decode(&handle.bytes).map_err(malformed),
        v => Err(RunnerError::invalid_input(format!(
            "handle format version {v} is not one this runner reads (1 or {HANDLE_VERSION})"
        ))),
    }
}

/// Encodes a runner's state and the job's cancel grace as a handle of
/// [`HANDLE_VERSION`].
pub fn encode_handle<T: serde::Serialize>(
    state: &T,
    cancel_grace_ms: Option<u64>,
) -> Result<reel_plugin_sdk::Handle, RunnerError> {
    reel_plugin_sdk::Handle::encode(HANDLE_VERSION, &(state, cancel_grace_ms))
}
