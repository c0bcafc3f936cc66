//! Prometheus metrics of one mount, served by [`server`] at `/metrics` (with `/health`) when `metrics_addr=` is set.
//!
//! # Where the numbers come from
//! Most numbers are already counted where they happen, for tests and `stats_file`: requests and bytes per S3
//! operation (`store::failing::FailingStore`), retries (`store::retry::Retrying`), KMS calls and data-key cache
//! hits (`keys::KeyStats`), and the file system's own events and state (`fs::Fs::stats`). Those are *read at
//! scrape time* by a collector ([`Sources`]), so nothing is counted twice and the exported values cannot drift
//! from what `stats_file` writes. Only what needs a distribution or a label the sources do not keep is recorded
//! here: S3 requests by outcome with their latency (an observer of `FailingStore`) and FUSE requests by type
//! with their latency (the `run!` bridge of `fuse.rs`).
//!
//! # Names and labels
//! Every metric is prefixed `s3crypt_` and carries `volume="BUCKET/PREFIX"`. Other label values come from fixed
//! sets (S3 API names, FUSE operation names, outcome classes): never a file name or an object key, so the number
//! of series is bounded and paths do not leak into the monitoring system. Counters end in `_total`, sizes in
//! `_bytes`, durations in `_seconds`.
pub mod server;

use crate::fs::Fs;
use crate::keys::KeyStats;
use crate::store::failing::{Observer, OpKind, Stats};
use crate::store::StoreError;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

/// One label pair with a value from a fixed set.
type Label = (&'static str, &'static str);
type HistogramFamily = Family<[Label; 1], Histogram, fn() -> Histogram>;

/// Latency buckets from 1 ms to about 33 s (doubling): S3 and FUSE requests on loopback and over the internet.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The metrics of one mount. Cheap to record into from any thread; [`Metrics::encode`] renders them.
pub struct Metrics {
    registry: Registry,
    s3_requests: Family<[Label; 2], Counter>,
    s3_duration: HistogramFamily,
    fuse_requests: Family<[Label; 2], Counter>,
    fuse_duration: HistogramFamily,
    sources: Arc<Sources>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The metrics of the volume `s3://bucket/prefix`.
    pub fn new(bucket: &str, prefix: &str) -> Arc<Metrics> {
        let volume = format!("{bucket}/{prefix}").trim_end_matches('/').to_string();
        let mut registry = Registry::with_prefix_and_labels("s3crypt", [("volume".into(), volume.into())].into_iter());
        let s3_requests = Family::<[Label; 2], Counter>::default();
        registry.register(
            "s3_requests",
            "S3 requests by operation and outcome (ok, not_found, precondition_failed, transient, ...); every attempt counts",
            s3_requests.clone(),
        );
        let s3_duration = HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "s3_request_duration",
            "Time from sending an S3 request to its answer, by operation",
            Unit::Seconds,
            s3_duration.clone(),
        );
        let fuse_requests = Family::<[Label; 2], Counter>::default();
        registry.register(
            "fuse_requests",
            "FUSE requests by operation and outcome (ok or error)",
            fuse_requests.clone(),
        );
        let fuse_duration = HistogramFamily::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "fuse_request_duration",
            "Time to answer a FUSE request, by operation",
            Unit::Seconds,
            fuse_duration.clone(),
        );
        let sources = Arc::new(Sources::default());
        registry.register_collector(Box::new(sources.clone()));
        Arc::new(Metrics {
            registry,
            s3_requests,
            s3_duration,
            fuse_requests,
            fuse_duration,
            sources,
        })
    }

    /// Reads S3 request and byte counts from `stats` and retries from `retries` at each scrape.
    pub fn set_store(
        &self,
        stats: impl Fn() -> Stats + Send + Sync + 'static,
        retries: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        let _ = self.sources.store.set(Box::new(stats));
        let _ = self.sources.retries.set(Box::new(retries));
    }

    pub fn set_keys(&self, keys: Arc<KeyStats>) {
        let _ = self.sources.keys.set(keys);
    }

    /// The file system whose [`Fs::stats`] are exported (held weakly: metrics never keep it alive).
    pub fn set_fs(&self, fs: &Arc<Fs>) {
        let _ = self.sources.fs.set(Arc::downgrade(fs));
    }

    /// Records one FUSE request. `op` is the FUSE operation's name (a fixed set).
    pub fn fuse_request(&self, op: &'static str, ok: bool, elapsed: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.fuse_requests
            .get_or_create(&[("operation", op), ("outcome", outcome)])
            .inc();
        self.fuse_duration
            .get_or_create(&[("operation", op)])
            .observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text format (version 0.0.4). Reads the journal directory's size: call it off the async
    /// workers.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The Content-Type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

impl Observer for Metrics {
    fn call(&self, op: OpKind, result: Result<(), &StoreError>, elapsed: Duration) {
        let labels = [("operation", op.api_name()), ("outcome", outcome(result))];
        self.s3_requests.get_or_create(&labels).inc();
        self.s3_duration
            .get_or_create(&[("operation", op.api_name())])
            .observe(elapsed.as_secs_f64());
    }
}

/// The outcome class of a store call: a fixed set, never the error's message (which may name a key).
fn outcome(result: Result<(), &StoreError>) -> &'static str {
    match result {
        Ok(()) => "ok",
        Err(StoreError::NotFound(_)) => "not_found",
        Err(StoreError::NoSuchBucket(_)) => "no_such_bucket",
        Err(StoreError::AccessDenied(_)) => "access_denied",
        Err(StoreError::PreconditionFailed(_)) => "precondition_failed",
        Err(StoreError::InvalidRange(_)) => "invalid_range",
        Err(StoreError::Transient(_)) => "transient",
        Err(StoreError::InvalidRequest(_)) => "invalid_request",
        Err(StoreError::Other(_)) => "error",
    }
}

type StatsFn = Box<dyn Fn() -> Stats + Send + Sync>;
type CountFn = Box<dyn Fn() -> u64 + Send + Sync>;

/// The counters kept elsewhere, read at each scrape. Each is set once, when the mount has built it.
#[derive(Default)]
struct Sources {
    store: OnceLock<StatsFn>,
    retries: OnceLock<CountFn>,
    keys: OnceLock<Arc<KeyStats>>,
    fs: OnceLock<Weak<Fs>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

/// Writes one metric family: a descriptor, then one sample per label set.
fn family<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    samples: impl IntoIterator<Item = (&'a [Label], u64)>,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    for (labels, v) in samples {
        let e = m.encode_family(&labels)?;
        match kind {
            MetricType::Gauge => ConstGauge::new(v as i64).encode(e)?,
            _ => ConstCounter::new(v).encode(e)?,
        }
    }
    Ok(())
}

fn one(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    v: u64,
) -> std::fmt::Result {
    family(enc, name, help, unit, kind, [(&[][..], v)])
}

const OPS: [(&str, &str); 12] = [
    ("operation", "HeadObject"),
    ("operation", "GetObject"),
    ("operation", "PutObject"),
    ("operation", "CreateMultipartUpload"),
    ("operation", "UploadPart"),
    ("operation", "UploadPartCopy"),
    ("operation", "CompleteMultipartUpload"),
    ("operation", "AbortMultipartUpload"),
    ("operation", "CopyObject"),
    ("operation", "DeleteObject"),
    ("operation", "DeleteObjects"),
    ("operation", "ListObjectsV2"),
];

impl prometheus_client::collector::Collector for Sources {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::Counter as C;
        if let Some(stats) = self.store.get() {
            let s = stats();
            let by_op = |f: fn(&Stats, OpKind) -> u64| {
                OpKind::ALL
                    .iter()
                    .zip(OPS.iter())
                    .map(move |(op, label)| (std::slice::from_ref(label), f(&s, *op)))
                    .collect::<Vec<_>>()
            };
            let help = "Bytes of request bodies sent to S3 (PutObject, UploadPart), by operation";
            family(&mut enc, "s3_sent", help, Some(&Unit::Bytes), C, by_op(Stats::bytes_up))?;
            let help = "Bytes of response bodies received from S3 (GetObject), by operation";
            family(
                &mut enc,
                "s3_received",
                help,
                Some(&Unit::Bytes),
                C,
                by_op(Stats::bytes_down),
            )?;
            let help = "Bytes copied inside S3 by UploadPartCopy (not over the network)";
            family(
                &mut enc,
                "s3_copied",
                help,
                Some(&Unit::Bytes),
                C,
                by_op(Stats::bytes_copied),
            )?;
        }
        if let Some(retries) = self.retries.get() {
            let help = "S3 requests retried after a transient error (each retry also counts in s3_requests)";
            one(&mut enc, "s3_retries", help, None, C, retries())?;
        }
        if let Some(keys) = self.keys.get() {
            encode_keys(&mut enc, keys)?;
        }
        if let Some(fs) = self.fs.get().and_then(Weak::upgrade) {
            encode_fs(&mut enc, &fs.stats())?;
        }
        Ok(())
    }
}

fn encode_keys(enc: &mut DescriptorEncoder, keys: &KeyStats) -> std::fmt::Result {
    let k = keys.snapshot();
    let kms = [
        (
            &[("operation", "GenerateDataKey"), ("outcome", "ok")][..],
            k.kms_generate - k.kms_generate_failed,
        ),
        (
            &[("operation", "GenerateDataKey"), ("outcome", "error")][..],
            k.kms_generate_failed,
        ),
        (
            &[("operation", "Decrypt"), ("outcome", "ok")][..],
            k.kms_decrypt - k.kms_decrypt_failed,
        ),
        (
            &[("operation", "Decrypt"), ("outcome", "error")][..],
            k.kms_decrypt_failed,
        ),
    ];
    let help = "AWS KMS requests by operation and outcome (cse-kms: one GenerateDataKey per new file)";
    family(enc, "kms_requests", help, None, MetricType::Counter, kms)?;
    let help = "Data-key lookups served from the data-key cache (no KMS call)";
    one(
        enc,
        "data_key_cache_hits",
        help,
        None,
        MetricType::Counter,
        k.cache_hits,
    )?;
    let help = "Data-key lookups the cache did not have (each led to an unwrap)";
    one(
        enc,
        "data_key_cache_misses",
        help,
        None,
        MetricType::Counter,
        k.cache_misses,
    )
}

fn encode_fs(enc: &mut DescriptorEncoder, s: &crate::fs::FsStats) -> std::fmt::Result {
    use MetricType::{Counter as C, Gauge as G};
    let rows: [(&str, &str, Option<&Unit>, MetricType, u64); 12] = [
        (
            "block_cache_hits",
            "Block reads served from the block cache",
            None,
            C,
            s.block_cache_hits,
        ),
        (
            "block_cache_misses",
            "Block reads that needed a GET from S3",
            None,
            C,
            s.block_cache_misses,
        ),
        (
            "block_cache",
            "Plaintext held in the block cache",
            Some(&Unit::Bytes),
            G,
            s.block_cache_bytes,
        ),
        (
            "authentication_failures",
            "Blocks that failed authentication (modified, truncated or sealed under another key): always investigate",
            None,
            C,
            s.auth_failures,
        ),
        (
            "conflicts",
            "Uploads refused because someone else changed the object first",
            None,
            C,
            s.conflicts,
        ),
        (
            "recovery_files",
            "Files written to the recovery directory",
            None,
            C,
            s.recovery_files,
        ),
        (
            "lookups_prefetched",
            "Lookups answered by attributes fetched ahead for a long listing (no request of their own)",
            None,
            C,
            s.lookups_prefetched,
        ),
        (
            "lookups_indexed",
            "Files of long listings whose attributes came from the directory's attribute index (no HEAD)",
            None,
            C,
            s.lookups_indexed,
        ),
        (
            "entries_plus",
            "Directory entries sent with their attributes (READDIRPLUS), sparing the kernel a lookup each",
            None,
            C,
            s.entries_plus,
        ),
        (
            "uploads_pending",
            "Files with data S3 does not have yet (being written, saved, or retried)",
            None,
            G,
            s.uploads_pending,
        ),
        (
            "journal",
            "Data in the local write-back journal (not yet known to be in S3)",
            Some(&Unit::Bytes),
            G,
            s.journal_bytes,
        ),
        (
            "open_files",
            "Open files (inodes with an open handle)",
            None,
            G,
            s.open_files,
        ),
    ];
    for (name, help, unit, kind, v) in rows {
        one(enc, name, help, unit, kind, v)?;
    }
    Ok(())
}
