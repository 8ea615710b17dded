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
use nix::sys::signal::Signal;
use reqwest::StatusCode;

const HOST: &str = "spiceroute.example";

/// A primary with the demo stores, an origin on it and a replica for
/// `region`: what every upgrade here runs against.
fn demo_database(region: &str) -> Result<(Postgres, Origin, Postgres)> {
    let platform = edgefront_regions::Regions::builtin()?
        .network
        .platform_domain;
    let primary = Postgres::primary()?;
    let origin = Origin::start(&primary.url(), &platform)?;
    Origin::seed_demo(&primary.url(), &platform)?;
    let replica = primary.replica(region)?;
    Ok((primary, origin, replica))
}

/// Sends `sig` to process `pid`.
fn signal(pid: u32, sig: Signal) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
}

/// Whether process `pid` has exited (gone, or a zombie waiting for us).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Waits (at most 30 s) until `old` has exited, and fails if it has not.
async fn wait_exited(old: &Edge) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exited(old.proc.pid()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        exited(old.proc.pid()),
        "the old edge exited: {}",
        old.proc.log()
    );
}

/// Shoppers through one edge address until stopped (at most 60 s): pages
/// over a keep-alive connection, pages over a new connection each, and cart
/// reads through the edge to the origin.
struct Shoppers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    retried: Arc<AtomicU64>,
    first_failure: Arc<std::sync::Mutex<Option<String>>>,
    load: Vec<tokio::task::JoinHandle<()>>,
}

impl Shoppers {
    fn start(url: &str) -> Result<Shoppers> {
        let mut s = Shoppers {
            stop: Arc::default(),
            ok: Arc::default(),
            failed: Arc::default(),
            retried: Arc::default(),
            first_failure: Arc::default(),
            load: Vec::new(),
        };
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
                s.stop.clone(),
                s.ok.clone(),
                s.failed.clone(),
                s.retried.clone(),
                s.first_failure.clone(),
                url.to_owned(),
            );
            s.load.push(tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let send = || http.get(format!("{url}{path}")).header("host", HOST).send();
                    let mut r = send().await;
                    // A keep-alive connection the old process closed as this
                    // request went out (HTTP/1.1's idle-close race) fails before
                    // any answer: browsers send such a GET once more on a new
                    // connection (RFC 9112 §9.3.1), and so does this shopper.
                    // Counted; a fresh connection's failure is never retried.
                    // Closed before any answer: reset, or hyper's
                    // "IncompleteMessage" (the close came first).
                    if kind == "keep-alive"
                        && let Err(e) = &r
                        && e.is_request()
                        && ["ConnectionReset", "IncompleteMessage"]
                            .iter()
                            .any(|m| format!("{e:?}").contains(m))
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
        Ok(s)
    }

    fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops them: `(answered, failed, keep-alive GETs retried, first failure)`.
    async fn finish(self) -> Result<(u64, u64, u64, Option<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        for l in self.load {
            l.await?;
        }
        Ok((
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.first_failure.lock().ok().and_then(|f| f.clone()),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_under_load_fails_no_request() -> Result<()> {
    let (_primary, origin, replica) = demo_database("fra1")?;
    let builder = Edge::builder("fra1", &replica.url(), origin.addr).cache_ttl_ms(300_000);
    let old = builder.clone().run()?;
    let shoppers = Shoppers::start(&old.url())?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = shoppers.answered();

    // The upgrade: the new process waits for the sockets, the old one is
    // told to hand them over (SIGQUIT), then finishes and exits.
    let new = builder.run_upgrade(&old)?;
    let quit_at = Instant::now();
    signal(old.proc.pid(), Signal::SIGQUIT)?;
    wait_exited(&old).await;
    let old_gone = quit_at.elapsed();
    // The new one alone serves for a while.
    let at_exit = shoppers.answered();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failed, retried, first_failure) = shoppers.finish().await?;
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
        "first failure: {first_failure:?}\nold: {}\nnew: {}",
        old.proc.log(),
        new.proc.log()
    );
    assert!(ok > at_exit, "the new edge served after the old one exited");
    assert!(hits + misses > 0.0, "the new edge answered pages");
    drop((new, old));
    Ok(())
}

/// What an edge tells its service manager over `NOTIFY_SOCKET` (systemd's
/// datagram protocol), read by the test as systemd would.
struct Manager(std::os::unix::net::UnixDatagram, tempfile::TempDir);

impl Manager {
    fn new() -> Result<Manager> {
        let dir = tempfile::tempdir()?;
        let sock = std::os::unix::net::UnixDatagram::bind(dir.path().join("notify"))?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(Manager(sock, dir))
    }

    fn path(&self) -> String {
        self.1.path().join("notify").display().to_string()
    }

    /// The next message's `KEY=value` lines.
    fn next(&self) -> Result<Vec<String>> {
        let mut buf = [0u8; 4096];
        let n = self.0.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Whether a message arrives within `wait`.
    fn silent_for(&self, wait: Duration) -> Result<bool> {
        self.0.set_read_timeout(Some(wait))?;
        let mut buf = [0u8; 4096];
        let silent = self.0.recv(&mut buf).is_err();
        self.0.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(silent)
    }
}

/// The `MAINPID` a message names.
fn main_pid(msg: &[String]) -> Option<u32> {
    msg.iter()
        .find_map(|l| l.strip_prefix("MAINPID=")?.parse().ok())
}

/// Opens `n` idle connections from `127.0.0.<last>` and counts those the
/// edge closed at once (the per-address connection cap; which ones it
/// closes depends on the order it accepts them).
async fn refused_of(addr: std::net::SocketAddr, last: u8, n: usize) -> Result<usize> {
    use std::io::Read;
    let mut conns = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::from(([127, 0, 0, last], 0)))?;
        let s = socket.connect(addr).await?.into_std()?;
        s.set_nonblocking(false)?;
        conns.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut closed = 0;
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = [0u8; 16];
        closed += usize::from(match c.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        });
    }
    Ok(closed)
}

/// Kills the edge that took over in a reload (the test did not start it).
struct Successor(u32);

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = signal(self.0, Signal::SIGKILL);
    }
}

/// `systemctl reload` (SIGHUP): the edge starts its successor from its own
/// command line, which reads the configuration file again, and hands it the
/// listening sockets. Under load nothing fails; the service manager is told
/// the successor's pid before the old process exits and then that it is
/// ready; the changed setting (the per-address connection cap) and the
/// rotated admin token (a file of `secrets_dir`) hold in the successor. A
/// reload with a broken configuration is refused and the running edge keeps
/// serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_hands_over_to_a_successor_that_reads_the_configuration_again() -> Result<()> {
    let (_primary, origin, replica) = demo_database("ams1")?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("edge.toml");
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets)?;
    let admin_token = |token: &str| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let file = secrets.join("admin_token");
        std::fs::write(&file, format!("{token}\n"))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        Ok(())
    };
    const TOKEN_BEFORE: &str = "admin-token-before-the-reload";
    const TOKEN_AFTER: &str = "admin-token-after-the-reload";
    admin_token(TOKEN_BEFORE)?;
    // The test's shoppers are one address: origin-bound and miss budgets
    // raised out of their way; the cap and the admin token are what the
    // reload changes.
    let write_config = |cap: u32| {
        std::fs::write(
            &config,
            format!(
                "max_connections_per_address = {cap}\n\
                 limit_origin_requests_per_second = 1000000\n\
                 limit_origin_requests_burst = 1000000\n\
                 limit_misses_per_second = 1000000\n\
                 limit_misses_burst = 1000000\n\
                 secrets_dir = \"{}\"\n",
                secrets.display()
            ),
        )
    };
    write_config(64)?;
    let manager = Manager::new()?;
    let old = Edge::builder("ams1", &replica.url(), origin.addr)
        .cache_ttl_ms(300_000)
        .production_limits()
        .arg("--config")
        .arg(&config.display().to_string())
        .env("NOTIFY_SOCKET", &manager.path())
        .run()?;
    let ready = manager.next()?;
    assert!(ready.contains(&"READY=1".to_owned()), "{ready:?}");
    assert_eq!(main_pid(&ready), Some(old.proc.pid()));
    assert_eq!(
        refused_of(old.addr, 77, 9).await?,
        0,
        "9 connections from one address are under a cap of 64"
    );
    // An admin call (undrain: changes nothing here) with a token: its status.
    let admin_call = |token: &'static str| {
        let url = format!("{}/undrain", old.admin_url());
        async move {
            anyhow::Ok(
                edgefront_tests::client()
                    .post(url)
                    .bearer_auth(token)
                    .send()
                    .await?
                    .status(),
            )
        }
    };
    assert_eq!(admin_call(TOKEN_BEFORE).await?, StatusCode::OK);
    assert_eq!(admin_call(TOKEN_AFTER).await?, StatusCode::UNAUTHORIZED);

    // Pages only this test asks for, cached by the old edge: the successor
    // renders what the old one names before it says it is ready.
    let http = edgefront_tests::client();
    let fetch = |path: &'static str| {
        let (http, url) = (http.clone(), old.url());
        async move {
            let r = http
                .get(format!("{url}{path}"))
                .header("host", HOST)
                .send()
                .await?;
            let cache = edgefront_tests::header_text(&r, "cache-status");
            anyhow::ensure!(r.status().is_success(), "{path}: {}", r.status());
            anyhow::Ok(cache)
        }
    };
    const NAMED: [&str; 3] = ["/c/biryani", "/?page=2", "/c/curries"];
    for path in NAMED {
        fetch(path).await?;
        let again = fetch(path).await?;
        assert!(
            again.contains("hit"),
            "{path} cached by the old edge: {again}"
        );
    }
    let shoppers = Shoppers::start(&old.url())?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    write_config(8)?;
    admin_token(TOKEN_AFTER)?;
    signal(old.proc.pid(), Signal::SIGHUP)?;
    // The successor, handed copies of the sockets, tells the old edge it is
    // warm; only then does the old edge name it the service, ready, and
    // stop (it served beside it until then).
    let ready = manager.next()?;
    let succ = main_pid(&ready).ok_or_else(|| anyhow::anyhow!("no MAINPID: {ready:?}"))?;
    let _succ = Successor(succ);
    assert_ne!(succ, old.proc.pid());
    assert!(ready.contains(&"READY=1".to_owned()), "{ready:?}");
    wait_exited(&old).await;
    // Ready, so warm: the old edge's pages are hits at the successor's first ask.
    for path in NAMED {
        let first = fetch(path).await?;
        assert!(
            first.contains("hit"),
            "{path} at the successor: {first}\n{}",
            old.proc.log()
        );
    }
    let at_exit = shoppers.answered();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failed, retried, first_failure) = shoppers.finish().await?;
    eprintln!(
        "reload: {ok} requests answered ({} after the old edge exited), {failed} failed, {retried} keep-alive GETs retried once",
        ok - at_exit
    );
    assert_eq!(
        failed,
        0,
        "first failure: {first_failure:?}\n{}",
        old.proc.log()
    );
    assert!(
        ok > at_exit,
        "the successor served after the old edge exited"
    );
    assert_eq!(
        refused_of(old.addr, 78, 9).await?,
        1,
        "the successor read the new cap (8): one of 9 connections from one address is closed"
    );
    assert_eq!(
        admin_call(TOKEN_AFTER).await?,
        StatusCode::OK,
        "the successor read the rotated admin token"
    );
    assert_eq!(admin_call(TOKEN_BEFORE).await?, StatusCode::UNAUTHORIZED);

    // A reload asked for while an edge is still starting (systemd names a
    // successor the service before it has its sockets) is no-op, not the
    // end of that edge (SIGHUP's default action).
    let starting =
        Edge::builder("ams1", &replica.url(), origin.addr).spawn_waiting_for_sockets()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(starting.pid(), Signal::SIGHUP)?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        !exited(starting.pid()),
        "a SIGHUP during the start ended the edge: {}",
        starting.log()
    );
    drop(starting);

    // A broken configuration: the reload is refused, nothing is handed
    // over, and the running edge keeps serving.
    std::fs::write(&config, "max_connections_per_address = \"many\"\n")?;
    signal(succ, Signal::SIGHUP)?;
    assert!(
        manager.silent_for(Duration::from_secs(3))?,
        "a refused reload names no successor"
    );
    assert!(!exited(succ), "the edge keeps running: {}", old.proc.log());
    let page = edgefront_tests::client()
        .get(format!("{}/", old.url()))
        .header("host", HOST)
        .send()
        .await?;
    assert!(page.status().is_success(), "{}", page.status());
    assert!(
        old.proc.log().contains("reload refused"),
        "the refusal is logged: {}",
        old.proc.log()
    );
    Ok(())
}

/// The way back (issue 14): a reload whose successor dies after it was sent
/// the listening sockets, before it says it is ready — a new release that
/// crashes at start. The running edge never closed its listeners: it keeps
/// serving (0 failed under load), reports the failure, and the next reload,
/// with a good binary, hands over as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_dies_after_it_has_the_sockets_leaves_the_edge_serving() -> Result<()> {
    let (_primary, origin, replica) = demo_database("ams1")?;
    let dir = tempfile::tempdir()?;
    // The edge runs as a link: what a reload starts is what it points at.
    let program = dir.path().join("edge");
    let point_at = |target: &std::path::Path| -> Result<()> {
        let tmp = dir.path().join("edge.new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)?;
        std::fs::rename(&tmp, &program)?;
        Ok(())
    };
    point_at(&edgefront_tests::bin_dir().join("edge"))?;
    let manager = Manager::new()?;
    let old = Edge::builder("ams1", &replica.url(), origin.addr)
        .cache_ttl_ms(300_000)
        .program(&program)
        .env("NOTIFY_SOCKET", &manager.path())
        .run()?;
    let ready = manager.next()?;
    assert!(ready.contains(&"READY=1".to_owned()), "{ready:?}");

    // A release that passes the configuration check, takes the sockets
    // (pingora's hand-off: it listens where the successor waits and
    // receives them), notes how many it got, and exits with a failure.
    let sock = std::env::temp_dir().join(format!(
        "edgefront-edge-ams1-{}.upgrade.sock",
        old.addr.port()
    ));
    let got = dir.path().join("got");
    let crashing = dir.path().join("crashing-release");
    std::fs::write(
        &crashing,
        format!(
            "#!/bin/sh\n\
             case \" $* \" in *\" --check-config \"*) exit 0;; esac\n\
             exec python3 -c '\n\
             import socket, sys\n\
             s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
             s.bind(sys.argv[1]); s.listen(1)\n\
             c, _ = s.accept()\n\
             msg, fds, _, _ = socket.recv_fds(c, 4096, 16)\n\
             open(sys.argv[2], \"w\").write(str(len(fds)))\n\
             sys.exit(3)\n\
             ' {} {}\n",
            sock.display(),
            got.display()
        ),
    )?;
    std::fs::set_permissions(
        &crashing,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let shoppers = Shoppers::start(&old.url())?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    point_at(&crashing)?;
    signal(old.proc.pid(), Signal::SIGHUP)?;
    // It was sent the shopper and admin listeners, and died.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !old.proc.log().contains("reload failed after the hand-over") && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        old.proc.log().contains("reload failed after the hand-over"),
        "{}",
        old.proc.log()
    );
    assert_eq!(
        std::fs::read_to_string(&got)?,
        "2",
        "the crashing release was sent both listeners"
    );
    assert!(
        manager.silent_for(Duration::from_millis(500))?,
        "a failed reload names no successor"
    );
    let after_crash = shoppers.answered();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !exited(old.proc.pid()),
        "the edge kept running: {}",
        old.proc.log()
    );
    assert!(
        shoppers.answered() > after_crash + 10,
        "the edge kept serving after the successor died"
    );

    // The fixed release: the next reload hands over as usual.
    point_at(&edgefront_tests::bin_dir().join("edge"))?;
    signal(old.proc.pid(), Signal::SIGHUP)?;
    let ready = manager.next()?;
    let succ = main_pid(&ready).ok_or_else(|| anyhow::anyhow!("no MAINPID: {ready:?}"))?;
    let _succ = Successor(succ);
    assert_ne!(succ, old.proc.pid());
    assert!(ready.contains(&"READY=1".to_owned()), "{ready:?}");
    wait_exited(&old).await;
    assert!(
        manager.silent_for(Duration::from_millis(500))?,
        "one message for the reload: the successor claimed nothing itself"
    );
    let at_exit = shoppers.answered();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failed, retried, first_failure) = shoppers.finish().await?;
    eprintln!(
        "crashed successor, then a reload: {ok} requests answered, {failed} failed, {retried} keep-alive GETs retried once"
    );
    assert_eq!(
        failed,
        0,
        "first failure: {first_failure:?}\n{}",
        old.proc.log()
    );
    assert!(
        ok > at_exit,
        "the successor served after the old edge exited"
    );
    Ok(())
}
