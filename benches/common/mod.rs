//! What the benchmarks share: the webhook envelope they read, their figures and the API server's request counts.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use kinsight::testbed::{ApiKey, ApiStats};
use serde::Deserialize;

/// The parts of a received webhook the benchmarks count by.
#[derive(Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: EventData,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventData {
    pub group_id: Option<String>,
    pub image_id: Option<String>,
}

/// Whether `cargo bench` started this benchmark (`--bench`). `cargo test --all-targets`
/// builds and runs bench targets too, without it; these take minutes and a control plane,
/// so they only say how to run them.
pub fn started_by_cargo_bench(name: &str) -> bool {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        println!("{name}: a benchmark; run it with `cargo bench --bench {name}`");
    }
    bench
}

/// Runs a benchmark on two runtime threads (the machines it is measured on have two cores).
pub fn block_on(run: impl std::future::Future<Output = ()>) {
    kinsight::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run);
}

/// The `p`th percentile of sorted durations (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// The API server's requests between two readings of its metrics, by time spent (watches
/// excluded from time), as a table.
pub fn print_api_requests(before: &ApiStats, after: &ApiStats) {
    let mut rows: Vec<(ApiKey, (f64, f64, f64))> = after
        .iter()
        .map(|(k, a)| {
            let b = before.get(k).copied().unwrap_or_default();
            // A watch's "duration" is how long it stayed open, not work.
            let seconds = if k.0 == "WATCH" { 0.0 } else { a.1 - b.1 };
            (k.clone(), (a.0 - b.0, seconds, a.2 - b.2))
        })
        .filter(|(_, d)| d.0 >= 1.0)
        .collect();
    rows.sort_by(|a, b| (b.1).1.total_cmp(&(a.1).1));
    println!();
    println!(
        "API server requests during the measured part (by time spent; watches excluded from time):"
    );
    println!("| verb | resource (scope) | requests | seconds | mean ms | MiB returned |");
    println!("|---|---|---|---|---|---|");
    for ((verb, resource), (count, seconds, bytes)) in rows.iter().take(16) {
        println!(
            "| {verb} | {resource} | {count:.0} | {seconds:.1} | {:.0} | {:.1} |",
            seconds * 1000.0 / count,
            bytes / 1_048_576.0
        );
    }
    // The rest in one row, so that the table's sums are the API server's.
    let rest = rows.iter().skip(16).fold((0.0, 0.0, 0.0), |acc, (_, d)| {
        (acc.0 + d.0, acc.1 + d.1, acc.2 + d.2)
    });
    if rest.0 > 0.0 {
        println!(
            "| | {} others | {:.0} | {:.1} | {:.0} | {:.1} |",
            rows.len() - 16,
            rest.0,
            rest.1,
            rest.1 * 1000.0 / rest.0,
            rest.2 / 1_048_576.0
        );
    }
    let total = rows
        .iter()
        .fold((0.0, 0.0), |acc, (_, d)| (acc.0 + d.0, acc.1 + d.1));
    println!("| | all | {:.0} | {:.1} | | |", total.0, total.1);
    let writes: f64 = rows
        .iter()
        .filter(|((verb, _), _)| {
            matches!(verb.as_str(), "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE")
        })
        .map(|(_, d)| d.0)
        .sum();
    println!("| | of them writes | {writes:.0} | | | |");
}

/// CPU seconds used so far: the machine's busy time, and each live process's by name.
pub struct CpuReading {
    busy: f64,
    /// pid -> (name, CPU seconds).
    processes: BTreeMap<u32, (String, f64)>,
}

/// Reads `/proc` (Linux): what a run's processes cost the cores, without a profiler.
pub fn cpu_reading() -> Option<CpuReading> {
    // Kernel clock ticks per second: 100 on every Linux this runs on (USER_HZ).
    const TICKS: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    let busy = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum::<f64>()
        / TICKS;
    let mut processes = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else {
            continue;
        };
        let name = text[open + 1..close].to_owned();
        let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line: 12 and 13 after the comm.
        let (Some(user), Some(system)) = (
            rest.get(11).and_then(|v| v.parse::<f64>().ok()),
            rest.get(12).and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        processes.insert(pid, (name, (user + system) / TICKS));
    }
    Some(CpuReading { busy, processes })
}

/// Where the cores' time went between two readings, by process name (processes born
/// since count whole; those gone since, such as worker pods, are the busy time left).
pub fn print_cpu_use(before: &CpuReading, after: &CpuReading, seconds: f64) {
    let mut by_name: BTreeMap<&str, f64> = BTreeMap::new();
    for (pid, (name, used)) in &after.processes {
        let earlier = before
            .processes
            .get(pid)
            .filter(|(n, _)| n == name)
            .map_or(0.0, |(_, u)| *u);
        // A kernel worker's name says what it runs at the moment: one row for them all.
        let name = if name.starts_with("kworker/") {
            "kworker (kernel)"
        } else {
            name.as_str()
        };
        *by_name.entry(name).or_default() += used - earlier;
    }
    let busy = after.busy - before.busy;
    let live: f64 = by_name.values().sum();
    let mut rows: Vec<(&str, f64)> = by_name.into_iter().filter(|(_, s)| *s >= 0.05).collect();
    rows.push((
        "(processes that ended: worker pods, ...)",
        (busy - live).max(0.0),
    ));
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!();
    println!(
        "CPU time during the measured part ({seconds:.1} s; {busy:.1} CPU s busy of {:.1}):",
        seconds * std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
    );
    println!("| process | CPU s | share of busy |");
    println!("|---|---|---|");
    for (name, used) in rows.iter().take(14) {
        println!(
            "| {name} | {used:.1} | {:.0}% |",
            100.0 * used / busy.max(1e-9)
        );
    }
}
