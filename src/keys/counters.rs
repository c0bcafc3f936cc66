//! Counters of the key layer: calls to KMS, local unwraps and data-key cache hits and misses.
//!
//! Providers and the cache share one [`KeyStats`] (behind an `Arc`); tests read a [`KeyStatsSnapshot`] to assert
//! how many KMS calls an operation cost, and metrics export the same numbers.
use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, updated with relaxed atomics (each counter is independent).
#[derive(Debug, Default)]
pub struct KeyStats {
    kms_generate: AtomicU64,
    kms_decrypt: AtomicU64,
    kms_generate_failed: AtomicU64,
    kms_decrypt_failed: AtomicU64,
    local_unwrap: AtomicU64,
    kms_reencrypt: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyStatsSnapshot {
    /// GenerateDataKey requests sent to KMS (successful or not).
    pub kms_generate: u64,
    /// Decrypt requests sent to KMS (successful or not).
    pub kms_decrypt: u64,
    /// GenerateDataKey requests that failed (KMS answered with an error or did not answer).
    pub kms_generate_failed: u64,
    /// Decrypt requests that failed.
    pub kms_decrypt_failed: u64,
    /// Unwraps done with the local master key (successful or not).
    pub local_unwrap: u64,
    /// ReEncrypt requests sent to KMS by a key rotation.
    pub kms_reencrypt: u64,
    /// Data keys served from the cache.
    pub cache_hits: u64,
    /// Data keys the cache did not have (each led to an unwrap, or waited for one in flight).
    pub cache_misses: u64,
}

impl KeyStats {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn snapshot(&self) -> KeyStatsSnapshot {
        KeyStatsSnapshot {
            kms_generate: self.kms_generate.load(Ordering::Relaxed),
            kms_decrypt: self.kms_decrypt.load(Ordering::Relaxed),
            kms_generate_failed: self.kms_generate_failed.load(Ordering::Relaxed),
            kms_decrypt_failed: self.kms_decrypt_failed.load(Ordering::Relaxed),
            local_unwrap: self.local_unwrap.load(Ordering::Relaxed),
            kms_reencrypt: self.kms_reencrypt.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            cache_misses: self.cache_misses.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_kms_reencrypt(&self) {
        self.kms_reencrypt.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_kms_generate(&self) {
        self.kms_generate.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_kms_decrypt(&self) {
        self.kms_decrypt.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_kms_generate_failed(&self) {
        self.kms_generate_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_kms_decrypt_failed(&self) {
        self.kms_decrypt_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_local_unwrap(&self) {
        self.local_unwrap.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_cache_hit(&self) {
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_cache_miss(&self) {
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
    }
}
