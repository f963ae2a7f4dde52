//! The one-line answer: how this host can run VMs, if at all.

use serde::Serialize;

use crate::cpu::CpuInfo;
use crate::kvm::{KvmFlavour, KvmInfo};

/// The software CPU (`corefour-emu`) is an x86-64 guest CPU built for x86-64 hosts; on any other
/// host architecture the project has no VM backend, so only containers remain.
pub const SOFTWARE_CPU_AVAILABLE: bool = cfg!(target_arch = "x86_64");

/// How this host can run VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// KVM on vmx/svm (kvm_intel, kvm_amd): any guest at hardware speed.
    HardwareVirtualization,
    /// KVM works but without vmx/svm (kvm_pvm): custom and PVM-aware guests only; full OSes use the
    /// software CPU.
    KvmWithoutVmxSvm,
    /// No usable KVM: every VM runs on the software CPU.
    SoftwareEmulationOnly,
    /// No VM backend at all.
    ContainersOnly,
}

impl Verdict {
    /// Decides from what the CPU and KVM probes found.
    pub fn decide(cpu: &CpuInfo, kvm: &KvmInfo, software_cpu: bool) -> Verdict {
        if kvm.usable() {
            if kvm.flavour != KvmFlavour::KvmPvm && cpu.has_virt_extension() {
                Verdict::HardwareVirtualization
            } else {
                Verdict::KvmWithoutVmxSvm
            }
        } else if software_cpu {
            Verdict::SoftwareEmulationOnly
        } else {
            Verdict::ContainersOnly
        }
    }

    /// The stable identifier (the JSON `verdict.id`).
    pub fn id(self) -> &'static str {
        match self {
            Verdict::HardwareVirtualization => "hardware_virtualization",
            Verdict::KvmWithoutVmxSvm => "kvm_without_vmx_svm",
            Verdict::SoftwareEmulationOnly => "software_emulation_only",
            Verdict::ContainersOnly => "containers_only",
        }
    }

    /// The sentence a person reads.
    pub fn summary(self) -> &'static str {
        match self {
            Verdict::HardwareVirtualization => "hardware virtualization (KVM with vmx/svm)",
            Verdict::KvmWithoutVmxSvm => {
                "KVM without vmx/svm (kvm_pvm: only custom/PVM guests; full OSes use the software CPU)"
            }
            Verdict::SoftwareEmulationOnly => "software emulation only",
            Verdict::ContainersOnly => "containers only",
        }
    }

    /// The VM backends that can run here, best first: "kvm", "emu".
    pub fn backends(self) -> &'static [&'static str] {
        match self {
            Verdict::HardwareVirtualization | Verdict::KvmWithoutVmxSvm => &["kvm", "emu"],
            Verdict::SoftwareEmulationOnly => &["emu"],
            Verdict::ContainersOnly => &[],
        }
    }

    /// Some VM backend can run (the `host check` exit status is 0 exactly then).
    pub fn vm_backend_available(self) -> bool {
        self != Verdict::ContainersOnly
    }

    /// Full guest OSes (stock Linux kernels) run on KVM at hardware speed: what `--backend auto`
    /// asks before it picks KVM for a Linux guest.
    pub fn hardware_virtualization(self) -> bool {
        self == Verdict::HardwareVirtualization
    }

    /// KVM can create and run VMs at all (custom guests on kvm_pvm included).
    pub fn kvm_usable(self) -> bool {
        matches!(
            self,
            Verdict::HardwareVirtualization | Verdict::KvmWithoutVmxSvm
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;
    use crate::probe::HostProbe;

    fn decide(host: &dyn HostProbe, software_cpu: bool) -> Verdict {
        Verdict::decide(
            &crate::cpu::probe(host),
            &crate::kvm::probe(host),
            software_cpu,
        )
    }

    #[test]
    fn intel_with_kvm_intel() {
        let v = decide(&FakeHost::intel_vmx_ept(), true);
        assert_eq!(v, Verdict::HardwareVirtualization);
        assert_eq!(v.backends(), &["kvm", "emu"]);
        assert!(v.hardware_virtualization() && v.kvm_usable());
    }

    #[test]
    fn amd_with_kvm_amd() {
        assert_eq!(
            decide(&FakeHost::amd_svm_npt(), true),
            Verdict::HardwareVirtualization
        );
    }

    #[test]
    fn pvm_like_this_machine() {
        let v = decide(&FakeHost::pvm_amd_epyc(), true);
        assert_eq!(v, Verdict::KvmWithoutVmxSvm);
        assert!(v.kvm_usable() && !v.hardware_virtualization() && v.vm_backend_available());
        assert!(v.summary().contains("kvm_pvm"));
    }

    #[test]
    fn no_kvm_means_software_or_nothing() {
        assert_eq!(
            decide(&FakeHost::no_virt(), true),
            Verdict::SoftwareEmulationOnly
        );
        let v = decide(&FakeHost::no_virt(), false);
        assert_eq!(v, Verdict::ContainersOnly);
        assert!(!v.vm_backend_available());
        assert!(v.backends().is_empty());
    }

    #[test]
    fn unopenable_kvm_is_not_used_even_with_vmx() {
        let host = FakeHost::intel_vmx_ept().with_kvm_open_error(13);
        assert_eq!(decide(&host, true), Verdict::SoftwareEmulationOnly);
    }

    #[test]
    fn kvm_missing_a_required_cap_is_not_used() {
        let host = FakeHost::amd_svm_npt().with_cap("USER_MEMORY", 0);
        assert_eq!(decide(&host, true), Verdict::SoftwareEmulationOnly);
    }

    #[test]
    fn wrong_api_version_is_not_used() {
        let host = FakeHost::amd_svm_npt().with_api_version(11);
        assert_eq!(decide(&host, true), Verdict::SoftwareEmulationOnly);
    }
}
