//! The origin's database cluster as Patroni sees it (`edge-ctl database`):
//! who leads, which member is the synchronous standby (RPO 0 rests on it),
//! and every member's state, timeline and replay lag, read from Patroni's
//! REST API (`GET /cluster`, a safe endpoint: no credentials).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// One member, as Patroni's `/cluster` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    /// `leader`, `sync_standby`, `replica` (or `standby_leader`).
    pub role: String,
    /// `running`, `streaming`, `stopped`, `starting`, …
    pub state: String,
    #[serde(default)]
    pub timeline: Option<u64>,
    /// Replay lag in bytes behind the leader (`unknown` while Patroni cannot
    /// tell); absent on the leader.
    #[serde(default)]
    pub lag: Option<serde_json::Value>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    /// `nofailover`, `nosync`… (a regional replica carries `nofailover`).
    #[serde(default)]
    pub tags: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The cluster, and which API answered.
#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub members: Vec<Member>,
    /// The REST API that answered.
    pub source: String,
}

#[derive(Deserialize)]
struct ClusterJson {
    members: Vec<Member>,
}

impl Cluster {
    /// The member that leads, if any.
    pub fn leader(&self) -> Option<&Member> {
        self.members.iter().find(|m| m.role == "leader")
    }

    /// The synchronous standby, if any.
    pub fn sync_standby(&self) -> Option<&Member> {
        self.members.iter().find(|m| m.role == "sync_standby")
    }
}

/// Reads `/cluster` from the first of `apis` that answers (each within
/// 3 s); `ca`: the PEM that an `https` API's certificate chains to.
pub async fn read(apis: &[String], ca: Option<&Path>) -> Result<Cluster> {
    let mut http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(3));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("{}", ca.display()))?;
        http = http
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    let http = http.build()?;
    let mut errors = Vec::new();
    for api in apis {
        let url = format!("{}/cluster", api.trim_end_matches('/'));
        match http.get(&url).send().await {
            Ok(r) if r.status().is_success() => match r.json::<ClusterJson>().await {
                Ok(c) => {
                    return Ok(Cluster {
                        members: c.members,
                        source: api.clone(),
                    });
                }
                Err(e) => errors.push(format!("{url}: not Patroni's cluster JSON: {e}")),
            },
            Ok(r) => errors.push(format!("{url}: {}", r.status())),
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    bail!("no Patroni REST API answered: {}", errors.join("; "))
}

/// Puts the cluster into Patroni's maintenance mode (`on`) or takes it out,
/// through the first of `apis` that takes `PATCH /config` (basic auth
/// `user`, `password`), and returns once every member says so (within
/// 30 s). In maintenance mode Patroni changes nothing by itself: no
/// failover, and no resuming of a WAL replay paused by hand (otherwise it
/// resumes one within a loop, as PostgreSQL 14+ pauses replay on a
/// parameter change).
pub async fn set_maintenance(
    http: &reqwest::Client,
    apis: &[String],
    (user, password): (&str, &str),
    on: bool,
) -> Result<()> {
    let mut errors = Vec::new();
    let mut done = false;
    for api in apis {
        let url = format!("{}/config", api.trim_end_matches('/'));
        match http
            .patch(&url)
            .basic_auth(user, Some(password))
            .json(&serde_json::json!({ "pause": on }))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                done = true;
                break;
            }
            Ok(r) => errors.push(format!("{url}: {}", r.status())),
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    if !done {
        bail!("no Patroni REST API took the change: {}", errors.join("; "));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for api in apis {
        let url = format!("{}/patroni", api.trim_end_matches('/'));
        loop {
            // `pause` is absent when not paused.
            let seen = match http.get(&url).send().await {
                Ok(r) => r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .map(|v| v.get("pause").and_then(serde_json::Value::as_bool) == Some(true)),
                Err(_) => None,
            };
            if seen == Some(on) {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("{url}: maintenance mode {on} not seen within 30 s ({seen:?})");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// The table `edge-ctl database` prints.
pub fn render(c: &Cluster) -> String {
    let mut out = format!(
        "leader: {}   sync standby: {}   (from {})\n",
        c.leader().map_or("NONE (writes stop)", |m| m.name.as_str()),
        c.sync_standby()
            .map_or("NONE (no RPO 0)", |m| m.name.as_str()),
        c.source
    );
    out.push_str(&format!(
        "{:<14} {:<13} {:<10} {:>8} {:>12}  {}\n",
        "MEMBER", "ROLE", "STATE", "TIMELINE", "LAG BYTES", "TAGS"
    ));
    for m in &c.members {
        let lag = match &m.lag {
            None => "-".to_owned(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            Some(v) => v.as_str().unwrap_or("?").to_owned(),
        };
        let tags = m
            .tags
            .as_ref()
            .map(|t| {
                t.iter()
                    .filter(|(_, v)| v.as_bool() != Some(false))
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<14} {:<13} {:<10} {:>8} {:>12}  {}\n",
            m.name,
            m.role,
            m.state,
            m.timeline.map_or("-".to_owned(), |t| t.to_string()),
            lag,
            tags
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patroni_cluster_json_is_read_and_shown() {
        let c: ClusterJson = serde_json::from_str(
            r#"{"members":[
              {"name":"cand1","role":"leader","state":"running","api_url":"http://127.0.0.1:1/patroni","host":"127.0.0.1","port":5432,"timeline":3},
              {"name":"cand2","role":"sync_standby","state":"streaming","host":"127.0.0.1","port":5433,"timeline":3,"lag":0},
              {"name":"bom1","role":"replica","state":"streaming","timeline":3,"lag":"unknown","tags":{"nofailover":true,"nosync":true}}
            ],"scope":"edgefront"}"#,
        )
        .expect("cluster JSON");
        let c = Cluster {
            members: c.members,
            source: "http://127.0.0.1:1".into(),
        };
        assert_eq!(c.leader().map(|m| m.name.as_str()), Some("cand1"));
        assert_eq!(c.sync_standby().map(|m| m.name.as_str()), Some("cand2"));
        let text = render(&c);
        assert!(
            text.starts_with("leader: cand1   sync standby: cand2"),
            "{text}"
        );
        assert!(text.contains("nofailover,nosync"), "{text}");
        assert!(text.contains("unknown"), "{text}");
        let none = Cluster {
            members: Vec::new(),
            source: "x".into(),
        };
        assert!(render(&none).starts_with("leader: NONE (writes stop)"));
    }
}
