//! The web view (`docs/web.md`) in a real browser: Debian's Chromium, headless,
//! driven through Debian's ChromeDriver (WebDriver over HTTP), against the real
//! `reel serve`. Screenshots go to `target/screenshots/` as test artefacts.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::serve::{Daemon, request};
use reel_test_artefacts::browser::Browser;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn the_web_view_shows_jobs_live_timelines_and_logs_and_cancels_a_job_in_a_real_browser() {
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(state.path(), &[]);
    let b = Browser::start();

    // Over TCP the page is served without a token, and nothing else is.
    let page = request(&d.addr, "GET", "/", &[], b"");
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-security-policy")
            .is_some_and(|p| p.contains("script-src 'self'")),
        "{:?}",
        page.headers
    );
    assert_eq!(
        request(&d.addr, "GET", "/v1/scheduler", &[], b"").status,
        401
    );

    // A wrong token is refused at the sign-in form.
    b.goto(&d.url());
    let input = b.wait_for("#token", secs(20));
    b.screenshot("web-sign-in");
    b.type_text(&input, "not-the-token");
    b.click(&b.wait_for("#sign-in", secs(5)));
    b.wait_js(
        "return document.querySelector('#login-error').textContent.includes('refused')",
        "the wrong token refused",
        secs(10),
    );
    let input = b.wait_for("#token", secs(5));
    b.cmd("POST", &format!("/element/{input}/clear"), json!({}));
    b.type_text(&input, &d.token);
    b.click(&b.wait_for("#sign-in", secs(5)));
    b.wait_for("#budget [data-resource=vcpus]", secs(20));
    // Marks this page load: a reload would lose it.
    b.js("window.reelTestMark = 'same page'; return true");

    // A job submitted now shows up without a reload, and runs.
    let printer = "name: printer\nartifacts: [dist/report.txt]\nsteps:\n  - name: count\n    command: |\n      for i in $(seq 1 100); do echo \"line $i\"; printf '\\033[32mgreen %s\\033[0m\\n' $i; echo \"err $i\" >&2; sleep 0.1; done\n  - name: after\n    command: mkdir -p dist && echo report-body > dist/report.txt && echo done\n";
    let job = d.submit("alice", "printer.yml", printer);
    let row = format!("tr[data-job='{job}']");
    b.wait_for(&row, secs(20));
    assert_eq!(b.js("return window.reelTestMark"), "same page");
    let owner = b.wait_js(
        &format!(
            "const r = document.querySelector(\"{row}\"); return r && r.children[2].textContent"
        ),
        "the row's owner",
        secs(5),
    );
    assert_eq!(owner, "alice");
    b.screenshot("web-jobs");

    // Keyboard: the row's link opens the job with Enter.
    let link = b.wait_for(&format!("{row} a"), secs(5));
    b.type_text(&link, "\u{E007}");
    b.wait_js(
        &format!("return location.pathname === '/jobs/{job}'"),
        "the job page opened",
        secs(10),
    );
    assert_eq!(b.js("return window.reelTestMark"), "same page");

    // Its timeline has a bar per step, and its log grows while the step prints.
    b.wait_for(
        "#timeline [data-lane='step-1'] .step-bar[data-result='running']",
        secs(30),
    );
    let log_text = "return document.querySelector('#log').textContent";
    b.wait_js(
        "return document.querySelector('#log').textContent.includes('line 3\\n')",
        "the first lines of the log",
        secs(20),
    );
    let early = b.js(log_text).as_str().unwrap().len();
    b.wait_js(
        "return document.querySelector('#log').textContent.includes('line 25\\n')",
        "later lines of the log",
        secs(20),
    );
    let later = b.js(log_text).as_str().unwrap().len();
    assert!(later > early, "the log did not grow: {early} then {later}");
    let still_running = b.js(
        "return !!document.querySelector(\"#timeline .step-bar[data-step='1'][data-result='running']\")",
    );
    assert_eq!(
        still_running, true,
        "the log grew while the step ran (the page saw it running)"
    );
    // stderr is marked apart; ANSI colours are rendered, not printed.
    assert_eq!(
        b.js("const e = document.querySelector('#log .err'); return e && e.textContent.startsWith('err ')"),
        true
    );
    assert_eq!(
        b.js("const g = document.querySelector('#log .f32'); return g && g.textContent"),
        "green 1"
    );
    assert_eq!(
        b.js("return document.querySelector('#log').textContent.includes('\\u001b')"),
        false
    );
    b.screenshot("web-job-running");

    // It ends succeeded: two green bars and the lifecycle lane to scale.
    b.wait_js(
        "return document.querySelector('#job-state').textContent === 'succeeded'",
        "the job succeeded",
        secs(60),
    );
    b.wait_js(
        "return document.querySelectorAll(\"#timeline .step-bar[data-result='ok']\").length === 2",
        "two finished step bars",
        secs(10),
    );
    let phases = b.js(
        "return [...document.querySelectorAll('#timeline [data-phase]')].map(e => e.dataset.phase).join(' ')",
    );
    assert_eq!(
        phases,
        "queued lease prepare boot connect steps drain poweroff cleanup"
    );
    // Drawn to scale: the first step's bar is far wider than the second's.
    let widths = b.js(
        "return [...document.querySelectorAll('#timeline .step-bar')].map(e => e.getBoundingClientRect().width)",
    );
    let (w1, w2) = (widths[0].as_f64().unwrap(), widths[1].as_f64().unwrap());
    assert!(w1 > 10.0 * w2, "step bars not to scale: {w1} vs {w2}");
    // Clicking a bar shows its events.
    b.click(&b.wait_for(
        "#timeline .step-bar[data-step='1'][data-result='ok']",
        secs(5),
    ));
    let detail = b.text(&b.wait_for("#event-detail", secs(5)));
    assert!(
        detail.contains("StepStarted") && detail.contains("StepFinished"),
        "{detail}"
    );
    b.screenshot("web-job-done");

    // Its artifact is listed, and a click downloads it (fetched with the token).
    let artifact = b.wait_for("#artifacts a.artifact", secs(10));
    assert_eq!(b.text(&artifact), "dist/report.txt");
    b.click(&artifact);
    let saved = b.downloads().join("report.txt");
    b.poll("the artifact downloaded", secs(20), || {
        std::fs::read(&saved).ok().filter(|d| d == b"report-body\n")
    });

    // Cancel a running job from its page.
    let sleeper = d.submit(
        "bob",
        "sleeper.yml",
        "name: sleeper\nsteps:\n  - name: nap\n    command: echo napping; sleep 300\n",
    );
    b.goto(&format!("{}/jobs/{sleeper}", d.url()));
    b.wait_for(
        "#timeline .step-bar[data-step='1'][data-result='running']",
        secs(30),
    );
    b.click(&b.wait_for("#cancel:not([disabled])", secs(10)));
    b.wait_js(
        "return document.querySelector('#job-state').textContent === 'cancelled'",
        "the job cancelled",
        secs(60),
    );
    assert_eq!(d.job(sleeper)["outcome"], "cancelled");
    // The page stops following once the step has ended.
    b.wait_js(
        "return !document.querySelector('#log-state').textContent.includes('live') && document.querySelector('#log').textContent === 'napping\\n'",
        "the log no longer following, with the step's output",
        secs(20),
    );
    b.wait_for("#timeline .mark.m-cancel", secs(5));
    b.screenshot("web-job-cancelled");

    // A narrow window: nothing wider than the window.
    b.goto(&d.url());
    b.wait_for(&format!("tr[data-job='{sleeper}']"), secs(20));
    b.window(420, 800);
    let fits = b.wait_js(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1 && [...document.querySelectorAll('main *')].every(e => e.closest('.table-wrap') || e.getBoundingClientRect().right <= window.innerWidth + 1)",
        "the jobs page fits a narrow window",
        secs(5),
    );
    assert_eq!(fits, true);
    b.screenshot("web-jobs-narrow");
}

#[test]
fn a_job_recovered_after_a_sigkill_shows_the_engine_death_and_its_log_reconnects_whole() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(state.path(), &[]);
    let job = d.submit(
        "alice",
        "slow.yml",
        "name: slow\nsteps:\n  - name: slow\n    command: for i in $(seq 1 50); do echo \"line $i\"; sleep 0.1; done\n",
    );
    let b = Browser::start();
    b.sign_in(&d.url(), &format!("/jobs/{job}"), &d.token);
    // The page follows the step's output live when the daemon is killed.
    b.wait_js(
        "return document.querySelector('#log-state').textContent.includes('live') && document.querySelector('#log').textContent.includes('line 5\\n')",
        "the log followed live",
        secs(30),
    );
    d.restart();
    d.wait_ended(job, secs(60));
    assert_eq!(d.job(job)["outcome"], "succeeded");

    // Without a reload the page reconnects from the last byte it showed:
    // every line once, in order.
    let expected: String = (1..=50).map(|i| format!("line {i}\n")).collect();
    b.wait_js(
        &format!(
            "return document.querySelector('#log').textContent === {}",
            serde_json::to_string(&expected).unwrap()
        ),
        "the whole output, once, across the daemon's death",
        secs(30),
    );
    b.wait_js(
        "return document.querySelector('#job-state').textContent === 'succeeded'",
        "the page saw the job succeed",
        secs(20),
    );
    b.wait_for("#timeline .mark.m-died", secs(5));
    b.wait_for("#timeline .mark.m-recovered", secs(5));
    b.wait_for("#timeline .mark.m-reattached", secs(5));
    b.wait_for("#timeline [data-phase='down']", secs(5));
    b.click(&b.wait_for("#timeline .mark.m-recovered", secs(5)));
    let detail = b.text(&b.wait_for("#event-detail", secs(5)));
    assert!(
        detail.contains("RecoveryStarted") && detail.contains("took the job over"),
        "{detail}"
    );
    b.screenshot("web-job-recovered");
}

#[test]
fn a_job_with_200_mib_of_output_opens_with_one_page_of_it() {
    const SIZE: u64 = 200 << 20;
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(state.path(), &[]);
    let job = d.submit(
        "alice",
        "big.yml",
        &format!(
            "name: big\nsteps:\n  - name: flood\n    command: yes 'reel prints a line of output 0123456789' | head -c {SIZE}\n"
        ),
    );
    d.wait_ended(job, secs(300));
    let j = d.job(job);
    assert_eq!(j["outcome"], "succeeded", "{j}");
    assert_eq!(j["steps"][0]["output_bytes"], SIZE);

    // The API pages it: `limit` bytes from `offset`, `X-Reel-Stored` the size.
    let head = d.get(&format!("/v1/jobs/{job}/logs?step=1&limit=0"));
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("x-reel-stored"),
        Some(SIZE.to_string().as_str())
    );
    let tail = d.get(&format!(
        "/v1/jobs/{job}/logs?step=1&offset={}&limit=5&format=chunks",
        SIZE - 10
    ));
    assert_eq!(tail.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = reel_tests::text(&tail.body)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["offset"], SIZE - 10);
    assert_eq!(lines[0]["len"], 5);
    assert_eq!(lines[0]["stream"], "stdout");
    assert_eq!(lines[0]["text"].as_str().map(str::len), Some(5));

    let b = Browser::start();
    b.sign_in(&d.url(), "/", &d.token);
    b.wait_for("#budget", secs(20));
    let started = Instant::now();
    b.goto(&format!("{}/jobs/{job}", d.url()));
    b.wait_for("#log[data-ready]", secs(30));
    let opened = started.elapsed();
    let shown_ms = b.js("return window.reelLogShownMs").as_f64().unwrap();
    let (start, end) = (
        b.js("return Number(document.querySelector('#log').dataset.start)")
            .as_u64()
            .unwrap(),
        b.js("return Number(document.querySelector('#log').dataset.end)")
            .as_u64()
            .unwrap(),
    );
    eprintln!(
        "200 MiB of output: the job page showed its log's last page {shown_ms:.0} ms after the navigation began ({opened:?} as the test saw it)"
    );
    // Only the last page is loaded: its end is the output's end.
    assert_eq!(end, SIZE);
    assert_eq!(end - start, 256 * 1024);
    let chars = b.js("return document.querySelector('#log').textContent.length");
    assert_eq!(chars.as_u64(), Some(256 * 1024));

    // Paging back loads the page before, and the page answers at once.
    b.click(&b.wait_for("#log-older", secs(5)));
    b.wait_js(
        &format!(
            "return Number(document.querySelector('#log').dataset.start) === {}",
            SIZE - 512 * 1024
        ),
        "the older page",
        secs(20),
    );
    let t = Instant::now();
    b.js("return document.querySelectorAll('*').length");
    let round_trip = t.elapsed();
    eprintln!("a script round trip on the page after paging: {round_trip:?}");
    b.click(&b.wait_for("#log-first", secs(5)));
    b.wait_js(
        "return document.querySelector('#log').dataset.start === '0' && document.querySelector('#log').textContent.startsWith('reel prints a line')",
        "the first page",
        secs(20),
    );
    b.screenshot("web-job-200mib");
}
