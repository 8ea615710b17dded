//! Traffic accounting and drain state of one edge.
//!
//! Every request holds an [`InFlight`] guard from the moment Pingora creates
//! its context until the context is dropped, so `in_flight` counts requests
//! still being answered whatever path they took (page, proxy, error).
//! Draining turns keep-alive off: HTTP/1.1 responses carry
//! `Connection: close`, so clients open a new connection for their next
//! request, which lands wherever BGP sends it once the route is withdrawn.
//! HTTP/2 connections get a GOAWAY: the drain signal ([`Traffic::signal`])
//! is the shutdown watch pingora's HTTP/2 accept loop reacts to (through
//! [`crate::conn::Guard`]), so each connection stops taking new streams,
//! finishes the ones in flight, and closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};

/// Shared counters and the drain switch.
#[derive(Debug)]
pub struct Traffic {
    draining: AtomicBool,
    in_flight: AtomicI64,
    total: AtomicU64,
    /// True while draining or once the process is stopping.
    signal: tokio::sync::watch::Sender<bool>,
    stopping: AtomicBool,
    /// Warm-ups of the start still running (domain set, the proxy's pools).
    warming: AtomicUsize,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            draining: AtomicBool::new(false),
            in_flight: AtomicI64::new(0),
            total: AtomicU64::new(0),
            signal: tokio::sync::watch::Sender::new(false),
            stopping: AtomicBool::new(false),
            warming: AtomicUsize::new(0),
        }
    }
}

/// Decrements the in-flight count when the request's context is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Traffic>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One warm-up of the start; over when dropped, however it ends.
#[derive(Debug)]
pub struct Warming(Arc<Traffic>);

impl Drop for Warming {
    fn drop(&mut self) {
        self.0.warming.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Traffic {
    /// Counts a new request; keep the guard for its lifetime.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Starts or stops draining; returns the previous state.
    pub fn set_draining(&self, on: bool) -> bool {
        let was = self.draining.swap(on, Ordering::SeqCst);
        self.publish();
        was
    }

    /// The process is shutting down: like a drain that never ends.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.publish();
    }

    /// Sets the signal from both flags, read under the watch's lock (no
    /// undrain racing a stop can clear it), and notifies only when it flips:
    /// every notification sends each HTTP/2 connection a GOAWAY.
    fn publish(&self) {
        self.signal.send_if_modified(|v| {
            let now = self.draining.load(Ordering::SeqCst) || self.stopping.load(Ordering::SeqCst);
            std::mem::replace(v, now) != now
        });
    }

    /// A watch for one connection: it changes when a drain starts (or the
    /// process stops). Taken while draining, it reads as changed already,
    /// so a connection opened during a drain is told at once.
    pub fn signal(&self) -> tokio::sync::watch::Receiver<bool> {
        let mut rx = self.signal.subscribe();
        if *rx.borrow() {
            rx.mark_changed();
        }
        rx
    }

    /// Registers a warm-up of the start: `/healthz` says `warming_up` until
    /// every returned guard is dropped (done or given up), so the hook
    /// announces a warm edge. Taken while the server is built, before
    /// anything can ask.
    pub fn warm_up(self: &Arc<Self>) -> Warming {
        self.warming.fetch_add(1, Ordering::SeqCst);
        Warming(self.clone())
    }

    /// Every warm-up of the start is over.
    pub fn warmed(&self) -> bool {
        self.warming.load(Ordering::SeqCst) == 0
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Requests being answered now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests since start.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_requests_in_flight() {
        let t = Arc::new(Traffic::default());
        let a = t.begin();
        let b = t.begin();
        assert_eq!((t.in_flight(), t.total()), (2, 2));
        drop(a);
        assert_eq!(t.in_flight(), 1);
        drop(b);
        assert_eq!((t.in_flight(), t.total()), (0, 2));
        let idle = t.signal();
        assert!(!idle.has_changed().unwrap_or(true));
        assert!(!t.set_draining(true));
        assert!(t.draining());
        assert!(
            idle.has_changed().unwrap_or(false),
            "a drain changes the signal"
        );
        let during = t.signal();
        assert!(during.has_changed().unwrap_or(false), "told at once");
        let quiet = t.signal();
        assert!(t.set_draining(false));
        assert!(!*t.signal().borrow());
        assert!(!t.set_draining(false));
        let mut after = t.signal();
        assert!(
            !after.has_changed().unwrap_or(true),
            "an undrain of an undrained edge changes nothing"
        );
        let _ = after.borrow_and_update();
        let _ = quiet;
        t.set_stopping();
        assert!(!t.set_draining(false));
        assert!(*t.signal().borrow(), "stopping outlasts an undrain");
    }
}
