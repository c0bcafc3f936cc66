//! [`MemoryStore`]: the [`ObjectStore`] semantics of S3, held in memory.
//!
//! It exists so that the file system can be tested fast and deterministically, with the same suite that runs
//! against a real S3 API server. It therefore follows S3 where S3 is observable to s3crypt:
//! - ETags are the quoted hex MD5 of the body for single PUTs and copies, and `"HEX-N"` for multipart uploads
//!   (HEX is the MD5 of the concatenated binary part MD5s, N the number of parts), as S3 computes them.
//! - Ranges: an end past the object is cut to the object; a start at or past the end of a non-empty object is
//!   [`StoreError::InvalidRange`]; a suffix longer than the object returns the whole object.
//! - Conditions: `If-None-Match: *` fails on an existing key, `If-Match` fails on another ETag and on a missing
//!   key (as S3 answers 404 there, this is [`StoreError::NotFound`]).
//! - PUT returns no `last_modified` (S3's PutObject response has none); HEAD, GET and listings do.
//!   CompleteMultipartUpload and CopyObject return only the new ETag, as their S3 responses carry nothing else
//!   that s3crypt uses.
//! - UploadPartCopy of a range outside the source is [`StoreError::InvalidRequest`] (S3: 400 InvalidArgument).
//! - Multipart: parts are listed in ascending order; every part but the last is at least 5 MiB
//!   ([`MIN_PART_SIZE`]); a completed or aborted upload id is gone ([`StoreError::NotFound`]).
//! - Listing: lexicographic by key (bytes), common prefixes count toward `max_keys`, and the continuation
//!   token is opaque.
//! - Server-side encryption: the [`Sse`] the store was built with is reported in [`ObjectInfo`] the way S3
//!   reports it (no header: `AES256`, the default encryption of a new bucket).
//!
//! All state sits behind one `std::sync::Mutex`, never held across an `.await` (no method awaits).
use super::{
    join, ByteRange, CompletedPart, GetOutput, GetPieces, ListEntry, ListPage, Metadata, ObjectInfo, ObjectStore,
    PutCondition, Sse, StoreError, StoreResult,
};
use async_trait::async_trait;
use bytes::Bytes;
use md5::{Digest, Md5};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::Mutex;
use std::time::SystemTime;

/// The smallest size of a multipart part other than the last, in bytes (S3's limit: 5 MiB).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

/// The default and largest page size of a listing (S3: 1,000).
const MAX_LIST_KEYS: usize = 1000;

/// An object's bytes as the parts that made it: completing a multipart upload keeps its parts as they are rather
/// than copying them into one buffer (the copy would be this mock's cost, not the caller's, in a benchmark).
#[derive(Clone, Debug, Default)]
struct Body {
    parts: Vec<Bytes>,
    len: usize,
}

impl Body {
    fn new(parts: Vec<Bytes>) -> Self {
        let parts: Vec<Bytes> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        let len = parts.iter().map(Bytes::len).sum();
        Body { parts, len }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Bytes `range`: a slice of one part when it lies in one, else a copy.
    fn slice(&self, range: std::ops::Range<usize>) -> Bytes {
        join(self.pieces(range))
    }

    /// Bytes `range` as slices of the parts that hold them, without a copy.
    fn pieces(&self, range: std::ops::Range<usize>) -> Vec<Bytes> {
        let mut at = 0;
        let mut out = Vec::new();
        for p in &self.parts {
            let (start, end) = (at, at + p.len());
            at = end;
            if end <= range.start || start >= range.end {
                continue;
            }
            out.push(p.slice(range.start.max(start) - start..range.end.min(end) - start));
        }
        out
    }
}

#[derive(Clone, Debug)]
struct Object {
    data: Body,
    etag: String,
    metadata: Metadata,
    last_modified: SystemTime,
}

#[derive(Debug)]
struct Upload {
    key: String,
    metadata: Metadata,
    /// Part number → (data, ETag).
    parts: BTreeMap<i32, (Bytes, String)>,
}

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Object>,
    uploads: HashMap<String, Upload>,
    next_upload: u64,
}

/// An in-memory object store with S3's semantics. See the module documentation.
#[derive(Debug, Default)]
pub struct MemoryStore {
    sse: Sse,
    state: Mutex<State>,
    /// Benchmark mode: ETags are unique counters instead of MD5s of the body (see [`MemoryStore::fast`]).
    fast_etags: bool,
    next_etag: std::sync::atomic::AtomicU64,
    /// The largest source one CopyObject takes (`None`: S3's [`COPY_MAX`]).
    copy_limit: Option<u64>,
}

impl MemoryStore {
    /// An empty store reporting no server-side encryption header (objects show `AES256`, as on a new bucket).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store that reports `sse` on every object, as S3 would for objects written with that mode.
    pub fn with_sse(sse: Sse) -> Self {
        MemoryStore {
            sse,
            state: Mutex::default(),
            fast_etags: false,
            next_etag: Default::default(),
            copy_limit: None,
        }
    }

    /// The same store with CopyObject refusing sources over `limit` bytes (S3 refuses over 5 GiB): for tests
    /// of the multipart copy with small objects.
    pub fn with_copy_limit(mut self, limit: u64) -> Self {
        self.copy_limit = Some(limit);
        self
    }

    /// A store for benchmarks: every write gets a new unique ETag instead of the MD5 S3 would compute, so that
    /// hashing in the mock does not hide the cost of the code being measured. Conditions behave the same.
    pub fn fast() -> Self {
        MemoryStore {
            fast_etags: true,
            ..Self::default()
        }
    }

    /// The ETag of a single-part object whose bytes are `parts` one after another.
    fn etag(&self, parts: &[Bytes]) -> String {
        if self.fast_etags {
            format!(
                "\"mem-{}\"",
                self.next_etag.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            )
        } else {
            md5_etag(parts)
        }
    }

    fn multipart_etag(&self, parts: &[Bytes]) -> String {
        if self.fast_etags {
            format!(
                "\"mem-{}-{}\"",
                self.next_etag.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                parts.len()
            )
        } else {
            multipart_etag(parts)
        }
    }

    /// The number of objects held (for tests).
    pub fn len(&self) -> usize {
        self.lock().objects.len()
    }

    /// Whether the store holds no objects.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of multipart uploads started and neither completed nor aborted (for leak checks in tests).
    pub fn open_uploads(&self) -> usize {
        self.lock().uploads.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters to tests.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn info(&self, key: &str, obj: &Object) -> ObjectInfo {
        let (sse_algorithm, sse_kms_key_id, sse_customer_algorithm) = match &self.sse {
            Sse::None | Sse::S3 => (Some("AES256".to_string()), None, None),
            Sse::Kms { key_id } => (Some("aws:kms".to_string()), key_id.clone(), None),
            Sse::Customer(_) => (None, None, Some("AES256".to_string())),
        };
        ObjectInfo {
            key: key.to_string(),
            size: obj.data.len() as u64,
            etag: obj.etag.clone(),
            last_modified: Some(obj.last_modified),
            metadata: obj.metadata.clone(),
            sse_algorithm,
            sse_kms_key_id,
            sse_customer_algorithm,
        }
    }
}

/// MD5 of the bytes of `parts` one after another, hashed where they lie.
fn md5_etag(parts: &[Bytes]) -> String {
    let mut md5 = Md5::new();
    parts.iter().for_each(|p| md5.update(p));
    format!("\"{}\"", hex::encode(md5.finalize()))
}

/// The multipart ETag S3 computes: MD5 of the concatenated binary MD5s of the parts, then `-N`.
fn multipart_etag(parts: &[Bytes]) -> String {
    let mut all = Md5::new();
    for p in parts {
        all.update(Md5::digest(p));
    }
    format!("\"{}-{}\"", hex::encode(all.finalize()), parts.len())
}

fn check_cond(state: &State, key: &str, cond: &PutCondition) -> StoreResult<()> {
    let existing = state.objects.get(key);
    match (cond, existing) {
        (PutCondition::None, _) => Ok(()),
        (PutCondition::IfNoneMatch, None) => Ok(()),
        (PutCondition::IfNoneMatch, Some(_)) => Err(StoreError::PreconditionFailed(format!(
            "{key}: If-None-Match: * but the object exists"
        ))),
        (PutCondition::IfMatch(_), None) => Err(StoreError::NotFound(format!("{key} (If-Match on a missing key)"))),
        (PutCondition::IfMatch(etag), Some(obj)) if &obj.etag == etag => Ok(()),
        (PutCondition::IfMatch(etag), Some(obj)) => Err(StoreError::PreconditionFailed(format!(
            "{key}: If-Match {etag} but the object has ETag {}",
            obj.etag
        ))),
    }
}

fn check_source_etag(key: &str, obj: &Object, if_match: Option<&str>) -> StoreResult<()> {
    match if_match {
        Some(etag) if etag != obj.etag => Err(StoreError::PreconditionFailed(format!(
            "{key}: If-Match {etag} but the object has ETag {}",
            obj.etag
        ))),
        _ => Ok(()),
    }
}

/// Resolves a GET range against an object of `size` bytes as S3 does.
fn resolve_range(key: &str, size: u64, range: ByteRange) -> StoreResult<Range<u64>> {
    match range {
        ByteRange::Range { start, end } if end <= start => {
            Err(StoreError::InvalidRequest(format!("{key}: empty range {start}..{end}")))
        }
        ByteRange::Range { .. } if size == 0 => Ok(0..0),
        ByteRange::Range { start, .. } if start >= size => Err(StoreError::InvalidRange(format!(
            "{key}: start {start} at or past the end ({size} bytes)"
        ))),
        ByteRange::Range { start, end } => Ok(start..end.min(size)),
        ByteRange::Suffix(0) => Err(StoreError::InvalidRange(format!("{key}: empty suffix range"))),
        ByteRange::Suffix(n) => Ok(size.saturating_sub(n)..size),
    }
}

/// Where a listing resumes: after a key, or after every key under a common prefix.
fn encode_token(last_key: Option<&str>, last_prefix: Option<&str>) -> String {
    match (last_key, last_prefix) {
        (_, Some(p)) => format!("p:{p}"),
        (Some(k), None) => format!("k:{k}"),
        (None, None) => String::new(),
    }
}

fn token_passes(token: Option<&str>, key: &str) -> StoreResult<bool> {
    let Some(token) = token else { return Ok(true) };
    if let Some(p) = token.strip_prefix("p:") {
        Ok(key > p && !key.starts_with(p))
    } else if let Some(k) = token.strip_prefix("k:") {
        Ok(key > k)
    } else {
        Err(StoreError::InvalidRequest(format!(
            "invalid continuation token {token:?}"
        )))
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        let state = self.lock();
        let obj = state
            .objects
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        Ok(self.info(key, obj))
    }

    async fn get(&self, key: &str, range: Option<ByteRange>, if_match: Option<&str>) -> StoreResult<GetOutput> {
        let out = self.get_pieces(key, range, if_match).await?;
        Ok(GetOutput {
            data: join(out.pieces),
            info: out.info,
        })
    }

    async fn get_pieces(&self, key: &str, range: Option<ByteRange>, if_match: Option<&str>) -> StoreResult<GetPieces> {
        let state = self.lock();
        let obj = state
            .objects
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.to_string()))?;
        check_source_etag(key, obj, if_match)?;
        let r = match range {
            None => 0..obj.data.len(),
            Some(r) => {
                let r = resolve_range(key, obj.data.len() as u64, r)?;
                r.start as usize..r.end as usize
            }
        };
        Ok(GetPieces {
            pieces: obj.data.pieces(r),
            info: self.info(key, obj),
        })
    }

    async fn put(&self, key: &str, body: Bytes, metadata: &Metadata, cond: PutCondition) -> StoreResult<ObjectInfo> {
        let etag = self.etag(std::slice::from_ref(&body));
        let mut state = self.lock();
        check_cond(&state, key, &cond)?;
        let obj = Object {
            data: Body::new(vec![body]),
            etag,
            metadata: metadata.clone(),
            last_modified: SystemTime::now(),
        };
        // S3's PutObject response carries no Last-Modified; only HEAD, GET and listings report it.
        let info = ObjectInfo {
            last_modified: None,
            ..self.info(key, &obj)
        };
        state.objects.insert(key.to_string(), obj);
        Ok(info)
    }

    async fn create_multipart(&self, key: &str, metadata: &Metadata) -> StoreResult<String> {
        let mut state = self.lock();
        state.next_upload += 1;
        let id = format!("mem-upload-{}", state.next_upload);
        let upload = Upload {
            key: key.to_string(),
            metadata: metadata.clone(),
            parts: BTreeMap::new(),
        };
        state.uploads.insert(id.clone(), upload);
        Ok(id)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
    ) -> StoreResult<CompletedPart> {
        let etag = self.etag(std::slice::from_ref(&body));
        let mut state = self.lock();
        let upload = find_upload(&mut state, key, upload_id)?;
        check_part_number(part_number)?;
        upload.parts.insert(part_number, (body, etag.clone()));
        Ok(CompletedPart { part_number, etag })
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
        let mut state = self.lock();
        let source = state
            .objects
            .get(source_key)
            .ok_or_else(|| StoreError::NotFound(source_key.to_string()))?;
        check_source_etag(source_key, source, source_if_match)?;
        let size = source.data.len() as u64;
        if source_range.start >= source_range.end || source_range.end > size {
            // S3 answers 400 InvalidArgument here, not 416.
            return Err(StoreError::InvalidRequest(format!(
                "{source_key}: InvalidArgument: copy range {source_range:?} outside the object ({size} bytes)"
            )));
        }
        let data = source
            .data
            .slice(source_range.start as usize..source_range.end as usize);
        let upload = find_upload(&mut state, key, upload_id)?;
        check_part_number(part_number)?;
        let etag = self.etag(std::slice::from_ref(&data));
        upload.parts.insert(part_number, (data, etag.clone()));
        Ok(CompletedPart { part_number, etag })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        cond: PutCondition,
    ) -> StoreResult<String> {
        let mut state = self.lock();
        let upload = find_upload(&mut state, key, upload_id)?;
        let datas = assemble_parts(key, upload, &parts)?;
        check_cond(&state, key, &cond)?;
        let upload = state.uploads.remove(upload_id).expect("upload found above");
        let etag = self.multipart_etag(&datas);
        let obj = Object {
            data: Body::new(datas),
            etag: etag.clone(),
            metadata: upload.metadata,
            last_modified: SystemTime::now(),
        };
        state.objects.insert(key.to_string(), obj);
        Ok(etag)
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<(String, String)>> {
        let state = self.lock();
        let mut out: Vec<(String, String)> = state
            .uploads
            .iter()
            .filter(|(_, u)| u.key.starts_with(prefix))
            .map(|(id, u)| (u.key.clone(), id.clone()))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        let mut state = self.lock();
        find_upload(&mut state, key, upload_id)?;
        state.uploads.remove(upload_id);
        Ok(())
    }

    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<&Metadata>,
        cond: PutCondition,
    ) -> StoreResult<String> {
        let mut state = self.lock();
        let source = state
            .objects
            .get(source_key)
            .ok_or_else(|| StoreError::NotFound(source_key.to_string()))?;
        let limit = self.copy_limit.unwrap_or(super::COPY_MAX);
        if source.data.len() as u64 > limit {
            return Err(StoreError::InvalidRequest(format!(
                "{source_key}: the copy source is larger than the maximum allowable size for a copy source ({limit} bytes)"
            )));
        }
        let metadata = metadata.cloned().unwrap_or_else(|| source.metadata.clone());
        // A copy is a new object: S3 gives it the MD5 ETag of its bytes, even when the source was multipart.
        let obj = Object {
            etag: self.etag(&source.data.parts),
            data: source.data.clone(),
            metadata,
            last_modified: SystemTime::now(),
        };
        check_cond(&state, dest_key, &cond)?;
        let etag = obj.etag.clone();
        state.objects.insert(dest_key.to_string(), obj);
        Ok(etag)
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.lock().objects.remove(key);
        Ok(())
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        let mut state = self.lock();
        for key in keys {
            state.objects.remove(key);
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
        let max = match max_keys {
            None => MAX_LIST_KEYS,
            Some(n) if n < 0 => return Err(StoreError::InvalidRequest(format!("max_keys {n} is negative"))),
            Some(n) => (n as usize).min(MAX_LIST_KEYS),
        };
        let state = self.lock();
        list_page(&state, prefix, delimiter.filter(|d| !d.is_empty()), continuation, max)
    }
}

fn find_upload<'a>(state: &'a mut State, key: &str, upload_id: &str) -> StoreResult<&'a mut Upload> {
    match state.uploads.get_mut(upload_id) {
        Some(u) if u.key == key => Ok(u),
        _ => Err(StoreError::NotFound(format!("{key}: no such upload {upload_id}"))),
    }
}

fn check_part_number(n: i32) -> StoreResult<()> {
    if (1..=10_000).contains(&n) {
        Ok(())
    } else {
        Err(StoreError::InvalidRequest(format!("part number {n} outside 1..=10000")))
    }
}

/// Checks the part list of a CompleteMultipartUpload as S3 does and returns the parts' data in order.
fn assemble_parts(key: &str, upload: &Upload, parts: &[CompletedPart]) -> StoreResult<Vec<Bytes>> {
    if parts.is_empty() {
        return Err(StoreError::InvalidRequest(format!("{key}: MalformedXML: no parts")));
    }
    let mut datas = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 && part.part_number <= parts[i - 1].part_number {
            return Err(StoreError::InvalidRequest(format!("{key}: InvalidPartOrder")));
        }
        let (data, etag) = upload.parts.get(&part.part_number).ok_or_else(|| {
            StoreError::InvalidRequest(format!(
                "{key}: InvalidPart: part {} was not uploaded",
                part.part_number
            ))
        })?;
        if etag != &part.etag {
            return Err(StoreError::InvalidRequest(format!(
                "{key}: InvalidPart: ETag of part {}",
                part.part_number
            )));
        }
        if i + 1 < parts.len() && (data.len() as u64) < MIN_PART_SIZE {
            return Err(StoreError::InvalidRequest(format!(
                "{key}: EntityTooSmall: part {} has {} bytes",
                part.part_number,
                data.len()
            )));
        }
        datas.push(data.clone());
    }
    Ok(datas)
}

fn list_page(
    state: &State,
    prefix: &str,
    delimiter: Option<&str>,
    continuation: Option<&str>,
    max: usize,
) -> StoreResult<ListPage> {
    let mut page = ListPage::default();
    if max == 0 {
        return Ok(page);
    }
    let (mut last_key, mut last_prefix): (Option<&str>, Option<String>) = (None, None);
    let mut count = 0;
    let mut truncated = false;
    for (key, obj) in state.objects.range(prefix.to_string()..) {
        if !key.starts_with(prefix) {
            break;
        }
        if !token_passes(continuation, key)? {
            continue;
        }
        let common = delimiter.and_then(|d| key[prefix.len()..].find(d).map(|i| &key[..prefix.len() + i + d.len()]));
        if let Some(cp) = common {
            if page.common_prefixes.last().map(String::as_str) == Some(cp) {
                continue;
            }
        }
        if count == max {
            truncated = true;
            break;
        }
        count += 1;
        match common {
            Some(cp) => {
                page.common_prefixes.push(cp.to_string());
                (last_key, last_prefix) = (None, Some(cp.to_string()));
            }
            None => {
                page.objects.push(ListEntry {
                    key: key.clone(),
                    size: obj.data.len() as u64,
                    etag: obj.etag.clone(),
                    last_modified: Some(obj.last_modified),
                });
                (last_key, last_prefix) = (Some(key.as_str()), None);
            }
        }
    }
    if truncated {
        page.next_token = Some(encode_token(last_key, last_prefix.as_deref()));
    }
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// What one full listing must return: (keys, common prefixes), straight from the definition.
    fn model(keys: &BTreeSet<String>, prefix: &str, delim: Option<&str>) -> (Vec<String>, Vec<String>) {
        let (mut objects, mut prefixes) = (Vec::new(), BTreeSet::new());
        for k in keys.iter().filter(|k| k.starts_with(prefix)) {
            match delim.and_then(|d| {
                k[prefix.len()..]
                    .find(d)
                    .map(|i| k[..prefix.len() + i + d.len()].to_string())
            }) {
                Some(p) => {
                    prefixes.insert(p);
                }
                None => objects.push(k.clone()),
            }
        }
        (objects, prefixes.into_iter().collect())
    }

    fn list_all(store: &MemoryStore, prefix: &str, delim: Option<&str>, max: i32) -> (Vec<String>, Vec<String>) {
        let (mut objects, mut prefixes, mut token) = (Vec::new(), Vec::new(), None::<String>);
        loop {
            let page = futures::executor::block_on(store.list(prefix, delim, token.as_deref(), Some(max))).unwrap();
            assert!(page.objects.len() + page.common_prefixes.len() <= max as usize);
            objects.extend(page.objects.into_iter().map(|o| o.key));
            prefixes.extend(page.common_prefixes);
            match page.next_token {
                Some(t) => token = Some(t),
                None => return (objects, prefixes),
            }
        }
    }

    proptest! {
        #[test]
        fn paginated_listing_matches_the_model(
            keys in prop::collection::btree_set("[ab/]{1,6}", 0..40),
            prefix in "[ab/]{0,2}",
            use_delim: bool,
            max in 1i32..6,
        ) {
            let store = MemoryStore::new();
            for k in &keys {
                futures::executor::block_on(store.put(k, Bytes::new(), &Metadata::new(), PutCondition::None)).unwrap();
            }
            let delim = use_delim.then_some("/");
            prop_assert_eq!(list_all(&store, &prefix, delim, max), model(&keys, &prefix, delim));
        }
    }

    #[test]
    fn multipart_etag_is_md5_of_part_md5s() {
        let parts = [Bytes::from_static(b"a"), Bytes::from_static(b"b")];
        let mut cat = Md5::digest(b"a").to_vec();
        cat.extend_from_slice(&Md5::digest(b"b"));
        assert_eq!(
            multipart_etag(&parts),
            format!("\"{}-2\"", hex::encode(Md5::digest(&cat)))
        );
    }

    #[test]
    fn a_body_of_parts_slices_like_one_buffer() {
        let whole: Vec<u8> = (0..100u8).collect();
        let body = Body::new(vec![
            Bytes::copy_from_slice(&whole[..30]),
            Bytes::new(),
            Bytes::copy_from_slice(&whole[30..31]),
            Bytes::copy_from_slice(&whole[31..]),
        ]);
        assert_eq!(body.len(), 100);
        for start in 0..=100 {
            for end in start..=100 {
                assert_eq!(&body.slice(start..end)[..], &whole[start..end], "{start}..{end}");
                let pieces = body.pieces(start..end);
                assert_eq!(pieces.concat(), whole[start..end], "{start}..{end}");
                // One piece per part the range touches, each a view of that part.
                let touched = [0..30, 30..31, 31..100]
                    .iter()
                    .filter(|p| p.start < end && start < p.end)
                    .count();
                assert_eq!(pieces.len(), touched, "{start}..{end}");
                for p in &pieces {
                    let within = |part: &Bytes| part.as_ptr_range().contains(&p.as_ptr());
                    assert!(p.is_empty() || body.parts.iter().any(within), "{start}..{end}: a copy");
                }
            }
        }
        assert_eq!(&body.slice(0..body.len())[..], &whole[..]);
    }
}
