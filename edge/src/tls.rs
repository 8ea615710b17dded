//! TLS on the edge: certificates per SNI for sellers' custom domains.
//!
//! rustls's resolver is synchronous and must not do I/O, so the work happens
//! in Pingora's pre-TLS hook ([`CertLoader`]): it reads the raw ClientHello
//! (bounded in bytes and time), takes the SNI, and if that certificate is not
//! in memory yet, loads it from the region's replica (only for hostnames that
//! are registered domains with a certificate), opens the sealed key and puts
//! it in the [`CertMap`]. Then it rewinds the bytes and Pingora's handshake
//! re-reads the ClientHello; the resolver finds the certificate in memory.
//! Unknown names are remembered in a bounded, short-lived negative cache so a
//! flood of random SNIs costs one indexed lookup per name per minute and no
//! memory beyond the cache bound; their handshakes fail at once with an alert.
//! [`SniRecorder`] attaches the SNI to the connection so HTTP can check `Host`.

use std::any::Any;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use edgefront_certs::acme::{IssueError, Issued, Issuer, Stored};
use edgefront_certs::{CertMap, Hello, Sealer};
use edgefront_schema::Hostname;
use moka::future::Cache;
use pingora::listeners::{PreTlsProcess, TlsAccept};
use pingora::protocols::GetSocketDigest;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::TlsRef;
use tokio::io::AsyncReadExt;

use crate::generation::Generations;
use crate::metrics::Metrics;
use crate::replica::Replica;

/// Largest ClientHello read before the handshake (TLS records are ≤ 16 KiB + header).
const MAX_HELLO: usize = 16 * 1024 + 5;
/// Longest wait for a complete ClientHello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// The SNI of a TLS connection, attached to its digest.
#[derive(Debug, Clone)]
pub struct Sni(pub String);

/// Records the SNI after the handshake.
pub struct SniRecorder;

#[async_trait]
impl TlsAccept for SniRecorder {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        tls.server_name()
            .map(|n| Arc::new(Sni(n.to_ascii_lowercase())) as Arc<dyn Any + Send + Sync>)
    }
}

/// Whether a certificate serves a name (for the http → https redirect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serves {
    Yes,
    No,
    /// Not in memory, and the client is over its miss budget: nobody looked
    /// (answer 429 with this wait rather than guess either way).
    OverBudget(Duration),
}

/// Loads certificates into memory before the handshake needs them.
pub struct CertLoader {
    pub replica: Replica,
    pub certs: Arc<CertMap>,
    /// Names with no certificate (or not registered), remembered briefly.
    pub unknown: Cache<String, ()>,
    pub sealer: Arc<Sealer>,
    pub platform_domain: String,
    pub metrics: Arc<Metrics>,
    /// Issues certificates for registered domains seen without one.
    pub issuer: Option<Arc<Issuer>>,
    /// In-flight issuances by name: concurrent first handshakes wait for one.
    issuing: Cache<String, ()>,
    /// Names whose issuance failed: (attempts, not before), for backoff.
    failures: Cache<String, (u32, Instant)>,
    /// Most certificates one store may have issued per hour.
    pub per_store_per_hour: i64,
    /// Issue and renew the platform wildcard `*.<platform>` (DNS-01).
    pub platform_wildcard: bool,
    /// Per-name invalidation counters: a lookup that read the replica before
    /// the tail applied a change of that name never keeps its result.
    generations: Generations,
    /// The per-address budget of lookups no cache answers: a flood of
    /// made-up names from one address costs the replica at most that.
    pub limits: Option<Arc<crate::limits::ClientLimits>>,
    /// Registered custom domains: a name not among them has no certificate
    /// to load, answered without a query.
    pub domains: Option<Arc<crate::cache::DomainSet>>,
    /// The connection guard's per-address cap, applied before the
    /// handshake: a connection counts from its accept, handshake included.
    pub connection_cap: Option<(Arc<crate::conn::Slots>, u32)>,
}

/// Longest a first handshake waits for issuance.
const ISSUE_WAIT: Duration = Duration::from_secs(25);

impl CertLoader {
    /// A loader with a negative cache of at most `max_unknown` names.
    pub fn new(
        replica: Replica,
        certs: Arc<CertMap>,
        sealer: Arc<Sealer>,
        platform_domain: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        CertLoader {
            replica,
            certs,
            unknown: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            sealer,
            platform_domain,
            metrics,
            issuer: None,
            issuing: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(5))
                .build(),
            per_store_per_hour: 20,
            platform_wildcard: false,
            generations: Generations::default(),
            failures: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            limits: None,
            domains: None,
            connection_cap: None,
        }
    }

    /// Turns on issuance on first sight.
    pub fn with_issuer(mut self, issuer: Arc<Issuer>) -> Self {
        self.issuer = Some(issuer);
        self
    }

    /// Issues (or waits for another region's issuance of) `name`, then loads it.
    /// A certificate another region already stored on the primary is used as
    /// is (the origin hands it over instead of a lease), even when this
    /// region's replica has not caught up with it yet.
    async fn issue(&self, issuer: &Arc<Issuer>, name: &str) -> Result<(), String> {
        if let Some((_, not_before)) = self.failures.get(name).await
            && Instant::now() < not_before
        {
            self.metrics
                .acme_orders
                .with_label_values(&["backoff"])
                .inc();
            return Err("in backoff after a failed issuance".into());
        }
        match issuer.issue(name).await {
            Ok(Issued::Ordered {
                chain_pem,
                key_pem,
                issuer,
            }) => {
                self.metrics
                    .acme_orders
                    .with_label_values(&["issued"])
                    .inc();
                self.failures.invalidate(name).await;
                let loaded = edgefront_certs::load(name, &chain_pem, key_pem.as_bytes())
                    .map_err(|e| e.to_string())?;
                self.install(name, loaded, &issuer);
                Ok(())
            }
            Ok(Issued::Stored(stored)) => {
                self.metrics
                    .acme_orders
                    .with_label_values(&["reused"])
                    .inc();
                self.failures.invalidate(name).await;
                self.install_stored(name, &stored)
            }
            Err(IssueError::Busy) => {
                // Another region is ordering it: wait for its certificate, from
                // the replica or, when the replica lags, from the primary.
                self.metrics
                    .acme_orders
                    .with_label_values(&["waited"])
                    .inc();
                let deadline = Instant::now() + ISSUE_WAIT;
                let mut polls: u32 = 0;
                while Instant::now() < deadline {
                    if self.load(name).await? {
                        return Ok(());
                    }
                    polls += 1;
                    if polls.is_multiple_of(5)
                        && let Ok(Some(stored)) = issuer.stored(name).await
                    {
                        return self.install_stored(name, &stored);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err("timed out waiting for another region's issuance".into())
            }
            Err(e @ IssueError::Refused { .. }) => {
                self.record_failure(name, "refused").await;
                Err(e.to_string())
            }
            Err(e) => {
                self.record_failure(name, "failed").await;
                Err(e.to_string())
            }
        }
    }

    /// Serves `loaded` for `name` from now on.
    fn install(&self, name: &str, loaded: edgefront_certs::Loaded, issuer: &str) {
        self.certs.insert_loaded(name, loaded, issuer);
        self.publish_metrics();
    }

    /// The certificate gauges, from what is in memory now (also refreshed
    /// on every renewal tick: failover is a matter of time passing).
    pub fn publish_metrics(&self) {
        self.metrics.tls_certificates.set(self.certs.len() as f64);
        if let Some(t) = self.certs.soonest_expiry() {
            self.metrics.tls_soonest_expiry.set(t as f64);
        }
        self.metrics.tls_certificates_by_issuer.reset();
        for (issuer, n) in self.certs.by_issuer() {
            self.metrics
                .tls_certificates_by_issuer
                .with_label_values(&[issuer.as_str()])
                .set(n as f64);
        }
        if let Some(issuer) = &self.issuer {
            let active = issuer.active_directory();
            for name in issuer.directory_names() {
                self.metrics
                    .acme_directory_active
                    .with_label_values(&[name])
                    .set(f64::from(u8::from(name == active)));
            }
        }
    }

    /// Opens the sealed key of a certificate from the primary and serves it.
    fn install_stored(&self, name: &str, stored: &Stored) -> Result<(), String> {
        let key = self
            .sealer
            .open(name, &stored.key_nonce, &stored.key_ciphertext)
            .map_err(|e| e.to_string())?;
        let loaded =
            edgefront_certs::load(name, &stored.chain_pem, &key).map_err(|e| e.to_string())?;
        self.install(name, loaded, issuer_label(stored.issuer.as_deref()));
        Ok(())
    }

    /// Counts a failed (or budget-refused) issuance and backs the name off.
    async fn record_failure(&self, name: &str, outcome: &str) {
        self.metrics.acme_orders.with_label_values(&[outcome]).inc();
        self.publish_metrics();
        let attempts = self.failures.get(name).await.map_or(1, |(a, _)| a + 1);
        let backoff = Duration::from_secs(2u64.saturating_pow(attempts.min(10)).min(3600));
        self.failures
            .insert(name.to_owned(), (attempts, Instant::now() + backoff))
            .await;
    }

    /// Renews `name` unless another region is already doing it or it is in
    /// backoff; the old certificate keeps being served until the new one is in.
    pub async fn renew(&self, issuer: &Arc<Issuer>, name: &str) {
        if let Some((_, not_before)) = self.failures.get(name).await
            && Instant::now() < not_before
        {
            return;
        }
        match issuer.issue(name).await {
            Ok(Issued::Ordered {
                chain_pem,
                key_pem,
                issuer,
            }) => match edgefront_certs::load(name, &chain_pem, key_pem.as_bytes()) {
                Ok(loaded) => {
                    self.install(name, loaded, &issuer);
                    self.failures.invalidate(name).await;
                    self.metrics
                        .acme_orders
                        .with_label_values(&["renewed"])
                        .inc();
                    tracing::info!(sni = %name, "certificate renewed");
                }
                Err(e) => {
                    tracing::warn!(sni = %name, error = %e, "renewed certificate does not load")
                }
            },
            // Another region renewed it already; this replica had not caught up.
            Ok(Issued::Stored(stored)) => match self.install_stored(name, &stored) {
                Ok(()) => {
                    self.failures.invalidate(name).await;
                    self.metrics
                        .acme_orders
                        .with_label_values(&["reused"])
                        .inc();
                    tracing::info!(sni = %name, "certificate renewed by another region; loaded from the primary");
                }
                Err(e) => {
                    tracing::warn!(sni = %name, error = %e, "certificate from the primary does not load")
                }
            },
            Err(IssueError::Busy) => {}
            Err(e) => {
                tracing::warn!(sni = %name, error = %e, "certificate renewal failed; will retry with backoff");
                let outcome = if matches!(e, IssueError::Refused { .. }) {
                    "refused"
                } else {
                    "failed"
                };
                self.record_failure(name, outcome).await;
            }
        }
    }

    /// The map key that serves `host`: itself, or the platform wildcard.
    fn cert_name(&self, host: &Hostname) -> String {
        match host.platform_slug(&self.platform_domain) {
            Some(_) => format!("*.{}", self.platform_domain),
            None => host.as_str().to_owned(),
        }
    }

    /// Whether a certificate serves `host` (loaded, or issued on first
    /// sight, as a handshake would); `OverBudget` when it is not in memory
    /// and `client` may not have it looked up now.
    pub async fn serves(&self, host: &Hostname, client: Option<IpAddr>) -> Serves {
        if let Some(wait) = self.ensure(host.as_str(), client).await {
            return Serves::OverBudget(wait);
        }
        if self.certs.get(host.as_str()).is_some() {
            Serves::Yes
        } else {
            Serves::No
        }
    }

    /// Makes sure the certificate for `sni` is in memory if it exists. A
    /// lookup on the replica counts against `client`'s miss budget; over it,
    /// nothing is looked up (a name not in memory then fails its handshake)
    /// and the wait until the budget allows one is returned.
    pub async fn ensure(&self, sni: &str, client: Option<IpAddr>) -> Option<Duration> {
        let Ok(host) = sni.parse::<Hostname>() else {
            self.metrics
                .tls_lookups
                .with_label_values(&["invalid_name"])
                .inc();
            return None;
        };
        let name = self.cert_name(&host);
        if self.certs.contains(&name) {
            return None;
        }
        // Read before any query: a negative answer is kept only if no change
        // of this name was applied while we looked.
        let generation = self.generations.get(name.as_str());
        if self.unknown.contains_key(&name) {
            self.metrics
                .tls_lookups
                .with_label_values(&["unknown_cached"])
                .inc();
            return None;
        }
        if !name.starts_with("*.")
            && let Some(domains) = &self.domains
            && domains.lookup(&name, || self.replica.hostnames()).await == Some(false)
        {
            self.metrics
                .tls_lookups
                .with_label_values(&["not_registered"])
                .inc();
            return None;
        }
        if let (Some(limits), Some(ip)) = (&self.limits, client)
            && let Err(wait) = limits.check(crate::limits::Limited::Misses, ip)
        {
            self.metrics
                .tls_lookups
                .with_label_values(&["rate_limited"])
                .inc();
            self.metrics
                .rate_limited
                .with_label_values(&[crate::limits::Limited::Misses.label()])
                .inc();
            tracing::debug!(sni = %name, client = %ip, reason = "over the address's miss budget", "certificate lookup refused");
            return Some(wait);
        }
        match self.load(&name).await {
            Ok(true) => self
                .metrics
                .tls_lookups
                .with_label_values(&["loaded"])
                .inc(),
            Ok(false)
                if self.platform_wildcard
                    && name.strip_prefix("*.") == Some(self.platform_domain.as_str()) =>
            {
                // The platform wildcard, proven with DNS-01 in the platform zone.
                if let Some(issuer) = &self.issuer {
                    self.issue_once(issuer, &name).await;
                }
            }
            Ok(false) if self.issuer.is_some() && !name.starts_with("*.") => {
                // The "ask" gate: only registered domains are ever ordered.
                match self.replica.domain_registered(&name).await {
                    Ok(true) => {
                        let Some(issuer) = &self.issuer else {
                            return None;
                        };
                        // Per-store limit: one seller cannot spend the CA's limits.
                        match self.replica.store_issuances_last_hour(&name).await {
                            Ok(n) if n >= self.per_store_per_hour => {
                                self.metrics
                                    .acme_orders
                                    .with_label_values(&["store_rate_limited"])
                                    .inc();
                                tracing::warn!(sni = %name, issued_last_hour = n, "store over its certificate issuance limit");
                                return None;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(sni = %name, error = %e, "issuance limit check failed");
                                return None;
                            }
                        }
                        self.issue_once(issuer, &name).await;
                    }
                    Ok(false) => {
                        self.metrics
                            .tls_lookups
                            .with_label_values(&["unknown"])
                            .inc();
                        self.remember_unknown(name, generation).await;
                    }
                    Err(e) => tracing::warn!(sni = %name, error = %e, "domain lookup failed"),
                }
            }
            Ok(false) => {
                self.metrics
                    .tls_lookups
                    .with_label_values(&["unknown"])
                    .inc();
                self.remember_unknown(name, generation).await;
            }
            Err(e) => {
                self.metrics.tls_lookups.with_label_values(&["error"]).inc();
                tracing::warn!(sni = %name, error = %e, "certificate lookup failed");
            }
        }
        None
    }

    /// Issues `name` on first sight; concurrent first handshakes for one
    /// name share one issuance, bounded by [`ISSUE_WAIT`].
    async fn issue_once(&self, issuer: &Arc<Issuer>, name: &str) {
        let r = self
            .issuing
            .try_get_with(name.to_owned(), async {
                tokio::time::timeout(ISSUE_WAIT, self.issue(issuer, name))
                    .await
                    .map_err(|_| "issuance timed out".to_owned())?
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(sni = %name, error = %e, "certificate issuance failed");
        }
    }

    /// Negative-caches `name`, unless a change of it was applied since
    /// `generation` was read (the answer may predate it).
    async fn remember_unknown(&self, name: String, generation: u64) {
        self.unknown.insert(name.clone(), ()).await;
        // Insert, then check: the tail bumps before it evicts, so either we
        // see its bump here or its eviction comes after our insert.
        if self.generations.get(name.as_str()) != generation {
            self.unknown.invalidate(&name).await;
        }
    }

    /// Loads `name` from the replica into memory, so that a change of the
    /// name applied meanwhile is never undone: re-read until no invalidation
    /// landed during the read (see [`Generations::fill`]).
    async fn load(&self, name: &str) -> Result<bool, String> {
        let (found, settled) = self
            .generations
            .fill(name, 3, || self.load_once(name))
            .await?;
        if !settled {
            // Still changing under us: keep nothing; the next handshake reads again.
            self.certs.remove(name);
            return Ok(false);
        }
        Ok(found)
    }

    async fn load_once(&self, name: &str) -> Result<bool, String> {
        let Some(row) = self
            .replica
            .certificate(name)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(false);
        };
        let key = self
            .sealer
            .open(name, &row.key_nonce, &row.key_ciphertext)
            .map_err(|e| e.to_string())?;
        let check = name
            .strip_prefix("*.")
            .map_or(name.to_owned(), |p| format!("x.{p}"));
        let loaded =
            edgefront_certs::load(&check, &row.chain_pem, &key).map_err(|e| e.to_string())?;
        self.install(name, loaded, issuer_label(row.issuer.as_deref()));
        Ok(true)
    }

    /// Forgets what is known about `name` (a certificate or domain changed).
    pub async fn invalidate(&self, name: &str) {
        // Bump before evicting: a lookup reading the replica right now will
        // not keep what it read.
        self.generations.bump(name);
        self.unknown.invalidate(name).await;
        if !self.certs.contains(name) {
            return;
        }
        // Replace in place rather than evict: a handshake that is about to use
        // the current certificate (e.g. one that just waited for issuance) must
        // still find one. The change-log row travels with the data, so the
        // replica already has the new row (or no row any more).
        match self.load(name).await {
            Ok(true) => {}
            Ok(false) => self.certs.remove(name),
            Err(e) => {
                tracing::warn!(sni = %name, error = %e, "reloading a changed certificate failed; serving the previous one")
            }
        }
        self.publish_metrics();
    }
}

#[async_trait]
impl PreTlsProcess for CertLoader {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        if let (Some((slots, max)), Some(ip)) = (&self.connection_cap, client) {
            let Some(slot) = slots.take_or_refuse(ip, *max, &self.metrics) else {
                return pingora::Error::e_explain(
                    pingora::ErrorType::Custom("per-address connection cap"),
                    format!("{ip}: too many open connections from this address"),
                );
            };
            stream.tracer = Some(crate::conn::HandshakeSlot::tracer(slot));
        }
        let mut buf = Vec::with_capacity(1024);
        let read = tokio::time::timeout(HELLO_TIMEOUT, async {
            let mut chunk = [0u8; 4096];
            loop {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(Hello::Invalid);
                }
                buf.extend_from_slice(&chunk[..n]);
                match edgefront_certs::sni(&buf) {
                    Hello::Incomplete if buf.len() < MAX_HELLO => continue,
                    Hello::Incomplete => return Ok(Hello::Invalid),
                    other => return Ok(other),
                }
            }
        })
        .await;
        let hello = match read {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                return pingora::Error::e_explain(
                    pingora::ErrorType::ReadError,
                    format!("client hello: {e}"),
                );
            }
            Err(_) => {
                return pingora::Error::e_explain(
                    pingora::ErrorType::ReadTimedout,
                    "client hello timed out",
                );
            }
        };
        if let Hello::Sni(Some(name)) = &hello {
            use tracing::Instrument;
            // Loading (or issuing) the certificate before the handshake.
            self.ensure(name, client)
                .instrument(tracing::info_span!(
                    "tls",
                    otel.name = "tls handshake: certificate",
                    tls.server_name = %name,
                ))
                .await;
        }
        // The handshake reads the same bytes again; without SNI or with an
        // unknown name, the resolver has nothing and rustls sends an alert.
        stream.rewind(&buf);
        Ok(())
    }
}

/// The issuer label of a stored certificate: its ACME directory's name, or
/// `uploaded` for one an operator uploaded.
fn issuer_label(issuer: Option<&str>) -> &str {
    issuer.unwrap_or("uploaded")
}

/// The SNI recorded on a session's TLS connection, if it is one.
pub fn session_sni(digest: Option<&pingora::protocols::Digest>) -> Option<Option<String>> {
    let ssl = digest?.ssl_digest.as_ref()?;
    Some(ssl.extension.get::<Sni>().map(|s| s.0.clone()))
}

/// Renews certificates with a third of their lifetime left, on a jittered
/// schedule; leases make sure one region renews each name.
pub struct Renewer {
    pub region: String,
    pub loader: Arc<CertLoader>,
    pub replica: Replica,
    pub every: Duration,
}

#[async_trait]
impl pingora::services::background::BackgroundService for Renewer {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let Some(issuer) = self.loader.issuer.clone() else {
            return;
        };
        self.loader.publish_metrics();
        loop {
            // Jitter in [0.5, 1.5) × the interval, so regions do not all check at once.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let wait = self.every.mul_f64(0.5 + f64::from(nanos % 1000) / 1000.0);
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            self.loader.publish_metrics();
            match self
                .replica
                .due_for_renewal(self.loader.platform_wildcard)
                .await
            {
                Ok(names) => {
                    for name in names {
                        self.loader.renew(&issuer, &name).await;
                    }
                }
                Err(e) => tracing::warn!(region = %self.region, error = %e, "renewal check failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    /// A client over its miss budget learns nothing about a name whose
    /// certificate is not in memory: neither "no certificate" (which would
    /// serve the name over plain HTTP) nor a lookup on the replica.
    #[tokio::test]
    async fn a_client_over_its_miss_budget_gets_no_answer_either_way() {
        let n = |v| NonZeroU32::new(v).expect("non-zero");
        let rate = crate::limits::Rate {
            per_second: n(1),
            burst: n(1),
        };
        let mut loader = CertLoader::new(
            // Nothing listens on port 1: a lookup fails fast.
            Replica::with_acquire_timeout(
                "postgres://edgefront@127.0.0.1:1/edgefront",
                1,
                Duration::from_millis(200),
            ),
            Arc::new(CertMap::default()),
            Arc::new(
                Sealer::from_hex(
                    "5e1f0a9d2c3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f708192a3b4c5d6e7f",
                )
                .expect("key"),
            ),
            "shops.example".into(),
            Arc::new(Metrics::new("lon1").expect("metrics")),
        );
        loader.limits = Some(Arc::new(crate::limits::ClientLimits::new(
            crate::limits::Settings {
                store_creations_per_hour: n(10),
                domain_claims_per_hour: n(10),
                origin_requests: rate,
                misses: rate,
            },
        )));
        let host: Hostname = "maybe-certified.example".parse().expect("host");
        let client = Some(IpAddr::from([192, 0, 2, 7]));
        // The budget's one lookup: the replica cannot say, so no certificate.
        assert_eq!(loader.serves(&host, client).await, Serves::No);
        // Over the budget: not "no", a wait.
        assert!(matches!(
            loader.serves(&host, client).await,
            Serves::OverBudget(w) if w > Duration::ZERO
        ));
        // Another client's budget is its own.
        assert_eq!(
            loader
                .serves(&host, Some(IpAddr::from([192, 0, 2, 8])))
                .await,
            Serves::No
        );
    }
}
