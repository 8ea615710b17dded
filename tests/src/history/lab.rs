//! Records a [`History`] in the anycast lab while faults run.
//!
//! The run starts its own lab (`edgefront-lab --detach --durable`: the
//! primary with fsync, full-page writes and synchronous commit on, unless
//! the plan says otherwise), makes
//! one store per shopper city, and then, for the planned time, runs from
//! every city: a seller that renames its store to the next version through
//! the anycast address and reads it back with the cookie its write returned,
//! readers that read every store, and a shopper that places orders with
//! idempotency keys, retrying each key until it is acknowledged. From the
//! origin host it scrapes every edge's applied position every 50 ms. The
//! faults run one after the other, each healed before the next. After the
//! load it waits until every city sees every store's last version, reads
//! the orders back from the primary and runs the checks.
//!
//! Every loop is bounded by the plan's time (and a request timeout); the lab
//! is removed at the end, also on failure.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgefront_ctl::lab::{self, LabState};
use serde::{Deserialize, Serialize};

use super::{Fault, History, Order, Read, Report, Sample, Write, marker, parse_lsn, version_in};
use crate::{bin_dir, netlab};

/// A fault the run can inject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultKind {
    /// The region's replica stops (`pg_ctl -m immediate`), then starts.
    ReplicaStop(String),
    /// `pg_wal_replay_pause()` on the region's replica, then resume.
    ReplayPause(String),
    /// `edge-ctl drain`, then `undrain`.
    Drain(String),
    /// The region node goes silent and everything in it is SIGKILLed, then
    /// it is restored (`edge-ctl lab kill` / `restore`).
    Kill(String),
    /// The origin process is SIGKILLed and started again.
    OriginRestart,
    /// Every PostgreSQL process of the primary is SIGKILLed mid-load (a
    /// power pull), then the primary starts again (crash recovery).
    PrimaryKill,
}

impl FaultKind {
    /// How reports name it.
    pub fn name(&self) -> String {
        match self {
            FaultKind::ReplicaStop(r) => format!("replica stop {r}"),
            FaultKind::ReplayPause(r) => format!("replay pause {r}"),
            FaultKind::Drain(r) => format!("drain {r}"),
            FaultKind::Kill(r) => format!("hard kill {r}"),
            FaultKind::OriginRestart => "origin restart".into(),
            FaultKind::PrimaryKill => "primary SIGKILL".into(),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Lab prefix (unique per run).
    pub prefix: String,
    /// Regions of the lab (must include the primary's).
    pub regions: Vec<String>,
    /// Seconds of load; the fault schedule repeats to fill it.
    pub seconds: f64,
    /// How long each fault holds before it is healed.
    pub hold: Duration,
    /// Readers per city (each reads every store in turn).
    pub readers: usize,
    /// The primary with production durability (`edgefront-lab --durable`).
    /// Off only to show what the orders check catches without it.
    pub durable: bool,
}

impl Plan {
    /// The fault cycle: every kind once, rotating the regions by `round`.
    pub fn faults(&self, round: usize) -> Vec<FaultKind> {
        let replicas: Vec<&String> = self.regions.iter().collect();
        let at = |i: usize| replicas[(i + round) % replicas.len()].clone();
        vec![
            FaultKind::ReplicaStop(at(1)),
            FaultKind::ReplayPause(at(2)),
            FaultKind::Drain(at(0)),
            FaultKind::Kill(at(1)),
            FaultKind::OriginRestart,
            FaultKind::PrimaryKill,
        ]
    }
}

/// What a run returns: the history, the verdict, and timings.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub report: Report,
    /// Seconds from the end of the load until every city saw every store's
    /// last acknowledged version.
    pub converged_after: f64,
    pub history: History,
}

/// A store of the run.
#[derive(Debug, Clone)]
struct Store {
    host: String,
    token: String,
    product: i64,
}

/// Shared recording state.
struct Rec {
    t0: Instant,
    history: Mutex<History>,
    /// Set when the load is over: clients finish their current operation.
    stop: AtomicBool,
    /// Set when the sampler may stop (after the convergence reads).
    stop_sampling: AtomicBool,
}

impl Rec {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
    fn with<T>(&self, f: impl FnOnce(&mut History) -> T) -> T {
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut h)
    }
}

/// Runs `plan`: lab up, load and faults, convergence, checks, lab down.
pub fn run(plan: &Plan) -> Result<Outcome> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the history checker runs in the anycast lab: it needs root (network namespaces)");
    }
    let _guard = crate::netlab::LabGuard(plan.prefix.clone());
    let out = Command::new(bin_dir().join("edgefront-lab"))
        // One primary: the checker kills and restarts it itself.
        .args(["--prefix", &plan.prefix, "--detach", "--single-primary"])
        .args(plan.durable.then_some("--durable"))
        .args(["--regions", &plan.regions.join(",")])
        .output()
        .context("start edgefront-lab")?;
    if !out.status.success() {
        bail!(
            "lab did not start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let state = LabState::load(&plan.prefix)?;
    let platform = edgefront_regions::Regions::builtin()?
        .network
        .platform_domain
        .clone();
    let stores = make_stores(&state, &platform)?;
    wait_visible(&state, &stores, |_| 0, Duration::from_secs(30))?;

    let rec = Arc::new(Rec {
        t0: Instant::now(),
        history: Mutex::new(History::default()),
        stop: AtomicBool::new(false),
        stop_sampling: AtomicBool::new(false),
    });
    let sampler = {
        let (state, rec) = (state.clone(), rec.clone());
        std::thread::spawn(move || sample_loop(&state, &rec))
    };
    let cities: Vec<_> = state
        .regions
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (state, rec, stores) = (state.clone(), rec.clone(), stores.clone());
            let (ns, code, readers) = (r.city_ns.clone(), r.code.clone(), plan.readers);
            std::thread::spawn(move || -> Result<()> {
                netlab::in_netns(&ns, move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(city_clients(&state, &rec, &stores, i, &code, readers))
                })?
            })
        })
        .collect();

    // The faults, one after the other, until the planned time is used.
    let deadline = Duration::from_secs_f64(plan.seconds);
    let mut round = 0;
    let fault_result = (|| -> Result<()> {
        std::thread::sleep(Duration::from_secs(2));
        'outer: loop {
            for f in plan.faults(round) {
                if rec.t0.elapsed() + plan.hold * 2 > deadline {
                    break 'outer;
                }
                let start = rec.now();
                inject(&state, &f, plan.hold).with_context(|| f.name())?;
                heal_wait(&state, Duration::from_secs(40)).with_context(|| f.name())?;
                rec.with(|h| {
                    h.faults.push(Fault {
                        name: f.name(),
                        start,
                        end: rec.now(),
                    })
                });
                std::thread::sleep(Duration::from_secs(1));
            }
            round += 1;
        }
        let left = deadline.saturating_sub(rec.t0.elapsed());
        std::thread::sleep(left);
        Ok(())
    })();
    rec.stop.store(true, Ordering::SeqCst);
    for c in cities {
        c.join()
            .map_err(|_| anyhow::anyhow!("a city's clients panicked"))??;
    }
    fault_result?;

    // Every city converges on every store's last acknowledged version.
    let load_end = rec.now();
    let last: Vec<u64> = rec.with(|h| {
        (0..stores.len())
            .map(|s| {
                h.writes
                    .iter()
                    .filter(|w| w.store == s)
                    .map(|w| w.version)
                    .max()
                    .unwrap_or(0)
            })
            .collect()
    });
    heal_wait(&state, Duration::from_secs(40))?;
    wait_visible(&state, &stores, |s| last[s], Duration::from_secs(40))?;
    let converged_after = rec.now() - load_end;
    rec.stop_sampling.store(true, Ordering::SeqCst);
    sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the sampler panicked"))??;

    let committed = committed_orders(&state)?;
    let history = rec.with(std::mem::take);
    let report = super::check(&history, &committed);
    Ok(Outcome {
        report,
        converged_after,
        history,
    })
}

/// Runs `f` on a small runtime on the origin host.
fn on_core<T: Send + 'static>(
    state: &LabState,
    f: impl AsyncFnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    netlab::in_netns(&state.core_ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f())
    })?
}

/// One store per city (named for version 0), with one product.
fn make_stores(state: &LabState, platform: &str) -> Result<Vec<Store>> {
    let (origin, n, platform) = (
        state.origin_url.clone(),
        state.regions.len(),
        platform.to_owned(),
    );
    let c = state.origin_client()?;
    on_core(state, async move || {
        let mut stores = Vec::new();
        for i in 0..n {
            let slug = format!("hist{i}");
            let v: serde_json::Value = c
                .post(format!("{origin}/api/stores"))
                .json(&serde_json::json!({"name": marker(i, 0), "slug": slug, "currency": "EUR"}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let token = v["token"].as_str().context("store token")?.to_owned();
            let p: serde_json::Value = c
                .post(format!("{origin}/api/products"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"name": "History item", "price_cents": 500}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            stores.push(Store {
                host: format!("{slug}.{platform}"),
                token,
                product: p["product"]["id"].as_i64().context("product id")?,
            });
        }
        Ok(stores)
    })
}

/// Waits until every city sees at least version `want(store)` of every store.
fn wait_visible(
    state: &LabState,
    stores: &[Store],
    want: impl Fn(usize) -> u64,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for r in &state.regions {
        for (i, s) in stores.iter().enumerate() {
            let (url, host, need) = (format!("https://{}/", s.host), s.host.clone(), want(i));
            let client = state.shopper_client()?.build()?;
            let left = deadline.saturating_duration_since(Instant::now());
            netlab::in_netns(&r.city_ns, move || -> Result<()> {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(crate::eventually(left, &format!("{host} v{need}"), || {
                        let (url, client) = (url.clone(), client.clone());
                        async move {
                            let body = client
                                .get(url)
                                .timeout(Duration::from_secs(2))
                                .send()
                                .await
                                .ok()?
                                .text()
                                .await
                                .ok()?;
                            version_in(i, &body).filter(|v| *v >= need)
                        }
                    }))
                    .map(|_| ())
            })?
            .with_context(|| format!("city of {}", r.code))?;
        }
    }
    Ok(())
}

/// The clients of one shopper city until the load stops.
async fn city_clients(
    state: &LabState,
    rec: &Rec,
    stores: &[Store],
    city: usize,
    code: &str,
    readers: usize,
) -> Result<()> {
    // Over https, as browsers shop (the lab redirects plain HTTP): every
    // store name resolves to the anycast address.
    let http = state
        .shopper_client()?
        .timeout(Duration::from_secs(3))
        .pool_idle_timeout(Duration::from_secs(2))
        .build()?;
    let writer = seller(rec, &http, stores, city, code);
    let reading = futures_join(
        (0..readers)
            .map(|i| reader(rec, &http, stores, format!("{code}-reader{i}"), i))
            .collect(),
    );
    let shopper = shopper(rec, &http, stores, city, code);
    let (w, _, o) = tokio::join!(writer, reading, shopper);
    w?;
    o
}

/// A page read of `store`, recorded.
async fn read_page(
    rec: &Rec,
    http: &reqwest::Client,
    stores: &[Store],
    client: &str,
    store: usize,
    cookie: Option<(&str, u64)>,
) -> Option<u64> {
    let start = rec.now();
    let mut req = http.get(format!("https://{}/", stores[store].host));
    if let Some((c, _)) = cookie {
        req = req.header("cookie", format!("ef_lsn={c}"));
    }
    let (status, region, cache_status, version) = match req.send().await {
        Ok(r) => {
            let header = |n: &str| {
                r.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let (status, region, cache) = (
                r.status().as_u16(),
                header("x-edge-route"),
                header("cache-status"),
            );
            let body = r.text().await.unwrap_or_default();
            let v = (status == 200).then(|| version_in(store, &body)).flatten();
            (status, region, cache, v)
        }
        Err(_) => (0, String::new(), String::new(), None),
    };
    let end = rec.now();
    rec.with(|h| {
        h.reads.push(Read {
            client: client.to_owned(),
            store,
            start,
            end,
            status,
            region,
            cache_status,
            version,
            own: cookie.map(|(_, v)| v),
        })
    });
    version
}

/// Reads every store in turn.
async fn reader(rec: &Rec, http: &reqwest::Client, stores: &[Store], name: String, offset: usize) {
    let mut i = offset;
    while !rec.stop.load(Ordering::SeqCst) {
        read_page(rec, http, stores, &name, i % stores.len(), None).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// The city's seller: renames its store to the next version (retrying a
/// version until acknowledged), then reads it back twice with its cookie.
async fn seller(
    rec: &Rec,
    http: &reqwest::Client,
    stores: &[Store],
    store: usize,
    code: &str,
) -> Result<()> {
    let name = format!("{code}-seller");
    let s = &stores[store];
    let mut cookie: Option<String> = None;
    let mut version = 0;
    'load: while !rec.stop.load(Ordering::SeqCst) {
        version += 1;
        let mut retries = 0;
        loop {
            if rec.stop.load(Ordering::SeqCst) {
                break 'load;
            }
            let mut req = http
                .patch(format!("https://{}/api/store", s.host))
                .bearer_auth(&s.token)
                .json(&serde_json::json!({ "name": marker(store, version) }));
            if let Some(c) = &cookie {
                req = req.header("cookie", format!("ef_lsn={c}"));
            }
            let acked = match req.send().await {
                Ok(r) if r.status().is_success() => {
                    let lsn = r
                        .headers()
                        .get("x-commit-lsn")
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_lsn);
                    let set = r
                        .headers()
                        .get_all("set-cookie")
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .find_map(|v| v.strip_prefix("ef_lsn="))
                        .and_then(|v| v.split(';').next())
                        .map(str::to_owned);
                    let region = r
                        .headers()
                        .get("x-edge-route")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let lsn = lsn.context("an acknowledged write without x-commit-lsn")?;
                    cookie = Some(set.context("an acknowledged write without its ef_lsn cookie")?);
                    Some((lsn, region))
                }
                _ => None,
            };
            match acked {
                Some((lsn, region)) => {
                    rec.with(|h| {
                        h.writes.push(Write {
                            client: name.clone(),
                            store,
                            version,
                            lsn,
                            acked: rec.now(),
                            region,
                            retries,
                        })
                    });
                    break;
                }
                None => {
                    retries += 1;
                    rec.with(|h| h.write_failures += 1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        for _ in 0..2 {
            let c = cookie.as_deref().map(|c| (c, version));
            read_page(rec, http, stores, &name, store, c).await;
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    Ok(())
}

/// The city's shopper: orders under a fresh key, retried until acknowledged
/// (a browser resubmitting the form), then the next.
async fn shopper(
    rec: &Rec,
    http: &reqwest::Client,
    stores: &[Store],
    store: usize,
    code: &str,
) -> Result<()> {
    let name = format!("{code}-shopper");
    let s = &stores[store];
    let mut n = 0;
    while !rec.stop.load(Ordering::SeqCst) {
        n += 1;
        let key = format!("{name}-{n}");
        let mut order = Order {
            client: name.clone(),
            store,
            key: key.clone(),
            acked: None,
            attempts: 0,
        };
        // An order in doubt is retried a little past the end of the load.
        let give_up = Instant::now() + Duration::from_secs(60);
        while order.acked.is_none() && Instant::now() < give_up {
            order.attempts += 1;
            let r = http
                .post(format!("https://{}/orders", s.host))
                .header("accept", "application/json")
                .header("idempotency-key", &key)
                .json(&serde_json::json!({
                    "email": "history@example.com",
                    "items": [{ "product_id": s.product, "quantity": 1 }],
                }))
                .send()
                .await;
            if let Ok(r) = r
                && r.status().is_success()
            {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                order.acked = v["order"]["id"].as_i64();
                if order.acked.is_none() {
                    bail!("an acknowledged order without its id: {v}");
                }
            } else {
                if rec.stop.load(Ordering::SeqCst) && order.attempts > 50 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        rec.with(|h| h.orders.push(order));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    Ok(())
}

/// A Prometheus value of `name` in `text`.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Scrapes every edge's applied position every 50 ms, from the origin host.
fn sample_loop(state: &LabState, rec: &Arc<Rec>) -> Result<()> {
    let targets: Vec<(String, String)> = state
        .regions
        .iter()
        .map(|r| (r.code.clone(), format!("{}/metrics", r.edge_admin_url)))
        .collect();
    let rec = rec.clone();
    on_core(state, async move || {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(400))
            .build()?;
        while !rec.stop_sampling.load(Ordering::SeqCst) {
            let scrapes = targets.iter().map(|(code, url)| {
                let (http, rec) = (&http, &rec);
                async move {
                    let sent = rec.now();
                    let text = http.get(url).send().await.ok()?.text().await.ok()?;
                    Some(Sample {
                        region: code.clone(),
                        sent,
                        received: rec.now(),
                        applied_lsn: metric(&text, "edgefront_changelog_applied_lsn")? as u64,
                        started: metric(&text, "edgefront_start_time_seconds")?,
                    })
                }
            });
            let mut got = Vec::new();
            for s in futures_join(scrapes.collect()).await {
                got.extend(s);
            }
            rec.with(|h| h.samples.extend(got));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    })
}

/// Runs the futures concurrently; their outputs in order.
async fn futures_join<T>(futs: Vec<impl std::future::Future<Output = T>>) -> Vec<T> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none()
                && let std::task::Poll::Ready(v) = f.as_mut().poll(cx)
            {
                out[i] = Some(v);
            }
        }
        if out.iter().all(Option::is_some) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// The value following `flag` in a service's command line (`-D` data dir, `-l` log).
fn flag_value<'a>(svc: &'a lab::Service, flag: &str) -> Option<&'a str> {
    svc.argv
        .iter()
        .position(|a| a == flag)
        .and_then(|i| svc.argv.get(i + 1))
        .map(String::as_str)
}

fn service<'a>(state: &'a LabState, name: &str) -> Result<&'a lab::Service> {
    state
        .services
        .iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no {name} service in the lab"))
}

/// SIGKILLs every process named `comm` in `netns`; their pids.
fn kill_named(netns: &str, comm: &str) -> Vec<i32> {
    lab::pids(netns)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .filter(|pid| {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        })
        .collect()
}

/// Waits until every process of `pids` is dead (gone, or a zombie its parent
/// has not reaped yet).
fn gone(pids: &[i32], what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pids.iter().all(|p| edgefront_ctl::drill::dead(*p)) {
        if Instant::now() > deadline {
            bail!("{what}: killed processes {pids:?} still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `SELECT <call>` on a region's replica.
fn on_replica(state: &LabState, code: &str, call: &str) -> Result<()> {
    let r = state.region(code)?;
    let out = Command::new("ip")
        .args(["netns", "exec", &r.node_ns])
        .arg(format!("{}/psql", crate::PG_BIN))
        .args(["-h", &r.node_ip.to_string(), "-U", "edgefront", "-d"])
        .args(["edgefront", "-XAtc", &format!("SELECT {call}")])
        .output()?;
    if !out.status.success() {
        bail!("{call} on {code}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn edge_ctl(state: &LabState, args: &[&str]) -> Result<()> {
    let (code, _, err) = crate::netlab::edge_ctl(&state.prefix, args)?;
    if code != 0 {
        bail!("edge-ctl {}: {err}", args.join(" "));
    }
    Ok(())
}

/// Injects `fault`, holds it, heals it.
fn inject(state: &LabState, fault: &FaultKind, hold: Duration) -> Result<()> {
    match fault {
        FaultKind::ReplicaStop(code) => {
            let svc = service(state, &format!("replica-{code}"))?;
            edgefront_ctl::drill::stop_replica(state, code)?;
            std::thread::sleep(hold);
            svc.start()?;
        }
        FaultKind::ReplayPause(code) => {
            on_replica(state, code, "pg_wal_replay_pause()")?;
            std::thread::sleep(hold);
            on_replica(state, code, "pg_wal_replay_resume()")?;
        }
        FaultKind::Drain(code) => {
            // Not `drain` to idle: connections whose client moved away with
            // the route stay ESTABLISHED on the withdrawn node until the
            // hook's idle timeout (60 s); withdrawn is what moves shoppers.
            edge_ctl(state, &["drain", "--no-wait", code])?;
            wait_announced(state, code, false, Duration::from_secs(20))?;
            std::thread::sleep(hold);
            edge_ctl(state, &["undrain", code])?;
        }
        FaultKind::Kill(code) => {
            edgefront_ctl::drill::kill_region(state, code)?;
            std::thread::sleep(hold);
            edgefront_ctl::drill::restore_region(state, code)?;
        }
        FaultKind::OriginRestart => {
            let pids = kill_named(&state.core_ns, "origin");
            if pids.is_empty() {
                bail!("no origin process to kill");
            }
            gone(&pids, "origin")?;
            if let Some(mut child) = service(state, "origin")?.start()? {
                // Ours now: reap it when a later round kills it.
                std::thread::spawn(move || child.wait());
            }
        }
        FaultKind::PrimaryKill => {
            let pids = kill_named(&state.core_ns, "postgres");
            if pids.is_empty() {
                bail!("no primary process to kill");
            }
            gone(&pids, "primary")?;
            std::thread::sleep(hold / 3);
            let svc = service(state, "primary")?;
            // The killed postmaster's lock file (PostgreSQL refuses to start
            // while its pid exists, and a zombie's does until reaped).
            let data = flag_value(svc, "-D").context("primary data dir")?;
            edgefront_ctl::drill::clear_stale_pidfile(std::path::Path::new(data))?;
            svc.start().with_context(|| {
                // pg_ctl's own log of the server (`-l`), for why it did not start.
                let log = flag_value(svc, "-l")
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                format!(
                    "restarting the primary; its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })?;
        }
    }
    Ok(())
}

/// Waits until `code`'s hook reports the route `announced` (or withdrawn).
fn wait_announced(state: &LabState, code: &str, announced: bool, timeout: Duration) -> Result<()> {
    let (c, url, code) = (
        state.admin_client()?,
        state.region(code)?.health_url.clone(),
        code.to_owned(),
    );
    on_core(state, async move || {
        crate::eventually(
            timeout,
            &format!("{code} announced={announced}"),
            || async {
                c.status(&url)
                    .await
                    .ok()
                    .filter(|s| s.announced == announced)
            },
        )
        .await
        .map(|_| ())
    })
}

/// Waits until every region is announced and the origin answers again.
fn heal_wait(state: &LabState, timeout: Duration) -> Result<()> {
    let (c, hooks, origin) = (
        state.admin_client()?,
        state
            .regions
            .iter()
            .map(|r| (r.code.clone(), r.health_url.clone()))
            .collect::<Vec<_>>(),
        state.origin_url.clone(),
    );
    let http = state.origin_client()?;
    on_core(state, async move || {
        for (code, url) in &hooks {
            crate::eventually(timeout, &format!("{code} announced"), || async {
                c.status(url).await.ok().filter(|s| s.announced)
            })
            .await?;
        }
        crate::eventually(timeout, "the origin", || async {
            http.get(format!("{origin}/healthz"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
        })
        .await?;
        Ok(())
    })
}

/// The orders the primary holds: idempotency key → order ids.
fn committed_orders(state: &LabState) -> Result<super::Committed> {
    let out = Command::new("ip")
        .args(["netns", "exec", &state.core_ns])
        .arg(format!("{}/psql", crate::PG_BIN))
        .args(["-h", &netlab::CORE_IP.to_string(), "-U", "edgefront", "-d"])
        .args([
            "edgefront",
            "-XAtc",
            "SELECT idempotency_key, id FROM orders WHERE idempotency_key LIKE '%-shopper-%' ORDER BY id",
        ])
        .output()?;
    if !out.status.success() {
        bail!("reading orders: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut m = super::Committed::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((key, id)) = line.rsplit_once('|') {
            m.entry(key.to_owned())
                .or_default()
                .push(id.trim().parse().context("order id")?);
        }
    }
    Ok(m)
}
