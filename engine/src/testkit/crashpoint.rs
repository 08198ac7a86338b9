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
