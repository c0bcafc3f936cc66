//! A bounded cache of decrypted blocks, keyed by (object version, block index).
//!
//! Keys name a [`super::codec::Version`], not a path: a new upload is a new version, so stale blocks can never be
//! served for new data; they simply age out. The bound is in bytes of blocks held, whatever block size each file
//! has (an object's header names its own, which need not be the mount's), so memory stays bounded however large
//! the files being read are.
//!
//! A block is usually a slice of the plaintext buffer of the GET that fetched it (one buffer per GET, decrypted in
//! place, no per-block allocation). Such a slice keeps its whole buffer alive, so a block found in the cache is
//! copied out of it the first time: blocks that readers come back to stop pinning their neighbours, and the
//! cache's memory stays within its bound plus the buffers of blocks not yet evicted in LRU order.
use bytes::Bytes;
use lru::LruCache;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The plaintext of one block: `range` of a shared, immutable buffer.
#[derive(Clone)]
pub struct Block {
    buf: Bytes,
    range: Range<usize>,
}

impl Block {
    /// A block with a buffer of its own.
    pub fn owned(data: Vec<u8>) -> Self {
        let range = 0..data.len();
        Block {
            buf: Bytes::from(data),
            range,
        }
    }

    /// Bytes `range` of `buf` (which may hold other blocks too).
    pub fn slice(buf: &Bytes, range: Range<usize>) -> Self {
        Block {
            buf: buf.clone(),
            range,
        }
    }

    /// Whether the buffer holds more than this block.
    fn pins_more(&self) -> bool {
        self.range.len() < self.buf.len()
    }

    /// Whether `next` follows this block directly in the same buffer.
    pub fn followed_by(&self, next: &Block) -> bool {
        self.buf.as_ptr() == next.buf.as_ptr() && self.buf.len() == next.buf.len() && self.range.end == next.range.start
    }

    /// Bytes from `from` in this block to `to` in `last`, without a copy; `None` unless `last` is this block or
    /// in the same buffer after it.
    pub fn span_to(&self, from: usize, last: &Block, to: usize) -> Option<Bytes> {
        let same = self.buf.as_ptr() == last.buf.as_ptr() && self.buf.len() == last.buf.len();
        let (start, end) = (self.range.start + from, last.range.start + to);
        (same && start <= end && to <= last.range.len()).then(|| self.buf.slice(start..end))
    }

    /// Bytes `from..to` of this block, without a copy.
    pub fn bytes(&self, from: usize, to: usize) -> Bytes {
        self.buf.slice(self.range.start + from..self.range.start + to)
    }
}

impl std::ops::Deref for Block {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the content.
        write!(f, "Block({} bytes)", self.range.len())
    }
}

pub struct BlockCache {
    inner: Mutex<LruCache<(u64, u64), Block>>,
    /// Bytes of blocks held at most (at least 16 of the mount's blocks).
    limit: u64,
    /// Lookups by [`BlockCache::get`] that found, and did not find, the block.
    hits: AtomicU64,
    misses: AtomicU64,
    /// Bytes of the blocks held (changed under the lock, read without it).
    bytes: AtomicU64,
}

impl BlockCache {
    /// A cache of at most `bytes` of blocks (at least 16 blocks of `block_len`).
    pub fn new(bytes: u64, block_len: u64) -> Self {
        BlockCache {
            inner: Mutex::new(LruCache::unbounded()),
            limit: bytes.max(16 * block_len),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// The block if cached; counted as a hit or a miss. A block found is copied out of a shared buffer (see the
    /// module comment).
    pub fn get(&self, version: u64, index: u64) -> Option<Block> {
        let found = self.find(version, index);
        self.count(found.is_some());
        found
    }

    /// [`get`](Self::get) without counting: for a lookup that may be made again by another path (the reads
    /// answered on a FUSE thread count theirs with [`count`](Self::count) only when they answer).
    pub fn find(&self, version: u64, index: u64) -> Option<Block> {
        self.lock().get_mut(&(version, index)).map(|block| {
            if block.pins_more() {
                *block = Block::owned(block.to_vec());
            }
            block.clone()
        })
    }

    /// Counts one lookup as a hit or a miss.
    pub fn count(&self, hit: bool) {
        let counter = if hit { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
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
        let mut inner = self.lock();
        let mut held = self.bytes.load(Ordering::Relaxed) + block.len() as u64;
        // `push` returns the entry it replaced, whose bytes leave the cache; then the least recently used go
        // until the bytes held are within the limit.
        if let Some((_, old)) = inner.push((version, index), block) {
            held -= old.len() as u64;
        }
        while held > self.limit && inner.len() > 1 {
            match inner.pop_lru() {
                Some((_, old)) => held -= old.len() as u64,
                None => break,
            }
        }
        self.bytes.store(held, Ordering::Relaxed);
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
            c.insert(1, i, Block::owned(vec![i as u8; 4096]));
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
            c.insert(1, i, Block::owned(vec![0; 100]));
        }
        c.insert(1, 19, Block::owned(vec![0; 40])); // replaces a block
        assert!(c.get(1, 19).is_some());
        assert!(c.get(1, 0).is_none(), "evicted");
        assert_eq!(c.stats(), (1, 2, 15 * 100 + 40));
    }

    #[test]
    fn a_block_found_stops_pinning_its_buffer() {
        let buf = Bytes::from(vec![1u8, 2, 3, 4, 5, 6]);
        let c = BlockCache::new(16 * 3, 3);
        c.insert(1, 0, Block::slice(&buf, 0..3));
        let found = c.get(1, 0).unwrap();
        assert!(
            !found.pins_more(),
            "copied out of the GET's buffer the first time it is found"
        );
        assert_eq!(&found[..], &[1, 2, 3]);
        let again = c.get(1, 0).unwrap();
        assert_eq!(again.as_ptr(), found.as_ptr(), "and not copied again");
    }

    #[test]
    fn the_bound_is_in_bytes_whatever_a_file_s_block_size() {
        // A mount of 4 KiB blocks with 64 KiB of cache, reading a file whose header names 64 KiB blocks.
        let c = BlockCache::new(16 * 4096, 4096);
        for i in 0..4 {
            c.insert(7, i, Block::owned(vec![i as u8; 65_536]));
        }
        assert_eq!(c.stats().2, 65_536, "one block of 64 KiB, not 16");
        assert!(c.contains(7, 3) && !c.contains(7, 2));
        // Small blocks push the large one out as they come in.
        for i in 0..16 {
            c.insert(8, i, Block::owned(vec![0; 4096]));
        }
        assert!(!c.contains(7, 3));
        assert_eq!(c.stats().2, 16 * 4096);
    }

    #[test]
    fn adjacent_slices_join_without_a_copy() {
        let buf = Bytes::from(vec![1u8, 2, 3, 4, 5, 6]);
        let (a, b) = (Block::slice(&buf, 0..3), Block::slice(&buf, 3..6));
        assert!(a.followed_by(&b) && !b.followed_by(&a));
        assert_eq!(&a.span_to(1, &b, 2).unwrap()[..], &[2, 3, 4, 5]);
        assert!(b.span_to(2, &a, 1).is_none(), "not in order");
        let other = Block::owned(vec![4, 5, 6]);
        assert!(!a.followed_by(&other));
        assert!(a.span_to(0, &other, 3).is_none(), "another buffer");
    }
}
