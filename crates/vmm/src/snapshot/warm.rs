//! A pre-warmed VMM: a KVM VM of a given shape (vCPUs, memory size) created before anyone asks
//! for it, so that a restore skips what KVM makes slowly. On this host every memory slot,
//! irqchip and PIT change waits for an SRCU grace period (up to a 4 ms jiffy each), which no
//! ordering removes from a cold restore (see `corefour bench migrate`).
//!
//! The warm VMM reserves the guest's address range (anonymous, untouched, so it costs no RAM),
//! registers it with KVM and creates the vCPUs. A restore then maps the snapshot's memory file
//! MAP_PRIVATE|MAP_FIXED over the reserved range (KVM follows the host mapping through its MMU
//! notifiers; the memory slot itself never changes), builds the devices from the snapshot's
//! config and loads the state.
//!
//! The API, before the restore (`serve`): `GET /vm` ({"state": "warm", ...}), `PUT /vm/restore`
//! ({"path": DIR, "console": FILE?, "api_sock": PATH?, "verify": bool?}) and `PUT /vm/shutdown`.

use std::io::BufReader;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Instant;

use corefour_devices::Console;
use corefour_hypervisor::{MemoryRegion, Vm};
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestRegionMmap};

use super::restore::{self, load, ms, Chain, RestoreError, RestoreTiming};
use super::shell::{self, Phases, Shell};
use crate::api_server::{self, Request, Response};
use crate::builder::{Vmm, VmmError};
use crate::config::BackendKind;
use crate::layout::ram_ranges;
use crate::memory::{GuestMem, MemoryError};

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("a warm VMM needs 1 or more vCPUs and memory, got {vcpus} vCPUs and {mib} MiB")]
    Shape { vcpus: u32, mib: u64 },
    #[error("cannot reserve {bytes} bytes of address space for guest memory: {source}")]
    Reserve {
        bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A failed warm restore: the warm VMM back, when the failure came before anything changed.
pub type Refused = (Option<Box<WarmVmm>>, RestoreError);

/// One reserved guest RAM region: where it is in the guest and in this process.
#[derive(Debug, Clone, Copy)]
struct Reserved {
    guest_phys_addr: u64,
    size: u64,
    host_addr: usize,
}

/// A VM with memory slots and vCPUs, waiting for a snapshot.
pub struct WarmVmm {
    shell: Shell,
    memory_mib: u64,
    regions: Vec<Reserved>,
    /// How long creating it took, phase by phase (what a warm restore saves).
    pub created: Phases,
}

const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;

impl WarmVmm {
    /// Creates a KVM VM with `vcpus` vCPUs and `memory_mib` MiB of (reserved) guest RAM.
    pub fn create(vcpus: u32, memory_mib: u64) -> Result<Self, WarmError> {
        let bad = WarmError::Shape {
            vcpus,
            mib: memory_mib,
        };
        if vcpus == 0 || memory_mib == 0 {
            return Err(bad);
        }
        let bytes = memory_mib.checked_mul(1 << 20).ok_or(bad)?;
        let mut regions = Vec::new();
        for (start, len) in ram_ranges(bytes) {
            let size = usize::try_from(len).map_err(|_| WarmError::Shape {
                vcpus,
                mib: memory_mib,
            })?;
            // SAFETY: a new anonymous mapping at an address the kernel picks; nothing else
            // refers to it. It is never unmapped: the process ends with the VM.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    PROT,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(WarmError::Reserve {
                    bytes: len,
                    source: std::io::Error::last_os_error(),
                });
            }
            regions.push(Reserved {
                guest_phys_addr: start,
                size: len,
                host_addr: p as usize,
            });
        }
        let register = |vm: &dyn Vm| -> Result<(), RestoreError> {
            for (slot, r) in (0u32..).zip(&regions) {
                let m = MemoryRegion {
                    slot,
                    guest_phys_addr: r.guest_phys_addr,
                    size: r.size,
                    host_addr: r.host_addr as u64,
                    log_dirty: false,
                    read_only: false,
                };
                // SAFETY: the reserved mapping lives as long as the process (never unmapped);
                // a restore replaces its contents in place, which KVM follows.
                unsafe { vm.set_memory_region(m) }
                    .map_err(|e| RestoreError::from(VmmError::from(MemoryError::Register(e))))?;
            }
            Ok(())
        };
        let mut created = Phases::default();
        let shell = shell::build(BackendKind::Kvm, vcpus, register, &mut created)?;
        Ok(Self {
            shell,
            memory_mib,
            regions,
            created,
        })
    }

    pub fn vcpus(&self) -> u32 {
        self.shell.vcpus.len() as u32
    }

    pub fn memory_mib(&self) -> u64 {
        self.memory_mib
    }

    /// Restores the snapshot in `dir` into this VM. A snapshot of another shape (or backend)
    /// is refused before anything changes, and the warm VMM comes back with the error;
    /// after that a failure leaves the VM half restored and it is dropped.
    pub fn restore(
        self,
        dir: &Path,
        console: Console,
        verify: bool,
    ) -> Result<(Vmm, RestoreTiming), Refused> {
        let t0 = Instant::now();
        let mut phases = Phases::default();
        let chain = match Chain::open(dir, verify) {
            Ok(c) => c,
            Err(e) => return Err((Some(Box::new(self)), e)),
        };
        let config = match chain.config() {
            Ok(c) => c,
            Err(e) => return Err((Some(Box::new(self)), e)),
        };
        let top = chain.top();
        let same_layout = top.memory.regions.len() == self.regions.len()
            && top
                .memory
                .regions
                .iter()
                .zip(&self.regions)
                .all(|(a, b)| a.guest_phys_addr == b.guest_phys_addr && a.size == b.size);
        if config.vcpus != self.vcpus()
            || config.memory_mib != self.memory_mib
            || !same_layout
            || restore::backend_of(&top.machine) != BackendKind::Kvm
        {
            let e = RestoreError::Shape {
                want_vcpus: config.vcpus,
                want_mib: config.memory_mib,
                have_vcpus: self.vcpus(),
                have_mib: self.memory_mib,
            };
            return Err((Some(Box::new(self)), e));
        }
        let t = phases.mark("read snapshot", t0);
        let (base_path, base_file) = &chain.files[0];
        let map_err = |reason: String| RestoreError::Map {
            path: base_path.display().to_string(),
            reason,
        };
        let mut mapped = Vec::with_capacity(self.regions.len());
        for (r, saved) in self.regions.iter().zip(&top.memory.regions) {
            let Ok(offset) = libc::off_t::try_from(saved.file_offset) else {
                return Err((None, map_err("file offset out of range".into())));
            };
            // SAFETY: replaces the reserved range (ours, never handed out as a Rust reference,
            // no vCPU has run) with a private mapping of the snapshot file; the fd stays valid
            // for the call and the kernel keeps its own reference to the file.
            let p = unsafe {
                libc::mmap(
                    r.host_addr as *mut libc::c_void,
                    r.size as usize,
                    PROT,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    base_file.as_raw_fd(),
                    offset,
                )
            };
            if p == libc::MAP_FAILED || p as usize != r.host_addr {
                let e = std::io::Error::last_os_error();
                return Err((
                    None,
                    map_err(format!("MAP_FIXED over the reserved range: {e}")),
                ));
            }
            // SAFETY: `host_addr..+size` is the mapping just made, with these prot and flags.
            let mmap = unsafe {
                MmapRegion::build_raw(
                    r.host_addr as *mut u8,
                    r.size as usize,
                    PROT,
                    libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                )
            };
            let region = mmap.map_err(|e| map_err(e.to_string())).and_then(|m| {
                GuestRegionMmap::new(m, GuestAddress(r.guest_phys_addr))
                    .ok_or_else(|| map_err("region wraps the guest address space".into()))
            });
            match region {
                Ok(region) => mapped.push(region),
                Err(e) => return Err((None, e)),
            }
        }
        let mem = match GuestMem::from_regions(mapped) {
            Ok(m) => m,
            Err(e) => return Err((None, map_err(e.to_string()))),
        };
        let layout = top.memory.regions.clone();
        if let Err(e) = chain.apply_diffs(&restore::host_regions(&mem, &layout)) {
            return Err((None, e));
        }
        let t = phases.mark("map memory", t);
        let p = match restore::furnish(self.shell, config, &mem, console) {
            Ok(p) => p,
            Err(e) => return Err((None, e)),
        };
        let t = phases.mark("devices", t);
        let vmm = load(p, &top.machine, mem).map_err(|e| (None, e))?;
        phases.mark("load state", t);
        Ok((
            vmm,
            RestoreTiming {
                total_ms: ms(t0),
                layers: chain.layers.len(),
                phases,
            },
        ))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    path: PathBuf,
    /// Where serial output and the VMM's notes go from now on (appended; stdout and stderr
    /// are pointed at it). Unset: where they went so far.
    #[serde(default)]
    console: Option<PathBuf>,
    /// The API socket of the restored VM. Unset: the warm VMM's own socket path.
    #[serde(default)]
    api_sock: Option<PathBuf>,
    #[serde(default)]
    verify: bool,
}

#[derive(Serialize)]
struct WarmInfo {
    state: &'static str,
    vcpus: u32,
    memory_mib: u64,
    backend: &'static str,
    pid: u32,
}

#[derive(Serialize)]
struct RestoreReply<'a> {
    path: &'a Path,
    /// From the request's arrival to the state loaded; the vCPU threads start right after
    /// this reply is written.
    total_ms: f64,
    layers: usize,
    phases: serde_json::Map<String, serde_json::Value>,
}

/// What `serve` ended with.
pub enum Served {
    /// Restored: run it, serving its API on `api_sock`.
    Restored {
        vmm: Box<Vmm>,
        api_sock: PathBuf,
        /// The snapshot restored.
        path: PathBuf,
        timing: RestoreTiming,
    },
    /// `PUT /vm/shutdown` before any restore.
    Shutdown,
}

/// Serves the warm VMM's API on `sock` until a restore succeeds (or a shutdown). A request
/// that fails before the VM changed is answered and the VMM stays warm; a restore that fails
/// later ends it with the error.
pub fn serve(warm: WarmVmm, sock: &Path) -> Result<Served, WarmError> {
    let listen_err = |source| WarmError::Listen {
        path: sock.display().to_string(),
        source,
    };
    // A stale socket from a killed VMM; a live one would be this path's owner, but a warm VMM's
    // socket is private to whoever started it.
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock).map_err(listen_err)?;
    let mut warm = Some(warm);
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
        let Ok(mut writer) = conn.try_clone() else {
            continue;
        };
        let mut reader = BufReader::new(conn);
        loop {
            let req = match api_server::read_request(&mut reader) {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(msg) => {
                    let _ =
                        api_server::write_response(&mut writer, &api_server::fault(400, msg), true);
                    break;
                }
            };
            let Some(w) = warm.take() else { break };
            let t0 = Instant::now();
            let (resp, next) = route(&req, w, sock, t0);
            let _ = api_server::write_response(&mut writer, &resp, req.close);
            match next {
                Next::Warm(w) => warm = Some(w),
                Next::Done(served) => {
                    drop(listener);
                    if let Served::Restored { api_sock, .. } = &served {
                        if api_sock == sock {
                            // `run` binds it again for the restored VM.
                            let _ = std::fs::remove_file(sock);
                        }
                    }
                    return Ok(served);
                }
                Next::Failed(e) => return Err(e),
            }
            if req.close {
                break;
            }
        }
    }
    Err(listen_err(std::io::Error::other("the listener closed")))
}

enum Next {
    Warm(WarmVmm),
    Done(Served),
    Failed(WarmError),
}

fn route(req: &Request, warm: WarmVmm, sock: &Path, t0: Instant) -> (Response, Next) {
    let path = req.path.split('?').next().unwrap_or("");
    match (req.method.as_str(), path) {
        ("GET", "/vm") => {
            let info = WarmInfo {
                state: "warm",
                vcpus: warm.vcpus(),
                memory_mib: warm.memory_mib,
                backend: warm.shell.backend,
                pid: std::process::id(),
            };
            let v = serde_json::to_value(&info).unwrap_or_default();
            (api_server::json_ok(v), Next::Warm(warm))
        }
        ("PUT", "/vm/shutdown") => (
            Response {
                status: 204,
                body: None,
                after: None,
            },
            Next::Done(Served::Shutdown),
        ),
        ("PUT", "/vm/restore") => {
            let r: RestoreRequest = match serde_json::from_slice(&req.body) {
                Ok(r) => r,
                Err(e) => {
                    let msg = format!("invalid restore request body: {e}");
                    return (api_server::fault(400, msg), Next::Warm(warm));
                }
            };
            // A warm VMM dies with its starter (PR_SET_PDEATHSIG); the VM it becomes now
            // lives on its own, as a cold-started one does.
            // SAFETY: prctl with PR_SET_PDEATHSIG and 0 only clears this thread's setting (the
            // main thread's, which is the one the starter set before exec).
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, 0);
            }
            if let Some(c) = &r.console {
                if let Err(e) = redirect_output(c) {
                    let msg = format!("cannot open the console {}: {e}", c.display());
                    return (api_server::fault(400, msg), Next::Warm(warm));
                }
            }
            match warm.restore(&r.path, Console::stdout(), r.verify) {
                Ok((vmm, mut timing)) => {
                    timing.total_ms = ms(t0);
                    let phases = timing
                        .phases
                        .0
                        .iter()
                        .map(|(n, v)| (n.to_string(), serde_json::json!(v)))
                        .collect();
                    let reply = RestoreReply {
                        path: &r.path,
                        total_ms: timing.total_ms,
                        layers: timing.layers,
                        phases,
                    };
                    let v = serde_json::to_value(&reply).unwrap_or_default();
                    let served = Served::Restored {
                        vmm: Box::new(vmm),
                        api_sock: r.api_sock.clone().unwrap_or_else(|| sock.to_path_buf()),
                        path: r.path.clone(),
                        timing,
                    };
                    (api_server::json_ok(v), Next::Done(served))
                }
                Err((Some(w), e)) => {
                    let code = if matches!(e, RestoreError::Shape { .. }) {
                        409
                    } else {
                        400
                    };
                    (api_server::fault(code, e), Next::Warm(*w))
                }
                Err((None, e)) => {
                    let msg = e.to_string();
                    (api_server::fault(500, msg), Next::Failed(e.into()))
                }
            }
        }
        (_, "/vm" | "/vm/restore" | "/vm/shutdown") => (
            api_server::fault(400, format!("{} is not allowed on {path}", req.method)),
            Next::Warm(warm),
        ),
        _ => (
            api_server::fault(
                404,
                format!("no such resource on a warm VMM: {path} (it serves /vm, /vm/restore and /vm/shutdown)"),
            ),
            Next::Warm(warm),
        ),
    }
}

/// Points stdout and stderr at `path` (appending), so the restored guest's serial output and
/// the VMM's notes land in the VM's console log.
fn redirect_output(path: &Path) -> std::io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    for target in [1, 2] {
        // SAFETY: dup2 onto the standard descriptors; `f` stays open for the call, and the
        // Rust std handles for 1 and 2 refer to the descriptor numbers, not the old files.
        if unsafe { libc::dup2(f.as_raw_fd(), target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        assert!(matches!(
            WarmVmm::create(0, 64),
            Err(WarmError::Shape { .. })
        ));
        assert!(matches!(
            WarmVmm::create(1, 0),
            Err(WarmError::Shape { .. })
        ));
    }

    #[test]
    fn a_warm_vmm_refuses_a_missing_snapshot_and_stays_warm() {
        let w = match WarmVmm::create(1, 16) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("SKIP: cannot create a warm KVM VM: {e}");
                return;
            }
        };
        assert_eq!((w.vcpus(), w.memory_mib()), (1, 16));
        let Err((Some(w), e)) = w.restore(
            Path::new("/nonexistent/snap"),
            Console::new(Box::new(std::io::sink())),
            false,
        ) else {
            panic!("a missing snapshot restored");
        };
        assert!(e.to_string().contains("nonexistent"), "{e}");
        assert_eq!(w.vcpus(), 1);
    }
}
