//! `manifest.json`: what the archive holds and the checksum of each member.

use serde::{Deserialize, Serialize};

use crate::ArchiveError;

pub const FORMAT: &str = "corefour-export";
pub const VERSION: u32 = 1;
pub const MANIFEST_NAME: &str = "manifest.json";

/// How a member's bytes in the tar map to the file it unpacks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// The member is the file.
    Plain,
    /// The member is `sparse`-encoded; it unpacks to a sparse file of `logical_size` bytes.
    Sparse,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestMember {
    /// Relative path inside the archive and the staging directory.
    pub name: String,
    /// What it is for the importer: "config", "disk", "snapshot-state", "snapshot-memory"...
    pub kind: String,
    pub encoding: Encoding,
    /// Bytes of the member in the tar (what `sha256` covers).
    pub size: u64,
    /// Bytes of the unpacked file.
    pub logical_size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created_unix_ms: u64,
    /// What the exporter wants the importer to know (the VM's name, the corefour release...).
    pub meta: serde_json::Value,
    pub members: Vec<ManifestMember>,
}

/// A member name is a relative path of plain components: no `..`, no absolute paths, nothing
/// that could land outside the staging directory.
pub(crate) fn check_name(name: &str) -> Result<(), ArchiveError> {
    let bad = |reason: &str| ArchiveError::BadMember {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() || name.len() > 255 {
        return Err(bad("empty or longer than 255 bytes"));
    }
    if name.starts_with('/') {
        return Err(bad("absolute path"));
    }
    for comp in name.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            return Err(bad("path has an empty, '.' or '..' component"));
        }
        if !comp
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+@".contains(&b))
        {
            return Err(bad("name has characters outside [A-Za-z0-9._-+@/]"));
        }
    }
    Ok(())
}

impl Manifest {
    pub(crate) fn validate(&self) -> Result<(), ArchiveError> {
        if self.format != FORMAT || self.version != VERSION {
            return Err(ArchiveError::Version {
                found: self.format.clone(),
                version: self.version,
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.members {
            check_name(&m.name)?;
            if m.name == MANIFEST_NAME {
                return Err(ArchiveError::BadManifest("it lists itself".into()));
            }
            if !seen.insert(m.name.as_str()) {
                return Err(ArchiveError::BadManifest(format!(
                    "member {} listed twice",
                    m.name
                )));
            }
            if m.sha256.len() != 64 || !m.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ArchiveError::BadManifest(format!(
                    "member {} has a malformed sha256",
                    m.name
                )));
            }
            if m.encoding == Encoding::Plain && m.size != m.logical_size {
                return Err(ArchiveError::BadManifest(format!(
                    "plain member {} has size {} but logical size {}",
                    m.name, m.size, m.logical_size
                )));
            }
        }
        Ok(())
    }

    pub fn member(&self, name: &str) -> Option<&ManifestMember> {
        self.members.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a b",
            "a\\b",
            "é",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "config.json",
            "disks/root.qcow2",
            "snapshot/memory.bin",
            "a-b_c+d@1",
        ] {
            check_name(good).unwrap();
        }
    }
}
