//! Read-your-writes: the `ef_lsn` cookie and the primary-read budget.
//!
//! A write proxied to the origin comes back with its commit LSN; the edge
//! hands the client a cookie that proves it: `LSN.ISSUED.KID.MAC`, an
//! HMAC-SHA256 (key `KID`) over the LSN and the issue time. Any region can
//! verify it, because every edge holds the same keys ([`Keys`]); nobody else
//! can mint one, so a forged, expired or absurd cookie is simply ignored and
//! the request is an ordinary cached read — it never waits and never reaches
//! the primary.
//!
//! A genuine cookie ahead of this region's applied position waits (bounded)
//! for the change feed; if the replica is still behind, the page is read on
//! the primary, within a per-edge budget ([`PrimaryBudget`]: concurrency and
//! rate). When the budget is spent the client gets the replica's page after
//! the bounded wait, marked in `cache-status`, never an error caused by
//! other clients.
//!
//! Key rotation: keys are `kid:hex` pairs; the first one signs, all verify.
//! Add the new key second on every edge, then move it first, then drop the
//! old one once a cookie's lifetime (`ryw_cookie_max_age_seconds`) has passed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use edgefront_schema::Lsn;
use ring::hmac;
use tokio::sync::{Semaphore, SemaphorePermit};

/// Cookie carrying a proof of the client's last write.
pub const LSN_COOKIE: &str = "ef_lsn";

/// Most a verified LSN may be ahead of the primary position this region has
/// heard of: a genuine one cannot be (much) ahead, 1 GiB of WAL is absurd.
const MAX_AHEAD: u64 = 1 << 30;

/// Why a cookie was not honoured (a metric label each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Not of the cookie's shape.
    Malformed,
    /// Signed by a key this edge does not hold.
    UnknownKey,
    /// The MAC does not match.
    BadMac,
    /// Older than the cookie lifetime, or issued in the future.
    Expired,
    /// Far ahead of anything the primary has written.
    Absurd,
}

impl Rejected {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::UnknownKey => "unknown_key",
            Rejected::BadMac => "bad_mac",
            Rejected::Expired => "expired",
            Rejected::Absurd => "absurd",
        }
    }
}

/// The MAC keys shared by every edge; the first one signs.
pub struct Keys {
    keys: Vec<(String, hmac::Key)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Keys").field("ids", &ids).finish()
    }
}

impl Keys {
    /// Parses `kid:hex[,kid:hex…]` (each key at least 32 bytes, ids of
    /// `[A-Za-z0-9_-]`).
    pub fn parse(spec: &str) -> Result<Keys, String> {
        let mut keys = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (kid, hex_key) = item
                .split_once(':')
                .ok_or_else(|| format!("{item:?} is not kid:hex"))?;
            if kid.is_empty()
                || kid.len() > 16
                || !kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(format!("key id {kid:?} must be 1-16 of [A-Za-z0-9_-]"));
            }
            let bytes = hex::decode(hex_key).map_err(|_| format!("key {kid}: not hex"))?;
            if bytes.len() < 32 {
                return Err(format!("key {kid}: {} bytes; use at least 32", bytes.len()));
            }
            if keys.iter().any(|(k, _)| k == kid) {
                return Err(format!("key id {kid} appears twice"));
            }
            keys.push((kid.to_owned(), hmac::Key::new(hmac::HMAC_SHA256, &bytes)));
        }
        if keys.is_empty() {
            return Err("no key".into());
        }
        Ok(Keys { keys })
    }

    /// A random key known only to this process (cookies then verify only
    /// here: configure shared keys for more than one edge).
    pub fn random() -> Keys {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).unwrap_or_else(|_| {
            hmac::Key::new(hmac::HMAC_SHA256, &std::process::id().to_be_bytes())
        });
        Keys {
            keys: vec![("local".into(), key)],
        }
    }

    fn message(lsn: Lsn, issued: u64, kid: &str) -> String {
        format!("ef_lsn.v1.{lsn}.{issued}.{kid}")
    }

    /// The cookie value proving a write at `lsn`, issued at `now` (unix s).
    pub fn mint(&self, lsn: Lsn, now: u64) -> String {
        let (kid, key) = &self.keys[0];
        let tag = hmac::sign(key, Self::message(lsn, now, kid).as_bytes());
        format!("{lsn}.{now}.{kid}.{}", hex::encode(tag.as_ref()))
    }

    /// The LSN a cookie proves, if it is genuine and younger than `max_age`.
    pub fn verify(&self, value: &str, now: u64, max_age: u64) -> Result<Lsn, Rejected> {
        let mut parts = value.split('.');
        let (Some(lsn), Some(issued), Some(kid), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(Rejected::Malformed);
        };
        let lsn: Lsn = lsn.parse().map_err(|_| Rejected::Malformed)?;
        let issued: u64 = issued.parse().map_err(|_| Rejected::Malformed)?;
        let mac = hex::decode(mac).map_err(|_| Rejected::Malformed)?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(k, _)| k == kid)
            .ok_or(Rejected::UnknownKey)?;
        hmac::verify(key, Self::message(lsn, issued, kid).as_bytes(), &mac)
            .map_err(|_| Rejected::BadMac)?;
        // A minute of clock skew between regions is tolerated.
        if issued > now + 60 || now.saturating_sub(issued) > max_age {
            return Err(Rejected::Expired);
        }
        Ok(lsn)
    }
}

/// Checks a verified LSN against the primary position the region has heard
/// of (`0` when unknown): a genuine one is never far ahead of it.
pub fn clamp(lsn: Lsn, primary_seen: Lsn) -> Result<Lsn, Rejected> {
    if primary_seen.0 > 0 && lsn.0 > primary_seen.0.saturating_add(MAX_AHEAD) {
        return Err(Rejected::Absurd);
    }
    Ok(lsn)
}

/// Primary reads for read-your-writes, per edge: at most `concurrency` at
/// once and `rate` per second (burst `rate`).
pub struct PrimaryBudget {
    running: Semaphore,
    rate: f64,
    bucket: Mutex<(f64, Instant)>,
}

impl PrimaryBudget {
    /// A budget of `concurrency` reads at once and `rate` per second.
    pub fn new(concurrency: usize, rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        PrimaryBudget {
            running: Semaphore::new(concurrency.max(1)),
            rate,
            bucket: Mutex::new((rate, Instant::now())),
        }
    }

    /// A permit for one primary read, or `None` when the budget is spent
    /// (never waits).
    pub fn try_acquire(&self) -> Option<SemaphorePermit<'_>> {
        let permit = self.running.try_acquire().ok()?;
        let mut b = self.bucket.lock().ok()?;
        let now = Instant::now();
        let refill = now.duration_since(b.1).as_secs_f64() * self.rate;
        b.0 = (b.0 + refill).min(self.rate);
        b.1 = now;
        if b.0 < 1.0 {
            return None;
        }
        b.0 -= 1.0;
        Some(permit)
    }
}

/// Read-your-writes settings and state of one edge.
pub struct ReadYourWrites {
    pub keys: Keys,
    /// Longest a cookie is honoured.
    pub max_age: Duration,
    /// Longest a read waits for the change feed to reach the client's write.
    pub wait: Duration,
    pub budget: PrimaryBudget,
}

impl ReadYourWrites {
    /// The `Set-Cookie` value for a write committed at `lsn`.
    pub fn set_cookie(&self, lsn: Lsn, tls: bool) -> String {
        let value = self.keys.mint(lsn, unix_now());
        format!(
            "{LSN_COOKIE}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{}",
            self.max_age.as_secs(),
            if tls { "; Secure" } else { "" }
        )
    }

    /// The LSN a request proves it wrote, if any: `Ok(None)` without a
    /// cookie, `Err` for one that is not honoured.
    pub fn client_lsn(
        &self,
        headers: &http::HeaderMap,
        primary_seen: Lsn,
    ) -> Result<Option<Lsn>, Rejected> {
        let Some(v) = edgefront_schema::cookie(headers, LSN_COOKIE) else {
            return Ok(None);
        };
        let lsn = self.keys.verify(v, unix_now(), self.max_age.as_secs())?;
        clamp(lsn, primary_seen).map(Some)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(spec: &str) -> Keys {
        Keys::parse(spec).expect("keys")
    }

    const K1: &str = "k1:0000000000000000000000000000000000000000000000000000000000000001";
    const K2: &str = "k2:0000000000000000000000000000000000000000000000000000000000000002";

    #[test]
    fn cookie_round_trips_and_verifies_in_another_region() {
        let a = keys(K1);
        let b = keys(&format!("{K1},{K2}"));
        let v = a.mint(Lsn(0x16_B374_D848), 1_000);
        assert_eq!(b.verify(&v, 1_010, 300), Ok(Lsn(0x16_B374_D848)));
    }

    #[test]
    fn forged_tampered_expired_and_garbage_cookies_are_refused() {
        let k = keys(K1);
        let v = k.mint(Lsn(100), 1_000);
        assert_eq!(k.verify(&v, 1_301, 300), Err(Rejected::Expired));
        assert_eq!(k.verify(&v, 900, 300), Err(Rejected::Expired));
        // The attack from the issue: a bare LSN far in the future.
        assert_eq!(
            k.verify("FFFFFFFF/FFFFFFFF", 1_000, 300),
            Err(Rejected::Malformed)
        );
        let tampered = v.replacen("0/64", "FFFFFFFF/FFFFFFFF", 1);
        assert_ne!(tampered, v);
        assert_eq!(k.verify(&tampered, 1_000, 300), Err(Rejected::BadMac));
        let other = keys(K2).mint(Lsn(100), 1_000);
        assert_eq!(k.verify(&other, 1_000, 300), Err(Rejected::UnknownKey));
        let resigned = other.replacen(".k2.", ".k1.", 1);
        assert_eq!(k.verify(&resigned, 1_000, 300), Err(Rejected::BadMac));
        for junk in ["", "...", "0/1.x.k1.00", "0/1.1.k1.zz", "a.b.c.d.e"] {
            assert!(k.verify(junk, 1_000, 300).is_err(), "{junk:?}");
        }
    }

    #[test]
    fn rotation_signs_with_the_first_key_and_verifies_all() {
        let old = keys(K1);
        let rotated = keys(&format!("{K2},{K1}"));
        let from_old = old.mint(Lsn(5), 1_000);
        assert_eq!(rotated.verify(&from_old, 1_000, 300), Ok(Lsn(5)));
        assert!(rotated.mint(Lsn(5), 1_000).contains(".k2."));
    }

    #[test]
    fn keys_config_is_checked() {
        assert!(Keys::parse("").is_err());
        assert!(Keys::parse("k1:abcd").is_err(), "short key");
        assert!(Keys::parse("k 1:00").is_err());
        assert!(Keys::parse(&format!("{K1},{K1}")).is_err(), "duplicate id");
    }

    #[test]
    fn clamp_refuses_lsns_far_ahead_of_the_primary() {
        assert_eq!(clamp(Lsn(10), Lsn(0)), Ok(Lsn(10)), "unknown: honoured");
        assert_eq!(clamp(Lsn(10), Lsn(5)), Ok(Lsn(10)), "slightly ahead: wait");
        assert_eq!(clamp(Lsn(u64::MAX), Lsn(5)), Err(Rejected::Absurd));
    }

    #[test]
    fn budget_caps_concurrency_and_rate() {
        let b = PrimaryBudget::new(2, 3);
        let p1 = b.try_acquire().expect("1");
        let p2 = b.try_acquire().expect("2");
        assert!(b.try_acquire().is_none(), "concurrency");
        drop((p1, p2));
        let p3 = b.try_acquire().expect("3");
        drop(p3);
        assert!(b.try_acquire().is_none(), "rate: 3 per second spent");
    }
}
