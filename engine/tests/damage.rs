//! A damaged store on disk, with real bytes changed in real files: a sled
//! directory sled refuses to open (rebuilt from the journal), sled's unfinished
//! snapshot files, a deleted journal, torn and huge step output files.

use std::path::{Path, PathBuf};

use reel_engine::model::event::{Event, Outcome};
use reel_engine::store::{EventLog, LogError, LogOptions, LogReader, Stream, verify};
use reel_engine::testkit::simulate::{Ending, run_job, spec};

fn open(dir: &Path) -> EventLog {
    EventLog::open(dir, LogOptions::default()).unwrap()
}

fn messages(log: &LogReader) -> Vec<String> {
    log.repairs().iter().map(|r| r.message.clone()).collect()
}

/// A log with a finished job and a live one, opened and closed twice so that
/// sled has written a snapshot (as after two `reel run`s). Returns the jobs.
fn two_runs(dir: &Path) -> (u64, u64) {
    let (done, live);
    {
        let log = open(dir);
        done = smol::block_on(run_job(&log, spec("done", 2), 1, Ending::Success)).unwrap();
        live = smol::block_on(run_job(&log, spec("live", 3), 2, Ending::StopAfter(1))).unwrap();
        log.close();
    }
    open(dir).close();
    let snaps = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("snap."))
        .count();
    assert_eq!(
        snaps, 1,
        "sled wrote no snapshot: the test would prove nothing"
    );
    (done, live)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

fn damaged_dirs(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("log.damaged-"))
        .map(|e| e.path())
        .collect()
}

/// Whether sled itself refuses to open the sled directory of `state`.
fn sled_refuses(state: &Path) -> bool {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&state.join("log"), tmp.path());
    matches!(sled::open(tmp.path()), Err(sled::Error::Corruption { .. }))
}

#[test]
fn a_truncated_store_is_rebuilt_from_the_journal_and_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    let (done, live) = two_runs(dir.path());
    let before = {
        let log = LogReader::open_copy(dir.path()).unwrap();
        log.fold(live).unwrap()
    };
    let db = dir.path().join("log").join("db");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert!(sled_refuses(dir.path()), "sled opens the truncated store");

    // An offline reader rebuilds its copy and leaves the state directory alone.
    {
        let log = LogReader::open_copy(dir.path()).unwrap();
        let repairs = messages(&log);
        assert!(
            repairs.iter().any(
                |r| r.contains("this read rebuilt its copy from the journal")
                    && r.contains("of 2 jobs")
            ),
            "{repairs:?}"
        );
        assert_eq!(log.live_jobs().unwrap(), vec![live]);
        assert_eq!(log.fold(live).unwrap(), before);
        assert_eq!(log.summary(done).unwrap().outcome, Some(Outcome::Succeeded));
    }
    assert!(damaged_dirs(dir.path()).is_empty());
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);

    // The engine rebuilds it in place, keeping the damaged directory.
    let log = open(dir.path());
    let repairs = messages(&log);
    let aside = damaged_dirs(dir.path());
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(aside[0].join("db").exists());
    assert!(
        repairs
            .iter()
            .any(|r| r.contains("is damaged (sled found corrupt data")
                && r.contains(&format!("moved aside to {}", aside[0].display()))
                && r.contains("rebuilt from the journal")),
        "{repairs:?}"
    );
    assert_eq!(log.live_jobs().unwrap(), vec![live]);
    assert_eq!(log.live_state(live).unwrap(), before);
    // The id counter is past every job, and the engine carries on.
    let next = log.submit_blocking(spec("after", 1)).unwrap();
    assert_eq!(next, live + 1);
    log.append_blocking(
        live,
        Event::RunnerNotice {
            message: "on".into(),
        },
    )
    .unwrap();
    log.close();
    drop(log);

    // The journal checkpoint is right: the next open finds nothing to repair,
    // and the whole log verifies.
    let log = open(dir.path());
    assert_eq!(messages(&log), Vec::<String>::new());
    assert_eq!(log.live_jobs().unwrap(), vec![live, next]);
    log.close();
    drop(log);
    let reader = LogReader::open_copy(dir.path()).unwrap();
    let audit = reader.audit().unwrap();
    let v = verify(&reader, &audit).unwrap();
    assert_eq!(v.problems, Vec::<String>::new());
    assert_eq!(v.jobs, 3);
}

#[test]
fn every_flipped_byte_sled_refuses_is_rebuilt_and_the_history_is_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (done, live) = two_runs(dir.path());
    let db = std::fs::read(dir.path().join("log").join("db")).unwrap();
    // sled's segment is mostly zeros past what it wrote; damage what it wrote.
    let written = db.iter().rposition(|b| *b != 0).unwrap() + 1;
    let mut refused = 0;
    for at in (0..written).step_by(331) {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let mut bytes = db.clone();
        bytes[at] ^= 0x55;
        std::fs::write(copy.path().join("log").join("db"), &bytes).unwrap();
        if !sled_refuses(copy.path()) {
            continue;
        }
        refused += 1;
        let log = open(copy.path());
        assert!(
            messages(&log)
                .iter()
                .any(|r| r.contains("rebuilt from the journal")),
            "byte {at}: {:?}",
            messages(&log)
        );
        assert_eq!(log.live_jobs().unwrap(), vec![live], "byte {at}");
        assert_eq!(
            log.fold(done).unwrap().outcome,
            Some(Outcome::Succeeded),
            "byte {at}"
        );
        assert_eq!(log.summary(done).unwrap().outcome, Some(Outcome::Succeeded));
    }
    assert!(
        refused > 0,
        "no flipped byte made sled refuse the store: the test proves nothing"
    );
}

#[test]
fn a_store_sled_refuses_without_a_journal_is_an_error_and_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    two_runs(dir.path());
    std::fs::remove_file(dir.path().join("journal")).unwrap();
    let db = dir.path().join("log").join("db");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(0)
        .unwrap();
    let err = EventLog::open(dir.path(), LogOptions::default()).unwrap_err();
    assert!(matches!(err, LogError::Unrebuildable { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("is damaged (sled found corrupt data")
            && text.contains("is empty or missing: there is nothing to rebuild it from"),
        "{text}"
    );
    assert!(damaged_dirs(dir.path()).is_empty());
    assert!(db.exists());
}

#[test]
fn an_unfinished_sled_snapshot_is_ignored_by_readers_and_removed_by_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (done, live) = two_runs(dir.path());
    // What a full disk leaves when sled's snapshot write fails: the file it was
    // writing, empty, under a name that sorts after every finished snapshot.
    let stale = dir
        .path()
        .join("log")
        .join("snap.00000000FFFFFFFF.generating");
    std::fs::write(&stale, b"").unwrap();
    assert!(sled_refuses(dir.path()), "sled opens past the stale file");

    let reader = LogReader::open_copy(dir.path()).unwrap();
    assert_eq!(messages(&reader), Vec::<String>::new());
    assert_eq!(reader.live_jobs().unwrap(), vec![live]);
    drop(reader);
    assert!(stale.exists(), "a reader changed the state directory");

    let log = open(dir.path());
    assert!(!stale.exists());
    assert_eq!(messages(&log), Vec::<String>::new());
    assert!(
        damaged_dirs(dir.path()).is_empty(),
        "nothing needed a rebuild"
    );
    assert_eq!(log.summary(done).unwrap().outcome, Some(Outcome::Succeeded));
    assert_eq!(log.live_jobs().unwrap(), vec![live]);
}

#[test]
fn a_deleted_journal_is_reported_as_missing_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_, live) = two_runs(dir.path());
    let journal = dir.path().join("journal");
    std::fs::remove_file(&journal).unwrap();
    let missing = format!("the journal {} is missing", journal.display());

    let reader = LogReader::open_copy(dir.path()).unwrap();
    assert!(
        messages(&reader).iter().any(|r| r.contains(&missing)),
        "{:?}",
        messages(&reader)
    );
    assert!(!messages(&reader).iter().any(|r| r.contains("last round")));
    drop(reader);

    let log = open(dir.path());
    assert!(
        messages(&log).iter().any(|r| r.contains(&missing)),
        "{:?}",
        messages(&log)
    );
    log.append_blocking(
        live,
        Event::RunnerNotice {
            message: "x".into(),
        },
    )
    .unwrap();
    log.close();
    drop(log);
    let log = open(dir.path());
    assert_eq!(messages(&log), Vec::<String>::new());
}

/// A live job whose step 1 is running, with `frames` written to its output
/// file as an engine that died would have left them. Returns the job and the
/// output file.
fn running_step_with_output(dir: &Path, frames: &[u8]) -> (u64, PathBuf) {
    let job;
    {
        let log = open(dir);
        job = smol::block_on(run_job(&log, spec("a", 2), 1, Ending::StopAfter(0))).unwrap();
        log.append_blocking(
            job,
            Event::StepStarted {
                index: 0,
                exec_id: 1,
            },
        )
        .unwrap();
        log.close();
    }
    let file = dir.join("output").join(job.to_string()).join("0.out");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, frames).unwrap();
    (job, file)
}

#[test]
fn a_torn_output_tail_is_cut_when_the_engine_opens_the_log() {
    use reel_engine::store::output::frame;
    let dir = tempfile::tempdir().unwrap();
    let mut frames = frame(0, 0, b"stored ");
    frames.extend(frame(7, 1, b"and acknowledged\n"));
    let whole = frames.len() as u64;
    frames.extend(&frame(24, 0, b"cut short by a full disk")[..21]);
    let (job, file) = running_step_with_output(dir.path(), &frames);

    let reader = LogReader::open_copy(dir.path()).unwrap();
    assert_eq!(reader.output_end(job, 0).unwrap(), 24);
    let last = reader.output(job, 0, 0).last().unwrap().unwrap_err();
    assert!(
        last.to_string().contains("stored output is corrupt"),
        "{last}"
    );
    drop(reader);

    // The engine cuts it on open, whether or not the step gets more output
    // (a reaped step never does).
    let log = open(dir.path());
    assert_eq!(std::fs::metadata(&file).unwrap().len(), whole);
    log.close();
    drop(log);
    let reader = LogReader::open_copy(dir.path()).unwrap();
    let chunks: Vec<_> = reader.output(job, 0, 0).collect::<Result<_, _>>().unwrap();
    assert_eq!(chunks.len(), 2);
    let audit = reader.audit().unwrap();
    assert_eq!(
        verify(&reader, &audit).unwrap().problems,
        Vec::<String>::new()
    );
}

/// Child side of the bounded-memory reopen test: opens the log, stores one
/// more chunk for the running step (which reopens its large output file) and
/// prints the peak memory before and after; runs only when the parent sets the
/// env var.
#[test]
fn child_resumer() {
    let Some(dir) = std::env::var_os("REEL_TEST_RESUMER_DIR") else {
        return;
    };
    let job: u64 = std::env::var("REEL_TEST_RESUMER_JOB")
        .unwrap()
        .parse()
        .unwrap();
    let end: u64 = std::env::var("REEL_TEST_RESUMER_END")
        .unwrap()
        .parse()
        .unwrap();
    let log = open(Path::new(&dir));
    let before = peak_kib();
    let new_end =
        smol::block_on(log.append_output(job, 0, end, Stream::Stdout, b"resumed\n".to_vec()))
            .unwrap();
    let stored_end = log.output_end(job, 0).unwrap();
    println!("peak {before} {} end {new_end} {stored_end}", peak_kib());
}

fn peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn reopening_a_large_output_file_finds_its_end_in_bounded_memory() {
    use reel_engine::store::output::frame;
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let (job, file) = running_step_with_output(dir.path(), b"");
    // 256 MiB of stored output, in 1 MiB frames, as the writer stores it.
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        let piece = vec![b'y'; MIB];
        for i in 0..256u64 {
            f.write_all(&frame(i * MIB as u64, 0, &piece)).unwrap();
        }
        f.flush().unwrap();
    }
    let end = 256 * MIB as u64;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_resumer",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("REEL_TEST_RESUMER_DIR", dir.path())
        .env("REEL_TEST_RESUMER_JOB", job.to_string())
        .env("REEL_TEST_RESUMER_END", end.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("peak ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("{stdout} / {}", String::from_utf8_lossy(&out.stderr)));
    let n: Vec<u64> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
    let (before, after, new_end, stored_end) = (n[0], n[1], n[2], n[3]);
    assert_eq!(new_end, end + 8);
    assert_eq!(stored_end, end + 8);
    // Reading the 256 MiB file whole would add at least that much.
    assert!(
        after - before < 32 * 1024,
        "reopening the output file raised peak memory from {before} KiB to {after} KiB"
    );
}

#[test]
fn output_is_read_frame_by_frame_whatever_the_file_size() {
    use reel_engine::store::output::frame;
    let dir = tempfile::tempdir().unwrap();
    let (job, file) = running_step_with_output(dir.path(), &frame(0, 0, b"first\n"));
    // A file of 4 GiB (sparse: only the first frame is stored), so reading it
    // whole would need 4 GiB of memory.
    let len = 4u64 << 30;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len)
        .unwrap();
    let log = LogReader::open_copy(dir.path()).unwrap();
    let mut chunks = log.output(job, 0, 0);
    assert_eq!(chunks.next().unwrap().unwrap().bytes, b"first\n");
    let err = chunks.next().unwrap().unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("job {job} step 1: stored output is corrupt")),
        "{err}"
    );
    assert!(chunks.next().is_none());
    let err = log.output_end(job, 0).unwrap_err();
    assert!(matches!(err, LogError::CorruptOutput { .. }), "{err}");
}

/// A store large enough that sled reads most of its pages only when asked:
/// a damaged page is found after sled opened, by a read.
#[test]
fn a_damaged_page_found_by_a_read_after_open_is_rebuilt_too() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = 200;
    {
        let log = open(dir.path());
        smol::block_on(async {
            for i in 0..jobs {
                run_job(&log, spec(&format!("j{i}"), 3), 1, Ending::Success)
                    .await
                    .unwrap();
            }
        });
        log.close();
    }
    open(dir.path()).close();
    let db = std::fs::read(dir.path().join("log").join("db")).unwrap();
    let written = db.iter().rposition(|b| *b != 0).unwrap() + 1;
    let mut lazy = 0;
    // Recent pages are the ones sled reads only when asked: go back from the end.
    for at in (written / 20..written).rev().step_by(written / 60) {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(dir.path(), copy.path());
        let mut bytes = db.clone();
        bytes[at] ^= 0x55;
        std::fs::write(copy.path().join("log").join("db"), &bytes).unwrap();
        // sled opens this copy, and fails a read later.
        let found_by_a_read = {
            let tmp = tempfile::tempdir().unwrap();
            copy_dir(&copy.path().join("log"), tmp.path());
            match sled::open(tmp.path()) {
                Ok(db) => db.tree_names().iter().any(|name| {
                    db.open_tree(name)
                        .is_ok_and(|t| t.iter().any(|item| item.is_err()))
                }),
                Err(_) => false,
            }
        };
        if !found_by_a_read {
            continue;
        }
        lazy += 1;
        eprintln!("byte {at} of {written}: found by a read after open");
        let reader = LogReader::open_copy(copy.path()).unwrap();
        assert!(
            messages(&reader)
                .iter()
                .any(|r| r.contains("this read rebuilt its copy from the journal")),
            "byte {at}: {:?}",
            messages(&reader)
        );
        let audit = reader.audit().unwrap();
        let v = verify(&reader, &audit).unwrap();
        assert_eq!(v.jobs, jobs as u64, "byte {at}");
        drop(reader);
        let log = open(copy.path());
        let all: Vec<_> = log.jobs().collect::<Result<_, _>>().unwrap();
        assert_eq!(all.len(), jobs as usize, "byte {at}");
        assert!(all.iter().all(|s| s.outcome == Some(Outcome::Succeeded)));
        break;
    }
    assert!(
        lazy > 0,
        "no flipped byte was found by a read after open: the test proves nothing"
    );
}

#[test]
fn a_rebuilt_live_job_whose_journal_copy_is_damaged_too_is_listed_and_set_aside() {
    use reel_engine::store::journal;
    let dir = tempfile::tempdir().unwrap();
    let (done, live) = two_runs(dir.path());
    let path = dir.path().join("journal");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = journal::parse(&bytes, 0)
        .into_iter()
        .find_map(|item| match item {
            journal::Item::Frame {
                offset,
                job,
                seq: 5,
                ..
            } if job == live => Some(offset as usize),
            _ => None,
        })
        .unwrap();
    bytes[at + 20] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("log/db"))
        .unwrap()
        .set_len(0)
        .unwrap();

    let log = open(dir.path());
    let repairs = messages(&log);
    assert!(
        repairs.iter().any(
            |r| r.contains(&format!("job {live}: cannot rebuild its summary"))
                && r.contains("listed as of seq 4")
        ),
        "{repairs:?}"
    );
    assert_eq!(log.summary(live).unwrap().last_seq, 4);
    assert!(log.set_aside().contains_key(&live), "{repairs:?}");
    assert!(log.live_state(live).is_none());
    assert_eq!(log.summary(done).unwrap().outcome, Some(Outcome::Succeeded));
    assert_eq!(log.submit_blocking(spec("after", 1)).unwrap(), live + 1);
}
