//! Abuse limits at the edge.
//!
//! Per client address:
//! - the seller API's costly, credential-free calls: creating a store
//!   (`POST /api/stores`, needs no token) and claiming or verifying a domain
//!   (`POST /api/domains`, `POST /api/domains/{h}/verify`, each a row and
//!   DNS lookups on the origin), per hour;
//! - every request forwarded to the origin (cart, checkout, orders, seller
//!   API), per second with a burst;
//! - lookups the caches cannot answer (a host never seen, a page never
//!   rendered here, a TLS name never seen), per second with a burst: a
//!   flood of random names or slugs from one address costs the replica at
//!   most this.
//!
//! A flood of made-up slugs spread over many addresses is not a matter of
//! budgets: the store's slug directory answers it from memory
//! (`crate::cache::Directory`).
//!
//! Keyed by the connection's peer address as the edge sees it (headers such
//! as `X-Forwarded-For` can be forged and are never used); IPv6 clients by
//! their /64, since one subscriber usually holds a whole /64. Limits are per
//! edge: BGP, not the client, picks the region, so a client cannot spread
//! its calls over regions at will. GCRA (governor): a burst of the hourly
//! quota, refilled evenly over the hour.

use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Which limit a request counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    StoreCreation,
    DomainClaim,
    /// Requests forwarded to the origin.
    OriginRequests,
    /// Lookups no cache could answer (per address).
    Misses,
}

impl Limited {
    /// The metric label and the error's subject.
    pub fn label(self) -> &'static str {
        match self {
            Limited::StoreCreation => "store_creation",
            Limited::DomainClaim => "domain_claim",
            Limited::OriginRequests => "origin_requests",
            Limited::Misses => "misses",
        }
    }

    /// Which limit `method path` counts against, if any.
    pub fn of(method: &http::Method, path: &str) -> Option<Limited> {
        if method != http::Method::POST {
            return None;
        }
        let path = path.trim_end_matches('/');
        if path == "/api/stores" {
            return Some(Limited::StoreCreation);
        }
        if path == "/api/domains"
            || path
                .strip_prefix("/api/domains/")
                .is_some_and(|rest| rest.ends_with("/verify"))
        {
            return Some(Limited::DomainClaim);
        }
        None
    }
}

/// A rate with its burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Rate {
    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// The limits' settings (defaults in [`crate::config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub store_creations_per_hour: NonZeroU32,
    pub domain_claims_per_hour: NonZeroU32,
    pub origin_requests: Rate,
    pub misses: Rate,
}

/// The limiters of one edge.
pub struct ClientLimits {
    stores: DefaultKeyedRateLimiter<IpAddr>,
    claims: DefaultKeyedRateLimiter<IpAddr>,
    origin: DefaultKeyedRateLimiter<IpAddr>,
    misses: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
    /// Checks since the limiters last forgot idle addresses.
    checks: std::sync::atomic::AtomicU32,
}

/// The key of a client address: IPv4 as is, IPv6 by its /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let seg = v6.segments();
                IpAddr::V6(Ipv6Addr::new(seg[0], seg[1], seg[2], seg[3], 0, 0, 0, 0))
            }
        },
    }
}

impl ClientLimits {
    /// The limiters for `s` (the hourly ones' burst is their quota).
    pub fn new(s: Settings) -> Self {
        ClientLimits {
            stores: RateLimiter::keyed(Quota::per_hour(s.store_creations_per_hour)),
            claims: RateLimiter::keyed(Quota::per_hour(s.domain_claims_per_hour)),
            origin: RateLimiter::keyed(s.origin_requests.quota()),
            misses: RateLimiter::keyed(s.misses.quota()),
            clock: DefaultClock::default(),
            checks: std::sync::atomic::AtomicU32::new(1),
        }
    }

    /// Counts one `what` call from `ip`: `Err(wait)` when over the limit,
    /// with how long until the next call is allowed.
    pub fn check(&self, what: Limited, ip: IpAddr) -> Result<(), Duration> {
        let limiter = match what {
            Limited::StoreCreation => &self.stores,
            Limited::DomainClaim => &self.claims,
            Limited::OriginRequests => &self.origin,
            Limited::Misses => &self.misses,
        };
        let key = client_key(ip);
        let r = limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()));
        self.forget_idle();
        r
    }

    /// Every 4096 checks, forget keys whose quota is full again (bounded
    /// memory without a scan per request, even under a flood of addresses).
    fn forget_idle(&self) {
        if self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(4096)
        {
            self.stores.retain_recent();
            self.claims.retain_recent();
            self.origin.retain_recent();
            self.misses.retain_recent();
        }
    }

    /// Keys held now (every limiter), for tests and the flood benchmark.
    pub fn keys(&self) -> usize {
        self.stores.len() + self.claims.len() + self.origin.len() + self.misses.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).expect("nonzero")
    }

    fn limits(stores: u32, claims: u32) -> ClientLimits {
        let rate = Rate {
            per_second: n(2),
            burst: n(5),
        };
        ClientLimits::new(Settings {
            store_creations_per_hour: n(stores),
            domain_claims_per_hour: n(claims),
            origin_requests: rate,
            misses: rate,
        })
    }

    #[test]
    fn per_second_limits_allow_their_burst_then_refill_evenly() {
        let l = limits(1, 1);
        let a: IpAddr = "198.51.100.7".parse().expect("ip");
        for _ in 0..5 {
            assert!(l.check(Limited::OriginRequests, a).is_ok());
        }
        let wait = l.check(Limited::OriginRequests, a).expect_err("limited");
        // 2 a second: the next one within half a second.
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
        assert!(l.check(Limited::Misses, a).is_ok(), "separate budgets");
    }

    #[test]
    fn limits_apply_to_store_creation_and_domain_claims_only() {
        let post = http::Method::POST;
        assert_eq!(
            Limited::of(&post, "/api/stores"),
            Some(Limited::StoreCreation)
        );
        assert_eq!(
            Limited::of(&post, "/api/domains"),
            Some(Limited::DomainClaim)
        );
        assert_eq!(
            Limited::of(&post, "/api/domains/shop.example/verify"),
            Some(Limited::DomainClaim)
        );
        assert_eq!(Limited::of(&http::Method::GET, "/api/domains"), None);
        assert_eq!(Limited::of(&post, "/api/products"), None);
        assert_eq!(Limited::of(&post, "/orders"), None);
    }

    #[test]
    fn a_client_over_its_quota_waits_and_others_do_not() {
        let l = limits(3, 100);
        let a: IpAddr = "198.51.100.7".parse().expect("ip");
        let b: IpAddr = "198.51.100.8".parse().expect("ip");
        for _ in 0..3 {
            assert!(l.check(Limited::StoreCreation, a).is_ok());
        }
        let wait = l.check(Limited::StoreCreation, a).expect_err("limited");
        // 3 an hour: the next one in ~20 minutes.
        assert!(
            wait > Duration::from_secs(19 * 60) && wait <= Duration::from_secs(20 * 60),
            "{wait:?}"
        );
        assert!(l.check(Limited::StoreCreation, b).is_ok(), "per address");
        assert!(l.check(Limited::DomainClaim, a).is_ok(), "per limit");
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let l = limits(1, 1);
        let x: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let z: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert!(l.check(Limited::StoreCreation, x).is_ok());
        assert!(l.check(Limited::StoreCreation, y).is_err(), "same /64");
        assert!(l.check(Limited::StoreCreation, z).is_ok(), "another /64");
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("ip");
        assert_eq!(
            client_key(mapped),
            "192.0.2.1".parse::<IpAddr>().expect("ip")
        );
    }
}
