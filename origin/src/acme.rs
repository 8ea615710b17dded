//! ACME support on the origin: answering HTTP-01 challenges (public), and the
//! internal calls issuers use — publishing challenges, the network-wide issuance
//! lease per hostname, and the shared ACME account (sealed at rest).
//!
//! **No second order across regions.** An issuer decides to order from its
//! own replica, which can lag: region B may see no certificate although
//! region A stored one a moment ago. So the lease is granted on the primary
//! only when the primary holds no *current* certificate for the name, checked
//! in the same transaction as the lease: A stores its certificate before it
//! releases the lease, so whoever takes the lease next sees it. Otherwise the
//! answer is "already issued" with that certificate, its key still sealed
//! (only a holder of the master key can open it). Current means not yet due
//! for renewal: more than a third of its lifetime (from when it was stored)
//! left, the edges' renewal rule, so renewal still gets a lease.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::input::Body;
use crate::internal::authorize;
use crate::state::AppState;

/// `GET /.well-known/acme-challenge/{token}`: the key authorization, as the CA expects.
pub async fn answer_challenge(
    State(st): State<AppState>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    let ka: Option<String> =
        sqlx::query_scalar("SELECT key_authorization FROM acme_challenges WHERE token = $1")
            .bind(&token)
            .fetch_optional(&st.pool)
            .await?;
    match ka {
        Some(ka) => Ok(([(header::CONTENT_TYPE, "application/octet-stream")], ka).into_response()),
        None => Ok((StatusCode::NOT_FOUND, "no such challenge\n").into_response()),
    }
}

/// A challenge to publish.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewChallenge {
    pub hostname: String,
    pub key_authorization: String,
}

/// Whether `s` is non-empty unpadded base64url of at most `max` characters
/// (ACME tokens and DNS-01 values).
fn is_base64url(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `PUT /internal/acme/challenges/{token}`.
pub async fn put_challenge(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(token): Path<String>,
    Body(c): Body<NewChallenge>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    if !is_base64url(&token, 256) {
        return Err(ApiError::invalid("token", "must be base64url"));
    }
    sqlx::query(
        "INSERT INTO acme_challenges (token, hostname, key_authorization) VALUES ($1, $2, $3)
         ON CONFLICT (token) DO UPDATE SET key_authorization = EXCLUDED.key_authorization",
    )
    .bind(&token)
    .bind(&c.hostname)
    .bind(&c.key_authorization)
    .execute(&st.pool)
    .await?;
    Ok(Json(json!({ "token": token })).into_response())
}

/// `DELETE /internal/acme/challenges/{token}`.
pub async fn delete_challenge(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    sqlx::query("DELETE FROM acme_challenges WHERE token = $1")
        .bind(&token)
        .execute(&st.pool)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A lease request.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub holder: String,
    pub seconds: u32,
    /// The ACME directory the order will go to: its account's budget.
    #[serde(default)]
    pub directory: String,
}

/// A stored certificate, its key sealed.
#[derive(sqlx::FromRow)]
struct SealedCertificate {
    chain_pem: String,
    key_nonce: Vec<u8>,
    key_ciphertext: Vec<u8>,
    not_after: i64,
    issuer: Option<String>,
}

/// The certificate the primary holds for `hostname` if it is current (not
/// due for renewal), as JSON with the key still sealed.
async fn current_certificate(
    db: impl sqlx::PgExecutor<'_>,
    hostname: &str,
) -> Result<Option<serde_json::Value>, ApiError> {
    let row: Option<SealedCertificate> = sqlx::query_as(
        "SELECT chain_pem, key_nonce, key_ciphertext,
                extract(epoch FROM not_after)::bigint AS not_after, issuer
         FROM certificates
         WHERE hostname = $1 AND now() < not_after - (not_after - updated_at) / 3",
    )
    .bind(hostname)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|c| {
        json!({
            "chain_pem": c.chain_pem,
            "key_nonce": hex::encode(c.key_nonce),
            "key_ciphertext": hex::encode(c.key_ciphertext),
            "not_after": c.not_after,
            "issuer": c.issuer,
        })
    }))
}

/// `POST /internal/acme/leases/{hostname}`: `{"acquired": true}` when this
/// holder now holds the lease (new, expired, or already its own);
/// `{"acquired": false}` when another holder does; and
/// `{"acquired": false, "certificate": {..}}` (no lease taken) when the
/// primary already holds a current certificate for the name — use it, do not
/// order. Lease and check are one transaction (see the module doc).
pub async fn acquire_lease(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(hostname): Path<String>,
    Body(l): Body<LeaseRequest>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let secs = l.seconds.clamp(1, 3600);
    let mut tx = st.pool.begin().await?;
    // Taking (or waiting for) the lease row first: a holder that is just
    // releasing it committed its certificate before, so the check below,
    // a new statement with a new snapshot, sees that certificate.
    let holder: String = sqlx::query_scalar(
        "INSERT INTO cert_leases (hostname, holder, expires_at) VALUES ($1, $2, now() + make_interval(secs => $3))
         ON CONFLICT (hostname) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
             WHERE cert_leases.expires_at < now() OR cert_leases.holder = EXCLUDED.holder
         RETURNING holder",
    )
    .bind(&hostname)
    .bind(&l.holder)
    .bind(f64::from(secs))
    .fetch_optional(&mut *tx)
    .await?
    .unwrap_or_default();
    if let Some(cert) = current_certificate(&mut *tx, &hostname).await? {
        tx.rollback().await?;
        return Ok(Json(json!({ "acquired": false, "certificate": cert })).into_response());
    }
    if holder != l.holder {
        tx.commit().await?;
        return Ok(Json(json!({ "acquired": false })).into_response());
    }
    // The lease is ours: the order it allows must fit every budget, counted
    // in this same transaction (no order reaches the CA uncounted).
    match crate::budget::admit(&mut tx, &st.budgets, &hostname, &l.holder, &l.directory).await? {
        Ok(order) => {
            tx.commit().await?;
            crate::metrics::acme_order("admitted");
            Ok(Json(json!({ "acquired": true, "order": order })).into_response())
        }
        Err(refusal) => {
            tx.rollback().await?;
            crate::metrics::acme_refused(refusal.budget);
            tracing::info!(%hostname, budget = refusal.budget, reason = %refusal.reason, "ACME order refused by budget");
            Ok(Json(json!({ "acquired": false, "refused": refusal })).into_response())
        }
    }
}

/// How an order ended.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderEnd {
    pub ending: crate::budget::Ending,
    #[serde(default)]
    pub error: Option<String>,
}

/// `POST /internal/acme/orders/{id}`: the issuer reports how an admitted
/// order ended (a failure sets the name's backoff and may pause its store).
pub async fn finish_order(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
    Body(e): Body<OrderEnd>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let paused =
        crate::budget::finish(&st.pool, &st.budgets, id, e.ending, e.error.as_deref()).await?;
    crate::metrics::acme_order(match e.ending {
        crate::budget::Ending::Valid => "valid",
        crate::budget::Ending::Failed => "failed",
        crate::budget::Ending::PlatformError => "platform_error",
        crate::budget::Ending::NotStarted => "not_started",
    });
    Ok(Json(json!({ "order": id, "store_paused": paused })).into_response())
}

/// `GET /internal/acme/certificates/{hostname}`: the primary's current
/// certificate for the name (key sealed), or 404. An issuer waiting on
/// another region's lease polls this as well as its replica, which may lag.
pub async fn current(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(hostname): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    match current_certificate(&st.pool, &hostname).await? {
        Some(cert) => Ok(Json(json!({ "certificate": cert })).into_response()),
        None => Err(ApiError::NotFound("certificate")),
    }
}

#[derive(Deserialize)]
pub struct Holder {
    pub holder: String,
}

/// `DELETE /internal/acme/leases/{hostname}?holder=…`.
pub async fn release_lease(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(hostname): Path<String>,
    Query(h): Query<Holder>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    sqlx::query("DELETE FROM cert_leases WHERE hostname = $1 AND holder = $2")
        .bind(&hostname)
        .bind(&h.holder)
        .execute(&st.pool)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
pub struct Directory {
    pub directory: String,
}

/// `GET /internal/acme/account?directory=…`: the stored credentials JSON.
pub async fn get_account(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(d): Query<Directory>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let sealer = st.sealer.as_ref().ok_or(ApiError::NotFound("route"))?;
    let row: Option<(Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT nonce, ciphertext FROM acme_accounts WHERE directory = $1")
            .bind(&d.directory)
            .fetch_optional(&st.pool)
            .await?;
    let Some((nonce, ct)) = row else {
        return Err(ApiError::NotFound("account"));
    };
    let plain = sealer
        .open(&d.directory, &nonce, &ct)
        .map_err(|_| ApiError::Internal)?;
    let creds: serde_json::Value =
        serde_json::from_slice(&plain).map_err(|_| ApiError::Internal)?;
    Ok(Json(json!({ "credentials": creds })).into_response())
}

/// An account to store.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountUpload {
    pub directory: String,
    pub credentials: serde_json::Value,
    /// Replace a stored account (the CA forgot it); else first writer wins.
    #[serde(default)]
    pub replace: bool,
}

/// `PUT /internal/acme/account`: stores credentials unless an account for the
/// directory exists already (first writer wins); returns the stored one.
pub async fn put_account(
    State(st): State<AppState>,
    headers: HeaderMap,
    Body(a): Body<AccountUpload>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let sealer = st.sealer.as_ref().ok_or(ApiError::NotFound("route"))?;
    let plain = serde_json::to_vec(&a.credentials).map_err(|_| ApiError::Internal)?;
    let (nonce, ct) = sealer
        .seal(&a.directory, &plain)
        .map_err(|_| ApiError::Internal)?;
    let sql = if a.replace {
        "INSERT INTO acme_accounts (directory, nonce, ciphertext) VALUES ($1, $2, $3)
         ON CONFLICT (directory) DO UPDATE SET nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext, created_at = now()"
    } else {
        "INSERT INTO acme_accounts (directory, nonce, ciphertext) VALUES ($1, $2, $3) ON CONFLICT (directory) DO NOTHING"
    };
    sqlx::query(sql)
        .bind(&a.directory)
        .bind(nonce)
        .bind(ct)
        .execute(&st.pool)
        .await?;
    get_account(
        State(st),
        headers,
        Query(Directory {
            directory: a.directory,
        }),
    )
    .await
}

/// A DNS-01 challenge value to publish.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns01 {
    pub value: String,
}

/// The `_acme-challenge` name of `name`, if it is the platform domain (the
/// only zone the platform publishes challenges in: its wildcard
/// `*.<platform>`), else a 422.
fn dns01_name(st: &AppState, name: &str) -> Result<String, ApiError> {
    if name != st.platform_domain {
        return Err(ApiError::invalid(
            "name",
            "DNS-01 challenges are published only for the platform domain",
        ));
    }
    Ok(format!("_acme-challenge.{name}."))
}

/// Sends one update to the DNS server's management API.
async fn dns_update(st: &AppState, path: &str, body: serde_json::Value) -> Result<(), ApiError> {
    let url = st.dns_update_url.as_deref().ok_or_else(|| {
        ApiError::invalid("name", "no dns_update_url is configured: DNS-01 is off")
    })?;
    let r = reqwest::Client::new()
        .post(format!("{}/{path}", url.trim_end_matches('/')))
        .timeout(std::time::Duration::from_secs(5))
        .json(&body)
        .send()
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "DNS update failed");
            ApiError::Unavailable
        })?;
    if !r.status().is_success() {
        tracing::warn!(status = %r.status(), "DNS update refused");
        return Err(ApiError::Unavailable);
    }
    Ok(())
}

/// `PUT /internal/acme/dns01/{name}`: publishes the DNS-01 TXT value for
/// `_acme-challenge.<name>` (the platform domain only), replacing any other.
pub async fn put_dns01(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Body(d): Body<Dns01>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let host = dns01_name(&st, &name)?;
    if !is_base64url(&d.value, 128) {
        return Err(ApiError::invalid("value", "must be base64url"));
    }
    dns_update(&st, "clear-txt", json!({ "host": host })).await?;
    dns_update(&st, "set-txt", json!({ "host": host, "value": d.value })).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `DELETE /internal/acme/dns01/{name}`: removes the challenge record.
pub async fn delete_dns01(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    authorize(&st, &headers)?;
    let host = dns01_name(&st, &name)?;
    dns_update(&st, "clear-txt", json!({ "host": host })).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
