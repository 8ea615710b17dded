//! The live failover drill: bounded shopper load from every city, an event
//! on one region (a graceful drain, or a hard kill of the whole region
//! node), the restore, and a report of what shoppers saw.
//!
//! Shoppers behave like browser tabs, over the protocol chosen (`--proto`):
//! - `h1`, `h1-tls`: a persistent HTTP/1.1 connection (plain, or TLS with
//!   the lab's CA) per worker, a new one after `Connection: close`, and — as
//!   browsers do for idempotent requests (RFC 9112 §9.3.1) — one retry on a
//!   fresh connection when a *reused* connection fails before any response
//!   byte;
//! - `h2`: TLS with HTTP/2, each page load several streams at once on one
//!   connection, a new connection after a GOAWAY, and one retry on a new
//!   connection for streams the server refused unprocessed (above a GOAWAY's
//!   last stream id, `REFUSED_STREAM`) or that a reused connection lost
//!   before answering.
//!
//! Retries are counted and reported separately; a request that still fails
//! is a failure.
//!
//! While the load runs, every city's metro router is watched over its BIRD
//! control socket (every 10 ms), so the report has the moment BGP moved each
//! city, not only what the shoppers noticed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::lab::{LabState, enter_netns, kill_all};
use crate::probe::{H2Shopper, Probe, Shopper, is_reset};

/// The protocol shoppers load pages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Proto {
    /// HTTP/1.1 over plain TCP (port 80). Where the edge redirects plain
    /// HTTP to https, the redirect is the answer.
    H1,
    /// HTTP/1.1 over TLS (port 443, the lab's CA).
    #[value(name = "h1-tls")]
    H1Tls,
    /// HTTP/2 over TLS (port 443): several streams per connection at once.
    H2,
}

/// What happens to the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `edge-ctl drain`, then undrain.
    Drain,
    /// The node goes silent and edge, BIRD, health hook and replica are
    /// SIGKILLed at once (like pulling the power); then everything restarts.
    Kill,
    /// A graceful upgrade of the edge binary (`edge-ctl upgrade`): the
    /// region stays announced; nothing to restore.
    Upgrade,
    /// `drill origin` only: Patroni hands the leadership to the synchronous
    /// standby (planned). With `origin`, `kill` powers off the leader's host.
    Switchover,
}

/// Drill settings.
#[derive(Debug, Clone)]
pub struct Options {
    pub region: String,
    pub mode: Mode,
    /// Requests per second from each city.
    pub rate: f64,
    pub before: Duration,
    pub during: Duration,
    pub after: Duration,
    /// Cities by region code (all when empty).
    pub cities: Vec<String>,
    pub request_timeout: Duration,
    pub workers_per_city: usize,
    pub proto: Proto,
    /// HTTP/2: streams per page load (sent at once on one connection).
    pub streams_per_page: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub city: String,
    /// Start, ms after the drill began.
    pub t_ms: f64,
    pub done_ms: f64,
    pub ok: bool,
    pub status: u16,
    pub region: Option<String>,
    pub ttfb_ms: f64,
    pub retried: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteChange {
    /// The city whose metro router changed its best route.
    pub city: String,
    pub t_ms: f64,
    /// The region the anycast route now leads to (`None`: no route).
    pub region: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub n: usize,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CityReport {
    pub city: String,
    pub metro: String,
    pub requests: usize,
    pub failed: usize,
    pub retried: usize,
    pub errors: Vec<String>,
    pub before: Option<String>,
    pub during: Vec<String>,
    pub after: Option<String>,
    /// BGP moved this city's route away from the region, ms after the event.
    pub bgp_reroute_ms: Option<f64>,
    /// First answer from another region, ms after the event.
    pub first_answer_elsewhere_ms: Option<f64>,
    /// BGP brought the route back, ms after the restore began.
    pub bgp_return_ms: Option<f64>,
    pub ttfb_before: Percentiles,
    pub ttfb_during: Percentiles,
    pub ttfb_after: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub region: String,
    pub mode: Mode,
    pub proto: Proto,
    pub rate_per_city: f64,
    pub started_unix: u64,
    /// When the event began / finished (drain: drained; kill: processes killed).
    pub event_ms: f64,
    pub event_done_ms: f64,
    /// When the restore began / the region announced again.
    pub restore_ms: f64,
    pub restored_ms: f64,
    pub end_ms: f64,
    pub requests: usize,
    pub failed: usize,
    /// Requests that failed before the restore began (the drain or kill itself).
    pub failed_until_restore: usize,
    /// Requests that failed once the restore began (traffic moving home).
    pub failed_after_restore: usize,
    pub retried: usize,
    /// The slowest BGP reroute among cities that moved.
    pub worst_bgp_reroute_ms: Option<f64>,
    pub cities: Vec<CityReport>,
    pub route_changes: Vec<RouteChange>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| -> Option<f64> {
        (!v.is_empty()).then(|| v[((v.len() as f64 - 1.0) * q).round() as usize])
    };
    Percentiles {
        n: v.len(),
        p50_ms: at(0.5),
        p95_ms: at(0.95),
    }
}

/// The region an AS path leads to: the AS just before the origin AS is a
/// metro AS (one per region); a path of only the origin AS is this metro's own.
pub fn region_of_path(state: &LabState, own: &str, path: &[u32]) -> Option<String> {
    let idx = path.iter().position(|a| *a == state.origin_asn)?;
    if idx == 0 {
        return Some(own.to_owned());
    }
    let asn = path[idx - 1];
    state
        .regions
        .iter()
        .find(|r| r.asn == asn)
        .map(|r| r.code.clone())
}

struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// One request's sample.
fn sample(
    city: &str,
    t0: Instant,
    start: Instant,
    retried: bool,
    r: Result<Probe, String>,
) -> Sample {
    match r {
        Ok(p) => Sample {
            city: city.to_owned(),
            t_ms: ms(start - t0),
            done_ms: ms(t0.elapsed()),
            ok: answered(&p),
            status: p.status,
            ttfb_ms: ms(p.ttfb),
            retried,
            error: (!answered(&p)).then(|| format!("HTTP {}", p.status)),
            region: p.region,
        },
        Err(e) => Sample {
            city: city.to_owned(),
            t_ms: ms(start - t0),
            done_ms: ms(t0.elapsed()),
            ok: false,
            status: 0,
            region: None,
            ttfb_ms: 0.0,
            retried,
            error: Some(e),
        },
    }
}

/// Whether the edge answered the page: 200, or — over plain HTTP to a name
/// with a certificate — its redirect to https (what a browser then follows).
fn answered(p: &Probe) -> bool {
    p.status == 200
        || (matches!(p.status, 301 | 308)
            && p.location
                .as_deref()
                .is_some_and(|l| l.starts_with("https://")))
}

/// A city's schedule of page loads, shared by its workers: load `k` is due
/// at `t0 + k / per_second`; none after the budget, the time limit or stop.
struct Pace {
    t0: Instant,
    per_second: f64,
    budget: u64,
    total: Duration,
    next: AtomicU64,
    stop: Arc<AtomicBool>,
}

impl Pace {
    /// The next load's due time, or `None` when the load is over.
    fn take(&self) -> Option<Instant> {
        let k = self.next.fetch_add(1, Ordering::SeqCst);
        (k < self.budget && !self.over())
            .then(|| self.t0 + Duration::from_secs_f64(k as f64 / self.per_second))
    }

    fn over(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.t0.elapsed() > self.total
    }
}

fn start_load(
    state: &LabState,
    o: &Options,
    cities: &[(String, String)],
    t0: Instant,
) -> Result<Load> {
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let total = o.before + o.during + o.after + Duration::from_secs(180);
    let (port, tls) = match o.proto {
        Proto::H1 => (80, None),
        Proto::H1Tls => (
            443,
            Some(crate::probe::tls_client(&state.ca_pem, &[b"http/1.1"])?),
        ),
        Proto::H2 => (
            443,
            Some(crate::probe::tls_client(&state.ca_pem, &[b"h2"])?),
        ),
    };
    // A page load is one request over HTTP/1.1, several streams over HTTP/2.
    let streams = if o.proto == Proto::H2 {
        o.streams_per_page.max(1)
    } else {
        1
    };
    let per_second = o.rate / streams as f64;
    let mut threads = Vec::new();
    for (code, ns) in cities {
        // Hard bounds: a budget of page loads per city and a time limit.
        let pace = Arc::new(Pace {
            t0,
            per_second,
            budget: (per_second * total.as_secs_f64()).ceil() as u64,
            total,
            next: AtomicU64::new(0),
            stop: stop.clone(),
        });
        let samples = samples.clone();
        let (code, ns) = (code.clone(), ns.clone());
        let addr = SocketAddr::from((state.anycast, port));
        let host = state.demo_host.clone();
        let (workers, timeout, proto, tls) = (
            o.workers_per_city.max(1),
            o.request_timeout,
            o.proto,
            tls.clone(),
        );
        threads.push(std::thread::spawn(move || {
            if let Err(e) = enter_netns(&ns) {
                eprintln!("drill: {code}: {e:#}");
                return;
            }
            let push = |s: Sample| samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
            match (proto, tls) {
                (Proto::H2, Some(tls)) => {
                    // One thread per city (sockets are made in its namespace),
                    // the workers as tasks on it.
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            eprintln!("drill: {code}: {e}");
                            return;
                        }
                    };
                    let paths = vec!["/"; streams];
                    rt.block_on(futures_util::future::join_all((0..workers).map(|_| {
                        let (pace, tls, paths, code, push) =
                            (pace.clone(), tls.clone(), &paths, &code, &push);
                        let host = host.clone();
                        async move {
                            let mut shopper = H2Shopper::new(addr, &host, timeout, tls);
                            while let Some(due) = pace.take() {
                                tokio::time::sleep_until(due.into()).await;
                                if pace.over() {
                                    return;
                                }
                                let start = Instant::now();
                                for out in shopper.page(paths).await {
                                    push(sample(code, t0, start, out.retried, out.result));
                                }
                            }
                        }
                    })));
                }
                (_, tls) => {
                    std::thread::scope(|scope| {
                        for _ in 0..workers {
                            let (pace, tls, code, push, host) =
                                (&pace, tls.clone(), &code, &push, &host);
                            scope.spawn(move || {
                                let mut shopper = Shopper::new(addr, host, timeout);
                                if let Some(tls) = tls {
                                    shopper = shopper.with_tls(tls);
                                }
                                while let Some(due) = pace.take() {
                                    let now = Instant::now();
                                    if due > now {
                                        std::thread::sleep(due - now);
                                    }
                                    if pace.over() {
                                        return;
                                    }
                                    let start = Instant::now();
                                    let mut r = shopper.get("/");
                                    let mut retried = false;
                                    if let Err(e) = &r
                                        && shopper.last_reused
                                        && !shopper.last_got_bytes
                                        && is_reset(e)
                                    {
                                        // A reused connection failed before any byte: retry
                                        // once on a fresh connection, as browsers do.
                                        retried = true;
                                        r = shopper.get("/");
                                    }
                                    push(sample(
                                        code,
                                        t0,
                                        start,
                                        retried,
                                        r.map_err(|e| e.to_string()),
                                    ));
                                }
                            });
                        }
                    });
                }
            }
        }));
    }
    Ok(Load {
        stop,
        samples,
        threads,
    })
}

async fn watch_routes(
    state: LabState,
    cities: Vec<(String, String)>,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<RouteChange> {
    let mut changes = Vec::new();
    let mut conns: BTreeMap<String, edgefront_health::bird::Bird> = BTreeMap::new();
    let mut last: BTreeMap<String, Option<String>> = BTreeMap::new();
    let prefix = format!("{}/32", state.anycast);
    while !stop.load(Ordering::Relaxed) {
        for (code, _) in &cities {
            let Ok(r) = state.region(code) else { continue };
            if !conns.contains_key(code) {
                match edgefront_health::bird::Bird::connect(
                    &r.metro_bird_socket,
                    Duration::from_millis(500),
                )
                .await
                {
                    Ok(b) => {
                        conns.insert(code.clone(), b);
                    }
                    Err(_) => continue,
                }
            }
            let Some(b) = conns.get_mut(code) else {
                continue;
            };
            match b.best_as_path(&prefix).await {
                Ok(path) => {
                    let region = path.and_then(|p| region_of_path(&state, code, &p));
                    if last.get(code) != Some(&region) {
                        changes.push(RouteChange {
                            city: code.clone(),
                            t_ms: ms(t0.elapsed()),
                            region: region.clone(),
                        });
                        last.insert(code.clone(), region);
                    }
                }
                Err(_) => {
                    conns.remove(code);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    changes
}

/// Stops a lab region's replica (its edge then has no database to read):
/// a server the lab runs itself stops with `pg_ctl -m immediate`; a member
/// of the lab's Patroni cluster stops the way its unit would (SIGTERM:
/// Patroni stops PostgreSQL, then exits), so that Patroni does not start it
/// again. Returns once nothing of it runs; start it again with its
/// service (`replica-<region>`). Not in Patroni's maintenance mode: Patroni
/// then exits on SIGTERM and leaves PostgreSQL running (this fails after
/// 30 s).
pub fn stop_replica(state: &LabState, code: &str) -> Result<()> {
    let r = state.region(code)?;
    let name = format!("replica-{code}");
    let svc = state
        .services
        .iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no {name} service in the lab state"))?;
    if let Some(i) = svc.argv.iter().position(|a| a == "-D") {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &r.node_ns, "runuser", "-u", "postgres", "--",
            ])
            .arg(format!("{}/pg_ctl", crate::lab::PG_BIN))
            .args(["-D", &svc.argv[i + 1], "-m", "immediate", "-w", "stop"])
            .output()?;
        if !out.status.success() {
            bail!("{name}: {}", String::from_utf8_lossy(&out.stderr));
        }
        return Ok(());
    }
    for pid in crate::lab::pids_named(&r.node_ns, &["patroni"]) {
        // Gone already is fine.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !crate::lab::pids_named(&r.node_ns, &["patroni", "postgres"]).is_empty() {
        if Instant::now() > deadline {
            bail!("{name}: Patroni or PostgreSQL still runs 30 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Makes the region node silent (its uplink address removed, so not even a
/// TCP reset or BGP notification leaves it) and SIGKILLs everything in it.
pub fn kill_region(state: &LabState, code: &str) -> Result<usize> {
    let r = state.region(code)?;
    let out = std::process::Command::new("ip")
        .args(["-n", &r.node_ns, "addr", "flush", "dev", "uplink"])
        .output()?;
    if !out.status.success() {
        bail!(
            "silencing {}: {}",
            r.node_ns,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(kill_all(&r.node_ns))
}

/// What a graceful upgrade of an edge took.
#[derive(Debug, Clone, Serialize)]
pub struct Upgraded {
    pub region: String,
    pub old_pid: i32,
    pub new_pid: i32,
    /// From starting the new process to it waiting on the upgrade socket,
    /// ready to take the listening sockets (the hand-over follows SIGQUIT).
    pub ready_ms: f64,
    /// From SIGQUIT to the old process gone (it finishes what is in flight).
    pub old_exit_ms: f64,
}

/// Upgrades a lab region's edge in place, pingora's way: a new process
/// (the same command with `--upgrade`) waits on the upgrade socket; the old
/// one gets SIGQUIT, hands over its listening sockets, stops taking new
/// requests (keep-alive off, GOAWAY), finishes what is in flight and exits.
/// The route never moves. The binary is whatever the service's path holds
/// now (replace it first to upgrade to a new build).
pub fn upgrade_edge(state: &LabState, code: &str) -> Result<Upgraded> {
    let r = state.region(code)?;
    let svc = state
        .services
        .iter()
        .find(|s| s.name == format!("edge-{code}"))
        .with_context(|| format!("no edge service for {code} in the lab state"))?;
    let old = match crate::lab::pids_named(&r.node_ns, &["edge"])[..] {
        [pid] => pid,
        [] => bail!("{code}: no edge process is running (restore the region first)"),
        ref many => bail!(
            "{code}: {} edge processes ({many:?}): an upgrade is already under way",
            many.len()
        ),
    };
    // The edge's upgrade socket: $TMPDIR/edgefront-edge-<region>-<listen port>.upgrade.sock,
    // with the service's TMPDIR and the listen port of its configuration.
    let tmp = svc
        .env
        .iter()
        .find(|(k, _)| k == "TMPDIR")
        .map_or_else(std::env::temp_dir, |(_, v)| std::path::PathBuf::from(v));
    let port = svc
        .argv
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| svc.argv.get(i + 1))
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|cfg| cfg.get("listen")?.as_str()?.parse::<SocketAddr>().ok())
        .map_or(80, |a| a.port());
    let sock = tmp.join(format!("edgefront-edge-{code}-{port}.upgrade.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut next = svc.clone();
    next.argv.push("--upgrade".into());
    let start = Instant::now();
    let mut child = next.start()?.context("the edge service is a daemon")?;
    let new_pid = child.id() as i32;
    let deadline = start + Duration::from_secs(30);
    while !sock.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the new edge exited with {status}; see {}",
                svc.log.display()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "the new edge never listened on {}; see {}",
                sock.display(),
                svc.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let handover = start.elapsed();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGQUIT,
    )
    .with_context(|| format!("SIGQUIT to the old edge {old}"))?;
    let quit = Instant::now();
    while !dead(old) {
        if quit.elapsed() > Duration::from_secs(90) {
            bail!("the old edge {old} is still running 90 s after SIGQUIT");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Detached: the new edge outlives edge-ctl.
    std::mem::forget(child);
    Ok(Upgraded {
        region: code.to_owned(),
        old_pid: old,
        new_pid,
        ready_ms: ms(handover),
        old_exit_ms: ms(quit.elapsed()),
    })
}

/// Brings a killed region node back: its uplink, then replica, BIRD, edge
/// and health hook (BIRD starts withdrawn; the hook announces when healthy).
pub fn restore_region(state: &LabState, code: &str) -> Result<()> {
    let r = state.region(code)?;
    for args in [
        vec![
            "addr",
            "replace",
            &format!("{}/31", r.node_link_ip),
            "dev",
            "uplink",
        ],
        vec![
            "route",
            "replace",
            "default",
            "via",
            &r.metro_link_ip.to_string(),
        ],
    ] {
        let out = std::process::Command::new("ip")
            .args(["-n", &r.node_ns])
            .args(&args)
            .output()?;
        if !out.status.success() {
            bail!(
                "restoring {}: {}",
                r.node_ns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let mut services: Vec<_> = state
        .services
        .iter()
        .filter(|s| s.region.as_deref() == Some(code))
        .collect();
    let rank = |n: &str| {
        ["replica-", "bird-", "edge-", "health-"]
            .iter()
            .position(|p| n.starts_with(p))
            .unwrap_or(9)
    };
    services.sort_by_key(|s| rank(&s.name));
    for s in &services {
        if let Some(i) = s.argv.iter().position(|a| a == "-D") {
            clear_stale_pidfile(Path::new(&s.argv[i + 1]))?;
        }
    }
    for s in services {
        // Detached: the restarted processes outlive edge-ctl.
        if let Some(child) = s.start()? {
            std::mem::forget(child);
        }
    }
    Ok(())
}

/// Whether `pid` is gone or a zombie (killed, not yet reaped by its parent).
pub fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S …": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|st| st == "Z" || st == "X"),
    }
}

/// A SIGKILLed postmaster leaves `postmaster.pid`; PostgreSQL refuses to
/// start while that PID exists, and a killed process can linger as a zombie
/// until its parent reaps it. Remove the file when its process is dead.
pub fn clear_stale_pidfile(data: &Path) -> Result<()> {
    let pidfile = data.join("postmaster.pid");
    let Ok(text) = std::fs::read_to_string(&pidfile) else {
        return Ok(());
    };
    let pid: i32 = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid > 0 && !dead(pid) {
        if Instant::now() > deadline {
            bail!(
                "{}: PostgreSQL (pid {pid}) is still running",
                data.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(&pidfile).with_context(|| pidfile.display().to_string())?;
    // The socket lock files of the same postmaster (in its socket directory,
    // the data directory's parent in the lab) block a restart the same way.
    let Some(sockets) = data.parent() else {
        return Ok(());
    };
    for entry in std::fs::read_dir(sockets).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(".s.PGSQL.") && name.ends_with(".lock")) {
            continue;
        }
        let owner: i32 = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            .unwrap_or(0);
        if owner == pid && dead(owner) {
            let _ = std::fs::remove_file(entry.path());
            let _ = std::fs::remove_file(sockets.join(name.trim_end_matches(".lock")));
        }
    }
    Ok(())
}

async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Runs a drill on a lab. `say` receives progress lines.
pub async fn run(state: &LabState, o: &Options, say: &(dyn Fn(String) + Sync)) -> Result<Report> {
    let target = state.region(&o.region)?.clone();
    let client = state.admin_client()?;
    let st = client
        .status(&target.health_url)
        .await
        .with_context(|| format!("{}: health hook", o.region))?;
    if !st.announced || st.drained {
        bail!(
            "{} is not serving (announced: {}, drained: {}): a drill starts from a healthy region",
            o.region,
            st.announced,
            st.drained
        );
    }
    let cities: Vec<(String, String)> = state
        .regions
        .iter()
        .filter(|r| o.cities.is_empty() || o.cities.contains(&r.code))
        .map(|r| (r.code.clone(), r.city_ns.clone()))
        .collect();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let t0 = Instant::now();
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_routes(
        state.clone(),
        cities.clone(),
        t0,
        stop_watch.clone(),
    ));
    let load = start_load(state, o, &cities, t0)?;
    say(format!(
        "drill {} ({:?}, {:?}): {} req/s from each of {} cities; {:.0}s before",
        o.region,
        o.mode,
        o.proto,
        o.rate,
        cities.len(),
        o.before.as_secs_f64()
    ));
    tokio::time::sleep(o.before).await;
    let event = t0.elapsed();
    let result = async {
        match o.mode {
            Mode::Drain => {
                client.drain(&target.health_url).await?;
                say(format!("+{:.2}s drain requested", event.as_secs_f64()));
            }
            Mode::Upgrade => {
                let (state2, code) = (state.clone(), o.region.clone());
                let u = tokio::task::spawn_blocking(move || upgrade_edge(&state2, &code)).await??;
                say(format!(
                    "+{:.2}s upgraded {}: new edge {} ready for the sockets in {:.0} ms; the old one ({}) handed them over, finished and exited {:.1} s after SIGQUIT",
                    event.as_secs_f64(),
                    o.region,
                    u.new_pid,
                    u.ready_ms,
                    u.old_pid,
                    u.old_exit_ms / 1e3
                ));
            }
            Mode::Switchover => bail!("--mode switchover is for `drill origin`"),
            Mode::Kill => {
                let n = kill_region(state, &o.region)?;
                say(format!(
                    "+{:.2}s {} node silenced and {n} processes killed",
                    event.as_secs_f64(),
                    o.region
                ));
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let event_done = t0.elapsed();
    if let Err(e) = result {
        load.stop.store(true, Ordering::Relaxed);
        stop_watch.store(true, Ordering::Relaxed);
        return Err(e.context("the drill's event failed; restore the region by hand"));
    }
    tokio::time::sleep(o.during).await;
    let restore = t0.elapsed();
    match o.mode {
        Mode::Upgrade | Mode::Switchover => {}
        Mode::Drain => {
            client.undrain(&target.health_url).await?;
        }
        Mode::Kill => {
            let (state2, code) = (state.clone(), o.region.clone());
            tokio::task::spawn_blocking(move || restore_region(&state2, &code)).await??;
        }
    }
    if o.mode != Mode::Upgrade {
        say(format!(
            "+{:.2}s restoring {}",
            restore.as_secs_f64(),
            o.region
        ));
    }
    wait_for(
        Duration::from_secs(90),
        "the region to announce again",
        || async {
            client
                .status(&target.health_url)
                .await
                .is_ok_and(|s| s.announced)
        },
    )
    .await?;
    let restored = t0.elapsed();
    if o.mode != Mode::Upgrade {
        say(format!(
            "+{:.2}s {} announced again",
            restored.as_secs_f64(),
            o.region
        ));
    }
    tokio::time::sleep(o.after).await;
    load.stop.store(true, Ordering::Relaxed);
    let end = t0.elapsed();
    for t in load.threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    stop_watch.store(true, Ordering::Relaxed);
    let changes = watcher.await.unwrap_or_default();
    let samples = std::mem::take(&mut *load.samples.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(report(
        o,
        &target.code,
        &cities,
        samples,
        changes,
        started_unix,
        event,
        event_done,
        restore,
        restored,
        end,
    ))
}

#[allow(clippy::too_many_arguments)]
fn report(
    o: &Options,
    region: &str,
    cities: &[(String, String)],
    samples: Vec<Sample>,
    changes: Vec<RouteChange>,
    started_unix: u64,
    event: Duration,
    event_done: Duration,
    restore: Duration,
    restored: Duration,
    end: Duration,
) -> Report {
    let (ev, rs, rd) = (ms(event), ms(restore), ms(restored));
    let mode = |v: Vec<&Sample>| -> Option<String> {
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for s in v {
            if let Some(r) = &s.region {
                *count.entry(r).or_default() += 1;
            }
        }
        count
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .map(|(r, _)| r.to_owned())
    };
    let mut out = Vec::new();
    for (code, _) in cities {
        let mine: Vec<&Sample> = samples.iter().filter(|s| &s.city == code).collect();
        let ok = |lo: f64, hi: f64| -> Vec<&Sample> {
            mine.iter()
                .copied()
                .filter(|s| s.ok && s.t_ms >= lo && s.t_ms < hi)
                .collect()
        };
        let before = mode(ok(0.0, ev));
        let mut during: Vec<String> = ok(ev, rs).iter().filter_map(|s| s.region.clone()).collect();
        during.sort();
        during.dedup();
        let after = mode(ok(rd + 1000.0, f64::MAX));
        let moved_away = changes
            .iter()
            .find(|c| &c.city == code && c.t_ms >= ev && c.region.as_deref() != Some(region));
        let came_back = changes
            .iter()
            .find(|c| &c.city == code && c.t_ms >= rs && c.region.as_deref() == Some(region));
        let was_home = before.as_deref() == Some(region);
        let failed: Vec<&&Sample> = mine.iter().filter(|s| !s.ok).collect();
        let mut errors: Vec<String> = failed
            .iter()
            .map(|s| format!("+{:.0}ms {}", s.t_ms, s.error.clone().unwrap_or_default()))
            .collect();
        errors.truncate(8);
        let ttfb = |v: Vec<&Sample>| percentiles(v.iter().map(|s| s.ttfb_ms).collect());
        out.push(CityReport {
            city: code.clone(),
            metro: code.clone(),
            requests: mine.len(),
            failed: failed.len(),
            retried: mine.iter().filter(|s| s.retried).count(),
            errors,
            before: before.clone(),
            during,
            after,
            bgp_reroute_ms: if was_home {
                moved_away.map(|c| c.t_ms - ev)
            } else {
                None
            },
            first_answer_elsewhere_ms: if was_home {
                mine.iter()
                    .filter(|s| s.ok && s.t_ms >= ev && s.region.as_deref() != Some(region))
                    .map(|s| s.done_ms - ev)
                    .reduce(f64::min)
            } else {
                None
            },
            bgp_return_ms: if was_home {
                came_back.map(|c| c.t_ms - rs)
            } else {
                None
            },
            ttfb_before: ttfb(ok(0.0, ev)),
            ttfb_during: ttfb(ok(ms(event_done), rs)),
            ttfb_after: ttfb(ok(rd + 1000.0, f64::MAX)),
        });
    }
    Report {
        region: region.to_owned(),
        mode: o.mode,
        proto: o.proto,
        rate_per_city: o.rate,
        started_unix,
        event_ms: ev,
        event_done_ms: ms(event_done),
        restore_ms: rs,
        restored_ms: rd,
        end_ms: ms(end),
        requests: samples.len(),
        failed: samples.iter().filter(|s| !s.ok).count(),
        // By when the failure happened: a request still in flight when the
        // restore began can be reset by the region coming back.
        failed_until_restore: samples.iter().filter(|s| !s.ok && s.done_ms < rs).count(),
        failed_after_restore: samples.iter().filter(|s| !s.ok && s.done_ms >= rs).count(),
        retried: samples.iter().filter(|s| s.retried).count(),
        worst_bgp_reroute_ms: out.iter().filter_map(|c| c.bgp_reroute_ms).reduce(f64::max),
        cities: out,
        route_changes: changes,
    }
}
