//! Selection strategies: given the eligible deployments of a route, put them
//! in the order they should be tried. The first is the choice; the rest are
//! the fallback order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::config::Strategy;

/// What selection needs to know about one candidate.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Index of the deployment in the router.
    pub index: usize,
    /// Configured weight.
    pub weight: u32,
    /// Estimated USD cost of this request at this deployment.
    pub cost: f64,
    /// Peak-EWMA latency times (in-flight + 1).
    pub load: f64,
    /// Requests in flight.
    pub in_flight: u32,
    /// Peak-EWMA latency of answered attempts (0: not measured yet).
    pub latency_ms: f64,
}

/// Smooth weighted round robin state of one route (nginx's algorithm): each
/// pick adds every weight to its running score, takes the highest and
/// subtracts the total, which spreads picks evenly instead of in bursts.
#[derive(Debug)]
pub struct Swrr {
    current: Mutex<Vec<i64>>,
}

impl Swrr {
    /// State for a route whose deployments are indexed `0..n` locally.
    pub fn new(n: usize) -> Self {
        Self {
            current: Mutex::new(vec![0; n]),
        }
    }

    /// Picks among `slots` (local positions, with weights); returns the position in `slots`.
    fn pick(&self, slots: &[(usize, u32)]) -> usize {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let total: i64 = slots.iter().map(|&(_, w)| i64::from(w)).sum();
        let mut best = 0;
        for (pos, &(local, w)) in slots.iter().enumerate() {
            cur[local] += i64::from(w);
            if cur[local] > cur[slots[best].0] {
                best = pos;
            }
        }
        cur[slots[best].0] -= total;
        best
    }
}

/// A tiny lock-free xorshift generator: selection needs speed, not quality.
#[derive(Debug)]
pub struct FastRng(AtomicU64);

impl FastRng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(AtomicU64::new(seed | 1))
    }
    /// Next value in `0..n` (n > 0).
    pub fn below(&self, n: usize) -> usize {
        let mut x = self.0.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.store(x, Ordering::Relaxed);
        ((x >> 11) % n as u64) as usize
    }
}

/// Orders `cands` for `strategy`. `locals[i]` is candidate i's position in the route (for SWRR).
pub fn order(strategy: Strategy, cands: &mut Vec<Candidate>, locals: &[usize], swrr: &Swrr, rng: &FastRng) {
    if cands.len() < 2 {
        return;
    }
    match strategy {
        Strategy::Weighted => {
            let slots: Vec<(usize, u32)> = cands.iter().zip(locals).map(|(c, &l)| (l, c.weight.max(1))).collect();
            let first = swrr.pick(&slots);
            let chosen = cands.remove(first);
            cands.sort_by_key(|c| std::cmp::Reverse(c.weight));
            cands.insert(0, chosen);
        }
        Strategy::P2cEwma => {
            let a = rng.below(cands.len());
            let mut b = rng.below(cands.len() - 1);
            if b >= a {
                b += 1;
            }
            let first = if cands[b].load < cands[a].load { b } else { a };
            let chosen = cands.remove(first);
            cands.sort_by(|x, y| x.load.total_cmp(&y.load));
            cands.insert(0, chosen);
        }
        Strategy::LowestCost => {
            // Rotate first so that equal prices share the load.
            let k = rng.below(cands.len());
            cands.rotate_left(k);
            cands.sort_by(|x, y| x.cost.total_cmp(&y.cost));
        }
        Strategy::LeastBusy => {
            let k = rng.below(cands.len());
            cands.rotate_left(k);
            cands.sort_by_key(|c| c.in_flight);
        }
        Strategy::Fastest => {
            let k = rng.below(cands.len());
            cands.rotate_left(k);
            cands.sort_by(|x, y| x.latency_ms.total_cmp(&y.latency_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(index: usize, weight: u32) -> Candidate {
        Candidate {
            index,
            weight,
            cost: index as f64,
            load: 1.0,
            in_flight: 0,
            latency_ms: 0.0,
        }
    }

    #[test]
    fn fastest_puts_the_lowest_latency_first() {
        let (swrr, rng) = (Swrr::new(3), FastRng::new(7));
        let lat = [300.0, 40.0, 120.0];
        for _ in 0..10 {
            let mut c: Vec<Candidate> = (0..3)
                .map(|i| Candidate {
                    latency_ms: lat[i],
                    ..cand(i, 1)
                })
                .collect();
            order(Strategy::Fastest, &mut c, &[0, 1, 2], &swrr, &rng);
            assert_eq!(c.iter().map(|c| c.index).collect::<Vec<_>>(), [1, 2, 0]);
        }
    }

    #[test]
    fn swrr_is_exact_over_a_cycle() {
        let swrr = Swrr::new(3);
        let rng = FastRng::new(7);
        // Weight 0 is read as 1 so that a deployment is never starved by a typo.
        let mut counts = [0; 3];
        for _ in 0..70 {
            let mut c = vec![cand(0, 5), cand(1, 1), cand(2, 0)];
            order(Strategy::Weighted, &mut c, &[0, 1, 2], &swrr, &rng);
            counts[c[0].index] += 1;
        }
        // Ten full cycles of total weight 7 give exactly the weights' shares.
        assert_eq!(counts, [50, 10, 10]);
    }
}
