//! The edge's reads from its region's PostgreSQL replica.
//!
//! Owns the connection pool (created lazily, inside the runtime that uses it:
//! pingora runs each service on its own runtime) and every query the edge
//! runs. A page costs a fixed handful of queries on one connection, never one
//! per product or category. Waits are bounded so an unreachable replica fails
//! fast instead of hanging shoppers.

use std::sync::Arc;
use std::time::Duration;

use edgefront_schema::{Hostname, Lsn, StoreId};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tokio::sync::OnceCell;

use crate::route::{PER_PAGE, Page};

/// A store as shown on its pages.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Store {
    pub id: i64,
    pub slug: String,
    pub name: String,
    pub tagline: String,
    pub currency: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Category {
    pub id: i64,
    pub slug: String,
    pub name: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Product {
    pub id: i64,
    pub slug: String,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub category_id: Option<i64>,
    pub available: bool,
}

/// Everything one page needs, read in one go.
#[derive(Debug, Clone)]
pub struct PageData {
    pub store: Store,
    pub categories: Vec<Category>,
    pub products: Vec<Product>,
    /// For category and product pages: the category or product asked for was
    /// found (else the page is the store's 404).
    pub found: bool,
    /// The category of a category page.
    pub category: Option<Category>,
    /// A listing (home, category) has products on its next page.
    pub more: bool,
}

/// Replication state of the replica: one reading of WAL positions and of
/// the last message from the primary. Lag in bytes and seconds comes from
/// successive readings (`edgefront_lag::Tracker`, kept by the admin
/// listener), never from `pg_last_xact_replay_timestamp()`.
pub type ReplicaStatus = edgefront_lag::Sample;

/// A stored certificate (key still sealed).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CertRow {
    pub chain_pem: String,
    pub key_nonce: Vec<u8>,
    pub key_ciphertext: Vec<u8>,
    /// The ACME directory that issued it (`None`: uploaded).
    pub issuer: Option<String>,
}

/// One change-log row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Change {
    pub seq: i64,
    pub store_id: Option<i64>,
    pub hostname: Option<String>,
    pub kind: String,
    /// The top-level transaction that wrote the row.
    pub xid: i64,
}

/// Where the change feed starts: read before the cache is emptied.
#[derive(Debug, Clone)]
pub struct FeedStart {
    /// Every transaction id at or above this may still commit.
    pub bound: i64,
    /// Transaction ids below `bound` that were still running.
    pub running: Vec<i64>,
}

/// What one poll of the change feed found.
#[derive(Debug, Clone)]
pub struct FeedPoll {
    /// Replay position read BEFORE the snapshot the rows come from: every
    /// change committed at or below it is among the rows (or was applied by
    /// an earlier poll).
    pub replay_lsn: Option<Lsn>,
    /// The newest primary position this replica has received.
    pub received_lsn: Option<Lsn>,
    /// The watched ids that were still running before the snapshot was taken.
    pub running: Vec<i64>,
    /// The snapshot's xmax: ids at or above it were invisible to it.
    pub xmax: i64,
    /// The newest transaction id whose rows were pruned on the primary.
    pub pruned_xid: i64,
    /// Rows of the watched transactions (and of every id at or above the
    /// bound) visible in the snapshot, ordered by (xid, seq). `None` when there
    /// were more than the limit.
    pub rows: Option<Vec<Change>>,
}

/// A lazily connected pool to this region's replica. Clones share the pool.
#[derive(Clone)]
pub struct Replica {
    url: String,
    pool: Arc<OnceCell<PgPool>>,
    max_connections: u32,
    acquire_timeout: Duration,
    /// PostgreSQL's `application_name` of its connections.
    application: &'static str,
}

impl Replica {
    /// A replica handle; nothing connects until first use.
    pub fn new(url: &str, max_connections: u32) -> Self {
        Self::with_acquire_timeout(url, max_connections, Duration::from_millis(1500))
    }

    /// A replica handle whose queries give up waiting for a connection after `acquire`.
    pub fn with_acquire_timeout(url: &str, max_connections: u32, acquire: Duration) -> Self {
        Replica {
            url: url.to_owned(),
            pool: Arc::default(),
            max_connections,
            acquire_timeout: acquire,
            application: "edgefront-edge",
        }
    }

    /// Names the pool's connections in `pg_stat_activity`
    /// (`application_name`, e.g. `edgefront-edge pages`).
    pub fn named(mut self, application: &'static str) -> Self {
        self.application = application;
        self
    }

    async fn pool(&self) -> Result<&PgPool, sqlx::Error> {
        self.pool
            .get_or_try_init(|| async {
                let opts: PgConnectOptions = self.url.parse()?;
                let opts = opts
                    .application_name(self.application)
                    .statement_cache_capacity(64);
                Ok(PgPoolOptions::new()
                    .max_connections(self.max_connections)
                    .min_connections(0)
                    .acquire_timeout(self.acquire_timeout)
                    .idle_timeout(Duration::from_secs(300))
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::query("SET statement_timeout = '5s'")
                                .execute(&mut *conn)
                                .await?;
                            Ok(())
                        })
                    })
                    .connect_lazy_with(opts))
            })
            .await
    }

    /// Opens up to `n` connections at once (at most the pool's size) and
    /// leaves them idle in the pool; returns how many were opened. Call it
    /// on the runtime that will use the pool.
    pub async fn warm(&self, n: u32) -> Result<u32, sqlx::Error> {
        let pool = self.pool().await?;
        let n = n.min(self.max_connections) as usize;
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..n {
            let pool = pool.clone();
            opening.spawn(async move { pool.acquire().await });
        }
        // Held until every one is open, so each acquire opens its own.
        let open: Vec<_> = opening
            .join_all()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        Ok(open.len() as u32)
    }

    /// The store a host names: `<slug>.<platform_domain>` or a custom domain.
    pub async fn store_for_host(
        &self,
        host: &Hostname,
        platform_domain: &str,
    ) -> Result<Option<StoreId>, sqlx::Error> {
        edgefront_schema::store_for_host(self.pool().await?, host, platform_domain).await
    }

    /// Every registered custom domain.
    pub async fn hostnames(&self) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT hostname FROM domains")
            .fetch_all(self.pool().await?)
            .await
    }

    /// The slugs of `store`'s categories and products, with each category's
    /// number of products (the store's slug directory: which pages exist),
    /// index scans only.
    pub async fn slugs(&self, store: StoreId) -> Result<crate::cache::Directory, sqlx::Error> {
        let rows: Vec<(bool, String, i64)> = sqlx::query_as(
            "SELECT true, slug, 0::bigint FROM products WHERE store_id = $1
             UNION ALL SELECT false, c.slug,
               (SELECT count(*) FROM products p WHERE p.store_id = $1 AND p.category_id = c.id)
             FROM categories c WHERE c.store_id = $1",
        )
        .bind(store.0)
        .fetch_all(self.pool().await?)
        .await?;
        Ok(crate::cache::Directory::new(rows))
    }

    /// Reads a page's data: three queries on one connection. `None` when the
    /// store no longer exists.
    pub async fn page_data(
        &self,
        store: StoreId,
        page: &Page,
    ) -> Result<Option<PageData>, sqlx::Error> {
        let mut conn = self.pool().await?.acquire().await?;
        let conn: &mut PgConnection = &mut conn;
        let Some(s) = sqlx::query_as::<_, Store>(
            "SELECT id, slug, name, tagline, currency FROM stores WHERE id = $1",
        )
        .bind(store.0)
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(None);
        };
        let categories: Vec<Category> = sqlx::query_as(
            "SELECT id, slug, name FROM categories WHERE store_id = $1 ORDER BY position, id",
        )
        .bind(store.0)
        .fetch_all(&mut *conn)
        .await?;
        const COLS: &str =
            "p.id, p.slug, p.name, p.description, p.price_cents, p.category_id, p.available";
        // A listing's page: PER_PAGE products and one more, which tells
        // whether there is a next page. Both orders are the index's
        // (products_store_category_idx).
        let window = |n: u32| {
            (
                i64::from(PER_PAGE) + 1,
                i64::from(n.saturating_sub(1)) * i64::from(PER_PAGE),
            )
        };
        let (mut products, found, category): (Vec<Product>, bool, Option<Category>) = match page {
            Page::Home(n) => {
                let (limit, offset) = window(*n);
                let q = format!(
                    "SELECT {COLS} FROM products p WHERE p.store_id = $1
                     ORDER BY p.category_id NULLS LAST, p.position, p.id LIMIT $2 OFFSET $3"
                );
                let products: Vec<Product> = sqlx::query_as(sqlx::AssertSqlSafe(q))
                    .bind(store.0)
                    .bind(limit)
                    .bind(offset)
                    .fetch_all(&mut *conn)
                    .await?;
                // Past the last page: no such page (the first always is).
                let found = *n == 1 || !products.is_empty();
                (products, found, None)
            }
            Page::Category(slug, n) => {
                let category = categories.iter().find(|c| &c.slug == slug).cloned();
                let products = match &category {
                    Some(c) => {
                        let (limit, offset) = window(*n);
                        let q = format!(
                            "SELECT {COLS} FROM products p WHERE p.store_id = $1 AND p.category_id = $2
                             ORDER BY p.position, p.id LIMIT $3 OFFSET $4"
                        );
                        sqlx::query_as(sqlx::AssertSqlSafe(q))
                            .bind(store.0)
                            .bind(c.id)
                            .bind(limit)
                            .bind(offset)
                            .fetch_all(&mut *conn)
                            .await?
                    }
                    None => Vec::new(),
                };
                let found = category.is_some() && (*n == 1 || !products.is_empty());
                (products, found, category)
            }
            Page::Product(slug) => {
                let q =
                    format!("SELECT {COLS} FROM products p WHERE p.store_id = $1 AND p.slug = $2");
                let products: Vec<Product> = sqlx::query_as(sqlx::AssertSqlSafe(q))
                    .bind(store.0)
                    .bind(slug)
                    .fetch_all(&mut *conn)
                    .await?;
                let found = !products.is_empty();
                let category = products
                    .first()
                    .and_then(|p| p.category_id)
                    .and_then(|id| categories.iter().find(|c| c.id == id).cloned());
                (products, found, category)
            }
        };
        let more = products.len() > PER_PAGE as usize;
        products.truncate(PER_PAGE as usize);
        Ok(Some(PageData {
            store: s,
            categories,
            products,
            found,
            category,
            more,
        }))
    }

    /// The certificate for `name` if it is the platform wildcard or a
    /// registered domain (the "ask" gate: nothing else is ever served).
    pub async fn certificate(&self, name: &str) -> Result<Option<CertRow>, sqlx::Error> {
        sqlx::query_as(
            "SELECT c.chain_pem, c.key_nonce, c.key_ciphertext, c.issuer FROM certificates c
             WHERE c.hostname = $1
               AND (c.hostname LIKE '*.%' OR EXISTS (SELECT 1 FROM domains d WHERE d.hostname = c.hostname))",
        )
        .bind(name)
        .fetch_optional(self.pool().await?)
        .await
    }

    /// Registered domains whose certificate has less than a third of its
    /// lifetime left, soonest first.
    /// With `wildcards`, the platform wildcard too.
    pub async fn due_for_renewal(&self, wildcards: bool) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT c.hostname FROM certificates c
             WHERE now() > c.not_after - (c.not_after - c.updated_at) / 3
               AND (EXISTS (SELECT 1 FROM domains d WHERE d.hostname = c.hostname)
                    OR ($1 AND c.hostname LIKE '*.%'))
             ORDER BY c.not_after LIMIT 50",
        )
        .bind(wildcards)
        .fetch_all(self.pool().await?)
        .await
    }

    /// The key authorization of a pending ACME HTTP-01 challenge.
    pub async fn acme_challenge(&self, token: &str) -> Result<Option<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT key_authorization FROM acme_challenges WHERE token = $1")
            .bind(token)
            .fetch_optional(self.pool().await?)
            .await
    }

    /// Certificates issued in the last hour for the store that owns `hostname`.
    pub async fn store_issuances_last_hour(&self, hostname: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT count(*) FROM certificates c JOIN domains d ON d.hostname = c.hostname
             WHERE d.store_id = (SELECT store_id FROM domains WHERE hostname = $1)
               AND c.updated_at > now() - interval '1 hour'",
        )
        .bind(hostname)
        .fetch_one(self.pool().await?)
        .await
    }

    /// Whether `hostname` is a registered custom domain (the ACME "ask" gate).
    pub async fn domain_registered(&self, hostname: &str) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM domains WHERE hostname = $1)")
            .bind(hostname)
            .fetch_one(self.pool().await?)
            .await
    }

    /// Where the change feed starts: the snapshot's xmax and the ids below
    /// it that are still running (checked after the snapshot was taken, so an
    /// id reported finished committed before anything that reads later).
    pub async fn feed_start(&self) -> Result<FeedStart, sqlx::Error> {
        let (bound, running): (i64, Vec<i64>) = sqlx::query_as(
            "WITH s AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS lo,
                               pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS hi)
             SELECT hi, ARRAY(SELECT x FROM generate_series(lo, hi - 1) x
                              WHERE pg_xact_status(x::text::xid8) = 'in progress')
             FROM s",
        )
        .fetch_one(self.pool().await?)
        .await?;
        Ok(FeedStart { bound, running })
    }

    /// One poll of the change feed (see `tail` for why it is exact):
    /// 1. the replay LSN, and which of `watch` are still running;
    /// 2. then, in one REPEATABLE READ snapshot: its xmax, the prune horizon,
    ///    and every visible row written by a transaction in `watch` or with
    ///    an id at or above `bound` (at most `limit`).
    pub async fn feed_poll(
        &self,
        watch: &[i64],
        bound: i64,
        limit: i64,
    ) -> Result<FeedPoll, sqlx::Error> {
        let mut conn = self.pool().await?.acquire().await?;
        let (lsn, received, running): (Option<String>, Option<String>, Vec<i64>) = sqlx::query_as(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                          ELSE pg_current_wal_lsn() END)::text,
                    (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                          ELSE pg_current_wal_lsn() END)::text,
                    ARRAY(SELECT x FROM unnest($1::int8[]) x,
                                   pg_snapshot_xmax(pg_current_snapshot()) m
                          -- Ids this server has not completed yet (e.g. after it
                          -- restarted from an older restartpoint) stay watched;
                          -- pg_xact_status would call them 'in the future'.
                          WHERE CASE WHEN x >= m::text::bigint THEN true
                                     ELSE pg_xact_status(x::text::xid8) = 'in progress' END)",
        )
        .bind(watch)
        .fetch_one(&mut *conn)
        .await?;
        // The snapshot must be taken after the status check above: an id
        // reported finished there is then visible (if it committed) below.
        let mut tx = sqlx::Connection::begin_with(
            &mut *conn,
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        )
        .await?;
        let (xmax, pruned_xid): (i64, i64) = sqlx::query_as(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint,
                    (SELECT pruned_xid FROM change_log_horizon)",
        )
        .fetch_one(&mut *tx)
        .await?;
        let mut rows: Vec<Change> = sqlx::query_as(
            "SELECT seq, store_id, hostname, kind, xid FROM change_log
             WHERE xid >= $1 OR xid = ANY($2)
             ORDER BY xid, seq LIMIT $3",
        )
        .bind(bound)
        .bind(watch)
        .bind(limit + 1)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let rows = if rows.len() as i64 > limit {
            rows.clear();
            None
        } else {
            Some(rows)
        };
        Ok(FeedPoll {
            replay_lsn: lsn.and_then(|l| l.parse().ok()),
            received_lsn: received.and_then(|l| l.parse().ok()),
            running,
            xmax,
            pruned_xid,
            rows,
        })
    }

    /// Replication state, for health and metrics (see [`ReplicaStatus`]).
    pub async fn status(&self) -> Result<ReplicaStatus, sqlx::Error> {
        edgefront_lag::sample(self.pool().await?).await
    }
}

/// The database's failover candidates, for read-your-writes reads: the
/// configured primary and its standbys, each a lazily connected pool. With
/// standbys, [`Primaries::follow`] asks each which one leads (not in
/// recovery) and reads go there; until one is found after a failover,
/// [`Primaries::current`] is `None` and read-your-writes falls back as when
/// the primary is down. The questions go over connections of their own
/// (`probes`), made on the runtime that asks, so a busy read pool never
/// delays them and the proxy's pools stay on the proxy's runtime.
///
/// A question outlives the `timeout` of the [`Primaries::follow`] that
/// asked it: from a region far from a candidate, opening a connection (TCP,
/// TLS, start-up, then `SET`) takes about six round trips, over a second
/// across the world; cancelling it at the timeout would drop every attempt
/// half-way, and that region would never learn who leads. The next
/// `follow` waits for the same question instead of asking again.
pub struct Primaries {
    pools: Vec<Replica>,
    probes: Vec<Probe>,
    /// Index of the leader in `pools`; [`NO_LEADER`] while none is known.
    leader: std::sync::atomic::AtomicUsize,
    /// Whether the leader said so in the last round of questions (not
    /// merely kept because it did not answer, or assumed at start).
    confirmed: std::sync::atomic::AtomicBool,
}

const NO_LEADER: usize = usize::MAX;

/// How long one question to a candidate may take in all (connecting
/// included; see [`Primaries`]).
const QUESTION_LIMIT: Duration = Duration::from_secs(10);

/// What a candidate answered: `Some(Some(timeline))` it leads, `Some(None)`
/// it is a standby, `None` no answer.
type Answer = Option<Option<u32>>;

/// One candidate's connection for questions, and the question in flight.
#[derive(Clone)]
struct Probe {
    db: Replica,
    asking: Arc<tokio::sync::Mutex<Option<tokio::task::JoinHandle<Answer>>>>,
}

impl Probe {
    /// The answer to the question in flight (or a new one), if it comes
    /// within `timeout`; the question goes on otherwise.
    async fn ask(&self, timeout: Duration) -> Answer {
        let mut asking = self.asking.lock().await;
        let db = self.db.clone();
        let handle = asking.get_or_insert_with(|| {
            // Bounded as a whole: a candidate whose host went silent
            // mid-query would otherwise hold the question until TCP gives up
            // (minutes), answering nothing meanwhile.
            tokio::spawn(async move {
                tokio::time::timeout(QUESTION_LIMIT, async move {
                    let p = db.pool().await.ok()?;
                    // A leader's WAL file name starts with its timeline.
                    let wal = sqlx::query_scalar::<_, Option<String>>(
                        "SELECT CASE WHEN pg_is_in_recovery() THEN NULL
                                ELSE pg_walfile_name(pg_current_wal_lsn()) END",
                    )
                    .fetch_one(p)
                    .await
                    .ok()?;
                    Some(wal.and_then(|w| w.get(..8).and_then(|t| u32::from_str_radix(t, 16).ok())))
                })
                .await
                .ok()
                .flatten()
            })
        });
        match tokio::time::timeout(timeout, &mut *handle).await {
            Ok(answer) => {
                *asking = None;
                answer.ok().flatten()
            }
            Err(_) => None,
        }
    }
}

impl Primaries {
    /// `primary` (taken to lead until checked) and the other candidates.
    pub fn new(primary: &str, standbys: &[String], max_connections: u32) -> Self {
        let urls: Vec<&str> = std::iter::once(primary)
            .chain(standbys.iter().map(String::as_str))
            .collect();
        Primaries {
            pools: urls
                .iter()
                .map(|u| Replica::new(u, max_connections))
                .collect(),
            probes: urls
                .iter()
                .map(|u| Probe {
                    // Its own deadline is `follow`'s; the connection may
                    // take longer to open (see above).
                    db: Replica::with_acquire_timeout(u, 1, QUESTION_LIMIT)
                        .named("edgefront-edge leader probe"),
                    asking: Arc::default(),
                })
                .collect(),
            leader: std::sync::atomic::AtomicUsize::new(0),
            confirmed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The leader's pool, if one is known.
    pub fn current(&self) -> Option<&Replica> {
        self.pools
            .get(self.leader.load(std::sync::atomic::Ordering::Acquire))
    }

    /// The leader's index if it said it leads in the last round of
    /// [`Primaries::follow`].
    pub fn confirmed_leader(&self) -> Option<usize> {
        if !self.confirmed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let i = self.leader.load(std::sync::atomic::Ordering::Acquire);
        (i != NO_LEADER).then_some(i)
    }

    /// Whether there is anyone to follow.
    pub fn has_standbys(&self) -> bool {
        self.pools.len() > 1
    }

    /// Asks every candidate at once whether it is in recovery (each within
    /// `timeout`) and takes the one that is not as the leader. When none
    /// says it leads, the leader is kept if it did not answer (unknown: a
    /// slow moment) and dropped if it answered that it is a standby (a
    /// failover under way). Returns the leader's index when it changed.
    pub async fn follow(&self, timeout: Duration) -> Option<Option<usize>> {
        let mut asking = tokio::task::JoinSet::new();
        for (i, probe) in self.probes.iter().enumerate() {
            let probe = probe.clone();
            asking.spawn(async move { (i, probe.ask(timeout).await) });
        }
        // Two that say they lead (an old leader not yet demoted): the newer
        // timeline is the one that was promoted; then the lowest index.
        let mut leader: Option<(u32, usize)> = None;
        let current = self.leader.load(std::sync::atomic::Ordering::Acquire);
        let mut current_unknown = false;
        while let Some(r) = asking.join_next().await {
            match r {
                Ok((i, Some(Some(tl))))
                    if leader.is_none_or(|(best, at)| tl > best || (tl == best && i < at)) =>
                {
                    leader = Some((tl, i));
                }
                Ok((i, None)) if i == current => current_unknown = true,
                _ => {}
            }
        }
        self.confirmed
            .store(leader.is_some(), std::sync::atomic::Ordering::Release);
        let leader = match leader {
            Some((_, i)) => Some(i),
            None if current_unknown => Some(current),
            None => None,
        };
        let new = leader.unwrap_or(NO_LEADER);
        let old = self.leader.swap(new, std::sync::atomic::Ordering::AcqRel);
        (old != new).then_some(leader)
    }
}
