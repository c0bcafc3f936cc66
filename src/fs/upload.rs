//! Turning an open file's changes into a new version in S3.
//!
//! # Snapshot, send, commit
//! An upload takes a [`Snapshot`] of the file's state under its lock: the generation, size, base version, which
//! blocks are dirty, the attributes. It then reads, seals and sends with no lock held, except the short moments in
//! which it copies a part's dirty blocks out of the journal (local disk). Once S3 has accepted the new version it
//! locks again to commit: if the generation did not move, the file is clean and its journal is deleted; if it
//! did, the new version becomes the base and the blocks still dirty are uploaded by the next round. `getattr`,
//! `lookup`, `readdir` and reads never wait for an upload.
//!
//! # What is sent
//! A block of the new version can be *reused* (its stored bytes copied unchanged from the base object) when it is
//! not dirty, has the same plaintext range and the same final flag as in the base, lies wholly before
//! `base_valid`, and both versions share one codec (one data key and file id). Dirty blocks in the client-side
//! modes are already sealed in the journal in the object's format and are copied as they are, except the final
//! block, which is sealed anew with its final flag. Every other block is encoded from its current content.
//!
//! Objects up to [`SINGLE_PUT_MAX`] go up in one PUT. Larger ones use multipart: parts are whole blocks, at
//! least [`PART_TARGET`] bytes and at most 10,000 parts; a part whose blocks are all reusable is an
//! UploadPartCopy of the same byte range of the base object, conditional on its ETag, so only the parts a change
//! touched are sealed and sent. The multipart upload's id is recorded in the journal before any part is sent,
//! so that a crash leaves nothing the next mount cannot abort.
//!
//! # Conditions and idempotence
//! The final write (PUT, CompleteMultipartUpload, or a metadata-only CopyObject) is conditional: If-Match the
//! base's ETag, or If-None-Match `*` for a new file. The new ETag comes from that write's own response. Each upload
//! carries a random token in the object's metadata (recorded in the journal first): when a retried write fails
//! its condition, or a retried Complete finds its upload gone, because the first attempt succeeded and only its
//! response was lost, a HEAD that shows our own token turns the failure into the success it was. Any other
//! failed condition is a conflict: the file's content is written to the recovery directory and the file's state
//! is poisoned.
use super::codec::{Codec, Version};
use super::inode::Remote;
use super::journal::{Journal, MultipartRef, META_UPLOAD_TOKEN};
use super::write::{FileState, OpenFile};
use super::{lock, Fs, FsError, FsResult};
use crate::format::ObjectHeader;
use crate::store::{ByteRange, CompletedPart, Metadata, PutCondition, StoreError};
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

/// Objects up to this size are uploaded with one PUT.
pub const SINGLE_PUT_MAX: u64 = 16 * 1024 * 1024;
/// Minimum bytes per multipart part (S3's minimum is 5 MiB).
const PART_TARGET: u64 = 8 * 1024 * 1024;
/// S3 allows at most 10,000 parts.
pub const MAX_PARTS: u64 = 10_000;
/// Parts larger than this (objects over ~78 GiB: 10,000 parts of 8 MiB) are assembled into a file in the journal
/// directory, [`PART_TARGET`] bytes at a time, and streamed from there, so memory stays bounded whatever the size.
/// Twice the target: a part of [`PART_TARGET`] bytes of plaintext is a little more than that once sealed, and
/// must still go up from memory.
const STREAM_ABOVE: u64 = 2 * PART_TARGET;
/// Part bodies one upload keeps in memory at once (at least one part).
const PART_BUDGET: u64 = 32 * 1024 * 1024;
const MAX_PARTS_IN_FLIGHT: u64 = 4;

/// Blocks per part of a multipart upload of `n` blocks: at least [`PART_TARGET`] bytes, at most `max_parts` (and
/// S3's [`MAX_PARTS`]) parts. The write-behind lays out its parts with it too.
pub(super) fn part_blocks(codec: &Codec, n: u64, max_parts: u64) -> u64 {
    PART_TARGET
        .div_ceil(codec.stored_block_len())
        .max(n.div_ceil(max_parts.clamp(1, MAX_PARTS)))
}

/// One part's upload in flight.
type PartFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = crate::store::StoreResult<CompletedPart>> + Send + 'a>>;

/// Waits for parts in flight until at most `keep` are left, adding each one sent to `done` and telling those
/// waiting for the file that it went up. The first failure ends the wait with its error.
async fn parts_sent_down_to<F>(
    inflight: &mut FuturesUnordered<F>,
    done: &mut Vec<CompletedPart>,
    file: &OpenFile,
    keep: usize,
) -> FsResult<()>
where
    F: std::future::Future<Output = crate::store::StoreResult<CompletedPart>>,
{
    while inflight.len() > keep {
        if let Some(r) = inflight.next().await {
            done.push(r?);
            file.part_sent();
        }
    }
    Ok(())
}

/// What an upload works from: one generation of the file's state.
pub(super) struct Snapshot {
    pub gen: u64,
    pub key: String,
    pub size: u64,
    pub base: Option<Version>,
    pub base_valid: u64,
    pub codec: Arc<Codec>,
    pub header: Option<ObjectHeader>,
    pub meta: Metadata,
    pub dirty: BTreeSet<u64>,
    pub modified: bool,
    pub token: String,
}

impl Snapshot {
    /// The state as it is now, to be uploaded with `meta` (which carries `token`).
    pub fn of(st: &FileState, meta: Metadata, token: String) -> Snapshot {
        Snapshot::of_with(st, meta, token, st.dirty.clone())
    }

    fn of_with(st: &FileState, meta: Metadata, token: String, dirty: BTreeSet<u64>) -> Snapshot {
        Snapshot {
            gen: st.generation,
            key: st.key.clone(),
            size: st.size,
            base: st.base.clone(),
            base_valid: st.base_valid,
            codec: st.codec.clone(),
            header: st.header.clone(),
            meta,
            dirty,
            modified: st.modified(),
            token,
        }
    }

    /// A snapshot for assembling `blocks` alone (a write-behind part): of the dirty set, only the blocks in
    /// that range, so that the copy does not grow with the file.
    pub fn of_blocks(st: &FileState, blocks: Range<u64>) -> Snapshot {
        let dirty = st.dirty.range(blocks).copied().collect();
        Snapshot::of_with(st, Metadata::new(), String::new(), dirty)
    }

    /// Whether block `i` of the new version can be copied unchanged from the base object.
    fn reusable(&self, i: u64) -> bool {
        let Some(base) = &self.base else { return false };
        if !Arc::ptr_eq(&base.codec, &self.codec) || self.dirty.contains(&i) {
            return false;
        }
        let c = &self.codec;
        let (n_new, n_base) = (c.block_count(self.size), c.block_count(base.plain_size));
        if i >= n_base {
            return false;
        }
        let range = c.block_plain_range(i, self.size);
        range == c.block_plain_range(i, base.plain_size)
            && (i + 1 == n_new) == (i + 1 == n_base)
            && range.end <= self.base_valid
    }
}

/// One block of a part, as gathered before encoding.
enum Piece {
    /// Stored bytes of this many blocks as they go into the object (journal slots in the object's format, read
    /// with one pread, or a run of the base).
    Stored(Vec<u8>, u64),
    /// A journal slot to open and encode anew.
    Journal(u64, Vec<u8>),
    /// Plaintext (whole block, zero-padded) to encode.
    Plain(u64, Vec<u8>),
}

impl Fs {
    /// Takes a snapshot, uploads it and commits. `Ok` means S3 holds (at least) the snapshot's generation.
    pub(super) async fn upload_once(&self, file: &Arc<OpenFile>) -> FsResult<()> {
        // A base that moved under the round (a key rotation's copy of it, or an earlier attempt of this file's that
        // landed) is followed at most this often in one round.
        for _ in 0..3 {
            if !self.upload_round(file).await? {
                return Ok(());
            }
        }
        Err(FsError::Store(StoreError::Transient(format!(
            "{}: the object kept changing under this upload (rekeyed, or earlier attempts landing); it is tried again",
            file.state.lock().await.key
        ))))
    }

    /// One snapshot uploaded and committed; `Ok(true)`: the base had moved (rekeyed, or an earlier attempt of this
    /// file's landed: the file's state now names that object) and nothing was written, so the caller uploads again.
    async fn upload_round(&self, file: &Arc<OpenFile>) -> FsResult<bool> {
        self.abort_stale_multipart(file).await?;
        let Some(snap) = self.snapshot(file).await? else {
            return Ok(false);
        };
        let sent = if snap.modified {
            self.upload_version(file, &snap).await
        } else {
            self.upload_metadata(&snap).await.map(|etag| (etag, false))
        };
        let (etag, stale_attrs) = match sent {
            Ok(sent) => sent,
            // A failed condition, or a retried Complete whose upload is gone: our own lost response, a key
            // rotation's copy of the base, or someone else's write. A missing object with no base to compare is
            // none of them: an ordinary error.
            Err(FsError::Store(e @ (StoreError::PreconditionFailed(_) | StoreError::NotFound(_)))) => {
                if file.state.lock().await.unlinked {
                    // Removed while this round ran (its object with it): nothing is saved for it any more.
                    return Ok(false);
                }
                let now = match self.store.head(&snap.key).await {
                    Ok(info) => Some(info),
                    Err(StoreError::NotFound(_)) => None,
                    Err(e) => return Err(e.into()),
                };
                match Self::own_write(&snap, now.as_ref()) {
                    Some(sent) => sent,
                    // Nobody else's version is there: the condition met an operation still in progress on the key
                    // (S3's 409 ConditionalRequestConflict, e.g. a rotation copying it). Tried again later, still
                    // conditional.
                    None if Self::unchanged(&snap, now.as_ref()) => {
                        return Err(FsError::Store(StoreError::Transient(format!(
                            "{}: another operation on the object was in progress ({e}); the upload is tried again",
                            snap.key
                        ))))
                    }
                    None if self.adopt_earlier_attempt(file, &snap, now.as_ref()).await? => return Ok(true),
                    None if snap.base.is_none() && matches!(e, StoreError::NotFound(_)) => return Err(e.into()),
                    None if self.rebase_after_rekey(file, &snap, now.as_ref()).await? => return Ok(true),
                    None => {
                        log::debug!(
                            "{}: condition failed ({e}); base {:?}, now {:?}",
                            snap.key,
                            snap.base.as_ref().map(|b| &b.etag),
                            now.as_ref()
                                .map(|n| (&n.etag, n.metadata.get(crate::keys::META_REKEYED_FROM)))
                        );
                        return Err(self.conflict(file, &snap, &e.to_string()).await);
                    }
                }
            }
            Err(e) => return Err(e),
        };
        self.commit(file, &snap, etag, stale_attrs).await?;
        Ok(false)
    }

    /// Aborts the multipart upload an earlier attempt left (its id and key are in the state and the journal),
    /// unless it is the running write-behind's. Done before every round, whichever way the round uploads: a round
    /// that sends one PUT (the file was cut meanwhile), or none, would otherwise forget the id and leave the upload
    /// in S3. Aborted under the key it was created under: the file may have been renamed since, and S3 answers an
    /// abort under another key as if the upload did not exist.
    pub(super) async fn abort_stale_multipart(&self, file: &OpenFile) -> FsResult<()> {
        let stale = {
            let st = file.state.lock().await;
            let live = st.wb.as_ref().and_then(|w| w.upload_id.as_ref());
            match &st.multipart {
                Some(m) if Some(&m.id) != live => m.clone(),
                _ => return Ok(()),
            }
        };
        let key = &stale.key;
        match self.store.abort_multipart(key, &stale.id).await {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => {
                let e = FsError::from(e);
                // S3 away: tried again with the round.
                if e.is_retryable() {
                    return Err(e);
                }
                // Refused for good (no s3:AbortMultipartUpload, say): that must not keep the file from being saved.
                log::warn!(
                    "{key}: the multipart upload {} left by an earlier attempt could not be aborted ({e}); it \
                     stays pending in S3 until a lifecycle rule (AbortIncompleteMultipartUpload) or someone aborts it",
                    stale.id
                );
            }
        }
        let mut st = file.state.lock().await;
        if st.multipart.as_ref() == Some(&stale) {
            st.multipart = None;
            st.save_manifest()?;
        }
        Ok(())
    }

    /// Whether the object (`now`, as a HEAD found it) is this file's own earlier version: an attempt that did not
    /// commit (it failed, or its task panicked) and reached S3 anyway, its answer lost or the failure after S3
    /// took the write, maybe only after the next attempt began. Its token is one the state remembers. Then that
    /// object becomes the base the next round writes over (as at mount, see `adopt_landed_upload`), where the
    /// round's condition failed against it. The blocks not changed since the old base was read are the same in
    /// it, and every block changed since is still dirty (dirty is cleared only at a commit), so the next round
    /// uploads them again.
    async fn adopt_earlier_attempt(
        &self,
        file: &OpenFile,
        snap: &Snapshot,
        now: Option<&crate::store::ObjectInfo>,
    ) -> FsResult<bool> {
        let Some(info) = now else { return Ok(false) };
        let Some(token) = info.metadata.get(META_UPLOAD_TOKEN) else {
            return Ok(false);
        };
        let mut st = file.state.lock().await;
        // `now` is the snapshot's key as the snapshot's base left it: not if the file was renamed or its base
        // moved meanwhile.
        let same_base = st.base.as_ref().map(|b| &b.etag) == snap.base.as_ref().map(|b| &b.etag);
        if !st.earlier_tokens.contains(token) || st.key != snap.key || !same_base {
            return Ok(false);
        }
        let v = super::version_with(info, st.codec.clone(), st.header.clone())?;
        log::info!(
            "{}: an earlier attempt of this upload had reached S3 (its answer was lost); writing over it",
            st.key
        );
        st.base_valid = st.base_valid.min(v.plain_size);
        st.base = Some(v);
        st.save_manifest()?;
        Ok(true)
    }

    /// The snapshot of a file with unsaved changes (and a fresh upload token, recorded in the journal first).
    async fn snapshot(&self, file: &OpenFile) -> FsResult<Option<Snapshot>> {
        self.key_to_current(file).await?;
        let mut st = file.state.lock().await;
        if !st.unsaved() {
            return Ok(None);
        }
        let token = Self::upload_token(&st);
        // The attempt before, if it did not commit, may still reach S3 (see `adopt_earlier_attempt`).
        if let Some(old) = st.upload_token.take().filter(|old| *old != token) {
            st.earlier_tokens.push(old);
            super::journal::keep_newest(&mut st.earlier_tokens);
        }
        st.upload_token = Some(token.clone());
        st.min_cut = u64::MAX;
        st.save_manifest()?;
        let meta = st.object_metadata(st.xattr.as_deref(), &token);
        Ok(Some(Snapshot::of(&st, meta, token)))
    }

    /// During a key rotation (a previous key is configured), a file whose data key is still wrapped under the
    /// previous key gets it wrapped under the current one before it is written: whatever the mount writes is
    /// under the current key, even if the rotation already passed this file. The data key itself is unchanged,
    /// so blocks sealed or copied from the base stay valid.
    async fn key_to_current(&self, file: &OpenFile) -> FsResult<()> {
        let Some(keys) = &self.keys else { return Ok(()) };
        let Some(h) = file.state.lock().await.header.clone() else {
            return Ok(());
        };
        let Some(moved) = keys.provider.to_current(&h.file_id, &h.wrapped_key).await? else {
            return Ok(());
        };
        let mut st = file.state.lock().await;
        let st = &mut *st;
        if let Some(cur) = st.header.as_mut().filter(|c| c.wrapped_key == h.wrapped_key) {
            log::info!("{}: data key moved to the current key before writing", st.key);
            cur.wrapped_key = moved;
        }
        Ok(())
    }

    /// The ETag of the object (`now`, as a HEAD found it) if it is our own write (it carries the snapshot's
    /// token), and whether its metadata is not the snapshot's (a write-behind upload's, created earlier).
    fn own_write(snap: &Snapshot, now: Option<&crate::store::ObjectInfo>) -> Option<(String, bool)> {
        let info = now.filter(|info| info.metadata.get(META_UPLOAD_TOKEN) == Some(&snap.token))?;
        log::info!(
            "{}: a retried write had already succeeded (its response was lost)",
            snap.key
        );
        Some((info.etag.clone(), info.metadata != snap.meta))
    }

    /// Whether the object (`now`) still has the snapshot's base ETag and no rotation mark: a condition that
    /// failed against it met an operation in progress (S3's 409), not another version (a metadata-only change
    /// keeps the ETag, but then the condition would have held).
    fn unchanged(snap: &Snapshot, now: Option<&crate::store::ObjectInfo>) -> bool {
        match (&snap.base, now) {
            (Some(base), Some(now)) => {
                now.etag == base.etag && !now.metadata.contains_key(crate::keys::META_REKEYED_FROM)
            }
            _ => false,
        }
    }

    /// Whether the object (`now`) is the snapshot's base copied onto itself by `s3crypt rekey` (same bytes, the
    /// data key wrapped anew or the SSE key changed): then the state takes its ETag as the base's, and the round
    /// is run again (the new round re-wraps this file's key under the current key before it writes).
    async fn rebase_after_rekey(
        &self,
        file: &OpenFile,
        snap: &Snapshot,
        now: Option<&crate::store::ObjectInfo>,
    ) -> FsResult<bool> {
        let (Some(base), Some(now)) = (&snap.base, now) else {
            return Ok(false);
        };
        if now.metadata.get(crate::keys::META_REKEYED_FROM) != Some(&base.etag) {
            return Ok(false);
        }
        // In the client-side modes the rekeyed object must still be this file (its id); the SSE modes have no id.
        let same_file = match &snap.header {
            Some(h) => matches!(crate::format::ObjectHeader::from_metadata(&now.metadata),
                Ok(Some(n)) if n.file_id == h.file_id),
            None => true,
        };
        if !same_file {
            return Ok(false);
        }
        let mut st = file.state.lock().await;
        let Some(b) = st.base.as_mut().filter(|b| b.etag == base.etag) else {
            return Ok(false);
        };
        b.etag = now.etag.clone();
        st.save_manifest()?;
        log::info!(
            "{}: the object was rekeyed since it was opened (same content); writing over the rekeyed version",
            snap.key
        );
        Ok(true)
    }

    /// Only attributes changed: rewrite the metadata with a copy onto itself, conditional on the ETag.
    async fn upload_metadata(&self, snap: &Snapshot) -> FsResult<String> {
        let Some(base) = &snap.base else {
            return Err(FsError::BadHandle);
        };
        let cond = PutCondition::IfMatch(base.etag.clone());
        let (size, etag) = (base.object_size, Some(base.etag.as_str()));
        Ok(self
            .copy_object(&snap.key, &snap.key, Some(&snap.meta), cond, size, etag)
            .await?)
    }

    /// Uploads the snapshot's content; returns the ETag and whether the object's metadata is older than the
    /// snapshot's.
    async fn upload_version(&self, file: &OpenFile, snap: &Snapshot) -> FsResult<(String, bool)> {
        let cond = match &snap.base {
            Some(b) => PutCondition::IfMatch(b.etag.clone()),
            None => PutCondition::IfNoneMatch,
        };
        let n = snap.codec.block_count(snap.size);
        let object_size = snap.codec.object_size(snap.size);
        if object_size <= SINGLE_PUT_MAX {
            // A write-behind of a file cut back to one PUT's size: its upload is aborted.
            file.state.lock().await.wb = None;
            let room = self.staged.send_room(object_size).await;
            let body = self.assemble(file, snap, 0..n).await?;
            let info = self.store.put(&snap.key, Bytes::from(body), &snap.meta, cond).await?;
            drop(room);
            return Ok((info.etag, false));
        }
        self.upload_multipart(file, snap, cond).await
    }

    async fn upload_multipart(&self, file: &OpenFile, snap: &Snapshot, cond: PutCondition) -> FsResult<(String, bool)> {
        let key = &snap.key;
        let (upload_id, sent, created_with) = match self.take_write_behind(file, snap).await {
            Some(behind) => behind,
            None => {
                // An earlier attempt's upload was aborted when this round began (`abort_stale_multipart`).
                let id = self.store.create_multipart(key, &snap.meta).await?;
                let made = MultipartRef {
                    key: key.clone(),
                    id: id.clone(),
                };
                self.record_multipart(file, Some(made)).await?;
                (id, BTreeMap::new(), snap.meta.clone())
            }
        };
        let result = match self.send_parts(file, snap, &upload_id, sent).await {
            Ok(parts) => {
                let n = u32::try_from(parts.len()).unwrap_or(u32::MAX).max(1);
                file.status.send_modify(|s| s.completing = n);
                let done = self.store.complete_multipart(key, &upload_id, parts, cond).await;
                file.status.send_modify(|s| s.completing = 0);
                done.map_err(FsError::from)
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            match self.store.abort_multipart(key, &upload_id).await {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => {
                    log::warn!("{key}: aborting multipart upload failed (the next mount aborts it): {e}");
                    return result.map(|etag| (etag, created_with != snap.meta));
                }
            }
        }
        self.record_multipart(file, None).await?;
        // Created by the write-behind with the attributes of that moment, the metadata may be older than the
        // snapshot's: the caller settles it after the commit.
        Ok((result?, created_with != snap.meta))
    }

    async fn record_multipart(&self, file: &OpenFile, upload: Option<MultipartRef>) -> FsResult<()> {
        let mut st = file.state.lock().await;
        st.multipart = upload;
        st.save_manifest()
    }

    /// Sends the parts of `snap` after the `sent` ones (a write-behind's), returning all of them.
    async fn send_parts(
        &self,
        file: &OpenFile,
        snap: &Snapshot,
        upload_id: &str,
        mut sent: BTreeMap<u64, CompletedPart>,
    ) -> FsResult<Vec<CompletedPart>> {
        let c = &snap.codec;
        let n = c.block_count(snap.size);
        let per_part = part_blocks(c, n, self.cfg.max_parts);
        let part_bytes = per_part * c.stored_block_len();
        let in_flight = (PART_BUDGET / part_bytes.min(STREAM_ABOVE)).clamp(1, MAX_PARTS_IN_FLIGHT) as usize;
        let key = snap.key.as_str();
        let mut inflight = FuturesUnordered::new();
        let mut done = Vec::new();
        for (k, first) in (0..n).step_by(per_part as usize).enumerate() {
            if let Some(part) = sent.remove(&(k as u64)) {
                done.push(part);
                continue;
            }
            let blocks = first..(first + per_part).min(n);
            let part_number = k as i32 + 1;
            if let Some(base) = snap.base.as_ref().filter(|_| blocks.clone().all(|i| snap.reusable(i))) {
                let r = c.object_range(blocks, base.plain_size);
                let etag = base.etag.clone();
                inflight.push(futures::future::Either::Left(async move {
                    self.store
                        .upload_part_copy(key, upload_id, part_number, key, r, Some(&etag))
                        .await
                }));
            } else if part_bytes > STREAM_ABOVE {
                let (staged, len) = self.stage_part(file, snap, blocks, per_part).await?;
                inflight.push(futures::future::Either::Right(Box::pin(async move {
                    let r = self
                        .store
                        .upload_part_file(key, upload_id, part_number, staged.path(), len)
                        .await;
                    drop(staged);
                    r
                }) as PartFuture<'_>));
            } else {
                // Room in the mount's allowance first. This upload's own parts in flight hold room and move only
                // while polled, so it waits for room only when none of them is left (see `parts_sent_down_to`).
                let room = loop {
                    if let Some(room) = self.staged.try_send(part_bytes) {
                        break room;
                    }
                    if inflight.is_empty() {
                        break self.staged.send_room(part_bytes).await;
                    }
                    let keep = inflight.len() - 1;
                    parts_sent_down_to(&mut inflight, &mut done, file, keep).await?;
                };
                let body = Bytes::from(self.assemble(file, snap, blocks).await?);
                let part = self.store.upload_part(key, upload_id, part_number, body);
                inflight.push(futures::future::Either::Right(Box::pin(async move {
                    let sent = part.await;
                    drop(room);
                    sent
                }) as PartFuture<'_>));
            }
            parts_sent_down_to(&mut inflight, &mut done, file, in_flight - 1).await?;
        }
        parts_sent_down_to(&mut inflight, &mut done, file, 0).await?;
        done.sort_by_key(|p| p.part_number);
        Ok(done)
    }

    /// Assembles a large part into a temporary file in the journal directory, a few MiB at a time; returns the
    /// file (deleted when dropped) and its length.
    async fn stage_part(
        &self,
        file: &OpenFile,
        snap: &Snapshot,
        blocks: Range<u64>,
        per_part: u64,
    ) -> FsResult<(tempfile::NamedTempFile, u64)> {
        let staged = tempfile::NamedTempFile::new_in(self.journal.dir())?;
        let chunk = (PART_TARGET / snap.codec.stored_block_len()).clamp(1, per_part);
        let mut len = 0u64;
        let mut at = blocks.start;
        while at < blocks.end {
            let piece = self.assemble(file, snap, at..(at + chunk).min(blocks.end)).await?;
            let f = staged.as_file().try_clone()?;
            len += piece.len() as u64;
            tokio::task::spawn_blocking(move || (&f).write_all(&piece))
                .await
                .map_err(|e| FsError::Local(std::io::Error::other(e)))??;
            at += chunk;
        }
        Ok((staged, len))
    }

    /// The stored bytes of `blocks` of the snapshot's version.
    pub(super) async fn assemble(&self, file: &OpenFile, snap: &Snapshot, blocks: Range<u64>) -> FsResult<Vec<u8>> {
        let n = snap.codec.block_count(snap.size);
        let (mut pieces, journal) = self.gather_dirty(file, snap, blocks.clone(), n).await?;
        let mut i = blocks.start;
        while i < blocks.end {
            if let Some(p) = pieces.get(&i) {
                i += match p {
                    Piece::Stored(_, k) => (*k).max(1),
                    Piece::Journal(..) | Piece::Plain(..) => 1,
                };
                continue;
            }
            if let Some(base) = snap.base.as_ref().filter(|_| snap.reusable(i)) {
                let mut j = i + 1;
                while j < blocks.end && snap.reusable(j) && !pieces.contains_key(&j) {
                    j += 1;
                }
                let r = snap.codec.object_range(i..j, base.plain_size);
                let bytes = if r.start < r.end {
                    let range = ByteRange::Range {
                        start: r.start,
                        end: r.end,
                    };
                    self.store
                        .get(&snap.key, Some(range), Some(&base.etag))
                        .await?
                        .data
                        .to_vec()
                } else {
                    Vec::new()
                };
                pieces.insert(i, Piece::Stored(bytes, j - i));
                i = j;
                continue;
            }
            pieces.insert(i, Piece::Plain(i, self.snapshot_block(snap, i).await?));
            i += 1;
        }
        let (codec, size, key) = (snap.codec.clone(), snap.size, snap.key.clone());
        tokio::task::spawn_blocking(move || encode_pieces(&codec, size, n, pieces, journal.as_deref(), &key))
            .await
            .map_err(|e| FsError::Local(std::io::Error::other(e)))?
    }

    /// Copies the snapshot's dirty blocks in `blocks` out of the journal, under the state's lock (no writer may
    /// change a slot half-way through the read). A block that stopped being dirty since the snapshot (a
    /// truncation cut it) reads as zeros; the generation moved, so a later round uploads the truth.
    async fn gather_dirty(
        &self,
        file: &OpenFile,
        snap: &Snapshot,
        blocks: Range<u64>,
        n: u64,
    ) -> FsResult<(BTreeMap<u64, Piece>, Option<Arc<Journal>>)> {
        let wanted: Vec<u64> = snap.dirty.range(blocks).copied().collect();
        let st = file.state.lock().await;
        let Some(journal) = st.journal.clone() else {
            return Ok((BTreeMap::new(), None));
        };
        if wanted.is_empty() {
            return Ok((BTreeMap::new(), Some(journal)));
        }
        let still: Vec<(u64, bool)> = wanted.iter().map(|i| (*i, st.is_dirty(*i))).collect();
        let bl = st.bs.get() as usize;
        let j = journal.clone();
        let raw_ok = journal.is_object_format();
        let pieces = tokio::task::spawn_blocking(move || -> std::io::Result<BTreeMap<u64, Piece>> {
            let mut out = BTreeMap::new();
            let mut k = 0;
            while k < still.len() {
                let (i, dirty) = still[k];
                let piece = match (dirty, raw_ok && i + 1 < n) {
                    (false, _) => Piece::Plain(i, vec![0u8; bl]),
                    (true, true) => {
                        // Consecutive slots lie next to each other in the journal and in the object: one read.
                        let mut run = 1;
                        while k + run < still.len()
                            && still[k + run] == (i + run as u64, true)
                            && i + run as u64 + 1 < n
                        {
                            run += 1;
                        }
                        k += run - 1;
                        Piece::Stored(j.read_sealed_run(i, run as u64)?, run as u64)
                    }
                    (true, false) => Piece::Journal(i, j.read_sealed(i)?),
                };
                out.insert(i, piece);
                k += 1;
            }
            Ok(out)
        })
        .await
        .map_err(|e| FsError::Local(std::io::Error::other(e)))??;
        drop(st);
        Ok((pieces, Some(journal)))
    }

    /// Block `i` of the snapshot when it is not dirty: the base's block cut at the snapshot's `base_valid`, or
    /// zeros.
    async fn snapshot_block(&self, snap: &Snapshot, i: u64) -> FsResult<Vec<u8>> {
        let b = snap.codec.block_len();
        let mut block = vec![0u8; b as usize];
        let start = i * b;
        if let Some(base) = snap.base.as_ref().filter(|_| start < snap.base_valid) {
            let got = self.base_blocks(&snap.key, base, i..i + 1).await?;
            let valid = ((snap.base_valid - start).min(b) as usize).min(got[0].len());
            block[..valid].copy_from_slice(&got[0][..valid]);
        }
        Ok(block)
    }

    /// S3 holds the snapshot: make it the base, and forget what is saved.
    /// `stale_attrs`: the object's metadata is older than the snapshot's (a write-behind upload is created early).
    async fn commit(&self, file: &OpenFile, snap: &Snapshot, etag: String, stale_attrs: bool) -> FsResult<()> {
        let object_size = snap.codec.object_size(snap.size);
        let mut st = file.state.lock().await;
        st.upload_token = None;
        st.earlier_tokens.clear();
        st.multipart = None;
        if st.unlinked {
            // Unlinked while the upload ran: the upload may have made the object again.
            drop(st);
            if let Err(e) = self.store.delete(&snap.key).await {
                log::warn!(
                    "{}: removing the object of a file unlinked during its upload: {e}",
                    snap.key
                );
            }
            return Ok(());
        }
        match (snap.modified, st.base.as_mut()) {
            (false, Some(base)) => base.etag = etag,
            _ => {
                let v = Version::new(etag, object_size, snap.size, snap.codec.clone(), snap.header.clone());
                st.base = Some(v);
                st.base_valid = snap.size.min(st.min_cut);
            }
        }
        st.saved_gen = snap.gen;
        if st.generation == snap.gen {
            st.base_valid = snap.size;
            st.dirty.clear();
            // What was just written is the new version's content: keep it readable (and writable into, say by an
            // append to the last block) without a GET.
            if let Some(id) = st.base.as_ref().map(|b| b.id) {
                for (i, block) in st.cache.take() {
                    self.cache.insert(id, i, super::blockcache::Block::owned(block));
                }
            }
            if let Some(j) = st.journal.take() {
                j.remove();
            }
        } else {
            st.save_manifest()?;
        }
        if stale_attrs {
            // One more round of this upload loop copies the final attributes onto the object. Those waiting for
            // this generation (close, fsync) are told now; the state stays open (unsaved) until that round lands,
            // so a reopen shares it and learns the new ETag. Until then the attributes are in the journal, as any
            // attribute change is: a crash before the copy lands leaves it to the next mount.
            // Only when that round is the copy alone: content written since the snapshot is not in the object,
            // and close and fsync wait for the round that uploads it.
            let content_saved = st.content_gen <= snap.gen;
            st.touch(false);
            match self.ensure_journal(&mut st).and_then(|()| st.save_manifest()) {
                Ok(()) if content_saved => st.settling = st.generation,
                Ok(()) => {}
                // Then close and fsync wait for the copy.
                Err(e) => log::warn!("{}: recording the attributes in the journal failed: {e}", snap.key),
            }
            file.wanted
                .fetch_max(st.generation, std::sync::atomic::Ordering::SeqCst);
        }
        self.record_saved(file, &st, &snap.meta);
        Ok(())
    }

    /// Tells the inode table and those waiting what S3 now holds: `meta` is the metadata the upload sent.
    fn record_saved(&self, file: &OpenFile, st: &FileState, meta: &Metadata) {
        file.status.send_modify(|s| {
            s.saved_gen = s.saved_gen.max(st.saved_gen);
            s.error = None;
            s.permanent = false;
            s.attempts += 1;
        });
        if let (Some(b), false) = (&st.base, st.unsaved()) {
            self.index_note_written(&st.key, &b.etag, b.object_size, meta);
        }
        if file.ino == 0 {
            return;
        }
        let mut t = lock(&self.inodes);
        if let Some(n) = t.get_mut(file.ino) {
            n.pending = st.unsaved();
            n.attr = super::Attr {
                ino: file.ino,
                size: st.size,
                ..st.attr.clone()
            };
            n.refreshed = Instant::now();
            if let Some(b) = &st.base {
                n.remote = Some(Remote {
                    etag: b.etag.clone(),
                    object_size: b.object_size,
                    metadata: meta.clone(),
                });
            }
        }
    }

    /// Someone else changed the object: save this file's content to the recovery directory, poison the state, and
    /// drop the journal only if the recovery file is complete.
    async fn conflict(&self, file: &OpenFile, snap: &Snapshot, msg: &str) -> FsError {
        let key = snap.key.clone();
        self.counters.conflict();
        log::debug!("{key}: condition failed: {msg}");
        let (recovery, complete) = self.save_recovery(file, &key).await;
        let mut st = file.state.lock().await;
        st.poisoned = true;
        if complete {
            if let Some(j) = st.journal.take() {
                j.remove();
            }
        } else if let Some(j) = &st.journal {
            log::error!("{key}: the unsaved data also stays in the journal entry {}", j.id());
        }
        log::error!("{key} was changed by someone else since it was opened; this file's data was saved to {recovery}");
        let shared = FsError::Conflict {
            key: key.clone(),
            recovery: recovery.clone(),
        };
        file.status.send_modify(|s| {
            s.error = Some(Arc::new(shared));
            s.permanent = true;
            s.attempts += 1;
        });
        FsError::Conflict { key, recovery }
    }

    /// Writes the file's content as the state holds it to the recovery directory (mode 0600). Returns the path
    /// and whether every block could be written. Blocks of the opened version that can no longer be read are
    /// zeros; the log says so.
    pub(super) async fn save_recovery(&self, file: &OpenFile, key: &str) -> (String, bool) {
        let dir = &self.cfg.recovery_dir;
        let stamp = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = dir.join(format!("{}.{stamp}", key.replace('/', "%2F")));
        let shown = path.display().to_string();
        let created = super::off_workers(|| {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .and_then(|_| {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                })
        });
        let mut out = match created {
            Ok(f) => {
                self.counters.recovery_file();
                f
            }
            Err(e) => {
                log::error!("{key}: could not create the recovery file {shown}: {e}");
                return (format!("{shown} (not written: {e})"), false);
            }
        };
        let (size, b) = {
            let st = file.state.lock().await;
            (st.size, st.bs.get())
        };
        let mut lost = 0u64;
        for i in 0..size.div_ceil(b) {
            let block = match self.blocks_now(file, i..i + 1).await {
                Ok(mut v) if !v.is_empty() => v.swap_remove(0),
                _ => {
                    lost += 1;
                    vec![0u8; b as usize]
                }
            };
            let len = (size - i * b).min(b) as usize;
            if let Err(e) = super::off_workers(|| out.write_all(&block[..len.min(block.len())])) {
                log::error!("{key}: writing the recovery file {shown} failed: {e}");
                return (format!("{shown} (incomplete: {e})"), false);
            }
        }
        let synced = super::off_workers(|| out.sync_all()).is_ok();
        if lost > 0 {
            log::error!("{key}: {lost} unchanged block(s) of the opened version could no longer be read; they are zeros in {shown}");
        }
        (shown, synced)
    }
}

/// Encodes gathered pieces, in block order, into the stored bytes of a part.
fn encode_pieces(
    codec: &Codec,
    size: u64,
    n: u64,
    pieces: BTreeMap<u64, Piece>,
    journal: Option<&Journal>,
    key: &str,
) -> FsResult<Vec<u8>> {
    let mut pieces = pieces;
    if pieces.len() == 1 && matches!(pieces.values().next(), Some(Piece::Stored(..))) {
        // The whole part is one run of stored bytes: it goes up as it is, no copy.
        if let Some((_, Piece::Stored(bytes, _))) = pieces.pop_first() {
            return Ok(bytes);
        }
    }
    let cap: usize = pieces
        .values()
        .map(|p| match p {
            Piece::Stored(b, _) => b.len(),
            Piece::Journal(_, b) | Piece::Plain(_, b) => b.len() + 28,
        })
        .sum();
    let mut out = Vec::with_capacity(cap);
    for (_, piece) in pieces {
        let (i, plain) = match piece {
            Piece::Stored(bytes, _) => {
                out.extend_from_slice(&bytes);
                continue;
            }
            Piece::Plain(i, plain) => (i, plain),
            Piece::Journal(i, sealed) => {
                let opened = journal.and_then(|j| j.open_sealed(i, &sealed));
                let plain = opened.ok_or_else(|| {
                    log::error!("{key}: journal block {i} failed authentication (the local journal was damaged)");
                    FsError::Local(std::io::Error::other(format!("{key}: journal block {i} is damaged")))
                })?;
                (i, plain)
            }
        };
        let len = codec.block_plain_range(i, size);
        let len = ((len.end - len.start) as usize).min(plain.len());
        codec.encode_into(i, i + 1 == n, &plain[..len], &mut out);
    }
    Ok(out)
}
