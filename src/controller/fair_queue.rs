//! Who may start worker Jobs next: the policy of fair scheduling between tenants (a tenant
//! is a namespace), apart from the cluster and the clock.
//!
//! - JobCaps: at most [`JobCaps::max_jobs`] Jobs run at once in all, at most
//!   [`JobCaps::max_jobs_per_tenant`] of one tenant (0: no cap). Jobs handed to Kueue are
//!   Kueue's to admit and are not counted here.
//! - Fair share: a free slot goes to the waiting tenant with the fewest running Jobs, ties
//!   in turn after the tenant served last (round-robin); within a tenant, groups go first
//!   come, first served, one Job per turn.
//! - Small work: a group of at most [`JobCaps::small_images`] images (one Job) that finds the
//!   caps full may still start in the small-work lane, [`JobCaps::small_lane_jobs`] Jobs
//!   beyond the caps in all, one per tenant at a time. A lane rather than priority by size:
//!   priority only helps when a slot frees, and a slot of a 60-photo backlog frees after
//!   seconds, of a 10,000-image group after an hour; the lane starts the one photo now, at
//!   a bounded cost (a few extra small Jobs) that the caps still account for. Jobs carry
//!   their lane as a label, so the count survives a restart.
//!
//! The queue holds only requests: the running Jobs are counted from the cluster (the Job
//! watch, [`FairQueue::job_seen`]), plus the Jobs admitted and not yet seen (reserved for a
//! while). Nothing is admitted before the first full listing of Jobs, so a restarted
//! leader never exceeds a cap. A Job whose images are all stored gives its slot back at
//! once ([`FairQueue::release`]): its worker is only exiting, and the kubelet and the Job
//! controller take a second or two to say so, a pod start the next group need not wait.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// A namespace: the unit of fairness.
pub type Tenant = String;

/// A group or Job by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// Which slots a running Job takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Counted against the caps.
    Main,
    /// The small-work lane beyond the caps.
    Small,
}

impl Lane {
    /// The value of the Job label that records the lane.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Main => "main",
            Lane::Small => "small",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobCaps {
    /// Worker Jobs running at once in all (0: no cap).
    pub max_jobs: usize,
    /// Worker Jobs of one tenant running at once (0: no cap).
    pub max_jobs_per_tenant: usize,
    /// A group (or update) of at most this many images to process is small work.
    pub small_images: usize,
    /// Small Jobs that may run beyond the caps, in all (0: no lane).
    pub small_lane_jobs: usize,
}

impl JobCaps {
    /// No caps: every group starts at once (first come, first served).
    pub const OFF: JobCaps = JobCaps {
        max_jobs: 0,
        max_jobs_per_tenant: 0,
        small_images: 0,
        small_lane_jobs: 0,
    };
}

/// A group's Jobs still to start.
#[derive(Clone, Debug)]
pub struct Request {
    pub group: ObjectKey,
    /// Names of the Jobs it still needs, in the order they should start.
    pub jobs: Vec<String>,
    /// Images those Jobs process.
    pub images: usize,
}

/// What a group may do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Start these Jobs (maybe fewer than asked: the rest stay queued).
    Start {
        jobs: Vec<String>,
        lane: Lane,
        still_queued: usize,
    },
    /// Wait: `position` in line (1 is next).
    Queued { position: usize },
    /// Wait: the running Jobs have not been counted yet (a leader just started).
    Counting,
}

/// A Job admitted but not yet seen by the watch is counted for this long (its creation
/// failed when it never shows up).
pub const RESERVATION_TTL: Duration = Duration::from_secs(60);
/// A request its group has not repeated for this long is dropped (the group went, or its
/// reconcile fails before asking); waiting groups ask again well within it.
pub const REQUEST_TTL: Duration = Duration::from_secs(300);
/// A woken group asks within moments (its reconcile runs at once); one that has not after
/// this long is passed over until it does.
pub const ANSWER_WAIT: Duration = Duration::from_secs(30);
/// A waiting group whose place alone moved is woken at most this often to tell it: in a
/// backlog every slot that turns over moves every waiting group, and each wake is a
/// reconcile (reads of the group, its results, its namespace) for a status line.
pub const POSITION_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
struct Running {
    tenant: Tenant,
    lane: Lane,
    /// Admitted here at this time and not yet seen by the watch.
    reserved_at: Option<Instant>,
}

#[derive(Clone, Debug)]
struct Waiting {
    group: ObjectKey,
    jobs: Vec<String>,
    images: usize,
    asked_at: Instant,
    /// The position bucket last handed to the group (what its status says), and since when.
    shown: Option<PositionBucket>,
    shown_at: Option<Instant>,
    /// A wake for a moved place is held back (due [`POSITION_EVERY`] after `shown_at`).
    held_back: bool,
    /// Woken (when) since it last asked: not again until it asks.
    woken: Option<Instant>,
}

impl Waiting {
    fn is_small(&self, caps: &JobCaps) -> bool {
        self.jobs.len() == 1 && self.images <= caps.small_images
    }
}

/// Where a waiting group stands, coarse enough that its status changes seldom: exact up
/// to 5, then in ranges growing about twofold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PositionBucket {
    pub from: usize,
    pub to: Option<usize>,
}

impl PositionBucket {
    pub fn of(position: usize) -> Self {
        const RANGES: [(usize, usize); 8] = [
            (6, 10),
            (11, 20),
            (21, 50),
            (51, 100),
            (101, 200),
            (201, 500),
            (501, 1000),
            (1001, 2000),
        ];
        if position <= 5 {
            return PositionBucket {
                from: position,
                to: Some(position),
            };
        }
        RANGES.iter().find(|(_, to)| position <= *to).map_or(
            PositionBucket {
                from: 2001,
                to: None,
            },
            |&(from, to)| PositionBucket { from, to: Some(to) },
        )
    }
}

impl std::fmt::Display for PositionBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.to {
            Some(to) if to == self.from => write!(f, "{to}"),
            Some(to) => write!(f, "{}-{to}", self.from),
            None => write!(f, "over {}", self.from - 1),
        }
    }
}

/// What the caps allow now, were every waiting group to ask.
#[derive(Debug, Default)]
struct Plan {
    /// Main-lane Jobs each group may start.
    main: HashMap<ObjectKey, usize>,
    /// Groups that may start their one Job in the small-work lane.
    small: Vec<ObjectKey>,
    /// Each group without a grant: its place in line.
    positions: HashMap<ObjectKey, usize>,
}

impl Plan {
    fn grants(&self, group: &ObjectKey) -> bool {
        self.main.contains_key(group) || self.small.contains(group)
    }
}

/// Jobs running (and reserved) by lane, and the groups waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    pub main: usize,
    pub small: usize,
    pub waiting_groups: usize,
}

#[derive(Debug)]
pub struct FairQueue {
    caps: JobCaps,
    /// Every running Job (and reserved one), whichever the lane.
    running: HashMap<ObjectKey, Running>,
    /// The listing in progress after a (re)connection of the watch.
    relisting: Option<HashMap<ObjectKey, Running>>,
    /// Jobs still running whose work is done: they hold no slot until they end.
    released: HashSet<ObjectKey>,
    /// The released Jobs the listing in progress still saw running.
    relisted_released: HashSet<ObjectKey>,
    /// The first full listing arrived.
    synced: bool,
    /// Waiting groups per tenant, oldest first.
    waiting: BTreeMap<Tenant, Vec<Waiting>>,
    /// The tenant served last.
    last_served: Option<Tenant>,
    /// Wakes held back since [`FairQueue::take_held_back`] last took them.
    held_back: Vec<(ObjectKey, Instant)>,
}

impl FairQueue {
    pub fn new(caps: JobCaps) -> Self {
        FairQueue {
            caps,
            running: HashMap::new(),
            relisting: None,
            released: HashSet::new(),
            relisted_released: HashSet::new(),
            synced: false,
            waiting: BTreeMap::new(),
            last_served: None,
            held_back: Vec::new(),
        }
    }

    pub fn caps(&self) -> &JobCaps {
        &self.caps
    }

    /// The watch saw Job `job`: running in `lane`, or not (`None`: finished, or Kueue's).
    pub fn job_seen(&mut self, job: ObjectKey, lane: Option<Lane>) {
        if lane.is_none() {
            self.released.remove(&job);
        } else if self.released.contains(&job) {
            if self.relisting.is_some() {
                self.relisted_released.insert(job);
            }
            return;
        }
        let map = self.relisting.as_mut().unwrap_or(&mut self.running);
        match lane {
            Some(lane) => {
                let tenant = job.namespace.clone();
                map.insert(
                    job,
                    Running {
                        tenant,
                        lane,
                        reserved_at: None,
                    },
                );
            }
            None => {
                map.remove(&job);
            }
        }
    }

    pub fn job_deleted(&mut self, job: &ObjectKey) {
        self.running.remove(job);
        self.released.remove(job);
    }

    /// Every image of running Job `job` is stored: its slot is free now, though the Job
    /// has not ended yet. Nothing for a Job not counted (finished, Kueue's, unknown).
    /// Returns whether a slot was freed.
    pub fn release(&mut self, job: &ObjectKey) -> bool {
        let freed = self.running.remove(job).is_some();
        if freed {
            self.released.insert(job.clone());
        }
        freed
    }

    /// The watch lists every Job again (start, or after a lost connection).
    pub fn relist_started(&mut self) {
        self.relisting = Some(HashMap::new());
        self.relisted_released.clear();
    }

    /// The listing is complete: it replaces what was known, but for Jobs admitted moments
    /// ago that it may not have caught yet.
    pub fn relist_done(&mut self, now: Instant) {
        let Some(mut listed) = self.relisting.take() else {
            return;
        };
        for (key, job) in self.running.drain() {
            if job
                .reserved_at
                .is_some_and(|at| now.duration_since(at) < RESERVATION_TTL)
            {
                listed.entry(key).or_insert(job);
            }
        }
        self.running = listed;
        // Released Jobs the listing did not show running have ended meanwhile.
        self.released = std::mem::take(&mut self.relisted_released);
        self.synced = true;
    }

    /// `request`'s group asks to start its Jobs; it keeps its place in line while it waits.
    pub fn admit(&mut self, request: Request, now: Instant) -> Admission {
        self.expire(now);
        if request.jobs.is_empty() {
            self.forget(&request.group);
            return Admission::Start {
                jobs: Vec::new(),
                lane: Lane::Main,
                still_queued: 0,
            };
        }
        let tenant = request.group.namespace.clone();
        // Jobs that run already (made before a restart, the status not yet saying so) are
        // counted: they start again for free (creating one is a no-op).
        let (known, rest): (Vec<String>, Vec<String>) =
            request.jobs.into_iter().partition(|name| {
                self.running
                    .contains_key(&ObjectKey::new(tenant.clone(), name.clone()))
            });
        let request = Request {
            jobs: rest,
            ..request
        };
        let still_queued = request.jobs.len();
        if still_queued == 0 {
            self.forget(&request.group);
        } else {
            self.enqueue(request.clone(), now);
        }
        if !known.is_empty() {
            // Their lane label is on them already.
            return Admission::Start {
                jobs: known,
                lane: Lane::Main,
                still_queued,
            };
        }
        if !self.synced {
            return Admission::Counting;
        }
        let plan = self.plan(now);
        let group = &request.group;
        let (count, lane) = match plan.main.get(group) {
            Some(&n) => (n, Lane::Main),
            None if plan.small.contains(group) => (1, Lane::Small),
            None => {
                let position = plan.positions.get(group).copied().unwrap_or(1);
                if let Some(waiting) = self.waiting_mut(group) {
                    let bucket = Some(PositionBucket::of(position));
                    if waiting.shown != bucket {
                        waiting.shown = bucket;
                        waiting.shown_at = Some(now);
                    }
                }
                return Admission::Queued { position };
            }
        };
        let Some(waiting) = self.waiting_mut(group) else {
            return Admission::Counting;
        };
        let count = count.min(waiting.jobs.len());
        let jobs: Vec<String> = waiting.jobs.drain(..count).collect();
        let still_queued = waiting.jobs.len();
        for name in &jobs {
            self.running.insert(
                ObjectKey::new(tenant.clone(), name.clone()),
                Running {
                    tenant: tenant.clone(),
                    lane,
                    reserved_at: Some(now),
                },
            );
        }
        if still_queued == 0 {
            self.forget(group);
        }
        if lane == Lane::Main {
            self.last_served = Some(tenant);
        }
        Admission::Start {
            jobs,
            lane,
            still_queued,
        }
    }

    /// Adds the request to its tenant's line, or updates it where it stands.
    fn enqueue(&mut self, request: Request, now: Instant) {
        let queue = self
            .waiting
            .entry(request.group.namespace.clone())
            .or_default();
        match queue.iter_mut().find(|w| w.group == request.group) {
            Some(waiting) => {
                waiting.jobs = request.jobs;
                waiting.images = request.images;
                waiting.asked_at = now;
                waiting.woken = None;
                waiting.held_back = false;
            }
            None => queue.push(Waiting {
                group: request.group,
                jobs: request.jobs,
                images: request.images,
                asked_at: now,
                shown: None,
                shown_at: None,
                woken: None,
                held_back: false,
            }),
        }
    }

    /// The group no longer waits (done, deleted, or its Jobs all started).
    pub fn forget(&mut self, group: &ObjectKey) {
        if let Some(queue) = self.waiting.get_mut(&group.namespace) {
            queue.retain(|w| w.group != *group);
            if queue.is_empty() {
                self.waiting.remove(&group.namespace);
            }
        }
    }

    /// Waiting groups that should look again now: those that may start Jobs, and those
    /// whose place in line moved to another bucket than their status shows and was last
    /// shown [`POSITION_EVERY`] ago (the others are held back: see
    /// [`FairQueue::take_held_back`]). Each is named once until it asks again.
    pub fn groups_to_wake(&mut self, now: Instant) -> Vec<ObjectKey> {
        self.expire(now);
        if !self.synced {
            return Vec::new();
        }
        let plan = self.plan(now);
        let mut wake = Vec::new();
        for waiting in self.waiting.values_mut().flatten() {
            if waiting.woken.is_some() {
                continue;
            }
            let moved = || {
                plan.positions
                    .get(&waiting.group)
                    .is_some_and(|&p| waiting.shown != Some(PositionBucket::of(p)))
            };
            let told_lately = waiting
                .shown_at
                .is_some_and(|at| now.duration_since(at) < POSITION_EVERY);
            if plan.grants(&waiting.group) || (moved() && !told_lately) {
                waiting.woken = Some(now);
                wake.push(waiting.group.clone());
            } else if moved()
                && !waiting.held_back
                && let Some(at) = waiting.shown_at
            {
                waiting.held_back = true;
                self.held_back
                    .push((waiting.group.clone(), at + POSITION_EVERY));
            }
        }
        wake
    }

    /// The wakes [`FairQueue::groups_to_wake`] held back since the last call, with when
    /// each is due: the caller wakes them then (each is handed out once).
    pub fn take_held_back(&mut self) -> Vec<(ObjectKey, Instant)> {
        std::mem::take(&mut self.held_back)
    }

    /// How busy it is now: Jobs running by lane, groups waiting.
    pub fn load(&self) -> Load {
        let in_lane = |lane| self.running.values().filter(|r| r.lane == lane).count();
        Load {
            main: in_lane(Lane::Main),
            small: in_lane(Lane::Small),
            waiting_groups: self.waiting.values().map(Vec::len).sum(),
        }
    }

    /// Running Jobs by lane: (main, small), in all and of `tenant`.
    #[cfg(test)]
    fn running(&self, tenant: &str) -> ((usize, usize), (usize, usize)) {
        let count = |lane: Lane, only: Option<&str>| {
            self.running
                .values()
                .filter(|r| r.lane == lane && only.is_none_or(|t| r.tenant == t))
                .count()
        };
        (
            (count(Lane::Main, None), count(Lane::Small, None)),
            (
                count(Lane::Main, Some(tenant)),
                count(Lane::Small, Some(tenant)),
            ),
        )
    }

    fn waiting_mut(&mut self, group: &ObjectKey) -> Option<&mut Waiting> {
        self.waiting
            .get_mut(&group.namespace)?
            .iter_mut()
            .find(|w| w.group == *group)
    }

    fn expire(&mut self, now: Instant) {
        self.running.retain(|_, job| {
            job.reserved_at
                .is_none_or(|at| now.duration_since(at) < RESERVATION_TTL)
        });
        for queue in self.waiting.values_mut() {
            queue.retain(|w| now.duration_since(w.asked_at) < REQUEST_TTL);
        }
        self.waiting.retain(|_, queue| !queue.is_empty());
    }

    /// Tenants in turn: those after the one served last first.
    fn rotation(&self) -> Vec<&Tenant> {
        let (after, upto): (Vec<&Tenant>, Vec<&Tenant>) = self
            .waiting
            .keys()
            .partition(|t| self.last_served.as_ref().is_none_or(|last| *t > last));
        after.into_iter().chain(upto).collect()
    }

    /// Hands the free slots out one Job at a time, then the small-work lane, then places
    /// the rest in line by the same turns with no caps. A group woken more than
    /// [`ANSWER_WAIT`] ago that has not asked since (its reconcile fails before it gets
    /// here) is passed over until it asks, so it holds no slot it does not take.
    fn plan(&self, now: Instant) -> Plan {
        let caps = &self.caps;
        let rotation = self.rotation();
        let mut main: HashMap<&str, usize> = HashMap::new();
        let mut small: HashMap<&str, usize> = HashMap::new();
        for job in self.running.values() {
            let counts = match job.lane {
                Lane::Main => &mut main,
                Lane::Small => &mut small,
            };
            *counts.entry(job.tenant.as_str()).or_default() += 1;
        }
        let mut main_total: usize = main.values().sum();
        let small_total: usize = small.values().sum();
        // Jobs left to start per waiting group, in each tenant's order.
        let answers = |w: &Waiting| {
            w.woken
                .is_none_or(|at| now.duration_since(at) < ANSWER_WAIT)
        };
        let mut left: Vec<VecDeque<(&Waiting, usize)>> = rotation
            .iter()
            .map(|t| {
                self.waiting[*t]
                    .iter()
                    .filter(|w| answers(w) && !w.jobs.is_empty())
                    .map(|w| (w, w.jobs.len()))
                    .collect()
            })
            .collect();
        let mut plan = Plan::default();
        let under = |cap: usize, n: usize| cap == 0 || n < cap;
        while under(caps.max_jobs, main_total) {
            let has_room = |n: usize| under(caps.max_jobs_per_tenant, n);
            let Some(turn) = next_turn(&rotation, &left, &main, has_room) else {
                break;
            };
            let Some(waiting) = take_one(&mut left[turn]) else {
                break;
            };
            *plan.main.entry(waiting.group.clone()).or_default() += 1;
            *main.entry(rotation[turn].as_str()).or_default() += 1;
            main_total += 1;
        }
        let mut lane_left = caps.small_lane_jobs.saturating_sub(small_total);
        for (turn, tenant) in rotation.iter().enumerate() {
            if lane_left == 0 {
                break;
            }
            if small.get(tenant.as_str()).copied().unwrap_or(0) > 0 {
                continue;
            }
            let candidate = left[turn]
                .iter()
                .find(|(w, n)| *n > 0 && w.is_small(caps) && !plan.main.contains_key(&w.group));
            if let Some((waiting, _)) = candidate {
                plan.small.push(waiting.group.clone());
                lane_left -= 1;
            }
        }
        for queue in &mut left {
            queue.retain(|(w, _)| !plan.small.contains(&w.group));
        }
        // The rest, in the order the same turns would start them were there no caps.
        while let Some(turn) = next_turn(&rotation, &left, &main, |_| true) {
            let Some(waiting) = take_one(&mut left[turn]) else {
                break;
            };
            *main.entry(rotation[turn].as_str()).or_default() += 1;
            if !plan.main.contains_key(&waiting.group) {
                let position = plan.positions.len() + 1;
                plan.positions
                    .entry(waiting.group.clone())
                    .or_insert(position);
            }
        }
        plan
    }
}

/// The tenant whose turn it is: of those with Jobs left and room (`has_room(running)`),
/// the fewest running, ties in rotation order.
fn next_turn(
    rotation: &[&Tenant],
    left: &[VecDeque<(&Waiting, usize)>],
    running: &HashMap<&str, usize>,
    has_room: impl Fn(usize) -> bool,
) -> Option<usize> {
    let running_of = |t: &Tenant| running.get(t.as_str()).copied().unwrap_or(0);
    rotation
        .iter()
        .enumerate()
        .filter(|(i, t)| !left[*i].is_empty() && has_room(running_of(t)))
        .min_by_key(|(i, t)| (running_of(t), *i))
        .map(|(i, _)| i)
}

/// Takes one Job of the tenant's first group (every group in `queue` has Jobs left).
fn take_one<'a>(queue: &mut VecDeque<(&'a Waiting, usize)>) -> Option<&'a Waiting> {
    let (waiting, n) = queue.front_mut()?;
    let waiting = *waiting;
    *n = n.saturating_sub(1);
    if *n == 0 {
        queue.pop_front();
    }
    Some(waiting)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: JobCaps = JobCaps {
        max_jobs: 3,
        max_jobs_per_tenant: 2,
        small_images: 10,
        small_lane_jobs: 1,
    };

    fn synced(caps: JobCaps) -> FairQueue {
        let mut queue = FairQueue::new(caps);
        queue.relist_started();
        queue.relist_done(Instant::now());
        queue
    }

    /// A synced queue with these caps and no small-work lane.
    fn capped(max_jobs: usize, max_jobs_per_tenant: usize) -> FairQueue {
        synced(JobCaps {
            max_jobs,
            max_jobs_per_tenant,
            ..JobCaps::OFF
        })
    }

    /// A group `name` of tenant `tenant` needing `jobs` Jobs for `images` images.
    fn ask(tenant: &str, name: &str, jobs: usize, images: usize) -> Request {
        Request {
            group: ObjectKey::new(tenant, name),
            jobs: (0..jobs).map(|k| format!("{name}-g1-{k}")).collect(),
            images,
        }
    }

    fn started(admission: &Admission) -> usize {
        match admission {
            Admission::Start { jobs, .. } => jobs.len(),
            _ => 0,
        }
    }

    fn finish(queue: &mut FairQueue, tenant: &str, job: &str) {
        queue.job_seen(ObjectKey::new(tenant, job), None);
    }

    #[test]
    fn the_caps_hold_for_the_whole_and_for_each_tenant() {
        let mut q = synced(CAPS);
        let now = Instant::now();
        // Tenant a: two Jobs, then its cap.
        assert_eq!(started(&q.admit(ask("a", "a1", 1, 60), now)), 1);
        assert_eq!(started(&q.admit(ask("a", "a2", 1, 60), now)), 1);
        assert_eq!(
            q.admit(ask("a", "a3", 1, 60), now),
            Admission::Queued { position: 1 }
        );
        // Tenant b takes the last slot in all, then waits.
        assert_eq!(started(&q.admit(ask("b", "b1", 1, 60), now)), 1);
        // Of the two waiting, b's runs fewer Jobs: its turn comes first.
        assert_eq!(
            q.admit(ask("b", "b2", 1, 60), now),
            Admission::Queued { position: 1 }
        );
        assert_eq!(
            q.admit(ask("a", "a3", 1, 60), now),
            Admission::Queued { position: 2 }
        );
        assert_eq!(q.running("a"), ((3, 0), (2, 0)));
        // A group bigger than the free slots starts what fits and keeps its place.
        let mut q = synced(CAPS);
        let first = q.admit(ask("a", "big", 5, 500), now);
        assert_eq!(
            first,
            Admission::Start {
                jobs: vec!["big-g1-0".into(), "big-g1-1".into()],
                lane: Lane::Main,
                still_queued: 3
            }
        );
        finish(&mut q, "a", "big-g1-0");
        let rest = |names: &[&str]| Request {
            group: ObjectKey::new("a", "big"),
            jobs: names.iter().map(|n| (*n).to_owned()).collect(),
            images: 300,
        };
        let after = q.admit(rest(&["big-g1-2", "big-g1-3", "big-g1-4"]), now);
        assert_eq!(started(&after), 1);
        assert_eq!(q.running("a"), ((2, 0), (2, 0)));
        // A Job that runs already (made before a restart) is no new start: it is handed
        // back without a slot, the others keep waiting.
        assert_eq!(
            q.admit(rest(&["big-g1-1", "big-g1-3", "big-g1-4"]), now),
            Admission::Start {
                jobs: vec!["big-g1-1".into()],
                lane: Lane::Main,
                still_queued: 2
            }
        );
        assert_eq!(q.running("a"), ((2, 0), (2, 0)));
        // No caps: everything starts at once.
        let mut q = synced(JobCaps::OFF);
        assert_eq!(started(&q.admit(ask("a", "x", 50, 5000), now)), 50);
    }

    #[test]
    fn a_job_whose_images_are_stored_gives_its_slot_back_before_it_ends() {
        let mut q = synced(CAPS);
        let now = Instant::now();
        assert_eq!(started(&q.admit(ask("a", "a1", 1, 60), now)), 1);
        assert_eq!(started(&q.admit(ask("a", "a2", 1, 60), now)), 1);
        assert_eq!(
            q.admit(ask("a", "a3", 1, 60), now),
            Admission::Queued { position: 1 }
        );
        let a1 = ObjectKey::new("a", "a1-g1-0");
        // The watch sees a1 running; its results are all stored: a3 may start, and the
        // watch's later sightings of a1 still running take no slot back.
        q.job_seen(a1.clone(), Some(Lane::Main));
        q.release(&a1);
        assert_eq!(q.groups_to_wake(now), vec![ObjectKey::new("a", "a3")]);
        q.job_seen(a1.clone(), Some(Lane::Main));
        assert_eq!(started(&q.admit(ask("a", "a3", 1, 60), now)), 1);
        assert_eq!(q.running("a"), ((2, 0), (2, 0)));
        // A relisting that still shows it running keeps it released; once it has ended
        // it is forgotten.
        q.relist_started();
        for job in ["a1-g1-0", "a2-g1-0", "a3-g1-0"] {
            q.job_seen(ObjectKey::new("a", job), Some(Lane::Main));
        }
        q.relist_done(now);
        assert_eq!(q.running("a"), ((2, 0), (2, 0)));
        finish(&mut q, "a", "a1-g1-0");
        assert!(q.released.is_empty());
        // Releasing a Job the queue does not count (ended, Kueue's) frees nothing.
        q.release(&ObjectKey::new("a", "a1-g1-0"));
        q.release(&ObjectKey::new("b", "unknown"));
        assert!(q.released.is_empty());
        assert_eq!(q.running("a"), ((2, 0), (2, 0)));
    }

    #[test]
    fn a_freed_slot_goes_to_the_tenant_with_fewest_running_and_turns_go_round() {
        let mut q = capped(2, 2);
        let now = Instant::now();
        for name in ["a1", "a2", "a3", "a4"] {
            q.admit(ask("a", name, 1, 60), now);
        }
        // a holds both slots; b and c then wait behind a's backlog in line, not after it.
        q.admit(ask("b", "b1", 1, 60), now);
        q.admit(ask("c", "c1", 1, 60), now);
        assert_eq!(
            q.admit(ask("b", "b1", 1, 60), now),
            Admission::Queued { position: 1 }
        );
        assert_eq!(
            q.admit(ask("c", "c1", 1, 60), now),
            Admission::Queued { position: 2 }
        );
        assert_eq!(
            q.admit(ask("a", "a3", 1, 60), now),
            Admission::Queued { position: 3 }
        );
        // A slot frees: b's turn (fewest running), not a's older group; a3 may not take it.
        // (Groups whose place moved are woken too, to tell their status.)
        finish(&mut q, "a", "a1-g1-0");
        assert!(q.groups_to_wake(now).contains(&ObjectKey::new("b", "b1")));
        assert_eq!(
            q.admit(ask("a", "a3", 1, 60), now),
            Admission::Queued { position: 2 }
        );
        assert_eq!(started(&q.admit(ask("b", "b1", 1, 60), now)), 1);
        // c was woken as its place moved; its reconcile asks again.
        assert_eq!(
            q.admit(ask("c", "c1", 1, 60), now),
            Admission::Queued { position: 1 }
        );
        // Next slot: c (none running) before a (one running).
        finish(&mut q, "a", "a2-g1-0");
        assert!(q.groups_to_wake(now).contains(&ObjectKey::new("c", "c1")));
        assert_eq!(started(&q.admit(ask("c", "c1", 1, 60), now)), 1);
        assert_eq!(
            q.admit(ask("a", "a3", 1, 60), now),
            Admission::Queued { position: 1 }
        );
        // Then a's groups, first come first served within the tenant.
        finish(&mut q, "b", "b1-g1-0");
        assert!(q.groups_to_wake(now).contains(&ObjectKey::new("a", "a3")));
        assert_eq!(
            q.admit(ask("a", "a4", 1, 60), now),
            Admission::Queued { position: 1 }
        );
        assert_eq!(started(&q.admit(ask("a", "a3", 1, 60), now)), 1);
    }

    #[test]
    fn small_work_starts_in_its_lane_when_the_caps_are_full() {
        let mut q = synced(CAPS);
        let now = Instant::now();
        for (tenant, name) in [("a", "a1"), ("a", "a2"), ("b", "b1")] {
            assert_eq!(started(&q.admit(ask(tenant, name, 1, 60), now)), 1);
        }
        // Full: a big group waits, one photo of c starts beyond the caps.
        assert!(matches!(
            q.admit(ask("c", "big", 1, 60), now),
            Admission::Queued { .. }
        ));
        assert_eq!(
            q.admit(ask("c", "photo", 1, 1), now),
            Admission::Start {
                jobs: vec!["photo-g1-0".into()],
                lane: Lane::Small,
                still_queued: 0
            }
        );
        // The lane is bounded: the next small group waits, as does one of two Jobs.
        assert!(matches!(
            q.admit(ask("d", "photo", 1, 1), now),
            Admission::Queued { .. }
        ));
        assert!(matches!(
            q.admit(ask("e", "two-jobs", 2, 4), now),
            Admission::Queued { .. }
        ));
        assert_eq!(q.running("c"), ((3, 1), (0, 1)));
        // The lane's Job ends: d's photo is next in the lane (c's big group still waits).
        finish(&mut q, "c", "photo-g1-0");
        let woken = q.groups_to_wake(now);
        assert!(woken.contains(&ObjectKey::new("d", "photo")), "{woken:?}");
        assert!(!woken.contains(&ObjectKey::new("c", "big")), "{woken:?}");
        // Small work within one tenant passes its own big backlog too, one at a time.
        let mut q = synced(CAPS);
        for name in ["a1", "a2", "a3"] {
            q.admit(ask("a", name, 1, 60), now);
        }
        assert_eq!(
            q.admit(ask("a", "photo", 1, 1), now),
            Admission::Start {
                jobs: vec!["photo-g1-0".into()],
                lane: Lane::Small,
                still_queued: 0
            }
        );
        assert!(matches!(
            q.admit(ask("a", "photo2", 1, 1), now),
            Admission::Queued { .. }
        ));
    }

    #[test]
    fn nothing_starts_before_the_running_jobs_are_counted_and_a_relist_keeps_the_count() {
        let mut q = FairQueue::new(CAPS);
        let now = Instant::now();
        assert_eq!(q.admit(ask("a", "a1", 1, 60), now), Admission::Counting);
        // A restarted leader lists the Jobs its predecessor made, the lane ones by label.
        q.relist_started();
        q.job_seen(ObjectKey::new("a", "old1"), Some(Lane::Main));
        q.job_seen(ObjectKey::new("a", "old2"), Some(Lane::Main));
        q.job_seen(ObjectKey::new("b", "old3"), Some(Lane::Small));
        q.job_seen(ObjectKey::new("b", "done"), None);
        assert!(
            q.groups_to_wake(now).is_empty(),
            "not before the listing is done"
        );
        q.relist_done(now);
        assert_eq!(q.running("a"), ((2, 1), (2, 0)));
        // a is at its cap; the group that waited is told its place.
        assert_eq!(q.groups_to_wake(now), vec![ObjectKey::new("a", "a1")]);
        assert_eq!(
            q.admit(ask("a", "a1", 1, 60), now),
            Admission::Queued { position: 1 }
        );
        // A Job admitted but not yet seen survives a relist that missed it, for a while.
        assert_eq!(started(&q.admit(ask("c", "c1", 1, 60), now)), 1);
        q.relist_started();
        q.job_seen(ObjectKey::new("a", "old1"), Some(Lane::Main));
        q.job_seen(ObjectKey::new("a", "old2"), Some(Lane::Main));
        q.relist_done(now);
        assert_eq!(q.running("c"), ((3, 0), (1, 0)));
        // One never created stops counting after its reservation.
        let later = now + RESERVATION_TTL + Duration::from_secs(1);
        q.admit(ask("a", "a1", 1, 60), later);
        assert_eq!(q.running("c"), ((2, 0), (0, 0)));
    }

    #[test]
    fn a_woken_group_that_does_not_ask_is_passed_over_until_it_does() {
        let caps = JobCaps {
            max_jobs: 1,
            ..JobCaps::OFF
        };
        let mut q = synced(caps);
        let now = Instant::now();
        assert_eq!(started(&q.admit(ask("a", "a1", 1, 60), now)), 1);
        q.admit(ask("b", "b1", 1, 60), now);
        q.admit(ask("c", "c1", 1, 60), now);
        finish(&mut q, "a", "a1-g1-0");
        assert!(q.groups_to_wake(now).contains(&ObjectKey::new("b", "b1")));
        // b's reconcile never comes (it fails before asking): c may not start yet...
        assert!(matches!(
            q.admit(ask("c", "c1", 1, 60), now + Duration::from_secs(1)),
            Admission::Queued { .. }
        ));
        // ...but once b has had its chance, c takes the slot.
        let later = now + ANSWER_WAIT + Duration::from_secs(1);
        assert_eq!(started(&q.admit(ask("c", "c1", 1, 60), later)), 1);
        // b asking again waits its turn like anyone.
        assert_eq!(
            q.admit(ask("b", "b1", 1, 60), later),
            Admission::Queued { position: 1 }
        );
    }

    #[test]
    fn a_group_held_back_for_its_place_is_woken_at_once_when_it_may_start() {
        let mut q = capped(1, 1);
        let now = Instant::now();
        assert_eq!(started(&q.admit(ask("a", "a0", 1, 60), now)), 1);
        for name in ["a1", "a2", "a3"] {
            q.admit(ask("a", name, 1, 60), now);
        }
        let soon = now + Duration::from_secs(1);
        finish(&mut q, "a", "a0-g1-0");
        assert_eq!(q.groups_to_wake(soon), [ObjectKey::new("a", "a1")]);
        assert_eq!(q.take_held_back().len(), 2, "a2 and a3 moved up");
        assert_eq!(started(&q.admit(ask("a", "a1", 1, 60), soon)), 1);
        // a1's Job ends before a2's held-back wake is due: a2 may start, and is woken now.
        let sooner_than_due = now + Duration::from_secs(2);
        finish(&mut q, "a", "a1-g1-0");
        assert_eq!(
            q.groups_to_wake(sooner_than_due),
            [ObjectKey::new("a", "a2")]
        );
    }

    #[test]
    fn a_waiting_group_is_woken_only_when_its_place_moves_to_another_bucket() {
        let mut q = capped(1, 1);
        let now = Instant::now();
        for k in 0..30 {
            q.admit(ask("a", &format!("a{k}"), 1, 60), now);
        }
        assert_eq!(
            q.admit(ask("a", "a29", 1, 60), now),
            Admission::Queued { position: 29 }
        );
        q.groups_to_wake(now);
        for k in 1..30 {
            q.admit(ask("a", &format!("a{k}"), 1, 60), now);
        }
        assert!(
            q.groups_to_wake(now).is_empty(),
            "every status tells its place"
        );
        // a0 finishes a second later, a1 may start: a1 is woken at once. Those whose bucket
        // changed (the first five, and 6, 11 and 21 moving down; a29, now 27th, stays in
        // 21-50) were told their place a second ago: their wakes are held back until that
        // is POSITION_EVERY old.
        finish(&mut q, "a", "a0-g1-0");
        let soon = now + Duration::from_secs(1);
        let names = |groups: Vec<ObjectKey>| -> Vec<String> {
            groups.into_iter().map(|g| g.name).collect()
        };
        assert_eq!(names(q.groups_to_wake(soon)), ["a1"]);
        let moved = ["a2", "a3", "a4", "a5", "a6", "a11", "a21"];
        let held = q.take_held_back();
        assert!(held.iter().all(|(_, due)| *due == now + POSITION_EVERY));
        assert_eq!(names(held.into_iter().map(|(g, _)| g).collect()), moved);
        assert!(
            q.groups_to_wake(soon).is_empty(),
            "named once until it asks"
        );
        assert!(q.take_held_back().is_empty(), "held back once");
        // Once due, the next look wakes them (a timer lost, or none armed, is no matter).
        let due = now + POSITION_EVERY;
        assert_eq!(names(q.groups_to_wake(due)), moved);
        assert!(q.groups_to_wake(due).is_empty(), "named once until it asks");
        assert_eq!(PositionBucket::of(28), PositionBucket::of(29));
        assert_eq!(PositionBucket::of(29).to_string(), "21-50");
        assert_eq!(PositionBucket::of(3).to_string(), "3");
        assert_eq!(PositionBucket::of(5000).to_string(), "over 2000");
        // A group that stops asking leaves the line.
        assert_eq!(q.waiting.values().flatten().count(), 29);
        assert!(q.groups_to_wake(now + REQUEST_TTL).is_empty());
        assert_eq!(q.waiting.values().flatten().count(), 0);
    }
}
