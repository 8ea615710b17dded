//! The health hook's Prometheus metrics (region as a constant label).

use std::collections::HashMap;

use prometheus::{Encoder, Gauge, IntCounter, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// 1 when BIRD exports the anycast route on an established session.
    pub announced: Gauge,
    /// 1 when healthy after hysteresis.
    pub healthy: Gauge,
    /// 0 none, 1 closing, 2 withdrawn, 3 drained.
    pub drain_phase: Gauge,
    /// Established connections on the edge's ports.
    pub connections: Gauge,
    /// Replica lag seen by the hook's own probe.
    pub replica_lag: Gauge,
    /// Failed BIRD control-socket exchanges.
    pub bird_errors: IntCounter,
}

impl Metrics {
    pub fn new(region: &str) -> Result<Metrics, prometheus::Error> {
        let labels = HashMap::from([("region".to_owned(), region.to_owned())]);
        let registry = Registry::new_custom(Some("edgefront".into()), Some(labels))?;
        let g = |name: &str, help: &str| -> Result<Gauge, prometheus::Error> {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let announced = g("bgp_announced", "1 when the anycast route is announced")?;
        let healthy = g("health_healthy", "1 when healthy after hysteresis")?;
        let drain_phase = g(
            "drain_phase",
            "0 serving, 1 closing keep-alive, 2 withdrawn, 3 drained",
        )?;
        let connections = g(
            "edge_connections",
            "Established connections on the edge's ports",
        )?;
        let replica_lag = g(
            "health_replica_lag_seconds",
            "Replica lag seen by the health hook",
        )?;
        let bird_errors =
            IntCounter::new("bird_errors_total", "Failed BIRD control-socket exchanges")?;
        registry.register(Box::new(bird_errors.clone()))?;
        Ok(Metrics {
            registry,
            announced,
            healthy,
            drain_phase,
            connections,
            replica_lag,
            bird_errors,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        buf
    }
}
