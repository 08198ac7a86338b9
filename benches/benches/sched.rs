//! The fair resource scheduler (`lifecycle::sched`) driving a simulated farm.
//!
//! Workload: 10,000 jobs (scaled by `REEL_BENCH_SCALE`, `--quick` shrinks it)
//! submitted one every 10 ms of simulated time, from 10 owners: nine teams
//! share all but ten of them at random, and the owner `small` has only ten,
//! spread evenly through the submission order. Sizes: 70% 256 MiB / 1 vCPU /
//! 1 GiB disk, 25% 2 GiB / 2 vCPUs / 4 GiB, 5% 8 GiB / 4 vCPUs / 16 GiB; the
//! budget is 32 GiB / 8 vCPUs / 100 GiB, so within two minutes everything
//! waits in one backlog of thousands. Each job runs a random simulated time
//! (small 30–120 s, medium 60–300 s, large 120–600 s; a seeded xorshift, the
//! same for every run and scheduler). As the daemon would, the simulation calls
//! `decide` after every submit (`enqueue`), every job end (`release`) and at
//! every `next_wakeup` (aging, 60 s).
//!
//! Baseline, over the same workload in the same run: a plain FIFO (a
//! `VecDeque` that starts jobs in submission order while the first fits: no
//! fair share, no backfill, no aging), called at the same events.
//!
//! Measured: decisions (`decide` calls) and grants per second of wall time for
//! the whole simulation, median of 5 interleaved runs; and, in simulated time,
//! the small owner's longest wait against the mean wait of all jobs, the
//! makespan and the vCPU use. Goals: reel decides ≥ 10,000 times a second, and
//! the small owner's longest wait is shorter under reel than under FIFO and
//! under 5% of the FIFO makespan.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Instant;

use reel_benches::{median, quick, ratio, scaled, thousands, verdict};
use reel_engine::lifecycle::sched::{Policy, Scheduler, Waiting, resources_text};
use reel_engine::model::event::JobId;
use reel_engine::model::spec::Resources;

const RUNS: usize = 5;
const OWNERS: usize = 10;
const SMALL_OWNER: &str = "small";
const SMALL_JOBS: usize = 10;
const SUBMIT_EVERY_MS: u64 = 10;
const SEED: u64 = 0x5eed_1234_abcd_ef01;
const GOAL_DECISIONS: f64 = 10_000.0;
const GOAL_OF_MAKESPAN: f64 = 0.05;

const BUDGET: Resources = Resources {
    memory_mib: 32 * 1024,
    vcpus: 8,
    disk_mib: 100 * 1024,
};

/// (size, share of jobs in %, shortest and longest run in s)
const SIZES: [(Resources, u64, u64, u64); 3] = [
    (
        Resources {
            memory_mib: 256,
            vcpus: 1,
            disk_mib: 1024,
        },
        70,
        30,
        120,
    ),
    (
        Resources {
            memory_mib: 2048,
            vcpus: 2,
            disk_mib: 4096,
        },
        25,
        60,
        300,
    ),
    (
        Resources {
            memory_mib: 8192,
            vcpus: 4,
            disk_mib: 16 * 1024,
        },
        5,
        120,
        600,
    ),
];

/// xorshift64*: a few lines, seeded, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Debug)]
struct Job {
    id: JobId,
    owner: String,
    asked: Resources,
    size: usize,
    queued_ms: u64,
    runs_ms: u64,
}

fn workload(n: usize) -> Vec<Job> {
    let mut rng = Rng(SEED);
    let spacing = n / SMALL_JOBS;
    (0..n)
        .map(|i| {
            let owner = if i % spacing == spacing / 2 {
                SMALL_OWNER.to_string()
            } else {
                format!("team-{}", rng.below(OWNERS as u64 - 1))
            };
            let pick = rng.below(100);
            let size = if pick < SIZES[0].1 {
                0
            } else if pick < SIZES[0].1 + SIZES[1].1 {
                1
            } else {
                2
            };
            let (asked, _, lo, hi) = SIZES[size];
            Job {
                id: i as JobId + 1,
                owner,
                asked,
                size,
                queued_ms: i as u64 * SUBMIT_EVERY_MS,
                runs_ms: (lo + rng.below(hi - lo + 1)) * 1000,
            }
        })
        .collect()
}

/// A scheduler as the simulation drives it.
trait Sim {
    fn submit(&mut self, job: &Job);
    fn end(&mut self, job: JobId);
    fn decide(&mut self, now_ms: u64, started: &mut Vec<JobId>);
    fn wakeup(&self, now_ms: u64) -> Option<u64>;
}

struct Reel(Scheduler);

impl Sim for Reel {
    fn submit(&mut self, job: &Job) {
        self.0
            .enqueue(Waiting {
                job: job.id,
                owner: job.owner.clone(),
                asked: job.asked,
                queued_ms: job.queued_ms,
            })
            .expect("every job fits the budget");
    }

    fn end(&mut self, job: JobId) {
        assert!(self.0.release(job));
    }

    fn decide(&mut self, now_ms: u64, started: &mut Vec<JobId>) {
        started.extend(self.0.decide(now_ms).into_iter().map(|g| g.job));
    }

    fn wakeup(&self, now_ms: u64) -> Option<u64> {
        self.0.next_wakeup(now_ms)
    }
}

/// The baseline: first come, first served, the head blocks.
struct Fifo {
    queue: VecDeque<(JobId, Resources)>,
    running: std::collections::HashMap<JobId, Resources>,
    free: Resources,
}

impl Sim for Fifo {
    fn submit(&mut self, job: &Job) {
        self.queue.push_back((job.id, job.asked));
    }

    fn end(&mut self, job: JobId) {
        let r = self.running.remove(&job).expect("running");
        self.free.memory_mib += r.memory_mib;
        self.free.vcpus += r.vcpus;
        self.free.disk_mib += r.disk_mib;
    }

    fn decide(&mut self, _now_ms: u64, started: &mut Vec<JobId>) {
        while let Some(&(job, r)) = self.queue.front() {
            if r.memory_mib > self.free.memory_mib
                || r.vcpus > self.free.vcpus
                || r.disk_mib > self.free.disk_mib
            {
                break;
            }
            self.queue.pop_front();
            self.free.memory_mib -= r.memory_mib;
            self.free.vcpus -= r.vcpus;
            self.free.disk_mib -= r.disk_mib;
            self.running.insert(job, r);
            started.push(job);
        }
    }

    fn wakeup(&self, _now_ms: u64) -> Option<u64> {
        None
    }
}

/// What one simulation did.
#[derive(Clone, Debug, PartialEq)]
struct Outcome {
    decisions: u64,
    grants: u64,
    wall_s: f64,
    makespan_ms: u64,
    waits_ms: Vec<u64>,
    vcpu_ms: u64,
}

impl Outcome {
    fn same_schedule(&self, o: &Outcome) -> bool {
        (
            self.decisions,
            self.grants,
            self.makespan_ms,
            &self.waits_ms,
        ) == (o.decisions, o.grants, o.makespan_ms, &o.waits_ms)
    }
}

fn simulate(jobs: &[Job], sim: &mut dyn Sim) -> Outcome {
    let mut ends: BinaryHeap<Reverse<(u64, JobId)>> = BinaryHeap::new();
    let mut waits = vec![u64::MAX; jobs.len()];
    let mut used = Resources::default();
    let mut started = Vec::new();
    let (mut decisions, mut grants, mut makespan, mut vcpu_ms) = (0u64, 0u64, 0u64, 0u64);
    let mut next_submit = 0usize;
    let mut timer: Option<u64> = None;
    let start = Instant::now();
    loop {
        let submit_at = jobs.get(next_submit).map(|j| j.queued_ms);
        let end_at = ends.peek().map(|Reverse((t, _))| *t);
        // Ends first, then submits, then the aging timer, at equal times.
        let now = match [end_at, submit_at, timer].into_iter().flatten().min() {
            Some(t) => t,
            None => break,
        };
        if end_at == Some(now) {
            let Reverse((_, job)) = ends.pop().expect("peeked");
            let r = jobs[job as usize - 1].asked;
            used.memory_mib -= r.memory_mib;
            used.vcpus -= r.vcpus;
            used.disk_mib -= r.disk_mib;
            sim.end(job);
            makespan = now;
        } else if submit_at == Some(now) {
            sim.submit(&jobs[next_submit]);
            next_submit += 1;
        }
        // Else the aging timer fired; it is set again below.
        sim.decide(now, &mut started);
        decisions += 1;
        for job in started.drain(..) {
            let j = &jobs[job as usize - 1];
            assert_eq!(waits[job as usize - 1], u64::MAX, "job {job} started twice");
            waits[job as usize - 1] = now - j.queued_ms;
            used.memory_mib += j.asked.memory_mib;
            used.vcpus += j.asked.vcpus;
            used.disk_mib += j.asked.disk_mib;
            assert!(
                used.memory_mib <= BUDGET.memory_mib
                    && used.vcpus <= BUDGET.vcpus
                    && used.disk_mib <= BUDGET.disk_mib,
                "over the budget: {used:?}"
            );
            vcpu_ms += u64::from(j.asked.vcpus) * j.runs_ms;
            ends.push(Reverse((now + j.runs_ms, job)));
            grants += 1;
        }
        timer = sim.wakeup(now);
    }
    let wall_s = start.elapsed().as_secs_f64();
    assert!(waits.iter().all(|w| *w != u64::MAX), "a job never started");
    Outcome {
        decisions,
        grants,
        wall_s,
        makespan_ms: makespan,
        waits_ms: waits,
        vcpu_ms,
    }
}

fn reel() -> Reel {
    Reel(Scheduler::new(Policy::new(BUDGET)))
}

fn fifo() -> Fifo {
    Fifo {
        queue: VecDeque::new(),
        running: Default::default(),
        free: BUDGET,
    }
}

/// Simulated milliseconds as seconds (and hours when long).
fn sim_time(ms: u64) -> String {
    let s = ms as f64 / 1000.0;
    if s >= 3600.0 {
        format!("{s:.0} s ({:.1} h)", s / 3600.0)
    } else {
        format!("{s:.1} s")
    }
}

struct Waits {
    mean_all: f64,
    max_all: u64,
    small_max: u64,
    small_mean: f64,
    large_max: u64,
}

fn waits(jobs: &[Job], o: &Outcome) -> Waits {
    let of = |f: &dyn Fn(&Job) -> bool| -> Vec<u64> {
        jobs.iter()
            .zip(&o.waits_ms)
            .filter(|(j, _)| f(j))
            .map(|(_, w)| *w)
            .collect()
    };
    let all = of(&|_| true);
    let small = of(&|j| j.owner == SMALL_OWNER);
    let large = of(&|j| j.size == 2);
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    Waits {
        mean_all: mean(&all),
        max_all: all.iter().copied().max().unwrap_or(0),
        small_max: small.iter().copied().max().unwrap_or(0),
        small_mean: mean(&small),
        large_max: large.iter().copied().max().unwrap_or(0),
    }
}

fn main() {
    let n = scaled(10_000, 500) as usize;
    let jobs = workload(n);
    let count = |owner: &str| jobs.iter().filter(|j| j.owner == owner).count();
    let sizes: Vec<usize> = (0..SIZES.len())
        .map(|s| jobs.iter().filter(|j| j.size == s).count())
        .collect();
    println!(
        "workload: {} jobs from {OWNERS} owners ({SMALL_OWNER}: {} jobs, the nine teams {}–{}), one submit every {SUBMIT_EVERY_MS} ms{}",
        thousands(n as f64),
        count(SMALL_OWNER),
        (0..OWNERS - 1)
            .map(|k| count(&format!("team-{k}")))
            .min()
            .unwrap_or(0),
        (0..OWNERS - 1)
            .map(|k| count(&format!("team-{k}")))
            .max()
            .unwrap_or(0),
        if quick() { " (quick)" } else { "" }
    );
    for (s, (r, _, lo, hi)) in SIZES.iter().enumerate() {
        println!(
            "  {:>5} x {} (runs {lo}–{hi} s)",
            thousands(sizes[s] as f64),
            resources_text(r)
        );
    }
    println!(
        "budget: {}; aging {} s; median of {RUNS} interleaved runs",
        resources_text(&BUDGET),
        Policy::new(BUDGET).aging_ms / 1000
    );

    // Warm up (allocations, caches).
    simulate(&jobs, &mut reel());
    simulate(&jobs, &mut fifo());

    let mut reel_runs: Vec<Outcome> = Vec::new();
    let mut fifo_runs: Vec<Outcome> = Vec::new();
    for run in 0..RUNS {
        reel_runs.push(simulate(&jobs, &mut reel()));
        fifo_runs.push(simulate(&jobs, &mut fifo()));
        eprintln!("run {}/{RUNS} done", run + 1);
    }
    for runs in [&reel_runs, &fifo_runs] {
        assert!(
            runs.iter().all(|o| o.same_schedule(&runs[0])),
            "a simulation is not deterministic"
        );
    }

    let rate = |runs: &[Outcome], f: fn(&Outcome) -> u64| {
        let v: Vec<f64> = runs.iter().map(|o| f(o) as f64 / o.wall_s).collect();
        (median(&v), v)
    };
    let fmt_runs = |v: &[f64]| {
        v.iter()
            .map(|r| thousands(*r))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (reel_dps, reel_dps_runs) = rate(&reel_runs, |o| o.decisions);
    let (fifo_dps, fifo_dps_runs) = rate(&fifo_runs, |o| o.decisions);
    let (reel_gps, _) = rate(&reel_runs, |o| o.grants);
    let (fifo_gps, _) = rate(&fifo_runs, |o| o.grants);
    let wall = |runs: &[Outcome]| median(&runs.iter().map(|o| o.wall_s * 1e3).collect::<Vec<_>>());

    println!();
    println!(
        "{:<16} {:>12} {:>10} {:>9} {:>10}   decisions/s per run",
        "scheduler", "decisions/s", "grants/s", "wall ms", "decisions"
    );
    for (name, dps, gps, runs, per_run) in [
        ("reel sched", reel_dps, reel_gps, &reel_runs, &reel_dps_runs),
        (
            "FIFO baseline",
            fifo_dps,
            fifo_gps,
            &fifo_runs,
            &fifo_dps_runs,
        ),
    ] {
        println!(
            "{:<16} {:>12} {:>10} {:>9.1} {:>10}   [{}]",
            name,
            thousands(dps),
            thousands(gps),
            wall(runs),
            thousands(runs[0].decisions as f64),
            fmt_runs(per_run)
        );
    }
    println!(
        "decisions: one per submit and per job end, and (reel only) one per aging timer of next_wakeup"
    );
    println!(
        "reel / FIFO decisions/s: {} (the FIFO looks at nothing but its head)",
        ratio(reel_dps, fifo_dps)
    );

    let (r, f) = (&reel_runs[0], &fifo_runs[0]);

    let (rw, fw) = (waits(&jobs, r), waits(&jobs, f));
    println!();
    println!("simulated time          reel sched                FIFO baseline");
    let row = |what: &str, a: String, b: String| println!("{what:<23} {a:<25} {b}");
    row("makespan", sim_time(r.makespan_ms), sim_time(f.makespan_ms));
    let util = |o: &Outcome| {
        format!(
            "{:.1}%",
            100.0 * o.vcpu_ms as f64 / (f64::from(BUDGET.vcpus) * o.makespan_ms as f64)
        )
    };
    row("vCPU use", util(r), util(f));
    row(
        "mean wait, all jobs",
        sim_time(rw.mean_all as u64),
        sim_time(fw.mean_all as u64),
    );
    row(
        "longest wait, all",
        sim_time(rw.max_all),
        sim_time(fw.max_all),
    );
    row(
        "longest wait, large",
        sim_time(rw.large_max),
        sim_time(fw.large_max),
    );
    row(
        &format!("{SMALL_OWNER} owner: mean wait"),
        sim_time(rw.small_mean as u64),
        sim_time(fw.small_mean as u64),
    );
    row(
        &format!("{SMALL_OWNER} owner: longest"),
        sim_time(rw.small_max),
        sim_time(fw.small_max),
    );
    row(
        "  / mean wait, all",
        format!("{:.3}", rw.small_max as f64 / rw.mean_all),
        format!("{:.3}", fw.small_max as f64 / fw.mean_all),
    );
    row(
        "  / FIFO makespan",
        format!("{:.2}%", 100.0 * rw.small_max as f64 / f.makespan_ms as f64),
        format!("{:.2}%", 100.0 * fw.small_max as f64 / f.makespan_ms as f64),
    );

    println!();
    let fast = reel_dps >= GOAL_DECISIONS;
    let shorter = rw.small_max < fw.small_max;
    let bound = GOAL_OF_MAKESPAN * f.makespan_ms as f64;
    let within = (rw.small_max as f64) < bound;
    println!(
        "goal: reel decisions/s >= {}: {} ({})",
        thousands(GOAL_DECISIONS),
        thousands(reel_dps),
        verdict(fast)
    );
    println!(
        "goal: {SMALL_OWNER} owner's longest wait, reel < FIFO: {} < {} ({})",
        sim_time(rw.small_max),
        sim_time(fw.small_max),
        verdict(shorter)
    );
    println!(
        "goal: {SMALL_OWNER} owner's longest wait, reel < {:.0}% of the FIFO makespan: {} < {} ({})",
        GOAL_OF_MAKESPAN * 100.0,
        sim_time(rw.small_max),
        sim_time(bound as u64),
        verdict(within)
    );
    println!("goal overall: {}", verdict(fast && shorter && within));
}
