//! The TLS rules a request meets before routing: over TLS, `Host` must name
//! the SNI (421 otherwise); over plain HTTP, with redirects on, a name that
//! has a certificate goes to https (ACME challenges excepted).

use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

use edgefront_schema::Hostname;

use crate::proxy::{Ctx, Edge, client_ip, request_host};

impl Edge {
    /// TLS rules before routing: on TLS, `Host` must name the SNI (421
    /// otherwise); on plain HTTP with redirects on, everything but ACME
    /// challenges goes to https for names with a certificate. `Some(true)` when a response was written.
    pub(crate) async fn tls_policy(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> Result<Option<bool>> {
        let sni = crate::tls::session_sni(session.digest());
        // Plain HTTP without redirects (the common lab/test case): nothing to check,
        // so the request path pays no Host parsing here.
        if sni.is_none() && !self.http_redirect {
            return Ok(None);
        }
        let req = session.req_header();
        let head = req.method == http::Method::HEAD;
        let host = request_host(req).and_then(|h| Hostname::from_host_header(h).ok());
        ctx.hostname = Some(host.clone());
        match sni {
            Some(sni) => {
                if sni.is_some() && sni.as_deref() == host.as_ref().map(Hostname::as_str) {
                    return Ok(None);
                }
                session.set_keepalive(None);
                self.write_error(
                    session,
                    421,
                    "Misdirected request",
                    "This connection's TLS name does not match the requested host.",
                    head,
                )
                .await?;
                Ok(Some(true))
            }
            None if self.http_redirect
                && !req.uri.path().starts_with("/.well-known/acme-challenge/") =>
            {
                let Some(host) = host else {
                    // An address or other non-name (`Host: 203.0.113.10`): no
                    // certificate can name it, so nothing to redirect to.
                    if request_host(req).is_some() {
                        return Ok(None);
                    }
                    self.write_error(
                        session,
                        400,
                        "Bad request",
                        "A Host header is required.",
                        head,
                    )
                    .await?;
                    return Ok(Some(true));
                };
                // A name with no certificate yet (its owner still proving it,
                // or the CA down) stays reachable over plain HTTP.
                if let Some(certs) = &self.certs {
                    match certs.serves(&host, client_ip(session)).await {
                        crate::tls::Serves::Yes => {}
                        crate::tls::Serves::No => return Ok(None),
                        // Not known either way: neither plain HTTP (a downgrade
                        // for a name that may have a certificate) nor a guess.
                        crate::tls::Serves::OverBudget(wait) => {
                            session.set_keepalive(None);
                            self.write_rate_limited(session, crate::limits::Limited::Misses, wait)
                                .await?;
                            return Ok(Some(true));
                        }
                    }
                }
                let port = match self.https_port {
                    Some(443) | None => String::new(),
                    Some(p) => format!(":{p}"),
                };
                let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
                let location = format!("https://{host}{port}{path}");
                let code = if head || req.method == http::Method::GET {
                    301
                } else {
                    308
                };
                let mut resp = ResponseHeader::build(code, Some(4))?;
                self.stamp(session, &mut resp)?;
                resp.insert_header(http::header::LOCATION, location)?;
                resp.insert_header(http::header::CONTENT_LENGTH, "0")?;
                session.write_response_header(Box::new(resp), true).await?;
                Ok(Some(true))
            }
            None => Ok(None),
        }
    }
}
