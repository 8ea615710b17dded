//! Freshness: change-log invalidation, read-your-writes, and surviving
//! replica, link and pruning failures — against real PostgreSQL processes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use edgefront_tests::{Edge, Origin, Postgres, client, eventually};
use reqwest::StatusCode;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

struct Region {
    edge: Edge,
    origin: Origin,
    replica: Postgres,
    primary: Postgres,
    platform: String,
}

/// Primary, origin, one replica (with `replica_conf` applied), one edge.
fn region(name: &str, replica_conf: Option<&str>, edge_args: &[&str]) -> Result<Region> {
    region_ttl(name, replica_conf, edge_args, 300_000)
}

fn region_ttl(
    name: &str,
    replica_conf: Option<&str>,
    edge_args: &[&str],
    ttl_ms: u64,
) -> Result<Region> {
    let platform = edgefront_regions::Regions::builtin()?
        .network
        .platform_domain;
    let primary = Postgres::primary()?;
    let origin = Origin::start(&primary.url(), &platform)?;
    let replica = primary.replica(name)?;
    if let Some(conf) = replica_conf {
        replica.set(conf)?;
    }
    let mut b = Edge::builder(name, &replica.url(), origin.addr).cache_ttl_ms(ttl_ms);
    for a in edge_args {
        b = b.arg(a);
    }
    let edge = b.run()?;
    Ok(Region {
        edge,
        origin,
        replica,
        primary,
        platform,
    })
}

/// Creates a store with one product through the origin; returns (token, host, product id).
async fn store_with_product(r: &Region, slug: &str, price: i64) -> Result<(String, String, i64)> {
    let v: Value = client()
        .post(format!("{}/api/stores", r.origin.url()))
        .json(&json!({ "name": format!("Store {slug}"), "slug": slug, "currency": "USD" }))
        .send()
        .await?
        .json()
        .await?;
    let token = v["token"].as_str().context("token")?.to_owned();
    let p: Value = client()
        .post(format!("{}/api/products", r.origin.url()))
        .bearer_auth(&token)
        .json(&json!({ "name": "Widget", "price_cents": price }))
        .send()
        .await?
        .json()
        .await?;
    Ok((
        token,
        format!("{slug}.{}", r.platform),
        p["product"]["id"].as_i64().context("id")?,
    ))
}

async fn set_price(r: &Region, token: &str, id: i64, price: i64) -> Result<()> {
    let resp = client()
        .patch(format!("{}/api/products/{id}", r.origin.url()))
        .bearer_auth(token)
        .json(&json!({ "price_cents": price }))
        .send()
        .await?;
    ensure!(
        resp.status() == StatusCode::OK,
        "price update: {}",
        resp.status()
    );
    Ok(())
}

fn dollars(cents: i64) -> String {
    format!("${}.{:02}", cents / 100, cents % 100)
}

async fn get(edge: &Edge, host: &str, path: &str) -> Result<(StatusCode, String, String)> {
    let r = client()
        .get(format!("{}{path}", edge.url()))
        .header("host", host)
        .send()
        .await?;
    let status = r.status();
    let cs = r
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok((status, cs, r.text().await?))
}

async fn metric(edge: &Edge, name: &str) -> Result<f64> {
    edge.metric(name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replica_serves_old_until_replayed_then_only_new() -> Result<()> {
    const DELAY_MS: u64 = 1500;
    let r = region(
        "ams1",
        Some(&format!("recovery_min_apply_delay = '{DELAY_MS}ms'")),
        &[],
    )?;
    let (token, host, pid) = store_with_product(&r, "lagged", 1_000).await?;
    let (old, new) = (dollars(1_000), dollars(2_000));
    eventually(WAIT, "store on the delayed replica", || async {
        let (s, _, body) = get(&r.edge, &host, "/").await.ok()?;
        (s == StatusCode::OK && body.contains(&old)).then_some(())
    })
    .await?;

    // Hammer the edge from two loops while the change crawls through the delayed replica.
    let seen: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut loops = Vec::new();
    for _ in 0..2 {
        let (seen, stop, url, host, old, new) = (
            seen.clone(),
            stop.clone(),
            r.edge.url(),
            host.clone(),
            old.clone(),
            new.clone(),
        );
        loops.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            for _ in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let Ok(resp) = client()
                    .get(format!("{url}/"))
                    .header("host", &host)
                    .send()
                    .await
                else {
                    continue;
                };
                let body = resp.text().await.unwrap_or_default();
                let at = Instant::now();
                match (body.contains(&old), body.contains(&new)) {
                    (true, false) => seen.lock().expect("lock").push((at, false)),
                    (false, true) => seen.lock().expect("lock").push((at, true)),
                    _ => panic!("page shows neither or both prices"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = Instant::now();
    set_price(&r, &token, pid, 2_000).await?;
    eventually(WAIT, "new price under load", || async {
        seen.lock().ok()?.iter().any(|(_, n)| *n).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loops {
        l.await?;
    }
    let mut seen = seen.lock().expect("lock").clone();
    seen.sort_by_key(|(t, _)| *t);
    let first_new = seen.iter().position(|(_, n)| *n).context("new seen")?;
    let old_after_new = seen[first_new..].iter().filter(|(_, n)| !*n).count();
    // Responses are timestamped when read; two loops' reads may overlap by one
    // in-flight response at the switch, never more.
    assert!(
        old_after_new <= 1,
        "{old_after_new} old pages after the first new one"
    );
    let lag = seen[first_new].0 - written;
    assert!(
        lag >= Duration::from_millis(DELAY_MS - 100),
        "new too early: {lag:?}: the replica had not replayed it"
    );
    assert!(
        lag < Duration::from_millis(DELAY_MS + 1500),
        "new too late: {lag:?}"
    );
    assert!(
        first_new > 10 && seen.len() - first_new > 10,
        "reads before and after: {} / {}",
        first_new,
        seen.len()
    );
    // And every read after the switch sees the new page (sequential check).
    for _ in 0..50 {
        let (_, _, body) = get(&r.edge, &host, "/").await?;
        assert!(body.contains(&new));
    }
    assert!(metric(&r.edge, "edgefront_changelog_invalidations_total").await? >= 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_on_lagging_replica_never_serves_older_than_own_write() -> Result<()> {
    let r0 = region("syd1", Some("recovery_min_apply_delay = '3s'"), &[])?;
    let primary_url = r0.primary.url();
    // Restart the edge with the primary as read-your-writes fallback.
    drop(r0.edge);
    let edge = Edge::builder("syd1", &r0.replica.url(), r0.origin.addr)
        .cache_ttl_ms(300_000)
        .arg("--primary-url")
        .arg(&primary_url)
        .arg("--read-your-writes-wait-ms")
        .arg("300")
        .run()?;
    let r = Region { edge, ..r0 };
    let (token, host, pid) = store_with_product(&r, "ryw", 500).await?;
    // A stable cached page: the first one may have been rendered before the
    // tail applied the store's creation, and be dropped once.
    eventually(WAIT, "store cached from the delayed replica", || async {
        let (s, cs, body) = get(&r.edge, &host, "/").await.ok()?;
        (s == StatusCode::OK && body.contains("$5.00") && cs.contains("hit")).then_some(())
    })
    .await?;

    // The seller writes THROUGH THE EDGE and gets the commit LSN as a cookie.
    let me = reqwest::Client::builder()
        .no_proxy()
        .cookie_store(true)
        .build()?;
    let resp = me
        .patch(format!("{}/api/products/{pid}", r.edge.url()))
        .header("host", &host)
        .bearer_auth(&token)
        .json(&json!({ "price_cents": 700 }))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let headers = format!("{:?}", resp.headers());
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(cookie.starts_with("ef_lsn="), "{headers}");

    // Right away: the writer sees its own write (served from the primary, marked)…
    let resp = me
        .get(format!("{}/", r.edge.url()))
        .header("host", &host)
        .send()
        .await?;
    let cs = resp
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp.text().await?;
    assert!(!cs.is_empty(), "{body}\n{}", r.edge.proc.log());
    assert!(body.contains("$7.00"), "writer must see its write");
    assert!(cs.contains("read-your-writes-primary"), "{cs}");
    // …while everybody else still gets the replica's cached page.
    let (_, cs, body) = get(&r.edge, &host, "/").await?;
    assert!(body.contains("$5.00") && cs.contains("hit"), "{cs}");

    // Once the replica has replayed, the writer is served from the replica again.
    eventually(WAIT, "replica catches up", || async {
        let (_, _, body) = get(&r.edge, &host, "/").await.ok()?;
        body.contains("$7.00").then_some(())
    })
    .await?;
    let resp = me
        .get(format!("{}/", r.edge.url()))
        .header("host", &host)
        .send()
        .await?;
    assert!(!resp.headers()["cache-status"].to_str()?.contains("primary"));
    assert!(resp.text().await?.contains("$7.00"));
    assert!(
        metric(
            &r.edge,
            "edgefront_read_your_writes_total{outcome=\"primary\""
        )
        .await?
            >= 1.0
    );
    Ok(())
}

/// GET `/` with a cookie header; (status, cache-status, body, elapsed).
async fn get_with_cookie(
    edge: &Edge,
    host: &str,
    cookie: &str,
) -> Result<(StatusCode, String, String, Duration)> {
    let t0 = Instant::now();
    let r = client()
        .get(format!("{}/", edge.url()))
        .header("host", host)
        .header("cookie", cookie)
        .send()
        .await?;
    let status = r.status();
    let cs = r
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = r.text().await?;
    Ok((status, cs, body, t0.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_cookies_cannot_be_forged_and_primary_reads_are_budgeted() -> Result<()> {
    let r0 = region("lax1", Some("recovery_min_apply_delay = '4s'"), &[])?;
    let primary_url = r0.primary.url();
    drop(r0.edge);
    let edge = Edge::builder("lax1", &r0.replica.url(), r0.origin.addr)
        .cache_ttl_ms(300_000)
        .arg("--primary-url")
        .arg(&primary_url)
        .arg("--read-your-writes-wait-ms")
        .arg("1500")
        .arg("--ryw-primary-concurrency")
        .arg("1")
        .arg("--ryw-primary-per-second")
        .arg("2")
        .run()?;
    let r = Region { edge, ..r0 };
    let (token, host, pid) = store_with_product(&r, "forge", 900).await?;
    // Cached and stable (see above: the first render may be dropped once).
    eventually(WAIT, "store cached from the delayed replica", || async {
        let (s, cs, body) = get(&r.edge, &host, "/").await.ok()?;
        (s == StatusCode::OK && body.contains("$9.00") && cs.contains("hit")).then_some(())
    })
    .await?;

    // The attack from the issue, a bare LSN far ahead, and a well-shaped
    // cookie with a made-up MAC: ordinary cached reads, no wait, no primary.
    let forged = [
        ("ef_lsn=FFFFFFFF/FFFFFFFF", "malformed"),
        (
            "ef_lsn=FFFFFFFF/FFFFFFFF.1800000000.nosuch.00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            "unknown_key",
        ),
        ("ef_lsn=..;ef_lsn=", "malformed"),
    ];
    for (cookie, outcome) in forged {
        let (s, cs, body, took) = get_with_cookie(&r.edge, &host, cookie).await?;
        assert_eq!(s, StatusCode::OK, "{cookie}");
        assert!(
            cs.contains("hit") && !cs.contains("primary"),
            "{cookie}: {cs}"
        );
        assert!(body.contains("$9.00"));
        // The genuine wait bound is 1.5 s; an ignored cookie must not wait for it.
        assert!(
            took < Duration::from_millis(1000),
            "{cookie}: waited {took:?}"
        );
        let n = metric(
            &r.edge,
            &format!("edgefront_read_your_writes_total{{outcome=\"{outcome}\""),
        )
        .await?;
        assert!(n >= 1.0, "{outcome} not counted");
    }

    // A genuine cookie: write through the edge.
    let resp = client()
        .patch(format!("{}/api/products/{pid}", r.edge.url()))
        .header("host", &host)
        .bearer_auth(&token)
        .json(&json!({ "price_cents": 1_100 }))
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let set_cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .context("set-cookie")?
        .to_owned();
    let cookie = set_cookie.split(';').next().context("cookie")?.to_owned();
    assert!(
        cookie.starts_with("ef_lsn=") && cookie.matches('.').count() == 3,
        "{cookie}"
    );
    // Tampering with its LSN breaks the MAC.
    let (lsn, rest) = cookie["ef_lsn=".len()..].split_once('.').context("shape")?;
    let tampered = format!("ef_lsn=FFFFFFFF/FFFFFFFF.{rest}");
    let (s, cs, _, _) = get_with_cookie(&r.edge, &host, &tampered).await?;
    assert!(s == StatusCode::OK && !cs.contains("primary"), "{cs}");
    assert!(
        metric(
            &r.edge,
            "edgefront_read_your_writes_total{outcome=\"bad_mac\""
        )
        .await?
            >= 1.0
    );
    assert!(!lsn.is_empty());

    // Six readers with the genuine cookie at once, replica 4 s behind: the
    // budget (1 at once, 2 per second) lets at most two read the primary;
    // the others get the replica's page after the wait, marked — no errors.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (edge_url, host, cookie) = (r.edge.url(), host.clone(), cookie.clone());
        tasks.push(tokio::spawn(async move {
            let r = client()
                .get(format!("{edge_url}/"))
                .header("host", &host)
                .header("cookie", &cookie)
                .send()
                .await?;
            let status = r.status();
            let cs = r.headers()["cache-status"].to_str()?.to_owned();
            let body = r.text().await?;
            anyhow::Ok((status, cs, body))
        }));
    }
    let (mut primary, mut behind) = (0, 0);
    for t in tasks {
        let (status, cs, body) = t.await??;
        assert_eq!(status, StatusCode::OK, "{cs}");
        if cs.contains("read-your-writes-primary") {
            assert!(body.contains("$11.00"), "the primary has the write");
            primary += 1;
        } else {
            assert!(cs.contains("read-your-writes-behind"), "{cs}");
            behind += 1;
        }
    }
    assert!((1..=2).contains(&primary), "primary reads {primary}");
    assert_eq!(primary + behind, 6);
    assert!(
        metric(
            &r.edge,
            "edgefront_read_your_writes_total{outcome=\"budget_spent\""
        )
        .await?
            >= behind as f64
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_for_a_while_catches_up_from_slot_and_pruned_log_drops_cache() -> Result<()> {
    let r = region("gru1", None, &[])?;
    let (token, host, pid) = store_with_product(&r, "cutoff", 100).await?;
    eventually(WAIT, "store on replica", || async {
        let (_, _, body) = get(&r.edge, &host, "/").await.ok()?;
        body.contains("$1.00").then_some(())
    })
    .await?;

    r.replica.cut_link()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Writes keep landing on the primary while the region is cut off.
    set_price(&r, &token, pid, 4_200).await?;
    for i in 0..40 {
        let resp = client()
            .post(format!("{}/api/products", r.origin.url()))
            .bearer_auth(&token)
            .json(&json!({ "name": format!("Gadget {i}"), "price_cents": 1000 + i }))
            .send()
            .await?;
        ensure!(resp.status() == StatusCode::CREATED);
    }
    // The log rows those writes made are pruned before the region sees them.
    let pool = sqlx::PgPool::connect(&r.primary.url()).await?;
    let horizon: i64 = sqlx::query_scalar(
        "WITH g AS (DELETE FROM change_log RETURNING seq)
         UPDATE change_log_horizon SET pruned_through = GREATEST(pruned_through, (SELECT max(seq) FROM g)),
                pruned_xid = pg_snapshot_xmax(pg_current_snapshot())::text::bigint
         RETURNING pruned_through",
    )
    .fetch_one(&pool)
    .await?;
    assert!(horizon > 0);
    // Cut off: the region keeps serving what it has.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s, _, body) = get(&r.edge, &host, "/").await?;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("$1.00") && !body.contains("Gadget"));

    r.replica.restore_link()?;
    let body = eventually(WAIT, "region catches up", || async {
        let (_, _, body) = get(&r.edge, &host, "/").await.ok()?;
        (body.contains("$42.00") && body.contains("Gadget 39")).then_some(body)
    })
    .await?;
    assert_eq!(body.matches("\">Gadget ").count(), 40, "nothing missing");
    assert!(
        metric(&r.edge, "edgefront_changelog_resets_total").await? >= 1.0,
        "pruned horizon must drop the cache"
    );
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM products")
        .fetch_one(&sqlx::PgPool::connect(&r.replica.url()).await?)
        .await?;
    assert_eq!(n, 41);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_down_serves_cached_pages_stale_if_error_and_503_for_uncached() -> Result<()> {
    let mut r = region_ttl("sin1", None, &[], 400)?;
    let (_, host, pid) = store_with_product(&r, "stale", 300).await?;
    eventually(WAIT, "store on replica", || async {
        let (_, _, body) = get(&r.edge, &host, "/").await.ok()?;
        body.contains("$3.00").then_some(())
    })
    .await?;
    r.replica.stop()?;
    tokio::time::sleep(Duration::from_millis(600)).await; // past the TTL: a fresh render is needed
    let (s, cs, body) = get(&r.edge, &host, "/").await?;
    assert_eq!(s, StatusCode::OK, "{}", r.edge.proc.log());
    assert!(cs.contains("stale-if-error"), "{cs}");
    assert!(body.contains("$3.00"));
    // Once the tail has noticed the outage, stale pages come without waiting for the pool.
    eventually(WAIT, "tail notices the outage", || async {
        (metric(&r.edge, "edgefront_changelog_poll_errors_total")
            .await
            .ok()?
            >= 1.0)
            .then_some(())
    })
    .await?;
    let t0 = Instant::now();
    let (s, cs, body) = get(&r.edge, &host, "/").await?;
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "stale answer took {:?}",
        t0.elapsed()
    );
    assert_eq!(s, StatusCode::OK, "{}", r.edge.proc.log());
    assert!(cs.contains("stale-if-error"), "{cs}");
    assert!(body.contains("$3.00"));
    let resp = client()
        .get(format!("{}/p/widget", r.edge.url()))
        .header("host", &host)
        .send()
        .await?;
    assert_eq!(
        resp.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "never rendered here: nothing to serve"
    );
    assert!(resp.headers().contains_key("retry-after"));
    let _ = pid;
    r.replica.start()?;
    eventually(WAIT, "fresh again", || async {
        let (s, cs, _) = get(&r.edge, &host, "/").await.ok()?;
        (s == StatusCode::OK && !cs.contains("stale")).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_lag_over_budget_reports_unhealthy_with_seconds() -> Result<()> {
    let r = region(
        "lax1",
        Some("recovery_min_apply_delay = '4s'"),
        &["--max-replica-lag-seconds", "1"],
    )?;
    let (token, _, pid) = store_with_product(&r, "laggy", 100).await?;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    set_price(&r, &token, pid, 200).await?;
    let v = eventually(WAIT, "unhealthy by lag", || async {
        let resp = client()
            .get(format!("{}/healthz", r.edge.admin_url()))
            .send()
            .await
            .ok()?;
        if resp.status() != StatusCode::SERVICE_UNAVAILABLE {
            return None;
        }
        let v: Value = resp.json().await.ok()?;
        v["reasons"][0]
            .as_str()?
            .starts_with("replica_lag")
            .then_some(v)
    })
    .await?;
    assert!(
        v["replica_lag_seconds"].as_f64().unwrap_or(0.0) > 1.0,
        "{v}"
    );
    eventually(WAIT, "healthy after replay", || async {
        let resp = client()
            .get(format!("{}/healthz", r.edge.admin_url()))
            .send()
            .await
            .ok()?;
        (resp.status() == StatusCode::OK).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_down_pages_served_writes_503_and_acknowledged_orders_survive() -> Result<()> {
    let mut r = region("fra1", None, &[])?;
    let (_, host, pid) = store_with_product(&r, "durable", 250).await?;
    eventually(WAIT, "store on replica", || async {
        let (_, _, body) = get(&r.edge, &host, "/").await.ok()?;
        body.contains("$2.50").then_some(())
    })
    .await?;
    let order = |key: String| {
        client()
            .post(format!("{}/orders", r.edge.url()))
            .header("host", host.clone())
            .header("idempotency-key", key)
            .json(
                &json!({ "email": "a@b.example", "items": [{ "product_id": pid, "quantity": 1 }] }),
            )
            .send()
    };
    let mut acked = Vec::new();
    for i in 0..20 {
        let resp = order(format!("before-{i}")).await?;
        assert_eq!(resp.status(), StatusCode::CREATED);
        acked.push(
            resp.json::<Value>().await?["order"]["id"]
                .as_i64()
                .context("id")?,
        );
    }
    r.primary.stop()?; // immediate: like a crash

    let t0 = Instant::now();
    let resp = order("during".into()).await?;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "bounded wait: {:?}",
        t0.elapsed()
    );
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(resp.headers()["x-edge-route"], "fra1");
    // Pages keep coming from the replica.
    for path in ["/", "/p/widget"] {
        let (s, _, body) = get(&r.edge, &host, path).await?;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert!(body.contains("$2.50"));
    }

    r.primary.start()?;
    let resp = eventually(WAIT, "writes accepted again", || async {
        let resp = order("during".into()).await.ok()?;
        resp.status().is_success().then_some(resp)
    })
    .await?;
    let during = resp.json::<Value>().await?["order"]["id"]
        .as_i64()
        .context("id")?;
    let again = order("during".into()).await?;
    assert_eq!(again.status(), StatusCode::OK, "a retried key replays");
    assert_eq!(
        again.json::<Value>().await?["order"]["id"].as_i64(),
        Some(during)
    );
    let pool = sqlx::PgPool::connect(&r.primary.url()).await?;
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM orders WHERE idempotency_key LIKE 'before-%' ORDER BY id",
    )
    .fetch_all(&pool)
    .await?;
    assert_eq!(ids, acked, "every acknowledged order survived");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE idempotency_key = 'during'")
        .fetch_one(&pool)
        .await?;
    assert_eq!(n, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_challenges_are_answered_from_the_replica_even_with_the_origin_down() -> Result<()> {
    let mut r = region("nyc1", None, &[])?;
    let pool = sqlx::PgPool::connect(&r.primary.url()).await?;
    sqlx::query("INSERT INTO acme_challenges (token, hostname, key_authorization) VALUES ('tok_1', 'x.example', 'tok_1.thumb')")
        .execute(&pool)
        .await?;
    let url = format!("{}/.well-known/acme-challenge/tok_1", r.edge.url());
    // Wait for the row on the replica itself (the origin would answer meanwhile).
    let replica = sqlx::PgPool::connect(&r.replica.url()).await?;
    eventually(WAIT, "challenge replicated", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM acme_challenges WHERE token = 'tok_1'")
                .fetch_one(&replica)
                .await
                .ok()?;
        (n == 1).then_some(())
    })
    .await?;
    r.origin.stop();
    let resp = client()
        .get(&url)
        .header("host", "x.example")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::OK, "{}", r.edge.proc.log());
    assert_eq!(resp.headers()["x-edge-route"], "nyc1");
    assert_eq!(resp.text().await?, "tok_1.thumb");
    // Not on the replica (yet): the origin is asked; it is down, so 503.
    let resp = client()
        .get(format!(
            "{}/.well-known/acme-challenge/unknown",
            r.edge.url()
        ))
        .header("host", "x.example")
        .send()
        .await?;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    Ok(())
}
