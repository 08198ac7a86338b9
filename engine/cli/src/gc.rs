//! `reel gc`: deletes the jobs that ended before a horizon (the engine's
//! `store::gc`), or with `--dry-run` says what it would delete.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Value, json};

use reel_engine::store::{self, LogReader};

use crate::client::DaemonArgs;
use crate::replay::held_by_daemon;
use reel_engine::time::{format_ms, now_ms};

#[derive(Args, Debug)]
#[command(after_help = "\
A job is deleted when it has ended (succeeded, failed, cancelled or lost) before the
horizon: now minus --keep. Its events, summary, journal frames, step output and
artifacts all go; a job that has not ended is never touched, however old. The job ids
of deleted jobs are never used again, and `reel jobs` says how far back history goes.

While a daemon (`reel serve`) holds the log, gc asks it (POST /v1/gc): the jobs, their
events, output and artifacts go at once; their journal frames go at the next gc that
has the log to itself. It is refused while `reel run` or `reel recover` holds the log.
It is safe to kill at any point, the daemon too: the log still opens and verifies
clean, and the next gc finishes what the killed one began.")]
pub struct GcArgs {
    /// Keep the jobs that ended within this long before now, e.g. 30d, 12h, 90m,
    /// 0s (delete every ended job).
    #[arg(long, value_name = "DURATION", value_parser = keep_ms)]
    pub keep: u64,
    /// Only say how many jobs would be deleted; change nothing (reads a copy).
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn keep_ms(s: &str) -> std::result::Result<u64, String> {
    reel_engine::input::jobfile::parse_duration(s)
}

/// `12.3 MiB`.
fn size(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if n >= unit {
            return format!("{:.1} {name}", n as f64 / unit as f64);
        }
    }
    format!("{n} B")
}

pub fn run(state_dir: &Path, args: &GcArgs, daemon: &DaemonArgs) -> Result<ExitCode> {
    if !store::exists(state_dir) {
        anyhow::bail!(
            "no reel log in {} (give --state-dir or set REEL_STATE_DIR)",
            state_dir.display()
        );
    }
    let horizon = now_ms().saturating_sub(args.keep);
    if args.dry_run {
        return dry_run(state_dir, horizon, args.json);
    }
    let started = Instant::now();
    let mut report = match store::gc(state_dir, horizon) {
        Ok(r) => serde_json::to_value(r)?,
        Err(e @ store::LogError::Locked { .. }) => {
            // A daemon holds the log: it deletes while it runs.
            let client = held_by_daemon(state_dir, daemon, e.into())?;
            client
                .post("/v1/gc", &[("keep", format!("{}ms", args.keep))], &[], b"")?
                .json()?
        }
        Err(e) => return Err(e).context("gc failed"),
    };
    report["seconds"] = json!(started.elapsed().as_secs_f64());
    let horizon = report["horizon_ms"].as_u64().unwrap_or(horizon);
    report["horizon"] = json!(format_ms(horizon));
    print(&report, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints a gc's report (`GcReport` as JSON, from this process or a daemon).
fn print(r: &Value, json: bool) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, r)?;
        writeln!(out)?;
        return Ok(());
    }
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    if n("resumed_jobs") > 0 {
        writeln!(
            out,
            "finished an interrupted gc: {} jobs it had chosen",
            n("resumed_jobs")
        )?;
    }
    writeln!(
        out,
        "deleted {} jobs that ended before {} ({} events, {} of output and artifacts)",
        n("deleted_jobs"),
        r["horizon"].as_str().unwrap_or("?"),
        n("deleted_events"),
        size(n("deleted_file_bytes"))
    )?;
    if r["online"].as_bool() == Some(true) {
        writeln!(
            out,
            "kept {} jobs ({} not ended); done by the running daemon: the deleted jobs' journal \
             frames go at the next gc with the log to itself (reel gc while no engine runs, or \
             reel serve --gc-keep at start); took {:.2} s",
            n("kept_jobs"),
            n("kept_live_jobs"),
            r["seconds"].as_f64().unwrap_or(0.0)
        )?;
    } else {
        writeln!(
            out,
            "journal {} -> {}, index {} -> {}; kept {} jobs ({} not ended); took {:.2} s",
            size(n("journal_bytes_before")),
            size(n("journal_bytes_after")),
            size(n("index_bytes_before")),
            size(n("index_bytes_after")),
            n("kept_jobs"),
            n("kept_live_jobs"),
            r["seconds"].as_f64().unwrap_or(0.0)
        )?;
    }
    Ok(())
}

fn dry_run(state_dir: &Path, horizon: u64, json: bool) -> Result<ExitCode> {
    let log = LogReader::open_copy(state_dir)?;
    let live: std::collections::HashSet<_> = log.live_jobs()?.into_iter().collect();
    let (mut due, mut kept, mut oldest) = (0u64, 0u64, None::<u64>);
    for s in log.jobs() {
        let s = s.context("cannot list jobs")?;
        if store::gc_due(&s, live.contains(&s.id), horizon) {
            due += 1;
        } else {
            kept += 1;
            oldest = Some(oldest.map_or(s.submitted_ms, |o: u64| o.min(s.submitted_ms)));
        }
    }
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(
            &mut out,
            &json!({
                "horizon": format_ms(horizon),
                "horizon_ms": horizon,
                "would_delete_jobs": due,
                "kept_jobs": kept,
                "kept_live_jobs": live.len(),
            }),
        )?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "would delete {due} jobs that ended before {}; would keep {kept} ({} not ended{})",
            format_ms(horizon),
            live.len(),
            oldest
                .map(|o| format!(", the oldest submitted {}", format_ms(o)))
                .unwrap_or_default()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
