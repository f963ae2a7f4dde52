//! The snapshot state file: a small binary frame around a serde payload.
//!
//! ```text
//! offset  size  field
//! 0       8     magic  "C4SNAPv\0"
//! 8       2     format version major (u16 LE)
//! 10      2     format version minor (u16 LE)
//! 12      4     kind   (u32 LE: what the payload is, e.g. KIND_VM_STATE)
//! 16      8     payload length (u64 LE)
//! 24      n     payload (JSON)
//! 24+n    4     CRC32 (IEEE) of bytes 0 .. 24+n
//! ```
//! A reader accepts the same major version and any minor version up to its own (minor bumps
//! only add optional fields). Everything else is refused with a reason a user can act on.
//! JSON rather than a binary codec: the state is a few KiB, and a human can read it with
//! `tail -c +25 | head -c -4` when a restore goes wrong.

use std::io::Write;

use serde::{de::DeserializeOwned, Serialize};

pub const MAGIC: [u8; 8] = *b"C4SNAPv\0";
pub const VERSION_MAJOR: u16 = 1;
/// 1.1 added the virtio device section (`DeviceStates::virtio`); 1.0 files still read.
pub const VERSION_MINOR: u16 = 1;
const HEADER_LEN: usize = 24;
const CRC_LEN: usize = 4;
/// The payload of a VM snapshot (`state.bin`).
pub const KIND_VM_STATE: u32 = 1;
/// The device + vCPU state sent at the end of a live migration.
pub const KIND_MIGRATION_STATE: u32 = 2;
/// A payload larger than this is refused before it is allocated (a VM's state is KiBs).
pub const MAX_PAYLOAD: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("snapshot state is truncated: {got} bytes, at least {need} needed (copy it again)")]
    Truncated { got: u64, need: u64 },
    #[error("not a corefour snapshot (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error(
        "snapshot format version {major}.{minor} is not supported by this corefour \
         (reads {VERSION_MAJOR}.0 to {VERSION_MAJOR}.{VERSION_MINOR}); restore it with the corefour that wrote it"
    )]
    Version { major: u16, minor: u16 },
    #[error("snapshot holds payload kind {found}, expected {expected}")]
    Kind { found: u32, expected: u32 },
    #[error("snapshot payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u64),
    #[error("snapshot has {0} trailing bytes after its checksum")]
    Trailing(u64),
    #[error(
        "snapshot checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): \
         the file was modified or corrupted"
    )]
    Checksum { stored: u32, computed: u32 },
    #[error("snapshot payload is not valid: {0}")]
    Payload(#[source] serde_json::Error),
    #[error("cannot encode snapshot payload: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
}

/// Encodes `value` as one framed, checksummed record.
pub fn encode<T: Serialize>(kind: u32, value: &T) -> Result<Vec<u8>, FormatError> {
    let payload = serde_json::to_vec(value).map_err(FormatError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
    out.extend_from_slice(&VERSION_MINOR.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn le_u16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Checks the frame and decodes its payload. The checks run in the order that gives the most
/// useful message: a file of another program says "bad magic", not "checksum mismatch".
pub fn decode<T: DeserializeOwned>(kind: u32, bytes: &[u8]) -> Result<T, FormatError> {
    let got = bytes.len() as u64;
    if bytes.len() < 8 {
        return Err(FormatError::Truncated {
            got,
            need: (HEADER_LEN + CRC_LEN) as u64,
        });
    }
    let mut magic = [0u8; 8];
    magic.copy_from_slice(&bytes[..8]);
    if magic != MAGIC {
        return Err(FormatError::BadMagic(magic));
    }
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(FormatError::Truncated {
            got,
            need: (HEADER_LEN + CRC_LEN) as u64,
        });
    }
    let (major, minor) = (le_u16(&bytes[8..]), le_u16(&bytes[10..]));
    if major != VERSION_MAJOR || minor > VERSION_MINOR {
        return Err(FormatError::Version { major, minor });
    }
    let found = le_u32(&bytes[12..]);
    let len = le_u64(&bytes[16..]);
    if len > MAX_PAYLOAD {
        return Err(FormatError::TooLarge(len));
    }
    let need = HEADER_LEN as u64 + len + CRC_LEN as u64;
    if got < need {
        return Err(FormatError::Truncated { got, need });
    }
    if got > need {
        return Err(FormatError::Trailing(got - need));
    }
    // `need` fits in usize: it is at most `bytes.len()`.
    let end = HEADER_LEN + len as usize;
    let stored = le_u32(&bytes[end..]);
    let computed = crc32fast::hash(&bytes[..end]);
    if stored != computed {
        return Err(FormatError::Checksum { stored, computed });
    }
    // The kind is checked after the CRC so that a flipped kind byte reads as tampering.
    if found != kind {
        return Err(FormatError::Kind {
            found,
            expected: kind,
        });
    }
    serde_json::from_slice(&bytes[HEADER_LEN..end]).map_err(FormatError::Payload)
}

/// Writes `value` to `path` atomically (temp file, fsync, rename): a crash mid-write never
/// leaves a half-written state file under the real name.
pub fn write_file<T: Serialize>(
    path: &std::path::Path,
    kind: u32,
    value: &T,
) -> Result<(), FormatError> {
    let bytes = encode(kind, value)?;
    let tmp = path.with_extension("tmp");
    let io = |op: &str, source| FormatError::Io {
        op: format!("{op} {}", tmp.display()),
        source,
    };
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
    f.write_all(&bytes).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("fsync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| FormatError::Io {
        op: format!("rename {} to {}", tmp.display(), path.display()),
        source: e,
    })
}

/// Reads and checks the state file at `path`.
pub fn read_file<T: DeserializeOwned>(path: &std::path::Path, kind: u32) -> Result<T, FormatError> {
    let meta = std::fs::metadata(path).map_err(|source| FormatError::Io {
        op: format!("stat {}", path.display()),
        source,
    })?;
    if meta.len() > MAX_PAYLOAD + (HEADER_LEN + CRC_LEN) as u64 {
        return Err(FormatError::TooLarge(meta.len()));
    }
    let bytes = std::fs::read(path).map_err(|source| FormatError::Io {
        op: format!("read {}", path.display()),
        source,
    })?;
    decode(kind, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        regs: Vec<u64>,
        blob: Vec<u8>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vm0".into(),
            regs: vec![1, 2, u64::MAX],
            blob: (0..=255).collect(),
        }
    }

    #[test]
    fn round_trips() {
        let bytes = encode(KIND_VM_STATE, &sample()).unwrap();
        assert_eq!(&bytes[..8], &MAGIC);
        let back: Sample = decode(KIND_VM_STATE, &bytes).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn refuses_every_truncation() {
        let bytes = encode(KIND_VM_STATE, &sample()).unwrap();
        for cut in 0..bytes.len() {
            let err = decode::<Sample>(KIND_VM_STATE, &bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, FormatError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn refuses_every_flipped_bit_after_the_magic() {
        let bytes = encode(KIND_VM_STATE, &sample()).unwrap();
        for i in 8..bytes.len() {
            for bit in [0u8, 3, 7] {
                let mut t = bytes.clone();
                t[i] ^= 1 << bit;
                let err = decode::<Sample>(KIND_VM_STATE, &t);
                assert!(err.is_err(), "flip at byte {i} bit {bit} was accepted");
            }
        }
        let mut t = bytes.clone();
        let mid = t.len() / 2;
        t[mid] ^= 0x40;
        assert!(matches!(
            decode::<Sample>(KIND_VM_STATE, &t),
            Err(FormatError::Checksum { .. })
        ));
    }

    #[test]
    fn refuses_other_versions_and_kinds() {
        let bytes = encode(KIND_VM_STATE, &sample()).unwrap();
        let mut newer = bytes.clone();
        newer[8..10].copy_from_slice(&(VERSION_MAJOR + 1).to_le_bytes());
        let err = decode::<Sample>(KIND_VM_STATE, &newer).unwrap_err();
        assert!(
            matches!(err, FormatError::Version { major: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("not supported"));
        let mut minor = bytes.clone();
        minor[10..12].copy_from_slice(&(VERSION_MINOR + 1).to_le_bytes());
        assert!(matches!(
            decode::<Sample>(KIND_VM_STATE, &minor),
            Err(FormatError::Version { .. })
        ));
        assert!(matches!(
            decode::<Sample>(KIND_MIGRATION_STATE, &bytes),
            Err(FormatError::Kind { .. })
        ));
        let mut other = bytes;
        other[0] = b'X';
        assert!(matches!(
            decode::<Sample>(KIND_VM_STATE, &other),
            Err(FormatError::BadMagic(_))
        ));
    }

    #[test]
    fn refuses_trailing_bytes_and_huge_lengths() {
        let mut bytes = encode(KIND_VM_STATE, &sample()).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<Sample>(KIND_VM_STATE, &bytes),
            Err(FormatError::Trailing(1))
        ));
        let mut huge = encode(KIND_VM_STATE, &sample()).unwrap();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(KIND_VM_STATE, &huge),
            Err(FormatError::TooLarge(_))
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A cheap xorshift keeps the test deterministic without a dev-dependency.
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let good = encode(KIND_VM_STATE, &sample()).unwrap();
        for _ in 0..2000 {
            let len = (next() % 200) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 && b.len() >= 8 {
                b[..8].copy_from_slice(&MAGIC);
            }
            assert!(decode::<Sample>(KIND_VM_STATE, &b).is_err());
            let mut g = good.clone();
            let i = (next() as usize) % g.len();
            g[i] = next() as u8;
            let _ = decode::<Sample>(KIND_VM_STATE, &g);
        }
    }

    #[test]
    fn file_write_is_atomic_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("c4-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state.bin");
        write_file(&p, KIND_VM_STATE, &sample()).unwrap();
        assert!(!p.with_extension("tmp").exists());
        let back: Sample = read_file(&p, KIND_VM_STATE).unwrap();
        assert_eq!(back, sample());
        let err = read_file::<Sample>(&dir.join("missing"), KIND_VM_STATE).unwrap_err();
        assert!(err.to_string().contains("missing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
