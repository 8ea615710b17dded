//! The edge's Pingora `ProxyHttp` implementation: the request's story,
//! phase by phase.
//!
//! `request_filter` classifies the request ([`crate::route`]) after the TLS
//! rules ([`crate::https`]); a storefront page is the page policy's answer
//! ([`crate::pages`]), written here (`Ok(true)`); everything else goes on to
//! `upstream_peer`, which only ever names the origin. Every response
//! carries `x-edge-route`: local ones are stamped where they are written
//! ([`crate::respond`]), proxied ones in `response_filter`, and proxy
//! failures in `fail_to_proxy`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use edgefront_schema::{COMMIT_LSN_HEADER, Hostname, Lsn};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};

use crate::headers::{X_EDGE_REGION, X_FORWARDED_FOR};
use crate::limits::Limited;
use crate::metrics::Metrics;
use crate::pages::{Answer, Pages};
use crate::respond::{is_tls, origin_failure, secure_cookies};
use crate::route::{Page, Route, classify};

/// Largest request body forwarded to the origin.
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest total size of request header names and values.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Total size of a request's header names and values.
pub fn header_bytes(req: &RequestHeader) -> usize {
    req.headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri.path_and_query().map_or(0, |p| p.as_str().len())
}

/// The edge service's shared state.
pub struct Edge {
    /// Storefront pages: the page policy (cache, replica, read-your-writes).
    pub pages: Arc<Pages>,
    pub region: String,
    pub origin: SocketAddr,
    /// With failover candidates: the origins, of which requests go to the
    /// one whose health check passes (its database leads).
    pub origins: Option<Arc<pingora::lb::LoadBalancer<pingora::lb::selection::RoundRobin>>>,
    /// TLS to the origin: the server name its certificate must carry and
    /// the CA it must chain to (nothing else is trusted).
    pub origin_tls: Option<(String, Arc<pingora::protocols::tls::CaType>)>,
    /// Abuse limits: per client address and per store (crate::limits).
    pub limits: Arc<crate::limits::ClientLimits>,
    /// The TLS listener's port, when TLS is on.
    pub https_port: Option<u16>,
    /// `Strict-Transport-Security` value sent on every TLS response.
    pub hsts: Option<String>,
    /// Certificates: plain HTTP is redirected only for names that have one.
    pub certs: Option<Arc<crate::tls::CertLoader>>,
    /// Redirect plain HTTP to https.
    pub http_redirect: bool,
    pub metrics: Arc<Metrics>,
    /// In-flight requests and the drain switch, shared with the admin listener.
    pub traffic: Arc<crate::traffic::Traffic>,
}

/// Per-request state.
pub struct Ctx {
    pub(crate) start: Instant,
    route: Route,
    /// The request's host, for the access log.
    pub(crate) host: String,
    /// How the answer was found (`hit`, `miss`, `stale`, `error`, …).
    pub(crate) cache: &'static str,
    /// Body bytes: received, and for a written page sent.
    pub(crate) body_bytes: usize,
    /// The request's `Host` as a name, once parsed (`Some(None)`: not a name).
    pub(crate) hostname: Option<Option<Hostname>>,
    upstream_start: Option<Instant>,
    _in_flight: crate::traffic::InFlight,
    /// The request's span (exported when tracing is on).
    span: tracing::Span,
    /// The upstream (origin) call's span, while it lasts.
    upstream_span: Option<tracing::Span>,
}

pub(crate) fn header_str(req: &RequestHeader, name: http::header::HeaderName) -> Option<&str> {
    req.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The client's address as the connection shows it (never a header).
pub(crate) fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// The request's host: the `Host` header, or the URI authority (HTTP/2).
pub(crate) fn request_host(req: &RequestHeader) -> Option<&str> {
    header_str(req, http::header::HOST).or_else(|| req.uri.authority().map(|a| a.as_str()))
}

impl Edge {
    /// Serves a storefront page: the page policy's answer (crate::pages),
    /// written.
    async fn serve_page(&self, session: &mut Session, ctx: &mut Ctx, page: Page) -> Result<()> {
        let req = session.req_header();
        let head = req.method == http::Method::HEAD;
        // Parsed once: by the TLS rules if they needed it, else here.
        let host = match ctx.hostname.take() {
            Some(parsed) => parsed,
            None => request_host(req).and_then(|h| Hostname::from_host_header(h).ok()),
        };
        if let Some(h) = &host {
            ctx.host = h.as_str().to_owned();
        }
        let answer = self
            .pages
            .answer(host, page, client_ip(session), &req.headers, &ctx.span)
            .await;
        ctx.cache = answer.label();
        match answer {
            Answer::Page(entry, source) => {
                let timing = source.server_timing(&entry, ctx.start.elapsed());
                self.write_page(session, ctx, &entry, source.cache_status(), timing)
                    .await
            }
            Answer::NoSuchStore(host) => {
                let msg = match host {
                    Some(h) => format!("No store is configured for {h}."),
                    None => "No store is configured for this address.".to_owned(),
                };
                self.write_error(session, 404, "Store not found", &msg, head)
                    .await
            }
            Answer::Limited(what, wait) => {
                self.write_limited_page(session, ctx, what, wait, head)
                    .await
            }
            Answer::Unavailable(e) => self.replica_down(session, ctx, e, head).await,
        }
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            route: Route::Origin,
            host: String::new(),
            cache: "none",
            body_bytes: 0,
            hostname: None,
            upstream_start: None,
            _in_flight: self.traffic.begin(),
            span: tracing::info_span!(
                "request",
                otel.name = "edge request",
                otel.kind = "server",
                edgefront.region = %self.region,
                http.request.method = tracing::field::Empty,
                url.path = tracing::field::Empty,
                http.route = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
                edgefront.cache = tracing::field::Empty,
            ),
            upstream_span: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if self.traffic.draining() {
            // HTTP/1.1 answers `Connection: close`; the next request opens a
            // new connection, which follows the route once it is withdrawn.
            session.set_keepalive(None);
        }
        let req = session.req_header();
        // With the query: a listing's page number is in it.
        let target = req
            .uri
            .path_and_query()
            .map_or(req.uri.path(), |p| p.as_str());
        ctx.route = classify(&req.method, target);
        edgefront_schema::telemetry::extract(&ctx.span, &req.headers);
        ctx.span.record("http.request.method", req.method.as_str());
        ctx.span.record("url.path", req.uri.path());
        ctx.span.record("http.route", ctx.route.label());
        if header_bytes(req) > MAX_HEADER_BYTES {
            let head = req.method == http::Method::HEAD;
            session.set_keepalive(None);
            self.write_error(
                session,
                431,
                "Request headers too large",
                "The request's headers are too large.",
                head,
            )
            .await?;
            return Ok(true);
        }
        if let Some(done) = self.tls_policy(session, ctx).await? {
            return Ok(done);
        }
        let req = session.req_header();
        match ctx.route.clone() {
            Route::Page(page) => {
                self.serve_page(session, ctx, page).await?;
                Ok(true)
            }
            Route::Internal => {
                // The internal API is for the platform's own machines, over
                // their own channel; from the Internet it does not exist.
                self.metrics.internal_refused.inc();
                tracing::warn!(
                    method = %req.method,
                    path = %req.uri.path(),
                    reason = "the internal API is not served on the public edge",
                    "refused"
                );
                let head = req.method == http::Method::HEAD;
                session.set_keepalive(None);
                self.write_not_found(session, head).await?;
                Ok(true)
            }
            Route::NotFound => {
                let head = req.method == http::Method::HEAD;
                self.write_not_found(session, head).await?;
                Ok(true)
            }
            Route::Origin => {
                ctx.host = request_host(req).unwrap_or("").to_owned();
                let too_big = header_str(req, http::header::CONTENT_LENGTH)
                    .and_then(|v| v.parse::<usize>().ok())
                    .is_some_and(|n| n > MAX_BODY);
                if too_big {
                    return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
                }
                // Every request to the origin counts against the client's
                // budget (ACME challenges come from the CA: exempt), and the
                // seller API's costly anonymous calls against their own.
                let challenge = req.uri.path().starts_with("/.well-known/acme-challenge/");
                let limits = [
                    (!challenge).then_some(Limited::OriginRequests),
                    Limited::of(&req.method, req.uri.path()),
                ];
                let over = client_ip(session).and_then(|ip| {
                    limits
                        .into_iter()
                        .flatten()
                        .find_map(|what| self.limits.check(what, ip).err().map(|wait| (what, wait)))
                });
                if let Some((what, wait)) = over {
                    self.metrics
                        .rate_limited
                        .with_label_values(&[what.label()])
                        .inc();
                    self.write_rate_limited(session, what, wait).await?;
                    return Ok(true);
                }
                // ACME HTTP-01: answer from the replica when the challenge has
                // replicated; otherwise the origin answers from the primary.
                if let Some(token) = req.uri.path().strip_prefix("/.well-known/acme-challenge/")
                    && req.method == http::Method::GET
                {
                    let token = token.to_owned();
                    if let Ok(Some(ka)) = self.pages.replica.acme_challenge(&token).await {
                        ctx.cache = "replica";
                        let mut resp = ResponseHeader::build(200, Some(4))?;
                        self.stamp(session, &mut resp)?;
                        resp.insert_header(http::header::CONTENT_TYPE, "application/octet-stream")?;
                        resp.insert_header(http::header::CONTENT_LENGTH, ka.len().to_string())?;
                        session.write_response_header(Box::new(resp), false).await?;
                        session
                            .write_response_body(Some(Bytes::from(ka)), true)
                            .await?;
                        return Ok(true);
                    }
                }
                Ok(false)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.body_bytes += body.as_ref().map_or(0, Bytes::len);
        if ctx.body_bytes > MAX_BODY {
            return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.upstream_start = Some(Instant::now());
        ctx.upstream_span = Some(tracing::info_span!(
            parent: &ctx.span,
            "upstream",
            otel.name = "upstream to origin",
            otel.kind = "client",
            server.address = %self.origin,
        ));
        let origin = match &self.origins {
            Some(lb) => match lb.select(b"", 8).and_then(|b| b.addr.as_inet().copied()) {
                Some(a) => a,
                None => {
                    // No origin's database leads (a failover in progress).
                    return Error::e_explain(ErrorType::ConnectRefused, "no origin leads now");
                }
            },
            None => self.origin,
        };
        let mut peer = match &self.origin_tls {
            Some((name, ca)) => {
                let mut p = HttpPeer::new(origin, true, name.clone());
                p.options.ca = Some(ca.clone());
                p
            }
            None => HttpPeer::new(origin, false, String::new()),
        };
        peer.options.connection_timeout = Some(Duration::from_secs(1));
        peer.options.total_connection_timeout = Some(Duration::from_secs(2));
        peer.options.read_timeout = Some(Duration::from_secs(30));
        peer.options.write_timeout = Some(Duration::from_secs(10));
        peer.options.idle_timeout = Some(Duration::from_secs(30));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        upstream.insert_header(X_EDGE_REGION, self.region.as_str())?;
        // One trace from the shopper through the edge to the origin.
        let parent = ctx.upstream_span.as_ref().unwrap_or(&ctx.span);
        for (k, v) in edgefront_schema::telemetry::inject(parent) {
            upstream.insert_header(k, v)?;
        }
        if let Some(addr) = session.client_addr().and_then(|a| a.as_inet()) {
            let prior = header_str(upstream, X_FORWARDED_FOR).map(str::to_owned);
            let value = match prior {
                Some(p) => format!("{p}, {}", addr.ip()),
                None => addr.ip().to_string(),
            };
            upstream.insert_header(X_FORWARDED_FOR, value)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // The origin answered: the upstream call is over.
        ctx.upstream_span = None;
        self.stamp(session, resp)?;
        if is_tls(session) {
            secure_cookies(resp)?;
        }
        // Hand the write's commit LSN to the client: its next reads wait for
        // (or bypass) a replica that has not replayed it.
        let lsn = resp
            .headers
            .get(COMMIT_LSN_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Lsn>().ok());
        if let Some(lsn) = lsn {
            resp.append_header(
                http::header::SET_COOKIE,
                self.pages.ryw.set_cookie(lsn, is_tls(session)),
            )?;
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (code, message) = origin_failure(e);
        if matches!(
            e.etype(),
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
        ) && e.esource() == &ErrorSource::Downstream
        {
            // The shopper is gone: nothing to answer.
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        if e.esource() == &ErrorSource::Upstream {
            tracing::warn!(region = %self.region, host = %ctx.host, error = %e, status = code, "proxy to origin failed");
        } else {
            tracing::debug!(region = %self.region, host = %ctx.host, error = %e, status = code, "request refused");
        }
        let body = Bytes::from(format!(
            "{{\"error\":{{\"code\":\"{}\",\"message\":\"{}\",\"region\":\"{}\"}}}}\n",
            match code {
                503 => "origin_unavailable",
                504 => "origin_timeout",
                502 => "bad_gateway",
                413 => "body_too_large",
                400 => "bad_request",
                _ => "error",
            },
            message,
            self.region
        ));
        let written = async {
            let mut resp = ResponseHeader::build(code, Some(5))?;
            self.stamp(session, &mut resp)?;
            resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
            resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
            resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
            if code == 503 {
                resp.insert_header(http::header::RETRY_AFTER, "2")?;
            }
            session.write_response_header(Box::new(resp), false).await?;
            session.write_response_body(Some(body), true).await
        }
        .await;
        if let Err(we) = written {
            tracing::debug!(error = %we, "could not send error response");
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route = ctx.route.label();
        let elapsed = ctx.start.elapsed();
        self.metrics
            .requests
            .with_label_values(&[route, &status.to_string()])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        ctx.upstream_span = None;
        ctx.span.record("http.response.status_code", status);
        ctx.span.record("edgefront.cache", ctx.cache);
        let trace_id = edgefront_schema::telemetry::trace_id(&ctx.span);
        let req = session.req_header();
        tracing::info!(
            target: "access",
            trace_id = trace_id.as_deref(),
            region = %self.region,
            host = %ctx.host,
            method = %req.method,
            path = %req.uri.path(),
            route,
            status,
            cache = ctx.cache,
            duration_ms = elapsed.as_secs_f64() * 1e3,
            upstream_ms = ctx.upstream_start.map(|t| t.elapsed().as_secs_f64() * 1e3),
            error = e.map(|e| e.to_string()),
        );
    }
}
