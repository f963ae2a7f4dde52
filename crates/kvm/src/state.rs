//! Saving and restoring the whole KVM state of a vCPU and of a VM, for snapshots and live
//! migration. The structures are KVM's own (kvm-bindings' serde support writes them as their
//! raw bytes), so nothing is lost in translation; `CpuState.backend` ("kvm") keeps a snapshot
//! from being fed to the software CPU.
//!
//! The order of the restore calls follows what KVM needs: CPUID before anything that depends
//! on it (MSRs, XSAVE features), MP state and registers before the LAPIC, the MSRs after the
//! LAPIC (the TSC deadline MSR is ignored otherwise), the pending events last.

use std::sync::OnceLock;

use corefour_hypervisor::{CpuState, HypervisorError, Result};
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Keeps the errno of a failed ioctl with the ioctl's name.
fn os_err(op: &'static str, e: vmm_sys_util::errno::Error) -> HypervisorError {
    HypervisorError::Os {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// The `CpuState.backend` tag of this backend.
pub const BACKEND: &str = "kvm";

/// The legacy x87/SSE state, kept when KVM_GET_XSAVE is refused. kvm-bindings has no serde
/// for `kvm_fpu`, so this mirror holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

impl FpuState {
    fn from_kvm(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }

    fn to_kvm(&self) -> Result<kvm_fpu> {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        if self.fpr.len() != f.fpr.len() || self.xmm.len() != f.xmm.len() {
            return Err(HypervisorError::GuestState(format!(
                "FPU state has {} x87 and {} XMM registers, expected 8 and 16",
                self.fpr.len(),
                self.xmm.len()
            )));
        }
        f.fpr.copy_from_slice(&self.fpr);
        f.xmm.copy_from_slice(&self.xmm);
        Ok(f)
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct KvmVcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Option<kvm_xsave>,
    pub fpu: Option<FpuState>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: Option<kvm_lapic_state>,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

/// Everything KVM holds for the VM itself (the in-kernel irqchip, PIT and clock).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    /// PIC master, PIC slave, IOAPIC — empty without an in-kernel irqchip.
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: Option<kvm_pit_state2>,
    pub clock: kvm_clock_data,
}

/// The MSRs this host's KVM lets us read, found once: KVM_GET_MSR_INDEX_LIST also names MSRs
/// that a given vCPU refuses, and KVM_GET_MSRS stops at the first refused one.
fn msr_candidates() -> Result<&'static [u32]> {
    static LIST: OnceLock<std::result::Result<Vec<u32>, String>> = OnceLock::new();
    let r = LIST.get_or_init(|| {
        let kvm = Kvm::new().map_err(|e| format!("open /dev/kvm: {e}"))?;
        let list = kvm
            .get_msr_index_list()
            .map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))?;
        Ok(list.as_slice().to_vec())
    });
    match r {
        Ok(v) => Ok(v.as_slice()),
        Err(e) => Err(HypervisorError::Invalid(e.clone())),
    }
}

fn msrs_of(indices: &[u32]) -> Result<Msrs> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries)
        .map_err(|e| HypervisorError::Invalid(format!("too many MSRs ({}): {e:?}", entries.len())))
}

/// The candidates a vCPU actually returned last time: probing costs an ioctl per refused
/// MSR, and the second save (the one inside a migration's downtime) should not pay it again.
static READABLE: std::sync::Mutex<Option<Vec<u32>>> = std::sync::Mutex::new(None);

/// Reads every readable MSR, dropping the ones this vCPU refuses.
fn read_msrs(fd: &VcpuFd) -> Result<Vec<kvm_msr_entry>> {
    let cached = READABLE.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut indices = match cached {
        Some(v) => v,
        None => msr_candidates()?.to_vec(),
    };
    loop {
        let mut msrs = msrs_of(&indices)?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(|e| os_err("KVM_GET_MSRS", e))?;
        if n >= indices.len() {
            *READABLE.lock().unwrap_or_else(|p| p.into_inner()) = Some(indices);
            return Ok(msrs.as_slice().to_vec());
        }
        indices.remove(n);
    }
}

/// The legacy 4 KiB XSAVE area is enough unless the host enabled larger dynamic features
/// (AMX); then KVM_GET_XSAVE would truncate, so the FPU path is taken instead.
fn xsave_fits(vm: Option<&VmFd>) -> bool {
    let Some(vm) = vm else { return true };
    let size = vm.check_extension_int(Cap::Xsave2);
    size <= 0 || size as usize <= std::mem::size_of::<kvm_xsave>()
}

/// Saves the whole state of a vCPU that is out of KVM_RUN (paused). A vCPU that last left on a
/// port or MMIO exit must have been re-entered once with `immediate_exit` set first, so KVM
/// finishes that instruction — the kicker's pause path does exactly that.
pub fn save_vcpu(fd: &VcpuFd, vm: Option<&VmFd>) -> Result<KvmVcpuState> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| os_err("KVM_GET_CPUID2", e))?
        .as_slice()
        .to_vec();
    let mp_state = fd
        .get_mp_state()
        .map_err(|e| os_err("KVM_GET_MP_STATE", e))?;
    let regs = fd.get_regs().map_err(|e| os_err("KVM_GET_REGS", e))?;
    let sregs = fd.get_sregs().map_err(|e| os_err("KVM_GET_SREGS", e))?;
    let (xsave, fpu) = match xsave_fits(vm).then(|| fd.get_xsave()) {
        Some(Ok(x)) => (Some(x), None),
        _ => {
            let f = fd.get_fpu().map_err(|e| os_err("KVM_GET_FPU", e))?;
            (None, Some(FpuState::from_kvm(&f)))
        }
    };
    // XCRs exist only with XSAVE in the guest's CPUID; absent is not an error.
    let xcrs = fd.get_xcrs().ok();
    let debugregs = fd
        .get_debug_regs()
        .map_err(|e| os_err("KVM_GET_DEBUGREGS", e))?;
    // Without an in-kernel irqchip there is no LAPIC to save.
    let lapic = fd.get_lapic().ok();
    let msrs = read_msrs(fd)?;
    let events = fd
        .get_vcpu_events()
        .map_err(|e| os_err("KVM_GET_VCPU_EVENTS", e))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(KvmVcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        fpu,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
        tsc_khz,
    })
}

/// Loads a saved state into a freshly created vCPU of a VM built like the source's.
pub fn restore_vcpu(fd: &VcpuFd, s: &KvmVcpuState) -> Result<()> {
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| {
        HypervisorError::GuestState(format!("{} CPUID entries: {e:?}", s.cpuid.len()))
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(|e| os_err("KVM_SET_CPUID2", e))?;
    if let Some(khz) = s.tsc_khz {
        // TSC scaling is missing on some hosts (kvm_pvm); the guest then sees this host's TSC
        // rate, which is what it saw before when source and target are alike.
        let _ = fd.set_tsc_khz(khz);
    }
    fd.set_mp_state(s.mp_state)
        .map_err(|e| os_err("KVM_SET_MP_STATE", e))?;
    fd.set_regs(&s.regs)
        .map_err(|e| os_err("KVM_SET_REGS", e))?;
    fd.set_sregs(&s.sregs)
        .map_err(|e| os_err("KVM_SET_SREGS", e))?;
    match (&s.xsave, &s.fpu) {
        (Some(x), _) => {
            // SAFETY: `kvm_xsave` is the legacy fixed 4 KiB area; save refused to produce one
            // on hosts whose XSAVE state is larger, so KVM reads no further than the struct.
            unsafe { fd.set_xsave(x) }.map_err(|e| os_err("KVM_SET_XSAVE", e))?
        }
        (None, Some(f)) => fd
            .set_fpu(&f.to_kvm()?)
            .map_err(|e| os_err("KVM_SET_FPU", e))?,
        (None, None) => {
            return Err(HypervisorError::GuestState(
                "vCPU state has neither XSAVE nor FPU registers".into(),
            ))
        }
    }
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(|e| os_err("KVM_SET_XCRS", e))?;
    }
    fd.set_debug_regs(&s.debugregs)
        .map_err(|e| os_err("KVM_SET_DEBUGREGS", e))?;
    if let Some(l) = &s.lapic {
        fd.set_lapic(l).map_err(|e| os_err("KVM_SET_LAPIC", e))?;
    }
    let msrs = Msrs::from_entries(&s.msrs)
        .map_err(|e| HypervisorError::GuestState(format!("{} MSRs: {e:?}", s.msrs.len())))?;
    let n = fd.set_msrs(&msrs).map_err(|e| os_err("KVM_SET_MSRS", e))?;
    if n != s.msrs.len() {
        let bad = s.msrs.get(n).map(|m| m.index).unwrap_or(0);
        return Err(HypervisorError::GuestState(format!(
            "KVM accepted {n} of {} MSRs; MSR {bad:#x} was refused (is the target host a \
             different CPU?)",
            s.msrs.len()
        )));
    }
    fd.set_vcpu_events(&s.events)
        .map_err(|e| os_err("KVM_SET_VCPU_EVENTS", e))?;
    Ok(())
}

/// Saves the VM-wide state. `irqchip`/`pit` say whether the VM has them (as created).
pub fn save_vm(fd: &VmFd, irqchip: bool, pit: bool) -> Result<KvmVmState> {
    // Opens /dev/kvm once per process; do it here, outside any vCPU pause, when possible.
    msr_candidates()?;
    let mut irqchips = Vec::new();
    if irqchip {
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            fd.get_irqchip(&mut c)
                .map_err(|e| os_err("KVM_GET_IRQCHIP", e))?;
            irqchips.push(c);
        }
    }
    let pit = if pit {
        Some(fd.get_pit2().map_err(|e| os_err("KVM_GET_PIT2", e))?)
    } else {
        None
    };
    let clock = fd.get_clock().map_err(|e| os_err("KVM_GET_CLOCK", e))?;
    Ok(KvmVmState {
        irqchips,
        pit,
        clock,
    })
}

/// Loads VM-wide state into a VM created like the source (same irqchip and PIT).
pub fn restore_vm(fd: &VmFd, s: &KvmVmState) -> Result<()> {
    for c in &s.irqchips {
        if c.chip_id > KVM_IRQCHIP_IOAPIC {
            return Err(HypervisorError::GuestState(format!(
                "unknown irqchip id {}",
                c.chip_id
            )));
        }
        fd.set_irqchip(c)
            .map_err(|e| os_err("KVM_SET_IRQCHIP", e))?;
    }
    if let Some(p) = &s.pit {
        fd.set_pit2(p).map_err(|e| os_err("KVM_SET_PIT2", e))?;
    }
    // KVM refuses flags it only reports (TSC_STABLE, REALTIME, HOST_TSC) on the way in.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        flags: s.clock.flags & !(KVM_CLOCK_TSC_STABLE | 0x6),
        ..Default::default()
    };
    fd.set_clock(&clock)
        .map_err(|e| os_err("KVM_SET_CLOCK", e))?;
    Ok(())
}

fn to_payload<T: Serialize>(what: &str, v: &T) -> Result<CpuState> {
    let payload = serde_json::to_vec(v)
        .map_err(|e| HypervisorError::Invalid(format!("cannot encode {what}: {e}")))?;
    Ok(CpuState {
        backend: BACKEND.to_string(),
        payload,
    })
}

fn from_payload<T: serde::de::DeserializeOwned>(what: &str, s: &CpuState) -> Result<T> {
    if s.backend != BACKEND {
        return Err(HypervisorError::GuestState(format!(
            "{what} was saved by the {} backend; it cannot be restored on KVM",
            s.backend
        )));
    }
    serde_json::from_slice(&s.payload)
        .map_err(|e| HypervisorError::GuestState(format!("{what} is not valid: {e}")))
}

/// `save_vcpu` wrapped in the backend-neutral envelope.
pub fn save_vcpu_state(fd: &VcpuFd, vm: Option<&VmFd>) -> Result<CpuState> {
    to_payload("vCPU state", &save_vcpu(fd, vm)?)
}

/// `restore_vcpu` from the backend-neutral envelope.
pub fn restore_vcpu_state(fd: &VcpuFd, s: &CpuState) -> Result<()> {
    restore_vcpu(fd, &from_payload("vCPU state", s)?)
}

/// `save_vm` wrapped in the backend-neutral envelope.
pub fn save_vm_state(fd: &VmFd, irqchip: bool, pit: bool) -> Result<CpuState> {
    to_payload("VM state", &save_vm(fd, irqchip, pit)?)
}

/// `restore_vm` from the backend-neutral envelope.
pub fn restore_vm_state(fd: &VmFd, s: &CpuState) -> Result<()> {
    restore_vm(fd, &from_payload("VM state", s)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
    use kvm_ioctls::VcpuExit;

    const MEM: usize = 0x10000;
    const CODE_AT: u64 = 0x1000;
    /// Real-mode loop: `inc bx; mov al, bl; out 0x10, al; jmp short back`.
    const CODE: &[u8] = &[0x43, 0x88, 0xd8, 0xe6, 0x10, 0xeb, 0xf9];

    struct Guest {
        _kvm: Kvm,
        vm: VmFd,
        vcpu: VcpuFd,
        mem: *mut u8,
    }

    impl Drop for Guest {
        fn drop(&mut self) {
            // SAFETY: `mem` is our own mapping of MEM bytes; the VM using it is dropped after
            // this (fields drop after `drop`), and it never runs again.
            unsafe { libc::munmap(self.mem.cast(), MEM) };
        }
    }

    /// A VM with an irqchip, a PIT and one vCPU in real mode at CODE_AT, memory filled from
    /// `image`.
    fn guest(image: &[u8]) -> Option<Guest> {
        let kvm = match Kvm::new() {
            Ok(k) => k,
            Err(e) => {
                eprintln!("skipping: /dev/kvm unavailable ({e})");
                return None;
            }
        };
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
        // SAFETY: a fresh anonymous mapping, checked below.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        let mem = mem.cast::<u8>();
        // SAFETY: `mem` has MEM bytes and `image` is at most that long.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), mem, image.len().min(MEM)) };
        // SAFETY: the mapping lives as long as `Guest`, which owns the VM.
        unsafe {
            vm.set_user_memory_region(kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: MEM as u64,
                userspace_addr: mem as u64,
            })
        }
        .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        Some(Guest {
            _kvm: kvm,
            vm,
            vcpu,
            mem,
        })
    }

    /// Runs until the next `out 0x10`, returns the byte written.
    fn next_out(v: &mut VcpuFd) -> u8 {
        loop {
            match v.run().unwrap() {
                VcpuExit::IoOut(0x10, d) => return d[0],
                VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }

    /// Lets KVM finish the instruction behind the last exit, as a pause does.
    fn settle(v: &mut VcpuFd) {
        v.set_kvm_immediate_exit(1);
        let r = v.run();
        assert!(matches!(r, Err(ref e) if e.errno() == libc::EINTR), "{r:?}");
        v.set_kvm_immediate_exit(0);
    }

    #[test]
    fn a_saved_vcpu_continues_in_a_new_vm() {
        let mut image = vec![0u8; MEM];
        image[CODE_AT as usize..CODE_AT as usize + CODE.len()].copy_from_slice(CODE);
        let Some(mut a) = guest(&image) else { return };
        let mut sregs = a.vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        a.vcpu.set_sregs(&sregs).unwrap();
        a.vcpu
            .set_regs(&kvm_regs {
                rip: CODE_AT,
                rflags: 2,
                rbx: 0x40,
                r12: 0xdead_beef,
                ..Default::default()
            })
            .unwrap();
        for want in 0x41..=0x45 {
            assert_eq!(next_out(&mut a.vcpu), want);
        }
        settle(&mut a.vcpu);
        let vcpu_state = save_vcpu_state(&a.vcpu, Some(&a.vm)).unwrap();
        let vm_state = save_vm_state(&a.vm, true, true).unwrap();
        // Through the bytes a snapshot file would hold.
        let vcpu_state: CpuState =
            serde_json::from_slice(&serde_json::to_vec(&vcpu_state).unwrap()).unwrap();
        let decoded: KvmVcpuState = from_payload("t", &vcpu_state).unwrap();
        assert!(!decoded.msrs.is_empty(), "some MSRs are saved");
        assert!(decoded.lapic.is_some());

        // SAFETY: `a.mem` holds MEM bytes and the source VM is stopped.
        let ram = unsafe { std::slice::from_raw_parts(a.mem, MEM) }.to_vec();
        let Some(mut b) = guest(&ram) else { return };
        restore_vm_state(&b.vm, &vm_state).unwrap();
        restore_vcpu_state(&b.vcpu, &vcpu_state).unwrap();
        assert_eq!(b.vcpu.get_regs().unwrap().r12, 0xdead_beef);
        // The copy continues exactly where the source stopped, and so does the source.
        for want in 0x46..=0x4a {
            assert_eq!(next_out(&mut b.vcpu), want);
        }
        assert_eq!(next_out(&mut a.vcpu), 0x46);
        let lapic_a = a.vcpu.get_lapic().unwrap();
        let lapic_b = b.vcpu.get_lapic().unwrap();
        // APIC id, version, task priority and spurious vector registers agree.
        for off in [0x20usize, 0x30, 0x80, 0xf0] {
            assert_eq!(lapic_a.regs[off..off + 4], lapic_b.regs[off..off + 4]);
        }
        let pit_a = a.vm.get_pit2().unwrap();
        let pit_b = b.vm.get_pit2().unwrap();
        assert_eq!(pit_a.channels[0].mode, pit_b.channels[0].mode);
    }

    #[test]
    fn foreign_or_garbled_state_is_refused() {
        let s = CpuState {
            backend: "emu".into(),
            payload: vec![],
        };
        let err = from_payload::<KvmVcpuState>("vCPU state", &s).unwrap_err();
        assert!(err.to_string().contains("emu backend"), "{err}");
        let s = CpuState {
            backend: BACKEND.into(),
            payload: b"{\"regs\": 1}".to_vec(),
        };
        assert!(from_payload::<KvmVcpuState>("vCPU state", &s).is_err());
        let f = FpuState {
            fpr: vec![[0; 16]; 3],
            fcw: 0,
            fsw: 0,
            ftwx: 0,
            last_opcode: 0,
            last_ip: 0,
            last_dp: 0,
            xmm: vec![[0; 16]; 16],
            mxcsr: 0,
        };
        assert!(f.to_kvm().is_err());
    }
}
