//! `struct c4_boot_info`, the page at BOOT_INFO_ADDR every vCPU gets a pointer to in rdi.
//! guests/include/c4.h declares the same layout; all fields are little-endian.

use crate::layout;

pub const BOOT_INFO_MAGIC: u32 = 0x4942_3443; // "C4BI"
pub const BOOT_INFO_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    pub vcpus: u32,
    pub cmdline_len: u32,
    pub mem_bytes: u64,
    /// End of RAM below the MMIO hole.
    pub low_end: u64,
    pub free_start: u64,
    pub stacks_base: u64,
    pub initrd: Option<(u64, u64)>,
    pub kernel: (u64, u64),
}

impl BootInfo {
    /// Offsets: 0 magic u32, 4 version u32, 8 vcpus u32, 12 cmdline_len u32, 16 cmdline_addr,
    /// 24 mem_size, 32 low_mem_end, 40 high_mem_size, 48 free_start, 56 stacks_base,
    /// 64 stack_size, 72 sys_mmio, 80 serial_mmio, 88 initrd_addr, 96 initrd_size,
    /// 104 kernel_start, 112 kernel_end (all u64 from 16 on). 120 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(120);
        for v in [
            BOOT_INFO_MAGIC,
            BOOT_INFO_VERSION,
            self.vcpus,
            self.cmdline_len,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let (initrd_addr, initrd_size) = self.initrd.unwrap_or((0, 0));
        for v in [
            layout::CMDLINE_ADDR,
            self.mem_bytes,
            self.low_end,
            self.mem_bytes - self.low_end,
            self.free_start,
            self.stacks_base,
            layout::STACK_SIZE,
            layout::SYS_MMIO_ADDR,
            layout::SERIAL_MMIO_ADDR,
            initrd_addr,
            initrd_size,
            self.kernel.0,
            self.kernel.1,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_c_header() {
        let i = BootInfo {
            vcpus: 3,
            cmdline_len: 5,
            mem_bytes: 64 << 20,
            low_end: 64 << 20,
            free_start: 0x20_0000,
            stacks_base: 0x10_8000,
            initrd: None,
            kernel: (0x10_0000, 0x10_7000),
        };
        let b = i.to_bytes();
        assert_eq!(b.len(), 120);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(&b[0..4], b"C4BI");
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 3);
        assert_eq!(u64_at(16), layout::CMDLINE_ADDR);
        assert_eq!(u64_at(24), 64 << 20);
        assert_eq!(u64_at(40), 0);
        assert_eq!(u64_at(56), 0x10_8000);
        assert_eq!(u64_at(72), layout::SYS_MMIO_ADDR);
        assert_eq!(u64_at(112), 0x10_7000);
    }
}
