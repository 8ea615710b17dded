//! The health hook's Prometheus metrics (region as a constant label).

use std::collections::HashMap;

use prometheus::{Encoder, Gauge, GaugeVec, IntCounter, Opts, Registry, TextEncoder};

use crate::daemon::Phase;

/// The drain states, as `edgefront_drain_state`'s `state` label.
const DRAIN_STATES: [&str; 4] = ["serving", "closing", "withdrawn", "drained"];

pub struct Metrics {
    registry: Registry,
    /// 1 when BIRD exports the anycast route on an established session.
    pub announced: Gauge,
    /// 1 when healthy after hysteresis.
    pub healthy: Gauge,
    /// 0 none, 1 closing, 2 withdrawn, 3 drained.
    pub drain_phase: Gauge,
    /// The same, a label per state: 1 for the current one, 0 for the others.
    pub drain_state: GaugeVec,
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
        let drain_state = GaugeVec::new(
            Opts::new(
                "drain_state",
                "1 for the drain state the region is in (serving, closing, withdrawn, drained), 0 for the others",
            ),
            &["state"],
        )?;
        registry.register(Box::new(drain_state.clone()))?;
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
            drain_state,
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

    /// Records the drain phase (`None`: serving) in both drain metrics.
    pub fn set_drain(&self, phase: Option<Phase>) {
        let (n, state) = match phase {
            None => (0, "serving"),
            Some(Phase::Closing) => (1, "closing"),
            Some(Phase::Withdrawn) => (2, "withdrawn"),
            Some(Phase::Drained) => (3, "drained"),
        };
        self.drain_phase.set(f64::from(n));
        for s in DRAIN_STATES {
            self.drain_state
                .with_label_values(&[s])
                .set(f64::from(u8::from(s == state)));
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_state_is_one_label_at_1() {
        let m = Metrics::new("bom1").expect("metrics");
        for (phase, state, n) in [
            (None, "serving", "0"),
            (Some(Phase::Closing), "closing", "1"),
            (Some(Phase::Withdrawn), "withdrawn", "2"),
            (Some(Phase::Drained), "drained", "3"),
        ] {
            m.set_drain(phase);
            let text = String::from_utf8(m.encode()).expect("utf-8");
            let ones: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("edgefront_drain_state{") && l.ends_with(" 1"))
                .collect();
            assert_eq!(ones.len(), 1, "{text}");
            assert!(ones[0].contains(&format!("state=\"{state}\"")), "{text}");
            assert_eq!(
                text.lines()
                    .filter(|l| l.starts_with("edgefront_drain_state{"))
                    .count(),
                4
            );
            assert!(
                text.lines()
                    .any(|l| l == format!("edgefront_drain_phase{{region=\"bom1\"}} {n}")),
                "{text}"
            );
        }
    }
}
