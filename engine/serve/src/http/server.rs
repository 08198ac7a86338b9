//! Listeners, connections and the checks every request goes through.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_io::Timer;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt, future};
use hyper::StatusCode;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use smol_hyper::rt::FuturesIo;

use super::io::{Activity, ConnIo, HeadTimer};
use super::request::{self, Via};
use super::response::{self, error};
use super::{Handler, Limits, Response, Token};

/// hyper's smallest read buffer.
const MIN_BUF: usize = 8192;

/// How long a closing connection reads (and drops) what its client still sends,
/// so that its last response is not lost to a reset.
const LINGER: Duration = Duration::from_secs(2);

/// The same for a connection answered `503` because of the cap.
const REJECT_LINGER: Duration = Duration::from_secs(1);

/// The pause after an accept error (such as running out of file descriptors)
/// before the next accept.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The HTTP server: one [`Handler`] behind one or more listeners.
///
/// Every connection is its own smol task (`smol::spawn`), so one slow or
/// malformed client never holds up another. Over TCP every request but those
/// the handler calls public ([`Handler::public`]: `GET /healthz` by default)
/// needs the bearer token; over the unix socket none does.
pub struct Server {
    shared: Arc<Shared>,
}

struct Shared {
    handler: Arc<dyn Handler>,
    token: Option<Token>,
    limits: Limits,
    open: AtomicUsize,
    rejecting: AtomicUsize,
    /// Each open connection holds a clone; [`Server::drain`] takes this one and
    /// waits for the channel to close.
    alive: Mutex<Option<async_channel::Sender<()>>>,
    alive_rx: async_channel::Receiver<()>,
    /// Closed when [`Server::drain`]'s grace is over: every connection ends.
    kill: async_channel::Sender<()>,
    kill_rx: async_channel::Receiver<()>,
}

/// An open connection, counted until it is dropped.
struct Open {
    shared: Arc<Shared>,
    _alive: async_channel::Sender<()>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Rejecting(Arc<Shared>);

impl Drop for Rejecting {
    fn drop(&mut self) {
        self.0.rejecting.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Server {
    /// A server answering with `handler`. With `token` `None`, TCP requests need
    /// no token (a warning says so when a TCP listener starts).
    pub fn new(handler: Arc<dyn Handler>, token: Option<Token>, limits: Limits) -> Server {
        let (alive, alive_rx) = async_channel::bounded(1);
        let (kill, kill_rx) = async_channel::bounded(1);
        Server {
            shared: Arc::new(Shared {
                handler,
                token,
                limits,
                open: AtomicUsize::new(0),
                rejecting: AtomicUsize::new(0),
                alive: Mutex::new(Some(alive)),
                alive_rx,
                kill,
                kill_rx,
            }),
        }
    }

    /// Serves `listener` until `stop` resolves, then stops accepting and asks
    /// each of its open connections to close once its current response is
    /// written (an idle one closes at once), and returns. To wait for them, call
    /// [`drain`](Self::drain) with the grace they get.
    pub async fn serve_tcp(
        &self,
        listener: async_net::TcpListener,
        stop: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let addr = listener.local_addr()?;
        tracing::info!("listening on {addr}");
        if self.shared.token.is_none() {
            tracing::warn!("{addr}: no token was given, so TCP requests need none");
        }
        let accept = || async {
            let (stream, peer) = listener.accept().await?;
            // Streamed responses are many small writes: send each at once.
            let _ = stream.set_nodelay(true);
            Ok((stream, Via::Tcp(peer)))
        };
        self.serve(&addr.to_string(), accept, stop).await
    }

    /// [`serve_tcp`](Self::serve_tcp) for a unix socket ([`bind_unix`](super::bind_unix)).
    pub async fn serve_unix(
        &self,
        listener: async_net::unix::UnixListener,
        stop: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let addr = listener.local_addr()?;
        let name = match addr.as_pathname() {
            Some(p) => p.display().to_string(),
            None => "an unnamed unix socket".to_owned(),
        };
        tracing::info!("listening on {name}");
        let accept = || async {
            let (stream, _) = listener.accept().await?;
            Ok((stream, Via::Unix))
        };
        self.serve(&name, accept, stop).await
    }

    /// Connections open now (those still closing included).
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Waits for every open connection to close, for at most `grace`; then ends
    /// those still open (their clients see the connection drop) and returns how
    /// many that was. Call it once every `serve_*` has returned: the server
    /// takes no connection after it.
    pub async fn drain(&self, grace: Duration) -> usize {
        drop(
            self.shared
                .alive
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        let closed = async {
            let _ = self.shared.alive_rx.recv().await;
            true
        };
        let within = closed
            .or(async {
                Timer::after(grace).await;
                false
            })
            .await;
        if within {
            return 0;
        }
        let ended = self.connections();
        self.shared.kill.close();
        let _ = self.shared.alive_rx.recv().await;
        ended
    }

    async fn serve<S, F>(
        &self,
        name: &str,
        accept: impl Fn() -> F,
        stop: impl Future<Output = ()>,
    ) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Future<Output = io::Result<(S, Via)>>,
    {
        // Never sent on: closed (dropped) when this listener stops.
        let (stopping, stop_rx) = async_channel::bounded::<()>(1);
        let mut stop = pin!(stop);
        loop {
            // `stop` first, so a flood of connections cannot keep it unseen.
            let next = async {
                stop.as_mut().await;
                None
            }
            .or(async { Some(accept().await) })
            .await;
            match next {
                None => break,
                Some(Ok((stream, via))) => self.start(stream, via, stop_rx.clone()),
                Some(Err(e)) => {
                    tracing::warn!("{name}: accepting a connection failed: {e}");
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                    ) {
                        Timer::after(ACCEPT_PAUSE).await;
                    }
                }
            }
        }
        tracing::info!("{name}: no longer accepting connections");
        drop(stopping);
        Ok(())
    }

    fn start<S>(&self, stream: S, via: Via, stop: async_channel::Receiver<()>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = &self.shared;
        let alive = shared
            .alive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(alive) = alive else {
            // Drained: the server is done.
            return;
        };
        if shared.open.fetch_add(1, Ordering::SeqCst) >= shared.limits.max_connections {
            shared.open.fetch_sub(1, Ordering::SeqCst);
            reject(shared.clone(), stream, via);
            return;
        }
        let open = Open {
            shared: shared.clone(),
            _alive: alive,
        };
        smol::spawn(async move {
            let shared = open.shared.clone();
            connection(&shared, stream, via, stop)
                .or(async {
                    let _ = shared.kill_rx.recv().await;
                })
                .await;
            drop(open);
        })
        .detach();
    }
}

/// Answers a connection over the cap with `503` before reading anything, and
/// closes it. As many may be closing at once as connections may be open; past
/// that one is dropped unanswered.
fn reject<S>(shared: Arc<Shared>, mut stream: S, via: Via)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max = shared.limits.max_connections;
    if shared.rejecting.fetch_add(1, Ordering::SeqCst) >= max.max(1) {
        shared.rejecting.fetch_sub(1, Ordering::SeqCst);
        tracing::debug!("{}: over the connection limit ({max}): dropped", name(via));
        return;
    }
    tracing::debug!(
        "{}: over the connection limit ({max}): answered 503",
        name(via)
    );
    let rejecting = Rejecting(shared);
    smol::spawn(async move {
        let _rejecting = rejecting;
        let written = stream
            .write_all(&response::too_many_connections())
            .or(async {
                Timer::after(REJECT_LINGER).await;
                Err(io::ErrorKind::TimedOut.into())
            })
            .await;
        if written.is_ok() {
            linger(stream, REJECT_LINGER).await;
        }
    })
    .detach();
}

/// Serves one connection until it closes, or until `stop` closes and its
/// current response is written.
async fn connection<S>(shared: &Arc<Shared>, stream: S, via: Via, stop: async_channel::Receiver<()>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &shared.limits;
    let activity = Arc::new(Activity::default());
    let io = FuturesIo::new(ConnIo::new(stream, activity.clone(), limits.idle_timeout));
    let mut builder = http1::Builder::new();
    builder
        .timer(HeadTimer::new(
            activity,
            limits.head_timeout,
            limits.idle_timeout,
        ))
        .header_read_timeout(limits.head_timeout)
        .max_buf_size(limits.max_head.max(MIN_BUF))
        .max_header_size(limits.max_head);
    let service = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let answer: Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>> =
                Box::pin(async move { Ok(answer(&shared, via, req).await) });
            answer
        })
    };
    let mut conn = builder.serve_connection(io, service);
    let mut stopping = pin!(stop.recv());
    let mut asked_to_stop = false;
    let served = future::poll_fn(|cx| {
        if !asked_to_stop && stopping.as_mut().poll(cx).is_ready() {
            asked_to_stop = true;
            Pin::new(&mut conn).graceful_shutdown();
        }
        conn.poll_without_shutdown(cx)
    })
    .await;
    if let Err(e) = served {
        if e.is_timeout() {
            tracing::debug!("{}: the request head did not come in time", name(via));
        } else {
            tracing::debug!("{}: connection ended: {e}", name(via));
        }
    }
    let stream = conn.into_parts().io.into_inner().into_inner();
    linger(stream, LINGER).await;
}

/// Closes our side (after what is written), then reads and drops what the
/// client still sends until it closes too, for at most `within`: closing a
/// socket with unread bytes resets the connection, and a reset can destroy the
/// response the client has not read yet (a `413` sent while the body still
/// comes, a `431`, a `400`).
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, within: Duration) {
    let drain = async {
        if stream.close().await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 16 << 10];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    drain
        .or(async {
            Timer::after(within).await;
        })
        .await;
}

/// The checks every request goes through, then the handler.
async fn answer(shared: &Shared, via: Via, mut req: hyper::Request<Incoming>) -> Response {
    let started = Instant::now();
    if let (Via::Tcp(peer), Some(token)) = (via, &shared.token) {
        let open = shared.handler.public(req.method(), req.uri().path());
        let authorized = open
            || req
                .headers()
                .get(AUTHORIZATION)
                .is_some_and(|v| token.matches(v.as_bytes()));
        if !authorized {
            // Nothing of the request: not its path, not a header.
            tracing::info!("unauthorized request from {peer}");
            let mut response = error(StatusCode::UNAUTHORIZED, "unauthorized");
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    // Checked: the handler has no use for it, and cannot log what it lacks.
    req.headers_mut().remove(AUTHORIZATION);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = match request::collect(req, via, &shared.limits).await {
        Err(response) => response,
        Ok(req) => {
            let handled = AssertUnwindSafe(async { shared.handler.handle(req).await })
                .catch_unwind()
                .await;
            handled.unwrap_or_else(|_| {
                tracing::error!("the handler panicked answering {method} {path}");
                error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
            })
        }
    };
    tracing::debug!(
        "{method} {path} {} {} ms",
        response.status().as_u16(),
        started.elapsed().as_millis()
    );
    response
}

fn name(via: Via) -> String {
    match via {
        Via::Tcp(peer) => peer.to_string(),
        Via::Unix => "unix socket".to_owned(),
    }
}
