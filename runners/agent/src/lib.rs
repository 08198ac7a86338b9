//! The reel agent: the protocol, a blocking client for runner plugins, and the agent
//! side (used by the `reel-agent` binary).
//!
//! See [`proto`] for the frame layout and the conversation, [`client::AgentClient`] for
//! the host side and [`server`] for the agent side, which [`serial`] serves over a
//! virtio-serial port inside a VM. [`glob`] matches artifact patterns and opens the
//! files they find without leaving the workdir. [`procfs`] reads `/proc` and
//! signals processes found there without hitting a reused pid; the process runner
//! uses it too.

pub mod client;
pub mod glob;
pub mod procfs;
pub mod proto;
pub mod serial;
pub mod server;

pub use client::{AgentClient, CancelHandle, ClientError, ExecOutcome, ExecRequest};
pub use proto::{Message, ProtoError, Role, Stream};
