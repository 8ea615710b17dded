//! Fixtures for the origin's failover (issue 18): an etcd cluster and
//! PostgreSQL servers run by Patroni (Debian's `etcd-server` 3.4 and
//! `patroni` 3.0), on loopback ports in temp dirs, PostgreSQL and etcd
//! speaking TLS under the internal CA like every other server of the
//! fixtures (etcd's clients and peers also show a certificate of it).
//!
//! Patroni runs as the `postgres` user (PostgreSQL refuses root); the
//! fixtures stop what they start on drop, and [`PatroniNode::power_off`]
//! kills a node like a power pull (Patroni and its postmaster, SIGKILL).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::relay::Relay;
use crate::{PG_BIN, Proc, free_port, pg_dir, pg_url};

/// An etcd cluster of [`Etcd::start`]'s `n` members, over TLS: members
/// and clients authenticate with certificates of the internal CA, and a
/// plaintext or certificate-less client is refused.
pub struct Etcd {
    members: Vec<(Proc, tempfile::TempDir)>,
    /// `host:port` of each member's client listener (https).
    pub endpoints: Vec<String>,
    /// The internal CA's certificate, and a client certificate and key of it
    /// (readable by the `postgres` user, for Patroni).
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Etcd {
    /// Starts `n` members on loopback, their certificates from the internal
    /// CA in `pki`, and waits until the cluster is healthy.
    pub fn start(n: usize, pki: &Path) -> Result<Etcd> {
        use edgefront_certs::pki::{InternalCa, Usage};
        let ca = InternalCa::open_or_create(pki)?;
        ca.ensure("etcd-client", "etcd-client", &[], Usage::Client)?;
        let client_files = [pki.join("etcd-client.pem"), pki.join("etcd-client.key")];
        for f in &client_files {
            crate::chown_postgres(f)?;
        }
        let token = format!("edgefront-{}-{}", std::process::id(), free_port());
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=https://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let ca_pem = pki.join("ca.pem");
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let file = format!("etcd-m{i}");
            // One certificate for both sides: a member serves its peers and
            // calls them.
            ca.ensure(&file, &file, &["127.0.0.1".to_owned()], Usage::Peer)?;
            let (cert, key) = (
                pki.join(format!("{file}.pem")),
                pki.join(format!("{file}.key")),
            );
            let dir = tempfile::Builder::new()
                .prefix(&format!("edgefront-etcd-m{i}-"))
                .tempdir()?;
            let argv = etcd_member_argv(&EtcdMember {
                name: &format!("m{i}"),
                data_dir: &dir.path().join("data"),
                client: &format!("127.0.0.1:{client}"),
                peer: &format!("127.0.0.1:{peer}"),
                initial: &initial,
                token: &token,
                ca: &ca_pem,
                cert: &cert,
                key: &key,
            });
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            members.push((Proc::spawn(&format!("etcd-m{i}"), c)?, dir));
        }
        let [client_cert, client_key] = client_files;
        let etcd = Etcd {
            members,
            endpoints: ports
                .iter()
                .map(|(c, _)| format!("127.0.0.1:{c}"))
                .collect(),
            ca: ca_pem,
            client_cert,
            client_key,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = etcd.ctl(true, &["endpoint", "health"])?;
            if out.status.success() {
                return Ok(etcd);
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd not healthy: {}{}",
                    String::from_utf8_lossy(&out.stderr),
                    etcd.members[0].0.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `etcdctl` (v3 API) against every member over https, showing the
    /// client certificate when `with_certificate`.
    pub fn ctl(&self, with_certificate: bool, args: &[&str]) -> Result<std::process::Output> {
        let client =
            with_certificate.then_some((self.client_cert.as_path(), self.client_key.as_path()));
        Ok(etcdctl(&self.endpoints, &self.ca, client)
            .args(args)
            .output()?)
    }
}

/// `etcdctl` (v3 API) against `endpoints` (`ip:port`, https) under the CA
/// `ca`, showing `client` (certificate, key) if given; add the arguments.
pub fn etcdctl(endpoints: &[String], ca: &Path, client: Option<(&Path, &Path)>) -> Command {
    let urls: Vec<String> = endpoints.iter().map(|e| format!("https://{e}")).collect();
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3")
        .args(["--endpoints", &urls.join(","), "--dial-timeout", "2s"])
        .arg("--cacert")
        .arg(ca);
    if let Some((cert, key)) = client {
        c.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    c
}

/// One etcd member's place and certificates, for [`etcd_member_argv`].
pub struct EtcdMember<'a> {
    pub name: &'a str,
    pub data_dir: &'a Path,
    /// `ip:port` of its client listener (https).
    pub client: &'a str,
    /// `ip:port` of its peer listener (https).
    pub peer: &'a str,
    /// `--initial-cluster` (`name=https://ip:port,…`).
    pub initial: &'a str,
    pub token: &'a str,
    pub ca: &'a Path,
    /// One certificate (`Usage::Peer`) for both sides: a member serves its
    /// peers and calls them.
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// The command line of one etcd member of a new cluster: TLS both ways,
/// clients and peers must show a certificate of the internal CA (the
/// fixtures here and the lab run the same shape).
pub fn etcd_member_argv(m: &EtcdMember) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let mut argv: Vec<String> = vec!["etcd".into(), "--name".into(), m.name.into()];
    for (flag, value) in [
        ("--data-dir", path(m.data_dir)),
        ("--listen-client-urls", format!("https://{}", m.client)),
        ("--advertise-client-urls", format!("https://{}", m.client)),
        ("--listen-peer-urls", format!("https://{}", m.peer)),
        (
            "--initial-advertise-peer-urls",
            format!("https://{}", m.peer),
        ),
        ("--initial-cluster", m.initial.into()),
        ("--initial-cluster-token", m.token.into()),
        ("--initial-cluster-state", "new".into()),
        ("--log-level", "warn".into()),
        ("--trusted-ca-file", path(m.ca)),
        ("--cert-file", path(m.cert)),
        ("--key-file", path(m.key)),
        ("--peer-trusted-ca-file", path(m.ca)),
        ("--peer-cert-file", path(m.cert)),
        ("--peer-key-file", path(m.key)),
    ] {
        argv.push(flag.into());
        argv.push(value);
    }
    argv.push("--client-cert-auth".into());
    argv.push("--peer-client-cert-auth".into());
    argv
}

impl Etcd {
    /// Freezes (SIGSTOP) or thaws (SIGCONT) member `i`: a frozen member is
    /// silent, like one behind a cut link (two of three: quorum lost).
    pub fn freeze(&self, i: usize, frozen: bool) -> Result<()> {
        let (p, _) = self.members.get(i).context("no such etcd member")?;
        signal(p.pid(), frozen)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            let _ = self.freeze(i, false);
        }
    }
}

/// SIGSTOP (`frozen`) or SIGCONT to `pid`.
fn signal(pid: u32, frozen: bool) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        },
    )?;
    Ok(())
}

/// Where and how one Patroni member runs, for [`member_config`]: the
/// fixtures' loopback ports behind relays, or a host of the lab.
pub struct MemberSpec<'a> {
    pub scope: &'a str,
    pub name: &'a str,
    /// Its directory: data, pgpass, the socket and `patroni.yml`.
    pub dir: &'a Path,
    /// The address it listens on (PostgreSQL and the REST API).
    pub host: &'a str,
    pub pg_port: u16,
    /// `ip:port` the other members reach its PostgreSQL at.
    pub pg_connect: String,
    pub api_port: u16,
    /// `ip:port` the other members reach its REST API at.
    pub api_connect: String,
    /// The REST API over https with its PostgreSQL certificate (the lab;
    /// the fixtures' relays carry plain http).
    pub api_tls: bool,
    /// etcd client endpoints (`ip:port`, https).
    pub etcd_hosts: Vec<String>,
    /// Patroni keeps `etcd_hosts`' order (`use_proxies`): the first host,
    /// then the next when one fails, and it stays with the one that last
    /// answered. Without it Patroni 3.0 asks etcd for its members and picks
    /// one at random (etcd.py `_refresh_machines_cache`). With it Patroni
    /// cannot start while the first host is down (it exits): the lab and
    /// ansible set it only for a member beside an etcd member, listed
    /// first (labdb's `etcd_order`); the fixtures set it so that
    /// [`PatroniNode::cut_off`] cuts a node's etcd too (with discovery,
    /// Patroni reached etcd at its advertised addresses, past the relays).
    pub etcd_in_order: bool,
    pub etcd_ca: &'a Path,
    pub etcd_cert: &'a Path,
    pub etcd_key: &'a Path,
    /// The internal CA directory: its certificate for `host` is made here.
    pub pki: &'a Path,
    /// Networks whose TLS connections (clients and replication) are trusted.
    pub trusted: &'a [String],
    /// Basic auth (user, password) the REST API asks for anything that
    /// changes the cluster (switchover, restart, reinit, config); reading
    /// `/cluster` and the health endpoints stays open.
    pub api_auth: Option<(&'a str, &'a str)>,
    /// A failover candidate; otherwise a regional replica (`nofailover`,
    /// `nosync`).
    pub candidate: bool,
    /// Patroni's log level (`WARNING`; the lab keeps `INFO`: what each
    /// member decided, every loop).
    pub log_level: &'static str,
    /// A command Patroni tries first to clone a new member (a custom
    /// replica method, as a restore from backup would be), falling back to
    /// `basebackup` when it fails: the lab's [`local_clone_script`].
    pub clone_command: Option<&'a Path>,
}

/// The lab's first way to clone a member. Every member of the lab runs on
/// this one machine, so the members clone from one base backup taken over
/// the leading candidate's unix socket, copied for each, as a restore from
/// a backup store would be; each then streams from the leader over TLS
/// like any other. Cloning each over the network took most of a minute:
/// every base backup from a primary ends with a WAL segment switch, and the
/// rest of each switched segment (zeros, 16 MiB) still streams to every
/// standby through the backbone's delay links, ten backups times eleven
/// members. A backup is reused only if the same candidate still leads on
/// the same timeline and it is under a minute old (the leader may no longer
/// keep the WAL since); otherwise it is taken again. It exits 1, and Patroni falls back to
/// `basebackup`, when no candidate's socket leads. `dir` is the backup's
/// home: PostgreSQL's user must own it.
pub fn local_clone_script(sockets: &[PathBuf], dir: &Path) -> String {
    let bin = Path::new(PG_BIN);
    let dirs: Vec<String> = sockets
        .iter()
        .map(|d| format!("'{}'", d.display()))
        .collect();
    format!(
        "#!/bin/sh\n\
         # Patroni's custom replica method (lab only): copy one base backup\n\
         # taken over a candidate's socket; any failure lets Patroni fall back\n\
         # to basebackup.\n\
         set -eu\n\
         datadir=\n\
         for a in \"$@\"; do case \"$a\" in --datadir=*) datadir=${{a#--datadir=}};; esac; done\n\
         [ -n \"$datadir\" ] || exit 1\n\
         backup='{dir}/backup'\n\
         exec 9>'{dir}/lock'\n\
         flock 9\n\
         # The candidate that leads, and its timeline (its WAL file name's first 8 digits).\n\
         leader=\n\
         for sock in {dirs}; do\n\
         \x20 tl=$({psql} -h \"$sock\" -p 5432 -U edgefront -d postgres -XAtc 'SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) WHERE NOT pg_is_in_recovery()' 2>/dev/null || true)\n\
         \x20 if [ -n \"$tl\" ]; then leader=\"$sock\"; break; fi\n\
         done\n\
         [ -n \"$leader\" ] || exit 1\n\
         # A backup is reused only from the same leader on the same timeline, under a minute old.\n\
         source=\"$leader $tl\"\n\
         if [ -d \"$backup\" ] && {{ [ \"$(cat \"$backup.source\" 2>/dev/null || true)\" != \"$source\" ] || [ -z \"$(find \"$backup\" -maxdepth 0 -mmin -1)\" ]; }}; then rm -rf \"$backup\"; fi\n\
         if [ ! -d \"$backup\" ]; then\n\
         \x20 rm -rf \"$backup.new\"\n\
         \x20 {basebackup} -h \"$leader\" -p 5432 -U edgefront -D \"$backup.new\" -X stream -c fast\n\
         \x20 mv \"$backup.new\" \"$backup\"\n\
         \x20 printf '%s\\n' \"$source\" > \"$backup.source\"\n\
         fi\n\
         mkdir -p \"$datadir\"\n\
         chmod 700 \"$datadir\"\n\
         cp -a \"$backup/.\" \"$datadir/\"\n",
        dir = dir.display(),
        dirs = dirs.join(" "),
        psql = bin.join("psql").display(),
        basebackup = bin.join("pg_basebackup").display(),
    )
}

/// The `patroni.yml` (as JSON, which is YAML) of one member: synchronous
/// mode (RPO 0), pg_rewind, slots, TLS with `verify-full` for every TCP
/// connection, Patroni's own replication connection over the socket.
pub fn member_config(m: &MemberSpec) -> Result<serde_json::Value> {
    let cert_name = format!("patroni-{}", m.name);
    let tls = crate::pg_tls(m.pki, &cert_name, m.host)?;
    let mut parameters = serde_json::Map::new();
    for line in tls.lines() {
        if let Some((k, v)) = line.split_once(" = ") {
            parameters.insert(k.trim().into(), json!(v.trim().trim_matches('\'')));
        }
    }
    parameters.insert(
        "unix_socket_directories".into(),
        json!(m.dir.display().to_string()),
    );
    parameters.insert("fsync".into(), json!("off"));
    parameters.insert("shared_buffers".into(), json!("32MB"));
    parameters.insert("max_connections".into(), json!(100));
    parameters.insert("log_min_messages".into(), json!("warning"));
    // A standby whose primary went silent (powered off: no FIN, no
    // reset) drops its stream within 10 s rather than PostgreSQL's 60 s
    // default, so it follows the new leader promptly.
    parameters.insert("wal_receiver_timeout".into(), json!("10s"));
    // It reports its position every second, not every 10: the leader sees
    // a new standby streaming (Patroni makes it the synchronous one only
    // then: 10-15 s later in the lab before) and the regions' lag is current.
    parameters.insert("wal_receiver_status_interval".into(), json!("1s"));
    let ca = m.pki.join("ca.pem").display().to_string();
    let tls_user = json!({ "username": "edgefront", "sslmode": "verify-full", "sslrootcert": ca });
    let mut restapi = json!({
        "listen": format!("{}:{}", m.host, m.api_port),
        "connect_address": m.api_connect,
    });
    if m.api_tls {
        let file = |ext: &str| {
            m.pki
                .join(format!("pg-{cert_name}.{ext}"))
                .display()
                .to_string()
        };
        restapi["certfile"] = json!(file("pem"));
        restapi["keyfile"] = json!(file("key"));
    }
    if let Some((username, password)) = m.api_auth {
        restapi["authentication"] = json!({ "username": username, "password": password });
    }
    let methods = match m.clone_command {
        Some(_) => json!(["lab_local", "basebackup"]),
        None => json!(["basebackup"]),
    };
    let mut hba = vec![
        "local all all trust".to_owned(),
        "local replication all trust".to_owned(),
    ];
    for net in m.trusted {
        hba.push(format!("hostssl all all {net} trust"));
        hba.push(format!("hostssl replication all {net} trust"));
    }
    let mut config = json!({
        "scope": m.scope,
        "name": m.name,
        "log": { "level": m.log_level },
        "restapi": restapi,
        // Patroni's calls to the other members' REST APIs verify them.
        "ctl": { "cacert": ca },
        "etcd3": {
            "hosts": m.etcd_hosts,
            "protocol": "https",
            "cacert": m.etcd_ca,
            "cert": m.etcd_cert,
            "key": m.etcd_key,
            "use_proxies": m.etcd_in_order,
        },
        "bootstrap": {
            "dcs": {
                "ttl": 10,
                "loop_wait": 1,
                "retry_timeout": 4,
                "maximum_lag_on_failover": 16777216,
                // RPO 0: only a synchronous standby is ever promoted, and a
                // commit is acknowledged once the standby has it.
                "synchronous_mode": true,
                "postgresql": {
                    "use_pg_rewind": true,
                    "use_slots": true,
                    "parameters": {
                        "wal_level": "replica",
                        "hot_standby": "on",
                        "max_wal_senders": 20,
                        "max_replication_slots": 20,
                        "wal_log_hints": "on",
                        "wal_keep_size": "256MB",
                    },
                },
            },
            "initdb": [{ "encoding": "UTF8" }, { "locale": "C.UTF-8" }],
        },
        "postgresql": {
            "listen": format!("{}:{}", m.host, m.pg_port),
            "connect_address": m.pg_connect,
            "data_dir": m.dir.join("data").display().to_string(),
            "bin_dir": PG_BIN,
            "pgpass": m.dir.join("pgpass").display().to_string(),
            "use_unix_socket": true,
            // Patroni's own replication connection (its timeline and
            // position in a leader race) over the socket: over TCP it
            // would name "localhost", which no certificate carries.
            "use_unix_socket_repl": true,
            // A member clones with a fast checkpoint: the default spread one
            // waits minutes when the leader has taken writes.
            "basebackup": { "checkpoint": "fast" },
            "create_replica_methods": methods,
            "authentication": {
                "superuser": tls_user,
                "replication": tls_user,
                "rewind": tls_user,
            },
            "parameters": parameters,
            // TLS only over TCP, as everywhere else.
            "pg_hba": hba,
        },
        "tags": {
            "nofailover": !m.candidate,
            "noloadbalance": false,
            "clonefrom": false,
            "nosync": !m.candidate,
        },
    });
    if let Some(command) = m.clone_command {
        config["postgresql"]["lab_local"] =
            json!({ "command": command.display().to_string(), "keep_data": false });
    }
    Ok(config)
}

/// One PostgreSQL server run by Patroni.
pub struct PatroniNode {
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    config: PathBuf,
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    pki: PathBuf,
    /// Its links to the others, each a [`Relay`] a test can cut: to every
    /// etcd member, and in front of its PostgreSQL and REST API as the other
    /// members reach them (the addresses it advertises). Clients of the
    /// tests reach it directly ([`PatroniNode::url`]): they are in its
    /// partition.
    links: Vec<Relay>,
}

/// How a node joins the cluster.
#[derive(Debug, Clone, Copy)]
pub struct Role {
    /// May be promoted (a failover candidate); `false`: a regional replica
    /// that only follows (`nofailover`).
    pub candidate: bool,
}

impl PatroniNode {
    /// Starts node `name` of cluster `scope` on etcd `etcd`, its TLS
    /// certificate from the internal CA in `pki`.
    pub fn start(scope: &str, name: &str, etcd: &Etcd, pki: &Path, role: Role) -> Result<Self> {
        let dir = pg_dir(&format!("edgefront-patroni-{name}-"), None)?;
        let (pg_port, api_port) = (free_port(), free_port());
        let reserved = [pg_port, api_port];
        let mut links = Vec::new();
        for e in &etcd.endpoints {
            links.push(Relay::start(e.parse()?, &reserved)?);
        }
        let pg_link = Relay::start(([127, 0, 0, 1], pg_port).into(), &reserved)?;
        let api_link = Relay::start(([127, 0, 0, 1], api_port).into(), &reserved)?;
        let config = member_config(&MemberSpec {
            scope,
            name,
            dir: dir.path(),
            host: "127.0.0.1",
            pg_port,
            pg_connect: pg_link.addr.to_string(),
            api_port,
            api_connect: api_link.addr.to_string(),
            api_tls: false,
            etcd_hosts: links.iter().map(|r| r.addr.to_string()).collect(),
            etcd_in_order: true,
            etcd_ca: &etcd.ca,
            etcd_cert: &etcd.client_cert,
            etcd_key: &etcd.client_key,
            pki,
            trusted: &["127.0.0.1/32".to_owned()],
            api_auth: None,
            candidate: role.candidate,
            log_level: "WARNING",
            clone_command: None,
        })?;
        // JSON is YAML.
        let path = dir.path().join("patroni.yml");
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        crate::chown_postgres(&path)?;
        let mut node = PatroniNode {
            proc: None,
            dir,
            config: path,
            name: name.to_owned(),
            pg_port,
            api_port,
            pki: pki.to_path_buf(),
            links: {
                links.push(pg_link);
                links.push(api_link);
                links
            },
        };
        node.resume()?;
        Ok(node)
    }

    /// Starts Patroni again (after [`PatroniNode::power_off`]): it rejoins
    /// the cluster, as a replica of whoever leads (pg_rewind if needed).
    pub fn resume(&mut self) -> Result<()> {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "patroni"])
            .arg(&self.config);
        // runuser would outlive a SIGKILL of itself: exec Patroni directly.
        let mut c = if crate::is_root() {
            use std::os::unix::process::CommandExt;
            let pg = nix::unistd::User::from_name("postgres")?.context("no postgres user")?;
            let mut d = Command::new("patroni");
            d.arg(&self.config)
                .uid(pg.uid.as_raw())
                .gid(pg.gid.as_raw())
                .env("HOME", self.dir.path());
            d
        } else {
            let _ = c;
            let mut d = Command::new("patroni");
            d.arg(&self.config);
            d
        };
        c.current_dir(self.dir.path());
        self.proc = Some(Proc::spawn(&format!("patroni-{}", self.name), c)?);
        Ok(())
    }

    /// The `edgefront` database on this node (TLS, verify-full).
    pub fn url(&self) -> String {
        pg_url("127.0.0.1", self.pg_port, &self.pki.join("ca.pem"))
    }

    /// The REST API's base URL.
    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// Patroni's log so far.
    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.path().join("data").join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Cuts (`true`) or heals the link in front of this node's PostgreSQL as
    /// the others reach it: replication from it stops silently, while its
    /// Patroni still talks to etcd and its direct clients still write.
    pub fn cut_replication(&self, cut: bool) {
        // Created in this order in start: etcd links, PostgreSQL, REST API.
        if let Some(l) = self.links.iter().rev().nth(1) {
            if cut { l.cut() } else { l.heal() }
        }
    }

    /// Cuts this node's links to etcd and the links into it (the other
    /// members' replication from it and REST calls to it): for a leader, a
    /// network partition with it and its direct clients on one side. Its own
    /// connections to the others go through *their* relays and stay up (a
    /// replica cut off keeps streaming from the leader). Silent, like a cut
    /// fibre.
    pub fn cut_off(&self) {
        for l in &self.links {
            l.cut();
        }
    }

    /// Heals [`PatroniNode::cut_off`].
    pub fn reconnect(&self) {
        for l in &self.links {
            l.heal();
        }
    }

    /// Freezes (`true`, SIGSTOP) or thaws (SIGCONT) the Patroni process, not
    /// its PostgreSQL: a Patroni that cannot act, e.g. cannot demote its
    /// leader, the worst case a partitioned leader can be in.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        let p = self.proc.as_ref().context("patroni is not running")?;
        signal(p.pid(), frozen)
    }

    /// Like a power pull: Patroni and PostgreSQL get SIGKILL at once.
    pub fn power_off(&mut self) {
        let pm = self.postmaster_pid();
        if let Some(p) = self.proc.as_mut() {
            p.kill();
        }
        if let Some(pid) = pm {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // The postmaster's children exit once it is gone; wait for the port.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && std::net::TcpStream::connect(("127.0.0.1", self.pg_port)).is_ok()
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.proc = None;
    }
}

impl Drop for PatroniNode {
    fn drop(&mut self) {
        // Patroni stops PostgreSQL on SIGTERM; a killed one leaves it running.
        let _ = self.freeze(false);
        if let Some(p) = self.proc.as_ref() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && self.postmaster_pid().is_some() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.power_off();
    }
}

/// A Patroni cluster: etcd, failover candidates and regional replicas.
pub struct Cluster {
    // Field order is drop order: nodes before etcd.
    pub nodes: Vec<PatroniNode>,
    pub etcd: Etcd,
    pub pki: tempfile::TempDir,
    pub scope: String,
}

impl Cluster {
    /// `candidates` failover candidates (the first bootstraps) and
    /// `replicas` regional replicas (`nofailover`), on a 3-member etcd.
    /// Waits for a leader, a synchronous standby and every replica
    /// streaming, and creates the `edgefront` database.
    pub fn start(candidates: usize, replicas: usize) -> Result<Cluster> {
        let pki = pg_dir("edgefront-patroni-pki-", None)?;
        let etcd = Etcd::start(3, pki.path())?;
        let scope = format!("ef{}x{}", std::process::id(), free_port());
        let mut nodes = Vec::new();
        for i in 0..candidates + replicas {
            let name = if i < candidates {
                format!("cand{i}")
            } else {
                format!("replica{}", i - candidates)
            };
            let role = Role {
                candidate: i < candidates,
            };
            nodes.push(PatroniNode::start(&scope, &name, &etcd, pki.path(), role)?);
            if i == 0 {
                // The first bootstraps alone; the others clone from it.
                let c = Cluster::wait_for(&nodes, Duration::from_secs(60), |m| {
                    m.iter().any(|m| m.role == "leader" && m.state == "running")
                });
                if let Err(e) = c {
                    bail!("{e}\n{}", nodes[0].log());
                }
            }
        }
        let cluster = Cluster {
            nodes,
            etcd,
            pki,
            scope,
        };
        cluster.wait(
            Duration::from_secs(90),
            "a leader, a sync standby and every member streaming",
            |m| {
                m.iter().any(|m| m.role == "leader")
                    && (candidates < 2 || m.iter().any(|m| m.role == "sync_standby"))
                    && m.len() == candidates + replicas
                    && m.iter()
                        .all(|m| m.state == "running" || m.state == "streaming")
            },
        )?;
        let leader = cluster.leader()?;
        let out = Command::new(Path::new(PG_BIN).join("psql"))
            .arg(leader.url().replace("/edgefront?", "/postgres?"))
            .args(["-qc", "CREATE DATABASE edgefront"])
            .output()?;
        if !out.status.success() {
            bail!("create database: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(cluster)
    }

    /// The members as Patroni's REST API lists them (any live node answers).
    pub fn members(&self) -> Result<Vec<Member>> {
        Cluster::members_of(&self.nodes)
    }

    fn members_of(nodes: &[PatroniNode]) -> Result<Vec<Member>> {
        let mut last = None;
        for n in nodes.iter().filter(|n| n.proc.is_some()) {
            match ureq_get(&format!("{}/cluster", n.api())) {
                Ok(body) => {
                    let v: serde_json::Value = serde_json::from_str(&body)?;
                    return Ok(v["members"]
                        .as_array()
                        .context("members")?
                        .iter()
                        .map(|m| Member {
                            name: m["name"].as_str().unwrap_or_default().to_owned(),
                            role: m["role"].as_str().unwrap_or_default().to_owned(),
                            state: m["state"].as_str().unwrap_or_default().to_owned(),
                            timeline: m["timeline"].as_u64().unwrap_or(0),
                        })
                        .collect());
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no live node")))
    }

    fn wait_for(
        nodes: &[PatroniNode],
        timeout: Duration,
        ok: impl Fn(&[Member]) -> bool,
    ) -> Result<Vec<Member>> {
        let deadline = Instant::now() + timeout;
        let mut last = Vec::new();
        while Instant::now() < deadline {
            if let Ok(m) = Cluster::members_of(nodes) {
                if ok(&m) {
                    return Ok(m);
                }
                last = m;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("cluster not ready within {timeout:?}: {last:?}")
    }

    /// Waits until the members satisfy `ok`.
    pub fn wait(
        &self,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&[Member]) -> bool,
    ) -> Result<Vec<Member>> {
        Cluster::wait_for(&self.nodes, timeout, ok).with_context(|| what.to_owned())
    }

    /// The node Patroni names leader.
    pub fn leader(&self) -> Result<&PatroniNode> {
        let m = self.members()?;
        let name = m
            .iter()
            .find(|m| m.role == "leader")
            .context("no leader")?
            .name
            .clone();
        self.node(&name)
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Result<&PatroniNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// The node named `name`, mutably.
    pub fn node_mut(&mut self, name: &str) -> Result<&mut PatroniNode> {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }
}

/// One member as Patroni lists it.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    /// `leader`, `sync_standby`, `replica`.
    pub role: String,
    /// `running`, `streaming`, `stopped`, …
    pub state: String,
    pub timeline: u64,
}

/// A blocking GET with a short timeout (the fixtures are synchronous).
fn ureq_get(url: &str) -> Result<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "2", url])
        .output()?;
    if !out.status.success() {
        bail!("GET {url}: curl exit {:?}", out.status.code());
    }
    Ok(String::from_utf8(out.stdout)?)
}
