//! A minimal HTTP/1.1 GET over a fresh TCP connection, timed: what one
//! shopper request is in the drill. No pooling on purpose: every request
//! opens a new connection, so it follows the route of that moment.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The outcome of one request.
#[derive(Debug, Clone)]
pub struct Probe {
    pub status: u16,
    /// `x-edge-route` of the answer.
    pub region: Option<String>,
    /// Time to the first response byte.
    pub ttfb: Duration,
    pub total: Duration,
}

/// GETs `path` from `addr` with `Host: host`; `timeout` bounds each step.
pub fn get(addr: SocketAddr, host: &str, path: &str, timeout: Duration) -> std::io::Result<Probe> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: edge-ctl-drill\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut chunk = [0u8; 16 * 1024];
    let mut ttfb = None;
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        ttfb.get_or_insert_with(|| start.elapsed());
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 8 << 20 {
            break;
        }
    }
    let total = start.elapsed();
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "no complete response head")
        })?;
    let head = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad status line"))?;
    let mut region = None;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("x-edge-route") {
                region = Some(v.trim().to_owned());
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    if let Some(len) = length
        && buf.len() - head_end - 4 < len
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "response body cut short",
        ));
    }
    Ok(Probe {
        status,
        region,
        ttfb: ttfb.unwrap_or(total),
        total,
    })
}
