//! `edgefront-bench-tls`: TLS handshakes per second against one or more
//! servers, full and resumed, with a rustls (ring) client that sends SNI and
//! verifies the chain. Each worker thread loops connect → handshake → one
//! `HEAD /` (`Connection: close`) → close for a fixed time (bounded). Prints a
//! markdown table.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use rustls::client::Resumption;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Servers as `label=host:port` (repeatable).
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Name to send as SNI and verify.
    #[arg(long)]
    sni: String,
    /// CA certificate (PEM) to trust.
    #[arg(long)]
    ca: std::path::PathBuf,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// TLS version: 13 or 12.
    #[arg(long, default_value_t = 13)]
    tls: u8,
}

fn config(ca: &std::path::Path, tls: u8, resume: bool) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let versions: &[&rustls::SupportedProtocolVersion] = if tls == 12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.resumption = if resume {
        Resumption::in_memory_sessions(64)
    } else {
        Resumption::disabled()
    };
    Ok(Arc::new(cfg))
}

/// One handshake; returns whether it was resumed.
fn handshake(
    addr: &str,
    sni: &ServerName<'static>,
    cfg: &Arc<rustls::ClientConfig>,
) -> Result<bool> {
    let mut sock = TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut conn = rustls::ClientConnection::new(cfg.clone(), sni.clone())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    // One small request per connection, read to the end: TLS 1.3 session
    // tickets (sent after the handshake) have arrived by then, for every server
    // alike, without guessing a wait.
    let host = match sni {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        _ => String::new(),
    };
    conn.writer().write_all(
        format!("HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let mut buf = [0u8; 4096];
    loop {
        match std::io::Read::read(&mut tls, &mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            // Some servers close without close_notify after `Connection: close`.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
}

fn measure(addr: &str, cli: &Cli, resume: bool) -> Result<(f64, u64, u64)> {
    let sni = ServerName::try_from(cli.sni.clone())?;
    let deadline = Instant::now() + Duration::from_secs(cli.seconds);
    let start = Instant::now();
    let results: Vec<Result<(u64, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..cli.threads)
            .map(|_| {
                let sni = sni.clone();
                s.spawn(move || -> Result<(u64, u64)> {
                    let cfg = config(&cli.ca, cli.tls, resume)?;
                    // Prime the session cache.
                    handshake(addr, &sni, &cfg)?;
                    let (mut n, mut resumed) = (0u64, 0u64);
                    while Instant::now() < deadline && n < 10_000_000 {
                        if handshake(addr, &sni, &cfg)? {
                            resumed += 1;
                        }
                        n += 1;
                    }
                    Ok((n, resumed))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
            })
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let (mut n, mut r) = (0, 0);
    for res in results {
        let (a, b) = res?;
        n += a;
        r += b;
    }
    Ok((n as f64 / secs, n, r))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    println!(
        "| server | TLS 1.{} full handshakes/s | resumed handshakes/s | resumed share |",
        if cli.tls == 12 { 2 } else { 3 }
    );
    println!("|---|---|---|---|");
    for t in &cli.targets {
        let (label, addr) = t
            .split_once('=')
            .context("target must be label=host:port")?;
        let (full, n_full, r_full) = measure(addr, &cli, false)?;
        if r_full != 0 {
            bail!("{label}: {r_full} of {n_full} 'full' handshakes resumed");
        }
        let (res, n_res, r_res) = measure(addr, &cli, true)?;
        println!(
            "| {label} | {full:.0} | {res:.0} | {:.0} % of {n_res} |",
            100.0 * r_res as f64 / n_res.max(1) as f64
        );
    }
    Ok(())
}
