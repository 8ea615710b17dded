//! The regions of the edgefront network.
//!
//! Owns the one region data file (`regions/regions.toml`, embedded at build time
//! as [`BUILTIN`]), its typed, validated loader, and the geography every other
//! part needs: great-circle distance, fiber round-trip estimates and regions
//! ordered by distance. It does not know about processes, ports or BGP sessions;
//! those are derived from it by the edge, the lab and the deployment tooling.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// The region data file shipped with this build.
pub const BUILTIN: &str = include_str!("../regions.toml");
/// The name [`BUILTIN`] is reported under in errors.
pub const BUILTIN_NAME: &str = "regions/regions.toml";

/// Speed of light in fiber, in km per second (refractive index ~1.5).
pub const FIBER_KM_PER_S: f64 = 200_000.0;
/// Mean Earth radius in km, as used by the haversine formula.
pub const EARTH_RADIUS_KM: f64 = 6_371.0;

/// Errors from loading or querying the region data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionsError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the expected shape.
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    /// A value is present but invalid.
    #[error("{file}: region {region}: {field}: {problem}")]
    Invalid {
        file: String,
        region: String,
        field: &'static str,
        problem: String,
    },
    /// A region code that is not in the data.
    #[error("unknown region {0:?}")]
    UnknownRegion(String),
}

/// A region code such as `bom1`: three lower-case letters and a digit.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(String);

impl RegionId {
    /// The code as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RegionId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let ok = b.len() == 4 && b[..3].iter().all(u8::is_ascii_lowercase) && b[3].is_ascii_digit();
        if ok {
            Ok(RegionId(s.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not a region code (three lower-case letters and a digit, e.g. bom1)"
            ))
        }
    }
}

/// What a region does besides serving shoppers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds the PostgreSQL primary and the origin.
    Primary,
    /// Holds a streaming replica.
    Replica,
}

/// A point on Earth in degrees.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Coord {
    pub latitude: f64,
    pub longitude: f64,
}

/// One region, validated.
#[derive(Clone, Debug)]
pub struct Region {
    pub id: RegionId,
    pub city: String,
    pub country: String,
    pub coord: Coord,
    pub role: Role,
    /// AS of the metro router this region peers with.
    pub asn: u32,
    /// The region node's unicast address.
    pub node_ipv4: Ipv4Addr,
    /// The metro router's address.
    pub router_ipv4: Ipv4Addr,
}

/// Settings that apply to the whole network.
#[derive(Clone, Debug)]
pub struct Network {
    pub anycast_ipv4: Ipv4Addr,
    pub origin_asn: u32,
    pub platform_domain: String,
    pub fiber_path_factor: f64,
}

/// The validated region data.
#[derive(Clone, Debug)]
pub struct Regions {
    pub network: Network,
    regions: Vec<Region>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    network: RawNetwork,
    #[serde(default)]
    region: Vec<RawRegion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    anycast_ipv4: String,
    origin_asn: u32,
    platform_domain: String,
    fiber_path_factor: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    code: String,
    city: String,
    country: String,
    latitude: f64,
    longitude: f64,
    role: Role,
    asn: u32,
    node_ipv4: String,
    router_ipv4: String,
}

fn valid_asn(asn: u32) -> Result<(), String> {
    match asn {
        0 | 23456 | 65535 | 4_294_967_295 => Err(format!("{asn} is a reserved AS number")),
        _ => Ok(()),
    }
}

impl Regions {
    /// The data shipped with this build.
    pub fn builtin() -> Result<Self, RegionsError> {
        Self::parse(BUILTIN_NAME, BUILTIN)
    }

    /// Loads and validates a region file.
    pub fn load(path: &Path) -> Result<Self, RegionsError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RegionsError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&file, &text)
    }

    /// Parses and validates region data; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, RegionsError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| RegionsError::Parse {
            file: file.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let invalid = |region: &str, field: &'static str, problem: String| RegionsError::Invalid {
            file: file.to_owned(),
            region: region.to_owned(),
            field,
            problem,
        };

        let n = raw.network;
        let network = Network {
            anycast_ipv4: n
                .anycast_ipv4
                .parse()
                .map_err(|e| invalid("(network)", "anycast_ipv4", format!("{e}")))?,
            origin_asn: {
                valid_asn(n.origin_asn).map_err(|p| invalid("(network)", "origin_asn", p))?;
                n.origin_asn
            },
            platform_domain: {
                let d = n.platform_domain.trim_end_matches('.').to_ascii_lowercase();
                if d.is_empty() || !d.contains('.') {
                    return Err(invalid(
                        "(network)",
                        "platform_domain",
                        format!("{:?} is not a domain name", n.platform_domain),
                    ));
                }
                d
            },
            fiber_path_factor: {
                let f = n.fiber_path_factor;
                if !(1.0..=5.0).contains(&f) {
                    return Err(invalid(
                        "(network)",
                        "fiber_path_factor",
                        format!("{f} is outside 1.0..=5.0"),
                    ));
                }
                f
            },
        };

        if raw.region.is_empty() {
            return Err(RegionsError::Parse {
                file: file.to_owned(),
                message: "no [[region]] entries".into(),
            });
        }
        let mut codes = HashSet::new();
        let mut asns = HashSet::new();
        let mut addrs = HashSet::new();
        let mut regions = Vec::with_capacity(raw.region.len());
        for r in raw.region {
            let id: RegionId = r.code.parse().map_err(|p| invalid(&r.code, "code", p))?;
            if !codes.insert(id.clone()) {
                return Err(invalid(&r.code, "code", "duplicate region code".into()));
            }
            if r.city.trim().is_empty() {
                return Err(invalid(&r.code, "city", "must not be empty".into()));
            }
            if r.country.len() != 2 || !r.country.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(invalid(
                    &r.code,
                    "country",
                    format!("{:?} is not an ISO 3166 alpha-2 code", r.country),
                ));
            }
            if !(-90.0..=90.0).contains(&r.latitude) {
                return Err(invalid(
                    &r.code,
                    "latitude",
                    format!("{} is outside -90..=90", r.latitude),
                ));
            }
            if !(-180.0..=180.0).contains(&r.longitude) {
                return Err(invalid(
                    &r.code,
                    "longitude",
                    format!("{} is outside -180..=180", r.longitude),
                ));
            }
            valid_asn(r.asn).map_err(|p| invalid(&r.code, "asn", p))?;
            if r.asn == network.origin_asn {
                return Err(invalid(
                    &r.code,
                    "asn",
                    "must differ from the network's origin_asn".into(),
                ));
            }
            if !asns.insert(r.asn) {
                return Err(invalid(
                    &r.code,
                    "asn",
                    format!("AS {} is used twice", r.asn),
                ));
            }
            let node_ipv4: Ipv4Addr = r
                .node_ipv4
                .parse()
                .map_err(|e| invalid(&r.code, "node_ipv4", format!("{:?}: {e}", r.node_ipv4)))?;
            let router_ipv4: Ipv4Addr = r.router_ipv4.parse().map_err(|e| {
                invalid(&r.code, "router_ipv4", format!("{:?}: {e}", r.router_ipv4))
            })?;
            for (field, a) in [("node_ipv4", node_ipv4), ("router_ipv4", router_ipv4)] {
                if a == network.anycast_ipv4 || !addrs.insert(a) {
                    return Err(invalid(&r.code, field, format!("{a} is used twice")));
                }
            }
            regions.push(Region {
                id,
                city: r.city,
                country: r.country,
                coord: Coord {
                    latitude: r.latitude,
                    longitude: r.longitude,
                },
                role: r.role,
                asn: r.asn,
                node_ipv4,
                router_ipv4,
            });
        }
        let primaries: Vec<_> = regions.iter().filter(|r| r.role == Role::Primary).collect();
        if primaries.len() != 1 {
            let names: Vec<_> = primaries.iter().map(|r| r.id.as_str()).collect();
            return Err(invalid(
                names.first().copied().unwrap_or("(all)"),
                "role",
                format!(
                    "exactly one region must be primary, found {} ({})",
                    primaries.len(),
                    names.join(", ")
                ),
            ));
        }
        Ok(Regions { network, regions })
    }

    /// All regions in file order.
    pub fn all(&self) -> &[Region] {
        &self.regions
    }

    /// The region with this code.
    pub fn get(&self, code: &str) -> Result<&Region, RegionsError> {
        self.regions
            .iter()
            .find(|r| r.id.as_str() == code)
            .ok_or_else(|| RegionsError::UnknownRegion(code.to_owned()))
    }

    /// The primary region (there is exactly one).
    pub fn primary(&self) -> &Region {
        // Invariant: `parse` rejects data without exactly one primary.
        self.regions
            .iter()
            .find(|r| r.role == Role::Primary)
            .unwrap_or(&self.regions[0])
    }

    /// Regions ordered by great-circle distance from `point`, nearest first,
    /// each with its distance in km.
    pub fn by_distance_from(&self, point: Coord) -> Vec<(&Region, f64)> {
        let mut v: Vec<_> = self
            .regions
            .iter()
            .map(|r| (r, great_circle_km(point, r.coord)))
            .collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.id.cmp(&b.0.id)));
        v
    }

    /// The other regions ordered by distance from region `code`, nearest first.
    pub fn by_distance_from_region(&self, code: &str) -> Result<Vec<(&Region, f64)>, RegionsError> {
        let from = self.get(code)?;
        Ok(self
            .by_distance_from(from.coord)
            .into_iter()
            .filter(|(r, _)| r.id != from.id)
            .collect())
    }

    /// The backbone between metros, derived from geography (never listed by
    /// hand): every metro links to its [`BACKBONE_NEIGHBOURS`] nearest
    /// metros, plus a minimum spanning tree so the graph is always connected.
    /// Each link is `(a, b, km)` with `a` before `b` in file order, sorted
    /// by (a, b). The lab builds these links with their fiber delay;
    /// deployments use them for nothing but documentation.
    pub fn backbone(&self) -> Vec<BackboneLink<'_>> {
        let n = self.regions.len();
        let km = |i: usize, j: usize| great_circle_km(self.regions[i].coord, self.regions[j].coord);
        let mut edges = std::collections::BTreeSet::new();
        for i in 0..n {
            let mut others: Vec<usize> = (0..n).filter(|&j| j != i).collect();
            others.sort_by(|&a, &b| km(i, a).total_cmp(&km(i, b)));
            for &j in others.iter().take(BACKBONE_NEIGHBOURS) {
                edges.insert((i.min(j), i.max(j)));
            }
        }
        // Prim's algorithm: adds the tree edges that keep every metro reachable.
        let mut in_tree = vec![false; n];
        if n > 0 {
            in_tree[0] = true;
        }
        for _ in 1..n {
            let mut best: Option<(usize, usize, f64)> = None;
            for i in (0..n).filter(|&i| in_tree[i]) {
                for j in (0..n).filter(|&j| !in_tree[j]) {
                    let d = km(i, j);
                    if best.is_none_or(|(_, _, b)| d < b) {
                        best = Some((i, j, d));
                    }
                }
            }
            if let Some((i, j, _)) = best {
                in_tree[j] = true;
                edges.insert((i.min(j), i.max(j)));
            }
        }
        edges
            .into_iter()
            .map(|(i, j)| BackboneLink {
                a: &self.regions[i],
                b: &self.regions[j],
                km: km(i, j),
                one_way: fiber_rtt(km(i, j), self.network.fiber_path_factor) / 2,
            })
            .collect()
    }

    /// Estimated fiber round trip between two points with this network's path factor.
    pub fn fiber_rtt(&self, a: Coord, b: Coord) -> Duration {
        fiber_rtt(great_circle_km(a, b), self.network.fiber_path_factor)
    }
}

/// The files [`Regions::export_json`] is written to, relative to the
/// repository root: terraform and ansible read these, never a second list.
pub const EXPORT_PATHS: [&str; 2] = [
    "terraform/regions.json",
    "ansible/inventory/group_vars/all/regions.json",
];

impl Regions {
    /// The region data as JSON for terraform (`jsondecode(file(…))`) and
    /// ansible (group vars): `edgefront_network`, `edgefront_regions` (file
    /// order, with each region's neighbours nearest first) and
    /// `edgefront_backbone`. Deterministic, so CI can check it is current.
    pub fn export_json(&self) -> String {
        let regions: Vec<serde_json::Value> = self
            .regions
            .iter()
            .map(|r| {
                let by_distance = self
                    .by_distance_from_region(r.id.as_str())
                    .unwrap_or_default();
                serde_json::json!({
                    "code": r.id.as_str(),
                    "city": r.city,
                    "country": r.country,
                    "latitude": r.coord.latitude,
                    "longitude": r.coord.longitude,
                    "role": match r.role { Role::Primary => "primary", Role::Replica => "replica" },
                    "asn": r.asn,
                    "node_ipv4": r.node_ipv4.to_string(),
                    "router_ipv4": r.router_ipv4.to_string(),
                    "nearest": by_distance.iter().map(|(x, _)| x.id.as_str()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let backbone: Vec<serde_json::Value> = self
            .backbone()
            .iter()
            .map(|l| {
                serde_json::json!({
                    "a": l.a.id.as_str(), "b": l.b.id.as_str(),
                    "km": (l.km * 10.0).round() / 10.0,
                    "one_way_us": l.one_way.as_micros() as u64,
                })
            })
            .collect();
        let v = serde_json::json!({
            "_generated": "by `edgefront-regions export` from regions/regions.toml; do not edit",
            "edgefront_network": {
                "anycast_ipv4": self.network.anycast_ipv4.to_string(),
                "origin_asn": self.network.origin_asn,
                "platform_domain": self.network.platform_domain,
                "fiber_path_factor": self.network.fiber_path_factor,
                "primary_region": self.primary().id.as_str(),
            },
            "edgefront_regions": regions,
            "edgefront_backbone": backbone,
        });
        let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// How many nearest metros each metro links to in [`Regions::backbone`].
pub const BACKBONE_NEIGHBOURS: usize = 3;

/// One backbone link between two metros.
#[derive(Clone, Debug)]
pub struct BackboneLink<'a> {
    pub a: &'a Region,
    pub b: &'a Region,
    pub km: f64,
    /// One-way fiber delay over the link.
    pub one_way: Duration,
}

/// Great-circle distance in km (haversine on a spherical Earth).
pub fn great_circle_km(a: Coord, b: Coord) -> f64 {
    let (la1, la2) = (a.latitude.to_radians(), b.latitude.to_radians());
    let dlat = la2 - la1;
    let dlon = (b.longitude - a.longitude).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// Round-trip time over fiber for a great-circle distance, with a path factor
/// (real cable routes are longer than the great circle; 1.0 is the ideal).
pub fn fiber_rtt(km: f64, path_factor: f64) -> Duration {
    let one_way_s = km * path_factor / FIBER_KM_PER_S;
    Duration::from_secs_f64(2.0 * one_way_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backbone_is_connected_symmetric_and_geographic() {
        let r = Regions::builtin().expect("built-in regions");
        let links = r.backbone();
        // Connected: a walk from the first metro reaches every metro.
        let mut seen = vec![r.all()[0].id.clone()];
        let mut grew = true;
        while grew {
            grew = false;
            for l in &links {
                for (x, y) in [(l.a, l.b), (l.b, l.a)] {
                    if seen.contains(&x.id) && !seen.contains(&y.id) {
                        seen.push(y.id.clone());
                        grew = true;
                    }
                }
            }
        }
        assert_eq!(seen.len(), r.all().len());
        // Every metro is linked to its nearest other metro.
        for region in r.all() {
            let nearest = r
                .by_distance_from_region(region.id.as_str())
                .expect("known")[0]
                .0;
            assert!(
                links
                    .iter()
                    .any(|l| (l.a.id == region.id && l.b.id == nearest.id)
                        || (l.b.id == region.id && l.a.id == nearest.id)),
                "{} not linked to {}",
                region.id.as_str(),
                nearest.id.as_str()
            );
        }
        // No duplicates, no self links, delays from distance.
        let mut pairs: Vec<_> = links
            .iter()
            .map(|l| (l.a.id.clone(), l.b.id.clone()))
            .collect();
        pairs.dedup();
        assert_eq!(pairs.len(), links.len());
        for l in &links {
            assert_ne!(l.a.id, l.b.id);
            let expect = l.km * 1.4 / FIBER_KM_PER_S;
            assert!((l.one_way.as_secs_f64() - expect).abs() < 1e-6);
        }
    }

    fn with_region_field(field: &str, value: &str) -> String {
        // Replace the field of the first region (bom1) only.
        let mut out = String::new();
        let mut done = false;
        for line in BUILTIN.lines() {
            if !done && line.starts_with(&format!("{field} =")) {
                out.push_str(&format!("{field} = {value}\n"));
                done = true;
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        assert!(done, "field {field} not found");
        out
    }

    #[test]
    fn builtin_loads_nine_regions_with_bom1_primary() {
        let r = Regions::builtin().expect("builtin regions valid");
        let codes: Vec<_> = r.all().iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            codes,
            [
                "bom1", "sin1", "ams1", "fra1", "lon1", "nyc1", "lax1", "gru1", "syd1"
            ]
        );
        assert_eq!(r.primary().id.as_str(), "bom1");
        assert_eq!(r.get("gru1").expect("gru1").city, "São Paulo");
    }

    #[test]
    fn loader_rejects_duplicate_code_naming_file_region_field() {
        let text = BUILTIN.replace("code = \"sin1\"", "code = \"bom1\"");
        let err = Regions::parse("x.toml", &text).expect_err("duplicate");
        assert_eq!(
            err.to_string(),
            "x.toml: region bom1: code: duplicate region code"
        );
    }

    #[test]
    fn loader_rejects_two_primaries() {
        let text = BUILTIN.replacen("role = \"replica\"", "role = \"primary\"", 1);
        let err = Regions::parse("x.toml", &text).expect_err("two primaries");
        let msg = err.to_string();
        assert!(
            msg.contains("role: exactly one region must be primary, found 2"),
            "{msg}"
        );
    }

    #[test]
    fn loader_rejects_no_primary() {
        let text = BUILTIN.replace("role = \"primary\"", "role = \"replica\"");
        let err = Regions::parse("x.toml", &text).expect_err("no primary");
        assert!(err.to_string().contains("found 0"), "{err}");
    }

    #[test]
    fn loader_rejects_latitude_out_of_range() {
        let text = with_region_field("latitude", "91.5");
        let err = Regions::parse("x.toml", &text).expect_err("lat");
        assert_eq!(
            err.to_string(),
            "x.toml: region bom1: latitude: 91.5 is outside -90..=90"
        );
    }

    #[test]
    fn loader_rejects_longitude_out_of_range() {
        let text = with_region_field("longitude", "-181");
        let err = Regions::parse("x.toml", &text).expect_err("lon");
        assert!(err.to_string().contains("region bom1: longitude"), "{err}");
    }

    #[test]
    fn loader_rejects_bad_code_and_address() {
        let err =
            Regions::parse("x.toml", &with_region_field("code", "\"BOM\"")).expect_err("code");
        assert!(err.to_string().contains("region BOM: code:"), "{err}");
        let err = Regions::parse("x.toml", &with_region_field("node_ipv4", "\"300.1.1.1\""))
            .expect_err("addr");
        assert!(err.to_string().contains("region bom1: node_ipv4:"), "{err}");
    }

    #[test]
    fn loader_rejects_unknown_field_and_reserved_asn() {
        let err = Regions::parse(
            "x.toml",
            &BUILTIN.replace("city = \"Mumbai\"", "cty = \"Mumbai\""),
        )
        .expect_err("unknown field");
        assert!(err.to_string().starts_with("x.toml: "), "{err}");
        let err = Regions::parse("x.toml", &with_region_field("asn", "23456")).expect_err("asn");
        assert!(
            err.to_string()
                .contains("region bom1: asn: 23456 is a reserved"),
            "{err}"
        );
    }

    #[test]
    fn load_reports_missing_file() {
        let err = Regions::load(Path::new("/nonexistent/regions.toml")).expect_err("missing");
        assert!(
            err.to_string()
                .starts_with("/nonexistent/regions.toml: cannot read")
        );
    }

    #[test]
    fn great_circle_matches_known_distances() {
        let r = Regions::builtin().expect("regions");
        let d = |a: &str, b: &str| {
            great_circle_km(r.get(a).expect("a").coord, r.get(b).expect("b").coord)
        };
        // London–New York is about 5570 km; Mumbai–Singapore about 3900 km.
        assert!(
            (d("lon1", "nyc1") - 5570.0).abs() < 30.0,
            "{}",
            d("lon1", "nyc1")
        );
        assert!(
            (d("bom1", "sin1") - 3910.0).abs() < 40.0,
            "{}",
            d("bom1", "sin1")
        );
        assert_eq!(d("ams1", "ams1"), 0.0);
        // Antipodes do not produce NaN.
        let far = great_circle_km(
            Coord {
                latitude: 0.0,
                longitude: 0.0,
            },
            Coord {
                latitude: 0.0,
                longitude: 180.0,
            },
        );
        assert!((far - std::f64::consts::PI * EARTH_RADIUS_KM).abs() < 1e-6);
    }

    #[test]
    fn fiber_rtt_uses_200000_km_per_s_and_path_factor() {
        // 2000 km, ideal path: 10 ms one way, 20 ms round trip.
        assert_eq!(fiber_rtt(2000.0, 1.0), Duration::from_millis(20));
        assert_eq!(fiber_rtt(2000.0, 1.5), Duration::from_millis(30));
    }

    #[test]
    fn by_distance_orders_nearest_first() {
        let r = Regions::builtin().expect("regions");
        let from_ams: Vec<_> = r
            .by_distance_from_region("ams1")
            .expect("ams1")
            .iter()
            .map(|(r, _)| r.id.as_str().to_owned())
            .collect();
        assert_eq!(from_ams[..2], ["lon1", "fra1"]);
        assert_eq!(from_ams.last().map(String::as_str), Some("syd1"));
        assert!(!from_ams.contains(&"ams1".to_owned()));
        // A shopper in Delhi is nearest to Mumbai, then Singapore.
        let delhi = Coord {
            latitude: 28.61,
            longitude: 77.21,
        };
        let order: Vec<_> = r
            .by_distance_from(delhi)
            .iter()
            .map(|(r, _)| r.id.as_str())
            .collect();
        assert_eq!(order[..2], ["bom1", "sin1"]);
        assert!(r.by_distance_from_region("xyz9").is_err());
    }
}
