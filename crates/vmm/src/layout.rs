//! The guest physical memory map. guests/CONTRACT.md documents the same numbers for guest
//! authors; change both together.

/// The VMM's GDT (and a TSS right after it).
pub const GDT_ADDR: u64 = 0x1000;
pub const TSS_ADDR: u64 = 0x1800;
/// `struct c4_boot_info` (see boot/info.rs).
pub const BOOT_INFO_ADDR: u64 = 0x2000;
/// The NUL-terminated command line.
pub const CMDLINE_ADDR: u64 = 0x3000;
pub const CMDLINE_MAX: usize = 4095;
/// Page tables: PML4, one PDPT, then one page directory per GiB mapped.
pub const PML4_ADDR: u64 = 0x1_0000;
pub const PDPT_ADDR: u64 = 0x1_1000;
pub const PD_ADDR: u64 = 0x1_2000;
pub const PAGE_TABLES_END: u64 = 0x8_0000;
/// Images load at or above 1 MiB; a flat binary loads exactly here and starts at its first byte.
pub const KERNEL_MIN_ADDR: u64 = 0x10_0000;
/// Each vCPU's initial stack, placed after the image.
pub const STACK_SIZE: u64 = 16 * 1024;

/// RAM below 4 GiB ends here at most; the rest of RAM goes above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// A page of VMM registers for the guest: the debug-exit code at +0 (see devices' debug_exit).
pub const SYS_MMIO_ADDR: u64 = 0xd000_0000;
pub const SYS_MMIO_LEN: u64 = 0x1000;
/// The 16550's eight registers again, one byte each, for ring-3 code (no IN/OUT there).
pub const SERIAL_MMIO_ADDR: u64 = 0xd000_1000;
pub const SERIAL_MMIO_LEN: u64 = 8;

pub const PAGE_SIZE: u64 = 4096;

pub fn align_up(x: u64, to: u64) -> Option<u64> {
    debug_assert!(to.is_power_of_two());
    Some(x.checked_add(to - 1)? & !(to - 1))
}

/// Where RAM of `mem_bytes` lives: below the MMIO hole, and the remainder above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(MMIO_HOLE_START);
    let mut v = vec![(0, low)];
    if mem_bytes > low {
        v.push((HIGH_RAM_START, mem_bytes - low));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, 1 << 30)]
        );
        assert_eq!(align_up(1, 4096), Some(4096));
        assert_eq!(align_up(u64::MAX, 4096), None);
    }
}
