//! The page policy: which answer a storefront request gets.
//!
//! [`Pages::answer`] takes the request's host and page and returns one
//! [`Answer`] — a page (cache hit, miss rendered from the replica,
//! coalesced, negative), a page rendered on the primary for
//! read-your-writes, a stale page when the replica fails, no such store,
//! over the client's budget, or unavailable. `crate::proxy` writes it; the
//! headers an answer carries ([`Answer::cache_status`],
//! [`Answer::server_timing`]) are decided here, without a Pingora session.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tracing::Instrument;

use bytes::Bytes;
use edgefront_schema::{Hostname, StoreId};

use crate::cache::{Entry, PageCache};
use crate::headers::CACHE_NAME;
use crate::limits::Limited;
use crate::metrics::Metrics;
use crate::render;
use crate::replica::Replica;
use crate::route::Page;
use crate::ryw::ReadYourWrites;
use crate::tail::Freshness;

/// Why a page could not be produced.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PageError {
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
pub enum Lookup {
    Hit,
    Miss,
    Coalesced,
    /// From the negative cache (a page that does not exist).
    Negative,
}

impl Lookup {
    pub fn label(self) -> &'static str {
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

/// What a storefront page is made from: the page cache, the region's
/// replica, and for read-your-writes the primary. Shared by the proxy and the start's warm-up
/// (crate::server::WarmPools), which renders the pages the edge it took
/// over from had cached.
pub struct Pages {
    pub region: String,
    /// Stores without a custom domain are `<slug>.<platform_domain>`.
    pub platform_domain: String,
    pub replica: Replica,
    /// The database's leader (and the candidates it may move to), read only
    /// for read-your-writes when the replica is behind.
    pub primary: Option<Arc<crate::replica::Primaries>>,
    pub cache: Arc<PageCache>,
    /// How far the replica has replayed, and whether it is reachable.
    pub fresh: Freshness,
    /// Read-your-writes cookies and the primary-read budget.
    pub ryw: ReadYourWrites,
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
                let render::Rendered { status, html } = {
                    let _render = tracing::info_span!("render").entered();
                    self.render(data.as_ref(), &page)?
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

    /// The page `data` makes (`None`: the store is gone, its 404 page).
    fn render(
        &self,
        data: Option<&crate::replica::PageData>,
        page: &Page,
    ) -> Result<render::Rendered, PageError> {
        match data {
            Some(d) => {
                render::page(d, page, &self.region).map_err(|e| PageError::Render(e.to_string()))
            }
            None => Ok(render::Rendered {
                status: 404,
                html: render::error_page(
                    404,
                    "Store not found",
                    "This store no longer exists.",
                    &self.region,
                ),
            }),
        }
    }

    /// The store `host` names: memory first, else the replica (on the
    /// client's miss budget for a host never known here).
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
        let platform =
            host.is_within(&self.platform_domain) && host.as_str() != self.platform_domain;
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
            self.spend_miss(client)?;
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
        let r = self.render(data.as_ref(), page)?;
        let t2 = Instant::now();
        Ok(Arc::new(Entry::new(
            store,
            r.status,
            Bytes::from(r.html),
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
        )))
    }

    /// Renders `page` of `store` into the cache unless it is there; whether
    /// it is there now (a page the store no longer has is not).
    pub async fn warm(&self, store: StoreId, page: Page) -> bool {
        matches!(self.page(store, page, None).await, Ok((e, _)) if e.status == 200)
    }
}

/// What a storefront request gets (`crate::proxy` writes it).
#[derive(Debug)]
pub enum Answer {
    /// A page to write; where it came from decides its headers.
    Page(Arc<Entry>, Source),
    /// No store here: no usable `Host` (`None`), or none configured for it.
    NoSuchStore(Option<Hostname>),
    /// Over the client's budget of lookups no cache answers.
    Limited(Limited, Duration),
    /// Nothing to serve: the replica failed and no stale copy is kept.
    Unavailable(PageError),
}

/// Where a page came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The page cache, or rendered from the replica: the store's page, or
    /// its rendered 404 for a page it does not have. `degraded` is the
    /// declared degradation: `read-your-writes-behind` (the client's write
    /// is not replayed here and the primary read was not available) or
    /// `replica-lag` (the replica is over its lag budget).
    Cache {
        how: Lookup,
        degraded: Option<&'static str>,
    },
    /// Read-your-writes: rendered on the primary, uncached.
    Primary,
    /// stale-if-error: the replica failed; the last page rendered for this URL.
    Stale,
}

impl Answer {
    /// The access log's and the span's `cache` field.
    pub fn label(&self) -> &'static str {
        match self {
            Answer::Page(_, Source::Cache { how, .. }) => how.label(),
            Answer::Page(_, Source::Primary) => "primary",
            Answer::Page(_, Source::Stale) => "stale",
            Answer::NoSuchStore(_) => "none",
            Answer::Limited(..) => "limited",
            Answer::Unavailable(_) => "error",
        }
    }
}

impl Source {
    /// The page's `cache-status` (RFC 9211).
    pub fn cache_status(self) -> String {
        match self {
            Source::Cache { how, degraded } => how.cache_status_with(degraded),
            Source::Primary => format!("{CACHE_NAME}; fwd=bypass; detail=read-your-writes-primary"),
            Source::Stale => format!("{CACHE_NAME}; hit; detail=stale-if-error"),
        }
    }

    /// The page's `server-timing`, `elapsed` since the request began.
    pub fn server_timing(self, entry: &Entry, elapsed: Duration) -> String {
        let total = elapsed.as_secs_f64() * 1e3;
        match self {
            Source::Cache {
                how: Lookup::Miss, ..
            } => format!(
                "replica;dur={:.3}, render;dur={:.3}, total;dur={total:.3}",
                entry.db_ms, entry.render_ms
            ),
            Source::Cache { how, .. } => format!("cache;desc={};dur={total:.3}", how.label()),
            Source::Primary => format!(
                "primary;dur={:.3}, render;dur={:.3}",
                entry.db_ms, entry.render_ms
            ),
            Source::Stale => format!("cache;desc=stale;dur={total:.3}"),
        }
    }
}

/// What read-your-writes asks of a page.
enum Ryw {
    /// No cookie, a bad one, or the replica has the client's write.
    Replica,
    /// Rendered on the primary.
    Primary(Arc<Entry>),
    /// The replica is behind the client's write and the primary could not
    /// be read (budget spent, none, or failed): the replica's page, marked.
    Behind,
}

impl Pages {
    /// The answer to a storefront request for `page` on `host`, from
    /// `client` (its budgets; never a header) with the request's `headers`
    /// (the read-your-writes cookie); its spans are children of `span`.
    pub async fn answer(
        &self,
        host: Option<Hostname>,
        page: Page,
        client: Option<IpAddr>,
        headers: &http::HeaderMap,
        span: &tracing::Span,
    ) -> Answer {
        let Some(host) = host else {
            return Answer::NoSuchStore(None);
        };
        let store = match self
            .store_for(&host, client)
            .instrument(
                tracing::info_span!(parent: span, "route", otel.name = "route (host → store)"),
            )
            .await
        {
            Ok(Some(s)) => s,
            Ok(None) => return Answer::NoSuchStore(Some(host)),
            Err(PageError::Limited(what, wait)) => return Answer::Limited(what, wait),
            Err(e) => return Answer::Unavailable(e),
        };
        let ryw_behind = match self.read_your_writes(store, &page, headers, span).await {
            Ryw::Primary(entry) => return Answer::Page(entry, Source::Primary),
            Ryw::Behind => true,
            Ryw::Replica => false,
        };
        let lookup = || {
            self.page(store, page.clone(), client)
                .instrument(tracing::info_span!(parent: span, "cache", otel.name = "cache lookup"))
        };
        // Known outage: answer from the cache at once rather than waiting
        // for a replica connection that will time out; with nothing stale
        // to offer, try the replica after all (it may be back).
        let first = if self.fresh.replica_down() {
            let key = self.cache.key(store, page.clone());
            match self.cache.pages().get(&key).await {
                Some(e) => Ok((e, Lookup::Hit)),
                None => Err(PageError::Replica(
                    "replica unreachable (change-log tail failing)".into(),
                )),
            }
        } else {
            lookup().await
        };
        let result = match first {
            Err(_)
                if self.fresh.replica_down()
                    && self
                        .cache
                        .last_good()
                        .get(&(store, page.clone()))
                        .await
                        .is_none() =>
            {
                lookup().await
            }
            other => other,
        };
        let (entry, how) = match result {
            Ok(v) => v,
            Err(PageError::Limited(what, wait)) => return Answer::Limited(what, wait),
            Err(e) => {
                // stale-if-error: the last page rendered for this URL, marked as such.
                return match self.cache.last_good().get(&(store, page)).await {
                    Some(stale) => {
                        tracing::warn!(region = %self.region, host = %host, error = %e, "serving stale page: replica unavailable");
                        self.metrics.cache.with_label_values(&["stale"]).inc();
                        Answer::Page(stale, Source::Stale)
                    }
                    None => Answer::Unavailable(e),
                };
            }
        };
        self.metrics.cache.with_label_values(&[how.label()]).inc();
        let degraded = if ryw_behind {
            Some("read-your-writes-behind")
        } else if self.metrics.replica_over_lag_budget.get() > 0.0 {
            Some("replica-lag")
        } else {
            None
        };
        Answer::Page(entry, Source::Cache { how, degraded })
    }

    /// Read-your-writes: never serve this client a page older than its own
    /// write — within the primary budget (crate::ryw).
    async fn read_your_writes(
        &self,
        store: StoreId,
        page: &Page,
        headers: &http::HeaderMap,
        span: &tracing::Span,
    ) -> Ryw {
        let outcome = |label: &str| {
            self.metrics
                .read_your_writes
                .with_label_values(&[label])
                .inc();
        };
        match self.ryw.client_lsn(headers, self.fresh.primary_seen()) {
            Ok(None) => Ryw::Replica,
            Err(why) => {
                // Forged, expired or absurd: an ordinary read, no wait.
                outcome(why.label());
                Ryw::Replica
            }
            Ok(Some(lsn)) if self.fresh.wait_for(lsn, self.ryw.wait).await => {
                outcome("replica");
                Ryw::Replica
            }
            Ok(Some(_)) => {
                let permit = self
                    .primary
                    .as_ref()
                    .and_then(|p| p.current())
                    .and_then(|p| Some((p, self.ryw.budget.try_acquire()?)));
                let Some((primary, _permit)) = permit else {
                    // Budget spent (or no primary): the replica's page after
                    // the bounded wait, marked — never an error.
                    outcome("budget_spent");
                    return Ryw::Behind;
                };
                match self
                    .render_on_primary(primary, store, page)
                    .instrument(tracing::info_span!(parent: span, "render on primary"))
                    .await
                {
                    Ok(entry) => {
                        outcome("primary");
                        Ryw::Primary(entry)
                    }
                    Err(e) => {
                        // The primary is unreachable: the replica's page, marked.
                        tracing::debug!(region = %self.region, error = %e, "read-your-writes read on the primary failed");
                        outcome("primary_failed");
                        Ryw::Behind
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn entry() -> Entry {
        Entry::new(
            StoreId(7),
            200,
            Bytes::from_static(b"<html></html>"),
            1.5,
            0.25,
        )
    }

    #[test]
    fn every_source_names_its_cache_status_and_timing() {
        let e = entry();
        let ms = Duration::from_millis(3);
        let miss = Source::Cache {
            how: Lookup::Miss,
            degraded: None,
        };
        assert_eq!(miss.cache_status(), "edgefront; fwd=miss; stored");
        assert_eq!(
            miss.server_timing(&e, ms),
            "replica;dur=1.500, render;dur=0.250, total;dur=3.000"
        );
        let hit = Source::Cache {
            how: Lookup::Hit,
            degraded: Some("replica-lag"),
        };
        assert_eq!(hit.cache_status(), "edgefront; hit; detail=replica-lag");
        assert_eq!(hit.server_timing(&e, ms), "cache;desc=hit;dur=3.000");
        assert_eq!(
            Source::Primary.cache_status(),
            "edgefront; fwd=bypass; detail=read-your-writes-primary"
        );
        assert_eq!(
            Source::Primary.server_timing(&e, ms),
            "primary;dur=1.500, render;dur=0.250"
        );
        assert_eq!(
            Source::Stale.cache_status(),
            "edgefront; hit; detail=stale-if-error"
        );
        assert_eq!(
            Source::Stale.server_timing(&e, ms),
            "cache;desc=stale;dur=3.000"
        );
    }

    #[test]
    fn every_answer_has_its_log_label() {
        let e = Arc::new(entry());
        let negative = Source::Cache {
            how: Lookup::Negative,
            degraded: None,
        };
        assert_eq!(Answer::Page(e.clone(), negative).label(), "negative");
        assert_eq!(Answer::Page(e.clone(), Source::Primary).label(), "primary");
        assert_eq!(Answer::Page(e, Source::Stale).label(), "stale");
        assert_eq!(Answer::NoSuchStore(None).label(), "none");
        assert_eq!(
            Answer::Limited(Limited::Misses, Duration::from_secs(1)).label(),
            "limited"
        );
        assert_eq!(
            Answer::Unavailable(PageError::Replica("down".into())).label(),
            "error"
        );
    }
}
