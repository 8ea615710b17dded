//! `edgefront-bench-listing`: what a cold render of a listing page costs
//! when a category holds many products, for its first, middle and last page
//! (`?page=N`, 48 products a page, read with LIMIT/OFFSET in the index's
//! order), and the query plans. One store of the demo gets `--products`
//! more products in one category; each sample changes the store (its
//! tagline), so the next request for each page renders it from the replica,
//! and the edge's `server-timing` gives the replica and render times.
//! Prints a markdown report. Loopback only; every loop is bounded.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use edgefront_tests::{Stack, client, percentile};

#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Products added to the category.
    #[arg(long, default_value_t = 20_000)]
    products: u32,
    /// Cold renders measured per page.
    #[arg(long, default_value_t = 20)]
    samples: usize,
}

const HOST: &str = "spiceroute.example";
const CATEGORY: &str = "biryani";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let stack = Stack::start("fra1", 600_000)?;
    stack.seed()?;
    let pool = sqlx::PgPool::connect(&stack.primary.url()).await?;
    let store: i64 = sqlx::query_scalar("SELECT store_id FROM domains WHERE hostname = $1")
        .bind(HOST)
        .fetch_one(&pool)
        .await?;
    let t0 = Instant::now();
    sqlx::query(
        "INSERT INTO products (store_id, slug, name, description, price_cents, category_id, position)
         SELECT $1, 'bulk-' || g, 'Bulk product ' || g, 'A product of the listing benchmark.', 100 + g,
                c.id, 1000 + g
         FROM categories c, generate_series(1, $3::int) g WHERE c.store_id = $1 AND c.slug = $2",
    )
    .bind(store)
    .bind(CATEGORY)
    .bind(cli.products as i32)
    .execute(&pool)
    .await?;
    let load = t0.elapsed();
    let listed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM products p JOIN categories c ON c.id = p.category_id
         WHERE c.store_id = $1 AND c.slug = $2",
    )
    .bind(store)
    .bind(CATEGORY)
    .fetch_one(&pool)
    .await?;
    let last = u32::try_from(listed)?.div_ceil(48);
    let pages = [1, last.div_ceil(2), last];
    let http = client();
    let get = |page: u32| {
        let http = http.clone();
        let url = format!("{}/c/{CATEGORY}?page={page}", stack.edge.url());
        async move {
            let r = http.get(url).header("host", HOST).send().await?;
            let status = r.status();
            let cache = edgefront_tests::header_text(&r, "cache-status");
            let timing = edgefront_tests::header_text(&r, "server-timing");
            let body = r.text().await?;
            anyhow::Ok((status, cache, timing, body))
        }
    };
    // The replica has every product once the last page is there.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, _, body) = get(last).await?;
        if status.is_success() && body.contains("Bulk product") {
            break;
        }
        ensure!(Instant::now() < deadline, "page {last} never appeared");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let mut replica_ms: Vec<Vec<f64>> = vec![Vec::new(); pages.len()];
    let mut render_ms: Vec<Vec<f64>> = vec![Vec::new(); pages.len()];
    let mut bytes = vec![0usize; pages.len()];
    for i in 0..cli.samples {
        let marker = format!("listing-bench-{i}");
        sqlx::query("UPDATE stores SET tagline = $2 WHERE id = $1")
            .bind(store)
            .bind(&marker)
            .execute(&pool)
            .await?;
        for (k, &page) in pages.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (status, cache, timing_header, body) = get(page).await?;
                if status.is_success() && body.contains(&marker) {
                    // The first answer with the change is its render.
                    if cache.contains("miss") {
                        replica_ms[k].push(
                            edgefront_tests::server_timing(&timing_header, "replica")
                                .context("replica timing")?,
                        );
                        render_ms[k].push(
                            edgefront_tests::server_timing(&timing_header, "render")
                                .context("render timing")?,
                        );
                        bytes[k] = body.len();
                    }
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "sample {i}: page {page} never changed"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    let mut plans = Vec::new();
    let replica = sqlx::PgPool::connect(&stack.replica.url()).await?;
    for &page in &[1, last] {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING ON, SUMMARY ON)
             SELECT p.id, p.slug, p.name, p.description, p.price_cents, p.category_id, p.available
             FROM products p WHERE p.store_id = {store}
               AND p.category_id = (SELECT id FROM categories WHERE store_id = {store} AND slug = '{CATEGORY}')
             ORDER BY p.position, p.id LIMIT 49 OFFSET {}",
            (page - 1) * 48
        )))
        .fetch_all(&replica)
        .await?;
        plans.push((page, rows));
    }

    println!(
        "Listing of {listed} products in one category ({} pages of 48); {} products added in {:.2} s.\n",
        last,
        cli.products,
        load.as_secs_f64()
    );
    println!(
        "| page | cold renders | replica p50 ms | replica p99 ms | render p50 ms | render p99 ms | bytes |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (k, page) in pages.iter().enumerate() {
        let n = replica_ms[k].len();
        println!(
            "| {page} | {n} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            percentile(&mut replica_ms[k], 50.0),
            percentile(&mut replica_ms[k], 99.0),
            percentile(&mut render_ms[k], 50.0),
            percentile(&mut render_ms[k], 99.0),
            bytes[k]
        );
    }
    for (page, rows) in plans {
        println!("\nPlan of the category query for page {page} (on the replica):\n```");
        for r in rows {
            println!("{r}");
        }
        println!("```");
    }
    pool.close().await;
    replica.close().await;
    Ok(())
}
