//! Templates: root filesystems built once into a cache and shared read-only by every container
//! made from them (each container's rootfs is an overlayfs with its own upper layer).

pub mod busybox;
pub mod debian;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    #[error("{what} is missing: install the Debian package {package}")]
    Missing { what: String, package: String },
    #[error("template: {what}: {cause}")]
    Io { what: String, cause: std::io::Error },
    #[error("template {name}: {msg}")]
    Build { name: String, msg: String },
    #[error("unknown template {0:?}: use busybox or debian")]
    Unknown(String),
}

pub const NAMES: &[&str] = &["busybox", "debian"];

/// The cached rootfs of `name` under `cache`, built first if needed. A half-built template (no
/// `.complete` marker) is rebuilt from scratch.
pub fn ensure(cache: &Path, name: &str) -> Result<PathBuf, TemplateError> {
    if !NAMES.contains(&name) {
        return Err(TemplateError::Unknown(name.into()));
    }
    let dir = cache.join(name);
    let rootfs = dir.join("rootfs");
    if dir.join(".complete").exists() {
        return Ok(rootfs);
    }
    let io = |what: String| move |e: std::io::Error| TemplateError::Io { what, cause: e };
    let tmp = cache.join(format!(".{name}.building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("rootfs")).map_err(io(format!("mkdir {}", tmp.display())))?;
    let built = match name {
        "busybox" => busybox::populate(&tmp.join("rootfs")),
        _ => debian::populate(&tmp.join("rootfs")),
    };
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    std::fs::write(tmp.join(".complete"), name).map_err(io("write marker".into()))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(io(format!("move template into {}", dir.display())))?;
    Ok(rootfs)
}
