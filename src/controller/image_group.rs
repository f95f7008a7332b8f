//! Reconciling one ImageGroup: validate, start the worker Job for what has no result yet,
//! fold results into status and the aggregate, then plan webhook deliveries for the
//! dispatchers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument;

use super::fair_queue::{Admission, Lane, ObjectKey, PositionBucket};
use super::job::{
    CARRIED_BY_ANNOTATION, MAX_IMAGES_PER_JOB, build_job, carried_job, catalog_config_map,
    finished, job_name, job_shape, left_images_failure, worker_account, worker_termination,
};
use super::scheduler::{Placement, kueue_queue};
use super::{Context, ControllerError, MANAGER, aggregate::aggregate, events, publish_event};
use crate::crd::{
    ConditionStatus, GroupPhase, ImageGroup, ImageGroupStatus, MAX_RECENT_FAILURES,
    REPLAY_ANNOTATION, RETENTION_ANNOTATION, set_condition,
};
use crate::delivery::Delivery;
use crate::results::{GroupRef, ImageResult, MAX_BATCH};
use crate::store::Plan;
use crate::sync::lock;
use crate::worker::{WorkItem, WorkOrder};

/// How often a group waiting for a worker slot looks again when nothing woke it (well
/// within [`super::fair_queue::REQUEST_TTL`]).
const WAITING_RECHECK: Duration = Duration::from_secs(60);

/// One reconcile, in a span of the group's trace (`trace_id`: see [`crate::trace`]).
pub async fn reconcile(
    cached: Arc<ImageGroup>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let span = tracing::info_span!(
        "reconcile",
        group = %cached.name_any(),
        trace_id = tracing::field::Empty,
    );
    if let Some(trace) = crate::trace::of_group(cached.annotations(), cached.uid().as_deref()) {
        span.record("trace_id", trace.trace_id_hex());
        crate::trace::start(&span, Some(&trace));
    }
    reconcile_group(cached, ctx).instrument(span).await
}

async fn reconcile_group(
    cached: Arc<ImageGroup>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let namespace = cached
        .namespace()
        .ok_or(ControllerError::MissingField("metadata.namespace"))?;
    let name = cached.name_any();
    // The watch cache may trail our own last status write, and the status must not go
    // back in time (a replay carried out twice, Jobs made again), so the group is the
    // current one. The cached copy is, when it is the version our last write made (the
    // common case: a running group changes only by our writes). Else the API server is
    // asked: the cached copy when its version is the same (a metadata read: the spec of
    // 1000 images is 55 KiB), else the group read whole.
    let api = Api::<ImageGroup>::namespaced(ctx.client.clone(), &namespace);
    let written = cached
        .uid()
        .and_then(|uid| lock(&ctx.status_written).get(&uid).cloned());
    let ours = written
        .as_ref()
        .is_some_and(|w| w.version.is_some() && w.version == cached.metadata.resource_version);
    // The watch has not delivered our own last write yet (a Job's event woke the group
    // moments after it): look again when it has, rather than read the group (~45 ms of
    // the API server's time for a 1000-image group).
    if !ours
        && let Some(wait) = written
            .as_ref()
            .and_then(|w| trails_own_write(w, cached.metadata.resource_version.as_ref()))
    {
        return Ok(Action::requeue(wait.min(Duration::from_millis(50))));
    }
    let group = if ours {
        Some((*cached).clone())
    } else {
        match api.get_metadata_opt(&name).await? {
            None => None,
            Some(current)
                if current.metadata.resource_version.is_some()
                    && current.metadata.resource_version == cached.metadata.resource_version =>
            {
                Some((*cached).clone())
            }
            Some(_) => api.get_opt(&name).await?,
        }
    };
    let Some(group) = group.filter(|g| g.metadata.deletion_timestamp.is_none()) else {
        forget(&ctx, &cached).await?;
        return Ok(Action::await_change());
    };
    let uid = group
        .uid()
        .ok_or(ControllerError::MissingField("metadata.uid"))?;
    let generation = group.metadata.generation.unwrap_or(1);
    let now = jiff::Timestamp::now();
    let original = group.status.clone().unwrap_or_default();
    let mut status = original.clone();
    status.observed_generation = Some(generation);

    if !ctx.tenants.contains(&namespace) {
        // The controller has no rights there: nothing runs until the namespace is a tenant
        // (the tenant watch then looks at every group again).
        set_condition(
            &mut status.conditions,
            "Accepted",
            ConditionStatus::False,
            "NotATenant",
            crate::tenancy::not_a_tenant(&ctx.config.tenancy, &namespace),
            Some(generation),
            now,
        );
        ctx.scheduler.forget(&ObjectKey::new(&namespace, &name));
        write_status(&ctx, &group, &original, &status).await?;
        return Ok(Action::await_change());
    }
    if let Err(message) = group.spec.validate(&ctx.config.models) {
        set_condition(
            &mut status.conditions,
            "Accepted",
            ConditionStatus::False,
            "InvalidSpec",
            message,
            Some(generation),
            now,
        );
        status.phase = GroupPhase::Failed;
        // It starts nothing; a place in line would only hold others up.
        ctx.scheduler.forget(&ObjectKey::new(&namespace, &name));
        write_status(&ctx, &group, &original, &status).await?;
        return Ok(Action::await_change());
    }
    set_condition(
        &mut status.conditions,
        "Accepted",
        ConditionStatus::True,
        "Valid",
        "spec is valid",
        Some(generation),
        now,
    );

    let group_ref = GroupRef {
        namespace: namespace.clone(),
        name: name.clone(),
        uid,
    };
    let results = ctx.store.group_results(&group_ref).await?;
    let models = &group.spec.models;
    // Only what is new runs: images without a result, and models an image has not seen.
    // Each keeps its place in the spec, which decides its Job.
    let pending: Vec<(usize, WorkItem)> = group
        .spec
        .images
        .iter()
        .enumerate()
        .filter_map(|(i, image)| {
            let id = image.key(i);
            let missing: Vec<String> = match results.get(&id) {
                Some(r) if r.covers(models) => return None,
                Some(r) => models
                    .iter()
                    .filter(|m| !r.outputs.contains_key(*m))
                    .cloned()
                    .collect(),
                None => Vec::new(),
            };
            Some((
                i,
                WorkItem {
                    id,
                    url: image.url.clone(),
                    models: missing,
                },
            ))
        })
        .collect();

    // Where the group's events go, recorded before any worker can write a result: each
    // write of results plans its images' events to these endpoints.
    // A group this replica has not planned yet reads them from the API server: a
    // subscription made just before it is never missed by a watch that trails.
    let first_look = !lock(&ctx.planned).contains_key(&group_ref.uid);
    let endpoints = events::endpoints(&ctx, &group, &namespace, first_look).await?;
    let endpoint_records = serde_json::to_value(&endpoints)?;
    // The group's trace context is recorded with them: a new one (a PATCH that named a
    // trace) is saved again even where the endpoints stayed.
    let trace = crate::trace::TraceContext::annotated(group.annotations());
    let endpoints_text = format!(
        "{endpoint_records} {} {}",
        trace.traceparent.as_deref().unwrap_or_default(),
        trace.tracestate.as_deref().unwrap_or_default()
    );
    // This replica's last plan saved these very records (only the leader writes them).
    let saved_already = lock(&ctx.planned)
        .get(&group_ref.uid)
        .is_some_and(|planned| planned.key.endpoints == endpoints_text);
    let mut endpoints_changed = false;
    let mut waits_for_slot = false;
    if pending.is_empty() {
        ctx.scheduler.forget(&group_key(&group_ref));
    } else {
        if !saved_already {
            endpoints_changed = ctx
                .store
                .record_endpoints(&group_ref, &endpoint_records, &trace)
                .await?;
        }
        waits_for_slot = ensure_worker_jobs(
            &ctx,
            &group,
            &group_ref,
            generation,
            &pending,
            &mut status,
            first_look,
        )
        .await?;
    }

    status.images_total = u32::try_from(group.spec.images.len()).unwrap_or(u32::MAX);
    let finished_results: Vec<&ImageResult> =
        results.values().filter(|r| r.covers(models)).collect();
    status.images_done = count(finished_results.len());
    status.images_failed = count(
        finished_results
            .iter()
            .filter(|r| r.is_failure(models))
            .count(),
    );
    status.aggregate = Some(aggregate(
        finished_results.iter().copied(),
        models,
        ctx.config.duplicate_distance,
    ));
    let all_done = pending.is_empty();
    status.phase = if all_done {
        GroupPhase::Completed
    } else if status.jobs.is_empty() {
        GroupPhase::Pending
    } else {
        GroupPhase::Running
    };
    if all_done {
        status.completed_at.get_or_insert(Time(now));
        let message = format!(
            "{} of {} images processed, {} failed",
            status.images_done, status.images_total, status.images_failed
        );
        set_condition(
            &mut status.conditions,
            "Completed",
            ConditionStatus::True,
            "AllImagesProcessed",
            message,
            Some(generation),
            now,
        );
    } else {
        status.completed_at = None;
        let message = format!(
            "{} of {} images processed",
            status.images_done, status.images_total
        );
        set_condition(
            &mut status.conditions,
            "Completed",
            ConditionStatus::False,
            "Processing",
            message,
            Some(generation),
            now,
        );
    }

    // Plan the events due now and save them (the dispatchers send them), then the status
    // that counts them: the ledger first, so a restart neither loses nor re-invents one.
    // Dispatchers record the endpoints that answered 410 Gone; the status lists them.
    add_stops(
        &mut status,
        ctx.store.stopped_endpoints(&group_ref.uid).await?,
    );
    // Everything planning depends on. When none of it moved since this replica last
    // planned, only the dispatchers' progress did: the counts come from the database, and
    // the group's deliveries (210,000 rows for 10,000 images and 21 endpoints) stay there.
    let key = PlanKey {
        generation,
        covered: finished_results.len(),
        all_done,
        endpoints: endpoints_text,
        replay: group.annotations().get(REPLAY_ANNOTATION).cloned(),
        stopped: status.stopped_endpoints.clone(),
        // A drained endpoint matters to a group event, which waits for all images.
        open: if all_done {
            ctx.store.open_endpoints(&group_ref.uid).await?
        } else {
            Vec::new()
        },
    };
    let counting = lock(&ctx.planned)
        .get(&group_ref.uid)
        .is_some_and(|planned| planned.covers(&key));
    let open = if counting {
        count_deliveries(&ctx, &group_ref.uid, &mut status, generation, now).await?
    } else {
        let planning = Planning {
            group: &group,
            group_ref: &group_ref,
            results: &results,
            endpoints: &endpoints,
            endpoint_records: &endpoint_records,
            endpoints_changed,
        };
        plan_deliveries(&ctx, &planning, &mut status, key).await?
    };
    if let Some(wait) = progress_wait(&ctx, &group_ref.uid, &original, &status) {
        // Only progress moved, and it was written moments ago: the next round writes it.
        return Ok(Action::requeue(wait));
    }
    write_status(&ctx, &group, &original, &status).await?;
    if all_done {
        // After the status says Completed: whoever counts the group's Jobs against the
        // caps from the cluster sees it done by the time its slot goes to another.
        release_done_jobs(&ctx, &namespace, status.jobs.iter()).await?;
    }

    ctx.config
        .metrics
        .set_pending(&format!("{namespace}/{name}"), open);
    if all_done && open == 0 {
        return expire_when_due(&ctx, &group_ref, &status).await;
    }
    // Jobs are watched, and stored results and settled deliveries notify; the periodic
    // requeue only guards against missed events (the scheduler wakes a waiting group when
    // it may start; it asks again within the scheduler's memory of it regardless).
    if waits_for_slot {
        return Ok(Action::requeue(WAITING_RECHECK));
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The status's delivery counts from the database alone (nothing to plan); returns how
/// many deliveries are open.
async fn count_deliveries(
    ctx: &Context,
    uid: &str,
    status: &mut ImageGroupStatus,
    generation: i64,
    now: jiff::Timestamp,
) -> Result<usize, ControllerError> {
    let counts = ctx.store.delivery_counts(uid).await?;
    let limit = i64::try_from(MAX_RECENT_FAILURES).unwrap_or(10);
    let failures = ctx.store.recent_failures(uid, limit).await?;
    events::set_delivery_counts(status, &counts, &failures, generation, now);
    Ok(counts
        .iter()
        .filter(|c| c.state.is_open())
        .map(|c| usize::try_from(c.count).unwrap_or(usize::MAX))
        .sum())
}

/// What a full plan of a group's events reads.
struct Planning<'a> {
    group: &'a ImageGroup,
    group_ref: &'a GroupRef,
    results: &'a HashMap<String, ImageResult>,
    endpoints: &'a [events::Endpoint],
    /// `endpoints` as saved for the dispatchers.
    endpoint_records: &'a serde_json::Value,
    /// This reconcile stored changed endpoint records already.
    endpoints_changed: bool,
}

/// Reads the group's deliveries, carries out a replay, plans the events due now and saves
/// them with the status's counts; remembers `key` as it stands after. Returns how many
/// deliveries are open.
async fn plan_deliveries(
    ctx: &Context,
    planning: &Planning<'_>,
    status: &mut ImageGroupStatus,
    key: PlanKey,
) -> Result<usize, ControllerError> {
    let uid = &planning.group_ref.uid;
    // Writes of results number their events too: the plan numbers after the last number
    // handed out, read before the deliveries, and saving checks nobody numbered since.
    let base = ctx.store.last_sequence(uid).await?;
    let recorded = ctx.store.group_deliveries(uid).await?;
    // A 410 is recorded with the delivery it failed: read after the deliveries, the stops
    // include every one behind a failure read here (a group event planned now must not go
    // to an endpoint that answered Gone a moment ago).
    add_stops(status, ctx.store.stopped_endpoints(uid).await?);
    let mut deliveries = recorded.clone();
    let replayed = events::apply_replay(planning.group, status, &mut deliveries);
    let now = jiff::Timestamp::now();
    status.sequence = status.sequence.max(base);
    let first = status.sequence;
    let bodies = events::plan(
        planning.group,
        status,
        &mut deliveries,
        planning.results,
        planning.endpoints,
        key.all_done,
        now,
    );
    events::set_delivery_condition(status, &deliveries, key.generation, now);
    let before: HashSet<&str> = recorded.iter().map(|d| d.id.as_str()).collect();
    let after: HashSet<&str> = deliveries.iter().map(|d| d.id.as_str()).collect();
    let new: Vec<Delivery> = deliveries
        .iter()
        .filter(|d| !before.contains(d.id.as_str()))
        .cloned()
        .collect();
    let pruned: Vec<String> = before
        .difference(&after)
        .map(|id| (*id).to_owned())
        .collect();
    let plan = Plan {
        new: &new,
        bodies: &bodies,
        replayed: &replayed.deliveries,
        unstopped: &replayed.unstopped,
        pruned: &pruned,
        endpoints: planning.endpoint_records,
        // `first` may pass `base` in a group numbered before the store kept the count.
        numbered: (status.sequence > first).then_some((base, status.sequence)),
    };
    let saved = ctx.store.save_plan(planning.group_ref, &plan).await?;
    let open: Vec<&Delivery> = deliveries.iter().filter(|d| d.state.is_open()).collect();
    let endpoints: std::collections::BTreeSet<&str> =
        open.iter().map(|d| d.endpoint.as_str()).collect();
    let all_done = key.all_done;
    let planned = Planned {
        key: PlanKey {
            stopped: status.stopped_endpoints.clone(),
            open: if all_done {
                endpoints.into_iter().map(str::to_owned).collect()
            } else {
                Vec::new()
            },
            ..key
        },
        results_plan_their_events: !(planning.endpoints_changed || saved.endpoints_changed),
    };
    remember_plan(ctx, uid, planned);
    Ok(open.len())
}

/// Adds the 410 stops the dispatchers recorded (`<key> <url>`) to the status's list.
fn add_stops(status: &mut ImageGroupStatus, marks: Vec<String>) {
    for mark in marks {
        if !status.stopped_endpoints.contains(&mark) {
            status.stopped_endpoints.push(mark);
        }
    }
}

/// What planning a group's events depends on, as a replica last planned them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanKey {
    generation: i64,
    /// Images with a result for every model.
    covered: usize,
    all_done: bool,
    /// The endpoint records, as saved for the dispatchers.
    endpoints: String,
    replay: Option<String>,
    stopped: Vec<String>,
    /// Endpoints with deliveries still open (when one drains, its group event may be due).
    open: Vec<String>,
}

/// A replica's last plan of a group's events.
#[derive(Clone, Debug)]
pub struct Planned {
    key: PlanKey,
    /// The plan found the endpoint records it saved already stored, so every write of
    /// results since has planned its images' events for these endpoints: images covered
    /// since need no plan here.
    results_plan_their_events: bool,
}

impl Planned {
    /// Nothing to plan for `now`: the same inputs, or only images covered since, whose
    /// events their writes recorded.
    fn covers(&self, now: &PlanKey) -> bool {
        self.key == *now
            || (self.results_plan_their_events
                && self.key
                    == PlanKey {
                        covered: self.key.covered,
                        ..now.clone()
                    })
    }
}

fn remember_plan(ctx: &Context, uid: &str, key: Planned) {
    let mut planned = lock(&ctx.planned);
    // Groups come and go; forgetting all now and then keeps this bounded (the next
    // reconcile of each plans in full).
    if planned.len() > 10_000 {
        planned.clear();
    }
    planned.insert(uid.to_owned(), key);
}

/// Status changes that only move progress (counts, the aggregate, delivery counts and the
/// conditions' messages) are written at most this often per group; a new phase, condition
/// state, Job or replay at once. The API server's cost is per write (a server-side apply of
/// the whole object), not per event.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

// A waiting group's place in line alone is written at most every `POSITION_EVERY` (the
// scheduler wakes it no more often for it): in a backlog every slot that turns over moves
// every waiting group (a third of a 20-group burst's status writes were places in line,
// each processing the whole 55 KiB group in the API server).
use super::fair_queue::POSITION_EVERY;

/// How long to hold back writing `after` over `before`, when that is only progress.
fn progress_wait(
    ctx: &Context,
    uid: &str,
    before: &ImageGroupStatus,
    after: &ImageGroupStatus,
) -> Option<Duration> {
    let states = |s: &ImageGroupStatus| {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect::<Vec<_>>()
    };
    let only_progress = before != after
        && before.phase == after.phase
        && before.observed_generation == after.observed_generation
        && before.jobs == after.jobs
        && before.last_replay == after.last_replay
        && before.stopped_endpoints == after.stopped_endpoints
        && before.completed_at == after.completed_at
        && states(before) == states(after);
    if !only_progress {
        return None;
    }
    let since = lock(&ctx.status_written).get(uid)?.at.elapsed();
    every_for(before, after).checked_sub(since)
}

/// How often a progress-only change of `before` into `after` may be written.
fn every_for(before: &ImageGroupStatus, after: &ImageGroupStatus) -> Duration {
    let waiting = |s: &ImageGroupStatus| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Scheduled" && c.reason == QUEUED_BEHIND)
    };
    let position_only = waiting(before)
        && waiting(after)
        && before.images_done == after.images_done
        && before.deliveries == after.deliveries;
    if position_only {
        POSITION_EVERY
    } else {
        PROGRESS_EVERY
    }
}

/// A replica's last status write of a group.
#[derive(Clone, Debug)]
pub struct StatusWrite {
    pub at: std::time::Instant,
    /// The group's `resourceVersion` after the write.
    pub version: Option<String>,
    /// The watch has delivered that version (the cache holds it or a later one).
    pub seen: bool,
}

/// How long a reconcile waits for the watch to deliver this replica's own last write
/// before it asks the API server instead (the watch may have relisted past it).
const OWN_WRITE_WAIT: Duration = Duration::from_secs(1);

/// The watch delivered `group`: if it is the version this replica's last status write
/// made, the cache has caught up with that write.
pub fn note_seen(ctx: &Context, group: &ImageGroup) {
    let Some(uid) = group.metadata.uid.as_deref() else {
        return;
    };
    if let Some(write) = lock(&ctx.status_written).get_mut(uid)
        && write.version.is_some()
        && write.version == group.metadata.resource_version
    {
        write.seen = true;
    }
}

/// Whether the cached copy trails this replica's own last write of the group (a watch
/// delivers one object's versions in order: a cached copy that is not the written version
/// while that version is not delivered yet is older), and for how long more it is worth
/// waiting for it.
fn trails_own_write(write: &StatusWrite, cached_version: Option<&String>) -> Option<Duration> {
    if write.seen || write.version.is_none() || write.version.as_ref() == cached_version {
        return None;
    }
    OWN_WRITE_WAIT.checked_sub(write.at.elapsed())
}

fn remember_status_write(ctx: &Context, group: &ImageGroup, written: &ImageGroup) {
    let Some(uid) = group.uid() else { return };
    let mut writes = lock(&ctx.status_written);
    // Groups come and go; forgetting all now and then keeps this bounded (a forgotten
    // group's next reconcile asks the API server for its version).
    if writes.len() > 10_000 {
        writes.clear();
    }
    writes.insert(
        uid,
        StatusWrite {
            at: std::time::Instant::now(),
            version: written.metadata.resource_version.clone(),
            seen: false,
        },
    );
}

/// Still processing images or delivering events: where its events go still matters.
pub fn is_delivering(group: &ImageGroup) -> bool {
    group.status.as_ref().is_none_or(|s| {
        s.phase != GroupPhase::Completed
            || !s
                .conditions
                .iter()
                .any(|c| c.type_ == "WebhooksDelivered" && c.status == "True")
    })
}

pub fn error_policy(_group: Arc<ImageGroup>, error: &ControllerError, ctx: Arc<Context>) -> Action {
    super::retry_after_error(error, &ctx)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The Jobs of a generation, by name, with the images each takes: the spec's images in
/// runs of `per_job` by their place, so that an image's Job does not depend on which
/// others are pending (a restart half-way through making them makes the same ones).
fn shards(
    group: &str,
    generation: i64,
    pending: &[(usize, WorkItem)],
    per_job: usize,
) -> BTreeMap<String, Vec<WorkItem>> {
    let per_job = per_job.clamp(1, MAX_IMAGES_PER_JOB);
    let mut out: BTreeMap<usize, Vec<WorkItem>> = BTreeMap::new();
    for (index, item) in pending {
        out.entry(index / per_job).or_default().push(item.clone());
    }
    out.into_iter()
        .map(|(shard, items)| (job_name(group, generation, shard), items))
        .collect()
}

/// Creates this generation's worker Jobs for the images without results, as the
/// scheduler admits them (the rest wait, and the status says so), or, when one of them has
/// finished without writing some of its images, records those images as failed. Returns
/// whether some of the group's Jobs still wait for a slot.
async fn ensure_worker_jobs(
    ctx: &Context,
    group: &ImageGroup,
    group_ref: &GroupRef,
    generation: i64,
    pending: &[(usize, WorkItem)],
    status: &mut ImageGroupStatus,
    first_look: bool,
) -> Result<bool, ControllerError> {
    let namespace = &group_ref.namespace;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let shards = shards(
        &group_ref.name,
        generation,
        pending,
        ctx.config.images_per_job,
    );
    let started_before: Vec<&String> = shards
        .keys()
        .filter(|name| status.jobs.contains(name))
        .collect();
    release_done_jobs(
        ctx,
        namespace,
        status
            .jobs
            .iter()
            .filter(|name| !shards.contains_key(*name)),
    )
    .await?;
    let waits = if started_before.len() < shards.len() {
        if started_before.is_empty() {
            // A new generation redoes what earlier Jobs still run; they stop now, and
            // their slots go to whoever is next (this group's new Jobs may wait).
            stop_superseded_jobs(ctx, &jobs, namespace, &status.jobs).await?;
        }
        start_admitted_jobs(
            ctx, group, group_ref, generation, &shards, status, first_look,
        )
        .await?
    } else {
        ctx.scheduler.forget(&group_key(group_ref));
        false
    };
    // Each finished Job's images, with the reason they have no result (if it left any).
    let mut left = Vec::new();
    for name in started_before {
        // One the Job watch shows running has left nothing yet (a watch that trails only
        // delays the rest); a finished or unseen one is read from the API server.
        if ctx.scheduler.job_running(namespace, name) {
            if let Some(carrier) = ctx.scheduler.carried_by(namespace, name) {
                take_back_from_ended_carrier(ctx, &jobs, namespace, name, &carrier).await?;
            }
            continue;
        }
        let job = jobs.get_opt(name).await?;
        if let (Some(images), Some((reason, message))) =
            (shards.get(name), left_images_failure(job.as_ref()))
        {
            let failed = job.as_ref().and_then(finished) == Some(false);
            left.push((name, failed, images, reason, message));
        }
    }
    if left.is_empty() {
        return Ok(waits);
    }
    // A worker's results are stored before it exits, so a fresh read (one for all of
    // them) decides which images really have no result, and none is ever overwritten by
    // a failure.
    let stored = ctx.store.group_results(group_ref).await?;
    let models = &group.spec.models;
    let planner = events::ImageEvents::new(Arc::new(group.clone()));
    for (name, failed, images, reason, mut message) in left {
        let without: Vec<_> = images
            .iter()
            .filter(|item| !stored.get(&item.id).is_some_and(|r| r.covers(models)))
            .collect();
        if without.is_empty() {
            continue;
        }
        // Only now, with images to fail, ask the failed Job's pods how its worker ended.
        if failed && let Some(ended) = worker_ended(ctx, namespace, name).await {
            message = format!("{message}; {ended}");
        }
        let failures: Vec<ImageResult> = without
            .iter()
            .map(|item| ImageResult::failed(&group_ref.name, &item.id, reason, message.clone()))
            .collect();
        for chunk in failures.chunks(MAX_BATCH) {
            ctx.store
                .store_results(group_ref, generation, chunk, Some(&planner))
                .await?;
        }
    }
    Ok(waits)
}

/// Started Jobs with no image left to store are done but for their worker's exit, which
/// the kubelet and the Job controller report a second or two later: their slots are free
/// now. A Job whose order a carrier did has no pod to end it: done, it is deleted.
async fn release_done_jobs<'a>(
    ctx: &Context,
    namespace: &str,
    jobs: impl Iterator<Item = &'a String>,
) -> Result<(), ControllerError> {
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    for name in jobs {
        ctx.scheduler
            .release(&ObjectKey::new(namespace, name.as_str()));
        if ctx.scheduler.carried_by(namespace, name).is_none() {
            continue;
        }
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => tracing::debug!(job = %name, "a carried worker job is done"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The carrier of Job `name`'s order has ended or gone before storing every result: the
/// order goes back to its own Job, which now gets a pod and does what is left (results are
/// idempotent, so what the carrier stored stays).
async fn take_back_from_ended_carrier(
    ctx: &Context,
    jobs: &Api<Job>,
    namespace: &str,
    name: &str,
    carrier: &str,
) -> Result<(), ControllerError> {
    if ctx.scheduler.job_running(namespace, carrier) {
        return Ok(());
    }
    // The watch may not have shown the carrier yet: only the API server says it ended.
    if let Some(job) = jobs.get_opt(carrier).await?
        && finished(&job).is_none()
    {
        return Ok(());
    }
    ctx.store.take_back(namespace, name, carrier).await?;
    let own = json!({
        "metadata": { "annotations": { CARRIED_BY_ANNOTATION: null } },
        "spec": { "parallelism": 1 },
    });
    jobs.patch(name, &PatchParams::default(), &Patch::Merge(&own))
        .await?;
    tracing::info!(job = %name, carrier = %carrier, "the carrier of a worker job's order ended; the job runs it itself");
    Ok(())
}

/// How a failed Job's worker ended (e.g. OOMKilled at its memory limit), from its pods;
/// `None` when they are gone or cannot be read (the failure is recorded without it).
async fn worker_ended(ctx: &Context, namespace: &str, job: &str) -> Option<String> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let params = ListParams::default().labels(&format!("job-name={job}"));
    match pods.list(&params).await {
        Ok(list) => worker_termination(&list.items),
        Err(e) => {
            tracing::warn!(job, error = %e, "reading a failed worker Job's pods");
            None
        }
    }
}

/// Asks the scheduler (or hands to Kueue) the Jobs of `shards` not started yet, creates
/// those admitted and says in the `Scheduled` condition what the group waits for. Returns
/// whether some still wait.
async fn start_admitted_jobs(
    ctx: &Context,
    group: &ImageGroup,
    group_ref: &GroupRef,
    generation: i64,
    shards: &BTreeMap<String, Vec<WorkItem>>,
    status: &mut ImageGroupStatus,
    first_look: bool,
) -> Result<bool, ControllerError> {
    let namespace = &group_ref.namespace;
    let to_start: Vec<String> = shards
        .keys()
        .filter(|name| !status.jobs.contains(name))
        .cloned()
        .collect();
    let images = to_start
        .iter()
        .filter_map(|name| shards.get(name))
        .map(Vec::len)
        .sum();
    let key = group_key(group_ref);
    let (admitted, placement, still_queued) = match kueue_queue(ctx, namespace, first_look).await? {
        Some(queue) => {
            ctx.scheduler.forget(&key);
            (to_start, Placement::Kueue(queue), 0)
        }
        None => match ctx.scheduler.admit(key, to_start, images) {
            Admission::Start {
                jobs,
                lane,
                still_queued,
            } => (jobs, Placement::Kinsight(lane), still_queued),
            waiting @ (Admission::Queued { .. } | Admission::Counting) => {
                let message = queued_message(ctx, &waiting);
                set_scheduled(status, false, QUEUED_BEHIND, message, generation);
                return Ok(true);
            }
        },
    };
    if !admitted.is_empty() {
        ensure_worker_setup(ctx, namespace).await?;
    }
    // Those handed to a worker that was up (a standby or a carrier): no pod start.
    let mut carriers = Vec::new();
    for name in admitted {
        let Some(images) = shards.get(&name) else {
            continue;
        };
        carriers
            .extend(start_job(ctx, group, group_ref, generation, &name, images, &placement).await?);
        status.jobs.push(name);
    }
    let on_waiting = if carriers.is_empty() {
        String::new()
    } else {
        format!(
            " (on the waiting worker {}, no pod start)",
            carriers.join(", ")
        )
    };
    let (reason, message) = match (&placement, still_queued) {
        (Placement::Kueue(queue), _) => (
            "HandedToKueue",
            format!("worker Jobs created suspended in Kueue queue {queue}; Kueue starts them"),
        ),
        (Placement::Kinsight(_), n) if n > 0 => (
            QUEUED_BEHIND,
            format!("{n} of its worker Jobs wait for a slot; the others run"),
        ),
        (Placement::Kinsight(Lane::Small), _) => (
            "SmallWorkLane",
            format!("worker Job started in the small-work lane{on_waiting}"),
        ),
        (Placement::Kinsight(Lane::Main), _) => {
            ("Admitted", format!("worker Jobs started{on_waiting}"))
        }
    };
    set_scheduled(status, still_queued == 0, reason, message, generation);
    Ok(still_queued > 0)
}

/// Why a group waits, for its `Scheduled` condition: its place in line in coarse steps
/// (so the status is rewritten seldom) and the caps it waits for.
fn queued_message(ctx: &Context, waiting: &Admission) -> String {
    let caps = ctx.scheduler.caps();
    let cap = |n: usize| {
        if n == 0 {
            "no cap".to_owned()
        } else {
            n.to_string()
        }
    };
    let caps = format!(
        "worker Jobs at once: {} per namespace, {} in all",
        cap(caps.max_jobs_per_tenant),
        cap(caps.max_jobs)
    );
    match waiting {
        Admission::Queued { position } => format!(
            "waiting for a worker slot, position {} in line ({caps})",
            PositionBucket::of(*position)
        ),
        _ => "waiting while the controller counts the running worker Jobs".to_owned(),
    }
}

const QUEUED_BEHIND: &str = "QueuedBehind";

fn set_scheduled(
    status: &mut ImageGroupStatus,
    scheduled: bool,
    reason: &str,
    message: String,
    generation: i64,
) {
    let state = if scheduled {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    let now = jiff::Timestamp::now();
    set_condition(
        &mut status.conditions,
        "Scheduled",
        state,
        reason,
        message,
        Some(generation),
        now,
    );
}

/// How the scheduler names a group.
fn group_key(group: &GroupRef) -> ObjectKey {
    ObjectKey::new(&group.namespace, &group.name)
}

/// Creates the Job `name` for `images`, with its work order.
async fn start_job(
    ctx: &Context,
    group: &ImageGroup,
    group_ref: &GroupRef,
    generation: i64,
    name: &str,
    images: &[WorkItem],
    placement: &Placement,
) -> Result<Option<String>, ControllerError> {
    let namespace = &group_ref.namespace;
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let order = WorkOrder {
        group: group_ref.clone(),
        generation,
        models: group.spec.models.clone(),
        images: images.to_vec(),
        // A carrier's spans join the group's trace as the Job's own pod's do.
        traceparent: crate::trace::of_group(group.annotations(), group.uid().as_deref())
            .map(|trace| crate::trace::handed_on(&trace).to_string()),
    };
    let mut job = build_job(group, name, &order, &ctx.config, placement)?;
    // The order first: the Job's pod fetches it as it starts. A worker of the namespace that
    // has done its order and waits, of the same shape, takes it instead: the Job then has no
    // pod of its own, and the group no pod start.
    let carry = job_shape(&job).map(|shape| (shape, ctx.config.worker_linger));
    let carrier = ctx
        .store
        .save_work_order(
            namespace,
            name,
            &order,
            carry
                .as_ref()
                .map(|(shape, fresh)| (shape.as_str(), *fresh)),
        )
        .await?;
    if let Some(carrier) = &carrier {
        tracing::info!(job = %name, carrier = %carrier, "handed a worker job's order to a waiting worker");
        job = carried_job(job, carrier);
    }
    match jobs.create(&PostParams::default(), &job).await {
        Ok(_) => {
            tracing::info!(job = %name, namespace = %namespace, images = images.len(), "created worker job");
        }
        // Created before a restart: the deterministic name makes this a no-op.
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(carrier)
}

/// Stops the Jobs of earlier generations that are still running. The new Job has every
/// image without a result for the current models, theirs included, so they would only do
/// the same work twice; what they already wrote stays.
async fn stop_superseded_jobs(
    ctx: &Context,
    jobs: &Api<Job>,
    namespace: &str,
    earlier: &[String],
) -> Result<(), ControllerError> {
    for name in earlier {
        let Some(job) = jobs.get_opt(name).await? else {
            continue;
        };
        if finished(&job).is_some() {
            continue;
        }
        // Its own order done, it carries another group's: that group's work goes on.
        if ctx.store.carries(namespace, name).await? {
            continue;
        }
        // Background propagation: the garbage collector deletes its pods.
        match jobs.delete(name, &DeleteParams::background()).await {
            Ok(_) => tracing::info!(job = %name, "stopped a superseded worker job"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// How long the worker setup this replica applied in a namespace is trusted without a
/// write: every Job start applied both objects again, two of the API server's writes per
/// group; one removed by hand comes back within this.
pub const WORKER_SETUP_FRESH: Duration = Duration::from_secs(60);

/// The worker's identity and the catalog it reads, in the group's namespace.
pub(super) async fn ensure_worker_setup(
    ctx: &Context,
    namespace: &str,
) -> Result<(), ControllerError> {
    let fresh = lock(&ctx.worker_setup)
        .get(namespace)
        .is_some_and(|at| at.elapsed() < WORKER_SETUP_FRESH);
    if fresh {
        return Ok(());
    }
    let params = PatchParams::apply(MANAGER).force();
    Api::<ServiceAccount>::namespaced(ctx.client.clone(), namespace)
        .patch(
            super::WORKER_ACCOUNT,
            &params,
            &Patch::Apply(&worker_account(namespace)),
        )
        .await?;
    // The catalog the Job's pod mounts, as this controller knows it.
    if let Some(catalog) = &ctx.config.worker_catalog {
        let config_map = catalog_config_map(namespace, catalog);
        Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace)
            .patch(
                super::CATALOG_CONFIG_MAP,
                &params,
                &Patch::Apply(&config_map),
            )
            .await?;
    }
    lock(&ctx.worker_setup).insert(namespace.to_owned(), std::time::Instant::now());
    Ok(())
}

async fn write_status(
    ctx: &Context,
    group: &ImageGroup,
    before: &ImageGroupStatus,
    after: &ImageGroupStatus,
) -> Result<(), ControllerError> {
    if before == after {
        return Ok(());
    }
    let namespace = group.namespace().unwrap_or_default();
    let api: Api<ImageGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": ImageGroup::api_version(&()),
        "kind": ImageGroup::kind(&()),
        "status": after,
    });
    let written = api
        .patch_status(
            &group.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await;
    match written {
        Ok(written) => {
            remember_status_write(ctx, group, &written);
            Ok(())
        }
        Err(kube::Error::Api(s)) if is_too_large(&s) => {
            let bytes = serde_json::to_vec(after).map_or(0, |b| b.len());
            let note = format!(
                "status not saved: {} KiB, plus the spec, is more than the API server keeps \
                 in one object ({}); smaller groups stay within",
                bytes.div_ceil(1024),
                s.message
            );
            let object = group.object_ref(&());
            let warning = kube::runtime::events::EventType::Warning;
            publish_event(
                ctx,
                &object,
                warning,
                "StatusTooLarge",
                "RecordStatus",
                note.clone(),
            )
            .await;
            Err(ControllerError::StatusTooLarge(note))
        }
        Err(e) => Err(e.into()),
    }
}

/// etcd's request limit (1.5 MiB by default) or the API server's body limit.
fn is_too_large(status: &kube::core::Status) -> bool {
    status.code == 413 || status.message.contains("too large")
}

/// The tenant's own retention: the annotation [`RETENTION_ANNOTATION`] on its namespace
/// (`kubectl annotate namespace tenant-a kinsight.io/group-ttl=30d`). One that does not parse
/// is reported and the controller's `--group-ttl` applies.
async fn tenant_retention(
    ctx: &Context,
    namespace: &str,
) -> Result<Option<Duration>, ControllerError> {
    let Some(text) = super::namespace_annotation(ctx, namespace, RETENTION_ANNOTATION).await?
    else {
        return Ok(None);
    };
    match crate::webhook::parse_duration(&text) {
        Ok(ttl) => Ok(Some(ttl)),
        Err(e) => {
            tracing::warn!(namespace, value = %text, error = %e, "ignoring the namespace's retention annotation");
            Ok(None)
        }
    }
}

/// A group gone (or going) from the cluster: its events no longer wait, its place in the
/// scheduler's line goes, its stored results go and its images in flight no longer count
/// against the tenant's cap.
pub(super) async fn forget(ctx: &Context, group: &ImageGroup) -> Result<(), ControllerError> {
    let (namespace, name) = (group.namespace().unwrap_or_default(), group.name_any());
    ctx.config
        .metrics
        .set_pending(&format!("{namespace}/{name}"), 0);
    ctx.scheduler.forget(&ObjectKey::new(&namespace, &name));
    if let Some(uid) = group.uid() {
        ctx.store.remove_group(&uid, super::PURGE_BATCH).await?;
    }
    Ok(())
}

/// Deletes a finished group once its retention is over: its Jobs go with it (owner
/// references), its stored results right after.
async fn expire_when_due(
    ctx: &Context,
    group: &GroupRef,
    status: &ImageGroupStatus,
) -> Result<Action, ControllerError> {
    let (namespace, name) = (&group.namespace, &group.name);
    let Some(completed) = &status.completed_at else {
        return Ok(Action::await_change());
    };
    let ttl = tenant_retention(ctx, namespace)
        .await?
        .unwrap_or(ctx.config.group_ttl);
    let ttl = jiff::SignedDuration::try_from(ttl).unwrap_or(jiff::SignedDuration::MAX);
    let expires = completed.0.checked_add(ttl).unwrap_or(jiff::Timestamp::MAX);
    let left = jiff::Timestamp::now().duration_until(expires);
    if left.is_positive() {
        let wait = Duration::try_from(left).unwrap_or(Duration::from_secs(3600));
        return Ok(Action::requeue(wait.min(Duration::from_secs(3600))));
    }
    let api: Api<ImageGroup> = Api::namespaced(ctx.client.clone(), namespace);
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {
            tracing::info!(group = %name, namespace = %namespace, "retention over; group deleted")
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    ctx.store
        .remove_group(&group.uid, super::PURGE_BATCH)
        .await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(index: usize) -> (usize, WorkItem) {
        let id = format!("i{index}");
        let url = format!("https://photos.example/{index}.jpg");
        (
            index,
            WorkItem {
                id,
                url,
                models: Vec::new(),
            },
        )
    }

    #[test]
    fn an_image_goes_to_the_job_of_its_place_whichever_others_are_pending() {
        let ids = |items: &[WorkItem]| items.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
        let all: Vec<_> = (0..7).map(item).collect();
        let jobs = shards("grp", 2, &all, 3);
        let named: Vec<(&str, Vec<String>)> = jobs
            .iter()
            .map(|(n, items)| (n.as_str(), ids(items)))
            .collect();
        assert_eq!(
            named,
            [
                ("grp-g2", vec!["i0".into(), "i1".into(), "i2".into()]),
                ("grp-g2-1", vec!["i3".into(), "i4".into(), "i5".into()]),
                ("grp-g2-2", vec!["i6".into()]),
            ]
        );
        // Later, with some done: the same Jobs for the rest, none for a finished run.
        let rest: Vec<_> = [1, 2, 6].into_iter().map(item).collect();
        let jobs = shards("grp", 2, &rest, 3);
        assert_eq!(jobs.keys().collect::<Vec<_>>(), ["grp-g2", "grp-g2-2"]);
        // A nonsensical size is bounded, never a division by zero.
        assert_eq!(shards("grp", 2, &all, 0).len(), 7);
        assert_eq!(shards("grp", 2, &all, 5000).len(), 1);
    }

    #[test]
    fn a_cache_that_trails_the_replicas_own_write_is_waited_for_a_moment_only() {
        let version = |v: &str| Some(v.to_owned());
        let write = StatusWrite {
            at: std::time::Instant::now(),
            version: version("7"),
            seen: false,
        };
        // The cache holds an older copy and the watch has not delivered "7": wait.
        let wait = trails_own_write(&write, version("5").as_ref()).expect("waits");
        assert!(wait > Duration::ZERO && wait <= OWN_WRITE_WAIT);
        // It holds "7" itself, or the watch delivered "7" and then a change by someone
        // else: no wait (the first is our copy, the second is read from the API server).
        assert_eq!(trails_own_write(&write, version("7").as_ref()), None);
        let delivered = StatusWrite {
            seen: true,
            ..write.clone()
        };
        assert_eq!(trails_own_write(&delivered, version("9").as_ref()), None);
        // A watch that never delivers it (relisted past it) is waited for no longer
        // than OWN_WRITE_WAIT.
        let long_ago = StatusWrite {
            at: std::time::Instant::now()
                .checked_sub(OWN_WRITE_WAIT)
                .expect("a clock past its first second"),
            ..write
        };
        assert_eq!(trails_own_write(&long_ago, version("5").as_ref()), None);
    }

    #[test]
    fn a_place_in_line_alone_is_written_less_often_than_progress() {
        let now = jiff::Timestamp::now();
        let waiting = |message: &str, done: u32| {
            let mut status = ImageGroupStatus {
                images_done: done,
                ..ImageGroupStatus::default()
            };
            set_scheduled(&mut status, false, QUEUED_BEHIND, message.to_owned(), 1);
            status
        };
        let third = waiting("position 3 in line", 0);
        assert_eq!(
            every_for(&third, &waiting("position 2 in line", 0)),
            POSITION_EVERY
        );
        // Some of its Jobs run while others wait: their progress is not held back as long.
        assert_eq!(
            every_for(&third, &waiting("position 2 in line", 40)),
            PROGRESS_EVERY
        );
        let mut running = third.clone();
        running.images_done = 40;
        set_condition(
            &mut running.conditions,
            "Scheduled",
            ConditionStatus::True,
            "Admitted",
            "worker Jobs started",
            Some(1),
            now,
        );
        let mut further = running.clone();
        further.images_done = 80;
        assert_eq!(every_for(&running, &further), PROGRESS_EVERY);
    }
}
