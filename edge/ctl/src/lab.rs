//! The lab's state file and teardown.
//!
//! Everything a lab starts runs inside network namespaces named
//! `<prefix>-…`, so teardown needs nothing but the prefix: kill every
//! process in those namespaces, delete them, and remove the lab's directory
//! and state file. That also works after the lab builder crashed.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Where lab state files live (root-only, like the namespaces).
pub const STATE_DIR: &str = "/run/edgefront-lab";

/// PostgreSQL 15's server binaries (Debian's `postgresql-15`).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The default lab prefix (the main job's).
pub const DEFAULT_PREFIX: &str = "eflab";

/// A process of the lab, with everything needed to start it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub region: Option<String>,
    pub netns: String,
    pub argv: Vec<String>,
    /// Environment (secrets go here, never in argv).
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    /// False for commands that start a daemon and return (`pg_ctl start`).
    pub daemon: bool,
}

impl Service {
    fn command(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns]).args(&self.argv);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Starts it; a daemon's child is returned, a one-shot is waited for.
    pub fn start(&self) -> Result<Option<Child>> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| self.log.display().to_string())?;
        let mut c = self.command();
        c.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        if self.daemon {
            Ok(Some(
                c.spawn().with_context(|| format!("start {}", self.name))?,
            ))
        } else {
            let status = c.status().with_context(|| format!("run {}", self.name))?;
            if !status.success() {
                bail!(
                    "{} failed ({status}); see {}",
                    self.name,
                    self.log.display()
                );
            }
            Ok(None)
        }
    }
}

/// How often a [`Supervisor`] starts one daemon again, and how long after
/// it failed (systemd's `Restart=on-failure` with `RestartSec=2s`, as the
/// ansible role sets for Patroni).
pub const RESTARTS: u32 = 10;
pub const RESTART_AFTER: Duration = Duration::from_secs(2);

/// Starts daemons and, each time [`Supervisor::check`] is called, starts
/// again one that exited with a failure, as a machine's systemd does: at
/// most [`RESTARTS`] times, [`RESTART_AFTER`] after the exit. A daemon that
/// exited cleanly is left alone. Patroni 3.0 exits at start when the first
/// etcd it lists does not answer `/version` within a second (its own
/// host's, just started or still rejoining); on a machine its unit brings
/// it back, and the lab must too. The lab watches only while it waits
/// (its start, a drill's power-on): a drill that kills a daemon later
/// finds it down.
#[derive(Debug, Default)]
pub struct Supervisor {
    daemons: Vec<Supervised>,
}

/// A watched daemon: its process, when it was seen to have failed, and how
/// often it was started again.
#[derive(Debug)]
struct Supervised {
    service: Service,
    child: Child,
    failed_at: Option<Instant>,
    restarts: u32,
}

impl Supervisor {
    /// Starts `service`; a daemon is watched from now on.
    pub fn start(&mut self, service: &Service) -> Result<()> {
        if let Some(child) = service.start()? {
            self.daemons.push(Supervised {
                service: service.clone(),
                child,
                failed_at: None,
                restarts: 0,
            });
        }
        Ok(())
    }

    /// Starts again what failed long enough ago; returns what it saw and
    /// did, one line each.
    pub fn check(&mut self) -> Vec<String> {
        let mut said = Vec::new();
        for d in &mut self.daemons {
            if d.restarts > RESTARTS {
                continue;
            }
            let name = &d.service.name;
            let failed_at = match d.failed_at {
                Some(at) => at,
                None => match d.child.try_wait() {
                    Ok(Some(status)) if !status.success() => {
                        if d.restarts >= RESTARTS {
                            said.push(format!(
                                "{name} failed ({status}) after {RESTARTS} restarts: left down"
                            ));
                            d.restarts += 1;
                            continue;
                        }
                        said.push(format!("{name} failed ({status})"));
                        *d.failed_at.insert(Instant::now())
                    }
                    _ => continue,
                },
            };
            if failed_at.elapsed() < RESTART_AFTER {
                continue;
            }
            d.restarts += 1;
            match d.service.start() {
                Ok(Some(again)) => {
                    d.child = again;
                    d.failed_at = None;
                    said.push(format!("{name} started again ({})", d.restarts));
                }
                // Tried again after the same wait, while restarts are left.
                other => {
                    let why = match other {
                        Err(e) => format!("{e:#}"),
                        _ => "not a daemon".into(),
                    };
                    if d.restarts < RESTARTS {
                        d.failed_at = Some(Instant::now());
                        said.push(format!("{name}: starting again: {why}"));
                    } else {
                        d.restarts = RESTARTS + 1;
                        said.push(format!("{name}: starting again: {why}: left down"));
                    }
                }
            }
        }
        said
    }
}

/// The last `lines` lines of a log, for an error that names it.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// One region of a lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabRegion {
    pub code: String,
    pub city: String,
    pub asn: u32,
    pub node_ns: String,
    pub metro_ns: String,
    pub city_ns: String,
    pub node_ip: Ipv4Addr,
    /// The node's address on its uplink (removed to make the node silent).
    pub node_link_ip: Ipv4Addr,
    pub metro_link_ip: Ipv4Addr,
    pub health_url: String,
    pub edge_admin_url: String,
    /// This region's admin token (its edge and hook take no other).
    #[serde(default)]
    pub token: String,
    pub metro_bird_socket: PathBuf,
    pub node_bird_socket: PathBuf,
}

/// What `edge-ctl` needs to know about a running lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub prefix: String,
    pub dir: PathBuf,
    pub token: String,
    pub anycast: Ipv4Addr,
    pub origin_asn: u32,
    /// The namespace of the origin host, where operators' tools run.
    pub core_ns: String,
    pub origin_url: String,
    /// Management API of the lab's DNS server (pebble-challtestsrv:
    /// `POST /set-txt {"host","value"}`, `POST /clear-txt {"host"}`), where
    /// ownership proofs are published.
    #[serde(default)]
    pub dns_url: String,
    /// A storefront host every region serves (for probes).
    pub demo_host: String,
    pub ca_pem: PathBuf,
    pub regions: Vec<LabRegion>,
    pub services: Vec<Service>,
    pub created_unix: u64,
    /// The database cluster when the lab runs with origin failover
    /// (Patroni and etcd); `None`: one primary on the origin host.
    #[serde(default)]
    pub database: Option<LabDatabase>,
}

/// A lab's Patroni cluster: two origin hosts (failover candidates, each
/// with an origin process beside its database) and every region's replica
/// as a member that only follows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabDatabase {
    /// The failover candidates' hosts; the first bootstrapped the cluster.
    pub hosts: Vec<LabHost>,
    /// Every member's Patroni REST API (https under the internal CA).
    pub patroni_apis: Vec<String>,
    /// etcd's client endpoints (https, client certificate of the internal CA).
    pub etcd: Vec<String>,
    /// Basic auth of Patroni's REST API for what changes the cluster
    /// (`/switchover`…); reading `/cluster` needs none.
    #[serde(default)]
    pub patroni_user: String,
    #[serde(default)]
    pub patroni_password: String,
}

/// An origin host of a lab with origin failover.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabHost {
    /// `core` (the primary region's) or `core2`.
    pub name: String,
    /// The region whose metro it hangs off.
    pub region: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Its origin's public listener (https, internal CA).
    pub origin_url: String,
    /// Its Patroni member's name and REST API.
    pub member: String,
    pub patroni_api: String,
}

/// Writes `bytes` to a file only its owner may read or write (0600, from
/// its creation on): the lab's secrets.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .with_context(|| path.display().to_string())
}

/// The state file of a lab prefix.
pub fn state_path(prefix: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{prefix}.json"))
}

/// A copy of a lab's internal CA certificate at a fixed path, for operators'
/// `curl --cacert` against the origin (which serves TLS under that CA).
pub fn internal_ca_path(prefix: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{prefix}-internal-ca.pem"))
}

/// The CAs a lab's shoppers trust, at a fixed path for `curl --cacert`: the
/// lab's CA (demo names, the platform wildcard) and pebble's issuing root
/// (custom domains, certified on first sight).
pub fn shop_ca_path(prefix: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{prefix}-shop-ca.pem"))
}

impl LabState {
    /// The admin token of region `code` (the lab-wide one for labs made
    /// before tokens were per region).
    pub fn token_for(&self, code: &str) -> &str {
        self.regions
            .iter()
            .find(|r| r.code == code && !r.token.is_empty())
            .map_or(self.token.as_str(), |r| r.token.as_str())
    }

    /// A client of every region's hook, each with that region's token.
    pub fn admin_client(&self) -> Result<crate::client::Client> {
        crate::client::Client::with_tokens(
            &self.token,
            self.regions
                .iter()
                .filter(|r| !r.token.is_empty())
                .map(|r| (r.health_url.clone(), r.token.clone()))
                .collect(),
        )
    }

    /// An HTTP client of the lab's origin: it serves TLS under the lab's
    /// internal CA, which this client trusts (and nothing else).
    pub fn origin_client(&self) -> Result<reqwest::Client> {
        let pem = std::fs::read(self.dir.join("pki").join("ca.pem"))
            .with_context(|| format!("{}: the lab's internal CA", self.dir.display()))?;
        Ok(reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(10))
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
            .build()?)
    }

    /// A shopper's HTTPS client: every name resolves to the anycast address
    /// (port 443), and it trusts the lab's CA (demo names, the platform
    /// wildcard) and pebble's root (custom domains issued on first sight).
    /// Use it from a city's namespace.
    pub fn shopper_client(&self) -> Result<reqwest::ClientBuilder> {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .tls_built_in_root_certs(false)
            .dns_resolver(std::sync::Arc::new(Anycast(self.anycast)));
        for ca in [self.ca_pem.clone(), self.dir.join("pebble-root.pem")] {
            if let Ok(pem) = std::fs::read(&ca) {
                b = b.add_root_certificate(
                    reqwest::Certificate::from_pem(&pem)
                        .with_context(|| ca.display().to_string())?,
                );
            }
        }
        Ok(b)
    }

    pub fn load(prefix: &str) -> Result<LabState> {
        let p = state_path(prefix);
        let bytes = std::fs::read(&p).with_context(|| {
            format!(
                "no lab {prefix:?} ({} missing): start one with `edge-ctl lab up`",
                p.display()
            )
        })?;
        serde_json::from_slice(&bytes).with_context(|| format!("{}: unreadable", p.display()))
    }

    /// Writes the state file, readable by root only (it holds the token).
    pub fn save(&self) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(STATE_DIR)?;
        let p = state_path(&self.prefix);
        let tmp = p.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }

    pub fn region(&self, code: &str) -> Result<&LabRegion> {
        self.regions
            .iter()
            .find(|r| r.code == code)
            .with_context(|| {
                format!(
                    "region {code:?} is not in lab {} (it has {})",
                    self.prefix,
                    self.regions
                        .iter()
                        .map(|r| r.code.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

/// Network namespaces whose names start with `<prefix>-`.
pub fn namespaces(prefix: &str) -> Vec<String> {
    let want = format!("{prefix}-");
    let mut v: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(&want))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Process ids inside a namespace (`ip netns pids`).
pub fn pids(netns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", netns])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The live processes in `netns` whose name (`comm`, cut to 15 bytes by
/// the kernel) is one of `names`.
pub fn pids_named(netns: &str, names: &[&str]) -> Vec<i32> {
    pids(netns)
        .into_iter()
        .filter(|pid| !crate::drill::dead(*pid))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| names.iter().any(|n| c.trim() == &n[..n.len().min(15)]))
        })
        .collect()
}

/// SIGKILLs the processes of [`pids_named`]; returns how many.
pub fn kill_named(netns: &str, names: &[&str]) -> usize {
    pids_named(netns, names)
        .into_iter()
        .filter(|pid| {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        })
        .count()
}

/// SIGKILLs every process in the namespace; returns how many.
pub fn kill_all(netns: &str) -> usize {
    let mut n = 0;
    let me = std::process::id() as i32;
    // This process may itself be in the namespace (the lab builder is).
    for pid in pids(netns).into_iter().filter(|p| *p != me) {
        if nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
        {
            n += 1;
        }
    }
    n
}

/// What [`down`] removed.
#[derive(Debug, Default, Serialize)]
pub struct DownReport {
    pub prefix: String,
    pub namespaces: usize,
    pub processes: usize,
    pub removed_dir: Option<PathBuf>,
}

/// Removes every namespace, process, directory and state file of a lab.
/// Safe to run twice and after a crash.
pub fn down(prefix: &str) -> Result<DownReport> {
    if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("lab prefix {prefix:?}: use letters and digits only");
    }
    let mut report = DownReport {
        prefix: prefix.to_owned(),
        ..DownReport::default()
    };
    let state = LabState::load(prefix).ok();
    let nss = namespaces(prefix);
    // Kill first everywhere (a process may hold sockets in several), twice
    // in case something was forking.
    for _ in 0..2 {
        for ns in &nss {
            report.processes += kill_all(ns);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for ns in &nss {
        let ok = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            report.namespaces += 1;
        }
    }
    if let Some(s) = state {
        // Only directories the lab made (named after its prefix).
        if s.dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("edgefront-lab-{prefix}")))
            && s.dir.exists()
        {
            std::fs::remove_dir_all(&s.dir)
                .with_context(|| format!("remove {}", s.dir.display()))?;
            report.removed_dir = Some(s.dir);
        }
    }
    let _ = std::fs::remove_file(state_path(prefix));
    let _ = std::fs::remove_file(internal_ca_path(prefix));
    let _ = std::fs::remove_file(shop_ca_path(prefix));
    Ok(report)
}

/// Moves the calling thread into a network namespace. Threads it spawns
/// afterwards start there too, so call it before building a runtime.
pub fn enter_netns(name: &str) -> Result<()> {
    let f = std::fs::File::open(Path::new("/run/netns").join(name))
        .with_context(|| format!("network namespace {name} (is the lab up?)"))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter network namespace {name} (needs root)"))?;
    Ok(())
}

/// Resolves every name to the lab's anycast address, as the lab's DNS would
/// for storefront names (reqwest takes the port from the URL).
struct Anycast(Ipv4Addr);

impl reqwest::dns::Resolve for Anycast {
    fn resolve(&self, _name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let addr = std::net::SocketAddr::from((self.0, 0));
        Box::pin(async move {
            let addrs: reqwest::dns::Addrs = Box::new(std::iter::once(addr));
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A network namespace of this test's own, removed (with what runs in
    /// it) when dropped.
    struct Netns(String);

    impl Netns {
        fn new(name: String) -> Self {
            let ok = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip netns add {name} (the test needs root)");
            Netns(name)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            kill_all(&self.0);
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// A daemon that fails twice at start comes back on the third try,
    /// [`RESTART_AFTER`] apart, and one that exits cleanly is left alone.
    #[test]
    fn a_supervised_daemon_that_fails_is_started_again_and_a_clean_exit_is_not() -> Result<()> {
        let ns = Netns::new(format!("efsup{}", std::process::id()));
        let dir = tempfile::tempdir()?;
        let tries = dir.path().join("tries");
        let service = |name: &str, script: String| Service {
            name: name.into(),
            region: None,
            netns: ns.0.clone(),
            argv: vec!["sh".into(), "-c".into(), script],
            env: Vec::new(),
            log: dir.path().join(format!("{name}.log")),
            daemon: true,
        };
        // Counts its starts; fails the first two, then stays up.
        let flaky = service(
            "flaky",
            format!(
                "n=$(cat {t} 2>/dev/null || echo 0); echo $((n+1)) > {t}; \
                 [ \"$n\" -ge 2 ] && exec sleep 60; echo failing; exit 3",
                t = tries.display()
            ),
        );
        let done = service("done", "exit 0".into());
        let mut sup = Supervisor::default();
        sup.start(&flaky)?;
        sup.start(&done)?;
        let t0 = Instant::now();
        let mut said = Vec::new();
        while t0.elapsed() < Duration::from_secs(20) {
            said.extend(sup.check());
            if said.iter().filter(|s| s.contains("started again")).count() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Give a third failure (there must be none) time to be seen.
        std::thread::sleep(Duration::from_millis(500));
        said.extend(sup.check());
        assert_eq!(
            said,
            [
                "flaky failed (exit status: 3)",
                "flaky started again (1)",
                "flaky failed (exit status: 3)",
                "flaky started again (2)",
            ],
            "what the supervisor said"
        );
        assert!(
            t0.elapsed() >= 2 * RESTART_AFTER,
            "restarted sooner than {RESTART_AFTER:?} after each failure: {:?}",
            t0.elapsed()
        );
        assert_eq!(std::fs::read_to_string(&tries)?.trim(), "3");
        let flaky_child = &mut sup.daemons[0].child;
        assert!(
            flaky_child.try_wait()?.is_none(),
            "the third start stays up"
        );
        Ok(())
    }
}
