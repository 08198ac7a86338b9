//! A request as the [`Handler`](super::Handler) sees it: head parsed, query
//! decoded, body collected within the limit.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use futures_lite::FutureExt;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::{HeaderMap, Method, StatusCode};

use super::{Limits, Response, error};

/// Which listener a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// TCP, from this peer address (authenticated by the bearer token).
    Tcp(SocketAddr),
    /// The unix socket (authorised by the socket file's permissions).
    Unix,
}

/// One request, whole.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    /// The path of the request target as sent (not percent-decoded, so an
    /// encoded `/` stays inside its segment; decode a segment with
    /// [`percent_decode`]).
    pub path: String,
    /// The query's `key=value` pairs in order, percent-decoded (`+` is a space).
    pub query: Vec<(String, String)>,
    /// The headers, less `Authorization` (checked before the handler runs).
    pub headers: HeaderMap,
    /// The body, collected: never over [`Limits::max_body`].
    pub body: Bytes,
    pub via: Via,
}

impl Request {
    /// The first value of query parameter `key`.
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of header `name` (case-insensitive), if it is visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The segments of a request path as sent (not decoded), a trailing `/`
/// ignored: `/v1/jobs/3/` is `["v1", "jobs", "3"]`, `/` is `[]`.
pub fn segments(path: &str) -> Vec<&str> {
    path.trim_end_matches('/').split('/').skip(1).collect()
}

/// Percent-decodes `s` (`%2F` → `/`); `None` when the result is not UTF-8. A `%`
/// not followed by two hex digits stays as it is. `+` is left alone (only the
/// query decodes it as a space).
pub fn percent_decode(s: &str) -> Option<String> {
    decode(s, false)
}

fn decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Parses a query string into decoded pairs; `None` when one is not UTF-8.
pub(crate) fn parse_query(q: &str) -> Option<Vec<(String, String)>> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((decode(k, true)?, decode(v, true)?))
        })
        .collect()
}

/// "4 MiB", "512 KiB", "1000 bytes".
pub(crate) fn size_words(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

fn too_large(limits: &Limits) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!(
            "request body is over the {} limit",
            size_words(limits.max_body)
        ),
    )
}

/// Turns hyper's request into ours, or answers it: `400` for a query that is not
/// UTF-8 or a body that breaks off, `413` for a body over the limit (told by its
/// `Content-Length` before anything is read, else when the limit is passed),
/// `408` for a body that pauses longer than the idle timeout.
pub(crate) async fn collect(
    req: hyper::Request<Incoming>,
    via: Via,
    limits: &Limits,
) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    let query = match parts.uri.query() {
        None => Vec::new(),
        Some(q) => parse_query(q).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "the query string is not valid UTF-8",
            )
        })?,
    };
    let declared = parts
        .headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body as u64) {
        return Err(too_large(limits));
    }
    let mut body = Limited::new(body, limits.max_body);
    let mut buf = BytesMut::new();
    loop {
        let frame = async { Some(body.frame().await) }
            .or(async {
                async_io::Timer::after(limits.idle_timeout).await;
                None
            })
            .await;
        match frame {
            None => {
                return Err(error(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body stopped arriving",
                ));
            }
            Some(None) => break,
            Some(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Some(Err(e))) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(too_large(limits));
            }
            Some(Some(Err(_))) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                ));
            }
        }
    }
    Ok(Request {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query,
        headers: parts.headers,
        body: buf.freeze(),
        via,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_decoded() {
        let q = parse_query("owner=al%69ce&file=a+b.yml&&flag&x=%zz%4").unwrap();
        assert_eq!(
            q,
            [
                ("owner".into(), "alice".into()),
                ("file".into(), "a b.yml".into()),
                ("flag".into(), String::new()),
                ("x".into(), "%zz%4".into()),
            ]
        );
        assert_eq!(parse_query("a=%ff"), None);
        assert_eq!(percent_decode("dist%2Fa+b").as_deref(), Some("dist/a+b"));
    }

    #[test]
    fn sizes_in_words() {
        assert_eq!(size_words(4 << 20), "4 MiB");
        assert_eq!(size_words(512 << 10), "512 KiB");
        assert_eq!(size_words(1000), "1000 bytes");
    }
}
