//! Where a vCPU's port and MMIO accesses go: its local APIC and the I/O APIC first (as KVM's
//! in-kernel irqchip would take them), everything else to the VMM through `VmOps`.

use crate::cpu::*;
use crate::platform::pic::Pic;
use crate::platform::pit::Pit;
use crate::platform::rtc::Rtc;
use crate::platform::{ioapic, lapic};

impl Cpu {
    pub fn pio_in(&mut self, port: u16, size: usize) -> u64 {
        if size == 1 && Pit::handles(port) {
            let now = self.env.vm.now_ns();
            return self.env.vm.pit().read(port, now) as u64;
        }
        if size == 1 && Pic::handles(port) {
            return self.env.vm.pic().read(port) as u64;
        }
        if size == 1 && Rtc::handles(port) {
            let now = self.env.vm.now_ns();
            return self.env.vm.rtc().read(port, now) as u64;
        }
        self.prof.pio += 1;
        let mut b = [0u8; 4];
        self.env.ops.pio_read(port, &mut b[..size]);
        u32::from_le_bytes(b) as u64
    }

    pub fn pio_out(&mut self, port: u16, size: usize, v: u64) {
        if size == 1 && Pit::handles(port) {
            let now = self.env.vm.now_ns();
            self.env.vm.pit().write(port, v as u8, now);
            // A newly loaded channel 0 count must be seen by the next poll.
            self.poll_at = 0;
            return;
        }
        if size == 1 && Pic::handles(port) {
            self.env.vm.pic().write(port, v as u8);
            return;
        }
        if size == 1 && Rtc::handles(port) {
            let now = self.env.vm.now_ns();
            self.env.vm.rtc().write(port, v as u8, now);
            return;
        }
        self.prof.pio += 1;
        let b = (v as u32).to_le_bytes();
        if self
            .env
            .vm
            .ioevents
            .signal(corefour_hypervisor::IoEventAddress::Pio(port), &b[..size])
        {
            return;
        }
        self.env.ops.pio_write(port, &b[..size]);
    }

    fn link(&self) -> &crate::vm::Link {
        &self.env.vm.links[self.env.id as usize]
    }

    pub fn apic_base(&self) -> u64 {
        self.link().lapic().base
    }

    pub fn set_apic_base(&mut self, v: u64) -> X<()> {
        if v & !(0xf_ffff_f000 | 1 << 8 | 1 << 11) != 0 {
            return gp(0);
        }
        let mut l = self.link().lapic();
        l.base = (l.base & (1 << 8)) | (v & !(1 << 8));
        drop(l);
        self.tlb.flush_all();
        Ok(())
    }

    pub fn tpr(&self) -> u8 {
        self.link().lapic().tpr
    }

    pub fn set_tpr(&mut self, v: u8) {
        self.link().lapic().tpr = v;
        self.link()
            .hint
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn tsc_deadline(&self) -> u64 {
        self.link().lapic().tsc_deadline
    }

    pub fn set_tsc_deadline(&mut self, v: u64) {
        // The TSC is VM nanoseconds shifted by the guest's offset.
        let ns = (v as i64).wrapping_sub(self.msr.tsc_offset).max(1) as u64;
        self.link()
            .lapic()
            .set_tsc_deadline(if v == 0 { 0 } else { ns });
        self.poll_at = 0;
    }

    fn lapic_window(&self, pa: u64) -> Option<u64> {
        let l = self.link().lapic();
        let base = l.base & 0xf_ffff_f000;
        (l.enabled() && pa >= base && pa < base + 0x1000).then(|| pa - base)
    }

    pub fn platform_mmio_read(&mut self, pa: u64, size: usize) -> Option<u64> {
        if let Some(off) = self.lapic_window(pa) {
            let now = self.env.vm.now_ns();
            let v = self.link().lapic().read(off & !0xf, now) as u64;
            return Some(v >> (8 * (off & 3)) & crate::flags::mask(size as u32 * 8));
        }
        if (ioapic::BASE..ioapic::BASE + 0x100).contains(&pa) {
            return Some(self.env.vm.ioapic_read(pa - ioapic::BASE) as u64);
        }
        None
    }

    pub fn platform_mmio_write(&mut self, pa: u64, size: usize, v: u64) -> bool {
        // A registered ioeventfd takes the write instead of the VMM (as KVM's would).
        let data = v.to_le_bytes();
        if self.env.vm.ioevents.signal(
            corefour_hypervisor::IoEventAddress::Mmio(pa),
            &data[..size.min(8)],
        ) {
            return true;
        }
        if let Some(off) = self.lapic_window(pa) {
            let now = self.env.vm.now_ns();
            let (ipi, eoi) = self.link().lapic().write(off & !0xf, v as u32, now);
            if let Some(ipi) = ipi {
                self.env.vm.send_ipi(self.env.id, ipi);
            }
            if let Some(vec) = eoi {
                self.env.vm.level_eoi(vec);
            }
            self.link()
                .hint
                .store(true, std::sync::atomic::Ordering::Release);
            self.poll_at = 0;
            return true;
        }
        if (ioapic::BASE..ioapic::BASE + 0x100).contains(&pa) {
            self.env.vm.ioapic_write(pa - ioapic::BASE, v as u32);
            return true;
        }
        let _ = lapic::BASE_DEFAULT;
        false
    }
}
