//! Mutual authentication of the daemons' migration connection: a shared key
//! (`corefour daemon --migration-key FILE`, the same file on both hosts) and an HMAC-SHA256
//! challenge-response in both directions before anything else is said.
//!
//! ```text
//! source                                       target
//!                                        <-    CHALLENGE {nonce_t, auth}
//! AUTH {nonce_s, mac_s}                  ->    mac_s = HMAC(key, "corefour-migration source" | nonce_t | nonce_s)
//!                                        <-    PROOF {mac_t} | REFUSE
//!   mac_t = HMAC(key, "corefour-migration target" | nonce_s | nonce_t)
//! ```
//! Fresh random nonces on both sides keep a recorded exchange from being replayed, and the two
//! labels keep one side's answer from serving as the other's. A daemon with a key talks only to
//! a peer that proves the same key, in either role; two daemons without keys skip the exchange
//! (only on loopback by default: see `check_listen`). The connection is authenticated, not
//! encrypted: guest memory and disks cross it in the clear.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

const SOURCE_LABEL: &[u8] = b"corefour-migration source";
const TARGET_LABEL: &[u8] = b"corefour-migration target";
/// Shorter keys are refused: 16 bytes of randomness is the least worth a file.
const MIN_KEY: usize = 16;
pub(super) const NONCE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the migration key {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the migration key {path} is readable by group or others (mode {mode:o}): chmod 600 it"
    )]
    Exposed { path: String, mode: u32 },
    #[error(
        "the migration key {path} holds {len} bytes; use at least {MIN_KEY} random bytes \
         (e.g. `head -c 32 /dev/urandom | base64 > {path}`)"
    )]
    Short { path: String, len: usize },
    #[error(
        "--migration-listen {addr} is not a loopback address and no --migration-key was given: \
         anyone who reaches that port could start VMs on this host. Give both daemons \
         --migration-key FILE (the same secret), or --migration-insecure on a network you trust"
    )]
    Unauthenticated { addr: String },
}

/// The shared migration secret.
#[derive(Clone)]
pub struct MigrationKey(Vec<u8>);

impl std::fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationKey(..)")
    }
}

impl MigrationKey {
    /// Reads a key file: owner-only permissions, at least 16 bytes once surrounding
    /// whitespace (a trailing newline) is trimmed.
    pub fn load(path: &Path) -> Result<MigrationKey, KeyError> {
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
            path: p.clone(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: p, mode });
        }
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: p.clone(),
            source,
        })?;
        let key = bytes.trim_ascii();
        if key.len() < MIN_KEY {
            return Err(KeyError::Short {
                path: p,
                len: key.len(),
            });
        }
        Ok(MigrationKey(key.to_vec()))
    }

    #[cfg(test)]
    pub(super) fn from_bytes(b: &[u8]) -> MigrationKey {
        MigrationKey(b.to_vec())
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8]) -> Hmac<Sha256> {
        // HMAC takes a key of any length: this cannot fail.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        m.update(label);
        m.update(first);
        m.update(second);
        m
    }

    /// The source's answer to the target's challenge.
    pub(super) fn source_mac(&self, nonce_t: &[u8], nonce_s: &[u8]) -> Vec<u8> {
        self.mac(SOURCE_LABEL, nonce_t, nonce_s)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// The target's proof back.
    pub(super) fn target_mac(&self, nonce_s: &[u8], nonce_t: &[u8]) -> Vec<u8> {
        self.mac(TARGET_LABEL, nonce_s, nonce_t)
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Constant-time checks of the two answers.
    pub(super) fn check_source(&self, nonce_t: &[u8], nonce_s: &[u8], mac: &[u8]) -> bool {
        self.mac(SOURCE_LABEL, nonce_t, nonce_s)
            .verify_slice(mac)
            .is_ok()
    }

    pub(super) fn check_target(&self, nonce_s: &[u8], nonce_t: &[u8], mac: &[u8]) -> bool {
        self.mac(TARGET_LABEL, nonce_s, nonce_t)
            .verify_slice(mac)
            .is_ok()
    }
}

/// The default: a migration port on a non-loopback address needs a key, unless the operator
/// says the network is trusted (`insecure`). An unauthenticated port lets any peer that reaches
/// it name files of this host as a VM's kernel and disks and start it, so refusing to start is
/// safer than a warning in a log nobody reads.
pub fn check_listen(addr: &str, key: bool, insecure: bool) -> Result<(), KeyError> {
    if key || insecure {
        return Ok(());
    }
    let loopback = addr
        .parse::<SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or_else(|_| addr.starts_with("localhost:"));
    if loopback {
        return Ok(());
    }
    Err(KeyError::Unauthenticated { addr: addr.into() })
}

/// Fresh random bytes for a nonce.
pub(super) fn nonce() -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; NONCE];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(b)
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 256 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_verify_only_with_the_same_key_nonces_and_role() {
        let k = MigrationKey::from_bytes(b"0123456789abcdef0123");
        let other = MigrationKey::from_bytes(b"0123456789abcdef0124");
        let (nt, ns) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(nt, ns);
        let ms = k.source_mac(&nt, &ns);
        assert!(k.check_source(&nt, &ns, &ms));
        assert!(!other.check_source(&nt, &ns, &ms));
        assert!(!k.check_source(&ns, &nt, &ms), "nonces swapped");
        assert!(
            !k.check_target(&nt, &ns, &ms),
            "a source answer is no target proof"
        );
        let mt = k.target_mac(&ns, &nt);
        assert!(k.check_target(&ns, &nt, &mt));
        assert!(!k.check_target(&ns, &nt, &mt[..31]));
        assert_eq!(unhex(&hex(&mt)).unwrap(), mt);
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex("abc"), None);
    }

    #[test]
    fn key_files_must_be_private_and_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            MigrationKey::load(&p),
            Err(KeyError::Exposed { .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = MigrationKey::load(&p).unwrap();
        assert_eq!(k.0, b"0123456789abcdef0123");
        std::fs::write(&p, "short\n").unwrap();
        assert!(matches!(
            MigrationKey::load(&p),
            Err(KeyError::Short { .. })
        ));
        assert!(matches!(
            MigrationKey::load(&dir.path().join("none")),
            Err(KeyError::Read { .. })
        ));
    }

    #[test]
    fn only_loopback_listens_without_a_key() {
        assert!(check_listen("127.0.0.1:4747", false, false).is_ok());
        assert!(check_listen("[::1]:4747", false, false).is_ok());
        assert!(check_listen("localhost:4747", false, false).is_ok());
        let e = check_listen("10.0.0.2:4747", false, false).unwrap_err();
        assert!(e.to_string().contains("--migration-key"), "{e}");
        assert!(check_listen("0.0.0.0:4747", false, false).is_err());
        assert!(check_listen("10.0.0.2:4747", true, false).is_ok());
        assert!(check_listen("10.0.0.2:4747", false, true).is_ok());
    }
}
