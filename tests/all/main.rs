//! Workspace integration tests, one module per area.
mod plugins;
mod run;
