//! The commands that ask a running daemon (`reel serve`) over its HTTP API
//! (docs/api.md): `submit`, `status`, `cancel`, `logs`, `artifacts`; and the
//! daemon's side of the offline read commands (`jobs`, `replay`, `inspect`,
//! `export`, `output`) for when the daemon holds the log.
//!
//! Exit status: as `reel run` for what ends a job (`submit --wait`, `logs
//! -f`: 0 succeeded, 1 failed or lost, 3 timed out, 4 cancelled, the most
//! severe wins); 2 when the command could not do what it was asked.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use reel_engine::input::jobfile::{JobFileError, MAX_JOB_FILE_BYTES};
use reel_engine::model::event::{Event, JobId, Outcome, Record};
use reel_engine::store::{History, LogError};
use reel_engine::time::{format_duration_ms, format_ms};

use crate::client::{
    ApiError, Client, DaemonArgs, MAX_BINARY_BYTES, Reconnect, encode_segment, parse_duration,
    read_error,
};
use crate::replay::{OutputArgs, StreamArg, trunc};
use crate::run::{EXIT_ERROR, EXIT_FAILED, default_owner, outcome_code, severest};

/// How long a command that follows a job goes on through a daemon that is
/// gone (restarting).
#[derive(Args, Debug, Clone)]
pub struct ReconnectArgs {
    /// When the daemon stops answering (a restart), keep trying for this long
    /// (100 ms between tries, doubling to 2 s), then give up with exit status 2.
    /// Written like 30s, 5m, 1h or 500ms.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub reconnect_for: Duration,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Each FILE's bytes are sent as they are (POST /v1/jobs?owner=O&file=NAME); the daemon parses
them as `reel run` would and answers with the job's id. Every file is read before anything
is sent: if one cannot be read (or is over the 4 MiB limit), none is submitted. If the daemon
refuses a file (its message is printed, exit status 2), the files after it are not sent, and
the jobs already submitted are named.

--idempotency-key K makes a retried submission name the first job instead of making a second
one. With several files, file 1 is sent with key K-1, file 2 with K-2, and so on.

Exit status without --wait: 0 when every file was submitted, 2 otherwise. With --wait, as for
`reel run`: 0 every job succeeded; 1 one failed or was lost; 3 one timed out; 4 one was
cancelled (the most severe wins); 2 when a file was refused or the daemon stopped answering.")]
pub struct SubmitArgs {
    /// Job files (reel YAML or JSON, or spindle workflows).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Who the jobs belong to: the daemon's fair-share key (default: $USER,
    /// else $LOGNAME, else "unknown").
    #[arg(long, value_name = "NAME")]
    pub owner: Option<String>,
    /// Send this Idempotency-Key (K-1, K-2, … with several files).
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Wait for every submitted job to end; print one line per job as it ends.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON (an array: file, job, created, state; with --wait also outcome
    /// and reason) instead of lines.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub reconnect: ReconnectArgs,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Exit status: 0 when the daemon answered; 2 otherwise (no such job, no daemon, a refused token).")]
pub struct StatusArgs {
    /// The job id.
    pub job: JobId,
    /// Print the daemon's JSON (GET /v1/jobs/JOB) as it is.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
#[command(after_help = "\
A queued job ends cancelled at once; a running one has its cancel logged, its step stopped
(SIGINT, then SIGTERM, then SIGKILL, cancel_grace apart) and its sandbox torn down.

Exit status: 0 the cancel was accepted; 1 the job had already ended (nothing to cancel: its
outcome is printed); 2 no such job, or the daemon could not be asked.")]
pub struct CancelArgs {
    /// The job id.
    pub job: JobId,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Standard output gets each step's output and nothing else, byte for byte as stored (secrets
masked), so `reel logs JOB --step 1 > file` holds exactly what `reel output JOB --step 1`
prints. The step headers (==> step 1 \"build\") and the closing line about the job go to
standard error.

-f follows a job still running: each step's output as it is stored, one step after the other,
until the job ends. Through a daemon restart it goes on: on a lost connection it says so once
on stderr, tries again (see --reconnect-for) and resumes at the byte it had reached, so the
output has no gap and no duplicate.

Exit status: without -f, 0; with -f, once the job has ended, as for `reel run` (0 succeeded,
1 failed or lost, 3 timed out, 4 cancelled); with -f --step N, the job's status if it ended by
then, else 0; 2 when the daemon could not be asked or gave up answering.")]
pub struct LogsArgs {
    /// The job id.
    pub job: JobId,
    /// Follow the job: print output as it is stored, until the job ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only this step (numbered from 1); no header is printed.
    #[arg(long, value_name = "N")]
    pub step: Option<u32>,
    /// Only this stream.
    #[arg(long, value_enum, value_name = "STREAM")]
    pub stream: Option<StreamArg>,
    #[command(flatten)]
    pub reconnect: ReconnectArgs,
}

#[derive(Args, Debug)]
#[command(after_help = "\
With -o DIR each artifact is downloaded to DIR/<name> (subdirectories are created), written to
a temporary name beside it and renamed once its size and CRC-32C match what the daemon listed.
A name that is absolute or contains `..` is refused, as is an artifact whose bytes do not
match; the others are still saved.

Exit status: 0 listed (or every artifact saved); 1 some artifact was refused; 2 the daemon
could not be asked or a file could not be written.")]
pub struct ArtifactsArgs {
    /// The job id.
    pub job: JobId,
    /// Download every artifact into DIR.
    #[arg(short = 'o', long = "output-dir", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Print the daemon's list as JSON.
    #[arg(long)]
    pub json: bool,
}

// ---------------------------------------------------------------------------------
// A job as the daemon describes it (GET /v1/jobs/{id}); read leniently, so a
// field the daemon adds or leaves out changes nothing here.

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn num(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn name(job: &Value) -> String {
    text(job, "name").unwrap_or_default()
}

fn outcome(job: &Value) -> Option<Outcome> {
    serde_json::from_value(job.get("outcome")?.clone()).ok()
}

fn ended(job: &Value) -> bool {
    job.get("state").and_then(Value::as_str) == Some("ended")
        || job.get("phase").and_then(Value::as_str) == Some("terminal")
}

/// The exit status an ended job gives (`reel run`'s), 0 for one still going.
fn job_code(job: &Value) -> u8 {
    if !ended(job) {
        return 0;
    }
    outcome(job).map_or(EXIT_FAILED, outcome_code)
}

/// The step list of a job's detail (`{"step": 1, "name", …}`).
fn steps(job: &Value) -> &[Value] {
    job.get("steps")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn step(job: &Value, n: u32) -> Option<&Value> {
    steps(job)
        .iter()
        .find(|s| num(s, "step") == Some(u64::from(n)))
}

/// How many steps the job has: its spec's, else its step list's, else the
/// count the job list gives.
fn step_count(job: &Value) -> u32 {
    let spec = job
        .get("spec")
        .and_then(|s| s.get("steps"))
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let listed = steps(job)
        .iter()
        .filter_map(|s| num(s, "step"))
        .max()
        .unwrap_or(0) as usize;
    let counted = num(job, "steps").unwrap_or(0) as usize;
    u32::try_from(spec.max(listed).max(counted)).unwrap_or(u32::MAX)
}

fn step_name(job: &Value, n: u32) -> String {
    step(job, n)
        .and_then(|s| text(s, "name"))
        .or_else(|| {
            job.get("spec")?
                .get("steps")?
                .get(n.checked_sub(1)? as usize)?
                .get("name")?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn step_started(job: &Value, n: u32) -> bool {
    step(job, n).is_some_and(|s| num(s, "started_ms").is_some())
}

fn step_finished(job: &Value, n: u32) -> bool {
    step(job, n).is_some_and(|s| num(s, "finished_ms").is_some())
}

/// How long the job ran (or has waited and run): from its start (else its
/// queueing, else its submission) to its end.
fn took_ms(job: &Value) -> Option<u64> {
    let end = num(job, "finished_ms")?;
    let from = num(job, "started_ms")
        .or_else(|| num(job, "queued_ms"))
        .or_else(|| num(job, "submitted_ms"))?;
    Some(end.saturating_sub(from))
}

/// `succeeded in 2.1s`, `failed in 3.0s: step 1 exited with code 1`, or
/// `running, 1 of 3 steps finished`.
fn how_it_stands(job: &Value) -> String {
    if !ended(job) {
        let total = step_count(job);
        let done = steps(job)
            .iter()
            .filter(|s| num(s, "finished_ms").is_some())
            .count();
        return format!(
            "{}, {done} of {total} step{} finished",
            text(job, "state").unwrap_or_else(|| "running".into()),
            if total == 1 { "" } else { "s" }
        );
    }
    let what = outcome(job).map_or("ended".to_string(), |o| o.as_str().replace('_', " "));
    let took = took_ms(job)
        .map(|ms| format!(" in {}", format_duration_ms(ms)))
        .unwrap_or_default();
    let reason = text(job, "reason")
        .filter(|r| !r.is_empty())
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    format!("{what}{took}{reason}")
}

/// GET /v1/jobs/{id}, with a 404 said as "no job N".
fn get_job(client: &Client, id: JobId) -> Result<Value, ApiError> {
    client
        .get_json(&format!("/v1/jobs/{id}"), &[])
        .map_err(|e| match e {
            ApiError::Status { status: 404, .. } => ApiError::Other(format!("no job {id}")),
            e => e,
        })
}

// ---------------------------------------------------------------------------------
// submit

/// A job file read for sending: at most [`MAX_JOB_FILE_BYTES`], as `reel run`
/// reads one (a larger file, or an endless one, is refused unread).
fn read_job_file(path: &Path) -> Result<Vec<u8>, JobFileError> {
    let origin = path.display().to_string();
    let read = |source| JobFileError::Read {
        origin: origin.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    if meta.is_file() && meta.len() > MAX_JOB_FILE_BYTES {
        return Err(JobFileError::TooLarge {
            origin,
            size: Some(meta.len()),
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_JOB_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_JOB_FILE_BYTES {
        return Err(JobFileError::TooLarge {
            origin,
            size: meta.is_file().then_some(bytes.len() as u64),
        });
    }
    Ok(bytes)
}

/// The key file `index` (from 0) of `count` is sent with.
fn key_for(key: &str, index: usize, count: usize) -> String {
    if count == 1 {
        key.to_owned()
    } else {
        format!("{key}-{}", index + 1)
    }
}

struct Submitted {
    file: PathBuf,
    job: JobId,
    created: bool,
    state: String,
}

pub fn submit(state_dir: &Path, daemon: &DaemonArgs, args: &SubmitArgs) -> Result<ExitCode> {
    let mut files = Vec::new();
    let mut bad = 0;
    for f in &args.files {
        match read_job_file(f) {
            Ok(bytes) => files.push((f.clone(), bytes)),
            Err(e) => {
                eprintln!("reel: {e}");
                bad += 1;
            }
        }
    }
    if bad > 0 {
        bail!(
            "{bad} of {} job files cannot be read; nothing was submitted",
            args.files.len()
        );
    }
    let owner = args.owner.clone().unwrap_or_else(default_owner);
    let client = Client::discover(state_dir, daemon)?;
    let mut done: Vec<Submitted> = Vec::new();
    let count = files.len();
    for (i, (file, bytes)) in files.iter().enumerate() {
        let file_name = file
            .file_name()
            .map_or_else(|| "job.yml".into(), |n| n.to_string_lossy().into_owned());
        let key = args
            .idempotency_key
            .as_deref()
            .map(|k| key_for(k, i, count));
        let headers: Vec<(&str, String)> =
            key.iter().map(|k| ("Idempotency-Key", k.clone())).collect();
        let answer = client
            .post(
                "/v1/jobs",
                &[("owner", owner.clone()), ("file", file_name.clone())],
                &headers,
                bytes,
            )
            .and_then(|a| {
                let status = a.status;
                a.json().map(|v| (status, v))
            });
        let (status, v) = match answer {
            Ok(v) => v,
            Err(e) => {
                let msg = e.to_string();
                if matches!(e, ApiError::Status { .. }) && !msg.contains(&file_name) {
                    eprintln!("reel: {}: {msg}", file.display());
                } else {
                    eprintln!("reel: {msg}");
                }
                let rest: Vec<String> = files[i..]
                    .iter()
                    .map(|(f, _)| f.display().to_string())
                    .collect();
                if done.is_empty() {
                    eprintln!("reel: nothing was submitted");
                } else {
                    let jobs: Vec<String> = done
                        .iter()
                        .map(|s| format!("job {} ({})", s.job, s.file.display()))
                        .collect();
                    eprintln!(
                        "reel: submitted before it: {}; not submitted: {}",
                        jobs.join(", "),
                        rest.join(", ")
                    );
                }
                if args.json {
                    print_submissions(&done, None)?;
                }
                return Ok(ExitCode::from(EXIT_ERROR));
            }
        };
        let Some(job) = num(&v, "job") else {
            bail!(
                "the daemon accepted {} but named no job: {v}",
                file.display()
            );
        };
        // 202 makes a job, 200 names one made before (the key was seen).
        let created = v
            .get("created")
            .and_then(Value::as_bool)
            .unwrap_or(status != 200);
        if !args.json {
            match (&key, created) {
                (_, true) => println!("job {job} submitted ({})", file.display()),
                (Some(k), false) => println!(
                    "job {job} already submitted with key {k} ({})",
                    file.display()
                ),
                (None, false) => println!("job {job} already submitted ({})", file.display()),
            }
        }
        done.push(Submitted {
            file: file.clone(),
            job,
            created,
            state: text(&v, "state").unwrap_or_default(),
        });
    }
    if !args.wait {
        if args.json {
            print_submissions(&done, None)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let _ = std::io::stdout().flush();
    let ids: Vec<JobId> = done.iter().map(|s| s.job).collect();
    let mut reconnect = Reconnect::new(args.reconnect.reconnect_for);
    reconnect.answered();
    let (code, ended) = wait_for(&client, &ids, &mut reconnect, !args.json)?;
    if args.json {
        print_submissions(&done, Some(&ended))?;
    }
    Ok(ExitCode::from(code))
}

fn print_submissions(done: &[Submitted], ended: Option<&[Value]>) -> Result<()> {
    let rows: Vec<Value> = done
        .iter()
        .map(|s| {
            let mut row = json!({
                "file": s.file.display().to_string(),
                "job": s.job,
                "created": s.created,
                "state": s.state,
            });
            if let Some(job) = ended.and_then(|e| e.iter().find(|j| num(j, "id") == Some(s.job))) {
                row["state"] = job.get("state").cloned().unwrap_or(Value::Null);
                row["outcome"] = job.get("outcome").cloned().unwrap_or(Value::Null);
                row["reason"] = job.get("reason").cloned().unwrap_or(Value::Null);
            }
            row
        })
        .collect();
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &rows)?;
    writeln!(out)?;
    Ok(())
}

/// Polls each job (100 ms between rounds, doubling to 1 s) until all have
/// ended, printing a line for each as it ends; the most severe status, and
/// the jobs as they ended.
fn wait_for(
    client: &Client,
    ids: &[JobId],
    reconnect: &mut Reconnect,
    lines: bool,
) -> Result<(u8, Vec<Value>)> {
    let mut pending: Vec<JobId> = ids.to_vec();
    let mut ended_jobs = Vec::new();
    let mut code = 0u8;
    let mut pause = Duration::from_millis(100);
    while !pending.is_empty() {
        let mut still = Vec::new();
        for &id in &pending {
            let job = reconnect.retry(|| get_job(client, id))?;
            if ended(&job) {
                code = severest(code, job_code(&job));
                if lines {
                    println!("job {id} {}: {}", name(&job), how_it_stands(&job));
                    let _ = std::io::stdout().flush();
                }
                ended_jobs.push(job);
            } else {
                still.push(id);
            }
        }
        pending = still;
        if !pending.is_empty() {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
    Ok((code, ended_jobs))
}

// ---------------------------------------------------------------------------------
// status, cancel

pub fn status(state_dir: &Path, daemon: &DaemonArgs, args: &StatusArgs) -> Result<ExitCode> {
    let client = Client::discover(state_dir, daemon)?;
    let job = get_job(&client, args.job)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &job)?;
        writeln!(out)?;
    } else {
        out.write_all(status_text(args.job, &job).as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `reel status` as text: the job's fields, then a table of its steps.
fn status_text(id: JobId, job: &Value) -> String {
    let mut s = format!("job {id} {:?}\n", name(job));
    let field = |s: &mut String, label: &str, value: String| {
        s.push_str(&format!("  {:<11} {value}\n", format!("{label}:")));
    };
    let st = text(job, "state").unwrap_or_else(|| "?".into());
    let phase = text(job, "phase").map_or(String::new(), |p| format!(" ({p})"));
    field(&mut s, "state", format!("{st}{phase}"));
    if let Some(o) = outcome(job) {
        field(&mut s, "outcome", o.as_str().to_owned());
    }
    if let Some(r) = text(job, "reason").filter(|r| !r.is_empty()) {
        field(&mut s, "reason", r);
    }
    field(
        &mut s,
        "owner",
        text(job, "owner").unwrap_or_else(|| "-".into()),
    );
    field(
        &mut s,
        "runner",
        text(job, "runner").unwrap_or_else(|| "-".into()),
    );
    for (label, key) in [
        ("submitted", "submitted_ms"),
        ("queued", "queued_ms"),
        ("started", "started_ms"),
    ] {
        if let Some(ms) = num(job, key) {
            field(&mut s, label, format_ms(ms));
        }
    }
    if let Some(ms) = num(job, "finished_ms") {
        let took = took_ms(job)
            .map(|t| format!(" (ran {})", format_duration_ms(t)))
            .unwrap_or_default();
        field(&mut s, "finished", format!("{}{took}", format_ms(ms)));
    }
    let mut attempt = num(job, "attempt").map_or("1".into(), |a| a.to_string());
    if let Some(of) = num(job, "retry_of") {
        attempt.push_str(&format!(", a retry of job {of}"));
    }
    if let Some(next) = num(job, "retried_as") {
        attempt.push_str(&format!(", retried as job {next}"));
    }
    field(&mut s, "attempt", attempt);
    match job.get("cancel_requested") {
        Some(Value::Bool(true)) => field(&mut s, "cancel", "requested".into()),
        Some(Value::String(r)) => field(&mut s, "cancel", format!("requested ({r})")),
        _ => {}
    }
    if let Some(a) = job.get("artifacts").and_then(Value::as_array) {
        field(&mut s, "artifacts", a.len().to_string());
    }
    let total = step_count(job);
    if total > 0 {
        s.push_str(&format!(
            "  {:>4}  {:<24} {:<10} {:>9} {:>12}\n",
            "STEP", "NAME", "EXIT", "DURATION", "BYTES"
        ));
        for n in 1..=total {
            let st = step(job, n);
            let exit = match st {
                None => "-".to_string(),
                Some(st) if num(st, "finished_ms").is_none() => {
                    if num(st, "started_ms").is_some() {
                        "running".into()
                    } else {
                        "-".into()
                    }
                }
                Some(st) if st.get("timed_out").and_then(Value::as_bool) == Some(true) => {
                    "timed out".into()
                }
                Some(st) => match (
                    num(st, "signal"),
                    st.get("exit_code").and_then(Value::as_i64),
                ) {
                    (Some(sig), _) => format!("signal {sig}"),
                    (None, Some(c)) => c.to_string(),
                    (None, None) => "?".into(),
                },
            };
            let duration = st
                .and_then(|st| Some(num(st, "finished_ms")?.saturating_sub(num(st, "started_ms")?)))
                .map_or("-".into(), format_duration_ms);
            let bytes = st
                .and_then(|st| num(st, "output_bytes"))
                .map_or("-".into(), |b| b.to_string());
            s.push_str(&format!(
                "  {n:>4}  {:<24} {exit:<10} {duration:>9} {bytes:>12}\n",
                trunc(&format!("{:?}", step_name(job, n)), 24)
            ));
        }
    }
    s
}

pub fn cancel(state_dir: &Path, daemon: &DaemonArgs, args: &CancelArgs) -> Result<ExitCode> {
    let client = Client::discover(state_dir, daemon)?;
    let id = args.job;
    match client
        .post(&format!("/v1/jobs/{id}/cancel"), &[], &[], b"")
        .and_then(|a| a.json())
    {
        Ok(v) => {
            let st = text(&v, "state").unwrap_or_default();
            if st == "ended" {
                println!("job {id} cancelled");
            } else if st.is_empty() {
                println!("job {id}: cancel requested");
            } else {
                println!(
                    "job {id}: cancel requested; it is {st} while its step is stopped and its sandbox torn down"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ApiError::Status { status: 409, .. }) => {
            let how = get_job(&client, id)
                .ok()
                .and_then(|j| outcome(&j))
                .map_or(String::new(), |o| format!(" ({})", o.as_str()));
            println!("job {id} already ended{how}");
            Ok(ExitCode::from(EXIT_FAILED))
        }
        Err(ApiError::Status { status: 404, .. }) => bail!("no job {id}"),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------------
// logs, and `output` from the daemon

/// Where one step's output is read from, and how.
struct StepRead {
    job: JobId,
    step: u32,
    offset: u64,
    stream: Option<StreamArg>,
    follow: bool,
}

fn stream_name(s: StreamArg) -> &'static str {
    match s {
        StreamArg::Stdout => "stdout",
        StreamArg::Stderr => "stderr",
    }
}

/// Copies one step's output from the daemon to `out` as it arrives. When the
/// connection breaks it asks again where it stopped — at `X-Reel-Offset` plus
/// the bytes received; with a stream chosen, whose bytes carry no combined
/// offset, from the same start, skipping what was already written — so the
/// bytes written have no gap and no duplicate. Following, it ends when the
/// step has ended (and every byte of it was written) or the job ended without
/// it, and returns the job as it was then; else after one answer.
fn copy_step(
    client: &Client,
    read: &StepRead,
    out: &mut impl Write,
    reconnect: &mut Reconnect,
) -> Result<Option<Value>> {
    let path = format!("/v1/jobs/{}/logs", read.job);
    // Unfiltered: the next combined offset to ask for. Filtered: the bytes of
    // the stream written since `read.offset`.
    let mut next = read.offset;
    let mut written = 0u64;
    let mut idle = Duration::from_millis(100);
    let mut asked_for_the_rest = false;
    loop {
        let mut query = vec![
            ("step", read.step.to_string()),
            (
                "offset",
                if read.stream.is_some() {
                    read.offset
                } else {
                    next
                }
                .to_string(),
            ),
        ];
        if let Some(s) = read.stream {
            query.push(("stream", stream_name(s).to_owned()));
        }
        if read.follow {
            query.push(("follow", "true".to_owned()));
        }
        let answer = match client.get_stream(&path, &query) {
            Ok(a) => a,
            Err(ApiError::Status {
                status: 404,
                message,
            }) => {
                bail!("job {}: {message}", read.job)
            }
            Err(e) => {
                reconnect.failed(e)?;
                continue;
            }
        };
        reconnect.answered();
        let start = if read.stream.is_some() {
            read.offset
        } else {
            answer.offset.unwrap_or(next)
        };
        let mut skip = if read.stream.is_some() { written } else { 0 };
        let mut received = 0u64;
        let mut body = answer.reader();
        let mut buf = vec![0u8; 64 * 1024];
        let broke = loop {
            match body.read(&mut buf) {
                Ok(0) => break None,
                Ok(k) => {
                    received += k as u64;
                    let drop = usize::try_from(skip).unwrap_or(usize::MAX).min(k);
                    skip -= drop as u64;
                    let fresh = &buf[drop..k];
                    if !fresh.is_empty() {
                        out.write_all(fresh)?;
                        out.flush()?;
                        written += fresh.len() as u64;
                    }
                    if read.stream.is_none() {
                        next = start + received;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Some(read_error(e)),
            }
        };
        if let Some(e) = broke {
            reconnect.failed(e)?;
            continue;
        }
        if !read.follow {
            return Ok(None);
        }
        let job = reconnect.retry(|| get_job(client, read.job))?;
        if step_finished(&job, read.step) {
            let stored = step(&job, read.step).and_then(|s| num(s, "output_bytes"));
            // The answer ended with the step; ask once more for anything
            // stored after it was sent.
            if read.stream.is_none() && stored.is_some_and(|b| next < b) && !asked_for_the_rest {
                asked_for_the_rest = true;
                continue;
            }
            return Ok(Some(job));
        }
        if ended(&job) {
            return Ok(Some(job));
        }
        // The answer ended while the step goes on (a daemon closing its
        // streams): ask again, after a pause if nothing came.
        if received == 0 {
            std::thread::sleep(idle);
            idle = (idle * 2).min(Duration::from_secs(1));
        } else {
            idle = Duration::from_millis(100);
        }
    }
}

pub fn logs(state_dir: &Path, daemon: &DaemonArgs, args: &LogsArgs) -> Result<ExitCode> {
    if args.step == Some(0) {
        bail!("steps are numbered from 1");
    }
    let client = Client::discover(state_dir, daemon)?;
    let mut reconnect = Reconnect::new(args.reconnect.reconnect_for);
    let mut job = reconnect.retry(|| get_job(&client, args.job))?;
    let total = step_count(&job);
    let wanted: Vec<u32> = match args.step {
        Some(n) if total > 0 && n > total => bail!(
            "job {} has {total} step{}; there is no step {n}",
            args.job,
            if total == 1 { "" } else { "s" }
        ),
        Some(n) => vec![n],
        None => (1..=total).collect(),
    };
    let mut out = std::io::stdout().lock();
    for n in wanted {
        // Without -f, the steps that started; following, each until the job
        // ends without reaching one.
        if !step_started(&job, n) && (!args.follow || ended(&job)) && args.step.is_none() {
            continue;
        }
        if args.step.is_none() {
            out.flush()?;
            eprintln!("==> step {n} {:?}", step_name(&job, n));
        }
        let read = StepRead {
            job: args.job,
            step: n,
            offset: 0,
            stream: args.stream,
            follow: args.follow,
        };
        if let Some(j) = copy_step(&client, &read, &mut out, &mut reconnect)? {
            job = j;
        }
    }
    out.flush()?;
    drop(out);
    if args.follow && args.step.is_none() {
        // Every step's output is in; the job may still be tearing down.
        let (_, jobs) = wait_for(&client, &[args.job], &mut reconnect, false)?;
        job = jobs.into_iter().next().unwrap_or(job);
    } else if !args.follow {
        // The closing line says how the job stands now.
        job = reconnect.retry(|| get_job(&client, args.job))?;
    }
    eprintln!(
        "==> job {} {:?}: {}",
        args.job,
        name(&job),
        how_it_stands(&job)
    );
    Ok(ExitCode::from(if args.follow { job_code(&job) } else { 0 }))
}

/// `reel output` answered by the daemon: the same bytes, from
/// `GET /v1/jobs/{id}/logs` (--offset and --stream as query parameters).
pub fn output(client: &Client, args: &OutputArgs) -> Result<ExitCode> {
    if args.json {
        bail!(
            "`reel output --json` shows the log's stored chunks, which only the log has; \
             the daemon serves the bytes (drop --json for the same output)"
        );
    }
    let job = get_job(client, args.job)?;
    let total = step_count(&job);
    let wanted: Vec<u32> = match args.step {
        Some(0) => bail!("steps are numbered from 1"),
        Some(n) if n > total => bail!("job {} has {total} steps; there is no step {n}", args.job),
        Some(n) => vec![n],
        None => (1..=total).filter(|n| step_started(&job, *n)).collect(),
    };
    let mut reconnect = Reconnect::new(Duration::ZERO);
    reconnect.answered();
    let mut out = std::io::stdout().lock();
    for n in wanted {
        let read = StepRead {
            job: args.job,
            step: n,
            offset: args.offset,
            stream: args.stream,
            follow: false,
        };
        copy_step(client, &read, &mut out, &mut reconnect)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------
// artifacts

/// An artifact's name as a path under the download directory: relative, and
/// never leaving it.
fn safe_relative(name: &str) -> Result<PathBuf, String> {
    if name.is_empty() || name.contains('\0') {
        return Err("the name is empty or holds a NUL".into());
    }
    let path = Path::new(name);
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err("the name is an absolute path".into());
            }
            Component::ParentDir => return Err("the name contains `..`".into()),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err("the name names no file".into());
    }
    Ok(rel)
}

/// Why a downloaded artifact was refused, or what failed writing it.
enum Refusal {
    Bad(String),
    Failed(anyhow::Error),
}

pub fn artifacts(state_dir: &Path, daemon: &DaemonArgs, args: &ArtifactsArgs) -> Result<ExitCode> {
    let client = Client::discover(state_dir, daemon)?;
    let id = args.job;
    let list = client
        .get_json(&format!("/v1/jobs/{id}/artifacts"), &[])
        .map_err(|e| match e {
            ApiError::Status { status: 404, .. } => ApiError::Other(format!("no job {id}")),
            e => e,
        })?;
    let items: Vec<Value> = list
        .get("artifacts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let Some(dir) = &args.output_dir else {
        let mut out = std::io::stdout().lock();
        if args.json {
            serde_json::to_writer_pretty(&mut out, &list)?;
            writeln!(out)?;
        } else if items.is_empty() {
            writeln!(out, "job {id} has no artifacts")?;
        } else {
            writeln!(out, "{:>12}  {:<8}  NAME", "SIZE", "CRC32C")?;
            for a in &items {
                writeln!(
                    out,
                    "{:>12}  {:<8}  {}",
                    num(a, "size").map_or("?".into(), |s| s.to_string()),
                    text(a, "crc32c").unwrap_or_default(),
                    text(a, "name").unwrap_or_default()
                )?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut refused = 0;
    for a in &items {
        let name = text(a, "name").unwrap_or_default();
        match download(&client, id, a, &name, dir) {
            Ok(path) => println!(
                "saved {} ({} bytes)",
                path.display(),
                num(a, "size").unwrap_or(0)
            ),
            Err(Refusal::Bad(why)) => {
                refused += 1;
                eprintln!("reel: artifact {name:?} refused: {why}");
            }
            Err(Refusal::Failed(e)) => {
                return Err(e.context(format!("artifact {name:?}")));
            }
        }
    }
    if items.is_empty() {
        println!("job {id} has no artifacts");
    }
    Ok(ExitCode::from(if refused > 0 { EXIT_FAILED } else { 0 }))
}

fn download(
    client: &Client,
    id: JobId,
    listed: &Value,
    name: &str,
    dir: &Path,
) -> Result<PathBuf, Refusal> {
    let rel = safe_relative(name).map_err(Refusal::Bad)?;
    let size = num(listed, "size").ok_or_else(|| Refusal::Bad("the list gives no size".into()))?;
    let crc = text(listed, "crc32c")
        .and_then(|c| u32::from_str_radix(c.trim(), 16).ok())
        .ok_or_else(|| Refusal::Bad("the list gives no crc32c (8 hex digits)".into()))?;
    let target = dir.join(&rel);
    let parent = target.parent().unwrap_or(dir).to_path_buf();
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))
        .map_err(Refusal::Failed)?;
    let file_name = target
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let temp = parent.join(format!(".{file_name}.reel-partial-{}", std::process::id()));
    let segments: Vec<String> = rel
        .components()
        .map(|c| encode_segment(&c.as_os_str().to_string_lossy()))
        .collect();
    let path = format!("/v1/jobs/{id}/artifacts/{}", segments.join("/"));
    let answer = client
        .get_stream(&path, &[])
        .map_err(|e| Refusal::Failed(e.into()))?;
    let result = (|| -> Result<Result<(), String>> {
        let mut file = std::fs::File::create(&temp)
            .with_context(|| format!("cannot create {}", temp.display()))?;
        let mut body = answer.reader();
        let mut buf = vec![0u8; 64 * 1024];
        let (mut got, mut sum) = (0u64, 0u32);
        loop {
            let k = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e).into()),
            };
            got += k as u64;
            if got > size {
                return Ok(Err(format!(
                    "the daemon sent more than the {size} bytes it listed"
                )));
            }
            sum = crc32c::crc32c_append(sum, &buf[..k]);
            file.write_all(&buf[..k])
                .with_context(|| format!("cannot write {}", temp.display()))?;
        }
        if got != size || sum != crc {
            return Ok(Err(format!(
                "received {got} bytes with crc32c {sum:08x}; the daemon listed {size} bytes \
                 with crc32c {crc:08x}; not saved"
            )));
        }
        file.sync_all()
            .with_context(|| format!("cannot write {}", temp.display()))?;
        std::fs::rename(&temp, &target)
            .with_context(|| format!("cannot rename {} to {}", temp.display(), target.display()))?;
        Ok(Ok(()))
    })();
    match result {
        Ok(Ok(())) => Ok(target),
        Ok(Err(why)) => {
            let _ = std::fs::remove_file(&temp);
            Err(Refusal::Bad(why))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(Refusal::Failed(e))
        }
    }
}

// ---------------------------------------------------------------------------------
// The daemon's side of `jobs`, `replay`, `inspect`, `export`

/// Every job the daemon lists (all pages, newest first as it sends them),
/// as the rows `reel jobs` prints: oldest first, as the log lists them.
pub fn job_rows(client: &Client) -> Result<(Vec<Value>, Option<u64>)> {
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    let mut deleted_before: Option<u64>;
    loop {
        let mut query = vec![("limit", "1000".to_owned())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let page = client.get_json("/v1/jobs", &query)?;
        if let Some(jobs) = page.get("jobs").and_then(Value::as_array) {
            rows.extend(jobs.iter().map(job_row));
        }
        deleted_before = page.get("deleted_before_ms").and_then(Value::as_u64);
        cursor = match page.get("next_cursor") {
            Some(Value::String(c)) if !c.is_empty() => Some(c.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        if cursor.is_none() {
            break;
        }
    }
    rows.sort_by_key(|r| r["id"].as_u64().unwrap_or(0));
    rows.dedup_by_key(|r| r["id"].as_u64());
    Ok((rows, deleted_before))
}

/// A daemon's `JOB` as a row of `reel jobs`: the keys the offline listing
/// gives (but `events`, which the API does not say).
pub fn job_row(job: &Value) -> Value {
    let submitted = num(job, "submitted_ms");
    let finished = num(job, "finished_ms");
    json!({
        "id": num(job, "id"),
        "name": job.get("name"),
        "runner": job.get("runner"),
        "owner": job.get("owner"),
        "state": job.get("phase").or_else(|| job.get("state")),
        "outcome": job.get("outcome"),
        "submitted": submitted.map(format_ms),
        "finished": finished.map(format_ms),
        "duration_ms": finished.zip(submitted).map(|(f, s)| f.saturating_sub(s)),
        "steps": match job.get("steps") {
            Some(Value::Array(a)) => json!(a.len()),
            Some(v) => v.clone(),
            None => Value::Null,
        },
    })
}

/// A job's history from the daemon: `GET /v1/jobs/{id}/events?format=raw`,
/// each event as stored, decoded here as the log's reader decodes it.
pub fn history(client: &Client, job: JobId, dir: &Path) -> Result<History> {
    let answer = client
        .get(
            &format!("/v1/jobs/{job}/events"),
            &[("format", "raw".to_owned())],
        )
        .map_err(|e| match e {
            ApiError::Status { status: 404, .. } => {
                anyhow::anyhow!("no job {job} in the log at {}", dir.display())
            }
            e => e.into(),
        })?;
    if let Some(ct) = &answer.content_type
        && !ct.starts_with("application/octet-stream")
    {
        bail!(
            "the daemon at {} answered the raw events of job {job} with {ct}, not \
             application/octet-stream frames",
            client.url()
        );
    }
    let bytes = answer.bytes(MAX_BINARY_BYTES)?;
    decode_frames(job, &bytes).map_err(|e| anyhow::anyhow!("the daemon's events of job {job}: {e}"))
}

/// Frames `[u32 BE seq][u32 BE len][len bytes: the stored event envelope]`,
/// repeated; an envelope that does not decode is a corrupt event, reported as
/// the log reports one. A frame cut short is an error.
pub fn decode_frames(job: JobId, mut bytes: &[u8]) -> Result<History, String> {
    let mut records = Vec::new();
    let mut errors = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 8 {
            return Err(format!(
                "the stream ends inside a frame header ({} bytes left)",
                bytes.len()
            ));
        }
        let seq = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        let rest = &bytes[8..];
        if rest.len() < len {
            return Err(format!(
                "seq {seq}'s frame says {len} bytes, {} are left",
                rest.len()
            ));
        }
        match Event::decode(&rest[..len]) {
            Ok((at_ms, event)) => records.push(Record {
                job,
                seq,
                at_ms,
                event,
            }),
            Err(source) => errors.push(LogError::Corrupt { job, seq, source }),
        }
        bytes = &rest[len..];
    }
    Ok(History::from_records(records, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u32, envelope: &[u8]) -> Vec<u8> {
        let mut f = seq.to_be_bytes().to_vec();
        f.extend((envelope.len() as u32).to_be_bytes());
        f.extend(envelope);
        f
    }

    #[test]
    fn raw_frames_decode_into_records_and_corrupt_events() {
        let mut bytes = frame(1, &Event::Queued {}.encode(10));
        let mut bad = Event::Failed { reason: "x".into() }.encode(20);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        bytes.extend(frame(2, &bad));
        bytes.extend(frame(3, &Event::Succeeded {}.encode(30)));
        let h = decode_frames(7, &bytes).unwrap();
        assert_eq!(h.records.len(), 2);
        assert_eq!(h.records[0].seq, 1);
        assert_eq!(h.records[0].at_ms, 10);
        assert_eq!(h.records[1].event, Event::Succeeded {});
        assert_eq!(h.first_corrupt_seq(), Some(2));
        assert!(h.damaged());

        let cut = &bytes[..bytes.len() - 1];
        assert!(decode_frames(7, cut).unwrap_err().contains("seq 3"));
        assert!(
            decode_frames(7, &bytes[..3])
                .unwrap_err()
                .contains("header")
        );
        assert!(decode_frames(7, b"").unwrap().records.is_empty());
    }

    #[test]
    fn artifact_names_stay_inside_the_directory() {
        assert_eq!(
            safe_relative("dist/app.tar.gz").unwrap(),
            Path::new("dist/app.tar.gz")
        );
        assert_eq!(safe_relative("./a").unwrap(), Path::new("a"));
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("../x").is_err());
        assert!(safe_relative("a/../../x").is_err());
        assert!(safe_relative("").is_err());
        assert!(safe_relative(".").is_err());
    }

    #[test]
    fn several_files_get_numbered_keys() {
        assert_eq!(key_for("k", 0, 1), "k");
        assert_eq!(key_for("k", 0, 3), "k-1");
        assert_eq!(key_for("k", 2, 3), "k-3");
    }

    fn job() -> Value {
        json!({"id": 12, "name": "hello", "owner": "alice", "runner": "process",
            "state": "ended", "phase": "terminal", "outcome": "failed",
            "reason": "step 2 exited with code 1",
            "submitted_ms": 1_000, "queued_ms": 1_002, "started_ms": 1_100,
            "finished_ms": 3_200, "attempt": 2, "retry_of": 11, "retried_as": 13,
            "steps": [
                {"step": 1, "name": "build", "exit_code": 0, "signal": null, "timed_out": false,
                 "started_ms": 1_200, "finished_ms": 2_400, "output_bytes": 42},
                {"step": 2, "name": "test", "exit_code": 1, "signal": null, "timed_out": false,
                 "started_ms": 2_400, "finished_ms": 3_000, "output_bytes": 7},
            ],
            "spec": {"steps": [{"name": "build"}, {"name": "test"}, {"name": "deploy"}]}})
    }

    #[test]
    fn a_job_reads_as_its_status_and_exit_code() {
        let j = job();
        assert_eq!(step_count(&j), 3);
        assert_eq!(step_name(&j, 3), "deploy");
        assert!(step_finished(&j, 2) && !step_started(&j, 3));
        assert_eq!(job_code(&j), EXIT_FAILED);
        assert_eq!(
            how_it_stands(&j),
            "failed in 2.1s: step 2 exited with code 1"
        );
        let text = status_text(12, &j);
        for want in [
            "job 12 \"hello\"",
            "state:      ended (terminal)",
            "outcome:    failed",
            "reason:     step 2 exited with code 1",
            "owner:      alice",
            "attempt:    2, a retry of job 11, retried as job 13",
            "STEP",
        ] {
            assert!(text.contains(want), "{want:?} in\n{text}");
        }
        let row = text.lines().find(|l| l.contains("\"build\"")).unwrap();
        assert!(
            row.contains(" 0 ") && row.contains("1.2s") && row.ends_with("42"),
            "{row}"
        );
        let third = text.lines().find(|l| l.contains("\"deploy\"")).unwrap();
        assert!(third.contains(" - "), "{third}");

        let mut running = j.clone();
        running["state"] = json!("running");
        running["phase"] = json!("running");
        assert_eq!(job_code(&running), 0);
        assert_eq!(how_it_stands(&running), "running, 2 of 3 steps finished");
        let mut cancelled = j;
        cancelled["outcome"] = json!("cancelled");
        assert_eq!(job_code(&cancelled), crate::run::EXIT_CANCELLED);
    }

    #[test]
    fn a_daemon_job_becomes_a_jobs_row() {
        let row = job_row(&job());
        assert_eq!(row["id"], 12);
        assert_eq!(row["state"], "terminal");
        assert_eq!(row["duration_ms"], 2_200);
        assert_eq!(row["steps"], 2);
        assert!(row["submitted"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn an_endless_job_file_is_read_only_to_the_limit() {
        let e = read_job_file(Path::new("/dev/zero")).unwrap_err();
        assert!(
            matches!(e, JobFileError::TooLarge { size: None, .. }),
            "{e}"
        );
        let e = read_job_file(Path::new("/nonexistent/x.yml")).unwrap_err();
        assert!(e.to_string().contains("cannot read job file"), "{e}");
    }
}
