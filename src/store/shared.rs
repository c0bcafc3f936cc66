//! [`ObjectStore`] for `Arc<S>` (including `Arc<dyn ObjectStore>`), so that wrappers such as
//! [`super::failing::FailingStore`] and [`super::retry::Retrying`] can hold a shared store.
use super::{
    ByteRange, CompletedPart, GetOutput, GetPieces, ListPage, Metadata, ObjectInfo, ObjectStore, PutCondition,
    StoreResult,
};
use async_trait::async_trait;
use bytes::Bytes;
use std::ops::Range;
use std::sync::Arc;

#[async_trait]
impl<S: ObjectStore + ?Sized> ObjectStore for Arc<S> {
    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        (**self).head(key).await
    }

    async fn get(&self, key: &str, range: Option<ByteRange>, if_match: Option<&str>) -> StoreResult<GetOutput> {
        (**self).get(key, range, if_match).await
    }

    async fn get_pieces(&self, key: &str, range: Option<ByteRange>, if_match: Option<&str>) -> StoreResult<GetPieces> {
        (**self).get_pieces(key, range, if_match).await
    }

    async fn put(&self, key: &str, body: Bytes, metadata: &Metadata, cond: PutCondition) -> StoreResult<ObjectInfo> {
        (**self).put(key, body, metadata, cond).await
    }

    async fn create_multipart(&self, key: &str, metadata: &Metadata) -> StoreResult<String> {
        (**self).create_multipart(key, metadata).await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        body: Bytes,
    ) -> StoreResult<CompletedPart> {
        (**self).upload_part(key, upload_id, part_number, body).await
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
        (**self)
            .upload_part_copy(key, upload_id, part_number, source_key, source_range, source_if_match)
            .await
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
        cond: PutCondition,
    ) -> StoreResult<String> {
        (**self).complete_multipart(key, upload_id, parts, cond).await
    }

    async fn list_multipart_uploads(&self, prefix: &str) -> StoreResult<Vec<(String, String)>> {
        (**self).list_multipart_uploads(prefix).await
    }

    async fn upload_part_file(
        &self,
        key: &str,
        upload_id: &str,
        part_number: i32,
        path: &std::path::Path,
        len: u64,
    ) -> StoreResult<CompletedPart> {
        (**self).upload_part_file(key, upload_id, part_number, path, len).await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        (**self).abort_multipart(key, upload_id).await
    }

    async fn copy(
        &self,
        source_key: &str,
        dest_key: &str,
        metadata: Option<&Metadata>,
        cond: PutCondition,
    ) -> StoreResult<String> {
        (**self).copy(source_key, dest_key, metadata, cond).await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        (**self).delete(key).await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        (**self).delete_many(keys).await
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<&str>,
        max_keys: Option<i32>,
    ) -> StoreResult<ListPage> {
        (**self).list(prefix, delimiter, continuation, max_keys).await
    }
}
