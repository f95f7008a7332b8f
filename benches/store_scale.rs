//! The state plane's reads at scale: `cargo bench --bench store_scale` (a command, not a
//! test; `harness = false`).
//!
//! It starts the testbed's PostgreSQL (Debian's, in a temporary folder) and fills it in steps
//! (10,000, 100,000 and 1,000,000 stored results by default: groups of 1000 images spread over
//! 10 namespaces, each result with one webhook delivery, every 10th of them failed), made
//! directly through the store as the result ingest and the controller write them. At each step
//! it measures, side by side, the queries behind the REST API's reads:
//!
//! - a group's results (`GET /v1/image-groups/{id}`, 1000 rows),
//! - one image's result (`GET /v1/images/{id}`),
//! - a page of 100 of a group's deliveries (`GET /v1/image-groups/{id}/deliveries`),
//! - the first page of what failed in a namespace (`GET /v1/deliveries?state=failed`),
//! - failed deliveries since T per group (`POST /v1/deliveries/replay`),
//!
//! each `SAMPLES` times (200) on random groups (after an `ANALYZE`, as autovacuum would run
//! within a minute of such a fill), printing p50/p99 and the database's size.
//! Settings: `STEPS` (comma-separated totals), `SAMPLES`.

mod common;

use common::percentile;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kinsight::delivery::{Delivery, DeliveryState};
use kinsight::inference::{ClassScore, ModelOutput};
use kinsight::results::{GroupRef, ImageResult, ModelResult, Timings};
use kinsight::store::Store;
use kinsight::testbed::Postgres;
use rand::Rng;

const IMAGES: usize = 1000;
const NAMESPACES: usize = 10;

fn group(n: usize) -> GroupRef {
    GroupRef {
        namespace: format!("tenant-{}", n % NAMESPACES),
        name: format!("grp-{n:07}"),
        uid: format!("uid-{n:07}"),
    }
}

fn result(image: usize) -> ImageResult {
    let output = ModelOutput {
        classes: vec![ClassScore {
            label: "espresso".into(),
            confidence: 0.91,
        }],
        ..ModelOutput::default()
    };
    ImageResult {
        group: String::new(),
        image_id: format!("i{image}"),
        failure: None,
        width: Some(1024),
        height: Some(768),
        outputs: BTreeMap::from([(
            "image_classification".to_owned(),
            ModelResult {
                output,
                error: None,
                inference_ms: 41.5,
            },
        )]),
        timings: Timings {
            download_ms: 12.0,
            decode_ms: 9.5,
        },
    }
}

fn delivery(g: &GroupRef, image: usize, at: jiff::Timestamp) -> Delivery {
    let failed = image.is_multiple_of(10);
    Delivery {
        id: format!("msg_{}_{image}", g.uid),
        event: "image.completed".into(),
        image_id: Some(format!("i{image}")),
        endpoint: "request".into(),
        sequence: image as u64 + 1,
        created_at: at,
        state: if failed {
            DeliveryState::Failed
        } else {
            DeliveryState::Delivered
        },
        attempts: if failed { 8 } else { 1 },
        next_attempt_at: None,
        last_error: failed.then(|| "receiver answered 500 Internal Server Error".to_owned()),
        delivered_at: (!failed).then_some(at),
        payload: None,
    }
}

async fn timed<F: Future<Output = ()>>(samples: usize, mut f: impl FnMut() -> F) -> String {
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        f().await;
        times.push(started.elapsed());
    }
    times.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:.2} / {:.2} ms",
        ms(percentile(&times, 50.0)),
        ms(percentile(&times, 99.0))
    )
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("store_scale: a benchmark; run it with `cargo bench --bench store_scale`");
        return;
    }
    kinsight::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    let steps: Vec<usize> = std::env::var("STEPS")
        .unwrap_or_else(|_| "10000,100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let samples: usize = std::env::var("SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().expect("temp dir");
    let postgres = Postgres::start(dir.path()).await.expect("PostgreSQL");
    let store = Store::connect(&postgres.url(), Duration::from_secs(30))
        .await
        .expect("store");
    let client = tokio_postgres_size_client(&postgres.url()).await;

    println!(
        "| stored results | fill rate | group's results | one image | deliveries page | failed page (namespace) | failed since T (namespace) | database |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut groups = 0_usize;
    for target in steps {
        let started = Instant::now();
        let before = groups;
        let results: Vec<ImageResult> = (0..IMAGES).map(result).collect();
        while groups * IMAGES < target {
            let g = group(groups);
            let at = jiff::Timestamp::now();
            store.write_results(&g, 1, &results).await.expect("results");
            let deliveries: Vec<Delivery> = (0..IMAGES).map(|i| delivery(&g, i, at)).collect();
            store
                .record_deliveries(&g, &deliveries, &[])
                .await
                .expect("deliveries");
            groups += 1;
        }
        let filled = (groups - before) * IMAGES;
        let rate = filled as f64 / started.elapsed().as_secs_f64().max(1e-9);
        // Statistics as autovacuum would have them within a minute of such a fill.
        client.batch_execute("ANALYZE").await.expect("ANALYZE");
        let mut rng = rand::rng();
        let mut pick = move || group(rng.random_range(0..groups));
        let since = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
        let g_results = timed(samples, || {
            let g = pick();
            let store = &store;
            async move {
                let found = store.group_results(&g).await.expect("results");
                assert_eq!(found.len(), IMAGES);
            }
        })
        .await;
        let one = timed(samples, || {
            let g = pick();
            let store = &store;
            async move {
                store
                    .image_result(&g, "i500")
                    .await
                    .expect("one")
                    .expect("found");
            }
        })
        .await;
        let page = timed(samples, || {
            let g = pick();
            let store = &store;
            async move {
                let page = store
                    .group_deliveries_page(&g.uid, None, 100)
                    .await
                    .expect("page");
                assert_eq!(page.len(), 100);
            }
        })
        .await;
        let failed_page = timed(samples, || {
            let g = pick();
            let store = &store;
            async move {
                let page = store
                    .namespace_deliveries_page(&g.namespace, &[DeliveryState::Failed], None, 100)
                    .await
                    .expect("failed page");
                assert_eq!(page.len(), 100);
            }
        })
        .await;
        let failed_since = timed(samples.min(20), || {
            let g = pick();
            let store = &store;
            async move {
                store
                    .failed_since(&g.namespace, since)
                    .await
                    .expect("failed since");
            }
        })
        .await;
        let size: i64 = client
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await
            .map(|row| row.get(0))
            .unwrap_or(0);
        println!(
            "| {} | {:.0}/s | {g_results} | {one} | {page} | {failed_page} | {failed_since} | {} MiB |",
            groups * IMAGES,
            rate,
            size / (1024 * 1024)
        );
    }
}

/// A plain connection for the database's own figures.
async fn tokio_postgres_size_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}
