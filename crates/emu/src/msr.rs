//! The model-specific registers Linux touches. Unknown ones raise #GP, as KVM does by default.

use crate::cpu::*;

pub const EFER: u32 = 0xc000_0080;
pub const STAR: u32 = 0xc000_0081;
pub const LSTAR: u32 = 0xc000_0082;
pub const CSTAR: u32 = 0xc000_0083;
pub const SFMASK: u32 = 0xc000_0084;
pub const FS_BASE: u32 = 0xc000_0100;
pub const GS_BASE: u32 = 0xc000_0101;
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const TSC_AUX: u32 = 0xc000_0103;
pub const TSC: u32 = 0x10;
pub const APIC_BASE: u32 = 0x1b;
pub const MTRRCAP: u32 = 0xfe;
pub const SYSENTER_CS: u32 = 0x174;
pub const SYSENTER_ESP: u32 = 0x175;
pub const SYSENTER_EIP: u32 = 0x176;
pub const MCG_CAP: u32 = 0x179;
pub const MCG_STATUS: u32 = 0x17a;
pub const MISC_ENABLE: u32 = 0x1a0;
pub const PAT: u32 = 0x277;
pub const MTRR_DEF_TYPE: u32 = 0x2ff;
pub const TSC_DEADLINE: u32 = 0x6e0;
pub const HWCR: u32 = 0xc001_0015;
pub const PLATFORM_ID: u32 = 0x17;
pub const UCODE_REV: u32 = 0x8b;

impl Cpu {
    pub fn rdmsr(&mut self, ecx: u32) -> Option<u64> {
        Some(match ecx {
            EFER => self.efer,
            STAR => self.msr.star,
            LSTAR => self.msr.lstar,
            CSTAR => self.msr.cstar,
            SFMASK => self.msr.sfmask,
            FS_BASE => self.seg[FS].base,
            GS_BASE => self.seg[GS].base,
            KERNEL_GS_BASE => self.msr.kernel_gs_base,
            TSC_AUX => self.msr.tsc_aux,
            TSC => self.tsc(),
            APIC_BASE => self.apic_base(),
            MTRRCAP | MCG_CAP | MCG_STATUS | PLATFORM_ID | UCODE_REV => 0,
            SYSENTER_CS => self.msr.sysenter_cs,
            SYSENTER_ESP => self.msr.sysenter_esp,
            SYSENTER_EIP => self.msr.sysenter_eip,
            MISC_ENABLE => self.msr.misc_enable,
            PAT => self.msr.pat,
            MTRR_DEF_TYPE => self.msr.mtrr_def_type,
            TSC_DEADLINE => self.tsc_deadline(),
            HWCR => self.msr.hwcr,
            _ => return None,
        })
    }

    pub fn wrmsr(&mut self, ecx: u32, v: u64) -> X<()> {
        let canonical = |v: u64| {
            let t = (v as i64) >> 47;
            t == 0 || t == -1
        };
        match ecx {
            EFER => {
                // SCE, LME, LMA (read-only), NXE.
                if v & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
                    return gp(0);
                }
                if self.cr0 & CR0_PG != 0 && (v ^ self.efer) & EFER_LME != 0 {
                    return gp(0);
                }
                self.efer = (v & !EFER_LMA) | (self.efer & EFER_LMA);
                self.tlb.flush_all();
            }
            STAR => self.msr.star = v,
            LSTAR | CSTAR | FS_BASE | GS_BASE | KERNEL_GS_BASE if !canonical(v) => return gp(0),
            LSTAR => self.msr.lstar = v,
            CSTAR => self.msr.cstar = v,
            SFMASK => self.msr.sfmask = v & 0xffff_ffff,
            FS_BASE => self.seg[FS].base = v,
            GS_BASE => self.seg[GS].base = v,
            KERNEL_GS_BASE => self.msr.kernel_gs_base = v,
            TSC_AUX => self.msr.tsc_aux = v & 0xffff_ffff,
            TSC => self.msr.tsc_offset = (v as i64).wrapping_sub(self.env.vm.now_ns() as i64),
            APIC_BASE => self.set_apic_base(v)?,
            SYSENTER_CS => self.msr.sysenter_cs = v,
            SYSENTER_ESP => self.msr.sysenter_esp = v,
            SYSENTER_EIP => self.msr.sysenter_eip = v,
            MISC_ENABLE => self.msr.misc_enable = v,
            PAT => {
                // Each byte must be a valid memory type (0, 1, 4, 5, 6, 7).
                if (0..8).any(|k| matches!((v >> (8 * k)) & 0xff, 2 | 3 | 8..)) {
                    return gp(0);
                }
                self.msr.pat = v;
            }
            MTRR_DEF_TYPE => self.msr.mtrr_def_type = v,
            MCG_STATUS => {}
            TSC_DEADLINE => self.set_tsc_deadline(v),
            HWCR => self.msr.hwcr = v,
            _ => return gp(0),
        }
        Ok(())
    }
}
