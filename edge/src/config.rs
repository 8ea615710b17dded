//! The edge's configuration: a TOML file, overridden by flags, validated once
//! into [`Config`], which is never serialised.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use edgefront_certs::acme::Directory;
use edgefront_regions::{RegionId, Regions};
use serde::Deserialize;

/// The file as written (unknown keys are errors).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Region code, e.g. `bom1`.
    pub region: Option<String>,
    /// Shopper-facing HTTP listener.
    pub listen: Option<String>,
    /// Admin listener (`/healthz`, `/metrics`).
    pub admin_listen: Option<String>,
    /// This region's PostgreSQL replica.
    pub replica_url: Option<String>,
    /// The origin's address (`host:port`).
    pub origin: Option<String>,
    /// Origins beside the database's other failover candidates
    /// (`host:port`, comma-separated): with them, requests go to whichever
    /// origin's `/healthz` answers 200 — the one whose database leads —
    /// checked every 500 ms (docs/operations.md, origin failover).
    pub origin_standbys: Option<String>,
    /// The CA (PEM) the origin's public certificate chains to: with it,
    /// proxied requests go to the origin over TLS, verified against this CA
    /// alone (the internal CA).
    pub origin_ca: Option<String>,
    /// The name the origin's certificate must carry (default: the host of
    /// `origin`, e.g. its IP address).
    pub origin_server_name: Option<String>,
    /// Region data file; the built-in one when absent.
    pub regions_file: Option<PathBuf>,
    /// A directory of secret files, one per key, named after it
    /// (`cert_key`, `internal_token`, `admin_token`, `ryw_keys`,
    /// `acme_eab_hmac_key`, `acme_fallback_eab_hmac_key`): each file
    /// present gives that key (its content,
    /// trailing whitespace trimmed). Read at every start, so a reload picks
    /// up a rotated secret; a file other users may read is refused, and so
    /// is a key given both here and elsewhere.
    pub secrets_dir: Option<PathBuf>,
    /// Overrides the region data's platform domain.
    pub platform_domain: Option<String>,
    /// Worker threads of the shopper listener.
    pub threads: Option<usize>,
    /// Page cache entry lifetime in milliseconds.
    pub cache_ttl_ms: Option<u64>,
    /// Page cache budget in MiB of rendered HTML.
    pub cache_max_mib: Option<u64>,
    /// Replica replay lag above which `/healthz` reports unhealthy.
    pub max_replica_lag_seconds: Option<f64>,
    /// `text` or `json`.
    pub log_format: Option<String>,
    /// The primary, for read-your-writes reads when the replica is behind.
    pub primary_url: Option<String>,
    /// The database's other failover candidates (PostgreSQL URLs,
    /// comma-separated): with them, read-your-writes reads go to whichever
    /// of `primary_url` and these is not in recovery, checked every 500 ms.
    pub primary_standbys: Option<String>,
    /// Change-log poll interval in milliseconds.
    pub change_log_poll_ms: Option<u64>,
    /// How long a read waits for the replica to reach the client's write.
    pub read_your_writes_wait_ms: Option<u64>,
    /// TLS listener (HTTP/1.1 and HTTP/2 by ALPN); absent: no TLS.
    pub tls_listen: Option<String>,
    /// Master keys that open sealed certificate keys (required with TLS): 64 hex
    /// characters each, comma-separated (rotation: docs/operations.md).
    pub cert_key: Option<String>,
    /// Redirect plain-HTTP requests to https for names with a certificate
    /// (ACME challenges excepted).
    pub http_redirect: Option<bool>,
    /// `Strict-Transport-Security: max-age=…` on every TLS response; 0 or
    /// absent: not sent. No `includeSubDomains`: a seller's other names are
    /// theirs to decide.
    pub hsts_max_age_seconds: Option<u64>,
    /// ACME directory URL: issue certificates for registered domains on first sight.
    pub acme_directory: Option<String>,
    /// PEM root to trust for the ACME directory's own TLS (test CAs such as pebble).
    pub acme_ca_root: Option<PathBuf>,
    /// The directory's name in metrics, logs and the API (default: its host).
    pub acme_directory_name: Option<String>,
    /// External Account Binding key id, for CAs that require one.
    pub acme_eab_kid: Option<String>,
    /// External Account Binding HMAC key, base64url as the CA gives it
    /// (prefer the `EDGEFRONT_ACME_EAB_HMAC_KEY` environment variable).
    pub acme_eab_hmac_key: Option<String>,
    /// A second ACME directory: new orders and renewals go there while the
    /// first one keeps failing on the CA's side.
    pub acme_fallback_directory: Option<String>,
    /// PEM root for the fallback directory's TLS.
    pub acme_fallback_ca_root: Option<PathBuf>,
    /// The fallback directory's name (default: its host).
    pub acme_fallback_directory_name: Option<String>,
    /// External Account Binding key id for the fallback directory.
    pub acme_fallback_eab_kid: Option<String>,
    /// External Account Binding HMAC key for the fallback directory
    /// (prefer `EDGEFRONT_ACME_FALLBACK_EAB_HMAC_KEY`).
    pub acme_fallback_eab_hmac_key: Option<String>,
    /// How long (seconds) the first directory must keep failing before
    /// orders go to the fallback; the first is probed once per this period.
    pub acme_failover_after_seconds: Option<u64>,
    /// Most ACME orders per minute from this edge.
    pub acme_orders_per_minute: Option<usize>,
    /// Most certificates issued per store per hour.
    pub acme_per_store_per_hour: Option<i64>,
    /// How often (seconds, jittered) to look for certificates due for renewal.
    pub acme_renew_check_seconds: Option<u64>,
    /// Bearer token of the origin's internal API (required with ACME).
    pub internal_token: Option<String>,
    /// The origin's internal API listener (`host:port`, mutual TLS; required
    /// with ACME). The host must be named in the origin's certificate. With
    /// several origins (one per failover candidate), all of them,
    /// comma-separated: the issuer calls the one that answered last and moves
    /// on after a connection failure or a 503.
    pub origin_internal: Option<String>,
    /// The internal CA (PEM) the origin's internal certificate chains to.
    pub internal_ca: Option<String>,
    /// This region node's client certificate (PEM) under the internal CA.
    pub internal_tls_cert: Option<String>,
    /// Its private key (PEM).
    pub internal_tls_key: Option<String>,
    /// Bearer token for the admin listener's state-changing calls
    /// (drain, undrain). Without it those calls are refused.
    pub admin_token: Option<String>,
    /// OTLP/HTTP endpoint for traces (`http://host:4318/v1/traces`); off when unset.
    pub otlp_endpoint: Option<String>,
    /// Read-your-writes cookie MAC keys, `kid:hex[,kid:hex…]` (32+ bytes
    /// each), the same on every edge; the first signs. Absent: a random
    /// key of this process (cookies then verify only on this edge).
    pub ryw_keys: Option<String>,
    /// How long a read-your-writes cookie is honoured (seconds).
    pub ryw_cookie_max_age_seconds: Option<u64>,
    /// Most read-your-writes page reads on the primary at once, per edge.
    pub ryw_primary_concurrency: Option<usize>,
    /// Most read-your-writes page reads on the primary per second, per edge.
    pub ryw_primary_per_second: Option<u32>,
    /// Issue and renew the platform wildcard `*.<platform>` with ACME DNS-01
    /// (the origin must have `dns_update_url`).
    pub acme_platform_wildcard: Option<bool>,
    /// Store creations (`POST /api/stores`) per client address per hour.
    pub limit_store_creations_per_hour: Option<u32>,
    /// Domain claims and verifications per client address per hour.
    pub limit_domain_claims_per_hour: Option<u32>,
    /// Requests forwarded to the origin (cart, checkout, orders, seller
    /// API) per client address per second, and their burst.
    pub limit_origin_requests_per_second: Option<u32>,
    pub limit_origin_requests_burst: Option<u32>,
    /// Lookups no cache answers (a host, page or TLS name never seen here)
    /// per client address per second, and their burst.
    pub limit_misses_per_second: Option<u32>,
    pub limit_misses_burst: Option<u32>,
    /// Most pages kept in the negative cache (pages that do not exist).
    pub negative_cache_entries: Option<u64>,
    /// How long a client may take to send a request's headers, from its
    /// connection or first byte (milliseconds).
    pub header_timeout_ms: Option<u64>,
    /// Most open connections from one client address (an IPv6 /64).
    pub max_connections_per_address: Option<u32>,
}

/// How the edge verifies the origin's public listener.
#[derive(Debug, Clone)]
pub struct OriginTls {
    /// The CA certificates, DER.
    pub ca: Vec<Vec<u8>>,
    /// The name the certificate must carry (host name or IP address).
    pub server_name: String,
}

/// Where the origin's internal API listens, and how this node proves itself.
#[derive(Debug, Clone)]
pub struct InternalApi {
    /// `https://host:port` of every origin's internal listener, in order.
    pub urls: Vec<String>,
    pub identity: edgefront_certs::pki::Identity,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub region: RegionId,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub replica_url: String,
    pub origin: SocketAddr,
    /// The other origins (failover candidates); empty: one origin.
    pub origin_standbys: Vec<SocketAddr>,
    /// TLS to the origin: the CA certificates (DER) and the server name.
    pub origin_tls: Option<OriginTls>,
    pub platform_domain: String,
    pub threads: usize,
    pub cache_ttl: Duration,
    pub cache_max_bytes: u64,
    pub max_replica_lag: Duration,
    pub json_logs: bool,
    pub primary_url: Option<String>,
    /// The other failover candidates' URLs (read-your-writes follows the leader).
    pub primary_standbys: Vec<String>,
    pub change_log_poll: Duration,
    pub read_your_writes_wait: Duration,
    pub tls_listen: Option<SocketAddr>,
    pub cert_key: Option<String>,
    pub http_redirect: bool,
    /// The `Strict-Transport-Security` value, when HSTS is on.
    pub hsts: Option<String>,
    /// ACME directories in order of preference; empty: no issuance.
    pub acme_directories: Vec<Directory>,
    pub acme_failover_after: Duration,
    pub acme_orders_per_minute: usize,
    pub acme_per_store_per_hour: i64,
    pub acme_renew_check: Duration,
    pub internal_token: Option<String>,
    /// The origin's internal API and this node's identity for it (with ACME).
    pub internal: Option<InternalApi>,
    pub admin_token: Option<String>,
    pub otlp_endpoint: Option<String>,
    /// `None`: a random per-process key.
    pub ryw_keys: Option<String>,
    pub ryw_cookie_max_age: Duration,
    pub ryw_primary_concurrency: usize,
    pub ryw_primary_per_second: u32,
    pub acme_platform_wildcard: bool,
    pub limits: crate::limits::Settings,
    pub negative_cache_entries: u64,
    pub header_timeout: Duration,
    pub max_connections_per_address: u32,
}

pub use edgefront_schema::config::ConfigError;

impl RawConfig {
    /// Reads a config file; no path gives the empty config.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        edgefront_schema::config::load_toml(path)
    }

    /// Checks every value.
    pub fn validate(mut self, source_name: &str) -> Result<Config, ConfigError> {
        let err = edgefront_schema::config::errors(source_name);
        if let Some(dir) = self.secrets_dir.clone() {
            for (key, slot) in [
                ("cert_key", &mut self.cert_key),
                ("internal_token", &mut self.internal_token),
                ("admin_token", &mut self.admin_token),
                ("ryw_keys", &mut self.ryw_keys),
                ("acme_eab_hmac_key", &mut self.acme_eab_hmac_key),
                (
                    "acme_fallback_eab_hmac_key",
                    &mut self.acme_fallback_eab_hmac_key,
                ),
            ] {
                let Some(value) = edgefront_schema::config::read_secret(&dir, key)
                    .map_err(|e| err("secrets_dir", e))?
                else {
                    continue;
                };
                if slot.is_some() {
                    return Err(err(
                        key,
                        format!(
                            "is given twice: in {} and by a flag, the environment or the file; give it once",
                            dir.join(key).display()
                        ),
                    ));
                }
                *slot = Some(value);
            }
        }
        let addr = |key: &'static str,
                    v: Option<String>,
                    default: &str|
         -> Result<SocketAddr, ConfigError> {
            let v = v.unwrap_or_else(|| default.to_owned());
            v.parse()
                .map_err(|_| err(key, format!("{v:?} is not an address:port")))
        };
        let regions = match &self.regions_file {
            Some(p) => Regions::load(p),
            None => Regions::builtin(),
        }
        .map_err(|e| err("regions_file", e.to_string()))?;
        let code = self
            .region
            .ok_or_else(|| err("region", "is required (e.g. bom1)".into()))?;
        let region = regions
            .get(&code)
            .map_err(|e| err("region", e.to_string()))?
            .id
            .clone();
        let listen = addr("listen", self.listen, "127.0.0.1:8080")?;
        let admin_listen = addr("admin_listen", self.admin_listen, "127.0.0.1:9080")?;
        if admin_listen == listen {
            return Err(err("admin_listen", "must differ from listen".into()));
        }
        let origin = self
            .origin
            .ok_or_else(|| err("origin", "is required (host:port)".into()))?;
        let origin = addr("origin", Some(origin), "")?;
        let origin_standbys = self
            .origin_standbys
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| addr("origin_standbys", Some(s.to_owned()), ""))
            .collect::<Result<Vec<_>, _>>()?;
        let replica_url = self
            .replica_url
            .ok_or_else(|| err("replica_url", "is required".into()))?;
        if !replica_url.starts_with("postgres://") && !replica_url.starts_with("postgresql://") {
            return Err(err("replica_url", "must start with postgres://".into()));
        }
        let platform_domain = self
            .platform_domain
            .unwrap_or(regions.network.platform_domain.clone());
        let platform_domain: edgefront_schema::Hostname = platform_domain
            .parse()
            .map_err(|e| err("platform_domain", format!("{e}")))?;
        let threads = self.threads.unwrap_or(2);
        if !(1..=256).contains(&threads) {
            return Err(err("threads", format!("{threads} is outside 1..=256")));
        }
        let ttl = self.cache_ttl_ms.unwrap_or(300_000);
        if !(1..=3_600_000).contains(&ttl) {
            return Err(err("cache_ttl_ms", format!("{ttl} is outside 1..=3600000")));
        }
        let mib = self.cache_max_mib.unwrap_or(256);
        if !(1..=65_536).contains(&mib) {
            return Err(err("cache_max_mib", format!("{mib} is outside 1..=65536")));
        }
        let lag = self.max_replica_lag_seconds.unwrap_or(30.0);
        if !(lag.is_finite() && lag > 0.0 && lag <= 86_400.0) {
            return Err(err(
                "max_replica_lag_seconds",
                format!("{lag} is outside (0, 86400]"),
            ));
        }
        let json_logs = match self.log_format.as_deref().unwrap_or("text") {
            "text" => false,
            "json" => true,
            other => return Err(err("log_format", format!("{other:?} is not text or json"))),
        };
        if let Some(u) = &self.primary_url
            && !u.starts_with("postgres://")
            && !u.starts_with("postgresql://")
        {
            return Err(err("primary_url", "must start with postgres://".into()));
        }
        let primary_standbys: Vec<String> = self
            .primary_standbys
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if let Some(u) = primary_standbys
            .iter()
            .find(|u| !u.starts_with("postgres://") && !u.starts_with("postgresql://"))
        {
            return Err(err(
                "primary_standbys",
                format!("{u:?} does not start with postgres://"),
            ));
        }
        if !primary_standbys.is_empty() && self.primary_url.is_none() {
            return Err(err("primary_standbys", "needs primary_url".into()));
        }
        let poll = self.change_log_poll_ms.unwrap_or(20);
        if !(1..=10_000).contains(&poll) {
            return Err(err(
                "change_log_poll_ms",
                format!("{poll} is outside 1..=10000"),
            ));
        }
        let ryw = self.read_your_writes_wait_ms.unwrap_or(500);
        if ryw > 10_000 {
            return Err(err(
                "read_your_writes_wait_ms",
                format!("{ryw} is over 10000"),
            ));
        }
        let tls_listen = match self.tls_listen {
            Some(v) => Some(addr("tls_listen", Some(v), "")?),
            None => None,
        };
        if tls_listen.is_some() && self.cert_key.is_none() {
            return Err(err("cert_key", "is required when tls_listen is set".into()));
        }
        if let Some(k) = &self.cert_key
            && edgefront_certs::Sealer::from_hex(k).is_err()
        {
            return Err(err(
                "cert_key",
                "must be 64 hex characters (32 bytes), or several such keys comma-separated (the first seals; none twice)".into(),
            ));
        }
        let http_redirect = self.http_redirect.unwrap_or(false);
        if http_redirect && tls_listen.is_none() {
            return Err(err("http_redirect", "needs tls_listen".into()));
        }
        if self.acme_directory.is_some() {
            if tls_listen.is_none() {
                return Err(err("acme_directory", "needs tls_listen".into()));
            }
            if self.internal_token.is_none() {
                return Err(err(
                    "internal_token",
                    "is required with acme_directory".into(),
                ));
            }
        } else if self.acme_fallback_directory.is_some() {
            return Err(err(
                "acme_fallback_directory",
                "needs acme_directory".into(),
            ));
        }
        let origin_tls = match &self.origin_ca {
            None => {
                if self.origin_server_name.is_some() {
                    return Err(err("origin_server_name", "needs origin_ca".into()));
                }
                None
            }
            Some(ca) => {
                if !origin_standbys.is_empty() && self.origin_server_name.is_none() {
                    return Err(err(
                        "origin_server_name",
                        "is required with origin_standbys over TLS (a name every origin's certificate carries)".into(),
                    ));
                }
                let ca: Vec<Vec<u8>> = edgefront_certs::pki::read_ca(Path::new(ca))
                    .map_err(|e| err("origin_ca", e.to_string()))?
                    .into_iter()
                    .map(|c| c.as_ref().to_vec())
                    .collect();
                let server_name = self
                    .origin_server_name
                    .clone()
                    .unwrap_or_else(|| origin.ip().to_string());
                if rustls_pki_types::ServerName::try_from(server_name.as_str()).is_err() {
                    return Err(err(
                        "origin_server_name",
                        format!("{server_name:?} is not a host name or IP address"),
                    ));
                }
                Some(OriginTls { ca, server_name })
            }
        };
        let internal = match &self.origin_internal {
            None if self.acme_directory.is_some() => {
                return Err(err(
                    "origin_internal",
                    "is required with acme_directory".into(),
                ));
            }
            None => None,
            Some(addrs) => {
                let addrs: Vec<&str> = addrs
                    .split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .collect();
                if let Some(addr) = addrs
                    .iter()
                    .find(|a| a.contains('/') || !a.contains(':'))
                    .or(addrs.is_empty().then_some(&""))
                {
                    return Err(err("origin_internal", format!("{addr:?} is not host:port")));
                }
                let identity = edgefront_certs::pki::Identity::from_config(
                    self.internal_ca.as_deref(),
                    self.internal_tls_cert.as_deref(),
                    self.internal_tls_key.as_deref(),
                    "origin_internal",
                )
                .map_err(|(key, problem)| err(key, problem))?;
                identity
                    .client_config()
                    .map_err(|e| err("internal_tls_cert", e.to_string()))?;
                Some(InternalApi {
                    urls: addrs.iter().map(|a| format!("https://{a}")).collect(),
                    identity,
                })
            }
        };
        let hsts = match self.hsts_max_age_seconds {
            None | Some(0) => None,
            Some(_) if tls_listen.is_none() => {
                return Err(err("hsts_max_age_seconds", "needs tls_listen".into()));
            }
            Some(s) if s > 63_072_000 => {
                return Err(err(
                    "hsts_max_age_seconds",
                    format!("{s} is more than two years"),
                ));
            }
            Some(s) => Some(format!("max-age={s}")),
        };
        let mut acme_directories = Vec::new();
        if let Some(url) = self.acme_directory.take() {
            acme_directories.push(directory(
                &err,
                [
                    "acme_directory",
                    "acme_ca_root",
                    "acme_directory_name",
                    "acme_eab_kid",
                    "acme_eab_hmac_key",
                ],
                url,
                self.acme_ca_root.take(),
                self.acme_directory_name.take(),
                self.acme_eab_kid.take(),
                self.acme_eab_hmac_key.take(),
            )?);
        }
        if let Some(url) = self.acme_fallback_directory.take() {
            let d = directory(
                &err,
                [
                    "acme_fallback_directory",
                    "acme_fallback_ca_root",
                    "acme_fallback_directory_name",
                    "acme_fallback_eab_kid",
                    "acme_fallback_eab_hmac_key",
                ],
                url,
                self.acme_fallback_ca_root.take(),
                self.acme_fallback_directory_name.take(),
                self.acme_fallback_eab_kid.take(),
                self.acme_fallback_eab_hmac_key.take(),
            )?;
            if acme_directories.iter().any(|p| p.url == d.url) {
                return Err(err(
                    "acme_fallback_directory",
                    "is the same directory as acme_directory".into(),
                ));
            }
            if acme_directories.iter().any(|p| p.name == d.name) {
                return Err(err(
                    "acme_fallback_directory_name",
                    format!("{} is already the first directory's name", d.name),
                ));
            }
            acme_directories.push(d);
        }
        let failover_after = self.acme_failover_after_seconds.unwrap_or(600);
        if failover_after > 7 * 86_400 {
            return Err(err(
                "acme_failover_after_seconds",
                format!("{failover_after} is more than a week"),
            ));
        }
        let opm = self.acme_orders_per_minute.unwrap_or(20);
        if !(1..=1000).contains(&opm) {
            return Err(err(
                "acme_orders_per_minute",
                format!("{opm} is outside 1..=1000"),
            ));
        }
        if let Some(t) = &self.admin_token
            && t.len() < 16
        {
            return Err(err(
                "admin_token",
                format!("is {} characters; use at least 16", t.len()),
            ));
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(err(
                "otlp_endpoint",
                format!("{e:?} is not an http(s) URL (e.g. http://127.0.0.1:4318/v1/traces)"),
            ));
        }
        if let Some(k) = &self.ryw_keys
            && let Err(e) = crate::ryw::Keys::parse(k)
        {
            return Err(err("ryw_keys", e));
        }
        let ryw_age = self.ryw_cookie_max_age_seconds.unwrap_or(300);
        if !(10..=86_400).contains(&ryw_age) {
            return Err(err(
                "ryw_cookie_max_age_seconds",
                format!("{ryw_age} is outside 10..=86400"),
            ));
        }
        let ryw_conc = self.ryw_primary_concurrency.unwrap_or(2);
        if !(1..=64).contains(&ryw_conc) {
            return Err(err(
                "ryw_primary_concurrency",
                format!("{ryw_conc} is outside 1..=64"),
            ));
        }
        let ryw_rate = self.ryw_primary_per_second.unwrap_or(50);
        if !(1..=100_000).contains(&ryw_rate) {
            return Err(err(
                "ryw_primary_per_second",
                format!("{ryw_rate} is outside 1..=100000"),
            ));
        }
        let count = |key: &'static str, v: Option<u32>, default: u32| {
            v.unwrap_or(default)
                .try_into()
                .ok()
                .filter(|n: &std::num::NonZeroU32| n.get() <= 1_000_000)
                .ok_or_else(|| {
                    err(
                        key,
                        format!("{} is outside 1..=1000000", v.unwrap_or(default)),
                    )
                })
        };
        let rate = |keys: [&'static str; 2], v: [Option<u32>; 2], default: [u32; 2]| {
            let r = crate::limits::Rate {
                per_second: count(keys[0], v[0], default[0])?,
                burst: count(keys[1], v[1], default[1])?,
            };
            Ok::<_, ConfigError>(r)
        };
        let limits = crate::limits::Settings {
            store_creations_per_hour: count(
                "limit_store_creations_per_hour",
                self.limit_store_creations_per_hour,
                10,
            )?,
            domain_claims_per_hour: count(
                "limit_domain_claims_per_hour",
                self.limit_domain_claims_per_hour,
                60,
            )?,
            origin_requests: rate(
                [
                    "limit_origin_requests_per_second",
                    "limit_origin_requests_burst",
                ],
                [
                    self.limit_origin_requests_per_second,
                    self.limit_origin_requests_burst,
                ],
                [20, 100],
            )?,
            misses: rate(
                ["limit_misses_per_second", "limit_misses_burst"],
                [self.limit_misses_per_second, self.limit_misses_burst],
                [50, 200],
            )?,
        };
        let negative_cache_entries = self.negative_cache_entries.unwrap_or(10_000);
        if !(1..=10_000_000).contains(&negative_cache_entries) {
            return Err(err(
                "negative_cache_entries",
                format!("{negative_cache_entries} is outside 1..=10000000"),
            ));
        }
        let header_timeout_ms = self.header_timeout_ms.unwrap_or(10_000);
        if !(100..=600_000).contains(&header_timeout_ms) {
            return Err(err(
                "header_timeout_ms",
                format!("{header_timeout_ms} is outside 100..=600000"),
            ));
        }
        let max_connections_per_address = self.max_connections_per_address.unwrap_or(256);
        if !(1..=1_000_000).contains(&max_connections_per_address) {
            return Err(err(
                "max_connections_per_address",
                format!("{max_connections_per_address} is outside 1..=1000000"),
            ));
        }
        Ok(Config {
            acme_platform_wildcard: self.acme_platform_wildcard.unwrap_or(false),
            limits,
            negative_cache_entries,
            header_timeout: Duration::from_millis(header_timeout_ms),
            max_connections_per_address,
            ryw_keys: self.ryw_keys,
            ryw_cookie_max_age: Duration::from_secs(ryw_age),
            ryw_primary_concurrency: ryw_conc,
            ryw_primary_per_second: ryw_rate,
            otlp_endpoint: self.otlp_endpoint,
            admin_token: self.admin_token,
            acme_directories,
            acme_failover_after: Duration::from_secs(failover_after),
            acme_orders_per_minute: opm,
            acme_per_store_per_hour: self.acme_per_store_per_hour.unwrap_or(20).clamp(1, 10_000),
            acme_renew_check: Duration::from_secs(
                self.acme_renew_check_seconds
                    .unwrap_or(3600)
                    .clamp(1, 86_400),
            ),
            internal_token: self.internal_token,
            internal,
            tls_listen,
            cert_key: self.cert_key,
            http_redirect,
            hsts,
            primary_url: self.primary_url,
            primary_standbys,
            change_log_poll: Duration::from_millis(poll),
            read_your_writes_wait: Duration::from_millis(ryw),
            region,
            listen,
            admin_listen,
            replica_url,
            origin,
            origin_tls,
            origin_standbys,
            platform_domain: platform_domain.as_str().to_owned(),
            threads,
            cache_ttl: Duration::from_millis(ttl),
            cache_max_bytes: mib * 1024 * 1024,
            max_replica_lag: Duration::from_secs_f64(lag),
            json_logs,
        })
    }
}

/// One ACME directory from its keys (`keys` names them for errors: URL,
/// CA root, name, EAB key id, EAB HMAC key).
fn directory(
    err: &impl Fn(&'static str, String) -> ConfigError,
    keys: [&'static str; 5],
    url: String,
    ca_root: Option<PathBuf>,
    name: Option<String>,
    eab_kid: Option<String>,
    eab_hmac_key: Option<String>,
) -> Result<Directory, ConfigError> {
    let [url_key, root_key, name_key, kid_key, hmac_key] = keys;
    let Some(host) = url
        .strip_prefix("https://")
        .and_then(|rest| rest.split('/').next())
        .filter(|h| !h.is_empty())
    else {
        return Err(err(url_key, "must be an https:// URL".into()));
    };
    if let Some(p) = &ca_root
        && !p.is_file()
    {
        return Err(err(
            root_key,
            format!("{} is not a readable file", p.display()),
        ));
    }
    let name = name.unwrap_or_else(|| host.to_owned());
    if name == "uploaded" {
        return Err(err(
            name_key,
            "\"uploaded\" names operators' uploads in metrics; choose another".into(),
        ));
    }
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return Err(err(
            name_key,
            "must be 1-64 letters, digits or - _ . :".into(),
        ));
    }
    let eab = match (eab_kid, eab_hmac_key) {
        (None, None) => None,
        (Some(kid), Some(key)) => {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(key.trim().trim_end_matches('='))
                .map_err(|_| err(hmac_key, "is not base64url".into()))?;
            if kid.is_empty() || raw.len() < 16 {
                return Err(err(
                    hmac_key,
                    "needs a key id and at least 16 bytes of key".into(),
                ));
            }
            Some((kid, raw))
        }
        (Some(_), None) => return Err(err(hmac_key, format!("is required with {kid_key}"))),
        (None, Some(_)) => return Err(err(kid_key, format!("is required with {hmac_key}"))),
    };
    Ok(Directory {
        name,
        url,
        ca_root,
        eab,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RawConfig {
        RawConfig {
            region: Some("bom1".into()),
            replica_url: Some("postgres://u@127.0.0.1:5433/db".into()),
            origin: Some("127.0.0.1:8081".into()),
            ..Default::default()
        }
    }

    #[test]
    fn config_defaults_are_valid() {
        let c = base().validate("t").expect("valid");
        assert_eq!(c.region.as_str(), "bom1");
        assert_eq!(c.platform_domain, "shops.edgefront.test");
        assert_eq!(c.cache_ttl, Duration::from_secs(300));
        assert_eq!(c.change_log_poll, Duration::from_millis(20));
    }

    #[test]
    fn abuse_limits_and_origin_standbys_are_checked() {
        let c = base().validate("t").expect("valid");
        assert_eq!(c.limits.origin_requests.per_second.get(), 20);
        assert_eq!(c.limits.misses.burst.get(), 200);
        assert_eq!(c.header_timeout, Duration::from_secs(10));
        assert!(c.origin_standbys.is_empty());
        let mut raw = base();
        raw.origin_standbys = Some("127.0.0.1:8082, 127.0.0.1:8083".into());
        let c = raw.validate("t").expect("valid");
        assert_eq!(c.origin_standbys.len(), 2);
        type Change = fn(&mut RawConfig);
        let mut raw = base();
        raw.primary_url = Some("postgres://a/edgefront".into());
        raw.primary_standbys = Some("postgres://b/edgefront, postgresql://c/edgefront".into());
        let c = raw.validate("t").expect("valid");
        assert_eq!(c.primary_standbys.len(), 2);
        let cases: [(Change, &str); 7] = [
            (
                |r| r.limit_misses_burst = Some(0),
                "t: limit_misses_burst: 0 is outside 1..=1000000",
            ),
            (
                |r| r.header_timeout_ms = Some(5),
                "t: header_timeout_ms: 5 is outside 100..=600000",
            ),
            (
                |r| r.max_connections_per_address = Some(0),
                "t: max_connections_per_address: 0 is outside 1..=1000000",
            ),
            (
                |r| r.origin_standbys = Some("origin-b".into()),
                "t: origin_standbys: \"origin-b\" is not an address:port",
            ),
            (
                |r| {
                    r.origin_standbys = Some("127.0.0.1:8082".into());
                    r.origin_ca = Some("/nonexistent/ca.pem".into());
                },
                "t: origin_server_name: is required with origin_standbys over TLS (a name every origin's certificate carries)",
            ),
            (
                |r| r.primary_standbys = Some("postgres://b/edgefront".into()),
                "t: primary_standbys: needs primary_url",
            ),
            (
                |r| {
                    r.primary_url = Some("postgres://a/edgefront".into());
                    r.primary_standbys = Some("b:5432".into());
                },
                "t: primary_standbys: \"b:5432\" does not start with postgres://",
            ),
        ];
        for (change, message) in cases {
            let mut raw = base();
            change(&mut raw);
            let e = raw.validate("t").expect_err(message);
            assert_eq!(e.to_string(), message);
        }
    }

    #[test]
    fn secrets_come_from_their_files_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |key: &str, text: &str, mode: u32| {
            let p = dir.path().join(key);
            std::fs::write(&p, text).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write("admin_token", "admin-token-from-a-file-0123\n", 0o640);
        write("ryw_keys", &format!("k1:{}\n", "ab".repeat(32)), 0o600);
        let with_dir = || {
            let mut raw = base();
            raw.secrets_dir = Some(dir.path().to_owned());
            raw
        };
        let cfg = with_dir().validate("t").expect("valid");
        assert_eq!(
            cfg.admin_token.as_deref(),
            Some("admin-token-from-a-file-0123")
        );
        assert!(cfg.ryw_keys.is_some());
        // Given twice: refused, naming the file.
        let mut twice = with_dir();
        twice.admin_token = Some("admin-token-from-a-flag-0123".into());
        let e = twice.validate("t").expect_err("twice").to_string();
        assert!(e.starts_with("t: admin_token: is given twice: in "), "{e}");
        // Readable by every user: refused.
        write("internal_token", "internal-token-0123456789", 0o644);
        let e = with_dir()
            .validate("t")
            .expect_err("world-readable")
            .to_string();
        assert!(e.contains("may be read by every user (mode 644)"), "{e}");
        write("internal_token", "\n", 0o600);
        let e = with_dir().validate("t").expect_err("empty").to_string();
        assert!(e.ends_with("internal_token is empty"), "{e}");
    }

    /// An internal CA with a client certificate for bom1, for the tests' life.
    fn pki() -> &'static Path {
        static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
        DIR.get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let ca = edgefront_certs::pki::InternalCa::create(dir.path()).expect("ca");
            ca.ensure("bom1", "bom1", &[], edgefront_certs::pki::Usage::Client)
                .expect("client");
            dir
        })
        .path()
    }

    fn with_acme(mut raw: RawConfig) -> RawConfig {
        raw.tls_listen = Some("127.0.0.1:8443".into());
        raw.cert_key = Some("00".repeat(32));
        raw.internal_token = Some("internal-token-0123456789".into());
        raw.acme_directory = Some("https://acme.example/dir".into());
        let id = edgefront_certs::pki::Identity::in_dir(pki(), "bom1");
        raw.origin_internal = Some("127.0.0.1:8443".into());
        raw.internal_ca = Some(id.ca.display().to_string());
        raw.internal_tls_cert = Some(id.cert.display().to_string());
        raw.internal_tls_key = Some(id.key.display().to_string());
        raw
    }

    #[test]
    fn acme_needs_the_origins_internal_api_and_this_nodes_identity() {
        let c = with_acme(base()).validate("t").expect("valid");
        assert_eq!(
            c.internal.as_ref().map(|i| i.urls.clone()),
            Some(vec!["https://127.0.0.1:8443".to_owned()])
        );
        let mut two = with_acme(base());
        two.origin_internal = Some("127.0.0.1:8443, 127.0.0.2:8443".into());
        assert_eq!(
            two.validate("t").expect("valid").internal.map(|i| i.urls),
            Some(vec![
                "https://127.0.0.1:8443".to_owned(),
                "https://127.0.0.2:8443".to_owned()
            ])
        );
        type Change = fn(&mut RawConfig);
        let cases: [(Change, &str); 4] = [
            (
                |r| r.origin_internal = None,
                "t: origin_internal: is required with acme_directory",
            ),
            (
                |r| r.origin_internal = Some("http://127.0.0.1:8443".into()),
                "t: origin_internal: \"http://127.0.0.1:8443\" is not host:port",
            ),
            (
                |r| r.internal_tls_key = None,
                "t: internal_tls_key: is required with origin_internal",
            ),
            (
                |r| r.internal_ca = Some("/nonexistent/ca.pem".into()),
                "t: internal_ca: \"/nonexistent/ca.pem\" is not a readable file",
            ),
        ];
        for (change, message) in cases {
            let mut raw = with_acme(base());
            change(&mut raw);
            let e = raw.validate("t").expect_err(message);
            assert_eq!(e.to_string(), message);
        }
    }

    #[test]
    fn a_fallback_directory_with_external_account_binding_is_read_and_checked() {
        let mut raw = with_acme(base());
        raw.acme_fallback_directory = Some("https://second.example/acme/dir".into());
        raw.acme_fallback_eab_kid = Some("kid-1".into());
        raw.acme_fallback_eab_hmac_key =
            Some("zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W".into());
        raw.acme_failover_after_seconds = Some(120);
        let c = raw.validate("t").expect("valid");
        let names: Vec<&str> = c.acme_directories.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["acme.example", "second.example"]);
        assert_eq!(c.acme_directories[0].eab, None);
        let (kid, key) = c.acme_directories[1].eab.clone().expect("eab");
        assert_eq!((kid.as_str(), key.len()), ("kid-1", 48));
        assert_eq!(c.acme_failover_after, Duration::from_secs(120));
        // The key never reaches Debug output.
        assert!(!format!("{:?}", c.acme_directories).contains("zWND"));

        type Change = fn(&mut RawConfig);
        let cases: [(Change, &str); 5] = [
            (
                |r| r.acme_fallback_eab_hmac_key = None,
                "t: acme_fallback_eab_hmac_key: is required with acme_fallback_eab_kid",
            ),
            (
                |r| r.acme_fallback_eab_hmac_key = Some("not base64!".into()),
                "t: acme_fallback_eab_hmac_key: is not base64url",
            ),
            (
                |r| r.acme_fallback_directory = Some("http://second.example/dir".into()),
                "t: acme_fallback_directory: must be an https:// URL",
            ),
            (
                |r| r.acme_fallback_directory = Some("https://acme.example/dir".into()),
                "t: acme_fallback_directory: is the same directory as acme_directory",
            ),
            (
                |r| r.acme_directory = None,
                "t: acme_fallback_directory: needs acme_directory",
            ),
        ];
        for (change, message) in cases {
            let mut raw = with_acme(base());
            raw.acme_fallback_directory = Some("https://second.example/acme/dir".into());
            raw.acme_fallback_eab_kid = Some("kid-1".into());
            raw.acme_fallback_eab_hmac_key =
                Some("zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W".into());
            change(&mut raw);
            assert_eq!(raw.validate("t").expect_err(message).to_string(), message);
        }
    }

    #[test]
    fn config_rejects_unknown_region_naming_key() {
        let mut raw = base();
        raw.region = Some("xyz9".into());
        let e = raw.validate("edge.toml").expect_err("unknown");
        assert_eq!(e.to_string(), "edge.toml: region: unknown region \"xyz9\"");
    }

    #[test]
    fn config_rejects_bad_values() {
        let mut raw = base();
        raw.cache_ttl_ms = Some(0);
        assert!(
            raw.validate("t")
                .expect_err("ttl")
                .to_string()
                .contains("cache_ttl_ms")
        );
        let mut raw = base();
        raw.origin = Some("nowhere".into());
        assert!(
            raw.validate("t")
                .expect_err("origin")
                .to_string()
                .contains("origin")
        );
        let mut raw = base();
        raw.admin_listen = Some("127.0.0.1:8080".into());
        assert!(
            raw.validate("t")
                .expect_err("same")
                .to_string()
                .contains("admin_listen")
        );
    }

    #[test]
    fn shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("edge.example.toml");
        let raw = RawConfig::load(Some(&path)).expect("parses");
        raw.validate("edge.example.toml").expect("valid");
    }

    #[test]
    fn config_file_with_unknown_key_is_refused() {
        let dir = std::env::temp_dir().join(format!("edgecfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("bad.toml");
        std::fs::write(&p, "region = \"bom1\"\nlisten_port = 1\n").expect("write");
        let e = RawConfig::load(Some(&p)).expect_err("unknown key");
        assert!(e.to_string().contains("listen_port"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
