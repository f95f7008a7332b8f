//! Every endpoint's circuit, shared by all reconciles: a slot must be taken before an
//! attempt, so the per-endpoint concurrency bound holds across groups and one slow
//! receiver only ever holds its own slots.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use jiff::Timestamp;
use tokio::sync::Notify;

use super::AttemptOutcome;
use super::circuit::{Admission, Circuit, CircuitConfig, Transition};
use crate::crd::{CircuitState, EndpointHealth};
use crate::sync::lock;

/// A waiter for a slot looks again at least this often, whatever it was told.
const RECHECK: Duration = Duration::from_secs(1);

/// The generation of a circuit kept only in memory: a group's own webhook URL, which has
/// no subscription whose status records its health.
pub const MEMORY_ONLY: i64 = 0;

#[derive(Debug)]
pub struct Circuits {
    config: CircuitConfig,
    entries: Mutex<HashMap<String, Arc<Endpoint>>>,
}

/// One endpoint's circuit. `generation` is that of the subscription it was built for: a
/// changed spec (a new URL, or an operator re-enabling it) starts a fresh circuit.
#[derive(Debug)]
pub struct Endpoint {
    generation: i64,
    circuit: Mutex<Circuit>,
    changed: Notify,
}

/// Circuits held, and how many of them are open (or probing) or disabled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CircuitCounts {
    pub tracked: usize,
    pub open: usize,
    pub disabled: usize,
}

/// Why no attempt may go now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    Until(Timestamp),
    /// The reason; `just_now` when this call is the one that disabled it.
    Disabled {
        reason: String,
        just_now: bool,
    },
}

/// A slot for one attempt; record its outcome with [`Permit::finish`]. Dropped unfinished,
/// the slot is simply given back.
#[derive(Debug)]
pub struct Permit {
    endpoint: Arc<Endpoint>,
    config: CircuitConfig,
    probe: bool,
    finished: bool,
}

impl Circuits {
    pub fn new(config: CircuitConfig) -> Self {
        Self {
            config,
            entries: Mutex::default(),
        }
    }

    pub fn config(&self) -> &CircuitConfig {
        &self.config
    }

    /// The rules for `endpoint`. A memory-only circuit (a URL given per request) is never
    /// disabled: nothing could enable it again but a restart, so every later group sending
    /// there would fail at once; it keeps probing at the longest cool-down instead, and
    /// each event still fails when its own retries run out.
    fn config_for(&self, endpoint: &Endpoint) -> CircuitConfig {
        let mut config = self.config.clone();
        if endpoint.generation == MEMORY_ONLY {
            config.disable_after = Duration::MAX;
        }
        config
    }

    /// The endpoint's circuit; a new one resumes from `recorded` (what the subscription's
    /// status says) when that was recorded for this generation.
    pub fn endpoint(
        &self,
        key: &str,
        generation: i64,
        recorded: Option<(i64, &EndpointHealth)>,
    ) -> Arc<Endpoint> {
        let mut entries = lock(&self.entries);
        if let Some(existing) = entries.get(key).filter(|e| e.generation >= generation) {
            return existing.clone();
        }
        let circuit = match recorded {
            Some((at, health)) if at == generation => Circuit::resume(&self.config, health.clone()),
            _ => Circuit::new(&self.config),
        };
        let endpoint = Arc::new(Endpoint {
            generation,
            circuit: Mutex::new(circuit),
            changed: Notify::new(),
        });
        entries.insert(key.to_owned(), endpoint.clone());
        endpoint
    }

    /// Forgets the memory-only circuits nobody uses that are as good as new, so one circuit
    /// per URL ever seen does not pile up (request URLs often differ per request); such a
    /// URL gets a fresh, identical circuit when it is used again. A subscription's circuit
    /// stays: one made again would resume from its status, which can be up to a health
    /// sync older than the circuit. Then counts what is left, in the same pass.
    pub fn sweep(&self) -> CircuitCounts {
        let now = Timestamp::now();
        let mut entries = lock(&self.entries);
        let mut counts = CircuitCounts::default();
        // Under the map's lock a count of 1 means no reconcile or permit holds the
        // circuit, and none can get it before the lock is released.
        entries.retain(|_, e| {
            let circuit = e.circuit();
            let forget = e.generation == MEMORY_ONLY
                && Arc::strong_count(e) == 1
                && circuit.is_as_new(&self.config, now);
            if !forget {
                counts.tracked += 1;
                match circuit.health().circuit {
                    CircuitState::Open | CircuitState::HalfOpen => counts.open += 1,
                    CircuitState::Disabled => counts.disabled += 1,
                    CircuitState::Closed => {}
                }
            }
            !forget
        });
        counts
    }

    /// The endpoint's health as of now, if it has a circuit.
    pub fn health(&self, key: &str) -> Option<EndpointHealth> {
        let entries = lock(&self.entries);
        entries.get(key).map(|e| e.health())
    }

    /// Waits for a free slot, or says why none will be free for now.
    pub async fn acquire(&self, endpoint: &Arc<Endpoint>) -> Result<Permit, Blocked> {
        let config = self.config_for(endpoint);
        loop {
            let notified = endpoint.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let admission = endpoint.circuit().admit(&config, Timestamp::now());
            match admission {
                Admission::Go { probe } => {
                    return Ok(Permit {
                        endpoint: endpoint.clone(),
                        config,
                        probe,
                        finished: false,
                    });
                }
                Admission::Wait(until) => return Err(Blocked::Until(until)),
                Admission::Disabled { just_now } => {
                    let reason = endpoint
                        .circuit()
                        .health()
                        .disabled_reason
                        .clone()
                        .unwrap_or_else(|| "endpoint disabled".to_owned());
                    return Err(Blocked::Disabled { reason, just_now });
                }
                Admission::Full => {
                    let _ = tokio::time::timeout(RECHECK, notified).await;
                }
            }
        }
    }
}

impl Endpoint {
    fn circuit(&self) -> MutexGuard<'_, Circuit> {
        lock(&self.circuit)
    }

    /// The endpoint's health as of now.
    pub fn health(&self) -> EndpointHealth {
        self.circuit().health().clone()
    }
}

impl Permit {
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Records the attempt's outcome; returns a transition worth an Event.
    pub fn finish(mut self, outcome: &AttemptOutcome) -> Option<Transition> {
        self.finished = true;
        let transition =
            self.endpoint
                .circuit()
                .record(&self.config, self.probe, outcome, Timestamp::now());
        self.endpoint.changed.notify_waiters();
        transition
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.finished {
            self.endpoint
                .circuit()
                .release(self.probe, Timestamp::now());
            self.endpoint.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(status: u16) -> AttemptOutcome {
        AttemptOutcome::Failed {
            status: Some(status),
            error: format!("HTTP {status}"),
            retry_after: None,
            gone: false,
            response: None,
        }
    }

    fn circuits(max_concurrency: u32) -> Circuits {
        Circuits::new(CircuitConfig {
            failure_threshold: 2,
            max_concurrency,
            ..CircuitConfig::default()
        })
    }

    #[tokio::test]
    async fn only_subscriptions_are_disabled_a_url_given_per_request_keeps_probing() {
        let c = Circuits::new(CircuitConfig {
            failure_threshold: 1,
            cool_down: Duration::ZERO,
            disable_after: Duration::ZERO,
            ..CircuitConfig::default()
        });
        let subscription = c.endpoint("ns/sub", 1, None);
        let request_url = c.endpoint("ns/https://hooks.example/in", MEMORY_ONLY, None);
        for endpoint in [&subscription, &request_url] {
            let permit = c.acquire(endpoint).await.expect("a first attempt");
            permit.finish(&failed(500));
        }
        // Failing for the whole (here empty) window: the subscription is disabled...
        assert!(
            matches!(
                c.acquire(&subscription).await,
                Err(Blocked::Disabled { .. })
            ),
            "the subscription is disabled"
        );
        // ...the request URL only open, and its probe goes.
        let probe = c.acquire(&request_url).await.expect("a probe");
        assert!(probe.is_probe());
    }

    #[tokio::test]
    async fn waiters_get_a_slot_when_one_is_given_back() {
        let c = Arc::new(circuits(1));
        let endpoint = c.endpoint("ns/a", 1, None);
        let first = c.acquire(&endpoint).await.expect("a free slot");
        let waiter = {
            let c = c.clone();
            let endpoint = endpoint.clone();
            tokio::spawn(async move { c.acquire(&endpoint).await.map(|p| p.is_probe()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the only slot is taken");
        first.finish(&AttemptOutcome::Delivered { status: 200 });
        let got = tokio::time::timeout(Duration::from_millis(500), waiter)
            .await
            .expect("woken when the slot came back")
            .expect("task");
        assert_eq!(got, Ok(false));
    }

    #[tokio::test]
    async fn an_open_circuit_blocks_every_endpoint_but_its_own() {
        let c = circuits(4);
        let sick = c.endpoint("ns/sick", 1, None);
        let fine = c.endpoint("ns/fine", 1, None);
        for _ in 0..2 {
            let permit = c.acquire(&sick).await.expect("slot");
            permit.finish(&AttemptOutcome::Failed {
                status: Some(500),
                error: "HTTP 500".into(),
                retry_after: None,
                gone: false,
                response: None,
            });
        }
        assert!(matches!(c.acquire(&sick).await, Err(Blocked::Until(_))));
        assert!(c.acquire(&fine).await.is_ok());
        let counts = c.sweep();
        assert_eq!((counts.open, counts.disabled), (1, 0));
        assert_eq!(c.health("ns/sick").map(|h| h.consecutive_failures), Some(2));
    }

    #[tokio::test]
    async fn idle_memory_only_circuits_as_good_as_new_are_forgotten() {
        let c = circuits(2);
        let fine = c.endpoint("ns/url/https://a.example/1", MEMORY_ONLY, None);
        c.acquire(&fine)
            .await
            .expect("slot")
            .finish(&AttemptOutcome::Delivered { status: 200 });
        let failing = c.endpoint("ns/url/https://b.example", MEMORY_ONLY, None);
        c.acquire(&failing)
            .await
            .expect("slot")
            .finish(&failed(500));
        let busy = c.endpoint("ns/url/https://c.example", MEMORY_ONLY, None);
        let permit = c.acquire(&busy).await.expect("slot");
        let subscription = c.endpoint("ns/subscription/s/uid", 1, None);
        drop((fine, failing, busy, subscription));

        // Left: the failing URL (its count matters), the one with an attempt in flight,
        // and the subscription's (resumed from its status, which may lag behind).
        assert_eq!(c.sweep().tracked, 3);
        assert!(c.health("ns/url/https://a.example/1").is_none());
        assert_eq!(
            c.health("ns/url/https://b.example")
                .map(|h| h.consecutive_failures),
            Some(1)
        );
        permit.finish(&AttemptOutcome::Delivered { status: 200 });
        assert_eq!(c.sweep().tracked, 2);
        assert!(c.health("ns/url/https://c.example").is_none());

        // A circuit someone holds is never forgotten, whatever its state.
        let held = c.endpoint("ns/url/https://d.example", MEMORY_ONLY, None);
        assert_eq!(c.sweep().tracked, 3);
        drop(held);
        assert_eq!(c.sweep().tracked, 2);
    }

    #[test]
    fn a_newer_generation_starts_afresh_and_recorded_health_is_resumed() {
        let c = circuits(4);
        let recorded = EndpointHealth {
            circuit: CircuitState::Disabled,
            consecutive_failures: 9,
            ..EndpointHealth::default()
        };
        let first = c.endpoint("ns/a", 3, Some((3, &recorded)));
        assert_eq!(first.circuit().health().circuit, CircuitState::Disabled);
        // The same generation finds the same circuit; a newer spec starts a fresh one.
        assert!(Arc::ptr_eq(&first, &c.endpoint("ns/a", 3, None)));
        let fresh = c.endpoint("ns/a", 4, Some((3, &recorded)));
        assert_eq!(fresh.circuit().health().circuit, CircuitState::Closed);
        assert_eq!(fresh.circuit().health().consecutive_failures, 0);
    }
}
