//! Writes realistic job histories into a state directory so the replay tool has
//! something to show before any runner runs:
//!
//! ```sh
//! cargo run -p reel-engine --example simulate -- /tmp/reel-demo 5
//! cargo run -p reel-cli --bin reel -- --state-dir /tmp/reel-demo jobs
//! ```
//!
//! Job 1 succeeds, job 2 fails at its second step, job 3 is left mid-step (as a
//! killed engine would leave it); the rest alternate.

use std::path::PathBuf;

use reel_engine::store::{EventLog, LogOptions};
use reel_engine::testkit::simulate::{Ending, run_job, spec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: simulate STATE_DIR [JOBS]")?);
    let jobs: u32 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(3);
    let log = EventLog::open(&dir, LogOptions::default())?;
    smol::block_on(async {
        for i in 0..jobs {
            let ending = match i % 3 {
                0 => Ending::Success,
                1 => Ending::FailAt(1),
                _ => Ending::StopAfter(1),
            };
            let id = run_job(&log, spec(&format!("demo-{i}"), 3), i + 1, ending).await?;
            println!("job {id}: {ending:?}");
        }
        Ok::<_, reel_engine::store::LogError>(())
    })?;
    log.close();
    Ok(())
}
