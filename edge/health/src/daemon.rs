//! The health hook's decision loop.
//!
//! Every `interval` it probes the edge (`/healthz` on its admin listener)
//! and the replica (its own connection, so a wedged edge cannot hide a dead
//! replica), applies hysteresis (`rise` good probes to announce, `fall` bad
//! ones to withdraw), advances a drain in progress, and drives BIRD: the
//! anycast protocol is enabled only when healthy and not drained. The desired
//! state is re-sent every `reapply`, so a restarted BIRD (which starts with
//! the protocol disabled) is brought back to it, and never re-announces a
//! drained region. Drain state is a file, so it survives restarts of this
//! daemon and of BIRD.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bird::Bird;
use crate::conns;

/// Daemon settings (flags).
#[derive(Debug, Clone)]
pub struct Settings {
    pub region: String,
    /// Base URL of the edge's admin listener.
    pub edge_admin: String,
    /// Bearer token: for this daemon's API and the edge's drain calls.
    pub token: String,
    pub replica_url: String,
    pub max_lag: Duration,
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
    /// After hysteresis.
    pub healthy: bool,
    /// Why the last probe failed (empty when it passed).
    pub reasons: Vec<String>,
    pub drained: bool,
    pub drain_phase: Option<Phase>,
    pub drain_since_unix: Option<u64>,
    pub drain_seconds: Option<f64>,
    /// Connections open when the drain began that are still open.
    pub drain_connections_remaining: usize,
    pub replica_lag_seconds: Option<f64>,
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
    healthy: bool,
    ok_streak: u32,
    fail_streak: u32,
    reasons: Vec<String>,
    edge: Option<EdgeHealth>,
    replica_lag: Option<f64>,
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
    replica: sqlx::PgPool,
    pub metrics: crate::metrics::Metrics,
}

impl Daemon {
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
        let metrics = crate::metrics::Metrics::new(&settings.region)?;
        let mut events = VecDeque::new();
        if drain.is_some() {
            events.push_back(Event {
                at_unix_ms: now_unix_ms(),
                what: "started drained (state file): staying withdrawn".into(),
            });
        }
        Ok(Daemon {
            settings,
            state: Mutex::new(State {
                healthy: false,
                ok_streak: 0,
                fail_streak: 0,
                reasons: vec!["starting".into()],
                edge: None,
                replica_lag: None,
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

    /// Runs the loop forever.
    pub async fn run(&self) {
        let mut bird: Option<Bird> = None;
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.tick(&mut bird).await;
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

    async fn probe_replica(&self) -> Result<f64, String> {
        let q = sqlx::query_as::<_, (bool, Option<f64>)>(
            "SELECT pg_is_in_recovery(),
                    CASE WHEN NOT pg_is_in_recovery() THEN 0
                         WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0
                         ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8 END",
        )
        .fetch_one(&self.replica);
        match tokio::time::timeout(Duration::from_secs(1), q).await {
            Err(_) => Err("replica_unreachable: timed out after 1s".into()),
            Ok(Err(e)) => Err(format!("replica_unreachable: {}", short(&e))),
            Ok(Ok((false, _))) => Err("replica_not_in_recovery: promoted or not a replica".into()),
            Ok(Ok((true, lag))) => Ok(lag.unwrap_or(0.0).max(0.0)),
        }
    }

    async fn tell_edge(&self, draining: bool) -> Result<(), String> {
        let path = if draining { "drain" } else { "undrain" };
        let r = self
            .http
            .post(format!("{}/{path}", self.settings.edge_admin))
            .bearer_auth(&self.settings.token)
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
            let mut reasons = Vec::new();
            match &edge {
                Ok(h) if h.healthy => {}
                Ok(h) => reasons.extend(h.reasons.iter().map(|r| format!("edge: {r}"))),
                Err(e) => reasons.push(e.clone()),
            }
            match &replica {
                Ok(lag) if *lag > s.max_lag.as_secs_f64() => reasons.push(format!(
                    "replica_lag: {lag:.1}s over the {:.1}s budget",
                    s.max_lag.as_secs_f64()
                )),
                Ok(_) => {}
                Err(e) => reasons.push(e.clone()),
            }
            st.replica_lag = replica.as_ref().ok().copied();
            let ok = reasons.is_empty();
            if ok {
                st.ok_streak += 1;
                st.fail_streak = 0;
            } else {
                st.fail_streak += 1;
                st.ok_streak = 0;
            }
            if !st.healthy && st.ok_streak >= s.rise {
                st.healthy = true;
                Self::event(&mut st, format!("healthy after {} good probes", s.rise));
            } else if st.healthy && st.fail_streak >= s.fall {
                st.healthy = false;
                Self::event(&mut st, format!("unhealthy: {}", reasons.join("; ")));
            }
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
            let desired = st.healthy && st.drain.as_ref().is_none_or(|d| d.phase == Phase::Closing);
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
                st.applied = Some(desired);
                st.last_apply = Some(Instant::now());
                st.bird_error = None;
                let static_up = protocols
                    .iter()
                    .any(|p| p.name == s.protocol && p.state == "up");
                let session_up = protocols
                    .iter()
                    .any(|p| p.proto == "BGP" && p.info.starts_with("Established"));
                st.announced = static_up && session_up;
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
            healthy: st.healthy,
            reasons: st.reasons.clone(),
            drained: st.drain.is_some(),
            drain_phase: st.drain.as_ref().map(|d| d.phase),
            drain_since_unix: st.drain.as_ref().map(|d| d.since_unix),
            drain_seconds: st.drain.as_ref().map(|d| d.started.elapsed().as_secs_f64()),
            drain_connections_remaining: st
                .drain
                .as_ref()
                .map_or(0, |d| d.initial.intersection(live).count()),
            replica_lag_seconds: st.replica_lag,
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
        m.healthy.set(f64::from(u8::from(st.healthy)));
        m.drain_phase.set(match st.drain.as_ref().map(|d| d.phase) {
            None => 0.0,
            Some(Phase::Closing) => 1.0,
            Some(Phase::Withdrawn) => 2.0,
            Some(Phase::Drained) => 3.0,
        });
        m.connections.set(st.connections.len() as f64);
        if let Some(l) = st.replica_lag {
            m.replica_lag.set(l);
        }
    }
}

/// The error's message without the URL noise reqwest/sqlx put in front.
fn short(e: &dyn std::error::Error) -> String {
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
