//! `reel serve` end to end: N trivial jobs (one step `true`) submitted over HTTP
//! by 8 concurrent clients to a real daemon, against `reel run -j 8` of the same
//! job files.
//!
//! The daemon is the release `reel` beside `reel-agent` and the process runner
//! plugin (`reel_test_artefacts::dir_with`), full durability (`--durability
//! fsync`), a fresh state directory on the workspace's disk, and a budget of
//! exactly 8 default requests (the process runner's jobs ask for nothing, so each
//! is charged the default 512 MiB / 1 vCPU / 1 GiB: `--vcpus 8 --memory 4G --disk
//! 8G`), so 8 jobs run at once as with `-j 8`. Each client is a thread with its
//! own keep-alive HTTP/1.1 connection (plain `std::net::TcpStream`, one request
//! in flight, `TCP_NODELAY`); the clients take job files from a shared counter
//! until all N are submitted.
//!
//! Measured: jobs/s from the first submit (the first request written) to the
//! last job's end (the largest `finished_ms` of `GET /v1/jobs?state=ended`, the
//! time of its terminal event), and each `POST /v1/jobs` → `202` latency (p50,
//! p99). While the jobs run, one more connection polls `GET /metrics` (the
//! ended-job counters, read from memory) every 100 ms to see when all have ended;
//! the listing of every ended job is fetched once, at the end. Baseline in the
//! same run: `reel run -j 8 f1.yml … fN.yml`, one process, a fresh state
//! directory, its wall time (which also holds its process start, log open,
//! plugin load and exit: the daemon's start is not counted, it is long-lived).
//!
//! Goals: serve reaches at least 0.8x `reel run -j 8`'s jobs/s (the daemon must
//! not cost throughput), and p99 submit latency < 100 ms. For attribution: the
//! jobs' mean Submitted → Queued, queue wait and run time from the listing, the
//! daemon's mean event-append latency and group-commit round size from
//! `/metrics`, one `POST` timed alone on an idle daemon, and one `write +
//! fdatasync` append timed on the same disk (a submit waits for two durable
//! appends: `Submitted`, then `Queued`).
//!
//! Medians over 3 runs, interleaved with the baseline; `REEL_BENCH_QUICK=1` (or
//! `--quick`): 1 run of 200 jobs. The daemon is stopped with SIGTERM and waited
//! for after each run.

use std::fs;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use reel_benches::{
    BenchDir, Daemon, check_output, fdatasync_latency, fresh_dir, median, median_duration, ms,
    quick, ratio, verdict,
};
use serde_json::Value;

const JOBS: u64 = 1000;
const QUICK_JOBS: u64 = 200;
const RUNS: usize = 3;
const CLIENTS: usize = 8;
const PARALLEL: usize = 8;
/// serve's jobs/s must reach this fraction of `reel run -j 8`'s.
const GOAL_VS_RUN: f64 = 0.8;
const GOAL_P99: Duration = Duration::from_millis(100);
/// How often the metrics are polled while jobs run.
const POLL: Duration = Duration::from_millis(100);
/// Uncontended `POST`s timed one at a time on an idle daemon.
const ALONE: usize = 10;
/// The largest response head read.
const MAX_HEAD: usize = 64 << 10;

fn job_text(i: u64) -> String {
    format!("name: trivial-{i}\nsteps:\n  - name: step\n    command: \"true\"\n")
}

/// The `q`-quantile (0..=1) of sorted durations, nearest rank.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One keep-alive HTTP/1.1 connection to the daemon, one request at a time.
struct Conn {
    addr: String,
    token: String,
    stream: Option<BufReader<TcpStream>>,
    /// Connections opened after the first (the server closed the previous one).
    reconnects: u64,
}

struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "the answer ({}) is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

impl Conn {
    fn open(addr: &str, token: &str) -> anyhow::Result<Conn> {
        let mut c = Conn {
            addr: addr.to_string(),
            token: token.to_string(),
            stream: None,
            reconnects: 0,
        };
        c.connect()?;
        Ok(c)
    }

    fn connect(&mut self) -> anyhow::Result<()> {
        let s = TcpStream::connect(&self.addr)
            .with_context(|| format!("cannot connect to {}", self.addr))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        self.stream = Some(BufReader::new(s));
        Ok(())
    }

    /// Sends one request (head and body in one write) and reads the whole answer.
    fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &str,
        body: &[u8],
    ) -> anyhow::Result<Answer> {
        if self.stream.is_none() {
            self.connect()?;
            self.reconnects += 1;
        }
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n{headers}",
            self.addr, self.token
        );
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        let stream = self.stream.as_mut().expect("connected above");
        stream.get_mut().write_all(&bytes)?;

        let mut head = String::new();
        let mut line = String::new();
        let (mut length, mut chunked, mut close) = (None, false, false);
        let mut status = None;
        loop {
            line.clear();
            let n = stream.read_line(&mut line)?;
            ensure!(n > 0, "the daemon closed the connection mid-answer");
            head.push_str(&line);
            ensure!(head.len() <= MAX_HEAD, "the answer's head is too long");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if status.is_none() {
                let code = l.split_whitespace().nth(1).unwrap_or("");
                status = Some(
                    code.parse::<u16>()
                        .with_context(|| format!("bad status line {l:?}"))?,
                );
                continue;
            }
            if let Some((name, value)) = l.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                match name.as_str() {
                    "content-length" => length = Some(value.parse::<usize>()?),
                    "transfer-encoding" => {
                        chunked = value.to_ascii_lowercase().contains("chunked");
                    }
                    "connection" => close = value.eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let status = status.context("no status line")?;
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                stream.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .with_context(|| format!("bad chunk size {line:?}"))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    loop {
                        line.clear();
                        stream.read_line(&mut line)?;
                        if line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                stream.read_exact(&mut body[start..])?;
                let mut crlf = [0u8; 2];
                stream.read_exact(&mut crlf)?;
            }
        } else if let Some(n) = length {
            body.resize(n, 0);
            stream.read_exact(&mut body)?;
        } else if status != 204 && status != 304 {
            // No length: the body runs to the end of the connection.
            stream.read_to_end(&mut body)?;
            close = true;
        }
        if close {
            self.stream = None;
        }
        Ok(Answer { status, body })
    }

    fn get(&mut self, target: &str) -> anyhow::Result<Answer> {
        self.request("GET", target, "", &[])
    }

    fn submit(&mut self, i: u64, text: &[u8]) -> anyhow::Result<(Duration, u64)> {
        let t = Instant::now();
        let a = self.request(
            "POST",
            &format!("/v1/jobs?owner=bench&file=f{i}.yml"),
            "Content-Type: application/yaml\r\n",
            text,
        )?;
        let took = t.elapsed();
        ensure!(
            a.status == 202,
            "POST /v1/jobs (f{i}.yml): {} {}",
            a.status,
            a.text()
        );
        let job = a.json()?["job"].as_u64().context("the 202 names no job")?;
        Ok((took, job))
    }
}

/// `reel_jobs_ended_total` summed over outcomes, the mean event-append latency
/// (s) and the mean group-commit round size, from `/metrics`.
struct Metrics {
    ended: u64,
    append_mean_s: f64,
    round_mean: f64,
}

fn metrics(conn: &mut Conn) -> anyhow::Result<Metrics> {
    let a = conn.get("/metrics")?;
    ensure!(a.status == 200, "GET /metrics: {} {}", a.status, a.text());
    let text = String::from_utf8_lossy(&a.body);
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mean = |sum: f64, count: f64| if count > 0.0 { sum / count } else { 0.0 };
    Ok(Metrics {
        ended: value("reel_jobs_ended_total") as u64,
        append_mean_s: mean(
            value("reel_event_append_seconds_sum"),
            value("reel_event_append_seconds_count"),
        ),
        round_mean: mean(
            value("reel_log_round_requests_sum"),
            value("reel_log_round_requests_count"),
        ),
    })
}

/// A new connection to `d`, with one request made on it: a connection's first
/// request head must come within 10 s of its accept, a later one may come
/// after up to 60 s idle (docs/api.md, Limits).
fn conn(d: &Daemon) -> anyhow::Result<Conn> {
    let mut c = Conn::open(&d.addr, &d.token)?;
    let a = c.get("/healthz")?;
    ensure!(a.status == 200, "GET /healthz: {} {}", a.status, a.text());
    Ok(c)
}

/// One serve run's figures.
struct ServeRun {
    jobs_per_s: f64,
    /// First submit → last job ended.
    wall: Duration,
    /// First submit → the poll that saw every job ended.
    observed: Duration,
    /// First submit → last 202.
    submit_span: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// Mean ms: Submitted → Queued, Queued → SlotGranted, SlotGranted → end.
    to_queued_ms: f64,
    wait_ms: f64,
    run_ms: f64,
    append_mean_s: f64,
    round_mean: f64,
    polls: u64,
    reconnects: u64,
    alone: Duration,
    stop: Duration,
}

fn serve_run(
    bins: &Path,
    state: &Path,
    tmp: &Path,
    stderr: &Path,
    texts: &[Vec<u8>],
) -> anyhow::Result<ServeRun> {
    let n = texts.len() as u64;
    let daemon = Daemon::start(
        bins,
        state,
        tmp,
        stderr,
        &[
            "--durability",
            "fsync",
            "--vcpus",
            &PARALLEL.to_string(),
            "--memory",
            &format!("{}M", 512 * PARALLEL),
            "--disk",
            &format!("{}M", 1024 * PARALLEL),
            "--drain",
            "30s",
        ],
    )?;
    let mut poller = conn(&daemon)?;
    // Each connection made one request already: accepted and warm before the clock starts.
    let mut clients = (0..CLIENTS)
        .map(|_| conn(&daemon))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let (ref_instant, ref_unix_ms) = (Instant::now(), reel_engine::time::now_ms());
    let next = AtomicU64::new(0);
    let barrier = std::sync::Barrier::new(CLIENTS);
    let results = std::thread::scope(|s| {
        let workers: Vec<_> = clients
            .iter_mut()
            .map(|c| {
                let (next, barrier) = (&next, &barrier);
                s.spawn(
                    move || -> anyhow::Result<(Vec<Duration>, Instant, Instant)> {
                        let mut lat = Vec::new();
                        barrier.wait();
                        let first = Instant::now();
                        let mut last = first;
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= n {
                                break;
                            }
                            let (took, _job) = c.submit(i + 1, &texts[i as usize])?;
                            lat.push(took);
                            last = Instant::now();
                        }
                        Ok((lat, first, last))
                    },
                )
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let first = results.iter().map(|r| r.1).min().context("no clients")?;
    let last_202 = results.iter().map(|r| r.2).max().context("no clients")?;
    let mut lat: Vec<Duration> = results.into_iter().flat_map(|r| r.0).collect();
    lat.sort();
    ensure!(
        lat.len() as u64 == n,
        "{} of {n} submits answered",
        lat.len()
    );

    // Every job submitted: wait for them all to end.
    let deadline = Duration::from_secs(120) + Duration::from_millis(100) * n as u32;
    let mut polls = 0;
    let observed = loop {
        let m = metrics(&mut poller)?;
        polls += 1;
        if m.ended >= n {
            break first.elapsed();
        }
        if first.elapsed() > deadline {
            bail!(
                "only {} of {n} jobs ended within {deadline:?}: {}",
                m.ended,
                daemon.stderr_tail()
            );
        }
        std::thread::sleep(POLL);
    };
    let m = metrics(&mut poller)?;

    let a = poller.get(&format!("/v1/jobs?state=ended&limit={}", n.min(1000)))?;
    ensure!(a.status == 200, "GET /v1/jobs: {} {}", a.status, a.text());
    let v = a.json()?;
    let jobs = v["jobs"].as_array().context("no jobs in the listing")?;
    ensure!(
        jobs.len() as u64 == n,
        "{} jobs listed as ended, {n} submitted",
        jobs.len()
    );
    let failed: Vec<String> = jobs
        .iter()
        .filter(|j| j["outcome"] != "succeeded")
        .map(|j| format!("job {} {} ({})", j["id"], j["outcome"], j["reason"]))
        .collect();
    ensure!(
        failed.is_empty(),
        "jobs did not succeed: {}",
        failed.join("; ")
    );
    let field = |j: &Value, k: &str| j[k].as_u64().unwrap_or(0);
    let end_ms = jobs
        .iter()
        .map(|j| field(j, "finished_ms"))
        .max()
        .unwrap_or(0);
    let mean = |f: &dyn Fn(&Value) -> u64| {
        jobs.iter().map(f).sum::<u64>() as f64 / jobs.len().max(1) as f64
    };
    let to_queued_ms = mean(&|j| field(j, "queued_ms").saturating_sub(field(j, "submitted_ms")));
    let wait_ms = mean(&|j| field(j, "started_ms").saturating_sub(field(j, "queued_ms")));
    let run_ms = mean(&|j| field(j, "finished_ms").saturating_sub(field(j, "started_ms")));
    // The last end on the clock of `first`.
    let end = ref_instant + Duration::from_millis(end_ms.saturating_sub(ref_unix_ms));
    let wall = end.saturating_duration_since(first);

    // One POST alone: the daemon idle, each job waited for before the next.
    let mut alone = Vec::new();
    let text = job_text(0).into_bytes();
    for k in 0..ALONE as u64 {
        let (took, job) = poller.submit(n + k + 1, &text)?;
        alone.push(took);
        let t = Instant::now();
        loop {
            let a = poller.get(&format!("/v1/jobs/{job}"))?;
            ensure!(
                a.status == 200,
                "GET /v1/jobs/{job}: {} {}",
                a.status,
                a.text()
            );
            if a.json()?["state"] == "ended" {
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(60),
                "job {job} did not end in 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let reconnects = clients.iter().map(|c| c.reconnects).sum::<u64>() + poller.reconnects;
    drop(clients);
    drop(poller);
    let stop = daemon.stop()?;
    Ok(ServeRun {
        jobs_per_s: n as f64 / wall.as_secs_f64().max(1e-6),
        wall,
        observed,
        submit_span: last_202 - first,
        p50: quantile(&lat, 0.50),
        p99: quantile(&lat, 0.99),
        max: lat.last().copied().unwrap_or_default(),
        to_queued_ms,
        wait_ms,
        run_ms,
        append_mean_s: m.append_mean_s,
        round_mean: m.round_mean,
        polls,
        reconnects,
        alone: median_duration(&alone),
        stop,
    })
}

fn rates(v: &[f64]) -> String {
    v.iter()
        .map(|r| format!("{r:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> anyhow::Result<()> {
    let bins = reel_test_artefacts::dir_with(&["reel", "reel-agent", "libreel_runner_process.so"]);
    let dir = BenchDir::new("serve")?;
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp)?;
    let (jobs, runs) = if quick() {
        (QUICK_JOBS, 1)
    } else {
        (JOBS, RUNS)
    };
    println!(
        "{jobs} trivial jobs, {CLIENTS} clients on keep-alive connections, budget of {PARALLEL} \
         jobs at once, median of {runs} interleaved runs{}",
        if quick() { " (quick)" } else { "" }
    );
    println!("binaries: {}", bins.display());
    let started = Instant::now();

    let jobs_dir = dir.join("jobs");
    fs::create_dir_all(&jobs_dir)?;
    let texts: Vec<Vec<u8>> = (1..=jobs).map(|i| job_text(i).into_bytes()).collect();
    let files: Vec<PathBuf> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let f = jobs_dir.join(format!("f{}.yml", i + 1));
            fs::write(&f, t)
                .with_context(|| format!("cannot write {}", f.display()))
                .map(|()| f)
        })
        .collect::<anyhow::Result<_>>()?;
    let fsync = fdatasync_latency(&dir.join("fdatasync.probe"))?;

    let reel_run = |state: &Path, files: &[PathBuf]| -> anyhow::Result<Duration> {
        let t = Instant::now();
        let out = Command::new(bins.join("reel"))
            .arg("--state-dir")
            .arg(state)
            .arg("run")
            .arg("--plugin-dir")
            .arg(&bins)
            .args(["--durability", "fsync", "-j", &PARALLEL.to_string()])
            .args(files)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        let took = t.elapsed();
        check_output(&out, "reel run -j 8")?;
        Ok(took)
    };
    // Warm up: binaries and plugin in the page cache, cgroup hierarchy created.
    let warm = dir.join("warm");
    reel_run(&warm, &files[..2])?;
    fresh_dir(&warm)?;

    let mut run_rates = Vec::new();
    let mut serve_runs = Vec::new();
    for run in 0..runs {
        let state = dir.join(&format!("run-{run}"));
        run_rates.push(jobs as f64 / reel_run(&state, &files)?.as_secs_f64());
        fresh_dir(&state)?;

        let state = dir.join(&format!("serve-{run}"));
        let stderr = dir.join(&format!("serve-{run}.stderr"));
        serve_runs.push(serve_run(&bins, &state, &tmp, &stderr, &texts)?);
        fresh_dir(&state)?;
        eprintln!(
            "run {}/{runs} done ({:.0} s so far)",
            run + 1,
            started.elapsed().as_secs_f64()
        );
    }

    let pick = |f: &dyn Fn(&ServeRun) -> f64| median(&serve_runs.iter().map(f).collect::<Vec<_>>());
    let pick_d = |f: &dyn Fn(&ServeRun) -> Duration| {
        median_duration(&serve_runs.iter().map(f).collect::<Vec<_>>())
    };
    let r = median(&run_rates);
    let s = pick(&|x| x.jobs_per_s);
    let p50 = pick_d(&|x| x.p50);
    let p99 = pick_d(&|x| x.p99);
    let alone = pick_d(&|x| x.alone);

    println!();
    println!(
        "{:<56} {:>8} {:>9}   runs (jobs/s)",
        "trivial jobs", "jobs/s", "ms/job"
    );
    println!(
        "{:<56} {r:>8.1} {:>9.2}   [{}]",
        "baseline: reel run -j 8 (one process, fsync)",
        1e3 / r,
        rates(&run_rates)
    );
    println!(
        "{:<56} {s:>8.1} {:>9.2}   [{}]",
        "reel serve, 8 clients (first submit -> last job ended)",
        1e3 / s,
        rates(&serve_runs.iter().map(|x| x.jobs_per_s).collect::<Vec<_>>())
    );
    println!("serve/run: {}", ratio(s, r));
    println!(
        "submit latency (POST -> 202, {CLIENTS} clients): p50 {}, p99 {} (median of runs); \
         per run p50/p99/max: {}",
        ms(p50),
        ms(p99),
        serve_runs
            .iter()
            .map(|x| format!("{}/{}/{}", ms(x.p50), ms(x.p99), ms(x.max)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!("where serve's time goes (medians of runs):");
    println!(
        "  all {jobs} submits took {} of the {} (first submit -> last 202: {:.0} submits/s); \
         the poller saw the last end at {} ({} polls of /metrics)",
        ms(pick_d(&|x| x.submit_span)),
        ms(pick_d(&|x| x.wall)),
        jobs as f64 / pick_d(&|x| x.submit_span).as_secs_f64().max(1e-6),
        ms(pick_d(&|x| x.observed)),
        pick(&|x| x.polls as f64)
    );
    println!(
        "  per job (log timestamps, ms): Submitted -> Queued (the second append) {:.2}, queued waiting for a slot \
         {:.1}, slot -> end {:.2} (8 at a time: {:.2} ms/job of slot time)",
        pick(&|x| x.to_queued_ms),
        pick(&|x| x.wait_ms),
        pick(&|x| x.run_ms),
        pick(&|x| x.run_ms) / PARALLEL as f64
    );
    println!(
        "  one POST alone on an idle daemon: {} (median of {ALONE}); one write + fdatasync \
         on this disk: {}, so the two durable appends of a submit (Submitted, Queued) cost \
         at least {}",
        ms(alone),
        ms(fsync),
        ms(fsync * 2)
    );
    println!(
        "  daemon: mean event append (request -> durable) {:.3} ms, mean group-commit round \
         {:.1} requests; keep-alive reconnects {}; SIGTERM -> exit {}",
        pick(&|x| x.append_mean_s) * 1e3,
        pick(&|x| x.round_mean),
        serve_runs.iter().map(|x| x.reconnects).sum::<u64>(),
        ms(pick_d(&|x| x.stop))
    );
    // With CLIENTS clients each waiting for its answer, mean latency is CLIENTS ×
    // (span / N) whatever the daemon does (Little's law); what tells whether it
    // overlaps submits is span / N against the time of one POST alone.
    let each = pick_d(&|x| x.submit_span) / jobs as u32;
    let overlap = alone.as_secs_f64() / each.as_secs_f64().max(1e-9);
    println!(
        "  submits completed every {} (span / {jobs}) while one POST alone takes {}: \
         {overlap:.2} POSTs' worth in flight in the daemon (alone / (span / N)); the p50 {} is \
         {CLIENTS} clients x {}",
        ms(each),
        ms(alone),
        ms(p50),
        ms(each)
    );
    if overlap <= 1.0 {
        println!(
            "  => no overlap: the daemon served the submits one at a time, each slower than \
             alone (the running jobs share the CPU and the log writer), and each POST queued \
             behind the other {} clients' (Service::submit holds its idempotency-key lock \
             across both durable appends, so concurrent submits never share a group-commit \
             round)",
            CLIENTS - 1
        );
    } else {
        println!("  => the daemon overlapped the submits");
    }
    println!();
    let ok_rate = s >= GOAL_VS_RUN * r;
    let ok_p99 = p99 < GOAL_P99;
    println!(
        "goal: serve >= {GOAL_VS_RUN}x reel run -j 8's jobs/s: {} ({})",
        ratio(s, r),
        verdict(ok_rate)
    );
    println!(
        "goal: p99 submit latency < {} ms: {} ({})",
        GOAL_P99.as_millis(),
        ms(p99),
        verdict(ok_p99)
    );
    println!("overall: {}", verdict(ok_rate && ok_p99));
    println!("total {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
