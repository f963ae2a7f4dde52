//! Probes the host: CPU flags, /dev/kvm and its capabilities, KVM flavour, cgroups, namespaces,
//! overlayfs, tun, huge pages; and decides how this host can run VMs ([`Verdict`]).
//!
//! `corefour host check` prints [`HostReport`]; `--json` serializes it (documented in this crate's
//! README.md; [`SCHEMA_VERSION`] is bumped when a field is removed or changes meaning).
//! The VMM's `--backend auto` asks [`verdict`] (cheap: /proc/cpuinfo, /sys/module, /dev/kvm only).
//!
//! Every OS access goes through [`HostProbe`], so the checks run in tests on canned hosts
//! (`fake::FakeHost`, feature `test-utils`).

mod cgroups;
mod checks;
mod cpu;
mod filesystems;
mod hugepages;
mod kvm;
mod namespaces;
mod probe;
mod report;
mod verdict;

#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
#[cfg(any(test, feature = "test-utils"))]
pub mod fixtures;

pub use cgroups::{
    parse_mountinfo, parse_proc_cgroups, CgroupInfo, CgroupVersion, KernelController, V1Hierarchy,
};
pub use cpu::{count_cpu_list, parse_cpuinfo, CpuInfo};
pub use filesystems::parse_filesystems;
pub use hugepages::{HugePageInfo, HugePageSize};
pub use kvm::{
    CapSpec, CapValue, KvmError, KvmFlavour, KvmInfo, Need, CAPABILITIES, KVM_API_VERSION,
    KVM_DEVICE,
};
pub use namespaces::{NamespaceInfo, NAMESPACES};
pub use probe::{HostProbe, KvmHandle, RealHost};
pub use report::{Check, Counts, HostReport, Status, TunInfo, VerdictInfo, SCHEMA_VERSION};
pub use verdict::{Verdict, SOFTWARE_CPU_AVAILABLE};

/// Runs every check on this host.
pub fn check_host() -> HostReport {
    HostReport::probe(&RealHost, SOFTWARE_CPU_AVAILABLE)
}

/// How this host can run VMs. Reads only what the decision needs (about a millisecond).
pub fn verdict() -> Verdict {
    verdict_with(&RealHost, SOFTWARE_CPU_AVAILABLE)
}

/// [`verdict`] on any host (tests feed a fake).
pub fn verdict_with(host: &dyn HostProbe, software_cpu: bool) -> Verdict {
    Verdict::decide(&cpu::probe(host), &kvm::probe(host), software_cpu)
}

/// KVM runs any guest OS at hardware speed here (vmx/svm with kvm_intel/kvm_amd).
pub fn hardware_virtualization() -> bool {
    verdict().hardware_virtualization()
}

/// KVM can run VMs here at all, including custom guests on kvm_pvm.
pub fn kvm_usable() -> bool {
    verdict().kvm_usable()
}
