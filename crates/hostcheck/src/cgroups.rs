//! Which cgroup hierarchies are mounted (v1, v2, or both: "hybrid") and which controllers each has.

use serde::Serialize;

use crate::probe::HostProbe;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupVersion {
    /// Only v1 hierarchies.
    V1,
    /// Only the unified hierarchy.
    V2,
    /// v1 hierarchies hold the controllers and a cgroup2 is mounted beside them (systemd's "hybrid").
    Hybrid,
    /// No cgroup filesystem mounted.
    None,
}

impl CgroupVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
            CgroupVersion::Hybrid => "hybrid",
            CgroupVersion::None => "none",
        }
    }
}

/// One mounted v1 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct V1Hierarchy {
    pub mount_point: String,
    /// Controllers bound to it (e.g. ["cpu", "cpuacct"]); empty for a named-only hierarchy.
    pub controllers: Vec<String>,
    /// `name=` of a named hierarchy such as systemd's.
    pub name: Option<String>,
}

/// One line of /proc/cgroups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelController {
    pub name: String,
    /// The v1 hierarchy it is bound to; 0 means unbound (free for v2, or unused).
    pub hierarchy: u32,
    pub enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CgroupInfo {
    pub version: CgroupVersion,
    pub v1_hierarchies: Vec<V1Hierarchy>,
    /// Where cgroup2 is mounted (first mount), if anywhere.
    pub v2_mount: Option<String>,
    /// The root's cgroup.controllers of the v2 mount.
    pub v2_controllers: Vec<String>,
    /// The kernel's controllers from /proc/cgroups.
    pub kernel_controllers: Vec<KernelController>,
}

impl CgroupInfo {
    /// Controllers a container runtime can use: bound to a mounted v1 hierarchy or listed by v2.
    pub fn usable_controllers(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .v1_hierarchies
            .iter()
            .flat_map(|h| h.controllers.iter().cloned())
            .chain(self.v2_controllers.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// A mount as /proc/self/mountinfo states it; only the fields the check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: String,
    pub fs_type: String,
    pub super_options: Vec<String>,
}

/// Decodes the octal escapes (`\040` for a space) mountinfo uses in paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mountinfo (proc(5)): fields up to the optional tags, a lone "-", then the
/// filesystem type, source and super options. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fs_type = right.next()?;
            let _source = right.next()?;
            let super_options = right
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::to_string)
                .collect();
            Some(Mount {
                mount_point: unescape(mount_point),
                fs_type: fs_type.to_string(),
                super_options,
            })
        })
        .collect()
}

/// Parses /proc/cgroups. The header and malformed lines are skipped.
pub fn parse_proc_cgroups(text: &str) -> Vec<KernelController> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let name = f.next()?.to_string();
            let hierarchy = f.next()?.parse().ok()?;
            let _num_cgroups = f.next()?;
            let enabled = f.next()? == "1";
            Some(KernelController {
                name,
                hierarchy,
                enabled,
            })
        })
        .collect()
}

/// Mount options that are not controller names.
fn is_mount_flag(opt: &str) -> bool {
    matches!(
        opt,
        "rw" | "ro"
            | "xattr"
            | "noprefix"
            | "clone_children"
            | "cpuset_v2_mode"
            | "nosuid"
            | "nodev"
            | "noexec"
    ) || opt.starts_with("release_agent=")
        || opt.starts_with("name=")
        || opt.is_empty()
}

/// Builds the picture from mountinfo, /proc/cgroups and the v2 root's cgroup.controllers.
pub fn classify(
    mounts: &[Mount],
    kernel: Vec<KernelController>,
    read_v2_controllers: impl Fn(&str) -> Option<String>,
) -> CgroupInfo {
    let mut v1 = Vec::new();
    let mut v2_mount = None;
    for m in mounts {
        match m.fs_type.as_str() {
            "cgroup" => v1.push(V1Hierarchy {
                mount_point: m.mount_point.clone(),
                controllers: m
                    .super_options
                    .iter()
                    .filter(|o| !is_mount_flag(o))
                    .cloned()
                    .collect(),
                name: m
                    .super_options
                    .iter()
                    .find_map(|o| o.strip_prefix("name=").map(str::to_string)),
            }),
            "cgroup2" if v2_mount.is_none() => v2_mount = Some(m.mount_point.clone()),
            _ => {}
        }
    }
    let v2_controllers: Vec<String> = v2_mount
        .as_deref()
        .and_then(read_v2_controllers)
        .map(|t| t.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    // Named-only v1 hierarchies (systemd's) hold no controllers: with cgroup2 beside them the
    // controllers are all on v2, which is how v2-only hosts look to old tools.
    let v1_with_controllers = v1.iter().any(|h| !h.controllers.is_empty());
    let version = match (v1.is_empty(), v2_mount.is_some()) {
        (true, false) => CgroupVersion::None,
        (true, true) => CgroupVersion::V2,
        (false, false) => CgroupVersion::V1,
        (false, true) if v1_with_controllers => CgroupVersion::Hybrid,
        (false, true) => CgroupVersion::V2,
    };
    CgroupInfo {
        version,
        v1_hierarchies: v1,
        v2_mount,
        v2_controllers,
        kernel_controllers: kernel,
    }
}

pub(crate) fn probe(host: &dyn HostProbe) -> CgroupInfo {
    let mounts = host
        .read_file("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default();
    let kernel = host
        .read_file("/proc/cgroups")
        .map(|t| parse_proc_cgroups(&t))
        .unwrap_or_default();
    classify(&mounts, kernel, |mp| {
        host.read_file(&format!("{mp}/cgroup.controllers")).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures;

    fn classify_text(mountinfo: &str, cgroups: &str, v2: &str) -> CgroupInfo {
        classify(
            &parse_mountinfo(mountinfo),
            parse_proc_cgroups(cgroups),
            |_| Some(v2.to_string()),
        )
    }

    #[test]
    fn this_machine_is_hybrid() {
        let c = classify_text(
            fixtures::PVM_MOUNTINFO,
            fixtures::PVM_PROC_CGROUPS,
            fixtures::PVM_UNIFIED_CONTROLLERS,
        );
        assert_eq!(c.version, CgroupVersion::Hybrid);
        assert_eq!(c.v2_mount.as_deref(), Some("/sys/fs/cgroup/unified"));
        assert_eq!(c.v2_controllers, vec!["hugetlb"]);
        assert_eq!(c.v1_hierarchies.len(), 9);
        let systemd = c
            .v1_hierarchies
            .iter()
            .find(|h| h.mount_point == "/sys/fs/cgroup/systemd");
        assert_eq!(systemd.and_then(|h| h.name.as_deref()), Some("systemd"));
        assert!(systemd.is_some_and(|h| h.controllers.is_empty()));
        assert_eq!(
            c.usable_controllers(),
            vec![
                "blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "hugetlb", "memory",
                "pids"
            ]
        );
        let memory = c.kernel_controllers.iter().find(|k| k.name == "memory");
        assert_eq!(memory.map(|m| (m.hierarchy, m.enabled)), Some((4, true)));
        assert_eq!(c.kernel_controllers.len(), 12);
    }

    #[test]
    fn pure_v2() {
        let c = classify_text(
            fixtures::INTEL_MOUNTINFO,
            fixtures::INTEL_PROC_CGROUPS,
            fixtures::INTEL_V2_CONTROLLERS,
        );
        assert_eq!(c.version, CgroupVersion::V2);
        assert_eq!(c.v2_mount.as_deref(), Some("/sys/fs/cgroup"));
        assert!(c.v1_hierarchies.is_empty());
        assert_eq!(c.usable_controllers().len(), 8);
    }

    #[test]
    fn systemd_hybrid_with_comounted_controllers() {
        let c = classify_text(fixtures::AMD_MOUNTINFO, "", "\n");
        assert_eq!(c.version, CgroupVersion::Hybrid);
        assert!(c.v2_controllers.is_empty());
        assert_eq!(
            c.usable_controllers(),
            vec!["cpu", "cpuacct", "memory", "pids"]
        );
    }

    #[test]
    fn v1_only_with_escaped_mount_point() {
        let c = classify_text(fixtures::NO_VIRT_MOUNTINFO, "", "");
        assert_eq!(c.version, CgroupVersion::V1);
        assert_eq!(
            c.v1_hierarchies[1].mount_point,
            "/sys/fs/cgroup/cpu and more"
        );
    }

    #[test]
    fn nothing_mounted() {
        let c = classify_text("", "", "");
        assert_eq!(c.version, CgroupVersion::None);
    }

    #[test]
    fn malformed_lines_are_skipped() {
        let m = parse_mountinfo("garbage\n1 2 3\n - \n31 23 0:28 / /x rw - cgroup2\n");
        assert!(m.is_empty(), "{m:?}");
        let k = parse_proc_cgroups("#h\ncpu x 1 1\nmemory 4 1\npids 8 1 1\n");
        assert_eq!(k.len(), 1);
        assert_eq!(unescape("a\\040b\\"), "a b\\");
        assert_eq!(unescape("\\04"), "\\04");
    }
}
