//! The internal PKI: one CA per deployment that certifies the platform's own
//! machines to each other (never shoppers' browsers), and the rustls
//! configurations that use it.
//!
//! The origin's internal API (`/internal/*`) listens on its own port and
//! accepts only clients holding a certificate from this CA: one per region
//! node, named after the region (`bom1`), usable as a client; the origin's
//! own certificate names its addresses and host names. Both sides verify
//! each other against the CA alone (no public roots).
//!
//! [`InternalCa::create`] writes `ca.pem` and `ca.key` (mode 0600);
//! [`InternalCa::ensure`] issues a certificate into `<name>.pem` and
//! `<name>.key` unless one for the same names is still valid for more than
//! the renewal window, which is what makes rotation a re-run (`edge-ctl pki`,
//! ansible). The CA is reloaded from its key and its fixed subject, so no
//! certificate parser is needed to sign again.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The CA's subject: fixed, so the CA can be rebuilt from its key alone.
const CA_NAME: &str = "edgefront internal CA";
/// How long the CA lives.
const CA_DAYS: i64 = 3650;
/// How long a machine certificate lives.
pub const CERT_DAYS: i64 = 90;
/// A certificate with less than this left is issued again by [`InternalCa::ensure`].
pub const RENEW_WITHIN_DAYS: i64 = 30;

/// What a certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (the origin's listeners).
    Server,
    /// A TLS client (a region node calling the internal API).
    Client,
    /// Both: a cluster member that serves its peers and calls them with the
    /// same certificate (an etcd member).
    Peer,
}

/// The internal CA, loaded with its private key (only where certificates are
/// issued: the operator's machine, or a test's temporary directory).
pub struct InternalCa {
    dir: PathBuf,
    key: KeyPair,
    params: CertificateParams,
}

impl std::fmt::Debug for InternalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalCa")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// Writes `data` to `path`, readable by its owner only when `secret`.
fn write(path: &Path, data: &str, secret: bool) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    let mode = if secret { 0o600 } else { 0o644 };
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}

impl InternalCa {
    /// The CA certificate's path under `dir`.
    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join("ca.pem")
    }

    /// Creates a new CA in `dir` (which must not hold one already).
    pub fn create(dir: &Path) -> io::Result<InternalCa> {
        std::fs::create_dir_all(dir)?;
        if dir.join("ca.key").exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} already holds a CA", dir.display()),
            ));
        }
        let key = KeyPair::generate().map_err(other)?;
        let mut params = ca_params();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CA_DAYS);
        let cert = params.self_signed(&key).map_err(other)?;
        write(&dir.join("ca.key"), &key.serialize_pem(), true)?;
        write(&Self::cert_path(dir), &cert.pem(), false)?;
        Ok(InternalCa {
            dir: dir.to_owned(),
            key,
            params: ca_params(),
        })
    }

    /// Loads the CA of `dir`.
    pub fn load(dir: &Path) -> io::Result<InternalCa> {
        let pem = std::fs::read_to_string(dir.join("ca.key"))?;
        Ok(InternalCa {
            dir: dir.to_owned(),
            key: KeyPair::from_pem(&pem).map_err(other)?,
            params: ca_params(),
        })
    }

    /// Loads the CA of `dir`, creating it first when there is none.
    pub fn open_or_create(dir: &Path) -> io::Result<InternalCa> {
        if dir.join("ca.key").exists() {
            Self::load(dir)
        } else {
            Self::create(dir)
        }
    }

    /// The directory holding the CA and what it issued.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Issues a certificate for `cn` with subject names `names` (host names
    /// or IP addresses), valid for `days`: `(certificate PEM, key PEM)`.
    pub fn issue(
        &self,
        cn: &str,
        names: &[String],
        usage: Usage,
        days: i64,
    ) -> io::Result<(String, String)> {
        let mut p = CertificateParams::new(names.to_vec()).map_err(other)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.use_authority_key_identifier_extension = true;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Peer => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(days);
        let key = KeyPair::generate().map_err(other)?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(other)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Makes sure `<dir>/<file>.pem` and `.key` hold a certificate for these
    /// names with more than [`RENEW_WITHIN_DAYS`] left, issuing one if not.
    /// Returns whether it issued (for idempotent deploys: "changed").
    pub fn ensure(&self, file: &str, cn: &str, names: &[String], usage: Usage) -> io::Result<bool> {
        let cert_path = self.dir.join(format!("{file}.pem"));
        let key_path = self.dir.join(format!("{file}.key"));
        if let Ok(pem) = std::fs::read(&cert_path)
            && key_path.exists()
            && still_good(
                &pem,
                names,
                usage,
                Duration::from_secs(RENEW_WITHIN_DAYS as u64 * 86_400),
            )
        {
            return Ok(false);
        }
        let (cert, key) = self.issue(cn, names, usage, CERT_DAYS)?;
        write(&key_path, &key, true)?;
        write(&cert_path, &cert, false)?;
        Ok(true)
    }
}

/// Whether a PEM certificate names exactly `names`, allows exactly the uses
/// `usage` asks for, and stays valid for more than `margin`.
fn still_good(pem: &[u8], names: &[String], usage: Usage, margin: Duration) -> bool {
    let Ok(der) = CertificateDer::from_pem_slice(pem) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    let left = cert.validity().time_to_expiration();
    if left.is_none_or(|d| d.whole_seconds() <= margin.as_secs() as i64) {
        return false;
    }
    let uses = match cert.extended_key_usage() {
        Ok(Some(eku)) => (eku.value.server_auth, eku.value.client_auth),
        _ => (false, false),
    };
    let wanted = match usage {
        Usage::Server => (true, false),
        Usage::Client => (false, true),
        Usage::Peer => (true, true),
    };
    if uses != wanted {
        return false;
    }
    let mut have: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(b) => ip_of(b),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut want: Vec<String> = names
        .iter()
        .map(|n| {
            n.parse::<std::net::IpAddr>()
                .map_or_else(|_| n.clone(), |ip| ip.to_string())
        })
        .collect();
    have.sort();
    want.sort();
    have == want
}

fn ip_of(b: &[u8]) -> Option<String> {
    match b.len() {
        4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(b).ok()?).to_string()),
        16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(b).ok()?).to_string()),
        _ => None,
    }
}

/// The common name of a DER certificate's subject (a region node's name
/// under the internal CA), for logs.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Paths of a machine's identity under the internal CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The CA certificate that both sides verify against.
    pub ca: PathBuf,
    /// This machine's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A configured identity's problem: the key that names it and what is wrong.
pub type PathError = (&'static str, String);

/// The file configured under `name`: required (with `needed_by`) and present.
pub fn existing_file(
    name: &'static str,
    value: Option<&str>,
    needed_by: &str,
) -> Result<PathBuf, PathError> {
    let v = value.ok_or_else(|| (name, format!("is required with {needed_by}")))?;
    if !Path::new(v).is_file() {
        return Err((name, format!("{v:?} is not a readable file")));
    }
    Ok(PathBuf::from(v))
}

/// The certificates of a CA file (PEM), each checked as X.509.
pub fn read_ca(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let ders = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| other(format!("{}: {e}", path.display())))?;
    if ders.is_empty() {
        return Err(other(format!("{}: no certificate", path.display())));
    }
    for d in &ders {
        x509_parser::parse_x509_certificate(d)
            .map_err(|e| other(format!("{}: not X.509: {e}", path.display())))?;
    }
    Ok(ders)
}

fn chain_and_key(
    cert: &Path,
    key: &Path,
) -> io::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| other(format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(other(format!("{}: no certificate", cert.display())));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| other(format!("{}: {e}", key.display())))?;
    Ok((chain, key))
}

/// A server configuration presenting `cert`/`key` to any client, TLS 1.2
/// and 1.3 (the origin's public listener, which edges verify against the
/// internal CA).
pub fn server_config(cert: &Path, key: &Path) -> io::Result<rustls::ServerConfig> {
    let (chain, key) = chain_and_key(cert, key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(other)?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(other)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

impl Identity {
    /// The identity configured under `internal_ca`, `internal_tls_cert` and
    /// `internal_tls_key`: each required (with `needed_by`) and a file.
    pub fn from_config(
        ca: Option<&str>,
        cert: Option<&str>,
        key: Option<&str>,
        needed_by: &str,
    ) -> Result<Identity, PathError> {
        Ok(Identity {
            ca: existing_file("internal_ca", ca, needed_by)?,
            cert: existing_file("internal_tls_cert", cert, needed_by)?,
            key: existing_file("internal_tls_key", key, needed_by)?,
        })
    }

    /// `<dir>/ca.pem`, `<dir>/<file>.pem`, `<dir>/<file>.key`.
    pub fn in_dir(dir: &Path, file: &str) -> Identity {
        Identity {
            ca: InternalCa::cert_path(dir),
            cert: dir.join(format!("{file}.pem")),
            key: dir.join(format!("{file}.key")),
        }
    }

    fn roots(&self) -> io::Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for c in read_ca(&self.ca)? {
            roots
                .add(c)
                .map_err(|e| other(format!("{}: {e}", self.ca.display())))?;
        }
        Ok(roots)
    }

    /// A server configuration that requires a client certificate from the CA.
    pub fn server_config_requiring_clients(&self) -> io::Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()
        .map_err(other)?;
        let (chain, key) = chain_and_key(&self.cert, &self.key)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(other)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(other)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }

    /// A client configuration that trusts only the CA and presents this
    /// identity.
    pub fn client_config(&self) -> io::Result<rustls::ClientConfig> {
        let (chain, key) = chain_and_key(&self.cert, &self.key)?;
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(other)?
        .with_root_certificates(self.roots()?)
        .with_client_auth_cert(chain, key)
        .map_err(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole TLS handshake in memory; the error names the side that failed.
    fn handshake(server: &Identity, client: &Identity, name: &str) -> Result<(), String> {
        let s_cfg = server
            .server_config_requiring_clients()
            .expect("server config");
        let c_cfg = client.client_config().expect("client config");
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).expect("name");
        let mut c = rustls::ClientConnection::new(Arc::new(c_cfg), name).expect("client");
        let mut s = rustls::ServerConnection::new(Arc::new(s_cfg)).expect("server");
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).expect("client write");
            s.read_tls(&mut buf.as_slice()).expect("server read");
            s.process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).expect("server write");
            c.read_tls(&mut buf.as_slice()).expect("client read");
            c.process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err("handshake did not finish".into())
    }

    #[test]
    fn a_ca_issues_and_reissues_only_when_due_or_renamed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = InternalCa::create(dir.path()).expect("ca");
        assert!(InternalCa::create(dir.path()).is_err(), "one CA per dir");
        let names = vec!["origin.internal".to_owned(), "127.0.0.1".to_owned()];
        assert!(
            ca.ensure("origin", "origin", &names, Usage::Server)
                .expect("issue")
        );
        assert!(
            !ca.ensure("origin", "origin", &names, Usage::Server)
                .expect("again")
        );
        // Reloaded from its key, the CA still signs certificates that verify.
        let ca = InternalCa::load(dir.path()).expect("load");
        let more = vec!["127.0.0.1".to_owned()];
        assert!(
            ca.ensure("origin", "origin", &more, Usage::Server)
                .expect("renamed")
        );
        assert!(
            ca.ensure("bom1", "bom1", &[], Usage::Client)
                .expect("client")
        );
        // A certificate of another use is issued again (an etcd member's
        // must serve and call its peers).
        assert!(
            ca.ensure("etcd-a", "etcd-a", &more, Usage::Server)
                .expect("server first")
        );
        assert!(
            ca.ensure("etcd-a", "etcd-a", &more, Usage::Peer)
                .expect("peer")
        );
        assert!(
            !ca.ensure("etcd-a", "etcd-a", &more, Usage::Peer)
                .expect("peer again")
        );
        let server = Identity::in_dir(dir.path(), "origin");
        let client = Identity::in_dir(dir.path(), "bom1");
        assert!(handshake(&server, &client, "127.0.0.1").is_ok());
        // The server name is checked; a client of another CA is refused, and
        // so is a server of another CA.
        assert!(handshake(&server, &client, "origin.internal").is_err());
        let stranger = tempfile::tempdir().expect("tempdir");
        let other_ca = InternalCa::create(stranger.path()).expect("other ca");
        other_ca
            .ensure("bom1", "bom1", &[], Usage::Client)
            .expect("client");
        other_ca
            .ensure("origin", "origin", &more, Usage::Server)
            .expect("server");
        let foreign_client = Identity {
            ca: server.ca.clone(),
            ..Identity::in_dir(stranger.path(), "bom1")
        };
        let e = handshake(&server, &foreign_client, "127.0.0.1").expect_err("foreign client");
        assert!(e.contains("server"), "{e}");
        let foreign_server = Identity {
            ca: server.ca.clone(),
            ..Identity::in_dir(stranger.path(), "origin")
        };
        let e = handshake(&foreign_server, &client, "127.0.0.1").expect_err("foreign server");
        assert!(e.contains("client"), "{e}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("bom1.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
