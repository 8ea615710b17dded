//! `edgefront-bench-freshness`: how long a seller's committed write takes to
//! show on every region's edge while the edges are under read load, split
//! into replication and tail + invalidation + render; and what the change-log
//! tail costs the replica and the edge, idle and under a burst of updates.
//! Prints a markdown report. Loopback only; every loop is bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use edgefront_tests::{Network, client, percentile as pct};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Regions (comma-separated); the first is the primary's.
    #[arg(long, default_value = "bom1,sin1,ams1,nyc1")]
    regions: String,
    /// Number of measured writes.
    #[arg(long, default_value_t = 200)]
    writes: usize,
    /// Background readers per edge.
    #[arg(long, default_value_t = 2)]
    readers: usize,
    /// Updates in the burst.
    #[arg(long, default_value_t = 1000)]
    burst: usize,
}

fn cpu_seconds(pid: u32) -> f64 {
    // utime + stime, fields 14 and 15 of /proc/PID/stat, in clock ticks (100/s).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(f64::NAN)
}

async fn metric(admin: &str, name: &str) -> f64 {
    edgefront_tests::metric_sum(admin, name)
        .await
        .unwrap_or(f64::NAN)
}

async fn replica_xacts(url: &str) -> f64 {
    let Ok(pool) = sqlx::PgPool::connect(url).await else {
        return f64::NAN;
    };
    let n: Result<i64, _> =
        sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = 'edgefront'")
            .fetch_one(&pool)
            .await;
    pool.close().await;
    n.map(|n| n as f64).unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let regions: Vec<&str> = cli.regions.split(',').map(str::trim).collect();
    let net = Network::start(&regions, &["--threads", "1"])?;
    let platform = net.platform_domain.clone();
    let origin = net.origin.url();

    let v: Value = client()
        .post(format!("{origin}/api/stores"))
        .json(&json!({ "name": "Fresh Bench", "slug": "fresh-bench", "currency": "USD" }))
        .send()
        .await?
        .json()
        .await?;
    let token = v["token"].as_str().context("token")?.to_owned();
    let p: Value = client()
        .post(format!("{origin}/api/products"))
        .bearer_auth(&token)
        .json(&json!({ "name": "Probe", "price_cents": 100 }))
        .send()
        .await?
        .json()
        .await?;
    let pid = p["product"]["id"].as_i64().context("product")?;
    let host = format!("fresh-bench.{platform}");
    for e in &net.edges {
        edgefront_tests::eventually(Duration::from_secs(20), "store everywhere", || async {
            let r = client()
                .get(format!("{}/", e.url()))
                .header("host", &host)
                .send()
                .await
                .ok()?;
            r.status().is_success().then_some(())
        })
        .await?;
    }

    // Background read load on every edge (bounded by a stop flag and a deadline).
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for e in &net.edges {
        for _ in 0..cli.readers {
            let (stop, reads, url, host) = (stop.clone(), reads.clone(), e.url(), host.clone());
            load.push(tokio::spawn(async move {
                let c = client();
                let deadline = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if c.get(format!("{url}/"))
                        .header("host", &host)
                        .send()
                        .await
                        .is_ok()
                    {
                        reads.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }

    // One connection per replica for the replay probes, opened before measuring.
    let mut replica_pools = Vec::new();
    for r in &net.replicas {
        replica_pools.push(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&r.url())
                .await?,
        );
    }
    let mut visible: Vec<Vec<f64>> = vec![Vec::new(); net.edges.len()];
    let mut replicated: Vec<Vec<f64>> = vec![Vec::new(); net.edges.len()];
    let t_run = Instant::now();
    let reads0 = reads.load(Ordering::Relaxed);
    for i in 0..cli.writes {
        let price = 10_000 + i as i64;
        let needle = format!("${}.{:02}", price / 100, price % 100);
        let r = client()
            .patch(format!("{origin}/api/products/{pid}"))
            .bearer_auth(&token)
            .json(&json!({ "price_cents": price }))
            .send()
            .await?;
        let committed = Instant::now();
        ensure!(r.status().is_success(), "write {i}: {}", r.status());
        let lsn = r.headers()["x-commit-lsn"].to_str()?.to_owned();
        let mut probes = Vec::new();
        for (k, e) in net.edges.iter().enumerate() {
            let (url, host, needle, pool, lsn) = (
                e.url(),
                host.clone(),
                needle.clone(),
                Some(replica_pools[k].clone()),
                lsn.clone(),
            );
            probes.push(tokio::spawn(async move {
                let c = client();
                let mut page = None;
                let mut repl = None;
                let deadline = committed + Duration::from_secs(10);
                while (page.is_none() || repl.is_none()) && Instant::now() < deadline {
                    if repl.is_none()
                        && let Some(pool) = &pool
                    {
                        let done: Option<bool> =
                            sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                                .bind(&lsn)
                                .fetch_one(pool)
                                .await
                                .ok();
                        if done == Some(true) {
                            repl = Some(committed.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                    if page.is_none()
                        && let Ok(r) = c.get(format!("{url}/")).header("host", &host).send().await
                        && r.text().await.unwrap_or_default().contains(&needle)
                    {
                        page = Some(committed.elapsed().as_secs_f64() * 1e3);
                    }
                }
                (page, repl)
            }));
        }
        for (k, pr) in probes.into_iter().enumerate() {
            let (page, repl) = pr.await?;
            visible[k].push(page.context("write never became visible")?);
            replicated[k].push(repl.unwrap_or(f64::NAN));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run_s = t_run.elapsed().as_secs_f64();
    let load_rps = (reads.load(Ordering::Relaxed) - reads0) as f64 / run_s;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await?;
    }

    println!("### Freshness: committed write → first request that sees it\n");
    println!(
        "{} writes, one every ~20 ms after the previous one was visible everywhere; background load {:.0} req/s \
         over {} edges ({} sequential readers each) plus the probes; edges with 1 worker thread, tail poll 20 ms.\n",
        cli.writes,
        load_rps,
        net.edges.len(),
        cli.readers
    );
    println!(
        "| region | visible p50 | visible p99 | max | replayed on replica p50 | p99 | tail + invalidate + render p50 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (k, e) in net.edges.iter().enumerate() {
        let (mut v, mut r) = (visible[k].clone(), replicated[k].clone());
        r.retain(|x| x.is_finite());
        let max = v.iter().copied().fold(0.0, f64::max);
        let diffs: Vec<f64> = visible[k]
            .iter()
            .zip(&replicated[k])
            .map(|(a, b)| a - b)
            .filter(|x| x.is_finite())
            .collect();
        let mut diffs = diffs;
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            e.region,
            pct(&mut v, 50.0),
            pct(&mut v, 99.0),
            max,
            pct(&mut r, 50.0),
            pct(&mut r, 99.0),
            pct(&mut diffs, 50.0)
        );
    }

    // Tail cost: idle, then a burst of updates.
    let window = Duration::from_secs(5);
    let snapshot = |net: &Network| {
        net.edges
            .iter()
            .map(|e| cpu_seconds(e.proc.pid()))
            .collect::<Vec<_>>()
    };
    let mut polls0 = Vec::new();
    let mut xacts0 = Vec::new();
    for (k, e) in net.edges.iter().enumerate() {
        polls0.push(metric(&e.admin_url(), "edgefront_changelog_polls_total").await);
        xacts0.push(replica_xacts(&net.replicas[k].url()).await);
    }
    let cpu0 = snapshot(&net);
    tokio::time::sleep(window).await;
    let cpu1 = snapshot(&net);
    let mut idle = Vec::new();
    for (k, e) in net.edges.iter().enumerate() {
        let polls = metric(&e.admin_url(), "edgefront_changelog_polls_total").await - polls0[k];
        // Subtract this measurement's own connection + query (2 transactions).
        let xacts = replica_xacts(&net.replicas[k].url()).await - xacts0[k] - 1.0;
        idle.push((
            polls / window.as_secs_f64(),
            xacts / window.as_secs_f64(),
            (cpu1[k] - cpu0[k]) / window.as_secs_f64(),
        ));
    }

    let inv0: Vec<f64> = {
        let mut v = Vec::new();
        for e in &net.edges {
            v.push(metric(&e.admin_url(), "edgefront_changelog_invalidations_total").await);
        }
        v
    };
    let cpu0 = snapshot(&net);
    let t_burst = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..8 {
        let (next, origin, token, burst) = (
            next.clone(),
            origin.clone(),
            token.clone(),
            cli.burst as u64,
        );
        writers.push(tokio::spawn(async move {
            let c = client();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= burst {
                    break;
                }
                let _ = c
                    .patch(format!("{origin}/api/products/{pid}"))
                    .bearer_auth(&token)
                    .json(&json!({ "price_cents": 50_000 + i }))
                    .send()
                    .await;
            }
        }));
    }
    for w in writers {
        w.await?;
    }
    let burst_s = t_burst.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu1 = snapshot(&net);
    let span = t_burst.elapsed().as_secs_f64();

    println!("\n### What the change-log tail costs\n");
    println!(
        "Idle (no writes, no reads) over {}s; burst: {} product updates through the origin API from 8 clients in {:.2}s ({:.0}/s), measured over {:.2}s including 1s to settle.\n",
        window.as_secs(),
        cli.burst,
        burst_s,
        cli.burst as f64 / burst_s,
        span
    );
    println!(
        "| region | idle polls/s | idle replica xacts/s (tail) | idle edge CPU | burst edge CPU | invalidations applied in burst |"
    );
    println!("|---|---|---|---|---|---|");
    for (k, e) in net.edges.iter().enumerate() {
        let inv = metric(&e.admin_url(), "edgefront_changelog_invalidations_total").await - inv0[k];
        println!(
            "| {} | {:.1} | {:.1} | {:.2}% of a core | {:.1}% of a core | {:.0} |",
            e.region,
            idle[k].0,
            idle[k].1,
            idle[k].2 * 100.0,
            (cpu1[k] - cpu0[k]) / span * 100.0,
            inv
        );
    }
    Ok(())
}
