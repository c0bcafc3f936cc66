//! The object store: everything s3crypt does to S3 goes through [`ObjectStore`].
//!
//! Implementations: `s3` (aws-sdk-s3), `memory` (the same semantics in memory, for fast unit and property tests)
//! and `failing` (a wrapper that injects errors or latency by rule and counts requests and bytes per operation).
//! `bigcopy` builds copies of any size on the trait (one CopyObject up to 5 GiB, a multipart copy above).
//!
//! Keys passed to a store are full object keys within its bucket; the file system adds the mount's prefix.
//! Server-side encryption is a property of the store ([`Sse`]): the S3 implementation puts the right headers on
//! every request that needs them, so callers never think about them.
pub mod bigcopy;
pub mod failing;
pub mod memory;
pub mod retry;
pub mod s3;
mod shared;
mod sse_c_keys;

pub use bigcopy::{copy_object, COPY_MAX};
pub use failing::{Action, FailingStore, FaultKind, OpKind, OpStats, Rule, Stats, When};
pub use memory::MemoryStore;
pub use retry::{RetryPolicy, Retrying};
pub use s3::S3Store;

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::fmt;
use std::time::SystemTime;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// User metadata (`x-amz-meta-NAME: VALUE`), keyed by NAME in lower case without the `x-amz-meta-` prefix.
pub type Metadata = BTreeMap<String, String>;

/// What a store tells about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    /// Size of the whole object in bytes (not of a range that was asked for).
    pub size: u64,
    /// The ETag, with its surrounding quotes as S3 sends it.
    pub etag: String,
    pub last_modified: Option<SystemTime>,
    pub metadata: Metadata,
    /// Server-side encryption as the server reports it (`AES256`, `aws:kms`, ...), if any.
    pub sse_algorithm: Option<String>,
    /// The KMS key the server reports for `aws:kms`.
    pub sse_kms_key_id: Option<String>,
    /// The customer-key algorithm the server reports for SSE-C (`AES256`).
    pub sse_customer_algorithm: Option<String>,
}

/// Which bytes of an object a GET asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `start..end` (end exclusive). An end past the object is cut to the object, as S3 does; a start at or past
    /// the end of a non-empty object is [`StoreError::InvalidRange`].
    Range { start: u64, end: u64 },
    /// The last `n` bytes.
    Suffix(u64),
}

/// A condition on a write, checked by the server atomically with the write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PutCondition {
    #[default]
    None,
    /// `If-Match: ETAG`: only if the object still has this ETag.
    IfMatch(String),
    /// `If-None-Match: *`: only if no object with this key exists.
    IfNoneMatch,
}

/// The body and facts of a GET.
#[derive(Clone, Debug)]
pub struct GetOutput {
    pub data: Bytes,
    pub info: ObjectInfo,
}

/// The body of a GET in the pieces the store holds it in (see [`ObjectStore::get_pieces`]).
#[derive(Clone, Debug)]
pub struct GetPieces {
    pub pieces: Vec<Bytes>,
    pub info: ObjectInfo,
}

impl GetPieces {
    /// The body's length, all pieces together.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `pieces` as one buffer: the piece itself when there is one, else a copy.
pub fn join(pieces: Vec<Bytes>) -> Bytes {
    if let [one] = &pieces[..] {
        return one.clone();
    }
    let mut out = bytes::BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
    for p in &pieces {
        out.extend_from_slice(p);
    }
    out.freeze()
}

/// One uploaded part of a multipart upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletedPart {
    /// 1-based part number.
    pub part_number: i32,
    pub etag: String,
}

/// One page of a listing.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ListEntry>,
    /// Common prefixes (with the delimiter at their end) when a delimiter was given.
    pub common_prefixes: Vec<String>,
    /// Token for the next page; `None` on the last page.
    pub next_token: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub last_modified: Option<SystemTime>,
}

/// Server-side encryption that a store applies to every object it writes (and, for SSE-C, reads).
#[derive(Clone, Debug, Default)]
pub enum Sse {
    /// No header: the bucket default applies. Used in the client-side modes, where data is already sealed.
    #[default]
    None,
    /// `x-amz-server-side-encryption: AES256`.
    S3,
    /// `x-amz-server-side-encryption: aws:kms` with an optional key id, alias or ARN (absent: the AWS-managed key).
    Kms { key_id: Option<String> },
    /// SSE-C: the customer key goes on every request that reads or writes object data.
    Customer(SseCustomerKey),
}

/// A 256-bit SSE-C key with the base64 forms S3 wants. Zeroized on drop; `Debug` never shows it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SseCustomerKey {
    key: [u8; 32],
}

impl SseCustomerKey {
    pub fn new(key: [u8; 32]) -> Self {
        SseCustomerKey { key }
    }

    /// `x-amz-server-side-encryption-customer-key`: base64 of the key. The returned string holds key material:
    /// use it only to build a request, never log it.
    pub fn key_base64(&self) -> zeroize::Zeroizing<String> {
        use base64::Engine;
        zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.key))
    }

    /// A separate key derived from this one with HKDF-SHA256 (`info` names its use), e.g. to seal local data that
    /// only the holder of the customer key may open again.
    pub fn derive(&self, info: &[u8]) -> crate::format::DataKey {
        let mut out = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(Some(b"s3crypt sse-c"), &self.key)
            .expand(info, &mut out)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let key = crate::format::DataKey::from_bytes(out);
        zeroize::Zeroize::zeroize(&mut out);
        key
    }

    /// `x-amz-server-side-encryption-customer-key-MD5`: base64 of the key's MD5 (S3 uses it as an integrity
    /// check; it is not secret in itself).
    pub fn key_md5_base64(&self) -> String {
        use base64::Engine;
        use md5::{Digest, Md5};
        base64::engine::general_purpose::STANDARD.encode(Md5::digest(self.key))
    }
}

impl fmt::Debug for SseCustomerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SseCustomerKey(<redacted>)")
    }
}

/// Errors of the store layer. Transient errors have already been retried (bounded) when they surface.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object not found: {0}")]
    NotFound(String),
    #[error("bucket not found: {0}; check the bucket name and region")]
    NoSuchBucket(String),
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// An If-Match / If-None-Match condition failed: someone else changed the object.
    #[error("precondition failed (the object was changed by someone else): {0}")]
    PreconditionFailed(String),
    #[error("requested range not satisfiable: {0}")]
    InvalidRange(String),
    #[error("transient error (retries exhausted): {0}")]
    Transient(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Other(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// What the file system needs of S3.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// HEAD: size, ETag, metadata and encryption of one object.
    async fn head(&self, key: &str) -> StoreResult<ObjectInfo>;

    /// GET of the whole object (`range: None`) or of a byte range. `if_match`: fail with `PreconditionFailed`
    /// unless the object still has this ETag.
    async fn get(&self, key: &str, range: Option<ByteRange>, if_match: Option<&str>) -> StoreResult<GetOutput>;

    /// [`get`](Self::get), with the body in the pieces the store holds it in instead of joined into one buffer:
    /// a store that keeps an object's parts apart hands out a range across them without copying it. By default,
    /// and for S3, `get`'s body as one piece.
    async fn get_pieces(&self, key: &str, range: Option<ByteRange>, if_match: Option<&str>) -> StoreResult<GetPieces> {
        let out = self.get(key, range, if_match).await?;
        Ok(GetPieces {
            pieces: vec![out.data],
            info: out.info,
        })
    }

    /// PUT of a whole object with user metadata, under a condition.
    async fn put(&self, key: &str, body: Bytes, metadata: &Metadata, cond: PutCondition) -> StoreResult<ObjectInfo>;

    /// CreateMultipartUpload; returns the upload id.
    async fn create_multipart(&self, key: &str, metadata: &Metadata) -> StoreResult<String>;

    /// UploadPart.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
    ) -> StoreResult<CompletedPart>;

    /// UploadPart of the first `len` bytes of the file at `path`, streamed from disk: parts of very large objects
    /// (S3 allows 10,000 parts, so a 5 TiB object needs parts of over 500 MiB) must not be held in memory. The
    /// default reads the file into memory and calls [`upload_part`](Self::upload_part), which is what a store
    /// for tests wants.
    async fn upload_part_file(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        path: &std::path::Path,
        len: u64,
    ) -> StoreResult<CompletedPart> {
        let mut data = tokio::fs::read(path)
            .await
            .map_err(|e| StoreError::Other(format!("UploadPart {key}: reading {}: {e}", path.display())))?;
        data.truncate(len as usize);
        self.upload_part(key, upload_id, part_number, Bytes::from(data)).await
    }

    /// UploadPartCopy of `source_range` (end exclusive) of `source_key`, only if the source still has the ETag
    /// `source_if_match` when one is given.
    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        source_key: &str,
        source_range: std::ops::Range<u64>,
        source_if_match: Option<&str>,
    ) -> StoreResult<CompletedPart>;

    /// CompleteMultipartUpload under a condition on the destination key. Returns the new object's ETag, taken
    /// from this request's own response: a HEAD afterwards could see another writer's later version and make its
    /// ETag this file's base, defeating the next conditional write. Size and metadata are the caller's (the sum
    /// of the parts; what `create_multipart` was given).
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        cond: PutCondition,
    ) -> StoreResult<String>;

    /// AbortMultipartUpload.
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()>;

    /// CopyObject inside the bucket. `metadata: Some` replaces the user metadata (MetadataDirective REPLACE);
    /// `None` copies it. `cond` applies to the destination. Returns the new object's ETag from the response's
    /// `CopyObjectResult` (not from a HEAD, for the reason given at [`ObjectStore::complete_multipart`]); its size
    /// is the source's, its metadata the given or the source's.
    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<&Metadata>,
        cond: PutCondition,
    ) -> StoreResult<String>;

    /// DeleteObject. Deleting a key that does not exist succeeds, as in S3.
    async fn delete(&self, key: &str) -> StoreResult<()>;

    /// DeleteObjects (any number of keys; implementations batch by 1,000).
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()>;

    /// Multipart uploads started and neither completed nor aborted, for keys under `prefix` (ListMultipartUploads,
    /// all pages): (key, upload id) pairs. Used at mount to abort what a killed daemon left behind.
    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<(String, String)>> {
        Err(StoreError::InvalidRequest(format!(
            "listing multipart uploads under {prefix:?} is not supported by this store"
        )))
    }

    /// One page of ListObjectsV2 under `prefix`, with an optional delimiter. `max_keys: None` means the server's
    /// default (1,000).
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<&str>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage>;
}
