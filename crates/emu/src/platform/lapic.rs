//! The local APIC of one vCPU (xAPIC, MMIO at the APIC base): interrupt priority, EOI, the
//! timer (one-shot, periodic, TSC-deadline) and the ICR, whose IPIs the VM routes.
//! The timer counts at 1 GHz before the divider (time is in nanoseconds, like the TSC).

pub const BASE_DEFAULT: u64 = 0xfee0_0000;

/// An IPI the ICR asked for; the VM delivers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipi {
    pub vector: u8,
    pub mode: u8,
    pub logical: bool,
    pub shorthand: u8,
    pub dest: u8,
    pub level_assert: bool,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Lapic {
    pub id: u8,
    pub base: u64,
    pub tpr: u8,
    pub svr: u32,
    pub ldr: u32,
    pub dfr: u32,
    pub esr: u32,
    pub icr: u64,
    pub lvt: [u32; 7],
    pub irr: [u32; 8],
    pub isr: [u32; 8],
    pub tmr: [u32; 8],
    pub init_count: u32,
    pub divide: u32,
    /// When the timer fires next (ns of VM time), if armed.
    pub deadline: Option<u64>,
    /// When the current count was loaded (ns), for reading it back.
    pub loaded_at: u64,
    pub tsc_deadline: u64,
    pub nmi: bool,
    pub init: bool,
    pub sipi: Option<u8>,
}

const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
/// LVT delivery mode ExtINT (bits 10:8 = 111): the 8259 supplies the vector.
const EXTINT: u32 = 7 << 8;
const MASKED: u32 = 1 << 16;

impl Lapic {
    pub fn new(id: u8) -> Self {
        Lapic {
            id,
            base: BASE_DEFAULT | if id == 0 { 1 << 8 } else { 0 } | 1 << 11,
            tpr: 0,
            svr: 0xff,
            ldr: 0,
            dfr: 0xffff_ffff,
            esr: 0,
            icr: 0,
            lvt: {
                let mut lvt = [MASKED; 7];
                if id == 0 {
                    // As KVM resets the BSP: LINT0 in ExtINT mode, so the 8259 reaches it.
                    lvt[LVT_LINT0] = EXTINT;
                }
                lvt
            },
            irr: [0; 8],
            isr: [0; 8],
            tmr: [0; 8],
            init_count: 0,
            divide: 0,
            deadline: None,
            loaded_at: 0,
            tsc_deadline: 0,
            nmi: false,
            init: false,
            sipi: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.base & (1 << 11) != 0
    }

    fn sw_enabled(&self) -> bool {
        self.svr & 0x100 != 0
    }

    fn highest(bits: &[u32; 8]) -> Option<u8> {
        (0..8).rev().find_map(|k| {
            let w = bits[k];
            (w != 0).then(|| (k * 32 + 31 - w.leading_zeros() as usize) as u8)
        })
    }

    fn ppr(&self) -> u8 {
        let isr = Self::highest(&self.isr).unwrap_or(0);
        if self.tpr >> 4 >= isr >> 4 {
            self.tpr
        } else {
            isr & 0xf0
        }
    }

    /// Makes `vector` pending.
    pub fn accept(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.esr |= 1 << 6;
            return;
        }
        let (w, b) = ((vector / 32) as usize, vector % 32);
        self.irr[w] |= 1 << b;
        if level {
            self.tmr[w] |= 1 << b;
        } else {
            self.tmr[w] &= !(1 << b);
        }
    }

    /// The vector the CPU would take now, if any.
    pub fn pending(&self) -> Option<u8> {
        let v = Self::highest(&self.irr)?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// Moves the highest pending vector to in-service and returns it.
    pub fn ack(&mut self) -> Option<u8> {
        let v = self.pending()?;
        let (w, b) = ((v / 32) as usize, v % 32);
        self.irr[w] &= !(1 << b);
        self.isr[w] |= 1 << b;
        Some(v)
    }

    /// End of interrupt: returns the vector if it was level-triggered (the IOAPIC needs it).
    pub fn eoi(&mut self) -> Option<u8> {
        let v = Self::highest(&self.isr)?;
        let (w, b) = ((v / 32) as usize, v % 32);
        self.isr[w] &= !(1 << b);
        (self.tmr[w] & (1 << b) != 0).then_some(v)
    }

    fn divisor(&self) -> u64 {
        let d = (self.divide & 3) | ((self.divide >> 1) & 4);
        if d == 7 {
            1
        } else {
            2 << d
        }
    }

    fn timer_mode(&self) -> u32 {
        (self.lvt[LVT_TIMER] >> 17) & 3
    }

    /// Fires the timer if its deadline passed. Returns the next deadline.
    pub fn poll_timer(&mut self, now: u64) -> Option<u64> {
        if self.timer_mode() == 2 {
            if self.tsc_deadline != 0 && now >= self.tsc_deadline {
                self.tsc_deadline = 0;
                self.fire_timer();
            }
            return (self.tsc_deadline != 0).then_some(self.tsc_deadline);
        }
        let d = self.deadline?;
        if now < d {
            return Some(d);
        }
        self.fire_timer();
        if self.timer_mode() == 1 && self.init_count != 0 {
            let period = self.init_count as u64 * self.divisor();
            // Skip periods missed while the host was busy rather than firing them all.
            let next = d + period * ((now - d) / period + 1);
            self.loaded_at = next - period;
            self.deadline = Some(next);
        } else {
            self.deadline = None;
        }
        self.deadline
    }

    fn fire_timer(&mut self) {
        let lvt = self.lvt[LVT_TIMER];
        if lvt & MASKED == 0 && self.sw_enabled() {
            self.accept(lvt as u8, false);
        }
    }

    pub fn set_tsc_deadline(&mut self, v: u64) {
        if self.timer_mode() == 2 {
            self.tsc_deadline = v;
        }
    }

    pub fn read(&self, off: u64, now: u64) -> u32 {
        match off {
            0x20 => (self.id as u32) << 24,
            0x30 => 0x0005_0014,
            0x80 => self.tpr as u32,
            0xa0 => self.ppr() as u32,
            0xd0 => self.ldr,
            0xe0 => self.dfr,
            0xf0 => self.svr,
            0x100..=0x170 => self.isr[((off - 0x100) / 16) as usize],
            0x180..=0x1f0 => self.tmr[((off - 0x180) / 16) as usize],
            0x200..=0x270 => self.irr[((off - 0x200) / 16) as usize],
            0x280 => self.esr,
            0x300 => self.icr as u32 & !(1 << 12),
            0x310 => (self.icr >> 32) as u32,
            0x320..=0x380 if off.is_multiple_of(16) && off != 0x380 => {
                self.lvt[((off - 0x320) / 16) as usize]
            }
            0x380 => self.init_count,
            0x390 => match self.deadline {
                Some(d) if d > now && self.timer_mode() != 2 => ((d - now) / self.divisor()) as u32,
                _ => 0,
            },
            0x3e0 => self.divide,
            _ => 0,
        }
    }

    /// A register write. Returns an IPI to send (ICR low written) and whether an EOI for a
    /// level-triggered vector must reach the IOAPIC.
    pub fn write(&mut self, off: u64, v: u32, now: u64) -> (Option<Ipi>, Option<u8>) {
        match off {
            0x20 => self.id = (v >> 24) as u8,
            0x80 => self.tpr = v as u8,
            0xb0 => return (None, self.eoi()),
            0xd0 => self.ldr = v & 0xff00_0000,
            0xe0 => self.dfr = v | 0x0fff_ffff,
            0xf0 => {
                self.svr = v & 0x3ff;
                if v & 0x100 == 0 {
                    for l in self.lvt.iter_mut() {
                        *l |= MASKED;
                    }
                }
            }
            0x280 => self.esr = 0,
            0x300 => {
                self.icr = (self.icr & !0xffff_ffff) | v as u64;
                let ipi = Ipi {
                    vector: v as u8,
                    mode: ((v >> 8) & 7) as u8,
                    logical: v & (1 << 11) != 0,
                    level_assert: v & (1 << 14) != 0,
                    shorthand: ((v >> 18) & 3) as u8,
                    dest: (self.icr >> 56) as u8,
                };
                return (Some(ipi), None);
            }
            0x310 => self.icr = (self.icr & 0xffff_ffff) | (v as u64) << 32,
            0x320..=0x370 if off.is_multiple_of(16) => {
                let k = ((off - 0x320) / 16) as usize;
                let mut v = v;
                if !self.sw_enabled() {
                    v |= MASKED;
                }
                let old_mode = self.timer_mode();
                self.lvt[k] = v;
                if k == LVT_TIMER && old_mode != self.timer_mode() {
                    self.deadline = None;
                    self.tsc_deadline = 0;
                }
            }
            0x380 => {
                if self.timer_mode() == 2 {
                    return (None, None);
                }
                self.init_count = v;
                self.loaded_at = now;
                self.deadline = (v != 0).then(|| now + v as u64 * self.divisor());
            }
            0x3e0 => self.divide = v & 0xb,
            _ => {}
        }
        (None, None)
    }

    /// Whether the 8259's INTR output reaches this CPU: LINT0 unmasked in ExtINT mode, or the
    /// APIC globally disabled (the pin then goes straight to the core), as KVM decides.
    pub fn accepts_pic(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        !self.enabled() || (lint0 & MASKED == 0 && lint0 & (7 << 8) == EXTINT)
    }

    /// Whether this APIC is a destination of a logical/physical address.
    pub fn matches(&self, dest: u8, logical: bool) -> bool {
        if logical {
            let ldr = (self.ldr >> 24) as u8;
            if self.dfr >> 28 == 0xf {
                ldr & dest != 0
            } else {
                (dest >> 4) == (ldr >> 4) && (dest & ldr & 0xf) != 0
            }
        } else {
            dest == 0xff || dest == self.id
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_and_eoi() {
        let mut l = Lapic::new(0);
        l.write(0xf0, 0x1ff, 0);
        l.accept(0x31, false);
        l.accept(0x51, true);
        assert_eq!(l.ack(), Some(0x51));
        // 0x31 is below the in-service class.
        assert_eq!(l.pending(), None);
        assert_eq!(l.eoi(), Some(0x51));
        assert_eq!(l.ack(), Some(0x31));
        assert_eq!(l.eoi(), None);
    }

    #[test]
    fn one_shot_timer() {
        let mut l = Lapic::new(0);
        l.write(0xf0, 0x1ff, 0);
        l.write(0x3e0, 0xb, 0); // divide by 1
        l.write(0x320, 0x40, 0);
        l.write(0x380, 1000, 0);
        assert_eq!(l.read(0x390, 400), 600);
        assert_eq!(l.poll_timer(999), Some(1000));
        assert_eq!(l.pending(), None);
        assert_eq!(l.poll_timer(1000), None);
        assert_eq!(l.pending(), Some(0x40));
    }
}
