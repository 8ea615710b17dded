//! The anycast lab: builds the reference network in network namespaces
//! from the region data, then starts the real processes in it.
//!
//! Per region: a metro router namespace (BIRD, one AS per metro), a region
//! node namespace (the anycast /32 and the node address on `lo`; BIRD
//! announcing the anycast route from a static protocol that starts disabled;
//! a streaming replica, the edge and the health hook) and a shopper city
//! namespace. Metros are joined by the backbone that
//! [`Regions::backbone`](edgefront_regions::Regions::backbone) derives from
//! geography; each backbone link passes through `edgefront-delaylink` in the
//! wire namespace, which delays frames by the link's fiber time. The origin
//! host (`core`: PostgreSQL primary, origin) hangs off the primary region's
//! metro router. Addresses come from the documentation ranges only.
//!
//! BIRD configs are rendered from the same templates ansible deploys
//! (`ansible/roles/bird/templates/bird.conf.j2`), plus a lab-only template
//! for the metro routers that stand in for upstream providers.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgefront_ctl::lab::{LabRegion, LabState, Service};
use edgefront_regions::{Region, Regions};

/// The templates the lab renders, by repository path: the node's BIRD,
/// PostgreSQL, edge and health-hook templates are the ones ansible deploys;
/// the metro router's is lab-only (it stands in for the upstream provider).
pub const TEMPLATES: &[(&str, &str)] = &[
    (
        "ansible/roles/bird/templates/bird.conf.j2",
        include_str!("../../ansible/roles/bird/templates/bird.conf.j2"),
    ),
    (
        "ansible/roles/edge/templates/edge.toml.j2",
        include_str!("../../ansible/roles/edge/templates/edge.toml.j2"),
    ),
    (
        "ansible/roles/health/templates/health.toml.j2",
        include_str!("../../ansible/roles/health/templates/health.toml.j2"),
    ),
    (
        "ansible/roles/postgresql/templates/edgefront.conf.j2",
        include_str!("../../ansible/roles/postgresql/templates/edgefront.conf.j2"),
    ),
    (
        "tests/lab/bird-metro.conf.j2",
        include_str!("../lab/bird-metro.conf.j2"),
    ),
];

/// The origin host's address (on its link to the primary metro).
pub const CORE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 101);
/// The origin's internal API port (mutual TLS) on the origin host.
pub const INTERNAL_PORT: u16 = 8443;
const CORE_GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
/// The second origin host's address (origin failover), on the metro of the
/// region nearest the primary's.
pub const CORE2_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 103);
const CORE2_GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 102);
/// The name every origin's public certificate carries (the edges verify
/// whichever origin they reach against it).
pub const ORIGIN_NAME: &str = "origin.edgefront.internal";

/// Where a lab with origin failover puts its database cluster.
#[derive(Debug, Clone)]
pub struct FailoverPlan {
    /// The region of the second origin host (failover candidate): the one
    /// nearest the primary region.
    pub standby_region: String,
    /// The region whose node holds etcd's third member.
    pub witness_region: String,
}

impl FailoverPlan {
    /// The plan for these regions: it needs the primary region and at least
    /// two others.
    pub fn for_regions(regions: &Regions, chosen: &[&Region]) -> Result<FailoverPlan> {
        let primary = regions.primary().id.as_str();
        let mut near = regions
            .by_distance_from_region(primary)?
            .into_iter()
            .map(|(r, _)| r.id.as_str().to_owned())
            .filter(|c| c != primary && chosen.iter().any(|x| x.id.as_str() == c));
        match (near.next(), near.next()) {
            (Some(standby_region), Some(witness_region)) => Ok(FailoverPlan {
                standby_region,
                witness_region,
            }),
            _ => bail!(
                "origin failover needs three regions (etcd's members and two origin hosts): \
                 {primary} and two more (or `--single-primary`)"
            ),
        }
    }
}

fn pair(net: [u8; 3], base: u8, i: usize) -> (Ipv4Addr, Ipv4Addr) {
    let a = base + 2 * i as u8;
    (
        Ipv4Addr::new(net[0], net[1], net[2], a),
        Ipv4Addr::new(net[0], net[1], net[2], a + 1),
    )
}

/// Metro-side and node-side addresses of region `i`'s uplink.
pub fn node_link(i: usize) -> (Ipv4Addr, Ipv4Addr) {
    pair([198, 51, 100], 128, i)
}
/// Metro-side and city-side addresses of region `i`'s shopper link.
pub fn city_link(i: usize) -> (Ipv4Addr, Ipv4Addr) {
    pair([203, 0, 113], 128, i)
}
/// The two ends of backbone link `j`.
pub fn backbone_link(j: usize) -> (Ipv4Addr, Ipv4Addr) {
    pair([192, 0, 2], 128, j)
}

/// Lab namespace names for a prefix.
pub struct Names<'a>(pub &'a str);

impl Names<'_> {
    pub fn node(&self, code: &str) -> String {
        format!("{}-n-{code}", self.0)
    }
    pub fn metro(&self, code: &str) -> String {
        format!("{}-m-{code}", self.0)
    }
    pub fn city(&self, code: &str) -> String {
        format!("{}-c-{code}", self.0)
    }
    pub fn core(&self) -> String {
        format!("{}-core", self.0)
    }
    /// The second origin host (origin failover).
    pub fn core2(&self) -> String {
        format!("{}-core2", self.0)
    }
    pub fn wire(&self) -> String {
        format!("{}-wire", self.0)
    }
}

/// Removes the lab of a prefix when dropped (also on panic).
pub struct LabGuard(pub String);

impl Drop for LabGuard {
    fn drop(&mut self) {
        // A failed lab test keeps the lab's logs (every daemon's) for a
        // post-mortem: the lab's directory goes with it below.
        if std::thread::panicking() {
            keep_lab_logs(&self.0);
        }
        if let Err(e) = edgefront_ctl::lab::down(&self.0) {
            eprintln!("removing lab {}: {e:#}", self.0);
        }
    }
}

/// Copies lab `prefix`'s logs to `<temp dir>/edgefront-failed-<prefix>-logs`
/// (a failed test's post-mortem; [`LabGuard`] does it on a panic).
pub fn keep_lab_logs(prefix: &str) {
    let Ok(state) = LabState::load(prefix) else {
        return;
    };
    let to = std::env::temp_dir().join(format!("edgefront-failed-{prefix}-logs"));
    let kept = Command::new("cp")
        .arg("-a")
        .arg(state.dir.join("logs"))
        .arg(&to)
        .status();
    match kept {
        Ok(s) if s.success() => eprintln!("lab {prefix}: logs kept in {}", to.display()),
        other => eprintln!("lab {prefix}: keeping its logs: {other:?}"),
    }
}

/// Runs `edge-ctl --lab <prefix> <args>`: its exit code, stdout, stderr.
pub fn edge_ctl(prefix: &str, args: &[&str]) -> Result<(i32, String, String)> {
    let out = std::process::Command::new(crate::bin_dir().join("edge-ctl"))
        .args(["--lab", prefix])
        .args(args)
        .output()
        .context("run edge-ctl")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs a command; fails with its output.
pub fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ipn(ns: &str, args: &[&str]) -> Result<()> {
    let mut v = vec!["ip", "-n", ns];
    v.extend_from_slice(args);
    sh(&v)
}

fn sysctl(ns: &str, forward: bool) -> Result<()> {
    let mut v = vec![
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ];
    if forward {
        v.push("net.ipv4.ip_forward=1");
    }
    sh(&v)
}

/// A veth pair with one end in each namespace, both up, addressed /31.
fn veth(
    ns_a: &str,
    if_a: &str,
    ip_a: Option<Ipv4Addr>,
    ns_b: &str,
    if_b: &str,
    ip_b: Option<Ipv4Addr>,
) -> Result<()> {
    sh(&[
        "ip", "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns",
        ns_b,
    ])?;
    for (ns, ifname, ip) in [(ns_a, if_a, ip_a), (ns_b, if_b, ip_b)] {
        if let Some(ip) = ip {
            ipn(ns, &["addr", "add", &format!("{ip}/31"), "dev", ifname])?;
        }
        ipn(ns, &["link", "set", ifname, "up"])?;
    }
    Ok(())
}

fn offloads_off(ns: &str, ifname: &str) -> Result<()> {
    // Some features are fixed on veth; ethtool then exits non-zero for the
    // ones it could not change, which is fine as long as the rest changed.
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-K", ifname])
        .args([
            "tx", "off", "tso", "off", "gso", "off", "gro", "off", "rx", "off",
        ])
        .stdin(Stdio::null())
        .output()
        .context("spawn ethtool (Debian package ethtool)")?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !err.contains("Could not change any") && !err.contains("fixed") {
        bail!("ethtool -K {ifname} in {ns}: {}", err.trim());
    }
    Ok(())
}

/// Renders one of [`TEMPLATES`] the way ansible's `template` module does
/// (trim_blocks on, trailing newline kept; the Jinja subset our templates
/// use). An undefined variable is an error, as in ansible.
pub fn render(template: &str, vars: &serde_json::Value) -> Result<String> {
    let src = TEMPLATES
        .iter()
        .find(|(p, _)| *p == template)
        .map(|(_, s)| *s)
        .with_context(|| format!("no template {template}"))?;
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.set_trim_blocks(true);
    env.set_keep_trailing_newline(true);
    env.add_template(template, src)
        .with_context(|| format!("template {template}"))?;
    env.get_template(template)?
        .render(vars)
        .with_context(|| format!("render {template}"))
}

/// One config file of the lab: rendered from `template` with `vars` for
/// `host`, written to `<lab dir>/conf/<host>/<dest>`.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub host: String,
    pub template: &'static str,
    pub dest: &'static str,
    pub vars: serde_json::Value,
    pub text: String,
}

/// Backbone links among the chosen regions, with each one's address pair.
fn lab_links<'a>(
    regions: &'a Regions,
    chosen: &[&Region],
) -> Vec<edgefront_regions::BackboneLink<'a>> {
    regions
        .backbone()
        .into_iter()
        .filter(|l| chosen.iter().any(|r| r.id == l.a.id) && chosen.iter().any(|r| r.id == l.b.id))
        .collect()
}

/// Every config file of a lab over `chosen`, whose directory is `dir`.
/// Where a lab edge's secrets live, one file each (its `secrets_dir`).
pub fn edge_secrets_dir(dir: &Path, region: &str) -> PathBuf {
    dir.join("secrets").join(format!("edge-{region}"))
}

/// Every config file of a lab, rendered from the deployment templates with
/// the lab's variables (`failover`: the edges know both origins and both
/// failover candidates' databases).
pub fn lab_files(
    regions: &Regions,
    chosen: &[&Region],
    dir: &Path,
    failover: Option<&FailoverPlan>,
) -> Result<Vec<Rendered>> {
    let anycast = regions.network.anycast_ipv4.to_string();
    let origin_asn = regions.network.origin_asn;
    let network = serde_json::json!({
        "anycast_ipv4": anycast, "origin_asn": origin_asn,
        "platform_domain": regions.network.platform_domain,
    });
    // PostgreSQL speaks only TLS, certified by the lab's internal CA.
    let pg_ca = dir.join("pki").join("ca.pem");
    let primary_url = crate::pg_url(&CORE_IP.to_string(), 5432, &pg_ca);
    let mut peers: std::collections::HashMap<String, Vec<serde_json::Value>> = Default::default();
    for (j, l) in lab_links(regions, chosen).iter().enumerate() {
        let (ip_a, ip_b) = backbone_link(j);
        let us = l.one_way.as_micros();
        peers
            .entry(l.a.id.as_str().to_owned())
            .or_default()
            .push(serde_json::json!({
                "region": l.b.id.as_str(), "local_ip": ip_a.to_string(), "ip": ip_b.to_string(),
                "asn": l.b.asn, "med": us,
            }));
        peers
            .entry(l.b.id.as_str().to_owned())
            .or_default()
            .push(serde_json::json!({
                "region": l.a.id.as_str(), "local_ip": ip_b.to_string(), "ip": ip_a.to_string(),
                "asn": l.a.asn, "med": us,
            }));
    }
    let mut out = Vec::new();
    let mut add = |host: String,
                   template: &'static str,
                   dest: &'static str,
                   vars: serde_json::Value|
     -> Result<()> {
        let text = render(template, &vars)?;
        out.push(Rendered {
            host,
            template,
            dest,
            vars,
            text,
        });
        Ok(())
    };
    add(
        "core".into(),
        "ansible/roles/postgresql/templates/edgefront.conf.j2",
        "postgresql.conf",
        serde_json::json!({
            "edgefront_region": regions.primary().id.as_str(), "pg_role": "primary",
            "pg_listen_addresses": CORE_IP.to_string(), "pg_shared_buffers": "64MB",
            "pg_effective_cache_size": "256MB", "pg_lab_unsafe_fast": true,
            // The certificate the fixture issues from the lab's internal CA.
            "pg_ssl_cert_file": dir.join("pki").join("pg-primary.pem").display().to_string(),
            "pg_ssl_key_file": dir.join("pki").join("pg-primary.key").display().to_string(),
        }),
    )?;
    for (i, r) in chosen.iter().enumerate() {
        let c = r.id.as_str();
        let (m_ip, n_ip) = node_link(i);
        let replica_url = crate::pg_url(&r.node_ipv4.to_string(), 5432, &pg_ca);
        add(
            format!("metro-{c}"),
            "tests/lab/bird-metro.conf.j2",
            "bird.conf",
            serde_json::json!({
                "region": c, "asn": r.asn, "router_id": r.router_ipv4.to_string(),
                "node_ipv4": r.node_ipv4.to_string(), "node_link_ip": n_ip.to_string(),
                "node_link_local_ip": m_ip.to_string(), "node_interface": "node",
                "origin_asn": origin_asn, "anycast_ipv4": anycast,
                "peers": peers.get(c).cloned().unwrap_or_default(), "bird_log": "stderr",
            }),
        )?;
        add(
            format!("node-{c}"),
            "ansible/roles/bird/templates/bird.conf.j2",
            "bird.conf",
            serde_json::json!({
                "edgefront_region": c, "node_ipv4": r.node_ipv4.to_string(),
                "anycast_ipv4": anycast, "origin_asn": origin_asn,
                "uplink_interface": "uplink", "bird_log": "stderr",
                "upstream_peers": [{
                    "description": format!("metro router {c} (lab)"),
                    "local_ip": n_ip.to_string(), "ip": m_ip.to_string(), "asn": r.asn,
                }],
            }),
        )?;
        let mut edge_vars = serde_json::json!({
            "edgefront_region": c, "edgefront_network": network,
            "edge_admin_listen": format!("{}:9080", r.node_ipv4),
            "edge_replica_url": replica_url, "edge_primary_url": primary_url,
            "edge_origin": format!("{CORE_IP}:8000"), "edge_threads": 1,
            "edge_log_format": "text",
            // Each lab city is one address standing for a whole city of
            // shoppers and sellers: its per-address budgets are a city's.
            "edge_limit_origin_requests_per_second": 500,
            "edge_limit_origin_requests_burst": 2000,
            "edge_limit_misses_per_second": 500,
            "edge_limit_misses_burst": 2000,
            // pebble on the origin host issues certificates on first sight.
            "edge_acme_directory": format!("https://{CORE_IP}:{}/dir", crate::PEBBLE_ACME_PORT),
            "edge_acme_ca_root": dir.join("pebble").join("listener-ca.pem").display().to_string(),
            // The origin (TLS) and its internal API (mutual TLS), under
            // the lab's internal CA.
            "edge_origin_internal": format!("{CORE_IP}:{INTERNAL_PORT}"),
            "edgefront_pki_dir": dir.join("pki").display().to_string(),
            "edge_secrets_dir": edge_secrets_dir(dir, c).display().to_string(),
        });
        if failover.is_some() {
            // Requests go to whichever origin's database leads; both
            // origins' certificates carry one name.
            edge_vars["edge_origin_standbys"] = format!("{CORE2_IP}:8000").into();
            edge_vars["edge_origin_server_name"] = ORIGIN_NAME.into();
            edge_vars["edge_origin_internal"] =
                format!("{CORE_IP}:{INTERNAL_PORT},{CORE2_IP}:{INTERNAL_PORT}").into();
            edge_vars["edge_primary_standbys"] =
                crate::pg_url(&CORE2_IP.to_string(), 5432, &pg_ca).into();
        }
        add(
            format!("node-{c}"),
            "ansible/roles/edge/templates/edge.toml.j2",
            "edge.toml",
            edge_vars,
        )?;
        add(
            format!("node-{c}"),
            "ansible/roles/health/templates/health.toml.j2",
            "health.toml",
            serde_json::json!({
                "edgefront_region": c,
                "edge_admin_listen": format!("{}:9080", r.node_ipv4),
                "edge_replica_url": replica_url,
                "health_bird_socket": dir.join("bird").join(format!("node-{c}.ctl")).display().to_string(),
                "health_state_file": dir.join("state").join(format!("{c}-drain.json")).display().to_string(),
                "health_listen": format!("{}:9180", r.node_ipv4),
                // The regions this lab runs (the hook counts them for lag).
                "health_peers": chosen
                    .iter()
                    .filter(|o| o.id != r.id)
                    .map(|o| format!("{}=http://{}:9180", o.id.as_str(), o.node_ipv4))
                    .collect::<Vec<_>>()
                    .join(","),
                // Second chance: shoppers' connections opened in the
                // next-nearest region while this one was away keep working
                // when it announces again.
                "health_second_chance_peer": regions
                    .by_distance_from_region(c)?
                    .into_iter()
                    .map(|(o, _)| o)
                    .find(|o| o.id != r.id && chosen.iter().any(|x| x.id == o.id))
                    .map(|o| o.node_ipv4.to_string()),
                "anycast_ipv4": anycast, "node_ipv4": r.node_ipv4.to_string(),
            }),
        )?;
        add(
            format!("node-{c}"),
            "ansible/roles/postgresql/templates/edgefront.conf.j2",
            "postgresql.conf",
            serde_json::json!({
                "edgefront_region": c, "pg_role": "replica",
                "pg_listen_addresses": r.node_ipv4.to_string(), "pg_shared_buffers": "32MB",
                "pg_effective_cache_size": "128MB", "pg_lab_unsafe_fast": true,
                "pg_ssl_cert_file": dir.join("pki").join(format!("pg-replica-{c}.pem")).display().to_string(),
                "pg_ssl_key_file": dir.join("pki").join(format!("pg-replica-{c}.key")).display().to_string(),
            }),
        )?;
    }
    Ok(out)
}

impl Net {
    /// The rendered file for `host`/`dest`.
    pub fn file(&self, host: &str, dest: &str) -> Result<&Rendered> {
        self.files
            .iter()
            .find(|f| f.host == host && f.dest == dest)
            .with_context(|| format!("no rendered {host}/{dest}"))
    }

    /// Where that file was written.
    pub fn path(&self, host: &str, dest: &str) -> PathBuf {
        self.state.dir.join("conf").join(host).join(dest)
    }
}

/// The string value of a top-level `key = "value"` line of a rendered TOML
/// file (the lab's own files: no escapes in them).
pub fn toml_string(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// Options of [`build`].
pub struct Options {
    pub prefix: String,
    /// Region codes to build (all when empty).
    pub regions: Vec<String>,
    /// Binaries (edge, origin, edgefront-health, edgefront-delaylink).
    pub bin_dir: PathBuf,
    /// Origin failover: a second origin host, and config for a Patroni
    /// cluster (`edgefront_tests::labdb` starts it).
    pub origin_failover: bool,
}

/// The built network, before processes start.
pub struct Net {
    pub state: LabState,
    pub children: Vec<Child>,
    /// Every config file rendered for this lab.
    pub files: Vec<Rendered>,
    /// Where the database cluster goes (origin failover).
    pub failover: Option<FailoverPlan>,
}

fn bin(dir: &Path, name: &str) -> Result<String> {
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not found: build with `cargo build --release --workspace`",
            p.display()
        );
    }
    Ok(p.display().to_string())
}

/// Builds namespaces, links, addresses and routing daemons, and starts the
/// delay link and every BIRD. Returns the state to fill in with services.
pub fn build(opts: &Options, regions: &Regions) -> Result<Net> {
    for tool in ["ip", "bird", "ethtool", "runuser"] {
        if !["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists())
        {
            bail!("{tool} is not installed: run tests/scripts/setup.sh");
        }
    }
    let chosen: Vec<_> = regions
        .all()
        .iter()
        .filter(|r| opts.regions.is_empty() || opts.regions.iter().any(|c| c == r.id.as_str()))
        .collect();
    if chosen.is_empty() {
        bail!("no regions chosen");
    }
    if !chosen.iter().any(|r| r.id == regions.primary().id) {
        bail!(
            "the lab needs the primary region {} (the origin hangs off its metro)",
            regions.primary().id.as_str()
        );
    }
    let failover = opts
        .origin_failover
        .then(|| FailoverPlan::for_regions(regions, &chosen))
        .transpose()?;
    let p = opts.prefix.as_str();
    let names = Names(p);
    let dir = tempfile::Builder::new()
        .prefix(&format!("edgefront-lab-{p}-"))
        .tempdir_in("/var/tmp")?
        .keep();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    }
    for sub in ["bird", "logs", "state"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let anycast = regions.network.anycast_ipv4;
    let origin_asn = regions.network.origin_asn;
    let mut state = LabState {
        prefix: p.to_owned(),
        dir: dir.clone(),
        token,
        anycast,
        origin_asn,
        core_ns: names.core(),
        origin_url: format!("https://{CORE_IP}:8000"),
        dns_url: format!("http://{CORE_IP}:8055"),
        demo_host: "spiceroute.example".into(),
        ca_pem: dir.join("ca.pem"),
        regions: Vec::new(),
        services: Vec::new(),
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        database: None,
    };
    // Save early: a crash from here on is cleaned up by `edge-ctl lab down`.
    state.save()?;

    // Namespaces.
    let mut all_ns = vec![(names.core(), false), (names.wire(), false)];
    if failover.is_some() {
        all_ns.push((names.core2(), false));
    }
    for r in &chosen {
        let c = r.id.as_str();
        all_ns.push((names.node(c), false));
        all_ns.push((names.metro(c), true));
        all_ns.push((names.city(c), false));
    }
    for (ns, forward) in &all_ns {
        sh(&["ip", "netns", "add", ns])?;
        sysctl(ns, *forward)?;
        ipn(ns, &["link", "set", "lo", "up"])?;
    }

    // Region uplinks, shopper links, metro loopbacks.
    for (i, r) in chosen.iter().enumerate() {
        let c = r.id.as_str();
        let (m_ip, n_ip) = node_link(i);
        veth(
            &names.metro(c),
            "node",
            Some(m_ip),
            &names.node(c),
            "uplink",
            Some(n_ip),
        )?;
        ipn(
            &names.node(c),
            &["addr", "add", &format!("{}/32", r.node_ipv4), "dev", "lo"],
        )?;
        ipn(
            &names.node(c),
            &["addr", "add", &format!("{anycast}/32"), "dev", "lo"],
        )?;
        ipn(
            &names.node(c),
            &["route", "add", "default", "via", &m_ip.to_string()],
        )?;
        let (m_ip, c_ip) = city_link(i);
        veth(
            &names.metro(c),
            "city",
            Some(m_ip),
            &names.city(c),
            "uplink",
            Some(c_ip),
        )?;
        ipn(
            &names.city(c),
            &["route", "add", "default", "via", &m_ip.to_string()],
        )?;
        ipn(
            &names.metro(c),
            &["addr", "add", &format!("{}/32", r.router_ipv4), "dev", "lo"],
        )?;
        state.regions.push(LabRegion {
            code: c.to_owned(),
            city: r.city.clone(),
            asn: r.asn,
            node_ns: names.node(c),
            metro_ns: names.metro(c),
            city_ns: names.city(c),
            node_ip: r.node_ipv4,
            node_link_ip: node_link(i).1,
            metro_link_ip: node_link(i).0,
            health_url: format!("http://{}:9180", r.node_ipv4),
            edge_admin_url: format!("http://{}:9080", r.node_ipv4),
            token: format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
            metro_bird_socket: dir.join("bird").join(format!("metro-{c}.ctl")),
            node_bird_socket: dir.join("bird").join(format!("node-{c}.ctl")),
        });
    }
    // The origin host, on the primary region's metro.
    let primary = regions.primary().id.as_str();
    veth(
        &names.metro(primary),
        "core",
        Some(CORE_GW),
        &names.core(),
        "uplink",
        Some(CORE_IP),
    )?;
    ipn(
        &names.core(),
        &["route", "add", "default", "via", &CORE_GW.to_string()],
    )?;
    if let Some(plan) = &failover {
        veth(
            &names.metro(&plan.standby_region),
            "core2",
            Some(CORE2_GW),
            &names.core2(),
            "uplink",
            Some(CORE2_IP),
        )?;
        ipn(
            &names.core2(),
            &["route", "add", "default", "via", &CORE2_GW.to_string()],
        )?;
    }

    // Backbone through the delay link.
    let links = lab_links(regions, &chosen);
    if links.len() > 60 {
        bail!(
            "{} backbone links do not fit the lab's address plan",
            links.len()
        );
    }
    let mut link_args = Vec::new();
    for (j, l) in links.iter().enumerate() {
        let (ip_a, ip_b) = backbone_link(j);
        let (a, b) = (l.a.id.as_str(), l.b.id.as_str());
        let (wa, wb) = (format!("w{j}a"), format!("w{j}b"));
        let (ia, ib) = (format!("bb-{b}"), format!("bb-{a}"));
        veth(&names.metro(a), &ia, Some(ip_a), &names.wire(), &wa, None)?;
        veth(&names.metro(b), &ib, Some(ip_b), &names.wire(), &wb, None)?;
        for (ns, ifname) in [
            (names.metro(a), ia.as_str()),
            (names.wire(), wa.as_str()),
            (names.metro(b), ib.as_str()),
            (names.wire(), wb.as_str()),
        ] {
            offloads_off(&ns, ifname)?;
        }
        link_args.push(format!(
            "--link={a}-{b}:{wa}:{wb}:{}",
            l.one_way.as_micros()
        ));
    }
    // Every config file, rendered from the deployment templates.
    let files = lab_files(regions, &chosen, &dir, failover.as_ref())?;
    for f in &files {
        let d = dir.join("conf").join(&f.host);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(f.dest), &f.text)?;
    }
    let log = |name: &str| dir.join("logs").join(format!("{name}.log"));
    let mut argv = vec![bin(&opts.bin_dir, "edgefront-delaylink")?];
    argv.extend(link_args);
    state.services.push(Service {
        name: "delaylink".into(),
        region: None,
        netns: names.wire(),
        argv,
        env: Vec::new(),
        log: log("delaylink"),
        daemon: true,
    });

    // BIRD everywhere.
    for r in &chosen {
        let c = r.id.as_str();
        for (kind, host, ns) in [
            ("metro", format!("metro-{c}"), names.metro(c)),
            ("node", format!("node-{c}"), names.node(c)),
        ] {
            let conf_path = dir.join("conf").join(&host).join("bird.conf");
            let base = dir.join("bird").join(format!("{kind}-{c}"));
            sh(&["bird", "-p", "-c", &conf_path.display().to_string()])
                .with_context(|| format!("BIRD rejected the rendered {kind} config of {c}"))?;
            state.services.push(Service {
                name: format!("bird-{kind}-{c}"),
                region: (kind == "node").then(|| c.to_owned()),
                netns: ns,
                argv: vec![
                    "bird".into(),
                    "-f".into(),
                    "-c".into(),
                    conf_path.display().to_string(),
                    "-s".into(),
                    base.with_extension("ctl").display().to_string(),
                    "-P".into(),
                    base.with_extension("pid").display().to_string(),
                ],
                env: Vec::new(),
                log: log(&format!("bird-{kind}-{c}")),
                daemon: true,
            });
        }
    }
    state.save()?;
    let mut children = Vec::new();
    for s in &state.services {
        if let Some(child) = s.start()? {
            children.push(child);
        }
    }
    Ok(Net {
        state,
        children,
        files,
        failover,
    })
}

/// Waits until every metro router's BGP sessions are established.
pub async fn wait_bgp(state: &LabState, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for r in &state.regions {
        loop {
            let rows = async {
                let mut b = edgefront_health::bird::Bird::connect(
                    &r.metro_bird_socket,
                    Duration::from_secs(1),
                )
                .await?;
                b.protocols().await
            }
            .await;
            let pending: Vec<String> = match &rows {
                Ok(rows) => rows
                    .iter()
                    .filter(|p| p.proto == "BGP" && !p.info.starts_with("Established"))
                    .map(|p| format!("{} {}", p.name, p.info))
                    .collect(),
                Err(e) => vec![e.to_string()],
            };
            if pending.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "BGP on the {} metro router not established within {timeout:?}: {}",
                    r.code,
                    pending.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Runs `f` on a thread inside network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || -> Result<T> {
        edgefront_ctl::lab::enter_netns(&ns)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
}

/// One request from a shopper city to the anycast address, for the demo
/// host over HTTPS (the lab's CA), as browsers load it (plain HTTP is
/// redirected).
pub fn city_get(
    state: &LabState,
    city_ns: &str,
    path: &str,
) -> Result<std::io::Result<edgefront_ctl::probe::Probe>> {
    city_get_host(state, city_ns, &state.demo_host, path)
}

/// The same for `host` (a demo name or a store of the platform domain).
pub fn city_get_host(
    state: &LabState,
    city_ns: &str,
    host: &str,
    path: &str,
) -> Result<std::io::Result<edgefront_ctl::probe::Probe>> {
    let addr = SocketAddr::from((state.anycast, 443));
    let tls = edgefront_ctl::probe::tls_client(&state.ca_pem, &[b"http/1.1"])?;
    let (host, path) = (host.to_owned(), path.to_owned());
    in_netns(city_ns, move || {
        edgefront_ctl::probe::get_tls(addr, &host, &path, Duration::from_secs(2), tls)
    })
}
