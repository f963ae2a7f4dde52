//! The warm VMM pool: `corefour vmm --prewarm` processes whose KVM VM, memory slots and vCPUs
//! already exist, so `vm restore` skips KVM's set-up (milliseconds of SRCU grace periods on
//! this host) and only maps the snapshot and loads its state.
//!
//! Each warm VMM runs under a warm shim (`corefour daemon --warm-shim DIR`) in
//! `STATE/warm/ID/`, as a VM's VMM runs under its shim. A restore of a VM whose shape (vCPUs,
//! memory) matches a warm VMM claims it: the daemon writes `claimed` (the VM's directory) into
//! the warm directory, so the shim records the VMM's exit there, and sends `PUT /vm/restore`
//! with the VM's console log and API socket. Anything that goes wrong falls back to a cold
//! start. The pool refills in the background after a claim or a death.
//!
//! A warm VMM is not a VM: it dies with its shim (PR_SET_PDEATHSIG until it is claimed), and
//! an unclaimed shim kills it when the daemon goes away; a new daemon kills what an old one
//! left. Its cost: one idle process (~8 MiB RSS, ~1 MiB of it private) plus KVM's per-VM and
//! memory-slot metadata; guest memory is only reserved, never touched. The default pool is one
//! warm VMM of the default VM shape (1 vCPU, 64 MiB): `corefour daemon --warm-pool N
//! --warm-shape VCPUSxMIB`.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corefour_api::VmInfo;
use hyper::Method;
use tokio::io::AsyncBufReadExt;

use super::watch::Watched;
use super::{proc, Daemon, RunHandle};
use crate::error::DaemonError;
use crate::inventory::Pids;
use crate::network;
use crate::shim::{self, ExitRecord, ShimError};

/// The claim marker in a warm VMM's directory: one line, the VM directory it now serves.
const CLAIMED: &str = "claimed";
/// The warm pool's directory under the state directory.
const WARM_DIR: &str = "warm";
/// A warm VMM that is not serving its socket this long after its start is given up.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// After a failed start, the pool waits this long before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The shape a warm VMM is made for: a restore uses it only when the VM's is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmShape {
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl FromStr for WarmShape {
    type Err = String;

    /// "VCPUSxMIB", e.g. "1x256" or "2x1024".
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("warm VMM shape {s:?}: expected VCPUSxMIB, e.g. 1x256");
        let (v, m) = s.split_once(['x', 'X']).ok_or_else(bad)?;
        let vcpus: u32 = v.trim().parse().map_err(|_| bad())?;
        let memory_mib: u64 = m.trim().parse().map_err(|_| bad())?;
        if vcpus == 0 || memory_mib == 0 {
            return Err(bad());
        }
        Ok(Self { vcpus, memory_mib })
    }
}

impl std::fmt::Display for WarmShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.vcpus, self.memory_mib)
    }
}

/// How many warm VMMs to keep, of which shapes.
#[derive(Debug, Clone, Default)]
pub struct WarmPoolConfig {
    /// Warm VMMs kept per shape (0: no pool).
    pub per_shape: usize,
    pub shapes: Vec<WarmShape>,
}

/// One warm VMM ready to be claimed.
struct Entry {
    id: u64,
    shape: WarmShape,
    dir: PathBuf,
    pids: Pids,
    shim: tokio::process::Child,
}

pub(super) struct WarmPool {
    cfg: WarmPoolConfig,
    dir: PathBuf,
    ready: Mutex<Vec<Entry>>,
    next_id: AtomicU64,
    /// Held while the pool is being filled, so two refills never overshoot.
    filling: tokio::sync::Mutex<()>,
}

impl WarmPool {
    pub(super) fn new(state_dir: &Path, cfg: WarmPoolConfig) -> Self {
        let dir = state_dir.join(WARM_DIR);
        kill_leftovers(&dir);
        Self {
            cfg,
            dir,
            ready: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            filling: tokio::sync::Mutex::new(()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a warm VMM of `shape`, if one is ready.
    fn take(&self, shape: WarmShape) -> Option<Entry> {
        let mut e = self.entries();
        let i = e.iter().position(|x| x.shape == shape)?;
        Some(e.swap_remove(i))
    }

    /// Forgets the entry `id` (its VMM died) and says whether it was still in the pool.
    fn remove(&self, id: u64) -> Option<Entry> {
        let mut e = self.entries();
        let i = e.iter().position(|x| x.id == id)?;
        Some(e.swap_remove(i))
    }

    /// Kills every unclaimed warm VMM (the daemon is going away; its VMs stay).
    pub(super) fn shutdown(&self) {
        for e in self.entries().drain(..) {
            kill(e.pids.vmm_pid);
            let _ = std::fs::remove_dir_all(&e.dir);
        }
    }
}

fn kill(pid: i32) {
    if pid > 0 {
        // SAFETY: kill takes plain integers.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Kills the unclaimed warm VMMs a previous daemon left (claimed ones are VMs now).
fn kill_leftovers(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for d in rd.flatten() {
        let p = d.path();
        if p.join(CLAIMED).exists() {
            continue;
        }
        if let Some(pids) = shim::read_pids(&p) {
            if proc::start_time(pids.shim_pid) == Some(pids.shim_start) {
                kill(pids.vmm_pid);
            }
        }
        let _ = std::fs::remove_dir_all(&p);
    }
}

impl Daemon {
    /// Fills the pool up to its size in the background.
    pub(super) fn refill_warm_pool(self: &Arc<Self>) {
        if self.warm.cfg.per_shape == 0 {
            return;
        }
        let d = Arc::clone(self);
        tokio::spawn(async move {
            let _g = d.warm.filling.lock().await;
            for shape in d.warm.cfg.shapes.clone() {
                loop {
                    let have = d.warm.entries().iter().filter(|e| e.shape == shape).count();
                    if have >= d.warm.cfg.per_shape {
                        break;
                    }
                    if let Err(e) = d.start_warm(shape).await {
                        tracing::warn!(%shape, "cannot start a warm VMM: {e}");
                        let d2 = Arc::clone(&d);
                        tokio::spawn(async move {
                            tokio::time::sleep(RETRY_AFTER).await;
                            d2.refill_warm_pool();
                        });
                        return;
                    }
                }
            }
        });
    }

    /// Starts one warm VMM of `shape` and waits until it serves its socket.
    async fn start_warm(self: &Arc<Self>, shape: WarmShape) -> Result<(), DaemonError> {
        let id = self.warm.next_id.fetch_add(1, Ordering::Relaxed);
        let dir = self.warm.dir.join(format!("{}-{id}", std::process::id()));
        let err = |message: String| DaemonError::Start {
            name: format!("warm VMM {shape}"),
            message,
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| DaemonError::io(format!("cannot create {}", dir.display()), e))?;
        let mut cmd = tokio::process::Command::new(&self.cfg.exe);
        cmd.arg("daemon")
            .arg("--warm-shim")
            .arg(&dir)
            .arg("--warm-shape")
            .arg(shape.to_string())
            .arg("--vmm-binary")
            .arg(&self.cfg.vmm_exe)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| err(format!("cannot run {}: {e}", self.cfg.exe.display())))?;
        let shim_pid = child.id().map(|p| p as i32).unwrap_or(0);
        let vmm_pid = match child.stdout.take() {
            Some(out) => {
                let mut line = String::new();
                let mut r = tokio::io::BufReader::new(out);
                match tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await {
                    Ok(Ok(n)) if n > 0 => line.trim().parse::<i32>().ok(),
                    _ => None,
                }
            }
            None => None,
        };
        let Some(vmm_pid) = vmm_pid else {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let _ = std::fs::remove_dir_all(&dir);
            return Err(err("the warm shim did not start the VMM".into()));
        };
        let sock = dir.join(shim::API_SOCK);
        let t = std::time::Instant::now();
        while tokio::net::UnixStream::connect(&sock).await.is_err() {
            let gone = matches!(child.try_wait(), Ok(Some(_)));
            if gone || t.elapsed() > READY_TIMEOUT {
                kill(vmm_pid);
                let _ = child.wait().await;
                let tail = super::start::console_tail(&dir.join(shim::CONSOLE_LOG));
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err(if tail.is_empty() {
                    "the warm VMM never served its socket".into()
                } else {
                    tail
                }));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let pids = Pids {
            shim_pid,
            shim_start: proc::start_time(shim_pid).unwrap_or(0),
            vmm_pid,
        };
        self.warm.entries().push(Entry {
            id,
            shape,
            dir,
            pids,
            shim: child,
        });
        tracing::debug!(%shape, vmm_pid, "warm VMM ready");
        // Noticing a death: the entry leaves the pool, and the pool refills.
        let d = Arc::clone(self);
        tokio::spawn(async move {
            super::wait_pid(vmm_pid).await;
            if let Some(mut e) = d.warm.remove(id) {
                tracing::warn!(%shape, vmm_pid, "a warm VMM died; replacing it");
                let _ = e.shim.wait().await;
                let _ = std::fs::remove_dir_all(&e.dir);
                d.refill_warm_pool();
            }
        });
        Ok(())
    }

    /// Restores `snap` into a warm VMM of the VM's shape, if there is one; Ok(None) means
    /// "start it cold" (no warm VMM, or the warm one failed before the VM ran).
    pub(super) async fn restore_warm(
        self: &Arc<Self>,
        name: &str,
        snap: &Path,
    ) -> Result<Option<VmInfo>, DaemonError> {
        if self.warm.cfg.per_shape == 0 || self.cfg.jail {
            return Ok(None);
        }
        let _g = self.op_lock(name).await;
        let rec = self.inv.get_vm(name)?;
        if rec.state.is_active() || self.is_active(name) {
            return Err(super::active_conflict(name, rec.state, "restore"));
        }
        let shape = WarmShape {
            vcpus: rec.spec.vcpus,
            memory_mib: rec.spec.memory_mib,
        };
        let Some(entry) = self.warm.take(shape) else {
            tracing::debug!(vm = name, %shape, "no warm VMM of this shape: cold restore");
            return Ok(None);
        };
        self.refill_warm_pool();
        let dir = self.vm_dir(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| DaemonError::io(format!("cannot create {}", dir.display()), e))?;
        let cfg_path = dir.join(shim::CONFIG_FILE);
        std::fs::write(&cfg_path, crate::vmm_config::render(&rec))
            .map_err(|e| DaemonError::io(format!("cannot write {}", cfg_path.display()), e))?;
        let _ = std::fs::remove_file(dir.join(shim::API_SOCK));
        let _ = std::fs::remove_file(dir.join(shim::PIDS_FILE));
        let _ = std::fs::remove_file(dir.join(shim::EXIT_FILE));
        let cgroup = self.make_cgroup(&rec)?;
        let mut taps = Vec::new();
        let undo = |taps: &[&str], e: &Entry| {
            taps.iter().for_each(|t| network::delete_tap(t));
            if let Some(c) = &cgroup {
                c.remove();
            }
            let _ = std::fs::remove_file(e.dir.join(CLAIMED));
            kill(e.pids.vmm_pid);
        };
        for nic in &rec.nics {
            if let Err(e) = network::create_tap(&nic.tap, &nic.bridge, None) {
                undo(&taps, &entry);
                return Err(e.into());
            }
            taps.push(nic.tap.as_str());
        }
        let claimed = entry.dir.join(CLAIMED);
        if let Err(e) = std::fs::write(&claimed, dir.display().to_string()) {
            undo(&taps, &entry);
            tracing::warn!(vm = name, "cannot claim a warm VMM ({e}): cold restore");
            return Ok(None);
        }
        let body = serde_json::json!({
            "path": snap,
            "console": dir.join(shim::CONSOLE_LOG),
            "api_sock": dir.join(shim::API_SOCK),
        })
        .to_string();
        let sent = crate::client::call(
            &entry.dir.join(shim::API_SOCK),
            Method::PUT,
            "/vm/restore",
            Some(body.into_bytes()),
        )
        .await;
        match sent {
            Ok((status, _)) if status.is_success() => {}
            Ok((status, resp)) => {
                undo(&taps, &entry);
                tracing::warn!(
                    vm = name,
                    "the warm VMM refused the restore ({status}: {}): cold restore",
                    crate::client::fault_text(&resp)
                );
                return Ok(None);
            }
            Err(e) => {
                undo(&taps, &entry);
                tracing::warn!(vm = name, "the warm VMM is unreachable ({e}): cold restore");
                return Ok(None);
            }
        }
        // The VM runs from here on: into its cgroup (the memory it charged while warm stays
        // where it was), recorded as running, watched through its shim.
        if let Some(cg) = &cgroup {
            for p in cg.paths() {
                for pid in [entry.pids.shim_pid, entry.pids.vmm_pid] {
                    let procs = p.join("cgroup.procs");
                    if let Err(e) = std::fs::write(&procs, pid.to_string()) {
                        tracing::warn!(vm = name, "cannot move {pid} into {}: {e}", p.display());
                    }
                }
            }
        }
        let pids = entry.pids;
        let line = format!("{} {} {}\n", pids.shim_pid, pids.shim_start, pids.vmm_pid);
        let _ = std::fs::write(dir.join(shim::PIDS_FILE), line);
        self.inv.set_running(name, pids)?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name.to_string(),
                RunHandle {
                    vmm_pid: pids.vmm_pid,
                    done: rx,
                },
            );
        self.spawn_watcher(name.to_string(), Watched::Child(entry.shim), tx);
        super::pin::spawn_pinner(
            name.to_string(),
            pids.vmm_pid,
            rec.spec.cpu_pin.clone(),
            rec.spec.vcpus,
        );
        tracing::info!(vm = name, vmm_pid = pids.vmm_pid, %shape, "restored into a warm VMM");
        self.info(name).map(Some)
    }
}

/// Runs as the warm shim: starts `VMM vmm --prewarm` in `dir`, reports its pid on stdout, and
/// waits. Until the VMM is claimed it also watches the daemon: when that goes, the warm VMM
/// goes too. Once claimed, the VMM's exit is recorded in the VM's directory, as `shim::run`
/// does for a VM started cold.
pub fn run_shim(dir: &Path, vmm_exe: &Path, shape: WarmShape) -> Result<i32, ShimError> {
    // SAFETY: setsid has no preconditions; failing (already a group leader) changes nothing.
    unsafe {
        libc::setsid();
    }
    shim::cloexec_from_3();
    // SAFETY: setting signal dispositions to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    // SAFETY: getppid has no preconditions.
    let daemon = unsafe { libc::getppid() };
    let console_path = dir.join(shim::CONSOLE_LOG);
    let console_err = |source| ShimError::Console {
        path: console_path.display().to_string(),
        source,
    };
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&console_path)
        .map_err(console_err)?;
    let console2 = console.try_clone().map_err(console_err)?;
    let mut cmd = Command::new(vmm_exe);
    cmd.args(["vmm", "--prewarm", "--vcpus"])
        .arg(shape.vcpus.to_string())
        .arg("--memory")
        .arg(format!("{}M", shape.memory_mib))
        .arg("--api-sock")
        .arg(dir.join(shim::API_SOCK))
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(console2);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            // Unclaimed, the warm VMM dies with this shim; the VMM clears it on its restore.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            shim::cloexec_from_3();
            Ok(())
        });
    }
    crate::seccomp::apply_to(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| ShimError::Spawn {
        exe: vmm_exe.display().to_string(),
        source,
    })?;
    let me = std::process::id() as i32;
    let pids = format!(
        "{me} {} {}\n",
        proc::start_time(me).unwrap_or(0),
        child.id()
    );
    let _ = std::fs::write(dir.join(shim::PIDS_FILE), pids);
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", child.id());
        let _ = out.flush();
    }
    let claimed = || {
        std::fs::read_to_string(dir.join(CLAIMED))
            .ok()
            .map(|s| PathBuf::from(s.trim()))
    };
    let status = loop {
        if let Some(st) = child.try_wait().map_err(ShimError::Wait)? {
            break st;
        }
        if claimed().is_some() {
            break child.wait().map_err(ShimError::Wait)?;
        }
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != daemon {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(dir);
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(vm_dir) = claimed() {
        let rec = ExitRecord {
            code: status.code(),
            signal: status.signal(),
        };
        let tmp = vm_dir.join("exit.tmp");
        let record_err = |source| ShimError::Record {
            path: vm_dir.join(shim::EXIT_FILE).display().to_string(),
            source,
        };
        let json = serde_json::to_vec(&rec).unwrap_or_default();
        std::fs::write(&tmp, json).map_err(record_err)?;
        std::fs::rename(&tmp, vm_dir.join(shim::EXIT_FILE)).map_err(record_err)?;
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse() {
        let s: WarmShape = "2x1024".parse().unwrap();
        assert_eq!(
            s,
            WarmShape {
                vcpus: 2,
                memory_mib: 1024
            }
        );
        assert_eq!(s.to_string(), "2x1024");
        for bad in ["", "2", "0x256", "1x0", "x256", "1x-5", "ax256"] {
            assert!(bad.parse::<WarmShape>().is_err(), "{bad}");
        }
    }
}
