//! Loading and checking a bundle's config.json (oci-spec does the parsing).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    #[error("bundle {0}: no such directory")]
    NoBundle(PathBuf),
    #[error("{path}: cannot read: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: malformed config.json: {msg}")]
    Malformed { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error(
        "root filesystem {0} does not exist or is not a directory; set root.path in config.json"
    )]
    NoRootfs(PathBuf),
}

/// A parsed bundle: its directory, its config and its absolute rootfs path.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Spec,
    pub rootfs: PathBuf,
}

impl Bundle {
    pub fn load(dir: &Path) -> Result<Self, SpecError> {
        let dir = std::fs::canonicalize(dir).map_err(|_| SpecError::NoBundle(dir.to_path_buf()))?;
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|cause| SpecError::Read {
            path: path.clone(),
            cause,
        })?;
        let spec = parse(&text).map_err(|msg| SpecError::Malformed {
            path: path.clone(),
            msg,
        })?;
        let root = spec.root().as_ref().ok_or_else(|| SpecError::Invalid {
            path: path.clone(),
            msg: "root is missing".into(),
        })?;
        let rootfs = if root.path().is_absolute() {
            root.path().clone()
        } else {
            dir.join(root.path())
        };
        let rootfs = match std::fs::canonicalize(&rootfs) {
            Ok(p) if p.is_dir() => p,
            _ => return Err(SpecError::NoRootfs(rootfs)),
        };
        validate(&spec).map_err(|msg| SpecError::Invalid { path, msg })?;
        Ok(Self { dir, spec, rootfs })
    }
}

/// Parses config.json text; the error is serde's message with its line and column.
pub fn parse(text: &str) -> Result<Spec, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// Checks what serde cannot: the parts the runtime relies on are present and consistent.
pub fn validate(spec: &Spec) -> Result<(), String> {
    let process = spec.process().as_ref().ok_or("process is missing")?;
    match process.args() {
        Some(a) if !a.is_empty() => {}
        _ => return Err("process.args must name the program to run".into()),
    }
    if !process.cwd().is_absolute() {
        return Err(format!(
            "process.cwd {} must be absolute",
            process.cwd().display()
        ));
    }
    for m in spec.mounts().iter().flatten() {
        if !m.destination().is_absolute() {
            return Err(format!(
                "mount destination {} must be absolute",
                m.destination().display()
            ));
        }
    }
    let linux = spec.linux().as_ref().ok_or("linux is missing")?;
    let mut seen = Vec::new();
    for ns in linux.namespaces().iter().flatten() {
        if seen.contains(&ns.typ()) {
            return Err(format!("namespace {} is listed twice", ns.typ()));
        }
        seen.push(ns.typ());
    }
    let new_user = linux
        .namespaces()
        .iter()
        .flatten()
        .any(|n| n.typ() == LinuxNamespaceType::User && n.path().is_none());
    let has_maps = linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
        && linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty());
    if new_user && !has_maps {
        return Err("a new user namespace needs linux.uidMappings and linux.gidMappings".into());
    }
    if !seen.contains(&LinuxNamespaceType::Mount) {
        return Err(
            "corefour needs a mount namespace (add {\"type\":\"mount\"} to linux.namespaces)"
                .into(),
        );
    }
    if let Some(h) = spec.hostname() {
        if !h.is_empty() && !seen.contains(&LinuxNamespaceType::Uts) {
            return Err("hostname is set but there is no uts namespace".into());
        }
    }
    Ok(())
}

/// The config `corefour oci spec` writes: runc's default (busybox-friendly `sh`), optionally rootless.
pub fn default_spec(rootless: bool) -> Spec {
    let mut spec = if rootless {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Spec::rootless(uid, gid)
    } else {
        Spec::default()
    };
    spec.set_version("1.0.2".into());
    spec.set_hostname(Some("corefour".into()));
    if let Some(p) = spec.process_mut() {
        p.set_terminal(Some(true));
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_json_names_the_place() {
        let err = parse("{\"ociVersion\": \"1.0.2\", \"process\": ").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
        assert!(parse("42").is_err());
    }

    #[test]
    fn default_spec_validates_and_roundtrips() {
        let spec = default_spec(false);
        validate(&spec).unwrap();
        let text = serde_json::to_string(&spec).unwrap();
        validate(&parse(&text).unwrap()).unwrap();
        validate(&default_spec(true)).unwrap();
    }

    #[test]
    fn rejects_missing_args_and_user_ns_without_maps() {
        let mut spec = default_spec(false);
        spec.process_mut().as_mut().unwrap().set_args(Some(vec![]));
        assert!(validate(&spec).unwrap_err().contains("process.args"));
        let mut spec = default_spec(false);
        let linux = spec.linux_mut().as_mut().unwrap();
        let mut ns = linux.namespaces().clone().unwrap();
        ns.push(
            oci_spec::runtime::LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .build()
                .unwrap(),
        );
        linux.set_namespaces(Some(ns));
        assert!(validate(&spec).unwrap_err().contains("uidMappings"));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let base = serde_json::to_string(&default_spec(false))
            .unwrap()
            .into_bytes();
        for _ in 0..300 {
            let mut b = base.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % b.len();
                b[i] = (seed >> 32) as u8;
            }
            if let Ok(s) = std::str::from_utf8(&b) {
                if let Ok(spec) = parse(s) {
                    let _ = validate(&spec);
                }
            }
        }
    }
}
