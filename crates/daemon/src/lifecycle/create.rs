//! `POST /v1/vms`: validate a definition, record it, make its directory.

use std::sync::Arc;

use corefour_api::{VmCreate, VmInfo};

use super::{remove_dir_if_exists, to_info, Daemon};
use crate::error::DaemonError;
use crate::names::{canonical_file, validate_name};
use crate::network::validate_ifname;

/// Upper bounds the daemon accepts; the VMM enforces what its backend can really do.
const MAX_VCPUS: u32 = 64;
const MAX_MEMORY_MIB: u64 = 1 << 20;

impl Daemon {
    pub async fn create(self: &Arc<Self>, req: VmCreate) -> Result<VmInfo, DaemonError> {
        let spec = validate(req)?;
        let name = spec.name.clone();
        let start = spec.start;
        {
            let _g = self.op_lock(&name).await;
            let rec = self.inv.insert_vm(&spec)?;
            let dir = self.vm_dir(&name);
            // A directory left by a delete that crashed half way belongs to nobody now.
            remove_dir_if_exists(&dir)?;
            if let Err(e) = std::fs::create_dir_all(&dir) {
                let _ = self.inv.delete_vm(&name);
                return Err(DaemonError::io(
                    format!("cannot create {}", dir.display()),
                    e,
                ));
            }
            if !start {
                return Ok(to_info(rec));
            }
        }
        self.start(&name).await
    }
}

fn validate(mut req: VmCreate) -> Result<VmCreate, DaemonError> {
    validate_name(&req.name)?;
    req.kernel = canonical_file("kernel", &req.kernel)?.display().to_string();
    if let Some(i) = &req.initrd {
        req.initrd = Some(canonical_file("initrd", i)?.display().to_string());
    }
    if let Some(c) = &req.cmdline {
        if c.contains('\0') || c.len() > 4096 {
            return Err(DaemonError::BadRequest(
                "cmdline must be at most 4096 bytes without NUL characters".into(),
            ));
        }
    }
    if !(1..=MAX_VCPUS).contains(&req.vcpus) {
        return Err(DaemonError::BadRequest(format!(
            "vcpus {} is out of range: use 1..={MAX_VCPUS}",
            req.vcpus
        )));
    }
    if !(1..=MAX_MEMORY_MIB).contains(&req.memory_mib) {
        return Err(DaemonError::BadRequest(format!(
            "memory_mib {} is out of range: use 1..={MAX_MEMORY_MIB}",
            req.memory_mib
        )));
    }
    if let Some(b) = req.balloon_mib {
        if b >= req.memory_mib {
            return Err(DaemonError::BadRequest(format!(
                "balloon_mib {b} must be below memory_mib {}",
                req.memory_mib
            )));
        }
    }
    if !matches!(req.backend.as_str(), "auto" | "kvm" | "emu") {
        return Err(DaemonError::BadRequest(format!(
            "backend {:?} is unknown: use auto, kvm or emu",
            req.backend
        )));
    }
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let online = online_cpus().unwrap_or(host_cpus);
    for &c in &req.cpu_pin {
        if c >= online {
            return Err(DaemonError::BadRequest(format!(
                "cpu_pin names host CPU {c}, but this host has CPUs 0..={}",
                online - 1
            )));
        }
    }
    if let Some(q) = req.cpu_quota_pct {
        if !(1..=100_000).contains(&q) {
            return Err(DaemonError::BadRequest(format!(
                "cpu_quota_pct {q} is out of range: use 1..=100000 (percent of one CPU)"
            )));
        }
    }
    if let Some(w) = req.cpu_weight {
        if !(1..=10_000).contains(&w) {
            return Err(DaemonError::BadRequest(format!(
                "cpu_weight {w} is out of range: use 1..=10000"
            )));
        }
    }
    for d in &mut req.disks {
        d.path = canonical_file("disk", &d.path)?.display().to_string();
    }
    for n in &mut req.nets {
        validate_ifname(&n.bridge)?;
        if let Some(m) = &n.mac {
            n.mac = Some(validate_mac(m)?);
        }
    }
    Ok(req)
}

/// Number of the highest online CPU plus one.
fn online_cpus() -> Option<u32> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    let last = s.trim().rsplit([',', '-']).next()?;
    last.parse::<u32>().ok().map(|n| n + 1)
}

/// `aa:bb:cc:dd:ee:ff`, unicast; returned lower-case so uniqueness is case-blind.
fn validate_mac(mac: &str) -> Result<String, DaemonError> {
    let bad = || {
        DaemonError::BadRequest(format!(
            "MAC {mac:?} is invalid: use six hex pairs like 02:00:00:00:00:01 (unicast)"
        ))
    };
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut bytes = [0u8; 6];
    for (b, p) in bytes.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if bytes[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            validate_mac("02:AB:00:00:00:01").unwrap(),
            "02:ab:00:00:00:01"
        );
        for bad in [
            "01:00:00:00:00:00",
            "02:00:00:00:00",
            "02:00:00:00:00:0g",
            "2:0:0:0:0:0",
        ] {
            assert!(validate_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_definitions() {
        let base = |extra: serde_json::Value| {
            let mut v = serde_json::json!({"name": "a", "kernel": "/bin/sh"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            validate(serde_json::from_value(v).unwrap())
        };
        assert!(base(serde_json::json!({})).is_ok());
        for bad in [
            serde_json::json!({"name": "../x"}),
            serde_json::json!({"kernel": "relative"}),
            serde_json::json!({"kernel": "/nonexistent"}),
            serde_json::json!({"vcpus": 0}),
            serde_json::json!({"memory_mib": 0}),
            serde_json::json!({"memory_mib": 64, "balloon_mib": 64}),
            serde_json::json!({"backend": "xen"}),
            serde_json::json!({"cpu_pin": [4096]}),
            serde_json::json!({"cpu_weight": 0}),
            serde_json::json!({"nets": [{"bridge": "a/b"}]}),
        ] {
            assert!(base(bad.clone()).is_err(), "{bad}");
        }
    }
}
