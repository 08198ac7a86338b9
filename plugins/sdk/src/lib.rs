//! The SDK for reel runner plugins.
//!
//! A plugin is a `cdylib` crate with one type implementing [`Runner`] and one line:
//!
//! ```text
//! reel_plugin_sdk::export_runner!(MyRunner);
//! ```
//!
//! The macro exports the C ABI of [`reel_plugin_abi`] and generates all of its unsafe
//! glue: every call is decoded, run inside `catch_unwind` (a panic becomes a
//! [`RunnerError`] of kind [`ErrorKind::Panicked`] carrying the panic message), and
//! its result encoded for the host. Plugins must be built with `panic = "unwind"`
//! (the default); the macro refuses to compile under `panic = "abort"`.
//!
//! The plugin's `tracing` events are forwarded to the engine's log once the engine
//! loads it (see [`host`]), and [`host::notice`] sends runner notices.
//!
//! [`conformance`] is a test kit a plugin runs against itself from a `#[test]`.
//!
//! See `plugins/README.md` for the author's guide.

pub mod artifacts;
pub mod codec;
pub mod conformance;
#[doc(hidden)]
pub mod glue;
pub mod host;
pub mod types;

pub use reel_plugin_abi as abi;
pub use types::*;

/// Exports `$runner` (a type implementing [`Runner`]) as this cdylib's reel plugin.
///
/// Use it once per crate, at the crate root.
#[macro_export]
macro_rules! export_runner {
    ($runner:ty) => {
        #[cfg(panic = "abort")]
        compile_error!(
            "reel plugins must be built with panic = \"unwind\": the glue turns panics into \
             errors, and with panic = \"abort\" a panic would kill the engine"
        );

        const _: () = assert!(
            $crate::abi::ABI_MAJOR == 1,
            "export_runner! names its entry symbol for ABI major 1"
        );

        /// The ABI major of this plugin, readable without knowing the entry symbol.
        #[unsafe(no_mangle)]
        #[allow(non_upper_case_globals)]
        pub static reel_runner_abi_major: u32 = $crate::abi::ABI_MAJOR;

        /// The plugin's entry point: its static vtable.
        #[unsafe(no_mangle)]
        pub extern "C" fn reel_runner_entry_v1() -> *const $crate::abi::RunnerVTable {
            $crate::glue::vtable::<$runner>()
        }
    };
}
