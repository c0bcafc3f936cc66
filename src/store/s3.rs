//! [`S3Store`]: the [`ObjectStore`] over aws-sdk-s3.
//!
//! Design points:
//! - **One place for encryption headers.** The store's [`Sse`] decides the headers of every request: SSE-S3 and
//!   SSE-KMS go on PUT, CreateMultipartUpload and CopyObject (S3 derives parts and copies-to-part from the
//!   upload); SSE-C goes on every request that reads or writes object data (PUT, CreateMultipartUpload,
//!   UploadPart, GET, HEAD) and, on CopyObject and UploadPartCopy, both as destination and as copy-source key.
//!   Older SSE-C keys (a key rotation) are accepted for reading and as copy sources: see [`super::sse_c_keys`].
//! - **No SDK retries.** The client is built with one attempt per call; [`super::retry::Retrying`] owns retry
//!   policy for every store alike. Errors are mapped to [`StoreError`] with the transient ones marked as such.
//! - **Empty objects.** S3 answers any range of an empty object with 416; [`ByteRange`] promises an empty body,
//!   so a 416 is followed by a HEAD to tell the two cases apart.
//! - **A write's ETag comes from its own response.** CompleteMultipartUpload and CopyObject report the new
//!   object's ETag (CopyObject inside `CopyObjectResult`), and that is all they return. They are not followed by
//!   a HEAD: another writer's version can land between the write and the HEAD, and its ETag would then become
//!   this file's base, so the next `If-Match` write would overwrite that version instead of failing. The caller
//!   already knows the size (the parts it sent, the source it copied) and the metadata (what it sent, or the
//!   source's). A response without an ETag is an error, never an empty base.
//! - **Timeouts, so that no request hangs.** See [`Timeouts`]: a connect timeout, a read timeout (until the first
//!   byte of the response) and a generous per-attempt timeout, plus the SDK's stalled-stream protection for
//!   bodies (on by default: a body that moves less than 1 byte/s for 20 s fails). The read timeout runs from the
//!   start of the request, so it includes sending the body; PUT and UploadPart therefore get an allowance for
//!   their body at [`MIN_UPLOAD_RATE`] on top.
use super::sse_c_keys::{with_each_key, OlderKeys};
use super::{
    ByteRange, CompletedPart, GetOutput, ListEntry, ListPage, Metadata, ObjectInfo, ObjectStore, PutCondition, Sse,
    SseCustomerKey, StoreError, StoreResult,
};
use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart as S3CompletedPart, Delete, MetadataDirective, ObjectIdentifier,
    ServerSideEncryption,
};
use aws_sdk_s3::Client;
use bytes::Bytes;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// DeleteObjects takes at most this many keys per request.
const DELETE_BATCH: usize = 1000;

/// The region used when neither the argument nor the environment or profile names one.
pub const DEFAULT_REGION: &str = "us-east-1";

/// The slowest link a request body must still get through, in bytes per second (1 Mbit/s). PUT and UploadPart
/// get the time their body takes at this rate on top of the read timeout (see [`Timeouts::read`]).
pub const MIN_UPLOAD_RATE: u64 = 128 * 1024;

/// How long one attempt of an S3 or KMS request may take, in its phases. Without them a request on a connection
/// that went dead (a NAT or load balancer dropped it, a server froze) waits forever: the SDK has no read or
/// attempt timeout by default, and the kernel gives up on an unanswered connection only after many minutes.
///
/// A timed-out attempt is a transient error, so [`super::retry::Retrying`] tries again on a fresh connection.
/// Bodies are guarded separately by the SDK's stalled-stream protection (on with the current behavior version):
/// a request or response body that moves less than 1 byte/s over 20 s fails the attempt, however long the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Setting up the TCP (and TLS) connection. 10 s: a healthy server accepts in milliseconds.
    pub connect: Duration,
    /// From the start of a request until the first byte of its response. 20 s: S3 answers a HEAD, a GET's
    /// headers or a listing in well under a second, and answers CopyObject, UploadPartCopy and
    /// CompleteMultipartUpload with 200 at once, keeping the connection alive with whitespace while it works.
    /// The SDK starts this clock before sending the request body, so it also covers the upload: a 16 MiB part
    /// needs 128 s at 1 Mbit/s, and a flat 20 s would fail it on every attempt on any link slower than
    /// ~7 Mbit/s. [`S3Store`] therefore extends it, for PUT and UploadPart, by the body's size at
    /// [`MIN_UPLOAD_RATE`] (bodies that need at most a quarter of it keep the plain value).
    pub read: Duration,
    /// One whole attempt, response body included except for a GET's (which is streamed after the attempt and
    /// guarded by the stalled-stream protection). 10 min, extended like `read` for uploads: a backstop for a
    /// response that trickles in, never the limit for a healthy request; S3 documents that completing an upload
    /// of many parts can take minutes.
    pub attempt: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            read: Duration::from_secs(20),
            attempt: Duration::from_secs(600),
        }
    }
}

impl Timeouts {
    fn sdk(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect)
            .read_timeout(self.read)
            .operation_attempt_timeout(self.attempt)
            .build()
    }
}

/// An SDK configuration from aws-config's standard chains (credentials: environment, profile, SSO, web identity,
/// ECS, IMDS; region: argument, then environment and profile, then [`DEFAULT_REGION`]), with the SDK's retries
/// off and the default [`Timeouts`]. `endpoint: None` leaves the endpoint to the environment
/// (`AWS_ENDPOINT_URL`) or AWS. Share it with the KMS client.
pub async fn sdk_config(region: Option<String>, endpoint: Option<String>) -> SdkConfig {
    sdk_config_with(region, endpoint, Timeouts::default()).await
}

/// [`sdk_config`] with other timeouts (tests use short ones).
pub async fn sdk_config_with(region: Option<String>, endpoint: Option<String>, timeouts: Timeouts) -> SdkConfig {
    let region = RegionProviderChain::first_try(region.map(Region::new))
        .or_default_provider()
        .or_else(Region::new(DEFAULT_REGION));
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(region)
        .retry_config(RetryConfig::standard().with_max_attempts(1))
        .timeout_config(timeouts.sdk());
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// An S3 client from [`sdk_config`]; `path_style` for servers addressed by IP or without virtual-host DNS.
pub async fn s3_client(region: Option<String>, endpoint: Option<String>, path_style: bool) -> Client {
    s3_client_from(&sdk_config(region, endpoint).await, path_style)
}

/// An S3 client from a shared SDK configuration.
pub fn s3_client_from(conf: &SdkConfig, path_style: bool) -> Client {
    Client::from_conf(
        aws_sdk_s3::config::Builder::from(conf)
            .force_path_style(path_style)
            .build(),
    )
}

/// Extra time CompleteMultipartUpload gets per part to assemble the object before it answers.
const COMPLETE_ALLOWANCE_PER_PART: Duration = Duration::from_secs(1);

/// The largest GET body whose buffer is allocated up front from its Content-Length (a larger one grows as it
/// arrives, so a server's header alone never reserves more).
const MAX_PRESIZED_BODY: i64 = 64 * 1024 * 1024;

/// The object store over one bucket of S3 (or an S3-compatible server).
#[derive(Clone, Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    sse: Sse,
    /// How the source of a CopyObject is encrypted, when not as `sse` says (a key rotation copies from the old
    /// SSE-C keys to the new one).
    copy_source_sse: Option<(Sse, Option<Arc<OlderKeys>>)>,
    /// Older SSE-C keys accepted for reading, after `sse`'s own.
    older: Option<Arc<OlderKeys>>,
}

/// Applies the destination encryption headers of a write (PUT, CreateMultipartUpload, CopyObject).
macro_rules! write_sse {
    ($req:expr, $sse:expr) => {
        match $sse {
            Sse::None => $req,
            Sse::S3 => $req.server_side_encryption(ServerSideEncryption::Aes256),
            Sse::Kms { key_id } => $req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .set_ssekms_key_id(key_id.clone()),
            Sse::Customer(k) => customer_key!($req, k),
        }
    };
}

/// Applies the SSE-C headers (only) of a request that reads or writes object data.
macro_rules! sse_c {
    ($req:expr, $sse:expr) => {
        match $sse {
            Sse::Customer(k) => customer_key!($req, k),
            _ => $req,
        }
    };
}

macro_rules! customer_key {
    ($req:expr, $k:expr) => {
        $req.sse_customer_algorithm("AES256")
            .sse_customer_key($k.key_base64().as_str())
            .sse_customer_key_md5($k.key_md5_base64())
    };
}

/// Applies the copy-source SSE-C headers of CopyObject and UploadPartCopy.
macro_rules! copy_source_sse_c {
    ($req:expr, $sse:expr) => {
        match $sse {
            Sse::Customer(k) => $req
                .copy_source_sse_customer_algorithm("AES256")
                .copy_source_sse_customer_key(k.key_base64().as_str())
                .copy_source_sse_customer_key_md5(k.key_md5_base64()),
            _ => $req,
        }
    };
}

/// Sends a request with `$timeouts` (an `Option<TimeoutConfig>`) in place of the client's when given.
macro_rules! send_with_timeouts {
    ($req:expr, $timeouts:expr) => {
        send_customized!($req.customize(), $timeouts)
    };
}

/// Sends an operation already being customized, with `$timeouts` (if any) in place of the client's.
macro_rules! send_customized {
    ($op:expr, $timeouts:expr) => {
        match $timeouts {
            Some(t) => {
                let conf = aws_sdk_s3::config::Builder::default().timeout_config(t);
                $op.config_override(conf).send().await
            }
            None => $op.send().await,
        }
    };
}

/// Sends a request that uploads `$len` body bytes, with [`S3Store::upload_timeouts`] when the body needs them.
///
/// The payload is not hashed into the SigV4 signature (`UNSIGNED-PAYLOAD`): SHA-256 of every body was a sixth of
/// the daemon's CPU time in a large write. What the server checks instead is the CRC checksum the SDK sends with
/// every upload (S3 refuses a body that does not match it); over HTTPS the body is also protected by TLS, and in
/// the client-side modes every block by its own authentication tag. The request itself (key, headers, the
/// checksum) stays signed.
macro_rules! send_upload {
    ($store:expr, $req:expr, $len:expr) => {
        send_customized!($req.customize().disable_payload_signing(), $store.upload_timeouts($len))
    };
}

/// Applies a [`PutCondition`] to a request with `if_match` / `if_none_match`.
macro_rules! condition {
    ($req:expr, $cond:expr) => {
        match $cond {
            PutCondition::None => $req,
            PutCondition::IfMatch(etag) => $req.if_match(etag),
            PutCondition::IfNoneMatch => $req.if_none_match("*"),
        }
    };
}

impl S3Store {
    pub fn new(client: Client, bucket: impl Into<String>, sse: Sse) -> Self {
        S3Store {
            client,
            bucket: bucket.into(),
            sse,
            copy_source_sse: None,
            older: None,
        }
    }

    /// A store whose copies read their source under `source` (its SSE-C key, or one of `source_older`) and write
    /// under this store's own settings: what a key rotation in the SSE modes needs.
    pub fn with_copy_source_sse(mut self, source: Sse, source_older: Vec<SseCustomerKey>) -> Self {
        let older = (!source_older.is_empty()).then(|| Arc::new(OlderKeys::new(source_older)));
        self.copy_source_sse = Some((source, older));
        self
    }

    /// Older SSE-C keys this store also reads with (and copies from), after its own.
    pub fn with_older_customer_keys(mut self, keys: Vec<SseCustomerKey>) -> Self {
        self.older = (!keys.is_empty() && matches!(self.sse, Sse::Customer(_))).then(|| Arc::new(OlderKeys::new(keys)));
        self
    }

    /// The keys the source of a copy is read with: the copy-source settings if given, else this store's own.
    fn source_keys(&self) -> (&Sse, Option<&OlderKeys>) {
        match &self.copy_source_sse {
            Some((sse, older)) => (sse, older.as_deref()),
            None => (&self.sse, self.older.as_deref()),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn sse(&self) -> &Sse {
        &self.sse
    }

    /// The client's timeouts extended for a request body of `len` bytes (see [`Timeouts::read`]), or `None` when
    /// the plain ones do. The allowance is for the body rounded up to a power of two, so that there are only a few
    /// distinct settings (the SDK may keep a connection pool per setting).
    fn upload_timeouts(&self, len: u64) -> Option<TimeoutConfig> {
        let base = self.client.config().timeout_config()?;
        let read = base.read_timeout()?;
        let at_min_rate = |n: u64| Duration::from_secs_f64(n as f64 / MIN_UPLOAD_RATE as f64);
        if at_min_rate(len) <= read / 4 {
            return None;
        }
        self.extended_timeouts(at_min_rate(len.next_power_of_two()))
    }

    /// The client's timeouts with `allowance` added to the read, attempt and operation timeouts.
    fn extended_timeouts(&self, allowance: Duration) -> Option<TimeoutConfig> {
        let base = self.client.config().timeout_config()?;
        let mut t = TimeoutConfig::builder().read_timeout(base.read_timeout()? + allowance);
        t.set_connect_timeout(base.connect_timeout());
        t.set_operation_attempt_timeout(base.operation_attempt_timeout().map(|a| a + allowance));
        t.set_operation_timeout(base.operation_timeout().map(|o| o + allowance));
        Some(t.build())
    }

    /// `x-amz-copy-source`: `BUCKET/KEY`, URL-encoded (the SDK sends it as given).
    fn copy_source(&self, key: &str) -> String {
        format!("{}/{}", url_encode(&self.bucket), url_encode(key))
    }

    fn err<E>(&self, op: &str, key: &str, e: SdkError<E, HttpResponse>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        map_error(
            &ErrorContext {
                op,
                key,
                bucket: &self.bucket,
                sse: &self.sse,
            },
            e,
        )
    }
}

/// The [`ObjectInfo`] of a HEAD or GET response (distinct SDK types with the same accessors).
macro_rules! object_info {
    ($out:expr, $key:expr, $size:expr) => {
        ObjectInfo {
            key: $key.to_string(),
            size: $size,
            etag: $out.e_tag().unwrap_or_default().to_string(),
            last_modified: to_time($out.last_modified()),
            metadata: to_metadata($out.metadata()),
            sse_algorithm: $out.server_side_encryption().map(|s| s.as_str().to_string()),
            sse_kms_key_id: $out.ssekms_key_id().map(str::to_string),
            sse_customer_algorithm: $out.sse_customer_algorithm().map(str::to_string),
        }
    };
}

impl S3Store {
    async fn head_with(&self, key: &str, sse: Sse) -> StoreResult<ObjectInfo> {
        let req = self.client.head_object().bucket(&self.bucket).key(key);
        let out = sse_c!(req, &sse).send().await.map_err(|e| self.err("HEAD", key, e))?;
        Ok(object_info!(out, key, out.content_length().unwrap_or(0).max(0) as u64))
    }

    async fn get_with(
        &self,
        key: &str,
        range: Option<ByteRange>,
        if_match: Option<&str>,
        sse: Sse,
    ) -> StoreResult<GetOutput> {
        let range = range.map(|r| range_header(key, r)).transpose()?;
        let req = self.client.get_object().bucket(&self.bucket).key(key).set_range(range);
        let req = sse_c!(req, &sse).set_if_match(if_match.map(str::to_string));
        let out = match req.send().await.map_err(|e| self.err("GET", key, e)) {
            Err(StoreError::InvalidRange(msg)) => return self.empty_object_range(key, if_match, msg).await,
            other => other?,
        };
        let size = total_from_content_range(out.content_range());
        let info = object_info!(
            out,
            key,
            size.unwrap_or(out.content_length().unwrap_or(0).max(0) as u64)
        );
        // The body is copied chunk by chunk into one buffer of the announced length, each chunk freed once
        // copied: collecting the chunks first and then joining them would hold the body twice.
        let announced = out.content_length().unwrap_or(0).clamp(0, MAX_PRESIZED_BODY) as usize;
        let mut data = Vec::with_capacity(announced);
        let mut body = out.body;
        while let Some(chunk) = body.try_next().await.map_err(|e| {
            StoreError::Transient(format!(
                "GET {key}: reading the body failed: {}",
                DisplayErrorContext(&e)
            ))
        })? {
            data.extend_from_slice(&chunk);
        }
        Ok(GetOutput {
            data: Bytes::from(data),
            info,
        })
    }
}

/// Percent-encodes everything but unreserved characters and `/`.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn to_time(t: Option<&aws_smithy_types::DateTime>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

fn to_metadata(m: Option<&HashMap<String, String>>) -> Metadata {
    m.map(|m| m.iter().map(|(k, v)| (k.to_lowercase(), v.clone())).collect())
        .unwrap_or_default()
}

fn to_sdk_metadata(m: &Metadata) -> Option<HashMap<String, String>> {
    Some(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// The ETag a write's response reported. A missing or empty one is an error: the write happened, but an empty
/// base ETag would only turn the next conditional write into a spurious conflict.
fn response_etag(op: &str, key: &str, etag: Option<&str>) -> StoreResult<String> {
    match etag {
        Some(e) if !e.is_empty() => Ok(e.to_string()),
        _ => Err(StoreError::Other(format!(
            "{op} {key}: the write succeeded but its response carried no ETag"
        ))),
    }
}

/// The HTTP range header for a [`ByteRange`] (inclusive end on the wire).
fn range_header(key: &str, range: ByteRange) -> StoreResult<String> {
    match range {
        ByteRange::Range { start, end } if end <= start => {
            Err(StoreError::InvalidRequest(format!("{key}: empty range {start}..{end}")))
        }
        ByteRange::Range { start, end } => Ok(format!("bytes={start}-{}", end - 1)),
        ByteRange::Suffix(n) => Ok(format!("bytes=-{n}")),
    }
}

/// The whole object's size from `Content-Range: bytes a-b/TOTAL`.
fn total_from_content_range(cr: Option<&str>) -> Option<u64> {
    cr?.rsplit_once('/')?.1.parse().ok()
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        with_each_key(self.older.as_deref(), key, &self.sse, |sse| self.head_with(key, sse)).await
    }

    async fn get(&self, key: &str, range: Option<ByteRange>, if_match: Option<&str>) -> StoreResult<GetOutput> {
        let older = self.older.as_deref();
        with_each_key(older, key, &self.sse, |sse| self.get_with(key, range, if_match, sse)).await
    }

    async fn put(&self, key: &str, body: Bytes, metadata: &Metadata, cond: PutCondition) -> StoreResult<ObjectInfo> {
        let size = body.len() as u64;
        let req = self.client.put_object().bucket(&self.bucket).key(key).body(body.into());
        let req = condition!(write_sse!(req, &self.sse), &cond).set_metadata(to_sdk_metadata(metadata));
        let out = send_upload!(self, req, size).map_err(|e| self.err("PUT", key, e))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size,
            etag: out.e_tag().unwrap_or_default().to_string(),
            last_modified: None,
            metadata: metadata.clone(),
            sse_algorithm: out.server_side_encryption().map(|s| s.as_str().to_string()),
            sse_kms_key_id: out.ssekms_key_id().map(str::to_string),
            sse_customer_algorithm: out.sse_customer_algorithm().map(str::to_string),
        })
    }

    async fn create_multipart(&self, key: &str, metadata: &Metadata) -> StoreResult<String> {
        let req = self.client.create_multipart_upload().bucket(&self.bucket).key(key);
        let req = write_sse!(req, &self.sse).set_metadata(to_sdk_metadata(metadata));
        let out = req
            .send()
            .await
            .map_err(|e| self.err("CreateMultipartUpload", key, e))?;
        out.upload_id()
            .map(str::to_string)
            .ok_or_else(|| StoreError::Other(format!("CreateMultipartUpload {key}: no upload id in the response")))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
    ) -> StoreResult<CompletedPart> {
        let len = body.len() as u64;
        self.send_part(key, upload_id, part_number, body.into(), len).await
    }

    async fn upload_part_file(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        path: &std::path::Path,
        len: u64,
    ) -> StoreResult<CompletedPart> {
        let body = aws_sdk_s3::primitives::ByteStream::read_from()
            .path(path)
            .length(aws_sdk_s3::primitives::Length::Exact(len))
            .build()
            .await
            .map_err(|e| StoreError::Other(format!("UploadPart {key}: reading {}: {e}", path.display())))?;
        self.send_part(key, upload_id, part_number, body, len).await
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
        if source_range.end <= source_range.start {
            return Err(StoreError::InvalidRequest(format!(
                "{source_key}: empty copy range {source_range:?}"
            )));
        }
        let req = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id);
        let req = req
            .part_number(part_number)
            .copy_source(self.copy_source(source_key))
            .copy_source_range(format!("bytes={}-{}", source_range.start, source_range.end - 1))
            .set_copy_source_if_match(source_if_match.map(str::to_string));
        let req = &sse_c!(req, &self.sse);
        let (source_sse, source_older) = self.source_keys();
        let out = with_each_key(source_older, source_key, source_sse, |source| async move {
            let req = copy_source_sse_c!(req.clone(), &source);
            req.send().await.map_err(|e| self.err("UploadPartCopy", key, e))
        })
        .await?;
        let etag = out
            .copy_part_result()
            .and_then(|r| r.e_tag())
            .unwrap_or_default()
            .to_string();
        Ok(CompletedPart { part_number, etag })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        cond: PutCondition,
    ) -> StoreResult<String> {
        let part_count = parts.len() as u32;
        let parts = parts
            .into_iter()
            .map(|p| {
                S3CompletedPart::builder()
                    .part_number(p.part_number)
                    .e_tag(p.etag)
                    .build()
            })
            .collect();
        let upload = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        let req = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id);
        let req = condition!(req.multipart_upload(upload), &cond);
        // S3 may take minutes to assemble a large object before it answers (AWS keeps the connection alive with
        // whitespace; other servers, LocalStack among them, say nothing until done). Cutting it off at the plain
        // read timeout and retrying raced the first completion: a 10 GiB object came out unreadable.
        let timeouts = self.extended_timeouts(COMPLETE_ALLOWANCE_PER_PART * part_count);
        let out = send_with_timeouts!(req, timeouts).map_err(|e| self.err("CompleteMultipartUpload", key, e))?;
        response_etag("CompleteMultipartUpload", key, out.e_tag())
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<(String, String)>> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker): (Option<String>, Option<String>) = (None, None);
        loop {
            let req = self.client.list_multipart_uploads().bucket(&self.bucket).prefix(prefix);
            let page = req
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| self.err("ListMultipartUploads", prefix, e))?;
            for u in page.uploads() {
                if let (Some(k), Some(id)) = (u.key(), u.upload_id()) {
                    out.push((k.to_string(), id.to_string()));
                }
            }
            if page.is_truncated() != Some(true) {
                return Ok(out);
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && id_marker.is_none() {
                return Ok(out);
            }
        }
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        let req = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id);
        req.send().await.map_err(|e| self.err("AbortMultipartUpload", key, e))?;
        Ok(())
    }

    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<&Metadata>,
        cond: PutCondition,
    ) -> StoreResult<String> {
        let req = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(dest_key)
            .copy_source(self.copy_source(source_key));
        let req = match metadata {
            Some(m) => req
                .metadata_directive(MetadataDirective::Replace)
                .set_metadata(to_sdk_metadata(m)),
            None => req.metadata_directive(MetadataDirective::Copy),
        };
        let req = &condition!(write_sse!(req, &self.sse), &cond);
        let (source_sse, source_older) = self.source_keys();
        let out = with_each_key(source_older, source_key, source_sse, |source| async move {
            let req = copy_source_sse_c!(req.clone(), &source);
            req.send().await.map_err(|e| self.err("CopyObject", dest_key, e))
        })
        .await?;
        let etag = out.copy_object_result().and_then(|r| r.e_tag());
        response_etag("CopyObject", dest_key, etag)
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let req = self.client.delete_object().bucket(&self.bucket).key(key);
        req.send().await.map_err(|e| self.err("DeleteObject", key, e))?;
        Ok(())
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        for batch in keys.chunks(DELETE_BATCH) {
            self.delete_batch(batch).await?;
        }
        Ok(())
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<&str>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        let req = self.client.list_objects_v2().bucket(&self.bucket).prefix(prefix);
        let req = req
            .set_delimiter(delimiter.map(str::to_string))
            .set_continuation_token(continuation.map(str::to_string))
            .set_max_keys(max_keys);
        let out = req.send().await.map_err(|e| self.err("ListObjectsV2", prefix, e))?;
        let objects = out
            .contents()
            .iter()
            .map(|o| ListEntry {
                key: o.key().unwrap_or_default().to_string(),
                size: o.size().unwrap_or(0).max(0) as u64,
                etag: o.e_tag().unwrap_or_default().to_string(),
                last_modified: to_time(o.last_modified()),
            })
            .collect();
        let common_prefixes = out
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix().map(str::to_string))
            .collect();
        let next_token = match out.is_truncated() {
            Some(true) => out.next_continuation_token().map(str::to_string),
            _ => None,
        };
        Ok(ListPage {
            objects,
            common_prefixes,
            next_token,
        })
    }
}

impl S3Store {
    /// UploadPart of a body of `len` bytes, from memory or streamed from a file.
    async fn send_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: aws_sdk_s3::primitives::ByteStream,
        len: u64,
    ) -> StoreResult<CompletedPart> {
        let req = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id);
        let req = sse_c!(req.part_number(part_number).body(body), &self.sse);
        let out = send_upload!(self, req, len).map_err(|e| self.err("UploadPart", key, e))?;
        Ok(CompletedPart {
            part_number,
            etag: out.e_tag().unwrap_or_default().to_string(),
        })
    }

    /// S3 refuses every range of an empty object with 416, while the [`ByteRange`] contract gives an empty body
    /// there (a start past the end is an error only for a non-empty object). After a 416 one HEAD tells which
    /// case it was; the extra request happens only on this error path.
    async fn empty_object_range(&self, key: &str, if_match: Option<&str>, msg: String) -> StoreResult<GetOutput> {
        let info = self.head(key).await?;
        if info.size != 0 {
            return Err(StoreError::InvalidRange(msg));
        }
        if if_match.is_some_and(|etag| etag != info.etag) {
            return Err(StoreError::PreconditionFailed(format!(
                "GET {key}: If-Match {if_match:?} but ETag {}",
                info.etag
            )));
        }
        Ok(GetOutput {
            data: Bytes::new(),
            info,
        })
    }

    async fn delete_batch(&self, keys: &[String]) -> StoreResult<()> {
        let first = keys.first().map(String::as_str).unwrap_or("");
        let ids = keys
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::InvalidRequest(format!("DeleteObjects: {e}")))?;
        let delete = Delete::builder()
            .set_objects(Some(ids))
            .quiet(true)
            .build()
            .map_err(|e| StoreError::InvalidRequest(format!("DeleteObjects: {e}")))?;
        let req = self.client.delete_objects().bucket(&self.bucket).delete(delete);
        let out = req.send().await.map_err(|e| self.err("DeleteObjects", first, e))?;
        match out.errors().first() {
            None => Ok(()),
            Some(e) => {
                let key = e.key().unwrap_or_default();
                let status = match e.code() {
                    Some("AccessDenied") => 403,
                    Some("InternalError" | "SlowDown" | "ServiceUnavailable") => 500,
                    _ => 0,
                };
                let ctx = ErrorContext {
                    op: "DeleteObjects",
                    key,
                    bucket: &self.bucket,
                    sse: &self.sse,
                };
                Err(classify(&ctx, status, e.code(), e.message()))
            }
        }
    }
}

/// What a request was about, for error messages.
struct ErrorContext<'a> {
    op: &'a str,
    key: &'a str,
    bucket: &'a str,
    sse: &'a Sse,
}

/// Maps an SDK error to a [`StoreError`]: by kind for failures without a response (dispatch, timeouts, broken
/// responses: transient), else by the HTTP status and the S3 error code.
fn map_error<E>(ctx: &ErrorContext<'_>, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let what = format!("{} {} (bucket {})", ctx.op, ctx.key, ctx.bucket);
    match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            // The message keeps the innermost cause ("connection reset by peer"); the SDK's whole chain, which
            // runs to hundreds of characters, goes to the debug log only.
            log::debug!("{what}: {}", DisplayErrorContext(&err));
            StoreError::Transient(format!("{what}: {}", short_cause(&err)))
        }
        SdkError::ConstructionFailure(_) => {
            log::debug!("{what}: {}", DisplayErrorContext(&err));
            StoreError::InvalidRequest(format!("{what}: {}", short_cause(&err)))
        }
        _ => {
            let status = err.raw_response().map(|r| r.status().as_u16()).unwrap_or(0);
            classify(ctx, status, err.code(), err.message())
        }
    }
}

/// What an SDK error without a response says, short: its kind and its innermost cause's own message.
fn short_cause<E: std::error::Error + 'static>(err: &SdkError<E, HttpResponse>) -> String {
    let kind = match err {
        SdkError::TimeoutError(_) => "timeout",
        SdkError::DispatchFailure(_) => "connection failed",
        SdkError::ResponseError(_) => "broken response",
        SdkError::ConstructionFailure(_) => "request could not be built",
        _ => "error",
    };
    let mut cause: &dyn std::error::Error = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    let msg = cause.to_string();
    if std::ptr::eq(cause as *const _ as *const u8, err as *const _ as *const u8) || msg.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {msg}")
    }
}

/// Classifies a service error by status and code.
fn classify(ctx: &ErrorContext<'_>, status: u16, code: Option<&str>, message: Option<&str>) -> StoreError {
    let what = format!("{} {}", ctx.op, ctx.key);
    let detail = match (code, message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.to_string(),
        (None, Some(m)) => m.to_string(),
        (None, None) => format!("HTTP {status}"),
    };
    match (status, code.unwrap_or("")) {
        (_, "NoSuchBucket") => StoreError::NoSuchBucket(format!("{} ({what}: {detail})", ctx.bucket)),
        (_, "NoSuchKey" | "NoSuchUpload") | (404, _) => StoreError::NotFound(format!("{what}: {detail}")),
        (_, "AccessDenied") | (403, _) => StoreError::AccessDenied(format!("{what}: {detail}{}", access_hint(ctx.sse))),
        (_, "PreconditionFailed" | "ConditionalRequestConflict") | (412 | 409, _) => {
            StoreError::PreconditionFailed(format!("{what}: {detail}"))
        }
        (_, "InvalidRange") | (416, _) => StoreError::InvalidRange(format!("{what}: {detail}")),
        (_, "SlowDown" | "Throttling" | "ThrottlingException" | "RequestTimeout" | "InternalError")
        | (429 | 500..=599, _) => StoreError::Transient(format!("{what}: {detail}")),
        (400, c) => StoreError::InvalidRequest(format!("{what}: {detail}{}", kms_hint(ctx.sse, c, message))),
        _ => StoreError::Other(format!("{what}: {detail}")),
    }
}

fn access_hint(sse: &Sse) -> &'static str {
    match sse {
        Sse::Customer(_) => {
            " (SSE-C: the customer key is missing or wrong for this object, or the bucket blocks SSE-C writes: \
             new S3 buckets reject SSE-C until it is allowed in the bucket's encryption configuration \
             with PutBucketEncryption)"
        }
        Sse::Kms { .. } => " (SSE-KMS: the credentials also need kms:GenerateDataKey and kms:Decrypt on the key)",
        _ => "",
    }
}

fn kms_hint(sse: &Sse, code: &str, message: Option<&str>) -> String {
    let mentions_kms =
        code.to_ascii_lowercase().contains("kms") || message.is_some_and(|m| m.to_ascii_lowercase().contains("kms"));
    match sse {
        Sse::Kms { key_id: Some(id) } if mentions_kms => {
            format!(" (SSE-KMS key id {id:?}: check that the key exists in this region and is enabled)")
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(timeouts: Timeouts) -> S3Store {
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(DEFAULT_REGION))
            .timeout_config(timeouts.sdk())
            .build();
        S3Store::new(Client::from_conf(conf), "b", Sse::None)
    }

    #[test]
    fn uploads_get_time_for_their_body_at_the_minimum_rate() {
        let store = store_with(Timeouts::default());
        assert_eq!(store.upload_timeouts(0), None);
        assert_eq!(
            store.upload_timeouts(640 * 1024),
            None,
            "5 s at 1 Mbit/s fits in the 20 s read timeout"
        );
        let t = store.upload_timeouts(16 * 1024 * 1024).expect("16 MiB needs more");
        let allowance = Duration::from_secs(128);
        assert_eq!(t.read_timeout(), Some(Duration::from_secs(20) + allowance));
        assert_eq!(
            t.operation_attempt_timeout(),
            Some(Duration::from_secs(600) + allowance)
        );
        assert_eq!(t.connect_timeout(), Some(Duration::from_secs(10)));
        assert_eq!(
            store.upload_timeouts(9 * 1024 * 1024),
            Some(t),
            "sizes are rounded up to a power of two"
        );
        let smaller = store.upload_timeouts(8 * 1024 * 1024).unwrap();
        assert_eq!(smaller.read_timeout(), Some(Duration::from_secs(20 + 64)));
    }

    #[test]
    fn a_write_without_an_etag_in_its_response_is_an_error() {
        assert_eq!(response_etag("CopyObject", "k", Some("\"e\"")).unwrap(), "\"e\"");
        for missing in [None, Some("")] {
            let err = response_etag("CopyObject", "k", missing).unwrap_err();
            assert!(matches!(&err, StoreError::Other(m) if m.contains("no ETag")), "{err:?}");
        }
    }

    #[test]
    fn url_encoding_keeps_slashes_and_escapes_the_rest() {
        assert_eq!(url_encode("a/b c+d%é"), "a/b%20c%2Bd%25%C3%A9");
    }

    #[test]
    fn ranges_are_inclusive_on_the_wire() {
        assert_eq!(
            range_header("k", ByteRange::Range { start: 0, end: 1 }).unwrap(),
            "bytes=0-0"
        );
        assert_eq!(range_header("k", ByteRange::Suffix(5)).unwrap(), "bytes=-5");
        assert!(range_header("k", ByteRange::Range { start: 3, end: 3 }).is_err());
        assert_eq!(total_from_content_range(Some("bytes 0-0/42")), Some(42));
    }

    #[test]
    fn classification_by_status_and_code() {
        let sse = Sse::Customer(crate::store::SseCustomerKey::new([1; 32]));
        let ctx = ErrorContext {
            op: "GET",
            key: "k",
            bucket: "b",
            sse: &sse,
        };
        assert!(matches!(
            classify(&ctx, 404, Some("NoSuchBucket"), None),
            StoreError::NoSuchBucket(_)
        ));
        assert!(matches!(classify(&ctx, 404, None, None), StoreError::NotFound(_)));
        assert!(
            matches!(classify(&ctx, 403, None, None), StoreError::AccessDenied(m) if m.contains("PutBucketEncryption"))
        );
        assert!(matches!(
            classify(&ctx, 409, Some("ConditionalRequestConflict"), None),
            StoreError::PreconditionFailed(_)
        ));
        assert!(matches!(
            classify(&ctx, 503, Some("SlowDown"), None),
            StoreError::Transient(_)
        ));
        assert!(
            matches!(classify(&ctx, 400, Some("InvalidArgument"), Some("x")), StoreError::InvalidRequest(m) if m.contains("InvalidArgument: x"))
        );
        assert!(matches!(classify(&ctx, 301, None, None), StoreError::Other(_)));
    }
}
