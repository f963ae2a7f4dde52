//! The I/O APIC (24 pins, MMIO at 0xFEC0_0000): routes platform interrupt lines to local APICs.

pub const BASE: u64 = 0xfec0_0000;
pub const PINS: usize = 24;

/// Where a pin's interrupt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub vector: u8,
    pub mode: u8,
    pub logical: bool,
    pub dest: u8,
    pub level: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ioapic {
    pub id: u32,
    pub sel: u32,
    pub redir: [u64; PINS],
    pub line: [bool; PINS],
}

const MASKED: u64 = 1 << 16;
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL: u64 = 1 << 15;

impl Default for Ioapic {
    fn default() -> Self {
        Ioapic {
            id: 0,
            sel: 0,
            redir: [MASKED; PINS],
            line: [false; PINS],
        }
    }
}

impl Ioapic {
    fn route(&self, pin: usize) -> Route {
        let e = self.redir[pin];
        Route {
            vector: e as u8,
            mode: ((e >> 8) & 7) as u8,
            logical: e & (1 << 11) != 0,
            dest: (e >> 56) as u8,
            level: e & LEVEL != 0,
        }
    }

    /// Sets a pin's level; returns the interrupt to deliver, if any.
    pub fn set_line(&mut self, pin: usize, level: bool) -> Option<Route> {
        let old = std::mem::replace(&mut self.line[pin], level);
        self.check(pin, !old && level)
    }

    fn check(&mut self, pin: usize, rising: bool) -> Option<Route> {
        let e = self.redir[pin];
        if e & MASKED != 0 {
            return None;
        }
        if e & LEVEL != 0 {
            if self.line[pin] && e & REMOTE_IRR == 0 {
                self.redir[pin] |= REMOTE_IRR;
                return Some(self.route(pin));
            }
            None
        } else {
            rising.then(|| self.route(pin))
        }
    }

    /// A local APIC finished a level-triggered `vector`: clears Remote IRR and re-delivers
    /// pins that are still asserted.
    pub fn eoi(&mut self, vector: u8) -> Vec<Route> {
        let mut out = Vec::new();
        for pin in 0..PINS {
            if self.redir[pin] as u8 == vector && self.redir[pin] & REMOTE_IRR != 0 {
                self.redir[pin] &= !REMOTE_IRR;
                if let Some(r) = self.check(pin, false) {
                    out.push(r);
                }
            }
        }
        out
    }

    pub fn read(&self, off: u64) -> u32 {
        match off {
            0x00 => self.sel,
            0x10 => match self.sel {
                0 => self.id << 24,
                1 => 0x0017_0011,
                2 => 0,
                r @ 0x10..=0x3f => {
                    let e = self.redir[((r - 0x10) / 2) as usize];
                    if r % 2 == 0 {
                        e as u32
                    } else {
                        (e >> 32) as u32
                    }
                }
                _ => 0,
            },
            _ => 0,
        }
    }

    /// A register write; returns an interrupt to deliver when unmasking an asserted line.
    pub fn write(&mut self, off: u64, v: u32) -> Option<Route> {
        match off {
            0x00 => self.sel = v & 0xff,
            0x10 => match self.sel {
                0 => self.id = (v >> 24) & 0xf,
                r @ 0x10..=0x3f => {
                    let pin = ((r - 0x10) / 2) as usize;
                    let e = &mut self.redir[pin];
                    if r % 2 == 0 {
                        // Remote IRR and delivery status are read-only.
                        let ro = *e & (REMOTE_IRR | 1 << 12);
                        *e = (*e & !0xffff_ffff) | (v as u64 & !(REMOTE_IRR | 1 << 12)) | ro;
                    } else {
                        *e = (*e & 0xffff_ffff) | (v as u64) << 32;
                    }
                    return self.check(pin, false);
                }
                _ => {}
            },
            0x40 => {
                let _ = self.eoi(v as u8);
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_pin_waits_for_eoi() {
        let mut io = Ioapic::default();
        io.write(0, 0x10 + 2 * 4);
        io.write(0x10, 0x8000 | 0x24);
        assert!(io.set_line(4, true).is_some());
        assert!(io.set_line(4, true).is_none());
        let again = io.eoi(0x24);
        assert_eq!(again.len(), 1, "still asserted: delivered again");
        io.set_line(4, false);
        assert!(io.eoi(0x24).is_empty());
    }

    #[test]
    fn masked_edge_is_dropped() {
        let mut io = Ioapic::default();
        assert!(io.set_line(1, true).is_none());
    }
}
