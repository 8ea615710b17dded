//! The change-log tail: a background service that reads `change_log` on this
//! region's replica and invalidates exactly the affected cache entries.
//!
//! The log row travels in the same WAL as the data it describes, so when the
//! tail sees row N the data of row N is already visible on the replica; a page
//! rendered after the invalidation can only show the new data, and a render
//! that started before it stored its result under the old generation, which is
//! never read again. The tail also publishes the replay LSN up to which every
//! invalidation has been applied ([`Freshness`]), which read-your-writes waits
//! on. If rows the tail has not seen were pruned on the primary, it cannot know
//! what changed and drops the whole cache (logged and counted).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use edgefront_schema::{Lsn, StoreId};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::watch;

use crate::cache::PageCache;
use crate::metrics::Metrics;
use crate::replica::Replica;

/// How far invalidation has caught up, shared with the request path.
#[derive(Clone)]
pub struct Freshness {
    applied: watch::Receiver<Lsn>,
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
                replica_down: Arc::default(),
            },
            tx,
        )
    }

    /// Whether the tail's last poll of the replica failed.
    pub fn replica_down(&self) -> bool {
        self.replica_down.load(Ordering::Relaxed)
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
    /// Certificates in memory, when TLS is on.
    pub certs: Option<Arc<crate::tls::CertLoader>>,
}

/// Rows read per poll; a full batch is followed by another poll at once.
const BATCH: i64 = 2000;

impl Tail {
    /// One poll: applies new rows, returns whether more may be waiting.
    pub async fn step(&self, last: &mut Option<i64>) -> Result<bool, sqlx::Error> {
        let since = match *last {
            Some(s) => s,
            None => {
                // Starting (or restarting after the replica was unreachable with
                // nothing known): nothing cached can predate what we start from.
                let s = self.replica.latest_change().await?;
                self.cache.invalidate_all();
                *last = Some(s);
                s
            }
        };
        let batch = self.replica.changes_since(since, BATCH).await?;
        self.metrics.changelog_polls.inc();
        if batch.horizon > since {
            // Rows after `since` may have been pruned unseen.
            self.cache.invalidate_all();
            self.metrics.changelog_resets.inc();
            tracing::warn!(
                region = %self.region,
                last_seen = since,
                horizon = batch.horizon,
                "change log pruned past this edge's position; dropped the whole cache"
            );
        }
        let mut newest = since.max(batch.horizon);
        for row in &batch.rows {
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
            newest = newest.max(row.seq);
        }
        *last = Some(newest);
        self.metrics.changelog_seq.set(newest as f64);
        let more = batch.rows.len() as i64 == BATCH;
        if !more && let Some(lsn) = batch.replay_lsn {
            self.applied.send_if_modified(|cur| {
                let advance = lsn > *cur;
                if advance {
                    *cur = lsn;
                }
                advance
            });
        }
        Ok(more)
    }
}

#[async_trait]
impl BackgroundService for Tail {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut last = None;
        let mut failing = false;
        loop {
            let more = match self.step(&mut last).await {
                Ok(more) => {
                    self.replica_down.store(false, Ordering::Relaxed);
                    if failing {
                        tracing::info!(region = %self.region, "change-log tail recovered");
                        failing = false;
                    }
                    more
                }
                Err(e) => {
                    self.metrics.changelog_errors.inc();
                    self.replica_down.store(true, Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(region = %self.region, error = %e, "change-log tail cannot read the replica");
                        failing = true;
                    }
                    false
                }
            };
            if more {
                continue;
            }
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
    }
}
