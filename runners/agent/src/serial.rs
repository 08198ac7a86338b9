//! The agent's end of a virtio-serial port (`reel-agent --serial DEVICE`).
//!
//! Inside a VM there is no unix socket to the host: QEMU connects a `virtserialport`
//! to a unix-socket chardev on the host, and the guest sees one character device
//! (`/dev/vportNpM`) for the VM's whole life. Hosts come and go on the chardev (an
//! engine dies, a new one connects), and the port tells only this much, as Linux's
//! `virtio_console` does it:
//!
//! - while no host is connected, `read` returns 0 (end of file) at once, once the
//!   bytes that arrived before are read; `poll` reports `POLLHUP` (with `POLLIN`, as
//!   a read would not block);
//! - `write` blocks while no host is connected (`EAGAIN` with `O_NONBLOCK`).
//!
//! So a [`SerialPort`] is opened once and serves sessions one after the other
//! ([`crate::server::serve_serial`]): end of file ends a session exactly as a closed
//! unix connection does (its steps keep running, unacknowledged output stays for a
//! `Resume`); between sessions the agent polls, every [`HOST_POLL`], until a host is
//! connected and has sent a valid `Hello`. Neither direction starts clean: a host
//! that died mid-frame leaves the rest of that frame in the port, and the agent's
//! writer may have written part of a frame to the host that left. So the first
//! frame of a session is found by [`proto::resync`] (bytes before it are skipped),
//! and each session's writes go through a `SerialLink` that writes only while its
//! session is current: the check and the (non-blocking) `write` happen under one
//! lock that ending a session takes too, so no byte of an old session's queue is ever
//! written once a new session began. The host's side does the same resync on its
//! end ([`crate::client::AgentClient::connect_serial`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::fs::OFlags;

use crate::proto::{self, FrameReader, HELLO_MAX_PAYLOAD, KIND_HELLO, Message, Resync, Role};
use crate::server::Link;

/// How often the agent looks for a host while none is connected (reads return end
/// of file at once then, and `poll` reports `POLLHUP` at once, so there is nothing to
/// wait on): the most a new host's `Hello` waits for the agent to notice it.
pub const HOST_POLL: Duration = Duration::from_millis(10);
/// How long a session's reader or writer waits in `poll` before looking again
/// whether its session is still current.
const SESSION_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct Sessions {
    /// The session that may write; 0 between sessions.
    current: u64,
    /// The last session begun.
    last: u64,
}

/// An open virtio-serial port, serving one host session at a time.
#[derive(Debug)]
pub struct SerialPort {
    file: File,
    sessions: Mutex<Sessions>,
}

impl SerialPort {
    /// Opens the port's device (`/dev/vport0p1`), non-blocking: every wait is a
    /// `poll` with a timeout, so a session's end is noticed while waiting.
    pub fn open(path: &Path) -> io::Result<SerialPort> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY).bits() as i32)
            .open(path)?;
        Ok(SerialPort {
            file,
            sessions: Mutex::new(Sessions::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Begins a new session: from now on only the returned link writes.
    pub(crate) fn begin(port: &Arc<SerialPort>) -> SerialLink {
        let mut s = port.lock();
        s.last += 1;
        s.current = s.last;
        SerialLink {
            port: Arc::clone(port),
            session: s.last,
        }
    }

    /// Waits until `flags` may be ready, at most `timeout`. When `poll` returns at
    /// once without them (it reports `POLLHUP` at once while no host is connected),
    /// sleeps [`HOST_POLL`] instead, so no caller spins.
    fn wait(&self, flags: PollFlags, timeout: Duration) {
        let mut fds = [PollFd::new(&self.file, flags)];
        let ts = Timespec::try_from(timeout).unwrap_or(Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        match poll(&mut fds, Some(&ts)) {
            Ok(n) if n > 0 && !fds[0].revents().intersects(flags) => thread::sleep(HOST_POLL),
            Ok(_) => {}
            Err(_) => thread::sleep(HOST_POLL),
        }
    }

    /// Reads until a host's valid `Hello` (skipping every byte that does not form
    /// one, see [`proto::resync`]); returns its version range and a frame reader
    /// holding the bytes that followed it. End of file (no host connected) discards
    /// what was read, a partial frame of a host that left, and waits [`HOST_POLL`]
    /// for the next host.
    pub(crate) fn wait_for_hello(&self) -> io::Result<(u16, u16, FrameReader)> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            loop {
                match proto::resync(&buf, &[KIND_HELLO], HELLO_MAX_PAYLOAD) {
                    Resync::Frame {
                        skip,
                        len,
                        msg:
                            Message::Hello {
                                min_version,
                                max_version,
                                role: Role::Host,
                            },
                    } => {
                        let rest = buf.split_off(skip + len);
                        return Ok((min_version, max_version, FrameReader::with_buffered(rest)));
                    }
                    // A valid frame, but no host's Hello (an agent's, echoed): skip it.
                    Resync::Frame { skip, len, .. } => {
                        buf.drain(..skip + len);
                    }
                    Resync::NeedMore { skip } => {
                        buf.drain(..skip);
                        break;
                    }
                }
            }
            match (&self.file).read(&mut chunk) {
                Ok(0) => {
                    buf.clear();
                    thread::sleep(HOST_POLL);
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(PollFlags::IN, Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// One session's handle on a [`SerialPort`]: reads and writes only while its
/// session is the current one.
#[derive(Debug)]
pub(crate) struct SerialLink {
    port: Arc<SerialPort>,
    session: u64,
}

impl SerialLink {
    fn current(&self) -> bool {
        self.port.lock().current == self.session
    }
}

impl Read for SerialLink {
    /// End of file when the host went away or the session was ended.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.current() {
                return Ok(0);
            }
            match (&self.port.file).read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.port.wait(PollFlags::IN, SESSION_POLL);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for SerialLink {
    /// Writes what the port takes now, if this session is still current; a session
    /// that ended gets `BrokenPipe`. The check and the write are made under the lock
    /// that [`SerialPort::begin`] and [`Link::end`] take, so no write of an ended
    /// session reaches the next host.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            {
                let s = self.port.lock();
                if s.current != self.session {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the serial session ended",
                    ));
                }
                match (&self.port.file).write(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            self.port.wait(PollFlags::OUT, SESSION_POLL);
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Link for SerialLink {
    fn clone_link(&self) -> io::Result<Self> {
        Ok(SerialLink {
            port: Arc::clone(&self.port),
            session: self.session,
        })
    }

    fn end(&self) {
        let mut s = self.port.lock();
        if s.current == self.session {
            s.current = 0;
        }
    }
}
