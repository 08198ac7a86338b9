//! The reel agent binary.
//!
//! ```text
//! reel-agent --socket PATH [--pidfile PATH] [--workdir DIR] [--max-buffer BYTES]
//!            [--timeout-grace-ms MS] [--log PATH] [--daemonize]
//! reel-agent --serial DEVICE [--workdir DIR] [--max-buffer BYTES] [--timeout-grace-ms MS]
//! ```
//!
//! `--socket` listens on a unix socket (the process runner); `--serial` serves the same
//! protocol on a virtio-serial port inside a VM (the guest image's init starts it on
//! the port named `agent0`), one host session after the other: the host side of the
//! port comes and goes with the engines, so end of file there ends a session, never
//! the agent (see `reel_agent::serial`). The VM is the agent's lifetime, so
//! `--serial` takes no `--pidfile` or `--daemonize`.
//!
//! With `--daemonize` the process re-executes itself (with the hidden `--daemon-child`
//! flag) detached from its stdio; the child calls `setsid` to get its own session and
//! process group, binds the socket, writes the pidfile and only then says `ready` on its
//! stdout, a pipe to the parent (and points stdout at /dev/null). The parent waits on
//! that pipe, prints the child's pid and exits 0; if the child dies first (end of file
//! on the pipe), the parent fails. Instead of a second fork the child simply never opens a terminal, so being a
//! session leader cannot give it a controlling terminal. Without `--daemonize` the
//! agent still starts a session of its own where it can (when it does not lead a
//! process group already).

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use reel_agent::serial::SerialPort;
use reel_agent::server::{self, Options};

const USAGE: &str = "usage: reel-agent --socket PATH [--pidfile PATH] [--workdir DIR] \
[--max-buffer BYTES] [--timeout-grace-ms MS] [--log PATH] [--daemonize]
       reel-agent --serial DEVICE [--workdir DIR] [--max-buffer BYTES] [--timeout-grace-ms MS]";

/// Where the host is.
enum Endpoint {
    /// A unix socket to listen on.
    Socket(PathBuf),
    /// A virtio-serial port's device.
    Serial(PathBuf),
}

struct Args {
    endpoint: Endpoint,
    pidfile: Option<PathBuf>,
    workdir: Option<PathBuf>,
    max_buffer: u64,
    timeout_grace_ms: u64,
    log: Option<PathBuf>,
    daemonize: bool,
    daemon_child: bool,
}

fn parse() -> Result<Args, String> {
    let mut socket = None;
    let mut serial = None;
    let mut args = Args {
        endpoint: Endpoint::Socket(PathBuf::new()),
        pidfile: None,
        workdir: None,
        max_buffer: 64 << 20,
        timeout_grace_ms: 2000,
        log: None,
        daemonize: false,
        daemon_child: false,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy().into_owned();
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value.\n{USAGE}"))
        };
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(value("--socket")?)),
            "--serial" => serial = Some(PathBuf::from(value("--serial")?)),
            "--pidfile" => args.pidfile = Some(PathBuf::from(value("--pidfile")?)),
            "--workdir" => args.workdir = Some(PathBuf::from(value("--workdir")?)),
            "--log" => args.log = Some(PathBuf::from(value("--log")?)),
            "--max-buffer" => {
                let v = value("--max-buffer")?;
                args.max_buffer = v
                    .to_string_lossy()
                    .parse()
                    .map_err(|e| format!("Invalid --max-buffer {v:?}: {e}."))?;
            }
            "--timeout-grace-ms" => {
                let v = value("--timeout-grace-ms")?;
                args.timeout_grace_ms = v
                    .to_string_lossy()
                    .parse()
                    .map_err(|e| format!("Invalid --timeout-grace-ms {v:?}: {e}."))?;
            }
            "--daemonize" => args.daemonize = true,
            "--daemon-child" => args.daemon_child = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("Unknown argument {other:?}.\n{USAGE}")),
        }
    }
    args.endpoint = match (socket, serial) {
        (Some(p), None) => Endpoint::Socket(p),
        (None, Some(p)) => {
            if args.pidfile.is_some() || args.daemonize || args.daemon_child {
                return Err(format!(
                    "--serial takes no --pidfile or --daemonize.\n{USAGE}"
                ));
            }
            Endpoint::Serial(p)
        }
        (Some(_), Some(_)) => {
            return Err(format!(
                "--socket and --serial exclude each other.\n{USAGE}"
            ));
        }
        (None, None) => return Err(format!("--socket or --serial is required.\n{USAGE}")),
    };
    Ok(args)
}

fn daemonize_parent(args: &Args) -> Result<(), String> {
    use std::io::Read as _;
    let exe = std::env::current_exe().map_err(|e| format!("Cannot find own executable: {e}."))?;
    let child_args: Vec<_> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--daemonize")
        .chain(std::iter::once("--daemon-child".into()))
        .collect();
    let stderr = match &args.log {
        Some(p) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| format!("Cannot open log {}: {e}.", p.display()))?,
        ),
        None => Stdio::null(),
    };
    // The child says it is ready on its stdout (a pipe to here), once it
    // listens and its pidfile names it, then points its stdout at /dev/null.
    // Waiting on the pipe wakes this process the moment the child is ready
    // (or gone: end of file), where polling the pidfile slept in steps.
    let mut child = Command::new(exe)
        .args(child_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("Cannot start the agent: {e}."))?;
    let pid = child.id();
    let mut ready = child.stdout.take().expect("the child's stdout is piped");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut said = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("The agent did not start listening within 30 seconds.".to_owned());
        }
        let timeout = rustix::event::Timespec::try_from(left).unwrap_or(rustix::event::Timespec {
            tv_sec: 30,
            tv_nsec: 0,
        });
        let mut fds = [rustix::event::PollFd::new(
            &ready,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(format!("Cannot wait for the agent: {e}.")),
        }
        let mut buf = [0u8; 16];
        let n = ready
            .read(&mut buf)
            .map_err(|e| format!("Cannot read from the agent: {e}."))?;
        said.extend_from_slice(&buf[..n]);
        if said.ends_with(READY) {
            println!("{pid}");
            return Ok(());
        }
        if n == 0 {
            let status = child
                .wait()
                .map_or_else(|e| format!("unknown: {e}"), |s| s.to_string());
            return Err(format!("The agent exited during startup ({status})."));
        }
    }
}

/// What a `--daemon-child` writes on its stdout once it is ready.
const READY: &[u8] = b"ready\n";

/// Tells the waiting `--daemonize` parent that this agent is ready, then
/// points stdout at /dev/null (the parent is gone a moment later).
fn say_ready() -> Result<(), String> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(READY)
        .and_then(|()| out.flush())
        .map_err(|e| format!("Cannot tell the starting process the agent is ready: {e}."))?;
    let null =
        std::fs::File::open("/dev/null").map_err(|e| format!("Cannot open /dev/null: {e}."))?;
    rustix::stdio::dup2_stdout(&null).map_err(|e| format!("Cannot redirect stdout: {e}."))?;
    Ok(())
}

fn run(args: Args) -> Result<(), String> {
    if args.daemonize && matches!(args.endpoint, Endpoint::Socket(_)) {
        return daemonize_parent(&args);
    }
    // The agent leads a session of its own, which only its steps' processes share:
    // that is how it tells a finished step's process group from a later one with the
    // same id. Started without `--daemonize` by a shell that made it a process group
    // leader it cannot start one, and stays in the session it was given. (A session
    // whose leader is outside the agent's pid namespace has id 0.)
    let me = rustix::process::getpid().as_raw_pid();
    if reel_agent::procfs::own_session() != Some(me) {
        match rustix::process::setsid() {
            Ok(_) => {}
            Err(e) if args.daemon_child => return Err(format!("setsid failed: {e}.")),
            Err(_) => {}
        }
    }
    let cwd =
        std::env::current_dir().map_err(|e| format!("Cannot read the current directory: {e}."))?;
    let workdir = cwd.join(args.workdir.clone().unwrap_or_default());
    let mut opts = Options {
        socket: None,
        pidfile: None,
        workdir,
        max_buffer: args.max_buffer,
        timeout_grace: Duration::from_millis(args.timeout_grace_ms),
    };
    match &args.endpoint {
        Endpoint::Socket(socket) => {
            let socket = cwd.join(socket);
            let pidfile = args.pidfile.as_ref().map(|p| cwd.join(p));
            let listener = server::bind(&socket)
                .map_err(|e| format!("Cannot listen on {}: {e}.", socket.display()))?;
            if let Some(p) = &pidfile {
                server::write_pidfile(p, std::process::id())
                    .map_err(|e| format!("Cannot write pidfile {}: {e}.", p.display()))?;
            }
            if args.daemon_child {
                say_ready()?;
            }
            opts.socket = Some(socket);
            opts.pidfile = pidfile;
            server::serve(listener, opts).map_err(|e| format!("The agent failed: {e}."))
        }
        Endpoint::Serial(device) => {
            let port = SerialPort::open(device)
                .map_err(|e| format!("Cannot open {}: {e}.", device.display()))?;
            server::serve_serial(port, opts).map_err(|e| format!("The agent failed: {e}."))
        }
    }
}

fn main() -> ExitCode {
    match parse().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reel-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
