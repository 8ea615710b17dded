//! A TCP link between two fixture processes that a test can cut on purpose:
//! a relay on a loopback port in front of a target address. [`Relay::cut`]
//! partitions like a cut fibre, not like a closed port: nothing is refused
//! and nothing is reset, bytes are swallowed both ways and new connections
//! are accepted and never answered, so each side finds out only by its own
//! timeouts. [`Relay::heal`] closes what was opened or damaged across the
//! cut and lets new connections through again.
//!
//! Threads, one per direction of each connection; every thread ends when the
//! relay is dropped (its sockets are shut down).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;

/// A relay listening on `addr`, forwarding to its target while not cut.
pub struct Relay {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    cut: AtomicBool,
    stopped: AtomicBool,
    /// Every socket of every connection (both ends), to close them.
    open: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn close_all(&self) {
        let open = std::mem::take(&mut *self.open.lock().unwrap_or_else(|p| p.into_inner()));
        for s in open {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn track(&self, s: &TcpStream) {
        if let Ok(c) = s.try_clone() {
            self.open.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        }
    }
}

impl Relay {
    /// A relay on a free loopback port in front of `target`, never on one
    /// of `reserved` (ports picked for servers that have not bound yet: a
    /// relay there would take a server's port, or forward to itself).
    pub fn start(target: SocketAddr, reserved: &[u16]) -> Result<Relay> {
        let mut listener = TcpListener::bind("127.0.0.1:0")?;
        while reserved.contains(&listener.local_addr()?.port()) || listener.local_addr()? == target
        {
            // Bound before the previous one is dropped: another port.
            listener = TcpListener::bind("127.0.0.1:0")?;
        }
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::Builder::new()
            .name(format!("relay-{}", addr.port()))
            .spawn(move || {
                for client in listener.incoming() {
                    if s.stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    s.track(&client);
                    if s.cut.load(Ordering::SeqCst) {
                        // Accepted, never answered: swallow what it sends.
                        let s = s.clone();
                        std::thread::spawn(move || pump(client, None, &s));
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(target) else {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    };
                    s.track(&server);
                    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                        continue;
                    };
                    let (a, b) = (s.clone(), s.clone());
                    std::thread::spawn(move || pump(client, Some(server), &a));
                    std::thread::spawn(move || pump(s2, Some(c2), &b));
                }
            })?;
        Ok(Relay { addr, shared })
    }

    /// Partitions the link: from now on bytes are swallowed both ways and new
    /// connections hang; nothing is closed or reset.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
    }

    /// Heals the link: connections open across the cut are closed (their
    /// streams lost bytes), new ones pass again.
    pub fn heal(&self) {
        // Uncut first: a connection accepted meanwhile is forwarded (and
        // may be closed below, which its client survives), never left
        // swallowing bytes for ever.
        self.shared.cut.store(false, Ordering::SeqCst);
        self.shared.close_all();
    }
}

/// Copies `from` to `to` while the link is up; swallows while it is cut
/// (or when there is nowhere to send). Ends at EOF or an error, closing both.
fn pump(mut from: TcpStream, mut to: Option<TcpStream>, shared: &Shared) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if shared.cut.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(t) = to.as_mut()
            && t.write_all(&buf[..n]).is_err()
        {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    // Across a cut, the other side hears nothing of it either.
    if let Some(t) = to.filter(|_| !shared.cut.load(Ordering::SeqCst)) {
        let _ = t.shutdown(Shutdown::Both);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.close_all();
        // Wakes the accept loop so it sees the stop.
        let _ = TcpStream::connect(self.addr);
    }
}
