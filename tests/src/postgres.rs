//! PostgreSQL fixtures: a primary and streaming replicas from Debian's
//! server binaries, in temp dirs on free ports (or in a lab's network
//! namespace), TLS under a test CA when asked; removed when dropped.

use super::*;

pub(crate) fn is_root() -> bool {
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
pub(crate) fn pg_tool(tool: &str) -> Command {
    pg_tool_in(None, tool)
}

/// [`pg_tool`] inside a network namespace (`ip netns exec`), if given.
pub(crate) fn pg_tool_in(netns: Option<&str>, tool: &str) -> Command {
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

/// Gives `path` to the postgres user (when we are root).
pub(crate) fn chown_postgres(path: &Path) -> Result<()> {
    if is_root() {
        let mut c = Command::new("chown");
        c.arg("postgres:postgres").arg(path);
        run(c, "chown")?;
    }
    Ok(())
}

/// A temp dir the postgres user can own.
pub(crate) fn pg_dir(prefix: &str, parent: Option<&Path>) -> Result<tempfile::TempDir> {
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
pub(crate) fn pg_tls(pki: &Path, name: &str, host: &str) -> Result<String> {
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

pub(crate) fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| path.display().to_string())?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
