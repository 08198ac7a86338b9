//! A headless Chromium for tests and benches: Debian's `chromium`, driven over
//! WebDriver (HTTP and JSON) by Debian's `chromedriver`, one browser and one
//! session per [`Browser`]. Installed by `scripts/install-vm-deps` when missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::workspace_root;

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
    crate::install_deps("Debian's chromium and chromium-driver");
    assert!(
        Path::new(CHROMEDRIVER).exists(),
        "scripts/install-vm-deps left no {CHROMEDRIVER}"
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
pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
    profile: tempfile::TempDir,
    shots: PathBuf,
}

impl Browser {
    /// Starts ChromeDriver on a free port and a headless Chromium session
    /// (1280×800, a fresh profile).
    pub fn start() -> Browser {
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
                "prefs": {
                    "download.default_directory": profile.path().join("downloads"),
                    "download.prompt_for_download": false,
                },
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
            profile,
            shots,
        }
    }

    /// One WebDriver command; its `value`. Panics on a WebDriver error.
    pub fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        self.try_cmd(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    pub fn try_cmd(&self, method: &str, path: &str, body: Value) -> Result<Value, Value> {
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

    /// Opens `url` + `path` (the daemon's web view) and signs in with `token`.
    pub fn sign_in(&self, url: &str, path: &str, token: &str) {
        self.goto(&format!("{url}{path}"));
        let input = self.wait_for("#token", Duration::from_secs(20));
        self.type_text(&input, token);
        self.click(&self.wait_for("#sign-in", Duration::from_secs(5)));
    }

    /// Where the browser saves what it downloads.
    pub fn downloads(&self) -> PathBuf {
        self.profile.path().join("downloads")
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({"url": url}));
    }

    pub fn find(&self, css: &str) -> Option<String> {
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
    pub fn poll<T>(&self, what: &str, within: Duration, f: impl Fn() -> Option<T>) -> T {
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
    pub fn wait_for(&self, css: &str, within: Duration) -> String {
        self.poll(&format!("an element {css:?}"), within, || self.find(css))
    }

    /// Runs `script` (a function body) in the page; what it returns.
    pub fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    /// Waits until `script` returns something truthy; returns it.
    pub fn wait_js(&self, script: &str, what: &str, within: Duration) -> Value {
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

    pub fn click(&self, element: &str) {
        self.cmd("POST", &format!("/element/{element}/click"), json!({}));
    }

    pub fn type_text(&self, element: &str, text: &str) {
        self.cmd(
            "POST",
            &format!("/element/{element}/value"),
            json!({"text": text}),
        );
    }

    pub fn text(&self, element: &str) -> String {
        self.cmd("GET", &format!("/element/{element}/text"), json!({}))
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn window(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            json!({"width": width, "height": height}),
        );
    }

    /// Writes a screenshot of the page to `target/screenshots/NAME.png`.
    pub fn screenshot(&self, name: &str) -> PathBuf {
        let v = self.cmd("GET", "/screenshot", json!({}));
        let png = base64_decode(v.as_str().expect("a screenshot in base64"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
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
