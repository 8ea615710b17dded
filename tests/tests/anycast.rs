//! The anycast lab end to end, as root: nine regions in network namespaces
//! with BIRD, BFD, delayed backbone links, replicas, edges and health hooks.
//! One lab (unique prefix) serves every scenario in order; it is removed at
//! the end, also when a scenario fails.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edgefront_ctl::lab::{self, LabState};
use edgefront_tests::netlab::{LabGuard, edge_ctl};
use edgefront_tests::{bin_dir, netlab};

fn drill_args<'a>(
    region: &'a str,
    mode: &'a str,
    cities: &'a str,
    during: &'a str,
) -> Vec<&'a str> {
    vec![
        "--json", "drill", region, "--mode", mode, "--cities", cities, "--rate", "20", "--before",
        "2", "--during", during, "--after", "3",
    ]
}

fn parse_drill(code: i32, out: &str, err: &str, mode: &str) -> Result<serde_json::Value> {
    // Exit 1 only means some request failed; the report says which.
    if code != 0 && code != 1 {
        bail!("drill {mode} exited {code}: {err}");
    }
    serde_json::from_str(out).with_context(|| format!("drill report: {out}\n{err}"))
}

/// The page's DOM once it shows state (a loaded machine can be slow to
/// start a browser: up to three tries).
fn page_dom(url: &str) -> Result<String> {
    let mut dom = String::new();
    for _ in 0..3 {
        dom = chromium(url, &["--dump-dom"])?;
        if dom.contains("data-region=") {
            return Ok(dom);
        }
    }
    bail!("the page never showed its state: {dom}")
}

/// The page's DOM once it shows every one of `needles`: the dashboard
/// samples the regions every 0.5 s, so a page loaded just after a change
/// (the route already moved) may still show the sample before it; it is
/// loaded again, a bounded number of times.
fn page_dom_showing(url: &str, needles: &[&str]) -> Result<String> {
    let mut dom = String::new();
    for _ in 0..5 {
        dom = page_dom(url)?;
        if needles.iter().all(|n| dom.contains(n)) {
            return Ok(dom);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("the page never showed {needles:?}: {dom}")
}

/// Headless Chromium (Debian `chromium`) with the flags this machine needs.
fn chromium(url: &str, mode: &[&str]) -> Result<String> {
    let profile = tempfile::tempdir()?;
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,800",
            // Let the page fetch its state and take server-sent events.
            "--timeout=6000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(mode)
        .arg(url)
        .output()
        .context("chromium (Debian package chromium)")?;
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn city<'a>(report: &'a serde_json::Value, code: &str) -> &'a serde_json::Value {
    report["cities"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["city"] == code))
        .unwrap_or(&serde_json::Value::Null)
}

/// Where a shopper in `code`'s city lands now.
fn lands(state: &LabState, code: &str) -> Option<String> {
    let r = state.region(code).ok()?;
    netlab::city_get(state, &r.city_ns, "/").ok()?.ok()?.region
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        if std::time::Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `POST <hook>/drain` with `token`, from the lab's origin host: the status.
fn drain_with(state: &LabState, hook: &str, token: &str) -> Result<u16> {
    let (url, token) = (format!("{hook}/drain"), token.to_owned());
    netlab::in_netns(&state.core_ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                Ok(reqwest::Client::new()
                    .post(url)
                    .bearer_auth(token)
                    .send()
                    .await?
                    .status()
                    .as_u16())
            })
    })?
}

/// A region's health-hook status, read from the lab's origin host.
fn status(state: &LabState, code: &str, token: &str) -> Result<edgefront_health::daemon::Status> {
    let url = state.region(code)?.health_url.clone();
    let token = token.to_owned();
    netlab::in_netns(&state.core_ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            edgefront_ctl::client::Client::new(&token)?
                .status(&url)
                .await
        })
    })?
}

/// Runs `f` with a small runtime inside namespace `ns`.
fn block_in<T: Send + 'static>(
    ns: &str,
    f: impl AsyncFnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    netlab::in_netns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f())
    })?
}

/// A page of `host` from a shopper city through the anycast address:
/// status, `x-edge-route`, body.
fn city_page(state: &LabState, code: &str, host: &str) -> Result<(u16, String, String)> {
    city_page_status(state, code, host).map(|(s, route, _, body)| (s, route, body))
}

/// The same, with the `cache-status` header.
fn city_page_status(
    state: &LabState,
    code: &str,
    host: &str,
) -> Result<(u16, String, String, String)> {
    // Over https, as browsers load it (the lab redirects plain HTTP).
    let url = format!("https://{host}/");
    let client = state.shopper_client()?;
    block_in(&state.region(code)?.city_ns, async move || {
        let r = client
            .timeout(Duration::from_secs(3))
            .build()?
            .get(url)
            .send()
            .await?;
        let status = r.status().as_u16();
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let (route, cache) = (header("x-edge-route"), header("cache-status"));
        Ok((status, route, cache, r.text().await?))
    })
}

/// A seller API call to the origin, from the origin host.
fn seller(
    state: &LabState,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: serde_json::Value,
) -> Result<serde_json::Value> {
    let url = format!("{}{path}", state.origin_url);
    let token = token.map(str::to_owned);
    let http = state.origin_client()?;
    block_in(&state.core_ns, async move || {
        let mut req = http.request(method, url).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await?;
        let status = r.status();
        let v: serde_json::Value = r.json().await?;
        if !status.is_success() {
            bail!("seller API answered {status}: {v}");
        }
        Ok(v)
    })
}

/// `SELECT <call>` on the replicas of `codes` (superuser in the lab).
fn on_replicas(state: &LabState, codes: &[&str], call: &str) -> Result<()> {
    for code in codes {
        let r = state.region(code)?;
        let out = Command::new("ip")
            .args(["netns", "exec", &r.node_ns])
            .arg(format!("{}/psql", edgefront_tests::PG_BIN))
            .args([
                "-h",
                &r.node_ip.to_string(),
                "-U",
                "edgefront",
                "-d",
                "edgefront",
            ])
            .args(["-XAtc", &format!("SELECT {call}")])
            .output()?;
        if !out.status.success() {
            bail!("{call} on {code}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// Patroni's maintenance mode on or off (a lab with `--single-primary` has
/// no Patroni: nothing to do).
fn maintenance(state: &LabState, on: bool) -> Result<()> {
    let Some(db) = state.database.clone() else {
        return Ok(());
    };
    let http = state.origin_client()?;
    block_in(&state.core_ns, async move || {
        edgefront_ctl::database::set_maintenance(
            &http,
            &db.patroni_apis,
            (&db.patroni_user, &db.patroni_password),
            on,
        )
        .await
    })
}

/// A health hook's Prometheus text, from the origin host.
fn hook_metrics(state: &LabState, code: &str) -> Result<String> {
    let url = format!("{}/metrics", state.region(code)?.health_url);
    block_in(&state.core_ns, async move || {
        Ok(reqwest::get(url).await?.text().await?)
    })
}

#[test]
fn anycast_lab_routes_drains_fails_over_and_heals() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        panic!("the anycast lab test needs root (network namespaces); CI runs it as root");
    }
    let prefix = format!("eft{}", std::process::id());
    let _guard = LabGuard(prefix.clone());
    let out = Command::new(bin_dir().join("edgefront-lab"))
        .args(["--prefix", &prefix, "--detach"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "lab did not start: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = LabState::load(&prefix)?;
    let regions = edgefront_regions::Regions::builtin()?;
    assert_eq!(state.regions.len(), regions.all().len());

    // Every city's shopper reaches its nearest region on the one address.
    for r in regions.all() {
        let nearest = regions.by_distance_from(r.coord)[0]
            .0
            .id
            .as_str()
            .to_owned();
        assert_eq!(
            lands(&state, r.id.as_str()).as_deref(),
            Some(nearest.as_str()),
            "{}",
            r.city
        );
    }
    let next = |code: &str| {
        regions.by_distance_from_region(code).unwrap()[0]
            .0
            .id
            .as_str()
            .to_owned()
    };

    // The admin API refuses a wrong token and changes nothing.
    let (code, _, err) = edge_ctl(&prefix, &["--token", "x", "status"])?;
    assert_eq!(code, 0, "the lab's own token is used: {err}");
    let wrong = status(&state, "bom1", "not-the-token-0123456789");
    assert!(format!("{:#}", wrong.err().unwrap()).contains("401"));
    // Admin tokens are per region: sin1's cannot even read bom1's hook. The
    // lab-wide status token (the hooks read each other with it) reads but
    // cannot drain; neither can sin1's token.
    assert_ne!(state.token_for("sin1"), state.token_for("bom1"));
    let cross = status(&state, "bom1", state.token_for("sin1"));
    assert!(format!("{:#}", cross.err().unwrap()).contains("401"));
    assert!(
        status(&state, "bom1", &state.token).is_ok(),
        "the status token reads"
    );
    let url = state.region("bom1")?.health_url.clone();
    for other in [
        state.token_for("sin1"),
        state.token.as_str(),
        "not-the-token-0123456789",
    ] {
        let code = drain_with(&state, &url, other)?;
        assert_eq!(code, 401, "a token that is not bom1's drained bom1");
    }
    let s = status(&state, "bom1", state.token_for("bom1"))?;
    assert!(s.announced && !s.drained, "a refused drain changed nothing");

    // The live map, in a real browser: everything announced, Mumbai home.
    let port = edgefront_tests::free_port();
    let mut dashboard = Command::new(bin_dir().join("edge-ctl"))
        .args([
            "--lab",
            &prefix,
            "dashboard",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}/");
    wait_until("the dashboard", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    let dom = page_dom_showing(
        &url,
        &[
            "9 of 9 regions announced",
            r#"data-region="bom1" data-route="announced""#,
            r#"data-city="bom1" data-lands="bom1""#,
        ],
    )?;
    for external in ["src=\"http", "href=\"http", "<link", "@import", "url(http"] {
        assert!(
            !dom.contains(external),
            "no external resources ({external})"
        );
    }

    // Drain under load from Mumbai: zero failed requests, Mumbai moves to the
    // next-nearest region, and undrain brings it home. The map, loaded during
    // the drill, shows bom1 withdrawn and Mumbai's line moved.
    let nn = next("bom1");
    let drill_proc = Command::new(bin_dir().join("edge-ctl"))
        .args(["--lab", &prefix])
        .args(drill_args("bom1", "drain", "bom1,sin1", "8"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    wait_until(
        "bom1 drained during the drill",
        Duration::from_secs(30),
        || status(&state, "bom1", state.token_for("bom1")).is_ok_and(|s| !s.announced && s.drained),
    )?;
    // The summary says it in words too.
    page_dom_showing(
        &url,
        &[
            r#"data-region="bom1" data-route="withdrawn""#,
            &format!(r#"data-city="bom1" data-lands="{nn}""#),
            "withdrawn: bom1",
        ],
    )?;
    let shot = tempfile::tempdir()?;
    let png = shot.path().join("dashboard-drill.png");
    chromium(&url, &[&format!("--screenshot={}", png.display())])?;
    assert!(std::fs::metadata(&png)?.len() > 10_000, "a real screenshot");
    let out = drill_proc.wait_with_output()?;
    let r = parse_drill(
        out.status.code().unwrap_or(-1),
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
        "drain",
    )?;
    // Back after undrain.
    page_dom_showing(&url, &[r#"data-region="bom1" data-route="announced""#])?;
    let _ = dashboard.kill();
    let _ = dashboard.wait();
    let mumbai = city(&r, "bom1");
    assert_eq!(
        r["failed_until_restore"], 0,
        "drain dropped requests: {r:#}"
    );
    assert_eq!(mumbai["before"], "bom1");
    let during: Vec<&str> = mumbai["during"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        during.contains(&nn.as_str()),
        "Mumbai went to {during:?}, not {nn}"
    );
    assert!(
        during.iter().all(|d| *d == "bom1" || *d == nn),
        "{during:?}"
    );
    // Issue 14, item 3: traffic moving home drops nothing. Connections
    // Mumbai opened to the far region keep working through second-chance
    // forwarding (so they may still answer from there); new ones land home.
    assert_eq!(
        r["failed_after_restore"], 0,
        "the return dropped requests: {r:#}"
    );
    assert!(
        mumbai["bgp_return_ms"].is_number(),
        "undrain brings Mumbai's route home: {mumbai:#}"
    );
    wait_until(
        "Mumbai's new connections land on bom1 after the undrain",
        Duration::from_secs(10),
        || lands(&state, "bom1").as_deref() == Some("bom1"),
    )?;
    assert!(
        mumbai["requests"].as_u64().unwrap() >= 100,
        "bounded load ran: {mumbai:#}"
    );
    eprintln!(
        "drain: {} requests, {} failed until restore, {} after; BGP moved Mumbai after {} ms",
        r["requests"],
        r["failed_until_restore"],
        r["failed_after_restore"],
        mumbai["bgp_reroute_ms"]
    );

    // Hard kill of the whole bom1 node, under browsers' HTTP/2 over TLS: BFD
    // reroutes Mumbai within a second; requests in flight on the node at the
    // power pull are lost (at most one per shopper), none on the way home.
    let mut args = drill_args("bom1", "kill", "bom1", "3");
    args.extend(["--proto", "h2"]);
    let (code, out, err) = edge_ctl(&prefix, &args)?;
    let r = parse_drill(code, &out, &err, "kill")?;
    assert_eq!(r["proto"], "h2");
    assert_eq!(
        r["failed_after_restore"], 0,
        "the return after the kill dropped requests: {r:#}"
    );
    let mumbai = city(&r, "bom1");
    let reroute = mumbai["bgp_reroute_ms"]
        .as_f64()
        .context("Mumbai was never rerouted")?;
    assert!(reroute < 1000.0, "BGP reroute took {reroute} ms: {r:#}");
    assert!(
        mumbai["during"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d == &serde_json::json!(nn))
    );
    wait_until(
        "Mumbai back on bom1 after the restore",
        Duration::from_secs(10),
        || lands(&state, "bom1").as_deref() == Some("bom1"),
    )?;
    eprintln!(
        "kill: BGP reroute {reroute:.0} ms, first answer from {nn} after {} ms, {} failed",
        mumbai["first_answer_elsewhere_ms"], r["failed"]
    );

    // Issue 14, item 1: `edge-ctl upgrade` under browsers' HTTP/2 load
    // (the drill's upgrade mode): the new edge takes the sockets, the old one
    // sends GOAWAY, finishes and exits; the route never moves; nothing fails.
    let mut args = drill_args("bom1", "upgrade", "bom1", "7");
    args.extend(["--proto", "h2"]);
    let (code, out, err) = edge_ctl(&prefix, &args)?;
    let r = parse_drill(code, &out, &err, "upgrade")?;
    assert_eq!(r["failed"], 0, "the upgrade failed requests: {r:#}");
    let mumbai = city(&r, "bom1");
    assert_eq!(mumbai["during"], serde_json::json!(["bom1"]), "{mumbai:#}");
    assert!(mumbai["requests"].as_u64().unwrap() >= 100, "{mumbai:#}");
    eprintln!(
        "upgrade under HTTP/2: {} streams, 0 failed, {} retried",
        r["requests"], r["retried"]
    );

    // The replica of ams1 stops: ams1 withdraws by itself, Amsterdam lands
    // elsewhere; the replica returns: ams1 announces again.
    let svc = state
        .services
        .iter()
        .find(|s| s.name == "replica-ams1")
        .context("replica service")?
        .clone();
    // A member of the lab's Patroni cluster: stopped as its unit would be.
    edgefront_ctl::drill::stop_replica(&state, "ams1")?;
    wait_until("ams1 to withdraw", Duration::from_secs(10), || {
        status(&state, "ams1", state.token_for("ams1")).is_ok_and(|s| !s.announced)
    })?;
    let s = status(&state, "ams1", state.token_for("ams1"))?;
    assert!(
        s.reasons.iter().any(|r| r.contains("replica")),
        "the reason names the replica: {:?}",
        s.reasons
    );
    wait_until(
        "Amsterdam to land elsewhere",
        Duration::from_secs(10),
        || lands(&state, "ams1").is_some_and(|r| r != "ams1"),
    )?;
    let elsewhere = lands(&state, "ams1");
    svc.start()?;
    wait_until("ams1 to announce again", Duration::from_secs(20), || {
        status(&state, "ams1", state.token_for("ams1")).is_ok_and(|s| s.announced)
    })?;
    wait_until("Amsterdam back home", Duration::from_secs(10), || {
        lands(&state, "ams1").as_deref() == Some("ams1")
    })?;
    eprintln!("replica down: Amsterdam went to {elsewhere:?} and came back to ams1");

    // A drain survives restarts of the health hook and of BIRD (BIRD comes
    // back with the anycast protocol disabled; the hook reads its state file).
    let (code, _, err) = edge_ctl(&prefix, &["drain", "fra1"])?;
    assert_eq!(code, 0, "{err}");
    let fra = state.region("fra1")?.clone();
    for name in ["edgefront-health", "bird"] {
        let killed = lab::kill_named(&fra.node_ns, &[name]);
        assert!(killed >= 1, "no {name} process in {}", fra.node_ns);
    }
    std::thread::sleep(Duration::from_millis(300));
    for svc in state
        .services
        .iter()
        .filter(|s| s.name == "bird-node-fra1" || s.name == "health-fra1")
    {
        svc.start()?;
    }
    wait_until(
        "the restarted hook to answer",
        Duration::from_secs(10),
        || status(&state, "fra1", state.token_for("fra1")).is_ok(),
    )?;
    // BIRD re-establishes its session (its error-wait backs off up to 5 s);
    // all the while, and after, the region must stay withdrawn.
    wait_until("BIRD's session back up", Duration::from_secs(20), || {
        let s = status(&state, "fra1", state.token_for("fra1")).unwrap();
        assert!(
            s.drained && !s.announced,
            "drain lost across restarts: {s:?}"
        );
        s.bird_protocols
            .iter()
            .any(|p| p.name.starts_with("upstream") && p.info.starts_with("Established"))
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let s = status(&state, "fra1", state.token_for("fra1"))?;
    assert!(
        s.drained && !s.announced,
        "re-announced after restarts: {s:?}"
    );
    assert_ne!(lands(&state, "fra1").as_deref(), Some("fra1"));
    let (code, _, err) = edge_ctl(&prefix, &["undrain", "fra1"])?;
    assert_eq!(code, 0, "{err}");
    wait_until("Frankfurt back home", Duration::from_secs(10), || {
        lands(&state, "fra1").as_deref() == Some("fra1")
    })?;
    eprintln!("drain survived a health-hook and BIRD restart; undrain brought Frankfurt home");

    // Issue 14, item 5: no single point in the health path. The hook of
    // lax1 is SIGKILLed with its edge (BIRD alone lives on, its protocol
    // still enabled): the route goes with the hook's liveness device, and Los
    // Angeles lands elsewhere. Restarted, the hook announces again.
    let lax = state.region("lax1")?.clone();
    let killed = lab::kill_named(&lax.node_ns, &["edgefront-health", "edge"]);
    assert_eq!(killed, 2, "the hook and the edge of lax1");
    let killed_at = std::time::Instant::now();
    wait_until(
        "Los Angeles served elsewhere with lax1's hook and edge dead",
        Duration::from_secs(10),
        || lands(&state, "lax1").is_some_and(|r| r != "lax1"),
    )?;
    let moved = killed_at.elapsed();
    let bird_alive = !lab::pids_named(&lax.node_ns, &["bird"]).is_empty();
    assert!(bird_alive, "BIRD itself was never touched");
    for svc in state
        .services
        .iter()
        .filter(|s| s.name == "edge-lax1" || s.name == "health-lax1")
    {
        svc.start()?;
    }
    wait_until("Los Angeles back home", Duration::from_secs(30), || {
        lands(&state, "lax1").as_deref() == Some("lax1")
    })?;
    eprintln!(
        "dead hook and edge in lax1: Los Angeles served elsewhere {:.1}s after the kill; back home after the restart",
        moved.as_secs_f64()
    );

    // Lag every region shares: replay paused on every replica (they all
    // replay the same WAL). Nobody withdraws: every city keeps being served
    // by its own region, the write stays invisible (sanity: the replicas
    // really are behind), and every hook raises the alert. Resume: the write
    // shows everywhere and the alert clears.
    let codes: Vec<&str> = regions.all().iter().map(|r| r.id.as_str()).collect();
    let host = format!("shared-cause.{}", regions.network.platform_domain);
    let created = seller(
        &state,
        reqwest::Method::POST,
        "/api/stores",
        None,
        serde_json::json!({"name": "Before Pause", "slug": "shared-cause", "currency": "EUR"}),
    )?;
    let token = created["token"].as_str().context("store token")?.to_owned();
    let every_city_shows = |text: &str| {
        codes.iter().all(|c| {
            city_page(&state, c, &host).is_ok_and(|(s, _, body)| s == 200 && body.contains(text))
        })
    };
    wait_until(
        "the new store in every city",
        Duration::from_secs(30),
        || every_city_shows("Before Pause"),
    )?;
    // Patroni resumes a replay paused by hand within a loop unless the
    // cluster is in maintenance mode.
    maintenance(&state, true)?;
    on_replicas(&state, &codes, "pg_wal_replay_pause()")?;
    let paused = std::time::Instant::now();
    seller(
        &state,
        reqwest::Method::PATCH,
        "/api/store",
        Some(&token),
        serde_json::json!({"name": "After Pause"}),
    )?;
    let served_stale_by_own_region = || -> Result<()> {
        for c in &codes {
            let (s, route, body) = city_page(&state, c, &host)?;
            assert_eq!(
                (s, route.as_str()),
                (200, *c),
                "{c} while every replica is paused"
            );
            assert!(
                body.contains("Before Pause") && !body.contains("After Pause"),
                "{c}: the write is visible although replay is paused"
            );
        }
        Ok(())
    };
    wait_until(
        "every hook to raise the alert and stay announced",
        Duration::from_secs(45),
        || {
            served_stale_by_own_region().unwrap();
            codes.iter().all(|c| {
                let s = status(&state, c, state.token_for(c)).unwrap();
                assert!(
                    s.announced,
                    "{c} withdrew for lag every region shares: {s:?}"
                );
                s.withdraw_suppressed
            })
        },
    )?;
    let alert_after = paused.elapsed();
    // It holds: a few more seconds, still all announced and serving.
    std::thread::sleep(Duration::from_secs(2));
    served_stale_by_own_region()?;
    // And the pages say so: the replica is over its lag budget.
    for c in &codes {
        let (_, _, cache, _) = city_page_status(&state, c, &host)?;
        assert!(cache.contains("detail=replica-lag"), "{c}: {cache}");
    }
    for c in &codes {
        let s = status(&state, c, state.token_for(c))?;
        assert!(
            s.announced && s.withdraw_suppressed && s.lag_only,
            "{c}: {s:?}"
        );
        assert!(
            s.reasons.iter().any(|r| r.contains("replica_lag")),
            "{c}: {:?}",
            s.reasons
        );
        assert!(s.replica_replay_paused == Some(true), "{c}: {s:?}");
    }
    let m = hook_metrics(&state, "sin1")?;
    assert!(
        m.lines()
            .any(|l| l.starts_with("edgefront_health_withdraw_suppressed{") && l.ends_with(" 1")),
        "{m}"
    );
    on_replicas(&state, &codes, "pg_wal_replay_resume()")?;
    maintenance(&state, false)?;
    let resumed = std::time::Instant::now();
    wait_until("the write in every city", Duration::from_secs(30), || {
        every_city_shows("After Pause")
    })?;
    let fresh_after = resumed.elapsed();
    wait_until(
        "the alert to clear everywhere",
        Duration::from_secs(20),
        || {
            codes.iter().all(|c| {
                status(&state, c, state.token_for(c))
                    .is_ok_and(|s| s.announced && !s.withdraw_suppressed && s.healthy)
            })
        },
    )?;
    eprintln!(
        "shared lag: replay paused everywhere; all {} regions stayed announced and served (alert after {:.1}s); resumed: fresh everywhere after {:.1}s",
        codes.len(),
        alert_after.as_secs_f64(),
        fresh_after.as_secs_f64()
    );

    // Lag in one region only (its replay paused, the others fine): that
    // region withdraws, Sydney lands elsewhere and sees the write there;
    // resumed, it announces again.
    maintenance(&state, true)?;
    on_replicas(&state, &["syd1"], "pg_wal_replay_pause()")?;
    seller(
        &state,
        reqwest::Method::PATCH,
        "/api/store",
        Some(&token),
        serde_json::json!({"name": "Only Sydney Lags"}),
    )?;
    wait_until("syd1 to withdraw for lag", Duration::from_secs(45), || {
        status(&state, "syd1", state.token_for("syd1")).is_ok_and(|s| !s.announced)
    })?;
    let s = status(&state, "syd1", state.token_for("syd1"))?;
    assert!(
        s.lag_only && !s.withdraw_suppressed && s.fine_peers >= 2,
        "{s:?}"
    );
    wait_until(
        "Sydney served the write elsewhere",
        Duration::from_secs(10),
        || {
            city_page(&state, "syd1", &host).is_ok_and(|(st, route, body)| {
                st == 200 && route != "syd1" && body.contains("Only Sydney Lags")
            })
        },
    )?;
    on_replicas(&state, &["syd1"], "pg_wal_replay_resume()")?;
    maintenance(&state, false)?;
    wait_until("syd1 to announce again", Duration::from_secs(20), || {
        status(&state, "syd1", state.token_for("syd1")).is_ok_and(|s| s.announced)
    })?;
    wait_until("Sydney back home", Duration::from_secs(10), || {
        lands(&state, "syd1").as_deref() == Some("syd1")
    })?;
    eprintln!(
        "lag in syd1 only: withdrawn ({} fine peers), back after resume",
        s.fine_peers
    );

    // edge-ctl status sees all nine announced; lab down removes everything.
    let (code, out, err) = edge_ctl(&prefix, &["--json", "status"])?;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        v.as_array()
            .unwrap()
            .iter()
            .filter(|s| s["announced"] == true)
            .count(),
        9,
        "{out}"
    );
    let down = lab::down(&prefix)?;
    // The origin host and the wire, the standby's host (Patroni), and per
    // region a node, a metro and a city.
    let hosts = 2 + usize::from(state.database.is_some());
    assert_eq!(down.namespaces, hosts + 3 * regions.all().len());
    assert!(lab::namespaces(&prefix).is_empty());
    assert!(!lab::state_path(&prefix).exists());
    Ok(())
}
