//! One config.json mount: options → mount flags, data and propagation; then the mount itself,
//! with its destination resolved inside the rootfs.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use oci_spec::runtime::Mount;

use crate::ContainerError;

/// A mount's options as the kernel wants them.
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub flags: MsFlags,
    /// Flags the options cleared (`rw`, `suid`, …): a remount must not keep them.
    pub cleared: MsFlags,
    pub propagation: MsFlags,
    pub data: String,
    pub bind: bool,
}

pub fn parse_options(opts: &[String]) -> Options {
    let mut o = Options {
        flags: MsFlags::empty(),
        cleared: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: String::new(),
        bind: false,
    };
    let mut data = Vec::new();
    for opt in opts {
        let (set, clear, prop) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty(), MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty(), MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty(), MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty(), MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty(), MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty(), MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty(), MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty(), MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty(), MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty(), MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty(), MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty(), MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "silent" => (MsFlags::MS_SILENT, MsFlags::empty(), MsFlags::empty()),
            "loud" => (MsFlags::empty(), MsFlags::MS_SILENT, MsFlags::empty()),
            "bind" => {
                o.bind = true;
                (MsFlags::MS_BIND, MsFlags::empty(), MsFlags::empty())
            }
            "rbind" => {
                o.bind = true;
                (
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    MsFlags::empty(),
                    MsFlags::empty(),
                )
            }
            "private" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_PRIVATE),
            "rprivate" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            ),
            "shared" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SHARED),
            "rshared" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SHARED | MsFlags::MS_REC,
            ),
            "slave" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SLAVE),
            "rslave" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
            ),
            "unbindable" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_UNBINDABLE),
            "runbindable" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
            ),
            // Mount-time idmapping and the like are not supported; the kernel would reject them as data.
            other => {
                data.push(other.to_string());
                continue;
            }
        };
        o.flags = (o.flags | set) & !clear;
        o.cleared = (o.cleared | clear) & !set;
        o.propagation |= prop;
    }
    o.data = data.join(",");
    o
}

fn data_opt(d: &str) -> Option<&str> {
    (!d.is_empty()).then_some(d)
}

/// Mounts `m` under `rootfs` (before pivot_root). `cgroup` mounts get the host's layout.
pub fn mount_into(rootfs: &Path, m: &Mount, cgroup_v2: bool) -> Result<(), ContainerError> {
    let dest = crate::util::secure_join(rootfs, m.destination());
    let typ = m.typ().as_deref().unwrap_or("");
    let o = parse_options(m.options().as_deref().unwrap_or(&[]));
    let src: Option<PathBuf> = m.source().clone();
    let fail = |what: &str, e: nix::Error| {
        ContainerError::sys(
            format!(
                "mount {} on {} ({what})",
                src.as_deref().unwrap_or(Path::new(typ)).display(),
                m.destination().display()
            ),
            e,
        )
    };
    if typ == "cgroup" {
        return mount_cgroup(&dest, &o, cgroup_v2);
    }
    if o.bind || typ == "bind" {
        let src = src.clone().ok_or_else(|| {
            ContainerError::Init(format!(
                "bind mount on {} has no source",
                m.destination().display()
            ))
        })?;
        let is_dir = std::fs::metadata(&src)
            .map(|md| md.is_dir())
            .map_err(|e| ContainerError::io(format!("bind mount source {}", src.display()), e))?;
        if is_dir {
            std::fs::create_dir_all(&dest)
                .map_err(|e| ContainerError::io(format!("mkdir {}", dest.display()), e))?;
        } else {
            crate::util::ensure_file(&dest)
                .map_err(|e| ContainerError::io(format!("create {}", dest.display()), e))?;
        }
        let rec = o.flags & MsFlags::MS_REC;
        mount(
            Some(&src),
            &dest,
            None::<&str>,
            MsFlags::MS_BIND | rec,
            None::<&str>,
        )
        .map_err(|e| fail("bind", e))?;
        let extra = o.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                extra | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                None::<&str>,
            )
            .map_err(|e| fail("remount", e))?;
        }
    } else {
        std::fs::create_dir_all(&dest)
            .map_err(|e| ContainerError::io(format!("mkdir {}", dest.display()), e))?;
        let source = src.clone().unwrap_or_else(|| PathBuf::from(typ));
        let mut flags = o.flags;
        let mut data = o.data.clone();
        if typ == "mqueue" || typ == "sysfs" || typ == "proc" {
            data.clear();
        }
        match mount(Some(&source), &dest, Some(typ), flags, data_opt(&data)) {
            Ok(()) => {}
            // sysfs in a user namespace without its own network namespace: fall back to a bind of /sys.
            Err(nix::Error::EPERM) if typ == "sysfs" => {
                flags |= MsFlags::MS_BIND | MsFlags::MS_REC;
                mount(
                    Some("/sys"),
                    &dest,
                    None::<&str>,
                    flags & (MsFlags::MS_BIND | MsFlags::MS_REC),
                    None::<&str>,
                )
                .map_err(|e| fail("bind /sys", e))?;
                if flags.contains(MsFlags::MS_RDONLY) {
                    let _ = mount(
                        None::<&str>,
                        &dest,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    );
                }
            }
            Err(e) => return Err(fail(typ, e)),
        }
    }
    if !o.propagation.is_empty() {
        mount(
            None::<&str>,
            &dest,
            None::<&str>,
            o.propagation,
            None::<&str>,
        )
        .map_err(|e| fail("propagation", e))?;
    }
    Ok(())
}

/// A `cgroup` mount: cgroup2 on a v2 host; on v1 a tmpfs holding one mount per hierarchy (seen
/// from the container's cgroup namespace, so the container's own cgroup is each root).
fn mount_cgroup(dest: &Path, o: &Options, v2: bool) -> Result<(), ContainerError> {
    std::fs::create_dir_all(dest)
        .map_err(|e| ContainerError::io(format!("mkdir {}", dest.display()), e))?;
    let flags = o.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
    if v2 {
        return mount(Some("cgroup"), dest, Some("cgroup2"), flags, None::<&str>)
            .map_err(|e| ContainerError::sys(format!("mount cgroup2 on {}", dest.display()), e));
    }
    mount(
        Some("tmpfs"),
        dest,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=755"),
    )
    .map_err(|e| ContainerError::sys(format!("mount tmpfs on {}", dest.display()), e))?;
    for (name, host) in crate::cgroups::v1::hierarchies() {
        let sub = dest.join(name.trim_start_matches("name="));
        let _ = std::fs::create_dir_all(&sub);
        if let Err(e) = mount(
            Some("cgroup"),
            &sub,
            Some("cgroup"),
            flags,
            Some(name.as_str()),
        ) {
            // A v1 hierarchy cannot be mounted from a user namespace: bind the host's instead.
            let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
            mount(Some(&host), &sub, None::<&str>, bind, None::<&str>).map_err(|_| {
                ContainerError::sys(format!("mount cgroup {name} on {}", sub.display()), e)
            })?;
        }
    }
    if flags.contains(MsFlags::MS_RDONLY) {
        let _ = mount(
            None::<&str>,
            dest,
            None::<&str>,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV
                | MsFlags::MS_NOEXEC,
            Some("mode=755"),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options() {
        let o = parse_options(&s(&["nosuid", "strictatime", "mode=755", "size=65536k"]));
        assert_eq!(o.flags, MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME);
        assert_eq!(o.data, "mode=755,size=65536k");
        let o = parse_options(&s(&["rbind", "ro", "rw", "rslave"]));
        assert!(o.bind);
        assert_eq!(o.flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(o.propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert_eq!(o.cleared, MsFlags::MS_RDONLY);
    }
}
