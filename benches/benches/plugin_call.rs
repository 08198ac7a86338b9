//! The cost of the plugin boundary.
//!
//! 1. A no-op operation (`probe` of a planned job) through the loaded template
//!    cdylib, against the same method of the template called in-process (baseline).
//! 2. 1 MiB output chunks from a plugin through the host output callback into a sink
//!    that copies them, against the same sink called in-process (baseline).
//!
//! The cdylibs are built in release mode by a nested cargo with its own target
//! directory (`target/plugin-bench`) before anything is timed.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use reel_engine::plugin::{self, JobRequest, RunnerConfig, StepRequest};
use reel_plugin_sdk::{OutputSink, Runner, Stream};
use reel_runner_template::TemplateRunner;

const ROUNDS: usize = 7;
const CALLS: u32 = 100_000;
const CHUNKS: u64 = 256;
const MIB: u64 = 1 << 20;

fn cargo_build(root: &Path, target: &Path, args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args(["build", "--release"])
        .args(args)
        .current_dir(root)
        .env("CARGO_TARGET_DIR", target)
        .status()
        .context("cannot run cargo")?;
    ensure!(status.success(), "cargo build {args:?} failed");
    Ok(())
}

/// The median of `ROUNDS` timings of `f`.
fn median(mut f: impl FnMut() -> Duration) -> Duration {
    let mut times: Vec<Duration> = (0..ROUNDS).map(|_| f()).collect();
    times.sort();
    times[ROUNDS / 2]
}

/// Copies every chunk into a reusable buffer, as a log writer would.
struct CopySink {
    buf: Vec<u8>,
    bytes: u64,
}

impl OutputSink for CopySink {
    fn chunk(&mut self, _stream: Stream, _offset: u64, bytes: &[u8]) {
        self.buf.clear();
        self.buf.extend_from_slice(bytes);
        self.bytes += black_box(&self.buf).len() as u64;
    }
}

fn main() -> anyhow::Result<()> {
    let root: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("benches has no parent")?
        .to_path_buf();
    let target = root.join("target/plugin-bench");
    let manifest = root.join("Cargo.toml");
    cargo_build(
        &root,
        &target,
        &[
            "-p",
            "reel-runner-template",
            "--manifest-path",
            manifest.to_str().context("path")?,
        ],
    )?;
    let firehose = root.join("tests/fixtures/plugins/firehose/Cargo.toml");
    cargo_build(
        &root,
        &target,
        &["--manifest-path", firehose.to_str().context("path")?],
    )?;

    let dir = tempfile::tempdir()?;
    for lib in ["libreel_runner_template.so", "libreel_fixture_firehose.so"] {
        std::fs::copy(target.join("release").join(lib), dir.path().join(lib))?;
    }
    let set = plugin::load_dir(dir.path());
    ensure!(set.refusals().is_empty(), "refused: {:?}", set.refusals());
    let sandbox = tempfile::tempdir()?;
    let config = RunnerConfig {
        sandbox_root: sandbox.path().to_path_buf(),
        plugin_dir: dir.path().to_path_buf(),
        options: Default::default(),
    };

    // 1. A no-op call.
    let loaded = set.instantiate("template", &config)?;
    let direct = TemplateRunner::new(&config)?;
    let job = JobRequest {
        job_id: 1,
        sandbox_id: 1,
        name: "bench".to_owned(),
        ..Default::default()
    };
    let handle = direct.plan(&job)?;
    ensure!(
        loaded.plan(&job)? == handle,
        "the cdylib and the rlib plan differently"
    );
    let per_call = |f: &dyn Fn()| {
        median(|| {
            let start = Instant::now();
            for _ in 0..CALLS {
                f();
            }
            start.elapsed() / CALLS
        })
    };
    let direct_ns = per_call(&|| {
        black_box(direct.probe(black_box(&handle)).unwrap());
    })
    .as_nanos();
    let loaded_ns = per_call(&|| {
        black_box(loaded.probe(black_box(&handle)).unwrap());
    })
    .as_nanos();
    println!("plugin_call/probe  in-process (baseline): {direct_ns:>6} ns/call");
    println!("plugin_call/probe  through the cdylib:    {loaded_ns:>6} ns/call");
    println!(
        "plugin_call/probe  ratio cdylib/in-process: {:.1}x (median of {ROUNDS} rounds of {CALLS} calls)",
        loaded_ns as f64 / direct_ns.max(1) as f64
    );

    // 2. 1 MiB output chunks.
    let firehose = set.instantiate("firehose", &config)?;
    let step = StepRequest {
        command: CHUNKS.to_string(),
        ..Default::default()
    };
    let fh_handle = firehose.plan(&job)?;
    let mut sink = CopySink {
        buf: Vec::with_capacity(MIB as usize),
        bytes: 0,
    };
    let chunk = vec![0xa5u8; MIB as usize];
    let gbps = |d: Duration| (CHUNKS * MIB) as f64 / d.as_secs_f64() / 1e9;
    let direct_t = median(|| {
        let start = Instant::now();
        for i in 0..CHUNKS {
            sink.chunk(Stream::Stdout, i * MIB, black_box(&chunk));
        }
        start.elapsed()
    });
    let loaded_t = median(|| {
        let start = Instant::now();
        let result = firehose.exec(&fh_handle, &step, &mut sink).unwrap();
        assert_eq!(result.output_bytes, CHUNKS * MIB);
        start.elapsed()
    });
    println!(
        "plugin_call/output 1 MiB chunks, in-process sink (baseline): {:>6.2} GB/s",
        gbps(direct_t)
    );
    println!(
        "plugin_call/output 1 MiB chunks, through the callback:       {:>6.2} GB/s",
        gbps(loaded_t)
    );
    println!(
        "plugin_call/output ratio callback/in-process: {:.2}x throughput ({CHUNKS} chunks per round)",
        gbps(loaded_t) / gbps(direct_t)
    );
    black_box(sink.bytes);
    Ok(())
}
