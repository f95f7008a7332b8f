//! The result store against a real PostgreSQL (Debian's, started by the testbed): batches are
//! idempotent, outputs of later models join earlier ones, failures stay, a write wakes
//! listeners, a deleted group's rows go in bounded batches, and dispatchers claim each due
//! delivery once; work orders are kept per Job name and go with their Job or their group.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::database;
use futures::StreamExt;
use kinsight::delivery::{Attempt, Delivery, DeliveryState, DraftEvent, EventLedger, EventPlanner};
use kinsight::inference::{ClassScore, ModelOutput};
use kinsight::results::{GroupRef, ImageResult, ModelResult, Timings};
use kinsight::store::{
    ALL_STORED, CARRIERS_CHANNEL, Claimed, DISPATCH_CHANNEL, Outcomes, Plan, RESULTS_CHANNEL,
    Settled, Stop, Store, StoreNotice,
};
use kinsight::worker::{WorkItem, WorkOrder};

fn group(uid: &str) -> GroupRef {
    GroupRef {
        namespace: "tenant-a".into(),
        name: format!("grp-{uid}"),
        uid: uid.into(),
    }
}

fn classified(image: &str, model: &str, label: &str) -> ImageResult {
    let output = ModelOutput {
        classes: vec![ClassScore {
            label: label.into(),
            confidence: 0.9,
        }],
        ..ModelOutput::default()
    };
    ImageResult {
        group: String::new(),
        image_id: image.into(),
        failure: None,
        width: Some(640),
        height: Some(480),
        perceptual_hash: Some(format!("{image}-hash")),
        outputs: BTreeMap::from([(
            model.to_owned(),
            ModelResult {
                output,
                error: None,
                inference_ms: 3.5,
            },
        )]),
        timings: Timings::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_merge_per_image_and_a_batch_written_twice_changes_nothing() {
    let (postgres, store, _dir) = database().await;
    // A second process migrating the same database finds nothing to do.
    Store::connect(&postgres.url(), Duration::from_secs(10))
        .await
        .expect("migrations are applied once");

    let g = group("u1");
    let batch = vec![
        classified("a", "image_classification", "espresso"),
        ImageResult::failed(&g.name, "b", "DownloadFailed", "HTTP 404".into()),
    ];
    store.write_results(&g, 1, &batch).await.expect("stored");
    store
        .write_results(&g, 1, &batch)
        .await
        .expect("stored again");
    let first = store.group_results(&g).await.expect("read");
    assert_eq!(first.len(), 2);
    assert_eq!(first["a"].group, g.name);
    assert_eq!(first["a"].outputs, batch[0].outputs);
    assert_eq!(first["a"].width, Some(640));
    assert_eq!(first["a"].perceptual_hash.as_deref(), Some("a-hash"));
    assert_eq!(
        first["b"].failure.as_ref().map(|f| f.reason.as_str()),
        Some("DownloadFailed")
    );

    // A later generation adds a model: its output joins the first one's.
    let mut later = classified("a", "object_detection", "cup");
    later.perceptual_hash = None;
    store.write_results(&g, 2, &[later]).await.expect("stored");
    let a = store.image_result(&g, "a").await.expect("read").expect("a");
    // ...and a write without a hash keeps the one stored.
    assert_eq!(a.perceptual_hash.as_deref(), Some("a-hash"));
    assert_eq!(
        a.outputs.keys().map(String::as_str).collect::<Vec<_>>(),
        ["image_classification", "object_detection"]
    );
    assert_eq!(
        a.outputs["image_classification"].output.classes[0].label,
        "espresso"
    );
    // A failure once recorded is not erased by a write without one.
    let mut b = classified("b", "object_detection", "cup");
    b.width = None;
    store.write_results(&g, 2, &[b]).await.expect("stored");
    let b = store.image_result(&g, "b").await.expect("read").expect("b");
    assert!(b.failure.is_some());
    assert!(store.image_result(&g, "zzz").await.expect("read").is_none());
    // Another group's results are its own.
    assert!(
        store
            .group_results(&group("u2"))
            .await
            .expect("read")
            .is_empty()
    );
}

async fn next(notices: &mut (impl futures::Stream<Item = StoreNotice> + Unpin)) -> StoreNotice {
    tokio::time::timeout(Duration::from_secs(30), notices.next())
        .await
        .expect("a notice in time")
        .expect("the stream goes on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_wakes_listeners_and_a_restart_of_the_database_is_survived() {
    let (mut postgres, store, _dir) = database().await;
    let mut notices = Box::pin(kinsight::store::listen(
        store.url().to_owned(),
        &[RESULTS_CHANNEL],
    ));
    assert_eq!(next(&mut notices).await, StoreNotice::Connected);
    let g = group("u3");
    store
        .write_results(&g, 1, &[classified("a", "m", "x")])
        .await
        .expect("stored");
    assert_eq!(
        next(&mut notices).await,
        StoreNotice::Notification {
            channel: RESULTS_CHANNEL.into(),
            payload: "tenant-a/grp-u3".into()
        }
    );

    postgres.restart().await.expect("PostgreSQL restarts");
    // The listener says it reconnected (notifications in between may be lost) ...
    assert_eq!(next(&mut notices).await, StoreNotice::Connected);
    // ... and the pool's broken connections are replaced: writes go on.
    let mut stored = false;
    for _ in 0..50 {
        if store
            .write_results(&g, 1, &[classified("b", "m", "y")])
            .await
            .is_ok()
        {
            stored = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(stored, "writes succeed again after the restart");
    assert_eq!(store.group_results(&g).await.expect("read").len(), 2);
}

/// [`EveryResult`]'s events for a group of `.0` images.
struct GroupOf(usize);

impl EventPlanner for GroupOf {
    fn image_events(&self, stored: &[ImageResult], ledger: &EventLedger) -> Vec<DraftEvent> {
        EveryResult.image_events(stored, ledger)
    }

    fn images_total(&self) -> usize {
        self.0
    }

    fn body(
        &self,
        event: &DraftEvent,
        stored: &ImageResult,
        sequence: u64,
        now: jiff::Timestamp,
    ) -> Option<serde_json::Value> {
        EveryResult.body(event, stored, sequence, now)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_that_stores_a_groups_last_image_says_so_once() {
    let (_postgres, store, _dir) = database().await;
    let mut notices = Box::pin(kinsight::store::listen(
        store.url().to_owned(),
        &[RESULTS_CHANNEL],
    ));
    assert_eq!(next(&mut notices).await, StoreNotice::Connected);
    let g = group("n1");
    let three = GroupOf(3);
    let plain = StoreNotice::Notification {
        channel: RESULTS_CHANNEL.into(),
        payload: "tenant-a/grp-n1".into(),
    };
    // Two of three images, then the first again (nothing new): not all stored.
    for batch in [
        vec![classified("a", "m", "x"), classified("b", "m", "y")],
        vec![classified("a", "m", "x")],
    ] {
        store
            .store_results(&g, 1, &batch, Some(&three))
            .await
            .expect("stored");
        assert_eq!(next(&mut notices).await, plain);
    }
    // The third image: this write says the group's results are all stored ...
    store
        .store_results(&g, 1, &[classified("c", "m", "z")], Some(&three))
        .await
        .expect("stored");
    assert_eq!(
        next(&mut notices).await,
        StoreNotice::Notification {
            channel: RESULTS_CHANNEL.into(),
            payload: format!("tenant-a/grp-n1{ALL_STORED}"),
        }
    );
    // ... and a later write of the same image (a model added) does not say it again.
    store
        .store_results(&g, 1, &[classified("c", "m2", "w")], Some(&three))
        .await
        .expect("stored");
    assert_eq!(next(&mut notices).await, plain);
}

/// Two writes that store a group's last two images at the same moment: exactly one says
/// the group is all stored (they take the group's count in turn), and an image stored
/// without events (`write_results`) counts too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writes_of_a_groups_last_images_at_once_say_so_exactly_once() {
    let (_postgres, store, _dir) = database().await;
    let mut notices = Box::pin(kinsight::store::listen(
        store.url().to_owned(),
        &[RESULTS_CHANNEL],
    ));
    assert_eq!(next(&mut notices).await, StoreNotice::Connected);
    let four = GroupOf(4);
    for round in 0..5 {
        let g = group(&format!("race{round}"));
        store
            .write_results(&g, 1, &[classified("a", "m", "x")])
            .await
            .expect("stored");
        store
            .store_results(&g, 1, &[classified("b", "m", "x")], Some(&four))
            .await
            .expect("stored");
        let (c, d) = ([classified("c", "m", "x")], [classified("d", "m", "x")]);
        let (c, d) = tokio::join!(
            store.store_results(&g, 1, &c, Some(&four)),
            store.store_results(&g, 1, &d, Some(&four)),
        );
        c.expect("stored");
        d.expect("stored");
        let mut said = 0;
        for _ in 0..4 {
            match next(&mut notices).await {
                StoreNotice::Notification { payload, .. } if payload.ends_with(ALL_STORED) => {
                    said += 1
                }
                StoreNotice::Notification { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(said, 1, "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_group_is_purged_in_batches_and_only_it() {
    let (_postgres, store, _dir) = database().await;
    let (gone, kept) = (group("gone"), group("kept"));
    let many: Vec<ImageResult> = (0..250)
        .map(|i| classified(&format!("i{i}"), "m", "x"))
        .collect();
    store.write_results(&gone, 1, &many).await.expect("stored");
    store
        .write_results(&kept, 1, &many[..3])
        .await
        .expect("stored");
    let now = jiff::Timestamp::now();
    let sent = |g: &GroupRef, n: usize| -> Vec<Delivery> {
        (0..n)
            .map(|i| Delivery {
                id: format!("msg_{}_{i}", g.uid),
                event: "image.completed".into(),
                image_id: Some(format!("i{i}")),
                endpoint: "request".into(),
                sequence: i as u64 + 1,
                created_at: now,
                state: DeliveryState::Delivered,
                attempts: 1,
                next_attempt_at: None,
                last_error: None,
                delivered_at: Some(now),
                payload: Some(serde_json::json!({ "type": "image.completed", "n": i })),
            })
            .collect()
    };
    let attempt = |g: &GroupRef| Attempt {
        delivery_id: format!("msg_{}_0", g.uid),
        attempted_at: now,
        status_code: Some(204),
        duration_ms: 3.0,
        outcome: "failed".into(),
        error: Some("receiver answered 429 Too Many Requests".into()),
        response: Some("quota exceeded".into()),
    };
    store
        .record_deliveries(&gone, &sent(&gone, 150), &[attempt(&gone)])
        .await
        .expect("deliveries");
    store
        .record_deliveries(&kept, &sent(&kept, 3), &[attempt(&kept)])
        .await
        .expect("deliveries");

    // Not forgotten: nothing is purged.
    assert_eq!(store.purge_group(&gone.uid, 100).await.expect("purge"), 0);
    store.forget_group(&gone.uid).await.expect("forget");
    // 100 rows per statement: 250 results and 150 deliveries, all of them.
    assert_eq!(store.purge_forgotten(100).await.expect("purge"), 250 + 150);
    assert!(store.group_results(&gone).await.expect("read").is_empty());
    assert!(
        store
            .group_deliveries(&gone.uid)
            .await
            .expect("read")
            .is_empty()
    );
    let gone_history = store
        .delivery_with_attempts(&gone.uid, &format!("msg_{}_0", gone.uid))
        .await
        .expect("read");
    assert!(gone_history.is_none());
    assert_eq!(store.group_results(&kept).await.expect("read").len(), 3);
    // Event bodies go with their group, in batches too.
    let bodies = |uid: &str| {
        let sql = format!("SELECT count(*)::text FROM event_bodies WHERE group_uid = '{uid}'");
        let store = store.clone();
        async move { store.query_text(&sql).await.expect("count")[0][0].clone() }
    };
    assert_eq!(bodies(&gone.uid).await, "0");
    assert_eq!(bodies(&kept.uid).await, "3");
    let (_, attempts) = store
        .delivery_with_attempts(&kept.uid, &format!("msg_{}_0", kept.uid))
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status_code, Some(204));
    assert_eq!(attempts[0].response.as_deref(), Some("quota exceeded"));
    // Groups stored moments ago are never taken for deleted ones: the list of live groups
    // may be older than them.
    assert_eq!(
        store.forget_groups_except(None, &[]).await.expect("sweep"),
        0
    );
    assert_eq!(store.purge_forgotten(100).await.expect("purge"), 0);
    assert_eq!(store.group_results(&kept).await.expect("read").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_not_delivered_pages_through_one_namespace() {
    let (_postgres, store, _dir) = database().await;
    let start = jiff::Timestamp::now();
    let record = |g: &GroupRef, i: usize, state: DeliveryState| Delivery {
        id: format!("msg_{}_{i}", g.uid),
        event: "image.completed".into(),
        image_id: Some(format!("i{i}")),
        endpoint: "request".into(),
        sequence: i as u64 + 1,
        // Several share a time: the id orders them.
        created_at: start + jiff::SignedDuration::from_millis((i / 7) as i64),
        state,
        attempts: 1,
        next_attempt_at: None,
        last_error: None,
        delivered_at: None,
        payload: None,
    };
    let mut ours = Vec::new();
    for uid in ["a1", "a2"] {
        let g = group(uid);
        let deliveries: Vec<Delivery> = (0..200)
            .map(|i| {
                let state = match i % 4 {
                    0 => DeliveryState::Delivered,
                    1 => DeliveryState::Pending,
                    _ => DeliveryState::Failed,
                };
                record(&g, i, state)
            })
            .collect();
        store
            .record_deliveries(&g, &deliveries, &[])
            .await
            .expect("saved");
        ours.extend(
            deliveries
                .into_iter()
                .filter(|d| d.state == DeliveryState::Failed)
                .map(|d| d.id),
        );
    }
    let other = GroupRef {
        namespace: "tenant-b".into(),
        ..group("b1")
    };
    let theirs: Vec<Delivery> = (0..50)
        .map(|i| record(&other, i, DeliveryState::Failed))
        .collect();
    store
        .record_deliveries(&other, &theirs, &[])
        .await
        .expect("saved");

    // 200 failed in tenant-a, by pages of 90: 90, 90, 20, no repeats, none of tenant-b's.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .namespace_deliveries_page("tenant-a", &[DeliveryState::Failed], cursor.as_ref(), 90)
            .await
            .expect("page");
        seen.extend(page.iter().map(|(_, d)| d.id.clone()));
        let Some((_, last)) = page.last() else { break };
        if page.len() < 90 {
            break;
        }
        cursor = Some(kinsight::store::Cursor::after_time(last));
    }
    let unique: std::collections::HashSet<&String> = seen.iter().collect();
    assert_eq!((seen.len(), unique.len()), (200, 200));
    ours.sort();
    seen.sort();
    assert_eq!(seen, ours);
    let pending = store
        .namespace_deliveries_page("tenant-a", &[DeliveryState::Pending], None, 1000)
        .await
        .expect("page");
    assert_eq!(pending.len(), 100);
    assert!(
        pending
            .iter()
            .all(|(_, d)| d.state == DeliveryState::Pending)
    );
    // Per group, for a replay of what failed since then.
    let counts = store
        .failed_since("tenant-a", start, None, 100)
        .await
        .expect("counts");
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [("grp-a1".to_owned(), 100), ("grp-a2".to_owned(), 100)]
    );
    // A page at a time, by group name.
    let first = store
        .failed_since("tenant-a", start, None, 1)
        .await
        .expect("first page");
    assert_eq!(
        first.into_iter().collect::<Vec<_>>(),
        [("grp-a1".to_owned(), 100)]
    );
    let second = store
        .failed_since("tenant-a", start, Some("grp-a1"), 1)
        .await
        .expect("second page");
    assert_eq!(
        second.into_iter().collect::<Vec<_>>(),
        [("grp-a2".to_owned(), 100)]
    );
    assert!(
        store
            .failed_since("tenant-a", start, Some("grp-a2"), 1)
            .await
            .expect("past the end")
            .is_empty()
    );
    let later = start + jiff::SignedDuration::from_secs(60);
    assert!(
        store
            .failed_since("tenant-a", later, None, 100)
            .await
            .expect("counts")
            .is_empty()
    );
}

fn pending(g: &GroupRef, i: usize, endpoint: &str) -> Delivery {
    Delivery {
        id: format!("msg_{}_{endpoint}_{i}", g.uid),
        event: "image.completed".into(),
        image_id: Some(format!("i{i}")),
        endpoint: endpoint.into(),
        sequence: i as u64 + 1,
        created_at: jiff::Timestamp::now(),
        state: DeliveryState::Pending,
        attempts: 0,
        next_attempt_at: None,
        last_error: None,
        delivered_at: None,
        payload: Some(serde_json::json!({ "type": "image.completed", "n": i })),
    }
}

fn settled(claim: &Claimed, state: DeliveryState) -> Settled {
    Settled {
        id: claim.delivery.id.clone(),
        group: claim.group.clone(),
        endpoint: claim.delivery.endpoint.clone(),
        state,
        attempts: claim.delivery.attempts + 1,
        next_attempt_at: None,
        last_error: None,
        delivered_at: Some(jiff::Timestamp::now()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatchers_claim_each_due_delivery_once_and_a_dead_ones_claims_come_back() {
    let (_postgres, store, _dir) = database().await;
    let g = group("d1");
    let due: Vec<Delivery> = (0..2000).map(|i| pending(&g, i, "request")).collect();
    store.record_deliveries(&g, &due, &[]).await.expect("saved");

    // Four dispatchers claim side by side, 50 at a time, until nothing is due.
    let claimers = (0..4).map(|n| {
        let store = store.clone();
        tokio::spawn(async move {
            let owner = format!("dispatcher-{n}");
            let mut mine = Vec::new();
            loop {
                let claimed = store
                    .claim_due(&owner, 50, Duration::from_secs(30))
                    .await
                    .expect("claim")
                    .claimed;
                if claimed.is_empty() {
                    return mine;
                }
                mine.extend(claimed);
            }
        })
    });
    let claims: Vec<Vec<Claimed>> = futures::future::join_all(claimers)
        .await
        .into_iter()
        .map(|r| r.expect("claimer"))
        .collect();
    let all: Vec<&Claimed> = claims.iter().flatten().collect();
    let ids: std::collections::HashSet<&str> = all.iter().map(|c| c.delivery.id.as_str()).collect();
    assert_eq!(all.len(), 2000, "every due delivery is claimed");
    assert_eq!(ids.len(), 2000, "and none twice");
    let busy = claims.iter().filter(|c| !c.is_empty()).count();
    assert!(
        busy >= 2,
        "the claimers shared the work: {busy} of 4 got some"
    );
    let first = all[0];
    assert_eq!(first.delivery.state, DeliveryState::Sending);
    assert_eq!(first.group, g);
    assert!(first.delivery.payload.is_some(), "a claim carries the body");

    // A claim is written back only by its holder.
    let holder = claims.iter().position(|c| !c.is_empty()).expect("a holder");
    let theirs = &claims[holder];
    let outcome = |owner: &str, state| {
        let outcomes = Outcomes {
            settled: theirs.iter().map(|c| settled(c, state)).collect(),
            ..Outcomes::default()
        };
        let (store, owner) = (store.clone(), owner.to_owned());
        async move { store.record_outcomes(&owner, &outcomes).await }
    };
    outcome("someone-else", DeliveryState::Delivered)
        .await
        .expect("written");
    let stored = store.group_deliveries(&g.uid).await.expect("read");
    let delivered = |stored: &[Delivery]| {
        stored
            .iter()
            .filter(|d| d.state == DeliveryState::Delivered)
            .count()
    };
    assert_eq!(delivered(&stored), 0);
    outcome(&format!("dispatcher-{holder}"), DeliveryState::Delivered)
        .await
        .expect("written");
    let stored = store.group_deliveries(&g.uid).await.expect("read");
    assert_eq!(delivered(&stored), theirs.len());

    // Nothing is due while the others' claims last, and a claim that took nothing says how
    // long until one is; a renewed claim lasts on.
    let late = store
        .claim_due("late", 5000, Duration::from_secs(30))
        .await
        .expect("claim");
    assert!(late.claimed.is_empty());
    let waiting = late.next_due_in.expect("open ones");
    assert!(waiting > Duration::from_secs(20), "{waiting:?}");

    // A dispatcher that died: its claims are due once its lease runs out.
    let g2 = group("d2");
    store
        .record_deliveries(&g2, &[pending(&g2, 0, "request")], &[])
        .await
        .expect("saved");
    let dead = store
        .claim_due("dead", 10, Duration::from_millis(300))
        .await
        .expect("claim");
    assert_eq!(dead.claimed.len(), 1);
    // What a claim took is not what its dispatcher waits for next: the others' leases are.
    let waiting = dead.next_due_in.expect("open ones");
    assert!(waiting > Duration::from_secs(20), "{waiting:?}");
    let dead = dead.claimed;
    let renewed = store
        .claim_due("renewing", 10, Duration::from_millis(300))
        .await
        .expect("claim");
    assert!(renewed.claimed.is_empty());
    // The dead dispatcher's claim is due when its lease runs out.
    let waiting = renewed.next_due_in.expect("open ones");
    assert!(waiting <= Duration::from_millis(300), "{waiting:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = store
        .claim_due("renewing", 10, Duration::from_millis(300))
        .await
        .expect("claim")
        .claimed;
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].delivery.id, dead[0].delivery.id,
        "the same webhook-id"
    );
    store
        .renew_claims("renewing", Duration::from_secs(30))
        .await
        .expect("renewed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        store
            .claim_due("other", 10, Duration::from_secs(30))
            .await
            .expect("claim")
            .claimed
            .is_empty(),
        "a renewed claim is still held"
    );
    // A replica restarting under its name takes its claims back at once.
    assert_eq!(
        store
            .release_claims(Some("renewing"))
            .await
            .expect("released"),
        1
    );
    assert_eq!(
        store
            .claim_due("renewing", 10, Duration::from_secs(30))
            .await
            .expect("claim")
            .claimed
            .len(),
        1
    );
}

/// The attempt that ended a claim in `state`: a 204 for a delivery, a 500 otherwise.
fn attempt_of(claim: &Claimed, state: DeliveryState) -> Attempt {
    let delivered = state == DeliveryState::Delivered;
    Attempt {
        delivery_id: claim.delivery.id.clone(),
        attempted_at: jiff::Timestamp::now(),
        status_code: Some(if delivered { 204 } else { 500 }),
        duration_ms: 3.0,
        outcome: if delivered { "delivered" } else { "failed" }.into(),
        error: None,
        response: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_is_reported_drained_once_its_last_open_delivery_settles() {
    let (_postgres, store, _dir) = database().await;
    let (g, other) = (group("drained"), group("busy"));
    let mut due: Vec<Delivery> = (0..3).map(|i| pending(&g, i, "request")).collect();
    due.push(pending(&g, 3, "subscription/a"));
    store.record_deliveries(&g, &due, &[]).await.expect("saved");
    store
        .record_deliveries(&other, &[pending(&other, 0, "request")], &[])
        .await
        .expect("saved");
    let claimed = store
        .claim_due("d", 10, Duration::from_secs(30))
        .await
        .expect("claim")
        .claimed;
    assert_eq!(claimed.len(), 5);
    let find = |uid: &str, endpoint: &str| -> Vec<&Claimed> {
        claimed
            .iter()
            .filter(|c| c.group.uid == uid && c.delivery.endpoint == endpoint)
            .collect()
    };
    let requests = find(&g.uid, "request");
    let write = |claims: &[&Claimed], state: DeliveryState, owner: &str| {
        let outcomes = Outcomes {
            settled: claims.iter().map(|c| settled(c, state)).collect(),
            attempts: claims.iter().map(|c| attempt_of(c, state)).collect(),
            ..Outcomes::default()
        };
        let (store, owner) = (store.clone(), owner.to_owned());
        async move {
            store
                .record_outcomes(&owner, &outcomes)
                .await
                .expect("written")
        }
    };

    // Two of the endpoint's three delivered, one still out: nothing drained.
    assert!(
        write(&requests[..2], DeliveryState::Delivered, "d")
            .await
            .is_empty()
    );
    // The third written by a dispatcher that no longer holds it: not settled, not drained.
    assert!(
        write(&requests[2..], DeliveryState::Delivered, "gone")
            .await
            .is_empty()
    );
    // The third due again (a retry): the endpoint still has it to send.
    let retry = Settled {
        next_attempt_at: Some(jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)),
        delivered_at: None,
        ..settled(requests[2], DeliveryState::Pending)
    };
    let drained = store
        .record_outcomes(
            "d",
            &Outcomes {
                settled: vec![retry],
                attempts: vec![attempt_of(requests[2], DeliveryState::Pending)],
                ..Outcomes::default()
            },
        )
        .await
        .expect("written");
    assert!(drained.is_empty(), "{drained:?}");
    // The other group's endpoint and this group's subscription drain in one write: both
    // groups are named, this one for its subscription (its `request` still has one out).
    let mut last: Vec<&Claimed> = find(&other.uid, "request");
    last.extend(find(&g.uid, "subscription/a"));
    let drained = write(&last, DeliveryState::Failed, "d").await;
    assert_eq!(
        drained,
        vec![
            "tenant-a/grp-busy".to_owned(),
            "tenant-a/grp-drained".to_owned()
        ]
    );

    // Every attempt is kept, the one of the write that was refused too: it was made.
    let (first, attempts) = store
        .delivery_with_attempts(&g.uid, &requests[0].delivery.id)
        .await
        .expect("read")
        .expect("there");
    assert_eq!(first.state, DeliveryState::Delivered);
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status_code, Some(204));
    let (third, attempts) = store
        .delivery_with_attempts(&g.uid, &requests[2].delivery.id)
        .await
        .expect("read")
        .expect("there");
    assert_eq!(third.state, DeliveryState::Pending);
    assert_eq!(attempts.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_fails_the_endpoints_open_deliveries_of_the_group_and_is_remembered() {
    let (_postgres, store, _dir) = database().await;
    let g = group("s1");
    let mut deliveries: Vec<Delivery> = (0..3).map(|i| pending(&g, i, "request")).collect();
    deliveries.extend((0..3).map(|i| pending(&g, i, "subscription/other")));
    store
        .record_deliveries(&g, &deliveries, &[])
        .await
        .expect("saved");
    let claimed = store
        .claim_due("d", 1, Duration::from_secs(30))
        .await
        .expect("claim")
        .claimed;
    let gone = claimed.first().expect("one claimed");
    let outcomes = Outcomes {
        settled: vec![Settled {
            last_error: Some("receiver answered 410 Gone".into()),
            ..settled(gone, DeliveryState::Failed)
        }],
        stops: vec![Stop {
            group: g.clone(),
            endpoint: gone.delivery.endpoint.clone(),
            mark: format!("{} http://gone.example/", gone.delivery.endpoint),
        }],
        ..Outcomes::default()
    };
    let drained = store
        .record_outcomes("d", &outcomes)
        .await
        .expect("written");
    // The stopped endpoint has nothing left to send: the group's reconcile must look.
    assert_eq!(drained, vec!["tenant-a/grp-s1".to_owned()]);
    let stored = store.group_deliveries(&g.uid).await.expect("read");
    for d in &stored {
        let expected = if d.endpoint == gone.delivery.endpoint {
            DeliveryState::Failed
        } else {
            DeliveryState::Pending
        };
        assert_eq!(d.state, expected, "{d:?}");
    }
    assert_eq!(
        store.stopped_endpoints(&g.uid).await.expect("read"),
        vec![format!("{} http://gone.example/", gone.delivery.endpoint)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_counts_open_endpoints_and_last_failures_come_from_the_table() {
    let (_postgres, store, _dir) = database().await;
    let (g, other) = (group("counted"), group("elsewhere"));
    let with = |mut d: Delivery, state: DeliveryState, error: Option<&str>| {
        d.state = state;
        d.last_error = error.map(str::to_owned);
        d
    };
    let mut deliveries = Vec::new();
    for i in 0..30 {
        deliveries.push(with(
            pending(&g, i, "request"),
            DeliveryState::Delivered,
            None,
        ));
        let failed = with(
            pending(&g, i, "subscription/a"),
            DeliveryState::Failed,
            Some("500"),
        );
        deliveries.push(if i < 25 {
            failed
        } else {
            pending(&g, i, "subscription/a")
        });
        if i < 3 {
            deliveries.push(pending(&g, i, "subscription/b"));
        }
    }
    store
        .record_deliveries(&g, &deliveries, &[])
        .await
        .expect("saved");
    store
        .record_deliveries(&other, &[pending(&other, 0, "subscription/z")], &[])
        .await
        .expect("saved");

    assert_eq!(
        store.open_endpoints(&g.uid).await.expect("open"),
        ["subscription/a", "subscription/b"]
    );
    let counts: Vec<(String, DeliveryState, u64)> = store
        .delivery_counts(&g.uid)
        .await
        .expect("counts")
        .into_iter()
        .map(|c| (c.endpoint, c.state, c.count))
        .collect();
    assert_eq!(
        counts,
        [
            ("request".to_owned(), DeliveryState::Delivered, 30),
            ("subscription/a".to_owned(), DeliveryState::Failed, 25),
            ("subscription/a".to_owned(), DeliveryState::Pending, 5),
            ("subscription/b".to_owned(), DeliveryState::Pending, 3),
        ]
    );
    // The newest failed events first, as the status lists them.
    let failures = store.recent_failures(&g.uid, 10).await.expect("failures");
    let sequences: Vec<u64> = failures.iter().map(|d| d.sequence).collect();
    assert_eq!(sequences, (16..=25).rev().collect::<Vec<u64>>());
    assert!(
        failures
            .iter()
            .all(|d| d.last_error.as_deref() == Some("500"))
    );
    // A group with nothing recorded has no open endpoint.
    assert!(
        store
            .open_endpoints("no-such-group")
            .await
            .expect("open")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_requires_tls_is_reached_over_it_with_its_certificate_checked() {
    let (mut postgres, _store, _dir) = database().await;
    let ca = postgres.require_tls().await.expect("TLS on");
    let url = postgres.url();

    // Plain connections are refused by the server, with its reason.
    let plain = format!("{url}?sslmode=disable");
    let Err(err) = Store::connect(&plain, Duration::from_secs(2)).await else {
        panic!("refused without TLS");
    };
    assert!(err.to_string().contains("pg_hba.conf"), "{err}");
    // Verifying a server whose CA the client was not given: its certificate is not trusted.
    let unverified = format!("{url}?sslmode=verify-full");
    let Err(err) = Store::connect(&unverified, Duration::from_secs(2)).await else {
        panic!("refused: unknown issuer");
    };
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // `require` without CAs encrypts without checking, as libpq does; so does the default
    // (`prefer`), which a server with TLS answers over it.
    for encrypted in [format!("{url}?sslmode=require"), url.clone()] {
        let store = Store::connect(&encrypted, Duration::from_secs(10))
            .await
            .expect("connects over TLS, unverified");
        let ssl = store
            .query_text("SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .await
            .expect("pg_stat_ssl");
        assert_eq!(ssl, [["true"]], "{encrypted}");
    }

    // With the CA (libpq's `sslrootcert`), over TLS: stored and read back, and the
    // notifications' own connection is made the same way.
    let trusted = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    let store = Store::connect(&trusted, Duration::from_secs(10))
        .await
        .expect("connects over TLS");
    let mut notices = Box::pin(kinsight::store::listen(trusted.clone(), &[RESULTS_CHANNEL]));
    let ready = tokio::time::timeout(Duration::from_secs(10), notices.next())
        .await
        .expect("listening in time");
    assert!(matches!(ready, Some(StoreNotice::Connected)), "{ready:?}");
    let g = group("over-tls");
    store
        .write_results(&g, 1, &[classified("a", "m", "espresso")])
        .await
        .expect("stored");
    assert_eq!(store.group_results(&g).await.expect("read").len(), 1);
    let heard = tokio::time::timeout(Duration::from_secs(10), notices.next())
        .await
        .expect("notified in time");
    assert!(
        matches!(&heard, Some(StoreNotice::Notification { payload, .. }) if payload == "tenant-a/grp-over-tls"),
        "{heard:?}"
    );
}

/// A stand-in for the controller's event rules (unit-tested where they live): every
/// stored result makes one event, to each endpoint key listed in the records that is not
/// stopped; its body names the image and the number it was given.
struct EveryResult;

impl EventPlanner for EveryResult {
    fn image_events(&self, stored: &[ImageResult], ledger: &EventLedger) -> Vec<DraftEvent> {
        let keys: Vec<String> =
            serde_json::from_value(ledger.endpoints.clone()).unwrap_or_default();
        stored
            .iter()
            .enumerate()
            .map(|(index, r)| DraftEvent {
                event: "image.completed".into(),
                image_id: r.image_id.clone(),
                deliveries: keys
                    .iter()
                    .filter(|k| {
                        !ledger
                            .stopped
                            .iter()
                            .any(|s| s.starts_with(&format!("{k} ")))
                    })
                    .map(|k| (k.clone(), format!("msg_{}_{k}", r.image_id)))
                    .collect(),
                result: index,
            })
            .collect()
    }

    /// Never all stored: the tests using it look at events, not at completion.
    fn images_total(&self) -> usize {
        usize::MAX
    }

    fn body(
        &self,
        event: &DraftEvent,
        stored: &ImageResult,
        sequence: u64,
        _now: jiff::Timestamp,
    ) -> Option<serde_json::Value> {
        let label = stored
            .outputs
            .get("m")
            .and_then(|o| o.output.classes.first());
        Some(serde_json::json!({
            "image": event.image_id,
            "sequence": sequence,
            "label": label.map(|c| c.label.clone()),
        }))
    }
}

fn endpoint_plan<'a>(
    records: &'a serde_json::Value,
    new: &'a [Delivery],
    numbered: Option<(u64, u64)>,
) -> Plan<'a> {
    static NONE: std::sync::LazyLock<kinsight::delivery::EventBodies> =
        std::sync::LazyLock::new(Default::default);
    Plan {
        new,
        bodies: &NONE,
        replayed: &[],
        unstopped: &[],
        pruned: &[],
        endpoints: records,
        numbered,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_of_results_records_its_events_numbered_once_and_a_plan_that_raced_it_is_refused() {
    let (_postgres, store, _dir) = database().await;
    let g = group("e1");
    // The group's plan records where its events go.
    let two = serde_json::json!(["request", "subscription/a"]);
    let saved = store
        .save_plan(&g, &endpoint_plan(&two, &[], None))
        .await
        .expect("plan saved");
    assert!(saved.endpoints_changed);
    let mut dispatch = Box::pin(kinsight::store::listen(
        store.url().to_owned(),
        &[DISPATCH_CHANNEL],
    ));
    assert_eq!(next(&mut dispatch).await, StoreNotice::Connected);

    // A batch of two results: two events, each numbered once for both its endpoints,
    // due at once, with the body fixed now, and the dispatchers told.
    let batch = [
        classified("a", "m", "espresso"),
        classified("b", "m", "latte"),
    ];
    let added = store
        .store_results(&g, 1, &batch, Some(&EveryResult))
        .await
        .expect("stored");
    assert_eq!(added, 4);
    assert_eq!(
        next(&mut dispatch).await,
        StoreNotice::Notification {
            channel: DISPATCH_CHANNEL.into(),
            payload: String::new()
        }
    );
    let stored = store.group_deliveries(&g.uid).await.expect("read");
    let numbers = |image: &str| -> Vec<u64> {
        stored
            .iter()
            .filter(|d| d.image_id.as_deref() == Some(image))
            .map(|d| d.sequence)
            .collect()
    };
    assert_eq!(numbers("a").len(), 2);
    assert_eq!(numbers("a")[0], numbers("a")[1], "one event, one number");
    let mut both = vec![numbers("a")[0], numbers("b")[0]];
    both.sort_unstable();
    assert_eq!(both, vec![1, 2]);
    assert_eq!(store.last_sequence(&g.uid).await.expect("read"), 2);
    let claimed = store
        .claim_due("dispatcher", 10, Duration::from_secs(30))
        .await
        .expect("claimed")
        .claimed;
    assert_eq!(claimed.len(), 4, "due as soon as the write returns");
    for claim in &claimed {
        let body = claim.delivery.payload.as_ref().expect("body");
        assert_eq!(body["sequence"], claim.delivery.sequence);
        assert_eq!(
            body["image"],
            claim.delivery.image_id.as_deref().unwrap_or("")
        );
    }

    // The same batch again (a worker's retry) records nothing and numbers nothing.
    let again = store
        .store_results(&g, 1, &batch, Some(&EveryResult))
        .await
        .expect("stored");
    assert_eq!(again, 0);
    assert_eq!(store.last_sequence(&g.uid).await.expect("read"), 2);

    // A third endpoint, and a 410 stop on the first: a later write sends image a's event
    // to the new endpoint under a's number, and c's event gets the next one.
    let three = serde_json::json!(["request", "subscription/a", "subscription/b"]);
    store
        .save_plan(&g, &endpoint_plan(&three, &[], None))
        .await
        .expect("plan saved");
    let stop = Stop {
        group: g.clone(),
        endpoint: "request".into(),
        mark: "request https://gone.example/".into(),
    };
    store
        .record_outcomes(
            "dispatcher",
            &Outcomes {
                stops: vec![stop],
                ..Outcomes::default()
            },
        )
        .await
        .expect("stop recorded");
    let later = [
        classified("a", "m", "espresso"),
        classified("c", "m", "mocha"),
    ];
    let added = store
        .store_results(&g, 1, &later, Some(&EveryResult))
        .await
        .expect("stored");
    assert_eq!(added, 3, "a to b; c to a and b; nothing to the stopped one");
    let stored = store.group_deliveries(&g.uid).await.expect("read");
    let a_numbers: std::collections::BTreeSet<u64> = stored
        .iter()
        .filter(|d| d.image_id.as_deref() == Some("a"))
        .map(|d| d.sequence)
        .collect();
    assert_eq!(a_numbers.len(), 1, "{stored:#?}");
    let c: Vec<&Delivery> = stored
        .iter()
        .filter(|d| d.image_id.as_deref() == Some("c"))
        .collect();
    assert_eq!(c.len(), 2);
    assert!(c.iter().all(|d| d.sequence == 3 && d.endpoint != "request"));
    assert_eq!(store.last_sequence(&g.uid).await.expect("read"), 3);

    // A plan that numbered its events from what it read before that write is refused
    // whole; numbered from the store's last number, it is saved.
    let mut event = pending(&g, 9, "subscription/a");
    event.sequence = 3;
    let refused = store
        .save_plan(&g, &endpoint_plan(&three, &[event.clone()], Some((2, 3))))
        .await
        .expect_err("raced");
    assert_eq!(refused.category(), "store_conflict", "{refused}");
    let stored = store.group_deliveries(&g.uid).await.expect("read");
    assert!(
        !stored.iter().any(|d| d.id == event.id),
        "nothing of it saved"
    );
    event.sequence = 4;
    let saved = store
        .save_plan(&g, &endpoint_plan(&three, &[event.clone()], Some((3, 4))))
        .await
        .expect("saved");
    assert!(!saved.endpoints_changed);
    assert_eq!(store.last_sequence(&g.uid).await.expect("read"), 4);
    let stored = store.group_deliveries(&g.uid).await.expect("read");
    assert!(stored.iter().any(|d| d.id == event.id));
}

fn work_order(g: &GroupRef, generation: i64, images: usize) -> WorkOrder {
    WorkOrder {
        group: g.clone(),
        generation,
        models: vec!["image_classification".into()],
        images: (0..images)
            .map(|i| WorkItem {
                id: format!("i{i}"),
                url: format!(
                    "https://photos.example/{i}.jpg?signature={}",
                    "s".repeat(500)
                ),
                models: Vec::new(),
            })
            .collect(),
        traceparent: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_order_is_kept_per_job_and_goes_with_its_job_or_its_group() {
    let (_postgres, store, _dir) = database().await;
    let first = group("w1");
    let again = GroupRef {
        uid: "w2".into(),
        ..first.clone()
    };
    // 1000 images with long URLs: half a megabyte, read back whole.
    let order = work_order(&first, 1, 1000);
    store
        .save_work_order("tenant-a", "grp-w-g1", &order, None)
        .await
        .expect("saved");
    let read = store
        .work_order("tenant-a", "grp-w-g1")
        .await
        .expect("read");
    assert_eq!(read.as_ref(), Some(&order));
    assert_eq!(
        store
            .work_order("tenant-b", "grp-w-g1")
            .await
            .expect("read"),
        None,
        "another namespace's Job of that name has none"
    );
    assert_eq!(
        store
            .work_order("tenant-a", "grp-w-g2")
            .await
            .expect("read"),
        None
    );

    // A group made again under the same name has the same Job names: its order replaces
    // the first, and the first Job's deletion leaves it alone.
    let later = work_order(&again, 1, 2);
    store
        .save_work_order("tenant-a", "grp-w-g1", &later, None)
        .await
        .expect("saved");
    assert!(
        !store
            .delete_work_order("tenant-a", "grp-w-g1", &first.uid)
            .await
            .expect("delete")
    );
    let read = store
        .work_order("tenant-a", "grp-w-g1")
        .await
        .expect("read");
    assert_eq!(read.as_ref(), Some(&later));
    assert!(
        store
            .delete_work_order("tenant-a", "grp-w-g1", &again.uid)
            .await
            .expect("delete")
    );
    assert_eq!(
        store
            .work_order("tenant-a", "grp-w-g1")
            .await
            .expect("read"),
        None
    );

    // Orders whose Jobs were never seen deleted go with their group, with no result stored.
    let kept = group("w3");
    for (g, job) in [
        (&first, "grp-w1-g1"),
        (&first, "grp-w1-g2"),
        (&kept, "grp-w3-g1"),
    ] {
        store
            .save_work_order("tenant-a", job, &work_order(g, 1, 3), None)
            .await
            .expect("saved");
    }
    store.forget_group(&first.uid).await.expect("forget");
    store.purge_forgotten(1).await.expect("purge");
    for job in ["grp-w1-g1", "grp-w1-g2"] {
        assert_eq!(
            store.work_order("tenant-a", job).await.expect("read"),
            None,
            "{job}"
        );
    }
    assert!(
        store
            .work_order("tenant-a", "grp-w3-g1")
            .await
            .expect("read")
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_carrier_of_the_shape_is_handed_one_order_until_it_is_done() {
    let (_postgres, store, _dir) = database().await;
    // A hand-over is announced, so the carrier's waiting request answers at once.
    let mut notices = Box::pin(kinsight::store::listen(
        store.url().to_owned(),
        &[CARRIERS_CHANNEL],
    ));
    assert_eq!(next(&mut notices).await, StoreNotice::Connected);
    let g = group("c1");
    let fresh = Duration::from_secs(5);
    let order = work_order(&g, 1, 3);
    // Saving an order hands it to a waiting carrier of its shape, if one waits.
    let hand = async |name: &str, order: &WorkOrder, fresh: Duration| {
        store
            .save_work_order("tenant-a", name, order, Some(("shape-a", fresh)))
            .await
            .expect("saved")
    };
    let carried = async |job: &str| store.take_carried("tenant-a", job).await.expect("take");
    // Nobody waits: nothing is handed.
    assert_eq!(hand("grp-c1-g1", &order, fresh).await, None);
    // Workers of another namespace or shape do not take it.
    for (namespace, job, shape) in [
        ("tenant-b", "b-g1", "shape-a"),
        ("tenant-a", "x-g1", "shape-b"),
    ] {
        store
            .wait_as_carrier(namespace, job, shape)
            .await
            .expect("wait");
    }
    assert_eq!(hand("grp-c1-g1", &order, fresh).await, None);
    // The one of its namespace and shape that has waited longest does, and waits no more.
    store
        .wait_as_carrier("tenant-a", "first-g1", "shape-a")
        .await
        .expect("wait");
    tokio::time::sleep(Duration::from_millis(20)).await;
    store
        .wait_as_carrier("tenant-a", "second-g1", "shape-a")
        .await
        .expect("wait");
    assert_eq!(
        hand("grp-c1-g1", &order, fresh).await.as_deref(),
        Some("first-g1")
    );
    // Only the hand-over was announced (not the saves nobody took), naming the carrier.
    assert_eq!(
        next(&mut notices).await,
        StoreNotice::Notification {
            channel: CARRIERS_CHANNEL.into(),
            payload: "tenant-a/first-g1".into()
        }
    );
    assert!(
        !store
            .stop_waiting("tenant-a", "first-g1")
            .await
            .expect("stop"),
        "its wait went with the order"
    );
    let taken = carried("first-g1").await;
    assert_eq!(taken, Some(("grp-c1-g1".to_owned(), order.clone())));
    assert!(store.carries("tenant-a", "first-g1").await.expect("read"));
    assert!(!store.carries("tenant-a", "second-g1").await.expect("read"));
    // Until it is done, the carrier's Job (a next pod of it) takes it up again; no one else.
    assert!(carried("first-g1").await.is_some());
    assert_eq!(carried("second-g1").await, None);
    assert!(
        store
            .carried_done("tenant-a", "grp-c1-g1", "first-g1")
            .await
            .expect("done")
    );
    assert_eq!(carried("first-g1").await, None);
    assert!(!store.carries("tenant-a", "first-g1").await.expect("read"));

    // A wait older than a carrier waits is not handed to.
    let next = work_order(&g, 2, 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        hand("grp-c1-g2", &next, Duration::from_millis(10)).await,
        None
    );
    assert_eq!(
        hand("grp-c1-g2", &next, fresh).await.as_deref(),
        Some("second-g1")
    );
    // Taken back only from the carrier that has it; then its own Job runs it.
    assert!(
        !store
            .take_back("tenant-a", "grp-c1-g2", "first-g1")
            .await
            .expect("take back")
    );
    assert!(
        store
            .take_back("tenant-a", "grp-c1-g2", "second-g1")
            .await
            .expect("take back")
    );
    assert_eq!(carried("second-g1").await, None);
    assert!(
        !store
            .carried_done("tenant-a", "grp-c1-g2", "second-g1")
            .await
            .expect("done"),
        "no longer its order"
    );
    // An order saved for a Job that does not carry (Kueue's) leaves the waits alone.
    store
        .wait_as_carrier("tenant-a", "third-g1", "shape-a")
        .await
        .expect("wait");
    let plain = store
        .save_work_order("tenant-a", "grp-c1-g3", &work_order(&g, 3, 1), None)
        .await
        .expect("saved");
    assert_eq!(plain, None);
    assert!(
        store
            .stop_waiting("tenant-a", "third-g1")
            .await
            .expect("stop")
    );
}
