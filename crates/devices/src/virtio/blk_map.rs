//! Buffered reads of a raw disk file from a read-only shared mapping of it: a page-cache hit is
//! a copy into guest memory, without a system call.
//!
//! Why: on a host where system calls are dear (this project's CI host is itself a PVM guest) a
//! 4 KiB pread from the page cache costs ~0.75 us and copying the same page out of a mapping
//! ~0.35 us; the pread was most of virtio-blk's cost per request (`corefour bench io`, rand read
//! 4K buffered). A page not in the cache is read by the page fault, as pread would read it.
//!
//! The file can change under the mapping. A page past its end (someone truncated it) or one the
//! kernel cannot read (a disk I/O error) raises SIGBUS in the copying thread. A process-wide
//! SIGBUS handler, installed with the first mapping, looks the faulting address up in a fixed
//! table of live mappings; inside one, it maps an anonymous zero page over the faulting page so
//! the copy can finish, marks the mapping faulted and returns. The device then answers that
//! request with an I/O error and serves every later read with pread, which sees the file's real
//! end. Any other SIGBUS goes to the handler that was there before (Rust's stack-overflow
//! handler) or gets the default action, exactly as without this module.
//!
//! Writes, flush, discard and write-zeroes keep going through the fd: they change the page cache
//! the mapping shows, so reads after them see their effect. O_DIRECT disks and image formats
//! never get a mapping. Known difference to pread: after a truncation to a length that is not a
//! page multiple, the bytes past the new end inside its last page read as zeros, not as an error
//! (the kernel maps that page whole).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Mappings that can be live at once; a disk past these is served with pread.
const SLOTS: usize = 64;

/// One live mapping as the signal handler sees it: `start == 0` means free or being set up.
struct Slot {
    claimed: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    claimed: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The SIGBUS action before ours, for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Installs the handler once per process; false if that failed (then nothing is mapped).
fn install() -> bool {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: an all-zero sigaction is a valid value of the plain C struct.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null new action only reads the current one into `old`.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
            return;
        }
        // Recorded before ours is installed: the handler may run as soon as it is.
        let _ = PREVIOUS.set(old);
        // SAFETY: a zeroed sigaction is valid; the fields set below make it ours. The handler
        // only does async-signal-safe things (atomics, mmap, sigaction, the previous handler).
        let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
        new.sa_sigaction = on_sigbus as *const () as usize;
        new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: as above; an empty mask is a valid mask.
        unsafe { libc::sigemptyset(&mut new.sa_mask) };
        // SAFETY: installs a valid action; the old one was saved above.
        if unsafe { libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) } == 0 {
            INSTALLED.store(true, Ordering::SeqCst);
        }
    });
    INSTALLED.load(Ordering::SeqCst)
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for s in &TABLE {
        let start = s.start.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= s.end.load(Ordering::Acquire) {
            continue;
        }
        // SAFETY: the page lies inside a mapping this module owns (registered above and
        // unregistered before it is unmapped); replacing it with a private zero page only
        // changes what that mapping reads, and the mapping is never used again once faulted.
        let p = unsafe {
            libc::mmap(
                (addr & !(page - 1)) as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            s.faulted.store(true, Ordering::SeqCst);
            return;
        }
        break;
    }
    // Not ours (or no memory for the patch): what would have happened without this module.
    match PREVIOUS.get() {
        Some(old) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous action was installed as an SA_SIGINFO handler with
                // this signature; it gets the arguments the kernel gave us.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: as above, a plain handler.
                let f: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(old.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: restores the default action; the faulting access then repeats and the
            // kernel ends the process with SIGBUS, as it would have without a handler.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}

/// A read-only shared mapping of a whole raw disk file (see the module doc).
pub struct FileMap {
    ptr: *mut u8,
    len: usize,
    slot: &'static Slot,
}

// SAFETY: the pointer is to a mapping this value owns; reads through it are copies (the file
// may change under them, which the copy tolerates), and the slot is made of atomics.
unsafe impl Send for FileMap {}
// SAFETY: as above; `read` takes &self and only reads the mapping.
unsafe impl Sync for FileMap {}

impl FileMap {
    /// Maps `len` bytes of `file` (a regular file). None when it cannot be mapped (not a regular
    /// file, empty, no handler, no free slot, mmap failed): the caller then uses pread.
    pub fn new(file: &File, len: u64) -> Option<Self> {
        let regular = file.metadata().ok()?.file_type().is_file();
        let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
        if !regular || !install() {
            return None;
        }
        let slot = TABLE.iter().find(|s| {
            s.claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        // SAFETY: a fresh read-only shared mapping of a file we have open; no existing memory
        // is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            tracing::debug!(
                "virtio-blk: cannot map the disk file ({}), reads use pread",
                io::Error::last_os_error()
            );
            slot.claimed.store(false, Ordering::Release);
            return None;
        }
        let page = PAGE.load(Ordering::Relaxed);
        slot.faulted.store(false, Ordering::SeqCst);
        slot.end
            .store(ptr as usize + len.div_ceil(page) * page, Ordering::Release);
        slot.start.store(ptr as usize, Ordering::Release);
        Some(Self {
            ptr: ptr.cast(),
            len,
            slot,
        })
    }

    /// False once a read through the mapping faulted: use pread from then on.
    pub fn usable(&self) -> bool {
        !self.slot.faulted.load(Ordering::SeqCst)
    }

    /// Copies the file's bytes from `off` into the buffers `iov` points to. The range must lie
    /// inside the mapped length (the device checked it against the disk's size).
    pub fn read(&self, iov: &[libc::iovec], off: u64) -> io::Result<()> {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let start = usize::try_from(off)
            .ok()
            .filter(|&o| o.checked_add(total).is_some_and(|e| e <= self.len))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "read past the mapped disk")
            })?;
        let mut at = start;
        for v in iov {
            // SAFETY: `at..at + iov_len` lies inside the mapping (checked above); the target is
            // guest memory the caller resolved and keeps mapped, never the mapping itself. A
            // page that vanished from the file faults, and the SIGBUS handler puts a zero page
            // there, so the copy always completes; `faulted` then says the data is not real.
            unsafe {
                std::ptr::copy_nonoverlapping(self.ptr.add(at), v.iov_base.cast::<u8>(), v.iov_len)
            };
            at += v.iov_len;
        }
        if !self.usable() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the disk file shrank or failed to read under its mapping (SIGBUS); \
                 later reads use pread",
            ));
        }
        Ok(())
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        self.slot.start.store(0, Ordering::SeqCst);
        self.slot.end.store(0, Ordering::SeqCst);
        // SAFETY: unmaps exactly the mapping made in `new` (including any zero pages the
        // handler put inside it); nothing reads it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
        self.slot.claimed.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn temp(len: usize, byte: u8) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![byte; len]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        (dir, f)
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn reads_see_later_writes_through_the_fd() {
        let (_d, f) = temp(64 << 10, 0x11);
        let m = FileMap::new(&f, 64 << 10).unwrap();
        let (mut a, mut b) = ([0u8; 512], [0u8; 1024]);
        m.read(&[iov(&mut a), iov(&mut b)], 4096).unwrap();
        assert!(a.iter().chain(b.iter()).all(|&x| x == 0x11));
        f.write_all_at(&[0x22; 4096], 4096).unwrap();
        m.read(&[iov(&mut a)], 4096).unwrap();
        assert!(a.iter().all(|&x| x == 0x22));
        let e = m.read(&[iov(&mut b)], (64 << 10) - 512).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn truncated_file_faults_into_an_error_not_a_crash() {
        let (_d, f) = temp(256 << 10, 0x33);
        let m = FileMap::new(&f, 256 << 10).unwrap();
        let mut buf = vec![0u8; 8192];
        m.read(&[iov(&mut buf)], 128 << 10).unwrap();
        f.set_len(64 << 10).unwrap();
        let e = m.read(&[iov(&mut buf)], 128 << 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(!m.usable());
        // The slot is released on drop and a new mapping works again.
        drop(m);
        let m = FileMap::new(&f, 64 << 10).unwrap();
        m.read(&[iov(&mut buf)], 0).unwrap();
        assert!(buf.iter().all(|&x| x == 0x33));
    }

    #[test]
    fn only_regular_nonempty_files_are_mapped() {
        let (_d, f) = temp(4096, 0);
        assert!(FileMap::new(&f, 0).is_none());
        let null = File::open("/dev/null").unwrap();
        assert!(FileMap::new(&null, 4096).is_none());
    }
}
