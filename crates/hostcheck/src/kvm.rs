//! /dev/kvm: whether it opens, its API version, which module serves it, and the capabilities the
//! VMM relies on.

use std::io;

use serde::Serialize;

use crate::probe::HostProbe;

/// The KVM device path.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// The only KVM API version there has ever been a stable ABI for.
pub const KVM_API_VERSION: i32 = 12;

/// Errors opening or querying /dev/kvm. The OS error (and so the errno) is kept.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl KvmError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            KvmError::Open { source, .. } => source.raw_os_error(),
        }
    }
}

/// Which kernel module provides /dev/kvm, from /sys/module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvmFlavour {
    /// Intel VT-x.
    KvmIntel,
    /// AMD-V.
    KvmAmd,
    /// Pagetable-based virtual machine: KVM without vmx/svm, for PVM-aware guests.
    KvmPvm,
    /// A `kvm` module without a vendor module we know.
    Other,
    /// No KVM module at all.
    None,
}

impl KvmFlavour {
    pub fn as_str(self) -> &'static str {
        match self {
            KvmFlavour::KvmIntel => "kvm_intel",
            KvmFlavour::KvmAmd => "kvm_amd",
            KvmFlavour::KvmPvm => "kvm_pvm",
            KvmFlavour::Other => "other",
            KvmFlavour::None => "none",
        }
    }

    /// Picks the flavour from the names under /sys/module. A vendor module is only listed there
    /// when loaded (or built in with parameters, which all three have).
    pub fn from_modules(modules: &[String]) -> KvmFlavour {
        let has = |m: &str| modules.iter().any(|n| n == m);
        if has("kvm_intel") {
            KvmFlavour::KvmIntel
        } else if has("kvm_amd") {
            KvmFlavour::KvmAmd
        } else if has("kvm_pvm") {
            KvmFlavour::KvmPvm
        } else if modules.iter().any(|n| n == "kvm" || n.starts_with("kvm_")) {
            KvmFlavour::Other
        } else {
            KvmFlavour::None
        }
    }
}

/// How much the VMM depends on a capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Need {
    /// The KVM backend refuses to start without it.
    Required,
    /// A feature (live migration, MSI, a faster path) is lost without it.
    Recommended,
}

/// One `KVM_CAP_*` the VMM asks about.
#[derive(Debug, Clone, Copy)]
pub struct CapSpec {
    /// The name without `KVM_CAP_`, as in the kernel's api.rst.
    pub name: &'static str,
    pub raw: u32,
    pub need: Need,
    /// What the VMM uses it for (shown when it is missing).
    pub used_for: &'static str,
    /// The value is a count or size, not just a yes/no.
    pub numeric: bool,
}

const fn cap(
    name: &'static str,
    raw: u32,
    need: Need,
    used_for: &'static str,
    numeric: bool,
) -> CapSpec {
    CapSpec {
        name,
        raw,
        need,
        used_for,
        numeric,
    }
}

use kvm_bindings as kb;

/// The capabilities the corefour VMM relies on, in display order.
pub const CAPABILITIES: &[CapSpec] = &[
    cap(
        "USER_MEMORY",
        kb::KVM_CAP_USER_MEMORY,
        Need::Required,
        "guest RAM from host mappings",
        false,
    ),
    cap(
        "IRQCHIP",
        kb::KVM_CAP_IRQCHIP,
        Need::Required,
        "the in-kernel PIC, IOAPIC and LAPIC",
        false,
    ),
    cap(
        "IOEVENTFD",
        kb::KVM_CAP_IOEVENTFD,
        Need::Required,
        "virtio queue notifications without a VM exit to userspace",
        false,
    ),
    cap(
        "IRQFD",
        kb::KVM_CAP_IRQFD,
        Need::Required,
        "device interrupts from eventfds",
        false,
    ),
    cap(
        "IMMEDIATE_EXIT",
        kb::KVM_CAP_IMMEDIATE_EXIT,
        Need::Required,
        "race-free vCPU kicks for pause, stop and timeouts",
        false,
    ),
    cap(
        "SET_TSS_ADDR",
        kb::KVM_CAP_SET_TSS_ADDR,
        Need::Required,
        "the TSS region x86 KVM needs before the first KVM_RUN",
        false,
    ),
    cap(
        "EXT_CPUID",
        kb::KVM_CAP_EXT_CPUID,
        Need::Required,
        "KVM_GET_SUPPORTED_CPUID/KVM_SET_CPUID2 before long mode",
        false,
    ),
    cap(
        "NR_VCPUS",
        kb::KVM_CAP_NR_VCPUS,
        Need::Recommended,
        "the recommended vCPU count per VM",
        true,
    ),
    cap(
        "MAX_VCPUS",
        kb::KVM_CAP_MAX_VCPUS,
        Need::Recommended,
        "the largest vCPU count per VM",
        true,
    ),
    cap(
        "NR_MEMSLOTS",
        kb::KVM_CAP_NR_MEMSLOTS,
        Need::Recommended,
        "memory slots per VM",
        true,
    ),
    cap(
        "PIT2",
        kb::KVM_CAP_PIT2,
        Need::Recommended,
        "the in-kernel i8254 timer",
        false,
    ),
    cap(
        "IRQ_ROUTING",
        kb::KVM_CAP_IRQ_ROUTING,
        Need::Recommended,
        "GSI routing for MSI and irqfd",
        false,
    ),
    cap(
        "SIGNAL_MSI",
        kb::KVM_CAP_SIGNAL_MSI,
        Need::Recommended,
        "MSI injection from userspace",
        false,
    ),
    cap(
        "MANUAL_DIRTY_LOG_PROTECT2",
        kb::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        Need::Recommended,
        "dirty-page logging with manual re-protect for live migration",
        true,
    ),
    cap(
        "DIRTY_LOG_RING",
        kb::KVM_CAP_DIRTY_LOG_RING,
        Need::Recommended,
        "the per-vCPU dirty ring for live migration (value: max bytes)",
        true,
    ),
    cap(
        "XSAVE",
        kb::KVM_CAP_XSAVE,
        Need::Recommended,
        "saving extended FPU state for snapshots",
        false,
    ),
    cap(
        "VCPU_EVENTS",
        kb::KVM_CAP_VCPU_EVENTS,
        Need::Recommended,
        "saving pending exceptions and interrupts for snapshots",
        false,
    ),
    cap(
        "ADJUST_CLOCK",
        kb::KVM_CAP_ADJUST_CLOCK,
        Need::Recommended,
        "keeping kvmclock across snapshot/restore",
        false,
    ),
];

/// One capability's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CapValue {
    pub name: &'static str,
    /// `KVM_CHECK_EXTENSION`'s return: 0 absent, otherwise present (a count or size for numeric caps).
    pub value: i32,
    pub need: Need,
}

impl CapValue {
    pub fn present(&self) -> bool {
        self.value > 0
    }
}

/// Everything the host check learnt about KVM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KvmInfo {
    pub device: &'static str,
    pub present: bool,
    pub openable: bool,
    /// Why opening failed, and its errno.
    pub open_error: Option<String>,
    pub open_errno: Option<i32>,
    pub api_version: Option<i32>,
    pub flavour: KvmFlavour,
    /// `kvm*` entries under /sys/module, sorted.
    pub modules: Vec<String>,
    /// The vendor module's `ept` (kvm_intel) or `npt` (kvm_amd) parameter, when there is one.
    pub slat_enabled: Option<bool>,
    /// In [`CAPABILITIES`] order; empty when /dev/kvm did not open.
    pub capabilities: Vec<CapValue>,
}

impl KvmInfo {
    pub fn cap(&self, name: &str) -> Option<&CapValue> {
        self.capabilities.iter().find(|c| c.name == name)
    }

    /// The required capabilities KVM lacks (all of them when it did not open).
    pub fn missing_required(&self) -> Vec<&'static str> {
        CAPABILITIES
            .iter()
            .filter(|spec| spec.need == Need::Required)
            .filter(|spec| !self.cap(spec.name).is_some_and(CapValue::present))
            .map(|spec| spec.name)
            .collect()
    }

    /// /dev/kvm opened, speaks API 12 and has every required capability: the KVM backend can run.
    pub fn usable(&self) -> bool {
        self.openable
            && self.api_version == Some(KVM_API_VERSION)
            && self.missing_required().is_empty()
    }
}

/// Sysfs booleans are "Y"/"N" or "1"/"0".
fn parse_param_bool(text: &str) -> Option<bool> {
    match text.trim() {
        "Y" | "y" | "1" => Some(true),
        "N" | "n" | "0" => Some(false),
        _ => None,
    }
}

pub(crate) fn probe(host: &dyn HostProbe) -> KvmInfo {
    let mut modules: Vec<String> = host
        .list_dir("/sys/module")
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n == "kvm" || n.starts_with("kvm_"))
        .collect();
    modules.sort();
    let flavour = KvmFlavour::from_modules(&modules);
    let slat_param = match flavour {
        KvmFlavour::KvmIntel => Some("/sys/module/kvm_intel/parameters/ept"),
        KvmFlavour::KvmAmd => Some("/sys/module/kvm_amd/parameters/npt"),
        _ => None,
    };
    let slat_enabled = slat_param
        .and_then(|p| host.read_file(p).ok())
        .and_then(|t| parse_param_bool(&t));

    let mut info = KvmInfo {
        device: KVM_DEVICE,
        present: host.path_exists(KVM_DEVICE),
        openable: false,
        open_error: None,
        open_errno: None,
        api_version: None,
        flavour,
        modules,
        slat_enabled,
        capabilities: Vec::new(),
    };
    if !info.present {
        return info;
    }
    match host.open_kvm(KVM_DEVICE) {
        Ok(kvm) => {
            info.openable = true;
            info.api_version = Some(kvm.api_version());
            info.capabilities = CAPABILITIES
                .iter()
                .map(|spec| CapValue {
                    name: spec.name,
                    value: kvm.check_extension(spec.raw),
                    need: spec.need,
                })
                .collect();
        }
        Err(e) => {
            info.open_errno = e.errno();
            info.open_error = Some(e.to_string());
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flavour_from_modules() {
        assert_eq!(
            KvmFlavour::from_modules(&names(&["kvm", "kvm_intel"])),
            KvmFlavour::KvmIntel
        );
        assert_eq!(
            KvmFlavour::from_modules(&names(&["kvm", "kvm_amd"])),
            KvmFlavour::KvmAmd
        );
        assert_eq!(
            KvmFlavour::from_modules(&names(&["kvm", "kvm_pvm"])),
            KvmFlavour::KvmPvm
        );
        assert_eq!(
            KvmFlavour::from_modules(&names(&["kvm"])),
            KvmFlavour::Other
        );
        assert_eq!(
            KvmFlavour::from_modules(&names(&["kvm_foo"])),
            KvmFlavour::Other
        );
        assert_eq!(
            KvmFlavour::from_modules(&names(&["ext4", "kvmish"])),
            KvmFlavour::None
        );
    }

    #[test]
    fn params() {
        assert_eq!(parse_param_bool("Y\n"), Some(true));
        assert_eq!(parse_param_bool("0"), Some(false));
        assert_eq!(parse_param_bool("maybe"), None);
    }

    #[test]
    fn pvm_host_probe() {
        let host = FakeHost::pvm_amd_epyc();
        let k = probe(&host);
        assert_eq!(k.flavour, KvmFlavour::KvmPvm);
        assert_eq!(k.modules, names(&["kvm", "kvm_pvm"]));
        assert!(k.present && k.openable && k.usable());
        assert_eq!(k.api_version, Some(12));
        assert_eq!(k.slat_enabled, None);
        assert_eq!(k.capabilities.len(), CAPABILITIES.len());
        assert_eq!(k.cap("MAX_VCPUS").map(|c| c.value), Some(1024));
    }

    #[test]
    fn intel_ept_parameter() {
        let host = FakeHost::intel_vmx_ept();
        let k = probe(&host);
        assert_eq!(k.flavour, KvmFlavour::KvmIntel);
        assert_eq!(k.slat_enabled, Some(true));
    }

    #[test]
    fn permission_denied_keeps_errno() {
        let host = FakeHost::intel_vmx_ept().with_kvm_open_error(libc_eacces());
        let k = probe(&host);
        assert!(k.present && !k.openable && !k.usable());
        assert_eq!(k.open_errno, Some(13));
        assert!(
            k.open_error
                .as_deref()
                .is_some_and(|e| e.contains("/dev/kvm")),
            "{:?}",
            k.open_error
        );
        assert_eq!(k.missing_required().len(), 7);
    }

    #[test]
    fn missing_required_capability() {
        let host = FakeHost::intel_vmx_ept().with_cap("IRQFD", 0);
        let k = probe(&host);
        assert_eq!(k.missing_required(), vec!["IRQFD"]);
        assert!(!k.usable());
    }

    fn libc_eacces() -> i32 {
        13
    }
}
