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

/// A named point armed by an environment variable `<name>[:<n>]`: the
/// process is killed on its `n`th pass (the writer's stages, gc's points).
struct Counted {
    name: &'static str,
    nth: u32,
    seen: AtomicU32,
}

impl Counted {
    fn from_env(env: &str, names: &[&'static str]) -> Option<Counted> {
        let spec = std::env::var(env).ok()?;
        let (name, nth) = spec.split_once(':').unwrap_or((&spec, "1"));
        Some(Counted {
            name: names.iter().copied().find(|n| *n == name)?,
            nth: nth.parse().ok()?,
            seen: AtomicU32::new(0),
        })
    }
}

fn writer_point() -> Option<&'static Counted> {
    static POINT: OnceLock<Option<Counted>> = OnceLock::new();
    POINT
        .get_or_init(|| Counted::from_env(WRITER_ENV, &Stage::ALL.map(Stage::name)))
        .as_ref()
}

/// Kills this process with SIGKILL if the writer's switch names `stage` and
/// this is its `n`th pass.
pub fn writer(stage: Stage) {
    kill_on_nth(writer_point(), stage.name(), WRITER_ENV);
}

/// Kills this process with SIGKILL if `point` is armed, names `name`, and this
/// is its `n`th pass.
fn kill_on_nth(point: Option<&Counted>, name: &str, env: &str) {
    let Some(p) = point else {
        return;
    };
    if p.name == name && p.seen.fetch_add(1, Ordering::SeqCst) + 1 == p.nth {
        eprintln!("reel: {env}: killing the process at {name}");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort();
    }
}

/// The environment variable that arms gc's switch: `REEL_TEST_GC_CRASH=<point>[:<n>]`
/// kills `reel gc` the `n`th time it passes `<point>` (one of [`GC_POINTS`]).
pub const GC_ENV: &str = "REEL_TEST_GC_CRASH";

/// The points of a gc, in the order it passes them (see `store/gc.rs`):
/// `chosen` (the jobs to delete are recorded), `forgetting` (after each job's
/// summary and events are removed from sled, not flushed), `forgotten`
/// (flushed), `files` (after each job's output and artifacts are removed),
/// `copied` (the new journal is written and synced beside the old),
/// `staged` (its length is recorded in sled), `switched` (renamed over the
/// old journal), `checkpointed` (sled's checkpoint follows it; the chosen
/// jobs are still recorded), `compacted` (a new sled store with every record
/// is written beside the old), `exchanged` (swapped in; the old one is still
/// there).
pub const GC_POINTS: [&str; 10] = [
    "chosen",
    "forgetting",
    "forgotten",
    "files",
    "copied",
    "staged",
    "switched",
    "checkpointed",
    "compacted",
    "exchanged",
];

fn gc_point() -> Option<&'static Counted> {
    static POINT: OnceLock<Option<Counted>> = OnceLock::new();
    POINT
        .get_or_init(|| Counted::from_env(GC_ENV, &GC_POINTS))
        .as_ref()
}

/// Kills this process with SIGKILL if gc's switch names `point` and this is
/// its `n`th pass.
pub fn gc(point: &'static str) {
    kill_on_nth(gc_point(), point, GC_ENV);
}
