//! The debian template: `debootstrap --variant=minbase` from the same Debian mirror apt uses.

use std::path::Path;
use std::process::Command;

use super::TemplateError;

pub const SUITE: &str = "bookworm";

/// The first `URIs:` of apt's deb822 sources (or sources.list's first deb line); Debian's default otherwise.
pub fn mirror() -> String {
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    if let Some(u) = deb822
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|u| u.split_whitespace().next())
    {
        return u.to_string();
    }
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    if let Some(u) = list
        .lines()
        .find_map(|l| l.strip_prefix("deb "))
        .and_then(|r| r.split_whitespace().find(|w| w.starts_with("http")))
    {
        return u.to_string();
    }
    "http://deb.debian.org/debian".into()
}

pub fn populate(rootfs: &Path) -> Result<(), TemplateError> {
    if !Path::new("/usr/sbin/debootstrap").exists() {
        return Err(TemplateError::Missing {
            what: "debootstrap".into(),
            package: "debootstrap".into(),
        });
    }
    let out = Command::new("/usr/sbin/debootstrap")
        .args(["--variant=minbase", SUITE])
        .arg(rootfs)
        .arg(mirror())
        .output()
        .map_err(|e| TemplateError::Io {
            what: "run debootstrap".into(),
            cause: e,
        })?;
    if !out.status.success() {
        let tail: String = String::from_utf8_lossy(&out.stderr)
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .join(" | ");
        return Err(TemplateError::Build {
            name: "debian".into(),
            msg: format!("debootstrap failed: {tail}"),
        });
    }
    Ok(())
}
