//! System containers through the daemon: the same `corefour ct` containers (crates/container's
//! `System`, overlayfs over cached templates, bridge networking), kept in the inventory beside the
//! VMs, each run by a shim (see `shim`) in a cgroup under the daemon's own container parent.
//!
//! Lock order as for VMs: a container's operation lock is held across a whole verb; the inventory
//! and `running` mutexes only briefly inside it, never across an `.await`.

pub mod archive;
pub mod routes;
pub mod rows;
pub mod shim;
pub mod transfer;
mod verbs;
mod watch;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use corefour_api::{CtInfo, CtNet};
use corefour_container::system::System;
use corefour_container::ContainerError;

use crate::error::DaemonError;
use crate::lifecycle::{registry, Daemon, OpLocks, RunHandle, Running};
use rows::CtRecord;

pub use verbs::DEFAULT_STOP_TIMEOUT;

/// The daemon's container directory under its state directory.
pub const CT_DIR: &str = "cts";

/// Cgroup parent of the daemon's containers (VMs have their own).
const CGROUP_PARENT: &str = "corefour-cts";

pub struct Cts {
    d: Arc<Daemon>,
    base: PathBuf,
    cgroup_parent: String,
    /// The `corefour` binary that runs the shims.
    exe: PathBuf,
    running: Running,
    stop_requested: Mutex<HashSet<String>>,
    locks: OpLocks,
    /// Held while a template is built: the runtime builds in a directory named by pid, which
    /// two creates in this one process would share.
    template_build: tokio::sync::Mutex<()>,
}

impl Cts {
    /// Opens the container side of the daemon and reconciles it with the processes that run.
    pub async fn open(
        d: Arc<Daemon>,
        state_dir: &Path,
        exe: &Path,
    ) -> Result<Arc<Cts>, DaemonError> {
        // Not the daemonless default (/var/lib/corefour/ct): the two never share containers.
        let base = state_dir.join(CT_DIR);
        std::fs::create_dir_all(&base)
            .map_err(|e| DaemonError::io(format!("cannot create {}", base.display()), e))?;
        let cgroup_parent = match crate::lifecycle::host_tag(state_dir) {
            Some(t) => format!("{CGROUP_PARENT}-{t}"),
            None => CGROUP_PARENT.to_string(),
        };
        let cts = Arc::new(Cts {
            d,
            base,
            cgroup_parent,
            exe: exe.to_path_buf(),
            running: Mutex::new(HashMap::new()),
            stop_requested: Mutex::new(HashSet::new()),
            locks: Mutex::new(HashMap::new()),
            template_build: tokio::sync::Mutex::new(()),
        });
        cts.reconcile_all().await?;
        Ok(cts)
    }

    /// Called on a graceful exit: containers keep running, but an unused cgroup parent goes.
    pub fn shutdown(&self) {
        let mut roots: Vec<PathBuf> = corefour_container::cgroups::v1::hierarchies()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        roots.push(PathBuf::from(corefour_container::cgroups::CGROUP_ROOT));
        // rmdir fails while any container's cgroup is still inside: that is the point. A cgroup
        // whose last task is still exiting reads busy for a moment: a few retries for that.
        for r in roots {
            let dir = r.join(&self.cgroup_parent);
            for _ in 0..20 {
                match std::fs::remove_dir(&dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(25))
                    }
                    _ => break,
                }
            }
        }
    }

    /// The template-build lock when `template` is not cached yet (None when it is).
    async fn template_guard(&self, template: &str) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        let done = self.base.join("templates").join(template).join(".complete");
        if done.exists() {
            return None;
        }
        Some(self.template_build.lock().await)
    }

    pub fn sys(&self) -> System {
        System::with_cgroup_parent(&self.base, &self.cgroup_parent)
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    fn inv(&self) -> &crate::inventory::Inventory {
        self.d.inventory()
    }

    async fn op_lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        registry::op_lock(&self.locks, name).await
    }

    fn forget_lock(&self, name: &str) {
        registry::forget_lock(&self.locks, name)
    }

    fn handle(&self, name: &str) -> Option<RunHandle> {
        registry::handle(&self.running, name)
    }

    pub fn is_active(&self, name: &str) -> bool {
        self.handle(name).is_some()
    }

    pub fn info(&self, name: &str) -> Result<CtInfo, DaemonError> {
        Ok(self.to_info(self.inv().get_ct(name)?))
    }

    pub fn list(&self) -> Result<Vec<CtInfo>, DaemonError> {
        Ok(self
            .inv()
            .list_cts()?
            .into_iter()
            .map(|r| self.to_info(r))
            .collect())
    }

    pub fn console_path(&self, name: &str) -> Result<PathBuf, DaemonError> {
        self.inv().get_ct(name)?;
        Ok(self.sys().console_log(name))
    }

    fn to_info(&self, r: CtRecord) -> CtInfo {
        let sys = self.sys();
        let cfg = sys.load(&r.name).ok();
        let sock = sys.console_socket(&r.name);
        let running = r.state.is_active();
        CtInfo {
            state: r.state,
            template: r.spec.template.clone(),
            memory_bytes: r.spec.memory_bytes,
            cpu_quota_pct: r.spec.cpu_quota_pct,
            cpu_weight: r.spec.cpu_weight,
            pids: r.spec.pids,
            net: cfg.as_ref().and_then(|c| {
                c.net.as_ref().map(|n| CtNet {
                    bridge: n.bridge.bridge.clone(),
                    subnet: n.bridge.subnet.clone(),
                })
            }),
            address: cfg
                .as_ref()
                .and_then(|c| c.net.as_ref().map(|n| n.address.to_string())),
            pid: r.pids.map(|p| p.vmm_pid).filter(|_| running),
            rootfs: sys.dir(&r.name).join("rootfs").display().to_string(),
            console_socket: (running && sock.exists()).then(|| sock.display().to_string()),
            runtime_dir: self.base.display().to_string(),
            stop_reason: r.stop_reason,
            exit_code: r.exit_code,
            created_ms: r.created_ms,
            name: r.name,
        }
    }
}

/// The container runtime's errors as API errors: the caller's mistakes as 4xx, the host's as 500.
pub(crate) fn ct_error(e: ContainerError) -> DaemonError {
    match e {
        ContainerError::NotFound(n) => {
            DaemonError::NotFound(format!("the container {n:?} has no files on this host"))
        }
        ContainerError::BadId(_) => DaemonError::BadRequest(e.to_string()),
        ContainerError::WrongStatus { .. } | ContainerError::Exists { .. } => {
            DaemonError::Conflict(e.to_string())
        }
        other => DaemonError::Container(other.to_string()),
    }
}

/// Runs blocking container work (file system, `ip`, clone) off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DaemonError> + Send + 'static,
) -> Result<T, DaemonError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DaemonError::Container(format!("container task failed: {e}")))?
}
