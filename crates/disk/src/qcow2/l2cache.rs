//! A bounded cache of L2 tables, keyed by host offset. Entries are written through to disk by
//! the caller, so eviction never loses anything and needs no write-back.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// Keys are cluster-aligned host offsets, already well spread; SipHash would cost more than
/// the lookup it protects on the random-read path (no untrusted party picks the key set
/// adversarially beyond the image itself, whose table count is bounded by the cache size).
#[derive(Default)]
pub struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | *b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type FastMap<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;

pub struct L2Cache {
    tables: FastMap<Vec<u64>>,
    order: VecDeque<u64>,
    capacity: usize,
}

impl L2Cache {
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            tables: FastMap::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn contains(&self, off: u64) -> bool {
        self.tables.contains_key(&off)
    }

    pub fn get(&self, off: u64) -> Option<&[u64]> {
        self.tables.get(&off).map(|t| &t[..])
    }

    pub fn get_mut(&mut self, off: u64) -> Option<&mut Vec<u64>> {
        self.tables.get_mut(&off)
    }

    /// Inserts a table, evicting the oldest one when full (first in, first out: simple, and
    /// sequential and random access both behave predictably).
    pub fn insert(&mut self, off: u64, table: Vec<u64>) {
        if self.tables.insert(off, table).is_none() {
            self.order.push_back(off);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.tables.remove(&old);
            }
        }
    }

    pub fn remove(&mut self, off: u64) {
        if self.tables.remove(&off).is_some() {
            self.order.retain(|o| *o != off);
        }
    }
}
