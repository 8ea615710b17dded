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

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgefront_tests::machines::{self, LAN_GATEWAY, Lan};
use edgefront_tests::netlab::sh;
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
    })
}

struct Hosts {
    origin: Ipv4Addr,
    nodes: Vec<(&'static str, Ipv4Addr)>,
}

/// The inventory: production's shape (inventory/example.yml), production's
/// group_vars (linked, not copied), the test's hosts and secrets.
fn inventory(dir: &Path, hosts: &Hosts) -> Result<PathBuf> {
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
    let doc = json!({
        "all": {
            "children": {
                "origin": {"hosts": {"origin-host": {"ansible_host": hosts.origin.to_string()}}},
                "edges": {"hosts": edges},
                "replicas": {"hosts": replicas},
            }
        }
    });
    let path = inv.join("hosts.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    Ok(path)
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
    let mut last = None;
    loop {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => last = None,
            Err(e) => last = Some(e),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?} (last error: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn site_yml_deploys_booted_debian_machines_that_serve_shoppers_and_sellers() -> Result<()> {
    let rootfs = machines::rootfs()?;
    let prefix = format!("efd{}", std::process::id() % 100_000);
    let mut lan = Lan::new(&prefix)?;
    let hosts = Hosts {
        origin: Ipv4Addr::new(198, 51, 100, 10),
        nodes: vec![
            ("bom1", Ipv4Addr::new(198, 51, 100, 11)),
            ("sin1", Ipv4Addr::new(198, 51, 100, 12)),
        ],
    };
    let started = Instant::now();
    lan.boot(&rootfs, "origin", hosts.origin)?;
    for (code, addr) in &hosts.nodes {
        lan.boot(&rootfs, &format!("node-{code}"), *addr)?;
    }
    eprintln!("booted 3 machines in {:?}", started.elapsed());
    let (city, _, _) = lan.attach("city", 0)?;
    let _router = KillOnDrop(router(&lan, &hosts)?);

    let inv = inventory(lan.dir(), &hosts)?;
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

    if let Err(e) = serves(&lan, &city) {
        eprintln!("{}", diagnostics(&lan));
        return Err(e);
    }

    // Idempotent.
    let (ok, again) = lan.ansible_playbook(&ansible, &["-i", &inv, "playbooks/site.yml"])?;
    assert!(ok, "second site.yml failed:\n{again}");
    let lines = recap(&again);
    assert_eq!(lines.len(), 3, "{again}");
    assert!(lines.iter().all(|l| l.contains("changed=0")), "{again}");
    Ok(())
}

/// What the deployed system must do, through what ansible installed.
fn serves(_lan: &Lan, city: &str) -> Result<()> {
    // A shopper in the city, through the anycast address.
    eventually(
        "the anycast address answers the city",
        Duration::from_secs(30),
        || {
            let page = curl(city, &[&format!("http://{ANYCAST}/healthz")])?;
            Ok(page.contains("x-edge-route:"))
        },
    )?;
    Ok(())
}

/// Each machine's failed units and edgefront logs, and the router's view.
fn diagnostics(lan: &Lan) -> String {
    let mut out = String::new();
    for m in lan.machines() {
        let cmd = "systemctl --failed --no-legend; for u in postgresql@15-main \\
                   edgefront-origin edgefront-edge edgefront-health; do \\
                   systemctl cat $u >/dev/null 2>&1 || continue; \\
                   echo \"== $u: $(systemctl is-active $u)\"; \\
                   journalctl -u $u -n 12 --no-pager -o cat | cut -c1-300; done";
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
