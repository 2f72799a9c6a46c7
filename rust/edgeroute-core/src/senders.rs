//! Who failed a deployment: recent request and failure counts by sender, so that one
//! client's failing requests (prompts the upstream times out on, say) do not open a
//! deployment's circuit for every other client it serves.
//!
//! A sender is a number the caller derives from the virtual key (its team, else the key;
//! 0 when unknown): never a value the client chooses. The table is fixed-size: the
//! sender with the least recent volume gives its slot to a new one. The deployment's
//! totals (in `health.rs`) cover every sender, kept or not.
//!
//! A slot also holds the sender's own ejection: a trip whose failures are one sender's alone
//! ejects the deployment for that sender only (escalating as the circuit's does), and the
//! sender probes for itself when it ends. A sender with an ejection keeps its slot.

/// Senders kept apart per deployment.
const SLOTS: usize = 8;
/// Decayed requests of the other senders (about five) under which their health cannot be judged: a
/// deployment only one client uses (or others use rarely) trips as before.
pub(crate) const OTHERS_MIN: f64 = 4.5;
/// A sender's first ejection lasts at most this long: an honest client that alone saw a short
/// blip is soon back; a sender whose probe fails again escalates from `base_ejection_ms`.
pub(crate) const FIRST_EJECTION_MS: u64 = 1_000;

/// One sender's decayed counts of requests and of failures, and its own ejection.
#[derive(Debug, Default, Clone, Copy)]
struct Sender {
    id: u64,
    volume: f64,
    failed: f64,
    /// Router time of its last report, plus one (0: never).
    seen_ms: u64,
    /// Its own ejection ends then (router ms).
    until_ms: u64,
    /// Its own ejections in a row (its next one is `base_ejection_ms` doubled this often).
    ejections: u32,
    /// Length of its last ejection (ms): its escalation is forgotten that long (at least the
    /// decay window) after the ejection ended.
    len_ms: u64,
    /// Its own probe is out (its ejection ended; one request of it may go).
    probing: bool,
}

impl Sender {
    /// Whether its requests skip the deployment at `now_ms`.
    fn ejected(&self, now_ms: u64) -> bool {
        self.ejections > 0 && (now_ms < self.until_ms || self.probing)
    }

    /// Whether its ejection is on record and its probe not out: running, or over with no request
    /// of it begun since (its next one is its probe). A failure of it then is of a request sent
    /// before the ejection (in flight when it tripped), or one nothing else could take.
    fn inside(&self) -> bool {
        self.ejections > 0 && self.until_ms > 0 && !self.probing
    }

    /// Whether its ejection is on record (running, awaiting its probe, or the probe out) and not
    /// stale: its failures are set aside from the others' evidence.
    fn set_aside(&self, now_ms: u64, keep_ms: u64) -> bool {
        self.ejections > 0 && self.until_ms > 0 && !self.stale(now_ms, keep_ms)
    }

    /// Whether its last ejection ended more than `max(its length, keep_ms)` before `now_ms` with
    /// no probe out: its escalation is forgotten (a sender back long after is a new sender).
    fn stale(&self, now_ms: u64, keep_ms: u64) -> bool {
        self.ejections > 0 && !self.probing && now_ms >= self.until_ms.saturating_add(self.len_ms.max(keep_ms))
    }

    /// Forgets its escalation if stale.
    fn forget_stale(&mut self, now_ms: u64, keep_ms: u64) {
        if self.stale(now_ms, keep_ms) {
            (self.ejections, self.until_ms, self.len_ms) = (0, 0, 0);
        }
    }
}

/// Recent counts of the senders seen most, decayed like the deployment's error rate.
#[derive(Debug, Default)]
pub(crate) struct Senders {
    slots: [Sender; SLOTS],
}

impl Senders {
    /// Keeps the share `w` of every count (the time since the last report decayed the rest).
    pub fn decay(&mut self, w: f64) {
        if w < 1.0 {
            for s in &mut self.slots {
                s.volume *= w;
                s.failed *= w;
            }
        }
    }

    /// Counts one request of `id` at `now_ms`, failed or not.
    pub fn add(&mut self, id: u64, failed: bool, now_ms: u64) {
        let s = self.slot(id);
        s.volume += 1.0;
        s.failed += if failed { 1.0 } else { 0.0 };
        s.seen_ms = now_ms + 1;
    }

    /// Turns `id`'s last request (counted a success) into a failure.
    pub fn fail_last(&mut self, id: u64) {
        let s = self.slot(id);
        s.volume = s.volume.max(1.0);
        s.failed = (s.failed + 1.0).min(s.volume);
    }

    /// `id`'s slot: its own, else the one with the least volume, emptied for it (a sender
    /// with an ejection gives its slot last: churning senders cannot end it).
    fn slot(&mut self, id: u64) -> &mut Sender {
        let mut at = 0;
        let rank = |s: &Sender| (s.ejections > 0, s.volume);
        for (i, s) in self.slots.iter().enumerate() {
            if s.id == id {
                at = i;
                break;
            }
            if rank(s).partial_cmp(&rank(&self.slots[at])) == Some(std::cmp::Ordering::Less) {
                at = i;
            }
        }
        let s = &mut self.slots[at];
        if s.id != id {
            *s = Sender {
                id,
                ..Sender::default()
            };
        }
        s
    }

    /// The sender with the most recent failures, if any failed.
    pub fn worst(&self) -> Option<u64> {
        let w = self.slots.iter().max_by(|a, b| a.failed.total_cmp(&b.failed))?;
        (w.failed > 0.0).then_some(w.id)
    }

    /// Whether the senders but `aside` (all, for `None`) are served well, their counts decayed
    /// by `w` more (a read long after the last report).
    pub fn served_well_without(&self, aside: Option<u64>, failure_rate: f64, w: f64) -> bool {
        let (mut volume, mut failed) = (0.0, 0.0);
        for s in self.slots.iter().filter(|s| Some(s.id) != aside) {
            volume += s.volume;
            failed += s.failed;
        }
        volume * w >= OTHERS_MIN && failed < volume * failure_rate / 2.0
    }

    /// Whether the senders but `id` fail at under half `failure_rate` (or not at all): the
    /// failures that tripped are `id`'s alone.
    pub fn others_fine(&self, id: u64, failure_rate: f64) -> bool {
        let (mut volume, mut failed) = (0.0, 0.0);
        for s in self.slots.iter().filter(|s| s.id != id) {
            volume += s.volume;
            failed += s.failed;
        }
        failed <= 0.0 || failed < volume * failure_rate / 2.0
    }

    /// Whether a sender but `id` was seen within `window_ms` of `now_ms`.
    pub fn others_seen(&self, id: u64, now_ms: u64, window_ms: u64) -> bool {
        self.slots
            .iter()
            .any(|s| s.id != id && s.seen_ms > 0 && now_ms < s.seen_ms.saturating_add(window_ms))
    }

    /// Whether `id`'s requests skip the deployment now (its own ejection, or its probe is out).
    pub fn ejected(&self, id: u64, now_ms: u64) -> bool {
        self.slots.iter().any(|s| s.id == id && s.ejected(now_ms))
    }

    /// Whether `id` is inside its own ejection, its probe not out: its failures are of requests
    /// sent before it (they count for it, and neither eject nor escalate it again).
    pub fn inside(&self, id: u64) -> bool {
        self.slots.iter().any(|s| s.id == id && s.inside())
    }

    /// Whether a sender but `id` is set aside now (its ejection on record, not stale).
    pub fn other_set_aside(&self, id: u64, now_ms: u64, keep_ms: u64) -> bool {
        self.slots.iter().any(|s| s.id != id && s.set_aside(now_ms, keep_ms))
    }

    /// Whether a sender but `id` is set aside after its own probe failed too (ejected twice or
    /// more in a row): it kept failing, not only a blip.
    pub fn other_probe_failed(&self, id: u64, now_ms: u64, keep_ms: u64) -> bool {
        self.slots
            .iter()
            .any(|s| s.id != id && s.ejections >= 2 && s.set_aside(now_ms, keep_ms))
    }

    /// Senders ejected now (for status pages).
    pub fn ejected_count(&self, now_ms: u64) -> u32 {
        self.slots.iter().filter(|s| s.ejected(now_ms)).count() as u32
    }

    /// Whether some sender is ejected now (its ejection runs or its probe is out): the fast path
    /// skips the table otherwise.
    pub fn any_ejected(&self, now_ms: u64) -> bool {
        self.slots.iter().any(|s| s.ejected(now_ms))
    }

    /// Decayed requests and failures of the senders not set aside at `now_ms`: the evidence of
    /// those still served, the ejected senders' failures left out.
    pub fn counts_not_set_aside(&self, now_ms: u64, keep_ms: u64) -> (f64, f64) {
        let served = self.slots.iter().filter(|s| !s.set_aside(now_ms, keep_ms));
        served.fold((0.0, 0.0), |(v, f), s| (v + s.volume, f + s.failed))
    }

    /// Ejects the deployment for `id` alone: its first ejection (in a row, not forgotten) for
    /// `base_ms` at most [`FIRST_EJECTION_MS`], then `base_ms` doubled per ejection, up to `max_ms`.
    pub fn eject(&mut self, id: u64, now_ms: u64, base_ms: u64, max_ms: u64, keep_ms: u64) {
        let s = self.slot(id);
        s.forget_stale(now_ms, keep_ms);
        let len = match s.ejections {
            0 => base_ms.min(FIRST_EJECTION_MS),
            k => base_ms.saturating_mul(1u64 << (k - 1).min(16)),
        };
        s.len_ms = len.min(max_ms);
        s.until_ms = now_ms + s.len_ms;
        s.ejections += 1;
        s.probing = false;
    }

    /// An attempt of `id` starts: after its own ejection, it is its probe (unless the ejection
    /// is long over: then its escalation is forgotten and it is a request like any other).
    pub fn begin(&mut self, id: u64, now_ms: u64, keep_ms: u64) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.id == id) {
            s.forget_stale(now_ms, keep_ms);
            if s.ejections > 0 && now_ms >= s.until_ms {
                s.probing = true;
            }
        }
    }

    /// Ends `id`'s probe; whether one was out.
    pub fn end_probe(&mut self, id: u64) -> bool {
        match self.slots.iter_mut().find(|s| s.id == id) {
            Some(s) => std::mem::take(&mut s.probing),
            None => false,
        }
    }

    /// `id` was served: its own ejection is over.
    pub fn pardon(&mut self, id: u64) {
        if let Some(s) = self.slots.iter_mut().find(|s| s.id == id && s.ejections > 0) {
            (s.ejections, s.until_ms, s.probing) = (0, 0, false);
        }
    }

    /// Ends every sender's ejection (the deployment serves again, or the circuit is restored).
    pub fn pardon_all(&mut self) {
        for s in &mut self.slots {
            (s.ejections, s.until_ms, s.probing) = (0, 0, false);
        }
    }

    /// Forgets the counts (the circuit opened for everyone: the deployment starts anew); the
    /// senders' own ejections end under it, their escalation is kept.
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.volume = 0.0;
            s.failed = 0.0;
            s.until_ms = 0;
            s.probing = false;
        }
    }
}

/// Who failed in the current streak of failures: one sender, or more.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Streak {
    /// The sender of the streak's first failure.
    pub sender: u64,
    /// Whether another sender failed in it too.
    mixed: bool,
}

impl Streak {
    /// Adds a failure of `id`; `first` when it starts a new streak.
    pub fn add(&mut self, id: u64, first: bool) {
        if first {
            *self = Streak {
                sender: id,
                mixed: false,
            };
        } else if id != self.sender {
            self.mixed = true;
        }
    }

    /// Whether two senders or more failed in the streak.
    pub fn shared(&self) -> bool {
        self.mixed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_keeps_the_busiest_senders_and_gives_the_quietest_slot_away() {
        let mut t = Senders::default();
        for id in 1..=SLOTS as u64 {
            for _ in 0..id {
                t.add(id, id == 3, 0);
            }
        }
        t.add(100, true, 0); // a new sender takes the slot of the quietest (id 1)
        assert!(t.slots.iter().all(|s| s.id != 1));
        assert_eq!(t.worst(), Some(3));
        t.decay(0.5);
        let three = t.slots.iter().find(|s| s.id == 3).copied().unwrap_or_default();
        assert!((three.volume - 1.5).abs() < 1e-9 && (three.failed - 1.5).abs() < 1e-9);
        // The others (ids 2..8 but 3, and 3 failing all of its 1.5) against 100's failures.
        assert!(t.served_well_without(Some(100), 0.5, 1.0));
        assert!(!t.served_well_without(Some(100), 0.05, 1.0)); // 1.5 failed of 16.5: not under 2.5 %
        let mut lone = Senders::default();
        lone.add(7, false, 0);
        lone.add(8, true, 0);
        assert!(!lone.served_well_without(Some(8), 0.5, 1.0)); // one request of another: too little to judge
    }
}
