//! `reel serve` end to end, the way a daemon fails in real life: the real
//! binary on a real socket (curl and raw TCP), SIGKILLed and restarted
//! mid-run, SIGTERMed with jobs running, flooded with hostile clients, and the
//! `reel` client commands against it. Each test has a state directory and a
//! daemon of its own on a port the kernel picks (`--listen 127.0.0.1:0`; the
//! daemon says the real one in `<state>/serve/endpoint.json`), so they run in
//! parallel; a restarted daemon takes the same port again, as one restarted by
//! a service manager would (a client that follows a job keeps its URL).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use reel_tests::{assert_nothing_left, kill_sandboxes, reel, target_dir, text, workspace_root};

const TERMINALS: [&str; 5] = ["Succeeded", "Failed", "Cancelled", "TimedOut", "Lost"];

// ---------------------------------------------------------------------------------
// Raw HTTP/1.1 over TcpStream: one request per connection.

/// An HTTP answer, its body whole (chunked bodies decoded).
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Resp {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {}: the body is not JSON ({e}): {}",
                self.status,
                text(&self.body)
            )
        })
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, after checking the status.
    pub(crate) fn expect(&self, status: u16, what: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "{what}: HTTP {} {}",
            self.status,
            text(&self.body)
        );
        self.json()
    }
}

/// Sends `head` (and `body`) to `addr` and reads the answer to the end of the
/// connection. `Err` when nothing answers.
fn exchange(addr: &str, head: &str, body: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {:?}", text(raw)));
    let head = text(&raw[..split]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut rest = &raw[split + 4..];
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        let mut body = Vec::new();
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a chunk size line");
            let size = usize::from_str_radix(text(&rest[..eol]).trim(), 16).expect("a chunk size");
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body
    } else {
        rest.to_vec()
    };
    Resp {
        status,
        headers,
        body,
    }
}

/// [`request`], or `None` when the connection fails or ends without an answer
/// (the daemon died under it).
fn try_request(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<Resp> {
    let raw = exchange(
        addr,
        &request_head(addr, method, target, headers, body),
        body,
        Duration::from_secs(60),
    )
    .ok()?;
    raw.windows(4)
        .any(|w| w == b"\r\n\r\n")
        .then(|| parse_response(&raw))
}

/// The head of a one-shot request (`Connection: close`) with `body`'s length.
fn request_head(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> String {
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head
}

pub(crate) fn request(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let head = request_head(addr, method, target, headers, body);
    let raw = exchange(addr, &head, body, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{method} {target} to {addr}: {e}"));
    parse_response(&raw)
}

// ---------------------------------------------------------------------------------
// The daemon.

/// `reel serve` on a state directory: started, SIGKILLed, SIGTERMed and
/// restarted on the same port. Dropping it SIGKILLs the daemon and whatever
/// its jobs left running.
pub(crate) struct Daemon {
    pub(crate) state: PathBuf,
    args: Vec<String>,
    /// Extra environment of the next start only.
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// `127.0.0.1:PORT`; the port is 0 until the first start.
    pub(crate) addr: String,
    pub(crate) token: String,
    logs: tempfile::TempDir,
    starts: usize,
}

/// The URL `<state>/serve/endpoint.json` gives, if it names `pid`.
fn endpoint(state: &Path, pid: u32) -> Option<String> {
    let bytes = std::fs::read(state.join("serve/endpoint.json")).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    (v["pid"].as_u64() == Some(u64::from(pid))).then(|| v["url"].as_str().map(str::to_owned))?
}

impl Daemon {
    /// Starts `reel --state-dir STATE serve --listen 127.0.0.1:0 ARGS` and waits
    /// until it answers `/healthz`.
    pub(crate) fn start(state: &Path, args: &[&str]) -> Daemon {
        let mut d = Daemon {
            state: state.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            child: None,
            addr: "127.0.0.1:0".into(),
            token: String::new(),
            logs: tempfile::tempdir().unwrap(),
            starts: 0,
        };
        d.spawn();
        d
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("the daemon runs").id()
    }

    /// Starts the daemon again (after a kill or a stop) on the port it had.
    pub(crate) fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon already runs");
        self.starts += 1;
        let log = self
            .logs
            .path()
            .join(format!("serve-{}.stderr", self.starts));
        let mut cmd = Command::new(target_dir().join("reel"));
        cmd.arg("--state-dir")
            .arg(&self.state)
            .args(["serve", "--listen", &self.addr])
            .args(&self.args)
            .env_remove("RUST_LOG")
            .env_remove("REEL_PLUGIN_DIR")
            .env_remove("REEL_SERVER")
            .env_remove("REEL_TOKEN")
            .current_dir(workspace_root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        for (k, v) in self.env.drain(..) {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cannot start reel serve");
        let pid = child.id();
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "reel serve exited ({status}) before it answered:\n{}\nprocesses with a file of the state directory open:\n{}",
                    self.stderr(),
                    holders(&self.state)
                );
            }
            if let Some(url) = endpoint(&self.state, pid) {
                let addr = url.trim_start_matches("http://").to_owned();
                let head =
                    format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
                if let Ok(raw) = exchange(&addr, &head, b"", Duration::from_secs(10))
                    && raw.starts_with(b"HTTP/1.1 200")
                {
                    self.addr = addr;
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "reel serve did not answer /healthz within 60 s:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.token = std::fs::read_to_string(self.state.join("serve/token"))
            .expect("the daemon wrote its token")
            .trim()
            .to_owned();
    }

    /// SIGKILL, as the OOM killer or a power cut would; waits for the process.
    pub(crate) fn sigkill(&mut self) {
        let mut child = self.child.take().expect("the daemon runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM (the start of a drain) and returns.
    pub(crate) fn term(&self) {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.pid() as i32).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
    }

    /// SIGTERM and wait (at most `within`) for the daemon to exit.
    pub(crate) fn sigterm(&mut self, within: Duration) -> ExitStatus {
        self.term();
        self.wait_exit(within)
    }

    /// Waits (at most `within`) for the daemon to exit.
    pub(crate) fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                started.elapsed() < within,
                "reel serve did not exit within {within:?} of SIGTERM:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A clean stop: SIGTERM, exit status 0.
    pub(crate) fn stop(&mut self) {
        let status = self.sigterm(Duration::from_secs(60));
        assert!(status.success(), "reel serve: {status}\n{}", self.stderr());
    }

    /// SIGKILL, then start again.
    pub(crate) fn restart(&mut self) {
        self.sigkill();
        self.spawn();
    }

    /// Everything every start of the daemon wrote on stderr.
    pub(crate) fn stderr(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                std::fs::read_to_string(self.logs.path().join(format!("serve-{n}.stderr")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("")
    }

    pub(crate) fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    pub(crate) fn get(&self, target: &str) -> Resp {
        request(
            &self.addr,
            "GET",
            target,
            &[("Authorization", &self.auth())],
            b"",
        )
    }

    pub(crate) fn get_json(&self, target: &str) -> Value {
        self.get(target).expect(200, &format!("GET {target}"))
    }

    pub(crate) fn post(&self, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let auth = self.auth();
        let mut all = vec![("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        request(&self.addr, "POST", target, &all, body)
    }

    /// Submits `yaml` as `owner`; returns the job id.
    pub(crate) fn submit(&self, owner: &str, file: &str, yaml: &str) -> u64 {
        let v = self
            .post(
                &format!("/v1/jobs?owner={owner}&file={file}"),
                &[],
                yaml.as_bytes(),
            )
            .expect(202, &format!("submitting {file}"));
        assert_eq!(v["created"], true, "{v}");
        v["job"].as_u64().unwrap()
    }

    pub(crate) fn job(&self, id: u64) -> Value {
        self.get_json(&format!("/v1/jobs/{id}"))
    }

    pub(crate) fn events(&self, id: u64) -> Vec<Value> {
        self.get_json(&format!("/v1/jobs/{id}/events"))["events"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Every job, newest first.
    pub(crate) fn jobs(&self, query: &str) -> Vec<Value> {
        let v = self.get_json(&format!("/v1/jobs?limit=1000{query}"));
        assert_eq!(v["next_cursor"], Value::Null, "more than one page");
        v["jobs"].as_array().unwrap().clone()
    }

    /// Polls `GET /healthz` until it answers `status`; returns its body.
    pub(crate) fn wait_health(&self, status: u16, within: Duration) -> Value {
        let started = Instant::now();
        loop {
            let r = request(&self.addr, "GET", "/healthz", &[], b"");
            if r.status == status {
                return r.json();
            }
            assert!(
                started.elapsed() < within,
                "/healthz answered {} for {within:?}, not {status}",
                r.status
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls `GET /v1/jobs/{id}` until `done` says yes; panics after `within`.
    pub(crate) fn wait_job(
        &self,
        id: u64,
        within: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let j = self.job(id);
            if done(&j) {
                return j;
            }
            assert!(
                started.elapsed() < within,
                "job {id} not {what} within {within:?}: {j:#}\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn wait_ended(&self, id: u64, within: Duration) -> Value {
        self.wait_job(id, within, "ended", |j| j["state"] == "ended")
    }

    /// Waits until the job's first step has started (the job is running it).
    pub(crate) fn wait_step_started(&self, id: u64, within: Duration) -> Value {
        self.wait_job(id, within, "running its first step", |j| {
            j["steps"][0]["started_ms"].is_u64()
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failed test leaves no agents or steps behind.
        kill_sandboxes(&self.state);
    }
}

/// The event names of a timeline.
fn names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect()
}

/// The position of the first event named `name`.
fn position(events: &[Value], name: &str) -> Option<usize> {
    events.iter().position(|e| e["event"] == name)
}

fn curl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("curl");
    cmd.args(args).current_dir(workspace_root());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .expect("cannot run curl (scripts/install-vm-deps installs it)")
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// `reel_recovery_total{action="…"}` values of a `/metrics` text.
fn recovery_counts(metrics: &str) -> Vec<(String, u64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("reel_recovery_total{action=\""))
        .filter_map(|rest| {
            let (action, n) = rest.split_once("\"} ")?;
            Some((action.to_owned(), n.trim().parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// 1. The farm.

/// 200 jobs from three owners, two at a time, the daemon SIGKILLed twice
/// mid-run: every job ends exactly once, succeeded, with its output once;
/// nothing is left; and fair share pulls the last owner's jobs forward.
#[test]
fn farm_200_jobs_from_3_owners_survive_2_sigkills_and_fair_share_pulls_small_forward() {
    let began = Instant::now();
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(
        state.path(),
        &["--vcpus", "2", "--memory", "8G", "--disk", "40G"],
    );
    let token = d.token.clone();
    let url = d.url();
    let auth = format!("Authorization: Bearer {token}");
    let mut owner_of: HashMap<u64, &str> = HashMap::new();
    let mut two_steps: HashMap<u64, bool> = HashMap::new();
    let mut n = 0;
    for (owner, count) in [("big", 150), ("mid", 45), ("small", 5)] {
        for i in 0..count {
            n += 1;
            let two = n % 2 == 0;
            let mut yaml = format!(
                "name: {owner}-{i}\nresources: {{ vcpus: 1 }}\nsteps:\n  - name: one\n    command: echo $REEL_JOB_ID; sleep 0.05\n"
            );
            if two {
                yaml.push_str("  - name: two\n    command: echo two $REEL_JOB_ID; sleep 0.05\n");
            }
            let file = format!("{owner}-{i}.yml");
            let path = write(files.path(), &file, &yaml);
            let out = curl(
                &[
                    "-sS",
                    "--fail-with-body",
                    "-X",
                    "POST",
                    "-H",
                    &auth,
                    "--data-binary",
                    &format!("@{}", path.display()),
                    &format!("{url}/v1/jobs?owner={owner}&file={file}"),
                ],
                &[],
            );
            assert!(
                out.status.success(),
                "submitting {file}: {} {}",
                text(&out.stdout),
                text(&out.stderr)
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["created"], true, "{v}");
            let id = v["job"].as_u64().unwrap();
            owner_of.insert(id, owner);
            two_steps.insert(id, two);
        }
    }
    let submitted_in = began.elapsed();
    let total = owner_of.len();
    assert_eq!(total, 200);
    let ended = |d: &Daemon| d.jobs("&state=ended").len();
    let wait_ended = |d: &Daemon, at_least: usize, within: Duration| {
        let started = Instant::now();
        loop {
            let n = ended(d);
            if n >= at_least {
                return n;
            }
            assert!(
                started.elapsed() < within,
                "only {n} of {total} jobs ended within {within:?} (waiting for {at_least})\n{}",
                d.stderr()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let mut recovered: HashMap<String, u64> = HashMap::new();
    let mut killed_at = Vec::new();
    for share in [30, 60] {
        let at = wait_ended(&d, total * share / 100, Duration::from_secs(120));
        assert!(at < total, "every job ended before the kill at {share}%");
        if share == 60 {
            // The counters of the daemon started after the first kill.
            for (a, n) in recovery_counts(&text(&d.get("/metrics").body)) {
                *recovered.entry(a).or_default() += n;
            }
        }
        killed_at.push(at);
        d.restart();
    }
    wait_ended(&d, total, Duration::from_secs(180));
    let metrics = text(&d.get("/metrics").body);
    for (a, n) in recovery_counts(&metrics) {
        *recovered.entry(a).or_default() += n;
    }
    let ended_total: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("reel_jobs_ended_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        ended_total, total as u64,
        "reel_jobs_ended_total counts each job once across restarts:\n{metrics}"
    );
    for gauge in [
        "reel_jobs{state=\"queued\"} 0",
        "reel_jobs{state=\"running\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == gauge),
            "no {gauge:?} in\n{metrics}"
        );
    }

    let all = d.jobs("");
    assert_eq!(all.len(), total, "no job was made twice or retried");
    let mut problems = Vec::new();
    let mut granted: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
    let mut touched_by_recovery = 0;
    let mut lost_in_setup = Vec::new();
    for id in 1..=total as u64 {
        let events = d.events(id);
        let names = names(&events);
        let terminals: Vec<&String> = names
            .iter()
            .filter(|n| TERMINALS.contains(&n.as_str()))
            .collect();
        let grants = names.iter().filter(|n| *n == "SlotGranted").count();
        touched_by_recovery += usize::from(names.iter().any(|n| n == "RecoveryStarted"));
        let job = d.job(id);
        // A daemon killed while it set a sandbox up leaves no agent to take
        // back: recovery reaps it, as `reel recover` does (the crash matrix's
        // `must_be_lost`). Any job whose agent had started must succeed.
        let reaped_in_setup = job["outcome"] == "lost"
            && !names.iter().any(|n| n == "VmBooted")
            && names.iter().any(|n| n == "RecoveryStarted")
            && job["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("the engine died "));
        if grants == 1 {
            let at = |name| {
                events[position(&events, name).unwrap()]["at_ms"]
                    .as_u64()
                    .unwrap()
            };
            granted
                .entry(owner_of[&id])
                .or_default()
                .push((at("Submitted"), at("SlotGranted")));
        }
        if reaped_in_setup && terminals.len() == 1 && grants == 1 {
            lost_in_setup.push(id);
            continue;
        }
        if terminals.len() != 1 || job["outcome"] != "succeeded" || grants != 1 {
            problems.push(format!(
                "job {id}: outcome {} ({}), {} terminal events, {grants} grants: {names:?}",
                job["outcome"],
                job["reason"],
                terminals.len()
            ));
            continue;
        }
        // Each step's output once: a reattached step is not run again.
        let one = d.get(&format!("/v1/jobs/{id}/logs?step=1"));
        assert_eq!(text(&one.body), format!("{id}\n"), "job {id} step 1");
        if two_steps[&id] {
            let two = d.get(&format!("/v1/jobs/{id}/logs?step=2"));
            assert_eq!(text(&two.body), format!("two {id}\n"), "job {id} step 2");
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {total} jobs did not end once, succeeded, with one grant:\n{}\n{}",
        problems.len(),
        problems.join("\n"),
        d.stderr()
    );
    // Two run at a time: each kill can catch at most two in their setup.
    assert!(
        lost_in_setup.len() <= 4,
        "{} jobs lost in setup: {lost_in_setup:?}",
        lost_in_setup.len()
    );
    // Each small job is compared with the big jobs still waiting when it was
    // submitted (the submissions take a while; those granted before it came
    // cannot be overtaken): it must start before the median of them.
    for (i, &(submitted, at)) in granted["small"].iter().enumerate() {
        let mut waiting: Vec<u64> = granted["big"]
            .iter()
            .map(|&(_, granted)| granted)
            .filter(|&granted| granted > submitted)
            .collect();
        waiting.sort_unstable();
        assert!(
            waiting.len() >= 20,
            "only {} big jobs were waiting when small job {i} was submitted: \
             the test no longer shows fair share",
            waiting.len()
        );
        let median_big = waiting[waiting.len() / 2];
        assert!(
            at < median_big,
            "small job {i} was granted at {at}, after the median ({median_big}) of the {} big \
             jobs waiting when it was submitted at {submitted}: fair share did not pull it forward",
            waiting.len()
        );
    }
    d.stop();
    assert_nothing_left(state.path(), "farm");
    let mut rec: Vec<String> = recovered.iter().map(|(a, n)| format!("{a} {n}")).collect();
    rec.sort();
    eprintln!(
        "farm: {total} jobs (submitted in {:.1?}), killed at {killed_at:?} ended, all ended \
         in {:.1?}: {} succeeded, {} lost in their setup ({lost_in_setup:?}); \
         {touched_by_recovery} jobs taken back by recovery; reel_recovery_total: {}",
        submitted_in,
        began.elapsed(),
        total - lost_in_setup.len(),
        lost_in_setup.len(),
        rec.join(", ")
    );
}

// ---------------------------------------------------------------------------------
// 2. docs/api.md's examples.

/// The ```sh blocks of a markdown text, in order.
fn sh_blocks(md: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in md.lines() {
        match &mut current {
            None if line.trim_start() == "```sh" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_start() == "```" => blocks.push(current.take().unwrap()),
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unclosed ```sh block");
    blocks
}

/// The keys docs/api.md gives `JOB`.
const JOB_KEYS: [&str; 15] = [
    "id",
    "name",
    "owner",
    "runner",
    "state",
    "phase",
    "outcome",
    "reason",
    "submitted_ms",
    "queued_ms",
    "started_ms",
    "finished_ms",
    "steps",
    "attempt",
    "retry_of",
];

fn has_keys(v: &Value, keys: &[&str], what: &str) {
    for k in keys {
        assert!(v.get(k).is_some(), "{what}: no {k:?} in {v:#}");
    }
}

#[test]
fn every_example_of_docs_api_md_runs_as_written() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(state.path(), &[]);
    let md = std::fs::read_to_string(workspace_root().join("docs/api.md")).unwrap();
    let blocks = sh_blocks(&md);
    assert!(
        blocks.len() >= 9,
        "docs/api.md has {} sh examples",
        blocks.len()
    );
    let url = d.url();
    let token = d.token.clone();
    let state_dir = state.path().display().to_string();
    let env = [
        ("REEL", url.as_str()),
        ("TOKEN", token.as_str()),
        ("REEL_STATE_DIR", state_dir.as_str()),
    ];
    let mut logs_output = None;
    let mut events_output = None;
    for (i, block) in blocks.iter().enumerate() {
        let out = {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(block).current_dir(workspace_root());
            for (k, v) in env {
                cmd.env(k, v);
            }
            cmd.output().unwrap()
        };
        let what = format!("example {} of docs/api.md:\n{block}", i + 1);
        assert!(
            out.status.success(),
            "{what}exited {}: {} {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        let json = || -> Value {
            serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{what}printed no JSON ({e}): {}", text(&out.stdout)))
        };
        if block.contains("-X POST") && block.contains("/v1/jobs?") {
            let v = json();
            assert_eq!(v["job"], 1, "{what}{v}");
            assert_eq!(v["created"], true, "{what}{v}");
            assert_eq!(v["warnings"], serde_json::json!([]), "{what}{v}");
            // Queued when answered, or granted already.
            assert!(
                v["state"] == "queued" || v["state"] == "running",
                "{what}{v}"
            );
            let j = d.wait_ended(1, Duration::from_secs(60));
            assert_eq!(j["outcome"], "succeeded", "{j:#}");
        } else if block.contains("/cancel") {
            // Job 1 has ended: the documented 409.
            let v = json();
            let e = v["error"].as_str().unwrap_or_else(|| panic!("{what}{v}"));
            assert!(e.contains("already ended"), "{what}{v}");
        } else if block.contains("/events") {
            let v = json();
            let events = v["events"].as_array().unwrap();
            assert_eq!(events[0]["job"], 1, "{what}{v}");
            assert_eq!(events[0]["seq"], 1, "{what}{v}");
            assert_eq!(events[0]["event"], "Submitted", "{what}{v}");
            assert!(events[0]["at_ms"].is_u64(), "{what}{v}");
            events_output = Some(events.clone());
        } else if block.contains("/logs") && block.contains("format=chunks") {
            let chunks: Vec<Value> = text(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{what}{e}: {l}")))
                .collect();
            assert!(!chunks.is_empty(), "{what}no chunks");
            assert_eq!(chunks[0]["offset"], 0, "{what}{chunks:?}");
            assert_eq!(chunks[0]["step"], 1, "{what}{chunks:?}");
            assert_eq!(chunks[0]["stream"], "stdout", "{what}{chunks:?}");
            assert!(
                chunks[0]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("Hello from reel")),
                "{what}{chunks:?}"
            );
        } else if block.contains("/logs") {
            logs_output = Some(out.stdout.clone());
        } else if block.contains("/artifacts") {
            let v = json();
            // hello.yml declares none: an empty list.
            assert_eq!(v, serde_json::json!({"artifacts": []}), "{what}{v}");
        } else if block.contains("/metrics") {
            let m = text(&out.stdout);
            assert!(m.lines().any(|l| l.starts_with("reel_jobs{")), "{what}{m}");
            assert!(m.contains("# TYPE reel_jobs gauge"), "{what}{m}");
        } else if block.contains("/v1/scheduler") {
            let v = json();
            has_keys(
                &v,
                &[
                    "budget",
                    "used",
                    "free",
                    "queued",
                    "running",
                    "queue_by_owner",
                    "running_by_owner",
                ],
                &what,
            );
            assert!(v["budget"]["vcpus"].as_u64() > Some(0), "{what}{v}");
            assert_eq!(v["running"], 0, "{what}{v}");
        } else if block.contains("/healthz") {
            assert_eq!(json(), serde_json::json!({"status": "ok"}), "{what}");
        } else if block.contains("/v1/jobs/1\"") {
            let v = json();
            has_keys(&v, &JOB_KEYS, &what);
            has_keys(
                &v,
                &["spec", "cancel_requested", "retried_as", "artifacts"],
                &what,
            );
            let steps = v["steps"].as_array().unwrap();
            assert_eq!(steps.len(), 3, "{what}{v}");
            has_keys(
                &steps[0],
                &[
                    "step",
                    "name",
                    "exit_code",
                    "signal",
                    "timed_out",
                    "started_ms",
                    "finished_ms",
                    "output_bytes",
                ],
                &what,
            );
            assert_eq!(steps[0]["step"], 1, "{what}{v}");
        } else if block.contains("/v1/gc?") {
            let v = json();
            // Job 1 ended moments ago: kept.
            assert_eq!(v["deleted_jobs"], 0, "{what}{v}");
            assert_eq!(v["kept_jobs"], 1, "{what}{v}");
            assert_eq!(v["online"], true, "{what}{v}");
        } else if block.contains("/v1/jobs?") {
            let v = json();
            let jobs = v["jobs"].as_array().unwrap();
            assert_eq!(jobs.len(), 1, "{what}{v}");
            has_keys(&jobs[0], &JOB_KEYS, &what);
            assert_eq!(jobs[0]["owner"], "alice", "{what}{v}");
            assert_eq!(jobs[0]["name"], "hello", "{what}{v}");
            assert_eq!(v["next_cursor"], Value::Null, "{what}{v}");
        } else {
            panic!("{what}is an example this test does not know: say what it prints here");
        }
    }
    let logs_output = logs_output.expect("docs/api.md has a logs example");
    let events_output = events_output.expect("docs/api.md has an events example");
    d.stop();
    let offline = reel(state.path(), &["output", "1", "--step", "1"], &[]);
    assert!(offline.status.success(), "{}", text(&offline.stderr));
    assert_eq!(text(&logs_output), text(&offline.stdout));
    assert!(text(&offline.stdout).contains("Hello from reel"));
    let export = reel(state.path(), &["export", "1"], &[]);
    assert!(export.status.success(), "{}", text(&export.stderr));
    let exported: Vec<Value> = text(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        events_output, exported,
        "the events example prints what `reel export` does"
    );
}

// ---------------------------------------------------------------------------------
// 3. Authentication.

#[test]
fn tcp_requests_need_the_bearer_token_and_refusals_log_nothing_of_the_request() {
    let state = tempfile::tempdir().unwrap();
    let socket = state.path().join("reel.sock");
    // Debug level logs every authorized request's method and path.
    let mut d = Daemon::start(
        state.path(),
        &["--log-level", "debug", "--socket", socket.to_str().unwrap()],
    );
    let files = tempfile::tempdir().unwrap();
    let job = write(
        files.path(),
        "secret-job-file-q7.yml",
        "name: secret-job-name-q7\nsteps:\n  - command: echo secret-command-q7\n",
    );
    let url = d.url();
    let status_of = |args: &[&str]| -> (String, String) {
        let body = files.path().join("body");
        let mut all = vec!["-sS", "-o", body.to_str().unwrap(), "-w", "%{http_code}"];
        all.extend_from_slice(args);
        let out = curl(&all, &[]);
        assert!(out.status.success(), "curl {args:?}: {}", text(&out.stderr));
        (
            text(&out.stdout),
            std::fs::read_to_string(&body).unwrap_or_default(),
        )
    };
    let secret_target = format!("{url}/v1/jobs/secret-path-q7/logs?step=1&owner=secret-owner-q7");
    let post_target = format!("{url}/v1/jobs?owner=secret-owner-q7&file=secret-job-file-q7.yml");
    let data = format!("@{}", job.display());
    let unauthorized: Vec<Vec<&str>> = vec![
        vec![&secret_target],
        vec!["-H", "Authorization: Bearer wrong-token-q7", &secret_target],
        vec!["-H", "Authorization: wrong-token-q7", &secret_target],
        vec![
            "-X",
            "POST",
            "-H",
            "Authorization: Bearer wrong-token-q7",
            "-H",
            "Idempotency-Key: secret-key-q7",
            "--data-binary",
            &data,
            &post_target,
        ],
    ];
    let right = format!("Authorization: Bearer {}", d.token);
    let no_scheme = format!("Authorization: {}", d.token);
    let basic = format!("Authorization: Basic {}", d.token);
    let jobs = format!("{url}/v1/jobs");
    let mut refusals = unauthorized.clone();
    refusals.push(vec!["-H", &no_scheme, &jobs]);
    refusals.push(vec!["-H", &basic, &jobs]);
    for args in &refusals {
        let (code, body) = status_of(args);
        assert_eq!(code, "401", "{args:?}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v, serde_json::json!({"error": "unauthorized"}), "{args:?}");
    }
    let (code, body) = status_of(&["-H", &right, &jobs]);
    assert_eq!(code, "200", "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["jobs"],
        serde_json::json!([]),
        "the refused POST made no job"
    );
    let lower = format!("Authorization: bearer {}", d.token);
    assert_eq!(
        status_of(&["-H", &lower, &jobs]).0,
        "200",
        "the scheme is case-insensitive"
    );
    let (code, body) = status_of(&[&format!("{url}/healthz")]);
    assert_eq!(code, "200", "{body}");
    assert_eq!(body, r#"{"status":"ok"}"#);
    // A token is no key to /healthz's neighbours.
    assert_eq!(status_of(&[&format!("{url}/metrics")]).0, "401");
    // The unix socket needs none: its file mode is the check.
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the socket's mode");
    let (code, body) = status_of(&[
        "--unix-socket",
        socket.to_str().unwrap(),
        "http://reel/v1/jobs",
    ]);
    assert_eq!(code, "200", "{body}");
    // A SIGKILL leaves the socket file; the next start replaces it, and
    // keeps the token.
    let token = d.token.clone();
    d.restart();
    assert_eq!(d.token, token, "the token is kept across restarts");
    let (code, body) = status_of(&[
        "--unix-socket",
        socket.to_str().unwrap(),
        "http://reel/v1/jobs",
    ]);
    assert_eq!(code, "200", "after a restart: {body}");
    d.stop();
    let log = d.stderr();
    let refused = log.matches("unauthorized request from 127.0.0.1").count();
    assert_eq!(
        refused,
        refusals.len() + 1,
        "each refusal is logged once:\n{log}"
    );
    for secret in [
        "secret-owner-q7",
        "secret-job-file-q7",
        "secret-job-name-q7",
        "secret-command-q7",
        "secret-key-q7",
        "wrong-token-q7",
        "secret-path-q7",
        d.token.as_str(),
    ] {
        assert!(
            !log.contains(secret),
            "the daemon logged {secret:?}:\n{log}"
        );
    }
    assert!(!socket.exists(), "a clean stop removes the socket");
    assert!(
        log.contains("GET /v1/jobs 200"),
        "debug logging was on (authorized requests are logged):\n{log}"
    );
}

// ---------------------------------------------------------------------------------
// 4. `reel logs -f` through a daemon restart.

/// A `reel logs -f` of a state directory's daemon, its stdout and stderr in files.
struct Follower {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    what: String,
}

impl Follower {
    fn start(state: &Path, dir: &Path, name: &str, args: &[&str]) -> Follower {
        let (out, err) = (
            dir.join(format!("{name}.out")),
            dir.join(format!("{name}.err")),
        );
        let child = Command::new(target_dir().join("reel"))
            .arg("--state-dir")
            .arg(state)
            .args(["logs", "-f", "--reconnect-for", "60s"])
            .args(args)
            .env_remove("REEL_SERVER")
            .env_remove("REEL_TOKEN")
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Follower {
            child,
            out,
            err,
            what: format!("reel logs -f {}", args.join(" ")),
        }
    }

    fn stdout(&self) -> Vec<u8> {
        std::fs::read(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits for it to end; its stdout and stderr once it has.
    fn finish(&mut self, within: Duration) -> (ExitStatus, Vec<u8>, String) {
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s, self.stdout(), self.stderr());
            }
            assert!(
                started.elapsed() < within,
                "{} did not end within {within:?}: {}",
                self.what,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `reel_log_followers` from `/metrics`.
fn followers(d: &Daemon) -> u64 {
    let m = text(&d.get("/metrics").body);
    m.lines()
        .find_map(|l| l.strip_prefix("reel_log_followers "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no reel_log_followers in /metrics:\n{m}"))
}

#[test]
fn a_follower_that_goes_away_from_a_silent_step_is_let_go_while_the_step_runs() {
    let state = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let d = Daemon::start(state.path(), &[]);
    let job = d.submit(
        "alice",
        "quiet.yml",
        "name: quiet\nsteps:\n  - name: quiet\n    command: echo hi; sleep 120\n",
    );
    d.wait_step_started(job, Duration::from_secs(30));
    let mut f = Follower::start(
        state.path(),
        logs.path(),
        "f",
        &[&job.to_string(), "--step", "1"],
    );
    let started = Instant::now();
    while f.stdout() != b"hi\n" {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no output: {}",
            f.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(followers(&d), 1);
    // The client dies; the step goes on printing nothing.
    f.child.kill().unwrap();
    f.child.wait().unwrap();
    let gone = Instant::now();
    while followers(&d) != 0 {
        assert!(
            gone.elapsed() < Duration::from_secs(15),
            "the follow of a client that went away is still open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.job(job)["state"], "running", "the step is still running");
}

#[test]
fn logs_follow_survives_a_daemon_sigkill_byte_exact() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(state.path(), &[]);
    let job = d.submit(
        "alice",
        "numbered.yml",
        "name: numbered\nsteps:\n  - name: count\n    command: |\n      i=1\n      while [ $i -le 200 ]; do\n        echo \"line $i of 200\"\n        if [ $((i % 4)) -eq 0 ]; then echo \"err $i\" >&2; fi\n        sleep 0.02\n        i=$((i + 1))\n      done\n",
    );
    let id = job.to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut step = Follower::start(state.path(), dir.path(), "step", &[&id, "--step", "1"]);
    // Without --step: every step, then the job's own status once it ended.
    let mut whole = Follower::start(state.path(), dir.path(), "whole", &[&id]);
    // One stream: resumed from its start, skipping what was written.
    let mut errors = Follower::start(
        state.path(),
        dir.path(),
        "stderr",
        &[&id, "--step", "1", "--stream", "stderr"],
    );
    let started = Instant::now();
    while !text(&step.stdout()).contains("line 100 of 200\n") {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "reel logs -f printed no half of the output in 60 s: {}",
            step.stderr()
        );
        assert!(
            step.child.try_wait().unwrap().is_none(),
            "reel logs -f ended early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    d.restart();
    let mut outputs = Vec::new();
    for f in [&mut step, &mut whole, &mut errors] {
        let (status, out, err) = f.finish(Duration::from_secs(60));
        assert!(status.success(), "{}: {status}: {err}", f.what);
        assert!(
            err.contains("reconnecting") && err.contains("reconnected"),
            "{}: the restart did not break its stream: {err}",
            f.what
        );
        outputs.push((out, err));
    }
    let followed = outputs[0].0.clone();
    assert!(
        outputs[1]
            .1
            .contains(&format!("==> job {job} \"numbered\": succeeded")),
        "{}",
        outputs[1].1
    );
    assert!(outputs[1].0 == followed, "every step's output is step 1's");
    let j = d.wait_ended(job, Duration::from_secs(60));
    assert_eq!(j["outcome"], "succeeded", "{j:#}");

    // The endpoint itself: from any offset, exactly the bytes from there.
    let whole = d.get(&format!("/v1/jobs/{job}/logs?step=1"));
    assert_eq!(whole.status, 200);
    let full = whole.body.clone();
    for n in [0, 1, 13, 999, full.len() / 2, full.len() - 1, full.len()] {
        let r = d.get(&format!("/v1/jobs/{job}/logs?step=1&offset={n}"));
        assert_eq!(r.status, 200, "offset {n}");
        assert_eq!(r.header("x-reel-offset"), Some(n.to_string().as_str()));
        assert!(r.body == full[n..], "offset {n}: not the bytes from {n}");
    }
    d.stop();
    let offline = reel(state.path(), &["output", &id, "--step", "1"], &[]);
    assert!(offline.status.success(), "{}", text(&offline.stderr));
    assert!(
        followed == offline.stdout,
        "reel logs -f printed {} bytes, the log holds {}:\n{}",
        followed.len(),
        offline.stdout.len(),
        text(&followed)
    );
    assert!(full == offline.stdout);
    let offline_err = reel(
        state.path(),
        &["output", &id, "--step", "1", "--stream", "stderr"],
        &[],
    );
    let want_err: String = (1..=50).map(|i| format!("err {}\n", i * 4)).collect();
    assert_eq!(text(&offline_err.stdout), want_err);
    assert_eq!(
        text(&outputs[2].0),
        want_err,
        "reel logs -f --stream stderr"
    );
    // Each line once, in order: the step was taken back, not run again.
    let lines: Vec<String> = text(&followed)
        .lines()
        .filter(|l| l.starts_with("line "))
        .map(str::to_owned)
        .collect();
    let want: Vec<String> = (1..=200).map(|i| format!("line {i} of 200")).collect();
    assert_eq!(lines, want);
    assert_eq!(text(&followed).matches("err ").count(), 50);
}

// ---------------------------------------------------------------------------------
// 5. Hostile requests.

#[test]
fn hostile_requests_are_refused_and_do_not_disturb_a_running_job() {
    let state = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    // What `reel run` says about a bad file, with the same name.
    let bad = "name: bad\nsteps:\n  - name: one\n    comand: echo hi\n";
    write(files.path(), "bad.yml", bad);
    let run = Command::new(target_dir().join("reel"))
        .arg("--state-dir")
        .arg(files.path().join("state"))
        .args(["run", "bad.yml"])
        .current_dir(files.path())
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2), "{}", text(&run.stderr));
    // Its first line names the file; a second one says nothing was started.
    let run_says = text(&run.stderr);
    let first = run_says.lines().next().unwrap_or_default();
    let run_says = first.strip_prefix("reel: ").unwrap_or(first).to_owned();
    assert!(run_says.starts_with("bad.yml:4:5: "), "{run_says}");

    let d = Daemon::start(state.path(), &[]);
    let job = d.submit(
        "alice",
        "sleeper.yml",
        "name: sleeper\nsteps:\n  - name: sleep\n    command: sleep 3\n",
    );
    d.wait_step_started(job, Duration::from_secs(30));

    // A body over 4 MiB, sent whole by curl, and one announced by its length.
    let big = files.path().join("big.yml");
    std::fs::write(&big, vec![b'#'; (4 << 20) + 1]).unwrap();
    let out = curl(
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {}", d.token),
            "--data-binary",
            &format!("@{}", big.display()),
            &format!("{}/v1/jobs", d.url()),
        ],
        &[],
    );
    assert_eq!(text(&out.stdout), "413", "{}", text(&out.stderr));
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        d.token,
        5 << 20
    );
    let r = parse_response(&exchange(&d.addr, &head, b"", Duration::from_secs(10)).unwrap());
    assert_eq!(r.status, 413, "{}", text(&r.body));

    // A chunked body, which has no length to refuse it by: cut at the limit.
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nTransfer-Encoding: chunked\r\n\r\n",
        d.token
    );
    let mut chunked = Vec::new();
    for _ in 0..5 {
        chunked.extend_from_slice(format!("{:x}\r\n", 1 << 20).as_bytes());
        chunked.extend(std::iter::repeat_n(b'#', 1 << 20));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = parse_response(&exchange(&d.addr, &head, &chunked, Duration::from_secs(10)).unwrap());
    assert_eq!(r.status, 413, "{}", text(&r.body));
    // A head over 64 KiB.
    let head = format!(
        "GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(70 << 10)
    );
    let raw = exchange(&d.addr, &head, b"", Duration::from_secs(10)).unwrap();
    assert!(
        raw.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        text(&raw[..raw.len().min(200)])
    );

    // A request line that is not one.
    let raw = exchange(&d.addr, "GARBAGE\r\n\r\n", b"", Duration::from_secs(10)).unwrap();
    assert!(raw.starts_with(b"HTTP/1.1 400"), "{:?}", text(&raw));

    // A job file with a typo: the message `reel run` gives.
    let v = d
        .post("/v1/jobs?owner=alice&file=bad.yml", &[], bad.as_bytes())
        .expect(400, "a bad job file");
    assert_eq!(v["error"].as_str().unwrap(), run_says);

    // 20 clients that never finish their head.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(&d.addr).unwrap();
        s.write_all(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Le")
            .unwrap();
        slow.push(s);
    }
    for _ in 0..5 {
        let t = Instant::now();
        let r = request(&d.addr, "GET", "/healthz", &[], b"");
        assert_eq!(r.status, 200);
        let j = d.job(job);
        let took = t.elapsed();
        assert!(took < Duration::from_secs(1), "two requests took {took:?}");
        assert_eq!(
            j["state"], "running",
            "the hostile requests took longer than the job"
        );
    }
    let j = d.wait_ended(job, Duration::from_secs(30));
    drop(slow);
    assert_eq!(j["outcome"], "succeeded", "{j:#}");
    let step = &j["steps"][0];
    let ran = step["finished_ms"].as_u64().unwrap() - step["started_ms"].as_u64().unwrap();
    assert!(
        (3000..6000).contains(&ran),
        "`sleep 3` took {ran} ms among the hostile clients"
    );
    assert_eq!(d.jobs("").len(), 1, "nothing hostile made a job");
}

// ---------------------------------------------------------------------------------
// 6. Cancel and drain.

#[test]
fn cancel_a_queued_and_a_running_job_then_sigterm_drains_and_keeps_the_queue() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(state.path(), &["--vcpus", "1", "--drain", "1s"]);
    let long =
        "name: long\nresources: { vcpus: 1 }\nsteps:\n  - name: sleep\n    command: sleep 60\n";
    let short = "name: short\nresources: { vcpus: 1 }\nsteps:\n  - name: echo\n    command: echo after the restart\n";
    let running = d.submit("alice", "long.yml", long);
    d.wait_step_started(running, Duration::from_secs(30));
    let queued = d.submit("alice", "short.yml", short);
    assert_eq!(d.job(queued)["state"], "queued");

    // Queued: cancelled at once, never granted.
    let v = d
        .post(&format!("/v1/jobs/{queued}/cancel"), &[], b"")
        .expect(202, "cancel of a queued job");
    assert_eq!(v["state"], "ended", "{v}");
    let j = d.job(queued);
    assert_eq!(j["outcome"], "cancelled", "{j:#}");
    let ev = names(&d.events(queued));
    assert!(!ev.contains(&"SlotGranted".to_string()), "{ev:?}");
    assert!(ev.contains(&"CancelRequested".to_string()), "{ev:?}");
    assert_eq!(ev.last().map(String::as_str), Some("Cancelled"), "{ev:?}");
    let again = d.post(&format!("/v1/jobs/{queued}/cancel"), &[], b"");
    assert_eq!(again.status, 409, "{}", text(&again.body));
    assert_eq!(d.post("/v1/jobs/999/cancel", &[], b"").status, 404);

    // Running: CancelRequested before the teardown.
    let v = d
        .post(&format!("/v1/jobs/{running}/cancel"), &[], b"")
        .expect(202, "cancel of a running job");
    assert_eq!(v["state"], "running", "{v}");
    let j = d.wait_ended(running, Duration::from_secs(30));
    assert_eq!(j["outcome"], "cancelled", "{j:#}");
    let events = d.events(running);
    let asked = position(&events, "CancelRequested").expect("CancelRequested");
    let teardown = position(&events, "TeardownStarted").expect("TeardownStarted");
    assert!(asked < teardown, "{:?}", names(&events));
    assert!(position(&events, "StepStarted").unwrap() < asked);

    // SIGTERM with one running past --drain 1s and one queued.
    let busy = d.submit("alice", "long.yml", long);
    d.wait_step_started(busy, Duration::from_secs(30));
    let waiting = d.submit("alice", "short.yml", short);
    assert_eq!(d.job(waiting)["state"], "queued");
    let t = Instant::now();
    d.term();
    // Draining: still answering, but taking nothing new.
    let healthz = d.wait_health(503, Duration::from_secs(10));
    assert_eq!(healthz, serde_json::json!({"status": "draining"}));
    let refused = d.post("/v1/jobs?owner=alice&file=short.yml", &[], short.as_bytes());
    assert_eq!(refused.status, 503, "{}", text(&refused.body));
    let status = d.wait_exit(Duration::from_secs(30));
    let took = t.elapsed();
    assert!(status.success(), "{status}: {}", d.stderr());
    assert!(
        took >= Duration::from_secs(1),
        "exited after {took:?}, before --drain"
    );
    assert!(took < Duration::from_secs(15), "drain took {took:?}");
    let inspect = |id: u64| {
        reel_tests::json(&reel(
            state.path(),
            &["inspect", &id.to_string(), "--json"],
            &[],
        ))
    };
    let b = inspect(busy);
    assert_eq!(b["outcome"], "cancelled", "{b:#}");
    let reason = b["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("shut down"), "reason {reason:?}");
    let w = inspect(waiting);
    assert_eq!(w["phase"], "queued", "{w:#}");
    assert_nothing_left_but_queued(state.path());

    // The queue is the log's: the next daemon runs it.
    d.spawn();
    let j = d.wait_ended(waiting, Duration::from_secs(60));
    assert_eq!(j["outcome"], "succeeded", "{j:#}");
    let out = d.get(&format!("/v1/jobs/{waiting}/logs?step=1"));
    assert_eq!(text(&out.body), "after the restart\n");
    d.stop();
    assert_nothing_left(state.path(), "cancel and drain");
}

/// No sandbox is left while a job is still queued (`assert_nothing_left` also
/// wants no live job at all).
fn assert_nothing_left_but_queued(state: &Path) {
    let procs = reel_tests::processes_under(&state.join("sandboxes"));
    assert!(procs.is_empty(), "processes remain: {procs:?}");
    let dirs: Vec<_> = std::fs::read_dir(state.join("sandboxes"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(dirs.is_empty(), "sandbox directories remain: {dirs:?}");
}

// ---------------------------------------------------------------------------------
// 7. Idempotency.

#[test]
fn one_idempotency_key_names_one_job_across_a_sigkill() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(state.path(), &[]);
    let yaml = b"name: once\nsteps:\n  - command: echo once\n";
    let key = [("Idempotency-Key", "deploy-42")];
    let first = d
        .post("/v1/jobs?owner=alice&file=once.yml", &key, yaml)
        .expect(202, "first submission");
    assert_eq!(first["created"], true);
    let id = first["job"].as_u64().unwrap();
    let second = d
        .post("/v1/jobs?owner=alice&file=once.yml", &key, yaml)
        .expect(200, "second submission");
    assert_eq!(second["job"], id);
    assert_eq!(second["created"], false);
    d.restart();
    let third = d
        .post("/v1/jobs?owner=alice&file=once.yml", &key, yaml)
        .expect(200, "after a SIGKILL and a restart");
    assert_eq!(third["job"], id, "{third}");
    assert_eq!(third["created"], false);
    let other = d
        .post(
            "/v1/jobs?owner=alice&file=once.yml",
            &[("Idempotency-Key", "deploy-43")],
            yaml,
        )
        .expect(202, "another key");
    assert_ne!(other["job"], id);
    let bad = d.post(
        "/v1/jobs?owner=alice&file=once.yml",
        &[("Idempotency-Key", "reel:retry-of:1")],
        yaml,
    );
    assert_eq!(bad.status, 400, "the daemon's own keys are refused");
    // A key that is not printable ASCII is refused, every time: never
    // dropped, which would make a new job of each retry.
    for _ in 0..2 {
        let r = d.post(
            "/v1/jobs?owner=alice&file=once.yml",
            &[("Idempotency-Key", "clé-1")],
            yaml,
        );
        let v = r.expect(400, "a key with a non-ASCII character");
        assert!(
            v["error"].as_str().unwrap().contains("printable ASCII"),
            "{v}"
        );
    }
    for job in d.jobs("") {
        d.wait_ended(job["id"].as_u64().unwrap(), Duration::from_secs(60));
    }
    assert_eq!(d.jobs("").len(), 2);
    d.stop();
    assert_nothing_left(state.path(), "idempotency");
}

// ---------------------------------------------------------------------------------
// 8. Retry after lost.

/// SIGKILLs the daemon while `job` runs, kills its sandbox (so recovery must
/// reap it), and starts the daemon again.
fn lose(d: &mut Daemon, job: u64) {
    d.wait_step_started(job, Duration::from_secs(30));
    d.sigkill();
    kill_sandboxes(&d.state);
    d.spawn();
}

#[test]
fn a_lost_job_with_retries_left_runs_again_and_one_without_does_not() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(state.path(), &[]);
    // The first attempt waits to be lost; the next one ends at once.
    let first = d.submit(
        "alice",
        "flaky.yml",
        "name: flaky\nretry: { lost: 1 }\nsteps:\n  - name: work\n    command: if [ \"$REEL_JOB_ID\" = 1 ]; then sleep 60; fi; echo attempt $REEL_JOB_ID\n",
    );
    assert_eq!(first, 1);
    lose(&mut d, first);
    let j = d.wait_ended(first, Duration::from_secs(60));
    assert_eq!(j["outcome"], "lost", "{j:#}");
    let retry = d.wait_job(first, Duration::from_secs(30), "retried", |j| {
        j["retried_as"].is_u64()
    })["retried_as"]
        .as_u64()
        .unwrap();
    let r = d.wait_ended(retry, Duration::from_secs(60));
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
    assert_eq!(r["retry_of"], first);
    assert_eq!(r["attempt"], 2);
    assert_eq!(
        text(&d.get(&format!("/v1/jobs/{retry}/logs?step=1")).body),
        format!("attempt {retry}\n")
    );
    let names = names(&d.events(first));
    assert!(names.contains(&"RecoveryStarted".to_string()), "{names:?}");

    // No retries: lost, and that is all.
    let once = d.submit(
        "alice",
        "once.yml",
        "name: once\nretry: { lost: 0 }\nsteps:\n  - name: work\n    command: sleep 60\n",
    );
    lose(&mut d, once);
    let j = d.wait_ended(once, Duration::from_secs(60));
    assert_eq!(j["outcome"], "lost", "{j:#}");
    // The drain waits for the job's task, retry included.
    d.stop();
    let jobs = reel_tests::json(&reel(state.path(), &["jobs", "--json"], &[]));
    assert_eq!(jobs.as_array().unwrap().len(), 3, "{jobs:#}");
    // A start retries what is due; this is not.
    d.spawn();
    assert_eq!(d.jobs("").len(), 3);
    assert_eq!(d.job(once)["retried_as"], Value::Null);
    d.stop();
    assert_nothing_left(state.path(), "retry");
}

// ---------------------------------------------------------------------------------
// 9. The read commands while the daemon holds the log.

#[test]
fn read_commands_print_through_the_daemon_what_they_print_offline() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(state.path(), &[]);
    // `reel submit --wait` through the real daemon: the job's exit status.
    let submit = |file: &str, owner: &str| {
        reel(
            state.path(),
            &["submit", "--owner", owner, "--wait", file],
            &[],
        )
    };
    let ok = submit("examples/hello.yml", "alice");
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    let said = text(&ok.stdout);
    assert!(
        said.starts_with("job 1 submitted (examples/hello.yml)\n"),
        "{said}"
    );
    assert!(said.contains("job 1 hello: succeeded in "), "{said}");
    let bad = submit("examples/failing.yml", "bob");
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad.stderr));
    assert_eq!(d.job(1)["owner"], "alice");
    assert_eq!(d.job(2)["outcome"], "failed");
    let status = reel(state.path(), &["status", "1"], &[]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(
        text(&status.stdout).contains("outcome:    succeeded"),
        "{}",
        text(&status.stdout)
    );
    let commands: Vec<Vec<String>> = [
        vec!["jobs"],
        vec!["replay", "1"],
        vec!["replay", "1", "--json"],
        vec!["inspect", "1"],
        vec!["inspect", "1", "--json"],
        vec!["export", "1"],
        vec!["output", "1", "--step", "1"],
        vec!["output", "1"],
        vec!["replay", "2"],
        vec!["inspect", "2"],
        vec!["output", "2"],
    ]
    .iter()
    .map(|c| c.iter().map(|s| s.to_string()).collect())
    .collect();
    let run = |c: &[String]| {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        reel(state.path(), &args, &[])
    };
    let online: Vec<Output> = commands.iter().map(|c| run(c)).collect();
    d.stop();
    for (c, on) in commands.iter().zip(&online) {
        let off = run(c);
        assert!(
            text(&on.stderr).contains("the log is held by the daemon"),
            "reel {c:?} did not ask the daemon: {}",
            text(&on.stderr)
        );
        assert_eq!(
            on.status.code(),
            off.status.code(),
            "reel {c:?}: {}",
            text(&on.stderr)
        );
        assert!(
            on.stdout == off.stdout,
            "reel {c:?} through the daemon:\n{}\noffline:\n{}",
            text(&on.stdout),
            text(&off.stdout)
        );
    }
}

// ---------------------------------------------------------------------------------
// 10. The budget.

#[test]
fn a_job_larger_than_the_whole_budget_is_refused_with_the_numbers() {
    let state = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(state.path(), &["--memory", "1G"]);
    let r = d.post(
        "/v1/jobs?owner=alice&file=huge.yml",
        &[],
        b"name: huge\nresources: { memory: 2G }\nsteps:\n  - command: echo never\n",
    );
    let v = r.expect(400, "a job over the budget");
    let e = v["error"].as_str().unwrap();
    assert!(e.starts_with("huge.yml: "), "{e}");
    assert!(
        e.contains("2 GiB memory") && e.contains("1 GiB memory"),
        "{e}"
    );
    assert_eq!(d.jobs(""), Vec::<Value>::new(), "nothing was written");
    d.stop();
}

// ---------------------------------------------------------------------------------
// 11. The crash matrix, through the daemon.

/// The points of a job's life where a daemon differs from `reel recover`
/// (it appends `Submitted`, `Queued` and `SlotGranted` itself, answers the
/// submitter, and takes jobs back on start), and a sample of the rest, which
/// `crash.rs` covers for every event.
const DAEMON_POINTS: [&str; 11] = [
    "Submitted",
    "Queued",
    "SlotGranted",
    "CidAllocated",
    "SandboxPlanned",
    "AgentConnected",
    "StepStarted",
    "StepFinished",
    "TeardownStarted",
    "Cleaned",
    "Succeeded",
];

/// The daemon SIGKILLed before and after each point (`REEL_TEST_CRASH_AT`)
/// while it runs a job submitted with an idempotency key; the submitter,
/// which may have had no answer, sends it again with the same key to the
/// restarted daemon: one job, run once, ended once, nothing left.
#[test]
fn a_daemon_killed_at_each_point_of_a_job_takes_it_back_and_the_key_names_it() {
    let expected = crate::crash::expected_output();
    let key = [("Idempotency-Key", "matrix-1")];
    let mut failures = Vec::new();
    for point in DAEMON_POINTS {
        for when in ["before", "after"] {
            let state = tempfile::tempdir().unwrap();
            let mut d = Daemon::start(state.path(), &[]);
            // Armed from the second start on: the first only picks the port.
            d.stop();
            d.env = vec![("REEL_TEST_CRASH_AT".into(), format!("{point}:{when}"))];
            d.spawn();
            let auth = d.auth();
            let target = "/v1/jobs?owner=alice&file=lines.yml";
            let headers = [("Authorization", auth.as_str()), key[0]];
            let first = try_request(
                &d.addr,
                "POST",
                target,
                &headers,
                crate::crash::JOB.as_bytes(),
            );
            let status = d.wait_exit(Duration::from_secs(60));
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&status),
                Some(9),
                "{point}:{when}: the daemon was not killed at its point: {status}\n{}",
                d.stderr()
            );
            d.spawn();
            let again = d.post(target, &key, crate::crash::JOB.as_bytes()).json();
            let id = again["job"]
                .as_u64()
                .unwrap_or_else(|| panic!("{point}:{when}: {again}"));
            let answered = first.as_ref().filter(|r| r.status == 202).map(|r| r.json());
            let lost_submission = point == "Submitted" && when == "before";
            let j = d.wait_ended(id, Duration::from_secs(60));
            let events = d.events(id);
            let names = names(&events);
            let terminals = names
                .iter()
                .filter(|n| TERMINALS.contains(&n.as_str()))
                .count();
            let lost = crate::crash::must_be_lost(point, when);
            let want = if lost { "lost" } else { "succeeded" };
            let mut wrong = Vec::new();
            if again["created"] != lost_submission {
                wrong.push(format!("the second submission answered {again}"));
            }
            if let Some(a) = &answered
                && a["job"] != id
            {
                wrong.push(format!("first answer {a}, second {again}"));
            }
            if d.jobs("").len() != 1 {
                wrong.push(format!("{} jobs", d.jobs("").len()));
            }
            if terminals != 1 || j["outcome"] != want {
                wrong.push(format!(
                    "outcome {} ({}), {terminals} terminal events",
                    j["outcome"], j["reason"]
                ));
            }
            if !lost {
                let mut out = text(&d.get(&format!("/v1/jobs/{id}/logs?step=1")).body);
                out.push_str(&text(&d.get(&format!("/v1/jobs/{id}/logs?step=2")).body));
                if out != expected {
                    wrong.push(format!("output {out:?}"));
                }
            }
            d.stop();
            if wrong.is_empty() {
                assert_nothing_left(state.path(), &format!("{point}:{when}"));
            } else {
                failures.push(format!("{point}:{when}: {}: {names:?}", wrong.join("; ")));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every process with a file under `dir` open: pid, state, command line and
/// the files, one line each (what a refused start is asked about).
fn holders(dir: &Path) -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let open: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter(|target| target.starts_with(dir))
            .map(|target| target.display().to_string())
            .collect();
        if open.is_empty() {
            continue;
        }
        let read =
            |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default();
        let state = read("status")
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or_default()
            .to_owned();
        out.push_str(&format!(
            "  {pid} {state} wchan={} cmd={:?} ppid-line={:?}: {}\n",
            read("wchan"),
            read("cmdline").replace('\0', " "),
            read("status")
                .lines()
                .find(|l| l.starts_with("PPid:"))
                .unwrap_or_default()
                .to_owned(),
            open.join(", ")
        ));
    }
    out
}

// ---------------------------------------------------------------------------------
// Retention on start.

#[test]
fn a_daemon_with_gc_keep_deletes_ended_jobs_on_start_and_says_how_far_back() {
    let state = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = reel(state.path(), &["run", "-q", "examples/hello.yml"], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    // Ended within the hour: kept.
    let mut d = Daemon::start(state.path(), &["--gc-keep", "1h"]);
    assert_eq!(d.jobs("").len(), 2);
    d.stop();
    let mut d = Daemon::start(state.path(), &["--gc-keep", "0s"]);
    assert!(d.jobs("").is_empty(), "{:?}", d.jobs(""));
    let out = reel(state.path(), &["jobs"], &[]);
    assert!(
        text(&out.stdout).contains("were deleted by reel gc"),
        "{}",
        text(&out.stdout)
    );
    let id = d.submit(
        "alice",
        "after.yml",
        "name: after\nsteps:\n  - name: s\n    command: echo after\n",
    );
    assert_eq!(id, 3, "a deleted job's id was used again");
    d.wait_ended(id, Duration::from_secs(60));
    d.stop();
    let out = reel(state.path(), &["verify"], &[]);
    assert!(
        out.status.success() && text(&out.stdout).contains("checked 1 jobs"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_nothing_left(state.path(), "gc on start");
}

#[test]
fn gc_through_the_daemon_deletes_ended_jobs_while_a_job_runs_and_survives_a_sigkill() {
    let state = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        let out = reel(state.path(), &["run", "-q", "examples/hello.yml"], &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let mut d = Daemon::start(state.path(), &[]);
    let running = d.submit(
        "alice",
        "slow.yml",
        "name: slow\nsteps:\n  - name: s\n    command: echo started; sleep 3; echo done\n",
    );
    d.wait_job(running, Duration::from_secs(60), "running", |j| {
        j["state"] == "running"
    });
    let out = reel(state.path(), &["gc", "--keep", "0s"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("deleted 3 jobs") && said.contains("done by the running daemon"),
        "{said}"
    );
    let ids: Vec<u64> = d
        .jobs("")
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![running]);
    for gone in 1..=3 {
        assert!(!state.path().join(format!("output/{gone}")).exists());
    }
    let j = d.wait_ended(running, Duration::from_secs(60));
    assert_eq!(j["outcome"], "succeeded", "{j:#}");
    let out = reel(state.path(), &["output", &running.to_string()], &[]);
    assert_eq!(text(&out.stdout), "started\ndone\n");

    // A daemon SIGKILLed in the middle of a gc: the next one finishes it.
    let more: Vec<u64> = (0..2)
        .map(|i| {
            d.submit(
                "alice",
                "quick.yml",
                &format!("name: quick{i}\nsteps:\n  - name: s\n    command: echo {i}\n"),
            )
        })
        .collect();
    for id in &more {
        d.wait_ended(*id, Duration::from_secs(60));
    }
    d.sigkill();
    d.env
        .push(("REEL_TEST_GC_CRASH".into(), "forgotten:1".into()));
    d.spawn();
    let out = reel(state.path(), &["gc", "--keep", "0s"], &[]);
    assert!(!out.status.success(), "the gc outlived its daemon");
    let status = d.wait_exit(Duration::from_secs(30));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{}",
        d.stderr()
    );
    d.spawn();
    let out = reel(state.path(), &["gc", "--keep", "0s", "--json"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["deleted_jobs"], 3, "{r}");
    assert_eq!(r["resumed_jobs"], 3, "{r}");
    assert!(d.jobs("").is_empty());
    d.stop();
    // The journal frames go once gc has the log to itself.
    let out = reel(state.path(), &["verify"], &[]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let out = reel(state.path(), &["gc", "--keep", "0s", "--json"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["journal_bytes_after"], 0, "{r}");
    let out = reel(state.path(), &["verify"], &[]);
    assert!(
        out.status.success() && text(&out.stdout).contains("checked 0 jobs"),
        "{}",
        text(&out.stdout)
    );
    assert_nothing_left(state.path(), "gc through the daemon");
}
