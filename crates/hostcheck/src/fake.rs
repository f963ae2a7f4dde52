//! A host made of canned files, for tests here and in crates that decide on the verdict
//! (feature `test-utils`).

use std::collections::HashMap;
use std::io;

use crate::fixtures as fx;
use crate::kvm::{KvmError, CAPABILITIES, KVM_DEVICE};
use crate::probe::{HostProbe, KvmHandle};

#[derive(Debug, Clone)]
enum FakeKvm {
    Opens { api: i32, caps: HashMap<u32, i32> },
    OpenFails(i32),
}

/// A canned host. Paths not given do not exist.
#[derive(Debug, Clone)]
pub struct FakeHost {
    files: HashMap<String, String>,
    dirs: HashMap<String, Vec<String>>,
    /// Device nodes and the errno opening them fails with (None: opens).
    devices: HashMap<String, Option<i32>>,
    kvm: FakeKvm,
}

struct FakeKvmHandle {
    api: i32,
    caps: HashMap<u32, i32>,
}

impl KvmHandle for FakeKvmHandle {
    fn api_version(&self) -> i32 {
        self.api
    }

    fn check_extension(&self, cap: u32) -> i32 {
        self.caps.get(&cap).copied().unwrap_or(0)
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

const ENOENT: i32 = 2;

impl HostProbe for FakeHost {
    fn read_file(&self, path: &str) -> io::Result<String> {
        self.files.get(path).cloned().ok_or_else(|| errno(ENOENT))
    }

    fn path_exists(&self, path: &str) -> bool {
        self.files.contains_key(path)
            || self.dirs.contains_key(path)
            || self.devices.contains_key(path)
    }

    fn list_dir(&self, path: &str) -> io::Result<Vec<String>> {
        self.dirs.get(path).cloned().ok_or_else(|| errno(ENOENT))
    }

    fn open_rw(&self, path: &str) -> io::Result<()> {
        match self.devices.get(path) {
            None => Err(errno(ENOENT)),
            Some(None) => Ok(()),
            Some(Some(e)) => Err(errno(*e)),
        }
    }

    fn open_kvm(&self, path: &str) -> Result<Box<dyn KvmHandle>, KvmError> {
        let fail = |e: i32| KvmError::Open {
            path: path.to_string(),
            source: errno(e),
        };
        match (self.devices.get(path), &self.kvm) {
            (None, _) => Err(fail(ENOENT)),
            (Some(Some(e)), _) | (Some(None), FakeKvm::OpenFails(e)) => Err(fail(*e)),
            (Some(None), FakeKvm::Opens { api, caps }) => Ok(Box::new(FakeKvmHandle {
                api: *api,
                caps: caps.clone(),
            })),
        }
    }
}

fn cap_raw(name: &str) -> Option<u32> {
    CAPABILITIES.iter().find(|c| c.name == name).map(|c| c.raw)
}

/// Parses a kvm-caps fixture: "api N" then "NAME VALUE" lines.
fn parse_caps(text: &str) -> FakeKvm {
    let mut api = 0;
    let mut caps = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut f = line.split_whitespace();
        let (Some(name), Some(Ok(value))) = (f.next(), f.next().map(str::parse::<i32>)) else {
            continue;
        };
        if name == "api" {
            api = value;
        } else if let Some(raw) = cap_raw(name) {
            caps.insert(raw, value);
        }
    }
    FakeKvm::Opens { api, caps }
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

impl FakeHost {
    /// What every canned host shares: procfs/sysfs basics, tun, huge page sizes.
    fn base() -> FakeHost {
        let mut h = FakeHost {
            files: HashMap::new(),
            dirs: HashMap::new(),
            devices: HashMap::new(),
            kvm: FakeKvm::OpenFails(ENOENT),
        };
        h = h
            .with_file("/proc/sys/kernel/osrelease", "6.1.0-test\n")
            .with_file("/sys/devices/system/cpu/online", "0-3\n")
            .with_file("/proc/filesystems", fx::PVM_FILESYSTEMS)
            .with_file("/proc/meminfo", fx::PVM_MEMINFO)
            .with_file("/proc/sys/user/max_user_namespaces", "63000\n")
            .with_file(
                "/sys/kernel/mm/transparent_hugepage/enabled",
                "always [madvise] never\n",
            )
            .with_dir(
                "/proc/self/ns",
                &lines(fx::PVM_NS)
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            )
            .with_dir(
                "/sys/kernel/mm/hugepages",
                &["hugepages-2048kB", "hugepages-1048576kB"],
            )
            .with_file(
                "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
                "0\n",
            )
            .with_file(
                "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages",
                "0\n",
            )
            .with_device("/dev/net/tun", None);
        h
    }

    fn with_kvm_modules(self, modules: &[&str]) -> FakeHost {
        let mut all = vec!["ext4", "fuse", "overlay", "tun"];
        all.extend_from_slice(modules);
        self.with_dir("/sys/module", &all)
    }

    fn with_working_kvm(mut self) -> FakeHost {
        self.kvm = parse_caps(fx::PVM_KVM_CAPS);
        self.with_device(KVM_DEVICE, None)
    }

    /// This project's development machine: AMD EPYC Firecracker guest, kvm_pvm, no vmx/svm,
    /// hybrid cgroups, all eight namespaces (captured files).
    pub fn pvm_amd_epyc() -> FakeHost {
        let modules = lines(fx::PVM_SYS_MODULE);
        FakeHost::base()
            .with_working_kvm()
            .with_file("/proc/sys/kernel/osrelease", "6.18.44-fc-v669\n")
            .with_file("/proc/cpuinfo", fx::PVM_CPUINFO)
            .with_file("/sys/devices/system/cpu/online", fx::PVM_CPU_ONLINE)
            .with_file("/proc/sys/user/max_user_namespaces", "96365\n")
            .with_file("/proc/cgroups", fx::PVM_PROC_CGROUPS)
            .with_file("/proc/self/mountinfo", fx::PVM_MOUNTINFO)
            .with_file(
                "/sys/fs/cgroup/unified/cgroup.controllers",
                fx::PVM_UNIFIED_CONTROLLERS,
            )
            .with_dir(
                "/sys/module",
                &modules.iter().map(String::as_str).collect::<Vec<_>>(),
            )
    }

    /// Bare-metal Intel Xeon with VT-x and EPT, kvm_intel loaded, pure cgroup v2.
    pub fn intel_vmx_ept() -> FakeHost {
        FakeHost::base()
            .with_working_kvm()
            .with_kvm_modules(&["kvm", "kvm_intel"])
            .with_file("/sys/module/kvm_intel/parameters/ept", "Y\n")
            .with_file("/proc/cpuinfo", fx::INTEL_VMX_EPT_CPUINFO)
            .with_file("/proc/self/mountinfo", fx::INTEL_MOUNTINFO)
            .with_file("/proc/cgroups", fx::INTEL_PROC_CGROUPS)
            .with_file(
                "/sys/fs/cgroup/cgroup.controllers",
                fx::INTEL_V2_CONTROLLERS,
            )
    }

    /// Bare-metal AMD EPYC with AMD-V and NPT, kvm_amd loaded, systemd hybrid cgroups.
    pub fn amd_svm_npt() -> FakeHost {
        FakeHost::base()
            .with_working_kvm()
            .with_kvm_modules(&["kvm", "kvm_amd"])
            .with_file("/sys/module/kvm_amd/parameters/npt", "1\n")
            .with_file("/proc/cpuinfo", fx::AMD_SVM_NPT_CPUINFO)
            .with_file("/proc/self/mountinfo", fx::AMD_MOUNTINFO)
            .with_file(
                "/sys/fs/cgroup/unified/cgroup.controllers",
                fx::AMD_V2_CONTROLLERS,
            )
    }

    /// A cloud VM without nested virtualization: no vmx/svm, no KVM, no overlay, no tun, cgroup v1.
    pub fn no_virt() -> FakeHost {
        FakeHost::base()
            .with_kvm_modules(&[])
            .with_file("/proc/cpuinfo", fx::NO_VIRT_CPUINFO)
            .with_file("/proc/filesystems", fx::NO_VIRT_FILESYSTEMS)
            .with_file("/proc/self/mountinfo", fx::NO_VIRT_MOUNTINFO)
            .without("/dev/net/tun")
    }

    pub fn with_file(mut self, path: &str, contents: &str) -> FakeHost {
        self.files.insert(path.to_string(), contents.to_string());
        self
    }

    pub fn with_dir(mut self, path: &str, entries: &[&str]) -> FakeHost {
        self.dirs.insert(
            path.to_string(),
            entries.iter().map(|s| s.to_string()).collect(),
        );
        self
    }

    /// A device node; `open_errno` is what opening it fails with, None when it opens.
    pub fn with_device(mut self, path: &str, open_errno: Option<i32>) -> FakeHost {
        self.devices.insert(path.to_string(), open_errno);
        self
    }

    pub fn without(mut self, path: &str) -> FakeHost {
        self.files.remove(path);
        self.dirs.remove(path);
        self.devices.remove(path);
        self
    }

    /// /dev/kvm exists but opening it fails with `errno`.
    pub fn with_kvm_open_error(mut self, errno: i32) -> FakeHost {
        self.kvm = FakeKvm::OpenFails(errno);
        self.with_device(KVM_DEVICE, None)
    }

    /// Sets one capability's `KVM_CHECK_EXTENSION` answer (name as in [`CAPABILITIES`]).
    pub fn with_cap(mut self, name: &str, value: i32) -> FakeHost {
        if let (FakeKvm::Opens { caps, .. }, Some(raw)) = (&mut self.kvm, cap_raw(name)) {
            caps.insert(raw, value);
        }
        self
    }

    pub fn with_api_version(mut self, version: i32) -> FakeHost {
        if let FakeKvm::Opens { api, .. } = &mut self.kvm {
            *api = version;
        }
        self
    }
}
