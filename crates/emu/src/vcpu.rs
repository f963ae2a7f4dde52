//! One software vCPU behind the `Vcpu` trait: the dispatch loop (blocks, interrupts, timers,
//! kicks, INIT/SIPI, HLT) and register access for the VMM.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use corefour_hypervisor::{
    CpuState, HypervisorError, Regs, Result, SpecialRegs, Vcpu, VcpuKicker, VmExit, VmOps,
};

use crate::cpu::*;
use crate::decode::Cache;
use crate::flags;
use crate::jit::buf::CodeBuf;
use crate::mmu::TLB_SIZE;
use crate::platform::lapic::Lapic;
use crate::vm::{Kicker, Link, Shared};

/// How many instructions may run between looks at timers and interrupts.
const POLL_INSNS: u64 = 8192;

pub struct EmuVcpu {
    pub cpu: Cpu,
    cache: Cache,
    link: Arc<Link>,
    /// An application processor waits for INIT-SIPI, as on KVM with an in-kernel APIC.
    wait_sipi: bool,
    irq_ready: bool,
    /// The last blocks entered, printed with traced exceptions (COREFOUR_EMU_TRACE_UNIMPL).
    recent: [u64; 16],
    recent_at: usize,
    recent_end: u64,
    /// Host code of translated blocks (made on the first translation).
    jit_buf: Option<CodeBuf>,
    /// The buffer is full: drop every block and start it afresh before the next lookup.
    jit_full: bool,
    /// Executable memory could not be had: the JIT stays off for this vCPU.
    jit_broken: bool,
    /// Translated code just left through a chain slot: if the next block is translated and
    /// on the same page and version, the slot is pointed at it.
    chain_from: Option<ChainFrom>,
}

struct ChainFrom {
    slot: u32,
    /// The RIP the slot's exit goes to.
    rip: u64,
    /// `Block::page` of the block the code was entered by.
    page: (usize, u32, u64),
    /// Translated for CPL 3.
    user: bool,
    /// The slot is a guarded record (any page; see `jit::Tr::guarded`).
    guarded: bool,
}

/// The serialised form of a vCPU for snapshots.
#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot {
    regs: Regs,
    sregs: SpecialRegs,
    msr: Msrs,
    fpu: Fpu,
    dr: [u64; 8],
    lapic: Lapic,
    wait_sipi: bool,
}

impl EmuVcpu {
    pub fn new(shared: Arc<Shared>, index: u32, ops: Arc<dyn VmOps>) -> Self {
        let mem = shared.mem.read().unwrap_or_else(|e| e.into_inner()).clone();
        let link = shared.links[index as usize].clone();
        let mut cpu = Cpu::new(Env {
            mem,
            ops,
            vm: shared,
            id: index,
        });
        cpu.prof = crate::profile::Profile::from_env(index);
        EmuVcpu {
            cpu,
            cache: Cache::default(),
            link,
            wait_sipi: index != 0,
            irq_ready: false,
            recent: [0; 16],
            recent_at: 0,
            recent_end: 0,
            jit_buf: None,
            jit_full: false,
            jit_broken: false,
            chain_from: None,
        }
    }

    fn resync(&mut self, epoch: u64) {
        let mem = self
            .cpu
            .env
            .vm
            .mem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !Arc::ptr_eq(&mem, &self.cpu.env.mem) {
            // The cache holds pointers into the old map: drop it before the map goes, and
            // the translated code with it (guarded records point at version words).
            self.cache.clear();
            self.jit_full = true;
            self.cpu.env.mem = mem;
        }
        self.cpu.tlb.flush_all();
        self.cpu.epoch = epoch;
    }

    /// Timers, INIT/SIPI, NMI; refreshes whether an interrupt is ready.
    fn poll(&mut self) -> Option<VmExit> {
        self.link.hint.store(false, Ordering::Release);
        if self.cpu.prof.on() {
            self.sample();
        }
        let now = self.cpu.env.vm.now_ns();
        if self.cpu.env.id == 0 {
            self.cpu.env.vm.poll_pit(now);
        }
        let mut l = self.link.lapic();
        l.poll_timer(now);
        let init = std::mem::take(&mut l.init);
        let sipi = l.sipi.take();
        let nmi = std::mem::take(&mut l.nmi);
        self.irq_ready = l.pending().is_some();
        let ext = self.cpu.env.id == 0 && l.accepts_pic();
        drop(l);
        if ext && !self.irq_ready {
            self.irq_ready = self.cpu.env.vm.pic().pending().is_some();
        }
        if init || sipi.is_some() {
            self.cache.prev = std::ptr::null();
        }
        if init {
            self.init_reset();
        }
        if let Some(v) = sipi {
            if self.wait_sipi {
                self.wait_sipi = false;
                let cs = &mut self.cpu.seg[CS];
                cs.selector = (v as u16) << 8;
                cs.base = (v as u64) << 12;
                self.cpu.rip = 0;
                self.cpu.update_mode();
            }
        }
        if nmi && !self.wait_sipi {
            if let Some(e) = self.raise(Fault {
                vector: NMI,
                code: None,
            }) {
                return Some(e);
            }
        }
        self.cpu.poll_at = self.cpu.icount + POLL_INSNS;
        None
    }

    fn sample(&mut self) {
        let rip = self.cpu.rip;
        *self.cpu.prof.samples.entry(rip).or_default() += 1;
        let mut st = [0u64; 4];
        let mut n = 0;
        let sp = self.cpu.gpr[4];
        // A failed probe must not leave its address in CR2 for the guest's next #PF handler.
        let cr2 = self.cpu.cr2;
        for k in 0..64u64 {
            if n == 4 {
                break;
            }
            match self.cpu.read_as(sp.wrapping_add(8 * k), 8, false) {
                Ok(v) if v >> 32 == 0xffff_ffff && v >= 0xffff_ffff_8100_0000 => {
                    st[n] = v;
                    n += 1;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        self.cpu.cr2 = cr2;
        let ms = self
            .cpu
            .prof
            .started
            .map_or(0, |s| s.elapsed().as_millis() as u32);
        self.cpu.prof.seq.push((ms, rip, st));
    }

    /// INIT: back to the reset state, waiting for a SIPI.
    fn init_reset(&mut self) {
        let env = Env {
            mem: self.cpu.env.mem.clone(),
            ops: self.cpu.env.ops.clone(),
            vm: self.cpu.env.vm.clone(),
            id: self.cpu.env.id,
        };
        let epoch = self.cpu.epoch;
        let prof = std::mem::take(&mut self.cpu.prof);
        self.cpu = Cpu::new(env);
        self.cpu.epoch = epoch;
        self.cpu.prof = prof;
        self.wait_sipi = true;
    }

    /// Delivers an exception, escalating to #DF and to a shutdown (triple fault).
    fn raise(&mut self, f: Fault) -> Option<VmExit> {
        self.cpu.prof.exceptions += 1;
        self.cache.prev = std::ptr::null();
        if self.cpu.env.vm.trace_unimpl && f.vector != PF {
            let lin = self.cpu.lin(CS, self.cpu.rip);
            let bytes: Vec<String> = (0..12)
                .map(|k| match self.cpu.read_as(lin + k, 1, false) {
                    Ok(b) => format!("{b:02x}"),
                    Err(_) => "??".into(),
                })
                .collect();
            let trail: Vec<String> = (0..16)
                .map(|k| format!("{:#x}", self.recent[(self.recent_at + k) % 16]))
                .collect();
            eprintln!("emu: last blocks: {}", trail.join(" "));
            eprintln!(
                "emu: exception {} code {:?} at rip {:#x} (cpl {}, cr2 {:#x}) bytes {}",
                f.vector,
                f.code,
                self.cpu.rip,
                self.cpu.cpl,
                self.cpu.cr2,
                bytes.join(" ")
            );
        }
        match self.cpu.deliver(f.vector, f.code, false) {
            Ok(()) => None,
            Err(Stop::Fault(_)) if f.vector == DF => Some(VmExit::Shutdown),
            Err(Stop::Fault(_)) => match self.cpu.deliver(DF, Some(0), false) {
                Ok(()) => None,
                Err(Stop::Exit(e)) => Some(e),
                Err(_) => Some(VmExit::Shutdown),
            },
            Err(Stop::Exit(e)) => Some(e),
            Err(Stop::Halt) => None,
        }
    }

    /// The 8259's vector if its output reaches this CPU (LINT0 ExtINT on the boot CPU) and it
    /// has a request; it goes first, as on KVM.
    fn take_extint(&mut self) -> Option<u8> {
        if self.cpu.env.id != 0 || !self.link.lapic().accepts_pic() {
            return None;
        }
        self.cpu.env.vm.pic().ack()
    }

    fn take_interrupt(&mut self) -> Option<VmExit> {
        let v = match self.take_extint() {
            Some(v) => Some(v),
            None => self.link.lapic().ack(),
        };
        self.irq_ready = self.link.lapic().pending().is_some()
            || (self.cpu.env.id == 0
                && self.link.lapic().accepts_pic()
                && self.cpu.env.vm.pic().pending().is_some());
        let v = v?;
        self.cpu.prof.interrupts += 1;
        self.cache.prev = std::ptr::null();
        match self.cpu.deliver(v, None, false) {
            Ok(()) => None,
            Err(Stop::Fault(f)) => self.raise(f),
            Err(Stop::Exit(e)) => Some(e),
            Err(Stop::Halt) => None,
        }
    }

    /// HLT with interrupts on: sleep until one is ready, a kick, or INIT/SIPI.
    fn halt_wait(&mut self) -> Option<VmExit> {
        let t0 = self.cpu.prof.on().then(std::time::Instant::now);
        let r = self.halt_wait_inner();
        if let Some(t0) = t0 {
            self.cpu.prof.halted += t0.elapsed();
            self.cpu.prof.halts += 1;
        }
        r
    }

    fn halt_wait_inner(&mut self) -> Option<VmExit> {
        loop {
            if let Some(e) = self.poll() {
                return Some(e);
            }
            if self.irq_ready || self.wait_sipi {
                return None;
            }
            if self.link.kick.load(Ordering::Acquire) {
                return None;
            }
            let now = self.cpu.env.vm.now_ns();
            let l = self.link.lapic();
            let next = match (l.deadline, l.tsc_deadline) {
                (Some(d), _) => Some(d),
                (None, t) if t != 0 => Some(t),
                _ => None,
            };
            drop(l);
            let pit = if self.cpu.env.id == 0 {
                self.cpu.env.vm.pit().next_irq()
            } else {
                None
            };
            let next = match (next, pit) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let wait = next.map_or(Duration::from_millis(50), |d| {
                Duration::from_nanos(d.saturating_sub(now))
            });
            self.link.sleep(wait.min(Duration::from_millis(50)));
        }
    }

    /// Runs one decoded block; returns an exit if the VMM must see one.
    #[inline]
    fn step_block(&mut self) -> Option<VmExit> {
        if self.jit_full {
            // Translated code is only reachable through blocks: drop them all, then reuse.
            self.cache.clear();
            self.cpu.prof.cache_clears += 1;
            if let Some(buf) = self.jit_buf.as_mut() {
                buf.reset();
            }
            self.jit_full = false;
            self.chain_from = None;
        }
        let mut b = match self.cache.lookup(&mut self.cpu) {
            Ok(b) => b,
            Err(Stop::Fault(f)) => return self.raise(f),
            Err(Stop::Exit(e)) => return Some(e),
            Err(Stop::Halt) => return None,
        };
        self.cpu.prof.dispatches += 1;
        if self.cpu.env.vm.trace_unimpl {
            if b.rip != self.recent_end {
                // Only jumps: a block that falls through from the previous one is not
                // recorded.
                self.recent[self.recent_at] = b.rip;
                self.recent_at = (self.recent_at + 1) % 16;
            }
            self.recent_end = b.ins.last().map_or(0, |o| o.i.next_ip());
        }
        let bp = b as *const crate::decode::Block;
        let bp_cached = b.cached();
        if let Some(ChainFrom {
            slot,
            rip,
            page,
            user,
            guarded,
        }) = self.chain_from.take()
        {
            let (vp, ver, lin) = b.page();
            let same_user = user == (self.cpu.cpl == 3);
            if guarded && b.rip == rip && b.cached() && b.bits == 64 && same_user {
                // The record checks the code TLB entry and the page version itself.
                let e = &self.cpu.tlb.x[user as usize][((lin >> 12) as usize) & (TLB_SIZE - 1)];
                if let (Some(j), Some(buf)) = (b.jit.get(), self.jit_buf.as_mut()) {
                    if j.user == user
                        && e.exec == lin & !0xfff
                        && lin.wrapping_add(e.addend) == b.host()
                    {
                        buf.set_record(slot, j.chain, rip, e.addend, (vp, ver));
                    }
                }
            } else if !guarded
                && b.rip == rip
                && vp == page.0
                && ver == page.1
                && (lin ^ page.2) < 0x1000
            {
                if let (Some(j), Some(buf)) = (b.jit.get(), self.jit_buf.as_mut()) {
                    if j.user == user && j.user == (self.cpu.cpl == 3) {
                        buf.set_slot(slot, j.chain);
                    }
                }
            }
        }
        let mut start = 0;
        let threshold = self.cpu.env.vm.jit_threshold;
        if threshold != 0 && b.bits == 64 && b.cached() && !self.jit_broken {
            let user = self.cpu.cpl == 3;
            let mut jit = b.jit.get();
            if jit.is_none() {
                let h = b.hits.get();
                if h != u32::MAX && h + 1 >= threshold {
                    b.hits.set(u32::MAX);
                    if self.jit_buf.is_none() {
                        match CodeBuf::new() {
                            Ok(buf) => self.jit_buf = Some(buf),
                            Err(e) => {
                                // Said once; the vCPU carries on interpreting.
                                eprintln!(
                                    "emu: vCPU {}: JIT off, interpreting only: {e}",
                                    self.cpu.env.id
                                );
                                self.jit_broken = true;
                            }
                        }
                    }
                    if let Some(buf) = self.jit_buf.as_mut() {
                        if buf.room() < 1 << 16 {
                            self.jit_full = true;
                        } else {
                            let smp = self.cpu.env.vm.nvcpus > 1;
                            jit = crate::jit::translate(
                                b.ins.iter().map(|o| &o.i),
                                bp as u64,
                                user,
                                smp,
                                buf,
                            );
                            b.jit.set(jit);
                            self.cpu.prof.jit_blocks += jit.is_some() as u64;
                            if let (true, Some(m)) = (self.cpu.prof.on(), jit.and_then(|j| j.stop))
                            {
                                *self.cpu.prof.jit_stops.entry(format!("{m:?}")).or_default() += 1;
                            }
                        }
                    }
                } else if h != u32::MAX {
                    b.hits.set(h + 1);
                }
            }
            if let Some(j) = jit.filter(|j| j.user == user) {
                // Always through `jit_flags`: blocks chained behind this one may use them.
                self.cpu.jit_flags = (self.cpu.flags() & flags::ARITH) | 2;
                let before = self.cpu.icount;
                self.cpu.prof.jit_runs += 1;
                self.cpu.jit_last = 0;
                // SAFETY: `entry` is code this vCPU's translator made for this block (still
                // valid: the lookup checked its page version) and the buffer holding it is
                // alive (it is only reset after the cache is cleared). It reads and writes
                // only the `Cpu` it is given and guest RAM through TLB entries, as the
                // interpreter would.
                let ret = unsafe { (j.entry)(&mut self.cpu) };
                let (k, slot, guarded) = crate::jit::split_ret(ret);
                self.cpu.rflags =
                    (self.cpu.rflags & !flags::ARITH) | (self.cpu.jit_flags & flags::ARITH);
                // The code counted what it retired into icount itself (it may loop).
                self.cpu.prof.jit_insns += self.cpu.icount - before;
                // The code leaves RIP exact. It may have run through chained blocks, and
                // names the one it left from: `k` is that block's instruction, where the
                // interpreter takes over if RIP is there.
                let lp = self.cpu.jit_last as *const crate::decode::Block;
                let last = if lp.is_null() {
                    b
                } else {
                    // SAFETY: every exit stores the block its code was translated for; that
                    // block is in the cache's map or its dead list (replaced blocks with
                    // code are kept until `clear`, after which their code is unreachable).
                    unsafe { &*lp }
                };
                if last.ins.get(k).is_none_or(|o| o.i.ip() != self.cpu.rip)
                    || !(std::ptr::eq(last, b) || last.valid())
                {
                    if slot != 0 {
                        if guarded {
                            self.cpu.prof.exit_guarded += 1;
                        } else {
                            self.cpu.prof.exit_unchained += 1;
                        }
                        self.chain_from = Some(ChainFrom {
                            slot,
                            rip: self.cpu.rip,
                            page: last.page(),
                            user,
                            guarded,
                        });
                    }
                    // Links hang off the entered block, not the last: it predicts better
                    // where a chain's last block (say a RET shared by many callers) goes.
                    self.cache.ran(bp, bp_cached);
                    return None;
                }
                if last.jit.get().is_some_and(|lj| k < lj.ops as usize) {
                    self.cpu.prof.jit_side_exits += 1;
                } else if k < last.ins.len() {
                    self.cpu.prof.exit_stop += 1;
                }
                b = last;
                start = k;
            }
        }
        for op in b.ins[start..].iter() {
            let ins = &op.i;
            self.cpu.cur_ip = ins.ip();
            self.cpu.rip = ins.next_ip();
            match (op.f)(&mut self.cpu, ins) {
                Ok(()) => {}
                Err(Stop::Fault(f)) => {
                    self.cpu.rip = ins.ip();
                    return self.raise(f);
                }
                Err(Stop::Halt) => {
                    self.cpu.icount += 1;
                    if self.cpu.rflags & flags::IF == 0 {
                        return Some(VmExit::Halt);
                    }
                    return self.halt_wait();
                }
                Err(Stop::Exit(e)) => {
                    self.cpu.rip = ins.ip();
                    return Some(e);
                }
            }
            self.cpu.icount += 1;
            if self.cpu.brk {
                self.cpu.brk = false;
                return None;
            }
        }
        self.cache.ran(bp, bp_cached);
        None
    }

    /// Instructions retired so far (for MIPS figures).
    pub fn instructions(&self) -> u64 {
        self.cpu.icount
    }
}

impl Drop for EmuVcpu {
    fn drop(&mut self) {
        self.cpu.prof.tlb_flushes = self.cpu.tlb.flushes_all;
        self.cpu.prof.tlb_flushes_nonglobal = self.cpu.tlb.flushes_nonglobal;
        self.cpu.prof.write(self.cpu.icount);
    }
}

impl Vcpu for EmuVcpu {
    fn regs(&self) -> Result<Regs> {
        let c = &self.cpu;
        let g = &c.gpr;
        let mut f = c.rflags;
        if c.lazy.op != flags::Op::Valid {
            f = (f & !flags::ARITH) | c.lazy.compute();
        }
        Ok(Regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: c.rip,
            rflags: f,
        })
    }

    fn set_regs(&mut self, r: &Regs) -> Result<()> {
        let c = &mut self.cpu;
        c.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        c.rip = r.rip;
        c.lazy.op = flags::Op::Valid;
        c.rflags = (r.rflags & 0x3f_7fd7) | 2;
        c.update_mode();
        // The VMM giving an AP its registers starts it directly (as the KVM backend does by
        // making every vCPU runnable); untouched APs keep waiting for INIT/SIPI.
        self.wait_sipi = false;
        Ok(())
    }

    fn sregs(&self) -> Result<SpecialRegs> {
        let c = &self.cpu;
        Ok(SpecialRegs {
            es: c.seg[ES],
            cs: c.seg[CS],
            ss: c.seg[SS],
            ds: c.seg[DS],
            fs: c.seg[FS],
            gs: c.seg[GS],
            tr: c.tr,
            ldt: c.ldt,
            gdt: c.gdt,
            idt: c.idt,
            cr0: c.cr0,
            cr2: c.cr2,
            cr3: c.cr3,
            cr4: c.cr4,
            cr8: (c.tpr() >> 4) as u64,
            efer: c.efer,
            apic_base: c.apic_base(),
        })
    }

    fn set_sregs(&mut self, s: &SpecialRegs) -> Result<()> {
        if s.efer & EFER_LMA != 0 && (s.cr0 & CR0_PG == 0 || s.cr4 & CR4_PAE == 0) {
            return Err(HypervisorError::GuestState(
                "EFER.LMA is set without CR0.PG and CR4.PAE".into(),
            ));
        }
        let c = &mut self.cpu;
        c.seg = [s.es, s.cs, s.ss, s.ds, s.fs, s.gs];
        c.tr = s.tr;
        c.ldt = s.ldt;
        c.gdt = s.gdt;
        c.idt = s.idt;
        c.cr0 = s.cr0;
        c.cr2 = s.cr2;
        c.cr3 = s.cr3;
        c.cr4 = s.cr4;
        c.efer = s.efer;
        if s.apic_base != 0 {
            c.set_apic_base(s.apic_base).map_err(|_| {
                HypervisorError::GuestState(format!("APIC base {:#x} is not valid", s.apic_base))
            })?;
        }
        c.set_tpr((s.cr8 as u8 & 0xf) << 4);
        c.tlb.flush_all();
        c.update_mode();
        Ok(())
    }

    fn run(&mut self) -> Result<VmExit> {
        let vm = self.cpu.env.vm.clone();
        loop {
            let e = vm.epoch.load(Ordering::Acquire);
            if e != self.cpu.epoch {
                self.resync(e);
            }
            if self.link.kick.load(Ordering::Relaxed)
                && self.link.kick.swap(false, Ordering::AcqRel)
            {
                return Ok(VmExit::Interrupted);
            }
            if self.cpu.icount >= self.cpu.poll_at || self.link.hint.load(Ordering::Acquire) {
                if let Some(x) = self.poll() {
                    return Ok(x);
                }
            }
            if self.wait_sipi {
                self.link.sleep(Duration::from_millis(50));
                continue;
            }
            if self.irq_ready && self.cpu.rflags & flags::IF != 0 && !self.cpu.shadow {
                if let Some(x) = self.take_interrupt() {
                    return Ok(x);
                }
            }
            self.cpu.shadow = false;
            if let Some(x) = self.step_block() {
                return Ok(x);
            }
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(Kicker(self.link.clone()))
    }

    fn save_state(&self) -> Result<CpuState> {
        let snap = Snapshot {
            regs: self.regs()?,
            sregs: self.sregs()?,
            msr: self.cpu.msr.clone(),
            fpu: self.cpu.fpu.clone(),
            dr: self.cpu.dr,
            lapic: self.link.lapic().clone(),
            wait_sipi: self.wait_sipi,
        };
        let payload = serde_json::to_vec(&snap)
            .map_err(|e| HypervisorError::GuestState(format!("serialising vCPU state: {e}")))?;
        Ok(CpuState {
            backend: "emu".into(),
            payload,
        })
    }

    fn restore_state(&mut self, state: &CpuState) -> Result<()> {
        if state.backend != "emu" {
            return Err(HypervisorError::Invalid(format!(
                "vCPU state was saved by the {} backend, not emu",
                state.backend
            )));
        }
        let snap: Snapshot = serde_json::from_slice(&state.payload)
            .map_err(|e| HypervisorError::GuestState(format!("vCPU state is corrupt: {e}")))?;
        let id = self.link.lapic().id;
        if snap.lapic.id != id {
            return Err(HypervisorError::GuestState(format!(
                "vCPU state is for APIC {} but this vCPU is APIC {id}",
                snap.lapic.id
            )));
        }
        self.set_sregs(&snap.sregs)?;
        self.set_regs(&snap.regs)?;
        self.cpu.msr = snap.msr;
        self.cpu.fpu = snap.fpu;
        self.cpu.dr = snap.dr;
        *self.link.lapic() = snap.lapic;
        self.wait_sipi = snap.wait_sipi;
        self.cpu.poll_at = 0;
        Ok(())
    }
}
