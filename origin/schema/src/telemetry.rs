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
            .with_filter(filter.and(events_only).and(FoldHandshakeErrors))
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_filter(filter.and(events_only).and(FoldHandshakeErrors))
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

/// How often one of pingora's failed-handshake lines is let through.
pub const FOLD_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// pingora's failed-handshake lines so far, and those folded away.
static HANDSHAKE_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static FOLDED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// When (unix seconds) the last such line was let through; 0: never.
static LAST_SAMPLE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many of pingora's per-connection "Downstream handshake error" lines
/// were folded away (not logged) since this process started.
pub fn folded_handshake_errors() -> u64 {
    FOLDED.load(std::sync::atomic::Ordering::Relaxed)
}

/// How many TLS handshakes pingora reported failed (logged or folded)
/// since this process started, while logging was on.
pub fn handshake_errors() -> u64 {
    HANDSHAKE_ERRORS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Folds pingora's per-connection ERROR line for a failed TLS handshake
/// (`Downstream handshake error from …`): a flood of made-up names or bad
/// ClientHellos would otherwise be a flood of log lines, and journald's rate
/// limit would then drop the daemon's other lines. One line passes per
/// [`FOLD_WINDOW`] as a sample; the rest are counted
/// ([`folded_handshake_errors`]), and the edge reports the count as a metric
/// and in one summary line per window. Every other line passes untouched.
struct FoldHandshakeErrors;

impl<S> tracing_subscriber::layer::Filter<S> for FoldHandshakeErrors {
    fn enabled(
        &self,
        _: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        true
    }

    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        use tracing_log::NormalizeEvent;
        if *event.metadata().level() != tracing::Level::ERROR {
            return true;
        }
        // pingora logs through `log`; the bridge's events name their real
        // target only in the normalized metadata.
        let normalized = event.normalized_metadata();
        let target = normalized
            .as_ref()
            .map_or(event.metadata().target(), |m| m.target());
        if !target.starts_with("pingora_core::services::listening") {
            return true;
        }
        let mut message = MessageStarts("Downstream handshake", false);
        event.record(&mut message);
        if !message.1 {
            return true;
        }
        HANDSHAKE_ERRORS.fetch_add(1, Relaxed);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = LAST_SAMPLE.load(Relaxed);
        if now.saturating_sub(last) >= FOLD_WINDOW.as_secs()
            && LAST_SAMPLE
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            return true;
        }
        FOLDED.fetch_add(1, Relaxed);
        false
    }
}

/// Whether an event's `message` starts with `.0` (set in `.1`).
struct MessageStarts(&'static str, bool);

impl tracing::field::Visit for MessageStarts {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.1 = value.starts_with(self.0);
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.1 = format!("{value:?}").starts_with(self.0);
        }
    }
}

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
