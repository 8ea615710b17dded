//! The origin's API error: one JSON shape for every failure.
//!
//! Every error body is `{"error": {"code": "...", "field": "...", "message": "..."}}`
//! (`field` only when one input is at fault). Database outages map to 503 with
//! `Retry-After`; nothing is half-written because every write is one transaction.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// What went wrong with a request to the origin.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// A field failed validation (422).
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The body could not be parsed at all (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong store token (401).
    #[error("missing or invalid store token")]
    Unauthorized,
    /// No such resource for this store (404).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A unique value is already taken (409).
    #[error("{field}: {message}")]
    Conflict { field: String, message: String },
    /// The database is unreachable or timed out (503, retry later).
    #[error("database unavailable")]
    Unavailable,
    /// The database is a standby (read-only): nothing was written (503,
    /// `x-edgefront-database: standby`, retry on the origin that leads).
    #[error("database is a standby")]
    ReadOnly,
    /// A bug or an unexpected database error (500); details are logged, not returned.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// A validation error on `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A uniqueness conflict on `field`.
    pub fn conflict(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Conflict {
            field: field.into(),
            message: message.into(),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<&str>) {
        match self {
            ApiError::Invalid { field, .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid", Some(field))
            }
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", None),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                Some("authorization"),
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::Conflict { field, .. } => (StatusCode::CONFLICT, "conflict", Some(field)),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None),
            ApiError::ReadOnly => (StatusCode::SERVICE_UNAVAILABLE, "read_only", None),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::Unavailable
            }
            sqlx::Error::Database(db) => {
                // Connection-class (08), shutdown (57P), read-only (25006) errors are outages;
                // so is a statement cancelled by statement_timeout (57014) under load: its
                // transaction is rolled back, nothing was written, and a retry may pass.
                let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
                if code == "25006" {
                    tracing::warn!(error = %e, "write refused: the database is a standby");
                    ApiError::ReadOnly
                } else if code.starts_with("08") || code.starts_with("57P") || code == "57014" {
                    tracing::warn!(error = %e, %code, "database unavailable");
                    ApiError::Unavailable
                } else {
                    tracing::error!(error = %e, %code, "unexpected database error");
                    ApiError::Internal
                }
            }
            _ => {
                tracing::error!(error = %e, "unexpected database error");
                ApiError::Internal
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = self.parts();
        let message = match &self {
            ApiError::Invalid { message, .. } | ApiError::Conflict { message, .. } => {
                message.clone()
            }
            other => other.to_string(),
        };
        let mut body = json!({ "code": code, "message": message });
        if let Some(f) = field {
            body["field"] = json!(f);
        }
        let mut resp = (status, axum::Json(json!({ "error": body }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        }
        if matches!(self, ApiError::ReadOnly) {
            resp.headers_mut().insert(
                edgefront_schema::DATABASE_ROLE_HEADER,
                HeaderValue::from_static("standby"),
            );
        }
        resp
    }
}

/// The constraint name of a database error, if it is a constraint violation.
pub fn constraint(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.constraint().map(str::to_owned),
        _ => None,
    }
}
