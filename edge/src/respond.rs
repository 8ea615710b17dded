//! What the edge writes itself: pages, error pages, the API's JSON errors,
//! and the headers every response carries (`x-edge-route`, HSTS over TLS,
//! `Secure` cookies). Every one is stamped here.

use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType};

use crate::cache::{Entry, if_none_match};
use crate::headers::{CACHE_STATUS, SERVER_TIMING, X_EDGE_ROUTE};
use crate::limits::Limited;
use crate::pages::PageError;
use crate::proxy::{Ctx, Edge, header_str};
use crate::render;

impl Edge {
    /// Writes a page entry: conditional request, encoding, headers.
    pub(crate) async fn write_page(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        entry: &Entry,
        cache_status: String,
        timing: String,
    ) -> Result<()> {
        let req = session.req_header();
        let head = req.method == http::Method::HEAD;
        let enc = entry.choose(header_str(req, http::header::ACCEPT_ENCODING));
        let etag = entry.etag(enc);
        let not_modified = entry.status == 200
            && header_str(req, http::header::IF_NONE_MATCH)
                .is_some_and(|h| if_none_match(h, &etag));
        let status = if not_modified { 304 } else { entry.status };
        let mut resp = ResponseHeader::build(status, Some(10))?;
        self.stamp(session, &mut resp)?;
        resp.insert_header(CACHE_STATUS, cache_status)?;
        resp.insert_header(SERVER_TIMING, timing)?;
        resp.insert_header(http::header::ETAG, etag.as_str())?;
        resp.insert_header(http::header::VARY, "Accept-Encoding")?;
        resp.insert_header(
            http::header::CACHE_CONTROL,
            "public, max-age=0, must-revalidate",
        )?;
        if not_modified {
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(());
        }
        let body = entry.body(enc);
        resp.insert_header(http::header::CONTENT_TYPE, "text/html; charset=utf-8")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header("x-content-type-options", "nosniff")?;
        resp.insert_header(
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        )?;
        resp.insert_header("referrer-policy", "strict-origin-when-cross-origin")?;
        if let Some(ce) = enc.header() {
            resp.insert_header(http::header::CONTENT_ENCODING, ce)?;
        }
        ctx.body_bytes = if head { 0 } else { body.len() };
        session.write_response_header(Box::new(resp), head).await?;
        if !head {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }

    /// A page refused by the client's budget: 429 with `Retry-After`,
    /// counted, never cached.
    pub(crate) async fn write_limited_page(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        what: Limited,
        wait: Duration,
        head: bool,
    ) -> Result<()> {
        ctx.cache = "limited";
        self.metrics
            .rate_limited
            .with_label_values(&[what.label()])
            .inc();
        tracing::debug!(region = %self.region, host = %ctx.host, limit = what.label(), "page refused: over budget");
        self.write_error_retry(
            session,
            429,
            "Too many requests",
            "Too many requests for pages from your address. Please try again in a moment.",
            head,
            Some(wait.as_secs().max(1)),
        )
        .await
    }

    pub(crate) async fn replica_down(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        e: PageError,
        head: bool,
    ) -> Result<()> {
        ctx.cache = "error";
        tracing::warn!(region = %self.region, host = %ctx.host, error = %e, "page unavailable: replica query failed");
        self.write_error(
            session,
            503,
            "Temporarily unavailable",
            "This page cannot be loaded right now. Please try again in a moment.",
            head,
        )
        .await
    }

    /// Headers on every response the edge sends: the region, and over TLS
    /// the HSTS policy.
    pub(crate) fn stamp(&self, session: &Session, resp: &mut ResponseHeader) -> Result<()> {
        resp.insert_header(X_EDGE_ROUTE, self.region.as_str())?;
        if let Some(hsts) = &self.hsts
            && is_tls(session)
        {
            resp.insert_header(http::header::STRICT_TRANSPORT_SECURITY, hsts.as_str())?;
        }
        Ok(())
    }

    /// 429 with `Retry-After` and the API's JSON error shape.
    pub(crate) async fn write_rate_limited(
        &self,
        session: &mut Session,
        what: crate::limits::Limited,
        wait: Duration,
    ) -> Result<()> {
        let secs = wait.as_secs().max(1);
        let body = Bytes::from(format!(
            "{{\"error\":{{\"code\":\"rate_limited\",\"limit\":\"{}\",\"message\":\"too many requests of this kind from your address; retry in {secs} s\",\"region\":\"{}\"}}}}\n",
            what.label(),
            self.region
        ));
        let mut resp = ResponseHeader::build(429, Some(6))?;
        self.stamp(session, &mut resp)?;
        resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }

    /// The storefront's 404 page.
    pub(crate) async fn write_not_found(&self, session: &mut Session, head: bool) -> Result<()> {
        self.write_error(
            session,
            404,
            "Page not found",
            "There is no page at this address.",
            head,
        )
        .await
    }

    /// Writes a small HTML error page stamped with the region (a 503 says
    /// to retry in 2 s).
    pub(crate) async fn write_error(
        &self,
        session: &mut Session,
        status: u16,
        title: &str,
        message: &str,
        head: bool,
    ) -> Result<()> {
        let retry = (status == 503).then_some(2);
        self.write_error_retry(session, status, title, message, head, retry)
            .await
    }

    /// [`Edge::write_error`] with `Retry-After: retry_after` seconds.
    pub(crate) async fn write_error_retry(
        &self,
        session: &mut Session,
        status: u16,
        title: &str,
        message: &str,
        head: bool,
        retry_after: Option<u64>,
    ) -> Result<()> {
        let body = Bytes::from(render::error_page(status, title, message, &self.region));
        let mut resp = ResponseHeader::build(status, Some(6))?;
        self.stamp(session, &mut resp)?;
        resp.insert_header(http::header::CONTENT_TYPE, "text/html; charset=utf-8")?;
        resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        if let Some(secs) = retry_after {
            resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
        }
        session.write_response_header(Box::new(resp), head).await?;
        if !head {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(())
    }
}

/// The status and message for a failure to reach or hear from the origin.
/// Nothing was sent when the connection failed, so those are safe to retry
/// (503 + Retry-After); a failure after sending may or may not have committed.
pub fn origin_failure(e: &Error) -> (u16, &'static str) {
    match e.etype() {
        ErrorType::HTTPStatus(code) => (*code, "request refused"),
        ErrorType::ConnectTimedout
        | ErrorType::ConnectRefused
        | ErrorType::ConnectNoRoute
        | ErrorType::ConnectError => (503, "origin unavailable; nothing was sent, retry later"),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            (504, "origin timed out; the outcome is unknown")
        }
        _ => match e.esource() {
            ErrorSource::Upstream => (502, "origin failed while answering; the outcome is unknown"),
            ErrorSource::Downstream => (400, "bad request"),
            _ => (500, "internal error"),
        },
    }
}

/// Whether the shopper's connection is TLS.
pub(crate) fn is_tls(session: &Session) -> bool {
    crate::tls::session_sni(session.digest()).is_some()
}

/// Marks every cookie the origin sets `Secure` (the shopper is on TLS), so
/// a browser never sends it over plain HTTP.
pub(crate) fn secure_cookies(resp: &mut ResponseHeader) -> Result<()> {
    let cookies: Vec<String> = resp
        .headers
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(with_secure)
        .collect();
    if cookies.is_empty() {
        return Ok(());
    }
    resp.remove_header(&http::header::SET_COOKIE);
    for c in cookies {
        resp.append_header(http::header::SET_COOKIE, c)?;
    }
    Ok(())
}

/// `cookie` with the `Secure` attribute (added once).
fn with_secure(cookie: &str) -> String {
    let has = cookie
        .split(';')
        .skip(1)
        .any(|a| a.trim().eq_ignore_ascii_case("secure"));
    if has {
        cookie.to_owned()
    } else {
        format!("{cookie}; Secure")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_over_tls_are_marked_secure_once() {
        assert_eq!(
            with_secure("cart=abc; Path=/; HttpOnly; SameSite=Lax"),
            "cart=abc; Path=/; HttpOnly; SameSite=Lax; Secure"
        );
        assert_eq!(with_secure("a=b; secure; Path=/"), "a=b; secure; Path=/");
        // A cookie whose value says "secure" is not a Secure cookie.
        assert_eq!(with_secure("secure=1"), "secure=1; Secure");
    }

    #[test]
    fn origin_failure_maps_connect_errors_to_503_and_timeouts_to_504() {
        let refused = Error::new(ErrorType::ConnectRefused);
        assert_eq!(origin_failure(&refused).0, 503);
        let timeout = Error::new(ErrorType::ReadTimedout);
        assert_eq!(origin_failure(&timeout).0, 504);
        let status = Error::new(ErrorType::HTTPStatus(413));
        assert_eq!(origin_failure(&status).0, 413);
        let other = Error::new_up(ErrorType::ReadError);
        assert_eq!(origin_failure(&other).0, 502);
    }
}
