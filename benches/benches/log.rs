//! Durable appends per second through the log's single writer (group commit).
//!
//! 1, 8, 64 and 256 concurrent submitters (smol tasks on a one-thread executor;
//! each awaits its append before sending the next, as the engine does) append
//! `RunnerNotice` events, for `Durability::Fsync` (the default) and
//! `Durability::Flush`. Baselines, measured in the same run on the same disk
//! with the same envelope bytes:
//!
//! (a) `pwrite` + `fdatasync` of one record at a time to a file whose blocks are
//!     already written (the disk's limit for one-at-a-time durability); an
//!     appending variant (a'), where every `fdatasync` also commits the file's
//!     new size, is printed for context but not used for ratios;
//! (b) sled `insert` + `flush()` of one record at a time in a fresh sled db.
//!
//! Every configuration runs for a fixed time window, `RUNS` times, interleaved
//! round-robin so drift on a noisy machine spreads over all of them; the median
//! is printed. The window scales with `REEL_BENCH_SCALE`; `--quick` shrinks it.
//!
//! A submitter moves to a fresh job (a durable `submit`, counted as an event)
//! every `EVENTS_PER_JOB` appends so no job's in-memory state grows without bound.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use reel_benches::{BenchDir, median, quick, ratio, scale, thousands, verdict};
use reel_engine::model::event::Event;
use reel_engine::store::{Durability, EventLog, LogOptions};
use reel_engine::testkit::simulate;
use reel_engine::time::now_ms;

const RUNS: usize = 3;
const SUBMITTERS: [usize; 4] = [1, 8, 64, 256];
const EVENTS_PER_JOB: u32 = 64;
const GOAL_SUBMITTERS: usize = 64;
const GOAL_RATE: f64 = 100_000.0;
const GOAL_VS_FSYNC: f64 = 15.0;
/// One submitter with `Durability::Fsync`: at least this fraction of (a).
const GOAL_ONE_VS_FSYNC: f64 = 0.8;

fn notice() -> Event {
    Event::RunnerNotice {
        message: "cgroup v1 memory controller: memory.high unsupported, using limit_in_bytes only (job slice)"
            .to_string(),
    }
}

/// Bytes written ahead of the baseline (a) file, so its writes land on allocated blocks.
const PREALLOCATED: u64 = 32 << 20;

/// Fills a file with `PREALLOCATED` zero bytes (real writes, not `fallocate`,
/// whose unwritten extents would cost a metadata update on first write) and syncs it.
fn preallocated(path: &std::path::Path) -> anyhow::Result<File> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..PREALLOCATED >> 20 {
        f.write_all(&zeros)?;
    }
    f.sync_all()?;
    Ok(f)
}

/// Baseline (a): one `pwrite` + `fdatasync` per record, over already-allocated
/// blocks (wrapping around), so `fdatasync` has no size or extent change to log.
/// This is the fastest one-at-a-time durable write the disk offers.
fn raw_fdatasync(
    file: &File,
    at: &mut u64,
    record: &[u8],
    window: Duration,
) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt as _;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < window {
        if *at + record.len() as u64 > PREALLOCATED {
            *at = 0;
        }
        file.write_all_at(record, *at)?;
        file.sync_data()?;
        *at += record.len() as u64;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Baseline (a'), for context: `write` + `fdatasync` appending to a growing
/// file, so every `fdatasync` also commits the new size (a journal commit on ext4).
fn append_fdatasync(file: &mut File, record: &[u8], window: Duration) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < window {
        file.write_all(record)?;
        file.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Baseline (b): one sled `insert` + `flush` per record.
fn sled_flush(
    db: &sled::Db,
    next: &mut u64,
    record: &[u8],
    window: Duration,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < window {
        db.insert(next.to_be_bytes(), record)?;
        db.flush()?;
        *next += 1;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// `submitters` tasks appending for `window`; returns events/s.
fn through_log(log: &EventLog, submitters: usize, window: Duration) -> anyhow::Result<f64> {
    let ex = smol::LocalExecutor::new();
    let stop = Rc::new(Cell::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..submitters)
        .map(|i| {
            let log = log.clone();
            let stop = stop.clone();
            ex.spawn(async move {
                let spec = simulate::spec(&format!("bench-{i}"), 1);
                let mut job = log.submit(spec.clone()).await?;
                let mut n = 1u64;
                let mut on_job = 0;
                while !stop.get() {
                    if on_job == EVENTS_PER_JOB {
                        job = log.submit(spec.clone()).await?;
                        on_job = 0;
                    } else {
                        log.append(job, notice()).await?;
                        on_job += 1;
                    }
                    n += 1;
                }
                anyhow::Ok(n)
            })
        })
        .collect();
    let total = smol::block_on(ex.run(async {
        smol::Timer::after(window).await;
        stop.set(true);
        let mut total = 0;
        for t in tasks {
            total += t.await?;
        }
        anyhow::Ok(total)
    }))?;
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let window = Duration::from_secs_f64(1.25 * scale()).max(Duration::from_millis(100));
    let dir = BenchDir::new("log")?;
    let record = notice().encode(now_ms());
    let submitted = Event::Submitted {
        spec: simulate::spec("bench-0", 1),
    }
    .encode(now_ms());
    println!(
        "record: RunnerNotice envelope, {} bytes (Submitted envelope every {EVENTS_PER_JOB} appends: {} bytes)",
        record.len(),
        submitted.len()
    );
    println!(
        "window {:.2} s per measurement, median of {RUNS} interleaved runs{}",
        window.as_secs_f64(),
        if quick() { " (quick)" } else { "" }
    );

    let raw = preallocated(&dir.join("raw.log"))?;
    let mut raw_at = 0u64;
    let mut append = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("append.log"))
        .context("cannot create append.log")?;
    let sled_db = sled::Config::new()
        .path(dir.join("sled"))
        .flush_every_ms(None)
        .open()
        .context("cannot open the baseline sled db")?;
    let mut sled_next = 0u64;

    let durabilities = [Durability::Fsync, Durability::Flush];
    let mut logs = Vec::new();
    for d in durabilities {
        let log = EventLog::open(&dir.join(&format!("{d:?}")), LogOptions { durability: d })?;
        // Warm up: sled's first segments, the writer's allocations.
        through_log(&log, GOAL_SUBMITTERS, window / 4)?;
        logs.push(log);
    }
    raw_fdatasync(&raw, &mut raw_at, &record, window / 4)?;
    append_fdatasync(&mut append, &record, window / 4)?;
    sled_flush(&sled_db, &mut sled_next, &record, window / 4)?;

    let mut raw_rates = Vec::new();
    let mut append_rates = Vec::new();
    let mut sled_rates = Vec::new();
    let mut log_rates = vec![vec![Vec::new(); SUBMITTERS.len()]; durabilities.len()];
    for run in 0..RUNS {
        raw_rates.push(raw_fdatasync(&raw, &mut raw_at, &record, window)?);
        append_rates.push(append_fdatasync(&mut append, &record, window)?);
        sled_rates.push(sled_flush(&sled_db, &mut sled_next, &record, window)?);
        for (di, log) in logs.iter().enumerate() {
            for (si, &s) in SUBMITTERS.iter().enumerate() {
                log_rates[di][si].push(through_log(log, s, window)?);
            }
        }
        eprintln!("run {}/{RUNS} done", run + 1);
    }

    let a = median(&raw_rates);
    let b = median(&sled_rates);
    let fmt_runs = |v: &[f64]| {
        v.iter()
            .map(|r| thousands(*r))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!();
    println!("{:<44} {:>10}   runs", "baseline", "events/s");
    println!(
        "{:<44} {:>10}   [{}]",
        "(a) pwrite + fdatasync, one at a time",
        thousands(a),
        fmt_runs(&raw_rates)
    );
    println!(
        "{:<44} {:>10}   [{}]",
        "(a') append + fdatasync (file grows), context",
        thousands(median(&append_rates)),
        fmt_runs(&append_rates)
    );
    println!(
        "{:<44} {:>10}   [{}]",
        "(b) sled insert + flush, one at a time",
        thousands(b),
        fmt_runs(&sled_rates)
    );
    println!();
    println!(
        "{:<10} {:>11} {:>10} {:>9} {:>9} {:>12}   runs",
        "durability", "submitters", "events/s", "vs (a)", "vs (b)", "µs/round*"
    );
    let mut goal = None;
    let mut one = None;
    for (di, d) in durabilities.iter().enumerate() {
        for (si, &s) in SUBMITTERS.iter().enumerate() {
            let r = median(&log_rates[di][si]);
            // With every submitter waiting on its append, a round holds at most
            // `s` events; this is the round time if it holds exactly `s`.
            let round_us = s as f64 / r * 1e6;
            println!(
                "{:<10} {:>11} {:>10} {:>9} {:>9} {:>12.0}   [{}]",
                format!("{d:?}"),
                s,
                thousands(r),
                ratio(r, a),
                ratio(r, b),
                round_us,
                fmt_runs(&log_rates[di][si])
            );
            if *d == Durability::Fsync && s == GOAL_SUBMITTERS {
                goal = Some(r);
            }
            if *d == Durability::Fsync && s == 1 {
                one = Some(r);
            }
        }
    }
    println!(
        "* µs/round = submitters / (events/s): the commit round time if every round holds every submitter"
    );
    println!();
    let g = goal.context("no goal measurement")?;
    let fast = g >= GOAL_RATE;
    let multiple = g / a > GOAL_VS_FSYNC;
    println!(
        "goal (Fsync, {GOAL_SUBMITTERS} submitters): >= {} events/s: {} ({}); > {GOAL_VS_FSYNC}x one-at-a-time fsync: {} ({})",
        thousands(GOAL_RATE),
        thousands(g),
        verdict(fast),
        ratio(g, a),
        verdict(multiple)
    );
    let one = one.context("no one-submitter measurement")?;
    let single = one / a >= GOAL_ONE_VS_FSYNC;
    println!(
        "goal (Fsync, 1 submitter): >= {GOAL_ONE_VS_FSYNC}x one-at-a-time fsync: {} ({})",
        ratio(one, a),
        verdict(single)
    );
    println!("goal overall: {}", verdict(fast && multiple && single));

    for log in &logs {
        log.close();
    }
    drop(sled_db);
    Ok(())
}
