//! Logs and traces for every edgefront daemon.
//!
//! [`init`] installs the `tracing` subscriber: text or JSON logs, filtered by
//! `RUST_LOG`, and — only when an OTLP endpoint is configured (off by
//! default) — an OpenTelemetry layer that exports spans over OTLP/HTTP
//! (protobuf) in batches, with `service.name` and the region as resource
//! attributes. W3C `traceparent` is the propagation format: [`extract`]
//! continues a caller's trace, [`inject`] hands ours to the next hop, so a
//! shopper's request through the edge and on to the origin is one trace.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// Flushes and shuts the exporter down when dropped (end of `main`).
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// Installs logging (and tracing export when `otlp_endpoint` is set, e.g.
/// `http://127.0.0.1:4318/v1/traces`). Call once, inside a Tokio runtime
/// when exporting (the batch exporter runs on it).
pub fn init(
    service: &str,
    region: Option<&str>,
    json_logs: bool,
    otlp_endpoint: Option<&str>,
) -> Result<Telemetry, String> {
    let _ = tracing_log::LogTracer::init();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // RUST_LOG filters the log output only: spans are exported at INFO
    // whatever the log level. Log lines need no spans (the access line
    // carries its own fields), so with tracing off no span is ever built on
    // the request path.
    use tracing_subscriber::filter::FilterExt;
    let events_only = tracing_subscriber::filter::filter_fn(|m| m.is_event());
    let fmt = if json_logs {
        tracing_subscriber::fmt::layer()
            .json()
            .with_filter(filter.and(events_only))
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_filter(filter.and(events_only))
            .boxed()
    };
    let mut provider = None;
    let otel = match otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint)
                .with_timeout(std::time::Duration::from_secs(3))
                .build()
                .map_err(|e| format!("otlp_endpoint {endpoint}: {e}"))?;
            let mut attrs = vec![opentelemetry::KeyValue::new(
                "service.name",
                service.to_owned(),
            )];
            if let Some(r) = region {
                attrs.push(opentelemetry::KeyValue::new(
                    "edgefront.region",
                    r.to_owned(),
                ));
                attrs.push(opentelemetry::KeyValue::new("cloud.region", r.to_owned()));
            }
            // Batches leave every second (the SDK's default is 5 s).
            let batch = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
                .with_batch_config(
                    opentelemetry_sdk::trace::BatchConfigBuilder::default()
                        .with_scheduled_delay(std::time::Duration::from_secs(1))
                        .build(),
                )
                .build();
            let p = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_span_processor(batch)
                .with_resource(
                    opentelemetry_sdk::Resource::builder_empty()
                        .with_attributes(attrs)
                        .build(),
                )
                .build();
            let tracer = p.tracer(service.to_owned());
            provider = Some(p);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(tracing_subscriber::filter::LevelFilter::INFO),
            )
        }
        None => None,
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // `log` records (pingora's) are bridged by the LogTracer above.
    let subscriber = tracing_subscriber::registry().with(fmt).with(otel);
    tracing::subscriber::set_global_default(subscriber).map_err(|e| format!("logging: {e}"))?;
    Ok(Telemetry { provider })
}

use tracing_subscriber::Layer as _;

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct PairInjector(Vec<(String, String)>);

impl Injector for PairInjector {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// Makes `span` continue the trace in the request's `traceparent`, if any.
pub fn extract(span: &tracing::Span, headers: &http::HeaderMap) {
    if headers.contains_key("traceparent") {
        let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(cx);
    }
}

/// The `traceparent` (and `tracestate`) headers that continue `span`'s
/// trace at the next hop; empty when nothing is traced.
pub fn inject(span: &tracing::Span) -> Vec<(String, String)> {
    let mut inj = PairInjector(Vec::new());
    TraceContextPropagator::new().inject_context(&span.context(), &mut inj);
    inj.0
}

/// The span's trace id as 32 hex digits, if it is part of a valid trace.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
