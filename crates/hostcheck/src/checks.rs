//! Turns the probed facts into table lines: a status, what was found, and one sentence of why and
//! what to do.

use crate::cgroups::CgroupVersion;
use crate::kvm::{KvmFlavour, Need, CAPABILITIES, KVM_API_VERSION};
use crate::report::{Check, HostReport, Status};

fn line(
    id: &str,
    group: &'static str,
    label: &str,
    status: Status,
    value: impl Into<String>,
    detail: impl Into<String>,
) -> Check {
    Check {
        id: id.to_string(),
        group,
        label: label.to_string(),
        status,
        value: value.into(),
        detail: detail.into(),
    }
}

pub(crate) fn all(r: &HostReport) -> Vec<Check> {
    let mut out = vec![
        cpu_model(r),
        cpu_virt(r),
        cpu_slat(r),
        cpu_nested(r),
        kvm_device(r),
        kvm_api(r),
        kvm_flavour(r),
    ];
    out.extend(kvm_caps(r));
    out.extend([
        cgroup_version(r),
        cgroup_controllers(r),
        namespaces(r),
        user_namespaces(r),
        overlayfs(r),
        tun(r),
        hugepages(r),
    ]);
    out
}

fn cpu_model(r: &HostReport) -> Check {
    let c = &r.cpu;
    if c.vendor.is_empty() && c.model_name.is_empty() {
        return line(
            "cpu.model",
            "cpu",
            "CPU",
            Status::Warn,
            "unknown",
            "/proc/cpuinfo could not be read or parsed, so the CPU flags below are guesses; check that /proc is mounted",
        );
    }
    let mut value = format!("{} ({}", c.model_name, c.vendor);
    if let (Some(f), Some(m)) = (c.family, c.model) {
        value.push_str(&format!(", family {f} model {m}"));
    }
    if c.logical_cpus > 0 {
        value.push_str(&format!(", {} CPUs", c.logical_cpus));
    }
    value.push(')');
    let detail = if r.verdict.backends.contains(&"emu") {
        format!(
            "{} host: the software CPU runs here whatever KVM offers",
            r.arch
        )
    } else {
        format!(
            "{} host: the software CPU needs an x86_64 host, so only KVM can run VMs",
            r.arch
        )
    };
    line("cpu.model", "cpu", "CPU", Status::Pass, value, detail)
}

fn cpu_virt(r: &HostReport) -> Check {
    let c = &r.cpu;
    let (status, value, detail) = if c.vmx {
        (
            Status::Pass,
            "vmx",
            "Intel VT-x is exposed, so kvm_intel can run any guest OS at hardware speed",
        )
    } else if c.svm {
        (
            Status::Pass,
            "svm",
            "AMD-V is exposed, so kvm_amd can run any guest OS at hardware speed",
        )
    } else if c.hypervisor {
        (
            Status::Warn,
            "none",
            "this VM's hypervisor does not pass VT-x/AMD-V through: enable nested virtualization on the outer host for hardware-speed guests; until then full OSes use the software CPU",
        )
    } else {
        (
            Status::Warn,
            "none",
            "the CPU lacks VT-x/AMD-V or firmware disables it: enable it in the BIOS/UEFI setup; until then full OSes use the software CPU",
        )
    };
    line("cpu.virt", "cpu", "vmx/svm", status, value, detail)
}

fn cpu_slat(r: &HostReport) -> Check {
    let c = &r.cpu;
    let (name, has, module) = if c.vmx {
        ("ept", c.ept, "kvm_intel")
    } else if c.svm {
        ("npt", c.npt, "kvm_amd")
    } else {
        return line(
            "cpu.slat",
            "cpu",
            "EPT/NPT",
            Status::Warn,
            "none",
            "no vmx/svm, so no second-level page tables either (see vmx/svm)",
        );
    };
    let (status, value, detail) = match (has, r.kvm.slat_enabled) {
        (true, Some(false)) => (
            Status::Warn,
            format!("{name} (disabled in {module})"),
            format!("{module} was loaded with {name}=0, so guests run on shadow page tables (slow): reload it with {name}=1"),
        ),
        (true, _) => (
            Status::Pass,
            name.to_string(),
            "guests manage their own page tables without VM exits".to_string(),
        ),
        (false, _) => (
            Status::Warn,
            "none".to_string(),
            format!("without {name} KVM shadows guest page tables, which slows memory-heavy guests: use a CPU or outer hypervisor that exposes {name}"),
        ),
    };
    line("cpu.slat", "cpu", "EPT/NPT", status, value, detail)
}

fn cpu_nested(r: &HostReport) -> Check {
    if r.cpu.hypervisor {
        line(
            "cpu.hypervisor",
            "cpu",
            "hypervisor flag",
            Status::Warn,
            "set (this host is a VM)",
            "KVM here is nested and can only offer what the outer hypervisor exposes; run on bare metal for full speed",
        )
    } else {
        line(
            "cpu.hypervisor",
            "cpu",
            "hypervisor flag",
            Status::Pass,
            "clear (bare metal)",
            "KVM drives the CPU directly",
        )
    }
}

fn kvm_device(r: &HostReport) -> Check {
    let k = &r.kvm;
    let (status, value, detail) = if k.openable {
        (
            Status::Pass,
            "opens read-write".to_string(),
            "the KVM backend can create VMs".to_string(),
        )
    } else if !k.present {
        (
            Status::Fail,
            "missing".to_string(),
            "no KVM device: load kvm_intel or kvm_amd (modprobe; needs vmx/svm); VMs use the software CPU until then".to_string(),
        )
    } else if k.open_errno == Some(13) || k.open_errno == Some(1) {
        (
            Status::Fail,
            "permission denied".to_string(),
            "run as root or join the device's group (usermod -aG kvm $USER, then log in again)"
                .to_string(),
        )
    } else {
        (
            Status::Fail,
            "open failed".to_string(),
            format!(
                "{}: VMs use the software CPU until KVM opens",
                k.open_error.as_deref().unwrap_or("unknown error")
            ),
        )
    };
    line("kvm.device", "kvm", k.device, status, value, detail)
}

fn kvm_api(r: &HostReport) -> Check {
    match r.kvm.api_version {
        Some(KVM_API_VERSION) => line(
            "kvm.api_version",
            "kvm",
            "KVM API version",
            Status::Pass,
            KVM_API_VERSION.to_string(),
            "the stable KVM API the VMM is written against",
        ),
        Some(v) => line(
            "kvm.api_version",
            "kvm",
            "KVM API version",
            Status::Fail,
            v.to_string(),
            format!("the VMM speaks KVM API {KVM_API_VERSION} only, so KVM is not used: run a mainline kernel"),
        ),
        None => line(
            "kvm.api_version",
            "kvm",
            "KVM API version",
            Status::Fail,
            "unknown",
            "not asked: /dev/kvm did not open",
        ),
    }
}

fn kvm_flavour(r: &HostReport) -> Check {
    let k = &r.kvm;
    let value = if k.modules.is_empty() {
        k.flavour.as_str().to_string()
    } else {
        format!("{} (modules: {})", k.flavour.as_str(), k.modules.join(", "))
    };
    let (status, detail) = match k.flavour {
        KvmFlavour::KvmIntel | KvmFlavour::KvmAmd => {
            (Status::Pass, "hardware-assisted KVM: any guest OS runs at near-native speed")
        }
        KvmFlavour::KvmPvm => (
            Status::Warn,
            "PVM runs guests without vmx/svm: guest ring-0 code is emulated and stock kernels do not boot, so KVM serves custom/PVM-aware guests only and full OSes use the software CPU",
        ),
        KvmFlavour::Other => (
            Status::Warn,
            "a KVM without a vendor module corefour knows: it is used when /dev/kvm opens, and counts as hardware virtualization only with vmx/svm",
        ),
        KvmFlavour::None => (
            Status::Fail,
            "no KVM module is loaded: modprobe kvm_intel or kvm_amd (needs vmx/svm); VMs use the software CPU until then",
        ),
    };
    line("kvm.flavour", "kvm", "KVM flavour", status, value, detail)
}

fn kvm_caps(r: &HostReport) -> Vec<Check> {
    if !r.kvm.openable {
        return vec![line(
            "kvm.capabilities",
            "kvm_caps",
            "KVM capabilities",
            Status::Fail,
            "unknown",
            "not asked: /dev/kvm did not open",
        )];
    }
    CAPABILITIES
        .iter()
        .map(|spec| {
            let value = r.kvm.cap(spec.name).map_or(0, |c| c.value);
            let shown = match (spec.numeric, value > 0) {
                (_, false) => "no".to_string(),
                (true, true) => value.to_string(),
                (false, true) => "yes".to_string(),
            };
            let (status, detail) = match (value > 0, spec.need) {
                (true, _) => (Status::Pass, format!("used for {}", spec.used_for)),
                (false, Need::Required) => (
                    Status::Fail,
                    format!("needed for {}: the KVM backend will not start; use a kernel whose KVM has it", spec.used_for),
                ),
                (false, Need::Recommended) => (
                    Status::Warn,
                    format!("used for {}: that feature is off on KVM; a newer kernel has it", spec.used_for),
                ),
            };
            line(
                &format!("kvm.cap.{}", spec.name.to_ascii_lowercase()),
                "kvm_caps",
                spec.name,
                status,
                shown,
                detail,
            )
        })
        .collect()
}

fn cgroup_version(r: &HostReport) -> Check {
    let c = &r.cgroups;
    let v2_at = c.v2_mount.as_deref().unwrap_or("-");
    let (status, value, detail) = match c.version {
        CgroupVersion::V2 => (
            Status::Pass,
            format!("v2 at {v2_at}"),
            "unified hierarchy: containers get cgroup v2 limits".to_string(),
        ),
        CgroupVersion::V1 => (
            Status::Pass,
            format!("v1 ({} hierarchies)", c.v1_hierarchies.len()),
            "containers get cgroup v1 limits; v2 is preferred (boot with systemd.unified_cgroup_hierarchy=1)".to_string(),
        ),
        CgroupVersion::Hybrid => {
            let v2_has = if c.v2_controllers.is_empty() {
                "no controllers".to_string()
            } else {
                format!("only {}", c.v2_controllers.join(", "))
            };
            (
                Status::Warn,
                format!("hybrid (v1 + cgroup2 at {v2_at})"),
                format!("controllers live on v1 and cgroup2 has {v2_has}: corefour uses the v1 hierarchies, runtimes that want pure v2 (crun) refuse; boot with systemd.unified_cgroup_hierarchy=1 for pure v2"),
            )
        }
        CgroupVersion::None => (
            Status::Fail,
            "none mounted".to_string(),
            "containers get no resource limits: mount -t cgroup2 none /sys/fs/cgroup".to_string(),
        ),
    };
    line(
        "cgroups.version",
        "containers",
        "cgroups",
        status,
        value,
        detail,
    )
}

/// Controllers a container's limits need.
const NEEDED_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

fn cgroup_controllers(r: &HostReport) -> Check {
    let usable = r.cgroups.usable_controllers();
    let missing: Vec<&str> = NEEDED_CONTROLLERS
        .into_iter()
        .filter(|n| !usable.iter().any(|u| u == n))
        .collect();
    let value = if usable.is_empty() {
        "none".to_string()
    } else {
        usable.join(" ")
    };
    let (status, detail) = if missing.is_empty() {
        (Status::Pass, "cpu, memory and pids limits work".to_string())
    } else {
        (
            Status::Warn,
            format!(
                "no {} controller: containers run without that limit; enable it (cgroup.subtree_control on v2, or mount its v1 hierarchy)",
                missing.join("/")
            ),
        )
    };
    line(
        "cgroups.controllers",
        "containers",
        "cgroup controllers",
        status,
        value,
        detail,
    )
}

fn namespaces(r: &HostReport) -> Check {
    let n = &r.namespaces;
    let value = if n.available.is_empty() {
        "none".to_string()
    } else {
        n.available.join(" ")
    };
    let (status, detail) = if n.missing.is_empty() {
        (
            Status::Pass,
            "all eight namespace types containers isolate with".to_string(),
        )
    } else if n.available.is_empty() {
        (Status::Fail, "/proc/self/ns lists nothing: containers cannot be isolated; check that /proc is mounted".to_string())
    } else {
        (
            Status::Warn,
            format!(
                "the kernel lacks {}: containers run without that isolation; use a kernel with those namespaces",
                n.missing.join(", ")
            ),
        )
    };
    line(
        "namespaces.available",
        "containers",
        "namespaces",
        status,
        value,
        detail,
    )
}

fn user_namespaces(r: &HostReport) -> Check {
    let n = &r.namespaces;
    let max = n
        .max_user_namespaces
        .map_or(String::new(), |m| format!(" (max {m})"));
    let (status, value, detail) = if !n.user_namespaces_enabled() {
        (
            Status::Warn,
            format!("disabled{max}"),
            "uid-mapped and rootless containers fail: sysctl -w user.max_user_namespaces=15000"
                .to_string(),
        )
    } else if !n.unprivileged_user_namespaces() {
        (
            Status::Warn,
            format!("root only{max}"),
            "root can create them but other users cannot, so rootless containers fail: sysctl -w kernel.unprivileged_userns_clone=1 (or kernel.apparmor_restrict_unprivileged_userns=0)".to_string(),
        )
    } else {
        (
            Status::Pass,
            format!("enabled{max}"),
            "uid mapping and rootless containers work".to_string(),
        )
    };
    line(
        "namespaces.user",
        "containers",
        "user namespaces",
        status,
        value,
        detail,
    )
}

fn overlayfs(r: &HostReport) -> Check {
    if r.overlayfs {
        line(
            "fs.overlay",
            "containers",
            "overlayfs",
            Status::Pass,
            "yes",
            "container root filesystems are layered copy-on-write over their template",
        )
    } else {
        line(
            "fs.overlay",
            "containers",
            "overlayfs",
            Status::Warn,
            "no",
            "not in /proc/filesystems: modprobe overlay, else container roots must be full copies",
        )
    }
}

fn tun(r: &HostReport) -> Check {
    let t = &r.tun;
    let (status, value, detail) = if t.openable {
        (
            Status::Pass,
            "opens read-write",
            "VMs can get tap network devices".to_string(),
        )
    } else if !t.present {
        (
            Status::Warn,
            "missing",
            "VMs get no tap networking: modprobe tun, or mknod /dev/net/tun c 10 200".to_string(),
        )
    } else {
        (
            Status::Warn,
            "open failed",
            format!(
                "{}: VMs get no tap networking until it opens (run as root or grant access)",
                t.open_error.as_deref().unwrap_or("unknown error")
            ),
        )
    };
    line(
        "net.tun",
        "containers",
        "/dev/net/tun",
        status,
        value,
        detail,
    )
}

fn kib(size: u64) -> String {
    const MIB: u64 = 1024;
    const GIB: u64 = 1024 * 1024;
    if size >= GIB && size / GIB * GIB == size {
        format!("{}G", size / GIB)
    } else if size >= MIB && size / MIB * MIB == size {
        format!("{}M", size / MIB)
    } else {
        format!("{size}K")
    }
}

fn hugepages(r: &HostReport) -> Check {
    let h = &r.hugepages;
    let sizes: Vec<String> = h.sizes.iter().map(|s| kib(s.size_kib)).collect();
    let reserved = h.reserved_pages();
    let thp = h.transparent.as_deref().unwrap_or("unknown");
    let value = format!(
        "sizes {}; {} reserved; THP {}",
        if sizes.is_empty() {
            "none".to_string()
        } else {
            sizes.join(",")
        },
        reserved,
        thp
    );
    let default = h
        .default_size_kib
        .or(h.sizes.first().map(|s| s.size_kib))
        .unwrap_or(2048);
    let thp_on = matches!(thp, "always" | "madvise");
    let (status, detail) = if h.hugetlbfs && reserved > 0 {
        (
            Status::Pass,
            "guest RAM can be backed by the reserved hugetlb pool".to_string(),
        )
    } else if h.hugetlbfs || thp_on {
        (
            Status::Pass,
            format!(
                "guest RAM can use transparent huge pages{}; for a fixed pool: echo N > /sys/kernel/mm/hugepages/hugepages-{default}kB/nr_hugepages",
                if thp_on { "" } else { " once THP is enabled" }
            ),
        )
    } else {
        (
            Status::Warn,
            "no hugetlbfs and THP is off: guest RAM uses 4 KiB pages (more TLB misses); enable THP (echo madvise > /sys/kernel/mm/transparent_hugepage/enabled)".to_string(),
        )
    };
    line(
        "memory.hugepages",
        "memory",
        "hugepages",
        status,
        value,
        detail,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeHost;

    #[test]
    fn sizes() {
        assert_eq!(kib(2048), "2M");
        assert_eq!(kib(1048576), "1G");
        assert_eq!(kib(64), "64K");
        assert_eq!(kib(1536), "1536K");
    }

    #[test]
    fn every_check_has_a_sentence() {
        for host in [
            FakeHost::pvm_amd_epyc(),
            FakeHost::intel_vmx_ept(),
            FakeHost::amd_svm_npt(),
            FakeHost::no_virt(),
        ] {
            let r = HostReport::probe(&host, true);
            let mut ids: Vec<&str> = r.checks.iter().map(|c| c.id.as_str()).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), r.checks.len(), "check ids are unique");
            for c in &r.checks {
                assert!(!c.value.is_empty() && c.detail.len() > 10, "{c:?}");
            }
        }
    }
}
