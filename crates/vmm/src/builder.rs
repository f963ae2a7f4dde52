//! Building one VM from its config, then running it to its outcome.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corefour_devices::{Console, GuestEvents};
use corefour_hypervisor::{HypervisorError, Vm};

use crate::backend::{self, BackendError};
use crate::boot::{self, BootError, BootPlan};
use crate::config::{ConfigError, VmConfig};
use crate::control::{Control, Outcome};
use crate::machine;
use crate::memory::{self, GuestMem, MemoryError};
use crate::vcpu_thread::SharedVcpu;
use crate::{api_server, signals, vcpu_thread};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot create the VM on the {backend} backend: {source}")]
    CreateVm {
        backend: &'static str,
        #[source]
        source: HypervisorError,
    },
    #[error("cannot create vCPU {index}: {source}")]
    CreateVcpu {
        index: u32,
        #[source]
        source: HypervisorError,
    },
    #[error(transparent)]
    Virtio(#[from] crate::virtio_devices::VirtioSetupError),
    #[error("cannot place devices: {0}")]
    Devices(#[from] corefour_devices::BusError),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Api(#[from] api_server::ApiError),
    #[error(transparent)]
    Signals(#[from] signals::SignalError),
}

/// How to run a built VM.
#[derive(Default)]
pub struct RunOptions {
    pub timeout: Option<Duration>,
    pub api_sock: Option<PathBuf>,
    /// Route SIGTERM/SIGINT to a graceful shutdown (the CLI sets it; tests in-process do not).
    pub handle_signals: bool,
    /// Feed the process's stdin to the guest's COM1.
    pub forward_stdin: bool,
}

/// What the run produced.
#[derive(Debug)]
pub struct RunReport {
    pub outcome: Outcome,
    /// The VMM's resident memory at the end (all, and anonymous only), and how much of it is
    /// guest RAM (which is anonymous).
    pub rss_bytes: u64,
    pub anon_bytes: u64,
    pub guest_resident_bytes: u64,
    /// Each vCPU's registers when it stopped (None where the backend could not say).
    pub final_regs: Vec<Option<corefour_hypervisor::Regs>>,
    /// The virtio interrupt/notify counters ("msix_irqfd=N ..."), empty where not recorded.
    pub virtio_stats: String,
}

/// A VM ready to run: memory loaded, vCPUs at the entry, devices on the buses.
pub struct Vmm {
    pub(crate) config: VmConfig,
    pub(crate) backend: &'static str,
    pub(crate) backend_why: String,
    // Field order is drop order: vCPUs go before the VM, the VM before the memory it maps.
    pub(crate) vcpus: Vec<SharedVcpu>,
    pub(crate) _machine: Arc<machine::Machine>,
    pub(crate) vm: Arc<dyn Vm>,
    pub(crate) mem: GuestMem,
    pub(crate) control: Arc<Control>,
    pub(crate) balloon: Option<corefour_devices::virtio::balloon::BalloonHandle>,
    /// The virtio transports, in config order (snapshots save and restore them).
    pub(crate) virtio: Vec<Arc<dyn corefour_devices::virtio::state::SaveRestore>>,
    pub(crate) console: Console,
    pub(crate) serial: Arc<corefour_devices::legacy::Serial>,
}

impl Vmm {
    /// Checks the config, loads the guest and creates the VM; nothing runs yet.
    pub fn build(config: VmConfig, console: Console) -> Result<Self, VmmError> {
        config.validate()?;
        let config = crate::virtio_devices::add_to_cmdline(config);
        let mem = memory::allocate(config.memory_mib)?;
        let plan: BootPlan = boot::prepare(&mem, &config)?;
        let picked = backend::open(config.backend)?;
        let name = picked.hypervisor.name();
        let vm = picked
            .hypervisor
            .create_vm(config.vcpus)
            .map_err(|source| VmmError::CreateVm {
                backend: name,
                source,
            })?;
        memory::register(&mem, vm.as_ref())?;
        let control = Control::new(config.vcpus);
        let events: Arc<dyn GuestEvents> = control.clone();
        let virtio = crate::virtio_devices::create(&config, &mem, &vm)?;
        let mut pio = virtio.pio;
        if plan.linux.is_some() {
            let pm = Arc::new(crate::acpi::PmRegisters::new(events.clone()));
            let base = u64::from(crate::acpi::PM_BASE_PORT);
            pio.push((pm, base, crate::acpi::PM_PORTS_LEN));
        }
        let (ops, serial) = machine::build_with(&vm, console.clone(), events, virtio.mmio, pio)?;
        ops.set_virtio_stats(virtio.stats);
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let mut vcpu = vm
                .create_vcpu(index, ops.clone())
                .map_err(|source| VmmError::CreateVcpu { index, source })?;
            boot::setup_vcpu(vcpu.as_mut(), &plan, index)?;
            control.add_kicker(vcpu.kicker());
            vcpus.push(Arc::new(Mutex::new(vcpu)));
        }
        Ok(Self {
            config,
            backend: name,
            backend_why: picked.why + &virtio.eventfds.describe(),
            vcpus,
            _machine: ops,
            vm,
            mem,
            control,
            balloon: virtio.balloon,
            virtio: virtio.saveable,
            console,
            serial,
        })
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Why this backend (for the stderr note: "auto: /dev/kvm is usable").
    pub fn backend_why(&self) -> &str {
        &self.backend_why
    }

    /// Runs the VM until the guest exits, resets, times out or is shut down.
    pub fn run(mut self, opts: RunOptions) -> Result<RunReport, VmmError> {
        if opts.handle_signals {
            signals::block()?;
        }
        let api = match &opts.api_sock {
            Some(path) => Some(api_server::start(
                path,
                api_server::VmInfo {
                    vcpus: self.config.vcpus,
                    memory_mib: self.config.memory_mib,
                    backend: self.backend,
                    balloon: self.balloon.clone(),
                },
                self.control.clone(),
                Some(Arc::new(crate::snapshot::handle::StateHandle::new(&self))),
            )?),
            None => None,
        };
        let mut threads = Vec::new();
        // vCPU threads first, helpers after: on a loaded host a new thread can wait
        // milliseconds for a CPU, and the guest's first instruction should not queue behind
        // threads that only wait for signals or input. (Each vCPU keeps its own thread named
        // vcpuN: the daemon pins them by name.)
        for (index, vcpu) in (0u32..).zip(std::mem::take(&mut self.vcpus)) {
            match vcpu_thread::spawn(index, vcpu, self.control.clone()) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.control.finish(Outcome::Error(e.to_string()));
                    return Err(VmmError::Thread(e));
                }
            }
        }
        if opts.handle_signals {
            if let Err(e) = signals::spawn_handler(self.control.clone()) {
                self.control.finish(Outcome::Error(e.to_string()));
            }
        }
        if opts.forward_stdin {
            machine::forward_input(self.serial.clone(), std::io::stdin());
        }
        let console = self.console.clone();
        let outcome = self
            .control
            .wait_outcome(opts.timeout, Duration::from_millis(50), || {
                console.flush_all()
            });
        // Every vCPU was kicked by `finish`; a thread that does not come back in time is left
        // behind (the process is about to exit) rather than hanging the VMM.
        if self.control.wait_exited(Duration::from_secs(2)) {
            for t in threads {
                let _ = t.join();
            }
        }
        self.console.flush_all();
        drop(api);
        Ok(RunReport {
            outcome,
            rss_bytes: self_status_bytes("VmRSS:"),
            anon_bytes: self_status_bytes("RssAnon:"),
            guest_resident_bytes: memory::resident_bytes(&self.mem),
            final_regs: self.control.final_regs(),
            virtio_stats: self
                ._machine
                .virtio_stats()
                .map(|s| s.describe())
                .unwrap_or_default(),
        })
    }
}

/// A kB field of /proc/self/status, in bytes (0 where unreadable).
fn self_status_bytes(key: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
