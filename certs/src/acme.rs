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
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use instant_acme::{
    Account, AccountBuilder, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier,
    NewAccount, NewOrder, OrderStatus, RetryPolicy,
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
    /// The CA refused or failed.
    #[error("acme: {0}")]
    Acme(String),
    /// A budget on the primary refused the order before it reached the CA.
    #[error("refused by the {budget} budget: {reason}")]
    Refused { budget: String, reason: String },
    /// The origin's internal API failed.
    #[error("origin: {0}")]
    Origin(String),
}

impl From<instant_acme::Error> for IssueError {
    fn from(e: instant_acme::Error) -> Self {
        IssueError::Acme(e.to_string())
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
        })
    }
}

/// What [`Issuer::issue`] produced. (No `Debug`: it can hold a private key.)
pub enum Issued {
    /// This issuer ordered the certificate and stored it through the origin.
    Ordered { chain_pem: String, key_pem: String },
    /// The primary already held a current certificate for the name (another
    /// region issued or renewed it): nothing was ordered.
    Stored(Stored),
}

/// Where and how to issue.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// The ACME directory URL.
    pub directory: String,
    /// A PEM root to trust for the directory's TLS (pebble in tests); else webpki roots.
    pub ca_root: Option<PathBuf>,
    /// The origin's base URL (`http://host:port`).
    pub origin: String,
    /// Bearer token of the origin's internal API.
    pub internal_token: String,
    /// This issuer's name in leases (region + process).
    pub holder: String,
    /// Most orders per minute from this issuer (kept under the CA's limits).
    pub orders_per_minute: usize,
}

/// A challenge published for an order, removed when it ends.
enum Published {
    /// An HTTP-01 token.
    Http(String),
    /// A DNS-01 record under this name (`_acme-challenge.<name>`).
    Dns(String),
}

/// An ACME issuer. Its ACME and origin HTTP clients live on a runtime of
/// their own (one thread), so callers on any runtime — Pingora's proxy and
/// background runtimes — share pooled connections safely.
pub struct Issuer {
    rt: tokio::runtime::Handle,
    cfg: IssuerConfig,
    http: reqwest::Client,
    account: tokio::sync::Mutex<Option<Account>>,
    concurrent: Semaphore,
    recent: Mutex<VecDeque<Instant>>,
}

impl Issuer {
    /// A new issuer; nothing is contacted until the first issuance.
    pub fn new(cfg: IssuerConfig) -> std::io::Result<Arc<Self>> {
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
            .build()
            .unwrap_or_default();
        Ok(Arc::new(Issuer {
            rt: handle,
            cfg,
            http,
            account: tokio::sync::Mutex::new(None),
            concurrent: Semaphore::new(4),
            recent: Mutex::default(),
        }))
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
            .map_err(|e| IssueError::Acme(format!("issuer task: {e}")))?
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
            .map_err(|e| IssueError::Acme(format!("issuer task: {e}")))?
    }

    fn builder(&self) -> Result<AccountBuilder, IssueError> {
        Ok(match &self.cfg.ca_root {
            Some(p) => Account::builder_with_root(p)?,
            None => Account::builder()?,
        })
    }

    fn internal(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.cfg.origin))
            .bearer_auth(&self.cfg.internal_token)
    }

    /// The shared account: cached, else loaded from the origin, else created
    /// (first writer wins). With `fresh`, a new account replaces the stored one
    /// (the CA no longer knows it, e.g. after a CA reset).
    async fn account(&self, fresh: bool) -> Result<Account, IssueError> {
        let mut cached = self.account.lock().await;
        if !fresh && let Some(a) = cached.as_ref() {
            return Ok(a.clone());
        }
        let dir = self.cfg.directory.clone();
        let stored = if fresh {
            None
        } else {
            let r = self
                .internal(reqwest::Method::GET, "/internal/acme/account")
                .query(&[("directory", &dir)])
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
                let (_, creds) = self.builder()?.create(&new, dir.clone(), None).await?;
                let creds =
                    serde_json::to_value(&creds).map_err(|e| IssueError::Acme(e.to_string()))?;
                let r = self
                    .internal(reqwest::Method::PUT, "/internal/acme/account")
                    .json(&json!({ "directory": dir, "credentials": creds, "replace": fresh }))
                    .send()
                    .await?;
                if !r.status().is_success() {
                    return Err(IssueError::Origin(format!("account store: {}", r.status())));
                }
                r.json::<Value>().await?["credentials"].clone()
            }
        };
        let creds: AccountCredentials =
            serde_json::from_value(creds).map_err(|e| IssueError::Acme(e.to_string()))?;
        let account = self.builder()?.from_credentials(creds).await?;
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

    async fn issue_here(&self, hostname: &str) -> Result<Issued, IssueError> {
        let _permit = self
            .concurrent
            .acquire()
            .await
            .map_err(|_| IssueError::RateLimited)?;
        let r = self
            .internal(
                reqwest::Method::POST,
                &format!("/internal/acme/leases/{hostname}"),
            )
            .json(&json!({ "holder": self.cfg.holder, "seconds": 120 }))
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
        let result = self.order(hostname, &mut published, &mut reached_ca).await;
        // Every admitted order is counted on the primary; say how it ended.
        if let Some(order) = lease["order"].as_i64() {
            let (ending, error) = match (&result, reached_ca) {
                (Ok(_), _) => ("valid", None),
                (Err(e), true) => ("failed", Some(e.to_string())),
                (Err(e), false) => ("not_started", Some(e.to_string())),
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
        let _ = self
            .internal(
                reqwest::Method::DELETE,
                &format!("/internal/acme/leases/{hostname}"),
            )
            .query(&[("holder", &self.cfg.holder)])
            .send()
            .await;
        result.map(|(chain_pem, key_pem)| Issued::Ordered { chain_pem, key_pem })
    }

    /// Orders a certificate; `reached_ca` is set once the CA has accepted
    /// the order (from then on a failure counts against the CA's limits).
    async fn order(
        &self,
        hostname: &str,
        published: &mut Vec<Published>,
        reached_ca: &mut bool,
    ) -> Result<(String, String), IssueError> {
        self.take_rate_slot()?;
        let ids = [Identifier::Dns(hostname.to_owned())];
        let account = self.account(false).await?;
        let mut order = match account.new_order(&NewOrder::new(&ids)).await {
            Err(instant_acme::Error::Api(p))
                if p.r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":accountDoesNotExist")) =>
            {
                tracing::warn!(directory = %self.cfg.directory, "the CA no longer knows our account; creating a new one");
                self.account(true)
                    .await?
                    .new_order(&NewOrder::new(&ids))
                    .await?
            }
            other => other?,
        };
        *reached_ca = true;
        let mut authzs = order.authorizations();
        while let Some(a) = authzs.next().await {
            let mut a = a?;
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
                ch.set_ready().await?;
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
            ch.set_ready().await?;
        }
        let retry = RetryPolicy::new()
            .initial_delay(Duration::from_millis(100))
            .timeout(Duration::from_secs(20));
        let status = order.poll_ready(&retry).await?;
        if status != OrderStatus::Ready {
            return Err(IssueError::Acme(format!("order is {status:?}, not ready")));
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&retry).await?;
        let r = self
            .internal(
                reqwest::Method::PUT,
                &format!("/internal/certificates/{hostname}"),
            )
            .json(&json!({ "chain_pem": chain_pem, "key_pem": key_pem }))
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
