//! The offline replay tool: `jobs`, `replay`, `inspect`, `export`, `verify`.
//!
//! Each command reads a *copy* of the log (`EventLog::open_snapshot`), so the
//! log of a dead engine is never changed by looking at it, and a log that a
//! running engine holds is refused with a plain sentence.
//!
//! Exit status: 0 when everything read was sound, 1 when some stored record is
//! corrupt (everything else is still shown), 2 when the command could not run.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};

use reel_engine::event::{Event, JobId, Record, Seq};
use reel_engine::log::{EventLog, LogError, Snapshot};
use reel_engine::state::{JobState, StepState};
use reel_engine::time::{format_duration_ms, format_ms};

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
pub struct OutputArgs {
    /// The job id (see `reel jobs`).
    pub job: JobId,
    /// Only this step (1-based, as `reel run` numbers them); default: every step.
    #[arg(long, value_name = "N")]
    pub step: Option<u32>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A snapshot of the log, cross-checked against its journal.
struct Opened {
    log: EventLog,
    _snapshot: Snapshot,
    /// Problems found on opening, with the job each concerns (if one).
    problems: Vec<(Option<JobId>, String)>,
    /// Intact journal copies of events whose stored copy is corrupt.
    good_copies: HashMap<(JobId, Seq), Vec<u8>>,
}

impl Opened {
    fn problems_of(&self, job: JobId) -> impl Iterator<Item = &String> {
        self.problems
            .iter()
            .filter(move |(j, _)| *j == Some(job))
            .map(|(_, p)| p)
    }

    /// Prints every problem not tied to a job.
    fn report_general(&self) {
        for (j, p) in &self.problems {
            if j.is_none() {
                eprintln!("reel: {p}");
            }
        }
    }
}

fn open(dir: &Path) -> Result<Opened> {
    let (log, snapshot) = EventLog::open_snapshot(dir).map_err(|e| match e {
        LogError::Missing(_) => anyhow::anyhow!(
            "no reel log in {} (give --state-dir or set REEL_STATE_DIR)",
            dir.display()
        ),
        other => anyhow::Error::new(other),
    })?;
    let mut problems: Vec<(Option<JobId>, String)> = log
        .repairs()
        .iter()
        .map(|r| (r.job, r.message.clone()))
        .collect();
    let (findings, good_copies) = log.check_journal().context("cannot check the journal")?;
    problems.extend(findings.iter().map(|f| (f.job(), f.to_string())));
    Ok(Opened {
        log,
        _snapshot: snapshot,
        problems,
        good_copies,
    })
}

fn code(corrupt: bool) -> ExitCode {
    if corrupt {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The events of a job that decode, the errors of those that do not, and
/// notes about damage that was repaired.
struct History {
    records: Vec<Record>,
    errors: Vec<LogError>,
    notes: Vec<String>,
}

impl History {
    /// Whether anything about this job was found damaged (repaired or not).
    fn damaged(&self) -> bool {
        !self.errors.is_empty() || !self.notes.is_empty()
    }

    fn report(&self) {
        for n in &self.notes {
            eprintln!("reel: {n}");
        }
        for e in &self.errors {
            eprintln!("reel: {}", error_line(e));
        }
    }
}

fn history(o: &Opened, job: JobId) -> Result<History> {
    let mut h = History {
        records: Vec::new(),
        errors: Vec::new(),
        notes: o.problems_of(job).cloned().collect(),
    };
    for item in o.log.events(job) {
        match item {
            Ok(r) => h.records.push(r),
            Err(LogError::Corrupt {
                job: j,
                seq,
                source,
            }) => {
                let e = LogError::Corrupt {
                    job: j,
                    seq,
                    source,
                };
                match o.good_copies.get(&(job, seq)).map(|b| Event::decode(b)) {
                    Some(Ok((at_ms, event))) => {
                        h.notes.push(format!(
                            "{}; the journal's intact copy is used",
                            error_line(&e)
                        ));
                        h.records.push(Record {
                            job,
                            seq,
                            at_ms,
                            event,
                        });
                    }
                    _ => h.errors.push(e),
                }
            }
            Err(e) => return Err(e).context(format!("cannot read job {job}")),
        }
    }
    if h.records.is_empty() && h.errors.is_empty() {
        anyhow::bail!("no job {job} in the log at {}", o.log.dir().display());
    }
    Ok(h)
}

/// Folds the readable records up to `at`. A corrupt record stops the fold (the
/// state after it would be a guess); the error says where.
fn fold(job: JobId, h: &History, at: Option<Seq>) -> (JobState, Option<String>) {
    let mut state = JobState::new(job);
    let first_bad = h.errors.iter().filter_map(corrupt_seq).min();
    for r in &h.records {
        if at.is_some_and(|at| r.seq > at) {
            break;
        }
        if first_bad.is_some_and(|bad| r.seq > bad) {
            return (
                state,
                Some(format!(
                    "fold stopped before corrupt seq {}",
                    first_bad.unwrap_or(0)
                )),
            );
        }
        if let Err(e) = state.apply_mut(r.at_ms, &r.event) {
            return (state, Some(e.to_string()));
        }
    }
    if let Some(bad) = first_bad.filter(|b| at.is_none_or(|at| *b <= at)) {
        return (
            state,
            Some(format!("fold stopped before corrupt seq {bad}")),
        );
    }
    (state, None)
}

fn corrupt_seq(e: &LogError) -> Option<Seq> {
    match e {
        LogError::Corrupt { seq, .. } => Some(*seq),
        _ => None,
    }
}

fn error_line(e: &LogError) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

pub fn jobs(dir: &Path, args: &JobsArgs) -> Result<ExitCode> {
    let o = open(dir)?;
    o.report_general();
    let log = &o.log;
    let mut corrupt = o.problems.iter().any(|(j, _)| j.is_none());
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
            let h = history(&o, summary.id)?;
            let (state, problem) = fold(summary.id, &h, None);
            if h.damaged() {
                corrupt = true;
                h.report();
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
    let mut out = std::io::stdout().lock();
    if args.json {
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
        for r in &rows {
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
    Ok(code(corrupt))
}

fn trunc(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// What one event says, for the timeline.
fn details(event: &Event, state: &JobState) -> String {
    match event {
        Event::Submitted { spec } => format!(
            "name={:?} runner={} steps={} owner={}{}",
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
            }
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
            format!("step {index} {name:?} exec={exec_id}")
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
            format!("step {index} {how}, {output_bytes} bytes of output{took}")
        }
        Event::CancelRequested { reason } => reason.clone(),
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
        _ => String::new(),
    }
}

fn state_json(state: &JobState) -> Value {
    let mut v = serde_json::to_value(state).unwrap_or(Value::Null);
    v["phase"] = json!(state.phase.as_str());
    v["terminal"] = json!(state.is_terminal());
    v["held_resources"] = json!(state.held_resources());
    v["recovery"] = json!(recovery_outlook(state));
    v
}

/// What recovery would do with a job in this state, in words.
fn recovery_outlook(state: &JobState) -> Vec<String> {
    use reel_engine::state::Phase as P;
    match state.phase {
        P::Terminal => vec!["nothing: the job has ended".into()],
        P::New | P::Submitted | P::Queued => {
            vec!["queue the job again in its original order".into()]
        }
        P::SlotGranted => vec!["release the slot and queue the job again".into()],
        _ => {
            let mut v = Vec::new();
            let held = state.held_resources();
            if held.iter().any(|h| h.starts_with("agent")) {
                v.push(
                    "probe the sandbox (pid and start time); reattach and resume if it is alive"
                        .into(),
                );
                v.push("otherwise power it off".into());
            }
            for h in held.iter().filter(|h| !h.starts_with("agent")) {
                v.push(format!("remove {h}"));
            }
            if v.is_empty() {
                v.push("append the terminal event".into());
            }
            v
        }
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
    for n in &state.notices {
        writeln!(out, "  notice:    {n}")?;
    }
    writeln!(
        out,
        "  recovery would: {}",
        recovery_outlook(state).join("; ")
    )?;
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
        s.index, s.output_bytes
    )
}

pub fn replay(dir: &Path, args: &ReplayArgs) -> Result<ExitCode> {
    let o = open(dir)?;
    o.report_general();
    let mut corrupt = o.problems.iter().any(|(j, _)| j.is_none());
    let h = history(&o, args.job)?;
    let (state, problem) = fold(args.job, &h, args.at);
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
    h.report();
    Ok(code(corrupt))
}

pub fn inspect(dir: &Path, args: &InspectArgs) -> Result<ExitCode> {
    let o = open(dir)?;
    o.report_general();
    let corrupt = o.problems.iter().any(|(j, _)| j.is_none());
    let h = history(&o, args.job)?;
    let (state, problem) = fold(args.job, &h, None);
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
    h.report();
    Ok(code(corrupt || h.damaged()))
}

pub fn export(dir: &Path, args: &ExportArgs) -> Result<ExitCode> {
    let o = open(dir)?;
    o.report_general();
    let corrupt = o.problems.iter().any(|(j, _)| j.is_none());
    let h = history(&o, args.job)?;
    let mut out = std::io::stdout().lock();
    for r in &h.records {
        serde_json::to_writer(&mut out, r)?;
        writeln!(out)?;
    }
    h.report();
    Ok(code(corrupt || h.damaged()))
}

pub fn output(dir: &Path, args: &OutputArgs) -> Result<ExitCode> {
    let o = open(dir)?;
    o.report_general();
    let h = history(&o, args.job)?;
    let (state, _) = fold(args.job, &h, None);
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
    let mut out = std::io::stdout().lock();
    let mut corrupt = h.damaged();
    for index in steps {
        for chunk in o.log.output(args.job, index, 0) {
            match chunk {
                Ok(c) => out.write_all(&c.bytes)?,
                Err(e) => {
                    corrupt = true;
                    eprintln!("reel: {}", error_line(&e));
                }
            }
        }
    }
    out.flush()?;
    h.report();
    Ok(code(corrupt))
}

pub fn verify(dir: &Path, args: &VerifyArgs) -> Result<ExitCode> {
    let o = open(dir)?;
    let log = &o.log;
    let mut problems: Vec<String> = o.problems.iter().map(|(_, p)| p.clone()).collect();
    let mut jobs = 0u64;
    let mut events = 0u64;
    let mut chunks = 0u64;
    for item in log.jobs() {
        let summary = match item {
            Ok(s) => s,
            Err(e) => {
                problems.push(error_line(&e));
                continue;
            }
        };
        jobs += 1;
        let h = history(&o, summary.id)?;
        events += h.records.len() as u64;
        problems.extend(h.errors.iter().map(error_line));
        problems.extend(
            h.notes
                .iter()
                .filter(|n| n.contains("journal's intact copy"))
                .cloned(),
        );
        let (state, problem) = fold(summary.id, &h, None);
        if let Some(p) = problem.filter(|_| h.errors.is_empty()) {
            problems.push(format!("job {}: {p}", summary.id));
        }
        for s in &state.steps {
            let mut stored = 0u64;
            for c in log.output(summary.id, s.index, 0) {
                match c {
                    Ok(c) => {
                        chunks += 1;
                        stored = stored.max(c.offset + c.bytes.len() as u64);
                    }
                    Err(e) => problems.push(error_line(&e)),
                }
            }
            if s.finished_ms.is_some() && stored != s.output_bytes {
                problems.push(format!(
                    "job {} step {}: {stored} bytes of output stored, the step produced {}",
                    summary.id, s.index, s.output_bytes
                ));
            }
        }
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(
            &mut out,
            &json!({"jobs": jobs, "events": events, "output_chunks": chunks, "problems": problems}),
        )?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "checked {jobs} jobs, {events} events, {chunks} output chunks"
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
