//! The daemon's clients (`submit`, `status`, `cancel`, `logs`, `artifacts`,
//! and the read commands asking the daemon that holds a log), run as the real
//! `reel` binary against a stub HTTP server written here: a thread on
//! 127.0.0.1:0 answering canned responses per path, checking the bearer
//! token, recording every request, and able to go away for a while (a daemon
//! restart) and to drop a connection in the middle of an answer.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reel_engine::store::{EventLog, LogOptions, LogReader};
use serde_json::{Value, json};

const TOKEN: &str = "s3cret-token";

// ---------------------------------------------------------------------------------
// The stub daemon.

#[derive(Clone, Debug)]
struct Req {
    method: String,
    path: String,
    query: HashMap<String, String>,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Req {
    fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }
}

#[derive(Clone, Default)]
struct Ctl {
    requests: Arc<Mutex<Vec<Req>>>,
    /// Set by a handler: close the listener for this long, then listen again
    /// on the same port (connections are refused meanwhile).
    restart: Arc<Mutex<Option<Duration>>>,
}

impl Ctl {
    fn requests(&self) -> Vec<Req> {
        self.requests.lock().unwrap().clone()
    }
    fn to(&self, method: &str, path: &str) -> Vec<Req> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path == path)
            .collect()
    }
}

struct Stub {
    url: String,
    ctl: Ctl,
}

type Handler = dyn Fn(&Req, &mut TcpStream, &Ctl) + Send + Sync;

/// Serves `handler` on 127.0.0.1, one request per connection, for at most
/// two minutes.
fn serve(handler: impl Fn(&Req, &mut TcpStream, &Ctl) + Send + Sync + 'static) -> Stub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let ctl = Ctl::default();
    let handler: Arc<Handler> = Arc::new(handler);
    let c = ctl.clone();
    std::thread::spawn(move || {
        let began = Instant::now();
        let mut listener = Some(listener);
        while began.elapsed() < Duration::from_secs(120) {
            let pause = c.restart.lock().unwrap().take();
            if let Some(pause) = pause {
                drop(listener.take());
                std::thread::sleep(pause);
                let l = loop {
                    match TcpListener::bind(("127.0.0.1", port)) {
                        Ok(l) => break l,
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                };
                l.set_nonblocking(true).unwrap();
                listener = Some(l);
            }
            match listener.as_ref().unwrap().accept() {
                Ok((stream, _)) => {
                    let (h, c) = (handler.clone(), c.clone());
                    std::thread::spawn(move || handle(stream, &*h, &c));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Stub {
        url: format!("http://127.0.0.1:{port}"),
        ctl,
    }
}

fn handle(mut stream: TcpStream, handler: &Handler, ctl: &Ctl) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let Some(req) = read_request(&mut stream) else {
        return;
    };
    ctl.requests.lock().unwrap().push(req.clone());
    let auth = req.headers.get("authorization").map(String::as_str);
    if req.path != "/healthz" && auth != Some(&format!("Bearer {TOKEN}")) {
        respond_json(&mut stream, 401, &json!({"error": "unauthorized"}));
        return;
    }
    handler(&req, &mut stream, ctl);
}

fn read_request(stream: &mut TcpStream) -> Option<Req> {
    let mut reader = std::io::BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    let (path, qs) = target.split_once('?').unwrap_or((&target, ""));
    let query = qs
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    Some(Req {
        method,
        path: decode(path),
        query,
        headers,
        body,
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

fn head(
    stream: &mut TcpStream,
    status: u16,
    ctype: &str,
    extra: &[(&str, String)],
    len: Option<usize>,
) {
    let mut h = format!("HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nConnection: close\r\n");
    match len {
        Some(n) => h.push_str(&format!("Content-Length: {n}\r\n")),
        None => h.push_str("Transfer-Encoding: chunked\r\n"),
    }
    for (k, v) in extra {
        h.push_str(&format!("{k}: {v}\r\n"));
    }
    h.push_str("\r\n");
    let _ = stream.write_all(h.as_bytes());
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    ctype: &str,
    extra: &[(&str, String)],
    body: &[u8],
) {
    head(stream, status, ctype, extra, Some(body.len()));
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

fn respond_json(stream: &mut TcpStream, status: u16, v: &Value) {
    respond(
        stream,
        status,
        "application/json",
        &[],
        v.to_string().as_bytes(),
    );
}

fn chunk(stream: &mut TcpStream, bytes: &[u8]) {
    let _ = write!(stream, "{:x}\r\n", bytes.len());
    let _ = stream.write_all(bytes);
    let _ = stream.write_all(b"\r\n");
    let _ = stream.flush();
}

fn end_chunks(stream: &mut TcpStream) {
    let _ = stream.write_all(b"0\r\n\r\n");
    let _ = stream.flush();
}

fn not_found(stream: &mut TcpStream, req: &Req) {
    respond_json(
        stream,
        404,
        &json!({"error": format!("no route {}", req.path)}),
    );
}

// ---------------------------------------------------------------------------------
// Running reel.

fn reel(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reel"));
    cmd.arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("REEL_SERVER")
        .env_remove("REEL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let began = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if began.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "reel {args:?} still running after 60 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// A state directory whose `serve/token` is the stub's token.
fn state_with_token() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("serve")).unwrap();
    std::fs::write(dir.path().join("serve/token"), format!("{TOKEN}\n")).unwrap();
    dir
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ---------------------------------------------------------------------------------
// submit

#[test]
fn submit_sends_the_file_owner_and_key_and_prints_the_job() {
    let next = Arc::new(AtomicUsize::new(12));
    let seen_keys = Arc::new(Mutex::new(HashMap::<String, u64>::new()));
    let stub = serve(
        move |req, s, _| match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/v1/jobs") => {
                if String::from_utf8_lossy(&req.body).contains("BROKEN") {
                    let file = req.q("file").unwrap_or("");
                    return respond_json(
                        s,
                        400,
                        &json!({"error": format!("{file}:2:3: unknown key `BROKEN`")}),
                    );
                }
                let key = req.headers.get("idempotency-key").cloned();
                let mut keys = seen_keys.lock().unwrap();
                if let Some(job) = key.as_ref().and_then(|k| keys.get(k)) {
                    return respond_json(
                        s,
                        200,
                        &json!({"job": job, "created": false, "state": "queued"}),
                    );
                }
                let job = next.fetch_add(1, Ordering::SeqCst) as u64;
                if let Some(k) = key {
                    keys.insert(k, job);
                }
                respond_json(
                    s,
                    202,
                    &json!({"job": job, "created": true, "state": "queued"}),
                );
            }
            _ => not_found(s, req),
        },
    );
    let state = state_with_token();
    let files = tempfile::tempdir().unwrap();
    let hello = files.path().join("hello.yml");
    let body = "name: hello\nsteps:\n  - command: echo hi\n";
    std::fs::write(&hello, body).unwrap();
    let hello_s = hello.to_str().unwrap();

    let out = reel(
        state.path(),
        &[
            "--server",
            &stub.url,
            "submit",
            "--owner",
            "alice",
            "--idempotency-key",
            "docs-1",
            hello_s,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), format!("job 12 submitted ({hello_s})\n"));
    let posts = stub.ctl.to("POST", "/v1/jobs");
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].q("owner"), Some("alice"));
    assert_eq!(posts[0].q("file"), Some("hello.yml"));
    assert_eq!(
        posts[0].headers.get("idempotency-key").map(String::as_str),
        Some("docs-1")
    );
    assert_eq!(posts[0].headers["authorization"], format!("Bearer {TOKEN}"));
    assert_eq!(posts[0].body, body.as_bytes());

    // The same key again names the first job.
    let out = reel(
        state.path(),
        &[
            "--server",
            &stub.url,
            "submit",
            "--idempotency-key",
            "docs-1",
            hello_s,
        ],
        &[("USER", "bob")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("job 12 already submitted with key docs-1 ({hello_s})\n")
    );
    assert_eq!(
        stub.ctl.to("POST", "/v1/jobs")[1].q("owner"),
        Some("bob"),
        "owner from $USER"
    );

    // Several files: keys K-1, K-2, …; a refusal stops there and says what was sent.
    let two = files.path().join("two.yml");
    std::fs::write(&two, body).unwrap();
    let bad = files.path().join("bad.yml");
    std::fs::write(&bad, "name: x\nBROKEN: 1\n").unwrap();
    let before = stub.ctl.to("POST", "/v1/jobs").len();
    let out = reel(
        state.path(),
        &[
            "--server",
            &stub.url,
            "submit",
            "--idempotency-key",
            "K",
            hello_s,
            two.to_str().unwrap(),
            bad.to_str().unwrap(),
            hello_s,
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let posts = stub.ctl.to("POST", "/v1/jobs");
    assert_eq!(
        posts.len() - before,
        3,
        "the file after the refused one is not sent"
    );
    let keys: Vec<&str> = posts[before..]
        .iter()
        .map(|p| p.headers["idempotency-key"].as_str())
        .collect();
    assert_eq!(keys, ["K-1", "K-2", "K-3"]);
    assert_eq!(
        stdout(&out),
        format!(
            "job 13 submitted ({hello_s})\njob 14 submitted ({})\n",
            two.display()
        )
    );
    let err = stderr(&out);
    assert!(
        err.contains("reel: bad.yml:2:3: unknown key `BROKEN`\n"),
        "{err}"
    );
    assert!(err.contains("submitted before it: job 13"), "{err}");
    assert!(
        err.contains(&format!("not submitted: {}, {hello_s}", bad.display())),
        "{err}"
    );

    // A file that cannot be read: nothing is sent at all.
    let before = stub.ctl.requests().len();
    let out = reel(
        state.path(),
        &[
            "--server",
            &stub.url,
            "submit",
            hello_s,
            "/nonexistent/job.yml",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("nothing was submitted"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stub.ctl.requests().len(), before);
}

/// A stub whose jobs end with `outcomes[id - 1]` on their second poll.
fn ending_stub(outcomes: &'static [&'static str]) -> Stub {
    let next = Arc::new(AtomicUsize::new(1));
    let polls = Arc::new(Mutex::new(HashMap::<u64, u32>::new()));
    serve(move |req, s, _| {
        if req.method == "POST" && req.path == "/v1/jobs" {
            let job = next.fetch_add(1, Ordering::SeqCst);
            return respond_json(
                s,
                202,
                &json!({"job": job, "created": true, "state": "queued"}),
            );
        }
        let Some(id) = req
            .path
            .strip_prefix("/v1/jobs/")
            .and_then(|i| i.parse::<u64>().ok())
        else {
            return not_found(s, req);
        };
        let mut polls = polls.lock().unwrap();
        let n = polls.entry(id).or_default();
        *n += 1;
        let outcome = outcomes[id as usize - 1];
        let job = if *n < 2 {
            json!({"id": id, "name": format!("job{id}"), "state": "running", "phase": "running",
                   "outcome": null, "submitted_ms": 1000, "started_ms": 1100, "steps": []})
        } else {
            json!({"id": id, "name": format!("job{id}"), "state": "ended", "phase": "terminal",
                   "outcome": outcome,
                   "reason": if outcome == "succeeded" { Value::Null } else { json!(format!("it {outcome}")) },
                   "submitted_ms": 1000, "started_ms": 1100, "finished_ms": 3200, "steps": []})
        };
        respond_json(s, 200, &job);
    })
}

#[test]
fn submit_wait_exits_with_the_most_severe_outcome() {
    let state = state_with_token();
    let files = tempfile::tempdir().unwrap();
    let f = files.path().join("j.yml");
    std::fs::write(&f, "steps:\n  - command: true\n").unwrap();
    let f = f.to_str().unwrap();
    for (outcomes, code) in [
        (&["succeeded"][..], 0),
        (&["failed"][..], 1),
        (&["cancelled"][..], 4),
        (&["timed_out"][..], 3),
        (&["succeeded", "cancelled", "failed"][..], 4),
    ] {
        let outcomes: &'static [&'static str] = Vec::leak(outcomes.to_vec());
        let stub = ending_stub(outcomes);
        let mut args = vec!["--server", stub.url.as_str(), "submit", "--wait"];
        args.extend(std::iter::repeat_n(f, outcomes.len()));
        let out = reel(state.path(), &args, &[]);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{outcomes:?}: {}",
            stderr(&out)
        );
        let text = stdout(&out);
        for (i, o) in outcomes.iter().enumerate() {
            let id = i + 1;
            let line = if *o == "succeeded" {
                format!("job {id} job{id}: succeeded in 2.1s\n")
            } else {
                format!(
                    "job {id} job{id}: {} in 2.1s: it {o}\n",
                    o.replace('_', " ")
                )
            };
            assert!(text.contains(&line), "{line:?} in {text:?}");
        }
        // Each job was polled until it ended, and no more.
        for id in 1..=outcomes.len() {
            assert_eq!(stub.ctl.to("GET", &format!("/v1/jobs/{id}")).len(), 2);
        }
    }
}

// ---------------------------------------------------------------------------------
// Where the daemon is, the token, and the messages when either is wrong.

fn status_stub() -> Stub {
    serve(|req, s, _| match req.path.as_str() {
        "/v1/jobs/7" => respond_json(
            s,
            200,
            &json!({"id": 7, "name": "hello", "owner": "alice", "runner": "process",
                "state": "ended", "phase": "terminal", "outcome": "succeeded", "reason": null,
                "submitted_ms": 1_795_790_825_123u64, "queued_ms": 1_795_790_825_125u64,
                "started_ms": 1_795_790_825_130u64, "finished_ms": 1_795_790_825_160u64,
                "attempt": 1, "retry_of": null, "retried_as": null, "cancel_requested": false,
                "steps": [{"step": 1, "name": "greet", "exit_code": 0, "signal": null,
                    "timed_out": false, "started_ms": 1_795_790_825_131u64,
                    "finished_ms": 1_795_790_825_150u64, "output_bytes": 6}],
                "artifacts": []}),
        ),
        "/v1/jobs/8/cancel" => respond_json(s, 409, &json!({"error": "job 8 already ended"})),
        "/v1/jobs/8" => respond_json(
            s,
            200,
            &json!({"id": 8, "name": "x", "state": "ended", "outcome": "failed", "steps": []}),
        ),
        "/v1/jobs/9/cancel" => respond_json(s, 202, &json!({"job": 9, "state": "running"})),
        _ => not_found(s, req),
    })
}

#[test]
fn status_finds_the_daemon_and_its_token_and_says_plainly_when_either_is_wrong() {
    let stub = status_stub();
    let state = state_with_token();
    // No --server: endpoint.json names a live pid (this test's own).
    std::fs::write(
        state.path().join("serve/endpoint.json"),
        json!({"url": stub.url, "socket": null, "pid": std::process::id()}).to_string(),
    )
    .unwrap();
    let out = reel(state.path(), &["status", "7"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("job 7 \"hello\"\n"), "{text}");
    assert!(text.contains("outcome:    succeeded"), "{text}");
    assert!(text.contains("owner:      alice"), "{text}");
    let row = text.lines().find(|l| l.contains("\"greet\"")).unwrap();
    assert!(
        row.trim_start().starts_with('1') && row.contains("19ms") && row.ends_with(" 6"),
        "{row}"
    );
    let v: Value =
        serde_json::from_slice(&reel(state.path(), &["status", "7", "--json"], &[]).stdout)
            .unwrap();
    assert_eq!(v["steps"][0]["name"], "greet");

    let out = reel(state.path(), &["status", "41"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr(&out), "reel: no job 41\n");

    // cancel: 409 says how the job ended, exit 1; 202 exit 0.
    let out = reel(state.path(), &["cancel", "8"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stdout(&out), "job 8 already ended (failed)\n");
    let out = reel(state.path(), &["cancel", "9"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("job 9: cancel requested"),
        "{}",
        stdout(&out)
    );

    // A wrong token, from each place a token comes from.
    let wrong = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(wrong.path(), "nope\n").unwrap();
    let wrong_s = wrong.path().to_str().unwrap();
    let out = reel(state.path(), &["status", "7", "--token-file", wrong_s], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!(
            "reel: the daemon at {} refused the token (from --token-file {wrong_s})\n",
            stub.url
        )
    );
    let out = reel(state.path(), &["status", "7"], &[("REEL_TOKEN", "nope")]);
    assert_eq!(
        stderr(&out),
        format!(
            "reel: the daemon at {} refused the token (from $REEL_TOKEN)\n",
            stub.url
        )
    );
    std::fs::write(state.path().join("serve/token"), "stale\n").unwrap();
    let out = reel(state.path(), &["status", "7"], &[]);
    assert_eq!(
        stderr(&out),
        format!(
            "reel: the daemon at {} refused the token (from {})\n",
            stub.url,
            state.path().join("serve/token").display()
        )
    );
    // $REEL_TOKEN wins over the file; --server over endpoint.json.
    let out = reel(state.path(), &["status", "7"], &[("REEL_TOKEN", TOKEN)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // Nothing listening: one line, exit 2.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let out = reel(
        state.path(),
        &["--server", &url, "status", "7"],
        &[("REEL_TOKEN", TOKEN)],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!("reel: no reel daemon answers at {url}; start one with `reel serve`\n")
    );
    let out = reel(
        state.path(),
        &["logs", "7", "-f"],
        &[("REEL_SERVER", &url), ("REEL_TOKEN", TOKEN)],
    );
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        stderr(&out),
        format!("reel: no reel daemon answers at {url}; start one with `reel serve`\n"),
        "before any answer there is nothing to reconnect to"
    );
}

// ---------------------------------------------------------------------------------
// logs -f through a dropped connection and a daemon restart

/// Step 1's output: served as `first` in one answer that then breaks and
/// the daemon goes away for 300 ms; the rest on the next answer, which must
/// ask for it at the right place.
struct Following {
    first: Vec<u8>,
    rest: Vec<u8>,
    done: Mutex<bool>,
    asked: Mutex<Vec<(u64, Option<String>)>>,
}

fn follow_stub(f: Arc<Following>) -> Stub {
    serve(move |req, s, ctl| {
        let total = (f.first.len() + f.rest.len()) as u64;
        match req.path.as_str() {
            "/v1/jobs/5" => {
                let done = *f.done.lock().unwrap();
                let job = if done {
                    json!({"id": 5, "name": "build-it", "state": "ended", "phase": "terminal",
                        "outcome": "succeeded", "reason": null, "submitted_ms": 1000,
                        "started_ms": 1000, "finished_ms": 2500,
                        "steps": [{"step": 1, "name": "compile", "started_ms": 1000,
                            "finished_ms": 2400, "exit_code": 0, "output_bytes": total}],
                        "spec": {"steps": [{"name": "compile"}]}})
                } else {
                    json!({"id": 5, "name": "build-it", "state": "running", "phase": "running",
                        "outcome": null, "submitted_ms": 1000, "started_ms": 1000,
                        "steps": [{"step": 1, "name": "compile", "started_ms": 1000,
                            "finished_ms": null, "output_bytes": 0}],
                        "spec": {"steps": [{"name": "compile"}]}})
                };
                respond_json(s, 200, &job);
            }
            "/v1/jobs/5/logs" => {
                assert_eq!(req.q("step"), Some("1"));
                let offset: u64 = req.q("offset").unwrap().parse().unwrap();
                let stream = req.q("stream").map(str::to_owned);
                let first_time = {
                    let mut asked = f.asked.lock().unwrap();
                    asked.push((offset, stream.clone()));
                    asked.len() == 1
                };
                let all: Vec<u8> = [f.first.clone(), f.rest.clone()].concat();
                let from = &all[offset as usize..];
                let extra = [("X-Reel-Offset", offset.to_string())];
                head(s, 200, "application/octet-stream", &extra, None);
                if first_time {
                    chunk(s, &from[..f.first.len()]);
                    // The daemon dies: the answer breaks, nothing listens for a while.
                    *ctl.restart.lock().unwrap() = Some(Duration::from_millis(300));
                    let _ = s.shutdown(Shutdown::Both);
                    return;
                }
                // Two chunks, then the step ends and so does the answer.
                let mid = from.len() / 2;
                chunk(s, &from[..mid]);
                chunk(s, &from[mid..]);
                *f.done.lock().unwrap() = true;
                end_chunks(s);
            }
            _ => not_found(s, req),
        }
    })
}

fn following() -> Arc<Following> {
    let first: Vec<u8> = (0..3000).map(|i| b"abcdefghij\n"[i % 11]).collect();
    let rest: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    Arc::new(Following {
        first,
        rest,
        done: Mutex::new(false),
        asked: Mutex::new(Vec::new()),
    })
}

#[test]
fn logs_follow_resumes_after_the_daemon_drops_the_connection_with_no_gap_or_duplicate() {
    let state = state_with_token();
    let f = following();
    let stub = follow_stub(f.clone());
    let began = Instant::now();
    let out = reel(
        state.path(),
        &["--server", &stub.url, "logs", "5", "-f"],
        &[],
    );
    let took = began.elapsed();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let full = [f.first.clone(), f.rest.clone()].concat();
    assert!(
        out.stdout == full,
        "stdout is {} bytes, the step wrote {}",
        out.stdout.len(),
        full.len()
    );
    let asked = f.asked.lock().unwrap().clone();
    assert_eq!(asked[0], (0, None));
    assert_eq!(
        asked.last().unwrap(),
        &(f.first.len() as u64, None),
        "the reconnect asks at X-Reel-Offset + the bytes received"
    );
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert_eq!(
        err.matches("reel: connection lost, reconnecting…").count(),
        1,
        "{err}"
    );
    assert!(err.contains("==> step 1 \"compile\"\n"), "{err}");
    assert!(
        err.ends_with("==> job 5 \"build-it\": succeeded in 1.5s\n"),
        "{err}"
    );
    // The follow went through the restart: connections were refused for a while.
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(
        stub.ctl.to("GET", "/v1/jobs/5/logs").len() == 2,
        "a refused connection never reaches the stub"
    );
}

#[test]
fn logs_follow_of_one_stream_resumes_by_skipping_what_it_already_wrote() {
    let state = state_with_token();
    let f = following();
    let stub = follow_stub(f.clone());
    let out = reel(
        state.path(),
        &[
            "--server", &stub.url, "logs", "5", "-f", "--step", "1", "--stream", "stdout",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let full = [f.first.clone(), f.rest.clone()].concat();
    assert!(
        out.stdout == full,
        "stdout is {} bytes, the step wrote {}",
        out.stdout.len(),
        full.len()
    );
    let asked = f.asked.lock().unwrap().clone();
    // A stream's bytes carry no combined offset: the same start is asked again.
    assert_eq!(
        asked,
        [
            (0, Some("stdout".to_owned())),
            (0, Some("stdout".to_owned()))
        ]
    );
    assert!(!stderr(&out).contains("==> step"), "no header with --step");
}

// ---------------------------------------------------------------------------------
// artifacts

#[test]
fn artifacts_are_saved_only_when_size_and_crc_match_and_names_stay_inside() {
    let good = b"the build's output\n".repeat(1000);
    let bad = b"tampered".to_vec();
    let good_crc = format!("{:08x}", crc32c::crc32c(&good));
    let listed_bad_crc = format!("{:08x}", crc32c::crc32c(b"what it should have been"));
    let (g, b) = (good.clone(), bad.clone());
    let stub = serve(move |req, s, _| match req.path.as_str() {
        "/v1/jobs/3/artifacts" => respond_json(
            s,
            200,
            &json!({"artifacts": [
                {"name": "dist/app.bin", "size": g.len(), "crc32c": good_crc},
                {"name": "bad.txt", "size": b.len(), "crc32c": listed_bad_crc},
                {"name": "../escape.txt", "size": 1, "crc32c": "00000000"},
                {"name": "/etc/escape", "size": 1, "crc32c": "00000000"},
            ]}),
        ),
        "/v1/jobs/3/artifacts/dist/app.bin" => respond(s, 200, "application/octet-stream", &[], &g),
        "/v1/jobs/3/artifacts/bad.txt" => respond(s, 200, "application/octet-stream", &[], &b),
        _ => not_found(s, req),
    });
    let state = state_with_token();
    let out = reel(
        state.path(),
        &["--server", &stub.url, "artifacts", "3"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("dist/app.bin"), "{}", stdout(&out));

    let dl = tempfile::tempdir().unwrap();
    let into = dl.path().join("into");
    let out = reel(
        state.path(),
        &[
            "--server",
            &stub.url,
            "artifacts",
            "3",
            "-o",
            into.to_str().unwrap(),
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(std::fs::read(into.join("dist/app.bin")).unwrap(), good);
    assert!(!into.join("bad.txt").exists(), "a wrong crc is not saved");
    assert!(
        err.contains("artifact \"bad.txt\" refused: received 8 bytes with crc32c"),
        "{err}"
    );
    assert!(
        err.contains("artifact \"../escape.txt\" refused: the name contains `..`"),
        "{err}"
    );
    assert!(
        err.contains("artifact \"/etc/escape\" refused: the name is an absolute path"),
        "{err}"
    );
    assert!(!dl.path().join("escape.txt").exists());
    // Nothing else was written: no temporary files left behind.
    let mut names: Vec<String> = walk(&into);
    names.sort();
    assert_eq!(names, ["dist", "dist/app.bin"]);
    // The unsafe names were never asked for.
    assert!(
        stub.ctl
            .requests()
            .iter()
            .all(|r| !r.path.contains("escape"))
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// The read commands, when a daemon holds the log

/// Child side: holds the log open until killed.
#[test]
fn holder_child() {
    let Some(dir) = std::env::var_os("REEL_TEST_HOLD_DIR") else {
        return;
    };
    let _log = EventLog::open(Path::new(&dir), LogOptions::default()).unwrap();
    println!("holding");
    std::thread::sleep(Duration::from_secs(60));
}

struct Holder(std::process::Child);

impl Holder {
    fn start(dir: &Path) -> Holder {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["holder_child", "--exact", "--nocapture", "--test-threads=1"])
            .env("REEL_TEST_HOLD_DIR", dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        while !lines.next().unwrap().unwrap().contains("holding") {}
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A stored output chunk: offset, stream byte, bytes.
type Chunk = (u64, u8, Vec<u8>);

/// What a daemon holding the log would answer, read from the log first.
struct Served {
    jobs: Vec<Value>,
    details: HashMap<u64, Value>,
    frames: HashMap<u64, Vec<u8>>,
    output: HashMap<(u64, u32), Vec<Chunk>>,
}

fn served_from(dir: &Path) -> Served {
    let log = LogReader::open_copy(dir).unwrap();
    let mut s = Served {
        jobs: Vec::new(),
        details: HashMap::new(),
        frames: HashMap::new(),
        output: HashMap::new(),
    };
    for summary in log.jobs() {
        let summary = summary.unwrap();
        let id = summary.id;
        let state = log.fold(id).unwrap();
        let job = json!({"id": id, "name": summary.name, "owner": summary.owner,
            "runner": summary.runner,
            "state": if state.is_terminal() { "ended" } else { "running" },
            "phase": state.phase.as_str(), "outcome": summary.outcome,
            "submitted_ms": summary.submitted_ms, "finished_ms": summary.finished_ms,
            "steps": summary.steps});
        let mut detail = job.clone();
        detail["steps"] = json!(
            state
                .steps
                .iter()
                .map(|st| json!({
            "step": st.index + 1, "name": format!("step {}", st.index),
            "started_ms": st.started_ms, "finished_ms": st.finished_ms,
            "output_bytes": st.output_bytes}))
                .collect::<Vec<_>>()
        );
        s.jobs.push(job);
        s.details.insert(id, detail);
        let mut frames = Vec::new();
        for r in log.events(id) {
            let r = r.unwrap();
            let env = r.event.encode(r.at_ms);
            frames.extend(r.seq.to_be_bytes());
            frames.extend((env.len() as u32).to_be_bytes());
            frames.extend(env);
        }
        s.frames.insert(id, frames);
        for st in &state.steps {
            let chunks = log
                .output(id, st.index, 0)
                .map(|c| {
                    let c = c.unwrap();
                    (c.offset, c.stream.byte(), c.bytes)
                })
                .collect();
            s.output.insert((id, st.index + 1), chunks);
        }
    }
    s
}

fn held_stub(served: Served) -> Stub {
    serve(move |req, s, _| {
        let parts: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["healthz"] => respond_json(s, 200, &json!({"status": "ok"})),
            ["v1", "jobs"] => {
                // Newest first, two to a page.
                let mut jobs = served.jobs.clone();
                jobs.reverse();
                let start: usize = req.q("cursor").map_or(0, |c| c.parse().unwrap());
                let page: Vec<Value> = jobs.iter().skip(start).take(2).cloned().collect();
                let next = (start + 2 < jobs.len()).then(|| (start + 2).to_string());
                respond_json(s, 200, &json!({"jobs": page, "next_cursor": next}));
            }
            ["v1", "jobs", id] => match served.details.get(&id.parse().unwrap()) {
                Some(d) => respond_json(s, 200, d),
                None => respond_json(s, 404, &json!({"error": "no such job"})),
            },
            ["v1", "jobs", id, "events"] if req.q("format") == Some("raw") => {
                match served.frames.get(&id.parse().unwrap()) {
                    Some(f) => respond(s, 200, "application/octet-stream", &[], f),
                    None => respond_json(s, 404, &json!({"error": "no such job"})),
                }
            }
            ["v1", "jobs", id, "logs"] => {
                let id: u64 = id.parse().unwrap();
                let step: u32 = req.q("step").unwrap().parse().unwrap();
                let offset: u64 = req.q("offset").unwrap_or("0").parse().unwrap();
                let want = req.q("stream").map(|st| if st == "stdout" { 0 } else { 1 });
                let mut body = Vec::new();
                for (at, stream, bytes) in served.output.get(&(id, step)).into_iter().flatten() {
                    if want.is_some_and(|w| w != *stream) {
                        continue;
                    }
                    let skip = offset.saturating_sub(*at) as usize;
                    body.extend(&bytes[skip.min(bytes.len())..]);
                }
                respond(
                    s,
                    200,
                    "application/octet-stream",
                    &[("X-Reel-Offset", offset.to_string())],
                    &body,
                );
            }
            _ => not_found(s, req),
        }
    })
}

/// Job 1 succeeds, job 2 fails at step 1, job 3 stops mid-way (live).
fn write_log(dir: &Path) {
    reel_engine::testkit::simulate::write_sample_log(dir).unwrap();
}

#[test]
fn a_log_held_by_a_daemon_is_read_through_it_with_the_same_output() {
    let state = state_with_token();
    write_log(state.path());
    let commands: &[&[&str]] = &[
        &["jobs"],
        &["replay", "2"],
        &["replay", "2", "--json"],
        &["replay", "1", "--at", "12"],
        &["inspect", "3"],
        &["inspect", "3", "--json"],
        &["export", "1"],
        &["output", "1"],
        &["output", "1", "--step", "2"],
        &[
            "output", "2", "--step", "1", "--offset", "3", "--stream", "stdout",
        ],
    ];
    let offline: Vec<Output> = commands
        .iter()
        .map(|c| reel(state.path(), c, &[]))
        .collect();
    for (c, o) in commands.iter().zip(&offline) {
        assert_eq!(o.status.code(), Some(0), "{c:?}: {}", stderr(o));
        assert!(!o.stdout.is_empty(), "{c:?}");
    }
    let stub = held_stub(served_from(state.path()));

    let _holder = Holder::start(state.path());
    // Held, and no endpoint.json: today's refusal.
    let out = reel(state.path(), &["jobs"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is in use by another process"),
        "{}",
        stderr(&out)
    );

    // endpoint.json names a live daemon whose port is closed: still the refusal.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://127.0.0.1:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let endpoint = |url: &str| {
        std::fs::write(
            state.path().join("serve/endpoint.json"),
            json!({"url": url, "socket": null, "pid": _holder.0.id()}).to_string(),
        )
        .unwrap();
    };
    endpoint(&dead_url);
    let out = reel(state.path(), &["replay", "2"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("is in use by another process"), "{err}");
    assert!(!err.contains("asking it"), "{err}");

    endpoint(&stub.url);
    for (c, o) in commands.iter().zip(&offline) {
        let through = reel(state.path(), c, &[]);
        let err = stderr(&through);
        assert_eq!(through.status.code(), Some(0), "{c:?}: {err}");
        assert!(
            err.contains(&format!(
                "reel: the log is held by the daemon (pid {}); asking it at {}",
                _holder.0.id(),
                stub.url
            )),
            "{c:?}: {err}"
        );
        assert!(
            through.stdout == o.stdout,
            "{c:?} differs:\n--- offline\n{}\n--- through the daemon\n{}",
            stdout(o),
            stdout(&through)
        );
    }
    let raw = stub.ctl.to("GET", "/v1/jobs/2/events");
    assert!(raw.iter().all(|r| r.q("format") == Some("raw")) && !raw.is_empty());
    assert!(
        stub.ctl
            .to("GET", "/v1/jobs")
            .iter()
            .any(|r| r.q("cursor") == Some("2")),
        "every page"
    );

    let out = reel(state.path(), &["replay", "42"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no job 42 in the log at"),
        "{}",
        stderr(&out)
    );
}
