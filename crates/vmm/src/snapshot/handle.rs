//! What the API server's snapshot and migrate requests act on: the VM's memory, vCPUs and
//! devices, shared with the running VMM.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use corefour_hypervisor::{CpuState, MemoryRegion, Vcpu, Vm};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::machine_state::{DeviceStates, MachineState};
use super::memfile::{self, HostRegion};
use super::{format, DiffRecord, MemoryRecord, VmSnapshot, MEMORY_FILE};
use crate::api_server::StateApi;
use crate::builder::Vmm;
use crate::config::VmConfig;
use crate::control::{Control, ControlError};
use crate::memory::GuestMem;
use crate::migration::{self, MigrationSource, SendParams};
use corefour_devices::legacy::Serial;
use corefour_devices::virtio::dirty as device_dirty;
use corefour_devices::virtio::state::{SaveRestore, TransportSnap};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    path: PathBuf,
    #[serde(default)]
    diff: bool,
    /// Same-instant disk snapshot: move the writable disks onto new overlays in this
    /// directory and freeze their files (`crate::disk_overlay`).
    #[serde(default)]
    disk_overlays: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct SnapshotReport {
    pub path: PathBuf,
    pub diff: bool,
    pub memory_bytes_written: u64,
    /// How long the guest was paused.
    pub paused_ms: f64,
    /// With `disk_overlays`: the frozen disks and the overlays the VM runs on now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::disk_overlay::FrozenDisk>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateRequest {
    to: String,
    #[serde(default = "default_downtime")]
    max_downtime_ms: u64,
    #[serde(default)]
    max_rounds: Option<u32>,
    #[serde(default)]
    io_timeout_ms: Option<u64>,
    /// Mirror the writable disks to the target while the guest runs (live block mirroring).
    #[serde(default)]
    copy_storage: bool,
}

fn default_downtime() -> u64 {
    10
}

struct Track {
    /// The snapshot a diff would apply to.
    last_snapshot: Option<PathBuf>,
    /// Whether the slots currently log dirty pages.
    logging: bool,
}

pub struct StateHandle {
    config: VmConfig,
    vm: Arc<dyn Vm>,
    /// Weak: a vCPU goes away with its thread (its Drop detaches the kicker).
    vcpus: Vec<Weak<Mutex<Box<dyn Vcpu>>>>,
    serial: Arc<Serial>,
    /// The virtio transports, in config order.
    virtio: Vec<Arc<dyn SaveRestore>>,
    /// A migration paused the VM and parked the virtio devices (see `take_dirty`).
    devices_parked: AtomicBool,
    mem: GuestMem,
    control: Arc<Control>,
    /// Also serializes snapshot and migrate requests.
    track: Mutex<Track>,
}

/// Used rings are written by the device model itself, not through a chain buffer: mark them.
fn mark_used_rings(states: &[TransportSnap]) {
    for s in states {
        for (addr, len) in s.used_rings() {
            device_dirty::mark(addr, len);
        }
    }
}

fn err500(e: impl std::fmt::Display) -> (u16, String) {
    (500, e.to_string())
}

impl StateHandle {
    pub(crate) fn new(v: &Vmm) -> Self {
        Self {
            config: v.config.clone(),
            vm: v.vm.clone(),
            vcpus: v.vcpus.iter().map(Arc::downgrade).collect(),
            serial: v.serial.clone(),
            virtio: v.virtio.clone(),
            devices_parked: AtomicBool::new(false),
            mem: v.mem.clone(),
            control: v.control.clone(),
            track: Mutex::new(Track {
                last_snapshot: None,
                logging: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Track> {
        self.track.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Guest RAM regions with their host mappings, slot i = region i (as `memory::register`).
    pub fn regions(&self) -> Vec<HostRegion> {
        let ranges: Vec<(u64, u64)> = self
            .mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        let layout = memfile::layout(&ranges).unwrap_or_default();
        self.mem
            .iter()
            .zip(layout)
            .filter_map(|(r, region)| {
                let host = self.mem.get_host_address(r.start_addr()).ok()?;
                Some(HostRegion {
                    region,
                    host_addr: host as usize,
                })
            })
            .collect()
    }

    /// Switches KVM's dirty log and, for virtio devices, the device log (`device_dirty`: KVM
    /// sees only the vCPUs' writes) on or off.
    fn set_logging(&self, on: bool) -> Result<(), String> {
        if !self.virtio.is_empty() {
            if on {
                let end = self
                    .regions()
                    .iter()
                    .map(|h| h.region.guest_phys_addr + h.region.size)
                    .max()
                    .unwrap_or(0);
                device_dirty::start(end);
            } else {
                device_dirty::stop();
            }
        }
        for (slot, h) in self.regions().iter().enumerate() {
            let r = MemoryRegion {
                slot: slot as u32,
                guest_phys_addr: h.region.guest_phys_addr,
                size: h.region.size,
                host_addr: h.host_addr as u64,
                log_dirty: on,
                read_only: false,
            };
            // SAFETY: the same mapping as registered at build time, owned by `self.mem`
            // (a clone of the VMM's memory), which outlives the VM.
            unsafe { self.vm.set_memory_region(r) }
                .map_err(|e| format!("cannot switch dirty logging on slot {slot}: {e}"))?;
        }
        Ok(())
    }

    fn take_dirty_all(&self) -> Result<Vec<Vec<u64>>, String> {
        self.regions()
            .iter()
            .enumerate()
            .map(|(slot, h)| {
                self.vm
                    .dirty_log(slot as u32, h.region.size)
                    .map_err(|e| format!("cannot read the dirty log: {e}"))
            })
            .collect()
    }

    /// KVM's dirty log merged with the pages the (parked) virtio devices wrote, whose used
    /// rings `states` describe; the device log restarts empty.
    fn take_dirty_with_devices(&self, states: &[TransportSnap]) -> Result<Vec<Vec<u64>>, String> {
        let mut maps = self.take_dirty_all()?;
        if self.virtio.is_empty() {
            return Ok(maps);
        }
        mark_used_rings(states);
        for (m, h) in maps.iter_mut().zip(self.regions()) {
            let dev = device_dirty::region(h.region.guest_phys_addr, h.region.size);
            super::dirty::merge(m, &dev);
        }
        device_dirty::clear();
        Ok(maps)
    }

    /// Parks every virtio device and returns its state; they stay parked (not touching guest
    /// memory) until `resume_devices`.
    fn save_devices(&self) -> Result<Vec<TransportSnap>, String> {
        self.virtio
            .iter()
            .enumerate()
            .map(|(i, d)| {
                d.save_state()
                    .map_err(|e| format!("cannot save virtio device {i}: {e}"))
            })
            .collect()
    }

    fn resume_devices(&self) {
        for d in &self.virtio {
            d.resume_saved();
        }
        self.devices_parked.store(false, Ordering::SeqCst);
    }

    /// Backend, vCPU and device state; the VM must be paused. Virtio devices are left parked:
    /// the caller resumes them (`resume_devices`) once memory is saved too.
    pub fn capture(&self) -> Result<MachineState, String> {
        let virtio = self.save_devices()?;
        let vm = self
            .vm
            .save_state()
            .map_err(|e| format!("cannot save the VM state: {e}"))?;
        let mut vcpus: Vec<CpuState> = Vec::with_capacity(self.vcpus.len());
        for (i, w) in self.vcpus.iter().enumerate() {
            let v = w
                .upgrade()
                .ok_or_else(|| format!("vCPU {i} has stopped; the VM is ending"))?;
            let s = v
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_state()
                .map_err(|e| format!("cannot save vCPU {i}: {e}"))?;
            vcpus.push(s);
        }
        Ok(MachineState {
            config: serde_json::to_value(&self.config).map_err(|e| e.to_string())?,
            vm,
            vcpus,
            devices: DeviceStates {
                serial: self.serial.save().into(),
                virtio,
            },
        })
    }

    /// Pauses unless already paused; returns whether this call paused (so must resume).
    fn pause(&self) -> Result<bool, (u16, String)> {
        match self.control.pause() {
            Ok(()) => Ok(true),
            Err(ControlError::AlreadyPaused) => Ok(false),
            Err(e @ ControlError::PauseTimeout(_)) => Err(err500(e)),
            Err(e) => Err((409, e.to_string())),
        }
    }

    /// Writes a snapshot of the VM into `dir` (which must not exist or be empty).
    pub fn snapshot(
        &self,
        dir: &Path,
        diff: bool,
        disk_overlays: Option<&Path>,
    ) -> Result<SnapshotReport, (u16, String)> {
        let mut track = self.lock();
        let parent =
            if diff {
                match (&track.last_snapshot, track.logging) {
                    (Some(p), true) => Some(p.clone()),
                    _ => return Err((
                        409,
                        "no earlier snapshot from this VMM to diff against: take a full one first"
                            .into(),
                    )),
                }
            } else {
                None
            };
        if dir.exists()
            && std::fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err((409, format!("{} exists and is not empty", dir.display())));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| (400, format!("cannot create {}: {e}", dir.display())))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| (400, format!("{}: {e}", dir.display())))?;
        let must_resume = self.pause()?;
        let t = Instant::now();
        let mut result = self.write_snapshot(&dir, parent, &mut track);
        if let (Ok(r), Some(o)) = (&mut result, disk_overlays) {
            // Still paused, devices parked: the disks freeze at the memory's instant.
            match crate::disk_overlay::freeze(&dir, o, &self.config) {
                Ok(d) => r.disks = d,
                Err(e) => result = Err(format!("same-instant disk snapshot: {e}")),
            }
        }
        let paused = t.elapsed();
        self.resume_devices();
        if must_resume {
            let _ = self.control.resume();
        }
        match result {
            Ok(mut r) => {
                r.paused_ms = paused.as_secs_f64() * 1e3;
                track.last_snapshot = Some(dir);
                Ok(r)
            }
            Err(e) => {
                // Leave no half snapshot behind under the requested name.
                let _ = std::fs::remove_file(dir.join(super::STATE_FILE));
                let _ = std::fs::remove_file(dir.join(MEMORY_FILE));
                Err(err500(e))
            }
        }
    }

    fn write_snapshot(
        &self,
        dir: &Path,
        parent: Option<PathBuf>,
        track: &mut Track,
    ) -> Result<SnapshotReport, String> {
        let machine = self.capture()?;
        let regions = self.regions();
        let mem_path = dir.join(MEMORY_FILE);
        let (file, diff) = match parent {
            Some(parent) => {
                let bitmaps = self.take_dirty_with_devices(&machine.devices.virtio)?;
                // SAFETY: the regions map the VM's live memory, and the VM is paused.
                let (info, runs) = unsafe { memfile::write_diff(&mem_path, &regions, &bitmaps) }
                    .map_err(|e| e.to_string())?;
                (info, Some(DiffRecord { parent, runs }))
            }
            None => {
                if track.logging {
                    // Restart the log: the next diff is relative to this snapshot.
                    self.take_dirty_with_devices(&[])?;
                }
                // SAFETY: as above.
                let info = unsafe { memfile::write_full(&mem_path, &regions) }
                    .map_err(|e| e.to_string())?;
                (info, None)
            }
        };
        if !track.logging {
            self.set_logging(true)?;
            track.logging = true;
        }
        let written = file.written;
        let snap = VmSnapshot {
            writer: format!("corefour {}", env!("CARGO_PKG_VERSION")),
            created_unix_ms: super::now_ms(),
            memory: MemoryRecord {
                regions: regions.iter().map(|h| h.region).collect(),
                file,
                diff,
            },
            machine,
        };
        snap.write(dir).map_err(|e| e.to_string())?;
        Ok(SnapshotReport {
            path: dir.to_path_buf(),
            diff: snap.memory.diff.is_some(),
            memory_bytes_written: written,
            paused_ms: 0.0,
            disks: Vec::new(),
        })
    }
}

impl MigrationSource for StateHandle {
    fn regions(&self) -> Vec<HostRegion> {
        StateHandle::regions(self)
    }
    fn config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }
    fn start_dirty_log(&self) -> Result<(), String> {
        let mut t = self.lock();
        if !t.logging {
            self.set_logging(true)?;
            t.logging = true;
        }
        // Start from a clean log; a later diff snapshot is no longer possible.
        t.last_snapshot = None;
        // One-time backend work (opening /dev/kvm for the MSR list) now, not in the downtime.
        let _ = self.vm.save_state();
        self.take_dirty_all().map(|_| ())
    }
    fn take_dirty(&self, index: usize) -> Result<Vec<u64>, String> {
        let r = self.regions();
        let h = r.get(index).ok_or("no such memory region")?;
        if self.devices_parked.load(Ordering::SeqCst) {
            // The stop-and-copy round: add every page a device wrote since pre-copy began
            // (the device log is cumulative, and the devices are parked now).
            let mut m = self
                .vm
                .dirty_log(index as u32, h.region.size)
                .map_err(|e| format!("cannot read the dirty log: {e}"))?;
            let dev = device_dirty::region(h.region.guest_phys_addr, h.region.size);
            super::dirty::merge(&mut m, &dev);
            return Ok(m);
        }
        self.vm
            .dirty_log(index as u32, h.region.size)
            .map_err(|e| format!("cannot read the dirty log: {e}"))
    }
    fn stop_dirty_log(&self) {
        let mut t = self.lock();
        if t.logging && self.set_logging(false).is_ok() {
            t.logging = false;
        }
    }
    fn pause(&self) -> Result<(), String> {
        // Already paused: the daemon pauses a guest before copying its disks (--copy-storage).
        match self.control.pause() {
            Ok(()) | Err(ControlError::AlreadyPaused) => {}
            Err(e) => return Err(e.to_string()),
        }
        if self.virtio.is_empty() {
            return Ok(());
        }
        // Devices stop writing guest memory before the last copy starts.
        self.devices_parked.store(true, Ordering::SeqCst);
        match self.save_devices() {
            Ok(states) => {
                mark_used_rings(&states);
                Ok(())
            }
            Err(e) => {
                self.resume_devices();
                let _ = self.control.resume();
                Err(e)
            }
        }
    }
    fn resume(&self) -> Result<(), String> {
        self.resume_devices();
        self.control.resume().map_err(|e| e.to_string())
    }
    fn state(&self) -> Result<Vec<u8>, String> {
        let m = self.capture()?;
        format::encode(format::KIND_MIGRATION_STATE, &m).map_err(|e| e.to_string())
    }
}

impl StateApi for StateHandle {
    fn snapshot(&self, body: &[u8]) -> Result<serde_json::Value, (u16, String)> {
        let req: SnapshotRequest = serde_json::from_slice(body).map_err(|e| {
            (
                400,
                format!("snapshot request: {e} (expected {{\"path\": DIR, \"diff\": bool}})"),
            )
        })?;
        let r = StateHandle::snapshot(self, &req.path, req.diff, req.disk_overlays.as_deref())?;
        serde_json::to_value(r).map_err(err500)
    }

    fn migrate(&self, body: &[u8]) -> Result<serde_json::Value, (u16, String)> {
        let req: MigrateRequest = serde_json::from_slice(body).map_err(|e| {
            (
                400,
                format!(
                    "migrate request: {e} (expected {{\"to\": \"HOST:PORT\", \"max_downtime_ms\": N}})"
                ),
            )
        })?;
        // Paused is fine too: the daemon pauses a guest while it copies its disks.
        if !matches!(self.control.state_name(), "running" | "paused") {
            return Err((409, "the VM must be running or paused to migrate it".into()));
        }
        let mut params = SendParams {
            max_downtime: Duration::from_millis(req.max_downtime_ms),
            copy_storage: req.copy_storage,
            ..Default::default()
        };
        if let Some(r) = req.max_rounds {
            params.max_rounds = r.max(1);
        }
        if let Some(t) = req.io_timeout_ms {
            params.io_timeout = Duration::from_millis(t.max(100));
        }
        let report = migration::migrate(self, &req.to, &params).map_err(|e| match e {
            migration::SendError::Connect { .. } => (502, e.to_string()),
            _ => (500, e.to_string()),
        })?;
        eprintln!(
            "corefour vmm: migrated to {}: total {:.1} ms, downtime {:.2} ms, {} rounds",
            req.to, report.total_ms, report.downtime_ms, report.rounds
        );
        serde_json::to_value(report).map_err(err500)
    }
}
