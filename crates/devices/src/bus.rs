//! Maps address ranges (port I/O or MMIO) to devices.
//!
//! Each device chooses its own locking (`BusDevice` takes `&self`): one mutex around every device
//! would serialize all I/O of all vCPUs. The bus itself is built before the vCPUs start and is
//! read-only afterwards, so lookups take no lock.

use std::sync::Arc;

/// A device on a bus. `offset` is relative to the start of the range it was inserted at.
pub trait BusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

/// An interrupt line a device can raise: edge (`trigger`) or level (`set_level`).
pub trait IrqLine: Send + Sync {
    fn trigger(&self);
    fn set_level(&self, level: bool);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("range at {base:#x} has zero length")]
    Empty { base: u64 },
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// A set of non-overlapping ranges, sorted by base.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<dyn BusDevice>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        if self
            .ranges
            .iter()
            .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let i = self.ranges.partition_point(|r| r.base <= addr);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        (addr - r.base < r.len).then(|| (r, addr - r.base))
    }

    /// Reads from the device at `addr`; returns false (and fills `data` with 0xff, as an
    /// unclaimed bus does) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((r, off)) => {
                r.device.read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((r, off)) => {
                r.device.write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let a = Arc::new(Recorder::default());
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(Arc::new(Recorder::default()), 0x400, 4).unwrap();
        assert_eq!(
            bus.insert(Arc::new(Recorder::default()), 0x3fc, 8),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 8
            })
        );
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x3f0, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(bus.write(0x3ff, &[9]));
        assert!(!bus.write(0x404, &[9]));
        assert_eq!(a.0.lock().unwrap().as_slice(), &[(7, vec![9])]);
    }
}
