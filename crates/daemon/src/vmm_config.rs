//! The `vm.json` the daemon writes for `corefour vmm --config` (notes/vmm-contract.md), built from
//! the VMM's own `VmConfig` type so the two can never drift apart.

use std::path::PathBuf;

use corefour_vmm::config::{BackendKind, DiskConfig, NetConfig, VmConfig};

use crate::inventory::VmRecord;

/// The VMM's config for a stored VM. CPU pinning and limits are not VMM settings: the daemon
/// enforces them through the VM's cgroup and thread affinity. Rate limits are kept in the
/// inventory until the VMM's virtio devices take them.
pub fn build(rec: &VmRecord) -> VmConfig {
    let mut cfg = VmConfig::new(&rec.spec.kernel);
    cfg.cmdline = rec.spec.cmdline.clone().unwrap_or_default();
    cfg.initrd = rec.spec.initrd.as_ref().map(PathBuf::from);
    cfg.vcpus = rec.spec.vcpus;
    cfg.memory_mib = rec.spec.memory_mib;
    cfg.backend = rec.spec.backend.parse().unwrap_or(BackendKind::Auto);
    cfg.disks = rec
        .spec
        .disks
        .iter()
        .map(|d| DiskConfig {
            path: PathBuf::from(&d.path),
            read_only: d.read_only,
        })
        .collect();
    cfg.nets = rec
        .nics
        .iter()
        .map(|n| NetConfig {
            tap: n.tap.clone(),
            mac: Some(n.mac.clone()),
        })
        .collect();
    cfg
}

pub fn render(rec: &VmRecord) -> Vec<u8> {
    serde_json::to_vec_pretty(&build(rec)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmm_reads_back_what_the_daemon_writes() {
        let spec = serde_json::from_value(serde_json::json!({
            "name": "a", "kernel": "/k", "cmdline": "x=1", "vcpus": 2, "memory_mib": 32,
            "backend": "emu", "disks": [{"path": "/d", "read_only": true}], "cpu_pin": [0]
        }))
        .unwrap();
        let rec = VmRecord {
            id: 1,
            name: "a".into(),
            state: corefour_api::VmState::Created,
            spec,
            nics: vec![corefour_api::VmNic {
                bridge: "br0".into(),
                tap: "c4t1n0".into(),
                mac: "02:c4:00:00:01:00".into(),
                rate_limit: None,
            }],
            pids: None,
            stop_reason: None,
            exit_code: None,
            created_ms: 0,
        };
        let text = String::from_utf8(render(&rec)).unwrap();
        let back = VmConfig::from_json(&text, std::path::Path::new("vm.json")).unwrap();
        assert_eq!(back, build(&rec));
        assert_eq!(back.backend, BackendKind::Emu);
        assert_eq!(back.cmdline, "x=1");
        assert_eq!(back.nets[0].tap, "c4t1n0");
        assert!(back.disks[0].read_only);
    }
}
