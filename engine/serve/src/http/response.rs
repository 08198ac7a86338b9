//! Response helpers: every response a handler builds goes through one of these.

use bytes::Bytes;
use futures_lite::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{StatusCode, header};

use super::{Body, Response};

/// Chunks a streamed body holds before its sender waits for the reader.
const STREAM_CHUNKS: usize = 16;

/// A whole body of `content_type`.
pub fn bytes(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response {
    let body = Full::new(body.into())
        .map_err(|never| match never {})
        .boxed();
    with_type(status, content_type, body)
}

/// `value` as JSON (`application/json`). A value that does not serialise is a
/// bug: it is answered `500` and logged.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(v) => bytes(status, "application/json", v),
        Err(e) => {
            tracing::error!("a response did not serialise as JSON: {e}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

/// `{"error": message}` with `status`.
pub fn error(status: StatusCode, message: &str) -> Response {
    json(status, &serde_json::json!({ "error": message }))
}

/// Plain UTF-8 text (`text/plain; charset=utf-8`). Prometheus's exposition
/// format wants `text/plain; version=0.0.4`: use [`bytes`] for it.
pub fn text(status: StatusCode, body: String) -> Response {
    bytes(status, "text/plain; charset=utf-8", body)
}

/// A streamed (chunked) body. The handler keeps the sender and sends chunks;
/// dropping it ends the body. The channel is bounded, so a slow reader makes
/// only its own sender wait (empty chunks are skipped: they would end a
/// chunked body). `extra_headers` whose name or value is not a valid header are
/// left out (a bug, logged).
pub fn stream(
    status: StatusCode,
    content_type: &str,
    extra_headers: &[(&str, String)],
) -> (Response, async_channel::Sender<Bytes>) {
    let (tx, rx) = async_channel::bounded::<Bytes>(STREAM_CHUNKS);
    let frames = rx
        .filter(|chunk| !chunk.is_empty())
        .map(|chunk| Ok::<_, std::io::Error>(Frame::data(chunk)));
    let mut response = with_type(
        status,
        content_type,
        BodyExt::boxed(StreamBody::new(frames)),
    );
    for (name, value) in extra_headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => {
                response.headers_mut().append(n, v);
            }
            _ => tracing::error!("a response header is not valid: {name}"),
        }
    }
    (response, tx)
}

fn with_type(status: StatusCode, content_type: &str, body: Body) -> Response {
    let mut response = hyper::Response::new(body);
    *response.status_mut() = status;
    let value = HeaderValue::from_str(content_type).unwrap_or_else(|_| {
        tracing::error!("a content type is not a valid header value: {content_type:?}");
        HeaderValue::from_static("application/octet-stream")
    });
    response.headers_mut().insert(CONTENT_TYPE, value);
    response
}

/// The answer to a connection over the cap, written before its request is read.
pub(crate) fn too_many_connections() -> Vec<u8> {
    let body = br#"{"error":"too many connections"}"#;
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\n{}: application/json\r\n{}: {}\r\n{}: close\r\n\r\n",
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        body.len(),
        header::CONNECTION,
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}
