//! The daemon's HTTP plumbing: hyper 1 (HTTP/1.1 server) on smol.
//!
//! The API routes plug in as one [`Handler`]. This module owns everything that
//! is the same for every route: the listeners (TCP and unix socket), one smol
//! task per connection, the connection cap, the bearer token on TCP, the limits
//! on a request's head, body and timing, collecting the body, and the response
//! helpers ([`json`], [`error`], [`bytes`], [`text`], [`stream`]).
//!
//! A slow or hostile client holds only its own connection: it must send its
//! request head within [`Limits::head_timeout`], its body may not pause for
//! longer than [`Limits::idle_timeout`], and a response it stops reading is
//! given up after the same time.

mod io;
mod request;
mod response;
mod server;
mod token;
mod unix;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use request::{Request, Via, percent_decode, segments};
pub use response::{bytes, error, json, stream, text};
pub use server::Server;
pub use token::Token;
pub use unix::bind_unix;

/// A response body: whole ([`json`], [`bytes`], ...) or streamed ([`stream`]).
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>;

/// What a [`Handler`] answers.
pub type Response = hyper::Response<Body>;

/// The API: one value that answers every request that got past the HTTP layer
/// (authenticated, head and body within the limits).
pub trait Handler: Send + Sync + 'static {
    /// Whether a TCP request for `path` is answered without the bearer token
    /// (it then reaches [`Handler::handle`] like any other): `GET /healthz`
    /// unless the handler says otherwise.
    fn public(&self, method: &hyper::Method, path: &str) -> bool {
        *method == hyper::Method::GET && path == "/healthz"
    }

    /// Answers one request. The future runs on the connection's own task; a
    /// panic in it is caught and answered `500 {"error": "internal error"}`.
    fn handle(&self, req: Request) -> Pin<Box<dyn Future<Output = Response> + Send + 'static>>;
}

/// What one client may cost.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, in bytes: past it `413`.
    pub max_body: usize,
    /// Largest request head (request line and headers), in bytes: past it `431`
    /// and the connection is closed. hyper's read buffer is at least 8 KiB, so a
    /// smaller value is checked on a complete head only.
    pub max_head: usize,
    /// Time for a request head to arrive: from the connection's start for its
    /// first request, from the first byte of the head for a later one. Past it
    /// the connection is closed without an answer.
    pub head_timeout: Duration,
    /// Open connections at once; one more is answered `503` and closed.
    pub max_connections: usize,
    /// How long a kept-alive connection may wait for its next request, a
    /// request body may pause, and a response may wait for its reader.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 4 << 20,
            max_head: 64 << 10,
            head_timeout: Duration::from_secs(10),
            max_connections: 256,
            idle_timeout: Duration::from_secs(60),
        }
    }
}
