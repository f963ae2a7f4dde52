//! The `vm.json` the daemon writes for `corefour vmm --config` (notes/vmm-contract.md), built from
//! the VMM's own `VmConfig` type so the two can never drift apart.

use std::path::PathBuf;

use corefour_vmm::config::{BackendKind, DiskConfig, NetConfig, VmConfig};
use corefour_vmm::virtio_devices::{BalloonConfig, RateLimitConfig};

use crate::inventory::VmRecord;

/// The VMM's config for a stored VM. CPU pinning and limits are not VMM settings: the daemon
/// enforces them through the VM's cgroup and thread affinity. Disk and NIC rate limits go to the
/// VMM as token buckets for its virtio devices.
pub fn build(rec: &VmRecord) -> VmConfig {
    let mut cfg = VmConfig::new(&rec.spec.kernel);
    cfg.cmdline = rec.spec.cmdline.clone().unwrap_or_default();
    cfg.initrd = rec.spec.initrd.as_ref().map(PathBuf::from);
    cfg.vcpus = rec.spec.vcpus;
    cfg.memory_mib = rec.spec.memory_mib;
    cfg.balloon = rec.spec.balloon_mib.map(|target_mib| BalloonConfig {
        target_mib,
        stats_interval_secs: None,
    });
    cfg.backend = rec.spec.backend.parse().unwrap_or(BackendKind::Auto);
    cfg.disks = rec
        .spec
        .disks
        .iter()
        .map(|d| DiskConfig {
            path: PathBuf::from(&d.path),
            read_only: d.read_only,
            direct: false,
            serial: None,
            rate_limit: rate_limit(d.rate_limit.as_ref()),
            format: None,
            io: None,
        })
        .collect();
    cfg.nets = rec
        .nics
        .iter()
        .map(|n| NetConfig {
            tap: n.tap.clone(),
            mac: Some(n.mac.clone()),
            rx_rate_limit: rate_limit(n.rate_limit.as_ref()),
            tx_rate_limit: rate_limit(n.rate_limit.as_ref()),
        })
        .collect();
    cfg
}

/// The API's limit as the VMM's token bucket: a burst of one second's worth.
fn rate_limit(r: Option<&corefour_api::RateLimit>) -> RateLimitConfig {
    let r = r.cloned().unwrap_or_default();
    let bytes = r.bytes_per_sec.unwrap_or(0);
    let ops = r.ops_per_sec.unwrap_or(0);
    RateLimitConfig {
        bytes_per_sec: bytes,
        bytes_burst: bytes,
        ops_per_sec: ops,
        ops_burst: ops,
    }
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
            "backend": "emu", "balloon_mib": 8, "disks": [{"path": "/d", "read_only": true}], "cpu_pin": [0]
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
        assert_eq!(back.balloon.map(|b| b.target_mib), Some(8));
        assert_eq!(back.cmdline, "x=1");
        assert_eq!(back.nets[0].tap, "c4t1n0");
        assert!(back.disks[0].read_only);
    }
}
