//! Printing what the executor reports: step headers, live output (line-prefixed
//! when several jobs run at once), step and job summaries, batch summaries.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use reel_engine::lifecycle::batch::Finished;
use reel_engine::lifecycle::observer::{Observer, Report};
use reel_engine::model::event::{JobId, Outcome};
use reel_engine::time::format_duration_ms;

/// Prints reports: step headers, live output (line-prefixed when several jobs
/// run at once), step and job summaries.
pub struct Printer {
    prefixed: bool,
    quiet: bool,
    inner: Mutex<PrinterState>,
}

#[derive(Default)]
struct PrinterState {
    jobs: HashMap<JobId, JobInfo>,
    /// Partial output lines per (job, step), held until their newline.
    partial: HashMap<(JobId, u32), Vec<u8>>,
}

struct JobInfo {
    name: String,
    file: PathBuf,
    steps: usize,
}

impl Printer {
    pub fn new(prefixed: bool, quiet: bool) -> Printer {
        Printer {
            prefixed,
            quiet,
            inner: Mutex::new(PrinterState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PrinterState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn register(&self, job: JobId, name: &str, file: &Path, steps: usize) {
        self.state().jobs.insert(
            job,
            JobInfo {
                name: name.to_string(),
                file: file.to_path_buf(),
                steps,
            },
        );
    }

    pub fn line(&self, s: &str) {
        let _guard = self.state();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    }

    fn tag(&self, st: &PrinterState, job: JobId) -> String {
        if !self.prefixed {
            return String::new();
        }
        let name = st.jobs.get(&job).map_or("?", |j| j.name.as_str());
        format!("{name}#{job} | ")
    }

    pub fn batch_summary(&self, results: &[Finished], took: Duration) {
        let count = |o: Outcome| results.iter().filter(|r| r.outcome == o).count();
        let mut parts = Vec::new();
        for o in [
            Outcome::Succeeded,
            Outcome::Failed,
            Outcome::TimedOut,
            Outcome::Cancelled,
            Outcome::Lost,
        ] {
            let n = count(o);
            if n > 0 {
                parts.push(format!("{n} {}", o.as_str().replace('_', " ")));
            }
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "\nbatch: {} jobs in {}: {}",
            results.len(),
            format_duration_ms(took.as_millis() as u64),
            parts.join(", ")
        );
        for r in results {
            let _ = writeln!(
                out,
                "  job {:<5} {:<24} {:<10} {:>8}  {}",
                r.job,
                r.name,
                r.outcome.as_str(),
                format_duration_ms(r.duration.as_millis() as u64),
                r.reason
            );
        }
    }
}

impl Observer for Printer {
    fn report(&self, report: Report<'_>) {
        let mut st = self.state();
        let mut out = std::io::stdout().lock();
        match report {
            Report::Started { .. } => {}
            Report::Dispatched { job } => {
                if let Some(j) = st.jobs.get(&job) {
                    let _ = writeln!(
                        out,
                        "==> job {job} {:?} ({}): {} step{}",
                        j.name,
                        j.file.display(),
                        j.steps,
                        if j.steps == 1 { "" } else { "s" }
                    );
                }
            }
            Report::StepStarted { job, index, name } => {
                let total = st.jobs.get(&job).map_or(0, |j| j.steps);
                let tag = self.tag(&st, job);
                let _ = writeln!(out, "{tag}--> step {}/{total} {name:?}", index + 1);
            }
            Report::Output {
                job, index, bytes, ..
            } => {
                if self.quiet {
                    return;
                }
                if !self.prefixed {
                    let _ = out.write_all(bytes);
                } else {
                    let tag = self.tag(&st, job);
                    let buf = st.partial.entry((job, index)).or_default();
                    buf.extend_from_slice(bytes);
                    while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=nl).collect();
                        let _ = out.write_all(tag.as_bytes());
                        let _ = out.write_all(&line);
                    }
                }
            }
            Report::StepFinished {
                job,
                index,
                name,
                exit_code,
                signal,
                timed_out,
                duration,
                bytes,
            } => {
                let tag = self.tag(&st, job);
                if let Some(rest) = st.partial.remove(&(job, index)).filter(|r| !r.is_empty()) {
                    let _ = out.write_all(tag.as_bytes());
                    let _ = out.write_all(&rest);
                    let _ = writeln!(out);
                }
                let total = st.jobs.get(&job).map_or(0, |j| j.steps);
                let how = if timed_out {
                    "timed out".to_string()
                } else if let Some(s) = signal {
                    format!("killed by signal {s}")
                } else {
                    format!("exit {}", exit_code.map_or("?".into(), |c| c.to_string()))
                };
                let _ = writeln!(
                    out,
                    "{tag}<-- step {}/{total} {name:?}: {how} in {}, {bytes} bytes of output",
                    index + 1,
                    format_duration_ms(duration.as_millis() as u64)
                );
            }
            Report::Notice { job, message } => {
                let tag = self.tag(&st, job);
                let _ = writeln!(out, "{tag}reel: note: {message}");
            }
            Report::ArtifactStored { job, name, size } => {
                let tag = self.tag(&st, job);
                let _ = writeln!(out, "{tag}reel: artifact {name} ({size} bytes) stored");
            }
            Report::Finished {
                job,
                outcome,
                reason,
                duration,
            } => {
                let name = st
                    .jobs
                    .get(&job)
                    .map_or("?", |j| j.name.as_str())
                    .to_string();
                let _ = writeln!(
                    out,
                    "==> job {job} {name:?}: {} in {}{}",
                    outcome.as_str().replace('_', " "),
                    format_duration_ms(duration.as_millis() as u64),
                    if reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {reason}")
                    }
                );
            }
        }
        let _ = out.flush();
    }
}
