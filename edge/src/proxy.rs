//! The edge's Pingora `ProxyHttp` implementation: it only sequences phases.
//!
//! `request_filter` classifies the request ([`crate::route`]); storefront
//! pages are served from the cache or rendered from the replica and written
//! here (`Ok(true)`), everything else goes on to `upstream_peer`, which only
//! ever names the origin. Every response carries `x-edge-route`: local ones
//! are stamped where they are built, proxied ones in `response_filter`, and
//! proxy failures in `fail_to_proxy`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracing::Instrument;

use async_trait::async_trait;
use bytes::Bytes;
use edgefront_schema::{COMMIT_LSN_HEADER, Hostname, Lsn, StoreId};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};

use crate::cache::{Entry, PageCache, if_none_match};
use crate::headers::{
    CACHE_NAME, CACHE_STATUS, SERVER_TIMING, X_EDGE_REGION, X_EDGE_ROUTE, X_FORWARDED_FOR,
};
use crate::limits::Limited;
use crate::metrics::Metrics;
use crate::render;
use crate::replica::Replica;
use crate::route::{Page, Route, classify};
use crate::ryw::ReadYourWrites;
use crate::tail::Freshness;

/// Largest request body forwarded to the origin.
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest total size of request header names and values.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Total size of a request's header names and values.
pub fn header_bytes(req: &RequestHeader) -> usize {
    req.headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri.path_and_query().map_or(0, |p| p.as_str().len())
}

/// The edge service's shared state.
pub struct Edge {
    /// Storefront pages: cache, replica, render.
    pub pages: Arc<Pages>,
    pub region: String,
    pub platform_domain: String,
    pub origin: SocketAddr,
    /// With failover candidates: the origins, of which requests go to the
    /// one whose health check passes (its database leads).
    pub origins: Option<Arc<pingora::lb::LoadBalancer<pingora::lb::selection::RoundRobin>>>,
    /// TLS to the origin: the server name its certificate must carry and
    /// the CA it must chain to (nothing else is trusted).
    pub origin_tls: Option<(String, Arc<pingora::protocols::tls::CaType>)>,
    pub replica: Replica,
    /// The primary, read only for read-your-writes when the replica is behind.
    /// The database's leader (and the candidates it may move to), for
    /// read-your-writes reads.
    pub primary: Option<Arc<crate::replica::Primaries>>,
    pub cache: Arc<PageCache>,
    pub fresh: Freshness,
    /// Read-your-writes cookies and the primary-read budget.
    pub ryw: ReadYourWrites,
    /// Abuse limits: per client address and per store (crate::limits).
    pub limits: Arc<crate::limits::ClientLimits>,
    /// The TLS listener's port, when TLS is on.
    pub https_port: Option<u16>,
    /// `Strict-Transport-Security` value sent on every TLS response.
    pub hsts: Option<String>,
    /// Certificates: plain HTTP is redirected only for names that have one.
    pub certs: Option<Arc<crate::tls::CertLoader>>,
    /// Redirect plain HTTP to https.
    pub http_redirect: bool,
    pub metrics: Arc<Metrics>,
    /// In-flight requests and the drain switch, shared with the admin listener.
    pub traffic: Arc<crate::traffic::Traffic>,
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    route: Route,
    host: String,
    cache: &'static str,
    body_bytes: usize,
    upstream_start: Option<Instant>,
    _in_flight: crate::traffic::InFlight,
    /// The request's span (exported when tracing is on).
    span: tracing::Span,
    /// The upstream (origin) call's span, while it lasts.
    upstream_span: Option<tracing::Span>,
}

/// Why a page could not be produced.
#[derive(Debug, Clone, thiserror::Error)]
enum PageError {
    /// The replica query failed or timed out.
    #[error("replica: {0}")]
    Replica(String),
    /// A template failed to render (a bug).
    #[error("render: {0}")]
    Render(String),
    /// Over a budget of lookups no cache answers; retry after the wait.
    #[error("over the {} budget", .0.label())]
    Limited(Limited, Duration),
    /// The page does not exist (rendered 404): it goes to the negative
    /// cache, never to the page cache.
    #[error("no such page")]
    NotFound(Arc<Entry>),
}

/// How a page lookup was answered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lookup {
    Hit,
    Miss,
    Coalesced,
    /// From the negative cache (a page that does not exist).
    Negative,
}

impl Lookup {
    fn label(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Coalesced => "coalesced",
            Lookup::Negative => "negative",
        }
    }

    /// The `cache-status` value with a declared degradation as its detail:
    /// `read-your-writes-behind` (the client's write is not replayed here and
    /// the primary read was not available) or `replica-lag` (the replica is
    /// over its lag budget: the page may be older than the primary).
    fn cache_status_with(self, degraded: Option<&str>) -> String {
        match (self, degraded) {
            (Lookup::Hit, None) => format!("{CACHE_NAME}; hit"),
            (Lookup::Coalesced, None) => format!("{CACHE_NAME}; hit; detail=coalesced"),
            (Lookup::Negative, _) => format!("{CACHE_NAME}; hit; detail=negative"),
            (Lookup::Miss, None) => format!("{CACHE_NAME}; fwd=miss; stored"),
            (Lookup::Hit | Lookup::Coalesced, Some(d)) => format!("{CACHE_NAME}; hit; detail={d}"),
            (Lookup::Miss, Some(d)) => format!("{CACHE_NAME}; fwd=miss; stored; detail={d}"),
        }
    }
}

fn header_str(req: &RequestHeader, name: http::header::HeaderName) -> Option<&str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The client's address as the connection shows it (never a header).
fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// The request's host: the `Host` header, or the URI authority (HTTP/2).
fn request_host(req: &RequestHeader) -> Option<&str> {
    header_str(req, http::header::HOST).or_else(|| req.uri.authority().map(|a| a.as_str()))
}

/// What a storefront page is made from: the page cache and the region's
/// replica. Shared by the proxy and the start's warm-up
/// (crate::server::WarmPools), which renders the pages the edge it took
/// over from had cached.
pub struct Pages {
    pub region: String,
    pub replica: Replica,
    pub cache: Arc<PageCache>,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<crate::limits::ClientLimits>,
}

impl Pages {
    /// `store`'s slug directory (loaded once per store change, coalesced).
    /// Keyed like the page that asks (its epoch and store generation), so a
    /// 404 rendered for one generation is never kept for the next.
    async fn directory(
        &self,
        store: StoreId,
        key: crate::cache::DirectoryKey,
    ) -> Result<Arc<crate::cache::Directory>, PageError> {
        self.cache
            .directories()
            .try_get_with(key, async {
                self.replica
                    .slugs(store)
                    .await
                    .map(Arc::new)
                    .map_err(|e| PageError::Replica(e.to_string()))
            })
            .await
            .map_err(|e: Arc<PageError>| (*e).clone())
    }

    /// Spends one of `client`'s lookups no cache answers.
    fn spend_miss(&self, client: Option<IpAddr>) -> Result<(), PageError> {
        match client.map(|ip| self.limits.check(Limited::Misses, ip)) {
            Some(Err(wait)) => Err(PageError::Limited(Limited::Misses, wait)),
            _ => Ok(()),
        }
    }

    /// A store's page: the page cache, else the replica and a render
    /// (concurrent misses render once); `client` spends its miss budget
    /// for a page never rendered here.
    async fn page(
        &self,
        store: StoreId,
        page: Page,
        client: Option<IpAddr>,
    ) -> Result<(Arc<Entry>, Lookup), PageError> {
        let key = self.cache.key(store, page.clone());
        if let Some(e) = self.cache.pages().get(&key).await {
            return Ok((e, Lookup::Hit));
        }
        if let Some(e) = self.cache.not_found().get(&key).await {
            return Ok((e, Lookup::Negative));
        }
        // A page never rendered here (no stale copy either) is what a flood
        // of made-up slugs asks for: the store's slug directory tells from
        // memory whether it exists (one load per store change), and a page
        // that does exist costs the client's miss budget. Pages rendered
        // here before are never refused.
        let mut directory = None;
        if !self.cache.last_good().contains_key(&(store, page.clone())) {
            if page != Page::Home(1) {
                let dir = self
                    .directory(store, (key.epoch, store, key.generation))
                    .await?;
                if !dir.has(&page)
                    && let Some(e) = dir.not_found(&page)
                {
                    return Ok((e, Lookup::Negative));
                }
                directory = Some(dir);
            }
            self.spend_miss(client)?;
        }
        let rendered_here = AtomicBool::new(false);
        let negative_key = key.clone();
        let entry = self
            .cache
            .pages()
            .try_get_with(key, async {
                rendered_here.store(true, Ordering::Relaxed);
                let t0 = Instant::now();
                let data = self
                    .replica
                    .page_data(store, &page)
                    .instrument(tracing::info_span!("replica query"))
                    .await
                    .map_err(|e| PageError::Replica(e.to_string()))?;
                let t1 = Instant::now();
                let (status, html) = match data {
                    Some(d) => {
                        let _render = tracing::info_span!("render").entered();
                        let r = render::page(&d, &page, &self.region)
                            .map_err(|e| PageError::Render(e.to_string()))?;
                        (r.status, r.html)
                    }
                    None => (
                        404,
                        render::error_page(
                            404,
                            "Store not found",
                            "This store no longer exists.",
                            &self.region,
                        ),
                    ),
                };
                let t2 = Instant::now();
                let (db, rend) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
                self.metrics
                    .render
                    .with_label_values(&["replica"])
                    .observe(db);
                self.metrics
                    .render
                    .with_label_values(&["template"])
                    .observe(rend);
                let entry = Arc::new(Entry::new(
                    store,
                    status,
                    Bytes::from(html),
                    db * 1e3,
                    rend * 1e3,
                ));
                if status == 404 {
                    // Gone or never there: no stale copy of what it was
                    // either, and the page cache's bytes stay for real pages.
                    self.cache
                        .last_good()
                        .invalidate(&(store, page.clone()))
                        .await;
                    return Err(PageError::NotFound(entry));
                }
                self.cache
                    .last_good()
                    .insert((store, page.clone()), entry.clone())
                    .await;
                Ok(entry)
            })
            .await;
        let how = if rendered_here.load(Ordering::Relaxed) {
            Lookup::Miss
        } else {
            Lookup::Coalesced
        };
        match entry {
            Ok(entry) => Ok((entry, how)),
            Err(e) => match &*e {
                PageError::NotFound(entry) => {
                    // Under the key read before rendering: a product added
                    // meanwhile bumped the generation, and this 404 is never
                    // found under the new one.
                    self.cache
                        .not_found()
                        .insert(negative_key, entry.clone())
                        .await;
                    if let Some(dir) = directory.filter(|d| !d.has(&page)) {
                        dir.keep_not_found(&page, entry.clone());
                    }
                    Ok((entry.clone(), how))
                }
                other => Err(other.clone()),
            },
        }
    }

    /// Renders `page` of `store` into the cache unless it is there; whether
    /// it is there now (a page the store no longer has is not).
    pub async fn warm(&self, store: StoreId, page: Page) -> bool {
        matches!(self.page(store, page, None).await, Ok((e, _)) if e.status == 200)
    }
}

impl Edge {
    async fn store_for(
        &self,
        host: &Hostname,
        client: Option<IpAddr>,
    ) -> Result<Option<StoreId>, PageError> {
        let key = self.cache.host_key(host.as_str());
        if let Some(s) = self.cache.hosts().get(&key).await {
            return Ok(Some(s));
        }
        if self.cache.unknown_hosts().contains_key(&key) {
            return Ok(None);
        }
        // Known outage: do not wait for a replica connection that will time
        // out when the last known answer is at hand.
        if self.fresh.replica_down()
            && let Some(s) = self.cache.last_hosts().get(host.as_str()).await
        {
            return Ok(Some(s));
        }
        // A custom domain not registered: known from memory.
        let platform = host
            .as_str()
            .strip_suffix(self.platform_domain.as_str())
            .is_some_and(|rest| rest.ends_with('.'));
        if !platform
            && self
                .cache
                .domains()
                .lookup(host.as_str(), || self.replica.hostnames())
                .await
                == Some(false)
        {
            return Ok(None);
        }
        // A host this edge has never known: a replica query, on the
        // client's budget.
        if self.cache.last_hosts().get(host.as_str()).await.is_none() {
            self.pages.spend_miss(client)?;
        }
        let found = match self
            .replica
            .store_for_host(host, &self.platform_domain)
            .await
        {
            Ok(found) => found,
            Err(e) => {
                // The replica cannot answer: the store this host last named
                // (its pages then come from the stale copies, marked).
                return match self.cache.last_hosts().get(host.as_str()).await {
                    Some(s) => Ok(Some(s)),
                    None => Err(PageError::Replica(e.to_string())),
                };
            }
        };
        match found {
            Some(s) => {
                // Only if no invalidation of this host came in meanwhile (its
                // generation, the guard the keyed caches get from their key;
                // a whole-cache drop changes only the epoch and is no reason).
                if self.cache.host_key(host.as_str()).1 == key.1 {
                    self.cache
                        .last_hosts()
                        .insert(host.as_str().to_owned(), s)
                        .await;
                }
                self.cache.hosts().insert(key, s).await;
            }
            None => {
                self.cache.unknown_hosts().insert(key, ()).await;
                self.cache.last_hosts().invalidate(host.as_str()).await;
            }
        }
        Ok(found)
    }

    /// Renders a page from the primary, uncached (read-your-writes fallback).
    async fn render_on_primary(
        &self,
        primary: &Replica,
        store: StoreId,
        page: &Page,
    ) -> Result<Arc<Entry>, PageError> {
        let t0 = Instant::now();
        let data = primary
            .page_data(store, page)
            .await
            .map_err(|e| PageError::Replica(e.to_string()))?;
        let t1 = Instant::now();
        let r = match data {
            Some(d) => render::page(&d, page, &self.region)
                .map_err(|e| PageError::Render(e.to_string()))?,
            None => render::Rendered {
                status: 404,
                html: render::error_page(
                    404,
                    "Store not found",
                    "This store no longer exists.",
                    &self.region,
                ),
            },
        };
        let t2 = Instant::now();
        Ok(Arc::new(Entry::new(
            store,
            r.status,
            Bytes::from(r.html),
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
        )))
    }

    /// Serves a storefront page: cache, else replica + render.
    async fn serve_page(&self, session: &mut Session, ctx: &mut Ctx, page: Page) -> Result<()> {
        let req = session.req_header();
        let head = req.method == http::Method::HEAD;
        let Some(host) = request_host(req).and_then(|h| Hostname::from_host_header(h).ok()) else {
            ctx.cache = "none";
            return self
                .write_error(
                    session,
                    404,
                    "Store not found",
                    "No store is configured for this address.",
                    head,
                )
                .await;
        };
        ctx.host = host.as_str().to_owned();
        let client = client_ip(session);
        let store = match self
            .store_for(&host, client)
            .instrument(
                tracing::info_span!(parent: &ctx.span, "route", otel.name = "route (host → store)"),
            )
            .await
        {
            Ok(Some(s)) => s,
            Ok(None) => {
                ctx.cache = "none";
                let msg = format!("No store is configured for {host}.");
                return self
                    .write_error(session, 404, "Store not found", &msg, head)
                    .await;
            }
            Err(PageError::Limited(what, wait)) => {
                return self
                    .write_limited_page(session, ctx, what, wait, head)
                    .await;
            }
            Err(e) => return self.replica_down(session, ctx, e, head).await,
        };
        // Read-your-writes: never serve this client a page older than its own
        // write — within the primary budget (crate::ryw).
        let mut ryw_behind = false;
        match self
            .ryw
            .client_lsn(&session.req_header().headers, self.fresh.primary_seen())
        {
            Ok(None) => {}
            Err(why) => {
                // Forged, expired or absurd: an ordinary read, no wait.
                self.metrics
                    .read_your_writes
                    .with_label_values(&[why.label()])
                    .inc();
            }
            Ok(Some(lsn)) if self.fresh.wait_for(lsn, self.ryw.wait).await => {
                self.metrics
                    .read_your_writes
                    .with_label_values(&["replica"])
                    .inc();
            }
            Ok(Some(_)) => {
                let permit = self
                    .primary
                    .as_ref()
                    .and_then(|p| p.current())
                    .and_then(|p| Some((p, self.ryw.budget.try_acquire()?)));
                match permit {
                    Some((p, _permit)) => {
                        let entry = self
                            .render_on_primary(p, store, &page)
                            .instrument(tracing::info_span!(parent: &ctx.span, "render on primary"))
                            .await;
                        match entry {
                            Ok(entry) => {
                                self.metrics
                                    .read_your_writes
                                    .with_label_values(&["primary"])
                                    .inc();
                                ctx.cache = "primary";
                                let status = format!(
                                    "{CACHE_NAME}; fwd=bypass; detail=read-your-writes-primary"
                                );
                                let timing = format!(
                                    "primary;dur={:.3}, render;dur={:.3}",
                                    entry.db_ms, entry.render_ms
                                );
                                return self.write_page(session, ctx, &entry, status, timing).await;
                            }
                            Err(e) => {
                                // The primary is unreachable: the replica's page, marked.
                                tracing::debug!(region = %self.region, error = %e, "read-your-writes read on the primary failed");
                                self.metrics
                                    .read_your_writes
                                    .with_label_values(&["primary_failed"])
                                    .inc();
                                ryw_behind = true;
                            }
                        }
                    }
                    None => {
                        // Budget spent (or no primary): the replica's page after
                        // the bounded wait, marked — never an error.
                        self.metrics
                            .read_your_writes
                            .with_label_values(&["budget_spent"])
                            .inc();
                        ryw_behind = true;
                    }
                }
            }
        }
        // Known outage: answer from the last good page at once rather than
        // waiting for a replica connection that will time out.
        let outage = if self.fresh.replica_down() {
            let key = self.cache.key(store, page.clone());
            match self.cache.pages().get(&key).await {
                Some(e) => Ok((e, Lookup::Hit)),
                None => Err(PageError::Replica(
                    "replica unreachable (change-log tail failing)".into(),
                )),
            }
        } else {
            self.pages
                .page(store, page.clone(), client)
                .instrument(
                    tracing::info_span!(parent: &ctx.span, "cache", otel.name = "cache lookup"),
                )
                .await
        };
        let result = match outage {
            Err(e)
                if self.fresh.replica_down()
                    && self
                        .cache
                        .last_good()
                        .get(&(store, page.clone()))
                        .await
                        .is_none() =>
            {
                // Nothing stale to offer: try the replica after all (it may be back).
                let _ = e;
                self.pages
                    .page(store, page.clone(), client)
                    .instrument(
                        tracing::info_span!(parent: &ctx.span, "cache", otel.name = "cache lookup"),
                    )
                    .await
            }
            other => other,
        };
        let (entry, how) = match result {
            Ok(v) => v,
            Err(PageError::Limited(what, wait)) => {
                return self
                    .write_limited_page(session, ctx, what, wait, head)
                    .await;
            }
            Err(e) => {
                // stale-if-error: the last page rendered for this URL, marked as such.
                if let Some(stale) = self.cache.last_good().get(&(store, page)).await {
                    tracing::warn!(region = %self.region, host = %ctx.host, error = %e, "serving stale page: replica unavailable");
                    ctx.cache = "stale";
                    self.metrics.cache.with_label_values(&["stale"]).inc();
                    let status = format!("{CACHE_NAME}; hit; detail=stale-if-error");
                    let timing = format!(
                        "cache;desc=stale;dur={:.3}",
                        ctx.start.elapsed().as_secs_f64() * 1e3
                    );
                    return self.write_page(session, ctx, &stale, status, timing).await;
                }
                return self.replica_down(session, ctx, e, head).await;
            }
        };
        ctx.cache = how.label();
        self.metrics.cache.with_label_values(&[how.label()]).inc();
        let timing = match how {
            Lookup::Miss => format!(
                "replica;dur={:.3}, render;dur={:.3}, total;dur={:.3}",
                entry.db_ms,
                entry.render_ms,
                ctx.start.elapsed().as_secs_f64() * 1e3
            ),
            _ => format!(
                "cache;desc={};dur={:.3}",
                how.label(),
                ctx.start.elapsed().as_secs_f64() * 1e3
            ),
        };
        let degraded = if ryw_behind {
            Some("read-your-writes-behind")
        } else if self.metrics.replica_over_lag_budget.get() > 0.0 {
            Some("replica-lag")
        } else {
            None
        };
        let status = how.cache_status_with(degraded);
        self.write_page(session, ctx, &entry, status, timing).await
    }

    /// Writes a page entry: conditional request, encoding, headers.
    async fn write_page(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        entry: &Entry,
        cache_status: String,
        timing: String,
    ) -> Result<()> {
        let req = session.req_header();
        let head = req.method == http::Method::HEAD;
        let enc = entry.choose(header_str(req, http::header::ACCEPT_ENCODING));
        let etag = entry.etag(enc);
        let not_modified = entry.status == 200
            && header_str(req, http::header::IF_NONE_MATCH)
                .is_some_and(|h| if_none_match(h, &etag));
        let status = if not_modified { 304 } else { entry.status };
        let mut resp = ResponseHeader::build(status, Some(10))?;
        self.stamp(session, &mut resp)?;
        resp.insert_header(CACHE_STATUS, cache_status)?;
        resp.insert_header(SERVER_TIMING, timing)?;
        resp.insert_header(http::header::ETAG, etag.as_str())?;
        resp.insert_header(http::header::VARY, "Accept-Encoding")?;
        resp.insert_header(
            http::header::CACHE_CONTROL,
            "public, max-age=0, must-revalidate",
        )?;
        if not_modified {
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(());
        }
        let body = entry.body(enc);
        resp.insert_header(http::header::CONTENT_TYPE, "text/html; charset=utf-8")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header("x-content-type-options", "nosniff")?;
        resp.insert_header(
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        )?;
        resp.insert_header("referrer-policy", "strict-origin-when-cross-origin")?;
        if let Some(ce) = enc.header() {
            resp.insert_header(http::header::CONTENT_ENCODING, ce)?;
        }
        ctx.body_bytes = if head { 0 } else { body.len() };
        session.write_response_header(Box::new(resp), head).await?;
        if !head {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// A page refused by the client's budget: 429 with `Retry-After`,
    /// counted, never cached.
    async fn write_limited_page(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        what: Limited,
        wait: Duration,
        head: bool,
    ) -> Result<()> {
        ctx.cache = "limited";
        self.metrics
            .rate_limited
            .with_label_values(&[what.label()])
            .inc();
        tracing::debug!(region = %self.region, host = %ctx.host, limit = what.label(), "page refused: over budget");
        self.write_error_retry(
            session,
            429,
            "Too many requests",
            "Too many requests for pages from your address. Please try again in a moment.",
            head,
            Some(wait.as_secs().max(1)),
        )
        .await
    }

    async fn replica_down(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        e: PageError,
        head: bool,
    ) -> Result<()> {
        ctx.cache = "error";
        tracing::warn!(region = %self.region, host = %ctx.host, error = %e, "page unavailable: replica query failed");
        self.write_error(
            session,
            503,
            "Temporarily unavailable",
            "This page cannot be loaded right now. Please try again in a moment.",
            head,
        )
        .await
    }

    /// Headers on every response the edge sends: the region, and over TLS
    /// the HSTS policy.
    fn stamp(&self, session: &Session, resp: &mut ResponseHeader) -> Result<()> {
        resp.insert_header(X_EDGE_ROUTE, self.region.as_str())?;
        if let Some(hsts) = &self.hsts
            && is_tls(session)
        {
            resp.insert_header(http::header::STRICT_TRANSPORT_SECURITY, hsts.as_str())?;
        }
        Ok(())
    }

    /// TLS rules before routing: on TLS, `Host` must name the SNI (421
    /// otherwise); on plain HTTP with redirects on, everything but ACME
    /// challenges goes to https for names with a certificate. `Some(true)` when a response was written.
    async fn tls_policy(&self, session: &mut Session) -> Result<Option<bool>> {
        let sni = crate::tls::session_sni(session.digest());
        // Plain HTTP without redirects (the common lab/test case): nothing to check,
        // so the request path pays no Host parsing here.
        if sni.is_none() && !self.http_redirect {
            return Ok(None);
        }
        let req = session.req_header();
        let head = req.method == http::Method::HEAD;
        let host = request_host(req).and_then(|h| Hostname::from_host_header(h).ok());
        match sni {
            Some(sni) => {
                if sni.is_some() && sni.as_deref() == host.as_ref().map(Hostname::as_str) {
                    return Ok(None);
                }
                session.set_keepalive(None);
                self.write_error(
                    session,
                    421,
                    "Misdirected request",
                    "This connection's TLS name does not match the requested host.",
                    head,
                )
                .await?;
                Ok(Some(true))
            }
            None if self.http_redirect
                && !req.uri.path().starts_with("/.well-known/acme-challenge/") =>
            {
                let Some(host) = host else {
                    // An address or other non-name (`Host: 203.0.113.10`): no
                    // certificate can name it, so nothing to redirect to.
                    if request_host(req).is_some() {
                        return Ok(None);
                    }
                    self.write_error(
                        session,
                        400,
                        "Bad request",
                        "A Host header is required.",
                        head,
                    )
                    .await?;
                    return Ok(Some(true));
                };
                // A name with no certificate yet (its owner still proving it,
                // or the CA down) stays reachable over plain HTTP.
                if let Some(certs) = &self.certs {
                    match certs.serves(&host, client_ip(session)).await {
                        crate::tls::Serves::Yes => {}
                        crate::tls::Serves::No => return Ok(None),
                        // Not known either way: neither plain HTTP (a downgrade
                        // for a name that may have a certificate) nor a guess.
                        crate::tls::Serves::OverBudget(wait) => {
                            session.set_keepalive(None);
                            self.write_rate_limited(session, crate::limits::Limited::Misses, wait)
                                .await?;
                            return Ok(Some(true));
                        }
                    }
                }
                let port = match self.https_port {
                    Some(443) | None => String::new(),
                    Some(p) => format!(":{p}"),
                };
                let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
                let location = format!("https://{host}{port}{path}");
                let code = if head || req.method == http::Method::GET {
                    301
                } else {
                    308
                };
                let mut resp = ResponseHeader::build(code, Some(4))?;
                self.stamp(session, &mut resp)?;
                resp.insert_header(http::header::LOCATION, location)?;
                resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
                session.write_response_header(Box::new(resp), true).await?;
                Ok(Some(true))
            }
            None => Ok(None),
        }
    }

    /// 429 with `Retry-After` and the API's JSON error shape.
    async fn write_rate_limited(
        &self,
        session: &mut Session,
        what: crate::limits::Limited,
        wait: Duration,
    ) -> Result<()> {
        let secs = wait.as_secs().max(1);
        let body = Bytes::from(format!(
            "{{\"error\":{{\"code\":\"rate_limited\",\"limit\":\"{}\",\"message\":\"too many requests of this kind from your address; retry in {secs} s\",\"region\":\"{}\"}}}}\n",
            what.label(),
            self.region
        ));
        let mut resp = ResponseHeader::build(429, Some(6))?;
        self.stamp(session, &mut resp)?;
        resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }

    /// The storefront's 404 page.
    async fn write_not_found(&self, session: &mut Session, head: bool) -> Result<()> {
        self.write_error(
            session,
            404,
            "Page not found",
            "There is no page at this address.",
            head,
        )
        .await
    }

    /// Writes a small HTML error page stamped with the region (a 503 says
    /// to retry in 2 s).
    async fn write_error(
        &self,
        session: &mut Session,
        status: u16,
        title: &str,
        message: &str,
        head: bool,
    ) -> Result<()> {
        let retry = (status == 503).then_some(2);
        self.write_error_retry(session, status, title, message, head, retry)
            .await
    }

    /// [`Edge::write_error`] with `Retry-After: retry_after` seconds.
    async fn write_error_retry(
        &self,
        session: &mut Session,
        status: u16,
        title: &str,
        message: &str,
        head: bool,
        retry_after: Option<u64>,
    ) -> Result<()> {
        let body = Bytes::from(render::error_page(status, title, message, &self.region));
        let mut resp = ResponseHeader::build(status, Some(6))?;
        self.stamp(session, &mut resp)?;
        resp.insert_header(http::header::CONTENT_TYPE, "text/html; charset=utf-8")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        if let Some(secs) = retry_after {
            resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
        }
        session.write_response_header(Box::new(resp), head).await?;
        if !head {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }
}

/// The status and message for a failure to reach or hear from the origin.
/// Nothing was sent when the connection failed, so those are safe to retry
/// (503 + Retry-After); a failure after sending may or may not have committed.
pub fn origin_failure(e: &Error) -> (u16, &'static str) {
    match e.etype() {
        ErrorType::HTTPStatus(code) => (*code, "request refused"),
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError => (503, "origin unavailable; nothing was sent, retry later"),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            (504, "origin timed out; the outcome is unknown")
        }
        _ => match e.esource() {
            ErrorSource::Upstream => (502, "origin failed while answering; the outcome is unknown"),
            ErrorSource::Downstream => (400, "bad request"),
            _ => (500, "internal error"),
        },
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            route: Route::Origin,
            host: String::new(),
            cache: "none",
            body_bytes: 0,
            upstream_start: None,
            _in_flight: self.traffic.begin(),
            span: tracing::info_span!(
                "request",
                otel.name = "edge request",
                otel.kind = "server",
                edgefront.region = %self.region,
                http.request.method = tracing::field::Empty,
                url.path = tracing::field::Empty,
                http.route = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
                edgefront.cache = tracing::field::Empty,
            ),
            upstream_span: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if self.traffic.draining() {
            // HTTP/1.1 answers `Connection: close`; the next request opens a
            // new connection, which follows the route once it is withdrawn.
            session.set_keepalive(None);
        }
        let req = session.req_header();
        // With the query: a listing's page number is in it.
        let target = req
            .uri
            .path_and_query()
            .map_or(req.uri.path(), |p| p.as_str());
        ctx.route = classify(&req.method, target);
        edgefront_schema::telemetry::extract(&ctx.span, &req.headers);
        ctx.span.record("http.request.method", req.method.as_str());
        ctx.span.record("url.path", req.uri.path());
        ctx.span.record("http.route", ctx.route.label());
        if header_bytes(req) > MAX_HEADER_BYTES {
            let head = req.method == http::Method::HEAD;
            session.set_keepalive(None);
            self.write_error(
                session,
                431,
                "Request headers too large",
                "The request's headers are too large.",
                head,
            )
            .await?;
            return Ok(true);
        }
        if let Some(done) = self.tls_policy(session).await? {
            return Ok(done);
        }
        let req = session.req_header();
        match ctx.route.clone() {
            Route::Page(page) => {
                self.serve_page(session, ctx, page).await?;
                Ok(true)
            }
            Route::Internal => {
                // The internal API is for the platform's own machines, over
                // their own channel; from the Internet it does not exist.
                self.metrics.internal_refused.inc();
                tracing::warn!(
                    method = %req.method,
                    path = %req.uri.path(),
                    reason = "the internal API is not served on the public edge",
                    "refused"
                );
                let head = req.method == http::Method::HEAD;
                session.set_keepalive(None);
                self.write_not_found(session, head).await?;
                Ok(true)
            }
            Route::NotFound => {
                let head = req.method == http::Method::HEAD;
                self.write_not_found(session, head).await?;
                Ok(true)
            }
            Route::Origin => {
                ctx.host = request_host(req).unwrap_or("").to_owned();
                let too_big = header_str(req, http::header::CONTENT_LENGTH)
                    .and_then(|v| v.parse::<usize>().ok())
                    .is_some_and(|n| n > MAX_BODY);
                if too_big {
                    return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
                }
                // Every request to the origin counts against the client's
                // budget (ACME challenges come from the CA: exempt), and the
                // seller API's costly anonymous calls against their own.
                let challenge = req.uri.path().starts_with("/.well-known/acme-challenge/");
                let limits = [
                    (!challenge).then_some(Limited::OriginRequests),
                    Limited::of(&req.method, req.uri.path()),
                ];
                let over = client_ip(session).and_then(|ip| {
                    limits
                        .into_iter()
                        .flatten()
                        .find_map(|what| self.limits.check(what, ip).err().map(|wait| (what, wait)))
                });
                if let Some((what, wait)) = over {
                    self.metrics
                        .rate_limited
                        .with_label_values(&[what.label()])
                        .inc();
                    self.write_rate_limited(session, what, wait).await?;
                    return Ok(true);
                }
                // ACME HTTP-01: answer from the replica when the challenge has
                // replicated; otherwise the origin answers from the primary.
                if let Some(token) = req.uri.path().strip_prefix("/.well-known/acme-challenge/")
                    && req.method == http::Method::GET
                {
                    let token = token.to_owned();
                    if let Ok(Some(ka)) = self.replica.acme_challenge(&token).await {
                        ctx.cache = "replica";
                        let mut resp = ResponseHeader::build(200, Some(4))?;
                        self.stamp(session, &mut resp)?;
                        resp.insert_header(http::header::CONTENT_TYPE, "application/octet-stream")?;
                        resp.insert_header(http::header::CONTENT_LENGTH, ka.len().to_string())?;
                        session.write_response_header(Box::new(resp), false).await?;
                        session
                            .write_response_body(Some(Bytes::from(ka)), true)
                            .await?;
                        return Ok(true);
                    }
                }
                Ok(false)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.body_bytes += body.as_ref().map_or(0, Bytes::len);
        if ctx.body_bytes > MAX_BODY {
            return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.upstream_start = Some(Instant::now());
        ctx.upstream_span = Some(tracing::info_span!(
            parent: &ctx.span,
            "upstream",
            otel.name = "upstream to origin",
            otel.kind = "client",
            server.address = %self.origin,
        ));
        let origin = match &self.origins {
            Some(lb) => match lb.select(b"", 8).and_then(|b| b.addr.as_inet().copied()) {
                Some(a) => a,
                None => {
                    // No origin's database leads (a failover in progress).
                    return Error::e_explain(ErrorType::ConnectRefused, "no origin leads now");
                }
            },
            None => self.origin,
        };
        let mut peer = match &self.origin_tls {
            Some((name, ca)) => {
                let mut p = HttpPeer::new(origin, true, name.clone());
                p.options.ca = Some(ca.clone());
                p
            }
            None => HttpPeer::new(origin, false, String::new()),
        };
        peer.options.connection_timeout = Some(Duration::from_secs(1));
        peer.options.total_connection_timeout = Some(Duration::from_secs(2));
        peer.options.read_timeout = Some(Duration::from_secs(30));
        peer.options.write_timeout = Some(Duration::from_secs(10));
        peer.options.idle_timeout = Some(Duration::from_secs(30));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        upstream.insert_header(X_EDGE_REGION, self.region.as_str())?;
        // One trace from the shopper through the edge to the origin.
        let parent = ctx.upstream_span.as_ref().unwrap_or(&ctx.span);
        for (k, v) in edgefront_schema::telemetry::inject(parent) {
            upstream.insert_header(k, v)?;
        }
        if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
            let prior = header_str(upstream, X_FORWARDED_FOR).map(str::to_owned);
            let value = match prior {
                Some(p) => format!("{p}, {}", addr.ip()),
                None => addr.ip().to_string(),
            };
            upstream.insert_header(X_FORWARDED_FOR, value)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // The origin answered: the upstream call is over.
        ctx.upstream_span = None;
        self.stamp(session, resp)?;
        if is_tls(session) {
            secure_cookies(resp)?;
        }
        // Hand the write's commit LSN to the client: its next reads wait for
        // (or bypass) a replica that has not replayed it.
        let lsn = resp
            .headers
            .get(COMMIT_LSN_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Lsn>().ok());
        if let Some(lsn) = lsn {
            resp.append_header(
                http::header::SET_COOKIE,
                self.ryw.set_cookie(lsn, is_tls(session)),
            )?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (code, message) = origin_failure(e);
        if matches!(
            e.etype(),
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
        ) && e.esource() == &ErrorSource::Downstream
        {
            // The shopper is gone: nothing to answer.
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        if e.esource() == &ErrorSource::Upstream {
            tracing::warn!(region = %self.region, host = %ctx.host, error = %e, status = code, "proxy to origin failed");
        } else {
            tracing::debug!(region = %self.region, host = %ctx.host, error = %e, status = code, "request refused");
        }
        let body = Bytes::from(format!(
            "{{\"error\":{{\"code\":\"{}\",\"message\":\"{}\",\"region\":\"{}\"}}}}\n",
            match code {
                503 => "origin_unavailable",
                504 => "origin_timeout",
                502 => "bad_gateway",
                413 => "body_too_large",
                400 => "bad_request",
                _ => "error",
            },
            message,
            self.region
        ));
        let written = async {
            let mut resp = ResponseHeader::build(code, Some(5))?;
            self.stamp(session, &mut resp)?;
            resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
            resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
            resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
            if code == 503 {
                resp.insert_header(http::header::RETRY_AFTER, "2")?;
            }
            session.write_response_header(Box::new(resp), false).await?;
            session.write_response_body(Some(body), true).await
        }
        .await;
        if let Err(we) = written {
            tracing::debug!(error = %we, "could not send error response");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route = ctx.route.label();
        let elapsed = ctx.start.elapsed();
        self.metrics
            .requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        ctx.upstream_span = None;
        ctx.span.record("http.response.status_code", status);
        ctx.span.record("edgefront.cache", ctx.cache);
        let trace_id = edgefront_schema::telemetry::trace_id(&ctx.span);
        let req = session.req_header();
        tracing::info!(
            target: "access",
            trace_id = trace_id.as_deref(),
            region = %self.region,
            host = %ctx.host,
            method = %req.method,
            path = %req.uri.path(),
            route,
            status,
            cache = ctx.cache,
            duration_ms = elapsed.as_secs_f64() * 1e3,
            upstream_ms = ctx.upstream_start.map(|t| t.elapsed().as_secs_f64() * 1e3),
            error = e.map(|e| e.to_string()),
        );
    }
}

/// Whether the shopper's connection is TLS.
fn is_tls(session: &Session) -> bool {
    crate::tls::session_sni(session.digest()).is_some()
}

/// Marks every cookie the origin sets `Secure` (the shopper is on TLS), so
/// a browser never sends it over plain HTTP.
fn secure_cookies(resp: &mut ResponseHeader) -> Result<()> {
    let cookies: Vec<String> = resp
        .headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(with_secure)
        .collect();
    if cookies.is_empty() {
        return Ok(());
    }
    resp.remove_header(&http::header::SET_COOKIE);
    for c in cookies {
        resp.append_header(http::header::SET_COOKIE, c)?;
    }
    Ok(())
}

/// `cookie` with the `Secure` attribute (added once).
fn with_secure(cookie: &str) -> String {
    let has = cookie
        .split(';')
        .skip(1)
        .any(|a| a.trim().eq_ignore_ascii_case("secure"));
    if has {
        cookie.to_owned()
    } else {
        format!("{cookie}; Secure")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_over_tls_are_marked_secure_once() {
        assert_eq!(
            with_secure("cart=abc; Path=/; HttpOnly; SameSite=Lax"),
            "cart=abc; Path=/; HttpOnly; SameSite=Lax; Secure"
        );
        assert_eq!(with_secure("a=b; secure; Path=/"), "a=b; secure; Path=/");
        // A cookie whose value says "secure" is not a Secure cookie.
        assert_eq!(with_secure("secure=1"), "secure=1; Secure");
    }

    #[test]
    fn origin_failure_maps_connect_errors_to_503_and_timeouts_to_504() {
        let refused = Error::new(ErrorType::ConnectRefused);
        assert_eq!(origin_failure(&refused).0, 503);
        let timeout = Error::new(ErrorType::ReadTimedout);
        assert_eq!(origin_failure(&timeout).0, 504);
        let status = Error::new(ErrorType::HTTPStatus(413));
        assert_eq!(origin_failure(&status).0, 413);
        let other = Error::new_up(ErrorType::ReadError);
        assert_eq!(origin_failure(&other).0, 502);
    }

    #[test]
    fn lookup_cache_status_follows_rfc9211() {
        assert_eq!(Lookup::Hit.cache_status_with(None), "edgefront; hit");
        assert_eq!(
            Lookup::Miss.cache_status_with(None),
            "edgefront; fwd=miss; stored"
        );
        assert_eq!(
            Lookup::Coalesced.cache_status_with(Some("replica-lag")),
            "edgefront; hit; detail=replica-lag"
        );
        assert_eq!(
            Lookup::Miss.cache_status_with(Some("read-your-writes-behind")),
            "edgefront; fwd=miss; stored; detail=read-your-writes-behind"
        );
    }
}
