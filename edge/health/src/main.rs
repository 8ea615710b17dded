//! `edgefront-health`: the region's health hook (see the crate docs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use edgefront_health::daemon::{Daemon, Settings};
use edgefront_health::peers;

#[derive(Parser)]
#[command(
    name = "edgefront-health",
    version,
    about = "Probe the edge and its replica; announce or withdraw the anycast route through BIRD (every flag also reads EDGEFRONT_HEALTH_<FLAG>)",
    after_help = "Example:\n  edgefront-health --region bom1 --edge-admin http://198.51.100.1:9080 \\\n    --replica-url postgres://edgefront@198.51.100.1:5432/edgefront \\\n    --bird-socket /run/edgefront/bird.ctl --state-file /var/lib/edgefront/drain.json \\\n    --listen 198.51.100.1:9180   # token from EDGEFRONT_ADMIN_TOKEN"
)]
struct Cli {
    /// This node's region code (e.g. bom1).
    #[arg(long, env = "EDGEFRONT_HEALTH_REGION")]
    region: String,
    /// Base URL of the edge's admin listener.
    #[arg(long, env = "EDGEFRONT_HEALTH_EDGE_ADMIN")]
    edge_admin: String,
    /// This region's admin token (this API and the edge's drain calls); at
    /// least 16 characters. Give every region its own. Or the file
    /// `admin_token` of --secrets-dir (then a reload reads it again).
    #[arg(long, env = "EDGEFRONT_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read-only token shared by every region: `GET /status` only, which the
    /// hooks read each other's status with (default: the admin token). Or
    /// the file `status_token` of --secrets-dir.
    #[arg(long, env = "EDGEFRONT_STATUS_TOKEN", hide_env_values = true)]
    status_token: Option<String>,
    /// A directory of secret files (`admin_token`, `status_token`; not
    /// readable by every user), read at start and again on SIGHUP
    /// (`systemctl reload`): a rotated token is taken without a restart.
    #[arg(long, env = "EDGEFRONT_HEALTH_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// This region's PostgreSQL replica, for the lag probes (the password
    /// from PGPASSWORD).
    #[arg(long, env = "EDGEFRONT_REPLICA_URL")]
    replica_url: String,
    /// Replication lag budget: how long the oldest unreplayed WAL may wait, seconds.
    #[arg(long, default_value_t = 10.0, env = "EDGEFRONT_HEALTH_MAX_LAG_SECONDS")]
    max_lag_seconds: f64,
    /// Replication lag budget: unreplayed WAL, bytes (default 64 MiB).
    #[arg(long, default_value_t = edgefront_lag::DEFAULT_MAX_BYTES, env = "EDGEFRONT_HEALTH_MAX_LAG_BYTES")]
    max_lag_bytes: u64,
    /// Longest time without a message from the primary, seconds (an idle
    /// primary speaks every wal_receiver_timeout/2, 30 s by default).
    #[arg(
        long,
        default_value_t = edgefront_lag::DEFAULT_MAX_SILENCE.as_secs_f64(),
        env = "EDGEFRONT_HEALTH_MAX_SILENCE_SECONDS"
    )]
    max_silence_seconds: f64,
    /// Lag withdraws only while at least this many OTHER regions are announced
    /// and fine; otherwise the region stays announced and raises the alert
    /// (0: lag always withdraws).
    #[arg(long, default_value_t = 2, env = "EDGEFRONT_HEALTH_MIN_PEERS")]
    min_peers: usize,
    /// The other regions' hooks, `code=url,…`; default: every other region of
    /// the region data at http://<node_ipv4>:<peer-port>.
    #[arg(long, value_delimiter = ',', env = "EDGEFRONT_HEALTH_PEERS")]
    peers: Vec<String>,
    /// Region data to find the peers in (default: the built-in regions/regions.toml).
    #[arg(long, env = "EDGEFRONT_HEALTH_REGIONS_FILE")]
    regions_file: Option<PathBuf>,
    /// The peers' admin API port (with the region data).
    #[arg(long, default_value_t = 9180, env = "EDGEFRONT_HEALTH_PEER_PORT")]
    peer_port: u16,
    /// How often the peers are read, milliseconds.
    #[arg(
        long,
        default_value_t = 1000,
        env = "EDGEFRONT_HEALTH_PEER_INTERVAL_MS"
    )]
    peer_interval_ms: u64,
    /// How long one read of a peer may take, milliseconds.
    #[arg(long, default_value_t = 1500, env = "EDGEFRONT_HEALTH_PEER_TIMEOUT_MS")]
    peer_timeout_ms: u64,
    /// BIRD's control socket (the hook's user needs group bird).
    #[arg(long, env = "EDGEFRONT_HEALTH_BIRD_SOCKET")]
    bird_socket: PathBuf,
    /// The BIRD protocol holding the anycast route.
    #[arg(long, default_value = "anycast", env = "EDGEFRONT_HEALTH_PROTOCOL")]
    protocol: String,
    /// Where the drain record lives (survives restarts).
    #[arg(long, env = "EDGEFRONT_HEALTH_STATE_FILE")]
    state_file: PathBuf,
    /// Admin API address.
    #[arg(long, env = "EDGEFRONT_HEALTH_LISTEN")]
    listen: SocketAddr,
    /// How often the edge and the replica are probed, milliseconds.
    #[arg(long, default_value_t = 200, env = "EDGEFRONT_HEALTH_INTERVAL_MS")]
    interval_ms: u64,
    /// Good probes in a row before announcing.
    #[arg(long, default_value_t = 3, env = "EDGEFRONT_HEALTH_RISE")]
    rise: u32,
    /// Bad probes in a row before withdrawing.
    #[arg(long, default_value_t = 2, env = "EDGEFRONT_HEALTH_FALL")]
    fall: u32,
    /// Re-send the desired state to BIRD this often.
    #[arg(long, default_value_t = 1000, env = "EDGEFRONT_HEALTH_REAPPLY_MS")]
    reapply_ms: u64,
    /// Longest wait for keep-alive connections before withdrawing, seconds.
    #[arg(
        long,
        default_value_t = 10.0,
        env = "EDGEFRONT_HEALTH_DRAIN_GRACE_SECONDS"
    )]
    drain_grace_seconds: f64,
    /// Longest wait for the region to go idle after withdrawing, seconds.
    #[arg(
        long,
        default_value_t = 60.0,
        env = "EDGEFRONT_HEALTH_DRAIN_TIMEOUT_SECONDS"
    )]
    drain_timeout_seconds: f64,
    /// The edge's public ports, comma-separated.
    #[arg(
        long,
        default_value = "80,443",
        value_delimiter = ',',
        env = "EDGEFRONT_HEALTH_EDGE_PORTS"
    )]
    edge_ports: Vec<u16>,
    /// Second-chance forwarding: the node address of the region that takes
    /// this region's shoppers while it is away (the next-nearest). After
    /// each announce, TCP packets of flows this node does not know go there
    /// through a VXLAN tunnel, so connections opened there keep working.
    /// Needs --anycast and --node-ip, and root or CAP_NET_ADMIN.
    #[arg(long, env = "EDGEFRONT_HEALTH_SECOND_CHANCE_PEER", requires_all = ["anycast", "node_ip"])]
    second_chance_peer: Option<std::net::Ipv4Addr>,
    /// The anycast address shoppers reach (for --second-chance-peer).
    #[arg(long, env = "EDGEFRONT_HEALTH_ANYCAST")]
    anycast: Option<std::net::Ipv4Addr>,
    /// This node's own address, the tunnel's source (for --second-chance-peer).
    #[arg(long, env = "EDGEFRONT_HEALTH_NODE_IP")]
    node_ip: Option<std::net::Ipv4Addr>,
    /// Seconds after an announce during which unknown flows are sent to the
    /// peer (longer than a connection can stay idle elsewhere).
    #[arg(
        long,
        default_value_t = 150,
        env = "EDGEFRONT_HEALTH_SECOND_CHANCE_SECONDS"
    )]
    second_chance_seconds: u64,
    /// The liveness device: a TUN interface this process holds while it
    /// lives. BIRD's anycast route goes `via` it (bird.conf), so if this hook
    /// dies the route is withdrawn at once, even if the edge died too. Empty:
    /// none (BIRD's route must then not depend on it). Needs CAP_NET_ADMIN.
    #[arg(
        long,
        default_value = "efhook",
        env = "EDGEFRONT_HEALTH_LIVENESS_DEVICE"
    )]
    liveness_device: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    // Taken over first: SIGHUP's default action would end the hook.
    let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("edgefront-health: cannot listen for SIGHUP: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bad = |m: String| {
        eprintln!("edgefront-health: {m}");
        ExitCode::from(64)
    };
    let secrets = edgefront_health::secrets::Sources {
        admin: cli.token.clone(),
        status: cli.status_token.clone(),
        dir: cli.secrets_dir.clone(),
    };
    let tokens = match secrets.load() {
        Ok(t) => t,
        Err(e) => return bad(e),
    };
    if !(cli.rise >= 1 && cli.fall >= 1) {
        return bad("--rise and --fall must be at least 1".into());
    }
    if !(cli.max_lag_seconds > 0.0
        && cli.drain_grace_seconds >= 0.0
        && cli.drain_timeout_seconds > 0.0)
    {
        return bad("durations must be positive".into());
    }
    for (flag, v) in [
        ("--max-lag-seconds", cli.max_lag_seconds),
        ("--max-silence-seconds", cli.max_silence_seconds),
    ] {
        if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
            return bad(format!("{flag} {v} is outside (0, 86400]"));
        }
    }
    if cli.max_lag_bytes == 0 {
        return bad("--max-lag-bytes must be at least 1".into());
    }
    if cli.min_peers > 64 {
        return bad(format!("--min-peers {} is outside 0..=64", cli.min_peers));
    }
    if !(10..=60_000).contains(&cli.peer_interval_ms)
        || !(10..=60_000).contains(&cli.peer_timeout_ms)
    {
        return bad("--peer-interval-ms and --peer-timeout-ms must be within 10..=60000".into());
    }
    let peers = if cli.peers.iter().any(|p| !p.trim().is_empty()) {
        match peers::parse(&cli.peers, &cli.region) {
            Ok(p) => p,
            Err(e) => return bad(format!("--peers: {e}")),
        }
    } else {
        let regions = match &cli.regions_file {
            Some(path) => edgefront_regions::Regions::load(path),
            None => edgefront_regions::Regions::builtin(),
        };
        let name = cli.regions_file.as_ref().map_or_else(
            || edgefront_regions::BUILTIN_NAME.to_owned(),
            |p| p.display().to_string(),
        );
        match regions
            .map_err(|e| e.to_string())
            .and_then(|r| peers::from_regions(&r, &cli.region, cli.peer_port))
        {
            Ok(p) => p,
            Err(e) => return bad(format!("{name}: {e}")),
        }
    };
    if peers.len() < cli.min_peers {
        tracing::warn!(
            peers = peers.len(),
            min_peers = cli.min_peers,
            "fewer peers than --min-peers: replica lag will never withdraw this region"
        );
    }
    if !(1..=3600).contains(&cli.second_chance_seconds) {
        return bad("--second-chance-seconds must be within 1..=3600".into());
    }
    let second_chance = match (cli.second_chance_peer, cli.anycast, cli.node_ip) {
        (Some(peer), Some(anycast), Some(node)) => {
            if peer == node {
                return bad("--second-chance-peer is this node's own address".into());
            }
            // Every region node may send into the tunnel (any of them may
            // have this one as its next-nearest): the peers' addresses.
            let mut tunnel_sources: Vec<std::net::Ipv4Addr> = peers
                .iter()
                .filter_map(|p| reqwest::Url::parse(&p.url).ok()?.host_str()?.parse().ok())
                .collect();
            tunnel_sources.push(peer);
            Some(edgefront_health::steer::Settings {
                anycast,
                node,
                peer,
                window: Duration::from_secs(cli.second_chance_seconds),
                // Longer than the edge's longest idle keep-alive (HTTP/2: 120 s).
                flow_idle: Duration::from_secs(180),
                tunnel_sources,
                ports: cli.edge_ports.clone(),
            })
        }
        _ => None,
    };
    if cli.liveness_device.len() > 15
        || cli
            .liveness_device
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    {
        return bad(format!(
            "--liveness-device {:?}: an interface name (at most 15 letters, digits, - or _)",
            cli.liveness_device
        ));
    }
    let settings = Settings {
        region: cli.region,
        edge_admin: cli.edge_admin.trim_end_matches('/').to_owned(),
        tokens,
        replica_url: cli.replica_url,
        budget: edgefront_lag::Budget {
            bytes: cli.max_lag_bytes,
            seconds: Duration::from_secs_f64(cli.max_lag_seconds),
            silence: Duration::from_secs_f64(cli.max_silence_seconds),
        },
        peers,
        min_peers: cli.min_peers,
        peer_interval: Duration::from_millis(cli.peer_interval_ms),
        peer_timeout: Duration::from_millis(cli.peer_timeout_ms),
        bird_socket: cli.bird_socket,
        protocol: cli.protocol,
        state_file: cli.state_file,
        interval: Duration::from_millis(cli.interval_ms.max(10)),
        rise: cli.rise,
        fall: cli.fall,
        reapply: Duration::from_millis(cli.reapply_ms.max(10)),
        drain_grace: Duration::from_secs_f64(cli.drain_grace_seconds),
        drain_timeout: Duration::from_secs_f64(cli.drain_timeout_seconds),
        edge_ports: cli.edge_ports,
        second_chance,
        liveness_device: (!cli.liveness_device.is_empty()).then_some(cli.liveness_device),
    };
    let daemon = match Daemon::new(settings) {
        Ok(d) => Arc::new(d),
        Err(e) => return bad(e.to_string()),
    };
    let listener = match tokio::net::TcpListener::bind(cli.listen).await {
        Ok(l) => l,
        Err(e) => return bad(format!("--listen {}: {e}", cli.listen)),
    };
    tracing::info!(
        region = %daemon.settings.region,
        listen = %cli.listen,
        peers = daemon.settings.peers.len(),
        min_peers = daemon.settings.min_peers,
        "health hook started"
    );
    let looped = daemon.clone();
    tokio::spawn(async move { looped.run().await });
    let reloaded = daemon.clone();
    tokio::spawn(async move { reload_on_sighup(&reloaded, &secrets, hup).await });
    if let Err(e) = axum::serve(listener, edgefront_health::api::router(daemon)).await {
        eprintln!("edgefront-health: admin API: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `systemctl reload` (SIGHUP): reads the secrets directory again and takes
/// the tokens it holds; a bad file keeps the tokens in use. The route is
/// never touched.
async fn reload_on_sighup(
    daemon: &Daemon,
    secrets: &edgefront_health::secrets::Sources,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        match secrets.reload(&daemon.tokens()) {
            Ok(tokens) => {
                daemon.set_tokens(tokens);
                tracing::warn!(
                    from_files = secrets.dir.is_some(),
                    "reload: tokens read again and in use"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "reload refused: the hook keeps the tokens in use")
            }
        }
    }
}
