//! ACPI for a Linux guest: the tables the kernel reads to find the CPUs, the I/O APIC, the PM
//! timer and how to reset and power off (tables.rs), and the fixed-hardware PM registers behind
//! them (pm.rs). Only Linux boots (bzImage) get these; the test guests' contract is unchanged.
//!
//! The numbers below are the contract with the software CPU (crates/emu) and are listed in
//! guests/CONTRACT.md ("Linux"); change them together.

pub mod aml;
pub mod pm;
pub mod tables;

pub use pm::PmRegisters;
pub use tables::{write_tables, AcpiError};

/// Devices the DSDT describes, so a stock kernel finds them without command-line hints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcpiDevices {
    /// virtio-mmio windows: (base, GSI); each becomes an `LNRO0005` device, the ACPI ID
    /// Linux's virtio_mmio driver matches (edge-triggered, active high).
    pub virtio_mmio: Vec<(u64, u32)>,
    /// A PCI host bridge on bus 0 (config mechanism #1 at 0xcf8), if the VM has one.
    pub pci: Option<PciHostBridge>,
}

/// The PCI root bridge `\_SB.PCI0`: its memory window for BARs and the INTA# routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PciHostBridge {
    /// (base, length) of the window BARs are placed in.
    pub mem_window: (u64, u64),
    /// (device number, GSI) for INTA# of each function (`_PRT`, level, active low).
    pub intx: Vec<(u8, u32)>,
}

/// The RSDP, in the BIOS area the kernel scans (0xE0000-0xFFFFF), also given to it in
/// `boot_params.acpi_rsdp_addr`. The other tables follow it in the same reserved region.
pub const RSDP_ADDR: u64 = 0xe_0000;
pub const TABLES_END: u64 = 0x10_0000;

/// PM1a event block (status u16, enable u16), PM1a control (u16) and the PM timer (u32, 3.579545
/// MHz, 32 bits wide): one port range for all three.
pub const PM_BASE_PORT: u16 = 0x600;
pub const PM1A_EVT_PORT: u16 = PM_BASE_PORT;
pub const PM1A_CNT_PORT: u16 = PM_BASE_PORT + 4;
pub const PM_TMR_PORT: u16 = PM_BASE_PORT + 8;
pub const PM_PORTS_LEN: u64 = 12;
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The SLP_TYP value the DSDT's `\_S5_` gives for soft-off; PM1a_CNT with it and SLP_EN set
/// powers the machine off.
pub const S5_SLP_TYP: u16 = 5;
/// The ISA IRQ of the (never raised) SCI.
pub const SCI_IRQ: u8 = 9;

/// The FADT's reset register: the i8042's reset command, which the VMM already handles.
pub const RESET_PORT: u16 = 0x64;
pub const RESET_VALUE: u8 = 0xfe;

/// Interrupt controllers as the backends place them (KVM's in-kernel irqchip, emu's platform).
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const IOAPIC_ID: u8 = 0;
