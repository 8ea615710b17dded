//! Traffic accounting and drain state of one edge.
//!
//! Every request holds an [`InFlight`] guard from the moment Pingora creates
//! its context until the context is dropped, so `in_flight` counts requests
//! still being answered whatever path they took (page, proxy, error).
//! Draining turns keep-alive off: HTTP/1.1 responses carry
//! `Connection: close`, so clients open a new connection for their next
//! request, which lands wherever BGP sends it once the route is withdrawn.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// Shared counters and the drain switch.
#[derive(Debug, Default)]
pub struct Traffic {
    draining: AtomicBool,
    in_flight: AtomicI64,
    total: AtomicU64,
}

/// Decrements the in-flight count when the request's context is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Traffic>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
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
        self.draining.swap(on, Ordering::SeqCst)
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
        assert!(!t.set_draining(true));
        assert!(t.draining());
        assert!(t.set_draining(false));
    }
}
