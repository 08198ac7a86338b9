//! The web view (`docs/web.md`) in a real browser: Debian's Chromium, headless,
//! driven through Debian's ChromeDriver (WebDriver over HTTP), against the real
//! `reel serve`. Screenshots go to `target/screenshots/` as test artefacts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::serve::{Daemon, request};
use reel_tests::workspace_root;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// How WebDriver names an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Installs Chromium and ChromeDriver from Debian (`scripts/install-vm-deps`,
/// as root) when they are missing, as `guest_image` does for QEMU.
fn ensure_browser() {
    if Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists() {
        return;
    }
    let install = workspace_root().join("scripts/install-vm-deps");
    let status = Command::new(&install)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", install.display()));
    assert!(
        status.success() && Path::new(CHROMEDRIVER).exists(),
        "{} failed ({status}): Debian's chromium and chromium-driver are needed (run it as root)",
        install.display()
    );
}

/// One request to ChromeDriver: its status and JSON body. Read by the body's
/// `Content-Length`: ChromeDriver keeps the connection open after answering.
fn wd_request(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("chromedriver at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("chromedriver: not a status line: {line:?}"));
    let mut len = None;
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse::<usize>().ok();
        }
    }
    let mut out = vec![0u8; len.expect("chromedriver answers with a Content-Length")];
    r.read_exact(&mut out).unwrap();
    let v = serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "chromedriver: not JSON ({e}): {}",
            String::from_utf8_lossy(&out)
        )
    });
    (status, v)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One headless Chromium behind its own ChromeDriver.
struct Browser {
    driver: Child,
    addr: String,
    session: String,
    _profile: tempfile::TempDir,
    shots: PathBuf,
}

impl Browser {
    fn start() -> Browser {
        ensure_browser();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start chromedriver");
        let started = Instant::now();
        loop {
            if std::net::TcpStream::connect(&addr).is_ok() {
                let (status, v) = wd_request(&addr, "GET", "/status", b"");
                if status == 200 && v["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "chromedriver did not get ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,800",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let body = serde_json::to_vec(&caps).unwrap();
        let (_, v) = wd_request(&addr, "POST", "/session", &body);
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_owned();
        let shots = workspace_root().join("target/screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            driver,
            addr,
            session,
            _profile: profile,
            shots,
        }
    }

    /// One WebDriver command; its `value`. Panics on a WebDriver error.
    fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        self.try_cmd(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    fn try_cmd(&self, method: &str, path: &str, body: Value) -> Result<Value, Value> {
        let body = if method == "GET" || method == "DELETE" {
            Vec::new()
        } else {
            serde_json::to_vec(&body).unwrap()
        };
        let target = format!("/session/{}{path}", self.session);
        let (status, v) = wd_request(&self.addr, method, &target, &body);
        if status == 200 {
            Ok(v["value"].clone())
        } else {
            Err(v["value"].clone())
        }
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({"url": url}));
    }

    fn find(&self, css: &str) -> Option<String> {
        self.try_cmd(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        )
        .ok()
        .and_then(|v| v[ELEMENT].as_str().map(str::to_owned))
    }

    /// Polls `f` until it gives something; panics after `within` with a
    /// screenshot and the page's text.
    fn poll<T>(&self, what: &str, within: Duration, f: impl Fn() -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            if started.elapsed() > within {
                let shot = self.screenshot("timeout");
                panic!(
                    "{what}: not within {within:?} (screenshot {}); the page says:\n{}",
                    shot.display(),
                    self.js("return document.body.innerText")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for an element matching `css`.
    fn wait_for(&self, css: &str, within: Duration) -> String {
        self.poll(&format!("an element {css:?}"), within, || self.find(css))
    }

    /// Runs `script` (a function body) in the page; what it returns.
    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    /// Waits until `script` returns something truthy; returns it.
    fn wait_js(&self, script: &str, what: &str, within: Duration) -> Value {
        self.poll(what, within, || {
            let v = self.js(script);
            let yes = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            yes.then_some(v)
        })
    }

    fn click(&self, element: &str) {
        self.cmd("POST", &format!("/element/{element}/click"), json!({}));
    }

    fn type_text(&self, element: &str, text: &str) {
        self.cmd(
            "POST",
            &format!("/element/{element}/value"),
            json!({"text": text}),
        );
    }

    fn text(&self, element: &str) -> String {
        self.cmd("GET", &format!("/element/{element}/text"), json!({}))
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn window(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            json!({"width": width, "height": height}),
        );
    }

    /// Writes a screenshot of the page to `target/screenshots/NAME.png`.
    fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.cmd("GET", "/screenshot", json!({}));
        let png = base64_decode(v.as_str().expect("a screenshot in base64"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Opens the daemon's page and signs in with its token.
    fn sign_in(&self, d: &Daemon, path: &str) {
        self.goto(&format!("{}{path}", d.url()));
        let input = self.wait_for("#token", Duration::from_secs(20));
        self.type_text(&input, &d.token);
        self.click(&self.wait_for("#sign-in", Duration::from_secs(5)));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.try_cmd("DELETE", "", json!({}));
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for quad in bytes.chunks(4) {
        let pad = quad.iter().filter(|&&c| c == b'=').count();
        let mut n = 0u32;
        for &c in quad {
            n = (n << 6) | if c == b'=' { 0 } else { val(c) };
        }
        n <<= 6 * (4 - quad.len() as u32);
        let three = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&three[..3 - pad]);
    }
    out
}

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
    let printer = "name: printer\nsteps:\n  - name: count\n    command: |\n      for i in $(seq 1 60); do echo \"line $i\"; printf '\\033[32mgreen %s\\033[0m\\n' $i; echo \"err $i\" >&2; sleep 0.1; done\n  - name: after\n    command: echo done\n";
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
    b.sign_in(&d, &format!("/jobs/{job}"));
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
    b.sign_in(&d, "/");
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
