//! What hyper reads from and writes to, and the timer it keeps the head
//! deadline with: the two places a connection's time limits live.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_io::Timer;
use futures_lite::{AsyncRead, AsyncWrite, Future};
use hyper::rt::Sleep;

/// Bytes a connection has read, shared by its IO and its timer.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    bytes_read: AtomicU64,
}

impl Activity {
    fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
}

/// A connection's stream as hyper sees it (through `smol_hyper::rt::FuturesIo`):
/// counts what it reads, and fails a write the client has not let through for
/// `stall_limit` (a client that stops reading a response).
pub(crate) struct ConnIo<T> {
    inner: T,
    activity: Arc<Activity>,
    stall_limit: Duration,
    stalled: Option<Timer>,
}

impl<T> ConnIo<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>, stall_limit: Duration) -> Self {
        ConnIo {
            inner,
            activity,
            stall_limit,
            stalled: None,
        }
    }

    pub(crate) fn into_inner(self) -> T {
        self.inner
    }

    fn watch<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.stall_limit;
        let timer = self.stalled.get_or_insert_with(|| Timer::after(limit));
        if Pin::new(timer).poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading its response",
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.activity
                .bytes_read
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_close(cx);
        this.watch(cx, r)
    }
}

/// The timer of one connection's hyper `http1` server.
///
/// hyper's server uses its timer for one thing only, the header read timeout,
/// and it starts that timer as soon as it waits for a head — for a kept-alive
/// connection, as soon as the previous response is written — so with hyper's
/// own meaning a connection could idle no longer than a head may take. This
/// timer gives hyper's one deadline the two meanings of [`Limits`](super::Limits):
/// the first head of a connection must be whole within `head` of its start; a
/// later one may be awaited for `idle`, and must then be whole within `head` of
/// its first byte. The deadline it was asked for is not used (hyper asks for
/// `now + header_read_timeout`, which is `now + head`).
///
/// Its first byte is seen as the connection's read count moving since the timer
/// was armed: hyper polls the timer after every read that leaves the head
/// incomplete, so the moment is the read's, give or take one poll. (A pipelined
/// client whose next partial head was already buffered is given `idle` rather
/// than `head` to finish it.)
pub(crate) struct HeadTimer {
    activity: Arc<Activity>,
    head: Duration,
    idle: Duration,
    armed_before: AtomicBool,
}

impl HeadTimer {
    pub(crate) fn new(activity: Arc<Activity>, head: Duration, idle: Duration) -> Self {
        HeadTimer {
            activity,
            head,
            idle,
            armed_before: AtomicBool::new(false),
        }
    }

    fn head_sleep(&self) -> HeadSleep {
        let now = Instant::now();
        let first = !self.armed_before.swap(true, Ordering::Relaxed);
        let deadline = now + if first { self.head } else { self.idle };
        HeadSleep {
            activity: self.activity.clone(),
            head: self.head,
            fixed: first,
            bytes_at_arm: self.activity.bytes_read(),
            deadline,
            timer: Timer::at(deadline),
        }
    }
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        Box::pin(PlainSleep(Timer::after(duration)))
    }

    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(self.head_sleep())
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, _new_deadline: Instant) {
        *sleep = Box::pin(self.head_sleep());
    }
}

/// The wait for one request head.
struct HeadSleep {
    activity: Arc<Activity>,
    head: Duration,
    /// The deadline is the head's: the connection's first head (fixed from its
    /// start), or a later one whose first byte has come.
    fixed: bool,
    bytes_at_arm: u64,
    deadline: Instant,
    timer: Timer,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if !this.fixed && this.activity.bytes_read() != this.bytes_at_arm {
            // The head's first byte came: from now on it is a head, not idleness.
            this.fixed = true;
            this.deadline = Instant::now() + this.head;
            this.timer.set_at(this.deadline);
        }
        Pin::new(&mut this.timer).poll(cx).map(|_| ())
    }
}

impl Sleep for HeadSleep {}

struct PlainSleep(Timer);

impl Future for PlainSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

impl Sleep for PlainSleep {}
