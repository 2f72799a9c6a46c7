//! Passive health of one deployment: peak-EWMA latency, an error-rate EWMA,
//! consecutive failures, a circuit breaker with growing ejection, a
//! cool-down until a provider's `Retry-After`, and a hold while the provider
//! limit edgeroute counts for the deployment has no request left.
//!
//! Every attempt is reported here. A 429 is a failure: it answers fast, so a
//! latency-only balancer would otherwise send *more* traffic to a rate-limited
//! deployment (see Linkerd's and Finagle's notes on this).
//!
//! Each report names its sender (the virtual key's team, else the key; 0 when unknown). A trip
//! whose failures are one sender's alone, while other senders were seen lately, ejects the
//! deployment for that sender only (`senders.rs`): the others are still served, and that
//! sender's requests stop reaching the upstream. Its requests still in flight when it tripped count
//! for it alone: they neither eject it again nor escalate its ejection (only its failed probe does).
//! While one is ejected, the others open the circuit for everyone on their own evidence only (streak
//! or error rate, the ejected senders' failures left out; a streak of two once the ejected sender's
//! probe failed too and theirs fail at half the failure rate); so does a second sender's failed
//! half-open probe.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use crate::config::HealthSpec;
use crate::senders::{Senders, Streak};

/// Other senders count as present for `ewma_decay_ms` times this (40 s by default): a trip of one
/// sender while none other was seen that recently opens the circuit for everyone, as before.
const SEEN_DECAYS: u64 = 4;

/// The others' streak that opens the circuit for everyone (at most `consecutive_failures`) while a
/// sender is set aside whose own probe failed too, when their own recent requests fail at half the
/// failure rate or more: two senders failing is an outage, and a quiet client should not pay a
/// whole streak of failed requests to learn it. One stray failure is not, nor are two stray
/// failures among a busy client's successes.
const OUTAGE_STREAK: u32 = 2;

/// Deployments (of every router in the process) with a sender's ejection on record: while 0, a
/// request asks no deployment whether it is ejected for its sender ([`any_sender_ejection`]).
static SCOPED_DEPLOYMENTS: AtomicU32 = AtomicU32::new(0);

/// Whether some deployment may be ejected for a sender alone (one atomic read; a hint: a
/// deployment must still be asked, [`Health::ejected_for`]).
pub fn any_sender_ejection() -> bool {
    SCOPED_DEPLOYMENTS.load(Ordering::Relaxed) > 0
}

/// What happened on one attempt: the one outcome vocabulary of edgeroute.
///
/// The binding parses report strings with [`Outcome::from_name`] and exports
/// [`Outcome::NAMES`]; the server's error classes and the config's `fallbacks_on`
/// keys use the same names.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The upstream answered successfully.
    Success,
    /// The upstream answered 4xx for the client's own fault; says nothing about health.
    ClientError,
    /// The prompt is too long for this deployment's model (the client's request, not
    /// the deployment's health).
    ContextWindow,
    /// The upstream's content filter refused the request; says nothing about health.
    ContentPolicy,
    /// 429 or an overload status; `retry_after_ms` from the upstream's header, if any.
    RateLimited {
        /// Milliseconds to stay away, from `Retry-After`.
        retry_after_ms: Option<u64>,
    },
    /// 5xx, a malformed answer or a broken stream.
    ServerError,
    /// The provider refused edgeroute's own credentials (401/403): the deployment is
    /// broken for everyone, so it counts as a server failure.
    AuthError,
    /// No answer in time.
    Timeout,
    /// The connection could not be made or was reset.
    ConnectError,
}

impl Outcome {
    /// Every outcome's stable name, in declaration order.
    pub const NAMES: [&'static str; 9] = [
        "success",
        "client_error",
        "context_window",
        "content_policy",
        "rate_limited",
        "server_error",
        "auth_error",
        "timeout",
        "connect_error",
    ];

    /// The stable snake_case name (one of [`Outcome::NAMES`]).
    pub fn name(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::ClientError => "client_error",
            Self::ContextWindow => "context_window",
            Self::ContentPolicy => "content_policy",
            Self::RateLimited { .. } => "rate_limited",
            Self::ServerError => "server_error",
            Self::AuthError => "auth_error",
            Self::Timeout => "timeout",
            Self::ConnectError => "connect_error",
        }
    }

    /// The outcome named `name`; `retry_after_ms` applies to `rate_limited` only.
    /// `None` for a name outside [`Outcome::NAMES`].
    pub fn from_name(name: &str, retry_after_ms: Option<u64>) -> Option<Self> {
        Some(match name {
            "success" => Self::Success,
            "client_error" => Self::ClientError,
            "context_window" => Self::ContextWindow,
            "content_policy" => Self::ContentPolicy,
            "rate_limited" => Self::RateLimited { retry_after_ms },
            "server_error" => Self::ServerError,
            "auth_error" => Self::AuthError,
            "timeout" => Self::Timeout,
            "connect_error" => Self::ConnectError,
            _ => return None,
        })
    }

    /// Whether the outcome counts against the deployment's health.
    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            Self::Success | Self::ClientError | Self::ContextWindow | Self::ContentPolicy
        )
    }
}

/// Circuit state as shown to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Serving.
    Closed,
    /// Ejected until the given time (ms on the router clock).
    Open,
    /// Ejection over; the next request is a probe.
    HalfOpen,
}

impl CircuitState {
    /// Lower-case name for status pages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Default)]
struct State {
    ewma_latency_ms: f64,
    /// Peak-EWMA latency of answers only (lost races do not lift it): what a lost race's wait
    /// is compared with.
    answered_ms: f64,
    /// Hedge races lost in a row without an answer, none answered since.
    lost_races: u32,
    error_rate: f64,
    /// Requests seen recently: a count decayed like the EWMAs.
    volume: f64,
    /// Failures among them.
    failed_volume: f64,
    last_ms: u64,
    consecutive_failures: u32,
    /// `consecutive_failures` just before the last success reset it: a stream that broke
    /// after that success continues the streak.
    streak_before_success: u32,
    ejections: u32,
    open_until_ms: u64,
    cooldown_until_ms: u64,
    /// Selection only: the provider limit edgeroute counts has no request left (not a failure,
    /// not the upstream's cool-down, which it must not shorten).
    limit_hold_until_ms: u64,
    probing: bool,
    requests: u64,
    failures: u64,
    /// Recent counts by sender, and who failed in the current streak.
    senders: Senders,
    streak: Streak,
    /// `streak` just before the last success reset it (with `streak_before_success`).
    streak_before: Streak,
    /// Ejections for one sender since start.
    sender_ejections: u64,
}

/// A snapshot of a deployment's health.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSnapshot {
    /// Circuit state now.
    pub circuit: CircuitState,
    /// Peak-EWMA latency in milliseconds (0 until the first success).
    pub latency_ms: f64,
    /// EWMA of the failure share, 0..1.
    pub error_rate: f64,
    /// Failures in a row.
    pub consecutive_failures: u32,
    /// Requests in flight.
    pub in_flight: u32,
    /// Milliseconds until a rate-limit cool-down ends (0: none).
    pub cooldown_ms: u64,
    /// Milliseconds until the provider limit edgeroute counts has a request again (0: none).
    pub limit_hold_ms: u64,
    /// Attempts reported since start.
    pub requests: u64,
    /// Failed attempts reported since start.
    pub failures: u64,
    /// Ejections for one sender alone since start (its failures alone tripped).
    pub sender_ejections: u64,
    /// Senders the deployment is ejected for now (their own ejection, or its probe out).
    pub senders_ejected: u32,
}

/// Health of one deployment; shared by all requests, cheap to read.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
    in_flight: AtomicU32,
    /// Some sender has an ejection on record: only then is the table asked per request.
    scoped: AtomicBool,
}

impl State {
    /// Decays the recent counts for the time since the last report; `w` is the weight kept.
    fn decay(&mut self, now_ms: u64, spec: &HealthSpec) -> f64 {
        let dt = now_ms.saturating_sub(self.last_ms) as f64;
        self.last_ms = now_ms;
        let w = (-dt / spec.ewma_decay_ms.max(1) as f64).exp();
        self.senders.decay(w);
        w
    }

    /// A failure of `sender` joins the streak (a 429, too: it counts but does not eject), unless
    /// the sender is inside its own ejection: then it is a request sent before it (in flight when
    /// it tripped), which counts for its numbers only. Returns whether it joined the streak.
    fn note_failure(&mut self, sender: u64) -> bool {
        self.failures += 1;
        if self.senders.inside(sender) {
            return false;
        }
        self.streak.add(sender, self.consecutive_failures == 0);
        self.consecutive_failures += 1;
        true
    }

    /// A failure counts towards ejection: after enough in a row, a high recent error rate, or
    /// a failed half-open probe, the circuit opens for an exponential time. When the failures
    /// that tripped are one sender's alone and other senders were seen lately, the deployment is
    /// ejected for that sender only: returns it (the circuit stays as it was for the others).
    fn fail(&mut self, sender: u64, now_ms: u64, spec: &HealthSpec) -> Option<u64> {
        if !self.note_failure(sender) {
            // Sent before its sender's own ejection: it neither ejects it again nor escalates it
            // (only its failed probe does), and is not in the others' streak.
            return None;
        }
        let was_probe = std::mem::take(&mut self.probing);
        let own_probe = self.senders.end_probe(sender);
        // Its own probe's failure is not in the others' streak.
        let others_streak = self.consecutive_failures.saturating_sub(u32::from(own_probe));
        if self.senders.other_set_aside(sender, now_ms, spec.ewma_decay_ms) {
            // While one sender is set aside, the others open the circuit for everyone on their own
            // evidence only (the trip rule, the ejected senders' failures left out), or a failed
            // half-open probe: one stray failure of theirs is not an outage.
            if was_probe || self.others_trip(sender, others_streak, now_ms, spec) {
                self.open(now_ms, spec);
                return None;
            }
            if !own_probe {
                return None;
            }
        }
        let window = spec.ewma_decay_ms.saturating_mul(SEEN_DECAYS);
        if was_probe || own_probe {
            // A failed probe ejects its sender alone while others may still be served; the next
            // probe is theirs (a poller cannot hold the circuit open for everyone).
            if self.senders.others_seen(sender, now_ms, window) {
                let ejected = self.eject_sender(sender, now_ms, spec);
                if own_probe {
                    self.consecutive_failures = others_streak;
                }
                return Some(ejected);
            }
            self.open(now_ms, spec);
            return None;
        }
        let rate_trips = self.error_rate >= spec.failure_rate && self.volume >= f64::from(spec.min_requests);
        let streak_trips = self.consecutive_failures >= spec.consecutive_failures;
        if !(rate_trips || streak_trips) {
            return None;
        }
        match self.one_senders(streak_trips, spec) {
            Some(one) if self.senders.others_seen(one, now_ms, window) => Some(self.eject_sender(one, now_ms, spec)),
            _ => {
                self.open(now_ms, spec);
                None
            }
        }
    }

    /// Whether the senders not set aside trip the circuit on their own (`sender` failed last):
    /// their `streak` (the set-aside senders' failures are kept out of it) or their error rate
    /// over `min_requests`; or, once a set-aside sender's probe failed too, a streak of
    /// [`OUTAGE_STREAK`] while their recent requests fail at half `failure_rate` or more.
    fn others_trip(&self, sender: u64, streak: u32, now_ms: u64, spec: &HealthSpec) -> bool {
        let keep = spec.ewma_decay_ms;
        let (volume, failed) = self.senders.counts_not_set_aside(now_ms, keep);
        let rate_trips = volume >= f64::from(spec.min_requests) && failed >= volume * spec.failure_rate;
        let outage = streak >= spec.consecutive_failures.min(OUTAGE_STREAK)
            && failed >= volume * spec.failure_rate / 2.0
            && self.senders.other_probe_failed(sender, now_ms, keep);
        rate_trips || streak >= spec.consecutive_failures || outage
    }

    /// Opens the circuit for everyone, for `base_ejection_ms` doubled per opening in a row.
    fn open(&mut self, now_ms: u64, spec: &HealthSpec) {
        let factor = 1u64 << self.ejections.min(16);
        let ejection = spec.base_ejection_ms.saturating_mul(factor).min(spec.max_ejection_ms);
        self.open_until_ms = now_ms + ejection;
        self.ejections += 1;
        self.consecutive_failures = 0;
        self.volume = 0.0;
        self.failed_volume = 0.0;
        self.senders.clear();
    }

    /// Ejects the deployment for `sender` alone (its own escalation); its streak is spent.
    fn eject_sender(&mut self, sender: u64, now_ms: u64, spec: &HealthSpec) -> u64 {
        self.senders.eject(
            sender,
            now_ms,
            spec.base_ejection_ms,
            spec.max_ejection_ms,
            spec.ewma_decay_ms,
        );
        self.sender_ejections += 1;
        self.consecutive_failures = 0;
        sender
    }

    /// The sender whose failures alone make what tripped: the streak is that sender's alone
    /// (for a rate trip, it fails most), and the other senders fail at under half the failure
    /// rate (or not at all). A flaky or dead deployment fails the others too: no one sender.
    fn one_senders(&self, streak_trips: bool, spec: &HealthSpec) -> Option<u64> {
        let suspect = if streak_trips {
            if self.streak.shared() {
                return None;
            }
            self.streak.sender
        } else {
            self.senders.worst()?
        };
        self.senders.others_fine(suspect, spec.failure_rate).then_some(suspect)
    }
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves numbers, not invariants: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request may be sent now (closed, or half-open with no probe out).
    pub fn available(&self, now_ms: u64) -> bool {
        let s = self.lock();
        now_ms >= s.cooldown_until_ms.max(s.limit_hold_until_ms)
            && (now_ms >= s.open_until_ms && !(s.probing && s.ejections > 0))
    }

    /// Whether the circuit is open (ejected) at `now_ms`.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        now_ms < self.lock().open_until_ms
    }

    /// Marks an attempt as started; a half-open circuit lets only one probe through.
    pub fn begin(&self, now_ms: u64) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        if s.ejections > 0 && now_ms >= s.open_until_ms {
            s.probing = true;
        }
    }

    /// [`Health::begin`] for an attempt of `sender`: after its own ejection it is its probe.
    /// `keep_ms` (the decay window): a sender's escalation is forgotten that long after its last
    /// ejection ended (at least the ejection's length), as if it were new.
    pub fn begin_sender(&self, now_ms: u64, sender: u64, keep_ms: u64) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut s = self.lock();
        if s.ejections > 0 && now_ms >= s.open_until_ms {
            s.probing = true;
        }
        // Always asked (the lock is held anyway): a sender whose ejection ended probes even
        // after the fast-path flag went off, and a long-gone sender's escalation is forgotten.
        s.senders.begin(sender, now_ms, keep_ms);
        self.note_scoped(&s, now_ms);
    }

    /// Whether the deployment is ejected for `sender` alone at `now_ms` (its own ejection, or
    /// its own probe is out): its requests skip it as if the circuit were open.
    pub fn ejected_for(&self, sender: u64, now_ms: u64) -> bool {
        if !self.scoped.load(Ordering::Relaxed) {
            return false;
        }
        let s = self.lock();
        let ejected = s.senders.ejected(sender, now_ms);
        if !ejected {
            self.note_scoped(&s, now_ms); // the last ejection may have run out: fast path again
        }
        ejected
    }

    /// Keeps the fast-path flags in step with the table: on while some sender is ejected now.
    fn note_scoped(&self, s: &State, now_ms: u64) {
        let now = s.senders.any_ejected(now_ms);
        if self.scoped.swap(now, Ordering::Relaxed) != now {
            if now {
                SCOPED_DEPLOYMENTS.fetch_add(1, Ordering::Relaxed);
            } else {
                SCOPED_DEPLOYMENTS.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Peak-EWMA latency of answered attempts (0 until one was measured).
    pub fn latency_ms(&self) -> f64 {
        self.lock().ewma_latency_ms
    }

    /// Records the end of an attempt cancelled after `elapsed_ms` because another one of its
    /// request answered first (a hedge race); `answering`: its response head had come. Its wait
    /// is a lower bound on its latency, which lifts the peak EWMA (never lowers it): a primary
    /// that hung while its hedges won kept its place first in `fastest` for good. A loser with
    /// no head that waited `spec.lost_race_factor` times its answers' latency (or that never
    /// answered) is evidence of a hang: from the `spec.lost_races_in_a_row`th in a row with no
    /// answer between, each is a timeout for the circuit; else it is no failure (a client's
    /// cancellation). Returns the sender ejected alone as [`Health::report`] does.
    pub fn report_lost_race(
        &self,
        elapsed_ms: f64,
        answering: bool,
        sender: u64,
        now_ms: u64,
        spec: &HealthSpec,
    ) -> Option<u64> {
        let hung = {
            let mut s = self.lock();
            s.ewma_latency_ms = s.ewma_latency_ms.max(elapsed_ms);
            if answering {
                s.lost_races = 0;
                false
            } else if s.answered_ms > 0.0 && elapsed_ms < spec.lost_race_factor * s.answered_ms {
                false // slower than its hedge, not than itself: the streak waits, unbroken
            } else {
                s.lost_races = s.lost_races.saturating_add(1);
                s.lost_races >= spec.lost_races_in_a_row
            }
        };
        let outcome = if hung { Outcome::Timeout } else { Outcome::ClientError };
        self.report(outcome, elapsed_ms, sender, now_ms, spec)
    }

    /// Load score for p2c: latency (or a neutral prior) times in-flight plus one.
    pub fn load_score(&self) -> f64 {
        let lat = self.lock().ewma_latency_ms;
        let lat = if lat > 0.0 { lat } else { 1.0 };
        lat * f64::from(self.in_flight() + 1)
    }

    /// Records the end of an attempt started with [`Health::begin`], sent by `sender` (0:
    /// unknown). Returns the sender the deployment was just ejected for alone (its failures
    /// alone tripped while other senders were seen lately).
    pub fn report(
        &self,
        outcome: Outcome,
        latency_ms: f64,
        sender: u64,
        now_ms: u64,
        spec: &HealthSpec,
    ) -> Option<u64> {
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        let mut s = self.lock();
        let w = s.decay(now_ms, spec);
        s.requests += 1;
        let failed = outcome.is_failure();
        // Decayed counts of failures and of all requests: their ratio is the recent error rate.
        s.failed_volume = s.failed_volume * w + if failed { 1.0 } else { 0.0 };
        s.volume = s.volume * w + 1.0;
        s.error_rate = s.failed_volume / s.volume;
        // A client's own errors (and its cancellations, lost hedges) say nothing of how the
        // deployment serves it: they are not evidence that others are served.
        if !matches!(
            outcome,
            Outcome::ClientError | Outcome::ContextWindow | Outcome::ContentPolicy
        ) {
            s.senders.add(sender, failed, now_ms);
        }
        let aside = self.outcome(&mut s, outcome, latency_ms, sender, now_ms, spec, w);
        self.note_scoped(&s, now_ms);
        aside
    }

    /// The circuit's part of [`Health::report`].
    #[allow(clippy::too_many_arguments)]
    fn outcome(
        &self,
        s: &mut State,
        outcome: Outcome,
        latency_ms: f64,
        sender: u64,
        now_ms: u64,
        spec: &HealthSpec,
        w: f64,
    ) -> Option<u64> {
        match outcome {
            Outcome::Success => {
                // Peak EWMA: jump up at once, decay slowly.
                s.ewma_latency_ms = if latency_ms > s.ewma_latency_ms || s.ewma_latency_ms == 0.0 {
                    latency_ms
                } else {
                    s.ewma_latency_ms * w + latency_ms * (1.0 - w)
                };
                s.answered_ms = if latency_ms > s.answered_ms || s.answered_ms == 0.0 {
                    latency_ms
                } else {
                    s.answered_ms * w + latency_ms * (1.0 - w)
                };
                s.lost_races = 0;
                s.streak_before_success = s.consecutive_failures;
                s.streak_before = s.streak;
                s.consecutive_failures = 0;
                if s.probing || s.ejections > 0 {
                    s.ejections = 0;
                    s.probing = false;
                    s.open_until_ms = 0;
                    s.senders.pardon_all(); // it serves again: every sender's ejection ends
                } else {
                    s.senders.pardon(sender);
                }
                None
            }
            Outcome::ClientError | Outcome::ContextWindow | Outcome::ContentPolicy => {
                s.probing = false;
                s.senders.end_probe(sender);
                None
            }
            Outcome::RateLimited { retry_after_ms } => {
                s.note_failure(sender);
                let wait = retry_after_ms.unwrap_or(1_000).min(spec.max_ejection_ms);
                s.cooldown_until_ms = s.cooldown_until_ms.max(now_ms + wait);
                s.probing = false;
                s.senders.end_probe(sender);
                None
            }
            Outcome::ServerError | Outcome::AuthError | Outcome::Timeout | Outcome::ConnectError => {
                s.fail(sender, now_ms, spec)
            }
        }
    }

    /// Turns the last reported success of `sender` into a failure: a stream that broke after
    /// its first content was reported. The attempt is neither in flight nor counted again; only
    /// its verdict changes, so the error rate sees one failed request, not a success and a
    /// failure. Returns the sender ejected alone as [`Health::report`] does.
    pub fn fail_after_success(&self, sender: u64, now_ms: u64, spec: &HealthSpec) -> Option<u64> {
        let mut s = self.lock();
        let w = s.decay(now_ms, spec);
        s.volume = (s.volume * w).max(1.0);
        s.failed_volume = (s.failed_volume * w + 1.0).min(s.volume);
        s.error_rate = s.failed_volume / s.volume;
        s.senders.fail_last(sender);
        if s.streak_before_success > s.consecutive_failures && !s.senders.inside(sender) {
            s.consecutive_failures = s.streak_before_success;
            s.streak = s.streak_before;
        }
        let aside = s.fail(sender, now_ms, spec);
        self.note_scoped(&s, now_ms);
        aside
    }

    /// Keeps selection off the deployment for `ms`: the provider limit edgeroute counts for it
    /// has no request left. Not an attempt: no failure, no in-flight change.
    pub fn hold_for_limit(&self, ms: u64, now_ms: u64) {
        let mut s = self.lock();
        s.limit_hold_until_ms = s.limit_hold_until_ms.max(now_ms + ms);
    }

    /// Ends a [`Health::hold_for_limit`] at once (the request that drained the limit gave its
    /// take back); an upstream's cool-down and the circuit stay as they are.
    pub fn end_limit_hold(&self) {
        self.lock().limit_hold_until_ms = 0;
    }

    /// Clears an ejection at once, e.g. after an active health check answered.
    pub fn restore(&self) {
        let mut s = self.lock();
        s.open_until_ms = 0;
        s.ejections = 0;
        s.probing = false;
        s.consecutive_failures = 0;
        s.cooldown_until_ms = 0;
        s.senders.pardon_all();
        let now_ms = s.last_ms;
        self.note_scoped(&s, now_ms);
    }

    /// Takes the deployment out now for `ms`, e.g. after a failed active health check.
    pub fn eject_for(&self, ms: u64, now_ms: u64) {
        let mut s = self.lock();
        s.open_until_ms = now_ms + ms;
        s.ejections = s.ejections.max(1);
    }

    /// Whether the deployment serves this process's traffic well now, its most failing sender
    /// set aside: the others' recent requests are enough to judge and fail at under half the
    /// failure rate. A circuit another instance opened (health sharing) is not applied against
    /// such evidence: it may be one sender's doing there (that sender may be failing here too,
    /// hence set aside), and a real outage soon fails the others' requests here as well.
    pub fn serving_well(&self, now_ms: u64, spec: &HealthSpec) -> bool {
        let s = self.lock();
        let dt = now_ms.saturating_sub(s.last_ms) as f64;
        let w = (-dt / spec.ewma_decay_ms.max(1) as f64).exp();
        let aside = s.senders.worst();
        let rate = spec.failure_rate;
        s.senders.served_well_without(None, rate, w) || s.senders.served_well_without(aside, rate, w)
    }

    /// The state for status pages and tests.
    pub fn snapshot(&self, now_ms: u64) -> HealthSnapshot {
        let s = self.lock();
        let circuit = if now_ms < s.open_until_ms {
            CircuitState::Open
        } else if s.ejections > 0 {
            CircuitState::HalfOpen
        } else {
            CircuitState::Closed
        };
        HealthSnapshot {
            circuit,
            latency_ms: s.ewma_latency_ms,
            error_rate: s.error_rate,
            consecutive_failures: s.consecutive_failures,
            in_flight: self.in_flight(),
            cooldown_ms: s.cooldown_until_ms.saturating_sub(now_ms),
            limit_hold_ms: s.limit_hold_until_ms.saturating_sub(now_ms),
            requests: s.requests,
            failures: s.failures,
            sender_ejections: s.sender_ejections,
            senders_ejected: s.senders.ejected_count(now_ms),
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        if *self.scoped.get_mut() {
            SCOPED_DEPLOYMENTS.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_round_trip() {
        for name in Outcome::NAMES {
            let o = Outcome::from_name(name, Some(5)).expect("every listed name parses");
            assert_eq!(o.name(), name);
        }
        assert_eq!(
            Outcome::from_name("rate_limited", Some(5)),
            Some(Outcome::RateLimited {
                retry_after_ms: Some(5)
            })
        );
        assert_eq!(Outcome::from_name("rate_limit", None), None);
        assert_eq!(Outcome::from_name("", None), None);
    }

    #[test]
    fn request_caused_outcomes_leave_health_alone_and_auth_errors_eject() {
        for o in [Outcome::ClientError, Outcome::ContextWindow, Outcome::ContentPolicy] {
            let h = Health::default();
            for t in 0..10 {
                h.report(o, 1.0, 0, t, &spec());
            }
            assert!(h.available(11), "{o:?}");
            assert_eq!(h.snapshot(11).failures, 0, "{o:?}");
        }
        let h = Health::default();
        for t in 0..3 {
            h.report(Outcome::AuthError, 1.0, 0, t, &spec());
        }
        assert!(h.is_ejected(4));
    }

    fn spec() -> HealthSpec {
        HealthSpec {
            consecutive_failures: 3,
            base_ejection_ms: 1_000,
            ..HealthSpec::default()
        }
    }

    /// A hedge race lost at `t` after `ms`, its head (`answering`) come or not.
    fn lose(h: &Health, ms: f64, answering: bool, t: u64) -> Option<u64> {
        h.begin(t);
        h.report_lost_race(ms, answering, 0, t, &spec())
    }

    #[test]
    fn a_deployment_that_loses_every_race_without_answering_opens_its_circuit() {
        let h = Health::default();
        h.begin(0);
        // Answered in 20 ms once, then hung: each race lost after 200 ms, no head. The first
        // `lost_races_in_a_row` - 1 are no failure; then each is a timeout, and
        // `consecutive_failures` (3) of them open it.
        h.report(Outcome::Success, 20.0, 0, 0, &spec());
        for t in 1..u64::from(spec().lost_races_in_a_row) {
            lose(&h, 200.0, false, t);
            assert_eq!(h.snapshot(t).failures, 0);
        }
        for t in 0..3 {
            assert_eq!(h.snapshot(10 + t).circuit, CircuitState::Closed);
            lose(&h, 200.0, false, 10 + t);
        }
        assert_eq!(h.snapshot(20).circuit, CircuitState::Open);
        // `fastest` sees it too.
        assert!(h.snapshot(20).latency_ms >= 200.0);
        // Half-open after the ejection: its probe loses a race without answering: open again.
        assert!(h.available(1_013));
        lose(&h, 200.0, false, 1_013);
        assert_eq!(h.snapshot(1_014).circuit, CircuitState::Open);
    }

    #[test]
    fn the_hung_loser_settings_are_the_specs() {
        // `lost_races_in_a_row: 1`: the first hung-looking loss is a timeout already.
        let eager = HealthSpec {
            lost_races_in_a_row: 1,
            ..spec()
        };
        let h = Health::default();
        h.begin(0);
        h.report(Outcome::Success, 20.0, 0, 0, &eager);
        h.begin(1);
        h.report_lost_race(200.0, false, 0, 1, &eager);
        assert_eq!(h.snapshot(2).failures, 1);
        // `lost_race_factor: 20`: a loss after 10 times its usual 20 ms is not a hang.
        let patient = HealthSpec {
            lost_races_in_a_row: 1,
            lost_race_factor: 20.0,
            ..spec()
        };
        let h = Health::default();
        h.begin(0);
        h.report(Outcome::Success, 20.0, 0, 0, &patient);
        for t in 1..10 {
            h.begin(t);
            h.report_lost_race(200.0, false, 0, t, &patient);
        }
        assert_eq!(h.snapshot(10).failures, 0);
    }

    #[test]
    fn a_slower_deployment_that_answers_loses_races_and_stays_closed() {
        let h = Health::default();
        for t in 0..50 {
            if t % 10 == 0 {
                h.begin(t);
                h.report(Outcome::Success, 300.0, 0, t, &spec()); // answers in 300 ms when not hedged
            } else {
                lose(&h, 120.0, false, t); // loses at 120 ms: slower than its hedge, not hung
            }
        }
        // A stream whose head came is answering, however long it waited.
        let s = Health::default();
        (0..20).for_each(|t| {
            lose(&s, 5_000.0, true, t);
        });
        for h in [h, s] {
            let snap = h.snapshot(60);
            assert_eq!((snap.circuit, snap.failures), (CircuitState::Closed, 0), "{snap:?}");
        }
        // An answer between hung-looking losses starts their count again.
        let h = Health::default();
        for round in 0..10 {
            let t = round * 10;
            lose(&h, 200.0, false, t);
            lose(&h, 200.0, false, t + 1);
            h.begin(t + 2);
            h.report(Outcome::Success, 20.0, 0, t + 2, &spec());
        }
        assert_eq!(h.snapshot(200).failures, 0);
    }

    #[test]
    fn broken_streams_count_once_each_as_failures_and_open_the_circuit() {
        let h = Health::default();
        let sp = spec();
        h.begin(0);
        h.begin(0); // another request still in flight
        h.report(Outcome::Success, 5.0, 0, 1, &sp);
        h.fail_after_success(0, 2, &sp);
        let snap = h.snapshot(2);
        assert_eq!((snap.in_flight, snap.requests, snap.failures), (1, 1, 1));
        assert!((snap.error_rate - 1.0).abs() < 1e-9, "{snap:?}");
        for t in 3..5 {
            h.begin(t);
            h.report(Outcome::Success, 5.0, 0, t, &sp);
            h.fail_after_success(0, t, &sp);
        }
        assert_eq!(h.snapshot(5).circuit, CircuitState::Open);
    }

    #[test]
    fn opens_after_consecutive_failures_and_grows() {
        let h = Health::default();
        let sp = spec();
        for _ in 0..3 {
            h.begin(0);
            h.report(Outcome::ServerError, 5.0, 0, 0, &sp);
        }
        assert!(!h.available(10));
        assert_eq!(h.snapshot(10).circuit, CircuitState::Open);
        // Half-open after the ejection: one probe only.
        assert!(h.available(1_000));
        h.begin(1_000);
        assert!(!h.available(1_001));
        h.report(Outcome::ServerError, 5.0, 0, 1_001, &sp);
        // Second ejection is twice as long.
        assert!(!h.available(2_900));
        assert!(h.available(3_001));
        h.begin(3_001);
        h.report(Outcome::Success, 5.0, 0, 3_002, &sp);
        assert_eq!(h.snapshot(3_003).circuit, CircuitState::Closed);
        assert!(h.available(3_003));
    }

    #[test]
    fn rate_limit_cools_down_until_retry_after() {
        let h = Health::default();
        h.begin(0);
        h.report(
            Outcome::RateLimited {
                retry_after_ms: Some(2_000),
            },
            1.0,
            0,
            0,
            &spec(),
        );
        assert!(!h.available(1_999));
        assert!(h.available(2_000));
        assert_eq!(h.snapshot(0).failures, 1);
    }

    #[test]
    fn a_limit_hold_is_no_failure_and_ends_without_shortening_a_retry_after() {
        let h = Health::default();
        h.hold_for_limit(60_000, 0);
        let snap = h.snapshot(0);
        assert!(!h.available(59_999) && h.available(60_000));
        assert_eq!((snap.limit_hold_ms, snap.cooldown_ms, snap.failures), (60_000, 0, 0));
        assert_eq!(
            (snap.consecutive_failures, snap.error_rate, snap.in_flight),
            (0, 0.0, 0)
        );
        h.end_limit_hold();
        assert!(h.available(1));
        // The upstream's own 429 cool-down outlives the end of a hold.
        h.hold_for_limit(60_000, 0);
        h.begin(0);
        let limited = Outcome::RateLimited {
            retry_after_ms: Some(2_000),
        };
        h.report(limited, 1.0, 0, 0, &spec());
        h.end_limit_hold();
        assert!(!h.available(1_999) && h.available(2_000));
        assert_eq!(h.snapshot(0).limit_hold_ms, 0);
    }

    #[test]
    fn client_errors_do_not_count() {
        let h = Health::default();
        for _ in 0..10 {
            h.begin(0);
            h.report(Outcome::ClientError, 1.0, 0, 0, &spec());
        }
        assert!(h.available(0));
        assert_eq!(h.in_flight(), 0);
    }

    #[test]
    fn a_high_error_rate_opens_the_circuit_without_consecutive_failures() {
        let h = Health::default();
        let sp = HealthSpec {
            consecutive_failures: 100,
            failure_rate: 0.5,
            min_requests: 10,
            ..spec()
        };
        // Alternating failures never reach 100 in a row, but half of all requests fail.
        let mut opened_at = None;
        for i in 0..40u64 {
            h.begin(i);
            let o = if i % 2 == 0 {
                Outcome::ServerError
            } else {
                Outcome::Success
            };
            h.report(o, 1.0, 0, i, &sp);
            if opened_at.is_none() && !h.available(i) {
                opened_at = Some(i);
            }
        }
        let at = opened_at.expect("the error rate should open the circuit");
        assert!(at >= 9, "not before min_requests: {at}");
    }

    const A: u64 = 11;
    const B: u64 = 22;

    /// Only the error rate trips: at half of at least 10 recent requests.
    fn rate_spec() -> HealthSpec {
        HealthSpec {
            consecutive_failures: 100,
            failure_rate: 0.5,
            min_requests: 10,
            ..spec()
        }
    }

    /// Half of all recent requests failed, and yet the circuit is closed: the trip ejected the
    /// deployment for one sender (A) alone.
    fn closed_at_half_failed(h: &Health, t: u64) {
        let snap = h.snapshot(t);
        assert_eq!(snap.circuit, CircuitState::Closed, "{snap:?}");
        assert!(snap.error_rate >= 0.5 && snap.sender_ejections > 0, "{snap:?}");
        assert!(
            h.ejected_for(A, t) && !h.ejected_for(B, t) && h.available(t),
            "{snap:?}"
        );
    }

    /// One attempt of `sender` at `t`: begun and reported; the sender ejected alone, if any.
    fn one(h: &Health, o: Outcome, sender: u64, t: u64, sp: &HealthSpec) -> Option<u64> {
        h.begin_sender(t, sender, sp.ewma_decay_ms);
        h.report(o, 5.0, sender, t, sp)
    }

    #[test]
    fn one_senders_streak_ejects_the_deployment_for_that_sender_alone() {
        let h = Health::default();
        let sp = spec();
        for t in 0..5 {
            one(&h, Outcome::Success, B, t, &sp);
        }
        // A's third failure in a row ejects d for A alone, and says so.
        for t in 5..8 {
            assert_eq!(one(&h, Outcome::Timeout, A, t, &sp), (t == 7).then_some(A), "{t}");
        }
        let snap = h.snapshot(8);
        assert_eq!(
            (snap.circuit, snap.sender_ejections, snap.senders_ejected),
            (CircuitState::Closed, 1, 1)
        );
        assert!(h.ejected_for(A, 8) && !h.ejected_for(B, 8) && h.available(8));
        for t in 8..40 {
            one(&h, Outcome::Success, B, t, &sp); // B is served throughout
        }
        assert!(
            h.ejected_for(A, 1_006) && !h.ejected_for(A, 1_007),
            "for base_ejection_ms"
        );
        assert_eq!(h.snapshot(40).circuit, CircuitState::Closed);
    }

    #[test]
    fn a_quiet_victim_seen_lately_still_keeps_the_circuit_closed() {
        // B was served 20 s ago and is quiet since (no evidence it is served now): A's streak
        // ejects d for A alone; B's next request is served.
        let h = Health::default();
        let sp = spec();
        for t in 0..5 {
            one(&h, Outcome::Success, B, t, &sp);
        }
        for t in 20_000..20_003 {
            one(&h, Outcome::ServerError, A, t, &sp);
        }
        assert!(h.ejected_for(A, 20_003) && h.available(20_003));
        assert_eq!(h.snapshot(20_003).circuit, CircuitState::Closed);
    }

    #[test]
    fn another_senders_streak_while_one_is_ejected_opens_for_everyone_and_escalates() {
        // A real outage seen by two senders: A's streak ejects d for A; B's own streak opens it
        // for all (B's requests fail over); probes escalate.
        let h = Health::default();
        let sp = spec();
        for t in 0..5 {
            one(&h, Outcome::Success, A, t, &sp);
            one(&h, Outcome::Success, B, t, &sp);
        }
        for t in 10..13 {
            one(&h, Outcome::ConnectError, A, t, &sp);
        }
        assert!(h.ejected_for(A, 13) && h.available(13));
        for t in 13..15 {
            assert_eq!(one(&h, Outcome::ConnectError, B, t, &sp), None);
            assert_eq!(h.snapshot(t).circuit, CircuitState::Closed, "not yet B's streak");
        }
        assert_eq!(one(&h, Outcome::ConnectError, B, 15, &sp), None);
        let snap = h.snapshot(16);
        assert_eq!((snap.circuit, snap.senders_ejected), (CircuitState::Open, 0));
        assert!(!h.available(1_014) && h.available(1_015));
        // B probes and fails: A was seen lately, so B alone is ejected; A's probe fails next:
        // a failed half-open probe while B is ejected, and it opens for all for twice as long.
        assert_eq!(one(&h, Outcome::Timeout, B, 1_015, &sp), Some(B));
        assert!(h.ejected_for(B, 1_016) && h.available(1_016));
        assert_eq!(one(&h, Outcome::Timeout, A, 1_016, &sp), None);
        assert!(!h.available(3_015) && h.available(3_016));
        assert_eq!(h.snapshot(3_015).circuit, CircuitState::Open);
        // Recovered: the next probe closes it, and no sender stays ejected.
        one(&h, Outcome::Success, A, 3_016, &sp);
        assert!(h.available(3_017) && !h.ejected_for(A, 3_017) && !h.ejected_for(B, 3_017));
    }

    #[test]
    fn a_senders_own_probe_goes_alone_and_escalates_its_ejection() {
        let h = Health::default();
        let sp = spec();
        for t in 0..5 {
            one(&h, Outcome::Success, B, t, &sp);
        }
        for t in 5..8 {
            one(&h, Outcome::Timeout, A, t, &sp);
        }
        // After its ejection A's next attempt is its probe: its other requests still skip d.
        h.begin_sender(1_007, A, sp.ewma_decay_ms);
        assert!(h.ejected_for(A, 1_008));
        assert_eq!(h.report(Outcome::Timeout, 1.0, A, 1_008, &sp), Some(A));
        assert!(h.ejected_for(A, 2_007) && !h.ejected_for(A, 2_008), "base_ejection_ms");
        one(&h, Outcome::Success, A, 2_008, &sp);
        assert!(!h.ejected_for(A, 2_009), "served: its ejection is over");
        assert_eq!(h.snapshot(2_009).circuit, CircuitState::Closed);
    }

    #[test]
    fn two_senders_failing_open_the_circuit() {
        let h = Health::default();
        let sp = spec();
        for t in 0..5 {
            one(&h, Outcome::Success, B, t, &sp);
            one(&h, Outcome::Success, A, t, &sp);
        }
        one(&h, Outcome::Timeout, A, 6, &sp);
        one(&h, Outcome::ServerError, B, 7, &sp);
        assert_eq!(one(&h, Outcome::ConnectError, A, 8, &sp), None);
        assert_eq!(h.snapshot(9).circuit, CircuitState::Open);
        assert_eq!(h.snapshot(9).sender_ejections, 0);
    }

    #[test]
    fn a_deployment_only_one_sender_uses_opens_as_before() {
        let h = Health::default();
        let sp = spec();
        for t in 0..5 {
            one(&h, Outcome::Success, A, t, &sp);
        }
        // B was seen, but a minute ago: long decayed.
        one(&h, Outcome::Success, B, 0, &sp);
        for t in 60_000..60_003 {
            assert_eq!(one(&h, Outcome::ServerError, A, t, &sp), None);
        }
        assert_eq!(h.snapshot(60_003).circuit, CircuitState::Open);
    }

    #[test]
    fn the_error_rate_trips_only_with_the_most_failing_sender_set_aside() {
        let h = Health::default();
        let sp = rate_spec();
        // A fails every request, B none: half of all fail, but none of B's.
        for t in 0..40 {
            one(&h, Outcome::ServerError, A, t, &sp);
            one(&h, Outcome::Success, B, t, &sp);
        }
        closed_at_half_failed(&h, 40);
        // Now B's requests fail too: once B's own error rate trips (A's failures left out), while
        // A is ejected, it opens for everyone.
        let mut opened = None;
        for t in 40..100 {
            one(&h, Outcome::ServerError, A, t, &sp);
            one(&h, Outcome::Timeout, B, t, &sp);
            if opened.is_none() && h.is_ejected(t) {
                opened = Some(t);
            }
        }
        assert!(matches!(opened, Some(t) if t > 40), "{opened:?} {:?}", h.snapshot(100));
    }

    #[test]
    fn a_failed_half_open_probe_ejects_its_sender_and_a_second_senders_reopens() {
        let h = Health::default();
        let sp = spec();
        for t in 0..5 {
            one(&h, Outcome::Success, B, t, &sp);
        }
        one(&h, Outcome::Timeout, A, 5, &sp);
        one(&h, Outcome::Timeout, B, 6, &sp);
        one(&h, Outcome::Timeout, A, 7, &sp);
        assert_eq!(h.snapshot(8).circuit, CircuitState::Open);
        for t in 100..110 {
            one(&h, Outcome::ClientError, B, t, &sp); // B is seen while A probes
        }
        // Half-open after the ejection: A's probe fails; B was seen lately, so d is ejected
        // for A alone (a poller cannot hold it open for all), and the next probe is B's.
        assert!(h.available(1_007));
        assert_eq!(one(&h, Outcome::Timeout, A, 1_007, &sp), Some(A));
        assert_eq!(h.snapshot(1_008).circuit, CircuitState::HalfOpen);
        assert!(h.ejected_for(A, 1_008) && h.available(1_008));
        // B's probe fails too: it opens for everyone, twice as long.
        assert_eq!(one(&h, Outcome::Timeout, B, 1_008, &sp), None);
        assert_eq!(h.snapshot(1_009).circuit, CircuitState::Open);
        assert!(!h.available(3_007) && h.available(3_008));
    }

    #[test]
    fn passing_senders_churning_the_table_do_not_evict_the_failing_one() {
        let h = Health::default();
        let sp = rate_spec();
        // Forty senders of one request each take the table's quiet slots in turn; A, whose
        // every request fails, keeps its own, so it is still the one set aside.
        for t in 0..40 {
            one(&h, Outcome::Success, 1_000 + t, t, &sp);
            one(&h, Outcome::ServerError, A, t, &sp);
        }
        closed_at_half_failed(&h, 40);
    }

    #[test]
    fn a_flaky_deployment_opens_when_one_sender_sends_most_of_its_traffic() {
        let h = Health::default();
        let sp = rate_spec();
        // Nine requests in ten are A's, one B's; half of each sender's requests fail (a
        // balancer with one of two backends dead). B is not served well: the rate opens it.
        let mut opened = None;
        for t in 0..200u64 {
            let sender = if t % 10 == 0 { B } else { A };
            let o = if t % 4 < 2 {
                Outcome::ServerError
            } else {
                Outcome::Success
            };
            one(&h, o, sender, t, &sp);
            if opened.is_none() && h.is_ejected(t) {
                opened = Some(t);
            }
        }
        assert!(opened.is_some_and(|t| t < 20), "{opened:?} {:?}", h.snapshot(200));
    }

    #[test]
    fn others_client_errors_and_cancellations_are_not_evidence_they_are_served() {
        let h = Health::default();
        let sp = spec();
        // B's requests all end as its own errors or cancellations (a short client timeout
        // against a hung deployment); A's time out. The deployment serves no one: it opens.
        for t in 0..10 {
            one(&h, Outcome::ClientError, B, t, &sp);
        }
        for t in 10..13 {
            assert_eq!(one(&h, Outcome::Timeout, A, t, &sp), None);
        }
        assert_eq!(h.snapshot(13).circuit, CircuitState::Open);
    }

    #[test]
    fn serving_well_sets_the_most_failing_sender_aside() {
        // A sends a few failing requests to this instance too, beside B's successes: B is
        // still served well, so an ejection A caused elsewhere is not applied here.
        let h = Health::default();
        let sp = rate_spec();
        for t in 0..8 {
            one(&h, Outcome::Success, B, t, &sp);
        }
        for t in 8..12 {
            one(&h, Outcome::ServerError, A, t, &sp);
        }
        assert!(h.serving_well(12, &sp));
        one(&h, Outcome::ServerError, B, 12, &sp);
        one(&h, Outcome::ServerError, B, 13, &sp);
        one(&h, Outcome::ServerError, B, 14, &sp);
        assert!(!h.serving_well(15, &sp), "3 of B's 11 failed: over a quarter");
    }

    #[test]
    fn serving_well_needs_enough_recent_requests_failing_rarely() {
        let h = Health::default();
        let sp = rate_spec();
        for t in 0..4 {
            one(&h, Outcome::Success, B, t, &sp);
        }
        assert!(!h.serving_well(4, &sp), "four requests: too few to judge");
        one(&h, Outcome::Success, B, 4, &sp);
        one(&h, Outcome::ServerError, B, 5, &sp);
        assert!(h.serving_well(6, &sp), "1 failed of 6");
        one(&h, Outcome::ServerError, B, 6, &sp);
        assert!(!h.serving_well(7, &sp), "2 failed of 7: over a quarter");
        assert!(!h.serving_well(60_000, &sp), "a minute later: long decayed");
    }

    #[test]
    fn a_broken_stream_counts_for_its_sender() {
        let h = Health::default();
        let sp = spec();
        for t in 0..5 {
            one(&h, Outcome::Success, B, t, &sp);
        }
        for t in 5..10 {
            one(&h, Outcome::Success, A, t, &sp);
            let aside = h.fail_after_success(A, t, &sp);
            assert_eq!(aside, (t == 7).then_some(A), "{t}");
        }
        assert_eq!(h.snapshot(10).circuit, CircuitState::Closed);
        one(&h, Outcome::Success, B, 10, &sp);
        h.fail_after_success(B, 10, &sp);
        assert_eq!(h.snapshot(10).circuit, CircuitState::Open);
    }

    /// B's requests served over `b`, then A's timing out over `a` (one a millisecond).
    fn b_served_then_a_times_out(h: &Health, sp: &HealthSpec, b: std::ops::Range<u64>, a: std::ops::Range<u64>) {
        for t in b {
            one(h, Outcome::Success, B, t, sp);
        }
        for t in a {
            one(h, Outcome::Timeout, A, t, sp);
        }
    }

    /// Default-like health: a streak of 5, half of 20 recent requests, 30 s base ejection.
    fn default_like() -> HealthSpec {
        HealthSpec {
            consecutive_failures: 5,
            failure_rate: 0.5,
            min_requests: 20,
            base_ejection_ms: 30_000,
            ..HealthSpec::default()
        }
    }

    #[test]
    fn a_stray_failure_of_another_sender_while_one_is_ejected_keeps_the_circuit_closed() {
        // redQ2 F1 (armed.py): one stray 500 of well-served B while A is ejected is not an outage.
        let h = Health::default();
        let sp = default_like();
        b_served_then_a_times_out(&h, &sp, 0..30, 30..35);
        assert!(h.ejected_for(A, 35));
        for t in 35..65 {
            one(&h, Outcome::Success, B, t, &sp);
        }
        assert_eq!(one(&h, Outcome::ServerError, B, 65, &sp), None);
        assert_eq!(h.snapshot(66).circuit, CircuitState::Closed);
        assert!(h.available(66) && !h.ejected_for(B, 66));
        // A genuine outage still opens for everyone: B's own streak.
        for t in 66..69 {
            one(&h, Outcome::ServerError, B, t, &sp);
            assert_eq!(h.snapshot(t).circuit, CircuitState::Closed);
        }
        one(&h, Outcome::ServerError, B, 69, &sp);
        assert_eq!(h.snapshot(70).circuit, CircuitState::Open);
    }

    #[test]
    fn a_senders_first_ejection_is_short_and_escalates_from_base_ejection() {
        // redQ2 F2: a busy client that alone saw a blip is back after a short pause; a sender
        // whose probes keep failing escalates from base_ejection_ms.
        let h = Health::default();
        let sp = default_like();
        b_served_then_a_times_out(&h, &sp, 0..10, 10..15);
        assert!(h.ejected_for(A, 1_013) && !h.ejected_for(A, 1_014), "first: 1 s");
        assert_eq!(one(&h, Outcome::Timeout, A, 1_014, &sp), Some(A));
        assert!(h.ejected_for(A, 31_013) && !h.ejected_for(A, 31_014), "then base");
        assert_eq!(one(&h, Outcome::Timeout, A, 31_014, &sp), Some(A));
        assert!(h.ejected_for(A, 91_013) && !h.ejected_for(A, 91_014), "then doubled");
    }

    #[test]
    fn a_senders_escalation_is_forgotten_after_its_absence() {
        // redQ2 F3 (stale.py): A, ejected three times in a row, leaves before its probe and
        // returns a minute later: its first request is no probe, one stray failure ejects
        // nothing, and its next streak's ejection is a first one again.
        let h = Health::default();
        let sp = spec(); // streak 3, base 1 s, decay window 10 s
        b_served_then_a_times_out(&h, &sp, 0..5, 5..8);
        assert_eq!(one(&h, Outcome::Timeout, A, 1_007, &sp), Some(A));
        assert_eq!(one(&h, Outcome::Timeout, A, 2_007, &sp), Some(A));
        let back = 60_000;
        one(&h, Outcome::Success, B, back, &sp);
        h.begin_sender(back, A, sp.ewma_decay_ms);
        assert!(!h.ejected_for(A, back), "its first request back is not a probe");
        assert_eq!(h.report(Outcome::ServerError, 1.0, A, back, &sp), None);
        assert!(!h.ejected_for(A, back + 1));
        for t in back + 1..back + 3 {
            one(&h, Outcome::Timeout, A, t, &sp);
        }
        assert!(
            h.ejected_for(A, back + 1_001) && !h.ejected_for(A, back + 1_003),
            "a first ejection"
        );
    }

    #[test]
    fn a_senders_requests_in_flight_when_it_tripped_do_not_eject_it_again() {
        // red3Q R1 (escalate.py): A's 20 requests in flight time out together in a blip. The first
        // streak ejects d for A (1 s); the other 15 count for A alone: no ejection more, no escalation.
        let h = Health::default();
        let sp = default_like();
        for t in 0..40 {
            one(&h, Outcome::Success, B, t, &sp);
        }
        for _ in 0..20 {
            h.begin_sender(40, A, sp.ewma_decay_ms);
        }
        let ejected: Vec<_> = (0..20)
            .filter_map(|i| h.report(Outcome::Timeout, 1.0, A, 41 + i, &sp))
            .collect();
        assert_eq!(ejected, vec![A], "one ejection");
        let snap = h.snapshot(61);
        assert_eq!(
            (snap.circuit, snap.sender_ejections, snap.failures),
            (CircuitState::Closed, 1, 20)
        );
        assert_eq!(snap.consecutive_failures, 0, "not in the others' streak");
        assert!(
            h.ejected_for(A, 1_044) && !h.ejected_for(A, 1_045),
            "the first ejection: 1 s"
        );
        one(&h, Outcome::Success, A, 1_045, &sp);
        assert!(!h.ejected_for(A, 1_046));
    }

    #[test]
    fn an_ejected_senders_late_failures_and_one_stray_failure_keep_the_circuit_closed() {
        // red3Q R5 (inflight.py): 4 of A's failures reported after its ejection, then one stray
        // failure of B: the others' streak is B's one failure, not five.
        let h = Health::default();
        let sp = default_like();
        for t in 0..30 {
            one(&h, Outcome::Success, B, t, &sp);
        }
        for _ in 0..9 {
            h.begin_sender(30, A, sp.ewma_decay_ms);
        }
        for t in 31..40 {
            h.report(Outcome::Timeout, 1.0, A, t, &sp);
        }
        assert_eq!(one(&h, Outcome::ServerError, B, 40, &sp), None);
        assert_eq!(h.snapshot(41).circuit, CircuitState::Closed);
        assert!(h.ejected_for(A, 41) && !h.ejected_for(B, 41));
    }

    #[test]
    fn two_failures_of_a_quiet_sender_open_for_all_once_the_ejected_senders_probe_failed() {
        // red3Q R2 (quiet.py): an outage seen by busy A and quiet B (a request every 4 s). A's
        // streak ejects d for A; B's first failure alone is no outage; A's probe fails too, and
        // B's second failure in a row opens it for everyone (B no longer pays a whole streak of
        // `consecutive_failures`).
        let h = Health::default();
        let sp = default_like();
        for t in (0..=12_000).step_by(4_000) {
            one(&h, Outcome::Success, B, t, &sp);
        }
        for t in 12_001..12_006 {
            one(&h, Outcome::Timeout, A, t, &sp);
        }
        assert!(h.ejected_for(A, 12_006));
        assert_eq!(one(&h, Outcome::Timeout, B, 12_500, &sp), None);
        assert_eq!(h.snapshot(12_501).circuit, CircuitState::Closed);
        assert_eq!(one(&h, Outcome::Timeout, A, 13_006, &sp), Some(A), "A's probe");
        assert_eq!(
            h.snapshot(13_007).consecutive_failures,
            1,
            "B's failure; A's probe is not in it"
        );
        assert_eq!(one(&h, Outcome::Timeout, B, 16_000, &sp), None);
        assert_eq!(h.snapshot(16_001).circuit, CircuitState::Open);
    }

    #[test]
    fn two_stray_failures_of_a_busy_sender_keep_the_circuit_closed_though_the_ejected_probe_failed() {
        // redQ2 F1 kept (red3Q's arm): A keeps its own probes failing; B, served well at a high
        // rate, has two stray failures in a row. B's recent requests do not fail: no outage.
        let h = Health::default();
        let sp = default_like();
        b_served_then_a_times_out(&h, &sp, 0..100, 100..105);
        assert_eq!(one(&h, Outcome::Timeout, A, 1_104, &sp), Some(A), "A's probe");
        for t in 1_105..1_200 {
            one(&h, Outcome::Success, B, t, &sp);
        }
        assert_eq!(one(&h, Outcome::ServerError, B, 1_200, &sp), None);
        assert_eq!(one(&h, Outcome::ServerError, B, 1_201, &sp), None);
        assert_eq!(h.snapshot(1_202).circuit, CircuitState::Closed);
        assert!(h.ejected_for(A, 1_202) && !h.ejected_for(B, 1_202));
    }

    #[test]
    fn two_stray_failures_while_a_sender_is_ejected_for_a_blip_keep_the_circuit_closed() {
        // Before A's probe failed (one blip, or its probe was served), B's own streak is needed.
        let h = Health::default();
        let sp = default_like();
        b_served_then_a_times_out(&h, &sp, 0..10, 10..15);
        for t in 500..504 {
            assert_eq!(one(&h, Outcome::ServerError, B, t, &sp), None);
        }
        assert_eq!(h.snapshot(504).circuit, CircuitState::Closed);
        one(&h, Outcome::ServerError, B, 504, &sp);
        assert_eq!(h.snapshot(505).circuit, CircuitState::Open, "B's own streak");
    }

    #[test]
    fn the_fast_path_turns_off_once_no_sender_is_ejected() {
        // redQ2 F5: the per-request table lookups stop when the last ejection has run out.
        let h = Health::default();
        let sp = spec();
        b_served_then_a_times_out(&h, &sp, 0..5, 5..8);
        assert!(h.scoped.load(Ordering::Relaxed));
        assert!(!h.ejected_for(B, 2_000));
        assert!(!h.scoped.load(Ordering::Relaxed), "no ejection running: fast path");
        // A's next request is still its probe (one at a time), and the flag is back on meanwhile.
        h.begin_sender(2_001, A, sp.ewma_decay_ms);
        assert!(h.scoped.load(Ordering::Relaxed) && h.ejected_for(A, 2_002));
        h.report(Outcome::Success, 1.0, A, 2_002, &sp);
        assert!(!h.ejected_for(A, 2_003) && !h.scoped.load(Ordering::Relaxed));
    }
}
