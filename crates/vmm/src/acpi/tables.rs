//! Building RSDP, XSDT, FADT (with FACS and a DSDT that only names `\_S5_`) and MADT in guest
//! memory. Written by hand: no crate in the field writes ACPI tables without pulling in an AML
//! compiler or a whole VMM (acpi_tables from Cloud Hypervisor is not published for vm-memory 0.18).

use vm_memory::{Bytes, GuestAddress};

use super::{
    aml, AcpiDevices, PciHostBridge, IOAPIC_ADDR, IOAPIC_ID, LAPIC_ADDR, PM1A_CNT_PORT,
    PM1A_EVT_PORT, PM_TMR_PORT, RESET_PORT, RESET_VALUE, RSDP_ADDR, S5_SLP_TYP, SCI_IRQ,
    TABLES_END,
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

fn dsdt(devices: &AcpiDevices) -> Vec<u8> {
    // Name (_S5_, Package (4) { S5_SLP_TYP, S5_SLP_TYP, 0, 0 }).
    let typ = u64::from(S5_SLP_TYP);
    let mut aml = aml::name_decl(
        "_S5_",
        &aml::package(&[aml::int(typ), aml::int(typ), aml::int(0), aml::int(0)]),
    );
    let mut sb = Vec::new();
    if let Some(pci) = &devices.pci {
        sb.push(pci_root(pci));
    }
    for (i, &(base, gsi)) in devices.virtio_mmio.iter().enumerate() {
        let crs = aml::res::resources(&[
            aml::res::memory32_fixed(base as u32, MMIO_WINDOW_LEN),
            aml::res::interrupt(gsi, true),
        ]);
        sb.push(aml::device(
            &format!("VR{i:02X}"),
            &[
                aml::name_decl("_HID", &aml::string("LNRO0005")),
                aml::name_decl("_UID", &aml::int(i as u64)),
                aml::name_decl("_CRS", &crs),
            ],
        ));
    }
    if !sb.is_empty() {
        aml.extend(aml::scope("\\_SB", &sb));
    }
    sdt(b"DSDT", 2, &aml)
}

/// The size of one virtio-mmio register window.
const MMIO_WINDOW_LEN: u32 = 0x1000;

/// `\_SB.PCI0`: bus 0 behind config mechanism #1, the I/O space around it, the BAR window and
/// a `_PRT` that sends each function's INTA# straight to its GSI (no link devices).
fn pci_root(pci: &PciHostBridge) -> Vec<u8> {
    let (base, len) = pci.mem_window;
    let crs = aml::res::resources(&[
        aml::res::word_range(2, 0, 0xff),
        aml::res::io(0xcf8, 8),
        aml::res::word_range(1, 0, 0xcf7),
        aml::res::word_range(1, 0xd00, 0xffff),
        aml::res::dword_memory(base as u32, (base + len - 1) as u32),
    ]);
    let prt: Vec<Vec<u8>> = pci
        .intx
        .iter()
        .map(|&(dev, gsi)| {
            aml::package(&[
                aml::dword((u32::from(dev) << 16) | 0xffff),
                aml::int(0), // INTA#
                aml::int(0), // no link device: the last field is a GSI
                aml::int(u64::from(gsi)),
            ])
        })
        .collect();
    aml::device(
        "PCI0",
        &[
            aml::name_decl("_HID", &aml::eisa_id("PNP0A03")),
            aml::name_decl("_UID", &aml::int(0)),
            aml::name_decl("_SEG", &aml::int(0)),
            aml::name_decl("_BBN", &aml::int(0)),
            aml::name_decl("_CRS", &crs),
            aml::name_decl("_PRT", &aml::package(&prt)),
        ],
    )
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

/// Writes all tables for `vcpus` processors and `devices` into the BIOS area; returns the
/// RSDP's address.
pub fn write_tables(mem: &GuestMem, vcpus: u32, devices: &AcpiDevices) -> Result<u64, AcpiError> {
    let mut blobs: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = align(RSDP_ADDR + 36, 64);
    let mut place = |data: Vec<u8>, blobs: &mut Vec<(u64, Vec<u8>)>| {
        let at = next;
        next = align(at + data.len() as u64, 64);
        blobs.push((at, data));
        at
    };
    let facs_at = place(facs(), &mut blobs);
    let dsdt_at = place(dsdt(devices), &mut blobs);
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
        let rsdp_at = write_tables(&mem, vcpus, &AcpiDevices::default()).unwrap();
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

    fn devices() -> AcpiDevices {
        AcpiDevices {
            virtio_mmio: vec![(0xd100_0000, 5), (0xd100_1000, 6)],
            pci: Some(PciHostBridge {
                mem_window: (0xe000_0000, 0x100_0000),
                intx: vec![(1, 5), (2, 6)],
            }),
        }
    }

    #[test]
    fn dsdt_describes_the_pci_root_and_the_mmio_devices() {
        let mem = crate::memory::allocate(4).unwrap();
        write_tables(&mem, 1, &devices()).unwrap();
        let r = read(&mem, RSDP_ADDR, 36);
        let x = table(&mem, u64_at(&r, 24), b"XSDT");
        let f = table(&mem, u64_at(&x, 36), b"FACP");
        let d = table(&mem, u64_at(&f, 140), b"DSDT");
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"\\_SB_"));
        assert!(has(b"PCI0"));
        assert!(has(&[0x41, 0xd0, 0x0a, 0x03]), "EISAID PNP0A03");
        assert!(has(b"_PRT"));
        // INTA# of device 2 -> GSI 6: Package { 0x0002FFFF, Zero, Zero, 6 }.
        assert!(has(&[
            0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x0a, 0x06
        ]));
        assert!(has(b"LNRO0005\0"));
        assert!(has(b"VR01"));
        // Memory32Fixed at the second window.
        assert!(has(&[0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd1]));
        // The bare table (no devices) is unchanged.
        let mem = crate::memory::allocate(4).unwrap();
        write_tables(&mem, 1, &AcpiDevices::default()).unwrap();
        let r = read(&mem, RSDP_ADDR, 36);
        let x = table(&mem, u64_at(&r, 24), b"XSDT");
        let f = table(&mem, u64_at(&x, 36), b"FACP");
        let d = table(&mem, u64_at(&f, 140), b"DSDT");
        assert_eq!(d.len(), HEADER_LEN + 14);
    }

    /// ACPICA's disassembler reads our AML back (where iasl is installed: acpica-tools).
    #[test]
    fn iasl_disassembles_the_dsdt() {
        if std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!("SKIP: iasl is not installed (apt-get install acpica-tools)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("c4-dsdt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml = dir.join("dsdt.aml");
        std::fs::write(&aml, dsdt(&devices())).unwrap();
        let o = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml)
            .current_dir(&dir)
            .output()
            .unwrap();
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for want in [
            "Device (PCI0)",
            "EisaId (\"PNP0A03\")",
            "WordBusNumber",
            "DWordMemory",
            "0xE0000000",
            "0xE0FFFFFF",
            "Name (_PRT, Package (0x02)",
            "0x0002FFFF",
            "Device (VR01)",
            "\"LNRO0005\"",
            "Memory32Fixed (ReadWrite,",
            "0xD1001000",
            "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
            "Name (_S5, Package (0x04)",
        ] {
            assert!(dsl.contains(want), "no {want:?} in:\n{dsl}");
        }
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
