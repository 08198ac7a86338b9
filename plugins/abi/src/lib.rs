//! The C ABI between the reel engine and its runner plugins.
//!
//! Nothing but the `repr(C)` types in this crate crosses the plugin boundary.
//!
//! ```text
//! plugin .so
//!   reel_runner_abi_major : u32                      unversioned, so a host can name a
//!                                                    plugin built for another major
//!   reel_runner_entry_v1  : extern "C" fn() -> *const RunnerVTable
//!
//! RunnerVTable (static, never freed)
//!   abi_version  {major, minor}
//!   struct_size  size_of::<RunnerVTable>() as the plugin saw it; a host reads a field
//!                only if the field ends within struct_size (minor versions append)
//!   init, free_buffer, create, destroy, <one function per operation>
//! ```
//!
//! # Growing a struct
//!
//! [`RunnerVTable`] and [`HostCallbacks`] grow only by appending fields in a new
//! minor, and each carries the `struct_size` its builder compiled. Their 1.0 layouts
//! are frozen as literals, [`VTABLE_V1_0_SIZE`] and [`HOST_CALLBACKS_V1_0_SIZE`] (not
//! `size_of`, which grows with the struct), and `tests/layout.rs` pins the size and
//! the offset of every 1.0 field. A reader
//!
//! - refuses a struct whose `struct_size` is below the 1.0 size;
//! - reads a field appended later only where [`field_present`] says `struct_size`
//!   covers the field's end, and otherwise treats it as absent;
//! - never makes a reference to the whole struct unless `struct_size` covers all of
//!   it (the host copies the fields of a plugin's table one by one, through the raw
//!   pointer, and reads [`RunnerVTable::collect`] only where it is present).
//!
//! An appended field must start at or after the previous minor's size, never in its
//! tail padding: `HostCallbacks` ends with a `u32`, so on 64-bit targets a 1.1 field
//! must be 8-byte aligned (or follow an explicit `u32` of padding), or a 1.0 host's
//! `struct_size` would seem to cover it.
//!
//! Payloads are bincode envelopes (standard configuration) of the SDK's boundary
//! types. An input [`Slice`] is borrowed for the duration of the call only. A result
//! [`Buffer`] is allocated by the plugin and must be given back to the plugin's own
//! [`RunnerVTable::free_buffer`]. Host callbacks receive borrowed slices that are valid
//! for the callback only.
//!
//! Every operation returns a [`Status`]: on [`STATUS_OK`] the buffer holds the encoded
//! result; on [`STATUS_ERR`] it holds an encoded `RunnerError` (or is empty if even that
//! could not be encoded). Functions never unwind across the boundary.

#![no_std]

use core::ffi::c_void;

/// The ABI major version this crate describes. A host refuses any other major.
pub const ABI_MAJOR: u32 = 1;
/// The ABI minor version: the number of append-only revisions of [`RunnerVTable`]
/// and [`HostCallbacks`] (and of the SDK's boundary types). 1.1 appended
/// [`HostCallbacks::output_stored`]; 1.2 appended [`RunnerVTable::collect`] and the
/// SDK's `JobRequest::cancel_grace_ms`; 1.3 appended `JobRequest::network`
/// (no table changed).
pub const ABI_MINOR: u32 = 3;
/// The NUL-terminated name of the entry symbol for [`ABI_MAJOR`].
pub const ENTRY_SYMBOL: &[u8] = b"reel_runner_entry_v1\0";
/// The NUL-terminated name of the unversioned `u32` symbol holding a plugin's major.
pub const ABI_MAJOR_SYMBOL: &[u8] = b"reel_runner_abi_major\0";
/// The highest major a host probes `reel_runner_entry_v{N}` for when a plugin does
/// not export [`ABI_MAJOR_SYMBOL`].
pub const MAX_PROBED_MAJOR: u32 = 16;

/// The result of a plugin function.
pub type Status = u32;
/// The call succeeded; the out buffer holds the encoded result.
pub const STATUS_OK: Status = 0;
/// The call failed; the out buffer holds an encoded `RunnerError`, or is empty.
pub const STATUS_ERR: Status = 1;

/// `Stream::Stdout` in an output chunk.
pub const STREAM_STDOUT: u32 = 1;
/// `Stream::Stderr` in an output chunk.
pub const STREAM_STDERR: u32 = 2;

/// Log levels in a [`LogRecord`], in `tracing` order.
pub const LOG_ERROR: u32 = 1;
/// Warn level.
pub const LOG_WARN: u32 = 2;
/// Info level.
pub const LOG_INFO: u32 = 3;
/// Debug level.
pub const LOG_DEBUG: u32 = 4;
/// Trace level.
pub const LOG_TRACE: u32 = 5;

/// An ABI version.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbiVersion {
    /// Incompatible revisions; carried in the entry symbol's name.
    pub major: u32,
    /// Compatible revisions: fields appended to [`RunnerVTable`].
    pub minor: u32,
}

/// Bytes borrowed from the caller for the duration of one call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Slice {
    /// Start of the bytes; may be dangling when `len` is zero.
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

/// Bytes allocated by the plugin and owned by the receiver until it passes them to
/// [`RunnerVTable::free_buffer`].
#[repr(C)]
#[derive(Debug)]
pub struct Buffer {
    /// Start of the allocation; null for an empty buffer.
    pub ptr: *mut u8,
    /// Initialised bytes.
    pub len: usize,
    /// Allocated capacity, as the plugin's allocator needs it back.
    pub cap: usize,
}

impl Buffer {
    /// A buffer that owns nothing; freeing it is a no-op.
    pub const EMPTY: Buffer = Buffer {
        ptr: core::ptr::null_mut(),
        len: 0,
        cap: 0,
    };
}

/// One log record from a plugin's `tracing` calls.
#[repr(C)]
#[derive(Debug)]
pub struct LogRecord {
    /// One of the `LOG_*` constants.
    pub level: u32,
    /// UTF-8 target (module path).
    pub target: Slice,
    /// UTF-8 message with its fields already formatted.
    pub message: Slice,
}

/// Callbacks the host gives a plugin once, at [`RunnerVTable::init`]. The host keeps
/// this struct and `ctx` alive for as long as the process runs, and the functions may
/// be called from any thread.
#[repr(C)]
#[derive(Debug)]
pub struct HostCallbacks {
    /// `size_of::<HostCallbacks>()` as the host saw it; at least
    /// [`HOST_CALLBACKS_V1_0_SIZE`].
    pub struct_size: usize,
    /// Opaque host state passed back to every callback.
    pub ctx: *const c_void,
    /// A runner notice: UTF-8 `kind` and UTF-8 `message`.
    pub event: unsafe extern "C" fn(ctx: *const c_void, kind: Slice, message: Slice),
    /// A log record.
    pub log: unsafe extern "C" fn(ctx: *const c_void, record: *const LogRecord),
    /// The most verbose `LOG_*` level the host wants; records above it are not sent.
    pub max_level: u32,
    /// 1.1: how much of an exec's output the host holds durably, asked with the
    /// exec's own [`OutputCallback`] (on the thread running the exec, between
    /// chunks): the offset in the exec's combined output below which every byte
    /// is stored, or [`OUTPUT_REFUSED`] when the host has stopped taking this
    /// exec's output (its storage failed). A runner tells its sandbox to drop
    /// output only below this offset. The host may hold back bytes it was given
    /// (a possible start of a secret it must mask), so the answer can lag behind
    /// the chunks passed. Present only if `struct_size` covers it (a 1.0 host:
    /// every byte of a chunk is stored once `chunk` returns).
    pub output_stored: unsafe extern "C" fn(sink: *const OutputCallback) -> u64,
}

/// [`HostCallbacks::output_stored`]'s answer when the host takes no more output
/// of the exec: the runner stops following it, acknowledges nothing more, and
/// returns an error (the sandbox keeps the output for a later engine).
pub const OUTPUT_REFUSED: u64 = u64::MAX;

/// The host's output sink for one exec call; valid for that call only.
#[repr(C)]
#[derive(Debug)]
pub struct OutputCallback {
    /// Opaque host state for this exec.
    pub ctx: *mut c_void,
    /// One chunk: `stream` is a `STREAM_*` constant, `offset` the byte offset of the
    /// chunk in the exec's combined output. Called on the thread running the exec.
    pub chunk: unsafe extern "C" fn(ctx: *mut c_void, stream: u32, offset: u64, bytes: Slice),
}

/// A plugin's runner instance, opaque to the host.
#[repr(C)]
pub struct Instance {
    _private: [u8; 0],
}

/// An operation taking one encoded input and producing one encoded output.
pub type OpFn =
    unsafe extern "C" fn(instance: *const Instance, input: Slice, out: *mut Buffer) -> Status;

/// `exec`: like [`OpFn`] with the host's output sink.
pub type ExecFn = unsafe extern "C" fn(
    instance: *const Instance,
    input: Slice,
    sink: *const OutputCallback,
    out: *mut Buffer,
) -> Status;

/// The table a plugin's entry symbol returns. It is static in the plugin and never
/// freed. Version 1.0 (and 1.1) ends at `reattach`; 1.2 appends `collect`.
#[repr(C)]
#[derive(Debug)]
pub struct RunnerVTable {
    /// The ABI this table implements.
    pub abi_version: AbiVersion,
    /// `size_of::<RunnerVTable>()` in the plugin; at least [`VTABLE_V1_0_SIZE`].
    pub struct_size: usize,
    /// Called once per loaded library before anything else; `host` lives forever.
    pub init: unsafe extern "C" fn(host: *const HostCallbacks) -> Status,
    /// Frees a buffer this plugin allocated.
    pub free_buffer: unsafe extern "C" fn(buffer: Buffer),
    /// Creates an instance from an encoded `RunnerConfig`. On success `*instance` is
    /// set; on failure `out` holds the encoded error.
    pub create: unsafe extern "C" fn(
        config: Slice,
        instance: *mut *const Instance,
        out: *mut Buffer,
    ) -> Status,
    /// Destroys an instance; no call on it may be running or follow.
    pub destroy: unsafe extern "C" fn(instance: *const Instance),
    /// `()` -> `Description`.
    pub describe: OpFn,
    /// `JobRequest` -> `Vec<String>` warnings.
    pub validate: OpFn,
    /// `JobRequest` -> `Handle`.
    pub plan: OpFn,
    /// `Handle` -> `Handle`.
    pub prepare: OpFn,
    /// `Handle` -> `Handle`.
    pub boot: OpFn,
    /// `Handle` -> `Handle`.
    pub connect: OpFn,
    /// `(Handle, StepRequest)` -> `ExecResult`, output through the sink.
    pub exec: ExecFn,
    /// `(Handle, u64 exec id)` -> `()`; called while `exec` runs on another thread.
    pub cancel: OpFn,
    /// `Handle` -> `()`.
    pub drain: OpFn,
    /// `(Handle, bool graceful, u64 deadline_ms)` -> `()`.
    pub poweroff: OpFn,
    /// `Handle` -> `()`.
    pub cleanup: OpFn,
    /// `Handle` -> `Probe`.
    pub probe: OpFn,
    /// `Handle` -> `Handle`.
    pub reattach: OpFn,
    /// 1.2: `(Handle, CollectRequest)` -> `Collection`: copy the job's artifacts
    /// out of the sandbox (called after `drain`, before `poweroff`). Present only
    /// if `struct_size` covers it ([`VTABLE_V1_2_SIZE`]); a plugin whose table
    /// ends before it cannot collect artifacts.
    pub collect: OpFn,
}

/// The size of a version 1.0 [`RunnerVTable`], frozen: `abi_version` (8 bytes), then
/// `struct_size` and 17 function pointers, one word each. The least `struct_size` a
/// 1.x host accepts. A literal layout, not `size_of::<RunnerVTable>()`: appending a
/// 1.1 field must not raise what a host asks of a 1.0 plugin.
pub const VTABLE_V1_0_SIZE: usize = 8 + 18 * core::mem::size_of::<usize>();

/// The size of a version 1.2 [`RunnerVTable`]: the 1.0 layout (which 1.1 kept),
/// then `collect`.
pub const VTABLE_V1_2_SIZE: usize = VTABLE_V1_0_SIZE + core::mem::size_of::<usize>();

/// The size of version 1.0 [`HostCallbacks`], frozen: `struct_size`, `ctx`, `event`
/// and `log`, one word each, then `max_level` (a `u32`) padded to a word. The least
/// `struct_size` a 1.x plugin accepts.
pub const HOST_CALLBACKS_V1_0_SIZE: usize = 5 * core::mem::size_of::<usize>();

/// The size of version 1.1 [`HostCallbacks`]: the 1.0 layout, then `output_stored`.
pub const HOST_CALLBACKS_V1_1_SIZE: usize =
    HOST_CALLBACKS_V1_0_SIZE + core::mem::size_of::<usize>();

/// Whether a struct whose builder reported `struct_size` holds the field that ends
/// `field_end` bytes from the struct's start (its offset plus its size). A field it
/// does not hold was added in a later minor than the builder's; read it as absent.
///
/// ```
/// use core::mem::{offset_of, size_of};
/// use reel_plugin_abi::{OpFn, RunnerVTable, VTABLE_V1_0_SIZE, field_present};
///
/// let end = offset_of!(RunnerVTable, reattach) + size_of::<OpFn>();
/// assert!(field_present(VTABLE_V1_0_SIZE, end));
/// assert!(!field_present(VTABLE_V1_0_SIZE - 1, end));
/// ```
pub const fn field_present(struct_size: usize, field_end: usize) -> bool {
    field_end <= struct_size
}

/// The signature of the entry symbol.
pub type EntryFn = unsafe extern "C" fn() -> *const RunnerVTable;
