//! Building a VM from saved state instead of booting it: from a snapshot directory (memory
//! mapped MAP_PRIVATE from the snapshot file, so nothing is copied) or from memory a migration
//! filled.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use corefour_devices::{Console, GuestEvents};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::machine_state::MachineState;
use super::memfile::{self, HostRegion, RamRegion};
use super::{SnapshotError, VmSnapshot, MEMORY_FILE};
use crate::backend;
use crate::builder::{Vmm, VmmError};
use crate::config::{BackendKind, VmConfig};
use crate::control::Control;
use crate::machine;
use crate::memory::{self, GuestMem};
use corefour_devices::virtio::state::SaveRestore;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("snapshot config is not valid: {0}")]
    Config(String),
    #[error("cannot map the snapshot memory {path}: {reason}")]
    Map { path: String, reason: String },
    #[error("the state was saved on the {saved} backend, this VM runs on {found}")]
    Backend { saved: String, found: &'static str },
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("cannot restore {what}: {reason}")]
    State { what: String, reason: String },
}

/// How the restore went, for the CLI's note and `corefour bench migrate`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreTiming {
    pub total_ms: f64,
    pub layers: usize,
    /// Reading the snapshot and mapping its memory.
    pub map_ms: f64,
    /// Creating the KVM VM (irqchip, PIT).
    pub vm_ms: f64,
    /// Registering guest memory with KVM and creating the vCPUs (overlapped, see `prepare`).
    pub memory_vcpus_ms: f64,
    /// Loading the saved VM and vCPU state.
    pub state_ms: f64,
}

/// How a restore builds the VM.
#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions {
    /// Check the memory files' checksums first (reads every byte: for untrusted copies).
    pub verify: bool,
    /// Register memory and create vCPUs one after the other, as before they overlapped (kept
    /// so `corefour bench migrate` can measure both in one run).
    pub serial_setup: bool,
}

/// Maps `regions` of `file` privately as guest memory.
fn map_private(path: &Path, file: &File, regions: &[RamRegion]) -> Result<GuestMem, RestoreError> {
    let map_err = |reason: String| RestoreError::Map {
        path: path.display().to_string(),
        reason,
    };
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let f = file.try_clone().map_err(|e| map_err(e.to_string()))?;
        let mmap = MmapRegion::build(
            Some(FileOffset::new(f, r.file_offset)),
            r.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mmap, GuestAddress(r.guest_phys_addr))
            .ok_or_else(|| map_err("region wraps the guest address space".into()))?;
        out.push(region);
    }
    GuestMem::from_regions(out).map_err(|e| map_err(e.to_string()))
}

pub(crate) fn host_regions(mem: &GuestMem, layout: &[RamRegion]) -> Vec<HostRegion> {
    mem.iter()
        .zip(layout)
        .filter_map(|(r, region)| {
            let host = mem.get_host_address(r.start_addr()).ok()?;
            Some(HostRegion {
                region: *region,
                host_addr: host as usize,
            })
        })
        .collect()
}

/// Restores the VM saved in `dir` (applying its chain of diff snapshots).
pub fn restore(
    dir: &Path,
    console: Console,
    opts: RestoreOptions,
) -> Result<(Vmm, RestoreTiming), RestoreError> {
    let t = Instant::now();
    let chain = VmSnapshot::chain(dir)?;
    let Some((_, top)) = chain.last() else {
        return Err(RestoreError::Config("empty snapshot chain".into()));
    };
    let regions = top.memory.regions.clone();
    let mut files = Vec::with_capacity(chain.len());
    for (d, s) in &chain {
        let path = d.join(MEMORY_FILE);
        let f = memfile::open_checked(&path, s.memory.file.size).map_err(SnapshotError::from)?;
        if opts.verify {
            let runs = s.memory.diff.as_ref().map(|d| d.runs.as_slice());
            memfile::verify(&path, &f, &s.memory.regions, runs, s.memory.file.crc32)
                .map_err(SnapshotError::from)?;
        }
        files.push((path, f));
    }
    let (base_path, base_file) = &files[0];
    let mem = map_private(base_path, base_file, &regions)?;
    let host = host_regions(&mem, &regions);
    for ((path, f), (_, s)) in files.iter().zip(&chain).skip(1) {
        if let Some(d) = &s.memory.diff {
            // SAFETY: `host` maps `mem`'s private regions, laid out as the diff's (checked by
            // `chain`), and no vCPU runs yet.
            unsafe { memfile::overlay_diff(path, f, &host, &d.runs) }
                .map_err(SnapshotError::from)?;
        }
    }
    let map_ms = ms(t);
    let config: VmConfig = serde_json::from_value(top.machine.config.clone())
        .map_err(|e| RestoreError::Config(e.to_string()))?;
    let kind = backend_of(&top.machine);
    let p = prepare_with(config, &mem, console, !opts.serial_setup, kind)?;
    let t_state = Instant::now();
    let vmm = load(p.0, &top.machine, mem)?;
    Ok((
        vmm,
        RestoreTiming {
            total_ms: ms(t),
            layers: chain.len(),
            map_ms,
            vm_ms: p.1,
            memory_vcpus_ms: p.2,
            state_ms: ms(t_state),
        },
    ))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Builds a VM around `mem` and loads `state` into it; nothing runs yet.
pub fn assemble(
    state: &MachineState,
    mem: GuestMem,
    console: Console,
) -> Result<Vmm, RestoreError> {
    let config: VmConfig = serde_json::from_value(state.config.clone())
        .map_err(|e| RestoreError::Config(e.to_string()))?;
    let p = prepare_with(config, &mem, console, true, backend_of(state))?;
    load(p.0, state, mem)
}

/// A snapshot restores on the backend that wrote it: the vCPU and irqchip state of KVM and of
/// the software CPU are different formats (`load` checks they match).
fn backend_of(state: &MachineState) -> BackendKind {
    match state.vm.backend.as_str() {
        "emu" => BackendKind::Emu,
        _ => BackendKind::Kvm,
    }
}

/// A VM created for a config, memory registered, devices and vCPUs made, no state loaded:
/// a migration target gets this far before the source stops, so it is not downtime.
pub struct Prepared {
    config: VmConfig,
    backend: &'static str,
    vm: Arc<dyn corefour_hypervisor::Vm>,
    control: Arc<Control>,
    machine: Arc<machine::Machine>,
    serial: Arc<corefour_devices::legacy::Serial>,
    virtio: Vec<Arc<dyn SaveRestore>>,
    balloon: Option<corefour_devices::virtio::balloon::BalloonHandle>,
    vcpus: Vec<Box<dyn corefour_hypervisor::Vcpu>>,
    console: Console,
}

pub fn prepare(
    config: VmConfig,
    mem: &GuestMem,
    console: Console,
) -> Result<Prepared, RestoreError> {
    prepare_with(config, mem, console, true, BackendKind::Kvm).map(|p| p.0)
}

/// `prepare`, also returning how long creating the VM, and registering memory plus creating
/// the vCPUs, took (ms).
///
/// Registering guest memory (KVM_SET_USER_MEMORY_REGION) waits for an SRCU grace period and
/// allocates the slot's reverse-map arrays; on a busy host that is most of a restore. It needs
/// nothing the vCPUs need, so with `overlap` it runs on a second thread while the vCPUs are
/// created (KVM_CREATE_VCPU takes the VM lock, not the slots lock) and their grace periods
/// coincide.
fn prepare_with(
    config: VmConfig,
    mem: &GuestMem,
    console: Console,
    overlap: bool,
    kind: BackendKind,
) -> Result<(Prepared, f64, f64), RestoreError> {
    config
        .validate()
        .map_err(|e| RestoreError::Config(e.to_string()))?;
    let t = Instant::now();
    let picked = backend::open(kind).map_err(VmmError::from)?;
    let name = picked.hypervisor.name();
    let vm = picked
        .hypervisor
        .create_vm(config.vcpus)
        .map_err(|source| VmmError::CreateVm {
            backend: name,
            source,
        })?;
    let vm_ms = ms(t);
    let t = Instant::now();
    let control = Control::new(config.vcpus);
    let events: Arc<dyn GuestEvents> = control.clone();
    let make_vcpus = || -> Result<_, RestoreError> {
        // Disks, taps and sockets are opened again from the config; the devices stay inactive
        // until `load` puts their state back.
        let virtio = crate::virtio_devices::create(&config, mem, &vm).map_err(VmmError::from)?;
        let mut pio = virtio.pio;
        if crate::boot::linux::is_bzimage(&config.kernel) {
            let pm = Arc::new(crate::acpi::PmRegisters::new(events.clone()));
            let base = u64::from(crate::acpi::PM_BASE_PORT);
            pio.push((pm, base, crate::acpi::PM_PORTS_LEN));
        }
        let (machine, serial) =
            machine::build_with(&vm, console.clone(), events.clone(), virtio.mmio, pio)
                .map_err(VmmError::from)?;
        machine.set_virtio_stats(virtio.stats);
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(index, machine.clone())
                .map_err(|source| VmmError::CreateVcpu { index, source })?;
            control.add_kicker(vcpu.kicker());
            vcpus.push(vcpu);
        }
        Ok((machine, serial, vcpus, virtio.saveable, virtio.balloon))
    };
    let register = || -> Result<(), RestoreError> {
        memory::register(mem, vm.as_ref()).map_err(|e| VmmError::from(e).into())
    };
    let (machine, serial, vcpus, virtio, balloon) = if overlap {
        std::thread::scope(|s| {
            let reg = std::thread::Builder::new()
                .name("mem-register".into())
                .spawn_scoped(s, register);
            let made = make_vcpus();
            let registered = match reg {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err(RestoreError::State {
                        what: "guest memory".into(),
                        reason: "the registration thread panicked".into(),
                    })
                }),
                // No thread to spare: register here.
                Err(_) => register(),
            };
            registered?;
            made
        })?
    } else {
        register()?;
        make_vcpus()?
    };
    let setup_ms = ms(t);
    Ok((
        Prepared {
            config,
            backend: name,
            vm,
            control,
            machine,
            serial,
            virtio,
            balloon,
            vcpus,
            console,
        },
        vm_ms,
        setup_ms,
    ))
}

/// Loads the saved state into a prepared VM.
pub fn load(p: Prepared, state: &MachineState, mem: GuestMem) -> Result<Vmm, RestoreError> {
    let config: VmConfig = serde_json::from_value(state.config.clone())
        .map_err(|e| RestoreError::Config(e.to_string()))?;
    if config != p.config {
        return Err(RestoreError::Config(
            "the saved state's config differs from the one the VM was prepared for".into(),
        ));
    }
    if state.vcpus.len() != p.vcpus.len() {
        return Err(RestoreError::Config(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            p.vcpus.len()
        )));
    }
    if state.vm.backend != p.backend {
        return Err(RestoreError::Backend {
            saved: state.vm.backend.clone(),
            found: p.backend,
        });
    }
    p.vm.restore_state(&state.vm)
        .map_err(|e| RestoreError::State {
            what: "the VM (irqchip, PIT, clock)".into(),
            reason: e.to_string(),
        })?;
    p.serial
        .restore(&(&state.devices.serial).into())
        .map_err(|reason| RestoreError::State {
            what: "the serial port".into(),
            reason,
        })?;
    if state.devices.virtio.len() != p.virtio.len() {
        return Err(RestoreError::State {
            what: "the virtio devices".into(),
            reason: format!(
                "the saved state holds {} virtio devices, the config has {}",
                state.devices.virtio.len(),
                p.virtio.len()
            ),
        });
    }
    let mut vcpus = Vec::with_capacity(p.vcpus.len());
    for ((index, mut vcpu), s) in (0u32..).zip(p.vcpus).zip(&state.vcpus) {
        vcpu.restore_state(s).map_err(|e| RestoreError::State {
            what: format!("vCPU {index}"),
            reason: e.to_string(),
        })?;
        vcpus.push(Arc::new(Mutex::new(vcpu)));
    }
    // Last: a restarted device may interrupt at once, into the restored irqchip.
    for (i, (dev, s)) in p.virtio.iter().zip(&state.devices.virtio).enumerate() {
        dev.restore_state(s).map_err(|e| RestoreError::State {
            what: format!("virtio device {i} ({})", s.device.name()),
            reason: e.to_string(),
        })?;
    }
    Ok(Vmm {
        config: p.config,
        backend: p.backend,
        backend_why: "restored from saved state".into(),
        vcpus,
        _machine: p.machine,
        serial: p.serial,
        vm: p.vm,
        mem,
        control: p.control,
        balloon: p.balloon,
        virtio: p.virtio,
        console: p.console,
    })
}
