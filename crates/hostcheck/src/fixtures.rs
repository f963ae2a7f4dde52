//! Canned host files. `pvm-amd-epyc` was captured from a real kvm_pvm host (a Firecracker guest on
//! AMD EPYC); the others describe typical hosts and were written by hand.

pub const PVM_CPUINFO: &str = include_str!("../fixtures/pvm-amd-epyc/cpuinfo");
pub const PVM_CPU_ONLINE: &str = include_str!("../fixtures/pvm-amd-epyc/cpu-online");
pub const PVM_FILESYSTEMS: &str = include_str!("../fixtures/pvm-amd-epyc/filesystems");
pub const PVM_PROC_CGROUPS: &str = include_str!("../fixtures/pvm-amd-epyc/cgroups");
pub const PVM_MOUNTINFO: &str = include_str!("../fixtures/pvm-amd-epyc/mountinfo");
pub const PVM_UNIFIED_CONTROLLERS: &str =
    include_str!("../fixtures/pvm-amd-epyc/unified-cgroup.controllers");
pub const PVM_MEMINFO: &str = include_str!("../fixtures/pvm-amd-epyc/meminfo");
pub const PVM_NS: &str = include_str!("../fixtures/pvm-amd-epyc/ns");
pub const PVM_SYS_MODULE: &str = include_str!("../fixtures/pvm-amd-epyc/sys-module");
pub const PVM_KVM_CAPS: &str = include_str!("../fixtures/pvm-amd-epyc/kvm-caps");

pub const INTEL_VMX_EPT_CPUINFO: &str = include_str!("../fixtures/intel-vmx-ept/cpuinfo");
pub const INTEL_MOUNTINFO: &str = include_str!("../fixtures/intel-vmx-ept/mountinfo");
pub const INTEL_PROC_CGROUPS: &str = include_str!("../fixtures/intel-vmx-ept/cgroups");
pub const INTEL_V2_CONTROLLERS: &str = include_str!("../fixtures/intel-vmx-ept/cgroup.controllers");

pub const AMD_SVM_NPT_CPUINFO: &str = include_str!("../fixtures/amd-svm-npt/cpuinfo");
pub const AMD_MOUNTINFO: &str = include_str!("../fixtures/amd-svm-npt/mountinfo");
pub const AMD_V2_CONTROLLERS: &str = include_str!("../fixtures/amd-svm-npt/cgroup.controllers");

pub const NO_VIRT_CPUINFO: &str = include_str!("../fixtures/no-virt/cpuinfo");
pub const NO_VIRT_FILESYSTEMS: &str = include_str!("../fixtures/no-virt/filesystems");
pub const NO_VIRT_MOUNTINFO: &str = include_str!("../fixtures/no-virt/mountinfo");
