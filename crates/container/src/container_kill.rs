//! `kill`: send a signal to the init (or, with `all`, to every process in the cgroup).

use std::path::Path;

use nix::sys::signal::{kill as sys_kill, Signal};
use nix::unistd::Pid;

use crate::cgroups::CgroupManager;
use crate::state::Status;
use crate::ContainerError;

pub fn kill(root: &Path, id: &str, sig: i32, all: bool) -> Result<(), ContainerError> {
    let st = crate::container_state::load(root, id)?;
    if st.oci.status == Status::Stopped {
        return Err(ContainerError::WrongStatus {
            id: id.into(),
            status: "stopped".into(),
            what: "there is no process to signal".into(),
        });
    }
    let signal = Signal::try_from(sig).ok();
    let send = |pid: i32| -> Result<(), nix::Error> {
        // Real-time signals have no `Signal` variant: fall back to libc.
        match signal {
            Some(s) => sys_kill(Pid::from_raw(pid), s),
            // SAFETY: kill(2) with a plain pid and signal number.
            None => nix::Error::result(unsafe { libc::kill(pid, sig) }).map(drop),
        }
    };
    if all {
        let cg = crate::cgroups::manager(&st.cgroup)?;
        for pid in cg.pids()? {
            match send(pid) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(e) => return Err(ContainerError::sys(format!("kill {pid}"), e)),
            }
        }
        return Ok(());
    }
    send(st.oci.pid).map_err(|e| ContainerError::sys(format!("kill {}", st.oci.pid), e))
}
