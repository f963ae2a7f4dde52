//! A test network: a Linux bridge with persistent taps for VMs and a veth into a fresh network
//! namespace that plays the test host. Everything is removed on drop.

use std::process::Command;

pub struct TestNet {
    pub ns: String,
    pub br: String,
    pub taps: Vec<String>,
    /// The test host's address inside the namespace (a /24).
    pub host_ip: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e} (install iproute2)"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl TestNet {
    /// Interface names are `<prefix>{h,b,v,p,t0..}<pid>`, short enough for IFNAMSIZ with a
    /// 4-character prefix. `host_ip` is the test host's address in its /24.
    pub fn new(prefix: &str, host_ip: &str, taps: usize) -> Result<Self, String> {
        let id = std::process::id() % 100_000;
        let mut n = TestNet {
            ns: format!("{prefix}h{id}"),
            br: format!("{prefix}b{id}"),
            taps: Vec::new(),
            host_ip: host_ip.to_string(),
        };
        let (vh, vp) = (format!("{prefix}v{id}"), format!("{prefix}p{id}"));
        ip(&["netns", "add", &n.ns])?;
        ip(&["link", "add", &n.br, "type", "bridge"])?;
        ip(&["link", "set", &n.br, "up"])?;
        ip(&[
            "link", "add", &vh, "type", "veth", "peer", "name", &vp, "netns", &n.ns,
        ])?;
        ip(&["link", "set", &vh, "master", &n.br, "up"])?;
        ip(&[
            "-n",
            &n.ns,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            &vp,
        ])?;
        ip(&["-n", &n.ns, "link", "set", &vp, "up"])?;
        for i in 0..taps {
            let tap = format!("{prefix}t{i}{id}");
            ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
            n.taps.push(tap.clone());
            ip(&["link", "set", &tap, "master", &n.br, "up"])?;
        }
        Ok(n)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for t in &self.taps {
            let _ = ip(&["link", "del", t]);
        }
        let _ = ip(&["link", "del", &self.br]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}
