//! Invalidation counters for the caches the change feed keeps fresh.
//!
//! A cache filled from the replica races the tail: a lookup reads a value,
//! the tail applies an invalidation of that name, then the lookup inserts
//! what it read — a value older than an invalidation the region has already
//! applied. Pages avoid this with a per-store generation in the cache key;
//! [`Generations`] gives the same guard to caches keyed by name (host →
//! store, certificates, the negative caches): the tail bumps the name's
//! counter *before* it evicts, and a fill either keys its insert by the
//! counter it read before querying ([`Generations::get`]) or re-checks the
//! counter after inserting and reads again ([`Generations::fill`]).
//!
//! Counters live in a fixed number of slots (a hash of the name picks one),
//! so memory stays bounded whatever the number of names; two names sharing a
//! slot only cost each other an extra miss.

use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};

/// Slots per table: enough that unrelated invalidations rarely collide.
const SLOTS: usize = 4096;

/// Per-name invalidation counters.
pub struct Generations {
    slots: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for Generations {
    fn default() -> Self {
        Generations {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: Default::default(),
        }
    }
}

impl Generations {
    fn slot(&self, name: &(impl Hash + ?Sized)) -> &AtomicU64 {
        let i = (self.hasher.hash_one(name) as usize) % self.slots.len();
        &self.slots[i]
    }

    /// The current counter of `name`.
    pub fn get(&self, name: &(impl Hash + ?Sized)) -> u64 {
        self.slot(name).load(Ordering::SeqCst)
    }

    /// Marks `name` invalidated: lookups that read before this point must not
    /// store their result. Call before evicting.
    pub fn bump(&self, name: &(impl Hash + ?Sized)) {
        self.slot(name).fetch_add(1, Ordering::SeqCst);
    }

    /// Runs `fill` (read from the replica, then insert) until no invalidation
    /// of `name` landed while it ran, at most `tries` times. Returns the last
    /// fill's value and whether it settled; when it did not, the caller must
    /// remove what the fills inserted (the tail may have evicted before them).
    ///
    /// Why a re-check is enough: the tail bumps the counter, then evicts. If
    /// the bump came before our second read of the counter we read again; if
    /// it came after, so did the eviction, which then removes our insert.
    pub async fn fill<T, E, F, Fut>(
        &self,
        name: &(impl Hash + ?Sized),
        tries: usize,
        mut fill: F,
    ) -> Result<(T, bool), E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut tries = tries.max(1);
        loop {
            let before = self.get(name);
            let value = fill().await?;
            if self.get(name) == before {
                return Ok((value, true));
            }
            tries -= 1;
            if tries == 0 {
                return Ok((value, false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn fill_reads_again_when_an_invalidation_lands_in_between() {
        let g = Generations::default();
        let db = Mutex::new("old");
        let cache = Mutex::new(None);
        let mut calls = 0;
        let (v, settled) = g
            .fill("shop.example", 3, || {
                calls += 1;
                // The read sees the old value; before the insert the tail
                // commits "new", bumps and evicts (nothing to evict yet).
                let read = *db.lock().expect("db");
                if calls == 1 {
                    *db.lock().expect("db") = "new";
                    g.bump("shop.example");
                    *cache.lock().expect("cache") = None;
                }
                *cache.lock().expect("cache") = Some(read);
                async move { Ok::<_, ()>(read) }
            })
            .await
            .expect("fill");
        assert!(settled);
        assert_eq!(calls, 2, "the stale read must be retried");
        assert_eq!(v, "new");
        assert_eq!(*cache.lock().expect("cache"), Some("new"));
    }

    #[tokio::test]
    async fn fill_gives_up_unsettled_under_constant_invalidation() {
        let g = Generations::default();
        let (_, settled) = g
            .fill("busy.example", 2, || {
                g.bump("busy.example");
                async { Ok::<_, ()>(()) }
            })
            .await
            .expect("fill");
        assert!(!settled);
    }

    #[test]
    fn bump_changes_only_its_own_slot_most_of_the_time() {
        let g = Generations::default();
        let before: Vec<u64> = (0..50).map(|i| g.get(&format!("h{i}.example"))).collect();
        g.bump("h0.example");
        assert_ne!(g.get("h0.example"), before[0]);
        let moved = (1..50)
            .filter(|&i| g.get(&format!("h{i}.example")) != before[i])
            .count();
        assert!(moved <= 2, "{moved} other names invalidated");
    }
}
