//! What users hand the engine: job files ([`jobfile`]) and secrets
//! ([`secrets`]: where values come from, and masking them in output).

pub mod jobfile;
mod prescan;
pub mod secrets;
