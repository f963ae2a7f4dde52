//! The last steps before exec: rlimits, oom_score_adj, user and groups, umask, cwd, and the
//! executable looked up in the container's PATH.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::resource::{setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
use oci_spec::runtime::{PosixRlimit, PosixRlimitType, Process};

use crate::ContainerError;

fn resource(t: PosixRlimitType) -> Resource {
    match t {
        PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
    }
}

pub fn set_rlimits(limits: &[PosixRlimit]) -> Result<(), ContainerError> {
    for l in limits {
        setrlimit(resource(l.typ()), l.soft(), l.hard())
            .map_err(|e| ContainerError::sys(format!("setrlimit {:?}", l.typ()), e))?;
    }
    Ok(())
}

pub fn set_oom_score_adj(v: i32) -> Result<(), ContainerError> {
    crate::util::write_file(Path::new("/proc/self/oom_score_adj"), &v.to_string())
        .map_err(|e| ContainerError::io("write /proc/self/oom_score_adj", e))
}

/// Switches to the process user, keeping capabilities across the switch (they are set after).
pub fn set_user(p: &Process) -> Result<(), ContainerError> {
    let u = p.user();
    // SAFETY: prctl(PR_SET_KEEPCAPS) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(ContainerError::sys(
            "prctl(PR_SET_KEEPCAPS)",
            nix::Error::last(),
        ));
    }
    let groups: Vec<Gid> = u
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    // setgroups is denied in a user namespace whose setgroups file says deny; only fail if asked for groups.
    if let Err(e) = setgroups(&groups) {
        if !groups.is_empty() {
            return Err(ContainerError::sys("setgroups", e));
        }
    }
    let gid = Gid::from_raw(u.gid());
    setresgid(gid, gid, gid).map_err(|e| ContainerError::sys(format!("setgid {}", u.gid()), e))?;
    let uid = Uid::from_raw(u.uid());
    setresuid(uid, uid, uid).map_err(|e| ContainerError::sys(format!("setuid {}", u.uid()), e))?;
    if let Some(m) = u.umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(m));
    }
    Ok(())
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `args[0]` the way execvp would, in the container's PATH (after pivot_root).
pub fn find_executable(arg0: &str, env: &[String]) -> Result<PathBuf, ContainerError> {
    if arg0.contains('/') {
        let p = PathBuf::from(arg0);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(ContainerError::Init(format!(
                "exec: {arg0:?}: no such executable in the container"
            )))
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(arg0))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            ContainerError::Init(format!(
                "exec: {arg0:?}: executable file not found in $PATH"
            ))
        })
}

pub fn cstrings(v: &[String]) -> Result<Vec<CString>, ContainerError> {
    v.iter()
        .map(|s| {
            CString::new(s.as_bytes()).map_err(|_| {
                ContainerError::Init(format!("argument or env {s:?} contains a NUL byte"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup() {
        assert_eq!(
            find_executable("sh", &["PATH=/nonexistent:/bin".into()]).unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert!(find_executable("definitely-not-here-xyz", &[]).is_err());
        assert!(find_executable("/etc/passwd", &[]).is_err());
        assert!(cstrings(&["a\0b".into()]).is_err());
    }
}
