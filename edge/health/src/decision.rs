//! Whether the region announces: hysteresis, and the rule that keeps a cause
//! every region shares from withdrawing the world.
//!
//! Every failed check is either **hard** or **soft**. Hard reasons belong to
//! this region alone (the edge does not answer, the replica is unreachable or
//! promoted) and always withdraw, as a drain does. Soft reasons are replica
//! lag over budget (WAL bytes, seconds, silence from the primary): every
//! replica replays the same WAL from the same primary, so a replay pause, a
//! long replay or a silent primary shows in every region at once, and
//! withdrawing for it would take the anycast address off the Internet. A soft
//! failure therefore withdraws only while at least `min_peers` **other**
//! regions are [fine](PeerView::fine); otherwise the region stays announced,
//! keeps serving what its replica has and raises the alert
//! (`edgefront_health_withdraw_suppressed`, an event, a warning log line).
//!
//! A peer is fine when its status was read just now, and it is announced,
//! healthy after hysteresis, not drained and not past half of any lag budget.
//! The last condition is what makes the rule hold when a shared cause crosses
//! the budgets a few hundred milliseconds apart in different regions: when the
//! first region crosses, the others are already past half and do not count,
//! so nobody withdraws; a lag that is only here finds the others at zero and
//! withdraws. A peer that cannot be read counts as not fine: when in doubt,
//! stay announced (the failure is soft; the hard ones never wait for peers).

use serde::{Deserialize, Serialize};

/// Rise/fall hysteresis over one kind of check.
#[derive(Debug, Clone, Default)]
pub struct Hysteresis {
    ok: bool,
    ok_streak: u32,
    fail_streak: u32,
}

impl Hysteresis {
    /// Starts failed: `rise` passing checks are needed first.
    pub fn new() -> Self {
        Hysteresis::default()
    }

    /// Records one check; returns the new state when it changed.
    pub fn record(&mut self, passed: bool, rise: u32, fall: u32) -> Option<bool> {
        if passed {
            self.ok_streak = self.ok_streak.saturating_add(1);
            self.fail_streak = 0;
        } else {
            self.fail_streak = self.fail_streak.saturating_add(1);
            self.ok_streak = 0;
        }
        if !self.ok && self.ok_streak >= rise {
            self.ok = true;
            Some(true)
        } else if self.ok && self.fail_streak >= fall {
            self.ok = false;
            Some(false)
        } else {
            None
        }
    }

    /// The state after hysteresis.
    pub fn ok(&self) -> bool {
        self.ok
    }
}

/// This region's own state, after hysteresis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Own {
    /// No hard reason (edge, replica reachability, promotion).
    pub hard_ok: bool,
    /// No soft reason (replica lag over budget).
    pub soft_ok: bool,
}

/// Another region as this hook last read it from that region's hook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    pub region: String,
    /// Its status was read on the last try (and its probes are running).
    pub reachable: bool,
    pub announced: bool,
    /// Healthy after hysteresis (hard and soft).
    pub healthy: bool,
    pub drained: bool,
    /// Past half of a lag budget: lag is building there too.
    pub lag_warning: bool,
    /// Why it could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PeerView {
    /// A peer that could not be read.
    pub fn unreachable(region: &str, error: String) -> Self {
        PeerView {
            region: region.to_owned(),
            reachable: false,
            announced: false,
            healthy: false,
            drained: false,
            lag_warning: false,
            error: Some(error),
        }
    }

    /// Counts towards the regions that can take this one's shoppers.
    pub fn fine(&self) -> bool {
        self.reachable && self.announced && self.healthy && !self.drained && !self.lag_warning
    }
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Announce the anycast route (before drain, which the daemon applies).
    pub announce: bool,
    /// A soft failure would withdraw, but too few other regions are fine:
    /// staying announced, alert raised.
    pub suppressed: bool,
    /// Other regions that are fine.
    pub fine_peers: usize,
}

/// The rule (see the module docs): hard failures withdraw; soft ones
/// withdraw only while at least `min_peers` other regions are fine.
pub fn decide(own: Own, peers: &[PeerView], min_peers: usize) -> Decision {
    let fine_peers = peers.iter().filter(|p| p.fine()).count();
    let (announce, suppressed) = match own {
        Own { hard_ok: false, .. } => (false, false),
        Own {
            hard_ok: true,
            soft_ok: true,
        } => (true, false),
        Own {
            hard_ok: true,
            soft_ok: false,
        } if fine_peers >= min_peers => (false, false),
        Own {
            hard_ok: true,
            soft_ok: false,
        } => (true, true),
    };
    Decision {
        announce,
        suppressed,
        fine_peers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGIONS: [&str; 9] = [
        "bom1", "sin1", "ams1", "fra1", "lon1", "nyc1", "lax1", "gru1", "syd1",
    ];

    fn peer(region: &str) -> PeerView {
        PeerView {
            region: region.into(),
            reachable: true,
            announced: true,
            healthy: true,
            drained: false,
            lag_warning: false,
            error: None,
        }
    }

    fn others(me: &str, f: impl Fn(PeerView) -> PeerView) -> Vec<PeerView> {
        REGIONS
            .iter()
            .filter(|r| **r != me)
            .map(|r| f(peer(r)))
            .collect()
    }

    const LAGGING: Own = Own {
        hard_ok: true,
        soft_ok: false,
    };
    const FINE: Own = Own {
        hard_ok: true,
        soft_ok: true,
    };

    #[test]
    fn decide_keeps_every_region_announced_when_all_lag() {
        // Every region over budget: each sees the others announced but
        // unhealthy (suppressed) and lag-warned.
        for me in REGIONS {
            let peers = others(me, |p| PeerView {
                healthy: false,
                lag_warning: true,
                ..p
            });
            let d = decide(LAGGING, &peers, 2);
            assert!(d.announce && d.suppressed, "{me}: {d:?}");
            assert_eq!(d.fine_peers, 0);
        }
    }

    #[test]
    fn decide_keeps_the_first_region_over_budget_announced_when_the_others_are_close() {
        // A shared cause crossing the budget here first: the others are still
        // healthy after hysteresis but past half their budget.
        let peers = others("sin1", |p| PeerView {
            lag_warning: true,
            ..p
        });
        let d = decide(LAGGING, &peers, 2);
        assert!(d.announce && d.suppressed, "{d:?}");
    }

    #[test]
    fn decide_withdraws_one_lagging_region_with_eight_healthy_peers() {
        let d = decide(LAGGING, &others("syd1", |p| p), 2);
        assert_eq!(
            d,
            Decision {
                announce: false,
                suppressed: false,
                fine_peers: 8
            }
        );
    }

    #[test]
    fn decide_stays_announced_when_peers_are_unreachable() {
        let peers = others("gru1", |p| {
            PeerView::unreachable(&p.region, "timed out".into())
        });
        let d = decide(LAGGING, &peers, 2);
        assert!(d.announce && d.suppressed, "{d:?}");
        // One peer fine is not enough for the default of two.
        let mut peers = peers;
        peers[0] = peer("bom1");
        assert!(decide(LAGGING, &peers, 2).announce);
        peers[1] = peer("sin1");
        assert!(!decide(LAGGING, &peers, 2).announce);
    }

    #[test]
    fn decide_does_not_count_drained_withdrawn_or_unhealthy_peers() {
        let mut peers = others("lon1", |p| PeerView::unreachable(&p.region, "down".into()));
        peers[0] = PeerView {
            drained: true,
            ..peer("bom1")
        };
        peers[1] = PeerView {
            announced: false,
            ..peer("sin1")
        };
        peers[2] = PeerView {
            healthy: false,
            ..peer("ams1")
        };
        peers[3] = peer("fra1");
        let d = decide(LAGGING, &peers, 2);
        assert_eq!((d.announce, d.fine_peers), (true, 1));
    }

    #[test]
    fn decide_withdraws_on_a_hard_failure_whatever_the_peers() {
        let peers = others("ams1", |p| PeerView::unreachable(&p.region, "down".into()));
        for soft_ok in [true, false] {
            let d = decide(
                Own {
                    hard_ok: false,
                    soft_ok,
                },
                &peers,
                2,
            );
            assert!(!d.announce && !d.suppressed, "{d:?}");
        }
    }

    #[test]
    fn decide_announces_a_fine_region_and_min_peers_zero_always_withdraws_on_lag() {
        assert!(decide(FINE, &[], 2).announce);
        let d = decide(LAGGING, &[], 0);
        assert!(!d.announce && !d.suppressed);
    }

    #[test]
    fn hysteresis_needs_rise_good_and_fall_bad_checks_in_a_row() {
        let mut h = Hysteresis::new();
        assert_eq!(h.record(true, 3, 2), None);
        assert_eq!(h.record(true, 3, 2), None);
        assert_eq!(h.record(true, 3, 2), Some(true));
        assert_eq!(h.record(false, 3, 2), None);
        assert_eq!(h.record(true, 3, 2), None);
        assert!(h.ok(), "one bad check does not flip it");
        assert_eq!(h.record(false, 3, 2), None);
        assert_eq!(h.record(false, 3, 2), Some(false));
        assert!(!h.ok());
    }
}
