//! Entry points shared by the random-bytes robustness test and the cargo-fuzz targets: open
//! arbitrary bytes as an image of a given format and exercise the read (and for qcow2, write
//! and check) paths with bounded work. Any panic here is a bug.

use crate::storage::MemStorage;
use crate::{open_storage, BlockRead, BlockWrite, DiskSize, ExtentKind, Format};
use std::path::Path;

/// Bound on guest bytes read per input, so a hostile size cannot make a run slow.
const READ_BUDGET: u64 = 1 << 20;
const EXTENT_BUDGET: usize = 2000;

/// Opens `data` as `format` and reads through it. Returns whether it opened.
pub fn exercise(format: Format, data: &[u8], write: bool) -> bool {
    let path = Path::new("fuzz-input");
    let storage = Box::new(MemStorage::new(data.to_vec()));
    let write = write && format.writable();
    let Ok(mut img) = open_storage(path, format, storage, write, &mut Vec::new()) else {
        return false;
    };
    let _ = img.info();
    let size = img.size();
    let mut off = 0u64;
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; 65536];
    for _ in 0..EXTENT_BUDGET {
        if off >= size {
            break;
        }
        let Ok(e) = img.extent(off, size - off) else {
            break;
        };
        assert!(
            e.length > 0 && e.length <= size - off,
            "extent out of bounds"
        );
        if e.kind == ExtentKind::Data && budget > 0 {
            let n = (e.length.min(buf.len() as u64)).min(budget) as usize;
            let _ = img.read_at(&mut buf[..n], off);
            budget -= n as u64;
        }
        off += e.length;
    }
    if size > 0 {
        let _ = img.read_at(&mut buf[..512.min(size as usize)], 0);
        let last = size.saturating_sub(4096);
        let n = (size - last) as usize;
        let _ = img.read_at(&mut buf[..n], last);
    }
    if write {
        if let crate::Image::Qcow2(q) = &mut img {
            if size >= 4096 {
                let _ = q.write_at(&[0xa5; 4096], (size / 2) & !511);
                let _ = q.write_at(&[0x5a; 100], size - 100);
            }
            let _ = q.check(crate::qcow2::Repair::None);
        }
    }
    true
}
