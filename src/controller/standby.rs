//! Standby workers: with `--standby-workers N`, each tenant namespace keeps N worker Jobs
//! with no order of their own. Their pods start and load the catalog's CPU models before any
//! group comes, then wait as carriers do (see [`crate::worker::Carrier`]): the tenant's next
//! group is handed to one and starts with neither a pod start nor a model load of its own,
//! as Knative's `min-scale` keeps a revision warm. The scheduler does not count them; the
//! group Jobs whose orders they carry hold the slots.
//!
//! The leader looks every few seconds at the Job watch: a standby that ended (idle for its
//! whole wait, or failed) is deleted and made again, and one of another shape (the catalog,
//! image or settings changed) is replaced. What a deleted standby carried goes back to the
//! carried groups' own Jobs, as for any carrier.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};

use super::job::{finished, standby_job};
use super::{Context, ControllerError};

/// How often the leader looks at every tenant's standbys.
const LOOK_EVERY: Duration = Duration::from_secs(5);
/// How long a standby waits for an order before it ends (and is made again): a tenant that
/// went away leaves no pod behind for longer.
pub const STANDBY_IDLE: Duration = Duration::from_secs(600);
/// A failed standby is made again only after this, so a pod that cannot start costs one
/// pod a minute, not one per look.
const FAILED_PAUSE: Duration = Duration::from_secs(60);

/// Keeps the standbys of every tenant until the leadership ends (the caller drops it).
pub async fn run(ctx: Arc<Context>) {
    let wanted = ctx.config.standby_workers;
    if wanted == 0 || ctx.config.worker_linger.is_zero() {
        return std::future::pending().await;
    }
    loop {
        // What exists is read from the Job watch: nothing is made before its first listing,
        // which a new leader's first look waits for.
        let Some(jobs) = ctx.scheduler.standby_jobs() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut by_namespace: HashMap<String, Vec<&Job>> = HashMap::new();
        for job in &jobs {
            by_namespace
                .entry(job.namespace().unwrap_or_default())
                .or_default()
                .push(job);
        }
        for namespace in ctx.tenants.namespaces() {
            let theirs = by_namespace.get(&namespace).map_or(&[][..], Vec::as_slice);
            if let Err(e) = keep(&ctx, &namespace, wanted, theirs).await {
                tracing::warn!(namespace, error = %e, "keeping standby workers");
            }
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

/// Makes `namespace`'s standbys the `wanted` ones of the current shape, running.
async fn keep(
    ctx: &Context,
    namespace: &str,
    wanted: usize,
    existing: &[&Job],
) -> Result<(), ControllerError> {
    let mut want = Vec::with_capacity(wanted);
    for index in 0..wanted {
        let job = standby_job(namespace, index, STANDBY_IDLE, &ctx.config)
            .map_err(|e| ControllerError::Config(format!("a standby worker Job: {e}")))?;
        want.extend(job);
    }
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let mut present = Vec::new();
    for job in existing {
        let name = job.name_any();
        let current = want
            .iter()
            .any(|w| w.metadata.name.as_deref() == Some(&name));
        let replace = match finished(job) {
            None => !current,
            // Idle for its whole wait: made again at once.
            Some(true) => true,
            Some(false) => ended_before(job, FAILED_PAUSE),
        };
        if replace && job.metadata.deletion_timestamp.is_none() {
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => tracing::info!(namespace, job = %name, "replacing a standby worker"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        // Until the watch shows it gone, its name is taken.
        present.push(name);
    }
    let missing: Vec<&Job> = want
        .iter()
        .filter(|w| {
            !present
                .iter()
                .any(|p| w.metadata.name.as_deref() == Some(p))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    super::image_group::ensure_worker_setup(ctx, namespace).await?;
    for job in missing {
        match api.create(&PostParams::default(), job).await {
            Ok(made) => tracing::info!(namespace, job = %made.name_any(), "standby worker started"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether the finished `job` ended more than `pause` ago (as its condition says).
fn ended_before(job: &Job, pause: Duration) -> bool {
    let ended = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Failed" && c.status == "True"))
        .and_then(|c| c.last_transition_time.as_ref());
    let Some(ended) = ended else {
        return true;
    };
    jiff::Timestamp::now().duration_since(ended.0).as_secs_f64() > pause.as_secs_f64()
}
