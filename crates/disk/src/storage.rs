//! The host side of an image: a file on disk, or bytes in memory (tests and fuzzing run every
//! parser on memory so they need no temporary files).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Mutex;

/// Positional I/O on the file that holds an image.
#[allow(clippy::len_without_is_empty)] // a file of length 0 is not a special case here
pub trait Storage: Send + Sync {
    /// Reads at most `buf.len()` bytes; fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn sync(&self) -> io::Result<()>;
    /// Deallocates a range so it reads as zeros. The default writes zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
    /// The next allocated range at or after `offset`: `Some((start, end))`, or `None` if only
    /// holes follow. The default treats the whole file as data.
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.len()?;
        Ok((offset < len).then_some((offset, len)))
    }
    /// Whether the storage is a block device (its length comes from the device, not metadata).
    fn is_block_device(&self) -> bool {
        false
    }
}

/// Reads until `buf` is full or end of file; returns the number of bytes read.
pub fn read_full(s: &dyn Storage, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match s.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A host file. Sparse-aware through SEEK_DATA/SEEK_HOLE and FALLOC_FL_PUNCH_HOLE.
pub struct FileStorage {
    file: File,
    block_device: bool,
}

impl FileStorage {
    pub fn new(file: File) -> Self {
        use std::os::unix::fs::FileTypeExt;
        let block_device = file
            .metadata()
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        FileStorage { file, block_device }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn lseek(&self, offset: u64, whence: i32) -> io::Result<Option<u64>> {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek on a descriptor we own; it does not touch memory. The file position it
        // changes is never used, because all I/O here is positional (pread/pwrite).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.file.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            return Ok(self.lseek(0, libc::SEEK_END)?.unwrap_or(0));
        }
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Filesystems or devices without hole punching: fall back to writing zeros.
            Some(libc::EOPNOTSUPP) | Some(libc::ENODEV) | Some(libc::ENOSYS) => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.write_all_at(&zeros[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            _ => Err(e),
        }
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let len = self.len()?;
        if offset >= len {
            return Ok(None);
        }
        if self.block_device {
            return Ok(Some((offset, len)));
        }
        let start = match self.lseek(offset, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(None),
            // No SEEK_DATA support: everything is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((offset, len))),
            Err(e) => return Err(e),
        };
        let end = self.lseek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        Ok(Some((start, end.max(start))))
    }
    fn is_block_device(&self) -> bool {
        self.block_device
    }
}

/// An image held in memory, for tests and fuzzing.
#[derive(Default)]
pub struct MemStorage {
    data: Mutex<Vec<u8>>,
}

impl MemStorage {
    pub fn new(data: Vec<u8>) -> Self {
        MemStorage {
            data: Mutex::new(data),
        }
    }
    pub fn into_inner(self) -> Vec<u8> {
        self.data.into_inner().unwrap_or_else(|p| p.into_inner())
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Memory images are capped so a hostile header cannot make a test allocate without bound.
const MEM_LIMIT: u64 = 1 << 30;

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let d = self.lock();
        let Ok(off) = usize::try_from(offset) else {
            return Ok(0);
        };
        if off >= d.len() {
            return Ok(0);
        }
        let n = buf.len().min(d.len() - off);
        buf[..n].copy_from_slice(&d[off..off + n]);
        Ok(n)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= MEM_LIMIT)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut d = self.lock();
        if d.len() < end as usize {
            d.resize(end as usize, 0);
        }
        d[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > MEM_LIMIT {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        self.lock().resize(len as usize, 0);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}
