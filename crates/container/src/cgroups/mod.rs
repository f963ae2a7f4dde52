//! Cgroups behind one trait (youki's shape): a v1 and a v2 backend, picked at run time from the
//! filesystem mounted at /sys/fs/cgroup, each with one `Controller` per resource.

pub mod v1;
pub mod v2;

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    #[error("cgroup {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cgroup: {0}")]
    Invalid(String),
    #[error("cgroup {path} still has processes after {ms} ms; they did not exit")]
    Busy { path: PathBuf, ms: u64 },
}

impl CgroupError {
    /// The kernel said no for lack of permission (a rootless caller).
    pub fn is_permission(&self) -> bool {
        matches!(self, CgroupError::Io { cause, .. } if matches!(cause.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS)))
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |cause| CgroupError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    V1,
    V2,
}

/// Where a container's cgroup lives; stored in the state file so every verb finds it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupConfig {
    pub version: Version,
    /// Relative to each hierarchy's root, e.g. `corefour/c1`.
    pub path: PathBuf,
    /// The hierarchy root (tests point this at a scratch directory); /sys/fs/cgroup when unset.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Rootless without cgroup write access and without resource limits: no cgroup at all.
    #[serde(default)]
    pub disabled: bool,
}

impl CgroupConfig {
    /// The config's cgroupsPath (absolute or relative, both under the hierarchy root) or
    /// `corefour/<id>`.
    pub fn for_container(cgroups_path: Option<&Path>, id: &str) -> Self {
        let path = match cgroups_path {
            Some(p) if !p.as_os_str().is_empty() => p
                .components()
                .filter(|c| matches!(c, std::path::Component::Normal(_)))
                .collect(),
            _ => PathBuf::from("corefour").join(id),
        };
        CgroupConfig {
            version: detect(),
            path,
            root: None,
            disabled: false,
        }
    }
}

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// v2 when /sys/fs/cgroup itself is cgroup2 (unified); a hybrid host (v1 hierarchies plus an
/// empty cgroup2 at /sys/fs/cgroup/unified) is v1.
pub fn detect() -> Version {
    match nix::sys::statfs::statfs(CGROUP_ROOT) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => Version::V2,
        _ => Version::V1,
    }
}

/// What every backend can do with one container's cgroup.
pub trait CgroupManager {
    /// Creates the cgroup and writes the resource limits.
    fn create(&self, resources: Option<&LinuxResources>) -> Result<(), CgroupError>;
    /// Moves a process into the cgroup.
    fn add_task(&self, pid: i32) -> Result<(), CgroupError>;
    /// Files the container init writes "0" into to move itself (v1 `tasks`): a thread moving
    /// itself skips the global threadgroup lock, whose RCU grace period otherwise costs
    /// milliseconds per migration. Empty when the parent must call `add_task`.
    fn self_join_files(&self) -> Vec<PathBuf>;
    /// Writes new limits to an existing cgroup.
    fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError>;
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError>;
    fn is_frozen(&self) -> bool;
    /// PIDs of every process in the cgroup.
    fn pids(&self) -> Result<Vec<i32>, CgroupError>;
    /// Removes the cgroup; waits briefly for exiting processes to leave.
    fn remove(&self) -> Result<(), CgroupError>;
}

/// One manager for either version; everything outside this module uses only this.
pub enum Manager {
    V1(v1::Manager),
    V2(v2::Manager),
    /// A rootless container the user may not give a cgroup: every operation is a no-op except
    /// freezing, which cannot be done.
    Disabled,
}

pub fn manager(cfg: &CgroupConfig) -> Result<Manager, CgroupError> {
    let root = cfg
        .root
        .clone()
        .unwrap_or_else(|| PathBuf::from(CGROUP_ROOT));
    Ok(match cfg.version {
        Version::V1 => Manager::V1(v1::Manager::new(&root, &cfg.path, cfg.root.is_some())?),
        Version::V2 => Manager::V2(v2::Manager::new(&root, &cfg.path)),
    })
}

impl CgroupManager for Manager {
    fn create(&self, r: Option<&LinuxResources>) -> Result<(), CgroupError> {
        match self {
            Manager::V1(m) => m.create(r),
            Manager::V2(m) => m.create(r),
            Manager::Disabled => Ok(()),
        }
    }
    fn add_task(&self, pid: i32) -> Result<(), CgroupError> {
        match self {
            Manager::V1(m) => m.add_task(pid),
            Manager::V2(m) => m.add_task(pid),
            Manager::Disabled => Ok(()),
        }
    }
    fn self_join_files(&self) -> Vec<PathBuf> {
        match self {
            Manager::V1(m) => m.self_join_files(),
            Manager::V2(_) | Manager::Disabled => Vec::new(),
        }
    }
    fn update(&self, r: &LinuxResources) -> Result<(), CgroupError> {
        match self {
            Manager::V1(m) => m.update(r),
            Manager::V2(m) => m.update(r),
            Manager::Disabled => Err(CgroupError::Invalid(
                "this rootless container has no cgroup".into(),
            )),
        }
    }
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        match self {
            Manager::V1(m) => m.freeze(frozen),
            Manager::V2(m) => m.freeze(frozen),
            Manager::Disabled => Err(CgroupError::Invalid(
                "this rootless container has no cgroup to freeze".into(),
            )),
        }
    }
    fn is_frozen(&self) -> bool {
        match self {
            Manager::V1(m) => m.is_frozen(),
            Manager::V2(m) => m.is_frozen(),
            Manager::Disabled => false,
        }
    }
    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        match self {
            Manager::V1(m) => m.pids(),
            Manager::V2(m) => m.pids(),
            Manager::Disabled => Ok(Vec::new()),
        }
    }
    fn remove(&self) -> Result<(), CgroupError> {
        match self {
            Manager::V1(m) => m.remove(),
            Manager::V2(m) => m.remove(),
            Manager::Disabled => Ok(()),
        }
    }
}

/// Writes one control file, naming the file and value when the kernel refuses.
pub(crate) fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    crate::util::write_file(&path, value).map_err(|cause| match cause.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::EBUSY) | Some(libc::ERANGE) => CgroupError::Invalid(
            format!("{} refused value {value:?}: {cause}", path.display()),
        ),
        _ => CgroupError::Io { path, cause },
    })
}

/// Moves the calling thread into every cgroup in `files` (v1 `tasks` files; see `self_join_files`).
pub fn join_self(files: &[PathBuf]) -> Result<(), CgroupError> {
    for f in files {
        crate::util::write_file(f, "0").map_err(io_err(f))?;
    }
    Ok(())
}

pub(crate) fn read_pids(file: &Path) -> Result<Vec<i32>, CgroupError> {
    let text = std::fs::read_to_string(file).map_err(io_err(file))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// rmdir that retries while the last processes finish exiting (EBUSY).
pub(crate) fn rmdir_retry(dir: &Path) -> Result<(), CgroupError> {
    let start = std::time::Instant::now();
    let mut delay = 50u64;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let ms = start.elapsed().as_millis() as u64;
                if ms > 2000 {
                    return Err(CgroupError::Busy {
                        path: dir.into(),
                        ms,
                    });
                }
                std::thread::sleep(std::time::Duration::from_micros(delay));
                delay = (delay * 2).min(20_000);
            }
            Err(cause) => {
                return Err(CgroupError::Io {
                    path: dir.into(),
                    cause,
                })
            }
        }
    }
}

/// cgroup v1 cpu.shares (2..262144) to v2 cpu.weight (1..10000), the conversion runc and crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142
}

/// Parses sizes like `256M`, `1G`, `512k`, `1048576` into bytes.
pub fn parse_size(s: &str) -> Option<i64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_lowercase();
            let m: i64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => return None,
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    num.trim()
        .parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .and_then(|n| n.checked_mul(mult))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_sizes() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("-1"), None);
    }

    #[test]
    fn config_path() {
        let c = CgroupConfig::for_container(None, "c1");
        assert_eq!(c.path, PathBuf::from("corefour/c1"));
        let c = CgroupConfig::for_container(Some(Path::new("/a/../b")), "c1");
        assert_eq!(c.path, PathBuf::from("a/b"));
    }
}
