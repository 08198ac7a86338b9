//! Driving jobs through their lifecycle: the [`executor`] (setup, steps,
//! teardown, and the collection of artifacts between drain and poweroff),
//! [`recover`] (taking over a dead engine's jobs), and [`batch`]
//! (running many jobs N at a time, cancel before start, collecting outcomes).
//! Front ends watch through the [`observer`] interface.

mod artifacts;
pub mod batch;
pub mod executor;
pub mod observer;
pub mod recover;
mod setup;
mod steps;
mod teardown;
