//! The admin listener: `/healthz` and Prometheus `/metrics`, on its own port.
//!
//! Health means: this process answers, the replica is reachable and in
//! recovery (a replica, not a promoted primary), and its lag is under budget:
//! how long the oldest unreplayed WAL has waited (`max_replica_lag_seconds`),
//! unreplayed WAL bytes and silence from the primary (see `edgefront-lag`;
//! those two budgets are [`LagWatch`]'s). The answer is JSON with the
//! reasons, 200 when healthy and 503 when not, so both humans and the health
//! hook can read it; `lagging` and `broken` tell lag (which every region may
//! share, and which the hook handles apart) from everything else. It also
//! carries the traffic the health hook reports and drains on: requests in
//! flight and in total, cache hits and lookups, and the drain flag.
//!
//! `POST /drain` and `POST /undrain` switch keep-alive off and on. They need
//! `Authorization: Bearer <admin_token>`; without a configured token they are
//! refused (403), with a wrong or missing one they answer 401 and change nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Serialize;

use crate::headers::X_EDGE_ROUTE;
use crate::metrics::Metrics;
use crate::replica::Replica;
use crate::traffic::Traffic;

/// The admin HTTP app.
pub struct Admin {
    pub region: String,
    pub replica: Replica,
    pub metrics: Arc<Metrics>,
    pub max_lag: Duration,
    pub traffic: Arc<Traffic>,
    /// Bearer token for drain/undrain; `None` refuses them.
    pub token: Option<String>,
    /// Lag tracking across health checks, and the byte and silence budgets.
    pub lag: LagWatch,
}

/// The replica's lag across health checks (seconds need successive
/// readings), with the budgets beyond `max_lag`.
#[derive(Debug)]
pub struct LagWatch {
    tracker: Mutex<edgefront_lag::Tracker>,
    /// Unreplayed WAL budget.
    pub max_bytes: u64,
    /// Longest time without a message from the primary.
    pub max_silence: Duration,
}

impl Default for LagWatch {
    fn default() -> Self {
        LagWatch {
            tracker: Mutex::default(),
            max_bytes: edgefront_lag::DEFAULT_MAX_BYTES,
            max_silence: edgefront_lag::DEFAULT_MAX_SILENCE,
        }
    }
}

/// The `/healthz` body.
#[derive(Debug, Serialize)]
pub struct Health {
    pub region: String,
    pub healthy: bool,
    pub reasons: Vec<String>,
    pub replica_reachable: bool,
    /// How long the oldest unreplayed WAL has waited (0 when replay has
    /// everything the replica knows of).
    pub replica_lag_seconds: Option<f64>,
    /// Unreplayed WAL.
    pub replica_lag_bytes: Option<u64>,
    /// Seconds since the last message from the primary (`None`: unknown).
    pub replica_silence_seconds: Option<f64>,
    pub replica_replay_paused: Option<bool>,
    pub replica_replay_lsn: Option<String>,
    /// Over a lag budget (a reason starting `replica_lag`).
    pub lagging: bool,
    /// Unhealthy for a reason other than lag.
    pub broken: bool,
    pub draining: bool,
    pub requests_in_flight: i64,
    pub requests_total: u64,
    pub cache_hits: u64,
    pub cache_lookups: u64,
    pub certificates: f64,
}

impl Admin {
    /// Checks the replica (bounded to 0.8 s, inside the health hook's 1 s
    /// probe timeout) and judges health.
    pub async fn health(&self) -> Health {
        let status = tokio::time::timeout(Duration::from_millis(800), self.replica.status()).await;
        let mut h = Health {
            region: self.region.clone(),
            healthy: true,
            reasons: Vec::new(),
            replica_reachable: false,
            replica_lag_seconds: None,
            replica_lag_bytes: None,
            replica_silence_seconds: None,
            replica_replay_paused: None,
            replica_replay_lsn: None,
            lagging: false,
            broken: false,
            draining: self.traffic.draining(),
            requests_in_flight: self.traffic.in_flight(),
            requests_total: self.traffic.total(),
            cache_hits: self.metrics.cache.with_label_values(&["hit"]).get(),
            cache_lookups: ["hit", "miss", "coalesced", "stale"]
                .iter()
                .map(|l| self.metrics.cache.with_label_values(&[l]).get())
                .sum(),
            certificates: self.metrics.tls_certificates.get(),
        };
        self.metrics
            .requests_in_flight
            .set(h.requests_in_flight as f64);
        self.metrics
            .draining
            .set(if h.draining { 1.0 } else { 0.0 });
        match status {
            Ok(Ok(s)) => {
                let lag = self
                    .lag
                    .tracker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .observe(&s, Instant::now());
                h.replica_reachable = true;
                h.replica_lag_seconds = Some(lag.seconds);
                h.replica_lag_bytes = Some(lag.bytes);
                h.replica_silence_seconds = lag.silence_seconds;
                h.replica_replay_paused = Some(lag.replay_paused);
                h.replica_replay_lsn = s.replay_lsn.map(|l| l.to_string());
                self.metrics.replica_up.set(1.0);
                self.metrics.replica_lag.set(lag.seconds);
                self.metrics.replica_lag_bytes.set(lag.bytes as f64);
                if let Some(q) = lag.silence_seconds {
                    self.metrics.replica_silence.set(q);
                }
                if !s.in_recovery {
                    h.reasons.push("replica_not_in_recovery".into());
                    h.broken = true;
                }
                let over = edgefront_lag::Budget {
                    bytes: self.lag.max_bytes,
                    seconds: self.max_lag,
                    silence: self.lag.max_silence,
                }
                .exceeded(&lag);
                h.lagging = !over.is_empty();
                h.reasons.extend(over);
            }
            Ok(Err(e)) => {
                self.metrics.replica_up.set(0.0);
                h.reasons.push(format!("replica_unreachable: {e}"));
                h.broken = true;
            }
            Err(_) => {
                self.metrics.replica_up.set(0.0);
                h.reasons
                    .push("replica_unreachable: timed out after 0.8s".into());
                h.broken = true;
            }
        }
        self.metrics
            .replica_over_lag_budget
            .set(if h.lagging { 1.0 } else { 0.0 });
        if !self.traffic.warmed() {
            // Announced only once its pools are open (a start or an upgrade).
            h.reasons.push("warming_up".into());
            h.broken = true;
        }
        h.healthy = h.reasons.is_empty();
        h
    }

    /// Whether the request carries the admin token (constant-time compare).
    fn authorized(&self, session: &ServerSession) -> Result<(), StatusCode> {
        let Some(token) = &self.token else {
            return Err(StatusCode::FORBIDDEN);
        };
        let given = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if edgefront_schema::bearer_matches(given, token) {
            Ok(())
        } else {
            Err(StatusCode::UNAUTHORIZED)
        }
    }

    fn set_draining(&self, session: &ServerSession, on: bool) -> Response<Vec<u8>> {
        if session.req_header().method != http::Method::POST {
            return respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                &self.region,
                b"use POST\n".to_vec(),
            );
        }
        if let Err(status) = self.authorized(session) {
            let msg: &[u8] = if status == StatusCode::FORBIDDEN {
                b"no admin token configured on this edge: drain is disabled\n"
            } else {
                b"missing or wrong admin token\n"
            };
            return respond(status, "text/plain", &self.region, msg.to_vec());
        }
        let was = self.traffic.set_draining(on);
        if was != on {
            tracing::warn!(region = %self.region, draining = on, "drain state changed by the admin API");
        }
        let body = serde_json::json!({
            "region": self.region,
            "draining": on,
            "changed": was != on,
            "requests_in_flight": self.traffic.in_flight(),
        });
        let mut b = serde_json::to_vec(&body).unwrap_or_default();
        b.push(b'\n');
        respond(StatusCode::OK, "application/json", &self.region, b)
    }
}

fn respond(status: StatusCode, ctype: &str, region: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut b = Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, ctype)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store");
    if let Ok(v) = http::HeaderValue::from_str(region) {
        b = b.header(X_EDGE_ROUTE, v);
    }
    b.body(body).unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_owned();
        match path.as_str() {
            "/healthz" => {
                let h = self.health().await;
                let status = if h.healthy {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let mut body = serde_json::to_vec_pretty(&h).unwrap_or_default();
                body.push(b'\n');
                respond(status, "application/json", &self.region, body)
            }
            "/drain" => self.set_draining(session, true),
            "/undrain" => self.set_draining(session, false),
            "/metrics" => {
                // Refresh the replica gauges at scrape time.
                let _ = self.health().await;
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    &self.region,
                    self.metrics.encode(),
                )
            }
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                &self.region,
                b"not found\n".to_vec(),
            ),
        }
    }
}
