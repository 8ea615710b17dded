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
pub mod db;
pub mod demo;
pub mod error;
pub mod input;
pub mod internal;
pub mod metrics;
pub mod ownership;
pub mod shop;
pub mod state;
pub mod tls_listener;

pub use db::{
    HEALTH_CONNECTIONS, commit_lsn, connect, database_leads, migrate, prune_change_log,
    prune_forever, store_for_host, with_lsn,
};
pub use state::AppState;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};

use crate::error::ApiError;

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

async fn healthz(State(state): State<AppState>) -> Response {
    match database_leads(&state.health_pool).await {
        Ok(true) => (StatusCode::OK, "ok\n").into_response(),
        Ok(false) => (StatusCode::SERVICE_UNAVAILABLE, "database is a replica\n").into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
