//! The 8254 programmable interval timer (ports 0x40-0x43) and the port 0x61 gate/output bits of
//! channel 2, counted from VM time (nanoseconds) at 1.193182 MHz. Channel 0 raises IRQ0;
//! channel 2 is what Linux's TSC calibration watches through port 0x61.

pub const FREQ_HZ: u64 = 1_193_182;
const NS: u64 = 1_000_000_000;

fn ticks(ns: u64) -> u64 {
    (ns as u128 * FREQ_HZ as u128 / NS as u128) as u64
}

fn ns_of(ticks: u64) -> u64 {
    (ticks as u128 * NS as u128).div_ceil(FREQ_HZ as u128) as u64
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Channel {
    pub mode: u8,
    /// 1 = low byte, 2 = high byte, 3 = low then high.
    pub access: u8,
    /// The count written; 0 means 65536.
    pub reload: u16,
    /// VM time the count was loaded (counting starts), if it is counting.
    pub start: Option<u64>,
    pub gate: bool,
    pub latch: Option<u16>,
    pub status: Option<u8>,
    read_hi: bool,
    write_hi: bool,
    write_lo: u8,
    /// Channel 0: when the next IRQ0 edge is due.
    pub next_irq: Option<u64>,
}

impl Channel {
    fn period(&self) -> u64 {
        if self.reload == 0 {
            0x10000
        } else {
            self.reload as u64
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode, 2 | 3 | 6 | 7)
    }

    /// Elapsed input clocks since the count was loaded, if counting.
    fn elapsed(&self, now: u64) -> Option<u64> {
        self.start.map(|s| ticks(now.saturating_sub(s)))
    }

    pub fn count(&self, now: u64) -> u16 {
        let n = self.period();
        let Some(t) = self.elapsed(now) else {
            return self.reload;
        };
        match self.mode {
            2 | 6 => (n - t % n) as u16,
            // Square wave: the counter drops by two each clock, twice per period.
            3 | 7 => {
                let half = n.div_ceil(2).max(1);
                ((n - 2 * (t % half)) & 0xffff) as u16
            }
            _ => (n.wrapping_sub(t) & 0xffff) as u16,
        }
    }

    pub fn output(&self, now: u64) -> bool {
        let n = self.period();
        let Some(t) = self.elapsed(now) else {
            // Mode 0 drives low once programmed; the others idle high.
            return self.mode != 0;
        };
        match self.mode {
            2 | 6 => n - t % n != 1,
            3 | 7 => t % n < n.div_ceil(2),
            1 | 5 => t >= n,
            4 => t != n,
            _ => t >= n,
        }
    }

    fn arm(&mut self, now: u64, is_ch0: bool) {
        self.start = self.gate.then_some(now);
        self.next_irq = match (is_ch0, self.start) {
            (true, Some(s)) => Some(s + ns_of(self.period())),
            _ => None,
        };
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        let v = match self.latch {
            Some(l) => l,
            None => self.count(now),
        };
        let b = match self.access {
            1 => v as u8,
            2 => (v >> 8) as u8,
            _ => {
                let hi = self.read_hi;
                self.read_hi = !hi;
                if hi {
                    (v >> 8) as u8
                } else {
                    return v as u8;
                }
            }
        };
        self.latch = None;
        b
    }

    fn write(&mut self, v: u8, now: u64, is_ch0: bool) {
        match self.access {
            1 => self.reload = v as u16,
            2 => self.reload = (v as u16) << 8,
            _ => {
                if !self.write_hi {
                    self.write_lo = v;
                    self.write_hi = true;
                    return;
                }
                self.write_hi = false;
                self.reload = (v as u16) << 8 | self.write_lo as u16;
            }
        }
        self.arm(now, is_ch0);
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Pit {
    pub ch: [Channel; 3],
    /// Port 0x61 bit 1 (speaker data); bit 0 is channel 2's gate.
    pub speaker: bool,
}

impl Default for Pit {
    fn default() -> Self {
        let mut ch: [Channel; 3] = Default::default();
        ch[0].gate = true;
        ch[1].gate = true;
        Pit { ch, speaker: false }
    }
}

impl Pit {
    pub fn handles(port: u16) -> bool {
        matches!(port, 0x40..=0x43 | 0x61)
    }

    pub fn read(&mut self, port: u16, now: u64) -> u8 {
        match port {
            0x40..=0x42 => self.ch[(port - 0x40) as usize].read(now),
            0x61 => {
                let c = &self.ch[2];
                (c.gate as u8)
                    | (self.speaker as u8) << 1
                    | (c.output(now) as u8) << 5
                    // Bit 4 (refresh) toggles every 15 us; some delay loops watch it.
                    | (((now / 15_000) & 1) as u8) << 4
            }
            _ => 0xff,
        }
    }

    pub fn write(&mut self, port: u16, v: u8, now: u64) {
        match port {
            0x40..=0x42 => {
                let k = (port - 0x40) as usize;
                self.ch[k].write(v, now, k == 0);
            }
            0x43 => self.control(v, now),
            0x61 => {
                self.speaker = v & 2 != 0;
                let gate = v & 1 != 0;
                let c = &mut self.ch[2];
                let rising = gate && !c.gate;
                c.gate = gate;
                if !gate && c.mode != 0 {
                    c.start = None;
                }
                if rising && (c.start.is_none() || c.mode != 0) {
                    c.start = Some(now);
                }
            }
            _ => {}
        }
    }

    fn control(&mut self, v: u8, now: u64) {
        let sel = (v >> 6) as usize;
        if sel == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
            for k in 0..3 {
                if v & (2 << k) == 0 {
                    continue;
                }
                let c = &mut self.ch[k];
                if v & 0x20 == 0 && c.latch.is_none() {
                    c.latch = Some(c.count(now));
                }
                if v & 0x10 == 0 && c.status.is_none() {
                    c.status = Some((c.output(now) as u8) << 7 | c.access << 4 | c.mode << 1);
                }
            }
            return;
        }
        let c = &mut self.ch[sel];
        let access = (v >> 4) & 3;
        if access == 0 {
            if c.latch.is_none() {
                c.latch = Some(c.count(now));
                c.read_hi = false;
            }
            return;
        }
        c.access = access;
        c.mode = (v >> 1) & 7;
        c.read_hi = false;
        c.write_hi = false;
        c.latch = None;
        // A new mode stops the counter until a count is written.
        c.start = None;
        if sel == 0 {
            c.next_irq = None;
        }
    }

    /// Whether channel 0 produced an IRQ0 edge by `now`; re-arms periodic modes.
    pub fn poll(&mut self, now: u64) -> bool {
        let c = &mut self.ch[0];
        let Some(d) = c.next_irq else {
            return false;
        };
        if now < d {
            return false;
        }
        if c.periodic() {
            let p = ns_of(c.period()).max(1);
            // Skip periods missed while the host was busy rather than firing them all.
            c.next_irq = Some(d + p * ((now - d) / p + 1));
        } else {
            c.next_irq = None;
        }
        true
    }

    /// When channel 0 fires next, for a halted vCPU's sleep.
    pub fn next_irq(&self) -> Option<u64> {
        self.ch[0].next_irq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latched_count_reads_back_low_then_high() {
        let mut p = Pit::default();
        p.write(0x43, 0x34, 0); // ch0, lo/hi, mode 2
        p.write(0x40, 0x00, 0);
        p.write(0x40, 0x10, 0); // 4096
        let t = ns_of(100);
        p.write(0x43, 0x00, t); // latch ch0
        let later = t + 1_000_000;
        let lo = p.read(0x40, later) as u16;
        let hi = p.read(0x40, later) as u16;
        assert_eq!(hi << 8 | lo, 4096 - 100);
        // Unlatched reads follow the counter again.
        let lo = p.read(0x40, ns_of(200)) as u16;
        let hi = p.read(0x40, ns_of(200)) as u16;
        assert_eq!(hi << 8 | lo, 4096 - 200);
    }

    #[test]
    fn channel0_periodic_irq() {
        let mut p = Pit::default();
        p.write(0x43, 0x34, 0);
        p.write(0x40, 0x9c, 0);
        p.write(0x40, 0x12, 0); // 4764 ≈ 250 Hz
        assert!(!p.poll(1_000_000));
        assert!(p.poll(4_000_000));
        assert!(!p.poll(4_100_000));
        assert!(p.poll(8_000_000));
        // Mode 0 fires once.
        p.write(0x43, 0x30, 8_000_000);
        p.write(0x40, 0x10, 8_000_000);
        p.write(0x40, 0x00, 8_000_000);
        assert!(p.poll(9_000_000));
        assert!(!p.poll(20_000_000));
    }

    #[test]
    fn port61_gates_channel2_and_shows_its_output() {
        let mut p = Pit::default();
        // Gate low: programming mode 0 does not start counting.
        p.write(0x61, 0, 0);
        p.write(0x43, 0xb0, 0);
        p.write(0x42, 0xff, 0);
        p.write(0x42, 0xff, 0);
        assert_eq!(p.read(0x61, 1_000_000) & 0x21, 0);
        // Gate high starts it; output rises at terminal count (65535 clocks ≈ 54.9 ms).
        p.write(0x61, 1, 1_000_000);
        assert_eq!(p.read(0x61, 2_000_000) & 0x21, 0x01);
        let lo = p.read(0x42, 2_000_000) as u16;
        let hi = p.read(0x42, 2_000_000) as u16;
        assert_eq!(hi << 8 | lo, 0xffff - ticks(1_000_000) as u16);
        assert_eq!(p.read(0x61, 1_000_000 + ns_of(0xffff)) & 0x20, 0x20);
    }

    #[test]
    fn readback_status() {
        let mut p = Pit::default();
        p.write(0x43, 0xb6, 0); // ch2 lo/hi mode 3
        p.write(0x43, 0xe8, 0); // read-back status of ch2
        assert_eq!(p.read(0x42, 0), 0x80 | 0x30 | 0x06);
    }
}
