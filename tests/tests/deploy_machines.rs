//! What ansible deploys works: real Debian 12 machines booted with systemd
//! (an origin host and two region nodes, each region node also its region's
//! replica server) get `playbooks/site.yml` unchanged from production; only
//! the inventory is the test's. Then, through what ansible installed:
//! PostgreSQL primary and TLS streaming replicas, the origin, edges, health
//! hooks and BGP sessions to a provider router; a shopper in a city reaches
//! the anycast address; a seller's write through one region shows in the
//! other; `edge-ctl status` in production mode; a second run changes
//! nothing.
//!
//! The machines: `edgefront_tests::machines` (systemd-nspawn on an overlay
//! of a cached mmdebstrap root; tests/scripts/debian-rootfs.sh).

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgefront_ctl::probe::Shopper;
use edgefront_tests::machines::{self, LAN_GATEWAY, Lan};
use edgefront_tests::netlab::{self, sh};
use edgefront_tests::{PEBBLE_ACME_PORT, PEBBLE_MANAGEMENT_PORT};
use serde_json::json;

const ANYCAST: &str = "203.0.113.10";
const ROUTER_ASN: u32 = 64515;
const BGP_PASSWORD: &str = "deploy-test-bgp-secret";

fn repo() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .canonicalize()
        .unwrap()
}

/// The secrets production keeps in an ansible-vault file (test values).
fn secrets() -> serde_json::Value {
    json!({
        "edgefront_admin_tokens": {"bom1": "admin-bom1-0123456789abcdef0123456789abcdef", "sin1": "admin-sin1-0123456789abcdef0123456789abcdef"},
        "edgefront_status_token": "status-0123456789abcdef0123456789abcdef",
        "edgefront_internal_token": "internal-0123456789abcdef0123456789abcdef",
        "edgefront_cert_key": "11".repeat(32),
        "edgefront_bgp_password": BGP_PASSWORD,
        "edgefront_ryw_keys": format!("k1:{}", "22".repeat(32)),
        "edgefront_replication_password": "replication-0123456789abcdef0123456789abcdef",
        "edgefront_db_password": "database-0123456789abcdef0123456789abcdef",
        "edgefront_pg_rewind_password": "rewind-0123456789abcdef0123456789abcdef",
        "edgefront_patroni_restapi_password": "patroni-0123456789abcdef0123456789abcdef",
    })
}

/// The two deploy tests boot three machines each and run ansible: one at a
/// time on this machine.
static ONE_LAN: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Hosts {
    origin: Ipv4Addr,
    nodes: Vec<(&'static str, Ipv4Addr)>,
    /// Origin failover: etcd on all three machines, Patroni's failover
    /// candidates the origin host and the second node (its region's
    /// replica server is the synchronous standby), no backup host.
    failover: bool,
}

/// An ACME CA on the provider's LAN, as a private CA in production would be:
/// pebble (Debian) at the LAN gateway, and pebble-challtestsrv as the DNS
/// both it and the origin resolve through (every name answers with the
/// anycast address, so HTTP-01 validation reaches the nearest region; the
/// sellers' ownership proofs are TXT records set through its management
/// API).
struct AcmeCa {
    _dns: KillOnDrop,
    _pebble: KillOnDrop,
    /// The root of pebble's own TLS listener (the edges verify its
    /// directory against it: `edge_acme_ca_root_src`).
    listener_ca: PathBuf,
}

const DNS_PORT: u16 = 8053;
const DNS_MANAGEMENT_PORT: u16 = 8055;

impl AcmeCa {
    fn start(lan: &Lan) -> Result<AcmeCa> {
        let dir = lan.dir().join("pebble");
        let listener_ca = edgefront_tests::pebble_files(&dir, LAN_GATEWAY.into())?;
        let ns = lan.netns();
        let spawn = |what: &str, args: Vec<String>, env: &[(&str, &str)]| -> Result<KillOnDrop> {
            let log = std::fs::File::create(dir.join(format!("{what}.log")))?;
            let child = Command::new("ip")
                .args(["netns", "exec", &ns])
                .args(&args)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("{what} (Debian pebble)"))?;
            Ok(KillOnDrop(child))
        };
        let dns = spawn(
            "challtestsrv",
            std::iter::once("pebble-challtestsrv".to_owned())
                .chain(edgefront_tests::Dns::args(
                    (LAN_GATEWAY, DNS_PORT).into(),
                    ANYCAST.parse()?,
                    (LAN_GATEWAY, DNS_MANAGEMENT_PORT).into(),
                ))
                .collect(),
            &[],
        )?;
        let pebble = spawn(
            "pebble",
            vec![
                "pebble".into(),
                "-config".into(),
                dir.join("pebble.json").display().to_string(),
                "-dnsserver".into(),
                format!("{LAN_GATEWAY}:{DNS_PORT}"),
            ],
            &[("PEBBLE_VA_NOSLEEP", "1")],
        )?;
        let ca = AcmeCa {
            _dns: dns,
            _pebble: pebble,
            listener_ca,
        };
        for port in [PEBBLE_ACME_PORT, DNS_MANAGEMENT_PORT] {
            eventually(
                &format!("{LAN_GATEWAY}:{port} listening"),
                Duration::from_secs(15),
                || {
                    Ok(Command::new("ip")
                        .args(["netns", "exec", &ns, "bash", "-c"])
                        .arg(format!("exec 3<>/dev/tcp/{LAN_GATEWAY}/{port}"))
                        .stderr(Stdio::null())
                        .status()?
                        .success())
                },
            )?;
        }
        Ok(ca)
    }

    /// What the inventory sets for it: production's variables, with the
    /// directory of a private CA and the DNS server proofs are read from.
    fn inventory_vars(&self) -> serde_json::Value {
        json!({
            "edge_acme_directory": format!("https://{LAN_GATEWAY}:{PEBBLE_ACME_PORT}/dir"),
            "edge_acme_ca_root_src": self.listener_ca.display().to_string(),
            "origin_dns_server": format!("{LAN_GATEWAY}:{DNS_PORT}"),
        })
    }

    /// pebble's issuing root (made at its start): what a shopper's browser
    /// would trust.
    fn issuing_root(&self, lan: &Lan) -> Result<PathBuf> {
        let ca = self.listener_ca.clone();
        let root = netlab::in_netns(&lan.netns(), move || {
            edgefront_tests::pebble_issuing_root(
                &format!("{LAN_GATEWAY}:{PEBBLE_MANAGEMENT_PORT}"),
                &ca,
            )
        })??;
        let path = lan.dir().join("pebble").join("issuing-root.pem");
        std::fs::write(&path, root)?;
        Ok(path)
    }

    /// Publishes a TXT record (a seller's ownership proof).
    fn set_txt(&self, lan: &Lan, name: &str, value: &str) -> Result<()> {
        let (name, value) = (name.to_owned(), value.to_owned());
        netlab::in_netns(&lan.netns(), move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(edgefront_tests::dns_set_txt(
                    &format!("http://{LAN_GATEWAY}:{DNS_MANAGEMENT_PORT}"),
                    &name,
                    &value,
                ))
        })?
    }
}

/// The inventory: production's shape (inventory/example.yml), production's
/// group_vars (linked, not copied), the test's hosts and secrets.
fn inventory(dir: &Path, hosts: &Hosts, acme: Option<&AcmeCa>) -> Result<PathBuf> {
    let inv = dir.join("inventory");
    let all = inv.join("group_vars/all");
    std::fs::create_dir_all(&all)?;
    let shipped = repo().join("ansible/inventory/group_vars/all");
    for f in ["main.yml", "regions.json"] {
        std::os::unix::fs::symlink(shipped.join(f), all.join(f))?;
    }
    std::fs::write(
        all.join("secrets.json"),
        serde_json::to_vec_pretty(&secrets())?,
    )?;
    let mut edges = serde_json::Map::new();
    let mut replicas = serde_json::Map::new();
    for (code, addr) in &hosts.nodes {
        let name = format!("node-{code}");
        edges.insert(
            name.clone(),
            json!({
                "ansible_host": addr.to_string(),
                "edgefront_region": code,
                "edgefront_role": "edge",
                "edgefront_anycast_prefix": format!("{ANYCAST}/32"),
                "edgefront_bgp_peers": [{
                    "description": format!("provider router {code}"),
                    "ip": LAN_GATEWAY.to_string(),
                    "asn": ROUTER_ASN,
                }],
            }),
        );
        replicas.insert(name, json!({}));
    }
    let mut doc = json!({
        "all": {
            "children": {
                "origin": {"hosts": {"origin-host": {"ansible_host": hosts.origin.to_string()}}},
                "edges": {"hosts": edges},
                "replicas": {"hosts": replicas},
                // Backups of the primary on the Singapore node (not the origin host).
                "backup": {"hosts": {"node-sin1": {}}},
            }
        }
    });
    if let Some(ca) = acme {
        doc["all"]["vars"] = ca.inventory_vars();
    }
    if hosts.failover {
        let children = &mut doc["all"]["children"];
        children
            .as_object_mut()
            .context("children")?
            .remove("backup");
        // The groups in a YAML file of their own: a group's order matters
        // (the origin host first among the candidates) and a JSON object
        // here is sorted.
        let mut groups =
            String::from("all:\n  children:\n    etcd:\n      hosts:\n        origin-host:\n");
        for (code, _) in &hosts.nodes {
            groups += &format!("        node-{code}:\n");
        }
        groups += &format!(
            "    db_candidates:\n      hosts:\n        origin-host:\n        node-{}:\n",
            hosts.nodes[1].0
        );
        std::fs::write(inv.join("failover.yml"), groups)?;
        // The origin host's region, for etcd and Patroni (the origin's play
        // sets it for its own roles).
        children["origin"]["hosts"]["origin-host"]["edgefront_region"] = json!(hosts.nodes[0].0);
        // What these containers cannot have: a watchdog (no /dev/watchdog,
        // no kernel modules). Production keeps `required`.
        doc["all"]["vars"] = json!({
            "patroni_watchdog_mode": "off",
            "patroni_watchdog_softdog": false,
        });
    }
    std::fs::write(inv.join("hosts.json"), serde_json::to_vec_pretty(&doc)?)?;
    Ok(inv)
}

/// The provider's router: BIRD in the LAN's namespace, one eBGP session
/// per region node, the anycast route into the namespace's kernel table
/// (cities behind it follow it).
fn router(lan: &Lan, hosts: &Hosts) -> Result<Child> {
    let dir = lan.dir().join("router");
    std::fs::create_dir_all(&dir)?;
    let mut conf = format!(
        "router id {LAN_GATEWAY};\nlog \"{}\" all;\nprotocol device {{ scan time 1; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; }}\n",
        dir.join("bird.log").display()
    );
    for (i, (code, addr)) in hosts.nodes.iter().enumerate() {
        conf.push_str(&format!(
            "protocol bgp node{i} {{\n  description \"{code}\";\n  local {LAN_GATEWAY} as {ROUTER_ASN};\n  \
             neighbor {addr} as 64500;\n  password \"{BGP_PASSWORD}\";\n  hold time 3;\n  keepalive time 1;\n  \
             connect retry time 1;\n  error wait time 1, 5;\n  ipv4 {{ import all; export none; }};\n}}\n"
        ));
    }
    let path = dir.join("bird.conf");
    std::fs::write(&path, conf)?;
    let ns = lan.netns();
    for (k, v) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
    ] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-q",
            "-w",
            &format!("{k}={v}"),
        ])?;
    }
    Command::new("ip")
        .args(["netns", "exec", &ns, "bird", "-f", "-c"])
        .arg(&path)
        .arg("-s")
        .arg(dir.join("bird.ctl"))
        .arg("-P")
        .arg(dir.join("bird.pid"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("bird (Debian bird2)")
}

fn recap(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.contains(" ok=") && l.contains("changed="))
        .collect()
}

/// `curl` from a namespace; returns status line and headers and body.
fn curl(ns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "-i", "--max-time", "5"])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let last = match f() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?} (last error: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The LAN `prefix` with its three machines booted (the origin host, and
/// the bom1 and sin1 nodes at the region data's addresses, so edge-ctl
/// finds them) and a city attached: the LAN, the hosts, the city's
/// namespace.
fn boot(rootfs: &Path, prefix: &str, failover: bool) -> Result<(Lan, Hosts, String)> {
    let mut lan = Lan::new(prefix)?;
    let regions = edgefront_regions::Regions::builtin()?;
    let node = |code: &'static str| -> Result<(&'static str, Ipv4Addr)> {
        Ok((code, regions.get(code)?.node_ipv4))
    };
    let hosts = Hosts {
        origin: Ipv4Addr::new(198, 51, 100, 100),
        nodes: vec![node("bom1")?, node("sin1")?],
        failover,
    };
    let started = Instant::now();
    lan.boot(rootfs, "origin-host", hosts.origin)?;
    for (code, addr) in &hosts.nodes {
        lan.boot(rootfs, &format!("node-{code}"), *addr)?;
    }
    eprintln!("booted 3 machines in {:?}", started.elapsed());
    let (city, _, _) = lan.attach("city", 0)?;
    // The city stands for many shoppers, its load opening a connection per
    // request to one address: without these, a long rolling upgrade ran it
    // out of local ports (connect: EAGAIN, the client's own limit).
    sh(&[
        "ip",
        "netns",
        "exec",
        &city,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_tw_reuse=1",
    ])?;
    Ok((lan, hosts, city))
}

#[test]
fn site_yml_deploys_booted_debian_machines_that_serve_shoppers_and_sellers() -> Result<()> {
    let rootfs = machines::rootfs()?;
    // Before the machines: dropped after they are powered off.
    let _one = ONE_LAN.lock().unwrap_or_else(|e| e.into_inner());
    let (mut lan, hosts, city) = boot(&rootfs, &format!("efd{}", std::process::id()), false)?;
    let _router = KillOnDrop(router(&lan, &hosts)?);
    let acme = AcmeCa::start(&lan)?;

    let inv = inventory(lan.dir(), &hosts, Some(&acme))?;
    let inv = inv.display().to_string();
    let ansible = repo().join("ansible");
    let started = Instant::now();
    let (ok, out) = lan.ansible_playbook(&ansible, &["-i", &inv, "playbooks/site.yml"])?;
    eprintln!(
        "site.yml: {:?}\n{}",
        started.elapsed(),
        recap(&out).join("\n")
    );
    if !ok {
        eprintln!("{}", diagnostics(&lan));
        bail!("site.yml failed:\n{out}");
    }

    // Debugging aid: keep the machines up for a look by hand.
    if let Some(secs) = std::env::var("EDGEFRONT_DEPLOY_TEST_HOLD")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!(
            "holding {secs} s: ip netns exec {} ssh -i {} root@<address>",
            lan.netns(),
            lan.key().display()
        );
        std::thread::sleep(Duration::from_secs(secs));
    }
    let checked = serves(&lan, &hosts, &city)
        .and_then(|seller| custom_domain_certified(&lan, &hosts, &city, &seller, &acme));
    if let Err(e) = checked {
        eprintln!("{}", diagnostics(&lan));
        return Err(e);
    }
    backup_restores(&mut lan, &rootfs)?;

    // Idempotent.
    let (ok, again) = lan.ansible_playbook(&ansible, &["-i", &inv, "playbooks/site.yml"])?;
    assert!(ok, "second site.yml failed:\n{again}");
    let lines = recap(&again);
    assert_eq!(lines.len(), 3, "{again}");
    assert!(lines.iter().all(|l| l.contains("changed=0")), "{again}");

    replica_rebuilt(&lan, &inv, &city, &hosts)?;

    // The rolling upgrade, a new version on every node, one region at a
    // time, under a city's load through the anycast address.
    let tally = upgrade_under_load(&lan, &city, &inv, &["-e", "edgefront_version=0.1.0-next"])?;
    for (code, _) in &hosts.nodes {
        let exe = main_exe(&lan, &format!("node-{code}"), "edgefront-edge")?;
        assert!(exe.contains("0.1.0-next"), "node-{code} runs {exe}");
    }
    assert!(
        tally.by_region.len() == 2,
        "both regions served the city at some point: {tally:?}"
    );

    // Reload mode refuses a change that needs a restart (a new database
    // password in the edge's env file), before touching anything.
    let pid_before = lan.ssh(
        "node-bom1",
        "systemctl show -p MainPID --value edgefront-edge",
    )?;
    let (ok, out) = lan.ansible_playbook(
        &repo().join("ansible"),
        &[
            "-i",
            &inv,
            "playbooks/rolling-upgrade.yml",
            "-e",
            "edgefront_version=0.1.0-refused",
            "-e",
            "upgrade_mode=reload",
            "-e",
            "edgefront_db_password=database-rotated-0123456789abcdef",
        ],
    )?;
    assert!(
        !ok && out.contains("use the default"),
        "reload mode must refuse:\n{out}"
    );
    let pid_after = lan.ssh(
        "node-bom1",
        "systemctl show -p MainPID --value edgefront-edge",
    )?;
    assert_eq!(pid_before, pid_after, "the refused run restarted nothing");
    assert!(main_exe(&lan, "node-bom1", "edgefront-edge")?.contains("0.1.0-next"));

    // An edge-only fix by reload: no drain, the route never moves, the hook
    // keeps its binary. It also rotates the read-your-writes keys (a secret
    // file): the successor signs with the new one; and every region's admin
    // token, which the edge and the hook both hold (files both read again
    // on reload): the same hook process answers only the new one.
    let rotated = format!(
        "edgefront_ryw_keys=k2:{},k1:{}",
        "33".repeat(32),
        "22".repeat(32)
    );
    let rotated_token = |code: &str| format!("admin-{code}-rotated-0123456789abcdef0123456789");
    let rotated_tokens = json!({
        "edgefront_admin_tokens": hosts
            .nodes
            .iter()
            .map(|(code, _)| (code.to_string(), json!(rotated_token(code))))
            .collect::<serde_json::Map<_, _>>(),
    })
    .to_string();
    let hook_pid = |name: &str| lan.ssh(name, "systemctl show -p MainPID --value edgefront-health");
    let mut hooks_before = Vec::new();
    for (code, _) in &hosts.nodes {
        hooks_before.push(hook_pid(&format!("node-{code}"))?);
    }
    let tally = upgrade_under_load(
        &lan,
        &city,
        &inv,
        &[
            "-e",
            "edgefront_version=0.1.0-fix",
            "-e",
            "upgrade_mode=reload",
            "-e",
            &rotated,
            "-e",
            &rotated_tokens,
        ],
    )?;
    let secrets = secrets();
    for ((code, addr), before) in hosts.nodes.iter().zip(&hooks_before) {
        let name = format!("node-{code}");
        assert!(
            main_exe(&lan, &name, "edgefront-edge")?.contains("0.1.0-fix"),
            "{name}'s edge"
        );
        assert!(
            main_exe(&lan, &name, "edgefront-health")?.contains("0.1.0-next"),
            "{name}'s hook was not restarted"
        );
        assert_eq!(
            &hook_pid(&name)?,
            before,
            "{name}'s hook took the rotated token by reload, not a restart"
        );
        let status_with = |token: &str| -> Result<String> {
            let out = curl(
                &lan.netns(),
                &[
                    "-H",
                    &format!("authorization: Bearer {token}"),
                    &format!("http://{addr}:9180/status"),
                ],
            )?;
            Ok(out.lines().next().unwrap_or_default().to_owned())
        };
        let old = secrets["edgefront_admin_tokens"][code]
            .as_str()
            .context("the old token")?;
        assert!(
            status_with(&rotated_token(code))?.contains(" 200"),
            "{name}'s hook answers the rotated token"
        );
        assert!(
            status_with(old)?.contains(" 401"),
            "{name}'s hook refuses the old token"
        );
    }
    assert_eq!(tally.by_region.len(), 1, "the route never moved: {tally:?}");
    // A seller's write through an edge now carries a cookie signed with k2.
    let bom1 = hosts.nodes[0].1;
    let out = curl(
        &lan.netns(),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"name":"Rotated","slug":"rotated-keys","currency":"EUR"}"#,
            &format!("http://{bom1}/api/stores"),
        ],
    )?;
    let cookie = out
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: ef_lsn="))
        .with_context(|| format!("no read-your-writes cookie:\n{out}"))?;
    assert!(
        cookie.contains(".k2."),
        "signed with the rotated key: {cookie}"
    );

    // Last: once the stores' platform names have a certificate, plain HTTP
    // to them is redirected to https (the shoppers' load above is plain).
    platform_wildcard_installed(&lan, &city, &inv)
}

/// Issue 18 on booted machines: with the groups `etcd` and `db_candidates`,
/// site.yml runs etcd on all three machines and PostgreSQL under Patroni —
/// the origin host leads, the Singapore node (its region's replica server)
/// is the synchronous standby, the Mumbai node's replica a `nofailover`
/// member. A seller's write through an edge shows in the other region.
/// Then the origin host's power is pulled: the standby leads with every
/// committed row, the Mumbai replica follows it, and the city is still
/// served through the anycast address.
///
/// The machines start as production hosts do after the package install:
/// each with the empty cluster Debian's `postgresql-15` makes (one image:
/// the same system identifier everywhere). The first candidate's Patroni
/// takes it over; the others move theirs aside and clone.
#[test]
fn site_yml_deploys_origin_failover_that_survives_a_power_pull() -> Result<()> {
    let rootfs = machines::rootfs()?;
    let _one = ONE_LAN.lock().unwrap_or_else(|e| e.into_inner());
    // `efd<pid>`: a crashed run's machines are swept by the next one.
    let (mut lan, hosts, city) = boot(&rootfs, &format!("efd{}p", std::process::id()), true)?;
    let _router = KillOnDrop(router(&lan, &hosts)?);
    let inv = inventory(lan.dir(), &hosts, None)?;
    let inv = inv.display().to_string();
    let started = Instant::now();
    let (ok, out) =
        lan.ansible_playbook(&repo().join("ansible"), &["-i", &inv, "playbooks/site.yml"])?;
    eprintln!(
        "site.yml with etcd and Patroni: {:?}\n{}",
        started.elapsed(),
        recap(&out).join("\n")
    );
    if !ok {
        eprintln!("{}", diagnostics(&lan));
        bail!("site.yml failed:\n{out}");
    }

    // The cluster, as the runbook's command lists it.
    let members = |lan: &Lan, host: &str| -> Result<Vec<serde_json::Value>> {
        let out = lan.ssh(
            host,
            "sh -c 'set -a; . /etc/patroni/patroni.env; patronictl -c /etc/patroni/config.yml list -f json'",
        )?;
        serde_json::from_str(&out).with_context(|| format!("patronictl list on {host}: {out}"))
    };
    let role_of = |m: &[serde_json::Value], name: &str| -> Option<(String, String)> {
        m.iter().find(|x| x["Member"] == name).map(|x| {
            (
                x["Role"].as_str().unwrap_or("").to_owned(),
                x["State"].as_str().unwrap_or("").to_owned(),
            )
        })
    };
    let m = members(&lan, "origin-host")?;
    assert_eq!(m.len(), 3, "{m:?}");
    assert_eq!(
        role_of(&m, "origin-host"),
        Some(("Leader".into(), "running".into())),
        "{m:?}"
    );
    eventually(
        "the Singapore node as synchronous standby",
        Duration::from_secs(60),
        || {
            let m = members(&lan, "origin-host")?;
            Ok(
                role_of(&m, "node-sin1").is_some_and(|(r, _)| r == "Sync Standby")
                    && role_of(&m, "region-bom1").is_some_and(|(r, s)| {
                        r == "Replica" && (s == "running" || s == "streaming")
                    }),
            )
        },
    )?;

    // A seller's store through the Mumbai edge, shown by the Singapore edge
    // from its replica (the standby).
    let (bom1, sin1) = (hosts.nodes[0].1, hosts.nodes[1].1);
    let out = curl(
        &lan.netns(),
        &[
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"name":"Failover Test","slug":"deploy-test","currency":"EUR"}"#,
            &format!("http://{bom1}/api/stores"),
        ],
    )?;
    assert!(out.starts_with("HTTP/1.1 201"), "{out}");
    let created: serde_json::Value =
        serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap_or_default())
            .with_context(|| out.clone())?;
    let seller = created["token"]
        .as_str()
        .context("the store's token")?
        .to_owned();
    let host_header = format!("host: {STORE_HOST}");
    eventually("the store shows in sin1", Duration::from_secs(20), || {
        let page = curl(
            &lan.netns(),
            &["-H", &host_header, &format!("http://{sin1}/")],
        )?;
        Ok(page.contains("x-edge-route: sin1") && page.contains("Failover Test"))
    })?;

    // Rows the leader committed (acknowledged only once the synchronous
    // standby has them), then the power pull.
    let made = psql(
        &lan,
        "origin-host",
        "CREATE TABLE acked (id int PRIMARY KEY); INSERT INTO acked SELECT generate_series(1, 500); SELECT count(*) FROM acked",
    )?;
    assert!(made.trim().ends_with("500"), "{made}");
    lan.power_pull("origin-host")?;
    let pulled = Instant::now();
    eventually("the Singapore node leads", Duration::from_secs(90), || {
        let m = members(&lan, "node-sin1")?;
        Ok(role_of(&m, "node-sin1") == Some(("Leader".into(), "running".into())))
    })?;
    let promoted_after = pulled.elapsed();
    let kept = psql(&lan, "node-sin1", "SELECT count(*) FROM acked")?;
    assert_eq!(kept.trim(), "500", "every committed row on the new leader");
    let wrote = psql(
        &lan,
        "node-sin1",
        "INSERT INTO acked VALUES (501); SELECT count(*) FROM acked",
    )?;
    assert!(
        wrote.trim().ends_with("501"),
        "the new leader takes writes: {wrote}"
    );
    eventually(
        "the Mumbai replica follows the new leader",
        Duration::from_secs(60),
        || Ok(psql(&lan, "node-bom1", "SELECT count(*) FROM acked")?.trim() == "501"),
    )?;
    let followed_after = pulled.elapsed();
    // Sellers' writes go on through the edges: the Mumbai edge sends them
    // to the origin beside the new leader (the only one answering
    // /healthz), and the write shows in both regions.
    let bearer = format!("authorization: Bearer {seller}");
    let mut wrote_after = None;
    eventually(
        "a seller's write through the Mumbai edge after the pull",
        Duration::from_secs(60),
        || {
            let out = curl(
                &lan.netns(),
                &[
                    "-H",
                    &bearer,
                    "-H",
                    "content-type: application/json",
                    "-d",
                    r#"{"name":"After the pull"}"#,
                    &format!("http://{bom1}/api/categories"),
                ],
            )?;
            let done = status(&out) == 201 || status(&out) == 200;
            if done {
                wrote_after = Some(pulled.elapsed());
            }
            Ok(done)
        },
    )?;
    for host in ["node-sin1", "node-bom1"] {
        eventually(
            &format!("the write after the pull on {host}"),
            Duration::from_secs(20),
            || {
                Ok(psql(
                    &lan,
                    host,
                    "SELECT count(*) FROM categories WHERE name = 'After the pull'",
                )?
                .trim()
                    != "0")
            },
        )?;
    }
    // Shoppers never depended on the origin host.
    let page = curl(&city, &["-H", &host_header, &format!("http://{ANYCAST}/")])?;
    assert!(
        page.starts_with("HTTP/1.1 200") && page.contains("Failover Test"),
        "{page}"
    );
    eprintln!(
        "origin failover on booted machines: power pull of the leader's host; node-sin1 led after {promoted_after:?} with 500 of 500 committed rows; region-bom1 followed after {followed_after:?}; a seller's write through the bom1 edge succeeded {wrote_after:?} after the pull"
    );
    Ok(())
}

const STORE_HOST: &str = "deploy-test.shops.edgefront.test";

/// What the deployed system must do, through what ansible installed.
/// Returns the seller's token (its store is `STORE_HOST`).
fn serves(lan: &Lan, hosts: &Hosts, city: &str) -> Result<String> {
    let lan_ns = lan.netns();
    let (bom1, sin1) = (hosts.nodes[0].1, hosts.nodes[1].1);
    // A seller through the Mumbai edge (proxied to the origin over TLS):
    // a store, a category, a product.
    let api = |node: Ipv4Addr, path: &str, auth: Option<&str>, body: &str| -> Result<String> {
        let url = format!("http://{node}{path}");
        let mut args = vec!["-H", "content-type: application/json", "-d", body, &url];
        let bearer;
        if let Some(token) = auth {
            bearer = format!("authorization: Bearer {token}");
            args.splice(0..0, ["-H", bearer.as_str()]);
        }
        let out = curl(&lan_ns, &args)?;
        assert!(
            out.starts_with("HTTP/1.1 20"),
            "POST {path} through {node}:\n{out}"
        );
        Ok(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
    };
    let field = |body: &str, key: &str| -> Result<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(body).with_context(|| body.to_string())?;
        v.get(key)
            .cloned()
            .with_context(|| format!("no {key} in {body}"))
    };
    let store = api(
        bom1,
        "/api/stores",
        None,
        r#"{"name":"Deploy Test","slug":"deploy-test","currency":"EUR","tagline":"shipped by ansible"}"#,
    )?;
    let token = field(&store, "token")?.as_str().unwrap().to_string();
    let category = api(bom1, "/api/categories", Some(&token), r#"{"name":"Tea"}"#)?;
    let category = field(&category, "category")?["id"].clone();
    let product = format!(
        r#"{{"name":"Darjeeling first flush","price_cents":1250,"category_id":{category}}}"#
    );
    api(bom1, "/api/products", Some(&token), &product)?;

    // ...shown by the Singapore edge, from its own replica.
    let host_header = format!("host: {STORE_HOST}");
    eventually("the write shows in sin1", Duration::from_secs(20), || {
        let page = curl(&lan_ns, &["-H", &host_header, &format!("http://{sin1}/")])?;
        Ok(page.contains("x-edge-route: sin1") && page.contains("Darjeeling first flush"))
    })?;

    // A shopper in the city, through the anycast address.
    eventually(
        "the city is served through the anycast address",
        Duration::from_secs(30),
        || {
            let page = curl(city, &["-H", &host_header, &format!("http://{ANYCAST}/")])?;
            Ok(page.starts_with("HTTP/1.1 200") && page.contains("Darjeeling first flush"))
        },
    )?;
    let page = curl(city, &["-H", &host_header, &format!("http://{ANYCAST}/")])?;
    assert!(page.contains("x-edge-route: "), "{page}");

    // edge-ctl in production mode: the region data (these two regions) and
    // each region's token, from the controller.
    let regions_file = lan.dir().join("regions.toml");
    std::fs::write(&regions_file, regions_of(&["bom1", "sin1"])?)?;
    let tokens = secrets()["edgefront_admin_tokens"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect::<Vec<_>>()
        .join(",");
    let ctl = |args: &[&str]| -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &lan_ns])
            .arg(repo().join("target/release/edge-ctl"))
            .arg("--regions-file")
            .arg(&regions_file)
            .args(["--tokens", &tokens])
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "edge-ctl {args:?}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    };
    let announced = |status: &str, code: &str| -> Result<bool> {
        let v: serde_json::Value = serde_json::from_str(status)?;
        let region = v
            .as_array()
            .and_then(|a| a.iter().find(|r| r["region"] == code))
            .with_context(|| format!("no {code} in {status}"))?;
        Ok(region["announced"] == true)
    };
    eventually(
        "edge-ctl status shows both announced",
        Duration::from_secs(20),
        || {
            let s = ctl(&["--json", "status"])?;
            Ok(announced(&s, "bom1")? && announced(&s, "sin1")?)
        },
    )?;
    let drained = ctl(&["drain", "sin1", "--timeout", "60"])?;
    assert!(drained.contains("sin1: drained"), "{drained}");
    let s = ctl(&["--json", "status"])?;
    assert!(!announced(&s, "sin1")? && announced(&s, "bom1")?, "{s}");
    let page = curl(city, &["-H", &host_header, &format!("http://{ANYCAST}/")])?;
    assert!(page.contains("x-edge-route: bom1"), "{page}");
    let back = ctl(&["undrain", "sin1", "--timeout", "60"])?;
    assert!(back.contains("sin1: announced"), "{back}");

    // Replication and the edges' reads are TLS, and nothing else gets in:
    // both replicas and the backup's WAL receiver stream over TLS; a
    // plaintext login is refused by pg_hba even with the right password.
    let streaming = lan.ssh(
        "origin-host",
        "runuser -u postgres -- psql -tAc \"SELECT count(*) FROM pg_stat_replication r \
         JOIN pg_stat_ssl s USING (pid) WHERE s.ssl AND r.state = 'streaming'\"",
    )?;
    assert_eq!(
        streaming.trim(),
        "3",
        "replicas and the WAL archive streaming over TLS"
    );
    let edges_tls = lan.ssh(
        "node-bom1",
        "runuser -u postgres -- psql -tAc \"SELECT count(*) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'edgefront' AND s.ssl\"",
    )?;
    assert!(
        edges_tls.trim().parse::<u32>()? > 0,
        "the edge reads its replica over TLS"
    );
    let password = secrets()["edgefront_db_password"]
        .as_str()
        .unwrap()
        .to_string();
    let plain = lan.ssh(
        "node-bom1",
        &format!(
            "PGPASSWORD={password} psql 'host={} dbname=edgefront user=edgefront sslmode=disable' \
             -tAc 'SELECT 1' 2>&1 || true",
            hosts.origin
        ),
    )?;
    assert!(
        plain.contains("no pg_hba.conf entry") && plain.contains("no encryption"),
        "{plain}"
    );

    least_privilege(lan)?;
    reload_under_load(lan, "node-bom1", bom1)?;
    Ok(token)
}

/// A seller's own domain, as production runs it: claimed through an edge,
/// proven by the TXT record the claim names (in the DNS the origin reads),
/// verified; then a shopper's first https request for it, through the
/// anycast address, gets a certificate the ACME CA issued on first sight
/// (HTTP-01, validated through the anycast address). One account for the
/// directory, one certificate, stored sealed on the primary; the other
/// region serves the same certificate from its replica.
fn custom_domain_certified(
    lan: &Lan,
    hosts: &Hosts,
    city: &str,
    seller: &str,
    acme: &AcmeCa,
) -> Result<()> {
    let domain = "shop.deploy-test.example";
    let bom1 = hosts.nodes[0].1;
    let lan_ns = lan.netns();
    let post = |path: &str, body: Option<&str>| -> Result<serde_json::Value> {
        let bearer = format!("authorization: Bearer {seller}");
        let url = format!("http://{bom1}{path}");
        let mut args = vec!["-X", "POST", "-H", bearer.as_str()];
        if let Some(body) = body {
            args.extend(["-H", "content-type: application/json", "-d", body]);
        }
        args.push(&url);
        let out = curl(&lan_ns, &args)?;
        if !out.starts_with("HTTP/1.1 20") {
            bail!("POST {path}:\n{out}");
        }
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body).with_context(|| out.clone())
    };
    let before_proof = curl(
        city,
        &[
            "-H",
            &format!("host: {domain}"),
            &format!("http://{ANYCAST}/"),
        ],
    )?;
    let claim = post(
        "/api/domains",
        Some(&json!({ "hostname": domain }).to_string()),
    )?;
    assert_eq!(claim["domain"]["state"], "pending", "{claim}");
    // Not served, and no order, before the proof.
    let unproven = curl(
        city,
        &[
            "-H",
            &format!("host: {domain}"),
            &format!("http://{ANYCAST}/"),
        ],
    )?;
    assert!(
        before_proof.starts_with("HTTP/1.1 404") && unproven.starts_with("HTTP/1.1 404"),
        "an unproven domain is not served:\n{unproven}"
    );
    let record = &claim["domain"]["record"];
    acme.set_txt(
        lan,
        record["name"].as_str().context("the record's name")?,
        record["value"].as_str().context("the record's value")?,
    )?;
    let verified = post(&format!("/api/domains/{domain}/verify"), None)?;
    assert_eq!(verified["domain"]["state"], "active", "{verified}");

    let root = acme.issuing_root(lan)?;
    let root = root.display().to_string();
    let https = |ns: &str, addr: &str| -> Result<String> {
        curl(
            ns,
            &[
                "--cacert",
                &root,
                "--resolve",
                &format!("{domain}:443:{addr}"),
                // The first handshake waits for the issuance.
                "--max-time",
                "30",
                &format!("https://{domain}/"),
            ],
        )
    };
    // The edges know the domain once their replicas have it: the shopper's
    // first request for it (plain HTTP) has its certificate issued on first
    // sight, as a handshake would, and is redirected to https.
    let started = Instant::now();
    eventually(
        "the verified domain certified and redirected to https",
        Duration::from_secs(20),
        || {
            let page = curl(
                city,
                &[
                    "-H",
                    &format!("host: {domain}"),
                    &format!("http://{ANYCAST}/"),
                ],
            )?;
            Ok(status(&page) == 301
                && page
                    .to_ascii_lowercase()
                    .contains(&format!("location: https://{domain}/")))
        },
    )?;
    // The https request is served with the certificate.
    let page = https(city, ANYCAST)?;
    assert_eq!(status(&page), 200, "the first https request:\n{page}");
    assert!(
        page.contains("x-edge-route: ") && page.contains("Darjeeling first flush"),
        "{page}"
    );
    eprintln!(
        "{domain}: verified, then known, certified and served over https {:?} later",
        started.elapsed()
    );
    let count =
        |host: &str, sql: &str| -> Result<u32> { Ok(psql(lan, host, sql)?.trim().parse()?) };
    assert_eq!(
        count(
            "origin-host",
            &format!(
                "SELECT count(*) FROM acme_accounts WHERE directory = \
                 'https://{LAN_GATEWAY}:{PEBBLE_ACME_PORT}/dir'"
            )
        )?,
        1,
        "the account is kept for the directory"
    );
    // Every region serves the same certificate, from its own replica.
    let serial = |addr: Ipv4Addr| -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &lan_ns, "bash", "-c"])
            .arg(format!(
                "openssl s_client -connect {addr}:443 -servername {domain} </dev/null \
                 2>/dev/null | openssl x509 -noout -serial"
            ))
            .output()?;
        let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !s.starts_with("serial=") {
            bail!("no certificate from {addr} for {domain}");
        }
        Ok(s)
    };
    let mut serials = Vec::new();
    for (code, addr) in &hosts.nodes {
        eventually(
            &format!("{code} serves {domain}"),
            Duration::from_secs(30),
            || Ok(https(&lan_ns, &addr.to_string())?.contains(&format!("x-edge-route: {code}"))),
        )?;
        serials.push(serial(*addr)?);
        assert_eq!(
            count(
                &format!("node-{code}"),
                &format!("SELECT count(*) FROM certificates WHERE hostname = '{domain}'")
            )?,
            1,
            "{code}'s replica holds the certificate"
        );
    }
    assert!(
        serials.windows(2).all(|w| w[0] == w[1]),
        "the same certificate in every region: {serials:?}"
    );
    // One order network-wide: the edges' own count of certificates issued.
    let mut issued = 0.0;
    for (_, addr) in &hosts.nodes {
        let metrics = curl(&lan_ns, &[&format!("http://{addr}:9080/metrics")])?;
        issued += metrics
            .lines()
            .filter(|l| l.starts_with("edgefront_acme_issuances_total{outcome=\"issued\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    assert_eq!(issued, 1.0, "one certificate ordered for {domain}");
    Ok(())
}

/// A replica rebuilt as docs/deploy.md ("Rebuilding a replica") says: the
/// region drained, PostgreSQL stopped and its data directory removed, then
/// `site.yml --limit` the host clones the primary again. A seller's change
/// made while the replica was gone is in the rebuilt one, the region's edge
/// serves it after the undrain, and the next full run changes nothing.
fn replica_rebuilt(lan: &Lan, inv: &str, city: &str, hosts: &Hosts) -> Result<()> {
    let (code, addr) = hosts.nodes[0];
    let name = format!("node-{code}");
    let token = secrets()["edgefront_admin_tokens"][code]
        .as_str()
        .context("the region's admin token")?
        .to_owned();
    let hook = |action: &str| -> Result<u16> {
        let out = curl(
            &lan.netns(),
            &[
                "-X",
                "POST",
                "-H",
                &format!("authorization: Bearer {token}"),
                &format!("http://{addr}:9180/{action}"),
            ],
        )?;
        Ok(status(&out))
    };
    let served_by = |region: &str| -> Result<bool> {
        let page = curl(
            city,
            &[
                "-H",
                &format!("host: {STORE_HOST}"),
                &format!("http://{ANYCAST}/"),
            ],
        )?;
        Ok(status(&page) == 200 && page.contains(&format!("x-edge-route: {region}")))
    };
    assert!(matches!(hook("drain")?, 200..=299), "drain {code}");
    let other = hosts.nodes[1].0;
    eventually(
        &format!("{code} drained: the city served by {other}"),
        Duration::from_secs(60),
        || served_by(other),
    )?;
    lan.ssh(
        &name,
        "systemctl stop postgresql@15-main && rm -rf /var/lib/postgresql/15/main",
    )?;
    // A seller's change while the replica is gone (on the primary).
    psql(
        lan,
        "origin-host",
        "UPDATE stores SET tagline = 'rebuilt replica' WHERE slug = 'deploy-test'",
    )?;
    let started = Instant::now();
    let (ok, out) = lan.ansible_playbook(
        &repo().join("ansible"),
        &["-i", inv, "playbooks/site.yml", "--limit", &name],
    )?;
    assert!(ok, "site.yml --limit {name}:\n{out}");
    let rebuilt = started.elapsed();
    let replica = psql(
        lan,
        &name,
        "SELECT pg_is_in_recovery()::text || ' ' || tagline FROM stores WHERE slug = 'deploy-test'",
    )?;
    assert_eq!(
        replica.trim(),
        "true rebuilt replica",
        "a standby again, with the change made while it was gone"
    );
    assert!(matches!(hook("undrain")?, 200..=299), "undrain {code}");
    eventually(
        &format!("{code} serves again from its rebuilt replica"),
        Duration::from_secs(60),
        || {
            let page = curl(
                &lan.netns(),
                &[
                    "-H",
                    &format!("host: {STORE_HOST}"),
                    &format!("http://{addr}/"),
                ],
            )?;
            Ok(served_by(code)? && page.contains("rebuilt replica"))
        },
    )?;
    eprintln!("replica of {code} rebuilt by site.yml --limit {name} in {rebuilt:?}");
    let (ok, again) =
        lan.ansible_playbook(&repo().join("ansible"), &["-i", inv, "playbooks/site.yml"])?;
    assert!(ok, "site.yml after the rebuild:\n{again}");
    assert!(
        recap(&again).iter().all(|l| l.contains("changed=0")),
        "nothing left to change after the rebuild:\n{again}"
    );
    Ok(())
}

/// The status code of `curl -i` output (HTTP/1.1 or HTTP/2), 0 if none.
fn status(out: &str) -> u16 {
    out.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The platform wildcard, installed as docs/deploy.md says: a certificate
/// from elsewhere, uploaded by `playbooks/platform-certificate.yml` through
/// a region node to the origin's internal API; every region then serves the
/// stores' platform names with it. One for another name is refused and
/// changes nothing.
fn platform_wildcard_installed(lan: &Lan, city: &str, inv: &str) -> Result<()> {
    let ca = edgefront_tests::TestCa::new()?;
    let dir = lan.dir().join("platform-certificate");
    std::fs::create_dir_all(&dir)?;
    let root = dir.join("root.pem");
    std::fs::write(&root, &ca.pem)?;
    let upload = |name: &str, verbose: bool| -> Result<(bool, String)> {
        let (chain, key) = ca.leaf(&[name])?;
        let (chain_file, key_file) = (dir.join("fullchain.pem"), dir.join("privkey.pem"));
        std::fs::write(&chain_file, chain)?;
        std::fs::write(&key_file, key)?;
        let (chain_arg, key_arg) = (
            format!("platform_cert_chain={}", chain_file.display()),
            format!("platform_cert_key={}", key_file.display()),
        );
        let mut args = vec![
            "-i",
            inv,
            "playbooks/platform-certificate.yml",
            "-e",
            &chain_arg,
            "-e",
            &key_arg,
        ];
        if verbose {
            args.push("-vvv");
        }
        lan.ansible_playbook(&repo().join("ansible"), &args)
    };
    let platform = STORE_HOST.split_once('.').context("STORE_HOST")?.1;
    let (ok, out) = upload(&format!("*.{platform}"), false)?;
    assert!(ok, "platform-certificate.yml:\n{out}");
    assert!(out.contains(&format!("*.{platform} valid until")), "{out}");
    let https = || -> Result<String> {
        curl(
            city,
            &[
                "--cacert",
                &root.display().to_string(),
                "--resolve",
                &format!("{STORE_HOST}:443:{ANYCAST}"),
                &format!("https://{STORE_HOST}/"),
            ],
        )
    };
    eventually(
        "the stores' platform names served with the uploaded wildcard",
        Duration::from_secs(20),
        || Ok(status(&https()?) == 200),
    )?;
    assert!(https()?.contains("Darjeeling first flush"));
    let plain = curl(
        city,
        &[
            "-H",
            &format!("host: {STORE_HOST}"),
            &format!("http://{ANYCAST}/"),
        ],
    )?;
    assert!(
        status(&plain) == 301
            && plain
                .to_ascii_lowercase()
                .contains(&format!("location: https://{STORE_HOST}/")),
        "plain HTTP goes to https once the name has a certificate:\n{plain}"
    );
    // A certificate for one name under the platform is no wildcard: refused
    // by the origin, its reason shown, the key never (even at -vvv).
    let (ok, out) = upload(&format!("x.{platform}"), true)?;
    assert!(
        !ok && out.contains("422") && out.contains("chain_pem"),
        "a certificate that is not the wildcard is refused with its reason:\n{out}"
    );
    assert!(
        !out.contains("PRIVATE KEY"),
        "the key is never printed:\n{out}"
    );
    assert_eq!(status(&https()?), 200, "the installed wildcard stays");
    Ok(())
}

/// The backup host holds every acknowledged write: the seller's writes are
/// in its WAL archive (pg_receivewal reports them flushed), and a fresh
/// machine restored from a copy of its directory (the newest base backup,
/// then the archive; ansible/files/restore-primary.sh) has them and takes
/// writes.
/// `psql` as postgres on a machine, in database edgefront.
fn psql(lan: &Lan, host: &str, sql: &str) -> Result<String> {
    lan.ssh(
        host,
        &format!("runuser -u postgres -- psql -d edgefront -tAc \"{sql}\""),
    )
}

fn backup_restores(lan: &mut Lan, rootfs: &Path) -> Result<()> {
    let lsn = psql(lan, "origin-host", "SELECT pg_current_wal_lsn()")?;
    let lsn = lsn.trim().to_string();
    eventually(
        "the WAL archive has flushed the seller's writes",
        Duration::from_secs(30),
        || {
            let done = psql(
                lan,
                "origin-host",
                &format!(
                    "SELECT coalesce(bool_or(flush_lsn >= '{lsn}'), false) FROM pg_stat_replication \
                 WHERE application_name = 'pg_receivewal'"
                ),
            )?;
            Ok(done.trim() == "t")
        },
    )?;
    let bases = lan.ssh("node-sin1", "ls /var/lib/edgefront-backup/base")?;
    assert!(
        bases.lines().any(|l| l.ends_with('Z')),
        "a base backup: {bases}"
    );

    // The origin host is gone; a fresh machine gets a copy of the backup
    // host's directory (as an operator would copy it) and the script.
    lan.boot(rootfs, "restored", Ipv4Addr::new(198, 51, 100, 50))?;
    let from = lan
        .machine("node-sin1")
        .root()
        .join("var/lib/edgefront-backup");
    let to = lan.machine("restored").root().join("root/backup");
    sh(&[
        "cp",
        "-a",
        &from.display().to_string(),
        &to.display().to_string(),
    ])?;
    let script = lan
        .machine("restored")
        .root()
        .join("root/restore-primary.sh");
    std::fs::copy(repo().join("ansible/files/restore-primary.sh"), &script)?;
    let out = lan.ssh(
        "restored",
        "sh /root/restore-primary.sh /root/backup 2>&1; echo exit=$?",
    )?;
    assert!(
        out.contains("taking writes") && out.contains("exit=0"),
        "{out}"
    );
    let store = psql(
        lan,
        "restored",
        "SELECT count(*) FROM stores WHERE slug = 'deploy-test'",
    )?;
    assert_eq!(
        store.trim(),
        "1",
        "the seller's store is in the restored database"
    );
    let product = psql(
        lan,
        "restored",
        "SELECT name FROM products WHERE price_cents = 1250",
    )?;
    assert_eq!(product.trim(), "Darjeeling first flush");
    let written = psql(
        lan,
        "restored",
        "CREATE TABLE restore_check (x int); SELECT 1",
    )?;
    assert!(
        written.contains('1'),
        "the restored primary takes writes: {written}"
    );
    Ok(())
}

/// Least privilege, as the booted hosts show it: each service runs as its
/// own user; only the health hook (group bird, from its unit) can drive
/// BIRD's control socket; env files are root's alone; a node's private key
/// is readable by its edge's group only.
fn least_privilege(lan: &Lan) -> Result<()> {
    let node = "node-bom1";
    let users = lan.ssh(node, "ps -o user:32=,comm= -C edge,edgefront-healt,bird")?;
    for (user, comm) in [
        ("edgefront-edge", "edge"),
        ("edgefront-health", "edgefront-healt"),
        ("bird", "bird"),
    ] {
        assert!(
            users.lines().any(|l| l.split_whitespace().eq([user, comm])),
            "{comm} should run as {user}:\n{users}"
        );
    }
    assert!(
        !users.contains("root"),
        "nothing of ours runs as root:\n{users}"
    );
    let origin = lan.ssh("origin-host", "ps -o user:32= -C origin")?;
    assert_eq!(origin.trim(), "edgefront-origin", "{origin}");

    // BIRD's socket: the hook's user with the group its unit gives it can;
    // the edge's user cannot (nor the hook's without that group).
    let as_user = |user: &str, groups: &str, cmd: &str| {
        lan.ssh(node, &format!(
            "setpriv --reuid={user} --regid={user} --groups={groups} -- {cmd} >/dev/null 2>&1 && echo allowed || echo refused"
        ))
    };
    let birdc = "birdc -s /run/bird/bird.ctl show status";
    assert_eq!(
        as_user("edgefront-health", "bird", birdc)?.trim(),
        "allowed"
    );
    assert_eq!(
        as_user("edgefront-edge", "edgefront-edge", birdc)?.trim(),
        "refused"
    );
    let groups = lan.ssh(node, "id -nG edgefront-edge; id -nG edgefront-health")?;
    assert!(
        !groups.contains("bird"),
        "no user is in group bird:\n{groups}"
    );
    let hook_groups = lan.ssh(
        node,
        "getent group bird | cut -d: -f3; grep ^Groups: /proc/$(pgrep -x edgefront-healt)/status",
    )?;
    let mut lines = hook_groups.lines();
    let bird_gid = lines.next().unwrap_or_default().trim().to_string();
    assert!(
        lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .any(|g| g == bird_gid),
        "the running hook has group bird:\n{hook_groups}"
    );

    // Secrets: env files root's alone; the edge's secret files and keys its
    // group's; the edge cannot read the hook's, nor the hook the edge's.
    let modes = lan.ssh(
        node,
        "stat -c '%U:%G %a %n' /etc/edgefront/*.env /etc/edgefront/pki/*.key /etc/edgefront/secrets/edge /etc/edgefront/secrets/edge/*",
    )?;
    assert!(
        modes.contains("/etc/edgefront/secrets/edge/admin_token"),
        "{modes}"
    );
    for line in modes.lines() {
        let ok = if line.ends_with(".env") {
            line.starts_with("root:root 600 ")
        } else if line.ends_with("/secrets/edge") {
            line.starts_with("root:edgefront-edge 750 ")
        } else {
            line.starts_with("root:edgefront-edge 640 ")
        };
        assert!(ok, "{line}\n{modes}");
    }
    assert_eq!(
        as_user(
            "edgefront-health",
            "edgefront-health,bird",
            "cat /etc/edgefront/secrets/edge/cert_key"
        )?
        .trim(),
        "refused",
        "the hook reads the edge's secrets"
    );
    assert_eq!(
        as_user(
            "edgefront-edge",
            "edgefront-edge",
            "cat /etc/edgefront/secrets/edge/cert_key"
        )?
        .trim(),
        "allowed",
        "the edge reads its own secrets"
    );
    for f in [
        "/etc/edgefront/health-secret.env",
        "/etc/edgefront/edge.env",
        "/etc/edgefront/secrets/health/status_token",
    ] {
        assert_eq!(
            as_user("edgefront-edge", "edgefront-edge", &format!("cat {f}"))?.trim(),
            "refused",
            "{f}"
        );
    }
    assert_eq!(
        as_user(
            "edgefront-health",
            "edgefront-health,bird",
            "cat /etc/edgefront/secrets/health/status_token"
        )?
        .trim(),
        "allowed",
        "the hook reads its own tokens"
    );
    Ok(())
}

/// Shoppers loading a store page in a namespace, until stopped (at most
/// 240 s or 80 000 requests): one on a keep-alive connection, one on a new
/// connection per request. A keep-alive GET closed before any answer is
/// retried once, as browsers do (and counted).
struct Load {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Tally>>,
}

#[derive(Debug, Default)]
struct Tally {
    ok: u32,
    failed: Vec<String>,
    retried: u32,
    by_region: std::collections::BTreeMap<String, u32>,
}

impl Load {
    fn start(ns: &str, target: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ns, flag) = (ns.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            edgefront_tests::netlab::in_netns(&ns, move || {
                let t = Duration::from_secs(3);
                let mut kept = Shopper::new(target, STORE_HOST, t);
                let mut tally = Tally::default();
                let deadline = Instant::now() + Duration::from_secs(240);
                while !flag.load(Ordering::Relaxed)
                    && Instant::now() < deadline
                    && tally.ok < 80_000
                {
                    let mut r = kept.get("/");
                    if r.is_err() && kept.last_reused && !kept.last_got_bytes {
                        tally.retried += 1;
                        r = kept.get("/");
                    }
                    let fresh = edgefront_ctl::probe::get(target, STORE_HOST, "/", t);
                    for r in [r, fresh] {
                        match r {
                            Ok(p) if p.status == 200 => {
                                tally.ok += 1;
                                *tally
                                    .by_region
                                    .entry(p.region.unwrap_or_default())
                                    .or_default() += 1;
                            }
                            Ok(p) => tally.failed.push(format!("status {}", p.status)),
                            Err(e) => tally.failed.push(e.to_string()),
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                tally
            })
        });
        Load { stop, thread }
    }

    fn finish(self) -> Result<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("load panicked"))?
    }
}

/// `rolling-upgrade.yml` with `extra` arguments under a city's load through
/// the anycast address; fails on a failed run or any failed request.
fn upgrade_under_load(lan: &Lan, city: &str, inv: &str, extra: &[&str]) -> Result<Tally> {
    let load = Load::start(city, SocketAddr::from((ANYCAST.parse::<Ipv4Addr>()?, 80)));
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let mut args = vec!["-i", inv, "playbooks/rolling-upgrade.yml"];
    args.extend_from_slice(extra);
    let (ok, out) = lan.ansible_playbook(&repo().join("ansible"), &args)?;
    let took = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let tally = load.finish()?;
    eprintln!("rolling upgrade {extra:?}: {took:?}, {tally:?}");
    if !ok || !tally.failed.is_empty() {
        eprintln!("{}", diagnostics(lan));
        bail!("rolling-upgrade.yml {extra:?}: {tally:?}\n{out}");
    }
    Ok(tally)
}

/// The binary a unit's main process runs (its resolved path).
fn main_exe(lan: &Lan, node: &str, unit: &str) -> Result<String> {
    lan.ssh(
        node,
        &format!("readlink /proc/$(systemctl show -p MainPID --value {unit})/exe"),
    )
}

/// `systemctl reload edgefront-edge` under load, under a real systemd: the
/// successor takes the sockets over, systemd follows the new main PID, and
/// no request fails.
fn reload_under_load(lan: &Lan, node: &str, addr: Ipv4Addr) -> Result<()> {
    let main_pid = || -> Result<u32> {
        Ok(lan
            .ssh(node, "systemctl show -p MainPID --value edgefront-edge")?
            .trim()
            .parse()?)
    };
    let before = main_pid()?;
    let load = Load::start(&lan.netns(), SocketAddr::from((addr, 80)));
    std::thread::sleep(Duration::from_secs(2));
    lan.ssh(node, "systemctl reload edgefront-edge")?;
    let mut after = before;
    eventually(
        "systemd follows the successor",
        Duration::from_secs(30),
        || {
            after = main_pid()?;
            let old_gone = lan.ssh(
                node,
                &format!("test -e /proc/{before} && echo alive || echo gone"),
            )?;
            Ok(after != before && after != 0 && old_gone.trim() == "gone")
        },
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let tally = load.finish()?;
    let active = lan.ssh(node, "systemctl is-active edgefront-edge")?;
    eprintln!("reload under load: {tally:?}; main pid {before} -> {after}");
    assert_eq!(active.trim(), "active");
    assert!(
        tally.failed.is_empty(),
        "{} failed: {:?}",
        tally.failed.len(),
        &tally.failed[..tally.failed.len().min(10)]
    );
    assert!(tally.ok > 100, "only {} requests served", tally.ok);
    Ok(())
}

/// The shipped region data cut down to `codes` (the deployed regions).
fn regions_of(codes: &[&str]) -> Result<String> {
    let text = std::fs::read_to_string(repo().join("regions/regions.toml"))?;
    let mut parts = text.split("[[region]]");
    let mut out = parts.next().unwrap_or_default().to_string();
    for block in parts {
        if codes
            .iter()
            .any(|c| block.contains(&format!("code = \"{c}\"")))
        {
            out += "[[region]]";
            out += block;
        }
    }
    Ok(out)
}

/// Each machine's failed units and edgefront logs, and the router's view.
fn diagnostics(lan: &Lan) -> String {
    let mut out = String::new();
    for m in lan.machines() {
        let cmd = "systemctl --failed --no-legend; for u in postgresql@15-main etcd patroni \\
                   edgefront-origin edgefront-edge edgefront-health; do \\
                   systemctl cat $u >/dev/null 2>&1 || continue; \\
                   echo \"== $u: $(systemctl is-active $u)\"; \\
                   journalctl -u $u -n 12 --no-pager -o cat | cut -c1-300; done; \\
                   echo '== edge: not INFO'; journalctl -u edgefront-edge --no-pager -o cat \\
                   | grep -v '\"level\":\"INFO\"' | tail -n 25 | cut -c1-400";
        let text = lan.ssh(&m.name, cmd).unwrap_or_else(|e| format!("{e:#}"));
        out += &format!("\n===== {}\n{text}", m.name);
    }
    let ctl = lan.dir().join("router/bird.ctl").display().to_string();
    let bird = Command::new("birdc")
        .args(["-s", &ctl, "show", "protocols"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out + "\n===== router\n" + &bird
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
