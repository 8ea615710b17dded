//! `edgefront-bench-tls-memory`: edge resident memory with N certificates
//! loaded. Registers N domains with sealed certificates (one test CA), starts
//! an edge with TLS, handshakes each name once (so each is loaded from the
//! replica into memory), and reports RSS before and after. Loopback only.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use edgefront_tests::{Edge, Origin, Postgres, TestCa, free_port};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

const CERT_KEY: &str = "7e1f0a9d2c3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f708192a3b4c5d6e7f";

#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Number of certificates.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let platform = edgefront_regions::Regions::builtin()?
        .network
        .platform_domain;
    let primary = Postgres::primary()?;
    let origin = Origin::start(&primary.url(), &platform)?;
    let pool = sqlx::PgPool::connect(&primary.url()).await?;
    let store: i64 = sqlx::query_scalar(
        "INSERT INTO stores (slug, name, currency, token_hash) VALUES ('many', 'Many Domains', 'USD', '\\x00') RETURNING id",
    )
    .fetch_one(&pool)
    .await?;
    let ca = TestCa::new()?;
    let sealer = edgefront_certs::Sealer::from_hex(CERT_KEY)?;
    let t0 = Instant::now();
    let mut names = Vec::with_capacity(cli.count);
    for chunk in (0..cli.count).collect::<Vec<_>>().chunks(500) {
        let mut tx = pool.begin().await?;
        for i in chunk {
            let name = format!("shop-{i}.example");
            let (chain, key) = ca.leaf(&[name.as_str()])?;
            let (nonce, ct) = sealer.seal(&name, key.as_bytes())?;
            sqlx::query("INSERT INTO domains (hostname, store_id) VALUES ($1, $2)")
                .bind(&name)
                .bind(store)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO certificates (hostname, chain_pem, key_nonce, key_ciphertext, not_after)
                 VALUES ($1, $2, $3, $4, now() + interval '90 days')",
            )
            .bind(&name)
            .bind(&chain)
            .bind(nonce)
            .bind(ct)
            .execute(&mut *tx)
            .await?;
            names.push(name);
        }
        tx.commit().await?;
    }
    let setup = t0.elapsed();
    let replica = primary.replica("bom1")?;
    let tls_port = free_port();
    let edge = Edge::builder("bom1", &replica.url(), origin.addr)
        .arg("--tls-listen")
        .arg(&format!("127.0.0.1:{tls_port}"))
        .arg("--cert-key")
        .arg(CERT_KEY)
        .run()?;
    let rpool = sqlx::PgPool::connect(&replica.url()).await?;
    edgefront_tests::eventually(
        Duration::from_secs(60),
        "certificates replicated",
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM certificates")
                .fetch_one(&rpool)
                .await
                .ok()?;
            (n as usize == cli.count).then_some(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = edgefront_tests::rss_kib(edge.proc.pid());

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
        roots.add(c?)?;
    }
    let cfg = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let t1 = Instant::now();
    let mut failed = 0;
    for name in &names {
        let sni = ServerName::try_from(name.clone())?;
        let ok = (|| -> Result<()> {
            let mut sock = TcpStream::connect(("127.0.0.1", tls_port))?;
            sock.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut conn = rustls::ClientConnection::new(cfg.clone(), sni)?;
            while conn.is_handshaking() {
                conn.complete_io(&mut sock)?;
            }
            conn.send_close_notify();
            let _ = conn.write_tls(&mut sock);
            let _ = sock.flush();
            Ok(())
        })();
        if ok.is_err() {
            failed += 1;
        }
    }
    let handshakes = t1.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = edgefront_tests::rss_kib(edge.proc.pid());
    let loaded = edge.metric("edgefront_tls_certificates{").await?;
    println!(
        "## Edge memory with {} certificates — run of the bench on this machine\n",
        cli.count
    );
    println!(
        "Command: `target/release/edgefront-bench-tls-memory --count {}` (ECDSA P-256 leaves from one test CA, sealed keys in PostgreSQL; \
         each name handshaken once so it is loaded from the replica into memory).\n",
        cli.count
    );
    println!("| | value |\n|---|---|");
    println!(
        "| setup (keys, certs, sealed rows) | {:.1} s |",
        setup.as_secs_f64()
    );
    println!(
        "| first-sight handshakes (load from replica + handshake), sequential | {:.1} s ({:.0}/s), {} failed |",
        handshakes.as_secs_f64(),
        names.len() as f64 / handshakes.as_secs_f64(),
        failed
    );
    println!("| certificates in memory (metric) | {loaded:.0} |");
    println!(
        "| edge RSS before / after | {} MiB / {} MiB |",
        before / 1024,
        after / 1024
    );
    println!(
        "| per certificate | {:.1} KiB |",
        (after.saturating_sub(before)) as f64 / cli.count as f64
    );
    drop(edge);
    Ok(())
}
