//! Certificate authorities for tests and the lab: [`TestCa`] (rcgen), and
//! pebble (Debian's ACME CA) with pebble-challtestsrv as its DNS ([`Dns`],
//! [`Pebble`]); helpers that read what a TLS listener serves.

use super::*;

/// A throwaway certificate authority for tests and the lab (rcgen).
pub struct TestCa {
    /// The CA certificate, PEM: give it to clients as the trust root.
    pub pem: String,
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
}

impl TestCa {
    /// A new CA with a fresh key.
    pub fn new() -> Result<TestCa> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "edgefront test CA");
        let pem = params.self_signed(&key)?.pem();
        Ok(TestCa { pem, params, key })
    }

    /// A leaf certificate for `names`, signed by this CA: (chain PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?
                .signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The DNS server of tests: `pebble-challtestsrv` (Debian `pebble`),
/// authoritative for every name it is asked about, with records added and
/// removed through its management API. The origin looks ownership proofs up
/// through it and pebble resolves validation names through it, so both see
/// the same zone. A and AAAA queries without a record are answered with
/// 127.0.0.1 (HTTP-01 reaches the edge on loopback); TXT queries without a
/// record get an empty answer.
pub struct Dns {
    proc: std::sync::Mutex<Proc>,
    /// UDP and TCP port of the DNS listener.
    pub port: u16,
    mgmt_port: u16,
}

impl Dns {
    /// Starts one on free ports (retried if a port was taken meanwhile).
    pub fn start() -> Result<Dns> {
        let mut last = None;
        for _ in 0..3 {
            let (port, mgmt_port) = (free_port(), free_port());
            let mut c = Command::new("pebble-challtestsrv");
            c.args(Dns::args(
                SocketAddr::from(([127, 0, 0, 1], port)),
                [127, 0, 0, 1].into(),
                SocketAddr::from(([127, 0, 0, 1], mgmt_port)),
            ));
            let mut proc = Proc::spawn("challtestsrv", c)?;
            match wait_port(
                SocketAddr::from(([127, 0, 0, 1], mgmt_port)),
                Duration::from_secs(10),
                &mut proc.child,
                "challtestsrv",
            ) {
                Ok(()) => {
                    return Ok(Dns {
                        proc: std::sync::Mutex::new(proc),
                        port,
                        mgmt_port,
                    });
                }
                Err(e) => last = Some(anyhow::anyhow!("{e}\n{}", proc.log())),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("challtestsrv did not start")))
    }

    /// `pebble-challtestsrv`'s arguments: DNS on `dns`, A queries without a
    /// record answered with `default_a`, management API on `mgmt`, no
    /// challenge servers of its own.
    pub fn args(dns: SocketAddr, default_a: std::net::Ipv4Addr, mgmt: SocketAddr) -> Vec<String> {
        [
            "-dns01",
            &dns.to_string(),
            "-defaultIPv4",
            &default_a.to_string(),
            "-defaultIPv6",
            "",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            &mgmt.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Stops the server (a DNS outage); lookups then fail.
    pub fn stop(&self) {
        if let Ok(mut p) = self.proc.lock() {
            p.kill();
        }
    }

    /// Base URL of its management API.
    pub fn management_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.mgmt_port)
    }

    /// `127.0.0.1:port` of the DNS listener.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    async fn manage(&self, path: &str, body: serde_json::Value) -> Result<()> {
        dns_manage(&self.management_url(), path, body).await
    }

    /// Adds a TXT value at `name` (kept beside any values already there).
    pub async fn set_txt(&self, name: &str, value: &str) -> Result<()> {
        dns_set_txt(&self.management_url(), name, value).await
    }

    /// Answers A queries for `name` with `addrs` (instead of 127.0.0.1).
    pub async fn set_a(&self, name: &str, addrs: &[&str]) -> Result<()> {
        let host = format!("{}.", name.trim_end_matches('.'));
        self.manage(
            "add-a",
            serde_json::json!({ "host": host, "addresses": addrs }),
        )
        .await
    }

    /// Removes every TXT value at `name`.
    pub async fn clear_txt(&self, name: &str) -> Result<()> {
        let host = format!("{}.", name.trim_end_matches('.'));
        self.manage("clear-txt", serde_json::json!({ "host": host }))
            .await
    }

    /// The server's log (for failure messages).
    pub fn log(&self) -> String {
        self.proc.lock().map(|p| p.log()).unwrap_or_default()
    }
}

/// One call to a challtestsrv management API at `url`.
pub(crate) async fn dns_manage(url: &str, path: &str, body: serde_json::Value) -> Result<()> {
    let r = client()
        .post(format!("{url}/{path}"))
        .json(&body)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("challtestsrv {path}: {}", r.status());
    }
    Ok(())
}

/// Adds a TXT value at `name` through the challtestsrv management API at
/// `url` (the tests' and the lab's DNS server).
pub async fn dns_set_txt(url: &str, name: &str, value: &str) -> Result<()> {
    let host = format!("{}.", name.trim_end_matches('.'));
    dns_manage(
        url,
        "set-txt",
        serde_json::json!({ "host": host, "value": value }),
    )
    .await
}

/// A running pebble ACME CA (Debian `pebble`) with `pebble-challtestsrv` as its
/// DNS, answering every name with 127.0.0.1, so HTTP-01 validation reaches the
/// edge's plain-HTTP port on loopback.
pub struct Pebble {
    pub proc: Proc,
    /// The DNS server pebble resolves through (shared with the origin when
    /// started with [`Pebble::start_with_dns`]).
    pub dns: std::sync::Arc<Dns>,
    dir: tempfile::TempDir,
    /// The ACME directory URL.
    pub directory: String,
    mgmt_port: u16,
    acme_port: u16,
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `http_port` (with real validation,
    /// no artificial sleeps, and pebble's default 5 % nonce rejection on).
    pub fn start(http_port: u16) -> Result<Pebble> {
        Self::start_with_validity(http_port, None)
    }

    /// Like [`Pebble::start`], issuing certificates valid for `validity_s` seconds.
    pub fn start_with_validity(http_port: u16, validity_s: Option<u64>) -> Result<Pebble> {
        Self::start_with_dns(http_port, validity_s, std::sync::Arc::new(Dns::start()?))
    }

    /// Like [`Pebble::start_with_validity`], resolving through `dns`.
    /// Free ports are picked then released, so a concurrent test can take one
    /// first: a start that fails that way is retried on new ports.
    pub fn start_with_dns(
        http_port: u16,
        validity_s: Option<u64>,
        dns: std::sync::Arc<Dns>,
    ) -> Result<Pebble> {
        Self::start_with_eab(http_port, validity_s, dns, None)
    }

    /// Like [`Pebble::start_with_dns`]; with `eab` (key id, base64url HMAC
    /// key), pebble requires External Account Binding with that key for
    /// every new account, as some public CAs do.
    pub fn start_with_eab(
        http_port: u16,
        validity_s: Option<u64>,
        dns: std::sync::Arc<Dns>,
        eab: Option<(&str, &str)>,
    ) -> Result<Pebble> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start(http_port, validity_s, dns.clone(), eab) {
                Ok(p) => return Ok(p),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("pebble did not start")))
    }

    fn try_start(
        http_port: u16,
        validity_s: Option<u64>,
        dns: std::sync::Arc<Dns>,
        eab: Option<(&str, &str)>,
    ) -> Result<Pebble> {
        let dir = tempfile::Builder::new()
            .prefix("edgefront-pebble-")
            .tempdir()?;
        let ca = TestCa::new()?;
        let (cert, key) = ca.leaf(&["localhost"])?;
        std::fs::write(dir.path().join("listener-ca.pem"), &ca.pem)?;
        std::fs::write(dir.path().join("cert.pem"), cert)?;
        std::fs::write(dir.path().join("key.pem"), key)?;
        let (acme, mgmt) = (free_port(), free_port());
        let mut config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": eab.is_some(),
        }});
        if let Some((kid, key)) = eab {
            config["pebble"]["externalAccountMACKeys"] = serde_json::json!({ kid: key });
        }
        if let Some(v) = validity_s {
            config["pebble"]["certificateValidityPeriod"] = serde_json::json!(v);
        }
        std::fs::write(dir.path().join("pebble.json"), config.to_string())?;
        let proc = Self::spawn_ca(dir.path(), dns.port, acme)?;
        Ok(Pebble {
            proc,
            dns,
            directory: format!("https://localhost:{acme}/dir"),
            dir,
            mgmt_port: mgmt,
            acme_port: acme,
        })
    }

    fn spawn_ca(dir: &Path, dns: u16, acme: u16) -> Result<Proc> {
        let mut c = Command::new("pebble");
        c.arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")]);
        c.env("PEBBLE_VA_NOSLEEP", "1");
        let mut proc = Proc::spawn("pebble", c)?;
        wait_port(
            SocketAddr::from(([127, 0, 0, 1], acme)),
            Duration::from_secs(10),
            &mut proc.child,
            "pebble",
        )
        .map_err(|e| anyhow::anyhow!("{e}\n{}", proc.log()))?;
        Ok(proc)
    }

    /// Stops the CA (like an outage).
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same ports. Pebble keeps no state: it forgets
    /// accounts and makes a new root, like a CA that lost its database.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = Self::spawn_ca(self.dir.path(), self.dns.port, self.acme_port)?;
        Ok(())
    }

    /// The CA that signed pebble's own listener certificate (trust it to talk ACME).
    pub fn listener_ca(&self) -> PathBuf {
        self.dir.path().join("listener-ca.pem")
    }

    /// Writes pebble's current issuing root (regenerated at every start) to a file.
    pub fn issuing_root(&self) -> Result<PathBuf> {
        let root = pebble_issuing_root(
            &format!("localhost:{}", self.mgmt_port),
            &self.listener_ca(),
        )?;
        // A new file per call: a restarted pebble has a new root, and callers may
        // still need the old one.
        let n = std::fs::read_dir(self.dir.path()).map_or(0, |d| d.count());
        let p = self.dir.path().join(format!("issuing-root-{n}.pem"));
        std::fs::write(&p, root)?;
        Ok(p)
    }
}

/// `curl https://host:port/` resolved to `ip`, trusting only `ca`, run inside
/// network namespace `netns` if given: (curl's exit code, HTTP status such
/// as "200"; "000" when there was no response).
pub fn curl_https(
    netns: Option<&str>,
    ca: &Path,
    host: &str,
    ip: std::net::IpAddr,
    port: u16,
    max_time_s: u32,
) -> Result<(i32, String)> {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    let out = c
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time"])
        .arg(max_time_s.to_string())
        .arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:{ip}"))
        .arg(format!("https://{host}:{port}/"))
        .output()
        .context("run curl")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// pebble's current issuing root (PEM) from its management listener at
/// `mgmt` (`host:port`), whose certificate `listener_ca` signed.
pub fn pebble_issuing_root(mgmt: &str, listener_ca: &Path) -> Result<Vec<u8>> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", "--cacert"])
        .arg(listener_ca)
        .arg(format!("https://{mgmt}/roots/0"))
        .output()
        .context("run curl")?;
    if !out.status.success() {
        bail!("fetching pebble's issuing root from {mgmt} failed");
    }
    Ok(out.stdout)
}

/// The serial number of the first certificate in `pem` (`openssl x509`), or "".
pub fn pem_serial(pem: &str) -> String {
    let Some(start) = pem.find("-----BEGIN CERTIFICATE-----") else {
        return String::new();
    };
    let Some(end) = pem
        .find("-----END CERTIFICATE-----")
        .map(|e| e + "-----END CERTIFICATE-----".len())
    else {
        return String::new();
    };
    Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            if let Some(mut i) = c.stdin.take() {
                i.write_all(&pem.as_bytes()[start..end])?;
            }
            c.wait_with_output()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The serial of the certificate a TLS endpoint on 127.0.0.1 serves for `sni`.
pub fn served_serial(port: u16, sni: &str) -> Option<String> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            sni,
        ])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let serial = pem_serial(&String::from_utf8_lossy(&out.stdout));
    (!serial.is_empty()).then_some(serial)
}

/// pebble's ACME and management ports where the lab and the deploy test run it.
pub const PEBBLE_ACME_PORT: u16 = 14000;
pub const PEBBLE_MANAGEMENT_PORT: u16 = 15000;

/// The files of a pebble that listens on `ip` ([`PEBBLE_ACME_PORT`],
/// [`PEBBLE_MANAGEMENT_PORT`]) and validates HTTP-01 on port 80: its TLS
/// listener's certificate under a fresh [`TestCa`] and `pebble.json`, in
/// `dir`. Returns the listener's root (what the edges trust to talk ACME).
pub fn pebble_files(dir: &Path, ip: std::net::IpAddr) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let ca = TestCa::new()?;
    let (cert, key) = ca.leaf(&[&ip.to_string()])?;
    let listener_ca = dir.join("listener-ca.pem");
    std::fs::write(&listener_ca, &ca.pem)?;
    std::fs::write(dir.join("cert.pem"), cert)?;
    std::fs::write(dir.join("key.pem"), key)?;
    std::fs::write(
        dir.join("pebble.json"),
        serde_json::json!({ "pebble": {
            "listenAddress": format!("{ip}:{PEBBLE_ACME_PORT}"),
            "managementListenAddress": format!("{ip}:{PEBBLE_MANAGEMENT_PORT}"),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": 80,
            "tlsPort": 443,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }})
        .to_string(),
    )?;
    Ok(listener_ca)
}
