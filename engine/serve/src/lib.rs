//! `reel serve`, the daemon: its HTTP layer ([`http`]), the API routes of
//! `docs/api.md` ([`api`]), `/metrics` ([`metrics`]), the web view ([`web`]) and the daemon's life
//! ([`daemon`]: token, recovery, listeners, signals, drain). A front end: every
//! rule about jobs is the engine's (`reel_engine::service`).

pub mod api;
mod artifacts;
pub mod daemon;
pub mod http;
pub mod metrics;
pub mod web;
