//! CPUID: a documented, minimal AuthenticAMD model close to QEMU's `qemu64`.
//!
//! Advertised (leaf 1 EDX): FPU, PSE, TSC, MSR, PAE, CX8, APIC, PGE, CMOV, PAT, CLFSH, FXSR,
//! SSE, SSE2. Leaf 1 ECX: CX16, TSC-deadline (so Linux skips the LAPIC-vs-PIT timer check a
//! slow CPU fails). Leaf 0x8000_0001: SYSCALL, NX, LM, LAHF/SAHF in long mode.
//! Leaf 0x8000_0007: invariant TSC (the TSC is derived from host monotonic time).
//! Hidden on purpose (EMU-NOTES): SSE3+, XSAVE/AVX, PCID, FSGSBASE, SMEP/SMAP, PKU, LA57,
//! x2APIC, MONITOR, VMX/SVM, the PMU, RDRAND, and leaves 0x15/0x16 (the TSC rate is not
//! announced; Linux calibrates it against the PIT).
//! Saying AMD keeps Linux from enabling page-table isolation (Meltdown is Intel-only).

const VENDOR: &[u8; 12] = b"AuthenticAMD";
const BRAND: &[u8; 48] = b"corefour software x86-64 CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

pub const LEAF1_EDX: u32 = 1 // FPU
    | 1 << 3 // PSE
    | 1 << 4 // TSC
    | 1 << 5 // MSR
    | 1 << 6 // PAE
    | 1 << 8 // CX8
    | 1 << 9 // APIC
    | 1 << 13 // PGE
    | 1 << 15 // CMOV
    | 1 << 16 // PAT
    | 1 << 19 // CLFSH
    | 1 << 24 // FXSR
    | 1 << 25 // SSE
    | 1 << 26; // SSE2
pub const LEAF1_ECX: u32 = 1 << 13 // CX16
    | 1 << 24; // TSC-deadline
pub const EXT1_EDX: u32 = 1 << 11 // SYSCALL
    | 1 << 20 // NX
    | 1 << 29; // LM
pub const EXT1_ECX: u32 = 1; // LAHF/SAHF in 64-bit mode

fn words(b: &[u8]) -> [u32; 4] {
    let mut w = [0u32; 4];
    for (k, c) in b.chunks(4).enumerate().take(4) {
        let mut a = [0u8; 4];
        a[..c.len()].copy_from_slice(c);
        w[k] = u32::from_le_bytes(a);
    }
    w
}

/// Returns (EAX, EBX, ECX, EDX) for `leaf`/`sub` on vCPU `id` of `n`.
pub fn cpuid(leaf: u32, _sub: u32, id: u32, n: u32) -> (u32, u32, u32, u32) {
    let v = words(VENDOR);
    match leaf {
        0 => (0xd, v[0], v[2], v[1]),
        // Family 15, model 107, stepping 1 (as qemu64).
        1 => (
            0x0006_0fb1,
            8 << 8 | n.max(1) << 16 | id << 24,
            LEAF1_ECX,
            LEAF1_EDX | if n > 1 { 1 << 28 } else { 0 },
        ),
        // Topology leaf left empty (EBX = 0 means "not enumerated") except the x2APIC id in
        // EDX, which corefour guests read as their index (as on the KVM backend).
        0xb => (0, 0, 0, id),
        0x8000_0000 => (0x8000_0008, v[0], v[2], v[1]),
        0x8000_0001 => (0x0006_0fb1, 0, EXT1_ECX, EXT1_EDX),
        0x8000_0002..=0x8000_0004 => {
            let k = (leaf - 0x8000_0002) as usize;
            let w = words(&BRAND[k * 16..k * 16 + 16]);
            (w[0], w[1], w[2], w[3])
        }
        0x8000_0007 => (0, 0, 0, 1 << 8),
        // 40 physical, 48 virtual address bits; ECX: n-1 cores.
        0x8000_0008 => (0x3028, 0, n.max(1) - 1, 0),
        _ => (0, 0, 0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_is_amd() {
        let (max, b, c, d) = cpuid(0, 0, 0, 1);
        assert!(max >= 1);
        let mut s = Vec::new();
        for w in [b, d, c] {
            s.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&s, b"AuthenticAMD");
    }

    #[test]
    fn linux_required_bits() {
        let (_, _, _, d) = cpuid(1, 0, 0, 1);
        for bit in [0, 3, 5, 6, 8, 13, 15, 24, 25, 26] {
            assert!(d & (1 << bit) != 0, "leaf 1 edx bit {bit}");
        }
        let (_, _, _, d) = cpuid(0x8000_0001, 0, 0, 1);
        assert!(d & (1 << 29) != 0 && d & (1 << 20) != 0);
        let (_, _, c, _) = cpuid(1, 0, 0, 1);
        assert_eq!(c & (1 << 26), 0, "XSAVE must stay hidden");
    }
}
