//! Driving jobs through their lifecycle: the [`executor`] (setup, steps,
//! teardown, and the collection of artifacts between drain and poweroff),
//! [`recover`] (taking over a dead engine's jobs), [`batch`]
//! (running many jobs N at a time, cancel before start, collecting outcomes),
//! and [`sched`] (the daemon's fair resource scheduler: which waiting job starts
//! next, out of a memory/vCPU/disk budget; pure).
//! Front ends watch through the [`observer`] interface.

mod artifacts;
pub mod batch;
pub mod executor;
pub mod observer;
pub mod recover;
pub mod sched;
mod setup;
mod steps;
mod teardown;
