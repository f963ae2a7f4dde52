//! The container verbs: create, start, stop, kill, delete, set.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use corefour_api::{CtCreate, CtInfo, CtLimits, VmState};
use corefour_container::network::BridgeConfig;
use corefour_container::system::{CreateRequest, LimitChange};
use tokio::io::AsyncBufReadExt;

use super::watch::Watched;
use super::{blocking, ct_error, Cts};
use crate::error::DaemonError;
use crate::inventory::{InventoryError, Pids};
use crate::lifecycle::{kill_and_wait, registry, signal, wait_or_kill, RunHandle};

pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the shim may take to report the init's pid (mount, netns, clone, exec).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Range checks shared by create and set.
fn check_limits(
    quota: Option<u32>,
    weight: Option<u32>,
    mem: Option<i64>,
    pids: Option<i64>,
    zero_ok: bool,
) -> Result<(), DaemonError> {
    let bad = DaemonError::BadRequest;
    if let Some(q) = quota.filter(|&q| !(zero_ok && q == 0)) {
        if !(1..=102_400).contains(&q) {
            return Err(bad(format!(
                "cpu_quota_pct {q}: use 1..102400 (percent of one CPU)"
            )));
        }
    }
    if let Some(w) = weight.filter(|&w| !(zero_ok && w == 0)) {
        if !(1..=10_000).contains(&w) {
            return Err(bad(format!(
                "cpu_weight {w}: use 1..10000 (100 is the default)"
            )));
        }
    }
    if let Some(m) = mem.filter(|&m| !(zero_ok && m == 0)) {
        if m < (4 << 20) {
            return Err(bad(format!(
                "memory_bytes {m}: use at least 4 MiB (4194304)"
            )));
        }
    }
    if let Some(p) = pids.filter(|&p| !(zero_ok && p == 0)) {
        if p < 1 {
            return Err(bad(format!("pids {p}: use a positive number")));
        }
    }
    Ok(())
}

pub(super) fn create_request(spec: &CtCreate) -> CreateRequest {
    CreateRequest {
        name: spec.name.clone(),
        template: spec.template.clone(),
        memory: spec.memory_bytes,
        cpus: spec.cpu_quota_pct.map(|q| f64::from(q) / 100.0),
        pids: spec.pids,
        cpu_weight: spec.cpu_weight,
        bridge: spec.net.as_ref().map(|n| BridgeConfig {
            bridge: n.bridge.clone(),
            subnet: n.subnet.clone(),
        }),
    }
}

/// Validates a create request before anything is made.
pub(super) fn validate(spec: &CtCreate) -> Result<(), DaemonError> {
    crate::names::validate_name(&spec.name)?;
    if !corefour_container::templates::NAMES.contains(&spec.template.as_str()) {
        return Err(DaemonError::BadRequest(format!(
            "unknown template {:?}: use one of {}",
            spec.template,
            corefour_container::templates::NAMES.join(", ")
        )));
    }
    check_limits(
        spec.cpu_quota_pct,
        spec.cpu_weight,
        spec.memory_bytes,
        spec.pids,
        false,
    )?;
    if let Some(n) = &spec.net {
        crate::names::validate_name(&n.bridge).map_err(|_| {
            DaemonError::BadRequest(format!(
                "bridge name {:?}: use 1-15 characters from a-z, 0-9, '-', '_'",
                n.bridge
            ))
        })?;
        if n.bridge.len() > 15 {
            return Err(DaemonError::BadRequest(format!(
                "bridge name {:?} is longer than 15 characters",
                n.bridge
            )));
        }
        BridgeConfig {
            bridge: n.bridge.clone(),
            subnet: n.subnet.clone(),
        }
        .parse_subnet()
        .map_err(|e| DaemonError::BadRequest(e.to_string()))?;
    }
    Ok(())
}

impl Cts {
    pub async fn create(self: &Arc<Self>, spec: CtCreate) -> Result<CtInfo, DaemonError> {
        validate(&spec)?;
        let name = spec.name.clone();
        let _g = self.op_lock(&name).await;
        // The row first: the schema, not a check, keeps names unique among all instances.
        self.inv().insert_ct(&spec, "defined")?;
        let _building = self.template_guard(&spec.template).await;
        let sys = self.sys();
        let req = create_request(&spec);
        let made = blocking(move || {
            remove_orphan(&sys, &req.name);
            sys.create(&req).map_err(ct_error)
        })
        .await;
        if let Err(e) = made {
            let _ = self.inv().delete_ct(&name, "creation failed");
            return Err(e);
        }
        tracing::info!(ct = %name, template = %spec.template, "container created");
        if spec.start {
            drop(_g);
            return self.start(&name).await;
        }
        self.info(&name)
    }

    pub async fn start(self: &Arc<Self>, name: &str) -> Result<CtInfo, DaemonError> {
        let _g = self.op_lock(name).await;
        let rec = self.inv().get_ct(name)?;
        if rec.state.is_active() || self.is_active(name) {
            return Err(DaemonError::Conflict(format!(
                "container {name:?} is {}: cannot start it",
                rec.state
            )));
        }
        let (child, pids) = match self.spawn_shim(name).await {
            Ok(x) => x,
            Err(e) => {
                let _ = self.inv().set_ct_stopped(name, &e.to_string(), None);
                return Err(e);
            }
        };
        self.inv().set_ct_running(name, pids)?;
        let tx = registry::track(&self.running, name, pids.vmm_pid);
        self.spawn_watcher(name.to_string(), Watched::Child(child), tx);
        tracing::info!(ct = name, init_pid = pids.vmm_pid, "container started");
        self.info(name)
    }

    /// Starts `corefour ct shim NAME` in its own session and reads the init's pid from it.
    async fn spawn_shim(&self, name: &str) -> Result<(tokio::process::Child, Pids), DaemonError> {
        let sys = self.sys();
        let dir = sys.dir(name);
        let log_path = dir.join(super::shim::SHIM_LOG);
        let start_err = |message: String| DaemonError::Start {
            name: name.to_string(),
            message,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&log_path)
            .map_err(|e| DaemonError::io(format!("cannot open {}", log_path.display()), e))?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("ct")
            .arg("shim")
            .arg("--base")
            .arg(&self.base)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg(name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| start_err(format!("cannot run {}: {e}", self.exe.display())))?;
        let shim_pid = child.id().map(|p| p as i32).unwrap_or(0);
        let Some(stdout) = child.stdout.take() else {
            return Err(start_err("the shim has no stdout pipe".into()));
        };
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(stdout);
        let read = tokio::time::timeout(START_TIMEOUT, reader.read_line(&mut line)).await;
        let init_pid = match read {
            Ok(Ok(n)) if n > 0 => line.trim().parse::<i32>().ok(),
            _ => None,
        };
        let Some(init_pid) = init_pid else {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail = tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(start_err(if tail.is_empty() {
                "the shim exited before the container's init ran".to_string()
            } else {
                tail.trim().to_string()
            }));
        };
        Ok((
            child,
            Pids {
                shim_pid,
                shim_start: crate::lifecycle::start_time(shim_pid).unwrap_or(0),
                vmm_pid: init_pid,
            },
        ))
    }

    /// SIGTERM to the init (busybox init shuts down, a shell init traps it), SIGKILL after the
    /// timeout.
    pub async fn stop(
        self: &Arc<Self>,
        name: &str,
        timeout: Duration,
    ) -> Result<CtInfo, DaemonError> {
        let _g = self.op_lock(name).await;
        let h = self.running_handle(name)?;
        self.stop_requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        self.thaw_if_paused(name).await;
        signal(h.vmm_pid, libc::SIGTERM);
        wait_or_kill(&h, timeout, &format!("container {name:?}")).await?;
        self.info(name)
    }

    /// Freezes every process of the container (cgroup freezer).
    pub async fn pause(self: &Arc<Self>, name: &str) -> Result<CtInfo, DaemonError> {
        self.freeze(name, true).await
    }

    pub async fn resume(self: &Arc<Self>, name: &str) -> Result<CtInfo, DaemonError> {
        self.freeze(name, false).await
    }

    async fn freeze(self: &Arc<Self>, name: &str, frozen: bool) -> Result<CtInfo, DaemonError> {
        let _g = self.op_lock(name).await;
        self.running_handle(name)?;
        let rec = self.inv().get_ct(name)?;
        let (want, verb) = if frozen {
            (VmState::Running, "pause")
        } else {
            (VmState::Paused, "resume")
        };
        if rec.state != want {
            return Err(DaemonError::Conflict(format!(
                "container {name:?} is {}: cannot {verb} it",
                rec.state
            )));
        }
        let root = self.sys().run_root();
        let n = name.to_string();
        blocking(move || {
            if frozen {
                corefour_container::container_pause::pause(&root, &n)
            } else {
                corefour_container::container_pause::resume(&root, &n)
            }
            .map_err(ct_error)
        })
        .await?;
        self.inv().set_ct_state(
            name,
            if frozen {
                VmState::Paused
            } else {
                VmState::Running
            },
        )?;
        self.info(name)
    }

    /// A frozen init cannot act on a signal: thaw before stopping or killing.
    async fn thaw_if_paused(&self, name: &str) {
        if self
            .inv()
            .get_ct(name)
            .is_ok_and(|r| r.state == VmState::Paused)
        {
            let root = self.sys().run_root();
            let n = name.to_string();
            let _ = blocking(move || {
                corefour_container::container_pause::resume(&root, &n).map_err(ct_error)
            })
            .await;
        }
    }

    pub async fn kill(self: &Arc<Self>, name: &str) -> Result<CtInfo, DaemonError> {
        let _g = self.op_lock(name).await;
        let h = self.running_handle(name)?;
        self.kill_and_wait(name, &h).await?;
        self.info(name)
    }

    async fn kill_and_wait(&self, name: &str, h: &RunHandle) -> Result<(), DaemonError> {
        self.thaw_if_paused(name).await;
        kill_and_wait(h, &format!("container {name:?}")).await
    }

    fn running_handle(&self, name: &str) -> Result<RunHandle, DaemonError> {
        let rec = self.inv().get_ct(name)?;
        self.handle(name).ok_or_else(|| {
            DaemonError::Conflict(format!(
                "container {name:?} is {}: it is not running",
                rec.state
            ))
        })
    }

    pub async fn delete(self: &Arc<Self>, name: &str, force: bool) -> Result<(), DaemonError> {
        let g = self.op_lock(name).await;
        let rec = self.inv().get_ct(name)?;
        if let Some(h) = self.handle(name) {
            if !force {
                return Err(DaemonError::Conflict(format!(
                    "container {name:?} is {}: stop it first or use --force",
                    rec.state
                )));
            }
            self.kill_and_wait(name, &h).await?;
        }
        let sys = self.sys();
        let n = name.to_string();
        blocking(move || match sys.delete(&n, true) {
            Ok(()) => Ok(()),
            // No ct.json: a create the daemon did not finish (killed midway); its files go too.
            Err(corefour_container::ContainerError::NotFound(_)) => {
                remove_orphan(&sys, &n);
                Ok(())
            }
            Err(e) => Err(ct_error(e)),
        })
        .await?;
        match self.inv().delete_ct(name, "deleted") {
            Ok(()) | Err(InventoryError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        drop(g);
        self.forget_lock(name);
        tracing::info!(ct = name, "container deleted");
        Ok(())
    }

    /// Limits: kept for the next start and, while the container runs, written to its cgroup.
    pub async fn set_limits(
        self: &Arc<Self>,
        name: &str,
        l: CtLimits,
    ) -> Result<CtInfo, DaemonError> {
        check_limits(l.cpu_quota_pct, l.cpu_weight, l.memory_bytes, l.pids, true)?;
        let _g = self.op_lock(name).await;
        let mut rec = self.inv().get_ct(name)?;
        let zero_none_u = |v: u32| (v != 0).then_some(v);
        let zero_none_i = |v: i64| (v != 0).then_some(v);
        let change = LimitChange {
            memory: l.memory_bytes.map(zero_none_i),
            cpus: l
                .cpu_quota_pct
                .map(|q| zero_none_u(q).map(|q| f64::from(q) / 100.0)),
            cpu_weight: l.cpu_weight.map(zero_none_u),
            pids: l.pids.map(zero_none_i),
        };
        let sys = self.sys();
        let n = name.to_string();
        blocking(move || sys.set_limits(&n, &change).map_err(ct_error)).await?;
        if let Some(q) = l.cpu_quota_pct {
            rec.spec.cpu_quota_pct = zero_none_u(q);
        }
        if let Some(w) = l.cpu_weight {
            rec.spec.cpu_weight = zero_none_u(w);
        }
        if let Some(m) = l.memory_bytes {
            rec.spec.memory_bytes = zero_none_i(m);
        }
        if let Some(p) = l.pids {
            rec.spec.pids = zero_none_i(p);
        }
        let live = if rec.state == VmState::Running {
            " (applied to the running container)"
        } else {
            ""
        };
        self.inv().set_ct_spec(
            &rec.spec,
            &format!(
                "cpu_quota_pct={:?} cpu_weight={:?} memory_bytes={:?} pids={:?}{live}",
                rec.spec.cpu_quota_pct, rec.spec.cpu_weight, rec.spec.memory_bytes, rec.spec.pids
            ),
        )?;
        self.info(name)
    }
}

/// Files of a container the inventory does not know (a daemon killed between writing them and
/// recording them): the name is free in the inventory, so they belong to no one.
pub(super) fn remove_orphan(sys: &corefour_container::system::System, name: &str) {
    let dir = sys.dir(name);
    if dir.exists() {
        tracing::warn!(ct = name, "removing files left by an unfinished create");
        let _ = sys.cleanup(name);
        sys.unmount_rootfs(name);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
