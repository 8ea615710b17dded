//! The origin's configuration: a TOML file, overridden by flags, validated once.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

/// The file as written (unknown keys are errors).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub database_url: Option<String>,
    pub platform_domain: Option<String>,
    pub max_connections: Option<u32>,
    pub log_format: Option<String>,
    /// How long change-log rows are kept before pruning (seconds).
    pub change_log_retention_seconds: Option<u64>,
    /// Bearer token of the internal API (certificates); absent disables it.
    pub internal_token: Option<String>,
    /// Address of the internal API's own listener (`/internal/*`, TLS with a
    /// client certificate from the internal CA required). The public
    /// `listen` never serves the internal API; without this it is off.
    pub internal_listen: Option<String>,
    /// The public listener's certificate (PEM, from the internal CA: edges
    /// verify it against that CA). With `tls_key`, `listen` serves HTTPS only.
    pub tls_cert: Option<String>,
    /// Its private key (PEM).
    pub tls_key: Option<String>,
    /// The internal listener's certificate (PEM), from the internal CA.
    pub internal_tls_cert: Option<String>,
    /// Its private key (PEM).
    pub internal_tls_key: Option<String>,
    /// The internal CA (PEM) client certificates must chain to.
    pub internal_ca: Option<String>,
    /// Master keys sealing certificate private keys: 64 hex characters each,
    /// comma-separated; the first seals, all open (rotation: `origin reseal`).
    pub cert_key: Option<String>,
    /// OTLP/HTTP traces endpoint (`http://host:4318/v1/traces`); off when unset.
    pub otlp_endpoint: Option<String>,
    /// DNS server (`ip:port`) ownership proofs are looked up through; the
    /// system's resolvers (/etc/resolv.conf) when unset.
    pub dns_server: Option<String>,
    /// Management API (`http://host:port`, pebble-challtestsrv's `set-txt` /
    /// `clear-txt`) of the DNS server of the platform zone, where DNS-01
    /// challenges for the platform wildcard are published; off when unset.
    pub dns_update_url: Option<String>,
    /// First retry of a pending domain claim (seconds; doubles up to an hour).
    pub domain_pending_check_seconds: Option<u64>,
    /// How often an active domain's proof is looked up again (seconds).
    pub domain_recheck_seconds: Option<u64>,
    /// How long an active domain may lack its proof before suspension (seconds).
    pub domain_grace_seconds: Option<u64>,
    /// Pending domain claims one store may hold.
    pub max_pending_domains_per_store: Option<u32>,
    /// ACME orders per account per 3 hours (Let's Encrypt allows 300).
    pub acme_account_orders_per_3h: Option<u32>,
    /// Percent of the account budget only renewals may use.
    pub acme_renewal_reserve_percent: Option<u32>,
    /// Failed orders per hostname per hour (Let's Encrypt allows 5).
    pub acme_hostname_failures_per_hour: Option<u32>,
    /// New certificates per registered domain per week (Let's Encrypt allows 50).
    pub acme_registered_domain_per_week: Option<u32>,
    /// Failed orders per store per day before its orders pause for a day.
    pub acme_store_failures_per_day: Option<u32>,
    /// First backoff after a hostname's failed order (seconds; doubles, ≤ 1 day).
    pub acme_failure_backoff_seconds: Option<u32>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: String,
    pub platform_domain: String,
    pub max_connections: u32,
    pub json_logs: bool,
    pub change_log_retention: std::time::Duration,
    pub internal_token: Option<String>,
    /// The internal API's listener and identity, when it is on.
    pub internal: Option<Internal>,
    /// The public listener's certificate and key, when it serves TLS.
    pub tls: Option<PublicTls>,
    pub cert_key: Option<String>,
    pub otlp_endpoint: Option<String>,
    pub dns_server: Option<SocketAddr>,
    pub ownership: crate::ownership::Settings,
    pub budgets: crate::budget::Budgets,
    pub dns_update_url: Option<String>,
}

/// The public listener's certificate and key (PEM files).
#[derive(Debug, Clone)]
pub struct PublicTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// The internal API's own listener: mutual TLS under the internal CA.
#[derive(Debug, Clone)]
pub struct Internal {
    pub listen: SocketAddr,
    pub identity: edgefront_certs::pki::Identity,
}

pub use edgefront_schema::config::ConfigError;

impl RawConfig {
    /// Reads a config file; an absent path gives the empty config.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        edgefront_schema::config::load_toml(path)
    }

    /// Checks every value; `source_name` names the file in errors.
    pub fn validate(self, source_name: &str) -> Result<Config, ConfigError> {
        let err = edgefront_schema::config::errors(source_name);
        let listen = self.listen.as_deref().unwrap_or("127.0.0.1:8081");
        let listen = listen
            .parse()
            .map_err(|_| err("listen", format!("{listen:?} is not an address:port")))?;
        let database_url = self
            .database_url
            .ok_or_else(|| err("database_url", "is required".into()))?;
        if !database_url.starts_with("postgres://") && !database_url.starts_with("postgresql://") {
            return Err(err("database_url", "must start with postgres://".into()));
        }
        let platform_domain = match self.platform_domain {
            Some(d) => d,
            None => edgefront_regions_platform_domain(),
        };
        let platform_domain: edgefront_schema::Hostname = platform_domain
            .parse()
            .map_err(|e| err("platform_domain", format!("{e}")))?;
        let max_connections = self.max_connections.unwrap_or(16);
        if !(1..=1000).contains(&max_connections) {
            return Err(err(
                "max_connections",
                format!("{max_connections} is outside 1..=1000"),
            ));
        }
        let json_logs = match self.log_format.as_deref().unwrap_or("text") {
            "text" => false,
            "json" => true,
            other => return Err(err("log_format", format!("{other:?} is not text or json"))),
        };
        let retention = self.change_log_retention_seconds.unwrap_or(3600);
        if !(1..=30 * 86_400).contains(&retention) {
            return Err(err(
                "change_log_retention_seconds",
                format!("{retention} is outside 1..=2592000"),
            ));
        }
        if let Some(t) = &self.internal_token
            && t.len() < 32
        {
            return Err(err(
                "internal_token",
                "must be at least 32 characters".into(),
            ));
        }
        let public: SocketAddr = listen;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (None, None) => None,
            (cert, key) => {
                use edgefront_certs::pki::existing_file;
                let e = |(k, problem)| err(k, problem);
                let cert = existing_file("tls_cert", cert.as_deref(), "tls_key").map_err(e)?;
                let key = existing_file("tls_key", key.as_deref(), "tls_cert").map_err(e)?;
                edgefront_certs::pki::server_config(&cert, &key)
                    .map_err(|e| err("tls_cert", e.to_string()))?;
                Some(PublicTls { cert, key })
            }
        };
        let internal = match &self.internal_listen {
            None => None,
            Some(l) => {
                let listen: SocketAddr = l
                    .parse()
                    .map_err(|_| err("internal_listen", format!("{l:?} is not an address:port")))?;
                if listen == public {
                    return Err(err(
                        "internal_listen",
                        "must differ from listen (the public listener never serves /internal)"
                            .into(),
                    ));
                }
                if self.internal_token.is_none() {
                    return Err(err(
                        "internal_token",
                        "is required with internal_listen".into(),
                    ));
                }
                let identity = edgefront_certs::pki::Identity::from_config(
                    self.internal_ca.as_deref(),
                    self.internal_tls_cert.as_deref(),
                    self.internal_tls_key.as_deref(),
                    "internal_listen",
                )
                .map_err(|(key, problem)| err(key, problem))?;
                identity
                    .server_config_requiring_clients()
                    .map_err(|e| err("internal_tls_cert", e.to_string()))?;
                Some(Internal { listen, identity })
            }
        };
        if let Some(k) = &self.cert_key
            && edgefront_certs::Sealer::from_hex(k).is_err()
        {
            return Err(err(
                "cert_key",
                "must be 64 hex characters (32 bytes), or several such keys comma-separated (the first seals; none twice)".into(),
            ));
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(err("otlp_endpoint", format!("{e:?} is not an http(s) URL")));
        }
        let dns_server = match &self.dns_server {
            Some(d) => Some(
                d.parse::<SocketAddr>()
                    .map_err(|_| err("dns_server", format!("{d:?} is not an ip:port")))?,
            ),
            None => None,
        };
        let defaults = crate::ownership::Settings::default();
        let secs = |key: &'static str, v: Option<u64>, default: std::time::Duration, max: u64| {
            let v = v.unwrap_or(default.as_secs());
            if (1..=max).contains(&v) {
                Ok(std::time::Duration::from_secs(v))
            } else {
                Err(err(key, format!("{v} is outside 1..={max}")))
            }
        };
        let ownership = crate::ownership::Settings {
            pending_every: secs(
                "domain_pending_check_seconds",
                self.domain_pending_check_seconds,
                defaults.pending_every,
                3600,
            )?,
            recheck_every: secs(
                "domain_recheck_seconds",
                self.domain_recheck_seconds,
                defaults.recheck_every,
                7 * 86_400,
            )?,
            grace: secs(
                "domain_grace_seconds",
                self.domain_grace_seconds,
                defaults.grace,
                30 * 86_400,
            )?,
            max_pending_per_store: match self.max_pending_domains_per_store {
                None => defaults.max_pending_per_store,
                Some(n @ 1..=100_000) => i64::from(n),
                Some(n) => {
                    return Err(err(
                        "max_pending_domains_per_store",
                        format!("{n} is outside 1..=100000"),
                    ));
                }
            },
            pending_expiry: defaults.pending_expiry,
        };
        let bd = crate::budget::Budgets::default();
        let count = |key: &'static str,
                     v: Option<u32>,
                     default: i64,
                     range: std::ops::RangeInclusive<i64>| {
            let v = v.map_or(default, i64::from);
            if range.contains(&v) {
                Ok(v)
            } else {
                Err(err(
                    key,
                    format!("{v} is outside {}..={}", range.start(), range.end()),
                ))
            }
        };
        let budgets = crate::budget::Budgets {
            account_per_3h: count(
                "acme_account_orders_per_3h",
                self.acme_account_orders_per_3h,
                bd.account_per_3h,
                1..=100_000,
            )?,
            renewal_reserve_percent: count(
                "acme_renewal_reserve_percent",
                self.acme_renewal_reserve_percent,
                bd.renewal_reserve_percent,
                0..=90,
            )?,
            hostname_failures_per_hour: count(
                "acme_hostname_failures_per_hour",
                self.acme_hostname_failures_per_hour,
                bd.hostname_failures_per_hour,
                1..=1000,
            )?,
            registered_domain_per_week: count(
                "acme_registered_domain_per_week",
                self.acme_registered_domain_per_week,
                bd.registered_domain_per_week,
                1..=100_000,
            )?,
            store_failures_per_day: count(
                "acme_store_failures_per_day",
                self.acme_store_failures_per_day,
                bd.store_failures_per_day,
                1..=100_000,
            )?,
            failure_backoff: std::time::Duration::from_secs(
                count(
                    "acme_failure_backoff_seconds",
                    self.acme_failure_backoff_seconds,
                    bd.failure_backoff.as_secs() as i64,
                    1..=86_400,
                )?
                .unsigned_abs(),
            ),
        };
        if let Some(u) = &self.dns_update_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(err(
                "dns_update_url",
                format!("{u:?} is not an http(s) URL"),
            ));
        }
        Ok(Config {
            dns_update_url: self.dns_update_url,
            budgets,
            dns_server,
            ownership,
            otlp_endpoint: self.otlp_endpoint,
            internal_token: self.internal_token,
            internal,
            tls,
            cert_key: self.cert_key,
            change_log_retention: std::time::Duration::from_secs(retention),
            listen,
            database_url,
            platform_domain: platform_domain.as_str().to_owned(),
            max_connections,
            json_logs,
        })
    }
}

/// The default platform domain: the one in the shipped region data.
fn edgefront_regions_platform_domain() -> String {
    edgefront_regions::Regions::builtin()
        .map(|r| r.network.platform_domain)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_requires_database_url_and_names_key() {
        let e = RawConfig::default()
            .validate("origin.toml")
            .expect_err("missing url");
        assert_eq!(e.to_string(), "origin.toml: database_url: is required");
    }

    #[test]
    fn config_rejects_bad_listen_and_log_format() {
        let raw = RawConfig {
            listen: Some("nope".into()),
            database_url: Some("postgres://x".into()),
            ..Default::default()
        };
        assert!(
            raw.validate("f")
                .expect_err("listen")
                .to_string()
                .starts_with("f: listen:")
        );
        let raw = RawConfig {
            database_url: Some("postgres://x".into()),
            log_format: Some("xml".into()),
            ..Default::default()
        };
        assert!(
            raw.validate("f")
                .expect_err("fmt")
                .to_string()
                .contains("log_format")
        );
    }

    #[test]
    fn shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("origin.example.toml");
        let raw = RawConfig::load(Some(&path)).expect("example parses");
        let cfg = raw.validate("origin.example.toml").expect("example valid");
        assert_eq!(cfg.platform_domain, "shops.edgefront.test");
    }
}
