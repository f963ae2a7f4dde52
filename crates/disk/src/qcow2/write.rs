//! The qcow2 write path: in-place writes, cluster allocation with copy of partial clusters,
//! discard, resize and flush.

use super::refcount::Update;
use super::{header, Cluster, Qcow2, Run, COPIED, ZERO};
use crate::{check_range, BlockWrite, Discard, DiskError, Resizable, Result};

impl Qcow2 {
    fn ensure_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(DiskError::Invalid(format!(
                "{}: image was opened read-only",
                self.host.path.display()
            )))
        }
    }

    fn l1_index(&self, guest: u64) -> usize {
        (guest >> (self.cluster_bits + self.l2_bits)) as usize
    }

    fn l2_index(&self, guest: u64) -> usize {
        ((guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) as usize
    }

    /// The L2 table for `l1_index`, created if missing. Order: count it, zero it, point L1 at it.
    fn ensure_l2(&mut self, l1_index: usize) -> Result<u64> {
        if l1_index >= self.l1.len() {
            return Err(self.host.corrupt(
                self.h.l1_table_offset,
                format!("L1 index {l1_index} beyond the L1 table"),
            ));
        }
        let off = self.l2_offset(l1_index)?;
        if off != 0 {
            if self.l1[l1_index] & COPIED == 0 && self.refcount(off >> self.cluster_bits)? != 1 {
                return Err(self
                    .host
                    .unsupported("writing through an L2 table shared with a snapshot"));
            }
            self.load_l2(off)?;
            return Ok(off);
        }
        let new = self.alloc(1)?;
        let zeros = vec![0u8; self.cluster_size as usize];
        self.host.write(&zeros, new)?;
        self.note_written(new + self.cluster_size);
        self.l2.insert(new, vec![0u64; 1 << self.l2_bits]);
        self.l1[l1_index] = new | COPIED;
        let at = self.h.l1_table_offset + l1_index as u64 * 8;
        self.host.write(&self.l1[l1_index].to_be_bytes(), at)?;
        Ok(new)
    }

    /// Sets L2 entries `first..first+values.len()` of table `l2_off` and writes them in one go.
    fn set_l2_entries(&mut self, l2_off: u64, first: usize, values: &[u64]) -> Result<Vec<u64>> {
        let table = self
            .l2
            .get_mut(l2_off)
            .ok_or_else(|| DiskError::Invalid("L2 table evicted during update".into()))?;
        let old = table[first..first + values.len()].to_vec();
        table[first..first + values.len()].copy_from_slice(values);
        let mut raw = Vec::with_capacity(values.len() * 8);
        for v in values {
            raw.extend_from_slice(&v.to_be_bytes());
        }
        self.host.write(&raw, l2_off + first as u64 * 8)?;
        Ok(old)
    }

    /// Drops the host clusters that old L2 entries owned.
    fn release(&mut self, l2_off: u64, first: usize, old: &[u64]) -> Result<()> {
        for (i, e) in old.iter().enumerate() {
            match self.decode(*e, l2_off + (first + i) as u64 * 8)? {
                Cluster::Normal { host, .. }
                | Cluster::Zero {
                    prealloc: Some(host),
                } => self.free(host, 1)?,
                Cluster::Compressed { host, len } => {
                    let cs = self.cluster_size;
                    let a = host & !(cs - 1);
                    let b = (host + len).div_ceil(cs) * cs;
                    self.update_refcounts(a >> self.cluster_bits, (b - a) / cs, Update::Decrement)?;
                }
                Cluster::Unallocated | Cluster::Zero { prealloc: None } => {}
            }
        }
        if old.iter().any(|e| e & super::COMPRESSED != 0) {
            self.decompressed = None;
        }
        Ok(())
    }

    /// Writes `data` at guest `goff` into newly allocated clusters (within one L2 table).
    fn write_new(&mut self, goff: u64, data: &[u8], old_kind: Run) -> Result<()> {
        let cs = self.cluster_size;
        let c_first = goff & !(cs - 1);
        let end = goff + data.len() as u64;
        let c_end = end.div_ceil(cs) * cs;
        let n = (c_end - c_first) / cs;
        let l2_off = self.ensure_l2(self.l1_index(goff))?;
        let host = self.alloc(n)?;
        let head = (goff - c_first) as usize;
        let guest_end = c_end.min(self.h.size);
        let fresh_is_right = matches!(old_kind, Run::Zero);
        if fresh_is_right || (head == 0 && end >= guest_end) {
            // Fresh space past the end of the file already reads as zeros.
            self.host.write(data, host + head as u64)?;
            self.note_written(host + head as u64 + data.len() as u64);
        } else {
            let mut full = vec![0u8; (c_end - c_first) as usize];
            if head > 0 {
                self.read_inner(&mut full[..head], c_first)?;
            }
            if guest_end > end {
                let a = (end - c_first) as usize;
                let b = (guest_end - c_first) as usize;
                self.read_inner(&mut full[a..b], end)?;
            }
            full[head..head + data.len()].copy_from_slice(data);
            self.host.write(&full, host)?;
            self.note_written(host + full.len() as u64);
        }
        let values: Vec<u64> = (0..n).map(|i| (host + i * cs) | COPIED).collect();
        let first = self.l2_index(goff);
        let old = self.set_l2_entries(l2_off, first, &values)?;
        self.release(l2_off, first, &old)
    }

    /// Makes whole clusters `[start, start+len)` read as zeros, dropping their storage.
    /// `unmap` leaves them unallocated (only correct without a backing file or past its end).
    fn zero_clusters(&mut self, start: u64, len: u64, unmap: bool) -> Result<()> {
        let cs = self.cluster_size;
        let mut pos = start;
        let end = start + len;
        while pos < end {
            let table_span = cs << self.l2_bits;
            let chunk_end = ((pos / table_span) + 1) * table_span;
            let chunk_end = chunk_end.min(end);
            let n = ((chunk_end - pos) / cs) as usize;
            let l1_index = self.l1_index(pos);
            let has_table = l1_index < self.l1.len() && self.l2_offset(l1_index)? != 0;
            let value = if unmap || (self.backing.is_none() && self.h.version < 3) {
                0
            } else if self.h.version >= 3 {
                ZERO
            } else {
                // Version 2 with a backing file cannot say "zero": store zeros.
                let zeros = vec![0u8; (chunk_end - pos) as usize];
                self.write_at(&zeros, pos)?;
                pos = chunk_end;
                continue;
            };
            if !has_table && (value == 0 || self.backing.is_none()) {
                pos = chunk_end;
                continue;
            }
            let l2_off = self.ensure_l2(l1_index)?;
            let first = self.l2_index(pos);
            let old = self.set_l2_entries(l2_off, first, &vec![value; n])?;
            self.release(l2_off, first, &old)?;
            pos = chunk_end;
        }
        Ok(())
    }

    /// Writes zeros over a partial cluster unless it already reads as zeros.
    fn zero_partial(&mut self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (run, rlen) = self.run(offset, len)?;
        if run == Run::Zero && rlen >= len {
            return Ok(());
        }
        self.write_at(&vec![0u8; len as usize], offset)
    }

    fn set_size(&mut self, size: u64) -> Result<()> {
        self.host.write(&size.to_be_bytes(), header::field::SIZE)?;
        self.h.size = size;
        Ok(())
    }

    /// Replaces the L1 table by a larger one at the end of the file.
    fn grow_l1(&mut self, entries: usize) -> Result<()> {
        let cs = self.cluster_size;
        if entries as u64 * 8 > header::MAX_L1_BYTES {
            return Err(DiskError::Invalid(format!(
                "{}: size needs an L1 table of {entries} entries, beyond the qcow2 limit",
                self.host.path.display()
            )));
        }
        let clusters = (entries as u64 * 8).div_ceil(cs);
        let new_off = self.alloc(clusters)?;
        let mut raw = vec![0u8; (clusters * cs) as usize];
        for (i, e) in self.l1.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.host.write(&raw, new_off)?;
        self.note_written(new_off + raw.len() as u64);
        self.host.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new_off.to_be_bytes());
        self.host.write(&hdr, header::field::L1_SIZE)?;
        let old_off = self.h.l1_table_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        self.h.l1_table_offset = new_off;
        self.h.l1_size = entries as u32;
        self.l1.resize(entries, 0);
        if old_clusters > 0 {
            self.free(old_off, old_clusters)?;
        }
        Ok(())
    }
}

impl BlockWrite for Qcow2 {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.ensure_writable()?;
        check_range(&self.host.path, offset, buf.len() as u64, self.h.size)?;
        let mut pos = 0usize;
        while pos < buf.len() {
            let goff = offset + pos as u64;
            // write_new works inside one L2 table.
            let table_span = self.cluster_size << self.l2_bits;
            let to_table_end = table_span - (goff & (table_span - 1));
            let (run, len) = self.run(goff, ((buf.len() - pos) as u64).min(to_table_end))?;
            let len = len as usize;
            match run {
                Run::Data { host, copied: true } => {
                    self.host.write(&buf[pos..pos + len], host)?;
                    self.note_written(host + len as u64);
                }
                other => self.write_new(goff, &buf[pos..pos + len], other)?,
            }
            pos += len;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        self.host.sync()
    }
}

impl Discard for Qcow2 {
    fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.ensure_writable()?;
        check_range(&self.host.path, offset, len, self.h.size)?;
        let cs = self.cluster_size;
        let end = offset + len;
        let a = offset.div_ceil(cs) * cs;
        // A partial last cluster at the end of the disk counts as whole.
        let b = if end == self.h.size {
            end.div_ceil(cs) * cs
        } else {
            end & !(cs - 1)
        };
        if a >= b {
            return self.zero_partial(offset, len);
        }
        self.zero_partial(offset, a - offset)?;
        self.zero_clusters(a, b - a, false)?;
        if end > b {
            self.zero_partial(b, end - b)?;
        }
        Ok(())
    }
}

impl Resizable for Qcow2 {
    fn resize(&mut self, new_size: u64) -> Result<()> {
        self.ensure_writable()?;
        let old = self.h.size;
        let cs = self.cluster_size;
        if new_size > old {
            let span = cs << self.l2_bits;
            let needed = new_size.div_ceil(span) as usize;
            if needed > self.l1.len() {
                self.grow_l1(needed)?;
            }
            // Bytes past the old end inside its last cluster must read as zeros.
            let tail_end = old.div_ceil(cs) * cs;
            self.set_size(new_size)?;
            if tail_end > old {
                self.zero_partial(old, tail_end.min(new_size) - old)?;
            }
        } else if new_size < old {
            let a = new_size.div_ceil(cs) * cs;
            let b = old.div_ceil(cs) * cs;
            if b > a {
                self.zero_clusters(a, b - a, true)?;
            }
            self.set_size(new_size)?;
        }
        self.host.sync()
    }
}

impl Qcow2 {
    /// Extends the host file by `bytes` past the allocation point without allocating anything,
    /// so a long sequential fill (convert) writes inside the file instead of growing it with
    /// every request. The space reads as zeros; [`Qcow2::trim_tail`] gives back what is unused.
    pub fn reserve_tail(&mut self, bytes: u64) -> Result<()> {
        self.ensure_writable()?;
        let want = self.next_free.saturating_add(bytes);
        if want > self.host.len()? {
            self.host.set_len(want)?;
        }
        Ok(())
    }

    /// Cuts the host file back to the last byte written (undoing [`Qcow2::reserve_tail`]).
    pub fn trim_tail(&mut self) -> Result<()> {
        self.ensure_writable()?;
        if self.host.len()? > self.file_len {
            self.host.set_len(self.file_len)?;
        }
        Ok(())
    }

    /// The refcount of the cluster at host offset `host` (for tests and check).
    pub fn host_refcount(&mut self, host: u64) -> Result<u64> {
        self.refcount(host >> self.cluster_bits)
    }
}
