//! `edgefront-bench-flood`: legitimate shoppers during a flood of made-up
//! names (issue 13, item 6). Starts its own one-region stack (PostgreSQL
//! primary and replica over TLS, origin, an edge with TLS and its production
//! abuse limits), gives `--domains` stores a custom domain with a
//! certificate, then measures the shoppers twice for `--seconds` each:
//!
//! 1. idle, on a warm edge (every page and domain loaded once before);
//! 2. idle, on a freshly restarted edge (nothing in memory: every page's
//!    first load renders it, every custom domain's first handshake loads its
//!    certificate);
//! 3. on a freshly restarted edge while a flood of `--each` random `Host`s,
//!    `--each` random `/p/<slug>` of one store and `--each` random SNIs comes
//!    from `--addresses` loopback addresses (127.0.0.2 …).
//!
//! Shoppers: page loads over keep-alive HTTP/1.1 at a fixed rate from 4
//! addresses (127.0.1.1-4), and full TLS 1.3 handshakes + `GET /` to the
//! custom domains in turn from 20 addresses (127.0.2.1-20), on a runtime
//! and threads of their own (the flood runs on the main runtime).
//! Prints markdown: success, p50/p99 of both, what the flood got back, the
//! edge's RSS. Every loop is bounded in count and time.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use edgefront_tests::{Edge, Origin, Postgres, TestCa, client, free_port};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

const CERT_KEY: &str = "5e1f0a9d2c3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f708192a3b4c5d6e7f";
const INTERNAL_TOKEN: &str = "internal-token-for-bench-0123456789abcdef";
const STORE_HOST: &str = "spiceroute.example";

#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Seconds per phase.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Made-up names of each kind in the flood.
    #[arg(long, default_value_t = 10_000)]
    each: usize,
    /// Loopback addresses the flood comes from (127.0.0.2 …).
    #[arg(long, default_value_t = 64)]
    addresses: u8,
    /// Custom domains with certificates.
    #[arg(long, default_value_t = 20)]
    domains: usize,
    /// Shopper page loads per second.
    #[arg(long, default_value_t = 200)]
    page_rate: u64,
    /// Shopper handshakes per second.
    #[arg(long, default_value_t = 10)]
    handshake_rate: u64,
    /// Concurrent flood workers per kind.
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Niceness of the flood's process (`nice -n`). On a real network the
    /// flood's client is not on the edge's machine; here it shares the 2
    /// cores, and 0 lets it take CPU from the edge and the shoppers as an
    /// equal.
    #[arg(long, default_value_t = 10)]
    flood_nice: i32,
    /// Flood requests per second of each kind; 0: as fast as the workers
    /// go. Default: `--each` spread over `--seconds`, so the flood lasts the
    /// whole measured phase.
    #[arg(long)]
    flood_rate: Option<f64>,
    /// Internal: run only the flood, against `<edge url> <tls port> <CA
    /// file>`, for `--seconds` at most, and print what it got back as JSON.
    #[arg(long, hide = true, num_args = 3, value_names = ["EDGE", "TLS_PORT", "CA"])]
    flood_only: Option<Vec<String>>,
}

/// Latencies (ms) and failures of one kind of shopper request.
#[derive(Default)]
struct Samples {
    ok: Vec<f64>,
    /// (latency ms, seconds into the phase, index) of each success.
    when: Vec<(f64, f64, usize)>,
    start: Option<Instant>,
    failed: u64,
    first_failure: Option<String>,
}

impl Samples {
    fn record(&mut self, t: Instant, r: Result<()>) {
        let start = *self.start.get_or_insert(t);
        match r {
            Ok(()) => {
                let ms = t.elapsed().as_secs_f64() * 1e3;
                self.ok.push(ms);
                let i = self.when.len();
                self.when.push((ms, (t - start).as_secs_f64(), i));
            }
            Err(e) => {
                self.failed += 1;
                self.first_failure.get_or_insert(format!("{e:#}"));
            }
        }
    }

    /// The slowest successes: "ms at s (#i)".
    fn slowest(&self, n: usize) -> String {
        let mut w = self.when.clone();
        w.sort_by(|a, b| b.0.total_cmp(&a.0));
        w.iter()
            .take(n)
            .map(|(ms, at, i)| format!("{ms:.1} ms at {at:.1} s (#{i})"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn pct(&self, q: f64) -> f64 {
        self.pct_within(q, f64::INFINITY)
    }

    /// The `q` quantile of the successes that started within `secs` of the
    /// phase's start.
    fn pct_within(&self, q: f64, secs: f64) -> f64 {
        self.pct_between(q, f64::NEG_INFINITY, secs)
    }

    /// The `q` quantile of the successes that started between `from` and
    /// `to` seconds after the phase's start.
    fn pct_between(&self, q: f64, from: f64, to: f64) -> f64 {
        let mut v: Vec<f64> = self
            .when
            .iter()
            .filter(|(_, at, _)| *at >= from && *at < to)
            .map(|(ms, _, _)| *ms)
            .collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() as f64 - 1.0) * q).round() as usize]
    }

    fn cells(&self) -> String {
        let n = self.ok.len() as u64 + self.failed;
        format!(
            "{n} | {:.2} % | {:.2} | {:.2}",
            100.0 * self.ok.len() as f64 / n.max(1) as f64,
            self.pct(0.5),
            self.pct(0.99)
        )
    }
}

fn roots(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// A full handshake from `source` to `addr` naming `sni`, then `GET /`
/// read to the end (`Connection: close`); Ok on a 200.
fn handshake(
    source: Ipv4Addr,
    addr: SocketAddr,
    sni: &str,
    cfg: &Arc<rustls::ClientConfig>,
) -> Result<()> {
    // std cannot bind before connecting; socket2 can.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::from((source, 0)).into())?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    let mut sock = std::net::TcpStream::from(sock);
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    sock.set_nodelay(true)?;
    let mut conn =
        rustls::ClientConnection::new(cfg.clone(), ServerName::try_from(sni.to_owned())?)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    conn.writer().write_all(
        format!("GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let mut head = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match std::io::Read::read(&mut tls, &mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if head.len() < 32 {
                    head.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    Ok(())
}

/// CPU seconds (user + system) used so far by `pid` (`self` for this process).
fn cpu_seconds(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0)
}

struct Stack {
    edge: Option<Edge>,
    replica: Postgres,
    origin: Origin,
    _primary: Postgres,
    tls_port: u16,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Stack {
    fn start_edge(&mut self) -> Result<()> {
        self.edge = None;
        let edge = Edge::builder("ams1", &self.replica.url(), self.origin.addr)
            .listen(self.listen, self.admin)
            .arg("--tls-listen")
            .arg(&format!("127.0.0.1:{}", self.tls_port))
            .arg("--cert-key")
            .arg(CERT_KEY)
            .production_limits()
            .run()?;
        // Shoppers come once the edge says healthy, as the health hook
        // announces it (after its warm-up: pools open, domain set loaded).
        let admin = edge.admin_url().trim_start_matches("http://").to_owned();
        let healthy = || -> Option<bool> {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect(&admin).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").ok()?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head).ok()?;
            Some(&head[9..12] == b"200")
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while healthy() != Some(true) {
            anyhow::ensure!(Instant::now() < deadline, "the edge never said healthy");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.edge = Some(edge);
        Ok(())
    }
}

/// [`shoppers`] on a runtime of their own (one worker thread, and its
/// blocking pool for the handshakes): the flood's tasks, on the main
/// runtime, never queue ahead of a shopper's in this process. On a real
/// network the flood's client is not on the shoppers' machine; both still
/// share the 2 cores with the edge here.
fn shoppers_apart(
    stack: &Stack,
    pages: &[String],
    domains: &[String],
    ca: &Arc<rustls::ClientConfig>,
    cli: &Cli,
) -> Result<(Samples, Samples)> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("shoppers")
                .enable_all()
                .build()?
                .block_on(shoppers(stack, pages, domains, ca, cli))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the shoppers' thread panicked"))?
    })
}

/// Shoppers for `secs`: pages at `page_rate`/s from 4 keep-alive clients,
/// handshakes at `handshake_rate`/s over the custom domains.
async fn shoppers(
    stack: &Stack,
    pages: &[String],
    domains: &[String],
    ca: &Arc<rustls::ClientConfig>,
    cli: &Cli,
) -> Result<(Samples, Samples)> {
    let edge = stack.edge.as_ref().context("edge")?.url();
    let deadline = Instant::now() + Duration::from_secs(cli.seconds);
    let page_samples = Arc::new(Mutex::new(Samples::default()));
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let (edge, pages, samples) = (edge.clone(), pages.to_vec(), page_samples.clone());
        let every = Duration::from_micros(4_000_000 / cli.page_rate.max(1));
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + w as u8)))
                .build()
                .unwrap_or_default();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = w as usize;
            while Instant::now() < deadline {
                tick.tick().await;
                let path = &pages[i % pages.len()];
                i += 1;
                let t = Instant::now();
                let r = async {
                    let r = http
                        .get(format!("{edge}{path}"))
                        .header("host", STORE_HOST)
                        .send()
                        .await?;
                    let s = r.status();
                    let _ = r.bytes().await?;
                    anyhow::ensure!(s.is_success(), "{path}: {s}");
                    Ok(())
                }
                .await;
                if let Ok(mut s) = samples.lock() {
                    s.record(t, r);
                }
            }
        }));
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], stack.tls_port));
    let (domains, ca, rate) = (domains.to_vec(), ca.clone(), cli.handshake_rate.max(1));
    let hs = tokio::task::spawn_blocking(move || {
        let mut s = Samples::default();
        let every = Duration::from_micros(1_000_000 / rate);
        let mut i = 0;
        while Instant::now() < deadline {
            let t = Instant::now();
            let source = Ipv4Addr::new(127, 0, 2, 1 + (i % 20) as u8);
            let r = handshake(source, addr, &domains[i % domains.len()], &ca);
            s.record(t, r);
            i += 1;
            std::thread::sleep(every.saturating_sub(t.elapsed()));
        }
        s
    });
    for t in tasks {
        t.await?;
    }
    let hs = hs.await?;
    let pages = std::mem::take(&mut *page_samples.lock().map_err(|_| anyhow::anyhow!("lock"))?);
    Ok((pages, hs))
}

/// What the flood got back, by kind and outcome.
type Outcomes = Arc<Mutex<BTreeMap<(String, String), u64>>>;

fn count(o: &Outcomes, kind: &str, outcome: String) {
    if let Ok(mut m) = o.lock() {
        *m.entry((kind.to_owned(), outcome)).or_default() += 1;
    }
}

/// The flood: `each` made-up hosts, slugs and SNIs from `addresses`
/// loopback addresses, `workers` at a time per kind, until done or `stop`.
fn flood(
    edge: &str,
    tls: SocketAddr,
    cli: &Cli,
    ca: &Arc<rustls::ClientConfig>,
    stop: Arc<AtomicBool>,
    outcomes: Outcomes,
) -> Vec<tokio::task::JoinHandle<()>> {
    let source = |n: u64, addresses: u8| Ipv4Addr::new(127, 0, 0, 2 + (n % addresses as u64) as u8);
    let clients: Arc<Vec<reqwest::Client>> = Arc::new(
        (0..cli.addresses)
            .map(|a| {
                reqwest::Client::builder()
                    .no_proxy()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(Duration::from_secs(10))
                    .local_address(IpAddr::V4(source(a as u64, cli.addresses)))
                    .build()
                    .unwrap_or_default()
            })
            .collect(),
    );
    // Request n of a kind starts no earlier than start + n / rate.
    let rate = cli
        .flood_rate
        .unwrap_or(cli.each as f64 / cli.seconds.max(1) as f64);
    let start = Instant::now();
    let not_before =
        move |n: u64| (rate > 0.0).then(|| start + Duration::from_secs_f64(n as f64 / rate));
    let mut tasks = Vec::new();
    for kind in ["host", "slug"] {
        let next = Arc::new(AtomicU64::new(0));
        for _ in 0..cli.workers {
            let (edge, clients, next, stop, outcomes) = (
                edge.to_owned(),
                clients.clone(),
                next.clone(),
                stop.clone(),
                outcomes.clone(),
            );
            let each = cli.each as u64;
            tasks.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= each || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(t) = not_before(n) {
                        tokio::time::sleep_until(t.into()).await;
                    }
                    let c = &clients[(n % clients.len() as u64) as usize];
                    let name = uuid::Uuid::new_v4().simple().to_string();
                    let req = match kind {
                        "host" => c
                            .get(format!("{edge}/"))
                            .header("host", format!("{name}.example")),
                        _ => c.get(format!("{edge}/p/{name}")).header("host", STORE_HOST),
                    };
                    let outcome = match req.send().await {
                        Ok(r) => {
                            let s = r.status().as_u16().to_string();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(e) => format!(
                            "error: {}",
                            if e.is_timeout() {
                                "timeout"
                            } else {
                                "connect/io"
                            }
                        ),
                    };
                    count(&outcomes, kind, outcome);
                }
            }));
        }
    }
    let next = Arc::new(AtomicU64::new(0));
    for _ in 0..cli.workers.div_ceil(2) {
        let (next, stop, outcomes, ca) = (next.clone(), stop.clone(), outcomes.clone(), ca.clone());
        let (each, addresses) = (cli.each as u64, cli.addresses);
        tasks.push(tokio::task::spawn_blocking(move || {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= each || stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Some(t) = not_before(n) {
                    std::thread::sleep(t.saturating_duration_since(Instant::now()));
                }
                let name = format!("{}.example", uuid::Uuid::new_v4().simple());
                let outcome = match handshake(source(n, addresses), tls, &name, &ca) {
                    Ok(()) => "handshake ok (!)".to_owned(),
                    Err(e) if format!("{e:#}").contains("alert") => {
                        "refused (TLS alert)".to_owned()
                    }
                    Err(_) => "refused (other)".to_owned(),
                };
                count(&outcomes, "sni", outcome);
            }
        }));
    }
    tasks
}

/// The flood's process (`--flood-only`): floods until done or
/// `--seconds`, then prints `{"outcomes": [[kind, outcome, n]…],
/// "cpu_seconds": s, "seconds": how long it ran, "done": bool}`.
async fn flood_only(cli: &Cli, args: &[String]) -> Result<()> {
    let [edge, tls_port, ca] = args else {
        anyhow::bail!("--flood-only takes an edge URL, a TLS port and a CA file");
    };
    let tls = SocketAddr::from(([127, 0, 0, 1], tls_port.parse::<u16>()?));
    let ca = roots(std::path::Path::new(ca))?;
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Outcomes = Arc::default();
    let start = Instant::now();
    let started_unix = unix_now();
    let tasks = flood(edge, tls, cli, &ca, stop.clone(), outcomes.clone());
    let deadline = start + Duration::from_secs(cli.seconds);
    while Instant::now() < deadline && !tasks.iter().all(|t| t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = tasks.iter().all(|t| t.is_finished());
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let outcomes: Vec<(String, String, u64)> = outcomes
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .iter()
        .map(|((k, o), n)| (k.clone(), o.clone(), *n))
        .collect();
    println!(
        "{}",
        serde_json::json!({ "outcomes": outcomes, "cpu_seconds": cpu_seconds("self"), "started_unix": started_unix, "seconds": seconds, "done": done })
    );
    Ok(())
}

/// Seconds since the Unix epoch: a clock both processes share.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The flood's process; killed if dropped before its report was read (the
/// bench failed meanwhile).
struct FloodChild(Option<std::process::Child>);

impl FloodChild {
    /// Waits for the flood's end (its own deadline) and reads its report.
    fn report(mut self) -> Result<serde_json::Value> {
        let child = self.0.take().context("the flood's process")?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(out.status.success(), "the flood's process failed");
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Drop for FloodChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the flood in a process of its own at `--flood-nice`.
fn spawn_flood(cli: &Cli, stack: &Stack, ca: &std::path::Path) -> Result<FloodChild> {
    let edge = stack.edge.as_ref().context("edge")?.url();
    Ok(FloodChild(Some(
        std::process::Command::new("nice")
            .args(["-n", &cli.flood_nice.to_string()])
            .arg(std::env::current_exe()?)
            .args([
                "--seconds",
                &cli.seconds.to_string(),
                "--each",
                &cli.each.to_string(),
                "--addresses",
                &cli.addresses.to_string(),
                "--workers",
                &cli.workers.to_string(),
                "--flood-rate",
                &cli.flood_rate
                    .unwrap_or(cli.each as f64 / cli.seconds.max(1) as f64)
                    .to_string(),
                "--flood-only",
                &edge,
                &stack.tls_port.to_string(),
            ])
            .arg(ca)
            .stdout(std::process::Stdio::piped())
            .spawn()?,
    )))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(args) = &cli.flood_only {
        return flood_only(&cli, args).await;
    }
    let platform = edgefront_regions::Regions::builtin()?
        .network
        .platform_domain;
    let primary = Postgres::primary()?;
    let origin = Origin::start_with(
        &primary.url(),
        &platform,
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        &["--internal-token", INTERNAL_TOKEN, "--cert-key", CERT_KEY],
    )?;
    let replica = primary.replica("ams1")?;
    Origin::seed_demo(&primary.url(), &platform)?;
    let ca = TestCa::new()?;
    let ca_file = tempfile::NamedTempFile::new()?;
    std::fs::write(ca_file.path(), &ca.pem)?;
    let mut domains = Vec::new();
    eprintln!(
        "bench-flood: {} custom domains with certificates",
        cli.domains
    );
    for i in 0..cli.domains {
        let v: serde_json::Value = client()
            .post(format!("{}/api/stores", origin.url()))
            .json(&serde_json::json!({ "name": format!("Flood shop {i}"), "slug": format!("flood-shop-{i}"), "currency": "EUR" }))
            .send()
            .await?
            .json()
            .await?;
        let token = v["token"].as_str().context("token")?.to_owned();
        let name = format!("flood-shop-{i}.example");
        origin.attach_proven(&token, &name).await?;
        let (chain, key) = ca.leaf(&[&name])?;
        let r = origin
            .internal_client("ams1")?
            .put(format!(
                "{}/internal/certificates/{name}",
                origin.internal_url()?
            ))
            .bearer_auth(INTERNAL_TOKEN)
            .json(&serde_json::json!({ "chain_pem": chain, "key_pem": key }))
            .send()
            .await?;
        anyhow::ensure!(
            r.status().is_success(),
            "certificate for {name}: {}",
            r.status()
        );
        domains.push(name);
    }
    let mut stack = Stack {
        edge: None,
        replica,
        origin,
        _primary: primary,
        tls_port: free_port(),
        listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
        admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
    };
    stack.start_edge()?;
    let tls = roots(ca_file.path())?;
    // The shoppers' pages: the store's home, categories and products.
    let home = client()
        .get(format!("{}/", stack.edge.as_ref().context("edge")?.url()))
        .header("host", STORE_HOST)
        .send()
        .await?
        .text()
        .await?;
    let mut pages = vec!["/".to_owned()];
    for part in home.split("href=\"").skip(1) {
        let link = part.split('"').next().unwrap_or("");
        if (link.starts_with("/p/") || link.starts_with("/c/")) && !pages.iter().any(|p| p == link)
        {
            pages.push(link.to_owned());
        }
    }
    eprintln!(
        "bench-flood: idle phase ({} s, {} pages)",
        cli.seconds,
        pages.len()
    );
    // Warm: every page and domain once.
    shoppers_apart(
        &stack,
        &pages,
        &domains,
        &tls,
        &Cli {
            seconds: 2,
            ..Cli::parse()
        },
    )?;
    let (warm_pages, warm_hs) = shoppers_apart(&stack, &pages, &domains, &tls, &cli)?;
    eprintln!("bench-flood: restarted, idle");
    stack.start_edge()?;
    let pid = stack.edge.as_ref().map(|e| e.proc.pid()).unwrap_or(0);
    let rss_idle_before = edgefront_tests::rss_kib(pid);
    let (idle_pages, idle_hs) = shoppers_apart(&stack, &pages, &domains, &tls, &cli)?;
    let rss_idle = edgefront_tests::rss_kib(pid);

    eprintln!(
        "bench-flood: restarting the edge, then the flood ({} each)",
        cli.each
    );
    stack.start_edge()?;
    let pid = stack.edge.as_ref().map(|e| e.proc.pid()).unwrap_or(0);
    let rss_fresh = edgefront_tests::rss_kib(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let flood_start = Instant::now();
    let (edge_cpu0, bench_cpu0) = (cpu_seconds(&pid.to_string()), cpu_seconds("self"));
    let flood_child = spawn_flood(&cli, &stack, ca_file.path())?;
    let rss_max = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (rss_max, stop) = (rss_max.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                rss_max.fetch_max(edgefront_tests::rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let shoppers_began = unix_now();
    let (flood_pages, flood_hs) = shoppers_apart(&stack, &pages, &domains, &tls, &cli)?;
    // The flood ends by itself at the same deadline; its report is one line.
    let report = flood_child.report()?;
    stop.store(true, Ordering::Relaxed);
    let flood_secs = flood_start.elapsed().as_secs_f64();
    let edge_cpu = cpu_seconds(&pid.to_string()) - edge_cpu0;
    let shoppers_cpu = cpu_seconds("self") - bench_cpu0;
    let flood_cpu = report["cpu_seconds"].as_f64().unwrap_or(0.0);
    let flood_done = report["done"].as_bool().unwrap_or(false);
    let flood_ran = report["seconds"].as_f64().unwrap_or(flood_secs);
    // The flood's window on the shoppers' clock (its process starts later).
    let flood_from = report["started_unix"].as_f64().unwrap_or(shoppers_began) - shoppers_began;
    let flood_to = flood_from + flood_ran;
    let outcomes: Vec<(String, String, u64)> =
        serde_json::from_value(report["outcomes"].clone()).unwrap_or_default();
    sampler.await?;
    let rss_after = edgefront_tests::rss_kib(pid);
    let metrics = match async {
        client()
            .get(format!("http://{}/metrics", stack.admin))
            .send()
            .await?
            .text()
            .await
    }
    .await
    {
        Ok(m) => m,
        Err(e) => {
            // Say why, and whether the edge still runs, rather than lose the run.
            let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
            let log = stack
                .edge
                .as_ref()
                .map(|e| e.proc.log())
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "bench-flood: the edge's metrics could not be read ({e}); edge process alive: {alive}; its log's last lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            String::new()
        }
    };

    println!(
        "| phase | page loads | success | p50 ms | p99 ms | handshakes (full, + GET /) | success | p50 ms | p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| idle, warm edge | {} | {} |",
        warm_pages.cells(),
        warm_hs.cells()
    );
    println!(
        "| idle, restarted edge | {} | {} |",
        idle_pages.cells(),
        idle_hs.cells()
    );
    println!(
        "| flood, restarted edge | {} | {} |",
        flood_pages.cells(),
        flood_hs.cells()
    );
    for (what, s) in [
        ("warm pages", &warm_pages),
        ("warm handshakes", &warm_hs),
        ("idle pages", &idle_pages),
        ("idle handshakes", &idle_hs),
        ("flood pages", &flood_pages),
        ("flood handshakes", &flood_hs),
    ] {
        if let Some(f) = &s.first_failure {
            println!("\n{what}: first failure: {f}");
        }
    }
    println!(
        "\np99 ratio flood / idle (both on a restarted edge): pages {:.2}×, handshakes {:.2}×",
        flood_pages.pct(0.99) / idle_pages.pct(0.99),
        flood_hs.pct(0.99) / idle_hs.pct(0.99)
    );
    if flood_ran + 0.5 < flood_secs {
        println!(
            "The flood ran {flood_ran:.1} s, from {flood_from:.2} s into the phase; over that window alone, p99 flood / idle: pages {:.2}×, handshakes {:.2}×",
            flood_pages.pct_between(0.99, flood_from, flood_to)
                / idle_pages.pct_between(0.99, flood_from, flood_to),
            flood_hs.pct_between(0.99, flood_from, flood_to)
                / idle_hs.pct_between(0.99, flood_from, flood_to)
        );
    }
    println!(
        "\nSlowest handshakes: idle {}; flood {}",
        idle_hs.slowest(6),
        flood_hs.slowest(6)
    );
    println!(
        "Slowest pages: idle {}; flood {}",
        idle_pages.slowest(6),
        flood_pages.slowest(6)
    );
    let total: u64 = outcomes.iter().map(|(_, _, n)| n).sum();
    println!(
        "\nFlood: {total} requests from {} addresses in {flood_ran:.1} s ({:.0}/s) at nice {}{}",
        cli.addresses,
        total as f64 / flood_ran,
        cli.flood_nice,
        if flood_done {
            ""
        } else {
            ", cut at the phase's end"
        }
    );
    println!("\n| flood kind | outcome | count |\n|---|---|---|");
    for (kind, outcome, n) in &outcomes {
        println!("| {kind} | {outcome} | {n} |");
    }
    println!(
        "\nCPU during the flood phase ({flood_secs:.1} s, 2 cores = {:.0} core-seconds): edge {edge_cpu:.1} s, shoppers {shoppers_cpu:.1} s, flood {flood_cpu:.1} s",
        2.0 * flood_secs
    );
    println!(
        "\nEdge RSS: restarted idle {} → {} MiB; restarted for the flood {} MiB, max during it {} MiB, after {} MiB",
        rss_idle_before / 1024,
        rss_idle / 1024,
        rss_fresh / 1024,
        rss_max.load(Ordering::Relaxed) / 1024,
        rss_after / 1024
    );
    println!("\nEdge counters after the flood:\n```");
    for l in metrics.lines().filter(|l| {
        !l.starts_with('#')
            && (l.starts_with("edgefront_rate_limited_total")
                || l.starts_with("edgefront_tls_certificate_lookups_total")
                || l.starts_with("edgefront_connections_refused_total")
                || l.starts_with("edgefront_cache_lookups_total"))
    }) {
        println!("{l}");
    }
    println!("```");
    Ok(())
}
