//! Graceful upgrade of the edge binary (issue 14, item 1): a new process
//! started with `--upgrade` takes the listening sockets over from the
//! running one (pingora's file-descriptor hand-off on SIGQUIT), the old one
//! finishes what it has in flight and exits. Shoppers loading pages and
//! writing through the edge the whole time see no failed request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use edgefront_tests::{Edge, Origin, Postgres};

const HOST: &str = "spiceroute.example";

/// Whether process `pid` has exited (gone, or a zombie waiting for us).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_under_load_fails_no_request() -> Result<()> {
    let platform = edgefront_regions::Regions::builtin()?
        .network
        .platform_domain;
    let primary = Postgres::primary()?;
    let origin = Origin::start(&primary.url(), &platform)?;
    Origin::seed_demo(&primary.url(), &platform)?;
    let replica = primary.replica("fra1")?;
    let builder = Edge::builder("fra1", &replica.url(), origin.addr).cache_ttl_ms(300_000);
    let old = builder.clone().run()?;
    let url = old.url();

    // Shoppers: pages over a keep-alive connection, pages over a new
    // connection each, and cart reads through the edge to the origin.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, retried) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let first_failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut load = Vec::new();
    for (kind, path) in [
        ("keep-alive", "/"),
        ("new connection", "/"),
        ("keep-alive", "/cart"),
    ] {
        let http = match kind {
            "keep-alive" => reqwest::Client::builder(),
            _ => reqwest::Client::builder().pool_max_idle_per_host(0),
        }
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
        let (stop, ok, failed, retried, first_failure, url) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            retried.clone(),
            first_failure.clone(),
            url.clone(),
        );
        load.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let send = || http.get(format!("{url}{path}")).header("host", HOST).send();
                let mut r = send().await;
                // A keep-alive connection the old process closed as this
                // request went out (HTTP/1.1's idle-close race) fails before
                // any answer: browsers send such a GET once more on a new
                // connection (RFC 9112 §9.3.1), and so does this shopper.
                // Counted; a fresh connection's failure is never retried.
                if kind == "keep-alive"
                    && let Err(e) = &r
                    && e.is_request()
                    && format!("{e:?}").contains("ConnectionReset")
                {
                    retried.fetch_add(1, Ordering::Relaxed);
                    r = send().await;
                }
                let status = match r {
                    Ok(r) => {
                        let s = r.status();
                        match r.bytes().await {
                            Ok(_) => Ok(s),
                            Err(e) => Err(format!("{kind} {path}: body: {e}")),
                        }
                    }
                    Err(e) => Err(format!("{kind} {path}: {e:?}")),
                };
                match status {
                    Ok(s) if s.is_success() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut f) = first_failure.lock() {
                            f.get_or_insert(format!("{other:?}"));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = ok.load(Ordering::Relaxed);

    // The upgrade: the new process waits for the sockets, the old one is
    // told to hand them over (SIGQUIT), then finishes and exits.
    let new = builder.run_upgrade(&old)?;
    let quit_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old.proc.pid() as i32),
        nix::sys::signal::Signal::SIGQUIT,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exited(old.proc.pid()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        exited(old.proc.pid()),
        "the old edge exited: {}",
        old.proc.log()
    );
    let old_gone = quit_at.elapsed();
    // The new one alone serves for a while.
    let at_exit = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await?;
    }
    let (ok, failed, retried) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        retried.load(Ordering::Relaxed),
    );
    let hits = new
        .metric("edgefront_cache_lookups_total{result=\"hit\"")
        .await?;
    let misses = new
        .metric("edgefront_cache_lookups_total{result=\"miss\"")
        .await?;
    eprintln!(
        "upgrade: {ok} requests answered ({before} before the upgrade, {} after the old edge exited {old_gone:?} after SIGQUIT), {failed} failed, {retried} keep-alive GETs retried once on a new connection; the new edge's cache: {hits} hits, {misses} misses",
        ok - at_exit
    );
    assert_eq!(
        failed,
        0,
        "first failure: {:?}\nold: {}\nnew: {}",
        first_failure.lock().ok().and_then(|f| f.clone()),
        old.proc.log(),
        new.proc.log()
    );
    assert!(ok > at_exit, "the new edge served after the old one exited");
    assert!(hits + misses > 0.0, "the new edge answered pages");
    drop((new, old));
    Ok(())
}
