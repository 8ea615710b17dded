//! Wiring: builds the Pingora server (shopper listener + admin listener) from
//! a validated [`Config`].

use std::sync::Arc;

use pingora::apps::http_app::HttpServer;
use pingora::server::Server;
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::cache::PageCache;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Edge;
use crate::replica::Replica;
use crate::ryw::{Keys, PrimaryBudget, ReadYourWrites};
use crate::tail::{Freshness, Tail};
use crate::tls::{CertLoader, Renewer, SniRecorder};
use edgefront_certs::acme::{Issuer, IssuerConfig};
use edgefront_certs::{CertMap, Resolver};
use pingora::listeners::tls::TlsSettings;

/// How long an HTTP/2 connection may stay without a stream (browsers keep
/// theirs about as long; nginx's default keep-alive is 75 s).
pub const H2_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The graceful-upgrade socket of an edge: where a new process started with
/// `--upgrade` waits for the running one's listening sockets (sent on its
/// SIGQUIT). Per region and listener, so both processes name the same one.
pub fn upgrade_sock(cfg: &Config) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "edgefront-edge-{}-{}.upgrade.sock",
        cfg.region,
        cfg.listen.port()
    ))
}

/// The addresses an edge listens on, as it names them to pingora (which
/// names them so in a hand-off): shoppers, TLS (when `tls`), admin.
pub fn listeners(cfg: &Config, tls: bool) -> Vec<String> {
    std::iter::once(cfg.listen)
        .chain(cfg.tls_listen.filter(|_| tls))
        .chain([cfg.admin_listen])
        .map(|a| a.to_string())
        .collect()
}

/// Loads the set of registered domains in the background as the edge
/// starts, so a flood of made-up names or SNIs right after a start or an
/// upgrade is answered from memory instead of queueing behind its first
/// load. The start never waits for it; `/healthz` does (at most
/// [`WARM_UP_BOUND`]), so the health hook announces a warm edge. Its query
/// goes over a connection of its own: the proxy's pools are made on the
/// proxy's runtime, never here (crate::replica), and warmed there by
/// [`WarmPools`]. A replica that is down is only logged here (the tail and
/// `/healthz` report it).
struct WarmUp {
    replica: Replica,
    domains: Arc<crate::cache::DomainSet>,
    /// Dropped when the load is over: `/healthz` says `warming_up` until then.
    warming: std::sync::Mutex<Option<crate::traffic::Warming>>,
}

/// Connections of the certificate loader's replica pool.
const CERT_POOL: u32 = 2;

/// Longest the warm-up holds `/healthz` back; past it the edge says healthy.
const WARM_UP_BOUND: std::time::Duration = std::time::Duration::from_secs(3);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for WarmUp {
    async fn start(&self, _shutdown: pingora::server::ShutdownWatch) {
        let _warming = self.warming.lock().ok().and_then(|mut w| w.take());
        let t0 = std::time::Instant::now();
        let load = self.domains.lookup("", || self.replica.hostnames());
        let complete = tokio::time::timeout(WARM_UP_BOUND, load).await.is_ok();
        tracing::info!(
            ms = t0.elapsed().as_millis() as u64,
            complete,
            "warm-up over: domain set"
        );
    }
}

/// The shopper listener's service, which first opens the proxy's replica
/// pools (pages, certificates) on its own runtime, beside its listeners:
/// the first shoppers after a start or an upgrade find connections open
/// instead of each waiting for PostgreSQL's TLS handshake and
/// authentication (140-300 ms measured under the flood bench). The
/// listeners do not wait for it; `/healthz` does, within [`WARM_UP_BOUND`].
struct WarmPools<S> {
    inner: S,
    /// Each pool with the number of connections to open.
    pools: Vec<(Replica, u32)>,
    /// Then the pages the edge this one took over from had cached
    /// (crate::reload::handed_pages), rendered into the cache.
    pages: Arc<crate::pages::Pages>,
    certs: Option<Arc<CertLoader>>,
    handed: std::path::PathBuf,
    /// The change feed's applied position: pages are warmed only once the
    /// feed has started (starting, it drops the whole cache).
    fed: tokio::sync::watch::Receiver<edgefront_schema::Lsn>,
    warming: Option<crate::traffic::Warming>,
}

#[async_trait::async_trait]
impl<S: pingora::services::Service> pingora::services::Service for WarmPools<S> {
    async fn start_service(
        &mut self,
        fds: Option<pingora::server::ListenFds>,
        shutdown: pingora::server::ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let pools = std::mem::take(&mut self.pools);
        let warming = self.warming.take();
        let (pages, certs, handed) = (self.pages.clone(), self.certs.clone(), self.handed.clone());
        let mut fed = self.fed.clone();
        // Spawned here, so on this service's runtime, where the pools live.
        tokio::spawn(async move {
            let _warming = warming;
            let t0 = std::time::Instant::now();
            let mut opening = tokio::task::JoinSet::new();
            for (pool, n) in pools {
                opening.spawn(async move { pool.warm(n).await });
            }
            let outcome = match tokio::time::timeout(WARM_UP_BOUND, opening.join_all()).await {
                Ok(done) => done
                    .iter()
                    .map(|r| {
                        r.as_ref()
                            .map_or_else(|e| e.to_string(), |n| format!("{n} open"))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                Err(_) => "not within the bound".to_owned(),
            };
            tracing::info!(
                ms = t0.elapsed().as_millis() as u64,
                %outcome,
                "warm-up over: the proxy's replica pools"
            );
            let t1 = std::time::Instant::now();
            let warm = async {
                if std::fs::symlink_metadata(&handed).is_err() {
                    return (0, 0); // a start, not a hand-over
                }
                // Bounded with the rest: a silent replica never starts the feed.
                let _ = fed.wait_for(|applied| applied.0 > 0).await;
                crate::reload::warm_handed_pages(pages, certs, &handed).await
            };
            match tokio::time::timeout(WARM_UP_BOUND, warm).await {
                Ok((0, _)) => {}
                Ok((named, cached)) => tracing::info!(
                    ms = t1.elapsed().as_millis() as u64,
                    named,
                    cached,
                    "warm-up over: the pages the previous edge had cached"
                ),
                Err(_) => tracing::warn!(
                    "warm-up: the previous edge's pages were not all rendered within the bound"
                ),
            }
        });
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn runtime_opts_override(
        &self,
        global: &pingora::server::RuntimeOpts,
    ) -> Option<pingora::server::RuntimeOpts> {
        self.inner.runtime_opts_override(global)
    }

    fn on_startup_delay(&self, time_waited: std::time::Duration) {
        self.inner.on_startup_delay(time_waited)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

/// Finds the database's leader among the failover candidates every 500 ms,
/// for read-your-writes reads (the proxy's pool of the new leader connects
/// on its first read). Metric `edgefront_database_leader_candidate`.
struct FollowLeader(Arc<crate::replica::Primaries>, Arc<Metrics>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for FollowLeader {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        self.1.database_leader.set(-1.0);
        loop {
            let changed = self.0.follow(std::time::Duration::from_secs(1)).await;
            self.1
                .database_leader
                .set(self.0.confirmed_leader().map_or(-1.0, |i| i as f64));
            if let Some(leader) = changed {
                match leader {
                    Some(i) => tracing::info!(
                        candidate = i,
                        "read-your-writes follows the database leader"
                    ),
                    None => tracing::warn!(
                        "no database candidate leads: read-your-writes falls back to the replica"
                    ),
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            }
        }
    }
}

/// One line per [`FOLD_WINDOW`] saying how many of pingora's
/// failed-handshake lines were folded away in it (the log keeps one sample
/// of them per window; see `edgefront_schema::telemetry`).
///
/// [`FOLD_WINDOW`]: edgefront_schema::telemetry::FOLD_WINDOW
struct FoldedHandshakeErrors;

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for FoldedHandshakeErrors {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        use edgefront_schema::telemetry::{FOLD_WINDOW, folded_handshake_errors};
        let mut reported = folded_handshake_errors();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(FOLD_WINDOW) => {}
            }
            let folded = folded_handshake_errors();
            if folded > reported {
                tracing::warn!(
                    failed = folded - reported,
                    window_s = FOLD_WINDOW.as_secs(),
                    "TLS handshakes failed and were not logged one by one (one sample line per window; all in edgefront_tls_handshake_failures_total)"
                );
            }
            reported = folded;
        }
    }
}

/// A built edge: the server, and what it names to its successor on a
/// hand-over (crate::reload::Signals): its page cache and certificates.
pub type Built = (
    Server,
    Arc<PageCache>,
    Option<Arc<edgefront_certs::CertMap>>,
);

/// Builds a ready-to-run server. Pools connect lazily on first use. With
/// `upgrade`, the listening sockets are taken over from the running edge
/// (pingora's graceful upgrade: start this one, then SIGQUIT the old one).
pub fn build(cfg: &Config, upgrade: bool) -> Result<Built, String> {
    let run_dir = std::env::temp_dir().join(format!(
        "edgefront-edge-{}-{}",
        cfg.region,
        std::process::id()
    ));
    let conf = ServerConf {
        threads: cfg.threads,
        work_stealing: true,
        // Used only in daemon mode, which the edge does not use.
        pid_file: run_dir.with_extension("pid").display().to_string(),
        upgrade_sock: upgrade_sock(cfg).display().to_string(),
        // Shut down promptly: drain is the health hook's job, not the process's.
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(5),
        ..ServerConf::default()
    };
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);

    let metrics = Arc::new(Metrics::new(cfg.region.as_str()).map_err(|e| format!("metrics: {e}"))?);
    let cache = Arc::new(PageCache::new(
        cfg.cache_ttl,
        cfg.cache_max_bytes,
        cfg.negative_cache_entries,
    ));
    let limits = Arc::new(crate::limits::ClientLimits::new(cfg.limits));
    let (fresh, applied) = Freshness::new();
    let fed_watch = fresh.applied_watch();
    // Open connections per client address, shared by the connection guard
    // and (for TLS, from before the handshake) the certificate loader.
    let slots = Arc::new(crate::conn::Slots::default());
    let pages_size = (cfg.threads as u32 * 4).max(4);
    let pages = Replica::new(&cfg.replica_url, pages_size).named("edgefront-edge pages");
    let pages_warm = pages.clone();
    let primaries = cfg
        .primary_url
        .as_deref()
        .map(|u| Arc::new(crate::replica::Primaries::new(u, &cfg.primary_standbys, 2)));
    let certs = match (&cfg.tls_listen, &cfg.cert_key) {
        (Some(_), Some(key)) => {
            let sealer =
                edgefront_certs::Sealer::from_hex(key).map_err(|e| format!("cert_key: {e}"))?;
            let mut loader = CertLoader::new(
                Replica::new(&cfg.replica_url, CERT_POOL).named("edgefront-edge certificates"),
                Arc::new(CertMap::default()),
                Arc::new(sealer),
                cfg.platform_domain.clone(),
                metrics.clone(),
            );
            loader.limits = Some(limits.clone());
            loader.domains = Some(cache.domains().clone());
            loader.connection_cap = Some((slots.clone(), cfg.max_connections_per_address));
            let loader = match (
                cfg.acme_directories.is_empty(),
                &cfg.internal_token,
                &cfg.internal,
            ) {
                (false, Some(token), Some(internal)) => {
                    let origin_tls = internal
                        .identity
                        .client_config()
                        .map_err(|e| format!("internal TLS identity: {e}"))?;
                    let issuer = Issuer::new(IssuerConfig {
                        directories: cfg.acme_directories.clone(),
                        failover_after: cfg.acme_failover_after,
                        origins: internal.urls.clone(),
                        origin_tls,
                        internal_token: token.clone(),
                        holder: format!("{}-{}", cfg.region, std::process::id()),
                        orders_per_minute: cfg.acme_orders_per_minute,
                    })
                    .map_err(|e| format!("acme runtime: {e}"))?;
                    let mut loader = loader.with_issuer(issuer);
                    loader.per_store_per_hour = cfg.acme_per_store_per_hour;
                    loader.platform_wildcard = cfg.acme_platform_wildcard;
                    loader
                }
                _ => loader,
            };
            Some(Arc::new(loader))
        }
        _ => None,
    };
    let traffic = Arc::new(crate::traffic::Traffic::default());
    let tail = Tail {
        region: cfg.region.to_string(),
        // Short: the tail is also the replica outage detector.
        replica: Replica::with_acquire_timeout(
            &cfg.replica_url,
            1,
            std::time::Duration::from_millis(300),
        ),
        cache: cache.clone(),
        metrics: metrics.clone(),
        poll: cfg.change_log_poll,
        applied,
        replica_down: fresh.replica_down_flag(),
        primary_seen: fresh.primary_seen_cell(),
        certs: certs.clone(),
    };
    let origin_tls = cfg.origin_tls.as_ref().map(|t| {
        use pingora::utils::tls::{WrappedX509, parse_x509};
        // Checked as X.509 when the configuration was validated.
        let ca: Vec<WrappedX509> =
            t.ca.iter()
                .map(|der| WrappedX509::new(der.clone(), parse_x509))
                .collect();
        (
            t.server_name.clone(),
            Arc::<pingora::protocols::tls::CaType>::from(ca),
        )
    });
    // Failover candidates: pingora's load balancer with an HTTP health check
    // of each origin's /healthz (200 only where the database leads).
    let origins = if cfg.origin_standbys.is_empty() {
        None
    } else {
        use pingora::lb::{LoadBalancer, health_check::HttpHealthCheck};
        let all = std::iter::once(cfg.origin).chain(cfg.origin_standbys.iter().copied());
        let mut lb = LoadBalancer::try_from_iter(all.map(|a| a.to_string()))
            .map_err(|e| format!("origin_standbys: {e}"))?;
        let host = origin_tls
            .as_ref()
            .map_or_else(|| cfg.origin.ip().to_string(), |(n, _)| n.clone());
        let mut hc = HttpHealthCheck::new(&host, origin_tls.is_some());
        hc.req = pingora::http::RequestHeader::build("GET", b"/healthz", None)
            .map_err(|e| format!("health check: {e}"))?;
        hc.req
            .append_header("Host", host.as_str())
            .map_err(|e| format!("health check: {e}"))?;
        if let Some((_, ca)) = &origin_tls {
            hc.peer_template.options.ca = Some(ca.clone());
        }
        hc.peer_template.options.connection_timeout = Some(std::time::Duration::from_millis(500));
        hc.peer_template.options.read_timeout = Some(std::time::Duration::from_secs(1));
        lb.set_health_check(Box::new(hc));
        lb.health_check_frequency = Some(std::time::Duration::from_millis(500));
        // One round before serving: pingora counts a backend healthy until
        // checked, and a standby's origin must not get writes meanwhile.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("origin health check: {e}"))?
            .block_on(lb.backends().run_health_check(true));
        let bg = pingora::services::background::background_service("origin-health", lb);
        let lb = bg.task();
        server.add_service(bg);
        Some(lb)
    };
    let pages_source = Arc::new(crate::pages::Pages {
        region: cfg.region.to_string(),
        platform_domain: cfg.platform_domain.clone(),
        replica: pages,
        primary: primaries.clone(),
        cache: cache.clone(),
        fresh,
        ryw: ReadYourWrites {
            keys: match &cfg.ryw_keys {
                Some(k) => Keys::parse(k).map_err(|e| format!("ryw_keys: {e}"))?,
                None => {
                    tracing::warn!(region = %cfg.region, "no ryw_keys: read-your-writes cookies verify only on this edge process");
                    Keys::random()
                }
            },
            max_age: cfg.ryw_cookie_max_age,
            wait: cfg.read_your_writes_wait,
            budget: PrimaryBudget::new(cfg.ryw_primary_concurrency, cfg.ryw_primary_per_second),
        },
        metrics: metrics.clone(),
        limits: limits.clone(),
    });
    let edge = Edge {
        pages: pages_source.clone(),
        region: cfg.region.to_string(),
        origin: cfg.origin,
        origins,
        origin_tls,
        limits,
        https_port: cfg.tls_listen.map(|a| a.port()),
        http_redirect: cfg.http_redirect,
        hsts: cfg.hsts.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        traffic: traffic.clone(),
    };
    // Pingora's proxy behind the connection guard (crate::conn): a cap on
    // connections per client address and a deadline for request headers.
    let mut http = pingora::proxy::http_proxy(&server.configuration, edge);
    // An HTTP/2 connection with no stream for this long is closed (the guard
    // does not time HTTP/2; without this a silent client holds one for ever).
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2_idle_timeout = Some(H2_IDLE_TIMEOUT);
    http.server_options = Some(options);
    let guard = crate::conn::Guard {
        inner: Arc::new(http),
        slots,
        limits: crate::conn::Limits {
            header_timeout: cfg.header_timeout,
            max_per_address: cfg.max_connections_per_address,
        },
        metrics: metrics.clone(),
        traffic: traffic.clone(),
        hooked: Default::default(),
        tls_slotted: certs.is_some(),
    };
    let mut proxy = Service::new("edge".to_owned(), guard);
    // The names crate::server::listeners gives a reload's hand-off.
    proxy.add_tcp(&cfg.listen.to_string());
    if let (Some(addr), Some(loader)) = (cfg.tls_listen, &certs) {
        let mut tls =
            TlsSettings::with_callbacks(Box::new(SniRecorder)).map_err(|e| format!("tls: {e}"))?;
        tls.set_cert_resolver(Arc::new(Resolver(loader.certs.clone())));
        tls.enable_h2();
        proxy.add_tls_with_settings(&addr.to_string(), None, tls);
        proxy.endpoints().set_pre_tls_callback(loader.clone());
    }

    let admin = Admin {
        traffic: traffic.clone(),
        token: cfg.admin_token.clone(),
        region: cfg.region.to_string(),
        replica: Replica::new(&cfg.replica_url, 2),
        metrics: metrics.clone(),
        max_lag: cfg.max_replica_lag,
        lag: Default::default(),
    };
    let mut admin_svc = Service::new("admin".to_owned(), HttpServer::new_app(admin));
    admin_svc.add_tcp(&cfg.admin_listen.to_string());
    admin_svc.threads = Some(1);

    server.add_service(pingora::services::background::background_service(
        "changelog-tail",
        tail,
    ));
    if let Some(p) = primaries.filter(|p| p.has_standbys()) {
        server.add_service(pingora::services::background::background_service(
            "primary-follower",
            FollowLeader(p, metrics),
        ));
    }
    server.add_service(pingora::services::background::background_service(
        "folded-handshake-errors",
        FoldedHandshakeErrors,
    ));
    server.add_service(pingora::services::background::background_service(
        "ready",
        crate::reload::Ready {
            traffic: traffic.clone(),
            ready_file: (upgrade && std::env::var_os(crate::reload::RELOAD_ENV).is_some())
                .then(|| crate::reload::ready_file(&upgrade_sock(cfg))),
        },
    ));
    server.add_service(pingora::services::background::background_service(
        "warm-up",
        WarmUp {
            // Its own bound, not the pool's usual 1.5 s wait.
            replica: Replica::with_acquire_timeout(&cfg.replica_url, 1, WARM_UP_BOUND),
            domains: cache.domains().clone(),
            warming: std::sync::Mutex::new(Some(traffic.warm_up())),
        },
    ));
    if let Some(loader) = certs.as_ref().filter(|l| l.issuer.is_some()) {
        let renewer = Renewer {
            region: cfg.region.to_string(),
            loader: loader.clone(),
            replica: Replica::new(&cfg.replica_url, 1),
            every: cfg.acme_renew_check,
        };
        server.add_service(pingora::services::background::background_service(
            "acme-renewal",
            renewer,
        ));
    }
    server.add_service(WarmPools {
        inner: proxy,
        // The whole page pool. The warm-up holds what it opens until the
        // slowest is open, so a shopper arriving meanwhile (after an
        // upgrade) waits for that instead of opening a connection of its
        // own, which costs the same. Half the pool left the first requests
        // opening their own: 100-134 ms instead of 13-58 ms in the flood
        // bench (docs/benchmarks.md).
        pools: std::iter::once((pages_warm, pages_size))
            .chain(certs.as_ref().map(|l| (l.replica.clone(), CERT_POOL)))
            .collect(),
        pages: pages_source,
        certs: certs.clone(),
        fed: fed_watch,
        handed: crate::reload::handed_pages(&upgrade_sock(cfg)),
        warming: Some(traffic.warm_up()),
    });
    server.add_service(admin_svc);
    // Last: with --upgrade this takes the running edge's sockets, so nothing
    // that can still fail comes after it.
    server.bootstrap();
    let cert_map = certs.as_ref().map(|l| l.certs.clone());
    Ok((server, cache, cert_map))
}
