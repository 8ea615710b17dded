//! The region health hook: a daemon beside the edge (a separate process, so
//! an edge crash still withdraws) that decides whether the region announces
//! the anycast route, and drives BIRD over its control socket.
//!
//! [`bird`] speaks BIRD's control protocol, [`daemon`] probes, applies
//! hysteresis and drains, [`decision`] is the rule that announces or
//! withdraws (lag every region shares never withdraws them all), [`peers`]
//! reads the other regions' hooks for it, [`api`] is the authenticated admin
//! API that `edge-ctl` and the peers use, [`conns`] counts the edge's open
//! connections, [`steer`] keeps returning shoppers' connections to another
//! region working (second-chance forwarding), [`secrets`] holds the tokens
//! (a reload reads them again).

pub mod api;
pub mod bird;
pub mod conns;
pub mod daemon;
pub mod decision;
pub mod metrics;
pub mod peers;
pub mod secrets;
pub mod steer;
