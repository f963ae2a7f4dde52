//! Conversions between the backend-neutral register types and KVM's (public for tests that
//! drive KVM directly, as the emulator's differential test does).

use corefour_hypervisor::{DescriptorTable, Regs, Segment, SpecialRegs};
use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

/// `Regs` and `kvm_regs` name their fields alike; one list of names serves both directions.
macro_rules! gp_regs {
    ($ty:ident from $r:expr) => {
        gp_regs!(@ $ty, $r; rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags)
    };
    (@ $ty:ident, $r:expr; $($f:ident)*) => {
        $ty { $($f: $r.$f),* }
    };
}

pub fn regs_from_kvm(r: &kvm_regs) -> Regs {
    gp_regs!(Regs from r)
}

pub fn regs_to_kvm(r: &Regs) -> kvm_regs {
    gp_regs!(kvm_regs from r)
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

fn dt_from_kvm(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

fn dt_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        ..Default::default()
    }
}

pub fn sregs_from_kvm(s: &kvm_sregs) -> SpecialRegs {
    SpecialRegs {
        cs: seg_from_kvm(&s.cs),
        ds: seg_from_kvm(&s.ds),
        es: seg_from_kvm(&s.es),
        fs: seg_from_kvm(&s.fs),
        gs: seg_from_kvm(&s.gs),
        ss: seg_from_kvm(&s.ss),
        tr: seg_from_kvm(&s.tr),
        ldt: seg_from_kvm(&s.ldt),
        gdt: dt_from_kvm(&s.gdt),
        idt: dt_from_kvm(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// Fills `out` (as read from KVM, so the interrupt bitmap is kept) from `s`.
pub fn sregs_to_kvm(s: &SpecialRegs, out: &mut kvm_sregs) {
    out.cs = seg_to_kvm(&s.cs);
    out.ds = seg_to_kvm(&s.ds);
    out.es = seg_to_kvm(&s.es);
    out.fs = seg_to_kvm(&s.fs);
    out.gs = seg_to_kvm(&s.gs);
    out.ss = seg_to_kvm(&s.ss);
    out.tr = seg_to_kvm(&s.tr);
    out.ldt = seg_to_kvm(&s.ldt);
    out.gdt = dt_to_kvm(&s.gdt);
    out.idt = dt_to_kvm(&s.idt);
    out.cr0 = s.cr0;
    out.cr2 = s.cr2;
    out.cr3 = s.cr3;
    out.cr4 = s.cr4;
    out.cr8 = s.cr8;
    out.efer = s.efer;
    // A zero APIC base means "leave it as KVM has it" (the neutral type has no "unset").
    if s.apic_base != 0 {
        out.apic_base = s.apic_base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_round_trip() {
        let r = Regs {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rsp: 7,
            rbp: 8,
            r8: 9,
            r9: 10,
            r10: 11,
            r11: 12,
            r12: 13,
            r13: 14,
            r14: 15,
            r15: 16,
            rip: 17,
            rflags: 18,
        };
        assert_eq!(regs_from_kvm(&regs_to_kvm(&r)), r);
    }

    #[test]
    fn sregs_round_trip_keeps_segments() {
        let seg = Segment {
            base: 0x1000,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 0xb,
            present: true,
            dpl: 3,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        };
        let s = SpecialRegs {
            cs: seg,
            tr: seg,
            gdt: DescriptorTable {
                base: 0x500,
                limit: 0x37,
            },
            cr0: 0x8000_0011,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let mut k = kvm_sregs::default();
        sregs_to_kvm(&s, &mut k);
        assert_eq!(sregs_from_kvm(&k), s);
    }
}
