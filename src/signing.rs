//! Ed25519 signatures on shore's gallery updates: who may change the catalogue a boat identifies with.
//!
//! The SHA-256 in a `cmd/gallery_update` header travels in the same message as the bytes it covers, so
//! it proves only that the transfer was whole. What proves *who* sent it is a signature by a key the
//! box pins in its config (`[mqtt.gallery_keys]`, name -> public key). Shore makes a key pair once
//! (`whaled gallery keygen`) and signs each update (`whaled gallery sign`); the box verifies with
//! [`Verifier`] before it parses a byte of the gallery.
//!
//! What is signed is a [`Statement`], never the JSON text: the fields that decide what the box will
//! install, written in one fixed order by [`Statement::bytes`], so shore and boat cannot disagree on a
//! canonical form and no field can be added unsigned. `request_id` is not signed (it only pairs a reply
//! with its request). A `force` update must name the version it `replaces`, so a recorded forced
//! rollback cannot be replayed against a gallery that has moved on.
//!
//! Key files: the private key is ring's PKCS#8 v2 document, written as one line of hex (mode 0600);
//! a public key is 64 hex digits (32 bytes).

use std::path::Path;

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::error::{Error, Result};

/// Domain separation: a signature made for anything else never verifies as a gallery update.
const CONTEXT: &str = "whaled gallery update v1";

/// The fields of a gallery update that a signature covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// `full` or `delta`.
    pub kind: String,
    /// The version the gallery will have.
    pub version: u64,
    /// SHA-256 (lowercase hex) of the gallery or delta bytes.
    pub sha256: String,
    pub force: bool,
    /// With `force`: the version the box must have now for the update to apply.
    pub replaces: Option<u64>,
}

impl Statement {
    /// The exact bytes signed: one `key=value` line per field, in a fixed order.
    pub fn bytes(&self) -> Vec<u8> {
        let replaces = self.replaces.map_or_else(|| "-".to_string(), |v| v.to_string());
        format!(
            "{CONTEXT}\nkind={}\nversion={}\nsha256={}\nforce={}\nreplaces={replaces}\n",
            self.kind,
            self.version,
            self.sha256.to_ascii_lowercase(),
            self.force
        )
        .into_bytes()
    }
}

/// A pinned public key with the name the config gives it (logged as the update's sender).
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: [u8; 32],
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({}: {})", self.name, hex(&self.key))
    }
}

impl PublicKey {
    /// Parses 64 hex digits; the error says what was wrong (never echoes more than a few characters).
    pub fn parse(name: &str, text: &str) -> std::result::Result<PublicKey, String> {
        let t = text.trim();
        let bytes = unhex(t).ok_or_else(|| {
            format!(
                "expected an Ed25519 public key as 64 hex digits (from `whaled gallery keygen`), got {} characters",
                t.len()
            )
        })?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("expected 32 bytes (64 hex digits), got {} bytes", b.len()))?;
        Ok(PublicKey { name: name.to_string(), key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The key as 64 hex digits.
    pub fn hex(&self) -> String {
        hex(&self.key)
    }
}

/// Checks statements against the pinned keys.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    keys: Vec<PublicKey>,
}

impl Verifier {
    pub fn new(keys: Vec<PublicKey>) -> Verifier {
        Verifier { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The name of the pinned key that signed `statement`; an error saying why none did.
    pub fn verify(&self, statement: &Statement, signature_hex: &str) -> std::result::Result<&str, String> {
        let signature = unhex(signature_hex.trim())
            .filter(|s| s.len() == 64)
            .ok_or_else(|| "the signature is not 128 hex digits (an Ed25519 signature)".to_string())?;
        let message = statement.bytes();
        self.keys
            .iter()
            .find(|k| UnparsedPublicKey::new(&ED25519, &k.key).verify(&message, &signature).is_ok())
            .map(|k| k.name.as_str())
            .ok_or_else(|| {
                format!(
                    "the signature does not verify with any of the {} pinned key(s) ({}): signed by another key, or \
                     the header or the bytes were changed after signing",
                    self.keys.len(),
                    self.keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>().join(", ")
                )
            })
    }
}

/// A private signing key (shore side). Never printed.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// Generates a key and writes it to `path` (mode 0600, never over an existing file).
    pub fn generate(path: &Path) -> Result<SigningKey> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| Error::Input("the system's random number generator failed".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref())
            .map_err(|e| Error::Input(format!("ring rejected the key it generated: {e}")))?;
        write_private(path, format!("{}\n", hex(doc.as_ref())).as_bytes())?;
        Ok(SigningKey(pair))
    }

    /// Reads a key written by [`SigningKey::generate`].
    pub fn load(path: &Path) -> Result<SigningKey> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let der = unhex(text.trim()).ok_or_else(|| {
            Error::Input(format!(
                "{}: not a whaled private key (one line of hex from `whaled gallery keygen`)",
                path.display()
            ))
        })?;
        let pair = Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|e| Error::Input(format!("{}: not an Ed25519 PKCS#8 key ({e})", path.display())))?;
        Ok(SigningKey(pair))
    }

    /// The public key as 64 hex digits, for the boats' `[mqtt.gallery_keys]`.
    pub fn public_hex(&self) -> String {
        hex(self.0.public_key().as_ref())
    }

    /// The signature of `statement` as 128 hex digits.
    pub fn sign(&self, statement: &Statement) -> String {
        hex(self.0.sign(&statement.bytes()).as_ref())
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| Error::io(path, e))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement() -> Statement {
        Statement { kind: "delta".into(), version: 7, sha256: "ab".repeat(32), force: false, replaces: None }
    }

    /// RFC 8032 section 7.1, test 2: ring's verification against the standard's own vector, through
    /// this module's key parsing.
    #[test]
    fn rfc8032_vector_verifies() {
        let pk = PublicKey::parse("rfc", "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c").unwrap();
        let sig = unhex("92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00").unwrap();
        assert!(UnparsedPublicKey::new(&ED25519, &pk.key).verify(&[0x72], &sig).is_ok());
        assert!(UnparsedPublicKey::new(&ED25519, &pk.key).verify(&[0x73], &sig).is_err());
    }

    #[test]
    fn sign_then_verify_and_every_field_is_covered() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate(&dir.path().join("k")).unwrap();
        let again = SigningKey::load(&dir.path().join("k")).unwrap();
        assert_eq!(key.public_hex(), again.public_hex());
        let v = Verifier::new(vec![PublicKey::parse("shore", &key.public_hex()).unwrap()]);
        let s = statement();
        let sig = key.sign(&s);
        assert_eq!(v.verify(&s, &sig), Ok("shore"));
        let changed: [Statement; 5] = [
            Statement { kind: "full".into(), ..s.clone() },
            Statement { version: 8, ..s.clone() },
            Statement { sha256: "cd".repeat(32), ..s.clone() },
            Statement { force: true, ..s.clone() },
            Statement { replaces: Some(6), ..s.clone() },
        ];
        for c in changed {
            assert!(v.verify(&c, &sig).is_err(), "{c:?} verified with the signature of {s:?}");
        }
        let other = SigningKey::generate(&dir.path().join("other")).unwrap();
        let e = v.verify(&s, &other.sign(&s)).unwrap_err();
        assert!(e.contains("does not verify") && e.contains("shore"), "{e}");
        assert!(v.verify(&s, "zz").unwrap_err().contains("128 hex"));
        assert!(Verifier::default().verify(&s, &sig).is_err());
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        SigningKey::generate(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let before = std::fs::read(&p).unwrap();
        assert!(SigningKey::generate(&p).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), before);
        std::fs::write(dir.path().join("bad"), "hello").unwrap();
        let e = SigningKey::load(&dir.path().join("bad")).err().unwrap().to_string();
        assert!(e.contains("not a whaled private key"), "{e}");
    }

    #[test]
    fn public_keys_are_checked() {
        for (text, want) in [("abc", "64 hex digits"), (&"ab".repeat(31), "32 bytes"), (&"zz".repeat(32), "64 hex")] {
            let e = PublicKey::parse("k", text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
