//! Host networking for VMs: a bridge per network the daemon manages and a tap per NIC.
//!
//! Driven through iproute2's `ip` (a Debian package the project already needs): the netlink crates
//! would add an async stack of their own for four link operations done once per VM start.

use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "invalid network name {0:?}: use 1-15 characters from a-z, A-Z, 0-9, '-', '_' and '.'"
    )]
    Name(String),
    #[error("cannot run `ip {args}`: {source} (install iproute2)")]
    Spawn {
        args: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
}

/// Interface names: IFNAMSIZ-1 characters, nothing the kernel or a shell would misread.
pub fn validate_ifname(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(NetworkError::Name(name.to_string()))
    }
}

fn ip(args: &[&str]) -> Result<(), NetworkError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetworkError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Creates the bridge if it does not exist yet, and brings it up.
pub fn ensure_bridge(name: &str) -> Result<(), NetworkError> {
    validate_ifname(name)?;
    if !link_exists(name) {
        if let Err(e) = ip(&["link", "add", name, "type", "bridge"]) {
            // Another start raced us to it: fine.
            if !link_exists(name) {
                return Err(e);
            }
        }
    }
    ip(&["link", "set", name, "up"])
}

/// Creates a tap device attached to `bridge` (replacing a leftover one of the same name); with
/// `owner`, that unprivileged user (a jailed VMM) may attach to it.
pub fn create_tap(tap: &str, bridge: &str, owner: Option<u32>) -> Result<(), NetworkError> {
    validate_ifname(tap)?;
    ensure_bridge(bridge)?;
    if link_exists(tap) {
        let _ = ip(&["link", "del", tap]);
    }
    match owner {
        Some(uid) => {
            let uid = uid.to_string();
            ip(&[
                "tuntap", "add", "dev", tap, "mode", "tap", "user", &uid, "group", &uid,
            ])?
        }
        None => ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?,
    }
    ip(&["link", "set", tap, "master", bridge, "up"])
}

/// Removes a tap; one already gone is fine.
pub fn delete_tap(tap: &str) {
    if validate_ifname(tap).is_ok() && link_exists(tap) {
        let _ = ip(&["link", "del", tap]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifnames() {
        for good in ["br0", "corefour0", "a.b-c_d", &"x".repeat(15)] {
            assert!(validate_ifname(good).is_ok(), "{good}");
        }
        for bad in ["", "..", "a/b", "a b", &"x".repeat(16), "br0;reboot"] {
            assert!(validate_ifname(bad).is_err(), "{bad}");
        }
    }
}
