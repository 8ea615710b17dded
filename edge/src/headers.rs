//! Header names the edge sets or reads, in one place.

use http::HeaderName;

/// The region that answered, on every response (rendered, proxied, errors).
pub const X_EDGE_ROUTE: HeaderName = HeaderName::from_static("x-edge-route");
/// RFC 9211 cache status of rendered pages.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// Timing breakdown of rendered pages (W3C Server-Timing).
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
/// The region whose edge forwarded a request, sent to the origin.
pub const X_EDGE_REGION: HeaderName = HeaderName::from_static("x-edge-region");
/// Client address as seen by the edge, sent to the origin.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The name this cache reports itself as in `cache-status`.
pub const CACHE_NAME: &str = "edgefront";
