//! Request classification: what the edge does with a request, from its
//! method and path alone (no I/O), so it is unit-tested without a session.

/// A storefront page the edge renders from its replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Page {
    /// `/` (`?page=N`): the store's home, its categories with their
    /// products, [`PER_PAGE`] products a page.
    Home(u32),
    /// `/c/{slug}` (`?page=N`): one category's products, [`PER_PAGE`] a page.
    Category(String, u32),
    /// `/p/{slug}`: one product.
    Product(String),
}

/// Products on one page of a listing (the home page, a category): no page
/// grows with the catalog; the next ones are on `?page=2`, `?page=3`, …
pub const PER_PAGE: u32 = 48;

/// The highest page number a URL may name.
pub const MAX_PAGE: u32 = 10_000;

impl Page {
    /// The path (and query) that names this page: what [`classify`] reads
    /// back into it.
    pub fn path(&self) -> String {
        let listing = |base: String, n: u32| {
            if n == 1 {
                base
            } else {
                format!("{base}?page={n}")
            }
        };
        match self {
            Page::Home(n) => listing("/".into(), *n),
            Page::Category(s, n) => listing(format!("/c/{s}"), *n),
            Page::Product(s) => format!("/p/{s}"),
        }
    }

    /// The page number of a listing (1 for a product page).
    pub fn number(&self) -> u32 {
        match self {
            Page::Home(n) | Page::Category(_, n) => *n,
            Page::Product(_) => 1,
        }
    }
}

/// How many pages a listing of `products` takes (at least 1: an empty
/// listing still has its first page).
pub fn pages_for(products: u64) -> u32 {
    u32::try_from(products.div_ceil(u64::from(PER_PAGE)).max(1)).unwrap_or(u32::MAX)
}

/// The `page` parameter of a listing's query string: 1 without one; `None`
/// when it is no page number (0, not digits, over [`MAX_PAGE`]): a 404, so
/// made-up numbers never name distinct pages.
fn page_number(query: &str) -> Option<u32> {
    let mut n = 1;
    for v in query.split('&').filter_map(|kv| kv.strip_prefix("page=")) {
        if v.is_empty() || v.len() > 5 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n = v.parse().ok().filter(|n| (1..=MAX_PAGE).contains(n))?;
    }
    Some(n)
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
            Route::Page(Page::Home(_)) => "home",
            Route::Page(Page::Category(..)) => "category",
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

/// Classifies a request (`path` with its query). The query affects a page
/// route only through a listing's `page` number, normalised and bounded
/// ([`MAX_PAGE`]); other parameters are ignored, so they cannot bust the
/// cache.
pub fn classify(method: &http::Method, path: &str) -> Route {
    if is_internal(path) {
        return Route::Internal;
    }
    let read = method == http::Method::GET || method == http::Method::HEAD;
    if !read {
        return Route::Origin;
    }
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
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
        "/" | "" => page_number(query).map(Page::Home),
        p => {
            let p = p.strip_suffix('/').unwrap_or(p);
            if let Some(slug) = p.strip_prefix("/c/") {
                valid_slug(slug)
                    .then_some(())
                    .and_then(|()| page_number(query))
                    .map(|n| Page::Category(slug.to_owned(), n))
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
        assert_eq!(classify(&Method::GET, "/"), Route::Page(Page::Home(1)));
        assert_eq!(
            classify(&Method::HEAD, "/?utm=1"),
            Route::Page(Page::Home(1))
        );
        assert_eq!(
            classify(&Method::GET, "/c/curries"),
            Route::Page(Page::Category("curries".into(), 1))
        );
        assert_eq!(
            classify(&Method::GET, "/p/samosa-0-0/"),
            Route::Page(Page::Product("samosa-0-0".into()))
        );
    }

    #[test]
    fn listings_take_a_page_number_and_made_up_ones_are_not_pages() {
        let get = |p: &str| classify(&Method::GET, p);
        assert_eq!(get("/?page=2"), Route::Page(Page::Home(2)));
        assert_eq!(get("/?utm=x&page=1"), Route::Page(Page::Home(1)));
        assert_eq!(
            get("/c/curries?page=10000"),
            Route::Page(Page::Category("curries".into(), 10_000))
        );
        assert_eq!(
            get("/c/curries/?page=007"),
            Route::Page(Page::Category("curries".into(), 7))
        );
        for bad in [
            "/?page=0",
            "/?page=",
            "/?page=-1",
            "/?page=2x",
            "/?page=10001",
            "/?page=99999999999",
            "/c/curries?page=abc",
            "/c/curries?page=1&page=%32",
        ] {
            assert_eq!(get(bad), Route::NotFound, "{bad}");
        }
        // A product page has no page number: the query is ignored.
        assert_eq!(
            get("/p/samosa?page=abc"),
            Route::Page(Page::Product("samosa".into()))
        );
        for page in [
            Page::Home(1),
            Page::Home(3),
            Page::Category("curries".into(), 1),
            Page::Category("curries".into(), 12),
            Page::Product("samosa".into()),
        ] {
            assert_eq!(get(&page.path()), Route::Page(page));
        }
        assert_eq!(pages_for(0), 1);
        assert_eq!(pages_for(48), 1);
        assert_eq!(pages_for(49), 2);
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
