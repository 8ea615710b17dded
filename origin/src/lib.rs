//! The origin: the PostgreSQL primary's schema, the seller API and shopper writes.
//!
//! Owns every write in the system. Each write is one transaction on the
//! primary; its commit LSN is returned in [`edgefront_schema::COMMIT_LSN_HEADER`]
//! so edges can offer read-your-writes. Reads for shoppers are served by the
//! edges from their replicas, not here (the cart page is the exception: it is
//! per-shopper state that lives on the primary).

pub mod acme;
pub mod auth;
pub mod budget;
pub mod catalog;
pub mod config;
pub mod demo;
pub mod error;
pub mod input;
pub mod internal;
pub mod metrics;
pub mod ownership;
pub mod shop;
pub mod tls_listener;

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use edgefront_schema::{COMMIT_LSN_HEADER, Hostname, Lsn, StoreId};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::error::ApiError;

/// Shared state of the origin's handlers.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// `/healthz`'s own connections ([`HEALTH_CONNECTIONS`]): requests
    /// waiting for `pool` never make this origin say its database does not
    /// lead. Every edge's health check asks that question; a busy pool
    /// answering "down" made every edge refuse every write at once, and the
    /// retries that followed kept the pool busy (the origin failover drill,
    /// CI 2026-12-07).
    pub health_pool: PgPool,
    /// Stores without a custom domain are at `<slug>.<platform_domain>`.
    pub platform_domain: String,
    /// Token of the internal API; `None` disables it.
    pub internal_token: Option<String>,
    /// Seals certificate private keys; `None` disables certificate upload.
    pub sealer: Option<std::sync::Arc<edgefront_certs::Sealer>>,
    /// ACME order budgets.
    pub budgets: budget::Budgets,
    /// Management API of the DNS server of the platform zone (DNS-01 for
    /// the platform wildcard); `None` turns DNS-01 off.
    pub dns_update_url: Option<String>,
    /// Looks up custom-domain ownership proofs.
    pub verifier: std::sync::Arc<ownership::Verifier>,
}

/// Connections of [`AppState::health_pool`].
pub const HEALTH_CONNECTIONS: u32 = 2;

/// Connects to the primary with bounded waits, so an outage answers 503
/// quickly instead of hanging requests.
pub async fn connect(database_url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .idle_timeout(Duration::from_secs(60))
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET statement_timeout = '10s'")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .connect_lazy(database_url)
}

/// Applies the schema's migrations, on a connection of their own that is
/// closed when they fail: the migrator holds an advisory lock for the whole
/// run and does not release it on an error (e.g. on a standby, where the
/// first `CREATE TABLE` fails), so a pooled connection would keep it and
/// the next run would wait on it.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?;
    // `run`'s own body on this connection (`run(&mut *conn)` is not `Send`
    // for tokio::spawn: sqlx's "Acquire is not general enough").
    let r = edgefront_schema::MIGRATOR
        .run_direct(None, &mut *conn, false)
        .await;
    if r.is_err() {
        let _ = sqlx::Connection::close(conn.detach()).await;
    }
    r
}

/// Prunes the change log by transaction: deletes the rows of transactions
/// that finished at least `retention` ago (an id below the primary's xmin as
/// noted by a run that long ago; with a zero retention, below the xmin now),
/// and moves the horizon (`pruned_through` seq, `pruned_xid`) past them, in
/// one transaction. Returns the new seq horizon.
///
/// An edge watching a transaction id below `pruned_xid` may have lost rows
/// and drops its whole cache; one that polls at all never is, because every
/// id it watches is younger than the retention.
pub async fn prune_change_log(pool: &PgPool, retention: Duration) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO change_log_prune_marks (oldest_xid)
         VALUES (pg_snapshot_xmin(pg_current_snapshot())::text::bigint)",
    )
    .execute(&mut *tx)
    .await?;
    let cut: Option<i64> = if retention.is_zero() {
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut *tx)
            .await?
    } else {
        sqlx::query_scalar(
            "SELECT max(oldest_xid) FROM change_log_prune_marks
             WHERE at <= now() - make_interval(secs => $1)",
        )
        .bind(retention.as_secs_f64())
        .fetch_one(&mut *tx)
        .await?
    };
    let horizon: i64 = sqlx::query_scalar(
        "WITH gone AS (
             DELETE FROM change_log WHERE xid < $1 RETURNING seq
         )
         UPDATE change_log_horizon
            SET pruned_through = GREATEST(pruned_through, COALESCE((SELECT max(seq) FROM gone), 0)),
                pruned_xid = GREATEST(pruned_xid, $1)
         RETURNING pruned_through",
    )
    .bind(cut.unwrap_or(0))
    .fetch_one(&mut *tx)
    .await?;
    // Older marks than the one just used are never needed again.
    sqlx::query(
        "DELETE FROM change_log_prune_marks
         WHERE at < now() - make_interval(secs => $1) AND oldest_xid < $2",
    )
    .bind(retention.as_secs_f64())
    .bind(cut.unwrap_or(0))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(horizon)
}

/// Prunes the change log every `every`, keeping `retention` of history.
pub async fn prune_forever(pool: PgPool, retention: Duration, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match prune_change_log(&pool, retention).await {
            Ok(h) => tracing::debug!(horizon = h, "change log pruned"),
            // Beside a standby (a failover candidate): the leader's origin
            // prunes; this one tries again at the next tick, quietly.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("25006") => {
                tracing::debug!("change log prune: the database is a standby");
            }
            Err(e) => tracing::warn!(error = %e, "change log prune failed"),
        }
    }
}

/// One span per request, continuing the caller's trace (`traceparent`,
/// sent by the edge), so edge and origin spans form one trace.
async fn trace_request(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "request",
        otel.name = "origin request",
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        http.response.status_code = tracing::field::Empty,
        edgefront.edge_region = tracing::field::Empty,
    );
    edgefront_schema::telemetry::extract(&span, req.headers());
    if let Some(r) = req
        .headers()
        .get("x-edge-region")
        .and_then(|v| v.to_str().ok())
    {
        span.record("edgefront.edge_region", r);
    }
    let resp = next.run(req).instrument(span.clone()).await;
    span.record("http.response.status_code", resp.status().as_u16());
    resp
}

/// The origin's public HTTP routes: seller API, shopper writes, ACME
/// HTTP-01 answers, health and metrics. Never the internal API: that is
/// [`internal_router`], served on a listener of its own (mutual TLS).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        // Seller API (bearer token of the store).
        .route("/api/stores", post(catalog::create_store))
        .route(
            "/api/store",
            get(catalog::get_store).patch(catalog::update_store),
        )
        .route(
            "/api/categories",
            get(catalog::list_categories).post(catalog::create_category),
        )
        .route(
            "/api/categories/{id}",
            patch(catalog::update_category).delete(catalog::delete_category),
        )
        .route(
            "/api/products",
            get(catalog::list_products).post(catalog::create_product),
        )
        .route(
            "/api/products/{id}",
            patch(catalog::update_product).delete(catalog::delete_product),
        )
        .route(
            "/api/domains",
            post(catalog::add_domain).get(catalog::list_domains),
        )
        .route(
            "/api/domains/{hostname}",
            delete(catalog::remove_domain).get(catalog::get_domain),
        )
        .route(
            "/api/domains/{hostname}/verify",
            post(catalog::verify_domain),
        )
        .route("/api/orders", get(catalog::list_orders))
        // Shopper writes (store chosen by Host).
        .route("/cart", get(shop::view_cart).post(shop::add_to_cart))
        .route("/checkout", post(shop::checkout))
        .route("/orders", post(shop::place_order))
        .route(
            "/.well-known/acme-challenge/{token}",
            get(acme::answer_challenge),
        )
        .layer(DefaultBodyLimit::max(input::MAX_BODY))
        .route("/metrics", get(metrics::exposition))
        .route_layer(axum::middleware::from_fn(metrics::record))
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(state)
}

/// The platform's internal API (`/internal/*`: certificates, ACME leases,
/// orders, challenges, the ACME account), for the region nodes' issuers
/// only. Served on the internal listener, which requires a client
/// certificate from the internal CA; every route also checks the internal
/// bearer token.
pub fn internal_router(state: AppState) -> Router {
    Router::new()
        .route(
            "/internal/certificates/{hostname}",
            axum::routing::put(internal::put_certificate),
        )
        .route(
            "/internal/acme/challenges/{token}",
            axum::routing::put(acme::put_challenge).delete(acme::delete_challenge),
        )
        .route(
            "/internal/acme/leases/{hostname}",
            post(acme::acquire_lease).delete(acme::release_lease),
        )
        .route("/internal/acme/certificates/{hostname}", get(acme::current))
        .route("/internal/acme/orders/{id}", post(acme::finish_order))
        .route(
            "/internal/acme/dns01/{name}",
            axum::routing::put(acme::put_dns01).delete(acme::delete_dns01),
        )
        .route(
            "/internal/acme/account",
            get(acme::get_account).put(acme::put_account),
        )
        .layer(DefaultBodyLimit::max(input::MAX_BODY))
        .route_layer(axum::middleware::from_fn(metrics::record))
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(state)
}

/// Whether the database leads (is not in recovery): beside a Patroni
/// standby the origin serves no writes (crate docs: it follows the leader).
pub async fn database_leads(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar::<_, bool>("SELECT NOT pg_is_in_recovery()")
        .fetch_one(pool)
        .await
}

async fn healthz(State(state): State<AppState>) -> Response {
    match database_leads(&state.health_pool).await {
        Ok(true) => (StatusCode::OK, "ok\n").into_response(),
        Ok(false) => (StatusCode::SERVICE_UNAVAILABLE, "database is a replica\n").into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The WAL position after a committed write: a replica that has replayed up
/// to it shows the write.
///
/// The *insert* position, not `pg_current_wal_lsn()` (the write position):
/// with `synchronous_commit = off` a commit returns before its record is
/// written, so the write position can still be below it, and a client handed
/// that LSN would be told a replica "has" its write when it does not (the
/// history checker found exactly this in the lab, which runs with
/// synchronous commit off). Every record inserted before this call, the
/// commit among them, ends at or below the insert position.
pub async fn commit_lsn(pool: &PgPool) -> Option<Lsn> {
    match sqlx::query_scalar::<_, String>("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(pool)
        .await
    {
        Ok(s) => s.parse().ok(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read commit lsn after write");
            None
        }
    }
}

/// Adds the commit LSN header to a write's response.
pub fn with_lsn(mut resp: Response, lsn: Option<Lsn>) -> Response {
    if let Some(v) = lsn.and_then(|l| HeaderValue::from_str(&l.to_string()).ok()) {
        resp.headers_mut().insert(COMMIT_LSN_HEADER, v);
    }
    resp
}

/// Finds the store a shopper's `Host` header names: a custom domain, or
/// `<slug>.<platform_domain>`.
pub async fn store_for_host(state: &AppState, host: &str) -> Result<StoreId, ApiError> {
    let host = Hostname::from_host_header(host).map_err(|_| ApiError::NotFound("store"))?;
    let platform = &state.platform_domain;
    let id: Option<i64> = if let Some(slug) = host
        .as_str()
        .strip_suffix(platform.as_str())
        .and_then(|s| s.strip_suffix('.'))
        .filter(|s| !s.contains('.'))
    {
        sqlx::query_scalar("SELECT id FROM stores WHERE slug = $1")
            .bind(slug)
            .fetch_optional(&state.pool)
            .await?
    } else {
        sqlx::query_scalar("SELECT store_id FROM domains WHERE hostname = $1")
            .bind(host.as_str())
            .fetch_optional(&state.pool)
            .await?
    };
    id.map(StoreId).ok_or(ApiError::NotFound("store"))
}
