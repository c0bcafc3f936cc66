//! The asynchronous file-system core: POSIX semantics over encrypted S3 objects, testable without FUSE.
//!
//! # Model
//! A file is one object; a directory is a key prefix, optionally with an empty `dir/` marker object (as s3fs
//! makes them) that carries its attributes. POSIX attributes live in object metadata under s3fs's keys.
//!
//! # Reads
//! An open file has a [`codec::Version`]: the object's ETag, sizes and codec (its unwrapped data key in the
//! client-side modes). A read asks for the whole blocks it touches with one ranged GET, conditional on the ETag;
//! decrypted blocks go into a bounded [`blockcache::BlockCache`]. Sequential reads start read-ahead: chunks of
//! blocks fetched in parallel ahead of the reader (see `read.rs`).
//!
//! # Writes
//! Writes land in a per-inode [`write::FileState`] and, sealed, in the file's entry of the write-back journal
//! (`journal.rs`) on local disk before they return. Nothing goes to S3 until flush, fsync or close; then an
//! upload task (`uploader.rs`) writes a new version (`upload.rs`): one PUT for small files, otherwise a multipart
//! upload whose parts are whole blocks, where parts with no changed block are copied inside S3 (UploadPartCopy)
//! and only touched parts are sealed and sent. Every upload is conditional: If-Match the ETag the file was opened
//! with, If-None-Match `*` for a new file. On a conflict the file's data is written to the recovery directory and
//! the close fails. A failed upload loses nothing: the data stays in the state and the journal and the upload is
//! retried in the background; a later mount finishes what a crashed one left in the journal.
//!
//! # Concurrency
//! The inode table is behind a `std::sync::Mutex` never held across `.await`; each open file's state is behind a
//! `tokio::sync::Mutex` that is never held across network I/O (uploads work from a snapshot; base blocks are
//! fetched without it). Sealing and journal I/O run on the blocking pool, on FUSE threads, or (the journal's
//! small manifest and bookkeeping writes, made under a file's state lock) through [`off_workers`].
mod blockcache;
pub mod codec;
mod content;
mod dir;
mod dirindex;
mod error;
pub mod inode;
pub mod journal;
mod prefetch;
mod read;
mod stats;
mod upload;
mod uploader;
mod write;
mod writebehind;
mod xattr;

pub use read::CHUNK_BYTES;
pub use upload::MAX_PARTS;

pub use content::{HeldWrite, InlineWrite, WriteData};
pub use dir::{AttrChange, DirEntry};
pub use dirindex::{index_prefix, INDEX_DIR};
pub use error::{FsError, FsResult};
pub use inode::{Attr, Kind, ROOT_INO};
pub use stats::FsStats;
pub use uploader::{Recovery, Unsaved};
pub use xattr::{XattrChange, META_XATTR_SEALED};

use crate::format::{BlockCipher, BlockSize, DataKey, ObjectHeader, FORMAT_VERSION};
use crate::keys::{DataKeyCache, DataKeyProvider, KeyError, KeyMode};
use crate::store::{Metadata, ObjectInfo, ObjectStore};
use blockcache::BlockCache;
use codec::{Codec, Version};
use inode::{AttrDefaults, InodeTable};
use rand::RngCore;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use write::OpenFile;

/// Runs `f`, which blocks on local file I/O, without holding up the async workers: on a worker of a multi-threaded
/// runtime through [`tokio::task::block_in_place`] (the worker's other tasks move to another thread meanwhile), on
/// any other thread (a FUSE thread, the blocking pool) as it is. For short blocking steps that the caller must
/// finish before it goes on, often from code that is not async (a state change made under a file's lock): the
/// journal's manifest writes and the creation and removal of its entries, whose order is what its crash recovery
/// relies on.
pub(crate) fn off_workers<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        // A current-thread runtime (some unit tests) has no other worker to hand its tasks to.
        _ => f(),
    }
}

/// The hidden volume descriptor at the mount root (client-side modes).
pub const VOLUME_OBJECT: &str = crate::keys::VOLUME_OBJECT;

/// Settings of the file-system core.
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// Bucket name, for messages.
    pub bucket: String,
    /// Key prefix of the mount: "" or "a/b/".
    pub prefix: String,
    pub key_mode: KeyMode,
    pub block_size: BlockSize,
    pub uid: u32,
    pub gid: u32,
    pub umask: u32,
    pub read_only: bool,
    pub allow_plaintext: bool,
    /// How long attributes and directory entries are trusted.
    pub metadata_ttl: Duration,
    pub block_cache_bytes: u64,
    pub read_ahead_bytes: u64,
    /// Bytes per read-ahead GET, at most ([`read::CHUNK_BYTES`] in a mount; smaller in tests).
    pub read_ahead_chunk_bytes: u64,
    /// Plaintext of freshly written blocks kept in memory, over all files of the mount (the journal has them all).
    pub max_dirty_bytes: u64,
    /// Upload parts of sequentially written files while they are written (see `writebehind.rs`).
    pub write_behind: bool,
    /// Where the write-back journal lives (`<staging_dir>/journal/<volume_id>`).
    pub staging_dir: PathBuf,
    pub recovery_dir: PathBuf,
    /// How long flush, fsync and close wait for an upload before they fail (the upload goes on).
    pub upload_timeout: Duration,
    /// Most parts of one multipart upload: S3's limit, [`MAX_PARTS`] (lower only in tests, to reach the large-part
    /// path with small files).
    pub max_parts: u64,
    /// Names this volume's journal directory (see [`journal::volume_id`]).
    pub volume_id: String,
    /// The key that seals journal blocks of files without a key of their own; `None`: a random key kept in the
    /// journal directory.
    pub journal_key: Option<DataKey>,
    /// The largest object one CopyObject copies; larger ones are copied in parts (S3's limit,
    /// [`crate::store::COPY_MAX`]; lower only in tests).
    pub copy_max: u64,
}

/// Client-side key state.
#[derive(Clone)]
pub struct CseKeys {
    pub provider: Arc<dyn DataKeyProvider>,
    pub cache: Arc<DataKeyCache>,
}

impl CseKeys {
    /// A new file's cipher and header: a random file id and a fresh data key (one KMS call in cse-kms), which
    /// is cached so that reading the file back costs no unwrap.
    pub async fn new_file(&self, mode: KeyMode, bs: BlockSize) -> Result<(BlockCipher, ObjectHeader), KeyError> {
        let mut file_id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut file_id);
        let (dk, wrapped) = self.provider.generate(&file_id).await?;
        let cipher = BlockCipher::new(&dk, file_id);
        self.cache.insert(&file_id, &wrapped, dk);
        let header = ObjectHeader {
            version: FORMAT_VERSION,
            key_mode: mode.as_str().to_string(),
            block_size: bs,
            file_id,
            wrapped_key: wrapped,
        };
        Ok((cipher, header))
    }

    /// The cipher of an existing file, its data key unwrapped through the cache.
    pub async fn open_file(&self, h: &ObjectHeader) -> Result<BlockCipher, KeyError> {
        let dk = self
            .cache
            .get_or_unwrap(self.provider.as_ref(), &h.file_id, &h.wrapped_key)
            .await?;
        Ok(BlockCipher::new(&dk, h.file_id))
    }
}

/// An open handle.
struct Handle {
    ino: u64,
    file: Arc<OpenFile>,
    writable: bool,
    /// Where the last read on this handle ended, to detect sequential reading.
    last_read_end: AtomicU64,
    /// Reads in a row that started near where the one before ended.
    streak: AtomicU32,
}

impl Handle {
    /// Records a read of `offset..end` and returns the handle's sequential streak: the number of reads in a row
    /// that started within twice their own length of where the one before ended (0 on the first read and after a
    /// seek). The slack lets the kernel's concurrent read-ahead requests, served out of order, count as one
    /// stream.
    fn streak(&self, offset: u64, end: u64) -> u32 {
        let prev = self.last_read_end.swap(end, Ordering::Relaxed);
        if prev != u64::MAX && offset.abs_diff(prev) <= 2 * (end - offset) {
            self.streak.fetch_add(1, Ordering::Relaxed).saturating_add(1)
        } else {
            self.streak.store(0, Ordering::Relaxed);
            0
        }
    }
}

pub struct Fs {
    store: Arc<dyn ObjectStore>,
    keys: Option<CseKeys>,
    cfg: FsConfig,
    defaults: AttrDefaults,
    inodes: Mutex<InodeTable>,
    /// Open inodes: the state every handle on the inode shares, and how many handles and operations hold it.
    /// Counting under this lock (not in the state) is what keeps a reopen racing the last release on one state.
    open_files: Mutex<HashMap<u64, write::OpenEntry>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    cache: Arc<BlockCache>,
    reader: read::ReadAhead,
    journal: journal::JournalRoot,
    /// Files recovered from the journal at mount whose upload still fails (no inode names them).
    recovered: Mutex<Vec<Arc<OpenFile>>>,
    /// Event counters for metrics (see [`stats`]).
    counters: Arc<stats::FsCounters>,
    /// Attributes fetched ahead for long listings.
    prefetch: prefetch::Prefetcher,
    /// What this mount learned about directories' files, waiting to go into their attribute indexes.
    dir_index: dirindex::DirIndexer,
    /// The allowance for parts the write-behind keeps staged in memory.
    staged: Arc<writebehind::StageBudget>,
    /// Bytes in all files' write caches ([`write::WriteCache`]), held within `max_dirty_bytes`.
    write_cached: Arc<AtomicU64>,
    /// This file system, for the upload tasks it spawns.
    me: Weak<Fs>,
    /// Tells the kernel that an inode's attributes changed behind its cache (set by the FUSE session; see
    /// [`Fs::on_attr_changed`]).
    attr_changed: std::sync::OnceLock<AttrChanged>,
}

/// See [`Fs::on_attr_changed`].
type AttrChanged = Box<dyn Fn(u64) + Send + Sync>;

/// Spawns `task` and, once it has ended, `after(panicked)`: the one place where the file system watches its
/// background tasks for panics (a bug, perhaps in a library below), so that a task that held something for
/// others (an upload's turn, a part's count) gives it back. A task cancelled by the runtime ending has no after.
fn spawn_watched<A>(task: impl Future<Output = ()> + Send + 'static, after: impl FnOnce(bool) -> A + Send + 'static)
where
    A: Future<Output = ()> + Send + 'static,
{
    let task = tokio::spawn(task);
    tokio::spawn(async move {
        match task.await {
            Ok(()) => after(false).await,
            Err(e) if e.is_panic() => after(true).await,
            Err(_) => {}
        }
    });
}

/// The version behind `info` (a HEAD or an upload's answer), read with `codec`: a file's own, when the object is
/// known to be one of its versions.
fn version_with(info: &ObjectInfo, codec: Arc<Codec>, header: Option<ObjectHeader>) -> FsResult<Version> {
    let plain = codec.plain_size(info.size).map_err(|source| FsError::Format {
        key: info.key.clone(),
        source,
    })?;
    Ok(Version::new(info.etag.clone(), info.size, plain, codec, header))
}

/// A poisoned std mutex only means a panic elsewhere; the data is still consistent for our use.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fs {
    /// The file system over `store`, with its journal directory opened (made if missing).
    pub fn new(store: Arc<dyn ObjectStore>, keys: Option<CseKeys>, cfg: FsConfig) -> std::io::Result<Arc<Self>> {
        let defaults = AttrDefaults::new(cfg.uid, cfg.gid, cfg.umask);
        let root = Attr {
            ino: ROOT_INO,
            ..Attr::made_now(Kind::Dir, 0, defaults.dir_perm, cfg.uid, cfg.gid)
        };
        let cache = Arc::new(BlockCache::new(cfg.block_cache_bytes, cfg.block_size.get()));
        let reader = read::ReadAhead::with_chunk(cfg.read_ahead_bytes, cfg.block_size, cfg.read_ahead_chunk_bytes);
        let journal = journal::JournalRoot::open(&cfg.staging_dir, &cfg.volume_id, cfg.journal_key.clone())
            .map_err(|e| std::io::Error::new(e.kind(), format!("journal in {}: {e}", cfg.staging_dir.display())))?;
        Ok(Arc::new_cyclic(|me| Fs {
            store,
            keys,
            defaults,
            inodes: Mutex::new(InodeTable::new(root)),
            open_files: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            cache,
            reader,
            journal,
            recovered: Mutex::new(Vec::new()),
            counters: Default::default(),
            prefetch: Default::default(),
            dir_index: Default::default(),
            staged: Default::default(),
            write_cached: Default::default(),
            me: me.clone(),
            cfg,
            attr_changed: std::sync::OnceLock::new(),
        }))
    }

    /// `f(ino)` is called when the file system changes an inode's attributes on its own, in a request that does
    /// not answer with them (a write that drops set-user-ID bits), so that the kernel forgets what it cached.
    /// Only the first call takes effect.
    pub fn on_attr_changed(&self, f: impl Fn(u64) + Send + Sync + 'static) {
        let _ = self.attr_changed.set(Box::new(f));
    }

    fn attr_changed(&self, ino: u64) {
        if let Some(f) = self.attr_changed.get() {
            f(ino);
        }
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    /// An empty write cache for a file, counted in the mount's total.
    fn write_cache(&self) -> write::WriteCache {
        write::WriteCache::new(self.write_cached.clone())
    }

    /// This volume's journal directory.
    pub fn journal_dir(&self) -> &std::path::Path {
        self.journal.dir()
    }

    pub fn metadata_ttl(&self) -> Duration {
        self.cfg.metadata_ttl
    }

    /// The object key of a path relative to the mount root.
    pub(super) fn key_of(&self, path: &str) -> String {
        format!("{}{}", self.cfg.prefix, path)
    }

    /// The key prefix of a directory's children; for any directory but the root, also the key of its marker.
    fn dir_prefix(&self, path: &str) -> String {
        if path.is_empty() {
            self.cfg.prefix.clone()
        } else {
            format!("{}{}/", self.cfg.prefix, path)
        }
    }

    fn path_of(&self, ino: u64) -> FsResult<String> {
        lock(&self.inodes)
            .get(ino)
            .map(|n| n.path.clone())
            .ok_or(FsError::NotFound)
    }

    /// The attributes the inode table holds for `ino` (no request).
    pub fn cached_attr(&self, ino: u64) -> FsResult<Attr> {
        lock(&self.inodes)
            .get(ino)
            .map(|n| n.attr.clone())
            .ok_or(FsError::NotFound)
    }

    /// A name a new entry may take in `parent`: a valid name, and not one of the names at the mount's root that
    /// hold s3crypt's own objects (the volume descriptor, the directory indexes).
    fn check_new_name(&self, parent: u64, name: &str) -> FsResult<()> {
        inode::check_name(name)?;
        if parent == ROOT_INO && Self::is_reserved(name) {
            return Err(FsError::Reserved(name.to_string()));
        }
        Ok(())
    }

    /// Names at the mount's root that hold s3crypt's own objects.
    fn is_reserved(name: &str) -> bool {
        name == VOLUME_OBJECT || name == dirindex::INDEX_DIR
    }

    /// S3 keys are at most 1,024 bytes.
    fn check_key(&self, key: &str) -> FsResult<()> {
        if key.len() > 1024 {
            return Err(FsError::NameTooLong);
        }
        Ok(())
    }

    fn check_writable(&self) -> FsResult<()> {
        if self.cfg.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The codec for an existing object, from its metadata: the unwrapped data key in the client-side modes.
    pub(super) async fn codec_for(&self, key: &str, meta: &Metadata) -> FsResult<(Arc<Codec>, Option<ObjectHeader>)> {
        let Some(keys) = &self.keys else {
            return Ok((
                Arc::new(Codec::Plain {
                    bs: self.cfg.block_size,
                }),
                None,
            ));
        };
        match ObjectHeader::from_metadata(meta) {
            Ok(Some(h)) => {
                let cipher = keys.open_file(&h).await?;
                Ok((
                    Arc::new(Codec::Sealed {
                        bs: h.block_size,
                        cipher: Box::new(cipher),
                    }),
                    Some(h),
                ))
            }
            Ok(None) if self.cfg.allow_plaintext => Ok((
                Arc::new(Codec::Plain {
                    bs: self.cfg.block_size,
                }),
                None,
            )),
            Ok(None) => {
                log::warn!("refusing {key}: no s3crypt metadata in a client-side mount (use -o allow_plaintext)");
                Err(FsError::Plaintext(key.to_string()))
            }
            Err(source) => Err(FsError::Format {
                key: key.to_string(),
                source,
            }),
        }
    }

    /// A fresh codec and header for a new file: a new file id and a new data key (one KMS call in cse-kms).
    async fn new_codec(&self) -> FsResult<(Arc<Codec>, Option<ObjectHeader>)> {
        let Some(keys) = &self.keys else {
            return Ok((
                Arc::new(Codec::Plain {
                    bs: self.cfg.block_size,
                }),
                None,
            ));
        };
        let (cipher, header) = keys.new_file(self.cfg.key_mode, self.cfg.block_size).await?;
        Ok((
            Arc::new(Codec::Sealed {
                bs: self.cfg.block_size,
                cipher: Box::new(cipher),
            }),
            Some(header),
        ))
    }

    /// The version behind `info` (a HEAD or an upload's answer).
    async fn version_of(&self, info: &ObjectInfo) -> FsResult<Version> {
        let (codec, header) = self.codec_for(&info.key, &info.metadata).await?;
        version_with(info, codec, header)
    }

    /// File-system statistics: S3 has no capacity limit, so report a large, constant one.
    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: 1 << 40,
            bfree: 1 << 40,
            files: 1 << 32,
            ffree: 1 << 32,
            bsize: 4096,
            namelen: 255,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

impl Fs {
    /// The kernel forgets `n` references to `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        lock(&self.inodes).forget(ino, n);
    }
}

#[cfg(test)]
mod read_tests;
#[cfg(test)]
mod tests;
