//! What the two binaries share: `kinsight` (the product, in the image) and `kinsight-dev`
//! (the testbed's commands, for source builds): argument groups and the log set-up.

use clap::Args;
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::controller::JobCaps;

/// Fair scheduling of worker Jobs; unset: the command's defaults.
#[derive(Args, Clone, Debug, Default)]
pub struct JobCapsArgs {
    /// Worker Jobs running at once in all namespaces (0: no cap). Groups past it wait in
    /// line, tenants taking turns (`Scheduled=False`, reason `QueuedBehind`).
    #[arg(long, env = "KINSIGHT_MAX_WORKER_JOBS")]
    pub max_worker_jobs: Option<usize>,
    /// Worker Jobs of one namespace (tenant) running at once (0: no cap).
    #[arg(long, env = "KINSIGHT_MAX_WORKER_JOBS_PER_NAMESPACE")]
    pub max_worker_jobs_per_namespace: Option<usize>,
    /// A group (or update) with at most this many images to process is small work: it may
    /// start in the small-work lane when the caps are full.
    #[arg(long, env = "KINSIGHT_SMALL_WORK_IMAGES")]
    pub small_work_images: Option<usize>,
    /// Small Jobs that may run beyond the caps, in all (one per namespace at a time; 0: no
    /// lane).
    #[arg(long, env = "KINSIGHT_SMALL_WORK_LANE_JOBS")]
    pub small_work_lane_jobs: Option<usize>,
}

impl JobCapsArgs {
    /// The caps given, the rest from `defaults`.
    pub fn or(&self, defaults: JobCaps) -> JobCaps {
        JobCaps {
            max_jobs: self.max_worker_jobs.unwrap_or(defaults.max_jobs),
            max_jobs_per_tenant: self
                .max_worker_jobs_per_namespace
                .unwrap_or(defaults.max_jobs_per_tenant),
            small_images: self.small_work_images.unwrap_or(defaults.small_images),
            small_lane_jobs: self
                .small_work_lane_jobs
                .unwrap_or(defaults.small_lane_jobs),
        }
    }
}

/// A `NAME=VALUE` argument.
pub fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))
}

/// A Kubernetes resource quantity such as `500m`, `2`, `1.5`, `512Mi` or `1G` (a plain
/// decimal with an optional SI or binary suffix; the API server would refuse anything else,
/// on every Job).
pub fn parse_quantity(text: &str) -> Result<String, String> {
    quantity_value(text).map(|_| text.to_owned())
}

/// A positive Kubernetes quantity's value in its unit (`500m` is 0.5, `1Ki` 1024).
pub fn quantity_value(text: &str) -> Result<f64, String> {
    const SUFFIXES: [(&str, f64); 14] = [
        ("", 1.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
    ];
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    // Digits and dots only, so this refuses "", ".", "1.2.3", and never sees "inf".
    let number = number.parse::<f64>().ok().filter(|n| *n > 0.0);
    let scale = SUFFIXES.iter().find(|(s, _)| *s == suffix).map(|(_, f)| *f);
    match (number, scale) {
        (Some(number), Some(scale)) => Ok(number * scale),
        _ => Err(format!(
            "expected a positive Kubernetes quantity such as 500m, 2, 512Mi or 1Gi, got {text:?}"
        )),
    }
}

/// A worker pod's CPU request may not pass its limit (the API server would refuse every
/// Job); checked when the process starts.
pub fn check_cpu_request(request: &str, limit: &str) -> Result<(), String> {
    if quantity_value(request)? > quantity_value(limit)? {
        return Err(format!(
            "the worker CPU request {request} is more than its limit {limit} (--worker-cpu)"
        ));
    }
    Ok(())
}

/// The process's exit status, the error (if any) printed to stderr.
pub fn exit_code(outcome: anyhow::Result<()>) -> std::process::ExitCode {
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (`RUST_LOG`, default info) and, when the OpenTelemetry variables ask for
/// it, spans to an OTLP collector as `service`. Call [`Logging::finish`] before exiting.
pub fn init_logging(service: &str) -> Logging {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let (exporter, export_error) = match crate::trace::export::from_env(service) {
        Ok(exporter) => (exporter, None),
        Err(e) => (None, Some(e)),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // ONNX Runtime logs every arena extension at info; its warnings stay.
                tracing_subscriber::EnvFilter::new("info,kube=warn,tower=warn,ort=warn")
            }),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Pod logs are files: no colour codes around the fields people grep for.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(exporter.as_ref().map(crate::trace::export::layer))
        .init();
    if let Some(e) = export_error {
        tracing::warn!(error = %e, "spans are not exported");
    }
    Logging { exporter }
}

/// The log set-up's span exporter, if any.
pub struct Logging {
    exporter: Option<SdkTracerProvider>,
}

impl Logging {
    /// Sends the last spans (a worker's end with it) before the process exits.
    pub async fn finish(self) {
        if let Some(exporter) = self.exporter {
            let flushed = tokio::task::spawn_blocking(move || exporter.shutdown()).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(error = %e, "exporting the last spans");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_kubernetes_takes_pass_and_others_are_refused() {
        for good in ["1", "500m", "1.5", "512Mi", "1Gi", "2G", "0.25"] {
            assert_eq!(parse_quantity(good).as_deref(), Ok(good), "{good}");
        }
        for bad in [
            "", "0", "-1", "1 Gi", "1gb", "m", "1.2.3", "Gi", "1e3x", "0m",
        ] {
            let error = parse_quantity(bad).expect_err(bad);
            assert!(error.contains("Kubernetes quantity"), "{bad}: {error}");
        }
        assert_eq!(quantity_value("500m"), Ok(0.5));
        assert_eq!(quantity_value("2Ki"), Ok(2048.0));
    }

    #[test]
    fn a_cpu_request_above_its_limit_is_refused() {
        assert_eq!(check_cpu_request("500m", "1"), Ok(()));
        assert_eq!(check_cpu_request("1", "1000m"), Ok(()));
        let error = check_cpu_request("1.5", "1").expect_err("above");
        assert!(error.contains("more than its limit 1"), "{error}");
        assert!(check_cpu_request("x", "1").is_err());
    }
}
