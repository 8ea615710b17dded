//! The health hook's decision loop.
//!
//! Every `interval` it probes the edge (`/healthz` on its admin listener)
//! and the replica (its own connection, so a wedged edge cannot hide a dead
//! replica; lag measured by `edgefront-lag`), sorts what failed into hard and
//! soft reasons, applies hysteresis to each (`rise` good probes to recover,
//! `fall` bad ones to fail), advances a drain in progress, and drives BIRD
//! with what [`decision::decide`](crate::decision::decide) says: hard
//! failures and drains withdraw, lag withdraws only while enough other
//! regions are fine (their hooks are read every `peer_interval`, see
//! [`peers`](crate::peers)). The desired state is re-sent every `reapply`, so
//! a restarted BIRD (which starts with the protocol disabled) is brought back
//! to it, and never re-announces a drained region. Drain state is a file, so
//! it survives restarts of this daemon and of BIRD.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgefront_lag::{Budget, Lag, Tracker};
use serde::{Deserialize, Serialize};

use crate::bird::Bird;
use crate::conns;
use crate::decision::{Hysteresis, Own, PeerView};
use crate::peers::Peer;

/// Daemon settings (flags).
#[derive(Debug, Clone)]
pub struct Settings {
    pub region: String,
    /// Base URL of the edge's admin listener.
    pub edge_admin: String,
    /// The tokens at start (`Daemon::tokens` holds those in use).
    pub tokens: crate::secrets::Tokens,
    pub replica_url: String,
    /// Replica lag past which the region is lagging (a soft reason).
    pub budget: Budget,
    /// Other regions' hooks.
    pub peers: Vec<Peer>,
    /// Lag withdraws only while at least this many other regions are fine.
    pub min_peers: usize,
    /// How often the peers are read.
    pub peer_interval: Duration,
    /// How long one read of a peer may take.
    pub peer_timeout: Duration,
    pub bird_socket: PathBuf,
    pub protocol: String,
    pub state_file: PathBuf,
    pub interval: Duration,
    pub rise: u32,
    pub fall: u32,
    pub reapply: Duration,
    /// Longest wait for keep-alive connections to close before withdrawing.
    pub drain_grace: Duration,
    /// Longest wait for the region to go idle after withdrawing.
    pub drain_timeout: Duration,
    /// The edge's public ports (connections counted for drain progress).
    pub edge_ports: Vec<u16>,
    /// Second-chance forwarding to the next-nearest region after an
    /// announce ([`steer`](crate::steer)); off when `None`.
    pub second_chance: Option<crate::steer::Settings>,
    /// The liveness device: a TUN interface this process opens before its
    /// first announce and holds until it exits. BIRD's anycast route goes
    /// `via` it, so when this process dies — crash, SIGKILL, OOM — the kernel
    /// removes the interface and BIRD withdraws the route at once, whatever
    /// the protocol's state. `None`: no device (BIRD's route must then not
    /// depend on one).
    pub liveness_device: Option<String>,
}

/// The drain phases, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Keep-alive off; waiting for open connections to finish. Still announced.
    Closing,
    /// Route withdrawn; waiting for the last requests.
    Withdrawn,
    /// Withdrawn and idle.
    Drained,
}

#[derive(Debug, Clone)]
struct Drain {
    since_unix: u64,
    phase: Phase,
    started: Instant,
    initial: HashSet<u64>,
    phase_started: Instant,
}

/// What the edge's `/healthz` says (the fields the hook uses).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EdgeHealth {
    #[serde(default)]
    pub healthy: bool,
    #[serde(default)]
    pub reasons: Vec<String>,
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub requests_in_flight: i64,
    #[serde(default)]
    pub requests_total: u64,
    #[serde(default)]
    pub cache_hits: u64,
    #[serde(default)]
    pub cache_lookups: u64,
    #[serde(default)]
    pub certificates: f64,
    /// The replica is over the edge's lag budget.
    #[serde(default)]
    pub lagging: bool,
    /// A reason other than lag (an edge too old to say counts as broken).
    #[serde(default = "yes")]
    pub broken: bool,
}

fn yes() -> bool {
    true
}

impl EdgeHealth {
    /// Unhealthy for replica lag only (a soft reason).
    pub fn lag_only(&self) -> bool {
        !self.healthy && self.lagging && !self.broken
    }
}

/// One protocol as BIRD reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BirdProtocol {
    pub name: String,
    pub state: String,
    pub info: String,
}

/// A notable change, kept for `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub at_unix_ms: u64,
    pub what: String,
}

/// Everything `edge-ctl status` shows about a region.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub region: String,
    /// BIRD is exporting the anycast route on an established session.
    pub announced: bool,
    /// What this daemon wants BIRD to do.
    pub desired_announce: bool,
    /// After hysteresis (hard and soft).
    pub healthy: bool,
    /// Why the last probe failed (empty when it passed).
    pub reasons: Vec<String>,
    /// The last probe failed for replica lag only (soft reasons).
    #[serde(default)]
    pub lag_only: bool,
    /// Past half of a lag budget (peers read this, see `decision`).
    #[serde(default)]
    pub lag_warning: bool,
    /// Lagging, but too few other regions are fine to take the shoppers:
    /// staying announced (the alert).
    #[serde(default)]
    pub withdraw_suppressed: bool,
    /// Other regions announced and fine, as last read.
    #[serde(default)]
    pub fine_peers: usize,
    /// How many must be fine for lag to withdraw.
    #[serde(default)]
    pub min_peers: usize,
    #[serde(default)]
    pub peers: Vec<PeerView>,
    /// Milliseconds since this hook's last probe (a stalled loop shows here).
    #[serde(default)]
    pub last_probe_age_ms: Option<u64>,
    pub drained: bool,
    pub drain_phase: Option<Phase>,
    pub drain_since_unix: Option<u64>,
    pub drain_seconds: Option<f64>,
    /// Connections open when the drain began that are still open.
    pub drain_connections_remaining: usize,
    /// How long the oldest unreplayed WAL has waited (not the age of the
    /// last replayed commit).
    pub replica_lag_seconds: Option<f64>,
    /// WAL known to exist but not replayed.
    #[serde(default)]
    pub replica_lag_bytes: Option<u64>,
    /// Seconds since the last message from the primary.
    #[serde(default)]
    pub replica_silence_seconds: Option<f64>,
    #[serde(default)]
    pub replica_replay_paused: Option<bool>,
    pub edge_reachable: bool,
    pub edge: EdgeHealth,
    /// Established connections on the edge's ports.
    pub connections: usize,
    pub requests_per_second: f64,
    pub cache_hit_ratio: Option<f64>,
    pub bird_reachable: bool,
    pub bird_error: Option<String>,
    pub bird_protocols: Vec<BirdProtocol>,
    pub events: Vec<Event>,
}

#[derive(Debug)]
struct State {
    /// Hysteresis over hard reasons.
    hard: Hysteresis,
    /// Hysteresis over soft reasons (lag).
    soft: Hysteresis,
    reasons: Vec<String>,
    lag_only: bool,
    lag_warning: bool,
    suppressed: bool,
    fine_peers: usize,
    peers: Vec<PeerView>,
    last_probe: Option<Instant>,
    edge: Option<EdgeHealth>,
    tracker: Tracker,
    lag: Option<Lag>,
    drain: Option<Drain>,
    applied: Option<bool>,
    last_apply: Option<Instant>,
    bird_error: Option<String>,
    bird_protocols: Vec<BirdProtocol>,
    announced: bool,
    connections: HashSet<u64>,
    rate: f64,
    last_total: Option<(Instant, u64)>,
    events: VecDeque<Event>,
}

/// Persisted drain record.
#[derive(Debug, Serialize, Deserialize)]
struct DrainFile {
    drained: bool,
    since_unix: u64,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The health hook.
pub struct Daemon {
    pub settings: Settings,
    state: Mutex<State>,
    http: reqwest::Client,
    peer_http: reqwest::Client,
    replica: sqlx::PgPool,
    pub metrics: crate::metrics::Metrics,
    /// Second-chance forwarding, once installed.
    steer: tokio::sync::Mutex<Option<crate::steer::Steer>>,
    /// The liveness device, once open (never closed but by exiting).
    liveness: Mutex<Option<tun::Device>>,
    /// The tokens in use: [`Daemon::set_tokens`] on a reload.
    tokens: std::sync::RwLock<crate::secrets::Tokens>,
}

impl State {
    fn healthy(&self) -> bool {
        self.hard.ok() && self.soft.ok()
    }
}

impl Daemon {
    /// The tokens in use.
    pub fn tokens(&self) -> crate::secrets::Tokens {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes new tokens (a reload): the next request and call use them.
    pub fn set_tokens(&self, tokens: crate::secrets::Tokens) {
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = tokens;
    }

    /// Builds the daemon; a drain recorded in the state file is resumed as
    /// drained (withdrawn), so a restart never re-announces a drained region.
    pub fn new(settings: Settings) -> anyhow::Result<Daemon> {
        let drain = match std::fs::read(&settings.state_file) {
            Ok(bytes) => {
                let f: DrainFile = serde_json::from_slice(&bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: not a drain record ({e}); fix or remove it",
                        settings.state_file.display()
                    )
                })?;
                f.drained.then(|| Drain {
                    since_unix: f.since_unix,
                    phase: Phase::Drained,
                    started: Instant::now(),
                    initial: HashSet::new(),
                    phase_started: Instant::now(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => anyhow::bail!("{}: {e}", settings.state_file.display()),
        };
        let replica = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(1))
            .connect_lazy(&settings.replica_url)
            .map_err(|e| anyhow::anyhow!("replica_url: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .pool_max_idle_per_host(1)
            .build()?;
        let peer_http = reqwest::Client::builder()
            .timeout(settings.peer_timeout)
            .connect_timeout(settings.peer_timeout)
            .pool_max_idle_per_host(1)
            .build()?;
        let peers = settings
            .peers
            .iter()
            .map(|p| PeerView::unreachable(&p.region, "not read yet".into()))
            .collect();
        let metrics = crate::metrics::Metrics::new(&settings.region)?;
        let mut events = VecDeque::new();
        if drain.is_some() {
            events.push_back(Event {
                at_unix_ms: now_unix_ms(),
                what: "started drained (state file): staying withdrawn".into(),
            });
        }
        Ok(Daemon {
            steer: tokio::sync::Mutex::new(None),
            liveness: Mutex::new(None),
            tokens: std::sync::RwLock::new(settings.tokens.clone()),
            settings,
            state: Mutex::new(State {
                hard: Hysteresis::new(),
                soft: Hysteresis::new(),
                reasons: vec!["starting".into()],
                lag_only: false,
                lag_warning: false,
                suppressed: false,
                fine_peers: 0,
                peers,
                last_probe: None,
                edge: None,
                tracker: Tracker::default(),
                lag: None,
                drain,
                applied: None,
                last_apply: None,
                bird_error: None,
                bird_protocols: Vec::new(),
                announced: false,
                connections: HashSet::new(),
                rate: 0.0,
                last_total: None,
                events,
            }),
            http,
            peer_http,
            replica,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn event(st: &mut State, what: String) {
        tracing::info!(event = %what);
        st.events.push_back(Event {
            at_unix_ms: now_unix_ms(),
            what,
        });
        while st.events.len() > 30 {
            st.events.pop_front();
        }
    }

    /// Runs the probe loop and the peer loop forever.
    pub async fn run(&self) {
        if let Some(sc) = self.settings.second_chance.clone() {
            let peer = sc.peer;
            match tokio::task::spawn_blocking(move || crate::steer::Steer::install(sc)).await {
                Ok(Ok(steer)) => {
                    *self.steer.lock().await = Some(steer);
                    let mut st = self.lock();
                    Self::event(
                        &mut st,
                        format!("second chance: unknown flows go to {peer} after an announce"),
                    );
                }
                failed => {
                    let e = match failed {
                        Ok(Err(e)) => e,
                        Err(e) => e.to_string(),
                        Ok(Ok(_)) => unreachable!("matched above"),
                    };
                    tracing::error!(error = %e, "second chance could not be installed: returning shoppers' connections elsewhere will be reset");
                    let mut st = self.lock();
                    Self::event(&mut st, format!("second chance not installed: {e}"));
                }
            }
        }
        tokio::join!(self.probe_loop(), self.peer_loop());
    }

    async fn probe_loop(&self) {
        let mut bird: Option<Bird> = None;
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.tick(&mut bird).await;
        }
    }

    /// Reads every peer, all at once, every `peer_interval` (a round lasts
    /// at most `peer_timeout`).
    async fn peer_loop(&self) {
        if self.settings.peers.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(self.settings.peer_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut reads = tokio::task::JoinSet::new();
            for (i, peer) in self.settings.peers.iter().enumerate() {
                let (http, peer, token) = (
                    self.peer_http.clone(),
                    peer.clone(),
                    self.tokens().for_peers().to_owned(),
                );
                reads.spawn(async move { (i, crate::peers::read(&http, &peer, &token).await) });
            }
            while let Some(done) = reads.join_next().await {
                let Ok((i, view)) = done else { continue };
                let mut st = self.lock();
                if let Some(slot) = st.peers.get_mut(i) {
                    *slot = view;
                }
            }
        }
    }

    async fn probe_edge(&self) -> Result<EdgeHealth, String> {
        let r = self
            .http
            .get(format!("{}/healthz", self.settings.edge_admin))
            .send()
            .await
            .map_err(|e| format!("edge_down: {}", short(&e)))?;
        r.json::<EdgeHealth>()
            .await
            .map_err(|e| format!("edge_down: unreadable /healthz: {e}"))
    }

    async fn probe_replica(&self) -> Result<Lag, String> {
        let q = edgefront_lag::sample(&self.replica);
        match tokio::time::timeout(Duration::from_secs(1), q).await {
            Err(_) => Err("replica_unreachable: timed out after 1s".into()),
            Ok(Err(e)) => Err(format!("replica_unreachable: {}", short(&e))),
            Ok(Ok(s)) if !s.in_recovery => {
                Err("replica_not_in_recovery: promoted or not a replica".into())
            }
            Ok(Ok(s)) => Ok(self.lock().tracker.observe(&s, Instant::now())),
        }
    }

    async fn tell_edge(&self, draining: bool) -> Result<(), String> {
        let path = if draining { "drain" } else { "undrain" };
        let r = self
            .http
            .post(format!("{}/{path}", self.settings.edge_admin))
            .bearer_auth(&self.tokens().admin)
            .send()
            .await
            .map_err(|e| short(&e))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("edge answered {} to /{path}", r.status()))
        }
    }

    /// One probe-decide-apply round.
    pub async fn tick(&self, bird: &mut Option<Bird>) {
        let (edge, replica) = tokio::join!(self.probe_edge(), self.probe_replica());
        let live = conns::established(&self.settings.edge_ports);
        let s = &self.settings;
        let (desired, reapply, edge_should_drain, edge_draining) = {
            let mut st = self.lock();
            // Hard: this region's own failures. Soft: lag, which every
            // region may be seeing at once (see `decision`).
            let (mut hard, mut soft) = (Vec::new(), Vec::new());
            match &edge {
                Ok(h) if h.healthy => {}
                Ok(h) if h.lag_only() => {
                    soft.extend(h.reasons.iter().map(|r| format!("edge: {r}")));
                }
                Ok(h) => hard.extend(h.reasons.iter().map(|r| format!("edge: {r}"))),
                Err(e) => hard.push(e.clone()),
            }
            match &replica {
                Ok(lag) => soft.extend(s.budget.exceeded(lag)),
                Err(e) => hard.push(e.clone()),
            }
            st.lag_warning = replica.as_ref().is_ok_and(|l| s.budget.half_spent(l))
                || edge.as_ref().is_ok_and(|h| h.lagging);
            st.lag = replica.as_ref().ok().cloned();
            st.last_probe = Some(Instant::now());
            let was = st.healthy();
            st.hard.record(hard.is_empty(), s.rise, s.fall);
            st.soft.record(soft.is_empty(), s.rise, s.fall);
            st.lag_only = hard.is_empty() && !soft.is_empty();
            let reasons: Vec<String> = hard.into_iter().chain(soft).collect();
            match (was, st.healthy()) {
                (false, true) => {
                    Self::event(&mut st, format!("healthy after {} good probes", s.rise));
                }
                (true, false) => Self::event(&mut st, format!("unhealthy: {}", reasons.join("; "))),
                _ => {}
            }
            let verdict = crate::decision::decide(
                Own {
                    hard_ok: st.hard.ok(),
                    soft_ok: st.soft.ok(),
                },
                &st.peers,
                s.min_peers,
            );
            // A drained region is withdrawn anyway: nothing is suppressed.
            let suppressed = verdict.suppressed && st.drain.is_none();
            if suppressed != st.suppressed {
                let what = if suppressed {
                    self.metrics.withdraw_suppressions.inc();
                    tracing::warn!(
                        region = %s.region,
                        fine_peers = verdict.fine_peers,
                        min_peers = s.min_peers,
                        reasons = %reasons.join("; "),
                        "withdraw suppressed: replica lag, but too few other regions are fine; staying announced"
                    );
                    format!(
                        "withdraw suppressed (alert): lagging ({}) but only {} of {} other regions are announced and fine, {} needed; staying announced and serving",
                        reasons.join("; "),
                        verdict.fine_peers,
                        st.peers.len(),
                        s.min_peers
                    )
                } else if !st.hard.ok() {
                    "withdraw no longer suppressed: a hard failure withdraws".to_owned()
                } else if st.soft.ok() {
                    "withdraw no longer suppressed: lag back within budget".to_owned()
                } else {
                    format!(
                        "withdraw no longer suppressed: {} other regions are fine now, withdrawing for lag",
                        verdict.fine_peers
                    )
                };
                Self::event(&mut st, what);
            }
            st.suppressed = suppressed;
            st.fine_peers = verdict.fine_peers;
            st.reasons = reasons;
            if let Ok(h) = &edge {
                let now = Instant::now();
                if let Some((t, n)) = st.last_total {
                    let dt = now.duration_since(t).as_secs_f64();
                    if dt > 0.0 {
                        let inst = h.requests_total.saturating_sub(n) as f64 / dt;
                        // Smoothed over about a second.
                        let a = (dt / 1.0).min(1.0);
                        st.rate = st.rate * (1.0 - a) + inst * a;
                    }
                }
                st.last_total = Some((now, h.requests_total));
            }
            st.edge = edge.as_ref().ok().cloned();
            // Drain progress.
            let in_flight = st.edge.as_ref().map_or(0, |e| e.requests_in_flight);
            if let Some(d) = st.drain.as_mut() {
                let remaining = d.initial.intersection(&live).count();
                let next = match d.phase {
                    Phase::Closing
                        if remaining == 0 || d.phase_started.elapsed() >= s.drain_grace =>
                    {
                        Some((
                            Phase::Withdrawn,
                            format!(
                                "drain: {} keep-alive connection(s) still open, withdrawing",
                                remaining
                            ),
                        ))
                    }
                    // The admin request that reads this status is itself in flight.
                    Phase::Withdrawn
                        if (live.is_empty() && in_flight <= 1)
                            || d.phase_started.elapsed() >= s.drain_timeout =>
                    {
                        Some((
                            Phase::Drained,
                            format!(
                                "drain: idle after {:.1}s ({} connection(s) left)",
                                d.started.elapsed().as_secs_f64(),
                                live.len()
                            ),
                        ))
                    }
                    _ => None,
                };
                if let Some((phase, what)) = next {
                    d.phase = phase;
                    d.phase_started = Instant::now();
                    Self::event(&mut st, what);
                }
            }
            st.connections = live;
            let desired =
                verdict.announce && st.drain.as_ref().is_none_or(|d| d.phase == Phase::Closing);
            let reapply = st.applied != Some(desired)
                || st.last_apply.is_none_or(|t| t.elapsed() >= s.reapply);
            (
                desired,
                reapply,
                st.drain.is_some(),
                st.edge.as_ref().map(|e| e.draining),
            )
        };
        // Keep the edge's keep-alive switch in line with the drain state
        // (an edge restarted mid-drain starts with keep-alive on).
        if let Some(d) = edge_draining
            && d != edge_should_drain
            && let Err(e) = self.tell_edge(edge_should_drain).await
        {
            tracing::warn!(error = %e, "could not set the edge's drain state");
        }
        if reapply {
            self.apply(bird, desired).await;
        }
        self.update_metrics();
    }

    async fn apply(&self, bird: &mut Option<Bird>, desired: bool) {
        let s = &self.settings;
        let result = async {
            if bird.is_none() {
                *bird = Some(Bird::connect(&s.bird_socket, Duration::from_secs(1)).await?);
            }
            let Some(b) = bird.as_mut() else {
                unreachable!("connected above")
            };
            if desired != (self.lock().applied == Some(true)) {
                self.second_chance(b, desired).await;
            }
            if desired {
                self.open_liveness_device();
            }
            let changed = b.set_protocol(&s.protocol, desired).await?;
            let protocols = b.protocols().await?;
            Ok::<_, crate::bird::BirdError>((changed, protocols))
        }
        .await;
        let mut st = self.lock();
        match result {
            Ok((changed, protocols)) => {
                if changed || st.applied != Some(desired) {
                    let what = if desired { "announce" } else { "withdraw" };
                    Self::event(
                        &mut st,
                        format!(
                            "{what}: {} {}{}",
                            if desired { "enable" } else { "disable" },
                            s.protocol,
                            if changed {
                                ""
                            } else {
                                " (BIRD already had it)"
                            }
                        ),
                    );
                }
                if desired && st.applied != Some(true) {
                    let marker = self.announced_marker();
                    if !marker.exists()
                        && let Err(e) = std::fs::write(&marker, b"announced\n")
                    {
                        tracing::warn!(path = %marker.display(), error = %e, "cannot record the first announce: second chance stays off after the next return");
                    }
                }
                st.applied = Some(desired);
                st.last_apply = Some(Instant::now());
                st.bird_error = None;
                let static_up = protocols
                    .iter()
                    .any(|p| p.name == s.protocol && p.state == "up");
                let session_up = protocols
                    .iter()
                    .any(|p| p.proto == "BGP" && p.info.starts_with("Established"));
                // With a liveness device, the route exists only while the
                // device does: a failed open is no announcement.
                let device_ok = self.settings.liveness_device.is_none()
                    || self
                        .liveness
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_some();
                st.announced = static_up && session_up && device_ok;
                st.bird_protocols = protocols
                    .into_iter()
                    .map(|p| BirdProtocol {
                        name: p.name,
                        state: p.state,
                        info: p.info,
                    })
                    .collect();
            }
            Err(e) => {
                *bird = None;
                if st.bird_error.is_none() {
                    Self::event(&mut st, format!("BIRD unreachable: {e}"));
                }
                st.bird_error = Some(e.to_string());
                st.applied = None;
                st.announced = false;
                self.metrics.bird_errors.inc();
            }
        }
    }

    /// Whether the route's device is there: no liveness device configured,
    /// or this process holds it open.
    fn route_device_ready(&self) -> bool {
        self.settings.liveness_device.is_none()
            || self
                .liveness
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
    }

    /// The marker of a region that has announced before (beside the drain
    /// record, so it survives restarts).
    fn announced_marker(&self) -> PathBuf {
        self.settings.state_file.with_extension("announced")
    }

    /// Opens the liveness device before the first announce (a region this
    /// process never wanted announced has no route to keep alive). A failure
    /// is reported and retried at the next announce; BIRD, whose route needs
    /// the device, stays withdrawn meanwhile: fail closed.
    fn open_liveness_device(&self) {
        let Some(name) = &self.settings.liveness_device else {
            return;
        };
        let mut dev = self.liveness.lock().unwrap_or_else(|p| p.into_inner());
        if dev.is_some() {
            return;
        }
        let mut cfg = tun::Configuration::default();
        cfg.tun_name(name).up();
        let result = tun::create(&cfg);
        let mut st = self.lock();
        match result {
            Ok(d) => {
                *dev = Some(d);
                Self::event(
                    &mut st,
                    format!("liveness device {name} open: the route lives as long as this process"),
                );
            }
            Err(e) => {
                self.metrics.bird_errors.inc();
                tracing::error!(device = %name, error = %e, "liveness device: cannot open; BIRD keeps the route withdrawn");
                Self::event(&mut st, format!("liveness device {name}: {e}"));
            }
        }
    }

    /// Before announcing a region that was away, opens the second-chance
    /// window (so the returning route finds it ready); on a withdraw, closes
    /// it. Failures are reported, never block the route.
    async fn second_chance(&self, b: &mut Bird, announcing: bool) {
        let mut steer = self.steer.lock().await;
        if steer.is_none()
            && announcing
            && let Some(sc) = self.settings.second_chance.clone()
        {
            // Not installed at start (e.g. the sysctls were not set yet):
            // try again at each announce.
            match crate::steer::Steer::install(sc) {
                Ok(s) => *steer = Some(s),
                Err(e) => {
                    let mut st = self.lock();
                    Self::event(&mut st, format!("second chance not installed: {e}"));
                    return;
                }
            }
        }
        let Some(steer) = steer.as_mut() else { return };
        let result = if announcing {
            // Only on a return: the route was not out (protocol disabled, or
            // no liveness device yet: this process has not announced), and
            // the region has announced before (a marker beside the drain
            // record). A first announce ever, or a daemon restarted under an
            // announced route, has no shoppers elsewhere to keep — and an
            // open window would send flows of a dying peer's shoppers back
            // to that peer instead of resetting them.
            let proto_up = b.protocols().await.is_ok_and(|ps| {
                ps.iter()
                    .any(|p| p.name == self.settings.protocol && p.state == "up")
            });
            let device_up = self.route_device_ready();
            let returning = self.announced_marker().exists();
            if (proto_up && device_up) || !returning {
                return;
            }
            // A few `nft` calls on a route change: brief enough to run here.
            steer.open().map(|()| "open")
        } else if steer.is_open() {
            steer.close().map(|()| "closed")
        } else {
            return;
        };
        let mut st = self.lock();
        match result {
            Ok(what) => Self::event(&mut st, format!("second chance window {what}")),
            Err(e) => Self::event(&mut st, format!("second chance: {e}")),
        }
    }

    /// Starts a drain (idempotent): records it durably, turns the edge's
    /// keep-alive off, and lets the loop withdraw once open connections have
    /// finished. Returns false when the region was already drained/draining.
    pub async fn drain(&self) -> anyhow::Result<bool> {
        let since_unix = now_unix_ms() / 1000;
        {
            let st = self.lock();
            if st.drain.is_some() {
                return Ok(false);
            }
        }
        write_atomically(
            &self.settings.state_file,
            &serde_json::to_vec(&DrainFile {
                drained: true,
                since_unix,
            })?,
        )?;
        let initial = conns::established(&self.settings.edge_ports);
        {
            let mut st = self.lock();
            let n = initial.len();
            st.drain = Some(Drain {
                since_unix,
                phase: Phase::Closing,
                started: Instant::now(),
                initial,
                phase_started: Instant::now(),
            });
            Self::event(
                &mut st,
                format!("drain requested: keep-alive off, {n} connection(s) open"),
            );
        }
        if let Err(e) = self.tell_edge(true).await {
            tracing::warn!(error = %e, "drain: the edge did not take keep-alive off; withdrawing anyway after the grace period");
        }
        Ok(true)
    }

    /// Ends a drain: removes the record and lets health decide again.
    pub async fn undrain(&self) -> anyhow::Result<bool> {
        match std::fs::remove_file(&self.settings.state_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("{}: {e}", self.settings.state_file.display()),
        }
        let was = {
            let mut st = self.lock();
            let was = st.drain.take().is_some();
            if was {
                Self::event(&mut st, "undrain requested: announcing when healthy".into());
            }
            was
        };
        if let Err(e) = self.tell_edge(false).await {
            tracing::warn!(error = %e, "undrain: could not turn the edge's keep-alive back on");
        }
        Ok(was)
    }

    /// The current status.
    pub fn status(&self) -> Status {
        let st = self.lock();
        let edge = st.edge.clone().unwrap_or_default();
        let live = &st.connections;
        Status {
            region: self.settings.region.clone(),
            announced: st.announced,
            desired_announce: st.applied.unwrap_or(false),
            healthy: st.healthy(),
            reasons: st.reasons.clone(),
            lag_only: st.lag_only,
            lag_warning: st.lag_warning,
            withdraw_suppressed: st.suppressed,
            fine_peers: st.fine_peers,
            min_peers: self.settings.min_peers,
            peers: st.peers.clone(),
            last_probe_age_ms: st.last_probe.map(|t| t.elapsed().as_millis() as u64),
            drained: st.drain.is_some(),
            drain_phase: st.drain.as_ref().map(|d| d.phase),
            drain_since_unix: st.drain.as_ref().map(|d| d.since_unix),
            drain_seconds: st.drain.as_ref().map(|d| d.started.elapsed().as_secs_f64()),
            drain_connections_remaining: st
                .drain
                .as_ref()
                .map_or(0, |d| d.initial.intersection(live).count()),
            replica_lag_seconds: st.lag.as_ref().map(|l| l.seconds),
            replica_lag_bytes: st.lag.as_ref().map(|l| l.bytes),
            replica_silence_seconds: st.lag.as_ref().and_then(|l| l.silence_seconds),
            replica_replay_paused: st.lag.as_ref().map(|l| l.replay_paused),
            edge_reachable: st.edge.is_some(),
            cache_hit_ratio: (edge.cache_lookups > 0)
                .then(|| edge.cache_hits as f64 / edge.cache_lookups as f64),
            edge,
            connections: live.len(),
            requests_per_second: st.rate,
            bird_reachable: st.bird_error.is_none() && st.applied.is_some(),
            bird_error: st.bird_error.clone(),
            bird_protocols: st.bird_protocols.clone(),
            events: st.events.iter().cloned().collect(),
        }
    }

    fn update_metrics(&self) {
        let st = self.lock();
        let m = &self.metrics;
        m.announced.set(f64::from(u8::from(st.announced)));
        m.healthy.set(f64::from(u8::from(st.healthy())));
        m.withdraw_suppressed
            .set(f64::from(u8::from(st.suppressed)));
        m.fine_peers.set(st.fine_peers as f64);
        m.set_drain(st.drain.as_ref().map(|d| d.phase));
        m.connections.set(st.connections.len() as f64);
        if let Some(l) = &st.lag {
            m.replica_lag.set(l.seconds);
            m.replica_lag_bytes.set(l.bytes as f64);
            if let Some(q) = l.silence_seconds {
                m.replica_silence.set(q);
            }
        }
    }
}

/// The error's message without the URL noise reqwest/sqlx put in front.
pub(crate) fn short(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg = s.to_string();
        src = s.source();
    }
    msg
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        d.sync_all()?;
    }
    Ok(())
}
