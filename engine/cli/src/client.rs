//! The daemon's HTTP client (`reel serve`, docs/api.md): where the daemon is,
//! which token to send, one blocking request at a time, each failure as one
//! sentence, and the reconnect loop of the commands that outlive a daemon
//! restart. ureq without TLS: the daemon answers on loopback.
//!
//! Where the daemon is: `--server URL` (or `$REEL_SERVER`), else the URL in
//! `<state>/serve/endpoint.json` when the pid that file names is alive, else
//! [`DEFAULT_URL`]. The token: `--token-file FILE`, else `$REEL_TOKEN` (the
//! token itself), else `<state>/serve/token`.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::Value;

/// Where `reel serve` listens unless told otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7117";

/// The largest JSON answer read (a job carries its spec: up to 8 MiB stored).
const MAX_JSON_BYTES: u64 = 64 << 20;

/// The largest whole (non-streamed) binary answer read: a job's raw events.
pub const MAX_BINARY_BYTES: u64 = 1 << 30;

/// How the client finds the daemon: global flags of every command.
#[derive(Args, Debug, Clone, Default)]
pub struct DaemonArgs {
    /// The daemon's URL (http://HOST:PORT). Default: $REEL_SERVER, else the URL in
    /// <state>/serve/endpoint.json when the daemon that wrote it is alive, else
    /// http://127.0.0.1:7117.
    #[arg(long, global = true, env = "REEL_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// Read the daemon's token from FILE. Default: $REEL_TOKEN (the token
    /// itself), else <state>/serve/token (written by the daemon).
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// What `<state>/serve/endpoint.json` says about a live daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Its URL.
    pub url: String,
    /// Its process id (alive when this was read).
    pub pid: u32,
}

/// The daemon `<state>/serve/endpoint.json` names, if the file is there, reads
/// as `{"url": …, "pid": …}` and that pid is alive.
pub fn live_endpoint(state: &Path) -> Option<Endpoint> {
    let bytes = std::fs::read(state.join("serve").join("endpoint.json")).ok()?;
    let endpoint = parse_endpoint(&bytes)?;
    pid_alive(endpoint.pid).then_some(endpoint)
}

/// `{"url": "http://…", "socket": …, "pid": N}`; `None` without a URL or pid.
pub fn parse_endpoint(bytes: &[u8]) -> Option<Endpoint> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let url = v.get("url")?.as_str()?.trim().to_owned();
    let pid = u32::try_from(v.get("pid")?.as_u64()?).ok()?;
    (!url.is_empty() && pid > 0).then_some(Endpoint { url, pid })
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The URL to ask: the flag (or $REEL_SERVER), else a live endpoint.json, else
/// the default.
pub fn server_url(state: &Path, args: &DaemonArgs) -> String {
    if let Some(url) = args.server.as_deref().filter(|u| !u.trim().is_empty()) {
        return url.trim().to_owned();
    }
    live_endpoint(state).map_or_else(|| DEFAULT_URL.to_owned(), |e| e.url)
}

/// The bearer token and where it came from (for the message of a refusal).
#[derive(Clone)]
pub struct Token {
    value: Option<String>,
    from: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the token itself.
        f.debug_struct("Token")
            .field("present", &self.value.is_some())
            .field("from", &self.from)
            .finish()
    }
}

impl Token {
    /// `--token-file`, else `$REEL_TOKEN`, else `<state>/serve/token`; none at
    /// all when that file does not exist (the daemon then answers 401, said
    /// plainly). An unreadable or empty token file named by the flag is an error.
    pub fn find(state: &Path, args: &DaemonArgs) -> anyhow::Result<Token> {
        if let Some(file) = &args.token_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                anyhow::anyhow!("cannot read the token file {}: {e}", file.display())
            })?;
            let value = text.trim().to_owned();
            if value.is_empty() {
                anyhow::bail!("the token file {} is empty", file.display());
            }
            return Ok(Token {
                value: Some(value),
                from: format!("--token-file {}", file.display()),
            });
        }
        if let Some(value) = std::env::var("REEL_TOKEN")
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
        {
            return Ok(Token {
                value: Some(value),
                from: "$REEL_TOKEN".into(),
            });
        }
        let file = state.join("serve").join("token");
        match std::fs::read_to_string(&file) {
            Ok(text) if !text.trim().is_empty() => Ok(Token {
                value: Some(text.trim().to_owned()),
                from: file.display().to_string(),
            }),
            Ok(_) => Ok(Token {
                value: None,
                from: format!("{} is empty", file.display()),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Token {
                value: None,
                from: format!(
                    "none: no --token-file, no $REEL_TOKEN, no {}",
                    file.display()
                ),
            }),
            Err(e) => anyhow::bail!("cannot read the token file {}: {e}", file.display()),
        }
    }
}

/// Why a request to the daemon failed, as one sentence.
#[derive(Debug)]
pub enum ApiError {
    /// Nothing accepts connections at the URL.
    Refused {
        /// The daemon's URL.
        url: String,
    },
    /// A connection broke (reset, closed in the middle of an answer, timed out).
    Broken {
        /// The daemon's URL.
        url: String,
        /// What broke.
        detail: String,
    },
    /// 401: the token was missing or wrong.
    Unauthorized {
        /// The daemon's URL.
        url: String,
        /// Where the token came from (or why there was none).
        from: String,
        /// Whether a token was sent at all.
        sent: bool,
    },
    /// Any other answer that is not a success: its status and the daemon's
    /// sentence (`{"error": …}`).
    Status {
        /// The HTTP status.
        status: u16,
        /// The daemon's message.
        message: String,
    },
    /// Anything else: a bad URL, an answer that does not parse.
    Other(String),
}

impl ApiError {
    /// Worth trying again after a pause: nothing answered, the connection
    /// broke, or the daemon is draining (503) — a daemon restarting.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::Refused { .. }
                | ApiError::Broken { .. }
                | ApiError::Status { status: 503, .. }
        )
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Refused { url } => write!(
                f,
                "no reel daemon answers at {url}; start one with `reel serve`"
            ),
            ApiError::Broken { url, detail } => {
                write!(
                    f,
                    "the connection to the reel daemon at {url} broke: {detail}"
                )
            }
            ApiError::Unauthorized {
                url,
                from,
                sent: true,
            } => write!(f, "the daemon at {url} refused the token (from {from})"),
            ApiError::Unauthorized {
                url,
                from,
                sent: false,
            } => write!(
                f,
                "the daemon at {url} wants a token and none was found ({from}); \
                 give --token-file FILE or set REEL_TOKEN"
            ),
            ApiError::Status { message, .. } => f.write_str(message),
            ApiError::Other(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for ApiError {}

/// A successful answer: status, the `X-Reel-Offset` header and the body.
pub struct Answer {
    /// The HTTP status (2xx).
    pub status: u16,
    /// `X-Reel-Offset`, when the daemon sent it.
    pub offset: Option<u64>,
    /// `Content-Type`, when the daemon sent it.
    pub content_type: Option<String>,
    url: String,
    body: ureq::Body,
}

impl Answer {
    /// The body as JSON.
    pub fn json(self) -> Result<Value, ApiError> {
        let url = self.url.clone();
        let bytes = self.bytes(MAX_JSON_BYTES)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::Other(format!(
                "the daemon at {url} answered with JSON that does not parse: {e}"
            ))
        })
    }

    /// The whole body, up to `limit` bytes.
    pub fn bytes(self, limit: u64) -> Result<Vec<u8>, ApiError> {
        let url = self.url;
        let mut out = Vec::new();
        self.body
            .into_reader()
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| broken(&url, &e))?;
        if out.len() as u64 > limit {
            return Err(ApiError::Other(format!(
                "the daemon at {url} answered with more than {limit} bytes"
            )));
        }
        Ok(out)
    }

    /// The body as a reader, for output streamed as it arrives. A read error
    /// (the connection broke) is an [`ApiError::Broken`] inside the
    /// `io::Error` ([`read_error`] gets it back).
    pub fn reader(self) -> impl Read {
        BodyReader {
            url: self.url,
            inner: self.body.into_reader(),
        }
    }
}

struct BodyReader<R> {
    url: String,
    inner: R,
}

impl<R: Read> Read for BodyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner
            .read(buf)
            .map_err(|e| std::io::Error::other(broken(&self.url, &e)))
    }
}

/// The [`ApiError`] of a failed read from [`Answer::reader`].
pub fn read_error(e: std::io::Error) -> ApiError {
    let url = String::new();
    match e.into_inner().map(|inner| inner.downcast::<ApiError>()) {
        Some(Ok(api)) => *api,
        Some(Err(other)) => ApiError::Broken {
            url,
            detail: other.to_string(),
        },
        None => ApiError::Broken {
            url,
            detail: "read failed".into(),
        },
    }
}

fn broken(url: &str, e: &std::io::Error) -> ApiError {
    ApiError::Broken {
        url: url.to_owned(),
        detail: e.to_string(),
    }
}

/// A client of one daemon.
pub struct Client {
    agent: ureq::Agent,
    url: String,
    token: Token,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.url)
            .field("token", &self.token)
            .finish()
    }
}

impl Client {
    /// A client of the daemon at `url` (`http://HOST:PORT`, a trailing `/`
    /// ignored).
    pub fn new(url: &str, token: Token) -> anyhow::Result<Client> {
        let url = url.trim().trim_end_matches('/').to_owned();
        if !url.starts_with("http://") {
            anyhow::bail!(
                "{url} is not a daemon URL: it must start with http:// \
                 (the daemon answers plain HTTP on loopback)"
            );
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .build();
        Ok(Client {
            agent: ureq::Agent::new_with_config(config),
            url,
            token,
        })
    }

    /// Finds the daemon and its token for the state directory `state`.
    pub fn discover(state: &Path, args: &DaemonArgs) -> anyhow::Result<Client> {
        Client::new(&server_url(state, args), Token::find(state, args)?)
    }

    /// The daemon's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `GET path?query`; a non-2xx answer is an error.
    pub fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Answer, ApiError> {
        let mut req = self.agent.get(format!("{}{path}", self.url));
        for (k, v) in query {
            req = req.query(k, v);
        }
        if let Some(t) = &self.token.value {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        self.answer(req.call())
    }

    /// `GET path?query` whose body may take as long as it likes (a followed
    /// step's output).
    pub fn get_stream(&self, path: &str, query: &[(&str, String)]) -> Result<Answer, ApiError> {
        let mut req = self
            .agent
            .get(format!("{}{path}", self.url))
            .config()
            .timeout_recv_body(None)
            .timeout_global(None)
            .build();
        for (k, v) in query {
            req = req.query(k, v);
        }
        if let Some(t) = &self.token.value {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        self.answer(req.call())
    }

    /// `GET path?query` as JSON.
    pub fn get_json(&self, path: &str, query: &[(&str, String)]) -> Result<Value, ApiError> {
        self.get(path, query)?.json()
    }

    /// `POST path?query` with `body` and extra headers.
    pub fn post(
        &self,
        path: &str,
        query: &[(&str, String)],
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<Answer, ApiError> {
        let mut req = self.agent.post(format!("{}{path}", self.url));
        for (k, v) in query {
            req = req.query(k, v);
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(t) = &self.token.value {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        self.answer(req.send(body))
    }

    fn answer(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Answer, ApiError> {
        let resp = result.map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.trim().to_owned())
        };
        let offset = header("x-reel-offset").and_then(|v| v.parse().ok());
        let content_type = header("content-type");
        let answer = Answer {
            status,
            offset,
            content_type,
            url: self.url.clone(),
            body: resp.into_body(),
        };
        match status {
            200..=299 => Ok(answer),
            401 => Err(ApiError::Unauthorized {
                url: self.url.clone(),
                from: self.token.from.clone(),
                sent: self.token.value.is_some(),
            }),
            _ => {
                let body = answer.bytes(64 << 10).unwrap_or_default();
                Err(ApiError::Status {
                    status,
                    message: error_message(status, &body),
                })
            }
        }
    }

    fn transport(&self, e: ureq::Error) -> ApiError {
        let url = self.url.clone();
        match e {
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                ApiError::Refused { url }
            }
            ureq::Error::ConnectionFailed => ApiError::Refused { url },
            ureq::Error::Io(io) => ApiError::Broken {
                url,
                detail: io.to_string(),
            },
            ureq::Error::Timeout(t) => ApiError::Broken {
                url,
                detail: format!("no answer in time ({t})"),
            },
            ureq::Error::Protocol(p) => ApiError::Broken {
                url,
                detail: p.to_string(),
            },
            ureq::Error::HostNotFound => {
                ApiError::Other(format!("the host of {url} cannot be resolved"))
            }
            ureq::Error::BadUri(u) => ApiError::Other(format!("{u} is not a daemon URL")),
            other => ApiError::Other(format!("request to the daemon at {url} failed: {other}")),
        }
    }
}

/// The daemon's sentence from an error answer (`{"error": "…"}`), else the
/// body's text, else the status.
pub fn error_message(status: u16, body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body)
        && let Some(s) = v.get("error").and_then(Value::as_str)
    {
        return s.to_owned();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() || text.len() > 500 {
        format!("the daemon answered HTTP {status}")
    } else {
        format!("the daemon answered HTTP {status}: {text}")
    }
}

/// Going on through a daemon restart: after a transient failure (nothing
/// answers, the connection broke, 503), wait 100 ms, doubling to 2 s, and try
/// again, for up to `limit`; say so on stderr once per outage. Before the
/// first answer there is nothing to resume, so a failure then is final.
#[derive(Debug)]
pub struct Reconnect {
    limit: Duration,
    answered: bool,
    outage: Option<(Instant, Duration)>,
}

/// The first pause after a failure.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// The longest pause between tries.
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);

impl Reconnect {
    /// Tries again for up to `limit` of one outage.
    pub fn new(limit: Duration) -> Reconnect {
        Reconnect {
            limit,
            answered: false,
            outage: None,
        }
    }

    /// A request was answered: an outage (if any) is over.
    pub fn answered(&mut self) {
        self.answered = true;
        if self.outage.take().is_some() {
            eprintln!("reel: reconnected");
        }
    }

    /// After a failure: `Ok` once it is time to try again, `Err` when the
    /// failure is final (not transient, before any answer, or the outage has
    /// lasted `limit`).
    pub fn failed(&mut self, e: ApiError) -> Result<(), ApiError> {
        if !e.is_transient() || !self.answered || self.limit.is_zero() {
            return Err(e);
        }
        let (since, delay) = match self.outage {
            Some(o) => o,
            None => {
                eprintln!("reel: connection lost, reconnecting…");
                (Instant::now(), RECONNECT_FIRST)
            }
        };
        if since.elapsed() >= self.limit {
            return Err(ApiError::Other(format!(
                "gave up after {} without an answer: {e}",
                reel_engine::time::format_duration_ms(self.limit.as_millis() as u64)
            )));
        }
        std::thread::sleep(delay);
        self.outage = Some((since, (delay * 2).min(RECONNECT_MAX)));
        Ok(())
    }

    /// `f` until it is answered or fails for good.
    pub fn retry<T>(&mut self, mut f: impl FnMut() -> Result<T, ApiError>) -> Result<T, ApiError> {
        loop {
            match f() {
                Ok(v) => {
                    self.answered();
                    return Ok(v);
                }
                Err(e) => self.failed(e)?,
            }
        }
    }
}

/// `--reconnect-for`: `300`, `300s`, `500ms`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (for example 30s, 5m, 1h)"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("{s:?} is not a duration (for example 30s, 5m, 1h)")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// A path segment with everything but unreserved characters percent-encoded.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_json_needs_a_url_and_a_pid() {
        let e = parse_endpoint(br#"{"url": "http://127.0.0.1:7117", "socket": null, "pid": 1234}"#);
        assert_eq!(
            e,
            Some(Endpoint {
                url: "http://127.0.0.1:7117".into(),
                pid: 1234
            })
        );
        assert_eq!(
            parse_endpoint(br#"{"url": null, "socket": "/s", "pid": 1}"#),
            None
        );
        assert_eq!(parse_endpoint(br#"{"url": "http://x"}"#), None);
        assert_eq!(parse_endpoint(b"not json"), None);
    }

    #[test]
    fn a_live_endpoint_is_one_whose_pid_runs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("serve")).unwrap();
        let write = |pid: u32| {
            std::fs::write(
                dir.path().join("serve/endpoint.json"),
                format!(r#"{{"url": "http://127.0.0.1:9", "socket": null, "pid": {pid}}}"#),
            )
            .unwrap()
        };
        write(std::process::id());
        assert_eq!(live_endpoint(dir.path()).unwrap().url, "http://127.0.0.1:9");
        let args = DaemonArgs::default();
        assert_eq!(server_url(dir.path(), &args), "http://127.0.0.1:9");
        // A pid above pid_max: no such process.
        write(u32::MAX - 1);
        assert_eq!(live_endpoint(dir.path()), None);
        assert_eq!(server_url(dir.path(), &args), DEFAULT_URL);
        let flag = DaemonArgs {
            server: Some("http://127.0.0.1:1/".into()),
            token_file: None,
        };
        assert_eq!(server_url(dir.path(), &flag), "http://127.0.0.1:1/");
    }

    #[test]
    fn error_answers_are_the_daemons_sentence() {
        assert_eq!(
            error_message(400, br#"{"error": "hello.yml:3:5: unknown key"}"#),
            "hello.yml:3:5: unknown key"
        );
        assert_eq!(error_message(500, b""), "the daemon answered HTTP 500");
        assert_eq!(
            error_message(502, b"bad gateway"),
            "the daemon answered HTTP 502: bad gateway"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 weeks").is_err());
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("app.tar.gz"), "app.tar.gz");
        assert_eq!(encode_segment("a b?#%"), "a%20b%3F%23%25");
    }

    #[test]
    fn a_failure_before_any_answer_is_final_and_after_one_is_retried() {
        let mut r = Reconnect::new(Duration::from_secs(5));
        let refused = || ApiError::Refused {
            url: "http://x".into(),
        };
        assert!(r.failed(refused()).is_err(), "nothing to resume yet");
        r.answered();
        assert!(r.failed(refused()).is_ok());
        let not_found = ApiError::Status {
            status: 404,
            message: "no".into(),
        };
        assert!(r.failed(not_found).is_err(), "a 404 is an answer");
        let mut calls = 0;
        let got = r.retry(|| {
            calls += 1;
            if calls < 3 { Err(refused()) } else { Ok(calls) }
        });
        assert_eq!(got.unwrap(), 3);
        let mut once = Reconnect::new(Duration::ZERO);
        once.answered();
        let e = once.failed(refused()).unwrap_err();
        assert!(e.to_string().starts_with("no reel daemon answers"), "{e}");
        let mut short = Reconnect::new(Duration::from_millis(1));
        short.answered();
        assert!(short.failed(refused()).is_ok());
        let e = short.failed(refused()).unwrap_err();
        assert!(e.to_string().starts_with("gave up after"), "{e}");
    }
}
