//! On-the-fly certificates: a registered domain's first handshake triggers
//! ACME issuance against a real pebble, with real HTTP-01 validation through
//! the edge's :80 and the origin; one order per name network-wide; renewal;
//! and a CA outage.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edgefront_tests::{
    Edge, Origin, Pebble, Postgres, client, eventually, free_port, served_serial,
};
use serde_json::{Value, json};

const CERT_KEY: &str = "8e1f0a9d2c3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f708192a3b4c5d6e7f";
const INTERNAL_TOKEN: &str = "acme-internal-token-0123456789abcdef0123";
/// The fallback CA's External Account Binding: key id and base64url HMAC key.
const EAB: (&str, &str) = (
    "edgefront-test-kid",
    "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W",
);

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Primary, origin (with the internal API), pebble, and per region a replica
/// and an ACME-enabled edge. Pebble validates through the first edge's :80.
struct Acme {
    edges: Vec<Edge>,
    tls_ports: Vec<u16>,
    pebble: Pebble,
    /// A second CA the edges fall back to, when started with one.
    fallback: Option<Pebble>,
    origin: Origin,
    replicas: Vec<Postgres>,
    primary: Postgres,
}

impl Acme {
    fn start(regions: &[&str], validity_s: Option<u64>, edge_args: &[&str]) -> Result<Acme> {
        Self::start_with_origin(regions, validity_s, edge_args, &[])
    }

    /// Like [`Acme::start`], with extra origin flags.
    fn start_with_origin(
        regions: &[&str],
        validity_s: Option<u64>,
        edge_args: &[&str],
        origin_args: &[&str],
    ) -> Result<Acme> {
        Self::build(regions, validity_s, edge_args, origin_args, None)
    }

    /// Like [`Acme::start`], with a second pebble (its own root, requiring
    /// External Account Binding with `EAB`) as every edge's fallback
    /// directory; the first is named `first`, the second `second`.
    fn start_with_fallback(
        regions: &[&str],
        validity_s: Option<u64>,
        edge_args: &[&str],
    ) -> Result<Acme> {
        Self::build(regions, validity_s, edge_args, &[], Some(EAB))
    }

    fn build(
        regions: &[&str],
        validity_s: Option<u64>,
        edge_args: &[&str],
        origin_args: &[&str],
        fallback_eab: Option<(&str, &str)>,
    ) -> Result<Acme> {
        let platform = edgefront_regions::Regions::builtin()?
            .network
            .platform_domain;
        let primary = Postgres::primary()?;
        let origin = Origin::start_with(
            &primary.url(),
            &platform,
            local(free_port()),
            &[
                &["--internal-token", INTERNAL_TOKEN, "--cert-key", CERT_KEY][..],
                origin_args,
            ]
            .concat(),
        )?;
        let http = local(free_port());
        // Pebble resolves through the origin's DNS: one zone for proofs and
        // validation.
        let pebble = Pebble::start_with_dns(http.port(), validity_s, origin.dns.clone())?;
        let fallback = match fallback_eab {
            Some(eab) => Some(Pebble::start_with_eab(
                http.port(),
                None,
                origin.dns.clone(),
                Some(eab),
            )?),
            None => None,
        };
        let mut fallback_args: Vec<String> = Vec::new();
        if let (Some(f), Some((kid, key))) = (&fallback, fallback_eab) {
            fallback_args = [
                "--acme-directory-name",
                "first",
                "--acme-fallback-directory",
                &f.directory,
                "--acme-fallback-directory-name",
                "second",
                "--acme-fallback-ca-root",
                f.listener_ca().to_str().context("path")?,
                "--acme-fallback-eab-kid",
                kid,
                "--acme-fallback-eab-hmac-key",
                key,
            ]
            .map(str::to_owned)
            .to_vec();
        }
        let (mut edges, mut replicas, mut tls_ports) = (Vec::new(), Vec::new(), Vec::new());
        for (i, region) in regions.iter().enumerate() {
            let replica = primary.replica(region)?;
            let tls_port = free_port();
            let mut b = Edge::builder(region, &replica.url(), origin.addr);
            if i == 0 {
                b = b.listen(http, local(free_port()));
            }
            // Two origins' internal APIs, the first one down (a failover
            // candidate that is gone): every issuance moves to the second.
            let dead = format!("127.0.0.1:{}", free_port());
            let mut internal = origin.edge_internal_args(region)?;
            if let Some(i) = internal.iter().position(|a| a == "--origin-internal") {
                internal[i + 1] = format!("{dead},{}", internal[i + 1]);
            }
            for a in internal {
                b = b.arg(&a);
            }
            for a in [
                "--tls-listen",
                &format!("127.0.0.1:{tls_port}"),
                "--cert-key",
                CERT_KEY,
                "--acme-directory",
                &pebble.directory,
                "--acme-ca-root",
                pebble.listener_ca().to_str().context("path")?,
                "--internal-token",
                INTERNAL_TOKEN,
            ]
            .into_iter()
            .chain(fallback_args.iter().map(String::as_str))
            .chain(edge_args.iter().copied())
            {
                b = b.arg(a);
            }
            edges.push(b.run()?);
            replicas.push(replica);
            tls_ports.push(tls_port);
        }
        Ok(Acme {
            edges,
            tls_ports,
            pebble,
            fallback,
            origin,
            replicas,
            primary,
        })
    }

    /// A store owning `hosts` (proven in DNS), waited for on every region's replica.
    async fn store_with_domains(&self, slug: &str, hosts: &[&str]) -> Result<String> {
        let v: Value = client()
            .post(format!("{}/api/stores", self.origin.url()))
            .json(&json!({ "name": format!("Store {slug}"), "slug": slug, "currency": "USD" }))
            .send()
            .await?
            .json()
            .await?;
        let token = v["token"].as_str().context("token")?.to_owned();
        for host in hosts {
            self.origin.attach_proven(&token, host).await?;
        }
        self.replicated(hosts).await?;
        Ok(token)
    }

    /// Waits until every region's replica serves `hosts`.
    async fn replicated(&self, hosts: &[&str]) -> Result<()> {
        for replica in &self.replicas {
            let pool = sqlx::PgPool::connect(&replica.url()).await?;
            for host in hosts {
                eventually(Duration::from_secs(10), "domain replicated", || async {
                    let n: i64 =
                        sqlx::query_scalar("SELECT count(*) FROM domains WHERE hostname = $1")
                            .bind(host)
                            .fetch_one(&pool)
                            .await
                            .ok()?;
                    (n == 1).then_some(())
                })
                .await?;
            }
            pool.close().await;
        }
        Ok(())
    }

    /// Sum of an ACME metric over every edge.
    async fn issuances(&self, outcome: &str) -> Result<f64> {
        let mut n = 0.0;
        for e in &self.edges {
            n += e
                .metric(&format!(
                    "edgefront_acme_issuances_total{{outcome=\"{outcome}\""
                ))
                .await?;
        }
        Ok(n)
    }
}

/// curl over TLS trusting `root`: (exit code, HTTP status).
fn curl(root: &std::path::Path, host: &str, port: u16) -> (i32, String) {
    edgefront_tests::curl_https(None, root, host, [127, 0, 0, 1].into(), port, 30)
        .expect("curl runs")
}

fn ok() -> (i32, String) {
    (0, "200".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_handshake_of_registered_domain_issues_once_and_unregistered_names_order_nothing()
-> Result<()> {
    let a = Acme::start(&["bom1"], None, &["--http-redirect", "true"])?;
    a.store_with_domains("fresh-cert", &["fresh-cert.example"])
        .await?;
    let root = a.pebble.issuing_root()?;
    let port = a.tls_ports[0];

    // Three concurrent first handshakes: all succeed with a valid certificate, one order.
    let t0 = Instant::now();
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let root = root.clone();
            std::thread::spawn(move || curl(&root, "fresh-cert.example", port))
        })
        .collect();
    for h in handles {
        let got = h.join().map_err(|_| anyhow::anyhow!("thread"))?;
        assert_eq!(
            got,
            ok(),
            "{}\n{}",
            a.edges[0].proc.log(),
            a.pebble.proc.log()
        );
    }
    let first = t0.elapsed();
    assert!(
        first < Duration::from_secs(25),
        "first handshake took {first:?}"
    );
    assert_eq!(a.issuances("issued").await?, 1.0);
    // Stored for every region: one row on the primary, key sealed.
    let pool = sqlx::PgPool::connect(&a.primary.url()).await?;
    let (n, leaked): (i64, bool) = sqlx::query_as(
        "SELECT count(*), bool_or(position('PRIVATE KEY'::bytea in key_ciphertext) > 0)
         FROM certificates WHERE hostname = 'fresh-cert.example'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!((n, leaked), (1, false));
    // Later handshakes come from memory.
    let t1 = Instant::now();
    assert_eq!(curl(&root, "fresh-cert.example", port), ok());
    assert!(t1.elapsed() < Duration::from_secs(2));
    assert!(
        !a.edges[0].proc.log().contains("PRIVATE KEY"),
        "keys never logged"
    );

    // 200 unregistered names: zero orders, fast failures.
    for i in 0..200 {
        assert_eq!(curl(&root, &format!("junk-{i}.example"), port).0, 35);
    }
    assert_eq!(
        a.edges[0].metric("edgefront_acme_issuances_total").await?,
        1.0,
        "no orders for unregistered names"
    );
    println!("first-sight issuance + handshake: {first:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_asked_for_one_new_name_at_once_make_exactly_one_order() -> Result<()> {
    // The CA validates through region A's :80 only: region B's challenges are
    // answered there too, because challenges live on the origin, not in a region.
    let a = Acme::start(&["ams1", "fra1"], None, &[])?;
    a.store_with_domains("twice", &["twice.example"]).await?;
    let root = a.pebble.issuing_root()?;
    let handles: Vec<_> = a
        .tls_ports
        .iter()
        .map(|&port| {
            let root = root.clone();
            std::thread::spawn(move || curl(&root, "twice.example", port))
        })
        .collect();
    for h in handles {
        let got = h.join().map_err(|_| anyhow::anyhow!("thread"))?;
        assert_eq!(
            got,
            ok(),
            "{}\n{}",
            a.edges[0].proc.log(),
            a.edges[1].proc.log()
        );
    }
    assert_eq!(
        a.issuances("issued").await?,
        1.0,
        "exactly one ACME order for one name"
    );
    // The other region either waited on the lease or, if it came later, loaded
    // the replicated certificate: never a second order.
    assert!(a.issuances("waited").await? <= 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soon_to_expire_certificate_is_renewed_without_a_failed_handshake() -> Result<()> {
    // Certificates valid for 15 s: a third of the lifetime left after 10 s.
    let a = Acme::start(&["syd1"], Some(15), &["--acme-renew-check-seconds", "1"])?;
    a.store_with_domains("renew", &["renew.example"]).await?;
    let root = a.pebble.issuing_root()?;
    let port = a.tls_ports[0];
    assert_eq!(curl(&root, "renew.example", port), ok());
    let first = served_serial(port, "renew.example").context("serial")?;

    // Handshake continuously until a new certificate is served (bounded).
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut handshakes = 0;
    loop {
        assert!(
            Instant::now() < deadline,
            "not renewed in time\n{}",
            a.edges[0].proc.log()
        );
        assert_eq!(
            curl(&root, "renew.example", port),
            ok(),
            "a handshake failed during renewal"
        );
        handshakes += 1;
        if served_serial(port, "renew.example").is_some_and(|s| s != first) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(handshakes > 10, "{handshakes}");
    assert!(a.issuances("renewed").await? >= 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_down_existing_certificates_keep_working_new_domains_fail_cleanly_then_succeed()
-> Result<()> {
    let mut a = Acme::start(&["gru1"], None, &[])?;
    a.store_with_domains("outage", &["before.example", "during.example"])
        .await?;
    let root = a.pebble.issuing_root()?;
    let port = a.tls_ports[0];
    assert_eq!(curl(&root, "before.example", port), ok());

    // The CA goes down.
    a.pebble.stop();
    assert_eq!(
        curl(&root, "before.example", port),
        ok(),
        "existing certificates keep working"
    );
    let t0 = Instant::now();
    assert_eq!(
        curl(&root, "during.example", port).0,
        35,
        "a new domain fails the handshake cleanly"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "bounded: {:?}",
        t0.elapsed()
    );
    assert!(a.issuances("failed").await? >= 1.0);

    // The CA comes back (it lost its accounts and has a new root): the domain
    // gets a certificate on a later handshake, after its backoff.
    a.pebble.restart()?;
    let new_root = a.pebble.issuing_root()?;
    eventually(
        Duration::from_secs(40),
        "certificate after the CA returns",
        || async { (curl(&new_root, "during.example", port) == ok()).then_some(()) },
    )
    .await?;
    // The earlier certificate (from the CA's previous root) is still the one served.
    assert_eq!(curl(&root, "before.example", port), ok());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_over_its_issuance_limit_gets_no_more_orders() -> Result<()> {
    let a = Acme::start(&["lon1"], None, &["--acme-per-store-per-hour", "1"])?;
    a.store_with_domains("greedy", &["one.example", "two.example"])
        .await?;
    let root = a.pebble.issuing_root()?;
    let port = a.tls_ports[0];
    assert_eq!(curl(&root, "one.example", port), ok());
    // The certificate row reaches the replica before the limit can count it.
    let replica = sqlx::PgPool::connect(&a.replicas[0].url()).await?;
    eventually(
        Duration::from_secs(10),
        "certificate replicated",
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM certificates")
                .fetch_one(&replica)
                .await
                .ok()?;
            (n == 1).then_some(())
        },
    )
    .await?;
    assert_eq!(
        curl(&root, "two.example", port).0,
        35,
        "over the store's limit: no certificate"
    );
    assert_eq!(a.issuances("issued").await?, 1.0, "no second order");
    assert!(a.issuances("store_rate_limited").await? >= 1.0);
    Ok(())
}

/// Orders pebble created (it logs each one as it stores it).
fn pebble_orders(p: &Pebble) -> usize {
    p.proc.log().matches("Added order").count()
}

/// Pauses WAL replay on a replica (it keeps receiving, applies nothing).
async fn pause_replay(replica: &Postgres) -> Result<sqlx::PgPool> {
    let pool = sqlx::PgPool::connect(&replica.url()).await?;
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&pool)
        .await?;
    eventually(Duration::from_secs(10), "replay paused", || async {
        let s: String = sqlx::query_scalar("SELECT pg_get_wal_replay_pause_state()")
            .fetch_one(&pool)
            .await
            .ok()?;
        // "pause requested" already stops replay before the next record.
        (s != "not paused").then_some(())
    })
    .await?;
    Ok(pool)
}

async fn certificates_on(pool: &sqlx::PgPool, host: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM certificates WHERE hostname = $1")
            .bind(host)
            .fetch_one(pool)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_with_a_lagging_replica_uses_the_certificate_another_region_just_issued()
-> Result<()> {
    let a = Acme::start(&["ams1", "fra1"], None, &[])?;
    let host = "staggered.example";
    a.store_with_domains("staggered", &[host]).await?;
    let root = a.pebble.issuing_root()?;
    // Region B's replica is held back: it will not see A's certificate.
    let b_replica = pause_replay(&a.replicas[1]).await?;

    // Region A issues first.
    assert_eq!(curl(&root, host, a.tls_ports[0]), ok());
    let serial = served_serial(a.tls_ports[0], host).context("serial in A")?;
    assert_eq!(pebble_orders(&a.pebble), 1);
    let primary = sqlx::PgPool::connect(&a.primary.url()).await?;
    assert_eq!(certificates_on(&primary, host).await?, 1);
    assert_eq!(
        certificates_on(&b_replica, host).await?,
        0,
        "B's replica has not caught up"
    );

    // Then region B gets its first handshake for the name: it wins the lease
    // race nobody runs any more, and must not order again.
    assert_eq!(
        curl(&root, host, a.tls_ports[1]),
        ok(),
        "{}",
        a.edges[1].proc.log()
    );
    assert_eq!(
        served_serial(a.tls_ports[1], host).as_deref(),
        Some(serial.as_str()),
        "B serves A's certificate"
    );
    assert_eq!(pebble_orders(&a.pebble), 1, "pebble saw exactly one order");
    assert_eq!(a.issuances("issued").await?, 1.0);
    assert_eq!(
        a.edges[1]
            .metric("edgefront_acme_issuances_total{outcome=\"reused\"")
            .await?,
        1.0
    );
    assert_eq!(
        certificates_on(&b_replica, host).await?,
        0,
        "B got it from the primary, not its replica"
    );
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&b_replica)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_at_once_with_one_replica_held_back_make_one_order() -> Result<()> {
    // Whichever region loses the lease waits; the one whose replica is held
    // back finds the winner's certificate on the primary instead.
    let a = Acme::start(&["sin1", "bom1"], None, &[])?;
    let host = "held-back.example";
    a.store_with_domains("held-back", &[host]).await?;
    let root = a.pebble.issuing_root()?;
    let b_replica = pause_replay(&a.replicas[1]).await?;
    let handles: Vec<_> = a
        .tls_ports
        .iter()
        .map(|&port| {
            let root = root.clone();
            std::thread::spawn(move || curl(&root, host, port))
        })
        .collect();
    for h in handles {
        let got = h.join().map_err(|_| anyhow::anyhow!("thread"))?;
        assert_eq!(
            got,
            ok(),
            "{}\n{}",
            a.edges[0].proc.log(),
            a.edges[1].proc.log()
        );
    }
    assert_eq!(pebble_orders(&a.pebble), 1, "pebble saw exactly one order");
    assert_eq!(
        served_serial(a.tls_ports[0], host),
        served_serial(a.tls_ports[1], host)
    );
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&b_replica)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_is_refused_with_the_certificate_while_current_and_granted_once_due_for_renewal()
-> Result<()> {
    let a = Acme::start(&[], None, &[])?;
    let host = "lease-check.example";
    a.store_with_domains("lease-check", &[host]).await?;
    let (internal_url, internal_client) =
        (a.origin.internal_url()?, a.origin.internal_client("sin1")?);
    let internal = |method: reqwest::Method, path: &str| {
        internal_client
            .request(method, format!("{internal_url}{path}"))
            .bearer_auth(INTERNAL_TOKEN)
    };
    let lease = |holder: &'static str| {
        internal(
            reqwest::Method::POST,
            &format!("/internal/acme/leases/{host}"),
        )
        .json(&json!({ "holder": holder, "seconds": 60 }))
        .send()
    };
    // No certificate: the lease is granted.
    let v: Value = lease("region-a").await?.json().await?;
    assert_eq!(v["acquired"], true);
    assert!(v.get("certificate").is_none());
    let ca = edgefront_tests::TestCa::new()?;
    let (chain, key) = ca.leaf(&[host])?;
    let r = internal(
        reqwest::Method::PUT,
        &format!("/internal/certificates/{host}"),
    )
    .json(&json!({ "chain_pem": chain, "key_pem": key }))
    .send()
    .await?;
    assert!(r.status().is_success(), "{}", r.status());
    internal(
        reqwest::Method::DELETE,
        &format!("/internal/acme/leases/{host}?holder=region-a"),
    )
    .send()
    .await?;

    // A current certificate: no lease, the certificate instead, key sealed.
    let v: Value = lease("region-b").await?.json().await?;
    assert_eq!(v["acquired"], false);
    let cert = &v["certificate"];
    assert_eq!(cert["chain_pem"], chain.as_str());
    assert!(
        !v.to_string().contains("PRIVATE KEY"),
        "the key stays sealed"
    );
    let sealer = edgefront_certs::Sealer::from_hex(CERT_KEY)?;
    let opened = sealer.open(
        host,
        &hex::decode(cert["key_nonce"].as_str().context("nonce")?)?,
        &hex::decode(cert["key_ciphertext"].as_str().context("ct")?)?,
    )?;
    assert_eq!(opened, key.as_bytes());
    let pool = sqlx::PgPool::connect(&a.primary.url()).await?;
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM cert_leases WHERE hostname = $1")
        .bind(host)
        .fetch_one(&pool)
        .await?;
    assert_eq!(held, 0, "no lease taken for an issued name");
    let r = internal(
        reqwest::Method::GET,
        &format!("/internal/acme/certificates/{host}"),
    )
    .send()
    .await?;
    assert_eq!(r.status(), reqwest::StatusCode::OK);

    // Due for renewal (less than a third of its lifetime left): granted again.
    sqlx::query(
        "UPDATE certificates SET updated_at = now() - interval '1 hour',
                not_after = now() + interval '10 minutes' WHERE hostname = $1",
    )
    .bind(host)
    .execute(&pool)
    .await?;
    let v: Value = lease("region-b").await?.json().await?;
    assert_eq!(v["acquired"], true);
    assert!(v.get("certificate").is_none());
    let r = internal(
        reqwest::Method::GET,
        &format!("/internal/acme/certificates/{host}"),
    )
    .send()
    .await?;
    assert_eq!(r.status(), reqwest::StatusCode::NOT_FOUND);
    // And without the internal token, nothing, even with a node's certificate.
    let r = internal_client
        .get(format!("{internal_url}/internal/acme/certificates/{host}"))
        .send()
        .await?;
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    Ok(())
}

/// A store's claims, by hostname.
async fn claims(a: &Acme, token: &str) -> Result<Vec<Value>> {
    let v: Value = client()
        .get(format!("{}/api/domains", a.origin.url()))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    Ok(v["domains"].as_array().context("domains")?.clone())
}

async fn new_store(a: &Acme, slug: &str) -> Result<String> {
    let v: Value = client()
        .post(format!("{}/api/stores", a.origin.url()))
        .json(&json!({ "name": format!("Store {slug}"), "slug": slug, "currency": "USD" }))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["token"].as_str().context("token")?.to_owned())
}

async fn claim(a: &Acme, token: &str, host: &str) -> Result<(reqwest::StatusCode, Value)> {
    let r = client()
        .post(format!("{}/api/domains", a.origin.url()))
        .bearer_auth(token)
        .json(&json!({ "hostname": host }))
        .send()
        .await?;
    Ok((r.status(), r.json().await?))
}

/// The status of the home page for `host` on the first edge (plain HTTP).
async fn served(a: &Acme, host: &str) -> Result<reqwest::StatusCode> {
    Ok(client()
        .get(format!("{}/", a.edges[0].url()))
        .header("host", host)
        .send()
        .await?
        .status())
}

/// Ownership, end to end against pebble and the real DNS server: a store
/// that claims names it cannot prove (500 of them, among them another
/// seller's live domain) is never served as them and makes no ACME order; a
/// proven domain whose record is removed is suspended after the grace
/// period (its page and certificate gone); a removed name claimed by another
/// store needs that store's own, fresh proof.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unproven_claims_are_never_served_or_ordered_and_a_lapsed_proof_is_suspended() -> Result<()>
{
    let a = Acme::start_with_origin(
        &["bom1"],
        None,
        &[],
        &[
            "--domain-pending-check-seconds",
            "1",
            "--domain-recheck-seconds",
            "1",
            "--domain-grace-seconds",
            "4",
        ],
    )?;
    let owner = a.store_with_domains("owner", &["owned.example"]).await?;
    let root = a.pebble.issuing_root()?;
    let port = a.tls_ports[0];
    assert_eq!(curl(&root, "owned.example", port), ok());
    assert_eq!(a.issuances("issued").await?, 1.0);

    // The attacker: 500 names it cannot prove, and the owner's live name.
    let attacker = new_store(&a, "attacker").await?;
    let (st, v) = claim(&a, &attacker, "owned.example").await?;
    assert_eq!(st, reqwest::StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["field"], "hostname");
    let names: Vec<String> = (0..500)
        .map(|i| format!("shop{i}.victim.example"))
        .collect();
    for n in &names {
        let (st, v) = claim(&a, &attacker, n).await?;
        assert_eq!(st, reqwest::StatusCode::CREATED, "{v}");
        assert_eq!(v["domain"]["state"], "pending");
    }
    // Someone else's record for the name proves nothing for this claim.
    a.origin
        .dns
        .set_txt(
            "_edgefront.shop0.victim.example",
            "edgefront-verify=0123456789abcdef0123456789abcdef",
        )
        .await?;
    let v = a.origin.verify(&attacker, "shop0.victim.example").await?;
    assert_eq!(v["domain"]["state"], "pending", "{v}");
    assert!(
        v["domain"]["check_result"]
            .as_str()
            .is_some_and(|r| r.contains("does not hold this claim's token")),
        "{v}"
    );
    for n in &names {
        assert_eq!(curl(&root, n, port).0, 35, "{n}: no certificate");
    }
    for n in names.iter().take(20) {
        assert_eq!(served(&a, n).await?, reqwest::StatusCode::NOT_FOUND, "{n}");
    }
    assert_eq!(
        a.edges[0].metric("edgefront_acme_issuances_total").await?,
        1.0,
        "no order for any pending name"
    );
    // The background checker looked (and backs off), still all pending.
    let all = claims(&a, &attacker).await?;
    assert_eq!(all.len(), 500);
    assert!(all.iter().all(|c| c["state"] == "pending"));
    eventually(Duration::from_secs(20), "background checks ran", || async {
        let all = claims(&a, &attacker).await.ok()?;
        all.iter()
            .all(|c| {
                c["check_result"]
                    .as_str()
                    .is_some_and(|r| r.contains("_edgefront."))
            })
            .then_some(())
    })
    .await?;

    // The owner's record disappears: still served during grace, then
    // suspended — no page, no certificate.
    let mine = claims(&a, &owner).await?;
    let record = mine[0]["record"]["name"]
        .as_str()
        .context("record")?
        .to_owned();
    let value = mine[0]["record"]["value"]
        .as_str()
        .context("value")?
        .to_owned();
    a.origin.dns.clear_txt(&record).await?;
    let lapsed = Instant::now();
    eventually(Duration::from_secs(10), "failing noticed", || async {
        let c = claims(&a, &owner).await.ok()?;
        c[0]["failing_since"].is_string().then_some(())
    })
    .await?;
    assert_eq!(
        served(&a, "owned.example").await?,
        reqwest::StatusCode::OK,
        "grace"
    );
    eventually(Duration::from_secs(20), "suspended", || async {
        let c = claims(&a, &owner).await.ok()?;
        (c[0]["state"] == "suspended").then_some(())
    })
    .await?;
    assert!(
        lapsed.elapsed() >= Duration::from_secs(3),
        "not before the grace period"
    );
    eventually(Duration::from_secs(10), "no longer served", || async {
        (served(&a, "owned.example").await.ok()? == reqwest::StatusCode::NOT_FOUND).then_some(())
    })
    .await?;
    eventually(Duration::from_secs(10), "certificate withdrawn", || async {
        (curl(&root, "owned.example", port).0 == 35).then_some(())
    })
    .await?;
    let c = &claims(&a, &owner).await?[0];
    assert!(
        c["check_result"]
            .as_str()
            .is_some_and(|r| r.contains("suspended")),
        "{c}"
    );
    // The record comes back: active again with the same token.
    a.origin.dns.set_txt(&record, &value).await?;
    let v = a.origin.verify(&owner, "owned.example").await?;
    assert_eq!(v["domain"]["state"], "active", "{v}");

    // Removed by the owner, claimed by the attacker: the owner's old record
    // (still published) does not prove the attacker's claim.
    let r = client()
        .delete(format!("{}/api/domains/owned.example", a.origin.url()))
        .bearer_auth(&owner)
        .send()
        .await?;
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let (st, v) = claim(&a, &attacker, "owned.example").await?;
    assert_eq!(st, reqwest::StatusCode::CREATED, "{v}");
    assert_ne!(
        v["domain"]["record"]["value"],
        value.as_str(),
        "a fresh token"
    );
    let v = a.origin.verify(&attacker, "owned.example").await?;
    assert_eq!(v["domain"]["state"], "pending", "{v}");
    assert_eq!(
        served(&a, "owned.example").await?,
        reqwest::StatusCode::NOT_FOUND
    );
    assert_eq!(
        a.edges[0].metric("edgefront_acme_issuances_total").await?,
        1.0,
        "still one order in all"
    );
    Ok(())
}

/// The ACME budgets, against pebble with real (failing) HTTP-01 validation:
/// a store with 50 proven names whose DNS then points away spends only its
/// failure budget (3 orders reach the CA, then the store is paused, the
/// reason in the API), new names stop at the account's share for them, and
/// renewals of another store keep happening from the reserved share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_budgets_hold_against_a_failing_store_and_renewals_keep_their_share() -> Result<()> {
    let a = Acme::start_with_origin(
        &["lon1"],
        // Renewal is due after 30 s: after the broken store's orders (the
        // new-name share must not be spent by a renewal before them).
        Some(45),
        &["--acme-renew-check-seconds", "1"],
        &[
            // 8 orders in 3 h, half of them reserved for renewals.
            "--acme-account-orders-per-3h",
            "8",
            "--acme-renewal-reserve-percent",
            "50",
            "--acme-store-failures-per-day",
            "3",
            "--acme-failure-backoff-seconds",
            "1",
        ],
    )?;
    let good = a.store_with_domains("good", &["renew.example"]).await?;
    let root = a.pebble.issuing_root()?;
    let port = a.tls_ports[0];
    assert_eq!(curl(&root, "renew.example", port), ok());
    let first = served_serial(port, "renew.example").context("serial")?;

    // 50 proven names, then their A records point where no edge listens:
    // HTTP-01 validation fails at the CA.
    let names: Vec<String> = (0..50).map(|i| format!("broken{i}.example")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let bad = a.store_with_domains("broken", &refs).await?;
    for n in &names {
        a.origin.dns.set_a(n, &["127.0.0.2"]).await?;
    }
    for n in &names {
        assert_eq!(curl(&root, n, port).0, 35, "{n}: no certificate");
    }
    let pool = sqlx::PgPool::connect(&a.primary.url()).await?;
    let (orders, failed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE o.outcome = 'failed')
         FROM acme_orders o JOIN stores s ON s.id = o.store_id WHERE s.slug = 'broken'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(
        (orders, failed),
        (3, 3),
        "the store's failure budget, no more"
    );
    let v: Value = client()
        .get(format!("{}/api/domains", a.origin.url()))
        .bearer_auth(&bad)
        .send()
        .await?
        .json()
        .await?;
    assert!(
        v["acme_paused"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("3 failed certificate orders")),
        "{}",
        v["acme_paused"]
    );
    let metrics = client()
        .get(format!("{}/metrics", a.origin.url()))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("edgefront_origin_acme_paused_stores 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgefront_origin_acme_refusals_total{budget=\"store_paused\"} 47"),
        "{metrics}"
    );

    // 1 + 3 orders: the share for new names is spent. Another store's new
    // name is refused before the CA…
    a.store_with_domains("late", &["late.example"]).await?;
    assert_eq!(curl(&root, "late.example", port).0, 35);
    assert!(
        metrics_of(&a)
            .await?
            .contains("budget=\"account_new_names\"} 1"),
        "{}",
        metrics_of(&a).await?
    );
    // …while renewals keep happening from the reserved share.
    eventually(Duration::from_secs(60), "a renewal", || async {
        served_serial(port, "renew.example")
            .filter(|s| *s != first)
            .map(|_| ())
    })
    .await?;
    let renewals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM acme_orders WHERE hostname = 'renew.example' AND renewal AND outcome = 'valid'",
    )
    .fetch_one(&pool)
    .await?;
    assert!(renewals >= 1);
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM acme_orders")
        .fetch_one(&pool)
        .await?;
    assert!(total <= 8, "never past the account budget: {total}");
    let _ = good;
    Ok(())
}

async fn metrics_of(a: &Acme) -> Result<String> {
    Ok(client()
        .get(format!("{}/metrics", a.origin.url()))
        .send()
        .await?
        .text()
        .await?)
}

/// The platform wildcard `*.<platform>` is issued on the first handshake of
/// a store's platform name with ACME DNS-01 (pebble validates the TXT record
/// the origin publishes in the test DNS server), counted by the budgets, and
/// renewed on the same schedule as other certificates without a failed
/// handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_wildcard_is_issued_and_renewed_with_dns01() -> Result<()> {
    let a = Acme::start(
        &["nyc1"],
        Some(30),
        &[
            "--acme-platform-wildcard",
            "true",
            "--acme-renew-check-seconds",
            "1",
        ],
    )?;
    let platform = edgefront_regions::Regions::builtin()?
        .network
        .platform_domain;
    new_store(&a, "wild").await?;
    let host = format!("wild.{platform}");
    let root = a.pebble.issuing_root()?;
    let port = a.tls_ports[0];
    eventually(Duration::from_secs(30), "the wildcard", || async {
        (curl(&root, &host, port) == ok()).then_some(())
    })
    .await?;
    let pool = sqlx::PgPool::connect(&a.primary.url()).await?;
    let wildcard = format!("*.{platform}");
    let (orders, valid): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE outcome = 'valid') FROM acme_orders WHERE hostname = $1",
    )
    .bind(&wildcard)
    .fetch_one(&pool)
    .await?;
    assert_eq!((orders, valid), (1, 1), "one DNS-01 order, counted");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM certificates WHERE hostname = $1")
        .bind(&wildcard)
        .fetch_one(&pool)
        .await?;
    assert_eq!(stored, 1);
    // Another store's platform name uses the same certificate: no new order.
    let first = served_serial(port, &host).context("serial")?;
    assert_eq!(
        served_serial(port, &format!("other.{platform}")),
        Some(first.clone())
    );
    // Renewed with a third of its lifetime left, handshakes succeeding throughout.
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        assert!(
            Instant::now() < deadline,
            "wildcard not renewed\n{}",
            a.edges[0].proc.log()
        );
        assert_eq!(
            curl(&root, &host, port),
            ok(),
            "a handshake failed during renewal"
        );
        if served_serial(port, &host).is_some_and(|s| s != first) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let renewals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM acme_orders WHERE hostname = $1 AND renewal AND outcome = 'valid'",
    )
    .bind(&wildcard)
    .fetch_one(&pool)
    .await?;
    assert!(renewals >= 1);
    Ok(())
}

/// A file holding both CAs' issuing roots: a handshake verifies whichever
/// of them signed the certificate served.
fn both_roots(
    a: &Acme,
    first: &std::path::Path,
    second: &std::path::Path,
) -> Result<std::path::PathBuf> {
    let path = a.pebble.listener_ca().with_file_name("both-roots.pem");
    let pem = [
        std::fs::read_to_string(first)?,
        std::fs::read_to_string(second)?,
    ]
    .concat();
    std::fs::write(&path, pem)?;
    Ok(path)
}

/// Item 5 of the custom-domains issue: when the first ACME directory goes
/// down, new names and renewals are issued by the second (its own root,
/// External Account Binding required) once the first has failed for the
/// configured time; handshakes of names already served never fail; the
/// edge's metrics say which issuer signed each certificate in memory and
/// which directory is in use; the outage is not held against the sellers;
/// and when the first comes back, orders return to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_issuer_takes_over_while_the_first_is_down_and_handshakes_keep_working()
-> Result<()> {
    // The first CA's certificates live 36 s, so one is renewed during its
    // outage (due with 12 s left: room for a retry on a slow machine).
    let mut a = Acme::start_with_fallback(
        &["lax1"],
        Some(36),
        &[
            "--acme-failover-after-seconds",
            "2",
            "--acme-renew-check-seconds",
            "1",
        ],
    )?;
    a.store_with_domains(
        "twoca",
        &[
            "kept.example",
            "new-during.example",
            "after-switch.example",
            "after.example",
        ],
    )
    .await?;
    let port = a.tls_ports[0];
    let first_root = a.pebble.issuing_root()?;
    let second_root = a.fallback.as_ref().context("fallback")?.issuing_root()?;
    let both = both_roots(&a, &first_root, &second_root)?;
    assert_eq!(curl(&first_root, "kept.example", port), ok());
    let edge = &a.edges[0];
    assert_eq!(
        edge.metric("edgefront_tls_certificates_by_issuer{issuer=\"first\"")
            .await?,
        1.0
    );
    assert_eq!(
        edge.metric("edgefront_acme_directory_active{directory=\"first\"")
            .await?,
        1.0
    );

    let pool = sqlx::PgPool::connect(&a.primary.url()).await?;
    let before: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM acme_orders")
        .fetch_one(&pool)
        .await?;

    // The first CA goes down.
    a.pebble.stop();
    let down = Instant::now();
    // A new name: issued by the second CA once the first has failed for 2 s
    // (a handshake in those 2 s may fail; none after). Meanwhile the name
    // already served keeps working on every handshake.
    let mut kept_handshakes = 0;
    loop {
        assert!(
            down.elapsed() < Duration::from_secs(30),
            "no certificate from the second CA\n{}",
            a.edges[0].proc.log()
        );
        assert_eq!(
            curl(&both, "kept.example", port),
            ok(),
            "a served name failed"
        );
        kept_handshakes += 1;
        if curl(&second_root, "new-during.example", port) == ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        down.elapsed() >= Duration::from_secs(2),
        "orders moved before the first CA had failed for 2 s"
    );
    // Once switched, a new name's first handshake succeeds.
    assert_eq!(curl(&second_root, "after-switch.example", port), ok());
    // The served name's renewal falls due while the first CA is down: the
    // second renews it, with no failed handshake.
    loop {
        assert!(
            down.elapsed() < Duration::from_secs(80),
            "not renewed by the second CA\n{}",
            a.edges[0].proc.log()
        );
        assert_eq!(
            curl(&both, "kept.example", port),
            ok(),
            "a handshake failed"
        );
        kept_handshakes += 1;
        if curl(&second_root, "kept.example", port) == ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(kept_handshakes > 5, "{kept_handshakes}");
    let edge = &a.edges[0];
    assert_eq!(
        edge.metric("edgefront_tls_certificates_by_issuer{issuer=\"second\"")
            .await?,
        3.0
    );
    assert_eq!(
        edge.metric("edgefront_tls_certificates_by_issuer{issuer=\"first\"")
            .await?,
        0.0
    );
    assert_eq!(
        edge.metric("edgefront_acme_directory_active{directory=\"second\"")
            .await?,
        1.0
    );
    let issuers: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT hostname, issuer FROM certificates ORDER BY hostname")
            .fetch_all(&pool)
            .await?;
    assert_eq!(
        issuers,
        vec![
            ("after-switch.example".to_owned(), Some("second".to_owned())),
            ("kept.example".to_owned(), Some("second".to_owned())),
            ("new-during.example".to_owned(), Some("second".to_owned())),
        ]
    );
    // Every order that reached a CA went to the second and is valid; the
    // attempts the first CA never answered cost nothing; nothing is held
    // against the store.
    let second_url = &a.fallback.as_ref().context("fallback")?.directory;
    let orders: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT hostname, directory, outcome FROM acme_orders WHERE id > $1 ORDER BY id",
    )
    .bind(before)
    .fetch_all(&pool)
    .await?;
    assert!(
        orders.len() >= 2
            && orders
                .iter()
                .all(|(_, dir, outcome)| dir == second_url && outcome == "valid"),
        "{orders:?}"
    );
    let paused: i64 = sqlx::query_scalar("SELECT count(*) FROM acme_store_pauses")
        .fetch_one(&pool)
        .await?;
    assert_eq!(paused, 0);

    // The first CA comes back (new root, accounts forgotten): after its
    // probe interval, new orders go to it again.
    a.pebble.restart()?;
    let back_root = a.pebble.issuing_root()?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    eventually(
        Duration::from_secs(30),
        "a certificate from the first CA again",
        || async { (curl(&back_root, "after.example", port) == ok()).then_some(()) },
    )
    .await?;
    assert_eq!(
        a.edges[0]
            .metric("edgefront_acme_directory_active{directory=\"first\"")
            .await?,
        1.0
    );
    assert_eq!(curl(&second_root, "kept.example", port), ok());
    pool.close().await;
    Ok(())
}
