//! The agent side: serves one host connection at a time and runs steps.
//!
//! A host connection is a *session* on a `Link`: a unix socket connection
//! ([`serve`], the process runner) or one session on a VM's virtio-serial port
//! ([`serve_serial`], see [`crate::serial`]). The protocol is handled once, by
//! `session` and the writer, for both; they differ only in how a session begins and
//! ends. A unix connection begins with its own `Hello` and ends when it closes. The
//! serial port is one stream for the VM's life: a session begins with the first valid
//! `Hello` found in it (garbage before it skipped), ends at end of file (the host
//! went away), at a bad frame or at the next host's `Hello`, and the agent then waits
//! for the next host instead of exiting. Either way the end of a session is the same:
//! execs keep running and their unacknowledged output stays for a `Resume`.
//!
//! Threads (all plain std threads):
//! - the accept loop; each accepted connection gets a thread that performs the `Hello`
//!   handshake and only then *replaces* the current connection (so a stray or broken
//!   connection never kicks out the real host), and then reads that connection's messages
//!   (on a serial port, one thread reads every session in turn);
//! - one writer thread per active connection, which sends queued replies, live and
//!   resumed `Output`, `ExecExit` and `Drained`, waiting on a condition variable;
//! - per exec: a stdout reader, a stderr reader, a waiter (reaps the process, joins the
//!   readers, records the exit), and optionally a timeout watcher; a ladder thread per
//!   cancel.
//!
//! Signals reach only processes still known to be the job's. An exec's process group
//! id is its leader's pid. While the leader is unreaped (running, or a zombie the
//! waiter has not collected), that pid cannot be given to another process, so the
//! group is signalled as a whole; the waiter marks the group unpinned, under the lock
//! that every such signal is sent under, before it reaps. After that the id may be
//! reused by anyone, so only processes still in the group **and** in the agent's
//! session are signalled, each pinned first ([`crate::procfs::signal_if`]): a process
//! group lies in one session, and the agent leads a session of its own, which only
//! its steps' processes share.
//!
//! Output goes into a per-exec buffer keyed by offset, independent of any connection;
//! the writer only reads from it. The buffer holds up to `max_buffer`
//! unacknowledged bytes; past that the agent stops reading the step's pipes, so a
//! step that prints faster than the host stores it is slowed down (it blocks in
//! `write`), never losing output. A host that is gone (a crashed engine) leaves
//! the step blocked until a new host resumes and acknowledges. The "output lost"
//! error remains as a guard should the bound ever be passed.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{
    Pid, Signal, WaitId, WaitIdOptions, kill_process_group, test_kill_process_group, waitid,
};

use crate::glob;
use crate::procfs::{self, Stat};
use crate::proto::{
    self, ErrorCode, FrameReader, MAX_OUTPUT_CHUNK, MAX_VERSION, MIN_VERSION, Message, ProtoError,
    Role, Stream,
};

/// How long a new connection may take to send its `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of frames the writer batches per lock acquisition.
const WRITE_BATCH: usize = 1 << 20;

/// Agent configuration.
#[derive(Debug, Clone)]
pub struct Options {
    /// Socket path (already bound by the caller; kept for cleanup at poweroff);
    /// `None` on a virtio-serial port, which is not the agent's to remove.
    pub socket: Option<PathBuf>,
    /// Pidfile, removed at poweroff.
    pub pidfile: Option<PathBuf>,
    /// Base directory for steps' working directories.
    pub workdir: PathBuf,
    /// Maximum unacknowledged output bytes buffered per exec.
    pub max_buffer: u64,
    /// Grace period between the signals of the ladder when a timeout fires.
    pub timeout_grace: Duration,
}

struct Chunk {
    stream: Stream,
    offset: u64,
    data: Vec<u8>,
}

struct ExitInfo {
    code: Option<i32>,
    signal: Option<i32>,
}

/// An exec's process group, as it can be recognised once its id may be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Group {
    /// The group id: the leader's pid.
    pgid: i32,
    /// The agent's session, in which the group was made.
    session: i32,
}

impl Group {
    /// Whether a live process is in this group: its group id is the exec's and its
    /// session the agent's. A group of that id in another session (an unrelated
    /// process that got the leader's pid and called `setsid`) is someone else's.
    fn has(&self, stat: &Stat) -> bool {
        stat.live() && stat.pgrp == self.pgid && stat.session == self.session
    }
}

/// The live processes of the host in any of `groups` (one scan of `/proc`, skipped
/// when no process has any of their group ids: asking for that harms no one).
fn members(groups: &[Group]) -> Vec<i32> {
    let exists =
        |g: &Group| Pid::from_raw(g.pgid).is_some_and(|p| test_kill_process_group(p).is_ok());
    if !groups.iter().any(exists) {
        return Vec::new();
    }
    procfs::all_pids()
        .into_iter()
        .filter(|&pid| procfs::stat(pid).is_some_and(|s| groups.iter().any(|g| g.has(&s))))
        .collect()
}

struct Exec {
    pgid: Pid,
    group: Group,
    /// True until the waiter is about to reap the leader: while true, `pgid` is
    /// still the exec's own group and may be signalled as a whole (under the lock).
    pinned: bool,
    chunks: VecDeque<Chunk>,
    acked: u64,
    total: u64,
    lost: bool,
    timed_out: bool,
    /// Set once the process is reaped *and* both pipes hit end of file.
    exit: Option<ExitInfo>,
}

impl Exec {
    /// Lowest offset still buffered.
    fn start(&self) -> u64 {
        self.chunks.front().map_or(self.total, |c| c.offset)
    }
}

struct Sub {
    next: u64,
    lost_reported: bool,
}

struct Conn {
    generation: u64,
    /// The protocol version `Hello` agreed on; the agent sends only its kinds.
    version: u16,
    /// Ends the session's link (shuts the socket down; ends the serial session).
    end: Box<dyn Fn() + Send>,
    initialized: bool,
    closed: bool,
    /// Close once the queued replies are written.
    close_after_replies: bool,
    subs: BTreeMap<u64, Sub>,
    replies: VecDeque<Message>,
    drains: VecDeque<Vec<(u64, u64)>>,
    poweroff_sent: bool,
}

#[derive(Default)]
struct State {
    job: Option<(String, String)>,
    execs: HashMap<u64, Exec>,
    conn: Option<Conn>,
    generation: u64,
    powering_off: bool,
}

struct Agent {
    st: Mutex<State>,
    cv: Condvar,
    opts: Options,
    /// The agent's session id.
    session: i32,
}

impl Agent {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new(opts: Options) -> Arc<Agent> {
        Arc::new(Agent {
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
            opts,
            session: crate::procfs::own_session().unwrap_or(0),
        })
    }
}

/// The byte stream of one host session: a unix connection, or one session on the
/// virtio-serial port ([`crate::serial`]). The session code below is written once
/// against it.
pub(crate) trait Link: Read + Write + Send + Sized + 'static {
    /// Another handle on the same session (for its writer thread and its closer).
    fn clone_link(&self) -> io::Result<Self>;
    /// Ends the session both ways: a blocked read returns end of file, and nothing
    /// more is written on this session's behalf.
    fn end(&self);
}

impl Link for UnixStream {
    fn clone_link(&self) -> io::Result<Self> {
        self.try_clone()
    }

    fn end(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

/// How a session ended.
enum Ended {
    /// The host went away, or the session was closed.
    Closed,
    /// (Serial only.) A host sent `Hello` for `min..=max` in the middle of the
    /// session: a new host took the port over before the agent saw the old one leave;
    /// `frames` holds what followed the `Hello`.
    Hello(u16, u16, FrameReader),
}

/// Serves `listener` forever (until `Poweroff`, which exits the process).
pub fn serve(listener: UnixListener, opts: Options) -> io::Result<()> {
    let agent = Agent::new(opts);
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let agent = Arc::clone(&agent);
                thread::spawn(move || handle_conn(&agent, stream));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("reel-agent: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(())
}

/// Serves host sessions on a virtio-serial port forever (until `Poweroff`, which
/// exits the process), one after the other: each starts with the first valid `Hello`
/// found in the stream (`SerialPort::wait_for_hello`) and ends when
/// the host goes away (end of file: nobody is connected to the chardev), when a frame
/// is bad, or when another `Hello` arrives. Never ends because of end of file: the
/// port's host side comes and goes with the engines, and the steps keep running (and
/// their output stays buffered for a `Resume`) in between.
pub fn serve_serial(port: crate::serial::SerialPort, opts: Options) -> io::Result<()> {
    let agent = Agent::new(opts);
    let port = Arc::new(port);
    let mut next = None;
    loop {
        let (min, max, frames) = match next.take() {
            Some(hello) => hello,
            None => port.wait_for_hello()?,
        };
        let link = crate::serial::SerialPort::begin(&port);
        if let Ended::Hello(min, max, frames) = session(&agent, link, frames, min, max, true) {
            next = Some((min, max, frames));
        }
    }
}

fn send_direct(stream: &mut impl Write, msg: &Message) {
    let _ = proto::write_message(stream, msg);
}

/// An error sent before `Hello` agreed on a version: always kind 17, which every
/// version reads. After `Hello`, errors are made with [`Message::failure`] for the
/// connection's version.
fn error(exec_id: Option<u64>, message: impl Into<String>) -> Message {
    Message::Error {
        exec_id,
        message: message.into(),
    }
}

fn handle_conn(agent: &Arc<Agent>, mut stream: UnixStream) {
    let mut frames = FrameReader::new();
    // Handshake, before this connection replaces the current one.
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let first = frames.read_message(&mut stream);
    let (min, max) = match first {
        Ok(Some(Message::Hello {
            min_version,
            max_version,
            role: Role::Host,
        })) => (min_version, max_version),
        Ok(Some(Message::Hello { role, .. })) => {
            let msg = format!("The agent only accepts Hello from a host, not from {role:?}.");
            send_direct(&mut stream, &error(None, msg));
            return;
        }
        Ok(Some(other)) => {
            let msg = format!(
                "Expected Hello before any other message, got {}.",
                other.name()
            );
            send_direct(&mut stream, &error(None, msg));
            return;
        }
        Ok(None) => {
            send_direct(&mut stream, &error(None, "Timed out waiting for Hello."));
            return;
        }
        Err(ProtoError::Closed) => return,
        Err(e) => {
            send_direct(&mut stream, &error(None, format!("Bad frame: {e}")));
            return;
        }
    };
    let _ = stream.set_read_timeout(None);
    session(agent, stream, frames, min, max, false);
}

/// Answers a host's `Hello` offering `min..=max` on `link`, makes the session the
/// current connection (replacing the old one) and serves its messages until it ends.
/// With `serial`, a `Hello` in the middle of the session ends it (see [`Ended`])
/// rather than being refused.
fn session<L: Link>(
    agent: &Arc<Agent>,
    mut link: L,
    mut frames: FrameReader,
    min: u16,
    max: u16,
    serial: bool,
) -> Ended {
    let lo = min.max(MIN_VERSION);
    let hi = max.min(MAX_VERSION);
    if lo > hi {
        let msg = format!(
            "No common protocol version: the host offers {min}..={max}, the agent supports {MIN_VERSION}..={MAX_VERSION}."
        );
        send_direct(&mut link, &error(None, msg));
        link.end();
        return Ended::Closed;
    }
    let hello = Message::Hello {
        min_version: hi,
        max_version: hi,
        role: Role::Agent,
    };
    if proto::write_message(&mut link, &hello).is_err() {
        link.end();
        return Ended::Closed;
    }
    let (Ok(writer_link), Ok(closer)) = (link.clone_link(), link.clone_link()) else {
        link.end();
        return Ended::Closed;
    };

    // Activate: replace the current connection.
    let generation = {
        let mut st = agent.lock();
        st.generation += 1;
        let generation = st.generation;
        if let Some(old) = st.conn.take() {
            (old.end)();
        }
        st.conn = Some(Conn {
            generation,
            version: hi,
            end: Box::new(move || closer.end()),
            initialized: false,
            closed: false,
            close_after_replies: false,
            subs: BTreeMap::new(),
            replies: VecDeque::new(),
            drains: VecDeque::new(),
            poweroff_sent: false,
        });
        agent.cv.notify_all();
        generation
    };
    {
        let agent = Arc::clone(agent);
        thread::spawn(move || writer(&agent, generation, writer_link));
    }

    loop {
        let msg = match frames.read_message(&mut link) {
            Ok(Some(Message::Hello {
                min_version,
                max_version,
                role: Role::Host,
            })) if serial => {
                close_conn(agent, generation, None);
                return Ended::Hello(min_version, max_version, frames);
            }
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(ProtoError::Closed) | Err(ProtoError::Io(_)) => {
                close_conn(agent, generation, None);
                return Ended::Closed;
            }
            Err(e) => {
                let m = format!("Bad frame: {e}");
                close_conn(
                    agent,
                    generation,
                    Some(Message::failure(hi, None, ErrorCode::BadFrame, m)),
                );
                return Ended::Closed;
            }
        };
        if !handle_message(agent, generation, msg) {
            return Ended::Closed;
        }
    }
}

/// Marks connection `generation` closed, optionally after sending `last`.
fn close_conn(agent: &Agent, generation: u64, last: Option<Message>) {
    let mut st = agent.lock();
    if let Some(c) = st.conn.as_mut().filter(|c| c.generation == generation) {
        match last {
            Some(m) => {
                c.replies.push_back(m);
                c.close_after_replies = true;
            }
            None => {
                c.closed = true;
                (c.end)();
            }
        }
    }
    agent.cv.notify_all();
}

/// Handles one message from connection `generation`; false means stop reading it.
fn handle_message(agent: &Arc<Agent>, generation: u64, msg: Message) -> bool {
    if matches!(msg, Message::ListFiles { .. } | Message::ReadFile { .. }) {
        return handle_file_message(agent, generation, msg);
    }
    let mut st = agent.lock();
    let state = &mut *st;
    let Some(conn) = state
        .conn
        .as_mut()
        .filter(|c| c.generation == generation && !c.closed)
    else {
        return false;
    };
    let needs_init = !matches!(
        msg,
        Message::Init { .. } | Message::Ping {} | Message::Hello { .. }
    );
    let version = conn.version;
    let fail = |exec_id, code, message: String| Message::failure(version, exec_id, code, message);
    if needs_init && !conn.initialized {
        let m = format!("Send Init before {}.", msg.name());
        conn.replies
            .push_back(fail(None, ErrorCode::NotInitialized, m));
        agent.cv.notify_all();
        return true;
    }
    if msg.since_version() > version {
        let m = format!(
            "{} needs protocol version {}; this connection speaks version {version}.",
            msg.name(),
            msg.since_version()
        );
        conn.replies
            .push_back(fail(None, ErrorCode::UnexpectedMessage, m));
        agent.cv.notify_all();
        return true;
    }
    match msg {
        Message::Hello { .. } => {
            conn.replies.push_back(fail(
                None,
                ErrorCode::UnexpectedMessage,
                "Hello was already negotiated on this connection.".to_owned(),
            ));
        }
        Message::Init {
            job_id,
            session_token,
        } => match &state.job {
            Some((j, t)) if *j != job_id || *t != session_token => {
                let m = format!(
                    "This agent belongs to job {j}; Init for job {job_id} with a different session token is refused."
                );
                drop(st);
                close_conn(
                    agent,
                    generation,
                    Some(fail(None, ErrorCode::WrongSession, m)),
                );
                return false;
            }
            _ => {
                state.job = Some((job_id.clone(), session_token));
                conn.initialized = true;
                conn.replies.push_back(Message::Initialized { job_id });
            }
        },
        Message::Ping {} => conn.replies.push_back(Message::Pong {}),
        Message::ExecStart {
            exec_id,
            argv,
            env,
            cwd,
            timeout_ms,
        } => match state.execs.entry(exec_id) {
            Entry::Occupied(_) => {
                conn.replies.push_back(fail(
                    Some(exec_id),
                    ErrorCode::ExecExists,
                    format!("Exec {exec_id} already exists."),
                ));
            }
            Entry::Vacant(slot) => match spawn_exec(agent, &argv, env, cwd.as_deref()) {
                Ok((exec, pid, children)) => {
                    slot.insert(exec);
                    conn.subs.insert(
                        exec_id,
                        Sub {
                            next: 0,
                            lost_reported: false,
                        },
                    );
                    conn.replies
                        .push_back(Message::ExecStarted { exec_id, pid });
                    drop(st);
                    start_exec_threads(agent, exec_id, children, timeout_ms);
                    agent.cv.notify_all();
                    return true;
                }
                Err(e) => {
                    let m = format!("Failed to start exec {exec_id} ({argv:?}): {e}.");
                    conn.replies
                        .push_back(fail(Some(exec_id), ErrorCode::SpawnFailed, m));
                }
            },
        },
        Message::Resume {
            exec_id,
            from_offset,
        } => match state.execs.get(&exec_id) {
            None => conn.replies.push_back(fail(
                Some(exec_id),
                ErrorCode::UnknownExec,
                format!("Unknown exec {exec_id}."),
            )),
            Some(e) if e.lost => {
                conn.replies.push_back(fail(
                    Some(exec_id),
                    ErrorCode::OutputLost,
                    lost_message(exec_id, agent.opts.max_buffer),
                ));
                conn.subs.insert(
                    exec_id,
                    Sub {
                        next: e.total,
                        lost_reported: true,
                    },
                );
            }
            Some(e) if from_offset < e.start() => {
                let m = format!(
                    "Cannot resume exec {exec_id} from offset {from_offset}: output below offset {} was acknowledged and dropped.",
                    e.start()
                );
                conn.replies
                    .push_back(fail(Some(exec_id), ErrorCode::OutputDropped, m));
            }
            Some(e) if from_offset > e.total => {
                let m = format!(
                    "Cannot resume exec {exec_id} from offset {from_offset}: only {} bytes were produced.",
                    e.total
                );
                conn.replies
                    .push_back(fail(Some(exec_id), ErrorCode::OffsetPastEnd, m));
            }
            Some(_) => {
                conn.subs.insert(
                    exec_id,
                    Sub {
                        next: from_offset,
                        lost_reported: false,
                    },
                );
            }
        },
        Message::Ack { exec_id, offset } => {
            if let Some(e) = state.execs.get_mut(&exec_id) {
                e.acked = e.acked.max(offset.min(e.total));
                while e
                    .chunks
                    .front()
                    .is_some_and(|c| c.offset + c.data.len() as u64 <= e.acked)
                {
                    e.chunks.pop_front();
                }
            } else {
                conn.replies.push_back(fail(
                    Some(exec_id),
                    ErrorCode::UnknownExec,
                    format!("Ack for unknown exec {exec_id}."),
                ));
            }
        }
        Message::Cancel { exec_id, grace_ms } => match state.execs.get(&exec_id) {
            None => conn.replies.push_back(fail(
                Some(exec_id),
                ErrorCode::UnknownExec,
                format!("Cancel for unknown exec {exec_id}."),
            )),
            Some(e) if e.exit.is_some() => {}
            Some(_) => {
                let agent = Arc::clone(agent);
                let grace = Duration::from_millis(grace_ms);
                thread::spawn(move || signal_ladder(&agent, exec_id, grace));
            }
        },
        Message::Drain {} => {
            let targets = conn
                .subs
                .keys()
                .filter_map(|id| state.execs.get(id).map(|e| (*id, e.total)))
                .collect();
            conn.drains.push_back(targets);
        }
        Message::Poweroff {} => {
            state.powering_off = true;
            conn.replies.push_back(Message::PoweringOff {});
            agent.cv.notify_all();
            drop(st);
            poweroff(agent, generation);
        }
        other => {
            let m = format!("The host may not send {}.", other.name());
            drop(st);
            close_conn(
                agent,
                generation,
                Some(fail(None, ErrorCode::UnexpectedMessage, m)),
            );
            return false;
        }
    }
    agent.cv.notify_all();
    true
}

/// `ListFiles` and `ReadFile`: checked against the connection under the lock,
/// answered from the filesystem without it (a large tree or a slow disk never
/// holds up the steps' output), the answer queued if the connection is still
/// current.
fn handle_file_message(agent: &Arc<Agent>, generation: u64, msg: Message) -> bool {
    let version = {
        let st = agent.lock();
        let Some(conn) = st
            .conn
            .as_ref()
            .filter(|c| c.generation == generation && !c.closed)
        else {
            return false;
        };
        let refusal = if !conn.initialized {
            Some((
                ErrorCode::NotInitialized,
                format!("Send Init before {}.", msg.name()),
            ))
        } else if conn.version < proto::FILES_VERSION {
            Some((
                ErrorCode::UnexpectedMessage,
                format!(
                    "{} needs protocol version {}; this connection speaks version {}.",
                    msg.name(),
                    proto::FILES_VERSION,
                    conn.version
                ),
            ))
        } else {
            None
        };
        if let Some((code, m)) = refusal {
            let version = conn.version;
            drop(st);
            reply(agent, generation, Message::failure(version, None, code, m));
            return true;
        }
        conn.version
    };
    let fail = |code, message: String| Message::failure(version, None, code, message);
    let answer = match msg {
        Message::ListFiles { patterns, after } => list_files(&agent.opts.workdir, &patterns, after)
            .unwrap_or_else(|(code, m)| fail(code, m)),
        Message::ReadFile { path, offset, len } => {
            read_file(&agent.opts.workdir, &path, offset, len)
                .unwrap_or_else(|(code, m)| fail(code, m))
        }
        other => fail(
            ErrorCode::UnexpectedMessage,
            format!("{} is not a file message.", other.name()),
        ),
    };
    reply(agent, generation, answer);
    true
}

/// Queues `m` for connection `generation`, if it is still current.
fn reply(agent: &Agent, generation: u64, m: Message) {
    let mut st = agent.lock();
    if let Some(c) = st
        .conn
        .as_mut()
        .filter(|c| c.generation == generation && !c.closed)
    {
        c.replies.push_back(m);
    }
    agent.cv.notify_all();
}

/// One page of the files below `workdir` that `patterns` match.
fn list_files(
    workdir: &Path,
    patterns: &[String],
    after: Option<String>,
) -> Result<Message, (ErrorCode, String)> {
    let parsed = patterns
        .iter()
        .map(|p| glob::Pattern::parse(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (ErrorCode::BadPattern, format!("{e}.")))?;
    let found = glob::find(workdir, &parsed).map_err(|e| {
        (
            ErrorCode::FileUnreadable,
            format!("Cannot list {}: {e}.", workdir.display()),
        )
    })?;
    let mut files = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    let from = match &after {
        Some(a) => std::ops::Bound::Excluded(a.clone()),
        None => std::ops::Bound::Unbounded,
    };
    for (path, size) in found.range((from, std::ops::Bound::Unbounded)) {
        // A name, its length and the size: at most 4 KiB + 20 bytes.
        bytes += path.len() + 20;
        if bytes > proto::MAX_LIST_BYTES {
            more = true;
            break;
        }
        files.push((path.clone(), *size));
    }
    Ok(Message::FileList { files, more })
}

/// Up to `len` bytes (at most [`proto::MAX_FILE_CHUNK`]) of the file at `path`
/// below `workdir`, from `offset`.
fn read_file(
    workdir: &Path,
    path: &str,
    offset: u64,
    len: u32,
) -> Result<Message, (ErrorCode, String)> {
    use std::os::unix::fs::FileExt;
    let (file, size) = glob::open_beneath(workdir, path).map_err(|e| match e {
        glob::OpenError::Refused(m) => (ErrorCode::FileRefused, format!("Cannot read {m}.")),
        glob::OpenError::Io(e) => (
            ErrorCode::FileUnreadable,
            format!("Cannot read {path:?}: {e}."),
        ),
    })?;
    let want = (len as usize).min(proto::MAX_FILE_CHUNK);
    let mut bytes = vec![0u8; want];
    let mut got = 0;
    while got < want {
        match file.read_at(&mut bytes[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err((
                    ErrorCode::FileUnreadable,
                    format!("Cannot read {path:?} at offset {offset}: {e}."),
                ));
            }
        }
    }
    bytes.truncate(got);
    let eof = got < want || offset + got as u64 >= size;
    Ok(Message::FileChunk { offset, bytes, eof })
}

fn lost_message(exec_id: u64, max_buffer: u64) -> String {
    format!(
        "Output of exec {exec_id} was lost: more than {max_buffer} unacknowledged bytes were buffered (the agent's --max-buffer)."
    )
}

type Children = (
    std::process::Child,
    std::process::ChildStdout,
    std::process::ChildStderr,
);

fn spawn_exec(
    agent: &Agent,
    argv: &[String],
    env: Vec<(String, String)>,
    cwd: Option<&str>,
) -> io::Result<(Exec, u32, Children)> {
    let Some((prog, args)) = argv.split_first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "argv is empty"));
    };
    let dir = match cwd {
        Some(c) => agent.opts.workdir.join(c),
        None => agent.opts.workdir.clone(),
    };
    let mut command = Command::new(prog);
    command
        .args(args)
        .env_clear()
        .envs(env)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // A step starts with every signal at its default disposition and none
    // blocked, however the agent was started: an ignored signal survives exec,
    // and the guest's init starts the agent in the background (`agent &`), where
    // a non-interactive shell ignores SIGINT and SIGQUIT. The step (and the
    // `trap` of its shell) would never see the cancel ladder's SIGINT.
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (`signal`, `sigemptyset`, `sigprocmask`), on memory of this closure.
    unsafe {
        command.pre_exec(|| {
            for sig in 1..libc::SIGRTMIN() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let pid = child.id();
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(io::Error::other("child pipes missing"));
    };
    let pgid = Pid::from_child(&child);
    let exec = Exec {
        pgid,
        group: Group {
            pgid: pgid.as_raw_pid(),
            session: agent.session,
        },
        pinned: true,
        chunks: VecDeque::new(),
        acked: 0,
        total: 0,
        lost: false,
        timed_out: false,
        exit: None,
    };
    Ok((exec, pid, (child, out, err)))
}

fn start_exec_threads(agent: &Arc<Agent>, exec_id: u64, children: Children, timeout_ms: u64) {
    let (mut child, out, err) = children;
    let r1 = {
        let agent = Arc::clone(agent);
        thread::spawn(move || pump(&agent, exec_id, Stream::Stdout, out))
    };
    let r2 = {
        let agent = Arc::clone(agent);
        thread::spawn(move || pump(&agent, exec_id, Stream::Stderr, err))
    };
    {
        let agent = Arc::clone(agent);
        thread::spawn(move || {
            // Learn of the leader's exit without reaping it, so that its pid, the
            // group id, stays the exec's until the group is marked unpinned.
            let pid = Pid::from_child(&child);
            while let Err(rustix::io::Errno::INTR) = waitid(
                WaitId::Pid(pid),
                WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
            ) {}
            if let Some(e) = agent.lock().execs.get_mut(&exec_id) {
                e.pinned = false;
            }
            let status = child.wait();
            let _ = r1.join();
            let _ = r2.join();
            let info = match status {
                Ok(s) => ExitInfo {
                    code: s.code(),
                    signal: s.signal(),
                },
                Err(_) => ExitInfo {
                    code: None,
                    signal: None,
                },
            };
            let mut st = agent.lock();
            if let Some(e) = st.execs.get_mut(&exec_id) {
                e.exit = Some(info);
            }
            agent.cv.notify_all();
        });
    }
    if timeout_ms > 0 {
        let agent = Arc::clone(agent);
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_millis(timeout_ms);
            let mut st = agent.lock();
            loop {
                let Some(e) = st.execs.get_mut(&exec_id) else {
                    return;
                };
                if e.exit.is_some() {
                    return;
                }
                let now = Instant::now();
                if now >= deadline {
                    e.timed_out = true;
                    drop(st);
                    signal_ladder(&agent, exec_id, agent.opts.timeout_grace);
                    return;
                }
                st = agent
                    .cv
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        });
    }
}

/// Reads one pipe of an exec into its buffer until end of file.
fn pump(agent: &Agent, exec_id: u64, stream: Stream, mut pipe: impl Read) {
    let mut buf = vec![0u8; MAX_OUTPUT_CHUNK];
    loop {
        // Backpressure: while the host has not acknowledged `max_buffer` bytes,
        // stop reading. The pipe fills and the step blocks in `write`, as it
        // would on a slow terminal; nothing is dropped, and a host that comes
        // back (a restarted engine) resumes and acknowledges, which wakes us.
        {
            let mut st = agent.lock();
            loop {
                let Some(e) = st.execs.get(&exec_id) else {
                    return;
                };
                if st.powering_off
                    || e.total - e.acked + MAX_OUTPUT_CHUNK as u64 <= agent.opts.max_buffer
                {
                    break;
                }
                st = agent.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        }
        let n = match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut st = agent.lock();
        let Some(e) = st.execs.get_mut(&exec_id) else {
            return;
        };
        let offset = e.total;
        e.total += n as u64;
        if !e.lost {
            if e.total - e.acked > agent.opts.max_buffer {
                e.lost = true;
                e.chunks.clear();
            } else {
                e.chunks.push_back(Chunk {
                    stream,
                    offset,
                    data: buf[..n].to_vec(),
                });
            }
        }
        agent.cv.notify_all();
    }
}

/// Sends `sig` to the process groups of `exec_ids`, only to processes still known
/// to be the job's (see the module doc); true if any process was signalled.
fn signal_execs(agent: &Agent, exec_ids: &[u64], sig: Signal) -> bool {
    let mut sent = false;
    let mut unpinned = Vec::new();
    {
        let st = agent.lock();
        for e in exec_ids.iter().filter_map(|id| st.execs.get(id)) {
            if e.pinned {
                // Under the lock: the waiter cannot reap the leader meanwhile.
                sent |= kill_process_group(e.pgid, sig).is_ok();
            } else {
                unpinned.push(e.group);
            }
        }
    }
    if !unpinned.is_empty() {
        for pid in members(&unpinned) {
            sent |= procfs::signal_if(pid, sig, |s| unpinned.iter().any(|g| g.has(s)));
        }
    }
    sent
}

/// Whether no process of the groups of `exec_ids` is left.
fn execs_gone(agent: &Agent, exec_ids: &[u64]) -> bool {
    let mut unpinned = Vec::new();
    {
        let st = agent.lock();
        for e in exec_ids.iter().filter_map(|id| st.execs.get(id)) {
            if e.pinned {
                if test_kill_process_group(e.pgid).is_ok() {
                    return false;
                }
            } else {
                unpinned.push(e.group);
            }
        }
    }
    unpinned.is_empty() || members(&unpinned).is_empty()
}

fn wait_execs_gone(agent: &Agent, exec_ids: &[u64], grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        if execs_gone(agent, exec_ids) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// SIGINT, wait `grace`, SIGTERM, wait `grace`, SIGKILL to the exec's process group.
fn signal_ladder(agent: &Agent, exec_id: u64, grace: Duration) {
    for sig in [Signal::INT, Signal::TERM] {
        if !signal_execs(agent, &[exec_id], sig) || wait_execs_gone(agent, &[exec_id], grace) {
            return;
        }
    }
    signal_execs(agent, &[exec_id], Signal::KILL);
}

/// Collects the next batch of frames for connection `generation`; returns `(frames, close,
/// poweroff_in_batch)`, or `None` if the connection is no longer current.
fn collect(state: &mut State, generation: u64, max_buffer: u64) -> Option<(Vec<u8>, bool, bool)> {
    let State { conn, execs, .. } = state;
    let conn = conn
        .as_mut()
        .filter(|c| c.generation == generation && !c.closed)?;
    let mut out = Vec::new();
    let mut poweroff = false;
    let push = |out: &mut Vec<u8>, m: &Message| match proto::encode_frame(m) {
        Ok(f) => out.extend_from_slice(&f),
        Err(e) => eprintln!("reel-agent: cannot encode {}: {e}", m.name()),
    };
    while let Some(m) = conn.replies.pop_front() {
        poweroff |= matches!(m, Message::PoweringOff {});
        push(&mut out, &m);
    }
    if conn.close_after_replies {
        return Some((out, true, poweroff));
    }
    let mut finished = Vec::new();
    for (&exec_id, sub) in conn.subs.iter_mut() {
        let Some(e) = execs.get(&exec_id) else {
            continue;
        };
        if e.lost {
            if !sub.lost_reported {
                sub.lost_reported = true;
                push(
                    &mut out,
                    &Message::failure(
                        conn.version,
                        Some(exec_id),
                        ErrorCode::OutputLost,
                        lost_message(exec_id, max_buffer),
                    ),
                );
            }
            sub.next = e.total;
        } else {
            if sub.next < e.start() {
                let m = format!(
                    "Output of exec {exec_id} from offset {} to {} was acknowledged and dropped before it was sent.",
                    sub.next,
                    e.start()
                );
                push(
                    &mut out,
                    &Message::failure(conn.version, Some(exec_id), ErrorCode::OutputDropped, m),
                );
                sub.next = e.start();
            }
            while sub.next < e.total && out.len() < WRITE_BATCH {
                let i = e
                    .chunks
                    .partition_point(|c| c.offset + c.data.len() as u64 <= sub.next);
                let Some(c) = e.chunks.get(i) else { break };
                let from = (sub.next - c.offset) as usize;
                let bytes = c.data[from..].to_vec();
                let len = bytes.len() as u64;
                push(
                    &mut out,
                    &Message::Output {
                        exec_id,
                        stream: c.stream,
                        offset: sub.next,
                        bytes,
                    },
                );
                sub.next += len;
            }
        }
        if let Some(x) = &e.exit
            && sub.next >= e.total
        {
            push(
                &mut out,
                &Message::ExecExit {
                    exec_id,
                    code: x.code,
                    signal: x.signal,
                    timed_out: e.timed_out,
                    total_bytes: e.total,
                },
            );
            finished.push(exec_id);
        }
    }
    for id in finished {
        conn.subs.remove(&id);
    }
    while let Some(targets) = conn.drains.front() {
        let done = targets.iter().all(|(id, target)| {
            conn.subs.get(id).is_none_or(|s| s.next >= *target)
                || execs.get(id).is_none_or(|e| e.lost)
        });
        if !done {
            break;
        }
        conn.drains.pop_front();
        push(&mut out, &Message::Drained {});
    }
    Some((out, false, poweroff))
}

fn writer(agent: &Agent, generation: u64, mut stream: impl Link) {
    loop {
        let (bytes, close, poweroff) = {
            let mut st = agent.lock();
            loop {
                match collect(&mut st, generation, agent.opts.max_buffer) {
                    None => return,
                    Some((bytes, close, poweroff)) if !bytes.is_empty() || close => {
                        break (bytes, close, poweroff);
                    }
                    Some(_) => st = agent.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                }
            }
        };
        let ok = stream
            .write_all(&bytes)
            .and_then(|()| stream.flush())
            .is_ok();
        if poweroff {
            let mut st = agent.lock();
            if let Some(c) = st.conn.as_mut().filter(|c| c.generation == generation) {
                c.poweroff_sent = true;
            }
            agent.cv.notify_all();
        }
        if !ok || close {
            let mut st = agent.lock();
            if let Some(c) = st.conn.as_mut().filter(|c| c.generation == generation) {
                c.closed = true;
            }
            stream.end();
            agent.cv.notify_all();
            return;
        }
    }
}

/// Waits for `PoweringOff` to be written, kills every step's process group and exits.
fn poweroff(agent: &Agent, generation: u64) -> ! {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut st = agent.lock();
    loop {
        let sent = st
            .conn
            .as_ref()
            .is_none_or(|c| c.generation != generation || c.poweroff_sent || c.closed);
        let now = Instant::now();
        if sent || now >= deadline {
            break;
        }
        st = agent
            .cv
            .wait_timeout(st, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    let execs: Vec<u64> = st.execs.keys().copied().collect();
    drop(st);
    signal_execs(agent, &execs, Signal::KILL);
    wait_execs_gone(agent, &execs, Duration::from_secs(2));
    remove_files(&agent.opts);
    std::process::exit(0);
}

fn remove_files(opts: &Options) {
    if let Some(p) = &opts.socket {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &opts.pidfile {
        let _ = std::fs::remove_file(p);
    }
}

/// Binds the socket, replacing a stale socket file but refusing a live agent.
pub fn bind(socket: &Path) -> io::Result<UnixListener> {
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another agent is already listening on {}", socket.display()),
            ));
        }
        std::fs::remove_file(socket)?;
    }
    UnixListener::bind(socket)
}

/// Writes `pid` to `path` atomically (temporary file, then rename).
pub fn write_pidfile(path: &Path, pid: u32) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{pid}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(state: char, pgrp: i32, session: i32) -> Stat {
        Stat {
            state,
            pgrp,
            session,
            start_time: 1,
        }
    }

    /// Once a finished exec's group id may be reused, a process with that group id
    /// is taken for the exec's only in the agent's session, and only while it lives.
    #[test]
    fn a_finished_execs_group_is_recognised_by_its_session() {
        let group = Group {
            pgid: 4242,
            session: 100,
        };
        assert!(group.has(&stat('S', 4242, 100)));
        assert!(group.has(&stat('R', 4242, 100)));
        // An unrelated process that got the leader's pid and called `setsid`.
        assert!(!group.has(&stat('S', 4242, 4242)));
        // A job process in another group.
        assert!(!group.has(&stat('S', 4243, 100)));
        // Zombies and dead processes need no signal.
        assert!(!group.has(&stat('Z', 4242, 100)));
        assert!(!group.has(&stat('X', 4242, 100)));
    }
}
