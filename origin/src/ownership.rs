//! Custom-domain ownership: a domain a seller attaches is a *claim* that is
//! served only once its owner has proven control of the name in DNS.
//!
//! The proof is a TXT record `_edgefront.<hostname>` holding
//! `edgefront-verify=<token>`, with a token per claim (so a name removed by
//! one store and claimed by another needs a fresh proof, and an old record
//! proves nothing). TXT rather than a CNAME to a per-store target: it works
//! at a zone apex (where a CNAME cannot exist), it can be published before the
//! name is moved to the anycast address (no downtime while switching), and
//! it leaves the name's own records to the seller. docs/tls.md has the
//! lifecycle and what an attacker can and cannot do.
//!
//! States: `pending` (never served, never ordered a certificate) → `active`
//! (a row in `domains`: edges serve it, the ACME gate lets it order) →
//! `suspended` (the proof was gone for longer than the grace period; the
//! `domains` row is removed, edges drop the name and its certificate) and back
//! to `active` once the proof is there again. A failed lookup (timeout,
//! SERVFAIL) changes no state: only a definite answer (no such name, no TXT,
//! or TXT without the token) counts as a missing proof.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use serde::Serialize;
use sqlx::PgPool;

/// The label the proof lives under.
pub const RECORD_LABEL: &str = "_edgefront";
/// What the TXT value starts with.
pub const VALUE_PREFIX: &str = "edgefront-verify=";

/// How often claims are checked, and for how long a lapsed proof is tolerated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// First retry of a pending claim; doubles per miss up to an hour.
    pub pending_every: Duration,
    /// How often an active claim's proof is looked up again.
    pub recheck_every: Duration,
    /// How long an active claim may lack its proof before it is suspended.
    pub grace: Duration,
    /// Pending claims a store may hold at once.
    pub max_pending_per_store: i64,
    /// Pending claims never proven are dropped after this long.
    pub pending_expiry: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pending_every: Duration::from_secs(60),
            recheck_every: Duration::from_secs(6 * 3600),
            grace: Duration::from_secs(72 * 3600),
            max_pending_per_store: 1000,
            pending_expiry: Duration::from_secs(7 * 86_400),
        }
    }
}

/// The longest wait between two checks of a pending or failing claim.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// The record a seller creates to prove `hostname`.
pub fn record_name(hostname: &str) -> String {
    format!("{RECORD_LABEL}.{hostname}")
}

/// The value that record must hold for `token`.
pub fn record_value(token: &str) -> String {
    format!("{VALUE_PREFIX}{token}")
}

/// A new claim's token: 128 random bits, hex.
pub fn new_token() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// What one lookup of the proof found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// The TXT record holds this claim's token.
    Found,
    /// A definite answer without the token (why, for the seller).
    Missing(String),
    /// The lookup failed (timeout, SERVFAIL…): nothing is concluded.
    Unknown(String),
}

/// Looks proofs up in DNS, through one configured server or the system's.
pub struct Verifier {
    resolver: Resolver<TokioConnectionProvider>,
    pub settings: Settings,
}

impl Verifier {
    /// A verifier asking `server` (every query, no cache), or the servers of
    /// /etc/resolv.conf when `None`.
    pub fn new(server: Option<SocketAddr>, settings: Settings) -> Result<Verifier, String> {
        let provider = TokioConnectionProvider::default();
        let builder = match server {
            Some(addr) => Resolver::builder_with_config(
                ResolverConfig::from_parts(
                    None,
                    vec![],
                    NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true),
                ),
                provider,
            ),
            None => Resolver::builder(provider).map_err(|e| format!("resolver: {e}"))?,
        };
        let mut opts = ResolverOpts::default();
        // Every check must see the zone as it is now: a cached "no record"
        // would delay a proof, a cached record would hide its removal.
        opts.cache_size = 0;
        opts.timeout = Duration::from_secs(3);
        opts.attempts = 2;
        opts.ndots = 0;
        Ok(Verifier {
            resolver: builder.with_options(opts).build(),
            settings,
        })
    }

    /// Whether `_edgefront.<hostname>` holds `token` right now.
    pub async fn lookup(&self, hostname: &str, token: &str) -> Proof {
        let name = format!("{}.", record_name(hostname));
        let want = record_value(token);
        match self.resolver.txt_lookup(name.as_str()).await {
            Ok(found) => {
                let values: Vec<String> = found
                    .iter()
                    .map(|txt| {
                        txt.txt_data()
                            .iter()
                            .map(|part| String::from_utf8_lossy(part).into_owned())
                            .collect::<String>()
                    })
                    .collect();
                if values.iter().any(|v| v.trim() == want) {
                    Proof::Found
                } else {
                    let mut seen = values.join(", ");
                    if seen.len() > 200 {
                        let mut cut = 200;
                        while !seen.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        seen.truncate(cut);
                        seen.push('…');
                    }
                    Proof::Missing(format!(
                        "TXT {} does not hold this claim's token (found: {seen})",
                        record_name(hostname)
                    ))
                }
            }
            Err(e) if definite_absence(&e) => {
                Proof::Missing(format!("no TXT record at {}", record_name(hostname)))
            }
            Err(e) => Proof::Unknown(format!(
                "DNS lookup of {} failed ({e}); state unchanged",
                record_name(hostname)
            )),
        }
    }
}

/// Whether a failed lookup is a definite answer that the record is absent:
/// NXDOMAIN, or NOERROR without the record. hickory also reports SERVFAIL,
/// REFUSED… as "no records"; those say nothing about the zone.
fn definite_absence(e: &hickory_resolver::ResolveError) -> bool {
    use hickory_resolver::proto::ProtoErrorKind;
    use hickory_resolver::proto::op::ResponseCode;
    matches!(
        e.proto().map(|p| p.kind()),
        Some(ProtoErrorKind::NoRecordsFound {
            response_code: ResponseCode::NXDomain | ResponseCode::NoError,
            ..
        })
    )
}

/// A claim's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    Active,
    Suspended,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Active => "active",
            State::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> State {
        match s {
            "active" => State::Active,
            "suspended" => State::Suspended,
            _ => State::Pending,
        }
    }
}

/// What a check does to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Serve it (if no other store has the name active).
    Activate,
    /// Active with its proof in place: look again after `recheck_every`.
    Confirm,
    /// Active, proof missing, still within grace: look again soon.
    Failing { retry_in: Duration },
    /// Active, proof missing past the grace period: stop serving.
    Suspend,
    /// Not active and not proven: try again later.
    Retry { retry_in: Duration },
    /// The lookup failed: keep the state, try again later.
    Unchanged { retry_in: Duration },
}

impl Decision {
    /// When the claim is looked at next, for decisions that say.
    pub fn retry_in(&self) -> Duration {
        match self {
            Decision::Failing { retry_in }
            | Decision::Retry { retry_in }
            | Decision::Unchanged { retry_in } => *retry_in,
            _ => MAX_BACKOFF,
        }
    }
}

/// The pure lifecycle rule: `failures` is the count of misses so far,
/// `failing_for` how long an active claim has lacked its proof.
pub fn decide(
    state: State,
    proof: &Proof,
    failures: u32,
    failing_for: Option<Duration>,
    s: &Settings,
) -> Decision {
    let backoff = |n: u32| {
        s.pending_every
            .saturating_mul(1u32 << n.min(16))
            .min(MAX_BACKOFF.max(s.pending_every))
    };
    match (state, proof) {
        (_, Proof::Unknown(_)) => Decision::Unchanged {
            retry_in: backoff(failures),
        },
        (State::Active, Proof::Found) => Decision::Confirm,
        (_, Proof::Found) => Decision::Activate,
        (State::Active, Proof::Missing(_)) => {
            if failing_for.is_some_and(|f| f >= s.grace) {
                Decision::Suspend
            } else {
                // Look often enough to suspend close to the end of grace.
                let left = s.grace.saturating_sub(failing_for.unwrap_or_default());
                Decision::Failing {
                    retry_in: backoff(failures).min(left.max(Duration::from_secs(1))),
                }
            }
        }
        (_, Proof::Missing(_)) => Decision::Retry {
            retry_in: backoff(failures),
        },
    }
}

/// A claim as the seller API shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ClaimView {
    pub hostname: String,
    pub state: String,
    pub token: String,
    #[sqlx(skip)]
    pub record: Record,
    pub created_at: String,
    pub verified_at: Option<String>,
    pub checked_at: Option<String>,
    pub check_result: Option<String>,
    pub failing_since: Option<String>,
    pub next_check_at: String,
}

/// The DNS record to create.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub name: String,
    pub value: String,
}

const VIEW_COLUMNS: &str = "hostname, state, token,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS created_at,
    to_char(verified_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS verified_at,
    to_char(checked_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS checked_at,
    check_result,
    to_char(failing_since AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS failing_since,
    to_char(next_check_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS next_check_at";

fn with_record(mut v: ClaimView) -> ClaimView {
    v.record = Record {
        kind: "TXT",
        name: record_name(&v.hostname),
        value: record_value(&v.token),
    };
    v
}

/// One claim of `store`.
pub async fn claim(
    pool: &PgPool,
    store: i64,
    hostname: &str,
) -> Result<Option<ClaimView>, sqlx::Error> {
    let q =
        format!("SELECT {VIEW_COLUMNS} FROM domain_claims WHERE store_id = $1 AND hostname = $2");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(q))
        .bind(store)
        .bind(hostname)
        .fetch_optional(pool)
        .await?
        .map(with_record))
}

/// Every claim of `store`, by name.
pub async fn claims(pool: &PgPool, store: i64) -> Result<Vec<ClaimView>, sqlx::Error> {
    let q =
        format!("SELECT {VIEW_COLUMNS} FROM domain_claims WHERE store_id = $1 ORDER BY hostname");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(q))
        .bind(store)
        .fetch_all(pool)
        .await?
        .into_iter()
        .map(with_record)
        .collect())
}

/// The claim's row after a check.
struct Next {
    state: State,
    result: String,
    /// Set `verified_at` (a new activation).
    verified: bool,
    /// The proof was there: clear `failing_since` and the miss count.
    proven: bool,
    /// An active claim's proof is missing: start the grace clock.
    start_failing: bool,
    retry_in: Duration,
}

impl Next {
    fn proven(state: State, result: String, verified: bool, retry_in: Duration) -> Next {
        Next {
            state,
            result,
            verified,
            proven: true,
            start_failing: false,
            retry_in,
        }
    }

    fn missed(state: State, result: String, retry_in: Duration) -> Next {
        Next {
            state,
            result,
            verified: false,
            proven: false,
            start_failing: false,
            retry_in,
        }
    }
}

/// What [`check`] did, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Activated,
    Confirmed,
    Failing,
    Suspended,
    StillPending,
    /// Proven, but another store has the name active.
    Taken,
    LookupFailed,
    /// The claim was removed meanwhile.
    Gone,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Activated => "activated",
            Outcome::Confirmed => "confirmed",
            Outcome::Failing => "failing",
            Outcome::Suspended => "suspended",
            Outcome::StillPending => "pending",
            Outcome::Taken => "taken",
            Outcome::LookupFailed => "lookup_failed",
            Outcome::Gone => "gone",
        }
    }
}

/// Looks up one claim's proof and applies the lifecycle rule in one
/// transaction (the lookup itself runs outside it). Returns what happened.
pub async fn check(
    pool: &PgPool,
    verifier: &Verifier,
    store: i64,
    hostname: &str,
) -> Result<Outcome, sqlx::Error> {
    let Some(token): Option<String> =
        sqlx::query_scalar("SELECT token FROM domain_claims WHERE store_id = $1 AND hostname = $2")
            .bind(store)
            .bind(hostname)
            .fetch_optional(pool)
            .await?
    else {
        return Ok(Outcome::Gone);
    };
    let proof = verifier.lookup(hostname, &token).await;
    let mut tx = pool.begin().await?;
    // Re-read under a row lock: the claim may have been removed (or removed
    // and claimed again with a new token) during the lookup.
    let row: Option<(String, i32, Option<f64>)> = sqlx::query_as(
        "SELECT state, failures, EXTRACT(EPOCH FROM now() - failing_since)::float8
         FROM domain_claims WHERE store_id = $1 AND hostname = $2 AND token = $3 FOR UPDATE",
    )
    .bind(store)
    .bind(hostname)
    .bind(&token)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((state, failures, failing_for)) = row else {
        return Ok(Outcome::Gone);
    };
    let failures = u32::try_from(failures).unwrap_or(0);
    let failing_for = failing_for.map(|s| Duration::from_secs_f64(s.max(0.0)));
    let decision = decide(
        State::parse(&state),
        &proof,
        failures,
        failing_for,
        &verifier.settings,
    );
    let found = format!("verified: TXT {} holds the token", record_name(hostname));
    let why = match &proof {
        Proof::Found => found.clone(),
        Proof::Missing(w) | Proof::Unknown(w) => w.clone(),
    };
    let state = State::parse(&state);
    let recheck = verifier.settings.recheck_every;
    let (outcome, next) = match decision {
        Decision::Activate => {
            let inserted: Option<i64> = sqlx::query_scalar(
                "INSERT INTO domains (hostname, store_id) VALUES ($1, $2)
                 ON CONFLICT (hostname) DO NOTHING RETURNING store_id",
            )
            .bind(hostname)
            .bind(store)
            .fetch_optional(&mut *tx)
            .await?;
            let owner: Option<i64> = match inserted {
                Some(s) => Some(s),
                None => {
                    sqlx::query_scalar("SELECT store_id FROM domains WHERE hostname = $1")
                        .bind(hostname)
                        .fetch_optional(&mut *tx)
                        .await?
                }
            };
            if owner == Some(store) {
                (
                    Outcome::Activated,
                    Next::proven(State::Active, found, true, recheck),
                )
            } else {
                let retry = decide(
                    state,
                    &Proof::Missing(String::new()),
                    failures,
                    None,
                    &verifier.settings,
                );
                (
                    Outcome::Taken,
                    Next::missed(
                        state,
                        "proven, but the name is active on another store; it must be removed there first".into(),
                        retry.retry_in(),
                    ),
                )
            }
        }
        Decision::Confirm => (
            Outcome::Confirmed,
            Next::proven(State::Active, found, false, recheck),
        ),
        Decision::Failing { retry_in } => (
            Outcome::Failing,
            Next {
                start_failing: true,
                ..Next::missed(
                    State::Active,
                    format!("{why}; suspended if still missing after the grace period"),
                    retry_in,
                )
            },
        ),
        Decision::Suspend => {
            sqlx::query("DELETE FROM domains WHERE hostname = $1 AND store_id = $2")
                .bind(hostname)
                .bind(store)
                .execute(&mut *tx)
                .await?;
            (
                Outcome::Suspended,
                Next::missed(
                    State::Suspended,
                    format!("suspended: {why} (for longer than the grace period)"),
                    verifier.settings.pending_every,
                ),
            )
        }
        Decision::Retry { retry_in } => (Outcome::StillPending, Next::missed(state, why, retry_in)),
        // A failed lookup keeps the state; it counts as a miss for the
        // backoff only, so a server that keeps failing is asked less often.
        Decision::Unchanged { retry_in } => {
            (Outcome::LookupFailed, Next::missed(state, why, retry_in))
        }
    };
    sqlx::query(
        "UPDATE domain_claims SET state = $3, checked_at = now(), check_result = $4,
             verified_at = CASE WHEN $5 THEN now() ELSE verified_at END,
             failing_since = CASE WHEN $6 THEN NULL
                                  WHEN $7 THEN COALESCE(failing_since, now())
                                  ELSE failing_since END,
             failures = CASE WHEN $6 THEN 0 ELSE failures + 1 END,
             next_check_at = now() + make_interval(secs => $8)
         WHERE store_id = $1 AND hostname = $2",
    )
    .bind(store)
    .bind(hostname)
    .bind(next.state.as_str())
    .bind(&next.result)
    .bind(next.verified)
    .bind(next.proven)
    .bind(next.start_failing)
    .bind(next.retry_in.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Claims due for a check, taken so that concurrent checkers (several
/// origins) never check one claim at once: their next check is pushed out
/// first, and a finished check sets the real one.
async fn take_due(pool: &PgPool, limit: i64) -> Result<Vec<(i64, String)>, sqlx::Error> {
    sqlx::query_as(
        "WITH due AS (
             SELECT store_id, hostname FROM domain_claims WHERE next_check_at <= now()
             ORDER BY next_check_at LIMIT $1 FOR UPDATE SKIP LOCKED)
         UPDATE domain_claims c SET next_check_at = now() + interval '5 minutes'
         FROM due WHERE c.store_id = due.store_id AND c.hostname = due.hostname
         RETURNING c.store_id, c.hostname",
    )
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Checks due claims forever (at most 8 lookups at once), and drops pending
/// claims older than the expiry.
pub async fn check_forever(pool: PgPool, verifier: Arc<Verifier>) {
    let mut last_expiry = std::time::Instant::now() - Duration::from_secs(3600);
    loop {
        let due = match take_due(&pool, 64).await {
            Ok(d) => d,
            // Beside a standby (a failover candidate): the leader's origin
            // checks; this one asks again now and then, quietly.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("25006") => {
                tracing::debug!("domain checks: the database is a standby");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "domain checks: cannot read due claims");
                Vec::new()
            }
        };
        let busy = !due.is_empty();
        let results: Vec<_> = futures_util::stream::iter(due)
            .map(|(store, host)| {
                let (pool, verifier) = (&pool, &verifier);
                async move { (check(pool, verifier, store, &host).await, host) }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for (r, host) in results {
            match r {
                Ok(o) => {
                    crate::metrics::domain_checked(o.label());
                    match o {
                        Outcome::Activated | Outcome::Suspended => {
                            tracing::info!(hostname = %host, outcome = o.label(), "domain claim changed state");
                        }
                        _ => {
                            tracing::debug!(hostname = %host, outcome = o.label(), "domain claim checked")
                        }
                    }
                }
                Err(e) => tracing::warn!(hostname = %host, error = %e, "domain check failed"),
            }
        }
        if last_expiry.elapsed() > Duration::from_secs(60) {
            last_expiry = std::time::Instant::now();
            match sqlx::query(
                "DELETE FROM domain_claims WHERE state = 'pending'
                 AND created_at < now() - make_interval(secs => $1)",
            )
            .bind(verifier.settings.pending_expiry.as_secs_f64())
            .execute(&pool)
            .await
            {
                Ok(r) if r.rows_affected() > 0 => {
                    tracing::info!(count = r.rows_affected(), "expired pending domain claims");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "expiring pending claims failed"),
            }
        }
        if !busy {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s() -> Settings {
        Settings {
            pending_every: Duration::from_secs(60),
            recheck_every: Duration::from_secs(6 * 3600),
            grace: Duration::from_secs(72 * 3600),
            ..Settings::default()
        }
    }

    fn missing() -> Proof {
        Proof::Missing("no TXT".into())
    }

    #[test]
    fn proof_activates_pending_and_suspended_claims_and_confirms_active_ones() {
        assert_eq!(
            decide(State::Pending, &Proof::Found, 3, None, &s()),
            Decision::Activate
        );
        assert_eq!(
            decide(State::Suspended, &Proof::Found, 9, None, &s()),
            Decision::Activate
        );
        assert_eq!(
            decide(State::Active, &Proof::Found, 0, None, &s()),
            Decision::Confirm
        );
    }

    #[test]
    fn pending_misses_back_off_to_an_hour() {
        let d: Vec<_> = (0..10)
            .map(
                |n| match decide(State::Pending, &missing(), n, None, &s()) {
                    Decision::Retry { retry_in } => retry_in.as_secs(),
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(d, [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600, 3600]);
    }

    #[test]
    fn active_claim_is_suspended_only_after_grace() {
        let h = |x: u64| Some(Duration::from_secs(x * 3600));
        assert!(matches!(
            decide(State::Active, &missing(), 0, None, &s()),
            Decision::Failing { .. }
        ));
        assert!(matches!(
            decide(State::Active, &missing(), 5, h(71), &s()),
            Decision::Failing { retry_in } if retry_in <= Duration::from_secs(3600)
        ));
        assert_eq!(
            decide(State::Active, &missing(), 9, h(72), &s()),
            Decision::Suspend
        );
    }

    #[test]
    fn a_failed_lookup_changes_nothing() {
        for st in [State::Pending, State::Active, State::Suspended] {
            assert!(matches!(
                decide(
                    st,
                    &Proof::Unknown("timeout".into()),
                    0,
                    Some(Duration::from_secs(1 << 20)),
                    &s()
                ),
                Decision::Unchanged { .. }
            ));
        }
    }

    #[test]
    fn tokens_are_distinct_hex() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(record_value(&a), format!("edgefront-verify={a}"));
        assert_eq!(record_name("shop.example"), "_edgefront.shop.example");
    }
}
