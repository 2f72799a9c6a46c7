//! Who failed a deployment: recent request and failure counts by sender, so that one
//! client's failing requests (prompts the upstream times out on, say) do not open a
//! deployment's circuit for every other client it serves.
//!
//! A sender is a number the caller derives from the virtual key (its team, else the key;
//! 0 when unknown): never a value the client chooses. The table is fixed-size: the
//! sender with the least recent volume gives its slot to a new one. The deployment's
//! totals (in `health.rs`) cover every sender, kept or not.

/// Senders kept apart per deployment.
const SLOTS: usize = 8;
/// Decayed requests of the other senders (about five) under which their health cannot be judged: a
/// deployment only one client uses (or others use rarely) trips as before.
pub(crate) const OTHERS_MIN: f64 = 4.5;

/// One sender's decayed counts of requests and of failures.
#[derive(Debug, Default, Clone, Copy)]
struct Sender {
    id: u64,
    volume: f64,
    failed: f64,
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

    /// Counts one request of `id`, failed or not.
    pub fn add(&mut self, id: u64, failed: bool) {
        let s = self.slot(id);
        s.volume += 1.0;
        s.failed += if failed { 1.0 } else { 0.0 };
    }

    /// Turns `id`'s last request (counted a success) into a failure.
    pub fn fail_last(&mut self, id: u64) {
        let s = self.slot(id);
        s.volume = s.volume.max(1.0);
        s.failed = (s.failed + 1.0).min(s.volume);
    }

    /// `id`'s slot: its own, else the one with the least volume, emptied for it.
    fn slot(&mut self, id: u64) -> &mut Sender {
        let mut at = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s.id == id {
                at = i;
                break;
            }
            if s.volume < self.slots[at].volume {
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

    /// Whether the senders other than `id` are served well: enough of their recent requests
    /// to judge (`OTHERS_MIN`), failing at under half `failure_rate`. Only such evidence keeps
    /// one sender's failures from opening the circuit.
    pub fn others_served_well(&self, id: u64, failure_rate: f64) -> bool {
        self.served_well_without(Some(id), failure_rate, 1.0)
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

    /// Forgets the counts (the circuit opened: the deployment starts anew).
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.volume = 0.0;
            s.failed = 0.0;
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
                t.add(id, id == 3);
            }
        }
        t.add(100, true); // a new sender takes the slot of the quietest (id 1)
        assert!(t.slots.iter().all(|s| s.id != 1));
        assert_eq!(t.worst(), Some(3));
        t.decay(0.5);
        let three = t.slots.iter().find(|s| s.id == 3).copied().unwrap_or_default();
        assert!((three.volume - 1.5).abs() < 1e-9 && (three.failed - 1.5).abs() < 1e-9);
        // The others (ids 2..8 but 3, and 3 failing all of its 1.5) against 100's failures.
        assert!(t.others_served_well(100, 0.5));
        assert!(!t.others_served_well(100, 0.05)); // 1.5 failed of 16.5: not under 2.5 %
        let mut lone = Senders::default();
        lone.add(7, false);
        lone.add(8, true);
        assert!(!lone.others_served_well(8, 0.5)); // one request of another: too little to judge
    }
}
