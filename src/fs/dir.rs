//! Names: lookup, getattr, readdir, mkdir, rmdir, unlink, rename, symlink, mknod, readlink and attribute changes.
//!
//! A lookup costs one HEAD for a file and a LIST only when the HEAD finds nothing (a directory is a prefix, with
//! or without a marker object); asking again about a directory seen with a marker (its metadata TTL ran out)
//! costs one HEAD of the marker. A name that is found to be missing is remembered for the metadata TTL, so the
//! probes of shells and compilers cost one request per name per TTL. Keys longer than S3 accepts are refused with
//! ENAMETOOLONG before any request.
use super::dirindex::Listed;
use super::inode::{attr_from_metadata, attr_to_metadata, check_name, join, Attr, Kind, Remote, ROOT_INO};
use super::{lock, Fs, FsError, FsResult};
use crate::store::{Metadata, ObjectInfo, PutCondition, StoreError};
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use std::time::SystemTime;

/// How many copies or deletes a directory rename keeps in flight.
const RENAME_PARALLELISM: usize = 16;
/// The set-group-ID bit of a mode.
const SET_GID: u16 = 0o2000;

/// One directory entry.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub name: String,
    pub kind: Kind,
}

/// The inode was last seen as a directory with a marker object.
fn dir_with_marker(n: &super::inode::Inode) -> bool {
    n.attr.kind == Kind::Dir && n.remote.is_some()
}

/// What S3 knows about a name.
enum Found {
    Object(ObjectInfo),
    Dir(Option<ObjectInfo>),
}

impl Fs {
    /// Looks up `name` in directory `parent` and counts one kernel reference to the result.
    pub async fn lookup(&self, parent: u64, name: &str) -> FsResult<Attr> {
        check_name(name)?;
        let parent_path = self.dir_path(parent)?;
        let (known, marker_seen) = {
            let t = lock(&self.inodes);
            let child = t.child(parent, name);
            let known = child
                .filter(|c| c.pending || c.open_count > 0 || t.is_fresh(c.ino, self.cfg.metadata_ttl))
                .map(|c| c.ino);
            (known, child.is_some_and(dir_with_marker))
        };
        if let Some(ino) = known {
            let attr = match self.open_attr(ino).await {
                Some(a) => a,
                None => self.cached_attr(ino)?,
            };
            if let Some(n) = lock(&self.inodes).get_mut(ino) {
                n.lookups += 1;
            }
            return Ok(attr);
        }
        if parent == ROOT_INO && Self::is_reserved(name) {
            return Err(FsError::NotFound);
        }
        if lock(&self.inodes).known_missing(parent, name, self.cfg.metadata_ttl) {
            return Err(FsError::NotFound);
        }
        let path = join(&parent_path, name);
        self.check_key(&self.key_of(&path))?;
        // The first lookup after a listing starts the prefetch, and can be answered by its index.
        self.start_prefetch(parent, name);
        if let Some(info) = self.prefetched(parent, name).await {
            return self.record(parent, name, Found::Object(info), true);
        }
        if lock(&self.inodes).known_missing(parent, name, self.cfg.metadata_ttl) {
            return Err(FsError::NotFound);
        }
        match self.refind(&path, marker_seen).await {
            Ok(found) => {
                if let Found::Object(info) = &found {
                    self.index_note_head(info);
                }
                self.record(parent, name, found, true)
            }
            Err(FsError::NotFound) => {
                lock(&self.inodes).note_missing(parent, name);
                Err(FsError::NotFound)
            }
            Err(e) => Err(e),
        }
    }

    /// Attributes of an inode, from S3 when the cached ones are older than the metadata TTL.
    pub async fn getattr(&self, ino: u64) -> FsResult<Attr> {
        if let Some(attr) = self.open_attr(ino).await {
            return Ok(attr);
        }
        let (fresh, parent, name, path, marker_seen) = {
            let t = lock(&self.inodes);
            let n = t.get(ino).ok_or(FsError::NotFound)?;
            let fresh = ino == ROOT_INO || n.pending || t.is_fresh(ino, self.cfg.metadata_ttl);
            (fresh, n.parent, n.name.clone(), n.path.clone(), dir_with_marker(n))
        };
        if fresh {
            return self.cached_attr(ino);
        }
        let found = self.refind(&path, marker_seen).await?;
        self.record(parent, &name, found, false)?;
        self.cached_attr(ino)
    }

    /// Asks S3 again what `path` is. A directory last seen with a marker (`marker_seen`) is asked by its marker
    /// first: one HEAD, where [`Self::find`] spends a HEAD of the file name and a LIST before it (three
    /// requests each time the metadata TTL runs out on a directory in use, which every path walk through it
    /// makes happen: the kernel checks the search permission of each directory it passes, the working directory
    /// included). A name that is then both an object and a directory stays the directory, as a listing shows it.
    async fn refind(&self, path: &str, marker_seen: bool) -> FsResult<Found> {
        if marker_seen {
            if let Some(marker) = self.head_marker(&self.dir_prefix(path)).await? {
                return Ok(Found::Dir(Some(marker)));
            }
        }
        self.find(path).await
    }

    /// The directory marker `dir_prefix` (the directory's key and a slash), or `None` if S3 has none.
    async fn head_marker(&self, dir_prefix: &str) -> FsResult<Option<ObjectInfo>> {
        match self.store.head(dir_prefix).await {
            Ok(info) => Ok(Some(info)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Asks S3 what `path` is: an object (HEAD) or a directory (a marker or any key below it).
    async fn find(&self, path: &str) -> FsResult<Found> {
        let key = self.key_of(path);
        let dir_prefix = format!("{key}/");
        match self.store.head(&key).await {
            Ok(info) if !key.ends_with('/') => return Ok(Found::Object(info)),
            Ok(_) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let page = self.store.list(&dir_prefix, None, None, Some(2)).await?;
        if page.objects.is_empty() && page.common_prefixes.is_empty() {
            return Err(FsError::NotFound);
        }
        let marker = if page.objects.first().is_some_and(|o| o.key == dir_prefix) {
            self.head_marker(&dir_prefix).await?
        } else {
            None
        };
        Ok(Found::Dir(marker))
    }

    /// Puts what a HEAD said about a file into the inode table, counting one kernel lookup reference.
    pub(super) fn record_object(&self, parent: u64, name: &str, info: ObjectInfo) -> FsResult<Attr> {
        self.record(parent, name, Found::Object(info), true)
    }

    /// Puts what `find` said into the inode table.
    fn record(&self, parent: u64, name: &str, found: Found, bump: bool) -> FsResult<Attr> {
        let (attr, remote) = match found {
            Found::Object(info) => {
                let size = self.object_plain_size(&info);
                let attr = attr_from_metadata(0, Kind::File, size, info.last_modified, &info.metadata, &self.defaults);
                let remote = Remote {
                    etag: info.etag,
                    object_size: info.size,
                    metadata: info.metadata,
                };
                (attr, Some(remote))
            }
            Found::Dir(marker) => {
                let modified = marker.as_ref().and_then(|m| m.last_modified);
                let meta = marker.as_ref().map(|m| m.metadata.clone()).unwrap_or_default();
                let mut attr = attr_from_metadata(0, Kind::Dir, 0, modified, &meta, &self.defaults);
                attr.kind = Kind::Dir;
                // The marker's metadata, for its extended attributes.
                let remote = marker.map(|m| Remote {
                    etag: m.etag,
                    object_size: m.size,
                    metadata: m.metadata,
                });
                (attr, remote)
            }
        };
        let mut t = lock(&self.inodes);
        let ino = t.upsert(parent, name, attr, remote, bump).ok_or(FsError::NotFound)?;
        t.get(ino).map(|n| n.attr.clone()).ok_or(FsError::NotFound)
    }

    /// Plaintext size from a HEAD: the header's block size in the client-side modes.
    fn object_plain_size(&self, info: &ObjectInfo) -> u64 {
        if self.keys.is_none() {
            return info.size;
        }
        match crate::format::ObjectHeader::from_metadata(&info.metadata) {
            Ok(Some(h)) => crate::format::plaintext_size(info.size, h.block_size).unwrap_or(info.size),
            _ => info.size,
        }
    }

    /// The path of a directory inode; `NotDir` if it is not one.
    pub(super) fn dir_path(&self, ino: u64) -> FsResult<String> {
        let t = lock(&self.inodes);
        let n = t.get(ino).ok_or(FsError::NotFound)?;
        if n.attr.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(n.path.clone())
    }

    /// The permission bits and group of a new entry of `kind` in `parent`, as Linux sets them
    /// (`inode_init_owner`): in a set-group-ID directory the entry takes the directory's group, and a new
    /// directory keeps the set-group-ID bit so that the rule carries down the tree.
    pub(super) fn new_owner(&self, parent: u64, kind: Kind, perm: u16, gid: u32) -> (u16, u32) {
        let t = lock(&self.inodes);
        match t.get(parent) {
            Some(n) if n.attr.kind == Kind::Dir && n.attr.perm & SET_GID != 0 => {
                let perm = if kind == Kind::Dir { perm | SET_GID } else { perm };
                (perm, n.attr.gid)
            }
            _ => (perm, gid),
        }
    }

    /// Lists a directory: S3's listing with a delimiter, plus files created here and not uploaded yet. Sizes and
    /// kinds come from the listing, with no HEAD per entry.
    pub async fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        Ok(self.list_dir(ino).await?.0)
    }

    /// [`readdir`](Self::readdir) for directory stream `fh` (opendir): the stream is counted open, on the listing
    /// made here, until [`stream_closed`](Self::stream_closed).
    pub async fn opendir(&self, ino: u64, fh: u64) -> FsResult<Vec<DirEntry>> {
        let (entries, listed) = self.list_dir(ino).await?;
        self.stream_opened(fh, ino, listed);
        Ok(entries)
    }

    /// The entries of directory `ino` and when S3's listing of them ended.
    async fn list_dir(&self, ino: u64) -> FsResult<(Vec<DirEntry>, std::time::Instant)> {
        let path = self.dir_path(ino)?;
        let prefix = self.dir_prefix(&path);
        let mut names: Vec<(String, Kind)> = Vec::new();
        let mut files: Vec<Listed> = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = match self.store.list(&prefix, Some("/"), token.as_deref(), None).await {
                Ok(page) => page,
                Err(e) if is_outage(&e) => {
                    log::warn!("listing {prefix}: S3 unreachable ({e}); showing the names known here");
                    names = lock(&self.inodes).children_of(ino);
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            for f in self.page_files(&prefix, &page) {
                names.push((f.name.clone(), Kind::File));
                files.push(f);
            }
            for p in &page.common_prefixes {
                let Some(name) = p.strip_prefix(&prefix).map(|n| n.trim_end_matches('/')) else {
                    continue;
                };
                if check_name(name).is_ok() && !(ino == ROOT_INO && Self::is_reserved(name)) {
                    names.push((name.to_string(), Kind::Dir));
                }
            }
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        for (name, attr) in lock(&self.inodes).pending_children(ino) {
            names.push((name, attr.kind));
        }
        // A name that is both an object and a prefix shows as the directory.
        names.sort_by(|a, b| a.0.cmp(&b.0).then((a.1 != Kind::Dir).cmp(&(b.1 != Kind::Dir))));
        names.dedup_by(|a, b| a.0 == b.0);
        // The listing's files (not the names that are also a prefix, shown as directories) are the candidates of
        // a prefetch; files made here and not uploaded yet are answered from the inode table.
        let dirs: std::collections::HashSet<&str> = names
            .iter()
            .filter(|(_, k)| *k == Kind::Dir)
            .map(|(n, _)| n.as_str())
            .collect();
        files.retain(|f| !dirs.contains(f.name.as_str()));
        let listed = std::time::Instant::now();
        self.note_listing(ino, files, listed);
        let t = lock(&self.inodes);
        let entries = names
            .into_iter()
            .map(|(name, kind)| {
                let known = t
                    .child(ino, &name)
                    .filter(|c| c.attr.kind == kind || kind == Kind::File);
                DirEntry {
                    ino: known.map(|c| c.ino).unwrap_or(0),
                    kind: known.map(|c| c.attr.kind).unwrap_or(kind),
                    name,
                }
            })
            .collect();
        Ok((entries, listed))
    }

    pub async fn mkdir(&self, parent: u64, name: &str, perm: u16, uid: u32, gid: u32) -> FsResult<Attr> {
        self.check_writable()?;
        self.check_new_name(parent, name)?;
        let path = join(&self.dir_path(parent)?, name);
        let marker = self.dir_prefix(&path);
        self.check_key(&marker)?;
        match self.find(&path).await {
            Ok(_) => return Err(FsError::Exists),
            Err(FsError::NotFound) => {}
            Err(e) => return Err(e),
        }
        let (perm, gid) = self.new_owner(parent, Kind::Dir, perm, gid);
        let attr = Attr::made_now(Kind::Dir, 0, perm, uid, gid);
        let mut meta = Metadata::new();
        attr_to_metadata(&attr, &mut meta);
        let put = self
            .store
            .put(&marker, Bytes::new(), &meta, PutCondition::IfNoneMatch)
            .await
            .map_err(|e| match e {
                StoreError::PreconditionFailed(_) => FsError::Exists,
                e => e.into(),
            })?;
        // The marker as S3 now holds it: the next question about this directory asks the marker first.
        let remote = Remote {
            etag: put.etag,
            object_size: 0,
            metadata: meta,
        };
        let mut t = lock(&self.inodes);
        let ino = t
            .upsert(parent, name, attr, Some(remote), true)
            .ok_or(FsError::NotFound)?;
        t.touch_dir(parent);
        t.get(ino).map(|n| n.attr.clone()).ok_or(FsError::NotFound)
    }

    pub async fn rmdir(&self, parent: u64, name: &str) -> FsResult<()> {
        self.check_writable()?;
        check_name(name)?;
        if parent == ROOT_INO && Self::is_reserved(name) {
            return Err(FsError::NotFound);
        }
        let path = join(&self.dir_path(parent)?, name);
        match self.find(&path).await? {
            Found::Dir(_) => {}
            Found::Object(_) => return Err(FsError::NotDir),
        }
        let dir_prefix = self.dir_prefix(&path);
        let pending = lock(&self.inodes).child(parent, name).map(|c| c.ino);
        let has_pending = pending.is_some_and(|ino| !lock(&self.inodes).pending_children(ino).is_empty());
        if has_pending || !self.dir_is_empty(&dir_prefix).await? {
            return Err(FsError::NotEmpty);
        }
        self.store.delete(&dir_prefix).await?;
        self.forget_prefetched(parent, name);
        let mut t = lock(&self.inodes);
        if let Some(ino) = pending {
            t.detach(ino);
        }
        t.touch_dir(parent);
        Ok(())
    }

    pub async fn unlink(&self, parent: u64, name: &str) -> FsResult<()> {
        self.check_writable()?;
        check_name(name)?;
        let attr = self.lookup(parent, name).await?;
        lock(&self.inodes).forget(attr.ino, 1);
        if attr.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let path = self.path_of(attr.ino)?;
        let open = self.open_state(attr.ino);
        if let Some(file) = open {
            self.name_gone(attr.ino, &file).await?;
            self.remove_if_unused(attr.ino, &file).await;
        }
        self.store.delete(&self.key_of(&path)).await?;
        self.forget_prefetched(parent, name);
        let mut t = lock(&self.inodes);
        t.detach(attr.ino);
        t.touch_dir(parent);
        Ok(())
    }

    /// The name of open file `ino` goes (unlink, or a rename over it), before its object is deleted: its handles
    /// read and write on from the journal (unlink(2)); a state no handle holds any more (only its upload running)
    /// needs no copy. Nothing of it is uploaded again.
    async fn name_gone(&self, ino: u64, file: &std::sync::Arc<super::write::OpenFile>) -> FsResult<()> {
        if self.has_handles(ino) {
            self.keep_for_handles(file).await?;
        }
        file.state.lock().await.unlink();
        Ok(())
    }

    pub async fn symlink(&self, parent: u64, name: &str, target: &str, uid: u32, gid: u32) -> FsResult<Attr> {
        let (perm, gid) = self.new_owner(parent, Kind::Symlink, 0o777, gid);
        let attr = Attr::made_now(Kind::Symlink, target.len() as u64, perm, uid, gid);
        self.make_node(parent, name, attr, target.as_bytes()).await
    }

    /// Makes a FIFO, socket or device node: an empty object whose metadata carries the type (and `rdev`).
    pub async fn mknod(&self, parent: u64, name: &str, kind: Kind, perm: u16, uid: u32, gid: u32) -> FsResult<Attr> {
        if !kind.is_special() {
            return Err(FsError::NotSupported("mknod of this file type"));
        }
        let (perm, gid) = self.new_owner(parent, kind, perm, gid);
        self.make_node(parent, name, Attr::made_now(kind, 0, perm, uid, gid), b"")
            .await
    }

    /// Stores a symlink or a special file with `body` as its content, failing if the name exists.
    async fn make_node(&self, parent: u64, name: &str, attr: Attr, body: &[u8]) -> FsResult<Attr> {
        self.check_writable()?;
        self.check_new_name(parent, name)?;
        let path = join(&self.dir_path(parent)?, name);
        let key = self.key_of(&path);
        self.check_key(&key)?;
        let (codec, header) = self.new_codec().await?;
        let mut sealed = Vec::new();
        codec.encode_into(0, true, body, &mut sealed);
        let mut meta = Metadata::new();
        attr_to_metadata(&attr, &mut meta);
        if let Some(h) = &header {
            h.to_metadata(&mut meta);
        }
        let info = self
            .store
            .put(&key, Bytes::from(sealed), &meta, PutCondition::IfNoneMatch)
            .await
            .map_err(|e| match e {
                StoreError::PreconditionFailed(_) => FsError::Exists,
                e => e.into(),
            })?;
        self.index_note_written(&key, &info.etag, info.size, &meta);
        let remote = Remote {
            etag: info.etag,
            object_size: info.size,
            metadata: meta,
        };
        let mut t = lock(&self.inodes);
        let ino = t
            .upsert(parent, name, attr, Some(remote), true)
            .ok_or(FsError::NotFound)?;
        t.touch_dir(parent);
        t.get(ino).map(|n| n.attr.clone()).ok_or(FsError::NotFound)
    }

    pub async fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let key = self.key_of(&self.path_of(ino)?);
        let out = self.store.get(&key, None, None).await?;
        let version = self.version_of(&out.info).await?;
        version
            .codec
            .decode(version.plain_size, 0, &out.data)
            .map_err(|source| FsError::Format {
                key: key.clone(),
                source,
            })
    }

    /// Renames a file, symlink or directory. `no_replace`: fail with EEXIST if the target exists.
    pub async fn rename(
        &self,
        parent: u64,
        name: &str,
        new_parent: u64,
        new_name: &str,
        no_replace: bool,
    ) -> FsResult<()> {
        self.check_writable()?;
        check_name(name)?;
        self.check_new_name(new_parent, new_name)?;
        let src = self.lookup(parent, name).await?;
        lock(&self.inodes).forget(src.ino, 1);
        let dst_path = join(&self.dir_path(new_parent)?, new_name);
        self.check_key(&self.key_of(&dst_path))?;
        let dst = match self.find(&dst_path).await {
            Ok(f) => Some(f),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if dst.is_some() && no_replace {
            return Err(FsError::Exists);
        }
        let src_path = self.path_of(src.ino)?;
        match (src.kind, dst) {
            (Kind::Dir, Some(Found::Object(_))) => return Err(FsError::NotDir),
            (k, Some(Found::Dir(_))) if k != Kind::Dir => return Err(FsError::IsDir),
            (Kind::Dir, Some(Found::Dir(_))) => {
                let p = self.dir_prefix(&dst_path);
                if !self.dir_is_empty(&p).await? {
                    return Err(FsError::NotEmpty);
                }
                self.store.delete(&p).await?;
            }
            _ => {}
        }
        // A file replaced by the rename is gone; its open handles must not upload it again.
        let replaced = lock(&self.inodes)
            .child(new_parent, new_name)
            .map(|c| c.ino)
            .filter(|i| *i != src.ino);
        let replaced = replaced.and_then(|i| Some((i, self.open_state(i)?)));
        if let Some((ino, file)) = replaced {
            self.name_gone(ino, &file).await?;
        }
        if src.kind == Kind::Dir {
            self.rename_dir(&src_path, &dst_path).await?;
        } else {
            self.rename_object(src.ino, &src_path, &dst_path).await?;
        }
        self.forget_prefetched(parent, name);
        self.forget_prefetched(new_parent, new_name);
        let mut t = lock(&self.inodes);
        t.rename(src.ino, new_parent, new_name);
        t.touch_dir(parent);
        t.touch_dir(new_parent);
        if let Some(n) = t.get_mut(src.ino) {
            n.attr.ctime = SystemTime::now();
        }
        Ok(())
    }

    /// True when nothing but the directory's own marker lives under `dir_prefix` (which ends with `/`).
    async fn dir_is_empty(&self, dir_prefix: &str) -> FsResult<bool> {
        let page = self.store.list(dir_prefix, None, None, Some(2)).await?;
        Ok(page.objects.iter().all(|o| o.key == dir_prefix) && page.common_prefixes.is_empty())
    }

    /// Server-side copy, then delete; an open file with unsaved data is uploaded first.
    async fn rename_object(&self, ino: u64, src_path: &str, dst_path: &str) -> FsResult<()> {
        let file = self.open_state(ino);
        if let Some(file) = &file {
            self.save_all(file).await?;
        }
        let (src, dst) = (self.key_of(src_path), self.key_of(dst_path));
        // The copy keeps the source's size and metadata (MetadataDirective COPY); only the ETag is new.
        let source = lock(&self.inodes).get(ino).and_then(|n| n.remote.clone());
        let size = match &source {
            Some(r) => r.object_size,
            None => self.store.head(&src).await?.size,
        };
        let etag = self
            .copy_object(&src, &dst, None, PutCondition::None, size, None)
            .await?;
        self.store.delete(&src).await?;
        let remote = source.map(|r| Remote {
            etag: etag.clone(),
            ..r
        });
        if let Some(file) = file {
            let (size, meta) = remote
                .as_ref()
                .map_or((0, Metadata::new()), |r| (r.object_size, r.metadata.clone()));
            file.state.lock().await.moved_to(&copy_info(&dst, etag, size, meta));
        }
        if let Some(n) = lock(&self.inodes).get_mut(ino) {
            n.remote = remote;
        }
        Ok(())
    }

    /// A server-side copy of any size: one CopyObject up to `copy_max`, a multipart copy above (see
    /// [`crate::store::bigcopy`]).
    pub(super) async fn copy_object(
        &self,
        src: &str,
        dst: &str,
        meta: Option<&Metadata>,
        cond: PutCondition,
        size: u64,
        etag: Option<&str>,
    ) -> Result<String, StoreError> {
        let store = self.store.as_ref();
        crate::store::copy_object(store, src, dst, meta, cond, size, etag, self.cfg.copy_max).await
    }

    /// Copies every object below the directory to the new prefix, then deletes the old ones.
    async fn rename_dir(&self, src_path: &str, dst_path: &str) -> FsResult<()> {
        let (src, dst) = (self.dir_prefix(src_path), self.dir_prefix(dst_path));
        let open: Vec<_> = {
            let t = lock(&self.inodes);
            lock(&self.open_files)
                .iter()
                .filter(|(ino, _)| {
                    t.get(**ino)
                        .is_some_and(|n| n.path.starts_with(&format!("{src_path}/")))
                })
                .map(|(ino, e)| (*ino, e.file.clone()))
                .collect()
        };
        for (_, f) in &open {
            self.save_all(f).await?;
        }
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.store.list(&src, None, token.as_deref(), None).await?;
            objects.extend(page.objects.into_iter().map(|o| (o.key, o.size)));
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
        if objects.is_empty() {
            return Err(FsError::NotFound);
        }
        // A listing carries no metadata; `moved_to` needs only the copy's ETag.
        let copies: Vec<ObjectInfo> = stream::iter(objects.iter().cloned())
            .map(|(k, size)| {
                let target = format!("{dst}{}", &k[src.len()..]);
                async move {
                    let etag = self
                        .copy_object(&k, &target, None, PutCondition::None, size, None)
                        .await?;
                    Ok::<_, StoreError>(copy_info(&target, etag, size, Metadata::new()))
                }
            })
            .buffer_unordered(RENAME_PARALLELISM)
            .try_collect()
            .await?;
        let keys: Vec<String> = objects.into_iter().map(|(k, _)| k).collect();
        self.store.delete_many(&keys).await?;
        for (ino, f) in open {
            let path = self.path_of(ino)?;
            let new_key = self.key_of(&format!("{dst_path}/{}", &path[src_path.len() + 1..]));
            if let Some(info) = copies.iter().find(|i| i.key == new_key) {
                f.state.lock().await.moved_to(info);
            }
        }
        Ok(())
    }

    /// chmod, chown and utimens on a name with no open file: rewrites the object's metadata in place (a copy
    /// onto itself, conditional on its ETag), or the directory marker's.
    pub(super) async fn set_metadata(&self, ino: u64, change: &AttrChange) -> FsResult<Attr> {
        let attr = self.getattr(ino).await?;
        let mut new = attr.clone();
        change.apply(&mut new);
        let path = self.path_of(ino)?;
        if attr.kind == Kind::Dir {
            if ino == ROOT_INO {
                if let Some(n) = lock(&self.inodes).get_mut(ino) {
                    n.attr = new.clone();
                }
                return Ok(new);
            }
            // The marker's other metadata (its extended attributes, and the header of the key that seals them)
            // stays.
            let marker = self.dir_prefix(&path);
            let mut meta = match self.store.head(&marker).await {
                Ok(info) => info.metadata,
                Err(StoreError::NotFound(_)) => Metadata::new(),
                Err(e) => return Err(e.into()),
            };
            attr_to_metadata(&new, &mut meta);
            let info = self.store.put(&marker, Bytes::new(), &meta, PutCondition::None).await?;
            if let Some(n) = lock(&self.inodes).get_mut(ino) {
                n.remote = Some(Remote {
                    etag: info.etag,
                    object_size: 0,
                    metadata: meta,
                });
            }
        } else {
            let key = self.key_of(&path);
            let head = self.store.head(&key).await?;
            let mut meta = head.metadata.clone();
            attr_to_metadata(&new, &mut meta);
            let cond = PutCondition::IfMatch(head.etag.clone());
            let etag = self
                .copy_object(&key, &key, Some(&meta), cond, head.size, Some(&head.etag))
                .await?;
            self.index_note_written(&key, &etag, head.size, &meta);
            if let Some(n) = lock(&self.inodes).get_mut(ino) {
                n.remote = Some(Remote {
                    etag,
                    object_size: head.size,
                    metadata: meta,
                });
            }
        }
        if let Some(n) = lock(&self.inodes).get_mut(ino) {
            n.attr = new.clone();
            n.refreshed = std::time::Instant::now();
        }
        Ok(new)
    }
}

/// S3 could not be reached (as opposed to refusing the request).
fn is_outage(e: &StoreError) -> bool {
    matches!(e, StoreError::Transient(_))
}

/// What a server-side copy made at `key`: its ETag (all that CopyObject reports) with the size and metadata the
/// caller knows from the source or from what it sent.
fn copy_info(key: &str, etag: String, size: u64, metadata: Metadata) -> ObjectInfo {
    ObjectInfo {
        key: key.to_string(),
        size,
        etag,
        last_modified: None,
        metadata,
        sse_algorithm: None,
        sse_kms_key_id: None,
        sse_customer_algorithm: None,
    }
}

/// The attribute part of a setattr.
#[derive(Clone, Debug, Default)]
pub struct AttrChange {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
    pub atime: Option<SystemTime>,
    /// Drop the set-user-ID and set-group-ID bits of a file that is not a directory, after `perm` (see
    /// [`without_set_id`]): a chown, or a truncate by a caller without CAP_FSETID, where the mount clears them
    /// itself (`FUSE_HANDLE_KILLPRIV_V2`).
    pub kill_set_id: bool,
}

/// `perm` as a write, a truncate or a chown by a caller without CAP_FSETID leaves it (the rule Linux's FUSE
/// applies when the kernel clears the bits itself): set-user-ID dropped, set-group-ID dropped where group execute
/// is set (without it the bit marks mandatory locking, not a privilege).
pub fn without_set_id(perm: u16) -> u16 {
    let perm = perm & !0o4000;
    if perm & 0o010 != 0 {
        perm & !0o2000
    } else {
        perm
    }
}

impl AttrChange {
    /// Names no attribute. `kill_set_id` alone is not a change; [`Self::changes`] says whether it makes one.
    pub fn is_empty(&self) -> bool {
        self.perm.is_none() && self.uid.is_none() && self.gid.is_none() && self.mtime.is_none() && self.atime.is_none()
    }

    /// Whether applying this to `a` changes anything.
    pub fn changes(&self, a: &Attr) -> bool {
        !self.is_empty() || (self.kill_set_id && a.kind != Kind::Dir && without_set_id(a.perm) != a.perm)
    }

    pub fn apply(&self, a: &mut Attr) {
        let perm_before = a.perm;
        if let Some(p) = self.perm {
            a.perm = p & 0o7777;
        }
        if let Some(u) = self.uid {
            a.uid = u;
        }
        if let Some(g) = self.gid {
            a.gid = g;
        }
        if let Some(m) = self.mtime {
            a.mtime = m;
        }
        if let Some(t) = self.atime {
            a.atime = t;
        }
        if self.kill_set_id && a.kind != Kind::Dir {
            a.perm = without_set_id(a.perm);
        }
        if !self.is_empty() || a.perm != perm_before {
            a.ctime = SystemTime::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_id_bits_drop_as_linux_drops_them() {
        assert_eq!(without_set_id(0o6775), 0o775);
        assert_eq!(without_set_id(0o4755), 0o755);
        // Set-group-ID without group execute marks mandatory locking: it stays.
        assert_eq!(without_set_id(0o2765), 0o2765);
        assert_eq!(without_set_id(0o6745), 0o2745);
        assert_eq!(without_set_id(0o1777), 0o1777);
    }

    #[test]
    fn a_kill_alone_changes_a_file_with_the_bits_and_nothing_else() {
        let kill = AttrChange {
            kill_set_id: true,
            ..AttrChange::default()
        };
        let old = SystemTime::UNIX_EPOCH;
        let at = |kind, perm| Attr {
            ctime: old,
            ..Attr::made_now(kind, 0, perm, 0, 0)
        };
        let mut file = at(Kind::File, 0o6775);
        assert!(kill.changes(&file));
        kill.apply(&mut file);
        assert_eq!((file.perm, file.ctime > old), (0o775, true));
        let mut plain = at(Kind::File, 0o755);
        assert!(!kill.changes(&plain));
        kill.apply(&mut plain);
        assert_eq!((plain.perm, plain.ctime), (0o755, old), "no change, no new ctime");
        let mut dir = at(Kind::Dir, 0o6775);
        assert!(!kill.changes(&dir));
        kill.apply(&mut dir);
        assert_eq!(dir.perm, 0o6775, "a directory keeps them");
        // With a chmod in the same request, the kill applies to the new mode.
        let chmod_and_kill = AttrChange {
            perm: Some(0o4711),
            ..kill
        };
        let mut f = at(Kind::File, 0o644);
        chmod_and_kill.apply(&mut f);
        assert_eq!(f.perm, 0o711);
    }
}
