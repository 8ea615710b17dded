//! The platform's internal API (not for sellers): installing certificates.
//!
//! Authenticated with the platform's internal token (`internal_token` in the
//! origin's config; without one the API answers 404). The private key is
//! checked against the certificate and sealed with the master key before it is
//! stored; it is never logged or returned.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use edgefront_schema::Hostname;
use serde::Deserialize;
use serde_json::json;

use crate::db::{commit_lsn, with_lsn};
use crate::error::ApiError;
use crate::input::Body;
use crate::state::AppState;

/// `PUT /internal/certificates/{hostname}` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertUpload {
    pub chain_pem: String,
    pub key_pem: String,
    /// The ACME directory that issued it (absent: an operator's upload).
    #[serde(default)]
    pub issuer: Option<String>,
}

pub(crate) fn authorize(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = st.internal_token.as_deref() else {
        return Err(ApiError::NotFound("route"));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if edgefront_schema::bearer_matches(given, expected) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Installs or replaces the certificate of a registered hostname (or of the
/// platform wildcard `*.<platform_domain>`).
pub async fn put_certificate(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    Body(up): Body<CertUpload>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let sealer = st.sealer.as_ref().ok_or(ApiError::NotFound("route"))?;
    let wildcard = format!("*.{}", st.platform_domain);
    let name = if raw == wildcard {
        wildcard
    } else {
        let host: Hostname = raw
            .parse()
            .map_err(|e| ApiError::invalid("hostname", format!("{e}")))?;
        let registered: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM domains WHERE hostname = $1)")
                .bind(host.as_str())
                .fetch_one(&st.pool)
                .await?;
        if !registered {
            return Err(ApiError::invalid(
                "hostname",
                "not a registered custom domain",
            ));
        }
        host.as_str().to_owned()
    };
    let loaded = edgefront_certs::load(&name, &up.chain_pem, up.key_pem.as_bytes()).map_err(
        |e| match e {
            edgefront_certs::CertError::Key(_) => ApiError::invalid("key_pem", e.to_string()),
            _ => ApiError::invalid("chain_pem", e.to_string()),
        },
    )?;
    if let Some(i) = &up.issuer
        && !(1..=64).contains(&i.len())
    {
        return Err(ApiError::invalid("issuer", "must be 1-64 characters"));
    }
    let (nonce, ct) = sealer
        .seal(&name, up.key_pem.as_bytes())
        .map_err(|_| ApiError::Internal)?;
    sqlx::query(
        "INSERT INTO certificates (hostname, chain_pem, key_nonce, key_ciphertext, not_after, issuer)
         VALUES ($1, $2, $3, $4, to_timestamp($5), $6)
         ON CONFLICT (hostname) DO UPDATE SET chain_pem = EXCLUDED.chain_pem, key_nonce = EXCLUDED.key_nonce,
             key_ciphertext = EXCLUDED.key_ciphertext, not_after = EXCLUDED.not_after,
             issuer = EXCLUDED.issuer, updated_at = now()",
    )
    .bind(&name)
    .bind(&up.chain_pem)
    .bind(nonce)
    .bind(ct)
    .bind(loaded.not_after as f64)
    .bind(&up.issuer)
    .execute(&st.pool)
    .await?;
    let lsn = commit_lsn(&st.pool).await;
    Ok(with_lsn(
        Json(json!({ "hostname": name, "not_after": loaded.not_after })).into_response(),
        lsn,
    ))
}

/// What [`reseal`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resealed {
    pub certificates: usize,
    pub accounts: usize,
    /// Rows already under the sealing key.
    pub current: usize,
}

impl std::fmt::Display for Resealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "re-sealed {} certificate keys and {} ACME accounts; {} already under the sealing key",
            self.certificates, self.accounts, self.current
        )
    }
}

/// Re-seals every certificate key and ACME account not yet sealed under the
/// sealer's first key. Each row is rewritten on its own, only if it still
/// holds what was read (a certificate renewed meanwhile is already sealed
/// under the new key and is left alone); the certificate rows' change-log
/// entries make every edge reload them, which they can, holding both keys.
pub async fn reseal(
    pool: &sqlx::PgPool,
    sealer: &edgefront_certs::Sealer,
) -> Result<Resealed, sqlx::Error> {
    let current = sealer.sealing_key_id().to_owned();
    let under_current =
        |ct: &[u8]| edgefront_certs::Sealer::key_id_of(ct) == Some(current.as_str());
    let mut done = Resealed::default();
    let (n, current_rows) = reseal_table(pool, sealer, &under_current, &CERTIFICATE_KEYS).await?;
    done.certificates = n;
    done.current += current_rows;
    let (n, current_rows) = reseal_table(pool, sealer, &under_current, &ACME_ACCOUNTS).await?;
    done.accounts = n;
    done.current += current_rows;
    Ok(done)
}

/// Where [`reseal`] finds sealed values: the query that reads (name — the
/// associated data —, nonce, ciphertext) and the one that rewrites a row
/// only if it still holds the ciphertext read ($1 name, $2 nonce, $3 new
/// ciphertext, $4 the one read).
struct SealedColumns {
    what: &'static str,
    select: &'static str,
    update: &'static str,
}

const CERTIFICATE_KEYS: SealedColumns = SealedColumns {
    what: "certificate",
    select: "SELECT hostname, key_nonce, key_ciphertext FROM certificates ORDER BY hostname",
    update: "UPDATE certificates SET key_nonce = $2, key_ciphertext = $3
             WHERE hostname = $1 AND key_ciphertext = $4",
};

const ACME_ACCOUNTS: SealedColumns = SealedColumns {
    what: "ACME account",
    select: "SELECT directory, nonce, ciphertext FROM acme_accounts ORDER BY directory",
    update: "UPDATE acme_accounts SET nonce = $2, ciphertext = $3
             WHERE directory = $1 AND ciphertext = $4",
};

/// Re-seals one table's values not under the sealing key: (re-sealed,
/// already current).
async fn reseal_table(
    pool: &sqlx::PgPool,
    sealer: &edgefront_certs::Sealer,
    under_current: &impl Fn(&[u8]) -> bool,
    c: &SealedColumns,
) -> Result<(usize, usize), sqlx::Error> {
    let rows: Vec<(String, Vec<u8>, Vec<u8>)> = sqlx::query_as(c.select).fetch_all(pool).await?;
    let (mut resealed, mut current) = (0, 0);
    for (name, nonce, ct) in rows {
        if under_current(&ct) {
            current += 1;
            continue;
        }
        let plain = sealer.open(&name, &nonce, &ct).map_err(|e| {
            sqlx::Error::Protocol(format!(
                "{} {name}: {e} (is every old key in cert_key?)",
                c.what
            ))
        })?;
        let (n2, ct2) = sealer
            .seal(&name, &plain)
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        // Only if the row still holds what was read: a value written
        // meanwhile is already under the sealing key.
        let r = sqlx::query(c.update)
            .bind(&name)
            .bind(n2)
            .bind(ct2)
            .bind(&ct)
            .execute(pool)
            .await?;
        resealed += r.rows_affected() as usize;
    }
    Ok((resealed, current))
}
