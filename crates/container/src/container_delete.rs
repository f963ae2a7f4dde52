//! `delete`: stop what is left (with force), remove the cgroup, run poststop, drop the state.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use crate::cgroups::CgroupManager;
use crate::state::{ContainerState, Status};
use crate::ContainerError;

/// Waits until `pid` exits (pidfd becomes readable), up to `timeout`. False on timeout.
pub fn wait_exit(pid: i32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return true; // already gone
    }
    // SAFETY: the fd was just returned by pidfd_open and is owned only here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    r != 0
}

pub fn delete(root: &Path, id: &str, force: bool) -> Result<(), ContainerError> {
    if !crate::state::validate_id(id) {
        return Err(ContainerError::BadId(id.into()));
    }
    let dir = ContainerState::dir(root, id);
    let mut st = match ContainerState::load(root, id) {
        Ok(Some(st)) => st,
        Ok(None) => {
            // A directory left by a crashed create: force removes it.
            if force && dir.exists() {
                let _ = std::fs::remove_dir_all(&dir);
                return Ok(());
            }
            return Err(ContainerError::NotFound(id.into()));
        }
        Err(e) if force => {
            // Nothing in it can be trusted (no PID, no cgroup path): drop the directory.
            eprintln!("corefour: warning: {e}; removing {}", dir.display());
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    st.refresh_in(root);
    match st.oci.status {
        Status::Running | Status::Paused if !force => {
            return Err(ContainerError::WrongStatus {
                id: id.into(),
                status: st.oci.status.to_string(),
                what: "stop it first or use `delete --force`".into(),
            })
        }
        _ => {}
    }
    let cg = crate::cgroups::manager(&st.cgroup)?;
    if st.oci.status != Status::Stopped {
        // SAFETY: kill(2) on the recorded init, verified alive by refresh().
        unsafe { libc::kill(st.oci.pid, libc::SIGKILL) };
        if st.oci.status == Status::Paused {
            let _ = cg.freeze(false);
        }
        if !wait_exit(st.oci.pid, Duration::from_secs(10)) {
            return Err(ContainerError::Init(format!(
                "init {} did not die after SIGKILL",
                st.oci.pid
            )));
        }
    }
    // Without a PID namespace the init's death does not take its children with it.
    if let Ok(pids) = cg.pids() {
        for p in pids {
            // SAFETY: kill(2) with a pid read from the container's own cgroup.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
    cg.remove()?;
    if let Some(h) = st.hooks.as_ref().and_then(|h| h.poststop().clone()) {
        st.oci.status = Status::Stopped;
        if let Err(e) = crate::hooks::run("poststop", &h, &st.oci) {
            eprintln!("corefour: warning: {e}");
        }
    }
    std::fs::remove_dir_all(&dir)
        .map_err(|e| ContainerError::io(format!("remove {}", dir.display()), e))
}
