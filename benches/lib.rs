//! Shared helpers for the benchmarks.
//!
//! Every bench is a plain `fn main` (`harness = false`) that measures its
//! baseline in the same run and prints the ratio. Sizes and time windows scale
//! with `REEL_BENCH_SCALE` (default 1.0); `--quick` (after `--` on the cargo
//! command line) or `REEL_BENCH_QUICK=1` shrinks them for a smoke run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;

/// The size multiplier from `REEL_BENCH_SCALE` (default 1.0), times 0.1 in quick mode.
pub fn scale() -> f64 {
    let s = std::env::var("REEL_BENCH_SCALE")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
        .unwrap_or(1.0);
    if quick() { s * 0.1 } else { s }
}

/// Whether `--quick` was passed or `REEL_BENCH_QUICK` is set to something other than `0`.
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--quick")
        || std::env::var("REEL_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `n` scaled by [`scale`], at least `min`.
pub fn scaled(n: u64, min: u64) -> u64 {
    ((n as f64 * scale()).round() as u64).max(min)
}

/// The median of `xs` (the upper one of the middle two for an even count).
///
/// # Panics
///
/// If `xs` is empty.
pub fn median(xs: &[f64]) -> f64 {
    assert!(!xs.is_empty(), "median of nothing");
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of durations.
///
/// # Panics
///
/// If `xs` is empty.
pub fn median_duration(xs: &[Duration]) -> Duration {
    assert!(!xs.is_empty(), "median of nothing");
    let mut v = xs.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// `n` with thousands separators, rounded to an integer.
pub fn thousands(n: f64) -> String {
    let n = n.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// `a / b` formatted as a ratio, e.g. `12.3x`.
pub fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "inf".to_string()
    } else {
        format!("{:.2}x", a / b)
    }
}

/// A duration in milliseconds with three decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// `PASS` or `FAIL`.
pub fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

const TMPFS_MAGIC: u64 = 0x0102_1994;
const RAMFS_MAGIC: u64 = 0x8584_58f6;

/// A scratch directory for bench data on the workspace's disk, removed on drop.
///
/// It lives under `<workspace>/target/bench-data/` (or `$REEL_BENCH_DIR`), never
/// under `/tmp`, which may be a tmpfs where `fdatasync` costs nothing.
#[derive(Debug)]
pub struct BenchDir {
    path: PathBuf,
}

impl BenchDir {
    /// Creates `<base>/<name>-<pid>` fresh, and reports the filesystem it is on.
    pub fn new(name: &str) -> std::io::Result<BenchDir> {
        let base = std::env::var_os("REEL_BENCH_DIR")
            .map_or_else(|| workspace_root().join("target/bench-data"), PathBuf::from);
        let path = base.join(format!("{name}-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        let dir = BenchDir { path };
        let fs = dir.fs_type();
        println!(
            "bench data: {} (filesystem magic {fs:#x})",
            dir.path.display()
        );
        if fs == TMPFS_MAGIC || fs == RAMFS_MAGIC {
            println!(
                "WARNING: bench data is on a RAM filesystem; durability figures are meaningless"
            );
        }
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A subdirectory path (not created).
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn fs_type(&self) -> u64 {
        rustix::fs::statfs(&self.path).map_or(0, |s| s.f_type as u64)
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Total size in bytes of the files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// Release builds of `reel`, `reel-agent` and the process runner, side by side,
/// made by a nested `cargo build --workspace --release` into
/// `target/<target_subdir>` (its own directory: a nested cargo must not wait on,
/// or overwrite, the outer build's). Found by file name, whichever package
/// builds them.
pub struct ReleaseBins {
    /// The directory holding all three.
    pub dir: PathBuf,
    /// The `reel` binary.
    pub reel: PathBuf,
}

impl ReleaseBins {
    /// Builds (or finds up to date) the binaries.
    pub fn build(target_subdir: &str) -> anyhow::Result<ReleaseBins> {
        let target = workspace_root().join("target").join(target_subdir);
        eprintln!("(the first release build takes a few minutes)");
        let started = std::time::Instant::now();
        let dir = reel_test_artefacts::build(
            &target,
            "release",
            &[
                "reel",
                "reel-agent",
                "libreel_runner_process.so",
                "libreel_runner_qemu.so",
            ],
        )?;
        eprintln!("build: {:.1} s", started.elapsed().as_secs_f64());
        Ok(ReleaseBins {
            reel: dir.join("reel"),
            dir,
        })
    }
}

/// Baseline: opening a cleanly closed log's sled db and trees with plain sled
/// and the engine's cache setting, the part of `EventLog::open` that is sled's
/// own (its recovery); returns the time.
pub fn sled_open(state: &Path) -> anyhow::Result<Duration> {
    use anyhow::Context as _;
    let start = std::time::Instant::now();
    let db = sled::Config::new()
        .path(state.join("log"))
        .cache_capacity(reel_engine::store::CACHE_BYTES)
        .flush_every_ms(None)
        .open()
        .context("cannot open the log as a sled db")?;
    let trees = reel_engine::store::TREES.map(|t| db.open_tree(t));
    let took = start.elapsed();
    for t in trees {
        t?;
    }
    Ok(took)
}

/// Fails with the command's stderr when `out` is not a success.
pub fn check_output(out: &std::process::Output, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        out.status.success(),
        "{what}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Removes `path` (a directory) if it exists: a fresh start for one run.
pub fn fresh_dir(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::remove_dir_all(path)?;
    }
    Ok(())
}

/// Median latency of one appended 256-byte `write` + `fdatasync` (the file grows,
/// as sled's log and the journal do): the floor under each durable event.
pub fn fdatasync_latency(path: &Path) -> anyhow::Result<Duration> {
    use anyhow::Context as _;
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let record = [0x5au8; 256];
    let mut lat = Vec::new();
    for _ in 0..60 {
        let t = std::time::Instant::now();
        f.write_all(&record)?;
        f.sync_data()?;
        lat.push(t.elapsed());
    }
    Ok(median_duration(&lat[10..]))
}

/// Peak RSS (VmHWM, KiB) of a process, while it lives.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Opens (creating) the log in `dir` with `Durability::Flush` and appends
/// `jobs` jobs from `builders` concurrent submitters: job `n` is whatever
/// `job(log, n)` appends. Closes the log; returns how many jobs it left live.
pub fn build_log<F, Fut>(dir: &Path, jobs: u64, builders: u64, job: F) -> anyhow::Result<u64>
where
    F: Fn(reel_engine::store::EventLog, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    use reel_engine::store::{Durability, EventLog, LogOptions};
    let log = EventLog::open(
        dir,
        LogOptions {
            durability: Durability::Flush,
        },
    )?;
    let ex = smol::Executor::new();
    let tasks: Vec<_> = (0..builders.min(jobs))
        .map(|b| {
            let (log, job) = (log.clone(), job.clone());
            ex.spawn(async move {
                let mut n = b;
                while n < jobs {
                    job(log.clone(), n).await?;
                    n += builders;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    smol::block_on(ex.run(async {
        for t in tasks {
            t.await?;
        }
        anyhow::Ok(())
    }))?;
    let live = log.live_jobs()?.len() as u64;
    log.close();
    Ok(live)
}

/// How long a daemon ([`Daemon`]) gets to start, and to stop after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `reel serve` (release, from [`ReleaseBins`]), killed if dropped before [`Daemon::stop`].
pub struct Daemon {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The bearer token.
    pub token: String,
    stderr: PathBuf,
}

impl Daemon {
    /// Starts `BINS/reel --state-dir STATE serve --listen 127.0.0.1:0
    /// --plugin-dir BINS ARGS` with `TMPDIR=tmp`, its stderr to `stderr`, and
    /// waits for its endpoint file.
    pub fn start(
        bins: &Path,
        state: &Path,
        tmp: &Path,
        stderr: &Path,
        args: &[&str],
    ) -> anyhow::Result<Daemon> {
        let err = std::fs::File::create(stderr)?;
        let child = Command::new(bins.join("reel"))
            .arg("--state-dir")
            .arg(state)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--plugin-dir"])
            .arg(bins)
            .args(args)
            .env("TMPDIR", tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .context("cannot start reel serve")?;
        let mut d = Daemon {
            child: Some(child),
            addr: String::new(),
            token: String::new(),
            stderr: stderr.to_path_buf(),
        };
        let endpoint = state.join("serve").join("endpoint.json");
        let started = Instant::now();
        loop {
            if let Some(st) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("reel serve exited at start ({st}): {}", d.stderr_tail());
            }
            if let Ok(bytes) = std::fs::read(&endpoint)
                && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
                && let Some(url) = v["url"].as_str()
            {
                d.addr = url.trim_start_matches("http://").to_string();
                break;
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "reel serve did not start in {START_TIMEOUT:?}: {}",
                    d.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        d.token = std::fs::read_to_string(state.join("serve").join("token"))
            .context("cannot read the daemon's token")?
            .trim()
            .to_string();
        Ok(d)
    }

    /// The last 20 lines the daemon wrote on stderr.
    pub fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, then waits for the exit; returns how long that took. On an
    /// error the daemon is killed and waited for by `Drop`.
    pub fn stop(mut self) -> anyhow::Result<Duration> {
        let id = self.child.as_ref().expect("stopped once").id();
        let pid = rustix::process::Pid::from_raw(id as i32).context("pid 0")?;
        let t = Instant::now();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        let status = loop {
            if let Some(st) = self.child.as_mut().expect("stopped once").try_wait()? {
                break st;
            }
            if t.elapsed() > STOP_TIMEOUT {
                bail!(
                    "reel serve did not exit within {STOP_TIMEOUT:?} of SIGTERM (killed): {}",
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = t.elapsed();
        self.child = None;
        ensure!(
            status.success(),
            "reel serve exited {status} after SIGTERM: {}",
            self.stderr_tail()
        );
        Ok(took)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
