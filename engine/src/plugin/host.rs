//! The host callbacks each plugin library gets at `init`: runner notices and log
//! records, re-emitted as the engine's own `tracing` events.

use std::ffi::c_void;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use reel_plugin_abi as abi;
use tracing::level_filters::LevelFilter;

/// Receives runner notices: `(plugin name, kind, message)`.
type NoticeHook = Box<dyn Fn(&str, &str, &str) + Send + Sync>;

static NOTICE_HOOK: OnceLock<NoticeHook> = OnceLock::new();

std::thread_local! {
    /// Notices raised on this thread while [`capture_notices`] runs.
    static CAPTURED: std::cell::RefCell<Option<Vec<(String, String)>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` (a runner call) and returns, with its result, every notice the
/// plugin raised on this thread during the call as `(kind, message)`. A plugin
/// raises notices synchronously from inside the call (the SDK's `host::notice`
/// says to), so this attributes them to the job the call was about even when many
/// jobs run at once. The engine puts them on that job's record once the call
/// returns. A notice raised on another thread is logged, never captured.
pub fn capture_notices<T>(f: impl FnOnce() -> T) -> (T, Vec<(String, String)>) {
    /// Stops capturing when the call ends, also by unwinding (a panicking
    /// output sink resumes its panic after the exec), so a later call on this
    /// pooled thread never collects into a stale list.
    struct Capturing;
    impl Drop for Capturing {
        fn drop(&mut self) {
            CAPTURED.with(|c| c.borrow_mut().take());
        }
    }
    CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let guard = Capturing;
    let out = f();
    let notices = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    drop(guard);
    (out, notices)
}

/// Sends every runner notice from every plugin to `hook` as well as to the log. Set
/// once; later calls return `false` and change nothing.
pub fn set_notice_hook(hook: impl Fn(&str, &str, &str) + Send + Sync + 'static) -> bool {
    NOTICE_HOOK.set(Box::new(hook)).is_ok()
}

/// Per-library host state; leaked with the library.
struct HostContext {
    /// The plugin's name once it has described itself, else its file name.
    name: Mutex<String>,
}

/// Contexts by file, so the name can be filled in after `describe`.
static CONTEXTS: Mutex<Vec<(std::path::PathBuf, &'static HostContext)>> = Mutex::new(Vec::new());

fn text<'a>(s: abi::Slice) -> std::borrow::Cow<'a, str> {
    if s.len == 0 {
        return "".into();
    }
    // SAFETY: the plugin lends `len` readable bytes for the duration of the callback,
    // and the returned text is used only within it.
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(s.ptr, s.len) })
}

fn plugin_name(ctx: *const c_void) -> String {
    // SAFETY: `ctx` is the leaked `HostContext` we gave this library in `callbacks`.
    let ctx = unsafe { &*ctx.cast::<HostContext>() };
    ctx.name.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

unsafe extern "C" fn on_event(ctx: *const c_void, kind: abi::Slice, message: abi::Slice) {
    let _ = std::panic::catch_unwind(|| {
        let plugin = plugin_name(ctx);
        let (kind, message) = (text(kind), text(message));
        tracing::info!(target: "reel::plugin", %plugin, %kind, %message, "runner notice");
        CAPTURED.with(|c| {
            if let Some(v) = c.borrow_mut().as_mut() {
                v.push((kind.to_string(), message.to_string()));
            }
        });
        if let Some(hook) = NOTICE_HOOK.get() {
            hook(&plugin, &kind, &message);
        }
    });
}

unsafe extern "C" fn on_log(ctx: *const c_void, record: *const abi::LogRecord) {
    let _ = std::panic::catch_unwind(|| {
        if record.is_null() {
            return;
        }
        // SAFETY: a non-null record is valid for the duration of the callback.
        let record = unsafe { &*record };
        let plugin = plugin_name(ctx);
        let (target, message) = (text(record.target), text(record.message));
        match record.level {
            abi::LOG_ERROR => {
                tracing::error!(target: "reel::plugin", %plugin, %target, "{message}")
            }
            abi::LOG_WARN => tracing::warn!(target: "reel::plugin", %plugin, %target, "{message}"),
            abi::LOG_INFO => tracing::info!(target: "reel::plugin", %plugin, %target, "{message}"),
            abi::LOG_DEBUG => {
                tracing::debug!(target: "reel::plugin", %plugin, %target, "{message}")
            }
            _ => tracing::trace!(target: "reel::plugin", %plugin, %target, "{message}"),
        }
    });
}

/// Leaks a set of callbacks for the library at `path`. Plugins forward logs up to the
/// engine's most verbose enabled level at the time of loading.
pub(super) fn callbacks(path: &Path) -> *const abi::HostCallbacks {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ctx: &'static HostContext = Box::leak(Box::new(HostContext {
        name: Mutex::new(file),
    }));
    CONTEXTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((path.to_path_buf(), ctx));
    let max_level = match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => abi::LOG_ERROR,
        LevelFilter::WARN => abi::LOG_WARN,
        LevelFilter::INFO => abi::LOG_INFO,
        LevelFilter::DEBUG => abi::LOG_DEBUG,
        _ => abi::LOG_TRACE,
    };
    Box::leak(Box::new(abi::HostCallbacks {
        struct_size: std::mem::size_of::<abi::HostCallbacks>(),
        ctx: (ctx as *const HostContext).cast::<c_void>(),
        event: on_event,
        log: on_log,
        max_level,
        output_stored: super::loaded::output_stored,
    }))
}

/// Records the name the plugin at `path` described itself with, for its logs.
pub(super) fn name_plugin(path: &Path, name: &str) {
    let contexts = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, ctx)) = contexts.iter().rev().find(|(p, _)| p == path) {
        *ctx.name.lock().unwrap_or_else(|e| e.into_inner()) = name.to_owned();
    }
}
