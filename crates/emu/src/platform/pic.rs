//! The 8259 interrupt controller pair (master 0x20/0x21, slave 0xA0/0xA1): initialisation
//! words, masks, EOI, IRR/ISR reads and the interrupt acknowledge. Its output reaches the boot
//! CPU through the local APIC's LINT0 when that is in ExtINT mode (KVM's reset state) or the
//! APIC is disabled; the vCPU then takes the vector `ack` gives. Linux probes the pair, masks
//! it and routes everything through the I/O APIC, as the ACPI MADT tells it to.

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Chip {
    pub imr: u8,
    pub irr: u8,
    pub isr: u8,
    pub base: u8,
    /// Which ICW comes next: 0 = none (operational), 2..=4.
    pub icw: u8,
    pub need_icw4: bool,
    pub read_isr: bool,
    pub auto_eoi: bool,
    pub icw3: u8,
}

impl Chip {
    fn read(&self, odd: bool) -> u8 {
        if odd {
            self.imr
        } else if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }

    fn write(&mut self, odd: bool, v: u8) {
        if !odd {
            if v & 0x10 != 0 {
                // ICW1: reset and expect ICW2 (and ICW3 in cascade mode, ICW4 if asked).
                *self = Chip {
                    need_icw4: v & 1 != 0,
                    icw: 2,
                    icw3: if v & 2 != 0 { 1 } else { 0 },
                    ..Chip::default()
                };
            } else if v & 0x08 != 0 {
                // OCW3: bits 1:0 = 11 read ISR, 10 read IRR.
                if v & 2 != 0 {
                    self.read_isr = v & 1 != 0;
                }
            } else {
                // OCW2: non-specific (0x20) or specific (0x60 | n) EOI.
                match v >> 5 {
                    1 | 5 if self.isr != 0 => {
                        self.isr &= !(1 << self.isr.trailing_zeros());
                    }
                    3 | 7 => self.isr &= !(1 << (v & 7)),
                    _ => {}
                }
            }
            return;
        }
        match self.icw {
            2 => {
                self.base = v & 0xf8;
                // icw3 holds 1 here when ICW1 said single (no ICW3 follows).
                self.icw = if self.icw3 == 1 {
                    if self.need_icw4 {
                        4
                    } else {
                        0
                    }
                } else {
                    3
                };
            }
            3 => {
                self.icw3 = v;
                self.icw = if self.need_icw4 { 4 } else { 0 };
            }
            4 => {
                self.auto_eoi = v & 2 != 0;
                self.icw = 0;
            }
            _ => self.imr = v,
        }
    }
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Pic {
    pub chips: [Chip; 2],
    /// The device lines' current levels (bit n = ISA line n), for edge detection.
    #[serde(default)]
    pub lines: u16,
}

impl Pic {
    pub fn handles(port: u16) -> bool {
        matches!(port, 0x20 | 0x21 | 0xa0 | 0xa1)
    }

    pub fn read(&self, port: u16) -> u8 {
        self.chips[(port >= 0xa0) as usize].read(port & 1 != 0)
    }

    pub fn write(&mut self, port: u16, v: u8) {
        self.chips[(port >= 0xa0) as usize].write(port & 1 != 0, v);
    }

    /// An edge on ISA line `irq` (0..15): latched in IRR; the line is masked or not by IMR.
    pub fn raise(&mut self, irq: u8) {
        let c = &mut self.chips[(irq >= 8) as usize];
        c.irr |= 1 << (irq & 7);
        if irq >= 8 {
            self.chips[0].irr |= 1 << 2;
        }
    }

    /// The level of ISA line `irq` from a device: a rising edge latches a request, which stays
    /// until acknowledged even if the line drops first (edge mode, as KVM's 8259 keeps it).
    pub fn set_line(&mut self, irq: u8, level: bool) {
        let bit = 1u16 << (irq & 15);
        if level && self.lines & bit == 0 {
            self.raise(irq & 15);
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// The interrupt acknowledge cycle: takes the pending request (IRR to ISR, or straight
    /// through in auto-EOI mode) and returns its vector.
    pub fn ack(&mut self) -> Option<u8> {
        let v = self.pending()?;
        let take = |c: &mut Chip, line: u8| {
            c.irr &= !(1 << line);
            if !c.auto_eoi {
                c.isr |= 1 << line;
            }
        };
        let m_line = (self.chips[0].irr & !self.chips[0].imr).trailing_zeros() as u8;
        if m_line == 2 {
            let s_line = v - self.chips[1].base;
            take(&mut self.chips[1], s_line);
            if self.chips[1].irr & !self.chips[1].imr == 0 {
                self.chips[0].irr &= !(1 << 2);
            }
            let m = &mut self.chips[0];
            if !m.auto_eoi {
                m.isr |= 1 << 2;
            }
        } else {
            take(&mut self.chips[0], m_line);
        }
        Some(v)
    }

    /// The highest-priority unmasked request not below one in service (what INTA would take).
    pub fn pending(&self) -> Option<u8> {
        let m = &self.chips[0];
        let req = m.irr & !m.imr;
        let k = req.trailing_zeros() as u8;
        if req == 0 || (m.isr != 0 && m.isr.trailing_zeros() as u8 <= k) {
            return None;
        }
        if k == 2 {
            let s = &self.chips[1];
            let req = s.irr & !s.imr;
            if req == 0 {
                return None;
            }
            return Some(s.base + req.trailing_zeros() as u8);
        }
        Some(m.base + k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(p: &mut Pic) {
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
        ] {
            p.write(port, v);
        }
    }

    #[test]
    fn ack_moves_the_request_to_service_and_cascades() {
        let mut p = Pic::default();
        init(&mut p);
        p.write(0x21, 0xf0); // lines 0-3 unmasked on the master
        p.write(0xa1, 0x00);
        p.raise(3);
        assert_eq!(p.pending(), Some(0x33));
        assert_eq!(p.ack(), Some(0x33));
        assert_eq!(p.chips[0].isr, 1 << 3);
        assert_eq!(p.chips[0].irr, 0);
        assert_eq!(p.pending(), None, "nothing else requested");
        // A slave line below the one in service on the master still gets through (line 2).
        p.raise(9);
        assert_eq!(p.ack(), Some(0x39));
        assert_eq!(p.chips[1].isr, 1 << 1);
        assert_eq!(p.chips[0].isr, 1 << 3 | 1 << 2);
        // EOIs: slave first, then the master's two in-service lines.
        p.write(0xa0, 0x20);
        p.write(0x20, 0x20);
        p.write(0x20, 0x20);
        assert_eq!((p.chips[0].isr, p.chips[1].isr), (0, 0));
        // A device line: one request per rising edge, kept after the line drops.
        p.set_line(1, true);
        p.set_line(1, true);
        p.set_line(1, false);
        assert_eq!(p.ack(), Some(0x31));
        assert_eq!(p.ack(), None, "a held line is one request");
    }

    #[test]
    fn init_sequence_mask_and_eoi() {
        let mut p = Pic::default();
        init(&mut p);
        assert_eq!(p.chips[0].base, 0x30);
        assert_eq!(p.chips[1].base, 0x38);
        assert_eq!(p.chips[0].icw3, 0x04);
        assert_eq!(
            p.read(0x21),
            0,
            "ICW4 was the last init word, IMR untouched"
        );
        // Linux's probe: the mask reads back.
        p.write(0x21, 0xff);
        assert_eq!(p.read(0x21), 0xff);
        p.raise(0);
        assert_eq!(p.pending(), None, "masked");
        p.write(0x21, 0xfe);
        assert_eq!(p.pending(), Some(0x30));
        // IRR read (OCW3 0x0a) and ISR read (0x0b).
        p.write(0x20, 0x0a);
        assert_eq!(p.read(0x20), 1);
        p.chips[0].irr = 0;
        p.chips[0].isr = 1;
        p.write(0x20, 0x0b);
        assert_eq!(p.read(0x20), 1);
        p.write(0x20, 0x20); // non-specific EOI
        assert_eq!(p.read(0x20), 0);
    }

    #[test]
    fn slave_requests_cascade_through_irq2() {
        let mut p = Pic::default();
        init(&mut p);
        p.raise(9);
        assert_eq!(p.pending(), Some(0x39));
        p.chips[1].isr = 1 << 1;
        p.write(0xa0, 0x61); // specific EOI for line 1
        assert_eq!(p.chips[1].isr, 0);
    }
}
