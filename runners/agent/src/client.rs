//! Blocking client for the agent protocol, used by runner plugins.
//!
//! # Threads and cancellation
//!
//! The agent serves one host connection at a time (a new connection replaces the old
//! one), so cancellation does not open a second connection. Instead the client's write
//! half is shared: [`AgentClient::cancel_handle`] returns a [`CancelHandle`] holding a
//! `try_clone` of the same socket behind the same write lock, so another thread can send
//! `Cancel` while [`AgentClient::run_exec`] is blocked reading output. Frames never
//! interleave because every write takes the lock.
//!
//! # Following an exec
//!
//! [`AgentClient::follow`] is the one loop that reads an exec's output to its end;
//! [`run_exec`] and [`resume_exec`] send `ExecStart` or `Resume` and then follow. It
//! checks offsets: a gap is an error, and bytes sent again (below what was already
//! passed on) are dropped, so the callback sees every byte exactly once, in order. With
//! [`AgentClient::set_merge`], output frames of one stream that are already waiting are
//! merged into one callback (a caller that makes each callback durable stores fewer,
//! larger chunks). Output is acknowledged only after the callback that took it
//! returned.
//!
//! # Resuming
//!
//! After a reconnect, call [`AgentClient::resume_exec`] with the offset up to which the
//! output was stored; the agent resends from there, continues live and finishes with the
//! `ExecExit` (also when the step ended while nobody was connected).
//!
//! # Errors
//!
//! The agent's errors are [`ClientError::Agent`] with an [`ErrorCode`] to decide on
//! (from protocol version 2; a version-1 agent's errors have
//! [`ErrorCode::Unspecified`]) and a message for people.
//!
//! [`run_exec`]: AgentClient::run_exec
//! [`resume_exec`]: AgentClient::resume_exec

use std::collections::VecDeque;
use std::io;
use std::ops::ControlFlow;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::proto::{
    self, ErrorCode, FrameReader, KIND_ERROR, KIND_FAILURE, KIND_HELLO, MAX_VERSION, MIN_VERSION,
    Message, ProtoError, Resync, Role, Stream,
};

/// Errors from [`AgentClient`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect to the agent's socket before the deadline.
    #[error("Could not connect to the agent at {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Last connection error.
        source: io::Error,
    },
    /// Framing or I/O failed.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The agent answered with an error (`Error` or `Failure`).
    #[error("The agent reported an error{}: {message}", exec_id.map(|e| format!(" for exec {e}")).unwrap_or_default())]
    Agent {
        /// The exec the error concerns, if any.
        exec_id: Option<u64>,
        /// What went wrong, to decide on; [`ErrorCode::Unspecified`] from a version-1
        /// agent.
        code: ErrorCode,
        /// The agent's message, for people.
        message: String,
    },
    /// The agent sent something the protocol does not allow here.
    #[error("Protocol violation by the agent: {0}")]
    Protocol(String),
    /// No answer arrived in time.
    #[error("Timed out waiting for the agent to answer {0}.")]
    Timeout(&'static str),
    /// The agent speaks a protocol version without the messages asked for.
    #[error("The agent speaks protocol version {version}; {what} needs version {needs}.")]
    Unsupported {
        /// What was asked for.
        what: &'static str,
        /// The version it needs.
        needs: u16,
        /// The version agreed on.
        version: u16,
    },
    /// The caller of a follow stopped taking output (its storage failed); output
    /// from `acked` on was not acknowledged and stays in the agent.
    #[error("The host stopped taking the output of exec {exec_id} at offset {acked}.")]
    Stopped {
        /// The exec.
        exec_id: u64,
        /// Where acknowledged output ends.
        acked: u64,
    },
}

/// Result alias for the client.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// What to run; the fields of `ExecStart`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// Host-chosen id, unique within the agent's lifetime.
    pub exec_id: u64,
    /// Program and arguments, typically `["sh", "-c", cmd]`.
    pub argv: Vec<String>,
    /// The step's complete environment.
    pub env: Vec<(String, String)>,
    /// Working directory, relative to the agent's workdir; `None` is the workdir.
    pub cwd: Option<String>,
    /// Timeout in milliseconds; 0 means none.
    pub timeout_ms: u64,
}

/// How an exec ended (the fields of `ExecExit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecOutcome {
    /// The exec.
    pub exec_id: u64,
    /// Exit code if the step exited normally.
    pub code: Option<i32>,
    /// Signal number if the step was killed by a signal.
    pub signal: Option<i32>,
    /// Whether the agent killed the step for exceeding its timeout.
    pub timed_out: bool,
    /// Total bytes of combined output the step produced.
    pub total_bytes: u64,
}

/// Sends `Cancel` from another thread over the client's own connection.
#[derive(Debug, Clone)]
pub struct CancelHandle {
    writer: Arc<Mutex<UnixStream>>,
}

impl CancelHandle {
    /// Asks the agent to stop `exec_id` with the INT → TERM → KILL ladder.
    pub fn cancel(&self, exec_id: u64, grace: Duration) -> Result<()> {
        send_locked(
            &self.writer,
            &Message::Cancel {
                exec_id,
                grace_ms: millis(grace),
            },
        )
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn send_locked(writer: &Mutex<UnixStream>, msg: &Message) -> Result<()> {
    let mut guard = writer.lock().unwrap_or_else(|p| p.into_inner());
    proto::write_message(&mut *guard, msg)?;
    Ok(())
}

/// A blocking connection to an agent.
#[derive(Debug)]
pub struct AgentClient {
    reader: UnixStream,
    writer: Arc<Mutex<UnixStream>>,
    frames: FrameReader,
    pending: VecDeque<Message>,
    version: u16,
    /// Acknowledge delivered output after this many bytes (see [`Self::set_ack_every`]).
    ack_every: u64,
    /// Merge waiting output frames up to this many bytes (see [`Self::set_merge`]).
    merge_bytes: usize,
    /// How long to wait for more output to merge.
    merge_wait: Duration,
}

/// The largest payload [`AgentClient::connect_serial`] takes for a candidate of the
/// agent's answer to `Hello` (a `Hello`, or an error with a message for people).
const MAX_HANDSHAKE_PAYLOAD: usize = 64 * 1024;

/// Connects to the unix socket at `path`, retrying every 20 ms until `deadline`.
fn connect_until(path: &Path, deadline: Instant) -> Result<UnixStream> {
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(ClientError::Connect {
                    path: path.display().to_string(),
                    source,
                });
            }
        }
    }
}

/// A message other than the one waited for.
fn unexpected(want: &str, got: &Message) -> ClientError {
    ClientError::Protocol(format!(
        "expected {want} from the agent, got {}",
        got.name()
    ))
}

/// The error an agent's `Error` or `Failure` message carries, if `msg` is one.
fn agent_error(msg: &Message) -> Option<ClientError> {
    msg.as_error()
        .map(|(exec_id, code, message)| ClientError::Agent {
            exec_id,
            code,
            message: message.to_owned(),
        })
}

impl AgentClient {
    /// Connects to the agent's socket, retrying until `timeout`, and performs `Hello`.
    pub fn connect(socket_path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        Self::connect_with_versions(socket_path, timeout, MIN_VERSION, MAX_VERSION)
    }

    /// Like [`Self::connect`] but offering a specific version range (mostly for tests).
    pub fn connect_with_versions(
        socket_path: impl AsRef<Path>,
        timeout: Duration,
        min_version: u16,
        max_version: u16,
    ) -> Result<Self> {
        let path = socket_path.as_ref();
        let deadline = Instant::now() + timeout;
        let mut client = Self::from_stream(connect_until(path, deadline)?)?;
        client.send(&Message::Hello {
            min_version,
            max_version,
            role: Role::Host,
        })?;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match client.read_raw(Some(left))? {
            Some(Message::Hello {
                min_version: v,
                max_version: v2,
                role: Role::Agent,
            }) if v == v2 && v >= min_version && v <= max_version => {
                client.version = v;
                Ok(client)
            }
            Some(other) => Err(agent_error(&other).unwrap_or_else(|| {
                ClientError::Protocol(format!(
                    "expected Hello from the agent, got {}",
                    other.name()
                ))
            })),
            None => Err(ClientError::Timeout("Hello")),
        }
    }

    /// Connects to an agent on a VM's virtio-serial port through QEMU's chardev
    /// socket at `socket_path` (`-chardev socket,server=on`), retrying until
    /// `timeout`, and performs `Hello`, skipping whatever came before the agent's
    /// answer.
    ///
    /// The port is one byte stream for the VM's whole life, so the agent's answer may
    /// be preceded by the rest of a frame its writer had begun for a host that is
    /// gone: bytes are skipped until a valid agent `Hello` (or an `Error`/`Failure`
    /// about no exec: the agent refused this `Hello`) is found by
    /// [`proto::resync`]; valid frames of other kinds before it are stale too and
    /// skipped. The chardev takes one client at a time: while an earlier client is
    /// still connected, this one waits in the socket's backlog, its `Hello` unread,
    /// until that client goes or `timeout` passes ([`ClientError::Timeout`]). Once
    /// connected, the client is the same as [`Self::connect`]'s.
    pub fn connect_serial(socket_path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        let path = socket_path.as_ref();
        let deadline = Instant::now() + timeout;
        let mut client = Self::from_stream(connect_until(path, deadline)?)?;
        client.send(&Message::Hello {
            min_version: MIN_VERSION,
            max_version: MAX_VERSION,
            role: Role::Host,
        })?;
        let mut buf = Vec::new();
        loop {
            loop {
                match proto::resync(
                    &buf,
                    &[KIND_HELLO, KIND_ERROR, KIND_FAILURE],
                    MAX_HANDSHAKE_PAYLOAD,
                ) {
                    Resync::Frame { skip, len, msg } => {
                        let rest = buf.split_off(skip + len);
                        match msg {
                            Message::Hello {
                                min_version: v,
                                max_version: v2,
                                role: Role::Agent,
                            } if v == v2 && (MIN_VERSION..=MAX_VERSION).contains(&v) => {
                                client.version = v;
                                client.frames = FrameReader::with_buffered(rest);
                                return Ok(client);
                            }
                            m => {
                                if let Some(e @ ClientError::Agent { exec_id: None, .. }) =
                                    agent_error(&m)
                                {
                                    return Err(e);
                                }
                                buf = rest;
                            }
                        }
                    }
                    Resync::NeedMore { skip } => {
                        buf.drain(..skip);
                        break;
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout("Hello"));
            }
            client
                .reader
                .set_read_timeout(Some(left))
                .map_err(ProtoError::Io)?;
            if !proto::read_some(&mut client.reader, &mut buf)? {
                return Err(ClientError::Timeout("Hello"));
            }
        }
    }

    fn from_stream(stream: UnixStream) -> Result<Self> {
        let writer = stream.try_clone().map_err(ProtoError::Io)?;
        Ok(AgentClient {
            reader: stream,
            writer: Arc::new(Mutex::new(writer)),
            frames: FrameReader::new(),
            pending: VecDeque::new(),
            version: 0,
            ack_every: 256 * 1024,
            merge_bytes: 0,
            merge_wait: Duration::ZERO,
        })
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// How many delivered bytes [`Self::follow`] lets pass before sending `Ack`
    /// (it also acknowledges at the end). 0 disables automatic acknowledgements.
    pub fn set_ack_every(&mut self, bytes: u64) {
        self.ack_every = bytes;
    }

    /// Lets [`Self::follow`] merge output frames of one stream that arrive within
    /// `wait` of each other into one callback of up to `max_bytes` (it may pass the
    /// bound by one frame). 0 bytes, the default, passes on each frame as it arrives.
    pub fn set_merge(&mut self, max_bytes: usize, wait: Duration) {
        self.merge_bytes = max_bytes;
        self.merge_wait = wait;
    }

    /// A handle another thread can use to send `Cancel` on this connection.
    pub fn cancel_handle(&self) -> CancelHandle {
        CancelHandle {
            writer: Arc::clone(&self.writer),
        }
    }

    /// Sends any message.
    pub fn send(&mut self, msg: &Message) -> Result<()> {
        send_locked(&self.writer, msg)
    }

    fn read_raw(&mut self, timeout: Option<Duration>) -> Result<Option<Message>> {
        if let Some(m) = self.frames.try_decode()? {
            return self.checked(m).map(Some);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    Some(left)
                }
                None => None,
            };
            self.reader.set_read_timeout(wait).map_err(ProtoError::Io)?;
            if let Some(m) = self.frames.read_message(&mut self.reader)? {
                return self.checked(m).map(Some);
            }
        }
    }

    /// Refuses a message whose kind the negotiated version does not have (before
    /// `Hello` completes, `version` is 0 and the handshake checks what arrives).
    fn checked(&self, m: Message) -> Result<Message> {
        if self.version != 0 && m.since_version() > self.version {
            return Err(ClientError::Protocol(format!(
                "the agent sent {}, which protocol version {} does not have",
                m.name(),
                self.version
            )));
        }
        Ok(m)
    }

    /// Receives the next message, waiting at most `timeout` (`None`: forever).
    /// Returns `Ok(None)` on timeout.
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Option<Message>> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(Some(m));
        }
        self.read_raw(timeout)
    }

    /// Waits for a message `want` accepts; others are queued for [`Self::recv`].
    /// An error without an exec id fails the wait.
    fn wait_for(
        &mut self,
        what: &'static str,
        timeout: Duration,
        want: impl Fn(&Message) -> bool,
    ) -> Result<Message> {
        if let Some(i) = self.pending.iter().position(&want)
            && let Some(m) = self.pending.remove(i)
        {
            return Ok(m);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_raw(Some(left))? {
                None => return Err(ClientError::Timeout(what)),
                Some(m) if want(&m) => return Ok(m),
                Some(m) => match agent_error(&m) {
                    Some(e @ ClientError::Agent { exec_id: None, .. }) => return Err(e),
                    _ => self.pending.push_back(m),
                },
            }
        }
    }

    /// Binds the connection to a job. A reconnect must present the same token.
    pub fn init(&mut self, job_id: &str, session_token: &str) -> Result<()> {
        self.send(&Message::Init {
            job_id: job_id.to_owned(),
            session_token: session_token.to_owned(),
        })?;
        self.wait_for("Init", Duration::from_secs(30), |m| {
            matches!(m, Message::Initialized { .. })
        })?;
        Ok(())
    }

    /// Sends `ExecStart` without waiting; follow with [`Self::recv`].
    pub fn exec_start(&mut self, req: &ExecRequest) -> Result<()> {
        self.send(&Message::ExecStart {
            exec_id: req.exec_id,
            argv: req.argv.clone(),
            env: req.env.clone(),
            cwd: req.cwd.clone(),
            timeout_ms: req.timeout_ms,
        })
    }

    /// Sends `Resume` without waiting.
    pub fn resume(&mut self, exec_id: u64, from_offset: u64) -> Result<()> {
        self.send(&Message::Resume {
            exec_id,
            from_offset,
        })
    }

    /// Tells the agent output below `offset` is durably stored.
    pub fn ack(&mut self, exec_id: u64, offset: u64) -> Result<()> {
        self.send(&Message::Ack { exec_id, offset })
    }

    /// Sends `Cancel` (see also [`Self::cancel_handle`]).
    pub fn cancel(&mut self, exec_id: u64, grace: Duration) -> Result<()> {
        self.send(&Message::Cancel {
            exec_id,
            grace_ms: millis(grace),
        })
    }

    /// Round-trips a `Ping`.
    pub fn ping(&mut self, timeout: Duration) -> Result<()> {
        self.send(&Message::Ping {})?;
        self.wait_for("Ping", timeout, |m| matches!(m, Message::Pong {}))?;
        Ok(())
    }

    /// Waits until the agent has sent all buffered output of this connection's execs.
    /// Output arriving meanwhile is queued for [`Self::recv`].
    pub fn drain(&mut self, timeout: Duration) -> Result<()> {
        self.send(&Message::Drain {})?;
        self.wait_for("Drain", timeout, |m| matches!(m, Message::Drained {}))?;
        Ok(())
    }

    /// Asks the agent to kill its steps and exit; returns once it acknowledged.
    pub fn poweroff(&mut self, timeout: Duration) -> Result<()> {
        self.send(&Message::Poweroff {})?;
        self.wait_for("Poweroff", timeout, |m| {
            matches!(m, Message::PoweringOff {})
        })?;
        Ok(())
    }

    fn need_files(&self, what: &'static str) -> Result<()> {
        if self.version < proto::FILES_VERSION {
            return Err(ClientError::Unsupported {
                what,
                needs: proto::FILES_VERSION,
                version: self.version,
            });
        }
        Ok(())
    }

    /// The regular files below the agent's workdir that `patterns` match (see
    /// [`crate::glob`]), `(path, size)` in name order, every page of the agent's
    /// answer. A refused pattern is [`ClientError::Agent`] with
    /// [`ErrorCode::BadPattern`]. Protocol version 3 on.
    pub fn list_files(
        &mut self,
        patterns: &[String],
        timeout: Duration,
    ) -> Result<Vec<(String, u64)>> {
        self.need_files("listing files")?;
        let mut all: Vec<(String, u64)> = Vec::new();
        loop {
            let after = all.last().map(|(p, _)| p.clone());
            self.send(&Message::ListFiles {
                patterns: patterns.to_vec(),
                after: after.clone(),
            })?;
            let (files, more) = match self.wait_for("ListFiles", timeout, |m| {
                matches!(m, Message::FileList { .. })
            })? {
                Message::FileList { files, more } => (files, more),
                other => return Err(unexpected("FileList", &other)),
            };
            if let (Some(a), Some((first, _))) = (&after, files.first())
                && first <= a
            {
                return Err(ClientError::Protocol(format!(
                    "the agent listed {first:?} after {a:?}: not in name order"
                )));
            }
            let empty = files.is_empty();
            all.extend(files);
            if !more || empty {
                return Ok(all);
            }
        }
    }

    /// Up to `len` bytes (the agent sends at most [`proto::MAX_FILE_CHUNK`]) of the
    /// file at `path` below the agent's workdir, from `offset`, and whether they
    /// reach its end. A path the agent refuses (not a regular file reached
    /// without a symbolic link) is [`ClientError::Agent`] with
    /// [`ErrorCode::FileRefused`]. Protocol version 3 on.
    pub fn read_file(
        &mut self,
        path: &str,
        offset: u64,
        len: u32,
        timeout: Duration,
    ) -> Result<(Vec<u8>, bool)> {
        self.need_files("reading files")?;
        self.send(&Message::ReadFile {
            path: path.to_owned(),
            offset,
            len,
        })?;
        let (bytes, eof) = match self.wait_for(
            "ReadFile",
            timeout,
            |m| matches!(m, Message::FileChunk { offset: o, .. } if *o == offset),
        )? {
            Message::FileChunk { bytes, eof, .. } => (bytes, eof),
            other => return Err(unexpected("FileChunk", &other)),
        };
        if bytes.len() > len as usize {
            return Err(ClientError::Protocol(format!(
                "the agent sent {} bytes of {path:?} for a read of {len}",
                bytes.len()
            )));
        }
        Ok((bytes, eof))
    }

    /// Starts `req` and follows it to its end (see [`Self::follow`]).
    pub fn run_exec(
        &mut self,
        req: &ExecRequest,
        on_output: impl FnMut(Stream, u64, &[u8]),
    ) -> Result<ExecOutcome> {
        self.exec_start(req)?;
        self.follow(req.exec_id, 0, on_output)
    }

    /// Resumes following `exec_id` from `from_offset` (typically after a reconnect),
    /// then as [`Self::run_exec`].
    pub fn resume_exec(
        &mut self,
        exec_id: u64,
        from_offset: u64,
        on_output: impl FnMut(Stream, u64, &[u8]),
    ) -> Result<ExecOutcome> {
        self.resume(exec_id, from_offset)?;
        self.follow(exec_id, from_offset, on_output)
    }

    /// Follows `exec_id`, whose `ExecStart` or `Resume` was sent, from `from_offset` to
    /// its `ExecExit`, passing its output to `on_output` as `(stream, offset, bytes)`.
    ///
    /// Every byte from `from_offset` on reaches `on_output` exactly once and in order:
    /// output past the next expected offset is an error (bytes are missing; what
    /// arrived before the gap is passed on first), output below it (sent again) is
    /// dropped. Frames are merged as [`Self::set_merge`] allows: a merged chunk is
    /// passed on when it reaches the bound, when the next message is anything but more
    /// output of the same stream, or when nothing arrives for the merge wait. Output is
    /// acknowledged once `on_output` returned (so `on_output` must only return once the
    /// bytes are stored), every [`Self::set_ack_every`] bytes and at the end; the last
    /// acknowledgement is best effort, since the exit is known by then.
    ///
    /// An error from the agent about this exec, or about none, ends the follow with
    /// [`ClientError::Agent`] (after the output before it was passed on). Messages
    /// about other execs are kept, in order, for later [`Self::recv`] calls.
    pub fn follow(
        &mut self,
        exec_id: u64,
        from_offset: u64,
        mut on_output: impl FnMut(Stream, u64, &[u8]),
    ) -> Result<ExecOutcome> {
        self.follow_stored(exec_id, from_offset, |stream, offset, bytes| {
            on_output(stream, offset, bytes);
            ControlFlow::Continue(offset + bytes.len() as u64)
        })
    }

    /// [`Self::follow`] for a caller that may store less than it was given (it holds
    /// bytes back) or stop: `on_output` returns `Continue(end)`, the offset below
    /// which the caller holds the output durably, and only output below it is ever
    /// acknowledged (also at the exec's exit: what the caller did not hold then stays
    /// in the agent for a later resume); `Break` ends the follow with
    /// [`ClientError::Stopped`], acknowledging nothing more.
    pub fn follow_stored(
        &mut self,
        exec_id: u64,
        from_offset: u64,
        mut on_output: impl FnMut(Stream, u64, &[u8]) -> ControlFlow<(), u64>,
    ) -> Result<ExecOutcome> {
        let mut f = Following {
            exec_id,
            next: from_offset,
            acked: from_offset,
            stored: from_offset,
            merged: None,
            deferred: VecDeque::new(),
        };
        let result = self.follow_to_exit(&mut f, &mut on_output);
        // Keep messages for other execs for later `recv` calls, in order.
        f.deferred.extend(self.pending.drain(..));
        self.pending = f.deferred;
        result
    }

    fn follow_to_exit(
        &mut self,
        f: &mut Following,
        on_output: &mut impl FnMut(Stream, u64, &[u8]) -> ControlFlow<(), u64>,
    ) -> Result<ExecOutcome> {
        let exec_id = f.exec_id;
        loop {
            let wait = f.merged.as_ref().map(|_| self.merge_wait);
            let Some(msg) = self.recv(wait)? else {
                self.deliver(f, on_output)?;
                continue;
            };
            let merges = matches!(&msg, Message::Output { exec_id: id, stream, .. }
            if *id == exec_id
                && f.merged.as_ref().is_some_and(|(s, _, b)| {
                    s == stream && b.len() < self.merge_bytes
                }));
            if !merges {
                self.deliver(f, on_output)?;
            }
            match msg {
                Message::Output {
                    exec_id: id,
                    stream,
                    offset,
                    bytes,
                } if id == exec_id => {
                    let next = f.next;
                    if offset > next {
                        // What arrived before the gap is whole: pass it on first.
                        self.deliver(f, on_output)?;
                        return Err(ClientError::Protocol(format!(
                            "output of exec {exec_id} arrived at offset {offset}, expected \
                             {next}: bytes {next}..{offset} are missing"
                        )));
                    }
                    let end = offset + bytes.len() as u64;
                    if end > next {
                        let fresh = &bytes[(next - offset) as usize..];
                        match &mut f.merged {
                            Some((_, _, buf)) => buf.extend_from_slice(fresh),
                            None => f.merged = Some((stream, next, fresh.to_vec())),
                        }
                        f.next = end;
                    }
                    if f.merged
                        .as_ref()
                        .is_some_and(|(_, _, b)| b.len() >= self.merge_bytes)
                    {
                        self.deliver(f, on_output)?;
                    }
                }
                Message::ExecExit {
                    exec_id: id,
                    code,
                    signal,
                    timed_out,
                    total_bytes,
                } if id == exec_id => {
                    if total_bytes != f.next {
                        return Err(ClientError::Protocol(format!(
                            "exec {exec_id} ended with {total_bytes} bytes of output but {} \
                             were received",
                            f.next
                        )));
                    }
                    // Only what the caller holds: bytes it held back stay in the
                    // agent, to be sent again if its engine dies before storing them.
                    if self.ack_every > 0 && f.stored > f.acked {
                        let _ = self.ack(exec_id, f.stored);
                    }
                    return Ok(ExecOutcome {
                        exec_id,
                        code,
                        signal,
                        timed_out,
                        total_bytes,
                    });
                }
                Message::ExecStarted { exec_id: id, .. } if id == exec_id => {}
                other => match agent_error(&other) {
                    Some(e @ ClientError::Agent { exec_id: id, .. })
                        if id.is_none_or(|id| id == exec_id) =>
                    {
                        return Err(e);
                    }
                    _ => f.deferred.push_back(other),
                },
            }
        }
    }

    /// Passes merged output on, then acknowledges it if [`Self::set_ack_every`] bytes
    /// were passed on since the last acknowledgement.
    fn deliver(
        &mut self,
        f: &mut Following,
        on_output: &mut impl FnMut(Stream, u64, &[u8]) -> ControlFlow<(), u64>,
    ) -> Result<()> {
        let Some((stream, offset, bytes)) = f.merged.take() else {
            return Ok(());
        };
        let delivered = offset + bytes.len() as u64;
        match on_output(stream, offset, &bytes) {
            ControlFlow::Continue(stored) => f.stored = f.stored.max(stored.min(delivered)),
            ControlFlow::Break(()) => {
                return Err(ClientError::Stopped {
                    exec_id: f.exec_id,
                    acked: f.acked,
                });
            }
        }
        if self.ack_every > 0 && f.stored - f.acked >= self.ack_every {
            self.ack(f.exec_id, f.stored)?;
            f.acked = f.stored;
        }
        Ok(())
    }
}

/// Where [`AgentClient::follow`] is in one exec's output.
struct Following {
    exec_id: u64,
    /// The next offset expected: everything below it was received.
    next: u64,
    /// Everything below it was acknowledged.
    acked: u64,
    /// Everything below it is held durably by the caller: the most that may be
    /// acknowledged.
    stored: u64,
    /// Received output not yet passed on: `(stream, offset, bytes)`, ending at `next`.
    merged: Option<(Stream, u64, Vec<u8>)>,
    /// Messages about other execs, for later `recv` calls.
    deferred: VecDeque<Message>,
}
