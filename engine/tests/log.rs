//! The event log against a real sled directory: ordering, refusals, the live
//! set, output streams, reopening, and durability across a real SIGKILL.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use reel_engine::model::codec::MAX_ENVELOPE;
use reel_engine::model::event::{Event, Outcome};
use reel_engine::model::spec::{SpecError, StepSpec};
use reel_engine::model::state::Phase;
use reel_engine::store::{EventLog, LogError, LogOptions, LogReader, Stream};
use reel_engine::testkit::simulate::{Ending, run_job, spec};

fn open(dir: &std::path::Path) -> EventLog {
    EventLog::open(dir, LogOptions::default()).unwrap()
}

#[test]
fn events_come_back_in_order_and_fold_to_the_live_state() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let job = smol::block_on(run_job(&log, spec("a", 3), 1, Ending::StopAfter(2))).unwrap();
    let records: Vec<_> = log.events(job).map(Result::unwrap).collect();
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=records.len() as u32).collect::<Vec<_>>()
    );
    assert!(matches!(records[0].event, Event::Submitted { .. }));
    assert!(matches!(
        records.last().unwrap().event,
        Event::StepFinished { index: 1, .. }
    ));
    let folded = log.fold(job).unwrap();
    assert_eq!(Some(folded.clone()), log.live_state(job));
    assert_eq!(folded.phase, Phase::Connected);
    assert_eq!(folded.steps_finished(), 2);
}

#[test]
fn an_illegal_event_is_refused_and_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let job = log.submit_blocking(spec("a", 1)).unwrap();
    let err = log
        .append_blocking(
            job,
            Event::SlotGranted {
                charged: Default::default(),
            },
        )
        .unwrap_err();
    assert!(matches!(err, LogError::Illegal(_)), "{err}");
    assert!(
        err.to_string()
            .contains("SlotGranted is not allowed in phase submitted"),
        "{err}"
    );
    assert_eq!(log.events(job).count(), 1);
    assert_eq!(log.append_blocking(job, Event::Queued {}).unwrap(), 2);
}

/// A job whose `Submitted` event would not fit the envelope's decode limit used to
/// be written anyway and read back as corrupt for ever. Now it is refused before
/// the writer sees it: no event, no journal frame, no job id used up.
#[test]
fn a_job_over_the_size_limit_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let mut big = spec("big", 1);
    // 140 steps of 120 KiB each: every step is within its own limits, the whole
    // spec (16.8 MB) is over the 8 MiB a stored spec may take.
    big.steps = (0..140)
        .map(|i| StepSpec {
            name: format!("s{i}"),
            command: "x".repeat(120 * 1024),
            ..StepSpec::default()
        })
        .collect();
    let size = big.stored_size();
    assert!(size > MAX_ENVELOPE, "{size}");
    let err = log.submit_blocking(big).unwrap_err();
    let LogError::Spec(SpecError::TooLarge { size: said }) = err else {
        panic!("{err}");
    };
    assert_eq!(said, size);
    assert!(
        err.to_string().contains(&format!("takes {size} bytes")),
        "{err}"
    );
    assert!(err.to_string().contains("8 MiB"), "{err}");
    assert_eq!(log.jobs().count(), 0);
    // The next job gets the first id, and the journal holds only its event.
    assert_eq!(log.submit_blocking(spec("small", 1)).unwrap(), 1);
    log.close();
    drop(log);
    let journal = std::fs::read(dir.path().join("journal")).unwrap();
    let events: Vec<_> = reel_engine::store::journal::parse(&journal, 0)
        .into_iter()
        .filter_map(|i| match i {
            reel_engine::store::journal::Item::Frame {
                job, seq, envelope, ..
            } if job != 0 => Some((job, seq, envelope.len())),
            _ => None,
        })
        .collect();
    assert!(
        events.len() == 1 && events[0].0 == 1 && events[0].2 < 4096,
        "{events:?}"
    );
    let reader = LogReader::open_copy(dir.path()).unwrap();
    assert_eq!(reader.jobs().count(), 1);
    assert!(reader.events(1).all(|r| r.is_ok()));
}

#[test]
fn unknown_and_ended_jobs_refuse_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    assert!(matches!(
        log.append_blocking(99, Event::Queued {}),
        Err(LogError::UnknownJob(99))
    ));
    let job = smol::block_on(run_job(&log, spec("a", 1), 1, Ending::Success)).unwrap();
    let err = log
        .append_blocking(
            job,
            Event::RunnerNotice {
                message: "x".into(),
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("already ended"), "{err}");
}

#[test]
fn the_live_set_holds_exactly_the_unfinished_jobs_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (done, live_a, live_b);
    {
        let log = open(dir.path());
        done = smol::block_on(run_job(&log, spec("done", 2), 1, Ending::Success)).unwrap();
        live_a = smol::block_on(run_job(&log, spec("a", 2), 2, Ending::StopAfter(1))).unwrap();
        live_b = log.submit_blocking(spec("b", 1)).unwrap();
        assert_eq!(log.live_jobs().unwrap(), vec![live_a, live_b]);
        log.close();
    }
    let log = open(dir.path());
    assert_eq!(log.live_jobs().unwrap(), vec![live_a, live_b]);
    assert!(log.live_state(done).is_none());
    assert_eq!(log.live_state(live_a).unwrap().phase, Phase::Connected);
    assert_eq!(log.summary(done).unwrap().outcome, Some(Outcome::Succeeded));
    // Ids keep counting after a reopen.
    assert_eq!(log.submit_blocking(spec("c", 1)).unwrap(), live_b + 1);
    let all: Vec<_> = log.jobs().map(|s| s.unwrap().id).collect();
    assert_eq!(all, vec![done, live_a, live_b, live_b + 1]);
}

#[test]
fn output_is_stored_without_gap_or_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let job = smol::block_on(run_job(&log, spec("a", 2), 1, Ending::StopAfter(0))).unwrap();
    log.append_blocking(
        job,
        Event::StepStarted {
            index: 0,
            exec_id: 1,
        },
    )
    .unwrap();
    let put = |offset, bytes: &[u8]| {
        smol::block_on(log.append_output(job, 0, offset, Stream::Stdout, bytes.to_vec()))
    };
    assert_eq!(put(0, b"hello ").unwrap(), 6);
    assert_eq!(put(6, b"wor").unwrap(), 9);
    // A resumed stream re-sends bytes already stored: only the new tail is kept.
    assert_eq!(put(3, b"lo world\xff\n").unwrap(), 13);
    assert_eq!(put(0, b"hel").unwrap(), 13);
    let gap = put(20, b"x").unwrap_err();
    assert!(
        matches!(
            gap,
            LogError::OutputGap {
                end: 13,
                offset: 20,
                ..
            }
        ),
        "{gap}"
    );
    log.close();
    drop(log);
    let log = open(dir.path());
    let bytes: Vec<u8> = log
        .output(job, 0, 0)
        .flat_map(|c| c.unwrap().bytes)
        .collect();
    assert_eq!(bytes, b"hello world\xff\n");
    assert_eq!(log.output_end(job, 0).unwrap(), 13);
    let from_7: Vec<u64> = log.output(job, 0, 7).map(|c| c.unwrap().offset).collect();
    assert_eq!(from_7, vec![6, 9], "chunks overlapping offset 7 onwards");
}

#[test]
fn many_concurrent_submitters_all_land_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let jobs: Vec<u64> = smol::block_on(async {
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let log = log.clone();
                smol::spawn(async move {
                    run_job(&log, spec(&format!("j{i}"), 3), i, Ending::Success).await
                })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap());
        }
        ids
    });
    for job in jobs {
        let s = log.fold(job).unwrap();
        assert_eq!(s.phase, Phase::Terminal);
        assert_eq!(s.outcome, Some(Outcome::Succeeded));
    }
    assert!(log.live_jobs().unwrap().is_empty());
}

/// Child side of the SIGKILL test: appends as fast as it can and prints every
/// acknowledged (job, seq) to stdout; runs only when the parent sets the env var.
#[test]
fn child_appender() {
    let Some(dir) = std::env::var_os("REEL_TEST_APPENDER_DIR") else {
        return;
    };
    let log = open(std::path::Path::new(&dir));
    smol::block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                smol::spawn(async move {
                    for i in 0.. {
                        let job = log.submit(spec(&format!("t{t}-{i}"), 50)).await.unwrap();
                        println!("ack {job} 1");
                        let mut seq = 1;
                        for e in [
                            Event::Queued {},
                            Event::SlotGranted {
                                charged: Default::default(),
                            },
                        ] {
                            seq = log.append(job, e).await.unwrap();
                            println!("ack {job} {seq}");
                        }
                        for n in 0..20 {
                            seq = log
                                .append(
                                    job,
                                    Event::RunnerNotice {
                                        message: format!("n{n}"),
                                    },
                                )
                                .await
                                .unwrap();
                            println!("ack {job} {seq}");
                        }
                        let _ = seq;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
    });
}

/// This test binary running `child_appender` over `dir`, its stdout piped.
fn appender(dir: &std::path::Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "child_appender",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("REEL_TEST_APPENDER_DIR", dir)
    .stdout(Stdio::piped());
    c
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = appender(dir.path()).stderr(Stdio::null()).spawn().unwrap();
    let mut acks = Vec::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    while acks.len() < 3000 {
        let line = lines.next().expect("child ended early").unwrap();
        if let Some(rest) = line.strip_prefix("ack ") {
            let mut it = rest.split(' ').map(|n| n.parse::<u64>().unwrap());
            acks.push((it.next().unwrap(), it.next().unwrap() as u32));
        }
    }
    // While the child holds the log, opening it is refused with a plain message.
    let err = EventLog::open(dir.path(), LogOptions::default()).unwrap_err();
    assert!(matches!(err, LogError::Locked { .. }), "{err}");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let log = open(dir.path());
    for (job, seq) in &acks {
        let records: Vec<_> = log.events(*job).map(Result::unwrap).collect();
        assert!(
            records.iter().any(|r| r.seq == *seq),
            "acknowledged job {job} seq {seq} is missing after SIGKILL"
        );
        log.fold(*job).unwrap();
    }
    // Every job the child touched is still live (none was finished) and folds.
    for job in log.live_jobs().unwrap() {
        assert!(log.live_state(job).is_some());
    }
}

#[test]
fn a_round_sled_had_not_stored_is_applied_from_the_journal_without_a_repair() {
    let dir = tempfile::tempdir().unwrap();
    let job;
    {
        let log = open(dir.path());
        job = smol::block_on(run_job(&log, spec("a", 2), 1, Ending::StopAfter(1))).unwrap();
        log.close();
    }
    // As if the engine died after a round's journal frame was synced (and
    // perhaps acknowledged) and before sled stored it: the frame is there,
    // sled has nothing. That is the normal state after a crash (sled
    // flushes behind the journal), not damage.
    let seq = {
        let log = open(dir.path());
        let s = log.live_state(job).unwrap().seq;
        log.close();
        s + 1
    };
    let envelope = Event::RunnerNotice {
        message: "late".into(),
    }
    .encode(1);
    // The journal is written ahead with zeros; the frame goes where its
    // frames end.
    let path = dir.path().join("journal");
    let end = reel_engine::store::journal::parse(&std::fs::read(&path).unwrap(), 0)
        .into_iter()
        .filter_map(|i| match i {
            reel_engine::store::journal::Item::Frame {
                offset, envelope, ..
            } => Some(offset + reel_engine::store::journal::frame_len(&envelope)),
            _ => None,
        })
        .max()
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &f,
        &reel_engine::store::journal::frame(job, seq, &envelope),
        end,
    )
    .unwrap();
    drop(f);
    let log = open(dir.path());
    let repairs: Vec<String> = log.repairs().iter().map(|r| r.message.clone()).collect();
    assert!(repairs.is_empty(), "{repairs:?}");
    let last = log.events(job).last().unwrap().unwrap();
    assert_eq!(
        (last.seq, last.event),
        (
            seq,
            Event::RunnerNotice {
                message: "late".into()
            }
        )
    );
    assert_eq!(log.live_state(job).unwrap().seq, seq);
}

#[test]
fn acknowledged_events_sled_lost_are_restored_and_called_a_torn_store() {
    let dir = tempfile::tempdir().unwrap();
    let job;
    {
        let log = open(dir.path());
        job = smol::block_on(run_job(&log, spec("a", 2), 1, Ending::Success)).unwrap();
        log.close();
    }
    // Take two acknowledged events away from sled behind the log's back, and the
    // checkpoint with them, as a torn store would.
    {
        let db = open_sled_after_close(dir.path());
        let events = db.open_tree("events").unwrap();
        events
            .remove(reel_engine::store::event_key(job, 5))
            .unwrap();
        events
            .remove(reel_engine::store::event_key(job, 6))
            .unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("journal_end", &0u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let log = open(dir.path());
    let repairs: Vec<String> = log.repairs().iter().map(|r| r.message.clone()).collect();
    assert!(
        repairs
            .iter()
            .any(|r| r.contains(&format!("torn at job {job} seq 5"))),
        "{repairs:?}"
    );
    assert!(
        repairs.iter().any(|r| r.contains("seq 5..6: restored")),
        "{repairs:?}"
    );
    let state = log.fold(job).unwrap();
    assert_eq!(state.outcome, Some(Outcome::Succeeded));
}

#[test]
fn a_flipped_byte_in_an_output_file_is_reported_and_the_chunks_before_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    let job;
    {
        let log = open(dir.path());
        job = smol::block_on(run_job(&log, spec("a", 1), 1, Ending::StopAfter(0))).unwrap();
        log.append_blocking(
            job,
            Event::StepStarted {
                index: 0,
                exec_id: 1,
            },
        )
        .unwrap();
        for (i, part) in [&b"first "[..], b"second ", b"third"].iter().enumerate() {
            let at = [0u64, 6, 13][i];
            smol::block_on(log.append_output(job, 0, at, Stream::Stdout, part.to_vec())).unwrap();
        }
        log.close();
    }
    let file = dir
        .path()
        .join("output")
        .join(job.to_string())
        .join("0.out");
    let mut bytes = std::fs::read(&file).unwrap();
    let pos = bytes.windows(6).position(|w| w == b"second").unwrap();
    bytes[pos + 2] ^= 0x20;
    std::fs::write(&file, bytes).unwrap();
    let log = reel_engine::store::LogReader::open_copy(dir.path()).unwrap();
    let items: Vec<_> = log.output(job, 0, 0).collect();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].as_ref().unwrap().bytes, b"first ");
    let err = items[1].as_ref().unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("job {job} step 1: stored output is corrupt")),
        "{err}"
    );
}

/// Two live jobs; returns the state dir.
fn two_live_jobs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), LogOptions::default()).unwrap();
    smol::block_on(async {
        run_job(&log, spec("one", 3), 1, Ending::StopAfter(1))
            .await
            .unwrap();
        run_job(&log, spec("two", 3), 2, Ending::StopAfter(1))
            .await
            .unwrap();
    });
    log.close();
    dir
}

/// Opens the sled store of a log closed just before, in this process: sled's
/// IO threads may still hold its file (and its lock) for a moment after the
/// last handle drops, so a held lock is waited for (up to 10 s).
fn open_sled_after_close(dir: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(dir.join("log")) {
            Ok(db) => return db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot open the sled store: {e}"),
        }
    }
}

/// Writes `value` under job `job`'s event `seq` straight into the sled store,
/// as damage that sled's own checksums do not see (or an event an older build
/// wrote over today's decode limit).
fn put_raw_event(dir: &std::path::Path, job: u64, seq: u32, value: &[u8]) {
    let db = open_sled_after_close(dir);
    let events = db.open_tree("events").unwrap();
    events
        .insert(reel_engine::store::event_key(job, seq), value)
        .unwrap();
    db.flush().unwrap();
}

/// A corrupt stored event in a live job does not keep the store from opening:
/// the journal's intact copy replaces it, and the job goes on.
#[test]
fn a_corrupt_event_of_a_live_job_is_replaced_by_the_journals_copy() {
    let dir = two_live_jobs();
    put_raw_event(dir.path(), 1, 3, b"not an envelope");
    let log = EventLog::open(dir.path(), LogOptions::default()).unwrap();
    assert!(
        log.repairs()
            .iter()
            .any(|r| r.job == Some(1) && r.message.contains("replaced by the journal's intact")),
        "{:?}",
        log.repairs()
    );
    assert!(log.live_state(1).is_some() && log.live_state(2).is_some());
    assert!(log.set_aside().is_empty());
    log.close();
}

/// A live job whose history cannot be read at all (no intact copy anywhere) is
/// set aside: the store opens, every other job can be appended to, nothing is
/// appended to it, and its sandbox id stays known.
#[test]
fn an_unreadable_live_job_is_set_aside_and_every_other_job_goes_on() {
    let dir = two_live_jobs();
    // An event past the job's last one that the journal never had.
    let last = {
        let log = EventLog::open(dir.path(), LogOptions::default()).unwrap();
        let seq = log.live_state(1).unwrap().seq;
        log.close();
        seq
    };
    put_raw_event(dir.path(), 1, last + 1, b"not an envelope");
    let log = EventLog::open(dir.path(), LogOptions::default()).unwrap();
    assert!(log.live_state(1).is_none());
    assert_eq!(log.set_aside().get(&1).and_then(|s| s.cid), Some(1));
    assert!(
        log.repairs()
            .iter()
            .any(|r| r.job == Some(1) && r.message.contains("set aside")),
        "{:?}",
        log.repairs()
    );
    let refused = log.append_blocking(
        1,
        Event::RunnerNotice {
            message: "x".into(),
        },
    );
    assert!(matches!(refused, Err(LogError::SetAside(1))), "{refused:?}");
    log.append_blocking(
        2,
        Event::RunnerNotice {
            message: "still going".into(),
        },
    )
    .unwrap();
    log.close();
}

/// Every point of the writer's commit of a round (journal written, synced,
/// answered, each of sled's trees, applied): a real SIGKILL there, then every
/// acknowledged event is in the reopened log, which verifies clean, reports
/// no repair, and takes appends again.
#[test]
fn a_sigkill_at_every_point_of_a_commit_loses_no_acknowledged_event() {
    use reel_engine::testkit::crashpoint::{Stage, WRITER_ENV};
    for stage in Stage::ALL {
        let dir = tempfile::tempdir().unwrap();
        let mut child = appender(dir.path())
            .env(WRITER_ENV, format!("{}:300", stage.name()))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut acks = Vec::new();
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("ack ") {
                let mut it = rest.split(' ').map(|n| n.parse::<u64>().unwrap());
                acks.push((it.next().unwrap(), it.next().unwrap() as u32));
            }
        }
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(
            stderr.contains(&format!("killing the process at {}", stage.name())),
            "{stage:?}: the child was not killed there ({status}): {stderr}"
        );
        assert!(!acks.is_empty(), "{stage:?}: nothing was acknowledged");
        std::thread::sleep(Duration::from_millis(50));
        let log = open(dir.path());
        assert!(log.repairs().is_empty(), "{stage:?}: {:?}", log.repairs());
        for (job, seq) in &acks {
            assert!(
                log.events(*job).map(Result::unwrap).any(|r| r.seq == *seq),
                "{stage:?}: acknowledged job {job} seq {seq} is missing"
            );
        }
        // Live jobs take appends where they stopped.
        let live = log.live_jobs().unwrap();
        assert!(!live.is_empty(), "{stage:?}");
        for job in &live {
            log.append_blocking(
                *job,
                Event::RunnerNotice {
                    message: "after".into(),
                },
            )
            .unwrap();
        }
        log.close();
        drop(log);
        let reader = open_copy_after_close(dir.path());
        let audit = reader.audit().unwrap();
        let v = reel_engine::store::verify(&reader, &audit).unwrap();
        assert!(v.problems.is_empty(), "{stage:?}: {:?}", v.problems);
        assert!(v.events as usize >= acks.len(), "{stage:?}");
    }
}

/// `LogReader::open_copy` of a log an engine in this process just closed
/// (sled releases its lock a moment after the close).
fn open_copy_after_close(dir: &std::path::Path) -> LogReader {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match LogReader::open_copy(dir) {
            Ok(r) => return r,
            Err(LogError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot open a copy of the log: {e}"),
        }
    }
}
