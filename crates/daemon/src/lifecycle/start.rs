//! `POST /v1/vms/{name}/start`: cgroup, taps, config file, then the shim that runs the VMM.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use corefour_api::VmInfo;
use tokio::io::AsyncBufReadExt;

use super::watch::Watched;
use super::{active_conflict, proc, registry, Daemon};
use crate::cgroup::{Limits, VmCgroup};
use crate::error::DaemonError;
use crate::inventory::{Pids, VmRecord};
use crate::network;
use crate::shim;

/// Memory the VMM process needs beyond guest RAM (its binary, page tables, device buffers).
pub(super) fn memory_overhead_bytes(guest_mib: u64) -> u64 {
    (128 << 20).max((guest_mib << 20) / 8)
}

impl Daemon {
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmInfo, DaemonError> {
        let _g = self.op_lock(name).await;
        let rec = self.inv.get_vm(name)?;
        if rec.state.is_active() || self.is_active(name) {
            return Err(active_conflict(name, rec.state, "start"));
        }
        let dir = self.vm_dir(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| DaemonError::io(format!("cannot create {}", dir.display()), e))?;
        let cfg_path = dir.join(shim::CONFIG_FILE);
        std::fs::write(&cfg_path, crate::vmm_config::render(&rec))
            .map_err(|e| DaemonError::io(format!("cannot write {}", cfg_path.display()), e))?;
        let _ = std::fs::remove_file(dir.join(shim::API_SOCK));
        let _ = std::fs::remove_file(dir.join(shim::PIDS_FILE));
        // A jail left from an earlier run (also when this daemon does not jail) goes.
        crate::jail::remove_root(&dir).map_err(|e| DaemonError::Start {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        let jail_uid = self
            .cfg
            .jail
            .then(|| crate::jail::JAIL_ID_BASE + u32::try_from(rec.id).unwrap_or(0));

        let cgroup = self.make_cgroup(&rec)?;
        let mut taps = Vec::new();
        for nic in &rec.nics {
            if let Err(e) = network::create_tap(&nic.tap, &nic.bridge, jail_uid) {
                taps.iter().for_each(|t: &&str| network::delete_tap(t));
                if let Some(c) = &cgroup {
                    c.remove();
                }
                return Err(e.into());
            }
            taps.push(nic.tap.as_str());
        }
        match self.spawn_shim(&dir, cgroup.as_ref(), jail_uid).await {
            Ok((child, pids)) => {
                self.inv.set_running(name, pids)?;
                let tx = registry::track(&self.running, name, pids.vmm_pid);
                self.spawn_watcher(name.to_string(), Watched::Child(child), tx);
                super::pin::spawn_pinner(
                    name.to_string(),
                    pids.vmm_pid,
                    rec.spec.cpu_pin.clone(),
                    rec.spec.vcpus,
                );
                tracing::info!(vm = name, vmm_pid = pids.vmm_pid, "started");
                self.info(name)
            }
            Err(e) => {
                taps.iter().for_each(|t| network::delete_tap(t));
                if let Some(c) = &cgroup {
                    c.remove();
                }
                let reason = e.to_string();
                let _ = self.inv.set_stopped(name, &reason, None);
                Err(e)
            }
        }
    }

    /// The VM's cgroup with its limits; None when the host has no usable cgroups and the VM asks
    /// for no limit (with a limit asked for, that is an error).
    pub(super) fn make_cgroup(&self, rec: &VmRecord) -> Result<Option<VmCgroup>, DaemonError> {
        let wants_limits = rec.spec.cpu_quota_pct.is_some()
            || rec.spec.cpu_weight.is_some()
            || !rec.spec.cpu_pin.is_empty();
        let Some(cgs) = &self.cgroups else {
            if wants_limits {
                return Err(DaemonError::Conflict(format!(
                    "VM {:?} asks for CPU limits or pinning, but this host has no usable cgroups",
                    rec.name
                )));
            }
            return Ok(None);
        };
        cgs.prepare()?;
        let cg = cgs.vm(&rec.name);
        let limits = Limits {
            cpu_quota_pct: rec.spec.cpu_quota_pct,
            cpu_weight: rec.spec.cpu_weight,
            cpus: rec.spec.cpu_pin.clone(),
            memory_bytes: Some(
                (rec.spec.memory_mib << 20) + memory_overhead_bytes(rec.spec.memory_mib),
            ),
        };
        cg.create(&limits)?;
        Ok(Some(cg))
    }

    /// Starts `corefour daemon --vmm-shim DIR` in its own session and cgroup, and reads the VMM's
    /// pid from its stdout.
    pub(super) async fn spawn_shim(
        &self,
        dir: &Path,
        cgroup: Option<&VmCgroup>,
        jail_uid: Option<u32>,
    ) -> Result<(tokio::process::Child, Pids), DaemonError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let start_err = |message: String| DaemonError::Start {
            name: name.clone(),
            message,
        };
        let console_path = dir.join(shim::CONSOLE_LOG);
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_path)
            .map_err(|e| DaemonError::io(format!("cannot open {}", console_path.display()), e))?;
        // No pre_exec hook here: without one, std spawns with posix_spawn (vfork-like) instead of
        // fork()ing the whole multi-threaded daemon. The shim makes its own session and joins the
        // VM's cgroup itself, before it starts the VMM, so the VMM is inside from its first
        // instruction.
        let mut cmd = tokio::process::Command::new(&self.cfg.exe);
        cmd.arg("daemon")
            .arg("--vmm-shim")
            .arg(dir)
            .arg("--vmm-binary")
            .arg(&self.cfg.vmm_exe);
        if let Some(uid) = jail_uid {
            cmd.arg("--jail-uid").arg(uid.to_string());
        }
        if let Some(cg) = cgroup {
            for p in cg.paths() {
                cmd.arg("--cgroup-procs").arg(p.join("cgroup.procs"));
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(console)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| start_err(format!("cannot run {}: {e}", self.cfg.exe.display())))?;
        let shim_pid = child.id().map(|p| p as i32).unwrap_or(0);
        let Some(stdout) = child.stdout.take() else {
            return Err(start_err("the shim has no stdout pipe".into()));
        };
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(stdout);
        let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await;
        let vmm_pid = match read {
            Ok(Ok(n)) if n > 0 => line.trim().parse::<i32>().ok(),
            _ => None,
        };
        let Some(vmm_pid) = vmm_pid else {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let tail = console_tail(&console_path);
            return Err(start_err(if tail.is_empty() {
                "the shim exited before starting the VMM".to_string()
            } else {
                tail
            }));
        };
        let shim_start = proc::start_time(shim_pid).unwrap_or(0);
        Ok((
            child,
            Pids {
                shim_pid,
                shim_start,
                vmm_pid,
            },
        ))
    }
}

/// The last non-empty line of the console log (where a failing VMM or shim says why).
pub(super) fn console_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(4096);
    String::from_utf8_lossy(&text[start..])
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}
