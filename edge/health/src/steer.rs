//! Second-chance forwarding: a region that announces again keeps the
//! connections shoppers opened elsewhere while it was away.
//!
//! When a region withdraws, its shoppers' new connections go to the next
//! region BGP picks. When it announces again, BGP brings their packets back
//! — including packets of those connections, which this node has no socket
//! for: the kernel would answer them with a reset. Instead, for a bounded
//! window after each announce, this node sends TCP packets to the anycast
//! address that belong to no connection it knows (not a SYN, no conntrack
//! state) to the peer region's node through a VXLAN tunnel; the peer, which
//! holds the socket, answers the shopper directly. A flow once sent away
//! keeps being sent away while it is active (an nftables set with an idle
//! timeout), also after the window; new unknown flows after the window get
//! the kernel's reset as before. The technique is GitHub GLB's and
//! Facebook Katran's second chance, reduced to one peer: the region BGP
//! moves this region's shoppers to, which is the next-nearest one.
//!
//! What it installs in the node's network namespace (root or
//! `CAP_NET_ADMIN`), idempotently, at start:
//! - a VXLAN device (`efsc0`, VNI 7241, UDP 4789) whose MAC is derived from
//!   the node address, so every node can address every other one's;
//! - policy routing: packets marked `0x5ec` go to the anycast address
//!   through the tunnel (the `local` rule moved behind it, else a local
//!   address always wins), forwarding on for marked packets only;
//! - an nftables table `edgefront_second_chance`: the set of flows sent
//!   away, and the window as a set element with a timeout (the kernel ends
//!   it even if this daemon dies).
//!
//! Every node also receives: its tunnel device delivers a peer's forwarded
//! packets to its own sockets. Flows this node does not know either are
//! answered with a reset, as without the tunnel (a packet is never forwarded
//! twice: only packets from outside the tunnel are marked).

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

/// The tunnel device.
pub const DEVICE: &str = "efsc0";
/// The VXLAN network id.
pub const VNI: u32 = 7241;
/// The firewall mark of packets sent away, and the routing table they use.
pub const MARK: u32 = 0x5ec;
pub const TABLE: u32 = 7241;
const NFT_TABLE: &str = "edgefront_second_chance";
/// The tunnel's UDP port.
pub const VXLAN_PORT: u16 = 4789;
/// New flows adopted per second at most (and burst): a flood of made-up
/// mid-stream packets during a window fills neither `away` nor the peer.
const ADOPT_RATE: u32 = 2000;
const ADOPT_BURST: u32 = 4000;

/// Second-chance settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The anycast address shoppers reach.
    pub anycast: Ipv4Addr,
    /// This node's own (unicast) address: the tunnel's source, and its MAC.
    pub node: Ipv4Addr,
    /// The node of the region that takes this region's shoppers when it is
    /// away (the next-nearest region).
    pub peer: Ipv4Addr,
    /// How long after an announce unknown flows are sent to the peer.
    pub window: Duration,
    /// A flow sent away stays sent away while it is active; idle this long,
    /// it is forgotten.
    pub flow_idle: Duration,
    /// The region nodes allowed to send into this node's tunnel.
    pub tunnel_sources: Vec<Ipv4Addr>,
    /// The edge's public ports (what may come out of the tunnel).
    pub ports: Vec<u16>,
}

/// The MAC of a node's tunnel device (locally administered, from its address).
pub fn mac_of(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:ef:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    use std::io::Write;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("{program}: {e}"))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input
            .write_all(text.as_bytes())
            .map_err(|e| format!("{program}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Sets a sysctl unless it already has the value (in production the
/// deployment sets them and `/proc/sys` is read-only to this daemon).
fn sysctl(key: &str, value: &str) -> Result<(), String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(|e| format!("{path}: {e} (set {key}={value})"))
}

/// The nftables table, as one script nft applies atomically (a restart of
/// this daemon replaces the rules in one transaction and keeps the sets):
/// - only region nodes may send into the tunnel, and what comes out of it
///   must be a non-SYN TCP packet to the anycast address on an edge port;
/// - a flow sent away keeps going there while active (`away`, idle timeout);
/// - during the window (the anycast address in `adopting`, with the window's
///   timeout, so the kernel closes it even if this daemon is gone), a packet
///   conntrack has never seen (`ct state new` without a SYN: a mid-stream
///   packet, picked up loosely) is sent away, at a bounded rate; a packet of
///   a known connection is never, not even one conntrack finds `invalid`;
/// - forwarding: only marked packets, only into the tunnel.
fn ruleset(s: &Settings) -> String {
    let flow = "ip saddr . tcp sport . tcp dport";
    let any = s.anycast;
    let mark = format!("{MARK:#x}");
    let ports = s
        .ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut nodes: Vec<String> = s.tunnel_sources.iter().map(Ipv4Addr::to_string).collect();
    nodes.sort();
    nodes.dedup();
    let t = format!("ip {NFT_TABLE}");
    let mut out = format!(
        r#"table {t} {{
  set away {{
    type ipv4_addr . inet_service . inet_service
    size 65536
    flags dynamic,timeout
    timeout {idle}s
  }}
  set adopting {{
    type ipv4_addr
    flags timeout
  }}
  set nodes {{
    type ipv4_addr
  }}
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
  }}
}}
flush chain {t} prerouting
flush chain {t} forward
flush set {t} nodes
"#,
        idle = s.flow_idle.as_secs().max(1),
    );
    if !nodes.is_empty() {
        out.push_str(&format!(
            "add element {t} nodes {{ {} }}
",
            nodes.join(", ")
        ));
    }
    for rule in [
        format!("udp dport {VXLAN_PORT} ip saddr != @nodes drop"),
        format!("iifname \"{DEVICE}\" ip daddr != {any} drop"),
        format!("iifname \"{DEVICE}\" meta l4proto != tcp drop"),
        format!("iifname \"{DEVICE}\" tcp dport != {{ {ports} }} drop"),
        format!("iifname \"{DEVICE}\" tcp flags & syn == syn drop"),
        format!(
            "iifname != \"{DEVICE}\" ip daddr {any} tcp flags & syn != syn ct state invalid,new {flow} @away update @away {{ {flow} }} meta mark set {mark} accept"
        ),
        format!(
            "iifname != \"{DEVICE}\" ip daddr @adopting tcp flags & syn != syn ct state new limit rate {ADOPT_RATE}/second burst {ADOPT_BURST} packets add @away {{ {flow} }} meta mark set {mark}"
        ),
    ] {
        out.push_str(&format!(
            "add rule {t} prerouting {rule}
"
        ));
    }
    out.push_str(&format!(
        "add rule {t} forward meta mark {mark} oifname \"{DEVICE}\" accept
"
    ));
    out
}

/// The node's second-chance state.
pub struct Steer {
    settings: Settings,
    /// When the adopt window closes (`None`: closed).
    open_until: Option<Instant>,
}

impl Steer {
    /// Installs the tunnel, routing and table (keeping the set of flows sent
    /// away if the table is there already, e.g. after a restart of this
    /// daemon) with the window closed.
    pub fn install(settings: Settings) -> Result<Steer, String> {
        let s = &settings;
        let (node, peer) = (s.node.to_string(), s.peer.to_string());
        if run("ip", &["link", "show", DEVICE], None).is_err() {
            run(
                "ip",
                &[
                    "link",
                    "add",
                    DEVICE,
                    "address",
                    &mac_of(s.node),
                    "mtu",
                    "1500",
                    "type",
                    "vxlan",
                    "id",
                    &VNI.to_string(),
                    "local",
                    &node,
                    "dstport",
                    &VXLAN_PORT.to_string(),
                    "nolearning",
                ],
                None,
            )?;
        }
        run("ip", &["link", "set", DEVICE, "up"], None)?;
        // One destination: the peer's node.
        let _ = run(
            "bridge",
            &["fdb", "del", "00:00:00:00:00:00", "dev", DEVICE],
            None,
        );
        run(
            "bridge",
            &[
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                DEVICE,
                "dst",
                &peer,
            ],
            None,
        )?;
        let any = s.anycast.to_string();
        run(
            "ip",
            &[
                "neigh",
                "replace",
                &any,
                "lladdr",
                &mac_of(s.peer),
                "dev",
                DEVICE,
                "nud",
                "permanent",
            ],
            None,
        )?;
        let table = TABLE.to_string();
        run(
            "ip",
            &[
                "route",
                "replace",
                &format!("{any}/32"),
                "dev",
                DEVICE,
                "table",
                &table,
            ],
            None,
        )?;
        let rules = std::process::Command::new("ip")
            .args(["rule", "show"])
            .output()
            .map_err(|e| format!("ip rule: {e}"))?;
        if !rules.status.success() {
            return Err(format!(
                "ip rule show: {}",
                String::from_utf8_lossy(&rules.stderr).trim()
            ));
        }
        let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
        let mark = format!("{MARK:#x}");
        if !rules.lines().any(|l| {
            l.contains(&format!("fwmark {mark}")) && l.contains(&format!("lookup {table}"))
        }) {
            run(
                "ip",
                &[
                    "rule", "add", "pref", "10", "fwmark", &mark, "lookup", &table,
                ],
                None,
            )?;
        }
        // The local table first would deliver marked packets here: it goes
        // after the mark rule (added before the old one is removed).
        if !rules
            .lines()
            .any(|l| l.starts_with("100:") && l.contains("lookup local"))
        {
            run(
                "ip",
                &["rule", "add", "pref", "100", "lookup", "local"],
                None,
            )?;
        }
        if rules
            .lines()
            .any(|l| l.starts_with("0:") && l.contains("lookup local"))
        {
            run("ip", &["rule", "del", "pref", "0", "lookup", "local"], None)?;
        }
        sysctl("net.ipv4.ip_forward", "1")?;
        // Loose reverse-path filtering (2) or none: packets from the tunnel
        // come from shoppers whose route is via the uplink.
        for dev in ["all", DEVICE] {
            let key = format!("net.ipv4.conf.{dev}.rp_filter");
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
                sysctl(&key, "2")?;
            }
        }
        // The table, in one transaction (sets kept if present).
        run("nft", &["-f", "-"], Some(&ruleset(s)))?;
        Ok(Steer {
            settings,
            open_until: None,
        })
    }

    /// The region is about to announce after being away: unknown flows go
    /// to the peer for the window.
    pub fn open(&mut self) -> Result<(), String> {
        let window = self.settings.window.as_secs().max(1);
        run("nft", &["flush", "set", "ip", NFT_TABLE, "adopting"], None)?;
        run(
            "nft",
            &[
                "add",
                "element",
                "ip",
                NFT_TABLE,
                "adopting",
                &format!("{{ {} timeout {window}s }}", self.settings.anycast),
            ],
            None,
        )?;
        self.open_until = Some(Instant::now() + self.settings.window);
        Ok(())
    }

    /// Closes the window early (the region withdrew).
    pub fn close(&mut self) -> Result<(), String> {
        self.open_until = None;
        run("nft", &["flush", "set", "ip", NFT_TABLE, "adopting"], None)
    }

    /// Whether the window is open.
    pub fn is_open(&self) -> bool {
        self.open_until.is_some_and(|t| Instant::now() < t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            anycast: Ipv4Addr::new(203, 0, 113, 10),
            node: Ipv4Addr::new(198, 51, 100, 1),
            peer: Ipv4Addr::new(198, 51, 100, 2),
            window: Duration::from_secs(150),
            flow_idle: Duration::from_secs(180),
            tunnel_sources: vec![
                Ipv4Addr::new(198, 51, 100, 2),
                Ipv4Addr::new(198, 51, 100, 3),
            ],
            ports: vec![80, 443],
        }
    }

    #[test]
    fn every_node_has_its_own_tunnel_mac() {
        assert_eq!(mac_of(Ipv4Addr::new(198, 51, 100, 1)), "02:ef:c6:33:64:01");
        assert_ne!(
            mac_of(Ipv4Addr::new(198, 51, 100, 1)),
            mac_of(Ipv4Addr::new(198, 51, 100, 2)),
            "a VXLAN device drops frames from its own MAC"
        );
    }

    #[test]
    fn only_unknown_non_syn_packets_from_outside_the_tunnel_are_sent_away() {
        let r = ruleset(&settings());
        let marking: Vec<&str> = r.lines().filter(|l| l.contains("meta mark set")).collect();
        assert_eq!(marking.len(), 2, "{r}");
        for l in &marking {
            // Never a SYN (new connections are this node's), never a packet
            // that came through the tunnel.
            assert!(l.contains("tcp flags & syn != syn"), "{l}");
            assert!(l.contains(&format!("iifname != \"{DEVICE}\"")), "{l}");
        }
        // Adoption: only packets conntrack has never seen (a known
        // connection's packet found invalid stays here), at a bounded rate,
        // only while the window's element is in the set.
        let adopt = marking[1];
        assert!(adopt.contains("ip daddr @adopting"), "{adopt}");
        assert!(adopt.contains("ct state new limit rate"), "{adopt}");
        assert!(!adopt.contains("invalid"), "{adopt}");
        assert!(r.contains("timeout 180s"), "{r}");
        // Forwarding is for marked packets into the tunnel only.
        assert!(r.contains("policy drop;"), "{r}");
    }

    #[test]
    fn only_region_nodes_may_send_into_the_tunnel_and_only_shopper_tcp_comes_out() {
        let r = ruleset(&settings());
        assert!(
            r.contains(
                "add element ip edgefront_second_chance nodes { 198.51.100.2, 198.51.100.3 }"
            ),
            "{r}"
        );
        assert!(r.contains("udp dport 4789 ip saddr != @nodes drop"), "{r}");
        assert!(
            r.contains("iifname \"efsc0\" ip daddr != 203.0.113.10 drop"),
            "{r}"
        );
        assert!(
            r.contains("iifname \"efsc0\" tcp dport != { 80, 443 } drop"),
            "{r}"
        );
        assert!(
            r.contains("iifname \"efsc0\" tcp flags & syn == syn drop"),
            "{r}"
        );
        // One transaction: the chains are emptied and refilled by one script.
        assert!(
            r.contains("flush chain ip edgefront_second_chance prerouting"),
            "{r}"
        );
    }
}
