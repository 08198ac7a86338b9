//! `reel gc` with the real binary: ended jobs past the horizon go (events,
//! journal frames, output, artifacts), a job that has not ended stays and
//! still runs afterwards, and a gc SIGKILLed at each of its points leaves a
//! log that verifies clean and that the next gc finishes.

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;

use reel_tests::{copy_dir, job_ids, json, ok, reel, text};

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn verify_clean(state: &Path, what: &str) {
    let out = reel(state, &["verify"], &[]);
    ok(&out, what);
    assert!(
        text(&out.stdout).contains("no problems found") && out.stderr.is_empty(),
        "{what}:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Four ended jobs (two with output, one with artifacts, one failed) and one
/// that has not ended: its `reel run` was killed right after it was queued.
fn history() -> tempfile::TempDir {
    let state = tempfile::tempdir().unwrap();
    let jobs = tempfile::tempdir().unwrap();
    let write = |name: &str, yaml: &str| {
        let p = jobs.path().join(name);
        std::fs::write(&p, yaml).unwrap();
        p.to_string_lossy().into_owned()
    };
    let a = write(
        "a.yml",
        "name: a\nsteps:\n  - name: s\n    command: seq 1 20000\n",
    );
    let b = write(
        "b.yml",
        "name: b\nartifacts: [out.txt]\nsteps:\n  - name: s\n    command: seq 1 5000 > out.txt; echo built\n",
    );
    let c = write(
        "c.yml",
        "name: c\nsteps:\n  - name: s\n    command: echo failing; exit 3\n",
    );
    let out = reel(
        state.path(),
        &["run", "-q", "-j", "2", &a, &b, &c, "examples/hello.yml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let live = write(
        "live.yml",
        "name: live\nsteps:\n  - name: s\n    command: echo still here\n",
    );
    let out = reel(
        state.path(),
        &["run", "-q", &live],
        &[("REEL_TEST_CRASH_AT", "Queued:after")],
    );
    assert_eq!(out.status.signal(), Some(9), "{}", text(&out.stderr));
    assert_eq!(job_ids(state.path()), vec![1, 2, 3, 4, 5]);
    assert_eq!(names(&state.path().join("output")).len(), 4);
    assert_eq!(names(&state.path().join("artifacts")), vec!["2"]);
    state
}

/// After a finished gc of every ended job: only job 5 is left, with nothing of
/// the others anywhere, and it still runs to its end.
fn only_the_live_job_is_left(state: &Path, journal_before: u64, what: &str) {
    verify_clean(state, what);
    assert_eq!(job_ids(state), vec![5], "{what}");
    assert!(names(&state.join("output")).is_empty(), "{what}");
    assert!(names(&state.join("artifacts")).is_empty(), "{what}");
    let journal = std::fs::metadata(state.join("journal")).unwrap().len();
    assert!(
        journal < journal_before / 4,
        "{what}: journal {journal} bytes, {journal_before} before"
    );
    assert!(!state.join("journal.gc").exists(), "{what}");
    assert!(!state.join("log.gc").exists(), "{what}");
    let out = reel(state, &["jobs"], &[]);
    assert!(
        text(&out.stdout).contains("were deleted by reel gc"),
        "{what}: {}",
        text(&out.stdout)
    );
    ok(&reel(state, &["recover", "-q"], &[]), what);
    let out = reel(state, &["output", "5"], &[]);
    assert_eq!(text(&out.stdout), "still here\n", "{what}");
    verify_clean(state, what);
    // A new job gets a new id, not one of the deleted ones.
    ok(
        &reel(state, &["run", "-q", "examples/hello.yml"], &[]),
        what,
    );
    assert_eq!(job_ids(state), vec![5, 6], "{what}");
}

fn journal_frames_end(state: &Path) -> u64 {
    // The journal's frames, not the zeros the writer keeps ahead of them.
    let file = std::fs::File::open(state.join("journal")).unwrap();
    reel_engine::store::journal::written_end(&file).unwrap()
}

#[test]
fn gc_deletes_ended_jobs_past_the_horizon_and_never_a_live_one() {
    let state = history();
    let before = journal_frames_end(state.path());
    // Everything ended within the last hour: nothing goes.
    let out = reel(state.path(), &["gc", "--keep", "1h"], &[]);
    ok(&out, "gc --keep 1h");
    assert!(
        text(&out.stdout).contains("deleted 0 jobs"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(job_ids(state.path()), vec![1, 2, 3, 4, 5]);
    verify_clean(state.path(), "after gc --keep 1h");
    // A dry run says what would go and changes nothing.
    let out = reel(state.path(), &["gc", "--keep", "0s", "--dry-run"], &[]);
    ok(&out, "gc --dry-run");
    assert!(
        text(&out.stdout).contains("would delete 4 jobs"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(job_ids(state.path()), vec![1, 2, 3, 4, 5]);
    let out = reel(state.path(), &["gc", "--keep", "0s", "--json"], &[]);
    ok(&out, "gc --keep 0s");
    let r = json(&out);
    assert_eq!(r["deleted_jobs"], 4, "{r}");
    assert_eq!(r["kept_jobs"], 1, "{r}");
    assert_eq!(r["kept_live_jobs"], 1, "{r}");
    assert!(r["deleted_file_bytes"].as_u64().unwrap() > 100_000, "{r}");
    only_the_live_job_is_left(state.path(), before, "gc --keep 0s");
}

#[test]
fn gc_is_refused_while_an_engine_holds_the_log() {
    let state = tempfile::tempdir().unwrap();
    let jobs = tempfile::tempdir().unwrap();
    let job = jobs.path().join("slow.yml");
    std::fs::write(
        &job,
        "name: slow\nsteps:\n  - name: s\n    command: echo started; sleep 5\n",
    )
    .unwrap();
    let mut run = reel_tests::start_run_until_output(
        state.path(),
        &job,
        &[],
        1,
        std::time::Duration::from_secs(30),
    );
    let out = reel(state.path(), &["gc", "--keep", "0s"], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {}", run.id())),
        "the refusal does not name the engine: {stderr}"
    );
    assert!(run.wait().unwrap().success());
    ok(
        &reel(state.path(), &["gc", "--keep", "0s"], &[]),
        "gc after",
    );
    assert!(job_ids(state.path()).is_empty());
    verify_clean(state.path(), "after the engine stopped");
}

#[test]
fn a_gc_killed_at_any_point_leaves_a_clean_log_that_the_next_gc_finishes() {
    let base = history();
    let before = journal_frames_end(base.path());
    let mut points: Vec<(&str, u32)> = reel_engine::testkit::crashpoint::GC_POINTS
        .iter()
        .map(|p| (*p, 1))
        .collect();
    points.extend([("forgetting", 3), ("files", 2)]);
    for (point, n) in points {
        let what = format!("gc killed at {point}:{n}");
        let dir = tempfile::tempdir().unwrap();
        copy_dir(base.path(), dir.path());
        let state = dir.path();
        let out = reel(
            state,
            &["gc", "--keep", "0s"],
            &[("REEL_TEST_GC_CRASH", &format!("{point}:{n}"))],
        );
        assert_eq!(
            out.status.signal(),
            Some(9),
            "{what}: not killed\n{}",
            text(&out.stderr)
        );
        // The killed gc's log opens and verifies clean, offline readers
        // list only jobs that are whole, and the live job is untouched.
        verify_clean(state, &what);
        let ids = job_ids(state);
        assert!(ids.contains(&5), "{what}: {ids:?}");
        let out = reel(state, &["recover", "--dry-run"], &[]);
        ok(&out, &what);
        let out = reel(state, &["gc", "--keep", "0s"], &[]);
        ok(&out, &format!("{what}: the next gc"));
        only_the_live_job_is_left(state, before, &what);
    }
}

/// The operator's case: the disk is full of old output. gc must still run
/// (sled needs room to open and to record what gc chose: the journal's
/// written-ahead zeros give it back), and free the space.
#[test]
fn gc_frees_a_full_disk() {
    let Some(disk) = crate::store::Tmpfs::mount("40m") else {
        return;
    };
    let state = disk.path().join("state");
    let job = disk.path().join("big.yml");
    std::fs::write(
        &job,
        "name: big\nsteps:\n  - name: s\n    command: head -c 3000000 /dev/zero | tr '\\0' x\n",
    )
    .unwrap();
    for _ in 0..6 {
        ok(
            &reel(&state, &["run", "-q", job.to_str().unwrap()], &[]),
            "run",
        );
    }
    // Fill what is left.
    let fill = disk.path().join("fill");
    let out = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M"])
        .arg(format!("of={}", fill.display()))
        .output()
        .unwrap();
    assert!(!out.status.success(), "dd did not fill the disk");
    let free = || {
        rustix::fs::statvfs(disk.path())
            .map(|s| s.f_bavail * s.f_frsize)
            .unwrap()
    };
    assert!(free() < 1 << 20, "{} bytes still free", free());
    let out = reel(&state, &["gc", "--keep", "0s"], &[]);
    ok(&out, "gc on a full disk");
    assert!(
        free() > 15 << 20,
        "gc freed too little: {} bytes free",
        free()
    );
    verify_clean(&state, "after gc on a full disk");
    assert!(job_ids(&state).is_empty());
    ok(
        &reel(&state, &["run", "-q", "examples/hello.yml"], &[]),
        "run after",
    );
    std::fs::remove_dir_all(&state).unwrap();
    std::fs::remove_file(&fill).unwrap();
}
