//! `reel gc`: deletes the jobs that ended before a horizon (the engine's
//! `store::gc`), or with `--dry-run` says what it would delete.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use reel_engine::store::{self, LogReader};
use reel_engine::time::{format_ms, now_ms};

#[derive(Args, Debug)]
#[command(after_help = "\
A job is deleted when it has ended (succeeded, failed, cancelled or lost) before the
horizon: now minus --keep. Its events, summary, journal frames, step output and
artifacts all go; a job that has not ended is never touched, however old. The job ids
of deleted jobs are never used again, and `reel jobs` says how far back history goes.

gc needs the log to itself: it is refused while an engine (`reel run`, `reel recover`,
`reel serve`) holds it. It is safe to kill at any point: the log still opens and
verifies clean, and the next `reel gc` finishes what the killed one began.")]
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

pub fn run(state_dir: &Path, args: &GcArgs) -> Result<ExitCode> {
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
    let r = store::gc(state_dir, horizon).context("gc failed")?;
    let took = started.elapsed();
    let mut out = std::io::stdout().lock();
    use std::io::Write as _;
    if args.json {
        serde_json::to_writer_pretty(
            &mut out,
            &json!({
                "horizon": format_ms(r.horizon_ms),
                "horizon_ms": r.horizon_ms,
                "deleted_jobs": r.jobs,
                "resumed_jobs": r.resumed,
                "deleted_events": r.events,
                "deleted_file_bytes": r.file_bytes,
                "journal_bytes_before": r.journal_before,
                "journal_bytes_after": r.journal_after,
                "kept_jobs": r.kept,
                "kept_live_jobs": r.live,
                "index_bytes_before": r.index_before,
                "index_bytes_after": r.index_after,
                "seconds": took.as_secs_f64(),
            }),
        )?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if r.resumed > 0 {
        writeln!(
            out,
            "finished an interrupted gc: {} jobs it had chosen",
            r.resumed
        )?;
    }
    writeln!(
        out,
        "deleted {} jobs that ended before {} ({} events, {} of output and artifacts)",
        r.jobs,
        format_ms(r.horizon_ms),
        r.events,
        size(r.file_bytes)
    )?;
    writeln!(
        out,
        "journal {} -> {}, index {} -> {}; kept {} jobs ({} not ended); took {:.2} s",
        size(r.journal_before),
        size(r.journal_after),
        size(r.index_before),
        size(r.index_after),
        r.kept,
        r.live,
        took.as_secs_f64()
    )?;
    Ok(ExitCode::SUCCESS)
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
