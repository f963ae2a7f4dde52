//! The shim: one small process per running VM that starts the VMM, waits for it and records how it
//! ended in the VM's directory.
//!
//! The daemon can be restarted or killed while VMs run; a process that is not its child cannot be
//! waited for, so without the shim an exit code would be lost. The shim writes `exit` (atomically,
//! by rename) and the daemon, current or restarted, reads it.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

pub const EXIT_FILE: &str = "exit";
pub const CONFIG_FILE: &str = "vm.json";
pub const API_SOCK: &str = "vmm.sock";
pub const CONSOLE_LOG: &str = "console.log";
/// "SHIM_PID SHIM_START VMM_PID", written by the shim once the VMM runs.
pub const PIDS_FILE: &str = "pids";

/// The pids a shim recorded in `vm_dir`, if any.
pub fn read_pids(vm_dir: &Path) -> Option<crate::inventory::Pids> {
    let text = std::fs::read_to_string(vm_dir.join(PIDS_FILE)).ok()?;
    let mut f = text.split_whitespace();
    Some(crate::inventory::Pids {
        shim_pid: f.next()?.parse().ok()?,
        shim_start: f.next()?.parse().ok()?,
        vmm_pid: f.next()?.parse().ok()?,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("cannot open the console log {path}: {source}")]
    Console {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the VMM {exe}: {source}")]
    Spawn {
        exe: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot join the VM's cgroup through {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    #[error("cannot make a PID namespace for the jailed VMM: {0}")]
    Namespace(#[source] std::io::Error),
    #[error("cannot wait for the VMM: {0}")]
    Wait(#[source] std::io::Error),
    #[error("cannot record the VMM's exit status in {path}: {source}")]
    Record {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a VMM ended, as the shim recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitRecord {
    /// A sentence for `stop_reason`, from the VMM contract's exit codes.
    pub fn reason(&self) -> String {
        match (self.code, self.signal) {
            (Some(0), _) => "guest exited with code 0".to_string(),
            (Some(1), _) => "VMM error (exit code 1): see the console log".to_string(),
            (Some(2), _) => "guest reset or triple fault (exit code 2)".to_string(),
            (Some(3), _) => "VMM timeout (exit code 3)".to_string(),
            (Some(c), _) => format!("guest exited with code {c}"),
            (None, Some(9)) => "killed by signal 9 (SIGKILL)".to_string(),
            (None, Some(15)) => "killed by signal 15 (SIGTERM)".to_string(),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "exited with an unknown status".to_string(),
        }
    }
}

/// Marks every fd from 3 up close-on-exec, so nothing the parent inherited (a build's jobserver
/// pipe, a caller's sockets) leaks into a VMM. Async-signal-safe: one syscall.
pub fn cloexec_from_3() {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range takes plain integers; with CLOEXEC it only sets a flag on open fds.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
    }
}

pub fn read_exit(vm_dir: &Path) -> Option<ExitRecord> {
    let text = std::fs::read_to_string(vm_dir.join(EXIT_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Runs in the shim process: starts `vmm_exe vmm --config vm.json --api-sock vmm.sock` with its
/// output appended to console.log, reports the VMM pid on stdout (a pipe to the daemon), waits,
/// and records the exit. Returns the shim's own exit code.
pub fn run(
    vm_dir: &Path,
    vmm_exe: &Path,
    jail_uid: Option<u32>,
    cgroup_procs: &[PathBuf],
) -> Result<i32, ShimError> {
    // Its own session: no terminal or process-group signal aimed at the daemon reaches the VM.
    // SAFETY: setsid has no preconditions; failing (already a group leader) changes nothing.
    unsafe {
        libc::setsid();
    }
    cloexec_from_3();
    for p in cgroup_procs {
        std::fs::write(p, std::process::id().to_string()).map_err(|source| ShimError::Cgroup {
            path: p.display().to_string(),
            source,
        })?;
    }
    // The shim outlives terminal hang-ups and a daemon's Ctrl-C: it must record the exit.
    // SAFETY: setting signal dispositions to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let console_path = vm_dir.join(CONSOLE_LOG);
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&console_path)
        .map_err(|source| ShimError::Console {
            path: console_path.display().to_string(),
            source,
        })?;
    let console2 = console.try_clone().map_err(|source| ShimError::Console {
        path: console_path.display().to_string(),
        source,
    })?;
    let _ = std::fs::remove_file(vm_dir.join(EXIT_FILE));
    let jail = match jail_uid {
        Some(uid) => {
            let j = crate::jail::prepare(vm_dir, vmm_exe, uid)?;
            crate::jail::new_pid_namespace().map_err(ShimError::Namespace)?;
            Some(j)
        }
        None => None,
    };
    let mut cmd = match &jail {
        Some(j) => {
            let mut c = Command::new(&j.exe_inside);
            c.arg("vmm")
                .arg("--config")
                .arg(&j.config_inside)
                .arg("--api-sock")
                .arg(&j.sock_inside);
            c
        }
        None => {
            let mut c = Command::new(vmm_exe);
            c.arg("vmm");
            if let Some(addr) = crate::lifecycle::take_incoming_marker(vm_dir) {
                // The config gives this host's disk paths and taps.
                c.arg("--incoming")
                    .arg(addr)
                    .arg("--config")
                    .arg(vm_dir.join(CONFIG_FILE));
                if let Some(t) = crate::lifecycle::incoming_token_file(vm_dir) {
                    c.arg("--incoming-token").arg(t);
                }
            } else {
                match crate::lifecycle::take_restore_marker(vm_dir) {
                    Some(snap) => c.arg("--restore").arg(snap),
                    None => c.arg("--config").arg(vm_dir.join(CONFIG_FILE)),
                };
            }
            c.arg("--api-sock").arg(vm_dir.join(API_SOCK));
            c
        }
    };
    cmd.stdin(Stdio::null()).stdout(console).stderr(console2);
    // The VMM gets default signal dispositions back (SIGTERM means graceful shutdown to it).
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe `signal`.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            cloexec_from_3();
            Ok(())
        });
    }
    if let Some(j) = jail {
        // SAFETY: `enter` only makes raw syscalls on data prepared before the fork (see jail.rs).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || j.enter());
        }
    }
    // Last: the filter denies the mount/chroot calls the jail needs.
    crate::seccomp::apply_to(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| ShimError::Spawn {
        exe: vmm_exe.display().to_string(),
        source,
    })?;
    // For a daemon that dies before it records this start: the next one adopts the VM from here.
    let me = std::process::id() as i32;
    let pids = format!(
        "{me} {} {}\n",
        crate::lifecycle::start_time(me).unwrap_or(0),
        child.id()
    );
    let _ = std::fs::write(vm_dir.join(PIDS_FILE), pids);
    {
        let mut out = std::io::stdout().lock();
        // The daemon may have died meanwhile; the VM runs on regardless.
        let _ = writeln!(out, "{}", child.id());
        let _ = out.flush();
    }
    let status = child.wait().map_err(ShimError::Wait)?;
    let rec = ExitRecord {
        code: status.code(),
        signal: status.signal(),
    };
    let tmp = vm_dir.join("exit.tmp");
    let record_err = |source| ShimError::Record {
        path: vm_dir.join(EXIT_FILE).display().to_string(),
        source,
    };
    let json = serde_json::to_vec(&rec).unwrap_or_default();
    std::fs::write(&tmp, json).map_err(record_err)?;
    std::fs::rename(&tmp, vm_dir.join(EXIT_FILE)).map_err(record_err)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons() {
        let r = |code, signal| ExitRecord { code, signal }.reason();
        assert_eq!(r(Some(0), None), "guest exited with code 0");
        assert!(r(Some(1), None).contains("VMM error"));
        assert!(r(Some(2), None).contains("triple fault"));
        assert!(r(Some(3), None).contains("timeout"));
        assert_eq!(r(Some(42), None), "guest exited with code 42");
        assert!(r(None, Some(9)).contains("SIGKILL"));
    }
}
