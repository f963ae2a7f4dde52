//! Building a VM from saved state instead of booting it: from a snapshot directory (memory
//! mapped MAP_PRIVATE from the snapshot file, so nothing is copied) or from memory a migration
//! filled. `warm` restores into a VM created ahead of time.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use corefour_devices::{Console, GuestEvents};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::machine_state::MachineState;
use super::memfile::{self, HostRegion, RamRegion};
use super::shell::{self, Phases, Shell};
use super::{SnapshotError, VmSnapshot, MEMORY_FILE};
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
    #[error(
        "the snapshot needs {want_vcpus} vCPUs and {want_mib} MiB, this warm VMM has \
         {have_vcpus} and {have_mib} MiB: restore it with a cold `corefour vmm --restore`"
    )]
    Shape {
        want_vcpus: u32,
        want_mib: u64,
        have_vcpus: u32,
        have_mib: u64,
    },
}

/// How the restore went, for the CLI's note and `corefour bench migrate`.
#[derive(Debug, Clone, Default)]
pub struct RestoreTiming {
    pub total_ms: f64,
    pub layers: usize,
    /// Where the time went, phase by phase.
    pub phases: Phases,
}

/// How a restore builds the VM.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Check the memory files' checksums first (reads every byte: for untrusted copies).
    pub verify: bool,
}

/// A snapshot chain, base first, with its memory files open (and checked when asked).
pub(crate) struct Chain {
    pub layers: Vec<(PathBuf, VmSnapshot)>,
    pub files: Vec<(PathBuf, File)>,
}

impl Chain {
    pub(crate) fn open(dir: &Path, verify: bool) -> Result<Self, RestoreError> {
        let layers = VmSnapshot::chain(dir)?;
        if layers.is_empty() {
            return Err(RestoreError::Config("empty snapshot chain".into()));
        }
        let mut files = Vec::with_capacity(layers.len());
        for (d, s) in &layers {
            let path = d.join(MEMORY_FILE);
            let f =
                memfile::open_checked(&path, s.memory.file.size).map_err(SnapshotError::from)?;
            if verify {
                let runs = s.memory.diff.as_ref().map(|d| d.runs.as_slice());
                memfile::verify(&path, &f, &s.memory.regions, runs, s.memory.file.crc32)
                    .map_err(SnapshotError::from)?;
            }
            files.push((path, f));
        }
        Ok(Self { layers, files })
    }

    /// The newest layer: its config, devices and vCPUs are what runs.
    pub(crate) fn top(&self) -> &VmSnapshot {
        // `open` refuses an empty chain.
        &self.layers[self.layers.len() - 1].1
    }

    pub(crate) fn config(&self) -> Result<VmConfig, RestoreError> {
        serde_json::from_value(self.top().machine.config.clone())
            .map_err(|e| RestoreError::Config(e.to_string()))
    }

    /// Writes the diff layers' pages over the base's in `host` (the private mappings).
    pub(crate) fn apply_diffs(&self, host: &[HostRegion]) -> Result<(), RestoreError> {
        for ((path, f), (_, s)) in self.files.iter().zip(&self.layers).skip(1) {
            if let Some(d) = &s.memory.diff {
                // SAFETY: `host` maps the guest's private regions, laid out as the diff's
                // (checked by `VmSnapshot::chain`), and no vCPU runs yet.
                unsafe { memfile::overlay_diff(path, f, host, &d.runs) }
                    .map_err(SnapshotError::from)?;
            }
        }
        Ok(())
    }
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

/// Restores the VM saved in `dir` (applying its chain of diff snapshots) into a new VM.
pub fn restore(
    dir: &Path,
    console: Console,
    opts: RestoreOptions,
) -> Result<(Vmm, RestoreTiming), RestoreError> {
    let t0 = Instant::now();
    let mut phases = Phases::default();
    let chain = Chain::open(dir, opts.verify)?;
    let config = chain.config()?;
    let t = phases.mark("read snapshot", t0);
    let top = chain.top();
    let regions = top.memory.regions.clone();
    let (base_path, base_file) = &chain.files[0];
    let mem = map_private(base_path, base_file, &regions)?;
    chain.apply_diffs(&host_regions(&mem, &regions))?;
    phases.mark("map memory", t);
    let register = |vm: &dyn corefour_hypervisor::Vm| {
        memory::register(&mem, vm).map_err(|e| RestoreError::from(VmmError::from(e)))
    };
    let shell = shell::build(
        backend_of(&top.machine),
        config.vcpus,
        register,
        &mut phases,
    )?;
    let t = Instant::now();
    let p = furnish(shell, config, &mem, console)?;
    let t = phases.mark("devices", t);
    let vmm = load(p, &top.machine, mem)?;
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

pub(crate) fn ms(since: Instant) -> f64 {
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
    let p = prepare_on(backend_of(state), config, &mem, console)?;
    load(p, state, mem)
}

/// A snapshot restores on the backend that wrote it: the vCPU and irqchip state of KVM and of
/// the software CPU are different formats (`load` checks they match).
pub(crate) fn backend_of(state: &MachineState) -> BackendKind {
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
    prepare_on(BackendKind::Kvm, config, mem, console)
}

fn prepare_on(
    kind: BackendKind,
    config: VmConfig,
    mem: &GuestMem,
    console: Console,
) -> Result<Prepared, RestoreError> {
    config
        .validate()
        .map_err(|e| RestoreError::Config(e.to_string()))?;
    let register = |vm: &dyn corefour_hypervisor::Vm| {
        memory::register(mem, vm).map_err(|e| RestoreError::from(VmmError::from(e)))
    };
    let shell = shell::build(kind, config.vcpus, register, &mut Phases::default())?;
    furnish(shell, config, mem, console)
}

/// Adds the devices of `config` to a shell whose vCPUs and memory are in place.
pub(crate) fn furnish(
    shell: Shell,
    config: VmConfig,
    mem: &GuestMem,
    console: Console,
) -> Result<Prepared, RestoreError> {
    config
        .validate()
        .map_err(|e| RestoreError::Config(e.to_string()))?;
    if config.vcpus as usize != shell.vcpus.len() {
        return Err(RestoreError::Config(format!(
            "the config asks for {} vCPUs, the VM has {}",
            config.vcpus,
            shell.vcpus.len()
        )));
    }
    let events: Arc<dyn GuestEvents> = shell.control.clone();
    // Disks, taps and sockets are opened again from the config; the devices stay inactive
    // until `load` puts their state back.
    let virtio = crate::virtio_devices::create(&config, mem, &shell.vm).map_err(VmmError::from)?;
    let mut pio = virtio.pio;
    if crate::boot::linux::is_bzimage(&config.kernel) {
        let pm = Arc::new(crate::acpi::PmRegisters::new(events.clone()));
        let base = u64::from(crate::acpi::PM_BASE_PORT);
        pio.push((pm, base, crate::acpi::PM_PORTS_LEN));
    }
    let (machine, serial) =
        machine::build_with(&shell.vm, console.clone(), events, virtio.mmio, pio)
            .map_err(VmmError::from)?;
    if !shell.ops.set(machine.clone()) {
        return Err(RestoreError::State {
            what: "the devices".into(),
            reason: "the vCPUs were already given devices (a VM is restored once)".into(),
        });
    }
    Ok(Prepared {
        config,
        backend: shell.backend,
        vm: shell.vm,
        control: shell.control,
        machine,
        serial,
        virtio: virtio.saveable,
        balloon: virtio.balloon,
        vcpus: shell.vcpus,
        console,
    })
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
