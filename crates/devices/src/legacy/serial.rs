//! A 16550A UART (vm-superio) whose output goes to the console.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;

use crate::bus::{BusDevice, IrqLine};
use crate::console::Console;

/// The COM1 base port and its interrupt line.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt line, when there is one.
pub struct IrqTrigger(Option<Arc<dyn IrqLine>>);

impl Trigger for IrqTrigger {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        if let Some(line) = &self.0 {
            line.trigger();
        }
        Ok(())
    }
}

type Uart = vm_superio::Serial<IrqTrigger, NoEvents, Console>;

/// The UART; the same object can sit on the port bus and (as a mirror for ring-3 code, which
/// cannot use IN/OUT) on the MMIO bus.
pub struct Serial {
    uart: Mutex<Uart>,
    // Kept to rebuild the UART from a snapshot.
    console: Console,
    irq: Option<Arc<dyn IrqLine>>,
}

/// The UART's registers and input FIFO, for snapshots (see `Serial::save`).
pub use vm_superio::serial::SerialState;

impl Serial {
    pub fn new(console: Console, irq: Option<Arc<dyn IrqLine>>) -> Self {
        Self {
            uart: Mutex::new(vm_superio::Serial::new(
                IrqTrigger(irq.clone()),
                console.clone(),
            )),
            console,
            irq,
        }
    }

    /// The registers and pending input, for a snapshot.
    pub fn save(&self) -> SerialState {
        self.uart().state()
    }

    /// Loads registers saved by `save` (from an untrusted file: an oversized FIFO is refused).
    pub fn restore(&self, state: &SerialState) -> Result<(), String> {
        let uart = vm_superio::Serial::from_state(
            state,
            IrqTrigger(self.irq.clone()),
            NoEvents,
            self.console.clone(),
        )
        .map_err(|e| format!("serial state: {e:?}"))?;
        *self.uart() = uart;
        Ok(())
    }

    fn uart(&self) -> std::sync::MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues bytes for the guest to read (console input).
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        self.uart().enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for Serial {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // Registers are one byte wide; wider reads see the register in the low byte.
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            if off < 8 {
                *first = self.uart().read(off);
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if off < 8 {
                // The only error is the console failing, which the console already absorbs.
                let _ = self.uart().write(off, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn thr_writes_reach_the_console_and_lsr_says_empty() {
        let sink = Sink::default();
        let console = Console::new(Box::new(sink.clone()));
        let s = Serial::new(console.clone(), None);
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi\n");
        let mut lsr = [0u8; 1];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty bit");
    }

    #[test]
    fn hostile_offsets_and_sizes_do_not_panic() {
        let s = Serial::new(Console::new(Box::new(Sink::default())), None);
        for off in [0u64, 7, 8, 255, 256, u64::MAX] {
            s.write(off, &[]);
            s.write(off, &[1, 2, 3, 4, 5, 6, 7, 8]);
            let mut b = [0u8; 8];
            s.read(off, &mut b);
            s.read(off, &mut []);
        }
    }
}
