//! Integration fixtures: real PostgreSQL primary and streaming replicas, the
//! origin and edge binaries, each in temp dirs on free loopback ports, each
//! killed and removed when dropped (also when a test panics).
//!
//! `Postgres::primary()` → `.replica("bom1")` → `Origin::start(..)` →
//! `Edge::builder(..).run()`; [`Stack`] wires one region end to end.
//! The binaries come from the workspace's `target/release` (or
//! `EDGEFRONT_BIN_DIR`): build them first with `cargo build --release`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod history;
pub mod labdb;
pub mod machines;
pub mod netlab;
pub mod otlp;
pub mod patroni;
pub mod relay;

/// PostgreSQL server binaries (Debian layout).
pub const PG_BIN: &str = edgefront_ctl::lab::PG_BIN;

/// Polls `f` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn wait_port(addr: SocketAddr, timeout: Duration, child: &mut Child, what: &str) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what} did not listen on {addr} within {timeout:?}")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root
/// (initdb refuses to run as root).
fn pg_tool(tool: &str) -> Command {
    pg_tool_in(None, tool)
}

/// [`pg_tool`] inside a network namespace (`ip netns exec`), if given.
fn pg_tool_in(netns: Option<&str>, tool: &str) -> Command {
    let path = Path::new(PG_BIN).join(tool);
    if let Some(ns) = netns {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, "runuser", "-u", "postgres", "--"])
            .arg(path);
        return c;
    }
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

/// A finished command's standard output, then its standard error, as text.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(mut c: Command, what: &str) -> Result<()> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {what}"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, output_text(&out));
    }
    Ok(())
}

/// Gives `path` to the postgres user (when we are root).
fn chown_postgres(path: &Path) -> Result<()> {
    if is_root() {
        let mut c = Command::new("chown");
        c.arg("postgres:postgres").arg(path);
        run(c, "chown")?;
    }
    Ok(())
}

/// A temp dir the postgres user can own.
fn pg_dir(prefix: &str, parent: Option<&Path>) -> Result<tempfile::TempDir> {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    let dir = match parent {
        Some(p) => b.tempdir_in(p)?,
        None => b.tempdir()?,
    };
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["-R", "postgres:postgres"]).arg(dir.path());
                c
            },
            "chown",
        )?;
    }
    Ok(dir)
}

/// A running PostgreSQL server (primary or streaming replica).
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    pub name: String,
    stopped: bool,
    /// Listen address (127.0.0.1 unless placed in a lab namespace).
    pub host: String,
    /// Network namespace the server runs in (the lab), if any.
    pub netns: Option<String>,
    /// The internal CA directory whose `ca.pem` clients verify this server
    /// against (it only speaks TLS to TCP clients).
    pki: PathBuf,
}

/// Where a server runs: loopback on a free port, or a lab namespace.
#[derive(Debug, Clone, Default)]
pub struct PgPlace<'a> {
    /// `ip netns exec` into this namespace.
    pub netns: Option<&'a str>,
    /// Listen address and port (port 5432 in a namespace).
    pub host: Option<&'a str>,
    /// Parent directory of the data directory.
    pub parent: Option<&'a Path>,
    /// Settings appended last (they win), e.g. rendered from the ansible template.
    pub extra_conf: Option<&'a str>,
    /// The internal CA directory that certifies the server (created if
    /// absent); default: a CA of the primary's own (replicas use their
    /// primary's).
    pub pki: Option<&'a Path>,
}

/// Issues server `name`'s TLS certificate for `host` from the CA in `pki`
/// into `pki/pg-<name>.{pem,key}`, readable by the postgres user only, and
/// returns the settings that make the server use it.
fn pg_tls(pki: &Path, name: &str, host: &str) -> Result<String> {
    use edgefront_certs::pki::{InternalCa, Usage};
    let ca = InternalCa::open_or_create(pki)?;
    let file = format!("pg-{name}");
    ca.ensure(&file, &file, &[host.to_owned()], Usage::Server)?;
    let (cert, key) = (
        pki.join(format!("{file}.pem")),
        pki.join(format!("{file}.key")),
    );
    if is_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres:postgres").arg(&cert).arg(&key);
                c
            },
            "chown",
        )?;
    }
    Ok(format!(
        "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_min_protocol_version = 'TLSv1.2'\n",
        cert.display(),
        key.display()
    ))
}

impl Postgres {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The connection URL of the `edgefront` database: TLS, the server's
    /// certificate verified against the internal CA (`verify-full`).
    pub fn url(&self) -> String {
        pg_url(&self.host, self.port, &self.pki.join("ca.pem"))
    }

    /// The same server in plaintext (which it refuses).
    pub fn plaintext_url(&self) -> String {
        format!(
            "postgres://edgefront@{}:{}/edgefront?sslmode=disable",
            self.host, self.port
        )
    }

    /// The internal CA certificate clients verify this server against.
    pub fn ca_path(&self) -> PathBuf {
        self.pki.join("ca.pem")
    }

    /// The server data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data()
    }

    /// The `pg_ctl start` command line this server is started with
    /// (the lab records it to restart a killed region).
    pub fn start_argv(&self) -> Vec<String> {
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            &format!("{PG_BIN}/pg_ctl"),
            "-D",
            &self.data().display().to_string(),
            "-l",
            &self.dir.path().join("log").display().to_string(),
            "-w",
            "-t",
            "60",
            "start",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn tool(&self, tool: &str) -> Command {
        pg_tool_in(self.netns.as_deref(), tool)
    }

    /// Starts a new primary: initdb, replication enabled, loopback only.
    pub fn primary() -> Result<Postgres> {
        Self::primary_at(PgPlace::default())
    }

    /// Starts a new primary at `place` (a lab namespace trusts its whole
    /// private network; loopback trusts 127.0.0.1 only).
    pub fn primary_at(place: PgPlace<'_>) -> Result<Postgres> {
        let dir = pg_dir("edgefront-pg-primary-", place.parent)?;
        let data = dir.path().join("data");
        let mut c = pg_tool("initdb");
        c.arg("-D").arg(&data).args([
            "-U",
            "edgefront",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]);
        run(c, "initdb")?;
        let host = place.host.unwrap_or("127.0.0.1");
        let port = if place.netns.is_some() {
            5432
        } else {
            free_port()
        };
        let conf = format!(
            "listen_addresses = '{host}'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 40\nmax_replication_slots = 32\n\
             hot_standby = on\nwal_keep_size = '256MB'\nfsync = off\nfull_page_writes = off\n\
             shared_buffers = '64MB'\nmax_connections = 100\nlog_min_messages = warning\n",
            dir.path().display()
        );
        append(&data.join("postgresql.conf"), &conf)?;
        // TLS only over TCP: no `host` rule admits a plaintext connection.
        let pki = place
            .pki
            .map_or_else(|| dir.path().join("pki"), Path::to_path_buf);
        append(
            &data.join("postgresql.conf"),
            &pg_tls(&pki, "primary", host)?,
        )?;
        // initdb's own rules admit plaintext over TCP: replaced, not appended to.
        let net = if place.netns.is_some() {
            // The lab's namespaces are a private network of their own.
            "0.0.0.0/0"
        } else {
            "127.0.0.1/32"
        };
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\nlocal replication all trust\n\
                 hostssl all all {net} trust\nhostssl replication all {net} trust\n"
            ),
        )?;
        if let Some(extra) = place.extra_conf {
            append(&data.join("postgresql.conf"), extra)?;
        }
        let mut pg = Postgres {
            dir,
            port,
            name: "primary".into(),
            stopped: true,
            host: host.to_owned(),
            netns: place.netns.map(str::to_owned),
            pki,
        };
        pg.first_start()?;
        let mut c = pg.psql();
        c.args([
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-U",
            "edgefront",
            "-d",
            "postgres",
            "-qc",
            "CREATE DATABASE edgefront",
        ]);
        run(c, "create database")?;
        Ok(pg)
    }

    /// Starts a streaming replica of this primary with its own replication
    /// slot named after `region` (so a cut-off replica loses no WAL).
    pub fn replica(&self, region: &str) -> Result<Postgres> {
        self.replica_at(region, PgPlace::default())
    }

    fn psql(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns])
                    .arg(Path::new(PG_BIN).join("psql"));
                c
            }
            None => Command::new(Path::new(PG_BIN).join("psql")),
        }
    }

    /// A replica at `place`: the base backup runs next to this primary,
    /// the replica server then starts in its own place.
    pub fn replica_at(&self, region: &str, place: PgPlace<'_>) -> Result<Postgres> {
        let slot = format!("region_{region}");
        let mut c = self.psql();
        c.args([
            "-h",
            &self.host,
            "-p",
            &self.port.to_string(),
            "-U",
            "edgefront",
            "-d",
            "postgres",
            "-qc",
        ])
        .arg(format!(
            "SELECT pg_create_physical_replication_slot('{slot}')"
        ));
        run(c, "create slot")?;
        let dir = pg_dir(&format!("edgefront-pg-{region}-"), place.parent)?;
        let data = dir.path().join("data");
        let mut c = self.tool("pg_basebackup");
        // Replication over TLS, the primary verified against the CA; -R
        // writes these settings into the replica's primary_conninfo.
        c.arg("-d")
            .arg(format!(
                "host={} port={} user=edgefront sslmode=verify-full sslrootcert={}",
                self.host,
                self.port,
                self.ca_path().display()
            ))
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast", "-S", &slot]);
        run(c, "pg_basebackup")?;
        let host = place.host.unwrap_or("127.0.0.1");
        let pki = place
            .pki
            .map_or_else(|| self.pki.clone(), Path::to_path_buf);
        let tls = pg_tls(&pki, &format!("replica-{region}"), host)?;
        let port = if place.netns.is_some() {
            5432
        } else {
            free_port()
        };
        append(
            &data.join("postgresql.auto.conf"),
            &format!(
                "listen_addresses = '{host}'\nport = {port}\nunix_socket_directories = '{}'\nhot_standby_feedback = on\n{tls}",
                dir.path().display()
            ),
        )?;
        let mut pg = Postgres {
            dir,
            port,
            name: region.into(),
            stopped: true,
            host: host.to_owned(),
            netns: place.netns.map(str::to_owned),
            pki,
        };
        if let Some(extra) = place.extra_conf {
            append(&data.join("postgresql.auto.conf"), extra)?;
        }
        pg.first_start()?;
        Ok(pg)
    }

    /// Appends settings to this server's `postgresql.auto.conf` and reloads
    /// (later lines win). Settings that need a restart apply at the next start.
    pub fn set(&self, settings: &str) -> Result<()> {
        append(
            &self.data().join("postgresql.auto.conf"),
            &format!("{settings}\n"),
        )?;
        if !self.stopped {
            let mut c = self.tool("pg_ctl");
            c.arg("-D").arg(self.data()).arg("reload");
            run(c, &format!("pg_ctl reload {}", self.name))?;
        }
        Ok(())
    }

    /// Cuts this replica off from the primary (stops its WAL receiver);
    /// the primary keeps the WAL for it in its replication slot.
    pub fn cut_link(&self) -> Result<()> {
        self.set("primary_conninfo = ''")
    }

    /// Reconnects a replica cut off by [`Postgres::cut_link`].
    pub fn restore_link(&self) -> Result<()> {
        let auto = std::fs::read_to_string(self.data().join("postgresql.auto.conf"))?;
        let line = auto
            .lines()
            .find(|l| l.starts_with("primary_conninfo") && l.trim() != "primary_conninfo = ''")
            .context("no primary_conninfo written by pg_basebackup -R")?
            .to_owned();
        self.set(&line)
    }

    /// First start on a port picked by [`free_port`]: another test may have
    /// taken it meanwhile, so a bind failure moves to a new port (later
    /// settings in postgresql.auto.conf win) and tries again.
    fn first_start(&mut self) -> Result<()> {
        let mut last = None;
        for _ in 0..3 {
            match self.start() {
                Ok(()) => return Ok(()),
                Err(e)
                    if self.log().contains("could not bind")
                        || self.log().contains("already in use") =>
                {
                    self.port = free_port();
                    append(
                        &self.data().join("postgresql.auto.conf"),
                        &format!("port = {}\n", self.port),
                    )?;
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("postgres did not start")))
    }

    /// Starts the server (waits until it accepts connections).
    pub fn start(&mut self) -> Result<()> {
        let mut c = self.tool("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-t", "60", "start"]);
        run(c, &format!("pg_ctl start {}", self.name))?;
        self.stopped = false;
        Ok(())
    }

    /// Stops the server immediately (like a crash; WAL replay on restart).
    pub fn stop(&mut self) -> Result<()> {
        let mut c = self.tool("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"]);
        run(c, &format!("pg_ctl stop {}", self.name))?;
        self.stopped = true;
        Ok(())
    }

    /// The server log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.stop();
        }
    }
}

/// `postgres://edgefront@host:port/edgefront` over TLS with `verify-full`
/// against `ca` (the form the lab's rendered configurations use too).
pub fn pg_url(host: &str, port: u16, ca: &Path) -> String {
    format!(
        "postgres://edgefront@{host}:{port}/edgefront?sslmode=verify-full&sslrootcert={}",
        ca.display()
    )
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| path.display().to_string())?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Directory of the workspace's release binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("EDGEFRONT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

fn binary(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release --workspace`",
            p.display()
        );
    }
    Ok(p)
}

/// A child process killed on drop.
pub struct Proc {
    child: Child,
    pub name: String,
    log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Proc> {
        let logdir = tempfile::Builder::new()
            .prefix(&format!("edgefront-{name}-"))
            .tempdir()?;
        let log = logdir.path().join("log");
        let f = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Proc {
            child,
            name: name.into(),
            log,
            _logdir: logdir,
        })
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has not exited (a zombie counts as exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running origin.
pub struct Origin {
    pub proc: Proc,
    pub addr: SocketAddr,
    /// The DNS server the origin looks ownership proofs up through.
    pub dns: std::sync::Arc<Dns>,
    /// The internal API's listener and PKI, when it runs one (started with
    /// `--internal-token`).
    pub internal: Option<(SocketAddr, std::sync::Arc<InternalPki>)>,
    database_url: String,
    platform_domain: String,
    extra: Vec<String>,
}

/// A test deployment's internal PKI: a CA in a temporary directory, the
/// origin's server certificate (`127.0.0.1`) and a client certificate per
/// region node, as ansible and the lab make them.
pub struct InternalPki {
    dir: tempfile::TempDir,
    ca: edgefront_certs::pki::InternalCa,
}

impl InternalPki {
    /// A new CA and the origin's certificate for `origin_names`.
    pub fn new(origin_names: &[&str]) -> Result<InternalPki> {
        use edgefront_certs::pki::{InternalCa, Usage};
        let dir = tempfile::tempdir()?;
        let ca = InternalCa::create(dir.path())?;
        let names: Vec<String> = origin_names.iter().map(|n| n.to_string()).collect();
        ca.ensure("origin", "origin", &names, Usage::Server)?;
        Ok(InternalPki { dir, ca })
    }

    /// The directory holding the CA and every certificate.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The identity of client `name` (a region node), issued on first use.
    pub fn client_identity(&self, name: &str) -> Result<edgefront_certs::pki::Identity> {
        self.ca
            .ensure(name, name, &[], edgefront_certs::pki::Usage::Client)?;
        Ok(edgefront_certs::pki::Identity::in_dir(
            self.dir.path(),
            name,
        ))
    }

    /// A server certificate `file` for `names` from this CA.
    pub fn server_identity(
        &self,
        file: &str,
        names: &[&str],
    ) -> Result<edgefront_certs::pki::Identity> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.ca
            .ensure(file, file, &names, edgefront_certs::pki::Usage::Server)?;
        Ok(edgefront_certs::pki::Identity::in_dir(
            self.dir.path(),
            file,
        ))
    }

    /// The origin's server identity.
    pub fn origin_identity(&self) -> edgefront_certs::pki::Identity {
        edgefront_certs::pki::Identity::in_dir(self.dir.path(), "origin")
    }

    /// An HTTP client presenting client `name`'s certificate, trusting only
    /// the internal CA.
    pub fn client(&self, name: &str) -> Result<reqwest::Client> {
        let tls = self.client_identity(name)?.client_config()?;
        Ok(reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .use_preconfigured_tls(tls)
            .build()?)
    }
}

impl Origin {
    /// Starts the origin against the primary at `database_url` (migrating it).
    pub fn start(database_url: &str, platform_domain: &str) -> Result<Origin> {
        // A free port can be taken by a concurrent test between pick and bind.
        let mut last = None;
        for _ in 0..3 {
            match Self::start_on(
                database_url,
                platform_domain,
                SocketAddr::from(([127, 0, 0, 1], free_port())),
            ) {
                Ok(o) => return Ok(o),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("origin did not start")))
    }

    /// Starts the origin on a given address.
    pub fn start_on(database_url: &str, platform_domain: &str, addr: SocketAddr) -> Result<Origin> {
        Self::start_with(database_url, platform_domain, addr, &[])
    }

    /// Starts the origin on a given address with extra global flags, with a
    /// DNS server of its own.
    pub fn start_with(
        database_url: &str,
        platform_domain: &str,
        addr: SocketAddr,
        extra: &[&str],
    ) -> Result<Origin> {
        let dns = std::sync::Arc::new(Dns::start()?);
        Self::start_with_dns(database_url, platform_domain, addr, extra, dns)
    }

    /// Like [`Origin::start_with`], looking proofs up through `dns`.
    pub fn start_with_dns(
        database_url: &str,
        platform_domain: &str,
        addr: SocketAddr,
        extra: &[&str],
        dns: std::sync::Arc<Dns>,
    ) -> Result<Origin> {
        // With an internal token, the internal API listens on a port of its
        // own under a fresh internal CA.
        let internal = if extra.contains(&"--internal-token") {
            let pki = std::sync::Arc::new(InternalPki::new(&["127.0.0.1"])?);
            Some((SocketAddr::from(([127, 0, 0, 1], free_port())), pki))
        } else {
            None
        };
        Self::start_full(database_url, platform_domain, addr, extra, dns, internal)
    }

    fn start_full(
        database_url: &str,
        platform_domain: &str,
        addr: SocketAddr,
        extra: &[&str],
        dns: std::sync::Arc<Dns>,
        internal: Option<(SocketAddr, std::sync::Arc<InternalPki>)>,
    ) -> Result<Origin> {
        let mut cmd = Command::new(binary("origin")?);
        if let Some((at, pki)) = &internal {
            let id = pki.origin_identity();
            cmd.arg("--internal-listen").arg(at.to_string());
            cmd.arg("--internal-ca").arg(&id.ca);
            cmd.arg("--internal-tls-cert").arg(&id.cert);
            cmd.arg("--internal-tls-key").arg(&id.key);
        }
        // The test DNS server is also the platform zone's: DNS-01 challenges
        // for the platform wildcard are published in it.
        cmd.args(["--dns-server", &dns.addr().to_string()]);
        cmd.args(["--dns-update-url", &dns.management_url()]);
        cmd.args(extra);
        cmd.args([
            "--listen",
            &addr.to_string(),
            "--database-url",
            database_url,
            "--platform-domain",
            platform_domain,
            "serve",
        ]);
        cmd.env("RUST_LOG", "warn");
        let mut proc = Proc::spawn("origin", cmd)?;
        wait_port(addr, Duration::from_secs(30), &mut proc.child, "origin")
            .map_err(|e| anyhow::anyhow!("{e}\n{}", proc.log()))?;
        if let Some((at, _)) = &internal {
            wait_port(
                *at,
                Duration::from_secs(10),
                &mut proc.child,
                "origin internal",
            )
            .map_err(|e| anyhow::anyhow!("{e}\n{}", proc.log()))?;
        }
        Ok(Origin {
            proc,
            addr,
            dns,
            internal,
            database_url: database_url.into(),
            platform_domain: platform_domain.into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Claims `hostname` for the store of `token`, publishes the claim's TXT
    /// record in the origin's DNS and has the origin verify it: the domain
    /// is then active (served, and allowed a certificate). Returns the claim.
    pub async fn attach_proven(&self, token: &str, hostname: &str) -> Result<serde_json::Value> {
        let r = client()
            .post(format!("{}/api/domains", self.url()))
            .bearer_auth(token)
            .json(&serde_json::json!({ "hostname": hostname }))
            .send()
            .await?;
        let status = r.status();
        let v: serde_json::Value = r.json().await?;
        if !status.is_success() {
            bail!("claim {hostname}: {status} {v}");
        }
        let d = &v["domain"];
        let (name, value) = (
            d["record"]["name"].as_str().context("record name")?,
            d["record"]["value"].as_str().context("record value")?,
        );
        self.dns.set_txt(name, value).await?;
        self.verify(token, d["hostname"].as_str().context("hostname")?)
            .await
            .and_then(|c| {
                if c["domain"]["state"] == "active" {
                    Ok(c)
                } else {
                    bail!("{hostname} not active after its proof: {c}")
                }
            })
    }

    /// `POST /api/domains/{hostname}/verify`: the claim after a check now.
    pub async fn verify(&self, token: &str, hostname: &str) -> Result<serde_json::Value> {
        let r = client()
            .post(format!("{}/api/domains/{hostname}/verify", self.url()))
            .bearer_auth(token)
            .send()
            .await?;
        let status = r.status();
        let v: serde_json::Value = r.json().await?;
        if !status.is_success() {
            bail!("verify {hostname}: {status} {v}");
        }
        Ok(v)
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The internal API's base URL, e.g. `https://127.0.0.1:41235`.
    pub fn internal_url(&self) -> Result<String> {
        let (at, _) = self
            .internal
            .as_ref()
            .context("the origin has no internal API")?;
        Ok(format!("https://{at}"))
    }

    /// A client of the internal API holding region node `name`'s certificate.
    pub fn internal_client(&self, name: &str) -> Result<reqwest::Client> {
        let (_, pki) = self
            .internal
            .as_ref()
            .context("the origin has no internal API")?;
        pki.client(name)
    }

    /// The edge flags that reach the internal API as region node `region`.
    pub fn edge_internal_args(&self, region: &str) -> Result<Vec<String>> {
        let (at, pki) = self
            .internal
            .as_ref()
            .context("the origin has no internal API")?;
        let id = pki.client_identity(region)?;
        let path = |p: &Path| p.to_str().map(str::to_owned).context("path");
        Ok(vec![
            "--origin-internal".into(),
            at.to_string(),
            "--internal-ca".into(),
            path(&id.ca)?,
            "--internal-tls-cert".into(),
            path(&id.cert)?,
            "--internal-tls-key".into(),
            path(&id.key)?,
        ])
    }

    /// Stops the origin (SIGKILL).
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same address.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let fresh = Origin::start_full(
            &self.database_url,
            &self.platform_domain,
            self.addr,
            &extra,
            self.dns.clone(),
            self.internal.clone(),
        )?;
        *self = fresh;
        Ok(())
    }

    /// Runs `origin demo` against the primary: creates the demo stores.
    pub fn seed_demo(database_url: &str, platform_domain: &str) -> Result<serde_json::Value> {
        let out = Command::new(binary("origin")?)
            .args([
                "--database-url",
                database_url,
                "--platform-domain",
                platform_domain,
                "demo",
            ])
            .env("RUST_LOG", "warn")
            .output()?;
        if !out.status.success() {
            bail!(
                "origin demo failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

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

/// An HTTP client for tests: no proxy, no redirects followed, bounded waits.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

/// A throwaway certificate authority for tests and the lab (rcgen).
pub struct TestCa {
    /// The CA certificate, PEM: give it to clients as the trust root.
    pub pem: String,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

impl TestCa {
    /// A new CA with a fresh key.
    pub fn new() -> Result<TestCa> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edgefront test CA");
        let pem = params.self_signed(&key)?.pem();
        Ok(TestCa { pem, params, key })
    }

    /// A leaf certificate for `names`, signed by this CA: (chain PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?
                .signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The DNS server of tests: `pebble-challtestsrv` (Debian `pebble`),
/// authoritative for every name it is asked about, with records added and
/// removed through its management API. The origin looks ownership proofs up
/// through it and pebble resolves validation names through it, so both see
/// the same zone. A and AAAA queries without a record are answered with
/// 127.0.0.1 (HTTP-01 reaches the edge on loopback); TXT queries without a
/// record get an empty answer.
pub struct Dns {
    proc: std::sync::Mutex<Proc>,
    /// UDP and TCP port of the DNS listener.
    pub port: u16,
    mgmt_port: u16,
}

impl Dns {
    /// Starts one on free ports (retried if a port was taken meanwhile).
    pub fn start() -> Result<Dns> {
        let mut last = None;
        for _ in 0..3 {
            let (port, mgmt_port) = (free_port(), free_port());
            let mut c = Command::new("pebble-challtestsrv");
            c.args(Dns::args(
                SocketAddr::from(([127, 0, 0, 1], port)),
                [127, 0, 0, 1].into(),
                SocketAddr::from(([127, 0, 0, 1], mgmt_port)),
            ));
            let mut proc = Proc::spawn("challtestsrv", c)?;
            match wait_port(
                SocketAddr::from(([127, 0, 0, 1], mgmt_port)),
                Duration::from_secs(10),
                &mut proc.child,
                "challtestsrv",
            ) {
                Ok(()) => {
                    return Ok(Dns {
                        proc: std::sync::Mutex::new(proc),
                        port,
                        mgmt_port,
                    });
                }
                Err(e) => last = Some(anyhow::anyhow!("{e}\n{}", proc.log())),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("challtestsrv did not start")))
    }

    /// `pebble-challtestsrv`'s arguments: DNS on `dns`, A queries without a
    /// record answered with `default_a`, management API on `mgmt`, no
    /// challenge servers of its own.
    pub fn args(dns: SocketAddr, default_a: std::net::Ipv4Addr, mgmt: SocketAddr) -> Vec<String> {
        [
            "-dns01",
            &dns.to_string(),
            "-defaultIPv4",
            &default_a.to_string(),
            "-defaultIPv6",
            "",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            &mgmt.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Stops the server (a DNS outage); lookups then fail.
    pub fn stop(&self) {
        if let Ok(mut p) = self.proc.lock() {
            p.kill();
        }
    }

    /// Base URL of its management API.
    pub fn management_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.mgmt_port)
    }

    /// `127.0.0.1:port` of the DNS listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    async fn manage(&self, path: &str, body: serde_json::Value) -> Result<()> {
        dns_manage(&self.management_url(), path, body).await
    }

    /// Adds a TXT value at `name` (kept beside any values already there).
    pub async fn set_txt(&self, name: &str, value: &str) -> Result<()> {
        dns_set_txt(&self.management_url(), name, value).await
    }

    /// Answers A queries for `name` with `addrs` (instead of 127.0.0.1).
    pub async fn set_a(&self, name: &str, addrs: &[&str]) -> Result<()> {
        let host = format!("{}.", name.trim_end_matches('.'));
        self.manage(
            "add-a",
            serde_json::json!({ "host": host, "addresses": addrs }),
        )
        .await
    }

    /// Removes every TXT value at `name`.
    pub async fn clear_txt(&self, name: &str) -> Result<()> {
        let host = format!("{}.", name.trim_end_matches('.'));
        self.manage("clear-txt", serde_json::json!({ "host": host }))
            .await
    }

    /// The server's log (for failure messages).
    pub fn log(&self) -> String {
        self.proc.lock().map(|p| p.log()).unwrap_or_default()
    }
}

/// One call to a challtestsrv management API at `url`.
async fn dns_manage(url: &str, path: &str, body: serde_json::Value) -> Result<()> {
    let r = client()
        .post(format!("{url}/{path}"))
        .json(&body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("challtestsrv {path}: {}", r.status());
    }
    Ok(())
}

/// Adds a TXT value at `name` through the challtestsrv management API at
/// `url` (the tests' and the lab's DNS server).
pub async fn dns_set_txt(url: &str, name: &str, value: &str) -> Result<()> {
    let host = format!("{}.", name.trim_end_matches('.'));
    dns_manage(
        url,
        "set-txt",
        serde_json::json!({ "host": host, "value": value }),
    )
    .await
}

/// A running pebble ACME CA (Debian `pebble`) with `pebble-challtestsrv` as its
/// DNS, answering every name with 127.0.0.1, so HTTP-01 validation reaches the
/// edge's plain-HTTP port on loopback.
pub struct Pebble {
    pub proc: Proc,
    /// The DNS server pebble resolves through (shared with the origin when
    /// started with [`Pebble::start_with_dns`]).
    pub dns: std::sync::Arc<Dns>,
    dir: tempfile::TempDir,
    /// The ACME directory URL.
    pub directory: String,
    mgmt_port: u16,
    acme_port: u16,
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `http_port` (with real validation,
    /// no artificial sleeps, and pebble's default 5 % nonce rejection on).
    pub fn start(http_port: u16) -> Result<Pebble> {
        Self::start_with_validity(http_port, None)
    }

    /// Like [`Pebble::start`], issuing certificates valid for `validity_s` seconds.
    pub fn start_with_validity(http_port: u16, validity_s: Option<u64>) -> Result<Pebble> {
        Self::start_with_dns(http_port, validity_s, std::sync::Arc::new(Dns::start()?))
    }

    /// Like [`Pebble::start_with_validity`], resolving through `dns`.
    /// Free ports are picked then released, so a concurrent test can take one
    /// first: a start that fails that way is retried on new ports.
    pub fn start_with_dns(
        http_port: u16,
        validity_s: Option<u64>,
        dns: std::sync::Arc<Dns>,
    ) -> Result<Pebble> {
        Self::start_with_eab(http_port, validity_s, dns, None)
    }

    /// Like [`Pebble::start_with_dns`]; with `eab` (key id, base64url HMAC
    /// key), pebble requires External Account Binding with that key for
    /// every new account, as some public CAs do.
    pub fn start_with_eab(
        http_port: u16,
        validity_s: Option<u64>,
        dns: std::sync::Arc<Dns>,
        eab: Option<(&str, &str)>,
    ) -> Result<Pebble> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(http_port, validity_s, dns.clone(), eab) {
                Ok(p) => return Ok(p),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("pebble did not start")))
    }

    fn try_start(
        http_port: u16,
        validity_s: Option<u64>,
        dns: std::sync::Arc<Dns>,
        eab: Option<(&str, &str)>,
    ) -> Result<Pebble> {
        let dir = tempfile::Builder::new()
            .prefix("edgefront-pebble-")
            .tempdir()?;
        let ca = TestCa::new()?;
        let (cert, key) = ca.leaf(&["localhost"])?;
        std::fs::write(dir.path().join("listener-ca.pem"), &ca.pem)?;
        std::fs::write(dir.path().join("cert.pem"), cert)?;
        std::fs::write(dir.path().join("key.pem"), key)?;
        let (acme, mgmt) = (free_port(), free_port());
        let mut config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": eab.is_some(),
        }});
        if let Some((kid, key)) = eab {
            config["pebble"]["externalAccountMACKeys"] = serde_json::json!({ kid: key });
        }
        if let Some(v) = validity_s {
            config["pebble"]["certificateValidityPeriod"] = serde_json::json!(v);
        }
        std::fs::write(dir.path().join("pebble.json"), config.to_string())?;
        let proc = Self::spawn_ca(dir.path(), dns.port, acme)?;
        Ok(Pebble {
            proc,
            dns,
            directory: format!("https://localhost:{acme}/dir"),
            dir,
            mgmt_port: mgmt,
            acme_port: acme,
        })
    }

    fn spawn_ca(dir: &Path, dns: u16, acme: u16) -> Result<Proc> {
        let mut c = Command::new("pebble");
        c.arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")]);
        c.env("PEBBLE_VA_NOSLEEP", "1");
        let mut proc = Proc::spawn("pebble", c)?;
        wait_port(
            SocketAddr::from(([127, 0, 0, 1], acme)),
            Duration::from_secs(10),
            &mut proc.child,
            "pebble",
        )
        .map_err(|e| anyhow::anyhow!("{e}\n{}", proc.log()))?;
        Ok(proc)
    }

    /// Stops the CA (like an outage).
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same ports. Pebble keeps no state: it forgets
    /// accounts and makes a new root, like a CA that lost its database.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = Self::spawn_ca(self.dir.path(), self.dns.port, self.acme_port)?;
        Ok(())
    }

    /// The CA that signed pebble's own listener certificate (trust it to talk ACME).
    pub fn listener_ca(&self) -> PathBuf {
        self.dir.path().join("listener-ca.pem")
    }

    /// Writes pebble's current issuing root (regenerated at every start) to a file.
    pub fn issuing_root(&self) -> Result<PathBuf> {
        let root = pebble_issuing_root(
            &format!("localhost:{}", self.mgmt_port),
            &self.listener_ca(),
        )?;
        // A new file per call: a restarted pebble has a new root, and callers may
        // still need the old one.
        let n = std::fs::read_dir(self.dir.path()).map_or(0, |d| d.count());
        let p = self.dir.path().join(format!("issuing-root-{n}.pem"));
        std::fs::write(&p, root)?;
        Ok(p)
    }
}

/// `curl https://host:port/` resolved to `ip`, trusting only `ca`, run inside
/// network namespace `netns` if given: (curl's exit code, HTTP status such
/// as "200"; "000" when there was no response).
pub fn curl_https(
    netns: Option<&str>,
    ca: &Path,
    host: &str,
    ip: std::net::IpAddr,
    port: u16,
    max_time_s: u32,
) -> Result<(i32, String)> {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    let out = c
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time"])
        .arg(max_time_s.to_string())
        .arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:{ip}"))
        .arg(format!("https://{host}:{port}/"))
        .output()
        .context("run curl")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// pebble's current issuing root (PEM) from its management listener at
/// `mgmt` (`host:port`), whose certificate `listener_ca` signed.
pub fn pebble_issuing_root(mgmt: &str, listener_ca: &Path) -> Result<Vec<u8>> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", "--cacert"])
        .arg(listener_ca)
        .arg(format!("https://{mgmt}/roots/0"))
        .output()
        .context("run curl")?;
    if !out.status.success() {
        bail!("fetching pebble's issuing root from {mgmt} failed");
    }
    Ok(out.stdout)
}

/// The serial number of the first certificate in `pem` (`openssl x509`), or "".
pub fn pem_serial(pem: &str) -> String {
    let Some(start) = pem.find("-----BEGIN CERTIFICATE-----") else {
        return String::new();
    };
    let Some(end) = pem
        .find("-----END CERTIFICATE-----")
        .map(|e| e + "-----END CERTIFICATE-----".len())
    else {
        return String::new();
    };
    Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            if let Some(mut i) = c.stdin.take() {
                i.write_all(&pem.as_bytes()[start..end])?;
            }
            c.wait_with_output()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The serial of the certificate a TLS endpoint on 127.0.0.1 serves for `sni`.
pub fn served_serial(port: u16, sni: &str) -> Option<String> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            sni,
        ])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let serial = pem_serial(&String::from_utf8_lossy(&out.stdout));
    (!serial.is_empty()).then_some(serial)
}

/// The `p`th percentile (0–100, nearest rank) of `v`, which it sorts; NaN
/// when empty. For benchmark reports.
/// `name;dur=X` of a `server-timing` header value, in ms (the edge's
/// `replica`, `render`, …).
pub fn server_timing(header: &str, name: &str) -> Option<f64> {
    header.split(',').find_map(|part| {
        let part = part.trim();
        part.strip_prefix(name)?.strip_prefix(";dur=")?.parse().ok()
    })
}

pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i]
}

/// A response header's value as text ("" when absent or not text).
pub fn header_text(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}
