//! `reel run FILE...`: one-shot, no daemon. Parses the job files, records each job
//! in the state directory's log, runs them (`-j N` at a time) with their runner,
//! streams their output, and exits with the batch's status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

use reel_engine::input::jobfile::{ParsedJob, parse_job_file};
use reel_engine::input::secrets::{ResolvedSecrets, SecretSource};
use reel_engine::lifecycle::batch::{self, BatchJob, Finished, Work};
use reel_engine::lifecycle::executor::{Executor, Runners};
use reel_engine::lifecycle::observer::Cancel;
use reel_engine::model::event::{Event, Outcome};
use reel_engine::plugin;
use reel_engine::store::{Durability, EventLog, LogOptions};

use crate::app::chain;
use crate::print::Printer;

/// Exit status of `reel run`: the most severe outcome of the batch.
pub const EXIT_FAILED: u8 = 1;
/// Bad input or an engine error: nothing ran, or the engine could not go on.
pub const EXIT_ERROR: u8 = 2;
/// A job (or step) ran past its timeout.
pub const EXIT_TIMED_OUT: u8 = 3;
/// A job was cancelled (Ctrl-C).
pub const EXIT_CANCELLED: u8 = 4;

#[derive(Args, Debug)]
#[command(after_help = "\
Exit status: 0 every job succeeded; 1 a job failed; 2 bad input or an engine error;
3 a job timed out; 4 a job was cancelled. With several jobs, the most severe wins
(cancelled > timed out > failed).

Job files are reel's YAML format or spindle-style workflows (.tangled/workflows/*.yml).
Fields the runner cannot honour are reported as warnings, never skipped silently.
Secrets named by a job come from REEL_SECRET_<NAME> or <NAME> in the environment, or
from --secrets-file; their values are masked in stored and printed output.
Ctrl-C cancels every job cleanly: running steps are stopped, sandboxes torn down.")]
pub struct RunArgs {
    /// Job files to run (YAML).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Run up to N jobs at a time.
    #[arg(short = 'j', long = "jobs", default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parallel: u32,
    /// Who the jobs belong to (default: $USER).
    #[arg(long, value_name = "NAME")]
    pub owner: Option<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Options of every command that runs jobs (`run`, `recover`).
#[derive(Args, Debug)]
pub struct EngineArgs {
    /// Read secrets from FILE (lines NAME=value; must not be readable by group or
    /// others) instead of the environment.
    #[arg(long, value_name = "FILE")]
    pub secrets_file: Option<PathBuf>,
    /// Directory to load runner plugins from (default: beside the reel binary).
    #[arg(long, env = "REEL_PLUGIN_DIR", value_name = "DIR")]
    pub plugin_dir: Option<PathBuf>,
    /// How hard each logged event is pushed to disk before reel acts on it.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Fsync)]
    pub durability: DurabilityArg,
    /// Print only step summaries and results, not step output.
    #[arg(short, long)]
    pub quiet: bool,
    /// A runner option, KEY=VALUE (repeatable), given to every runner; each reads
    /// the keys it documents (process: agent_path, cgroup_parent, pids_max; qemu:
    /// image, qemu, bios, accel, cgroup_parent) and ignores the rest.
    #[arg(long = "runner-option", value_name = "KEY=VALUE", value_parser = runner_option)]
    pub runner_options: Vec<(String, String)>,
}

/// `KEY=VALUE`, with a non-empty key.
fn runner_option(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE (for example accel=tcg)")),
    }
}

/// `--durability`: the engine's [`Durability`], as the command line spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DurabilityArg {
    /// sled's flush (`sync_file_range`) only: survives a crash of the
    /// process, not every power loss.
    Flush,
    /// flush, and `fdatasync` of the journal and output files: survives power
    /// loss on a drive that honours cache flushes.
    Fsync,
}

impl From<DurabilityArg> for Durability {
    fn from(d: DurabilityArg) -> Durability {
        match d {
            DurabilityArg::Flush => Durability::Flush,
            DurabilityArg::Fsync => Durability::Fsync,
        }
    }
}

struct Prepared {
    file: PathBuf,
    parsed: ParsedJob,
    secrets: ResolvedSecrets,
}

pub fn run(state_dir: &Path, args: &RunArgs) -> Result<ExitCode> {
    // Read and check everything before running anything.
    let source = secret_source(&args.engine.secrets_file)?;
    let owner = args.owner.clone().unwrap_or_else(default_owner);
    let mut jobs = Vec::new();
    let mut bad = 0;
    for file in &args.files {
        match parse_job_file(file) {
            Ok(mut parsed) => {
                for w in &parsed.warnings {
                    eprintln!("reel: warning: {w}");
                }
                if parsed.spec.owner.is_empty() {
                    parsed.spec.owner = owner.clone();
                }
                match source.resolve(&parsed.spec.secrets) {
                    Ok(secrets) => jobs.push(Prepared {
                        file: file.clone(),
                        parsed,
                        secrets,
                    }),
                    Err(e) => {
                        eprintln!("reel: {}: {e}", file.display());
                        bad += 1;
                    }
                }
            }
            Err(e) => {
                eprintln!("reel: {e}");
                bad += 1;
            }
        }
    }
    if bad > 0 {
        bail!(
            "{bad} of {} job files cannot run; nothing was started",
            args.files.len()
        );
    }

    let plugin_dir = plugin_dir(&args.engine.plugin_dir)?;
    let plugins = plugin::load_dir(&plugin_dir);
    let (log, executor) = open_engine(state_dir, &args.engine, plugins)?;
    let orphans = log.live_jobs()?;
    if !orphans.is_empty() {
        eprintln!(
            "reel: note: {} unfinished job(s) of an engine that stopped are in {}; \
             `reel recover` finishes them (their sandbox ids stay reserved)",
            orphans.len(),
            state_dir.display()
        );
    }

    // Every runner must exist and accept its job before anything is submitted.
    for p in &jobs {
        let spec = &p.parsed.spec;
        if executor.plugins().get(&spec.runner).is_none() {
            let loaded: Vec<String> = executor
                .plugins()
                .plugins()
                .map(|i| i.name.clone())
                .collect();
            bail!(
                "{}: runner `{}` is not loaded from {} (loaded: {}); see `reel plugins`",
                p.file.display(),
                spec.runner,
                plugin_dir.display(),
                if loaded.is_empty() {
                    "none".into()
                } else {
                    loaded.join(", ")
                }
            );
        }
        let warnings = smol::block_on(executor.validate(spec))
            .with_context(|| p.file.display().to_string())?;
        for w in warnings {
            eprintln!("reel: warning: {}: {w}", p.file.display());
        }
    }

    let printer = Arc::new(Printer::new(
        jobs.len() > 1 && args.parallel > 1,
        args.engine.quiet,
    ));
    let cancel = Cancel::default();
    let started = Instant::now();
    let results = smol::block_on(run_batch(&executor, jobs, args.parallel, &cancel, &printer))?;
    log.close();

    if results.len() > 1 {
        printer.batch_summary(&results, started.elapsed());
    }
    Ok(ExitCode::from(exit_code(&results)))
}

/// Who jobs belong to when `--owner` is not given: $USER, else $LOGNAME,
/// else "unknown".
pub fn default_owner() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| std::env::var("LOGNAME").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".into())
}

/// The batch's exit status: its most severe outcome.
pub fn exit_code(results: &[Finished]) -> u8 {
    results
        .iter()
        .fold(0, |code, r| severest(code, outcome_code(r.outcome)))
}

/// The exit status one outcome gives.
pub fn outcome_code(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Succeeded => 0,
        Outcome::Failed | Outcome::Lost => EXIT_FAILED,
        Outcome::TimedOut => EXIT_TIMED_OUT,
        Outcome::Cancelled => EXIT_CANCELLED,
    }
}

/// Opens the state directory's log for writing and an executor over it, with
/// sandboxes under `<state>/sandboxes`.
pub fn open_engine(
    state_dir: &Path,
    engine: &EngineArgs,
    plugins: plugin::PluginSet,
) -> Result<(EventLog, Arc<Executor>)> {
    let log = EventLog::open(
        state_dir,
        LogOptions {
            durability: engine.durability.into(),
        },
    )
    .map_err(|e| {
        anyhow::Error::new(e).context(format!("cannot open the log in {}", state_dir.display()))
    })?;
    let executor = Executor::new(log.clone(), runners(state_dir, engine, plugins))?;
    Ok((log, Arc::new(executor)))
}

/// The runners of `plugins`, with sandboxes under `<state>/sandboxes` and the
/// `--runner-option`s (a later one of a key wins).
pub fn runners(state_dir: &Path, engine: &EngineArgs, plugins: plugin::PluginSet) -> Runners {
    let options = engine.runner_options.iter().cloned().collect();
    Runners::new(plugins, state_dir.join("sandboxes"), options)
}

/// Where secrets come from: the file if given, else the environment.
pub fn secret_source(file: &Option<PathBuf>) -> Result<SecretSource> {
    Ok(match file {
        Some(f) => SecretSource::from_file(f).context("cannot read the secrets file")?,
        None => SecretSource::from_env(Some(reel_engine::input::secrets::DEFAULT_ENV_PREFIX)),
    })
}

/// The plugin directory: the flag (or REEL_PLUGIN_DIR), else beside the binary.
pub fn plugin_dir(flag: &Option<PathBuf>) -> Result<PathBuf> {
    match flag {
        // Absolute, because runners start helpers (the agent) from it, in other
        // working directories.
        Some(d) => std::path::absolute(d)
            .with_context(|| format!("cannot resolve the plugin directory {}", d.display())),
        None => {
            plugin::default_plugin_dir().context("cannot find the directory of the reel binary")
        }
    }
}

/// Cancels `cancel` on the first SIGINT/SIGTERM; tells the user on later ones.
pub fn watch_signals(cancel: &Cancel, printer: &Arc<Printer>) -> Result<smol::Task<()>> {
    let signals =
        async_signal::Signals::new([async_signal::Signal::Int, async_signal::Signal::Term])
            .context("cannot install the signal handler")?;
    let cancel = cancel.clone();
    let printer = printer.clone();
    Ok(smol::spawn(async move {
        use smol::stream::StreamExt;
        let mut signals = signals;
        let mut count = 0;
        while let Some(Ok(sig)) = signals.next().await {
            count += 1;
            let name = if sig == async_signal::Signal::Int {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            if count == 1 {
                printer.line(&format!(
                    "reel: {name}: cancelling; sandboxes are being torn down"
                ));
                cancel.cancel(&format!("cancelled by {name}"));
            } else {
                printer.line("reel: still tearing down; the log records every step, `reel recover` can finish");
            }
        }
    }))
}

/// The more severe of two exit statuses: cancelled > timed out > failed > 0.
pub fn severest(a: u8, b: u8) -> u8 {
    let rank = |c: u8| match c {
        EXIT_CANCELLED => 3,
        EXIT_TIMED_OUT => 2,
        EXIT_FAILED => 1,
        _ => 0,
    };
    if rank(b) > rank(a) { b } else { a }
}

async fn run_batch(
    executor: &Arc<Executor>,
    jobs: Vec<Prepared>,
    parallel: u32,
    cancel: &Cancel,
    printer: &Arc<Printer>,
) -> Result<Vec<Finished>> {
    let log = executor.log();
    // Submit every job first, so the whole batch is in the log before any runs.
    let mut queued = Vec::new();
    for p in jobs {
        let id = log.submit(p.parsed.spec.clone()).await?;
        log.append(id, Event::Queued {}).await?;
        printer.register(id, &p.parsed.spec.name, &p.file, p.parsed.spec.steps.len());
        queued.push(BatchJob {
            job: id,
            name: p.parsed.spec.name.clone(),
            work: Work::Run {
                spec: Box::new(p.parsed.spec),
                secrets: p.secrets,
            },
        });
    }
    // Ctrl-C / SIGTERM cancel the batch; the executor tears every sandbox down.
    let watcher = watch_signals(cancel, printer)?;
    let results = batch::run(executor, queued, parallel, cancel, printer.clone()).await;
    drop(watcher);
    report_errors(&results, printer)?;
    Ok(results)
}

/// Prints each job the engine could not finish; fails if there was one.
pub fn report_errors(results: &[Finished], printer: &Printer) -> Result<()> {
    let mut failed = false;
    for (f, e) in results
        .iter()
        .filter_map(|f| f.error.as_ref().map(|e| (f, e)))
    {
        failed = true;
        printer.line(&format!("reel: job {}: {}", f.job, chain(e)));
    }
    if failed {
        bail!("the engine could not finish every job; see above");
    }
    Ok(())
}
