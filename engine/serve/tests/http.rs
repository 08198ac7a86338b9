//! The HTTP layer over real sockets: raw bytes from `std::net` clients against a
//! `Server` with a small test handler.

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::FutureExt;
use hyper::StatusCode;
use reel_serve::http::{self, Handler, Limits, Request, Response, Server, Token, Via, bind_unix};
use serde_json::{Value, json};

/// Every read and write of a test client gives up after this: a test that
/// would hang fails instead.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

const TOKEN: &str = "s3cret-token-for-tests";

// ---------------------------------------------------------------- the server

struct TestHandler {
    /// `/stream` hands its sender here, for the test to send the next chunks.
    streams: async_channel::Sender<async_channel::Sender<Bytes>>,
}

impl Handler for TestHandler {
    fn handle(&self, req: Request) -> Pin<Box<dyn Future<Output = Response> + Send + 'static>> {
        let streams = self.streams.clone();
        Box::pin(async move {
            match req.path.as_str() {
                "/healthz" => http::json(StatusCode::OK, &json!({"status": "ok"})),
                "/stream" => {
                    let (response, tx) = http::stream(
                        StatusCode::OK,
                        "application/octet-stream",
                        &[("X-Reel-Offset", "7".to_owned())],
                    );
                    tx.send(Bytes::from_static(b"one\n")).await.unwrap();
                    streams.send(tx).await.unwrap();
                    response
                }
                "/panic" => panic!("the test handler panics on /panic"),
                "/text" => http::text(StatusCode::OK, "plain\n".to_owned()),
                _ => http::json(
                    StatusCode::OK,
                    &json!({
                        "method": req.method.as_str(),
                        "path": req.path,
                        "query": req.query,
                        "owner": req.query("owner"),
                        "x_test": req.header("x-test"),
                        "authorization": req.header("authorization"),
                        "body_len": req.body.len(),
                        "via": match req.via { Via::Tcp(_) => "tcp", Via::Unix => "unix" },
                    }),
                ),
            }
        })
    }
}

struct Running {
    addr: SocketAddr,
    server: Arc<Server>,
    stop: async_channel::Sender<()>,
    served: Option<smol::Task<std::io::Result<()>>>,
    streams: async_channel::Receiver<async_channel::Sender<Bytes>>,
}

impl Running {
    /// Stops accepting and waits for `serve_tcp` to return.
    fn stop(&mut self) {
        self.stop.close();
        if let Some(served) = self.served.take() {
            smol::block_on(served).unwrap();
        }
    }

    /// The sender of the `/stream` response being served.
    fn next_stream(&self) -> async_channel::Sender<Bytes> {
        smol::block_on(async {
            self.streams
                .recv()
                .or(async {
                    smol::Timer::after(IO_TIMEOUT).await;
                    panic!("no /stream request reached the handler");
                })
                .await
                .unwrap()
        })
    }
}

fn handler() -> (
    Arc<TestHandler>,
    async_channel::Receiver<async_channel::Sender<Bytes>>,
) {
    let (tx, rx) = async_channel::unbounded();
    (Arc::new(TestHandler { streams: tx }), rx)
}

fn token() -> Token {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    Token::load_or_create(&path).unwrap().0
}

fn start(limits: Limits) -> Running {
    let (handler, streams) = handler();
    let server = Arc::new(Server::new(handler, Some(token()), limits));
    let listener = smol::block_on(async_net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = async_channel::bounded::<()>(1);
    let served = {
        let server = server.clone();
        smol::spawn(async move {
            server
                .serve_tcp(listener, async move {
                    let _ = stop_rx.recv().await;
                })
                .await
        })
    };
    Running {
        addr,
        server,
        stop,
        served: Some(served),
        streams,
    }
}

fn start_default() -> Running {
    start(Limits::default())
}

/// Polls `cond` until it holds, failing the test after `IO_TIMEOUT`.
fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + IO_TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------- the client

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// A request's bytes: `Host`, the extra headers, `Content-Length` when there is
/// a body.
fn request_bytes(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: test\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Reads one response's status line and headers.
fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 "), "not a status line: {line:?}");
    let status = line[9..12].parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    (status, headers)
}

/// Reads one chunk of a chunked body: `None` at the last (empty) chunk.
fn read_chunk(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let size = usize::from_str_radix(line.trim_end(), 16)
        .unwrap_or_else(|_| panic!("not a chunk size line: {line:?}"));
    let mut data = vec![0; size];
    r.read_exact(&mut data).unwrap();
    let mut crlf = [0; 2];
    r.read_exact(&mut crlf).unwrap();
    assert_eq!(&crlf, b"\r\n");
    (size > 0).then_some(data)
}

/// Reads one whole response (by `Content-Length` or chunked).
fn read_response(r: &mut impl BufRead) -> Reply {
    let (status, headers) = read_head(r);
    let mut reply = Reply {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(n) = reply.header("content-length") {
        let mut body = vec![0; n.parse().unwrap()];
        r.read_exact(&mut body).unwrap();
        reply.body = body;
    } else if reply.header("transfer-encoding") == Some("chunked") {
        while let Some(chunk) = read_chunk(r) {
            reply.body.extend(chunk);
        }
    }
    reply
}

/// Sends `raw` on a new connection and reads one response.
fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut s = connect(addr);
    s.write_all(raw).unwrap();
    read_response(&mut BufReader::new(s))
}

fn get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Reply {
    exchange(addr, &request_bytes("GET", target, headers, b""))
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// Reads until the server closes the connection; `Ok(bytes)` at end of file.
fn read_to_close(s: &mut TcpStream) -> std::io::Result<usize> {
    let mut n = 0;
    let mut buf = [0; 4096];
    loop {
        match s.read(&mut buf)? {
            0 => return Ok(n),
            k => n += k,
        }
    }
}

// ---------------------------------------------------------------- the tests

#[test]
fn tcp_requests_need_the_token_but_healthz() {
    let srv = start_default();
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", "Basic czNjcmV0")],
        vec![("Authorization", "Bearer s3cret-token-for-test")],
        vec![("Authorization", "Bearer s3cret-token-for-testsX")],
    ] {
        let r = get(srv.addr, "/v1/jobs?owner=alice", &headers);
        assert_eq!(r.status, 401, "{headers:?}");
        assert_eq!(r.json(), json!({"error": "unauthorized"}));
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    let auth = bearer();
    let r = get(
        srv.addr,
        "/v1/jobs?owner=al%69ce&file=a+b.yml",
        &[("Authorization", &auth), ("X-Test", "yes")],
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({
            "method": "GET", "path": "/v1/jobs",
            "query": [["owner", "alice"], ["file", "a b.yml"]],
            "owner": "alice", "x_test": "yes", "body_len": 0, "via": "tcp",
            "authorization": null,
        })
    );
    // The scheme is case-insensitive.
    let lower = format!("bearer {TOKEN}");
    assert_eq!(
        get(srv.addr, "/x", &[("Authorization", &lower)]).status,
        200
    );

    // /healthz needs none, but only for GET.
    let r = get(srv.addr, "/healthz", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"status": "ok"}));
    let r = exchange(srv.addr, &request_bytes("POST", "/healthz", &[], b"x"));
    assert_eq!(r.status, 401);
    let r = get(srv.addr, "/healthz/x", &[]);
    assert_eq!(r.status, 401);
}

#[test]
fn a_body_arrives_whole() {
    let srv = start_default();
    let auth = bearer();
    let body = vec![b'x'; 300_000];
    let r = exchange(
        srv.addr,
        &request_bytes("POST", "/v1/jobs", &[("Authorization", &auth)], &body),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 300_000);
    assert_eq!(r.json()["method"], "POST");
}

#[test]
fn unix_socket_needs_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reel.sock");
    let listener = bind_unix(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A live socket is not taken over.
    let e = bind_unix(&path).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");

    let (handler, _streams) = handler();
    let server = Arc::new(Server::new(handler, Some(token()), Limits::default()));
    let (stop, stop_rx) = async_channel::bounded::<()>(1);
    let served = {
        let server = server.clone();
        smol::spawn(async move {
            server
                .serve_unix(listener, async move {
                    let _ = stop_rx.recv().await;
                })
                .await
        })
    };
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(&request_bytes("GET", "/v1/jobs?owner=bob", &[], b""))
        .unwrap();
    let r = read_response(&mut BufReader::new(s));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["via"], "unix");
    assert_eq!(r.json()["owner"], "bob");

    // Stopped, its listener is gone but its file stays: a stale socket is replaced.
    stop.close();
    smol::block_on(served).unwrap();
    assert!(path.exists());
    let again = bind_unix(&path).unwrap();
    drop(again);

    // A path that is not a socket is never removed.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    assert!(bind_unix(&file).is_err());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn a_declared_body_over_the_limit_is_refused_unread() {
    let srv = start_default();
    let auth = bearer();
    let mut s = connect(srv.addr);
    // The head only: the answer must come without the body.
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: {auth}\r\nContent-Length: {}\r\n\r\n",
        (4 << 20) + 1
    );
    s.write_all(head.as_bytes()).unwrap();
    let r = read_response(&mut BufReader::new(s));
    assert_eq!(r.status, 413);
    assert_eq!(
        r.json(),
        json!({"error": "request body is over the 4 MiB limit"})
    );
}

#[test]
fn a_chunked_body_over_the_limit_is_refused() {
    let srv = start_default();
    let auth = bearer();
    let s = connect(srv.addr);
    let mut writer = s.try_clone().unwrap();
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    // 5 MiB in 64 KiB chunks, written beside the reader; the server may stop
    // reading, so write errors end the writer quietly.
    let sending = std::thread::spawn(move || {
        writer.write_all(head.as_bytes())?;
        let chunk = vec![b'y'; 64 << 10];
        for _ in 0..80 {
            writer.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
            writer.write_all(&chunk)?;
            writer.write_all(b"\r\n")?;
        }
        writer.write_all(b"0\r\n\r\n")
    });
    let r = read_response(&mut BufReader::new(s));
    assert_eq!(r.status, 413);
    assert_eq!(
        r.json(),
        json!({"error": "request body is over the 4 MiB limit"})
    );
    let _ = sending.join().unwrap();

    // Just under the limit, chunked, is fine.
    let mut s = connect(srv.addr);
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b'y'; 1 << 20];
    for _ in 0..4 {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .unwrap();
        s.write_all(&chunk).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let r = read_response(&mut BufReader::new(s));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 4 << 20);
}

#[test]
fn a_body_that_stops_arriving_gets_408_after_the_idle_timeout() {
    let idle_timeout = Duration::from_millis(300);
    let srv = start(Limits {
        idle_timeout,
        ..Limits::default()
    });
    let auth = bearer();
    let mut s = connect(srv.addr);
    let started = Instant::now();
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: test\r\nAuthorization: {auth}\r\nContent-Length: 10\r\n\r\nabc"
    );
    s.write_all(head.as_bytes()).unwrap();
    let r = read_response(&mut BufReader::new(s));
    assert_eq!(r.status, 408);
    assert_eq!(
        r.json(),
        json!({"error": "the request body stopped arriving"})
    );
    assert!(started.elapsed() >= idle_timeout, "{:?}", started.elapsed());
}

#[test]
fn a_stalled_head_blocks_no_one_and_is_closed_after_the_head_timeout() {
    let head_timeout = Duration::from_millis(300);
    let srv = start(Limits {
        head_timeout,
        ..Limits::default()
    });
    let started = Instant::now();
    let mut slow = connect(srv.addr);
    slow.write_all(b"GET /v1/jobs HTTP/1.1\r\nHost: te")
        .unwrap();

    let asked = Instant::now();
    let auth = bearer();
    let r = get(srv.addr, "/v1/jobs", &[("Authorization", &auth)]);
    assert_eq!(r.status, 200);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "a second client waited {:?}",
        asked.elapsed()
    );

    // The stalled one gets no answer: its connection is closed.
    let got = read_to_close(&mut slow).expect("the stalled connection was not closed");
    let waited = started.elapsed();
    assert_eq!(got, 0, "the stalled connection got an answer");
    assert!(waited >= head_timeout, "closed after only {waited:?}");
    assert!(waited < IO_TIMEOUT, "closed after {waited:?}");
    wait_until("the server counts no connection", || {
        srv.server.connections() == 0
    });
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_the_head_timeout() {
    let head_timeout = Duration::from_millis(300);
    let srv = start(Limits {
        head_timeout,
        ..Limits::default()
    });
    let started = Instant::now();
    let mut silent = connect(srv.addr);
    assert_eq!(read_to_close(&mut silent).unwrap(), 0);
    assert!(started.elapsed() >= head_timeout);
}

#[test]
fn a_kept_alive_connection_idles_for_the_idle_timeout_not_the_head_timeout() {
    let head_timeout = Duration::from_millis(300);
    let idle_timeout = Duration::from_millis(1500);
    let srv = start(Limits {
        head_timeout,
        idle_timeout,
        ..Limits::default()
    });
    let auth = bearer();
    let req = request_bytes("GET", "/v1/jobs", &[("Authorization", &auth)], b"");
    let mut s = connect(srv.addr);
    let mut r = BufReader::new(s.try_clone().unwrap());
    s.write_all(&req).unwrap();
    assert_eq!(read_response(&mut r).status, 200);

    // Idle for longer than a head may take: still open.
    std::thread::sleep(head_timeout * 2);
    s.write_all(&req).unwrap();
    assert_eq!(read_response(&mut r).status, 200);
    let answered = Instant::now();

    // A later head, once begun, has the head timeout again.
    s.write_all(b"GET /v1/jobs HTTP/1.1\r\n").unwrap();
    let mut rest = Vec::new();
    let closed = r.read_to_end(&mut rest);
    let waited = answered.elapsed();
    assert!(closed.is_ok(), "{closed:?}");
    assert!(rest.is_empty(), "got {:?}", String::from_utf8_lossy(&rest));
    assert!(waited >= head_timeout, "closed after {waited:?}");
    assert!(
        waited < idle_timeout,
        "closed after {waited:?}: the head took the idle timeout"
    );

    // Left idle, a connection is closed after the idle timeout.
    let mut s = connect(srv.addr);
    let mut r = BufReader::new(s.try_clone().unwrap());
    s.write_all(&req).unwrap();
    assert_eq!(read_response(&mut r).status, 200);
    let answered = Instant::now();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    let waited = answered.elapsed();
    assert!(rest.is_empty());
    assert!(waited >= idle_timeout, "closed after {waited:?}");
    assert!(waited < IO_TIMEOUT, "closed after {waited:?}");
}

#[test]
fn a_connection_over_the_cap_gets_503_at_once() {
    let srv = start(Limits {
        max_connections: 4,
        ..Limits::default()
    });
    let auth = bearer();
    let req = request_bytes("GET", "/v1/jobs", &[("Authorization", &auth)], b"");
    // Four kept-alive connections, each answered, so each is surely counted.
    let mut open: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect(srv.addr);
            s.write_all(&req).unwrap();
            let r = read_response(&mut BufReader::new(s.try_clone().unwrap()));
            assert_eq!(r.status, 200);
            s
        })
        .collect();
    assert_eq!(srv.server.connections(), 4);

    let asked = Instant::now();
    let r = exchange(srv.addr, &req);
    assert_eq!(r.status, 503);
    assert_eq!(r.json(), json!({"error": "too many connections"}));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    // The connection was closed after the answer.
    let mut s = connect(srv.addr);
    s.write_all(&req).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert!(all.starts_with(b"HTTP/1.1 503 "));

    // One closes: there is room again.
    drop(open.pop());
    wait_until("the server counts 3 connections", || {
        srv.server.connections() == 3
    });
    assert_eq!(exchange(srv.addr, &req).status, 200);
}

#[test]
fn a_streamed_response_arrives_chunk_by_chunk() {
    let srv = start_default();
    let auth = bearer();
    let mut s = connect(srv.addr);
    s.write_all(&request_bytes(
        "GET",
        "/stream",
        &[("Authorization", &auth)],
        b"",
    ))
    .unwrap();
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    assert_eq!(status, 200);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(header("x-reel-offset").as_deref(), Some("7"));
    assert_eq!(
        header("content-type").as_deref(),
        Some("application/octet-stream")
    );
    let tx = srv.next_stream();
    // The first chunk comes while the sender is still open...
    assert_eq!(read_chunk(&mut r).unwrap(), b"one\n");
    // ...and the next only once it is sent.
    smol::block_on(tx.send(Bytes::from_static(b"two\n"))).unwrap();
    assert_eq!(read_chunk(&mut r).unwrap(), b"two\n");
    // An empty chunk would end a chunked body: it is skipped.
    smol::block_on(tx.send(Bytes::new())).unwrap();
    smol::block_on(tx.send(Bytes::from_static(b"three\n"))).unwrap();
    assert_eq!(read_chunk(&mut r).unwrap(), b"three\n");
    drop(tx);
    assert_eq!(read_chunk(&mut r), None);
}

#[test]
fn stopping_lets_open_responses_finish_and_drain_ends_the_rest() {
    let mut srv = start_default();
    let auth = bearer();
    let req = request_bytes("GET", "/stream", &[("Authorization", &auth)], b"");

    let mut a = connect(srv.addr);
    a.write_all(&req).unwrap();
    let mut ra = BufReader::new(a.try_clone().unwrap());
    assert_eq!(read_head(&mut ra).0, 200);
    assert_eq!(read_chunk(&mut ra).unwrap(), b"one\n");
    let tx_a = srv.next_stream();
    // A kept-alive connection between requests.
    let mut idle = connect(srv.addr);
    let plain = request_bytes("GET", "/v1/jobs", &[("Authorization", &auth)], b"");
    idle.write_all(&plain).unwrap();
    let mut ri = BufReader::new(idle.try_clone().unwrap());
    assert_eq!(read_response(&mut ri).status, 200);

    srv.stop();
    // The idle one is closed at once (well before any timeout of the server's).
    let asked = Instant::now();
    let mut rest = Vec::new();
    ri.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    drop((ri, idle));
    // Not accepting any more...
    assert!(TcpStream::connect(srv.addr).is_err());
    // ...but the open response goes on to its end, then the connection closes.
    smol::block_on(tx_a.send(Bytes::from_static(b"two\n"))).unwrap();
    assert_eq!(read_chunk(&mut ra).unwrap(), b"two\n");
    drop(tx_a);
    assert_eq!(read_chunk(&mut ra), None);
    let mut rest = Vec::new();
    ra.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(smol::block_on(srv.server.drain(IO_TIMEOUT)), 0);

    // A response that does not end within the grace is cut off by drain.
    let mut srv = start_default();
    let mut b = connect(srv.addr);
    b.write_all(&req).unwrap();
    let mut rb = BufReader::new(b.try_clone().unwrap());
    assert_eq!(read_head(&mut rb).0, 200);
    let tx_b = srv.next_stream();
    srv.stop();
    assert_eq!(
        smol::block_on(srv.server.drain(Duration::from_millis(200))),
        1
    );
    assert_eq!(srv.server.connections(), 0);
    assert_eq!(read_chunk(&mut rb).unwrap(), b"one\n");
    // The body never ended: the client sees the connection end instead.
    let mut rest = Vec::new();
    let _ = rb.read_to_end(&mut rest);
    assert!(!rest.ends_with(b"0\r\n\r\n"));
    drop(tx_b);
}

#[test]
fn a_head_over_the_limit_gets_431() {
    let srv = start_default();
    let auth = bearer();
    let big = "v".repeat(70 << 10);
    let r = exchange(
        srv.addr,
        &request_bytes(
            "GET",
            "/v1/jobs",
            &[("Authorization", &auth), ("X-Big", &big)],
            b"",
        ),
    );
    // hyper answers 431 (for a head that fills its buffer unparsed and for a
    // parsed one over `max_header_size` alike) and closes the connection.
    assert_eq!(r.status, 431);
    assert_eq!(r.header("connection"), Some("close"));

    // A head a little under the limit passes.
    let fits = "v".repeat(60 << 10);
    let r = get(
        srv.addr,
        "/v1/jobs",
        &[("Authorization", &auth), ("X-Big", &fits)],
    );
    assert_eq!(r.status, 200);
}

#[test]
fn malformed_requests_get_400_and_a_panic_500() {
    let srv = start_default();
    let r = exchange(srv.addr, b"NOT HTTP AT ALL\r\n\r\n");
    assert_eq!(r.status, 400);
    let r = exchange(
        srv.addr,
        b"GET /x HTTP/1.1\r\nHost: test\r\nBad Header\r\n\r\n",
    );
    assert_eq!(r.status, 400);

    let auth = bearer();
    let r = get(srv.addr, "/x?a=%ff", &[("Authorization", &auth)]);
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"error": "the query string is not valid UTF-8"})
    );

    let r = get(srv.addr, "/panic", &[("Authorization", &auth)]);
    assert_eq!(r.status, 500);
    assert_eq!(r.json(), json!({"error": "internal error"}));
    // The server goes on.
    let r = get(srv.addr, "/text", &[("Authorization", &auth)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.body, b"plain\n");
}

/// Everything the tests' servers log (at debug level), from the first call on.
fn logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Capture {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let writer = buf.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .init();
        buf
    })
}

#[test]
fn an_unauthorized_request_is_logged_as_one_line_without_its_details() {
    let logs = logs();
    let srv = start_default();
    let auth = bearer();
    // Logged: an authorized request's method, path and status.
    assert_eq!(
        get(srv.addr, "/v1/logged-path-a7", &[("Authorization", &auth)]).status,
        200
    );
    let mut s = connect(srv.addr);
    let local = s.local_addr().unwrap();
    s.write_all(&request_bytes(
        "GET",
        "/v1/unlogged-path-b8?q=unlogged-query-c9",
        &[
            ("Authorization", "Bearer unlogged-token-d0"),
            ("X-Test", "unlogged-header-e1"),
        ],
        b"",
    ))
    .unwrap();
    assert_eq!(read_response(&mut BufReader::new(s)).status, 401);
    let line = format!("unauthorized request from {local}");
    wait_until("the unauthorized request is logged", || {
        String::from_utf8_lossy(&logs.lock().unwrap()).contains(&line)
    });
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(text.contains("GET /v1/logged-path-a7 200"), "{text}");
    for secret in [
        "unlogged-path-b8",
        "unlogged-query-c9",
        "unlogged-token-d0",
        "unlogged-header-e1",
    ] {
        assert!(!text.contains(secret), "{secret} is in the log:\n{text}");
    }
    let about: Vec<_> = text
        .lines()
        .filter(|l| l.contains(&local.to_string()))
        .collect();
    assert_eq!(about.len(), 1, "{about:#?}");
}

// ---------------------------------------------------------------- the token

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn token_is_created_private_and_loaded_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serve").join("token");
    let (token, created) = Token::load_or_create(&path).unwrap();
    assert!(created);
    assert_eq!(token.as_str().len(), 64);
    assert!(token.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{}\n", token.as_str())
    );
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["token"]);
    assert!(!format!("{token:?}").contains(token.as_str()));

    let (again, created) = Token::load_or_create(&path).unwrap();
    assert!(!created);
    assert_eq!(again.as_str(), token.as_str());

    let (other, _) = Token::load_or_create(&dir.path().join("other")).unwrap();
    assert_ne!(other.as_str(), token.as_str());
}

#[test]
fn token_file_others_may_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    Token::load_or_create(&path).unwrap();
    for loose in [0o644, 0o640, 0o602] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(loose)).unwrap();
        let e = Token::load_or_create(&path).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&format!("mode {loose:04o}")), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }
    // Nothing was replaced.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(!Token::load_or_create(&path).unwrap().1);

    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(Token::load_or_create(&empty).is_err());
}

#[test]
fn token_matches_only_bearer_and_the_exact_token() {
    let t = token();
    assert_eq!(t.as_str(), TOKEN);
    assert!(t.matches(format!("Bearer {TOKEN}").as_bytes()));
    assert!(t.matches(format!("bearer {TOKEN}").as_bytes()));
    assert!(t.matches(format!("BEARER  {TOKEN} ").as_bytes()));
    // Unequal, shorter, longer, empty.
    assert!(!t.matches(b"Bearer s3cret-token-for-tesT"));
    assert!(!t.matches(b"Bearer s3cret-token-for-test"));
    assert!(!t.matches(format!("Bearer {TOKEN}s").as_bytes()));
    assert!(!t.matches(format!("Bearer {TOKEN}\0").as_bytes()));
    assert!(!t.matches(b"Bearer "));
    assert!(!t.matches(b"Bearer"));
    assert!(!t.matches(b""));
    // No scheme, or another one.
    assert!(!t.matches(TOKEN.as_bytes()));
    assert!(!t.matches(format!("Basic {TOKEN}").as_bytes()));
    assert!(!t.matches(format!("Bearer{TOKEN}").as_bytes()));
}
