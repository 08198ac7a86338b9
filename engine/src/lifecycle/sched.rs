//! The fair resource scheduler: which waiting jobs start, out of a budget of
//! memory, vCPUs and disk.
//!
//! Pure: no IO and no clock (the caller passes `now_ms`), except
//! [`machine_budget`], which reads the machine's defaults. The daemon drives it:
//! on every event (a submit, a job's end, a cancel) and when the timer of
//! [`Scheduler::next_wakeup`] fires it calls [`Scheduler::decide`], then logs
//! `SlotGranted` for each [`Grant`] and starts the job.
//!
//! # The policy, for the farm's operator
//!
//! - **Charges.** A job is charged what its spec asks for; a field it leaves at 0
//!   ("runner default") is charged [`Policy::default_request`] (by default 512 MiB
//!   memory, 1 vCPU, 1 GiB disk). A job whose charge exceeds the *whole* budget in
//!   any resource could never run and is refused at submit ([`TooLarge`]).
//! - **Fair share between owners** (dominant resource fairness). Each owner (the
//!   spec's `owner`) has a *dominant share*: the largest, over memory, vCPUs and
//!   disk, of what its running jobs are charged divided by the budget. The next
//!   job to start comes from the waiting owner with the smallest dominant share;
//!   ties go to the owner with fewer jobs waiting, then to the one whose first
//!   waiting job was queued earliest, then to the smaller job id. An owner with
//!   500 jobs waiting cannot starve an owner with one: as soon as that one job
//!   waits, its owner's share (smaller while it runs less) puts it first for the
//!   next slot it fits in. The waiting count comes before the age because with
//!   more owners than slots most owners run nothing (share 0) most of the time:
//!   between them, the oldest first job would be first-come-first-served across
//!   owners, and the one-job owner would wait for the backlog submitted before
//!   it (measured: `benches/benches/sched.rs`, the same longest wait as FIFO).
//! - **First in, first out within an owner**, by job id (submission order),
//!   whatever order overlapping submissions reach the scheduler in: the order
//!   a restarted daemon rebuilds from the log.
//! - **Backfill** (work-conserving): when the chosen owner's first job does not
//!   fit what is free, its later jobs are tried, then the next owner's, in
//!   fair-share order; any job that fits starts, so resources never sit idle
//!   while a waiting job would fit. To keep a decision cheap with 10,000 jobs
//!   waiting, only each owner's first [`SEARCH_DEPTH`] (64) waiting jobs are
//!   looked at: a small job behind 64 larger ones of the same owner waits for
//!   one of them to start.
//! - **Aging** (no starvation of large jobs). A job that has waited longer than
//!   [`Policy::aging_ms`] (default 60 s) and does not fit what is free becomes the
//!   *reservation holder* when a decision is about to start another job past it:
//!   of the aged jobs the fair-share walk passed over before it found one that
//!   fits, the first — the one of the owner with the smallest share, that
//!   owner's earliest. Its request is set aside: any other job starts only if it
//!   fits in what is free *minus* the held request, which usually means nothing
//!   starts until the holder has. The holder starts as soon as it fits (before
//!   anything else); then the next aged job that is passed over, if any, holds.
//!   Only a job that does not fit and is being overtaken holds: aged jobs that
//!   fit keep their fair-share order, and a decision that starts nothing
//!   reserves nothing, so a backlog in which every job has aged stays fair
//!   between owners. (The holder is chosen in fair-share order rather than
//!   strictly the oldest aged job: with the oldest, one owner's backlog of old
//!   large jobs would take every reservation before a newer owner's one large
//!   job, which is the starvation fair share is there to prevent.) The holder
//!   is the scheduler's memory; a restarted scheduler finds one again at its
//!   first decision that would overtake an aged job. [`Grant::aged`] says
//!   whether a job started past its aging time; the daemon calls
//!   [`Scheduler::decide`] at [`Scheduler::next_wakeup`] so that a job ages
//!   without another event.
//! - **Jobs already running** when the scheduler starts (reattached after a
//!   restart) count against the budget ([`Scheduler::charge_running`]). They may
//!   exceed it (the budget was lowered); then nothing new starts until enough of
//!   them end.
//!
//! Apart from the holder, the scheduler keeps no memory of its past: a new
//! scheduler charged the same running jobs and fed the same waiting jobs in the
//! same order decides exactly as the old one would have (no hash order, no
//! clock of its own; `engine/tests/sched_props.rs` checks it).
//!
//! A decision costs, per job started (and once more per reservation taken), a
//! sort of the waiting owners and at most [`SEARCH_DEPTH`] fit checks per
//! waiting owner: a few microseconds with 10,000 jobs waiting from 10 owners.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::Serialize;

use crate::model::event::JobId;
use crate::model::spec::Resources;

/// How many of each owner's waiting jobs a decision looks at.
pub const SEARCH_DEPTH: usize = 64;

/// The default aging time: a job waiting longer than this may hold a reservation.
pub const DEFAULT_AGING_MS: u64 = 60_000;

/// What a job is charged for a resource it leaves at 0 (runner default).
pub const DEFAULT_REQUEST: Resources = Resources {
    memory_mib: 512,
    vcpus: 1,
    disk_mib: 1024,
};

/// The scheduler's rules: the budget, the default charge, the aging time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    /// The whole budget.
    pub budget: Resources,
    /// Charged for a 0 ("runner default") field of a request.
    pub default_request: Resources,
    /// A waiter older than this (ms) that does not fit reserves its request.
    pub aging_ms: u64,
}

impl Policy {
    /// `budget` with [`DEFAULT_REQUEST`] and [`DEFAULT_AGING_MS`].
    pub fn new(budget: Resources) -> Policy {
        Policy {
            budget,
            default_request: DEFAULT_REQUEST,
            aging_ms: DEFAULT_AGING_MS,
        }
    }

    /// What a job asking for `asked` is charged: its 0 fields filled with
    /// [`Policy::default_request`].
    pub fn charge(&self, asked: &Resources) -> Resources {
        let d = &self.default_request;
        Resources {
            memory_mib: if asked.memory_mib == 0 {
                d.memory_mib
            } else {
                asked.memory_mib
            },
            vcpus: if asked.vcpus == 0 {
                d.vcpus
            } else {
                asked.vcpus
            },
            disk_mib: if asked.disk_mib == 0 {
                d.disk_mib
            } else {
                asked.disk_mib
            },
        }
    }
}

/// A job larger than the whole budget in some resource: it could never run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the job asks for {} but the whole budget is {}: it could never run",
    resources_text(.asked),
    resources_text(.budget)
)]
pub struct TooLarge {
    /// What the job would be charged (its request, 0 fields filled with the defaults).
    pub asked: Resources,
    /// The whole budget.
    pub budget: Resources,
}

/// `n` MiB as people read it: `64 GiB` when it is whole GiB, else `1536 MiB`.
pub fn mib_text(n: u64) -> String {
    if n > 0 && n.is_multiple_of(1024) {
        format!("{} GiB", n / 1024)
    } else {
        format!("{n} MiB")
    }
}

/// `64 GiB memory, 4 vCPUs, 1 GiB disk`.
pub fn resources_text(r: &Resources) -> String {
    format!(
        "{} memory, {} vCPU{}, {} disk",
        mib_text(r.memory_mib),
        r.vcpus,
        if r.vcpus == 1 { "" } else { "s" },
        mib_text(r.disk_mib)
    )
}

/// A job waiting for resources, as the caller hands it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The job.
    pub job: JobId,
    /// Its owner (the fair-share key).
    pub owner: String,
    /// Its request, as submitted (0 fields: runner default).
    pub asked: Resources,
    /// When it was queued (Unix ms): its age, for aging and ties.
    pub queued_ms: u64,
}

/// A job the scheduler started: log `SlotGranted`, then run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The job.
    pub job: JobId,
    /// Its owner.
    pub owner: String,
    /// What it is charged until [`Scheduler::release`].
    pub charged: Resources,
    /// How long it waited (ms).
    pub waited_ms: u64,
    /// Whether it had waited past the aging time.
    pub aged: bool,
}

/// What the scheduler holds, for status views.
#[derive(Debug, Clone, Serialize)]
pub struct SchedView {
    /// The whole budget.
    pub budget: Resources,
    /// Charged to running jobs (may exceed the budget after
    /// [`Scheduler::charge_running`] over-committed it).
    pub used: Resources,
    /// The budget minus what is used (0 where over-committed).
    pub free: Resources,
    /// Jobs waiting.
    pub queued: usize,
    /// Jobs running.
    pub running: usize,
    /// Jobs waiting, per owner (owners with none are left out).
    pub queue_by_owner: BTreeMap<String, usize>,
    /// Jobs running, per owner (owners with none are left out).
    pub running_by_owner: BTreeMap<String, usize>,
    /// The reservation holder, if a job holds one.
    pub reserved_for: Option<JobId>,
}

#[derive(Debug, Clone)]
struct Queued {
    job: JobId,
    charged: Resources,
    queued_ms: u64,
}

#[derive(Debug, Default)]
struct Owner {
    /// Waiting jobs by job id: submission order (FIFO), the order a restart rebuilds.
    queue: BTreeMap<u64, Queued>,
    /// Charged to its running jobs.
    used: Resources,
    running: usize,
}

#[derive(Debug, Clone)]
enum Place {
    Queued { owner: String, seq: u64 },
    Running { owner: String, charged: Resources },
}

/// The scheduler: waiting jobs per owner, running jobs' charges, the reservation.
#[derive(Debug)]
pub struct Scheduler {
    policy: Policy,
    owners: BTreeMap<String, Owner>,
    jobs: HashMap<JobId, Place>,
    /// Every waiting job by (queued_ms, job): the aging order.
    ages: BTreeSet<(u64, JobId)>,
    used: Resources,
    queued: usize,
    running: usize,
    reserved_for: Option<JobId>,
}

impl Scheduler {
    /// An empty scheduler with `policy`.
    pub fn new(policy: Policy) -> Scheduler {
        Scheduler {
            policy,
            owners: BTreeMap::new(),
            jobs: HashMap::new(),
            ages: BTreeSet::new(),
            used: Resources::default(),
            queued: 0,
            running: 0,
            reserved_for: None,
        }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// What a job asking for `asked` is charged, or why it could never run:
    /// its charge exceeds the whole budget in some resource.
    pub fn check(&self, asked: &Resources) -> Result<Resources, TooLarge> {
        let charged = self.policy.charge(asked);
        if fits(&charged, &self.policy.budget) {
            Ok(charged)
        } else {
            Err(TooLarge {
                asked: charged,
                budget: self.policy.budget,
            })
        }
    }

    /// Queues a job behind its owner's other waiting jobs, or refuses it as
    /// [`TooLarge`] (nothing changes then). A job the scheduler already knows
    /// (waiting or running) is taken out first and queued again in its place.
    pub fn enqueue(&mut self, w: Waiting) -> Result<(), TooLarge> {
        let charged = self.check(&w.asked)?;
        self.forget(w.job);
        // Within an owner, waiters go in job-id (submission) order, however
        // their submissions interleaved: the order a restarted scheduler
        // rebuilds from the log.
        let seq = w.job;
        self.ages.insert((w.queued_ms, w.job));
        self.owners
            .entry(w.owner.clone())
            .or_default()
            .queue
            .insert(
                seq,
                Queued {
                    job: w.job,
                    charged,
                    queued_ms: w.queued_ms,
                },
            );
        self.jobs.insert(
            w.job,
            Place::Queued {
                owner: w.owner,
                seq,
            },
        );
        self.queued += 1;
        Ok(())
    }

    /// Takes a waiting job out (it was cancelled); whether it was waiting.
    pub fn remove(&mut self, job: JobId) -> bool {
        if !self.is_queued(job) {
            return false;
        }
        self.unqueue(job);
        true
    }

    /// Counts a job that already runs (reattached after a restart) against the
    /// budget, charged `charged` (0 fields filled with the defaults). The
    /// budget may be exceeded; then nothing new starts until enough ends. A job
    /// still waiting is taken out of its queue; one already running is charged
    /// anew.
    pub fn charge_running(&mut self, job: JobId, owner: &str, charged: Resources) {
        self.forget(job);
        let charged = self.policy.charge(&charged);
        self.start(job, owner.to_string(), charged);
    }

    /// A running job ended: frees its charge. Whether it was running.
    pub fn release(&mut self, job: JobId) -> bool {
        let Some(Place::Running { owner, charged }) = self.jobs.get(&job) else {
            return false;
        };
        let (owner, charged) = (owner.clone(), *charged);
        self.jobs.remove(&job);
        self.used = sub(&self.used, &charged);
        self.running -= 1;
        if let Some(o) = self.owners.get_mut(&owner) {
            o.used = sub(&o.used, &charged);
            o.running -= 1;
        }
        self.drop_if_idle(&owner);
        true
    }

    /// Starts as many waiting jobs as fit, by the policy of the module doc, and
    /// returns them in the order they started; they count as running from now.
    pub fn decide(&mut self, now_ms: u64) -> Vec<Grant> {
        let mut grants = Vec::new();
        loop {
            let free = self.free();
            let mut avail = free;
            if let Some(holder) = self.reserved_for {
                let charged = self.charged_of(holder);
                if fits(&charged, &free) {
                    grants.push(self.grant(holder, now_ms));
                    continue;
                }
                avail = sub(&free, &charged);
            }
            let (pick, passed_over) = self.pick(&avail, now_ms);
            if self.reserved_for.is_none() && pick.is_some() && passed_over.is_some() {
                // With no holder `avail` is `free`: the passed-over job does
                // not fit, and the picked one would overtake it.
                self.reserved_for = passed_over;
                continue;
            }
            match pick {
                Some(job) => grants.push(self.grant(job, now_ms)),
                None => break,
            }
        }
        grants
    }

    /// When (Unix ms, after `now_ms`) the next waiting job passes its aging
    /// time, so a timer can call [`Scheduler::decide`] then; `None` when no
    /// waiting job is still to age.
    pub fn next_wakeup(&self, now_ms: u64) -> Option<u64> {
        let aging = self.policy.aging_ms;
        // Aged iff now - queued > aging, so the first not aged is queued >= now - aging.
        let from = now_ms.saturating_sub(aging);
        let &(queued_ms, _) = self.ages.range((from, 0)..).next()?;
        queued_ms.checked_add(aging)?.checked_add(1)
    }

    /// What the scheduler holds.
    pub fn view(&self) -> SchedView {
        let mut queue_by_owner = BTreeMap::new();
        let mut running_by_owner = BTreeMap::new();
        for (name, o) in &self.owners {
            if !o.queue.is_empty() {
                queue_by_owner.insert(name.clone(), o.queue.len());
            }
            if o.running > 0 {
                running_by_owner.insert(name.clone(), o.running);
            }
        }
        SchedView {
            budget: self.policy.budget,
            used: self.used,
            free: self.free(),
            queued: self.queued,
            running: self.running,
            queue_by_owner,
            running_by_owner,
            reserved_for: self.reserved_for,
        }
    }

    /// How many jobs wait.
    pub fn queued_len(&self) -> usize {
        self.queued
    }

    /// Whether `job` waits.
    pub fn is_queued(&self, job: JobId) -> bool {
        matches!(self.jobs.get(&job), Some(Place::Queued { .. }))
    }

    /// Whether `job` runs (is charged against the budget).
    pub fn is_running(&self, job: JobId) -> bool {
        matches!(self.jobs.get(&job), Some(Place::Running { .. }))
    }

    fn free(&self) -> Resources {
        sub(&self.policy.budget, &self.used)
    }

    fn is_aged(&self, queued_ms: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(queued_ms) > self.policy.aging_ms
    }

    /// The next job to start within `avail`, the holder aside: owners by
    /// dominant share (then fewer waiting, then their first job's age, then
    /// its id), each owner's
    /// first [`SEARCH_DEPTH`] jobs in FIFO order. Also the first aged job the
    /// walk looked at and passed over (it did not fit).
    fn pick(&self, avail: &Resources, now_ms: u64) -> (Option<JobId>, Option<JobId>) {
        let holder = self.reserved_for;
        let budget = &self.policy.budget;
        let mut order: Vec<(f64, usize, u64, JobId, &Owner)> = self
            .owners
            .values()
            .filter_map(|o| {
                let head = o.queue.values().find(|q| Some(q.job) != holder)?;
                let share = dominant_share(&o.used, budget);
                Some((share, o.queue.len(), head.queued_ms, head.job, o))
            })
            .collect();
        order.sort_by(|a, b| {
            a.0.total_cmp(&b.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
                .then(a.3.cmp(&b.3))
        });
        let mut passed_over = None;
        for (.., o) in &order {
            for q in o
                .queue
                .values()
                .filter(|q| Some(q.job) != holder)
                .take(SEARCH_DEPTH)
            {
                if fits(&q.charged, avail) {
                    return (Some(q.job), passed_over);
                }
                if passed_over.is_none() && self.is_aged(q.queued_ms, now_ms) {
                    passed_over = Some(q.job);
                }
            }
        }
        (None, passed_over)
    }

    fn charged_of(&self, job: JobId) -> Resources {
        match self.jobs.get(&job) {
            Some(Place::Queued { owner, seq }) => self.owners[owner].queue[seq].charged,
            Some(Place::Running { charged, .. }) => *charged,
            None => Resources::default(),
        }
    }

    /// Moves a waiting job to running and says so.
    fn grant(&mut self, job: JobId, now_ms: u64) -> Grant {
        let (owner, q) = self.unqueue(job).expect("a granted job is waiting");
        self.start(job, owner.clone(), q.charged);
        Grant {
            job,
            owner,
            charged: q.charged,
            waited_ms: now_ms.saturating_sub(q.queued_ms),
            aged: self.is_aged(q.queued_ms, now_ms),
        }
    }

    fn start(&mut self, job: JobId, owner: String, charged: Resources) {
        self.used = add(&self.used, &charged);
        self.running += 1;
        let o = self.owners.entry(owner.clone()).or_default();
        o.used = add(&o.used, &charged);
        o.running += 1;
        self.jobs.insert(job, Place::Running { owner, charged });
    }

    /// Takes a waiting job out of every index; its owner and entry.
    fn unqueue(&mut self, job: JobId) -> Option<(String, Queued)> {
        let Some(Place::Queued { owner, seq }) = self.jobs.get(&job) else {
            return None;
        };
        let (owner, seq) = (owner.clone(), *seq);
        self.jobs.remove(&job);
        let q = self.owners.get_mut(&owner)?.queue.remove(&seq)?;
        self.ages.remove(&(q.queued_ms, job));
        self.queued -= 1;
        if self.reserved_for == Some(job) {
            self.reserved_for = None;
        }
        self.drop_if_idle(&owner);
        Some((owner, q))
    }

    /// Forgets a job wherever it is.
    fn forget(&mut self, job: JobId) {
        if !self.release(job) {
            self.unqueue(job);
        }
    }

    fn drop_if_idle(&mut self, owner: &str) {
        if self
            .owners
            .get(owner)
            .is_some_and(|o| o.queue.is_empty() && o.running == 0)
        {
            self.owners.remove(owner);
        }
    }
}

/// Whether `need` fits in `avail` in every resource.
fn fits(need: &Resources, avail: &Resources) -> bool {
    need.memory_mib <= avail.memory_mib
        && need.vcpus <= avail.vcpus
        && need.disk_mib <= avail.disk_mib
}

fn add(a: &Resources, b: &Resources) -> Resources {
    Resources {
        memory_mib: a.memory_mib.saturating_add(b.memory_mib),
        vcpus: a.vcpus.saturating_add(b.vcpus),
        disk_mib: a.disk_mib.saturating_add(b.disk_mib),
    }
}

/// `a - b`, 0 where `b` is larger.
fn sub(a: &Resources, b: &Resources) -> Resources {
    Resources {
        memory_mib: a.memory_mib.saturating_sub(b.memory_mib),
        vcpus: a.vcpus.saturating_sub(b.vcpus),
        disk_mib: a.disk_mib.saturating_sub(b.disk_mib),
    }
}

/// The largest of `used / budget` over the resources (a resource with no
/// budget counts 0 when unused, infinite when used).
fn dominant_share(used: &Resources, budget: &Resources) -> f64 {
    let part = |u: u64, b: u64| match (u, b) {
        (0, _) => 0.0,
        (_, 0) => f64::INFINITY,
        (u, b) => u as f64 / b as f64,
    };
    part(used.memory_mib, budget.memory_mib)
        .max(part(u64::from(used.vcpus), u64::from(budget.vcpus)))
        .max(part(used.disk_mib, budget.disk_mib))
}

/// This machine's default budget: memory is `MemTotal` (`/proc/meminfo`, else
/// `sysinfo`) minus 10%, and minus at least 256 MiB, for the host and the
/// engine; vCPUs are the available parallelism; disk is the free space (for
/// unprivileged users) of the filesystem holding `state_dir` (its nearest
/// existing ancestor if it does not exist yet) minus 10%. A value that cannot be
/// read is 0, so every job is refused as [`TooLarge`] with the budget in its message.
pub fn machine_budget(state_dir: &Path) -> Resources {
    let total_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total_kib(&text))
        .map(|kib| kib / 1024)
        .unwrap_or_else(|| {
            let info = rustix::system::sysinfo();
            (info.totalram as u64).saturating_mul(u64::from(info.mem_unit)) >> 20
        });
    let memory_mib = total_mib.saturating_sub((total_mib / 10).max(256));
    let vcpus = std::thread::available_parallelism()
        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    let disk_mib = state_dir
        .ancestors()
        .find(|p| p.exists())
        .and_then(|p| rustix::fs::statvfs(p).ok())
        .map_or(0, |s| {
            let free = s.f_bavail.saturating_mul(s.f_frsize) >> 20;
            free - free / 10
        });
    Resources {
        memory_mib,
        vcpus,
        disk_mib,
    }
}

/// `MemTotal` in KiB from the text of `/proc/meminfo`.
fn mem_total_kib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    line["MemTotal:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(memory_mib: u64, vcpus: u32, disk_mib: u64) -> Resources {
        Resources {
            memory_mib,
            vcpus,
            disk_mib,
        }
    }

    fn policy(budget: Resources) -> Policy {
        Policy::new(budget)
    }

    fn w(job: JobId, owner: &str, asked: Resources, queued_ms: u64) -> Waiting {
        Waiting {
            job,
            owner: owner.into(),
            asked,
            queued_ms,
        }
    }

    fn jobs(grants: &[Grant]) -> Vec<JobId> {
        grants.iter().map(|g| g.job).collect()
    }

    fn within(used: &Resources, budget: &Resources) -> bool {
        fits(used, budget)
    }

    #[test]
    fn charge_fills_zero_fields_with_the_defaults() {
        let p = policy(r(16 * 1024, 4, 50 * 1024));
        assert_eq!(p.charge(&Resources::default()), DEFAULT_REQUEST);
        assert_eq!(p.charge(&r(2048, 0, 0)), r(2048, 1, 1024));
        assert_eq!(p.charge(&r(0, 3, 7)), r(512, 3, 7));
    }

    #[test]
    fn a_job_larger_than_the_whole_budget_is_refused_with_the_numbers() {
        let mut s = Scheduler::new(policy(r(16 * 1024, 2, 50 * 1024)));
        let err = s.check(&r(64 * 1024, 4, 0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the job asks for 64 GiB memory, 4 vCPUs, 1 GiB disk but the whole budget is \
             16 GiB memory, 2 vCPUs, 50 GiB disk: it could never run"
        );
        assert_eq!(err.asked, r(64 * 1024, 4, 1024));
        let err = s.check(&r(1536, 1, 60 * 1024 + 1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the job asks for 1536 MiB memory, 1 vCPU, 61441 MiB disk but the whole budget is \
             16 GiB memory, 2 vCPUs, 50 GiB disk: it could never run"
        );
        assert_eq!(
            s.enqueue(w(1, "a", r(64 * 1024, 1, 1), 0)),
            Err(TooLarge {
                asked: r(64 * 1024, 1, 1),
                budget: r(16 * 1024, 2, 50 * 1024)
            })
        );
        assert_eq!(s.queued_len(), 0);
        // Exactly the budget fits.
        assert_eq!(
            s.check(&r(16 * 1024, 2, 50 * 1024)),
            Ok(r(16 * 1024, 2, 50 * 1024))
        );
    }

    #[test]
    fn grants_never_exceed_the_budget() {
        let budget = r(8 * 1024, 4, 10 * 1024);
        let mut s = Scheduler::new(policy(budget));
        let sizes = [
            r(256, 1, 100),
            r(2048, 2, 1000),
            r(4096, 3, 4000),
            r(0, 0, 0),
        ];
        let mut running = Vec::new();
        let mut x = 7u64;
        for job in 0..400u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let owner = format!("o{}", x % 5);
            s.enqueue(w(job, &owner, sizes[(x % 4) as usize], job))
                .unwrap();
            if x.is_multiple_of(3) && !running.is_empty() {
                let j = running.remove((x as usize / 3) % running.len());
                assert!(s.release(j));
            }
            for g in s.decide(job * 10) {
                running.push(g.job);
            }
            let v = s.view();
            assert!(within(&v.used, &budget), "{v:?}");
            assert_eq!(v.running, running.len());
            assert_eq!(v.queued + v.running, s.jobs.len());
        }
    }

    #[test]
    fn a_small_owner_is_not_starved_by_a_big_one() {
        // Room for 4 jobs at a time.
        let mut s = Scheduler::new(policy(r(4096, 4, 100 * 1024)));
        let job = r(1024, 1, 1024);
        for j in 0..500 {
            s.enqueue(w(j, "a", job, 0)).unwrap();
        }
        assert_eq!(jobs(&s.decide(1)), vec![0, 1, 2, 3]);
        s.enqueue(w(1000, "b", job, 10)).unwrap();
        assert!(s.decide(11).is_empty());
        assert!(s.release(2));
        let g = s.decide(20);
        assert_eq!(jobs(&g), vec![1000]);
        assert_eq!(
            (g[0].owner.as_str(), g[0].waited_ms, g[0].aged),
            ("b", 10, false)
        );
        // A's next job takes the next slot, in A's order.
        assert!(s.release(0));
        assert_eq!(jobs(&s.decide(30)), vec![4]);
    }

    #[test]
    fn an_aged_backlog_does_not_starve_a_new_owner() {
        // Every one of A's jobs has aged; B's one job is new.
        let mut p = policy(r(4096, 4, 100 * 1024));
        p.aging_ms = 1;
        let mut s = Scheduler::new(p);
        let sizes = [r(1024, 1, 1024), r(2048, 2, 1024), r(1024, 1, 1024)];
        for j in 0..500 {
            s.enqueue(w(j, "a", sizes[j as usize % 3], 0)).unwrap();
        }
        let started = s.decide(0);
        assert!(!started.is_empty());
        s.enqueue(w(1000, "b", r(2048, 2, 1024), 100_000)).unwrap();
        // Nothing fits, so nothing reserves.
        assert!(s.decide(100_000).is_empty());
        assert_eq!(s.view().reserved_for, None);
        // A slot of one vCPU frees: too small for B, which is not aged yet; A
        // backfills.
        let mut running: Vec<JobId> = started.iter().map(|g| g.job).collect();
        let one = *running.iter().find(|j| **j % 3 != 1).unwrap();
        running.retain(|j| *j != one);
        assert!(s.release(one));
        let g = s.decide(100_000);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].owner, "a");
        running.push(g[0].job);
        // Once B has aged, it holds at the first decision that would pass it
        // over, ahead of A's older 2-vCPU jobs, and starts when 2 vCPUs are free.
        let mut t = 100_002;
        loop {
            let j = running.remove(0);
            assert!(s.release(j));
            let g = s.decide(t);
            if let Some(b) = g.iter().find(|g| g.job == 1000) {
                assert!(b.aged);
                break;
            }
            assert_eq!(s.view().reserved_for, Some(1000), "{g:?}");
            running.extend(g.iter().map(|g| g.job));
            t += 1;
        }
        assert!(t < 100_010, "B waited {} decisions", t - 100_002);
    }

    #[test]
    fn owners_take_turns_by_dominant_share() {
        let mut s = Scheduler::new(policy(r(8192, 8, 100 * 1024)));
        // A's jobs are memory-heavy (dominant: memory), B's vCPU-heavy.
        for j in 0..10 {
            s.enqueue(w(j, "a", r(2048, 1, 1), 0)).unwrap();
            s.enqueue(w(100 + j, "b", r(512, 2, 1), 0)).unwrap();
        }
        let g = s.decide(1);
        let a = g.iter().filter(|g| g.owner == "a").count();
        let b = g.iter().filter(|g| g.owner == "b").count();
        // DRF: 2 A jobs (50% memory) and 2 B jobs (50% vCPUs) … then one more
        // of each would leave equal shares; memory allows 4 A jobs at most.
        assert!(a >= 2 && b >= 2, "{g:?}");
        assert!(within(&s.view().used, &s.policy().budget));
    }

    #[test]
    fn job_id_order_within_an_owner_whatever_the_enqueue_order() {
        // Submissions that overlap may reach the scheduler out of id order; it
        // keeps the order a restart rebuilds from the log.
        let mut s = Scheduler::new(policy(r(1024, 1, 1024)));
        for j in [5, 3, 9, 1] {
            s.enqueue(w(j, "a", r(1024, 1, 1024), 0)).unwrap();
        }
        let mut order = Vec::new();
        for t in 0..4 {
            let g = s.decide(t);
            assert_eq!(g.len(), 1);
            order.push(g[0].job);
            s.release(g[0].job);
        }
        assert_eq!(order, vec![1, 3, 5, 9]);
    }

    #[test]
    fn backfill_starts_smaller_jobs_past_a_blocked_big_head() {
        let mut s = Scheduler::new(policy(r(8192, 4, 100 * 1024)));
        s.charge_running(1, "x", r(4096, 2, 1024));
        // A's head needs 3 vCPUs: does not fit the 2 free.
        s.enqueue(w(2, "a", r(1024, 3, 1024), 0)).unwrap();
        s.enqueue(w(3, "a", r(1024, 1, 1024), 1)).unwrap();
        s.enqueue(w(4, "b", r(1024, 1, 1024), 2)).unwrap();
        s.enqueue(w(5, "b", r(1024, 1, 1024), 3)).unwrap();
        let g = s.decide(10);
        // A (share 0, oldest head) backfills its own small job, then B.
        assert_eq!(jobs(&g), vec![3, 4]);
        assert!(s.is_queued(2) && s.is_queued(5));
        // 2 vCPUs free again: still not enough for A's head; B's next fits.
        assert!(s.release(1));
        assert_eq!(jobs(&s.decide(20)), vec![5]);
        // Once 3 vCPUs are free, the head starts.
        assert!(s.release(3));
        assert!(s.release(4));
        assert_eq!(jobs(&s.decide(30)), vec![2]);
    }

    #[test]
    fn an_aged_big_job_reserves_and_small_ones_stop_overtaking_it() {
        let mut p = policy(r(4096, 4, 100 * 1024));
        p.aging_ms = 1000;
        let mut s = Scheduler::new(p);
        let small = r(512, 1, 1024);
        for j in 0..4 {
            s.enqueue(w(j, "small", small, 0)).unwrap();
        }
        assert_eq!(s.decide(0).len(), 4);
        s.enqueue(w(100, "big", r(4096, 4, 1024), 0)).unwrap();
        for j in 4..100 {
            s.enqueue(w(j, "small", small, 0)).unwrap();
        }
        assert_eq!(s.next_wakeup(0), Some(1001));
        // Before aging, small jobs backfill past the big one.
        assert!(s.release(0));
        assert_eq!(jobs(&s.decide(500)), vec![4]);
        assert_eq!(s.view().reserved_for, None);
        // Past its aging time the big job holds: freed room is kept for it.
        assert!(s.release(1));
        assert!(s.decide(1001).is_empty());
        assert_eq!(s.view().reserved_for, Some(100));
        assert!(s.release(2));
        assert!(s.decide(1100).is_empty());
        assert!(s.release(3));
        assert!(s.decide(1200).is_empty());
        assert!(s.release(4));
        let g = s.decide(1300);
        assert_eq!(jobs(&g), vec![100]);
        assert!(g[0].aged);
        assert_eq!(g[0].waited_ms, 1300);
        assert_eq!(s.view().reserved_for, None);
        // Once it runs, the small jobs go on after it.
        assert!(s.release(100));
        let g = s.decide(1400);
        assert_eq!(jobs(&g), vec![5, 6, 7, 8]);
        assert!(g.iter().all(|g| g.aged));
    }

    #[test]
    fn a_younger_job_that_fits_beside_the_reservation_still_starts() {
        let mut p = policy(r(8192, 8, 100 * 1024));
        p.aging_ms = 1000;
        let mut s = Scheduler::new(p);
        s.charge_running(1, "x", r(1024, 6, 1024));
        s.enqueue(w(2, "a", r(1024, 4, 1024), 0)).unwrap(); // aged, does not fit 2 free vCPUs
        s.enqueue(w(3, "b", r(1024, 1, 1024), 1500)).unwrap();
        // Free: 7 GiB, 2 vCPUs; minus the held 4 vCPUs: nothing.
        assert!(s.decide(2000).is_empty());
        assert_eq!(s.view().reserved_for, Some(2));
        // A smaller running job: 4 free vCPUs, the holder takes them first.
        s.charge_running(1, "x", r(1024, 3, 1024));
        // The holder first, then B in the vCPU left.
        assert_eq!(jobs(&s.decide(2100)), vec![2, 3]);
    }

    #[test]
    fn removing_the_holder_lifts_the_reservation() {
        let mut p = policy(r(4096, 4, 100 * 1024));
        p.aging_ms = 10;
        let mut s = Scheduler::new(p);
        s.charge_running(1, "x", r(1024, 2, 1024));
        s.enqueue(w(2, "a", r(1024, 4, 1024), 0)).unwrap();
        s.enqueue(w(3, "b", r(1024, 1, 1024), 0)).unwrap();
        assert!(s.decide(100).is_empty());
        assert_eq!(s.view().reserved_for, Some(2));
        assert!(s.remove(2));
        assert!(!s.remove(2));
        assert_eq!(s.view().reserved_for, None);
        let g = s.decide(100);
        assert_eq!(jobs(&g), vec![3]);
        assert!(g[0].aged);
    }

    #[test]
    fn remove_and_release() {
        let mut s = Scheduler::new(policy(r(1024, 1, 1024)));
        s.enqueue(w(1, "a", r(1024, 1, 1024), 0)).unwrap();
        s.enqueue(w(2, "a", r(1024, 1, 1024), 0)).unwrap();
        s.enqueue(w(3, "b", r(1024, 1, 1024), 0)).unwrap();
        assert!(s.remove(2));
        assert!(!s.remove(2));
        assert!(!s.is_queued(2) && !s.is_running(2));
        assert_eq!(jobs(&s.decide(0)), vec![1]);
        assert!(!s.remove(1), "a running job is not queued");
        assert!(s.is_running(1));
        assert!(!s.release(3), "a queued job is not running");
        assert!(s.release(1));
        assert!(!s.release(1));
        assert_eq!(jobs(&s.decide(0)), vec![3]);
        assert!(s.release(3));
        let v = s.view();
        assert_eq!((v.queued, v.running, v.used), (0, 0, Resources::default()));
        assert!(v.queue_by_owner.is_empty() && v.running_by_owner.is_empty());
        assert!(s.owners.is_empty() && s.jobs.is_empty() && s.ages.is_empty());
    }

    #[test]
    fn over_commit_by_running_jobs_starts_nothing_until_it_drops() {
        let mut s = Scheduler::new(policy(r(4096, 2, 10 * 1024)));
        s.charge_running(1, "a", r(4096, 2, 1024));
        s.charge_running(2, "a", r(2048, 1, 1024));
        s.enqueue(w(3, "b", r(512, 1, 512), 0)).unwrap();
        let v = s.view();
        assert_eq!(v.used, r(6144, 3, 2048));
        assert_eq!(v.free, r(0, 0, 8 * 1024));
        assert!(s.decide(0).is_empty());
        assert!(s.release(2));
        assert_eq!(s.view().free, r(0, 0, 9 * 1024));
        assert!(s.decide(1).is_empty(), "still at the budget");
        assert!(s.release(1));
        assert_eq!(jobs(&s.decide(2)), vec![3]);
    }

    #[test]
    fn a_restarted_scheduler_decides_the_same() {
        let budget = r(16 * 1024, 8, 100 * 1024);
        let sizes = [r(256, 1, 1024), r(2048, 2, 4096), r(8192, 4, 8192)];
        let mut a = Scheduler::new(policy(budget));
        let mut waiting = Vec::new();
        for j in 0..300u64 {
            let wt = w(
                j,
                ["o1", "o2", "o3"][(j % 3) as usize],
                sizes[(j * 7 % 3) as usize],
                j,
            );
            waiting.push(wt.clone());
            a.enqueue(wt).unwrap();
        }
        let mut running = BTreeMap::new();
        for g in a.decide(300) {
            running.insert(g.job, (g.owner, g.charged));
        }
        // Some end, more are decided.
        for j in running.keys().copied().take(3).collect::<Vec<_>>() {
            a.release(j);
            running.remove(&j);
        }
        for g in a.decide(400) {
            running.insert(g.job, (g.owner, g.charged));
        }
        // A new scheduler: the running jobs charged, the waiting ones queued in id order.
        let mut b = Scheduler::new(policy(budget));
        for (j, (owner, charged)) in &running {
            b.charge_running(*j, owner, *charged);
        }
        for wt in waiting.iter().filter(|wt| a.is_queued(wt.job)) {
            b.enqueue(wt.clone()).unwrap();
        }
        let mut granted = 0;
        for t in [500, 600, 700, 70_000, 80_000] {
            let ended: Vec<JobId> = running.keys().copied().take(2).collect();
            for j in ended {
                assert!(a.release(j) && b.release(j));
                running.remove(&j);
            }
            let (ga, gb) = (a.decide(t), b.decide(t));
            assert_eq!(ga, gb);
            granted += ga.len();
            for g in ga {
                running.insert(g.job, (g.owner, g.charged));
            }
            assert_eq!(a.view().reserved_for, b.view().reserved_for);
            assert_eq!(a.next_wakeup(t), b.next_wakeup(t));
        }
        assert!(granted >= 5, "{granted}");
    }

    #[test]
    fn next_wakeup_is_when_the_next_waiter_ages() {
        let mut p = policy(r(1024, 1, 1024));
        p.aging_ms = 1000;
        let mut s = Scheduler::new(p);
        assert_eq!(s.next_wakeup(0), None);
        s.charge_running(9, "x", r(1024, 1, 1024));
        s.enqueue(w(1, "a", r(0, 0, 0), 100)).unwrap();
        s.enqueue(w(2, "a", r(0, 0, 0), 300)).unwrap();
        assert_eq!(s.next_wakeup(0), Some(1101));
        assert_eq!(s.next_wakeup(1100), Some(1101));
        assert_eq!(s.next_wakeup(1101), Some(1301));
        assert_eq!(s.next_wakeup(1301), None);
        s.remove(2);
        assert_eq!(s.next_wakeup(1101), None);
        let mut never = policy(r(1024, 1, 1024));
        never.aging_ms = u64::MAX;
        let mut s = Scheduler::new(never);
        s.enqueue(w(1, "a", r(0, 0, 0), 5)).unwrap();
        assert_eq!(s.next_wakeup(10), None);
    }

    #[test]
    fn view_counts_per_owner() {
        let mut s = Scheduler::new(policy(r(2048, 2, 4096)));
        s.enqueue(w(1, "a", r(1024, 1, 1024), 0)).unwrap();
        s.enqueue(w(2, "a", r(1024, 1, 1024), 0)).unwrap();
        s.enqueue(w(3, "b", r(1024, 1, 1024), 0)).unwrap();
        s.enqueue(w(4, "b", r(1024, 1, 1024), 0)).unwrap();
        s.decide(0);
        let v = s.view();
        assert_eq!((v.queued, v.running), (2, 2));
        assert_eq!(v.used, r(2048, 2, 2048));
        assert_eq!(v.free, r(0, 0, 2048));
        assert_eq!(
            v.running_by_owner,
            BTreeMap::from([("a".into(), 1), ("b".into(), 1)])
        );
        assert_eq!(
            v.queue_by_owner,
            BTreeMap::from([("a".into(), 1), ("b".into(), 1)])
        );
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["budget"]["memory_mib"], 2048);
        assert_eq!(json["reserved_for"], serde_json::Value::Null);
    }

    #[test]
    fn enqueueing_a_known_job_again_keeps_one_entry() {
        let mut s = Scheduler::new(policy(r(1024, 1, 1024)));
        s.enqueue(w(1, "a", r(1024, 1, 1024), 0)).unwrap();
        s.enqueue(w(2, "a", r(1024, 1, 1024), 0)).unwrap();
        s.enqueue(w(1, "a", r(1024, 1, 1024), 0)).unwrap();
        assert_eq!(s.queued_len(), 2);
        assert_eq!(jobs(&s.decide(0)), vec![1]);
        s.release(1);
        s.enqueue(w(1, "a", r(1024, 1, 1024), 0)).unwrap();
        assert_eq!(jobs(&s.decide(0)), vec![1]);
        // A running job queued again is released first.
        s.enqueue(w(1, "a", r(1024, 1, 1024), 0)).unwrap();
        assert!(!s.is_running(1));
        assert_eq!(jobs(&s.decide(0)), vec![1]);
    }

    #[test]
    fn machine_budget_reads_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let b = machine_budget(&dir.path().join("not/yet/made"));
        assert!(b.memory_mib > 0 && b.vcpus > 0 && b.disk_mib > 0, "{b:?}");
        assert_eq!(b.disk_mib / 64, machine_budget(dir.path()).disk_mib / 64);
        assert_eq!(
            mem_total_kib("MemTotal:       16318480 kB\nMemFree: 1 kB\n"),
            Some(16_318_480)
        );
        assert_eq!(mem_total_kib("nothing"), None);
    }
}
