//! `GET /metrics`: the Prometheus text format (version 0.0.4), written from
//! the engine's own counters at each scrape.
//!
//! Why by hand and not with `prometheus-client`: every number already lives in
//! the engine (the log's lock-free histograms, the service's counters, the
//! scheduler's view) and is read at scrape time; a registry would keep a second
//! copy of each to be kept in step. The format is a few lines per family.

use std::fmt::Write as _;

use reel_engine::service::Service;
use reel_engine::store::stats::Histogram;

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    let (buckets, count, sum) = h.snapshot();
    for (le, n) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {count}");
}

/// The whole exposition.
pub fn render(svc: &Service) -> String {
    let mut out = String::new();
    let view = svc.sched_view();

    family(
        &mut out,
        "reel_jobs",
        "gauge",
        "Jobs by state: queued (waiting for a slot) and running (holding one) now.",
    );
    let _ = writeln!(out, "reel_jobs{{state=\"queued\"}} {}", view.queued);
    let _ = writeln!(out, "reel_jobs{{state=\"running\"}} {}", view.running);

    family(
        &mut out,
        "reel_jobs_ended_total",
        "counter",
        "Jobs that ended, by outcome (the whole log's history).",
    );
    for (o, n) in svc.ended_counts() {
        let _ = writeln!(
            out,
            "reel_jobs_ended_total{{outcome=\"{}\"}} {n}",
            o.as_str()
        );
    }

    family(
        &mut out,
        "reel_queue_length",
        "gauge",
        "Jobs waiting for a slot, per owner.",
    );
    for (owner, n) in &view.queue_by_owner {
        let _ = writeln!(out, "reel_queue_length{{owner=\"{}\"}} {n}", escape(owner));
    }
    family(
        &mut out,
        "reel_running_jobs",
        "gauge",
        "Jobs holding a slot, per owner.",
    );
    for (owner, n) in &view.running_by_owner {
        let _ = writeln!(out, "reel_running_jobs{{owner=\"{}\"}} {n}", escape(owner));
    }

    family(
        &mut out,
        "reel_budget",
        "gauge",
        "The scheduler's budget per resource (memory and disk in MiB), as total, used and free.",
    );
    for (kind, r) in [
        ("total", view.budget),
        ("used", view.used),
        ("free", view.free),
    ] {
        let _ = writeln!(
            out,
            "reel_budget{{resource=\"memory_mib\",kind=\"{kind}\"}} {}",
            r.memory_mib
        );
        let _ = writeln!(
            out,
            "reel_budget{{resource=\"vcpus\",kind=\"{kind}\"}} {}",
            r.vcpus
        );
        let _ = writeln!(
            out,
            "reel_budget{{resource=\"disk_mib\",kind=\"{kind}\"}} {}",
            r.disk_mib
        );
    }

    let stats = svc.log().stats();
    histogram(
        &mut out,
        "reel_event_append_seconds",
        "From an event's append request to its durable acknowledgement.",
        &stats.append_seconds,
    );
    histogram(
        &mut out,
        "reel_log_round_requests",
        "Requests (events and output chunks) per group-commit round of the log writer.",
        &stats.round_requests,
    );

    let c = svc.counters();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    family(
        &mut out,
        "reel_recovery_total",
        "counter",
        "Jobs of a dead engine taken back since this daemon started, by action.",
    );
    for (action, n) in [
        ("reattach", load(&c.reattached)),
        ("reap", load(&c.reaped)),
        ("finish_teardown", load(&c.teardowns_finished)),
        ("requeue", load(&c.requeued)),
    ] {
        let _ = writeln!(out, "reel_recovery_total{{action=\"{action}\"}} {n}");
    }
    family(
        &mut out,
        "reel_jobs_submitted_total",
        "counter",
        "Jobs submitted to this daemon since it started (idempotent repeats not counted).",
    );
    let _ = writeln!(out, "reel_jobs_submitted_total {}", load(&c.submitted));
    family(
        &mut out,
        "reel_retries_total",
        "counter",
        "New attempts of jobs that ended lost, since this daemon started.",
    );
    let _ = writeln!(out, "reel_retries_total {}", load(&c.retried));
    family(
        &mut out,
        "reel_log_followers",
        "gauge",
        "Step-output follows open now (GET /v1/jobs/{id}/logs responses being sent).",
    );
    let _ = writeln!(out, "reel_log_followers {}", load(&c.followers));
    family(
        &mut out,
        "reel_engine_errors_total",
        "counter",
        "Jobs the engine could not finish (e.g. a failed cleanup), since this daemon started.",
    );
    let _ = writeln!(out, "reel_engine_errors_total {}", load(&c.engine_errors));
    out
}
