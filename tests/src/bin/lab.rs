//! `edgefront-lab`: the main job on one machine — the anycast network of
//! every region in network namespaces (see `edgefront_tests::netlab`), with
//! BIRD, the database as a Patroni cluster (etcd in three regions, a leader
//! and a synchronous standby on two origin hosts, each with an origin, and
//! every region's replica a member that follows whoever leads; or, with
//! `--single-primary`, one PostgreSQL primary and plain streaming
//! replicas), an edge and a health hook per region, and the demo stores.
//!
//! Foreground by default: Ctrl-C (or SIGTERM) removes everything it made.
//! `--detach` leaves the lab running for `edge-ctl` (`edge-ctl lab down`
//! removes it, also after a crash). `--smoke` checks that every shopper city
//! reaches its nearest region, that a write reaches every region, and https,
//! then removes the lab (CI runs it).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use edgefront_ctl::lab::{self, LabState, Service};
use edgefront_tests::labdb;
use edgefront_tests::netlab::{self, CORE_IP, CORE2_IP, Options};
use edgefront_tests::{Origin, PgPlace, Postgres, TestCa, eventually};

#[derive(Parser)]
#[command(
    name = "edgefront-lab",
    version,
    about = "Run the edgefront anycast network on this machine (root): nine regions in network namespaces, BGP, replicas, edges, health hooks, demo stores"
)]
struct Cli {
    /// Namespace/name prefix of this lab (letters and digits).
    #[arg(long, default_value = lab::DEFAULT_PREFIX)]
    prefix: String,
    /// Regions to start (comma-separated codes, or `all`).
    #[arg(long, default_value = "all")]
    regions: String,
    /// Start, check every city, a write and https, then remove the lab.
    #[arg(long)]
    smoke: bool,
    /// Leave the lab running and exit once it is up.
    #[arg(long)]
    detach: bool,
    /// On failure, leave everything in place for inspection.
    #[arg(long)]
    keep_on_error: bool,
    /// Run the primary with production durability (fsync, full-page writes,
    /// synchronous commit) instead of the lab's fast throwaway settings: an
    /// acknowledged write must survive a SIGKILL of the primary (the history
    /// checker kills it).
    #[arg(long, requires = "single_primary")]
    durable: bool,
    /// One PostgreSQL primary on the origin host and a plain streaming
    /// replica per region, instead of the Patroni cluster (no origin
    /// failover: `edge-ctl drill origin` refuses). The history checker
    /// runs this way: it kills and restarts the primary itself.
    #[arg(long)]
    single_primary: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgefront lab: {e:#}");
            if cli.keep_on_error {
                eprintln!(
                    "edgefront lab: left in place; remove with `edge-ctl lab down --prefix {}`",
                    cli.prefix
                );
                return ExitCode::FAILURE;
            }
            // What went wrong stays readable after the teardown.
            netlab::keep_lab_logs(&cli.prefix);
            match lab::down(&cli.prefix) {
                Ok(r) if r.namespaces > 0 => eprintln!(
                    "edgefront lab: removed what was started ({} namespaces, {} processes)",
                    r.namespaces, r.processes
                ),
                Ok(_) => {}
                Err(e) => eprintln!(
                    "edgefront lab: cleanup failed: {e:#}; run `edge-ctl lab down --prefix {}`",
                    cli.prefix
                ),
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the lab creates network namespaces: run it as root");
    }
    let t0 = Instant::now();
    let regions = edgefront_regions::Regions::builtin()?;
    let platform = regions.network.platform_domain.clone();
    let stale = lab::down(&cli.prefix)?;
    if stale.namespaces > 0 {
        println!(
            "edgefront lab: removed a previous lab {:?} ({} namespaces, {} processes)",
            cli.prefix, stale.namespaces, stale.processes
        );
    }
    let opts = Options {
        prefix: cli.prefix.clone(),
        regions: if cli.regions == "all" {
            Vec::new()
        } else {
            cli.regions
                .split(',')
                .map(|s| s.trim().to_owned())
                .collect()
        },
        bin_dir: edgefront_tests::bin_dir(),
        origin_failover: !cli.single_primary,
    };
    println!(
        "edgefront lab {:?}: network namespaces, backbone delay links, BIRD…",
        cli.prefix
    );
    let net = netlab::build(&opts, &regions)?;
    let mut state = net.state.clone();
    // From here this thread, and every thread and process it starts, is on
    // the origin host, like an operator's shell there.
    lab::enter_netns(&state.core_ns)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(netlab::wait_bgp(&state, Duration::from_secs(20)))?;
    println!(
        "edgefront lab: BGP up after {:.1}s; PostgreSQL primary and origin on the origin host {CORE_IP}…",
        t0.elapsed().as_secs_f64()
    );
    let dir = state.dir.clone();
    let mut primary_conf = net.file("core", "postgresql.conf")?.text.clone();
    if cli.durable {
        // Appended last, so these win over the lab's fast settings.
        primary_conf.push_str(
            "\n# edgefront-lab --durable: production durability\n\
             fsync = on\nfull_page_writes = on\nsynchronous_commit = on\n",
        );
    }
    // The internal CA, as ansible makes it (edge-ctl pki): the origin's
    // internal listener and one client certificate per region node.
    let pki_dir = dir.join("pki");
    {
        use edgefront_certs::pki::{InternalCa, Usage};
        let ca = InternalCa::open_or_create(&pki_dir)?;
        ca.ensure(
            "origin",
            "origin",
            &labdb::origin_names(CORE_IP),
            Usage::Server,
        )?;
        if net.failover.is_some() {
            ca.ensure(
                "origin-core2",
                "origin-core2",
                &labdb::origin_names(CORE2_IP),
                Usage::Server,
            )?;
        }
        ca.ensure("operator", "operator", &[], Usage::Client)?;
        for r in &state.regions {
            ca.ensure(&r.code, &r.code, &[], Usage::Client)?;
        }
    }
    // One primary, or a Patroni cluster whose regional members are the
    // replicas (started here too).
    let (primary, mut cluster) = match &net.failover {
        None => (
            Some(Postgres::primary_at(PgPlace {
                netns: Some(&state.core_ns),
                host: Some(&CORE_IP.to_string()),
                parent: Some(&dir),
                extra_conf: Some(&primary_conf),
                pki: Some(&pki_dir),
            })?),
            None,
        ),
        Some(plan) => {
            println!(
                "edgefront lab: etcd in 3 regions, Patroni: leader on the origin host, synchronous standby on {CORE2_IP} ({}), a replica in every region…",
                plan.standby_region
            );
            let started = labdb::start(&mut state, plan, &pki_dir)?;
            state.database = Some(started.database.clone());
            state.save()?;
            (None, Some(started))
        }
    };
    let primary_url = match (&primary, &cluster) {
        (Some(p), _) => p.url(),
        (None, Some(c)) => c.host_urls[0].1.clone(),
        (None, None) => unreachable!("one or the other"),
    };
    let secret = || {
        format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        )
    };
    let (internal_token, cert_key) = (secret(), secret());
    // One read-your-writes key for every edge: a cookie minted in one region
    // is honoured in the next one after a failover.
    let ryw_keys = format!("lab:{}", secret());
    let bins = edgefront_tests::bin_dir();
    let exe = |n: &str| bins.join(n).display().to_string();
    let log = |n: &str| dir.join("logs").join(format!("{n}.log"));
    let pki = |f: &str| pki_dir.join(f).display().to_string();
    std::fs::copy(
        pki_dir.join("ca.pem"),
        edgefront_ctl::lab::internal_ca_path(&state.prefix),
    )?;
    let internal_url = format!("https://{CORE_IP}:{}", netlab::INTERNAL_PORT);
    // An origin beside each database host: it serves writes only where its
    // database leads.
    let origin_service = |name: &str, netns: &str, ip: std::net::Ipv4Addr, db: &str, cert: &str| {
        Service {
            name: name.into(),
            region: None,
            netns: netns.into(),
            argv: vec![
                exe("origin"),
                "--listen".into(),
                format!("{ip}:8000"),
                "--database-url".into(),
                db.into(),
                "--platform-domain".into(),
                platform.clone(),
                // Ownership proofs are looked up in the lab's DNS (started below).
                "--dns-server".into(),
                format!("{CORE_IP}:8053"),
                "--tls-cert".into(),
                pki(&format!("{cert}.pem")),
                "--tls-key".into(),
                pki(&format!("{cert}.key")),
                "--internal-listen".into(),
                format!("{ip}:{}", netlab::INTERNAL_PORT),
                "--internal-ca".into(),
                pki("ca.pem"),
                "--internal-tls-cert".into(),
                pki(&format!("{cert}.pem")),
                "--internal-tls-key".into(),
                pki(&format!("{cert}.key")),
                "serve".into(),
            ],
            env: vec![
                ("EDGEFRONT_INTERNAL_TOKEN".into(), internal_token.clone()),
                ("EDGEFRONT_CERT_KEY".into(), cert_key.clone()),
                ("RUST_LOG".into(), "warn".into()),
            ],
            log: log(name),
            daemon: true,
        }
    };
    let origin = origin_service("origin", &state.core_ns, CORE_IP, &primary_url, "origin");
    origin.start()?;
    if let Some(primary) = &primary {
        // Recorded for restarts (the history checker's SIGKILL); already running.
        state.services.push(Service {
            name: "primary".into(),
            region: None,
            netns: state.core_ns.clone(),
            argv: primary.start_argv(),
            env: Vec::new(),
            log: log("primary-start"),
            daemon: false,
        });
    }
    state.services.push(origin);
    state.save()?;
    let origin_http = state.origin_client()?;
    rt.block_on(eventually(
        Duration::from_secs(30),
        "the origin",
        || async {
            origin_http
                .get(format!("{}/healthz", state.origin_url))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success())
        },
    ))?;
    if let Some(c) = &cluster {
        // The standby's origin, once the leader's has migrated: it answers
        // `/healthz` 503 (its database is in recovery) until a failover.
        let origin2 = origin_service(
            "origin-core2",
            &netlab::Names(&state.prefix).core2(),
            CORE2_IP,
            &c.host_urls[1].1,
            "origin-core2",
        );
        origin2.start()?;
        state.services.push(origin2);
        state.save()?;
    }
    let demo = Origin::seed_demo(&primary_url, &platform)?;
    let stores = demo.as_array().context("demo output")?.clone();
    // Lab CA certificates for the demo domains and the platform wildcard.
    let ca = TestCa::new()?;
    std::fs::write(&state.ca_pem, &ca.pem)?;
    let mut cert_names: Vec<String> = stores
        .iter()
        .filter_map(|s| s["domains"].as_array())
        .flatten()
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect();
    cert_names.push(format!("*.{platform}"));
    let operator = edgefront_certs::pki::Identity::in_dir(&pki_dir, "operator").client_config()?;
    rt.block_on(async {
        let internal = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .use_preconfigured_tls(operator)
            .build()?;
        for name in &cert_names {
            let (chain, key) = ca.leaf(&[name.as_str()])?;
            let r = internal
                .put(format!("{internal_url}/internal/certificates/{name}"))
                .bearer_auth(&internal_token)
                .json(&serde_json::json!({ "chain_pem": chain, "key_pem": key }))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("installing the certificate of {name}: {}", r.status());
            }
        }
        Ok(())
    })?;

    // pebble (the ACME CA) on the origin host; its DNS answers every name
    // with the anycast address, so HTTP-01 validation reaches the nearest
    // region like a real CA's would.
    let pebble_dir = dir.join("pebble");
    edgefront_tests::pebble_files(&pebble_dir, CORE_IP.into())?;
    for svc in [
        Service {
            name: "challtestsrv".into(),
            region: None,
            netns: state.core_ns.clone(),
            argv: std::iter::once("pebble-challtestsrv".to_owned())
                .chain(edgefront_tests::Dns::args(
                    (CORE_IP, 8053).into(),
                    state.anycast,
                    (CORE_IP, 8055).into(),
                ))
                .collect(),
            env: Vec::new(),
            log: log("challtestsrv"),
            daemon: true,
        },
        Service {
            name: "pebble".into(),
            region: None,
            netns: state.core_ns.clone(),
            argv: vec![
                "pebble".into(),
                "-config".into(),
                pebble_dir.join("pebble.json").display().to_string(),
                "-dnsserver".into(),
                format!("{CORE_IP}:8053"),
            ],
            env: vec![("PEBBLE_VA_NOSLEEP".into(), "1".into())],
            log: log("pebble"),
            daemon: true,
        },
    ] {
        svc.start()?;
        state.services.push(svc);
    }
    rt.block_on(eventually(Duration::from_secs(15), "pebble", || async {
        std::net::TcpStream::connect((CORE_IP, edgefront_tests::PEBBLE_ACME_PORT)).ok()
    }))?;
    // The demo stores' domains were attached by the operator (`origin demo`);
    // their proofs are published too, so re-checks keep them active.
    rt.block_on(eventually(
        Duration::from_secs(15),
        "the lab DNS",
        || async { std::net::TcpStream::connect((CORE_IP, 8055)).ok() },
    ))?;
    rt.block_on(async {
        let pool = sqlx::PgPool::connect(&primary_url).await?;
        let claims: Vec<(String, String)> =
            sqlx::query_as("SELECT hostname, token FROM domain_claims")
                .fetch_all(&pool)
                .await?;
        pool.close().await;
        for (host, token) in claims {
            edgefront_tests::dns_set_txt(
                &state.dns_url,
                &format!("_edgefront.{host}"),
                &format!("edgefront-verify={token}"),
            )
            .await?;
        }
        anyhow::Ok(())
    })?;
    // Without failover, a streaming replica per region now (with it, the
    // cluster's regional members already stream).
    let replicas: Vec<Postgres> = match &primary {
        None => Vec::new(),
        Some(primary) => {
            println!(
                "edgefront lab: streaming replicas for {} regions…",
                state.regions.len()
            );
            start_replicas(&state, &net, primary, &dir, &pki_dir)?
        }
    };
    for (r, pg) in state.regions.clone().iter().zip(&replicas) {
        // Recorded for restarts (a drill's hard kill); already running.
        state.services.push(Service {
            name: format!("replica-{}", r.code),
            region: Some(r.code.clone()),
            netns: r.node_ns.clone(),
            argv: pg.start_argv(),
            env: Vec::new(),
            log: log(&format!("replica-{}-start", r.code)),
            daemon: false,
        });
    }
    for r in state.regions.clone().iter() {
        let replica_url =
            edgefront_tests::pg_url(&r.node_ip.to_string(), 5432, &pki_dir.join("ca.pem"));
        let host = format!("node-{}", r.code);
        // The edge's secrets, one file each, as ansible writes them: read at
        // every start, so a reload picks up a rotated one.
        let secrets = netlab::edge_secrets_dir(&dir, &r.code);
        std::fs::create_dir_all(&secrets)?;
        for (key, value) in [
            ("cert_key", &cert_key),
            ("ryw_keys", &ryw_keys),
            ("admin_token", &r.token),
            ("internal_token", &internal_token),
        ] {
            lab::write_private(&secrets.join(key), format!("{value}\n").as_bytes())?;
        }
        let edge = Service {
            name: format!("edge-{}", r.code),
            region: Some(r.code.clone()),
            netns: r.node_ns.clone(),
            argv: vec![
                exe("edge"),
                "--config".into(),
                net.path(&host, "edge.toml").display().to_string(),
            ],
            env: vec![("RUST_LOG".into(), "warn".into())],
            log: log(&format!("edge-{}", r.code)),
            daemon: true,
        };
        if replica_url
            != net
                .file(&host, "health.toml")
                .map(|f| netlab::toml_string(&f.text, "replica_url").unwrap_or_default())?
        {
            bail!(
                "{}: the rendered replica URL differs from the replica's",
                r.code
            );
        }
        // Its settings from the rendered health.toml, its tokens from the
        // environment (production reads them from files: secrets_dir).
        let mut env = vec![("EDGEFRONT_ADMIN_TOKEN".to_owned(), r.token.clone())];
        // The hooks read each other's status with the lab-wide read-only token.
        env.push(("EDGEFRONT_STATUS_TOKEN".into(), state.token.clone()));
        env.push(("RUST_LOG".into(), "info".into()));
        let health = Service {
            name: format!("health-{}", r.code),
            region: Some(r.code.clone()),
            netns: r.node_ns.clone(),
            argv: vec![
                exe("edgefront-health"),
                "--config".into(),
                net.path(&host, "health.toml").display().to_string(),
            ],
            env,
            log: log(&format!("health-{}", r.code)),
            daemon: true,
        };
        for svc in [edge, health] {
            svc.start()?;
            state.services.push(svc);
        }
    }
    state.save()?;
    println!(
        "edgefront lab: edges and health hooks started; waiting for every region to announce…"
    );
    if let Some(c) = &mut cluster {
        c.wait_ready()?;
        rt.block_on(eventually(
            Duration::from_secs(30),
            "the standby host's origin",
            || async {
                origin_http
                    .get(format!("https://{CORE2_IP}:8000/healthz"))
                    .send()
                    .await
                    .ok()
            },
        ))?;
    }
    rt.block_on(wait_announced(&state))?;
    rt.block_on(wait_cities_home(&state, &regions))?;
    println!(
        "edgefront lab {:?}: up in {:.1}s ({} regions, {} backbone links)\n",
        state.prefix,
        t0.elapsed().as_secs_f64(),
        state.regions.len(),
        state.services[0].argv.len() - 1
    );
    let pebble_root = dir.join("pebble-root.pem");
    std::fs::write(
        &pebble_root,
        edgefront_tests::pebble_issuing_root(
            &format!("{CORE_IP}:{}", edgefront_tests::PEBBLE_MANAGEMENT_PORT),
            &dir.join("pebble").join("listener-ca.pem"),
        )?,
    )?;
    std::fs::write(
        edgefront_ctl::lab::shop_ca_path(&state.prefix),
        [std::fs::read(&state.ca_pem)?, std::fs::read(&pebble_root)?].concat(),
    )?;
    print_guide(&state, &stores, &platform);
    println!(
        "\nCertificates on first sight (pebble, HTTP-01 through the anycast address): claim a\n\
         domain with the seller API (POST /api/domains), publish the TXT record it names in the\n\
         lab DNS\n  curl -s {}/set-txt -d '{{\"host\":\"_edgefront.<domain>.\",\"value\":\"edgefront-verify=<token>\"}}'\n\
         verify it (POST /api/domains/<domain>/verify: state becomes active), then\n  ip netns exec {} curl -s --cacert {} --resolve <domain>:443:{} https://<domain>/",
        state.dns_url,
        state.regions[0].city_ns,
        pebble_root.display(),
        state.anycast
    );

    if cli.smoke {
        rt.block_on(smoke(&state, &platform, &pebble_root))?;
        let r = lab::down(&state.prefix)?;
        println!(
            "\nedgefront lab: smoke check passed; removed {} namespaces, {} processes",
            r.namespaces, r.processes
        );
        drop(replicas);
        drop(primary);
        return Ok(());
    }
    if cli.detach {
        // The servers outlive this process; their data dirs stay with the lab.
        std::mem::forget(replicas);
        std::mem::forget(primary);
        println!(
            "\nDetached. Remove it with: edge-ctl lab down --prefix {}",
            state.prefix
        );
        return Ok(());
    }
    println!("\nPress Ctrl-C to stop; everything started here is removed.");
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, anyhow::Error>(())
    })?;
    println!("edgefront lab: stopping");
    let r = lab::down(&state.prefix)?;
    println!(
        "edgefront lab: removed {} namespaces, {} processes",
        r.namespaces, r.processes
    );
    std::mem::forget(replicas);
    std::mem::forget(primary);
    Ok(())
}

async fn wait_announced(state: &LabState) -> Result<()> {
    let c = state.admin_client()?;
    for r in &state.regions {
        eventually(
            Duration::from_secs(40),
            &format!("{} to announce the anycast route", r.code),
            || async { c.status(&r.health_url).await.ok().filter(|s| s.announced) },
        )
        .await?;
    }
    Ok(())
}

/// Every shopper city lands on its nearest region (by geography).
async fn wait_cities_home(state: &LabState, regions: &edgefront_regions::Regions) -> Result<()> {
    for r in &state.regions {
        let here = regions.get(&r.code)?.coord;
        let nearest = regions
            .by_distance_from(here)
            .into_iter()
            .map(|(x, _)| x.id.as_str().to_owned())
            .find(|code| state.regions.iter().any(|l| &l.code == code))
            .context("no region")?;
        let got = eventually(
            Duration::from_secs(20),
            &format!("{} shoppers to reach {nearest}", r.city),
            || async {
                let p = netlab::city_get(state, &r.city_ns, "/").ok()?.ok()?;
                (p.status == 200 && p.region.as_deref() == Some(nearest.as_str())).then_some(p)
            },
        )
        .await?;
        println!(
            "  {:<12} → {} (x-edge-route), {:.1} ms",
            r.city,
            nearest,
            got.total.as_secs_f64() * 1e3
        );
    }
    Ok(())
}

/// A streaming replica of `primary` on every region node, started at once.
fn start_replicas(
    state: &LabState,
    net: &netlab::Net,
    primary: &Postgres,
    dir: &std::path::Path,
    pki_dir: &std::path::Path,
) -> Result<Vec<Postgres>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = state
            .regions
            .iter()
            .map(|r| {
                let conf = net
                    .file(&format!("node-{}", r.code), "postgresql.conf")
                    .map(|f| f.text.clone());
                s.spawn(move || {
                    primary.replica_at(
                        &r.code,
                        PgPlace {
                            netns: Some(&r.node_ns),
                            host: Some(&r.node_ip.to_string()),
                            parent: Some(dir),
                            extra_conf: Some(&conf?),
                            pki: Some(pki_dir),
                        },
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("replica thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })
}

fn print_guide(state: &LabState, stores: &[serde_json::Value], platform: &str) {
    let any = state.anycast;
    let first = &state.regions[0];
    println!("Shop from a city (each namespace is a shopper there; one anycast address {any}):");
    let ca = edgefront_ctl::lab::shop_ca_path(&state.prefix);
    let ca = ca.display();
    for r in state.regions.iter().take(3) {
        println!(
            "  ip netns exec {} curl -si --cacert {ca} --resolve spiceroute.example:443:{any} https://spiceroute.example/ | grep -i x-edge-route",
            r.city_ns
        );
    }
    println!(
        "  ip netns exec {} curl -si -H 'host: spiceroute.example' http://{any}/ | grep -iE '^(HTTP|location)'   # plain HTTP: 301 to https",
        first.city_ns,
    );
    for s in stores.iter().take(3) {
        let slug = s["slug"].as_str().unwrap_or("");
        println!(
            "  ip netns exec {} curl -s --cacert {ca} --resolve {slug}.{platform}:443:{any} https://{slug}.{platform}/ | head -3",
            first.city_ns
        );
    }
    let p = if state.prefix == lab::DEFAULT_PREFIX {
        String::new()
    } else {
        format!(" --lab {}", state.prefix)
    };
    println!("\nOperate it (as root; edge-ctl finds this lab by its prefix):");
    println!("  target/release/edge-ctl{p} status");
    println!("  target/release/edge-ctl{p} drain {}", first.code);
    println!("  target/release/edge-ctl{p} undrain {}", first.code);
    println!(
        "  target/release/edge-ctl{p} drill {} --mode kill",
        first.code
    );
    if state.database.is_some() {
        println!(
            "  target/release/edge-ctl{p} drill origin --mode kill        # power off the database leader's host"
        );
        println!("  target/release/edge-ctl{p} drill origin --mode switchover");
    }
    println!(
        "  target/release/edge-ctl lab down{}",
        if p.is_empty() {
            String::new()
        } else {
            format!(" --prefix {}", state.prefix)
        }
    );
    println!("\nLogs: {}/logs", state.dir.display());
}

async fn smoke(state: &LabState, platform: &str, pebble_root: &std::path::Path) -> Result<()> {
    // A write from Mumbai through the anycast address, then visible from every city.
    let mumbai = &state.regions[0];
    let body = r#"{"name":"Smoke Test","slug":"smoke-test","currency":"EUR"}"#;
    let any = state.anycast;
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &mumbai.city_ns,
            "curl",
            "-s",
            "-w",
            "\n%{http_code}",
        ])
        .args([
            "--max-time",
            "5",
            "-H",
            "content-type: application/json",
            "-d",
            body,
        ])
        .arg(format!("http://{any}/api/stores"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    if code != "201" {
        bail!("smoke: store creation through the anycast address answered {text:?}");
    }
    let token = serde_json::from_str::<serde_json::Value>(json)?["token"]
        .as_str()
        .context("store token")?
        .to_owned();
    for r in &state.regions {
        let host = format!("smoke-test.{platform}");
        eventually(
            Duration::from_secs(30),
            &format!("the new store in {}", r.code),
            || async {
                let p = netlab::city_get_host(state, &r.city_ns, &host, "/")
                    .ok()?
                    .ok()?;
                (p.status == 200).then_some(())
            },
        )
        .await?;
    }
    for r in &state.regions {
        let (_, code) = edgefront_tests::curl_https(
            Some(&r.city_ns),
            &state.ca_pem,
            "spiceroute.example",
            any.into(),
            443,
            5,
        )?;
        if code != "200" {
            bail!("smoke: https from {} answered {code:?}", r.city);
        }
        // Plain HTTP goes to https (the name has a certificate), with the
        // path kept, from every city's own region.
        let host = state.demo_host.clone();
        let p = netlab::in_netns(&r.city_ns, move || {
            edgefront_ctl::probe::get(
                (any, 80).into(),
                &host,
                "/?from=http",
                Duration::from_secs(2),
            )
        })??;
        let want = format!("https://{}/?from=http", state.demo_host);
        if p.status != 301 || p.location.as_deref() != Some(want.as_str()) {
            bail!(
                "smoke: plain HTTP from {} answered {} (location {:?}), not a redirect to {want}",
                r.city,
                p.status,
                p.location
            );
        }
    }
    // A new custom domain gets its certificate on first sight, from pebble,
    // validated over HTTP-01 through the anycast address.
    // It is claimed, proven in the lab's DNS, then verified.
    let domain = "smoke-shop.example";
    let r = state
        .origin_client()?
        .post(format!("{}/api/domains", state.origin_url))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "hostname": domain }))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("smoke: adding {domain} answered {}", r.status());
    }
    let claim: serde_json::Value = r.json().await?;
    edgefront_tests::dns_set_txt(
        &state.dns_url,
        claim["domain"]["record"]["name"]
            .as_str()
            .unwrap_or_default(),
        claim["domain"]["record"]["value"]
            .as_str()
            .unwrap_or_default(),
    )
    .await?;
    let v: serde_json::Value = state
        .origin_client()?
        .post(format!("{}/api/domains/{domain}/verify", state.origin_url))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    if v["domain"]["state"] != "active" {
        bail!("smoke: {domain} not active after its proof: {v}");
    }
    let ams = state.region("ams1").unwrap_or(mumbai);
    // The domain reaches the region's replica within milliseconds; the
    // first handshake then waits for the issuance.
    eventually(
        Duration::from_secs(40),
        &format!("a pebble certificate for {domain}"),
        || async {
            let (_, code) = edgefront_tests::curl_https(
                Some(&ams.city_ns),
                pebble_root,
                domain,
                any.into(),
                443,
                30,
            )
            .ok()?;
            (code == "200").then_some(())
        },
    )
    .await?;
    println!(
        "edgefront lab: smoke: a write from {} reached all {} regions; https answered in every city and plain HTTP was redirected to it; {domain} got a pebble certificate on first sight in {}",
        mumbai.city,
        state.regions.len(),
        ams.code
    );
    Ok(())
}
