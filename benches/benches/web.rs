//! The web view with a large log: how long a job's page takes to show its
//! step's output when that output is 200 MiB, against the same page of a job
//! that printed one line, in the same browser and the same run.
//!
//! A release `reel serve` (`--durability fsync`) runs two jobs to their end:
//! `big` prints 200 MiB (`yes … | head -c`), `small` one line. A headless
//! Chromium (Debian's, through ChromeDriver: `reel_test_artefacts::browser`)
//! signs in once, then opens `/jobs/{id}` afresh for each, interleaved, RUNS
//! times. Measured per open: the page's own `performance.now()` when the log's
//! first page was on screen (from the navigation's start: `window.reelLogShownMs`,
//! set by the page), and the wall time from the WebDriver navigation to the log
//! being ready as the bench saw it. Then, on the big job's page, a click on
//! "‹ Older" until the page before is shown (paging stays quick), and how many
//! characters of output the page holds (one page, never the whole log).
//!
//! Goals (issue 14): the 200 MiB job's page shows its output in under 1 s
//! (median), and its open costs at most 2× the one-line job's (the time does not
//! grow with the output's size). `REEL_BENCH_QUICK=1` (or `--quick`): 20 MiB,
//! 3 runs.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use reel_benches::{
    BenchDir, Daemon, ReleaseBins, check_output, median, median_duration, ms, quick, ratio, verdict,
};
use reel_test_artefacts::browser::Browser;

const BIG: u64 = 200 << 20;
const QUICK_BIG: u64 = 20 << 20;
const RUNS: usize = 5;
const QUICK_RUNS: usize = 3;
const GOAL_SHOWN: Duration = Duration::from_secs(1);
const GOAL_RATIO: f64 = 2.0;
/// The page's log page (engine/serve/web/app.js, `LOG_PAGE`).
const PAGE: u64 = 256 * 1024;

fn main() -> anyhow::Result<()> {
    let (size, runs) = if quick() {
        (QUICK_BIG, QUICK_RUNS)
    } else {
        (BIG, RUNS)
    };
    let bins = ReleaseBins::build("web-bench")?;
    let dir = BenchDir::new("web")?;
    let (state, tmp) = (dir.join("state"), dir.join("tmp"));
    std::fs::create_dir_all(&tmp)?;
    let daemon = Daemon::start(
        &bins.dir,
        &state,
        &tmp,
        &dir.join("serve.stderr"),
        &["--durability", "fsync"],
    )?;
    let big = dir.join("big.yml");
    std::fs::write(
        &big,
        format!(
            "name: big\nsteps:\n  - name: flood\n    command: yes 'reel prints a line of output 0123456789' | head -c {size}\n"
        ),
    )?;
    let small = dir.join("small.yml");
    std::fs::write(
        &small,
        "name: small\nsteps:\n  - name: one\n    command: echo one line\n",
    )?;
    let url = format!("http://{}", daemon.addr);
    for f in [&big, &small] {
        let out = std::process::Command::new(&bins.reel)
            .arg("--state-dir")
            .arg(&state)
            .args(["submit", "--wait", "--server", &url])
            .arg(f)
            .output()?;
        check_output(&out, "reel submit --wait")?;
    }
    // A fresh state directory: the jobs are 1 (big) and 2 (small).
    let (big_id, small_id) = (1, 2);

    let b = Browser::start();
    b.sign_in(&url, "/", &daemon.token);
    b.wait_for("#budget", Duration::from_secs(20));

    let open = |id: u64| -> anyhow::Result<(f64, Duration)> {
        let t = Instant::now();
        b.goto(&format!("{url}/jobs/{id}"));
        b.wait_for("#log[data-ready]", Duration::from_secs(60));
        let wall = t.elapsed();
        let shown = b
            .js("return window.reelLogShownMs")
            .as_f64()
            .context("the page did not say when it showed the log")?;
        Ok((shown, wall))
    };
    let (mut big_shown, mut big_wall, mut small_shown, mut small_wall) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // One open of each first, not counted: the browser's cache of the script.
    open(small_id)?;
    for _ in 0..runs {
        let (s, w) = open(small_id)?;
        small_shown.push(s);
        small_wall.push(w);
        let (s, w) = open(big_id)?;
        big_shown.push(s);
        big_wall.push(w);
    }
    // Paging back on the big job's page (the last open).
    let held = b
        .js("return document.querySelector('#log').textContent.length")
        .as_u64()
        .unwrap_or(u64::MAX);
    let t = Instant::now();
    b.click(&b.wait_for("#log-older", Duration::from_secs(5)));
    b.wait_js(
        &format!(
            "return Number(document.querySelector('#log').dataset.start) === {}",
            size - 2 * PAGE
        ),
        "the older page",
        Duration::from_secs(60),
    );
    let older = t.elapsed();
    drop(b);
    daemon.stop()?;

    let big_ms = median(&big_shown);
    let small_ms = median(&small_shown);
    println!(
        "web view: a job's page with {} MiB of output, against one with one line (median of {runs}, interleaved)",
        size >> 20
    );
    println!(
        "  log shown (page's clock, from navigation start): {big_ms:.0} ms vs {small_ms:.0} ms = {}",
        ratio(big_ms, small_ms)
    );
    println!(
        "  navigation to log ready (bench's clock):         {} vs {}",
        ms(median_duration(&big_wall)),
        ms(median_duration(&small_wall))
    );
    println!(
        "  '‹ Older' to the page before: {}; output held by the page: {held} characters (a page is {PAGE} bytes)",
        ms(older)
    );
    ensure!(
        held <= 4 * PAGE,
        "the page holds {held} characters of output"
    );
    let ok_shown = big_ms < GOAL_SHOWN.as_secs_f64() * 1000.0;
    let ok_ratio = big_ms <= GOAL_RATIO * small_ms.max(1.0);
    println!(
        "{}: {} MiB job's log shown in {big_ms:.0} ms (goal < {} ms)",
        verdict(ok_shown),
        size >> 20,
        GOAL_SHOWN.as_millis()
    );
    println!(
        "{}: {} (goal <= {GOAL_RATIO}x the one-line job's)",
        verdict(ok_ratio),
        ratio(big_ms, small_ms)
    );
    Ok(())
}
