//! `GET /v1/jobs/{id}/artifacts[/{name}]`: a job's stored artifacts, as the
//! log lists them (only those with an `ArtifactStored` event: a partial copy
//! is never listed).

use hyper::StatusCode;
use serde_json::{Value, json};

use reel_engine::model::event::JobId;
use reel_engine::model::state::JobState;
use reel_engine::service::Service;

use crate::http::{self, Response};

/// The artifacts of `state`, as the API shows them.
pub fn of(state: &JobState) -> Value {
    json!(
        state
            .artifacts
            .iter()
            .map(|a| json!({"name": a.name, "size": a.size, "crc32c": format!("{:08x}", a.crc32c)}))
            .collect::<Vec<_>>()
    )
}

pub async fn list(svc: &Service, job: JobId) -> Response {
    match svc.state(job) {
        Ok(s) => http::json(StatusCode::OK, &json!({"artifacts": of(&s)})),
        Err(e) => crate::api::log_error(&e),
    }
}

pub async fn download(svc: &Service, job: JobId, name: &str) -> Response {
    let state = match svc.state(job) {
        Ok(s) => s,
        Err(e) => return crate::api::log_error(&e),
    };
    if !state.artifacts.iter().any(|a| a.name == name) {
        return http::error(
            StatusCode::NOT_FOUND,
            &format!("job {job} has no artifact {name:?}"),
        );
    }
    let path = match svc.log().artifact_path(job, name) {
        Ok(p) => p,
        Err(e) => return crate::api::log_error(&e),
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            return http::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot read artifact {name:?} of job {job}: {e}"),
            );
        }
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let (resp, tx) = http::stream(
        StatusCode::OK,
        "application/octet-stream",
        &[("content-length", size.to_string())],
    );
    // Read a piece at a time: memory stays one piece whatever the file's size.
    smol::spawn(async move {
        let mut file = Some(file);
        loop {
            let Some(mut f) = file.take() else { break };
            let read = blocking::unblock(move || {
                use std::io::Read as _;
                let mut buf = vec![0u8; 1 << 20];
                let n = f.read(&mut buf)?;
                buf.truncate(n);
                std::io::Result::Ok((f, buf))
            })
            .await;
            match read {
                Ok((_, buf)) if buf.is_empty() => break,
                Ok((f, buf)) => {
                    if tx.send(bytes::Bytes::from(buf)).await.is_err() {
                        break;
                    }
                    file = Some(f);
                }
                Err(_) => break,
            }
        }
    })
    .detach();
    resp
}
