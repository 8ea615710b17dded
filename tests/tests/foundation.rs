//! One region end to end against real PostgreSQL (primary + streaming
//! replica), the origin and the edge binaries.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use edgefront_tests::{Edge, Stack, client, eventually, free_port};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

/// A store created through the origin's seller API.
struct Seller {
    token: String,
    slug: String,
}

async fn create_store(stack: &Stack, slug: &str, name: &str, currency: &str) -> Result<Seller> {
    let r = client()
        .post(format!("{}/api/stores", stack.origin.url()))
        .json(&json!({ "name": name, "slug": slug, "currency": currency, "tagline": "Fresh every day" }))
        .send()
        .await?;
    ensure!(
        r.status() == StatusCode::CREATED,
        "create store: {}",
        r.status()
    );
    ensure!(
        r.headers().contains_key("x-commit-lsn"),
        "write must return its commit LSN"
    );
    let v: Value = r.json().await?;
    Ok(Seller {
        token: v["token"].as_str().context("token")?.to_owned(),
        slug: slug.to_owned(),
    })
}

/// A seller API call through the edge (proxied to the origin).
async fn seller(
    stack: &Stack,
    s: &Seller,
    method: reqwest::Method,
    path: &str,
    body: Value,
) -> Result<(StatusCode, Value)> {
    let r = client()
        .request(method, format!("{}{path}", stack.edge.url()))
        .bearer_auth(&s.token)
        .header("host", format!("api.{}", stack.platform_domain))
        .json(&body)
        .send()
        .await?;
    let status = r.status();
    ensure!(
        r.headers()
            .get("x-edge-route")
            .and_then(|v| v.to_str().ok())
            == Some(stack.edge.region.as_str()),
        "proxied responses carry x-edge-route"
    );
    let v = r.json().await.unwrap_or(Value::Null);
    Ok((status, v))
}

async fn page(stack: &Stack, host: &str, path: &str) -> Result<reqwest::Response> {
    Ok(client()
        .get(format!("{}{path}", stack.edge.url()))
        .header("host", host)
        .send()
        .await?)
}

/// Waits until the edge serves `needle` on `path` of `host` (replication + TTL).
async fn wait_for_page(stack: &Stack, host: &str, path: &str, needle: &str) -> Result<String> {
    eventually(WAIT, &format!("{needle:?} on {host}{path}"), || async {
        let r = page(stack, host, path).await.ok()?;
        if r.status() != StatusCode::OK {
            return None;
        }
        let body = r.text().await.ok()?;
        body.contains(needle).then_some(body)
    })
    .await
}

async fn primary_count(stack: &Stack, sql: &str) -> Result<i64> {
    let pool = sqlx::PgPool::connect(&stack.primary.url()).await?;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&pool)
        .await?;
    pool.close().await;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_serves_seller_changes_from_replica_with_prices_and_route() -> Result<()> {
    let stack = Stack::start("bom1", 300)?;
    let s = create_store(&stack, "chai-corner", "Chai Corner", "INR").await?;
    let (st, cat) = seller(
        &stack,
        &s,
        reqwest::Method::POST,
        "/api/categories",
        json!({ "name": "Chai & Coffee" }),
    )
    .await?;
    assert_eq!(st, StatusCode::CREATED, "{cat}");
    let cat_id = cat["category"]["id"].as_i64().context("category id")?;
    let (st, p) = seller(
        &stack,
        &s,
        reqwest::Method::POST,
        "/api/products",
        json!({ "name": "Masala Chai ☕", "price_cents": 129_900, "category_id": cat_id, "description": "Spiced, sweet, strong." }),
    )
    .await?;
    assert_eq!(st, StatusCode::CREATED, "{p}");
    let (st, d) = seller(
        &stack,
        &s,
        reqwest::Method::POST,
        "/api/domains",
        json!({ "hostname": "Chai-Corner.Example." }),
    )
    .await?;
    assert_eq!(st, StatusCode::CREATED, "{d}");
    assert_eq!(d["domain"]["hostname"], "chai-corner.example");
    assert_eq!(d["domain"]["state"], "pending", "{d}");
    assert_eq!(
        d["domain"]["record"]["name"],
        "_edgefront.chai-corner.example"
    );
    // Pending: never served as the store.
    let r = page(&stack, "chai-corner.example", "/").await?;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "a pending domain is not served"
    );
    // The seller publishes the record; a check now makes it active.
    stack
        .origin
        .dns
        .set_txt(
            d["domain"]["record"]["name"].as_str().context("record")?,
            d["domain"]["record"]["value"].as_str().context("value")?,
        )
        .await?;
    let (st, v) = seller(
        &stack,
        &s,
        reqwest::Method::POST,
        "/api/domains/chai-corner.example/verify",
        json!({}),
    )
    .await?;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["domain"]["state"], "active", "{v}");

    // The custom domain and the platform name both reach the store, from the replica.
    let body = wait_for_page(&stack, "chai-corner.example", "/", "Masala Chai ☕").await?;
    assert!(body.contains("₹1,299.00"), "price formatted with currency");
    assert!(
        body.contains(r#"action="/cart""#),
        "add-to-cart form posts through the edge"
    );
    wait_for_page(
        &stack,
        &format!("{}.{}", s.slug, stack.platform_domain),
        "/",
        "Masala Chai",
    )
    .await?;

    // Headers: route, cache status miss → hit, server timing.
    let r = page(&stack, "chai-corner.example", "/c/chai-coffee").await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-edge-route"], "bom1");
    let first = r.headers()["cache-status"].to_str()?.to_owned();
    assert!(r.headers()["server-timing"].to_str()?.contains("dur="));
    let r = page(&stack, "chai-corner.example", "/c/chai-coffee").await?;
    let second = r.headers()["cache-status"].to_str()?.to_owned();
    assert!(
        first.contains("fwd=miss") || second.contains("hit"),
        "{first} then {second}"
    );
    assert!(r.text().await?.contains("Masala Chai"));

    // The product page, and HEAD with the same headers and no body.
    let slug = p["product"]["slug"].as_str().context("slug")?;
    let body = wait_for_page(
        &stack,
        "chai-corner.example",
        &format!("/p/{slug}"),
        "Spiced, sweet, strong.",
    )
    .await?;
    assert!(body.contains("₹1,299.00"));
    let r = client()
        .head(format!("{}/p/{slug}", stack.edge.url()))
        .header("host", "chai-corner.example")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["x-edge-route"], "bom1");
    assert!(r.text().await?.is_empty());

    // A price change reaches the page (TTL-bounded until change-log invalidation).
    let pid = p["product"]["id"].as_i64().context("id")?;
    let (st, _) = seller(
        &stack,
        &s,
        reqwest::Method::PATCH,
        &format!("/api/products/{pid}"),
        json!({ "price_cents": 99_00 }),
    )
    .await?;
    assert_eq!(st, StatusCode::OK);
    wait_for_page(&stack, "chai-corner.example", "/", "₹99.00").await?;

    // Unknown product in a known store: the store's 404 page.
    let r = page(&stack, "chai-corner.example", "/p/nope").await?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["x-edge-route"], "bom1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_through_edge_lands_once_and_replayed_key_returns_same_order() -> Result<()> {
    let stack = Stack::start("sin1", 300)?;
    let s = create_store(&stack, "kopi", "Kopi Tiam", "SGD").await?;
    let (_, p) = seller(
        &stack,
        &s,
        reqwest::Method::POST,
        "/api/products",
        json!({ "name": "Kaya Toast", "price_cents": 450 }),
    )
    .await?;
    let pid = p["product"]["id"].as_i64().context("id")?;
    let host = format!("kopi.{}", stack.platform_domain);
    let order = |key: &'static str| {
        client()
            .post(format!("{}/orders", stack.edge.url()))
            .header("host", host.clone())
            .header("idempotency-key", key)
            .json(&json!({ "email": "shopper@example.com", "items": [{ "product_id": pid, "quantity": 2 }] }))
            .send()
    };
    let r1 = order("order-key-1").await?;
    assert_eq!(r1.status(), StatusCode::CREATED);
    assert_eq!(r1.headers()["x-edge-route"], "sin1");
    assert!(r1.headers().contains_key("x-commit-lsn"));
    let o1: Value = r1.json().await?;
    assert_eq!(o1["order"]["total_cents"], 900);
    let r2 = order("order-key-1").await?;
    assert_eq!(r2.status(), StatusCode::OK);
    assert_eq!(r2.headers()["idempotent-replayed"], "true");
    let o2: Value = r2.json().await?;
    assert_eq!(o1["order"]["id"], o2["order"]["id"]);

    // Ten concurrent requests with one new key: exactly one order.
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(order("order-key-2"));
    }
    let results = futures_join(tasks).await;
    let mut ids = std::collections::HashSet::new();
    for r in results {
        let r = r?;
        assert!(r.status().is_success(), "{}", r.status());
        let v: Value = r.json().await?;
        ids.insert(v["order"]["id"].as_i64().context("id")?);
    }
    assert_eq!(ids.len(), 1, "one order for one key");
    assert_eq!(
        primary_count(&stack, "SELECT count(*) FROM orders").await?,
        2
    );

    // The same key with a different body is refused, naming the key.
    let r = client()
        .post(format!("{}/orders", stack.edge.url()))
        .header("host", host.clone())
        .header("idempotency-key", "order-key-1")
        .json(&json!({ "email": "shopper@example.com", "items": [{ "product_id": pid, "quantity": 5 }] }))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let v: Value = r.json().await?;
    assert_eq!(v["error"]["field"], "Idempotency-Key");

    // The storefront cart flow through the edge: add, view, checkout once.
    let jar_client = reqwest::Client::builder()
        .no_proxy()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let r = jar_client
        .post(format!("{}/cart", stack.edge.url()))
        .header("host", host.clone())
        .form(&[("product_id", pid.to_string()), ("quantity", "3".into())])
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["x-edge-route"], "sin1");
    let cart = jar_client
        .get(format!("{}/cart", stack.edge.url()))
        .header("host", host.clone())
        .send()
        .await?
        .text()
        .await?;
    assert!(
        cart.contains("Kaya Toast") && cart.contains("S$13.50"),
        "{cart}"
    );
    for _ in 0..2 {
        let r = jar_client
            .post(format!("{}/checkout", stack.edge.url()))
            .header("host", host.clone())
            .form(&[
                ("email", "cart@example.com"),
                ("idempotency_key", "checkout-1"),
            ])
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.text().await?.contains("S$13.50"));
    }
    assert_eq!(
        primary_count(
            &stack,
            "SELECT count(*) FROM orders WHERE idempotency_key = 'checkout-1'"
        )
        .await?,
        1
    );
    Ok(())
}

async fn futures_join<F: std::future::Future + Send + 'static>(fs: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seller_token_of_store_b_cannot_change_store_a() -> Result<()> {
    let stack = Stack::start("ams1", 300)?;
    let a = create_store(&stack, "store-a", "Store A", "EUR").await?;
    let b = create_store(&stack, "store-b", "Store B", "EUR").await?;
    let (_, pa) = seller(
        &stack,
        &a,
        reqwest::Method::POST,
        "/api/products",
        json!({ "name": "Stroopwafel", "price_cents": 350 }),
    )
    .await?;
    let (_, ca) = seller(
        &stack,
        &a,
        reqwest::Method::POST,
        "/api/categories",
        json!({ "name": "Koekjes" }),
    )
    .await?;
    let pid = pa["product"]["id"].as_i64().context("id")?;
    let cid = ca["category"]["id"].as_i64().context("id")?;

    let (st, _) = seller(
        &stack,
        &b,
        reqwest::Method::PATCH,
        &format!("/api/products/{pid}"),
        json!({ "price_cents": 1 }),
    )
    .await?;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = seller(
        &stack,
        &b,
        reqwest::Method::DELETE,
        &format!("/api/products/{pid}"),
        json!({}),
    )
    .await?;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = seller(
        &stack,
        &b,
        reqwest::Method::DELETE,
        &format!("/api/categories/{cid}"),
        json!({}),
    )
    .await?;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // B cannot file its product under A's category either.
    let (st, v) = seller(
        &stack,
        &b,
        reqwest::Method::POST,
        "/api/products",
        json!({ "name": "X", "price_cents": 1, "category_id": cid }),
    )
    .await?;
    assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["error"]["field"], "category_id");
    // No token, or a forged one: 401 naming authorization.
    let bad = Seller {
        token: format!("eft_{}", "0".repeat(64)),
        slug: "x".into(),
    };
    let (st, v) = seller(
        &stack,
        &bad,
        reqwest::Method::GET,
        "/api/products",
        json!({}),
    )
    .await?;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["field"], "authorization");

    assert_eq!(
        primary_count(
            &stack,
            &format!("SELECT price_cents FROM products WHERE id = {pid}")
        )
        .await?,
        350
    );
    assert_eq!(
        primary_count(
            &stack,
            &format!("SELECT count(*) FROM categories WHERE id = {cid}")
        )
        .await?,
        1
    );
    // And A's own token still works.
    let (st, _) = seller(
        &stack,
        &a,
        reqwest::Method::PATCH,
        &format!("/api/products/{pid}"),
        json!({ "price_cents": 400 }),
    )
    .await?;
    assert_eq!(st, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_4xx_naming_the_field_and_writes_nothing() -> Result<()> {
    let stack = Stack::start("fra1", 300)?;
    let s = create_store(&stack, "brezel", "Brezel Bäckerei", "EUR").await?;
    let cases = [
        (
            "/api/products",
            json!({ "name": "Brezel", "price_cents": -5 }),
            "price_cents",
        ),
        (
            "/api/products",
            json!({ "name": "", "price_cents": 5 }),
            "name",
        ),
        ("/api/products", json!({ "price_cents": 5 }), "name"),
        (
            "/api/products",
            json!({ "name": "Brezel", "price_cents": "five" }),
            "price_cents",
        ),
        (
            "/api/products",
            json!({ "name": "🥨", "price_cents": 5 }),
            "slug",
        ),
        (
            "/api/domains",
            json!({ "hostname": "198.51.100.4" }),
            "hostname",
        ),
        (
            "/api/domains",
            json!({ "hostname": "bad_host.example" }),
            "hostname",
        ),
        (
            "/api/domains",
            json!({ "hostname": "x.shops.edgefront.test" }),
            "hostname",
        ),
        (
            "/api/domains",
            json!({ "hostname": "shops.edgefront.test" }),
            "hostname",
        ),
        (
            "/api/domains",
            json!({ "hostname": "*.brezel.example" }),
            "hostname",
        ),
        (
            "/api/categories",
            json!({ "name": "Brot", "slug": "Not A Slug" }),
            "slug",
        ),
    ];
    for (path, body, field) in cases {
        let (st, v) = seller(&stack, &s, reqwest::Method::POST, path, body.clone()).await?;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY, "{path} {body}: {v}");
        assert_eq!(v["error"]["field"], field, "{path} {body}: {v}");
    }
    // Malformed JSON: 400 with a JSON error.
    let r = client()
        .post(format!("{}/api/products", stack.edge.url()))
        .bearer_auth(&s.token)
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await?["error"]["code"], "bad_request");
    // A duplicate store slug: 409 on slug.
    let r = client()
        .post(format!("{}/api/stores", stack.origin.url()))
        .json(&json!({ "name": "Again", "slug": "brezel", "currency": "EUR" }))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(r.json::<Value>().await?["error"]["field"], "slug");
    // An order with one bad line writes nothing at all.
    let (_, p) = seller(
        &stack,
        &s,
        reqwest::Method::POST,
        "/api/products",
        json!({ "name": "Brezel", "price_cents": 120 }),
    )
    .await?;
    let pid = p["product"]["id"].as_i64().context("id")?;
    let r = client()
        .post(format!("{}/orders", stack.edge.url()))
        .header("host", format!("brezel.{}", stack.platform_domain))
        .header("idempotency-key", "k1")
        .json(&json!({ "email": "a@b.example", "items": [{ "product_id": pid, "quantity": 1 }, { "product_id": 999999, "quantity": 1 }] }))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        r.json::<Value>().await?["error"]["field"],
        "items[1].product_id"
    );
    assert_eq!(
        primary_count(&stack, "SELECT count(*) FROM orders").await?,
        0
    );
    assert_eq!(
        primary_count(&stack, "SELECT count(*) FROM products").await?,
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_are_escaped_and_unknown_hosts_get_404() -> Result<()> {
    let stack = Stack::start("lon1", 300)?;
    let demo = edgefront_tests::Origin::seed_demo(&stack.primary.url(), &stack.platform_domain)?;
    assert!(demo.as_array().is_some_and(|a| a.len() >= 5), "{demo}");
    let body = wait_for_page(&stack, "hostile.example", "/", "Mug").await?;
    assert!(!body.contains("<script>alert"), "script must be escaped");
    assert!(!body.contains("<img src=x"), "img must be escaped");
    assert!(
        body.contains("&lt;script&gt;alert(") || body.contains("&#60;script&#62;alert("),
        "escaped text is shown"
    );
    let r = page(&stack, "hostile.example", "/").await?;
    assert!(
        r.headers()["content-security-policy"]
            .to_str()?
            .contains("default-src 'none'")
    );

    // The large demo store shows every product, 48 a page (the home page
    // and its next pages); the IDN domain works.
    let mut body = wait_for_page(&stack, "spiceroute.example", "/", "Butter Chicken").await?;
    let (mut shown, mut pages) = (0, 1);
    loop {
        let cards = body.matches("class=\"card\"").count();
        assert!(cards <= 48, "{cards} products on page {pages}");
        shown += cards;
        if !body.contains("rel=\"next\"") || pages == 20 {
            break;
        }
        pages += 1;
        let r = page(&stack, "spiceroute.example", &format!("/?page={pages}")).await?;
        assert_eq!(r.status(), StatusCode::OK, "page {pages}");
        body = r.text().await?;
    }
    assert!(
        shown >= 150,
        "every product on the home page's {pages} pages: {shown}"
    );
    wait_for_page(&stack, "xn--bcher-kva.example", "/", "Der Zauberberg").await?;

    for host in [
        "nobody.example",
        "198.51.100.9",
        "no-such-store.shops.edgefront.test",
    ] {
        let r = page(&stack, host, "/").await?;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{host}");
        assert_eq!(r.headers()["x-edge-route"], "lon1");
        assert!(r.text().await?.contains("Store not found"));
    }
    let r = page(&stack, "spiceroute.example", "/no/such/path").await?;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["x-edge-route"], "lon1");

    // Malformed and oversized requests get 4xx; the edge stays up.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for (raw, want) in [
        (b"GARBAGE\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        (
            format!(
                "GET / HTTP/1.1\r\nHost: spiceroute.example\r\nX-Big: {}\r\n\r\n",
                "a".repeat(100_000)
            )
            .into_bytes(),
            "HTTP/1.1 431",
        ),
        (
            format!(
                "GET / HTTP/1.1\r\nHost: spiceroute.example\r\nX-Big: {}\r\n\r\n",
                "a".repeat(1_500_000)
            )
            .into_bytes(),
            "HTTP/1.1 4",
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(stack.edge.addr).await?;
        let _ = s.write_all(&raw).await;
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or(Ok(0))
            .unwrap_or(0);
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        // Pingora may also just close a connection whose header block exceeds its buffer.
        assert!(
            head.starts_with(want) || (n == 0 && want == "HTTP/1.1 4"),
            "want {want}, got {head:?}"
        );
    }
    // A declared 2 MiB body is refused from its headers alone: the answer
    // comes before any of the body is sent (sending it would race the
    // edge closing the connection).
    let mut s = tokio::net::TcpStream::connect(stack.edge.addr).await?;
    s.write_all(
        b"POST /orders HTTP/1.1\r\nHost: spiceroute.example\r\nContent-Length: 2097152\r\n\r\n",
    )
    .await?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await??;
    let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 413"), "{head}");
    assert!(head.contains("x-edge-route: lon1"), "{head}");
    let r = page(&stack, "spiceroute.example", "/").await?;
    assert_eq!(r.status(), StatusCode::OK, "edge still serving");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_etag_gives_304_and_compression_follows_accept_encoding() -> Result<()> {
    let stack = Stack::start("nyc1", 60_000)?;
    Stack::seed(&stack)?;
    wait_for_page(&stack, "spiceroute.example", "/", "Samosa").await?;
    let r = page(&stack, "spiceroute.example", "/").await?;
    let etag = r.headers()["etag"].to_str()?.to_owned();
    assert!(r.headers()["vary"].to_str()?.contains("Accept-Encoding"));
    let r = client()
        .get(format!("{}/", stack.edge.url()))
        .header("host", "spiceroute.example")
        .header("if-none-match", &etag)
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["x-edge-route"], "nyc1");
    assert_eq!(r.headers()["etag"].to_str()?, etag);
    assert!(r.text().await?.is_empty());
    // A stale tag gets the full page.
    let r = client()
        .get(format!("{}/", stack.edge.url()))
        .header("host", "spiceroute.example")
        .header("if-none-match", "\"stale\"")
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::OK);

    for (accept, expect) in [
        ("br, gzip", Some("br")),
        ("gzip", Some("gzip")),
        ("identity", None),
    ] {
        let r = client()
            .get(format!("{}/", stack.edge.url()))
            .header("host", "spiceroute.example")
            .header("accept-encoding", accept)
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::OK);
        let ce = r
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap_or("").to_owned());
        assert_eq!(ce.as_deref(), expect, "{accept}");
        let len: usize = r.headers()["content-length"].to_str()?.parse()?;
        let bytes = r.bytes().await?;
        assert_eq!(bytes.len(), len);
        if expect == Some("gzip") {
            let mut out = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut out)?;
            assert!(out.contains("Spice Route Kitchen"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_down_gives_503_pages_keep_serving_and_retry_creates_one_order() -> Result<()> {
    let mut stack = Stack::start("lax1", 300)?;
    Stack::seed(&stack)?;
    wait_for_page(&stack, "spiceroute.example", "/", "Samosa").await?;
    let pid = primary_count(&stack, "SELECT min(id) FROM products").await?;
    stack.origin.stop();

    let place = || {
        client()
            .post(format!("{}/orders", stack.edge.url()))
            .header("host", "spiceroute.example")
            .header("idempotency-key", "retry-me")
            .json(
                &json!({ "email": "a@b.example", "items": [{ "product_id": pid, "quantity": 1 }] }),
            )
            .send()
    };
    let t0 = std::time::Instant::now();
    let r = place().await?;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(t0.elapsed() < Duration::from_secs(5), "no hang");
    assert_eq!(r.headers()["x-edge-route"], "lax1");
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        r.json::<Value>().await?["error"]["code"],
        "origin_unavailable"
    );

    // Pages come from the replica, not the origin: still served, also uncached ones.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for path in ["/", "/c/curries"] {
        let r = page(&stack, "spiceroute.example", path).await?;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }

    stack.origin.restart()?;
    let r = place().await?;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = place().await?;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        primary_count(
            &stack,
            "SELECT count(*) FROM orders WHERE idempotency_key = 'retry-me'"
        )
        .await?,
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_down_gives_503_uncached_unhealthy_and_recovers() -> Result<()> {
    let mut stack = Stack::start("gru1", 300)?;
    Stack::seed(&stack)?;
    wait_for_page(&stack, "spiceroute.example", "/", "Samosa").await?;
    let h = client()
        .get(format!("{}/healthz", stack.edge.admin_url()))
        .send()
        .await?;
    assert_eq!(h.status(), StatusCode::OK);
    let v: Value = h.json().await?;
    assert_eq!(v["healthy"], true);
    assert!(v["replica_lag_seconds"].as_f64().is_some());

    stack.replica.stop()?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = page(&stack, "spiceroute.example", "/c/biryani").await?;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers()["x-edge-route"], "gru1");
    assert!(r.headers().contains_key("retry-after"));
    let h = client()
        .get(format!("{}/healthz", stack.edge.admin_url()))
        .send()
        .await?;
    assert_eq!(h.status(), StatusCode::SERVICE_UNAVAILABLE);
    let v: Value = h.json().await?;
    assert!(
        v["reasons"][0]
            .as_str()
            .unwrap_or("")
            .starts_with("replica_unreachable"),
        "{v}"
    );

    stack.replica.start()?;
    wait_for_page(&stack, "spiceroute.example", "/c/biryani", "Biryani").await?;
    eventually(WAIT, "healthy again", || async {
        let h = client()
            .get(format!("{}/healthz", stack.edge.admin_url()))
            .send()
            .await
            .ok()?;
        (h.status() == StatusCode::OK).then_some(())
    })
    .await?;
    let m = client()
        .get(format!("{}/metrics", stack.edge.admin_url()))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        m.lines().any(|l| l.starts_with("edgefront_requests_total{")
            && l.contains("route=\"category\"")
            && l.contains("status=\"503\"")
            && l.contains("region=\"gru1\"")),
        "{m}"
    );
    assert!(m.contains("edgefront_cache_lookups_total"));
    assert!(m.contains("edgefront_replica_lag_seconds"));
    Ok(())
}

#[test]
fn edge_with_bad_config_exits_64_with_one_clear_line() -> Result<()> {
    let out = std::process::Command::new(edgefront_tests::bin_dir().join("edge"))
        .args([
            "--region",
            "xyz9",
            "--replica-url",
            "postgres://x@127.0.0.1:1/x",
            "--origin",
            "127.0.0.1:1",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("region: unknown region \"xyz9\""), "{err}");
    let out = std::process::Command::new(edgefront_tests::bin_dir().join("origin"))
        .args(["--check-config"])
        .output()?;
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("database_url: is required"));
    Ok(())
}

// ---- Checkout is atomic with the cart -------------------------------------

/// A JSON add-to-cart through the edge; `cart` is the `ef_cart` cookie (a new
/// cart when `None`). Returns the cart id.
async fn add_item(stack: &Stack, host: &str, cart: Option<&str>, pid: i64) -> Result<String> {
    let mut req = client()
        .post(format!("{}/cart", stack.edge.url()))
        .header("host", host)
        .header("accept", "application/json")
        .json(&json!({ "product_id": pid, "quantity": 1 }));
    if let Some(c) = cart {
        req = req.header("cookie", format!("ef_cart={c}"));
    }
    let r = req.send().await?;
    ensure!(r.status() == StatusCode::OK, "add to cart: {}", r.status());
    let v: Value = r.json().await?;
    Ok(v["cart"].as_str().context("cart id")?.to_owned())
}

/// The cart's version and `product_id → quantity`, through the edge.
async fn cart_state(
    stack: &Stack,
    host: &str,
    cart: &str,
) -> Result<(i64, std::collections::BTreeMap<i64, i64>)> {
    let v: Value = client()
        .get(format!("{}/cart", stack.edge.url()))
        .header("host", host)
        .header("accept", "application/json")
        .header("cookie", format!("ef_cart={cart}"))
        .send()
        .await?
        .json()
        .await?;
    let lines = v["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|l| Some((l["product_id"].as_i64()?, l["quantity"].as_i64()?)))
        .collect();
    Ok((v["version"].as_i64().context("version")?, lines))
}

/// A checkout through the edge: JSON (`form == false`) or the storefront's
/// form. Returns (status, idempotent-replayed, body).
async fn checkout(
    stack: &Stack,
    host: &str,
    cart: &str,
    key: &str,
    version: Option<i64>,
    form: bool,
) -> Result<(StatusCode, bool, String)> {
    let req = client()
        .post(format!("{}/checkout", stack.edge.url()))
        .header("host", host)
        .header("cookie", format!("ef_cart={cart}"));
    let req = if form {
        let mut f = vec![
            ("email", "cart@example.com".to_owned()),
            ("idempotency_key", key.to_owned()),
        ];
        if let Some(v) = version {
            f.push(("cart_version", v.to_string()));
        }
        req.form(&f)
    } else {
        let mut b = json!({ "email": "cart@example.com", "idempotency_key": key });
        if let Some(v) = version {
            b["cart_version"] = json!(v);
        }
        req.header("accept", "application/json").json(&b)
    };
    let r = req.send().await?;
    let status = r.status();
    let replayed = r.headers().contains_key("idempotent-replayed");
    Ok((status, replayed, r.text().await?))
}

/// `product_id → quantity` ordered from `cart`, over all its orders (primary).
async fn ordered_from(
    pool: &sqlx::PgPool,
    cart: &str,
) -> Result<std::collections::BTreeMap<i64, i64>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT oi.product_id, sum(oi.quantity)::bigint FROM orders o
         JOIN order_items oi ON oi.order_id = o.id
         WHERE o.cart_id = $1::uuid GROUP BY oi.product_id",
    )
    .bind(cart)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Two available products of the seeded store behind `host` (primary).
async fn two_products(pool: &sqlx::PgPool, host: &str) -> Result<(i64, i64)> {
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT p.id FROM products p JOIN domains d ON d.store_id = p.store_id
         WHERE d.hostname = $1 AND p.available ORDER BY p.id LIMIT 2",
    )
    .bind(host)
    .fetch_all(pool)
    .await?;
    ensure!(ids.len() == 2, "seeded store has two products");
    Ok((ids[0], ids[1]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_of_one_cart_by_eight_concurrent_clients_makes_one_order_and_seven_409s()
-> Result<()> {
    let stack = Stack::start("fra1", 300)?;
    stack.seed()?;
    let host = "spiceroute.example";
    let pool = sqlx::PgPool::connect(&stack.primary.url()).await?;
    let (a, b) = two_products(&pool, host).await?;

    // JSON clients pinned to the version they saw, and storefront forms
    // without one: either way, one order and seven clear 409s.
    for (round, form, pinned) in [(0, false, true), (1, true, false)] {
        let cart = add_item(&stack, host, None, a).await?;
        add_item(&stack, host, Some(&cart), b).await?;
        add_item(&stack, host, Some(&cart), b).await?;
        let (version, before) = cart_state(&stack, host, &cart).await?;
        let tasks = (0..8)
            .map(|i| {
                let (stack, cart) = (&stack, cart.clone());
                async move {
                    let key = format!("eight-{round}-{i}");
                    checkout(stack, host, &cart, &key, pinned.then_some(version), form).await
                }
            })
            .collect::<Vec<_>>();
        let results = tokio::time::timeout(WAIT, futures_join_local(tasks)).await?;
        let (mut placed, mut conflicts) = (Vec::new(), 0);
        for r in results {
            let (status, _, body) = r?;
            match status {
                StatusCode::CREATED | StatusCode::OK => placed.push(body),
                StatusCode::CONFLICT => {
                    conflicts += 1;
                    ensure!(
                        body.contains("already checked out as order #"),
                        "the 409 names the problem: {body}"
                    );
                    if form {
                        ensure!(body.contains("<h1>"), "the form gets a page: {body}");
                    } else {
                        let v: Value = serde_json::from_str(&body)?;
                        assert_eq!(v["error"]["code"], "conflict");
                        assert_eq!(v["error"]["field"], "cart");
                    }
                }
                other => anyhow::bail!("unexpected {other}: {body}"),
            }
        }
        assert_eq!((placed.len(), conflicts), (1, 7), "round {round}");
        // The cart's state is consistent: one order holding exactly what the
        // cart held, the cart empty, its version moved once.
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE cart_id = $1::uuid")
            .bind(&cart)
            .fetch_one(&pool)
            .await?;
        assert_eq!(n, 1);
        assert_eq!(ordered_from(&pool, &cart).await?, before);
        let (after_version, after) = cart_state(&stack, host, &cart).await?;
        assert!(after.is_empty(), "{after:?}");
        assert_eq!(after_version, version + 1);
    }
    Ok(())
}

/// Runs futures concurrently on this task (they borrow the test's fixtures).
async fn futures_join_local<F: std::future::Future>(fs: Vec<F>) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(fs.len());
    let mut pinned: Vec<_> = fs.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, d) in pinned.iter_mut().zip(done.iter_mut()) {
            if d.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *d = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.extend(done.into_iter().flatten());
    out
}

/// Backends of the edgefront database waiting on a lock (primary).
async fn lock_waiters(pool: &sqlx::PgPool) -> Option<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = 'edgefront' AND wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_racing_add_to_cart_never_loses_the_added_item() -> Result<()> {
    let stack = Stack::start("nyc1", 300)?;
    stack.seed()?;
    let host = "spiceroute.example";
    let pool = sqlx::PgPool::connect(&stack.primary.url()).await?;
    let (a, b) = two_products(&pool, host).await?;

    // Forced interleavings: a test connection holds the cart row's lock while
    // both requests queue behind it, in a chosen order, then lets them go.
    for checkout_first in [true, false] {
        let cart = add_item(&stack, host, None, a).await?;
        let mut holder = pool.begin().await?;
        sqlx::query("SELECT 1 FROM carts WHERE id = $1::uuid FOR UPDATE")
            .bind(&cart)
            .execute(&mut *holder)
            .await?;
        let key = format!("race-{checkout_first}");
        let co = {
            let (stack, cart, key) = (&stack, cart.clone(), key.clone());
            async move { checkout(stack, host, &cart, &key, None, false).await }
        };
        let add = {
            let (stack, cart) = (&stack, cart.clone());
            async move { add_item(stack, host, Some(&cart), b).await }
        };
        let queued = async {
            eventually(WAIT, "first request queued on the cart", || async {
                (lock_waiters(&pool).await? >= 1).then_some(())
            })
            .await?;
            Ok::<_, anyhow::Error>(())
        };
        let second_queued = async {
            eventually(WAIT, "second request queued on the cart", || async {
                (lock_waiters(&pool).await? >= 2).then_some(())
            })
            .await?;
            holder.commit().await?;
            Ok::<_, anyhow::Error>(())
        };
        let (co_r, add_r) = if checkout_first {
            let (co_r, (q, (add_r, r))) = tokio::join!(co, async {
                let q = queued.await;
                (q, tokio::join!(add, second_queued))
            });
            q?;
            r?;
            (co_r, add_r)
        } else {
            let (add_r, (q, (co_r, r))) = tokio::join!(add, async {
                let q = queued.await;
                (q, tokio::join!(co, second_queued))
            });
            q?;
            r?;
            (co_r, add_r)
        };
        let (status, _, body) = co_r?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        add_r?;
        let ordered = ordered_from(&pool, &cart).await?;
        let (_, left) = cart_state(&stack, host, &cart).await?;
        assert_eq!(ordered.get(&a), Some(&1));
        if checkout_first {
            // The add waited for the checkout and landed in the emptied cart.
            assert_eq!((ordered.get(&b), left.get(&b)), (None, Some(&1)));
        } else {
            // The add went first: the checkout ordered it.
            assert_eq!((ordered.get(&b), left.get(&b)), (Some(&1), None));
        }
    }

    // A checkout pinned to the version the shopper saw, overtaken by an add:
    // 409, and nothing leaves the cart.
    let cart = add_item(&stack, host, None, a).await?;
    let (seen, _) = cart_state(&stack, host, &cart).await?;
    add_item(&stack, host, Some(&cart), b).await?;
    let (status, _, body) = checkout(&stack, host, &cart, "stale", Some(seen), false).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["error"]["field"], "cart_version");
    let (status, _, body) = checkout(&stack, host, &cart, "stale-form", Some(seen), true).await?;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains("changed since"), "{body}");
    let (now, left) = cart_state(&stack, host, &cart).await?;
    assert_eq!(left.values().sum::<i64>(), 2, "{left:?}");
    let (status, _, _) = checkout(&stack, host, &cart, "fresh", Some(now), false).await?;
    assert_eq!(status, StatusCode::CREATED);

    // Unforced races, bounded in rounds and time: one checkout against three
    // adds, staggered differently each round. Every added unit ends up either
    // ordered or still in the cart.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for round in 0..20u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "round {round} over time"
        );
        let cart = add_item(&stack, host, None, a).await?;
        let co = {
            let (stack, cart) = (&stack, cart.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(round * 7 % 20)).await;
                checkout(stack, host, &cart, &format!("free-{round}"), None, false).await
            }
        };
        let adds = (0..3u64)
            .map(|i| {
                let (stack, cart) = (&stack, cart.clone());
                async move {
                    tokio::time::sleep(Duration::from_millis((round * 3 + i * 5) % 15)).await;
                    add_item(stack, host, Some(&cart), b).await
                }
            })
            .collect::<Vec<_>>();
        let (co_r, add_rs) =
            tokio::time::timeout(WAIT, async { tokio::join!(co, futures_join_local(adds)) })
                .await?;
        let (status, _, body) = co_r?;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let added = add_rs.into_iter().collect::<Result<Vec<_>>>()?.len() as i64;
        let ordered = ordered_from(&pool, &cart).await?;
        let (_, left) = cart_state(&stack, host, &cart).await?;
        assert_eq!(ordered.get(&a), Some(&1), "round {round}");
        assert_eq!(
            ordered.get(&b).unwrap_or(&0) + left.get(&b).unwrap_or(&0),
            added,
            "round {round}: ordered {ordered:?}, left {left:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_key_covers_the_cart_replay_returns_same_order_other_cart_is_refused() -> Result<()>
{
    let stack = Stack::start("lon1", 300)?;
    stack.seed()?;
    let host = "spiceroute.example";
    let pool = sqlx::PgPool::connect(&stack.primary.url()).await?;
    let (a, b) = two_products(&pool, host).await?;
    let order_of = |body: &str| -> Option<String> {
        let at = body.find("Order <strong>#")? + "Order <strong>#".len();
        Some(body[at..].split('<').next()?.to_owned())
    };

    let cart = add_item(&stack, host, None, a).await?;
    let (version, _) = cart_state(&stack, host, &cart).await?;
    let (status, replayed, first) =
        checkout(&stack, host, &cart, "k1", Some(version), true).await?;
    assert_eq!((status, replayed), (StatusCode::OK, false), "{first}");
    let id = order_of(&first).context("order id on the page")?;

    // The same form again (a double submit, a retry): the same order.
    let (status, replayed, again) =
        checkout(&stack, host, &cart, "k1", Some(version), true).await?;
    assert_eq!((status, replayed), (StatusCode::OK, true));
    assert_eq!(order_of(&again).as_deref(), Some(id.as_str()));
    // Unpinned, while the cart is still the one that order emptied: the same order.
    let (status, replayed, body) = checkout(&stack, host, &cart, "k1", None, false).await?;
    assert_eq!((status, replayed), (StatusCode::OK, true), "{body}");
    let v: Value = serde_json::from_str(&body)?;
    assert_eq!(v["order"]["id"].to_string(), id);

    // The same key with another content, another cart or another email: 422.
    add_item(&stack, host, Some(&cart), b).await?;
    let other = add_item(&stack, host, None, b).await?;
    let (other_version, _) = cart_state(&stack, host, &other).await?;
    for (c, v, form) in [
        (&cart, None, false),
        (&cart, Some(version + 1), false),
        (&other, Some(other_version), false),
        (&other, None, true),
    ] {
        let (status, _, body) = checkout(&stack, host, c, "k1", v, form).await?;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        if !form {
            let e: Value = serde_json::from_str(&body)?;
            assert_eq!(e["error"]["field"], "Idempotency-Key");
        }
    }
    let r = client()
        .post(format!("{}/checkout", stack.edge.url()))
        .header("host", host)
        .header("cookie", format!("ef_cart={cart}"))
        .header("accept", "application/json")
        .json(&json!({ "email": "someone-else@example.com", "idempotency_key": "k1", "cart_version": version }))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // Nothing was ordered twice, and refused checkouts took nothing from the carts.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE idempotency_key = 'k1'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(n, 1);
    assert_eq!(cart_state(&stack, host, &cart).await?.1.get(&b), Some(&1));
    assert_eq!(cart_state(&stack, host, &other).await?.1.get(&b), Some(&1));
    // A key first used on the order API never replays as a checkout.
    let r = client()
        .post(format!("{}/orders", stack.edge.url()))
        .header("host", host)
        .header("idempotency-key", "api-key")
        .json(
            &json!({ "email": "cart@example.com", "items": [{ "product_id": a, "quantity": 1 }] }),
        )
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::CREATED);
    let (status, _, _) = checkout(&stack, host, &other, "api-key", None, false).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // An empty cart is a 422, not an order.
    let empty = add_item(&stack, host, None, a).await?;
    let (v, _) = cart_state(&stack, host, &empty).await?;
    checkout(&stack, host, &empty, "k-empty-1", Some(v), false).await?;
    let (status, _, body) = checkout(&stack, host, &empty, "k-empty-2", None, false).await?;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "emptied by a checkout: {body}"
    );
    let (status, _, body) = checkout(&stack, host, "not-a-cart", "k-none", None, false).await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    Ok(())
}

/// Store creation and domain claims through the edge are limited per client
/// address: over the limit → 429 JSON with Retry-After and the region, counted
/// in a metric; a forged `X-Forwarded-For` does not reset it; other calls and
/// the other limit are unaffected; nothing is written for a refused call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_creation_and_domain_claims_are_rate_limited_per_client_address() -> Result<()> {
    let net = edgefront_tests::Network::start(
        &["fra1"],
        &[
            "--limit-store-creations-per-hour",
            "3",
            "--limit-domain-claims-per-hour",
            "4",
        ],
    )?;
    let edge = net.edges[0].url();
    let api = format!("api.{}", net.platform_domain);
    let create = |i: usize, forged: Option<&'static str>| {
        let mut r = client()
            .post(format!("{edge}/api/stores"))
            .header("host", &api)
            .json(&json!({ "name": format!("Limited {i}"), "slug": format!("limited-{i}"), "currency": "EUR" }));
        if let Some(f) = forged {
            r = r.header("x-forwarded-for", f);
        }
        r.send()
    };
    let mut token = String::new();
    for i in 0..3 {
        let r = create(i, None).await?;
        assert_eq!(r.status(), StatusCode::CREATED);
        token = r.json::<Value>().await?["token"]
            .as_str()
            .context("token")?
            .to_owned();
    }
    for (i, forged) in [(3, None), (4, Some("198.51.100.99"))] {
        let r = create(i, forged).await?;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS, "{forged:?}");
        assert_eq!(r.headers()["x-edge-route"], "fra1");
        let wait: u64 = r.headers()["retry-after"].to_str()?.parse()?;
        assert!(
            (1..=1200).contains(&wait),
            "3 an hour: next in ≤ 20 min, got {wait}"
        );
        let v: Value = r.json().await?;
        assert_eq!(v["error"]["code"], "rate_limited");
        assert_eq!(v["error"]["limit"], "store_creation");
    }
    // Nothing was written for the refused calls.
    let pool = sqlx::PgPool::connect(&net.primary.url()).await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM stores WHERE slug LIKE 'limited-%'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(n, 3);
    // Domain claims have their own limit; other seller calls have none.
    let claim = |h: String| {
        client()
            .post(format!("{edge}/api/domains"))
            .header("host", &api)
            .bearer_auth(&token)
            .json(&json!({ "hostname": h }))
            .send()
    };
    for i in 0..4 {
        assert_eq!(
            claim(format!("d{i}.example")).await?.status(),
            StatusCode::CREATED
        );
    }
    let r = claim("d4.example".into()).await?;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.json::<Value>().await?["error"]["limit"], "domain_claim");
    for i in 0..6 {
        let r = client()
            .post(format!("{edge}/api/products"))
            .header("host", &api)
            .bearer_auth(&token)
            .json(&json!({ "name": format!("P{i}"), "price_cents": 100 }))
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    assert_eq!(
        net.edges[0]
            .metric("edgefront_rate_limited_total{limit=\"store_creation\"")
            .await?,
        2.0
    );
    assert_eq!(
        net.edges[0]
            .metric("edgefront_rate_limited_total{limit=\"domain_claim\"")
            .await?,
        1.0
    );
    Ok(())
}

/// An origin with fast ownership re-checks (1 s) and a short grace (2 s),
/// and a store on it: (primary, origin, store token).
async fn ownership_origin(
    slug: &str,
) -> Result<(edgefront_tests::Postgres, edgefront_tests::Origin, String)> {
    let (primary, origin) = primary_and_origin(&[
        "--domain-pending-check-seconds",
        "1",
        "--domain-recheck-seconds",
        "1",
        "--domain-grace-seconds",
        "2",
    ])?;
    let token = new_store_token(&origin, slug).await?;
    Ok((primary, origin, token))
}

/// A primary and an origin on a free port started with `args`.
fn primary_and_origin(
    args: &[&str],
) -> Result<(edgefront_tests::Postgres, edgefront_tests::Origin)> {
    let platform = edgefront_regions::Regions::builtin()?
        .network
        .platform_domain;
    let primary = edgefront_tests::Postgres::primary()?;
    let origin = edgefront_tests::Origin::start_with(
        &primary.url(),
        &platform,
        std::net::SocketAddr::from(([127, 0, 0, 1], edgefront_tests::free_port())),
        args,
    )?;
    Ok((primary, origin))
}

async fn new_store_token(origin: &edgefront_tests::Origin, slug: &str) -> Result<String> {
    let v: Value = client()
        .post(format!("{}/api/stores", origin.url()))
        .json(&json!({ "name": format!("Store {slug}"), "slug": slug, "currency": "EUR" }))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["token"].as_str().context("token")?.to_owned())
}

async fn claims_of(origin: &edgefront_tests::Origin, token: &str) -> Result<Vec<Value>> {
    let v: Value = client()
        .get(format!("{}/api/domains", origin.url()))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    Ok(v["domains"].as_array().context("domains")?.clone())
}

/// The DNS server goes down for longer than the grace period: nothing is
/// suspended or activated (a failed lookup is not a missing proof), each
/// check says the lookup failed, and the domain stays served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_outage_longer_than_the_grace_period_suspends_nothing() -> Result<()> {
    let (primary, origin, token) = ownership_origin("dns-down").await?;
    origin.attach_proven(&token, "outage.example").await?;
    let r = client()
        .post(format!("{}/api/domains", origin.url()))
        .bearer_auth(&token)
        .json(&json!({ "hostname": "unproven.example" }))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::CREATED);
    origin.dns.stop();
    // Three grace periods of re-checks against a dead server.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let v = origin.verify(&token, "outage.example").await?;
    assert_eq!(v["domain"]["state"], "active", "{v}");
    assert!(v["domain"]["failing_since"].is_null(), "{v}");
    assert!(
        v["domain"]["check_result"]
            .as_str()
            .is_some_and(|r| r.contains("DNS lookup") && r.contains("state unchanged")),
        "{v}"
    );
    let all = claims_of(&origin, &token).await?;
    let unproven = all
        .iter()
        .find(|c| c["hostname"] == "unproven.example")
        .context("claim")?;
    assert_eq!(unproven["state"], "pending");
    let pool = sqlx::PgPool::connect(&primary.url()).await?;
    let served: i64 =
        sqlx::query_scalar("SELECT count(*) FROM domains WHERE hostname = 'outage.example'")
            .fetch_one(&pool)
            .await?;
    assert_eq!(served, 1, "still served");
    Ok(())
}

/// Two stores with pending claims of one name both publish a valid proof
/// and verify at the same moment: exactly one becomes active; the other is
/// told the name is active elsewhere; a third store's claim is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_proving_one_name_at_once_activate_exactly_one() -> Result<()> {
    let (primary, origin, a) = ownership_origin("race-a").await?;
    let b = new_store_token(&origin, "race-b").await?;
    for t in [&a, &b] {
        let r = client()
            .post(format!("{}/api/domains", origin.url()))
            .bearer_auth(t)
            .json(&json!({ "hostname": "race.example" }))
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::CREATED);
        let v: Value = r.json().await?;
        origin
            .dns
            .set_txt(
                v["domain"]["record"]["name"].as_str().context("name")?,
                v["domain"]["record"]["value"].as_str().context("value")?,
            )
            .await?;
    }
    let (va, vb) = tokio::join!(
        origin.verify(&a, "race.example"),
        origin.verify(&b, "race.example")
    );
    let states = [va?["domain"].clone(), vb?["domain"].clone()];
    let active: Vec<_> = states.iter().filter(|c| c["state"] == "active").collect();
    assert_eq!(active.len(), 1, "{states:?}");
    let other = states
        .iter()
        .find(|c| c["state"] != "active")
        .context("the other claim")?;
    assert_eq!(other["state"], "pending");
    assert!(
        other["check_result"]
            .as_str()
            .is_some_and(|r| r.contains("active on another store")),
        "{other}"
    );
    let pool = sqlx::PgPool::connect(&primary.url()).await?;
    let rows: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM domain_claims WHERE hostname = 'race.example' AND state = 'active'",
    )
    .fetch_one(&pool)
    .await?;
    assert_eq!(rows, 1);
    let c = new_store_token(&origin, "race-c").await?;
    let r = client()
        .post(format!("{}/api/domains", origin.url()))
        .bearer_auth(&c)
        .json(&json!({ "hostname": "race.example" }))
        .send()
        .await?;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    Ok(())
}

/// The internal API from the Internet: through the public edge, every
/// method and spelling of `/internal/…` gets the edge's own 404 (counted,
/// logged with the reason) and never reaches the origin — even with the
/// right internal token, which works when the origin is asked directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_edge_never_forwards_the_internal_api() -> Result<()> {
    const TOKEN: &str = "internal-token-for-the-edge-test-0123456789";
    let (primary, origin) = primary_and_origin(&[
        "--internal-token",
        TOKEN,
        "--cert-key",
        "8e1f0a9d2c3b4a5968778695a4b3c2d1e0f1a2b3c4d5e6f708192a3b4c5d6e7f",
    ])?;
    let replica = primary.replica("fra1")?;
    let edge = edgefront_tests::Edge::builder("fra1", &replica.url(), origin.addr).run()?;
    let lease = "/internal/acme/leases/shop.example?holder=attacker";
    // The control: asked on its internal listener by a region node (mutual
    // TLS under the internal CA), the origin takes the token.
    let internal = origin.internal_url()?;
    let direct = origin
        .internal_client("fra1")?
        .delete(format!("{internal}{lease}"))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    assert_eq!(direct.status(), StatusCode::NO_CONTENT);
    // The origin's public listener does not serve the internal API at all,
    // whatever the method and even with the token.
    for m in [
        reqwest::Method::GET,
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
    ] {
        let r = client()
            .request(m.clone(), format!("{}{lease}", origin.url()))
            .bearer_auth(TOKEN)
            .json(&json!({ "holder": "attacker", "seconds": 60 }))
            .send()
            .await?;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "public listener: {m}");
    }
    // The internal listener refuses, at the handshake: a client without a
    // certificate, one whose certificate comes from another CA, and
    // plaintext HTTP. Each refusal is logged with its reason and counted.
    let refused_metric = || async {
        edgefront_tests::metric_sum_with(
            &client(),
            &origin.url(),
            "edgefront_origin_tls_handshakes_refused_total{listener=\"internal\"}",
        )
        .await
        .ok()
    };
    // (The fixture's port probe, a connection closed before any handshake,
    // may already be counted.)
    let before = refused_metric().await.unwrap_or(0.0);
    let (_, pki) = origin.internal.as_ref().expect("internal API");
    let ca_only = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .use_preconfigured_tls(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates({
                let mut roots = rustls::RootCertStore::empty();
                for c in <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_file_iter(&pki.origin_identity().ca)? {
                    roots.add(c?)?;
                }
                roots
            })
            .with_no_client_auth(),
        )
        .build()?;
    let stranger = edgefront_tests::InternalPki::new(&["127.0.0.1"])?;
    let foreign = {
        let id = edgefront_certs::pki::Identity {
            ca: pki.origin_identity().ca,
            ..stranger.client_identity("fra1")?
        };
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .use_preconfigured_tls(id.client_config()?)
            .build()?
    };
    for (what, c, url) in [
        ("no client certificate", &ca_only, internal.clone()),
        ("another CA's certificate", &foreign, internal.clone()),
        (
            "plaintext",
            &client(),
            internal.replace("https://", "http://"),
        ),
    ] {
        let r = c
            .delete(format!("{url}{lease}"))
            .bearer_auth(TOKEN)
            .send()
            .await;
        assert!(
            r.as_ref().map_or(true, |r| !r.status().is_success()),
            "{what}: {r:?}"
        );
    }
    let refused = eventually(
        Duration::from_secs(5),
        "refused handshakes counted",
        || async { refused_metric().await.filter(|n| *n >= before + 3.0) },
    )
    .await?;
    assert_eq!(refused - before, 3.0, "{}", origin.proc.log());
    assert!(origin.proc.log().contains("TLS handshake refused"));

    let spellings = [
        lease.to_owned(),
        "/internal/acme/account?directory=https://ca.example/dir".to_owned(),
        "/INTERNAL/certificates/shop.example".to_owned(),
        "//internal/acme/leases/shop.example".to_owned(),
        "/p/../internal/acme/leases/shop.example".to_owned(),
        "/%69nternal/acme/leases/shop.example".to_owned(),
    ];
    let methods = [
        reqwest::Method::GET,
        reqwest::Method::HEAD,
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
        reqwest::Method::PATCH,
    ];
    let mut sent = 0.0;
    for path in &spellings {
        for m in &methods {
            let r = client()
                .request(m.clone(), format!("{}{path}", edge.url()))
                .header("host", "shop.example")
                .bearer_auth(TOKEN)
                .json(&json!({ "holder": "attacker", "seconds": 60 }))
                .send()
                .await?;
            sent += 1.0;
            assert_eq!(r.status(), StatusCode::NOT_FOUND, "{m} {path}");
            assert_eq!(r.headers()["x-edge-route"], "fra1", "{m} {path}");
            let body = r.text().await?;
            assert!(!body.contains("acquired"), "{m} {path}: {body}");
        }
    }
    assert_eq!(edge.metric("edgefront_internal_refused_total").await?, sent);
    // Nothing reached the primary: no lease was taken through the edge.
    let pool = sqlx::PgPool::connect(&primary.url()).await?;
    let leases: i64 = sqlx::query_scalar("SELECT count(*) FROM cert_leases")
        .fetch_one(&pool)
        .await?;
    assert_eq!(leases, 0);
    assert!(
        edge.proc
            .log()
            .contains("the internal API is not served on the public edge")
    );
    pool.close().await;
    Ok(())
}

/// Every binary the workspace ships.
const BINARIES: [&str; 6] = [
    "edge",
    "origin",
    "edgefront-health",
    "edge-ctl",
    "edgefront-lab",
    "edgefront-regions",
];

/// Every binary says what it is (`--version`, exit 0), for operators and
/// bug reports.
#[test]
fn every_binary_answers_version() -> anyhow::Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    for bin in BINARIES {
        let out = std::process::Command::new(edgefront_tests::bin_dir().join(bin))
            .arg("--version")
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{bin} --version: {out:?}");
        assert_eq!(text.trim(), format!("{bin} {version}"), "{bin}");
    }
    Ok(())
}

/// The daemons' documented exit codes (docs/operations.md): 2 for a bad
/// command line, 64 for an invalid configuration, with the reason on stderr.
#[test]
fn daemons_exit_2_on_a_bad_flag_and_64_on_a_bad_configuration() -> anyhow::Result<()> {
    let run = |bin: &str, args: &[&str]| -> anyhow::Result<(i32, String)> {
        let out = std::process::Command::new(edgefront_tests::bin_dir().join(bin))
            .args(args)
            .env_remove("EDGEFRONT_ADMIN_TOKEN")
            .output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    };
    for bin in ["edge", "origin", "edgefront-health"] {
        let (code, err) = run(bin, &["--no-such-flag"])?;
        assert_eq!(code, 2, "{bin}: {err}");
    }
    let (code, err) = run(
        "edge",
        &[
            "--region",
            "nowhere1",
            "--replica-url",
            "postgres://edgefront@127.0.0.1:1/edgefront",
            "--origin",
            "127.0.0.1:1",
            "--check-config",
        ],
    )?;
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("invalid configuration") && err.contains("region"),
        "{err}"
    );
    let (code, err) = run("origin", &["--listen", "not-an-address", "--check-config"])?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("invalid configuration"), "{err}");
    let (code, err) = run(
        "edgefront-health",
        &[
            "--region",
            "bom1",
            "--edge-admin",
            "http://127.0.0.1:1",
            "--token",
            "short",
            "--replica-url",
            "postgres://edgefront@127.0.0.1:1/edgefront",
            "--bird-socket",
            "/nonexistent",
            "--state-file",
            "/nonexistent",
            "--listen",
            "127.0.0.1:1",
        ],
    )?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("at least 16"), "{err}");
    Ok(())
}

/// Every flag and argument of every binary and subcommand has help text in
/// `--help` (not only its `[env: …]` or `[default: …]`).
#[test]
fn every_flag_has_help() -> anyhow::Result<()> {
    /// `--help` of `bin` with `args` (subcommands): the text, and the
    /// subcommands it lists.
    fn help(bin: &str, args: &[String]) -> anyhow::Result<(String, Vec<String>)> {
        let out = std::process::Command::new(edgefront_tests::bin_dir().join(bin))
            .args(args)
            .arg("--help")
            .output()?;
        anyhow::ensure!(out.status.success(), "{bin} {args:?} --help: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let commands = text
            .split("\nCommands:\n")
            .nth(1)
            .map(|s| {
                s.lines()
                    .take_while(|l| l.starts_with("  "))
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|c| *c != "help")
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok((text, commands))
    }
    // Lines naming a flag or an argument, each followed by its help on the
    // same line (two spaces on) or on the next, more indented one.
    fn undocumented(text: &str) -> Vec<String> {
        let lines: Vec<&str> = text.lines().collect();
        let mut missing = Vec::new();
        let mut in_section = false;
        for (i, l) in lines.iter().enumerate() {
            if matches!(*l, "Options:" | "Arguments:") {
                in_section = true;
                continue;
            }
            if !l.starts_with(' ') {
                in_section = false;
            }
            let t = l.trim_start();
            let names_one = t.starts_with('-')
                || t.starts_with('<')
                || (t.starts_with('[') && !t.starts_with("[env") && !t.starts_with("[default"));
            if !in_section || !names_one {
                continue;
            }
            let indent = l.len() - t.len();
            let same_line = t.split_once("  ").map(|(_, d)| d.trim()).unwrap_or("");
            let next = lines.get(i + 1).copied().unwrap_or("");
            let next_indent = next.len() - next.trim_start().len();
            let below = if next_indent > indent + 2 {
                next.trim()
            } else {
                ""
            };
            let said = if same_line.is_empty() {
                below
            } else {
                same_line
            };
            if said.is_empty() || said.starts_with('[') {
                missing.push(t.to_owned());
            }
        }
        missing
    }
    let mut missing = Vec::new();
    for bin in BINARIES {
        let mut todo = vec![Vec::<String>::new()];
        while let Some(args) = todo.pop() {
            let (text, commands) = help(bin, &args)?;
            for m in undocumented(&text) {
                missing.push(format!("{bin} {}: {m}", args.join(" ")));
            }
            for c in commands {
                let mut sub = args.clone();
                sub.push(c);
                todo.push(sub);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "flags without help:\n{}",
        missing.join("\n")
    );
    Ok(())
}

/// The edge says `warming_up` on `/healthz` until it has loaded the set of
/// registered domains, so the hook announces a warm edge; that gate is
/// bounded. With a replica that accepts connections and never answers (a
/// silent link), the edge first says `warming_up`, and within seconds says
/// only what is really wrong, the replica: a dead component never leaves
/// the edge stuck behind its warm-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_up_gate_is_bounded_when_the_replica_is_silent() -> Result<()> {
    let silent = edgefront_tests::relay::Relay::start(
        std::net::SocketAddr::from(([127, 0, 0, 1], free_port())),
        &[],
    )?;
    silent.cut();
    let url = format!(
        "postgres://edgefront@127.0.0.1:{}/edgefront?connect_timeout=30",
        silent.addr.port()
    );
    let origin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let edge = Edge::builder("gru1", &url, origin).run()?;
    let reasons = || async {
        let v: Value = client()
            .get(format!("{}/healthz", edge.admin_url()))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        Some(v["reasons"].to_string())
    };
    let first = reasons().await.context("healthz")?;
    assert!(first.contains("warming_up"), "{first}");
    let later = eventually(Duration::from_secs(10), "the warm-up given up", || async {
        reasons().await.filter(|r| !r.contains("warming_up"))
    })
    .await?;
    assert!(later.contains("replica_unreachable"), "{later}");
    Ok(())
}

/// An edge says healthy (so its hook announces it) only once the shopper
/// listener's replica pool is open, opened on the proxy's own runtime:
/// the first shoppers after a start or an upgrade find connections
/// waiting instead of each paying for PostgreSQL's TLS handshake and
/// authentication. Counted on the replica, before any page was asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_says_healthy_only_with_its_page_pool_open() -> Result<()> {
    let stack = Stack::start("syd1", 300)?;
    eventually(Duration::from_secs(10), "a healthy edge", || async {
        client()
            .get(format!("{}/healthz", stack.edge.admin_url()))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == StatusCode::OK)
    })
    .await?;
    let pool = sqlx::PgPool::connect(&stack.replica.url()).await?;
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'edgefront-edge pages'",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    // The pool's size: 4 per shopper thread, at least 4.
    assert!(
        open >= 4,
        "{open} page connections open at the first healthy answer"
    );
    // Which release answers.
    assert_eq!(stack.edge.metric("edgefront_build_info{").await?, 1.0);
    let text = client()
        .get(format!("{}/metrics", stack.edge.admin_url()))
        .send()
        .await?
        .text()
        .await?;
    let line = text
        .lines()
        .find(|l| l.starts_with("edgefront_build_info{"))
        .context("no build_info")?;
    assert!(
        line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION")))
            && line.contains("component=\"edge\""),
        "{line}"
    );
    Ok(())
}

/// A listing never grows with the catalog: a category of 110 products is
/// three pages of at most 48 (`?page=N`, linked prev/next), the same for the
/// home page; a page number past the end, or one that is no number, is a
/// 404 (past the end answered from the store's directory, no query); a
/// product added to the category shows on its last page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_are_paginated_and_page_numbers_past_the_end_are_404() -> Result<()> {
    let stack = Stack::start("sin1", 300)?;
    Stack::seed(&stack)?;
    const HOST: &str = "spiceroute.example";
    wait_for_page(&stack, HOST, "/c/biryani", "Biryani").await?;
    let pool = sqlx::PgPool::connect(&stack.primary.url()).await?;
    let in_category: i64 = sqlx::query_scalar(
        "WITH s AS (SELECT store_id FROM domains WHERE hostname = $1),
              c AS (SELECT c.id, c.store_id FROM categories c, s WHERE c.store_id = s.store_id AND c.slug = 'biryani'),
              ins AS (INSERT INTO products (store_id, slug, name, description, price_cents, category_id, position)
                      SELECT c.store_id, 'bulk-' || g, 'Bulk ' || g, '', 100, c.id, 1000 + g
                      FROM c, generate_series(1, 110 - (SELECT count(*) FROM products p, c WHERE p.category_id = c.id)) g
                      RETURNING 1)
         SELECT (SELECT count(*) FROM ins) + (SELECT count(*) FROM products p, c WHERE p.category_id = c.id)",
    )
    .bind(HOST)
    .fetch_one(&pool)
    .await?;
    assert_eq!(in_category, 110);
    let cards = |body: &str| body.matches("class=\"card").count();
    let last = wait_for_page(&stack, HOST, "/c/biryani?page=3", "rel=\"prev\"").await?;
    assert_eq!(cards(&last), 110 - 2 * 48, "the last page holds the rest");
    assert!(last.contains("href=\"/c/biryani?page=2\"") && !last.contains("rel=\"next\""));
    let first = wait_for_page(&stack, HOST, "/c/biryani", "rel=\"next\"").await?;
    assert_eq!(cards(&first), 48);
    assert!(first.contains("href=\"/c/biryani?page=2\"") && !first.contains("rel=\"prev\""));
    let second = wait_for_page(&stack, HOST, "/c/biryani?page=2", "rel=\"prev\"").await?;
    assert_eq!(cards(&second), 48);
    assert!(
        second.contains("href=\"/c/biryani\"") && second.contains("href=\"/c/biryani?page=3\"")
    );
    let home = wait_for_page(&stack, HOST, "/", "href=\"/?page=2\"").await?;
    assert_eq!(cards(&home), 48);

    // Past the end, and not a number: 404, the store's page saying so.
    let renders = || async {
        stack
            .edge
            .metric("edgefront_render_duration_seconds_count{phase=\"replica\"")
            .await
    };
    let before = renders().await?;
    for path in ["/c/biryani?page=4", "/c/biryani?page=9999", "/?page=500"] {
        let r = page(&stack, HOST, path).await?;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(
            r.text().await?.contains("This page does not exist"),
            "{path}"
        );
    }
    for path in ["/c/biryani?page=0", "/c/biryani?page=two", "/?page=10001"] {
        let r = page(&stack, HOST, path).await?;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
    // The three past-the-end pages: one render of the store's 404 at most.
    assert!(
        renders().await? - before <= 1.0,
        "page numbers past the end were answered from the directory"
    );

    // A product added to the category lands on its last page.
    sqlx::query(
        "INSERT INTO products (store_id, slug, name, description, price_cents, category_id, position)
         SELECT c.store_id, 'bulk-111', 'Bulk 111', '', 100, c.id, 2000
         FROM categories c JOIN domains d ON d.store_id = c.store_id
         WHERE d.hostname = $1 AND c.slug = 'biryani'",
    )
    .bind(HOST)
    .execute(&pool)
    .await?;
    pool.close().await;
    let last = wait_for_page(&stack, HOST, "/c/biryani?page=3", "Bulk 111").await?;
    assert_eq!(cards(&last), 111 - 2 * 48);
    Ok(())
}

/// Every edge's health check asks the origin's `/healthz` whether its
/// database leads. Requests waiting for the origin's pool must not make it
/// say no: every edge would then refuse every write at once, and the
/// retries that follow keep the pool busy (the origin failover drill, CI
/// 2026-12-07). A session holds the stores table, so store creations wait
/// on it, each holding one of the pool's two connections, and more wait for
/// the pool itself.
#[tokio::test]
async fn healthz_answers_while_every_pooled_connection_is_busy() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("origin.toml");
    std::fs::write(&config, "max_connections = 2\n")?;
    let (primary, origin) = primary_and_origin(&["--config", config.to_str().context("path")?])?;
    let mut holder = sqlx::PgPool::connect(&primary.url())
        .await?
        .acquire()
        .await?;
    sqlx::query("BEGIN").execute(&mut *holder).await?;
    sqlx::query("LOCK TABLE stores IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await?;
    let creations: Vec<_> = (0..4)
        .map(|i| {
            let url = format!("{}/api/stores", origin.url());
            tokio::spawn(async move {
                client()
                    .post(url)
                    .json(
                        &json!({ "name": "Busy", "slug": format!("busy-{i}"), "currency": "EUR" }),
                    )
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    // Both pooled connections wait for the lock.
    let watcher = sqlx::PgPool::connect(&primary.url()).await?;
    eventually(
        Duration::from_secs(10),
        "two sessions waiting for the lock",
        || {
            let watcher = watcher.clone();
            async move {
                let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'stores'::regclass",
            )
            .fetch_one(&watcher)
            .await
            .ok()?;
                (n >= 2).then_some(())
            }
        },
    )
    .await?;
    let health = client()
        .get(format!("{}/healthz", origin.url()))
        .send()
        .await?;
    assert_eq!(health.status(), StatusCode::OK, "{:?}", health.text().await);
    // The pool really was exhausted: a request that needs it is refused
    // (503, nothing written) once its wait for a connection ends.
    let refused = client()
        .post(format!("{}/api/stores", origin.url()))
        .json(&json!({ "name": "Busy", "slug": "busy-late", "currency": "EUR" }))
        .send()
        .await?;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    sqlx::query("ROLLBACK").execute(&mut *holder).await?;
    let mut created = 0;
    for c in creations {
        match c.await?? {
            StatusCode::CREATED => created += 1,
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("store creation under a busy pool: {other}"),
        }
    }
    assert!(
        created >= 2,
        "the waiting creations go on once the lock is gone"
    );
    Ok(())
}

/// A write whose statement outlives the origin's `statement_timeout` (10 s,
/// set on every pooled connection) is cancelled by PostgreSQL (SQLSTATE
/// 57014) and rolled back: the seller gets 503 with `Retry-After`, not a 500,
/// nothing is written, and the same write passes once the lock is gone.
#[tokio::test]
async fn a_write_cancelled_by_the_statement_timeout_is_a_503_and_writes_nothing() -> Result<()> {
    let (primary, origin) = primary_and_origin(&[])?;
    let db = sqlx::PgPool::connect(&primary.url()).await?;
    let mut holder = db.acquire().await?;
    sqlx::query("BEGIN").execute(&mut *holder).await?;
    sqlx::query("LOCK TABLE stores IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await?;
    let create = || {
        client()
            .post(format!("{}/api/stores", origin.url()))
            .json(&json!({ "name": "Slow", "slug": "slow-lock", "currency": "EUR" }))
            .timeout(Duration::from_secs(30))
            .send()
    };
    let r = create().await?;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().contains_key("retry-after"));
    sqlx::query("ROLLBACK").execute(&mut *holder).await?;
    drop(holder);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM stores WHERE slug = 'slow-lock'")
        .fetch_one(&db)
        .await?;
    assert_eq!(n, 0, "a cancelled write left a row");
    assert_eq!(create().await?.status(), StatusCode::CREATED);
    Ok(())
}

/// Rotating the health hook's tokens is a reload, not a restart (a restart
/// is a withdraw): the hook reads its secrets directory again on SIGHUP and
/// answers the rotated admin token at once, the same process; a reload
/// that finds a bad file (readable by every user) is refused and the
/// tokens in use stay.
#[tokio::test]
async fn a_health_hook_reload_takes_rotated_tokens_and_refuses_a_bad_file() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets)?;
    // Written whole, then moved into place, as ansible does.
    let put = |key: &str, value: &str, mode: u32| -> Result<()> {
        let tmp = secrets.join(format!(".{key}.tmp"));
        std::fs::write(&tmp, format!("{value}\n"))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&tmp, secrets.join(key))?;
        Ok(())
    };
    const ADMIN: &str = "admin-token-before-rotation";
    const ROTATED: &str = "admin-token-after-rotation";
    const STATUS: &str = "status-token-shared-by-all";
    put("admin_token", ADMIN, 0o600)?;
    put("status_token", STATUS, 0o640)?;
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cmd = std::process::Command::new(edgefront_tests::bin_dir().join("edgefront-health"));
    cmd.args(["--region", "bom1", "--edge-admin", "http://127.0.0.1:1"])
        .args([
            "--replica-url",
            "postgres://edgefront@127.0.0.1:1/edgefront",
        ])
        .arg("--bird-socket")
        .arg(dir.path().join("no-bird.ctl"))
        .arg("--state-file")
        .arg(dir.path().join("drain.json"))
        .args(["--listen", &listen, "--liveness-device", ""])
        .args(["--peers", "sin1=http://127.0.0.1:1", "--min-peers", "0"])
        .arg("--secrets-dir")
        .arg(&secrets)
        .env("RUST_LOG", "warn")
        .env_remove("EDGEFRONT_ADMIN_TOKEN")
        .env_remove("EDGEFRONT_STATUS_TOKEN");
    let mut hook = edgefront_tests::Proc::spawn("health-reload", cmd)?;
    let http = client();
    let call = |method: reqwest::Method, path: &'static str, token: &'static str| {
        let (http, url) = (http.clone(), format!("http://{listen}{path}"));
        async move {
            anyhow::Ok(
                http.request(method, url)
                    .bearer_auth(token)
                    .send()
                    .await?
                    .status(),
            )
        }
    };
    let status_with = |token: &'static str| call(reqwest::Method::GET, "/status", token);
    // Until `token` reads the status (the API is up, or a reload took it).
    let accepted = |token: &'static str, what: &'static str| {
        eventually(Duration::from_secs(10), what, move || async move {
            matches!(status_with(token).await, Ok(s) if s.is_success()).then_some(())
        })
    };
    accepted(ADMIN, "the hook's API")
        .await
        .with_context(|| hook.log())?;
    assert_eq!(status_with(STATUS).await?, StatusCode::OK);
    assert_eq!(
        call(reqwest::Method::POST, "/undrain", STATUS).await?,
        StatusCode::UNAUTHORIZED,
        "the status token drains nothing"
    );
    assert_eq!(status_with(ROTATED).await?, StatusCode::UNAUTHORIZED);

    put("admin_token", ROTATED, 0o600)?;
    let hup = |pid: u32| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
    };
    hup(hook.pid())?;
    accepted(ROTATED, "the rotated admin token")
        .await
        .with_context(|| hook.log())?;
    assert_eq!(
        status_with(ADMIN).await?,
        StatusCode::UNAUTHORIZED,
        "the old admin token is refused after the reload"
    );
    assert_eq!(status_with(STATUS).await?, StatusCode::OK);

    // A bad file: refused, and the tokens in use stay.
    std::fs::set_permissions(
        secrets.join("status_token"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    hup(hook.pid())?;
    eventually(
        Duration::from_secs(5),
        "the refused reload in the log",
        || async { hook.log().contains("reload refused").then_some(()) },
    )
    .await
    .with_context(|| hook.log())?;
    assert!(hook.log().contains("every user"), "{}", hook.log());
    assert_eq!(status_with(ROTATED).await?, StatusCode::OK);
    assert_eq!(status_with(STATUS).await?, StatusCode::OK);
    assert!(
        hook.running(),
        "the same hook process answered throughout: {}",
        hook.log()
    );
    Ok(())
}
