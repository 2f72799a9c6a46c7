//! Hedging policy: when to send a second attempt to another deployment, and
//! whether the hedge budget allows it.
//!
//! The delay is a recent latency percentile of the primary deployment, taken
//! from a rotating pair of histograms (the previous window is read while the
//! current one fills), so that it follows the deployment's latency without
//! remembering a slow hour forever. Hedges are capped at a share of requests:
//! every hedge to an LLM costs tokens ("The Tail at Scale": a p95 hedge costs
//! about 5% extra load).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Deserialize;

/// Per-model hedging settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HedgeSpec {
    /// Latency percentile (0..100) of the primary after which to hedge.
    #[serde(default = "default_percentile")]
    pub percentile: f64,
    /// A fixed delay in milliseconds instead of the percentile.
    #[serde(default)]
    pub delay_ms: Option<f64>,
    /// The shortest delay ever used, so that a fast window does not hedge everything.
    #[serde(default = "default_min_delay")]
    pub min_delay_ms: f64,
    /// Hedges allowed as a percentage of requests.
    #[serde(default = "default_budget")]
    pub budget_percent: f64,
    /// Samples needed in a window before the percentile is trusted.
    #[serde(default = "default_min_samples")]
    pub min_samples: u32,
}

fn default_percentile() -> f64 {
    95.0
}
fn default_min_delay() -> f64 {
    50.0
}
fn default_budget() -> f64 {
    5.0
}
fn default_min_samples() -> u32 {
    20
}

// Log-linear buckets: 8 per doubling from 1 ms, up to ~18 minutes.
const SUB: usize = 8;
const OCTAVES: usize = 20;
const BUCKETS: usize = SUB * OCTAVES;

fn bucket_of(ms: f64) -> usize {
    if ms <= 1.0 {
        return 0;
    }
    let l = ms.log2() * SUB as f64;
    (l as usize).min(BUCKETS - 1)
}

fn upper_of(bucket: usize) -> f64 {
    2f64.powf((bucket + 1) as f64 / SUB as f64)
}

#[derive(Debug, Clone)]
struct Window {
    counts: Vec<u32>,
    total: u32,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl Window {
    fn percentile(&self, p: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((p / 100.0) * f64::from(self.total)).ceil().max(1.0) as u32;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(upper_of(i));
            }
        }
        None
    }
}

/// A latency histogram that rotates every `period_ms`.
#[derive(Debug)]
pub struct RotatingHistogram {
    period_ms: u64,
    inner: Mutex<(u64, Window, Window)>,
}

impl RotatingHistogram {
    /// A histogram whose windows last `period_ms`.
    pub fn new(period_ms: u64) -> Self {
        Self {
            period_ms,
            inner: Mutex::new((0, Window::default(), Window::default())),
        }
    }

    fn rotate(&self, now_ms: u64, g: &mut (u64, Window, Window)) {
        if now_ms >= g.0 + self.period_ms {
            let stale = now_ms >= g.0 + 2 * self.period_ms;
            g.2 = if stale {
                Window::default()
            } else {
                std::mem::take(&mut g.1)
            };
            g.1 = Window::default();
            g.0 = now_ms;
        }
    }

    /// Adds one latency sample.
    pub fn record(&self, ms: f64, now_ms: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.rotate(now_ms, &mut g);
        g.1.counts[bucket_of(ms)] += 1;
        g.1.total += 1;
    }

    /// The percentile over the fuller of the two windows, if it has `min_samples`.
    pub fn percentile(&self, p: f64, min_samples: u32, now_ms: u64) -> Option<f64> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.rotate(now_ms, &mut g);
        let w = if g.1.total >= g.2.total { &g.1 } else { &g.2 };
        (w.total >= min_samples).then(|| w.percentile(p)).flatten()
    }
}

/// How far back the hedge budget counts: requests of the last 10 s fund hedges, no older
/// ones. Counted since the start, a quiet hour's requests paid for hedging every request of a
/// later slowdown (400 fast requests, then 20 of 20 slow ones hedged at a 5 % budget).
const HEDGE_WINDOW_MS: u64 = 10_000;
const HEDGE_SLOT_MS: u64 = 1_000;
const HEDGE_SLOTS: usize = (HEDGE_WINDOW_MS / HEDGE_SLOT_MS) as usize;

/// Counts requests and hedges over the last [`HEDGE_WINDOW_MS`] to enforce the hedge budget.
#[derive(Debug, Default)]
pub struct HedgeBudget {
    // Per second of the window (ring by second), its start and its (requests, hedges).
    slots: Mutex<[(u64, u64, u64); HEDGE_SLOTS]>,
    hedges: AtomicU64, // hedges sent since the start, for metrics
}

impl HedgeBudget {
    fn slot(slots: &mut [(u64, u64, u64); HEDGE_SLOTS], now_ms: u64) -> &mut (u64, u64, u64) {
        let start = now_ms - now_ms % HEDGE_SLOT_MS;
        let slot = &mut slots[(start / HEDGE_SLOT_MS) as usize % HEDGE_SLOTS];
        if slot.0 != start {
            *slot = (start, 0, 0); // a second ago by the window's length or more: forgotten
        }
        slot
    }

    /// Counts a request that could be hedged.
    pub fn note_request(&self, now_ms: u64) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        Self::slot(&mut slots, now_ms).1 += 1;
    }

    /// Takes a hedge if fewer than `percent` of the window's requests have been hedged.
    pub fn try_take(&self, percent: f64, now_ms: u64) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        Self::slot(&mut slots, now_ms);
        let (req, h) = slots
            .iter()
            .filter(|s| s.0 + HEDGE_WINDOW_MS > now_ms)
            .fold((0u64, 0u64), |(r, h), s| (r + s.1, h + s.2));
        if (h + 1) as f64 <= req.max(1) as f64 * percent / 100.0 {
            Self::slot(&mut slots, now_ms).2 += 1;
            self.hedges.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Hedges sent so far.
    pub fn hedges(&self) -> u64 {
        self.hedges.load(Ordering::Relaxed)
    }
}

impl HedgeSpec {
    /// The hedge delay for a primary whose histogram is `hist`, if hedging applies.
    pub fn delay_ms(&self, hist: &RotatingHistogram, now_ms: u64) -> Option<f64> {
        if let Some(d) = self.delay_ms {
            return Some(d);
        }
        hist.percentile(self.percentile, self.min_samples, now_ms)
            .map(|p| p.max(self.min_delay_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_tracks_recent_latency() {
        let h = RotatingHistogram::new(1_000);
        for i in 0..100 {
            h.record(f64::from(i) + 1.0, 0);
        }
        let p95 = h.percentile(95.0, 20, 10).unwrap();
        assert!((90.0..=110.0).contains(&p95), "{p95}");
        // After two quiet periods the window is empty again.
        assert_eq!(h.percentile(95.0, 20, 5_000), None);
    }

    #[test]
    fn budget_caps_share() {
        let b = HedgeBudget::default();
        let mut taken = 0;
        for i in 0..1_000 {
            b.note_request(5_000 + i);
            if b.try_take(5.0, 5_000 + i) {
                taken += 1;
            }
        }
        assert!((45..=50).contains(&taken), "{taken}");
    }

    #[test]
    fn budget_forgets_requests_past_its_window() {
        // 400 fast requests, never hedged; a minute later 20 slow ones: 5 % of 20, not of 420.
        let b = HedgeBudget::default();
        for i in 0..400 {
            b.note_request(1_000 + i);
        }
        let later = 61_000;
        let taken = (0..20)
            .filter(|&i| {
                b.note_request(later + i);
                b.try_take(5.0, later + i)
            })
            .count();
        assert_eq!(taken, 1);
        // Within the window they still count: 400 requests fund 20 hedges.
        let fresh = HedgeBudget::default();
        (0..400).for_each(|i| fresh.note_request(1_000 + i * 10));
        assert_eq!((0..30).filter(|_| fresh.try_take(5.0, 6_000)).count(), 20);
    }
}
