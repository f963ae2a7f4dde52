//! The whole answer: the facts, one check per line, and the verdict. Serialized as-is for `--json`.

use serde::Serialize;

use crate::cgroups::{self, CgroupInfo};
use crate::checks;
use crate::cpu::{self, CpuInfo};
use crate::filesystems::parse_filesystems;
use crate::hugepages::{self, HugePageInfo};
use crate::kvm::{self, KvmInfo};
use crate::namespaces::{self, NamespaceInfo};
use crate::probe::HostProbe;
use crate::verdict::Verdict;

/// Bumped when a field is removed, renamed or changes meaning; adding fields does not bump it.
pub const SCHEMA_VERSION: u32 = 1;

/// pass: ready; warn: works with a limit (the line says which); fail: this feature cannot work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable identifier, e.g. "kvm.device", "kvm.cap.irqfd".
    pub id: String,
    /// "cpu", "kvm", "kvm_caps", "containers", "memory".
    pub group: &'static str,
    /// Short name for people.
    pub label: String,
    pub status: Status,
    /// What was found.
    pub value: String,
    /// One sentence: why this status, and what to do about it.
    pub detail: String,
}

/// /dev/net/tun.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TunInfo {
    pub present: bool,
    pub openable: bool,
    pub open_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerdictInfo {
    /// "hardware_virtualization", "kvm_without_vmx_svm", "software_emulation_only", "containers_only".
    pub id: Verdict,
    pub summary: &'static str,
    /// VM backends usable here, best first ("kvm", "emu").
    pub backends: &'static [&'static str],
    pub vm_backend_available: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub pass: usize,
    pub warn: usize,
    pub fail: usize,
}

/// Everything `corefour host check` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostReport {
    pub schema_version: u32,
    /// /proc/sys/kernel/osrelease.
    pub kernel: Option<String>,
    /// The architecture this binary was built for.
    pub arch: &'static str,
    pub cpu: CpuInfo,
    pub kvm: KvmInfo,
    pub cgroups: CgroupInfo,
    pub namespaces: NamespaceInfo,
    /// "overlay" is in /proc/filesystems.
    pub overlayfs: bool,
    pub tun: TunInfo,
    pub hugepages: HugePageInfo,
    pub checks: Vec<Check>,
    pub counts: Counts,
    pub verdict: VerdictInfo,
}

impl HostReport {
    /// Probes everything. `software_cpu` says whether the software CPU backend exists on this host
    /// (see [`crate::SOFTWARE_CPU_AVAILABLE`]).
    pub fn probe(host: &dyn HostProbe, software_cpu: bool) -> HostReport {
        let cpu = cpu::probe(host);
        let kvm = kvm::probe(host);
        let filesystems = host
            .read_file("/proc/filesystems")
            .map(|t| parse_filesystems(&t))
            .unwrap_or_default();
        let tun = match host.open_rw("/dev/net/tun") {
            Ok(()) => TunInfo {
                present: true,
                openable: true,
                open_error: None,
            },
            Err(e) => TunInfo {
                present: host.path_exists("/dev/net/tun"),
                openable: false,
                open_error: Some(e.to_string()),
            },
        };
        let verdict = Verdict::decide(&cpu, &kvm, software_cpu);
        let mut report = HostReport {
            schema_version: SCHEMA_VERSION,
            kernel: host
                .read_file("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            arch: std::env::consts::ARCH,
            cpu,
            kvm,
            cgroups: cgroups::probe(host),
            namespaces: namespaces::probe(host),
            overlayfs: filesystems.iter().any(|f| f == "overlay"),
            tun,
            hugepages: hugepages::probe(host, &filesystems),
            checks: Vec::new(),
            counts: Counts::default(),
            verdict: VerdictInfo {
                id: verdict,
                summary: verdict.summary(),
                backends: verdict.backends(),
                vm_backend_available: verdict.vm_backend_available(),
            },
        };
        report.checks = checks::all(&report);
        for c in &report.checks {
            match c.status {
                Status::Pass => report.counts.pass += 1,
                Status::Warn => report.counts.warn += 1,
                Status::Fail => report.counts.fail += 1,
            }
        }
        report
    }

    /// 0 when some VM backend can run, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        if self.verdict.vm_backend_available {
            0
        } else {
            1
        }
    }

    pub fn check(&self, id: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;

    const GOLDEN: &str = include_str!("../fixtures/pvm-amd-epyc/report.json");

    /// The JSON document is an interface: this pins it for the captured kvm_pvm host. A change here
    /// that removes or renames a field must bump SCHEMA_VERSION and README.md's schema section.
    /// Regenerate after a deliberate change with COREFOUR_UPDATE_GOLDEN=1.
    #[test]
    fn json_document_is_stable() {
        let report = HostReport::probe(&FakeHost::pvm_amd_epyc(), true);
        let mut json = serde_json::to_string_pretty(&report).expect("a report always serializes");
        json.push('\n');
        if std::env::var_os("COREFOUR_UPDATE_GOLDEN").is_some() {
            let path = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/fixtures/pvm-amd-epyc/report.json"
            );
            std::fs::write(path, &json).expect("writing the golden file");
            return;
        }
        if json != GOLDEN {
            let first = json.lines().zip(GOLDEN.lines()).position(|(a, b)| a != b);
            panic!(
                "the host check JSON changed (first differing line {first:?}):\n{json}\nbump SCHEMA_VERSION if a field was removed or renamed, then regenerate with COREFOUR_UPDATE_GOLDEN=1"
            );
        }
    }

    #[test]
    fn pvm_host_report() {
        let r = HostReport::probe(&FakeHost::pvm_amd_epyc(), true);
        assert_eq!(r.schema_version, SCHEMA_VERSION);
        assert_eq!(r.verdict.id, Verdict::KvmWithoutVmxSvm);
        assert_eq!(r.exit_code(), 0);
        assert_eq!(r.counts.fail, 0);
        let status = |id: &str| r.check(id).map(|c| c.status);
        assert_eq!(status("cpu.virt"), Some(Status::Warn));
        assert_eq!(status("cpu.hypervisor"), Some(Status::Warn));
        assert_eq!(status("kvm.flavour"), Some(Status::Warn));
        assert_eq!(status("kvm.device"), Some(Status::Pass));
        assert_eq!(status("kvm.cap.irqfd"), Some(Status::Pass));
        assert_eq!(status("cgroups.version"), Some(Status::Warn));
        assert_eq!(status("fs.overlay"), Some(Status::Pass));
        assert_eq!(
            r.check("kvm.cap.max_vcpus").map(|c| c.value.as_str()),
            Some("1024")
        );
        assert!(r
            .check("cgroups.version")
            .is_some_and(|c| c.detail.contains("only hugetlb")));
    }

    #[test]
    fn intel_host_report() {
        let r = HostReport::probe(&FakeHost::intel_vmx_ept(), true);
        assert_eq!(r.verdict.id, Verdict::HardwareVirtualization);
        assert_eq!(r.counts.fail, 0);
        assert_eq!(
            r.counts.warn,
            0,
            "{:#?}",
            r.checks
                .iter()
                .filter(|c| c.status != Status::Pass)
                .collect::<Vec<_>>()
        );
        assert_eq!(r.check("cpu.slat").map(|c| c.value.as_str()), Some("ept"));
        assert_eq!(
            r.check("cgroups.version").map(|c| c.value.as_str()),
            Some("v2 at /sys/fs/cgroup")
        );
    }

    #[test]
    fn amd_host_with_npt_switched_off() {
        let host = FakeHost::amd_svm_npt().with_file("/sys/module/kvm_amd/parameters/npt", "0\n");
        let r = HostReport::probe(&host, true);
        assert_eq!(r.verdict.id, Verdict::HardwareVirtualization);
        let slat = r.check("cpu.slat");
        assert_eq!(slat.map(|c| c.status), Some(Status::Warn));
        assert!(slat.is_some_and(|c| c.detail.contains("npt=1")), "{slat:?}");
    }

    #[test]
    fn host_without_kvm() {
        let r = HostReport::probe(&FakeHost::no_virt(), true);
        assert_eq!(r.verdict.id, Verdict::SoftwareEmulationOnly);
        assert_eq!(r.exit_code(), 0);
        let status = |id: &str| r.check(id).map(|c| c.status);
        assert_eq!(status("kvm.device"), Some(Status::Fail));
        assert_eq!(status("kvm.flavour"), Some(Status::Fail));
        assert_eq!(status("kvm.capabilities"), Some(Status::Fail));
        assert_eq!(
            status("kvm.cap.irqchip"),
            None,
            "capabilities are not listed when /dev/kvm is missing"
        );
        assert_eq!(status("fs.overlay"), Some(Status::Warn));
        assert_eq!(status("net.tun"), Some(Status::Warn));
        assert_eq!(status("cgroups.version"), Some(Status::Pass));

        let r = HostReport::probe(&FakeHost::no_virt(), false);
        assert_eq!(r.verdict.id, Verdict::ContainersOnly);
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn permission_denied_says_what_to_do() {
        let r = HostReport::probe(&FakeHost::intel_vmx_ept().with_kvm_open_error(13), true);
        let dev = r.check("kvm.device");
        assert_eq!(dev.map(|c| c.value.as_str()), Some("permission denied"));
        assert!(dev.is_some_and(|c| c.detail.contains("kvm")));
        assert_eq!(r.kvm.open_errno, Some(13));
    }

    /// Random bytes and mangled fixture text go through every parser without a panic.
    #[test]
    fn parsers_survive_garbage() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b" \t\n:-,\\0123456789[]abcdefkvmxsnpt=/#";
        let samples = [
            crate::fixtures::PVM_CPUINFO,
            crate::fixtures::PVM_MOUNTINFO,
            crate::fixtures::PVM_PROC_CGROUPS,
            crate::fixtures::PVM_MEMINFO,
        ];
        for round in 0..2000 {
            let len = usize::try_from(next() % 400).unwrap_or(0);
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                (0..len)
                    .map(|_| alphabet[usize::try_from(next()).unwrap_or(0) % alphabet.len()])
                    .collect()
            } else {
                let s = samples[round % samples.len()].as_bytes();
                let cut = usize::try_from(next()).unwrap_or(0) % s.len();
                s[cut..].iter().take(len).copied().collect()
            };
            if round % 3 == 0 && !bytes.is_empty() {
                let i = usize::try_from(next()).unwrap_or(0) % bytes.len();
                bytes[i] = 0xff;
            }
            let text = String::from_utf8_lossy(&bytes);
            let _ = crate::cpu::parse_cpuinfo(&text);
            let _ = crate::cpu::count_cpu_list(&text);
            let _ = crate::cgroups::parse_mountinfo(&text);
            let _ = crate::cgroups::parse_proc_cgroups(&text);
            let _ = crate::filesystems::parse_filesystems(&text);
            let _ = crate::hugepages::meminfo_value(&text, "Hugepagesize");
            let _ = crate::hugepages::selected_mode(&text);
            let host = FakeHost::pvm_amd_epyc()
                .with_file("/proc/cpuinfo", &text)
                .with_file("/proc/self/mountinfo", &text)
                .with_file("/proc/sys/user/max_user_namespaces", &text);
            let r = HostReport::probe(&host, true);
            assert!(serde_json::to_string(&r).is_ok());
        }
    }
}
