//! Minimal HTTP/1.1 for the drill's shoppers: one GET at a time on a
//! persistent connection (plain or TLS), timed, like a browser tab. A
//! response with `Connection: close` (a draining region) ends the
//! connection, and the next request opens a new one, which follows the
//! route of that moment.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

/// The outcome of one request.
#[derive(Debug, Clone)]
pub struct Probe {
    pub status: u16,
    /// `x-edge-route` of the answer.
    pub region: Option<String>,
    /// `Location` of the answer (a redirect's target).
    pub location: Option<String>,
    /// Time to the first response byte (including connecting, if it did).
    pub ttfb: Duration,
    pub total: Duration,
    /// Whether this request opened a new connection.
    pub new_connection: bool,
}

/// A reset, broken pipe or early close: how a reused connection whose flow
/// now lands on another region (which has no state for it), or that the
/// server closed as the request went out, fails.
pub fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionAborted
    )
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_owned())
}

/// A TLS client that trusts only the CA certificates in `ca_pem` (the lab's
/// CA for its storefront names) and offers `alpn`.
pub fn tls_client(ca_pem: &Path, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca_pem)
        .with_context(|| ca_pem.display().to_string())?
    {
        roots.add(c.with_context(|| ca_pem.display().to_string())?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A shopper's connection: plain TCP, or TLS over it.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// A shopper's connection to one address.
pub struct Shopper {
    addr: SocketAddr,
    host: String,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
    conn: Option<Conn>,
    /// Keep connections open between requests.
    pub keep_alive: bool,
    /// Whether the last request went out on a reused connection.
    pub last_reused: bool,
    /// Whether the last request got any response byte.
    pub last_got_bytes: bool,
}

impl Shopper {
    pub fn new(addr: SocketAddr, host: &str, timeout: Duration) -> Shopper {
        Shopper {
            addr,
            host: host.to_owned(),
            timeout,
            tls: None,
            conn: None,
            keep_alive: true,
            last_reused: false,
            last_got_bytes: false,
        }
    }

    /// Speaks TLS (SNI: the host) with this client configuration.
    pub fn with_tls(mut self, cfg: Arc<rustls::ClientConfig>) -> Shopper {
        self.tls = Some(cfg);
        self
    }

    /// GETs `path`. On any error the connection is dropped.
    pub fn get(&mut self, path: &str) -> std::io::Result<Probe> {
        let r = self.try_get(path);
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn try_get(&mut self, path: &str) -> std::io::Result<Probe> {
        let start = Instant::now();
        let new_connection = self.conn.is_none();
        self.last_reused = !new_connection;
        self.last_got_bytes = false;
        if new_connection {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            s.set_nodelay(true)?;
            self.conn = Some(match &self.tls {
                None => Conn::Plain(s),
                Some(cfg) => {
                    let name = rustls_pki_types::ServerName::try_from(self.host.clone())
                        .map_err(|_| invalid("host is not a TLS name"))?;
                    let mut c = rustls::ClientConnection::new(cfg.clone(), name)
                        .map_err(std::io::Error::other)?;
                    let mut s = s;
                    // The handshake now, so its failures are the connection's.
                    while c.is_handshaking() {
                        c.complete_io(&mut s)?;
                    }
                    Conn::Tls(Box::new(rustls::StreamOwned::new(c, s)))
                }
            });
        }
        let Some(s) = self.conn.as_mut() else {
            return Err(invalid("no connection"));
        };
        let conn_hdr = if self.keep_alive {
            "keep-alive"
        } else {
            "close"
        };
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: edge-ctl-drill\r\nAccept-Encoding: identity\r\nConnection: {conn_hdr}\r\n\r\n",
            self.host
        )?;
        let mut buf = Vec::with_capacity(32 * 1024);
        let mut chunk = [0u8; 16 * 1024];
        let mut ttfb = None;
        let head_end = loop {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before a response",
                ));
            }
            ttfb.get_or_insert_with(|| start.elapsed());
            self.last_got_bytes = true;
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            if buf.len() > 64 * 1024 {
                return Err(invalid("response head too large"));
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| invalid("bad status line"))?;
        let (mut region, mut length, mut close, mut location) =
            (None, None, !self.keep_alive, None);
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("x-edge-route") {
                    region = Some(v.to_owned());
                } else if k.eq_ignore_ascii_case("location") {
                    location = Some(v.to_owned());
                } else if k.eq_ignore_ascii_case("content-length") {
                    length = v.parse::<usize>().ok();
                } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        let mut body = buf.len() - head_end - 4;
        match length {
            Some(len) => {
                while body < len {
                    let n = s.read(&mut chunk)?;
                    if n == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "response body cut short",
                        ));
                    }
                    body += n;
                }
            }
            None => {
                // No length: the body ends with the connection.
                close = true;
                while s.read(&mut chunk)? > 0 {}
            }
        }
        if close {
            self.conn = None;
        }
        Ok(Probe {
            status,
            region,
            location,
            ttfb: ttfb.unwrap_or_default(),
            total: start.elapsed(),
            new_connection,
        })
    }
}

/// One GET on a fresh connection.
pub fn get(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> std::io::Result<Probe> {
    let mut s = Shopper::new(addr, host, timeout);
    s.keep_alive = false;
    s.get(path)
}

/// One GET over TLS (SNI: `host`) on a fresh connection.
pub fn get_tls(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<Probe> {
    let mut s = Shopper::new(addr, host, timeout).with_tls(tls);
    s.keep_alive = false;
    s.get(path)
}

/// How one stream of an HTTP/2 page load ended.
#[derive(Debug)]
pub struct StreamOutcome {
    pub result: Result<Probe, String>,
    /// It was sent again on a new connection: the first connection refused
    /// it unprocessed (GOAWAY, `REFUSED_STREAM`), or, reused, failed before
    /// answering it.
    pub retried: bool,
}

/// What went wrong with one stream, and whether a browser would send it
/// again on a new connection.
struct StreamError {
    msg: String,
    retry: bool,
}

/// A browser's HTTP/2 connection over TLS: each page load sends several
/// streams at once on one connection. A GOAWAY ends the connection for new
/// streams; the next page load opens a new one, which follows the route of
/// that moment. Streams the server refused unprocessed — above a GOAWAY's
/// last stream id, or `REFUSED_STREAM` (RFC 9113 §8.7) — and streams of a
/// reused connection that died before answering go once more on a new
/// connection, as browsers do.
pub struct H2Shopper {
    addr: SocketAddr,
    host: String,
    timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
    conn: Option<(
        h2::client::SendRequest<bytes::Bytes>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl H2Shopper {
    /// `tls` must offer ALPN `h2`.
    pub fn new(
        addr: SocketAddr,
        host: &str,
        timeout: Duration,
        tls: Arc<rustls::ClientConfig>,
    ) -> H2Shopper {
        H2Shopper {
            addr,
            host: host.to_owned(),
            timeout,
            tls,
            conn: None,
        }
    }

    async fn connect(
        &self,
    ) -> std::io::Result<(
        h2::client::SendRequest<bytes::Bytes>,
        tokio::task::JoinHandle<()>,
    )> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls_pki_types::ServerName::try_from(self.host.clone())
            .map_err(|_| invalid("host is not a TLS name"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(invalid("the server did not choose HTTP/2"));
        }
        let (send, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((send, driver))
    }

    /// Loads `paths` as concurrent streams on this shopper's connection (a
    /// new one if it has none or it is going away); one outcome per path,
    /// in order.
    pub async fn page(&mut self, paths: &[&str]) -> Vec<StreamOutcome> {
        let start = Instant::now();
        let mut out: Vec<Option<StreamOutcome>> = paths.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..paths.len()).collect();
        for attempt in 0..2 {
            if pending.is_empty() {
                break;
            }
            let retried = attempt > 0;
            let finish = |out: &mut Vec<Option<StreamOutcome>>, i: usize, result| {
                out[i] = Some(StreamOutcome { result, retried });
            };
            if self.conn.as_ref().is_some_and(|(_, d)| d.is_finished()) {
                self.conn = None;
            }
            let new_connection = self.conn.is_none();
            if new_connection {
                let left = self.timeout.saturating_sub(start.elapsed());
                match tokio::time::timeout(left, self.connect()).await {
                    Ok(Ok(c)) => self.conn = Some(c),
                    Ok(Err(e)) => {
                        for i in pending.drain(..) {
                            finish(&mut out, i, Err(e.to_string()));
                        }
                        break;
                    }
                    Err(_) => {
                        for i in pending.drain(..) {
                            finish(&mut out, i, Err("connect timed out".into()));
                        }
                        break;
                    }
                }
            }
            let Some(send) = self.conn.as_ref().map(|(s, _)| s.clone()) else {
                break;
            };
            let mut again = Vec::new();
            let mut streams = Vec::new();
            for i in std::mem::take(&mut pending) {
                let req = http::Request::builder()
                    .uri(format!("https://{}{}", self.host, paths[i]))
                    .header("user-agent", "edge-ctl-drill")
                    .body(())
                    .map_err(|e| e.to_string());
                let sent = match req {
                    Ok(req) => match send.clone().ready().await {
                        Ok(mut s) => s.send_request(req, true).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    Err(e) => Err(e),
                };
                match sent {
                    Ok((resp, _)) => streams.push((i, resp)),
                    // Never sent: the connection is going away.
                    Err(_) if !retried => again.push(i),
                    Err(e) => finish(&mut out, i, Err(e)),
                }
            }
            let left = self.timeout.saturating_sub(start.elapsed());
            let answers = futures_util::future::join_all(streams.into_iter().map(|(i, resp)| {
                let reused = !new_connection;
                async move {
                    let r = tokio::time::timeout(
                        left,
                        read_stream(resp, start, new_connection, reused),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(StreamError {
                            msg: "timed out".into(),
                            retry: false,
                        })
                    });
                    (i, r)
                }
            }))
            .await;
            let mut done_with_conn = false;
            for (i, r) in answers {
                match r {
                    Ok(p) => finish(&mut out, i, Ok(p)),
                    Err(e) if e.retry && !retried => again.push(i),
                    Err(e) => {
                        // A connection that lost or timed out a stream is not
                        // trusted with the next page (its peer may be gone).
                        done_with_conn = true;
                        finish(&mut out, i, Err(e.msg))
                    }
                }
            }
            if !again.is_empty() || done_with_conn {
                // This connection is done for new streams.
                self.conn = None;
            }
            pending = again;
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or(StreamOutcome {
                    result: Err("not sent".into()),
                    retried: true,
                })
            })
            .collect()
    }
}

async fn read_stream(
    resp: h2::client::ResponseFuture,
    start: Instant,
    new_connection: bool,
    reused: bool,
) -> Result<Probe, StreamError> {
    // Retried: what the server never took — a stream above the last id of
    // the server's own GOAWAY, or one it refused (REFUSED_STREAM) — and, on
    // a reused connection, a stream lost to a reset or closed connection
    // before any answer (as for HTTP/1.1). A GOAWAY this client raised
    // itself (a protocol error) or any other I/O error is a failure.
    let classify = |e: h2::Error, answered: bool| StreamError {
        retry: !answered
            && e.is_remote()
            && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM))
            || !answered && reused && e.get_io().is_some_and(is_reset),
        msg: e.to_string(),
    };
    let r = resp.await.map_err(|e| classify(e, false))?;
    let ttfb = start.elapsed();
    let status = r.status().as_u16();
    let region = r
        .headers()
        .get("x-edge-route")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = r.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| classify(e, true))?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    Ok(Probe {
        status,
        region,
        location: None,
        ttfb,
        total: start.elapsed(),
        new_connection,
    })
}
