//! `reel recover`: brings every live job of a state directory — jobs of an engine
//! that died — to a terminal state, or with `--dry-run` says what it would do.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use reel_engine::lifecycle::batch::{self, BatchJob, Work};
use reel_engine::lifecycle::observer::Cancel;
use reel_engine::lifecycle::recover::{Action, Assessment, assess};
use reel_engine::plugin;
use reel_engine::store::LogReader;

use crate::print::Printer;
use crate::run::{
    EXIT_ERROR, EngineArgs, exit_code, open_engine, plugin_dir, report_errors, runners,
    secret_source, watch_signals,
};

#[derive(Args, Debug)]
#[command(after_help = "\
For each unfinished job it finds, recovery decides:
  requeue   the job never had a sandbox: it runs now, in its original order;
  reattach  its sandbox is alive (pid and start time checked): reconnect, resume the
            running step's output where the log stopped, run the remaining steps;
  finish    teardown had been decided: finish it, end with the decided outcome;
  reap      the sandbox is gone (or its runner cannot take it back): remove what is
            left, end the job `lost`.
Every action is logged, so a crash during recovery is itself recovered.

Exit status as for `reel run`; a lost job counts as failed.")]
pub struct RecoverArgs {
    /// Only say what would be done, for each job and why; change nothing (the log
    /// is read from a copy and stays byte-identical).
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON (with --dry-run: the assessments; else the outcomes).
    #[arg(long)]
    pub json: bool,
    /// Run up to N requeued jobs at a time (reattached and reaped jobs always
    /// proceed: they already hold their sandboxes).
    #[arg(short = 'j', long = "jobs", default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parallel: u32,
    #[command(flatten)]
    pub engine: EngineArgs,
}

fn action_word(a: &Action) -> &'static str {
    match a {
        Action::Requeue => "requeue",
        Action::Reattach { .. } => "reattach",
        Action::FinishTeardown { .. } => "finish",
        Action::Reap { .. } => "reap",
        Action::Skip { .. } => "skip",
    }
}

pub fn run(state_dir: &Path, args: &RecoverArgs) -> Result<ExitCode> {
    if !reel_engine::store::exists(state_dir) {
        anyhow::bail!(
            "no reel log in {} (give --state-dir or set REEL_STATE_DIR)",
            state_dir.display()
        );
    }
    let plugins = plugin::load_dir(&plugin_dir(&args.engine.plugin_dir)?);
    if args.dry_run {
        return dry_run(state_dir, plugins, args);
    }
    let source = secret_source(&args.engine.secrets_file)?;
    let (log, executor) = open_engine(state_dir, &args.engine, plugins)?;
    let live = log.live_jobs()?;
    if live.is_empty() {
        if args.json {
            println!("[]");
        } else {
            println!(
                "nothing to recover: no unfinished job in {}",
                state_dir.display()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let printer = Arc::new(Printer::new(
        live.len() > 1 && args.parallel > 1,
        args.engine.quiet,
    ));
    let cancel = Cancel::default();
    let started = Instant::now();
    let results = smol::block_on(async {
        let mut jobs = Vec::new();
        for job in live {
            let Some(state) = executor.log().live_state(job) else {
                continue;
            };
            let a = assess(executor.runners(), executor.log(), &state).await;
            let spec = state.spec.clone().unwrap_or_default();
            printer.register(job, &a.name, Path::new("recovered"), spec.steps.len());
            printer.line(&format!(
                "==> job {job} {:?}: {}: {}",
                a.name,
                action_word(&a.action),
                a.why
            ));
            let secrets = source.resolve(&spec.secrets);
            jobs.push(BatchJob {
                job,
                name: a.name.clone(),
                work: Work::Recover {
                    assessment: Box::new(a),
                    secrets,
                },
            });
        }
        let _watcher = watch_signals(&cancel, &printer)?;
        let results = batch::run(&executor, jobs, args.parallel, &cancel, printer.clone()).await;
        // An engine error is reported per job; the jobs left live are counted below.
        let _ = report_errors(&results, &printer);
        anyhow::Ok(results)
    })?;
    let still_live = log.live_jobs()?.len();
    log.close();
    if args.json {
        let v: Vec<_> = results
            .iter()
            .map(
                |r| json!({"job": r.job, "name": r.name, "outcome": r.outcome, "reason": r.reason}),
            )
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        printer.batch_summary(&results, started.elapsed());
    }
    if still_live > 0 {
        eprintln!("reel: {still_live} job(s) are still unfinished; see above");
        return Ok(ExitCode::from(EXIT_ERROR));
    }
    Ok(ExitCode::from(exit_code(&results)))
}

fn dry_run(state_dir: &Path, plugins: plugin::PluginSet, args: &RecoverArgs) -> Result<ExitCode> {
    // Read-only by construction: a reader over a copy has no way to append.
    let log = LogReader::open_copy(state_dir)
        .with_context(|| format!("cannot read the log in {}", state_dir.display()))?;
    let runners = runners(state_dir, &args.engine, plugins);
    let mut found: Vec<Assessment> = Vec::new();
    let (states, unreadable) = log.live_states()?;
    for (job, e) in &unreadable {
        eprintln!(
            "reel: job {job} is set aside: its history cannot be read ({}); recovery leaves it",
            reel_engine::store::error_line(e)
        );
    }
    smol::block_on(async {
        for state in &states {
            found.push(assess(&runners, &log, state).await);
        }
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else if found.is_empty() {
        println!(
            "nothing to recover: no unfinished job in {}",
            state_dir.display()
        );
    } else {
        println!(
            "{} unfinished job(s) in {}; nothing was changed:",
            found.len(),
            state_dir.display()
        );
        for a in &found {
            println!(
                "\njob {} {:?} (phase {}): {}",
                a.job,
                a.name,
                a.phase,
                action_word(&a.action)
            );
            if let Some(alive) = a.alive {
                println!(
                    "  alive:  {}{}",
                    if alive { "yes" } else { "no" },
                    a.probe
                        .as_ref()
                        .map(|p| format!(" ({p})"))
                        .unwrap_or_default()
                );
            }
            if !a.holds.is_empty() {
                println!("  holds:  {}", a.holds.join("; "));
            }
            println!("  why:    {}", a.why);
        }
    }
    Ok(ExitCode::SUCCESS)
}
