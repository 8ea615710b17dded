//! The history checker: every operation of a run in the anycast lab —
//! seller writes with their commit LSN, page reads from every city with the
//! version they saw and the region that answered, orders with their
//! acknowledgements, and samples of what each region's edge had applied —
//! and the checks over that history once the run is over.
//!
//! The checks (in the spirit of Jepsen's, over a history recorded from the
//! outside; [`lab`] records it while faults run):
//! - **applied** — no page read in a region returns data older than an
//!   invalidation that region had applied when the read began. The edge
//!   publishes `edgefront_changelog_applied_lsn`; a sample taken (answered)
//!   before the read started is a lower bound of what the answering edge had
//!   applied, provided the same edge process answered (its
//!   `edgefront_start_time_seconds` is the same in the samples before and
//!   after the read). Every write acknowledged with a commit LSN at or below
//!   that bound must be visible.
//! - **read-your-writes** — a client that wrote (and holds the `ef_lsn`
//!   cookie its write returned) never reads an older version, in any region.
//! - **monotonic reads** — a client's reads of one store never go back in
//!   version while it stays in one region.
//! - **orders** — every acknowledged order exists exactly once after
//!   recovery, with the id its acknowledgement named.
//!
//! Responses that declare a degradation in `cache-status` (`stale-if-error`:
//! the replica is down; `read-your-writes-behind`: the primary read was not
//! available) are counted apart: a declared stale page is not a silent one.
//! They are still checked for monotonic reads, except that a page declared
//! `read-your-writes-behind` may be older than versions the client saw that
//! were at most its own write (the same regression it declares); a version
//! newer than the client's own write must still never be lost.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

pub mod lab;

/// A seller write that was acknowledged: store `store` now shows `version`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Write {
    pub client: String,
    pub store: usize,
    pub version: u64,
    /// Commit LSN the origin returned (`x-commit-lsn`), as a byte position.
    pub lsn: u64,
    /// Seconds since the run began, when the acknowledgement arrived.
    pub acked: f64,
    pub region: String,
    /// Failed attempts before this one (the same version was retried).
    pub retries: u32,
}

/// A page read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Read {
    pub client: String,
    pub store: usize,
    pub start: f64,
    pub end: f64,
    /// HTTP status, or 0 when no response arrived.
    pub status: u16,
    /// `x-edge-route` of the answer.
    pub region: String,
    pub cache_status: String,
    /// The version the page showed (`None`: no page).
    pub version: Option<u64>,
    /// The newest version this client itself had written to this store
    /// (acknowledged) when the read began, and carried as its cookie.
    pub own: Option<u64>,
}

impl Read {
    /// The degradation the response declared, if any.
    pub fn declared(&self) -> Option<&'static str> {
        if self.cache_status.contains("stale-if-error") {
            Some("stale-if-error")
        } else if self.cache_status.contains("read-your-writes-behind") {
            Some("read-your-writes-behind")
        } else {
            None
        }
    }
}

/// What one region's edge had applied, scraped from its admin listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub region: String,
    /// When the scrape was sent and when its answer arrived.
    pub sent: f64,
    pub received: f64,
    pub applied_lsn: u64,
    /// `edgefront_start_time_seconds`: one value per edge process.
    pub started: f64,
}

/// An order attempt sequence under one idempotency key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Order {
    pub client: String,
    pub store: usize,
    pub key: String,
    /// The order id of the first acknowledgement (2xx), if any.
    pub acked: Option<i64>,
    pub attempts: u32,
}

/// A fault the run injected, with when it began and ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Fault {
    pub name: String,
    pub start: f64,
    pub end: f64,
}

/// Everything recorded during a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub writes: Vec<Write>,
    pub reads: Vec<Read>,
    pub samples: Vec<Sample>,
    pub orders: Vec<Order>,
    pub faults: Vec<Fault>,
    /// Failed write attempts (no acknowledgement), by error.
    pub write_failures: u64,
}

/// One broken guarantee, with the evidence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Violation {
    pub check: String,
    pub detail: String,
}

/// The checker's verdict.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub reads: usize,
    pub pages: usize,
    pub failed_reads: usize,
    pub writes: usize,
    pub write_failures: u64,
    pub samples: usize,
    pub orders: usize,
    pub orders_acked: usize,
    /// Page reads checked against an applied position (same edge process
    /// sampled before and after).
    pub checked_applied: usize,
    /// Reads that had to satisfy a version requirement (their region had
    /// applied at least one acknowledged write of the store).
    pub constrained_applied: usize,
    pub checked_read_your_writes: usize,
    pub checked_monotonic: usize,
    /// Declared degradations by kind (not violations).
    pub declared: BTreeMap<String, usize>,
    /// Reads answered by each region.
    pub by_region: BTreeMap<String, usize>,
    pub faults: Vec<Fault>,
    pub violations: Vec<Violation>,
}

impl Report {
    /// A few lines for people: sizes, what was checked, what broke.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "history: {} reads ({} pages, {} without an answer) from {:?}, {} acknowledged writes \
             ({} failed attempts), {} orders ({} acknowledged), {} samples of applied positions\n\
             checked: {} reads against their region's applied position ({} constrained by a write), \
             {} read-your-writes, {} monotonic pairs; declared degradations {:?}\n\
             faults: {}\n\
             violations: {}\n",
            self.reads,
            self.pages,
            self.failed_reads,
            self.by_region,
            self.writes,
            self.write_failures,
            self.orders,
            self.orders_acked,
            self.samples,
            self.checked_applied,
            self.constrained_applied,
            self.checked_read_your_writes,
            self.checked_monotonic,
            self.declared,
            self.faults
                .iter()
                .map(|f| format!("{} ({:.1}–{:.1}s)", f.name, f.start, f.end))
                .collect::<Vec<_>>()
                .join(", "),
            self.violations.len(),
        );
        for v in self.violations.iter().take(20) {
            s.push_str(&format!("  {}: {}\n", v.check, v.detail));
        }
        s
    }
}

/// The orders the primary holds after recovery: idempotency key → ids.
pub type Committed = HashMap<String, Vec<i64>>;

/// Parses a PostgreSQL LSN (`16/B374D848`) into a byte position.
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// The store name that marks `version` of store `store` (what the writers
/// set and [`version_in`] finds on the page).
pub fn marker(store: usize, version: u64) -> String {
    format!("hist{store}v{version}x")
}

/// The version of store `store` a page shows (`None` if it shows none).
pub fn version_in(store: usize, body: &str) -> Option<u64> {
    let tag = format!("hist{store}v");
    body.match_indices(&tag).find_map(|(i, _)| {
        let rest = &body[i + tag.len()..];
        let end = rest.find('x')?;
        rest[..end].parse().ok()
    })
}

/// Runs every check over `h`; `committed` is read from the primary after
/// recovery.
pub fn check(h: &History, committed: &Committed) -> Report {
    let mut r = Report {
        reads: h.reads.len(),
        writes: h.writes.len(),
        write_failures: h.write_failures,
        samples: h.samples.len(),
        orders: h.orders.len(),
        faults: h.faults.clone(),
        ..Report::default()
    };
    check_applied(h, &mut r);
    check_clients(h, &mut r);
    check_orders(h, committed, &mut r);
    r
}

/// Acknowledged writes of each store, by commit LSN.
fn acks_by_store(h: &History) -> HashMap<usize, Vec<(u64, u64)>> {
    let mut by: HashMap<usize, Vec<(u64, u64)>> = HashMap::new();
    for w in &h.writes {
        by.entry(w.store).or_default().push((w.lsn, w.version));
    }
    for v in by.values_mut() {
        v.sort_unstable();
    }
    by
}

fn check_applied(h: &History, r: &mut Report) {
    let acks = acks_by_store(h);
    let mut samples: HashMap<&str, Vec<&Sample>> = HashMap::new();
    for s in &h.samples {
        samples.entry(&s.region).or_default().push(s);
    }
    for v in samples.values_mut() {
        v.sort_by(|a, b| a.received.total_cmp(&b.received));
    }
    for read in &h.reads {
        if read.status == 0 {
            r.failed_reads += 1;
            continue;
        }
        *r.by_region.entry(read.region.clone()).or_default() += 1;
        if let Some(d) = read.declared() {
            *r.declared.entry(d.to_owned()).or_default() += 1;
        }
        let Some(version) = read.version else {
            continue;
        };
        r.pages += 1;
        let Some(list) = samples.get(read.region.as_str()) else {
            continue;
        };
        // The newest sample answered before the read began, and the first
        // one sent after it ended: the same process on both sides answered it.
        let before = list.iter().rev().find(|s| s.received < read.start);
        let after = list.iter().find(|s| s.sent > read.end);
        let (Some(before), Some(after)) = (before, after) else {
            continue;
        };
        if before.started != after.started {
            continue;
        }
        r.checked_applied += 1;
        let required = acks
            .get(&read.store)
            .into_iter()
            .flatten()
            .take_while(|(lsn, _)| *lsn <= before.applied_lsn)
            .map(|(_, v)| *v)
            .max();
        let Some(required) = required else { continue };
        r.constrained_applied += 1;
        if version < required && read.declared() != Some("stale-if-error") {
            r.violations.push(Violation {
                check: "applied".into(),
                detail: format!(
                    "{} read store {} in {} at {:.3}s and saw v{version}; that edge had applied \
                     {:X} by {:.3}s, which covers v{required} (cache-status: {})",
                    read.client,
                    read.store,
                    read.region,
                    read.start,
                    before.applied_lsn,
                    before.received,
                    read.cache_status
                ),
            });
        }
    }
}

fn check_clients(h: &History, r: &mut Report) {
    let mut reads: Vec<&Read> = h.reads.iter().filter(|x| x.version.is_some()).collect();
    reads.sort_by(|a, b| a.start.total_cmp(&b.start));
    // client → (region it was last answered by, store → newest version seen
    // there and when)
    type Seen = HashMap<usize, (u64, f64)>;
    let mut last: HashMap<&str, (&str, Seen)> = HashMap::new();
    for read in reads {
        let Some(version) = read.version else {
            continue;
        };
        if let Some(own) = read.own {
            r.checked_read_your_writes += 1;
            if version < own && read.declared() != Some("read-your-writes-behind") {
                r.violations.push(Violation {
                    check: "read-your-writes".into(),
                    detail: format!(
                        "{} wrote v{own} of store {} and then read v{version} in {} at {:.3}s \
                         (cache-status: {})",
                        read.client, read.store, read.region, read.start, read.cache_status
                    ),
                });
            }
        }
        let entry = last
            .entry(&read.client)
            .or_insert_with(|| (&read.region, HashMap::new()));
        if entry.0 != read.region {
            // The client moved: monotonic reads restart in the new region.
            *entry = (&read.region, HashMap::new());
        }
        if let Some(&(seen, at)) = entry.1.get(&read.store) {
            r.checked_monotonic += 1;
            // A page declared `read-your-writes-behind` says "older than your
            // own write vN": going back below a version the client saw is
            // that same declared degradation when what it saw was at most
            // vN (its own writes). Anything newer it saw must still hold.
            let declared_behind = read.declared() == Some("read-your-writes-behind")
                && read.own.is_some_and(|own| seen <= own);
            if version < seen && !declared_behind {
                r.violations.push(Violation {
                    check: "monotonic".into(),
                    detail: format!(
                        "{} read v{seen} of store {} in {} at {at:.3}s, then v{version} at {:.3}s \
                         (cache-status: {})",
                        read.client, read.store, read.region, read.start, read.cache_status
                    ),
                });
            }
        }
        let e = entry.1.entry(read.store).or_insert((version, read.start));
        if version >= e.0 {
            *e = (version, read.start);
        }
    }
}

fn check_orders(h: &History, committed: &Committed, r: &mut Report) {
    for o in &h.orders {
        let Some(id) = o.acked else { continue };
        r.orders_acked += 1;
        let ids = committed.get(&o.key).map(Vec::as_slice).unwrap_or(&[]);
        if ids != [id] {
            r.violations.push(Violation {
                check: "orders".into(),
                detail: format!(
                    "order {id} under key {} was acknowledged to {}; the primary holds {ids:?}",
                    o.key, o.client
                ),
            });
        }
    }
    // Unacknowledged keys may have committed (the answer was lost), but at
    // most once.
    for (key, ids) in committed {
        if ids.len() > 1 {
            r.violations.push(Violation {
                check: "orders".into(),
                detail: format!("key {key} made {} orders: {ids:?}", ids.len()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(store: usize, version: u64, lsn: u64) -> Write {
        Write {
            client: "w".into(),
            store,
            version,
            lsn,
            acked: 0.0,
            region: "bom1".into(),
            retries: 0,
        }
    }

    fn read(client: &str, region: &str, start: f64, version: u64) -> Read {
        Read {
            client: client.into(),
            store: 1,
            start,
            end: start + 0.01,
            status: 200,
            region: region.into(),
            cache_status: "edgefront; hit".into(),
            version: Some(version),
            own: None,
        }
    }

    fn sample(region: &str, at: f64, lsn: u64, started: f64) -> Sample {
        Sample {
            region: region.into(),
            sent: at - 0.001,
            received: at,
            applied_lsn: lsn,
            started,
        }
    }

    fn base() -> History {
        History {
            writes: vec![write(1, 1, 100), write(1, 2, 200), write(1, 3, 300)],
            samples: vec![sample("bom1", 1.0, 250, 7.0), sample("bom1", 3.0, 350, 7.0)],
            ..History::default()
        }
    }

    fn checks(r: &Report) -> Vec<&str> {
        r.violations.iter().map(|v| v.check.as_str()).collect()
    }

    #[test]
    fn lsn_and_marker_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374D848));
        assert_eq!(parse_lsn("nope"), None);
        let page = format!("<h1>{}</h1>", marker(3, 41));
        assert_eq!(version_in(3, &page), Some(41));
        assert_eq!(version_in(31, &page), None, "another store's marker");
        assert_eq!(version_in(3, "<h1>hist3vx</h1>"), None);
    }

    #[test]
    fn applied_flags_a_page_older_than_an_applied_invalidation() {
        let mut h = base();
        // Applied 250 covers v2 (lsn 200): v2 is fine, v1 is a violation.
        h.reads.push(read("a", "bom1", 2.0, 2));
        h.reads.push(read("b", "bom1", 2.1, 1));
        let r = check(&h, &Committed::new());
        assert_eq!(checks(&r), ["applied"], "{:#?}", r.violations);
        assert_eq!(r.checked_applied, 2);
    }

    #[test]
    fn applied_skips_reads_across_an_edge_restart_and_declared_stale_pages() {
        let mut h = base();
        h.samples[1].started = 8.0; // another process answered after
        h.reads.push(read("a", "bom1", 2.0, 1));
        let r = check(&h, &Committed::new());
        assert!(r.violations.is_empty());
        assert_eq!(r.checked_applied, 0);

        let mut h = base();
        let mut stale = read("a", "bom1", 2.0, 1);
        stale.cache_status = "edgefront; hit; detail=stale-if-error".into();
        h.reads.push(stale);
        let r = check(&h, &Committed::new());
        assert!(r.violations.is_empty());
        assert_eq!(r.declared.get("stale-if-error"), Some(&1));
    }

    #[test]
    fn read_your_writes_holds_in_any_region_unless_declared_behind() {
        let mut h = History::default();
        let mut mine = read("w", "sin1", 1.0, 2);
        mine.own = Some(3);
        h.reads.push(mine.clone());
        mine.cache_status = "edgefront; hit; detail=read-your-writes-behind".into();
        mine.start = 2.0;
        h.reads.push(mine);
        let r = check(&h, &Committed::new());
        assert_eq!(checks(&r), ["read-your-writes"]);
        assert_eq!(r.declared.get("read-your-writes-behind"), Some(&1));
    }

    #[test]
    fn monotonic_reads_restart_when_the_client_changes_region() {
        let mut h = History::default();
        h.reads.push(read("a", "bom1", 1.0, 5));
        h.reads.push(read("a", "sin1", 2.0, 4)); // moved: allowed
        h.reads.push(read("a", "sin1", 3.0, 3)); // same region, older
        let r = check(&h, &Committed::new());
        assert_eq!(checks(&r), ["monotonic"]);
        assert_eq!(r.checked_monotonic, 1);
    }

    #[test]
    fn a_declared_behind_page_may_go_below_the_clients_own_writes_only() {
        // The seller saw its own v5 (read on the primary), then its next
        // write's read is served behind at v3: declared, not a violation.
        let mut h = History::default();
        let mut first = read("w", "sin1", 1.0, 5);
        first.own = Some(5);
        h.reads.push(first);
        let mut behind = read("w", "sin1", 2.0, 3);
        behind.own = Some(6);
        behind.cache_status = "edgefront; hit; detail=read-your-writes-behind".into();
        h.reads.push(behind.clone());
        let r = check(&h, &Committed::new());
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
        assert_eq!(r.checked_monotonic, 1);

        // It saw v9 (newer than any write of its own): going back is lost data.
        let mut h = History::default();
        h.reads.push(read("w", "sin1", 1.0, 9));
        h.reads.push(behind.clone());
        let r = check(&h, &Committed::new());
        assert_eq!(checks(&r), ["monotonic"]);

        // Undeclared, the same regression is a violation.
        let mut h = History::default();
        h.reads.push(read("w", "sin1", 1.0, 5));
        behind.cache_status = "edgefront; hit".into();
        behind.own = None;
        h.reads.push(behind);
        let r = check(&h, &Committed::new());
        assert_eq!(checks(&r), ["monotonic"]);
    }

    #[test]
    fn orders_acknowledged_must_exist_exactly_once() {
        let order = |key: &str, acked| Order {
            client: "o".into(),
            store: 1,
            key: key.into(),
            acked,
            attempts: 1,
        };
        let h = History {
            orders: vec![
                order("k1", Some(1)),
                order("k2", Some(2)),
                order("k3", None),
                order("k4", None),
            ],
            ..History::default()
        };
        let committed: Committed = [
            ("k1".to_owned(), vec![1]),
            ("k3".to_owned(), vec![3]), // committed, answer lost: fine
            ("k4".to_owned(), vec![4, 5]),
        ]
        .into();
        let r = check(&h, &committed);
        // k2 lost, k4 twice.
        assert_eq!(checks(&r), ["orders", "orders"], "{:#?}", r.violations);
        assert_eq!(r.orders_acked, 2);
    }
}
