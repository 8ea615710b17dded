//! `edgefront-health`: the region's health hook (see the crate docs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use edgefront_health::daemon::{Daemon, Settings};
use edgefront_health::peers;

#[derive(Parser)]
#[command(
    name = "edgefront-health",
    version,
    about = "Probe the edge and its replica; announce or withdraw the anycast route through BIRD (settings from --config FILE, a TOML file; every flag also reads EDGEFRONT_HEALTH_<FLAG>, and both override the file)",
    after_help = "Example:\n  edgefront-health --config /etc/edgefront/health.toml\n  edgefront-health --region bom1 --edge-admin http://198.51.100.1:9080 \\\n    --replica-url postgres://edgefront@198.51.100.1:5432/edgefront \\\n    --bird-socket /run/edgefront/bird.ctl --state-file /var/lib/edgefront/drain.json \\\n    --listen 198.51.100.1:9180   # token from EDGEFRONT_ADMIN_TOKEN"
)]
struct Cli {
    /// A TOML file of settings, each named like its flag in snake_case
    /// (`region = "bom1"`, `max_lag_seconds = 10`, `peers = ["sin1=http://…"]`):
    /// its values stand where a flag is not given, and the environment and
    /// flags override them. No secrets (tokens: --secrets-dir).
    #[arg(long, env = "EDGEFRONT_HEALTH_CONFIG")]
    config: Option<PathBuf>,
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
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("edgefront-health: {e}");
            return ExitCode::from(64);
        }
    };
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

/// The command line, over the settings of `--config` (or
/// `EDGEFRONT_HEALTH_CONFIG`) when given. `--help` and `--version` print and
/// exit as usual; a bad flag exits 2 (clap), a bad file 64 (via `Err`).
fn parse_cli() -> Result<Cli, String> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut command = Cli::command();
    if let Some(path) = config_path(&args) {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("--config {}: {e}", path.display()))?;
        command = with_file_defaults(command, &text, &path.display().to_string())?;
    }
    let matches = command.get_matches_from(args);
    Cli::from_arg_matches(&matches).map_err(|e| e.to_string())
}

/// `--config` from the arguments (`--config FILE` or `--config=FILE`), else
/// from `EDGEFRONT_HEALTH_CONFIG`.
fn config_path(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("EDGEFRONT_HEALTH_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `command` with the settings of a TOML file as its defaults (clap's order:
/// a flag, then the environment, then these). Unknown keys, secrets and
/// values that are not strings, numbers, booleans or arrays of them are
/// refused, naming the key.
fn with_file_defaults(
    mut command: clap::Command,
    text: &str,
    path: &str,
) -> Result<clap::Command, String> {
    let table: toml::Table = text.parse().map_err(|e| format!("{path}: {e}"))?;
    for (key, value) in table {
        if matches!(key.as_str(), "token" | "status_token") {
            return Err(format!(
                "{path}: {key}: secrets are not read from the configuration (use secrets_dir)"
            ));
        }
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_id() == key.as_str() && a.get_long().is_some() && key != "config")
        else {
            return Err(format!("{path}: {key}: not a setting of the health hook"));
        };
        // A list may also be one string, split as its flag is (`a,b`).
        let delimiter = arg.get_value_delimiter();
        let scalar = |v: toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                toml::Value::Boolean(b) => Ok(b.to_string()),
                other => Err(format!(
                    "{path}: {key}: {} is not a string, number or boolean",
                    other.type_str()
                )),
            }
        };
        let values = match (value, delimiter) {
            (toml::Value::Array(items), _) => items
                .into_iter()
                .map(scalar)
                .collect::<Result<Vec<_>, _>>()?,
            (toml::Value::String(s), Some(d)) => s
                .split(d)
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
            (v, _) => vec![scalar(v)?],
        };
        // A setting the file gives is no longer required on the command line.
        command = command.mut_arg(key.as_str(), |a| a.default_values(values).required(false));
    }
    Ok(command)
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

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
region = "bom1"
edge_admin = "http://198.51.100.1:9080"
replica_url = "postgres://edgefront@198.51.100.1:5432/edgefront"
bird_socket = "/run/bird/bird.ctl"
state_file = "/var/lib/edgefront/drain.json"
listen = "198.51.100.1:9180"
max_lag_seconds = 7.5
min_peers = 1
peers = ["sin1=http://198.51.100.2:9180", "ams1=http://198.51.100.3:9180"]
edge_ports = [80, 443]
"#;

    fn parse(text: &str, args: &[&str]) -> Result<Cli, String> {
        let command = with_file_defaults(Cli::command(), text, "health.toml")?;
        let matches = command
            .try_get_matches_from(std::iter::once("edgefront-health").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Cli::from_arg_matches(&matches).map_err(|e| e.to_string())
    }

    #[test]
    fn the_file_gives_every_setting_and_a_flag_overrides_it() {
        let cli = parse(FILE, &[]).expect("the file alone");
        assert_eq!(cli.region, "bom1");
        assert_eq!(cli.max_lag_seconds, 7.5);
        assert_eq!(cli.min_peers, 1);
        assert_eq!(cli.peers.len(), 2);
        assert_eq!(cli.edge_ports, vec![80, 443]);
        // A list as one string, split as the flag is.
        let one = FILE.replace(
            r#"peers = ["sin1=http://198.51.100.2:9180", "ams1=http://198.51.100.3:9180"]"#,
            r#"peers = "sin1=http://198.51.100.2:9180,ams1=http://198.51.100.3:9180""#,
        );
        assert_eq!(parse(&one, &[]).expect("one string").peers.len(), 2);
        // Not in the file: the flag's own default.
        assert_eq!(cli.rise, 3);
        let cli = parse(FILE, &["--max-lag-seconds", "3", "--region", "sin1"]).expect("flags");
        assert_eq!(cli.max_lag_seconds, 3.0);
        assert_eq!(cli.region, "sin1");
    }

    #[test]
    fn unknown_keys_secrets_and_bad_values_are_refused_by_name() {
        let unknown = parse(&format!("{FILE}\nmax_lag = 3\n"), &[])
            .err()
            .unwrap_or_default();
        assert!(unknown.contains("max_lag: not a setting"), "{unknown}");
        let secret = parse(&format!("{FILE}\ntoken = \"0123456789abcdef\"\n"), &[])
            .err()
            .unwrap_or_default();
        assert!(secret.contains("token: secrets are not read"), "{secret}");
        let table = parse(&format!("{FILE}\n[rise]\nx = 1\n"), &[])
            .err()
            .unwrap_or_default();
        assert!(table.contains("rise: table is not"), "{table}");
        let typed = parse(&FILE.replace("min_peers = 1", "min_peers = \"many\""), &[])
            .err()
            .unwrap_or_default();
        assert!(
            typed.contains("min-peers") || typed.contains("min_peers"),
            "{typed}"
        );
        let broken = parse("region = ", &[]).err().unwrap_or_default();
        assert!(broken.starts_with("health.toml:"), "{broken}");
    }

    #[test]
    fn the_config_path_comes_from_the_flag_in_either_form() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_path(&args(&["h", "--config", "/etc/a.toml"])),
            Some(PathBuf::from("/etc/a.toml"))
        );
        assert_eq!(
            config_path(&args(&["h", "--rise", "2", "--config=/etc/b.toml"])),
            Some(PathBuf::from("/etc/b.toml"))
        );
    }
}
