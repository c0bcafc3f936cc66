//! Server-side copies of any size.
//!
//! One CopyObject copies at most [`COPY_MAX`] (5 GiB) on S3; a larger source is refused. Every copy the mount
//! makes (a rename, a chmod or xattr change saved as a metadata copy onto the object itself, the attributes
//! settled after a write-behind upload, a key rotation's rewrite of the metadata) goes through [`copy_object`],
//! which uses CopyObject up to the limit and a multipart copy above it: CreateMultipartUpload with the
//! destination's metadata, UploadPartCopy of each range of the source (each conditional on the source's ETag,
//! so every part comes from one version), and CompleteMultipartUpload under the caller's condition on the
//! destination. A failed multipart copy is aborted; the destination is untouched.
use super::{CompletedPart, Metadata, ObjectStore, PutCondition, StoreError, StoreResult};
use futures::{stream, StreamExt, TryStreamExt};

/// The largest source one CopyObject may copy (S3: 5 GiB).
pub const COPY_MAX: u64 = 5 << 30;
/// Part size of a multipart copy, unless the source needs larger parts to fit in [`COPY_PARTS_MAX`] parts.
const COPY_PART: u64 = 512 << 20;
/// S3's limit on the parts of one upload.
const COPY_PARTS_MAX: u64 = 10_000;
/// Parts copied at once (server-side: no data crosses the network).
const COPY_PARALLELISM: usize = 4;

/// Copies `source_key` (`size` bytes, with the ETag `source_etag` if the caller knows it) to `dest_key`:
/// `metadata: Some` replaces the user metadata, `None` keeps the source's; `cond` applies to the destination.
/// One CopyObject up to `single_max` (callers pass [`COPY_MAX`]; tests pass less to reach the multipart path with
/// small objects), a multipart copy above it, which asks for the source's ETag and metadata with a HEAD when the
/// caller did not give them. Returns the new object's ETag.
#[allow(clippy::too_many_arguments)]
pub async fn copy_object(
    store: &dyn ObjectStore,
    source_key: &str,
    dest_key: &str,
    metadata: Option<&Metadata>,
    cond: PutCondition,
    size: u64,
    source_etag: Option<&str>,
    single_max: u64,
) -> StoreResult<String> {
    if size <= single_max {
        return store.copy(source_key, dest_key, metadata, cond).await;
    }
    // The source's ETag pins every part to one version; its metadata is the copy's unless replaced.
    let head;
    let (etag, size, metadata) = match (metadata, source_etag) {
        (Some(m), Some(e)) => (e, size, m),
        _ => {
            head = store.head(source_key).await?;
            (head.etag.as_str(), head.size, metadata.unwrap_or(&head.metadata))
        }
    };
    if source_key == dest_key {
        if let PutCondition::IfMatch(want) = &cond {
            if want != etag {
                return Err(StoreError::PreconditionFailed(format!(
                    "{dest_key}: the object's ETag is {etag}, not {want}"
                )));
            }
        }
    }
    let part = single_max.min(COPY_PART).max(size.div_ceil(COPY_PARTS_MAX)).max(1);
    let upload_id = store.create_multipart(dest_key, metadata).await?;
    let ranges: Vec<(i32, std::ops::Range<u64>)> = (0..size.div_ceil(part))
        .map(|k| ((k + 1) as i32, k * part..((k + 1) * part).min(size)))
        .collect();
    let copied: StoreResult<Vec<CompletedPart>> = stream::iter(ranges)
        .map(|(n, range)| {
            let upload_id = upload_id.as_str();
            async move {
                store
                    .upload_part_copy(dest_key, upload_id, n, source_key, range, Some(etag))
                    .await
            }
        })
        .buffer_unordered(COPY_PARALLELISM)
        .try_collect()
        .await;
    let result = match copied {
        Ok(mut parts) => {
            parts.sort_by_key(|p| p.part_number);
            store.complete_multipart(dest_key, &upload_id, parts, cond).await
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        if let Err(e) = store.abort_multipart(dest_key, &upload_id).await {
            log::warn!("{dest_key}: aborting a failed multipart copy {upload_id} failed: {e}");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::failing::{FailingStore, FaultKind, OpKind, Rule, When};
    use crate::store::memory::{MemoryStore, MIN_PART_SIZE};
    use bytes::Bytes;

    fn body(n: usize) -> Bytes {
        Bytes::from((0..n).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>())
    }

    async fn setup() -> (FailingStore<MemoryStore>, Bytes, ObjectInfoLite) {
        let store = FailingStore::new(MemoryStore::new().with_copy_limit(MIN_PART_SIZE));
        let data = body(2 * MIN_PART_SIZE as usize + 3);
        let mut meta = Metadata::new();
        meta.insert("mode".into(), "0644".into());
        let info = store.put("src", data.clone(), &meta, PutCondition::None).await.unwrap();
        (store, data, ObjectInfoLite { etag: info.etag, meta })
    }

    /// `src` copied to `dst` with its metadata, unconditionally.
    async fn copy_to_dst(store: &dyn ObjectStore, size: u64) -> StoreResult<String> {
        copy_object(store, "src", "dst", None, PutCondition::None, size, None, MIN_PART_SIZE).await
    }

    struct ObjectInfoLite {
        etag: String,
        meta: Metadata,
    }

    #[tokio::test]
    async fn a_source_over_the_limit_is_copied_in_parts_with_its_metadata() {
        let (store, data, src) = setup().await;
        let size = data.len() as u64;
        let refused = store.copy("src", "dst", None, PutCondition::None).await;
        assert!(matches!(refused, Err(StoreError::InvalidRequest(_))), "{refused:?}");
        let etag = copy_to_dst(&store, size).await.unwrap();
        let got = store.get("dst", None, None).await.unwrap();
        assert_eq!(got.data, data);
        assert_eq!(got.info.etag, etag);
        assert_eq!(got.info.metadata, src.meta, "the source's metadata");
        assert_eq!(store.stats().count(OpKind::UploadPartCopy), 3);
        assert!(store.list_multipart_uploads("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_metadata_copy_onto_itself_is_conditional() {
        let (store, data, src) = setup().await;
        let size = data.len() as u64;
        let mut meta = src.meta.clone();
        meta.insert("mode".into(), "0600".into());
        // A stale ETag: refused before any part, nothing changed.
        let stale = PutCondition::IfMatch("\"other\"".into());
        let e = copy_object(
            &store,
            "src",
            "src",
            Some(&meta),
            stale,
            size,
            Some("\"other\""),
            MIN_PART_SIZE,
        )
        .await;
        assert!(matches!(e, Err(StoreError::PreconditionFailed(_))), "{e:?}");
        // The same, with the ETag found by the copy's own HEAD.
        let e = copy_object(
            &store,
            "src",
            "src",
            Some(&meta),
            PutCondition::IfMatch("\"other\"".into()),
            size,
            None,
            MIN_PART_SIZE,
        )
        .await;
        assert!(matches!(e, Err(StoreError::PreconditionFailed(_))), "{e:?}");
        assert_eq!(store.head("src").await.unwrap().metadata, src.meta);
        let cond = PutCondition::IfMatch(src.etag.clone());
        let etag = copy_object(
            &store,
            "src",
            "src",
            Some(&meta),
            cond,
            size,
            Some(&src.etag),
            MIN_PART_SIZE,
        )
        .await
        .unwrap();
        let got = store.get("src", None, None).await.unwrap();
        assert_eq!((got.data, got.info.metadata, got.info.etag), (data, meta, etag));
        assert!(store.list_multipart_uploads("").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_failed_part_aborts_the_copy_and_leaves_the_destination_alone() {
        let (store, data, _) = setup().await;
        store.add_rule(Rule::fail(OpKind::UploadPartCopy, When::Nth(2), FaultKind::Other));
        let size = data.len() as u64;
        let e = copy_to_dst(&store, size).await;
        assert!(e.is_err());
        assert!(matches!(store.head("dst").await, Err(StoreError::NotFound(_))));
        assert!(store.list_multipart_uploads("").await.unwrap().is_empty(), "aborted");
    }
}
