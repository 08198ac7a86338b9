//! The `reel` command line: argument parsing, printing and JSON views over the
//! `reel-engine` library. Thin by rule: every decision about jobs, the log or
//! recovery is the engine's; this crate turns arguments into engine calls and
//! the engine's answers into text or JSON.
//!
//! A library (beside the `reel` binary) so that tests can check the views.

mod app;
mod client;
mod gc;
mod plugins;
mod print;
mod recover;
mod remote;
mod replay;
mod run;
mod serve;
pub mod views;

pub use app::main;
