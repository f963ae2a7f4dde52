//! KVM dirty-log bitmaps (one bit per 4 KiB page, little-endian u64 words) turned into the page
//! lists and runs that diff snapshots and migration rounds copy.

use serde::{Deserialize, Serialize};

pub const PAGE_SIZE: u64 = 4096;

/// `count` consecutive pages starting at page `first` (page indices within one region).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub first: u64,
    pub count: u64,
}

impl PageRun {
    pub fn byte_offset(&self) -> u64 {
        self.first * PAGE_SIZE
    }
    pub fn byte_len(&self) -> u64 {
        self.count * PAGE_SIZE
    }
}

/// Number of bitmap words for a region of `size` bytes.
pub fn bitmap_words(size: u64) -> usize {
    usize::try_from(size.div_ceil(PAGE_SIZE).div_ceil(64)).unwrap_or(usize::MAX)
}

/// Pages set in `bitmap`, limited to the `pages` the region has (KVM pads the last word).
pub fn dirty_pages(bitmap: &[u64], pages: u64) -> impl Iterator<Item = u64> + '_ {
    bitmap.iter().enumerate().flat_map(move |(w, &word)| {
        let base = w as u64 * 64;
        let mut bits = word;
        std::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let b = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            Some(base + b)
        })
        .filter(move |&p| p < pages)
    })
}

/// Number of dirty pages in `bitmap` (within `pages`).
pub fn count_dirty(bitmap: &[u64], pages: u64) -> u64 {
    let full = usize::try_from(pages / 64).unwrap_or(usize::MAX);
    let mut n: u64 = bitmap
        .iter()
        .take(full)
        .map(|w| u64::from(w.count_ones()))
        .sum();
    let rest = pages % 64;
    if rest != 0 {
        if let Some(w) = bitmap.get(full) {
            n += u64::from((w & ((1u64 << rest) - 1)).count_ones());
        }
    }
    n
}

/// Coalesces the dirty pages into runs, so a copy does one large write per run.
pub fn page_runs(bitmap: &[u64], pages: u64) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    for p in dirty_pages(bitmap, pages) {
        match runs.last_mut() {
            Some(r) if r.first + r.count == p => r.count += 1,
            _ => runs.push(PageRun { first: p, count: 1 }),
        }
    }
    runs
}

/// `acc |= other`, growing `acc` if needed: folds several dirty-log reads into one set.
pub fn merge(acc: &mut Vec<u64>, other: &[u64]) {
    if acc.len() < other.len() {
        acc.resize(other.len(), 0);
    }
    for (a, o) in acc.iter_mut().zip(other) {
        *a |= o;
    }
}

/// A bitmap with every page of a `size`-byte region set (the first migration round).
pub fn all_dirty(size: u64) -> Vec<u64> {
    let pages = size.div_ceil(PAGE_SIZE);
    let mut v = vec![u64::MAX; bitmap_words(size)];
    let rest = pages % 64;
    if rest != 0 {
        if let Some(last) = v.last_mut() {
            *last = (1u64 << rest) - 1;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_runs_from_bitmap() {
        // pages 0,1,2, 63, 64, 130 set; 200 set but beyond a 150-page region.
        let mut bm = vec![0u64; 4];
        for p in [0u64, 1, 2, 63, 64, 130, 200] {
            bm[(p / 64) as usize] |= 1 << (p % 64);
        }
        let pages: Vec<u64> = dirty_pages(&bm, 150).collect();
        assert_eq!(pages, vec![0, 1, 2, 63, 64, 130]);
        assert_eq!(count_dirty(&bm, 150), 6);
        assert_eq!(count_dirty(&bm, 256), 7);
        assert_eq!(
            page_runs(&bm, 150),
            vec![
                PageRun { first: 0, count: 3 },
                PageRun {
                    first: 63,
                    count: 2
                },
                PageRun {
                    first: 130,
                    count: 1
                },
            ]
        );
    }

    #[test]
    fn all_dirty_covers_exactly_the_region() {
        let size = 100 * PAGE_SIZE;
        let bm = all_dirty(size);
        assert_eq!(bm.len(), 2);
        assert_eq!(count_dirty(&bm, 100), 100);
        assert_eq!(dirty_pages(&bm, 1000).count(), 100);
        assert_eq!(
            page_runs(&bm, 100),
            vec![PageRun {
                first: 0,
                count: 100
            }]
        );
    }

    #[test]
    fn merge_ors_and_grows() {
        let mut a = vec![0b0101u64];
        merge(&mut a, &[0b0010, 0b1]);
        assert_eq!(a, vec![0b0111, 0b1]);
    }
}
