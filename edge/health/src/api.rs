//! The hook's admin API. Every route but `/metrics` needs
//! `Authorization: Bearer <token>`; a request without it changes nothing and
//! gets 401.
//!
//! - `GET /status` — the region's [`Status`](crate::daemon::Status).
//! - `POST /drain` — start a drain (202; 200 if already drained).
//! - `POST /undrain` — end it.
//! - `GET /metrics` — Prometheus exposition.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::daemon::Daemon;

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/drain", post(drain))
        .route("/undrain", post(undrain))
        .route("/metrics", get(metrics))
        .with_state(daemon)
}

fn authorized(d: &Daemon, headers: &HeaderMap) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    edgefront_schema::bearer_matches(given, &d.tokens().admin)
}

fn unauthorized(d: &Daemon) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(json!({"error": "missing or wrong admin token", "region": d.settings.region})),
    )
        .into_response()
}

/// The admin token, or the shared read-only status token.
fn may_read(d: &Daemon, headers: &HeaderMap) -> bool {
    if authorized(d, headers) {
        return true;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    d.tokens()
        .status
        .as_deref()
        .is_some_and(|t| edgefront_schema::bearer_matches(given, t))
}

async fn status(State(d): State<Arc<Daemon>>, headers: HeaderMap) -> Response {
    if !may_read(&d, &headers) {
        return unauthorized(&d);
    }
    axum::Json(d.status()).into_response()
}

async fn drain(State(d): State<Arc<Daemon>>, headers: HeaderMap) -> Response {
    if !authorized(&d, &headers) {
        return unauthorized(&d);
    }
    match d.drain().await {
        Ok(started) => (
            if started {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            },
            axum::Json(
                json!({"region": d.settings.region, "started": started, "status": d.status()}),
            ),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": format!("could not record the drain: {e}")})),
        )
            .into_response(),
    }
}

async fn undrain(State(d): State<Arc<Daemon>>, headers: HeaderMap) -> Response {
    if !authorized(&d, &headers) {
        return unauthorized(&d);
    }
    match d.undrain().await {
        Ok(was) => {
            axum::Json(json!({"region": d.settings.region, "was_drained": was})).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": format!("could not remove the drain record: {e}")})),
        )
            .into_response(),
    }
}

async fn metrics(State(d): State<Arc<Daemon>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        d.metrics.encode(),
    )
        .into_response()
}
