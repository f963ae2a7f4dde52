//! The snapshot memory file: guest RAM regions laid end to end, one file offset per region,
//! zero pages left as holes (a 256 MiB guest that touched 3 MiB leaves a 3 MiB file).
//!
//! Restore maps the file MAP_PRIVATE: nothing is copied, pages come in on first touch from the
//! page cache, and the guest's writes stay private to the new VM — so one snapshot can be
//! restored any number of times. A diff snapshot's file holds only the pages dirtied since its
//! parent, at the same offsets; restore maps the parent and then maps each dirty run of the diff
//! file over it (MAP_FIXED), again without copying.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::dirty::{page_runs, PageRun, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum MemFileError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "memory file {path} is {got} bytes, the snapshot says {want}: it is truncated or \
         belongs to another snapshot"
    )]
    Size { path: String, got: u64, want: u64 },
    #[error("memory file {path} fails its checksum (stored {stored:#010x}, computed {computed:#010x}): it was modified")]
    Checksum {
        path: String,
        stored: u32,
        computed: u32,
    },
    #[error("memory layout is invalid: {0}")]
    Layout(String),
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> MemFileError + 'a {
    move |source| MemFileError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// One guest RAM region and where it lives in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegion {
    pub guest_phys_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

/// A region of the running VM together with its host mapping.
#[derive(Debug, Clone, Copy)]
pub struct HostRegion {
    pub region: RamRegion,
    /// Start of the live host mapping of `region.size` bytes.
    pub host_addr: usize,
}

/// Lays `(guest_phys_addr, size)` ranges end to end in a file.
pub fn layout(ranges: &[(u64, u64)]) -> Result<Vec<RamRegion>, MemFileError> {
    let mut off = 0u64;
    let mut out = Vec::with_capacity(ranges.len());
    for &(gpa, size) in ranges {
        if size % PAGE_SIZE != 0 || gpa % PAGE_SIZE != 0 {
            return Err(MemFileError::Layout(format!(
                "region {gpa:#x}+{size:#x} is not page aligned"
            )));
        }
        out.push(RamRegion {
            guest_phys_addr: gpa,
            size,
            file_offset: off,
        });
        off = off
            .checked_add(size)
            .ok_or_else(|| MemFileError::Layout("regions overflow u64".into()))?;
    }
    Ok(out)
}

/// Total bytes of the file for `regions`.
pub fn file_size(regions: &[RamRegion]) -> u64 {
    regions
        .iter()
        .map(|r| r.file_offset + r.size)
        .max()
        .unwrap_or(0)
}

/// Checks a layout read from an untrusted state file: aligned, non-overlapping, sane sizes.
pub fn validate(regions: &[RamRegion]) -> Result<(), MemFileError> {
    let mut end = 0u64;
    for r in regions {
        let aligned = [r.guest_phys_addr, r.size, r.file_offset]
            .iter()
            .all(|v| v % PAGE_SIZE == 0);
        if !aligned || r.size == 0 {
            return Err(MemFileError::Layout(format!(
                "region {:#x}+{:#x} at file offset {:#x} is empty or not page aligned",
                r.guest_phys_addr, r.size, r.file_offset
            )));
        }
        if r.file_offset < end {
            return Err(MemFileError::Layout("regions overlap in the file".into()));
        }
        end = r
            .file_offset
            .checked_add(r.size)
            .ok_or_else(|| MemFileError::Layout("region end overflows".into()))?;
        usize::try_from(r.size)
            .map_err(|_| MemFileError::Layout("region larger than the address space".into()))?;
    }
    Ok(())
}

/// What a write produced: the file's checksum over the bytes the snapshot covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemFileInfo {
    pub size: u64,
    /// Bytes actually written (the rest are holes).
    pub written: u64,
    /// CRC32 of the covered bytes in file order (all pages for a full snapshot, the dirty runs
    /// for a diff), checked by `verify`.
    pub crc32: u32,
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle.
    let (head, mid, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Borrows a live region's bytes.
///
/// # Safety
/// `h.host_addr` must map `h.region.size` readable bytes for the lifetime of the slice, and no
/// one may write them meanwhile (the VM is paused) unless the caller accepts torn pages, which
/// a pre-copy round does: it sends the page again once the dirty log shows the write.
unsafe fn region_bytes<'a>(h: &HostRegion) -> &'a [u8] {
    // SAFETY: as the caller promised.
    unsafe { std::slice::from_raw_parts(h.host_addr as *const u8, h.region.size as usize) }
}

/// Writes every non-zero page of `regions` into a new file at `path` (sparse).
///
/// # Safety
/// Every `HostRegion` must be a live mapping of its size; the VM must be paused.
pub unsafe fn write_full(path: &Path, regions: &[HostRegion]) -> Result<MemFileInfo, MemFileError> {
    let f = File::create(path).map_err(io_err("create", path))?;
    let size = file_size(&regions.iter().map(|h| h.region).collect::<Vec<_>>());
    f.set_len(size).map_err(io_err("size", path))?;
    let mut crc = crc32fast::Hasher::new();
    let mut written = 0u64;
    for h in regions {
        // SAFETY: forwarded from the caller.
        let bytes = unsafe { region_bytes(h) };
        crc.update(bytes);
        let mut run_start: Option<usize> = None;
        let page = PAGE_SIZE as usize;
        let mut flush = |start: usize, end: usize| -> Result<(), MemFileError> {
            f.write_all_at(&bytes[start..end], h.region.file_offset + start as u64)
                .map_err(io_err("write", path))?;
            written += (end - start) as u64;
            Ok(())
        };
        for (i, p) in bytes.chunks(page).enumerate() {
            let zero = is_zero(p);
            match (zero, run_start) {
                (false, None) => run_start = Some(i * page),
                (true, Some(s)) => {
                    flush(s, i * page)?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            flush(s, bytes.len())?;
        }
    }
    f.sync_all().map_err(io_err("fsync", path))?;
    Ok(MemFileInfo {
        size,
        written,
        crc32: crc.finalize(),
    })
}

/// Writes the pages set in `bitmaps[i]` (one KVM dirty bitmap per region) into a new sparse
/// file at `path`. Returns the runs written per region.
///
/// # Safety
/// As `write_full`.
pub unsafe fn write_diff(
    path: &Path,
    regions: &[HostRegion],
    bitmaps: &[Vec<u64>],
) -> Result<(MemFileInfo, Vec<Vec<PageRun>>), MemFileError> {
    if bitmaps.len() != regions.len() {
        return Err(MemFileError::Layout(format!(
            "{} dirty bitmaps for {} regions",
            bitmaps.len(),
            regions.len()
        )));
    }
    let f = File::create(path).map_err(io_err("create", path))?;
    let size = file_size(&regions.iter().map(|h| h.region).collect::<Vec<_>>());
    f.set_len(size).map_err(io_err("size", path))?;
    let mut crc = crc32fast::Hasher::new();
    let mut written = 0u64;
    let mut all = Vec::with_capacity(regions.len());
    for (h, bm) in regions.iter().zip(bitmaps) {
        // SAFETY: forwarded from the caller.
        let bytes = unsafe { region_bytes(h) };
        let runs = page_runs(bm, h.region.size / PAGE_SIZE);
        for r in &runs {
            let (s, e) = (
                r.byte_offset() as usize,
                (r.byte_offset() + r.byte_len()) as usize,
            );
            crc.update(&bytes[s..e]);
            f.write_all_at(&bytes[s..e], h.region.file_offset + s as u64)
                .map_err(io_err("write", path))?;
            written += r.byte_len();
        }
        all.push(runs);
    }
    f.sync_all().map_err(io_err("fsync", path))?;
    Ok((
        MemFileInfo {
            size,
            written,
            crc32: crc.finalize(),
        },
        all,
    ))
}

/// Opens a memory file and checks its size against the snapshot's record.
pub fn open_checked(path: &Path, want: u64) -> Result<File, MemFileError> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let got = f.metadata().map_err(io_err("stat", path))?.len();
    if got != want {
        return Err(MemFileError::Size {
            path: path.display().to_string(),
            got,
            want,
        });
    }
    Ok(f)
}

/// Recomputes the checksum `write_full`/`write_diff` recorded. Reads the whole covered part of
/// the file, so it is optional on restore (`--verify`) and always done on import.
pub fn verify(
    path: &Path,
    file: &File,
    regions: &[RamRegion],
    runs: Option<&[Vec<PageRun>]>,
    stored: u32,
) -> Result<(), MemFileError> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut feed = |off: u64, len: u64| -> Result<(), MemFileError> {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], off + done)
                .map_err(io_err("read", path))?;
            crc.update(&buf[..n]);
            done += n as u64;
        }
        Ok(())
    };
    match runs {
        None => {
            for r in regions {
                feed(r.file_offset, r.size)?;
            }
        }
        Some(runs) => {
            for (r, rr) in regions.iter().zip(runs) {
                for run in rr {
                    feed(r.file_offset + run.byte_offset(), run.byte_len())?;
                }
            }
        }
    }
    let computed = crc.finalize();
    if computed != stored {
        return Err(MemFileError::Checksum {
            path: path.display().to_string(),
            stored,
            computed,
        });
    }
    Ok(())
}

/// Checks that diff runs stay inside their regions (they come from an untrusted file).
pub fn validate_runs(regions: &[RamRegion], runs: &[Vec<PageRun>]) -> Result<(), MemFileError> {
    if runs.len() != regions.len() {
        return Err(MemFileError::Layout(format!(
            "diff lists runs for {} regions, the layout has {}",
            runs.len(),
            regions.len()
        )));
    }
    for (r, rr) in regions.iter().zip(runs) {
        let pages = r.size / PAGE_SIZE;
        for run in rr {
            let end = run.first.checked_add(run.count);
            if run.count == 0 || !matches!(end, Some(e) if e <= pages) {
                return Err(MemFileError::Layout(format!(
                    "diff run {}+{} is outside its {pages}-page region",
                    run.first, run.count
                )));
            }
        }
    }
    Ok(())
}

/// Maps the dirty runs of a diff file over a live private mapping of the same layout.
///
/// # Safety
/// `regions[i].host_addr` must be a private mapping of `regions[i].region.size` bytes owned by
/// the caller that no vCPU is running on yet; the runs must have passed `validate_runs`.
pub unsafe fn overlay_diff(
    path: &Path,
    file: &File,
    regions: &[HostRegion],
    runs: &[Vec<PageRun>],
) -> Result<(), MemFileError> {
    use std::os::fd::AsRawFd;
    for (h, rr) in regions.iter().zip(runs) {
        for run in rr {
            let addr = h.host_addr + run.byte_offset() as usize;
            let off = h.region.file_offset + run.byte_offset();
            // SAFETY: the range lies inside the caller's mapping (validated runs); MAP_FIXED
            // replaces those pages with a private view of the same bytes from the diff file.
            let p = unsafe {
                libc::mmap(
                    addr as *mut libc::c_void,
                    run.byte_len() as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    off as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io_err("map diff pages of", path)(
                    std::io::Error::last_os_error(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::dirty::all_dirty;

    /// An anonymous mapping standing in for guest RAM.
    struct Anon {
        ptr: usize,
        len: usize,
    }
    impl Anon {
        fn new(len: usize) -> Self {
            // SAFETY: a fresh anonymous mapping; checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Self {
                ptr: p as usize,
                len,
            }
        }
        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the mapping is ours and alive.
            unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut u8, self.len) }
        }
    }
    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmapping our own mapping.
            unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
        }
    }

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("c4-mem-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn map_private(f: &File, len: usize) -> Anon {
        use std::os::fd::AsRawFd;
        // SAFETY: maps the whole file privately; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Anon {
            ptr: p as usize,
            len,
        }
    }

    #[test]
    fn full_then_diff_round_trip_through_private_maps() {
        let dir = tmpdir("rt");
        let size = 64 * PAGE_SIZE as usize;
        let mut ram = Anon::new(size);
        ram.bytes()[5 * 4096 + 7] = 0xaa;
        ram.bytes()[40 * 4096] = 0x55;
        let layout = layout(&[(0, size as u64)]).unwrap();
        let regions = [HostRegion {
            region: layout[0],
            host_addr: ram.ptr,
        }];
        let full = dir.join("mem.full");
        // SAFETY: `ram` is alive and nothing writes it meanwhile.
        let info = unsafe { write_full(&full, &regions) }.unwrap();
        assert_eq!(info.size, size as u64);
        assert_eq!(
            info.written,
            2 * PAGE_SIZE,
            "only non-zero pages are written"
        );
        let f = open_checked(&full, info.size).unwrap();
        verify(&full, &f, &layout, None, info.crc32).unwrap();

        // The guest writes two more pages; a diff holds just those.
        ram.bytes()[9 * 4096] = 1;
        ram.bytes()[5 * 4096 + 8] = 2;
        let mut bm = vec![0u64; 1];
        bm[0] |= 1 << 9 | 1 << 5;
        let diff = dir.join("mem.diff");
        // SAFETY: as above.
        let (dinfo, runs) = unsafe { write_diff(&diff, &regions, &[bm]) }.unwrap();
        assert_eq!(dinfo.written, 2 * PAGE_SIZE);
        validate_runs(&layout, &runs).unwrap();
        let df = open_checked(&diff, dinfo.size).unwrap();
        verify(&diff, &df, &layout, Some(&runs), dinfo.crc32).unwrap();

        // Restore: base privately mapped, diff mapped over it; equals the live RAM.
        let mut restored = map_private(&f, size);
        let rregions = [HostRegion {
            region: layout[0],
            host_addr: restored.ptr,
        }];
        // SAFETY: `restored` is our private mapping of the right size.
        unsafe { overlay_diff(&diff, &df, &rregions, &runs) }.unwrap();
        assert!(restored.bytes() == ram.bytes());
        // Writes to the restored copy never reach the files.
        restored.bytes()[0] = 9;
        let again = map_private(&f, size);
        // SAFETY: reading our own mapping.
        assert_eq!(unsafe { *(again.ptr as *const u8) }, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_and_tampered_files_are_refused() {
        let dir = tmpdir("bad");
        let size = 8 * PAGE_SIZE as usize;
        let mut ram = Anon::new(size);
        ram.bytes()[100] = 1;
        let layout = layout(&[(0, size as u64)]).unwrap();
        let regions = [HostRegion {
            region: layout[0],
            host_addr: ram.ptr,
        }];
        let p = dir.join("mem");
        // SAFETY: `ram` is alive and idle.
        let info = unsafe { write_full(&p, &regions) }.unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[7], 4096 * 3).unwrap();
        let r = File::open(&p).unwrap();
        assert!(matches!(
            verify(&p, &r, &layout, None, info.crc32),
            Err(MemFileError::Checksum { .. })
        ));
        f.set_len(info.size - 4096).unwrap();
        let err = open_checked(&p, info.size).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hostile_layouts_and_runs_are_refused() {
        let good = layout(&[(0, 0x10000), (0x100000, 0x2000)]).unwrap();
        validate(&good).unwrap();
        let mut bad = good.clone();
        bad[1].file_offset = 0x1000;
        assert!(validate(&bad).is_err());
        let mut bad = good.clone();
        bad[0].size = 0x1001;
        assert!(validate(&bad).is_err());
        let mut bad = good.clone();
        bad[1].file_offset = u64::MAX - 0xfff;
        assert!(validate(&bad).is_err());
        let runs = vec![
            vec![PageRun {
                first: 0,
                count: 16,
            }],
            vec![PageRun { first: 1, count: 2 }],
        ];
        assert!(validate_runs(&good, &runs).is_err());
        let runs = vec![
            vec![PageRun {
                first: u64::MAX,
                count: 2,
            }],
            vec![],
        ];
        assert!(validate_runs(&good, &runs).is_err());
        let runs = vec![
            vec![PageRun {
                first: 0,
                count: 16,
            }],
            vec![],
        ];
        validate_runs(&good, &runs).unwrap();
        assert_eq!(all_dirty(0x2000).len(), 1);
    }
}
