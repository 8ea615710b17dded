//! The other regions' health hooks: where they are, and reading what they
//! say (their authenticated `/status`), for the shared-cause rule in
//! [`decision`](crate::decision).
//!
//! Addresses come from the region data (`http://<node_ipv4>:<port>` for every
//! region but this one, as `edge-ctl` finds them) or from an explicit list.
//! Anything short of a fresh, well-formed answer from the right region counts
//! as not fine: unreachable, refused, another region answering, a hook whose
//! own probes have stalled.

use std::time::Duration;

use edgefront_regions::Regions;
use serde::Deserialize;

use crate::decision::PeerView;

/// A peer's probes older than this make it count as unreachable (its loop is
/// stuck even though its API answers).
pub const STALE_PROBES: Duration = Duration::from_secs(5);

/// Another region's hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub region: String,
    /// Base URL of its admin API.
    pub url: String,
}

/// Every region of `regions` but `own`, at `http://<node_ipv4>:<port>`.
pub fn from_regions(regions: &Regions, own: &str, port: u16) -> Result<Vec<Peer>, String> {
    regions
        .get(own)
        .map_err(|_| format!("region {own:?} is not in the region data (or give --peers)"))?;
    Ok(regions
        .all()
        .iter()
        .filter(|r| r.id.as_str() != own)
        .map(|r| Peer {
            region: r.id.as_str().to_owned(),
            url: format!("http://{}:{port}", r.node_ipv4),
        })
        .collect())
}

/// Parses `code=url` items (`--peers`); an empty list means no peers.
pub fn parse(items: &[String], own: &str) -> Result<Vec<Peer>, String> {
    let mut out: Vec<Peer> = Vec::new();
    for item in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
        let (region, url) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not code=url"))?;
        let (region, url) = (region.trim(), url.trim().trim_end_matches('/'));
        if region.is_empty() {
            return Err(format!("{item:?} has no region code"));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "{item:?}: the url must start with http:// or https://"
            ));
        }
        if region == own {
            return Err(format!("{item:?} is this region itself"));
        }
        if out.iter().any(|p| p.region == region) {
            return Err(format!("{region} is listed twice"));
        }
        out.push(Peer {
            region: region.to_owned(),
            url: url.to_owned(),
        });
    }
    Ok(out)
}

/// The fields of a peer's `/status` this hook reads (older hooks lack the
/// newer ones: their defaults are the conservative reading).
#[derive(Debug, Deserialize)]
struct Remote {
    region: String,
    announced: bool,
    healthy: bool,
    drained: bool,
    #[serde(default)]
    lag_warning: bool,
    #[serde(default)]
    last_probe_age_ms: Option<u64>,
}

/// Reads one peer (bounded by the client's timeout).
pub async fn read(http: &reqwest::Client, peer: &Peer, token: &str) -> PeerView {
    let down = |e: String| PeerView::unreachable(&peer.region, e);
    let r = match http
        .get(format!("{}/status", peer.url))
        .bearer_auth(token)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return down(crate::daemon::short(&e)),
    };
    if !r.status().is_success() {
        return down(format!("answered {}", r.status()));
    }
    let s: Remote = match r.json().await {
        Ok(s) => s,
        Err(e) => return down(format!("unreadable status: {}", crate::daemon::short(&e))),
    };
    if s.region != peer.region {
        return down(format!("{} answered as region {:?}", peer.url, s.region));
    }
    if let Some(age) = s
        .last_probe_age_ms
        .filter(|ms| Duration::from_millis(*ms) > STALE_PROBES)
    {
        return down(format!("its last probe is {:.1}s old", age as f64 / 1e3));
    }
    PeerView {
        region: s.region,
        reachable: true,
        announced: s.announced,
        healthy: s.healthy,
        drained: s.drained,
        lag_warning: s.lag_warning,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn from_regions_lists_every_other_region_at_its_node_address() {
        let regions = Regions::builtin().unwrap();
        let peers = from_regions(&regions, "ams1", 9180).unwrap();
        assert_eq!(peers.len(), regions.all().len() - 1);
        assert!(peers.iter().all(|p| p.region != "ams1"));
        let bom = regions.get("bom1").unwrap();
        assert!(
            peers
                .iter()
                .any(|p| p.url == format!("http://{}:9180", bom.node_ipv4))
        );
        assert!(from_regions(&regions, "xyz9", 9180).is_err());
    }

    #[test]
    fn parse_takes_code_url_pairs_and_rejects_mistakes() {
        let items = |s: &str| s.split(',').map(str::to_owned).collect::<Vec<_>>();
        let p = parse(
            &items("sin1=http://10.0.0.2:9180/, ams1=https://a.example"),
            "bom1",
        )
        .unwrap();
        assert_eq!(p[0].url, "http://10.0.0.2:9180");
        assert_eq!(p[1].region, "ams1");
        assert!(parse(&items(""), "bom1").unwrap().is_empty());
        for bad in [
            "sin1",
            "=http://x",
            "sin1=ftp://x",
            "bom1=http://x",
            "sin1=http://x,sin1=http://y",
        ] {
            assert!(parse(&items(bad), "bom1").is_err(), "{bad}");
        }
    }
}
