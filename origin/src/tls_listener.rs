//! A TLS listener for axum: TCP connections are accepted and their
//! handshakes run concurrently (each bounded in time), so a slow or hostile
//! client never holds up the others; only finished handshakes reach the
//! server. A refused handshake (no client certificate, one from another CA,
//! plaintext) is logged with the peer and the reason and counted.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait to be accepted
/// (the kernel's backlog holds them), so a flood cannot exhaust descriptors.
const MAX_HANDSHAKES: usize = 256;

/// Accepted, handshaken TLS connections of one listening socket.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Serves TLS with `cfg` on `tcp`; `name` labels logs and metrics.
    pub fn new(
        tcp: TcpListener,
        cfg: rustls::ServerConfig,
        name: &'static str,
    ) -> io::Result<Self> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        let (tx, rx) = mpsc::channel(64);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                // Stop (and release the port) once the server is gone.
                let accepted = tokio::select! {
                    a = tcp.accept() => a,
                    () = tx.closed() => return,
                };
                let (sock, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let why = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            crate::metrics::tls_accepted(name);
                            // The client's name costs a certificate parse:
                            // only when it will be logged.
                            if tracing::enabled!(tracing::Level::DEBUG) {
                                let client = tls
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| edgefront_certs::pki::common_name(c));
                                tracing::debug!(listener = name, %peer, client = client.as_deref().unwrap_or("-"), "TLS client accepted");
                            }
                            let _ = tx.send((tls, peer)).await;
                            return;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "handshake timed out".to_owned(),
                    };
                    crate::metrics::tls_refused(name);
                    tracing::warn!(listener = name, %peer, reason = %why, "TLS handshake refused");
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The acceptor task ended: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
