//! The health hooks' admin API, as `edge-ctl` calls it.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use edgefront_health::daemon::Status;

/// A client holding the admin tokens: each region's hook takes only its
/// own region's token (one node's token cannot drain another region).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Sent where no region token applies.
    token: String,
    /// (hook base URL, that region's token).
    per_base: Vec<(String, String)>,
}

impl Client {
    /// One token for every hook.
    pub fn new(token: &str) -> Result<Client> {
        Self::with_tokens(token, Vec::new())
    }

    /// A token per hook base URL (`http://host:port`), `default` elsewhere.
    pub fn with_tokens(default: &str, per_base: Vec<(String, String)>) -> Result<Client> {
        Ok(Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()?,
            token: default.to_owned(),
            per_base,
        })
    }

    fn token_for(&self, url: &str) -> &str {
        self.per_base
            .iter()
            .find(|(base, _)| {
                url.strip_prefix(base.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
            .map_or(self.token.as_str(), |(_, t)| t.as_str())
    }

    async fn call(&self, method: reqwest::Method, url: &str) -> Result<serde_json::Value> {
        let r = self
            .http
            .request(method, url)
            .bearer_auth(self.token_for(url))
            .send()
            .await
            .with_context(|| format!("{url}: unreachable"))?;
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            bail!("{url}: 401 unauthorized: wrong or missing admin token");
        }
        if !status.is_success() {
            bail!("{url}: {status}: {}", body["error"].as_str().unwrap_or(""));
        }
        Ok(body)
    }

    pub async fn status(&self, base: &str) -> Result<Status> {
        let v = self
            .call(reqwest::Method::GET, &format!("{base}/status"))
            .await?;
        serde_json::from_value(v).with_context(|| format!("{base}/status: unexpected answer"))
    }

    pub async fn drain(&self, base: &str) -> Result<bool> {
        let v = self
            .call(reqwest::Method::POST, &format!("{base}/drain"))
            .await?;
        Ok(v["started"].as_bool().unwrap_or(false))
    }

    pub async fn undrain(&self, base: &str) -> Result<bool> {
        let v = self
            .call(reqwest::Method::POST, &format!("{base}/undrain"))
            .await?;
        Ok(v["was_drained"].as_bool().unwrap_or(false))
    }
}
