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
//!
//! Beside the database runs a local control plane with the real `kinsight api` and
//! `kinsight controller` processes (release build). The first 10 groups are ImageGroups
//! there (one per namespace, 1000 images each, no webhook), the rest only rows. At each
//! step the REST API is asked for those groups (`GET /v1/image-groups/{id}`, the 1000
//! results) and for a namespace's failed deliveries (`GET /v1/deliveries?state=failed`),
//! the controller reconciles each of them again (an annotation changes), and both
//! processes' memory is read from `/proc` (resident now, and its peak).
//! Settings: `STEPS` (comma-separated totals), `SAMPLES`.

mod common;

use common::percentile;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kinsight::crd::{ImageEntry, ImageGroup, ImageGroupSpec};
use kinsight::delivery::{Delivery, DeliveryState};
use kinsight::inference::{ClassScore, ModelOutput};
use kinsight::results::{GroupRef, ImageResult, ModelResult, Timings};
use kinsight::store::Store;
use kinsight::testbed::TestCluster;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use rand::Rng;

const IMAGES: usize = 1000;
const NAMESPACES: usize = 10;
const KEYS_NAMESPACE: &str = "kinsight-system";

fn api_key(namespace: &str) -> String {
    format!("bench-key-{namespace}")
}

fn synthetic_group(n: usize) -> GroupRef {
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
        // What a worker stores: 64 bits, base64.
        perceptual_hash: Some("q83vASNFZ4k=".to_owned()),
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
    if common::started_by_cargo_bench("store_scale") {
        common::block_on(run());
    }
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
    let cluster = TestCluster::start().await.expect("control plane");
    let database = cluster.database_url();
    let store = Store::connect(&database, Duration::from_secs(30))
        .await
        .expect("store");
    let client = tokio_postgres_size_client(&database).await;
    let kube = cluster.client();
    kinsight::dev::install_crds(&kube).await.expect("CRDs");
    for k in 0..NAMESPACES {
        let namespace = format!("tenant-{k}");
        kinsight::dev::create_tenant(
            &kube,
            KEYS_NAMESPACE,
            &namespace,
            &api_key(&namespace),
            &kinsight::webhook::generate_secret(),
        )
        .await
        .expect("tenant");
    }
    let samples_made = sample_groups(&kube).await;
    let group = |n: usize| match samples_made.get(n) {
        Some(sample) => sample.clone(),
        None => synthetic_group(n),
    };
    let kubeconfig = cluster
        .control_plane()
        .map(|cp| cp.kubeconfig_path().to_path_buf())
        .expect("the testbed's kubeconfig");
    // Started once the first step stored the sample groups' results: they find them done.
    let mut processes: Option<Processes> = None;
    let http = reqwest::Client::new();
    let mut memory_rows = Vec::new();

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
                    .failed_since(&g.namespace, since, None, 100)
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

        // The same reads through the REST API, and what the processes hold.
        if processes.is_none() {
            processes = Some(Processes::start(&kubeconfig, &database).await);
        }
        let Some(processes) = &processes else {
            continue;
        };
        let api = &processes.api_url;
        let mut rng = rand::rng();
        let count = samples_made.len();
        let mut pick_sample = move || rng.random_range(0..count);
        let http_group = timed(samples, || {
            let sample = &samples_made[pick_sample()];
            let url = format!("{api}/v1/image-groups/{}?limit={IMAGES}", sample.name);
            let key = api_key(&sample.namespace);
            let http = &http;
            async move {
                let body = get_json(http, &url, &key).await;
                assert_eq!(body["images"].as_array().map(Vec::len), Some(IMAGES));
            }
        })
        .await;
        let http_failed = timed(samples, || {
            let sample = &samples_made[pick_sample()];
            let url = format!("{api}/v1/deliveries?state=failed&limit=100");
            let key = api_key(&sample.namespace);
            let http = &http;
            async move {
                let body = get_json(http, &url, &key).await;
                assert_eq!(body["deliveries"].as_array().map(Vec::len), Some(100));
            }
        })
        .await;
        touch_samples(&kube, &samples_made, groups).await;
        // The reconciles of the touched groups (each reads its 1000 results and deliveries).
        tokio::time::sleep(Duration::from_secs(5)).await;
        let completed = completed_at_step(&kube, &samples_made, groups).await;
        memory_rows.push(format!(
            "| {} | {http_group} | {http_failed} | {} | {} | {completed} of {} |",
            groups * IMAGES,
            memory(processes.api.id()),
            memory(processes.controller.id()),
            samples_made.len()
        ));
    }
    println!();
    println!(
        "REST API and controller processes (release build), {} ImageGroups of {IMAGES} images:",
        samples_made.len()
    );
    println!(
        "| stored results | GET a group (1000 results) | GET failed deliveries (100) | API memory (now / peak) | controller memory (now / peak) | sample groups Completed |"
    );
    println!("|---|---|---|---|---|---|");
    for row in memory_rows {
        println!("{row}");
    }
}

/// One ImageGroup per namespace, 1000 images, no webhook: the groups the processes serve.
async fn sample_groups(kube: &kube::Client) -> Vec<GroupRef> {
    let mut out = Vec::new();
    for k in 0..NAMESPACES {
        let namespace = format!("tenant-{k}");
        let name = format!("sample-{k}");
        let spec = ImageGroupSpec {
            images: (0..IMAGES)
                .map(|i| ImageEntry {
                    id: Some(format!("i{i}")),
                    url: format!("https://photos.example/{k}/{i}.jpg"),
                    metadata: BTreeMap::new(),
                })
                .collect(),
            models: vec!["image_classification".to_owned()],
            webhook: None,
            metadata: BTreeMap::new(),
        };
        let object = ImageGroup {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        };
        let made = Api::<ImageGroup>::namespaced(kube.clone(), &namespace)
            .create(&PostParams::default(), &object)
            .await
            .expect("sample ImageGroup");
        out.push(GroupRef {
            namespace,
            name,
            uid: made.uid().expect("uid"),
        });
    }
    out
}

/// Changes an annotation of each sample group: the controller reconciles each again.
async fn touch_samples(kube: &kube::Client, samples: &[GroupRef], step: usize) {
    for sample in samples {
        let patch = serde_json::json!({
            "metadata": { "annotations": { "bench.kinsight.io/step": step.to_string() } }
        });
        Api::<ImageGroup>::namespaced(kube.clone(), &sample.namespace)
            .patch(&sample.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("annotate");
    }
}

/// How many of the sample groups carry the touch of `step` and a `Completed` status: the
/// controller found them (and their 1000 stored results each).
async fn completed_at_step(kube: &kube::Client, samples: &[GroupRef], step: usize) -> usize {
    let mut done = 0;
    for sample in samples {
        let group = Api::<ImageGroup>::namespaced(kube.clone(), &sample.namespace)
            .get(&sample.name)
            .await
            .expect("sample group");
        let touched = group
            .annotations()
            .get("bench.kinsight.io/step")
            .is_some_and(|s| *s == step.to_string());
        let complete = group
            .status
            .as_ref()
            .is_some_and(|s| s.phase == kinsight::crd::GroupPhase::Completed);
        if touched && complete {
            done += 1;
        }
    }
    done
}

async fn get_json(http: &reqwest::Client, url: &str, key: &str) -> serde_json::Value {
    let response = http.get(url).bearer_auth(key).send().await.expect("GET");
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    response.json().await.expect("JSON")
}

/// `VmRSS / VmHWM` of a process, in MiB.
fn memory(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or("?".to_owned(), |kb| format!("{:.0}", kb / 1024.0))
    };
    format!("{} / {} MiB", field("VmRSS:"), field("VmHWM:"))
}

/// `kinsight api` and `kinsight controller`, as the chart runs them, against the testbed.
struct Processes {
    api: std::process::Child,
    controller: std::process::Child,
    api_url: String,
}

impl Processes {
    async fn start(kubeconfig: &std::path::Path, database: &str) -> Processes {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let binary = env!("CARGO_BIN_EXE_kinsight");
        let command = |args: &[&str]| {
            let mut command = std::process::Command::new(binary);
            command
                .args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .env("KUBECONFIG", kubeconfig)
                .env("KINSIGHT_DATABASE_URL", database)
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null());
            command
        };
        let listen = format!("127.0.0.1:{port}");
        let api = command(&["api", "--listen", &listen])
            .spawn()
            .expect("kinsight api");
        let controller = command(&[
            "controller",
            "--no-leader-election",
            "--results-url",
            "http://127.0.0.1:9/unused",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .spawn()
        .expect("kinsight controller");
        let api_url = format!("http://{listen}");
        let http = reqwest::Client::new();
        for _ in 0..600 {
            let ready = http.get(format!("{api_url}/readyz")).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Processes {
            api,
            controller,
            api_url,
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        let _ = self.api.kill();
        let _ = self.controller.kill();
        let _ = self.api.wait();
        let _ = self.controller.wait();
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
