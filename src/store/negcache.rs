//! The negative-lookup cache (seed 003): one bit per prefix bucket of SHA-1
//! space, set when some chunk with that prefix exists. A clear bit proves a
//! chunk is absent without touching redb, which is the common case for new
//! data. A set bit only means "look in the index".
//!
//! Invariant: every chunk in the index (or being written) has its bit set.
//! The cache is rebuilt from the index at open and when it grows; it is never
//! persisted, so it can never be the source of truth.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::format::ChunkId;

pub struct NegCache {
    words: Vec<AtomicU64>,
    bits_log2: u32,
    inserted: AtomicU64,
}

/// Bits per expected chunk: at 16 the false-positive rate stays near 6%.
const BITS_PER_CHUNK: u64 = 16;
const MIN_BITS_LOG2: u32 = 23; // 1 MiB

impl NegCache {
    /// A cache sized for `expected` chunks.
    pub fn with_capacity(expected: u64) -> NegCache {
        let want = expected
            .saturating_mul(BITS_PER_CHUNK)
            .max(1 << MIN_BITS_LOG2);
        let bits_log2 = 64 - (want - 1).leading_zeros();
        let words = (1usize << bits_log2) / 64;
        NegCache {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            bits_log2,
            inserted: AtomicU64::new(0),
        }
    }

    fn bit(&self, id: &ChunkId) -> (usize, u64) {
        let b = id.prefix_u64() >> (64 - self.bits_log2);
        ((b / 64) as usize, 1u64 << (b % 64))
    }

    /// False means the chunk is certainly not stored.
    pub fn may_contain(&self, id: &ChunkId) -> bool {
        let (w, m) = self.bit(id);
        self.words[w].load(Ordering::Relaxed) & m != 0
    }

    pub fn insert(&self, id: &ChunkId) {
        let (w, m) = self.bit(id);
        if self.words[w].fetch_or(m, Ordering::Relaxed) & m == 0 {
            self.inserted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// True once the cache is full enough that it should be rebuilt larger.
    pub fn wants_growth(&self) -> bool {
        let bits = 1u64 << self.bits_log2;
        self.inserted.load(Ordering::Relaxed) * (BITS_PER_CHUNK / 2) > bits
    }

    pub fn size_bytes(&self) -> usize {
        self.words.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_ids_are_found_and_most_others_are_not() {
        let c = NegCache::with_capacity(10_000);
        let ids: Vec<ChunkId> = (0u32..10_000)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .collect();
        for id in &ids {
            c.insert(id);
        }
        assert!(ids.iter().all(|id| c.may_contain(id)));
        let false_pos = (10_000u32..20_000)
            .filter(|i| c.may_contain(&ChunkId::of(&i.to_le_bytes())))
            .count();
        assert!(false_pos < 1_000, "{false_pos} false positives");
    }

    #[test]
    fn grows_when_full() {
        let c = NegCache::with_capacity(0);
        assert!(!c.wants_growth());
        for i in 0u32..2_000_000 {
            c.insert(&ChunkId::of(&i.to_le_bytes()));
        }
        assert!(c.wants_growth());
    }
}
