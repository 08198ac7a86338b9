//! Command-line definitions and dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::DaemonArgs;
use crate::{plugins, recover, remote, replay, run, serve};

/// reel: a durable job engine for CI. Every lifecycle transition of every job is
/// an event in a crash-safe log; the tools below read that log offline, or ask
/// the daemon that runs jobs.
#[derive(Parser, Debug)]
#[command(
    name = "reel",
    version,
    about = "reel: a durable job engine for CI. Every lifecycle transition of every job is an \
             event in a crash-safe log; `run` runs jobs, `recover` finishes what a dead engine \
             left, `submit`, `status`, `cancel`, `logs` and `artifacts` ask the daemon \
             (`reel serve`), the other commands read the log offline (or ask the daemon when \
             it holds the log).",
    long_about = None,
    propagate_version = true
)]
pub struct Cli {
    /// State directory holding the log. Default: $REEL_STATE_DIR, else
    /// $XDG_STATE_HOME/reel, else ~/.local/state/reel.
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Log verbosity for reel's own diagnostics on stderr (error, warn, info,
    /// debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    pub log_level: String,

    #[command(flatten)]
    pub daemon: DaemonArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run job files now, without a daemon: each job's lifecycle is recorded in
    /// the state directory's log, its output streamed and stored.
    Run(run::RunArgs),
    /// Finish the jobs an engine left behind when it died: reattach to live
    /// sandboxes and carry on, run jobs still queued, reap the rest.
    Recover(recover::RecoverArgs),
    /// List every job in the log: id, name, runner, state, start and end.
    Jobs(replay::JobsArgs),
    /// Show a job's timeline (seq, time, event, details, time between events)
    /// and its folded state, optionally as of an earlier seq.
    Replay(replay::ReplayArgs),
    /// Show a job's folded state now: phase, resources held, step results, and
    /// what recovery would have to undo.
    Inspect(replay::InspectArgs),
    /// Print a job's events as JSON lines, one event per line.
    Export(replay::ExportArgs),
    /// Print a job's stored step output, byte for byte (as masked when stored).
    Output(replay::OutputArgs),
    /// Check every stored event and output chunk; report each corrupt one.
    Verify(replay::VerifyArgs),
    /// Delete the jobs that ended before a horizon (--keep 30d): their events,
    /// journal frames, output and artifacts. Never touches a job still running.
    Gc(crate::gc::GcArgs),
    /// Run the daemon: take jobs over HTTP (docs/api.md), schedule them under a
    /// resource budget, fairly between owners, and survive kill -9.
    Serve(serve::ServeArgs),
    /// List runner plugins: what loaded (name, version, ABI, capabilities,
    /// path) and what was refused and why.
    Plugins(plugins::PluginsArgs),
    /// Send job files to the daemon (`reel serve`), which queues and runs them;
    /// with --wait, wait for them to end.
    Submit(remote::SubmitArgs),
    /// Ask the daemon about one job: state, outcome, owner, runner, times,
    /// attempts, and its steps.
    Status(remote::StatusArgs),
    /// Ask the daemon to cancel a job.
    Cancel(remote::CancelArgs),
    /// Print a job's step output from the daemon; -f follows a running job
    /// (through daemon restarts) until it ends.
    Logs(remote::LogsArgs),
    /// List a job's artifacts, or download them (-o DIR), checked against
    /// their size and CRC-32C.
    Artifacts(remote::ArtifactsArgs),
}

/// The state directory: the flag, else $REEL_STATE_DIR, else the XDG state dir.
pub fn state_dir(flag: &Option<PathBuf>) -> PathBuf {
    if let Some(d) = flag {
        return d.clone();
    }
    if let Some(d) = std::env::var_os("REEL_STATE_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(d).join("reel");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
    home.join(".local/state/reel")
}

/// reel's own diagnostics go to stderr, coloured only when stderr is a terminal:
/// in a CI log, a file or a pipe, ANSI escape codes are noise.
fn init_tracing(level: &str, json: bool) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        // The daemon says what it does (info) unless asked otherwise.
        Command::Serve(a) => init_tracing(
            if cli.log_level == "warn" {
                "info"
            } else {
                &cli.log_level
            },
            a.log_format == serve::LogFormat::Json,
        ),
        _ => init_tracing(&cli.log_level, false),
    }
    let dir = state_dir(&cli.state_dir);
    // Absolute, because runners hand paths under it to helpers (the agent)
    // running in other working directories.
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let result = match &cli.command {
        Command::Run(a) => run::run(&dir, a),
        Command::Recover(a) => recover::run(&dir, a),
        Command::Jobs(a) => replay::jobs(&dir, a, &cli.daemon),
        Command::Replay(a) => replay::replay(&dir, a, &cli.daemon),
        Command::Inspect(a) => replay::inspect(&dir, a, &cli.daemon),
        Command::Export(a) => replay::export(&dir, a, &cli.daemon),
        Command::Verify(a) => replay::verify(&dir, a),
        Command::Gc(a) => crate::gc::run(&dir, a, &cli.daemon),
        Command::Output(a) => replay::output(&dir, a, &cli.daemon),
        Command::Plugins(a) => plugins::run(a).map(|()| ExitCode::SUCCESS),
        Command::Submit(a) => remote::submit(&dir, &cli.daemon, a),
        Command::Status(a) => remote::status(&dir, &cli.daemon, a),
        Command::Cancel(a) => remote::cancel(&dir, &cli.daemon, a),
        Command::Logs(a) => remote::logs(&dir, &cli.daemon, a),
        Command::Artifacts(a) => remote::artifacts(&dir, &cli.daemon, a),
        Command::Serve(a) => serve::run(&dir, a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("reel: {}", chain(e.as_ref()));
            ExitCode::from(run::EXIT_ERROR)
        }
    }
}

/// An error and its causes on one line, each said once.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
        source = cause.source();
    }
    out
}
