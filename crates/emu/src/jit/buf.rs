//! Executable memory for translated blocks: one memfd per vCPU mapped twice, filled front to
//! back. W^X without a syscall per translation: the translator writes through a read-write
//! view and the host runs the code through a read-execute view of the same pages, so no
//! mapping is ever both writable and executable and nothing is re-protected after setup
//! (mprotect per block cost the Linux boot ~8% of its CPU time, most of it in VMA splits).
//!
//! Behind the code, in the same file (so code reaches it RIP-relative), lies an array of chain
//! slots, read-only in the executing view and written through the other: a block's exit to a
//! fixed target jumps through one, and chaining a block to its successor is one store into
//! it, no code patching.

use thiserror::Error;

/// Address space reserved per vCPU for code; pages are only backed once code lands on them.
pub const ARENA: usize = 32 << 20;
/// Chain slots (8 bytes each) after the code.
pub const SLOTS: usize = 1 << 19;
const TOTAL: usize = ARENA + SLOTS * 8;

#[derive(Debug, Error)]
pub enum BufError {
    #[error(
        "creating the memfd for JIT code failed: {0} (the JIT needs memfd_create, Linux 3.17+, \
         and vm.memfd_noexec below 2)"
    )]
    Memfd(std::io::Error),
    #[error("sizing the JIT code memfd to {0} bytes failed: {1}")]
    Size(usize, std::io::Error),
    #[error("mapping {0} bytes for JIT code failed: {1}")]
    Map(usize, std::io::Error),
    #[error("changing the protection of JIT code pages failed: {0}")]
    Protect(std::io::Error),
    #[error("the JIT code arena has no room for {0} more bytes")]
    Full(usize),
}

pub struct CodeBuf {
    /// The read-execute view: code runs here and is assembled for these addresses.
    rx: *mut u8,
    /// The read-write view of the same pages: the translator's only way in.
    rw: *mut u8,
    used: usize,
    /// Chain slots handed out (slot 0 is never used: it means "none").
    slots: usize,
}

// SAFETY: the mappings are owned by this value and only touched by the vCPU thread holding it.
unsafe impl Send for CodeBuf {}

/// Maps all of `fd` shared with `prot`.
fn map(fd: libc::c_int, prot: libc::c_int) -> Result<*mut u8, BufError> {
    // SAFETY: a fresh shared mapping of the whole file at an address of the kernel's
    // choosing; the result is checked before use.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            TOTAL,
            prot,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(BufError::Map(TOTAL, std::io::Error::last_os_error()));
    }
    Ok(p.cast())
}

/// Unmaps one view made by `map`.
///
/// # Safety
/// `p` came from `map` and no code or pointer into it is used afterwards.
unsafe fn unmap(p: *mut u8) {
    // SAFETY: per the contract, `p .. p+TOTAL` is one of our mappings and is dead.
    unsafe { libc::munmap(p.cast(), TOTAL) };
}

impl CodeBuf {
    pub fn new() -> Result<Self, BufError> {
        let fd = Self::memfd()?;
        let views = (|| {
            // SAFETY: `fd` is the open memfd made above.
            if unsafe { libc::ftruncate(fd, TOTAL as libc::off_t) } != 0 {
                return Err(BufError::Size(TOTAL, std::io::Error::last_os_error()));
            }
            let rx = map(fd, libc::PROT_READ | libc::PROT_EXEC)?;
            let rw = match map(fd, libc::PROT_READ | libc::PROT_WRITE) {
                Ok(rw) => rw,
                Err(e) => {
                    // SAFETY: just mapped, nothing uses it.
                    unsafe { unmap(rx) };
                    return Err(e);
                }
            };
            // Once, at setup: the slots are data, so the executing view only reads them.
            // SAFETY: the slot array is the tail of the `rx` mapping just made.
            let rc = unsafe { libc::mprotect(rx.add(ARENA).cast(), SLOTS * 8, libc::PROT_READ) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                // SAFETY: both views were just made and nothing uses them yet.
                unsafe {
                    unmap(rx);
                    unmap(rw);
                }
                return Err(BufError::Protect(e));
            }
            Ok((rx, rw))
        })();
        // The mappings keep the file alive; the descriptor is not needed any more.
        // SAFETY: `fd` is ours and closed exactly once.
        unsafe { libc::close(fd) };
        let (rx, rw) = views?;
        Ok(CodeBuf {
            rx,
            rw,
            used: 0,
            slots: 1,
        })
    }

    fn memfd() -> Result<libc::c_int, BufError> {
        let name = c"corefour-jit";
        // MFD_EXEC asks for an executable memfd where the kernel knows the flag (6.3+, where
        // vm.memfd_noexec=1 would otherwise make it non-executable); older kernels reject it.
        for flags in [libc::MFD_CLOEXEC | libc::MFD_EXEC, libc::MFD_CLOEXEC] {
            // SAFETY: `name` is a NUL-terminated string; the result is checked.
            let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
            if fd >= 0 {
                return Ok(fd);
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(BufError::Memfd(e));
            }
        }
        Err(BufError::Memfd(std::io::Error::from_raw_os_error(
            libc::EINVAL,
        )))
    }

    /// A fresh chain slot: its number and address, or None when all are taken.
    pub fn slot(&mut self) -> Option<(u32, u64)> {
        if self.slots >= SLOTS {
            return None;
        }
        let n = self.slots;
        self.slots += 1;
        Some((n as u32, self.slot_addr(n as u32)))
    }

    /// A guarded record: five slots (code, RIP, TLB addend, version word address, version),
    /// first slot's number and address. Starts matching no RIP.
    pub fn record(&mut self) -> Option<(u32, u64)> {
        if self.slots + 5 > SLOTS {
            return None;
        }
        let n = self.slots as u32;
        self.slots += 5;
        self.set_slot(n + 1, u64::MAX);
        Some((n, self.slot_addr(n)))
    }

    /// Fills guarded record `n` to send its exit to `code` for `rip`.
    pub fn set_record(&mut self, n: u32, code: u64, rip: u64, addend: u64, ver: (usize, u32)) {
        self.set_slot(n + 1, rip);
        self.set_slot(n + 2, addend);
        self.set_slot(n + 3, ver.0 as u64);
        self.set_slot(n + 4, ver.1 as u64);
        self.set_slot(n, code);
    }

    /// Where code reads slot `n` (in the executing view).
    fn slot_addr(&self, n: u32) -> u64 {
        self.rx as u64 + ARENA as u64 + 8 * n as u64
    }

    /// Points chain slot `n` (from `slot`) at `to`.
    pub fn set_slot(&mut self, n: u32, to: u64) {
        if n == 0 || n as usize >= self.slots {
            return;
        }
        // SAFETY: slot `n` was handed out, so it lies in the slot array, which the `rw` view
        // maps writable; code only reads it (through `rx`) on this thread, between runs.
        unsafe { (self.rw.add(ARENA + 8 * n as usize) as *mut u64).write(to) };
    }

    /// Whether fewer than `n` slots are left.
    pub fn slots_low(&self, n: usize) -> bool {
        self.slots + n > SLOTS
    }

    /// Where the next block's code will start (code is assembled for this address).
    pub fn next(&self) -> u64 {
        self.rx as u64 + self.used as u64
    }

    pub fn room(&self) -> usize {
        ARENA - self.used
    }

    /// Forgets every block: only call once nothing points into the buffer any more.
    pub fn reset(&mut self) {
        self.used = 0;
        self.slots = 1;
    }

    /// Copies `code` (assembled for `self.next()`) in and returns its address.
    pub fn push(&mut self, code: &[u8]) -> Result<*const u8, BufError> {
        if code.len() > self.room() {
            return Err(BufError::Full(code.len()));
        }
        // SAFETY: `used .. used+len` lies inside the arena (checked above) of the writable
        // view; the same bytes in the executing view are not running: the only thread that
        // runs this buffer's code is the caller, and nothing jumps past `used` yet.
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.add(self.used), code.len());
        }
        // SAFETY: `used` is inside the executing view.
        let at = unsafe { self.rx.add(self.used) };
        self.used = (self.used + code.len() + 15) & !15;
        Ok(at)
    }
}

impl Drop for CodeBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the views made in `new`; no block outlives the buffer (the
        // vCPU drops its cache, which holds the entry points, with it).
        unsafe {
            unmap(self.rx);
            unmap(self.rw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `mov eax, v; ret`
    fn ret_imm(v: u32) -> Vec<u8> {
        let mut c = vec![0xb8];
        c.extend_from_slice(&v.to_le_bytes());
        c.push(0xc3);
        c
    }

    fn call(p: *const u8) -> u32 {
        // SAFETY: `p` holds `mov eax, imm32; ret` in the executing view.
        unsafe { std::mem::transmute::<*const u8, extern "sysv64" fn() -> u32>(p)() }
    }

    /// The permissions column of the /proc/self/maps line starting at `addr`.
    fn perms(addr: u64) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        for l in maps.lines() {
            let mut f = l.split_whitespace();
            let range = f.next().unwrap_or("");
            let start = range.split('-').next().unwrap_or("");
            if u64::from_str_radix(start, 16).ok() == Some(addr) {
                return f.next().unwrap_or("").to_string();
            }
        }
        String::new()
    }

    #[test]
    fn rewrite_through_rw_view_is_what_runs() {
        let mut b = CodeBuf::new().expect("JIT buffer");
        let at = b.next();
        let p = b.push(&ret_imm(7)).expect("push");
        assert_eq!(p as u64, at);
        assert_eq!(call(p), 7);
        let q = b.push(&ret_imm(9)).expect("push");
        assert_eq!(call(q), 9);
        assert_eq!(q as u64 % 16, 0);
        // Reset and overwrite the same bytes: the executing view sees the new code.
        b.reset();
        let r = b.push(&ret_imm(0x1234_5678)).expect("push");
        assert_eq!(r, p);
        assert_eq!(call(r), 0x1234_5678);
    }

    #[test]
    fn no_view_is_writable_and_executable() {
        let b = CodeBuf::new().expect("JIT buffer");
        let rx = perms(b.rx as u64);
        let rw = perms(b.rw as u64);
        assert!(rx.starts_with("r-x"), "code view is {rx}");
        assert!(rw.starts_with("rw-"), "write view is {rw}");
        assert_eq!(perms(b.rx as u64 + ARENA as u64).get(..3), Some("r--"));
    }

    #[test]
    fn slots_written_are_read_back_through_the_code_view() {
        let mut b = CodeBuf::new().expect("JIT buffer");
        let (n, addr) = b.slot().expect("slot");
        assert_ne!(n, 0);
        b.set_slot(n, 0xdead_beef);
        // SAFETY: `addr` is slot `n` in the executing view, readable.
        assert_eq!(unsafe { (addr as *const u64).read() }, 0xdead_beef);
        let (r, raddr) = b.record().expect("record");
        // SAFETY: as above, for the record's RIP word.
        assert_eq!(unsafe { ((raddr + 8) as *const u64).read() }, u64::MAX);
        b.set_record(r, 1, 2, 3, (4, 5));
        // SAFETY: the record's five words in the executing view.
        let words: Vec<u64> = (0..5)
            .map(|k| unsafe { ((raddr + 8 * k) as *const u64).read() })
            .collect();
        assert_eq!(words, [1, 2, 3, 4, 5]);
        // Slot 0 and slots never handed out are not written.
        b.set_slot(0, 1);
        b.set_slot(n + 100, 1);
    }

    #[test]
    fn full_arena_is_an_error() {
        let mut b = CodeBuf::new().expect("JIT buffer");
        let big = vec![0xc3; ARENA + 1];
        assert!(matches!(b.push(&big), Err(BufError::Full(_))));
    }
}
