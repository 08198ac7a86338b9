//! The reel engine library: the event model, the durable event log, the pure state
//! machine, the plugin loader and (later) the executor. The `reel` binary in
//! `main.rs` is a thin command-line layer over this crate.

pub mod codec;
pub mod crashpoint;
pub mod event;
pub mod executor;
pub mod jobfile;
pub mod journal;
pub mod log;
pub mod outstore;
pub mod plugin;
pub mod recover;
pub mod secrets;
pub mod simulate;
pub mod spec;
pub mod state;
pub mod time;
