//! Golden byte fixtures pin the on-disk encoding of every event kind.
//!
//! Each file under `tests/golden/` is the stored envelope of one sample event.
//! If an encoding changes, this test fails: a changed format needs a new event
//! variant (and an upcast), never an edit of an old one. To write fixtures for a
//! *new* kind, run with `REEL_BLESS=1`; existing fixtures are never overwritten.

use std::collections::BTreeMap;
use std::path::PathBuf;

use reel_engine::model::codec::DecodeError;
use reel_engine::model::event::{Event, Handle, Outcome, RETIRED_KINDS};
use reel_engine::model::spec::{JobSpec, Network, Origin, Resources, Retry, StepSpec};

const AT_MS: u64 = 1_795_790_825_123;

fn handle() -> Handle {
    Handle {
        version: 1,
        bytes: vec![0xde, 0xad, 0xbe, 0xef, 0x00, 0xff],
    }
}

/// The spec as format 1 held it (kind 1): the fields after `owner` empty.
fn spec_v1() -> JobSpec {
    JobSpec {
        name: "golden".into(),
        runner: "process".into(),
        image: Some("debian:12".into()),
        resources: Resources {
            memory_mib: 512,
            vcpus: 2,
            disk_mib: 1024,
        },
        environment: BTreeMap::from([("CI".into(), "true".into())]),
        secrets: vec!["TOKEN".into()],
        steps: vec![StepSpec {
            name: "build".into(),
            command: "make -j2\nmake test".into(),
            environment: BTreeMap::from([("CC".into(), "gcc".into())]),
            timeout_ms: Some(60_000),
        }],
        timeout_ms: Some(3_600_000),
        owner: "alice".into(),
        ..JobSpec::default()
    }
}

/// The spec as format 2 held it (kind 29): without the network choice.
fn spec_v2() -> JobSpec {
    JobSpec {
        artifacts: vec!["dist/*.tar.gz".into(), "report.xml".into()],
        retry: Retry { lost: 2 },
        cancel_grace_ms: Some(10_000),
        origin: Origin {
            idempotency_key: Some("build-1234".into()),
            retry_of: Some(41),
            retries: 1,
        },
        ..spec_v1()
    }
}

fn spec() -> JobSpec {
    JobSpec {
        network: Network::User,
        ..spec_v2()
    }
}

/// One sample of every kind, in kind order.
fn samples() -> Vec<Event> {
    vec![
        Event::Queued {},
        Event::CidAllocated { cid: 7 },
        Event::SandboxPlanned {
            handle: handle(),
            resources: vec!["workdir /var/lib/reel/sandboxes/7".into()],
        },
        Event::WorkDirCreated { handle: handle() },
        Event::VolumesFormatted {
            volumes: vec!["scratch.ext4".into()],
        },
        Event::BootRequested {},
        Event::VmBooted { handle: handle() },
        Event::AgentConnected { handle: handle() },
        Event::StepStarted {
            index: 0,
            exec_id: 1,
        },
        Event::StepFinished {
            index: 0,
            exit_code: Some(2),
            signal: None,
            timed_out: false,
            output_bytes: 123_456,
        },
        Event::CancelRequested {
            reason: "user".into(),
        },
        Event::TeardownStarted {
            outcome: Outcome::Failed,
            reason: "step 0 exited with code 2".into(),
        },
        Event::Drained {},
        Event::PoweredOff {},
        Event::CleanupStarted {},
        Event::Cleaned {},
        Event::Succeeded {},
        Event::Failed {
            reason: "step 0 exited with code 2".into(),
        },
        Event::Cancelled {
            reason: "user".into(),
        },
        Event::TimedOut {
            reason: "step 0 ran past 60s".into(),
        },
        Event::Lost {
            reason: "sandbox gone".into(),
        },
        Event::RecoveryStarted { engine_pid: 4242 },
        Event::Reattached { handle: handle() },
        Event::Reaped {
            reason: "agent dead".into(),
        },
        Event::RunnerNotice {
            message: "cgroup skipped".into(),
        },
        Event::DeadlinePassed {
            reason: "the job ran past its timeout of 1h".into(),
        },
        Event::SlotGranted {
            charged: Resources {
                memory_mib: 512,
                vcpus: 1,
                disk_mib: 1024,
            },
        },
        Event::ArtifactStored {
            name: "dist/app.tar.gz".into(),
            size: 1_234_567,
            crc32c: 0x8a91_36aa,
        },
        Event::Submitted { spec: spec() },
    ]
}

/// Retired kinds, their fixtures (written when they were current) and what
/// they read as now.
fn retired() -> Vec<(&'static str, Event)> {
    vec![
        ("001-Submitted.bin", Event::Submitted { spec: spec_v1() }),
        (
            "003-SlotGranted.bin",
            Event::SlotGranted {
                charged: Resources::default(),
            },
        ),
        ("029-Submitted.bin", Event::Submitted { spec: spec_v2() }),
    ]
}

#[test]
fn retired_kinds_read_as_their_upcast() {
    let listed: Vec<u16> = RETIRED_KINDS.iter().map(|k| k.0).collect();
    assert_eq!(listed, vec![1, 3, 29]);
    for (file, upcast) in retired() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(file);
        let golden = std::fs::read(&path).unwrap();
        assert_eq!(Event::decode(&golden).unwrap(), (AT_MS, upcast), "{file}");
        for i in 0..golden.len() {
            let mut b = golden.clone();
            b[i] ^= 0x5a;
            assert!(Event::decode(&b).is_err(), "{file}: flip at {i} decoded");
        }
    }
}

fn fixture(e: &Event) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{:03}-{}.bin", e.kind(), e.name()))
}

#[test]
fn every_kind_has_a_sample() {
    let kinds: Vec<u16> = samples().iter().map(Event::kind).collect();
    let all: Vec<u16> = Event::KINDS.iter().map(|k| k.0).collect();
    assert_eq!(
        kinds, all,
        "add a sample (and a fixture) for every new kind"
    );
}

#[test]
fn encodings_match_the_golden_bytes() {
    let bless = std::env::var_os("REEL_BLESS").is_some();
    for e in samples() {
        let path = fixture(&e);
        let bytes = e.encode(AT_MS);
        if !path.exists() && bless {
            std::fs::write(&path, &bytes).unwrap();
        }
        let golden = std::fs::read(&path).unwrap_or_else(|err| {
            panic!(
                "{}: {err} (new kind? run with REEL_BLESS=1)",
                path.display()
            )
        });
        assert_eq!(
            bytes,
            golden,
            "encoding of {} changed: {}",
            e.name(),
            path.display()
        );
        assert_eq!(Event::decode(&golden).unwrap(), (AT_MS, e.clone()));
    }
}

#[test]
fn corrupted_fixtures_are_errors_not_panics() {
    for e in samples() {
        let golden = std::fs::read(fixture(&e)).unwrap();
        for i in 0..golden.len() {
            let mut b = golden.clone();
            b[i] ^= 0x5a;
            assert!(
                Event::decode(&b).is_err(),
                "{}: flip at {i} decoded",
                e.name()
            );
            assert!(Event::decode(&golden[..i]).is_err());
        }
    }
}

#[test]
fn unknown_format_version_is_refused() {
    let mut b = Event::Queued {}.encode(AT_MS);
    b[1] = 9;
    let n = b.len() - 4;
    let crc = crc32c(&b[..n]);
    b[n..].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(
        Event::decode(&b).unwrap_err(),
        DecodeError::UnknownFormat(9)
    );
}

fn crc32c(bytes: &[u8]) -> u32 {
    // Bitwise CRC-32C (Castagnoli), independent of the crate under test.
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
