//! What every handler shares: [`AppState`].

use sqlx::PgPool;

use crate::{budget, ownership};

/// Shared state of the origin's handlers.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    /// `/healthz`'s own connections ([`HEALTH_CONNECTIONS`]): requests
    /// waiting for `pool` never make this origin say its database does not
    /// lead. Every edge's health check asks that question; a busy pool
    /// answering "down" made every edge refuse every write at once, and the
    /// retries that followed kept the pool busy (the origin failover drill,
    /// CI 2026-12-07).
    pub health_pool: PgPool,
    /// Stores without a custom domain are at `<slug>.<platform_domain>`.
    pub platform_domain: String,
    /// Token of the internal API; `None` disables it.
    pub internal_token: Option<String>,
    /// Seals certificate private keys; `None` disables certificate upload.
    pub sealer: Option<std::sync::Arc<edgefront_certs::Sealer>>,
    /// ACME order budgets.
    pub budgets: budget::Budgets,
    /// Management API of the DNS server of the platform zone (DNS-01 for
    /// the platform wildcard); `None` turns DNS-01 off.
    pub dns_update_url: Option<String>,
    /// Looks up custom-domain ownership proofs.
    pub verifier: std::sync::Arc<ownership::Verifier>,
}
