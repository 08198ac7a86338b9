//! A test switch that kills the engine with a real SIGKILL immediately before or
//! after a chosen lifecycle event is made durable.
//!
//! Set `REEL_TEST_CRASH_AT=<Event>:<before|after>[:<n>]`, e.g.
//! `REEL_TEST_CRASH_AT=StepStarted:after:2` kills the process right after the
//! second `StepStarted` it appends is acknowledged. `<Event>` is a variant name of
//! `Event` (as `reel replay` prints it). Unset (the default), it costs one
//! relaxed atomic load per append. The crash-matrix tests use it; it is not meant
//! for production and is named so that nobody sets it by accident.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::model::event::Event;

/// The environment variable that arms the switch.
pub const ENV: &str = "REEL_TEST_CRASH_AT";

/// When, relative to the event being durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// Before the event is sent to the log: it never lands.
    Before,
    /// After the log acknowledged it: it is durable, nothing after it happened.
    After,
}

#[derive(Debug)]
struct Point {
    event: String,
    when: When,
    nth: u32,
    seen: AtomicU32,
}

fn point() -> Option<&'static Point> {
    static POINT: OnceLock<Option<Point>> = OnceLock::new();
    POINT
        .get_or_init(|| {
            let spec = std::env::var(ENV).ok()?;
            let mut parts = spec.split(':');
            let event = parts.next()?.to_string();
            let when = match parts.next()? {
                "before" => When::Before,
                "after" => When::After,
                _ => return None,
            };
            let nth = parts.next().and_then(|n| n.parse().ok()).unwrap_or(1);
            Some(Point {
                event,
                when,
                nth,
                seen: AtomicU32::new(0),
            })
        })
        .as_ref()
}

/// Whether the switch is set at all.
pub fn armed() -> bool {
    point().is_some()
}

/// Kills this process with SIGKILL if the switch names this event and moment.
pub fn check(event: &Event, when: When) {
    let Some(p) = point() else {
        return;
    };
    if p.event != event.name() {
        return;
    }
    // Count occurrences once, at `before`, which every append passes.
    let n = if when == When::Before {
        p.seen.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        p.seen.load(Ordering::SeqCst)
    };
    if p.when == when && n == p.nth {
        eprintln!("reel: {ENV}: killing the engine {when:?} {}", event.name());
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; this is never reached.
        std::process::abort();
    }
}

/// The environment variable that arms the writer's switch:
/// `REEL_TEST_WRITER_CRASH=<stage>:<n>` kills the engine the `n`th time the
/// log's writer passes `<stage>` (see [`Stage`]) in a round that holds events.
pub const WRITER_ENV: &str = "REEL_TEST_WRITER_CRASH";

/// A point inside the writer's commit of a round, in the order a round passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The round's journal frames are written, not synced.
    Written,
    /// The journal is synced; no caller has its answer, sled has nothing.
    Synced,
    /// Every caller has its answer; sled's trees have nothing of the round.
    Acked,
    /// The round's events are in sled's `events` tree.
    Events,
    /// … and its summaries in `jobs`.
    Jobs,
    /// … and its changes to `live` (the `meta` checkpoint is not written).
    Live,
    /// Everything is in sled's trees; sled has not flushed it.
    Applied,
}

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 7] = [
        Stage::Written,
        Stage::Synced,
        Stage::Acked,
        Stage::Events,
        Stage::Jobs,
        Stage::Live,
        Stage::Applied,
    ];

    /// Its name in [`WRITER_ENV`].
    pub fn name(self) -> &'static str {
        match self {
            Stage::Written => "written",
            Stage::Synced => "synced",
            Stage::Events => "events",
            Stage::Jobs => "jobs",
            Stage::Live => "live",
            Stage::Applied => "applied",
            Stage::Acked => "acked",
        }
    }
}

struct WriterPoint {
    stage: &'static str,
    nth: u32,
    seen: AtomicU32,
}

fn writer_point() -> Option<&'static WriterPoint> {
    static POINT: OnceLock<Option<WriterPoint>> = OnceLock::new();
    POINT
        .get_or_init(|| {
            let spec = std::env::var(WRITER_ENV).ok()?;
            let (stage, nth) = spec.split_once(':').unwrap_or((&spec, "1"));
            let stage = Stage::ALL.into_iter().find(|s| s.name() == stage)?.name();
            Some(WriterPoint {
                stage,
                nth: nth.parse().ok()?,
                seen: AtomicU32::new(0),
            })
        })
        .as_ref()
}

/// Kills this process with SIGKILL if the writer's switch names `stage` and
/// this is its `n`th pass.
pub fn writer(stage: Stage) {
    let Some(p) = writer_point() else {
        return;
    };
    if p.stage == stage.name() && p.seen.fetch_add(1, Ordering::SeqCst) + 1 == p.nth {
        eprintln!("reel: {WRITER_ENV}: killing the engine at {}", p.stage);
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort();
    }
}
