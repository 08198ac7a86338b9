//! The plugin loader: finds runner plugins (`*.so` cdylibs built with
//! `reel-plugin-sdk`), checks them, and hands out [`LoadedRunner`]s.
//!
//! Architecture invariant: nothing but `reel-plugin-abi` types crosses the plugin
//! boundary, and this module and the SDK glue are the only places with `unsafe` for it.
//!
//! The directory is refused as a whole (one refusal naming it, nothing loaded) when
//! it is group- or world-writable, or one of its ancestors is without the sticky
//! bit: others could then put a library of their own there, whatever the modes of
//! the files.
//!
//! Loading a file, in order (the first failure is the one-line refusal reason):
//! 1. it must be a regular file that is neither group- nor world-writable;
//! 2. if it is an ELF64 little-endian file, it must hold every byte its headers
//!    describe: the program headers, each `PT_LOAD` segment's `p_offset +
//!    p_filesz` (which `dlopen` maps: a file cut short would kill the engine with
//!    SIGBUS, not fail) and the section header table ("truncated: N bytes,
//!    segments need M");
//! 3. `dlopen` must succeed;
//! 4. its ABI major (the `reel_runner_abi_major` symbol, or else the highest
//!    `reel_runner_entry_v{N}` it exports) must equal [`abi::ABI_MAJOR`];
//! 5. its vtable must be at least as large as a 1.0 table (a field appended in a
//!    later minor, such as 1.2's `collect`, is read only where its `struct_size`
//!    covers it);
//! 6. an instance created with [`describe_config`] must `describe` itself, and no
//!    other loaded plugin may have the same name.
//!
//! Libraries are never unloaded: runner instances, host callbacks and `tracing`
//! state inside them may outlive any owner we could name.

mod host;
mod library;
mod loaded;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use loaded::LoadedRunner;
pub use reel_plugin_abi as abi;
pub use reel_plugin_sdk::{
    Capability, CollectRequest, Collected, Collection, Description, ErrorKind, ExecResult, Handle,
    JobRequest, Network, OutputSink, Probe, Resources, Runner, RunnerConfig, RunnerError,
    StepRequest, Stored, Stream,
};

pub use host::{capture_notices, set_notice_hook};
use library::Library;

/// What the engine knows about one loaded plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginInfo {
    /// The runner's name, as jobs select it.
    pub name: String,
    /// The runner's own version.
    pub version: String,
    /// The ABI major the plugin was built against (always [`abi::ABI_MAJOR`]).
    pub abi_major: u32,
    /// The ABI minor the plugin was built against.
    pub abi_minor: u32,
    /// The runner's capabilities.
    pub capabilities: Vec<String>,
    /// The file it was loaded from.
    pub path: PathBuf,
}

impl PluginInfo {
    /// Whether the plugin declares `capability` (as described by the throwaway
    /// instance the loader made; an engine's own instance may say more, see
    /// [`LoadedRunner::has`]).
    pub fn has(&self, capability: Capability) -> bool {
        Capability::declared(&self.capabilities, capability)
    }
}

/// A file in the plugin directory that was not loaded, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The file.
    pub path: PathBuf,
    /// One line saying why.
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// Errors creating a runner from a loaded plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// No loaded plugin has this name.
    #[error("no runner plugin named `{name}` is loaded")]
    NotLoaded {
        /// The name asked for.
        name: String,
    },
    /// The plugin's `new` returned an error.
    #[error("runner plugin `{name}` could not create a runner")]
    Create {
        /// The plugin's name.
        name: String,
        /// The plugin's error.
        #[source]
        source: RunnerError,
    },
}

/// The plugins of one directory: those that loaded and those that were refused.
#[derive(Debug)]
pub struct PluginSet {
    dir: PathBuf,
    loaded: Vec<(PluginInfo, &'static Library)>,
    refused: Vec<Refusal>,
}

/// The directory plugins are loaded from when none is given: the one holding the
/// running executable. Cargo puts workspace cdylibs beside the `reel` binary.
pub fn default_plugin_dir() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The configuration of the throwaway instance the loader creates to call
/// `describe`. The contract says `new` has no side effects.
pub fn describe_config(dir: &Path) -> RunnerConfig {
    RunnerConfig {
        sandbox_root: std::env::temp_dir(),
        plugin_dir: dir.to_path_buf(),
        options: BTreeMap::new(),
    }
}

/// Loads every `*.so` file in `dir`, in name order. A directory that cannot be read,
/// or that others may write to (see the module doc), gives an empty set with one
/// refusal naming the directory.
pub fn load_dir(dir: &Path) -> PluginSet {
    let mut set = PluginSet {
        dir: dir.to_path_buf(),
        loaded: Vec::new(),
        refused: Vec::new(),
    };
    if let Some(reason) = library::directory_problem(dir) {
        tracing::warn!(path = %dir.display(), %reason, "plugin directory refused");
        set.refused.push(Refusal {
            path: dir.to_path_buf(),
            reason,
        });
        return set;
    }
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "so"))
            .collect(),
        Err(e) => {
            set.refused.push(Refusal {
                path: dir.to_path_buf(),
                reason: format!("cannot read the plugin directory: {e}"),
            });
            return set;
        }
    };
    files.sort();
    for path in files {
        match Library::load(&path, dir) {
            Ok((library, description)) => {
                if let Some((other, _)) = set
                    .loaded
                    .iter()
                    .find(|(info, _)| info.name == description.name)
                {
                    set.refused.push(Refusal {
                        reason: format!(
                            "a plugin named `{}` is already loaded from {}",
                            description.name,
                            other.path.display()
                        ),
                        path,
                    });
                    continue;
                }
                tracing::debug!(plugin = %description.name, path = %path.display(), "runner plugin loaded");
                set.loaded.push((
                    PluginInfo {
                        name: description.name,
                        version: description.version,
                        abi_major: library.abi_version().major,
                        abi_minor: library.abi_version().minor,
                        capabilities: description.capabilities,
                        path,
                    },
                    library,
                ));
            }
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "runner plugin refused");
                set.refused.push(Refusal { path, reason });
            }
        }
    }
    set
}

impl PluginSet {
    /// The directory this set was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The loaded plugins, in file name order.
    pub fn plugins(&self) -> impl Iterator<Item = &PluginInfo> {
        self.loaded.iter().map(|(info, _)| info)
    }

    /// The plugin named `name`, if loaded.
    pub fn get(&self, name: &str) -> Option<&PluginInfo> {
        self.plugins().find(|p| p.name == name)
    }

    /// The refused files, in file name order.
    pub fn refusals(&self) -> &[Refusal] {
        &self.refused
    }

    /// Creates a runner instance of plugin `name`. Calls the plugin's `new` on this
    /// thread; call it from the blocking pool if the plugin may be slow.
    pub fn instantiate(
        &self,
        name: &str,
        config: &RunnerConfig,
    ) -> Result<Arc<LoadedRunner>, PluginError> {
        let (info, library) = self
            .loaded
            .iter()
            .find(|(info, _)| info.name == name)
            .ok_or_else(|| PluginError::NotLoaded {
                name: name.to_owned(),
            })?;
        library
            .create(info.name.clone(), config)
            .map(Arc::new)
            .map_err(|source| PluginError::Create {
                name: info.name.clone(),
                source,
            })
    }
}
