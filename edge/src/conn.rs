//! Connection guard in front of the shopper listeners: a cap on open
//! connections per client address, and a deadline for each request's
//! headers (the slow-client defence pingora does not have: its read timeout
//! is per read, so a client sending a byte a minute holds a connection for
//! ever).
//!
//! [`Guard`] wraps pingora's HTTP app and hands it each accepted stream
//! wrapped in [`Guarded`], which
//! - holds the address's connection slot until the stream is dropped;
//! - over HTTP/1.x, fails a read once a request's headers have taken longer
//!   than the deadline: from the accept for the first request, from its
//!   first byte for the next ones on a keep-alive connection. The end of the
//!   headers is the first blank line (`\r\n\r\n`); a body and the time
//!   between requests are pingora's timeouts' business. An interim answer
//!   (`100 Continue`) does not end the request: the body that follows is not
//!   timed;
//! - over HTTP/2 (ALPN `h2`), fails a read if the client preface (24 bytes)
//!   has not arrived within the deadline from the accept; after it, frames
//!   interleave and nothing is timed here (pingora's `h2_idle_timeout`
//!   closes a connection with no stream).
//!
//! Keyed by the connection's peer address (never a header); IPv6 by /64
//! ([`crate::limits::client_key`]).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::limits::client_key;
use crate::metrics::Metrics;

/// Open connections per client address.
#[derive(Default)]
pub struct Slots {
    open: Mutex<HashMap<IpAddr, u32>>,
}

impl Slots {
    /// A slot for `ip`, or `None` when it already holds `max`.
    pub fn take(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<Slot> {
        let key = client_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            key,
        })
    }

    /// [`Slots::take`], or — refused — the refusal counted and logged.
    pub fn take_or_refuse(
        self: &Arc<Self>,
        ip: IpAddr,
        max: u32,
        metrics: &Metrics,
    ) -> Option<Slot> {
        let slot = self.take(ip, max);
        if slot.is_none() {
            metrics
                .connections_refused
                .with_label_values(&["per_address"])
                .inc();
            tracing::debug!(client = %ip, max, reason = "too many open connections from this address", "connection refused");
        }
        slot
    }

    /// Addresses holding at least one connection.
    pub fn addresses(&self) -> usize {
        self.open.lock().map_or(0, |o| o.len())
    }
}

/// One open connection of an address; released on drop.
pub struct Slot {
    slots: Arc<Slots>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// A slot riding on a TLS connection from before its handshake: set as the
/// accepted L4 stream's tracer by the pre-TLS hook, so a connection still in
/// its handshake (which pingora bounds at 60 s, not the guard) counts
/// against its address's cap like any other, and the slot goes when pingora
/// drops the stream — a failed handshake at once, a served connection at its
/// end. The guard then takes no second slot for it.
pub struct HandshakeSlot(Mutex<Option<Slot>>);

impl HandshakeSlot {
    /// A tracer for pingora's stream holding `slot`.
    pub fn tracer(slot: Slot) -> pingora::upstreams::peer::Tracer {
        pingora::upstreams::peer::Tracer(Box::new(HandshakeSlot(Mutex::new(Some(slot)))))
    }
}

impl fmt::Debug for HandshakeSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandshakeSlot")
    }
}

impl pingora::upstreams::peer::Tracing for HandshakeSlot {
    fn on_connected(&self) {}
    fn on_disconnected(&self) {
        // Released here too, not only when the tracer is dropped.
        drop(self.0.lock().map(|mut s| s.take()));
    }
    fn boxed_clone(&self) -> Box<dyn pingora::upstreams::peer::Tracing> {
        // A clone holds nothing: the connection's one slot stays with it.
        Box::new(HandshakeSlot(Mutex::new(None)))
    }
}

/// The guard's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_per_address: u32,
}

/// Pingora's app `A` behind the guard.
pub struct Guard<A> {
    pub inner: Arc<A>,
    pub slots: Arc<Slots>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// The drain switch: pingora's app is handed the drain signal as its
    /// shutdown watch, so a drain sends every HTTP/2 connection a GOAWAY
    /// (and turns HTTP/1.1 keep-alive off), while the process keeps running.
    pub traffic: Arc<crate::traffic::Traffic>,
    /// Whether the server's own shutdown is wired to the drain signal yet.
    pub hooked: std::sync::atomic::AtomicBool,
    /// TLS connections took their slot before the handshake (the pre-TLS
    /// hook's [`HandshakeSlot`]): the guard takes none for them.
    pub tls_slotted: bool,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guard<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The server's shutdown is a drain that never ends (wired once).
        if !self.hooked.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let (mut server, traffic) = (shutdown.clone(), self.traffic.clone());
            tokio::spawn(async move {
                if server.wait_for(|stop| *stop).await.is_ok() {
                    traffic.set_stopping();
                }
            });
        }
        let signal = self.traffic.signal();
        // Pingora 0.9's HTTP app keeps a connection for its keep-alive
        // requests itself; should a stream come back, it is guarded already.
        if stream.as_any().is::<Guarded>() {
            return self.inner.process_new(stream, &signal).await;
        }
        let ip = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let counted = self.tls_slotted && stream.get_ssl().is_some();
        let slot = match ip.filter(|_| !counted) {
            Some(ip) => Some(self.slots.take_or_refuse(
                ip,
                self.limits.max_per_address,
                &self.metrics,
            )?),
            None => None,
        };
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let guarded = Guarded {
            inner: stream,
            _slot: slot,
            phase: if h2 {
                Phase::Preface(0)
            } else {
                Phase::Headers
            },
            tail: [0; 3],
            deadline: Some(Box::pin(tokio::time::sleep(self.limits.header_timeout))),
            timeout: self.limits.header_timeout,
            metrics: self.metrics.clone(),
        };
        self.inner.process_new(Box::new(guarded), &signal).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Where an HTTP/1.x connection is in its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request's headers: the deadline runs.
    Headers,
    /// Headers read; a body, the answer.
    Answering,
    /// The answer went out; the next request's first byte starts the clock.
    Idle,
    /// HTTP/2: bytes of the client preface read so far; the deadline runs
    /// until all of it is in, and then never again.
    Preface(usize),
}

/// The HTTP/2 client connection preface's length (RFC 9113 §3.4).
const H2_PREFACE_LEN: usize = 24;

/// An accepted stream under the guard.
pub struct Guarded {
    inner: Stream,
    _slot: Option<Slot>,
    phase: Phase,
    /// The last bytes read while in `Headers` (a blank line split over reads).
    tail: [u8; 3],
    /// The headers' (or HTTP/2 preface's) deadline (`None`: an HTTP/2
    /// connection past its preface, not timed).
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Guarded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

/// Whether `data`, after the three bytes `tail` that preceded it, holds the
/// end of a header block (a blank line: `\r\n\r\n`, or `\n\n` from clients
/// ending lines with a bare LF, which parsers accept); updates `tail`.
fn ends_headers(tail: &mut [u8; 3], data: &[u8]) -> bool {
    let mut window = *tail;
    for &b in data {
        if b == b'\n' && (window == *b"\r\n\r" || window[2] == b'\n') {
            *tail = [0; 3];
            return true;
        }
        window = [window[1], window[2], b];
    }
    *tail = window;
    false
}

impl Guarded {
    /// Notes a write: an answer (not an interim `1xx`, after which the
    /// client sends the body) ends the request; the next byte read starts
    /// the next one's clock.
    fn wrote(&mut self, data: &[u8]) {
        let interim = data.len() > 9 && data.starts_with(b"HTTP/1.") && data[9] == b'1';
        if self.phase == Phase::Answering && !interim {
            self.phase = Phase::Idle;
        }
    }

    /// Notes what a read brought in.
    fn saw(&mut self, data: &[u8]) {
        if data.is_empty() || self.deadline.is_none() {
            return;
        }
        if let Phase::Preface(n) = self.phase {
            let n = n + data.len();
            self.phase = Phase::Preface(n.min(H2_PREFACE_LEN));
            if n >= H2_PREFACE_LEN {
                self.deadline = None;
            }
            return;
        }
        if self.phase == Phase::Idle {
            self.phase = Phase::Headers;
            self.tail = [0; 3];
            if let Some(d) = self.deadline.as_mut() {
                d.as_mut().reset(tokio::time::Instant::now() + self.timeout);
            }
        }
        if self.phase == Phase::Headers && ends_headers(&mut self.tail, data) {
            self.phase = Phase::Answering;
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.phase, Phase::Headers | Phase::Preface(_))
            && let Some(d) = this.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            this.metrics
                .connections_refused
                .with_label_values(&["header_timeout"])
                .inc();
            tracing::debug!(timeout = ?this.timeout, reason = "request headers not received in time", "connection closed");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("request headers not complete within {:?}", this.timeout),
            )));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.saw(&buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.wrote(buf);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            this.wrote(first);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_headers_is_found_across_reads() {
        let mut tail = [0; 3];
        assert!(!ends_headers(&mut tail, b"GET / HTTP/1.1\r\nHost: a\r\n"));
        assert!(!ends_headers(&mut tail, b"\r"));
        assert!(ends_headers(&mut tail, b"\nbody"));
        let mut tail = [0; 3];
        assert!(ends_headers(&mut tail, b"GET / HTTP/1.1\r\n\r\n"));
        let mut tail = [0; 3];
        assert!(!ends_headers(&mut tail, b"a\r\nb\r\n"));
        let mut tail = [0; 3];
        assert!(
            ends_headers(&mut tail, b"GET / HTTP/1.1\nHost: a\n\n"),
            "bare LF"
        );
    }

    #[test]
    fn slots_are_per_address_and_released_on_drop() {
        let slots = Arc::new(Slots::default());
        let a: IpAddr = "198.51.100.1".parse().expect("ip");
        let b: IpAddr = "198.51.100.2".parse().expect("ip");
        let one = slots.take(a, 2).expect("first");
        let two = slots.take(a, 2).expect("second");
        assert!(slots.take(a, 2).is_none(), "third over the cap");
        assert!(slots.take(b, 2).is_some(), "another address");
        drop(one);
        assert!(slots.take(a, 2).is_some(), "released");
        drop(two);
        // IPv6 by /64.
        let x: IpAddr = "2001:db8::1".parse().expect("ip");
        let y: IpAddr = "2001:db8::2".parse().expect("ip");
        let _x = slots.take(x, 1).expect("x");
        assert!(slots.take(y, 1).is_none(), "same /64");
    }
}
