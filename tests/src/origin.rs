//! The origin binary as a fixture: started against a primary (migrating
//! it), its internal PKI, the seller API's and internal API's clients.

use super::*;

/// A running origin.
pub struct Origin {
    pub proc: Proc,
    pub addr: SocketAddr,
    /// The DNS server the origin looks ownership proofs up through.
    pub dns: std::sync::Arc<Dns>,
    /// The internal API's listener and PKI, when it runs one (started with
    /// `--internal-token`).
    pub internal: Option<(SocketAddr, std::sync::Arc<InternalPki>)>,
    database_url: String,
    platform_domain: String,
    extra: Vec<String>,
}

/// A test deployment's internal PKI: a CA in a temporary directory, the
/// origin's server certificate (`127.0.0.1`) and a client certificate per
/// region node, as ansible and the lab make them.
pub struct InternalPki {
    dir: tempfile::TempDir,
    ca: edgefront_certs::pki::InternalCa,
}

impl InternalPki {
    /// A new CA and the origin's certificate for `origin_names`.
    pub fn new(origin_names: &[&str]) -> Result<InternalPki> {
        use edgefront_certs::pki::{InternalCa, Usage};
        let dir = tempfile::tempdir()?;
        let ca = InternalCa::create(dir.path())?;
        let names: Vec<String> = origin_names.iter().map(|n| n.to_string()).collect();
        ca.ensure("origin", "origin", &names, Usage::Server)?;
        Ok(InternalPki { dir, ca })
    }

    /// The directory holding the CA and every certificate.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The identity of client `name` (a region node), issued on first use.
    pub fn client_identity(&self, name: &str) -> Result<edgefront_certs::pki::Identity> {
        self.ca
            .ensure(name, name, &[], edgefront_certs::pki::Usage::Client)?;
        Ok(edgefront_certs::pki::Identity::in_dir(
            self.dir.path(),
            name,
        ))
    }

    /// A server certificate `file` for `names` from this CA.
    pub fn server_identity(
        &self,
        file: &str,
        names: &[&str],
    ) -> Result<edgefront_certs::pki::Identity> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.ca
            .ensure(file, file, &names, edgefront_certs::pki::Usage::Server)?;
        Ok(edgefront_certs::pki::Identity::in_dir(
            self.dir.path(),
            file,
        ))
    }

    /// The origin's server identity.
    pub fn origin_identity(&self) -> edgefront_certs::pki::Identity {
        edgefront_certs::pki::Identity::in_dir(self.dir.path(), "origin")
    }

    /// An HTTP client presenting client `name`'s certificate, trusting only
    /// the internal CA.
    pub fn client(&self, name: &str) -> Result<reqwest::Client> {
        let tls = self.client_identity(name)?.client_config()?;
        Ok(reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .use_preconfigured_tls(tls)
            .build()?)
    }
}

impl Origin {
    /// Starts the origin against the primary at `database_url` (migrating it).
    pub fn start(database_url: &str, platform_domain: &str) -> Result<Origin> {
        // A free port can be taken by a concurrent test between pick and bind.
        let mut last = None;
        for _ in 0..3 {
            match Self::start_on(
                database_url,
                platform_domain,
                SocketAddr::from(([127, 0, 0, 1], free_port())),
            ) {
                Ok(o) => return Ok(o),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("origin did not start")))
    }

    /// Starts the origin on a given address.
    pub fn start_on(database_url: &str, platform_domain: &str, addr: SocketAddr) -> Result<Origin> {
        Self::start_with(database_url, platform_domain, addr, &[])
    }

    /// Starts the origin on a given address with extra global flags, with a
    /// DNS server of its own.
    pub fn start_with(
        database_url: &str,
        platform_domain: &str,
        addr: SocketAddr,
        extra: &[&str],
    ) -> Result<Origin> {
        let dns = std::sync::Arc::new(Dns::start()?);
        Self::start_with_dns(database_url, platform_domain, addr, extra, dns)
    }

    /// Like [`Origin::start_with`], looking proofs up through `dns`.
    pub fn start_with_dns(
        database_url: &str,
        platform_domain: &str,
        addr: SocketAddr,
        extra: &[&str],
        dns: std::sync::Arc<Dns>,
    ) -> Result<Origin> {
        // With an internal token, the internal API listens on a port of its
        // own under a fresh internal CA.
        let internal = if extra.contains(&"--internal-token") {
            let pki = std::sync::Arc::new(InternalPki::new(&["127.0.0.1"])?);
            Some((SocketAddr::from(([127, 0, 0, 1], free_port())), pki))
        } else {
            None
        };
        Self::start_full(database_url, platform_domain, addr, extra, dns, internal)
    }

    fn start_full(
        database_url: &str,
        platform_domain: &str,
        addr: SocketAddr,
        extra: &[&str],
        dns: std::sync::Arc<Dns>,
        internal: Option<(SocketAddr, std::sync::Arc<InternalPki>)>,
    ) -> Result<Origin> {
        let mut cmd = Command::new(binary("origin")?);
        if let Some((at, pki)) = &internal {
            let id = pki.origin_identity();
            cmd.arg("--internal-listen").arg(at.to_string());
            cmd.arg("--internal-ca").arg(&id.ca);
            cmd.arg("--internal-tls-cert").arg(&id.cert);
            cmd.arg("--internal-tls-key").arg(&id.key);
        }
        // The test DNS server is also the platform zone's: DNS-01 challenges
        // for the platform wildcard are published in it.
        cmd.args(["--dns-server", &dns.addr().to_string()]);
        cmd.args(["--dns-update-url", &dns.management_url()]);
        cmd.args(extra);
        cmd.args([
            "--listen",
            &addr.to_string(),
            "--database-url",
            database_url,
            "--platform-domain",
            platform_domain,
            "serve",
        ]);
        cmd.env("RUST_LOG", "warn");
        let mut proc = Proc::spawn("origin", cmd)?;
        wait_port(addr, Duration::from_secs(30), &mut proc.child, "origin")
            .map_err(|e| anyhow::anyhow!("{e}\n{}", proc.log()))?;
        if let Some((at, _)) = &internal {
            wait_port(
                *at,
                Duration::from_secs(10),
                &mut proc.child,
                "origin internal",
            )
            .map_err(|e| anyhow::anyhow!("{e}\n{}", proc.log()))?;
        }
        Ok(Origin {
            proc,
            addr,
            dns,
            internal,
            database_url: database_url.into(),
            platform_domain: platform_domain.into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Claims `hostname` for the store of `token`, publishes the claim's TXT
    /// record in the origin's DNS and has the origin verify it: the domain
    /// is then active (served, and allowed a certificate). Returns the claim.
    pub async fn attach_proven(&self, token: &str, hostname: &str) -> Result<serde_json::Value> {
        let r = client()
            .post(format!("{}/api/domains", self.url()))
            .bearer_auth(token)
            .json(&serde_json::json!({ "hostname": hostname }))
            .send()
            .await?;
        let status = r.status();
        let v: serde_json::Value = r.json().await?;
        if !status.is_success() {
            bail!("claim {hostname}: {status} {v}");
        }
        let d = &v["domain"];
        let (name, value) = (
            d["record"]["name"].as_str().context("record name")?,
            d["record"]["value"].as_str().context("record value")?,
        );
        self.dns.set_txt(name, value).await?;
        self.verify(token, d["hostname"].as_str().context("hostname")?)
            .await
            .and_then(|c| {
                if c["domain"]["state"] == "active" {
                    Ok(c)
                } else {
                    bail!("{hostname} not active after its proof: {c}")
                }
            })
    }

    /// `POST /api/domains/{hostname}/verify`: the claim after a check now.
    pub async fn verify(&self, token: &str, hostname: &str) -> Result<serde_json::Value> {
        let r = client()
            .post(format!("{}/api/domains/{hostname}/verify", self.url()))
            .bearer_auth(token)
            .send()
            .await?;
        let status = r.status();
        let v: serde_json::Value = r.json().await?;
        if !status.is_success() {
            bail!("verify {hostname}: {status} {v}");
        }
        Ok(v)
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The internal API's base URL, e.g. `https://127.0.0.1:41235`.
    pub fn internal_url(&self) -> Result<String> {
        let (at, _) = self
            .internal
            .as_ref()
            .context("the origin has no internal API")?;
        Ok(format!("https://{at}"))
    }

    /// A client of the internal API holding region node `name`'s certificate.
    pub fn internal_client(&self, name: &str) -> Result<reqwest::Client> {
        let (_, pki) = self
            .internal
            .as_ref()
            .context("the origin has no internal API")?;
        pki.client(name)
    }

    /// The edge flags that reach the internal API as region node `region`.
    pub fn edge_internal_args(&self, region: &str) -> Result<Vec<String>> {
        let (at, pki) = self
            .internal
            .as_ref()
            .context("the origin has no internal API")?;
        let id = pki.client_identity(region)?;
        let path = |p: &Path| p.to_str().map(str::to_owned).context("path");
        Ok(vec![
            "--origin-internal".into(),
            at.to_string(),
            "--internal-ca".into(),
            path(&id.ca)?,
            "--internal-tls-cert".into(),
            path(&id.cert)?,
            "--internal-tls-key".into(),
            path(&id.key)?,
        ])
    }

    /// Stops the origin (SIGKILL).
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same address.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let fresh = Origin::start_full(
            &self.database_url,
            &self.platform_domain,
            self.addr,
            &extra,
            self.dns.clone(),
            self.internal.clone(),
        )?;
        *self = fresh;
        Ok(())
    }

    /// Runs `origin demo` against the primary: creates the demo stores.
    pub fn seed_demo(database_url: &str, platform_domain: &str) -> Result<serde_json::Value> {
        let out = Command::new(binary("origin")?)
            .args([
                "--database-url",
                database_url,
                "--platform-domain",
                platform_domain,
                "demo",
            ])
            .env("RUST_LOG", "warn")
            .output()?;
        if !out.status.success() {
            bail!(
                "origin demo failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}
