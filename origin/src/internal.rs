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

use crate::error::ApiError;
use crate::input::Body;
use crate::{AppState, commit_lsn, with_lsn};

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
    let check_name = name
        .strip_prefix("*.")
        .map_or(name.clone(), |p| format!("x.{p}"));
    let loaded =
        edgefront_certs::load(&check_name, &up.chain_pem, up.key_pem.as_bytes()).map_err(|e| {
            match e {
                edgefront_certs::CertError::Key(_) => ApiError::invalid("key_pem", e.to_string()),
                _ => ApiError::invalid("chain_pem", e.to_string()),
            }
        })?;
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
