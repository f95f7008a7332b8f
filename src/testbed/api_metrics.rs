//! The API server's own request counters (`/metrics`), by verb and resource: what the
//! benchmarks print beside their figures, and what tests count a component's writes by.

use std::collections::BTreeMap;

/// `(verb, resource/subresource (scope))` -> (requests, seconds, response bytes) from the
/// API server's `/metrics`. Scope tells callers apart: the controller's watches are
/// cluster-wide, its reconciler's reads namespaced.
pub type ApiKey = (String, String);
pub type ApiStats = BTreeMap<ApiKey, (f64, f64, f64)>;

pub async fn api_metrics(client: &kube::Client) -> Option<ApiStats> {
    let request = http::Request::get("/metrics").body(Vec::new()).ok()?;
    let text = client.request_text(request).await.ok()?;
    let mut out = ApiStats::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((metric, labels)) = series.split_once('{') else {
            continue;
        };
        let slot = match metric {
            "apiserver_request_total" => 0,
            "apiserver_request_duration_seconds_sum" => 1,
            "apiserver_response_sizes_sum" => 2,
            _ => continue,
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches(['}', '"']).to_owned())
                .unwrap_or_default()
        };
        let resource = label("resource");
        if resource.is_empty() {
            continue;
        }
        let subresource = label("subresource");
        let key = if subresource.is_empty() {
            format!("{resource} ({})", label("scope"))
        } else {
            format!("{resource}/{subresource} ({})", label("scope"))
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let entry = out.entry((label("verb"), key)).or_default();
        match slot {
            0 => entry.0 += value,
            1 => entry.1 += value,
            _ => entry.2 += value,
        }
    }
    Some(out)
}
