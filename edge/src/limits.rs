//! Per-client-address limits on the seller API's costly, credential-free
//! calls: creating a store (`POST /api/stores`, needs no token) and claiming
//! or verifying a domain (`POST /api/domains`, `POST /api/domains/{h}/verify`,
//! each a row and DNS lookups on the origin).
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
}

impl Limited {
    /// The metric label and the error's subject.
    pub fn label(self) -> &'static str {
        match self {
            Limited::StoreCreation => "store_creation",
            Limited::DomainClaim => "domain_claim",
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

/// The limiters of one edge.
pub struct ClientLimits {
    stores: DefaultKeyedRateLimiter<IpAddr>,
    claims: DefaultKeyedRateLimiter<IpAddr>,
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
    /// Limits of `stores_per_hour` store creations and `claims_per_hour`
    /// domain claims per client address (each also the burst).
    pub fn new(stores_per_hour: NonZeroU32, claims_per_hour: NonZeroU32) -> Self {
        ClientLimits {
            stores: RateLimiter::keyed(Quota::per_hour(stores_per_hour)),
            claims: RateLimiter::keyed(Quota::per_hour(claims_per_hour)),
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
        };
        let key = client_key(ip);
        let r = limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()));
        // Every 4096 checks, forget addresses whose quota is full again
        // (bounded memory without a scan per request).
        if self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(4096)
        {
            self.stores.retain_recent();
            self.claims.retain_recent();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).expect("nonzero")
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
        let l = ClientLimits::new(n(3), n(100));
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
        let l = ClientLimits::new(n(1), n(1));
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
