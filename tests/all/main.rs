//! Workspace integration tests, one module per area.
mod crash;
mod isolation;
mod plugins;
mod run;
