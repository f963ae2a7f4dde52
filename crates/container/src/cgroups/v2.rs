//! cgroup v2: one unified directory; controllers are enabled in each ancestor's
//! cgroup.subtree_control, and freezing is the core `cgroup.freeze` file.

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use super::{io_err, read_pids, rmdir_retry, shares_to_weight, write, CgroupError};

trait Controller {
    const NAME: &'static str;
    fn wanted(r: &LinuxResources) -> bool;
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError>;
}

struct Memory;
impl Controller for Memory {
    const NAME: &'static str = "memory";
    fn wanted(r: &LinuxResources) -> bool {
        r.memory().is_some()
    }
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
        let Some(m) = r.memory() else { return Ok(()) };
        let val = |v: i64| {
            if v < 0 {
                "max".to_string()
            } else {
                v.to_string()
            }
        };
        if let Some(l) = m.limit() {
            write(dir, "memory.max", &val(l))?;
            // v1's swap is memory+swap; v2's memory.swap.max is swap alone.
            if let Some(s) = m.swap() {
                let swap = if s < 0 || l < 0 { -1 } else { (s - l).max(0) };
                if dir.join("memory.swap.max").exists() {
                    write(dir, "memory.swap.max", &val(swap))?;
                }
            }
        }
        if let Some(v) = m.reservation() {
            write(dir, "memory.low", &val(v))?;
        }
        Ok(())
    }
}

struct Cpu;
impl Controller for Cpu {
    const NAME: &'static str = "cpu";
    fn wanted(r: &LinuxResources) -> bool {
        r.cpu()
            .as_ref()
            .is_some_and(|c| c.shares().is_some() || c.quota().is_some() || c.period().is_some())
    }
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
        let Some(c) = r.cpu() else { return Ok(()) };
        if let Some(s) = c.shares().filter(|s| *s > 0) {
            write(dir, "cpu.weight", &shares_to_weight(s).to_string())?;
        }
        if c.quota().is_some() || c.period().is_some() {
            let quota = match c.quota() {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".into(),
            };
            let period = c.period().filter(|p| *p > 0).unwrap_or(100_000);
            write(dir, "cpu.max", &format!("{quota} {period}"))?;
        }
        Ok(())
    }
}

struct CpuSet;
impl Controller for CpuSet {
    const NAME: &'static str = "cpuset";
    fn wanted(r: &LinuxResources) -> bool {
        r.cpu()
            .as_ref()
            .is_some_and(|c| c.cpus().is_some() || c.mems().is_some())
    }
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
        let Some(c) = r.cpu() else { return Ok(()) };
        if let Some(v) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
            write(dir, "cpuset.cpus", v)?;
        }
        if let Some(v) = c.mems().as_deref().filter(|s| !s.is_empty()) {
            write(dir, "cpuset.mems", v)?;
        }
        Ok(())
    }
}

struct Pids;
impl Controller for Pids {
    const NAME: &'static str = "pids";
    fn wanted(r: &LinuxResources) -> bool {
        r.pids().is_some()
    }
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
        let Some(p) = r.pids() else { return Ok(()) };
        write(
            dir,
            "pids.max",
            &if p.limit() > 0 {
                p.limit().to_string()
            } else {
                "max".into()
            },
        )
    }
}

struct Io;
impl Controller for Io {
    const NAME: &'static str = "io";
    fn wanted(r: &LinuxResources) -> bool {
        r.block_io().is_some()
    }
    fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
        let Some(b) = r.block_io() else { return Ok(()) };
        if let Some(w) = b.weight() {
            // blkio.weight 10..1000 → io.weight 1..10000.
            let w = 1 + (u64::from(w).clamp(10, 1000) - 10) * 9999 / 990;
            if dir.join("io.weight").exists() {
                write(dir, "io.weight", &format!("default {w}"))?;
            }
        }
        let throttles = [
            ("rbps", b.throttle_read_bps_device()),
            ("wbps", b.throttle_write_bps_device()),
            ("riops", b.throttle_read_iops_device()),
            ("wiops", b.throttle_write_iops_device()),
        ];
        for (key, list) in throttles {
            for d in list.iter().flatten() {
                write(
                    dir,
                    "io.max",
                    &format!("{}:{} {key}={}", d.major(), d.minor(), d.rate()),
                )?;
            }
        }
        Ok(())
    }
}

pub struct Manager {
    root: PathBuf,
    dir: PathBuf,
}

impl Manager {
    pub fn new(root: &Path, rel: &Path) -> Self {
        Manager {
            root: root.to_path_buf(),
            dir: root.join(rel),
        }
    }

    /// Enables the controllers `r` needs in every ancestor's subtree_control.
    fn enable(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        let mut names = Vec::new();
        if Memory::wanted(r) {
            names.push(Memory::NAME);
        }
        if Cpu::wanted(r) {
            names.push(Cpu::NAME);
        }
        if CpuSet::wanted(r) {
            names.push(CpuSet::NAME);
        }
        if Pids::wanted(r) {
            names.push(Pids::NAME);
        }
        if Io::wanted(r) {
            names.push(Io::NAME);
        }
        if names.is_empty() {
            return Ok(());
        }
        let avail =
            std::fs::read_to_string(self.root.join("cgroup.controllers")).unwrap_or_default();
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !avail.split_whitespace().any(|a| a == *n))
            .collect();
        if !missing.is_empty() {
            return Err(CgroupError::Invalid(format!(
                "controllers {} are not available in {} (on a hybrid host they are bound to v1)",
                missing.join(" "),
                self.root.display()
            )));
        }
        let text: String = names.iter().map(|n| format!("+{n} ")).collect();
        let mut cur = self.root.clone();
        let rel = self.dir.strip_prefix(&self.root).unwrap_or(Path::new(""));
        for comp in rel.components() {
            write(&cur, "cgroup.subtree_control", text.trim_end())?;
            cur.push(comp);
        }
        Ok(())
    }

    fn apply_all(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        CpuSet::apply(&self.dir, r)?;
        Cpu::apply(&self.dir, r)?;
        Memory::apply(&self.dir, r)?;
        Pids::apply(&self.dir, r)?;
        Io::apply(&self.dir, r)?;
        for (k, v) in r.unified().iter().flatten() {
            if k.contains('/') || k.starts_with('.') {
                return Err(CgroupError::Invalid(format!(
                    "unified key {k:?} is not a cgroup file name"
                )));
            }
            write(&self.dir, k, v)?;
        }
        // Device rules on v2 need an eBPF program attached to the cgroup; not done by this runtime.
        Ok(())
    }

    pub fn create(&self, r: Option<&LinuxResources>) -> Result<(), CgroupError> {
        if let Some(r) = r {
            if let Some(parent) = self.dir.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            self.enable(r)?;
        }
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        match r {
            Some(r) => self.apply_all(r),
            None => Ok(()),
        }
    }

    pub fn add_task(&self, pid: i32) -> Result<(), CgroupError> {
        write(&self.dir, "cgroup.procs", &pid.to_string())
    }

    pub fn update(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        self.enable(r)?;
        self.apply_all(r)
    }

    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        write(&self.dir, "cgroup.freeze", if frozen { "1" } else { "0" })?;
        let want = if frozen { "frozen 1" } else { "frozen 0" };
        for _ in 0..1000 {
            let ev = std::fs::read_to_string(self.dir.join("cgroup.events"))
                .map_err(io_err(&self.dir))?;
            if ev.lines().any(|l| l.trim() == want) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Err(CgroupError::Invalid(format!(
            "{} did not reach {want}",
            self.dir.display()
        )))
    }

    pub fn is_frozen(&self) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
    }

    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        read_pids(&self.dir.join("cgroup.procs"))
    }

    pub fn remove(&self) -> Result<(), CgroupError> {
        rmdir_retry(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_v2_files() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpu memory pids io\n",
        )
        .unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        std::fs::create_dir(root.path().join("corefour")).unwrap();
        std::fs::write(root.path().join("corefour/cgroup.subtree_control"), "").unwrap();
        let dir = root.path().join("corefour/t2");
        std::fs::create_dir(&dir).unwrap();
        for f in ["memory.max", "cpu.weight", "cpu.max", "pids.max"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let r: LinuxResources = serde_json::from_str(r#"{"memory":{"limit":1048576},"cpu":{"shares":1024,"quota":20000},"pids":{"limit":10}}"#).unwrap();
        Manager::new(root.path(), Path::new("corefour/t2"))
            .create(Some(&r))
            .unwrap();
        let rd = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        assert_eq!(rd("memory.max"), "1048576");
        assert_eq!(rd("cpu.weight"), "39");
        assert_eq!(rd("cpu.max"), "20000 100000");
        assert_eq!(rd("pids.max"), "10");
        assert_eq!(
            std::fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
    }

    #[test]
    fn missing_controller_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "").unwrap();
        let r: LinuxResources = serde_json::from_str(r#"{"pids":{"limit":10}}"#).unwrap();
        let e = Manager::new(root.path(), Path::new("x"))
            .create(Some(&r))
            .unwrap_err();
        assert!(e.to_string().contains("pids"), "{e}");
    }

    /// The hybrid host's cgroup2 mount has no controllers but does freeze: prove it on a real process.
    #[test]
    fn freezes_real_process_on_unified_mount() {
        let unified = Path::new("/sys/fs/cgroup/unified");
        if nix::unistd::geteuid().as_raw() != 0 || !unified.join("cgroup.procs").exists() {
            eprintln!("skip: needs root and a cgroup2 mount at /sys/fs/cgroup/unified");
            return;
        }
        let rel = PathBuf::from(format!("corefour-test/freeze-{}", std::process::id()));
        let m = Manager::new(unified, &rel);
        m.create(None).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        m.add_task(child.id() as i32).unwrap();
        m.freeze(true).unwrap();
        assert!(m.is_frozen());
        let (_, st) = crate::util::process_start_ticks(child.id() as i32).unwrap();
        assert!(st == 'S' || st == 'D', "state {st}");
        m.freeze(false).unwrap();
        assert!(!m.is_frozen());
        assert_eq!(m.pids().unwrap(), vec![child.id() as i32]);
        child.kill().unwrap();
        child.wait().unwrap();
        m.remove().unwrap();
        let _ = std::fs::remove_dir(unified.join("corefour-test"));
    }
}
