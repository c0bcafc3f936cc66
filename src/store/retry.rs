//! [`Retrying`]: retries [`StoreError::Transient`] errors of an inner store with capped exponential backoff and
//! jitter, a bounded number of times. Every other error returns at once.
//!
//! The SDK's own retries are switched off (see `s3::sdk_config`) so that this is the one place where retry policy
//! lives, the same for every store, and testable over [`super::memory::MemoryStore`] with injected faults.
//!
//! The budget is what one foreground request waits for S3 to come back: the default policy spends a few seconds
//! between attempts (see [`RetryPolicy::default`]), which rides out a restarting server or a short network blip.
//! Longer outages are the file system's business: it keeps unsaved data and retries in the background without a
//! bound, so nothing here needs to wait minutes. Time spent inside the attempts comes on top: each is bounded by
//! the S3 client's timeouts (`s3::Timeouts`), not by this policy.
//!
//! Retrying a write whose response was lost can surface as a different error the second time: a conditional PUT
//! (`If-None-Match: *`) then fails with `PreconditionFailed` against its own first write, and a repeated
//! CompleteMultipartUpload with `NotFound` (the upload is gone). The lost response also took the new ETag with it,
//! so callers that care have to read the object back and decide whose version it is.
use super::{
    ByteRange, CompletedPart, GetOutput, GetPieces, ListPage, Metadata, ObjectInfo, ObjectStore, PutCondition,
    StoreError, StoreResult,
};
use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;
use std::future::Future;
use std::ops::Range;
use std::time::Duration;

/// How often and how patiently to retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, including the first (at least 1).
    pub max_attempts: u32,
    /// The delay before the first retry; doubles with every retry.
    pub base_delay: Duration,
    /// The cap on one delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 8 attempts, 100 ms doubling to at most 2 s: the seven delays add up to 3.55–7.1 s (about 5.3 s on average)
    /// of waiting before giving up. That outlasts a server restart or a dropped connection pool, and is still short
    /// enough for one foreground request (a `stat`, a `read`) to wait; longer outages are retried in the
    /// background by the file system.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1-based): `min(max_delay, base_delay * 2^(retry-1))`, drawn
    /// uniformly from its upper half so that concurrent clients do not retry in lockstep.
    pub fn delay(&self, retry: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << (retry.saturating_sub(1)).min(20));
        let cap = exp.min(self.max_delay);
        let half = cap / 2;
        half + rand::thread_rng().gen_range(Duration::ZERO..=cap - half)
    }
}

/// An [`ObjectStore`] that retries transient errors of `S` under a [`RetryPolicy`].
#[derive(Debug)]
pub struct Retrying<S> {
    inner: S,
    policy: RetryPolicy,
    /// Attempts after the first, over all calls (for metrics).
    retries: std::sync::atomic::AtomicU64,
}

impl<S: ObjectStore> Retrying<S> {
    pub fn new(inner: S, policy: RetryPolicy) -> Self {
        Retrying {
            inner,
            policy,
            retries: Default::default(),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn policy(&self) -> RetryPolicy {
        self.policy
    }

    /// How many times a call was retried after a transient error, in all.
    pub fn retries(&self) -> u64 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `attempt` until it succeeds, fails with a non-transient error, or the attempts are used up.
    async fn run<T, F, Fut>(&self, op: &str, key: &str, mut attempt: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let max = self.policy.max_attempts.max(1);
        let mut n = 1;
        loop {
            match attempt().await {
                Err(StoreError::Transient(msg)) if n < max => {
                    let delay = self.policy.delay(n);
                    log::warn!("{op} {key}: transient error (attempt {n} of {max}), retrying in {delay:?}: {msg}");
                    tokio::time::sleep(delay).await;
                    self.retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    n += 1;
                }
                Err(StoreError::Transient(msg)) if max > 1 => {
                    return Err(StoreError::Transient(format!("{msg} (gave up after {max} attempts)")))
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for Retrying<S> {
    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        self.run("HEAD", key, || self.inner.head(key)).await
    }

    async fn get(&self, key: &str, range: Option<ByteRange>, if_match: Option<&str>) -> StoreResult<GetOutput> {
        self.run("GET", key, || self.inner.get(key, range, if_match)).await
    }

    async fn get_pieces(&self, key: &str, range: Option<ByteRange>, if_match: Option<&str>) -> StoreResult<GetPieces> {
        self.run("GET", key, || self.inner.get_pieces(key, range, if_match))
            .await
    }

    async fn put(&self, key: &str, body: Bytes, metadata: &Metadata, cond: PutCondition) -> StoreResult<ObjectInfo> {
        self.run("PUT", key, || self.inner.put(key, body.clone(), metadata, cond.clone()))
            .await
    }

    async fn create_multipart(&self, key: &str, metadata: &Metadata) -> StoreResult<String> {
        self.run("CreateMultipartUpload", key, || {
            self.inner.create_multipart(key, metadata)
        })
        .await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
    ) -> StoreResult<CompletedPart> {
        self.run("UploadPart", key, || {
            self.inner.upload_part(key, upload_id, part_number, body.clone())
        })
        .await
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        source_key: &str,
        source_range: Range<u64>,
        source_if_match: Option<&str>,
    ) -> StoreResult<CompletedPart> {
        self.run("UploadPartCopy", key, || {
            self.inner.upload_part_copy(
                key,
                upload_id,
                part_number,
                source_key,
                source_range.clone(),
                source_if_match,
            )
        })
        .await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        cond: PutCondition,
    ) -> StoreResult<String> {
        self.run("CompleteMultipartUpload", key, || {
            self.inner
                .complete_multipart(key, upload_id, parts.clone(), cond.clone())
        })
        .await
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<(String, String)>> {
        self.run("ListMultipartUploads", prefix, || {
            self.inner.list_multipart_uploads(prefix)
        })
        .await
    }

    async fn upload_part_file(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        path: &std::path::Path,
        len: u64,
    ) -> StoreResult<CompletedPart> {
        self.run("UploadPart", key, || {
            self.inner.upload_part_file(key, upload_id, part_number, path, len)
        })
        .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.run("AbortMultipartUpload", key, || {
            self.inner.abort_multipart(key, upload_id)
        })
        .await
    }

    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<&Metadata>,
        cond: PutCondition,
    ) -> StoreResult<String> {
        self.run("CopyObject", dest_key, || {
            self.inner.copy(source_key, dest_key, metadata, cond.clone())
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.run("DeleteObject", key, || self.inner.delete(key)).await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        let first = keys.first().map(String::as_str).unwrap_or("");
        self.run("DeleteObjects", first, || self.inner.delete_many(keys)).await
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<&str>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        self.run("ListObjectsV2", prefix, || {
            self.inner.list(prefix, delimiter, continuation, max_keys)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::failing::{FailingStore, FaultKind, OpKind, Rule, When};
    use crate::store::memory::MemoryStore;

    fn fast(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(4),
        }
    }

    fn store(max_attempts: u32) -> Retrying<FailingStore<MemoryStore>> {
        Retrying::new(FailingStore::new(MemoryStore::new()), fast(max_attempts))
    }

    #[tokio::test]
    async fn transient_errors_are_retried_until_success() {
        let s = store(6);
        s.inner()
            .add_rule(Rule::fail(OpKind::Put, When::Always, FaultKind::Transient).times(3));
        let info = s
            .put("k", Bytes::from_static(b"abc"), &Metadata::new(), PutCondition::None)
            .await
            .unwrap();
        assert_eq!(info.size, 3);
        let stats = s.inner().stats();
        assert_eq!((stats.count(OpKind::Put), stats.injected(OpKind::Put)), (4, 3));
        assert_eq!(
            stats.bytes_up(OpKind::Put),
            3,
            "only the attempt that reached the store sent the body"
        );
    }

    #[tokio::test]
    async fn attempts_are_bounded() {
        let s = store(3);
        s.inner()
            .add_rule(Rule::fail(OpKind::Head, When::Always, FaultKind::Transient));
        let err = s.head("k").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::Transient(m) if m.contains("3 attempts")),
            "{err:?}"
        );
        assert_eq!(s.inner().stats().count(OpKind::Head), 3);
    }

    #[tokio::test]
    async fn permanent_errors_return_at_once_typed() {
        let s = store(6);
        s.inner()
            .add_rule(Rule::fail(OpKind::Get, When::Nth(1), FaultKind::AccessDenied));
        assert!(matches!(s.get("k", None, None).await, Err(StoreError::AccessDenied(_))));
        assert!(matches!(s.get("k", None, None).await, Err(StoreError::NotFound(_))));
        assert_eq!(s.inner().stats().count(OpKind::Get), 2);
    }

    #[test]
    fn default_budget_is_several_seconds() {
        let p = RetryPolicy::default();
        assert_eq!(
            (p.max_attempts, p.base_delay, p.max_delay),
            (8, Duration::from_millis(100), Duration::from_secs(2))
        );
        for _ in 0..50 {
            let total: Duration = (1..p.max_attempts).map(|r| p.delay(r)).sum();
            assert!(
                total >= Duration::from_millis(3550) && total <= Duration::from_millis(7100),
                "{total:?}"
            );
        }
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let d1 = p.delay(1);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d3 = p.delay(3);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            let d9 = p.delay(9);
            assert!(
                d9 >= Duration::from_millis(500) && d9 <= Duration::from_secs(1),
                "{d9:?}"
            );
        }
    }
}
