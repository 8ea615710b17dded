//! `edge-ctl drill origin`: the origin failover drill (the lab's Patroni
//! cluster; not with `--single-primary`). Every city loads pages and places orders through
//! the anycast address; then the database leader's host goes away — a power
//! pull (`--mode kill`: its network goes silent, its processes are
//! SIGKILLed) or a planned switchover (`--mode switchover`, Patroni's REST
//! API) — and comes back; the report says what shoppers saw.
//!
//! A checkout is `POST /orders` with an `Idempotency-Key`: a shopper whose
//! attempt fails (an error, a timeout, a 5xx or 429) tries again with the
//! same key, as a well-behaved checkout page's retry does, until the drill's
//! grace ends: after the `Retry-After` the answer gave (the edge and the
//! origin say 2 s on a 503), otherwise after a backoff that doubles from
//! 250 ms up to 4 s, each wait with up to +50 % random jitter
//! ([`retry_wait`]). A fixed 250 ms retry from every waiting shopper made a
//! storm that kept the new leader's origin overloaded for minutes after a
//! 36 s failover (CI, 2026-12-07: 141 643 failed attempts, 1 661 checkouts
//! never acknowledged).
//! Every acknowledged order is checked at the end by replaying its key: the
//! origin answers the same order (`200`, replayed) if the database has it,
//! and a new one (`201`) if the acknowledged order was lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::database::{self, Cluster};
use crate::lab::{LabHost, LabState, Supervisor, enter_netns, internal_ca_path, kill_named};

/// What happens to the leader's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Its network goes silent and its processes are SIGKILLed (a power
    /// pull); after `during`, it is powered on again and rejoins.
    Kill,
    /// Patroni hands the leadership to the synchronous standby.
    Switchover,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub event: Event,
    /// Page loads per second from each city.
    pub rate: f64,
    /// Checkouts started per second from each city.
    pub checkouts: f64,
    pub before: Duration,
    /// From the event to the restore (kill) or to the end of the load.
    pub during: Duration,
    pub after: Duration,
    /// Cities by region code (all when empty).
    pub cities: Vec<String>,
    pub request_timeout: Duration,
}

/// What the drill saw.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub event: Event,
    pub cities: usize,
    pub old_leader: String,
    pub new_leader: Option<String>,
    pub pages: usize,
    pub pages_failed: usize,
    pub page_errors: Vec<String>,
    /// Checkouts started, acknowledged, and never acknowledged (given up).
    pub checkouts: usize,
    pub acknowledged: usize,
    pub checkouts_failed: usize,
    /// Acknowledged after more than one attempt, and the failed attempts.
    pub checkouts_retried: usize,
    pub attempts_failed: usize,
    pub attempt_errors: Vec<String>,
    /// Write unavailability: the longest time, from the event to the end
    /// of the load, in which no new order was acknowledged anywhere.
    pub write_unavailable_ms: Option<f64>,
    /// From the event until another member led, promoted (a new timeline).
    pub new_leader_ms: Option<f64>,
    /// From the event until each region's replica streamed on the new
    /// leader's timeline.
    pub regions_follow_ms: BTreeMap<String, Option<f64>>,
    /// Until the old leader replicated from the new one: from its power-on
    /// (kill), from the event (switchover).
    pub old_leader_rejoined_ms: Option<f64>,
    /// Acknowledged orders replayed at the end, and those the database no
    /// longer had (target: none).
    pub orders_checked: usize,
    pub orders_lost: Vec<i64>,
    /// Replays that got no answer (the check could not be made for them).
    pub orders_unverified: Vec<String>,
    /// Cities whose shoppers could not run (their load is missing).
    pub city_errors: Vec<String>,
}

/// One checkout: its key, the attempts, and the acknowledgement.
#[derive(Debug, Clone)]
struct Checkout {
    key: String,
    attempts: usize,
    /// The order id, when the acknowledgement came (since t0), and whether
    /// it was a new order (`201`; `200` is a replay of an earlier attempt).
    acked: Option<(i64, Duration, bool)>,
}

#[derive(Default)]
struct Seen {
    pages: usize,
    pages_failed: usize,
    page_errors: Vec<String>,
    checkouts: Vec<Checkout>,
    attempts_failed: usize,
    attempt_errors: Vec<String>,
    city_errors: Vec<String>,
}

fn note(list: &mut Vec<String>, e: String) {
    if list.len() < 10 {
        list.push(e);
    }
}

/// The drill's store: made through the anycast address (as a seller
/// would), with one product to order.
struct Store {
    host: String,
    product: i64,
}

async fn make_store(state: &LabState) -> Result<Store> {
    let http = state
        .shopper_client()?
        .timeout(Duration::from_secs(10))
        .build()?;
    let slug = format!(
        "drill-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    );
    let any = state.anycast;
    let r = http
        .post(format!("http://{any}/api/stores"))
        .json(&serde_json::json!({ "name": "Origin drill", "slug": slug, "currency": "EUR" }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("creating the drill's store answered {}", r.status());
    }
    let v: serde_json::Value = r.json().await?;
    let token = v["token"].as_str().context("store token")?.to_owned();
    let host = v["url"]
        .as_str()
        .and_then(|u| reqwest::Url::parse(u).ok())
        .and_then(|u| u.host_str().map(str::to_owned))
        .context("store url")?;
    let r = http
        .post(format!("http://{any}/api/products"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "name": "Drill tea", "slug": "drill-tea", "price_cents": 500 }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("creating the drill's product answered {}", r.status());
    }
    let v: serde_json::Value = r.json().await?;
    let product = v["product"]["id"].as_i64().context("product id")?;
    Ok(Store { host, product })
}

fn order_body(product: i64) -> serde_json::Value {
    serde_json::json!({ "email": "drill@example.com", "items": [{ "product_id": product, "quantity": 1 }] })
}

/// One attempt: the order id when acknowledged (`201` new, `200` replayed).
/// Why an attempt failed, and the `Retry-After` its answer carried.
struct Refused {
    why: String,
    retry_after: Option<Duration>,
}

impl From<String> for Refused {
    fn from(why: String) -> Self {
        Refused {
            why,
            retry_after: None,
        }
    }
}

async fn place(http: &reqwest::Client, store: &Store, key: &str) -> Result<(i64, bool), Refused> {
    let r = http
        .post(format!("https://{}/orders", store.host))
        .header("idempotency-key", key)
        .json(&order_body(store.product))
        .send()
        .await
        .map_err(|e| format!("{e}"))?;
    let status = r.status();
    if !status.is_success() {
        // Seconds only (the edge and the origin send no dates); bounded.
        let retry_after = r
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(30)));
        return Err(Refused {
            why: format!("{status}"),
            retry_after,
        });
    }
    let v: serde_json::Value = r.json().await.map_err(|e| format!("{e}"))?;
    let id = v["order"]["id"]
        .as_i64()
        .ok_or_else(|| "no order id".to_string())?;
    Ok((id, status == reqwest::StatusCode::OK))
}

/// How long a shopper waits before attempt `attempts + 1`: the server's
/// `Retry-After` if it gave one, else 250 ms doubled per failed attempt up
/// to 4 s; plus up to 50 % random jitter, so shoppers refused together do
/// not come back together.
fn retry_wait(attempts: usize, retry_after: Option<Duration>) -> Duration {
    let doublings = attempts.saturating_sub(1).min(4) as u32;
    let base = retry_after.unwrap_or_else(|| Duration::from_millis(250) * 2u32.pow(doublings));
    base.mul_f64(1.0 + rand::random::<f64>() / 2.0)
}

/// Shoppers of one city until `stop`: pages at `rate`, checkouts at
/// `checkouts`, each checkout retried with its key until `give_up`.
/// One city's shoppers: where they are and what they share.
struct CityLoad {
    state: LabState,
    netns: String,
    code: String,
    store: Arc<Store>,
    o: Options,
    t0: Instant,
    stop: Arc<AtomicBool>,
    give_up: Instant,
    seen: Arc<Mutex<Seen>>,
}

fn city_load(l: CityLoad) -> Result<()> {
    let CityLoad {
        state,
        netns,
        code,
        store,
        o,
        t0,
        stop,
        give_up,
        seen,
    } = l;
    enter_netns(&netns)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let http = state.shopper_client()?.timeout(o.request_timeout).build()?;
        let mut tasks = tokio::task::JoinSet::new();
        let mut pages = tokio::time::interval(Duration::from_secs_f64(1.0 / o.rate));
        let mut buys = tokio::time::interval(Duration::from_secs_f64(1.0 / o.checkouts));
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tokio::select! {
                _ = pages.tick() => {
                    let (http, host, seen) = (http.clone(), state.demo_host.clone(), seen.clone());
                    tasks.spawn(async move {
                        let r = http.get(format!("https://{host}/")).send().await;
                        let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                        s.pages += 1;
                        match r {
                            Ok(r) if r.status().is_success() => {}
                            Ok(r) => { s.pages_failed += 1; note(&mut s.page_errors, format!("{}", r.status())); }
                            Err(e) => { s.pages_failed += 1; note(&mut s.page_errors, format!("{e}")); }
                        }
                    });
                }
                _ = buys.tick() => {
                    n += 1;
                    // Keys are per store, and the store is the drill's own.
                    let key = format!("{code}-{n}");
                    let (http, store, seen) = (http.clone(), store.clone(), seen.clone());
                    tasks.spawn(async move {
                        let mut c = Checkout { key, attempts: 0, acked: None };
                        loop {
                            let started = t0.elapsed();
                            c.attempts += 1;
                            match place(&http, &store, &c.key).await {
                                Ok((id, replayed)) => { c.acked = Some((id, t0.elapsed(), !replayed)); break; }
                                Err(e) => {
                                    {
                                        let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                                        s.attempts_failed += 1;
                                        note(&mut s.attempt_errors, format!("+{:.1}s {}", started.as_secs_f64(), e.why));
                                    }
                                    if Instant::now() >= give_up {
                                        break;
                                    }
                                    // Never past the drill's grace.
                                    let left = give_up.saturating_duration_since(Instant::now());
                                    tokio::time::sleep(retry_wait(c.attempts, e.retry_after).min(left)).await;
                                }
                            }
                        }
                        seen.lock().unwrap_or_else(|p| p.into_inner()).checkouts.push(c);
                    });
                }
            }
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
        anyhow::Ok(())
    })
}

/// The host (and its member) that leads now.
fn leader_host<'a>(state: &'a LabState, c: &Cluster) -> Result<&'a LabHost> {
    let leader = c.leader().context("no member leads")?;
    state
        .database
        .as_ref()
        .context("not a lab with origin failover")?
        .hosts
        .iter()
        .find(|h| h.member == leader.name)
        .with_context(|| format!("the leader {} is not an origin host", leader.name))
}

/// Silences a host's network (nftables drops everything in and out of its
/// namespace) or lets it speak again.
fn silence(netns: &str, on: bool) -> Result<()> {
    let table = "edgefront_drill";
    let script = if on {
        format!(
            "table inet {table} {{\n chain input {{ type filter hook input priority -300; policy drop; }}\n chain output {{ type filter hook output priority -300; policy drop; }}\n}}\n"
        )
    } else {
        format!("delete table inet {table}\n")
    };
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("nft (run tests/scripts/setup.sh)")?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("nft stdin")?,
        script.as_bytes(),
    )?;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft in {netns}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// What the watcher saw of the cluster.
struct Observed {
    new_leader: Option<String>,
    /// Since the event.
    new_leader_at: Option<Duration>,
    follow: BTreeMap<String, Option<f64>>,
    rejoined: Option<f64>,
    /// The event, since the drill began.
    event: Duration,
}

/// Whether `m` replicates from leader `l`: running (Patroni 3.0; later
/// versions say streaming) on the leader's timeline, with a known lag.
fn following(m: &database::Member, l: &database::Member) -> bool {
    m.name != l.name
        && (m.state == "streaming" || m.state == "running")
        && m.timeline.is_some()
        && m.timeline == l.timeline
        && m.lag.as_ref().is_some_and(serde_json::Value::is_number)
}

/// The processes of an origin host that a power pull kills (by `comm`).
/// The lab's ACME CA and DNS server share `core`'s namespace but stand for
/// other machines: they go silent with it and are not killed.
const HOST_PROCESSES: &[&str] = &["patroni", "postgres", "origin", "etcd"];

/// The lab services of a killed host, to start again (its etcd member,
/// Patroni and origin).
fn host_services<'a>(state: &'a LabState, host: &LabHost) -> Vec<&'a crate::lab::Service> {
    state
        .services
        .iter()
        .filter(|s| {
            s.netns == host.netns
                && s.daemon
                && ["etcd-", "patroni-", "origin"]
                    .iter()
                    .any(|p| s.name.starts_with(p))
        })
        .collect()
}

/// Powers a killed host on again when dropped unless disarmed: a drill
/// that fails or is interrupted half-way leaves no host silent.
struct PowerOn<'a> {
    state: &'a LabState,
    host: &'a LabHost,
    armed: bool,
    /// The daemons started at power-on, started again when they fail as a
    /// machine's systemd does (`Restart=on-failure`, Debian's unit for
    /// Patroni): Patroni 3.0 exits at start when its own host's etcd, just
    /// started and not yet back in its cluster, does not answer
    /// `/version` within a second, and the old leader never rejoined.
    daemons: Supervisor,
}

impl PowerOn<'_> {
    /// Lets the host's network speak and starts its services (etcd first:
    /// they were made in that order); returns the errors (each service is
    /// tried).
    fn now(&mut self) -> Vec<String> {
        self.armed = false;
        let mut errors = Vec::new();
        if let Err(e) = silence(&self.host.netns, false) {
            errors.push(format!("{e:#}"));
        }
        for s in host_services(self.state, self.host) {
            if let Err(e) = self.daemons.start(s) {
                errors.push(format!("{}: {e:#}", s.name));
            }
        }
        errors
    }
}

impl Drop for PowerOn<'_> {
    fn drop(&mut self) {
        if self.armed {
            for e in self.now() {
                eprintln!("drill origin: powering {} on: {e}", self.host.name);
            }
        }
    }
}

/// Runs the drill; call it from a thread of its own (it enters a city's
/// namespace to watch, since the leader's host may be where `edge-ctl` runs).
pub fn run(state: &LabState, o: &Options, say: &(dyn Fn(String) + Sync)) -> Result<Report> {
    let db = state.database.clone().context(
        "this lab runs one primary (`edgefront-lab --single-primary`): start it without that flag",
    )?;
    let ca = internal_ca_path(&state.prefix);
    let cities: Vec<(String, String)> = state
        .regions
        .iter()
        .filter(|r| o.cities.is_empty() || o.cities.contains(&r.code))
        .map(|r| (r.code.clone(), r.city_ns.clone()))
        .collect();
    let watch_ns = cities.first().context("no cities")?.1.clone();
    enter_netns(&watch_ns)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Futures made outside `block_on` (reqwest starts a request's timeout
    // when it is made) find this runtime.
    let _in_rt = rt.enter();
    let before = rt.block_on(database::read(&db.patroni_apis, Some(&ca)))?;
    let old = leader_host(state, &before)?.clone();
    // Asked in this order: the old leader's API last (a silent host costs
    // each read its timeout).
    let mut apis = db.patroni_apis.clone();
    apis.sort_by_key(|a| *a == old.patroni_api);
    let read = |rt: &tokio::runtime::Runtime| rt.block_on(database::read(&apis, Some(&ca)));
    // A new leader counts once promoted: on a timeline after this one.
    let old_timeline = before.leader().and_then(|l| l.timeline).unwrap_or(0);
    let standby = before
        .sync_standby()
        .context("no synchronous standby: a failover now could lose writes")?
        .name
        .clone();
    let store = Arc::new(rt.block_on(make_store(state))?);
    say(format!(
        "drill origin ({:?}): leader {} on {} ({}), synchronous standby {standby}; {} pages/s and {} checkouts/s from each of {} cities; {:.0}s before",
        o.event,
        old.member,
        old.ip,
        old.region,
        o.rate,
        o.checkouts,
        cities.len(),
        o.before.as_secs_f64()
    ));
    let t0 = Instant::now();
    // The watch runs at least 60 s after the event and the old leader's
    // rejoin up to 120 s: checkouts keep trying past the drill's worst end.
    let total =
        o.before + o.during.max(Duration::from_secs(60)) + Duration::from_secs(120) + o.after;
    let give_up = t0 + total + Duration::from_secs(30);
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut threads = Vec::new();
    for (code, ns) in &cities {
        let load = CityLoad {
            state: state.clone(),
            netns: ns.clone(),
            code: code.clone(),
            store: store.clone(),
            o: o.clone(),
            t0,
            stop: stop.clone(),
            give_up,
            seen: seen.clone(),
        };
        let (code, seen) = (code.clone(), seen.clone());
        threads.push(std::thread::spawn(move || {
            if let Err(e) = city_load(load) {
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .city_errors
                    .push(format!("{code}: {e:#}"));
            }
        }));
    }
    let mut power = PowerOn {
        state,
        host: &old,
        armed: false,
        daemons: Supervisor::default(),
    };
    let outcome = (|| -> Result<Observed> {
        std::thread::sleep(o.before);
        let event = t0.elapsed();
        match o.event {
            Event::Kill => {
                power.armed = true;
                silence(&old.netns, true)?;
                let n = kill_named(&old.netns, HOST_PROCESSES);
                say(format!(
                    "+{:.2}s {} powered off ({n} processes killed, its network silent)",
                    event.as_secs_f64(),
                    old.name
                ));
            }
            Event::Switchover => {
                let http = state.origin_client()?;
                say(format!(
                    "+{:.2}s switchover {} → {standby} asked",
                    event.as_secs_f64(),
                    old.member
                ));
                let r = rt.block_on(
                    http.post(format!("{}/switchover", old.patroni_api))
                        .basic_auth(&db.patroni_user, Some(&db.patroni_password))
                        .json(&serde_json::json!({ "leader": old.member, "candidate": standby }))
                        .send(),
                )?;
                let status = r.status();
                let text = rt.block_on(r.text()).unwrap_or_default();
                if !status.is_success() {
                    bail!("switchover refused: {status} {text}");
                }
            }
        }
        // Watch the cluster until every region follows the new leader.
        let mut new_leader = None;
        let mut new_leader_at = None;
        let mut follow: BTreeMap<String, Option<f64>> = state
            .regions
            .iter()
            .map(|r| (r.code.clone(), None))
            .collect();
        let watch_until = t0 + o.before + o.during.max(Duration::from_secs(60));
        while Instant::now() < watch_until {
            if let Ok(c) = read(&rt)
                && let Some(l) = c
                    .leader()
                    .filter(|l| l.name != old.member && l.timeline > Some(old_timeline))
            {
                if new_leader.is_none() {
                    new_leader = Some(l.name.clone());
                    new_leader_at = Some(t0.elapsed() - event);
                    say(format!(
                        "+{:.2}s {} leads (timeline {:?})",
                        t0.elapsed().as_secs_f64(),
                        l.name,
                        l.timeline
                    ));
                }
                for m in &c.members {
                    let Some(code) = m.name.strip_prefix("replica-") else {
                        continue;
                    };
                    if let Some(slot) = follow.get_mut(code)
                        && slot.is_none()
                        && following(m, l)
                    {
                        *slot = Some((t0.elapsed() - event).as_secs_f64() * 1e3);
                    }
                }
                if follow.values().all(Option::is_some) && t0.elapsed() >= o.before + o.during {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        say(format!(
            "+{:.2}s regions following the new leader: {}/{}",
            t0.elapsed().as_secs_f64(),
            follow.values().filter(|v| v.is_some()).count(),
            follow.len()
        ));
        // The old leader rejoins as a replica of the new one: after a
        // switchover by itself; after a kill once powered on again (its
        // network speaks, its services restart; Patroni uses pg_rewind).
        let restore = match o.event {
            Event::Switchover => event,
            Event::Kill => {
                let at = t0.elapsed();
                let errors = power.now();
                if !errors.is_empty() {
                    bail!("powering {} on: {}", old.name, errors.join("; "));
                }
                say(format!(
                    "+{:.2}s {} powered on again",
                    at.as_secs_f64(),
                    old.name
                ));
                at
            }
        };
        let mut rejoined = None;
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            for s in power.daemons.check() {
                say(format!("+{:.2}s {s}", t0.elapsed().as_secs_f64()));
            }
            if let Ok(c) = read(&rt)
                && let Some(l) = c.leader()
                && c.members
                    .iter()
                    .any(|m| m.name == old.member && following(m, l))
            {
                rejoined = Some((t0.elapsed() - restore).as_secs_f64() * 1e3);
                say(format!(
                    "+{:.2}s {} replicates from {}",
                    t0.elapsed().as_secs_f64(),
                    old.member,
                    l.name
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        // The host's daemons stay watched until the load ends.
        let end = Instant::now() + o.after;
        while Instant::now() < end {
            for s in power.daemons.check() {
                say(format!("+{:.2}s {s}", t0.elapsed().as_secs_f64()));
            }
            std::thread::sleep(
                Duration::from_millis(250).min(end.saturating_duration_since(Instant::now())),
            );
        }
        Ok(Observed {
            new_leader,
            new_leader_at,
            follow,
            rejoined,
            event,
        })
    })();
    let load_end = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let Observed {
        new_leader,
        new_leader_at,
        follow,
        rejoined,
        event,
    } = outcome?;
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(|p| p.into_inner()));
    // Every acknowledged order, replayed with its key.
    let acked: Vec<(String, i64)> = seen
        .checkouts
        .iter()
        .filter_map(|c| c.acked.map(|(id, _, _)| (c.key.clone(), id)))
        .collect();
    let (lost, unverified, checked) = rt.block_on(async {
        let http = state
            .shopper_client()?
            .timeout(Duration::from_secs(10))
            .build()?;
        let (mut lost, mut unverified, mut checked) = (Vec::new(), Vec::new(), 0);
        for (key, id) in &acked {
            // A replay that fails is tried again for a while: the origin may
            // still be moving.
            let mut answer = place(&http, &store, key).await;
            let deadline = Instant::now() + Duration::from_secs(30);
            while answer.is_err() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(500)).await;
                answer = place(&http, &store, key).await;
            }
            if answer.is_ok() {
                checked += 1;
            }
            match answer {
                Ok((again, true)) if again == *id => {}
                Ok(_) => lost.push(*id),
                Err(e) => {
                    note(&mut unverified, format!("order {id}: {}", e.why));
                    if unverified.len() >= 10 {
                        break;
                    }
                }
            }
        }
        anyhow::Ok((lost, unverified, checked))
    })?;
    // The longest time from the event to the end of the load with no new
    // order acknowledged anywhere (a replay may come from a standby's
    // origin reading an order, so it does not count as a write).
    let mut acks: Vec<Duration> = seen
        .checkouts
        .iter()
        .filter_map(|c| c.acked.filter(|(_, _, fresh)| *fresh).map(|(_, at, _)| at))
        .filter(|at| *at >= event && *at <= load_end)
        .collect();
    acks.sort();
    acks.push(load_end);
    let write_unavailable_ms = acks
        .iter()
        .scan(event, |prev, at| {
            let gap = at.saturating_sub(*prev);
            *prev = *at;
            Some(gap)
        })
        .max()
        .map(|gap| gap.as_secs_f64() * 1e3);
    Ok(Report {
        event: o.event,
        cities: cities.len(),
        old_leader: old.member.clone(),
        new_leader,
        pages: seen.pages,
        pages_failed: seen.pages_failed,
        page_errors: seen.page_errors,
        checkouts: seen.checkouts.len(),
        acknowledged: acked.len(),
        checkouts_failed: seen.checkouts.iter().filter(|c| c.acked.is_none()).count(),
        checkouts_retried: seen
            .checkouts
            .iter()
            .filter(|c| c.acked.is_some() && c.attempts > 1)
            .count(),
        attempts_failed: seen.attempts_failed,
        attempt_errors: seen.attempt_errors,
        write_unavailable_ms,
        new_leader_ms: new_leader_at.map(|d| d.as_secs_f64() * 1e3),
        regions_follow_ms: follow,
        old_leader_rejoined_ms: rejoined,
        orders_checked: checked,
        city_errors: seen.city_errors,
        orders_lost: lost,
        orders_unverified: unverified,
    })
}

/// The report as text.
pub fn render(r: &Report) -> String {
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{:.1} s", v / 1e3));
    let mut out = format!(
        "\nOrigin drill ({:?}) from {} cities: leader {} → {}\n",
        r.event,
        r.cities,
        r.old_leader,
        r.new_leader.as_deref().unwrap_or("(none)")
    );
    out += &format!(
        "  pages: {} requests, {} failed\n  checkouts: {} started, {} acknowledged, {} never acknowledged, {} acknowledged after a retry ({} failed attempts)\n",
        r.pages,
        r.pages_failed,
        r.checkouts,
        r.acknowledged,
        r.checkouts_failed,
        r.checkouts_retried,
        r.attempts_failed
    );
    out += &format!(
        "  write unavailability: {}; new leader after {}; old leader rejoined after {}\n",
        ms(r.write_unavailable_ms),
        ms(r.new_leader_ms),
        ms(r.old_leader_rejoined_ms)
    );
    out += &format!(
        "  acknowledged orders lost: {} of {} replayed\n  regions following the new leader:",
        r.orders_lost.len(),
        r.orders_checked
    );
    for (code, t) in &r.regions_follow_ms {
        out += &format!(" {code} {}", ms(*t));
    }
    out.push('\n');
    for e in &r.city_errors {
        out += &format!("  CITY FAILED: {e}\n");
    }
    for e in &r.orders_unverified {
        out += &format!("  NOT VERIFIED: {e}\n");
    }
    for e in r.page_errors.iter().chain(&r.attempt_errors) {
        out += &format!("  e.g. {e}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_waits_for_retry_after_or_backs_off_with_jitter() {
        for _ in 0..200 {
            // No Retry-After: 250 ms, 500 ms, 1 s, 2 s, then 4 s at most.
            for (attempts, base) in [
                (1, 250),
                (2, 500),
                (3, 1000),
                (4, 2000),
                (5, 4000),
                (50, 4000),
            ] {
                let w = retry_wait(attempts, None);
                let base = Duration::from_millis(base);
                assert!(w >= base && w <= base.mul_f64(1.5), "{attempts}: {w:?}");
            }
            // The server's Retry-After wins over the backoff, jitter added.
            let w = retry_wait(1, Some(Duration::from_secs(2)));
            assert!(
                w >= Duration::from_secs(2) && w <= Duration::from_secs(3),
                "{w:?}"
            );
        }
        // Jitter: shoppers refused together do not all come back together.
        let waits: std::collections::BTreeSet<_> =
            (0..20).map(|_| retry_wait(3, None).as_micros()).collect();
        assert!(waits.len() > 10, "{waits:?}");
    }
}
