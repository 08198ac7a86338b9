//! Reading the log back.
//!
//! (i) Fold every job of a log of 100,000 jobs × 10 events (1,000,000 events):
//!     `log.fold(job)` over all jobs, on a freshly opened log each run (sled's
//!     cache cold, the OS page cache warm). Baselines in the same run, on the same
//!     log opened as a plain sled db: a raw scan of the `events` tree, and the same
//!     scan decoding every envelope, which split the fold's cost into sled reads,
//!     decoding and folding.
//! (ii) `EventLog::open` + `live_jobs()` with 1,000 live of 100,000 jobs, against
//!     the same with 1,000 live of 10,000 jobs (10× less history); the ratio should
//!     be about 1 since the live tree is read, not history.
//!
//! Live jobs have 10 events (Submitted … AgentConnected); the others end after a
//! failed prepare, also in 10 events (… WorkDirCreated, TeardownStarted,
//! CleanupStarted, Cleaned, Failed). Logs are built with 1,024 concurrent
//! submitters and `Durability::Flush`; build time is printed, not measured.
//! Sizes scale with `REEL_BENCH_SCALE`; `--quick` shrinks them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use reel_benches::{
    BenchDir, build_log, dir_size, median_duration, ms, quick, ratio, scaled, sled_open, thousands,
};
use reel_engine::model::event::{Event, Handle, JobId, Outcome};
use reel_engine::store::{EventLog, LogOptions};
use reel_engine::testkit::simulate;

const FOLD_RUNS: usize = 3;
const OPEN_RUNS: usize = 5;
const BUILDERS: u64 = 1024;
const EVENTS_PER_JOB: u64 = 10;

fn handle(cid: u32, stage: &str) -> Handle {
    Handle {
        version: 1,
        bytes: format!("/var/lib/reel/sandboxes/{cid}|{stage}").into_bytes(),
    }
}

/// Appends one job's 10 events; live jobs stop connected, the others fail in prepare.
async fn job(log: &EventLog, n: u64, live: bool) -> anyhow::Result<JobId> {
    let cid = u32::try_from(n % 60_000).unwrap_or(0) + 3;
    let id = log.submit(simulate::spec(&format!("job-{n}"), 2)).await?;
    log.append(id, Event::Queued {}).await?;
    log.append(
        id,
        Event::SlotGranted {
            charged: Default::default(),
        },
    )
    .await?;
    log.append(id, Event::CidAllocated { cid }).await?;
    log.append(
        id,
        Event::SandboxPlanned {
            handle: handle(cid, "planned"),
            resources: vec![
                format!("workdir /var/lib/reel/sandboxes/{cid}"),
                format!("cgroup reel-{cid}"),
            ],
        },
    )
    .await?;
    log.append(
        id,
        Event::WorkDirCreated {
            handle: handle(cid, "prepared"),
        },
    )
    .await?;
    if live {
        log.append(id, Event::VolumesFormatted { volumes: vec![] })
            .await?;
        log.append(id, Event::BootRequested {}).await?;
        log.append(
            id,
            Event::VmBooted {
                handle: handle(cid, "booted"),
            },
        )
        .await?;
        log.append(
            id,
            Event::AgentConnected {
                handle: handle(cid, "connected"),
            },
        )
        .await?;
    } else {
        let reason = "volume format failed: mkfs.ext4 exited with status 1".to_string();
        log.append(
            id,
            Event::TeardownStarted {
                outcome: Outcome::Failed,
                reason: reason.clone(),
            },
        )
        .await?;
        log.append(id, Event::CleanupStarted {}).await?;
        log.append(id, Event::Cleaned {}).await?;
        log.append(id, Event::Failed { reason }).await?;
    }
    Ok(id)
}

/// Builds a log of `jobs` jobs of which `live` (spread evenly) stay live.
fn build(dir: &Path, jobs: u64, live: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let every = (jobs / live.max(1)).max(1);
    let live_now = build_log(dir, jobs, BUILDERS, move |log, n| async move {
        job(&log, n, n.is_multiple_of(every) && n / every < live).await?;
        Ok(())
    })?;
    let took = start.elapsed();
    ensure!(
        live_now == live,
        "built {live_now} live jobs, wanted {live}"
    );
    println!(
        "built {} jobs ({} live), {} events in {:.1} s ({} events/s, Flush, {BUILDERS} submitters); {:.0} MiB on disk",
        thousands(jobs as f64),
        thousands(live as f64),
        thousands((jobs * EVENTS_PER_JOB) as f64),
        took.as_secs_f64(),
        thousands((jobs * EVENTS_PER_JOB) as f64 / took.as_secs_f64()),
        dir_size(dir) as f64 / f64::from(1 << 20)
    );
    Ok(())
}

fn open(dir: &Path) -> anyhow::Result<EventLog> {
    Ok(EventLog::open(dir, LogOptions::default())?)
}

/// Opens the log and folds every job; returns (events folded, time of the fold).
fn fold_all(dir: &Path) -> anyhow::Result<(u64, Duration)> {
    let log = open(dir)?;
    let start = Instant::now();
    let mut ids = Vec::new();
    for s in log.jobs() {
        ids.push(s?.id);
    }
    let mut events = 0u64;
    for id in ids {
        let state = log.fold(id)?;
        events += u64::from(state.seq);
    }
    let took = start.elapsed();
    log.close();
    Ok((events, took))
}

/// Scans the `events` tree directly with sled; `decode` also decodes every envelope.
fn scan(dir: &Path, decode: bool) -> anyhow::Result<(u64, Duration)> {
    let db = sled::Config::new()
        .path(dir.join("log"))
        .cache_capacity(256 * 1024 * 1024)
        .open()
        .context("cannot open the log as a sled db")?;
    let tree = db.open_tree("events")?;
    let start = Instant::now();
    let mut events = 0u64;
    let mut bytes = 0usize;
    for item in tree.iter() {
        let (k, v) = item?;
        bytes += k.len() + v.len();
        if decode {
            let (at, event) = Event::decode(&v)?;
            bytes += usize::from(at == 0) + usize::from(event.is_terminal());
        }
        events += 1;
    }
    let took = start.elapsed();
    std::hint::black_box(bytes);
    Ok((events, took))
}

/// `EventLog::open` + `live_jobs()`; returns the time and the live count.
fn open_live(dir: &Path) -> anyhow::Result<(Duration, usize)> {
    let start = Instant::now();
    let log = open(dir)?;
    let live = log.live_jobs()?;
    let took = start.elapsed();
    log.close();
    Ok((took, live.len()))
}

fn rate(events: u64, d: Duration) -> f64 {
    events as f64 / d.as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let big_jobs = scaled(100_000, 100);
    let small_jobs = scaled(10_000, 10);
    let live = scaled(1_000, 1).min(small_jobs);
    println!(
        "sizes: big log {} jobs, small log {} jobs, {} live in each, {EVENTS_PER_JOB} events per job{}",
        thousands(big_jobs as f64),
        thousands(small_jobs as f64),
        thousands(live as f64),
        if quick() { " (quick)" } else { "" }
    );
    let dir = BenchDir::new("replay")?;
    let big = dir.join("big");
    let small = dir.join("small");
    build(&big, big_jobs, live)?;
    build(&small, small_jobs, live)?;

    // (i) fold everything, interleaved with the raw-scan baselines.
    let mut fold_times = Vec::new();
    let mut scan_times = Vec::new();
    let mut decode_times = Vec::new();
    let mut folded = 0;
    let mut scanned = 0;
    for _ in 0..FOLD_RUNS {
        let (n, t) = scan(&big, false)?;
        scanned = n;
        scan_times.push(t);
        let (n, t) = scan(&big, true)?;
        ensure!(
            n == scanned,
            "decode scan saw {n} events, raw scan {scanned}"
        );
        decode_times.push(t);
        let (n, t) = fold_all(&big)?;
        folded = n;
        fold_times.push(t);
    }
    ensure!(
        folded == scanned,
        "folded {folded} events but the tree holds {scanned}"
    );
    let fold = median_duration(&fold_times);
    let raw = median_duration(&scan_times);
    let dec = median_duration(&decode_times);
    let rates = |v: &[Duration]| {
        v.iter()
            .map(|t| thousands(rate(folded, *t)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!();
    println!(
        "(i) fold all {} jobs ({} events), fresh open each run, median of {FOLD_RUNS}",
        thousands(big_jobs as f64),
        thousands(folded as f64)
    );
    println!(
        "{:<46} {:>12} {:>12} {:>9}   runs (events/s)",
        "", "time", "events/s", "rate/fold"
    );
    for (name, t, v) in [
        ("log.fold(job) for every job", fold, &fold_times),
        ("baseline: sled scan of `events`", raw, &scan_times),
        ("baseline: sled scan + Event::decode", dec, &decode_times),
    ] {
        println!(
            "{:<46} {:>12} {:>12} {:>9}   [{}]",
            name,
            ms(t),
            thousands(rate(folded, t)),
            ratio(fold.as_secs_f64(), t.as_secs_f64()),
            rates(v)
        );
    }
    println!(
        "fold rate vs raw scan: {}; vs scan+decode: {}",
        ratio(rate(folded, fold), rate(folded, raw)),
        ratio(rate(folded, fold), rate(folded, dec))
    );

    // (ii) open + live set, big history against 10x less.
    let mut big_times = Vec::new();
    let mut small_times = Vec::new();
    let mut big_sled = Vec::new();
    let mut small_sled = Vec::new();
    for _ in 0..OPEN_RUNS {
        big_sled.push(sled_open(&big)?);
        small_sled.push(sled_open(&small)?);
        let (t, n) = open_live(&big)?;
        ensure!(n as u64 == live, "big log: {n} live");
        big_times.push(t);
        let (t, n) = open_live(&small)?;
        ensure!(n as u64 == live, "small log: {n} live");
        small_times.push(t);
    }
    let b = median_duration(&big_times);
    let s = median_duration(&small_times);
    let list = |v: &[Duration]| v.iter().map(|t| ms(*t)).collect::<Vec<_>>().join(", ");
    println!();
    println!(
        "(ii) EventLog::open + live_jobs(), {} live, median of {OPEN_RUNS}",
        thousands(live as f64)
    );
    println!(
        "{:>8} jobs ({:>9} events): {:>12}   [{}]",
        thousands(big_jobs as f64),
        thousands((big_jobs * EVENTS_PER_JOB) as f64),
        ms(b),
        list(&big_times)
    );
    println!(
        "{:>8} jobs ({:>9} events): {:>12}   [{}]   (baseline)",
        thousands(small_jobs as f64),
        thousands((small_jobs * EVENTS_PER_JOB) as f64),
        ms(s),
        list(&small_times)
    );
    println!(
        "ratio big/small history: {} (history is {}x larger; ~1 means open cost is independent of history)",
        ratio(b.as_secs_f64(), s.as_secs_f64()),
        big_jobs / small_jobs
    );
    let bs = median_duration(&big_sled);
    let ss = median_duration(&small_sled);
    println!(
        "of which sled's own open (recovery, no live fold), median: big {} [{}], small {} [{}], ratio {}",
        ms(bs),
        list(&big_sled),
        ms(ss),
        list(&small_sled),
        ratio(bs.as_secs_f64(), ss.as_secs_f64())
    );
    println!(
        "min-of-runs ratio: {}",
        ratio(
            big_times
                .iter()
                .min()
                .copied()
                .unwrap_or_default()
                .as_secs_f64(),
            small_times
                .iter()
                .min()
                .copied()
                .unwrap_or_default()
                .as_secs_f64()
        )
    );
    Ok(())
}
