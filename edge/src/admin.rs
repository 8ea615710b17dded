//! The admin listener: `/healthz` and Prometheus `/metrics`, on its own port.
//!
//! Health means: this process answers, the replica is reachable and in
//! recovery (a replica, not a promoted primary), and its replay lag is under
//! the configured budget. The answer is JSON with the reasons, 200 when
//! healthy and 503 when not, so both humans and the health hook can read it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Serialize;

use crate::headers::X_EDGE_ROUTE;
use crate::metrics::Metrics;
use crate::replica::Replica;

/// The admin HTTP app.
pub struct Admin {
    pub region: String,
    pub replica: Replica,
    pub metrics: Arc<Metrics>,
    pub max_lag: Duration,
}

/// The `/healthz` body.
#[derive(Debug, Serialize)]
pub struct Health {
    pub region: String,
    pub healthy: bool,
    pub reasons: Vec<String>,
    pub replica_reachable: bool,
    pub replica_lag_seconds: Option<f64>,
    pub replica_replay_lsn: Option<String>,
}

impl Admin {
    /// Checks the replica (bounded to two seconds) and judges health.
    pub async fn health(&self) -> Health {
        let status = tokio::time::timeout(Duration::from_secs(2), self.replica.status()).await;
        let mut h = Health {
            region: self.region.clone(),
            healthy: true,
            reasons: Vec::new(),
            replica_reachable: false,
            replica_lag_seconds: None,
            replica_replay_lsn: None,
        };
        match status {
            Ok(Ok(s)) => {
                h.replica_reachable = true;
                h.replica_lag_seconds = Some(s.lag_seconds);
                h.replica_replay_lsn = s.replay_lsn;
                self.metrics.replica_up.set(1.0);
                self.metrics.replica_lag.set(s.lag_seconds);
                if !s.in_recovery {
                    h.reasons.push("replica_not_in_recovery".into());
                }
                if s.lag_seconds > self.max_lag.as_secs_f64() {
                    h.reasons.push(format!(
                        "replica_lag {:.1}s over budget {:.1}s",
                        s.lag_seconds,
                        self.max_lag.as_secs_f64()
                    ));
                }
            }
            Ok(Err(e)) => {
                self.metrics.replica_up.set(0.0);
                h.reasons.push(format!("replica_unreachable: {e}"));
            }
            Err(_) => {
                self.metrics.replica_up.set(0.0);
                h.reasons
                    .push("replica_unreachable: timed out after 2s".into());
            }
        }
        h.healthy = h.reasons.is_empty();
        h
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
