//! The offline replay tool: `jobs`, `replay`, `inspect`, `export`, `verify`,
//! `output`.
//!
//! Each command reads a *copy* of the log through a [`LogReader`] (which has no
//! way to append), so the log of a dead engine is never changed by looking at
//! it, and a log that a running engine holds is refused with a plain sentence
//! — unless the holder is a daemon that `<state>/serve/endpoint.json` names
//! and that answers: then `jobs`, `replay`, `inspect`, `export` and `output`
//! ask it (`remote.rs`), and print what it says with the same code as here
//! (one renderer per command, fed by the log or by the daemon).
//!
//! Exit status: 0 when everything read was sound, 1 when some stored record is
//! corrupt (everything else is still shown), 2 when the command could not run.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use clap::ValueEnum;
use serde_json::{Value, json};

use reel_engine::lifecycle::recover::outlook;
use reel_engine::model::event::{Event, JobId, Seq};
use reel_engine::model::spec::Network;
use reel_engine::model::state::{JobState, StepState};
use reel_engine::store::{Audit, History, LogError, LogReader, Stream, corrupt_seq, error_line};
use reel_engine::time::{format_duration_ms, format_ms};

use crate::client::{ApiError, Client, DaemonArgs, live_endpoint};
use crate::remote;
use crate::views::state_json;

#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Print JSON (an array of jobs) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Trust the stored summaries of ended jobs instead of folding their events
    /// (faster on a huge log, but does not notice corrupt events). Live jobs are
    /// always folded.
    #[arg(long)]
    pub no_verify: bool,
}

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The job id (see `reel jobs`).
    pub job: JobId,
    /// Print JSON instead of a timeline.
    #[arg(long)]
    pub json: bool,
    /// Fold only up to and including this seq: the job's state as it was then.
    #[arg(long, value_name = "SEQ")]
    pub at: Option<Seq>,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The job id (see `reel jobs`).
    pub job: JobId,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The job id (see `reel jobs`).
    pub job: JobId,
}

#[derive(Args, Debug)]
#[command(after_help = "\
Without --json the bytes are written exactly as stored (secrets masked as a run of `*`),
both streams interleaved as the step wrote them unless --stream picks one. With --json,
one JSON object per stored chunk: step, stream, offset, len, and text (or bytes_hex when
the bytes are not UTF-8).")]
pub struct OutputArgs {
    /// The job id (see `reel jobs`).
    pub job: JobId,
    /// Only this step (numbered from 1, as `reel run` numbers them); default: every step.
    #[arg(long, value_name = "N")]
    pub step: Option<u32>,
    /// Only this stream.
    #[arg(long, value_enum, value_name = "STREAM")]
    pub stream: Option<StreamArg>,
    /// Start at this byte offset of the step's combined output (stdout and
    /// stderr as they were interleaved); with --stream, bytes of that stream
    /// at or after it.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub offset: u64,
    /// Print JSON lines, one per stored chunk, instead of the raw bytes.
    #[arg(long)]
    pub json: bool,
}

/// `--stream`: which of a step's streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StreamArg {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl From<StreamArg> for Stream {
    fn from(s: StreamArg) -> Stream {
        match s {
            StreamArg::Stdout => Stream::Stdout,
            StreamArg::Stderr => Stream::Stderr,
        }
    }
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A copy of the log, cross-checked against its journal.
struct Opened {
    log: LogReader,
    audit: Audit,
}

impl Opened {
    /// Prints every problem not tied to a job.
    fn report_general(&self) {
        for p in self.audit.general() {
            eprintln!("reel: {p}");
        }
    }

    /// Whether a problem not tied to a job was found.
    fn damaged(&self) -> bool {
        self.audit.general().next().is_some()
    }

    /// A job's history, with a plain error for a job that is not there.
    fn history(&self, job: JobId) -> Result<History> {
        self.audit.history(&self.log, job).map_err(|e| match e {
            LogError::UnknownJob(j) => {
                anyhow::anyhow!("no job {j} in the log at {}", self.log.dir().display())
            }
            e => anyhow::Error::new(e).context(format!("cannot read job {job}")),
        })
    }
}

fn open(dir: &Path) -> Result<Opened> {
    let log = LogReader::open_copy(dir).map_err(|e| match e {
        LogError::Missing(_) => anyhow::anyhow!(
            "no reel log in {} (give --state-dir or set REEL_STATE_DIR)",
            dir.display()
        ),
        other => anyhow::Error::new(other),
    })?;
    let audit = log.audit().context("cannot check the journal")?;
    Ok(Opened { log, audit })
}

/// Where a read command gets its answer: a copy of the log, or the daemon
/// that holds it.
enum Source {
    Log(Opened),
    Daemon(Client),
}

/// The log's copy; or, when the log is held and `<state>/serve/endpoint.json`
/// names a live daemon that answers, that daemon (said on stderr). When no
/// daemon answers, the refusal of a held log stands.
fn open_or_ask(dir: &Path, daemon: &DaemonArgs) -> Result<Source> {
    match open(dir) {
        Ok(o) => Ok(Source::Log(o)),
        Err(held) => held_by_daemon(dir, daemon, held).map(Source::Daemon),
    }
}

/// When `held` is the refusal of a log a live daemon holds (named by
/// `<state>/serve/endpoint.json` and answering), a client of that daemon;
/// else `held` itself.
pub(crate) fn held_by_daemon(
    dir: &Path,
    daemon: &DaemonArgs,
    held: anyhow::Error,
) -> Result<Client> {
    if !matches!(
        held.downcast_ref::<LogError>(),
        Some(LogError::Locked { .. })
    ) {
        return Err(held);
    }
    let Some(endpoint) = live_endpoint(dir) else {
        return Err(held);
    };
    let client = Client::discover(
        dir,
        &DaemonArgs {
            server: Some(endpoint.url.clone()),
            token_file: daemon.token_file.clone(),
        },
    )?;
    // Any answer (even a 503 while it drains) is a daemon; silence is none.
    if let Err(ApiError::Refused { .. } | ApiError::Broken { .. }) = client.get("/healthz", &[]) {
        return Err(held);
    }
    eprintln!(
        "reel: the log is held by the daemon (pid {}); asking it at {}",
        endpoint.pid,
        client.url()
    );
    Ok(client)
}

fn code(corrupt: bool) -> ExitCode {
    if corrupt {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Prints what a history found damaged.
fn report(h: &History) {
    for n in &h.notes {
        eprintln!("reel: {n}");
    }
    for e in &h.errors {
        eprintln!("reel: {}", error_line(e));
    }
}

pub fn jobs(dir: &Path, args: &JobsArgs, daemon: &DaemonArgs) -> Result<ExitCode> {
    let o = match open_or_ask(dir, daemon)? {
        Source::Log(o) => o,
        Source::Daemon(client) => {
            let (rows, deleted_before) = remote::job_rows(&client)?;
            print_jobs(dir, &rows, deleted_before, args.json)?;
            return Ok(code(false));
        }
    };
    o.report_general();
    let log = &o.log;
    let mut corrupt = o.damaged();
    let mut rows = Vec::new();
    for item in log.jobs() {
        let summary = match item {
            Ok(s) => s,
            Err(e @ LogError::CorruptRecord { .. }) => {
                corrupt = true;
                eprintln!("reel: {}", error_line(&e));
                continue;
            }
            Err(e) => return Err(e).context("cannot list jobs"),
        };
        let mut row = json!({
            "id": summary.id,
            "name": summary.name,
            "runner": summary.runner,
            "owner": summary.owner,
            "state": summary.phase,
            "outcome": summary.outcome,
            "submitted": format_ms(summary.submitted_ms),
            "finished": summary.finished_ms.map(format_ms),
            "duration_ms": summary.finished_ms.map(|f| f.saturating_sub(summary.submitted_ms)),
            "events": summary.last_seq,
            "steps": summary.steps,
        });
        if !args.no_verify || summary.finished_ms.is_none() {
            let h = o.history(summary.id)?;
            let (state, problem) = h.fold(summary.id, None);
            if h.damaged() {
                corrupt = true;
                report(&h);
                let mut all: Vec<String> = h.notes.clone();
                all.extend(h.errors.iter().map(error_line));
                row["corrupt"] = json!(all);
            }
            if let Some(p) = problem {
                row["problem"] = json!(p);
            }
            row["state"] = json!(state.phase.as_str());
        }
        rows.push(row);
    }
    let deleted_before = log.retention()?.map(|r| r.horizon_ms);
    print_jobs(dir, &rows, deleted_before, args.json)?;
    Ok(code(corrupt))
}

/// `reel jobs`'s table (or JSON) of its rows, read from the log or the daemon;
/// `deleted_before`: jobs that ended before this time were deleted by gc (the
/// table says so below it; JSON, an array of rows, does not).
fn print_jobs(dir: &Path, rows: &[Value], deleted_before: Option<u64>, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &rows)?;
        writeln!(out)?;
    } else if rows.is_empty() {
        writeln!(out, "no jobs in {}", dir.display())?;
    } else {
        writeln!(
            out,
            "{:>6}  {:<24} {:<8} {:<18} {:<10} {:<24} {:>9}",
            "ID", "NAME", "RUNNER", "STATE", "OUTCOME", "SUBMITTED", "DURATION"
        )?;
        for r in rows {
            let flag = if r.get("corrupt").is_some() {
                "  CORRUPT"
            } else {
                ""
            };
            writeln!(
                out,
                "{:>6}  {:<24} {:<8} {:<18} {:<10} {:<24} {:>9}{flag}",
                r["id"].as_u64().unwrap_or(0),
                trunc(r["name"].as_str().unwrap_or(""), 24),
                r["runner"].as_str().unwrap_or(""),
                r["state"].as_str().unwrap_or(""),
                r["outcome"].as_str().unwrap_or("-"),
                r["submitted"].as_str().unwrap_or(""),
                r["duration_ms"]
                    .as_u64()
                    .map_or("-".into(), format_duration_ms),
            )?;
        }
    }
    if let (Some(ms), false) = (deleted_before, json) {
        writeln!(
            out,
            "history: jobs that ended before {} were deleted by reel gc",
            format_ms(ms)
        )?;
    }
    Ok(())
}

/// `s` cut to `n` characters, the last one `…` when cut.
pub(crate) fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// A submission's key, retry link and retry allowance, as timeline details.
fn origin_details(spec: &reel_engine::model::spec::JobSpec) -> String {
    let mut out = String::new();
    if let Some(k) = &spec.origin.idempotency_key {
        out.push_str(&format!(" key={k:?}"));
    }
    if let Some(of) = spec.origin.retry_of {
        out.push_str(&format!(
            " attempt={} retry_of={of}",
            spec.origin.retries + 1
        ));
    }
    if spec.retry.lost > 0 {
        out.push_str(&format!(" retry_lost={}", spec.retry.lost));
    }
    if !spec.artifacts.is_empty() {
        out.push_str(&format!(" artifacts={}", spec.artifacts.join(",")));
    }
    if let Some(ms) = spec.cancel_grace_ms {
        out.push_str(&format!(" cancel_grace={}", format_duration_ms(ms)));
    }
    if spec.network != Network::Default {
        out.push_str(&format!(" network={}", spec.network.name()));
    }
    out
}

/// What one event says, for the timeline.
fn details(event: &Event, state: &JobState) -> String {
    match event {
        Event::Submitted { spec } => format!(
            "name={:?} runner={} steps={} owner={}{}{}",
            spec.name,
            spec.runner,
            spec.steps.len(),
            if spec.owner.is_empty() {
                "-"
            } else {
                &spec.owner
            },
            if spec.secrets.is_empty() {
                String::new()
            } else {
                format!(" secrets={}", spec.secrets.join(","))
            },
            origin_details(spec)
        ),
        Event::SlotGranted { charged } if *charged != Default::default() => format!(
            "charged {} MiB memory, {} vCPUs, {} MiB disk",
            charged.memory_mib, charged.vcpus, charged.disk_mib
        ),
        Event::CidAllocated { cid } => format!("cid={cid}"),
        Event::SandboxPlanned { resources, handle } => {
            format!(
                "{} (handle v{}, {} bytes)",
                resources.join(", "),
                handle.version,
                handle.bytes.len()
            )
        }
        Event::WorkDirCreated { handle }
        | Event::VmBooted { handle }
        | Event::AgentConnected { handle }
        | Event::Reattached { handle } => {
            format!("handle v{}, {} bytes", handle.version, handle.bytes.len())
        }
        Event::VolumesFormatted { volumes } if volumes.is_empty() => "no volumes".into(),
        Event::VolumesFormatted { volumes } => volumes.join(", "),
        Event::StepStarted { index, exec_id } => {
            let name = state
                .spec
                .as_ref()
                .and_then(|s| s.steps.get(*index as usize))
                .map_or("?", |s| s.name.as_str());
            format!("step {} {name:?} exec={exec_id}", index + 1)
        }
        Event::StepFinished {
            index,
            exit_code,
            signal,
            timed_out,
            output_bytes,
        } => {
            let how = if *timed_out {
                "timed out".to_string()
            } else if let Some(s) = signal {
                format!("killed by signal {s}")
            } else {
                format!("exit {}", exit_code.map_or("?".into(), |c| c.to_string()))
            };
            let took = state
                .steps
                .iter()
                .find(|s| s.index == *index)
                .and_then(|s| s.finished_ms.map(|f| f.saturating_sub(s.started_ms)))
                .map(|ms| format!(", took {}", format_duration_ms(ms)))
                .unwrap_or_default();
            format!(
                "step {} {how}, {output_bytes} bytes of output{took}",
                index + 1
            )
        }
        Event::CancelRequested { reason } | Event::DeadlinePassed { reason } => reason.clone(),
        Event::TeardownStarted { outcome, reason } if reason.is_empty() => {
            format!("outcome={}", outcome.as_str())
        }
        Event::TeardownStarted { outcome, reason } => {
            format!("outcome={} ({reason})", outcome.as_str())
        }
        Event::Failed { reason }
        | Event::Cancelled { reason }
        | Event::TimedOut { reason }
        | Event::Lost { reason }
        | Event::Reaped { reason } => reason.clone(),
        Event::RecoveryStarted { engine_pid } => format!("engine pid {engine_pid}"),
        Event::RunnerNotice { message } => message.clone(),
        Event::ArtifactStored { name, size, crc32c } => {
            format!("{name} ({size} bytes, crc32c {crc32c:08x})")
        }
        _ => String::new(),
    }
}

fn print_state(out: &mut impl Write, state: &JobState, problem: &Option<String>) -> Result<()> {
    let total = state.step_count();
    writeln!(
        out,
        "state after seq {}: {}",
        state.seq,
        state.phase.as_str()
    )?;
    if let Some(o) = state.outcome {
        let reason = state.reason.as_deref().filter(|r| !r.is_empty());
        writeln!(
            out,
            "  outcome:   {}{}",
            o.as_str(),
            reason.map(|r| format!(" ({r})")).unwrap_or_default()
        )?;
    }
    if let Some(cid) = state.cid {
        writeln!(out, "  cid:       {cid}")?;
    }
    if let Some(h) = &state.handle {
        writeln!(out, "  handle:    v{}, {} bytes", h.version, h.bytes.len())?;
    }
    writeln!(
        out,
        "  steps:     {} of {total} finished",
        state.steps_finished()
    )?;
    for s in &state.steps {
        writeln!(out, "    {}", step_line(state, s))?;
    }
    let held = state.held_resources();
    if held.is_empty() {
        writeln!(out, "  holds:     nothing")?;
    } else {
        writeln!(out, "  holds:     {}", held.join("; "))?;
    }
    if let Some(r) = &state.cancel_requested {
        writeln!(out, "  cancel requested: {r}")?;
    }
    if let Some(pid) = state.recovered_by {
        writeln!(
            out,
            "  recovered by engine pid {pid}{}",
            if state.reattached { ", reattached" } else { "" }
        )?;
    }
    let declared = state.spec.as_ref().map_or(0, |s| s.artifacts.len());
    if declared > 0 || !state.artifacts.is_empty() {
        writeln!(
            out,
            "  artifacts: {} stored ({} declared path{})",
            state.artifacts.len(),
            declared,
            if declared == 1 { "" } else { "s" }
        )?;
        for a in &state.artifacts {
            writeln!(
                out,
                "    {} ({} bytes, crc32c {:08x})",
                a.name, a.size, a.crc32c
            )?;
        }
    }
    for n in &state.notices {
        writeln!(out, "  notice:    {n}")?;
    }
    writeln!(out, "  recovery would: {}", outlook(state).join("; "))?;
    if let Some(p) = problem {
        writeln!(out, "  WARNING:   {p}")?;
    }
    Ok(())
}

fn step_line(state: &JobState, s: &StepState) -> String {
    let name = state
        .spec
        .as_ref()
        .and_then(|sp| sp.steps.get(s.index as usize))
        .map_or("?", |st| st.name.as_str());
    let how = match s.finished_ms {
        None => "running".to_string(),
        Some(_) if s.timed_out => "timed out".into(),
        Some(_) => match (s.exit_code, s.signal) {
            (_, Some(sig)) => format!("signal {sig}"),
            (Some(c), None) => format!("exit {c}"),
            (None, None) => "ended".into(),
        },
    };
    let took = s
        .finished_ms
        .map(|f| format!(" in {}", format_duration_ms(f.saturating_sub(s.started_ms))))
        .unwrap_or_default();
    format!(
        "[{}] {name:?}: {how}{took}, {} bytes",
        s.index + 1,
        s.output_bytes
    )
}

/// A job's history from the log (with whether the log itself is damaged)
/// or from the daemon that holds it.
fn history_of(dir: &Path, job: JobId, daemon: &DaemonArgs) -> Result<(History, bool)> {
    match open_or_ask(dir, daemon)? {
        Source::Log(o) => {
            o.report_general();
            Ok((o.history(job)?, o.damaged()))
        }
        Source::Daemon(client) => Ok((remote::history(&client, job, dir)?, false)),
    }
}

pub fn replay(dir: &Path, args: &ReplayArgs, daemon: &DaemonArgs) -> Result<ExitCode> {
    let (h, damaged) = history_of(dir, args.job, daemon)?;
    render_replay(args, &h, damaged)
}

/// The timeline and state of `replay`, from a history however it was read.
fn render_replay(args: &ReplayArgs, h: &History, damaged: bool) -> Result<ExitCode> {
    let mut corrupt = damaged;
    let (state, problem) = h.fold(args.job, args.at);
    corrupt |= h.damaged();
    if let Some(at) = args.at {
        let last = h.records.last().map_or(0, |r| r.seq);
        if at == 0 || at > last {
            anyhow::bail!(
                "job {} has events 1 to {last}; --at {at} is outside them",
                args.job
            );
        }
    }
    // Fold again step by step so each line can show what it changed (durations).
    let mut running = JobState::new(args.job);
    let mut lines = Vec::new();
    let mut prev_ms: Option<u64> = None;
    for r in &h.records {
        if args.at.is_some_and(|at| r.seq > at) {
            break;
        }
        let _ = running.apply_mut(r.at_ms, &r.event);
        let delta = prev_ms.map(|p| r.at_ms.saturating_sub(p));
        prev_ms = Some(r.at_ms);
        lines.push((r, delta, details(&r.event, &running)));
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let events: Vec<Value> = lines
            .iter()
            .map(|(r, delta, d)| {
                let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
                v["at"] = json!(format_ms(r.at_ms));
                v["delta_ms"] = json!(delta);
                v["details"] = json!(d);
                v
            })
            .collect();
        let doc = json!({
            "job": args.job,
            "at": args.at,
            "events": events,
            "state": state_json(&state),
            "corrupt": h.errors.iter().map(|e| json!({"seq": corrupt_seq(e), "error": error_line(e)})).collect::<Vec<_>>(),
            "repaired": h.notes,
            "problem": problem,
        });
        serde_json::to_writer_pretty(&mut out, &doc)?;
        writeln!(out)?;
    } else {
        let name = state.spec.as_ref().map_or("", |s| s.name.as_str());
        writeln!(out, "job {} {name:?}", args.job)?;
        writeln!(
            out,
            "{:>5}  {:<24} {:>9}  {:<17} DETAILS",
            "SEQ", "TIME", "+DELTA", "EVENT"
        )?;
        for (r, delta, d) in &lines {
            writeln!(
                out,
                "{:>5}  {:<24} {:>9}  {:<17} {d}",
                r.seq,
                format_ms(r.at_ms),
                delta.map_or(String::new(), |d| format!("+{}", format_duration_ms(d))),
                r.event.name(),
            )?;
        }
        for e in &h.errors {
            writeln!(
                out,
                "{:>5}  CORRUPT: {}",
                corrupt_seq(e).unwrap_or(0),
                error_line(e)
            )?;
        }
        for n in &h.notes {
            writeln!(out, "       REPAIRED: {n}")?;
        }
        writeln!(out)?;
        print_state(&mut out, &state, &problem)?;
    }
    report(h);
    Ok(code(corrupt))
}

pub fn inspect(dir: &Path, args: &InspectArgs, daemon: &DaemonArgs) -> Result<ExitCode> {
    let (h, damaged) = history_of(dir, args.job, daemon)?;
    render_inspect(args, &h, damaged)
}

/// `inspect`'s state, from a history however it was read.
fn render_inspect(args: &InspectArgs, h: &History, corrupt: bool) -> Result<ExitCode> {
    let (state, problem) = h.fold(args.job, None);
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut v = state_json(&state);
        v["corrupt"] = json!(h.errors.iter().map(error_line).collect::<Vec<_>>());
        v["repaired"] = json!(h.notes);
        v["problem"] = json!(problem);
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        let name = state.spec.as_ref().map_or("", |s| s.name.as_str());
        writeln!(out, "job {} {name:?}", args.job)?;
        print_state(&mut out, &state, &problem)?;
    }
    report(h);
    Ok(code(corrupt || h.damaged()))
}

pub fn export(dir: &Path, args: &ExportArgs, daemon: &DaemonArgs) -> Result<ExitCode> {
    let (h, damaged) = history_of(dir, args.job, daemon)?;
    render_export(&h, damaged)
}

/// `export`'s JSON lines, from a history however it was read.
fn render_export(h: &History, corrupt: bool) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    for r in &h.records {
        serde_json::to_writer(&mut out, r)?;
        writeln!(out)?;
    }
    report(h);
    Ok(code(corrupt || h.damaged()))
}

pub fn output(dir: &Path, args: &OutputArgs, daemon: &DaemonArgs) -> Result<ExitCode> {
    let o = match open_or_ask(dir, daemon)? {
        Source::Log(o) => o,
        Source::Daemon(client) => return remote::output(&client, args),
    };
    o.report_general();
    let h = o.history(args.job)?;
    let (state, _) = h.fold(args.job, None);
    let steps: Vec<u32> = match args.step {
        Some(0) => bail!("steps are numbered from 1"),
        Some(n) if n as usize > state.step_count() => {
            bail!(
                "job {} has {} steps; there is no step {n}",
                args.job,
                state.step_count()
            )
        }
        Some(n) => vec![n - 1],
        None => state.steps.iter().map(|s| s.index).collect(),
    };
    let only: Option<Stream> = args.stream.map(Stream::from);
    let mut out = std::io::stdout().lock();
    let mut corrupt = h.damaged();
    for index in steps {
        for chunk in o.log.output(args.job, index, args.offset) {
            let mut c = match chunk {
                Ok(c) => c,
                Err(e) => {
                    corrupt = true;
                    eprintln!("reel: {}", error_line(&e));
                    continue;
                }
            };
            if only.is_some_and(|s| s != c.stream) {
                continue;
            }
            // The chunk that straddles --offset starts at it.
            let skip = usize::try_from(args.offset.saturating_sub(c.offset)).unwrap_or(usize::MAX);
            if skip > 0 {
                c.bytes.drain(..skip.min(c.bytes.len()));
                c.offset = args.offset;
            }
            if args.json {
                serde_json::to_writer(&mut out, &c.view(index))?;
                writeln!(out)?;
            } else {
                out.write_all(&c.bytes)?;
            }
        }
    }
    out.flush()?;
    report(&h);
    Ok(code(corrupt))
}

pub fn verify(dir: &Path, args: &VerifyArgs) -> Result<ExitCode> {
    let o = open(dir)?;
    let v = reel_engine::store::verify(&o.log, &o.audit)?;
    let (jobs, events, chunks, artifacts, problems) =
        (v.jobs, v.events, v.output_chunks, v.artifacts, v.problems);
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(
            &mut out,
            &json!({
                "jobs": jobs,
                "events": events,
                "output_chunks": chunks,
                "artifacts": artifacts,
                "problems": problems,
            }),
        )?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "checked {jobs} jobs, {events} events, {chunks} output chunks, {artifacts} artifacts"
        )?;
        for p in &problems {
            writeln!(out, "CORRUPT: {p}")?;
        }
        if problems.is_empty() {
            writeln!(out, "no problems found")?;
        }
    }
    Ok(code(!problems.is_empty()))
}
