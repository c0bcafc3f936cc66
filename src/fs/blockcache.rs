//! A bounded cache of decrypted blocks, keyed by (object version, block index).
//!
//! Keys name a [`super::codec::Version`], not a path: a new upload is a new version, so stale blocks can never be
//! served for new data; they simply age out. The bound is in blocks (bytes / block size), so memory stays
//! bounded however large the files being read are.
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub type Block = Arc<Vec<u8>>;

pub struct BlockCache {
    inner: Mutex<LruCache<(u64, u64), Block>>,
    /// Lookups by [`BlockCache::get`] that found, and did not find, the block.
    hits: AtomicU64,
    misses: AtomicU64,
    /// Bytes of the blocks held (changed under the lock, read without it).
    bytes: AtomicU64,
}

impl BlockCache {
    /// A cache of at most `bytes / block_len` blocks (at least 16).
    pub fn new(bytes: u64, block_len: u64) -> Self {
        let n = (bytes / block_len.max(1)).max(16) as usize;
        BlockCache {
            inner: Mutex::new(LruCache::new(NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN))),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// The block if cached; counted as a hit or a miss.
    pub fn get(&self, version: u64, index: u64) -> Option<Block> {
        let found = self.lock().get(&(version, index)).cloned();
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// (hits, misses, bytes held).
    pub fn stats(&self) -> (u64, u64, u64) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (load(&self.hits), load(&self.misses), load(&self.bytes))
    }

    pub fn contains(&self, version: u64, index: u64) -> bool {
        self.lock().contains(&(version, index))
    }

    pub fn insert(&self, version: u64, index: u64, block: Block) {
        let added = block.len() as u64;
        let mut inner = self.lock();
        // `push` returns the entry it replaced or evicted, whose bytes leave the cache.
        let removed = inner
            .push((version, index), block)
            .map_or(0, |(_, old)| old.len() as u64);
        self.bytes.fetch_add(added, Ordering::Relaxed);
        self.bytes.fetch_sub(removed, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<(u64, u64), Block>> {
        // A poisoned lock only means another thread panicked while holding it; the cache is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_by_bytes() {
        let c = BlockCache::new(16 * 4096, 4096);
        for i in 0..32 {
            c.insert(1, i, Arc::new(vec![i as u8; 4096]));
        }
        assert!(!c.contains(1, 0));
        assert!(c.contains(1, 31));
        assert_eq!(c.get(1, 20).unwrap()[0], 20);
        assert!(c.get(2, 20).is_none());
    }

    #[test]
    fn counts_hits_misses_and_bytes_held() {
        let c = BlockCache::new(16 * 100, 100);
        assert!(c.get(1, 0).is_none());
        for i in 0..20 {
            c.insert(1, i, Arc::new(vec![0; 100]));
        }
        c.insert(1, 19, Arc::new(vec![0; 40])); // replaces a block
        assert!(c.get(1, 19).is_some());
        assert!(c.get(1, 0).is_none(), "evicted");
        assert_eq!(c.stats(), (1, 2, 15 * 100 + 40));
    }
}
