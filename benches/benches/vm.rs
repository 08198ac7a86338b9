//! The QEMU runner end to end, with real microVMs (release `reel` and QEMU plugin,
//! the image from `scripts/build-guest-image`, whichever accelerator the runner
//! picks — printed; TCG on machines without usable KVM).
//!
//! (i) One job with a single `true` step, `reel run` from process start to exit:
//!     boot, agent `Hello`, the step, teardown, every event durable. Baseline in the
//!     same run, interleaved: a bare `qemu-system-x86_64` with the same machine,
//!     accelerator, memory, kernel, initramfs and devices (one 64 MiB ext4 volume,
//!     formatted before the clock starts, mounted at `/work` by the guest), from
//!     spawn to the same marker (the guest agent's `Hello` over the virtio-serial
//!     chardev socket). Median of
//!     `RUNS` each. reel's overhead = (job − bare boot) / bare boot; goal < 10%. For
//!     attribution, reel's own boot-to-Hello span (`BootRequested` →
//!     `AgentConnected` in the log) is printed beside it.
//! (ii) `BATCH` VM jobs (one short step each), `reel run -j 2`: jobs per minute, and
//!     the peak of the summed RSS of `reel` and its QEMUs (sampled every 50 ms).
//!
//! `--quick` runs 3 and 4 instead of 10 and 20.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use reel_agent::AgentClient;
use reel_benches::{BenchDir, ReleaseBins, median_duration, ms, quick, verdict, workspace_root};
use reel_engine::store::LogReader;

const GOAL_OVERHEAD: f64 = 0.10;

fn main() -> anyhow::Result<()> {
    let (runs, batch) = if quick() { (3, 4) } else { (10, 20) };
    let bins = ReleaseBins::build("vm-bench")?;
    let image = build_image()?;
    let dir = BenchDir::new("vm")?;

    let job = dir.join("true.yml");
    std::fs::write(
        &job,
        format!(
            "name: true\nrunner: qemu\nimage: {}\nresources: {{ memory: 256M, disk: 64M }}\nsteps:\n  - name: t\n    command: \"true\"\n",
            image.display()
        ),
    )?;

    let mut accel = String::from("unknown");
    let (mut jobs, mut bare, mut spans) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let state = dir.join(&format!("state-{i}"));
        let t = Instant::now();
        let out = Command::new(&bins.reel)
            .arg("--state-dir")
            .arg(&state)
            .args(["run", "--plugin-dir"])
            .arg(&bins.dir)
            .arg(&job)
            .stdin(Stdio::null())
            .output()?;
        let took = t.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.success(), "reel run failed: {stderr}");
        let printed = format!("{stderr}{}", String::from_utf8_lossy(&out.stdout));
        if let Some(a) = printed.lines().find_map(|l| l.split(" boots with ").nth(1)) {
            accel = a.to_owned();
        }
        jobs.push(took);
        spans.push(boot_span(&state)?);
        bare.push(bare_boot(&image, &dir.join(&format!("bare-{i}")), &accel)?);
    }
    let job_med = median_duration(&jobs);
    let bare_med = median_duration(&bare);
    let span_med = median_duration(&spans);
    let overhead = (job_med.as_secs_f64() - bare_med.as_secs_f64()) / bare_med.as_secs_f64();
    println!("accelerator: {accel}");
    println!(
        "(i) one `true` job, median of {runs}: reel run {} (boot to Hello inside it {}) vs bare QEMU boot to Hello {}",
        ms(job_med),
        ms(span_med),
        ms(bare_med)
    );
    println!(
        "    reel's overhead over the bare boot: {:+.1}% (goal < {:.0}%): {}",
        overhead * 100.0,
        GOAL_OVERHEAD * 100.0,
        verdict(overhead < GOAL_OVERHEAD)
    );

    // (ii) a batch, two at a time.
    let mut files = Vec::new();
    for i in 0..batch {
        let f = dir.join(&format!("b{i}.yml"));
        std::fs::write(
            &f,
            format!(
                "name: b{i}\nrunner: qemu\nimage: {}\nresources: {{ memory: 256M, disk: 64M }}\nsteps:\n  - name: s\n    command: echo {i}; uname -r\n",
                image.display()
            ),
        )?;
        files.push(f);
    }
    let state = dir.join("batch");
    let started = Instant::now();
    let child = Command::new(&bins.reel)
        .arg("--state-dir")
        .arg(&state)
        .args(["run", "-q", "-j", "2", "--plugin-dir"])
        .arg(&bins.dir)
        .args(&files)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let (out, peak) = with_peak_rss(child, &state.join("sandboxes"))?;
    let took = started.elapsed();
    ensure!(
        out.status.success(),
        "the batch failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "(ii) {batch} VM jobs, 2 at a time: {} → {:.1} jobs/min; peak RSS of reel and its QEMUs {:.0} MiB",
        ms(took),
        batch as f64 * 60.0 / took.as_secs_f64(),
        peak as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}

/// Builds (or finds cached) the guest image; its directory.
fn build_image() -> anyhow::Result<PathBuf> {
    let out = Command::new(workspace_root().join("scripts/build-guest-image"))
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run scripts/build-guest-image")?;
    ensure!(out.status.success(), "scripts/build-guest-image failed");
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(
        text.lines().last().unwrap_or_default().trim(),
    ))
}

/// `BootRequested` → `AgentConnected` of job 1 in `state`.
fn boot_span(state: &Path) -> anyhow::Result<Duration> {
    let log = LogReader::open_copy(state)?;
    let (mut from, mut to) = (None, None);
    for r in log.events(1) {
        let r = r?;
        match r.event.name() {
            "BootRequested" => from = Some(r.at_ms),
            "AgentConnected" => to = Some(r.at_ms),
            _ => {}
        }
    }
    match (from, to) {
        (Some(a), Some(b)) => Ok(Duration::from_millis(b.saturating_sub(a))),
        _ => bail!("job 1 has no boot span"),
    }
}

/// A bare QEMU of the image, from spawn to the guest agent's `Hello`.
fn bare_boot(image: &Path, dir: &Path, accel: &str) -> anyhow::Result<Duration> {
    std::fs::create_dir_all(dir)?;
    let socket = dir.join("a.sock");
    let accel_args: &[&str] = if accel.starts_with("kvm") {
        &["-accel", "kvm", "-cpu", "host"]
    } else {
        &["-accel", "tcg,tb-size=128", "-cpu", "max"]
    };
    let mut qemu = reel_test_artefacts::bare_guest(image, dir, 256, 64, accel_args);
    let t = Instant::now();
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = (|| {
        while !socket.exists() {
            ensure!(t.elapsed() < Duration::from_secs(30), "QEMU made no socket");
            std::thread::sleep(Duration::from_millis(1));
        }
        AgentClient::connect_serial(&socket, Duration::from_secs(60))
            .map_err(|e| anyhow::anyhow!("bare boot: {e}"))?;
        Ok(t.elapsed())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Waits for `child`, sampling the summed RSS of it and every process whose
/// command line names `root` (its QEMUs) every 50 ms; the output and the peak.
fn with_peak_rss(child: Child, root: &Path) -> anyhow::Result<(std::process::Output, u64)> {
    let pid = child.id();
    let done = AtomicBool::new(false);
    let peak = AtomicU64::new(0);
    let needle = root.to_string_lossy().into_owned();
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let mut sum = rss(pid);
                for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Ok(n) = p.file_name().to_string_lossy().parse::<u32>() else {
                        continue;
                    };
                    let cmd = std::fs::read(format!("/proc/{n}/cmdline")).unwrap_or_default();
                    if n != pid && cmd.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                        sum += rss(n);
                    }
                }
                peak.fetch_max(sum, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let out = child.wait_with_output();
        done.store(true, Ordering::Relaxed);
        out
    })?;
    Ok((out, peak.load(Ordering::Relaxed)))
}

/// A process's resident set in bytes (`VmRSS`), 0 if gone.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
