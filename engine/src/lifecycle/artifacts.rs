//! Collecting a job's artifacts: after the drain (phase `Drained`), before
//! poweroff, for every outcome, when the job's steps ran in a connected
//! sandbox.
//!
//! ```text
//! Drained                      the runner flushed the sandbox's output
//!   runner.collect(patterns,   the runner copies each matching file into
//!     dest, partial, cap,      <state>/artifacts/<job>/ through a partial copy
//!     already)                 (synced, renamed), in name order, within the cap
//!   ArtifactStored{name, ..}*  each copy checked and synced by the engine first
//! PoweredOff ...
//! ```
//!
//! A crash anywhere in this is recovered by running the collection again from
//! phase `Drained` with the names stored so far in `already`: every artifact
//! ends with exactly one `ArtifactStored`, and files whose event never landed
//! (and the partial copies) are removed. A runner that cannot collect (older
//! ABI, or no `collect` capability), a sandbox that is gone, and the cap are
//! each a `RunnerNotice`; the job goes on to its outcome either way.

use std::path::PathBuf;

use super::executor::{JobRun, to_sdk};
use super::observer::Report;
use crate::model::event::Event;
use crate::model::state::Phase;
use crate::plugin::{CollectRequest, ErrorKind};
use crate::store::LogError;
use crate::store::artifacts::{self, bytes_text};

/// `1 declared path`, `2 declared paths`.
pub(super) fn declared(n: usize) -> String {
    format!("{n} declared path{}", if n == 1 { "" } else { "s" })
}

impl JobRun<'_> {
    /// Puts a notice on the job's record and tells the observer.
    pub(super) async fn note(&mut self, message: String) -> Result<(), LogError> {
        self.notice(&message);
        self.append(Event::RunnerNotice { message }).await
    }

    /// Collects the artifacts the job declares and has not stored yet, if it is
    /// in phase `Drained` (see the module doc). Only a log failure is an error.
    pub(crate) async fn collect_artifacts(&mut self) -> Result<(), LogError> {
        let patterns = self.spec.artifacts.clone();
        if patterns.is_empty() || self.phase != Phase::Drained {
            return Ok(());
        }
        let (Ok(runner), Some(handle)) = (self.ex.runner(&self.spec.runner), self.handle.clone())
        else {
            return Ok(());
        };
        let (stored, recovering) = self
            .ex
            .log()
            .live_with(self.job, |s| {
                let names: Vec<String> = s.artifacts.iter().map(|a| a.name.clone()).collect();
                (names, s.recovered_by.is_some())
            })
            .unwrap_or_default();
        if !runner.can_collect() {
            let v = runner.abi_version();
            let why = if v.minor < 2 {
                format!(
                    "it was built against plugin ABI {}.{}, before `collect`",
                    v.major, v.minor
                )
            } else {
                "it does not declare `collect`".to_owned()
            };
            let m = format!(
                "runner `{}` cannot collect artifacts ({why}); {} not collected",
                runner.name(),
                declared(patterns.len())
            );
            return self.note(m).await;
        }
        let dir: PathBuf = self.ex.log().dir().to_path_buf();
        let (dest_dir, partial_dir) = match artifacts::prepare(&dir, self.job) {
            Ok(d) => d,
            Err(e) => {
                let m = format!(
                    "artifacts not collected: {}; {} not collected",
                    crate::store::error_line(&e),
                    declared(patterns.len())
                );
                return self.note(m).await;
            }
        };
        let cap = self.ex.artifact_cap();
        let request = CollectRequest {
            patterns,
            dest_dir,
            partial_dir,
            max_total_bytes: cap,
            already: stored.clone(),
        };
        let h = to_sdk(&handle);
        let collected = self
            .call_runner(&runner, move |r| r.collect(&h, &request))
            .await?;
        let mut stored = stored;
        match collected {
            Ok(c) => {
                for item in c.collected {
                    if stored.contains(&item.name) {
                        continue;
                    }
                    match artifacts::check_stored(&dir, self.job, &item.name, item.size) {
                        Ok(()) => {
                            self.append(Event::ArtifactStored {
                                name: item.name.clone(),
                                size: item.size,
                                crc32c: item.crc32c,
                            })
                            .await?;
                            self.observer.report(Report::ArtifactStored {
                                job: self.job,
                                name: &item.name,
                                size: item.size,
                            });
                            stored.push(item.name);
                        }
                        Err(why) => {
                            let m = format!("artifact {:?} not stored: {why}", item.name);
                            self.note(m).await?;
                        }
                    }
                }
                if let Some(at) = c.cap_reached_at {
                    let m = format!(
                        "artifact cap of {} reached at {at}: {} of {} artifacts collected",
                        bytes_text(cap),
                        stored.len(),
                        c.matched
                    );
                    self.note(m).await?;
                }
            }
            Err(e) if recovering && e.kind == ErrorKind::NotFound => {
                let m = format!(
                    "the sandbox is gone: the artifacts not stored before the engine died were \
                     lost with it ({} stored; {e})",
                    stored.len()
                );
                self.note(m).await?;
            }
            Err(e) => {
                let m = format!("collecting artifacts failed: {e} ({} stored)", stored.len());
                self.note(m).await?;
            }
        }
        if let Err(e) = artifacts::sweep(&dir, self.job, &stored) {
            let m = format!(
                "partial artifact copies were not removed: {}",
                crate::store::error_line(&e)
            );
            self.note(m).await?;
        }
        Ok(())
    }
}
