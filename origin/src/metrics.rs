//! The origin's Prometheus metrics (`GET /metrics`): requests by route and
//! status, latency by route, the database pool, and the change-log head.

use std::sync::LazyLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry,
};

use crate::state::AppState;

struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    pool_size: Gauge,
    pool_idle: Gauge,
    changelog_head: Gauge,
    domain_checks: IntCounterVec,
    domain_claims: GaugeVec,
    acme_orders: IntCounterVec,
    acme_refusals: IntCounterVec,
    acme_paused_stores: Gauge,
    tls_refused: IntCounterVec,
    tls_accepted: IntCounterVec,
}

static METRICS: LazyLock<Option<Metrics>> = LazyLock::new(|| {
    let registry = Registry::new_custom(Some("edgefront_origin".into()), None).ok()?;
    let requests = IntCounterVec::new(
        Opts::new("requests_total", "Requests by route and status"),
        &["route", "status"],
    )
    .ok()?;
    let latency = HistogramVec::new(
        HistogramOpts::new("request_duration_seconds", "Time to respond, by route").buckets(vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]),
        &["route"],
    )
    .ok()?;
    let pool_size = Gauge::new("db_pool_connections", "Open connections to the primary").ok()?;
    let pool_idle = Gauge::new(
        "db_pool_idle_connections",
        "Idle connections to the primary",
    )
    .ok()?;
    let changelog_head = Gauge::new(
        "changelog_head_seq",
        "Newest change-log sequence number written",
    )
    .ok()?;
    let domain_checks = IntCounterVec::new(
        Opts::new(
            "domain_checks_total",
            "Ownership checks of custom-domain claims, by outcome",
        ),
        &["outcome"],
    )
    .ok()?;
    let domain_claims = GaugeVec::new(
        Opts::new("domain_claims", "Custom-domain claims by state"),
        &["state"],
    )
    .ok()?;
    let acme_orders = IntCounterVec::new(
        Opts::new(
            "acme_orders_total",
            "ACME orders admitted by the budgets, and how they ended",
        ),
        &["outcome"],
    )
    .ok()?;
    let acme_refusals = IntCounterVec::new(
        Opts::new(
            "acme_refusals_total",
            "ACME orders refused before reaching the CA, by budget",
        ),
        &["budget"],
    )
    .ok()?;
    let acme_paused_stores = Gauge::new(
        "acme_paused_stores",
        "Stores whose certificate orders are paused after repeated failures",
    )
    .ok()?;
    let tls_refused = IntCounterVec::new(
        Opts::new(
            "tls_handshakes_refused_total",
            "TLS handshakes refused (no or foreign client certificate, plaintext, timeout), by listener",
        ),
        &["listener"],
    )
    .ok()?;
    registry.register(Box::new(tls_refused.clone())).ok()?;
    let tls_accepted = IntCounterVec::new(
        Opts::new(
            "tls_connections_total",
            "TLS connections accepted (handshake done), by listener: with keep-alive, far fewer than requests",
        ),
        &["listener"],
    )
    .ok()?;
    registry.register(Box::new(tls_accepted.clone())).ok()?;
    registry.register(Box::new(acme_orders.clone())).ok()?;
    registry.register(Box::new(acme_refusals.clone())).ok()?;
    registry
        .register(Box::new(acme_paused_stores.clone()))
        .ok()?;
    registry.register(Box::new(domain_checks.clone())).ok()?;
    registry.register(Box::new(domain_claims.clone())).ok()?;
    registry.register(Box::new(requests.clone())).ok()?;
    registry.register(Box::new(latency.clone())).ok()?;
    for g in [&pool_size, &pool_idle, &changelog_head] {
        registry.register(Box::new(g.clone())).ok()?;
    }
    // Which release runs: always 1.
    let build_info = prometheus::Gauge::with_opts(
        Opts::new("build_info", "The running origin release (always 1)")
            .const_label("component", "origin")
            .const_label("version", env!("CARGO_PKG_VERSION")),
    )
    .ok()?;
    build_info.set(1.0);
    registry.register(Box::new(build_info)).ok()?;
    Some(Metrics {
        registry,
        requests,
        latency,
        pool_size,
        pool_idle,
        changelog_head,
        domain_checks,
        domain_claims,
        acme_orders,
        acme_refusals,
        acme_paused_stores,
        tls_refused,
        tls_accepted,
    })
});

/// Counts and times every routed request (label: the route pattern).
pub async fn record(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let t0 = Instant::now();
    let resp = next.run(req).await;
    if let Some(m) = METRICS.as_ref() {
        m.requests
            .with_label_values(&[&route, resp.status().as_str()])
            .inc();
        m.latency
            .with_label_values(&[&route])
            .observe(t0.elapsed().as_secs_f64());
    }
    resp
}

/// Counts one ownership check by its outcome.
pub fn domain_checked(outcome: &str) {
    if let Some(m) = METRICS.as_ref() {
        m.domain_checks.with_label_values(&[outcome]).inc();
    }
}

/// Counts an admitted ACME order or how one ended.
pub fn acme_order(outcome: &str) {
    if let Some(m) = METRICS.as_ref() {
        m.acme_orders.with_label_values(&[outcome]).inc();
    }
}

/// Counts a TLS connection accepted on `listener`.
pub fn tls_accepted(listener: &str) {
    if let Some(m) = METRICS.as_ref() {
        m.tls_accepted.with_label_values(&[listener]).inc();
    }
}

/// Counts a TLS handshake refused on `listener`.
pub fn tls_refused(listener: &str) {
    if let Some(m) = METRICS.as_ref() {
        m.tls_refused.with_label_values(&[listener]).inc();
    }
}

/// Counts an ACME order refused by `budget`.
pub fn acme_refused(budget: &str) {
    if let Some(m) = METRICS.as_ref() {
        m.acme_refusals.with_label_values(&[budget]).inc();
    }
}

/// `GET /metrics`.
pub async fn exposition(State(state): State<AppState>) -> Response {
    let Some(m) = METRICS.as_ref() else {
        return (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "metrics unavailable\n",
        )
            .into_response();
    };
    m.pool_size.set(f64::from(state.pool.size()));
    m.pool_idle.set(state.pool.num_idle() as f64);
    if let Ok(Some(seq)) = sqlx::query_scalar::<_, Option<i64>>("SELECT max(seq) FROM change_log")
        .fetch_one(&state.pool)
        .await
    {
        m.changelog_head.set(seq as f64);
    }
    if let Ok(rows) = sqlx::query_as::<_, (String, i64)>(
        "SELECT s, (SELECT count(*) FROM domain_claims WHERE state = s)
         FROM unnest(ARRAY['pending', 'active', 'suspended']) s",
    )
    .fetch_all(&state.pool)
    .await
    {
        for (st, n) in rows {
            m.domain_claims.with_label_values(&[&st]).set(n as f64);
        }
    }
    if let Ok(n) = sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM acme_store_pauses WHERE paused_until > now()",
    )
    .fetch_one(&state.pool)
    .await
    {
        m.acme_paused_stores.set(n as f64);
    }
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&m.registry.gather(), &mut buf);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        buf,
    )
        .into_response()
}
