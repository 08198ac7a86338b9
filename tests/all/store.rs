//! The store under real damage, with the real `reel` binary: a flipped or cut
//! byte in sled's files, a full disk (a real tmpfs), a gigantic output read
//! back in bounded memory, and new files' directories synced.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use reel_tests::{copy_dir, job_ids, kill_sandboxes, ok, reel, target_dir, text};

fn damaged_dirs(state: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(state)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("log.damaged-"))
        .map(|e| e.path())
        .collect()
}

/// Every command works on a store sled refuses, from the readers (which
/// rebuild their copy and say so) to `run` and `recover` (which rebuild it in
/// place and keep the damaged one aside); afterwards the log verifies.
fn every_command_works_on(state: &Path) {
    for args in [
        &["jobs"][..],
        &["verify"],
        &["replay", "1"],
        &["output", "1"],
        &["inspect", "2"],
        &["recover", "--dry-run"],
    ] {
        let out = reel(state, args, &[]);
        let stderr = text(&out.stderr);
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "reel {args:?}: exit {:?}\n{stderr}",
            out.status.code()
        );
        assert!(
            !stderr.contains("the log's storage failed"),
            "reel {args:?}: {stderr}"
        );
        if args[0] != "output" && args[0] != "recover" {
            assert!(
                text(&out.stdout).contains("rebuilt its copy from the journal")
                    || stderr.contains("rebuilt its copy from the journal"),
                "reel {args:?} did not say what it rebuilt:\n{}\n{stderr}",
                text(&out.stdout)
            );
        }
    }
    assert!(damaged_dirs(state).is_empty(), "a reader changed the state");
    let out = reel(state, &["output", "1", "--step", "1"], &[]);
    assert_eq!(text(&out.stdout), "Hello from reel\n");

    let out = reel(state, &["run", "examples/hello.yml"], &[]);
    ok(&out, "run");
    assert!(
        text(&out.stderr).contains("moved aside to"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(damaged_dirs(state).len(), 1);
    assert_eq!(job_ids(state), vec![1, 2, 3]);
    ok(&reel(state, &["recover"], &[]), "recover");
    let out = reel(state, &["verify"], &[]);
    ok(&out, "verify");
    assert!(
        text(&out.stdout).contains("checked 3 jobs"),
        "{}",
        text(&out.stdout)
    );
}

/// Two `reel run`s: the second open leaves sled a snapshot, which is what
/// makes sled refuse a damaged store rather than replay it.
fn two_runs() -> tempfile::TempDir {
    let state = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        ok(
            &reel(state.path(), &["run", "examples/hello.yml"], &[]),
            "run",
        );
    }
    assert!(
        std::fs::read_dir(state.path().join("log"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("snap.")),
        "no sled snapshot after two runs"
    );
    state
}

#[test]
fn a_flipped_byte_in_the_sled_store_locks_no_command_out() {
    let state = two_runs();
    let db = std::fs::read(state.path().join("log/db")).unwrap();
    let written = db.iter().rposition(|b| *b != 0).unwrap() + 1;
    // Flip bytes of what sled wrote until one makes sled refuse the store.
    let mut damaged = None;
    for at in (512..written).step_by(512) {
        let copy = tempfile::tempdir().unwrap();
        copy_dir(state.path(), copy.path());
        let mut bytes = db.clone();
        bytes[at] ^= 0xff;
        std::fs::write(copy.path().join("log/db"), &bytes).unwrap();
        let out = reel(copy.path(), &["jobs"], &[]);
        if text(&out.stderr).contains("rebuilt its copy from the journal") {
            damaged = Some(copy);
            break;
        }
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "byte {at}: {}",
            text(&out.stderr)
        );
    }
    let damaged = damaged.expect("no flipped byte made sled refuse the store");
    every_command_works_on(damaged.path());
}

#[test]
fn a_truncated_sled_store_locks_no_command_out() {
    for len in [0u64, 1000] {
        let state = two_runs();
        std::fs::OpenOptions::new()
            .write(true)
            .open(state.path().join("log/db"))
            .unwrap()
            .set_len(len)
            .unwrap();
        every_command_works_on(state.path());
    }
}

/// A tmpfs of a given size, unmounted when dropped.
pub(crate) struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub(crate) fn mount(size: &str) -> Option<Tmpfs> {
        if !rustix::process::geteuid().is_root() {
            println!("skipped: mounting a tmpfs needs root (CI runs as root)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {}", text(&out.stderr));
        Some(Tmpfs { dir })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_leaves_nothing_that_breaks_later_commands() {
    let Some(disk) = Tmpfs::mount("20m") else {
        return;
    };
    let state = disk.path().join("state");
    let state = state.as_path();
    for _ in 0..2 {
        ok(&reel(state, &["run", "examples/hello.yml"], &[]), "run");
    }
    // Space to give back later, as an operator frees space on a full disk.
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 2 << 20]).unwrap();
    let flood = disk.path().join("flood.yml");
    std::fs::write(
        &flood,
        "name: flood\nsteps:\n  - name: flood\n    command: yes | head -c 80000000\n",
    )
    .unwrap();
    let out = reel(state, &["run", "-q", flood.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "80 MB fit on a 20 MB disk");
    // The sandbox outlives the failed engine; as if it died too.
    kill_sandboxes(state);
    // An engine opening the log on the still full disk: sled's snapshot
    // write fails and leaves its unfinished file behind.
    let out = reel(state, &["recover"], &[]);
    assert!(!out.status.success());
    let generating: Vec<_> = std::fs::read_dir(state.join("log"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".generating"))
        .collect();
    assert!(
        !generating.is_empty(),
        "the full disk left no unfinished sled snapshot: {}",
        text(&out.stderr)
    );

    std::fs::remove_file(&ballast).unwrap();
    for args in [&["jobs"][..], &["replay", "3"], &["output", "1"]] {
        let out = reel(state, args, &[]);
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "reel {args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            !text(&out.stderr).contains("storage failed"),
            "reel {args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = reel(state, &["recover"], &[]);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "recover: {}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("job 3"), "{}", text(&out.stdout));
    let left: Vec<_> = std::fs::read_dir(state.join("log"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".generating"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // The torn output tail the full disk left was cut when the engine opened
    // the log; what survived verifies.
    let out = reel(state, &["verify"], &[]);
    ok(&out, "verify");
    ok(
        &reel(state, &["run", "examples/hello.yml"], &[]),
        "run after",
    );
    // Free the mount for the unmount.
    std::fs::remove_dir_all(state).unwrap();
}

/// Peak resident memory of a process, sampled from `/proc` until it exits.
fn run_measuring_peak(state: &Path, args: &[&str]) -> (u64, std::process::ExitStatus) {
    let mut child = Command::new(target_dir().join("reel"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status_file)
            && let Some(kib) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        {
            peak_kib = peak_kib.max(kib);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (peak_kib, status);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn output_and_verify_read_a_huge_output_in_bounded_memory() {
    use reel_engine::model::event::Event;
    use reel_engine::store::{EventLog, LogOptions, Stream};
    use reel_engine::testkit::simulate::{Ending, run_job, spec};
    const MIB: u64 = 1024 * 1024;
    const STORED: u64 = 384 * MIB;
    let state = tempfile::tempdir().unwrap();
    {
        let log = EventLog::open(state.path(), LogOptions::default()).unwrap();
        let job = smol::block_on(run_job(&log, spec("huge", 1), 1, Ending::StopAfter(0))).unwrap();
        log.append_blocking(
            job,
            Event::StepStarted {
                index: 0,
                exec_id: 1,
            },
        )
        .unwrap();
        let piece = vec![b'y'; MIB as usize];
        for i in 0..STORED / MIB {
            smol::block_on(log.append_output(job, 0, i * MIB, Stream::Stdout, piece.clone()))
                .unwrap();
        }
        log.append_blocking(
            job,
            Event::StepFinished {
                index: 0,
                exit_code: Some(0),
                signal: None,
                timed_out: false,
                output_bytes: STORED,
            },
        )
        .unwrap();
        log.close();
    }
    for args in [&["output", "1"][..], &["verify"]] {
        let (peak_kib, status) = run_measuring_peak(state.path(), args);
        assert!(status.success(), "reel {args:?}: {status}");
        println!(
            "reel {args:?} on {} MiB of output: peak {peak_kib} KiB",
            STORED / MIB
        );
        // Reading the output whole took twice its size.
        assert!(
            peak_kib < 64 * 1024,
            "reel {args:?} peaked at {peak_kib} KiB reading {} MiB of output",
            STORED / MIB
        );
    }
}

/// Strips ANSI colour codes from a log line.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn every_new_file_and_directory_has_its_parent_synced() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = reel(
        &state,
        &["--log-level", "debug", "run", "examples/hello.yml"],
        &[],
    );
    ok(&out, "run");
    let synced: Vec<String> = text(&out.stderr)
        .lines()
        .map(plain)
        .filter(|l| l.contains("synced the directory"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("dir=").map(str::to_string))
        })
        .collect();
    let must = |dir: &Path, why: &str| {
        assert!(
            synced.iter().any(|s| Path::new(s) == dir),
            "{} was not synced ({why}); synced: {synced:?}",
            dir.display()
        );
    };
    must(tmp.path(), "the state directory was created in it");
    must(&state, "the journal, log/ and output/ were created in it");
    must(&state.join("log"), "sled created its files in it");
    must(
        &state.join("output"),
        "the job's output directory was created in it",
    );
    must(
        &state.join("output/1"),
        "the steps' output files were created in it",
    );
    // Once per new file or directory, not per append: three steps' files.
    let job_dir = state.join("output/1");
    let n = synced.iter().filter(|s| Path::new(s) == job_dir).count();
    assert_eq!(n, 3, "{synced:?}");
}

/// A child an engine was starting holds a copy of sled's locked descriptor
/// from its fork until its exec, and after a SIGKILL of the engine it goes on
/// holding it until it execs: on a loaded machine, past the moment the next
/// engine opens the log. Here another process holds the lock the same way
/// (its own descriptor of `log/db`, locked) after the engine that recorded its
/// pid was killed: the next engine waits for it, and a lock that stays is
/// refused naming who holds it, not the dead engine.
#[test]
fn a_lock_left_behind_by_a_killed_engine_is_waited_for_then_named() {
    let state = tempfile::tempdir().unwrap();
    let job = state.path().join("job.yml");
    std::fs::write(
        &job,
        "name: hold\nsteps:\n  - name: say\n    command: echo started; sleep 1\n",
    )
    .unwrap();
    let mut run =
        reel_tests::start_run_until_output(state.path(), &job, &[], 1, Duration::from_secs(30));
    run.kill().unwrap();
    run.wait().unwrap();
    let engine: u32 = std::fs::read_to_string(state.path().join("engine.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(engine, run.id(), "the killed engine recorded its pid");

    let lock = || {
        let db = std::fs::File::open(state.path().join("log/db")).unwrap();
        rustix::fs::flock(&db, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .expect("the killed engine's lock is free");
        db
    };

    // Let go after 1.5 s: recover waits for it and finishes the job.
    let held = lock();
    let let_go = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        drop(held);
    });
    let started = std::time::Instant::now();
    let out = reel(state.path(), &["recover"], &[]);
    ok(&out, "recover while a lock left behind is let go");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "recover opened a log whose lock was held"
    );
    let_go.join().unwrap();
    let out = reel(state.path(), &["jobs"], &[]);
    ok(&out, "jobs");
    assert!(
        text(&out.stdout).contains("succeeded"),
        "{}",
        text(&out.stdout)
    );

    // Held for good: refused once the wait is over, naming this process and
    // the (gone) engine that last recorded its pid, recover.
    let recorded = std::fs::read_to_string(state.path().join("engine.pid")).unwrap();
    let _held = lock();
    let out = reel(state.path(), &["jobs"], &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("{}, is gone", recorded.trim())),
        "{err}"
    );
    assert!(
        err.contains(&format!("pid {} ", std::process::id())),
        "the refusal names the process holding the lock: {err}"
    );
}
