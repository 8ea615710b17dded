//! The edge binary as a fixture (`Edge::builder(..).run()`), its metrics,
//! and [`Stack`]: one region wired end to end (primary, replica, origin,
//! edge).

use super::*;

/// A running edge.
pub struct Edge {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub region: String,
}

/// Builds an [`Edge`].
#[derive(Clone)]
pub struct EdgeBuilder {
    region: String,
    replica_url: String,
    origin: SocketAddr,
    cache_ttl_ms: u64,
    listen: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    extra: Vec<String>,
    log_filter: Option<String>,
    production_limits: bool,
    env: Vec<(String, String)>,
    /// The path the edge is started as (default: the built binary); a
    /// reload starts its successor from it.
    program: Option<PathBuf>,
}

impl Edge {
    /// An edge for `region` reading `replica_url`, proxying to `origin`.
    pub fn builder(region: &str, replica_url: &str, origin: SocketAddr) -> EdgeBuilder {
        EdgeBuilder {
            region: region.into(),
            replica_url: replica_url.into(),
            origin,
            cache_ttl_ms: 2_000,
            listen: None,
            admin: None,
            extra: Vec::new(),
            log_filter: None,
            production_limits: false,
            env: Vec::new(),
            program: None,
        }
    }

    /// Base URL of the shopper listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Base URL of the admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Sum of the samples of metric `name` (a name or a `name{labels` prefix).
    pub async fn metric(&self, name: &str) -> Result<f64> {
        metric_sum(&self.admin_url(), name).await
    }
}

/// Sum of the samples whose line starts with `name` on `admin`'s `/metrics`.
pub async fn metric_sum(admin: &str, name: &str) -> Result<f64> {
    metric_sum_with(&client(), admin, name).await
}

/// [`metric_sum`] through `http` (e.g. a client of a TLS listener).
pub async fn metric_sum_with(http: &reqwest::Client, admin: &str, name: &str) -> Result<f64> {
    let text = http
        .get(format!("{admin}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

impl EdgeBuilder {
    /// The abuse limits a test harness needs: every test client is one
    /// address (loopback) doing the work of many shoppers, so the
    /// per-address and per-store budgets are raised out of the way, unless
    /// the test sets one itself (tests/tests/abuse.rs tries them).
    fn harness_limits(&self) -> Vec<String> {
        if self.production_limits {
            return Vec::new();
        }
        const RAISED: [(&str, &str); 5] = [
            ("--limit-origin-requests-per-second", "1000000"),
            ("--limit-origin-requests-burst", "1000000"),
            ("--limit-misses-per-second", "1000000"),
            ("--limit-misses-burst", "1000000"),
            ("--max-connections-per-address", "100000"),
        ];
        RAISED
            .iter()
            .filter(|(flag, _)| !self.extra.iter().any(|a| a == flag))
            .flat_map(|(flag, v)| [flag.to_string(), v.to_string()])
            .collect()
    }

    /// Page cache TTL.
    pub fn cache_ttl_ms(mut self, ms: u64) -> Self {
        self.cache_ttl_ms = ms;
        self
    }

    /// Fixed listener addresses (default: free ports).
    pub fn listen(mut self, listen: SocketAddr, admin: SocketAddr) -> Self {
        self.listen = Some(listen);
        self.admin = Some(admin);
        self
    }

    /// `RUST_LOG` of the edge (default `warn`, or `EDGE_LOG`).
    pub fn log_filter(mut self, f: &str) -> Self {
        self.log_filter = Some(f.into());
        self
    }

    /// The edge's own default abuse limits, not the harness's raised ones
    /// (benchmarks of abuse).
    pub fn production_limits(mut self) -> Self {
        self.production_limits = true;
        self
    }

    /// An environment variable of the edge process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the edge as `path` (a link to the built binary, say, that a
    /// test points elsewhere before a reload).
    pub fn program(mut self, path: &Path) -> Self {
        self.program = Some(path.to_path_buf());
        self
    }

    /// Extra command-line arguments.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.into());
        self
    }

    /// Starts the edge and waits for both listeners.
    pub fn run(self) -> Result<Edge> {
        // Free ports can be taken by a concurrent test between pick and bind.
        let attempts = if self.listen.is_some() { 1 } else { 3 };
        let mut last = None;
        for _ in 0..attempts {
            match self.try_run() {
                Ok(e) => return Ok(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("edge did not start")))
    }

    /// Starts a second edge with the same arguments that takes the
    /// listening sockets over from `old` (`--upgrade`), and returns once it
    /// waits for them; then SIGQUIT `old` (pingora's graceful upgrade).
    pub fn run_upgrade(&self, old: &Edge) -> Result<Edge> {
        let b = EdgeBuilder {
            listen: Some(old.addr),
            admin: Some(old.admin),
            extra: self
                .extra
                .iter()
                .cloned()
                .chain(["--upgrade".to_owned()])
                .collect(),
            ..self.clone()
        };
        let sock = std::env::temp_dir().join(format!(
            "edgefront-edge-{}-{}.upgrade.sock",
            self.region,
            old.addr.port()
        ));
        let _ = std::fs::remove_file(&sock);
        let mut proc = Proc::spawn(
            &format!("edge-{}-new", self.region),
            b.command(old.addr, old.admin)?,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            if let Ok(Some(status)) = proc.child.try_wait() {
                bail!("upgrading edge exited with {status}: {}", proc.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "upgrading edge never listened on {}: {}",
                    sock.display(),
                    proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Edge {
            proc,
            addr: old.addr,
            admin: old.admin,
            region: self.region.clone(),
        })
    }

    /// Starts an edge with `--upgrade` on free ports and no edge to take
    /// over from: it waits for listening sockets that never come, an edge
    /// stuck in its start.
    pub fn spawn_waiting_for_sockets(&self) -> Result<Proc> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = self.command(addr, admin)?;
        cmd.arg("--upgrade");
        Proc::spawn(&format!("edge-{}-waiting", self.region), cmd)
    }

    fn command(&self, addr: SocketAddr, admin: SocketAddr) -> Result<Command> {
        let mut cmd = Command::new(match &self.program {
            Some(p) => p.clone(),
            None => binary("edge")?,
        });
        cmd.args([
            "--region",
            &self.region,
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--replica-url",
            &self.replica_url,
            "--origin",
            &self.origin.to_string(),
            "--cache-ttl-ms",
            &self.cache_ttl_ms.to_string(),
        ])
        .args(&self.extra)
        .args(self.harness_limits())
        .envs(self.env.iter().map(|(k, v)| (k, v)))
        .env(
            "RUST_LOG",
            self.log_filter
                .clone()
                .or_else(|| std::env::var("EDGE_LOG").ok())
                .unwrap_or_else(|| "warn".into()),
        );
        Ok(cmd)
    }

    fn try_run(&self) -> Result<Edge> {
        let addr = self
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let admin = self
            .admin
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let cmd = self.command(addr, admin)?;
        let mut proc = Proc::spawn(&format!("edge-{}", self.region), cmd)?;
        for (a, what) in [(addr, "edge"), (admin, "edge admin")] {
            wait_port(a, Duration::from_secs(30), &mut proc.child, what)
                .map_err(|e| anyhow::anyhow!("{e}\n{}", proc.log()))?;
        }
        Ok(Edge {
            proc,
            addr,
            admin,
            region: self.region.clone(),
        })
    }
}

/// A primary with the origin and an edge + replica per region.
pub struct Network {
    // Field order is drop order: processes first, then databases.
    pub edges: Vec<Edge>,
    pub origin: Origin,
    pub replicas: Vec<Postgres>,
    pub primary: Postgres,
    pub platform_domain: String,
}

impl Network {
    /// Starts the primary, origin, and for each region a replica (own slot)
    /// and an edge reading only it. `edge_args` go to every edge.
    pub fn start(regions: &[&str], edge_args: &[&str]) -> Result<Network> {
        let platform_domain = edgefront_regions::Regions::builtin()?
            .network
            .platform_domain;
        let primary = Postgres::primary()?;
        let origin = Origin::start(&primary.url(), &platform_domain)?;
        let mut replicas = Vec::new();
        let mut edges = Vec::new();
        for r in regions {
            let replica = primary.replica(r)?;
            let mut b = Edge::builder(r, &replica.url(), origin.addr).cache_ttl_ms(300_000);
            for a in edge_args {
                b = b.arg(a);
            }
            edges.push(b.run()?);
            replicas.push(replica);
        }
        Ok(Network {
            edges,
            origin,
            replicas,
            primary,
            platform_domain,
        })
    }
}

/// One region end to end: primary, a replica for `region`, origin, edge.
pub struct Stack {
    // Field order is drop order: processes first, then databases.
    pub edge: Edge,
    pub origin: Origin,
    pub replica: Postgres,
    pub primary: Postgres,
    pub platform_domain: String,
}

impl Stack {
    /// Starts everything for `region` with the given edge cache TTL.
    pub fn start(region: &str, cache_ttl_ms: u64) -> Result<Stack> {
        let platform_domain = edgefront_regions::Regions::builtin()?
            .network
            .platform_domain;
        let primary = Postgres::primary()?;
        let origin = Origin::start(&primary.url(), &platform_domain)?;
        let replica = primary.replica(region)?;
        let edge = Edge::builder(region, &replica.url(), origin.addr)
            .cache_ttl_ms(cache_ttl_ms)
            .run()?;
        Ok(Stack {
            edge,
            origin,
            replica,
            primary,
            platform_domain,
        })
    }

    /// Creates the demo stores on the primary.
    pub fn seed(&self) -> Result<serde_json::Value> {
        Origin::seed_demo(&self.primary.url(), &self.platform_domain)
    }
}
