//! System instructions: segment loads and far transfers, interrupt delivery and IRET, control
//! registers, descriptor tables, MSRs, CPUID, SYSCALL/SYSRET, SWAPGS, port I/O, time.

use corefour_hypervisor::{Segment, VmExit};
use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::cpu::*;
use crate::flags;

/// Decodes an 8-byte descriptor.
pub fn parse_desc(sel: u16, raw: u64) -> Segment {
    let limit = ((raw & 0xffff) | ((raw >> 32) & 0xf_0000)) as u32;
    let g = raw & (1 << 55) != 0;
    Segment {
        base: ((raw >> 16) & 0xff_ffff) | ((raw >> 32) & 0xff00_0000),
        limit: if g { (limit << 12) | 0xfff } else { limit },
        selector: sel,
        type_: ((raw >> 40) & 0xf) as u8,
        s: raw & (1 << 44) != 0,
        dpl: ((raw >> 45) & 3) as u8,
        present: raw & (1 << 47) != 0,
        avl: raw & (1 << 52) != 0,
        l: raw & (1 << 53) != 0,
        db: raw & (1 << 54) != 0,
        g,
        unusable: false,
    }
}

fn real_seg(old: &Segment, sel: u16) -> Segment {
    Segment {
        selector: sel,
        base: (sel as u64) << 4,
        ..*old
    }
}

fn null_seg(sel: u16) -> Segment {
    Segment {
        selector: sel,
        unusable: true,
        ..Segment::default()
    }
}

impl Cpu {
    /// Reads the raw 8-byte descriptor for `sel` from the GDT or LDT.
    fn read_desc(&mut self, sel: u16) -> X<u64> {
        let (base, limit) = if sel & 4 != 0 {
            (self.ldt.base, self.ldt.limit as u64)
        } else {
            (self.gdt.base, self.gdt.limit as u64)
        };
        let idx = (sel & !7) as u64;
        if idx + 7 > limit {
            return gp((sel & !3) as u32);
        }
        self.read_as(base.wrapping_add(idx), 8, false)
    }

    /// Loads a data or stack segment register (not CS).
    pub fn load_seg(&mut self, s: usize, sel: u16) -> X<()> {
        if !self.protected() || self.rflags & flags::VM != 0 {
            self.seg[s] = real_seg(&self.seg[s], sel);
            if self.rflags & flags::VM != 0 {
                self.seg[s].limit = 0xffff;
                self.seg[s].dpl = 3;
            }
            return Ok(());
        }
        if sel & !3 == 0 {
            if s == SS && (self.bits != 64 || self.cpl == 3) {
                return gp(0);
            }
            let base = if s >= FS { self.seg[s].base } else { 0 };
            self.seg[s] = null_seg(sel);
            self.seg[s].base = base;
            if s == SS {
                self.seg[s].dpl = self.cpl;
            }
            return Ok(());
        }
        let raw = self.read_desc(sel)?;
        let d = parse_desc(sel, raw);
        if !d.s {
            return gp((sel & !3) as u32);
        }
        let code = d.type_ & 8 != 0;
        if s == SS {
            if code || d.type_ & 2 == 0 || (sel & 3) as u8 != self.cpl || d.dpl != self.cpl {
                return gp((sel & !3) as u32);
            }
            if !d.present {
                return fault(SSF, Some((sel & !3) as u32));
            }
        } else {
            if code && d.type_ & 2 == 0 {
                return gp((sel & !3) as u32);
            }
            if !d.present {
                return fault(NP, Some((sel & !3) as u32));
            }
        }
        self.seg[s] = d;
        Ok(())
    }

    pub fn mov_sreg(&mut self, s: usize, sel: u16) -> X<()> {
        if s == CS {
            return ud();
        }
        self.load_seg(s, sel)?;
        if s == SS {
            self.shadow = true;
            self.brk = true;
        }
        Ok(())
    }

    /// Loads CS for a far transfer to privilege `cpl`.
    fn set_cs(&mut self, mut d: Segment, cpl: u8) {
        d.selector = (d.selector & !3) | cpl as u16;
        self.seg[CS] = d;
        self.update_mode();
        self.cpl = cpl;
        self.brk = true;
    }

    /// The code-segment descriptor for a far transfer, checked.
    fn code_desc(&mut self, sel: u16) -> X<Segment> {
        if sel & !3 == 0 {
            return gp(0);
        }
        let raw = self.read_desc(sel)?;
        let d = parse_desc(sel, raw);
        if !d.s || d.type_ & 8 == 0 {
            if !d.s {
                return Err(Stop::Exit(VmExit::Unhandled(format!(
                    "far transfer through system descriptor type {:#x} (call/task gates are not emulated)",
                    d.type_
                ))));
            }
            return gp((sel & !3) as u32);
        }
        if !d.present {
            return fault(NP, Some((sel & !3) as u32));
        }
        Ok(d)
    }

    /// JMP/CALL far to `sel:off`; `push` is the operand size in bytes for CALL.
    pub fn far_jump(&mut self, sel: u16, off: u64, call: bool, _half: usize) -> X<()> {
        let size = match self.bits {
            16 => 2,
            _ => 4,
        };
        self.far_transfer(sel, off, call, size)
    }

    fn far_transfer(&mut self, sel: u16, off: u64, call: bool, size: usize) -> X<()> {
        let old_cs = self.seg[CS].selector as u64;
        let ret = self.rip;
        if !self.protected() || self.rflags & flags::VM != 0 {
            if call {
                self.push(size, old_cs)?;
                self.push(size, ret)?;
            }
            self.seg[CS] = real_seg(&self.seg[CS], sel);
            self.rip = off & super::szmask(size as u32);
            self.brk = true;
            return Ok(());
        }
        let d = self.code_desc(sel)?;
        if call {
            self.push(size, old_cs)?;
            self.push(size, ret)?
        }
        let cpl = self.cpl;
        self.set_cs(d, cpl);
        self.rip = if self.bits == 64 {
            off
        } else {
            off & 0xffff_ffff
        };
        Ok(())
    }

    pub fn far_from_mem(&mut self, i: &Instruction, call: bool) -> X<()> {
        use iced_x86::MemorySize as S;
        let size = match i.memory_size() {
            S::SegPtr16 => 2,
            S::SegPtr32 => 4,
            _ => 8,
        };
        let a = self.ea(i);
        let off = self.read(a, size)?;
        let sel = self.read(a.wrapping_add(size as u64), 2)? as u16;
        self.far_transfer(sel, off, call, size)
    }

    pub fn far_ret(&mut self, size: usize, extra: u64) -> X<()> {
        let sp0 = self.gpr[4];
        let r = (|| {
            let ip = self.pop(size)?;
            let sel = self.pop(size)? as u16;
            if !self.protected() || self.rflags & flags::VM != 0 {
                self.seg[CS] = real_seg(&self.seg[CS], sel);
                self.rip = ip;
                self.brk = true;
            } else {
                let d = self.code_desc(sel)?;
                let rpl = (sel & 3) as u8;
                if rpl > self.cpl {
                    let m = self.sp_mask();
                    self.gpr[4] = (self.gpr[4] & !m) | (self.gpr[4].wrapping_add(extra) & m);
                    let sp = self.pop(size)?;
                    let ss = self.pop(size)? as u16;
                    self.set_cs(d, rpl);
                    self.load_seg(SS, ss)?;
                    self.gpr[4] = sp;
                    self.rip = ip;
                    return Ok(());
                }
                let cpl = self.cpl;
                self.set_cs(d, cpl);
                self.rip = ip;
            }
            let m = self.sp_mask();
            self.gpr[4] = (self.gpr[4] & !m) | (self.gpr[4].wrapping_add(extra) & m);
            Ok(())
        })();
        if r.is_err() {
            self.gpr[4] = sp0;
        }
        r
    }

    /// INT n / INT3 / INTO: a software interrupt returning after the instruction.
    pub fn soft_int(&mut self, vec: u8, int_n: bool) -> X<()> {
        if int_n && self.rflags & flags::VM != 0 && (self.rflags & flags::IOPL) >> 12 < 3 {
            return gp(0);
        }
        self.deliver(vec, None, true)
    }

    /// Delivers interrupt or exception `vec` through the IVT/IDT. `soft` checks the gate's DPL
    /// (INT n). On entry `rip` is the return address.
    pub fn deliver(&mut self, vec: u8, code: Option<u32>, soft: bool) -> X<()> {
        let f = self.flags();
        self.shadow = false;
        if !self.protected() {
            let a = self.idt.base.wrapping_add(vec as u64 * 4);
            if vec as u64 * 4 + 3 > self.idt.limit as u64 {
                return gp(0);
            }
            let off = self.read_as(a, 2, false)?;
            let sel = self.read_as(a + 2, 2, false)? as u16;
            let cs = self.seg[CS].selector as u64;
            self.push(2, f)?;
            self.push(2, cs)?;
            self.push(2, self.rip)?;
            self.rflags &= !(flags::IF | flags::TF | flags::AC | flags::RF);
            self.seg[CS] = real_seg(&self.seg[CS], sel);
            self.rip = off;
            self.brk = true;
            return Ok(());
        }
        let ext = if soft { 0 } else { 1 };
        let long = self.long_mode();
        let esz = if long { 16 } else { 8 };
        if (vec as u64 + 1) * esz - 1 > self.idt.limit as u64 {
            return gp(vec as u32 * 8 + 2 + ext);
        }
        let ga = self.idt.base.wrapping_add(vec as u64 * esz);
        let lo = self.read_as(ga, 8, false)?;
        let hi = if long {
            self.read_as(ga + 8, 8, false)?
        } else {
            0
        };
        let typ = ((lo >> 40) & 0xf) as u8;
        let dpl = ((lo >> 45) & 3) as u8;
        if soft && dpl < self.cpl {
            return gp(vec as u32 * 8 + 2);
        }
        if lo & (1 << 47) == 0 {
            return fault(NP, Some(vec as u32 * 8 + 2 + ext));
        }
        let valid = if long {
            matches!(typ, 0xe | 0xf)
        } else {
            matches!(typ, 0x6 | 0x7 | 0xe | 0xf)
        };
        if !valid {
            if typ == 5 {
                return Err(Stop::Exit(VmExit::Unhandled(format!(
                    "interrupt {vec} through a task gate (hardware task switching is not emulated)"
                ))));
            }
            return gp(vec as u32 * 8 + 2 + ext);
        }
        let sel = ((lo >> 16) & 0xffff) as u16;
        let mut off = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
        if long {
            off |= (hi & 0xffff_ffff) << 32;
        }
        let trap = typ & 1 != 0;
        let d = self.code_desc(sel)?;
        let conforming = d.type_ & 4 != 0;
        let new_cpl = if conforming { self.cpl } else { d.dpl };
        if new_cpl > self.cpl {
            return gp((sel & !3) as u32 + ext);
        }
        let old_ss = self.seg[SS].selector as u64;
        let old_sp = self.gpr[4];
        let old_cs = self.seg[CS].selector as u64;
        if long {
            let ist = (lo >> 32) & 7;
            let mut sp = if ist != 0 {
                self.read_as(self.tr.base + 0x24 + (ist - 1) * 8, 8, false)?
            } else if new_cpl < self.cpl {
                self.read_as(self.tr.base + 4 + new_cpl as u64 * 8, 8, false)?
            } else {
                old_sp
            };
            sp &= !15;
            let mut frame = [old_ss, old_sp, f & !flags::RF, old_cs, self.rip, 0];
            let n = if let Some(c) = code {
                frame[5] = c as u64;
                6
            } else {
                5
            };
            // Write the frame supervisor-side before changing any state, so a fault here
            // leaves the interrupted context intact for the double fault.
            for (k, v) in frame[..n].iter().enumerate() {
                let a = sp.wrapping_sub(8 * (k as u64 + 1));
                self.write_as(a, 8, *v, false)?;
            }
            sp = sp.wrapping_sub(8 * n as u64);
            if new_cpl < self.cpl {
                self.seg[SS] = null_seg(new_cpl as u16);
                self.seg[SS].dpl = new_cpl;
            }
            self.gpr[4] = sp;
            self.set_cs(d, new_cpl);
            self.rip = off;
        } else {
            let gate32 = typ & 8 != 0;
            let sz: u64 = if gate32 { 4 } else { 2 };
            let (mut sp, ss_seg) = if new_cpl < self.cpl {
                if self.rflags & flags::VM != 0 {
                    return Err(Stop::Exit(VmExit::Unhandled(
                        "interrupt from virtual-8086 mode".into(),
                    )));
                }
                let tss32 = self.tr.type_ & 8 != 0;
                let (esp, ss) = if tss32 {
                    (
                        self.read_as(self.tr.base + 4 + new_cpl as u64 * 8, 4, false)?,
                        self.read_as(self.tr.base + 8 + new_cpl as u64 * 8, 2, false)? as u16,
                    )
                } else {
                    (
                        self.read_as(self.tr.base + 2 + new_cpl as u64 * 4, 2, false)?,
                        self.read_as(self.tr.base + 4 + new_cpl as u64 * 4, 2, false)? as u16,
                    )
                };
                let raw = self.read_desc(ss)?;
                let sd = parse_desc(ss, raw);
                (esp, Some(sd))
            } else {
                (old_sp, None)
            };
            let (ss_base, ss_mask) = match &ss_seg {
                Some(s) => (s.base, if s.db { 0xffff_ffff } else { 0xffff }),
                None => (self.seg[SS].base, self.sp_mask()),
            };
            let mut vals = Vec::with_capacity(6);
            if ss_seg.is_some() {
                vals.push(old_ss);
                vals.push(old_sp);
            }
            vals.extend_from_slice(&[f & !flags::RF, old_cs, self.rip]);
            if let Some(c) = code {
                vals.push(c as u64);
            }
            for v in vals {
                sp = sp.wrapping_sub(sz) & ss_mask;
                self.write_as((ss_base + sp) & 0xffff_ffff, sz as usize, v, false)?;
            }
            if let Some(s) = ss_seg {
                self.seg[SS] = s;
            }
            self.gpr[4] = (self.gpr[4] & !ss_mask) | sp;
            self.set_cs(d, new_cpl);
            self.rip = off;
        }
        if !trap {
            self.rflags &= !flags::IF;
        }
        self.rflags &= !(flags::TF | flags::NT | flags::RF | flags::VM);
        self.update_mode();
        Ok(())
    }

    pub fn iret(&mut self, size: usize) -> X<()> {
        let sp0 = self.gpr[4];
        let r = self.iret_inner(size);
        if r.is_err() {
            self.gpr[4] = sp0;
        }
        r
    }

    fn iret_inner(&mut self, size: usize) -> X<()> {
        if !self.protected() {
            let ip = self.pop(size)?;
            let cs = self.pop(size)? as u16;
            let f = self.pop(size)?;
            self.seg[CS] = real_seg(&self.seg[CS], cs);
            self.rip = ip;
            self.write_flags(f, size);
            self.brk = true;
            return Ok(());
        }
        if self.rflags & flags::NT != 0 && !self.long_mode() {
            return Err(Stop::Exit(VmExit::Unhandled(
                "IRET with NT set (task return)".into(),
            )));
        }
        let ip = self.pop(size)?;
        let cs = self.pop(size)? as u16;
        let f = self.pop(size)?;
        let rpl = (cs & 3) as u8;
        if rpl < self.cpl {
            return gp((cs & !3) as u32);
        }
        let d = self.code_desc(cs)?;
        let to_outer = rpl > self.cpl;
        let (sp, ss) = if to_outer || self.bits == 64 {
            (Some(self.pop(size)?), Some(self.pop(size)? as u16))
        } else {
            (None, None)
        };
        self.write_flags(f, size);
        self.set_cs(d, rpl);
        self.rip = if self.bits == 64 {
            ip
        } else {
            ip & 0xffff_ffff
        };
        if let (Some(sp), Some(ss)) = (sp, ss) {
            self.load_seg(SS, ss)?;
            self.gpr[4] = if size == 2 {
                (self.gpr[4] & !0xffff) | (sp & 0xffff)
            } else {
                sp
            };
        }
        if to_outer {
            // Data segments the outer level may not use become null.
            for s in [ES, DS, FS, GS] {
                let g = self.seg[s];
                let code_conf = g.type_ & 0xc == 0xc;
                if !g.unusable && g.dpl < rpl && !code_conf {
                    let base = if s >= FS { g.base } else { 0 };
                    self.seg[s] = null_seg(0);
                    if self.long_mode() {
                        self.seg[s].base = base;
                    }
                }
            }
        }
        self.update_mode();
        Ok(())
    }

    pub(super) fn exec_system(&mut self, i: &Instruction) -> Option<X<()>> {
        let m = i.mnemonic();
        let needs_cpl0 = matches!(
            m,
            M::Lgdt
                | M::Lidt
                | M::Lldt
                | M::Ltr
                | M::Invlpg
                | M::Clts
                | M::Wbinvd
                | M::Invd
                | M::Rdmsr
                | M::Wrmsr
                | M::Lmsw
                | M::Swapgs
        );
        if needs_cpl0 && self.cpl != 0 {
            if m == M::Swapgs && self.bits != 64 {
                return Some(ud());
            }
            return Some(gp(0));
        }
        Some(match m {
            M::In => {
                let port = if i.op_kind(1) == OpKind::Register {
                    self.gpr[2] as u16
                } else {
                    i.immediate8() as u16
                };
                if !self.iopl_ok() {
                    return Some(gp(0));
                }
                let size = i.op_register(0).size();
                let v = self.pio_in(port, size);
                self.set_gpr(0, size as u32, v);
                Ok(())
            }
            M::Out => {
                let port = if i.op_kind(0) == OpKind::Register {
                    self.gpr[2] as u16
                } else {
                    i.immediate8() as u16
                };
                if !self.iopl_ok() {
                    return Some(gp(0));
                }
                let size = i.op_register(1).size();
                self.pio_out(port, size, self.gpr[0]);
                Ok(())
            }
            M::Lgdt | M::Lidt => {
                let a = self.ea(i);
                let r = (|| {
                    let limit = self.read(a, 2)? as u16;
                    let base = if self.bits == 64 {
                        self.read(a + 2, 8)?
                    } else {
                        let b = self.read(a + 2, 4)?;
                        if i.code() == iced_x86::Code::Lgdt_m1632_16
                            || i.code() == iced_x86::Code::Lidt_m1632_16
                        {
                            b & 0xff_ffff
                        } else {
                            b
                        }
                    };
                    Ok((limit, base))
                })();
                r.map(|(limit, base)| {
                    let t = if m == M::Lgdt {
                        &mut self.gdt
                    } else {
                        &mut self.idt
                    };
                    t.limit = limit;
                    t.base = base;
                })
            }
            M::Sgdt | M::Sidt => {
                let t = if m == M::Sgdt { self.gdt } else { self.idt };
                let a = self.ea(i);
                self.write(a, 2, t.limit as u64)
                    .and_then(|_| self.write(a + 2, if self.bits == 64 { 8 } else { 4 }, t.base))
            }
            M::Lldt | M::Ltr => {
                let sel = match self.rd_op(i, 0) {
                    Ok(v) => v as u16,
                    Err(e) => return Some(Err(e)),
                };
                if !self.protected() {
                    return Some(ud());
                }
                self.load_system_seg(sel, m == M::Ltr)
            }
            M::Sldt | M::Str => {
                let v = if m == M::Sldt {
                    self.ldt.selector
                } else {
                    self.tr.selector
                } as u64;
                self.wr_op(i, 0, v)
            }
            M::Smsw => {
                let v = self.cr0 & 0xffff;
                self.wr_op(i, 0, v)
            }
            M::Lmsw => match self.rd_op(i, 0) {
                Ok(v) => {
                    let nv = (self.cr0 & !0xe) | (v & 0xf) | (self.cr0 & CR0_PE);
                    self.set_cr0(nv)
                }
                Err(e) => Err(e),
            },
            M::Clts => {
                self.cr0 &= !CR0_TS;
                Ok(())
            }
            M::Invlpg => {
                let a = self.ea(i);
                self.tlb.flush_page(a);
                self.brk = true;
                Ok(())
            }
            M::Wbinvd | M::Invd => Ok(()),
            M::Rdmsr => {
                let ecx = self.gpr[1] as u32;
                match self.rdmsr(ecx) {
                    Some(v) => {
                        self.gpr[0] = v & 0xffff_ffff;
                        self.gpr[2] = v >> 32;
                        Ok(())
                    }
                    None => {
                        self.trace_msr("rdmsr", ecx);
                        gp(0)
                    }
                }
            }
            M::Wrmsr => {
                let ecx = self.gpr[1] as u32;
                let v = (self.gpr[0] & 0xffff_ffff) | (self.gpr[2] << 32);
                let r = self.wrmsr(ecx, v);
                if r.is_err() {
                    self.trace_msr("wrmsr", ecx);
                }
                self.brk = true;
                r
            }
            M::Rdtsc | M::Rdtscp => {
                if self.cr4 & (1 << 2) != 0 && self.cpl != 0 {
                    return Some(gp(0));
                }
                let t = self.tsc();
                self.gpr[0] = t & 0xffff_ffff;
                self.gpr[2] = t >> 32;
                if m == M::Rdtscp {
                    self.gpr[1] = self.msr.tsc_aux & 0xffff_ffff;
                }
                Ok(())
            }
            M::Cpuid => {
                let (a, b, c, d) = crate::cpuid::cpuid(
                    self.gpr[0] as u32,
                    self.gpr[1] as u32,
                    self.env.id,
                    self.env.vm.nvcpus,
                );
                self.gpr[0] = a as u64;
                self.gpr[3] = b as u64;
                self.gpr[1] = c as u64;
                self.gpr[2] = d as u64;
                Ok(())
            }
            M::Syscall => self.syscall(),
            M::Sysret | M::Sysretq => self.sysret(m == M::Sysretq),
            M::Swapgs => {
                if self.bits != 64 {
                    return Some(ud());
                }
                std::mem::swap(&mut self.seg[GS].base, &mut self.msr.kernel_gs_base);
                Ok(())
            }
            M::Lsl | M::Lar => self.lar_lsl(i, m == M::Lsl),
            M::Verr | M::Verw => {
                self.set_arith(flags::ZF, 0);
                Ok(())
            }
            M::Mov => return None,
            _ => return None,
        })
    }

    fn lar_lsl(&mut self, i: &Instruction, lsl: bool) -> X<()> {
        let sel = self.rd_op(i, 1)? as u16;
        if !self.protected() {
            return ud();
        }
        let ok = if sel & !3 == 0 {
            None
        } else {
            match self.read_desc(sel) {
                Ok(raw) => {
                    let d = parse_desc(sel, raw);
                    let vis =
                        d.dpl >= self.cpl.max((sel & 3) as u8) || (d.s && d.type_ & 0xc == 0xc);
                    (vis && (d.s || matches!(d.type_, 1 | 2 | 3 | 9 | 0xb))).then_some((d, raw))
                }
                Err(Stop::Fault(_)) => None,
                Err(e) => return Err(e),
            }
        };
        match ok {
            Some((d, raw)) => {
                self.set_arith(flags::ZF, flags::ZF);
                let v = if lsl {
                    d.limit as u64
                } else {
                    (raw >> 32) & 0x00f0_ff00
                };
                self.wreg(i.op_register(0), v);
                Ok(())
            }
            None => {
                self.set_arith(flags::ZF, 0);
                Ok(())
            }
        }
    }

    fn load_system_seg(&mut self, sel: u16, tss: bool) -> X<()> {
        if sel & !3 == 0 {
            if tss {
                return gp(0);
            }
            self.ldt = null_seg(sel);
            return Ok(());
        }
        if sel & 4 != 0 {
            return gp((sel & !3) as u32);
        }
        let raw = self.read_desc(sel)?;
        let mut d = parse_desc(sel, raw);
        if self.long_mode() {
            let hi = self.read_as(self.gdt.base + (sel & !7) as u64 + 8, 8, false)?;
            d.base |= (hi & 0xffff_ffff) << 32;
        }
        let ok = if tss {
            matches!(d.type_, 1 | 9)
        } else {
            d.type_ == 2
        };
        if d.s || !ok {
            return gp((sel & !3) as u32);
        }
        if !d.present {
            return fault(NP, Some((sel & !3) as u32));
        }
        if tss {
            // Mark the TSS busy in the GDT, as the CPU does.
            let a = self.gdt.base + (sel & !7) as u64 + 5;
            let b = self.read_as(a, 1, false)?;
            self.write_as(a, 1, b | 2, false)?;
            d.type_ |= 2;
            self.tr = d;
        } else {
            self.ldt = d;
        }
        Ok(())
    }

    pub fn set_cr0(&mut self, v: u64) -> X<()> {
        let v = v | CR0_ET;
        if v & CR0_PG != 0 && v & CR0_PE == 0 {
            return gp(0);
        }
        if v >> 32 != 0 {
            return gp(0);
        }
        let was_pg = self.cr0 & CR0_PG != 0;
        if v & CR0_PG != 0 && !was_pg && self.efer & EFER_LME != 0 {
            if self.cr4 & CR4_PAE == 0 {
                return gp(0);
            }
            self.efer |= EFER_LMA;
        }
        if v & CR0_PG == 0 && was_pg && self.long_mode() {
            if self.bits == 64 {
                return gp(0);
            }
            self.efer &= !EFER_LMA;
        }
        self.cr0 = v;
        self.tlb.flush_all();
        self.update_mode();
        Ok(())
    }

    fn mov_to_crdr_inner(&mut self, r: Register, v: u64) -> X<()> {
        use Register as R;
        match r {
            R::CR0 => self.set_cr0(v),
            R::CR2 => {
                self.cr2 = v;
                Ok(())
            }
            R::CR3 => {
                self.cr3 = v;
                if self.cr4 & CR4_PGE != 0 {
                    self.tlb.flush_nonglobal();
                } else {
                    self.tlb.flush_all();
                }
                Ok(())
            }
            R::CR4 => {
                // Only what CPUID advertises may be set (VME, PVI, TSD, DE, PSE, PAE, MCE, PGE,
                // PCE, OSFXSR, OSXMMEXCPT).
                if v & !0x7ff != 0 {
                    return gp(0);
                }
                if self.long_mode() && v & CR4_PAE == 0 {
                    return gp(0);
                }
                self.cr4 = v;
                self.tlb.flush_all();
                Ok(())
            }
            R::CR8 => {
                self.cr8 = v & 0xf;
                self.set_tpr((v as u8 & 0xf) << 4);
                Ok(())
            }
            R::DR0 | R::DR1 | R::DR2 | R::DR3 | R::DR6 | R::DR7 => {
                let n = r as usize - R::DR0 as usize;
                self.dr[n] = v;
                Ok(())
            }
            _ => ud(),
        }
    }

    pub fn mov_to_crdr(&mut self, r: Register, v: u64) -> X<()> {
        if self.cpl != 0 {
            return gp(0);
        }
        let v = if self.bits == 64 { v } else { v & 0xffff_ffff };
        self.brk = true;
        self.mov_to_crdr_inner(r, v)
    }

    pub fn mov_from_crdr(&mut self, r: Register) -> X<u64> {
        use Register as R;
        if self.cpl != 0 {
            return gp(0);
        }
        Ok(match r {
            R::CR0 => self.cr0,
            R::CR2 => self.cr2,
            R::CR3 => self.cr3,
            R::CR4 => self.cr4,
            R::CR8 => (self.tpr() >> 4) as u64,
            R::DR0 | R::DR1 | R::DR2 | R::DR3 | R::DR6 | R::DR7 => {
                let n = r as usize - R::DR0 as usize;
                self.dr[n]
            }
            _ => return ud(),
        })
    }

    fn syscall(&mut self) -> X<()> {
        if self.efer & EFER_SCE == 0 || !self.long_mode() {
            return ud();
        }
        let f = self.flags();
        self.gpr[1] = self.rip;
        self.gpr[11] = f & !flags::RF;
        let sel = ((self.msr.star >> 32) & 0xfffc) as u16;
        let cs = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: sel,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        };
        self.rip = if self.bits == 64 {
            self.msr.lstar
        } else {
            self.msr.cstar
        };
        self.rflags = (f & !self.msr.sfmask & !flags::RF) | 2;
        self.seg[SS] = Segment {
            selector: sel + 8,
            type_: 3,
            l: false,
            db: true,
            ..cs
        };
        self.set_cs(cs, 0);
        Ok(())
    }

    fn sysret(&mut self, to64: bool) -> X<()> {
        if self.efer & EFER_SCE == 0 || !self.long_mode() {
            return ud();
        }
        if self.cpl != 0 {
            return gp(0);
        }
        let base = ((self.msr.star >> 48) & 0xffff) as u16;
        let (sel, l, db) = if to64 {
            (base + 16, true, false)
        } else {
            (base, false, true)
        };
        let cs = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: sel | 3,
            type_: 0xb,
            present: true,
            dpl: 3,
            db,
            s: true,
            l,
            g: true,
            avl: false,
            unusable: false,
        };
        self.rip = if to64 {
            self.gpr[1]
        } else {
            self.gpr[1] & 0xffff_ffff
        };
        self.lazy.op = crate::flags::Op::Valid;
        self.rflags = (self.gpr[11] & 0x3c_7fd7) | 2;
        self.seg[SS].selector = (base + 8) | 3;
        self.seg[SS].dpl = 3;
        self.seg[SS].unusable = false;
        self.seg[SS].present = true;
        self.seg[SS].type_ = 3;
        self.seg[SS].s = true;
        self.seg[SS].db = true;
        self.seg[SS].limit = 0xffff_ffff;
        self.seg[SS].base = 0;
        self.set_cs(cs, 3);
        Ok(())
    }

    fn trace_msr(&self, what: &str, ecx: u32) {
        if self.env.vm.trace_unimpl {
            eprintln!(
                "emu: {what} of unknown MSR {ecx:#x} at rip {:#x}: #GP",
                self.cur_ip
            );
        }
    }

    /// The guest TSC: virtual time since the VM started, at `TSC_HZ`.
    pub fn tsc(&self) -> u64 {
        (self.env.vm.now_ns() as i64).wrapping_add(self.msr.tsc_offset) as u64
    }
}
