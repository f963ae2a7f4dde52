//! The container's root: propagation, bind of the rootfs onto itself, the config's mounts and
//! devices, pivot_root, then masked and read-only paths.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd::{chdir, pivot_root};
use oci_spec::runtime::Spec;

use crate::ContainerError;

fn propagation(s: Option<&str>) -> Result<MsFlags, ContainerError> {
    Ok(match s.unwrap_or("") {
        "" | "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "private" => MsFlags::MS_PRIVATE,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        other => {
            return Err(ContainerError::Init(format!(
                "unknown rootfsPropagation {other:?}"
            )))
        }
    })
}

/// Everything that happens to the mount namespace before pivot_root.
pub fn prepare(
    rootfs: &Path,
    spec: &Spec,
    in_user_ns: bool,
    cgroup_v2: bool,
) -> Result<(), ContainerError> {
    let linux = spec.linux().as_ref();
    let prop = propagation(linux.and_then(|l| l.rootfs_propagation().as_deref()))?;
    // Stop our mounts from reaching the host before touching anything.
    let base = if prop.contains(MsFlags::MS_SHARED) {
        MsFlags::MS_PRIVATE | MsFlags::MS_REC
    } else {
        prop
    };
    mount(None::<&str>, "/", None::<&str>, base, None::<&str>)
        .map_err(|e| ContainerError::sys("make / private", e))?;
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| ContainerError::sys(format!("bind rootfs {}", rootfs.display()), e))?;
    for m in spec.mounts().iter().flatten() {
        crate::mounts::mount_into(rootfs, m, cgroup_v2)?;
    }
    let devices = linux.and_then(|l| l.devices().clone()).unwrap_or_default();
    crate::devices::create(rootfs, &devices, in_user_ns)?;
    Ok(())
}

/// Makes `rootfs` the root: pivot_root onto itself, then lazily detach the old root.
pub fn pivot(rootfs: &Path, spec: &Spec) -> Result<(), ContainerError> {
    chdir(rootfs).map_err(|e| ContainerError::sys(format!("chdir {}", rootfs.display()), e))?;
    pivot_root(".", ".").map_err(|e| ContainerError::sys("pivot_root", e))?;
    // The old root is stacked under the new one; make it slave so the detach does not propagate.
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| ContainerError::sys("make old root slave", e))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| ContainerError::sys("detach old root", e))?;
    chdir("/").map_err(|e| ContainerError::sys("chdir /", e))?;
    let prop = spec
        .linux()
        .as_ref()
        .and_then(|l| l.rootfs_propagation().clone());
    if let Some(p) = prop.as_deref().filter(|p| p.contains("shared")) {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            propagation(Some(p))?,
            None::<&str>,
        )
        .map_err(|e| ContainerError::sys("rootfs propagation", e))?;
    }
    Ok(())
}

/// After pivot_root: masked paths, read-only paths, read-only root.
pub fn finish(spec: &Spec) -> Result<(), ContainerError> {
    if let Some(linux) = spec.linux() {
        for p in linux.masked_paths().iter().flatten() {
            mask(Path::new(p))?;
        }
        for p in linux.readonly_paths().iter().flatten() {
            readonly(Path::new(p))?;
        }
    }
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        remount_ro(Path::new("/"))?;
    }
    Ok(())
}

fn mask(p: &Path) -> Result<(), ContainerError> {
    let md = match std::fs::metadata(p) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    let r = if md.is_dir() {
        mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    r.map_err(|e| ContainerError::sys(format!("mask {}", p.display()), e))
}

fn readonly(p: &Path) -> Result<(), ContainerError> {
    if std::fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    mount(
        Some(p),
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| ContainerError::sys(format!("bind {} read-only", p.display()), e))?;
    remount_ro(p)
}

/// Remounts a bind mount read-only, keeping the flags the kernel locked (nosuid, nodev, noexec).
fn remount_ro(p: &Path) -> Result<(), ContainerError> {
    let st = nix::sys::statvfs::statvfs(p)
        .map_err(|e| ContainerError::sys(format!("statvfs {}", p.display()), e))?;
    let f = st.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    use nix::sys::statvfs::FsFlags;
    for (s, m) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(s) {
            flags |= m;
        }
    }
    mount(None::<&str>, p, None::<&str>, flags, None::<&str>)
        .map_err(|e| ContainerError::sys(format!("remount {} read-only", p.display()), e))
}
