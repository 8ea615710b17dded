//! Store API tokens: generated once, shown once, stored only as a SHA-256 hash.
//!
//! A token is `eft_` + 32 random bytes in hex. Tokens are high-entropy, so a
//! plain SHA-256 (not a slow password hash) is the right tool: lookups are by
//! hash, and a stolen hash table yields nothing usable.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use edgefront_schema::StoreId;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

const PREFIX: &str = "eft_";

/// A fresh token for a new store, and the hash to store.
pub fn new_token() -> (String, Vec<u8>) {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token = format!("{PREFIX}{}", hex::encode(raw));
    let hash = hash_token(&token);
    (token, hash)
}

/// The stored form of a token.
pub fn hash_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// The store a seller request is authenticated as (`Authorization: Bearer eft_…`).
#[derive(Clone, Copy, Debug)]
pub struct Seller(pub StoreId);

impl FromRequestParts<AppState> for Seller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| t.starts_with(PREFIX) && t.len() == PREFIX.len() + 64)
            .ok_or(ApiError::Unauthorized)?;
        let id: Option<i64> = sqlx::query_scalar("SELECT id FROM stores WHERE token_hash = $1")
            .bind(hash_token(token))
            .fetch_optional(&state.pool)
            .await?;
        id.map(|id| Seller(StoreId(id)))
            .ok_or(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_prefixed_random_and_hash_is_stable() {
        let (a, ha) = new_token();
        let (b, _) = new_token();
        assert!(a.starts_with("eft_") && a.len() == 68);
        assert_ne!(a, b);
        assert_eq!(ha, hash_token(&a));
        assert_eq!(ha.len(), 32);
    }
}
