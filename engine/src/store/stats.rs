//! What the log measures of itself while it runs: how long a durable append
//! takes and how many requests each group-commit round carries. Lock-free
//! counters a front end reads at any time (the daemon's `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::model::event::Outcome;

/// A histogram over fixed upper bounds (`le`, as Prometheus counts them:
/// each bucket counts the observations at or below its bound).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus one for observations above the last.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Counts one observation of `value` (in the histogram's unit).
    pub fn observe(&self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The bounds and the cumulative count at or below each, then the total
    /// count and the sum of every observation.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut running = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (i, &b) in self.bounds.iter().enumerate() {
            running += self.counts[i].load(Ordering::Relaxed);
            buckets.push((b, running));
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (buckets, count, sum)
    }
}

/// Seconds, from 50 µs to 1 s.
const LATENCY_BOUNDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// Requests per round.
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The log's own measurements.
#[derive(Debug)]
pub struct LogStats {
    /// From an append's request to its durable acknowledgement, seconds.
    pub append_seconds: Histogram,
    /// Requests (events and output chunks) committed per group-commit round.
    pub round_requests: Histogram,
    /// Jobs that ended through this log since it opened, per outcome (in
    /// [`Outcome::ALL`] order).
    ended: [AtomicU64; 5],
}

impl Default for LogStats {
    fn default() -> Self {
        LogStats {
            append_seconds: Histogram::new(LATENCY_BOUNDS),
            round_requests: Histogram::new(BATCH_BOUNDS),
            ended: Default::default(),
        }
    }
}

impl LogStats {
    pub(super) fn appended(&self, took: Duration) {
        self.append_seconds.observe(took.as_secs_f64());
    }

    pub(super) fn ended(&self, outcome: Outcome) {
        if let Some(i) = Outcome::ALL.iter().position(|&o| o == outcome) {
            self.ended[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Jobs ended since the log opened, per outcome.
    pub fn ended_since_open(&self) -> [(Outcome, u64); 5] {
        std::array::from_fn(|i| (Outcome::ALL[i], self.ended[i].load(Ordering::Relaxed)))
    }

    pub(super) fn round(&self, requests: usize) {
        self.round_requests.observe(requests as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.0, 1.5, 3.0] {
            h.observe(v);
        }
        let (buckets, count, sum) = h.snapshot();
        assert_eq!(buckets, vec![(1.0, 2), (2.0, 3)]);
        assert_eq!(count, 4);
        assert!((sum - 6.0).abs() < 1e-6);
    }
}
