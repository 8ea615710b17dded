//! edge-ctl's library: the lab's state file and teardown, entering network
//! namespaces, the health-hook API client, a minimal HTTP probe for
//! shopper traffic, the failover drill, and the database cluster's view. The `edge-ctl` binary is a thin
//! command-line layer over it; the lab builder (`edgefront-lab`) writes the
//! state file this crate reads.

pub mod client;
pub mod dashboard;
pub mod database;
pub mod drill;
pub mod lab;
pub mod origin_drill;
pub mod probe;
