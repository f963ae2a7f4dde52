//! The VMDK text descriptor: `createType` and the extent lines.

use crate::{DiskError, Result};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentType {
    Flat,
    Sparse,
    Zero,
}

#[derive(Clone, Debug)]
pub struct ExtentLine {
    pub sectors: u64,
    pub kind: ExtentType,
    pub file: Option<String>,
    /// Start of the extent inside its file, in sectors (FLAT only).
    pub offset: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Descriptor {
    pub create_type: String,
    pub extents: Vec<ExtentLine>,
    pub has_parent: bool,
}

pub fn looks_like_descriptor(head: &[u8]) -> bool {
    let t = String::from_utf8_lossy(&head[..head.len().min(512)]);
    t.trim_start().starts_with("# Disk DescriptorFile")
}

impl Descriptor {
    pub fn parse(path: &Path, text: &[u8]) -> Result<Descriptor> {
        let bad = |line: usize, why: String| {
            DiskError::corrupt(path, "vmdk", 0, format!("descriptor line {line}: {why}"))
        };
        let text = String::from_utf8_lossy(text);
        if !text.trim_start().starts_with("# Disk DescriptorFile") {
            return Err(DiskError::corrupt(path, "vmdk", 0, "not a VMDK descriptor"));
        }
        let mut d = Descriptor::default();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim().trim_end_matches('\0');
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                let v = v.trim().trim_matches('"');
                match k.trim() {
                    "createType" => d.create_type = v.to_string(),
                    "parentFileNameHint" if !v.is_empty() => d.has_parent = true,
                    _ => {}
                }
                if !(line.starts_with("RW ")
                    || line.starts_with("RDONLY ")
                    || line.starts_with("NOACCESS "))
                {
                    continue;
                }
            }
            let mut words = line.split_whitespace();
            let access = words.next().unwrap_or("");
            if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
                continue;
            }
            let sectors: u64 = words
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(n + 1, "extent size is not a number".into()))?;
            let kind = match words.next().unwrap_or("") {
                "FLAT" | "VMFS" => ExtentType::Flat,
                "SPARSE" => ExtentType::Sparse,
                "ZERO" => ExtentType::Zero,
                other => {
                    return Err(DiskError::unsupported(
                        path,
                        "vmdk",
                        format!("extent type '{other}'"),
                    ))
                }
            };
            let rest: String = words.collect::<Vec<_>>().join(" ");
            let (file, after) = if kind == ExtentType::Zero {
                (None, String::new())
            } else {
                let r = rest.trim_start();
                let Some(r) = r.strip_prefix('"') else {
                    return Err(bad(n + 1, "extent file name must be quoted".into()));
                };
                let Some(end) = r.find('"') else {
                    return Err(bad(n + 1, "unterminated file name".into()));
                };
                if r[..end].is_empty() {
                    return Err(bad(n + 1, "empty file name".into()));
                }
                (Some(r[..end].to_string()), r[end + 1..].trim().to_string())
            };
            let offset = if after.is_empty() {
                0
            } else {
                after
                    .split_whitespace()
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad(n + 1, "extent offset is not a number".into()))?
            };
            d.extents.push(ExtentLine {
                sectors,
                kind,
                file,
                offset,
            });
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_flat_descriptor() {
        let t = b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 16384 FLAT \"f-flat.vmdk\" 0\nRDONLY 8 ZERO\n";
        let d = Descriptor::parse(Path::new("x"), t).unwrap();
        assert_eq!(d.create_type, "monolithicFlat");
        assert_eq!(d.extents.len(), 2);
        assert_eq!(d.extents[0].file.as_deref(), Some("f-flat.vmdk"));
        assert_eq!(d.extents[1].kind, ExtentType::Zero);
        assert!(
            Descriptor::parse(Path::new("x"), b"# Disk DescriptorFile\nRW x FLAT \"a\"").is_err()
        );
        assert!(Descriptor::parse(Path::new("x"), b"# Disk DescriptorFile\nRW 1 FLAT a").is_err());
    }
}
