//! On-the-fly certificates: a registered domain's first handshake triggers
//! ACME issuance against a real pebble, with real HTTP-01 validation through
//! the edge's :80 and the origin.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use edgefront_tests::{Edge, Origin, Pebble, Postgres, client, free_port};
use serde_json::{Value, json};

const CERT_KEY: &str = "8e1f0a9d2c3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f708192a3b4c5d6e7f";
const INTERNAL_TOKEN: &str = "acme-internal-token-0123456789abcdef0123";

fn curl(root: &std::path::Path, host: &str, port: u16) -> (i32, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "30",
            "--cacert",
        ])
        .arg(root)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}/"))
        .output()
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_handshake_of_registered_domain_issues_once_and_unregistered_names_order_nothing()
-> Result<()> {
    let platform = edgefront_regions::Regions::builtin()?
        .network
        .platform_domain;
    let primary = Postgres::primary()?;
    let origin = Origin::start_with(
        &primary.url(),
        &platform,
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        &["--internal-token", INTERNAL_TOKEN, "--cert-key", CERT_KEY],
    )?;
    let replica = primary.replica("bom1")?;
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let pebble = Pebble::start(http.port())?;
    let tls_port = free_port();
    let edge = Edge::builder("bom1", &replica.url(), origin.addr)
        .listen(http, admin)
        .arg("--tls-listen")
        .arg(&format!("127.0.0.1:{tls_port}"))
        .arg("--cert-key")
        .arg(CERT_KEY)
        .arg("--http-redirect")
        .arg("true")
        .arg("--acme-directory")
        .arg(&pebble.directory)
        .arg("--acme-ca-root")
        .arg(pebble.listener_ca().to_str().context("path")?)
        .arg("--internal-token")
        .arg(INTERNAL_TOKEN)
        .run()?;

    let v: Value = client()
        .post(format!("{}/api/stores", origin.url()))
        .json(&json!({ "name": "Fresh Cert", "slug": "fresh-cert", "currency": "USD" }))
        .send()
        .await?
        .json()
        .await?;
    let token = v["token"].as_str().context("token")?.to_owned();
    let r = client()
        .post(format!("{}/api/domains", origin.url()))
        .bearer_auth(&token)
        .json(&json!({ "hostname": "fresh-cert.example" }))
        .send()
        .await?;
    ensure!(r.status().is_success());
    // Wait for the domain to reach the region's replica.
    edgefront_tests::eventually(Duration::from_secs(10), "domain replicated", || async {
        let r = client()
            .get(format!("{}/", edge.url()))
            .header("host", "fresh-cert.example")
            .send()
            .await
            .ok()?;
        (r.status() == reqwest::StatusCode::MOVED_PERMANENTLY).then_some(())
    })
    .await?;
    let root = pebble.issuing_root()?;

    // Three concurrent first handshakes: all succeed with a valid certificate, one order.
    let t0 = Instant::now();
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let root = root.clone();
            std::thread::spawn(move || curl(&root, "fresh-cert.example", tls_port))
        })
        .collect();
    let metrics = client()
        .get(format!("{}/metrics", edge.admin_url()))
        .send()
        .await?
        .text()
        .await?;
    let metrics: String = metrics
        .lines()
        .filter(|l| l.contains("tls_") || l.contains("acme"))
        .collect::<Vec<_>>()
        .join("\n");
    for h in handles {
        let (code, status) = h.join().map_err(|_| anyhow::anyhow!("thread"))?;
        assert_eq!(code, 0, "{metrics}");
        assert_eq!(
            (code, status.as_str()),
            (0, "200"),
            "{}\n{}\n{}",
            edge.proc.log(),
            pebble.proc.log(),
            origin.proc.log()
        );
    }
    let first = t0.elapsed();
    assert!(
        first < Duration::from_secs(25),
        "first handshake took {first:?}"
    );
    assert_eq!(
        edge.metric("edgefront_acme_issuances_total{outcome=\"issued\"")
            .await?,
        1.0
    );
    // Stored for every region: the certificate row is on the primary (key sealed).
    let pool = sqlx::PgPool::connect(&primary.url()).await?;
    let (n, leaked): (i64, bool) = sqlx::query_as(
        "SELECT count(*), bool_or(position('PRIVATE KEY'::bytea in key_ciphertext) > 0)
         FROM certificates WHERE hostname = 'fresh-cert.example'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!((n, leaked), (1, false));
    // Later handshakes come from memory.
    let t1 = Instant::now();
    assert_eq!(
        curl(&root, "fresh-cert.example", tls_port),
        (0, "200".into())
    );
    assert!(t1.elapsed() < Duration::from_secs(2));

    // Unregistered names: zero orders, fast failures.
    for i in 0..50 {
        let (code, _) = curl(&root, &format!("junk-{i}.example"), tls_port);
        assert_eq!(code, 35);
    }
    assert_eq!(
        edge.metric("edgefront_acme_issuances_total").await?,
        1.0,
        "no orders for unregistered names"
    );
    let _ = (&pebble, &origin);
    println!("first-sight issuance + handshake: {first:?}");
    Ok(())
}
