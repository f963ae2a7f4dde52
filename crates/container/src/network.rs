//! Bridge networking for system containers: a Linux bridge the runtime creates, one named network
//! namespace per container (joined by path through the OCI config), a veth pair between them and
//! an address from the bridge's range.
//!
//! Links and addresses are set with iproute2's `ip`: a handful of one-off calls at start and stop,
//! where a netlink crate would pull an async runtime into the runtime for no measurable gain.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkError {
    #[error("`ip {args}` failed: {msg}")]
    Ip { args: String, msg: String },
    #[error("bad subnet {0:?}: use a.b.c.d/len with len between 8 and 30")]
    Subnet(String),
    #[error("no free address left in {0}")]
    Exhausted(String),
}

/// A bridge and its IPv4 range; the first host address is the bridge's (the gateway).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeConfig {
    pub bridge: String,
    pub subnet: String,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        BridgeConfig {
            bridge: "corefour0".into(),
            subnet: "10.88.0.0/24".into(),
        }
    }
}

impl BridgeConfig {
    pub fn parse_subnet(&self) -> Result<(Ipv4Addr, u8), NetworkError> {
        let bad = || NetworkError::Subnet(self.subnet.clone());
        let (a, l) = self.subnet.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&len) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - len);
        Ok((Ipv4Addr::from(u32::from(addr) & mask), len))
    }

    /// Host number `n` of the subnet (1 = gateway).
    pub fn host(&self, n: u32) -> Result<Ipv4Addr, NetworkError> {
        let (net, len) = self.parse_subnet()?;
        let max = (1u32 << (32 - len)) - 2;
        if n == 0 || n > max {
            return Err(NetworkError::Exhausted(self.subnet.clone()));
        }
        Ok(Ipv4Addr::from(u32::from(net) + n))
    }

    pub fn prefix_len(&self) -> u8 {
        self.parse_subnet().map(|(_, l)| l).unwrap_or(24)
    }

    /// The lowest address (from host 2 on) not in `used`.
    pub fn allocate(&self, used: &[Ipv4Addr]) -> Result<Ipv4Addr, NetworkError> {
        let (_, len) = self.parse_subnet()?;
        let max = (1u32 << (32 - len)) - 2;
        (2..=max)
            .map(|n| self.host(n))
            .find(|a| a.as_ref().is_ok_and(|a| !used.contains(a)))
            .unwrap_or_else(|| Err(NetworkError::Exhausted(self.subnet.clone())))
    }
}

fn ip(args: &[&str]) -> Result<(), NetworkError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetworkError::Ip {
            args: args.join(" "),
            msg: format!("{e} (install iproute2)"),
        })?;
    if !out.status.success() {
        return Err(NetworkError::Ip {
            args: args.join(" "),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// Creates the bridge with the gateway address unless it exists.
pub fn ensure_bridge(cfg: &BridgeConfig) -> Result<(), NetworkError> {
    if link_exists(&cfg.bridge) {
        return Ok(());
    }
    let gw = format!("{}/{}", cfg.host(1)?, cfg.prefix_len());
    ip(&["link", "add", &cfg.bridge, "type", "bridge"])?;
    ip(&["addr", "add", &gw, "dev", &cfg.bridge])?;
    ip(&["link", "set", &cfg.bridge, "up"])
}

/// Names for one container: its netns and the host end of its veth (<= 15 bytes).
pub fn names(container: &str) -> (String, String) {
    let mut h: u32 = 2166136261;
    for b in container.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(16777619);
    }
    (format!("corefour-{container}"), format!("c4v{h:08x}"))
}

pub fn netns_path(container: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(names(container).0)
}

/// Creates the container's netns, a veth into the bridge, and its address and default route.
pub fn attach(
    cfg: &BridgeConfig,
    container: &str,
    addr: Ipv4Addr,
) -> Result<PathBuf, NetworkError> {
    ensure_bridge(cfg)?;
    let (ns, host_if) = names(container);
    detach(container);
    ip(&["netns", "add", &ns])?;
    let r = (|| {
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["link", "set", &host_if, "master", &cfg.bridge, "up"])?;
        let a = format!("{addr}/{}", cfg.prefix_len());
        ip(&["-n", &ns, "addr", "add", &a, "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &cfg.host(1)?.to_string(),
        ])
    })();
    if let Err(e) = r {
        detach(container);
        return Err(e);
    }
    Ok(netns_path(container))
}

/// Removes the container's netns and veth (best effort: either may already be gone).
pub fn detach(container: &str) {
    let (ns, host_if) = names(container);
    if link_exists(&host_if) {
        let _ = ip(&["link", "del", &host_if]);
    }
    if netns_path(container).exists() {
        let _ = ip(&["netns", "del", &ns]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let c = BridgeConfig {
            bridge: "b".into(),
            subnet: "10.1.2.77/24".into(),
        };
        assert_eq!(c.host(1).unwrap(), Ipv4Addr::new(10, 1, 2, 1));
        assert_eq!(c.allocate(&[]).unwrap(), Ipv4Addr::new(10, 1, 2, 2));
        assert_eq!(
            c.allocate(&[Ipv4Addr::new(10, 1, 2, 2)]).unwrap(),
            Ipv4Addr::new(10, 1, 2, 3)
        );
        let small = BridgeConfig {
            bridge: "b".into(),
            subnet: "10.0.0.0/30".into(),
        };
        assert!(small.allocate(&[Ipv4Addr::new(10, 0, 0, 2)]).is_err());
        assert!(BridgeConfig {
            bridge: "b".into(),
            subnet: "10.0.0.0".into()
        }
        .parse_subnet()
        .is_err());
        assert!(names("a-very-long-container-name").1.len() <= 15);
    }
}
