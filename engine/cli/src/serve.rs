//! `reel serve`: the daemon's command line. Parses flags and the config file,
//! opens the engine, and hands both to `reel-serve`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde::Deserialize;

use reel_engine::input::jobfile::{parse_duration, parse_size};
use reel_engine::lifecycle::sched::{DEFAULT_REQUEST, Policy, machine_budget};
use reel_engine::model::spec::Resources;
use reel_engine::plugin;
use reel_engine::service::ServiceOptions;
use reel_serve::daemon::{self, DaemonOptions};
use reel_serve::http::Limits;

use crate::run::{EngineArgs, open_engine, plugin_dir, secret_source};

#[derive(Args, Debug)]
#[command(after_help = "\
The daemon takes jobs over HTTP (docs/api.md), queues them in the log, and runs them
as the scheduler's budget allows: fair between owners, backfilling past a blocked head,
and reserving for a job that waited longer than --aging. On start it first finishes
what a dead daemon left (reattach, requeue, reap). Over TCP every request but
/healthz needs the bearer token in <state>/serve/token (made on first start, mode
0600); the unix socket (--socket) needs none.

SIGTERM or SIGINT drains: no new jobs, running jobs get until --drain, then are
cancelled cleanly; queued jobs stay queued for the next start. A second signal
cancels at once.

With --gc-keep, each start first deletes the jobs that ended longer ago than that
(what `reel gc --keep` does; gc needs the log to itself, so it runs only then).

Config file (YAML; flags win):
  listen: 127.0.0.1:7117
  socket: /run/reel.sock
  budget: { memory: 16G, vcpus: 8, disk: 100G }     # default: this machine's
  default_request: { memory: 512M, vcpus: 1, disk: 1G }
  aging: 1m
  drain: 5m
  max_connections: 256
  gc_keep: 30d")]
pub struct ServeArgs {
    /// TCP address to listen on (loopback; default 127.0.0.1:7117).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Also listen on this unix socket (mode 0600; no token needed on it).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Config file (YAML, see below).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Memory budget for running jobs (e.g. 16G; default: this machine's memory less 10%).
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub memory: Option<u64>,
    /// vCPU budget (default: this machine's CPUs).
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,
    /// Disk budget (e.g. 100G; default: free space of the state directory less 10%).
    #[arg(long, value_name = "SIZE", value_parser = size)]
    pub disk: Option<u64>,
    /// A waiter older than this reserves its request: younger jobs stop
    /// overtaking it (default 1m).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub aging: Option<Duration>,
    /// After SIGTERM, how long running jobs get before they are cancelled
    /// (default 5m).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub drain: Option<Duration>,
    /// Most connections open at once; more get 503 (default 256).
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// On each start, before taking the log, delete the jobs that ended longer
    /// ago than this (as `reel gc --keep`); default: keep everything.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub gc_keep: Option<Duration>,
    /// How reel's own log lines look on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Lines for people.
    Human,
    /// One JSON object per line.
    Json,
}

fn size(s: &str) -> std::result::Result<u64, String> {
    parse_size(s)
}

fn duration(s: &str) -> std::result::Result<Duration, String> {
    parse_duration(s).map(Duration::from_millis)
}

/// A size or duration in the config file: a number or text.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Number(u64),
    Text(String),
}

impl Scalar {
    fn size(&self, key: &str) -> Result<u64> {
        match self {
            Scalar::Number(n) => Ok(*n),
            Scalar::Text(t) => parse_size(t).map_err(|e| anyhow::anyhow!("{key}: {e}")),
        }
    }

    fn duration(&self, key: &str) -> Result<Duration> {
        let ms = match self {
            Scalar::Number(n) => n.saturating_mul(1000),
            Scalar::Text(t) => parse_duration(t).map_err(|e| anyhow::anyhow!("{key}: {e}"))?,
        };
        Ok(Duration::from_millis(ms))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigResources {
    memory: Option<Scalar>,
    vcpus: Option<u32>,
    disk: Option<Scalar>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    listen: Option<SocketAddr>,
    socket: Option<PathBuf>,
    budget: Option<ConfigResources>,
    default_request: Option<ConfigResources>,
    aging: Option<Scalar>,
    drain: Option<Scalar>,
    max_connections: Option<usize>,
    gc_keep: Option<Scalar>,
}

fn read_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| match e.location() {
        Some(l) => anyhow::anyhow!("{}:{}:{}: {e}", path.display(), l.line(), l.column()),
        None => anyhow::anyhow!("{}: {e}", path.display()),
    })
}

fn resources(base: Resources, c: Option<&ConfigResources>, what: &str) -> Result<Resources> {
    let mut r = base;
    if let Some(c) = c {
        if let Some(m) = &c.memory {
            r.memory_mib = m.size(&format!("{what}.memory"))?;
        }
        if let Some(v) = c.vcpus {
            r.vcpus = v;
        }
        if let Some(d) = &c.disk {
            r.disk_mib = d.size(&format!("{what}.disk"))?;
        }
    }
    Ok(r)
}

pub fn run(state_dir: &Path, args: &ServeArgs) -> Result<ExitCode> {
    let config = match &args.config {
        Some(p) => read_config(p)?,
        None => Config::default(),
    };
    let mut budget = resources(machine_budget(state_dir), config.budget.as_ref(), "budget")?;
    if let Some(m) = args.memory {
        budget.memory_mib = m;
    }
    if let Some(v) = args.vcpus {
        budget.vcpus = v;
    }
    if let Some(d) = args.disk {
        budget.disk_mib = d;
    }
    if budget.memory_mib == 0 || budget.vcpus == 0 || budget.disk_mib == 0 {
        bail!(
            "the budget must be above zero in every resource (memory {} MiB, {} vCPUs, disk {} MiB)",
            budget.memory_mib,
            budget.vcpus,
            budget.disk_mib
        );
    }
    let default_request = resources(
        DEFAULT_REQUEST,
        config.default_request.as_ref(),
        "default_request",
    )?;
    let aging = match (args.aging, &config.aging) {
        (Some(a), _) => a,
        (None, Some(a)) => a.duration("aging")?,
        (None, None) => Duration::from_secs(60),
    };
    let drain = match (args.drain, &config.drain) {
        (Some(d), _) => d,
        (None, Some(d)) => d.duration("drain")?,
        (None, None) => daemon::DEFAULT_DRAIN,
    };
    let listen = args.listen.or(config.listen).unwrap_or_else(|| {
        daemon::DEFAULT_LISTEN
            .parse()
            .expect("the default address parses")
    });
    let socket = args.socket.clone().or(config.socket);
    let mut limits = Limits::default();
    if let Some(n) = args.max_connections.or(config.max_connections) {
        limits.max_connections = n.max(1);
    }
    let gc_keep = match (args.gc_keep, &config.gc_keep) {
        (Some(k), _) => Some(k),
        (None, Some(k)) => Some(k.duration("gc_keep")?),
        (None, None) => None,
    };
    let secrets = secret_source(&args.engine.secrets_file)?;
    let plugins = plugin::load_dir(&plugin_dir(&args.engine.plugin_dir)?);
    if let (Some(keep), true) = (gc_keep, reel_engine::store::exists(state_dir)) {
        let horizon = reel_engine::time::now_ms().saturating_sub(keep.as_millis() as u64);
        let r = reel_engine::store::gc(state_dir, horizon).context("gc on start")?;
        tracing::info!(
            deleted_jobs = r.jobs,
            kept_jobs = r.kept,
            journal_before = r.journal_before,
            journal_after = r.journal_after,
            "gc on start: deleted the jobs that ended before {}",
            reel_engine::time::format_ms(r.horizon_ms)
        );
    }
    let (_log, executor) = open_engine(state_dir, &args.engine, plugins)?;
    tracing::info!(
        memory_mib = budget.memory_mib,
        vcpus = budget.vcpus,
        disk_mib = budget.disk_mib,
        aging_s = aging.as_secs(),
        "budget"
    );
    eprintln!(
        "reel serve: budget {} MiB memory, {} vCPUs, {} MiB disk; state in {}",
        budget.memory_mib,
        budget.vcpus,
        budget.disk_mib,
        state_dir.display()
    );
    daemon::run(
        executor,
        DaemonOptions {
            state_dir: state_dir.to_path_buf(),
            listen,
            socket,
            limits,
            drain,
            service: ServiceOptions {
                policy: Policy {
                    budget,
                    default_request,
                    aging_ms: aging.as_millis() as u64,
                },
                secrets,
            },
        },
    )?;
    Ok(ExitCode::SUCCESS)
}
