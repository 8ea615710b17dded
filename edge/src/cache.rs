//! The page cache: rendered pages and host → store lookups, in moka.
//!
//! Pages are keyed by `(store, generation, page)`. Invalidating a store bumps
//! its generation, so every page of that store misses at once without
//! scanning the cache; the old entries age out. Concurrent misses for one key
//! are coalesced by moka (`try_get_with`): one render, everyone gets its
//! result. Entries are bounded by total body size and by a TTL (until
//! change-log invalidation lands the TTL is the freshness bound).
//!
//! Each entry is compressed at most once per encoding, on first demand, and
//! the compressed bytes are kept with it.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use edgefront_schema::StoreId;
use moka::future::Cache;
use sha2::{Digest, Sha256};

use crate::generation::Generations;
use crate::route::Page;

/// A content coding the edge can serve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Brotli,
}

impl Encoding {
    /// The `Content-Encoding` value, if any.
    pub fn header(self) -> Option<&'static str> {
        match self {
            Encoding::Identity => None,
            Encoding::Gzip => Some("gzip"),
            Encoding::Brotli => Some("br"),
        }
    }
}

/// Most bytes of slug directories kept (the biggest store's, 20 000
/// products, weighs about 1.5 MB).
pub const DIRECTORY_BYTES: u64 = 64 * 1024 * 1024;

/// Below this size compression is not worth a round of CPU.
const MIN_COMPRESS: usize = 512;

/// A rendered page, shared by every request that hits it.
#[derive(Debug)]
pub struct Entry {
    pub store: StoreId,
    pub status: u16,
    pub body: Bytes,
    /// Hex digest of the identity body; ETags derive from it.
    pub digest: String,
    /// Time spent querying the replica and rendering, for `server-timing`.
    pub db_ms: f64,
    pub render_ms: f64,
    gzip: OnceLock<Bytes>,
    brotli: OnceLock<Bytes>,
}

impl Entry {
    /// A new entry for a freshly rendered body.
    pub fn new(store: StoreId, status: u16, body: Bytes, db_ms: f64, render_ms: f64) -> Self {
        let digest = hex::encode(&Sha256::digest(&body)[..12]);
        Entry {
            store,
            status,
            body,
            digest,
            db_ms,
            render_ms,
            gzip: OnceLock::new(),
            brotli: OnceLock::new(),
        }
    }

    /// The encoding to use for a request's `Accept-Encoding`.
    pub fn choose(&self, accept_encoding: Option<&str>) -> Encoding {
        if self.body.len() < MIN_COMPRESS {
            return Encoding::Identity;
        }
        negotiate(accept_encoding.unwrap_or(""))
    }

    /// The strong ETag of one representation.
    pub fn etag(&self, enc: Encoding) -> String {
        match enc {
            Encoding::Identity => format!("\"{}\"", self.digest),
            Encoding::Gzip => format!("\"{}-gz\"", self.digest),
            Encoding::Brotli => format!("\"{}-br\"", self.digest),
        }
    }

    /// The body in `enc`, compressed on first use and kept.
    pub fn body(&self, enc: Encoding) -> Bytes {
        match enc {
            Encoding::Identity => self.body.clone(),
            Encoding::Gzip => self.gzip.get_or_init(|| gzip(&self.body)).clone(),
            Encoding::Brotli => self.brotli.get_or_init(|| brotli(&self.body)).clone(),
        }
    }

    /// Whether an encoding has been produced already (for tests and metrics).
    pub fn is_compressed(&self, enc: Encoding) -> bool {
        match enc {
            Encoding::Identity => true,
            Encoding::Gzip => self.gzip.get().is_some(),
            Encoding::Brotli => self.brotli.get().is_some(),
        }
    }

    fn weight(&self) -> u32 {
        // Identity plus room for compressed copies (typically ~1/5 each).
        u32::try_from(self.body.len() + self.body.len() / 2 + 256).unwrap_or(u32::MAX)
    }
}

fn gzip(data: &[u8]) -> Bytes {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 4),
        flate2::Compression::new(6),
    );
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(data);
    Bytes::from(enc.finish().unwrap_or_default())
}

fn brotli(data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() / 5);
    let params = brotli::enc::BrotliEncoderParams {
        quality: 5,
        lgwin: 20,
        ..Default::default()
    };
    let mut input = data;
    if brotli::BrotliCompress(&mut input, &mut out, &params).is_err() {
        return Bytes::new();
    }
    Bytes::from(out)
}

/// Picks br over gzip over identity from an `Accept-Encoding` value, honouring
/// `q=0` (refused) and `*`.
pub fn negotiate(accept: &str) -> Encoding {
    let mut br = None;
    let mut gz = None;
    let mut star = None;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match name.as_str() {
            "br" => br = Some(q),
            "gzip" | "x-gzip" => gz = Some(q),
            "*" => star = Some(q),
            _ => {}
        }
    }
    let br = br.or(star).unwrap_or(0.0);
    let gz = gz.or(star).unwrap_or(0.0);
    if br > 0.0 && br >= gz {
        Encoding::Brotli
    } else if gz > 0.0 {
        Encoding::Gzip
    } else {
        Encoding::Identity
    }
}

/// Whether `If-None-Match` matches `etag` (weak comparison, RFC 9110 §13.1.2).
pub fn if_none_match(header: &str, etag: &str) -> bool {
    let tag = etag.trim_start_matches("W/");
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == tag)
}

/// Page cache key. `epoch` changes when the whole cache is dropped and
/// `generation` when one store is invalidated, so a render that was in flight
/// during either stores its result under a key nobody reads again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PageKey {
    pub epoch: u64,
    pub store: StoreId,
    pub generation: u64,
    pub page: Page,
}

/// The slugs of one store's categories and products, and how many products
/// each category lists: a page never rendered here that is not in it does
/// not exist (an unknown slug, or a page number past a listing's last page),
/// answered from memory — a flood of made-up slugs or page numbers costs one
/// directory load per store change, not a query each. The store's 404 pages
/// (one for products, one for categories, one for page numbers past the
/// end) are kept with it once rendered.
#[derive(Debug, Default)]
pub struct Directory {
    products: std::collections::HashSet<Box<str>>,
    /// Each category's number of products.
    categories: std::collections::HashMap<Box<str>, u64>,
    bytes: usize,
    product_404: OnceLock<Arc<Entry>>,
    category_404: OnceLock<Arc<Entry>>,
    listing_404: OnceLock<Arc<Entry>>,
}

impl Directory {
    /// From `(is_product, slug, products in the category)` rows.
    pub fn new(rows: Vec<(bool, String, i64)>) -> Self {
        let mut d = Directory::default();
        for (product, slug, listed) in rows {
            d.bytes += slug.len() + 56;
            if product {
                d.products.insert(slug.into_boxed_str());
            } else {
                d.categories
                    .insert(slug.into_boxed_str(), u64::try_from(listed).unwrap_or(0));
            }
        }
        d
    }

    /// Whether `page` exists in this store (a listing's first page does
    /// even when empty).
    pub fn has(&self, page: &Page) -> bool {
        match page {
            Page::Home(n) => *n <= crate::route::pages_for(self.products.len() as u64),
            Page::Category(s, n) => self
                .categories
                .get(s.as_str())
                .is_some_and(|listed| *n <= crate::route::pages_for(*listed)),
            Page::Product(s) => self.products.contains(s.as_str()),
        }
    }

    /// The store's 404 page for pages like `page`, once one was rendered.
    pub fn not_found(&self, page: &Page) -> Option<Arc<Entry>> {
        self.not_found_cell(page)?.get().cloned()
    }

    /// Keeps a rendered 404 for pages like `page`.
    pub fn keep_not_found(&self, page: &Page, entry: Arc<Entry>) {
        if let Some(cell) = self.not_found_cell(page) {
            let _ = cell.set(entry);
        }
    }

    fn not_found_cell(&self, page: &Page) -> Option<&OnceLock<Arc<Entry>>> {
        match page {
            Page::Home(_) => Some(&self.listing_404),
            Page::Category(s, _) if self.categories.contains_key(s.as_str()) => {
                Some(&self.listing_404)
            }
            Page::Category(..) => Some(&self.category_404),
            Page::Product(_) => Some(&self.product_404),
        }
    }

    fn weight(&self) -> u32 {
        // The three 404 pages kept with it (and their compressed copies),
        // filled after it was weighed: a fixed allowance.
        u32::try_from(self.bytes + 256 + 3 * 16 * 1024).unwrap_or(u32::MAX)
    }
}

/// Every registered custom domain, loaded from the replica on first need
/// and kept in step by the change feed: a name neither in it nor changed
/// since it was loaded is not registered, answered without a query — a flood
/// of made-up `Host`s or SNIs costs nothing on the replica. Names the feed
/// reports changed since the load are asked of the replica as before.
#[derive(Default)]
pub struct DomainSet {
    state: RwLock<DomainState>,
    /// Bumped by every reset: a load that started before one is not kept.
    generation: AtomicU64,
    loading: tokio::sync::Mutex<()>,
    /// When the last load failed: waiters then ask the replica themselves
    /// for a second instead of queueing behind loads that time out.
    failed: RwLock<Option<std::time::Instant>>,
}

#[derive(Default)]
struct DomainState {
    names: Option<Arc<std::collections::HashSet<Box<str>>>>,
    changed: std::collections::HashSet<String>,
}

/// Names changed since the load beyond which the set is reloaded instead.
const MAX_CHANGED_DOMAINS: usize = 10_000;

impl DomainSet {
    /// `Some(registered)` when the set can tell; `None`: ask the replica
    /// (not loaded, or the name changed since).
    pub fn known(&self, name: &str) -> Option<bool> {
        let s = self.state.read().ok()?;
        let names = s.names.as_ref()?;
        if s.changed.contains(name) {
            return None;
        }
        Some(names.contains(name))
    }

    /// [`DomainSet::known`], loading the set with `load` first if it is not
    /// loaded (one load at a time; a failed load answers `None`).
    pub async fn lookup<F, Fut, E>(&self, name: &str, load: F) -> Option<bool>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<String>, E>>,
    {
        if let Some(k) = self.known(name) {
            return Some(k);
        }
        if self.is_loaded() || self.failed_recently() {
            return None;
        }
        let _one = self.loading.lock().await;
        if self.is_loaded() || self.failed_recently() {
            return self.known(name);
        }
        let generation = self.generation.load(Ordering::Acquire);
        let Ok(names) = load().await else {
            if let Ok(mut f) = self.failed.write() {
                *f = Some(std::time::Instant::now());
            }
            return None;
        };
        if let Ok(mut s) = self.state.write()
            && self.generation.load(Ordering::Acquire) == generation
        {
            s.names = Some(Arc::new(
                names.into_iter().map(String::into_boxed_str).collect(),
            ));
        }
        self.known(name)
    }

    fn failed_recently(&self) -> bool {
        self.failed
            .read()
            .ok()
            .and_then(|f| *f)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
    }

    fn is_loaded(&self) -> bool {
        self.state
            .read()
            .map(|s| s.names.is_some())
            .unwrap_or(false)
    }

    /// The feed applied a change of `name`: ask the replica about it from now on.
    pub fn changed(&self, name: &str) {
        if let Ok(mut s) = self.state.write() {
            if s.changed.len() >= MAX_CHANGED_DOMAINS {
                self.generation.fetch_add(1, Ordering::AcqRel);
                *s = DomainState::default();
            } else {
                s.changed.insert(name.to_owned());
            }
        }
    }

    /// Forgets the set (a feed restart): reloaded on next need.
    pub fn reset(&self) {
        if let Ok(mut s) = self.state.write() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            *s = DomainState::default();
        }
    }
}

/// Directory key: epoch and the store's generation (see [`PageKey`]).
pub type DirectoryKey = (u64, StoreId, u64);

/// Host lookup key: epoch (see [`PageKey`]), the host's invalidation counter
/// ([`Generations`]) and the host. A lookup that read the replica before the
/// tail invalidated the host stores its answer under a key nobody reads again.
pub type HostKey = (u64, u64, String);

/// Hosts, generations and pages.
pub struct PageCache {
    hosts: Cache<HostKey, StoreId>,
    unknown_hosts: Cache<HostKey, ()>,
    pages: Cache<PageKey, Arc<Entry>>,
    /// Pages that do not exist (404: an unknown product or category), apart
    /// and bounded by count, so a flood of made-up slugs never evicts a real
    /// page or its stale copy. Keyed like pages: a store change (a product
    /// added) makes its entries miss.
    not_found: Cache<PageKey, Arc<Entry>>,
    /// Stores' slug directories, bounded by bytes ([`DIRECTORY_BYTES`]).
    directories: Cache<DirectoryKey, Arc<Directory>>,
    /// Registered custom domains (shared with the certificate loader).
    domains: Arc<DomainSet>,
    /// The last page rendered for `(store, page)` whatever its generation:
    /// served, marked, only when the replica cannot render a fresh one.
    last_good: Cache<(StoreId, Page), Arc<Entry>>,
    /// The last store each host was found to name, whatever the epoch:
    /// consulted only when the replica cannot answer, so the stale copies
    /// above stay reachable through a whole-cache drop (a feed restart).
    /// A domain change in the change log forgets the host here too.
    last_hosts: Cache<String, StoreId>,
    generations: RwLock<HashMap<StoreId, u64>>,
    next_generation: AtomicU64,
    host_generations: Generations,
    epoch: AtomicU64,
}

impl PageCache {
    /// A cache whose entries live at most `ttl`, whose pages weigh at most
    /// `max_bytes` in total, and which remembers at most `not_found_entries`
    /// pages that do not exist.
    pub fn new(ttl: Duration, max_bytes: u64, not_found_entries: u64) -> Self {
        PageCache {
            // Host mappings change only through the change log (domain rows),
            // so they live long: a replica outage must not make known stores unknown.
            hosts: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl.max(Duration::from_secs(24 * 3600)))
                .build(),
            // Unknown names are cached briefly and boundedly: a new store's
            // platform name must not stay unknown, and junk must not fill memory.
            unknown_hosts: Cache::builder()
                .max_capacity(50_000)
                .time_to_live(ttl.min(Duration::from_secs(1)))
                .build(),
            pages: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_k: &PageKey, v: &Arc<Entry>| v.weight())
                .time_to_live(ttl)
                .build(),
            not_found: Cache::builder()
                .max_capacity(not_found_entries)
                .time_to_live(ttl)
                .build(),
            domains: Arc::default(),
            directories: Cache::builder()
                .max_capacity(DIRECTORY_BYTES)
                .weigher(|_k: &DirectoryKey, v: &Arc<Directory>| v.weight())
                .time_to_live(ttl)
                .build(),
            last_good: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_k: &(StoreId, Page), v: &Arc<Entry>| v.weight())
                .time_to_live(Duration::from_secs(24 * 3600))
                .build(),
            last_hosts: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(24 * 3600))
                .build(),
            generations: RwLock::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
            host_generations: Generations::default(),
            epoch: AtomicU64::new(0),
        }
    }

    /// The key of `host` in the current epoch.
    pub fn host_key(&self, host: &str) -> HostKey {
        (
            self.epoch.load(Ordering::Acquire),
            self.host_generations.get(host),
            host.to_owned(),
        )
    }

    /// Known hosts.
    pub fn hosts(&self) -> &Cache<HostKey, StoreId> {
        &self.hosts
    }

    /// Hosts known not to name a store (short-lived).
    pub fn unknown_hosts(&self) -> &Cache<HostKey, ()> {
        &self.unknown_hosts
    }

    /// Pages known not to exist (the negative cache).
    pub fn not_found(&self) -> &Cache<PageKey, Arc<Entry>> {
        &self.not_found
    }

    /// Registered custom domains.
    pub fn domains(&self) -> &Arc<DomainSet> {
        &self.domains
    }

    /// Stores' slug directories.
    pub fn directories(&self) -> &Cache<DirectoryKey, Arc<Directory>> {
        &self.directories
    }

    /// Last rendered pages, for stale-if-error.
    pub fn last_good(&self) -> &Cache<(StoreId, Page), Arc<Entry>> {
        &self.last_good
    }

    /// Last known store of each host, for stale-if-error.
    pub fn last_hosts(&self) -> &Cache<String, StoreId> {
        &self.last_hosts
    }

    /// The page cache.
    pub fn pages(&self) -> &Cache<PageKey, Arc<Entry>> {
        &self.pages
    }

    /// The key of `page` of `store` in the store's current generation.
    pub fn key(&self, store: StoreId, page: Page) -> PageKey {
        let epoch = self.epoch.load(Ordering::Acquire);
        let generation = self
            .generations
            .read()
            .map(|g| g.get(&store).copied().unwrap_or(0))
            .unwrap_or(0);
        PageKey {
            epoch,
            store,
            generation,
            page,
        }
    }

    /// Makes every cached page of `store` miss from now on.
    pub fn invalidate_store(&self, store: StoreId) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut g) = self.generations.write() {
            g.insert(store, generation);
        }
    }

    /// Forgets a host's store lookup (known or unknown).
    pub async fn invalidate_host(&self, host: &str) {
        let old = self.host_key(host);
        // Bump first: a lookup already reading the replica stores under `old`.
        self.host_generations.bump(host);
        self.hosts.invalidate(&old).await;
        self.unknown_hosts.invalidate(&old).await;
        self.last_hosts.invalidate(host).await;
        self.domains.changed(host);
    }

    /// Up to `max` pages in the cache that rendered fine, as `(store, page)`:
    /// what an edge hands its successor to warm (crate::reload).
    pub fn cached_pages(&self, max: usize) -> Vec<(StoreId, Page)> {
        self.pages
            .iter()
            .filter(|(_, e)| e.status == 200)
            .take(max)
            .map(|(k, _)| (k.store, k.page.clone()))
            .collect()
    }

    /// Drops every page and host lookup (not the stale-if-error copies).
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.hosts.invalidate_all();
        self.unknown_hosts.invalidate_all();
        self.pages.invalidate_all();
        self.not_found.invalidate_all();
        self.directories.invalidate_all();
        self.domains.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn last_known_hosts_survive_a_whole_cache_drop_but_not_a_domain_change() {
        let c = PageCache::new(Duration::from_secs(60), 1 << 20, 1000);
        c.last_hosts().insert("a.example".into(), StoreId(1)).await;
        c.last_hosts().insert("b.example".into(), StoreId(2)).await;
        c.invalidate_all();
        assert_eq!(c.last_hosts().get("a.example").await, Some(StoreId(1)));
        c.invalidate_host("b.example").await;
        assert_eq!(c.last_hosts().get("b.example").await, None);
    }

    #[test]
    fn negotiate_prefers_br_then_gzip_and_honours_q0() {
        assert_eq!(negotiate("gzip, deflate, br"), Encoding::Brotli);
        assert_eq!(negotiate("gzip"), Encoding::Gzip);
        assert_eq!(negotiate("br;q=0, gzip"), Encoding::Gzip);
        assert_eq!(negotiate("gzip;q=0.5, br;q=0.2"), Encoding::Gzip);
        assert_eq!(negotiate(""), Encoding::Identity);
        assert_eq!(negotiate("identity"), Encoding::Identity);
        assert_eq!(negotiate("*"), Encoding::Brotli);
        assert_eq!(negotiate("*;q=0"), Encoding::Identity);
    }

    #[test]
    fn if_none_match_uses_weak_comparison_and_lists() {
        assert!(if_none_match("\"abc\"", "\"abc\""));
        assert!(if_none_match("W/\"abc\"", "\"abc\""));
        assert!(if_none_match("\"x\", \"abc\"", "\"abc\""));
        assert!(if_none_match("*", "\"abc\""));
        assert!(!if_none_match("\"abc-gz\"", "\"abc\""));
    }

    #[test]
    fn entry_compresses_once_per_encoding_and_round_trips() {
        let body = Bytes::from("<p>hello storefront</p>".repeat(200));
        let e = Entry::new(StoreId(1), 200, body.clone(), 0.0, 0.0);
        assert!(!e.is_compressed(Encoding::Gzip));
        let gz = e.body(Encoding::Gzip);
        assert!(e.is_compressed(Encoding::Gzip));
        assert!(gz.len() < body.len() / 5);
        // The second call returns the same allocation: compressed once.
        assert_eq!(e.body(Encoding::Gzip).as_ptr(), gz.as_ptr());
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut out)
            .expect("gunzip");
        assert_eq!(out, body);
        let br = e.body(Encoding::Brotli);
        let mut out = Vec::new();
        brotli::BrotliDecompress(&mut &br[..], &mut out).expect("unbrotli");
        assert_eq!(out, body);
        assert_ne!(e.etag(Encoding::Gzip), e.etag(Encoding::Identity));
    }

    #[test]
    fn small_bodies_are_not_compressed() {
        let e = Entry::new(StoreId(1), 200, Bytes::from_static(b"tiny"), 0.0, 0.0);
        assert_eq!(e.choose(Some("br, gzip")), Encoding::Identity);
    }

    #[tokio::test]
    async fn invalidate_store_changes_key_so_pages_miss() {
        let c = PageCache::new(Duration::from_secs(60), 1 << 20, 1000);
        let k1 = c.key(StoreId(7), Page::Home(1));
        c.pages()
            .insert(
                k1.clone(),
                Arc::new(Entry::new(
                    StoreId(7),
                    200,
                    Bytes::from_static(b"a"),
                    0.0,
                    0.0,
                )),
            )
            .await;
        assert!(
            c.pages()
                .get(&c.key(StoreId(7), Page::Home(1)))
                .await
                .is_some()
        );
        let other = c.key(StoreId(8), Page::Home(1));
        c.invalidate_store(StoreId(7));
        let k2 = c.key(StoreId(7), Page::Home(1));
        assert_ne!(k1, k2);
        assert!(c.pages().get(&k2).await.is_none());
        assert_eq!(
            other,
            c.key(StoreId(8), Page::Home(1)),
            "other stores keep their keys"
        );
    }

    #[tokio::test]
    async fn host_lookup_read_before_an_invalidation_is_never_served() {
        let c = PageCache::new(Duration::from_secs(60), 1 << 20, 1000);
        // A lookup takes its key and reads the replica (old mapping: store 1)…
        let key = c.host_key("shop.example");
        // …meanwhile the tail applies "domain moved" and evicts…
        c.invalidate_host("shop.example").await;
        // …then the lookup stores what it read.
        c.hosts().insert(key, StoreId(1)).await;
        let now = c.host_key("shop.example");
        assert!(
            c.hosts().get(&now).await.is_none(),
            "the stale mapping must not be found"
        );
        // The same for the negative cache (a domain just added).
        let key = c.host_key("new.example");
        c.invalidate_host("new.example").await;
        c.unknown_hosts().insert(key, ()).await;
        assert!(!c.unknown_hosts().contains_key(&c.host_key("new.example")));
    }

    #[tokio::test]
    async fn concurrent_misses_render_once() {
        let c = Arc::new(PageCache::new(Duration::from_secs(60), 1 << 20, 1000));
        let renders = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (c, renders) = (c.clone(), renders.clone());
            tasks.push(tokio::spawn(async move {
                let key = c.key(StoreId(1), Page::Home(1));
                c.pages()
                    .try_get_with(key, async {
                        renders.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, String>(Arc::new(Entry::new(
                            StoreId(1),
                            200,
                            Bytes::from_static(b"x"),
                            0.0,
                            0.0,
                        )))
                    })
                    .await
                    .map(|e| e.status)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("join").expect("render"), 200);
        }
        assert_eq!(renders.load(Ordering::SeqCst), 1);
    }
}
