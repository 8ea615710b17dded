//! Types and migrations shared by the origin and the edge.
//!
//! The origin owns the schema (`origin/migrations`, embedded here as
//! [`MIGRATOR`]); the edge reads the same tables on its replica. This crate
//! holds only what both need: the migrations, identifier newtypes
//! ([`StoreId`], [`Hostname`], [`Lsn`]) and price formatting. No queries live
//! here: each side owns its own.

pub mod config;
pub mod telemetry;

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

/// The schema's migrations, applied by the origin on the primary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Response header on a write the origin refused because its database is a
/// standby (`standby`): nothing was written, the write may go to the origin
/// that leads (the ACME issuer's internal calls do).
pub const DATABASE_ROLE_HEADER: &str = "x-edgefront-database";

/// Response header carrying the commit LSN of a successful write.
pub const COMMIT_LSN_HEADER: &str = "x-commit-lsn";

/// Primary key of a store.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct StoreId(pub i64);

impl fmt::Display for StoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a hostname was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostnameError {
    /// Empty after trimming.
    #[error("hostname is empty")]
    Empty,
    /// An IPv4 or IPv6 literal.
    #[error("{0:?} is an IP address, not a hostname")]
    IpLiteral(String),
    /// IDNA conversion failed (invalid Unicode label).
    #[error("{0:?} is not a valid internationalised domain name")]
    Idna(String),
    /// Too long, empty label, bad characters, or a single label.
    #[error("{0:?} is not a valid hostname: {1}")]
    Invalid(String, &'static str),
}

/// A hostname normalised for lookups: lower case, ASCII (IDN labels in
/// punycode), no trailing dot, never an IP literal, at least two labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Hostname(String);

impl Hostname {
    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this name is `domain` itself or a name under it.
    pub fn is_within(&self, domain: &str) -> bool {
        self.0 == domain
            || (self.0.len() > domain.len()
                && self.0.ends_with(domain)
                && self.0.as_bytes()[self.0.len() - domain.len() - 1] == b'.')
    }

    /// The store slug of a platform name, `<slug>.<platform_domain>` (one
    /// label); `None` for any other name (a custom domain).
    pub fn platform_slug(&self, platform_domain: &str) -> Option<&str> {
        self.0
            .strip_suffix(platform_domain)?
            .strip_suffix('.')
            .filter(|s| !s.is_empty() && !s.contains('.'))
    }

    /// Parses a `Host` header value (`name`, `name:port`, `[v6]:port`) into a
    /// hostname; IP literals and malformed values are refused.
    pub fn from_host_header(value: &str) -> Result<Self, HostnameError> {
        let v = value.trim();
        if v.starts_with('[') {
            return Err(HostnameError::IpLiteral(v.to_owned()));
        }
        let name = match v.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return Err(HostnameError::Invalid(v.to_owned(), "bad port")),
            None => v,
        };
        name.parse()
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Hostname {
    type Err = HostnameError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() {
            return Err(HostnameError::Empty);
        }
        let bare = s.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<IpAddr>().is_ok() || bare.parse::<Ipv6Addr>().is_ok() {
            return Err(HostnameError::IpLiteral(input.to_owned()));
        }
        let ascii = if s.is_ascii() {
            s.to_ascii_lowercase()
        } else {
            idna::domain_to_ascii(s).map_err(|_| HostnameError::Idna(input.to_owned()))?
        };
        let bad = |why| Err(HostnameError::Invalid(input.to_owned(), why));
        if ascii.len() > 253 {
            return bad("longer than 253 characters");
        }
        let labels: Vec<&str> = ascii.split('.').collect();
        if labels.len() < 2 {
            return bad("needs at least two labels");
        }
        for label in &labels {
            if label.is_empty() || label.len() > 63 {
                return bad("each label must be 1 to 63 characters");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return bad("only letters, digits and hyphens are allowed");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return bad("a label cannot start or end with a hyphen");
            }
        }
        // A numeric top-level label would make `1.2.3.4`-like names ambiguous.
        if labels
            .last()
            .is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit()))
        {
            return bad("the top-level label cannot be numeric");
        }
        Ok(Hostname(ascii))
    }
}

/// A PostgreSQL WAL position (`pg_lsn`), printed as `X/Y` in hex.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an LSN"))?;
        let parse = |p: &str| {
            if p.is_empty() || p.len() > 8 {
                return Err(format!("{s:?} is not an LSN"));
            }
            u64::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not an LSN"))
        };
        Ok(Lsn((parse(hi)? << 32) | parse(lo)?))
    }
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Compares a presented bearer token with the configured one in time that
/// does not depend on where they differ. An empty configured token never
/// matches.
pub fn bearer_matches(given: &str, expected: &str) -> bool {
    let (g, e) = (given.as_bytes(), expected.as_bytes());
    let mut diff = g.len() ^ e.len();
    for (i, b) in e.iter().enumerate() {
        diff |= usize::from(g.get(i).copied().unwrap_or(0) ^ b);
    }
    diff == 0 && !expected.is_empty()
}

/// Formats an amount in minor units with its currency, e.g. `₹1,299.00`,
/// `$12.50`, `¥1,200`, `12.50 CHF` for currencies without a known symbol.
pub fn format_money(minor: i64, currency: &str) -> String {
    let (symbol, decimals) = match currency {
        "USD" => ("$", 2),
        "EUR" => ("€", 2),
        "GBP" => ("£", 2),
        "INR" => ("₹", 2),
        "JPY" => ("¥", 0),
        "SGD" => ("S$", 2),
        "AUD" => ("A$", 2),
        "BRL" => ("R$", 2),
        _ => ("", 2),
    };
    let neg = minor < 0;
    let abs = minor.unsigned_abs();
    let scale = 10u64.pow(decimals);
    let (units, frac) = (abs / scale, abs % scale);
    let digits = units.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let number = if decimals > 0 {
        format!("{grouped}.{frac:0width$}", width = decimals as usize)
    } else {
        grouped
    };
    let sign = if neg { "-" } else { "" };
    if symbol.is_empty() {
        format!("{sign}{number} {currency}")
    } else {
        format!("{sign}{symbol}{number}")
    }
}

/// The store `host` names: `<slug>.<platform_domain>` by the store's slug,
/// any other name by its registered custom domain (`domains`). The one rule
/// the edge (on its replica) and the origin (on the primary) both follow.
pub async fn store_for_host<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    host: &Hostname,
    platform_domain: &str,
) -> Result<Option<StoreId>, sqlx::Error> {
    let id: Option<i64> = match host.platform_slug(platform_domain) {
        Some(slug) => {
            sqlx::query_scalar("SELECT id FROM stores WHERE slug = $1")
                .bind(slug)
                .fetch_optional(db)
                .await?
        }
        None => {
            sqlx::query_scalar("SELECT store_id FROM domains WHERE hostname = $1")
                .bind(host.as_str())
                .fetch_optional(db)
                .await?
        }
    };
    Ok(id.map(StoreId))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_slug_is_one_label_under_the_platform_domain() {
        let h = |s: &str| s.parse::<Hostname>().expect("hostname");
        let p = "shops.example";
        assert_eq!(h("tea.shops.example").platform_slug(p), Some("tea"));
        assert_eq!(h("a.tea.shops.example").platform_slug(p), None);
        assert_eq!(h("shops.example").platform_slug(p), None);
        assert_eq!(h("teashops.example").platform_slug(p), None);
        assert_eq!(h("shop.other.example").platform_slug(p), None);
    }

    #[test]
    fn bearer_tokens_must_match_exactly() {
        assert!(bearer_matches("0123456789abcdef", "0123456789abcdef"));
        assert!(!bearer_matches("0123456789abcdeX", "0123456789abcdef"));
        assert!(!bearer_matches("0123456789abcde", "0123456789abcdef"));
        assert!(!bearer_matches("0123456789abcdef0", "0123456789abcdef"));
        assert!(!bearer_matches("", "0123456789abcdef"));
        assert!(!bearer_matches("", ""));
    }

    fn host(s: &str) -> Result<String, HostnameError> {
        s.parse::<Hostname>().map(|h| h.0)
    }

    #[test]
    fn hostname_normalises_case_trailing_dot_and_idn() {
        assert_eq!(host("MyCoolStore.COM.").as_deref(), Ok("mycoolstore.com"));
        assert_eq!(host("  shop.example  ").as_deref(), Ok("shop.example"));
        assert_eq!(
            host("bücher.example").as_deref(),
            Ok("xn--bcher-kva.example")
        );
        assert_eq!(
            host("BÜCHER.example").as_deref(),
            Ok("xn--bcher-kva.example")
        );
    }

    #[test]
    fn hostname_rejects_ip_literals_and_garbage() {
        assert!(matches!(
            host("192.0.2.1"),
            Err(HostnameError::IpLiteral(_))
        ));
        assert!(matches!(
            host("[2001:db8::1]"),
            Err(HostnameError::IpLiteral(_))
        ));
        assert!(matches!(
            host("2001:db8::1"),
            Err(HostnameError::IpLiteral(_))
        ));
        assert!(matches!(host(""), Err(HostnameError::Empty)));
        assert!(host("localhost").is_err());
        assert!(host("a..b").is_err());
        assert!(host("-a.com").is_err());
        assert!(host("a_b.com").is_err());
        assert!(host("shop.123").is_err());
        assert!(host(&format!("{}.com", "a".repeat(64))).is_err());
        assert!(host("<script>.com").is_err());
    }

    #[test]
    fn hostname_from_host_header_strips_port() {
        let h = Hostname::from_host_header("Shop.Example:8080").expect("host");
        assert_eq!(h.as_str(), "shop.example");
        assert!(Hostname::from_host_header("[::1]:80").is_err());
        assert!(Hostname::from_host_header("a.com:x").is_err());
        assert!(h.is_within("example"));
        assert!(!h.is_within("op.example"));
    }

    #[test]
    fn lsn_round_trips_through_text() {
        let l: Lsn = "16/B374D848".parse().expect("lsn");
        assert_eq!(l.0, (0x16 << 32) | 0xB374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("0/1".parse::<Lsn>().expect("lsn") < "1/0".parse::<Lsn>().expect("lsn"));
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }

    #[test]
    fn money_formats_with_symbol_grouping_and_decimals() {
        assert_eq!(format_money(129_900, "INR"), "₹1,299.00");
        assert_eq!(format_money(1250, "USD"), "$12.50");
        assert_eq!(format_money(120_000, "JPY"), "¥120,000");
        assert_eq!(format_money(5, "EUR"), "€0.05");
        assert_eq!(format_money(1250, "CHF"), "12.50 CHF");
        assert_eq!(format_money(-1250, "GBP"), "-£12.50");
        assert_eq!(format_money(100_000_000, "USD"), "$1,000,000.00");
    }
}
