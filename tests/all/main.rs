//! Workspace integration tests, one module per area.
mod crash;
mod gc;
mod isolation;
mod limits;
mod plugins;
mod run;
mod serve;
mod store;
mod vm;
mod web;
