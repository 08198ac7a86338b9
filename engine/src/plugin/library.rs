//! One loaded plugin library: the checks before trusting it, and the raw calls.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use reel_plugin_abi as abi;
use reel_plugin_sdk::{Description, RunnerConfig, RunnerError, codec};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::host;
use super::loaded::LoadedRunner;

/// A plugin's table as this host reads it: every 1.0 field, copied one by one
/// through the raw pointer (never through a reference to the whole
/// [`abi::RunnerVTable`], which a plugin of an older minor does not have all
/// of), and each field appended since where the plugin's `struct_size` covers
/// it, else `None`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Table {
    pub abi_version: abi::AbiVersion,
    pub init: unsafe extern "C" fn(host: *const abi::HostCallbacks) -> abi::Status,
    pub free_buffer: unsafe extern "C" fn(buffer: abi::Buffer),
    pub create: unsafe extern "C" fn(
        config: abi::Slice,
        instance: *mut *const abi::Instance,
        out: *mut abi::Buffer,
    ) -> abi::Status,
    pub destroy: unsafe extern "C" fn(instance: *const abi::Instance),
    pub describe: abi::OpFn,
    pub validate: abi::OpFn,
    pub plan: abi::OpFn,
    pub prepare: abi::OpFn,
    pub boot: abi::OpFn,
    pub connect: abi::OpFn,
    pub exec: abi::ExecFn,
    pub cancel: abi::OpFn,
    pub drain: abi::OpFn,
    pub poweroff: abi::OpFn,
    pub cleanup: abi::OpFn,
    pub probe: abi::OpFn,
    pub reattach: abi::OpFn,
    /// ABI 1.2; `None` for a plugin of an older minor.
    pub collect: Option<abi::OpFn>,
}

impl Table {
    /// Copies the fields of the table at `vtable`, whose header says
    /// `struct_size` (checked by [`check_header`]).
    ///
    /// # Safety
    /// `vtable` must point to a live table of at least `struct_size` bytes, with
    /// `struct_size` at least [`abi::VTABLE_V1_0_SIZE`].
    unsafe fn read(vtable: *const abi::RunnerVTable, struct_size: usize) -> Table {
        use std::ptr::addr_of;
        let end = std::mem::offset_of!(abi::RunnerVTable, collect) + std::mem::size_of::<usize>();
        // SAFETY: every field read here is a 1.0 field, which a table of
        // `struct_size` >= the 1.0 size holds (caller contract); each is read
        // alone through the raw pointer, so no reference to the whole table is
        // made. `collect` is read only where `struct_size` covers it.
        unsafe {
            Table {
                abi_version: addr_of!((*vtable).abi_version).read(),
                init: addr_of!((*vtable).init).read(),
                free_buffer: addr_of!((*vtable).free_buffer).read(),
                create: addr_of!((*vtable).create).read(),
                destroy: addr_of!((*vtable).destroy).read(),
                describe: addr_of!((*vtable).describe).read(),
                validate: addr_of!((*vtable).validate).read(),
                plan: addr_of!((*vtable).plan).read(),
                prepare: addr_of!((*vtable).prepare).read(),
                boot: addr_of!((*vtable).boot).read(),
                connect: addr_of!((*vtable).connect).read(),
                exec: addr_of!((*vtable).exec).read(),
                cancel: addr_of!((*vtable).cancel).read(),
                drain: addr_of!((*vtable).drain).read(),
                poweroff: addr_of!((*vtable).poweroff).read(),
                cleanup: addr_of!((*vtable).cleanup).read(),
                probe: addr_of!((*vtable).probe).read(),
                reattach: addr_of!((*vtable).reattach).read(),
                collect: abi::field_present(struct_size, end)
                    .then(|| addr_of!((*vtable).collect).read()),
            }
        }
    }
}

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
    vtable: Table,
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

/// The parts of an ELF64 little-endian file `dlopen` maps, read from its headers
/// alone (never the whole file).
///
/// `dlopen` maps each `PT_LOAD` segment's `p_offset .. p_offset + p_filesz` from
/// the file; where a file is shorter than that (a partial copy, a full disk), the
/// first touch of a page past its end kills the process with SIGBUS — no error
/// comes back. So the loader reads the headers first, and refuses a file that does
/// not hold every byte they describe:
///
/// ```text
///  ELF header (64 bytes)            program header (56 bytes, e_phnum of them at e_phoff)
///  0  e_ident: 7f 'E' 'L' 'F',      0  p_type u32 (1 = PT_LOAD)
///     [4] class (2 = 64-bit),       8  p_offset u64
///     [5] data (1 = little-endian) 32  p_filesz u64
/// 32  e_phoff u64                   section header table: e_shnum entries of
/// 40  e_shoff u64                   e_shentsize bytes at e_shoff (not mapped, but
/// 54  e_phentsize u16               a copy cut short loses it first)
/// 56  e_phnum u16
/// 58  e_shentsize u16
/// 60  e_shnum u16
/// ```
///
/// A file that is not ELF64 little-endian, or whose program header entries are
/// not 56 bytes, is left to `dlopen`, which reads (not maps) the header and
/// refuses it with its own message before mapping anything.
mod elf {
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    const MAGIC: &[u8; 4] = b"\x7fELF";
    const CLASS_64: u8 = 2;
    const DATA_LITTLE_ENDIAN: u8 = 1;
    const HEADER_SIZE: u64 = 64;
    const PROGRAM_HEADER_SIZE: u64 = 56;
    const PT_LOAD: u32 = 1;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(v)
    }

    /// Reads as much of `buf` as the file has at `offset`; returns the count.
    fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// `Err(one line)` when the file's headers describe more bytes than it has.
    pub(super) fn check_length(file: &File) -> Result<(), String> {
        let len = file
            .metadata()
            .map_err(|e| format!("cannot read its metadata: {e}"))?
            .len();
        let read_error = |e: std::io::Error| format!("cannot read its ELF headers: {e}");
        let mut header = [0u8; HEADER_SIZE as usize];
        let got = read_at(file, &mut header, 0).map_err(read_error)?;
        if got < MAGIC.len() || &header[..MAGIC.len()] != MAGIC {
            return Ok(());
        }
        if got > 5 && (header[4] != CLASS_64 || header[5] != DATA_LITTLE_ENDIAN) {
            return Ok(());
        }
        if got < HEADER_SIZE as usize {
            return Err(format!(
                "truncated: {len} bytes, the ELF header needs {HEADER_SIZE}"
            ));
        }
        let phoff = u64_at(&header, 32);
        let shoff = u64_at(&header, 40);
        let phentsize = u64::from(u16_at(&header, 54));
        let phnum = u64::from(u16_at(&header, 56));
        let shentsize = u64::from(u16_at(&header, 58));
        let shnum = u64::from(u16_at(&header, 60));
        if phentsize != PROGRAM_HEADER_SIZE {
            return Ok(());
        }

        let table_end = phoff.saturating_add(phnum * PROGRAM_HEADER_SIZE);
        if table_end > len {
            return Err(format!(
                "truncated: {len} bytes, its program headers need {table_end}"
            ));
        }
        // At most 65535 entries of 56 bytes (3.5 MiB), and all inside the file.
        let mut table = vec![0u8; (phnum * PROGRAM_HEADER_SIZE) as usize];
        if read_at(file, &mut table, phoff).map_err(read_error)? < table.len() {
            return Err(format!(
                "truncated while being read: its program headers need {table_end} bytes"
            ));
        }
        let segments_end = table
            .chunks_exact(PROGRAM_HEADER_SIZE as usize)
            .filter(|ph| u32_at(ph, 0) == PT_LOAD)
            .map(|ph| u64_at(ph, 8).saturating_add(u64_at(ph, 32)))
            .max()
            .unwrap_or(0);
        if segments_end > len {
            return Err(format!(
                "truncated: {len} bytes, segments need {segments_end}"
            ));
        }

        // The section header table is not mapped, but it usually ends the file,
        // so a copy cut short anywhere loses it. With e_shnum 0 and e_shoff set,
        // the count is in the first entry: that entry at least must be there.
        if shoff != 0 {
            let sections_end = shoff.saturating_add(shnum.max(1).saturating_mul(shentsize));
            if sections_end > len {
                return Err(format!(
                    "truncated: {len} bytes, its section headers need {sections_end}"
                ));
            }
        }
        Ok(())
    }
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

/// Why a plugin directory cannot be trusted, if it cannot: anyone who may write to
/// it could add a plugin of their own (the sticky bit does not stop that), and
/// anyone who may write to one of its ancestors without the sticky bit could
/// rename the directory away and put another in its place. The file checks mean
/// nothing without these.
pub(super) fn directory_problem(dir: &Path) -> Option<String> {
    let real = std::fs::canonicalize(dir).ok()?;
    let meta = std::fs::metadata(&real).ok()?;
    let mode = meta.permissions().mode() & 0o7777;
    if let Some(who) = writable_by_others(mode) {
        return Some(format!(
            "the plugin directory is {who} (mode {mode:04o}); it must be writable only by \
             its owner, or others could add a plugin to it"
        ));
    }
    for ancestor in real.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o1000 != 0 {
            continue;
        }
        if let Some(who) = writable_by_others(mode) {
            return Some(format!(
                "its parent directory {} is {who} without the sticky bit (mode {mode:04o}), \
                 so others could replace the plugin directory",
                ancestor.display()
            ));
        }
    }
    None
}

fn writable_by_others(mode: u32) -> Option<&'static str> {
    if mode & 0o002 != 0 {
        Some("world-writable")
    } else if mode & 0o020 != 0 {
        Some("group-writable")
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
        let file = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
        elf::check_length(&file)?;
        drop(file);
        // SAFETY: loading runs the library's initialisers. The file passed the
        // ownership checks above, and holds every byte its program headers say
        // `dlopen` maps (a shorter file would SIGBUS the engine); the plugin
        // directory is writable by its owner only (checked by `load_dir`), so only
        // its owner can change the file between the check and the load, and it is
        // trusted like the engine binary beside it.
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
        // its `struct_size` covers the 1.0 layout (checked just above).
        let vtable = unsafe { Table::read(vtable, size) };
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

    pub(super) fn vtable(&self) -> &Table {
        &self.vtable
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

    /// `check_length` of the first `len` bytes of `whole`.
    fn check_cut(whole: &[u8], len: usize) -> Result<(), String> {
        let file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut &file, &whole[..len]).unwrap();
        elf::check_length(&file)
    }

    #[test]
    fn an_elf_file_cut_anywhere_is_refused_from_its_headers() {
        // This test binary is an ELF64 little-endian file with the usual layout:
        // headers, segments, then the section header table at the end.
        let whole = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(check_cut(&whole, whole.len()), Ok(()));
        assert_eq!(
            check_cut(&whole, 20),
            Err("truncated: 20 bytes, the ELF header needs 64".to_owned())
        );
        let phnum = u16::from_le_bytes([whole[56], whole[57]]);
        assert!(phnum > 1, "{phnum} program headers");
        assert_eq!(
            check_cut(&whole, 100),
            Err(format!(
                "truncated: 100 bytes, its program headers need {}",
                64 + 56 * u64::from(phnum)
            ))
        );
        for len in [4096, 100_000] {
            let reason = check_cut(&whole, len).unwrap_err();
            let need: usize = reason
                .strip_prefix(&format!("truncated: {len} bytes, segments need "))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{reason:?}"));
            assert!(need > len && need <= whole.len(), "{reason:?}");
        }
        let reason = check_cut(&whole, whole.len() - 1).unwrap_err();
        assert_eq!(
            reason,
            format!(
                "truncated: {} bytes, its section headers need {}",
                whole.len() - 1,
                whole.len()
            )
        );
    }

    #[test]
    fn what_is_not_elf64_little_endian_is_left_to_dlopen() {
        assert_eq!(check_cut(b"not an ELF file\n", 16), Ok(()));
        assert_eq!(check_cut(b"", 0), Ok(()));
        // An ELF32 header, and a big-endian ELF64 one: dlopen reads and refuses them.
        let mut elf32 = vec![0u8; 52];
        elf32[..6].copy_from_slice(b"\x7fELF\x01\x01");
        assert_eq!(check_cut(&elf32, 52), Ok(()));
        let mut big = vec![0u8; 64];
        big[..6].copy_from_slice(b"\x7fELF\x02\x02");
        assert_eq!(check_cut(&big, 64), Ok(()));
    }

    #[test]
    fn a_segment_past_the_end_of_a_small_file_is_refused() {
        // A hand-made ELF64 LE header with one PT_LOAD of 0x2000 bytes at 0x1000,
        // in a file of 0x1800 bytes, and no section headers.
        let mut file = vec![0u8; 0x1800];
        file[..6].copy_from_slice(b"\x7fELF\x02\x01");
        file[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        file[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        file[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        file[64..68].copy_from_slice(&1u32.to_le_bytes()); // p_type = PT_LOAD
        file[72..80].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
        file[96..104].copy_from_slice(&0x2000u64.to_le_bytes()); // p_filesz
        assert_eq!(
            check_cut(&file, file.len()),
            Err("truncated: 6144 bytes, segments need 12288".to_owned())
        );
        // A huge offset does not overflow.
        file[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            check_cut(&file, file.len()),
            Err(format!("truncated: 6144 bytes, segments need {}", u64::MAX))
        );
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
