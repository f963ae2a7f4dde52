//! Adjacent virtio-blk reads or writes gathered into one group, issued as one preadv/pwritev
//! (as QEMU's virtio_blk_submit_multireq does).
//!
//! Why: a driver with many requests in flight doing sequential I/O puts consecutive requests
//! next to each other on the disk. One vectored call for a run of them costs one system call,
//! one inode lock, one file_update_time and one balance_dirty_pages instead of one each per
//! request, and an O_DIRECT disk gets one larger I/O.
//!
//! A group holds the requests' chains (to complete them afterwards), their guest iovecs laid
//! end to end and the byte range they cover. A request joins only when it has the group's
//! direction and starts where the group ends (increasing order); everything else (a gap, an
//! overlap, a flush, a malformed chain) closes the group first, so requests still reach the
//! file in the order the driver made them available. The handler (`blk`) decides which requests
//! may join and issues the group; this module only keeps it.

use super::blk::Dir;
use super::chain::Chain;

/// Bytes one group may cover. `bench io` (128 KiB sequential, 32 in flight, O_DIRECT): 256 KiB
/// cost 24-30 us of CPU per request, 512 KiB 19-23 us, 1 MiB 17-20 us, 2 MiB 16-23 us and no
/// faster; buffered rows did not tell the caps apart.
pub(crate) const MAX_BYTES: u64 = 1 << 20;
/// iovecs one group may hold: one preadv/pwritev takes at most IOV_MAX.
pub(crate) const MAX_IOVS: usize = libc::UIO_MAXIOV as usize;

/// One request of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Member {
    pub sector: u64,
    /// Data bytes (the request's share of the group's range).
    pub len: usize,
}

/// A group as it is issued: one vectored call at byte `start` over `iov`, then each member
/// (with its chain, same index) completed in order.
pub(crate) struct Parts<'a> {
    pub dir: Dir,
    pub start: u64,
    pub end: u64,
    pub iov: &'a mut [libc::iovec],
    pub members: &'a [Member],
    pub chains: &'a [Chain],
}

#[derive(Default)]
pub(crate) struct Group {
    dir: Option<Dir>,
    start: u64,
    end: u64,
    iov: Vec<libc::iovec>,
    members: Vec<Member>,
    /// The members' chains, in order; entries past `members.len()` are spare (kept for their
    /// buffers' capacity).
    chains: Vec<Chain>,
}

impl Group {
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether a request for `len` bytes at byte `off` in direction `dir`, with `niov` iovecs,
    /// may join: an empty group takes anything, else it must continue the group's range in
    /// the same direction and stay within [`MAX_BYTES`] and [`MAX_IOVS`].
    pub fn accepts(&self, dir: Dir, off: u64, len: usize, niov: usize) -> bool {
        let Some(d) = self.dir else {
            return true;
        };
        d == dir
            && off == self.end
            && self.iov.len() + niov <= MAX_IOVS
            && (self.end - self.start).saturating_add(len as u64) <= MAX_BYTES
    }

    /// Adds the request in `chain` (which gets a spare chain back in exchange) with its data
    /// iovecs `iov`. The caller checked [`Group::accepts`].
    pub fn push(&mut self, chain: &mut Chain, dir: Dir, sector: u64, iov: &[libc::iovec]) {
        let len: usize = iov.iter().map(|v| v.iov_len).sum();
        let off = sector * super::blk::SECTOR_SIZE;
        if self.dir.is_none() {
            self.dir = Some(dir);
            self.start = off;
            self.end = off;
        }
        self.end += len as u64;
        let n = self.members.len();
        if self.chains.len() == n {
            self.chains.push(Chain::default());
        }
        std::mem::swap(chain, &mut self.chains[n]);
        self.members.push(Member { sector, len });
        self.iov.extend_from_slice(iov);
    }

    /// The group's pieces for issuing it; None when empty.
    pub fn parts(&mut self) -> Option<Parts<'_>> {
        let n = self.members.len();
        Some(Parts {
            dir: self.dir?,
            start: self.start,
            end: self.end,
            iov: &mut self.iov,
            members: &self.members,
            chains: &self.chains[..n],
        })
    }

    /// The direction and first byte of a non-empty group.
    pub fn head(&self) -> Option<(Dir, u64)> {
        Some((self.dir?, self.start))
    }

    /// Bytes covered.
    pub fn bytes(&self) -> u64 {
        self.end - self.start
    }

    /// The members' iovecs, end to end.
    pub fn iovs(&self) -> &[libc::iovec] {
        &self.iov
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The members' chains (same index as [`Group::members`]).
    pub fn chains(&self) -> &[Chain] {
        &self.chains[..self.members.len()]
    }

    /// Byte range covered, `[start, end)`.
    #[cfg(test)]
    fn range(&self) -> (u64, u64) {
        (self.start, self.end)
    }

    /// Empties the group, keeping its buffers.
    pub fn clear(&mut self) {
        self.dir = None;
        self.iov.clear();
        self.members.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn joins_only_adjacent_same_direction_requests_within_the_caps() {
        let mut g = Group::default();
        let mut bufs = vec![vec![0u8; 4096]; 4];
        let mut chain = Chain::default();
        assert!(
            g.accepts(Dir::Write, 4096, 4096, 1),
            "an empty group takes anything"
        );
        chain.head = 7;
        g.push(&mut chain, Dir::Write, 8, &[iov(&mut bufs[0])]);
        assert_eq!(g.range(), (4096, 8192));
        assert!(g.accepts(Dir::Write, 8192, 4096, 1));
        assert!(!g.accepts(Dir::Read, 8192, 4096, 1), "other direction");
        assert!(!g.accepts(Dir::Write, 0, 4096, 1), "before the group");
        assert!(!g.accepts(Dir::Write, 4096, 4096, 1), "overlapping");
        assert!(!g.accepts(Dir::Write, 12288, 4096, 1), "a gap");
        assert!(
            !g.accepts(Dir::Write, 8192, MAX_BYTES as usize, 1),
            "over the byte cap"
        );
        assert!(
            !g.accepts(Dir::Write, 8192, 4096, MAX_IOVS),
            "over the iovec cap"
        );
        chain.head = 9;
        g.push(
            &mut chain,
            Dir::Write,
            16,
            &[iov(&mut bufs[1]), iov(&mut bufs[2])],
        );
        assert_eq!(g.range(), (4096, 16384));
        let p = g.parts().unwrap();
        assert_eq!((p.dir, p.start, p.end), (Dir::Write, 4096, 16384));
        assert_eq!(p.iov.len(), 3);
        assert_eq!(
            p.members,
            &[
                Member {
                    sector: 8,
                    len: 4096
                },
                Member {
                    sector: 16,
                    len: 8192
                }
            ]
        );
        assert_eq!(p.chains.iter().map(|c| c.head).collect::<Vec<_>>(), [7, 9]);
        g.clear();
        assert!(g.is_empty() && g.parts().is_none());
        assert!(g.accepts(Dir::Read, 0, 4096, 1), "empty again");
        chain.head = 3;
        g.push(&mut chain, Dir::Read, 0, &[iov(&mut bufs[3])]);
        let p = g.parts().unwrap();
        assert_eq!(p.members.len(), 1);
        assert_eq!(p.chains[0].head, 3, "spare chains are reused");
    }
}
