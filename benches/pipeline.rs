//! The whole pipeline through `kinsight dev`, as a user drives it: `cargo bench --bench
//! pipeline` (a command, not a test; `harness = false`).
//!
//! It starts `kinsight dev` (control plane, PostgreSQL, controller, API, and the real node
//! whose containers run the worker Jobs) as its own process with a tiny test model
//! (`quality_grade` of `models/test/catalog.yaml`: an 8x8 classifier, so inference costs next
//! to nothing and the pipeline itself is measured), serves small PNGs where pods reach this
//! machine (the node's bridge address), posts the groups through the REST API one after the other
//! and receives the webhooks on 127.0.0.1 (recording each `webhook-id` and when it arrived;
//! signatures are not checked: that cost is the receiver's).
//!
//! Printed: image events per second from the first POST to the last image event, latency from
//! each group's POST to each of its image events (p50/p90/p99/max), the time to the last
//! `image_group.completed`, and duplicates (receipts of a `webhook-id` already received).
//!
//! Settings (environment): `GROUP_COUNT` (20; not `GROUPS`, which bash keeps for itself), `IMAGES` per group (1000, at most 1000), `POST_EVERY_MS` (0: every group at once, back to back; else
//! one group every so many ms, an open-loop load whose latency is not a backlog's), `KEEP_LOG` (a path to copy `kinsight dev`'s log to; the workers' logs go to `{KEEP_LOG}.pods/`),
//! `MAX_SECS` for the measured part (900), `DEV_ARGS` (more arguments for `kinsight dev`, e.g.
//! `--worker-cpu 500m --max-worker-jobs-per-namespace 4`), `KINSIGHT_BIN` (the `kinsight` binary of this
//! build), `ORT_DYLIB_PATH` (else `./.venv`'s ONNX Runtime).

mod common;
use kinsight::testbed::api_metrics;
#[path = "../tests/common/dev_process.rs"]
mod dev_process;

use common::{Envelope, cpu_reading, ms, percentile, print_api_requests, print_cpu_use};
use dev_process::DevProcess;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::json;

const MODEL: &str = "quality_grade";
const API_KEY: &str = "bench-pipeline-key";
/// Distinct images served (the URLs differ per image; the bytes repeat).
const VARIANTS: usize = 16;

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

#[derive(Default)]
struct Received {
    /// First receipt of each image event, by (group, image).
    images: HashMap<(String, String), Instant>,
    ids: HashSet<String>,
    requests: usize,
    duplicates: usize,
    group_events: usize,
    /// Image events that say the image failed (a healthy run has none).
    failed: usize,
    last_group_event: Option<Instant>,
    last_image_event: Option<Instant>,
    /// When each group's `image_group.completed` arrived, by group id.
    completed: HashMap<String, Instant>,
}

/// The photo server's view: first and last fetch of each group's images, by the group's
/// place in the posting order (the URLs say it).
#[derive(Default)]
struct Fetches(HashMap<usize, (Instant, Instant)>);

type Shared<T> = Arc<Mutex<T>>;

async fn receive(
    State(received): State<Shared<Received>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Ok(event) = serde_json::from_slice::<Envelope>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut r = received.lock().expect("receiver state");
    r.requests += 1;
    if !r.ids.insert(id) {
        r.duplicates += 1;
        return StatusCode::NO_CONTENT;
    }
    match (
        event.kind.as_str(),
        event.data.group_id,
        event.data.image_id,
    ) {
        ("image.completed" | "image.failed", Some(group), Some(image)) => {
            if event.kind == "image.failed" {
                r.failed += 1;
            }
            r.images.entry((group, image)).or_insert(at);
            r.last_image_event = Some(at);
        }
        ("image_group.completed", group, _) => {
            r.group_events += 1;
            r.last_group_event = Some(at);
            if let Some(group) = group {
                r.completed.entry(group).or_insert(at);
            }
        }
        _ => {}
    }
    StatusCode::NO_CONTENT
}

/// Small PNGs of a few grey levels: decoding them costs little, as the model does.
fn photos() -> Vec<Vec<u8>> {
    (0..VARIANTS)
        .map(|v| {
            let grey = u8::try_from(v * 255 / (VARIANTS - 1)).unwrap_or(u8::MAX);
            let image = image::RgbImage::from_pixel(32, 32, image::Rgb([grey, grey, grey]));
            let mut png = std::io::Cursor::new(Vec::new());
            image
                .write_to(&mut png, image::ImageFormat::Png)
                .expect("encode PNG");
            png.into_inner()
        })
        .collect()
}

type Photos = (Vec<Vec<u8>>, Shared<Fetches>);

async fn serve_photo(
    State(photos): State<Arc<Photos>>,
    Path(name): Path<String>,
) -> impl IntoResponse {
    let at = Instant::now();
    let (photos, fetches) = &*photos;
    // `g{group}-{image}.png`
    let mut parts = name
        .trim_end_matches(".png")
        .trim_start_matches('g')
        .split('-');
    let group: usize = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    let n: usize = parts.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    if let Ok(mut f) = fetches.lock() {
        f.0.entry(group)
            .and_modify(|(_, last)| *last = at)
            .or_insert((at, at));
    }
    (
        [(header::CONTENT_TYPE, "image/png")],
        photos[n % photos.len()].clone(),
    )
}

async fn serve(app: Router, ip: std::net::IpAddr) -> String {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

fn main() {
    if common::started_by_cargo_bench("pipeline") {
        common::block_on(run());
    }
}

async fn run() {
    let groups: usize = setting("GROUP_COUNT", 20);
    let post_every = Some(Duration::from_millis(setting("POST_EVERY_MS", 0_u64)))
        .filter(|every| !every.is_zero());
    let images: usize = setting("IMAGES", 1000).min(1000);
    let max = Duration::from_secs(setting("MAX_SECS", 900));
    let binary = std::env::var("KINSIGHT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_kinsight")));
    let state = tempfile::tempdir().expect("state dir");

    let received: Shared<Received> = Shared::default();
    let fetches: Shared<Fetches> = Shared::default();
    let hook = serve(
        Router::new()
            .route("/hook", post(receive))
            .with_state(received.clone()),
        std::net::Ipv4Addr::LOCALHOST.into(),
    )
    .await;

    let setup_started = Instant::now();
    let dev = DevProcess::start(
        &binary,
        state.path(),
        API_KEY,
        Duration::from_secs(300),
        |dev| {
            dev.arg("--catalog")
                .arg(repo("models/test/catalog.yaml"))
                .args(
                    std::env::var("DEV_ARGS")
                        .unwrap_or_default()
                        .split_whitespace(),
                )
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or("warn".into()),
                );
            if std::env::var_os("ORT_DYLIB_PATH").is_none()
                && let Some(ort) = kinsight::inference::default_runtime_path()
            {
                dev.env("ORT_DYLIB_PATH", ort);
            }
        },
    )
    .await
    .unwrap_or_else(|log| panic!("{log}"));
    let api = dev.api_url.clone();
    let http = reqwest::Client::new();
    eprintln!(
        "kinsight dev ready in {:.1} s; posting {groups} groups x {images} images",
        setup_started.elapsed().as_secs_f64()
    );
    // Where the worker pods reach this machine (the bridge exists once the node is up).
    let pod_address = kinsight::testbed::node::HOST_ADDRESS.into();
    let photo_host = serve(
        Router::new()
            .route("/img/{name}", get(serve_photo))
            .with_state(Arc::new((photos(), fetches.clone()))),
        pod_address,
    )
    .await;

    // The API server's own counts, read through `kinsight dev`'s kubeconfig.
    let options = kube::config::KubeConfigOptions::default();
    let kube = match kube::config::Kubeconfig::read_from(dev.state_dir.join("kubeconfig")) {
        Ok(k) => kube::Config::from_custom_kubeconfig(k, &options)
            .await
            .ok()
            .and_then(|c| kube::Client::try_from(c).ok()),
        Err(_) => None,
    };
    // Every group is posted at once: the dev tenant's in-flight cap (10,000 images by
    // default) is raised to the whole run in its key Secret, as an operator would, so that
    // the run measures the pipeline rather than admission control.
    let kube = kube.expect("kinsight dev's kubeconfig");
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(kube.clone(), kinsight::dev::KEYS_NAMESPACE);
    secrets
        .patch(
            &format!("tenant-{}", kinsight::dev::DEV_TENANT),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({
                "stringData": { kinsight::api::IN_FLIGHT_LIMIT_FIELD: (groups * images).to_string() }
            })),
        )
        .await
        .expect("the dev tenant's in-flight cap raised");
    // The API's key watch applies it within moments.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kube = Some(kube);
    let api_before = match &kube {
        Some(client) => api_metrics(client).await,
        None => None,
    };

    let cpu_before = cpu_reading();
    let started = Instant::now();
    let mut posted: HashMap<String, Instant> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    for g in 0..groups {
        // Paced (open loop): group g goes at g x POST_EVERY_MS, whatever came back before,
        // so the latency is the pipeline's at that offered load, not a backlog's wait.
        if let Some(due) = post_every.map(|every| started + every * g as u32) {
            tokio::time::sleep_until(due.into()).await;
        }
        let list: Vec<_> = (0..images)
            .map(|i| json!({ "id": format!("i{i}"), "url": format!("{photo_host}/img/g{g}-{i}.png") }))
            .collect();
        let at = Instant::now();
        let response = http
            .post(format!("{api}/v1/image-groups"))
            .bearer_auth(API_KEY)
            .json(
                &json!({ "images": list, "models": [MODEL], "webhookUrl": format!("{hook}/hook") }),
            )
            .send()
            .await
            .expect("POST a group");
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        assert_eq!(status, 202, "POST /v1/image-groups: {body}");
        let id = body["id"].as_str().expect("an id").to_owned();
        order.push(id.clone());
        posted.insert(id, at);
    }
    let posting = started.elapsed();

    let expected = groups * images;
    let mut last_report = Instant::now();
    loop {
        let (events, group_events) = {
            let r = received.lock().expect("received");
            (r.images.len(), r.group_events)
        };
        if events >= expected && group_events >= groups {
            break;
        }
        if started.elapsed() > max {
            eprintln!("stopped after {max:?}: {events} of {expected} image events");
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "{:.0} s: {events}/{expected} image events, {group_events}/{groups} groups complete",
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let api_after = match &kube {
        Some(client) => api_metrics(client).await,
        None => None,
    };
    let (cpu_after, measured) = (cpu_reading(), started.elapsed());
    // A moment for duplicates (a retry of something already received) to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (log_path, pod_logs) = (dev.log.clone(), dev.state_dir.join("pod-logs"));
    if !dev.stop().await {
        eprintln!("kinsight dev did not stop cleanly within 60 s of SIGTERM");
    }

    let r = received.lock().expect("received");
    let mut latencies: Vec<Duration> = r
        .images
        .iter()
        .filter_map(|((group, _), at)| posted.get(group).map(|p| at.saturating_duration_since(*p)))
        .collect();
    latencies.sort_unstable();
    let span = r
        .last_image_event
        .map(|t| t.saturating_duration_since(started))
        .unwrap_or_default();
    let rate = r.images.len() as f64 / span.as_secs_f64().max(1e-9);
    println!();
    println!("pipeline through `kinsight dev`: {groups} groups x {images} images, model {MODEL}");
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| image events received (of them image.failed) | {} of {expected} ({}) |",
        r.images.len(),
        r.failed
    );
    println!("| image events/s (first POST -> last image event) | {rate:.1} |");
    println!("| posting the {groups} groups took | {} |", ms(posting));
    if let Some(every) = post_every {
        println!(
            "| offered load (one group every {}) | {:.1} image events/s |",
            ms(every),
            images as f64 / every.as_secs_f64()
        );
    }
    println!(
        "| latency POST -> event p50 | {} |",
        ms(percentile(&latencies, 50.0))
    );
    println!("| latency p90 | {} |", ms(percentile(&latencies, 90.0)));
    println!("| latency p99 | {} |", ms(percentile(&latencies, 99.0)));
    println!(
        "| latency max | {} |",
        ms(latencies.last().copied().unwrap_or_default())
    );
    println!(
        "| last image_group.completed after the first POST | {} ({} of {groups}) |",
        ms(r.last_group_event
            .map(|t| t.saturating_duration_since(started))
            .unwrap_or_default()),
        r.group_events
    );
    println!(
        "| webhook requests / duplicates | {} / {} |",
        r.requests, r.duplicates
    );
    print_timeline(&r, &fetches, &order, &posted, started);
    if let (Some(before), Some(after)) = (api_before, api_after) {
        print_api_requests(&before, &after);
    }
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        print_cpu_use(&before, &after, measured.as_secs_f64());
    }
    if let Ok(keep) = std::env::var("KEEP_LOG") {
        match std::fs::copy(&log_path, &keep) {
            Ok(_) => eprintln!("kinsight dev's log kept at {keep}"),
            Err(e) => eprintln!("keeping the log at {keep}: {e}"),
        }
        // The workers' logs beside it (`{KEEP_LOG}.pods/`), as dev kept them when it stopped.
        let pods = PathBuf::from(format!("{keep}.pods"));
        if std::fs::create_dir_all(&pods).is_ok()
            && let Ok(logs) = std::fs::read_dir(&pod_logs)
        {
            for log in logs.flatten() {
                let _ = std::fs::copy(log.path(), pods.join(log.file_name()));
            }
        }
    }
}

/// Per group, the times after its own POST: the worker's first and last photo fetch, the
/// first and last image event, the group event. A slow group shows where it waited (before
/// its worker fetched, while fetching, or after).
fn print_timeline(
    r: &Received,
    fetches: &Shared<Fetches>,
    order: &[String],
    posted: &HashMap<String, Instant>,
    started: Instant,
) {
    let fetches = fetches.lock().expect("fetches");
    let mut events: HashMap<&str, (Instant, Instant)> = HashMap::new();
    for ((group, _), at) in &r.images {
        events
            .entry(group.as_str())
            .and_modify(|(first, last)| {
                *first = (*first).min(*at);
                *last = (*last).max(*at);
            })
            .or_insert((*at, *at));
    }
    let after = |t: Option<Instant>, from: Instant| {
        t.map_or("-".to_owned(), |t| ms(t.saturating_duration_since(from)))
    };
    println!();
    println!("per group, after its POST (the POST itself after the first one):");
    println!(
        "| group | POST at | first fetch | last fetch | first event | last event | completed |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (g, id) in order.iter().enumerate() {
        let Some(&at) = posted.get(id) else { continue };
        let fetch = fetches.0.get(&g);
        let event = events.get(id.as_str());
        println!(
            "| {g} | {} | {} | {} | {} | {} | {} |",
            ms(at.saturating_duration_since(started)),
            after(fetch.map(|f| f.0), at),
            after(fetch.map(|f| f.1), at),
            after(event.map(|e| e.0), at),
            after(event.map(|e| e.1), at),
            after(r.completed.get(id).copied(), at),
        );
    }
}
