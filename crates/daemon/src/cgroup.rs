//! One cgroup per VM: CPU quota and weight, CPU set (pinning) and a memory limit, on cgroup v1
//! (one hierarchy per controller, as on this host) or v2 (one unified hierarchy).
//!
//! A deliberately small module of the daemon's own: it needs four knobs and a tasks file, and the
//! fuller OCI-shaped cgroup manager lives with the container runtime. Every write goes through a
//! root directory so unit tests can point it at a temporary tree.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cpu weight {0} is out of range: use 1..=10000")]
    Weight(u32),
    #[error("cpu quota {0}% is out of range: use 1..=100000 (percent of one CPU)")]
    Quota(u32),
}

/// The CFS period the quota is expressed against (100 ms, the kernel's default).
const PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// Controller name -> mount point (e.g. "cpu" -> /sys/fs/cgroup/cpu).
    V1(Vec<(&'static str, PathBuf)>),
    V2(PathBuf),
}

/// Where VM cgroups live: `<controller root>/<parent>/<vm name>`.
#[derive(Debug, Clone)]
pub struct Cgroups {
    hier: Hierarchy,
    parent: String,
}

const V1_CONTROLLERS: [&str; 4] = ["cpu", "cpuacct", "cpuset", "memory"];

impl Cgroups {
    pub fn new(hier: Hierarchy, parent: &str) -> Cgroups {
        Cgroups {
            hier,
            parent: parent.to_string(),
        }
    }

    /// Finds the host's cgroup layout: v2 when its controllers are usable, else v1 hierarchies.
    pub fn detect(parent: &str) -> Option<Cgroups> {
        let base = Path::new("/sys/fs/cgroup");
        let v2ctl = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
        if v2ctl.split_whitespace().any(|c| c == "cpu")
            && v2ctl.split_whitespace().any(|c| c == "memory")
        {
            return Some(Cgroups::new(Hierarchy::V2(base.to_path_buf()), parent));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let found = v1_mounts(&mounts);
        if found.is_empty() {
            None
        } else {
            Some(Cgroups::new(Hierarchy::V1(found), parent))
        }
    }

    pub fn version(&self) -> u8 {
        match self.hier {
            Hierarchy::V1(_) => 1,
            Hierarchy::V2(_) => 2,
        }
    }

    /// The VM's cgroup (not created yet).
    pub fn vm(&self, name: &str) -> VmCgroup {
        let dirs = match &self.hier {
            Hierarchy::V1(ms) => ms
                .iter()
                .map(|(c, root)| (*c, root.join(&self.parent).join(name)))
                .collect(),
            Hierarchy::V2(root) => vec![("", root.join(&self.parent).join(name))],
        };
        VmCgroup {
            v2: matches!(self.hier, Hierarchy::V2(_)),
            dirs,
        }
    }

    /// Removes the parent cgroup directories if no VM cgroup is left in them.
    pub fn remove_parent(&self) {
        let dirs: Vec<PathBuf> = match &self.hier {
            Hierarchy::V1(ms) => ms.iter().map(|(_, r)| r.join(&self.parent)).collect(),
            Hierarchy::V2(root) => vec![root.join(&self.parent)],
        };
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Creates the parent cgroup (enabling controllers for children on v2, copying cpuset.cpus/mems
    /// from the root on v1, where an empty cpuset refuses tasks).
    pub fn prepare(&self) -> Result<(), CgroupError> {
        match &self.hier {
            Hierarchy::V1(ms) => {
                for (c, root) in ms {
                    let dir = root.join(&self.parent);
                    mkdir(&dir)?;
                    if *c == "cpuset" {
                        inherit_cpuset(root, &dir)?;
                    }
                }
            }
            Hierarchy::V2(root) => {
                // Best effort: on a host that refuses (as the hybrid one does) the VM still runs,
                // without limits.
                let _ = write(&root.join("cgroup.subtree_control"), "+cpu +memory +cpuset");
                let dir = root.join(&self.parent);
                mkdir(&dir)?;
                let _ = write(&dir.join("cgroup.subtree_control"), "+cpu +memory +cpuset");
            }
        }
        Ok(())
    }
}

fn v1_mounts(mountinfo: &str) -> Vec<(&'static str, PathBuf)> {
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        // "... mountpoint opts - cgroup cgroup rw,cpu,cpuacct"
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut post_f = post.split_whitespace();
        if post_f.next() != Some("cgroup") {
            continue;
        }
        let super_opts = post_f.nth(1).unwrap_or("");
        let Some(mount_point) = pre.split_whitespace().nth(4) else {
            continue;
        };
        for c in V1_CONTROLLERS {
            if super_opts.split(',').any(|o| o == c) && !found.iter().any(|(f, _)| *f == c) {
                found.push((c, PathBuf::from(mount_point)));
            }
        }
    }
    found
}

#[derive(Debug, Clone)]
pub struct VmCgroup {
    v2: bool,
    dirs: Vec<(&'static str, PathBuf)>,
}

/// The limits a VM cgroup enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub cpu_quota_pct: Option<u32>,
    pub cpu_weight: Option<u32>,
    pub cpus: Vec<u32>,
    pub memory_bytes: Option<u64>,
}

impl VmCgroup {
    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| self.v2 || *c == controller)
            .map(|(_, d)| d.as_path())
    }

    /// The directories this cgroup spans (one per v1 controller, one on v2).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.clone()).collect()
    }

    pub fn create(&self, limits: &Limits) -> Result<(), CgroupError> {
        for (c, d) in &self.dirs {
            mkdir(d)?;
            if !self.v2 && *c == "cpuset" {
                if let Some(parent) = d.parent() {
                    inherit_cpuset(parent, d)?;
                }
            }
        }
        self.set_cpu(limits.cpu_quota_pct, limits.cpu_weight)?;
        if !limits.cpus.is_empty() {
            if let Some(d) = self.dir("cpuset") {
                let list = limits
                    .cpus
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                write(&d.join("cpuset.cpus"), &list)?;
            }
        }
        if let (Some(bytes), Some(d)) = (limits.memory_bytes, self.dir("memory")) {
            let file = if self.v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            write(&d.join(file), &bytes.to_string())?;
        }
        Ok(())
    }

    /// Sets (or, with None, lifts) the CPU quota and weight; valid while the VM runs.
    pub fn set_cpu(&self, quota_pct: Option<u32>, weight: Option<u32>) -> Result<(), CgroupError> {
        check_cpu(quota_pct, weight)?;
        let Some(d) = self.dir("cpu") else {
            return Ok(());
        };
        let quota_us = quota_pct.map(|q| u64::from(q) * PERIOD_US / 100);
        if self.v2 {
            let v = match quota_us {
                Some(us) => format!("{us} {PERIOD_US}"),
                None => format!("max {PERIOD_US}"),
            };
            write(&d.join("cpu.max"), &v)?;
            write(&d.join("cpu.weight"), &weight.unwrap_or(100).to_string())?;
        } else {
            write(&d.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            let v = quota_us.map_or("-1".to_string(), |us| us.to_string());
            write(&d.join("cpu.cfs_quota_us"), &v)?;
            write(&d.join("cpu.shares"), &weight_to_shares(weight).to_string())?;
        }
        Ok(())
    }

    /// Moves a process (all its threads, on v1 via cgroup.procs) into every controller's cgroup.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for (_, d) in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes the (empty) cgroup directories; a missing one is not an error.
    pub fn remove(&self) {
        for (_, d) in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Range checks for a CPU quota (percent of one CPU) and weight.
pub fn check_cpu(quota_pct: Option<u32>, weight: Option<u32>) -> Result<(), CgroupError> {
    if let Some(q) = quota_pct {
        if !(1..=100_000).contains(&q) {
            return Err(CgroupError::Quota(q));
        }
    }
    if let Some(w) = weight {
        if !(1..=10_000).contains(&w) {
            return Err(CgroupError::Weight(w));
        }
    }
    Ok(())
}

/// v2 weight (1..=10000, default 100) to v1 shares (2..=262144, default 1024).
pub fn weight_to_shares(weight: Option<u32>) -> u64 {
    let w = u64::from(weight.unwrap_or(100));
    (w * 1024 / 100).clamp(2, 262_144)
}

fn inherit_cpuset(from: &Path, to: &Path) -> Result<(), CgroupError> {
    for f in ["cpuset.cpus", "cpuset.mems"] {
        let cur = std::fs::read_to_string(to.join(f)).unwrap_or_default();
        if cur.trim().is_empty() {
            let v = std::fs::read_to_string(from.join(f)).unwrap_or_default();
            write(&to.join(f), v.trim())?;
        }
    }
    Ok(())
}

fn mkdir(d: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir_all(d) {
        Ok(()) => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: d.to_path_buf(),
            source,
        }),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn parses_v1_mounts() {
        let mi = "30 25 0:26 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu\n\
                  31 25 0:27 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n\
                  32 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                  33 25 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let m = v1_mounts(mi);
        assert_eq!(
            m,
            vec![
                ("cpu", PathBuf::from("/sys/fs/cgroup/cpu")),
                ("cpuacct", PathBuf::from("/sys/fs/cgroup/cpuacct")),
                ("memory", PathBuf::from("/sys/fs/cgroup/memory")),
            ]
        );
        let co = v1_mounts("1 2 0:1 / /cg/cpu,cpuacct rw - cgroup cgroup rw,cpuacct,cpu\n");
        assert_eq!(co.len(), 2);
    }

    #[test]
    fn v1_limits_land_in_the_right_files() {
        let t = tempfile::tempdir().unwrap();
        let ms: Vec<_> = V1_CONTROLLERS
            .iter()
            .map(|c| (*c, t.path().join(c)))
            .collect();
        std::fs::create_dir_all(t.path().join("cpuset")).unwrap();
        std::fs::write(t.path().join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(t.path().join("cpuset/cpuset.mems"), "0\n").unwrap();
        let cg = Cgroups::new(Hierarchy::V1(ms), "c4");
        cg.prepare().unwrap();
        let vm = cg.vm("a");
        vm.create(&Limits {
            cpu_quota_pct: Some(50),
            cpu_weight: Some(200),
            cpus: vec![1],
            memory_bytes: Some(1 << 27),
        })
        .unwrap();
        let cpu = t.path().join("cpu/c4/a");
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(&cpu.join("cpu.shares")), "2048");
        assert_eq!(read(&t.path().join("cpuset/c4/cpuset.cpus")), "0-1");
        assert_eq!(read(&t.path().join("cpuset/c4/a/cpuset.cpus")), "1");
        assert_eq!(read(&t.path().join("cpuset/c4/a/cpuset.mems")), "0");
        assert_eq!(
            read(&t.path().join("memory/c4/a/memory.limit_in_bytes")),
            "134217728"
        );
        vm.set_cpu(None, None).unwrap();
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "-1");
        assert_eq!(read(&cpu.join("cpu.shares")), "1024");
        assert!(matches!(
            vm.set_cpu(Some(0), None),
            Err(CgroupError::Quota(0))
        ));
        assert!(matches!(
            vm.set_cpu(None, Some(10_001)),
            Err(CgroupError::Weight(_))
        ));
    }

    #[test]
    fn v2_limits() {
        let t = tempfile::tempdir().unwrap();
        let cg = Cgroups::new(Hierarchy::V2(t.path().to_path_buf()), "c4");
        cg.prepare().unwrap();
        let vm = cg.vm("b");
        vm.create(&Limits {
            cpu_quota_pct: Some(150),
            cpu_weight: None,
            cpus: vec![],
            memory_bytes: Some(4096),
        })
        .unwrap();
        let d = t.path().join("c4/b");
        assert_eq!(read(&d.join("cpu.max")), "150000 100000");
        assert_eq!(read(&d.join("cpu.weight")), "100");
        assert_eq!(read(&d.join("memory.max")), "4096");
        assert_eq!(vm.paths(), vec![d]);
    }
}
