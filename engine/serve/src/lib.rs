//! `reel serve`, the daemon: its HTTP layer ([`http`]), and later its service core
//! and API routes (`docs/api.md`).

pub mod http;
