//! [`LoadedRunner`]: one runner instance inside a loaded plugin.

use std::any::Any;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::{Arc, OnceLock};

use reel_plugin_abi as abi;
use reel_plugin_sdk::{
    Capability, CollectRequest, Collection, Description, ExecResult, Handle, JobRequest,
    OutputSink, Probe, Runner, RunnerConfig, RunnerError, StepRequest, Stream,
};

use super::library::{Library, slice};

/// A runner instance created by [`PluginSet::instantiate`](super::PluginSet::instantiate).
///
/// It has the operations of the SDK's [`Runner`] trait (and implements it, so the
/// conformance kit can check it), as inherent methods with the same signatures. Every
/// operation blocks until the plugin returns: from async code call them through
/// [`LoadedRunner::unblock`] (or `blocking::unblock` directly), never on the executor.
///
/// `cancel` may be called from another thread while `exec` runs. The instance is
/// destroyed when the last `Arc` is dropped; the library stays loaded.
#[derive(Debug)]
pub struct LoadedRunner {
    name: String,
    library: &'static Library,
    instance: *const abi::Instance,
    /// This instance's description, asked once (`describe` is constant).
    description: OnceLock<Description>,
}

// SAFETY: the instance is a `Box<R>` in the plugin where `R: Runner`, which is
// `Send + Sync`; the library is leaked and its vtable functions are thread-safe by the
// ABI contract.
unsafe impl Send for LoadedRunner {}
// SAFETY: as above; all operations take `&R` inside the plugin.
unsafe impl Sync for LoadedRunner {}

impl Drop for LoadedRunner {
    fn drop(&mut self) {
        // SAFETY: the instance was created by this library and, since we hold the only
        // reference, no call on it is running or can follow.
        unsafe { (self.library.vtable().destroy)(self.instance) };
    }
}

/// The host side of one `exec`'s output callback.
struct ExecSink<'a> {
    sink: &'a mut dyn OutputSink,
    panic: Option<Box<dyn Any + Send>>,
    /// Where the output passed to `sink` so far ends.
    passed: u64,
}

/// `HostCallbacks::output_stored` (ABI 1.1): what the exec's sink holds durably.
///
/// # Safety
/// `sink` must be the `OutputCallback` of a running exec, called on its thread.
pub(super) unsafe extern "C" fn output_stored(sink: *const abi::OutputCallback) -> u64 {
    if sink.is_null() {
        return abi::OUTPUT_REFUSED;
    }
    // SAFETY: the plugin passes back the callback we gave it for this exec; its
    // `ctx` is the `ExecSink` on our stack, touched by nobody else meanwhile (the
    // plugin calls this on the exec's thread, between chunks).
    let exec = unsafe { &*(*sink).ctx.cast::<ExecSink<'_>>() };
    if exec.panic.is_some() {
        return abi::OUTPUT_REFUSED;
    }
    match catch_unwind(AssertUnwindSafe(|| exec.sink.stored().end(exec.passed))) {
        Ok(Some(end)) => end,
        Ok(None) | Err(_) => abi::OUTPUT_REFUSED,
    }
}

/// # Safety
/// `ctx` must be the `ExecSink` of the running exec, and `bytes` valid for the call.
unsafe extern "C" fn output_chunk(ctx: *mut c_void, stream: u32, offset: u64, bytes: abi::Slice) {
    // SAFETY: the caller passes back the `ExecSink` we gave it for this exec, which
    // lives on our stack until the exec returns and is touched by nobody else.
    let exec = unsafe { &mut *ctx.cast::<ExecSink<'_>>() };
    if exec.panic.is_some() {
        return;
    }
    let stream = if stream == abi::STREAM_STDERR {
        Stream::Stderr
    } else {
        Stream::Stdout
    };
    let bytes: &[u8] = if bytes.len == 0 {
        &[]
    } else {
        // SAFETY: the plugin lends `len` readable bytes for the duration of the call.
        unsafe { std::slice::from_raw_parts(bytes.ptr, bytes.len) }
    };
    // A panicking sink must not unwind through the plugin; it is resumed after the
    // exec returns.
    exec.passed = exec.passed.max(offset + bytes.len() as u64);
    if let Err(payload) = catch_unwind(AssertUnwindSafe(|| exec.sink.chunk(stream, offset, bytes)))
    {
        exec.panic = Some(payload);
    }
}

impl LoadedRunner {
    pub(super) fn new(
        name: String,
        library: &'static Library,
        instance: *const abi::Instance,
    ) -> Self {
        LoadedRunner {
            name,
            library,
            instance,
            description: OnceLock::new(),
        }
    }

    /// Whether this instance declares `capability` (its description is asked
    /// once). The engine acts only on declared capabilities: see [`Capability`].
    pub fn has(&self, capability: Capability) -> bool {
        self.description
            .get_or_init(|| LoadedRunner::describe(self))
            .has(capability)
    }

    /// Whether this instance can collect artifacts: its plugin's table has
    /// `collect` (ABI 1.2 on) and it declares [`Capability::Collect`].
    pub fn can_collect(&self) -> bool {
        self.library.vtable().collect.is_some() && self.has(Capability::Collect)
    }

    /// The ABI version the plugin was built against.
    pub fn abi_version(&self) -> abi::AbiVersion {
        self.library.abi_version()
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file the plugin was loaded from.
    pub fn path(&self) -> &std::path::Path {
        self.library.path()
    }

    fn call<I: serde::Serialize + ?Sized, O: serde::de::DeserializeOwned>(
        &self,
        op: abi::OpFn,
        input: &I,
    ) -> Result<O, RunnerError> {
        // SAFETY: `self.instance` is live until `self` is dropped.
        unsafe { self.library.call(op, self.instance, input) }
    }

    /// Runs `f` with this runner on the `blocking` thread pool, so that a plugin call
    /// never stalls the async executor.
    ///
    /// ```text
    /// let probe = runner.unblock(move |r| r.probe(&handle)).await?;
    /// ```
    pub async fn unblock<T, F>(self: &Arc<Self>, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(&LoadedRunner) -> T + Send + 'static,
    {
        let this = Arc::clone(self);
        blocking::unblock(move || f(&this)).await
    }

    pub(super) fn call_describe(&self) -> Result<Description, RunnerError> {
        self.call(self.library.vtable().describe, &())
    }

    /// See [`Runner::describe`]. An error (which a correct plugin cannot return)
    /// becomes a description whose version holds the error.
    pub fn describe(&self) -> Description {
        self.call_describe().unwrap_or_else(|e| Description {
            name: self.name.clone(),
            version: format!("<describe failed: {e}>"),
            abi_major: self.library.abi_version().major,
            abi_minor: self.library.abi_version().minor,
            capabilities: Vec::new(),
        })
    }

    /// Runs an operation taking a [`JobRequest`], encoded in the form of the
    /// plugin's ABI minor (a plugin of an older minor gets the fields it knows).
    fn call_job<O: serde::de::DeserializeOwned>(
        &self,
        op: abi::OpFn,
        job: &JobRequest,
    ) -> Result<O, RunnerError> {
        let input = job.encode_for_minor(self.library.abi_version().minor)?;
        let mut out = abi::Buffer::EMPTY;
        // SAFETY: the instance is live until `self` is dropped; `input` outlives
        // the call and `out` is valid for a write.
        let status = unsafe { op(self.instance, slice(&input), &mut out) };
        self.library.finish(status, out)
    }

    /// See [`Runner::validate`].
    pub fn validate(&self, job: &JobRequest) -> Result<Vec<String>, RunnerError> {
        self.call_job(self.library.vtable().validate, job)
    }

    /// See [`Runner::plan`].
    pub fn plan(&self, job: &JobRequest) -> Result<Handle, RunnerError> {
        self.call_job(self.library.vtable().plan, job)
    }

    /// See [`Runner::prepare`].
    pub fn prepare(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        self.call(self.library.vtable().prepare, handle)
    }

    /// See [`Runner::boot`].
    pub fn boot(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        self.call(self.library.vtable().boot, handle)
    }

    /// See [`Runner::connect`].
    pub fn connect(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        self.call(self.library.vtable().connect, handle)
    }

    /// See [`Runner::exec`]. `sink` is called on this thread while the step runs; if
    /// it panics, the panic resumes here once the plugin has returned.
    pub fn exec(
        &self,
        handle: &Handle,
        step: &StepRequest,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecResult, RunnerError> {
        let input = reel_plugin_sdk::codec::encode(&(handle, step))?;
        let mut exec = ExecSink {
            sink,
            panic: None,
            passed: step.resume_from,
        };
        let callback = abi::OutputCallback {
            ctx: (&mut exec as *mut ExecSink<'_>).cast::<c_void>(),
            chunk: output_chunk,
        };
        let mut out = abi::Buffer::EMPTY;
        // SAFETY: the instance is live; `input`, `callback` and the `ExecSink` it
        // points to outlive the call; `out` is valid for a write.
        let status = unsafe {
            (self.library.vtable().exec)(self.instance, slice(&input), &callback, &mut out)
        };
        let result = self.library.finish(status, out);
        if let Some(payload) = exec.panic {
            resume_unwind(payload);
        }
        result
    }

    /// See [`Runner::cancel`]. Safe to call while `exec` runs on another thread.
    pub fn cancel(&self, handle: &Handle, exec_id: u64) -> Result<(), RunnerError> {
        self.call(self.library.vtable().cancel, &(handle, exec_id))
    }

    /// See [`Runner::drain`].
    pub fn drain(&self, handle: &Handle) -> Result<(), RunnerError> {
        self.call(self.library.vtable().drain, handle)
    }

    /// See [`Runner::poweroff`].
    pub fn poweroff(
        &self,
        handle: &Handle,
        graceful: bool,
        deadline_ms: u64,
    ) -> Result<(), RunnerError> {
        self.call(
            self.library.vtable().poweroff,
            &(handle, graceful, deadline_ms),
        )
    }

    /// See [`Runner::cleanup`].
    pub fn cleanup(&self, handle: &Handle) -> Result<(), RunnerError> {
        self.call(self.library.vtable().cleanup, handle)
    }

    /// See [`Runner::probe`].
    pub fn probe(&self, handle: &Handle) -> Result<Probe, RunnerError> {
        self.call(self.library.vtable().probe, handle)
    }

    /// See [`Runner::reattach`].
    pub fn reattach(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        self.call(self.library.vtable().reattach, handle)
    }

    /// See [`Runner::collect`]. A plugin built against ABI 1.1 or older has no
    /// `collect` in its table: that is an `Unsupported` error, and nothing is
    /// called.
    pub fn collect(
        &self,
        handle: &Handle,
        request: &CollectRequest,
    ) -> Result<Collection, RunnerError> {
        let Some(op) = self.library.vtable().collect else {
            let v = self.library.abi_version();
            return Err(RunnerError::unsupported(format!(
                "runner `{}` was built against plugin ABI {}.{}, which has no collect",
                self.name, v.major, v.minor
            )));
        };
        self.call(op, &(handle, request))
    }
}

/// The trait view of a loaded runner, so code written against [`Runner`] (such as the
/// conformance kit) works on plugins too. `new` is not how a loaded runner is made.
impl Runner for LoadedRunner {
    fn new(_config: &RunnerConfig) -> Result<Self, RunnerError> {
        Err(RunnerError::unsupported(
            "a LoadedRunner is created by PluginSet::instantiate",
        ))
    }
    fn describe(&self) -> Description {
        LoadedRunner::describe(self)
    }
    fn validate(&self, job: &JobRequest) -> Result<Vec<String>, RunnerError> {
        LoadedRunner::validate(self, job)
    }
    fn plan(&self, job: &JobRequest) -> Result<Handle, RunnerError> {
        LoadedRunner::plan(self, job)
    }
    fn prepare(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        LoadedRunner::prepare(self, handle)
    }
    fn boot(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        LoadedRunner::boot(self, handle)
    }
    fn connect(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        LoadedRunner::connect(self, handle)
    }
    fn exec(
        &self,
        handle: &Handle,
        step: &StepRequest,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecResult, RunnerError> {
        LoadedRunner::exec(self, handle, step, sink)
    }
    fn cancel(&self, handle: &Handle, exec_id: u64) -> Result<(), RunnerError> {
        LoadedRunner::cancel(self, handle, exec_id)
    }
    fn drain(&self, handle: &Handle) -> Result<(), RunnerError> {
        LoadedRunner::drain(self, handle)
    }
    fn poweroff(
        &self,
        handle: &Handle,
        graceful: bool,
        deadline_ms: u64,
    ) -> Result<(), RunnerError> {
        LoadedRunner::poweroff(self, handle, graceful, deadline_ms)
    }
    fn cleanup(&self, handle: &Handle) -> Result<(), RunnerError> {
        LoadedRunner::cleanup(self, handle)
    }
    fn probe(&self, handle: &Handle) -> Result<Probe, RunnerError> {
        LoadedRunner::probe(self, handle)
    }
    fn reattach(&self, handle: &Handle) -> Result<Handle, RunnerError> {
        LoadedRunner::reattach(self, handle)
    }
    fn collect(
        &self,
        handle: &Handle,
        request: &CollectRequest,
    ) -> Result<Collection, RunnerError> {
        LoadedRunner::collect(self, handle, request)
    }
}
