//! `edgefront-lab`: the main job on one machine. Starts a PostgreSQL primary,
//! a streaming replica for the region, the origin and the region's edge with
//! the demo stores, prints what to try, and removes everything on Ctrl-C.
//!
//! `--smoke` starts everything, checks a storefront page through the edge and
//! a write through the edge, then stops (CI runs it so the main job stays green).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use edgefront_tests::{Edge, Origin, Postgres, client, eventually};

#[derive(Parser)]
#[command(
    name = "edgefront-lab",
    about = "Run edgefront on this machine: primary, replica, origin and edge with demo stores"
)]
struct Cli {
    /// Region the edge serves.
    #[arg(long, default_value = "bom1")]
    region: String,
    /// Edge (shopper) port on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    edge_port: u16,
    /// Edge admin port on 127.0.0.1.
    #[arg(long, default_value_t = 9080)]
    admin_port: u16,
    /// Origin port on 127.0.0.1.
    #[arg(long, default_value_t = 8081)]
    origin_port: u16,
    /// Start, check a page and a write, then stop.
    #[arg(long)]
    smoke: bool,
}

/// 127.0.0.1:`port`; port 0 picks a free port.
fn addr(port: u16) -> SocketAddr {
    let port = if port == 0 {
        edgefront_tests::free_port()
    } else {
        port
    };
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let regions = edgefront_regions::Regions::builtin()?;
    let region = regions.get(&cli.region)?.clone();
    let platform = regions.network.platform_domain.clone();
    for (port, what) in [
        (cli.edge_port, "--edge-port"),
        (cli.admin_port, "--admin-port"),
        (cli.origin_port, "--origin-port"),
    ] {
        if std::net::TcpListener::bind(addr(port)).is_err() {
            bail!("port {port} is in use; pick another with {what}");
        }
    }
    let t0 = std::time::Instant::now();
    println!(
        "edgefront lab: starting PostgreSQL primary ({} is the primary region)…",
        regions.primary().id
    );
    let primary = Postgres::primary()?;
    let origin = Origin::start_on(&primary.url(), &platform, addr(cli.origin_port))?;
    let edge_addr = addr(cli.edge_port);
    println!("edgefront lab: seeding demo stores…");
    let demo = Origin::seed_demo(&primary.url(), &platform)?;
    println!(
        "edgefront lab: starting streaming replica for {} ({})…",
        region.id, region.city
    );
    let replica = primary.replica(region.id.as_str())?;
    let edge = Edge::builder(region.id.as_str(), &replica.url(), origin.addr)
        .listen(edge_addr, addr(cli.admin_port))
        .run()?;
    let page = format!("{}/", edge.url());
    eventually(
        Duration::from_secs(30),
        "the demo store on the edge",
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
    println!("edgefront lab: up in {:.1}s\n", t0.elapsed().as_secs_f64());

    let stores = demo.as_array().context("demo output")?;
    println!(
        "Storefronts (edge {} in {}, {}):",
        edge.url(),
        region.id,
        region.city
    );
    for s in stores {
        let slug = s["slug"].as_str().unwrap_or("");
        let host = s["domains"][0]
            .as_str()
            .map(str::to_owned)
            .unwrap_or(format!("{slug}.{platform}"));
        println!(
            "  curl -si --resolve {host}:{p}:127.0.0.1 http://{host}:{p}/ | head -20",
            p = edge_addr.port()
        );
    }
    println!(
        "\nSeller API (through the edge, proxied to the origin {}):",
        origin.url()
    );
    if let Some(token) = stores
        .iter()
        .find(|s| s["slug"] == "brooklyn-bikes")
        .and_then(|s| s["token"].as_str())
    {
        println!("  export TOKEN={token}   # brooklyn-bikes");
        println!(
            "  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'content-type: application/json' \\\n    -d '{{\"name\":\"Bell\",\"price_cents\":1299}}' http://127.0.0.1:{}/api/products",
            edge_addr.port()
        );
        println!(
            "  curl -s --resolve brooklyn-bikes.{platform}:{p}:127.0.0.1 http://brooklyn-bikes.{platform}:{p}/ | grep -c Bell",
            p = edge_addr.port()
        );
    }
    println!(
        "\nHealth and metrics: {}/healthz  {}/metrics",
        edge.admin_url(),
        edge.admin_url()
    );

    if cli.smoke {
        let r = client()
            .post(format!("{}/orders", edge.url()))
            .header("host", "spiceroute.example")
            .header("idempotency-key", "lab-smoke")
            .json(&serde_json::json!({ "email": "smoke@example.com", "items": [{ "product_id": 1, "quantity": 1 }] }))
            .send()
            .await?;
        if !r.status().is_success() || r.headers().get("x-edge-route").is_none() {
            bail!("smoke: order through the edge answered {}", r.status());
        }
        println!("\nedgefront lab: smoke check passed (page and order through the edge); stopping");
        return Ok(());
    }
    println!("\nPress Ctrl-C to stop; everything started here is removed.");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("edgefront lab: stopping");
    drop((edge, origin, replica, primary));
    Ok(())
}
