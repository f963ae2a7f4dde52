//! `--jail`: the VMM in a chroot of its own, in new mount, PID, IPC, UTS (and, without NICs,
//! network) namespaces, as an unprivileged user: Firecracker's jailer, as an option of the daemon.
//!
//! The jail root is `VM_DIR/root` on the host (so the daemon reaches the API socket the VMM makes
//! there). Everything the VMM may see is bind-mounted into it inside the VMM's private mount
//! namespace: the binary, the kernel, initrd and disks, read-only /usr and the loader cache;
//! /dev is a fresh tmpfs with only kvm, net/tun, null, zero and urandom. The mounts vanish with
//! the namespace when the VMM exits.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::shim::{API_SOCK, CONFIG_FILE};

/// Jailed VMMs run as uid/gid `JAIL_ID_BASE + instance id`.
pub const JAIL_ID_BASE: u32 = 100_000;
pub const ROOT_DIR: &str = "root";

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot prepare the jail at {path}: {source}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM config {path} is unusable in a jail: {what}")]
    Config { path: PathBuf, what: String },
}

/// A bind mount to make inside the jail: host source, path under the root, read-only or not.
struct Bind {
    src: CString,
    dst: CString,
    read_only: bool,
}

/// Everything the child needs between fork and exec, prepared (allocated) beforehand.
pub struct Jail {
    root: CString,
    binds: Vec<Bind>,
    dev: CString,
    devices: Vec<(CString, u32, u32, u32)>,
    proc_dir: CString,
    uid: u32,
    new_net: bool,
    /// The VMM binary's path inside the jail.
    pub exe_inside: PathBuf,
    pub config_inside: PathBuf,
    pub sock_inside: PathBuf,
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Prepare {
        path: p.to_path_buf(),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })
}

fn prep_err(path: &Path) -> impl FnOnce(std::io::Error) -> JailError + '_ {
    move |source| JailError::Prepare {
        path: path.to_path_buf(),
        source,
    }
}

/// An empty file or directory to mount over.
fn mount_point(path: &Path, dir: bool) -> Result<(), JailError> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(prep_err(p))?;
    }
    if dir {
        std::fs::create_dir_all(path).map_err(prep_err(path))
    } else {
        std::fs::write(path, b"").map_err(prep_err(path))
    }
}

/// Lays out `vm_dir/root`, rewrites the config to jail paths, and returns what the child does.
pub fn prepare(vm_dir: &Path, vmm_exe: &Path, uid: u32) -> Result<Jail, JailError> {
    let root = vm_dir.join(ROOT_DIR);
    remove_root(vm_dir)?;
    std::fs::create_dir_all(&root).map_err(prep_err(&root))?;
    let cfg_path = vm_dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(prep_err(&cfg_path))?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| JailError::Config {
            path: cfg_path.clone(),
            what: e.to_string(),
        })?;
    let mut binds = Vec::new();
    let mut bind =
        |src: &Path, inside: &str, read_only: bool, dir: bool| -> Result<(), JailError> {
            let dst = root.join(inside.trim_start_matches('/'));
            mount_point(&dst, dir)?;
            binds.push(Bind {
                src: cstr(src)?,
                dst: cstr(&dst)?,
                read_only,
            });
            Ok(())
        };
    bind(vmm_exe, "/corefour", true, false)?;
    let mut take = |v: &mut serde_json::Value, inside: String, ro: bool| -> Result<(), JailError> {
        if let Some(src) = v.as_str().filter(|s| !s.is_empty()).map(PathBuf::from) {
            bind(&src, &inside, ro, false)?;
            *v = serde_json::Value::String(inside);
        }
        Ok(())
    };
    take(&mut cfg["kernel"], "/kernel".into(), true)?;
    if !cfg["initrd"].is_null() {
        take(&mut cfg["initrd"], "/initrd".into(), true)?;
    }
    if let Some(disks) = cfg["disks"].as_array_mut() {
        for (i, d) in disks.iter_mut().enumerate() {
            let ro = d["read_only"].as_bool().unwrap_or(false);
            take(&mut d["path"], format!("/disk{i}"), ro)?;
        }
    }
    let has_nets = cfg["nets"].as_array().is_some_and(|n| !n.is_empty());
    // The dynamic loader and libraries: /usr read-only, the merged-/usr symlinks as on the host.
    bind(Path::new("/usr"), "/usr", true, true)?;
    for l in ["lib", "lib64", "bin"] {
        let host = Path::new("/").join(l);
        match std::fs::read_link(&host) {
            Ok(target) => std::os::unix::fs::symlink(&target, root.join(l))
                .map_err(prep_err(&root.join(l)))?,
            Err(_) if host.is_dir() => bind(&host, &format!("/{l}"), true, true)?,
            Err(_) => {}
        }
    }
    let ld_cache = Path::new("/etc/ld.so.cache");
    if ld_cache.exists() {
        bind(ld_cache, "/etc/ld.so.cache", true, false)?;
    }
    let jailed_cfg = root.join(CONFIG_FILE);
    std::fs::write(
        &jailed_cfg,
        serde_json::to_vec_pretty(&cfg).unwrap_or_default(),
    )
    .map_err(prep_err(&jailed_cfg))?;
    let dev = root.join("dev");
    mount_point(&dev.join("net"), true)?;
    let proc_dir = root.join("proc");
    mount_point(&proc_dir, true)?;
    // The VMM creates its API socket in the root.
    std::os::unix::fs::chown(&root, Some(uid), Some(uid)).map_err(prep_err(&root))?;
    let devices = [
        ("kvm", 10, 232, 0o600),
        ("net/tun", 10, 200, 0o600),
        ("null", 1, 3, 0o666),
        ("zero", 1, 5, 0o666),
        ("urandom", 1, 9, 0o666),
    ]
    .into_iter()
    .map(|(n, maj, min, mode)| Ok((cstr(&dev.join(n))?, maj, min, mode)))
    .collect::<Result<Vec<_>, JailError>>()?;
    Ok(Jail {
        root: cstr(&root)?,
        binds,
        dev: cstr(&dev)?,
        devices,
        proc_dir: cstr(&proc_dir)?,
        uid,
        new_net: !has_nets,
        exe_inside: PathBuf::from("/corefour"),
        config_inside: PathBuf::from("/").join(CONFIG_FILE),
        sock_inside: PathBuf::from("/").join(API_SOCK),
    })
}

fn check(r: libc::c_int) -> std::io::Result<()> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes the next child the first process of a new PID namespace. Called in the (single-threaded)
/// shim before it spawns the VMM.
pub fn new_pid_namespace() -> std::io::Result<()> {
    // SAFETY: unshare takes flags only.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) })
}

impl Jail {
    /// Runs in the child between fork and exec: namespaces, mounts, devices, chroot, identity.
    pub fn enter(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if self.new_net {
            flags |= libc::CLONE_NEWNET;
        }
        // SAFETY: plain syscalls on NUL-terminated strings prepared before the fork
        // and kept alive by `self`; mknod/chown/chmod on paths inside the jail only.
        unsafe {
            check(libc::unshare(flags))?;
            // Nothing mounted below leaks back to the host.
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for b in &self.binds {
                check(libc::mount(
                    b.src.as_ptr(),
                    b.dst.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                if b.read_only {
                    check(libc::mount(
                        null,
                        b.dst.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                        std::ptr::null(),
                    ))?;
                }
            }
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.dev.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"mode=0755,size=64k".as_ptr().cast(),
            ))?;
            let net_dir = {
                // "<dev>/net": the tmpfs hid the directory made on the host.
                let mut v = self.dev.as_bytes().to_vec();
                v.extend_from_slice(b"/net\0");
                v
            };
            check(libc::mkdir(net_dir.as_ptr().cast(), 0o755))?;
            for (path, maj, min, mode) in &self.devices {
                check(libc::mknod(
                    path.as_ptr(),
                    libc::S_IFCHR | mode,
                    libc::makedev(*maj, *min),
                ))?;
                check(libc::chmod(path.as_ptr(), *mode))?;
                if *mode == 0o600 {
                    check(libc::chown(path.as_ptr(), self.uid, self.uid))?;
                }
            }
            // This process is PID 1 of its own PID namespace: a fresh /proc shows only the VMM.
            check(libc::mount(
                c"proc".as_ptr(),
                self.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
            check(libc::chroot(self.root.as_ptr()))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(self.uid, self.uid, self.uid))?;
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
        }
        Ok(())
    }
}

/// Removes a jail root, unless something is still mounted under it in this mount namespace (then
/// deleting would reach into the mounted tree: refuse and say so).
pub fn remove_root(vm_dir: &Path) -> Result<(), JailError> {
    let root = vm_dir.join(ROOT_DIR);
    if !root.exists() {
        return Ok(());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root_s = root.display().to_string();
    let busy = mounts.lines().any(|l| {
        l.split_whitespace()
            .nth(4)
            .is_some_and(|mp| mp == root_s || mp.starts_with(&format!("{root_s}/")))
    });
    if busy {
        return Err(JailError::Prepare {
            path: root,
            source: std::io::Error::from_raw_os_error(libc::EBUSY),
        });
    }
    std::fs::remove_dir_all(&root).map_err(prep_err(&root))
}

/// The API socket of a VM: inside the jail root when the VM runs jailed.
pub fn api_sock(vm_dir: &Path) -> PathBuf {
    let jailed = vm_dir.join(ROOT_DIR).join(API_SOCK);
    if vm_dir.join(ROOT_DIR).is_dir() {
        jailed
    } else {
        vm_dir.join(API_SOCK)
    }
}
