//! The machine model: which device sits where on the port and MMIO buses, and the `VmOps`
//! through which any backend reaches them.

use std::sync::Arc;

use corefour_devices::legacy::{
    i8042::{I8042_BASE, I8042_LEN},
    serial::{COM1_IRQ, COM1_PORT},
    DebugExitMmio, DebugExitPort, Serial, DEBUG_EXIT_PORT, I8042,
};
use corefour_devices::{Bus, BusError, Console, GuestEvents, IrqLine};
use corefour_hypervisor::{Vm, VmOps};

use crate::layout::{SERIAL_MMIO_ADDR, SERIAL_MMIO_LEN, SYS_MMIO_ADDR, SYS_MMIO_LEN};

/// Both buses, read-only once the vCPUs run.
pub struct Machine {
    pio: Bus,
    mmio: Bus,
    /// The virtio devices' run-time counters, where the builder recorded them.
    virtio_stats: std::sync::OnceLock<crate::virtio_devices::VirtioStats>,
}

impl Machine {
    pub fn set_virtio_stats(&self, stats: crate::virtio_devices::VirtioStats) {
        let _ = self.virtio_stats.set(stats);
    }

    pub fn virtio_stats(&self) -> Option<&crate::virtio_devices::VirtioStats> {
        self.virtio_stats.get()
    }
}

impl VmOps for Machine {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio.read(u64::from(port), data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

/// An interrupt line wired to a GSI of the backend's interrupt controller.
struct GsiLine {
    vm: Arc<dyn Vm>,
    gsi: u32,
}

impl IrqLine for GsiLine {
    fn trigger(&self) {
        // A backend without an interrupt controller has nowhere to send it; the guests that
        // need interrupts check for one.
        let _ = self.vm.set_irq_line(self.gsi, true);
        let _ = self.vm.set_irq_line(self.gsi, false);
    }
    fn set_level(&self, level: bool) {
        let _ = self.vm.set_irq_line(self.gsi, level);
    }
}

/// Builds the legacy PC devices: COM1 (+ MMIO mirror), debug-exit port and page, i8042.
/// Returns the buses and COM1 (for console input).
pub fn build(
    vm: &Arc<dyn Vm>,
    console: Console,
    events: Arc<dyn GuestEvents>,
) -> Result<(Arc<Machine>, Arc<Serial>), BusError> {
    build_with(vm, console, events, Vec::new(), Vec::new())
}

/// A device to add to a bus: (device, base, length).
pub type BusEntry = (Arc<dyn corefour_devices::BusDevice>, u64, u64);

/// As `build`, plus extra devices on the MMIO and port buses (the virtio transports).
pub fn build_with(
    vm: &Arc<dyn Vm>,
    console: Console,
    events: Arc<dyn GuestEvents>,
    extra_mmio: Vec<BusEntry>,
    extra_pio: Vec<BusEntry>,
) -> Result<(Arc<Machine>, Arc<Serial>), BusError> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    for (dev, base, len) in extra_mmio {
        mmio.insert(dev, base, len)?;
    }
    for (dev, base, len) in extra_pio {
        pio.insert(dev, base, len)?;
    }
    let irq: Arc<dyn IrqLine> = Arc::new(GsiLine {
        vm: vm.clone(),
        gsi: COM1_IRQ,
    });
    let serial = Arc::new(Serial::new(console, Some(irq)));
    pio.insert(serial.clone(), u64::from(COM1_PORT), 8)?;
    mmio.insert(serial.clone(), SERIAL_MMIO_ADDR, SERIAL_MMIO_LEN)?;
    pio.insert(
        Arc::new(DebugExitPort::new(events.clone())),
        u64::from(DEBUG_EXIT_PORT),
        4,
    )?;
    mmio.insert(
        Arc::new(DebugExitMmio::new(events.clone())),
        SYS_MMIO_ADDR,
        SYS_MMIO_LEN,
    )?;
    pio.insert(
        Arc::new(I8042::new(events)),
        u64::from(I8042_BASE),
        I8042_LEN,
    )?;
    Ok((
        Arc::new(Machine {
            pio,
            mmio,
            virtio_stats: std::sync::OnceLock::new(),
        }),
        serial,
    ))
}

/// Copies what arrives on `input` into COM1's receive FIFO until EOF, waiting while the guest
/// has not drained the FIFO (it holds 64 bytes). Runs on its own thread; never joined (a read
/// blocked on a terminal must not hold up the VMM's exit).
pub fn forward_input(serial: Arc<Serial>, mut input: impl std::io::Read + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("serial-in".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = serial.enqueue_input(rest);
                    rest = &rest[taken..];
                    if taken == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        });
    // Without the thread the guest simply gets no input.
    drop(spawned);
}
