//! The `vm.json` the daemon writes for `corefour vmm --config` (see notes/vmm-contract.md).

use serde::Serialize;

use crate::inventory::VmRecord;

/// The VMM's config file as the contract defines it. The VMM parses it with `deny_unknown_fields`,
/// so only the fields it knows are written: CPU pinning and limits are enforced through the VM's
/// cgroup instead.
#[derive(Debug, Serialize)]
pub struct VmmConfig<'a> {
    pub kernel: &'a str,
    pub cmdline: &'a str,
    pub initrd: Option<&'a str>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub backend: &'a str,
    pub timeout_secs: Option<u64>,
    pub disks: Vec<VmmDisk<'a>>,
    pub nets: Vec<VmmNet<'a>>,
}

#[derive(Debug, Serialize)]
pub struct VmmDisk<'a> {
    pub path: &'a str,
    pub read_only: bool,
}

#[derive(Debug, Serialize)]
pub struct VmmNet<'a> {
    pub tap: &'a str,
    pub mac: &'a str,
}

pub fn render(rec: &VmRecord) -> Vec<u8> {
    let cfg = VmmConfig {
        kernel: &rec.spec.kernel,
        cmdline: rec.spec.cmdline.as_deref().unwrap_or(""),
        initrd: rec.spec.initrd.as_deref(),
        vcpus: rec.spec.vcpus,
        memory_mib: rec.spec.memory_mib,
        backend: &rec.spec.backend,
        timeout_secs: None,
        disks: rec
            .spec
            .disks
            .iter()
            .map(|d| VmmDisk {
                path: &d.path,
                read_only: d.read_only,
            })
            .collect(),
        nets: rec
            .nics
            .iter()
            .map(|n| VmmNet {
                tap: &n.tap,
                mac: &n.mac,
            })
            .collect(),
    };
    serde_json::to_vec_pretty(&cfg).unwrap_or_default()
}
