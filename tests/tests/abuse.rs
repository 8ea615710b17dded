//! Abuse limits at the edge (issue 13, item 6), tried from several client
//! addresses: loopback has all of 127.0.0.0/8, so each actor binds its own
//! source address and the edge sees distinct clients.
//!
//! - made-up slugs are answered from the store's slug directory (memory),
//!   made-up hosts spend only the flooder's budget, never a known page;
//! - pages that do not exist go to the negative cache, not the page cache;
//! - origin-bound requests are limited per address (forged
//!   `X-Forwarded-For` changes nothing);
//! - slow clients are cut at the header deadline, and open connections per
//!   address are capped.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edgefront_tests::{Network, Origin};
use reqwest::StatusCode;

const HOST: &str = "spiceroute.example";

/// A client whose connections come from `127.0.0.<last>`.
fn client_from(last: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        .build()
        .expect("client")
}

async fn get(
    http: &reqwest::Client,
    net: &Network,
    host: &str,
    path: &str,
) -> Result<(StatusCode, String, Option<String>)> {
    let r = http
        .get(format!("{}{path}", net.edges[0].url()))
        .header("host", host)
        .send()
        .await?;
    let status = r.status();
    let cache = r
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let _ = r.text().await?;
    Ok((status, cache.unwrap_or_default(), retry))
}

/// The first product link on the store's home page.
async fn a_product(http: &reqwest::Client, net: &Network) -> Result<String> {
    page_links(http, net)
        .await?
        .into_iter()
        .find(|l| l.starts_with("/p/"))
        .context("a product link")
}

fn started(flags: &[&str]) -> Result<Network> {
    let net = Network::start(&["fra1"], flags)?;
    Origin::seed_demo(&net.primary.url(), &net.platform_domain)?;
    Ok(net)
}

/// Every page link on the store's home page.
async fn page_links(http: &reqwest::Client, net: &Network) -> Result<Vec<String>> {
    let home = http
        .get(format!("{}/", net.edges[0].url()))
        .header("host", HOST)
        .send()
        .await?
        .text()
        .await?;
    let mut links = Vec::new();
    for part in home.split("href=\"").skip(1) {
        let link = part.split('"').next().unwrap_or("");
        if (link.starts_with("/p/") || link.starts_with("/c/")) && !links.iter().any(|l| l == link)
        {
            links.push(link.to_owned());
        }
    }
    Ok(links)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_floods_are_answered_from_memory_and_never_cost_a_known_page() -> Result<()> {
    let net = started(&[
        "--limit-misses-per-second",
        "1",
        "--limit-misses-burst",
        "20",
        "--negative-cache-entries",
        "1000",
    ])?;
    let shopper = client_from(1);
    let product = a_product(&shopper, &net).await?;
    let (s, _, _) = get(&shopper, &net, HOST, &product).await?;
    assert_eq!(s, StatusCode::OK);
    const RENDERED: &str = "edgefront_cache_lookups_total{result=\"miss\"";
    let rendered_before = net.edges[0].metric(RENDERED).await?;

    // Made-up slugs from one address, then from 30 more: the store's slug
    // directory (one load) says they do not exist; one 404 is rendered,
    // every other is answered from memory — no render, no budget spent.
    let flooder = client_from(2);
    for i in 0..40 {
        let (s, _, _) = get(&flooder, &net, HOST, &format!("/p/made-up-{i}")).await?;
        assert_eq!(s, StatusCode::NOT_FOUND, "made-up-{i}");
    }
    for a in 0..30u8 {
        let c = client_from(10 + a);
        for j in 0..3 {
            let (s, cache, _) = get(&c, &net, HOST, &format!("/p/spread-{a}-{j}")).await?;
            assert_eq!(s, StatusCode::NOT_FOUND);
            assert!(cache.contains("detail=negative"), "{cache}");
        }
    }
    for i in 0..10 {
        let (s, _, _) = get(&flooder, &net, HOST, &format!("/c/made-up-{i}")).await?;
        assert_eq!(s, StatusCode::NOT_FOUND, "category made-up-{i}");
    }
    assert_eq!(
        net.edges[0].metric(RENDERED).await? - rendered_before,
        2.0,
        "one product 404 and one category 404 rendered for 140 made-up pages"
    );
    assert_eq!(
        net.edges[0]
            .metric("edgefront_rate_limited_total{limit=\"misses\"")
            .await?,
        0.0
    );
    // The shopper's page is still a cache hit: the 404s went elsewhere.
    let (s, cache, _) = get(&shopper, &net, HOST, &product).await?;
    assert_eq!(s, StatusCode::OK);
    assert!(cache.contains("hit"), "{cache}");

    // A product added meanwhile exists at once (the directory follows the
    // store's changes through the change feed).
    let pool = sqlx::PgPool::connect(&net.primary.url()).await?;
    sqlx::query(
        "INSERT INTO products (store_id, slug, name, description, price_cents)
         SELECT store_id, 'made-up-0', 'Now real', '', 100 FROM domains WHERE hostname = $1",
    )
    .bind(HOST)
    .execute(&pool)
    .await?;
    edgefront_tests::eventually(
        Duration::from_secs(10),
        "the new product served",
        || async {
            let (s, _, _) = get(&flooder, &net, HOST, "/p/made-up-0").await.ok()?;
            (s == StatusCode::OK).then_some(())
        },
    )
    .await?;

    // A scraper walking real pages never rendered here spends its budget
    // (burst 20, 1/s): then 429 with Retry-After; another address is served.
    let scraper = client_from(5);
    let links = page_links(&shopper, &net).await?;
    assert!(links.len() >= 40, "{} links", links.len());
    let (mut served, mut limited) = (0, 0);
    for link in links.iter().take(40) {
        let (s, _, retry) = get(&scraper, &net, HOST, link).await?;
        match s {
            StatusCode::OK => served += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(retry.is_some(), "429 carries Retry-After");
                limited += 1;
            }
            other => panic!("{link}: unexpected {other}"),
        }
    }
    assert!(limited >= 10, "{served} served, {limited} refused");
    let (s, _, _) = get(&client_from(99), &net, HOST, &links[39]).await?;
    assert_eq!(s, StatusCode::OK);

    // Made-up custom domains: not in the edge's set of registered domains,
    // a clear 404 from memory, no budget spent...
    let hosts = client_from(4);
    for i in 0..30 {
        let (s, _, _) = get(&hosts, &net, &format!("nobody-{i}.example"), "/").await?;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
    // ...made-up platform names (a store slug each, asked of the replica):
    // the address's burst, then 429.
    let (mut unknown, mut refused) = (0, 0);
    for i in 0..30 {
        let name = format!("nobody-{i}.{}", net.platform_domain);
        let (s, _, _) = get(&hosts, &net, &name, "/").await?;
        match s {
            StatusCode::NOT_FOUND => unknown += 1,
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!((20..=23).contains(&unknown), "{unknown} looked up");
    assert_eq!(unknown + refused, 30);
    // The flooder's address cannot spend anyone else's: the shopper still
    // gets a clear 404 for a host it names wrong.
    let name = format!("nobody-0.{}", net.platform_domain);
    let (s, _, _) = get(&shopper, &net, &name, "/").await?;
    assert_eq!(s, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_requests_are_limited_per_client_address() -> Result<()> {
    let net = started(&[
        "--limit-origin-requests-per-second",
        "1",
        "--limit-origin-requests-burst",
        "5",
    ])?;
    let a = client_from(1);
    let edge = net.edges[0].url();
    let mut statuses = Vec::new();
    for i in 0..7 {
        let mut r = a.get(format!("{edge}/cart")).header("host", HOST);
        if i % 2 == 1 {
            // Forged: the limit keys on the connection's address.
            r = r.header("x-forwarded-for", format!("198.51.100.{i}"));
        }
        let r = r.send().await?;
        let s = r.status();
        if s == StatusCode::TOO_MANY_REQUESTS {
            assert!(r.headers().get("retry-after").is_some());
            let body = r.text().await?;
            assert!(body.contains("\"limit\":\"origin_requests\""), "{body}");
            assert!(body.contains("\"region\":\"fra1\""), "{body}");
        }
        statuses.push(s);
    }
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(
        (1..=2).contains(&refused),
        "a burst of 5 then 429: {statuses:?}"
    );
    assert!(
        statuses[..5]
            .iter()
            .all(|s| *s != StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    // Pages are another budget; another address has its own.
    let (s, _, _) = get(&a, &net, HOST, "/").await?;
    assert_eq!(s, StatusCode::OK);
    let r = client_from(2)
        .get(format!("{edge}/cart"))
        .header("host", HOST)
        .send()
        .await?;
    assert_ne!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // ACME challenges come from the CA: never limited.
    for _ in 0..3 {
        let r = a
            .get(format!("{edge}/.well-known/acme-challenge/none"))
            .header("host", HOST)
            .send()
            .await?;
        assert_ne!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    }
    assert!(
        net.edges[0]
            .metric("edgefront_rate_limited_total{limit=\"origin_requests\"")
            .await?
            >= 1.0
    );
    Ok(())
}

/// A TCP connection to the edge from `127.0.0.<last>` (blocking, with an
/// 8 s read timeout).
async fn connect_from(net: &Network, last: u8) -> Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, last], 0)))?;
    let s = socket.connect(net.edges[0].addr).await?.into_std()?;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(8)))?;
    Ok(s)
}

/// Reads until the edge closes the connection or answers; `(closed, bytes)`.
fn read_some(s: &mut TcpStream) -> (bool, Vec<u8>) {
    let mut buf = [0u8; 65536];
    match s.read(&mut buf) {
        Ok(0) => (true, Vec::new()),
        Ok(n) => (false, buf[..n].to_vec()),
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            (false, Vec::new())
        }
        Err(_) => (true, Vec::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_at_the_header_deadline_and_connections_are_capped() -> Result<()> {
    let net = started(&[
        "--header-timeout-ms",
        "1000",
        "--max-connections-per-address",
        "4",
    ])?;
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n");

    // Slowloris: a header line every 300 ms. Cut at the deadline (1 s),
    // not after pingora's 60 s per read.
    let t0 = Instant::now();
    let mut slow = connect_from(&net, 2).await?;
    slow.write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n").as_bytes())?;
    let mut cut = false;
    for i in 0..30 {
        std::thread::sleep(Duration::from_millis(300));
        if slow
            .write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
            .is_err()
        {
            cut = true;
            break;
        }
        slow.set_nonblocking(true)?;
        let (closed, _) = read_some(&mut slow);
        slow.set_nonblocking(false)?;
        if closed {
            cut = true;
            break;
        }
    }
    assert!(cut, "the slow client was never cut");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());

    // A connection that never sends anything is cut too.
    let t0 = Instant::now();
    let mut silent = connect_from(&net, 3).await?;
    let (closed, _) = read_some(&mut silent);
    assert!(closed, "silent connection closed");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert!(
        net.edges[0]
            .metric("edgefront_connections_refused_total{reason=\"header_timeout\"")
            .await?
            >= 2.0
    );

    // Keep-alive: idle longer than the deadline between requests is fine
    // (the clock starts at a request's first byte), and so is a body slower
    // than it (only headers are timed).
    let mut ka = connect_from(&net, 4).await?;
    ka.write_all(request.as_bytes())?;
    let (_, first) = read_some(&mut ka);
    assert!(
        first.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    // Drain the rest of the page.
    ka.set_read_timeout(Some(Duration::from_millis(300)))?;
    while !read_some(&mut ka).1.is_empty() {}
    std::thread::sleep(Duration::from_millis(1500));
    ka.set_read_timeout(Some(Duration::from_secs(8)))?;
    ka.write_all(
        format!("POST /api/stores HTTP/1.1\r\nHost: api.{}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{", net.platform_domain)
            .as_bytes(),
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    ka.write_all(b"}")?;
    let (closed, answer) = read_some(&mut ka);
    assert!(!closed, "keep-alive connection with a slow body was cut");
    assert!(
        answer.starts_with(b"HTTP/1.1 "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        !answer.starts_with(b"HTTP/1.1 5"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    // Four connections from one address; the fifth is refused at once,
    // another address is served.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(&net, 5).await?);
    }
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let mut fifth = connect_from(&net, 5).await?;
    let _ = fifth.write_all(request.as_bytes());
    let (closed, _) = read_some(&mut fifth);
    assert!(closed, "fifth connection refused");
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    let mut other = connect_from(&net, 6).await?;
    other.write_all(request.as_bytes())?;
    let (_, answer) = read_some(&mut other);
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    assert!(
        net.edges[0]
            .metric("edgefront_connections_refused_total{reason=\"per_address\"")
            .await?
            >= 1.0
    );
    // Their slots come back when they close.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let mut again = connect_from(&net, 5).await?;
    again.write_all(request.as_bytes())?;
    let (_, answer) = read_some(&mut again);
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    Ok(())
}
