//! cgroup v1: one directory per hierarchy (cpu, memory, pids, …), each controller writing its own
//! files in its own hierarchy.

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use super::{io_err, read_pids, rmdir_retry, write, CgroupError};

/// The controllers the runtime manages (named as the hierarchies' mount options).
const CONTROLLERS: &[&str] = &[
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
];

/// (mount options naming the controllers, mount point) for every v1 hierarchy of this process.
pub fn hierarchies() -> Vec<(String, PathBuf)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut post_f = post.split(' ');
        if post_f.next() != Some("cgroup") {
            continue;
        }
        let super_opts = post_f.nth(1).unwrap_or("");
        let Some(mnt) = pre.split(' ').nth(4) else {
            continue;
        };
        let names: Vec<&str> = super_opts
            .split(',')
            .filter(|o| CONTROLLERS.contains(o) || o.starts_with("name="))
            .collect();
        if !names.is_empty() {
            out.push((names.join(","), PathBuf::from(mnt)));
        }
    }
    out
}

/// A controller writes its part of `resources` into its hierarchy's directory.
trait Controller {
    const NAME: &'static str;
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError>;
}

struct Memory;
impl Controller for Memory {
    const NAME: &'static str = "memory";
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
        let Some(m) = r.memory() else { return Ok(()) };
        if let Some(l) = m.limit() {
            write(dir, "memory.limit_in_bytes", &l.to_string())?;
        }
        if let Some(s) = m.swap() {
            // memsw exists only with swap accounting; without swap there is nothing to limit.
            if dir.join("memory.memsw.limit_in_bytes").exists() {
                write(dir, "memory.memsw.limit_in_bytes", &s.to_string())?;
            }
        }
        if let Some(v) = m.reservation() {
            write(dir, "memory.soft_limit_in_bytes", &v.to_string())?;
        }
        if let Some(v) = m.swappiness() {
            if v > 100 {
                return Err(CgroupError::Invalid(format!(
                    "memory.swappiness {v} is above 100"
                )));
            }
            let _ = write(dir, "memory.swappiness", &v.to_string());
        }
        if m.disable_oom_killer() == Some(true) {
            write(dir, "memory.oom_control", "1")?;
        }
        Ok(())
    }
}

struct Cpu;
impl Controller for Cpu {
    const NAME: &'static str = "cpu";
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
        let Some(c) = r.cpu() else { return Ok(()) };
        if let Some(s) = c.shares().filter(|s| *s > 0) {
            write(dir, "cpu.shares", &s.to_string())?;
        }
        if let Some(p) = c.period().filter(|p| *p > 0) {
            write(dir, "cpu.cfs_period_us", &p.to_string())?;
        }
        if let Some(q) = c.quota().filter(|q| *q != 0) {
            write(dir, "cpu.cfs_quota_us", &q.to_string())?;
        }
        if let Some(p) = c.realtime_period().filter(|p| *p > 0) {
            write(dir, "cpu.rt_period_us", &p.to_string())?;
        }
        if let Some(q) = c.realtime_runtime().filter(|q| *q != 0) {
            write(dir, "cpu.rt_runtime_us", &q.to_string())?;
        }
        Ok(())
    }
}

struct CpuSet;
impl Controller for CpuSet {
    const NAME: &'static str = "cpuset";
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
        let Some(c) = r.cpu() else { return Ok(()) };
        if let Some(cpus) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
            write(dir, "cpuset.cpus", cpus)?;
        }
        if let Some(mems) = c.mems().as_deref().filter(|s| !s.is_empty()) {
            write(dir, "cpuset.mems", mems)?;
        }
        Ok(())
    }
}

struct Pids;
impl Controller for Pids {
    const NAME: &'static str = "pids";
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
        let Some(p) = r.pids() else { return Ok(()) };
        let v = if p.limit() > 0 {
            p.limit().to_string()
        } else {
            "max".into()
        };
        write(dir, "pids.max", &v)
    }
}

struct Blkio;
impl Controller for Blkio {
    const NAME: &'static str = "blkio";
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
        let Some(b) = r.block_io() else { return Ok(()) };
        // The CFQ/BFQ weight files exist only with a proportional scheduler.
        if let Some(w) = b.weight() {
            if dir.join("blkio.weight").exists() {
                write(dir, "blkio.weight", &w.to_string())?;
            }
        }
        if let Some(w) = b.leaf_weight() {
            if dir.join("blkio.leaf_weight").exists() {
                write(dir, "blkio.leaf_weight", &w.to_string())?;
            }
        }
        for d in b.weight_device().iter().flatten() {
            if let (Some(w), true) = (d.weight(), dir.join("blkio.weight_device").exists()) {
                write(
                    dir,
                    "blkio.weight_device",
                    &format!("{}:{} {w}", d.major(), d.minor()),
                )?;
            }
        }
        let throttles = [
            (
                "blkio.throttle.read_bps_device",
                b.throttle_read_bps_device(),
            ),
            (
                "blkio.throttle.write_bps_device",
                b.throttle_write_bps_device(),
            ),
            (
                "blkio.throttle.read_iops_device",
                b.throttle_read_iops_device(),
            ),
            (
                "blkio.throttle.write_iops_device",
                b.throttle_write_iops_device(),
            ),
        ];
        for (file, list) in throttles {
            for d in list.iter().flatten() {
                write(
                    dir,
                    file,
                    &format!("{}:{} {}", d.major(), d.minor(), d.rate()),
                )?;
            }
        }
        Ok(())
    }
}

struct Devices;
impl Controller for Devices {
    const NAME: &'static str = "devices";
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
        let Some(rules) = r.devices() else {
            return Ok(());
        };
        for rule in rules
            .iter()
            .chain(crate::devices::default_allow_rules().iter())
        {
            let file = if rule.allow() {
                "devices.allow"
            } else {
                "devices.deny"
            };
            let mut text = rule.to_string();
            if rule.typ().is_none() || rule.typ() == Some(oci_spec::runtime::LinuxDeviceType::A) {
                // "a" alone means every device; with numbers the kernel rejects it.
                text = "a".into();
            } else if rule.access().as_deref().unwrap_or("").is_empty() {
                text.push_str("rwm");
            }
            write(dir, file, &text)?;
        }
        Ok(())
    }
}

pub struct Manager {
    /// (controllers of the hierarchy, this container's directory in it)
    dirs: Vec<(String, PathBuf)>,
}

impl Manager {
    /// `fake_root`: `root` holds one directory per controller (tests), instead of the live mounts.
    pub fn new(root: &Path, rel: &Path, fake_root: bool) -> Result<Self, CgroupError> {
        let hier: Vec<(String, PathBuf)> = if fake_root {
            CONTROLLERS
                .iter()
                .map(|c| (c.to_string(), root.join(c)))
                .filter(|(_, p)| p.is_dir())
                .collect()
        } else {
            hierarchies()
                .into_iter()
                .filter(|(n, _)| !n.starts_with("name="))
                .collect()
        };
        if hier.is_empty() {
            return Err(CgroupError::Invalid(format!(
                "no cgroup v1 hierarchies under {}",
                root.display()
            )));
        }
        Ok(Manager {
            dirs: hier.into_iter().map(|(n, p)| (n, p.join(rel))).collect(),
        })
    }

    fn dir_of(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(n, _)| n.split(',').any(|c| c == controller))
            .map(|(_, p)| p.as_path())
    }

    fn apply_all(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        fn run<C: Controller>(m: &Manager, r: &LinuxResources) -> Result<(), CgroupError> {
            match m.dir_of(C::NAME) {
                Some(d) => C::apply(d, r),
                None => Ok(()),
            }
        }
        run::<CpuSet>(self, r)?;
        run::<Cpu>(self, r)?;
        run::<Memory>(self, r)?;
        run::<Pids>(self, r)?;
        run::<Blkio>(self, r)?;
        run::<Devices>(self, r)
    }

    /// A new v1 cpuset starts with no CPUs or memory nodes; fill each level from its parent.
    fn init_cpuset(dir: &Path) -> Result<(), CgroupError> {
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let cur = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            if !cur.trim().is_empty() {
                continue;
            }
            let Some(parent) = dir.parent() else { continue };
            if std::fs::read_to_string(parent.join(file))
                .unwrap_or_default()
                .trim()
                .is_empty()
            {
                Self::init_cpuset(parent)?;
            }
            let val = std::fs::read_to_string(parent.join(file)).map_err(io_err(parent))?;
            write(dir, file, val.trim())?;
        }
        Ok(())
    }

    pub fn create(&self, r: Option<&LinuxResources>) -> Result<(), CgroupError> {
        for (name, dir) in &self.dirs {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            if name.split(',').any(|c| c == "cpuset") && dir.join("cpuset.cpus").exists() {
                Self::init_cpuset(dir)?;
            }
        }
        match r {
            Some(r) => self.apply_all(r),
            None => Ok(()),
        }
    }

    pub fn add_task(&self, pid: i32) -> Result<(), CgroupError> {
        let s = pid.to_string();
        for (_, dir) in &self.dirs {
            write(dir, "cgroup.procs", &s)?;
        }
        Ok(())
    }

    pub fn self_join_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.join("tasks")).collect()
    }

    pub fn update(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        self.apply_all(r)
    }

    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        let dir = self
            .dir_of("freezer")
            .ok_or_else(|| CgroupError::Invalid("no freezer hierarchy".into()))?;
        let want = if frozen { "FROZEN" } else { "THAWED" };
        for _ in 0..1000 {
            write(dir, "freezer.state", want)?;
            let now = std::fs::read_to_string(dir.join("freezer.state")).map_err(io_err(dir))?;
            if now.trim() == want {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(CgroupError::Invalid(format!(
            "{} did not reach {want}",
            dir.display()
        )))
    }

    pub fn is_frozen(&self) -> bool {
        self.dir_of("freezer")
            .and_then(|d| std::fs::read_to_string(d.join("freezer.state")).ok())
            .is_some_and(|s| s.trim() == "FROZEN")
    }

    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let dir = self
            .dir_of("pids")
            .or_else(|| self.dirs.first().map(|(_, d)| d.as_path()));
        match dir {
            Some(d) => read_pids(&d.join("cgroup.procs")),
            None => Ok(Vec::new()),
        }
    }

    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut first_err = None;
        for (_, dir) in &self.dirs {
            if let Err(e) = rmdir_retry(dir) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_limits_into_fake_hierarchy() {
        let root = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "pids", "devices"] {
            std::fs::create_dir(root.path().join(c)).unwrap();
        }
        let rel = Path::new("corefour/t1");
        let m = Manager::new(root.path(), rel, true).unwrap();
        // Files the kernel would create: make them so the writes land.
        for (c, files) in [
            ("memory", vec!["memory.limit_in_bytes"]),
            (
                "cpu",
                vec!["cpu.shares", "cpu.cfs_quota_us", "cpu.cfs_period_us"],
            ),
            ("pids", vec!["pids.max"]),
            ("devices", vec!["devices.allow", "devices.deny"]),
        ] {
            let d = root.path().join(c).join(rel);
            std::fs::create_dir_all(&d).unwrap();
            for f in files {
                std::fs::write(d.join(f), "").unwrap();
            }
        }
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":268435456},"cpu":{"shares":512,"quota":50000,"period":100000},
                "pids":{"limit":64},"devices":[{"allow":false,"access":"rwm"}]}"#,
        )
        .unwrap();
        m.create(Some(&r)).unwrap();
        let rd = |c: &str, f: &str| {
            std::fs::read_to_string(root.path().join(c).join(rel).join(f)).unwrap()
        };
        assert_eq!(rd("memory", "memory.limit_in_bytes"), "268435456");
        assert_eq!(rd("cpu", "cpu.cfs_quota_us"), "50000");
        assert_eq!(rd("cpu", "cpu.shares"), "512");
        assert_eq!(rd("pids", "pids.max"), "64");
        assert_eq!(rd("devices", "devices.deny"), "a");
        // The last default allow rule is what the file holds after the sequence of writes.
        assert_eq!(rd("devices", "devices.allow"), "c 136:* rwm");
    }
}
