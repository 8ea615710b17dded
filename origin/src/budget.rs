//! ACME budgets: every order, successful or failed, is counted on the primary
//! before it can reach the CA, so no store — and no attacker with free stores —
//! can spend the shared ACME account's limits for everyone else.
//!
//! An order is recorded in the transaction that grants its issuance lease
//! ([`admit`]); the issuer reports how it ended ([`finish`]). Budgets, each
//! below the CA's published limits by default (Let's Encrypt: 300 new orders
//! per account per 3 h, 5 failed validations per hostname per hour, 50
//! certificates per registered domain per week):
//! - per account (each ACME directory's own): orders in the last 3 h; new names may use only the share
//!   not reserved for renewals, so renewals can never be starved by new names;
//! - per hostname: failed orders (and platform-side errors) in the last hour, and after each failure an
//!   exponential backoff with jitter (network-wide, on top of each edge's own);
//! - per registered domain (public-suffix aware, `psl`): new orders in 7 days;
//! - per store: failed orders in 24 h; past it the store is paused for 24 h,
//!   with the reason shown in `GET /api/domains` and counted in metrics.
//!
//! Orders that never reached the CA (it was down, the account could not be
//! loaded) are removed again: they cost the CA nothing.

use std::time::Duration;

use serde::Serialize;
use sqlx::{PgConnection, PgPool};

/// The limits (all per rolling window).
#[derive(Debug, Clone)]
pub struct Budgets {
    /// Orders per ACME account in 3 hours.
    pub account_per_3h: i64,
    /// Percent of `account_per_3h` only renewals may use.
    pub renewal_reserve_percent: i64,
    /// Failed orders per hostname in an hour.
    pub hostname_failures_per_hour: i64,
    /// New orders per registered domain in 7 days.
    pub registered_domain_per_week: i64,
    /// Failed orders per store in 24 hours before it is paused for 24 hours.
    pub store_failures_per_day: i64,
    /// First backoff after a failed order of a hostname (doubles per failure, ≤ 24 h).
    pub failure_backoff: Duration,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            account_per_3h: 250,
            renewal_reserve_percent: 30,
            hostname_failures_per_hour: 3,
            registered_domain_per_week: 40,
            store_failures_per_day: 10,
            failure_backoff: Duration::from_secs(60),
        }
    }
}

/// A failed or abandoned order, as the budgets count it.
const FAILED: &str =
    "(outcome = 'failed' OR (outcome = 'pending' AND started_at < now() - interval '10 minutes'))";

/// Why an order was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// Which budget: `store_paused`, `hostname_backoff`, `hostname_failures`,
    /// `account`, `account_new_names`, `registered_domain`.
    pub budget: &'static str,
    pub reason: String,
}

/// The registrable domain of `hostname` (the public suffix plus one label).
pub fn registered_domain(hostname: &str) -> String {
    let base = hostname.strip_prefix("*.").unwrap_or(hostname);
    psl::domain_str(base).unwrap_or(base).to_owned()
}

/// Records an order for `hostname` if every budget allows it, in `tx` (the
/// lease's transaction): `Ok(id)` of the new order, or the refusal.
pub async fn admit(
    tx: &mut PgConnection,
    b: &Budgets,
    hostname: &str,
    holder: &str,
    directory: &str,
) -> Result<Result<i64, Refusal>, sqlx::Error> {
    // One admission at a time network-wide: the counts below are then exact.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('edgefront-acme-budget'))")
        .execute(&mut *tx)
        .await?;
    let store: Option<i64> = sqlx::query_scalar("SELECT store_id FROM domains WHERE hostname = $1")
        .bind(hostname)
        .fetch_optional(&mut *tx)
        .await?;
    let renewal: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM certificates WHERE hostname = $1)")
            .bind(hostname)
            .fetch_one(&mut *tx)
            .await?;
    let regdom = registered_domain(hostname);
    let refuse = |budget, reason| Ok(Err(Refusal { budget, reason }));
    // Only served names (active claims) and wildcards of the platform are
    // ever ordered: a region whose replica still lists a removed name gets
    // no order from the primary.
    if store.is_none() && !hostname.starts_with("*.") {
        return refuse(
            "not_served",
            format!("{hostname} is not an active custom domain"),
        );
    }
    if let Some(s) = store {
        let paused: Option<(String, String)> = sqlx::query_as(
            "SELECT to_char(paused_until AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), reason
             FROM acme_store_pauses WHERE store_id = $1 AND paused_until > now()",
        )
        .bind(s)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((until, why)) = paused {
            return refuse(
                "store_paused",
                format!("the store's certificate orders are paused until {until}: {why}"),
            );
        }
        // Orders still in flight count as failures here: a burst of
        // concurrent first handshakes cannot overshoot the store's budget.
        let risky: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM acme_orders WHERE store_id = $1
               AND started_at > now() - interval '24 hours'
               AND ({FAILED} OR outcome = 'pending')"
        )))
        .bind(s)
        .fetch_one(&mut *tx)
        .await?;
        if risky >= b.store_failures_per_day {
            return refuse(
                "store_failures",
                format!("{risky} failed or unfinished certificate orders for this store in 24 h"),
            );
        }
    }
    let (backoff_until, host_failures): (Option<String>, i64) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT to_char(max(next_allowed_at) FILTER (WHERE next_allowed_at > now())
                        AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                count(*) FILTER (WHERE ({FAILED} OR (outcome = 'platform_error' AND directory = $2))
                                   AND started_at > now() - interval '1 hour')
         FROM acme_orders WHERE hostname = $1 AND started_at > now() - interval '2 days'"
        )))
        .bind(hostname)
        .bind(directory)
        .fetch_one(&mut *tx)
        .await?;
    if let Some(until) = backoff_until {
        return refuse(
            "hostname_backoff",
            format!("the last order for {hostname} failed; next attempt after {until}"),
        );
    }
    if host_failures >= b.hostname_failures_per_hour {
        return refuse(
            "hostname_failures",
            format!("{host_failures} failed orders for {hostname} in the last hour"),
        );
    }
    let account: i64 = sqlx::query_scalar(
        // Rows without a directory (written before directories were
        // recorded, or by an edge not yet upgraded) count against every one.
        "SELECT count(*) FROM acme_orders WHERE directory IN ($1, '')
           AND started_at > now() - interval '3 hours'",
    )
    .bind(directory)
    .fetch_one(&mut *tx)
    .await?;
    if account >= b.account_per_3h {
        return refuse(
            "account",
            format!("{account} orders in 3 h: the account's budget is spent"),
        );
    }
    let for_new = b.account_per_3h * (100 - b.renewal_reserve_percent) / 100;
    if !renewal && account >= for_new {
        return refuse(
            "account_new_names",
            format!("{account} orders in 3 h: the rest is reserved for renewals"),
        );
    }
    if !renewal {
        let per_domain: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM acme_orders WHERE registered_domain = $1 AND NOT renewal
               AND started_at > now() - interval '7 days'",
        )
        .bind(&regdom)
        .fetch_one(&mut *tx)
        .await?;
        if per_domain >= b.registered_domain_per_week {
            return refuse(
                "registered_domain",
                format!("{per_domain} new certificates under {regdom} in 7 days"),
            );
        }
    }
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO acme_orders (hostname, store_id, registered_domain, renewal, holder, directory)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(hostname)
    .bind(store)
    .bind(&regdom)
    .bind(renewal)
    .bind(holder)
    .bind(directory)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Ok(id))
}

/// How an order ended, as its issuer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    /// A certificate was issued.
    Valid,
    /// The CA accepted the order and it failed for the name (validation,
    /// a rejected identifier): held against the name and its store.
    Failed,
    /// The CA accepted the order and then it failed on the platform's side
    /// (the CA erring or rate-limiting, the origin unreachable): counted for
    /// the account and the name's hourly limit, not against the store.
    PlatformError,
    /// It never reached the CA: not counted.
    NotStarted,
}

/// Records how order `id` ended; a failure sets the hostname's backoff and
/// may pause its store. Returns whether the store was paused by this call.
pub async fn finish(
    pool: &PgPool,
    b: &Budgets,
    id: i64,
    ending: Ending,
    error: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // Serialized with admissions: two failures finishing at once both see
    // each other when counting the store's failures.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('edgefront-acme-budget'))")
        .execute(&mut *tx)
        .await?;
    let error = error.map(|e| e.chars().take(500).collect::<String>());
    match ending {
        Ending::NotStarted => {
            sqlx::query("DELETE FROM acme_orders WHERE id = $1 AND outcome = 'pending'")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        Ending::Valid => {
            sqlx::query(
                "UPDATE acme_orders SET outcome = 'valid', finished_at = now() WHERE id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        Ending::PlatformError => {
            sqlx::query(
                "UPDATE acme_orders SET outcome = 'platform_error', finished_at = now(), error = $2
                 WHERE id = $1",
            )
            .bind(id)
            .bind(error.as_deref())
            .execute(&mut *tx)
            .await?;
        }
        Ending::Failed => {
            // Consecutive failures of the name (since its last success) set the
            // backoff: base × 2^(n-1), at most a day, ±25 % jitter.
            let row: Option<(Option<i64>, String)> =
                sqlx::query_as("SELECT store_id, hostname FROM acme_orders WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some((store, hostname)) = row else {
                return Ok(false);
            };
            let streak: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM acme_orders WHERE hostname = $1 AND {FAILED}
                   AND id <> $2
                   AND id > COALESCE((SELECT max(id) FROM acme_orders
                                      WHERE hostname = $1 AND outcome = 'valid'), 0)"
            )))
            .bind(&hostname)
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            let exp = u32::try_from(streak.clamp(0, 20)).unwrap_or(20);
            let delay = b
                .failure_backoff
                .saturating_mul(1u32 << exp)
                .min(Duration::from_secs(86_400));
            sqlx::query(
                "UPDATE acme_orders SET outcome = 'failed', finished_at = now(), error = $2,
                     next_allowed_at = now() + make_interval(secs => $3 * (0.75 + random() / 2))
                 WHERE id = $1",
            )
            .bind(id)
            .bind(error.as_deref())
            .bind(delay.as_secs_f64())
            .execute(&mut *tx)
            .await?;
            if let Some(s) = store {
                let failed: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*) FROM acme_orders WHERE store_id = $1 AND {FAILED}
                       AND started_at > now() - interval '24 hours'"
                )))
                .bind(s)
                .fetch_one(&mut *tx)
                .await?;
                if failed >= b.store_failures_per_day {
                    let reason = format!(
                        "{failed} failed certificate orders in 24 h (last: {hostname}: {})",
                        error.as_deref().unwrap_or("failed")
                    );
                    let paused = sqlx::query(
                        "INSERT INTO acme_store_pauses (store_id, paused_until, reason)
                         VALUES ($1, now() + interval '24 hours', $2)
                         ON CONFLICT (store_id) DO UPDATE
                             SET paused_until = EXCLUDED.paused_until, reason = EXCLUDED.reason",
                    )
                    .bind(s)
                    .bind(&reason)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    tracing::warn!(store = s, %reason, "store's certificate orders paused");
                    return Ok(paused.rows_affected() > 0);
                }
            }
        }
    }
    tx.commit().await?;
    Ok(false)
}

/// The store's ACME pause, if any: (until, reason).
pub async fn pause(pool: &PgPool, store: i64) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT to_char(paused_until AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), reason
         FROM acme_store_pauses WHERE store_id = $1 AND paused_until > now()",
    )
    .bind(store)
    .fetch_optional(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_domain_follows_the_public_suffix_list() {
        assert_eq!(registered_domain("shop.example.co.uk"), "example.co.uk");
        assert_eq!(registered_domain("a.b.shop.example.com"), "example.com");
        assert_eq!(registered_domain("*.shops.example.com"), "example.com");
        assert_eq!(
            registered_domain("xn--bcher-kva.example"),
            "xn--bcher-kva.example"
        );
        // Each github.io site is its own registrable domain (a private suffix).
        assert_eq!(registered_domain("www.alice.github.io"), "alice.github.io");
    }

    #[test]
    fn defaults_stay_below_lets_encrypt_limits() {
        let b = Budgets::default();
        assert!(b.account_per_3h < 300);
        assert!(b.hostname_failures_per_hour < 5);
        assert!(b.registered_domain_per_week < 50);
        assert!(b.renewal_reserve_percent > 0 && b.renewal_reserve_percent < 100);
    }
}
