//! The ACPI fixed-hardware registers at PM_BASE_PORT: PM1a status/enable, PM1a control (where
//! an S5 sleep request powers the VM off) and the PM timer.
//!
//! The timer counts host time. A backend that keeps guest time itself (the software CPU, whose
//! guest runs slower than the host) claims PM_TMR_PORT before the bus, as KVM's in-kernel PIT
//! claims its ports.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use corefour_devices::{BusDevice, GuestEvents};

use super::{PM_TIMER_HZ, S5_SLP_TYP};

const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;

#[derive(Default)]
struct Regs {
    status: u16,
    enable: u16,
    control: u16,
}

pub struct PmRegisters {
    regs: Mutex<Regs>,
    start: Instant,
    events: Arc<dyn GuestEvents>,
}

impl PmRegisters {
    pub fn new(events: Arc<dyn GuestEvents>) -> Self {
        Self {
            regs: Mutex::new(Regs {
                control: SCI_EN,
                ..Regs::default()
            }),
            start: Instant::now(),
            events,
        }
    }

    fn timer(&self) -> u32 {
        let ns = self.start.elapsed().as_nanos();
        // The counter is 32 bits wide and wraps, as the hardware's does.
        (ns * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u32
    }

    fn bytes(&self) -> [u8; 12] {
        let r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        let mut b = [0u8; 12];
        b[0..2].copy_from_slice(&r.status.to_le_bytes());
        b[2..4].copy_from_slice(&r.enable.to_le_bytes());
        b[4..6].copy_from_slice(&r.control.to_le_bytes());
        drop(r);
        b[8..12].copy_from_slice(&self.timer().to_le_bytes());
        b
    }
}

/// Replaces the bytes of `reg` (a 16-bit register at `base`) that the access at `offset`
/// covers; accesses may be 1, 2 or 4 bytes wide and start anywhere in the block.
fn merge(reg: u16, base: u64, offset: u64, data: &[u8]) -> (u16, bool) {
    let mut b = reg.to_le_bytes();
    let mut hit = false;
    for (i, v) in data.iter().enumerate() {
        let at = offset + i as u64;
        if at >= base && at < base + 2 {
            b[(at - base) as usize] = *v;
            hit = true;
        }
    }
    (u16::from_le_bytes(b), hit)
}

impl BusDevice for PmRegisters {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let b = self.bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset + i as u64)
                .ok()
                .and_then(|o| b.get(o).copied())
                .unwrap_or(0xff);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut r = self.regs.lock().unwrap_or_else(|p| p.into_inner());
        // Status bits are write-one-to-clear.
        let (ones, hit) = merge(0, 0, offset, data);
        if hit {
            r.status &= !ones;
        }
        let (enable, _) = merge(r.enable, 2, offset, data);
        r.enable = enable;
        let (control, hit) = merge(r.control, 4, offset, data);
        if !hit {
            return;
        }
        // SLP_EN is write-only: it starts the transition and reads back as 0.
        r.control = (control & !SLP_EN) | SCI_EN;
        let slp_typ = (control >> SLP_TYP_SHIFT) & 7;
        drop(r);
        if control & SLP_EN != 0 && slp_typ == S5_SLP_TYP {
            // Soft-off: the VMM ends the run and exits 0, as after an API shutdown.
            self.events.exit(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct Seen {
        exits: AtomicU32,
        resets: AtomicU32,
    }
    impl GuestEvents for Seen {
        fn exit(&self, code: u32) {
            assert_eq!(code, 0);
            self.exits.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn s5_with_slp_en_powers_off_and_nothing_else_does() {
        let seen = Arc::new(Seen::default());
        let pm = PmRegisters::new(seen.clone());
        let typ = S5_SLP_TYP << SLP_TYP_SHIFT;
        // Linux writes SLP_TYP first, then SLP_TYP | SLP_EN.
        pm.write(4, &typ.to_le_bytes());
        assert_eq!(seen.exits.load(Ordering::SeqCst), 0);
        pm.write(4, &(1u16 << SLP_TYP_SHIFT | SLP_EN).to_le_bytes()); // S1: not off
        assert_eq!(seen.exits.load(Ordering::SeqCst), 0);
        pm.write(4, &(typ | SLP_EN).to_le_bytes());
        assert_eq!(seen.exits.load(Ordering::SeqCst), 1);
        // Byte-wise: the high byte carries SLP_EN and SLP_TYP.
        pm.write(5, &[((typ | SLP_EN) >> 8) as u8]);
        assert_eq!(seen.exits.load(Ordering::SeqCst), 2);
        let mut b = [0u8; 2];
        pm.read(4, &mut b);
        assert_eq!(u16::from_le_bytes(b) & (SLP_EN | SCI_EN), SCI_EN);
        assert_eq!(seen.resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn timer_runs_at_the_pm_rate_and_status_clears_by_writing_ones() {
        let pm = PmRegisters::new(Arc::new(Seen::default()));
        let mut a = [0u8; 4];
        pm.read(8, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut b = [0u8; 4];
        pm.read(8, &mut b);
        let ticks = u32::from_le_bytes(b).wrapping_sub(u32::from_le_bytes(a));
        // 20 ms is 71590 ticks; allow a slow, loaded host.
        assert!((70_000..3_579_545).contains(&ticks), "{ticks}");
        pm.regs.lock().unwrap().status = 0x8001;
        pm.write(0, &0x0001u16.to_le_bytes());
        let mut s = [0u8; 2];
        pm.read(0, &mut s);
        assert_eq!(u16::from_le_bytes(s), 0x8000);
        pm.write(2, &0x0120u16.to_le_bytes());
        pm.read(2, &mut s);
        assert_eq!(u16::from_le_bytes(s), 0x0120);
        let mut past = [0u8; 4];
        pm.read(10, &mut past);
        assert_eq!(past[2..], [0xff, 0xff]);
    }
}
