//! A job's agent session, and the steps run through it.
//!
//! A runner keeps one [`Session`] per live job: one connection to the job's agent,
//! bound to the job by its session token. [`Sessions::exec`] runs a step on it —
//! new, or taken back after an engine restart (`resume_from` > 0) — and passes the
//! step's output to the engine's sink, acknowledging to the agent only what the
//! engine stored durably. A cancel may arrive from another thread at any moment,
//! before the exec is registered, between `ExecStart` and the output, or after a
//! resume: the session's exec table is what makes sure none is lost. A cancel's
//! grace is the job's (`JobRequest::cancel_grace_ms`, kept in the runner's
//! handle), else [`CANCEL_GRACE`].
//!
//! [`Sessions::collect`] copies a job's artifacts out of the sandbox through the
//! same session (agent protocol version 3: `ListFiles`, then `ReadFile` chunk by
//! chunk), for both the process runner and the QEMU runner: one implementation
//! of the engine's `collect` contract over the agent, whether the workdir is on
//! the host or inside a guest.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reel_agent::glob::Pattern;
use reel_agent::proto::{ErrorCode, MAX_FILE_CHUNK, Message};
use reel_agent::{AgentClient, CancelHandle, ClientError, ExecRequest};
use reel_plugin_sdk::artifacts::{self, PartialFile};
use reel_plugin_sdk::host::notice;
use reel_plugin_sdk::{
    CollectRequest, Collected, Collection, ExecResult, OutputSink, RunnerError, StepRequest, Stream,
};

use crate::{client_error, lock};

/// Grace between the signals of the agent's INT → TERM → KILL ladder on cancel,
/// for a job that sets no `cancel_grace`.
pub const CANCEL_GRACE: Duration = Duration::from_millis(1000);
/// How long listing the artifacts may take (the agent walks the workdir).
const LIST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one chunk of an artifact may take to arrive.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The notice kind of what a collection says about patterns and files.
pub const ARTIFACT_NOTICE: &str = "artifact";

/// The grace of a job's cancels: its `cancel_grace_ms`, else [`CANCEL_GRACE`].
pub fn cancel_grace(cancel_grace_ms: Option<u64>) -> Duration {
    cancel_grace_ms.map_or(CANCEL_GRACE, Duration::from_millis)
}
/// Acknowledge delivered output to the agent after this many bytes.
const ACK_EVERY: u64 = 256 * 1024;
/// The most output merged into one sink call: the engine makes every sink call
/// durable before it returns, so fewer, larger calls store faster.
const COALESCE_BYTES: usize = 1024 * 1024;
/// How long a follow waits for more output before handing what it has to the sink.
const COALESCE_WAIT: Duration = Duration::from_micros(300);

/// A job's key among a runner's sessions: job id and sandbox id.
pub type Key = (u64, u32);

/// A connection to one job's agent.
pub struct Session {
    /// The token the connection was bound with.
    pub token: String,
    /// Held by `exec` for the whole step.
    client: Mutex<AgentClient>,
    /// Sends `Cancel` on the same connection without the `client` lock.
    canceller: CancelHandle,
    /// Execs of this session: exec id → cancelled. `exec` registers and sends
    /// `ExecStart` under this lock, and `cancel` marks and sends `Cancel` under it, so
    /// a cancel is never lost between the two.
    execs: Mutex<HashMap<u64, bool>>,
}

/// A runner's live sessions, by job.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<Key, Arc<Session>>>,
}

impl Sessions {
    /// The job's session, if this runner holds one.
    pub fn get(&self, key: Key) -> Option<Arc<Session>> {
        lock(&self.map).get(&key).cloned()
    }

    /// Forgets the job's session (its connection closes once no exec holds it).
    pub fn remove(&self, key: Key) -> Option<Arc<Session>> {
        lock(&self.map).remove(&key)
    }

    /// Binds a freshly connected `client` to the job (`Init` with its token) and
    /// keeps it as the job's session, replacing any earlier one.
    pub fn open(
        &self,
        key: Key,
        mut client: AgentClient,
        token: &str,
    ) -> Result<Arc<Session>, RunnerError> {
        client.set_ack_every(ACK_EVERY);
        client.set_merge(COALESCE_BYTES, COALESCE_WAIT);
        client
            .init(&key.0.to_string(), token)
            .map_err(|e| client_error("initializing the agent session", e))?;
        let session = Arc::new(Session {
            token: token.to_owned(),
            canceller: client.cancel_handle(),
            client: Mutex::new(client),
            execs: Mutex::new(HashMap::new()),
        });
        lock(&self.map).insert(key, Arc::clone(&session));
        Ok(session)
    }

    /// The job's session if it is bound with `token`, else a new one connected by
    /// `connect`.
    pub fn get_or_open(
        &self,
        key: Key,
        token: &str,
        connect: impl FnOnce() -> Result<AgentClient, RunnerError>,
    ) -> Result<Arc<Session>, RunnerError> {
        match self.get(key) {
            Some(s) if s.token == token => Ok(s),
            _ => self.open(key, connect()?, token),
        }
    }

    /// Runs `step` on `session` to its end: a new step is started with `request()`
    /// (never if it was cancelled before it started); a step with `resume_from` > 0
    /// is taken back from that offset and never run again (and stopped with
    /// `grace` if a cancel came first).
    pub fn exec(
        &self,
        session: &Session,
        step: &StepRequest,
        grace: Duration,
        request: impl FnOnce() -> ExecRequest,
        sink: &mut dyn OutputSink,
    ) -> Result<ExecResult, RunnerError> {
        let mut client = lock(&session.client);
        let fresh = step.resume_from == 0;
        {
            let mut execs = lock(&session.execs);
            if fresh {
                if execs.remove(&step.exec_id) == Some(true) {
                    // Cancelled before it started: never run it.
                    return Ok(ExecResult::default());
                }
                execs.insert(step.exec_id, false);
                client
                    .exec_start(&request())
                    .map_err(|e| client_error("starting the exec", e))?;
            } else {
                let cancelled = *execs.entry(step.exec_id).or_insert(false);
                client
                    .resume(step.exec_id, step.resume_from)
                    .map_err(|e| client_error("resuming the exec", e))?;
                if cancelled {
                    // A cancel arrived before the resume: pass it on now.
                    session
                        .canceller
                        .cancel(step.exec_id, grace)
                        .map_err(|e| client_error("sending Cancel", e))?;
                }
            }
        }
        let result = follow(&mut client, step.exec_id, step.resume_from, fresh, sink);
        lock(&session.execs).remove(&step.exec_id);
        result
    }

    /// Ends the job's exec `exec_id` (the agent's INT → TERM → KILL ladder, `grace`
    /// between the signals), or remembers the cancel when the exec is not
    /// registered yet, so that it is never started or is stopped on resume.
    /// Without a session there is nothing to stop.
    pub fn cancel(&self, key: Key, exec_id: u64, grace: Duration) -> Result<(), RunnerError> {
        let Some(session) = self.get(key) else {
            return Ok(());
        };
        let mut execs = lock(&session.execs);
        match execs.get_mut(&exec_id) {
            Some(cancelled) => {
                *cancelled = true;
                session
                    .canceller
                    .cancel(exec_id, grace)
                    .map_err(|e| client_error("sending Cancel", e))?;
            }
            None => {
                execs.insert(exec_id, true);
            }
        }
        Ok(())
    }

    /// Copies the job's artifacts out of the sandbox as `request` says (the
    /// engine's `collect` contract, see `reel_plugin_sdk::CollectRequest`),
    /// through `session`: the agent lists the files the patterns match (relative
    /// to its workdir, no symbolic link followed), and each is read in chunks into
    /// a partial file that is synced and renamed into place
    /// ([`reel_plugin_sdk::artifacts::PartialFile`]).
    ///
    /// A refused pattern, a pattern that matches nothing and a file that cannot
    /// be read are notices of kind [`ARTIFACT_NOTICE`]; a connection that breaks
    /// in the middle stops the collection (with a notice) and returns what was
    /// copied. An error only when nothing could be listed.
    pub fn collect(
        &self,
        session: &Session,
        request: &CollectRequest,
    ) -> Result<Collection, RunnerError> {
        let mut client = lock(&session.client);
        let mut patterns = Vec::new();
        for text in &request.patterns {
            match Pattern::parse(text) {
                Ok(p) => patterns.push(p),
                Err(e) => notice(ARTIFACT_NOTICE, &format!("not collected: {e}")),
            }
        }
        if patterns.is_empty() {
            return Ok(Collection::default());
        }
        let texts: Vec<String> = patterns.iter().map(|p| p.as_str().to_owned()).collect();
        let files = client
            .list_files(&texts, LIST_TIMEOUT)
            .map_err(|e| client_error("listing the artifacts", e))?;
        for p in &patterns {
            if !files.iter().any(|(name, _)| p.covers(name)) {
                notice(
                    ARTIFACT_NOTICE,
                    &format!("the pattern {:?} matched no file", p.as_str()),
                );
            }
        }
        let mut out = Collection {
            matched: files.len() as u64,
            ..Collection::default()
        };
        let mut total: u64 = 0;
        for (seq, (name, size)) in files.iter().enumerate() {
            if request.already.contains(name) {
                total = total.saturating_add(*size);
                continue;
            }
            if let Err(e) = artifacts::check_name(name) {
                notice(ARTIFACT_NOTICE, &format!("{name:?} not collected: {e}"));
                continue;
            }
            let left = request.max_total_bytes.saturating_sub(total);
            if *size > left {
                out.cap_reached_at = Some(name.clone());
                break;
            }
            match copy_file(&mut client, request, seq, name, left) {
                Ok(Some(c)) => {
                    total += c.size;
                    out.collected.push(c);
                }
                Ok(None) => {
                    // It grew past the cap while it was read.
                    out.cap_reached_at = Some(name.clone());
                    break;
                }
                Err(Copy::File(why)) => {
                    notice(ARTIFACT_NOTICE, &format!("{name:?} not collected: {why}"));
                }
                Err(Copy::Stop(why)) => {
                    notice(
                        ARTIFACT_NOTICE,
                        &format!(
                            "collecting stopped at {name:?}: {why}; {} of {} files copied",
                            out.collected.len(),
                            files.len()
                        ),
                    );
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Asks the job's agent to accept no more steps and waits for the running ones.
    pub fn drain(&self, key: Key, timeout: Duration) -> Result<(), RunnerError> {
        let Some(session) = self.get(key) else {
            return Ok(());
        };
        let mut client = lock(&session.client);
        client
            .drain(timeout)
            .map_err(|e| client_error("draining the agent", e))
    }

    /// Asks the job's agent to power off within `budget`; true once it acknowledged.
    /// Uses this runner's idle session; without one (another engine's, or an exec
    /// holds it) it connects anew with `connect(budget)` — which replaces the old
    /// connection at the agent — and presents `token`.
    pub fn poweroff(
        &self,
        key: Key,
        token: Option<&str>,
        budget: Duration,
        connect: impl FnOnce(Duration) -> Option<AgentClient>,
    ) -> bool {
        let start = Instant::now();
        if let Some(session) = self.remove(key)
            && let Ok(mut client) = session.client.try_lock()
        {
            return client.poweroff(budget).is_ok();
        }
        let Some(token) = token else {
            return false;
        };
        // The handshake may take up to a second past the connect timeout.
        if budget < Duration::from_millis(1500) {
            return false;
        }
        let Some(mut client) = connect(budget) else {
            return false;
        };
        let left = budget.saturating_sub(start.elapsed());
        let init = Message::Init {
            job_id: key.0.to_string(),
            session_token: token.to_owned(),
        };
        client.send(&init).is_ok() && client.poweroff(left).is_ok()
    }
}

/// Why one file was not copied.
enum Copy {
    /// This file only (the agent refused or could not read it): go on.
    File(String),
    /// Nothing more can be copied (the connection broke, the destination failed).
    Stop(String),
}

/// Copies `name` from the agent into place under the request's `dest_dir`
/// through a partial file; `None` if it turned out longer than `left` bytes
/// (nothing is left of it).
fn copy_file(
    client: &mut AgentClient,
    request: &CollectRequest,
    seq: usize,
    name: &str,
    left: u64,
) -> Result<Option<Collected>, Copy> {
    let local = |what: &str, e: std::io::Error| Copy::Stop(format!("{what}: {e}"));
    let mut file =
        PartialFile::create(request, seq).map_err(|e| local("cannot create a partial copy", e))?;
    loop {
        let offset = file.size();
        let read = client.read_file(name, offset, MAX_FILE_CHUNK as u32, READ_TIMEOUT);
        let (bytes, eof) = match read {
            Ok(x) => x,
            Err(ClientError::Agent {
                code: ErrorCode::FileRefused | ErrorCode::FileUnreadable,
                message,
                ..
            }) => return Err(Copy::File(message)),
            Err(e) => return Err(Copy::Stop(e.to_string())),
        };
        if offset + bytes.len() as u64 > left {
            return Ok(None);
        }
        file.write(&bytes)
            .map_err(|e| local("cannot write the partial copy", e))?;
        if eof {
            break;
        }
        if bytes.is_empty() {
            return Err(Copy::Stop(format!(
                "the agent sent no bytes of {name:?} at offset {offset} and no end"
            )));
        }
    }
    file.finish(request, name)
        .map(Some)
        .map_err(|e| local("cannot put the copy in place", e))
}

fn to_stream(s: reel_agent::Stream) -> Stream {
    match s {
        reel_agent::Stream::Stdout => Stream::Stdout,
        reel_agent::Stream::Stderr => Stream::Stderr,
    }
}

/// Follows one exec on `client` from `from` with the agent client's follow loop,
/// passing its output to `sink`. When a step sent as new (`started_fresh`) is one the
/// agent already has ([`ErrorCode::ExecExists`]: a restarted engine re-sent it), it is
/// resumed from the start instead.
fn follow(
    client: &mut AgentClient,
    exec_id: u64,
    from: u64,
    started_fresh: bool,
    sink: &mut dyn OutputSink,
) -> Result<ExecResult, RunnerError> {
    // The agent may drop only what the host holds durably; a host that stops
    // taking output ends the follow, and the step's output stays in the agent.
    let mut on_output = |stream, offset, bytes: &[u8]| {
        sink.chunk(to_stream(stream), offset, bytes);
        match sink.stored().end(offset + bytes.len() as u64) {
            Some(end) => ControlFlow::Continue(end),
            None => ControlFlow::Break(()),
        }
    };
    let outcome = match client.follow_stored(exec_id, from, &mut on_output) {
        Err(ClientError::Agent {
            exec_id: Some(id),
            code: ErrorCode::ExecExists,
            ..
        }) if started_fresh && id == exec_id => {
            tracing::info!(exec_id, "exec already running; resuming from 0");
            client
                .resume(exec_id, 0)
                .map_err(|e| client_error("resuming exec", e))?;
            client.follow_stored(exec_id, from, &mut on_output)
        }
        outcome => outcome,
    };
    let outcome = outcome.map_err(|e| follow_error(exec_id, e))?;
    Ok(ExecResult {
        exit_code: outcome.code,
        signal: outcome.signal,
        timed_out: outcome.timed_out,
        output_bytes: outcome.total_bytes,
    })
}

/// The runner's error for a follow that failed.
fn follow_error(exec_id: u64, e: ClientError) -> RunnerError {
    match e {
        ClientError::Agent {
            exec_id: Some(id),
            message,
            ..
        } => RunnerError::failed(format!("the agent reported for exec {id}: {message}")),
        ClientError::Agent {
            exec_id: None,
            message,
            ..
        } => RunnerError::failed(format!("the agent reported: {message}")),
        ClientError::Protocol(message) => RunnerError::failed(message),
        e => client_error(&format!("following exec {exec_id}"), e),
    }
}
