//! Open files and their unsaved changes.
//!
//! A [`FileState`] is shared by every handle on one inode. It knows the version the file was opened from (`base`,
//! `None` for a file S3 does not have yet), the current size, and the dirty blocks: whole plaintext blocks in
//! memory up to `max_dirty_bytes`, beyond that sealed into the staging file. Block `i`'s current content is its
//! dirty copy if there is one, else the base's block `i` cut at `base_valid` (everything past a truncation is
//! zeros), else zeros. Uploading (upload.rs) turns this into a new version.
use super::codec::{Codec, Version};
use super::dir::AttrChange;
use super::inode::{Attr, Kind};
use super::staging::Staging;
use super::{lock, Fs, FsError, FsResult, Handle};
use crate::format::{BlockSize, ObjectHeader};
use crate::store::ObjectInfo;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

pub struct OpenFile {
    pub state: tokio::sync::Mutex<FileState>,
}

/// An open inode's shared state and the number of handles (and in-flight setattrs) holding it. The entry stays
/// in the map at count 0 until its final upload is done, so that a reopen racing the last release finds the same
/// state instead of making a second one.
pub struct OpenEntry {
    pub file: Arc<OpenFile>,
    pub count: u64,
}

pub struct FileState {
    /// The version the file was opened from, or last uploaded; `None` for a new file.
    pub base: Option<Version>,
    /// Bytes of `base` still part of the file: its size, cut by every truncation since.
    pub base_valid: u64,
    /// Current plaintext size.
    pub size: u64,
    pub bs: BlockSize,
    /// Codec and header of the next upload: the base's (same file id and data key), or made at the first upload
    /// of a new file.
    pub codec: Option<(Arc<Codec>, Option<ObjectHeader>)>,
    pub dirty: BTreeMap<u64, Vec<u8>>,
    pub spilled: BTreeSet<u64>,
    pub staging: Option<Staging>,
    /// Content or size changed since the last upload.
    pub modified: bool,
    /// Attributes changed since the last upload.
    pub meta_dirty: bool,
    pub attr: Attr,
    /// Unlinked while open: nothing more is uploaded.
    pub unlinked: bool,
    /// An upload failed for good (a conflict): writes and flushes fail until the file is reopened.
    pub poisoned: bool,
}

impl FileState {
    fn block_len(&self) -> usize {
        self.bs.get() as usize
    }

    pub fn is_dirty(&self, i: u64) -> bool {
        self.dirty.contains_key(&i) || self.spilled.contains(&i)
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.len() as u64 * self.bs.get()
    }

    /// After a rename: the object now lives under another key with this ETag.
    pub fn moved_to(&mut self, info: &ObjectInfo) {
        if let Some(b) = &mut self.base {
            b.etag = info.etag.clone();
        }
    }

    /// Marks everything uploaded as `version`.
    pub fn uploaded(&mut self, version: Version, header: Option<ObjectHeader>) {
        self.codec = Some((version.codec.clone(), header));
        self.base_valid = version.plain_size;
        self.size = version.plain_size;
        self.base = Some(version);
        self.dirty.clear();
        self.spilled.clear();
        self.staging = None;
        self.modified = false;
        self.meta_dirty = false;
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
            Kind::File => {}
        }
        let file = self.acquire(ino).await?;
        let fh = self.new_handle(ino, file.clone(), writable).await;
        if truncate && writable {
            let mut st = file.state.lock().await;
            self.truncate_locked(&mut st, 0)?;
        }
        Ok(fh)
    }

    /// Creates a new file; it exists locally until its first upload (at flush or close).
    pub async fn create(&self, parent: u64, name: &str, perm: u16, uid: u32, gid: u32) -> FsResult<(Attr, u64)> {
        self.check_writable()?;
        super::inode::check_name(name)?;
        self.dir_path(parent)?;
        let attr = Attr {
            ino: 0,
            kind: Kind::File,
            size: 0,
            perm,
            uid,
            gid,
            mtime: SystemTime::now(),
        };
        let ino = {
            let mut t = lock(&self.inodes);
            let ino = t
                .upsert(parent, name, attr.clone(), None, true)
                .ok_or(FsError::NotFound)?;
            if let Some(n) = t.get_mut(ino) {
                n.pending = true;
            }
            ino
        };
        let attr = Attr { ino, ..attr };
        let state = FileState {
            base: None,
            base_valid: 0,
            size: 0,
            bs: self.cfg.block_size,
            codec: None,
            dirty: BTreeMap::new(),
            spilled: BTreeSet::new(),
            staging: None,
            modified: true,
            meta_dirty: true,
            attr: attr.clone(),
            unlinked: false,
            poisoned: false,
        };
        let file = Arc::new(OpenFile {
            state: tokio::sync::Mutex::new(state),
        });
        lock(&self.open_files).insert(
            ino,
            OpenEntry {
                file: file.clone(),
                count: 1,
            },
        );
        Ok((attr, self.new_handle(ino, file, true).await))
    }

    async fn new_handle(&self, ino: u64, file: Arc<OpenFile>, writable: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = lock(&self.inodes).get_mut(ino) {
            n.open_count += 1;
        }
        let h = Handle {
            ino,
            file,
            writable,
            last_read_end: AtomicU64::new(u64::MAX),
        };
        lock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    /// The shared state of an open inode, made from a fresh HEAD if no handle has it open.
    /// Takes one reference to the shared state of an inode, made from a fresh HEAD if nobody holds it.
    async fn acquire(&self, ino: u64) -> FsResult<Arc<OpenFile>> {
        if let Some(e) = lock(&self.open_files).get_mut(&ino) {
            e.count += 1;
            return Ok(e.file.clone());
        }
        let key = self.key_of(&self.path_of(ino)?);
        let info = self.store.head(&key).await?;
        let version = self.version_of(&info).await?;
        let attr = self.cached_attr(ino)?;
        let state = FileState {
            base_valid: version.plain_size,
            size: version.plain_size,
            bs: version.codec.block_size(),
            codec: Some((version.codec.clone(), version.header.clone())),
            base: Some(version),
            dirty: BTreeMap::new(),
            spilled: BTreeSet::new(),
            staging: None,
            modified: false,
            meta_dirty: false,
            attr: Attr { size: 0, ..attr },
            unlinked: false,
            poisoned: false,
        };
        let file = Arc::new(OpenFile {
            state: tokio::sync::Mutex::new(state),
        });
        let mut open = lock(&self.open_files);
        let e = open.entry(ino).or_insert(OpenEntry { file, count: 0 });
        e.count += 1;
        Ok(e.file.clone())
    }

    /// The shared state of an open inode, if any.
    pub(super) fn open_state(&self, ino: u64) -> Option<Arc<OpenFile>> {
        lock(&self.open_files).get(&ino).map(|e| e.file.clone())
    }

    /// Gives back one reference; true if it was the last (the entry stays until [`Self::remove_if_unused`]).
    fn drop_ref(&self, ino: u64, file: &Arc<OpenFile>) -> bool {
        match lock(&self.open_files).get_mut(&ino) {
            Some(e) if Arc::ptr_eq(&e.file, file) => {
                e.count = e.count.saturating_sub(1);
                e.count == 0
            }
            _ => false,
        }
    }

    /// Forgets the state once nobody took it again.
    fn remove_if_unused(&self, ino: u64, file: &Arc<OpenFile>) {
        let mut open = lock(&self.open_files);
        if open
            .get(&ino)
            .is_some_and(|e| e.count == 0 && Arc::ptr_eq(&e.file, file))
        {
            open.remove(&ino);
        }
    }

    /// Gives back one reference; the last one uploads what is left (changes made through another handle after
    /// that handle's own last upload included), then forgets the state.
    async fn let_go(&self, ino: u64, file: &Arc<OpenFile>) -> FsResult<()> {
        let result = if self.drop_ref(ino, file) {
            self.upload_file(ino, file).await
        } else {
            Ok(())
        };
        self.remove_if_unused(ino, file);
        result
    }

    pub(super) fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        lock(&self.handles).get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    /// Attributes of an open inode from its local state, which is fresher than S3's.
    pub(super) async fn open_attr(&self, ino: u64) -> Option<Attr> {
        let file = self.open_state(ino)?;
        let st = file.state.lock().await;
        Some(Attr {
            ino,
            size: st.size,
            ..st.attr.clone()
        })
    }

    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(FsError::BadHandle);
        }
        let mut st = h.file.state.lock().await;
        if st.poisoned {
            return Err(FsError::Poisoned);
        }
        let b = st.bs.get();
        let mut pos = 0usize;
        while pos < data.len() {
            let off = offset + pos as u64;
            let index = off / b;
            let in_block = (off % b) as usize;
            let n = (b as usize - in_block).min(data.len() - pos);
            if n == b as usize {
                // A whole block: no need to read what was there.
                st.spilled.remove(&index);
                st.dirty.insert(index, data[pos..pos + n].to_vec());
            } else {
                let block = self.dirty_block_mut(&mut st, index).await?;
                block[in_block..in_block + n].copy_from_slice(&data[pos..pos + n]);
            }
            pos += n;
        }
        st.size = st.size.max(offset + data.len() as u64);
        st.modified = true;
        st.attr.mtime = SystemTime::now();
        self.spill_if_needed(&mut st).await?;
        Ok(data.len() as u32)
    }

    /// The dirty copy of block `index`, made from its current content first.
    async fn dirty_block_mut<'a>(&self, st: &'a mut FileState, index: u64) -> FsResult<&'a mut Vec<u8>> {
        if !st.dirty.contains_key(&index) {
            let block = self.current_block(st, index).await?;
            st.spilled.remove(&index);
            st.dirty.insert(index, block);
        }
        st.dirty.get_mut(&index).ok_or(FsError::BadHandle)
    }

    /// Block `index` as the file now has it: whole block length, zero-padded.
    pub(super) async fn current_block(&self, st: &FileState, index: u64) -> FsResult<Vec<u8>> {
        let b = st.bs.get();
        if let Some(d) = st.dirty.get(&index) {
            return Ok(d.clone());
        }
        if st.spilled.contains(&index) {
            if let Some(s) = &st.staging {
                return Ok(s.read_block(index, st.block_len())?);
            }
        }
        let mut block = vec![0u8; st.block_len()];
        let start = index * b;
        if let Some(base) = st.base.as_ref().filter(|_| start < st.base_valid) {
            let key = self.key_of(&self.path_of_state(st)?);
            let got = self.base_blocks(&key, base, index..index + 1).await?;
            let valid = (st.base_valid - start).min(b) as usize;
            let src = &got[0];
            let n = valid.min(src.len());
            block[..n].copy_from_slice(&src[..n]);
        }
        Ok(block)
    }

    /// Moves all but the newest dirty blocks to the staging file when memory holds more than the bound.
    async fn spill_if_needed(&self, st: &mut FileState) -> FsResult<()> {
        if st.dirty_bytes() <= self.cfg.max_dirty_bytes {
            return Ok(());
        }
        if st.staging.is_none() {
            st.staging = Some(self.new_staging(st).await?);
        }
        let keep = st.dirty.keys().next_back().copied();
        let indexes: Vec<u64> = st.dirty.keys().copied().filter(|i| Some(*i) != keep).collect();
        for i in indexes {
            if let Some(block) = st.dirty.remove(&i) {
                if let Some(s) = &st.staging {
                    s.write_block(i, &block)?;
                }
                st.spilled.insert(i);
            }
        }
        Ok(())
    }

    /// A staging file in the object's format when the file's codec seals (made now for a new file), else one
    /// under a key of its own.
    async fn new_staging(&self, st: &mut FileState) -> FsResult<Staging> {
        if st.codec.is_none() && self.keys.is_some() {
            st.codec = Some(self.new_codec().await?);
        }
        match st.codec.as_ref().map(|c| c.0.as_ref()) {
            Some(Codec::Sealed { bs, cipher }) if *bs == st.bs => {
                Ok(Staging::for_file(&self.cfg.staging_dir, st.bs, cipher)?)
            }
            _ => Ok(Staging::new(&self.cfg.staging_dir, st.bs)?),
        }
    }

    /// Sets the size (truncate down or extend with zeros).
    pub(super) fn truncate_locked(&self, st: &mut FileState, size: u64) -> FsResult<()> {
        if st.poisoned {
            return Err(FsError::Poisoned);
        }
        let b = st.bs.get();
        let keep_blocks = size.div_ceil(b);
        st.dirty.retain(|i, _| *i < keep_blocks);
        st.spilled.retain(|i| *i < keep_blocks);
        if !size.is_multiple_of(b) {
            let last = size / b;
            if let Some(block) = st.dirty.get_mut(&last) {
                block[(size % b) as usize..].fill(0);
            }
            // A spilled partial block is zeroed on the way back in.
            if st.spilled.contains(&last) {
                if let Some(s) = &st.staging {
                    let mut block = s.read_block(last, st.block_len())?;
                    block[(size % b) as usize..].fill(0);
                    st.spilled.remove(&last);
                    st.dirty.insert(last, block);
                }
            }
        }
        st.base_valid = st.base_valid.min(size);
        st.size = size;
        st.modified = true;
        st.attr.mtime = SystemTime::now();
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
        let applied = {
            let mut st = file.state.lock().await;
            let r = match size {
                Some(size) => self.truncate_locked(&mut st, size),
                None => Ok(()),
            };
            if r.is_ok() && !change.is_empty() {
                change.apply(&mut st.attr);
                st.meta_dirty = true;
            }
            r.map(|()| Attr {
                ino,
                size: st.size,
                ..st.attr.clone()
            })
        };
        let saved = self.let_go(ino, &file).await;
        let attr = applied?;
        saved?;
        Ok(attr)
    }

    /// flush (every close of a descriptor) and fsync: uploads unsaved data; success means it is in S3.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        // Also for read-only handles: an attribute change (fchmod, futimens) may be waiting.
        self.upload_file(h.ino, &h.file).await
    }

    /// The last close of a handle: uploads what is left, then forgets the state once no handle remains.
    pub async fn release(&self, fh: u64) -> FsResult<()> {
        let Some(h) = lock(&self.handles).remove(&fh) else {
            return Err(FsError::BadHandle);
        };
        let flushed = self.upload_file(h.ino, &h.file).await;
        let last = self.let_go(h.ino, &h.file).await;
        let mut t = lock(&self.inodes);
        if let Some(n) = t.get_mut(h.ino) {
            n.open_count = n.open_count.saturating_sub(1);
        }
        t.forget(h.ino, 0);
        flushed.and(last)
    }

    /// The inode path that belongs to an open file's state (looked up by identity in the open-file map).
    pub(super) fn path_of_state(&self, st: &FileState) -> FsResult<String> {
        self.path_of(st.attr.ino)
    }
}
