//! TLS on the edge with per-SNI certificates from the replica, exercised with
//! real clients (curl and openssl from Debian) against real processes.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edgefront_tests::{Edge, Origin, Postgres, TestCa, client, eventually, free_port};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const CERT_KEY: &str = "5e1f0a9d2c3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f708192a3b4c5d6e7f";
const INTERNAL_TOKEN: &str = "internal-token-for-tests-0123456789abcdef";
/// The master key rotated to.
const NEW_KEY: &str = "7b2e0a9d2c3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f708192a3b4c5d6e7f";

struct Tls {
    edge: Edge,
    origin: Origin,
    _replica: Postgres,
    _primary: Postgres,
    tls_port: u16,
    ca_file: tempfile::NamedTempFile,
    platform: String,
}

fn start() -> Result<(Tls, TestCa)> {
    let platform = edgefront_regions::Regions::builtin()?
        .network
        .platform_domain;
    let primary = Postgres::primary()?;
    let origin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let origin = Origin::start_with(
        &primary.url(),
        &platform,
        origin_addr,
        &["--internal-token", INTERNAL_TOKEN, "--cert-key", CERT_KEY],
    )?;
    let replica = primary.replica("ams1")?;
    let tls_port = free_port();
    let edge = Edge::builder("ams1", &replica.url(), origin.addr)
        .arg("--tls-listen")
        .arg(&format!("127.0.0.1:{tls_port}"))
        .arg("--cert-key")
        .arg(CERT_KEY)
        .arg("--http-redirect")
        .arg("true")
        .arg("--hsts-max-age-seconds")
        .arg("31536000")
        .run()?;
    let ca = TestCa::new()?;
    let ca_file = tempfile::NamedTempFile::new()?;
    std::fs::write(ca_file.path(), &ca.pem)?;
    Ok((
        Tls {
            edge,
            origin,
            _replica: replica,
            _primary: primary,
            tls_port,
            ca_file,
            platform,
        },
        ca,
    ))
}

/// curl over TLS to the edge: (exit code, stdout).
fn curl(t: &Tls, host: &str, extra: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "5", "--cacert"])
        .arg(t.ca_file.path())
        .arg("--resolve")
        .arg(format!("{host}:{}:127.0.0.1", t.tls_port))
        .args(extra)
        .arg(format!("https://{host}:{}/", t.tls_port))
        .output()
        .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// The response head of `method path` to tls-shop.example over TLS (curl,
/// HTTP/2), header names lowercased by HTTP/2.
fn https_head(t: &Tls, method: &str, path: &str, extra: &[&str]) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "--max-time",
            "5",
            "--cacert",
        ])
        .arg(t.ca_file.path())
        .arg("--resolve")
        .arg(format!("tls-shop.example:{}:127.0.0.1", t.tls_port))
        .args(["-X", method])
        .args(extra)
        .arg(format!("https://tls-shop.example:{}{path}", t.tls_port))
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

async fn put_cert(
    t: &Tls,
    name: &str,
    chain: &str,
    key: &str,
    token: &str,
) -> Result<(StatusCode, Value)> {
    let r = t
        .origin
        .internal_client("ams1")?
        .put(format!(
            "{}/internal/certificates/{name}",
            t.origin.internal_url()?
        ))
        .bearer_auth(token)
        .json(&json!({ "chain_pem": chain, "key_pem": key }))
        .send()
        .await?;
    let s = r.status();
    Ok((s, r.json().await.unwrap_or(Value::Null)))
}

/// A store named `name` with the proven custom domain tls-shop.example: its token.
async fn shop_with_domain(t: &Tls, name: &str) -> Result<String> {
    let v: Value = client()
        .post(format!("{}/api/stores", t.origin.url()))
        .json(&json!({ "name": name, "slug": "tls-shop", "currency": "EUR" }))
        .send()
        .await?
        .json()
        .await?;
    let token = v["token"].as_str().context("token")?.to_owned();
    t.origin.attach_proven(&token, "tls-shop.example").await?;
    Ok(token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_registered_domain_by_sni_with_h2_tls12_resumption_and_rejects_the_rest()
-> Result<()> {
    let (t, ca) = start()?;
    // A store with a custom domain.
    let token = shop_with_domain(&t, "TLS Shop").await?;

    // Before any certificate: the handshake fails fast.
    let t0 = Instant::now();
    let (code, _) = curl(&t, "tls-shop.example", &[]);
    assert_eq!(code, 35, "TLS handshake failure expected");
    assert!(t0.elapsed() < Duration::from_secs(2));

    // Upload: token required, registered names only, key must match.
    let (chain, key) = ca.leaf(&["tls-shop.example"])?;
    let (s, _) = put_cert(
        &t,
        "tls-shop.example",
        &chain,
        &key,
        "wrong-token-wrong-token-wrong-token",
    )
    .await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (other_chain, other_key) = ca.leaf(&["nobody.example"])?;
    let (s, v) = put_cert(
        &t,
        "nobody.example",
        &other_chain,
        &other_key,
        INTERNAL_TOKEN,
    )
    .await?;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (_, wrong_key) = ca.leaf(&["tls-shop.example"])?;
    let (s, v) = put_cert(&t, "tls-shop.example", &chain, &wrong_key, INTERNAL_TOKEN).await?;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["field"], "key_pem");
    assert!(!v.to_string().contains("PRIVATE KEY"), "keys never echoed");
    let (s, v) = put_cert(&t, "tls-shop.example", &chain, &key, INTERNAL_TOKEN).await?;
    assert_eq!(s, StatusCode::OK, "{v}");

    // It replicates; the tail drops the negative entry; HTTP/2 by ALPN.
    eventually(WAIT, "certificate served", || async {
        let (code, out) = curl(
            &t,
            "tls-shop.example",
            &["-w", "%{http_code} %{http_version}"],
        );
        (code == 0 && out == "200 2").then_some(())
    })
    .await?;
    let (code, out) = curl(
        &t,
        "tls-shop.example",
        &["--http1.1", "-w", "%{http_code} %{http_version}"],
    );
    assert_eq!((code, out.as_str()), (0, "200 1.1"));
    let (code, out) = curl(
        &t,
        "tls-shop.example",
        &["--tlsv1.2", "--tls-max", "1.2", "-w", "%{http_code}"],
    );
    assert_eq!((code, out.as_str()), (0, "200"), "TLS 1.2");
    let (code, out) = curl(
        &t,
        "tls-shop.example",
        &["-w", "%{http_code}", "-H", "Host: other.example"],
    );
    assert_eq!((code, out.as_str()), (0, "421"), "Host must match SNI");

    // Session resumption (TLS 1.2 session id/ticket) with openssl s_client.
    let sess = tempfile::NamedTempFile::new()?;
    let s_client = |extra: &[&str]| {
        let out = Command::new("openssl")
            .args([
                "s_client",
                "-tls1_2",
                "-connect",
                &format!("127.0.0.1:{}", t.tls_port),
                "-servername",
                "tls-shop.example",
            ])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl runs");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let first = s_client(&["-sess_out", sess.path().to_str().unwrap_or_default()]);
    assert!(first.contains("New, TLSv1.2"), "{first}");
    let second = s_client(&["-sess_in", sess.path().to_str().unwrap_or_default()]);
    assert!(second.contains("Reused, TLSv1.2"), "resumed: {second}");

    // 200 random names and no SNI at all: fast failures, nothing loaded.
    let t0 = Instant::now();
    for i in 0..200 {
        let (code, _) = curl(
            &t,
            &format!("random-{i}-{}.example", std::process::id()),
            &[],
        );
        assert_eq!(code, 35);
    }
    let per = t0.elapsed() / 200;
    assert!(
        per < Duration::from_millis(200),
        "{per:?} per failed handshake"
    );
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", t.tls_port),
            "-noservername",
        ])
        .stdin(std::process::Stdio::null())
        .output()?;
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"),
        "no SNI, no certificate"
    );
    assert_eq!(t.edge.metric("edgefront_tls_certificates{").await?, 1.0);
    // Refused as unregistered: from the edge's set of domains (or, for one
    // racing the set's first load, the replica).
    let refused = t
        .edge
        .metric("edgefront_tls_certificate_lookups_total{outcome=\"not_registered\"")
        .await?
        + t.edge
            .metric("edgefront_tls_certificate_lookups_total{outcome=\"unknown\"")
            .await?;
    assert!(refused >= 200.0, "{refused}");

    // Replacing the certificate reaches new handshakes without a failed one.
    let (chain2, key2) = ca.leaf(&["tls-shop.example"])?;
    let (s, _) = put_cert(&t, "tls-shop.example", &chain2, &key2, INTERNAL_TOKEN).await?;
    assert_eq!(s, StatusCode::OK);
    let serial = edgefront_tests::pem_serial;
    let new_serial = serial(&chain2);
    eventually(WAIT, "renewed certificate served", || async {
        let served = s_client(&[]);
        let start = served.find("-----BEGIN CERTIFICATE-----")?;
        let end = served.find("-----END CERTIFICATE-----")? + "-----END CERTIFICATE-----".len();
        assert!(
            !served.contains("alert"),
            "no failed handshake during replacement"
        );
        (serial(&served[start..end]) == new_serial).then_some(())
    })
    .await?;

    // Over TLS, every response carries HSTS (pages, errors, proxied writes)
    // and every cookie is Secure: the origin's cart cookie and the edge's
    // read-your-writes cookie.
    const HSTS: &str = "strict-transport-security: max-age=31536000\r\n";
    let home = https_head(&t, "GET", "/", &[]);
    assert!(
        home.starts_with("HTTP/2 200") && home.contains(HSTS),
        "{home}"
    );
    let missing = https_head(&t, "GET", "/nothing-here", &[]);
    assert!(
        missing.starts_with("HTTP/2 404") && missing.contains(HSTS),
        "{missing}"
    );
    let bearer = format!("authorization: Bearer {token}");
    let created = https_head(
        &t,
        "POST",
        "/api/products",
        &[
            "-H",
            &bearer,
            "-H",
            "content-type: application/json",
            "--data",
            r#"{"name":"Mug","price_cents":900}"#,
        ],
    );
    assert!(
        created.starts_with("HTTP/2 201") && created.contains(HSTS),
        "{created}"
    );
    let set_cookies = |head: &str| -> Vec<String> {
        head.lines()
            .filter_map(|l| l.strip_prefix("set-cookie: "))
            .map(|c| c.trim_end().to_owned())
            .collect()
    };
    let ryw = set_cookies(&created);
    assert!(
        !ryw.is_empty() && ryw.iter().all(|c| c.ends_with("; Secure")),
        "{ryw:?}"
    );
    let pool = sqlx::PgPool::connect(&t._primary.url()).await?;
    let pid: i64 = sqlx::query_scalar("SELECT id FROM products WHERE name = 'Mug'")
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    let body = format!(r#"{{"product_id":{pid},"quantity":1}}"#);
    let cart = https_head(
        &t,
        "POST",
        "/cart",
        &[
            "-H",
            "accept: application/json",
            "-H",
            "content-type: application/json",
            "--data",
            &body,
        ],
    );
    assert!(cart.starts_with("HTTP/2 200"), "{cart}");
    let set = set_cookies(&cart);
    assert!(set.iter().any(|c| c.starts_with("ef_cart=")), "{set:?}");
    assert!(
        set.iter().all(|c| c.contains("HttpOnly")
            && c.contains("SameSite=Lax")
            && c.ends_with("; Secure")),
        "{set:?}"
    );
    // Plain HTTP carries no HSTS and is redirected only for names with a
    // certificate: a name without one is served over plain HTTP.
    t.origin
        .attach_proven(&token, "no-cert-yet.example")
        .await?;
    let plain = eventually(WAIT, "the name without a certificate served", || async {
        let r = client()
            .get(format!("{}/", t.edge.url()))
            .header("host", "no-cert-yet.example")
            .send()
            .await
            .ok()?;
        (r.status() == StatusCode::OK).then_some(r)
    })
    .await?;
    assert!(plain.headers().get("strict-transport-security").is_none());

    // The origin down: certificates already replicated keep working.
    let mut t = t;
    t.origin.stop();
    let (code, out) = curl(&t, "tls-shop.example", &["-w", "%{http_code}"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "200"),
        "TLS and pages without the origin"
    );

    // Plain HTTP redirects to https, keeping path and query.
    let r = client()
        .get(format!("{}/p/x?y=1", t.edge.url()))
        .header("host", "tls-shop.example")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        r.headers()["location"],
        format!("https://tls-shop.example:{}/p/x?y=1", t.tls_port).as_str()
    );
    assert_eq!(r.headers()["x-edge-route"], "ams1");
    // An address in Host names no certificate: neither redirected nor
    // refused (store creation through an anycast address sends one).
    let r = client()
        .get(format!("{}/", t.edge.url()))
        .header("host", "127.0.0.1")
        .send()
        .await?;
    assert!(
        !matches!(r.status().as_u16(), 301 | 308 | 400),
        "Host: 127.0.0.1 answered {}",
        r.status()
    );
    let _ = &t.platform;
    Ok(())
}

/// Origin metric `name{listener="…"}`, read from the origin's public
/// listener (over TLS with the internal CA when it serves TLS).
async fn origin_metric(http: &reqwest::Client, base: &str, name: &str) -> Result<f64> {
    edgefront_tests::metric_sum_with(http, base, name).await
}

/// Issue 13, item 1: the edge proxies writes to the origin over TLS,
/// verifying the origin's certificate against the internal CA alone, on
/// pooled keep-alive connections; the origin's public listener speaks only
/// TLS; an edge that trusts another CA never delivers a write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_proxies_writes_to_the_origin_over_tls_verified_by_the_internal_ca() -> Result<()> {
    let platform = edgefront_regions::Regions::builtin()?
        .network
        .platform_domain;
    let pki = edgefront_tests::InternalPki::new(&["127.0.0.1"])?;
    let server = pki.origin_identity();
    let path = |p: &std::path::Path| p.to_str().map(str::to_owned).context("path");
    let primary = Postgres::primary()?;
    let origin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let origin = Origin::start_with(
        &primary.url(),
        &platform,
        origin_addr,
        &[
            "--tls-cert",
            &path(&server.cert)?,
            "--tls-key",
            &path(&server.key)?,
        ],
    )?;
    let base = format!("https://{origin_addr}");
    // A client that trusts the internal CA (no client certificate needed on
    // the public listener).
    let trusting = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&server.ca)?)?)
        .build()?;
    let replica = primary.replica("sin1")?;
    let edge = Edge::builder("sin1", &replica.url(), origin.addr)
        .arg("--origin-ca")
        .arg(&path(&server.ca)?)
        .run()?;

    // Seller writes through the edge: 20 requests, each acknowledged by the
    // origin (the commit LSN comes back), over a handful of TLS connections.
    let accepted_before = origin_metric(
        &trusting,
        &base,
        "edgefront_origin_tls_connections_total{listener=\"public\"",
    )
    .await?;
    let r = client()
        .post(format!("{}/api/stores", edge.url()))
        .json(&json!({"name": "Over TLS", "slug": "over-tls", "currency": "EUR"}))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", edge.proc.log());
    let v: Value = r.json().await?;
    let token = v["token"].as_str().context("token")?.to_owned();
    for i in 0..19 {
        let r = client()
            .patch(format!("{}/api/store", edge.url()))
            .bearer_auth(&token)
            .json(&json!({ "tagline": format!("write {i}") }))
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers().contains_key("x-commit-lsn"));
        assert_eq!(r.headers()["x-edge-route"], "sin1");
    }
    let accepted = origin_metric(
        &trusting,
        &base,
        "edgefront_origin_tls_connections_total{listener=\"public\"",
    )
    .await?
        - accepted_before; // (these reads share one kept-alive connection, counted before)
    assert!(
        (1.0..=4.0).contains(&accepted),
        "20 proxied writes took {accepted} TLS connections (keep-alive pooling)"
    );

    // The public listener speaks only TLS: plaintext is refused and counted.
    let refused = "edgefront_origin_tls_handshakes_refused_total{listener=\"public\"";
    let refused_before = origin_metric(&trusting, &base, refused).await?;
    let plain = client()
        .get(format!("http://{origin_addr}/healthz"))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
    eventually(WAIT, "the plaintext attempt counted", || async {
        let n = origin_metric(&trusting, &base, refused).await.ok()?;
        (n > refused_before).then_some(())
    })
    .await?;

    // The edge delivers nothing unless the origin proves itself with a
    // server certificate for its address from the internal CA. Refused, each
    // with a 502 and no write: an edge trusting another CA (a man in the
    // middle would hold one), and, from the right CA, a region node's client
    // certificate (a compromised node posing as the origin) and a server
    // certificate for another address, each served by a real origin process
    // on the same primary.
    let stranger = edgefront_tests::InternalPki::new(&["127.0.0.1"])?;
    let node = pki.client_identity("bom1")?;
    let elsewhere = pki.server_identity("elsewhere", &["192.0.2.77"])?;
    let cases = [
        (
            "an edge trusting another CA",
            None,
            stranger.origin_identity().ca,
            "lax1",
        ),
        (
            "a client certificate",
            Some(&node),
            server.ca.clone(),
            "gru1",
        ),
        (
            "another address's certificate",
            Some(&elsewhere),
            server.ca.clone(),
            "syd1",
        ),
    ];
    for (what, impostor, trusted, region) in cases {
        let (_impostor, addr) = match impostor {
            Some(id) => {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
                let o = Origin::start_with(
                    &primary.url(),
                    &platform,
                    addr,
                    &["--tls-cert", &path(&id.cert)?, "--tls-key", &path(&id.key)?],
                )?;
                (Some(o), addr)
            }
            None => (None, origin.addr),
        };
        let replica = primary.replica(region)?;
        let edge = Edge::builder(region, &replica.url(), addr)
            .arg("--origin-ca")
            .arg(&path(&trusted)?)
            .run()?;
        let r = client()
            .patch(format!("{}/api/store", edge.url()))
            .bearer_auth(&token)
            .json(&json!({ "tagline": format!("through {what}") }))
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{what}: accepted");
    }
    let v: Value = trusting
        .get(format!("{base}/api/store"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(v["store"]["tagline"], "write 18", "{v}");
    Ok(())
}

/// Issue 13, item 2: PostgreSQL speaks only TLS over TCP (pg_hba has
/// `hostssl` rules only), clients verify the server against the internal CA
/// (`verify-full`), and streaming replication itself runs over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_refuses_plaintext_and_replicates_over_tls() -> Result<()> {
    let primary = Postgres::primary()?;
    let replica = primary.replica("gru1")?;
    let stranger = edgefront_tests::InternalPki::new(&["127.0.0.1"])?;
    for pg in [&primary, &replica] {
        let pool = sqlx::PgPool::connect(&pg.url()).await?;
        let tls: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&pool)
                .await?;
        assert!(tls, "{}: the verified connection is TLS", pg.name);
        pool.close().await;
        // Plaintext: refused by the server, with PostgreSQL's own reason.
        let e = sqlx::PgPool::connect(&pg.plaintext_url())
            .await
            .expect_err("plaintext refused");
        assert!(e.to_string().contains("no encryption"), "{}: {e}", pg.name);
        // A client that trusts another CA refuses the server's certificate.
        let foreign = pg.url().replace(
            &pg.ca_path().display().to_string(),
            &stranger.origin_identity().ca.display().to_string(),
        );
        let e = sqlx::PgPool::connect(&foreign)
            .await
            .expect_err("foreign CA refused");
        assert!(
            e.to_string().to_lowercase().contains("certificate"),
            "{}: {e}",
            pg.name
        );
    }
    // The replica's WAL stream: on the primary, its walsender's connection is TLS.
    let pool = sqlx::PgPool::connect(&primary.url()).await?;
    let streams: Vec<bool> = sqlx::query_scalar(
        "SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s ON s.pid = r.pid",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(streams, [true], "one replica streaming, over TLS");
    pool.close().await;
    Ok(())
}

/// Another region's edge with TLS, opening sealed keys with `cert_key`:
/// (edge, its replica, TLS port).
fn tls_edge(t: &Tls, region: &str, cert_key: &str) -> Result<(Edge, Postgres, u16)> {
    let (builder, replica, port) = tls_edge_builder(t, region, cert_key)?;
    Ok((builder.run()?, replica, port))
}

/// The builder of [`tls_edge`] (to add flags or start it twice):
/// (builder, its replica, TLS port).
fn tls_edge_builder(
    t: &Tls,
    region: &str,
    cert_key: &str,
) -> Result<(edgefront_tests::EdgeBuilder, Postgres, u16)> {
    let replica = t._primary.replica(region)?;
    let port = free_port();
    let builder = Edge::builder(region, &replica.url(), t.origin.addr)
        .arg("--tls-listen")
        .arg(&format!("127.0.0.1:{port}"))
        .arg("--cert-key")
        .arg(cert_key);
    Ok((builder, replica, port))
}

/// A store named `name` with tls-shop.example proven and a certificate for
/// it from `ca` uploaded: its token.
async fn served_shop(t: &Tls, ca: &TestCa, name: &str) -> Result<String> {
    let token = shop_with_domain(t, name).await?;
    let (chain, key) = ca.leaf(&["tls-shop.example"])?;
    let (s, v) = put_cert(t, "tls-shop.example", &chain, &key, INTERNAL_TOKEN).await?;
    anyhow::ensure!(s == StatusCode::OK, "certificate upload: {s} {v}");
    Ok(token)
}

/// A TLS handshake and GET through the edge listening on `port` (curl exit code).
fn curl_port(ca: &std::path::Path, host: &str, port: u16) -> i32 {
    Command::new("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "5", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:127.0.0.1"))
        .arg(format!("https://{host}:{port}/"))
        .status()
        .map(|s| s.code().unwrap_or(-1))
        .unwrap_or(-1)
}

/// Issue 13, item 4 (sealed keys): every sealed value names the master key
/// that sealed it, and `origin reseal` moves everything to a new key while
/// handshakes keep working on edges that hold both keys. Afterwards an edge
/// holding only the new key serves the certificate, one holding only the old
/// key cannot, and a second run re-seals nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_key_rotation_reseals_everything_while_handshakes_keep_working() -> Result<()> {
    let (t, ca) = start()?;
    served_shop(&t, &ca, "Rotated").await?;
    let host = "tls-shop.example";
    let ca_file = t.ca_file.path();
    eventually(WAIT, "served under the old key", || async {
        (curl_port(ca_file, host, t.tls_port) == 0).then_some(())
    })
    .await?;
    let pool = sqlx::PgPool::connect(&t._primary.url()).await?;
    let key_ids = || async {
        let rows: Vec<Vec<u8>> = sqlx::query_scalar("SELECT key_ciphertext FROM certificates")
            .fetch_all(&pool)
            .await?;
        anyhow::Ok(
            rows.iter()
                .map(|ct| edgefront_certs::Sealer::key_id_of(ct).map(str::to_owned))
                .collect::<Vec<_>>(),
        )
    };
    let old_id = edgefront_certs::Sealer::from_hex(CERT_KEY)?
        .sealing_key_id()
        .to_owned();
    let new_id = edgefront_certs::Sealer::from_hex(NEW_KEY)?
        .sealing_key_id()
        .to_owned();
    assert_eq!(key_ids().await?, [Some(old_id.clone())]);

    // Step 1 of the rotation: an edge that holds both keys (any order).
    let (_both, _both_replica, both_port) = tls_edge(&t, "lon1", &format!("{CERT_KEY},{NEW_KEY}"))?;
    assert_eq!(curl_port(ca_file, host, both_port), 0);

    // Step 3: re-seal under the new key while that edge keeps serving.
    let reseal = || reseal_command(&t).output();
    let out = reseal()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("re-sealed 1 certificate keys"), "{said}");
    assert_eq!(key_ids().await?, [Some(new_id)]);
    // The edge holding both keys reloads the re-sealed certificate (its
    // change-log entry) and never fails a handshake meanwhile.
    let t0 = Instant::now();
    let mut handshakes = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        assert_eq!(curl_port(ca_file, host, both_port), 0, "a handshake failed");
        handshakes += 1;
    }
    assert!(handshakes >= 3);
    // The old key alone no longer opens it. An edge forgotten in step 1
    // keeps serving the certificate it holds in memory (its reload fails,
    // logged), but a restarted one with only the old key cannot serve it:
    // why step 1 comes first.
    eventually(
        WAIT,
        "the old-key-only edge logs the failed reload",
        || async {
            t.edge
                .proc
                .log()
                .contains("reloading a changed certificate failed")
                .then_some(())
        },
    )
    .await?;
    assert_eq!(curl_port(ca_file, host, t.tls_port), 0);
    let (_old, _old_replica, old_port) = tls_edge(&t, "syd1", CERT_KEY)?;
    assert_ne!(
        curl_port(ca_file, host, old_port),
        0,
        "the old key alone opened it"
    );
    // An edge with only the new key serves it (step 4: the old key gone).
    let (_new, _new_replica, new_port) = tls_edge(&t, "nyc1", NEW_KEY)?;
    eventually(WAIT, "served under the new key alone", || async {
        (curl_port(ca_file, host, new_port) == 0).then_some(())
    })
    .await?;
    // Idempotent: nothing left to re-seal.
    let out = reseal()?;
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("re-sealed 0 certificate keys"), "{said}");
    pool.close().await;
    Ok(())
}

/// `origin reseal` with the new key first, against the test's primary.
fn reseal_command(t: &Tls) -> Command {
    let mut c = Command::new(edgefront_tests::bin_dir().join("origin"));
    c.args(["--database-url", &t._primary.url(), "--cert-key"])
        .arg(format!("{NEW_KEY},{CERT_KEY}"))
        .arg("reseal")
        .env("RUST_LOG", "warn");
    c
}

/// `origin reseal` never overwrites a certificate written while it runs:
/// the row is held locked (a transaction open) until reseal has read it and
/// waits to rewrite it; meanwhile a new value, sealed under the new key, is
/// committed. Reseal then re-seals nothing and the new value stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reseal_leaves_a_certificate_written_meanwhile_alone() -> Result<()> {
    let (t, ca) = start()?;
    shop_with_domain(&t, "Meanwhile").await?;
    let host = "tls-shop.example";
    let (chain, key) = ca.leaf(&[host])?;
    let (s, v) = put_cert(&t, host, &chain, &key, INTERNAL_TOKEN).await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    let pool = sqlx::PgPool::connect(&t._primary.url()).await?;
    let mut tx = pool.begin().await?;
    let (nonce, ct): (Vec<u8>, Vec<u8>) = sqlx::query_as(
        "SELECT key_nonce, key_ciphertext FROM certificates WHERE hostname = $1 FOR UPDATE",
    )
    .bind(host)
    .fetch_one(&mut *tx)
    .await?;
    let reseal = reseal_command(&t)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Reseal has read the row and now waits for our lock to rewrite it.
    eventually(WAIT, "reseal waiting on the row lock", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE certificates%'",
        )
        .fetch_one(&pool)
        .await
        .ok()?;
        (n == 1).then_some(())
    })
    .await?;
    // A renewal lands meanwhile, sealed under the new key.
    let sealer = edgefront_certs::Sealer::from_hex(&format!("{NEW_KEY},{CERT_KEY}"))?;
    let plain = sealer.open(host, &nonce, &ct)?;
    let (n2, ct2) = sealer.seal(host, &plain)?;
    sqlx::query("UPDATE certificates SET key_nonce = $2, key_ciphertext = $3 WHERE hostname = $1")
        .bind(host)
        .bind(&n2)
        .bind(&ct2)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let out = reseal.wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("re-sealed 0 certificate keys"), "{said}");
    let now: Vec<u8> =
        sqlx::query_scalar("SELECT key_ciphertext FROM certificates WHERE hostname = $1")
            .bind(host)
            .fetch_one(&pool)
            .await?;
    assert_eq!(now, ct2, "reseal overwrote the value written meanwhile");
    pool.close().await;
    Ok(())
}

/// Issue 13, item 6: a flood of made-up TLS names costs no query: the edge's
/// set of registered domains (one load) refuses them from memory. A fresh
/// edge (nothing in memory) keeps loading a real certificate on its first
/// handshake; a domain registered after the set was loaded is served too.
/// The failed handshakes do not flood the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_tls_names_spends_only_the_flooders_budget() -> Result<()> {
    let (t, ca) = start()?;
    served_shop(&t, &ca, "Flooded").await?;
    let (builder, replica, port) = tls_edge_builder(&t, "fra1", CERT_KEY)?;
    let edge = builder
        .arg("--limit-misses-per-second")
        .arg("1")
        .arg("--limit-misses-burst")
        .arg("10")
        .run()?;
    let handshake_from = |source: &str, host: &str| -> i32 {
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "--interface",
                source,
            ])
            .arg("--cacert")
            .arg(t.ca_file.path())
            .arg("--resolve")
            .arg(format!("{host}:{port}:127.0.0.1"))
            .arg(format!("https://{host}:{port}/"))
            .status()
            .map(|s| s.code().unwrap_or(-1))
            .unwrap_or(-1)
    };
    for i in 0..25 {
        let code = handshake_from("127.0.0.2", &format!("made-up-{i}.example"));
        assert_eq!(code, 35, "no certificate for a made-up name");
    }
    let lookups = |outcome: &'static str| {
        let edge = &edge;
        async move {
            edge.metric(&format!(
                "edgefront_tls_certificate_lookups_total{{outcome=\"{outcome}\""
            ))
            .await
        }
    };
    // The first may race the set's first load with the feed's start (a load
    // that overlaps a reset is not kept) and ask the replica once.
    let (from_memory, asked) = (lookups("not_registered").await?, lookups("unknown").await?);
    assert_eq!(from_memory + asked, 25.0);
    assert!(asked <= 1.0, "{asked} replica lookups");
    assert_eq!(lookups("rate_limited").await?, 0.0, "no budget spent");
    // pingora's line per failed handshake is folded: one sample per minute
    // in the log, every failure in the metric.
    assert!(
        edge.metric("edgefront_tls_handshake_failures_total")
            .await?
            >= 25.0
    );
    let log = edge.proc.log();
    let lines = log.matches("Downstream handshake error").count();
    assert!(lines <= 1, "{lines} handshake error lines:\n{log}");
    // Another address: the real name's first handshake loads it.
    assert_eq!(handshake_from("127.0.0.3", "tls-shop.example"), 0);
    assert_eq!(lookups("loaded").await?, 1.0);
    // Registered after the set was loaded: the change feed tells the edge to
    // ask the replica about it.
    let v: Value = client()
        .post(format!("{}/api/stores", t.origin.url()))
        .json(&json!({ "name": "Later", "slug": "later-shop", "currency": "EUR" }))
        .send()
        .await?
        .json()
        .await?;
    let token = v["token"].as_str().context("token")?.to_owned();
    t.origin.attach_proven(&token, "later-shop.example").await?;
    let (chain, key) = ca.leaf(&["later-shop.example"])?;
    let (s, v) = put_cert(&t, "later-shop.example", &chain, &key, INTERNAL_TOKEN).await?;
    assert_eq!(s, StatusCode::OK, "{v}");
    eventually(WAIT, "the later domain served", || async {
        (handshake_from("127.0.0.3", "later-shop.example") == 0).then_some(())
    })
    .await?;
    drop((edge, replica));
    Ok(())
}

/// Issue 14, item 2: a drain sends every HTTP/2 connection a GOAWAY while
/// the process keeps running. A stream in flight at the drain (a proxied
/// write whose body is still being sent) finishes with its response; the
/// client can open no new stream on that connection, which then closes; a
/// new connection is served (the route is withdrawn by the hook, not here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_sends_http2_connections_goaway_and_lets_their_streams_finish() -> Result<()> {
    let (t, ca) = start()?;
    served_shop(&t, &ca, "Drained").await?;
    let (builder, replica, port) = tls_edge_builder(&t, "lon1", CERT_KEY)?;
    let token = "admin-token-for-the-h2-drain-test";
    let edge = builder.arg("--admin-token").arg(token).run()?;

    // An HTTP/2 connection (ALPN h2) to the custom domain.
    let (mut h2c, connection) = h2_connect(&ca.pem, port).await?;
    let closed = tokio::spawn(async move {
        let r = connection.await;
        (Instant::now(), r.map_err(|e| e.to_string()))
    });
    let request = |method: &str, path: &str| {
        http::Request::builder()
            .method(method)
            .uri(format!("https://tls-shop.example{path}"))
            .body(())
            .expect("request")
    };
    h2c = h2c.ready().await?;
    let (page, _) = h2c.send_request(request("GET", "/"), true)?;
    assert_eq!(page.await?.status(), 200);

    // A write in flight: headers sent, half its body sent.
    h2c = h2c.ready().await?;
    // (JSON: the origin reads the whole body before it answers.)
    let (first, rest): (&[u8], &[u8]) = (
        br#"{"name":"Half way","slug":"half-way","#,
        br#""currency":"EUR"}"#,
    );
    let mut post = request("POST", "/api/stores");
    post.headers_mut().insert(
        "content-length",
        (first.len() + rest.len()).to_string().parse()?,
    );
    post.headers_mut()
        .insert("content-type", "application/json".parse()?);
    let (in_flight, mut send) = h2c.send_request(post, false)?;
    send.send_data(bytes::Bytes::from_static(first), false)?;

    // The drain.
    let r = client()
        .post(format!("{}/drain", edge.admin_url()))
        .bearer_auth(token)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    let drained_at = Instant::now();

    // GOAWAY: no new stream is accepted on this connection.
    let refused = eventually(Duration::from_secs(5), "a GOAWAY", || {
        let h2c = h2c.clone();
        async move {
            match h2c.ready().await {
                Err(e) => Some(e.to_string()),
                Ok(mut c) => match c.send_request(request("GET", "/"), true) {
                    Err(e) => Some(e.to_string()),
                    Ok((resp, _)) => match resp.await {
                        Err(e) => Some(e.to_string()),
                        Ok(_) => None,
                    },
                },
            }
        }
    })
    .await?;
    // The stream in flight finishes: the rest of its body, then its answer.
    assert!(!closed.is_finished(), "closed with a stream in flight");
    send.send_data(bytes::Bytes::from_static(rest), true)?;
    let answer = tokio::time::timeout(Duration::from_secs(10), in_flight).await??;
    assert_eq!(answer.status(), 201, "the in-flight write was committed");
    // Then the connection closes cleanly (it was still open, with the stream
    // in flight, when the rest of the body went: checked above).
    // (A client frame racing the server's close — a WINDOW_UPDATE for the
    // answer just read — can meet a closed socket: "broken pipe" or a reset
    // after every stream has finished is a close, not a failure.)
    let (at, result) = tokio::time::timeout(Duration::from_secs(10), closed).await??;
    assert!(
        result.as_ref().is_ok()
            || result
                .as_ref()
                .is_err_and(|e| e.contains("broken pipe") || e.contains("reset")),
        "clean close: {result:?}"
    );
    eprintln!(
        "h2 drain: new stream refused ({refused}); in-flight write answered {}; connection closed {:?} after the drain",
        answer.status(),
        at - drained_at
    );
    // The process keeps serving new connections (the hook withdraws the
    // route; BGP moves them).
    let (code, _) = (
        Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "--http2",
                "--cacert",
            ])
            .arg(t.ca_file.path())
            .arg("--resolve")
            .arg(format!("tls-shop.example:{port}:127.0.0.1"))
            .arg(format!("https://tls-shop.example:{port}/"))
            .status()
            .map(|s| s.code().unwrap_or(-1))
            .unwrap_or(-1),
        (),
    );
    assert_eq!(code, 0);
    drop((edge, replica));
    Ok(())
}

/// An HTTP/2 connection (TLS, ALPN h2, verified against `ca_pem`) to
/// tls-shop.example on 127.0.0.1:`port`.
async fn h2_connect(
    ca_pem: &str,
    port: u16,
) -> Result<(
    h2::client::SendRequest<bytes::Bytes>,
    h2::client::Connection<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, bytes::Bytes>,
)> {
    Ok(h2::client::handshake(h2_tls(ca_pem, port).await?).await?)
}

/// A TLS connection offering only ALPN `h2` (verified against `ca_pem`) to
/// tls-shop.example on 127.0.0.1:`port`, before any HTTP/2 byte.
async fn h2_tls(
    ca_pem: &str,
    port: u16,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut cfg = tls_config(ca_pem)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls_pki_types::ServerName::try_from("tls-shop.example")?;
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await?)
}

/// A TLS client configuration trusting `ca_pem` alone.
fn tls_config(ca_pem: &str) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls_pki_types::pem::PemObject;
        roots.add(
            rustls_pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("ca: {e:?}"))?,
        )?;
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A TCP connection from `127.0.0.<last>` to the edge's TLS port.
async fn tcp_from(last: u8, port: u16) -> Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, last], 0)))?;
    Ok(socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await?)
}

/// A full TLS handshake to tls-shop.example from `127.0.0.<last>`, then
/// `GET /`: the status, or why it failed.
async fn handshake_from(
    cfg: &std::sync::Arc<rustls::ClientConfig>,
    last: u8,
    port: u16,
) -> Result<u16> {
    Ok(served_from(cfg, last, port).await?.0)
}

/// Waits (5 s at most) until a handshake from `127.0.0.<last>` is served
/// again: its address's slots came back.
async fn served_again(
    cfg: &std::sync::Arc<rustls::ClientConfig>,
    last: u8,
    port: u16,
    when: &str,
) -> Result<()> {
    eventually(
        Duration::from_secs(5),
        &format!("a handshake from 127.0.0.{last} {when}"),
        || async {
            handshake_from(cfg, last, port)
                .await
                .ok()
                .filter(|s| *s == 200)
        },
    )
    .await?;
    Ok(())
}

/// [`handshake_from`], the connection kept open: (status, connection).
async fn served_from(
    cfg: &std::sync::Arc<rustls::ClientConfig>,
    last: u8,
    port: u16,
) -> Result<(u16, tokio_rustls::client::TlsStream<tokio::net::TcpStream>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tcp_from(last, port).await?;
    let name = rustls_pki_types::ServerName::try_from("tls-shop.example")?;
    let mut tls = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp),
    )
    .await??;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: tls-shop.example\r\n\r\n")
        .await?;
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut head)).await??;
    Ok((std::str::from_utf8(&head[9..12])?.parse()?, tls))
}

/// Issue 13, item 6: a connection counts against its address's cap from its
/// accept, while its TLS handshake is still going on (a client can stall
/// there for pingora's 60 s), not only once pingora hands it over. Three
/// connections that sent a ClientHello and went silent fill a cap of 3:
/// the address's next handshake is refused, another address is served, and
/// the slots come back when the stalled connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_their_tls_handshake_count_against_the_per_address_cap() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let (t, ca) = start()?;
    served_shop(&t, &ca, "Stalled").await?;
    let (builder, replica, port) = tls_edge_builder(&t, "lon1", CERT_KEY)?;
    let edge = builder
        .arg("--max-connections-per-address")
        .arg("3")
        .run()?;
    let cfg = std::sync::Arc::new(tls_config(&ca.pem)?);
    // Three served TLS connections fill the cap exactly (each counts once,
    // not once before and once after its handshake); a fourth is refused.
    let mut served = Vec::new();
    for i in 0..3 {
        let (status, tls) = served_from(&cfg, 7, port).await?;
        assert_eq!(status, 200, "served connection {i}");
        served.push(tls);
    }
    let fourth = handshake_from(&cfg, 7, port).await;
    assert!(
        fourth.is_err(),
        "a fourth connection over a cap of 3: {fourth:?}"
    );
    drop(served);
    served_again(&cfg, 7, port, "once the served connections closed").await?;

    // Three connections from 127.0.0.7 send a real ClientHello and stall.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut hello = Vec::new();
        let mut conn = rustls::ClientConnection::new(
            cfg.clone(),
            rustls_pki_types::ServerName::try_from("tls-shop.example")?,
        )?;
        conn.write_tls(&mut hello)?;
        let mut tcp = tcp_from(7, port).await?;
        tcp.write_all(&hello).await?;
        stalled.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = handshake_from(&cfg, 7, port).await;
    assert!(
        refused.is_err(),
        "a fourth connection from an address with 3 in their handshake: {refused:?}"
    );
    assert_eq!(handshake_from(&cfg, 8, port).await?, 200, "another address");
    assert!(
        edge.metric("edgefront_connections_refused_total{reason=\"per_address\"")
            .await?
            >= 1.0
    );

    // The stalled connections go: their slots come back at once.
    drop(stalled);
    served_again(&cfg, 7, port, "once the stalled connections closed").await?;
    drop((edge, replica));
    Ok(())
}

/// Issue 14, item 1 over TLS with HTTP/2: a graceful upgrade (the new edge
/// takes the sockets, the old one sends GOAWAY and finishes) under a browser-
/// like HTTP/2 client that loads several streams per connection and, on a
/// GOAWAY, opens a new connection for streams the server never took (RFC 9113
/// §6.8: those are safe to retry). No stream the server took may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_fails_no_http2_stream() -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (t, ca) = start()?;
    served_shop(&t, &ca, "Upgraded").await?;
    let (builder, replica, port) = tls_edge_builder(&t, "lon1", CERT_KEY)?;
    let old = builder.clone().run()?;

    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (ok, failed, reconnects) = (
        std::sync::Arc::new(AtomicU64::new(0)),
        std::sync::Arc::new(AtomicU64::new(0)),
        std::sync::Arc::new(AtomicU64::new(0)),
    );
    let first_failure = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let client = {
        let (stop, ok, failed, reconnects, first_failure, pem) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            reconnects.clone(),
            first_failure.clone(),
            ca.pem.clone(),
        );
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut conn: Option<h2::client::SendRequest<bytes::Bytes>> = None;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Some(h2c) = conn.clone() else {
                    match h2_connect(&pem, port).await {
                        Ok((c, driver)) => {
                            tokio::spawn(driver);
                            reconnects.fetch_add(1, Ordering::Relaxed);
                            conn = Some(c);
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                    continue;
                };
                // Four streams at once, the way a page loads its parts.
                let mut streams = Vec::new();
                let mut going_away = false;
                for path in ["/", "/", "/", "/"] {
                    let req = http::Request::builder()
                        .uri(format!("https://tls-shop.example{path}"))
                        .body(())
                        .expect("request");
                    match h2c.clone().ready().await {
                        Ok(mut c) => match c.send_request(req, true) {
                            Ok((resp, _)) => streams.push(resp),
                            Err(_) => going_away = true,
                        },
                        Err(_) => going_away = true,
                    }
                }
                for resp in streams {
                    match resp.await {
                        Ok(r) if r.status() == 200 => {
                            let mut body = r.into_body();
                            let mut good = true;
                            while let Some(chunk) = body.data().await {
                                match chunk {
                                    Ok(c) => {
                                        let _ = body.flow_control().release_capacity(c.len());
                                    }
                                    Err(_) => good = false,
                                }
                            }
                            if good {
                                ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        // Refused by a GOAWAY before the server took it: a
                        // browser sends it again on a new connection.
                        Err(e)
                            if e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) =>
                        {
                            going_away = true;
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut f) = first_failure.lock() {
                                f.get_or_insert(format!("{other:?}"));
                            }
                        }
                    }
                }
                if going_away {
                    conn = None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let new = builder.run_upgrade(&old)?;
    let moved_before = reconnects.load(Ordering::Relaxed);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old.proc.pid() as i32),
        nix::sys::signal::Signal::SIGQUIT,
    )?;
    // The old edge named its certificates: the new one loads them before it
    // says it is healthy, while the client is still on its connection to the
    // old one (no handshake has reached the new edge yet).
    eventually(Duration::from_secs(4), "the new edge healthy", || async {
        edgefront_tests::client()
            .get(format!("{}/healthz", new.admin_url()))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await?;
    let warmed = new
        .metric("edgefront_tls_certificate_lookups_total{outcome=\"loaded\"")
        .await?;
    assert_eq!(
        reconnects.load(Ordering::Relaxed),
        moved_before,
        "the client was still on the old edge"
    );
    assert!(
        warmed >= 1.0,
        "the new edge loaded the named certificate: {warmed}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let gone = || {
        std::fs::read_to_string(format!("/proc/{}/stat", old.proc.pid())).map_or(true, |s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    };
    while !gone() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone(), "the old edge exited");
    let at_exit = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    client.await?;
    let (ok, failed, reconnects) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        reconnects.load(Ordering::Relaxed),
    );
    eprintln!(
        "h2 upgrade: {ok} streams answered ({} after the old edge exited), {failed} failed, {reconnects} connections",
        ok - at_exit
    );
    assert_eq!(
        failed,
        0,
        "first failure: {:?}",
        first_failure.lock().ok().and_then(|f| f.clone())
    );
    assert!(ok > at_exit, "the new edge served");
    assert!(reconnects >= 2, "the client moved to a new connection");
    drop((new, old, replica));
    Ok(())
}

/// Issue 13, item 6 (a known gap closed): an HTTP/2 connection must send its
/// client preface within the header deadline, or it is closed; one that did
/// is not timed afterwards (its streams come when they come).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_silent_before_its_preface_is_cut_at_the_header_deadline() -> Result<()> {
    use tokio::io::AsyncReadExt;
    let (t, ca) = start()?;
    served_shop(&t, &ca, "Preface").await?;
    let (builder, replica, port) = tls_edge_builder(&t, "lon1", CERT_KEY)?;
    let edge = builder.arg("--header-timeout-ms").arg("1000").run()?;

    // A proper HTTP/2 client (preface at once), idle for twice the deadline,
    // then a request: still served.
    let (h2c, connection) = h2_connect(&ca.pem, port).await?;
    tokio::spawn(connection);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut h2c = h2c.ready().await?;
    let req = http::Request::builder()
        .uri("https://tls-shop.example/")
        .body(())?;
    let (page, _) = h2c.send_request(req, true)?;
    assert_eq!(
        page.await?.status(),
        200,
        "an idle HTTP/2 connection past its preface"
    );

    // TLS with ALPN h2, then silence: closed at the deadline (1 s), long
    // before pingora's own timeouts.
    let mut tls = h2_tls(&ca.pem, port).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let t0 = Instant::now();
    let mut buf = [0u8; 256];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(15), tls.read(&mut buf)).await {
            // The server's SETTINGS may come first; the close follows.
            Ok(Ok(n)) if n > 0 => continue,
            Ok(_) => break t0.elapsed(),
            Err(_) => anyhow::bail!("still open 15 s after the handshake"),
        }
    };
    assert!(
        closed < Duration::from_secs(10),
        "closed {closed:?} after the handshake"
    );
    assert!(
        edge.metric("edgefront_connections_refused_total{reason=\"header_timeout\"")
            .await?
            >= 1.0
    );
    drop((edge, replica));
    Ok(())
}
