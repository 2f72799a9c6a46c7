//! The retry budget: retries are allowed only while they stay a bounded share
//! of recent first attempts, plus a small floor per second.
//!
//! A fixed "max retries per request" multiplies load during an outage (every
//! request retries N times exactly when the upstream can least afford it); a
//! budget caps the *extra* load instead. Same idea as tower's `retry::budget`,
//! Finagle's `RetryBudget` and gRPC's retry throttling.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::config::RetryBudgetSpec;

const SLOT_MS: u64 = 1_000;

#[derive(Debug, Default, Clone)]
struct Slot {
    start_ms: u64,
    deposits: u64,
    withdrawals: u64,
}

/// Shared retry budget; all methods take the time explicitly for testability.
#[derive(Debug)]
pub struct RetryBudget {
    spec: RetryBudgetSpec,
    slots: Mutex<VecDeque<Slot>>,
}

impl RetryBudget {
    /// A budget with the given settings.
    pub fn new(spec: RetryBudgetSpec) -> Self {
        Self {
            spec,
            slots: Mutex::new(VecDeque::new()),
        }
    }

    /// The budget a reload keeps: this one when `spec` is unchanged, else one under `spec`
    /// that starts from this one's recent requests and retries.
    pub fn reloaded(self: &Arc<Self>, spec: &RetryBudgetSpec) -> Arc<Self> {
        if self.spec == *spec {
            return Arc::clone(self);
        }
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Arc::new(Self {
            spec: spec.clone(),
            slots: Mutex::new(slots),
        })
    }

    fn with_current<R>(&self, now_ms: u64, f: impl FnOnce(&mut VecDeque<Slot>) -> R) -> R {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let ttl = self.spec.ttl_ms.max(SLOT_MS);
        while slots.front().is_some_and(|s| s.start_ms + ttl <= now_ms) {
            slots.pop_front();
        }
        let start = now_ms - now_ms % SLOT_MS;
        if !matches!(slots.back(), Some(s) if s.start_ms == start) {
            slots.push_back(Slot {
                start_ms: start,
                ..Slot::default()
            });
        }
        f(&mut slots)
    }

    /// Records a first attempt (tower's "deposit").
    pub fn deposit(&self, now_ms: u64) {
        self.with_current(now_ms, |s| s.back_mut().expect("pushed above").deposits += 1);
    }

    /// Takes one retry from the budget; `false` means the retry must not happen.
    pub fn try_withdraw(&self, now_ms: u64) -> bool {
        let ratio = self.spec.ratio;
        let floor = self.spec.min_per_sec as f64 * (self.spec.ttl_ms.max(SLOT_MS) as f64 / 1_000.0);
        self.with_current(now_ms, |slots| {
            let (dep, wd) = slots
                .iter()
                .fold((0u64, 0u64), |(d, w), s| (d + s.deposits, w + s.withdrawals));
            if (wd + 1) as f64 <= dep as f64 * ratio + floor {
                slots.back_mut().expect("pushed above").withdrawals += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_and_floor_bound_retries() {
        let b = RetryBudget::new(RetryBudgetSpec {
            ratio: 0.1,
            min_per_sec: 1,
            ttl_ms: 10_000,
        });
        for _ in 0..100 {
            b.deposit(0);
        }
        // 100 * 0.1 + 1 * 10 = 20 retries allowed in the window.
        let allowed = (0..50).filter(|_| b.try_withdraw(10)).count();
        assert_eq!(allowed, 20);
        // Once the window has passed, only the floor remains.
        let later = (0..50).filter(|_| b.try_withdraw(30_000)).count();
        assert_eq!(later, 10);
    }

    #[test]
    fn a_reload_applies_new_settings_to_the_recent_requests() {
        let spec = |ratio| RetryBudgetSpec {
            ratio,
            min_per_sec: 0,
            ttl_ms: 10_000,
        };
        let b = Arc::new(RetryBudget::new(spec(0.5)));
        (0..100).for_each(|_| b.deposit(0));
        assert!(Arc::ptr_eq(&b, &b.reloaded(&spec(0.5))));
        let tighter = b.reloaded(&spec(0.1));
        assert_eq!((0..50).filter(|_| tighter.try_withdraw(10)).count(), 10);
    }
}
