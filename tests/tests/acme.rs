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

/// Waits until `host` is a registered domain on `replica`.
async fn on_replica(replica: &Postgres, host: &str) -> Result<()> {
    let pool = sqlx::PgPool::connect(&replica.url()).await?;
    edgefront_tests::eventually(Duration::from_secs(10), "domain replicated", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM domains WHERE hostname = $1")
            .bind(host)
            .fetch_one(&pool)
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await?;
    pool.close().await;
    Ok(())
}

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
    on_replica(&replica, "fresh-cert.example").await?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_asked_for_one_new_name_at_once_make_exactly_one_order() -> Result<()> {
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
    // The CA validates through region A's :80 only: region B's challenges are
    // answered there too, because challenges live on the origin, not in a region.
    let http_a = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let pebble = Pebble::start(http_a.port())?;
    let mut edges = Vec::new();
    let mut replicas = Vec::new();
    let mut tls_ports = Vec::new();
    for (i, region) in ["ams1", "fra1"].into_iter().enumerate() {
        let replica = primary.replica(region)?;
        let tls_port = free_port();
        let mut b = Edge::builder(region, &replica.url(), origin.addr);
        if i == 0 {
            b = b.listen(
                http_a,
                std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
            );
        }
        let edge = b
            .arg("--tls-listen")
            .arg(&format!("127.0.0.1:{tls_port}"))
            .arg("--cert-key")
            .arg(CERT_KEY)
            .arg("--acme-directory")
            .arg(&pebble.directory)
            .arg("--acme-ca-root")
            .arg(pebble.listener_ca().to_str().context("path")?)
            .arg("--internal-token")
            .arg(INTERNAL_TOKEN)
            .run()?;
        edges.push(edge);
        replicas.push(replica);
        tls_ports.push(tls_port);
    }
    let v: Value = client()
        .post(format!("{}/api/stores", origin.url()))
        .json(&json!({ "name": "Twice", "slug": "twice", "currency": "EUR" }))
        .send()
        .await?
        .json()
        .await?;
    let token = v["token"].as_str().context("token")?.to_owned();
    let r = client()
        .post(format!("{}/api/domains", origin.url()))
        .bearer_auth(&token)
        .json(&json!({ "hostname": "twice.example" }))
        .send()
        .await?;
    ensure!(r.status().is_success());
    for e in &edges {
        edgefront_tests::eventually(Duration::from_secs(10), "domain replicated", || async {
            let r = client()
                .get(format!("{}/", e.url()))
                .header("host", "twice.example")
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await?;
    }
    let root = pebble.issuing_root()?;
    let handles: Vec<_> = tls_ports
        .iter()
        .map(|&port| {
            let root = root.clone();
            std::thread::spawn(move || curl(&root, "twice.example", port))
        })
        .collect();
    for h in handles {
        let (code, status) = h.join().map_err(|_| anyhow::anyhow!("thread"))?;
        assert_eq!(
            (code, status.as_str()),
            (0, "200"),
            "{}\n{}",
            edges[0].proc.log(),
            edges[1].proc.log()
        );
    }
    let mut issued = 0.0;
    let mut waited = 0.0;
    for e in &edges {
        issued += e
            .metric("edgefront_acme_issuances_total{outcome=\"issued\"")
            .await?;
        waited += e
            .metric("edgefront_acme_issuances_total{outcome=\"waited\"")
            .await?;
    }
    assert_eq!(issued, 1.0, "exactly one ACME order for one name");
    // The other region either waited on the lease or, if it came later, loaded
    // the replicated certificate: never a second order.
    assert!(waited <= 1.0);
    let _ = (&replicas, &pebble);
    Ok(())
}

/// The serial of the certificate a TLS endpoint serves for `sni`.
fn served_serial(port: u16, sni: &str) -> Option<String> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            sni,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = text.find("-----END CERTIFICATE-----")? + "-----END CERTIFICATE-----".len();
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    {
        use std::io::Write;
        child
            .stdin
            .take()?
            .write_all(&text.as_bytes()[start..end])
            .ok()?;
    }
    let out = child.wait_with_output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soon_to_expire_certificate_is_renewed_without_a_failed_handshake() -> Result<()> {
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
    let replica = primary.replica("syd1")?;
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    // Certificates valid for 15 s: a third of the lifetime left after 10 s.
    let pebble = Pebble::start_with_validity(http.port(), Some(15))?;
    let tls_port = free_port();
    let edge = Edge::builder("syd1", &replica.url(), origin.addr)
        .listen(
            http,
            std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        )
        .arg("--tls-listen")
        .arg(&format!("127.0.0.1:{tls_port}"))
        .arg("--cert-key")
        .arg(CERT_KEY)
        .arg("--acme-directory")
        .arg(&pebble.directory)
        .arg("--acme-ca-root")
        .arg(pebble.listener_ca().to_str().context("path")?)
        .arg("--internal-token")
        .arg(INTERNAL_TOKEN)
        .arg("--acme-renew-check-seconds")
        .arg("1")
        .run()?;
    let v: Value = client()
        .post(format!("{}/api/stores", origin.url()))
        .json(&json!({ "name": "Renew", "slug": "renew", "currency": "AUD" }))
        .send()
        .await?
        .json()
        .await?;
    let token = v["token"].as_str().context("token")?.to_owned();
    let r = client()
        .post(format!("{}/api/domains", origin.url()))
        .bearer_auth(&token)
        .json(&json!({ "hostname": "renew.example" }))
        .send()
        .await?;
    ensure!(r.status().is_success());
    edgefront_tests::eventually(Duration::from_secs(10), "domain replicated", || async {
        let r = client()
            .get(format!("{}/", edge.url()))
            .header("host", "renew.example")
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await?;
    let root = pebble.issuing_root()?;
    assert_eq!(curl(&root, "renew.example", tls_port), (0, "200".into()));
    let first = served_serial(tls_port, "renew.example").context("serial")?;

    // Handshake continuously until a new certificate is served (bounded).
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut handshakes = 0;
    let renewed_at = loop {
        assert!(
            Instant::now() < deadline,
            "not renewed in time\n{}",
            edge.proc.log()
        );
        let (code, status) = curl(&root, "renew.example", tls_port);
        assert_eq!(
            (code, status.as_str()),
            (0, "200"),
            "a handshake failed during renewal"
        );
        handshakes += 1;
        if let Some(s) = served_serial(tls_port, "renew.example")
            && s != first
        {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(handshakes > 10, "{handshakes}");
    assert!(
        edge.metric("edgefront_acme_issuances_total{outcome=\"renewed\"")
            .await?
            >= 1.0
    );
    let _ = (renewed_at, &pebble, &primary);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_down_existing_certificates_keep_working_new_domains_fail_cleanly_then_succeed()
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
    let replica = primary.replica("gru1")?;
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut pebble = Pebble::start(http.port())?;
    let tls_port = free_port();
    let edge = Edge::builder("gru1", &replica.url(), origin.addr)
        .listen(
            http,
            std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        )
        .arg("--tls-listen")
        .arg(&format!("127.0.0.1:{tls_port}"))
        .arg("--cert-key")
        .arg(CERT_KEY)
        .arg("--acme-directory")
        .arg(&pebble.directory)
        .arg("--acme-ca-root")
        .arg(pebble.listener_ca().to_str().context("path")?)
        .arg("--internal-token")
        .arg(INTERNAL_TOKEN)
        .run()?;
    let v: Value = client()
        .post(format!("{}/api/stores", origin.url()))
        .json(&json!({ "name": "Outage", "slug": "outage", "currency": "BRL" }))
        .send()
        .await?
        .json()
        .await?;
    let token = v["token"].as_str().context("token")?.to_owned();
    for host in ["before.example", "during.example"] {
        let r = client()
            .post(format!("{}/api/domains", origin.url()))
            .bearer_auth(&token)
            .json(&json!({ "hostname": host }))
            .send()
            .await?;
        ensure!(r.status().is_success());
        edgefront_tests::eventually(Duration::from_secs(10), "domain replicated", || async {
            let r = client()
                .get(format!("{}/", edge.url()))
                .header("host", host)
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await?;
    }
    let root = pebble.issuing_root()?;
    assert_eq!(curl(&root, "before.example", tls_port), (0, "200".into()));

    // The CA goes down.
    pebble.stop();
    assert_eq!(
        curl(&root, "before.example", tls_port),
        (0, "200".into()),
        "existing certificates keep working"
    );
    let t0 = Instant::now();
    let (code, _) = curl(&root, "during.example", tls_port);
    assert_eq!(code, 35, "a new domain fails the handshake cleanly");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "bounded: {:?}",
        t0.elapsed()
    );
    assert!(
        edge.metric("edgefront_acme_issuances_total{outcome=\"failed\"")
            .await?
            >= 1.0
    );

    // The CA comes back (it lost its accounts and has a new root): the domain
    // gets a certificate on a later handshake, after its backoff.
    pebble.restart()?;
    let new_root = pebble.issuing_root()?;
    edgefront_tests::eventually(
        Duration::from_secs(40),
        "certificate after the CA returns",
        || async {
            (curl(&new_root, "during.example", tls_port) == (0, "200".into())).then_some(())
        },
    )
    .await?;
    // The earlier certificate (from the CA's previous root) is still the one served.
    assert_eq!(curl(&root, "before.example", tls_port), (0, "200".into()));
    Ok(())
}
