//! ACME issuance with instant-acme (HTTP-01), coordinated network-wide through
//! the origin's internal API: one shared account per directory (created once,
//! stored sealed), a lease per hostname so only one region orders a name at a
//! time, challenges published where every region's :80 can answer them, and
//! the issued certificate stored (key sealed) for every region to load.
//!
//! The origin grants a lease only when the primary holds no current
//! certificate for the name; otherwise it hands that certificate over
//! ([`Issued::Stored`]) and nothing is ordered. This is what keeps a region
//! whose replica has not caught up with another region's fresh certificate
//! from ordering the name a second time.

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use instant_acme::{
    Account, AccountBuilder, AccountCredentials, AuthorizationStatus, ChallengeType,
    ExternalAccountKey, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// Why an issuance did not produce a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// Another issuer holds this hostname's lease: wait for its result.
    #[error("another issuer holds the lease for this hostname")]
    Busy,
    /// Local rate limit reached; retry later.
    #[error("issuance rate limit reached")]
    RateLimited,
    /// The order failed for this name: validation failed, the CA rejected
    /// the identifier, or the order did not become ready in time. Counts
    /// against the name's and the store's failure budgets.
    #[error("acme: {0}")]
    Acme(String),
    /// The CA itself, or the platform's side of the exchange, failed: the
    /// directory is unreachable, rate-limits the account, answers with an
    /// internal error or breaks the protocol. Not the seller's fault; counts
    /// toward failing over to the next directory.
    #[error("acme directory {directory}: {message}")]
    Ca { directory: String, message: String },
    /// A budget on the primary refused the order before it reached the CA.
    #[error("refused by the {budget} budget: {reason}")]
    Refused { budget: String, reason: String },
    /// The origin's internal API failed.
    #[error("origin: {0}")]
    Origin(String),
}

/// Problem types that are the name's own: the CA could not validate it or
/// will not issue for it. Every other problem (rate limits, internal
/// errors, nonces, account trouble, a malformed exchange) is the CA's or
/// the platform's, never held against a seller.
const NAME_PROBLEMS: [&str; 7] = [
    ":rejectedIdentifier",
    ":unsupportedIdentifier",
    ":caa",
    ":dns",
    ":connection",
    ":incorrectResponse",
    ":tls",
];

/// Sorts an instant-acme error from `directory` into the name's fault
/// ([`IssueError::Acme`]) or the CA's ([`IssueError::Ca`]). Only a problem
/// document of a type in [`NAME_PROBLEMS`] is the name's; a wait that ran
/// out is sorted by the caller (it knows what was awaited).
fn classify(directory: &str, e: instant_acme::Error) -> IssueError {
    match e {
        instant_acme::Error::Api(p)
            if p.r#type
                .as_deref()
                .is_some_and(|t| NAME_PROBLEMS.iter().any(|n| t.ends_with(n))) =>
        {
            IssueError::Acme(p.to_string())
        }
        e => IssueError::Ca {
            directory: directory.to_owned(),
            message: e.to_string(),
        },
    }
}

impl From<reqwest::Error> for IssueError {
    fn from(e: reqwest::Error) -> Self {
        IssueError::Origin(e.to_string())
    }
}

/// A certificate the primary already holds, its private key still sealed
/// with the platform's master key: open it with [`crate::Sealer::open`] for
/// the hostname.
#[derive(Clone)]
pub struct Stored {
    pub chain_pem: String,
    pub key_nonce: Vec<u8>,
    pub key_ciphertext: Vec<u8>,
    /// The name of the ACME directory that issued it (`None`: uploaded).
    pub issuer: Option<String>,
}

impl Stored {
    /// Reads the origin's JSON form (`chain_pem`, hex `key_nonce`, hex `key_ciphertext`).
    fn from_json(v: &Value) -> Result<Stored, IssueError> {
        let field = |k: &str| {
            v[k].as_str()
                .ok_or_else(|| IssueError::Origin(format!("stored certificate without {k}")))
        };
        let hex = |k: &str| {
            hex::decode(field(k)?)
                .map_err(|_| IssueError::Origin(format!("stored certificate: {k} is not hex")))
        };
        Ok(Stored {
            chain_pem: field("chain_pem")?.to_owned(),
            key_nonce: hex("key_nonce")?,
            key_ciphertext: hex("key_ciphertext")?,
            issuer: v["issuer"].as_str().map(str::to_owned),
        })
    }
}

/// What [`Issuer::issue`] produced. (No `Debug`: it can hold a private key.)
pub enum Issued {
    /// This issuer ordered the certificate and stored it through the origin.
    Ordered {
        chain_pem: String,
        key_pem: String,
        /// The name of the directory that issued it.
        issuer: String,
    },
    /// The primary already held a current certificate for the name (another
    /// region issued or renewed it): nothing was ordered.
    Stored(Stored),
}

/// Longest one order may take, end to end (the lease lasts 120 s).
const ORDER_TIMEOUT: Duration = Duration::from_secs(60);

/// One ACME directory an issuer may order from.
#[derive(Clone)]
pub struct Directory {
    /// Its name in metrics, logs and the certificates table (`letsencrypt`).
    pub name: String,
    /// The directory URL.
    pub url: String,
    /// A PEM root to trust for the directory's TLS (pebble in tests); else webpki roots.
    pub ca_root: Option<PathBuf>,
    /// External Account Binding for CAs that require it: the key id and the
    /// raw HMAC key the CA issued, used once, when the account is created.
    pub eab: Option<(String, Vec<u8>)>,
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("ca_root", &self.ca_root)
            .field("eab_kid", &self.eab.as_ref().map(|(kid, _)| kid))
            .finish()
    }
}

/// Where and how to issue.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// Directories in order of preference: orders go to the first; once it
    /// has failed on the CA's side for `failover_after`, to the second, and
    /// the first is tried again once per `failover_after` until it answers.
    pub directories: Vec<Directory>,
    /// How long the first directory must keep failing before orders move.
    pub failover_after: Duration,
    /// Every origin's internal API (`https://host:port`: their mutual-TLS
    /// listeners; one per failover candidate). Calls go to the one that
    /// answered last and move to the next when it cannot be reached or its
    /// database is a standby (see `InternalCall`).
    pub origins: Vec<String>,
    /// The TLS client for it: trusts the internal CA only and presents this
    /// region node's certificate.
    pub origin_tls: rustls::ClientConfig,
    /// Bearer token of the origin's internal API.
    pub internal_token: String,
    /// This issuer's name in leases (region + process).
    pub holder: String,
    /// Most orders per minute from this issuer (kept under the CA's limits).
    pub orders_per_minute: usize,
}

/// The first directory's health, which decides where orders go.
#[derive(Debug, Default)]
struct Failover {
    /// When its current run of CA-side failures began.
    failing_since: Option<Instant>,
    /// When an order last went to it (while failing).
    last_try: Option<Instant>,
}

impl Failover {
    /// The index of the directory the next order would go to: the first,
    /// unless failed over; then the first only when a probe is due (once
    /// per `after`, at most once a second), to see whether it is back.
    fn next(&self, now: Instant, after: Duration, directories: usize) -> usize {
        // At least a second apart, so a failed probe's order can still go
        // to the second directory.
        let probe_every = after.max(Duration::from_secs(1));
        let probe_due = self
            .last_try
            .is_none_or(|t| now.duration_since(t) >= probe_every);
        usize::from(self.failed_over(now, after, directories) && !probe_due)
    }

    /// [`Failover::next`], counting an order to the first as its probe.
    fn pick(&mut self, now: Instant, after: Duration, directories: usize) -> usize {
        let index = self.next(now, after, directories);
        if index == 0 && self.failed_over(now, after, directories) {
            self.last_try = Some(now);
        }
        index
    }

    /// Whether orders go to the second directory now.
    fn failed_over(&self, now: Instant, after: Duration, directories: usize) -> bool {
        directories > 1
            && self
                .failing_since
                .is_some_and(|since| now.duration_since(since) >= after)
    }

    /// Records how an order to directory `index` went: a CA-side failure, or
    /// an answer (issued, or the name's own failure: the CA works).
    fn record(&mut self, index: usize, ca_failure: bool, now: Instant) {
        if index != 0 {
            return;
        }
        if ca_failure {
            self.failing_since.get_or_insert(now);
            self.last_try = Some(now);
        } else {
            *self = Failover::default();
        }
    }
}

/// A challenge published for an order, removed when it ends.
enum Published {
    /// An HTTP-01 token.
    Http(String),
    /// A DNS-01 record under this name (`_acme-challenge.<name>`).
    Dns(String),
}

/// A call to the origins' internal API, built like a request. Sent to the
/// origin that answered last; the next origin is tried (each at most once)
/// when this one was not reached (a connection failure), or when it refused
/// a write because its database is a standby (503 with
/// `x-edgefront-database: standby`, edgefront_schema::DATABASE_ROLE_HEADER:
/// nothing was written), and, for reads only, after a timeout or any 503.
/// A write that may have reached a database (a timeout, another 503) is not
/// repeated elsewhere: taking a lease admits an order, and two would count
/// twice against the store's budget.
struct InternalCall<'a> {
    issuer: &'a Issuer,
    method: reqwest::Method,
    path: String,
    query: Vec<(String, String)>,
    body: Option<Value>,
}

impl InternalCall<'_> {
    fn query<K: ToString, V: ToString>(mut self, pairs: &[(K, V)]) -> Self {
        self.query
            .extend(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    fn json(mut self, body: &Value) -> Self {
        self.body = Some(body.clone());
        self
    }

    async fn send(self) -> reqwest::Result<reqwest::Response> {
        use std::sync::atomic::Ordering;
        let origins = &self.issuer.cfg.origins;
        let n = origins.len();
        let first = self.issuer.origin_at.load(Ordering::Relaxed);
        let mut last = None;
        for i in (0..n).map(|k| (first + k) % n) {
            let mut r = self
                .issuer
                .http
                .request(self.method.clone(), format!("{}{}", origins[i], self.path))
                .bearer_auth(&self.issuer.cfg.internal_token);
            if !self.query.is_empty() {
                r = r.query(&self.query);
            }
            if let Some(b) = &self.body {
                r = r.json(b);
            }
            let sent = r.send().await;
            if !try_elsewhere(&self.method, &sent) || n == 1 {
                self.issuer.origin_at.store(i, Ordering::Relaxed);
                return sent;
            }
            tracing::debug!(origin = %origins[i], path = %self.path, "internal API call moves to the next origin");
            last = Some(sent);
        }
        last.expect("an issuer has at least one origin")
    }
}

/// Whether an internal API call answered by `sent` goes to the next origin
/// ([`InternalCall`]): not reached; a write refused by an origin whose
/// database is a standby (nothing was written); for a read, also a timeout
/// or any 503.
fn try_elsewhere(method: &reqwest::Method, sent: &reqwest::Result<reqwest::Response>) -> bool {
    let read = method == reqwest::Method::GET;
    match sent {
        Ok(resp) if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => {
            read || resp
                .headers()
                .get("x-edgefront-database") // edgefront_schema::DATABASE_ROLE_HEADER
                .is_some_and(|v| v == "standby")
        }
        Ok(_) => false,
        Err(e) => e.is_connect() || (read && e.is_timeout()),
    }
}

/// An ACME issuer. Its ACME and origin HTTP clients live on a runtime of
/// their own (one thread), so callers on any runtime — Pingora's proxy and
/// background runtimes — share pooled connections safely.
pub struct Issuer {
    rt: tokio::runtime::Handle,
    cfg: IssuerConfig,
    http: reqwest::Client,
    /// Each directory's account, once loaded.
    accounts: Vec<tokio::sync::Mutex<Option<Account>>>,
    failover: Mutex<Failover>,
    concurrent: Semaphore,
    recent: Mutex<VecDeque<Instant>>,
    /// Index in `cfg.origins` of the origin that answered last.
    origin_at: std::sync::atomic::AtomicUsize,
}

impl Issuer {
    /// A new issuer; nothing is contacted until the first issuance.
    pub fn new(cfg: IssuerConfig) -> std::io::Result<Arc<Self>> {
        if cfg.directories.is_empty() {
            return Err(std::io::Error::other("an issuer needs an ACME directory"));
        }
        if cfg.origins.is_empty() {
            return Err(std::io::Error::other("an issuer needs an origin"));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        // The runtime lives on its own thread for the life of the process.
        std::thread::Builder::new()
            .name("acme".into())
            .spawn(move || rt.block_on(std::future::pending::<()>()))?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .https_only(true)
            .use_preconfigured_tls(cfg.origin_tls.clone())
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Arc::new(Issuer {
            rt: handle,
            accounts: cfg
                .directories
                .iter()
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            cfg,
            http,
            failover: Mutex::default(),
            concurrent: Semaphore::new(4),
            recent: Mutex::default(),
            origin_at: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    /// The name of the directory new orders go to now.
    pub fn active_directory(&self) -> &str {
        let failed_over = self.failover.lock().is_ok_and(|f| {
            f.failed_over(
                Instant::now(),
                self.cfg.failover_after,
                self.cfg.directories.len(),
            )
        });
        &self.cfg.directories[usize::from(failed_over)].name
    }

    /// The configured directories' names, first (preferred) first.
    pub fn directory_names(&self) -> impl Iterator<Item = &str> {
        self.cfg.directories.iter().map(|d| d.name.as_str())
    }

    /// Issues a certificate for `hostname` (already checked to be registered):
    /// the primary's current certificate if it holds one, else a new order,
    /// stored through the origin before this returns. Runs on the issuer's
    /// own runtime whatever runtime calls it.
    pub async fn issue(self: &Arc<Self>, hostname: &str) -> Result<Issued, IssueError> {
        let this = self.clone();
        let name = hostname.to_owned();
        self.rt
            .spawn(async move { this.issue_here(&name).await })
            .await
            .map_err(|e| IssueError::Origin(format!("issuer task: {e}")))?
    }

    /// The primary's current certificate for `hostname`, if any (asked
    /// through the origin; for waiting on another region's issuance without
    /// depending on this region's replica).
    pub async fn stored(self: &Arc<Self>, hostname: &str) -> Result<Option<Stored>, IssueError> {
        let this = self.clone();
        let name = hostname.to_owned();
        self.rt
            .spawn(async move {
                let r = this
                    .internal(
                        reqwest::Method::GET,
                        &format!("/internal/acme/certificates/{name}"),
                    )
                    .send()
                    .await?;
                if r.status() == reqwest::StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                if !r.status().is_success() {
                    return Err(IssueError::Origin(format!(
                        "certificate lookup: {}",
                        r.status()
                    )));
                }
                Stored::from_json(&r.json::<Value>().await?["certificate"]).map(Some)
            })
            .await
            .map_err(|e| IssueError::Origin(format!("issuer task: {e}")))?
    }

    fn builder(&self, dir: &Directory) -> Result<AccountBuilder, IssueError> {
        let r = match &dir.ca_root {
            Some(p) => Account::builder_with_root(p),
            None => Account::builder(),
        };
        r.map_err(|e| classify(&dir.name, e))
    }

    fn internal(&self, method: reqwest::Method, path: &str) -> InternalCall<'_> {
        InternalCall {
            issuer: self,
            method,
            path: path.to_owned(),
            query: Vec::new(),
            body: None,
        }
    }

    /// Directory `index`'s shared account: cached, else loaded from the
    /// origin, else created (first writer wins; with External Account
    /// Binding when configured). With `fresh`, a new account replaces the
    /// stored one (the CA no longer knows it, e.g. after a CA reset).
    async fn account(&self, index: usize, fresh: bool) -> Result<Account, IssueError> {
        let dir = &self.cfg.directories[index];
        let mut cached = self.accounts[index].lock().await;
        if !fresh && let Some(a) = cached.as_ref() {
            return Ok(a.clone());
        }
        let acme = |e| classify(&dir.name, e);
        let stored = if fresh {
            None
        } else {
            let r = self
                .internal(reqwest::Method::GET, "/internal/acme/account")
                .query(&[("directory", &dir.url)])
                .send()
                .await?;
            if r.status().is_success() {
                Some(r.json::<Value>().await?["credentials"].clone())
            } else if r.status() == reqwest::StatusCode::NOT_FOUND {
                None
            } else {
                return Err(IssueError::Origin(format!(
                    "account lookup: {}",
                    r.status()
                )));
            }
        };
        let creds = match stored {
            Some(c) => c,
            None => {
                let new = NewAccount {
                    contact: &[],
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let eab = dir
                    .eab
                    .as_ref()
                    .map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key));
                let (_, creds) = self
                    .builder(dir)?
                    .create(&new, dir.url.clone(), eab.as_ref())
                    .await
                    .map_err(acme)?;
                let creds =
                    serde_json::to_value(&creds).map_err(|e| IssueError::Origin(e.to_string()))?;
                let r = self
                    .internal(reqwest::Method::PUT, "/internal/acme/account")
                    .json(&json!({ "directory": dir.url, "credentials": creds, "replace": fresh }))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    return Err(IssueError::Origin(format!("account store: {}", r.status())));
                }
                r.json::<Value>().await?["credentials"].clone()
            }
        };
        let creds: AccountCredentials =
            serde_json::from_value(creds).map_err(|e| IssueError::Origin(e.to_string()))?;
        let account = self
            .builder(dir)?
            .from_credentials(creds)
            .await
            .map_err(acme)?;
        *cached = Some(account.clone());
        Ok(account)
    }

    fn take_rate_slot(&self) -> Result<(), IssueError> {
        let mut recent = self.recent.lock().map_err(|_| IssueError::RateLimited)?;
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            recent.pop_front();
        }
        if recent.len() >= self.cfg.orders_per_minute {
            return Err(IssueError::RateLimited);
        }
        recent.push_back(now);
        Ok(())
    }

    fn pick_directory(&self) -> usize {
        self.failover.lock().map_or(0, |mut f| {
            f.pick(
                Instant::now(),
                self.cfg.failover_after,
                self.cfg.directories.len(),
            )
        })
    }

    /// Orders under one lease: from the directory in use, and once more from
    /// the next one when this order's CA-side failure is what moves orders
    /// there (so a first handshake after the switch does not fail).
    async fn issue_here(&self, hostname: &str) -> Result<Issued, IssueError> {
        let _permit = self
            .concurrent
            .acquire()
            .await
            .map_err(|_| IssueError::RateLimited)?;
        let mut tried = Vec::with_capacity(2);
        let result = loop {
            let index = self.pick_directory();
            let result = self.attempt(hostname, index).await;
            tried.push(index);
            let ca_failure = matches!(result, Err(IssueError::Ca { .. }));
            // Only the CA's answers say how it is doing (not leases,
            // budgets or the origin).
            let answered = ca_failure || matches!(result, Ok(_) | Err(IssueError::Acme(_)));
            if answered && let Ok(mut f) = self.failover.lock() {
                f.record(index, ca_failure, Instant::now());
            }
            if !ca_failure || tried.contains(&self.peek_directory()) {
                break result;
            }
            tracing::warn!(%hostname, directory = %self.cfg.directories[index].name,
                next = %self.cfg.directories[self.peek_directory()].name,
                "ACME directory failing; ordering from the next one");
        };
        let _ = self
            .internal(
                reqwest::Method::DELETE,
                &format!("/internal/acme/leases/{hostname}"),
            )
            .query(&[("holder", &self.cfg.holder)])
            .send()
            .await;
        result
    }

    /// Where [`Issuer::pick_directory`] would send an order now, without
    /// counting it as a probe.
    fn peek_directory(&self) -> usize {
        self.failover.lock().map_or(0, |f| {
            f.next(
                Instant::now(),
                self.cfg.failover_after,
                self.cfg.directories.len(),
            )
        })
    }

    /// Takes (or keeps) the lease with an order admitted against directory
    /// `index`'s budgets, orders, and reports how the order ended.
    async fn attempt(&self, hostname: &str, index: usize) -> Result<Issued, IssueError> {
        let dir = &self.cfg.directories[index];
        let r = self
            .internal(
                reqwest::Method::POST,
                &format!("/internal/acme/leases/{hostname}"),
            )
            .json(&json!({ "holder": self.cfg.holder, "seconds": 120, "directory": dir.url }))
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(IssueError::Origin(format!("lease: {}", r.status())));
        }
        let lease: Value = r.json().await?;
        if let Some(cert) = lease.get("certificate").filter(|c| !c.is_null()) {
            // Already issued (this region's replica has not caught up yet).
            return Stored::from_json(cert).map(Issued::Stored);
        }
        if let Some(r) = lease.get("refused").filter(|r| !r.is_null()) {
            return Err(IssueError::Refused {
                budget: r["budget"].as_str().unwrap_or("unknown").to_owned(),
                reason: r["reason"].as_str().unwrap_or("").to_owned(),
            });
        }
        if lease["acquired"] != true {
            return Err(IssueError::Busy);
        }
        let mut published = Vec::new();
        let mut reached_ca = false;
        // instant-acme's client has no timeout of its own: a CA that accepts
        // connections and never answers must not hold the lease forever.
        let result = tokio::time::timeout(
            ORDER_TIMEOUT,
            self.order(hostname, index, &mut published, &mut reached_ca),
        )
        .await
        .unwrap_or_else(|_| {
            Err(IssueError::Ca {
                directory: dir.name.clone(),
                message: format!("no answer within {} s", ORDER_TIMEOUT.as_secs()),
            })
        });
        // Every admitted order is counted on the primary; say how it ended,
        // and whose fault a failure was (the name's, or the platform's).
        if let Some(order) = lease["order"].as_i64() {
            let (ending, error) = match (&result, reached_ca) {
                (Ok(_), _) => ("valid", None),
                (Err(e), false) => ("not_started", Some(e.to_string())),
                (Err(e @ IssueError::Acme(_)), true) => ("failed", Some(e.to_string())),
                (Err(e), true) => ("platform_error", Some(e.to_string())),
            };
            let sent = self
                .internal(
                    reqwest::Method::POST,
                    &format!("/internal/acme/orders/{order}"),
                )
                .json(&json!({ "ending": ending, "error": error }))
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    // Unreported: the primary counts it as failed after 10 minutes.
                    tracing::warn!(%hostname, status = %r.status(), "the origin refused the order's report");
                }
                Err(e) => {
                    tracing::warn!(%hostname, error = %e, "could not report how the order ended");
                }
            }
        }
        for p in published {
            let path = match p {
                Published::Http(token) => format!("/internal/acme/challenges/{token}"),
                Published::Dns(name) => format!("/internal/acme/dns01/{name}"),
            };
            let _ = self.internal(reqwest::Method::DELETE, &path).send().await;
        }
        result.map(|(chain_pem, key_pem)| Issued::Ordered {
            chain_pem,
            key_pem,
            issuer: dir.name.clone(),
        })
    }

    /// Orders a certificate from directory `index`; `reached_ca` is set once
    /// the CA has answered the order (from then on it counts against the
    /// CA's limits).
    async fn order(
        &self,
        hostname: &str,
        index: usize,
        published: &mut Vec<Published>,
        reached_ca: &mut bool,
    ) -> Result<(String, String), IssueError> {
        let dir = &self.cfg.directories[index];
        let acme = |e| classify(&dir.name, e);
        self.take_rate_slot()?;
        let ids = [Identifier::Dns(hostname.to_owned())];
        let account = self.account(index, false).await?;
        let placed = match account.new_order(&NewOrder::new(&ids)).await {
            Err(instant_acme::Error::Api(p))
                if p.r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":accountDoesNotExist")) =>
            {
                tracing::warn!(directory = %dir.name, "the CA no longer knows our account; creating a new one");
                self.account(index, true)
                    .await?
                    .new_order(&NewOrder::new(&ids))
                    .await
            }
            other => other,
        };
        // A problem document is the CA's answer to the order: it counted.
        *reached_ca = matches!(placed, Ok(_) | Err(instant_acme::Error::Api(_)));
        let mut order = placed.map_err(acme)?;
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a.map_err(acme)?;
            if a.status == AuthorizationStatus::Valid {
                continue;
            }
            if let Some(base) = hostname.strip_prefix("*.") {
                // A wildcard can only be proven with DNS-01: the origin
                // publishes the TXT value in the platform zone.
                let mut ch = a
                    .challenge(ChallengeType::Dns01)
                    .ok_or_else(|| IssueError::Acme("no dns-01 challenge offered".into()))?;
                let value = ch.key_authorization().dns_value();
                let r = self
                    .internal(
                        reqwest::Method::PUT,
                        &format!("/internal/acme/dns01/{base}"),
                    )
                    .json(&json!({ "value": value }))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    return Err(IssueError::Origin(format!(
                        "dns-01 publish: {}",
                        r.status()
                    )));
                }
                published.push(Published::Dns(base.to_owned()));
                ch.set_ready().await.map_err(acme)?;
                continue;
            }
            let mut ch = a
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| IssueError::Acme("no http-01 challenge offered".into()))?;
            let token = ch.token.clone();
            let ka = ch.key_authorization().as_str().to_owned();
            let r = self
                .internal(
                    reqwest::Method::PUT,
                    &format!("/internal/acme/challenges/{token}"),
                )
                .json(&json!({ "hostname": hostname, "key_authorization": ka }))
                .send()
                .await?;
            if !r.status().is_success() {
                return Err(IssueError::Origin(format!(
                    "challenge publish: {}",
                    r.status()
                )));
            }
            published.push(Published::Http(token));
            ch.set_ready().await.map_err(acme)?;
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(100))
            .timeout(Duration::from_secs(20));
        // Still pending after the wait: the CA is validating this name
        // slowly (its DNS, its host), which the seller controls.
        let status = order.poll_ready(&retry).await.map_err(|e| match e {
            e @ instant_acme::Error::Timeout(None) => IssueError::Acme(e.to_string()),
            e => acme(e),
        })?;
        if status != OrderStatus::Ready {
            return Err(IssueError::Acme(format!("order is {status:?}, not ready")));
        }
        let key_pem = order.finalize().await.map_err(acme)?;
        let chain_pem = order.poll_certificate(&retry).await.map_err(acme)?;
        let r = self
            .internal(
                reqwest::Method::PUT,
                &format!("/internal/certificates/{hostname}"),
            )
            .json(&json!({ "chain_pem": chain_pem, "key_pem": key_pem, "issuer": dir.name }))
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(IssueError::Origin(format!(
                "certificate store: {}",
                r.status()
            )));
        }
        Ok((chain_pem, key_pem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16, standby: bool) -> reqwest::Result<reqwest::Response> {
        let mut b = http::Response::builder().status(status);
        if standby {
            b = b.header("x-edgefront-database", "standby");
        }
        Ok(reqwest::Response::from(
            b.body(Vec::<u8>::new()).expect("a valid response"),
        ))
    }

    /// An internal call moves to the next origin only where nothing can
    /// have been written (or, for a read, where repeating is harmless): a
    /// write that may have reached a database is never sent twice.
    #[tokio::test]
    async fn an_internal_call_moves_on_only_where_nothing_can_have_been_written() {
        let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);
        // A standby's origin refused the write: nothing was written.
        assert!(try_elsewhere(&post, &answered(503, true)));
        // Any other 503 of a write may have come after a commit.
        assert!(!try_elsewhere(&post, &answered(503, false)));
        assert!(try_elsewhere(&get, &answered(503, false)));
        for (m, code) in [
            (&post, 201),
            (&post, 409),
            (&post, 400),
            (&get, 200),
            (&get, 404),
        ] {
            assert!(!try_elsewhere(m, &answered(code, false)), "{m} {code}");
        }
        // Not reached: a port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(300))
            .build()
            .expect("a client");
        let refused = http.post(format!("http://{closed}/")).send().await;
        assert!(refused.as_ref().is_err_and(reqwest::Error::is_connect));
        assert!(try_elsewhere(&post, &refused));
        // Reached, then silent (the kernel accepts, nothing answers): the
        // write may be in flight, so only a read moves on.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let at = silent.local_addr().expect("its address");
        let timed_out = http.post(format!("http://{at}/")).send().await;
        assert!(timed_out.as_ref().is_err_and(reqwest::Error::is_timeout));
        assert!(!try_elsewhere(&post, &timed_out));
        let timed_out = http.get(format!("http://{at}/")).send().await;
        assert!(try_elsewhere(&get, &timed_out));
    }

    const AFTER: Duration = Duration::from_secs(60);

    #[test]
    fn orders_stay_on_the_first_directory_until_it_has_failed_for_the_configured_time() {
        let t0 = Instant::now();
        let mut f = Failover::default();
        assert_eq!(f.pick(t0, AFTER, 2), 0);
        f.record(0, true, t0);
        assert_eq!(
            f.pick(t0 + AFTER / 2, AFTER, 2),
            0,
            "not failing long enough"
        );
        f.record(0, true, t0 + AFTER / 2);
        // Failed over: the last try was under `AFTER` ago.
        assert_eq!(f.pick(t0 + AFTER, AFTER, 2), 1);
        assert_eq!(f.pick(t0 + AFTER + AFTER / 4, AFTER, 2), 1);
        // One probe of the first per `AFTER`, then the second again.
        let probe = t0 + AFTER / 2 + AFTER;
        assert_eq!(f.pick(probe, AFTER, 2), 0);
        assert_eq!(f.pick(probe, AFTER, 2), 1);
        f.record(0, true, probe);
        assert_eq!(f.pick(probe + AFTER / 2, AFTER, 2), 1);
        // The first answers again: back to it at once.
        f.record(0, false, probe + AFTER);
        assert_eq!(f.pick(probe + AFTER, AFTER, 2), 0);
        assert!(!f.failed_over(probe + AFTER, AFTER, 2));
    }

    #[test]
    fn a_single_directory_is_never_left_and_the_second_ones_results_do_not_move_orders() {
        let t0 = Instant::now();
        let mut f = Failover::default();
        f.record(0, true, t0);
        assert_eq!(f.pick(t0 + AFTER * 10, AFTER, 1), 0);
        let mut f = Failover::default();
        f.record(0, true, t0);
        f.record(1, false, t0 + AFTER);
        assert!(f.failed_over(t0 + AFTER, AFTER, 2));
        // With no wait configured, the first CA-side failure moves orders.
        let mut f = Failover::default();
        f.record(0, true, t0);
        assert_eq!(f.pick(t0, Duration::ZERO, 2), 1);
    }

    #[test]
    fn the_ca_failing_is_told_apart_from_the_name_failing() {
        let problem = |t: &str| {
            instant_acme::Error::Api(
                serde_json::from_value(json!({ "type": t, "detail": "x" })).expect("problem"),
            )
        };
        for t in [
            "urn:ietf:params:acme:error:rateLimited",
            "urn:ietf:params:acme:error:serverInternal",
            "urn:ietf:params:acme:error:badNonce",
            "urn:ietf:params:acme:error:externalAccountRequired",
            "urn:ietf:params:acme:error:userActionRequired",
            "urn:ietf:params:acme:error:malformed",
            "urn:ietf:params:acme:error:badCSR",
            "urn:ietf:params:acme:error:unauthorized",
        ] {
            assert!(
                matches!(classify("le", problem(t)), IssueError::Ca { .. }),
                "{t}"
            );
        }
        for t in [
            "urn:ietf:params:acme:error:caa",
            "urn:ietf:params:acme:error:rejectedIdentifier",
            "urn:ietf:params:acme:error:dns",
        ] {
            assert!(
                matches!(classify("le", problem(t)), IssueError::Acme(_)),
                "{t}"
            );
        }
        assert!(matches!(
            classify("le", instant_acme::Error::Str("no nonce")),
            IssueError::Ca { .. }
        ));
        assert!(matches!(
            classify("le", instant_acme::Error::Timeout(None)),
            IssueError::Ca { .. }
        ));
    }
}
