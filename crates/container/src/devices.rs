//! Device nodes in the container's /dev: the defaults every container gets, the config's own, and
//! the usual symlinks. In a user namespace mknod is not allowed, so host nodes are bind-mounted.

use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::unistd::{chown, Gid, Uid};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType};

use crate::ContainerError;

/// (path, type, major, minor): the nodes runc gives every container.
pub const DEFAULT_DEVICES: &[(&str, char, i64, i64)] = &[
    ("/dev/null", 'c', 1, 3),
    ("/dev/zero", 'c', 1, 5),
    ("/dev/full", 'c', 1, 7),
    ("/dev/random", 'c', 1, 8),
    ("/dev/urandom", 'c', 1, 9),
    ("/dev/tty", 'c', 5, 0),
];

/// Cgroup device rules that let the default nodes (and ptys) work even after a deny-all rule.
pub fn default_allow_rules() -> Vec<LinuxDeviceCgroup> {
    let mut v: Vec<LinuxDeviceCgroup> = DEFAULT_DEVICES
        .iter()
        .map(|&(_, _, major, minor)| rule(LinuxDeviceType::C, Some(major), Some(minor)))
        .collect();
    v.push(rule(LinuxDeviceType::C, Some(5), Some(2))); // /dev/ptmx
    v.push(rule(LinuxDeviceType::C, Some(136), None)); // /dev/pts/*
    v
}

fn rule(t: LinuxDeviceType, major: Option<i64>, minor: Option<i64>) -> LinuxDeviceCgroup {
    let mut r = LinuxDeviceCgroup::default();
    r.set_allow(true);
    r.set_typ(Some(t));
    r.set_major(major);
    r.set_minor(minor);
    r.set_access(Some("rwm".into()));
    r
}

#[allow(clippy::too_many_arguments)]
fn make_node(
    rootfs: &Path,
    path: &Path,
    kind: char,
    major: i64,
    minor: i64,
    mode: u32,
    owner: Option<(u32, u32)>,
    bind: bool,
) -> Result<(), ContainerError> {
    let dest = crate::util::secure_join(rootfs, path);
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| ContainerError::io(format!("mkdir {}", parent.display()), e))?;
    }
    if bind {
        crate::util::ensure_file(&dest)
            .map_err(|e| ContainerError::io(format!("create {}", dest.display()), e))?;
        return mount(
            Some(path),
            &dest,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| ContainerError::sys(format!("bind device {}", path.display()), e));
    }
    let sflag = match kind {
        'b' => SFlag::S_IFBLK,
        'p' => SFlag::S_IFIFO,
        _ => SFlag::S_IFCHR,
    };
    let _ = std::fs::remove_file(&dest);
    mknod(
        &dest,
        sflag,
        Mode::from_bits_truncate(mode),
        makedev(major as u64, minor as u64),
    )
    .map_err(|e| ContainerError::sys(format!("mknod {}", path.display()), e))?;
    if let Some((uid, gid)) = owner {
        chown(&dest, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| ContainerError::sys(format!("chown {}", path.display()), e))?;
    }
    Ok(())
}

/// Creates default and configured device nodes plus /dev/fd, stdio and ptmx links.
pub fn create(rootfs: &Path, devices: &[LinuxDevice], bind: bool) -> Result<(), ContainerError> {
    for &(path, kind, major, minor) in DEFAULT_DEVICES {
        if devices.iter().any(|d| d.path() == Path::new(path)) {
            continue;
        }
        make_node(
            rootfs,
            Path::new(path),
            kind,
            major,
            minor,
            0o666,
            None,
            bind,
        )?;
    }
    for d in devices {
        let kind = match d.typ() {
            LinuxDeviceType::B => 'b',
            LinuxDeviceType::P => 'p',
            _ => 'c',
        };
        let owner = d.uid().map(|u| (u, d.gid().unwrap_or(0)));
        make_node(
            rootfs,
            d.path(),
            kind,
            d.major(),
            d.minor(),
            d.file_mode().unwrap_or(0o666),
            owner,
            bind,
        )?;
    }
    let dev = rootfs.join("dev");
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let p = dev.join(link);
        if std::fs::symlink_metadata(&p).is_ok() {
            continue;
        }
        std::os::unix::fs::symlink(target, &p)
            .map_err(|e| ContainerError::io(format!("symlink {}", p.display()), e))?;
    }
    if std::fs::metadata("/proc/kcore").is_ok() {
        let _ = std::os::unix::fs::symlink("/proc/kcore", dev.join("core"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_cover_default_nodes() {
        let rules = default_allow_rules();
        for &(_, _, major, minor) in DEFAULT_DEVICES {
            assert!(rules
                .iter()
                .any(|r| r.major() == Some(major) && r.minor() == Some(minor)));
        }
        assert_eq!(rules.last().unwrap().to_string(), "c 136:* rwm");
    }
}
