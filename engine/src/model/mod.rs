//! The event model: what a job is ([`spec`]), what happens to it ([`event`]),
//! how its history folds into a state ([`state`]) and how stored values are
//! framed ([`codec`]). Nothing here does IO.

pub mod codec;
pub mod event;
pub mod spec;
pub mod state;
