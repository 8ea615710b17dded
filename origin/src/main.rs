//! `origin`: the seller API and shopper writes, in front of the PostgreSQL primary.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgefront_origin::config::{Config, RawConfig};
use edgefront_origin::{AppState, connect, demo, migrate, router};

#[derive(Parser)]
#[command(
    name = "origin",
    version,
    about = "edgefront origin: seller API and shopper writes on the primary"
)]
struct Cli {
    /// TOML configuration file (see origin/origin.example.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Overrides `listen`.
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Overrides `database_url`.
    #[arg(long, global = true, env = "EDGEFRONT_DATABASE_URL")]
    database_url: Option<String>,
    /// Overrides `platform_domain`.
    #[arg(long, global = true)]
    platform_domain: Option<String>,
    /// Overrides `internal_token` (prefer the environment for secrets).
    #[arg(
        long,
        global = true,
        env = "EDGEFRONT_INTERNAL_TOKEN",
        hide_env_values = true
    )]
    internal_token: Option<String>,
    /// Overrides `tls_cert` (the public listener then serves HTTPS only).
    #[arg(long, global = true)]
    tls_cert: Option<String>,
    /// Overrides `tls_key`.
    #[arg(long, global = true)]
    tls_key: Option<String>,
    /// Overrides `internal_listen` (the internal API's mutual-TLS listener).
    #[arg(long, global = true)]
    internal_listen: Option<String>,
    /// Overrides `internal_tls_cert`.
    #[arg(long, global = true)]
    internal_tls_cert: Option<String>,
    /// Overrides `internal_tls_key`.
    #[arg(long, global = true)]
    internal_tls_key: Option<String>,
    /// Overrides `internal_ca`.
    #[arg(long, global = true)]
    internal_ca: Option<String>,
    /// Overrides `cert_key` (prefer the environment for secrets).
    #[arg(
        long,
        global = true,
        env = "EDGEFRONT_CERT_KEY",
        hide_env_values = true
    )]
    cert_key: Option<String>,
    /// Overrides `otlp_endpoint` (OTLP/HTTP traces, off when unset).
    #[arg(long, global = true, env = "EDGEFRONT_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Overrides `dns_server` (where ownership proofs are looked up).
    #[arg(long, global = true, env = "EDGEFRONT_DNS_SERVER")]
    dns_server: Option<String>,
    /// Overrides `dns_update_url` (DNS-01 for the platform wildcard).
    #[arg(long, global = true)]
    dns_update_url: Option<String>,
    /// Overrides `domain_pending_check_seconds`.
    #[arg(long, global = true)]
    domain_pending_check_seconds: Option<u64>,
    /// Overrides `domain_recheck_seconds`.
    #[arg(long, global = true)]
    domain_recheck_seconds: Option<u64>,
    /// Overrides `domain_grace_seconds`.
    #[arg(long, global = true)]
    domain_grace_seconds: Option<u64>,
    /// Overrides `acme_account_orders_per_3h`.
    #[arg(long, global = true)]
    acme_account_orders_per_3h: Option<u32>,
    /// Overrides `acme_renewal_reserve_percent`.
    #[arg(long, global = true)]
    acme_renewal_reserve_percent: Option<u32>,
    /// Overrides `acme_hostname_failures_per_hour`.
    #[arg(long, global = true)]
    acme_hostname_failures_per_hour: Option<u32>,
    /// Overrides `acme_registered_domain_per_week`.
    #[arg(long, global = true)]
    acme_registered_domain_per_week: Option<u32>,
    /// Overrides `acme_store_failures_per_day`.
    #[arg(long, global = true)]
    acme_store_failures_per_day: Option<u32>,
    /// Overrides `acme_failure_backoff_seconds`.
    #[arg(long, global = true)]
    acme_failure_backoff_seconds: Option<u32>,
    /// Validate the configuration and exit.
    #[arg(long, global = true)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply migrations, then serve HTTP (the default).
    Serve,
    /// Apply migrations and exit.
    Migrate,
    /// Apply migrations and create the demo stores (prints them as JSON).
    Demo,
    /// Prune the change log now, keeping `--keep-seconds` of history.
    PruneChangeLog {
        /// Seconds of history to keep.
        #[arg(long, default_value_t = 3600)]
        keep_seconds: u64,
    },
    /// Re-seal every certificate key and ACME account under the first key of
    /// `cert_key` (key rotation, while everything keeps serving: every edge
    /// and origin must already hold the new key; docs/operations.md).
    /// Prints what it re-sealed; running it again re-seals nothing.
    Reseal,
}

const EX_USAGE: u8 = 64;

fn config(cli: &Cli) -> Result<Config, String> {
    let mut raw = RawConfig::load(cli.config.as_deref()).map_err(|e| e.to_string())?;
    if cli.listen.is_some() {
        raw.listen.clone_from(&cli.listen);
    }
    if cli.database_url.is_some() {
        raw.database_url.clone_from(&cli.database_url);
    }
    if cli.platform_domain.is_some() {
        raw.platform_domain.clone_from(&cli.platform_domain);
    }
    if cli.internal_token.is_some() {
        raw.internal_token.clone_from(&cli.internal_token);
    }
    for (flag, key) in [
        (&cli.tls_cert, &mut raw.tls_cert),
        (&cli.tls_key, &mut raw.tls_key),
        (&cli.internal_listen, &mut raw.internal_listen),
        (&cli.internal_tls_cert, &mut raw.internal_tls_cert),
        (&cli.internal_tls_key, &mut raw.internal_tls_key),
        (&cli.internal_ca, &mut raw.internal_ca),
        (&cli.cert_key, &mut raw.cert_key),
    ] {
        if flag.is_some() {
            key.clone_from(flag);
        }
    }
    if cli.otlp_endpoint.is_some() {
        raw.otlp_endpoint.clone_from(&cli.otlp_endpoint);
    }
    if cli.dns_server.is_some() {
        raw.dns_server.clone_from(&cli.dns_server);
    }
    if cli.dns_update_url.is_some() {
        raw.dns_update_url.clone_from(&cli.dns_update_url);
    }
    for (flag, key) in [
        (
            cli.domain_pending_check_seconds,
            &mut raw.domain_pending_check_seconds,
        ),
        (cli.domain_recheck_seconds, &mut raw.domain_recheck_seconds),
        (cli.domain_grace_seconds, &mut raw.domain_grace_seconds),
    ] {
        if flag.is_some() {
            *key = flag;
        }
    }
    for (flag, key) in [
        (
            cli.acme_account_orders_per_3h,
            &mut raw.acme_account_orders_per_3h,
        ),
        (
            cli.acme_renewal_reserve_percent,
            &mut raw.acme_renewal_reserve_percent,
        ),
        (
            cli.acme_hostname_failures_per_hour,
            &mut raw.acme_hostname_failures_per_hour,
        ),
        (
            cli.acme_registered_domain_per_week,
            &mut raw.acme_registered_domain_per_week,
        ),
        (
            cli.acme_store_failures_per_day,
            &mut raw.acme_store_failures_per_day,
        ),
        (
            cli.acme_failure_backoff_seconds,
            &mut raw.acme_failure_backoff_seconds,
        ),
    ] {
        if flag.is_some() {
            *key = flag;
        }
    }
    let name = cli
        .config
        .as_ref()
        .map_or("(flags)".to_owned(), |p| p.display().to_string());
    raw.validate(&name).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("origin: invalid configuration: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    if cli.check_config {
        println!("origin: configuration ok");
        return ExitCode::SUCCESS;
    }
    // Outside the runtime: the trace exporter has its own blocking client.
    let _telemetry = match edgefront_schema::telemetry::init(
        "edgefront-origin",
        None,
        cfg.json_logs,
        cfg.otlp_endpoint.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("origin: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("origin: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command.unwrap_or(Command::Serve), cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "origin stopped");
            ExitCode::FAILURE
        }
    }
}

/// Whether the database answers that it is a standby (an error is not an
/// answer: the caller's own retries and errors apply then).
async fn in_recovery(pool: &sqlx::PgPool) -> bool {
    match edgefront_origin::database_leads(pool).await {
        Ok(leads) => !leads,
        Err(e) => {
            tracing::debug!(error = %e, "cannot ask the database whether it leads");
            false
        }
    }
}

/// Serves beside a standby: writes get 503 until the database leads; the
/// migrations run then (the schema is the leader's, replicated).
async fn serve_beside_standby(cfg: Config, pool: sqlx::PgPool) -> Result<(), String> {
    tracing::info!("database is a standby: serving 503 to writes until it leads; migrations then");
    let standby = pool.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            // Only an answer that it leads: a database that does not answer
            // (restarting, unreachable) is asked again.
            if matches!(edgefront_origin::database_leads(&standby).await, Ok(true)) {
                match migrate(&standby).await {
                    Ok(()) => {
                        tracing::info!("database leads: migrations applied");
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "migrations failed; retrying"),
                }
            }
        }
    });
    serve(cfg, pool).await
}

async fn run(cmd: Command, cfg: Config) -> Result<(), String> {
    let pool = connect(&cfg.database_url, cfg.max_connections)
        .await
        .map_err(|e| format!("database: {e}"))?;
    // Beside a standby (a failover candidate of a Patroni cluster) the
    // schema is the leader's, replicated: migrations run here once this
    // database leads (crate docs: the origin follows the leader).
    let serve_cmd = matches!(cmd, Command::Serve);
    if serve_cmd && in_recovery(&pool).await {
        return serve_beside_standby(cfg, pool).await;
    }
    // The primary may still be starting: retry migrations for a bounded time.
    let mut tries = 0;
    loop {
        match migrate(&pool).await {
            Ok(()) => break,
            // A database that was starting when first asked (a candidate
            // powered on again, rejoining as a standby) is a standby now.
            Err(_) if serve_cmd && in_recovery(&pool).await => {
                return serve_beside_standby(cfg, pool).await;
            }
            Err(e) if tries < 30 => {
                tries += 1;
                tracing::warn!(error = %e, "migrations failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(format!("migrations: {e}")),
        }
    }
    match cmd {
        Command::Migrate => Ok(()),
        Command::PruneChangeLog { keep_seconds } => {
            let h = edgefront_origin::prune_change_log(
                &pool,
                std::time::Duration::from_secs(keep_seconds),
            )
            .await
            .map_err(|e| format!("prune: {e}"))?;
            println!("{h}");
            Ok(())
        }
        Command::Reseal => {
            let key = cfg
                .cert_key
                .as_deref()
                .ok_or("reseal needs cert_key (the new key first, then the old ones)")?;
            let sealer =
                edgefront_certs::Sealer::from_hex(key).map_err(|e| format!("cert_key: {e}"))?;
            let done = edgefront_origin::internal::reseal(&pool, &sealer)
                .await
                .map_err(|e| format!("reseal: {e}"))?;
            println!("{done}");
            Ok(())
        }
        Command::Demo => {
            let stores = demo::seed(&pool, &cfg.platform_domain)
                .await
                .map_err(|e| format!("demo data: {e}"))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&stores).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        Command::Serve => serve(cfg, pool).await,
    }
}

/// Serves the public listener (and the internal one, when configured) until
/// SIGINT or SIGTERM.
async fn serve(cfg: Config, pool: sqlx::PgPool) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("listen {}: {e}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, platform_domain = %cfg.platform_domain, "origin serving");
    tokio::spawn(edgefront_origin::prune_forever(
        pool.clone(),
        cfg.change_log_retention,
        std::time::Duration::from_secs(30),
    ));
    let sealer = match cfg
        .cert_key
        .as_deref()
        .map(edgefront_certs::Sealer::from_hex)
    {
        Some(Ok(s)) => Some(std::sync::Arc::new(s)),
        Some(Err(e)) => return Err(format!("cert_key: {e}")),
        None => None,
    };
    let verifier = std::sync::Arc::new(
        edgefront_origin::ownership::Verifier::new(cfg.dns_server, cfg.ownership.clone())
            .map_err(|e| format!("dns: {e}"))?,
    );
    tokio::spawn(edgefront_origin::ownership::check_forever(
        pool.clone(),
        verifier.clone(),
    ));
    let health_pool = connect(&cfg.database_url, edgefront_origin::HEALTH_CONNECTIONS)
        .await
        .map_err(|e| format!("database: {e}"))?;
    let state = AppState {
        health_pool,
        budgets: cfg.budgets.clone(),
        dns_update_url: cfg.dns_update_url.clone(),
        verifier,
        internal_token: cfg.internal_token.clone(),
        sealer,
        pool,
        platform_domain: cfg.platform_domain,
    };
    // One shutdown signal for both listeners.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let internal = match &cfg.internal {
        Some(i) => {
            let tls = i
                .identity
                .server_config_requiring_clients()
                .map_err(|e| format!("internal TLS: {e}"))?;
            let tcp = tokio::net::TcpListener::bind(i.listen)
                .await
                .map_err(|e| format!("internal_listen {}: {e}", i.listen))?;
            let l = edgefront_origin::tls_listener::TlsListener::new(tcp, tls, "internal")
                .map_err(|e| format!("internal_listen {}: {e}", i.listen))?;
            tracing::info!(listen = %i.listen, "internal API serving (mutual TLS)");
            let app = edgefront_origin::internal_router(state.clone());
            Some(tokio::spawn(
                axum::serve(l, app)
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .into_future(),
            ))
        }
        None => {
            tracing::info!("internal API off (no internal_listen)");
            None
        }
    };
    let public = match &cfg.tls {
        Some(id) => {
            let tls = edgefront_certs::pki::server_config(&id.cert, &id.key)
                .map_err(|e| format!("TLS: {e}"))?;
            let l = edgefront_origin::tls_listener::TlsListener::new(listener, tls, "public")
                .map_err(|e| format!("listen {}: {e}", cfg.listen))?;
            tracing::info!(listen = %cfg.listen, "public listener serves TLS");
            axum::serve(l, router(state))
                .with_graceful_shutdown(stopped(stop_rx))
                .await
        }
        None => {
            axum::serve(listener, router(state))
                .with_graceful_shutdown(stopped(stop_rx))
                .await
        }
    }
    .map_err(|e| e.to_string());
    if let Some(task) = internal {
        task.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    public
}
