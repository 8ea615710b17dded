//! Request body extraction with errors that name the offending field.
//!
//! axum's own `Json`/`Form` rejections are plain text; sellers and scripts get
//! a JSON error naming the field (`items[0].quantity`) instead.

use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest request body the origin accepts.
pub const MAX_BODY: usize = 256 * 1024;

/// A JSON or form-urlencoded body, chosen by `Content-Type`.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let ctype = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
            .await
            .map_err(|_| ApiError::BadRequest(format!("body larger than {MAX_BODY} bytes")))?;
        let field_error = |path: String, inner: String| {
            let field = if path == "." { "body".to_owned() } else { path };
            ApiError::invalid(field, inner)
        };
        if ctype.starts_with("application/x-www-form-urlencoded") {
            return serde_urlencoded::from_bytes(&bytes).map(Body).map_err(|e| {
                let msg = e.to_string();
                match missing_field(&msg) {
                    Some(f) => ApiError::invalid(f, "is required"),
                    None => field_error(".".into(), msg),
                }
            });
        }
        if !(ctype.starts_with("application/json") || ctype.is_empty()) {
            return Err(ApiError::BadRequest(format!(
                "unsupported content-type {ctype:?}; send application/json"
            )));
        }
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(&mut de) {
            Ok(v) => Ok(Body(v)),
            Err(e) if e.inner().is_syntax() || e.inner().is_eof() => Err(ApiError::BadRequest(
                format!("malformed JSON: {}", e.inner()),
            )),
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.inner().to_string();
                // "missing field `x`" errors sit at the parent path; name the field itself.
                if let Some(missing) = missing_field(&inner) {
                    let field = if path == "." {
                        missing.to_owned()
                    } else {
                        format!("{path}.{missing}")
                    };
                    return Err(ApiError::invalid(field, "is required"));
                }
                Err(field_error(path, inner))
            }
        }
    }
}

fn missing_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `")
        .and_then(|r| r.split('`').next())
}
