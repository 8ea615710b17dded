//! `edgefront-local`: every region on loopback ports, without namespaces or
//! BGP (no root needed); the benchmarks use it. The main job with the anycast
//! network is `edgefront-lab`. Starts a PostgreSQL primary
//! (the primary region's), the origin with the demo stores, and for every
//! region a streaming replica with its own replication slot and an edge that
//! reads only that replica. Prints what to try; Ctrl-C removes everything.
//!
//! `--smoke` starts everything, checks a storefront page on every edge, a write
//! through one edge and that the write reaches every region, then stops (CI
//! runs it so the main job stays green).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use edgefront_tests::{Edge, Origin, Postgres, TestCa, client, eventually};

#[derive(Parser)]
#[command(
    name = "edgefront-local",
    version,
    about = "Run edgefront on loopback ports (no anycast network): primary, origin, and a replica + edge per region, with demo stores"
)]
struct Cli {
    /// Regions to start (comma-separated codes, or `all`).
    #[arg(long, default_value = "all")]
    regions: String,
    /// First edge port on 127.0.0.1; region i listens on base+i (0: free ports).
    #[arg(long, default_value_t = 8080)]
    edge_port: u16,
    /// First TLS port on 127.0.0.1; region i on base+i (0: free ports).
    #[arg(long, default_value_t = 8443)]
    tls_port: u16,
    /// First admin port on 127.0.0.1; region i on base+i (0: free ports).
    #[arg(long, default_value_t = 9080)]
    admin_port: u16,
    /// Origin port on 127.0.0.1 (0: a free port).
    #[arg(long, default_value_t = 8000)]
    origin_port: u16,
    /// Start, check pages, a write and its propagation everywhere, then stop.
    #[arg(long)]
    smoke: bool,
    /// The origin's public listener serves TLS (a fresh internal CA) and the
    /// edges proxy to it verified against that CA, as in production.
    #[arg(long)]
    origin_tls: bool,
}

/// 127.0.0.1:`base + i`; base 0 picks a free port.
fn addr(base: u16, i: usize) -> SocketAddr {
    let port = if base == 0 {
        edgefront_tests::free_port()
    } else {
        base + i as u16
    };
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn check_free(a: SocketAddr, what: &str) -> Result<()> {
    if std::net::TcpListener::bind(a).is_err() {
        bail!("{a} is in use; pick other ports with {what}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let regions = edgefront_regions::Regions::builtin()?;
    let chosen: Vec<_> = if cli.regions == "all" {
        regions.all().to_vec()
    } else {
        cli.regions
            .split(',')
            .map(|c| regions.get(c.trim()).cloned())
            .collect::<Result<_, _>>()?
    };
    let platform = regions.network.platform_domain.clone();
    let origin_addr = addr(cli.origin_port, 0);
    check_free(origin_addr, "--origin-port")?;
    let mut ports = Vec::new();
    for i in 0..chosen.len() {
        let (e, a, t) = (
            addr(cli.edge_port, i),
            addr(cli.admin_port, i),
            addr(cli.tls_port, i),
        );
        check_free(e, "--edge-port")?;
        check_free(a, "--admin-port")?;
        check_free(t, "--tls-port")?;
        ports.push((e, a, t));
    }

    let t0 = Instant::now();
    println!(
        "edgefront lab: PostgreSQL primary for {} ({})…",
        regions.primary().id,
        regions.primary().city
    );
    let primary = Postgres::primary()?;
    // Fresh secrets per run: the internal API token and the key sealing certificates.
    let internal_token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let cert_key = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let pki = edgefront_tests::InternalPki::new(&["127.0.0.1"])?;
    let server = pki.origin_identity();
    let path = |p: &std::path::Path| p.to_str().map(str::to_owned).context("path");
    let (cert, key, origin_ca) = (path(&server.cert)?, path(&server.key)?, path(&server.ca)?);
    let mut origin_args = vec!["--internal-token", &internal_token, "--cert-key", &cert_key];
    if cli.origin_tls {
        origin_args.extend(["--tls-cert", &cert, "--tls-key", &key]);
    }
    let origin = Origin::start_with(&primary.url(), &platform, origin_addr, &origin_args)?;
    let demo = Origin::seed_demo(&primary.url(), &platform)?;
    let stores = demo.as_array().context("demo output")?;
    // A lab CA and a certificate per demo domain plus the platform wildcard.
    let lab_dir = tempfile::Builder::new()
        .prefix("edgefront-lab-")
        .tempdir()?;
    let ca = TestCa::new()?;
    std::fs::write(lab_dir.path().join("ca.pem"), &ca.pem)?;
    let mut names: Vec<String> = stores
        .iter()
        .filter_map(|s| s["domains"].as_array())
        .flatten()
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect();
    names.push(format!("*.{platform}"));
    for name in &names {
        let (chain, key) = ca.leaf(&[name.as_str()])?;
        if name == "spiceroute.example" {
            std::fs::write(lab_dir.path().join("spiceroute.pem"), &chain)?;
            std::fs::write(lab_dir.path().join("spiceroute.key"), &key)?;
        }
        let r = origin
            .internal_client("operator")?
            .put(format!(
                "{}/internal/certificates/{name}",
                origin.internal_url()?
            ))
            .bearer_auth(&internal_token)
            .json(&serde_json::json!({ "chain_pem": chain, "key_pem": key }))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("installing the certificate of {name}: {}", r.status());
        }
    }
    // Processes first, then databases, so drop order stops edges before replicas.
    let mut edges: Vec<Edge> = Vec::new();
    let mut replicas: Vec<Postgres> = Vec::new();
    for (r, (e, a, t)) in chosen.iter().zip(&ports) {
        println!(
            "edgefront lab: {} ({}): streaming replica + edge…",
            r.id, r.city
        );
        let replica = primary.replica(r.id.as_str())?;
        let mut edge = Edge::builder(r.id.as_str(), &replica.url(), origin.addr);
        if cli.origin_tls {
            edge = edge.arg("--origin-ca").arg(&origin_ca);
        }
        let edge = edge
            .cache_ttl_ms(300_000)
            .listen(*e, *a)
            .arg("--threads")
            .arg("1")
            .arg("--primary-url")
            .arg(&primary.url())
            .arg("--tls-listen")
            .arg(&t.to_string())
            .arg("--cert-key")
            .arg(&cert_key)
            .run()?;
        replicas.push(replica);
        edges.push(edge);
    }
    for edge in &edges {
        let page = format!("{}/", edge.url());
        eventually(
            Duration::from_secs(30),
            "the demo store on every edge",
            || async {
                let r = client()
                    .get(&page)
                    .header("host", "spiceroute.example")
                    .send()
                    .await
                    .ok()?;
                r.status().is_success().then_some(())
            },
        )
        .await?;
    }
    println!("edgefront lab: up in {:.1}s\n", t0.elapsed().as_secs_f64());

    println!(
        "{:<6} {:<12} {:<24} {:<24} replica",
        "region", "city", "edge", "admin"
    );
    for ((r, edge), replica) in chosen.iter().zip(&edges).zip(&replicas) {
        println!(
            "{:<6} {:<12} {:<24} {:<24} 127.0.0.1:{}",
            r.id,
            r.city,
            edge.url(),
            edge.admin_url(),
            replica.port
        );
    }
    let first = edges.first().context("no region")?;
    let p = first.addr.port();
    let tls = ports.first().map_or(0, |(_, _, t)| t.port());
    let ca_pem = lab_dir.path().join("ca.pem");
    println!(
        "\nStorefronts over https (any edge; {} shown; lab CA {}):",
        first.region,
        ca_pem.display()
    );
    for name in names.iter().filter(|n| !n.starts_with('*')) {
        println!(
            "  curl -s --cacert {} --resolve {name}:{tls}:127.0.0.1 https://{name}:{tls}/ | head -5",
            ca_pem.display()
        );
    }
    println!("\nOver plain HTTP:");
    for s in stores {
        let slug = s["slug"].as_str().unwrap_or("");
        let host = s["domains"][0]
            .as_str()
            .map(str::to_owned)
            .unwrap_or(format!("{slug}.{platform}"));
        println!("  curl -si --resolve {host}:{p}:127.0.0.1 http://{host}:{p}/ | head -12");
    }
    println!(
        "\nSeller API (through any edge, proxied to the origin {}):",
        if cli.origin_tls {
            origin.url().replace("http://", "https://")
        } else {
            origin.url()
        }
    );
    if let Some(token) = stores
        .iter()
        .find(|s| s["slug"] == "brooklyn-bikes")
        .and_then(|s| s["token"].as_str())
    {
        println!("  export TOKEN={token}   # brooklyn-bikes");
        println!(
            "  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'content-type: application/json' \\\n    -d '{{\"name\":\"Bell\",\"price_cents\":1299}}' http://127.0.0.1:{p}/api/products"
        );
        let last = edges.last().map_or(p, |e| e.addr.port());
        println!(
            "  curl -s --resolve brooklyn-bikes.{platform}:{last}:127.0.0.1 http://brooklyn-bikes.{platform}:{last}/ | grep -c Bell   # another region, within ms"
        );
    }
    println!("\nHealth and metrics: <admin>/healthz  <admin>/metrics");

    if cli.smoke {
        let r = client()
            .post(format!("{}/api/stores", first.url()))
            .json(&serde_json::json!({ "name": "Smoke Test", "slug": "smoke-test", "currency": "EUR" }))
            .send()
            .await?;
        if r.status() != reqwest::StatusCode::CREATED || r.headers().get("x-edge-route").is_none() {
            bail!("smoke: write through the edge answered {}", r.status());
        }
        for edge in &edges {
            let page = format!("{}/", edge.url());
            eventually(
                Duration::from_secs(10),
                "the new store in every region",
                || async {
                    let r = client()
                        .get(&page)
                        .header("host", format!("smoke-test.{platform}"))
                        .send()
                        .await
                        .ok()?;
                    (r.status().is_success() && r.text().await.ok()?.contains("Smoke Test"))
                        .then_some(())
                },
            )
            .await?;
        }
        // And over https with the lab CA, on every region.
        for (_, _, t) in &ports {
            let (_, code) = edgefront_tests::curl_https(
                None,
                &ca_pem,
                "spiceroute.example",
                [127, 0, 0, 1].into(),
                t.port(),
                5,
            )?;
            if code != "200" {
                bail!("smoke: https on {t} answered {code:?}");
            }
        }
        println!(
            "\nedgefront lab: smoke check passed ({} regions, http and https); stopping",
            edges.len()
        );
        return Ok(());
    }
    println!("\nPress Ctrl-C to stop; everything started here is removed.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("edgefront lab: stopping");
    drop(edges);
    drop(origin);
    drop(replicas);
    drop(primary);
    Ok(())
}
