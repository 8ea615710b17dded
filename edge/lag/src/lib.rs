//! How far behind its primary a streaming replica is, measured on the replica.
//!
//! Owns the probe query ([`sample`]), the [`Tracker`] that turns successive
//! samples into a [`Lag`] (WAL bytes, seconds, silence) and the [`Budget`]
//! that judges it. It does not own a connection (the edge and the health
//! hook each bring their own pool) nor what to do about lag: the health hook
//! decides whether a lagging region withdraws (it must not when every region
//! lags at once, see `edgefront-health`).
//!
//! Why not `now() - pg_last_xact_replay_timestamp()`: that is the age of the
//! last *replayed commit*. After an idle hour followed by one slow replay it
//! reads "an hour" although the replica is a second behind, and while the
//! primary is idle it grows although nothing is missing. Here instead:
//!
//! - **bytes**: WAL the replica knows exists but has not replayed: the newer
//!   of what it received (`pg_last_wal_receive_lsn()`) and what the primary
//!   said it has (`pg_stat_wal_receiver.latest_end_lsn`), minus
//!   `pg_last_wal_replay_lsn()`;
//! - **seconds**: how long the oldest of that WAL has been waiting. The
//!   tracker notes when each new WAL end was first seen and drops the notes
//!   replay has passed, so a replica that has replayed everything it knows is
//!   0 s behind however old its last commit is, and a paused (or stuck, or
//!   slow) replay grows by wall time from the moment WAL it cannot apply
//!   arrived. Measured on this host's monotonic clock, not across hosts;
//! - **silence**: time since the last message from the primary
//!   (`pg_stat_wal_receiver.last_msg_receipt_time`). A live walsender speaks at
//!   least every `wal_receiver_timeout / 2` (30 s by default: the standby pings
//!   when it heard nothing for that long), so silence beyond that means the
//!   primary or the path to it is gone, even though no WAL is pending. While
//!   no WAL receiver runs (primary down, connection refused), silence counts
//!   from the last message this tracker saw (or from its creation).
//!
//! Seeing `last_msg_receipt_time` and `latest_end_lsn` needs superuser or
//! `pg_read_all_stats` (PostgreSQL hides them from other roles); without it
//! silence is reported unknown (`None`) and never judged, and bytes count
//! received WAL only.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use edgefront_schema::Lsn;
use serde::Serialize;

/// Default WAL budget: 64 MiB (four 16 MiB segments). Replaying that takes
/// seconds on any disk; more means replay cannot keep up.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default silence budget. At PostgreSQL's default `wal_receiver_timeout`
/// (60 s) an idle primary is heard every 30 s (the standby pings it then), so
/// even half of this budget (the early warning, [`Budget::half_spent`]) is
/// never reached by an idle but healthy primary; and regions whose last
/// messages were up to 30 s apart before the primary went away cross it
/// while the others are already past half.
pub const DEFAULT_MAX_SILENCE: Duration = Duration::from_secs(90);

/// How many WAL ends the tracker remembers while replay is behind (at one
/// probe every 200 ms, minutes of steadily growing WAL).
const MAX_PENDING: usize = 2048;

/// One reading of the replica's replication state (one query).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    /// `pg_is_in_recovery()`: false on a primary or a promoted replica.
    pub in_recovery: bool,
    /// WAL received and flushed by the walreceiver.
    pub receive_lsn: Option<Lsn>,
    /// WAL replayed.
    pub replay_lsn: Option<Lsn>,
    /// The primary's WAL end as of its last message (`latest_end_lsn`).
    pub primary_lsn: Option<Lsn>,
    /// Milliseconds since the last message from the primary, as the replica's
    /// clock sees it; `None` when no receiver runs or the role cannot see it.
    pub silence_ms: Option<u64>,
    /// A WAL receiver process is running (visible to every role).
    pub receiver_running: bool,
    /// The role may read the receiver's details (`pg_read_all_stats`).
    pub stats_visible: bool,
    /// Replay pause was requested (`pg_wal_replay_pause()`).
    pub replay_paused: bool,
}

/// The probe query: one round trip, read-only, cheap.
pub const SAMPLE_SQL: &str = "SELECT pg_is_in_recovery(),
       pg_last_wal_receive_lsn()::text,
       pg_last_wal_replay_lsn()::text,
       w.latest_end_lsn::text,
       (EXTRACT(EPOCH FROM clock_timestamp() - w.last_msg_receipt_time) * 1000)::float8,
       w.pid IS NOT NULL,
       pg_has_role('pg_read_all_stats', 'USAGE'),
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END
  FROM (SELECT 1) AS one LEFT JOIN pg_stat_wal_receiver AS w ON true";

type Row = (
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<f64>,
    bool,
    bool,
    bool,
);

/// Reads one [`Sample`] from the replica behind `executor`.
pub async fn sample<'e, E>(executor: E) -> Result<Sample, sqlx::Error>
where
    E: sqlx::PgExecutor<'e>,
{
    let (
        in_recovery,
        receive,
        replay,
        primary,
        silence_ms,
        receiver_running,
        stats_visible,
        paused,
    ): Row = sqlx::query_as(SAMPLE_SQL).fetch_one(executor).await?;
    let lsn = |s: Option<String>| s.and_then(|s| s.parse::<Lsn>().ok());
    Ok(Sample {
        in_recovery,
        receive_lsn: lsn(receive),
        replay_lsn: lsn(replay),
        primary_lsn: lsn(primary),
        // A clock step on the replica can make it negative: clamp.
        silence_ms: silence_ms
            .filter(|s| s.is_finite())
            .map(|s| s.max(0.0) as u64),
        receiver_running,
        stats_visible,
        replay_paused: paused,
    })
}

/// How far behind the replica is.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Lag {
    /// WAL known to exist but not replayed.
    pub bytes: u64,
    /// How long the oldest unreplayed WAL has been waiting (0 when none).
    pub seconds: f64,
    /// Seconds since the last message from the primary; `None` when the role
    /// cannot see it (see the crate docs).
    pub silence_seconds: Option<f64>,
    /// Replay pause was requested.
    pub replay_paused: bool,
    /// A WAL receiver is running (streaming from the primary).
    pub receiving: bool,
}

/// Turns successive [`Sample`]s into [`Lag`]s (it remembers when WAL was
/// first seen and when the primary was last heard).
#[derive(Debug, Clone)]
pub struct Tracker {
    /// WAL ends not yet replayed, with when each was first seen; oldest first.
    pending: VecDeque<(Instant, u64)>,
    /// When the primary was last heard from (or the tracker was created).
    last_heard: Instant,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new(Instant::now())
    }
}

impl Tracker {
    /// A tracker that has heard nothing yet: silence counts from `now`.
    pub fn new(now: Instant) -> Self {
        Tracker {
            pending: VecDeque::new(),
            last_heard: now,
        }
    }

    /// Takes a sample read at `now` and returns the lag it shows.
    ///
    /// WAL that is already pending at the first sample counts from that
    /// sample (the tracker cannot know how long it waited before), so the
    /// first seconds reading after a start is a lower bound.
    pub fn observe(&mut self, s: &Sample, now: Instant) -> Lag {
        if !s.in_recovery {
            self.pending.clear();
            self.last_heard = now;
            return Lag::default();
        }
        let replay = s.replay_lsn.map_or(0, |l| l.0);
        let known = [s.receive_lsn, s.primary_lsn]
            .into_iter()
            .flatten()
            .map(|l| l.0)
            .max()
            .unwrap_or(replay);
        let newest = self.pending.back().map_or(replay, |&(_, l)| l);
        if known > newest {
            self.pending.push_back((now, known));
            if self.pending.len() > MAX_PENDING {
                // Keep the oldest (it is what `seconds` reads); thin the rest.
                self.pending.remove(1);
            }
        }
        while self.pending.front().is_some_and(|&(_, l)| l <= replay) {
            self.pending.pop_front();
        }
        let seconds = self.pending.front().map_or(0.0, |&(t, _)| {
            now.saturating_duration_since(t).as_secs_f64()
        });
        let silence_seconds = match (s.receiver_running, s.silence_ms) {
            (true, Some(ms)) => {
                let ago = Duration::from_millis(ms);
                self.last_heard = now.checked_sub(ago).unwrap_or(self.last_heard);
                Some(ago.as_secs_f64())
            }
            // Receiving but the role may not see when it last heard: unknown.
            (true, None) if !s.stats_visible => None,
            // No receiver (or one that has not heard anything yet): silent
            // since the last message this tracker saw.
            _ => Some(now.saturating_duration_since(self.last_heard).as_secs_f64()),
        };
        Lag {
            bytes: known.saturating_sub(replay),
            seconds,
            silence_seconds,
            replay_paused: s.replay_paused,
            receiving: s.receiver_running,
        }
    }
}

/// Limits past which a replica counts as lagging.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Unreplayed WAL.
    pub bytes: u64,
    /// Age of the oldest unreplayed WAL.
    pub seconds: Duration,
    /// Time without a message from the primary.
    pub silence: Duration,
}

impl Budget {
    /// What is over budget, as health reasons (each starts with
    /// `replica_lag`); empty when within budget.
    pub fn exceeded(&self, lag: &Lag) -> Vec<String> {
        let mut reasons = Vec::new();
        let secs = self.seconds.as_secs_f64();
        if lag.seconds > secs {
            reasons.push(format!(
                "replica_lag: {:.1}s over the {secs:.1}s budget ({} bytes of WAL waiting{})",
                lag.seconds,
                lag.bytes,
                if lag.replay_paused {
                    ", replay paused"
                } else {
                    ""
                }
            ));
        }
        if lag.bytes > self.bytes {
            reasons.push(format!(
                "replica_lag: {} bytes of WAL not replayed, over the {} byte budget",
                lag.bytes, self.bytes
            ));
        }
        let silence = self.silence.as_secs_f64();
        if let Some(quiet) = lag.silence_seconds.filter(|q| *q > silence) {
            reasons.push(format!(
                "replica_lag: nothing from the primary for {quiet:.1}s, over the {silence:.1}s budget{}",
                if lag.receiving {
                    ""
                } else {
                    " (no WAL receiver running)"
                }
            ));
        }
        reasons
    }

    /// Past half of any budget: the early warning peers read to tell a cause
    /// every region shares from one that is only here (see `edgefront-health`).
    pub fn half_spent(&self, lag: &Lag) -> bool {
        lag.seconds > self.seconds.as_secs_f64() / 2.0
            || lag.bytes > self.bytes / 2
            || lag
                .silence_seconds
                .is_some_and(|q| q > self.silence.as_secs_f64() / 2.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn streaming(receive: u64, replay: u64) -> Sample {
        Sample {
            in_recovery: true,
            receive_lsn: Some(Lsn(receive)),
            replay_lsn: Some(Lsn(replay)),
            primary_lsn: Some(Lsn(receive)),
            silence_ms: Some(100),
            receiver_running: true,
            stats_visible: true,
            replay_paused: false,
        }
    }

    fn budget() -> Budget {
        Budget {
            bytes: 1000,
            seconds: Duration::from_secs(10),
            silence: Duration::from_secs(60),
        }
    }

    #[test]
    fn tracker_reports_zero_when_replay_has_everything_however_old_the_last_commit() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        // An idle hour: everything received is replayed.
        for i in 0..10 {
            let lag = t.observe(&streaming(500, 500), at(t0, i * 360_000));
            assert_eq!((lag.bytes, lag.seconds), (0, 0.0));
        }
        // One slow replay: 2 s behind, not an hour.
        t.observe(&streaming(900, 500), at(t0, 3_600_000));
        let lag = t.observe(&streaming(900, 600), at(t0, 3_602_000));
        assert_eq!(lag.bytes, 300);
        assert!((lag.seconds - 2.0).abs() < 1e-9, "{lag:?}");
        let lag = t.observe(&streaming(900, 900), at(t0, 3_602_200));
        assert_eq!((lag.bytes, lag.seconds), (0, 0.0));
        assert!(budget().exceeded(&lag).is_empty());
    }

    #[test]
    fn tracker_counts_from_the_oldest_unreplayed_wal_while_replay_crawls() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        t.observe(&streaming(100, 100), t0);
        // WAL keeps arriving; replay advances but never catches up.
        t.observe(&streaming(200, 100), at(t0, 1000));
        t.observe(&streaming(300, 150), at(t0, 2000));
        let lag = t.observe(&streaming(400, 250), at(t0, 3000));
        // 200 was replayed past, 300 (seen at 2 s) is the oldest pending.
        assert!((lag.seconds - 1.0).abs() < 1e-9, "{lag:?}");
        assert_eq!(lag.bytes, 150);
    }

    #[test]
    fn tracker_grows_while_replay_is_paused_and_budget_names_it() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        let mut s = streaming(100, 100);
        s.replay_paused = true;
        // Paused with nothing to replay: not behind.
        assert_eq!(t.observe(&s, t0).seconds, 0.0);
        s.receive_lsn = Some(Lsn(180));
        s.primary_lsn = Some(Lsn(180));
        t.observe(&s, at(t0, 500));
        let lag = t.observe(&s, at(t0, 11_000));
        assert!((lag.seconds - 10.5).abs() < 1e-9);
        let reasons = budget().exceeded(&lag);
        assert_eq!(reasons.len(), 1, "{reasons:?}");
        assert!(reasons[0].starts_with("replica_lag: 10.5s"), "{reasons:?}");
        assert!(reasons[0].contains("replay paused"));
        assert!(budget().half_spent(&lag));
    }

    #[test]
    fn tracker_counts_silence_from_the_last_message_when_the_receiver_is_gone() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        let mut s = streaming(100, 100);
        s.silence_ms = Some(2000);
        assert_eq!(t.observe(&s, at(t0, 10_000)).silence_seconds, Some(2.0));
        // Primary gone: no receiver, silence keeps counting from 8 s.
        s.receiver_running = false;
        s.silence_ms = None;
        let lag = t.observe(&s, at(t0, 70_000));
        assert_eq!(lag.silence_seconds, Some(62.0));
        let reasons = budget().exceeded(&lag);
        assert!(
            reasons[0].contains("nothing from the primary for 62.0s")
                && reasons[0].contains("no WAL receiver"),
            "{reasons:?}"
        );
    }

    #[test]
    fn tracker_leaves_silence_unknown_without_pg_read_all_stats() {
        let mut t = Tracker::default();
        let mut s = streaming(100, 100);
        s.stats_visible = false;
        s.silence_ms = None;
        s.primary_lsn = None;
        let lag = t.observe(&s, Instant::now() + Duration::from_secs(600));
        assert_eq!(lag.silence_seconds, None);
        assert!(budget().exceeded(&lag).is_empty());
    }

    #[test]
    fn tracker_reports_nothing_on_a_primary() {
        let mut t = Tracker::default();
        let s = Sample {
            in_recovery: false,
            ..Sample::default()
        };
        assert_eq!(t.observe(&s, Instant::now()), Lag::default());
    }

    #[test]
    fn budget_judges_bytes_on_their_own() {
        let lag = Lag {
            bytes: 1001,
            ..Lag::default()
        };
        let reasons = budget().exceeded(&lag);
        assert_eq!(reasons.len(), 1);
        assert!(reasons[0].contains("1001 bytes"), "{reasons:?}");
        assert!(!budget().half_spent(&Lag {
            bytes: 400,
            ..Lag::default()
        }));
    }

    #[test]
    fn tracker_keeps_the_oldest_note_when_full() {
        let t0 = Instant::now();
        let mut t = Tracker::new(t0);
        for i in 1..=(MAX_PENDING as u64 + 10) {
            t.observe(&streaming(i * 10, 0), at(t0, i));
        }
        let lag = t.observe(&streaming(0, 0), at(t0, 5000));
        assert!((lag.seconds - 4.999).abs() < 1e-9, "{lag:?}");
    }
}
