//! `reel serve`: the daemon's life — token, recovery, listeners, the
//! endpoint file the CLI finds it by, signals and the drain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use reel_engine::lifecycle::executor::Executor;
use reel_engine::service::{Service, ServiceOptions};

use crate::api::Api;
use crate::http::{self, Limits, Server, Token};

/// The TCP address `reel serve` listens on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7117";

/// How long running jobs get to finish after SIGTERM, by default.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(300);

/// How long open connections get to finish after the jobs are done.
const CONNECTION_GRACE: Duration = Duration::from_secs(2);

/// The daemon's files under the state directory.
pub fn serve_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("serve")
}

/// The bearer token's file.
pub fn token_path(state_dir: &Path) -> PathBuf {
    serve_dir(state_dir).join("token")
}

/// Where a running daemon says how to reach it (`{"url", "socket", "pid"}`).
pub fn endpoint_path(state_dir: &Path) -> PathBuf {
    serve_dir(state_dir).join("endpoint.json")
}

/// How the daemon runs.
#[derive(Debug)]
pub struct DaemonOptions {
    /// The state directory.
    pub state_dir: PathBuf,
    /// TCP address (loopback by default).
    pub listen: SocketAddr,
    /// A unix socket too.
    pub socket: Option<PathBuf>,
    /// Request and connection bounds.
    pub limits: Limits,
    /// How long running jobs get after SIGTERM before they are cancelled.
    pub drain: Duration,
    /// The service's scheduler policy and secrets.
    pub service: ServiceOptions,
}

/// Runs the daemon until SIGTERM or SIGINT (then drains; a second signal
/// cancels at once). Returns once every job task has stopped.
pub fn run(ex: Arc<Executor>, opts: DaemonOptions) -> Result<()> {
    smol::block_on(run_async(ex, opts))
}

async fn run_async(ex: Arc<Executor>, opts: DaemonOptions) -> Result<()> {
    let (token, created) =
        Token::load_or_create(&token_path(&opts.state_dir)).with_context(|| {
            format!(
                "cannot set up the token in {}",
                token_path(&opts.state_dir).display()
            )
        })?;
    if created {
        eprintln!(
            "reel serve: a new bearer token was written to {} (mode 0600)",
            token_path(&opts.state_dir).display()
        );
    } else {
        eprintln!(
            "reel serve: bearer token: {}",
            token_path(&opts.state_dir).display()
        );
    }
    let tcp = async_net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let local = tcp.local_addr()?;
    let unix = match &opts.socket {
        Some(p) => {
            Some(http::bind_unix(p).with_context(|| format!("cannot listen on {}", p.display()))?)
        }
        None => None,
    };
    let signals =
        async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])
            .context("cannot install the signal handler")?;

    // Recovery first: every job a dead engine left is taken back before any
    // request is answered.
    let (svc, report) = Service::start(ex.clone(), opts.service)
        .await
        .context("cannot start the service")?;
    for (job, action, why) in &report.recovered {
        tracing::info!(job, action, "recovered: {why}");
    }
    for (job, next) in &report.retried {
        tracing::info!(job, next, "lost job submitted again");
    }

    let url = format!("http://{local}");
    write_endpoint(&opts.state_dir, &url, opts.socket.as_deref())?;
    tracing::info!(%url, socket = ?opts.socket, "reel serve: listening");
    eprintln!("reel serve: listening on {url}");
    eprintln!(
        "reel serve: web view at {url}/ (sign in with the token in {})",
        token_path(&opts.state_dir).display()
    );

    let api = Api::new(svc.clone());
    let server = Arc::new(Server::new(
        api.clone(),
        Some(token.clone()),
        opts.limits.clone(),
    ));
    let unix_server = Arc::new(Server::new(api, None, opts.limits.clone()));
    // Closed to stop the listeners: every clone's `recv` then ends.
    let (stop, stopping) = async_channel::bounded::<()>(1);
    let stop_fut = || {
        let stopping = stopping.clone();
        async move {
            let _ = stopping.recv().await;
        }
    };
    let tcp_task = {
        let (server, fut) = (server.clone(), stop_fut());
        smol::spawn(async move { server.serve_tcp(tcp, fut).await })
    };
    let unix_task = unix.map(|l| {
        let (server, fut) = (unix_server.clone(), stop_fut());
        smol::spawn(async move { server.serve_unix(l, fut).await })
    });

    // The first signal drains; a second one cancels what still runs.
    use smol::stream::StreamExt;
    let mut signals = signals;
    let first = signals.next().await;
    tracing::warn!(
        signal = ?first.and_then(Result::ok),
        running = svc.running(),
        deadline_s = opts.drain.as_secs(),
        "draining: no new jobs; running jobs get until the deadline, then are cancelled"
    );
    eprintln!(
        "reel serve: draining ({} running); a second signal cancels them now",
        svc.running()
    );
    let second = async {
        let _ = signals.next().await;
        tracing::warn!("second signal: cancelling every running job now");
    };
    svc.drain(opts.drain, second).await;
    stop.close();
    let _ = tcp_task.await;
    if let Some(t) = unix_task {
        let _ = t.await;
    }
    // Responses under way (a log being followed) get a moment to finish.
    let cut = server.drain(CONNECTION_GRACE).await + unix_server.drain(CONNECTION_GRACE).await;
    if cut > 0 {
        tracing::info!(
            connections = cut,
            "connections still open at exit were closed"
        );
    }
    let _ = std::fs::remove_file(endpoint_path(&opts.state_dir));
    if let Some(p) = &opts.socket {
        let _ = std::fs::remove_file(p);
    }
    ex.log().close();
    eprintln!("reel serve: stopped");
    Ok(())
}

/// Writes the endpoint file atomically (a temp file renamed over it).
fn write_endpoint(state_dir: &Path, url: &str, socket: Option<&Path>) -> Result<()> {
    let path = endpoint_path(state_dir);
    let v = serde_json::json!({
        "url": url,
        "socket": socket.map(|p| p.display().to_string()),
        "pid": std::process::id(),
    });
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&v)?)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}
