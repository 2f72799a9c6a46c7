//! Per-deployment capacity: requests in flight against `max_concurrency`, with a
//! share of it (`reserve_percent`) kept for the highest priority class.
//!
//! The caller takes a slot when an attempt starts ([`crate::Router::acquire`]) and
//! gives it back when the answer has been read ([`crate::Router::release`]); the
//! router's selection passes over a deployment without room for the request's
//! class, as it passes over an open circuit, without touching its health. The
//! counts live behind an `Arc` so that a reload keeps them for unchanged deployments.

use std::sync::atomic::{AtomicU32, Ordering};

/// The slots of one deployment.
#[derive(Debug, Default)]
pub struct Slots {
    active: AtomicU32,
}

/// A deployment's limits, from its spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Requests in flight at most (`None`: unbounded).
    pub max: Option<u32>,
    /// Slots only the highest class may use.
    pub reserved: u32,
}

impl Limits {
    /// Limits for `max_concurrency` with `reserve_percent` of it (rounded down) kept back.
    pub fn new(max_concurrency: Option<u32>, reserve_percent: u32) -> Self {
        let reserved = max_concurrency.map_or(0, |m| m * reserve_percent.min(100) / 100);
        Self {
            max: max_concurrency,
            reserved,
        }
    }

    /// The slots a request may fill: all for the top class, the unreserved ones for the others.
    pub fn for_class(self, top: bool) -> Option<u32> {
        self.max.map(|m| if top { m } else { m - self.reserved })
    }
}

impl Slots {
    /// Requests in flight.
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether a request (of the top class or not) finds a free slot under `limits`.
    pub fn has_room(&self, limits: Limits, top: bool) -> bool {
        limits.for_class(top).map_or(true, |m| self.active() < m)
    }

    /// Counts one more request in flight.
    pub fn acquire(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one request fewer (never below zero: a release after a reload reset is harmless).
    pub fn release(&self) {
        let _ = self
            .active
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_for_the_top_class_only() {
        let limits = Limits::new(Some(10), 20);
        let slots = Slots::default();
        for _ in 0..8 {
            assert!(slots.has_room(limits, false));
            slots.acquire();
        }
        assert!(!slots.has_room(limits, false));
        assert!(slots.has_room(limits, true));
        slots.acquire();
        slots.acquire();
        assert!(!slots.has_room(limits, true));
        slots.release();
        assert!(slots.has_room(limits, true) && !slots.has_room(limits, false));
    }

    #[test]
    fn unbounded_always_has_room_and_release_stops_at_zero() {
        let slots = Slots::default();
        slots.release();
        assert_eq!(slots.active(), 0);
        assert!(slots.has_room(Limits::new(None, 50), false));
        assert_eq!(Limits::new(Some(3), 100).for_class(false), Some(0));
    }
}
