//! The health hooks' admin API, as `edge-ctl` calls it.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use edgefront_health::daemon::Status;

/// A client holding the admin token.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    token: String,
}

impl Client {
    pub fn new(token: &str) -> Result<Client> {
        Ok(Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()?,
            token: token.to_owned(),
        })
    }

    async fn call(&self, method: reqwest::Method, url: &str) -> Result<serde_json::Value> {
        let r = self
            .http
            .request(method, url)
            .bearer_auth(&self.token)
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
