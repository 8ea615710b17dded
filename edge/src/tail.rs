//! The change-log tail: a background service that reads `change_log` on this
//! region's replica and invalidates exactly the affected cache entries.
//!
//! The log row travels in the same WAL as the data it describes, so when the
//! tail sees a row the data of that row is already visible on the replica; a
//! page rendered after the invalidation can only show the new data, and a
//! render that started before it stored its result under the old generation,
//! which is never read again.
//!
//! **No committed row is ever skipped.** `seq` is taken at insert time, not at
//! commit time, so "rows after the last seq seen" loses a row whose
//! transaction commits after a later one. The tail therefore tracks
//! transactions, not positions ([`Position`]): every row carries the id of the
//! transaction that wrote it; the tail watches every id that may still
//! commit — all ids at or above a bound, plus the ids below it that were
//! still running — and drops an id from the watch only once it has read its
//! rows, or once PostgreSQL has reported it finished *before* the snapshot the
//! rows are read from was taken (a finished transaction's rows are then in
//! that snapshot, or it wrote none). `pg_xact_status` and the snapshot's xmax
//! work on a hot standby (its known-assigned transactions), so this needs
//! nothing but the replica. docs/architecture.md explains it with an example.
//!
//! The tail also publishes the replay LSN up to which every invalidation has
//! been applied ([`Freshness`]), which read-your-writes waits on. If rows the
//! tail may still need were pruned on the primary, it cannot know what
//! changed and drops the whole cache (logged and counted).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use edgefront_schema::{Lsn, StoreId};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;

use crate::cache::PageCache;
use crate::metrics::Metrics;
use crate::replica::{Change, Replica};

/// How far invalidation has caught up, shared with the request path.
#[derive(Clone)]
pub struct Freshness {
    applied: watch::Receiver<Lsn>,
    /// The newest primary position the replica has received (read-your-writes
    /// cookies far beyond it are absurd).
    primary_seen: Arc<AtomicU64>,
    /// Set while the tail cannot read the replica: page misses then go
    /// straight to stale-if-error instead of waiting for a connection.
    replica_down: Arc<AtomicBool>,
}

impl Freshness {
    /// A freshness handle and the sender the tail publishes to.
    pub fn new() -> (Freshness, watch::Sender<Lsn>) {
        let (tx, rx) = watch::channel(Lsn(0));
        (
            Freshness {
                applied: rx,
                primary_seen: Arc::default(),
                replica_down: Arc::default(),
            },
            tx,
        )
    }

    /// The position the tail has applied (0 until its feed started and
    /// applied a first poll: the cache is dropped as the feed starts).
    pub fn applied_watch(&self) -> watch::Receiver<Lsn> {
        self.applied.clone()
    }

    /// Whether the tail's last poll of the replica failed.
    pub fn replica_down(&self) -> bool {
        self.replica_down.load(Ordering::Relaxed)
    }

    /// The newest primary position the replica has received (0: not yet known).
    pub fn primary_seen(&self) -> Lsn {
        Lsn(self.primary_seen.load(Ordering::Relaxed))
    }

    /// Where the tail records [`Freshness::primary_seen`].
    pub fn primary_seen_cell(&self) -> Arc<AtomicU64> {
        self.primary_seen.clone()
    }

    /// The flag the tail sets.
    pub fn replica_down_flag(&self) -> Arc<AtomicBool> {
        self.replica_down.clone()
    }

    /// The replay LSN up to which all invalidations are applied.
    pub fn applied(&self) -> Lsn {
        *self.applied.borrow()
    }

    /// Waits until invalidation has caught up with `lsn`, at most `bound`.
    pub async fn wait_for(&self, lsn: Lsn, bound: Duration) -> bool {
        if self.applied() >= lsn {
            return true;
        }
        let mut rx = self.applied.clone();
        matches!(
            tokio::time::timeout(bound, rx.wait_for(|l| *l >= lsn)).await,
            Ok(Ok(_))
        )
    }
}

/// The tail service.
pub struct Tail {
    pub region: String,
    pub replica: Replica,
    pub cache: Arc<PageCache>,
    pub metrics: Arc<Metrics>,
    pub poll: Duration,
    pub applied: watch::Sender<Lsn>,
    /// Shared with [`Freshness::replica_down`].
    pub replica_down: Arc<AtomicBool>,
    /// Shared with [`Freshness::primary_seen`].
    pub primary_seen: Arc<AtomicU64>,
    /// Certificates in memory, when TLS is on.
    pub certs: Option<Arc<crate::tls::CertLoader>>,
}

/// Most rows one poll reads; a tail that falls further behind than this (a
/// replica catching up hours of writes) drops its whole cache instead.
const MAX_ROWS: i64 = 50_000;
/// Most transaction ids the tail watches; beyond it, the same.
const MAX_WATCH: usize = 200_000;

/// Where the tail is: which transactions may still add rows it has not read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    /// Every transaction id at or above this may still commit rows.
    pub bound: i64,
    /// Ids below `bound` whose rows have not been read and that were not yet
    /// seen finished (sorted, unique).
    pub watch: Vec<i64>,
}

impl Position {
    /// The position after a poll: `running` are the watched ids still running
    /// before the poll's snapshot, `xmax` that snapshot's xmax, `read` the ids
    /// whose rows the poll read. New ids in `[bound, xmax)` join the watch
    /// (their status is checked on the next poll); every id that was reported
    /// finished before the snapshot leaves it, as does every id whose rows
    /// were read. `None` when the watch would grow past its bound.
    pub fn advance(&self, running: &[i64], xmax: i64, read: &BTreeSet<i64>) -> Option<Position> {
        let fresh = usize::try_from(xmax.saturating_sub(self.bound)).unwrap_or(0);
        if running.len() + fresh > MAX_WATCH {
            return None;
        }
        let mut watch: BTreeSet<i64> = running.iter().copied().collect();
        watch.extend(self.bound..xmax.max(self.bound));
        let watch = watch.into_iter().filter(|x| !read.contains(x)).collect();
        Some(Position {
            bound: self.bound.max(xmax),
            watch,
        })
    }

    /// The oldest id the tail still needs rows of.
    pub fn oldest(&self) -> i64 {
        self.watch
            .first()
            .copied()
            .unwrap_or(self.bound)
            .min(self.bound)
    }
}

impl Tail {
    /// Starts (or restarts) the feed: reads where it stands, then drops the
    /// cache, so nothing cached predates what the tail watches from.
    async fn start_feed(&self) -> Result<Position, sqlx::Error> {
        let start = self.replica.feed_start().await?;
        self.cache.invalidate_all();
        Ok(Position {
            bound: start.bound,
            watch: start.running,
        })
    }

    /// Drops the whole cache after a gap the tail cannot see into.
    fn reset(&self, why: &str) {
        self.cache.invalidate_all();
        self.metrics.changelog_resets.inc();
        tracing::warn!(region = %self.region, reason = why, "change feed reset; dropped the whole cache");
    }

    /// Applies one row's invalidations.
    async fn apply(&self, row: &Change) {
        if let (Some(host), "domain") = (&row.hostname, row.kind.as_str()) {
            // First: a handshake or page for it asks the replica from now on.
            self.cache.domains().changed(host);
        }
        if let (Some(certs), Some(host), "certificate" | "domain") =
            (&self.certs, &row.hostname, row.kind.as_str())
        {
            // A new or renewed certificate, or a domain removed: the next
            // handshake reloads (or refuses) it.
            certs.invalidate(host).await;
        }
        match (row.kind.as_str(), row.store_id, &row.hostname) {
            ("domain", store, Some(host)) => {
                self.cache.invalidate_host(host).await;
                if let Some(s) = store {
                    self.cache.invalidate_store(StoreId(s));
                }
            }
            (_, Some(s), _) => self.cache.invalidate_store(StoreId(s)),
            _ => {}
        }
        self.metrics
            .changelog_invalidations
            .with_label_values(&[row.kind.as_str()])
            .inc();
        if row.seq as f64 > self.metrics.changelog_seq.get() {
            self.metrics.changelog_seq.set(row.seq as f64);
        }
    }

    /// One poll: applies every newly committed row, then publishes the replay
    /// position read before the rows' snapshot.
    pub async fn step(&self, pos: &mut Option<Position>) -> Result<(), sqlx::Error> {
        let cur = match pos.take() {
            Some(p) => p,
            // Starting, or restarting after a reset or an unreachable replica.
            None => self.start_feed().await?,
        };
        let poll = self
            .replica
            .feed_poll(&cur.watch, cur.bound, MAX_ROWS)
            .await;
        let poll = match poll {
            Ok(p) => p,
            Err(e) => {
                *pos = Some(cur);
                return Err(e);
            }
        };
        self.metrics.changelog_polls.inc();
        if let Some(l) = poll.received_lsn {
            self.primary_seen.fetch_max(l.0, Ordering::Relaxed);
        }
        if poll.pruned_xid > cur.oldest() {
            // Rows of a transaction still watched may be gone.
            self.reset("change log pruned past this edge's position");
            return Ok(());
        }
        let Some(rows) = poll.rows else {
            self.reset("more new change-log rows than one poll reads");
            return Ok(());
        };
        let mut read = BTreeSet::new();
        for row in &rows {
            self.apply(row).await;
            read.insert(row.xid);
        }
        let Some(next) = cur.advance(&poll.running, poll.xmax, &read) else {
            self.reset("too many transactions to watch");
            return Ok(());
        };
        self.metrics.changelog_watched.set(next.watch.len() as f64);
        *pos = Some(next);
        if let Some(lsn) = poll.replay_lsn {
            // Published after the rows are applied: every change committed at
            // or below `lsn` was visible in this poll's snapshot.
            self.applied.send_if_modified(|cur| {
                let advance = lsn > *cur;
                if advance {
                    *cur = lsn;
                    self.metrics.changelog_applied_lsn.set(lsn.0 as f64);
                }
                advance
            });
        }
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for Tail {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut pos = None;
        let mut failing = false;
        loop {
            match self.step(&mut pos).await {
                Ok(()) => {
                    self.replica_down.store(false, Ordering::Relaxed);
                    if failing {
                        tracing::info!(region = %self.region, "change-log tail recovered");
                        failing = false;
                    }
                }
                Err(e) => {
                    self.metrics.changelog_errors.inc();
                    self.replica_down.store(true, Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(region = %self.region, error = %e, "change-log tail cannot read the replica");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[i64]) -> BTreeSet<i64> {
        v.iter().copied().collect()
    }

    #[test]
    fn position_watches_running_and_new_ids_until_read_or_finished() {
        let p = Position {
            bound: 10,
            watch: vec![4, 7],
        };
        // 4 finished before the snapshot (dropped), 7 still running; 10..13
        // are new; 11 committed and its rows were read.
        let next = p.advance(&[7], 13, &ids(&[11])).expect("small");
        assert_eq!(next.bound, 13);
        assert_eq!(next.watch, vec![7, 10, 12]);
        assert_eq!(next.oldest(), 7);
        // A watched id that committed between the status check and the
        // snapshot was read: it leaves the watch too.
        let next = next.advance(&[7, 10, 12], 13, &ids(&[7])).expect("small");
        assert_eq!(next.watch, vec![10, 12]);
    }

    #[test]
    fn position_never_moves_its_bound_back() {
        // A replica restarted from an older restartpoint can report a lower
        // xmax: the ids at or above the old bound stay covered by it.
        let p = Position {
            bound: 100,
            watch: vec![],
        };
        let next = p.advance(&[], 90, &ids(&[])).expect("small");
        assert_eq!(next.bound, 100);
        assert!(next.watch.is_empty());
        assert_eq!(next.oldest(), 100);
    }

    #[test]
    fn position_refuses_to_watch_without_bound() {
        let p = Position {
            bound: 0,
            watch: vec![],
        };
        assert!(p.advance(&[], MAX_WATCH as i64 + 1, &ids(&[])).is_none());
    }
}
