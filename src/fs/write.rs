//! Open files and their unsaved changes.
//!
//! A [`FileState`] is shared by every handle on one inode. It knows the version the file was opened from (`base`,
//! `None` for a file S3 does not have yet), the current size, and which blocks are dirty. Block `i`'s current
//! content is its dirty copy if there is one, else the base's block `i` cut at `base_valid` (everything past a
//! truncation is zeros), else zeros (see `content.rs`).
//!
//! Every dirty block is in the file's journal (journal.rs) before the write that made it returns; an in-memory
//! cache ([`WriteCache`]) keeps the plaintext of recently written blocks so that small writes into one block and
//! reads of fresh data do not open the journal again. Evicting from the cache costs nothing: the journal has the
//! block. The cache is bounded per mount (`max_dirty_bytes`, over all files), not per file, so its memory does not
//! follow how many files are written at once.
//!
//! Every change bumps the state's `generation`. An upload (upload.rs) works from a snapshot of one generation and
//! commits only what that generation held; `saved_gen` says which generation S3 has. A state with
//! `saved_gen < generation` is dirty and stays in memory, with its journal, until an upload catches up, whatever
//! happens to its handles (uploader.rs).
use super::codec::{Codec, Version};
use super::content::WriteData;
use super::dir::AttrChange;
use super::inode::{Attr, Kind};
use super::journal::{Journal, Manifest, MultipartRef, SealWith};
use super::{lock, Fs, FsError, FsResult, Handle};
use crate::format::{BlockSize, ObjectHeader};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// A file's cache of the plaintext of blocks it wrote: a map from block index to block, whose bytes are counted in
/// the file's total and in the mount's (shared by every file's cache, given back when an entry goes or the cache is
/// dropped).
#[derive(Debug)]
pub struct WriteCache {
    map: BTreeMap<u64, Vec<u8>>,
    bytes: u64,
    mount: Arc<AtomicU64>,
}

impl WriteCache {
    /// An empty cache counted in `mount`, the mount's total.
    pub fn new(mount: Arc<AtomicU64>) -> WriteCache {
        WriteCache {
            map: BTreeMap::new(),
            bytes: 0,
            mount,
        }
    }

    fn gone(&mut self, n: usize) {
        self.bytes -= n as u64;
        self.mount.fetch_sub(n as u64, Ordering::Relaxed);
    }

    pub fn get(&self, i: &u64) -> Option<&Vec<u8>> {
        self.map.get(i)
    }

    pub fn contains_key(&self, i: &u64) -> bool {
        self.map.contains_key(i)
    }

    pub fn insert(&mut self, i: u64, block: Vec<u8>) {
        self.bytes += block.len() as u64;
        self.mount.fetch_add(block.len() as u64, Ordering::Relaxed);
        if let Some(old) = self.map.insert(i, block) {
            self.gone(old.len());
        }
    }

    pub fn remove(&mut self, i: &u64) -> Option<Vec<u8>> {
        let block = self.map.remove(i)?;
        self.gone(block.len());
        Some(block)
    }

    pub fn pop_first(&mut self) -> Option<(u64, Vec<u8>)> {
        let (i, block) = self.map.pop_first()?;
        self.gone(block.len());
        Some((i, block))
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&u64) -> bool) {
        let mut dropped = 0;
        self.map.retain(|i, b| {
            keep(i) || {
                dropped += b.len();
                false
            }
        });
        self.gone(dropped);
    }

    /// Takes every entry out (the cache is left empty).
    pub fn take(&mut self) -> BTreeMap<u64, Vec<u8>> {
        let all = self.bytes as usize;
        self.gone(all);
        std::mem::take(&mut self.map)
    }
}

impl Drop for WriteCache {
    fn drop(&mut self) {
        self.mount.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// What the uploader reports to those waiting for a file to be saved.
#[derive(Clone, Debug, Default)]
pub struct UploadStatus {
    /// The newest generation S3 holds.
    pub saved_gen: u64,
    /// The last upload's error, if it failed.
    pub error: Option<Arc<FsError>>,
    /// The error will not go away by waiting (waiters return it at once; the uploader still retries).
    pub permanent: bool,
    /// Upload attempts finished so far, so that a waiter heeds only errors of attempts made after it asked.
    pub attempts: u64,
    /// Parts of the file's uploads that went up so far (write-behind and completing uploads alike): a waiter's
    /// `upload_timeout` runs from the last one, so a large upload that keeps going is waited for.
    pub parts_sent: u64,
    /// The parts of the completion request in flight (0: none): S3 assembles them before it answers, so a waiter
    /// gives it time by their number (see [`COMPLETE_WAIT_PER_PART`](super::uploader::COMPLETE_WAIT_PER_PART)).
    pub completing: u32,
}

pub struct OpenFile {
    /// The inode (0 for a file recovered from the journal at mount, which no inode names yet).
    pub ino: u64,
    pub state: tokio::sync::Mutex<FileState>,
    /// An upload task is running for this file.
    pub running: AtomicBool,
    /// The newest generation someone asked to be saved.
    pub wanted: AtomicU64,
    pub status: tokio::sync::watch::Sender<UploadStatus>,
    /// Wakes the upload task from its backoff sleep when someone asks for a save.
    pub wake: tokio::sync::Notify,
    /// How many times in a row the upload task panicked (it is started again after a backoff).
    pub panics: AtomicU32,
}

impl OpenFile {
    pub fn new(ino: u64, state: FileState) -> Arc<OpenFile> {
        let saved = state.saved_gen;
        Arc::new(OpenFile {
            ino,
            state: tokio::sync::Mutex::new(state),
            running: AtomicBool::new(false),
            wanted: AtomicU64::new(0),
            status: tokio::sync::watch::channel(UploadStatus {
                saved_gen: saved,
                ..UploadStatus::default()
            })
            .0,
            wake: tokio::sync::Notify::new(),
            panics: AtomicU32::new(0),
        })
    }

    /// Tells those waiting for the file to be saved that one of its parts went up.
    pub fn part_sent(&self) {
        self.status.send_modify(|s| s.parts_sent += 1);
    }
}

/// An open inode's shared state and the number of handles (and in-flight setattrs) holding it. The entry stays
/// in the map at count 0 until the state is saved, so that a reopen finds the same state instead of making a
/// second one, and so that lookups and reads see unsaved data.
pub struct OpenEntry {
    pub file: Arc<OpenFile>,
    pub count: u64,
}

pub struct FileState {
    /// The object key (kept up to date across renames).
    pub key: String,
    /// The version the file was opened from, or last uploaded; `None` for a new file.
    pub base: Option<Version>,
    /// Bytes of `base` still part of the file: its size, cut by every truncation since.
    pub base_valid: u64,
    /// Current plaintext size.
    pub size: u64,
    pub bs: BlockSize,
    /// Codec and header of the next upload: the base's (same file id and data key), or a new file's.
    pub codec: Arc<Codec>,
    pub header: Option<ObjectHeader>,
    /// Blocks whose current content is in the journal.
    pub dirty: BTreeSet<u64>,
    /// Plaintext of recently written dirty blocks (whole blocks).
    pub cache: WriteCache,
    pub journal: Option<Arc<Journal>>,
    /// Bumped by every change of content or attributes.
    pub generation: u64,
    /// The generation of the last content change.
    pub content_gen: u64,
    /// The generation S3 holds.
    pub saved_gen: u64,
    /// The smallest size a truncation set since the running upload took its snapshot (`u64::MAX`: none).
    pub min_cut: u64,
    pub attr: Attr,
    /// The extended attributes in their stored form (see `xattr`): carried into every upload.
    pub xattr: Option<String>,
    /// Token and upload id of the upload in flight, as the journal's manifest records them.
    pub upload_token: Option<String>,
    /// Tokens of earlier attempts that did not commit (see [`Manifest::earlier_tokens`]).
    pub earlier_tokens: Vec<String>,
    /// The multipart upload of an attempt in flight or left by one (see [`Manifest::multipart`]).
    pub multipart: Option<MultipartRef>,
    /// The upload of parts while the file is written, if one runs.
    pub wb: Option<super::writebehind::WriteBehind>,
    /// A write-behind task of this file panicked: no other is started while the state lives (close uploads whole).
    pub behind_off: bool,
    /// Unlinked while open: nothing more is uploaded.
    pub unlinked: bool,
    /// An upload failed for good (a conflict): writes and flushes fail until the file is reopened.
    pub poisoned: bool,
    /// The generation whose only change is the metadata copy that settles a write-behind upload's attributes
    /// (0: none). The data of that generation is in S3: close and fsync do not wait for the copy.
    pub settling: u64,
}

impl FileState {
    /// A state for a version S3 holds (nothing unsaved).
    pub fn opened(key: String, version: Version, attr: Attr, cache: WriteCache) -> FileState {
        FileState {
            key,
            base_valid: version.plain_size,
            size: version.plain_size,
            bs: version.codec.block_size(),
            codec: version.codec.clone(),
            header: version.header.clone(),
            base: Some(version),
            dirty: BTreeSet::new(),
            cache,
            journal: None,
            generation: 0,
            content_gen: 0,
            saved_gen: 0,
            min_cut: u64::MAX,
            attr: Attr { size: 0, ..attr },
            upload_token: None,
            earlier_tokens: Vec::new(),
            xattr: None,
            multipart: None,
            wb: None,
            behind_off: false,
            unlinked: false,
            poisoned: false,
            settling: 0,
        }
    }

    pub fn is_dirty(&self, i: u64) -> bool {
        self.dirty.contains(&i)
    }

    /// Content or size changed since S3's version.
    pub fn modified(&self) -> bool {
        self.content_gen > self.saved_gen || self.base.is_none()
    }

    /// S3's version, when the file's content is exactly it (nothing written, cut or extended since): reads
    /// then come from the object alone.
    pub fn clean_base(&self) -> Option<&Version> {
        let base = self.base.as_ref()?;
        (self.dirty.is_empty() && self.base_valid == base.plain_size && self.size == base.plain_size).then_some(base)
    }

    /// Anything (content or attributes) not yet in S3.
    pub fn unsaved(&self) -> bool {
        !self.unlinked && !self.poisoned && (self.generation > self.saved_gen || self.base.is_none())
    }

    /// After a rename: the object now lives under another key with this ETag (a server-side copy keeps the
    /// bytes, so the base version is otherwise the same).
    pub fn moved_to(&mut self, info: &crate::store::ObjectInfo) {
        self.key = info.key.clone();
        // Its upload is under the old key.
        self.wb = None;
        if let Some(b) = &mut self.base {
            b.etag = info.etag.clone();
        }
        if let Err(e) = self.save_manifest() {
            log::warn!("{}: recording the rename in the journal: {e}", self.key);
        }
    }

    /// The name is gone: nothing more is uploaded. The open handles keep the content (which
    /// [`Fs::keep_for_handles`] made local) in the journal, whose entry is no longer one a restart recovers; it
    /// goes with the last handle.
    pub fn unlink(&mut self) {
        self.unlinked = true;
        self.wb = None;
        if let Some(j) = &self.journal {
            j.orphan();
        }
    }

    /// Plaintext bytes held by the file's cache.
    pub fn cached_bytes(&self) -> u64 {
        self.cache.bytes
    }

    /// Drops the oldest cached blocks while the file's cache or the mount's is over `limit`.
    pub fn trim_cache(&mut self, limit: u64) {
        while self.cached_bytes() > limit || self.cache.mount.load(Ordering::Relaxed) > limit {
            if self.cache.pop_first().is_none() {
                break;
            }
        }
    }

    /// Records a change; `content`: of data or size (not only attributes).
    pub fn touch(&mut self, content: bool) {
        self.generation += 1;
        if content {
            self.content_gen = self.generation;
            let now = SystemTime::now();
            self.attr.mtime = now;
            self.attr.ctime = now;
        }
    }

    /// The object metadata an upload of this state sends: POSIX attributes, the s3crypt header, the extended
    /// attributes in their stored form `xattr`, and the upload's `token`.
    pub fn object_metadata(&self, xattr: Option<&str>, token: &str) -> crate::store::Metadata {
        let mut meta = crate::store::Metadata::new();
        super::inode::attr_to_metadata(&self.attr, &mut meta);
        if let Some(h) = &self.header {
            h.to_metadata(&mut meta);
        }
        if let Some(x) = xattr {
            meta.insert(super::xattr::meta_key(&self.codec).into(), x.to_string());
        }
        meta.insert(super::journal::META_UPLOAD_TOKEN.into(), token.to_string());
        meta
    }

    /// The journal manifest describing this state.
    pub fn manifest(&self) -> Manifest {
        let mut header = crate::store::Metadata::new();
        if let Some(h) = &self.header {
            h.to_metadata(&mut header);
        }
        Manifest {
            key: self.key.clone(),
            base: self.base.as_ref().map(|b| super::journal::BaseRef {
                etag: b.etag.clone(),
                object_size: b.object_size,
                plain_size: b.plain_size,
            }),
            base_valid: self.base_valid,
            size: self.size,
            perm: self.attr.perm,
            uid: self.attr.uid,
            gid: self.attr.gid,
            mtime: self.attr.mtime,
            atime: self.attr.atime,
            ctime: self.attr.ctime,
            header,
            upload_token: self.upload_token.clone(),
            earlier_tokens: self.earlier_tokens.clone(),
            multipart: self.multipart.clone(),
            xattr: self.xattr.clone(),
            modified: self.modified(),
            ..Manifest::default()
        }
    }

    /// Saves the manifest, if there is a journal.
    pub fn save_manifest(&self) -> FsResult<()> {
        if let Some(j) = &self.journal {
            let mut m = self.manifest();
            j.save_manifest(&mut m)
                .map_err(|e| FsError::from(e).in_journal(&self.key, || j.at()))?;
        }
        Ok(())
    }
}

impl Fs {
    /// Opens an existing file. `truncate`: O_TRUNC.
    pub async fn open(&self, ino: u64, writable: bool, truncate: bool) -> FsResult<u64> {
        if writable {
            self.check_writable()?;
        }
        let attr = self.getattr(ino).await?;
        match attr.kind {
            Kind::Dir => return Err(FsError::IsDir),
            Kind::Symlink => return Err(FsError::NotSupported("open of a symlink")),
            // The kernel opens FIFOs, sockets and devices itself; a request that reaches here is not one the
            // daemon can serve.
            Kind::Fifo | Kind::Socket | Kind::CharDev(_) | Kind::BlockDev(_) => {
                return Err(FsError::NotSupported("open of a special file"))
            }
            Kind::File => {}
        }
        let file = self.acquire(ino).await?;
        let fh = self.new_handle(ino, file.clone(), writable);
        if truncate && writable {
            let mut st = file.state.lock().await;
            self.truncate_locked(&mut st, 0).await?;
        }
        Ok(fh)
    }

    /// Creates a new file; it exists here (and in the journal) until its first upload (at flush or close).
    pub async fn create(&self, parent: u64, name: &str, perm: u16, uid: u32, gid: u32) -> FsResult<(Attr, u64)> {
        self.check_writable()?;
        self.check_new_name(parent, name)?;
        let parent_path = self.dir_path(parent)?;
        let key = self.key_of(&super::inode::join(&parent_path, name));
        self.check_key(&key)?;
        // The data key first: a KMS call must not happen under any lock.
        let (codec, header) = self.new_codec().await?;
        let (perm, gid) = self.new_owner(parent, Kind::File, perm, gid);
        let attr = Attr::made_now(Kind::File, 0, perm, uid, gid);
        let ino = {
            let mut t = lock(&self.inodes);
            let ino = t
                .upsert(parent, name, attr.clone(), None, true)
                .ok_or(FsError::NotFound)?;
            t.touch_dir(parent);
            if let Some(n) = t.get_mut(ino) {
                n.pending = true;
            }
            ino
        };
        let attr = Attr { ino, ..attr };
        let mut state = FileState {
            key,
            base: None,
            base_valid: 0,
            size: 0,
            bs: codec.block_size(),
            codec,
            header,
            dirty: BTreeSet::new(),
            cache: self.write_cache(),
            journal: None,
            generation: 1,
            content_gen: 1,
            saved_gen: 0,
            min_cut: u64::MAX,
            attr: attr.clone(),
            upload_token: None,
            earlier_tokens: Vec::new(),
            xattr: None,
            multipart: None,
            wb: None,
            behind_off: false,
            unlinked: false,
            poisoned: false,
            settling: 0,
        };
        self.ensure_journal(&mut state)?;
        let file = OpenFile::new(ino, state);
        let replaced = lock(&self.open_files).insert(
            ino,
            OpenEntry {
                file: file.clone(),
                count: 1,
            },
        );
        if let Some(old) = replaced {
            // An earlier file of this name that was unlinked while its upload was pending.
            old.file.state.lock().await.unlink();
        }
        Ok((attr, self.new_handle(ino, file, true)))
    }

    fn new_handle(&self, ino: u64, file: Arc<OpenFile>, writable: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = lock(&self.inodes).get_mut(ino) {
            n.open_count += 1;
        }
        let h = Handle {
            ino,
            file,
            writable,
            last_read_end: AtomicU64::new(u64::MAX),
            streak: AtomicU32::new(0),
        };
        lock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    /// Takes one reference to the shared state of an inode, made from a fresh HEAD if nobody holds it.
    pub(super) async fn acquire(&self, ino: u64) -> FsResult<Arc<OpenFile>> {
        if let Some(e) = lock(&self.open_files).get_mut(&ino) {
            e.count += 1;
            return Ok(e.file.clone());
        }
        let key = self.key_of(&self.path_of(ino)?);
        let info = self.store.head(&key).await?;
        let version = self.version_of(&info).await?;
        let attr = self.cached_attr(ino)?;
        let mut state = FileState::opened(key, version, attr, self.write_cache());
        state.xattr = info.metadata.get(super::xattr::meta_key(&state.codec)).cloned();
        let file = OpenFile::new(ino, state);
        let mut open = lock(&self.open_files);
        let e = open.entry(ino).or_insert(OpenEntry { file, count: 0 });
        e.count += 1;
        Ok(e.file.clone())
    }

    /// True while a handle (or an operation) holds the open state of `ino`.
    pub(super) fn has_handles(&self, ino: u64) -> bool {
        lock(&self.open_files).get(&ino).is_some_and(|e| e.count > 0)
    }

    /// The shared state of an open (or unsaved) inode, if any.
    pub(super) fn open_state(&self, ino: u64) -> Option<Arc<OpenFile>> {
        lock(&self.open_files).get(&ino).map(|e| e.file.clone())
    }

    /// Gives back one reference; true if it was the last.
    fn drop_ref(&self, ino: u64, file: &Arc<OpenFile>) -> bool {
        match lock(&self.open_files).get_mut(&ino) {
            Some(e) if Arc::ptr_eq(&e.file, file) => {
                e.count = e.count.saturating_sub(1);
                e.count == 0
            }
            _ => false,
        }
    }

    /// Forgets the state once nobody holds it and nothing in it is unsaved.
    pub(super) async fn remove_if_unused(&self, ino: u64, file: &Arc<OpenFile>) {
        let unsaved = file.state.lock().await.unsaved();
        if unsaved {
            return;
        }
        let removed = {
            let mut open = lock(&self.open_files);
            let ours = open
                .get(&ino)
                .is_some_and(|e| e.count == 0 && Arc::ptr_eq(&e.file, file));
            ours && open.remove(&ino).is_some()
        };
        if !removed {
            return;
        }
        // An unlinked file's journal held its content for the handles; the last one is gone.
        let gone = {
            let mut st = file.state.lock().await;
            if st.unlinked {
                st.journal.take()
            } else {
                None
            }
        };
        if let Some(j) = gone {
            j.remove();
        }
        let mut t = lock(&self.inodes);
        if let Some(n) = t.get_mut(ino) {
            n.pending = false;
        }
        t.forget(ino, 0);
    }

    /// Gives back one reference; the last one saves what is left (changes made through another handle after
    /// that handle's own flush included).
    pub(super) async fn let_go(&self, ino: u64, file: &Arc<OpenFile>, wait: bool) -> FsResult<()> {
        let result = match (self.drop_ref(ino, file), wait) {
            (true, true) => self.save(file).await,
            (true, false) => {
                let gen = file.state.lock().await.generation;
                file.wanted.fetch_max(gen, Ordering::SeqCst);
                self.kick(file);
                Ok(())
            }
            (false, _) => Ok(()),
        };
        if file.state.lock().await.unsaved() {
            // Keep the inode (and so the new content) visible while the upload is retried.
            if let Some(n) = lock(&self.inodes).get_mut(ino) {
                n.pending = true;
            }
        }
        self.remove_if_unused(ino, file).await;
        result
    }

    pub(super) fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        lock(&self.handles).get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    /// The handle a write names: EBADF unless it is open for writing.
    pub(super) fn write_handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(FsError::BadHandle);
        }
        Ok(h)
    }

    /// Attributes of an open inode from its local state, which is fresher than S3's.
    pub(super) async fn open_attr(&self, ino: u64) -> Option<Attr> {
        let file = self.open_state(ino)?;
        let st = file.state.lock().await;
        Some(Attr {
            ino,
            size: st.size,
            unlinked: st.unlinked,
            ..st.attr.clone()
        })
    }

    /// Starts the file's journal entry if it has none.
    pub(super) fn ensure_journal(&self, st: &mut FileState) -> FsResult<()> {
        if st.journal.is_some() {
            return Ok(());
        }
        let seal = match st.codec.as_ref() {
            Codec::Sealed { bs, cipher } if *bs == st.bs => SealWith::File(cipher.clone()),
            _ => SealWith::JournalKey,
        };
        let mut m = st.manifest();
        let j = self.journal.create(seal, st.bs, &mut m).map_err(|e| {
            FsError::from(e).in_journal(&st.key, || format!("a new entry in {}", self.journal.dir().display()))
        })?;
        st.journal = Some(Arc::new(j));
        Ok(())
    }

    /// The largest plaintext size a file of this codec can have: its object must fit S3's 5 TiB.
    pub(super) fn max_size(codec: &Codec) -> u64 {
        const S3_MAX_OBJECT: u64 = 5 << 40;
        (S3_MAX_OBJECT / codec.stored_block_len()) * codec.block_len()
    }

    /// The end of a write of `len` bytes at `offset`, if the file can take it: not poisoned, and no larger than
    /// [`max_size`](Self::max_size).
    pub(super) fn write_end(st: &FileState, offset: u64, len: usize) -> FsResult<u64> {
        let end = offset.checked_add(len as u64).ok_or(FsError::FileTooBig)?;
        if st.poisoned {
            return Err(FsError::Poisoned);
        }
        if end > Self::max_size(&st.codec) {
            return Err(FsError::FileTooBig);
        }
        Ok(end)
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_data(fh, offset, data.into()).await
    }

    /// [`write`](Self::write) of bytes the caller already owns (the FUSE adapter cuts them at block boundaries
    /// with [`WriteData::cut`], so whole blocks are kept without another copy).
    pub async fn write_data(&self, fh: u64, offset: u64, data: WriteData) -> FsResult<u32> {
        let h = self.write_handle(fh)?;
        if data.is_empty() {
            return Ok(0);
        }
        let n = data.len() as u32;
        self.write_at(&h.file, offset, data).await?;
        Ok(n)
    }

    /// Sets the size (truncate down or extend with zeros). Costs memory of at most one block, whatever the size.
    pub(super) async fn truncate_locked(&self, st: &mut FileState, size: u64) -> FsResult<()> {
        if st.poisoned {
            return Err(FsError::Poisoned);
        }
        if size > Self::max_size(&st.codec) {
            return Err(FsError::FileTooBig);
        }
        self.ensure_journal(st)?;
        let b = st.bs.get();
        let keep_blocks = size.div_ceil(b);
        // The new final block must lie beyond what the write-behind sent (sent blocks are sealed as not final).
        st.changing(keep_blocks.saturating_sub(1), u64::MAX);
        let journal = st.journal.clone().ok_or(FsError::BadHandle)?;
        let last = size / b;
        let tail = (size % b) as usize;
        let last_block = match (tail, st.is_dirty(last)) {
            (0, _) | (_, false) => None,
            _ => Some(st.cache.get(&last).cloned()),
        };
        // In this order, so that a kill at any point leaves the file as it was or as truncated, never with blocks
        // past the new size taken from the object again: the new size goes into the manifest first (a recovery
        // then ignores the slots past it, cut or not); the new last block is zeroed past the new size (bytes
        // the truncate discards); the slots past it are cut. The state changes only once all of it is done; a
        // local disk error before that leaves the size as it was, with at most some of the discarded bytes
        // zeroed, and the manifest saved back from the state.
        let mut m = st.manifest();
        m.size = size;
        m.base_valid = m.base_valid.min(size);
        m.modified = true;
        let entry = journal.clone();
        let done = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Vec<u8>>> {
            journal.save_manifest(&mut m)?;
            let block = match last_block {
                Some(Some(cached)) => Some(cached),
                Some(None) => journal.read_block(last)?,
                None => None,
            };
            let zeroed = match block {
                Some(mut block) => {
                    block[tail..].fill(0);
                    journal.write_block(last, &block)?;
                    Some(block)
                }
                None => None,
            };
            journal.cut(keep_blocks)?;
            Ok(zeroed)
        })
        .await
        .map_err(|e| FsError::Local(std::io::Error::other(e)))?;
        let zeroed = match done {
            Ok(zeroed) => zeroed,
            Err(e) => {
                // The journal's last block may have been zeroed past the new size: it is read from there again.
                st.cache.remove(&last);
                if let Err(again) = st.save_manifest() {
                    log::warn!("{}: manifest not saved back after a failed truncate: {again}", st.key);
                }
                return Err(FsError::from(e).in_journal(&st.key, || entry.at()));
            }
        };
        st.dirty.retain(|i| *i < keep_blocks);
        st.cache.retain(|i| *i < keep_blocks);
        if let Some(block) = zeroed {
            st.cache.insert(last, block);
        }
        st.base_valid = st.base_valid.min(size);
        st.min_cut = st.min_cut.min(size);
        st.size = size;
        st.touch(true);
        // The truncate is done (its size and cut are in the journal already): a failure to record the rest of the
        // state (the times) is not the call's; the next save records it.
        if let Err(e) = st.save_manifest() {
            log::warn!("{}: after a truncate: {e}", st.key);
        }
        Ok(())
    }

    /// setattr: size and/or attributes, with or without an open handle. Without one (truncate(2), chmod(2) on a
    /// path), the change is saved at once; with one, at that handle's flush or close.
    pub async fn setattr(&self, ino: u64, size: Option<u64>, change: AttrChange) -> FsResult<Attr> {
        self.check_writable()?;
        if size.is_none() && self.open_state(ino).is_none() {
            return self.set_metadata(ino, &change).await;
        }
        let file = self.acquire(ino).await?;
        let applied = self.apply_setattr(&file, ino, size, &change).await;
        let saved = self.let_go(ino, &file, true).await;
        let attr = applied?;
        saved?;
        Ok(attr)
    }

    async fn apply_setattr(
        &self,
        file: &Arc<OpenFile>,
        ino: u64,
        size: Option<u64>,
        change: &AttrChange,
    ) -> FsResult<Attr> {
        let mut st = file.state.lock().await;
        if let Some(size) = size {
            // Set-ID bits the truncate drops go into the manifest it saves first: a recovered file never has the
            // new size with them (after a failed truncate they stay dropped, the safe way to err).
            if change.kill_set_id {
                st.attr.perm = super::dir::without_set_id(st.attr.perm);
            }
            self.truncate_locked(&mut st, size).await?;
        }
        if change.changes(&st.attr) {
            change.apply(&mut st.attr);
            st.touch(false);
            self.ensure_journal(&mut st)?;
            st.save_manifest()?;
        }
        Ok(Attr {
            ino,
            size: st.size,
            ..st.attr.clone()
        })
    }

    /// flush (every close of a descriptor) and fsync: saves unsaved data; success means it is in S3. A read-only
    /// handle only starts the upload of what others changed (an fchmod through it, say) and does not wait: a
    /// reader's close must not fail because a writer's upload is slow.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        self.save_for(&h).await
    }

    async fn save_for(&self, h: &Handle) -> FsResult<()> {
        if h.writable {
            return self.save(&h.file).await;
        }
        let gen = h.file.state.lock().await.generation;
        h.file.wanted.fetch_max(gen, Ordering::SeqCst);
        self.kick(&h.file);
        Ok(())
    }

    /// The last close of a handle: saves what is left, then forgets the state once no handle remains and S3 has
    /// everything.
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let Some(h) = lock(&self.handles).remove(&fh) else {
            return Err(FsError::BadHandle);
        };
        self.reader.gone(fh);
        let flushed = self.save_for(&h).await;
        // After a failed save the upload goes on in the background; waiting a second time helps nobody.
        let last = self.let_go(h.ino, &h.file, h.writable && flushed.is_ok()).await;
        let closed = {
            let mut t = lock(&self.inodes);
            let open = t.get_mut(h.ino).map(|n| {
                n.open_count = n.open_count.saturating_sub(1);
                n.open_count
            });
            t.forget(h.ino, 0);
            open.unwrap_or(0) == 0
        };
        if closed {
            // Read-ahead nobody will read: give its memory back now rather than when the budget needs it.
            if let Some(base) = h.file.state.lock().await.base.as_ref() {
                self.reader.forget(base.id);
            }
        }
        flushed.and(last)
    }
}
