//! What the benchmarks share: the webhook envelope they read and their figures.

#![allow(dead_code)]

use std::time::Duration;

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
