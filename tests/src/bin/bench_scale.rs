//! `edgefront-bench-scale`: how the edge fares with many stores (issue 16,
//! item 3, in part). Starts a one-region stack on loopback (PostgreSQL
//! primary and replica, origin, edge), generates `--stores` stores whose
//! catalogs are Zipf-sized (the biggest has `--biggest` products, the
//! exponent chosen so that all of them hold about `--products`; at least one
//! each), a category per 100 products (at most 50 a store) and `--domains`
//! custom domains, all in bulk SQL on the primary. Measures: the bulk load,
//! the replica's catch-up, the edge's start (listening, then healthy: warm),
//! and cold renders of the home page and a category page of a small store
//! and of the biggest (each sample changes the store, so the next request
//! renders from the replica; `server-timing` gives replica and render
//! times). Prints markdown. Loopback only; every loop is bounded.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use edgefront_tests::{Edge, Stack, client, percentile};

#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Stores to generate.
    #[arg(long, default_value_t = 100_000)]
    stores: u64,
    /// Products in all (about: sizes are whole numbers).
    #[arg(long, default_value_t = 2_000_000)]
    products: u64,
    /// Products of the biggest store.
    #[arg(long, default_value_t = 20_000)]
    biggest: u64,
    /// Stores (the biggest first) that get a custom domain.
    #[arg(long, default_value_t = 20_000)]
    domains: u64,
    /// Cold renders measured per page.
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// Skip the plans of the storefront's queries (auto_explain on the
    /// replica; fails on a sequential scan of a catalog table).
    #[arg(long)]
    no_explain: bool,
    /// Shoppers' requests for the hit ratio: store home pages, the store
    /// drawn by Zipf(1.0) over all stores (0: skip).
    #[arg(long, default_value_t = 20_000)]
    zipf_requests: usize,
    /// Page cache budgets for the hit ratio, MiB (the edge's default is 256).
    #[arg(long, value_delimiter = ',', default_values_t = [256u64, 32])]
    cache_mib: Vec<u64>,
}

/// Store ranks (0 = the most popular) drawn by Zipf(1.0) over `n` ranks,
/// from a fixed seed (xorshift64*, inverse of the cumulative weights).
fn zipf_ranks(n: usize, count: usize) -> Vec<usize> {
    let mut cumulative = Vec::with_capacity(n);
    let mut sum = 0.0;
    for r in 1..=n {
        sum += 1.0 / r as f64;
        cumulative.push(sum);
    }
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..count)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let u = (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
            cumulative.partition_point(|&c| c < u * sum).min(n - 1)
        })
        .collect()
}

/// The catalog's tables: a storefront query must never scan one whole.
const CATALOG: [&str; 4] = ["stores", "categories", "products", "domains"];

/// The one whole read by design: the edge's set of custom domains (every
/// name, in memory; loaded at start and again after a domain changes), so
/// an unknown name costs no query.
const WHOLE_BY_DESIGN: &str = "SELECT hostname FROM domains";

/// The plans auto_explain wrote to `log` (text format): each query's first
/// line and the scans of its plan, in order of appearance, one row per
/// distinct query.
fn plans(log: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for entry in log.split("plan:").skip(1) {
        let mut lines = entry.lines();
        let query = lines
            .by_ref()
            .find_map(|l| l.trim().strip_prefix("Query Text:"))
            .map(|q| q.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let scans: Vec<String> = lines
            .take_while(|l| !l.contains("duration: ") && !l.contains(" LOG: "))
            .filter_map(|l| {
                let l = l.trim().trim_start_matches("->").trim();
                let node = l.split("  (").next()?;
                node.contains(" Scan").then(|| node.to_owned())
            })
            .collect();
        if !query.is_empty() && !out.iter().any(|(q, _)| *q == query) {
            out.push((query, scans));
        }
    }
    out
}

/// The Zipf exponent `s` for which `sum(max(1, floor(biggest / r^s)))` over
/// ranks 1..=stores is closest to `products` (bisection; the sum falls as
/// `s` grows).
fn exponent(stores: u64, products: u64, biggest: u64) -> f64 {
    let total = |s: f64| -> u64 {
        (1..=stores)
            .map(|r| ((biggest as f64) * (r as f64).powf(-s)).floor().max(1.0) as u64)
            .sum()
    };
    let (mut lo, mut hi) = (0.0f64, 4.0f64);
    for _ in 0..50 {
        let mid = (lo + hi) / 2.0;
        if total(mid) > products {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

/// Whether the edge's `/healthz` answers 200 (warm: pools open, domain set loaded).
async fn healthy(edge: &Edge) -> bool {
    client()
        .get(format!("{}/healthz", edge.admin_url()))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// A new edge on the stack's replica with `args`, once it says healthy
/// (warm), and how long it took to listen. Pages are cached for an hour,
/// longer than any run.
async fn warm_edge(stack: &Stack, args: &[&str]) -> Result<(Edge, Duration)> {
    let t = Instant::now();
    let mut builder =
        Edge::builder("fra1", &stack.replica.url(), stack.origin.addr).cache_ttl_ms(3_600_000);
    for a in args {
        builder = builder.arg(a);
    }
    let edge = builder.run()?;
    let listening = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !healthy(&edge).await {
        ensure!(Instant::now() < deadline, "the edge never said healthy");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((edge, listening))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    ensure!(cli.stores >= 2 && cli.biggest >= 1, "at least 2 stores");
    let s = exponent(cli.stores, cli.products, cli.biggest);
    let mut stack = Stack::start("fra1", 600_000)?;
    let pool = sqlx::PgPool::connect(&stack.primary.url()).await?;
    eprintln!(
        "bench-scale: {} stores, Zipf exponent {s:.4}, loading…",
        cli.stores
    );

    // Bulk load: stores, categories, products, domains, each one statement.
    let t0 = Instant::now();
    let first: i64 = sqlx::query_scalar(
        "WITH s AS (
           INSERT INTO stores (slug, name, currency, token_hash)
           SELECT 'scale-' || g, 'Scale store ' || g, 'EUR', sha256(('scale-token-' || g)::bytea)
           FROM generate_series(1, $1::bigint) g
           RETURNING id)
         SELECT min(id) FROM s",
    )
    .bind(cli.stores as i64)
    .fetch_one(&pool)
    .await?;
    let stores_done = t0.elapsed();
    // A store's rank (1 = biggest) and its catalog's size.
    let size = "greatest(1, floor($2::float8 * power((s.id - $1 + 1)::float8, -$3::float8)))::int";
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO categories (store_id, slug, name, position)
         SELECT s.id, 'cat-' || g, 'Category ' || g, g
         FROM stores s, generate_series(1, least(50, greatest(1, ceil({size} / 100.0)::int))) g
         WHERE s.id >= $1"
    )))
    .bind(first)
    .bind(cli.biggest as f64)
    .bind(s)
    .execute(&pool)
    .await?;
    let categories_done = t0.elapsed();
    let products: u64 = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO products (store_id, category_id, slug, name, description, price_cents, position)
         SELECT s.id, c.id, 'p-' || g, 'Product ' || g, 'A product of the scale benchmark.', 100 + g, g
         FROM stores s
         CROSS JOIN LATERAL generate_series(1, {size}) g
         JOIN categories c ON c.store_id = s.id
           AND c.slug = 'cat-' || (1 + g % least(50, greatest(1, ceil({size} / 100.0)::int)))
         WHERE s.id >= $1"
    )))
    .bind(first)
    .bind(cli.biggest as f64)
    .bind(s)
    .execute(&pool)
    .await?
    .rows_affected();
    let products_done = t0.elapsed();
    sqlx::query(
        "INSERT INTO domains (hostname, store_id)
         SELECT 'scale-' || (s.id - $1 + 1) || '.example', s.id FROM stores s
         WHERE s.id >= $1 AND s.id < $1 + $2",
    )
    .bind(first)
    .bind(cli.domains as i64)
    .execute(&pool)
    .await?;
    let load = t0.elapsed();

    // The replica's catch-up: until it has replayed the primary's WAL.
    let target: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&pool)
        .await?;
    let replica = sqlx::PgPool::connect(&stack.replica.url()).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let caught: bool = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&target)
            .fetch_one(&replica)
            .await?;
        if caught {
            break;
        }
        ensure!(Instant::now() < deadline, "the replica never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caught_up = t0.elapsed();

    // The edge's start with the data in place.
    let mut starts = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let edge = warm_edge(&stack, &[]).await?;
        starts.push((edge.1, t.elapsed()));
        stack.edge = edge.0;
    }

    // Cold renders: the biggest store and the smallest (the last rank).
    let http = client();
    let mut rows = Vec::new();
    for (label, id) in [
        ("biggest", first),
        ("smallest", first + cli.stores as i64 - 1),
    ] {
        let slug: String = sqlx::query_scalar("SELECT slug FROM stores WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
        let host = format!("{slug}.{}", stack.platform_domain);
        let listed: i64 = sqlx::query_scalar("SELECT count(*) FROM products WHERE store_id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await?;
        for path in ["/", "/c/cat-1"] {
            let (mut total, mut replica_ms, mut render_ms, mut bytes) =
                (Vec::new(), Vec::new(), Vec::new(), 0);
            for i in 0..cli.samples {
                let marker = format!("scale-bench-{i}");
                sqlx::query("UPDATE stores SET tagline = $2 WHERE id = $1")
                    .bind(id)
                    .bind(&marker)
                    .execute(&pool)
                    .await?;
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let t = Instant::now();
                    let r = http
                        .get(format!("{}{path}", stack.edge.url()))
                        .header("host", &host)
                        .send()
                        .await?;
                    let status = r.status();
                    let cache = edgefront_tests::header_text(&r, "cache-status");
                    let st = edgefront_tests::header_text(&r, "server-timing");
                    let body = r.text().await?;
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    if status.is_success() && body.contains(&marker) {
                        if cache.contains("miss") {
                            total.push(ms);
                            replica_ms.push(
                                edgefront_tests::server_timing(&st, "replica")
                                    .context("replica timing")?,
                            );
                            render_ms.push(
                                edgefront_tests::server_timing(&st, "render")
                                    .context("render timing")?,
                            );
                            bytes = body.len();
                        }
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "{host}{path}: sample {i} never changed ({status})"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            rows.push(format!(
                "| {label} ({listed} products) | `{path}` | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {bytes} |",
                total.len(),
                percentile(&mut total, 50.0),
                percentile(&mut total, 99.0),
                percentile(&mut replica_ms, 50.0),
                percentile(&mut replica_ms, 99.0),
                percentile(&mut render_ms, 50.0),
            ));
        }
    }
    let edge_rss = edgefront_tests::rss_kib(stack.edge.proc.pid());

    println!(
        "{} stores, {products} products (Zipf exponent {s:.4}; the biggest {}), {} custom domains.\n",
        cli.stores, cli.biggest, cli.domains
    );
    println!("| step | seconds since the load began |\n|---|---|");
    println!("| stores inserted | {:.1} |", stores_done.as_secs_f64());
    println!(
        "| categories inserted | {:.1} |",
        categories_done.as_secs_f64()
    );
    println!("| products inserted | {:.1} |", products_done.as_secs_f64());
    println!(
        "| domains inserted (load done) | {:.1} |",
        load.as_secs_f64()
    );
    println!("| replica caught up | {:.1} |", caught_up.as_secs_f64());
    println!("\nEdge start with this data (3 starts): listening / healthy (warm) in ms:");
    for (l, h) in &starts {
        println!(
            "- {:.0} / {:.0}",
            l.as_secs_f64() * 1e3,
            h.as_secs_f64() * 1e3
        );
    }
    println!(
        "\n| store | page | cold renders | total p50 ms | total p99 ms | replica p50 ms | replica p99 ms | render p50 ms | bytes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!("\nEdge RSS after the renders: {} MiB", edge_rss / 1024);

    // The page cache's hit ratio under shoppers' Zipf(1.0) traffic over
    // every store, from a cold cache, at each budget.
    if cli.zipf_requests > 0 {
        let ranks = zipf_ranks(cli.stores as usize, cli.zipf_requests);
        let distinct = ranks.iter().collect::<std::collections::HashSet<_>>().len();
        println!(
            "\nPage cache under Zipf(1.0) over {} stores' home pages, {} requests ({distinct} distinct stores), cold start, sequential:\n",
            cli.stores, cli.zipf_requests
        );
        println!(
            "| budget MiB | hits | misses | hit ratio | last quarter hit ratio | edge RSS MiB |\n|---|---|---|---|---|---|"
        );
        for mib in &cli.cache_mib {
            stack.edge = warm_edge(&stack, &["--cache-max-mib", &mib.to_string()])
                .await?
                .0;
            let (mut hits, mut misses, mut late_hits) = (0usize, 0usize, 0usize);
            let quarter = ranks.len() * 3 / 4;
            for (i, rank) in ranks.iter().enumerate() {
                let r = http
                    .get(format!("{}/", stack.edge.url()))
                    .header(
                        "host",
                        format!("scale-{}.{}", rank + 1, stack.platform_domain),
                    )
                    .send()
                    .await?;
                ensure!(r.status().is_success(), "rank {rank}: {}", r.status());
                let hit = edgefront_tests::header_text(&r, "cache-status").contains("; hit");
                r.bytes().await?;
                if hit {
                    hits += 1;
                    if i >= quarter {
                        late_hits += 1;
                    }
                } else {
                    misses += 1;
                }
            }
            let rss = edgefront_tests::rss_kib(stack.edge.proc.pid());
            println!(
                "| {mib} | {hits} | {misses} | {:.3} | {:.3} | {} |",
                hits as f64 / ranks.len() as f64,
                late_hits as f64 / (ranks.len() - quarter) as f64,
                rss / 1024
            );
        }
    }

    // Every storefront query's plan as PostgreSQL ran it on the replica:
    // auto_explain in the edge's own sessions (a role setting, replicated),
    // for the biggest and the smallest store's pages.
    if !cli.no_explain {
        for sql in [
            "ALTER ROLE edgefront SET session_preload_libraries = 'auto_explain'",
            "ALTER ROLE edgefront SET auto_explain.log_min_duration = 0",
        ] {
            sqlx::query(sql).execute(&pool).await?;
        }
        let target: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&pool)
            .await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !sqlx::query_scalar::<_, bool>("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
            .bind(&target)
            .fetch_one(&replica)
            .await?
        {
            ensure!(Instant::now() < deadline, "the replica never caught up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // New sessions load it: a new edge.
        stack.edge = warm_edge(&stack, &[]).await?.0;
        let from = stack.replica.log().len();
        for id in [first, first + cli.stores as i64 - 1] {
            let slug: String = sqlx::query_scalar("SELECT slug FROM stores WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await?;
            for (host, path) in [
                (format!("{slug}.{}", stack.platform_domain), "/"),
                (format!("{slug}.{}", stack.platform_domain), "/?page=2"),
                (format!("{slug}.{}", stack.platform_domain), "/c/cat-1"),
                (
                    format!("{slug}.{}", stack.platform_domain),
                    "/c/cat-1?page=2",
                ),
                (format!("{slug}.{}", stack.platform_domain), "/p/p-1"),
                (
                    format!("{slug}.{}", stack.platform_domain),
                    "/p/no-such-product",
                ),
                (format!("scale-{}.example", id - first + 1), "/"),
            ] {
                let status = http
                    .get(format!("{}{path}", stack.edge.url()))
                    .header("host", &host)
                    .send()
                    .await?
                    .status();
                ensure!(
                    status.is_success() || status.as_u16() == 404,
                    "{host}{path}: {status}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let log = stack.replica.log();
        let found = plans(log.get(from..).unwrap_or_default());
        sqlx::query("ALTER ROLE edgefront RESET ALL")
            .execute(&pool)
            .await?;
        println!(
            "\nPlans of the storefront's queries on the replica (auto_explain), biggest and smallest store:\n"
        );
        println!("| query | scans |\n|---|---|");
        let mut seq = Vec::new();
        for (query, scans) in &found {
            let short: String = query.chars().take(110).collect();
            println!("| `{short}` | {} |", scans.join("; "));
            for s in scans.iter().filter(|_| query != WHOLE_BY_DESIGN) {
                if let Some(t) = s.strip_prefix("Seq Scan on ")
                    && CATALOG.contains(&t.split_whitespace().next().unwrap_or_default())
                {
                    seq.push(format!("{short}: {s}"));
                }
            }
        }
        ensure!(!found.is_empty(), "auto_explain logged no plan");
        ensure!(
            seq.is_empty(),
            "sequential scans of catalog tables: {seq:#?}"
        );
    }
    pool.close().await;
    replica.close().await;
    Ok(())
}
