//! The primary: connecting and migrating it, pruning the change log,
//! whether it leads, the commit LSN a write hands its client, and the store
//! a `Host` names.

use std::time::Duration;

use axum::http::HeaderValue;
use axum::response::Response;
use edgefront_schema::{COMMIT_LSN_HEADER, Hostname, Lsn, StoreId};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::error::ApiError;
use crate::state::AppState;

/// Connections of [`AppState::health_pool`].
pub const HEALTH_CONNECTIONS: u32 = 2;

/// Connects to the primary with bounded waits, so an outage answers 503
/// quickly instead of hanging requests.
pub async fn connect(database_url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .idle_timeout(Duration::from_secs(60))
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET statement_timeout = '10s'")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .connect_lazy(database_url)
}

/// Applies the schema's migrations, on a connection of their own that is
/// closed when they fail: the migrator holds an advisory lock for the whole
/// run and does not release it on an error (e.g. on a standby, where the
/// first `CREATE TABLE` fails), so a pooled connection would keep it and
/// the next run would wait on it.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?;
    // `run`'s own body on this connection (`run(&mut *conn)` is not `Send`
    // for tokio::spawn: sqlx's "Acquire is not general enough").
    let r = edgefront_schema::MIGRATOR
        .run_direct(None, &mut *conn, false)
        .await;
    if r.is_err() {
        let _ = sqlx::Connection::close(conn.detach()).await;
    }
    r
}

/// Prunes the change log by transaction: deletes the rows of transactions
/// that finished at least `retention` ago (an id below the primary's xmin as
/// noted by a run that long ago; with a zero retention, below the xmin now),
/// and moves the horizon (`pruned_through` seq, `pruned_xid`) past them, in
/// one transaction. Returns the new seq horizon.
///
/// An edge watching a transaction id below `pruned_xid` may have lost rows
/// and drops its whole cache; one that polls at all never is, because every
/// id it watches is younger than the retention.
pub async fn prune_change_log(pool: &PgPool, retention: Duration) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO change_log_prune_marks (oldest_xid)
         VALUES (pg_snapshot_xmin(pg_current_snapshot())::text::bigint)",
    )
    .execute(&mut *tx)
    .await?;
    let cut: Option<i64> = if retention.is_zero() {
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut *tx)
            .await?
    } else {
        sqlx::query_scalar(
            "SELECT max(oldest_xid) FROM change_log_prune_marks
             WHERE at <= now() - make_interval(secs => $1)",
        )
        .bind(retention.as_secs_f64())
        .fetch_one(&mut *tx)
        .await?
    };
    let horizon: i64 = sqlx::query_scalar(
        "WITH gone AS (
             DELETE FROM change_log WHERE xid < $1 RETURNING seq
         )
         UPDATE change_log_horizon
            SET pruned_through = GREATEST(pruned_through, COALESCE((SELECT max(seq) FROM gone), 0)),
                pruned_xid = GREATEST(pruned_xid, $1)
         RETURNING pruned_through",
    )
    .bind(cut.unwrap_or(0))
    .fetch_one(&mut *tx)
    .await?;
    // Older marks than the one just used are never needed again.
    sqlx::query(
        "DELETE FROM change_log_prune_marks
         WHERE at < now() - make_interval(secs => $1) AND oldest_xid < $2",
    )
    .bind(retention.as_secs_f64())
    .bind(cut.unwrap_or(0))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(horizon)
}

/// Prunes the change log every `every`, keeping `retention` of history.
pub async fn prune_forever(pool: PgPool, retention: Duration, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        match prune_change_log(&pool, retention).await {
            Ok(h) => tracing::debug!(horizon = h, "change log pruned"),
            // Beside a standby (a failover candidate): the leader's origin
            // prunes; this one tries again at the next tick, quietly.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("25006") => {
                tracing::debug!("change log prune: the database is a standby");
            }
            Err(e) => tracing::warn!(error = %e, "change log prune failed"),
        }
    }
}

/// Whether the database leads (is not in recovery): beside a Patroni
/// standby the origin serves no writes (crate docs: it follows the leader).
pub async fn database_leads(pool: &PgPool) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar::<_, bool>("SELECT NOT pg_is_in_recovery()")
        .fetch_one(pool)
        .await
}

/// The WAL position after a committed write: a replica that has replayed up
/// to it shows the write.
///
/// The *insert* position, not `pg_current_wal_lsn()` (the write position):
/// with `synchronous_commit = off` a commit returns before its record is
/// written, so the write position can still be below it, and a client handed
/// that LSN would be told a replica "has" its write when it does not (the
/// history checker found exactly this in the lab, which runs with
/// synchronous commit off). Every record inserted before this call, the
/// commit among them, ends at or below the insert position.
pub async fn commit_lsn(pool: &PgPool) -> Option<Lsn> {
    match sqlx::query_scalar::<_, String>("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(pool)
        .await
    {
        Ok(s) => s.parse().ok(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read commit lsn after write");
            None
        }
    }
}

/// Adds the commit LSN header to a write's response.
pub fn with_lsn(mut resp: Response, lsn: Option<Lsn>) -> Response {
    if let Some(v) = lsn.and_then(|l| HeaderValue::from_str(&l.to_string()).ok()) {
        resp.headers_mut().insert(COMMIT_LSN_HEADER, v);
    }
    resp
}

/// Finds the store a shopper's `Host` header names: a custom domain, or
/// `<slug>.<platform_domain>`.
pub async fn store_for_host(state: &AppState, host: &str) -> Result<StoreId, ApiError> {
    let host = Hostname::from_host_header(host).map_err(|_| ApiError::NotFound("store"))?;
    edgefront_schema::store_for_host(&state.pool, &host, &state.platform_domain)
        .await?
        .ok_or(ApiError::NotFound("store"))
}
