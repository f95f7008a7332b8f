//! One tenant's backlog and another tenant's single photo, with fair scheduling off and on,
//! side by side: `cargo bench --bench fair_scheduling` (a command, not a test;
//! `harness = false`).
//!
//! It starts the integration tests' installation (tests/common: a real control plane,
//! PostgreSQL, the controller, the REST API, and the real node whose containers run the
//! worker Jobs from the project's image, 500m CPU each, with the bundled
//! `image_classification` model) with two tenants; the controller watches every namespace. Each round:
//! tenant A posts `GROUP_COUNT` groups of `IMAGES` photos, `HEAD_START_SECS` later tenant B
//! posts one photo; it waits for every group, sampling the running worker Jobs every 100 ms.
//! Round one runs with no caps (first come, first served, as before fair scheduling), round
//! two with `kinsight dev`'s caps ([`kinsight::dev::DEV_JOB_CAPS`]: A may take 2 of 3 slots),
//! rounds three and four with caps A alone may fill (2 in all, 2 per namespace), without and
//! with the small-work lane.
//!
//! Printed per round: B's wait from its POST to its photo's `image.completed`, how many of
//! A's groups were still unfinished then, A's backlog time (first POST to last
//! `image_group.completed`), and the most Jobs seen running at once.
//!
//! Settings (environment): `GROUP_COUNT` (8), `IMAGES` (60), `HEAD_START_SECS` (2),
//! `ORT_DYLIB_PATH` (as for the tests).

mod common;
#[path = "../tests/common/mod.rs"]
mod harness;

use std::time::Duration;

use harness::Harness;
use harness::fairness::{Backlog, BacklogRun, add_tenant, backlog_then_one_photo};
use kinsight::controller::JobCaps;

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if common::started_by_cargo_bench("fair_scheduling") {
        common::block_on(harness::real_node::on_shared_stack(run()));
    }
}

async fn run() {
    let backlog = Backlog {
        groups: setting("GROUP_COUNT", 8),
        images: setting("IMAGES", 60),
        head_start: Duration::from_secs(setting("HEAD_START_SECS", 2)),
    };
    let limit = Duration::from_secs(900);
    let mut h = Harness::start_configured("tenant-a", |c| {
        c.job_caps = JobCaps::OFF;
        c.watch_namespace = None;
    })
    .await;
    let b_key = add_tenant(&h, "tenant-b").await;
    // The first worker starts cold (model files, ONNX Runtime); warm up outside the rounds.
    let warm_up = Backlog {
        groups: 1,
        images: 1,
        head_start: Duration::ZERO,
    };
    backlog_then_one_photo(&mut h, ("tenant-b", &b_key), warm_up, limit).await;

    let mut rounds = Vec::new();
    // A may fill every slot: B's photo gets one only through the lane.
    let full = JobCaps {
        max_jobs: 2,
        max_jobs_per_tenant: 2,
        small_images: 10,
        small_lane_jobs: 1,
    };
    for (name, caps) in [
        ("no caps (first come, first served)", JobCaps::OFF),
        ("kinsight dev's caps", kinsight::dev::DEV_JOB_CAPS),
        (
            "A may fill the caps, no lane",
            JobCaps {
                small_lane_jobs: 0,
                ..full
            },
        ),
        ("A may fill the caps, lane of 1", full),
    ] {
        h.kill_controller().await;
        let mut config = h.controller_config();
        config.job_caps = caps;
        config.watch_namespace = None;
        h.start_controller_with(config);
        let run = backlog_then_one_photo(&mut h, ("tenant-b", &b_key), backlog, limit).await;
        rounds.push((name, caps, run));
    }
    print_rounds(&backlog, &rounds);
}

fn print_rounds(backlog: &Backlog, rounds: &[(&str, JobCaps, BacklogRun)]) {
    println!(
        "\nTenant A: {} groups of {} photos; {} s later tenant B: 1 photo (image_classification)\n",
        backlog.groups,
        backlog.images,
        backlog.head_start.as_secs()
    );
    println!(
        "| scheduling | caps (all / per namespace / lane) | B's photo: POST to webhook | A's groups unfinished then | A's backlog | most Jobs at once (main + lane) | B started in |"
    );
    println!("|---|---|---|---|---|---|---|");
    let cap = |n: usize| {
        if n == 0 {
            "-".to_owned()
        } else {
            n.to_string()
        }
    };
    for (name, caps, run) in rounds {
        println!(
            "| {name} | {} / {} / {} | {:.2} s | {} of {} | {:.1} s | {} + {} | {} |",
            cap(caps.max_jobs),
            cap(caps.max_jobs_per_tenant),
            cap(caps.small_lane_jobs),
            run.single_image_wait.as_secs_f64(),
            run.backlog_left,
            backlog.groups,
            run.backlog_time.as_secs_f64(),
            run.peak.main,
            run.peak.small,
            run.single_image_reason.as_deref().unwrap_or("-"),
        );
    }
}
