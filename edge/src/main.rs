//! `edge`: one region's storefront server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use edgefront_edge::config::{Config, RawConfig};

#[derive(Parser)]
#[command(
    name = "edge",
    version,
    about = "edgefront edge: renders storefronts from the region's replica, proxies writes to the origin"
)]
struct Cli {
    /// TOML configuration file (see edge/edge.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Region code (overrides `region`).
    #[arg(long)]
    region: Option<String>,
    /// Shopper listener address (overrides `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// Admin listener address (overrides `admin_listen`).
    #[arg(long)]
    admin_listen: Option<String>,
    /// Replica URL (overrides `replica_url`).
    #[arg(long, env = "EDGEFRONT_REPLICA_URL")]
    replica_url: Option<String>,
    /// Origin address (overrides `origin`).
    #[arg(long)]
    origin: Option<String>,
    /// Page cache TTL in ms (overrides `cache_ttl_ms`).
    #[arg(long)]
    cache_ttl_ms: Option<u64>,
    /// Page cache budget in MiB: rendered pages with their compressed forms
    /// (overrides `cache_max_mib`; default 256).
    #[arg(long)]
    cache_max_mib: Option<u64>,
    /// Worker threads (overrides `threads`).
    #[arg(long)]
    threads: Option<usize>,
    /// Primary URL for read-your-writes fallback (overrides `primary_url`).
    #[arg(long, env = "EDGEFRONT_PRIMARY_URL")]
    primary_url: Option<String>,
    /// The database's other failover candidates, `postgres://…,…` (overrides `primary_standbys`).
    #[arg(long)]
    primary_standbys: Option<String>,
    /// Change-log poll interval in ms (overrides `change_log_poll_ms`).
    #[arg(long)]
    change_log_poll_ms: Option<u64>,
    /// Read-your-writes wait bound in ms (overrides `read_your_writes_wait_ms`).
    #[arg(long)]
    read_your_writes_wait_ms: Option<u64>,
    /// Replica lag budget in seconds (overrides `max_replica_lag_seconds`).
    #[arg(long)]
    max_replica_lag_seconds: Option<f64>,
    /// TLS listener address (overrides `tls_listen`).
    #[arg(long)]
    tls_listen: Option<String>,
    /// Certificate master key, 64 hex characters (overrides `cert_key`).
    #[arg(long, env = "EDGEFRONT_CERT_KEY", hide_env_values = true)]
    cert_key: Option<String>,
    /// Redirect plain HTTP to https (overrides `http_redirect`).
    #[arg(long)]
    http_redirect: Option<bool>,
    /// HSTS max-age on TLS responses, 0 = off (overrides `hsts_max_age_seconds`).
    #[arg(long)]
    hsts_max_age_seconds: Option<u64>,
    /// ACME directory URL (overrides `acme_directory`).
    #[arg(long)]
    acme_directory: Option<String>,
    /// PEM root for the ACME directory's TLS (overrides `acme_ca_root`).
    #[arg(long)]
    acme_ca_root: Option<PathBuf>,
    /// Name of the ACME directory in metrics (overrides `acme_directory_name`).
    #[arg(long)]
    acme_directory_name: Option<String>,
    /// External Account Binding key id (overrides `acme_eab_kid`).
    #[arg(long)]
    acme_eab_kid: Option<String>,
    /// External Account Binding HMAC key, base64url (overrides `acme_eab_hmac_key`).
    #[arg(long, env = "EDGEFRONT_ACME_EAB_HMAC_KEY", hide_env_values = true)]
    acme_eab_hmac_key: Option<String>,
    /// Second ACME directory URL (overrides `acme_fallback_directory`).
    #[arg(long)]
    acme_fallback_directory: Option<String>,
    /// PEM root for the fallback directory's TLS (overrides `acme_fallback_ca_root`).
    #[arg(long)]
    acme_fallback_ca_root: Option<PathBuf>,
    /// Name of the fallback directory (overrides `acme_fallback_directory_name`).
    #[arg(long)]
    acme_fallback_directory_name: Option<String>,
    /// Fallback External Account Binding key id (overrides `acme_fallback_eab_kid`).
    #[arg(long)]
    acme_fallback_eab_kid: Option<String>,
    /// Fallback External Account Binding HMAC key, base64url (overrides `acme_fallback_eab_hmac_key`).
    #[arg(
        long,
        env = "EDGEFRONT_ACME_FALLBACK_EAB_HMAC_KEY",
        hide_env_values = true
    )]
    acme_fallback_eab_hmac_key: Option<String>,
    /// Seconds the first directory must fail before orders move (overrides `acme_failover_after_seconds`).
    #[arg(long)]
    acme_failover_after_seconds: Option<u64>,
    /// Certificates per store per hour (overrides `acme_per_store_per_hour`).
    #[arg(long)]
    acme_per_store_per_hour: Option<i64>,
    /// Renewal check interval in seconds (overrides `acme_renew_check_seconds`).
    #[arg(long)]
    acme_renew_check_seconds: Option<u64>,
    /// Origin internal API token (overrides `internal_token`).
    #[arg(long, env = "EDGEFRONT_INTERNAL_TOKEN", hide_env_values = true)]
    internal_token: Option<String>,
    /// CA of the origin's certificate: proxy to it over TLS (overrides `origin_ca`).
    #[arg(long)]
    origin_ca: Option<String>,
    /// Name in the origin's certificate (overrides `origin_server_name`).
    #[arg(long)]
    origin_server_name: Option<String>,
    /// The origin's internal API listener, host:port (overrides `origin_internal`).
    #[arg(long)]
    origin_internal: Option<String>,
    /// Internal CA certificate, PEM (overrides `internal_ca`).
    #[arg(long)]
    internal_ca: Option<String>,
    /// This node's internal client certificate, PEM (overrides `internal_tls_cert`).
    #[arg(long)]
    internal_tls_cert: Option<String>,
    /// Its private key, PEM (overrides `internal_tls_key`).
    #[arg(long)]
    internal_tls_key: Option<String>,
    /// OTLP/HTTP traces endpoint, e.g. http://127.0.0.1:4318/v1/traces (overrides `otlp_endpoint`).
    #[arg(long, env = "EDGEFRONT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Admin listener token for drain/undrain (overrides `admin_token`).
    #[arg(long, env = "EDGEFRONT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Read-your-writes cookie keys `kid:hex,…` (overrides `ryw_keys`).
    #[arg(long, env = "EDGEFRONT_RYW_KEYS", hide_env_values = true)]
    ryw_keys: Option<String>,
    /// Read-your-writes primary reads at once (overrides `ryw_primary_concurrency`).
    #[arg(long)]
    ryw_primary_concurrency: Option<usize>,
    /// Read-your-writes primary reads per second (overrides `ryw_primary_per_second`).
    #[arg(long)]
    ryw_primary_per_second: Option<u32>,
    /// Issue the platform wildcard with DNS-01 (overrides `acme_platform_wildcard`).
    #[arg(long)]
    acme_platform_wildcard: Option<bool>,
    /// Store creations per client address per hour (overrides `limit_store_creations_per_hour`).
    #[arg(long)]
    limit_store_creations_per_hour: Option<u32>,
    /// Domain claims per client address per hour (overrides `limit_domain_claims_per_hour`).
    #[arg(long)]
    limit_domain_claims_per_hour: Option<u32>,
    /// Origin-bound requests per client address per second (overrides `limit_origin_requests_per_second`).
    #[arg(long)]
    limit_origin_requests_per_second: Option<u32>,
    /// Their burst (overrides `limit_origin_requests_burst`).
    #[arg(long)]
    limit_origin_requests_burst: Option<u32>,
    /// Uncached lookups per client address per second (overrides `limit_misses_per_second`).
    #[arg(long)]
    limit_misses_per_second: Option<u32>,
    /// Their burst (overrides `limit_misses_burst`).
    #[arg(long)]
    limit_misses_burst: Option<u32>,
    /// Pages kept in the negative cache (overrides `negative_cache_entries`).
    #[arg(long)]
    negative_cache_entries: Option<u64>,
    /// Time allowed for a request's headers, ms (overrides `header_timeout_ms`).
    #[arg(long)]
    header_timeout_ms: Option<u64>,
    /// Open connections per client address (overrides `max_connections_per_address`).
    #[arg(long)]
    max_connections_per_address: Option<u32>,
    /// Origins beside the other failover candidates, `host:port,…` (overrides `origin_standbys`).
    #[arg(long)]
    origin_standbys: Option<String>,
    /// `text` or `json` (overrides `log_format`).
    #[arg(long)]
    log_format: Option<String>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Take the listening sockets over from the running edge of this region
    /// (graceful upgrade): start this, then send the old process SIGQUIT.
    #[arg(long)]
    upgrade: bool,
}

const EX_USAGE: u8 = 64;

fn config(cli: &Cli) -> Result<Config, String> {
    let mut raw = RawConfig::load(cli.config.as_deref()).map_err(|e| e.to_string())?;
    macro_rules! set {
        ($($f:ident),*) => { $( if cli.$f.is_some() { raw.$f = cli.$f.clone(); } )* };
    }
    set!(
        region,
        listen,
        admin_listen,
        replica_url,
        origin,
        cache_ttl_ms,
        cache_max_mib,
        threads,
        log_format,
        primary_url,
        primary_standbys,
        change_log_poll_ms,
        read_your_writes_wait_ms,
        max_replica_lag_seconds,
        tls_listen,
        cert_key,
        http_redirect,
        hsts_max_age_seconds,
        acme_directory,
        acme_ca_root,
        acme_directory_name,
        acme_eab_kid,
        acme_eab_hmac_key,
        acme_fallback_directory,
        acme_fallback_directory_name,
        acme_fallback_ca_root,
        acme_fallback_eab_kid,
        acme_fallback_eab_hmac_key,
        acme_failover_after_seconds,
        internal_token,
        origin_ca,
        origin_server_name,
        origin_internal,
        internal_ca,
        internal_tls_cert,
        internal_tls_key,
        admin_token,
        otlp_endpoint,
        acme_renew_check_seconds,
        acme_per_store_per_hour,
        ryw_keys,
        ryw_primary_concurrency,
        ryw_primary_per_second,
        limit_store_creations_per_hour,
        limit_domain_claims_per_hour,
        origin_standbys,
        limit_origin_requests_per_second,
        limit_origin_requests_burst,
        limit_misses_per_second,
        limit_misses_burst,
        negative_cache_entries,
        header_timeout_ms,
        max_connections_per_address,
        acme_platform_wildcard
    );
    let name = cli
        .config
        .as_ref()
        .map_or("(flags)".to_owned(), |p| p.display().to_string());
    raw.validate(&name).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    // Before anything can fail slowly: a reload asked for while this edge
    // starts must not end it (SIGHUP's default action).
    edgefront_edge::reload::hold_sighup();
    let cli = Cli::parse();
    let cfg = match config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edge: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if cli.check_config {
        println!("edge: configuration ok");
        return ExitCode::SUCCESS;
    }
    // One crypto provider for the whole process (pingora, rustls, instant-acme).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Logs (pingora's `log` records included) and, with otlp_endpoint, traces.
    let _telemetry = match edgefront_schema::telemetry::init(
        "edgefront-edge",
        Some(cfg.region.as_str()),
        cfg.json_logs,
        cfg.otlp_endpoint.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("edge: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let (server, cache, certs) = match edgefront_edge::server::build(&cfg, cli.upgrade) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edge: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(region = %cfg.region, listen = %cfg.listen, admin = %cfg.admin_listen, origin = %cfg.origin, "edge starting");
    // Pingora's signals, plus SIGHUP: reload through a successor.
    let listeners = edgefront_edge::server::listeners(&cfg, certs.is_some());
    let signals = edgefront_edge::reload::Signals::new(
        edgefront_edge::server::upgrade_sock(&cfg),
        cache,
        certs,
        listeners,
    );
    server.run(pingora::server::RunArgs {
        shutdown_signal: Box::new(signals),
    });
    ExitCode::SUCCESS
}
