//! Guest RAM: allocated through vm-memory and registered with the backend.

use corefour_hypervisor::{HypervisorError, MemoryRegion, Vm};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::ram_ranges;

pub type GuestMem = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Alloc {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot register guest memory with the backend: {0}")]
    Register(#[source] HypervisorError),
    #[error("guest memory of {0} bytes does not fit this host's address space")]
    TooLarge(u64),
}

/// Allocates `mib` MiB (anonymous, lazily backed: untouched pages cost nothing).
pub fn allocate(mib: u64) -> Result<GuestMem, MemoryError> {
    let bytes = mib
        .checked_mul(1 << 20)
        .ok_or(MemoryError::TooLarge(u64::MAX))?;
    let ranges = ram_ranges(bytes)
        .into_iter()
        .map(|(start, len)| {
            usize::try_from(len)
                .map(|l| (GuestAddress(start), l))
                .map_err(|_| MemoryError::TooLarge(bytes))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Alloc { mib, source })
}

/// Every RAM region of `mem` as the backend's memory slots, one slot each.
pub fn regions(mem: &GuestMem) -> Result<Vec<MemoryRegion>, MemoryError> {
    let mut out = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| MemoryError::Register(HypervisorError::Invalid(e.to_string())))?;
        out.push(MemoryRegion {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            guest_phys_addr: region.start_addr().0,
            size: region.len(),
            host_addr: host as u64,
            log_dirty: false,
            read_only: false,
        });
    }
    Ok(out)
}

/// Gives every RAM region to the backend, one slot each.
pub fn register(mem: &GuestMem, vm: &dyn Vm) -> Result<(), MemoryError> {
    for r in regions(mem)? {
        // SAFETY: the mapping belongs to `mem`, which the VMM keeps alive until every vCPU
        // thread has been joined and the VM dropped.
        unsafe { vm.set_memory_region(r) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}

/// Bytes of guest RAM resident in host memory (pages the guest or the VMM touched).
pub fn resident_bytes(mem: &GuestMem) -> u64 {
    let page = 4096usize;
    let mut total = 0u64;
    for region in mem.iter() {
        let Ok(host) = mem.get_host_address(region.start_addr()) else {
            continue;
        };
        let Ok(len) = usize::try_from(region.len()) else {
            continue;
        };
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: `host..host+len` is one live mapping owned by `mem`; mincore only reads the
        // page table state and writes `vec`, which has one byte per page.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| **b & 1 != 0).count() as u64 * page as u64;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn allocates_lazily_and_counts_resident_pages() {
        let mem = allocate(8).unwrap();
        assert_eq!(mem.iter().map(|r| r.len()).sum::<u64>(), 8 << 20);
        assert_eq!(resident_bytes(&mem), 0);
        mem.write_obj(1u64, GuestAddress(0x5000)).unwrap();
        mem.write_obj(1u64, GuestAddress(0x20_0000)).unwrap();
        // Two pages; up to two huge pages where THP is on for all mappings.
        let r = resident_bytes(&mem);
        assert!((2 * 4096..=4 << 20).contains(&r), "{r}");
    }
}
