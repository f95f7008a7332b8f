//! The operator: reconciles ImageGroups (worker Jobs, progress, aggregate, planning webhook
//! events) and WebhookSubscriptions (validation, readiness), reporting through status
//! conditions, on the elected leader; every replica's dispatcher sends the events. One
//! `Context` is shared by every reconcile and the dispatcher.

mod aggregate;
mod dispatch;
mod events;
mod fair_queue;
pub mod health;
pub use events::ImageEvents;
mod image_group;
mod job;
mod leader;
mod listing;
mod metrics;
mod retention;
mod scheduler;
mod standby;
mod subscription;
mod subscription_source;
mod wake;

pub use fair_queue::JobCaps;
pub use job::STANDBY_LABEL;
pub use job::{
    CATALOG_CONFIG_MAP, CATALOG_HASH_ANNOTATION, CATALOG_KEY, CATALOG_MOUNT_PATH, GpuSettings,
    WorkerCatalog,
};
pub use job::{MAX_IMAGES_PER_JOB, RESULTS_URL_ENV, WORKER_ACCOUNT, job_name};
pub use leader::{LEASE_NAME, LeaderElection, run_as_leader};
pub use listing::DEFAULT_DUPLICATE_DISTANCE;
pub use metrics::Metrics;
pub use scheduler::{KUEUE_QUEUE_ANNOTATION, KUEUE_QUEUE_LABEL, LANE_LABEL};

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::utils::PredicateConfig;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};

use crate::crd::{GroupPhase, ImageGroup, WebhookSubscription};
use crate::net::{EgressGuard, EgressPolicy};
use crate::shutdown::Shutdown;
use crate::store::{ALL_STORED, GROUPS_CHANNEL, RESULTS_CHANNEL, Store, StoreNotice};
use crate::tenancy::{TenancyConfig, Tenants};
use crate::webhook::{CircuitConfig, Circuits, RetrySchedule, Sender, SenderConfig};

/// Stored rows deleted per statement when a group's results go.
const PURGE_BATCH: i64 = 5_000;

/// Field manager for everything the controller writes.
pub const MANAGER: &str = "kinsight-controller";

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Model names the catalog offers; groups asking for others are rejected.
    pub models: Vec<String>,
    pub worker_image: String,
    /// The URL workers send their results to (the API's result ingest).
    pub results_url: String,
    /// Extra environment for worker pods (models folder, ONNX Runtime path, ...).
    pub worker_env: Vec<(String, String)>,
    /// Each worker pod's CPU limit, and its request unless `worker_cpu_request` is set.
    pub worker_cpu: String,
    /// A smaller CPU request than the limit (Burstable pods): more pods fit a node, each
    /// may still use its whole limit when the node has it to spare.
    pub worker_cpu_request: Option<String>,
    pub worker_memory: String,
    pub worker_backoff_limit: i32,
    /// Images one worker Job takes at most (1 to [`job::MAX_IMAGES_PER_JOB`]); a bigger
    /// group (or update) runs as several Jobs at once.
    pub images_per_job: usize,
    /// How long a worker Job may run before it is failed (`activeDeadlineSeconds`).
    pub worker_deadline: Duration,
    /// How long a worker that has done its order waits for another of its namespace that
    /// the controller hands it (a carrier: that group then pays no pod start); zero: workers
    /// do their own order only.
    pub worker_linger: Duration,
    /// Standby workers kept per tenant namespace: pods with the CPU models loaded and no
    /// order of their own, handed the tenant's next group (needs a linger).
    pub standby_workers: usize,
    pub retry: RetrySchedule,
    pub sender: SenderConfig,
    /// Private destinations webhooks may reach anyway (default: none).
    pub egress: EgressPolicy,
    /// Where the controller counts what it does (served on `/metrics` by the binary).
    pub metrics: Arc<Metrics>,
    /// How long a finished group (and its results) is kept.
    pub group_ttl: Duration,
    /// Per-endpoint circuit breaking, concurrency bound and disabling.
    pub circuit: CircuitConfig,
    /// How often a subscription's status catches up with its endpoint's health.
    pub health_sync: Duration,
    /// Claimed deliveries one replica's dispatcher works on at once (waiting for an
    /// endpoint's slot or in flight); the rest stay in the table for other replicas.
    pub dispatch_in_flight: usize,

    // Worker catalog and GPUs.
    /// The catalog published into each tenant namespace and mounted by worker pods, with
    /// which models want a GPU. `None`: workers use their image's (`KINSIGHT_CATALOG`).
    pub worker_catalog: Option<WorkerCatalog>,
    /// What Jobs running a GPU model ask for.
    pub gpu: GpuSettings,
    /// How many worker Jobs run at once, in all and per tenant, and the small-work lane.
    pub job_caps: JobCaps,
    /// Where tenants are recorded and which rights the controller binds in each.
    pub tenancy: TenancyConfig,
    /// Only this namespace's groups, subscriptions and worker Jobs are watched (a
    /// namespace-scoped install, like operator-sdk's `WATCH_NAMESPACE`); `None`: every
    /// namespace's, those of non-tenants answered `NotATenant`.
    pub watch_namespace: Option<String>,
    /// Hamming distance (of 64 bits) at or under which two photos of a group are
    /// near-duplicates in its listing summary.
    pub duplicate_distance: u32,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            worker_image: concat!("kinsight:", env!("CARGO_PKG_VERSION")).to_owned(),
            results_url: String::new(),
            worker_env: Vec::new(),
            worker_cpu: "1".to_owned(),
            worker_cpu_request: None,
            worker_memory: "1Gi".to_owned(),
            worker_backoff_limit: 2,
            images_per_job: job::MAX_IMAGES_PER_JOB,
            duplicate_distance: DEFAULT_DUPLICATE_DISTANCE,
            worker_deadline: Duration::from_secs(3600),
            worker_linger: Duration::ZERO,
            standby_workers: 0,
            retry: RetrySchedule::default(),
            sender: SenderConfig::default(),
            egress: EgressPolicy::default(),
            metrics: Arc::default(),
            group_ttl: Duration::from_secs(7 * 24 * 3600),
            circuit: CircuitConfig::default(),
            health_sync: Duration::from_secs(10),
            dispatch_in_flight: 2_000,
            worker_catalog: None,
            gpu: GpuSettings::default(),
            job_caps: JobCaps {
                max_jobs: 16,
                max_jobs_per_tenant: 8,
                small_images: 10,
                small_lane_jobs: 2,
            },
            watch_namespace: None,
            tenancy: TenancyConfig {
                keys_namespace: "kinsight-system".to_owned(),
                tenant_role: "kinsight-controller-tenant".to_owned(),
                service_account: (
                    "kinsight-system".to_owned(),
                    "kinsight-controller".to_owned(),
                ),
                worker_account: WORKER_ACCOUNT.to_owned(),
                catalog_config_map: CATALOG_CONFIG_MAP.to_owned(),
                network_policy: None,
                bindings: crate::tenancy::TenantBindings::Controller,
            },
        }
    }
}

pub struct Context {
    /// Kubernetes Events on the objects (e.g. a webhook that failed for good).
    pub recorder: kube::runtime::events::Recorder,
    pub client: Client,
    pub config: ControllerConfig,
    /// Results (and everything else high-volume) live here.
    pub store: Store,
    pub sender: Sender,
    /// Every endpoint's circuit breaker, shared by all reconciles.
    pub circuits: Circuits,
    /// This replica's last status write of each group (by uid): when (to space out
    /// progress writes) and the object's version it made (to trust the watch cache).
    pub status_written:
        std::sync::Mutex<std::collections::HashMap<String, image_group::StatusWrite>>,
    /// What each group's events were last planned from (by uid): a reconcile that finds
    /// the same only counts.
    pub planned: std::sync::Mutex<std::collections::HashMap<String, image_group::Planned>>,
    /// Which groups may start worker Jobs now (the leader's).
    pub scheduler: scheduler::Scheduler,
    /// When this replica last applied each namespace's worker ServiceAccount and catalog
    /// ConfigMap: a Job start within [`image_group::WORKER_SETUP_FRESH`] of it skips the two
    /// writes (forgotten whenever the tenant set changes: a tenant that goes loses them).
    pub worker_setup: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The namespaces the controller works in (the leader keeps it current).
    pub tenants: Tenants,
    /// Each namespace's subscriptions, from the watch when it has caught up.
    pub subscriptions: subscription_source::SubscriptionSource,
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("building the worker Job: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("object has no {0}")]
    MissingField(&'static str),
    #[error("webhook client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("configuration: {0}")]
    Config(String),
    #[error("leader election: {0}")]
    Leadership(String),
    #[error("{0}")]
    StatusTooLarge(String),
}

impl ControllerError {
    /// Stable category for logs and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kubernetes_api",
            Self::Store(e) => e.category(),
            Self::Serialize(_) => "serialize",
            Self::MissingField(_) => "invalid_object",
            Self::Http(_) => "http_client",
            Self::Config(_) => "configuration",
            Self::Leadership(_) => "leader_election",
            Self::StatusTooLarge(_) => "status_too_large",
        }
    }
}

/// The objects of kind `K` the controller watches: in `namespace` only, or everywhere.
pub(crate) fn watched<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers and a webhook dispatcher until the process is stopped: the only
/// replica (no leader election).
pub async fn run(
    client: Client,
    store: Store,
    config: ControllerConfig,
    shutdown: Shutdown,
) -> Result<(), ControllerError> {
    let ctx = context(client, store, config)?;
    let owner = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "kinsight".into()),
        std::process::id()
    );
    let dispatcher = dispatch::run(ctx.clone(), owner, true, shutdown.clone());
    tokio::pin!(dispatcher);
    tokio::select! {
        result = reconcile(ctx) => return result,
        () = &mut dispatcher => return Err(ControllerError::Config("the webhook dispatcher stopped".into())),
        () = shutdown.requested() => {}
    }
    // Reconciling stops at once (a reconcile cut short is run again by whoever leads
    // next); the dispatcher finishes the sends in hand.
    dispatcher.await;
    Ok(())
}

/// Everything a controller process shares: clients, the store, every endpoint's circuit.
fn context(
    client: Client,
    store: Store,
    config: ControllerConfig,
) -> Result<Arc<Context>, ControllerError> {
    if config.results_url.is_empty() {
        return Err(ControllerError::Config(
            "no results URL: workers would have nowhere to send their results".into(),
        ));
    }
    Ok(Arc::new(Context {
        client: client.clone(),
        sender: Sender::new(&config.sender, EgressGuard::new(config.egress.clone()))?,
        store,
        recorder: kube::runtime::events::Recorder::new(client, MANAGER.into()),
        circuits: Circuits::new(config.circuit.clone()),
        status_written: std::sync::Mutex::default(),
        planned: std::sync::Mutex::default(),
        scheduler: scheduler::Scheduler::new(config.job_caps, config.metrics.clone()),
        worker_setup: std::sync::Mutex::default(),
        tenants: Tenants::default(),
        subscriptions: subscription_source::SubscriptionSource::default(),
        config,
    }))
}

/// Runs both controllers (the leader's work) until the process is stopped.
async fn reconcile(ctx: Arc<Context>) -> Result<(), ControllerError> {
    let client = ctx.client.clone();
    let (cached, writer) = kube::runtime::reflector::store();
    // A stored batch of results and a settled delivery name their group. A write of results
    // records its own events, and a running group's deliveries only move progress, so
    // those wake the group at most once a second; a completed group's settled deliveries
    // wake it at once (an endpoint that drained may be due its group event). After a
    // (re)connection, notifications may have been missed: look at every group.
    let notices = crate::store::listen(
        ctx.store.url().to_owned(),
        &[GROUPS_CHANNEL, RESULTS_CHANNEL],
    );
    let (wake_all_tx, wake_all) = futures::channel::mpsc::unbounded::<()>();
    // Groups and subscriptions are looked at only once the tenants are known, and all of
    // them again whenever the tenant set changes.
    let (tenants_listed, mut tenants_ready) = tokio::sync::watch::channel(false);
    let tenant_changes = wake_all_tx.clone();
    let setup_ctx = ctx.clone();
    let tenancy = crate::tenancy::run(
        client.clone(),
        ctx.config.tenancy.clone(),
        ctx.tenants.clone(),
        tenants_listed,
        move || {
            crate::sync::lock(&setup_ctx.worker_setup).clear();
            let _ = tenant_changes.unbounded_send(());
        },
    );
    let tenancy = tokio::spawn(tenancy);
    let _stop_tenancy = AbortOnDrop(tenancy.abort_handle());
    if tenants_ready.wait_for(|ready| *ready).await.is_err() {
        return Err(ControllerError::Config("the tenant watch stopped".into()));
    }
    let (later_tx, later_rx) = futures::channel::mpsc::unbounded();
    let known = cached.clone();
    let at_once = notices.filter_map(move |notice| {
        let (wake_all_tx, later_tx, known) = (wake_all_tx.clone(), later_tx.clone(), known.clone());
        async move {
            match notice {
                StoreNotice::Connected => {
                    let _ = wake_all_tx.unbounded_send(());
                    None
                }
                StoreNotice::Notification { channel, payload } => {
                    // The group's last results: looked at now, not at the window's end.
                    let (payload, all_stored) = match payload.strip_suffix(ALL_STORED) {
                        Some(key) => (key, channel == RESULTS_CHANNEL),
                        None => (payload.as_str(), false),
                    };
                    let (namespace, name) = payload.split_once('/')?;
                    let group = ObjectRef::<ImageGroup>::new(name).within(namespace);
                    let completed = || {
                        known.get(&group).is_some_and(|g| {
                            g.status
                                .as_ref()
                                .is_some_and(|s| s.phase == GroupPhase::Completed)
                        })
                    };
                    if !all_stored && (channel == RESULTS_CHANNEL || !completed()) {
                        let _ = later_tx.unbounded_send(group);
                        return None;
                    }
                    Some(group)
                }
            }
        }
    });
    // The scheduler wakes the groups that may start worker Jobs now (one just ended).
    let admitted = ctx.scheduler.take_wakes().ok_or_else(|| {
        ControllerError::Config("the scheduler's wake-ups are another controller's".into())
    })?;
    let wake_groups = futures::stream::select(
        futures::stream::select(at_once, wake::coalesce(later_rx, wake::RESULTS_EVERY)),
        admitted,
    );
    let watch_namespace = ctx.config.watch_namespace.as_deref();
    let retention = retention::run(
        client.clone(),
        ctx.config.watch_namespace.clone(),
        ctx.store.clone(),
    );
    let groups: Api<ImageGroup> = watched(&client, watch_namespace);
    let subscriptions: Api<WebhookSubscription> = watched(&client, watch_namespace);
    // A group is looked at again when its intent changes (spec, labels, annotations such
    // as a replay request, deletion), not when its status does: the status is this
    // controller's own writing.
    // A group deleted outright (no finalizer: it is gone from the cache at once, so no
    // reconcile sees it) is forgotten here; deletions the watch missed while it was away
    // are found by the retention sweep.
    let (deleted_tx, deleted_rx) = futures::channel::mpsc::unbounded::<ImageGroup>();
    let seen_ctx = ctx.clone();
    let group_changes = watcher(groups, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(watcher::Event::Delete(group)) => {
                let _ = deleted_tx.unbounded_send(group.clone());
            }
            Ok(watcher::Event::Apply(group) | watcher::Event::InitApply(group)) => {
                image_group::note_seen(&seen_ctx, group);
            }
            _ => {}
        })
        .applied_objects()
        .predicate_filter(intent_of, PredicateConfig::default());
    let group_controller = Controller::for_stream(group_changes, cached.clone());
    // A subscription that changes (a corrected URL, new headers) or goes changes where the
    // events of the groups still delivering in its namespace go. The watch that wakes them
    // fills the store their reconciles read, before it wakes them.
    let (subscriptions_cache, subscriptions_writer) = kube::runtime::reflector::store();
    ctx.subscriptions.watch_with(subscriptions_cache);
    let subscription_changes = watcher(subscriptions.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(subscriptions_writer)
        .touched_objects();
    let delivering_groups = move |sub: WebhookSubscription| {
        let namespace = sub.namespace();
        cached
            .state()
            .into_iter()
            .filter(|g| g.namespace() == namespace && image_group::is_delivering(g))
            .map(|g| ObjectRef::from_obj(&*g))
            .collect::<Vec<_>>()
    };
    // One watch of the worker Jobs: it counts them for the scheduler (nothing is admitted
    // before its first full listing) and wakes the group owning a Job that changed.
    let scheduler_ctx = ctx.clone();
    let (jobs_cache, jobs_writer) = kube::runtime::reflector::store();
    ctx.scheduler.watch_jobs_with(jobs_cache);
    let worker_jobs = watcher(
        watched::<Job>(&client, watch_namespace),
        watcher::Config::default().labels(scheduler::WORKER_JOB_SELECTOR),
    )
    .default_backoff()
    .reflect(jobs_writer)
    .inspect(move |event| {
        if let Ok(event) = event {
            scheduler_ctx.scheduler.observe(event);
            if let watcher::Event::Delete(job) = event {
                forget_work_order(&scheduler_ctx, job);
            }
        }
    })
    .touched_objects();
    let group_controller = group_controller
        .owns_stream(worker_jobs)
        .watches_stream(subscription_changes, delivering_groups)
        .reconcile_on(wake_groups)
        .reconcile_all_on(wake_all)
        .run(
            image_group::reconcile,
            image_group::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "image group reconcile");
            }
        });
    let ctx_for_deletions = ctx.clone();
    let ctx_for_standbys = ctx.clone();
    let subscription_controller = Controller::new(subscriptions, watcher::Config::default())
        .run(subscription::reconcile, subscription::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "subscription reconcile");
            }
        });
    let forget_ctx = ctx_for_deletions;
    let deletions = deleted_rx.for_each(move |group| {
        let ctx = forget_ctx.clone();
        async move {
            if let Err(e) = image_group::forget(&ctx, &group).await {
                tracing::warn!(group = %group.name_any(), error = %e, "forgetting a deleted group (the retention sweep retries)");
            }
        }
    });
    let standbys = standby::run(ctx_for_standbys);
    tracing::info!("controller started");
    futures::join!(
        group_controller,
        subscription_controller,
        retention,
        deletions,
        standbys
    );
    Ok(())
}

/// Stops a spawned task when the reconcile that started it ends (leadership lost).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a group asks for, as a hash: a status write leaves it as it is.
fn intent_of(group: &ImageGroup) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let meta = &group.metadata;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut hasher);
    meta.labels.hash(&mut hasher);
    meta.annotations.hash(&mut hasher);
    meta.deletion_timestamp.is_some().hash(&mut hasher);
    Some(hasher.finish())
}

/// One annotation of a tenant's namespace (its settings: retention, Kueue queue).
pub(crate) async fn namespace_annotation(
    ctx: &Context,
    namespace: &str,
    key: &str,
) -> Result<Option<String>, ControllerError> {
    let found = Api::<k8s_openapi::api::core::v1::Namespace>::all(ctx.client.clone())
        .get_opt(namespace)
        .await?;
    Ok(found.and_then(|ns| ns.annotations().get(key).cloned()))
}

/// A Kubernetes Event on an object (`kubectl describe` shows it); failing to record one
/// is logged, never an error of the reconcile.
pub(crate) async fn publish_event(
    ctx: &Context,
    object: &k8s_openapi::api::core::v1::ObjectReference,
    kind: kube::runtime::events::EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = kube::runtime::events::Event {
        type_: kind,
        reason: reason.to_owned(),
        // Customers' URLs may carry credentials (signed queries, user info).
        note: Some(crate::net::redact_urls(&note).chars().take(1000).collect()),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, object).await {
        tracing::warn!(error = %e, "could not record a Kubernetes Event");
    }
}

fn retry_after_error(error: &ControllerError, ctx: &Context) -> Action {
    if matches!(
        error,
        ControllerError::Store(crate::store::StoreError::Conflict(_))
    ) {
        // A write of results numbered events while the plan was made: plan again at once.
        tracing::debug!(error = %error, "plan raced a write of results; planning again");
        return Action::requeue(Duration::from_millis(100));
    }
    ctx.config
        .metrics
        .reconcile_errors
        .get_or_create(&metrics::CategoryLabels {
            category: error.category(),
        })
        .inc();
    tracing::warn!(category = error.category(), error = %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// A deleted worker Job's order is of no more use (a Job deleted while no controller
/// watched leaves its order to the group's purge). Only the order of the Job's own group:
/// a group made again under the same name has the same Job names.
fn forget_work_order(ctx: &Arc<Context>, job: &Job) {
    let (Some(namespace), Some(group_uid)) = (
        job.namespace(),
        job.owner_references()
            .iter()
            .find(|owner| owner.kind == "ImageGroup")
            .map(|owner| owner.uid.clone()),
    ) else {
        return;
    };
    let name = job.name_any();
    let store = ctx.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.delete_work_order(&namespace, &name, &group_uid).await {
            tracing::warn!(job = %name, error = %e, "deleting a deleted Job's work order");
        }
    });
}
