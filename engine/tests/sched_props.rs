//! Property tests of the fair resource scheduler (`lifecycle::sched`): random
//! submits, ends, cancels and passing time against a model of what is waiting
//! and running.

use std::collections::BTreeMap;

use proptest::prelude::*;

use reel_engine::lifecycle::sched::{Grant, Policy, SEARCH_DEPTH, Scheduler, Waiting};
use reel_engine::model::event::JobId;
use reel_engine::model::spec::Resources;

const BUDGET: Resources = Resources {
    memory_mib: 8192,
    vcpus: 6,
    disk_mib: 20 * 1024,
};

const SIZES: [Resources; 5] = [
    Resources {
        memory_mib: 0,
        vcpus: 0,
        disk_mib: 0,
    },
    Resources {
        memory_mib: 256,
        vcpus: 1,
        disk_mib: 1024,
    },
    Resources {
        memory_mib: 2048,
        vcpus: 2,
        disk_mib: 4096,
    },
    Resources {
        memory_mib: 6144,
        vcpus: 4,
        disk_mib: 8192,
    },
    Resources {
        memory_mib: 1024,
        vcpus: 6,
        disk_mib: 16 * 1024,
    },
];

#[derive(Clone, Debug)]
enum Op {
    Submit { owner: u8, size: usize },
    End(usize),
    Cancel(usize),
    Wait(u64),
    Decide,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0..SIZES.len()).prop_map(|(owner, size)| Op::Submit { owner, size }),
        2 => any::<usize>().prop_map(Op::End),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => (0u64..3000).prop_map(Op::Wait),
        3 => Just(Op::Decide),
    ]
}

fn policy() -> Policy {
    let mut p = Policy::new(BUDGET);
    p.aging_ms = 2000;
    p
}

fn fits(need: &Resources, avail: &Resources) -> bool {
    need.memory_mib <= avail.memory_mib
        && need.vcpus <= avail.vcpus
        && need.disk_mib <= avail.disk_mib
}

fn minus(a: &Resources, b: &Resources) -> Resources {
    Resources {
        memory_mib: a.memory_mib.saturating_sub(b.memory_mib),
        vcpus: a.vcpus.saturating_sub(b.vcpus),
        disk_mib: a.disk_mib.saturating_sub(b.disk_mib),
    }
}

/// What the test knows: waiting jobs in queue order, running jobs' charges.
#[derive(Default)]
struct Model {
    waiting: Vec<Waiting>,
    running: BTreeMap<JobId, (String, Resources)>,
}

impl Model {
    /// A scheduler rebuilt from the model, as a restarted daemon would: the
    /// running jobs charged, the waiting ones queued in job-id order.
    fn rebuild(&self) -> Scheduler {
        let mut s = Scheduler::new(policy());
        for (job, (owner, charged)) in &self.running {
            s.charge_running(*job, owner, *charged);
        }
        let mut waiting = self.waiting.clone();
        waiting.sort_by_key(|w| w.job);
        for w in waiting {
            s.enqueue(w).unwrap();
        }
        s
    }
}

fn check_decision(
    s: &Scheduler,
    m: &Model,
    grants: &[Grant],
    now: u64,
) -> Result<(), TestCaseError> {
    let p = s.policy();
    let v = s.view();
    // Never over the budget (nothing here over-commits).
    prop_assert!(fits(&v.used, &BUDGET), "used {:?}", v.used);
    prop_assert_eq!(v.queued, m.waiting.len());
    prop_assert_eq!(v.running, m.running.len());
    for g in grants {
        prop_assert!(m.running.contains_key(&g.job));
        prop_assert!(s.is_running(g.job) && !s.is_queued(g.job));
    }
    // Work-conserving: nothing looked at still fits (beside the reservation).
    let mut by_owner: BTreeMap<&str, Vec<&Waiting>> = BTreeMap::new();
    for w in &m.waiting {
        by_owner.entry(&w.owner).or_default().push(w);
    }
    let avail = match v.reserved_for {
        None => v.free,
        Some(h) => {
            let w = m.waiting.iter().find(|w| w.job == h);
            prop_assert!(w.is_some(), "the holder {} is not waiting", h);
            let w = w.unwrap();
            let charged = p.charge(&w.asked);
            prop_assert!(
                !fits(&charged, &v.free),
                "the holder fits and did not start"
            );
            prop_assert!(now.saturating_sub(w.queued_ms) > p.aging_ms);
            minus(&v.free, &charged)
        }
    };
    for jobs in by_owner.values() {
        for w in jobs
            .iter()
            .filter(|w| Some(w.job) != v.reserved_for)
            .take(SEARCH_DEPTH)
        {
            prop_assert!(
                !fits(&p.charge(&w.asked), &avail),
                "job {} fits {:?} and waits",
                w.job,
                avail
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn grants_fit_nothing_fitting_waits_and_a_restart_decides_the_same(ops in prop::collection::vec(op(), 1..200)) {
        let mut s = Scheduler::new(policy());
        let mut m = Model::default();
        let mut now = 1_000u64;
        let mut next_job: JobId = 1;
        for op in ops {
            match op {
                Op::Submit { owner, size } => {
                    let w = Waiting {
                        job: next_job,
                        owner: format!("owner-{owner}"),
                        asked: SIZES[size],
                        queued_ms: now,
                    };
                    next_job += 1;
                    if size == 4 {
                        // 6 vCPUs and 16 GiB disk: exactly within the budget.
                        prop_assert!(s.check(&w.asked).is_ok());
                    }
                    s.enqueue(w.clone()).unwrap();
                    m.waiting.push(w);
                }
                Op::End(i) => {
                    if !m.running.is_empty() {
                        let job = *m.running.keys().nth(i % m.running.len()).unwrap();
                        m.running.remove(&job);
                        prop_assert!(s.release(job));
                        prop_assert!(!s.release(job));
                    }
                }
                Op::Cancel(i) => {
                    if !m.waiting.is_empty() {
                        let w = m.waiting.remove(i % m.waiting.len());
                        prop_assert!(s.remove(w.job));
                        prop_assert!(!s.remove(w.job));
                    }
                }
                Op::Wait(ms) => {
                    if let Some(at) = s.next_wakeup(now) {
                        prop_assert!(at > now);
                    }
                    now += ms;
                }
                Op::Decide => {
                    // With no reservation held, the scheduler's state is what a
                    // restart rebuilds: both must decide the same.
                    let before = s.view();
                    let mut restarted = before.reserved_for.is_none().then(|| m.rebuild());
                    let grants = s.decide(now);
                    // A holder that is still waiting had its request kept free:
                    // what started fits beside it.
                    if let Some(h) = before.reserved_for.filter(|h| s.is_queued(*h)) {
                        let w = m.waiting.iter().find(|w| w.job == h).unwrap();
                        let mut avail = minus(&before.free, &s.policy().charge(&w.asked));
                        for g in &grants {
                            prop_assert!(fits(&g.charged, &avail), "job {} overtook the holder {}", g.job, h);
                            avail = minus(&avail, &g.charged);
                        }
                    }
                    if let Some(r) = restarted.as_mut() {
                        prop_assert_eq!(&r.decide(now), &grants);
                        prop_assert_eq!(r.view().reserved_for, s.view().reserved_for);
                    }
                    let p = s.policy();
                    for g in &grants {
                        let pos = m.waiting.iter().position(|w| w.job == g.job);
                        prop_assert!(pos.is_some(), "job {} granted but not waiting", g.job);
                        let w = m.waiting.remove(pos.unwrap());
                        prop_assert_eq!(g.charged, p.charge(&w.asked));
                        prop_assert_eq!(&g.owner, &w.owner);
                        prop_assert_eq!(g.waited_ms, now - w.queued_ms);
                        prop_assert_eq!(g.aged, now - w.queued_ms > p.aging_ms);
                        m.running.insert(g.job, (g.owner.clone(), g.charged));
                    }
                    check_decision(&s, &m, &grants, now)?;
                }
            }
        }
    }
}
