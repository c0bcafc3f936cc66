//! A bounded cache of decrypted blocks, keyed by (object version, block index).
//!
//! Keys name a [`super::codec::Version`], not a path: a new upload is a new version, so stale blocks can never be
//! served for new data; they simply age out. The bound is in blocks (bytes / block size), so memory stays
//! bounded however large the files being read are.
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

pub type Block = Arc<Vec<u8>>;

pub struct BlockCache {
    inner: Mutex<LruCache<(u64, u64), Block>>,
}

impl BlockCache {
    /// A cache of at most `bytes / block_len` blocks (at least 16).
    pub fn new(bytes: u64, block_len: u64) -> Self {
        let n = (bytes / block_len.max(1)).max(16) as usize;
        BlockCache {
            inner: Mutex::new(LruCache::new(NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN))),
        }
    }

    pub fn get(&self, version: u64, index: u64) -> Option<Block> {
        self.lock().get(&(version, index)).cloned()
    }

    pub fn contains(&self, version: u64, index: u64) -> bool {
        self.lock().contains(&(version, index))
    }

    pub fn insert(&self, version: u64, index: u64, block: Block) {
        self.lock().put((version, index), block);
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
}
