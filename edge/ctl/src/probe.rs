//! Minimal HTTP/1.1 for the drill's shoppers: one GET at a time on a
//! persistent connection, timed, like a browser tab. A response with
//! `Connection: close` (a draining region) ends the connection, and the next
//! request opens a new one, which follows the route of that moment.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The outcome of one request.
#[derive(Debug, Clone)]
pub struct Probe {
    pub status: u16,
    /// `x-edge-route` of the answer.
    pub region: Option<String>,
    /// Time to the first response byte (including connecting, if it did).
    pub ttfb: Duration,
    pub total: Duration,
    /// Whether this request opened a new connection.
    pub new_connection: bool,
}

fn invalid(msg: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_owned())
}

/// A shopper's connection to one address.
pub struct Shopper {
    addr: SocketAddr,
    host: String,
    timeout: Duration,
    conn: Option<TcpStream>,
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
            conn: None,
            keep_alive: true,
            last_reused: false,
            last_got_bytes: false,
        }
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
            self.conn = Some(s);
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
        let (mut region, mut length, mut close) = (None, None, !self.keep_alive);
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("x-edge-route") {
                    region = Some(v.to_owned());
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
