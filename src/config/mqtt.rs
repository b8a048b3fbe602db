//! `[mqtt]`: the broker connection, topics and the durable outbox, validated once at load.
//!
//! Credentials may come from the file itself, a separate file or the environment (see
//! [`super::secret`]); whichever it is, the value is held in a [`Secret`] that never prints.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::values::{Count, Interval, Positive};
use crate::signing::PublicKey;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMqtt {
    host: Spanned<String>,
    port: Option<u16>,
    client_id: Option<String>,
    topic_prefix: Option<Spanned<String>>,
    keep_alive: Option<Interval>,
    max_packet_size: Option<Count>,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<Spanned<PathBuf>>,
    password_env: Option<Spanned<String>>,
    tls: Option<RawTls>,
    reconnect_min: Option<Interval>,
    reconnect_max: Option<Interval>,
    replay_rate: Option<Positive>,
    stats_interval: Option<Interval>,
    max_command_size: Option<Count>,
    /// Name -> Ed25519 public key (hex) of whoever may sign gallery updates.
    #[serde(default)]
    gallery_keys: std::collections::BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    outbox: RawOutbox,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Spanned<PathBuf>,
    client_cert: Option<Spanned<PathBuf>>,
    client_key: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutbox {
    dir: Option<PathBuf>,
    max_size_mb: Option<Count>,
    fsync_every: Option<Count>,
    fsync_interval: Option<Interval>,
}

pub use super::secret::Secret;

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub ca: PathBuf,
    /// Client certificate and key (PEM), for brokers that require them.
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

/// Validated `[mqtt]`.
#[derive(Debug, Clone)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Stable across restarts so the broker resumes the session.
    pub client_id: String,
    /// Topics are `<prefix>/status`, `<prefix>/<camera>/detection`, ...
    pub topic_prefix: String,
    pub keep_alive: Duration,
    pub max_packet_size: usize,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<TlsConfig>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Most detections per second sent while a backlog is being replayed.
    pub replay_rate: f64,
    pub stats_interval: Duration,
    /// Commands larger than this are refused (with a reply) without being parsed. Whatever their size,
    /// incoming messages never fail the connection (see `crate::mqtt`).
    pub max_command_size: usize,
    /// The keys whose signature a `gallery_update` must carry; none: shore updates are refused.
    pub gallery_keys: Vec<PublicKey>,
    pub outbox: OutboxConfig,
}

/// Default `max_command_size`: a full gallery of the upstream's 13,837 individuals at a few photos each
/// (512 floats a photo) fits.
pub const DEFAULT_MAX_COMMAND_SIZE: usize = 64 << 20;

/// Where the outbox lives when `[mqtt.outbox] dir` is not set: `outbox` in the state directory
/// ([`super::default_state_dir`]: systemd's `StateDirectory=`, else /var/lib/whaled when writable, else the
/// user's data directory).
pub fn default_outbox_dir() -> PathBuf {
    super::default_state_dir().join("outbox")
}

/// What a TLS file named in `[mqtt.tls]` must hold.
#[derive(Clone, Copy)]
enum Pem {
    /// At least one certificate a TLS client can use as a trust anchor.
    CaCertificates,
    /// At least one PEM certificate.
    Certificates,
    /// A PEM private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

/// Checks a TLS file the way the connection will use it (rumqttc hands it to rustls).
fn check_pem(bytes: &[u8], want: Pem) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = || {
        CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not a PEM file: {e}"))
            .and_then(|c| if c.is_empty() { Err("holds no PEM certificate".to_string()) } else { Ok(c) })
    };
    match want {
        Pem::Certificates => certs().map(|_| ()),
        Pem::CaCertificates => {
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certs()?);
            if added == 0 {
                return Err("holds no usable X.509 CA certificate".into());
            }
            Ok(())
        }
        Pem::PrivateKey => {
            PrivateKeyDer::from_pem_slice(bytes).map(|_| ()).map_err(|e| format!("holds no PEM private key ({e})"))
        }
    }
}

impl RawMqtt {
    /// Validates; `at(span, key, message)` builds an error that names file, line and key.
    pub(super) fn validate(
        self,
        dir: &Path,
        device_id: &str,
        at: &dyn Fn(std::ops::Range<usize>, &str, String) -> crate::error::Error,
    ) -> crate::Result<MqttConfig> {
        let host = self.host.get_ref().trim().to_string();
        if host.is_empty() {
            return Err(at(self.host.span(), "mqtt.host", "is empty; give the broker's host name or address".into()));
        }
        let topic_prefix = match self.topic_prefix {
            None => format!("whaled/{device_id}"),
            Some(p) => {
                let v = p.get_ref().trim_end_matches('/').to_string();
                if v.is_empty() || v.contains(['+', '#']) || v.starts_with('/') {
                    return Err(at(
                        p.span(),
                        "mqtt.topic_prefix",
                        format!(
                            "expected a topic like \"whaled/vessel-01\" (no wildcards, no leading '/'), got {:?}",
                            p.get_ref()
                        ),
                    ));
                }
                v
            }
        };
        let password = super::secret::RawPassword {
            password: self.password,
            password_file: self.password_file,
            password_env: self.password_env,
        }
        .resolve(dir, "mqtt", at)?;
        // Read and parsed here, so a missing, unreadable or wrong file fails start-up and check-config
        // (naming file and key) instead of every connection attempt.
        let pem = |p: Spanned<PathBuf>, key: &str, want: Pem| {
            let path = dir.join(p.get_ref());
            let bytes =
                std::fs::read(&path).map_err(|e| at(p.span(), key, format!("cannot read {}: {e}", path.display())))?;
            check_pem(&bytes, want).map_err(|why| at(p.span(), key, format!("{}: {why}", path.display())))?;
            Ok(path)
        };
        let tls = match self.tls {
            None => None,
            Some(t) => {
                let ca = pem(t.ca, "mqtt.tls.ca", Pem::CaCertificates)?;
                let client_auth = match (t.client_cert, t.client_key) {
                    (None, None) => None,
                    (Some(c), Some(k)) => Some((
                        pem(c, "mqtt.tls.client_cert", Pem::Certificates)?,
                        pem(k, "mqtt.tls.client_key", Pem::PrivateKey)?,
                    )),
                    (Some(c), None) => return Err(at(c.span(), "mqtt.tls.client_cert", "needs client_key too".into())),
                    (None, Some(k)) => return Err(at(k.span(), "mqtt.tls.client_key", "needs client_cert too".into())),
                };
                Some(TlsConfig { ca, client_auth })
            }
        };
        let reconnect_min = self.reconnect_min.map_or(Duration::from_secs(1), Interval::get);
        let reconnect_max = self.reconnect_max.map_or(Duration::from_secs(300), Interval::get).max(reconnect_min);
        let mut outbox = OutboxConfig::new(match self.outbox.dir {
            Some(d) => dir.join(d),
            None => default_outbox_dir(),
        });
        if let Some(mb) = self.outbox.max_size_mb {
            outbox.max_bytes = mb.get() as u64 * (1 << 20);
        }
        if let Some(n) = self.outbox.fsync_every {
            outbox.fsync_every = n.get();
        }
        if let Some(i) = self.outbox.fsync_interval {
            outbox.fsync_interval = i.get();
        }
        outbox.segment_bytes = outbox.segment_bytes.min(outbox.max_bytes / 4).max(64 << 10);
        let mut gallery_keys = Vec::new();
        for (name, key) in self.gallery_keys {
            let k = PublicKey::parse(&name, key.get_ref())
                .map_err(|why| at(key.span(), &format!("mqtt.gallery_keys.{name}"), why))?;
            if let Some(same) = gallery_keys.iter().find(|g: &&PublicKey| g.hex() == k.hex()) {
                return Err(at(
                    key.span(),
                    &format!("mqtt.gallery_keys.{name}"),
                    format!("is the same key as {:?}: one name per key, so logs say who signed", same.name()),
                ));
            }
            gallery_keys.push(k);
        }
        Ok(MqttConfig {
            port: self.port.unwrap_or(if tls.is_some() { 8883 } else { 1883 }),
            host,
            client_id: self.client_id.unwrap_or_else(|| format!("whaled-{device_id}")),
            topic_prefix,
            keep_alive: self.keep_alive.map_or(Duration::from_secs(30), Interval::get),
            max_packet_size: self.max_packet_size.map_or(1 << 20, Count::get),
            username: self.username,
            password,
            tls,
            reconnect_min,
            reconnect_max,
            replay_rate: self.replay_rate.map_or(50.0, Positive::get),
            stats_interval: self.stats_interval.map_or(Duration::from_secs(60), Interval::get),
            max_command_size: self.max_command_size.map_or(DEFAULT_MAX_COMMAND_SIZE, Count::get),
            gallery_keys,
            outbox,
        })
    }
}

/// How the durable outbox (`crate::outbox`) is kept, from `[mqtt.outbox]`. Defined here, with the
/// rest of the configuration, so that the config layer imports nothing above it.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub dir: PathBuf,
    /// Total size of the segment files; beyond it the oldest segment is dropped (counted, ERROR).
    pub max_bytes: u64,
    /// A segment is closed and a new one started beyond this size.
    pub segment_bytes: u64,
    pub fsync_every: usize,
    pub fsync_interval: Duration,
}

impl OutboxConfig {
    pub fn new(dir: PathBuf) -> Self {
        OutboxConfig {
            dir,
            max_bytes: 256 << 20,
            segment_bytes: 4 << 20,
            fsync_every: 16,
            fsync_interval: Duration::from_millis(250),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::config::Config;

    /// A self-signed X.509 certificate (P-256) and its key, for tests that need TLS files to parse.
    pub(crate) const TEST_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBkTCCATegAwIBAgIUMKin8PoWCZih0Ymffz2PkMto5IAwCgYIKoZIzj0EAwIw
HTEbMBkGA1UEAwwSd2hhbGVkIGNvbmZpZyB0ZXN0MCAXDTI2MTEyOTE2MTI0N1oY
DzIxMjYxMTA1MTYxMjQ3WjAdMRswGQYDVQQDDBJ3aGFsZWQgY29uZmlnIHRlc3Qw
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQH9ixWxkSffTt0gjcspXpi8mMUhrUF
EG6r3fRtG1VxAM/nwyxO8XU3R6tljC0+ZCLiX3xp6cXJgbjCTDSdVX6Yo1MwUTAd
BgNVHQ4EFgQUWFlxYvaNDeS2cFCQ6Qh5XSVtSXswHwYDVR0jBBgwFoAUWFlxYvaN
DeS2cFCQ6Qh5XSVtSXswDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQDAgNIADBF
AiEA1nXC2Erdq0Tplz48ncuZv57HCeGsMyTavupJqmspWq0CIG0mAh5JuMtCcFcr
knmFFVZQPiUCKOVOAYCpB0iLnnQF
-----END CERTIFICATE-----
";
    pub(crate) const TEST_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg4wMg0tBJ/UgKI9po
unvwo+UuExTi8uHM9ZAH9yaqNX2hRANCAAQH9ixWxkSffTt0gjcspXpi8mMUhrUF
EG6r3fRtG1VxAM/nwyxO8XU3R6tljC0+ZCLiX3xp6cXJgbjCTDSdVX6Y
-----END PRIVATE KEY-----
";

    /// Each row: (ca, client_cert, client_key) file contents (`None`: the file does not exist, `"/"`:
    /// a directory), and what the error must say.
    #[test]
    fn tls_files_are_read_and_parsed_at_load() {
        let (cert, key) = (Some(TEST_CERT_PEM), Some(TEST_KEY_PEM));
        // Valid PEM framing, but not an X.509 certificate inside.
        let not_x509 = "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n";
        type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Option<&'a str>, &'a [&'a str]);
        let cases: [Case; 8] = [
            ("all good", cert, cert, key, &[]),
            ("no CA file", None, cert, key, &["mqtt.tls.ca", "cannot read", "ca.pem"]),
            ("CA is a directory", Some("/"), cert, key, &["mqtt.tls.ca", "cannot read", "ca.pem"]),
            ("CA not PEM", Some("just text"), cert, key, &["mqtt.tls.ca", "holds no PEM certificate", "ca.pem"]),
            ("CA not X.509", Some(not_x509), cert, key, &["mqtt.tls.ca", "no usable X.509", "ca.pem"]),
            ("CA is a key", key, cert, key, &["mqtt.tls.ca", "holds no PEM certificate"]),
            ("cert is a key", cert, key, key, &["mqtt.tls.client_cert", "holds no PEM certificate", "client.pem"]),
            ("key is a cert", cert, cert, cert, &["mqtt.tls.client_key", "no PEM private key", "client.key"]),
        ];
        for (what, ca, client_cert, client_key, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            for (name, content) in [("ca.pem", ca), ("client.pem", client_cert), ("client.key", client_key)] {
                match content {
                    Some("/") => std::fs::create_dir(dir.path().join(name)).unwrap(),
                    Some(c) => std::fs::write(dir.path().join(name), c).unwrap(),
                    None => {}
                }
            }
            let src = "[mqtt]\nhost = \"shore\"\n[mqtt.tls]\nca = \"ca.pem\"\nclient_cert = \"client.pem\"\n\
                       client_key = \"client.key\"\n";
            let result = Config::parse(&dir.path().join("w.toml"), src);
            if want.is_empty() {
                let tls = result.unwrap_or_else(|e| panic!("{what}: {e}")).mqtt.unwrap().tls.unwrap();
                assert_eq!(tls.ca, dir.path().join("ca.pem"), "{what}");
                continue;
            }
            let e = result.err().unwrap_or_else(|| panic!("{what}: accepted")).to_string();
            for w in want {
                assert!(e.contains(w), "{what}: error {e:?} lacks {w:?}");
            }
        }
    }
}
