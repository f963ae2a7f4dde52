//! The MC146818 CMOS real-time clock (index port 0x70, data port 0x71): the date and time the
//! host had when the VM started plus VM time since, in BCD or binary and 12/24-hour form as
//! register B asks, and 114 bytes of NVRAM. Without it Linux reads 0xff from every register,
//! sees "update in progress" forever and spends ten 1 ms delays per RTC access (seconds of a
//! boot) before calling the RTC broken. No alarm, periodic or update interrupts: register C
//! reads 0 and IRQ 8 never fires, so the kernel's RTC driver works without alarms.

use std::time::{SystemTime, UNIX_EPOCH};

const NS: u64 = 1_000_000_000;

const SEC: usize = 0x00;
const MIN: usize = 0x02;
const HOUR: usize = 0x04;
const WDAY: usize = 0x06;
const MDAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const CENTURY: usize = 0x32;

/// Register B: binary (not BCD) data mode.
const B_DM: u8 = 1 << 2;
/// Register B: 24-hour mode.
const B_24H: u8 = 1 << 1;
/// Register D: valid RAM and time.
const D_VRT: u8 = 1 << 7;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Rtc {
    index: u8,
    /// NVRAM and the control registers; the time registers are computed on read.
    ram: Vec<u8>,
    /// Seconds since the Unix epoch the clock showed at VM time 0.
    epoch_at_zero: i64,
}

impl Default for Rtc {
    fn default() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Rtc::at(now)
    }
}

fn bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

fn unbcd(v: u8) -> u32 {
    (v >> 4) as u32 * 10 + (v & 0xf) as u32
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil`]).
fn days_of(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 } as i64;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Rtc {
    /// A clock showing `unix_secs` at VM time 0.
    pub fn at(unix_secs: i64) -> Self {
        let mut ram = vec![0u8; 128];
        ram[REG_A] = 0x26; // 32.768 kHz time base, 1024 Hz rate select (the usual BIOS value)
        ram[REG_B] = B_24H;
        ram[REG_D] = D_VRT;
        Rtc {
            index: 0,
            ram,
            epoch_at_zero: unix_secs,
        }
    }

    pub fn handles(port: u16) -> bool {
        matches!(port, 0x70 | 0x71)
    }

    fn secs(&self, now_ns: u64) -> i64 {
        self.epoch_at_zero + (now_ns / NS) as i64
    }

    fn enc(&self, v: u32) -> u8 {
        if self.ram[REG_B] & B_DM != 0 {
            v as u8
        } else {
            bcd(v)
        }
    }

    fn dec(&self, v: u8) -> u32 {
        if self.ram[REG_B] & B_DM != 0 {
            v as u32
        } else {
            unbcd(v)
        }
    }

    /// The time registers' values at `now_ns`.
    fn time_reg(&self, reg: usize, now_ns: u64) -> u8 {
        let t = self.secs(now_ns);
        let days = t.div_euclid(86_400);
        let sod = t.rem_euclid(86_400) as u32;
        let (y, m, d) = civil(days);
        match reg {
            SEC => self.enc(sod % 60),
            MIN => self.enc(sod / 60 % 60),
            HOUR => {
                let h = sod / 3600;
                if self.ram[REG_B] & B_24H != 0 {
                    self.enc(h)
                } else {
                    // 12-hour form: 12, 1..11 with bit 7 for PM.
                    let h12 = if h.is_multiple_of(12) { 12 } else { h % 12 };
                    self.enc(h12) | if h >= 12 { 0x80 } else { 0 }
                }
            }
            // 1 = Sunday; 1970-01-01 was a Thursday.
            WDAY => self.enc(((days + 4).rem_euclid(7) + 1) as u32),
            MDAY => self.enc(d),
            MONTH => self.enc(m),
            YEAR => self.enc(y.rem_euclid(100) as u32),
            _ => self.enc((y.div_euclid(100)) as u32),
        }
    }

    /// A guest write to a time register: the clock jumps so that register reads `v` now.
    fn set_time_reg(&mut self, reg: usize, v: u8, now_ns: u64) {
        let t = self.secs(now_ns);
        let days = t.div_euclid(86_400);
        let sod = t.rem_euclid(86_400);
        let (mut y, mut m, mut d) = civil(days);
        let (mut hh, mut mm, mut ss) = (sod / 3600, sod / 60 % 60, sod % 60);
        match reg {
            SEC => ss = self.dec(v).min(59) as i64,
            MIN => mm = self.dec(v).min(59) as i64,
            HOUR => {
                if self.ram[REG_B] & B_24H != 0 {
                    hh = self.dec(v).min(23) as i64;
                } else {
                    let h = self.dec(v & 0x7f).clamp(1, 12) as i64 % 12;
                    hh = h + if v & 0x80 != 0 { 12 } else { 0 };
                }
            }
            MDAY => d = self.dec(v).clamp(1, 31),
            MONTH => m = self.dec(v).clamp(1, 12),
            YEAR => y = y.div_euclid(100) * 100 + self.dec(v).min(99) as i64,
            CENTURY => y = self.dec(v).min(99) as i64 * 100 + y.rem_euclid(100),
            // The weekday follows from the date.
            _ => return,
        }
        let t = days_of(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss;
        self.epoch_at_zero = t - (now_ns / NS) as i64;
    }

    pub fn read(&mut self, port: u16, now_ns: u64) -> u8 {
        if port == 0x70 {
            // The index port is write-only; reads float.
            return 0xff;
        }
        let reg = (self.index & 0x7f) as usize;
        match reg {
            SEC | MIN | HOUR | WDAY | MDAY | MONTH | YEAR | CENTURY => self.time_reg(reg, now_ns),
            // Never "update in progress": the time registers are always consistent here.
            REG_A => self.ram[REG_A] & 0x7f,
            REG_C => std::mem::take(&mut self.ram[REG_C]),
            REG_D => D_VRT,
            _ => self.ram[reg],
        }
    }

    pub fn write(&mut self, port: u16, v: u8, now_ns: u64) {
        if port == 0x70 {
            // Bit 7 is the NMI mask, which no NMI source here looks at.
            self.index = v & 0x7f;
            return;
        }
        let reg = self.index as usize;
        match reg {
            SEC | MIN | HOUR | MDAY | MONTH | YEAR | CENTURY => self.set_time_reg(reg, v, now_ns),
            WDAY => {}
            REG_A => self.ram[REG_A] = v & 0x7f,
            REG_B => self.ram[REG_B] = v,
            REG_C | REG_D => {}
            _ => self.ram[reg] = v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(r: &mut Rtc, i: u8, now: u64) -> u8 {
        r.write(0x70, i, now);
        r.read(0x71, now)
    }

    #[test]
    fn reads_the_date_in_bcd_and_ticks_with_vm_time() {
        // 2024-02-29 23:59:58 UTC, a Thursday.
        let t = days_of(2024, 2, 29) * 86_400 + 23 * 3600 + 59 * 60 + 58;
        let mut r = Rtc::at(t);
        assert_eq!(reg(&mut r, 0x0d, 0) & 0x80, 0x80, "valid RAM and time");
        assert_eq!(reg(&mut r, 0x0a, 0) & 0x80, 0, "never update-in-progress");
        assert_eq!(reg(&mut r, 0x00, 0), 0x58);
        assert_eq!(reg(&mut r, 0x04, 0), 0x23);
        assert_eq!(reg(&mut r, 0x07, 0), 0x29);
        assert_eq!(reg(&mut r, 0x08, 0), 0x02);
        assert_eq!(reg(&mut r, 0x09, 0), 0x24);
        assert_eq!(reg(&mut r, 0x32, 0), 0x20);
        assert_eq!(reg(&mut r, 0x06, 0), 5, "Thursday is day 5 (Sunday = 1)");
        // Three seconds later it is 1 March 2024, 00:00:01.
        let later = 3 * NS;
        assert_eq!(reg(&mut r, 0x00, later), 0x01);
        assert_eq!(reg(&mut r, 0x04, later), 0x00);
        assert_eq!(reg(&mut r, 0x07, later), 0x01);
        assert_eq!(reg(&mut r, 0x08, later), 0x03);
    }

    #[test]
    fn binary_and_12_hour_modes_and_setting_the_time() {
        let t = days_of(1999, 12, 31) * 86_400 + 13 * 3600 + 5 * 60;
        let mut r = Rtc::at(t);
        r.write(0x70, 0x0b, 0);
        r.write(0x71, B_DM, 0); // binary, 12-hour
        assert_eq!(reg(&mut r, 0x04, 0), 0x80 | 1, "1 PM");
        assert_eq!(reg(&mut r, 0x02, 0), 5);
        assert_eq!(reg(&mut r, 0x09, 0), 99);
        // The guest sets the year to 2030 (binary 30) and the clock keeps running from there.
        r.write(0x70, 0x09, 0);
        r.write(0x71, 30, 0);
        assert_eq!(reg(&mut r, 0x09, 0), 30);
        assert_eq!(
            reg(&mut r, 0x32, 0),
            19,
            "the century register was not written"
        );
        assert_eq!(reg(&mut r, 0x02, 60 * NS), 6);
        // NVRAM keeps what is written; register C reads 0 (no interrupt flags).
        r.write(0x70, 0x40, 0);
        r.write(0x71, 0xa5, 0);
        assert_eq!(reg(&mut r, 0x40, 0), 0xa5);
        assert_eq!(reg(&mut r, 0x0c, 0), 0);
        assert_eq!(r.read(0x70, 0), 0xff);
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-1i64, 0, 59, 10_957, 19_782, 47_482, 2_932_896] {
            let (y, m, d) = civil(days);
            assert_eq!(days_of(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
    }
}
