//! Exporting spans over OTLP/HTTP (protobuf), off unless the standard OpenTelemetry
//! variables ask for it: `OTEL_TRACES_EXPORTER=otlp`, or an endpoint
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) with
//! `OTEL_TRACES_EXPORTER` not `none`. `OTEL_SERVICE_NAME` names the service (default
//! `kinsight-<command>`). `OTEL_EXPORTER_OTLP_PROTOCOL` (or `..._TRACES_PROTOCOL`) picks
//! `http/protobuf` (the default) or `http/json`; gRPC is not built. Spans leave in batches from a thread of the SDK's, so exporting
//! never holds up a request; a collector that is down loses spans, nothing else.

use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::TraceParent;

/// Whether the environment (read by `var`) asks for spans to be exported.
pub fn wanted(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    match var("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase()) {
        Some(exporter) if exporter == "none" => false,
        Some(exporter) if exporter.split(',').any(|e| e.trim() == "otlp") => true,
        _ => set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    }
}

/// The span exporter the environment asks for, if any. Shut it down (off the async
/// runtime: it blocks) before the process exits, so the last spans leave.
pub fn from_env(service: &str) -> Result<Option<SdkTracerProvider>, String> {
    if !wanted(|name| std::env::var(name).ok()) {
        return Ok(None);
    }
    provider(service, None).map(Some)
}

/// An exporter to `endpoint` (the URL spans are POSTed to, `.../v1/traces`), or where the
/// environment says when `None`.
pub fn provider(service: &str, endpoint: Option<&str>) -> Result<SdkTracerProvider, String> {
    // Its HTTP client is reqwest with rustls: the provider must be chosen first.
    crate::install_crypto_provider();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    // The library reads the protocol variables itself; unset, it would default to JSON
    // (with both encodings built), where the spec's default is protobuf.
    match protocol_asked(|name| std::env::var(name).ok())? {
        Some(_) => {}
        None => exporter = exporter.with_protocol(opentelemetry_otlp::Protocol::HttpBinary),
    }
    if let Some(endpoint) = endpoint {
        exporter = exporter.with_endpoint(endpoint);
    }
    let exporter = exporter
        .build()
        .map_err(|e| format!("the OTLP span exporter: {e}"))?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The OTLP protocol the environment (read by `var`) asks for, if any: `http/protobuf` or
/// `http/json`; anything else (`grpc` included: not built) is an error that names it.
pub fn protocol_asked(var: impl Fn(&str) -> Option<String>) -> Result<Option<String>, String> {
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        let Some(value) = var(name).map(|v| v.trim().to_ascii_lowercase()) else {
            continue;
        };
        if value.is_empty() {
            continue;
        }
        return match value.as_str() {
            "http/protobuf" | "http/json" => Ok(Some(value)),
            _ => Err(format!(
                "{name}={value}: spans are exported over http/protobuf or http/json"
            )),
        };
    }
    Ok(None)
}

/// The layer that turns `tracing` spans into exported ones.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("kinsight"))
}

/// Makes `span` a child of `parent` (a root when `None`) in the exported trace; returns
/// the span's own trace context, or `None` when spans are not exported (or `span` is
/// filtered out).
pub(super) fn join(span: &tracing::Span, parent: Option<&TraceParent>) -> Option<TraceParent> {
    if let Some(parent) = parent {
        let remote = SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.span_id),
            TraceFlags::new(parent.flags),
            true,
            TraceState::default(),
        );
        span.set_parent(Context::new().with_remote_span_context(remote))
            .ok()?;
    }
    own_context(span)
}

/// The current span's trace context, when spans are exported.
pub(super) fn current() -> Option<TraceParent> {
    own_context(&tracing::Span::current())
}

fn own_context(span: &tracing::Span) -> Option<TraceParent> {
    let context = span.context();
    let own = context.span().span_context().clone();
    own.is_valid().then(|| TraceParent {
        trace_id: own.trace_id().to_bytes(),
        span_id: own.span_id().to_bytes(),
        flags: own.trace_flags().to_u8(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn export_is_off_unless_the_environment_asks() {
        assert!(!wanted(env(&[])));
        assert!(!wanted(env(&[("OTEL_SERVICE_NAME", "x")])));
        assert!(!wanted(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
        assert!(wanted(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector:4318"
        )])));
        assert!(wanted(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://collector:4318/v1/traces"
        )])));
        assert!(wanted(env(&[("OTEL_TRACES_EXPORTER", "otlp")])));
        assert!(!wanted(env(&[
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
        ])));
    }

    #[test]
    fn the_protocol_is_protobuf_or_json_and_anything_else_is_named() {
        assert_eq!(protocol_asked(env(&[])), Ok(None));
        assert_eq!(
            protocol_asked(env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "HTTP/JSON")])),
            Ok(Some("http/json".to_owned()))
        );
        // The traces' own variable wins.
        assert_eq!(
            protocol_asked(env(&[
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ])),
            Ok(Some("http/protobuf".to_owned()))
        );
        let grpc = protocol_asked(env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]));
        assert!(
            grpc.as_ref()
                .is_err_and(|e| e.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc")),
            "{grpc:?}"
        );
    }
}
