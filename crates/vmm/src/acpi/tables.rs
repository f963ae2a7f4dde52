//! Building RSDP, XSDT, FADT (with FACS and a DSDT that only names `\_S5_`) and MADT in guest
//! memory. Written by hand: no crate in the field writes ACPI tables without pulling in an AML
//! compiler or a whole VMM (acpi_tables from Cloud Hypervisor is not published for vm-memory 0.18).

use vm_memory::{Bytes, GuestAddress};

use super::{
    IOAPIC_ADDR, IOAPIC_ID, LAPIC_ADDR, PM1A_CNT_PORT, PM1A_EVT_PORT, PM_TMR_PORT, RESET_PORT,
    RESET_VALUE, RSDP_ADDR, S5_SLP_TYP, SCI_IRQ, TABLES_END,
};
use crate::memory::GuestMem;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables for {vcpus} vCPUs need {need} bytes; the BIOS area has {have}")]
    TooBig { vcpus: u32, need: u64, have: u64 },
    #[error("cannot write ACPI tables into guest memory: {0}")]
    Memory(String),
}

const OEM_ID: &[u8; 6] = b"COREF4";
const OEM_TABLE_ID: &[u8; 8] = b"C4VMM   ";
const CREATOR_ID: &[u8; 4] = b"C4VM";
const HEADER_LEN: usize = 36;
const FADT_LEN: usize = 276;
const FACS_LEN: usize = 64;

/// Sum of all bytes, mod 256: a table is valid when this is 0.
pub fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// A system description table: the standard header, then `body`, checksum fixed.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = 0u8.wrapping_sub(checksum(&t));
    t
}

/// A Generic Address Structure in system I/O space.
fn gas_io(port: u16, bits: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // SystemIO
    g[1] = bits;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

fn dsdt() -> Vec<u8> {
    // Name (_S5_, Package (4) { S5_SLP_TYP, S5_SLP_TYP, 0, 0 }): NameOp, NameSeg, PackageOp,
    // PkgLength 8 (itself included), NumElements 4, two BytePrefix constants, two ZeroOps.
    let typ = u8::try_from(S5_SLP_TYP).unwrap_or(0);
    let aml = [
        0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, typ, 0x0a, typ, 0x00, 0x00,
    ];
    sdt(b"DSDT", 2, &aml)
}

fn facs() -> Vec<u8> {
    let mut f = vec![0u8; FACS_LEN];
    put(&mut f, 0, b"FACS");
    put(&mut f, 4, &(FACS_LEN as u32).to_le_bytes());
    f[32] = 2; // version
    f
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    const WBINVD: u32 = 1 << 0;
    const PROC_C1: u32 = 1 << 2;
    const PWR_BUTTON: u32 = 1 << 4; // no fixed-feature power button
    const SLP_BUTTON: u32 = 1 << 5; // no fixed-feature sleep button
    const TMR_VAL_EXT: u32 = 1 << 8; // the PM timer is 32 bits wide
    const RESET_REG_SUP: u32 = 1 << 10;
    const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
    // Not set on purpose: HW_REDUCED_ACPI (Linux needs the PM timer and PM1 registers) and the
    // 8042 boot-arch flag (the i8042 here only resets; Linux should not probe a keyboard).
    let mut b = vec![0u8; FADT_LEN - HEADER_LEN];
    let at = |o: usize| o - HEADER_LEN;
    let facs32 = u32::try_from(facs).unwrap_or(0);
    let dsdt32 = u32::try_from(dsdt).unwrap_or(0);
    put(&mut b, at(36), &facs32.to_le_bytes());
    put(&mut b, at(40), &dsdt32.to_le_bytes());
    put(&mut b, at(46), &u16::from(SCI_IRQ).to_le_bytes());
    // SMI_CMD (48) stays 0: no SMM, the machine is always in ACPI mode.
    put(&mut b, at(56), &u32::from(PM1A_EVT_PORT).to_le_bytes());
    put(&mut b, at(64), &u32::from(PM1A_CNT_PORT).to_le_bytes());
    put(&mut b, at(76), &u32::from(PM_TMR_PORT).to_le_bytes());
    b[at(88)] = 4; // PM1_EVT_LEN
    b[at(89)] = 2; // PM1_CNT_LEN
    b[at(91)] = 4; // PM_TMR_LEN
    put(&mut b, at(96), &101u16.to_le_bytes()); // C2 latency > 100: no C2
    put(&mut b, at(98), &1001u16.to_le_bytes()); // C3 latency > 1000: no C3
    b[at(108)] = 0x32; // CMOS century register
    put(&mut b, at(109), &BOOT_ARCH_NO_VGA.to_le_bytes());
    let flags = WBINVD | PROC_C1 | PWR_BUTTON | SLP_BUTTON | TMR_VAL_EXT | RESET_REG_SUP;
    put(&mut b, at(112), &flags.to_le_bytes());
    put(&mut b, at(116), &gas_io(RESET_PORT, 8));
    b[at(128)] = RESET_VALUE;
    b[at(131)] = 1; // minor version: 6.1
    put(&mut b, at(132), &facs.to_le_bytes());
    put(&mut b, at(140), &dsdt.to_le_bytes());
    put(&mut b, at(148), &gas_io(PM1A_EVT_PORT, 32));
    put(&mut b, at(172), &gas_io(PM1A_CNT_PORT, 16));
    put(&mut b, at(208), &gas_io(PM_TMR_PORT, 32));
    put(&mut b, at(268), b"CoreFour");
    sdt(b"FACP", 6, &b)
}

fn madt(vcpus: u32) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    let mut b = Vec::new();
    b.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    for i in 0..vcpus {
        // Processor Local APIC: ACPI processor id = APIC id = vCPU index, enabled.
        let id = u8::try_from(i).unwrap_or(u8::MAX);
        b.extend_from_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    b.extend_from_slice(&[1, 12, IOAPIC_ID, 0]);
    b.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
                                              // Interrupt source overrides: the PIT's IRQ0 arrives on I/O APIC pin 2 (conforming
                                              // polarity and trigger); the SCI is level-triggered, active high.
    b.extend_from_slice(&[2, 10, 0, 0]);
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&[2, 10, 0, SCI_IRQ]);
    b.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
    b.extend_from_slice(&0x000du16.to_le_bytes());
    // Local APIC NMI on LINT1 of every processor.
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt(b"APIC", 5, &b)
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let b: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &b)
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = vec![0u8; 36];
    put(&mut r, 0, b"RSD PTR ");
    put(&mut r, 9, OEM_ID);
    r[15] = 2; // ACPI 2.0+: the XSDT is used
    put(&mut r, 20, &36u32.to_le_bytes());
    put(&mut r, 24, &xsdt.to_le_bytes());
    r[8] = 0u8.wrapping_sub(checksum(&r[..20]));
    r[32] = 0u8.wrapping_sub(checksum(&r));
    r
}

fn align(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Writes all tables for `vcpus` processors into the BIOS area; returns the RSDP's address.
pub fn write_tables(mem: &GuestMem, vcpus: u32) -> Result<u64, AcpiError> {
    let mut blobs: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = align(RSDP_ADDR + 36, 64);
    let mut place = |data: Vec<u8>, blobs: &mut Vec<(u64, Vec<u8>)>| {
        let at = next;
        next = align(at + data.len() as u64, 64);
        blobs.push((at, data));
        at
    };
    let facs_at = place(facs(), &mut blobs);
    let dsdt_at = place(dsdt(), &mut blobs);
    let fadt_at = place(fadt(facs_at, dsdt_at), &mut blobs);
    let madt_at = place(madt(vcpus), &mut blobs);
    let xsdt_at = place(xsdt(&[fadt_at, madt_at]), &mut blobs);
    if next > TABLES_END {
        return Err(AcpiError::TooBig {
            vcpus,
            need: next - RSDP_ADDR,
            have: TABLES_END - RSDP_ADDR,
        });
    }
    blobs.push((RSDP_ADDR, rsdp(xsdt_at)));
    for (at, data) in blobs {
        mem.write_slice(&data, GuestAddress(at))
            .map_err(|e| AcpiError::Memory(format!("{e} at {at:#x}")))?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn read(mem: &GuestMem, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }
    /// Reads a table at `at`, checking its length field and checksum.
    fn table(mem: &GuestMem, at: u64, sig: &[u8; 4]) -> Vec<u8> {
        let head = read(mem, at, HEADER_LEN);
        assert_eq!(&head[..4], sig);
        let len = u32_at(&head, 4) as usize;
        let t = read(mem, at, len);
        assert_eq!(checksum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    fn walk(vcpus: u32) -> (GuestMem, Vec<u8>, Vec<u8>, Vec<u8>) {
        let mem = crate::memory::allocate(4).unwrap();
        let rsdp_at = write_tables(&mem, vcpus).unwrap();
        assert_eq!(rsdp_at, RSDP_ADDR);
        let r = read(&mem, rsdp_at, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(checksum(&r[..20]), 0);
        assert_eq!(checksum(&r), 0);
        assert_eq!(r[15], 2);
        let x = table(&mem, u64_at(&r, 24), b"XSDT");
        assert_eq!(x.len(), HEADER_LEN + 16);
        let fadt = table(&mem, u64_at(&x, 36), b"FACP");
        let madt = table(&mem, u64_at(&x, 44), b"APIC");
        (mem, r, fadt, madt)
    }

    #[test]
    fn fadt_points_at_pm_registers_dsdt_and_facs() {
        let (mem, _, f, _) = walk(1);
        assert_eq!(f.len(), FADT_LEN);
        assert_eq!(u32_at(&f, 56), 0x600);
        assert_eq!(u32_at(&f, 64), 0x604);
        assert_eq!(u32_at(&f, 76), 0x608);
        assert_eq!((f[88], f[89], f[91]), (4, 2, 4));
        let flags = u32_at(&f, 112);
        assert_ne!(flags & (1 << 8), 0, "32-bit PM timer");
        assert_ne!(flags & (1 << 10), 0, "reset register");
        assert_eq!(flags & (1 << 20), 0, "not hardware-reduced");
        assert_eq!(u64_at(&f, 116 + 4), 0x64);
        assert_eq!(f[128], 0xfe);
        assert_eq!(u64_at(&f, 208 + 4), 0x608);
        let dsdt_at = u64_at(&f, 140);
        assert_eq!(u64::from(u32_at(&f, 40)), dsdt_at);
        let d = table(&mem, dsdt_at, b"DSDT");
        let aml = &d[HEADER_LEN..];
        assert_eq!(&aml[..5], b"\x08_S5_");
        assert_eq!(aml[9], 5, "SLP_TYP for S5");
        let facs = read(&mem, u64_at(&f, 132), FACS_LEN);
        assert_eq!(&facs[..4], b"FACS");
        assert_eq!(u64_at(&f, 132) % 64, 0);
    }

    #[test]
    fn madt_lists_every_cpu_the_ioapic_and_the_irq0_override() {
        for vcpus in [1u32, 2, 8, 64] {
            let (_, _, _, m) = walk(vcpus);
            assert_eq!(u32_at(&m, 36), 0xfee0_0000);
            let mut lapics = Vec::new();
            let mut ioapic = None;
            let mut overrides = Vec::new();
            let mut o = 44;
            while o < m.len() {
                let (kind, len) = (m[o], m[o + 1] as usize);
                assert!(len >= 2 && o + len <= m.len(), "entry at {o}");
                match kind {
                    0 => lapics.push((m[o + 3], m[o + 4])),
                    1 => ioapic = Some(u32_at(&m, o + 4)),
                    2 => overrides.push((m[o + 3], u32_at(&m, o + 4))),
                    _ => {}
                }
                o += len;
            }
            assert_eq!(o, m.len());
            let want: Vec<(u8, u8)> = (0..vcpus).map(|i| (i as u8, 1)).collect();
            assert_eq!(lapics, want);
            assert_eq!(ioapic, Some(0xfec0_0000));
            assert!(overrides.contains(&(0, 2)), "{overrides:?}");
        }
    }
}
