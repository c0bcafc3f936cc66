//! Write-behind: the parts of a file being written sequentially go up while the program keeps writing.
//!
//! Without it, a file's data goes to S3 only when it is closed (or synced), so close() of a large file waits for
//! the whole upload. With it, once a new file (or one truncated to zero) has a whole part of blocks behind its
//! end (and is over one PUT's size), a multipart upload starts and that part is sent; part after part follows the
//! writer, up to [`IN_FLIGHT`] at a time per file. A part goes up from the bytes the write path staged for it (see
//! [`Staging`]), or is read from the journal when it could not be staged. A part that fails is left to
//! close(), which sends the parts that are missing, and completes the upload under exactly the conditions of an
//! ordinary one (`If-None-Match: *` or `If-Match` the base's ETag), with the same token in the metadata (see
//! `upload.rs`).
//!
//! # What stays as it was
//! Nothing leaves the journal until the object is committed: a part in flight, or sent, is still in the journal,
//! so an outage, a crash or a kill loses nothing. The upload id is recorded in the journal's manifest as soon as
//! the upload exists, so the next mount aborts what a killed daemon left (and uploads the journal's blocks the
//! ordinary way).
//!
//! # Holding a writer
//! A program that writes faster than its parts go up is held: a write that leaves more than [`PACE_PARTS`] whole
//! parts that no upload has started waits (after it is in the journal, with no lock held) until a part ends, at
//! most [`PACE_WAIT`]. The parts waiting then stay within what is staged in memory, and close() has little left
//! to send, so a large file's close() waits for a few parts and the completion, not for all the writer ran ahead
//! by (close() waits while parts go up, see `uploader`; the holding keeps that wait short). A hold
//! that runs out (a stalled upload, an outage) stops the holding until a part goes up again, and a failed part
//! stops it for good: the journal takes the writes as before.
//!
//! # When it gives up
//! Only blocks wholly behind the file's end are sent, so a sent block is never the final block of a file that
//! keeps growing. Any write into a sent part (or one in flight), a truncation that reaches one, a rename, an
//! unlink, a file that grows past what its part layout holds (10,000 parts of the smallest part size, about
//! 78 GiB), or three failed parts end the write-behind: its upload is aborted and close() uploads the file the
//! ordinary way. A program that goes back to rewrite a header pays the ordinary price, never a wrong byte.
//!
//! # Attributes
//! CreateMultipartUpload fixes the object's metadata when the first part is ready, but the file's mtime moves
//! with every later write (and a chmod can come at any time). When the metadata that close() would send differs
//! from the metadata the upload was created with, the round that completes the upload leaves the attributes
//! unsaved and asks its upload loop for one more round: a metadata copy of the object onto itself, conditional on
//! the ETag the completion returned (in parts, for an object over CopyObject's 5 GiB; see `store::bigcopy`).
//! close() and fsync() return once the data is committed and do not wait for that copy: until it lands, the final
//! attributes are in the journal as any attribute change is, so a crash leaves the copy to the next mount. A
//! rename, which copies the object, waits for it.
use super::codec::Codec;
use super::journal::{new_token, MultipartRef};
use super::upload::{part_blocks, Snapshot, MAX_PARTS, SINGLE_PUT_MAX};
use super::write::{FileState, OpenFile};
use super::{Fs, FsResult};
use crate::store::{CompletedPart, Metadata, ObjectStore};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// Failed parts before the write-behind gives up (each attempt already retried by the store; a failed part is
/// sent again by the completing upload).
const MAX_FAILURES: u32 = 3;
/// Parts of one file in flight at once (each holds one part's sealed bytes in memory).
const IN_FLIGHT: usize = 4;
/// Whole parts of one file kept staged while they wait for a slot in flight.
const MAX_READY: usize = 2;
/// Whole parts a writer may run ahead of the parts started: a write that leaves more waiting is held until a
/// part ends, so the parts waiting stay within what is staged (no read of the journal) and close() has little
/// left to send. Must stay below [`MAX_READY`].
const PACE_PARTS: u64 = 1;
/// The longest one write is held for a part to end. A hold that runs out stops the holding until a part goes up
/// again, so a stalled or failing upload (an outage) costs a writer one such wait, not one per write.
const PACE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
/// Bytes of staged parts (being filled or waiting; not those in flight) one mount holds at most.
pub const STAGE_BUDGET: u64 = 64 << 20;

/// Bytes of upload bodies (parts and single PUTs) one mount holds at once while they are built and sent, for
/// all its files together: how many files are written or closed at once does not change the memory uploads take.
pub const SEND_BUDGET: u64 = 64 << 20;

/// The mount-wide allowances for staged parts (see [`Staging`]) and for upload bodies in flight
/// ([`SEND_BUDGET`]).
#[derive(Debug)]
pub struct StageBudget {
    /// Upload bodies, in KiB.
    send: Arc<tokio::sync::Semaphore>,
    used: AtomicU64,
    /// Parts sent from staged bytes (for tests).
    sent: AtomicU64,
    /// Writes held for a part to end, and holds that ran out (for tests).
    held: AtomicU64,
    held_out: AtomicU64,
}

/// Bytes taken from a [`StageBudget`], given back when dropped.
struct Reservation {
    budget: Arc<StageBudget>,
    bytes: u64,
}

impl Default for StageBudget {
    fn default() -> Self {
        StageBudget {
            send: Arc::new(tokio::sync::Semaphore::new((SEND_BUDGET >> 10) as usize)),
            used: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            held: AtomicU64::new(0),
            held_out: AtomicU64::new(0),
        }
    }
}

/// Room for an upload body, given back when dropped.
pub type SendRoom = tokio::sync::OwnedSemaphorePermit;

impl StageBudget {
    /// The allowance's share for a body of `bytes` (all of it, at most).
    fn send_kib(bytes: u64) -> u32 {
        bytes.div_ceil(1024).clamp(1, SEND_BUDGET >> 10) as u32
    }

    /// Room for an upload body of `bytes`, if there is some now.
    pub fn try_send(&self, bytes: u64) -> Option<SendRoom> {
        self.send.clone().try_acquire_many_owned(Self::send_kib(bytes)).ok()
    }

    /// Room for an upload body of `bytes`, once there is. Only for a caller that holds no other room while it
    /// waits (see `send_parts`): rooms held by others are given back as their uploads end.
    pub async fn send_room(&self, bytes: u64) -> SendRoom {
        self.send
            .clone()
            .acquire_many_owned(Self::send_kib(bytes))
            .await
            .expect("the send allowance is never closed")
    }

    /// Bytes of upload bodies held now (for tests).
    #[cfg(test)]
    pub fn sending(&self) -> u64 {
        SEND_BUDGET - ((self.send.available_permits() as u64) << 10)
    }

    fn reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + bytes <= STAGE_BUDGET).then_some(u + bytes)
            })
            .ok()?;
        Some(Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes held now (for tests).
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Parts sent from staged bytes so far (for tests).
    #[cfg(test)]
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Writes held so far, and holds that ran out (for tests).
    #[cfg(test)]
    pub fn held(&self) -> (u64, u64) {
        (self.held.load(Ordering::Acquire), self.held_out.load(Ordering::Acquire))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The object bytes of parts the program wrote in order, kept as the write path produced them so that a part goes
/// up without being read back from the journal (the journal still holds every block: this is only a copy).
///
/// The staged bytes of a block are always what the journal holds for it: every write and truncation that
/// changes blocks first drops what is staged for them ([`Staging::forget`]), under the file's state lock, and
/// only a block written in order after the staged ones is added ([`Staging::push`]). A part that cannot be staged
/// (written out of order, or over the mount's [`STAGE_BUDGET`]) is read from the journal as before.
pub struct Staging {
    per_part: u64,
    slot: usize,
    /// The part being filled: its index, its first blocks' bytes, and their allowance.
    fill: Option<(u64, Vec<u8>, Reservation)>,
    /// Whole parts waiting to be sent.
    ready: BTreeMap<u64, (Vec<u8>, Reservation)>,
    /// The next part's buffer, allocated and its pages touched on the blocking pool while the program writes
    /// this part: the first touch of fresh memory (the kernel's page faults and zeroing) is about a quarter of a
    /// write's time when the store keeps up, and done ahead it is off the writer's path.
    spare: Option<std::sync::mpsc::Receiver<(Vec<u8>, Reservation)>>,
    budget: Arc<StageBudget>,
}

impl Staging {
    fn new(per_part: u64, slot: u64, budget: Arc<StageBudget>) -> Staging {
        Staging {
            per_part,
            slot: slot as usize,
            fill: None,
            ready: BTreeMap::new(),
            spare: None,
            budget,
        }
    }

    fn part_bytes(&self) -> usize {
        self.per_part as usize * self.slot
    }

    /// Blocks `from..to` are about to change: drops what is staged for them.
    pub fn forget(&mut self, from: u64, to: u64) {
        let pp = self.per_part;
        self.ready.retain(|k, _| (k + 1) * pp <= from || k * pp >= to);
        if let Some((k, bytes, _)) = &mut self.fill {
            let start = *k * pp;
            let end = start + (bytes.len() / self.slot) as u64;
            if from < end && to > start {
                bytes.truncate((from.max(start) - start) as usize * self.slot);
            }
        }
    }

    /// Block `i` now holds `stored` (its object bytes as a block that is not the file's last): staged if it
    /// continues the part being filled, or starts a part.
    pub fn push(&mut self, i: u64, stored: &[u8]) {
        debug_assert_eq!(stored.len(), self.slot);
        if let Some(bytes) = self.sink(i, 1) {
            bytes.extend_from_slice(stored);
            self.filled();
        }
    }

    /// Where the object bytes of blocks `i..i + n` (all in one part) are to be appended to be staged: the part
    /// being filled, when they continue it or start a part; `None` when they are not staged. The caller appends
    /// exactly `n` slots (the write path seals them straight into it), then calls [`filled`](Self::filled).
    /// Starting a part may wait for its buffer to be ready (see `spare`): call it off the async workers, as the
    /// write path does on the blocking pool.
    pub fn sink(&mut self, i: u64, n: u64) -> Option<&mut Vec<u8>> {
        let pp = self.per_part;
        debug_assert!(n >= 1 && i % pp + n <= pp, "blocks {i}+{n} span parts of {pp}");
        let continues = self
            .fill
            .as_ref()
            .is_some_and(|(k, bytes, _)| k * pp + (bytes.len() / self.slot) as u64 == i);
        if !continues {
            // A part that will not be completed in order is read from the journal instead.
            self.fill = None;
            // Only at a part's first block, and not while the parts staged already wait: a part that could not
            // be kept once full would be copied for nothing.
            if !i.is_multiple_of(pp) || self.ready.len() >= MAX_READY {
                return None;
            }
            let (bytes, r) = match self.spare.take().and_then(|prepared| prepared.recv().ok()) {
                Some(prepared) => prepared,
                None => (
                    Vec::with_capacity(self.part_bytes()),
                    self.budget.reserve(self.part_bytes() as u64)?,
                ),
            };
            self.fill = Some((i / pp, bytes, r));
            self.prepare();
        }
        self.fill.as_mut().map(|(_, bytes, _)| bytes)
    }

    /// Starts preparing the next part's buffer on the blocking pool, if the mount's allowance has room for it (the
    /// buffer holds its part's allowance from now on).
    fn prepare(&mut self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let bytes = self.part_bytes();
        let Some(r) = self.budget.reserve(bytes as u64) else {
            return;
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn_blocking(move || {
            let mut buf = Vec::<u8>::with_capacity(bytes);
            // SAFETY: writes zeros within the allocation's capacity; the length stays 0. (A safe `fill` of the
            // spare capacity with `MaybeUninit` zeros was measured to be compiled away, touching nothing.)
            unsafe { std::ptr::write_bytes(buf.as_mut_ptr(), 0, bytes) };
            // The staging was dropped meanwhile: the buffer and its allowance go with it.
            let _ = tx.send((buf, r));
        });
        self.spare = Some(rx);
    }

    /// Ends an append through [`sink`](Self::sink): a part that is now whole waits to be sent.
    pub fn filled(&mut self) {
        let whole = self.part_bytes();
        if self.fill.as_ref().is_some_and(|(_, bytes, _)| bytes.len() == whole) {
            if let Some((k, bytes, r)) = self.fill.take() {
                self.ready.insert(k, (bytes, r));
            }
        }
    }

    /// Blocks per part.
    pub fn per_part(&self) -> u64 {
        self.per_part
    }

    /// Part `k`'s bytes, if it was staged whole.
    fn take(&mut self, k: u64) -> Option<Vec<u8>> {
        self.ready.remove(&k).map(|(bytes, _)| bytes)
    }
}

/// Where a write-behind part's bytes come from.
enum PartFrom {
    Staged(Vec<u8>),
    /// Read from the journal: the file's snapshot and the part's blocks.
    Journal(Box<Snapshot>, std::ops::Range<u64>),
}

/// The write-behind of one file: its multipart upload and the parts it has sent.
pub struct WriteBehind {
    pub key: String,
    /// Created when the first part is ready; `None` until then.
    pub upload_id: Option<String>,
    /// The token in the upload's metadata, reused by the upload that completes it.
    pub token: String,
    /// The metadata the upload was created with.
    pub meta: Metadata,
    pub codec: Arc<Codec>,
    /// Blocks per part: what the completing upload's layout must also have.
    pub per_part: u64,
    /// The parts sent, by index (part number - 1). A part that failed is missing: the completing upload sends it.
    pub parts: BTreeMap<u64, CompletedPart>,
    /// The next part to start: every part before it was sent, is in flight, or failed.
    next: u64,
    /// The create and the parts in flight, for the completing upload to wait on.
    pub busy: watch::Sender<usize>,
    /// Parts staged by the write path, sent without a read of the journal (`None` while a write holds it, or
    /// where the journal's blocks are neither the object's nor plaintext).
    pub staging: Option<Staging>,
    failures: u32,
    /// A hold ran out ([`PACE_WAIT`]): writes are not held until a part goes up again.
    unpaced: bool,
    store: Arc<dyn ObjectStore>,
}

impl WriteBehind {
    /// Blocks that were sent or are being sent: a write below this ends the write-behind.
    pub fn frontier(&self) -> u64 {
        self.next * self.per_part
    }

    fn in_flight(&self) -> usize {
        *self.busy.borrow()
    }

    fn set_in_flight(&self, n: usize) {
        self.busy.send_replace(n);
    }

    /// When the file, with `ready_blocks` whole blocks behind its end, has more than [`PACE_PARTS`] whole parts
    /// that no upload has started, and the upload keeps going: a receiver that changes when a part ends, for the
    /// write to wait on once the file's lock is released (see [`Fs::pace`]).
    pub fn pace(&self, ready_blocks: u64) -> Option<watch::Receiver<usize>> {
        (self.upload_id.is_some() && !self.unpaced && self.failures == 0 && self.waiting(ready_blocks) > PACE_PARTS)
            .then(|| self.busy.subscribe())
    }

    /// Whole parts, wholly behind the file's end (`ready_blocks` whole blocks), that no upload has started: part
    /// `k` may go up once `(k + 1) * per_part < ready_blocks`: a block after it exists, so it is not the final one.
    fn waiting(&self, ready_blocks: u64) -> u64 {
        (ready_blocks.saturating_sub(1) / self.per_part).saturating_sub(self.next)
    }

    /// Hands the upload over to the completing upload: dropping `self` no longer aborts it.
    pub fn into_upload(mut self) -> Option<(String, BTreeMap<u64, CompletedPart>, Metadata)> {
        let id = self.upload_id.take()?;
        Some((id, std::mem::take(&mut self.parts), std::mem::take(&mut self.meta)))
    }
}

impl Drop for WriteBehind {
    /// A write-behind dropped without completing aborts its upload (best effort: the next mount aborts what
    /// remains, as the journal records the id).
    fn drop(&mut self) {
        let Some(id) = self.upload_id.take() else { return };
        let (store, key) = (self.store.clone(), self.key.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.abort_multipart(&key, &id).await {
                    log::warn!("{key}: aborting the write-behind upload failed (the next mount aborts it): {e}");
                }
            });
        }
    }
}

/// Spawns a task of the write-behind with `token`. If it panics (a bug below it), the in-flight count it held
/// would never come back down and the file's upload would wait for it for ever (close and fsync fail once
/// `upload_timeout` passes, and the data stays in the journal, never saved): the write-behind ends instead (its
/// upload is aborted) and the upload sends the file whole, from the journal, as when a change reaches what was
/// sent.
fn spawn_behind(file: &Arc<OpenFile>, token: &str, task: impl std::future::Future<Output = ()> + Send + 'static) {
    let (file, token) = (file.clone(), token.to_string());
    super::spawn_watched(task, move |panicked| async move {
        // Ended: nobody is left waiting for it.
        if !panicked {
            return;
        }
        let mut st = file.state.lock().await;
        if st.behind(&token).is_some() {
            log::error!(
                "{}: a write-behind task panicked; close uploads the file whole, and no write-behind is started for it again until it is saved and closed",
                st.key
            );
            st.wb = None;
            st.behind_off = true;
        }
    });
}

impl FileState {
    /// Blocks `from..to` are about to change: ends the write-behind if they reach what it sent, and drops what it
    /// staged of them.
    pub fn changing(&mut self, from: u64, to: u64) {
        if self.wb.as_ref().is_some_and(|w| from < w.frontier()) {
            log::debug!("{}: write-behind ends: a change reaches what was sent", self.key);
            self.wb = None;
        }
        if let Some(s) = self.wb.as_mut().and_then(|w| w.staging.as_mut()) {
            s.forget(from, to);
        }
    }

    /// The file's write-behind if it is the one with `token` (a task of one that ended must leave the next alone).
    fn behind(&mut self, token: &str) -> Option<&mut WriteBehind> {
        self.wb.as_mut().filter(|w| w.token == token)
    }

    /// Whole blocks behind the file's end: what a write-behind part may be made of (see [`WriteBehind::pace`]).
    pub fn whole_blocks(&self) -> u64 {
        self.size / self.bs.get()
    }
}

impl Fs {
    /// After a write: starts sending the next part if one is ready behind the file's end (see the module comment).
    pub(super) fn write_behind(&self, file: &Arc<OpenFile>, st: &mut FileState) {
        if !self.cfg.write_behind || st.behind_off || st.base_valid != 0 || st.unlinked || st.poisoned {
            return;
        }
        let object_size = st.codec.object_size(st.size);
        // The smallest parts, and the most blocks an upload with parts of that size can hold: the layout the
        // completing upload must have too (it is chosen from the final size).
        let per_part = part_blocks(&st.codec, 0, self.cfg.max_parts);
        let layout_blocks = per_part.saturating_mul(self.cfg.max_parts.clamp(1, MAX_PARTS));
        if st.codec.block_count(st.size) > layout_blocks {
            if st.wb.take().is_some() {
                log::debug!("{}: write-behind ends: the file outgrew its part layout", st.key);
            }
            return;
        }
        let ready_blocks = st.whole_blocks();
        if st.wb.is_none() {
            // Not while an upload of this file is in flight, nor for what one PUT takes.
            if st.multipart.is_some() || object_size <= SINGLE_PUT_MAX || per_part >= ready_blocks {
                return;
            }
            st.wb = Some(WriteBehind {
                key: st.key.clone(),
                upload_id: None,
                token: new_token(),
                meta: Metadata::new(),
                codec: st.codec.clone(),
                per_part,
                parts: BTreeMap::new(),
                next: 0,
                busy: watch::channel(0).0,
                staging: st
                    .journal
                    .as_ref()
                    .is_some_and(|j| j.is_object_format() || !st.codec.is_sealed())
                    .then(|| Staging::new(per_part, st.codec.stored_block_len(), self.staged.clone())),
                failures: 0,
                unpaced: false,
                store: self.store.clone(),
            });
        }
        let Some(fs) = self.me.upgrade() else { return };
        let Some(w) = st.wb.as_ref() else { return };
        if w.upload_id.is_none() {
            if w.in_flight() == 0 {
                w.set_in_flight(1);
                let meta = st.object_metadata(st.xattr.as_deref(), &w.token);
                let (f, token) = (file.clone(), w.token.clone());
                spawn_behind(file, &w.token, async move { fs.create_behind(&f, meta, token).await });
            }
            return;
        }
        let part_bytes = per_part * st.codec.stored_block_len();
        let Some(w) = st.wb.as_mut() else { return };
        while w.in_flight() < IN_FLIGHT && w.waiting(ready_blocks) > 0 {
            // Without room in the mount's allowance the part waits: the next write, or a part of this file
            // that ends, starts it (and a part left waiting at close goes up with the rest).
            let Some(room) = self.staged.try_send(part_bytes) else {
                break;
            };
            let k = w.next;
            w.next += 1;
            w.set_in_flight(w.in_flight() + 1);
            let (fs, f, token) = (fs.clone(), file.clone(), w.token.clone());
            spawn_behind(file, &w.token, async move { fs.send_behind(&f, k, token, room).await });
        }
    }

    /// Holds a write until one of its file's parts ends (see [`WriteBehind::pace`]), at most [`PACE_WAIT`]; a hold
    /// that runs out stops the holding until a part goes up again. No lock is held while it waits.
    pub(super) async fn pace(&self, file: &OpenFile, mut part_ended: watch::Receiver<usize>) {
        self.staged.held.fetch_add(1, Ordering::AcqRel);
        if tokio::time::timeout(PACE_WAIT, part_ended.changed()).await.is_ok() {
            return;
        }
        self.staged.held_out.fetch_add(1, Ordering::AcqRel);
        if let Some(w) = file.state.lock().await.wb.as_mut() {
            log::debug!(
                "{}: no write-behind part ended within {PACE_WAIT:?}: writes are not held until one goes up",
                w.key
            );
            w.unpaced = true;
        }
    }

    /// Creates the multipart upload of the write-behind with `token` with the file's metadata of now, records
    /// its id in the journal, and starts the parts that are ready. Each step acts only on that write-behind: the
    /// file may have ended it and started another meanwhile.
    async fn create_behind(self: Arc<Self>, file: &Arc<OpenFile>, meta: Metadata, token: String) {
        let key = file.state.lock().await.behind(&token).map(|w| w.key.clone());
        let Some(key) = key else { return };
        let created = self.store.create_multipart(&key, &meta).await;
        let mut st = file.state.lock().await;
        let id = match created {
            Ok(id) => id,
            Err(e) => {
                log::warn!("{key}: write-behind could not start (the file is uploaded at close): {e}");
                if st.behind(&token).is_some() {
                    st.wb = None;
                }
                return;
            }
        };
        let Some(w) = st.behind(&token).filter(|w| w.key == key) else {
            // Ended while the create was in flight: nothing may be left behind.
            drop(st);
            let _ = self.store.abort_multipart(&key, &id).await;
            return;
        };
        w.upload_id = Some(id.clone());
        w.meta = meta;
        w.set_in_flight(0);
        st.multipart = Some(MultipartRef { key: key.clone(), id });
        if let Err(e) = st.save_manifest() {
            log::warn!("{key}: recording the write-behind upload in the journal failed: {e}");
            st.wb = None;
            return;
        }
        self.write_behind(file, &mut st);
    }

    /// Sends part `k` of the write-behind with `token`, records it, and starts the next ones. A part of a
    /// write-behind that ended meanwhile is not counted against the file's next one.
    async fn send_behind(self: Arc<Self>, file: &Arc<OpenFile>, k: u64, token: String, room: SendRoom) {
        let sent = self.send_part_behind(file, k, &token).await;
        drop(room);
        let mut st = file.state.lock().await;
        let Some(w) = st.behind(&token) else { return };
        w.set_in_flight(w.in_flight().saturating_sub(1));
        match sent {
            Ok(Some((id, part))) if w.upload_id.as_deref() == Some(id.as_str()) => {
                w.parts.insert(k, part);
                w.unpaced = false;
                file.part_sent();
            }
            Ok(_) => {}
            Err(e) => {
                w.failures += 1;
                log::warn!(
                    "{}: write-behind part {} failed ({} of {MAX_FAILURES}; close sends it): {e}",
                    w.key,
                    k + 1,
                    w.failures
                );
                if w.failures >= MAX_FAILURES {
                    st.wb = None;
                    return;
                }
            }
        }
        self.write_behind(file, &mut st);
    }

    async fn send_part_behind(
        &self,
        file: &Arc<OpenFile>,
        k: u64,
        token: &str,
    ) -> FsResult<Option<(String, CompletedPart)>> {
        let (part, upload_id, key) = {
            let mut st = file.state.lock().await;
            let Some(w) = st.behind(token) else {
                return Ok(None);
            };
            let Some(id) = w.upload_id.clone() else {
                return Ok(None);
            };
            let key = w.key.clone();
            let part = match w.staging.as_mut().and_then(|s| s.take(k)) {
                Some(bytes) => PartFrom::Staged(bytes),
                // The snapshot (a copy of the part's share of the dirty set) only for a part read from the journal.
                None => {
                    let blocks = k * w.per_part..(k + 1) * w.per_part;
                    PartFrom::Journal(Box::new(Snapshot::of_blocks(&st, blocks.clone())), blocks)
                }
            };
            (part, id, key)
        };
        let t0 = std::time::Instant::now();
        let (body, how) = match part {
            PartFrom::Staged(bytes) => {
                self.staged.sent.fetch_add(1, Ordering::AcqRel);
                (bytes, "staged, ")
            }
            PartFrom::Journal(snap, blocks) => (self.assemble(file, &snap, blocks).await?, ""),
        };
        let t1 = std::time::Instant::now();
        let part = self
            .store
            .upload_part(&key, &upload_id, k as i32 + 1, body.into())
            .await?;
        log::debug!(
            "{}: write-behind part {} sent ({}{:?} reading the journal, {:?} uploading)",
            key,
            k + 1,
            how,
            t1 - t0,
            t1.elapsed()
        );
        Ok(Some((upload_id, part)))
    }

    /// For the upload of `snap`: the file's write-behind upload and its parts, once no part is in flight, if its
    /// parts fit the snapshot's layout; otherwise it is ended (and aborted).
    pub(super) async fn take_write_behind(
        &self,
        file: &OpenFile,
        snap: &Snapshot,
    ) -> Option<(String, BTreeMap<u64, CompletedPart>, Metadata)> {
        let mut st = loop {
            let mut idle = file.state.lock().await.wb.as_ref()?.busy.subscribe();
            let _ = idle.wait_for(|n| *n == 0).await;
            let st = file.state.lock().await;
            // Parts may have started between the wait and the lock (the create's end starts the ready ones while
            // it holds the lock): those go up first, to be part of the upload.
            if st.wb.as_ref()?.in_flight() == 0 {
                break st;
            }
        };
        let w = st.wb.take()?;
        let n = snap.codec.block_count(snap.size);
        let fits = w.key == snap.key
            && Arc::ptr_eq(&w.codec, &snap.codec)
            && w.per_part == part_blocks(&snap.codec, n, self.cfg.max_parts)
            && w.parts.keys().all(|k| (k + 1) * w.per_part < n)
            && w.token == snap.token
            && snap.base_valid == 0;
        if !fits {
            log::debug!(
                "{}: write-behind parts do not fit the upload; uploading it whole",
                snap.key
            );
            return None;
        }
        w.into_upload()
    }

    /// The token the next upload uses: the write-behind's, if one runs (its upload carries it already).
    pub(super) fn upload_token(st: &FileState) -> String {
        st.wb.as_ref().map_or_else(new_token, |w| w.token.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{config, cse_keys, data, same};
    use super::super::*;
    use super::{StageBudget, Staging, STAGE_BUDGET};
    use crate::store::failing::{Action, FailingStore, FaultKind, OpKind, Rule, When};
    use crate::store::memory::MemoryStore;
    use std::time::Duration;

    const MIB: usize = 1 << 20;

    async fn setup(mode: KeyMode) -> (tempfile::TempDir, Arc<FailingStore<MemoryStore>>, Arc<Fs>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingStore::new(MemoryStore::new()));
        let keys = mode.is_client_side().then(cse_keys);
        let fs = Fs::new(store.clone(), keys, config(dir.path(), mode)).unwrap();
        (dir, store, fs)
    }

    async fn write_mib(fs: &Fs, fh: u64, content: &[u8], mib: std::ops::Range<usize>) {
        for k in mib {
            fs.write(fh, (k * MIB) as u64, &content[k * MIB..(k + 1) * MIB])
                .await
                .unwrap();
        }
    }

    /// Waits until the store has seen at least `n` UploadParts.
    async fn parts_sent(store: &FailingStore<MemoryStore>, n: u64) {
        for _ in 0..3000 {
            if store.stats().count(OpKind::UploadPart) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("only {} parts were sent", store.stats().count(OpKind::UploadPart));
    }

    async fn read_back(fs: &Fs, name: &str) -> Vec<u8> {
        let ino = fs.lookup(ROOT_INO, name).await.unwrap().ino;
        let fh = fs.open(ino, false, false).await.unwrap();
        let mut out = Vec::new();
        loop {
            let got = fs.read(fh, out.len() as u64, 1 << 20).await.unwrap();
            if got.is_empty() {
                break;
            }
            out.extend_from_slice(&got);
        }
        fs.release(fh).await.unwrap();
        out
    }

    async fn no_upload_left(store: &FailingStore<MemoryStore>) {
        for _ in 0..200 {
            if store.list_multipart_uploads("").await.unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "a multipart upload was left: {:?}",
            store.list_multipart_uploads("").await
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parts_go_up_while_the_file_is_written_and_close_sends_the_rest() {
        for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
            let (_dir, store, fs) = setup(mode).await;
            let content = data(40 * MIB + 5000, 3);
            let (attr, fh) = fs.create(ROOT_INO, "big", 0o644, 1, 1).await.unwrap();
            write_mib(&fs, fh, &content, 0..40).await;
            fs.write(fh, 40 * MIB as u64, &content[40 * MIB..]).await.unwrap();
            // Before close: the parts wholly behind the end are in S3 already (5 of 6 parts of ~8 MiB).
            parts_sent(&store, 5).await;
            assert_eq!(store.stats().count(OpKind::CreateMultipart), 1);
            // A chmod after the upload was created: the final attributes are settled at completion.
            let change = AttrChange {
                perm: Some(0o600),
                ..AttrChange::default()
            };
            fs.setattr(attr.ino, None, change).await.unwrap();
            fs.release(fh).await.unwrap();
            assert_eq!(store.stats().count(OpKind::UploadPart), 6, "{mode}: no part sent twice");
            assert_eq!(store.stats().count(OpKind::Complete), 1);
            // The final attributes follow the data in the background: one metadata copy, soon after close.
            for _ in 0..500 {
                if store.stats().count(OpKind::Copy) == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(
                store.stats().count(OpKind::Copy),
                1,
                "{mode}: one metadata copy settles the attributes"
            );
            // A fresh mount sees the final attributes and reads the content back.
            let mtime = fs.getattr(attr.ino).await.unwrap().mtime;
            let dir2 = tempfile::tempdir().unwrap();
            let keys = mode.is_client_side().then(cse_keys);
            let fresh = Fs::new(store.clone(), keys, config(dir2.path(), mode)).unwrap();
            let seen = fresh.lookup(ROOT_INO, "big").await.unwrap();
            assert_eq!(seen.perm, 0o600, "{mode}");
            assert_eq!(seen.mtime, mtime, "{mode}: the object carries the final mtime");
            same(&read_back(&fresh, "big").await, &content, &format!("{mode}"));
            no_upload_left(&store).await;
        }
    }

    /// A writer ahead of its parts is held when its writes are done inline too: the write is in the journal and
    /// the answer waits for a part to end (or for the pace's limit), then counts the bytes written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_inline_write_far_ahead_of_its_parts_is_held() {
        let (_dir, store, fs) = setup(KeyMode::CseLocal).await;
        store.add_rule(Rule::new(
            Some(OpKind::UploadPart),
            When::Always,
            Action::Delay(Duration::from_millis(300)),
        ));
        // Nine parts of 8 MiB: four go up at once, so the writer gets more than one part ahead.
        let content = data(72 * MIB, 5);
        let (_a, fh) = fs.create(ROOT_INO, "paced", 0o644, 1, 1).await.unwrap();
        let mut held = 0;
        for k in 0..72 {
            match super::super::tests::inline(&fs, fh, (k * MIB) as u64, &content[k * MIB..(k + 1) * MIB]).await {
                Ok(InlineWrite::Done(Ok(n))) => assert_eq!(n as usize, MIB),
                Ok(InlineWrite::Held(w)) => {
                    held += 1;
                    assert_eq!(fs.hold(w).await.unwrap() as usize, MIB);
                }
                Ok(InlineWrite::Done(Err(e))) => panic!("MiB {k}: {e}"),
                // The state was busy (the upload's tasks take it briefly): the async path, as FUSE does.
                Err(back) => {
                    fs.write_data(fh, (k * MIB) as u64, back).await.unwrap();
                }
            }
        }
        assert!(held > 0, "no inline write was held while parts took 300 ms each");
        let (counted, timed_out) = fs.staged.held();
        assert!(counted >= held, "each held write is counted");
        // Parts end every 300 ms, within the 500 ms a writer is held at most: every hold ended with a part.
        assert_eq!(
            timed_out, 0,
            "a held write was let go by the time limit, not by a part that ended"
        );
        fs.release(fh).await.unwrap();
        same(&read_back(&fs, "paced").await, &content, "paced");
        no_upload_left(&store).await;
    }

    /// Parts staged by the write path while the upload's create is held: pieces that rewrite each part's last
    /// block, a rewrite inside a staged part, and a cut into the part being filled followed by a hole and more
    /// writes. What goes up must be what the journal holds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn staged_parts_hold_exactly_what_was_written() {
        use crate::store::failing::Action;
        for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
            let (_dir, store, fs) = setup(mode).await;
            store.add_rule(Rule::new(
                Some(OpKind::CreateMultipart),
                When::Always,
                Action::Delay(Duration::from_secs(2)),
            ));
            let mut content = data(28 * MIB, 11);
            let (a, fh) = fs.create(ROOT_INO, "s", 0o644, 1, 1).await.unwrap();
            // Pieces of 100,000 bytes: most blocks are written in two goes, the second rewriting the first.
            let pieces = |fs: Arc<Fs>, from: usize, bytes: Vec<u8>| async move {
                for (k, piece) in bytes.chunks(100_000).enumerate() {
                    fs.write(fh, (from + k * 100_000) as u64, piece).await.unwrap();
                }
            };
            pieces(fs.clone(), 0, content.clone()).await;
            // The write-behind began in part 2 (of 8 MiB), so part 3 is being filled. A cut into it, a hole up
            // to the old end, then more data: the hole must read as zeros, not as what was staged there.
            let cut = 25 * MIB + 777;
            fs.setattr(a.ino, Some(cut as u64), AttrChange::default())
                .await
                .unwrap();
            fs.setattr(a.ino, Some(28 * MIB as u64), AttrChange::default())
                .await
                .unwrap();
            content[cut..].fill(0);
            let more = data(20 * MIB, 12);
            pieces(fs.clone(), 28 * MIB, more.clone()).await;
            content.extend_from_slice(&more);
            assert!(fs.staged.used() > 0, "{mode}: parts were staged");
            assert_eq!(
                store.stats().count(OpKind::UploadPart),
                0,
                "{mode}: the create is still held"
            );
            // A rewrite inside a part staged whole.
            fs.write(fh, (33 * MIB + 5) as u64, b"rewritten").await.unwrap();
            content[33 * MIB + 5..33 * MIB + 14].copy_from_slice(b"rewritten");
            // And on: the parts after it are staged again.
            let tail = data(12 * MIB + 3, 13);
            pieces(fs.clone(), 48 * MIB, tail.clone()).await;
            content.extend_from_slice(&tail);
            fs.release(fh).await.unwrap();
            assert!(fs.staged.sent() > 0, "{mode}: some parts went up from staged bytes");
            // A buffer being prepared for a next part gives its allowance back once the preparation ends.
            for _ in 0..500 {
                if fs.staged.used() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            assert_eq!(fs.staged.used(), 0, "{mode}: nothing stays staged after close");
            same(&read_back(&fs, "s").await, &content, &format!("{mode}: staged"));
            let dir2 = tempfile::tempdir().unwrap();
            let keys = mode.is_client_side().then(cse_keys);
            let fresh = Fs::new(store.clone(), keys, config(dir2.path(), mode)).unwrap();
            same(&read_back(&fresh, "s").await, &content, &format!("{mode}: fresh mount"));
            no_upload_left(&store).await;
        }
    }

    #[test]
    fn staging_keeps_only_parts_written_in_order_and_within_the_budget() {
        let budget = Arc::new(StageBudget::default());
        let slot = 4usize;
        let mut s = Staging::new(2, slot as u64, budget.clone());
        let b = |v: u8| [v; 4];
        // Part 0 in order: ready.
        s.push(0, &b(1));
        s.push(1, &b(2));
        // Part 1 starts out of order (block 3 first): not staged.
        s.push(3, &b(3));
        s.push(2, &b(4));
        s.push(3, &b(5));
        assert_eq!(s.take(1).as_deref(), Some(&[4, 4, 4, 4, 5, 5, 5, 5][..]));
        assert_eq!(s.take(0).as_deref(), Some(&[1, 1, 1, 1, 2, 2, 2, 2][..]));
        // A rewrite of a block being filled: the fill is cut there and continues.
        s.push(4, &b(6));
        s.forget(4, 5);
        s.push(4, &b(7));
        s.push(5, &b(8));
        // A change that touches a ready part drops it.
        s.push(6, &b(9));
        s.push(7, &b(9));
        s.forget(7, 8);
        assert_eq!(s.take(3), None);
        assert_eq!(s.take(2).as_deref(), Some(&[7, 7, 7, 7, 8, 8, 8, 8][..]));
        assert_eq!(budget.used(), 0);
        // The budget bounds what is staged across files.
        let per = STAGE_BUDGET / 2;
        let mut big: Vec<Staging> = (0..3).map(|_| Staging::new(1, per, budget.clone())).collect();
        for s in &mut big {
            s.push(0, &vec![0u8; per as usize]);
        }
        assert_eq!(big.iter_mut().filter_map(|s| s.take(0)).count(), 2);
        drop(big);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_part_is_prepared_within_the_budget_and_gives_it_back() {
        let budget = Arc::new(StageBudget::default());
        let parts = tokio::task::spawn_blocking({
            let budget = budget.clone();
            move || {
                let mut s = Staging::new(2, 4, budget.clone());
                s.push(0, &[1; 4]);
                // Part 0 being filled, and the buffer of the next one being prepared: two parts' allowance.
                assert_eq!(budget.used(), 16);
                s.push(1, &[2; 4]);
                // Part 1 starts in the prepared buffer; the one after it is prepared in turn.
                s.push(2, &[3; 4]);
                assert_eq!(budget.used(), 24, "part 0 waiting, part 1 filling, a buffer prepared");
                s.push(3, &[4; 4]);
                let parts = (s.take(0), s.take(1));
                assert_eq!(budget.used(), 8, "only the prepared buffer is left");
                parts
            }
        })
        .await
        .unwrap();
        assert_eq!(parts.0.as_deref(), Some(&[1, 1, 1, 1, 2, 2, 2, 2][..]));
        assert_eq!(parts.1.as_deref(), Some(&[3, 3, 3, 3, 4, 4, 4, 4][..]));
        for _ in 0..500 {
            if budget.used() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(
            budget.used(),
            0,
            "a dropped staging's prepared buffer gives its allowance back"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_ahead_of_its_uploads_is_held_but_a_stalled_upload_holds_it_once() {
        let (_dir, store, fs) = setup(KeyMode::CseLocal).await;
        // Every part takes 1 s: the writer is soon more than a part ahead, and every hold runs out.
        store.add_rule(Rule::new(
            Some(OpKind::UploadPart),
            When::Always,
            Action::Delay(Duration::from_secs(1)),
        ));
        let content = data(80 * MIB, 9);
        let (_, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
        write_mib(&fs, fh, &content, 0..80).await;
        let (held, out) = fs.staged.held();
        assert!(held >= 1, "the writer was held");
        // A hold that runs out stops the holding until a part goes up: at most one per part, plus one.
        let parts = store.stats().count(OpKind::UploadPart);
        assert!(
            out >= 1 && out <= parts + 1,
            "{out} holds ran out, {parts} parts started"
        );
        fs.release(fh).await.unwrap();
        same(&read_back(&fs, "f").await, &content, "held writes");
        no_upload_left(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shutdown_before_the_attributes_are_settled_says_the_data_is_in_s3() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingStore::new(MemoryStore::new()));
        let cfg = FsConfig {
            upload_timeout: Duration::from_millis(500),
            ..config(dir.path(), KeyMode::CseLocal)
        };
        let fs = Fs::new(store.clone(), Some(cse_keys()), cfg).unwrap();
        // The copy that settles the final mtime cannot go through; the data can.
        store.add_rule(Rule::fail(OpKind::Copy, When::Always, FaultKind::Transient));
        let content = data(40 * MIB, 10);
        let (_, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
        write_mib(&fs, fh, &content, 0..40).await;
        parts_sent(&store, 1).await;
        fs.release(fh).await.unwrap();
        assert!(store.stats().count(OpKind::Complete) >= 1, "the data was committed");
        let left = fs.flush_all().await;
        assert_eq!(left, Unsaved { data: 0, attributes: 1 });
        // With data left unsaved too, it is counted as data.
        store.add_rule(Rule::fail(OpKind::Put, When::Always, FaultKind::Transient));
        let (_, fh) = fs.create(ROOT_INO, "g", 0o644, 1, 1).await.unwrap();
        fs.write(fh, 0, b"small").await.unwrap();
        assert!(fs.release(fh).await.is_err(), "S3 refuses the PUT");
        assert_eq!(fs.flush_all().await, Unsaved { data: 1, attributes: 1 });
        store.clear_rules();
        same(&read_back(&fs, "f").await, &content, "data in S3");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_part_is_sent_again() {
        let (_dir, store, fs) = setup(KeyMode::CseLocal).await;
        store.add_rule(Rule::fail(OpKind::UploadPart, When::Nth(2), FaultKind::Transient));
        let content = data(40 * MIB, 4);
        let (_, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
        write_mib(&fs, fh, &content, 0..40).await;
        fs.release(fh).await.unwrap();
        assert_eq!(store.stats().injected(OpKind::UploadPart), 1);
        same(&read_back(&fs, "f").await, &content, "after a failed part");
        no_upload_left(&store).await;
    }

    /// A part's task that panics (a bug below it) ends the write-behind: close uploads the file whole and
    /// succeeds, and nothing is left pending (before, the upload waited for that part for ever and close failed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_part_task_that_panics_does_not_leave_close_waiting() {
        let (_dir, store, fs) = setup(KeyMode::CseLocal).await;
        store.add_rule(Rule::new(Some(OpKind::UploadPart), When::Nth(2), Action::Panic));
        let content = data(40 * MIB, 6);
        let (_, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
        write_mib(&fs, fh, &content, 0..40).await;
        let closed = tokio::time::timeout(Duration::from_secs(60), fs.release(fh)).await;
        closed.expect("close returned").unwrap();
        assert_eq!(
            store.stats().injected(OpKind::UploadPart),
            1,
            "one part's task panicked"
        );
        same(&read_back(&fs, "f").await, &content, "after a panicked part");
        no_upload_left(&store).await;
    }

    /// A write-behind that panicked is not started again for the file while it is open: a bug that panics at
    /// every create would otherwise panic (and log) once per write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_behind_that_panicked_is_not_started_again_for_the_file() {
        let (_dir, store, fs) = setup(KeyMode::CseLocal).await;
        store.add_rule(Rule::new(Some(OpKind::CreateMultipart), When::Always, Action::Panic));
        let content = data(40 * MIB, 9);
        let (_, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
        write_mib(&fs, fh, &content, 0..24).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        write_mib(&fs, fh, &content, 24..40).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            store.stats().injected(OpKind::CreateMultipart),
            1,
            "one write-behind panicked, and no other was started"
        );
        store.clear_rules();
        fs.release(fh).await.unwrap();
        same(&read_back(&fs, "f").await, &content, "after a panicked create");
        no_upload_left(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_into_a_sent_part_ends_it_and_close_uploads_the_truth() {
        let (_dir, store, fs) = setup(KeyMode::CseLocal).await;
        let mut content = data(40 * MIB, 5);
        let (_, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
        write_mib(&fs, fh, &content, 0..40).await;
        parts_sent(&store, 3).await;
        // Going back to rewrite a header, as archivers and media muxers do.
        fs.write(fh, 100, b"header").await.unwrap();
        content[100..106].copy_from_slice(b"header");
        fs.release(fh).await.unwrap();
        same(&read_back(&fs, "f").await, &content, "rewritten header");
        no_upload_left(&store).await;
        assert!(
            store.stats().count(OpKind::Abort) >= 1,
            "the write-behind upload was aborted"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn truncate_and_rename_during_write_behind_keep_every_byte() {
        let (dir, store, fs) = setup(KeyMode::CseLocal).await;
        // Truncated back into a sent part, then written on.
        let mut content = data(40 * MIB, 6);
        let (a, fh) = fs.create(ROOT_INO, "t", 0o644, 1, 1).await.unwrap();
        write_mib(&fs, fh, &content, 0..40).await;
        parts_sent(&store, 3).await;
        fs.setattr(a.ino, Some(10 * MIB as u64), AttrChange::default())
            .await
            .unwrap();
        content.truncate(10 * MIB);
        let more = data(3 * MIB, 7);
        fs.write(fh, 10 * MIB as u64, &more).await.unwrap();
        content.extend_from_slice(&more);
        fs.release(fh).await.unwrap();
        same(&read_back(&fs, "t").await, &content, "truncated");
        // Truncated to exactly the end of the sent parts: the new final block was sent as not final.
        let content = data(40 * MIB, 8);
        let (a, fh) = fs.create(ROOT_INO, "edge", 0o644, 1, 1).await.unwrap();
        write_mib(&fs, fh, &content, 0..40).await;
        parts_sent(&store, 6).await;
        let bs = config(dir.path(), KeyMode::CseLocal).block_size;
        let sealed = Codec::Sealed {
            bs,
            cipher: Box::new(crate::format::BlockCipher::new(
                &crate::format::DataKey::from_bytes([0; 32]),
                [0; 16],
            )),
        };
        let edge = crate::fs::upload::part_blocks(&sealed, 0, 10_000) * bs.get();
        fs.setattr(a.ino, Some(edge), AttrChange::default()).await.unwrap();
        fs.release(fh).await.unwrap();
        same(
            &read_back(&fs, "edge").await,
            &content[..edge as usize],
            "cut at a part's end",
        );
        // Renamed while parts are going up.
        let content = data(40 * MIB, 9);
        let (_, fh) = fs.create(ROOT_INO, "r", 0o644, 1, 1).await.unwrap();
        write_mib(&fs, fh, &content, 0..30).await;
        fs.rename(ROOT_INO, "r", ROOT_INO, "moved", false).await.unwrap();
        write_mib(&fs, fh, &content, 30..40).await;
        fs.release(fh).await.unwrap();
        same(&read_back(&fs, "moved").await, &content, "renamed");
        assert!(fs.lookup(ROOT_INO, "r").await.is_err());
        no_upload_left(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_daemon_leaves_no_upload_and_the_next_mount_saves_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingStore::new(MemoryStore::new()));
        let first = Fs::new(store.clone(), Some(cse_keys()), config(dir.path(), KeyMode::CseLocal)).unwrap();
        let content = data(30 * MIB, 10);
        let (_, fh) = first.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
        write_mib(&first, fh, &content, 0..30).await;
        parts_sent(&store, 2).await;
        // No release: as after kill -9, which runs no destructor (so nothing aborts the upload). Wait until the
        // first Fs is really gone (its tasks may hold it briefly).
        let ino = first.lookup(ROOT_INO, "f").await.unwrap().ino;
        let file = first.open_state(ino).unwrap();
        std::mem::forget(file.state.lock().await.wb.take());
        drop(file);
        let gone = Arc::downgrade(&first);
        drop(first);
        for _ in 0..1000 {
            if gone.strong_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(gone.strong_count(), 0, "the first Fs is still alive");
        let second = Fs::new(store.clone(), Some(cse_keys()), config(dir.path(), KeyMode::CseLocal)).unwrap();
        let r = second.recover().await;
        assert_eq!((r.saved, r.conflicts, r.broken), (1, 0, 0), "{r:?}");
        same(&read_back(&second, "f").await, &content, "recovered");
        no_upload_left(&store).await;
    }

    /// fsync() and close() say the data is in S3 only when it is. A write that lands while a write-behind upload
    /// completes is not in the object it completes: the attribute round that follows is then not the metadata
    /// copy alone, and a flush after the completion must wait for that write to go up (here, with S3 refusing
    /// everything from then on, it fails) instead of answering at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_during_the_completion_is_not_taken_as_saved() {
        let (_dir, store, fs) = setup(KeyMode::CseLocal).await;
        let content = data(40 * MIB, 21);
        let (_, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
        write_mib(&fs, fh, &content, 0..40).await;
        parts_sent(&store, 1).await;
        store.add_rule(Rule::new(
            Some(OpKind::Complete),
            When::Nth(1),
            Action::Delay(Duration::from_secs(1)),
        ));
        let flushing = {
            let fs = fs.clone();
            tokio::spawn(async move { fs.flush(fh).await })
        };
        for _ in 0..500 {
            if store.stats().count(OpKind::Complete) >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(store.stats().count(OpKind::Complete), 1, "the completion is under way");
        // The 41st MiB, written after the flush took its snapshot, while the completion is held.
        fs.write(fh, (40 * MIB) as u64, &[7u8; MIB]).await.unwrap();
        for op in [
            OpKind::CreateMultipart,
            OpKind::Put,
            OpKind::UploadPart,
            OpKind::Complete,
            OpKind::Copy,
        ] {
            store.add_rule(Rule::fail(op, When::Always, FaultKind::Transient));
        }
        flushing.await.unwrap().unwrap();
        let second = fs.flush(fh).await;
        store.clear_rules();
        let dir2 = tempfile::tempdir().unwrap();
        let fresh = Fs::new(store.clone(), Some(cse_keys()), config(dir2.path(), KeyMode::CseLocal)).unwrap();
        let in_s3 = fresh.lookup(ROOT_INO, "f").await.unwrap().size;
        assert!(
            second.is_err(),
            "the flush after the completion succeeded with S3 holding {in_s3} bytes of {}",
            41 * MIB
        );
        // The write is not lost: the file's journal holds it, and the upload goes on once S3 takes data again.
        fs.release(fh).await.unwrap();
        let mut whole = content.clone();
        whole.extend_from_slice(&[7u8; MIB]);
        same(&read_back(&fs, "f").await, &whole, "after the release");
        let fresh = Fs::new(store.clone(), Some(cse_keys()), config(dir2.path(), KeyMode::CseLocal)).unwrap();
        same(&read_back(&fresh, "f").await, &whole, "in S3");
    }

    /// A part of an ended write-behind that comes back after the file started another one (here: the first run
    /// ended by a rewrite of its start, saved by fsync, cut to zero and written again) leaves the new one alone:
    /// it does not count as the new one's create in flight, so no second create starts, no upload is left
    /// behind, and close saves the new content.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_late_part_of_an_ended_write_behind_leaves_the_next_one_alone() {
        let (_dir, store, fs) = setup(KeyMode::CseLocal).await;
        let first = data(40 * MIB, 31);
        let second = data(40 * MIB, 32);
        let (attr, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
        // The first run's parts stay in flight for two seconds.
        store.add_rule(Rule::new(
            Some(OpKind::UploadPart),
            When::Always,
            Action::Delay(Duration::from_secs(2)),
        ));
        write_mib(&fs, fh, &first, 0..40).await;
        for _ in 0..300 {
            if store.stats().count(OpKind::UploadPart) >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            store.stats().count(OpKind::UploadPart) >= 1,
            "parts of the first run are in flight"
        );
        store.clear_rules();
        write_mib(&fs, fh, &first, 0..1).await;
        fs.flush(fh).await.unwrap();
        // The second run's create is held past the first run's parts.
        store.add_rule(Rule::new(
            Some(OpKind::CreateMultipart),
            When::Nth(1),
            Action::Delay(Duration::from_millis(2500)),
        ));
        fs.setattr(attr.ino, Some(0), AttrChange::default()).await.unwrap();
        write_mib(&fs, fh, &second, 0..40).await;
        fs.release(fh).await.unwrap();
        same(&read_back(&fs, "f").await, &second, "read through the mount");
        let dir2 = tempfile::tempdir().unwrap();
        let fresh = Fs::new(store.clone(), Some(cse_keys()), config(dir2.path(), KeyMode::CseLocal)).unwrap();
        same(&read_back(&fresh, "f").await, &second, "in S3");
        assert_eq!(
            store.stats().count(OpKind::CreateMultipart),
            3,
            "one create for each write-behind run and one for the fsync"
        );
        no_upload_left(&store).await;
    }

    /// Many files written and closed at once, over a slow store: the upload bodies they hold together (parts going
    /// up behind the writers, then the parts and PUTs of their completions) stay within the mount's
    /// [`SEND_BUDGET`], not four parts per file, and every file is saved whole.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uploads_of_many_files_at_once_stay_within_the_send_budget() {
        use super::SEND_BUDGET;
        let (_dir, store, fs) = setup(KeyMode::CseLocal).await;
        for op in [OpKind::UploadPart, OpKind::Put] {
            store.add_rule(Rule::new(
                Some(op),
                When::Always,
                Action::Delay(Duration::from_millis(200)),
            ));
        }
        const FILES: u64 = 10;
        // 25 MiB for write-behind and multipart; every third file is small, for single PUTs.
        let size = |f: u64| if f % 3 == 2 { 3 * MIB } else { 25 * MIB };
        let mib = |f: u64, k: usize| data(MIB, (f * 31 + k as u64) as u8);
        let mut tasks = Vec::new();
        for f in 0..FILES {
            let fs = fs.clone();
            tasks.push(tokio::spawn(async move {
                let (_, fh) = fs.create(ROOT_INO, &format!("f{f}"), 0o644, 1, 1).await.unwrap();
                for k in 0..size(f) / MIB {
                    fs.write(fh, (k * MIB) as u64, &mib(f, k)).await.unwrap();
                }
                fs.release(fh).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let peak = store.peak_bytes_up_in_flight();
        assert!(
            peak <= SEND_BUDGET,
            "{peak} bytes of upload bodies were in flight at once ({} parts, {} PUTs)",
            store.stats().count(OpKind::UploadPart),
            store.stats().count(OpKind::Put)
        );
        assert!(peak >= 2 * 8 * MIB as u64, "{peak}: uploads overlapped");
        assert_eq!(fs.staged.sending(), 0, "every room is given back");
        store.clear_rules();
        let dir2 = tempfile::tempdir().unwrap();
        let fresh = Fs::new(store.clone(), Some(cse_keys()), config(dir2.path(), KeyMode::CseLocal)).unwrap();
        for f in 0..FILES {
            let got = read_back(&fresh, &format!("f{f}")).await;
            assert_eq!(got.len(), size(f), "f{f}");
            for (k, piece) in got.chunks(MIB).enumerate() {
                assert!(piece == &mib(f, k)[..], "f{f}: MiB {k} differs");
            }
        }
        no_upload_left(&store).await;
    }
}
