//! Prometheus metrics of one edge, in its own registry with the region as a
//! constant label.

use std::collections::HashMap;

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry, TextEncoder,
};

/// The edge's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests by route label and status code.
    pub requests: IntCounterVec,
    /// Request duration by route label.
    pub latency: HistogramVec,
    /// Page cache lookups by result (`hit`, `miss`, `coalesced`).
    pub cache: IntCounterVec,
    /// Replica query + template render time of cache misses.
    pub render: HistogramVec,
    /// Replica replay lag seen at the last health check.
    pub replica_lag: Gauge,
    /// 1 when the replica answered the last health check.
    pub replica_up: Gauge,
    /// Which database failover candidate read-your-writes reads from: 0 for
    /// `primary_url`, then `primary_standbys` in order; -1 while none is
    /// known to lead.
    pub database_leader: Gauge,
    /// Newest change-log sequence number applied.
    pub changelog_seq: Gauge,
    /// Change-log polls.
    pub changelog_polls: IntCounter,
    /// Failed change-log polls.
    pub changelog_errors: IntCounter,
    /// Whole-cache drops because the log was pruned past this edge.
    pub changelog_resets: IntCounter,
    /// Transactions the change feed watches (may still commit rows).
    pub changelog_watched: Gauge,
    /// Replay LSN up to which every invalidation is applied (as a number).
    pub changelog_applied_lsn: Gauge,
    /// Invalidations applied, by change kind.
    pub changelog_invalidations: IntCounterVec,
    /// Page reads that carried a read-your-writes LSN, by outcome.
    pub read_your_writes: IntCounterVec,
    /// Pre-handshake certificate lookups by outcome.
    pub tls_lookups: IntCounterVec,
    /// TLS handshakes pingora reported failed (its per-connection log line
    /// is folded: `edgefront_schema::telemetry::FOLD_WINDOW`); brought up to
    /// date at each scrape.
    pub tls_handshake_failures: IntCounter,
    /// How much of the count `tls_handshake_failures` holds already.
    handshake_failures_exported: std::sync::atomic::AtomicU64,
    /// Certificates in memory.
    pub tls_certificates: Gauge,
    /// Certificates in memory by the issuer that signed them.
    pub tls_certificates_by_issuer: GaugeVec,
    /// 1 for the ACME directory new orders go to now, 0 for the others.
    pub acme_directory_active: GaugeVec,
    /// ACME issuance attempts by outcome.
    pub acme_orders: IntCounterVec,
    /// Requests for the internal API refused on the public edge.
    pub internal_refused: IntCounter,
    /// Requests refused by a per-client-address limit, by limit.
    pub rate_limited: IntCounterVec,
    /// Connections refused or closed by the connection guard, by reason
    /// (`per_address`: over the open-connection cap; `header_timeout`:
    /// request headers too slow).
    pub connections_refused: IntCounterVec,
    /// Expiry (unix seconds) of the certificate that expires first.
    pub tls_soonest_expiry: Gauge,
    /// Requests being answered now.
    pub requests_in_flight: Gauge,
    /// 1 while the edge is draining (keep-alive off).
    pub draining: Gauge,
    /// Unreplayed WAL on the replica at the last health check.
    pub replica_lag_bytes: Gauge,
    /// Seconds since the replica last heard from the primary.
    pub replica_silence: Gauge,
    /// 1 while the replica is over a lag budget: pages served now may be
    /// older than the budget (the health hook may keep the region announced
    /// when every region lags; see `edgefront_health::decision`).
    pub replica_over_lag_budget: Gauge,
    /// When this process started (unix seconds): tells one run of the edge
    /// from the next (its change feed and caches start empty).
    pub start_time: Gauge,
}

impl Metrics {
    /// Metrics labelled with `region`.
    pub fn new(region: &str) -> Result<Self, prometheus::Error> {
        let labels = HashMap::from([("region".to_owned(), region.to_owned())]);
        let registry = Registry::new_custom(Some("edgefront".into()), Some(labels))?;
        let requests = IntCounterVec::new(
            Opts::new("requests_total", "Requests by route and status"),
            &["route", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Time to respond, by route").buckets(
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5,
                ],
            ),
            &["route"],
        )?;
        let cache = IntCounterVec::new(
            Opts::new("cache_lookups_total", "Page cache lookups by result"),
            &["result"],
        )?;
        let render = HistogramVec::new(
            HistogramOpts::new(
                "render_duration_seconds",
                "Replica queries plus template render of a cache miss, by phase",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
            ]),
            &["phase"],
        )?;
        let replica_lag = Gauge::new(
            "replica_lag_seconds",
            "Replica replay lag at the last health check",
        )?;
        let replica_up = Gauge::new(
            "replica_up",
            "1 if the replica answered the last health check",
        )?;
        let changelog_seq =
            Gauge::new("changelog_seq", "Newest change-log sequence number applied")?;
        let changelog_polls = IntCounter::new("changelog_polls_total", "Change-log polls")?;
        let changelog_errors =
            IntCounter::new("changelog_poll_errors_total", "Failed change-log polls")?;
        let changelog_resets = IntCounter::new(
            "changelog_resets_total",
            "Whole-cache drops: the log was pruned past this edge",
        )?;
        let changelog_watched = Gauge::new(
            "changelog_watched_transactions",
            "Transactions the change feed watches because they may still commit rows",
        )?;
        registry.register(Box::new(changelog_watched.clone()))?;
        let changelog_applied_lsn = Gauge::new(
            "changelog_applied_lsn",
            "Replay LSN (as a byte position) up to which every change-log invalidation is applied",
        )?;
        registry.register(Box::new(changelog_applied_lsn.clone()))?;
        let changelog_invalidations = IntCounterVec::new(
            Opts::new(
                "changelog_invalidations_total",
                "Invalidations applied, by kind",
            ),
            &["kind"],
        )?;
        let read_your_writes = IntCounterVec::new(
            Opts::new(
                "read_your_writes_total",
                "Page reads carrying a client LSN, by outcome",
            ),
            &["outcome"],
        )?;
        for c in [&changelog_polls, &changelog_errors, &changelog_resets] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(changelog_seq.clone()))?;
        registry.register(Box::new(changelog_invalidations.clone()))?;
        registry.register(Box::new(read_your_writes.clone()))?;
        let tls_lookups = IntCounterVec::new(
            Opts::new(
                "tls_certificate_lookups_total",
                "Pre-handshake certificate lookups by outcome",
            ),
            &["outcome"],
        )?;
        let tls_certificates = Gauge::new("tls_certificates", "Certificates loaded in memory")?;
        registry.register(Box::new(tls_lookups.clone()))?;
        let tls_handshake_failures = IntCounter::new(
            "tls_handshake_failures_total",
            "TLS handshakes that failed (unknown name, bad ClientHello, timeout…), counted from pingora's reports",
        )?;
        registry.register(Box::new(tls_handshake_failures.clone()))?;
        registry.register(Box::new(tls_certificates.clone()))?;
        let tls_certificates_by_issuer = GaugeVec::new(
            Opts::new(
                "tls_certificates_by_issuer",
                "Certificates loaded in memory by the issuer that signed them (ACME directory name, or uploaded)",
            ),
            &["issuer"],
        )?;
        registry.register(Box::new(tls_certificates_by_issuer.clone()))?;
        let acme_directory_active = GaugeVec::new(
            Opts::new(
                "acme_directory_active",
                "1 for the ACME directory new orders and renewals go to now, 0 for the others",
            ),
            &["directory"],
        )?;
        registry.register(Box::new(acme_directory_active.clone()))?;
        let acme_orders = IntCounterVec::new(
            Opts::new("acme_issuances_total", "ACME issuance attempts by outcome"),
            &["outcome"],
        )?;
        registry.register(Box::new(acme_orders.clone()))?;
        let internal_refused = IntCounter::new(
            "internal_refused_total",
            "Requests for the internal API (/internal/...) refused on the public edge",
        )?;
        registry.register(Box::new(internal_refused.clone()))?;
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "rate_limited_total",
                "Requests, pages and certificate lookups refused by an abuse limit (per client address or per store), by limit",
            ),
            &["limit"],
        )?;
        registry.register(Box::new(rate_limited.clone()))?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "connections_refused_total",
                "Connections refused or closed by the connection guard, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(connections_refused.clone()))?;
        let tls_soonest_expiry = Gauge::new(
            "tls_certificate_soonest_expiry_timestamp_seconds",
            "Expiry (unix seconds) of the loaded certificate that expires first",
        )?;
        registry.register(Box::new(tls_soonest_expiry.clone()))?;
        let requests_in_flight = Gauge::new("requests_in_flight", "Requests being answered now")?;
        let draining = Gauge::new("draining", "1 while draining (keep-alive off)")?;
        registry.register(Box::new(requests_in_flight.clone()))?;
        registry.register(Box::new(draining.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(cache.clone()))?;
        registry.register(Box::new(render.clone()))?;
        registry.register(Box::new(replica_lag.clone()))?;
        registry.register(Box::new(replica_up.clone()))?;
        let database_leader = Gauge::new(
            "database_leader_candidate",
            "The database candidate read-your-writes reads from (0: primary_url, then primary_standbys in order); -1: none known to lead",
        )?;
        registry.register(Box::new(database_leader.clone()))?;
        let replica_lag_bytes = Gauge::new(
            "replica_lag_bytes",
            "Unreplayed WAL on the replica at the last health check",
        )?;
        let replica_silence = Gauge::new(
            "replica_silence_seconds",
            "Seconds since the replica last heard from the primary",
        )?;
        let replica_over_lag_budget = Gauge::new(
            "replica_over_lag_budget",
            "1 while the replica is over a lag budget (pages may be older than the budget)",
        )?;
        registry.register(Box::new(replica_lag_bytes.clone()))?;
        registry.register(Box::new(replica_silence.clone()))?;
        registry.register(Box::new(replica_over_lag_budget.clone()))?;
        let start_time = Gauge::new(
            "start_time_seconds",
            "When this edge process started (unix seconds)",
        )?;
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        registry.register(Box::new(start_time.clone()))?;
        // Which release runs (mid-rollout, regions differ): always 1.
        let build_info = Gauge::with_opts(
            Opts::new("build_info", "The running edge release (always 1)")
                .const_label("component", "edge")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )?;
        build_info.set(1.0);
        registry.register(Box::new(build_info))?;
        Ok(Metrics {
            registry,
            requests,
            latency,
            cache,
            render,
            replica_lag,
            replica_up,
            database_leader,
            changelog_seq,
            changelog_polls,
            changelog_errors,
            changelog_resets,
            changelog_watched,
            changelog_applied_lsn,
            changelog_invalidations,
            read_your_writes,
            tls_lookups,
            tls_handshake_failures,
            handshake_failures_exported: Default::default(),
            tls_certificates,
            tls_certificates_by_issuer,
            acme_directory_active,
            acme_orders,
            internal_refused,
            rate_limited,
            connections_refused,
            tls_soonest_expiry,
            requests_in_flight,
            draining,
            replica_lag_bytes,
            replica_silence,
            replica_over_lag_budget,
            start_time,
        })
    }

    /// The text exposition format.
    pub fn encode(&self) -> Vec<u8> {
        // Two scrapes at once must not both add the same difference.
        let failed = edgefront_schema::telemetry::handshake_errors();
        let before = self
            .handshake_failures_exported
            .fetch_max(failed, std::sync::atomic::Ordering::Relaxed);
        self.tls_handshake_failures
            .inc_by(failed.saturating_sub(before));
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        buf
    }
}
