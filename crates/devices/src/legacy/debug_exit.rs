//! The debug-exit device: the guest writes an exit code and the VMM exits with it.
//!
//! Two windows onto the same request: port 0xf4 for ring-0 code (as QEMU's isa-debug-exit, but
//! the value written is the exit code itself, not `code << 1 | 1`), and a register in an MMIO
//! page for ring-3 code, since OUT from ring 3 faults on kvm_pvm.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::events::GuestEvents;

pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// Read from offset 8 of the MMIO window: lets a guest check the device is there.
pub const MMIO_EXIT_MAGIC: u32 = 0x4334_4558; // in memory order, the bytes "XE4C"

fn value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(b)
}

/// Port 0xf4 (1 to 4 bytes wide).
pub struct DebugExitPort {
    events: Arc<dyn GuestEvents>,
}

impl DebugExitPort {
    pub fn new(events: Arc<dyn GuestEvents>) -> Self {
        Self { events }
    }
}

impl BusDevice for DebugExitPort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 && !data.is_empty() {
            self.events.exit(value(data));
        }
    }
}

/// The MMIO window: offset 0 takes the exit code, offset 8 reads back [`MMIO_EXIT_MAGIC`].
pub struct DebugExitMmio {
    events: Arc<dyn GuestEvents>,
}

impl DebugExitMmio {
    pub fn new(events: Arc<dyn GuestEvents>) -> Self {
        Self { events }
    }
}

impl BusDevice for DebugExitMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 8 {
            let magic = MMIO_EXIT_MAGIC.to_le_bytes();
            let n = data.len().min(4);
            data[..n].copy_from_slice(&magic[..n]);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 && !data.is_empty() {
            self.events.exit(value(data));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub(crate) struct Recorder {
        pub exits: Mutex<Vec<u32>>,
        pub resets: Mutex<u32>,
    }
    impl GuestEvents for Recorder {
        fn exit(&self, code: u32) {
            self.exits.lock().unwrap().push(code);
        }
        fn reset(&self) {
            *self.resets.lock().unwrap() += 1;
        }
    }

    #[test]
    fn port_and_mmio_report_the_code() {
        let r = Arc::new(Recorder::default());
        let port = DebugExitPort::new(r.clone());
        port.write(0, &[42]);
        port.write(0, &[0x34, 0x12]);
        port.write(1, &[9]);
        port.write(0, &[]);
        let mmio = DebugExitMmio::new(r.clone());
        mmio.write(0, &7u32.to_le_bytes());
        mmio.write(0, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            r.exits.lock().unwrap().as_slice(),
            &[42, 0x1234, 7, 0x0403_0201]
        );
        let mut m = [0u8; 4];
        mmio.read(8, &mut m);
        assert_eq!(u32::from_le_bytes(m), MMIO_EXIT_MAGIC);
    }
}
