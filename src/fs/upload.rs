//! Turning an open file's changes into a new version in S3.
//!
//! A block of the new version can be *reused* (its stored bytes copied unchanged from the base object) when it
//! is not dirty, has the same plaintext range and the same final flag as in the base, lies wholly before
//! `base_valid`, and both versions share one codec (one data key and file id). Every other block is encoded
//! from its current content.
//!
//! Objects up to [`SINGLE_PUT_MAX`] go up in one PUT. Larger ones use multipart: parts are whole blocks, at
//! least [`PART_TARGET`] bytes; a part whose blocks are all reusable is an UploadPartCopy of the same byte range
//! of the base object, conditional on its ETag, so only the parts a change touched are sealed and sent. Up to
//! [`PARTS_IN_FLIGHT`] parts are sent at once. The final write (PUT or CompleteMultipartUpload) is
//! conditional: If-Match the base's ETag, or If-None-Match `*` for a new file. A failed condition is a conflict:
//! the file's content is written to the recovery directory and the file's state is poisoned.
use super::codec::{Codec, Version};
use super::inode::{attr_to_metadata, Remote};
use super::write::{FileState, OpenFile};
use super::{lock, Fs, FsError, FsResult};
use crate::store::{ByteRange, CompletedPart, Metadata, PutCondition, StoreError};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

/// Objects up to this size are uploaded with one PUT.
pub const SINGLE_PUT_MAX: u64 = 16 * 1024 * 1024;
/// Minimum bytes per multipart part (S3's minimum is 5 MiB).
pub const PART_TARGET: u64 = 8 * 1024 * 1024;
/// S3 allows 10,000 parts; stay below.
const MAX_PARTS: u64 = 9_000;
const PARTS_IN_FLIGHT: usize = 4;

impl Fs {
    /// Uploads an open file's unsaved data and attributes, if any. Success means the data is in S3.
    pub(super) async fn upload_file(&self, ino: u64, file: &OpenFile) -> FsResult<()> {
        let mut st = file.state.lock().await;
        if st.poisoned {
            return Err(FsError::Poisoned);
        }
        if st.unlinked || (!st.modified && !st.meta_dirty) {
            return Ok(());
        }
        let key = self.key_of(&self.path_of(ino)?);
        let result = if st.modified || st.base.is_none() {
            self.upload_version(&key, &mut st).await
        } else {
            self.upload_metadata(&key, &mut st).await
        };
        match result {
            Ok(()) => {
                let mut t = lock(&self.inodes);
                if let Some(n) = t.get_mut(ino) {
                    n.pending = false;
                    n.attr = super::Attr {
                        ino,
                        size: st.size,
                        ..st.attr.clone()
                    };
                    n.refreshed = Instant::now();
                    if let Some(b) = &st.base {
                        let remote = n.remote.take().map(|r| r.metadata).unwrap_or_default();
                        n.remote = Some(Remote {
                            etag: b.etag.clone(),
                            object_size: b.object_size,
                            metadata: remote,
                        });
                    }
                }
                Ok(())
            }
            Err(FsError::Store(StoreError::PreconditionFailed(msg))) => {
                log::debug!("{key}: condition failed: {msg}");
                let recovery = self.save_recovery(&key, &st).await;
                st.poisoned = true;
                log::error!(
                    "{key} was changed by someone else since it was opened; this file's data was saved to {recovery}"
                );
                Err(FsError::Conflict { key, recovery })
            }
            Err(e) => {
                log::error!("{key}: upload failed, data kept for the next flush: {e}");
                Err(e)
            }
        }
    }

    fn metadata_for(&self, st: &FileState, header: Option<&crate::format::ObjectHeader>) -> Metadata {
        let mut meta = Metadata::new();
        attr_to_metadata(&st.attr, &mut meta);
        if let Some(h) = header {
            h.to_metadata(&mut meta);
        }
        meta
    }

    /// Only attributes changed: rewrite the metadata with a copy onto itself, conditional on the ETag.
    async fn upload_metadata(&self, key: &str, st: &mut FileState) -> FsResult<()> {
        let header = st.codec.as_ref().and_then(|c| c.1.clone());
        let meta = self.metadata_for(st, header.as_ref());
        let Some(base) = st.base.as_mut() else { return Ok(()) };
        base.etag = self
            .store
            .copy(key, key, Some(&meta), PutCondition::IfMatch(base.etag.clone()))
            .await?;
        st.meta_dirty = false;
        Ok(())
    }

    async fn upload_version(&self, key: &str, st: &mut FileState) -> FsResult<()> {
        let (codec, header) = match &st.codec {
            Some(c) => c.clone(),
            None => {
                let c = self.new_codec().await?;
                st.codec = Some(c.clone());
                c
            }
        };
        let meta = self.metadata_for(st, header.as_ref());
        let cond = match &st.base {
            Some(b) => PutCondition::IfMatch(b.etag.clone()),
            None => PutCondition::IfNoneMatch,
        };
        let n = codec.block_count(st.size);
        let object_size = codec.object_size(st.size);
        let etag = if object_size <= SINGLE_PUT_MAX {
            let body = self.assemble_blocks(key, st, &codec, 0..n).await?;
            self.store.put(key, Bytes::from(body), &meta, cond).await?.etag
        } else {
            self.upload_multipart(key, st, &codec, &meta, cond).await?
        };
        let version = Version::new(etag, object_size, st.size, codec, header.clone());
        st.uploaded(version, header);
        Ok(())
    }

    async fn upload_multipart(
        &self,
        key: &str,
        st: &FileState,
        codec: &Arc<Codec>,
        meta: &Metadata,
        cond: PutCondition,
    ) -> FsResult<String> {
        let upload_id = self.store.create_multipart(key, meta).await?;
        let result = self.send_parts(key, &upload_id, st, codec).await;
        let result = match result {
            Ok(parts) => self
                .store
                .complete_multipart(key, &upload_id, parts, cond)
                .await
                .map_err(FsError::from),
            Err(e) => Err(e),
        };
        if result.is_err() {
            if let Err(e) = self.store.abort_multipart(key, &upload_id).await {
                log::warn!("{key}: aborting multipart upload failed (S3 lifecycle rules clean it up): {e}");
            }
        }
        result
    }

    async fn send_parts(
        &self,
        key: &str,
        upload_id: &str,
        st: &FileState,
        codec: &Arc<Codec>,
    ) -> FsResult<Vec<CompletedPart>> {
        let n = codec.block_count(st.size);
        let per_part = PART_TARGET
            .div_ceil(codec.stored_block_len())
            .max(n.div_ceil(MAX_PARTS));
        let mut inflight = FuturesUnordered::new();
        let mut done = Vec::new();
        for (k, first) in (0..n).step_by(per_part as usize).enumerate() {
            let blocks = first..(first + per_part).min(n);
            let part_number = k as i32 + 1;
            if let Some(base) = st
                .base
                .as_ref()
                .filter(|_| blocks.clone().all(|i| self.reusable(st, codec, i)))
            {
                let r = codec.object_range(blocks, base.plain_size);
                let etag = base.etag.clone();
                inflight.push(futures::future::Either::Left(async move {
                    self.store
                        .upload_part_copy(key, upload_id, part_number, key, r, Some(&etag))
                        .await
                }));
            } else {
                let body = Bytes::from(self.assemble_blocks(key, st, codec, blocks).await?);
                inflight.push(futures::future::Either::Right(self.store.upload_part(
                    key,
                    upload_id,
                    part_number,
                    body,
                )));
            }
            while inflight.len() >= PARTS_IN_FLIGHT {
                if let Some(r) = inflight.next().await {
                    done.push(r?);
                }
            }
        }
        while let Some(r) = inflight.next().await {
            done.push(r?);
        }
        done.sort_by_key(|p| p.part_number);
        Ok(done)
    }

    /// Whether block `i` of the new version can be copied unchanged from the base object.
    fn reusable(&self, st: &FileState, codec: &Arc<Codec>, i: u64) -> bool {
        let Some(base) = &st.base else { return false };
        if !Arc::ptr_eq(&base.codec, codec) || st.is_dirty(i) {
            return false;
        }
        let (n_new, n_base) = (codec.block_count(st.size), codec.block_count(base.plain_size));
        if i >= n_base {
            return false;
        }
        let range = codec.block_plain_range(i, st.size);
        range == codec.block_plain_range(i, base.plain_size)
            && (i + 1 == n_new) == (i + 1 == n_base)
            && range.end <= st.base_valid
    }

    /// The stored bytes of `blocks` of the new version: reusable runs fetched raw from the base with one
    /// conditional GET each, the rest encoded from their current content.
    async fn assemble_blocks(
        &self,
        key: &str,
        st: &FileState,
        codec: &Arc<Codec>,
        blocks: Range<u64>,
    ) -> FsResult<Vec<u8>> {
        let n = codec.block_count(st.size);
        let r = codec.object_range(blocks.clone(), st.size);
        let mut out = Vec::with_capacity((r.end - r.start) as usize);
        let mut i = blocks.start;
        while i < blocks.end {
            if let Some(base) = st.base.as_ref().filter(|_| self.reusable(st, codec, i)) {
                let mut j = i + 1;
                while j < blocks.end && self.reusable(st, codec, j) {
                    j += 1;
                }
                let r = codec.object_range(i..j, base.plain_size);
                let got = self
                    .store
                    .get(
                        key,
                        Some(ByteRange::Range {
                            start: r.start,
                            end: r.end,
                        }),
                        Some(&base.etag),
                    )
                    .await?;
                out.extend_from_slice(&got.data);
                i = j;
            } else if let Some(sealed) = self.staged_as_stored(st, codec, i, n)? {
                out.extend_from_slice(&sealed);
                i += 1;
            } else {
                let block = self.current_block(st, i).await?;
                let len = codec.block_plain_range(i, st.size);
                codec.encode_into(i, i + 1 == n, &block[..(len.end - len.start) as usize], &mut out);
                i += 1;
            }
        }
        Ok(out)
    }

    /// A spilled non-final block that the staging file already holds in the object's format, sealed with this
    /// very codec's key and file id.
    fn staged_as_stored(&self, st: &FileState, codec: &Arc<Codec>, i: u64, n: u64) -> FsResult<Option<Vec<u8>>> {
        let same_codec = st.codec.as_ref().is_some_and(|c| Arc::ptr_eq(&c.0, codec));
        match &st.staging {
            Some(s) if same_codec && s.is_file_format() && st.spilled.contains(&i) && i + 1 < n => {
                Ok(Some(s.read_sealed(i)?))
            }
            _ => Ok(None),
        }
    }

    /// Writes the file's content as this handle sees it to the recovery directory (mode 0600) and returns the
    /// path. Blocks of the opened version that can no longer be read are zeros; the log says so.
    async fn save_recovery(&self, key: &str, st: &FileState) -> String {
        let dir = &self.cfg.recovery_dir;
        let stamp = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = dir.join(format!("{}.{stamp}", key.replace('/', "%2F")));
        let shown = path.display().to_string();
        let created = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .and_then(|_| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
            });
        let mut file = match created {
            Ok(f) => f,
            Err(e) => {
                log::error!("{key}: could not create the recovery file {shown}: {e}");
                return format!("{shown} (not written: {e})");
            }
        };
        let b = st.bs.get();
        let mut lost = 0u64;
        for i in 0..st.size.div_ceil(b) {
            let block = match self.current_block(st, i).await {
                Ok(block) => block,
                Err(_) => {
                    lost += 1;
                    vec![0u8; b as usize]
                }
            };
            let len = (st.size - i * b).min(b) as usize;
            if let Err(e) = file.write_all(&block[..len]) {
                log::error!("{key}: writing the recovery file {shown} failed: {e}");
                return format!("{shown} (incomplete: {e})");
            }
        }
        let _ = file.sync_all();
        if lost > 0 {
            log::error!("{key}: {lost} unchanged block(s) of the opened version could no longer be read; they are zeros in {shown}");
        }
        shown
    }
}

use std::os::unix::fs::DirBuilderExt;
