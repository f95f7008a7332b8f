//! The leader's scheduler of worker Jobs: the [`FairQueue`] policy fed by the watch of
//! worker Jobs, waking the groups that may start Jobs (or whose place in line moved) as soon
//! as a Job ends. A tenant may hand its Jobs to Kueue instead ([`KUEUE_QUEUE_ANNOTATION`]).

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

use super::fair_queue::{Admission, FairQueue, JobCaps, Lane, ObjectKey, Request};
use super::job::{carrier_of, finished, is_standby};
use super::metrics::{LaneLabels, Metrics};
use super::{Context, ControllerError};
use crate::cache::Cache;
use crate::crd::ImageGroup;
use crate::sync::{lock, read, write};

/// The Job label recording which slots a Job takes (`main` or `small`), so a restarted
/// leader counts them as its predecessor did.
pub const LANE_LABEL: &str = "kinsight.io/lane";
/// The namespace annotation naming the Kueue `LocalQueue` its Jobs go to
/// (`kubectl annotate namespace tenant-a kinsight.io/kueue-queue=team-a`).
pub const KUEUE_QUEUE_ANNOTATION: &str = "kinsight.io/kueue-queue";
/// The label Kueue reads on a Job.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// Selects the worker Jobs the scheduler counts (every controller version labels them).
pub const WORKER_JOB_SELECTOR: &str =
    "app.kubernetes.io/managed-by=kinsight-controller,app.kubernetes.io/component=worker";

/// Where a group's new Jobs go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Started by kinsight, counted in `lane`.
    Kinsight(Lane),
    /// Created suspended for this Kueue queue; Kueue starts them.
    Kueue(String),
}

pub struct Scheduler {
    queue: Mutex<FairQueue>,
    metrics: Arc<Metrics>,
    wake: UnboundedSender<ObjectRef<ImageGroup>>,
    /// Taken by the controller once: the groups to reconcile now.
    woken: Mutex<Option<UnboundedReceiver<ObjectRef<ImageGroup>>>>,
    /// Each tenant's Kueue queue as last read (a waiting group asks at every look).
    kueue_queues: Cache<String, Option<String>>,
    /// The current leadership term's watch of worker Jobs.
    jobs: RwLock<Option<Store<Job>>>,
}

impl Scheduler {
    pub fn new(caps: JobCaps, metrics: Arc<Metrics>) -> Self {
        let (wake, woken) = unbounded();
        Scheduler {
            queue: Mutex::new(FairQueue::new(caps)),
            metrics,
            wake,
            woken: Mutex::new(Some(woken)),
            kueue_queues: Cache::default(),
            jobs: RwLock::default(),
        }
    }

    /// The groups to wake, for the controller (once).
    pub fn take_wakes(&self) -> Option<UnboundedReceiver<ObjectRef<ImageGroup>>> {
        lock(&self.woken).take()
    }

    /// The worker Jobs as a new term's watch sees them.
    pub fn watch_jobs_with(&self, store: Store<Job>) {
        *write(&self.jobs) = Some(store);
    }

    /// Whether the Job watch shows this worker Job running (`false`: finished, or not
    /// seen yet).
    pub fn job_running(&self, namespace: &str, name: &str) -> bool {
        let Some(store) = read(&self.jobs).clone() else {
            return false;
        };
        store
            .get(&ObjectRef::new(name).within(namespace))
            .is_some_and(|job| finished(&job).is_none())
    }

    /// The standby workers' Jobs as the Job watch shows them (`None`: not listed yet).
    pub fn standby_jobs(&self) -> Option<Vec<Arc<Job>>> {
        let store = read(&self.jobs).clone()?;
        // Before the first listing the store is empty, not the cluster.
        futures::FutureExt::now_or_never(store.wait_until_ready())?.ok()?;
        Some(
            store
                .state()
                .into_iter()
                .filter(|job| is_standby(job))
                .collect(),
        )
    }

    /// The Job carrying the order of Job `name` (which then has no pod of its own), as the
    /// Job watch shows it.
    pub fn carried_by(&self, namespace: &str, name: &str) -> Option<String> {
        let store = read(&self.jobs).clone()?;
        let job = store.get(&ObjectRef::new(name).within(namespace))?;
        carrier_of(&job).map(str::to_owned)
    }

    /// A Job that ended or went can carry no more: the groups whose orders it carried look
    /// again (and their own Jobs take the orders back).
    fn wake_carried_by(&self, job: &Job) {
        let Some(store) = read(&self.jobs).clone() else {
            return;
        };
        let (namespace, name) = (job.namespace(), job.name_any());
        for carried in store.state() {
            if carried.namespace() != namespace || carrier_of(&carried) != Some(name.as_str()) {
                continue;
            }
            for owner in carried.owner_references() {
                if owner.kind == "ImageGroup" {
                    let group = ObjectRef::new(&owner.name)
                        .within(namespace.as_deref().unwrap_or_default());
                    let _ = self.wake.unbounded_send(group);
                }
            }
        }
    }

    /// A worker Job event from the watch.
    pub fn observe(&self, event: &watcher::Event<Job>) {
        match event {
            watcher::Event::Apply(job) if finished(job).is_some() => self.wake_carried_by(job),
            watcher::Event::Delete(job) => self.wake_carried_by(job),
            _ => {}
        }
        let mut queue = lock(&self.queue);
        match event {
            watcher::Event::Init => queue.relist_started(),
            watcher::Event::InitApply(job) | watcher::Event::Apply(job) => {
                queue.job_seen(job_key(job), running_lane(job));
            }
            watcher::Event::Delete(job) => queue.job_deleted(&job_key(job)),
            watcher::Event::InitDone => queue.relist_done(Instant::now()),
        }
        self.send_wakes(&mut queue);
    }

    /// The group asks to start `jobs` (for `images` images).
    pub fn admit(&self, group: ObjectKey, jobs: Vec<String>, images: usize) -> Admission {
        let mut queue = lock(&self.queue);
        let admission = queue.admit(
            Request {
                group,
                jobs,
                images,
            },
            Instant::now(),
        );
        self.send_wakes(&mut queue);
        admission
    }

    /// Every image of the running Job `job` is stored: its slot goes to whoever is next.
    pub fn release(&self, job: &ObjectKey) {
        let mut queue = lock(&self.queue);
        if queue.release(job) {
            self.send_wakes(&mut queue);
        }
    }

    /// The group waits no more (finished, deleted, or handed to Kueue).
    pub fn forget(&self, group: &ObjectKey) {
        let mut queue = lock(&self.queue);
        queue.forget(group);
        self.send_wakes(&mut queue);
    }

    pub fn caps(&self) -> JobCaps {
        *lock(&self.queue).caps()
    }

    /// After any change: wakes who should look again, and updates the gauges.
    fn send_wakes(&self, queue: &mut FairQueue) {
        for group in queue.groups_to_wake(Instant::now()) {
            let _ = self
                .wake
                .unbounded_send(ObjectRef::new(&group.name).within(&group.namespace));
        }
        // A place that moved moments after the last one was told is told when it is due.
        let held_back = queue.take_held_back();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            for (group, due) in held_back {
                let wake = self.wake.clone();
                runtime.spawn(async move {
                    tokio::time::sleep_until(due.into()).await;
                    let _ =
                        wake.unbounded_send(ObjectRef::new(&group.name).within(&group.namespace));
                });
            }
        }
        let load = queue.load();
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        for (lane, n) in [(Lane::Main, load.main), (Lane::Small, load.small)] {
            let labels = LaneLabels {
                lane: lane.as_str(),
            };
            self.metrics
                .worker_jobs
                .get_or_create(&labels)
                .set(gauge(n));
        }
        self.metrics.groups_waiting.set(gauge(load.waiting_groups));
    }
}

fn job_key(job: &Job) -> ObjectKey {
    ObjectKey::new(job.namespace().unwrap_or_default(), job.name_any())
}

/// The slots a Job holds: none once it has finished, and none when Kueue admits it.
fn running_lane(job: &Job) -> Option<Lane> {
    let labels = job.labels();
    // A standby holds no slot: the Jobs whose orders it carries do.
    if finished(job).is_some() || labels.contains_key(KUEUE_QUEUE_LABEL) || is_standby(job) {
        return None;
    }
    match labels.get(LANE_LABEL).map(String::as_str) {
        Some("small") => Some(Lane::Small),
        // Jobs made before lanes existed count against the caps.
        _ => Some(Lane::Main),
    }
}

/// How long a tenant's Kueue setting, read for one of its groups, serves the looks of its
/// groups already waiting (a tenant moved to Kueue has them follow within this long).
const KUEUE_SETTING_TTL: Duration = Duration::from_secs(10);

/// The tenant's Kueue queue, from its namespace's annotation; `fresh` reads it from the
/// API server (a group's first look: a namespace annotated just before the group's POST
/// is never missed).
pub async fn kueue_queue(
    ctx: &Context,
    namespace: &str,
    fresh: bool,
) -> Result<Option<String>, ControllerError> {
    let serves = |(at, _): &(tokio::time::Instant, Option<String>)| {
        !fresh && at.elapsed() < KUEUE_SETTING_TTL
    };
    let read = || async {
        let queue = super::namespace_annotation(ctx, namespace, KUEUE_QUEUE_ANNOTATION).await?;
        Ok(queue.map(|q| q.trim().to_owned()).filter(|q| !q.is_empty()))
    };
    ctx.scheduler
        .kueue_queues
        .try_get_or_load(&namespace.to_owned(), serves, read)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(labels: serde_json::Value, conditions: serde_json::Value) -> Job {
        serde_json::from_value(json!({
            "metadata": { "name": "g-g1", "namespace": "tenant-a", "labels": labels },
            "status": { "conditions": conditions }
        }))
        .expect("job")
    }

    #[test]
    fn a_job_holds_its_lanes_slot_until_it_finishes_and_kueues_and_standby_jobs_hold_none() {
        assert_eq!(running_lane(&job(json!({}), json!([]))), Some(Lane::Main));
        let small = json!({ LANE_LABEL: "small" });
        assert_eq!(
            running_lane(&job(small.clone(), json!([]))),
            Some(Lane::Small)
        );
        let done = json!([{ "type": "Complete", "status": "True" }]);
        assert_eq!(running_lane(&job(small, done)), None);
        let failed = json!([{ "type": "Failed", "status": "True" }]);
        assert_eq!(running_lane(&job(json!({}), failed)), None);
        let kueue = json!({ KUEUE_QUEUE_LABEL: "team-a", LANE_LABEL: "main" });
        assert_eq!(running_lane(&job(kueue, json!([]))), None);
        // A standby worker holds none either: the Jobs it carries do.
        let standby = json!({ super::super::job::STANDBY_LABEL: "true" });
        assert_eq!(running_lane(&job(standby, json!([]))), None);
    }
}
