//! [`FailingStore`]: a wrapper around any [`ObjectStore`] that counts requests and bytes per operation and,
//! when given [`Rule`]s, injects errors or latency.
//!
//! Two uses:
//! - **Accounting.** Wrapped around the real S3 store with no rules, it tells a test how many requests and bytes
//!   an action cost ("an append of 4 KiB to a 100 MiB file costs one UploadPartCopy and no GET"). Counting is a
//!   few relaxed atomic additions; with no rules the rule list is never locked.
//! - **Fault injection.** A rule matches calls by operation kind (or any) and optionally by key, fires on the
//!   n-th matching call, from the n-th on, always, or with a seeded probability (reproducible), at most a given
//!   number of times, and either fails the call before it reaches the inner store, fails it after the inner
//!   store succeeded (a lost response: the write happened, the caller sees an error), or delays it.
//!
//! Counts are per call of the wrapper, including calls failed by a rule. Bytes are counted only for calls that
//! reach the inner store: `bytes_up` is the body of a PUT or UploadPart, `bytes_down` the data a GET returned,
//! `bytes_copied` the source range of an UploadPartCopy (server-side, not over the wire). Counts are of store
//! calls, not of HTTP requests: `S3Store` follows a GET of a range of an empty object (S3 answers 416) with a HEAD
//! that counts as part of that one call. CompleteMultipartUpload and CopyObject are one request each.
use super::{
    ByteRange, CompletedPart, GetOutput, GetPieces, ListPage, Metadata, ObjectInfo, ObjectStore, PutCondition,
    StoreError, StoreResult,
};
use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The kind of one [`ObjectStore`] call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    Head,
    Get,
    Put,
    CreateMultipart,
    UploadPart,
    UploadPartCopy,
    Complete,
    Abort,
    Copy,
    Delete,
    DeleteMany,
    List,
}

impl OpKind {
    pub const ALL: [OpKind; 12] = [
        OpKind::Head,
        OpKind::Get,
        OpKind::Put,
        OpKind::CreateMultipart,
        OpKind::UploadPart,
        OpKind::UploadPartCopy,
        OpKind::Complete,
        OpKind::Abort,
        OpKind::Copy,
        OpKind::Delete,
        OpKind::DeleteMany,
        OpKind::List,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The S3 API name of the operation (a metric label: a fixed set, never a key).
    pub fn api_name(self) -> &'static str {
        match self {
            OpKind::Head => "HeadObject",
            OpKind::Get => "GetObject",
            OpKind::Put => "PutObject",
            OpKind::CreateMultipart => "CreateMultipartUpload",
            OpKind::UploadPart => "UploadPart",
            OpKind::UploadPartCopy => "UploadPartCopy",
            OpKind::Complete => "CompleteMultipartUpload",
            OpKind::Abort => "AbortMultipartUpload",
            OpKind::Copy => "CopyObject",
            OpKind::Delete => "DeleteObject",
            OpKind::DeleteMany => "DeleteObjects",
            OpKind::List => "ListObjectsV2",
        }
    }
}

/// Told about every call that [`FailingStore`] counts, with its outcome and how long it took (for metrics).
pub trait Observer: Send + Sync {
    fn call(&self, op: OpKind, result: Result<(), &StoreError>, elapsed: Duration);
}

/// Which error a rule injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Transient,
    AccessDenied,
    NotFound,
    NoSuchBucket,
    PreconditionFailed,
    InvalidRange,
    InvalidRequest,
    Other,
}

impl FaultKind {
    fn error(self, op: OpKind, key: &str) -> StoreError {
        let msg = format!("injected fault on {op:?} {key}");
        match self {
            FaultKind::Transient => StoreError::Transient(msg),
            FaultKind::AccessDenied => StoreError::AccessDenied(msg),
            FaultKind::NotFound => StoreError::NotFound(msg),
            FaultKind::NoSuchBucket => StoreError::NoSuchBucket(msg),
            FaultKind::PreconditionFailed => StoreError::PreconditionFailed(msg),
            FaultKind::InvalidRange => StoreError::InvalidRange(msg),
            FaultKind::InvalidRequest => StoreError::InvalidRequest(msg),
            FaultKind::Other => StoreError::Other(msg),
        }
    }
}

/// When a rule fires, counted over the calls the rule matches (1-based).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum When {
    /// Only the n-th matching call.
    Nth(u64),
    /// The n-th matching call and every one after it.
    From(u64),
    /// Every matching call.
    Always,
    /// Each matching call with probability `p`, drawn from a generator seeded with `seed` (reproducible for a
    /// given order of calls).
    Probability { p: f64, seed: u64 },
}

/// What a rule does when it fires.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Action {
    /// Fail the call without reaching the inner store.
    Fail(FaultKind),
    /// Forward the call, then fail it even if the inner store succeeded (the response was lost).
    FailAfter(FaultKind),
    /// Wait this long before forwarding the call.
    Delay(Duration),
    /// Forward the call, then wait this long before answering (a slow response: the store has already changed).
    DelayAfter(Duration),
    /// Panic in the calling task instead of forwarding the call: a bug below the caller (in a client library,
    /// say), which ends the caller's task.
    Panic,
    /// Forward the call, then panic in the calling task: the store took the call, and the caller's task ended
    /// before it saw the answer (a bug in reading the response, say).
    PanicAfter,
}

/// One fault-injection rule. Build with [`Rule::new`] or [`Rule::fail`] and refine with the builder methods.
#[derive(Clone, Debug)]
pub struct Rule {
    op: Option<OpKind>,
    key_contains: Option<String>,
    when: When,
    action: Action,
    limit: Option<u64>,
}

impl Rule {
    /// A rule on calls of kind `op` (`None`: every kind).
    pub fn new(op: Option<OpKind>, when: When, action: Action) -> Self {
        Rule {
            op,
            key_contains: None,
            when,
            action,
            limit: None,
        }
    }

    /// Shorthand: fail calls of kind `op` with `kind` when `when` says.
    pub fn fail(op: OpKind, when: When, kind: FaultKind) -> Self {
        Rule::new(Some(op), when, Action::Fail(kind))
    }

    /// Only calls whose key (for copies: the destination; for batch deletes: the first key) contains `s`.
    pub fn key_contains(mut self, s: impl Into<String>) -> Self {
        self.key_contains = Some(s.into());
        self
    }

    /// Fire at most `n` times.
    pub fn times(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }
}

struct RuleState {
    rule: Rule,
    matched: u64,
    fired: u64,
    rng: Option<StdRng>,
}

impl RuleState {
    fn new(rule: Rule) -> Self {
        let rng = match rule.when {
            When::Probability { seed, .. } => Some(StdRng::seed_from_u64(seed)),
            _ => None,
        };
        RuleState {
            rule,
            matched: 0,
            fired: 0,
            rng,
        }
    }

    /// Whether this rule fires for this call; updates the rule's counters.
    fn fires(&mut self, op: OpKind, key: &str) -> bool {
        if self.rule.op.is_some_and(|o| o != op) || self.rule.key_contains.as_deref().is_some_and(|s| !key.contains(s))
        {
            return false;
        }
        self.matched += 1;
        if self.rule.limit.is_some_and(|l| self.fired >= l) {
            return false;
        }
        let fire = match self.rule.when {
            When::Nth(n) => self.matched == n,
            When::From(n) => self.matched >= n,
            When::Always => true,
            When::Probability { p, .. } => self.rng.as_mut().is_some_and(|r| r.gen_bool(p.clamp(0.0, 1.0))),
        };
        self.fired += u64::from(fire);
        fire
    }
}

/// What the rules decided for one call.
#[derive(Default)]
struct Plan {
    delay: Duration,
    delay_after: Duration,
    before: Option<FaultKind>,
    after: Option<FaultKind>,
    panic: bool,
    panic_after: bool,
}

#[derive(Default)]
struct OpCounters {
    count: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    bytes_copied: AtomicU64,
    errors: AtomicU64,
    injected: AtomicU64,
}

/// Counters of one operation kind in a [`Stats`] snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Calls of the wrapper, including calls failed by a rule.
    pub count: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub bytes_copied: u64,
    /// Calls that returned an error (injected or not).
    pub errors: u64,
    /// Calls failed by a rule, and calls a rule made panic (those return nothing, so `errors` does not count
    /// them).
    pub injected: u64,
}

/// A snapshot of a [`FailingStore`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    ops: [OpStats; 12],
}

impl Stats {
    pub fn op(&self, op: OpKind) -> OpStats {
        self.ops[op.index()]
    }

    pub fn count(&self, op: OpKind) -> u64 {
        self.op(op).count
    }

    pub fn bytes_up(&self, op: OpKind) -> u64 {
        self.op(op).bytes_up
    }

    pub fn bytes_down(&self, op: OpKind) -> u64 {
        self.op(op).bytes_down
    }

    pub fn bytes_copied(&self, op: OpKind) -> u64 {
        self.op(op).bytes_copied
    }

    pub fn errors(&self, op: OpKind) -> u64 {
        self.op(op).errors
    }

    pub fn injected(&self, op: OpKind) -> u64 {
        self.op(op).injected
    }

    /// Calls of every kind.
    pub fn total_count(&self) -> u64 {
        self.ops.iter().map(|o| o.count).sum()
    }

    pub fn total_bytes_up(&self) -> u64 {
        self.ops.iter().map(|o| o.bytes_up).sum()
    }

    pub fn total_bytes_down(&self) -> u64 {
        self.ops.iter().map(|o| o.bytes_down).sum()
    }

    /// What happened between `earlier` and this snapshot (counters only grow between resets).
    pub fn since(&self, earlier: &Stats) -> Stats {
        let mut out = *self;
        for (o, e) in out.ops.iter_mut().zip(earlier.ops.iter()) {
            o.count -= e.count.min(o.count);
            o.bytes_up -= e.bytes_up.min(o.bytes_up);
            o.bytes_down -= e.bytes_down.min(o.bytes_down);
            o.bytes_copied -= e.bytes_copied.min(o.bytes_copied);
            o.errors -= e.errors.min(o.errors);
            o.injected -= e.injected.min(o.injected);
        }
        out
    }
}

/// Counts requests and bytes per [`OpKind`] and injects faults by [`Rule`]. See the module documentation.
pub struct FailingStore<S> {
    inner: S,
    counters: [OpCounters; 12],
    /// Body bytes of the uploads (PUT, UploadPart) inside a call now, and the most there ever were at once.
    up_in_flight: AtomicU64,
    up_peak: AtomicU64,
    has_rules: AtomicBool,
    rules: Mutex<Vec<RuleState>>,
    observer: OnceLock<Arc<dyn Observer>>,
}

impl<S: ObjectStore> FailingStore<S> {
    /// A counting wrapper with no rules.
    pub fn new(inner: S) -> Self {
        FailingStore {
            inner,
            counters: Default::default(),
            up_in_flight: Default::default(),
            up_peak: Default::default(),
            has_rules: AtomicBool::new(false),
            rules: Mutex::new(Vec::new()),
            observer: OnceLock::new(),
        }
    }

    /// Sets the one observer of every call from now on; false if one was set already.
    pub fn set_observer(&self, observer: Arc<dyn Observer>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// Adds a rule; rules are checked in the order added and all that fire apply (the first error wins; delays
    /// add up).
    pub fn add_rule(&self, rule: Rule) {
        self.lock_rules().push(RuleState::new(rule));
        self.has_rules.store(true, Ordering::Release);
    }

    pub fn clear_rules(&self) {
        self.lock_rules().clear();
        self.has_rules.store(false, Ordering::Release);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        for (s, c) in stats.ops.iter_mut().zip(self.counters.iter()) {
            *s = OpStats {
                count: c.count.load(Ordering::Relaxed),
                bytes_up: c.bytes_up.load(Ordering::Relaxed),
                bytes_down: c.bytes_down.load(Ordering::Relaxed),
                bytes_copied: c.bytes_copied.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                injected: c.injected.load(Ordering::Relaxed),
            };
        }
        stats
    }

    /// Sets every counter to zero (rules keep their own state).
    pub fn reset(&self) {
        for c in &self.counters {
            for a in [
                &c.count,
                &c.bytes_up,
                &c.bytes_down,
                &c.bytes_copied,
                &c.errors,
                &c.injected,
            ] {
                a.store(0, Ordering::Relaxed);
            }
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn lock_rules(&self) -> std::sync::MutexGuard<'_, Vec<RuleState>> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn plan(&self, op: OpKind, key: &str) -> Plan {
        let mut plan = Plan::default();
        if !self.has_rules.load(Ordering::Acquire) {
            return plan;
        }
        for state in self.lock_rules().iter_mut() {
            if !state.fires(op, key) {
                continue;
            }
            match state.rule.action {
                Action::Fail(k) => plan.before = plan.before.or(Some(k)),
                Action::FailAfter(k) => plan.after = plan.after.or(Some(k)),
                Action::Delay(d) => plan.delay += d,
                Action::DelayAfter(d) => plan.delay_after += d,
                Action::Panic => plan.panic = true,
                Action::PanicAfter => plan.panic_after = true,
            }
        }
        plan
    }

    /// Runs one call: counts it, applies the rules, forwards `fut` unless a rule fails it first.
    async fn call<T, F>(&self, op: OpKind, key: &str, bytes_up: u64, fut: F) -> StoreResult<T>
    where
        F: Future<Output = StoreResult<T>>,
    {
        let started = Instant::now();
        let result = self.call_counted(op, key, bytes_up, fut).await;
        if let Some(o) = self.observer.get() {
            o.call(op, result.as_ref().map(|_| ()), started.elapsed());
        }
        result
    }

    async fn call_counted<T, F>(&self, op: OpKind, key: &str, bytes_up: u64, fut: F) -> StoreResult<T>
    where
        F: Future<Output = StoreResult<T>>,
    {
        let c = &self.counters[op.index()];
        c.count.fetch_add(1, Ordering::Relaxed);
        let _body = UpInFlight::new(self, bytes_up);
        let plan = self.plan(op, key);
        if !plan.delay.is_zero() {
            tokio::time::sleep(plan.delay).await;
        }
        if plan.panic {
            c.injected.fetch_add(1, Ordering::Relaxed);
            panic!("injected panic in {op:?} of {key}");
        }
        if let Some(kind) = plan.before {
            c.injected.fetch_add(1, Ordering::Relaxed);
            c.errors.fetch_add(1, Ordering::Relaxed);
            return Err(kind.error(op, key));
        }
        c.bytes_up.fetch_add(bytes_up, Ordering::Relaxed);
        let result = fut.await;
        if !plan.delay_after.is_zero() {
            tokio::time::sleep(plan.delay_after).await;
        }
        if plan.panic_after {
            c.injected.fetch_add(1, Ordering::Relaxed);
            panic!("injected panic after {op:?} of {key}");
        }
        let result = match (result, plan.after) {
            (Ok(_), Some(kind)) => {
                c.injected.fetch_add(1, Ordering::Relaxed);
                Err(kind.error(op, key))
            }
            (r, _) => r,
        };
        if result.is_err() {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn add(&self, op: OpKind, field: fn(&OpCounters) -> &AtomicU64, n: u64) {
        field(&self.counters[op.index()]).fetch_add(n, Ordering::Relaxed);
    }

    /// The most body bytes of uploads (PUT, UploadPart) that were inside calls at once: what the caller held in
    /// memory to send, at least.
    pub fn peak_bytes_up_in_flight(&self) -> u64 {
        self.up_peak.load(Ordering::Acquire)
    }
}

/// An upload's body counted in flight for the length of its call (also one cancelled or failed).
struct UpInFlight<'a> {
    in_flight: &'a AtomicU64,
    bytes: u64,
}

impl<'a> UpInFlight<'a> {
    fn new<S>(store: &'a FailingStore<S>, bytes: u64) -> UpInFlight<'a> {
        let now = store.up_in_flight.fetch_add(bytes, Ordering::AcqRel) + bytes;
        store.up_peak.fetch_max(now, Ordering::AcqRel);
        UpInFlight {
            in_flight: &store.up_in_flight,
            bytes,
        }
    }
}

impl Drop for UpInFlight<'_> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for FailingStore<S> {
    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        self.call(OpKind::Head, key, 0, self.inner.head(key)).await
    }

    async fn get(&self, key: &str, range: Option<ByteRange>, if_match: Option<&str>) -> StoreResult<GetOutput> {
        let out = self
            .call(OpKind::Get, key, 0, self.inner.get(key, range, if_match))
            .await?;
        self.add(OpKind::Get, |c| &c.bytes_down, out.data.len() as u64);
        Ok(out)
    }

    async fn get_pieces(&self, key: &str, range: Option<ByteRange>, if_match: Option<&str>) -> StoreResult<GetPieces> {
        let out = self
            .call(OpKind::Get, key, 0, self.inner.get_pieces(key, range, if_match))
            .await?;
        self.add(OpKind::Get, |c| &c.bytes_down, out.len() as u64);
        Ok(out)
    }

    async fn put(&self, key: &str, body: Bytes, metadata: &Metadata, cond: PutCondition) -> StoreResult<ObjectInfo> {
        let n = body.len() as u64;
        self.call(OpKind::Put, key, n, self.inner.put(key, body, metadata, cond))
            .await
    }

    async fn create_multipart(&self, key: &str, metadata: &Metadata) -> StoreResult<String> {
        self.call(
            OpKind::CreateMultipart,
            key,
            0,
            self.inner.create_multipart(key, metadata),
        )
        .await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
    ) -> StoreResult<CompletedPart> {
        let n = body.len() as u64;
        self.call(
            OpKind::UploadPart,
            key,
            n,
            self.inner.upload_part(key, upload_id, part_number, body),
        )
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
        let n = source_range.end.saturating_sub(source_range.start);
        let fut = self
            .inner
            .upload_part_copy(key, upload_id, part_number, source_key, source_range, source_if_match);
        let part = self.call(OpKind::UploadPartCopy, key, 0, fut).await?;
        self.add(OpKind::UploadPartCopy, |c| &c.bytes_copied, n);
        Ok(part)
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        cond: PutCondition,
    ) -> StoreResult<String> {
        self.call(
            OpKind::Complete,
            key,
            0,
            self.inner.complete_multipart(key, upload_id, parts, cond),
        )
        .await
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<(String, String)>> {
        self.call(OpKind::List, prefix, 0, self.inner.list_multipart_uploads(prefix))
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
        let fut = self.inner.upload_part_file(key, upload_id, part_number, path, len);
        self.call(OpKind::UploadPart, key, len, fut).await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.call(OpKind::Abort, key, 0, self.inner.abort_multipart(key, upload_id))
            .await
    }

    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<&Metadata>,
        cond: PutCondition,
    ) -> StoreResult<String> {
        self.call(
            OpKind::Copy,
            dest_key,
            0,
            self.inner.copy(source_key, dest_key, metadata, cond),
        )
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.call(OpKind::Delete, key, 0, self.inner.delete(key)).await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        let first = keys.first().map(String::as_str).unwrap_or("");
        self.call(OpKind::DeleteMany, first, 0, self.inner.delete_many(keys))
            .await
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<&str>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        self.call(
            OpKind::List,
            prefix,
            0,
            self.inner.list(prefix, delimiter, continuation, max_keys),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn meta() -> Metadata {
        Metadata::new()
    }

    #[tokio::test]
    async fn counts_requests_and_bytes_per_kind() {
        let store = FailingStore::new(MemoryStore::new());
        store
            .put("a", Bytes::from_static(b"hello"), &meta(), PutCondition::None)
            .await
            .unwrap();
        store
            .get("a", Some(ByteRange::Range { start: 1, end: 3 }), None)
            .await
            .unwrap();
        store.head("missing").await.unwrap_err();
        let s = store.stats();
        assert_eq!((s.count(OpKind::Put), s.bytes_up(OpKind::Put)), (1, 5));
        assert_eq!((s.count(OpKind::Get), s.bytes_down(OpKind::Get)), (1, 2));
        assert_eq!(
            (s.count(OpKind::Head), s.errors(OpKind::Head), s.injected(OpKind::Head)),
            (1, 1, 0)
        );
        assert_eq!(s.total_count(), 3);
        store.reset();
        assert_eq!(store.stats(), Stats::default());
    }

    #[tokio::test]
    async fn nth_rule_fails_only_that_call_and_typed() {
        let store = FailingStore::new(MemoryStore::new());
        store.add_rule(Rule::fail(OpKind::Put, When::Nth(2), FaultKind::AccessDenied));
        let body = Bytes::from_static(b"x");
        store.put("a", body.clone(), &meta(), PutCondition::None).await.unwrap();
        let err = store
            .put("b", body.clone(), &meta(), PutCondition::None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AccessDenied(_)), "{err:?}");
        store.put("c", body, &meta(), PutCondition::None).await.unwrap();
        assert!(matches!(store.inner().head("b").await, Err(StoreError::NotFound(_))));
        assert_eq!(store.stats().injected(OpKind::Put), 1);
        assert_eq!(store.stats().bytes_up(OpKind::Put), 2, "the failed call sent nothing");
    }

    #[tokio::test]
    async fn fail_after_applies_the_write_and_reports_an_error() {
        let store = FailingStore::new(MemoryStore::new());
        store.add_rule(Rule::new(Some(OpKind::Put), When::Always, Action::FailAfter(FaultKind::Transient)).times(1));
        let err = store
            .put("k", Bytes::from_static(b"x"), &meta(), PutCondition::None)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Transient(_)));
        assert_eq!(store.inner().head("k").await.unwrap().size, 1);
        store
            .put("k", Bytes::from_static(b"yy"), &meta(), PutCondition::None)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn seeded_probability_is_reproducible_and_key_filtered() {
        async fn failures(seed: u64) -> Vec<bool> {
            let store = FailingStore::new(MemoryStore::new());
            store.add_rule(
                Rule::new(
                    None,
                    When::Probability { p: 0.5, seed },
                    Action::Fail(FaultKind::Transient),
                )
                .key_contains("hot"),
            );
            let mut out = Vec::new();
            for i in 0..40 {
                out.push(
                    store
                        .head(&format!("hot/{i}"))
                        .await
                        .is_err_and(|e| matches!(e, StoreError::Transient(_))),
                );
                assert!(matches!(store.head("cold").await, Err(StoreError::NotFound(_))));
            }
            out
        }
        let a = failures(7).await;
        assert_eq!(a, failures(7).await);
        assert!(a.iter().any(|f| *f) && a.iter().any(|f| !*f), "{a:?}");
    }

    #[tokio::test]
    async fn delay_rule_delays() {
        let store = FailingStore::new(MemoryStore::new());
        store.add_rule(Rule::new(
            Some(OpKind::List),
            When::Always,
            Action::Delay(Duration::from_millis(30)),
        ));
        let t = std::time::Instant::now();
        store.list("", None, None, None).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(30));
        store.clear_rules();
        let before = store.stats();
        store.list("", None, None, None).await.unwrap();
        assert_eq!(store.stats().since(&before).count(OpKind::List), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delay_after_changes_the_store_before_answering() {
        let store = Arc::new(FailingStore::new(MemoryStore::new()));
        store.add_rule(Rule::new(
            Some(OpKind::Put),
            When::Always,
            Action::DelayAfter(Duration::from_millis(300)),
        ));
        let s = store.clone();
        let put = tokio::spawn(async move {
            s.put("k", Bytes::from_static(b"v"), &Metadata::new(), PutCondition::None)
                .await
        });
        // The object is there while the PUT has not answered yet.
        let mut seen = false;
        for _ in 0..100 {
            if store.head("k").await.is_ok() {
                seen = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(seen, "the PUT reached the store");
        assert!(!put.is_finished(), "and has not answered yet");
        put.await.unwrap().unwrap();
    }
}
