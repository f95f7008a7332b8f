//! The dispatcher: sends due webhook deliveries, in every controller replica. Reconciles
//! only plan events (rows in the store); a dispatcher claims the due ones (`FOR UPDATE SKIP
//! LOCKED`, so replicas never claim the same one), sends each through its endpoint's circuit
//! and writes back what became of it in batches. It wakes when deliveries are planned
//! (LISTEN/NOTIFY), when the next retry is due, and every few seconds in any case.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::runtime::events::EventType;
use kube::{Api, Resource};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tracing::Instrument;

use super::events::Endpoint;
use super::{Context, publish_event};
use crate::cache::Cache;
use crate::crd::{ImageGroup, SecretKeyRef};
use crate::delivery::{Attempt, DeliveryState};
use crate::results::GroupRef;
use crate::shutdown::Shutdown;
use crate::store::{Claimed, Claims, DISPATCH_CHANNEL, Outcomes, Settled, Stop};
use crate::sync::lock;
use crate::trace::{TraceContext, TraceParent};
use crate::webhook::{AttemptOutcome, Blocked, RetrySchedule, Transition};

/// Deliveries claimed per query.
const CLAIM_BATCH: usize = 500;
/// How long a claim lasts unless renewed: a dead dispatcher's claims are due again after
/// at most this long. A live one renews its claims every [`RENEW_EVERY`].
const LEASE: Duration = Duration::from_secs(30);
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// The longest a claimed delivery waits for its endpoint's slot before it goes back.
const SLOT_WAIT: Duration = Duration::from_secs(20);
/// Claimed deliveries of one endpoint that may wait for its slots here, per slot, at the
/// least; more go back to the table, due when a slot should be free (a slow endpoint's
/// backlog then waits in the table, not in this replica's memory and capacity).
const WAITING_PER_SLOT: usize = 4;
/// The poll backstop: a dispatcher looks for due deliveries at least this often.
const BACKSTOP: Duration = Duration::from_secs(5);
/// Outcomes written per transaction at most.
const RECORD_BATCH: usize = 1_000;
/// How long the recorder waits, once an outcome is in, for the other sends still out (those
/// claimed with it mostly end within a few milliseconds), so that one write records them
/// all instead of one write each.
const RECORD_LINGER: Duration = Duration::from_millis(10);
/// How often at most the leader is told of groups whose deliveries failed or whose
/// endpoints have nothing left to send, and of groups that only made progress.
const TELL_EVERY: Duration = Duration::from_millis(250);
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long a loaded signing secret is used before it is read again (rotations apply
/// within this), and how long a failure to load one is.
const SECRET_TTL: Duration = Duration::from_secs(5);
const SECRET_ERROR_TTL: Duration = Duration::from_millis(500);

/// The action of this module's Kubernetes Events.
const ACTION: &str = "DeliverWebhook";

/// How long a stopping dispatcher waits for the sends in hand (and the writing of their
/// outcomes) before it drops the rest; their claims go back to the table at once. Below
/// the chart's `terminationGracePeriodSeconds` (30 s) with room for the rest of the stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs a dispatcher named `owner` until the process stops or `shutdown` fires. `sole`: no
/// other replica dispatches (no leader election), so every claim left in the table is a
/// dead one's. On `shutdown` it claims nothing more, lets the sends in hand finish (at most
/// [`STOP_GRACE`]), records their outcomes and hands back the claims it still holds, so
/// another replica sends them at once instead of after their lease.
pub async fn run(ctx: Arc<Context>, owner: String, sole: bool, shutdown: Shutdown) {
    // Claims of an earlier run under this name died with it: due at once.
    loop {
        match ctx.store.release_claims((!sole).then_some(&owner)).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(
                        released = n,
                        "deliveries claimed before a restart are due again"
                    );
                }
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "releasing earlier claims; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let dispatcher = Arc::new(Dispatcher {
        ctx: ctx.clone(),
        endpoints: Cache::default(),
        secrets: Cache::default(),
        header_secrets: Cache::default(),
        waiting: Mutex::default(),
    });
    let (done, finished) = mpsc::unbounded_channel();
    // Every task of the dispatcher is owned here: when it stops (the process is stopped,
    // or the task running it aborted) nothing it started goes on sending.
    let mut sends = tokio::task::JoinSet::new();
    let in_flight = ctx.config.dispatch_in_flight.max(1);
    let capacity = Arc::new(Semaphore::new(in_flight));
    let sending = {
        let capacity = capacity.clone();
        move || capacity.available_permits() < in_flight
    };
    let mut recorder = AbortOnDrop(tokio::spawn(record(
        ctx.clone(),
        owner.clone(),
        finished,
        sending,
    )));
    let _renewer = AbortOnDrop(tokio::spawn(renew(ctx.clone(), owner.clone())));
    let wake = crate::store::listen(ctx.store.url().to_owned(), &[DISPATCH_CHANNEL]);
    futures::pin_mut!(wake);
    let mut swept = Instant::now();
    tracing::info!(%owner, "webhook dispatcher started");
    while !shutdown.is_requested() {
        while sends.try_join_next().is_some() {}
        if swept.elapsed() >= Duration::from_secs(1) {
            ctx.config.metrics.set_circuits(ctx.circuits.sweep());
            swept = Instant::now();
        }
        let free = capacity.available_permits().min(CLAIM_BATCH);
        if free == 0 {
            // Wait for one to finish.
            tokio::select! {
                permit = capacity.clone().acquire_owned() => drop(permit),
                () = shutdown.clone().requested() => {}
            }
            continue;
        }
        let limit = i64::try_from(free).unwrap_or(1);
        let Claims {
            claimed,
            next_due_in,
        } = match ctx.store.claim_due(&owner, limit, LEASE).await {
            Ok(claims) => claims,
            Err(e) => {
                tracing::warn!(error = %e, "claiming due deliveries; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let full = claimed.len() == free;
        for claim in claimed {
            let Ok(permit) = capacity.clone().try_acquire_owned() else {
                break;
            };
            sends.spawn(dispatcher.clone().send(claim, permit, done.clone()));
        }
        if full {
            continue;
        }
        let wait = next_due_in.map_or(BACKSTOP, |due| due.min(BACKSTOP));
        // Due now but not claimed: another replica holds it for the moment.
        let wait = wait.max(Duration::from_millis(10));
        tokio::select! {
            _ = wake.next() => {}
            () = tokio::time::sleep(wait) => {}
            () = shutdown.clone().requested() => {}
        }
    }
    // Stopping. The recorder ends once every send has handed in its outcome (or been
    // dropped): the channel closes with the last sender.
    drop(done);
    let in_hand = sends.len();
    let drained = tokio::time::timeout(STOP_GRACE, async {
        while sends.join_next().await.is_some() {}
        let _ = (&mut recorder.0).await;
    })
    .await
    .is_ok();
    sends.shutdown().await;
    drop(recorder);
    match ctx.store.release_claims(Some(&owner)).await {
        Ok(released) => {
            tracing::info!(%owner, in_hand, drained, released, "webhook dispatcher stopped")
        }
        Err(e) => tracing::warn!(
            %owner, error = %e,
            "handing back claims on stop: they are due again when their lease runs out"
        ),
    }
}

/// A spawned task that is aborted when its handle goes (the dispatcher's helpers stop
/// with it, however it stops).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps this dispatcher's claims from running out while it works on them.
async fn renew(ctx: Arc<Context>, owner: String) {
    let mut every = tokio::time::interval(RENEW_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = ctx.store.renew_claims(&owner, LEASE).await {
            tracing::warn!(error = %e, "renewing claimed deliveries");
        }
    }
}

/// A group's endpoint records at a version.
type Versioned = (i64, Arc<Vec<Endpoint>>);
/// Request headers, (name, value).
type Headers = Vec<(String, String)>;

/// Whether a Secret read (or why it failed) still serves: a while when read, a moment
/// when not (it may be created or fixed any time).
fn fresh_secret<T>((at, read): &(Instant, Result<T, String>)) -> bool {
    at.elapsed()
        < if read.is_ok() {
            SECRET_TTL
        } else {
            SECRET_ERROR_TTL
        }
}

struct Dispatcher {
    ctx: Arc<Context>,
    /// Each group's endpoint records, by group uid.
    endpoints: Cache<String, Result<Versioned, String>>,
    /// Signing keys (or why there are none) by (namespace, secret, key).
    secrets: Cache<(String, String, String), Result<Vec<String>, String>>,
    /// Headers from a subscription's `headersFrom` Secret, by (namespace, secret).
    header_secrets: Cache<(String, String), Result<Headers, String>>,
    /// Per circuit: claimed deliveries waiting for a slot here, and how long attempts
    /// there take (a moving average, ms).
    waiting: Mutex<HashMap<String, Queue>>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Queue {
    waiting: usize,
    attempt_ms: f64,
}

/// What became of one claimed delivery.
#[derive(Debug)]
struct Finished {
    settled: Settled,
    attempt: Option<Attempt>,
    stop: Option<Stop>,
}

impl Dispatcher {
    async fn send(
        self: Arc<Self>,
        claim: Claimed,
        capacity: OwnedSemaphorePermit,
        done: mpsc::UnboundedSender<Finished>,
    ) {
        let finished = self.attempt(claim).await;
        // Before the outcome goes: the recorder waits for more only while sends are out.
        drop(capacity);
        // The recorder stops only after every sender is gone.
        let _ = done.send(finished);
    }

    async fn attempt(&self, claim: Claimed) -> Finished {
        let ctx = &self.ctx;
        let Claimed {
            delivery,
            group,
            group_deleted,
            endpoints_version,
            trace: recorded,
        } = claim;
        let now = jiff::Timestamp::now();
        let mut settled = Settled {
            id: delivery.id.clone(),
            group: group.clone(),
            endpoint: delivery.endpoint.clone(),
            state: DeliveryState::Pending,
            attempts: delivery.attempts,
            next_attempt_at: Some(now),
            last_error: delivery.last_error.clone(),
            delivered_at: None,
        };
        let finish = |settled| Finished {
            settled,
            attempt: None,
            stop: None,
        };
        if group_deleted {
            return finish(fail(settled, "the group was deleted", "group_deleted", ctx));
        }
        let endpoints = match self.endpoints_of(&group.uid, endpoints_version).await {
            Ok(endpoints) => endpoints,
            Err(e) => {
                tracing::warn!(group = %group.name, error = %e, "reading the group's endpoints; trying again");
                settled.next_attempt_at = Some(now + jiff::SignedDuration::from_secs(1));
                return finish(settled);
            }
        };
        let Some(endpoint) = endpoints.iter().find(|e| e.key == delivery.endpoint) else {
            let reason = "the endpoint no longer exists: its subscription was deleted or no \
                          longer selects this group";
            return finish(fail(settled, reason, "endpoint_gone", ctx));
        };
        let retry = endpoint.retry.as_ref().unwrap_or(&ctx.config.retry);
        let keys = self.signing_keys(&group.namespace, &endpoint.secret).await;
        let options = self.options(&group.namespace, endpoint).await;
        let prepared = keys.and_then(|keys| {
            let body = delivery
                .payload
                .as_ref()
                .ok_or_else(|| "the event has no recorded body".to_owned())?;
            let body = serde_json::to_string(body).map_err(|e| format!("payload: {e}"))?;
            Ok((keys, body, options?))
        });
        let (keys, body, options) = match prepared {
            Ok(p) => p,
            Err(error) => {
                let outcome = AttemptOutcome::NotSent { error };
                let attempt = attempt_record(&delivery.id, &outcome, now, 0.0);
                let settled = apply_outcome(ctx, settled, &delivery, outcome, retry);
                return Finished {
                    settled,
                    attempt: Some(attempt),
                    stop: None,
                };
            }
        };
        let circuit = ctx.circuits.endpoint(
            &endpoint.circuit_key,
            endpoint.generation,
            endpoint.recorded.as_ref().map(|(g, h)| (*g, h)),
        );
        // A slow endpoint's backlog waits in the table, due about when a slot frees up.
        if let Some(later) = self.join_queue(&endpoint.circuit_key) {
            settled.next_attempt_at = Some(now + later);
            return finish(settled);
        }
        let acquired = tokio::time::timeout(SLOT_WAIT, ctx.circuits.acquire(&circuit)).await;
        self.leave_queue(&endpoint.circuit_key, None);
        let permit = match acquired {
            Err(_) => return finish(settled),
            Ok(Ok(permit)) => permit,
            Ok(Err(Blocked::Until(until))) => {
                // The circuit holds events back; no attempt is used up.
                settled.next_attempt_at = Some(until);
                return finish(settled);
            }
            Ok(Err(Blocked::Disabled { reason, just_now })) => {
                if just_now {
                    ctx.config.metrics.set_circuits(ctx.circuits.sweep());
                    announce(ctx, endpoint, Transition::Disabled).await;
                }
                let error = format!("endpoint disabled: {reason}");
                return finish(fail(settled, &error, "disabled", ctx));
            }
        };
        // The delivery span: a child of the event's trace context, or of the trace the
        // group's uid names when the event has none recorded (see [`crate::trace`]).
        let parent = recorded
            .traceparent
            .as_deref()
            .and_then(TraceParent::parse)
            .or_else(|| TraceParent::from_uid(&group.uid));
        let span = tracing::info_span!(
            "deliver",
            group = %group.name,
            delivery = %delivery.id,
            event = %delivery.event,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let trace = parent.map(|parent| crate::trace::start(&span, Some(&parent)));
        if let Some(trace) = trace {
            span.record("trace_id", trace.trace_id_hex());
            span.record("span_id", hex::encode(trace.span_id));
        }
        // The client's tracestate goes on with its trace, unchanged (we add no entry); it is
        // only ever recorded beside a traceparent (see `TraceContext::annotated`).
        let headers = TraceContext {
            traceparent: trace.map(|t| t.to_string()),
            tracestate: recorded.tracestate,
        };
        let (at, started) = (jiff::Timestamp::now(), Instant::now());
        let outcome = ctx
            .sender
            .attempt_with(
                &endpoint.url,
                &delivery.id,
                &body,
                &keys,
                &options,
                &headers,
            )
            .instrument(span)
            .await;
        let transition = permit.finish(&outcome);
        let took = started.elapsed().as_secs_f64() * 1000.0;
        self.leave_queue(&endpoint.circuit_key, Some(took));
        let attempt = attempt_record(&delivery.id, &outcome, at, took);
        let gone = matches!(outcome, AttemptOutcome::Failed { gone: true, .. });
        let settled = apply_outcome(ctx, settled, &delivery, outcome, retry);
        if let Some(transition) = transition {
            ctx.config.metrics.set_circuits(ctx.circuits.sweep());
            announce(ctx, endpoint, transition).await;
        }
        if settled.state == DeliveryState::Failed {
            let note = format!(
                "{} to {} failed after {} attempts: {}",
                delivery.event,
                delivery.endpoint,
                settled.attempts,
                settled.last_error.as_deref().unwrap_or("unknown error")
            );
            let object = group_object(&group);
            publish_event(
                ctx,
                &object,
                EventType::Warning,
                "WebhookDeliveryFailed",
                ACTION,
                note,
            )
            .await;
        }
        // 410 Gone: the receiver asks us to stop; nothing more of the group goes there.
        let stop = gone.then(|| Stop {
            group,
            endpoint: endpoint.key.clone(),
            mark: endpoint.stop_mark(),
        });
        Finished {
            settled,
            attempt: Some(attempt),
            stop,
        }
    }

    /// Counts a delivery as waiting for the circuit's slots, or says how long it should
    /// wait in the table instead when more already wait here than the endpoint can take
    /// within half of [`SLOT_WAIT`] (at its recent pace; at least [`WAITING_PER_SLOT`]
    /// per slot).
    fn join_queue(&self, circuit: &str) -> Option<jiff::SignedDuration> {
        let slots = usize::try_from(self.ctx.circuits.config().max_concurrency.max(1)).unwrap_or(1);
        let mut queues = lock(&self.waiting);
        let queue = queues.entry(circuit.to_owned()).or_default();
        // Not measured yet: as if an attempt took 50 ms.
        let attempt_ms = if queue.attempt_ms > 0.0 {
            queue.attempt_ms
        } else {
            50.0
        };
        let per_slot = (SLOT_WAIT.as_secs_f64() * 1000.0 / 2.0 / attempt_ms) as usize;
        if queue.waiting < slots * per_slot.max(WAITING_PER_SLOT) {
            queue.waiting += 1;
            return None;
        }
        // When the ones waiting here should be through, give or take.
        let rounds = (queue.waiting / slots) as f64;
        let ms = (rounds * attempt_ms * rand::random_range(0.8..1.2)).clamp(100.0, 30_000.0);
        Some(jiff::SignedDuration::from_millis(ms as i64))
    }

    /// The delivery stops waiting (and, when it was sent, how long that took).
    fn leave_queue(&self, circuit: &str, took_ms: Option<f64>) {
        let mut queues = lock(&self.waiting);
        if let Some(queue) = queues.get_mut(circuit) {
            match took_ms {
                Some(ms) if queue.attempt_ms > 0.0 => {
                    queue.attempt_ms = queue.attempt_ms * 0.9 + ms * 0.1;
                }
                Some(ms) => queue.attempt_ms = ms,
                None => queue.waiting = queue.waiting.saturating_sub(1),
            }
            let idle = queue.waiting == 0;
            if idle && queues.len() > 10_000 {
                queues.remove(circuit);
            }
        }
    }

    /// The group's endpoint records at `version` (or newer).
    async fn endpoints_of(&self, uid: &str, version: i64) -> Result<Arc<Vec<Endpoint>>, String> {
        let fresh = |(_, cached): &(Instant, Result<Versioned, String>)| matches!(cached, Ok((known, _)) if *known >= version);
        let load = || async {
            let (version, records) = self
                .ctx
                .store
                .group_endpoints(uid)
                .await
                .map_err(|e| e.to_string())?
                .unwrap_or((version, serde_json::Value::Array(Vec::new())));
            let endpoints: Vec<Endpoint> = serde_json::from_value(records)
                .map_err(|e| format!("the group's endpoint records: {e}"))?;
            Ok((version, Arc::new(endpoints)))
        };
        let key = uid.to_owned();
        let (_, endpoints) = self.endpoints.get_or_load(&key, fresh, load).await?;
        Ok(endpoints)
    }

    /// The signing secrets in a Secret key: one or more `whsec_` values separated by white
    /// space, so keys can be rotated (every active key signs).
    async fn signing_keys(
        &self,
        namespace: &str,
        reference: &SecretKeyRef,
    ) -> Result<Vec<String>, String> {
        let key = (
            namespace.to_owned(),
            reference.name.clone(),
            reference.key.clone(),
        );
        let load = || load_secret(&self.ctx, namespace, reference);
        self.secrets.get_or_load(&key, fresh_secret, load).await
    }

    /// What goes with each request to `endpoint`: its options, plus the headers of its
    /// `headersFrom` Secret (read like signing secrets: cached a moment, marked only).
    async fn options(
        &self,
        namespace: &str,
        endpoint: &Endpoint,
    ) -> Result<crate::webhook::EndpointOptions, String> {
        let mut options = endpoint.options.clone();
        let Some(name) = &endpoint.headers_from else {
            return Ok(options);
        };
        let key = (namespace.to_owned(), name.clone());
        let load = || async {
            let secret = Api::<Secret>::namespaced(self.ctx.client.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(|e| format!("reading headers Secret {name}: {e}"))?;
            crate::tenancy::secret_headers(name, secret.as_ref()).map_err(|e| e.to_string())
        };
        options.headers.extend(
            self.header_secrets
                .get_or_load(&key, fresh_secret, load)
                .await?,
        );
        Ok(options)
    }
}

/// Writes finished claims back in batches (whatever finished while the last batch was
/// being written, and what ends within [`RECORD_LINGER`] of the first while `sending`
/// says sends are still out), retrying while the database is away: an outcome is never dropped
/// for that (a dispatcher that dies with some unwritten has its claims run out, and those
/// deliveries go again under the same `webhook-id`).
///
/// The leader is told which groups to look at again: within [`TELL_EVERY`] when one of
/// their deliveries failed for good or an endpoint has nothing left to send (its group
/// event may be due), and every [`PROGRESS_EVERY`] for progress alone, so a group's
/// reconcile runs per round of progress, not per event.
async fn record(
    ctx: Arc<Context>,
    owner: String,
    mut finished: mpsc::UnboundedReceiver<Finished>,
    sending: impl Fn() -> bool,
) {
    let mut buffer = Vec::new();
    let (mut urgent, mut progress) = (BTreeSet::new(), BTreeSet::new());
    let (mut told, mut told_progress) = (Instant::now(), Instant::now());
    loop {
        let received = if urgent.is_empty() && progress.is_empty() {
            finished.recv_many(&mut buffer, RECORD_BATCH).await
        } else {
            let left = if urgent.is_empty() {
                PROGRESS_EVERY.saturating_sub(told_progress.elapsed())
            } else {
                TELL_EVERY.saturating_sub(told.elapsed())
            };
            let next = finished.recv_many(&mut buffer, RECORD_BATCH);
            tokio::time::timeout(left, next).await.unwrap_or(usize::MAX)
        };
        if received == 0 {
            // Every sender is gone (the dispatcher stops): tell what is left to tell.
            let groups: Vec<String> = urgent.into_iter().chain(progress).collect();
            if !groups.is_empty()
                && let Err(e) = ctx.store.notify_groups(&groups).await
            {
                tracing::warn!(error = %e, "telling the leader which groups changed");
            }
            return;
        }
        if !buffer.is_empty() {
            let until = Instant::now() + RECORD_LINGER;
            while buffer.len() < RECORD_BATCH && sending() {
                let room = RECORD_BATCH - buffer.len();
                let more = finished.recv_many(&mut buffer, room);
                match tokio::time::timeout_at(until, more).await {
                    Ok(n) if n > 0 => {}
                    // Closed (the next turn sees it) or waited long enough.
                    _ => break,
                }
            }
            let mut outcomes = Outcomes::default();
            for f in buffer.drain(..) {
                let key = || format!("{}/{}", f.settled.group.namespace, f.settled.group.name);
                if f.settled.state == DeliveryState::Failed || f.stop.is_some() {
                    urgent.insert(key());
                } else if f.settled.state == DeliveryState::Delivered {
                    progress.insert(key());
                }
                outcomes.settled.push(f.settled);
                outcomes.attempts.extend(f.attempt);
                outcomes.stops.extend(f.stop);
            }
            let mut pause = Duration::from_millis(100);
            loop {
                match ctx.store.record_outcomes(&owner, &outcomes).await {
                    Ok(drained) => {
                        urgent.extend(drained);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, outcomes = outcomes.settled.len(), "recording delivery outcomes; trying again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        let progress_due = !progress.is_empty() && told_progress.elapsed() >= PROGRESS_EVERY;
        if (!urgent.is_empty() && told.elapsed() >= TELL_EVERY) || progress_due {
            let mut groups: BTreeSet<String> = std::mem::take(&mut urgent);
            if progress_due {
                groups.append(&mut progress);
                told_progress = Instant::now();
            }
            let groups: Vec<String> = groups.into_iter().collect();
            if let Err(e) = ctx.store.notify_groups(&groups).await {
                tracing::warn!(error = %e, "telling the leader which groups changed");
                urgent.extend(groups);
            }
            told = Instant::now();
        }
    }
}

/// Fails the delivery for good without an attempt (nothing can be sent).
fn fail(mut settled: Settled, reason: &str, metric: &'static str, ctx: &Context) -> Settled {
    settled.state = DeliveryState::Failed;
    settled.next_attempt_at = None;
    settled.last_error = Some(reason.to_owned());
    ctx.config.metrics.attempt(metric);
    settled
}

/// The ImageGroup an event is about, for Kubernetes Events.
fn group_object(group: &GroupRef) -> ObjectReference {
    ObjectReference {
        api_version: Some(ImageGroup::api_version(&()).into_owned()),
        kind: Some(ImageGroup::kind(&()).into_owned()),
        namespace: Some(group.namespace.clone()),
        name: Some(group.name.clone()),
        uid: Some(group.uid.clone()),
        ..ObjectReference::default()
    }
}

/// An attempt as the delivery's history keeps it.
fn attempt_record(id: &str, outcome: &AttemptOutcome, at: jiff::Timestamp, took: f64) -> Attempt {
    let (status_code, outcome, error, response) = match outcome {
        AttemptOutcome::Delivered { status } => (Some(*status), "delivered", None, None),
        AttemptOutcome::Failed {
            status,
            error,
            response,
            ..
        } => (*status, "failed", Some(error.clone()), response.clone()),
        AttemptOutcome::NotSent { error } => (None, "not_sent", Some(error.clone()), None),
    };
    Attempt {
        delivery_id: id.to_owned(),
        attempted_at: at,
        status_code,
        duration_ms: (took * 10.0).round() / 10.0,
        outcome: outcome.to_owned(),
        error,
        response,
    }
}

/// Where a delivery stands after an attempt: delivered, due again after the retry
/// schedule's wait (or the receiver's `Retry-After`, within bounds), or failed for good.
fn apply_outcome(
    ctx: &Context,
    mut settled: Settled,
    delivery: &crate::delivery::Delivery,
    outcome: AttemptOutcome,
    retry: &RetrySchedule,
) -> Settled {
    let now = jiff::Timestamp::now();
    settled.attempts += 1;
    let (error, retry_after, gone) = match outcome {
        AttemptOutcome::Delivered { .. } => {
            settled.state = DeliveryState::Delivered;
            settled.delivered_at = Some(now);
            settled.next_attempt_at = None;
            settled.last_error = None;
            ctx.config.metrics.attempt("delivered");
            let latency = delivery
                .created_at
                .duration_until(now)
                .as_secs_f64()
                .max(0.0);
            ctx.config.metrics.delivery_latency.observe(latency);
            tracing::debug!(id = %delivery.id, event = %delivery.event, endpoint = %delivery.endpoint, "webhook delivered");
            return settled;
        }
        AttemptOutcome::Failed {
            error,
            retry_after,
            gone,
            ..
        } => (error, retry_after, gone),
        AttemptOutcome::NotSent { error } => (error, None, false),
    };
    settled.last_error = Some(error.clone());
    let next = if gone {
        None
    } else {
        retry.next_delay(settled.attempts)
    };
    match next {
        Some(delay) => {
            let max = ctx.circuits.config().max_pause;
            let delay = retry_after.map_or(delay, |r| r.min(max).max(delay));
            let wait = jiff::SignedDuration::try_from(delay).unwrap_or(jiff::SignedDuration::MAX);
            settled.state = DeliveryState::Pending;
            settled.next_attempt_at = Some(now.checked_add(wait).unwrap_or(jiff::Timestamp::MAX));
            ctx.config.metrics.attempt("failed");
            tracing::info!(id = %delivery.id, endpoint = %delivery.endpoint, attempts = settled.attempts, %error, "webhook attempt failed; will retry");
        }
        None => {
            settled.state = DeliveryState::Failed;
            settled.next_attempt_at = None;
            ctx.config
                .metrics
                .attempt(if gone { "gone" } else { "exhausted" });
            tracing::warn!(id = %delivery.id, endpoint = %delivery.endpoint, attempts = settled.attempts, %error, "webhook delivery failed for good");
        }
    }
    settled
}

/// Tells operators (an Event on the subscription, or on the group for its own webhook)
/// that an endpoint's circuit opened, closed or that the endpoint was disabled.
async fn announce(ctx: &Context, endpoint: &Endpoint, transition: Transition) {
    let health = ctx
        .circuits
        .health(&endpoint.circuit_key)
        .unwrap_or_default();
    let (kind, reason, note) = match transition {
        Transition::Opened => (
            EventType::Warning,
            "WebhookCircuitOpened",
            format!(
                "deliveries to {} paused after {} consecutive failures (last: {}); one probe goes at {}",
                endpoint.url,
                health.consecutive_failures,
                health
                    .last_delivery
                    .as_ref()
                    .and_then(|d| d.error.as_deref())
                    .unwrap_or("unknown error"),
                health
                    .next_probe_at
                    .map_or_else(|| "once the cool-down ends".to_owned(), |t| t.to_string())
            ),
        ),
        Transition::Closed => (
            EventType::Normal,
            "WebhookCircuitClosed",
            format!(
                "{} accepts deliveries again; its waiting events are being sent",
                endpoint.url
            ),
        ),
        Transition::Disabled => (
            EventType::Warning,
            "WebhookEndpointDisabled",
            format!(
                "deliveries to {} disabled: {}; its pending events are marked failed",
                endpoint.url,
                health
                    .disabled_reason
                    .as_deref()
                    .unwrap_or("failing too long")
            ),
        ),
    };
    tracing::warn!(
        endpoint = %crate::net::redact_urls(&endpoint.circuit_key),
        reason,
        note = %crate::net::redact_urls(&note),
        "webhook endpoint health changed"
    );
    publish_event(ctx, &endpoint.object, kind, reason, ACTION, note).await;
}

/// The signing secrets in a Secret key, read from the cluster (only from a Secret marked for
/// kinsight's signing).
async fn load_secret(
    ctx: &Context,
    namespace: &str,
    reference: &SecretKeyRef,
) -> Result<Vec<String>, String> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = api
        .get_opt(&reference.name)
        .await
        .map_err(|e| format!("reading signing secret {}: {e}", reference.name))?;
    crate::tenancy::signing_keys(&reference.name, secret.as_ref(), &reference.key)
        .map_err(|e| e.to_string())
}
