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
    /// 1 while lagging but staying announced (too few other regions fine).
    pub withdraw_suppressed: Gauge,
    /// Times a withdraw for lag was suppressed.
    pub withdraw_suppressions: IntCounter,
    /// Other regions announced and fine, as last read.
    pub fine_peers: Gauge,
    /// Unreplayed WAL seen by the hook's own probe.
    pub replica_lag_bytes: Gauge,
    /// Seconds since the replica last heard from the primary.
    pub replica_silence: Gauge,
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
        // Which release runs (mid-rollout, regions differ): always 1.
        let build_info = Gauge::with_opts(
            prometheus::Opts::new("build_info", "The running health hook release (always 1)")
                .const_label("component", "health")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        build_info.set(1.0);
        registry.register(Box::new(build_info))?;
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
            "How long the oldest unreplayed WAL has waited, seen by the health hook",
        )?;
        let replica_lag_bytes = g(
            "health_replica_lag_bytes",
            "Unreplayed WAL on the replica, seen by the health hook",
        )?;
        let replica_silence = g(
            "health_replica_silence_seconds",
            "Seconds since the replica last heard from the primary",
        )?;
        let withdraw_suppressed = g(
            "health_withdraw_suppressed",
            "1 while the replica lags over budget but the region stays announced: too few other regions are fine (shared cause suspected)",
        )?;
        let fine_peers = g(
            "health_fine_peers",
            "Other regions announced and fine, as this hook last read them",
        )?;
        let withdraw_suppressions = IntCounter::new(
            "health_withdraw_suppressions_total",
            "Times a withdraw for replica lag was suppressed",
        )?;
        registry.register(Box::new(withdraw_suppressions.clone()))?;
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
            withdraw_suppressed,
            withdraw_suppressions,
            fine_peers,
            replica_lag_bytes,
            replica_silence,
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
