//! The CPU as /proc/cpuinfo describes it: vendor, model, and the flags that decide how VMs can run.

use serde::Serialize;

use crate::probe::HostProbe;

/// What the host check needs from /proc/cpuinfo (the first processor; flags are the same on all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CpuInfo {
    /// `vendor_id`: "GenuineIntel", "AuthenticAMD", … (empty when cpuinfo has none).
    pub vendor: String,
    /// `model name`, whitespace collapsed.
    pub model_name: String,
    pub family: Option<u32>,
    pub model: Option<u32>,
    /// Online logical CPUs (/sys/devices/system/cpu/online); 0 when unknown.
    pub logical_cpus: u32,
    /// Intel VT-x.
    pub vmx: bool,
    /// AMD-V.
    pub svm: bool,
    /// Intel extended page tables (flags or the `vmx flags` line).
    pub ept: bool,
    /// AMD nested page tables.
    pub npt: bool,
    /// The CPU reports it runs under a hypervisor: this host is itself a VM, so KVM here is nested.
    pub hypervisor: bool,
}

impl CpuInfo {
    /// vmx or svm: the hardware extension KVM's vendor modules need.
    pub fn has_virt_extension(&self) -> bool {
        self.vmx || self.svm
    }

    /// Second-level address translation (EPT or NPT).
    pub fn has_slat(&self) -> bool {
        self.ept || self.npt
    }
}

/// Enough for one processor block of any x86 CPU (about 2 KiB today).
const CPUINFO_PREFIX: usize = 16 * 1024;

pub(crate) fn probe(host: &dyn HostProbe) -> CpuInfo {
    let mut info = host
        .read_file_prefix("/proc/cpuinfo", CPUINFO_PREFIX)
        .map(|t| parse_cpuinfo(&t))
        .unwrap_or_default();
    info.logical_cpus = host
        .read_file("/sys/devices/system/cpu/online")
        .map(|t| count_cpu_list(&t))
        .unwrap_or(0);
    info
}

/// Parses the first processor block of /proc/cpuinfo. Unknown or malformed lines are skipped.
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info = CpuInfo::default();
    let mut seen_processor = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        let value = value.trim();
        match key {
            "processor" => {
                if seen_processor {
                    break;
                }
                seen_processor = true;
            }
            "vendor_id" => info.vendor = value.to_string(),
            "model name" => {
                info.model_name = value.split_whitespace().collect::<Vec<_>>().join(" ")
            }
            "cpu family" => info.family = value.parse().ok(),
            "model" => info.model = value.parse().ok(),
            // Since Linux 5.8 Intel's VMX sub-features (ept, vpid, …) also appear on their own line.
            "flags" | "vmx flags" => {
                for flag in value.split_whitespace() {
                    match flag {
                        "vmx" => info.vmx = true,
                        "svm" => info.svm = true,
                        "ept" => info.ept = true,
                        "npt" => info.npt = true,
                        "hypervisor" => info.hypervisor = true,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// Counts a kernel CPU list such as "0-3,8,10-11". Malformed parts count as nothing.
pub fn count_cpu_list(text: &str) -> u32 {
    text.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u32::from(part.trim().parse::<u32>().is_ok()),
        })
        .fold(0u32, u32::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    #[test]
    fn intel_with_vmx_and_ept() {
        let c = parse_cpuinfo(fixtures::INTEL_VMX_EPT_CPUINFO);
        assert_eq!(c.vendor, "GenuineIntel");
        assert_eq!(c.model_name, "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz");
        assert_eq!((c.family, c.model), (Some(6), Some(106)));
        assert!(c.vmx && !c.svm && c.ept && !c.npt && !c.hypervisor);
    }

    #[test]
    fn intel_ept_only_on_the_vmx_flags_line() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vmx\nvmx flags\t: vnmi ept vpid\n";
        let c = parse_cpuinfo(text);
        assert!(c.vmx && c.ept);
    }

    #[test]
    fn amd_with_svm_and_npt() {
        let c = parse_cpuinfo(fixtures::AMD_SVM_NPT_CPUINFO);
        assert_eq!(c.vendor, "AuthenticAMD");
        assert_eq!(c.model_name, "AMD EPYC 7763 64-Core Processor");
        assert!(c.svm && c.npt && !c.vmx && !c.ept && !c.hypervisor);
    }

    #[test]
    fn no_virtualization_flags() {
        let c = parse_cpuinfo(fixtures::NO_VIRT_CPUINFO);
        assert!(!c.has_virt_extension() && !c.has_slat() && !c.hypervisor);
        assert_eq!(c.vendor, "GenuineIntel");
    }

    #[test]
    fn pvm_guest_like_this_machine() {
        let c = parse_cpuinfo(fixtures::PVM_CPUINFO);
        assert_eq!(c.vendor, "AuthenticAMD");
        assert_eq!(c.model_name, "AMD EPYC");
        assert_eq!((c.family, c.model), (Some(26), Some(2)));
        assert!(!c.vmx && !c.svm && !c.ept && !c.npt);
        assert!(c.hypervisor, "this machine is a Firecracker guest");
    }

    #[test]
    fn only_the_first_processor_counts() {
        let text =
            "processor: 0\nvendor_id: A\nflags: fpu\n\nprocessor: 1\nvendor_id: B\nflags: vmx\n";
        let c = parse_cpuinfo(text);
        assert_eq!(c.vendor, "A");
        assert!(!c.vmx);
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0-1\n"), 2);
        assert_eq!(count_cpu_list("0-3,8,10-11"), 7);
        assert_eq!(count_cpu_list("0"), 1);
        assert_eq!(count_cpu_list(""), 0);
        assert_eq!(count_cpu_list("5-2,x,1-"), 0);
    }
}
