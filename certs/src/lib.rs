//! Certificates for sellers' custom domains.
//!
//! Owns what every part needs to hold and serve a certificate: sealing private
//! keys at rest ([`Sealer`], AES-256-GCM bound to the hostname), checking and
//! loading PEM into a rustls [`CertifiedKey`] ([`load`]), the in-memory SNI map
//! ([`CertMap`]) and the synchronous, I/O-free rustls resolver over it
//! ([`Resolver`]), plus reading the SNI from raw ClientHello bytes ([`sni`]).
//! Issuance (ACME) and storage queries live with their callers.

pub mod acme;
pub mod pki;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors from sealing, loading or parsing certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A master key is not 64 hex characters, or one is given twice.
    #[error("master keys must be 64 hex characters (32 bytes) each, comma-separated, none twice")]
    MasterKey,
    /// A sealed key failed to open (wrong master key, wrong hostname or tampering).
    #[error("sealed private key does not open for this hostname")]
    Unseal,
    /// The chain has no certificate, or a certificate is not valid X.509.
    #[error("certificate chain: {0}")]
    Chain(String),
    /// The private key is missing, unsupported, or does not match the leaf.
    #[error("private key: {0}")]
    Key(String),
    /// The leaf does not name the hostname.
    #[error("certificate does not cover {0}")]
    Name(String),
}

/// Seals private keys with AES-256-GCM; the hostname is the associated data,
/// so a sealed key moved to another hostname's row does not open.
///
/// Several master keys may be held (key rotation): the first seals, every
/// one opens. A sealed value carries the id of the key that sealed it (the
/// first 8 bytes of the key's SHA-256, in hex: nothing secret) in a short
/// header before the ciphertext, so `origin reseal` finds what is still
/// sealed under an old key. Values sealed before key ids existed have no
/// header; they are opened by trying each key.
pub struct Sealer {
    keys: Vec<(String, LessSafeKey)>,
    rng: SystemRandom,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Sealer").field("key_ids", &ids).finish()
    }
}

/// Marks a sealed value that starts with its key id: magic, version, length.
const SEALED_V1: [u8; 2] = [0xEF, 0x01];

/// The id of a master key: the first 8 bytes of its SHA-256, in hex.
fn key_id(raw: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, raw);
    hex::encode(&d.as_ref()[..8])
}

impl Sealer {
    /// A sealer from master keys in hex: one 32-byte key (64 hex
    /// characters), or several separated by commas, the first sealing.
    pub fn from_hex(spec: &str) -> Result<Self, CertError> {
        let mut keys = Vec::new();
        for part in spec.split(',') {
            let raw = hex::decode(part.trim()).map_err(|_| CertError::MasterKey)?;
            let unbound = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| CertError::MasterKey)?;
            let id = key_id(&raw);
            if keys.iter().any(|(k, _)| *k == id) {
                return Err(CertError::MasterKey);
            }
            keys.push((id, LessSafeKey::new(unbound)));
        }
        Ok(Sealer {
            keys,
            rng: SystemRandom::new(),
        })
    }

    /// The id of the key that seals (the first).
    pub fn sealing_key_id(&self) -> &str {
        &self.keys[0].0
    }

    /// The key id a sealed value carries (`None`: sealed before key ids).
    pub fn key_id_of(ciphertext: &[u8]) -> Option<&str> {
        let rest = ciphertext.strip_prefix(&SEALED_V1)?;
        let (&len, rest) = rest.split_first()?;
        let id = rest.get(..usize::from(len))?;
        std::str::from_utf8(id).ok()
    }

    /// Encrypts `plaintext` for `hostname` under the first key: returns
    /// (nonce, key-id header + ciphertext + tag).
    pub fn seal(&self, hostname: &str, plaintext: &[u8]) -> Result<(Vec<u8>, Vec<u8>), CertError> {
        let (id, key) = &self.keys[0];
        let mut nonce = [0u8; 12];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| CertError::MasterKey)?;
        let mut buf = plaintext.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(hostname.as_bytes()),
            &mut buf,
        )
        .map_err(|_| CertError::MasterKey)?;
        let mut out = Vec::with_capacity(3 + id.len() + buf.len());
        out.extend_from_slice(&SEALED_V1);
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&buf);
        Ok((nonce.to_vec(), out))
    }

    /// Decrypts what [`Sealer::seal`] produced for `hostname`, with the key
    /// it names (or, for a value without a key id, whichever key opens it).
    pub fn open(
        &self,
        hostname: &str,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CertError> {
        if let Some(id) = Self::key_id_of(ciphertext)
            && let Some((_, key)) = self.keys.iter().find(|(k, _)| k == id)
        {
            let body = &ciphertext[3 + id.len()..];
            if let Ok(p) = Self::open_with(key, hostname, nonce, body) {
                return Ok(p);
            }
        }
        // No key id (sealed before they existed), or one we do not hold.
        self.keys
            .iter()
            .find_map(|(_, key)| Self::open_with(key, hostname, nonce, ciphertext).ok())
            .ok_or(CertError::Unseal)
    }

    fn open_with(
        key: &LessSafeKey,
        hostname: &str,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, CertError> {
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CertError::Unseal)?;
        let mut buf = ciphertext.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(hostname.as_bytes()), &mut buf)
            .map_err(|_| CertError::Unseal)?;
        Ok(plain.to_vec())
    }
}

/// A checked certificate, ready to serve.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// Expiry of the leaf, seconds since the Unix epoch.
    pub not_after: i64,
}

/// Whether `pattern` (a SAN DNS name, possibly `*.example.com`) covers `host`.
fn name_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => pattern == host,
    }
}

/// Parses a PEM chain and PEM private key, checks the key matches the leaf and
/// that the leaf covers `hostname` (a wildcard `*.example.com`: that the leaf
/// names that very wildcard), and builds the rustls key (ring).
pub fn load(hostname: &str, chain_pem: &str, key_pem: &[u8]) -> Result<Loaded, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::Chain(e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| CertError::Chain("no certificate in PEM".into()))?;
    let (_, x509) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| CertError::Chain(e.to_string()))?;
    let not_after = x509.validity().not_after.timestamp();
    let names: Vec<String> = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let covered = if hostname.starts_with("*.") {
        // A wildcard is covered only by that wildcard, never by a name under it.
        names.iter().any(|n| n.eq_ignore_ascii_case(hostname))
    } else {
        names.iter().any(|n| name_matches(n, hostname))
    };
    if !covered {
        return Err(CertError::Name(hostname.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::Key(e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| CertError::Key(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| CertError::Key(e.to_string()))?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
    })
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The certificates this process serves, by hostname (exact names and
/// `*.parent` wildcards). Written by async code, read by the resolver.
#[derive(Default)]
pub struct CertMap {
    certs: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// Each name's certificate expiry (unix seconds) and issuer, for metrics.
    meta: RwLock<HashMap<String, (i64, Arc<str>)>>,
}

impl CertMap {
    /// The certificate for `host`: an exact entry, else the wildcard of its parent.
    pub fn get(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.read().ok()?;
        if let Some(c) = certs.get(host) {
            return Some(c.clone());
        }
        let (_, parent) = host.split_once('.')?;
        certs.get(&format!("*.{parent}")).cloned()
    }

    /// Whether an exact entry exists for `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.certs.read().is_ok_and(|c| c.contains_key(name))
    }

    /// Installs (or replaces) the certificate for `name`.
    pub fn insert(&self, name: &str, key: Arc<CertifiedKey>) {
        if let Ok(mut c) = self.certs.write() {
            c.insert(name.to_owned(), key);
        }
    }

    /// Installs a loaded certificate, remembering when it expires and who
    /// issued it (an ACME directory's name, or `uploaded`).
    pub fn insert_loaded(&self, name: &str, loaded: Loaded, issuer: &str) {
        if let Ok(mut e) = self.meta.write() {
            e.insert(name.to_owned(), (loaded.not_after, Arc::from(issuer)));
        }
        self.insert(name, loaded.key);
    }

    /// The earliest expiry (unix seconds) among loaded certificates.
    pub fn soonest_expiry(&self) -> Option<i64> {
        self.meta.read().ok()?.values().map(|(t, _)| *t).min()
    }

    /// How many loaded certificates each issuer signed, by issuer name.
    pub fn by_issuer(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let Ok(meta) = self.meta.read() else {
            return Vec::new();
        };
        for (_, issuer) in meta.values() {
            *counts.entry(issuer).or_default() += 1;
        }
        let mut v: Vec<(String, usize)> =
            counts.into_iter().map(|(k, n)| (k.to_owned(), n)).collect();
        v.sort();
        v
    }

    /// Forgets `name` (the next handshake reloads it).
    pub fn remove(&self, name: &str) {
        if let Ok(mut c) = self.certs.write() {
            c.remove(name);
        }
        if let Ok(mut e) = self.meta.write() {
            e.remove(name);
        }
    }

    /// The names of the loaded certificates (exact names and wildcards).
    pub fn names(&self) -> Vec<String> {
        self.certs
            .read()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// How many certificates are loaded.
    pub fn len(&self) -> usize {
        self.certs.read().map_or(0, |c| c.len())
    }

    /// Whether none are loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The rustls resolver: memory only, never I/O (rustls calls it synchronously
/// inside the handshake). No SNI, or an unknown name, gives no certificate and
/// the handshake fails at once with an alert.
#[derive(Clone)]
pub struct Resolver(pub Arc<CertMap>);

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Resolver({} certificates)", self.0.len())
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        self.0.get(name.trim_end_matches('.'))
    }
}

/// What a buffer of ClientHello bytes says.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed.
    Incomplete,
    /// A complete ClientHello, with its SNI if any.
    Sni(Option<String>),
    /// Not a TLS ClientHello.
    Invalid,
}

/// Parses the SNI out of the first bytes a client sent (no I/O).
pub fn sni(bytes: &[u8]) -> Hello {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = bytes;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Hello::Invalid,
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Hello::Sni(
            accepted
                .client_hello()
                .server_name()
                .map(|s| s.to_ascii_lowercase()),
        ),
        Ok(None) => Hello::Incomplete,
        Err(_) => Hello::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let c = rcgen::generate_simple_self_signed(names).expect("rcgen");
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn sealer_round_trips_and_binds_hostname() {
        let s = Sealer::from_hex(KEY).expect("key");
        let (nonce, ct) = s.seal("shop.example", b"secret key").expect("seal");
        assert_ne!(&ct[..10], b"secret key");
        assert_eq!(
            s.open("shop.example", &nonce, &ct).expect("open"),
            b"secret key"
        );
        assert!(matches!(
            s.open("other.example", &nonce, &ct),
            Err(CertError::Unseal)
        ));
        let other = Sealer::from_hex(&"11".repeat(32)).expect("key");
        assert!(other.open("shop.example", &nonce, &ct).is_err());
        assert!(Sealer::from_hex("abcd").is_err());
    }

    #[test]
    fn sealed_values_carry_their_key_id_and_open_under_any_held_key() {
        let (old, new) = ("11".repeat(32), "22".repeat(32));
        let old_only = Sealer::from_hex(&old).expect("old");
        let (nonce, ct) = old_only.seal("a.example", b"k").expect("seal");
        let old_id = Sealer::key_id_of(&ct).expect("key id").to_owned();
        assert_eq!(old_id, old_only.sealing_key_id());
        assert_eq!(old_id.len(), 16);
        // Rotation: the new key seals, the old one still opens.
        let both = Sealer::from_hex(&format!("{new},{old}")).expect("both");
        assert_ne!(both.sealing_key_id(), old_id);
        assert_eq!(both.open("a.example", &nonce, &ct).expect("open"), b"k");
        let (n2, ct2) = both.seal("a.example", b"k").expect("reseal");
        assert_eq!(Sealer::key_id_of(&ct2), Some(both.sealing_key_id()));
        let new_only = Sealer::from_hex(&new).expect("new");
        assert_eq!(new_only.open("a.example", &n2, &ct2).expect("open"), b"k");
        assert!(matches!(
            new_only.open("a.example", &nonce, &ct),
            Err(CertError::Unseal)
        ));
        // A value sealed before key ids (no header) opens by trial.
        let legacy = &ct[3 + old_id.len()..];
        assert_eq!(Sealer::key_id_of(legacy), None);
        assert_eq!(
            both.open("a.example", &nonce, legacy).expect("legacy"),
            b"k"
        );
        // The same key twice, or a malformed one, is refused.
        assert!(Sealer::from_hex(&format!("{old},{old}")).is_err());
        assert!(Sealer::from_hex(&format!("{old},zz")).is_err());
        assert!(!format!("{both:?}").contains(&old));
    }

    #[test]
    fn load_checks_name_and_key_match() {
        let (chain, key) = self_signed(&["shop.example"]);
        let l = load("shop.example", &chain, key.as_bytes()).expect("load");
        assert!(l.not_after > now_unix());
        assert!(matches!(
            load("other.example", &chain, key.as_bytes()),
            Err(CertError::Name(_))
        ));
        let (_, other_key) = self_signed(&["shop.example"]);
        assert!(matches!(
            load("shop.example", &chain, other_key.as_bytes()),
            Err(CertError::Key(_))
        ));
        assert!(matches!(
            load("shop.example", "garbage", key.as_bytes()),
            Err(CertError::Chain(_))
        ));
        let (wild, wkey) = self_signed(&["*.shops.example"]);
        assert!(load("a.shops.example", &wild, wkey.as_bytes()).is_ok());
        assert!(load("a.b.shops.example", &wild, wkey.as_bytes()).is_err());
    }

    #[test]
    fn a_wildcard_is_covered_only_by_that_wildcard() {
        let (chain, key) = self_signed(&["*.shops.example"]);
        load("*.shops.example", &chain, key.as_bytes()).expect("the wildcard itself");
        let (chain, key) = self_signed(&["x.shops.example"]);
        assert!(matches!(
            load("*.shops.example", &chain, key.as_bytes()),
            Err(CertError::Name(_))
        ));
        let (chain, key) = self_signed(&["*.other.example"]);
        assert!(matches!(
            load("*.shops.example", &chain, key.as_bytes()),
            Err(CertError::Name(_))
        ));
    }

    #[test]
    fn cert_map_falls_back_to_parent_wildcard() {
        let (chain, key) = self_signed(&["*.shops.example"]);
        let l = load("x.shops.example", &chain, key.as_bytes()).expect("load");
        let m = CertMap::default();
        m.insert("*.shops.example", l.key);
        assert!(m.get("x.shops.example").is_some());
        assert!(m.get("shops.example").is_none());
        assert!(m.get("x.y.shops.example").is_none());
        m.remove("*.shops.example");
        assert!(m.is_empty());
    }

    #[test]
    fn sni_is_read_from_a_real_client_hello() {
        use std::io::Write;
        let mut roots = rustls::RootCertStore::empty();
        let (chain, _) = self_signed(&["shop.example"]);
        for c in CertificateDer::pem_slice_iter(chain.as_bytes()) {
            roots.add(c.expect("pem")).expect("root");
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("Shop.Example").expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("conn");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        assert_eq!(sni(&out), Hello::Sni(Some("shop.example".into())));
        assert_eq!(sni(&out[..out.len() / 2]), Hello::Incomplete);
        assert_eq!(sni(b"GET / HTTP/1.1\r\n\r\n"), Hello::Invalid);
        let _ = std::io::sink().write(b"");
    }
}
