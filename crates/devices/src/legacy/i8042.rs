//! Just enough of the i8042 keyboard controller for a guest to reset the machine: writing 0xFE
//! (pulse the reset line) to the command port. Inserted at port 0x60 with length 5, so offset 0
//! is the data port and offset 4 the command/status port; 0x61 (the PC speaker) is claimed by
//! KVM's in-kernel PIT before it reaches the bus.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::events::GuestEvents;

pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u64 = 5;
const CMD_OFFSET: u64 = 4;
const CMD_RESET: u8 = 0xfe;

pub struct I8042 {
    events: Arc<dyn GuestEvents>,
}

impl I8042 {
    pub fn new(events: Arc<dyn GuestEvents>) -> Self {
        Self { events }
    }
}

impl BusDevice for I8042 {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // Status 0: no input, output buffer empty, so a guest polling it never waits.
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == CMD_OFFSET && data.first() == Some(&CMD_RESET) {
            self.events.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::debug_exit::tests::Recorder;

    #[test]
    fn only_fe_on_the_command_port_resets() {
        let r = Arc::new(Recorder::default());
        let k = I8042::new(r.clone());
        k.write(0, &[0xfe]);
        k.write(4, &[0xd1]);
        k.write(4, &[]);
        assert_eq!(*r.resets.lock().unwrap(), 0);
        k.write(4, &[0xfe]);
        assert_eq!(*r.resets.lock().unwrap(), 1);
    }
}
