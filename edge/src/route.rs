//! Request classification: what the edge does with a request, from its
//! method and path alone (no I/O), so it is unit-tested without a session.

/// A storefront page the edge renders from its replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Page {
    /// `/`: the store's home with every category and product.
    Home,
    /// `/c/{slug}`: one category.
    Category(String),
    /// `/p/{slug}`: one product.
    Product(String),
}

/// What to do with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Render locally (GET/HEAD of a storefront page).
    Page(Page),
    /// Forward to the origin (writes, cart, checkout, seller API).
    Origin,
    /// A path the storefront does not have: local 404.
    NotFound,
    /// The platform's internal API (`/internal/…`, however spelled): never
    /// forwarded from the public edge, 404 for every method.
    Internal,
}

impl Route {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Page(Page::Home) => "home",
            Route::Page(Page::Category(_)) => "category",
            Route::Page(Page::Product(_)) => "product",
            Route::Origin => "origin",
            Route::NotFound => "not_found",
            Route::Internal => "internal",
        }
    }
}

/// Whether `path` names the internal API under any spelling a server on
/// the way might read as `/internal/…`: any case, repeated or backslash
/// separators, `.` and `..` segments, percent-encoding (decoded once, and
/// the raw form checked too).
pub fn is_internal(path: &str) -> bool {
    fn first_segment_is_internal(path: &str) -> bool {
        let mut segments: Vec<&str> = Vec::new();
        for seg in path.split(['/', '\\']) {
            match seg {
                "" | "." => {}
                ".." => {
                    segments.pop();
                }
                s => segments.push(s),
            }
        }
        segments
            .first()
            .is_some_and(|s| s.eq_ignore_ascii_case("internal"))
    }
    let path = path.split('?').next().unwrap_or("");
    // Every request passes here: most paths hold neither an escape nor the
    // word, and are answered without allocating.
    let mentions = path
        .as_bytes()
        .windows(8)
        .any(|w| w.eq_ignore_ascii_case(b"internal"));
    if !mentions && !path.contains('%') {
        return false;
    }
    first_segment_is_internal(path) || first_segment_is_internal(&percent_decode(path))
}

/// `path` with each `%XX` decoded once (invalid escapes and non-UTF-8
/// results are kept as they are).
fn percent_decode(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| path.to_owned())
}

fn valid_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 80
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Classifies a request. Query strings never affect page routes (they are not
/// part of the cache key, so they cannot be used to bust it).
pub fn classify(method: &http::Method, path: &str) -> Route {
    if is_internal(path) {
        return Route::Internal;
    }
    let read = method == http::Method::GET || method == http::Method::HEAD;
    if !read {
        return Route::Origin;
    }
    let path = path.split('?').next().unwrap_or("");
    if path == "/cart"
        || path == "/checkout"
        || path == "/orders"
        || path.starts_with("/orders/")
        || path.starts_with("/api/")
        || path.starts_with("/.well-known/")
    {
        return Route::Origin;
    }
    let page = match path {
        "/" | "" => Some(Page::Home),
        p => {
            let p = p.strip_suffix('/').unwrap_or(p);
            if let Some(slug) = p.strip_prefix("/c/") {
                valid_slug(slug).then(|| Page::Category(slug.to_owned()))
            } else if let Some(slug) = p.strip_prefix("/p/") {
                valid_slug(slug).then(|| Page::Product(slug.to_owned()))
            } else {
                None
            }
        }
    };
    page.map_or(Route::NotFound, Route::Page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    #[test]
    fn classify_pages_for_get_and_head() {
        assert_eq!(classify(&Method::GET, "/"), Route::Page(Page::Home));
        assert_eq!(classify(&Method::HEAD, "/?utm=1"), Route::Page(Page::Home));
        assert_eq!(
            classify(&Method::GET, "/c/curries"),
            Route::Page(Page::Category("curries".into()))
        );
        assert_eq!(
            classify(&Method::GET, "/p/samosa-0-0/"),
            Route::Page(Page::Product("samosa-0-0".into()))
        );
    }

    #[test]
    fn the_internal_api_is_never_forwarded_however_it_is_spelled() {
        for path in [
            "/internal/acme/account",
            "/internal",
            "/internal/",
            "/INTERNAL/certificates/x",
            "//internal/acme/account",
            "/./internal/acme/account",
            "/p/../internal/acme/account",
            "/%69nternal/acme/account",
            "/%2Finternal/x",
            "/\\internal/x",
            "/Internal?x=1",
        ] {
            for m in [
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::HEAD,
            ] {
                assert_eq!(classify(&m, path), Route::Internal, "{m} {path}");
            }
        }
        for path in [
            "/internals",
            "/p/internal",
            "/api/internal",
            "/c/internal-tools",
        ] {
            assert_ne!(classify(&Method::POST, path), Route::Internal, "{path}");
        }
    }

    #[test]
    fn classify_writes_and_cart_go_to_origin() {
        assert_eq!(classify(&Method::POST, "/"), Route::Origin);
        assert_eq!(classify(&Method::POST, "/cart"), Route::Origin);
        assert_eq!(classify(&Method::GET, "/cart"), Route::Origin);
        assert_eq!(classify(&Method::GET, "/api/products"), Route::Origin);
        assert_eq!(classify(&Method::DELETE, "/api/products/1"), Route::Origin);
    }

    #[test]
    fn classify_unknown_or_bad_slugs_as_not_found() {
        assert_eq!(classify(&Method::GET, "/favicon.ico"), Route::NotFound);
        assert_eq!(classify(&Method::GET, "/c/"), Route::NotFound);
        assert_eq!(classify(&Method::GET, "/p/<script>"), Route::NotFound);
        assert_eq!(classify(&Method::GET, "/c/a/b"), Route::NotFound);
    }
}
