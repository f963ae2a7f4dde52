//! Refcount table and blocks: lookup, update, and the cluster allocator that depends on them.

use super::Qcow2;
use crate::Result;

#[derive(Clone, Copy)]
pub(super) enum Update {
    Set(u64),
    Decrement,
}

impl Qcow2 {
    fn refcount_width(&self) -> u32 {
        1 << self.h.refcount_order
    }

    /// log2 of the number of entries in one refcount block.
    fn rb_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.h.refcount_order
    }

    pub(super) fn max_refcount(&self) -> u64 {
        let w = self.refcount_width();
        if w == 64 {
            u64::MAX
        } else {
            (1u64 << w) - 1
        }
    }

    fn entry_get(&self, block: &[u8], i: usize) -> u64 {
        let w = self.refcount_width() as usize;
        if w >= 8 {
            let b = w / 8;
            block[i * b..i * b + b]
                .iter()
                .fold(0u64, |a, x| (a << 8) | *x as u64)
        } else {
            let per = 8 / w;
            ((block[i / per] >> ((i % per) * w)) as u64) & ((1 << w) - 1)
        }
    }

    /// Sets entry `i`; returns the byte range that changed.
    fn entry_set(&self, block: &mut [u8], i: usize, v: u64) -> (usize, usize) {
        let w = self.refcount_width() as usize;
        if w >= 8 {
            let b = w / 8;
            for k in 0..b {
                block[i * b + k] = (v >> (8 * (b - 1 - k))) as u8;
            }
            (i * b, i * b + b)
        } else {
            let per = 8 / w;
            let shift = (i % per) * w;
            let mask = (((1u16 << w) - 1) as u8) << shift;
            block[i / per] = (block[i / per] & !mask) | (((v as u8) << shift) & mask);
            (i / per, i / per + 1)
        }
    }

    /// Host offset of refcount block `rt_index`, loaded into the cache; 0 if there is none.
    fn refblock(&mut self, rt_index: usize) -> Result<u64> {
        let Some(&entry) = self.reftable.get(rt_index) else {
            return Ok(0);
        };
        let off = entry & super::OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let entry_off = self.h.refcount_table_offset + rt_index as u64 * 8;
        if off & (self.cluster_size - 1) != 0 || off >= self.file_len {
            return Err(self.host.corrupt(
                entry_off,
                format!(
                    "refcount table entry points to {off:#x} (unaligned or past the end of the file, {:#x})",
                    self.file_len
                ),
            ));
        }
        if !self.refblocks.contains_key(&off) {
            if self.refblocks.len() >= 256 {
                self.refblocks.clear();
            }
            let mut b = vec![0u8; self.cluster_size as usize];
            self.host.read_exact(&mut b, off, "refcount block")?;
            self.refblocks.insert(off, b);
        }
        Ok(off)
    }

    /// Removes a refcount block from the cache for modification (reading it if evicted).
    fn take_block(&mut self, off: u64) -> Result<Vec<u8>> {
        if let Some(b) = self.refblocks.remove(&off) {
            return Ok(b);
        }
        let mut b = vec![0u8; self.cluster_size as usize];
        self.host.read_exact(&mut b, off, "refcount block")?;
        Ok(b)
    }

    pub(super) fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let rb_bits = self.rb_bits();
        let off = self.refblock((cluster >> rb_bits) as usize)?;
        if off == 0 {
            return Ok(0);
        }
        let i = (cluster & ((1 << rb_bits) - 1)) as usize;
        Ok(self.refblocks.get(&off).map_or(0, |b| self.entry_get(b, i)))
    }

    /// Updates refcounts of clusters `first..first+n`, allocating refcount blocks as needed,
    /// and writes each changed span to disk.
    pub(super) fn update_refcounts(&mut self, first: u64, n: u64, u: Update) -> Result<()> {
        let rb_bits = self.rb_bits();
        let mut c = first;
        let end = first + n;
        while c < end {
            let rt_index = (c >> rb_bits) as usize;
            let block_end = ((rt_index as u64 + 1) << rb_bits).min(end);
            let off = self.ensure_refblock(rt_index)?;
            let max = self.max_refcount();
            let mut block = self.take_block(off)?;
            let (mut lo, mut hi) = (usize::MAX, 0);
            let mut err = None;
            for cl in c..block_end {
                let i = (cl & ((1 << rb_bits) - 1)) as usize;
                let old = self.entry_get(&block, i);
                let new = match u {
                    Update::Set(v) => v.min(max),
                    Update::Decrement => {
                        if old == 0 {
                            err = Some(cl);
                            0
                        } else {
                            old - 1
                        }
                    }
                };
                let (a, b) = self.entry_set(&mut block, i, new);
                lo = lo.min(a);
                hi = hi.max(b);
            }
            let write = self.host.write(&block[lo..hi], off + lo as u64);
            self.refblocks.insert(off, block);
            write?;
            if let Some(cl) = err {
                return Err(self.host.corrupt(
                    cl << self.cluster_bits,
                    "freeing a cluster whose refcount is already 0",
                ));
            }
            c = block_end;
        }
        Ok(())
    }

    /// Returns refcount block `rt_index`, creating it (and growing the table) if missing.
    fn ensure_refblock(&mut self, rt_index: usize) -> Result<u64> {
        let off = self.refblock(rt_index)?;
        if off != 0 {
            return Ok(off);
        }
        if rt_index >= self.reftable.len() {
            self.grow_reftable(rt_index + 1)?;
            // Counting the new table may itself have created this block.
            let off = self.refblock(rt_index)?;
            if off != 0 {
                return Ok(off);
            }
        }
        let blk = self.take_fresh(1);
        let self_cluster = blk >> self.cluster_bits;
        let rb_bits = self.rb_bits();
        let mut data = vec![0u8; self.cluster_size as usize];
        let covers_itself = (self_cluster >> rb_bits) as usize == rt_index;
        if covers_itself {
            let i = (self_cluster & ((1 << rb_bits) - 1)) as usize;
            self.entry_set(&mut data, i, 1);
        }
        self.host.write(&data, blk)?;
        self.note_written(blk + self.cluster_size);
        self.refblocks.insert(blk, data);
        if !covers_itself {
            // Count the new block before anything points at it.
            self.update_refcounts(self_cluster, 1, Update::Set(1))?;
        }
        self.reftable[rt_index] = blk;
        if rt_index < self.reftable_disk_entries {
            let at = self.h.refcount_table_offset + rt_index as u64 * 8;
            self.host.write(&blk.to_be_bytes(), at)?;
        }
        Ok(blk)
    }

    /// Moves the refcount table to a larger place at the end of the file.
    fn grow_reftable(&mut self, min_entries: usize) -> Result<()> {
        let cs = self.cluster_size;
        let entries = (min_entries as u64).max(self.reftable.len() as u64 * 2);
        let clusters = (entries * 8).div_ceil(cs);
        if clusters * cs > super::header::MAX_REFTABLE_BYTES {
            return Err(self
                .host
                .unsupported("image too large for its refcount table (use larger clusters)"));
        }
        let new_off = self.take_fresh(clusters);
        self.reftable.resize((clusters * cs / 8) as usize, 0);
        self.update_refcounts(new_off >> self.cluster_bits, clusters, Update::Set(1))?;
        let mut raw = Vec::with_capacity((clusters * cs) as usize);
        for e in &self.reftable {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.host.write(&raw, new_off)?;
        self.note_written(new_off + raw.len() as u64);
        // The new table must be durable before the header points at it.
        self.host.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        self.host
            .write(&hdr, super::header::field::REFCOUNT_TABLE_OFFSET)?;
        let (old_off, old_clusters) = (
            self.h.refcount_table_offset,
            self.h.refcount_table_clusters as u64,
        );
        self.h.refcount_table_offset = new_off;
        self.h.refcount_table_clusters = clusters as u32;
        self.reftable_disk_entries = self.reftable.len();
        self.update_refcounts(old_off >> self.cluster_bits, old_clusters, Update::Set(0))?;
        Ok(())
    }

    /// Reserves `n` fresh clusters past the end of the file (not yet counted).
    pub(super) fn take_fresh(&mut self, n: u64) -> u64 {
        let off = self.next_free;
        self.next_free += n * self.cluster_size;
        off
    }

    pub(super) fn note_written(&mut self, end: u64) {
        self.file_len = self.file_len.max(end);
    }

    /// Allocates `n` contiguous clusters and counts them; returns the first host offset.
    pub(super) fn alloc(&mut self, n: u64) -> Result<u64> {
        let off = self.take_fresh(n);
        self.update_refcounts(off >> self.cluster_bits, n, Update::Set(1))?;
        Ok(off)
    }

    /// Drops one reference to each of `n` clusters from `host`; clusters that become free are
    /// punched out of the file so discarded space is returned.
    pub(super) fn free(&mut self, host: u64, n: u64) -> Result<()> {
        let first = host >> self.cluster_bits;
        self.update_refcounts(first, n, Update::Decrement)?;
        for c in first..first + n {
            if self.refcount(c)? == 0 {
                self.host
                    .punch_hole(c << self.cluster_bits, self.cluster_size)?;
            }
        }
        Ok(())
    }
}
