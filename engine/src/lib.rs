//! The reel engine, as a library: the event model, the durable event log, the
//! pure state machine, the job lifecycle (executor, recovery, batches), the
//! plugin loader, and job-file input. It knows no presentation: argument
//! parsing, printing and JSON views live in the front ends (`reel-cli`, later
//! the daemon), which depend on this crate and never the other way round.
//!
//! The rooms, each a module folder:
//!
//! - [`model`] — specs, events, the state machine and the envelope codec (no IO);
//! - [`store`] — the sled log: the writer, readers, reconcile, audit, journal,
//!   output files (the only room that opens sled);
//! - [`lifecycle`] — driving jobs: executor, recovery, batch scheduling, the
//!   observer interface front ends implement;
//! - [`plugin`] — loading runner plugins (the only room with `unsafe`);
//! - [`input`] — job files and secrets;
//! - [`testkit`] — crash points and scripted lifecycles for tests and benches.

pub mod input;
pub mod lifecycle;
pub mod model;
pub mod plugin;
pub mod service;
pub mod store;
pub mod testkit;
pub mod time;
