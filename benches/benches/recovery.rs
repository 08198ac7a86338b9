//! Recovery after an engine crash, against the size of the log's history.
//!
//! (i) Reattach: 100 live jobs whose sandboxes are really alive. They are started
//!     by a release `reel run -j 100` (one step `sleep 60` each, process runner,
//!     default fsync durability) with `REEL_TEST_CRASH_AT=StepStarted:after:100`,
//!     which SIGKILLs the engine as soon as the 100th `StepStarted` is durable; the
//!     100 agents keep running their steps. Recovery is then driven in-process
//!     through the library, as `reel recover` does it: `EventLog::open` (default
//!     durability, fsync), `plugin::load_dir`, `Executor::new`, then `assess` +
//!     `recover` of every live job concurrently. Measured: open -> every job's
//!     `Reattached` durable (a watcher thread polls `live_state(job).reattached`
//!     every 200 us), with the open itself and the other phases printed
//!     separately. Once the last `Reattached` lands the jobs are cancelled so they
//!     tear down quickly; the teardown is waited for (not measured) and
//!     `<state>/sandboxes` must be empty afterwards. (The process runner drops a
//!     cancel that arrives before a resumed exec has registered; the watcher
//!     re-sends it 2 s later to any job whose step still runs, and says how often.)
//! (ii) Reap: 1,000 live jobs whose sandboxes are dead. They are started like (i),
//!     in rounds of 200 (`reel run -j 200`, crashed at the 200th `StepStarted`),
//!     and after each round every agent (a process whose command line names
//!     `<state>/sandboxes`) is SIGKILLed together with its session, i.e. its
//!     steps. Measured: open -> every job ended `Lost` (its `recover` returned, so
//!     `Reaped` + `Lost` are durable and the sandbox is cleaned up), with
//!     [`UNRELATED`] (5,000) unrelated processes on the host (`sleep`s the bench
//!     starts), and the CPU time the recovering process used (user + system,
//!     from `/proc/self/stat`, log writes included) per reaped job: goal ≤ 1 ms
//!     per job (issue 13, point 5: a job's processes are found from its cgroup,
//!     pidfile and start time, never by scanning the host's processes).
//!
//! With `REEL_BENCH_PERF=FILE`, `perf record -g` is attached to the bench during
//! each reap's recovery alone (from the open to the CPU reading), into `FILE.N`.
//!
//! Both run on a log with 1,000,000 events of history and, as the baseline, on
//! one with 10x less (100,000): finished jobs of 2 steps, 20 events each,
//! appended with `simulate::run_job` by 1,024 concurrent submitters and
//! `Durability::Flush`, then fsynced; build time is printed, not measured.
//! (10,000,000 vs 1,000,000 takes ~4 minutes to build here; set
//! `REEL_BENCH_HISTORY=1000000`, the small log's events, for it.) The engine
//! folds only live jobs, so the ratio big/small should be about 1; it is printed
//! for the whole measurement, for the open alone and for the work after the
//! open. Baselines in
//! the same run: a plain sled open of the same log (after recovery closed it),
//! one fsync'ed append to it, and one `/proc` scan like the process runner's.
//! Each measurement is repeated (alternating the two logs) and medians are
//! printed; every recovered batch is appended to the same log, so each
//! repetition adds a little history (100 or 1,000 jobs), which is negligible.
//!
//! The release binaries are built by a nested `cargo build --release` into
//! `target/recovery-bench` (a separate target dir: the outer cargo holds the build
//! lock of its own). Sizes scale with `REEL_BENCH_SCALE` (history, live jobs);
//! `--quick` shrinks them and runs each measurement once.

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use reel_benches::{
    BenchDir, ReleaseBins, build_log, dir_size, median_duration, ms, quick, ratio, scale, scaled,
    sled_open, thousands,
};
use reel_engine::input::secrets::ResolvedSecrets;
use reel_engine::lifecycle::executor::{Executor, Runners};
use reel_engine::lifecycle::observer::{Cancel, Observer, Report};
use reel_engine::lifecycle::recover::{Action, assess, recover};
use reel_engine::model::event::{Event, JobId, Outcome};
use reel_engine::plugin;
use reel_engine::store::{EventLog, LogOptions};
use reel_engine::testkit::simulate::{self, Ending};

const BUILDERS: u64 = 1024;
/// Steps of each historical job; `simulate::run_job` appends 16 + 2 × steps events.
const HISTORY_STEPS: u32 = 2;
const EVENTS_PER_JOB: u64 = 16 + 2 * HISTORY_STEPS as u64;
/// History of the small (baseline) log in events; the big log has
/// `HISTORY_FACTOR` times more.
const HISTORY_EVENTS: u64 = 100_000;
const HISTORY_FACTOR: u64 = 10;
const REATTACH_JOBS: u64 = 100;
const REAP_JOBS: u64 = 1_000;
/// Jobs per `reel run` when setting up reaped jobs (`-j` allows at most 256).
const REAP_ROUND: u64 = 200;
const REATTACH_RUNS: usize = 5;
const REAP_RUNS: usize = 3;
/// How often the watcher looks for `Reattached`.
const POLL: Duration = Duration::from_micros(200);
/// How long a `reel run` that should crash may take before the bench gives up.
const SETUP_PATIENCE: Duration = Duration::from_secs(120);
/// Unrelated processes on the host while jobs are reaped.
const UNRELATED: usize = 5_000;
/// Goal: reel's own CPU time per reaped job.
const REAP_CPU_GOAL: Duration = Duration::from_millis(1);
/// Throwaway jobs whose appends time the log's fsync latency (3 appends each).
const APPEND_PROBES: usize = 5;

/// The release binaries, side by side.
struct Bins {
    dir: PathBuf,
    reel: PathBuf,
}

impl Bins {
    fn build() -> anyhow::Result<Bins> {
        let b = ReleaseBins::build("recovery-bench")?;
        Ok(Bins {
            dir: b.dir,
            reel: b.reel,
        })
    }
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// `(session, start time)` of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: i32) -> Option<(i32, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields resume after the last ')': state (3), ppid, pgrp, session (6) … starttime (22).
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    Some((fields.get(3)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cmdline_contains(pid: i32, needle: &[u8]) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|b| !needle.is_empty() && b.windows(needle.len()).any(|w| w == needle))
}

/// The live processes whose command line contains `needle`, and every process in
/// a session such a process leads (an agent's steps).
fn processes_of(needle: &Path) -> Vec<i32> {
    let needle = needle.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    let my_session = proc_stat(me).map_or(-1, |(s, _)| s);
    let pids = all_pids();
    let mut found = Vec::new();
    let mut sessions = Vec::new();
    for &pid in &pids {
        if pid != me && cmdline_contains(pid, needle) {
            found.push(pid);
            if let Some((sid, _)) = proc_stat(pid)
                && sid == pid
                && sid != my_session
            {
                sessions.push(sid);
            }
        }
    }
    for &pid in &pids {
        if pid != me
            && !found.contains(&pid)
            && proc_stat(pid).is_some_and(|(sid, _)| sessions.contains(&sid))
        {
            found.push(pid);
        }
    }
    found.retain(|&p| proc_stat(p).is_some());
    found
}

/// SIGKILLs [`processes_of`] `needle` until none is left (or 10 s pass); returns
/// how many were signalled.
fn kill_all(needle: &Path) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut signalled = std::collections::BTreeSet::new();
    loop {
        let left = processes_of(needle);
        if left.is_empty() || Instant::now() > deadline {
            return signalled.len();
        }
        for pid in left {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
            signalled.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills whatever a failed run left under the bench directory (agents and their
/// steps), before `BenchDir` removes it.
struct ProcessGuard(PathBuf);

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let n = kill_all(&self.0);
        if n > 0 {
            eprintln!("killed {n} leftover process(es) under {}", self.0.display());
        }
    }
}

// ---------------------------------------------------------------------------
// Building the logs
// ---------------------------------------------------------------------------

/// Appends `jobs` finished jobs (20 events each; one in 10 fails) to the log in `dir`.
fn build_history(dir: &Path, jobs: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let live = build_log(dir, jobs, BUILDERS, |log, n| async move {
        let cid = u32::try_from(n % 60_000).unwrap_or(0) + 1_000;
        let ending = if n % 10 == 9 {
            Ending::FailAt(HISTORY_STEPS - 1)
        } else {
            Ending::Success
        };
        let spec = simulate::spec(&format!("history-{n}"), HISTORY_STEPS);
        simulate::run_job(&log, spec, cid, ending).await?;
        Ok(())
    })?;
    ensure!(live == 0, "the history left {live} live jobs");
    let took = start.elapsed();
    // Built with Flush, the journal was never synced: push everything to disk now,
    // as an engine running with fsync would have, so that the first fsync of a
    // measured recovery does not write back the whole history.
    let synced = Instant::now();
    sync_tree(dir)?;
    let synced = synced.elapsed();
    let events = jobs * EVENTS_PER_JOB;
    println!(
        "built {} finished jobs, {} events in {:.1} s ({} events/s, Flush, {BUILDERS} submitters), synced in {:.1} s; {:.0} MiB on disk",
        thousands(jobs as f64),
        thousands(events as f64),
        took.as_secs_f64(),
        thousands(events as f64 / took.as_secs_f64()),
        synced.as_secs_f64(),
        dir_size(dir) as f64 / f64::from(1 << 20)
    );
    Ok(())
}

/// `fsync`s every file under `dir`, and the directories.
fn sync_tree(dir: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// One-step job files running `command`, `n` of them, in `dir`.
fn job_files(dir: &Path, n: u64, command: &str) -> anyhow::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    (1..=n)
        .map(|i| {
            let f = dir.join(format!("j{i}.yml"));
            fs::write(
                &f,
                format!("name: live-{i}\nsteps:\n  - name: step\n    command: \"{command}\"\n"),
            )
            .with_context(|| format!("cannot write {}", f.display()))?;
            Ok(f)
        })
        .collect()
}

/// Runs `files` with a release `reel run -j N` that SIGKILLs itself right after
/// the N-th `StepStarted` is durable, leaving N jobs live with their agents running.
fn run_and_crash(bins: &Bins, state: &Path, files: &[PathBuf]) -> anyhow::Result<Duration> {
    let n = files.len();
    let err_path = state.with_extension("reel-run.stderr");
    let err = fs::File::create(&err_path)?;
    let started = Instant::now();
    let mut child = Command::new(&bins.reel)
        .arg("--state-dir")
        .arg(state)
        .arg("run")
        .arg("--plugin-dir")
        .arg(&bins.dir)
        .args(["-q", "-j", &n.to_string()])
        .args(files)
        .env("REEL_TEST_CRASH_AT", format!("StepStarted:after:{n}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .context("cannot start reel")?;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if started.elapsed() > SETUP_PATIENCE {
            let _ = child.kill();
            let _ = child.wait();
            bail!("reel run did not crash within {SETUP_PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    ensure!(
        status.signal() == Some(9),
        "reel run should have been SIGKILLed at the {n}th StepStarted, but {status}: {}",
        stderr.trim()
    );
    Ok(took)
}

// ---------------------------------------------------------------------------
// Recovery
// ---------------------------------------------------------------------------

struct Quiet;

impl Observer for Quiet {
    fn report(&self, _: Report<'_>) {}
}

static QUIET: Quiet = Quiet;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Reattach,
    Reap,
}

/// What one recovery took, each from the start of `EventLog::open`.
struct Sample {
    /// `EventLog::open`.
    open: Duration,
    /// Plus `plugin::load_dir`, `Executor::new` and `live_jobs()`.
    ready: Duration,
    /// Every job assessed (its sandbox probed).
    assessed: Duration,
    /// The median job done (reattached / ended lost).
    median_job: Duration,
    /// Every job done: the measurement.
    done: Duration,
    /// `done - ready`: the recovery work after the log is open.
    after_open: Duration,
    /// Reattach only: every job torn down after the cancel.
    teardown: Duration,
    /// Reattach only: jobs whose step still ran 2 s after the cancel (cancel re-sent).
    recancelled: usize,
    /// Baseline: one fsync'ed append to this log, after the recovery.
    append: Duration,
    /// Baseline: plain sled open of the log, after the recovery closed it.
    sled_open: Duration,
    /// CPU time (user + system) of this process from open to every job done.
    cpu: Duration,
    /// Of which until `ready` (the log's open and fold, the plugins' load).
    cpu_ready: Duration,
}

/// This process's CPU time so far (user + system, and that of waited-for
/// children), from `/proc/self/stat` (clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let text = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    // Fields after the command: state is field 3; utime, stime, cutime, cstime
    // are 14 to 17.
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// `n` processes unrelated to reel (`sleep 3600`), killed when dropped.
struct Unrelated(Vec<std::process::Child>);

impl Unrelated {
    fn start(n: usize) -> anyhow::Result<Unrelated> {
        let mut children = Vec::with_capacity(n);
        for _ in 0..n {
            children.push(
                Command::new("sleep")
                    .arg("3600")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting an unrelated process")?,
            );
        }
        Ok(Unrelated(children))
    }
}

impl Drop for Unrelated {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn recover_all(bins: &Bins, state: &Path, mode: Mode, expect: usize) -> anyhow::Result<Sample> {
    let profile = Profile::start(mode);
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let log = EventLog::open(state, LogOptions::default())?;
    let open = t0.elapsed();
    let plugins = plugin::load_dir(&bins.dir);
    let ex = Arc::new(Executor::new(
        log.clone(),
        Runners::new(plugins, state.join("sandboxes"), Default::default()),
    )?);
    let live = log.live_jobs()?;
    let ready = t0.elapsed();
    let cpu_ready = cpu_time().saturating_sub(cpu0);
    ensure!(
        live.len() == expect,
        "{} live jobs, expected {expect}",
        live.len()
    );
    let cancel = Cancel::default();
    let finished = Arc::new(AtomicBool::new(false));
    let watcher = (mode == Mode::Reattach).then(|| {
        let (ex, cancel, finished, live) =
            (ex.clone(), cancel.clone(), finished.clone(), live.clone());
        std::thread::spawn(move || watch_reattached(&ex, &cancel, &finished, live, t0))
    });
    let tasks: Vec<_> = live
        .iter()
        .map(|&job| {
            let (ex, cancel) = (ex.clone(), cancel.clone());
            smol::spawn(async move {
                let state = ex
                    .log()
                    .live_state(job)
                    .with_context(|| format!("job {job} is not live"))?;
                let a = assess(ex.runners(), ex.log(), &state).await;
                let assessed = t0.elapsed();
                let action = a.action.clone();
                let outcome = recover(&ex, &a, &Ok(ResolvedSecrets::default()), &cancel, &QUIET)
                    .await
                    .with_context(|| format!("recovering job {job}"))?;
                anyhow::Ok((job, action, assessed, outcome, t0.elapsed()))
            })
        })
        .collect();
    let results = smol::block_on(async {
        let mut v = Vec::new();
        for t in tasks {
            v.push(t.await);
        }
        v
    });
    finished.store(true, Ordering::SeqCst);
    let all_done = t0.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    drop(profile);
    let watched = watcher
        .map(|w| {
            w.join()
                .map_err(|_| anyhow::anyhow!("the watcher panicked"))
        })
        .transpose()?;
    let mut assessed = Duration::ZERO;
    let mut ends = Vec::new();
    for r in results {
        let (job, action, at, outcome, end) = r?;
        assessed = assessed.max(at);
        ends.push(end);
        match mode {
            Mode::Reattach => ensure!(
                matches!(action, Action::Reattach { .. }) && outcome == Some(Outcome::Cancelled),
                "job {job}: {action:?}, ended {outcome:?}; expected a reattach, then cancelled"
            ),
            Mode::Reap => ensure!(
                matches!(action, Action::Reap { .. }) && outcome == Some(Outcome::Lost),
                "job {job}: {action:?}, ended {outcome:?}; expected a reap, ended lost"
            ),
        }
    }
    let left = log.live_jobs()?.len();
    ensure!(left == 0, "{left} jobs are still live after recovery");
    let append = append_latency(&log)?;
    drop(ex);
    log.close();
    drop(log);
    let sandboxes = state.join("sandboxes");
    let remaining = fs::read_dir(&sandboxes).map_or(0, Iterator::count);
    ensure!(
        remaining == 0,
        "{remaining} sandbox(es) left in {}",
        sandboxes.display()
    );
    let left = processes_of(&sandboxes);
    ensure!(left.is_empty(), "processes {left:?} of sandboxes survived");
    let sled_open = sled_open(state)?;
    let (median_job, done, teardown, recancelled) = match (mode, watched) {
        (Mode::Reattach, Some(w)) => {
            let w = w?;
            (w.median, w.all, all_done, w.recancelled)
        }
        _ => (median_duration(&ends), all_done, Duration::ZERO, 0),
    };
    Ok(Sample {
        open,
        ready,
        assessed,
        median_job,
        done,
        after_open: done.saturating_sub(ready),
        teardown,
        recancelled,
        append,
        sled_open,
        cpu,
        cpu_ready,
    })
}

/// Baseline: one pass over `/proc` reading every process's `stat` and
/// `cmdline`, as the process runner does to find a job's processes.
fn proc_scan() -> Duration {
    let times: Vec<Duration> = (0..20)
        .map(|_| {
            let start = Instant::now();
            let mut n = 0usize;
            for pid in all_pids() {
                n += usize::from(proc_stat(pid).is_some());
                n += usize::from(cmdline_contains(pid, b"--socket"));
            }
            std::hint::black_box(n);
            start.elapsed()
        })
        .collect();
    median_duration(&times)
}

/// Median latency of one fsync'ed append to the open, idle log (baseline): a
/// throwaway job is submitted, queued and ended, `APPEND_PROBES` times.
fn append_latency(log: &EventLog) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    smol::block_on(async {
        for _ in 0..APPEND_PROBES {
            let job = log.submit(simulate::spec("append-probe", 1)).await?;
            for event in [
                Event::Queued {},
                Event::TeardownStarted {
                    outcome: Outcome::Cancelled,
                    reason: "probe".into(),
                },
                Event::terminal(Outcome::Cancelled, "probe".into()),
            ] {
                let t = Instant::now();
                log.append(job, event).await?;
                times.push(t.elapsed());
            }
        }
        anyhow::Ok(())
    })?;
    Ok(median_duration(&times))
}

struct Watched {
    median: Duration,
    all: Duration,
    recancelled: usize,
}

/// Polls until every job in `live` is reattached, then cancels them; re-sends the
/// cancel to jobs whose step still runs 2 s later. Gives up when `finished`.
fn watch_reattached(
    ex: &Executor,
    cancel: &Cancel,
    finished: &AtomicBool,
    mut pending: Vec<JobId>,
    t0: Instant,
) -> anyhow::Result<Watched> {
    let log = ex.log();
    let mut times = Vec::new();
    let jobs = pending.clone();
    while !pending.is_empty() {
        if finished.load(Ordering::SeqCst) {
            bail!("{} job(s) ended without being reattached", pending.len());
        }
        pending.retain(|&j| {
            let done = log.live_state(j).is_some_and(|s| s.reattached);
            if done {
                times.push(t0.elapsed());
            }
            !done
        });
        if !pending.is_empty() {
            std::thread::sleep(POLL);
        }
    }
    let all = t0.elapsed();
    cancel.cancel("benchmark: every job is reattached");
    // The process runner drops a cancel that arrives before the resumed exec has
    // registered with it; re-send it to any job whose step is still running.
    let mut recancelled = 0;
    let mut resent = false;
    let resend_at = Instant::now() + Duration::from_secs(2);
    while !finished.load(Ordering::SeqCst) {
        if !resent && Instant::now() >= resend_at {
            resent = true;
            let runner = ex.runner("process")?;
            for &j in &jobs {
                let Some(s) = log.live_state(j) else { continue };
                if let (Some(step), Some(h)) = (s.running_step(), s.handle.as_ref()) {
                    let h = plugin::Handle {
                        version: h.version,
                        bytes: h.bytes.clone(),
                    };
                    let _ = runner.cancel(&h, step.exec_id);
                    recancelled += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Watched {
        median: median_duration(&times),
        all,
        recancelled,
    })
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

struct Log {
    name: &'static str,
    state: PathBuf,
    events: u64,
    jobs_dir: PathBuf,
}

/// Reattach: start `n` real jobs, crash the engine, recover.
fn reattach_once(bins: &Bins, log: &Log, files: &[PathBuf]) -> anyhow::Result<(Sample, Duration)> {
    let setup = run_and_crash(bins, &log.state, files)?;
    let s = recover_all(bins, &log.state, Mode::Reattach, files.len())?;
    Ok((s, setup))
}

/// Reap: start `n` real jobs in rounds, crash the engine and kill every agent
/// after each round, recover.
/// With `REEL_BENCH_PERF=FILE`, `perf record -g` of this process during each
/// reap's recovery alone (appended to `FILE.N`), to see where its CPU goes.
struct Profile(Option<std::process::Child>);

impl Profile {
    fn start(mode: Mode) -> Profile {
        static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let Some(file) = std::env::var_os("REEL_BENCH_PERF").filter(|_| mode == Mode::Reap) else {
            return Profile(None);
        };
        let n = RUN.fetch_add(1, Ordering::SeqCst);
        let mut out = file;
        out.push(format!(".{n}"));
        let child = std::process::Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "2000", "-g", "-p"])
            .arg(std::process::id().to_string())
            .arg("-o")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| eprintln!("cannot start perf: {e}"))
            .ok();
        // perf needs a moment to attach.
        std::thread::sleep(Duration::from_millis(500));
        Profile(child)
    }
}

impl Drop for Profile {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&child),
                rustix::process::Signal::INT,
            );
            let _ = child.wait();
        }
    }
}

fn reap_once(
    bins: &Bins,
    log: &Log,
    rounds: &[Vec<PathBuf>],
    n: usize,
) -> anyhow::Result<(Sample, Duration)> {
    let started = Instant::now();
    let sandboxes = log.state.join("sandboxes");
    for files in rounds {
        run_and_crash(bins, &log.state, files)?;
        kill_all(&sandboxes);
    }
    let setup = started.elapsed();
    let s = recover_all(bins, &log.state, Mode::Reap, n)?;
    Ok((s, setup))
}

fn med(samples: &[Sample], f: impl Fn(&Sample) -> Duration) -> Duration {
    median_duration(&samples.iter().map(f).collect::<Vec<_>>())
}

fn list(samples: &[Sample], f: impl Fn(&Sample) -> Duration) -> String {
    samples
        .iter()
        .map(|s| format!("{:.1}", f(s).as_secs_f64() * 1e3))
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(
    title: &str,
    what: &str,
    logs: &[Log],
    samples: &HashMap<&'static str, Vec<Sample>>,
    setups: &HashMap<&'static str, Vec<Duration>>,
) {
    println!();
    println!("{title}");
    println!(
        "{:<26} {:>11} {:>12} {:>13} {:>12} {:>15} {:>12}   runs of the total (ms)",
        "history", "open", "+exec ready", "all assessed", "median job", what, "after open"
    );
    for log in logs {
        let s = &samples[log.name];
        println!(
            "{:<26} {:>11} {:>12} {:>13} {:>12} {:>15} {:>12}   [{}]",
            format!("{} ({} events)", log.name, thousands(log.events as f64)),
            ms(med(s, |x| x.open)),
            ms(med(s, |x| x.ready)),
            ms(med(s, |x| x.assessed)),
            ms(med(s, |x| x.median_job)),
            ms(med(s, |x| x.done)),
            ms(med(s, |x| x.after_open)),
            list(s, |x| x.done)
        );
    }
    for log in logs {
        let s = &samples[log.name];
        let extra = if s.iter().any(|x| x.teardown > Duration::ZERO) {
            format!(
                "; teardown after cancel done at {} (median), cancel re-sent to {} job(s) in all runs",
                ms(med(s, |x| x.teardown)),
                s.iter().map(|x| x.recancelled).sum::<usize>()
            )
        } else {
            String::new()
        };
        println!(
            "  {}: open runs [{}] ms; baselines: plain sled open of the closed log {}, one fsync'ed append {}; setup (reel run + crash) median {:.1} s{extra}",
            log.name,
            list(s, |x| x.open),
            ms(med(s, |x| x.sled_open)),
            ms(med(s, |x| x.append)),
            median_duration(&setups[log.name]).as_secs_f64()
        );
    }
    let (small, big) = (&samples[logs[0].name], &samples[logs[1].name]);
    let min = |v: &[Sample]| v.iter().map(|x| x.done).min().unwrap_or_default();
    println!(
        "ratio big/small history ({}x the events): {} {what} (min of runs {}); open alone {}; after open {}",
        logs[1].events / logs[0].events.max(1),
        ratio(
            med(big, |x| x.done).as_secs_f64(),
            med(small, |x| x.done).as_secs_f64()
        ),
        ratio(min(big).as_secs_f64(), min(small).as_secs_f64()),
        ratio(
            med(big, |x| x.open).as_secs_f64(),
            med(small, |x| x.open).as_secs_f64()
        ),
        ratio(
            med(big, |x| x.after_open).as_secs_f64(),
            med(small, |x| x.after_open).as_secs_f64()
        ),
    );
}

fn main() -> anyhow::Result<()> {
    let bins = Bins::build()?;
    let small_events = std::env::var("REEL_BENCH_HISTORY")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| scaled(HISTORY_EVENTS, 20 * EVENTS_PER_JOB))
        .max(EVENTS_PER_JOB);
    let small_jobs = small_events / EVENTS_PER_JOB;
    let big_jobs = small_jobs * HISTORY_FACTOR;
    let reattach_n = scaled(REATTACH_JOBS, 4).min(256);
    let reap_n = scaled(REAP_JOBS, 10);
    let (reattach_runs, reap_runs) = if quick() {
        (1, 1)
    } else {
        (REATTACH_RUNS, REAP_RUNS)
    };
    println!(
        "sizes: history {} and {} events ({} and {} finished jobs of {EVENTS_PER_JOB} events); \
         {reattach_n} jobs reattached, {reap_n} jobs reaped (set up in rounds of {}); \
         medians of {reattach_runs} and {reap_runs} runs (scale {}{})",
        thousands((small_jobs * EVENTS_PER_JOB) as f64),
        thousands((big_jobs * EVENTS_PER_JOB) as f64),
        thousands(small_jobs as f64),
        thousands(big_jobs as f64),
        REAP_ROUND.min(reap_n),
        scale(),
        if quick() { ", quick" } else { "" }
    );
    let dir = BenchDir::new("recovery")?;
    let _guard = ProcessGuard(dir.path().to_path_buf());
    let started = Instant::now();
    let logs = [
        Log {
            name: "small",
            state: dir.join("small"),
            events: small_jobs * EVENTS_PER_JOB,
            jobs_dir: dir.join("jobs-small"),
        },
        Log {
            name: "big",
            state: dir.join("big"),
            events: big_jobs * EVENTS_PER_JOB,
            jobs_dir: dir.join("jobs-big"),
        },
    ];
    build_history(&logs[0].state, small_jobs)?;
    build_history(&logs[1].state, big_jobs)?;

    // (i) reattach.
    let mut samples: HashMap<&'static str, Vec<Sample>> = HashMap::new();
    let mut setups: HashMap<&'static str, Vec<Duration>> = HashMap::new();
    for run in 0..reattach_runs {
        for i in 0..2 {
            let log = &logs[(i + run) % 2];
            let files = job_files(&log.jobs_dir.join("reattach"), reattach_n, "sleep 60")?;
            let (s, setup) = reattach_once(&bins, log, &files)
                .with_context(|| format!("reattach on the {} log", log.name))?;
            eprintln!(
                "reattach {} run {}: {} (open {})",
                log.name,
                run + 1,
                ms(s.done),
                ms(s.open)
            );
            samples.entry(log.name).or_default().push(s);
            setups.entry(log.name).or_default().push(setup);
        }
    }
    report(
        &format!(
            "(i) reattach {reattach_n} live jobs with running agents: open -> all `Reattached` durable, median of {reattach_runs}"
        ),
        "all reattached",
        &logs,
        &samples,
        &setups,
    );

    // (ii) reap, with unrelated processes on the host.
    let unrelated = Unrelated::start(UNRELATED)?;
    let mut samples: HashMap<&'static str, Vec<Sample>> = HashMap::new();
    let mut setups: HashMap<&'static str, Vec<Duration>> = HashMap::new();
    for run in 0..reap_runs {
        for i in 0..2 {
            let log = &logs[(i + run) % 2];
            let mut rounds = Vec::new();
            let mut made = 0;
            while made < reap_n {
                let k = REAP_ROUND.min(reap_n - made);
                let d = log.jobs_dir.join(format!("reap-{}", rounds.len()));
                rounds.push(job_files(&d, k, "sleep 600")?);
                made += k;
            }
            let (s, setup) = reap_once(&bins, log, &rounds, reap_n as usize)
                .with_context(|| format!("reap on the {} log", log.name))?;
            eprintln!(
                "reap {} run {}: {} (open {})",
                log.name,
                run + 1,
                ms(s.done),
                ms(s.open)
            );
            samples.entry(log.name).or_default().push(s);
            setups.entry(log.name).or_default().push(setup);
        }
    }
    let scan = proc_scan();
    drop(unrelated);
    println!(
        "baseline: one /proc scan (stat + cmdline of {} processes) {}; the process runner scans /proc to probe a dead agent and in each kill_all (poweroff, cleanup)",
        all_pids().len(),
        ms(scan)
    );
    report(
        &format!(
            "(ii) reap {reap_n} live jobs whose agents were SIGKILLed: open -> all `Lost` durable and cleaned up, median of {reap_runs}"
        ),
        "all lost",
        &logs,
        &samples,
        &setups,
    );
    let per_job: Vec<Duration> = samples
        .values()
        .flatten()
        .map(|s| s.cpu / reap_n.max(1) as u32)
        .collect();
    let cpu = median_duration(&per_job);
    let ready_per_job = median_duration(
        &samples
            .values()
            .flatten()
            .map(|s| s.cpu_ready / reap_n.max(1) as u32)
            .collect::<Vec<_>>(),
    );
    println!(
        "(ii) reel's CPU per reaped job with {UNRELATED} unrelated processes on the host: {:.3} ms \
         (median of {} runs, [{}] ms; log writes included; of which the open and plugin load \
         {:.3} ms); against one /proc scan {}: {}; \
         goal <= {} ms per job: {}",
        cpu.as_secs_f64() * 1e3,
        per_job.len(),
        per_job
            .iter()
            .map(|d| format!("{:.3}", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", "),
        ready_per_job.as_secs_f64() * 1e3,
        ms(scan),
        ratio(cpu.as_secs_f64(), scan.as_secs_f64()),
        REAP_CPU_GOAL.as_millis(),
        if cpu <= REAP_CPU_GOAL { "PASS" } else { "FAIL" }
    );
    println!();
    println!(
        "total bench time {:.0} s (history build included)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
