//! The unsafe glue behind [`export_runner!`](crate::export_runner). Not a public API:
//! the macro is the only intended caller.
//!
//! Each exported function decodes its borrowed input, calls the runner inside
//! `catch_unwind`, and encodes the result (or the error, or the panic message as a
//! `Panicked` error) into a buffer the host gives back through `free_buffer`.

use std::any::Any;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};

use reel_plugin_abi as abi;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec;
use crate::types::{Handle, JobRequest, OutputSink, Runner, RunnerConfig, RunnerError, Stream};

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

fn into_buffer(bytes: Vec<u8>) -> abi::Buffer {
    let mut bytes = std::mem::ManuallyDrop::new(bytes);
    abi::Buffer {
        ptr: bytes.as_mut_ptr(),
        len: bytes.len(),
        cap: bytes.capacity(),
    }
}

/// # Safety
/// `out` must be valid for a write.
unsafe fn finish<O: Serialize>(
    result: Result<O, RunnerError>,
    out: *mut abi::Buffer,
) -> abi::Status {
    let (status, bytes) = match result.and_then(|o| codec::encode(&o)) {
        Ok(bytes) => (abi::STATUS_OK, bytes),
        Err(e) => (abi::STATUS_ERR, codec::encode(&e).unwrap_or_default()),
    };
    // SAFETY: the caller guarantees `out` is valid for a write.
    unsafe { out.write(into_buffer(bytes)) };
    status
}

/// # Safety
/// `input` must be valid for reads of `input.len` bytes for the duration of the call.
unsafe fn input_bytes<'a>(input: abi::Slice) -> &'a [u8] {
    if input.len == 0 {
        &[]
    } else {
        // SAFETY: the caller guarantees the slice is valid and borrowed for the call.
        unsafe { std::slice::from_raw_parts(input.ptr, input.len) }
    }
}

/// Runs one operation of instance `instance`.
///
/// # Safety
/// `instance` must come from `create::<R>` and not be destroyed; `input` must be
/// valid for the call; `out` must be valid for a write.
unsafe fn call<R: Runner, I: DeserializeOwned, O: Serialize>(
    instance: *const abi::Instance,
    input: abi::Slice,
    out: *mut abi::Buffer,
    op: impl FnOnce(&R, I) -> Result<O, RunnerError>,
) -> abi::Status {
    // SAFETY: forwarded from this function's own contract.
    unsafe { call_decoding(instance, input, out, codec::decode::<I>, op) }
}

/// [`call`] with the input decoded by `decode` (a [`JobRequest`] is read in
/// the form of either minor).
///
/// # Safety
/// As [`call`].
unsafe fn call_decoding<R: Runner, I, O: Serialize>(
    instance: *const abi::Instance,
    input: abi::Slice,
    out: *mut abi::Buffer,
    decode: fn(&[u8]) -> Result<I, RunnerError>,
    op: impl FnOnce(&R, I) -> Result<O, RunnerError>,
) -> abi::Status {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `instance` is a live `Box<R>` from `create::<R>` (caller contract).
        let runner = unsafe { &*instance.cast::<R>() };
        // SAFETY: the caller guarantees `input` is valid for the call.
        let input: I = decode(unsafe { input_bytes(input) })?;
        op(runner, input)
    }))
    .unwrap_or_else(|payload| Err(RunnerError::panicked(panic_message(&*payload))));
    // SAFETY: the caller guarantees `out` is valid for a write. Encoding cannot panic.
    unsafe { finish(result, out) }
}

/// Marks an extern fn generic over the runner type as one of the table's entries.
macro_rules! op {
    ($name:ident, $in:ty, $out:ty, |$r:ident, $i:pat_param| $body:expr) => {
        /// # Safety
        /// See [`abi::OpFn`]: a live instance of `R`, a valid input and output.
        unsafe extern "C" fn $name<R: Runner>(
            instance: *const abi::Instance,
            input: abi::Slice,
            out: *mut abi::Buffer,
        ) -> abi::Status {
            // SAFETY: forwarded from this function's own contract, which the host
            // upholds per the ABI.
            unsafe { call::<R, $in, $out>(instance, input, out, |$r: &R, $i: $in| $body) }
        }
    };
}

op!(describe, (), crate::types::Description, |r, ()| Ok(
    r.describe()
));
/// `validate` and `plan` take a [`JobRequest`] from an engine of any 1.x minor.
macro_rules! job_op {
    ($name:ident, $out:ty, |$r:ident, $job:ident| $body:expr) => {
        /// # Safety
        /// See [`abi::OpFn`]: a live instance of `R`, a valid input and output.
        unsafe extern "C" fn $name<R: Runner>(
            instance: *const abi::Instance,
            input: abi::Slice,
            out: *mut abi::Buffer,
        ) -> abi::Status {
            // SAFETY: forwarded from this function's own contract, which the host
            // upholds per the ABI.
            unsafe {
                call_decoding::<R, JobRequest, $out>(
                    instance,
                    input,
                    out,
                    JobRequest::decode_any,
                    |$r: &R, $job: JobRequest| $body,
                )
            }
        }
    };
}

job_op!(validate, Vec<String>, |r, job| r.validate(&job));
job_op!(plan, Handle, |r, job| r.plan(&job));
op!(prepare, Handle, Handle, |r, h| r.prepare(&h));
op!(boot, Handle, Handle, |r, h| r.boot(&h));
op!(connect, Handle, Handle, |r, h| r.connect(&h));
op!(cancel, (Handle, u64), (), |r, (h, id)| r.cancel(&h, id));
op!(drain, Handle, (), |r, h| r.drain(&h));
op!(poweroff, (Handle, bool, u64), (), |r,
                                        (
    h,
    graceful,
    deadline,
)| r
    .poweroff(&h, graceful, deadline));
op!(cleanup, Handle, (), |r, h| r.cleanup(&h));
op!(probe, Handle, crate::types::Probe, |r, h| r.probe(&h));
op!(reattach, Handle, Handle, |r, h| r.reattach(&h));
op!(
    collect,
    (Handle, crate::types::CollectRequest),
    crate::types::Collection,
    |r, (h, req)| r.collect(&h, &req)
);

/// The host's output callback seen as an [`OutputSink`].
struct HostSink(*const abi::OutputCallback);

impl OutputSink for HostSink {
    fn stored(&self) -> crate::types::Stored {
        match crate::host::output_stored(self.0) {
            None => crate::types::Stored::All,
            Some(abi::OUTPUT_REFUSED) => crate::types::Stored::Refused,
            Some(n) => crate::types::Stored::Upto(n),
        }
    }

    fn chunk(&mut self, stream: Stream, offset: u64, bytes: &[u8]) {
        let stream = match stream {
            Stream::Stdout => abi::STREAM_STDOUT,
            Stream::Stderr => abi::STREAM_STDERR,
        };
        let slice = abi::Slice {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        };
        // SAFETY: the sink is valid for the duration of the `exec` call this value
        // lives in, and `bytes` outlives the callback.
        unsafe {
            let cb = &*self.0;
            (cb.chunk)(cb.ctx, stream, offset, slice);
        }
    }
}

/// # Safety
/// See [`abi::ExecFn`].
unsafe extern "C" fn exec<R: Runner>(
    instance: *const abi::Instance,
    input: abi::Slice,
    sink: *const abi::OutputCallback,
    out: *mut abi::Buffer,
) -> abi::Status {
    let op = |r: &R, (handle, step): (Handle, crate::types::StepRequest)| {
        if sink.is_null() {
            return Err(RunnerError::invalid_input(
                "exec called without an output sink",
            ));
        }
        r.exec(&handle, &step, &mut HostSink(sink))
    };
    // SAFETY: forwarded from this function's contract.
    unsafe { call::<R, _, _>(instance, input, out, op) }
}

/// # Safety
/// See [`abi::RunnerVTable::create`].
unsafe extern "C" fn create<R: Runner>(
    config: abi::Slice,
    instance: *mut *const abi::Instance,
    out: *mut abi::Buffer,
) -> abi::Status {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host guarantees `config` is valid for the call.
        let config: RunnerConfig = codec::decode(unsafe { input_bytes(config) })?;
        R::new(&config)
    }))
    .unwrap_or_else(|payload| Err(RunnerError::panicked(panic_message(&*payload))));
    match result {
        Ok(runner) => {
            let ptr = Box::into_raw(Box::new(runner))
                .cast_const()
                .cast::<abi::Instance>();
            // SAFETY: the host guarantees `instance` and `out` are valid for writes.
            unsafe {
                instance.write(ptr);
                out.write(abi::Buffer::EMPTY);
            }
            abi::STATUS_OK
        }
        // SAFETY: the host guarantees `out` is valid for a write.
        Err(e) => unsafe { finish::<()>(Err(e), out) },
    }
}

/// # Safety
/// See [`abi::RunnerVTable::destroy`].
unsafe extern "C" fn destroy<R: Runner>(instance: *const abi::Instance) {
    if instance.is_null() {
        return;
    }
    // SAFETY: `instance` came from `Box::into_raw` in `create::<R>` and the host
    // destroys it once, with no call running.
    let runner = unsafe { Box::from_raw(instance.cast_mut().cast::<R>()) };
    // A panicking Drop must not unwind into the host.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(runner)));
}

/// # Safety
/// See [`abi::RunnerVTable::free_buffer`].
unsafe extern "C" fn free_buffer(buffer: abi::Buffer) {
    if !buffer.ptr.is_null() {
        // SAFETY: non-null buffers are made only by `into_buffer` from a `Vec<u8>` of
        // this very allocator, and the host gives each back once.
        drop(unsafe { Vec::from_raw_parts(buffer.ptr, buffer.len, buffer.cap) });
    }
}

/// # Safety
/// See [`abi::RunnerVTable::init`].
unsafe extern "C" fn init(host: *const abi::HostCallbacks) -> abi::Status {
    // SAFETY: the host guarantees `host` lives for the life of the process.
    match catch_unwind(AssertUnwindSafe(|| unsafe { crate::host::install(host) })) {
        Ok(()) => abi::STATUS_OK,
        Err(_) => abi::STATUS_ERR,
    }
}

/// Holds the table for one runner type as an associated constant, so that a
/// reference to it is promoted to `'static`.
pub struct VTableFor<R>(PhantomData<R>);

impl<R: Runner> VTableFor<R> {
    const VTABLE: abi::RunnerVTable = abi::RunnerVTable {
        abi_version: abi::AbiVersion {
            major: abi::ABI_MAJOR,
            minor: abi::ABI_MINOR,
        },
        struct_size: std::mem::size_of::<abi::RunnerVTable>(),
        init,
        free_buffer,
        create: create::<R>,
        destroy: destroy::<R>,
        describe: describe::<R>,
        validate: validate::<R>,
        plan: plan::<R>,
        prepare: prepare::<R>,
        boot: boot::<R>,
        connect: connect::<R>,
        exec: exec::<R>,
        cancel: cancel::<R>,
        drain: drain::<R>,
        poweroff: poweroff::<R>,
        cleanup: cleanup::<R>,
        probe: probe::<R>,
        reattach: reattach::<R>,
        collect: collect::<R>,
    };
}

/// The table of runner `R`, for the entry symbol.
pub fn vtable<R: Runner>() -> *const abi::RunnerVTable {
    &VTableFor::<R>::VTABLE
}
