//! The daemon's state and the lifecycle verbs, one file per verb.
//!
//! Lock order: a VM's operation lock (`Daemon::op_lock`) is taken first and held across the whole
//! verb; the inventory mutex and the `running` map mutex are only ever held briefly inside it and
//! never across an `.await`.

mod create;
mod delete;
mod pause;
mod pin;
mod proc;
mod reconcile;
pub(crate) mod registry;
mod set;
mod start;
mod stop;
mod vm_clone;
mod vm_migrate;
mod vm_restore;
mod vm_snapshot;
mod warm_pool;

pub use vm_clone::CloneRequest;
pub use vm_migrate::{
    check_listen, incoming_token_file, serve_migrations, take_incoming_marker, KeyError,
    MigrateRequest, MigrationKey, DEFAULT_MIGRATION_PORT,
};
pub use vm_restore::{take_restore_marker, RestoreRequest};
pub use vm_snapshot::SnapshotRequest;
pub use warm_pool::{run_shim as run_warm_shim, WarmPoolConfig, WarmShape};

pub use stop::DEFAULT_STOP_TIMEOUT;
mod watch;
pub(crate) use registry::{OpLocks, RunHandle, Running};
pub(crate) use stop::{kill_and_wait, signal, wait_or_kill};
pub(crate) use watch::wait_pid;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use corefour_api::{VmInfo, VmState};

use crate::cgroup::Cgroups;
use crate::error::DaemonError;
use crate::inventory::{Inventory, VmRecord};

pub use proc::{process_alive, start_time};

/// How the daemon runs: where it keeps state, and how it starts VMMs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub state_dir: PathBuf,
    /// The `corefour` binary that runs the shim.
    pub exe: PathBuf,
    /// The binary run as `VMM_EXE vmm --config ... --api-sock ...` (normally `exe` itself).
    pub vmm_exe: PathBuf,
    /// Run each VMM jailed (chroot, namespaces, unprivileged uid): see `jail`.
    pub jail: bool,
    /// Warm VMMs kept for restores (see `warm_pool`).
    pub warm_pool: WarmPoolConfig,
    /// The shared secret migrations in and out must prove (`vm_migrate::auth`).
    pub migration_key: Option<MigrationKey>,
}

pub struct Daemon {
    cfg: DaemonConfig,
    inv: Inventory,
    cgroups: Option<Cgroups>,
    running: Running,
    /// VMs whose exit the daemon asked for (`stop`), so exit code 0 reads "shut down on request".
    stop_requested: Mutex<std::collections::HashSet<String>>,
    locks: OpLocks,
    warm: warm_pool::WarmPool,
}

/// The cgroup parent directory of VMs (the container runtime uses its own).
const CGROUP_PARENT: &str = "corefour-vms";

/// Host-global names (cgroups, taps) of a daemon with a non-default state directory carry a short
/// tag of that directory, so two daemons (as tests run them) never collide.
pub(crate) fn host_tag(state_dir: &Path) -> Option<String> {
    if state_dir == Path::new(crate::DEFAULT_STATE_DIR) {
        return None;
    }
    // FNV-1a: a stable, dependency-free hash; collisions only cost a clearer error from `ip`.
    let h = state_dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    Some(format!("{:04x}", h & 0xffff))
}

impl Daemon {
    /// Opens the inventory and finds the VMs that were running when the daemon last stopped.
    pub async fn open(cfg: DaemonConfig) -> Result<Arc<Daemon>, DaemonError> {
        std::fs::create_dir_all(cfg.state_dir.join("vms")).map_err(|e| {
            DaemonError::io(format!("cannot create {}", cfg.state_dir.display()), e)
        })?;
        let tag = host_tag(&cfg.state_dir);
        let inv = Inventory::open(
            &cfg.state_dir.join("inventory.db"),
            &format!("c4{}", tag.as_deref().unwrap_or("")),
        )?;
        let parent = match &tag {
            Some(t) => format!("{CGROUP_PARENT}-{t}"),
            None => CGROUP_PARENT.to_string(),
        };
        // Probe that cgroups can be made here; the parent is made again on each start and removed
        // when the daemon exits, so it does not outlive its VMs.
        let cgroups = Cgroups::detect(&parent).and_then(|c| match c.prepare() {
            Ok(()) => {
                c.remove_parent();
                Some(c)
            }
            Err(e) => {
                tracing::warn!("cgroups unavailable, VMs run without CPU/memory limits: {e}");
                None
            }
        });
        if let Some(c) = &cgroups {
            tracing::info!("VM cgroups: v{}", c.version());
        }
        let warm = warm_pool::WarmPool::new(&cfg.state_dir, cfg.warm_pool.clone());
        let d = Arc::new(Daemon {
            cfg,
            inv,
            cgroups,
            running: Mutex::new(HashMap::new()),
            stop_requested: Mutex::new(Default::default()),
            locks: Mutex::new(HashMap::new()),
            warm,
        });
        d.reconcile_all().await?;
        d.refill_warm_pool();
        Ok(d)
    }

    /// Called on a graceful exit: VMs keep running, but an unused cgroup parent goes.
    pub fn shutdown(&self) {
        self.warm.shutdown();
        if let Some(c) = &self.cgroups {
            c.remove_parent();
        }
    }

    pub fn inventory(&self) -> &Inventory {
        &self.inv
    }

    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.cfg.state_dir.join("vms").join(name)
    }

    /// The per-VM lock every verb holds, so two verbs on one VM never interleave.
    async fn op_lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        registry::op_lock(&self.locks, name).await
    }

    fn forget_lock(&self, name: &str) {
        registry::forget_lock(&self.locks, name)
    }

    fn handle(&self, name: &str) -> Option<RunHandle> {
        registry::handle(&self.running, name)
    }

    pub fn info(&self, name: &str) -> Result<VmInfo, DaemonError> {
        Ok(to_info(self.inv.get_vm(name)?))
    }

    pub fn list(&self) -> Result<Vec<VmInfo>, DaemonError> {
        Ok(self.inv.list_vms()?.into_iter().map(to_info).collect())
    }

    pub fn console_path(&self, name: &str) -> Result<PathBuf, DaemonError> {
        self.inv.get_vm(name)?;
        Ok(self.vm_dir(name).join(crate::shim::CONSOLE_LOG))
    }

    /// Whether the VM's VMM is (as far as the daemon knows) still running.
    pub fn is_active(&self, name: &str) -> bool {
        self.handle(name).is_some()
    }

    fn api_sock(&self, name: &str) -> PathBuf {
        crate::jail::api_sock(&self.vm_dir(name))
    }
}

pub fn to_info(r: VmRecord) -> VmInfo {
    VmInfo {
        pid: r.pids.map(|p| p.vmm_pid),
        name: r.name,
        state: r.state,
        kernel: r.spec.kernel,
        cmdline: r.spec.cmdline,
        initrd: r.spec.initrd,
        vcpus: r.spec.vcpus,
        memory_mib: r.spec.memory_mib,
        balloon_mib: r.spec.balloon_mib,
        backend: r.spec.backend,
        cpu_pin: r.spec.cpu_pin,
        cpu_quota_pct: r.spec.cpu_quota_pct,
        cpu_weight: r.spec.cpu_weight,
        disks: r.spec.disks,
        nics: r.nics,
        stop_reason: r.stop_reason,
        exit_code: r.exit_code,
        created_ms: r.created_ms,
    }
}

fn active_conflict(name: &str, state: VmState, verb: &str) -> DaemonError {
    DaemonError::Conflict(format!("VM {name:?} is {state}: cannot {verb} it"))
}

fn remove_dir_if_exists(p: &Path) -> Result<(), DaemonError> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DaemonError::io(format!("cannot remove {}", p.display()), e)),
    }
}
