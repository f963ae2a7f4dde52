//! The read path shared by the read-only block-mapped import formats (vdi, vhd, vhdx): each
//! format only says where virtual block N lives; reading and extent mapping are done here once.

use crate::error::DiskError;
use crate::host::HostFile;
use crate::{check_range, DiskSize, Extent, ExtentKind, Result};

/// A virtual disk cut into equal blocks, each either absent (reads as zeros) or stored whole at
/// one file offset.
pub(crate) trait BlockMap: DiskSize {
    /// Whether consecutive blocks stored back to back in the file may be reported as one extent
    /// with its host offset. False for formats that keep per-block metadata between data blocks
    /// (vhd's sector bitmaps): their data runs merge on allocation alone and carry no offset.
    const HOST_OFFSETS: bool = true;

    fn host(&self) -> &HostFile;
    fn block_size(&self) -> u64;
    /// File offset of block `b`, or None if it reads as zeros.
    fn locate(&self, b: u64) -> Result<Option<u64>>;
}

/// Reads `buf.len()` guest bytes at `offset`, block by block.
pub(crate) fn read<M: BlockMap>(m: &M, buf: &mut [u8], offset: u64) -> Result<()> {
    check_range(&m.host().path, offset, buf.len() as u64, m.size())?;
    let bs = m.block_size();
    let mut pos = 0;
    while pos < buf.len() {
        let off = offset + pos as u64;
        let inb = off % bs;
        let n = ((bs - inb) as usize).min(buf.len() - pos);
        match m.locate(off / bs)? {
            None => buf[pos..pos + n].fill(0),
            Some(h) => m.host().read_data(&mut buf[pos..pos + n], h + inb)?,
        }
        pos += n;
    }
    Ok(())
}

/// The run of blocks starting at `offset` that share one kind (and, with host offsets, lie back
/// to back in the file), at most `max_len` bytes and never past the disk's end.
pub(crate) fn extent<M: BlockMap>(m: &M, offset: u64, max_len: u64) -> Result<Extent> {
    let max_len = max_len.min(m.size().saturating_sub(offset));
    let bs = m.block_size();
    let b0 = offset / bs;
    let h0 = m.locate(b0)?;
    let mut len = (bs - offset % bs).min(max_len);
    let mut b = b0 + 1;
    while len < max_len {
        let same = match (h0, m.locate(b)?) {
            (None, None) => true,
            (Some(a), Some(x)) => !M::HOST_OFFSETS || x == a + (b - b0) * bs,
            _ => false,
        };
        if !same {
            break;
        }
        len = (len + bs).min(max_len);
        b += 1;
    }
    Ok(Extent {
        start: offset,
        length: len,
        kind: if h0.is_some() {
            ExtentKind::Data
        } else {
            ExtentKind::Zero
        },
        depth: 0,
        offset: h0.filter(|_| M::HOST_OFFSETS).map(|h| h + offset % bs),
    })
}

/// Reads a table of `count` little- or big-endian entries of `width` bytes at `at`.
pub(crate) fn read_table<T>(
    host: &HostFile,
    at: u64,
    count: u64,
    width: usize,
    what: &str,
    decode: fn(&[u8], usize) -> T,
) -> Result<Vec<T>> {
    let mut raw = vec![0u8; count as usize * width];
    host.read_exact(&mut raw, at, what)?;
    Ok(raw.chunks_exact(width).map(|c| decode(c, 0)).collect())
}

/// The error for block `b` whose map entry points at `off`, past the file's `file_len` bytes.
pub(crate) fn past_end(host: &HostFile, b: u64, off: u64, file_len: u64) -> DiskError {
    host.corrupt(
        0,
        format!("block {b} maps to {off:#x}, past the end of the file ({file_len:#x})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;
    use std::path::Path;

    /// Four 16-byte blocks over a 64-byte file: 0 at 0, 1 at 16, 2 absent, 3 at 48; the disk is
    /// 60 bytes, so the last block is cut short.
    struct Toy<const OFFSETS: bool> {
        host: HostFile,
        map: [Option<u64>; 4],
    }

    impl<const OFFSETS: bool> DiskSize for Toy<OFFSETS> {
        fn size(&self) -> u64 {
            60
        }
    }

    impl<const OFFSETS: bool> BlockMap for Toy<OFFSETS> {
        const HOST_OFFSETS: bool = OFFSETS;
        fn host(&self) -> &HostFile {
            &self.host
        }
        fn block_size(&self) -> u64 {
            16
        }
        fn locate(&self, b: u64) -> Result<Option<u64>> {
            Ok(self.map[b as usize])
        }
    }

    fn toy<const OFFSETS: bool>(map: [Option<u64>; 4]) -> Toy<OFFSETS> {
        let data = (0..64u8).collect();
        Toy {
            host: HostFile::new(Path::new("toy"), "toy", Box::new(MemStorage::new(data))),
            map,
        }
    }

    #[test]
    fn reads_across_blocks_with_holes_as_zeros() {
        let t = toy::<true>([Some(0), Some(16), None, Some(48)]);
        let mut buf = [0xffu8; 40];
        read(&t, &mut buf, 10).unwrap();
        let want: Vec<u8> = (10..32).chain([0; 16]).chain(48..50).collect();
        assert_eq!(&buf[..], &want[..]);
        assert!(
            read(&t, &mut [0u8; 2], 59).is_err(),
            "read past the disk's end"
        );
    }

    #[test]
    fn extents_merge_contiguous_runs_and_stop_at_the_end() {
        let t = toy::<true>([Some(0), Some(16), None, Some(48)]);
        let e = extent(&t, 4, 100).unwrap();
        assert_eq!(
            (e.kind, e.length, e.offset),
            (ExtentKind::Data, 28, Some(4))
        );
        let e = extent(&t, 32, 100).unwrap();
        assert_eq!((e.kind, e.length, e.offset), (ExtentKind::Zero, 16, None));
        let e = extent(&t, 50, 100).unwrap();
        assert_eq!(
            (e.kind, e.length, e.offset),
            (ExtentKind::Data, 10, Some(50))
        );
        // Blocks stored out of order are separate runs when offsets are reported...
        let t = toy::<true>([Some(16), Some(0), None, None]);
        assert_eq!(extent(&t, 0, 100).unwrap().length, 16);
        // ...and one run, with no offset, when they are not.
        let t = toy::<false>([Some(16), Some(0), None, None]);
        let e = extent(&t, 0, 100).unwrap();
        assert_eq!((e.kind, e.length, e.offset), (ExtentKind::Data, 32, None));
    }
}
