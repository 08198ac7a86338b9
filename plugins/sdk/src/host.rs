//! The plugin's view of its host: runner notices and log forwarding.
//!
//! A cdylib has its own copy of `tracing` and so its own dispatcher: events a plugin
//! records never reach the engine's subscriber on their own. At `init` the glue
//! installs [`HostLogLayer`] as this plugin's global subscriber, which hands each
//! record to the host's log callback. Before `init` (for example in a plugin's own
//! unit tests) nothing is installed and `tracing` behaves as usual.

use std::fmt::Write as _;
use std::sync::OnceLock;

use reel_plugin_abi as abi;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};

/// The host callbacks, kept for the life of the process.
struct HostRef(*const abi::HostCallbacks);

// SAFETY: the host promises (see `abi::HostCallbacks`) that the struct and its `ctx`
// live for the life of the process and that its functions may be called from any
// thread.
unsafe impl Send for HostRef {}
// SAFETY: as above; the struct is only read.
unsafe impl Sync for HostRef {}

static HOST: OnceLock<HostRef> = OnceLock::new();

/// The host's callbacks and the `struct_size` it reported. Fields are read one at a
/// time through the raw pointer (never as a `&HostCallbacks`, which would claim the
/// whole, possibly newer, struct): a 1.0 field always, a later one only where
/// [`abi::field_present`] says the host's struct covers it.
#[derive(Clone, Copy)]
struct Host {
    callbacks: *const abi::HostCallbacks,
    struct_size: usize,
}

/// Whether callbacks whose host reported `struct_size` hold every 1.0 field: true
/// for any 1.x host, older or newer than us.
fn accepted(struct_size: usize) -> bool {
    abi::field_present(struct_size, abi::HOST_CALLBACKS_V1_0_SIZE)
}

fn host() -> Option<Host> {
    let h = HOST.get()?;
    // SAFETY: the pointer was non-null and accepted when stored, and the host keeps
    // it alive and unchanged for the life of the process; `struct_size` is a 1.0 field.
    let struct_size = unsafe { (*h.0).struct_size };
    Some(Host {
        callbacks: h.0,
        struct_size,
    })
}

/// How much of the exec whose sink is `sink` the host holds durably (see
/// [`abi::HostCallbacks::output_stored`]), or `None` from a 1.0 host, which stores
/// every chunk before `chunk` returns.
pub(crate) fn output_stored(sink: *const abi::OutputCallback) -> Option<u64> {
    let h = host()?;
    let end =
        core::mem::offset_of!(abi::HostCallbacks, output_stored) + std::mem::size_of::<usize>();
    if !abi::field_present(h.struct_size, end) {
        return None;
    }
    // SAFETY: the host's struct covers `output_stored` (checked above) and lives for
    // the process; `sink` is the exec's own callback, valid during the exec.
    Some(unsafe { ((*h.callbacks).output_stored)(sink) })
}

fn slice(bytes: &[u8]) -> abi::Slice {
    abi::Slice {
        ptr: bytes.as_ptr(),
        len: bytes.len(),
    }
}

/// Stores the host callbacks and installs the log layer. Called by the glue's `init`.
///
/// # Safety
/// `host` must be null or point to a `HostCallbacks` that lives for the rest of the
/// process.
pub(crate) unsafe fn install(host: *const abi::HostCallbacks) {
    if host.is_null() {
        return;
    }
    // SAFETY: the caller guarantees a non-null `host` is valid for the process life,
    // and every version of the struct starts with `struct_size`, which is read alone
    // until it is checked.
    let struct_size = unsafe { (*host).struct_size };
    if !accepted(struct_size) {
        return;
    }
    // SAFETY: as above, and the host's struct covers the 1.0 layout, which holds
    // `max_level`.
    let max = unsafe { (*host).max_level };
    if HOST.set(HostRef(host)).is_ok() {
        let subscriber = tracing_subscriber::registry().with(HostLogLayer { max_level: max });
        // Another subscriber may already be set if the plugin installed its own;
        // theirs wins.
        let _ = tracing::subscriber::set_global_default(subscriber);
    }
}

/// The notice kind [`planned_resource`] sends: the engine takes the notices of
/// this kind raised during `plan` as the list of resources the plan names.
pub const PLANNED_RESOURCE: &str = "planned-resource";

/// Names, from inside [`Runner::plan`](crate::Runner::plan), one resource the job
/// will have once it is set up: `kind` says what it is (`workdir`, `cgroup`,
/// `agent-socket`, `tap-device`), `name` which one (a path, a device name, or how
/// to find it: `(pid in /x/agent.pid)`). The engine logs the list with the plan
/// handle (`SandboxPlanned`), before anything exists, and `reel replay`,
/// `inspect` and `recover --dry-run` show it as what the job holds. A plan that
/// names nothing is shown as "sandbox (named in the runner's handle)".
///
/// Sent as a notice of kind [`PLANNED_RESOURCE`] with the message `"<kind>
/// <name>"`; called outside `plan`, it is recorded as an ordinary notice.
pub fn planned_resource(kind: &str, name: &str) {
    notice(PLANNED_RESOURCE, &format!("{kind} {name}"));
}

/// Sends a runner notice (a note the engine records on the job's record as a
/// `RunnerNotice` event, such as `"cgroup-skipped"` or `"out-of-memory"`) to the
/// host. Without a host it is logged instead.
///
/// Call it on the thread of the runner call it is about (the thread `exec`,
/// `plan`, `cleanup`... was called on): the engine attributes a notice to the job
/// whose call raised it on that thread, and records it once the call returns. A
/// notice raised on another thread of the plugin, or during `validate`, `probe`
/// or `describe` (which change no job's record), reaches the engine's log only.
pub fn notice(kind: &str, message: &str) {
    match host() {
        // SAFETY: the callbacks are valid for the life of the process (see `install`),
        // `event` and `ctx` are 1.0 fields, and the slices are borrowed for the call.
        Some(h) => unsafe {
            let p = h.callbacks;
            ((*p).event)((*p).ctx, slice(kind.as_bytes()), slice(message.as_bytes()))
        },
        None => tracing::info!(kind, message, "runner notice"),
    }
}

fn level_code(level: &Level) -> u32 {
    match *level {
        Level::ERROR => abi::LOG_ERROR,
        Level::WARN => abi::LOG_WARN,
        Level::INFO => abi::LOG_INFO,
        Level::DEBUG => abi::LOG_DEBUG,
        Level::TRACE => abi::LOG_TRACE,
    }
}

/// A `tracing` layer that forwards each event to the host's log callback, with its
/// fields formatted into the message as `message key=value ...`.
#[derive(Debug)]
pub struct HostLogLayer {
    max_level: u32,
}

#[derive(Default)]
struct MessageVisitor {
    message: String,
    fields: String,
}

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.fields, " {}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for HostLogLayer {
    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        level_code(metadata.level()) <= self.max_level
    }

    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let Some(h) = host() else { return };
        let mut visitor = MessageVisitor::default();
        event.record(&mut visitor);
        visitor.message.push_str(&visitor.fields);
        let target = event.metadata().target();
        let record = abi::LogRecord {
            level: level_code(event.metadata().level()),
            target: slice(target.as_bytes()),
            message: slice(visitor.message.as_bytes()),
        };
        // SAFETY: the callbacks are valid for the life of the process, `log` and `ctx`
        // are 1.0 fields; the record and the bytes it borrows outlive the call.
        unsafe {
            let p = h.callbacks;
            ((*p).log)((*p).ctx, &record)
        };
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::c_void;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    static NOTICES: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn on_event(_: *const c_void, _: abi::Slice, _: abi::Slice) {
        NOTICES.fetch_add(1, Ordering::SeqCst);
    }

    unsafe extern "C" fn on_log(_: *const c_void, _: *const abi::LogRecord) {}

    unsafe extern "C" fn on_output_stored(_: *const abi::OutputCallback) -> u64 {
        7
    }

    fn callbacks(struct_size: usize) -> *const abi::HostCallbacks {
        Box::leak(Box::new(abi::HostCallbacks {
            struct_size,
            ctx: std::ptr::null(),
            event: on_event,
            log: on_log,
            max_level: 0,
            output_stored: on_output_stored,
        }))
    }

    #[test]
    fn callbacks_are_accepted_from_the_frozen_1_0_size_on() {
        assert!(accepted(abi::HOST_CALLBACKS_V1_0_SIZE));
        #[cfg(target_pointer_width = "64")]
        assert!(accepted(40));
        // A host of a newer minor reports a larger struct.
        assert!(accepted(abi::HOST_CALLBACKS_V1_0_SIZE + 8));
        assert!(!accepted(abi::HOST_CALLBACKS_V1_0_SIZE - 1));

        // SAFETY: the struct is leaked, so it lives for the rest of the process.
        unsafe { install(callbacks(abi::HOST_CALLBACKS_V1_0_SIZE - 1)) };
        assert!(host().is_none(), "undersized callbacks were installed");
        notice("ignored", "no host yet");
        // SAFETY: as above.
        unsafe { install(callbacks(abi::HOST_CALLBACKS_V1_0_SIZE)) };
        assert!(host().is_some(), "1.0 callbacks were refused");
        notice("kind", "message");
        assert_eq!(NOTICES.load(Ordering::SeqCst), 1);
        // A 1.0 host has no `output_stored`: it is not called, though this struct
        // (built by a newer SDK) happens to hold one.
        assert_eq!(output_stored(std::ptr::null()), None);
    }
}
