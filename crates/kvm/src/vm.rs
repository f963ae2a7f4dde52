//! One KVM VM: memory slots, the in-kernel irqchip and PIT, vCPU creation.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use corefour_hypervisor::{
    Datamatch, EventFd, HypervisorError, IoEventAddress, MemoryRegion, MsiRoute, Result, Vcpu, Vm,
    VmOps, MSI_GSI_BASE,
};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, CpuId, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES, KVM_MAX_IRQ_ROUTES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress as KvmIoAddr, Kvm as KvmSys, NoDatamatch, VmFd};

use crate::os_err;
use crate::vcpu::KvmVcpu;

/// Where KVM keeps its three-page TSS and the identity-map page that real-mode emulation on
/// Intel needs. Just below the 4 GiB boundary, in the MMIO hole the VMM leaves free.
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

pub struct KvmVm {
    fd: Arc<VmFd>,
    cpuid: CpuId,
    vcpus: u32,
    irqchip: bool,
    /// KVM_CREATE_PIT2 starts a kernel thread, which on a loaded host can take milliseconds; it
    /// runs beside the VMM's memory registration (an SRCU grace period, also milliseconds) and
    /// is waited for before the first vCPU is created.
    pit: Mutex<Option<JoinHandle<Result<()>>>>,
}

impl KvmVm {
    /// Creates the VM with `memory` registered first: KVM_SET_USER_MEMORY_REGION waits for an
    /// SRCU grace period, which in a fresh VM ends at once but after the irqchip and PIT
    /// (which wait for their own) takes up to a jiffy or two (4-8 ms here).
    ///
    /// # Safety
    /// As `Vm::set_memory_region`, for every region of `memory`.
    pub(crate) unsafe fn new(sys: &KvmSys, vcpus: u32, memory: &[MemoryRegion]) -> Result<Self> {
        let fd = sys.create_vm().map_err(|e| os_err("KVM_CREATE_VM", e))?;
        fd.set_tss_address(TSS_ADDR)
            .map_err(|e| os_err("KVM_SET_TSS_ADDR", e))?;
        // Only Intel needs it; where it is refused the VM still works.
        let _ = fd.set_identity_map_address(IDENTITY_MAP_ADDR);
        for r in memory {
            // SAFETY: the caller's promise for `memory`.
            unsafe { fd.set_user_memory_region(user_region(r)) }
                .map_err(|e| os_err("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        // The in-kernel irqchip makes HLT wait in the kernel and gives the guest a LAPIC and
        // IOAPIC; the PIT gives it a timer. Both are optional for the test guests, so a host
        // without them still runs (HLT then comes back as `VmExit::Halt`).
        let irqchip = fd.check_extension(Cap::Irqchip) && fd.create_irq_chip().is_ok();
        let fd = Arc::new(fd);
        let pit = if irqchip && fd.check_extension(Cap::Pit2) {
            let fd = fd.clone();
            let create = move || {
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                fd.create_pit2(pit)
                    .map_err(|e| os_err("KVM_CREATE_PIT2", e))
            };
            match std::thread::Builder::new()
                .name("kvm-pit".into())
                .stack_size(64 * 1024)
                .spawn(create.clone())
            {
                Ok(t) => Some(t),
                // No thread to spare: create it here.
                Err(_) => {
                    create()?;
                    None
                }
            }
        } else {
            None
        };
        // Long mode needs CPUID set on each vCPU first (kvm_pvm refuses EFER.LMA otherwise).
        let cpuid = sys
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| os_err("KVM_GET_SUPPORTED_CPUID", e))?;
        Ok(Self {
            fd,
            cpuid,
            vcpus,
            irqchip,
            pit: Mutex::new(pit),
        })
    }

    /// Waits for the PIT (see `pit`), reporting its error once.
    fn pit_ready(&self) -> Result<()> {
        let pending = self.pit.lock().unwrap_or_else(|p| p.into_inner()).take();
        match pending {
            None => Ok(()),
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(HypervisorError::Invalid(
                    "the PIT creation thread failed".into(),
                ))
            }),
        }
    }

    /// Whether HLT waits in the kernel for an interrupt (true) or exits to the VMM.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }
}

impl Vm for KvmVm {
    unsafe fn set_memory_region(&self, region: MemoryRegion) -> Result<()> {
        // SAFETY: the caller guarantees the host range is mapped and outlives the VM.
        unsafe { self.fd.set_user_memory_region(user_region(&region)) }
            .map_err(|e| os_err("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn create_vcpu(&self, index: u32, ops: Arc<dyn VmOps>) -> Result<Box<dyn Vcpu>> {
        if index >= self.vcpus {
            return Err(HypervisorError::Invalid(format!(
                "vCPU index {index} out of range (the VM has {})",
                self.vcpus
            )));
        }
        self.pit_ready()?;
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| os_err("KVM_CREATE_VCPU", e))?;
        Ok(Box::new(KvmVcpu::new(
            fd,
            index,
            &self.cpuid,
            self.irqchip,
            ops,
        )?))
    }

    fn set_irq_line(&self, irq: u32, level: bool) -> Result<()> {
        if !self.irqchip {
            return Err(HypervisorError::Unsupported(
                "interrupt lines without an irqchip",
            ));
        }
        self.fd
            .set_irq_line(irq, level)
            .map_err(|e| os_err("KVM_IRQ_LINE", e))
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        if !self.irqchip {
            return Err(HypervisorError::Unsupported("MSI without an irqchip"));
        }
        let msi = kvm_bindings::kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        // 0 means the guest's APIC ignored the message (masked or no target): not an error.
        self.fd
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| os_err("KVM_SIGNAL_MSI", e))
    }

    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>> {
        let size = usize::try_from(size)
            .map_err(|_| HypervisorError::Invalid(format!("slot size {size:#x} too large")))?;
        self.fd
            .get_dirty_log(slot, size)
            .map_err(|e| os_err("KVM_GET_DIRTY_LOG", e))
    }

    fn register_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Datamatch,
        event: &EventFd,
    ) -> Result<()> {
        let a = kvm_addr(addr);
        let r = match datamatch {
            Datamatch::Any => self.fd.register_ioevent(event, &a, NoDatamatch),
            Datamatch::U8(v) => self.fd.register_ioevent(event, &a, v),
            Datamatch::U16(v) => self.fd.register_ioevent(event, &a, v),
            Datamatch::U32(v) => self.fd.register_ioevent(event, &a, v),
            Datamatch::U64(v) => self.fd.register_ioevent(event, &a, v),
        };
        r.map_err(|e| os_err("KVM_IOEVENTFD", e))
    }

    fn unregister_ioevent(
        &self,
        addr: IoEventAddress,
        datamatch: Datamatch,
        event: &EventFd,
    ) -> Result<()> {
        let a = kvm_addr(addr);
        let r = match datamatch {
            Datamatch::Any => self.fd.unregister_ioevent(event, &a, NoDatamatch),
            Datamatch::U8(v) => self.fd.unregister_ioevent(event, &a, v),
            Datamatch::U16(v) => self.fd.unregister_ioevent(event, &a, v),
            Datamatch::U32(v) => self.fd.unregister_ioevent(event, &a, v),
            Datamatch::U64(v) => self.fd.unregister_ioevent(event, &a, v),
        };
        r.map_err(|e| os_err("KVM_IOEVENTFD deassign", e))
    }

    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        if !self.irqchip {
            return Err(HypervisorError::Unsupported("irqfd without an irqchip"));
        }
        self.fd
            .register_irqfd(event, gsi)
            .map_err(|e| os_err("KVM_IRQFD", e))
    }

    fn register_irqfd_resample(&self, event: &EventFd, resample: &EventFd, gsi: u32) -> Result<()> {
        if !self.irqchip {
            return Err(HypervisorError::Unsupported("irqfd without an irqchip"));
        }
        self.fd
            .register_irqfd_with_resample(event, resample, gsi)
            .map_err(|e| os_err("KVM_IRQFD (resample)", e))
    }

    fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()> {
        if !self.irqchip {
            return Err(HypervisorError::Unsupported(
                "MSI routing without an irqchip",
            ));
        }
        let table = routing_table(routes)?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(|e| os_err("KVM_SET_GSI_ROUTING", e))
    }

    fn unregister_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(event, gsi)
            .map_err(|e| os_err("KVM_IRQFD deassign", e))
    }

    fn save_state(&self) -> Result<corefour_hypervisor::CpuState> {
        let pit = self.irqchip && self.fd.check_extension(Cap::Pit2);
        crate::state::save_vm_state(&self.fd, self.irqchip, pit)
    }

    fn restore_state(&self, state: &corefour_hypervisor::CpuState) -> Result<()> {
        crate::state::restore_vm_state(&self.fd, state)
    }

    fn backend_name(&self) -> &'static str {
        "kvm"
    }
}

fn user_region(region: &MemoryRegion) -> kvm_userspace_memory_region {
    let mut flags = 0;
    if region.log_dirty {
        flags |= KVM_MEM_LOG_DIRTY_PAGES;
    }
    if region.read_only {
        flags |= KVM_MEM_READONLY;
    }
    kvm_userspace_memory_region {
        slot: region.slot,
        flags,
        guest_phys_addr: region.guest_phys_addr,
        memory_size: region.size,
        userspace_addr: region.host_addr,
    }
}

fn kvm_addr(a: IoEventAddress) -> KvmIoAddr {
    match a {
        IoEventAddress::Pio(p) => KvmIoAddr::Pio(u64::from(p)),
        IoEventAddress::Mmio(m) => KvmIoAddr::Mmio(m),
    }
}

/// The whole GSI routing table KVM_SET_GSI_ROUTING replaces: KVM's own default for the
/// platform lines (GSIs 0..15 to the IOAPIC pin of that number and to the 8259 pair, 16..23
/// to the IOAPIC only; kernel irq_comm.c's default_routing, which the first call would
/// otherwise drop), then one MSI entry per route.
fn routing_table(routes: &[MsiRoute]) -> Result<KvmIrqRouting> {
    let irqchip = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut entries = Vec::with_capacity(40 + routes.len());
    for gsi in 0..MSI_GSI_BASE {
        entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            entries.push(irqchip(gsi, chip, gsi % 8));
        }
    }
    for r in routes {
        if r.gsi < MSI_GSI_BASE {
            return Err(HypervisorError::Invalid(format!(
                "MSI route on GSI {} collides with the IOAPIC's lines (use {MSI_GSI_BASE} up)",
                r.gsi
            )));
        }
        let mut e = kvm_irq_routing_entry {
            gsi: r.gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        e.u.msi.address_lo = r.address as u32;
        e.u.msi.address_hi = (r.address >> 32) as u32;
        e.u.msi.data = r.data;
        entries.push(e);
    }
    if entries.len() > KVM_MAX_IRQ_ROUTES {
        return Err(HypervisorError::Invalid(format!(
            "{} GSI routes; KVM takes at most {KVM_MAX_IRQ_ROUTES}",
            entries.len()
        )));
    }
    KvmIrqRouting::from_entries(&entries)
        .map_err(|e| HypervisorError::Invalid(format!("GSI routing table: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keeps_the_platform_lines_and_adds_msi_entries() {
        let t = routing_table(&[MsiRoute {
            gsi: 24,
            address: 0x1_fee0_1000,
            data: 0x41,
        }])
        .unwrap();
        let e = t.as_slice();
        // 16 lines on the IOAPIC and a PIC, 8 on the IOAPIC only, one MSI.
        assert_eq!(e.len(), 16 * 2 + 8 + 1);
        let msi = e.last().unwrap();
        assert_eq!((msi.gsi, msi.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was written as an MSI entry just above.
        let m = unsafe { msi.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 1, 0x41));
        let pic: Vec<_> = e
            .iter()
            .filter(|x| x.gsi == 10 && x.type_ == KVM_IRQ_ROUTING_IRQCHIP)
            // SAFETY: irqchip entries only, as filtered.
            .map(|x| unsafe { (x.u.irqchip.irqchip, x.u.irqchip.pin) })
            .collect();
        assert_eq!(
            pic,
            vec![(KVM_IRQCHIP_IOAPIC, 10), (KVM_IRQCHIP_PIC_SLAVE, 2)]
        );
        assert!(routing_table(&[MsiRoute {
            gsi: 5,
            address: 0xfee0_0000,
            data: 0
        }])
        .is_err());
    }
}
