//! The circuit breaker of one webhook endpoint, as a plain state machine (no clock, no
//! locks: callers pass `now`). After `failure_threshold` consecutive failures the circuit
//! opens and the endpoint's events wait instead of burning their retries; once the
//! cool-down has passed a single probe goes; a success closes the circuit and the backlog
//! drains, a failure opens it again for a doubled cool-down. An endpoint failing for the
//! whole `disable_after` window is disabled. 429 and 503 also halve how many attempts may
//! be in flight at once (additive increase, multiplicative decrease), and a `Retry-After`
//! pauses the whole endpoint, not just the one event.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::AttemptOutcome;
use crate::crd::{CircuitState, EndpointHealth, LastDelivery};

#[derive(Clone, Debug)]
pub struct CircuitConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// Wait before the first probe; doubles with every failed probe up to `max_cool_down`.
    pub cool_down: Duration,
    pub max_cool_down: Duration,
    /// Attempts in flight at once to one endpoint, at most (and at first).
    pub max_concurrency: u32,
    /// An endpoint failing without a single success for this long is disabled.
    pub disable_after: Duration,
    /// Upper bound on one `Retry-After`, for the event and for the whole endpoint.
    pub max_pause: Duration,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cool_down: Duration::from_secs(30),
            max_cool_down: Duration::from_secs(1800),
            max_concurrency: 8,
            disable_after: Duration::from_secs(5 * 86400),
            max_pause: Duration::from_secs(3600),
        }
    }
}

/// Whether an attempt may go now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Go; `probe` is the single test attempt of a half-open circuit.
    Go { probe: bool },
    /// Every slot is taken; wait for one to free up.
    Full,
    /// Nothing goes before this time (circuit open, probe in flight, or paused).
    Wait(Timestamp),
    /// `just_now`: this very call found the failure window over (tell operators once).
    Disabled { just_now: bool },
}

/// A change worth telling operators about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Opened,
    Closed,
    Disabled,
}

/// How long a waiter re-checks a circuit whose probe is in flight.
const PROBE_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Circuit {
    health: EndpointHealth,
    in_flight: u32,
    probe_in_flight: bool,
    /// No attempt before this time (an endpoint-wide `Retry-After`).
    paused_until: Option<Timestamp>,
}

impl Circuit {
    pub fn new(config: &CircuitConfig) -> Self {
        Self::resume(config, EndpointHealth::default())
    }

    /// Picks up the state a previous controller recorded. A probe that was in flight
    /// when it stopped never finished: the circuit is simply open and due for one.
    pub fn resume(config: &CircuitConfig, mut health: EndpointHealth) -> Self {
        if health.circuit == CircuitState::HalfOpen {
            health.circuit = CircuitState::Open;
        }
        if health.concurrency_limit == 0 || health.concurrency_limit > config.max_concurrency {
            health.concurrency_limit = config.max_concurrency.max(1);
        }
        Self {
            health,
            in_flight: 0,
            probe_in_flight: false,
            paused_until: None,
        }
    }

    pub fn health(&self) -> &EndpointHealth {
        &self.health
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether this circuit behaves exactly like [`Circuit::new`] from `now` on: closed,
    /// no failure counted, nothing in flight, no pause, every slot. Forgetting such a
    /// circuit loses nothing.
    pub fn is_as_new(&self, config: &CircuitConfig, now: Timestamp) -> bool {
        self.health.circuit == CircuitState::Closed
            && self.health.consecutive_failures == 0
            && self.health.failing_since.is_none()
            && self.in_flight == 0
            && !self.probe_in_flight
            && self.paused_until.is_none_or(|t| t <= now)
            && self.health.concurrency_limit >= config.max_concurrency.max(1)
    }

    /// Takes a slot when an attempt may go now.
    pub fn admit(&mut self, config: &CircuitConfig, now: Timestamp) -> Admission {
        if self.window_exhausted(config, now) {
            self.disable(config, now);
            return Admission::Disabled { just_now: true };
        }
        match self.health.circuit {
            CircuitState::Disabled => Admission::Disabled { just_now: false },
            CircuitState::Open | CircuitState::HalfOpen => {
                let due = self.health.next_probe_at.is_none_or(|t| t <= now);
                if self.probe_in_flight || !due {
                    let later = self
                        .health
                        .next_probe_at
                        .filter(|t| *t > now)
                        .unwrap_or_else(|| add(now, PROBE_WAIT));
                    return Admission::Wait(later);
                }
                self.health.circuit = CircuitState::HalfOpen;
                self.probe_in_flight = true;
                self.in_flight += 1;
                Admission::Go { probe: true }
            }
            CircuitState::Closed => {
                if let Some(until) = self.paused_until.filter(|t| *t > now) {
                    return Admission::Wait(until);
                }
                if self.in_flight >= self.health.concurrency_limit.max(1) {
                    return Admission::Full;
                }
                self.in_flight += 1;
                Admission::Go { probe: false }
            }
        }
    }

    /// Gives back a slot whose attempt was never made (or whose outcome is not the
    /// endpoint's doing, such as a missing signing secret).
    pub fn release(&mut self, probe: bool, now: Timestamp) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if probe {
            self.probe_in_flight = false;
            if self.health.circuit == CircuitState::HalfOpen {
                self.health.circuit = CircuitState::Open;
                self.health.next_probe_at = Some(now);
            }
        }
    }

    /// Records an attempt's outcome and frees its slot.
    pub fn record(
        &mut self,
        config: &CircuitConfig,
        probe: bool,
        outcome: &AttemptOutcome,
        now: Timestamp,
    ) -> Option<Transition> {
        if let AttemptOutcome::NotSent { .. } = outcome {
            self.release(probe, now);
            return None;
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        if probe {
            self.probe_in_flight = false;
        }
        match outcome {
            AttemptOutcome::Delivered { status } => {
                self.health.last_delivery = Some(LastDelivery {
                    at: now,
                    outcome: "Delivered".to_owned(),
                    status_code: Some(*status),
                    error: None,
                });
                if self.health.circuit == CircuitState::Disabled {
                    // A late answer to an attempt made before disabling changes nothing.
                    return None;
                }
                let was = self.health.circuit;
                self.health.last_success_at = Some(now);
                self.health.consecutive_failures = 0;
                self.health.failing_since = None;
                self.health.next_probe_at = None;
                self.health.circuit = CircuitState::Closed;
                self.health.concurrency_limit =
                    (self.health.concurrency_limit + 1).min(config.max_concurrency.max(1));
                (was != CircuitState::Closed).then_some(Transition::Closed)
            }
            AttemptOutcome::NotSent { .. } => None,
            AttemptOutcome::Failed {
                status,
                error,
                retry_after,
                ..
            } => {
                self.health.last_delivery = Some(LastDelivery {
                    at: now,
                    outcome: "Failed".to_owned(),
                    status_code: *status,
                    error: Some(error.chars().take(300).collect()),
                });
                if self.health.circuit == CircuitState::Disabled {
                    return None;
                }
                self.health.consecutive_failures += 1;
                self.health.failing_since.get_or_insert(now);
                if matches!(status, Some(429 | 503)) {
                    self.health.concurrency_limit = (self.health.concurrency_limit / 2).max(1);
                    if let Some(wait) = retry_after {
                        let until = add(now, (*wait).min(config.max_pause));
                        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
                    }
                }
                if self.window_exhausted(config, now) {
                    self.disable(config, now);
                    return Some(Transition::Disabled);
                }
                let was = self.health.circuit;
                let opens = probe
                    || was != CircuitState::Closed
                    || self.health.consecutive_failures >= config.failure_threshold.max(1);
                if !opens {
                    return None;
                }
                self.health.circuit = CircuitState::Open;
                self.health.next_probe_at = Some(add(now, self.cool_down(config)));
                (was == CircuitState::Closed).then_some(Transition::Opened)
            }
        }
    }

    /// The cool-down before the next probe: doubled for every failure past the threshold.
    fn cool_down(&self, config: &CircuitConfig) -> Duration {
        let past = self
            .health
            .consecutive_failures
            .saturating_sub(config.failure_threshold.max(1));
        let factor = 2u32.saturating_pow(past.min(20));
        config
            .cool_down
            .saturating_mul(factor)
            .min(config.max_cool_down.max(config.cool_down))
    }

    /// Only an endpoint whose circuit opened can be disabled: a few failures long ago,
    /// below the threshold, say nothing of how it is now.
    fn window_exhausted(&self, config: &CircuitConfig, now: Timestamp) -> bool {
        if !matches!(
            self.health.circuit,
            CircuitState::Open | CircuitState::HalfOpen
        ) {
            return false;
        }
        self.health
            .failing_since
            .is_some_and(|since| add(since, config.disable_after) <= now)
    }

    fn disable(&mut self, config: &CircuitConfig, now: Timestamp) {
        let since = self.health.failing_since.unwrap_or(now);
        self.health.circuit = CircuitState::Disabled;
        self.health.next_probe_at = None;
        self.health.disabled_at = Some(now);
        self.health.disabled_reason = Some(format!(
            "no successful delivery since {since} ({} consecutive failures, failure window {}); \
             change the subscription's spec to enable it again",
            self.health.consecutive_failures,
            humanize(config.disable_after)
        ));
    }
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    let d = SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX);
    t.checked_add(d).unwrap_or(Timestamp::MAX)
}

fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        s if s >= 86400 && s % 86400 == 0 => format!("{}d", s / 86400),
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s if s > 0 => format!("{s}s"),
        _ => format!("{}ms", d.as_millis()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> CircuitConfig {
        CircuitConfig {
            failure_threshold: 3,
            cool_down: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(40),
            max_concurrency: 4,
            disable_after: Duration::from_secs(3600),
            max_pause: Duration::from_secs(60),
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("valid time")
    }

    fn failed(status: Option<u16>) -> AttemptOutcome {
        throttled(status, None)
    }

    fn throttled(status: Option<u16>, retry_after: Option<u64>) -> AttemptOutcome {
        AttemptOutcome::Failed {
            status,
            error: "HTTP error".into(),
            retry_after: retry_after.map(Duration::from_secs),
            gone: false,
            response: None,
        }
    }

    const OK: AttemptOutcome = AttemptOutcome::Delivered { status: 200 };

    #[test]
    fn opens_after_consecutive_failures_and_sends_one_probe_after_the_cool_down() {
        let c = config();
        let mut circuit = Circuit::new(&c);
        for i in 0..3 {
            assert_eq!(circuit.admit(&c, at(i)), Admission::Go { probe: false });
            let t = circuit.record(&c, false, &failed(Some(500)), at(i));
            assert_eq!(t, (i == 2).then_some(Transition::Opened), "failure {i}");
        }
        assert_eq!(circuit.health().circuit, CircuitState::Open);
        assert_eq!(circuit.health().consecutive_failures, 3);
        assert_eq!(circuit.health().failing_since, Some(at(0)));
        // Events wait for the probe time instead of being attempted.
        assert_eq!(circuit.admit(&c, at(5)), Admission::Wait(at(12)));
        // One probe, and only one, once the cool-down has passed.
        assert_eq!(circuit.admit(&c, at(12)), Admission::Go { probe: true });
        assert_eq!(circuit.health().circuit, CircuitState::HalfOpen);
        assert!(matches!(circuit.admit(&c, at(12)), Admission::Wait(_)));
        // The probe fails: open again, for twice as long.
        assert_eq!(circuit.record(&c, true, &failed(None), at(13)), None);
        assert_eq!(circuit.health().next_probe_at, Some(at(13 + 20)));
        assert_eq!(circuit.admit(&c, at(33)), Admission::Go { probe: true });
        circuit.record(&c, true, &failed(None), at(33));
        assert_eq!(circuit.health().next_probe_at, Some(at(33 + 40)));
        // The cool-down stops growing at its cap.
        assert_eq!(circuit.admit(&c, at(73)), Admission::Go { probe: true });
        circuit.record(&c, true, &failed(None), at(73));
        assert_eq!(circuit.health().next_probe_at, Some(at(73 + 40)));
        // A successful probe closes the circuit and the backlog may flow again.
        assert_eq!(circuit.admit(&c, at(113)), Admission::Go { probe: true });
        assert_eq!(
            circuit.record(&c, true, &OK, at(114)),
            Some(Transition::Closed)
        );
        let health = circuit.health();
        assert_eq!(health.circuit, CircuitState::Closed);
        assert_eq!(health.consecutive_failures, 0);
        assert_eq!(health.failing_since, None);
        assert_eq!(health.last_success_at, Some(at(114)));
        for _ in 0..4 {
            assert_eq!(circuit.admit(&c, at(114)), Admission::Go { probe: false });
        }
    }

    #[test]
    fn any_success_resets_the_failure_count() {
        let c = config();
        let mut circuit = Circuit::new(&c);
        for i in 0..2 {
            circuit.admit(&c, at(i));
            circuit.record(&c, false, &failed(Some(500)), at(i));
        }
        circuit.admit(&c, at(2));
        circuit.record(&c, false, &OK, at(2));
        circuit.admit(&c, at(3));
        assert_eq!(circuit.record(&c, false, &failed(Some(500)), at(3)), None);
        assert_eq!(circuit.health().circuit, CircuitState::Closed);
        assert_eq!(circuit.health().consecutive_failures, 1);
    }

    #[test]
    fn what_never_reached_the_receiver_counts_for_nothing() {
        let c = config();
        let mut circuit = Circuit::new(&c);
        let ours = AttemptOutcome::NotSent {
            error: "invalid signing secret".into(),
        };
        for i in 0..5 {
            assert_eq!(circuit.admit(&c, at(i)), Admission::Go { probe: false });
            assert_eq!(circuit.record(&c, false, &ours, at(i)), None);
        }
        assert_eq!(circuit.health().circuit, CircuitState::Closed);
        assert_eq!(circuit.health().consecutive_failures, 0);
        assert_eq!(circuit.in_flight(), 0);
        // A probe that was never sent leaves the circuit due for another.
        for i in 10..13 {
            circuit.admit(&c, at(i));
            circuit.record(&c, false, &failed(Some(500)), at(i));
        }
        assert_eq!(circuit.admit(&c, at(30)), Admission::Go { probe: true });
        assert_eq!(circuit.record(&c, true, &ours, at(30)), None);
        assert_eq!(circuit.admit(&c, at(30)), Admission::Go { probe: true });
    }

    #[test]
    fn old_failures_below_the_threshold_never_disable() {
        let c = CircuitConfig {
            disable_after: Duration::from_secs(100),
            ..config()
        };
        let mut circuit = Circuit::new(&c);
        circuit.admit(&c, at(0));
        circuit.record(&c, false, &failed(Some(500)), at(0));
        // Long quiet, then one more failure: still closed, not disabled.
        assert_eq!(circuit.admit(&c, at(500)), Admission::Go { probe: false });
        assert_eq!(circuit.record(&c, false, &failed(Some(500)), at(500)), None);
        assert_eq!(circuit.health().circuit, CircuitState::Closed);
    }

    #[test]
    fn slots_bound_the_attempts_in_flight() {
        let c = config();
        let mut circuit = Circuit::new(&c);
        for _ in 0..4 {
            assert_eq!(circuit.admit(&c, at(0)), Admission::Go { probe: false });
        }
        assert_eq!(circuit.admit(&c, at(0)), Admission::Full);
        circuit.release(false, at(0));
        assert_eq!(circuit.admit(&c, at(0)), Admission::Go { probe: false });
        assert_eq!(circuit.in_flight(), 4);
    }

    #[test]
    fn throttling_halves_the_slots_pauses_the_endpoint_and_successes_win_them_back() {
        let c = config();
        let mut circuit = Circuit::new(&c);
        assert_eq!(circuit.health().concurrency_limit, 4);
        circuit.admit(&c, at(0));
        circuit.record(&c, false, &throttled(Some(429), Some(5)), at(0));
        assert_eq!(circuit.health().concurrency_limit, 2);
        // Every event to the endpoint waits out the Retry-After, not just the one.
        assert_eq!(circuit.admit(&c, at(3)), Admission::Wait(at(5)));
        circuit.admit(&c, at(5));
        circuit.record(&c, false, &failed(Some(503)), at(5));
        assert_eq!(circuit.health().concurrency_limit, 1);
        assert_eq!(circuit.admit(&c, at(6)), Admission::Go { probe: false });
        assert_eq!(circuit.admit(&c, at(6)), Admission::Full);
        circuit.record(&c, false, &OK, at(6));
        assert_eq!(circuit.health().concurrency_limit, 2);
        // A Retry-After is bounded by the configured maximum pause.
        circuit.admit(&c, at(7));
        circuit.record(&c, false, &throttled(Some(429), Some(86400)), at(7));
        assert_eq!(circuit.admit(&c, at(8)), Admission::Wait(at(67)));
    }

    #[test]
    fn only_a_circuit_with_nothing_to_remember_is_as_new() {
        let c = config();
        let mut circuit = Circuit::new(&c);
        assert!(circuit.is_as_new(&c, at(0)));
        circuit.admit(&c, at(0));
        assert!(!circuit.is_as_new(&c, at(0)), "an attempt is in flight");
        circuit.admit(&c, at(0));
        circuit.admit(&c, at(0));
        circuit.record(&c, false, &throttled(Some(429), Some(5)), at(0));
        assert!(!circuit.is_as_new(&c, at(0)), "a failure is counted");
        // Answers to attempts made before the 429 reset the count, not the pause or the
        // halved limit, until the limit has grown back and the pause is over.
        circuit.record(&c, false, &OK, at(1));
        assert_eq!(circuit.health().consecutive_failures, 0);
        assert!(!circuit.is_as_new(&c, at(1)), "limit 3 of 4");
        circuit.record(&c, false, &OK, at(1));
        assert_eq!(circuit.health().concurrency_limit, 4);
        assert!(!circuit.is_as_new(&c, at(4)), "paused until 5");
        assert!(circuit.is_as_new(&c, at(5)));
    }

    #[test]
    fn failing_for_the_whole_window_disables_the_endpoint() {
        let c = CircuitConfig {
            disable_after: Duration::from_secs(100),
            ..config()
        };
        let mut circuit = Circuit::new(&c);
        for i in 0..3 {
            circuit.admit(&c, at(i));
            circuit.record(&c, false, &failed(Some(500)), at(i));
        }
        // Probes keep failing (each takes 5 s); the endpoint is disabled once the window
        // is over, by the probe that ends after it or by the next admission.
        let mut now = 0;
        let disabled_at = loop {
            now += 7;
            assert!(now < 200, "never disabled");
            match circuit.admit(&c, at(now)) {
                Admission::Go { probe: true } => {
                    let t = circuit.record(&c, true, &failed(None), at(now + 5));
                    if t == Some(Transition::Disabled) {
                        break now + 5;
                    }
                }
                Admission::Disabled { just_now } => {
                    assert!(just_now, "told once, when it happened");
                    break now;
                }
                Admission::Wait(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert!((100..110).contains(&disabled_at), "{disabled_at}");
        let health = circuit.health();
        assert_eq!(health.circuit, CircuitState::Disabled);
        let reason = health.disabled_reason.as_deref().unwrap_or_default();
        assert!(reason.contains("failure window 100s"), "{reason}");
        assert_eq!(
            circuit.admit(&c, at(disabled_at + 1000)),
            Admission::Disabled { just_now: false }
        );
        // Nothing reopens it, not even a late success.
        assert_eq!(circuit.record(&c, false, &OK, at(disabled_at + 1)), None);
        assert_eq!(circuit.health().circuit, CircuitState::Disabled);
    }

    #[test]
    fn an_open_circuit_past_its_window_is_disabled_without_another_attempt() {
        let c = CircuitConfig {
            disable_after: Duration::from_secs(30),
            cool_down: Duration::from_secs(60),
            ..config()
        };
        let mut circuit = Circuit::new(&c);
        for i in 0..3 {
            circuit.admit(&c, at(i));
            circuit.record(&c, false, &failed(Some(500)), at(i));
        }
        assert_eq!(
            circuit.admit(&c, at(31)),
            Admission::Disabled { just_now: true }
        );
        assert_eq!(
            circuit.admit(&c, at(32)),
            Admission::Disabled { just_now: false }
        );
    }

    #[test]
    fn resuming_a_half_open_circuit_makes_it_due_for_a_probe() {
        let c = config();
        let health = EndpointHealth {
            circuit: CircuitState::HalfOpen,
            consecutive_failures: 4,
            failing_since: Some(at(0)),
            next_probe_at: Some(at(50)),
            concurrency_limit: 99,
            ..EndpointHealth::default()
        };
        let mut circuit = Circuit::resume(&c, health);
        assert_eq!(circuit.health().circuit, CircuitState::Open);
        assert_eq!(circuit.health().concurrency_limit, 4);
        assert_eq!(circuit.admit(&c, at(20)), Admission::Wait(at(50)));
        assert_eq!(circuit.admit(&c, at(50)), Admission::Go { probe: true });
        // A probe given back unmade leaves the circuit due for another.
        circuit.release(true, at(51));
        assert_eq!(circuit.admit(&c, at(51)), Admission::Go { probe: true });
    }
}
