//! Property tests of the pure state machine.

use proptest::prelude::*;

use reel_engine::model::event::{Event, Handle, Outcome, Record};
use reel_engine::model::spec::{JobSpec, StepSpec};
use reel_engine::model::state::{JobState, Phase, apply, fold};

fn spec(steps: usize) -> JobSpec {
    JobSpec {
        name: "p".into(),
        runner: "process".into(),
        steps: (0..steps)
            .map(|i| StepSpec {
                name: format!("s{i}"),
                command: "true".into(),
                ..StepSpec::default()
            })
            .collect(),
        ..JobSpec::default()
    }
}

fn h() -> Handle {
    Handle {
        version: 1,
        bytes: vec![1, 2, 3],
    }
}

/// How a generated job goes.
#[derive(Clone, Debug)]
enum Plot {
    /// Every step succeeds.
    Success,
    /// Step k (mod steps) fails, times out or is cancelled.
    StepEnds(usize, Outcome),
    /// Setup stops after `stage` (0..10) of the setup events and fails or is cancelled.
    SetupEnds(usize, Outcome),
    /// The engine dies after `at` events; recovery reaps the job.
    Reaped(usize),
}

/// The events the engine appends for a plot, in order.
fn path(steps: usize, plot: &Plot) -> Vec<Event> {
    let setup = vec![
        Event::Queued {},
        Event::SlotGranted {
            charged: Default::default(),
        },
        Event::CidAllocated { cid: 3 },
        Event::SandboxPlanned {
            handle: h(),
            resources: vec!["workdir /x".into()],
        },
        Event::WorkDirCreated { handle: h() },
        Event::VolumesFormatted { volumes: vec![] },
        Event::BootRequested {},
        Event::VmBooted { handle: h() },
        Event::AgentConnected { handle: h() },
    ];
    let mut ev = vec![Event::Submitted { spec: spec(steps) }];
    let teardown = |ev: &mut Vec<Event>, outcome: Outcome, leased: bool, booted: bool| {
        ev.push(Event::TeardownStarted {
            outcome,
            reason: "r".into(),
        });
        if leased {
            if booted {
                ev.push(Event::Drained {});
                ev.push(Event::ArtifactStored {
                    name: "dist/a".into(),
                    size: 3,
                    crc32c: 7,
                });
                ev.push(Event::PoweredOff {});
            }
            ev.push(Event::CleanupStarted {});
            ev.push(Event::Cleaned {});
        }
        ev.push(Event::terminal(outcome, "r".into()));
    };
    match plot {
        Plot::SetupEnds(stage, outcome) => {
            let stage = stage % setup.len();
            ev.extend(setup.iter().take(stage).cloned());
            if *outcome == Outcome::Cancelled {
                ev.push(Event::CancelRequested { reason: "u".into() });
            }
            teardown(&mut ev, *outcome, stage >= 3, stage >= 8);
        }
        Plot::Success | Plot::StepEnds(..) => {
            ev.extend(setup);
            let (bad, outcome) = match plot {
                Plot::StepEnds(k, o) if steps > 0 => (Some(k % steps), *o),
                _ => (None, Outcome::Succeeded),
            };
            for i in 0..steps {
                ev.push(Event::StepStarted {
                    index: i as u32,
                    exec_id: i as u64 + 10,
                });
                let fails = bad == Some(i);
                if fails && outcome == Outcome::Cancelled {
                    ev.push(Event::CancelRequested { reason: "u".into() });
                }
                ev.push(Event::StepFinished {
                    index: i as u32,
                    exit_code: if fails { None } else { Some(0) },
                    signal: if fails { Some(15) } else { None },
                    timed_out: fails && outcome == Outcome::TimedOut,
                    output_bytes: 5,
                });
                if fails {
                    break;
                }
            }
            teardown(
                &mut ev,
                if bad.is_some() {
                    outcome
                } else {
                    Outcome::Succeeded
                },
                true,
                true,
            );
        }
        Plot::Reaped(at) => {
            ev.extend(setup);
            for i in 0..steps {
                ev.push(Event::StepStarted {
                    index: i as u32,
                    exec_id: i as u64,
                });
                ev.push(Event::StepFinished {
                    index: i as u32,
                    exit_code: Some(0),
                    signal: None,
                    timed_out: false,
                    output_bytes: 0,
                });
            }
            // The engine died after `at` events (at least the lease) and never
            // got further; drop the rest, then recovery reaps.
            let keep = 4 + at % (ev.len() - 3);
            ev.truncate(keep);
            if matches!(ev.last(), Some(Event::StepStarted { .. })) {
                // A step in flight whose sandbox is gone: the agent reported
                // nothing, so recovery records it as killed.
                let index = ev
                    .iter()
                    .filter(|e| matches!(e, Event::StepStarted { .. }))
                    .count() as u32
                    - 1;
                ev.push(Event::RecoveryStarted { engine_pid: 9 });
                ev.push(Event::StepFinished {
                    index,
                    exit_code: None,
                    signal: Some(9),
                    timed_out: false,
                    output_bytes: 0,
                });
            } else {
                ev.push(Event::RecoveryStarted { engine_pid: 9 });
            }
            ev.push(Event::TeardownStarted {
                outcome: Outcome::Lost,
                reason: "sandbox gone".into(),
            });
            ev.push(Event::PoweredOff {});
            ev.push(Event::CleanupStarted {});
            ev.push(Event::CleanupStarted {});
            ev.push(Event::Cleaned {});
            ev.push(Event::Reaped {
                reason: "gone".into(),
            });
            ev.push(Event::Lost {
                reason: "gone".into(),
            });
        }
    }
    ev
}

fn records(events: Vec<Event>) -> Vec<Record> {
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| Record {
            job: 1,
            seq: i as u32 + 1,
            at_ms: 1000 + i as u64,
            event,
        })
        .collect()
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Failed),
        Just(Outcome::Cancelled),
        Just(Outcome::TimedOut)
    ]
}

fn plot() -> impl Strategy<Value = Plot> {
    prop_oneof![
        Just(Plot::Success),
        (0usize..8, outcome()).prop_map(|(k, o)| Plot::StepEnds(k, o)),
        (0usize..9, outcome()).prop_map(|(k, o)| Plot::SetupEnds(k, o)),
        (0usize..40).prop_map(Plot::Reaped),
    ]
}

/// Any event at all, with small field values so collisions happen.
fn any_event() -> impl Strategy<Value = Event> {
    let o = prop_oneof![
        Just(Outcome::Succeeded),
        Just(Outcome::Failed),
        Just(Outcome::Cancelled),
        Just(Outcome::TimedOut),
        Just(Outcome::Lost)
    ];
    prop_oneof![
        (0usize..4).prop_map(|n| Event::Submitted { spec: spec(n) }),
        Just(Event::Queued {}),
        Just(Event::SlotGranted {
            charged: Default::default(),
        }),
        (0u32..3).prop_map(|cid| Event::CidAllocated { cid }),
        Just(Event::SandboxPlanned {
            handle: h(),
            resources: vec![]
        }),
        Just(Event::WorkDirCreated { handle: h() }),
        Just(Event::VolumesFormatted { volumes: vec![] }),
        Just(Event::BootRequested {}),
        Just(Event::VmBooted { handle: h() }),
        Just(Event::AgentConnected { handle: h() }),
        (0u32..4).prop_map(|index| Event::StepStarted { index, exec_id: 1 }),
        (0u32..4, proptest::option::of(-1i32..2), any::<bool>()).prop_map(
            |(index, exit_code, timed_out)| {
                Event::StepFinished {
                    index,
                    exit_code,
                    signal: None,
                    timed_out,
                    output_bytes: 0,
                }
            }
        ),
        Just(Event::CancelRequested { reason: "x".into() }),
        o.clone().prop_map(|outcome| Event::TeardownStarted {
            outcome,
            reason: String::new()
        }),
        Just(Event::Drained {}),
        Just(Event::PoweredOff {}),
        Just(Event::CleanupStarted {}),
        Just(Event::Cleaned {}),
        o.prop_map(|o| Event::terminal(o, String::new())),
        Just(Event::RecoveryStarted { engine_pid: 1 }),
        Just(Event::Reattached { handle: h() }),
        Just(Event::Reaped {
            reason: String::new()
        }),
        Just(Event::RunnerNotice {
            message: "n".into()
        }),
        prop_oneof![Just("a"), Just("b")].prop_map(|name| Event::ArtifactStored {
            name: name.into(),
            size: 1,
            crc32c: 0,
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_legal_path_folds_to_one_terminal(steps in 0usize..6, plot in plot()) {
        let rs = records(path(steps, &plot));
        let state = fold(1, &rs).map_err(|e| TestCaseError::fail(format!("{} in {:?}", e, plot)))?;
        prop_assert_eq!(state.phase, Phase::Terminal);
        prop_assert_eq!(rs.iter().filter(|r| r.event.is_terminal()).count(), 1);
        prop_assert!(state.held_resources().is_empty());
        prop_assert_eq!(state.cid, None);
        // Nothing is accepted after the end.
        let mut after = state.clone();
        let late = Event::RunnerNotice { message: "late".into() };
        prop_assert!(after.apply_mut(0, &late).is_err());
    }

    #[test]
    fn random_sequences_never_panic(events in proptest::collection::vec(any_event(), 0..60)) {
        let mut state = JobState::new(1);
        let mut terminals = 0;
        for (i, e) in events.iter().enumerate() {
            let before = state.clone();
            match state.apply_mut(i as u64, e) {
                Ok(()) => {
                    prop_assert_eq!(state.seq, before.seq + 1);
                    terminals += usize::from(e.is_terminal());
                }
                Err(_) => prop_assert_eq!(&state, &before, "a refused event changed the state"),
            }
        }
        prop_assert!(terminals <= 1);
        prop_assert_eq!(terminals == 1, state.phase == Phase::Terminal);
    }

    #[test]
    fn folding_a_prefix_gives_the_state_at_that_seq(steps in 0usize..5, plot in plot(), cut in 0usize..64) {
        let rs = records(path(steps, &plot));
        let cut = cut % (rs.len() + 1);
        let prefix = fold(1, &rs[..cut]).unwrap();
        prop_assert_eq!(prefix.seq as usize, cut);
        let mut stepwise = JobState::new(1);
        for r in &rs[..cut] {
            stepwise = apply(&stepwise, r).unwrap();
        }
        prop_assert_eq!(prefix, stepwise);
    }
}

/// An artifact is stored only between `Drained` and poweroff, once per name,
/// and the state lists exactly what was stored.
#[test]
fn artifacts_are_stored_only_in_phase_drained_once_each() {
    let rs = records(path(1, &Plot::Success));
    let drained = rs
        .iter()
        .position(|r| matches!(r.event, Event::Drained {}))
        .unwrap();
    let stored = |name: &str| Event::ArtifactStored {
        name: name.into(),
        size: 5,
        crc32c: 9,
    };
    // Before the drain (right after TeardownStarted): refused.
    let before = fold(1, &rs[..drained]).unwrap();
    let err = before.check(&stored("x")).unwrap_err();
    assert!(err.why.contains("after the drain"), "{err}");
    // After it: taken, once per name.
    let mut at = fold(1, &rs[..=drained]).unwrap();
    at.apply_mut(0, &stored("x")).unwrap();
    let err = at.check(&stored("x")).unwrap_err();
    assert!(err.why.contains("already stored"), "{err}");
    at.apply_mut(0, &stored("y")).unwrap();
    let names: Vec<&str> = at.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["x", "y"]);
    assert_eq!(at.artifact("y").map(|a| (a.size, a.crc32c)), Some((5, 9)));
    // After poweroff: refused.
    at.apply_mut(0, &Event::PoweredOff {}).unwrap();
    assert!(at.check(&stored("z")).is_err());
    // The whole successful path, with its one artifact, folds to the end.
    let end = fold(1, &rs).unwrap();
    assert_eq!(end.artifacts.len(), 1);
}

#[test]
fn success_needs_every_step() {
    let mut rs = path(2, &Plot::Success);
    // Drop the second step: success must now be refused.
    rs.retain(|e| {
        !matches!(
            e,
            Event::StepStarted { index: 1, .. } | Event::StepFinished { index: 1, .. }
        )
    });
    let err = fold(1, &records(rs)).unwrap_err();
    assert_eq!(err.event, "TeardownStarted");
    assert!(err.why.contains("every step"), "{err}");
}

#[test]
fn lost_needs_recovery() {
    let mut state = JobState::new(1);
    state
        .apply_mut(0, &Event::Submitted { spec: spec(1) })
        .unwrap();
    let err = state
        .apply_mut(
            1,
            &Event::TeardownStarted {
                outcome: Outcome::Lost,
                reason: String::new(),
            },
        )
        .unwrap_err();
    assert!(err.why.contains("recovery"), "{err}");
}

/// A volume the plan named and `VolumesFormatted` lists again is held once; one
/// only `VolumesFormatted` names is held too.
#[test]
fn a_planned_volume_is_held_once() {
    let mut state = JobState::new(1);
    let events = [
        Event::Submitted { spec: spec(1) },
        Event::Queued {},
        Event::SlotGranted {
            charged: Default::default(),
        },
        Event::CidAllocated { cid: 3 },
        Event::SandboxPlanned {
            handle: h(),
            resources: vec!["workdir /x".into(), "volume /x/work.img (64 MiB)".into()],
        },
        Event::WorkDirCreated { handle: h() },
        Event::VolumesFormatted {
            volumes: vec!["/x/work.img (64 MiB)".into(), "/x/other.img".into()],
        },
    ];
    for (i, e) in events.iter().enumerate() {
        state.apply_mut(i as u64, e).unwrap();
    }
    let held = state.held_resources();
    let work = held.iter().filter(|h| h.contains("/x/work.img")).count();
    assert_eq!(work, 1, "{held:?}");
    assert!(held.iter().any(|h| h.contains("/x/other.img")), "{held:?}");
}
