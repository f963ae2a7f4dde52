//! The container shim: one small process per running container. It starts the container (so the
//! init is its child and its exit status can be had), reports the init's pid on stdout, waits,
//! records how the init ended in `exit.json`, and removes what the run left (runtime state,
//! cgroup, netns, overlay mount). A daemon restarted or killed meanwhile finds the record.

use std::io::Write;
use std::path::Path;

use corefour_container::system::System;
use serde::{Deserialize, Serialize};

pub const EXIT_FILE: &str = "exit.json";
pub const PIDS_FILE: &str = "shim.pids";
pub const SHIM_LOG: &str = "shim.log";

#[derive(Debug, thiserror::Error)]
pub enum CtShimError {
    #[error("cannot start container {name}: {source}")]
    Start {
        name: String,
        #[source]
        source: corefour_container::ContainerError,
    },
    #[error("cannot wait for the container's init: {0}")]
    Wait(#[source] std::io::Error),
    #[error("cannot record the container's exit in {path}: {source}")]
    Record {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// How the init ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl CtExit {
    pub fn reason(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("init exited with code {c}"),
            // The kernel ends a PID namespace whose init called reboot(2) with these signals.
            (None, Some(libc::SIGHUP)) => "init rebooted the container (reboot)".to_string(),
            (None, Some(libc::SIGINT)) => {
                "init powered the container off (halt/poweroff)".to_string()
            }
            (None, Some(s)) => format!("init killed by signal {s} ({})", signal_name(s)),
            (None, None) => "init ended (no status)".to_string(),
        }
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGQUIT => "SIGQUIT",
        _ => "signal",
    }
}

pub fn read_exit(ct_dir: &Path) -> Option<CtExit> {
    serde_json::from_slice(&std::fs::read(ct_dir.join(EXIT_FILE)).ok()?).ok()
}

/// Shim pid, its start time, init pid: written before the pid is reported, so a daemon that dies
/// in between adopts the container from here.
pub fn read_pids(ct_dir: &Path) -> Option<crate::inventory::Pids> {
    let text = std::fs::read_to_string(ct_dir.join(PIDS_FILE)).ok()?;
    let mut f = text.split_whitespace().map(|s| s.parse::<i64>().ok());
    Some(crate::inventory::Pids {
        shim_pid: i32::try_from(f.next()??).ok()?,
        shim_start: u64::try_from(f.next()??).ok()?,
        vmm_pid: i32::try_from(f.next()??).ok()?,
    })
}

/// Runs in the shim process (`corefour ct shim`). Returns the shim's exit code.
pub fn run(base: &Path, cgroup_parent: &str, name: &str) -> Result<i32, CtShimError> {
    // Its own session: a terminal or process-group signal aimed at the daemon does not reach the
    // container. Signal dispositions stay default: the container's processes inherit them.
    // SAFETY: setsid has no preconditions; failing (already a group leader) changes nothing.
    unsafe {
        libc::setsid();
    }
    crate::shim::cloexec_from_3();
    let sys = System::with_cgroup_parent(base, cgroup_parent);
    let dir = sys.dir(name);
    let _ = std::fs::remove_file(dir.join(EXIT_FILE));
    let pid = sys.start(name).map_err(|source| CtShimError::Start {
        name: name.to_string(),
        source,
    })?;
    let me = std::process::id() as i32;
    let line = format!(
        "{me} {} {pid}\n",
        crate::lifecycle::start_time(me).unwrap_or(0)
    );
    let _ = std::fs::write(dir.join(PIDS_FILE), line);
    {
        let mut out = std::io::stdout().lock();
        // The daemon may have died meanwhile; the container runs on regardless.
        let _ = writeln!(out, "{pid}");
        let _ = out.flush();
    }
    let exit = wait(pid)?;
    let tmp = dir.join(".exit.json.tmp");
    let record_err = |source| CtShimError::Record {
        path: dir.join(EXIT_FILE).display().to_string(),
        source,
    };
    // Clean up first, record last: a daemon that sees the record finds the container gone.
    if let Err(e) = sys.cleanup(name) {
        eprintln!("corefour ct shim: cleanup of {name} failed: {e}");
    }
    let _ = std::fs::remove_file(dir.join(PIDS_FILE));
    std::fs::write(&tmp, serde_json::to_vec(&exit).unwrap_or_default()).map_err(record_err)?;
    std::fs::rename(&tmp, dir.join(EXIT_FILE)).map_err(record_err)?;
    Ok(0)
}

fn wait(pid: i32) -> Result<CtExit, CtShimError> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(CtShimError::Wait(e));
        }
    }
    Ok(if libc::WIFEXITED(status) {
        CtExit {
            code: Some(libc::WEXITSTATUS(status)),
            signal: None,
        }
    } else {
        CtExit {
            code: None,
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_pids_file() {
        let r = |code, signal| CtExit { code, signal }.reason();
        assert_eq!(r(Some(0), None), "init exited with code 0");
        assert!(r(None, Some(9)).contains("SIGKILL"));
        assert!(r(None, Some(libc::SIGHUP)).contains("reboot"));
        let t = tempfile::tempdir().unwrap();
        assert!(read_pids(t.path()).is_none());
        std::fs::write(t.path().join(PIDS_FILE), "12 34 56\n").unwrap();
        let p = read_pids(t.path()).unwrap();
        assert_eq!((p.shim_pid, p.shim_start, p.vmm_pid), (12, 34, 56));
        std::fs::write(t.path().join(PIDS_FILE), "12 x").unwrap();
        assert!(read_pids(t.path()).is_none());
    }
}
