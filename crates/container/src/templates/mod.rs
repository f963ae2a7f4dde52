//! Templates: root filesystems built once and cached, shared read-only by containers (overlayfs).

pub mod busybox;

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
