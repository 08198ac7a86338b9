//! The routes of `docs/api.md`: each turns a request into a call on the
//! engine's [`Service`] and its answer into JSON. No rule about jobs lives
//! here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use reel_engine::model::event::{JobId, Outcome};
use reel_engine::model::state::JobState;
use reel_engine::service::{
    CancelError, Cancelled, Filter, Service, StateWord, Submission, SubmitError,
};
use reel_engine::store::{LogError, Stream};

use crate::http::{self, Handler, Request, Response};
use crate::metrics;

/// Most jobs one page of `GET /v1/jobs` holds.
pub const MAX_PAGE: usize = 1000;
/// Jobs per page when `limit` is not given.
pub const DEFAULT_PAGE: usize = 100;

/// The API over a service.
pub struct Api {
    svc: Service,
}

impl Api {
    /// The API of `svc`.
    pub fn new(svc: Service) -> Arc<Api> {
        Arc::new(Api { svc })
    }
}

impl Handler for Api {
    fn public(&self, method: &Method, path: &str) -> bool {
        // The web view's pages and assets are the same bytes for everyone and
        // hold nothing about jobs; a browser cannot send the bearer token with
        // a page load. Everything they show comes from token-checked calls.
        *method == Method::GET && (path == "/healthz" || crate::web::is_public(path))
    }

    fn handle(&self, req: Request) -> Pin<Box<dyn Future<Output = Response> + Send + 'static>> {
        let svc = self.svc.clone();
        Box::pin(async move { route(svc, req).await })
    }
}

fn not_found() -> Response {
    http::error(StatusCode::NOT_FOUND, "no such endpoint; see docs/api.md")
}

fn bad(msg: &str) -> Response {
    http::error(StatusCode::BAD_REQUEST, msg)
}

pub(crate) fn log_error(e: &LogError) -> Response {
    match e {
        LogError::UnknownJob(job) => http::error(StatusCode::NOT_FOUND, &format!("no job {job}")),
        e @ LogError::NoSuchArtifact { .. } => http::error(StatusCode::NOT_FOUND, &e.to_string()),
        e => http::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &reel_engine::store::error_line(e),
        ),
    }
}

async fn route(svc: Service, req: Request) -> Response {
    match (req.method.clone(), http::segments(&req.path).as_slice()) {
        (Method::GET, ["healthz"]) => {
            if svc.accepting() {
                http::json(StatusCode::OK, &json!({"status": "ok"}))
            } else {
                http::json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "draining"}),
                )
            }
        }
        (Method::GET, ["metrics"]) => http::bytes(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(&svc),
        ),
        (Method::POST, ["v1", "jobs"]) => submit(&svc, &req).await,
        (Method::GET, ["v1", "jobs"]) => list(&svc, &req).await,
        (Method::POST, ["v1", "gc"]) => gc(&svc, &req).await,
        (Method::GET, ["v1", "scheduler"]) => scheduler(&svc),
        (Method::GET, page) if crate::web::is_page(page) => crate::web::page(page),
        (method, ["v1", "jobs", id, rest @ ..]) => {
            let Ok(job) = id.parse::<JobId>() else {
                return bad(&format!("{id:?} is not a job id"));
            };
            match (method, rest) {
                (Method::GET, []) => detail(&svc, job).await,
                (Method::GET, ["events"]) => events(&svc, job, &req).await,
                (Method::POST, ["cancel"]) => cancel(&svc, job).await,
                (Method::GET, ["logs"]) => logs(&svc, job, &req).await,
                (Method::GET, ["artifacts"]) => crate::artifacts::list(&svc, job).await,
                (Method::GET, ["artifacts", name @ ..]) => {
                    match name
                        .iter()
                        .map(|n| http::percent_decode(n))
                        .collect::<Option<Vec<_>>>()
                    {
                        Some(parts) => {
                            crate::artifacts::download(&svc, job, &parts.join("/")).await
                        }
                        None => bad("the artifact name is not valid percent-encoded UTF-8"),
                    }
                }
                _ => not_found(),
            }
        }
        _ => not_found(),
    }
}

async fn submit(svc: &Service, req: &Request) -> Response {
    let Ok(text) = std::str::from_utf8(&req.body) else {
        return bad("the job file is not UTF-8 text");
    };
    let sub = Submission {
        text: text.to_string(),
        file: req.query("file").unwrap_or("job.yml").to_string(),
        owner: req.query("owner").map(str::to_string),
        // Not `req.header`, which hides a value that is not visible ASCII: such
        // a key must be refused (by the service's check), not dropped.
        idempotency_key: req
            .headers
            .get("idempotency-key")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
    };
    match svc.submit(sub).await {
        Ok(a) => {
            let state = svc
                .state(a.job)
                .map(|s| StateWord::of(s.phase).as_str())
                .unwrap_or("queued");
            let status = if a.created {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            };
            http::json(
                status,
                &json!({"job": a.job, "created": a.created, "state": state, "warnings": a.warnings}),
            )
        }
        Err(SubmitError::Draining) => http::error(
            StatusCode::SERVICE_UNAVAILABLE,
            &SubmitError::Draining.to_string(),
        ),
        Err(SubmitError::Log(e)) => log_error(&e),
        Err(e) => bad(&e.to_string()),
    }
}

/// A job as listings show it.
pub fn row(svc: &Service, s: &JobState) -> Value {
    let spec = s.spec.as_ref();
    json!({
        "id": s.id,
        "name": spec.map(|s| s.name.as_str()),
        "owner": spec.map(|s| s.owner.as_str()),
        "runner": spec.map(|s| s.runner.as_str()),
        "state": StateWord::of(s.phase).as_str(),
        "phase": s.phase.as_str(),
        "outcome": s.outcome.map(Outcome::as_str).filter(|_| s.is_terminal()),
        "reason": s.reason.as_deref().filter(|r| s.is_terminal() && !r.is_empty()),
        "submitted_ms": s.submitted_ms,
        "queued_ms": s.queued_ms,
        "started_ms": s.granted_ms,
        "finished_ms": s.finished_ms,
        "steps": spec.map_or(0, |s| s.steps.len()),
        "attempt": spec.map_or(1, |s| s.origin.retries + 1),
        "retry_of": spec.and_then(|s| s.origin.retry_of),
        "retried_as": svc.retried_as(s.id),
    })
}

async fn list(svc: &Service, req: &Request) -> Response {
    let mut filter = Filter::default();
    if let Some(w) = req.query("state").filter(|w| !w.is_empty() && *w != "all") {
        match StateWord::parse(w) {
            Some(w) => filter.state = Some(w),
            None => {
                return bad(&format!(
                    "state {w:?}: expected queued, running, ended or all"
                ));
            }
        }
    }
    if let Some(o) = req.query("outcome").filter(|o| !o.is_empty()) {
        match Outcome::parse(o) {
            Some(o) => filter.outcome = Some(o),
            None => {
                return bad(&format!(
                    "outcome {o:?}: expected succeeded, failed, cancelled, timed_out or lost"
                ));
            }
        }
    }
    filter.owner = req
        .query("owner")
        .filter(|o| !o.is_empty())
        .map(str::to_string);
    let limit = match req.query("limit") {
        None => DEFAULT_PAGE,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => n,
            _ => return bad(&format!("limit {l:?}: expected 1 to {MAX_PAGE}")),
        },
    };
    let cursor = match req.query("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => match c.parse::<JobId>() {
            Ok(c) => Some(c),
            Err(_) => return bad(&format!("cursor {c:?} is not one this API gave")),
        },
    };
    let svc2 = svc.clone();
    let page = blocking::unblock(move || {
        let (states, next) = svc2.list(&filter, limit, cursor)?;
        let rows: Vec<Value> = states.iter().map(|s| row(&svc2, s)).collect();
        let retention = svc2.log().retention()?;
        Ok::<_, reel_engine::store::LogError>((rows, next, retention))
    })
    .await;
    match page {
        Ok((rows, next, retention)) => http::json(
            StatusCode::OK,
            &json!({
                "jobs": rows,
                "next_cursor": next.map(|n| n.to_string()),
                "deleted_before_ms": retention.map(|r| r.horizon_ms),
            }),
        ),
        Err(e) => log_error(&e),
    }
}

async fn detail(svc: &Service, job: JobId) -> Response {
    let state = match svc.state(job) {
        Ok(s) => s,
        Err(e) => return log_error(&e),
    };
    let mut v = row(svc, &state);
    let spec = state.spec.as_ref();
    let steps: Vec<Value> = state
        .steps
        .iter()
        .map(|st| {
            json!({
                "step": st.index + 1,
                "name": spec.and_then(|s| s.steps.get(st.index as usize)).map(|s| s.name.as_str()),
                "exit_code": st.exit_code,
                "signal": st.signal,
                "timed_out": st.timed_out,
                "started_ms": st.started_ms,
                "finished_ms": st.finished_ms,
                "output_bytes": st.output_bytes,
            })
        })
        .collect();
    v["steps"] = json!(steps);
    v["step_count"] = json!(spec.map_or(0, |s| s.steps.len()));
    v["spec"] = json!(spec);
    v["cancel_requested"] = json!(state.cancel_requested);
    v["cid"] = json!(state.cid);
    v["notices"] = json!(state.notices);
    v["artifacts"] = crate::artifacts::of(&state);
    http::json(StatusCode::OK, &v)
}

async fn events(svc: &Service, job: JobId, req: &Request) -> Response {
    let raw = match req.query("format") {
        None | Some("json") => false,
        Some("raw") => true,
        Some(f) => return bad(&format!("format {f:?}: expected json or raw")),
    };
    if raw {
        let log = svc.log().clone();
        let got = blocking::unblock(move || -> Result<Vec<u8>, LogError> {
            let _ = log.summary(job)?;
            let mut out = Vec::new();
            for item in log.raw_events(job) {
                let (seq, envelope) = item?;
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&(envelope.len() as u32).to_be_bytes());
                out.extend_from_slice(&envelope);
            }
            Ok(out)
        })
        .await;
        return match got {
            Ok(bytes) => http::bytes(StatusCode::OK, "application/octet-stream", bytes),
            Err(e) => log_error(&e),
        };
    }
    let svc2 = svc.clone();
    match blocking::unblock(move || svc2.events(job)).await {
        Ok(records) => http::json(StatusCode::OK, &json!({"events": records})),
        Err(e) => log_error(&e),
    }
}

/// The scheduler's budget and queues now: what `/metrics` says of them, as JSON.
fn scheduler(svc: &Service) -> Response {
    let view = svc.sched_view();
    http::json(
        StatusCode::OK,
        &json!({
            "budget": view.budget,
            "used": view.used,
            "free": view.free,
            "queued": view.queued,
            "running": view.running,
            "queue_by_owner": view.queue_by_owner,
            "running_by_owner": view.running_by_owner,
            "accepting": svc.accepting(),
        }),
    )
}

async fn gc(svc: &Service, req: &Request) -> Response {
    let Some(keep) = req.query("keep") else {
        return bad("give how long to keep ended jobs: ?keep=30d");
    };
    let keep_ms = match reel_engine::input::jobfile::parse_duration(keep) {
        Ok(ms) => ms,
        Err(e) => return bad(&format!("keep: {e}")),
    };
    let horizon = reel_engine::time::now_ms().saturating_sub(keep_ms);
    match svc.gc(horizon).await {
        None => http::error(StatusCode::CONFLICT, "a gc is already running"),
        Some(Ok(report)) => http::json(StatusCode::OK, &json!(report)),
        Some(Err(e)) => log_error(&e),
    }
}

async fn cancel(svc: &Service, job: JobId) -> Response {
    match svc.cancel(job, "cancelled through the API").await {
        Ok(c) => {
            let state = svc
                .state(job)
                .map(|s| StateWord::of(s.phase).as_str())
                .unwrap_or("ended");
            let what = match c {
                Cancelled::WhileQueued => "cancelled while queued",
                Cancelled::Requested => "cancel requested; the job is being stopped",
            };
            http::json(
                StatusCode::ACCEPTED,
                &json!({"job": job, "state": state, "cancel": what}),
            )
        }
        Err(CancelError::Unknown(j)) => http::error(StatusCode::NOT_FOUND, &format!("no job {j}")),
        Err(e @ CancelError::Ended { .. }) => http::error(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ CancelError::NotHere(_)) => http::error(StatusCode::CONFLICT, &e.to_string()),
        Err(CancelError::Log(e)) => log_error(&e),
    }
}

async fn logs(svc: &Service, job: JobId, req: &Request) -> Response {
    let state = match svc.state(job) {
        Ok(s) => s,
        Err(e) => return log_error(&e),
    };
    let count = state.spec.as_ref().map_or(0, |s| s.steps.len());
    let step = match req.query("step").map(str::parse::<usize>) {
        None => return bad("give the step: ?step=N (steps are numbered from 1)"),
        Some(Ok(n)) if n >= 1 && n <= count => n,
        Some(Ok(0)) => return bad("steps are numbered from 1"),
        Some(Ok(n)) => {
            return http::error(
                StatusCode::NOT_FOUND,
                &format!("job {job} has {count} steps; there is no step {n}"),
            );
        }
        Some(Err(_)) => return bad("step: expected a number from 1"),
    };
    let offset = match req.query("offset").map(str::parse::<u64>) {
        None => 0,
        Some(Ok(o)) => o,
        Some(Err(_)) => return bad("offset: expected a byte offset"),
    };
    let only = match req.query("stream") {
        None | Some("") => None,
        Some("stdout") => Some(Stream::Stdout),
        Some("stderr") => Some(Stream::Stderr),
        Some(s) => return bad(&format!("stream {s:?}: expected stdout or stderr")),
    };
    let follow = match req.query("follow") {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(f) => return bad(&format!("follow {f:?}: expected true or false")),
    };
    let mut limit = match req.query("limit").map(str::parse::<u64>) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return bad("limit: expected a number of bytes"),
    };
    let chunks = match req.query("format") {
        None | Some("") | Some("raw") => false,
        Some("chunks") => true,
        Some(f) => return bad(&format!("format {f:?}: expected raw or chunks")),
    };
    let index = (step - 1) as u32;
    let log = svc.log().clone();
    let end = match blocking::unblock(move || log.output_end(job, index)).await {
        Ok(end) => end,
        Err(e) => return log_error(&e),
    };
    let content_type = if chunks {
        "application/x-ndjson"
    } else {
        "application/octet-stream"
    };
    let (resp, tx) = http::stream(
        StatusCode::OK,
        content_type,
        &[
            ("x-reel-offset", offset.to_string()),
            ("x-reel-stored", end.to_string()),
        ],
    );
    let reader = tx.clone();
    let mut f = svc
        .follow(job, index, offset, follow)
        .until_gone(move || reader.is_closed());
    smol::spawn(async move {
        while limit != Some(0) {
            let Some(Ok(mut c)) = f.next().await else {
                // The end, or the body ends early; the client resumes from its offset.
                break;
            };
            // Counted in the combined stream, so that `offset + limit` is where
            // the next page starts whatever `stream` is.
            if let Some(left) = limit.as_mut() {
                let take = (*left).min(c.bytes.len() as u64);
                c.bytes.truncate(take as usize);
                *left -= take;
            }
            if only.is_some_and(|s| s != c.stream) {
                continue;
            }
            let body = if chunks {
                let mut line = match serde_json::to_vec(&c.view(index)) {
                    Ok(line) => line,
                    Err(_) => break,
                };
                line.push(b'\n');
                line
            } else {
                c.bytes
            };
            if tx.send(Bytes::from(body)).await.is_err() {
                // The client went away.
                break;
            }
        }
    })
    .detach();
    resp
}
