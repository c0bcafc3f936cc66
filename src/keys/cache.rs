//! The data-key cache: unwrapped per-file keys, so that reading a file costs one KMS `Decrypt` while cached.
//!
//! An LRU bounded both by count ([`DEFAULT_CAPACITY`]) and by age ([`DEFAULT_TTL`]): an entry older than the TTL
//! is dropped on lookup and unwrapped again, which bounds how long a key stays usable after access to the KMS key
//! is revoked. Entries are keyed by the file id *and* the wrapped key, so a wrapped key copied into another file
//! cannot skip the provider's file-id binding through the cache. Values are `Arc<DataKey>`: a key is zeroized
//! when its last holder drops it (evicted entries are simply dropped).
//!
//! Concurrent misses for the same key are coalesced: the first caller unwraps while the others wait on a per-key
//! async lock and then find the key in the cache. The `std::sync::Mutex` guarding the LRU is never held across an
//! `.await`.
use super::counters::KeyStats;
use super::{DataKeyProvider, KeyError};
use crate::format::{DataKey, FileId};
use lru::LruCache;
use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default number of cached data keys.
pub const DEFAULT_CAPACITY: usize = 1024;
/// Default lifetime of a cached data key.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10 * 60);

type CacheKey = Vec<u8>;

struct Entry {
    key: Arc<DataKey>,
    inserted: Instant,
}

/// Bounded cache of unwrapped data keys. `Debug` shows sizes only.
pub struct DataKeyCache {
    entries: Mutex<LruCache<CacheKey, Entry>>,
    in_flight: Mutex<HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>>,
    ttl: Duration,
    stats: Arc<KeyStats>,
}

fn cache_key(file_id: &FileId, wrapped: &[u8]) -> CacheKey {
    let mut k = Vec::with_capacity(file_id.len() + wrapped.len());
    k.extend_from_slice(file_id);
    k.extend_from_slice(wrapped);
    k
}

impl DataKeyCache {
    /// A cache of at most `capacity` keys (at least 1) kept at most `ttl`.
    pub fn new(capacity: usize, ttl: Duration, stats: Arc<KeyStats>) -> Self {
        let cap = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        DataKeyCache {
            entries: Mutex::new(LruCache::new(cap)),
            in_flight: Mutex::new(HashMap::new()),
            ttl,
            stats,
        }
    }

    /// A cache with [`DEFAULT_CAPACITY`] and [`DEFAULT_TTL`].
    pub fn with_defaults(stats: Arc<KeyStats>) -> Self {
        Self::new(DEFAULT_CAPACITY, DEFAULT_TTL, stats)
    }

    /// Number of keys held now (expired ones included until looked up or evicted).
    pub fn len(&self) -> usize {
        self.lock_entries().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every cached key.
    pub fn clear(&self) {
        self.lock_entries().clear();
    }

    /// Caches a key that was just generated, so the writer does not need a `Decrypt` for it.
    pub fn insert(&self, file_id: &FileId, wrapped: &[u8], key: DataKey) -> Arc<DataKey> {
        let key = Arc::new(key);
        self.put(cache_key(file_id, wrapped), key.clone());
        key
    }

    /// The key for `wrapped` of file `file_id`: from the cache, or unwrapped by `provider` and cached.
    pub async fn get_or_unwrap(
        &self,
        provider: &dyn DataKeyProvider,
        file_id: &FileId,
        wrapped: &[u8],
    ) -> Result<Arc<DataKey>, KeyError> {
        let ck = cache_key(file_id, wrapped);
        if let Some(key) = self.lookup(&ck) {
            self.stats.count_cache_hit();
            return Ok(key);
        }
        self.stats.count_cache_miss();
        let gate = self.lock_in_flight().entry(ck.clone()).or_default().clone();
        let _turn = gate.lock().await;
        // Another caller may have unwrapped it while this one waited.
        let result = match self.lookup(&ck) {
            Some(key) => Ok(key),
            None => provider.unwrap(file_id, wrapped).await.map(|key| {
                let key = Arc::new(key);
                self.put(ck.clone(), key.clone());
                key
            }),
        };
        self.lock_in_flight().remove(&ck);
        result
    }

    fn lookup(&self, ck: &CacheKey) -> Option<Arc<DataKey>> {
        let mut entries = self.lock_entries();
        match entries.get(ck) {
            Some(e) if e.inserted.elapsed() < self.ttl => Some(e.key.clone()),
            Some(_) => {
                entries.pop(ck);
                None
            }
            None => None,
        }
    }

    fn put(&self, ck: CacheKey, key: Arc<DataKey>) {
        self.lock_entries().put(
            ck,
            Entry {
                key,
                inserted: Instant::now(),
            },
        );
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, LruCache<CacheKey, Entry>> {
        // A panic while holding the lock cannot leave the LRU half-updated in a way that matters: keep going.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl fmt::Debug for DataKeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries = self.lock_entries();
        f.debug_struct("DataKeyCache")
            .field("len", &entries.len())
            .field("capacity", &entries.cap())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::LocalProvider;

    fn setup(capacity: usize, ttl: Duration) -> (Arc<KeyStats>, LocalProvider, DataKeyCache) {
        let stats = Arc::new(KeyStats::new());
        let provider = LocalProvider::new(&[4; 32], "test-master", stats.clone());
        let cache = DataKeyCache::new(capacity, ttl, stats.clone());
        (stats, provider, cache)
    }

    #[tokio::test]
    async fn hits_after_first_unwrap() {
        let (stats, p, cache) = setup(8, DEFAULT_TTL);
        let (key, wrapped) = p.generate(&[1; 16]).await.unwrap();
        for _ in 0..10 {
            let got = cache.get_or_unwrap(&p, &[1; 16], &wrapped).await.unwrap();
            assert_eq!(got.as_bytes(), key.as_bytes());
        }
        let s = stats.snapshot();
        assert_eq!((s.local_unwrap, s.cache_misses, s.cache_hits), (1, 1, 9));
    }

    #[tokio::test]
    async fn bounded_by_count() {
        let (stats, p, cache) = setup(2, DEFAULT_TTL);
        let mut wrapped = Vec::new();
        for i in 0..3u8 {
            wrapped.push(p.generate(&[i; 16]).await.unwrap().1);
        }
        for (i, w) in wrapped.iter().enumerate() {
            cache.get_or_unwrap(&p, &[i as u8; 16], w).await.unwrap();
        }
        assert_eq!(cache.len(), 2);
        assert_eq!(stats.snapshot().local_unwrap, 3);
        // The most recent two are cached; the first was evicted and costs a new unwrap.
        cache.get_or_unwrap(&p, &[2; 16], &wrapped[2]).await.unwrap();
        assert_eq!(stats.snapshot().local_unwrap, 3);
        cache.get_or_unwrap(&p, &[0; 16], &wrapped[0]).await.unwrap();
        assert_eq!(stats.snapshot().local_unwrap, 4);
    }

    #[tokio::test]
    async fn bounded_by_age() {
        let (stats, p, cache) = setup(8, Duration::from_millis(50));
        let (_, wrapped) = p.generate(&[1; 16]).await.unwrap();
        cache.get_or_unwrap(&p, &[1; 16], &wrapped).await.unwrap();
        cache.get_or_unwrap(&p, &[1; 16], &wrapped).await.unwrap();
        assert_eq!(stats.snapshot().local_unwrap, 1);
        tokio::time::sleep(Duration::from_millis(80)).await;
        cache.get_or_unwrap(&p, &[1; 16], &wrapped).await.unwrap();
        assert_eq!(stats.snapshot().local_unwrap, 2);
    }

    #[tokio::test]
    async fn insert_avoids_unwrap_and_file_id_is_part_of_the_key() {
        let (stats, p, cache) = setup(8, DEFAULT_TTL);
        let (key, wrapped) = p.generate(&[1; 16]).await.unwrap();
        cache.insert(&[1; 16], &wrapped, key.clone());
        let got = cache.get_or_unwrap(&p, &[1; 16], &wrapped).await.unwrap();
        assert_eq!(got.as_bytes(), key.as_bytes());
        assert_eq!(stats.snapshot().local_unwrap, 0);
        // The same wrapped key under another file id is not served from the cache and fails the binding.
        assert!(matches!(
            cache.get_or_unwrap(&p, &[2; 16], &wrapped).await,
            Err(KeyError::WrongKey(_))
        ));
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let (stats, p, cache) = setup(8, DEFAULT_TTL);
        let other = LocalProvider::new(&[5; 32], "other-master", stats.clone());
        let (_, wrapped) = p.generate(&[1; 16]).await.unwrap();
        assert!(matches!(
            cache.get_or_unwrap(&other, &[1; 16], &wrapped).await,
            Err(KeyError::WrongKey(_))
        ));
        assert!(cache.is_empty() && cache.lock_in_flight().is_empty());
        cache.get_or_unwrap(&p, &[1; 16], &wrapped).await.unwrap();
        assert_eq!((stats.snapshot().local_unwrap, cache.len()), (2, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_coalesce() {
        let (stats, p, cache) = setup(8, DEFAULT_TTL);
        let (p, cache) = (Arc::new(p), Arc::new(cache));
        let (_, wrapped) = p.generate(&[1; 16]).await.unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (p, cache, w) = (p.clone(), cache.clone(), wrapped.clone());
                tokio::spawn(async move { cache.get_or_unwrap(p.as_ref(), &[1; 16], &w).await.map(|_| ()) })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(stats.snapshot().local_unwrap, 1);
    }
}
