//! Executable memory for translated blocks: one anonymous mapping per vCPU, filled front to
//! back. W^X: a page is writable only while new code is copied in and executable otherwise, so
//! no page is ever both (two mprotect calls per translation; translations are rare).
//!
//! Behind the code, in the same mapping (so code reaches it RIP-relative), lies a writable,
//! never executable array of chain slots: a block's exit to a fixed target jumps through one,
//! and chaining a block to its successor is one store into it, no code patching.

use thiserror::Error;

/// Address space reserved per vCPU for code; pages are only backed once code lands on them.
pub const ARENA: usize = 32 << 20;
/// Chain slots (8 bytes each) after the code.
pub const SLOTS: usize = 1 << 19;
const PAGE: usize = 4096;

#[derive(Debug, Error)]
pub enum BufError {
    #[error("mapping {0} bytes for JIT code failed: {1}")]
    Map(usize, std::io::Error),
    #[error("changing the protection of JIT code pages failed: {0}")]
    Protect(std::io::Error),
}

pub struct CodeBuf {
    base: *mut u8,
    used: usize,
    /// Chain slots handed out (slot 0 is never used: it means "none").
    slots: usize,
}

// SAFETY: the mapping is owned by this value and only touched by the vCPU thread holding it.
unsafe impl Send for CodeBuf {}

impl CodeBuf {
    pub fn new() -> Result<Self, BufError> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; the
        // result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ARENA + SLOTS * 8,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(BufError::Map(ARENA, std::io::Error::last_os_error()));
        }
        // SAFETY: the slot array is the tail of the mapping just made.
        let rc = unsafe {
            libc::mprotect(
                p.cast::<u8>().add(ARENA).cast(),
                SLOTS * 8,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: unmaps the mapping made above, which nothing uses yet.
            unsafe { libc::munmap(p, ARENA + SLOTS * 8) };
            return Err(BufError::Protect(e));
        }
        Ok(CodeBuf {
            base: p.cast(),
            used: 0,
            slots: 1,
        })
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

    fn slot_addr(&self, n: u32) -> u64 {
        self.base as u64 + ARENA as u64 + 8 * n as u64
    }

    /// Points chain slot `n` (from `slot`) at `to`.
    pub fn set_slot(&mut self, n: u32, to: u64) {
        if n == 0 || n as usize >= self.slots {
            return;
        }
        // SAFETY: slot `n` was handed out, so it lies in the writable slot array; code only
        // reads it on this thread, between runs.
        unsafe { (self.slot_addr(n) as *mut u64).write(to) };
    }

    /// Whether fewer than `n` slots are left.
    pub fn slots_low(&self, n: usize) -> bool {
        self.slots + n > SLOTS
    }

    /// Where the next block's code will start (code is assembled for this address).
    pub fn next(&self) -> u64 {
        self.base as u64 + self.used as u64
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
            return Err(BufError::Map(
                code.len(),
                std::io::Error::other("arena full"),
            ));
        }
        let start = self.used & !(PAGE - 1);
        let end = (self.used + code.len()).div_ceil(PAGE) * PAGE;
        // SAFETY: `start .. end` lies inside the mapping (end <= ARENA as used + len <= ARENA
        // and ARENA is page-aligned); nothing executes from it while it is writable, as the
        // only thread running this arena's code is the caller.
        unsafe {
            let p = self.base.add(start);
            if libc::mprotect(p.cast(), end - start, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                return Err(BufError::Protect(std::io::Error::last_os_error()));
            }
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.add(self.used), code.len());
            if libc::mprotect(p.cast(), end - start, libc::PROT_READ | libc::PROT_EXEC) != 0 {
                return Err(BufError::Protect(std::io::Error::last_os_error()));
            }
        }
        // SAFETY: `used` is inside the mapping.
        let at = unsafe { self.base.add(self.used) };
        self.used = (self.used + code.len() + 15) & !15;
        Ok(at)
    }
}

impl Drop for CodeBuf {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no block outlives the buffer
        // (the vCPU drops its cache, which holds the entry points, with it).
        unsafe {
            libc::munmap(self.base.cast(), ARENA + SLOTS * 8);
        }
    }
}
