//! Retention (issue 13, point 7): `reel gc --keep 0s` over a history of
//! 10,000 ended jobs (2 steps with output each, 22 events) with 20 jobs that
//! have not ended spread among them, run as the release `reel` binary on a
//! fresh copy of the state directory each time (medians of 3).
//!
//! Baseline in the same run: a state directory built the same way with only
//! the 20 live jobs — the live jobs' own data. Sizes count the journal to its
//! last frame, not the 8 MiB of zeros the writer keeps ahead of it. Goals:
//! after gc, the state
//! directory is at most 4× that baseline ("a small multiple of the live jobs'
//! data"), `reel verify` finds it clean with the 20 live jobs whole, and gc's
//! memory is bounded whatever the history: from a history a tenth as long to
//! the whole, its peak RSS grows by no more than sled's cache (48 MiB, which a
//! short history does not fill) plus 16 MiB. It does not level off: with
//! `REEL_BENCH_SCALE=10` (100,000 jobs) this FAILs, because sled's own
//! bookkeeping of the pages a gc touches grows with them (see `gc.rs`).
//!
//! Logs are built in-process with 256 concurrent submitters and
//! `Durability::Flush`; build time is printed, not measured. Sizes scale with
//! `REEL_BENCH_SCALE`; `--quick` shrinks them.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use reel_benches::{
    BenchDir, ReleaseBins, build_log, check_output, dir_size, median, median_duration, ms, ratio,
    scaled, thousands, verdict, vm_hwm_kib,
};
use reel_engine::testkit::simulate::{self, Ending};

const RUNS: usize = 3;
const BUILDERS: u64 = 256;
const LIVE: u64 = 20;

/// Builds a log of `ended` ended jobs with `live` live ones spread among them.
fn build(dir: &Path, ended: u64, live: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let total = ended + live;
    let every = (total / live.max(1)).max(1);
    let live_now = build_log(dir, total, BUILDERS, move |log, n| async move {
        let ending = if live > 0 && n % every == 0 && n / every < live {
            Ending::StopAfter(1)
        } else {
            Ending::Success
        };
        let cid = u32::try_from(n % 60_000).unwrap_or(0) + 3;
        simulate::run_job(&log, simulate::spec(&format!("job-{n}"), 2), cid, ending).await?;
        Ok(())
    })?;
    ensure!(
        live_now == live,
        "built {live_now} live jobs, wanted {live}"
    );
    println!(
        "  built {} jobs ({live} live) in {:.1} s: {:.1} MiB",
        thousands(total as f64),
        start.elapsed().as_secs_f64(),
        dir_size(dir) as f64 / 1048576.0
    );
    Ok(())
}

/// The bytes a state directory holds, its journal counted to its last frame:
/// the zeros the writer keeps ahead of the frames (8 MiB, written back by the
/// next engine that opens the log) are not data of any job.
fn state_bytes(dir: &Path) -> anyhow::Result<u64> {
    let journal = std::fs::File::open(dir.join("journal"))?;
    let len = journal.metadata()?.len();
    let written = reel_engine::store::journal::written_end(&journal)?;
    Ok(dir_size(dir) - len + written)
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    let out = Command::new("cp").arg("-a").arg(from).arg(to).output()?;
    check_output(&out, "cp -a")
}

struct Gc {
    took: Duration,
    peak_kib: u64,
    after: u64,
}

/// `reel gc --keep 0s` on a fresh copy of `built`; checks the result.
fn gc_once(bins: &ReleaseBins, built: &Path, work: &Path) -> anyhow::Result<Gc> {
    if work.exists() {
        std::fs::remove_dir_all(work)?;
    }
    copy_tree(built, work)?;
    let started = Instant::now();
    let mut child = Command::new(&bins.reel)
        .arg("--state-dir")
        .arg(work)
        .args(["gc", "--keep", "0s", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut peak_kib = 0;
    while child.try_wait()?.is_none() {
        // VmHWM only grows: the last value read before exit is the peak.
        if let Some(v) = vm_hwm_kib(pid) {
            peak_kib = v;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = started.elapsed();
    let out = child.wait_with_output()?;
    check_output(&out, "reel gc")?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).context("gc's JSON")?;
    ensure!(
        report["kept_live_jobs"] == LIVE,
        "gc kept {} live jobs",
        report["kept_live_jobs"]
    );
    let verify = Command::new(&bins.reel)
        .arg("--state-dir")
        .arg(work)
        .args(["verify", "--json"])
        .output()?;
    check_output(&verify, "reel verify after gc")?;
    let v: serde_json::Value = serde_json::from_slice(&verify.stdout)?;
    ensure!(
        v["jobs"] == LIVE && v["problems"].as_array().is_some_and(Vec::is_empty),
        "verify after gc: {v}"
    );
    Ok(Gc {
        took,
        peak_kib,
        after: state_bytes(work)?,
    })
}

fn main() -> anyhow::Result<()> {
    let ended = scaled(10_000, 200);
    let small = (ended / 10).max(20);
    let bins = ReleaseBins::build("gc-bench")?;
    let dir = BenchDir::new("gc")?;
    println!("gc: {ended} ended jobs, {LIVE} live among them; medians of {RUNS}");
    println!("building the histories:");
    let (full, tenth, live_only) = (dir.join("full"), dir.join("tenth"), dir.join("live"));
    build(&full, ended, LIVE)?;
    build(&tenth, small, LIVE)?;
    build(&live_only, 0, LIVE)?;
    let before = state_bytes(&full)?;
    let baseline = state_bytes(&live_only)?;
    let mut big = Vec::new();
    let mut little = Vec::new();
    for run in 0..RUNS {
        let g = gc_once(&bins, &full, &dir.join("work"))?;
        println!(
            "  run {}: gc of {ended} jobs {} ({:.3} ms/job), peak RSS {:.1} MiB, state {:.1} MiB -> {:.3} MiB",
            run + 1,
            ms(g.took),
            g.took.as_secs_f64() * 1000.0 / ended as f64,
            g.peak_kib as f64 / 1024.0,
            before as f64 / 1048576.0,
            g.after as f64 / 1048576.0
        );
        big.push(g);
        little.push(gc_once(&bins, &tenth, &dir.join("work"))?);
    }
    let took = median_duration(&big.iter().map(|g| g.took).collect::<Vec<_>>());
    let after = median(&big.iter().map(|g| g.after as f64).collect::<Vec<_>>());
    let peak = median(&big.iter().map(|g| g.peak_kib as f64).collect::<Vec<_>>());
    let peak_tenth = median(&little.iter().map(|g| g.peak_kib as f64).collect::<Vec<_>>());
    println!(
        "gc of {ended} ended jobs: {} ({:.3} ms/job, {} jobs/s)",
        ms(took),
        took.as_secs_f64() * 1000.0 / ended as f64,
        thousands(ended as f64 / took.as_secs_f64())
    );
    println!(
        "state dir (journal to its last frame): {:.1} MiB before, {:.3} MiB after; live jobs alone (baseline) {:.3} MiB: {} the baseline",
        before as f64 / 1048576.0,
        after / 1048576.0,
        baseline as f64 / 1048576.0,
        ratio(after, baseline as f64)
    );
    println!(
        "{} state dir after gc <= 4x the live jobs' own data",
        verdict(after <= 4.0 * baseline as f64)
    );
    println!(
        "peak RSS of reel gc: {:.1} MiB over {ended} jobs, {:.1} MiB over {small}: {}",
        peak / 1024.0,
        peak_tenth / 1024.0,
        ratio(peak, peak_tenth)
    );
    println!(
        "  ({:+.1} MiB of peak RSS per 10,000 more jobs deleted)",
        (peak - peak_tenth) / 1024.0 / ((ended - small) as f64 / 10_000.0)
    );
    let cache_mib = reel_engine::store::CACHE_BYTES as f64 / 1048576.0;
    println!(
        "{} gc's peak RSS grows by <= sled's cache ({cache_mib:.0} MiB) + 16 MiB from a tenth of the history to all of it ({:+.1} MiB)",
        verdict(peak - peak_tenth <= (cache_mib + 16.0) * 1024.0),
        (peak - peak_tenth) / 1024.0
    );
    Ok(())
}
