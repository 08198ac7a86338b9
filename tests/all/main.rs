//! Workspace integration tests, one module per area.
mod crash;
mod plugins;
mod run;
