//! The process runner.
