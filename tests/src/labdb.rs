//! The lab's database with origin failover (issue 18): etcd with three
//! members in three regions (the two origin hosts and a witness region's
//! node), Patroni on two origin hosts (failover candidates, synchronous
//! mode) and on every region node (a replica that only follows, streaming
//! from whoever leads). The shapes are the fixtures' ([`crate::patroni`]):
//! TLS under the lab's internal CA everywhere, etcd's clients and peers
//! showing certificates of it.
//!
//! Every process is a lab [`Service`] in its host's namespace, so
//! `edge-ctl lab down` removes it and a drill can kill and restart it.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgefront_ctl::database::Member;
use edgefront_ctl::lab::{LabDatabase, LabHost, LabState, Service, Supervisor, log_tail};

use crate::netlab::{CORE_IP, CORE2_IP, FailoverPlan, INTERNAL_PORT, Names, ORIGIN_NAME};
use crate::patroni::{EtcdMember, MemberSpec, etcd_member_argv, etcdctl, member_config};

/// Patroni's REST API port on every member.
pub const PATRONI_API_PORT: u16 = 8008;
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

/// One place a member of the cluster runs.
struct Place {
    /// `core`, `core2`, or a region code.
    name: String,
    netns: String,
    ip: Ipv4Addr,
    region: Option<String>,
}

/// The started cluster: what the origins and edges connect to.
pub struct Started {
    pub database: LabDatabase,
    /// The `edgefront` database on each origin host (`core`, `core2`).
    pub host_urls: Vec<(String, String)>,
    ca: std::path::PathBuf,
    members: usize,
    /// Patroni's members, started again when one fails until the cluster
    /// is ready, as systemd does on a machine.
    daemons: Supervisor,
}

/// Starts etcd, then the first candidate (it bootstraps) and waits for it
/// to lead, then starts the second candidate and every region's replica
/// (they clone in the background: [`Started::wait_ready`]); creates the
/// `edgefront` database. Each process is recorded in `state.services`.
pub fn start(state: &mut LabState, plan: &FailoverPlan, pki_dir: &Path) -> Result<Started> {
    use edgefront_certs::pki::{InternalCa, Usage};
    let names = Names(&state.prefix);
    let dir = state.dir.clone();
    let log = |n: &str| dir.join("logs").join(format!("{n}.log"));
    let region_of = |code: &str| state.region(code).cloned();
    let witness = region_of(&plan.witness_region)?;
    let hosts = [
        Place {
            name: "core".into(),
            netns: names.core(),
            ip: CORE_IP,
            region: None,
        },
        Place {
            name: "core2".into(),
            netns: names.core2(),
            ip: CORE2_IP,
            region: None,
        },
    ];
    let etcd_places = [
        &hosts[0],
        &hosts[1],
        &Place {
            name: witness.code.clone(),
            netns: witness.node_ns.clone(),
            ip: witness.node_ip,
            region: Some(witness.code.clone()),
        },
    ];
    // etcd checks that a peer's certificate names the address it calls
    // from: a region node calls from its uplink's address.
    let calls_from = |p: &Place| -> Vec<String> {
        let mut names = vec![p.ip.to_string()];
        if p.name == witness.code {
            names.push(witness.node_link_ip.to_string());
        }
        names
    };
    let ca = InternalCa::open_or_create(pki_dir)?;
    let ca_pem = pki_dir.join("ca.pem");
    ca.ensure("etcd-client", "etcd-client", &[], Usage::Client)?;
    let (client_cert, client_key) = (
        pki_dir.join("etcd-client.pem"),
        pki_dir.join("etcd-client.key"),
    );
    for f in [&client_cert, &client_key] {
        crate::chown_postgres(f)?;
    }

    // etcd: three members, TLS both ways.
    let initial = etcd_places
        .iter()
        .map(|p| format!("{}=https://{}:{ETCD_PEER_PORT}", p.name, p.ip))
        .collect::<Vec<_>>()
        .join(",");
    let token = format!("{}-etcd", state.prefix);
    let mut etcd_endpoints = Vec::new();
    for p in etcd_places {
        let file = format!("etcd-{}", p.name);
        ca.ensure(&file, &file, &calls_from(p), Usage::Peer)?;
        let data = dir.join("etcd").join(&p.name);
        std::fs::create_dir_all(&data)?;
        let client = format!("{}:{ETCD_CLIENT_PORT}", p.ip);
        let argv = etcd_member_argv(&EtcdMember {
            name: &p.name,
            data_dir: &data,
            client: &client,
            peer: &format!("{}:{ETCD_PEER_PORT}", p.ip),
            initial: &initial,
            token: &token,
            ca: &ca_pem,
            cert: &pki_dir.join(format!("{file}.pem")),
            key: &pki_dir.join(format!("{file}.key")),
        });
        let svc = Service {
            name: format!("etcd-{}", p.name),
            region: p.region.clone(),
            netns: p.netns.clone(),
            argv,
            env: Vec::new(),
            log: log(&format!("etcd-{}", p.name)),
            daemon: true,
        };
        svc.start()?;
        state.services.push(svc);
        etcd_endpoints.push(client);
    }
    state.save()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = etcdctl(
            &etcd_endpoints,
            &ca_pem,
            Some((client_cert.as_path(), client_key.as_path())),
        )
        .args(["endpoint", "health"])
        .output()?;
        if out.status.success() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "etcd not healthy within 30 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // Patroni: the candidates, then a replica per region.
    let scope = format!("{}-db", state.prefix);
    // Members trust TLS connections from the lab's machines only: the
    // origin hosts and every region node (its own address and its uplink's,
    // which it connects from); never a shopper city's.
    let trusted: Vec<String> = [CORE_IP, CORE2_IP]
        .into_iter()
        .chain(
            state
                .regions
                .iter()
                .flat_map(|r| [r.node_ip, r.node_link_ip]),
        )
        .map(|ip| format!("{ip}/32"))
        .collect();
    let api_user = "edgefront-lab";
    let api_password = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let mut members: Vec<(Place, bool)> = hosts.into_iter().map(|h| (h, true)).collect();
    for r in &state.regions {
        members.push((
            Place {
                name: format!("replica-{}", r.code),
                netns: r.node_ns.clone(),
                ip: r.node_ip,
                region: Some(r.code.clone()),
            },
            false,
        ));
    }
    let root = dir.join("patroni");
    std::fs::create_dir_all(&root)?;
    let homes = members
        .iter()
        .map(|(p, _)| Ok(crate::pg_dir(&format!("{}-", p.name), Some(&root))?.keep()))
        .collect::<Result<Vec<_>>>()?;
    // New members clone over the candidates' sockets (their homes).
    let sockets: Vec<_> = members
        .iter()
        .zip(&homes)
        .filter(|((_, candidate), _)| *candidate)
        .map(|(_, home)| home.clone())
        .collect();
    let clone_home = root.join("clone");
    std::fs::create_dir_all(&clone_home)?;
    crate::chown_postgres(&clone_home)?;
    let clone = root.join("clone-local.sh");
    std::fs::write(
        &clone,
        crate::patroni::local_clone_script(&sockets, &clone_home),
    )?;
    std::fs::set_permissions(&clone, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut apis = Vec::new();
    let mut services = Vec::new();
    for ((p, candidate), home) in members.iter().zip(homes) {
        let member = p.name.clone();
        let config = member_config(&MemberSpec {
            scope: &scope,
            name: &member,
            dir: &home,
            host: &p.ip.to_string(),
            pg_port: 5432,
            pg_connect: format!("{}:5432", p.ip),
            api_port: PATRONI_API_PORT,
            api_connect: format!("{}:{PATRONI_API_PORT}", p.ip),
            api_tls: true,
            etcd_hosts: etcd_order(&etcd_endpoints, p.ip),
            // Beside an etcd member (the candidates, the witness region's
            // replica): that member first, as ansible does.
            etcd_in_order: etcd_endpoints
                .iter()
                .any(|e| e.starts_with(&format!("{}:", p.ip))),
            etcd_ca: &ca_pem,
            etcd_cert: &client_cert,
            etcd_key: &client_key,
            pki: pki_dir,
            trusted: &trusted,
            api_auth: Some((api_user, &api_password)),
            candidate: *candidate,
            log_level: "INFO",
            clone_command: Some(&clone),
        })?;
        // It holds the REST API's password: Patroni's user only.
        let path = home.join("patroni.yml");
        edgefront_ctl::lab::write_private(&path, &serde_json::to_vec_pretty(&config)?)?;
        crate::chown_postgres(&path)?;
        apis.push(format!("https://{}:{PATRONI_API_PORT}", p.ip));
        services.push(Service {
            // A region's member keeps the name of the replica it replaces:
            // drills kill and restart `replica-<region>`.
            name: if *candidate {
                format!("patroni-{}", p.name)
            } else {
                p.name.clone()
            },
            region: p.region.clone(),
            netns: p.netns.clone(),
            argv: patroni_argv(&path),
            env: vec![("HOME".into(), home.display().to_string())],
            log: log(&format!("patroni-{}", p.name)),
            daemon: true,
        });
    }
    // The first candidate bootstraps alone; the others clone from it.
    let mut daemons = Supervisor::default();
    daemons.start(&services[0])?;
    wait_members(
        &ca_pem,
        &apis[..1],
        Duration::from_secs(60),
        "a leader",
        |m| m.iter().any(|m| m.role == "leader" && m.state == "running"),
        &mut daemons,
    )
    .with_context(|| {
        format!(
            "see {}, which ends:\n{}",
            services[0].log.display(),
            log_tail(&services[0].log, 20)
        )
    })?;
    for s in &services[1..] {
        daemons.start(s)?;
    }
    state.services.extend(services);
    state.save()?;
    let url = |ip: Ipv4Addr| crate::pg_url(&ip.to_string(), 5432, &ca_pem);
    let out = std::process::Command::new(Path::new(crate::PG_BIN).join("psql"))
        .arg(url(CORE_IP).replace("/edgefront?", "/postgres?"))
        .args(["-qc", "CREATE DATABASE edgefront"])
        .output()?;
    if !out.status.success() {
        bail!("create database: {}", String::from_utf8_lossy(&out.stderr));
    }
    let database = LabDatabase {
        hosts: [
            ("core", CORE_IP, names.core()),
            ("core2", CORE2_IP, names.core2()),
        ]
        .into_iter()
        .map(|(name, ip, netns)| LabHost {
            name: name.into(),
            region: if name == "core" {
                state.regions[0].code.clone()
            } else {
                plan.standby_region.clone()
            },
            netns,
            ip,
            origin_url: format!("https://{ip}:8000"),
            member: name.into(),
            patroni_api: format!("https://{ip}:{PATRONI_API_PORT}"),
        })
        .collect(),
        patroni_apis: apis,
        etcd: etcd_endpoints,
        patroni_user: api_user.into(),
        patroni_password: api_password,
    };
    Ok(Started {
        database,
        host_urls: vec![
            ("core".into(), url(CORE_IP)),
            ("core2".into(), url(CORE2_IP)),
        ],
        ca: ca_pem,
        members: members.len(),
        daemons,
    })
}

impl Started {
    /// Waits until the standby and every region's replica are cloned and
    /// replicate (they start in the background while the lab goes on): a
    /// leader, a synchronous standby, every member running.
    pub fn wait_ready(&mut self) -> Result<()> {
        let want = self.members;
        wait_members(
            &self.ca,
            &self.database.patroni_apis,
            Duration::from_secs(120),
            "a leader, a synchronous standby and every replica streaming",
            |m| {
                m.len() == want
                    && m.iter().any(|m| m.role == "leader")
                    && m.iter().any(|m| m.role == "sync_standby")
                    && m.iter()
                        .all(|m| m.state == "running" || m.state == "streaming")
            },
            &mut self.daemons,
        )
        .map(|_| ())
    }
}

/// The names and internal-API address of an origin host's certificates.
pub fn origin_names(ip: Ipv4Addr) -> Vec<String> {
    vec![ip.to_string(), ORIGIN_NAME.to_owned()]
}

/// `host:port` of an origin host's internal API.
pub fn internal_addr(ip: Ipv4Addr) -> String {
    format!("{ip}:{INTERNAL_PORT}")
}

/// etcd's endpoints in the order a member at `ip` should use them: its own
/// host's first, then the witness region's, then the origin hosts' (the
/// second before the first). A member beside an etcd member keeps this
/// order (`use_proxies`, [`MemberSpec::etcd_in_order`]) and sends every
/// request and its watch to the first that answers; the others pick at
/// random. The watch is opened with Patroni's default TCP keepalive (ttl
/// 30 s) since the cluster's `ttl` is not read yet: a standby watching
/// through the dead leader host's etcd kept showing the dead leader for
/// ~35 s after a power pull (CI, 2026-12-07: core had picked core2's etcd
/// at random), one watching through its own live etcd sees the leader key
/// expire (ttl 10 s).
fn etcd_order(endpoints: &[String], ip: Ipv4Addr) -> Vec<String> {
    // Created in this order: core, core2, the witness.
    let mut order: Vec<String> = endpoints.iter().rev().cloned().collect();
    order.sort_by_key(|e| !e.starts_with(&format!("{ip}:")));
    order
}

/// Runs Patroni as `postgres` (PostgreSQL refuses root); `setpriv` execs,
/// so a kill of the service's process is a kill of Patroni.
fn patroni_argv(config: &Path) -> Vec<String> {
    [
        "setpriv",
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
        "patroni",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(std::iter::once(config.display().to_string()))
    .collect()
}

/// Waits until the cluster, as the first answering of `apis` lists it
/// (`edge-ctl database`'s reader), satisfies `ok`.
fn wait_members(
    ca: &Path,
    apis: &[String],
    timeout: Duration,
    what: &str,
    ok: impl Fn(&[Member]) -> bool,
    daemons: &mut Supervisor,
) -> Result<Vec<Member>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let deadline = Instant::now() + timeout;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        for said in daemons.check() {
            eprintln!("edgefront lab: {said}");
        }
        if let Ok(c) = rt.block_on(edgefront_ctl::database::read(apis, Some(ca))) {
            if ok(&c.members) {
                return Ok(c.members);
            }
            last = c.members;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!(
        "{what}: not within {timeout:?}: {:?}",
        last.iter()
            .map(|m| format!("{} {} {}", m.name, m.role, m.state))
            .collect::<Vec<_>>()
    )
}
