//! Platform devices the software CPU provides itself, as KVM's in-kernel irqchip does:
//! local APICs, the I/O APIC, the legacy 8254 PIT and 8259 PIC pair, and the CMOS clock.
//!
//! Lock order: the VM's I/O APIC lock may be held while taking a local APIC's lock, never the
//! other way round (a level EOI releases the local APIC before it reaches the I/O APIC).

pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod rtc;
pub mod state;
