//! `edge-ctl`: operate an edgefront network — status, drain, undrain, live
//! failover drills, and the lab. See `edge-ctl --help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edgefront_ctl::client::Client;
use edgefront_ctl::database;
use edgefront_ctl::drill::{self, Mode};
use edgefront_ctl::lab::{self, LabState};
use edgefront_health::daemon::{Phase, Status};

const AFTER_HELP: &str = "\
Targets:
  In the lab (as root), edge-ctl reads /run/edgefront-lab/<prefix>.json, enters the
  lab's origin-host namespace and uses each region's admin token: --lab <prefix>,
  or nothing when the default lab (eflab) is up. Otherwise it reads the region data
  (built in, or --regions-file) and calls each region's health hook at
  http://<node_ipv4>:<--health-port> with that region's token from
  EDGEFRONT_ADMIN_TOKENS (bom1=TOKEN,sin1=TOKEN,…; every region has its own, so one
  node's token cannot drain another region), else EDGEFRONT_ADMIN_TOKEN.

Examples:
  edge-ctl status
  edge-ctl status --json | jq '.[] | select(.announced | not) | .region'
  edge-ctl drain bom1                # waits until bom1 is withdrawn and idle
  edge-ctl undrain bom1              # waits until bom1 announces again
  edge-ctl drill bom1 --mode kill    # lab only: load, hard kill, restore, report
  edge-ctl drill bom1 --mode drain --proto h2   # the same, browsers' HTTP/2 over TLS
  edge-ctl upgrade bom1              # lab only: graceful upgrade of bom1's edge binary
  edge-ctl dashboard                 # live network map on http://127.0.0.1:9900/
  edge-ctl lab up                    # the lab, in the foreground (Ctrl-C removes it)
  edge-ctl lab down --prefix eft42   # remove a lab, also after a crash
  edge-ctl database --patroni https://198.51.100.100:8008 --ca /etc/edgefront/pki/ca.pem

Exit codes:
  0 done   1 the operation failed (drain timed out, drill had failed requests)
  2 usage  3 cannot reach a region or its hook refused the token   4 no such region or lab";

#[derive(Parser)]
#[command(name = "edge-ctl", version, about = "Operate an edgefront anycast network", after_help = AFTER_HELP)]
struct Cli {
    /// Operate the lab with this prefix.
    #[arg(long, global = true, env = "EDGEFRONT_LAB")]
    lab: Option<String>,
    /// Region data for a real deployment (default: the built-in regions).
    #[arg(long, global = true)]
    regions_file: Option<PathBuf>,
    /// Health hook port on each node (real deployments).
    #[arg(long, global = true, default_value_t = 9180)]
    health_port: u16,
    /// Admin token (real deployments; the lab's is read from its state).
    #[arg(
        long,
        global = true,
        env = "EDGEFRONT_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Per-region admin tokens, `bom1=TOKEN,sin1=TOKEN,…` (real deployments;
    /// regions not named get --token).
    #[arg(
        long,
        global = true,
        env = "EDGEFRONT_ADMIN_TOKENS",
        hide_env_values = true
    )]
    tokens: Option<String>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every region: announced or withdrawn, health and why, lag, traffic, certificates.
    Status,
    /// Drain a region: keep-alive off, in-flight requests finish, then withdraw; waits until idle.
    Drain {
        /// The region's code (e.g. bom1).
        region: String,
        /// Return once the drain has started.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// End a drain: the region announces again once healthy; waits until it does.
    Undrain {
        /// The region's code (e.g. bom1).
        region: String,
        /// Return once the undrain has been asked for.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Graceful upgrade of a region's edge binary (lab): a new process takes the
    /// listening sockets, the old one finishes what is in flight and exits. No drain:
    /// the route never moves.
    Upgrade {
        /// The region's code (e.g. bom1).
        region: String,
    },
    /// Live failover drill (lab): load from every city, drain, kill or upgrade, restore, report.
    /// `drill origin --mode kill|switchover` (not in a lab started with --single-primary): the
    /// database leader's host is powered off or hands over, under page loads and checkouts.
    Drill {
        /// The region's code (e.g. bom1), or `origin`.
        region: String,
        /// What happens to the region: a drain, a hard kill, or a graceful upgrade
        /// (origin: kill or switchover).
        #[arg(long, value_enum, default_value = "drain")]
        mode: Mode,
        /// Requests per second from each city.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Seconds of load before the event.
        #[arg(long, default_value_t = 3.0)]
        before: f64,
        /// Seconds between the event (drained / killed) and the restore.
        #[arg(long, default_value_t = 5.0)]
        during: f64,
        /// Seconds of load after the region is back.
        #[arg(long, default_value_t = 4.0)]
        after: f64,
        /// Only these cities (region codes, comma-separated).
        #[arg(long, value_delimiter = ',')]
        cities: Vec<String>,
        /// Concurrent shoppers (connections) per city.
        #[arg(long, default_value_t = 4)]
        shoppers: usize,
        /// The protocol shoppers load over: HTTP/1.1 plain or over TLS, or
        /// HTTP/2 over TLS (the lab's CA).
        #[arg(long, value_enum, default_value = "h1")]
        proto: drill::Proto,
        /// HTTP/2: streams per page load, sent at once on one connection
        /// (the rate counts streams).
        #[arg(long, default_value_t = 4)]
        streams: usize,
        /// `drill origin`: checkouts started per second from each city.
        #[arg(long, default_value_t = 2.0)]
        checkouts: f64,
    },
    /// A live network map (regions, routes, where each lab city lands) for drills.
    Dashboard {
        /// Address to serve it on (bound before entering the lab's namespace,
        /// so a browser on this machine reaches it).
        #[arg(long, default_value = "127.0.0.1:9900")]
        listen: std::net::SocketAddr,
    },
    /// The lab on this machine.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// The internal CA that certifies the platform's machines to each other.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
    /// The origin's database cluster (Patroni): the leader, the synchronous
    /// standby, every member's state, timeline and lag. Exit 1 when no member
    /// leads (writes stop), 3 when no REST API answers.
    Database {
        /// Patroni REST APIs, `https://host:8008,…` (the first that answers is
        /// read).
        #[arg(
            long,
            env = "EDGEFRONT_PATRONI",
            value_delimiter = ',',
            required = true
        )]
        patroni: Vec<String>,
        /// The CA (PEM) the APIs' certificates chain to (the internal CA).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Creates the CA in DIR if it has none, then makes sure every named
    /// certificate exists, names what it should and has more than 30 of its
    /// 90 days left, issuing those that do not (rotation is a re-run).
    /// Prints one line per certificate: `issued NAME` or `ok NAME`.
    Ensure {
        /// Directory of the CA (`ca.pem`, `ca.key`) and its certificates.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// A server certificate: `FILE=NAME[,NAME…]` (host names or IPs).
        #[arg(long = "server")]
        servers: Vec<String>,
        /// A client certificate named after a region node (e.g. `bom1`).
        #[arg(long = "client")]
        clients: Vec<String>,
        /// A certificate for both sides of a link, `FILE=NAME[,NAME…]`: a
        /// cluster member that serves its peers and calls them (etcd).
        #[arg(long = "peer")]
        peers: Vec<String>,
    },
}

/// `edge-ctl pki ensure`.
fn pki_cmd(cmd: &PkiCmd) -> Result<(), Fail> {
    use edgefront_certs::pki::{InternalCa, Usage};
    let PkiCmd::Ensure {
        dir,
        servers,
        clients,
        peers,
    } = cmd;
    let ca = InternalCa::open_or_create(dir)
        .map_err(|e| Fail(1, anyhow::anyhow!("{}: {e}", dir.display())))?;
    // File names (inventory host names may hold dots; never a path).
    let valid = |n: &str| {
        !n.is_empty()
            && !n.starts_with('.')
            && n != "ca"
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let mut todo: Vec<(String, Vec<String>, Usage)> = Vec::new();
    let named = servers
        .iter()
        .map(|s| ("server", s, Usage::Server))
        .chain(peers.iter().map(|s| ("peer", s, Usage::Peer)));
    for (flag, s, usage) in named {
        let (file, names) = s
            .split_once('=')
            .filter(|(f, n)| valid(f) && !n.is_empty())
            .ok_or_else(|| {
                Fail(
                    2,
                    anyhow::anyhow!("--{flag} {s:?} is not FILE=NAME[,NAME…]"),
                )
            })?;
        let names = names.split(',').map(str::to_owned).collect();
        todo.push((file.to_owned(), names, usage));
    }
    for c in clients {
        if !valid(c) {
            return Err(Fail(
                2,
                anyhow::anyhow!("--client {c:?} is not a node name"),
            ));
        }
        todo.push((c.clone(), Vec::new(), Usage::Client));
    }
    for (file, names, usage) in todo {
        let issued = ca
            .ensure(&file, &file, &names, usage)
            .map_err(|e| Fail(1, anyhow::anyhow!("{file}: {e}")))?;
        println!("{} {file}", if issued { "issued" } else { "ok" });
    }
    Ok(())
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build and run the lab (runs edgefront-lab; extra flags pass through).
    Up {
        /// The lab's prefix (its namespaces' names start with it).
        #[arg(long, default_value = lab::DEFAULT_PREFIX)]
        prefix: String,
        /// More flags for edgefront-lab (e.g. --regions bom1,sin1,fra1 --detach).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Remove a lab's namespaces, processes and files (safe after a crash).
    Down {
        /// The lab's prefix (its namespaces' names start with it).
        #[arg(long, default_value = lab::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Labs on this machine.
    List,
    /// Hard-kill a region node (silent uplink, every process SIGKILLed).
    Kill {
        /// The region's code (e.g. bom1).
        region: String,
        /// The lab's prefix (its namespaces' names start with it).
        #[arg(long, default_value = lab::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Bring a killed region node back (uplink, replica, BIRD, edge, hook).
    Restore {
        /// The region's code (e.g. bom1).
        region: String,
        /// The lab's prefix (its namespaces' names start with it).
        #[arg(long, default_value = lab::DEFAULT_PREFIX)]
        prefix: String,
    },
}

/// An error with its exit code.
struct Fail(u8, anyhow::Error);

fn code(c: u8) -> impl FnOnce(anyhow::Error) -> Fail {
    move |e| Fail(c, e)
}

struct Target {
    client: Client,
    regions: Vec<(String, String, String)>, // code, city, health URL
    lab: Option<LabState>,
}

impl Target {
    fn url(&self, region: &str) -> Result<&str, Fail> {
        self.regions
            .iter()
            .find(|(c, _, _)| c == region)
            .map(|(_, _, u)| u.as_str())
            .ok_or_else(|| {
                Fail(
                    4,
                    anyhow::anyhow!(
                        "no region {region:?}; regions: {}",
                        self.regions
                            .iter()
                            .map(|r| r.0.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }
}

fn target(cli: &Cli) -> Result<Target, Fail> {
    let lab_prefix = cli.lab.clone().or_else(|| {
        (cli.regions_file.is_none()
            && cli.token.is_none()
            && lab::state_path(lab::DEFAULT_PREFIX).exists())
        .then(|| lab::DEFAULT_PREFIX.to_owned())
    });
    if let Some(p) = lab_prefix {
        let state = LabState::load(&p).map_err(code(4))?;
        // Operators' tools run on the origin host, inside the lab's network.
        lab::enter_netns(&state.core_ns).map_err(code(3))?;
        return Ok(Target {
            client: state.admin_client().map_err(code(1))?,
            regions: state
                .regions
                .iter()
                .map(|r| (r.code.clone(), r.city.clone(), r.health_url.clone()))
                .collect(),
            lab: Some(state),
        });
    }
    let regions = match &cli.regions_file {
        Some(p) => edgefront_regions::Regions::load(p),
        None => edgefront_regions::Regions::builtin(),
    }
    .map_err(|e| Fail(4, e.into()))?;
    if cli.token.is_none() && cli.tokens.is_none() {
        return Err(Fail(
            2,
            anyhow::anyhow!(
                "no lab is up and no admin token given (EDGEFRONT_ADMIN_TOKENS, --token or EDGEFRONT_ADMIN_TOKEN)"
            ),
        ));
    }
    let targets: Vec<(String, String, String)> = regions
        .all()
        .iter()
        .map(|r| {
            (
                r.id.as_str().to_owned(),
                r.city.clone(),
                format!("http://{}:{}", r.node_ipv4, cli.health_port),
            )
        })
        .collect();
    let mut per_base = Vec::new();
    for pair in cli
        .tokens
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|p| !p.is_empty())
    {
        let (code, token) = pair.split_once('=').ok_or_else(|| {
            Fail(
                2,
                // Never echoed: it may be a token missing its `REGION=`.
                anyhow::anyhow!("EDGEFRONT_ADMIN_TOKENS: an entry is not REGION=TOKEN"),
            )
        })?;
        let (_, _, url) = targets.iter().find(|(c, _, _)| c == code).ok_or_else(|| {
            Fail(
                4,
                anyhow::anyhow!("EDGEFRONT_ADMIN_TOKENS: no region {code:?}"),
            )
        })?;
        per_base.push((url.clone(), token.to_owned()));
    }
    Ok(Target {
        client: Client::with_tokens(cli.token.as_deref().unwrap_or(""), per_base)
            .map_err(code(1))?,
        regions: targets,
        lab: None,
    })
}

/// `edge-ctl database`: prints the cluster; fails (1) when nobody leads.
fn database_cmd(apis: &[String], ca: Option<&std::path::Path>, json: bool) -> Result<(), Fail> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Fail(1, e.into()))?;
    let cluster = rt.block_on(database::read(apis, ca)).map_err(code(3))?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&cluster).map_err(|e| Fail(1, e.into()))?
        );
    } else {
        print!("{}", database::render(&cluster));
    }
    if cluster.leader().is_none() {
        return Err(Fail(1, anyhow::anyhow!("no member leads: writes stop")));
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // PKI, lab and database commands need no target.
    if let Cmd::Database { patroni, ca } = &cli.cmd {
        return match database_cmd(patroni, ca.as_deref(), cli.json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Fail(c, e)) => {
                eprintln!("edge-ctl: {e:#}");
                ExitCode::from(c)
            }
        };
    }
    if let Cmd::Pki { cmd } = &cli.cmd {
        return match pki_cmd(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Fail(c, e)) => {
                eprintln!("edge-ctl: {e:#}");
                ExitCode::from(c)
            }
        };
    }
    if let Cmd::Lab { cmd } = &cli.cmd {
        return match lab_cmd(cmd, cli.json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Fail(c, e)) => {
                eprintln!("edge-ctl: {e:#}");
                ExitCode::from(c)
            }
        };
    }
    // The dashboard's socket belongs to this machine's network, so bind it
    // before entering the lab's namespace.
    let dashboard = match &cli.cmd {
        Cmd::Dashboard { listen } => match std::net::TcpListener::bind(listen) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("edge-ctl: dashboard: {listen}: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    // Enter the lab's namespace (if any) before the runtime starts threads.
    let t = match target(&cli) {
        Ok(t) => t,
        Err(Fail(c, e)) => {
            eprintln!("edge-ctl: {e:#}");
            return ExitCode::from(c);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edge-ctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(listener) = dashboard {
        let geo = match &cli.regions_file {
            Some(p) => edgefront_regions::Regions::load(p),
            None => edgefront_regions::Regions::builtin(),
        };
        let result = rt.block_on(async {
            listener.set_nonblocking(true)?;
            let addr = listener.local_addr()?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            println!("edge-ctl dashboard: http://{addr}/ (Ctrl-C to stop)");
            edgefront_ctl::dashboard::serve(
                listener,
                edgefront_ctl::dashboard::Source {
                    client: t.client.clone(),
                    regions: t.regions.clone(),
                    geo: geo?,
                    lab: t.lab.clone(),
                },
            )
            .await
        });
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("edge-ctl: dashboard: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match rt.block_on(run(&cli, &t)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(c, e)) => {
            eprintln!("edge-ctl: {e:#}");
            ExitCode::from(c)
        }
    }
}

fn lab_cmd(cmd: &LabCmd, json: bool) -> Result<(), Fail> {
    match cmd {
        LabCmd::Up { prefix, args } => {
            let exe = std::env::current_exe().map_err(|e| Fail(1, e.into()))?;
            let lab_bin = exe.with_file_name("edgefront-lab");
            let status = std::process::Command::new(&lab_bin)
                .arg("--prefix")
                .arg(prefix)
                .args(args)
                .status()
                .with_context(|| format!("run {}", lab_bin.display()))
                .map_err(code(1))?;
            if status.success() {
                Ok(())
            } else {
                Err(Fail(1, anyhow::anyhow!("the lab failed ({status})")))
            }
        }
        LabCmd::Down { prefix } => {
            let r = lab::down(prefix).map_err(code(1))?;
            if json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else if r.namespaces == 0 {
                println!("no lab {prefix:?} on this machine");
            } else {
                println!(
                    "lab {prefix:?} removed: {} namespaces, {} processes{}",
                    r.namespaces,
                    r.processes,
                    r.removed_dir
                        .map(|d| format!(", {}", d.display()))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        LabCmd::Kill { region, prefix } => {
            let state = LabState::load(prefix).map_err(code(4))?;
            state.region(region).map_err(code(4))?;
            let n = drill::kill_region(&state, region).map_err(code(1))?;
            println!("{region}: node silenced, {n} processes killed");
            Ok(())
        }
        LabCmd::Restore { region, prefix } => {
            let state = LabState::load(prefix).map_err(code(4))?;
            state.region(region).map_err(code(4))?;
            let t0 = Instant::now();
            drill::restore_region(&state, region).map_err(code(1))?;
            println!(
                "{region}: uplink and processes restarted in {:.1}s; the health hook announces once healthy",
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        LabCmd::List => {
            let mut found = Vec::new();
            if let Ok(d) = std::fs::read_dir(lab::STATE_DIR) {
                for e in d.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if let Some(p) = name.strip_suffix(".json") {
                        found.push((p.to_owned(), lab::namespaces(p).len()));
                    }
                }
            }
            found.sort();
            if json {
                let v: Vec<_> = found
                    .iter()
                    .map(|(p, n)| serde_json::json!({"prefix": p, "namespaces": n}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if found.is_empty() {
                println!("no labs");
            } else {
                for (p, n) in found {
                    println!("{p}\t{n} namespaces");
                }
            }
            Ok(())
        }
    }
}

async fn run(cli: &Cli, t: &Target) -> Result<(), Fail> {
    match &cli.cmd {
        Cmd::Status => status(cli, t).await,
        Cmd::Drain {
            region,
            no_wait,
            timeout,
        } => {
            let url = t.url(region)?;
            let started = t.client.drain(url).await.map_err(code(3))?;
            if !cli.json {
                println!(
                    "{region}: {}",
                    if started {
                        "drain started: keep-alive off, waiting for open connections before withdrawing"
                    } else {
                        "already draining or drained"
                    }
                );
            }
            if *no_wait {
                return Ok(());
            }
            let t0 = Instant::now();
            let mut last = String::new();
            loop {
                let s = t.client.status(url).await.map_err(code(3))?;
                let line = format!(
                    "{:>6.1}s  {:<9} announced={:<5} connections={:<4} from-before-drain={:<4} in-flight={}",
                    t0.elapsed().as_secs_f64(),
                    s.drain_phase
                        .map_or("-".into(), |p| format!("{p:?}").to_lowercase()),
                    s.announced,
                    s.connections,
                    s.drain_connections_remaining,
                    s.edge.requests_in_flight
                );
                if !cli.json && line[8..] != *last.get(8..).unwrap_or("") {
                    println!("{line}");
                    last = line;
                }
                if s.drain_phase == Some(Phase::Drained) && !s.announced {
                    if cli.json {
                        println!("{}", serde_json::to_string(&s).unwrap_or_default());
                    } else {
                        println!(
                            "{region}: drained in {:.1}s (withdrawn, idle)",
                            t0.elapsed().as_secs_f64()
                        );
                    }
                    return Ok(());
                }
                if t0.elapsed() > Duration::from_secs(*timeout) {
                    return Err(Fail(
                        1,
                        anyhow::anyhow!("{region}: not drained after {timeout}s"),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Cmd::Undrain {
            region,
            no_wait,
            timeout,
        } => {
            let url = t.url(region)?;
            let was = t.client.undrain(url).await.map_err(code(3))?;
            if !cli.json {
                println!(
                    "{region}: {}",
                    if was {
                        "undrained; announcing once healthy"
                    } else {
                        "was not drained"
                    }
                );
            }
            if *no_wait {
                return Ok(());
            }
            let t0 = Instant::now();
            loop {
                let s = t.client.status(url).await.map_err(code(3))?;
                if s.announced {
                    if cli.json {
                        println!("{}", serde_json::to_string(&s).unwrap_or_default());
                    } else {
                        println!(
                            "{region}: announced after {:.1}s",
                            t0.elapsed().as_secs_f64()
                        );
                    }
                    return Ok(());
                }
                if t0.elapsed() > Duration::from_secs(*timeout) {
                    return Err(Fail(
                        1,
                        anyhow::anyhow!(
                            "{region}: not announced after {timeout}s: {}",
                            if s.reasons.is_empty() {
                                "healthy but BIRD has not announced".into()
                            } else {
                                s.reasons.join("; ")
                            }
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Cmd::Upgrade { region } => {
            let Some(state) = &t.lab else {
                return Err(Fail(
                    2,
                    anyhow::anyhow!(
                        "upgrade runs the new edge on the region's node: in the lab (--lab); in production, use the rolling-upgrade playbook"
                    ),
                ));
            };
            t.url(region)?;
            let (state, which) = (state.clone(), region.clone());
            let u = tokio::task::spawn_blocking(move || drill::upgrade_edge(&state, &which))
                .await
                .map_err(|e| Fail(1, e.into()))?
                .map_err(code(1))?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&u).unwrap_or_default());
            } else {
                println!(
                    "{}: edge {} ready for the listening sockets in {:.0} ms; the old edge {} handed them over, finished and exited {:.1} s after SIGQUIT",
                    u.region,
                    u.new_pid,
                    u.ready_ms,
                    u.old_pid,
                    u.old_exit_ms / 1e3
                );
            }
            Ok(())
        }
        Cmd::Drill {
            region,
            mode,
            rate,
            before,
            during,
            after,
            cities,
            shoppers,
            proto,
            streams,
            checkouts,
        } => {
            let Some(state) = &t.lab else {
                return Err(Fail(
                    2,
                    anyhow::anyhow!(
                        "drill generates shopper load from the lab's cities: use it with a lab (--lab)"
                    ),
                ));
            };
            if region == "origin" {
                return origin_drill(
                    cli,
                    state,
                    *mode,
                    *rate,
                    *checkouts,
                    [*before, *during, *after],
                    cities,
                )
                .await;
            }
            if *mode == Mode::Switchover {
                return Err(Fail(
                    2,
                    anyhow::anyhow!("--mode switchover is for `drill origin`"),
                ));
            }
            t.url(region)?;
            if !(*rate > 0.0 && *rate <= 200.0) {
                return Err(Fail(
                    2,
                    anyhow::anyhow!("--rate must be in (0, 200] requests/s per city"),
                ));
            }
            let o = drill::Options {
                region: region.clone(),
                mode: *mode,
                rate: *rate,
                before: Duration::from_secs_f64(before.clamp(0.5, 60.0)),
                during: Duration::from_secs_f64(during.clamp(0.5, 120.0)),
                after: Duration::from_secs_f64(after.clamp(0.5, 60.0)),
                cities: cities.clone(),
                request_timeout: Duration::from_secs(2),
                workers_per_city: (*shoppers).clamp(1, 32),
                proto: *proto,
                streams_per_page: (*streams).clamp(1, 32),
            };
            let json = cli.json;
            let say = move |line: String| {
                if !json {
                    println!("{line}");
                }
            };
            let report = drill::run(state, &o, &say).await.map_err(code(1))?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print_report(&report);
            }
            if report.failed > 0 {
                return Err(Fail(
                    1,
                    anyhow::anyhow!("{} of {} requests failed", report.failed, report.requests),
                ));
            }
            Ok(())
        }
        Cmd::Lab { .. } | Cmd::Pki { .. } | Cmd::Database { .. } | Cmd::Dashboard { .. } => {
            unreachable!("handled before")
        }
    }
}

/// `drill origin`: runs on a thread of its own (it enters a city's
/// namespace: the leader's host may be the one this process stands in).
async fn origin_drill(
    cli: &Cli,
    state: &lab::LabState,
    mode: Mode,
    rate: f64,
    checkouts: f64,
    [before, during, after]: [f64; 3],
    cities: &[String],
) -> Result<(), Fail> {
    let event = match mode {
        Mode::Kill => edgefront_ctl::origin_drill::Event::Kill,
        Mode::Switchover => edgefront_ctl::origin_drill::Event::Switchover,
        Mode::Drain | Mode::Upgrade => {
            return Err(Fail(
                2,
                anyhow::anyhow!("drill origin takes --mode kill or --mode switchover"),
            ));
        }
    };
    if !(rate > 0.0 && rate <= 200.0 && checkouts > 0.0 && checkouts <= 50.0) {
        return Err(Fail(
            2,
            anyhow::anyhow!("--rate must be in (0, 200] and --checkouts in (0, 50] per city"),
        ));
    }
    let o = edgefront_ctl::origin_drill::Options {
        event,
        rate,
        checkouts,
        before: Duration::from_secs_f64(before.clamp(0.5, 60.0)),
        during: Duration::from_secs_f64(during.clamp(0.5, 300.0)),
        after: Duration::from_secs_f64(after.clamp(0.5, 60.0)),
        cities: cities.to_vec(),
        request_timeout: Duration::from_secs(5),
    };
    let json = cli.json;
    let state = state.clone();
    // A thread of its own, never a pooled one: it changes its namespace.
    let drill = std::thread::spawn(move || {
        let say = move |line: String| {
            if !json {
                println!("{line}");
            }
        };
        edgefront_ctl::origin_drill::run(&state, &o, &say)
    });
    let report = tokio::task::spawn_blocking(move || drill.join())
        .await
        .map_err(|e| Fail(1, anyhow::anyhow!("drill thread: {e}")))?
        .map_err(|_| Fail(1, anyhow::anyhow!("the drill thread panicked")))?
        .map_err(code(1))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", edgefront_ctl::origin_drill::render(&report));
    }
    let failed = report.pages_failed
        + report.checkouts_failed
        + report.orders_lost.len()
        + report.orders_unverified.len()
        + report.city_errors.len();
    if failed > 0 {
        return Err(Fail(
            1,
            anyhow::anyhow!(
                "{} pages failed, {} checkouts never acknowledged, {} acknowledged orders lost, {} not verified, {} cities without load",
                report.pages_failed,
                report.checkouts_failed,
                report.orders_lost.len(),
                report.orders_unverified.len(),
                report.city_errors.len()
            ),
        ));
    }
    Ok(())
}

async fn status(cli: &Cli, t: &Target) -> Result<(), Fail> {
    let calls = t.regions.iter().map(|(code, city, url)| {
        let c = t.client.clone();
        let (code, city, url) = (code.clone(), city.clone(), url.clone());
        async move {
            let r = c.status(&url).await;
            (code, city, r)
        }
    });
    let results: Vec<(String, String, Result<Status>)> = futures_join(calls).await;
    if cli.json {
        let v: Vec<serde_json::Value> = results
            .iter()
            .map(|(code, _, r)| match r {
                Ok(s) => serde_json::to_value(s).unwrap_or_default(),
                Err(e) => serde_json::json!({"region": code, "error": format!("{e:#}")}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!(
            "{:<6} {:<12} {:<10} {:<10} {:>7} {:>8} {:>6} {:>6} {:>5}  WHY",
            "REGION", "CITY", "ROUTE", "HEALTH", "LAG", "REQ/S", "HIT%", "CERTS", "CONNS"
        );
        for (code, city, r) in &results {
            match r {
                Ok(s) => {
                    let route = if s.announced {
                        "announced"
                    } else {
                        "withdrawn"
                    };
                    let health = match (s.drain_phase, s.healthy) {
                        (Some(p), _) => format!("{p:?}").to_lowercase(),
                        (None, true) => "healthy".into(),
                        (None, false) => "unhealthy".into(),
                    };
                    let why = if !s.reasons.is_empty() {
                        s.reasons.join("; ")
                    } else if let Some(e) = &s.bird_error {
                        e.clone()
                    } else if s.drained {
                        format!(
                            "drained by an operator {:.0}s ago",
                            s.drain_seconds.unwrap_or(0.0)
                        )
                    } else {
                        String::new()
                    };
                    println!(
                        "{:<6} {:<12} {:<10} {:<10} {:>7} {:>8.1} {:>6} {:>6} {:>5}  {}",
                        code,
                        city,
                        route,
                        health,
                        s.replica_lag_seconds
                            .map_or("?".into(), |l| format!("{l:.2}s")),
                        s.requests_per_second,
                        s.cache_hit_ratio
                            .map_or("-".into(), |h| format!("{:.1}", h * 100.0)),
                        s.edge.certificates,
                        s.connections,
                        why
                    );
                }
                Err(e) => println!(
                    "{code:<6} {city:<12} {:<10} {:<10} {:>7} {:>8} {:>6} {:>6} {:>5}  {e:#}",
                    "?", "unreachable", "?", "?", "?", "?", "?"
                ),
            }
        }
    }
    // A lab with origin failover: the database cluster too.
    if let Some(lab) = &t.lab
        && let Some(db) = &lab.database
        && !cli.json
    {
        let ca = lab::internal_ca_path(&lab.prefix);
        match database::read(&db.patroni_apis, Some(&ca)).await {
            Ok(c) => print!("\nDatabase (Patroni):\n{}", database::render(&c)),
            Err(e) => println!("\nDatabase (Patroni): {e:#}"),
        }
    }
    let unreachable = results.iter().filter(|(_, _, r)| r.is_err()).count();
    if unreachable > 0 {
        return Err(Fail(
            3,
            anyhow::anyhow!("{unreachable} region(s) unreachable"),
        ));
    }
    Ok(())
}

/// Runs the futures concurrently, keeping their order.
async fn futures_join<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

fn print_report(r: &drill::Report) {
    println!(
        "\nDrill {} ({:?}, {:?}) at {} req/s per city: {} requests, {} failed ({} until the restore, {} while traffic moved home), {} retried on a fresh connection",
        r.region,
        r.mode,
        r.proto,
        r.rate_per_city,
        r.requests,
        r.failed,
        r.failed_until_restore,
        r.failed_after_restore,
        r.retried
    );
    println!(
        "event +{:.2}s (done +{:.2}s), restore +{:.2}s (announced +{:.2}s), end +{:.2}s",
        r.event_ms / 1e3,
        r.event_done_ms / 1e3,
        r.restore_ms / 1e3,
        r.restored_ms / 1e3,
        r.end_ms / 1e3
    );
    println!(
        "\n{:<6} {:>5} {:>6} {:<7} {:<14} {:<7} {:>10} {:>10} {:>10}  {:>21}  {:>21}  {:>21}",
        "CITY",
        "REQS",
        "FAILED",
        "BEFORE",
        "DURING",
        "AFTER",
        "BGP-MOVE",
        "1ST-ANSWER",
        "BGP-BACK",
        "TTFB p50/p95 before",
        "during",
        "after"
    );
    let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.0}ms"));
    let p = |p: &drill::Percentiles| format!("{}/{}", f(p.p50_ms), f(p.p95_ms));
    for c in &r.cities {
        println!(
            "{:<6} {:>5} {:>6} {:<7} {:<14} {:<7} {:>10} {:>10} {:>10}  {:>21}  {:>21}  {:>21}",
            c.city,
            c.requests,
            c.failed,
            c.before.clone().unwrap_or("-".into()),
            if c.during.is_empty() {
                "-".into()
            } else {
                c.during.join(",")
            },
            c.after.clone().unwrap_or("-".into()),
            f(c.bgp_reroute_ms),
            f(c.first_answer_elsewhere_ms),
            f(c.bgp_return_ms),
            p(&c.ttfb_before),
            p(&c.ttfb_during),
            p(&c.ttfb_after)
        );
        for e in &c.errors {
            println!("       {e}");
        }
    }
    if let Some(w) = r.worst_bgp_reroute_ms {
        println!("\nslowest BGP reroute: {w:.0} ms after the event");
    }
}
