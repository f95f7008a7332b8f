//! The leader's scheduler of worker Jobs: the [`FairQueue`] policy fed by the watch of
//! worker Jobs, waking the groups that may start Jobs (or whose place in line moved) as soon
//! as a Job ends. A tenant may hand its Jobs to Kueue instead ([`KUEUE_QUEUE_ANNOTATION`]).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use super::fair_queue::{Admission, FairQueue, JobCaps, Lane, ObjectKey, Request};
use super::job::finished;
use super::metrics::{LaneLabels, Metrics};
use super::{Context, ControllerError};
use crate::crd::ImageGroup;
use crate::sync::lock;

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
}

impl Scheduler {
    pub fn new(caps: JobCaps, metrics: Arc<Metrics>) -> Self {
        let (wake, woken) = unbounded();
        Scheduler {
            queue: Mutex::new(FairQueue::new(caps)),
            metrics,
            wake,
            woken: Mutex::new(Some(woken)),
        }
    }

    /// The groups to wake, for the controller (once).
    pub fn take_wakes(&self) -> Option<UnboundedReceiver<ObjectRef<ImageGroup>>> {
        lock(&self.woken).take()
    }

    /// A worker Job event from the watch.
    pub fn observe(&self, event: &watcher::Event<Job>) {
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
    if finished(job).is_some() || labels.contains_key(KUEUE_QUEUE_LABEL) {
        return None;
    }
    match labels.get(LANE_LABEL).map(String::as_str) {
        Some("small") => Some(Lane::Small),
        // Jobs made before lanes existed count against the caps.
        _ => Some(Lane::Main),
    }
}

/// The tenant's Kueue queue, from its namespace's annotation.
pub async fn kueue_queue(
    ctx: &Context,
    namespace: &str,
) -> Result<Option<String>, ControllerError> {
    let queue = super::namespace_annotation(ctx, namespace, KUEUE_QUEUE_ANNOTATION).await?;
    Ok(queue.map(|q| q.trim().to_owned()).filter(|q| !q.is_empty()))
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
    fn a_job_holds_its_lanes_slot_until_it_finishes_and_kueues_jobs_hold_none() {
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
    }
}
