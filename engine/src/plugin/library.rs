//! One loaded plugin library: the checks before trusting it, and the raw calls.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use reel_plugin_abi as abi;
use reel_plugin_sdk::{Description, RunnerConfig, RunnerError, codec};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::host;
use super::loaded::LoadedRunner;

// The loader reads a plugin's table through a `&RunnerVTable`, which is sound only
// for the fields every 1.x table has (`struct_size` at least `VTABLE_V1_0_SIZE`):
// today that is the whole table. A field appended in a later minor stops the build
// here, so that it is read only where `abi::field_present(struct_size, its end)`
// holds, through the raw pointer, and no reference to the whole table is made over a
// 1.0 plugin's shorter one.
const _: () = assert!(
    std::mem::size_of::<abi::RunnerVTable>() == abi::VTABLE_V1_0_SIZE,
    "RunnerVTable grew past its 1.0 layout: read the new fields only where \
     abi::field_present says the plugin's struct_size covers them"
);

/// Checks a table's header, before anything else in the table is read: its major,
/// and that its `struct_size` covers every field this host reads. Those are all 1.0
/// fields, so a table of any 1.x minor, older or newer than ours, passes.
fn check_header(version: abi::AbiVersion, struct_size: usize) -> Result<(), String> {
    if version.major != abi::ABI_MAJOR {
        return Err(format!(
            "its vtable is for plugin ABI major {}, but this reel speaks ABI major {}",
            version.major,
            abi::ABI_MAJOR
        ));
    }
    if !abi::field_present(struct_size, abi::VTABLE_V1_0_SIZE) {
        return Err(format!(
            "its vtable is {struct_size} bytes, smaller than the {} bytes of ABI 1.0",
            abi::VTABLE_V1_0_SIZE
        ));
    }
    Ok(())
}

/// A plugin library that passed every check. Leaked: never unloaded.
#[derive(Debug)]
pub(super) struct Library {
    /// Keeps the library mapped; never dropped.
    _library: libloading::Library,
    vtable: &'static abi::RunnerVTable,
    path: PathBuf,
}

/// Reads an optional `u32` data symbol.
fn read_u32_symbol(library: &libloading::Library, name: &[u8]) -> Option<u32> {
    // SAFETY: by the ABI, a symbol with this name is a `u32` static; the pointer is
    // only read while `library` is loaded.
    unsafe {
        let symbol = library.get::<*const u32>(name).ok()?;
        let ptr: *const u32 = *symbol;
        (!ptr.is_null()).then(|| ptr.read())
    }
}

/// The plugin's ABI major: the unversioned symbol, else the highest versioned entry
/// symbol it exports.
fn abi_major(library: &libloading::Library) -> Option<u32> {
    if let Some(major) = read_u32_symbol(library, abi::ABI_MAJOR_SYMBOL) {
        return Some(major);
    }
    (1..=abi::MAX_PROBED_MAJOR).rev().find(|major| {
        let name = format!("reel_runner_entry_v{major}\0");
        // SAFETY: only the symbol's presence is checked; it is not called.
        unsafe { library.get::<*const ()>(name.as_bytes()).is_ok() }
    })
}

fn permission_problem(path: &Path) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) => return Some(format!("cannot read its metadata: {e}")),
    };
    if !meta.is_file() {
        return Some("not a regular file".to_owned());
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o002 != 0 {
        Some(format!(
            "world-writable (mode {mode:04o}); a plugin must be writable only by its owner"
        ))
    } else if mode & 0o020 != 0 {
        Some(format!(
            "group-writable (mode {mode:04o}); a plugin must be writable only by its owner"
        ))
    } else {
        None
    }
}

impl Library {
    /// Checks and loads one file, returning the leaked library and the plugin's
    /// description, or the one-line reason for refusing it.
    pub(super) fn load(path: &Path, dir: &Path) -> Result<(&'static Library, Description), String> {
        if let Some(problem) = permission_problem(path) {
            return Err(problem);
        }
        // SAFETY: loading runs the library's initialisers. The file passed the
        // ownership checks above; the plugin directory is trusted like the engine
        // binary beside it.
        let library = unsafe { libloading::Library::new(path) };
        let library = library.map_err(|e| match std::error::Error::source(&e) {
            Some(cause) => format!("not a loadable shared library: {cause}"),
            None => format!("not a loadable shared library: {e}"),
        })?;
        let Some(major) = abi_major(&library) else {
            return Err(format!(
                "not a reel plugin (no {} symbol)",
                String::from_utf8_lossy(&abi::ENTRY_SYMBOL[..abi::ENTRY_SYMBOL.len() - 1])
            ));
        };
        if major != abi::ABI_MAJOR {
            return Err(format!(
                "built for plugin ABI major {major}, but this reel speaks ABI major {}",
                abi::ABI_MAJOR
            ));
        }
        // SAFETY: by the ABI, the entry symbol of major 1 has type `EntryFn`.
        let entry: abi::EntryFn = unsafe { library.get::<abi::EntryFn>(abi::ENTRY_SYMBOL) }
            .map(|symbol| *symbol)
            .map_err(|_| {
                "not a reel plugin (reel_runner_abi_major says 1 but there is no \
                 reel_runner_entry_v1 symbol)"
                    .to_owned()
            })?;
        // SAFETY: `entry` is the plugin's ABI 1 entry point, which takes no arguments
        // and returns a pointer to a static table or null.
        let vtable = unsafe { entry() };
        if vtable.is_null() {
            return Err("its entry point returned no vtable".to_owned());
        }
        // SAFETY: non-null, and by the ABI it points to a static `RunnerVTable` that
        // starts with `abi_version` and `struct_size`. Only those two fields are read
        // until `struct_size` is checked.
        let (version, size) = unsafe { ((*vtable).abi_version, (*vtable).struct_size) };
        check_header(version, size)?;
        // SAFETY: the table is static in the library, which is never unloaded, and
        // covers the 1.0 layout, which is all of `RunnerVTable` (asserted at compile
        // time above).
        let vtable: &'static abi::RunnerVTable = unsafe { &*vtable };
        let library: &'static Library = Box::leak(Box::new(Library {
            _library: library,
            vtable,
            path: path.to_path_buf(),
        }));
        // SAFETY: `init` is called once per library, before any other function, with
        // callbacks that live for the rest of the process.
        let status = unsafe { (vtable.init)(host::callbacks(path)) };
        if status != abi::STATUS_OK {
            return Err("its init function failed".to_owned());
        }
        let runner = library
            .create(String::new(), &super::describe_config(dir))
            .map_err(|e| format!("cannot create a runner to describe it: {e}"))?;
        let description = runner
            .call_describe()
            .map_err(|e| format!("describe failed: {e}"))?;
        drop(runner);
        if description.name.is_empty() {
            return Err("it describes itself with an empty name".to_owned());
        }
        host::name_plugin(path, &description.name);
        Ok((library, description))
    }

    pub(super) fn abi_version(&self) -> abi::AbiVersion {
        self.vtable.abi_version
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn vtable(&self) -> &'static abi::RunnerVTable {
        self.vtable
    }

    /// Creates a runner instance.
    pub(super) fn create(
        &'static self,
        name: String,
        config: &RunnerConfig,
    ) -> Result<LoadedRunner, RunnerError> {
        let input = codec::encode(config)?;
        let mut instance: *const abi::Instance = std::ptr::null();
        let mut out = abi::Buffer::EMPTY;
        // SAFETY: `input` outlives the call; `instance` and `out` are valid for writes.
        let status = unsafe { (self.vtable.create)(slice(&input), &mut instance, &mut out) };
        let bytes = self.take(out);
        if status != abi::STATUS_OK || instance.is_null() {
            return Err(self.error(&bytes));
        }
        Ok(LoadedRunner::new(name, self, instance))
    }

    /// Copies a result buffer and gives it back to the plugin's allocator.
    pub(super) fn take(&self, out: abi::Buffer) -> Vec<u8> {
        let bytes = if out.ptr.is_null() || out.len == 0 {
            Vec::new()
        } else {
            // SAFETY: a non-null buffer from the plugin holds `len` initialised bytes
            // until it is freed below.
            unsafe { std::slice::from_raw_parts(out.ptr, out.len) }.to_vec()
        };
        // SAFETY: the buffer came from this plugin and is freed exactly once.
        unsafe { (self.vtable.free_buffer)(out) };
        bytes
    }

    /// The error a failed call encoded, or a stand-in when it encoded none.
    pub(super) fn error(&self, bytes: &[u8]) -> RunnerError {
        codec::decode::<RunnerError>(bytes).unwrap_or_else(|_| {
            RunnerError::failed(format!(
                "the plugin at {} failed without a readable error",
                self.path.display()
            ))
        })
    }

    /// Runs one [`abi::OpFn`] with an encoded input and decodes its result.
    ///
    /// # Safety
    /// `instance` must be a live instance created by this library.
    pub(super) unsafe fn call<I: Serialize + ?Sized, O: DeserializeOwned>(
        &self,
        op: abi::OpFn,
        instance: *const abi::Instance,
        input: &I,
    ) -> Result<O, RunnerError> {
        let input = codec::encode(input)?;
        let mut out = abi::Buffer::EMPTY;
        // SAFETY: the caller guarantees `instance` is live; `input` outlives the call
        // and `out` is valid for a write.
        let status = unsafe { op(instance, slice(&input), &mut out) };
        self.finish(status, out)
    }

    /// Decodes the result of a call.
    pub(super) fn finish<O: DeserializeOwned>(
        &self,
        status: abi::Status,
        out: abi::Buffer,
    ) -> Result<O, RunnerError> {
        let bytes = self.take(out);
        if status == abi::STATUS_OK {
            codec::decode(&bytes)
        } else {
            Err(self.error(&bytes))
        }
    }
}

/// Borrows bytes as an ABI slice for one call.
pub(super) fn slice(bytes: &[u8]) -> abi::Slice {
    abi::Slice {
        ptr: bytes.as_ptr(),
        len: bytes.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32) -> abi::AbiVersion {
        abi::AbiVersion { major, minor }
    }

    #[test]
    fn a_table_is_accepted_from_the_frozen_1_0_size_on() {
        let word = std::mem::size_of::<usize>();
        // A 1.0 plugin: abi_version, struct_size and 17 functions.
        assert_eq!(check_header(v(1, 0), 8 + 18 * word), Ok(()));
        // A plugin of a newer minor, with fields this host does not know.
        assert_eq!(check_header(v(1, 1), abi::VTABLE_V1_0_SIZE + word), Ok(()));
        let short = abi::VTABLE_V1_0_SIZE - word;
        assert_eq!(
            check_header(v(1, 0), short),
            Err(format!(
                "its vtable is {short} bytes, smaller than the {} bytes of ABI 1.0",
                abi::VTABLE_V1_0_SIZE
            ))
        );
        assert_eq!(
            check_header(v(2, 0), abi::VTABLE_V1_0_SIZE),
            Err("its vtable is for plugin ABI major 2, but this reel speaks ABI major 1".into())
        );
    }
}
