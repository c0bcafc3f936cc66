//! The write-back journal: where a file's unsaved changes live until S3 holds them.
//!
//! # Why
//! A program's write returns once the data is in the daemon. From then on the data must survive an S3 outage, a
//! crash or kill of the daemon, and a restart: it is in S3, in this journal, or (after a real conflict) in the
//! recovery directory. The journal is what lets a failed upload keep the data and a later mount finish the job.
//!
//! # Layout
//! Under the mount's `staging_dir`, one directory per volume (`journal/<volume id>`, mode 0700), and in it, per
//! file with unsaved changes, three files named after a random entry id:
//! - `<id>.blocks`: the file's dirty blocks, sealed with AES-256-GCM-SIV, block `i` at offset `i * (B + 28)`; the
//!   file is sparse. In the client-side modes the blocks are sealed exactly as the object holds them (the file's
//!   own data key and file id, non-final), so the journal holds only ciphertext the object would hold anyway and an
//!   upload copies them as they are. In the SSE modes they are sealed under the volume's journal key (see
//!   [`JournalRoot`]) and a per-entry id.
//! - `<id>.manifest`: what the blocks belong to: the object key, the base version (ETag and sizes) the changes
//!   apply to, how much of the base is still valid, the size, the POSIX attributes, the client-side header and
//!   the token and upload id of an upload in flight. Written whole to a temporary file and renamed over.
//! - `<id>.sizes`: appended 16-byte records `(manifest seq, size)`, one per write that grows the file, so that
//!   appends do not rewrite the manifest. A record counts only if its seq is the manifest's.
//! - `<id>.redo`: the new slots of the last write that replaced slots already in the blocks file: a 16-byte
//!   header `(first block, count)`, little-endian, then the sealed slots as they go into the blocks file. See
//!   Durability.
//!
//! The daemon that owns an entry holds an exclusive `flock` on its blocks file; the kernel drops it when the
//! process ends, however it ends. A mount that recovers the journal skips entries it cannot lock: they belong to
//! an earlier daemon of the same volume that is still saving them (`umount; mount` in quick succession).
//!
//! A file unlinked while open keeps its blocks and sizes files for its handles but loses its manifest at once
//! ([`Journal::orphan`]): no later mount uploads it, and one that finds such files unlocked and over a minute old
//! deletes them ([`JournalRoot::sweep_orphans`]).
//!
//! Which blocks are dirty is not recorded anywhere: a slot is dirty exactly when it authenticates. A hole reads as
//! zeros and fails, and a truncation cuts the blocks file (and empties the redo file), so a stale slot cannot come
//! back.
//!
//! # Durability
//! Every write reaches the blocks file (and, when it grows the file, the sizes file) before it returns: a kill of
//! the daemon loses nothing a program was told was written. [`Journal::sync`] (fsync of the files and the
//! directory) runs when the data has to outlive a power loss: when an upload fails at close or fsync, and at
//! unmount.
//!
//! A write that replaces slots already in the blocks file (a rewrite of a block, the growing last block of a file
//! written in small pieces) would otherwise overwrite the only copy of data a program was told was written, and a
//! kill inside that pwrite tears the slot: the kernel copies a write page by page and a fatal signal can stop it
//! between two pages. Such a write therefore puts the new slots that may replace old ones into the redo file
//! first, and only then writes over them (slots past the end of what the blocks file has held are new and are not
//! copied). At recovery ([`Journal::scan`]) a slot that authenticates is taken as it is (the old content, or the
//! new one if the write finished); one that does not, but whose copy in the redo file does, was torn in that
//! second pwrite and is restored from the copy, which is complete because it was written before. A slot that
//! fails with no copy to restore it from is one that was being written for the first time, whose write never
//! returned: the log names it, and the block reads as before that write. Writes into a journal are serialised,
//! so the redo file only ever needs the last one.
//!
//! # A full staging disk
//! A write the disk has no room for fails with ENOSPC and leaves the entry as it was (the slots it may have half
//! written are past the recorded size, or fail to authenticate). Saving what was written before it still needs a
//! little room: each upload rewrites the manifest (its token, its multipart upload id). So the volume's journal
//! directory keeps a reserve, the file `reserve` ([`RESERVE_FILE`]) of [`RESERVE_BYTES`] allocated when the journal is opened: a
//! manifest write that finds the disk full releases it and tries again, so that uploads can go on and empty the
//! journal. The reserve is taken again once an entry is removed (best effort: a disk still full leaves it
//! released until then).
//!
//! Any other error of the disk (an I/O error, the file system gone read-only) fails the write or truncate the same
//! way, with EIO for the program and a log line naming the file and the entry (`FsError::Journal`).
use crate::format::{self, BlockCipher, BlockSize, DataKey, FileId};
use crate::store::Metadata;
use rand::RngCore;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Manifest format version.
const MANIFEST_VERSION: u32 = 1;
/// How old an entry without a manifest must be before [`JournalRoot::sweep_orphans`] removes it.
const ORPHAN_MIN_AGE: Duration = Duration::from_secs(60);
/// Bytes per record of the sizes file.
const SIZE_RECORD: usize = 16;
/// Bytes of the redo file's header: the first block and the count of slots that follow.
const REDO_HEADER: usize = 16;
/// Bytes kept allocated in the journal directory for manifest writes when the disk is full (see the module's
/// "A full staging disk").
pub const RESERVE_BYTES: u64 = 1 << 20;
/// The reserve's file name in the journal directory.
pub const RESERVE_FILE: &str = "reserve";

/// The journal directory of one volume and the key that seals journal blocks of files that have no key of their
/// own (the SSE modes, and plaintext objects in a client-side mount with `allow_plaintext`).
pub struct JournalRoot {
    dir: PathBuf,
    key: DataKey,
    reserve: std::sync::Arc<Reserve>,
}

/// The room a journal directory keeps for manifest writes on a full disk (the file `reserve`).
#[derive(Debug)]
struct Reserve {
    path: PathBuf,
    held: std::sync::atomic::AtomicBool,
}

impl Reserve {
    /// Allocates the reserve if it is not held; a disk without the room leaves it released (logged).
    fn take(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.held.load(SeqCst) {
            return;
        }
        let allocated = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.path)
            .and_then(|f| {
                use std::os::fd::AsRawFd;
                // SAFETY: posix_fallocate on a descriptor this closure owns; no memory is passed.
                match unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, RESERVE_BYTES as libc::off_t) } {
                    0 => Ok(()),
                    err => Err(io::Error::from_raw_os_error(err)),
                }
            });
        match allocated {
            Ok(()) => self.held.store(true, SeqCst),
            Err(e) => {
                let _ = std::fs::remove_file(&self.path);
                log::warn!(
                    "journal: no room for its {} KiB reserve in {} ({e}); uploads need a little room to go on \
                     when the staging disk is full",
                    RESERVE_BYTES >> 10,
                    self.path.display()
                );
            }
        }
    }

    /// Frees the reserve; false if it was not held.
    fn release(&self) -> bool {
        if !self.held.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let _ = std::fs::remove_file(&self.path);
        true
    }
}

impl std::fmt::Debug for JournalRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalRoot").field("dir", &self.dir).finish()
    }
}

/// Where a file's journal blocks are sealed.
#[derive(Clone)]
pub enum SealWith {
    /// The file's own cipher: blocks are in the object's format.
    File(Box<BlockCipher>),
    /// The volume's journal key with a fresh per-entry id.
    JournalKey,
}

impl JournalRoot {
    /// Opens (creating, mode 0700) `<staging_dir>/journal/<volume_id>`. `key`: the journal key, or `None` to use
    /// (creating on first use) a random key in the file `journal.key` (mode 0600) in that directory.
    pub fn open(staging_dir: &Path, volume_id: &str, key: Option<DataKey>) -> io::Result<JournalRoot> {
        let dir = staging_dir.join("journal").join(volume_id);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let key = match key {
            Some(k) => k,
            None => local_key(&dir.join("journal.key"))?,
        };
        let reserve = std::sync::Arc::new(Reserve {
            path: dir.join(RESERVE_FILE),
            held: std::sync::atomic::AtomicBool::new(false),
        });
        reserve.take();
        Ok(JournalRoot { dir, key, reserve })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a new, empty journal entry for `manifest` (its manifest is written at once).
    pub fn create(&self, seal: SealWith, bs: BlockSize, manifest: &mut Manifest) -> io::Result<Journal> {
        super::off_workers(|| self.create_entry(seal, bs, manifest))
    }

    fn create_entry(&self, seal: SealWith, bs: BlockSize, manifest: &mut Manifest) -> io::Result<Journal> {
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let entry = hex::encode(id);
        let (cipher, object_format) = match seal {
            SealWith::File(c) => (*c, true),
            SealWith::JournalKey => {
                let mut fid: FileId = [0u8; 16];
                rand::rngs::OsRng.fill_bytes(&mut fid);
                manifest.journal_file_id = Some(hex::encode(fid));
                (BlockCipher::new(&self.key, fid), false)
            }
        };
        manifest.object_format = object_format;
        manifest.block_size = bs.get();
        let fid = manifest.journal_file_id.clone();
        let j = Journal::open_files(self, &entry, cipher, object_format, fid, bs, true)?;
        j.save_manifest(manifest)?;
        Ok(j)
    }

    /// Every entry left in the directory (by an earlier run of the daemon): its manifest and id. Entries whose
    /// manifest cannot be read are reported in the log and left alone.
    pub fn entries(&self) -> Vec<(String, Manifest)> {
        super::off_workers(|| self.read_entries())
    }

    fn read_entries(&self) -> Vec<(String, Manifest)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(".tmp") {
                // A large part being assembled when an earlier run died; it is made anew if still needed.
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let Some(id) = name.strip_suffix(".manifest") else {
                continue;
            };
            match std::fs::read_to_string(e.path())
                .map_err(|e| e.to_string())
                .and_then(|t| Manifest::parse(&t))
            {
                Ok(m) => out.push((id.to_string(), m)),
                Err(err) => log::error!(
                    "journal entry {}: unreadable manifest, left as is: {err}",
                    e.path().display()
                ),
            }
        }
        out
    }

    /// Removes the blocks and sizes files of entries without a manifest that no running daemon holds: files
    /// unlinked while open whose daemon ended before their last close. Entries younger than a minute are left
    /// alone (a daemon creates the blocks file a moment before it locks it and writes the manifest). Returns how
    /// many were removed.
    pub fn sweep_orphans(&self) -> usize {
        super::off_workers(|| self.sweep_orphans_here())
    }

    fn sweep_orphans_here(&self) -> usize {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut swept = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(id) = name.strip_suffix(".blocks") else {
                continue;
            };
            if self.dir.join(format!("{id}.manifest")).exists() {
                continue;
            }
            let young = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() < ORPHAN_MIN_AGE)
                .unwrap_or(true);
            if young {
                continue;
            }
            // Held by a running daemon (its file is still open there): not ours.
            let Ok(f) = OpenOptions::new().read(true).write(true).open(e.path()) else {
                continue;
            };
            if lock_exclusive(&f).is_err() || self.dir.join(format!("{id}.manifest")).exists() {
                continue;
            }
            remove_files(&self.dir, id, &["sizes", "redo", "blocks"]);
            swept += 1;
        }
        swept
    }

    /// Opens an existing entry. `file_cipher`: the file's own cipher when the manifest says the blocks are in the
    /// object's format.
    pub fn reopen(&self, id: &str, m: &Manifest, file_cipher: Option<BlockCipher>) -> io::Result<Journal> {
        super::off_workers(|| self.reopen_here(id, m, file_cipher))
    }

    fn reopen_here(&self, id: &str, m: &Manifest, file_cipher: Option<BlockCipher>) -> io::Result<Journal> {
        let bs = BlockSize::new(m.block_size as u32)
            .ok_or_else(|| io::Error::other(format!("journal entry {id}: bad block size {}", m.block_size)))?;
        let cipher = if m.object_format {
            file_cipher.ok_or_else(|| io::Error::other(format!("journal entry {id}: the file's key is needed")))?
        } else {
            let fid = m
                .journal_file_id
                .as_deref()
                .and_then(|h| hex::decode(h).ok())
                .and_then(|v| FileId::try_from(v.as_slice()).ok())
                .ok_or_else(|| io::Error::other(format!("journal entry {id}: no journal file id")))?;
            BlockCipher::new(&self.key, fid)
        };
        let fid = m.journal_file_id.clone();
        let j = Journal::open_files(self, id, cipher, m.object_format, fid, bs, false)?;
        j.seq.store(m.seq, std::sync::atomic::Ordering::Relaxed);
        // A record torn at the end (a crash inside its append) is dropped, or the records appended after it
        // would be read out of step.
        let len = j.sizes.metadata()?.len();
        if len % SIZE_RECORD as u64 != 0 {
            j.sizes.set_len(len - len % SIZE_RECORD as u64)?;
        }
        Ok(j)
    }
}

/// Reads the local journal key, or makes one (mode 0600, written to a temporary file and renamed).
fn local_key(path: &Path) -> io::Result<DataKey> {
    match std::fs::read(path) {
        Ok(bytes) => DataKey::from_slice(&bytes)
            .ok_or_else(|| io::Error::other(format!("{}: not a 32-byte key", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut key);
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(&key)?;
            f.sync_all()?;
            // Another daemon may have won the race: keep whichever key landed first.
            if std::fs::hard_link(&tmp, path).is_err() && !path.exists() {
                std::fs::rename(&tmp, path)?;
            }
            let _ = std::fs::remove_file(&tmp);
            let bytes = std::fs::read(path)?;
            zeroize::Zeroize::zeroize(&mut key);
            DataKey::from_slice(&bytes)
                .ok_or_else(|| io::Error::other(format!("{}: not a 32-byte key", path.display())))
        }
        Err(e) => Err(e),
    }
}

/// How many tokens of earlier attempts a file remembers (see [`Manifest::earlier_tokens`]): an attempt that lands
/// later than this many attempts after it (minutes, with the retries' backoff) is taken for someone else's write.
pub const EARLIER_TOKENS: usize = 16;

/// Drops the oldest of `tokens` beyond [`EARLIER_TOKENS`].
pub fn keep_newest(tokens: &mut Vec<String>) {
    let over = tokens.len().saturating_sub(EARLIER_TOKENS);
    tokens.drain(..over);
}

/// What a journal entry's blocks belong to. Plain data, written as `name value` lines; strings are hex-encoded so
/// that any key or ETag round-trips.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub seq: u64,
    /// The full object key.
    pub key: String,
    /// The version the changes apply to; `None` for a file S3 does not have yet.
    pub base: Option<BaseRef>,
    /// Bytes of the base still part of the file.
    pub base_valid: u64,
    pub size: u64,
    pub block_size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub atime: SystemTime,
    pub ctime: SystemTime,
    /// The s3crypt header (client-side modes): the object metadata that carries the wrapped key and file id.
    pub header: Metadata,
    /// Blocks are sealed with the file's own key, in the object's format.
    pub object_format: bool,
    /// Hex file id of the journal-key sealing (when not `object_format`).
    pub journal_file_id: Option<String>,
    /// The token of the last upload that may have reached S3: an object carrying it holds this entry's data
    /// as of that upload.
    pub upload_token: Option<String>,
    /// The tokens of earlier attempts that did not commit and may still reach S3 (the newest
    /// [`EARLIER_TOKENS`]): an object carrying one of them is this entry's own earlier version too.
    pub earlier_tokens: Vec<String>,
    /// A multipart upload started for this entry and not yet completed or aborted, with the key it was started
    /// under (the file may have been renamed since).
    pub multipart: Option<MultipartRef>,
    /// The extended attributes in their stored form (sealed in the client-side modes).
    pub xattr: Option<String>,
    /// Content changed (else only attributes).
    pub modified: bool,
}

/// A multipart upload: its id and the key it was created under (S3 knows an upload only by both).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultipartRef {
    pub key: String,
    pub id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseRef {
    pub etag: String,
    pub object_size: u64,
    pub plain_size: u64,
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            seq: 0,
            key: String::new(),
            base: None,
            base_valid: 0,
            size: 0,
            block_size: 0,
            perm: 0,
            uid: 0,
            gid: 0,
            mtime: UNIX_EPOCH,
            atime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            header: Metadata::new(),
            object_format: false,
            journal_file_id: None,
            upload_token: None,
            earlier_tokens: Vec::new(),
            multipart: None,
            xattr: None,
            modified: false,
        }
    }
}

impl Manifest {
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| {
            s.push_str(k);
            s.push(' ');
            s.push_str(&v);
            s.push('\n');
        };
        line("version", MANIFEST_VERSION.to_string());
        line("seq", self.seq.to_string());
        line("key", hex::encode(&self.key));
        if let Some(b) = &self.base {
            line(
                "base",
                format!("{} {} {}", hex::encode(&b.etag), b.object_size, b.plain_size),
            );
        }
        line("base_valid", self.base_valid.to_string());
        line("size", self.size.to_string());
        line("block_size", self.block_size.to_string());
        line("attr", format!("{} {} {}", self.perm, self.uid, self.gid));
        for (name, time) in [("mtime", self.mtime), ("atime", self.atime), ("ctime", self.ctime)] {
            let t = time.duration_since(UNIX_EPOCH).unwrap_or_default();
            line(name, format!("{} {}", t.as_secs(), t.subsec_nanos()));
        }
        for (k, v) in &self.header {
            line("header", format!("{} {}", hex::encode(k), hex::encode(v)));
        }
        line("object_format", u8::from(self.object_format).to_string());
        if let Some(f) = &self.journal_file_id {
            line("journal_file_id", f.clone());
        }
        if let Some(t) = &self.upload_token {
            line("upload_token", t.clone());
        }
        if !self.earlier_tokens.is_empty() {
            line("earlier_tokens", self.earlier_tokens.join(" "));
        }
        if let Some(u) = &self.multipart {
            // The key second: a build that reads only the id takes the entry's key for it, as it always did.
            line("multipart", format!("{} {}", hex::encode(&u.id), hex::encode(&u.key)));
        }
        if let Some(x) = &self.xattr {
            line("xattr", hex::encode(x));
        }
        line("modified", u8::from(self.modified).to_string());
        line("end", "1".into());
        s
    }

    pub fn parse(text: &str) -> Result<Manifest, String> {
        let mut m = Manifest::default();
        let mut complete = false;
        // The multipart line's id and, if it names one, the key the upload was created under.
        let mut multipart: Option<(String, Option<String>)> = None;
        for l in text.lines() {
            let (k, v) = l.split_once(' ').ok_or_else(|| format!("bad line {l:?}"))?;
            let f: Vec<&str> = v.split(' ').collect();
            let num = |i: usize| -> Result<u64, String> {
                f.get(i)
                    .and_then(|x| x.parse().ok())
                    .ok_or_else(|| format!("bad {k} line"))
            };
            let text = |i: usize| -> Result<String, String> {
                f.get(i)
                    .and_then(|x| hex::decode(x).ok())
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| format!("bad {k} line"))
            };
            match k {
                "version" if num(0)? == u64::from(MANIFEST_VERSION) => {}
                "version" => return Err(format!("unsupported manifest version {v}")),
                "seq" => m.seq = num(0)?,
                "key" => m.key = text(0)?,
                "base" => {
                    m.base = Some(BaseRef {
                        etag: text(0)?,
                        object_size: num(1)?,
                        plain_size: num(2)?,
                    })
                }
                "base_valid" => m.base_valid = num(0)?,
                "size" => m.size = num(0)?,
                "block_size" => m.block_size = num(0)?,
                "attr" => {
                    m.perm = num(0)? as u16;
                    m.uid = num(1)? as u32;
                    m.gid = num(2)? as u32;
                }
                "mtime" => m.mtime = UNIX_EPOCH + Duration::new(num(0)?, num(1)? as u32),
                "atime" => m.atime = UNIX_EPOCH + Duration::new(num(0)?, num(1)? as u32),
                "ctime" => m.ctime = UNIX_EPOCH + Duration::new(num(0)?, num(1)? as u32),
                "header" => {
                    m.header.insert(text(0)?, text(1)?);
                }
                "object_format" => m.object_format = num(0)? == 1,
                "journal_file_id" => m.journal_file_id = Some(v.to_string()),
                "upload_token" => m.upload_token = Some(v.to_string()),
                "earlier_tokens" => m.earlier_tokens = f.iter().map(|t| t.to_string()).collect(),
                "multipart" => multipart = Some((text(0)?, f.get(1).map(|_| text(1)).transpose()?)),
                "xattr" => m.xattr = Some(text(0)?),
                "modified" => m.modified = num(0)? == 1,
                "end" => complete = true,
                _ => return Err(format!("unknown manifest line {k:?}")),
            }
        }
        if !complete || m.key.is_empty() {
            return Err("incomplete manifest".into());
        }
        // Written before the key was recorded with the id: the upload was created under the entry's key.
        m.multipart = multipart.map(|(id, key)| MultipartRef {
            key: key.unwrap_or_else(|| m.key.clone()),
            id,
        });
        Ok(m)
    }
}

/// One file's journal entry.
pub struct Journal {
    dir: PathBuf,
    id: String,
    blocks: File,
    sizes: File,
    cipher: BlockCipher,
    object_format: bool,
    /// Hex file id of the journal-key sealing, written into every manifest with the block size and format: the
    /// state that builds a manifest does not know them, and a manifest without them cannot be reopened.
    journal_file_id: Option<String>,
    bs: BlockSize,
    stored_len: u64,
    seq: std::sync::atomic::AtomicU64,
    /// The redo file: the slots of the last write that replaced slots already in the blocks file.
    redo: File,
    /// How many slots the blocks file may hold (its length in slots, at most): a write below this may replace a
    /// slot that authenticates and goes through the redo file. Only changed under `writing`.
    slots: std::sync::atomic::AtomicU64,
    /// Serialises writes into the blocks file with their redo copies, and the cut.
    writing: std::sync::Mutex<()>,
    /// The file was unlinked: the manifest is gone and is not written again (see [`Journal::orphan`]).
    orphaned: std::sync::atomic::AtomicBool,
    /// The journal directory's reserve (see the module's "A full staging disk").
    reserve: std::sync::Arc<Reserve>,
    /// The size the manifest on disk named at the last cut.
    #[cfg(test)]
    pub(super) size_at_cut: std::sync::Mutex<Option<u64>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("id", &self.id).finish()
    }
}

impl Journal {
    fn open_files(
        root: &JournalRoot,
        id: &str,
        cipher: BlockCipher,
        object_format: bool,
        journal_file_id: Option<String>,
        bs: BlockSize,
        new: bool,
    ) -> io::Result<Journal> {
        let dir = &root.dir;
        let open = |ext: &str, append: bool| {
            let mut o = OpenOptions::new();
            o.read(true).mode(0o600).create(new);
            if append {
                o.append(true);
            } else {
                o.write(true);
            }
            o.open(dir.join(format!("{id}.{ext}")))
        };
        let blocks = open("blocks", false)?;
        lock_exclusive(&blocks).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => {
                io::Error::new(e.kind(), format!("journal entry {id} is in use by a running daemon"))
            }
            _ => e,
        })?;
        let stored_len = format::sealed_block_len(bs);
        let slots = blocks.metadata()?.len().div_ceil(stored_len);
        // Entries written before the redo file existed have none: made here, whether new or not. Never truncated
        // at open: a recovery needs what a killed daemon left in it.
        let redo = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(format!("{id}.redo")))?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            id: id.to_string(),
            blocks,
            sizes: open("sizes", true)?,
            redo,
            slots: std::sync::atomic::AtomicU64::new(slots),
            writing: std::sync::Mutex::new(()),
            cipher,
            object_format,
            journal_file_id,
            bs,
            stored_len,
            seq: std::sync::atomic::AtomicU64::new(0),
            orphaned: std::sync::atomic::AtomicBool::new(false),
            reserve: root.reserve.clone(),
            #[cfg(test)]
            size_at_cut: Default::default(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where the entry's files are, for messages: the directory and the id their names start with.
    pub fn at(&self) -> String {
        format!("entry {}", self.dir.join(&self.id).display())
    }

    /// True when [`read_sealed`](Self::read_sealed) gives blocks in the object's format.
    pub fn is_object_format(&self) -> bool {
        self.object_format
    }

    /// Seals `plain` (a whole block, zero-padded) as block `index` and writes it.
    pub fn write_block(&self, index: u64, plain: &[u8]) -> io::Result<()> {
        self.write_run(index, &[plain])
    }

    /// Seals `plains` (whole blocks, zero-padded) as blocks `first..` and writes them with one pwrite: their slots
    /// are next to each other.
    pub fn write_run(&self, first: u64, plains: &[&[u8]]) -> io::Result<()> {
        let mut out = vec![0u8; plains.len() * self.stored_len as usize];
        self.seal_run(first, plains, &mut out);
        self.put_slots(first, &out)
    }

    /// [`write_run`](Self::write_run) that appends the slots to `out` instead of returning them (the write-behind
    /// seals straight into the part it stages). On an error `out` is as it was.
    pub fn write_run_into(&self, first: u64, plains: &[&[u8]], out: &mut Vec<u8>) -> io::Result<()> {
        let start = out.len();
        out.resize(start + plains.len() * self.stored_len as usize, 0);
        self.seal_run(first, plains, &mut out[start..]);
        self.put_slots(first, &out[start..])
            .inspect_err(|_| out.truncate(start))
    }

    /// Writes sealed slots from block `first` on into the blocks file. Those that may replace slots already there
    /// go into the redo file first (see the module's Durability section).
    fn put_slots(&self, first: u64, sealed: &[u8]) -> io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let count = sealed.len() as u64 / self.stored_len;
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        // Raised before the writes: a write that fails half-way may leave whole slots behind, and a later write
        // over them must go through the copy too.
        let had = self.slots.fetch_max(first + count, Relaxed);
        // Only the slots that may already be there are copied: the growing last block of a file written in
        // unaligned pieces costs one slot more, the blocks past it nothing.
        let replaced = had.saturating_sub(first).min(count);
        if replaced > 0 {
            // The slots first, the header after: a header never names slots that are not wholly written, except
            // after a tear in the slots themselves, and those fail to authenticate.
            let bytes = (replaced * self.stored_len) as usize;
            self.redo.write_all_at(&sealed[..bytes], REDO_HEADER as u64)?;
            let mut header = [0u8; REDO_HEADER];
            header[..8].copy_from_slice(&first.to_le_bytes());
            header[8..].copy_from_slice(&replaced.to_le_bytes());
            self.redo.write_all_at(&header, 0)?;
        }
        self.blocks.write_all_at(sealed, first * self.stored_len)
    }

    /// The redo file's slots and the block the first one belongs to, if it holds any.
    fn read_redo(&self) -> io::Result<Option<(u64, Vec<u8>)>> {
        let mut header = [0u8; REDO_HEADER];
        let len = self.redo.metadata()?.len();
        if len < REDO_HEADER as u64 {
            return Ok(None);
        }
        self.redo.read_exact_at(&mut header, 0)?;
        let first = u64::from_le_bytes(header[..8].try_into().unwrap_or_default());
        let count = u64::from_le_bytes(header[8..].try_into().unwrap_or_default());
        let bytes = count.saturating_mul(self.stored_len);
        if count == 0 || bytes > len - REDO_HEADER as u64 || first.checked_add(count).is_none() {
            return Ok(None);
        }
        let mut slots = vec![0u8; bytes as usize];
        self.redo.read_exact_at(&mut slots, REDO_HEADER as u64)?;
        Ok(Some((first, slots)))
    }

    /// Seals `plains` as blocks `first..` into `out`, one slot each, on the calling thread.
    ///
    /// One thread, not two: the writer's other core is not idle (the write-behind stages and sends parts on it, and
    /// through S3 the server runs there), and a second thread per write cost its start, the wake-up at its end and
    /// the plaintext's trip to the other core's cache. Over the in-memory store, 1 GiB in 1 MiB writes ran at
    /// 705-760 MB/s on one thread against 570-683 on two, alternated five times (scripts/bench.d/analysis.md).
    fn seal_run(&self, first: u64, plains: &[&[u8]], out: &mut [u8]) {
        let mut rng = rand::thread_rng();
        for (k, (plain, slot_out)) in plains.iter().zip(out.chunks_mut(self.stored_len as usize)).enumerate() {
            self.cipher
                .seal_to_slice(first + k as u64, false, plain, &mut rng, slot_out);
        }
    }

    /// The plaintext of block `index`, or `None` when the slot does not authenticate (never written, cut, or torn
    /// by a crash).
    pub fn read_block(&self, index: u64) -> io::Result<Option<Vec<u8>>> {
        let sealed = self.read_sealed(index)?;
        Ok(self.cipher.open(index, false, &sealed).ok())
    }

    /// Opens a slot's bytes read earlier with [`read_sealed`](Self::read_sealed).
    pub fn open_sealed(&self, index: u64, sealed: &[u8]) -> Option<Vec<u8>> {
        self.cipher.open(index, false, sealed).ok()
    }

    /// The sealed bytes of slot `index` (zeros past the end of the file).
    pub fn read_sealed(&self, index: u64) -> io::Result<Vec<u8>> {
        self.read_sealed_run(index, 1)
    }

    /// The sealed bytes of slots `first..first + count`, which lie next to each other in the blocks file (zeros
    /// past its end).
    ///
    /// The buffer is read into without being zeroed first (only the part past the end of the file is zeroed): a
    /// write-behind part read back from the journal is 8 MiB, and zeroing it before the read was a twentieth of
    /// the daemon's CPU in a large write.
    pub fn read_sealed_run(&self, first: u64, count: u64) -> io::Result<Vec<u8>> {
        let len = (count * self.stored_len) as usize;
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.blocks);
        let mut done = 0usize;
        while done < len {
            let at = (first * self.stored_len + done as u64) as libc::off_t;
            // SAFETY: pread(2) writes at most `len - done` bytes at `done` into `buf`'s allocation of `len`
            // bytes; none of them is read before `set_len` below, once all `len` bytes are initialised.
            let n = unsafe { libc::pread(fd, buf.as_mut_ptr().add(done).cast(), len - done, at) };
            match n {
                0 => break,
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        // SAFETY: bytes `..done` were written by pread and `done..len` are zeroed here: all `len` are initialised.
        unsafe {
            buf.as_mut_ptr().add(done).write_bytes(0, len - done);
            buf.set_len(len);
        }
        Ok(buf)
    }

    /// Drops every slot from block `keep_blocks` on. The redo file is emptied first: no write is in progress, so
    /// every slot is whole, and a copy left there could otherwise bring back a block cut here.
    pub fn cut(&self, keep_blocks: u64) -> io::Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(test)]
        {
            // What a kill at this moment leaves for the next mount (see the truncate test).
            let m = std::fs::read_to_string(self.dir.join(format!("{}.manifest", self.id)));
            *self.size_at_cut.lock().unwrap() = m.ok().and_then(|t| Manifest::parse(&t).ok()).map(|m| m.size);
        }
        self.redo.set_len(0)?;
        let len = self.blocks.metadata()?.len();
        let keep = keep_blocks.saturating_mul(self.stored_len);
        if len > keep {
            self.blocks.set_len(keep)?;
        }
        self.slots.store(
            len.min(keep).div_ceil(self.stored_len),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    /// Records a new size without rewriting the manifest.
    pub fn record_size(&self, size: u64) -> io::Result<()> {
        let mut rec = [0u8; SIZE_RECORD];
        rec[..8].copy_from_slice(&self.seq.load(std::sync::atomic::Ordering::Relaxed).to_le_bytes());
        rec[8..].copy_from_slice(&size.to_le_bytes());
        (&self.sizes).write_all(&rec)
    }

    /// The file's name is gone (unlinked while open): its manifest is deleted, so that no later mount uploads the
    /// entry, and never written again; the blocks stay for the open handles until [`remove`](Self::remove) (or,
    /// after a crash, until the next mount of the volume sweeps them: see [`JournalRoot::sweep_orphans`]).
    pub fn orphan(&self) {
        self.orphaned.store(true, std::sync::atomic::Ordering::SeqCst);
        super::off_workers(|| remove_files(&self.dir, &self.id, &["manifest", "manifest.tmp"]));
    }

    /// Writes `m` (with the next seq) over the manifest, then clears the sizes file (its records are now stale).
    /// Does nothing for an orphaned entry.
    /// On a full disk the directory's reserve is released and the write tried once more.
    pub fn save_manifest(&self, m: &mut Manifest) -> io::Result<()> {
        super::off_workers(|| self.save_manifest_here(m))
    }

    fn save_manifest_here(&self, m: &mut Manifest) -> io::Result<()> {
        #[cfg(test)]
        gate::pass(&self.dir);
        if self.orphaned.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        match self.write_manifest(m) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && self.reserve.release() => {
                log::warn!(
                    "journal: the staging disk {} is full; its reserve is released so that uploads can go on and \
                     empty it",
                    self.dir.display()
                );
                self.write_manifest(m)
            }
            r => r,
        }
    }

    fn write_manifest(&self, m: &mut Manifest) -> io::Result<()> {
        m.seq = self.seq.load(std::sync::atomic::Ordering::Relaxed) + 1;
        m.block_size = self.bs.get();
        m.object_format = self.object_format;
        m.journal_file_id = self.journal_file_id.clone();
        let path = self.dir.join(format!("{}.manifest", self.id));
        let tmp = self.dir.join(format!("{}.manifest.tmp", self.id));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(m.render().as_bytes())?;
        std::fs::rename(&tmp, &path)?;
        self.seq.store(m.seq, std::sync::atomic::Ordering::Relaxed);
        self.sizes.set_len(0)
    }

    /// The size the entry's last records give: the newest size record of the current manifest, else its size.
    /// The file is read in pieces of a fixed size: it holds one record per write that grew the file since the last
    /// manifest save, a count the writing program sets.
    pub fn recorded_size(&self, m: &Manifest) -> io::Result<u64> {
        super::off_workers(|| {
            let mut buf = vec![0u8; SIZE_RECORD * 4096];
            let (mut at, mut size) = (0u64, m.size);
            loop {
                let n = read_full_at(&self.sizes, &mut buf, at)?;
                // A record torn by a kill (a short tail) is not counted.
                for rec in buf[..n].chunks_exact(SIZE_RECORD) {
                    let seq = u64::from_le_bytes(rec[..8].try_into().unwrap_or_default());
                    if seq == m.seq {
                        size = u64::from_le_bytes(rec[8..].try_into().unwrap_or_default());
                    }
                }
                if n < buf.len() {
                    return Ok(size);
                }
                at += n as u64;
            }
        })
    }

    /// The blocks below `n_blocks` whose slots authenticate (recovery). A slot torn while it was being replaced is
    /// first restored from the redo file; one that fails with nothing to restore it from is named in the log.
    /// `key`: the object key, for the log.
    pub fn scan(&self, n_blocks: u64, key: &str) -> io::Result<Vec<u64>> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let len = self.blocks.metadata()?.len();
        let redo = self.read_redo()?;
        let redo_end = redo
            .as_ref()
            .map_or(0, |(first, s)| first + s.len() as u64 / self.stored_len);
        let slots = len.div_ceil(self.stored_len).max(redo_end).min(n_blocks);
        let slot = self.stored_len as usize;
        let mut out = Vec::new();
        for i in 0..slots {
            let sealed = self.read_sealed(i)?;
            if self.open_sealed(i, &sealed).is_some() {
                out.push(i);
                continue;
            }
            let copy = redo.as_ref().and_then(|(first, s)| {
                let k = i.checked_sub(*first)? as usize;
                s.get(k * slot..(k + 1) * slot)
            });
            if let Some(copy) = copy.filter(|c| self.open_sealed(i, c).is_some()) {
                self.blocks.write_all_at(copy, i * self.stored_len)?;
                log::warn!(
                    "{key}: block {i} was torn by a crash while it was being rewritten; restored from the \
                     journal's copy (journal entry {})",
                    self.id
                );
                out.push(i);
            } else if sealed.iter().any(|b| *b != 0) {
                log::warn!(
                    "{key}: block {i} in the journal does not authenticate (journal entry {}): a crash tore it \
                     while it was written for the first time, by a write that never returned; it reads as it \
                     was before that write",
                    self.id
                );
            }
        }
        // Every slot the blocks or the redo file may hold counts: a later write over one of them is copied first.
        let held = len.div_ceil(self.stored_len).max(redo_end);
        self.slots.fetch_max(held, std::sync::atomic::Ordering::Relaxed);
        Ok(out)
    }

    /// Makes everything written so far survive a power loss.
    pub fn sync(&self) -> io::Result<()> {
        self.blocks.sync_data()?;
        self.sizes.sync_data()?;
        self.redo.sync_data()?;
        if self.orphaned.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        File::open(self.dir.join(format!("{}.manifest", self.id)))?.sync_all()?;
        File::open(&self.dir)?.sync_all()
    }

    /// Deletes the entry (its data is in S3 or in the recovery directory). The manifest goes first: without it
    /// the blocks are never looked at again. The blocks file goes last: it is what
    /// [`JournalRoot::sweep_orphans`] looks for when a kill stops this half-way.
    pub fn remove(&self) {
        super::off_workers(|| {
            remove_files(
                &self.dir,
                &self.id,
                &["manifest", "sizes", "redo", "manifest.tmp", "blocks"],
            );
            // The room freed may give the reserve back.
            self.reserve.take();
        })
    }

    pub fn block_size(&self) -> BlockSize {
        self.bs
    }
}

/// A gate that manifest saves under one directory wait at, for tests of what runs meanwhile.
#[cfg(test)]
pub(super) mod gate {
    use std::path::{Path, PathBuf};
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    #[derive(Default)]
    struct State {
        /// Saves under this directory wait.
        dir: Option<PathBuf>,
        waiting: usize,
        open: bool,
        /// Saves that gave up waiting.
        timed_out: usize,
    }

    static GATE: Mutex<Option<State>> = Mutex::new(None);
    static CHANGED: Condvar = Condvar::new();
    /// How long a save waits before it gives up (a test that never opens the gate must not hang).
    const GIVE_UP: Duration = Duration::from_secs(5);

    fn lock() -> std::sync::MutexGuard<'static, Option<State>> {
        GATE.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the gate for saves under `dir`.
    pub fn close(dir: &Path) {
        *lock() = Some(State {
            dir: Some(dir.to_path_buf()),
            ..State::default()
        });
    }

    pub(in crate::fs) fn pass(dir: &Path) {
        let mut g = lock();
        let applies = g
            .as_ref()
            .is_some_and(|s| s.dir.as_deref().is_some_and(|d| dir.starts_with(d)) && !s.open);
        if !applies {
            return;
        }
        if let Some(s) = g.as_mut() {
            s.waiting += 1;
        }
        CHANGED.notify_all();
        let (mut g, timeout) = CHANGED
            .wait_timeout_while(g, GIVE_UP, |s| s.as_ref().is_some_and(|s| !s.open))
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() {
            if let Some(s) = g.as_mut() {
                s.timed_out += 1;
            }
        }
    }

    /// Waits (on this thread) until a save is waiting at the gate; false if none comes within the give-up time.
    pub fn await_waiter() -> bool {
        let g = lock();
        let (g, _) = CHANGED
            .wait_timeout_while(g, GIVE_UP, |s| s.as_ref().is_some_and(|s| s.waiting == 0))
            .unwrap_or_else(|e| e.into_inner());
        g.as_ref().is_some_and(|s| s.waiting > 0)
    }

    pub fn open() {
        if let Some(s) = lock().as_mut() {
            s.open = true;
        }
        CHANGED.notify_all();
    }

    /// Removes the gate; returns how many saves gave up waiting at it.
    pub fn remove() -> usize {
        let n = lock().take().map(|s| s.timed_out).unwrap_or(0);
        CHANGED.notify_all();
        n
    }
}

/// Reads from `at` until `buf` is full or the file ends; returns the bytes read.
fn read_full_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], at + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Deletes the files `<id>.<ext>` of one entry, in the order given; a file already gone is not an error, any other
/// failure is logged.
fn remove_files(dir: &Path, id: &str, exts: &[&str]) {
    for ext in exts {
        let p = dir.join(format!("{id}.{ext}"));
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("removing journal file {}: {e}", p.display());
            }
        }
    }
}

/// Takes the entry's lock, without waiting: the daemon that owns an entry holds it for the entry's life (the
/// kernel drops it when the process dies, even by kill -9), so a mount that starts while an earlier daemon is
/// still saving its files leaves that daemon's entries alone.
fn lock_exclusive(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function borrows; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A volume's journal directory name: a hash of the bucket and prefix, so that two volumes never share one. The
/// endpoint is left out on purpose: one bucket reached through another endpoint (a proxy, a regional name) is the
/// same volume, and its journal must be found.
pub fn volume_id(bucket: &str, prefix: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(format!("{bucket}\n{prefix}").as_bytes());
    format!("{}-{}", sanitize(bucket), &hex::encode(h)[..16])
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .take(40)
        .collect()
}

/// A random upload token (hex), stored in an object's metadata to recognise one's own write after a lost
/// response.
pub fn new_token() -> String {
    let mut t = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut t);
    hex::encode(t)
}

/// Metadata name of the upload token.
pub const META_UPLOAD_TOKEN: &str = "s3crypt-upload";

#[cfg(test)]
mod tests {
    use super::*;

    fn bs() -> BlockSize {
        BlockSize::new(4096).unwrap()
    }

    fn manifest() -> Manifest {
        Manifest {
            key: "dir/a file".into(),
            base: Some(BaseRef {
                etag: "\"abc\"".into(),
                object_size: 100,
                plain_size: 72,
            }),
            base_valid: 50,
            size: 9000,
            perm: 0o640,
            uid: 1,
            gid: 2,
            mtime: UNIX_EPOCH + Duration::new(1_700_000_000, 123),
            atime: UNIX_EPOCH + Duration::new(1_600_000_000, 4),
            ctime: UNIX_EPOCH + Duration::new(1_700_000_001, 5),
            header: [("s3crypt-key".to_string(), "x y".to_string())].into_iter().collect(),
            upload_token: Some("tok".into()),
            earlier_tokens: vec!["old1".into(), "old2".into()],
            multipart: Some(MultipartRef {
                key: "vol/before a rename".into(),
                id: "up/id".into(),
            }),
            xattr: Some("%7B%7D".into()),
            modified: true,
            ..Manifest::default()
        }
    }

    /// A journal directory of volume `vol` with one new entry (the test's [`manifest`], journal-key sealing).
    fn new_entry() -> (tempfile::TempDir, JournalRoot, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let root = JournalRoot::open(dir.path(), "vol", None).unwrap();
        let j = root.create(SealWith::JournalKey, bs(), &mut manifest()).unwrap();
        (dir, root, j)
    }

    /// A manifest written before the multipart line named its key (the id alone): the upload was created
    /// under the entry's key.
    #[test]
    fn a_multipart_line_without_its_key_means_the_entrys_key() {
        let mut m = manifest();
        let text = m.render();
        let id_only = text
            .lines()
            .map(|l| match l.strip_prefix("multipart ") {
                Some(v) => format!("multipart {}\n", v.split(' ').next().unwrap()),
                None => format!("{l}\n"),
            })
            .collect::<String>();
        assert_ne!(id_only, text, "the test rewrote the multipart line");
        m.multipart = Some(MultipartRef {
            key: m.key.clone(),
            id: "up/id".into(),
        });
        assert_eq!(Manifest::parse(&id_only).unwrap(), m);
    }

    #[test]
    fn manifest_round_trips_and_refuses_truncation() {
        let mut m = manifest();
        m.seq = 7;
        m.journal_file_id = Some("00ff".into());
        let text = m.render();
        assert_eq!(Manifest::parse(&text).unwrap(), m);
        let cut = &text[..text.len() - 6];
        assert!(Manifest::parse(cut).is_err());
    }

    #[test]
    fn blocks_sizes_and_reopen_after_a_crash() {
        let (dir, root, j) = new_entry();
        j.write_block(0, &[1u8; 4096]).unwrap();
        j.write_block(3, &[3u8; 4096]).unwrap();
        j.record_size(4 * 4096 - 5).unwrap();
        // No sync: a killed daemon leaves exactly this (and its lock dies with it).
        let (id, m2) = root.entries().pop().unwrap();
        assert_eq!(id, j.id());
        drop(j);
        let root2 = JournalRoot::open(dir.path(), "vol", None).unwrap();
        let j2 = root2.reopen(&id, &m2, None).unwrap();
        assert_eq!(j2.recorded_size(&m2).unwrap(), 4 * 4096 - 5);
        assert_eq!(j2.scan(10, "k").unwrap(), vec![0, 3]);
        assert_eq!(j2.read_block(3).unwrap().unwrap(), vec![3u8; 4096]);
        // The raw file holds no plaintext.
        let raw = std::fs::read(dir.path().join("journal/vol").join(format!("{id}.blocks"))).unwrap();
        assert!(!raw.windows(64).any(|w| w.iter().all(|b| *b == 3)));
        // A cut drops slots for good; a new manifest makes old size records stale.
        j2.cut(1).unwrap();
        assert_eq!(j2.scan(10, "k").unwrap(), vec![0]);
        // A later manifest, built by someone who knows nothing of the sealing, still names it.
        let mut m3 = Manifest {
            key: m2.key.clone(),
            size: 10,
            ..Manifest::default()
        };
        j2.save_manifest(&mut m3).unwrap();
        assert_eq!((m3.block_size, m3.object_format), (4096, false));
        assert_eq!(m3.journal_file_id, m2.journal_file_id);
        assert_eq!(j2.recorded_size(&m3).unwrap(), 10);
        j2.remove();
        assert!(root2.entries().is_empty());
    }

    #[test]
    fn only_the_newest_earlier_tokens_are_kept() {
        let mut t: Vec<String> = (0..EARLIER_TOKENS + 3).map(|i| format!("t{i}")).collect();
        keep_newest(&mut t);
        assert_eq!(t.len(), EARLIER_TOKENS);
        assert_eq!((t[0].as_str(), t[EARLIER_TOKENS - 1].as_str()), ("t3", "t18"));
        let mut few = vec!["a".to_string()];
        keep_newest(&mut few);
        assert_eq!(few, ["a"]);
    }

    #[test]
    fn a_size_record_torn_at_the_end_does_not_put_later_records_out_of_step() {
        let (dir, root, j) = new_entry();
        j.record_size(100).unwrap();
        let (id, m) = root.entries().pop().unwrap();
        let torn = SIZE_RECORD as u64 + 5;
        tear(&root, &j, "sizes", SIZE_RECORD as u64, 5);
        drop(j);
        let root2 = JournalRoot::open(dir.path(), "vol", None).unwrap();
        let j2 = root2.reopen(&id, &m, None).unwrap();
        let sizes = root2.dir().join(format!("{id}.sizes"));
        assert_eq!(
            std::fs::metadata(&sizes).unwrap().len(),
            torn - 5,
            "the torn record is gone, the whole one stays"
        );
        assert_eq!(j2.recorded_size(&m).unwrap(), 100);
        // The next write that grows the file is read back.
        j2.record_size(200).unwrap();
        assert_eq!(j2.recorded_size(&m).unwrap(), 200);
    }

    /// The blocks file of entry `j`, for tearing a slot by hand as a kill inside its pwrite would.
    fn tear(root: &JournalRoot, j: &Journal, ext: &str, at: u64, len: usize) {
        let f = File::options()
            .write(true)
            .open(root.dir().join(format!("{}.{ext}", j.id())))
            .unwrap();
        f.write_all_at(&vec![0x5a; len], at).unwrap();
    }

    #[test]
    fn a_slot_torn_while_it_was_rewritten_is_restored_from_its_copy() {
        let (_dir, root, j) = new_entry();
        let a: Vec<Vec<u8>> = (0..4u8).map(|k| vec![k + 1; 4096]).collect();
        j.write_run(0, &a.iter().map(|b| &b[..]).collect::<Vec<_>>()).unwrap();
        // Block 2 grows by a write that returned: the only copy of what the program was told is written.
        let mut b2 = a[2].clone();
        b2[..100].copy_from_slice(&[9u8; 100]);
        j.write_block(2, &b2).unwrap();
        // The next write to block 2 is killed after its first page reached the blocks file.
        tear(&root, &j, "blocks", 2 * j.stored_len + 4096, 28);
        let (id, m2) = root.entries().pop().unwrap();
        drop(j);
        let j2 = root.reopen(&id, &m2, None).unwrap();
        assert_eq!(j2.scan(10, "k").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(
            j2.read_block(2).unwrap(),
            Some(b2.clone()),
            "the acknowledged write survives"
        );
        assert_eq!(j2.read_block(3).unwrap(), Some(a[3].clone()));
        drop(j2);
        // A copy torn in the redo file is never taken over a slot that authenticates (a kill inside the copy
        // leaves the slots as they were).
        let j3 = root.reopen(&id, &m2, None).unwrap();
        j3.write_block(1, &[7u8; 4096]).unwrap();
        tear(&root, &j3, "redo", REDO_HEADER as u64 + 10, 3000);
        drop(j3);
        let j4 = root.reopen(&id, &m2, None).unwrap();
        assert_eq!(j4.scan(10, "k").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(j4.read_block(1).unwrap(), Some(vec![7u8; 4096]));
        // A slot torn the first time it is written (its write never returned) is left out, and nothing else.
        j4.write_block(6, &[6u8; 4096]).unwrap();
        tear(&root, &j4, "blocks", 6 * j4.stored_len + 4096, 28);
        assert_eq!(j4.scan(10, "k").unwrap(), vec![0, 1, 2, 3]);
    }

    #[test]
    fn only_slots_that_may_be_there_already_are_copied() {
        let (_dir, root, j) = new_entry();
        let redo = root.dir().join(format!("{}.redo", j.id()));
        let blocks: Vec<Vec<u8>> = (0..4u8).map(|k| vec![k; 4096]).collect();
        let plains: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
        j.write_run(0, &plains[..2]).unwrap();
        assert_eq!(std::fs::metadata(&redo).unwrap().len(), 0, "appends are not copied");
        // An unaligned sequential write: its first block was there, the rest are new.
        j.write_run(1, &plains[1..4]).unwrap();
        assert_eq!(
            std::fs::metadata(&redo).unwrap().len(),
            REDO_HEADER as u64 + j.stored_len
        );
        assert_eq!(
            j.read_redo().unwrap().map(|(first, s)| (first, s.len())),
            Some((1, j.stored_len as usize))
        );
    }

    #[test]
    fn a_cut_block_does_not_come_back_from_the_copy() {
        let (_dir, root, j) = new_entry();
        for i in 0..4 {
            j.write_block(i, &[1u8; 4096]).unwrap();
        }
        j.write_block(2, &[2u8; 4096]).unwrap();
        j.cut(2).unwrap();
        // Written again past the cut: block 2 is a hole now, and must read as one.
        j.write_block(3, &[3u8; 4096]).unwrap();
        let (id, m2) = root.entries().pop().unwrap();
        drop(j);
        let j2 = root.reopen(&id, &m2, None).unwrap();
        assert_eq!(j2.scan(10, "k").unwrap(), vec![0, 1, 3]);
        assert_eq!(j2.read_block(2).unwrap(), None);
    }

    #[test]
    fn an_orphaned_entry_is_never_recovered_and_is_swept_once_old_and_free() {
        let (_dir, root, j) = new_entry();
        j.write_block(0, &[7u8; 4096]).unwrap();
        j.orphan();
        // Later changes of the file (a chmod, a rename) do not bring the manifest back.
        j.save_manifest(&mut manifest()).unwrap();
        j.sync().unwrap();
        assert!(root.entries().is_empty(), "nothing for a restart to upload");
        assert_eq!(
            j.read_block(0).unwrap(),
            Some(vec![7u8; 4096]),
            "the handles still read it"
        );
        let blocks = root.dir().join(format!("{}.blocks", j.id()));
        let age = |p: &Path| {
            let old = SystemTime::now() - 2 * ORPHAN_MIN_AGE;
            File::options().write(true).open(p).unwrap().set_modified(old).unwrap();
        };
        age(&blocks);
        assert_eq!(root.sweep_orphans(), 0, "held by a live daemon: left alone");
        drop(j);
        let young = root.create(SealWith::JournalKey, bs(), &mut manifest()).unwrap();
        young.orphan();
        let young_blocks = root.dir().join(format!("{}.blocks", young.id()));
        drop(young);
        assert_eq!(root.sweep_orphans(), 1, "old and free: removed; the young one stays");
        assert!(!blocks.exists() && young_blocks.exists());
    }

    #[test]
    fn an_entry_owned_by_a_live_journal_cannot_be_reopened() {
        let (_dir, root, live) = new_entry();
        let (id, m2) = root.entries().pop().unwrap();
        let err = root.reopen(&id, &m2, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        drop(live);
        root.reopen(&id, &m2, None).expect("free once its owner is gone");
    }

    #[test]
    fn a_run_sealed_on_two_threads_reads_back_block_by_block() {
        let (_dir, _root, j) = new_entry();
        let blocks: Vec<Vec<u8>> = (0..21u8).map(|k| vec![k; 4096]).collect();
        let plains: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
        j.write_run(5, &plains).unwrap();
        j.write_run(30, &plains[..3]).unwrap();
        for (k, b) in blocks.iter().enumerate() {
            assert_eq!(j.read_block(5 + k as u64).unwrap().as_ref(), Some(b), "block {}", 5 + k);
        }
        assert_eq!(j.scan(40, "k").unwrap(), (5..26).chain(30..33).collect::<Vec<u64>>());
        // Each slot is sealed for its own index: a slot moved elsewhere does not open.
        let slot = j.read_sealed(6).unwrap();
        j.blocks.write_all_at(&slot, 7 * j.stored_len).unwrap();
        assert!(j.read_block(7).unwrap().is_none());
        assert_eq!(j.read_sealed_run(5, 2).unwrap()[j.stored_len as usize..], slot[..]);
    }

    #[test]
    fn a_run_read_gives_the_slots_written_and_zeros_past_the_end() {
        let (_dir, _root, j) = new_entry();
        let blocks: Vec<Vec<u8>> = (0..4u8).map(|k| vec![k + 1; 4096]).collect();
        let plains: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
        let mut part = b"staged before".to_vec();
        j.write_run_into(2, &plains, &mut part).unwrap();
        let slots = &part[13..];
        let slot = j.stored_len as usize;
        // Blocks 2..6 are the file's last: a run over 1..8 is a zero slot, the four slots, then zeros.
        let run = j.read_sealed_run(1, 7).unwrap();
        assert_eq!(run.len(), 7 * slot);
        assert!(run[..slot].iter().all(|b| *b == 0), "block 1 was never written");
        assert_eq!(
            &run[slot..5 * slot],
            slots,
            "the slots read are the ones written (and appended)"
        );
        assert!(
            run[5 * slot..].iter().all(|b| *b == 0),
            "past the end of the file: zeros"
        );
        assert_eq!(
            j.read_sealed_run(40, 3).unwrap(),
            vec![0u8; 3 * slot],
            "wholly past the end"
        );
        for (k, b) in blocks.iter().enumerate() {
            assert_eq!(j.read_block(2 + k as u64).unwrap().as_ref(), Some(b));
        }
    }

    #[test]
    fn a_torn_slot_does_not_authenticate() {
        let (_dir, _root, j) = new_entry();
        j.write_block(0, &[7u8; 4096]).unwrap();
        j.blocks.write_all_at(&[0u8; 100], 2000).unwrap();
        assert!(j.read_block(0).unwrap().is_none());
    }

    #[test]
    fn the_local_journal_key_is_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = JournalRoot::open(dir.path(), "v", None).unwrap();
        let b = JournalRoot::open(dir.path(), "v", None).unwrap();
        assert_eq!(a.key.as_bytes(), b.key.as_bytes());
        let mode = std::fs::metadata(dir.path().join("journal/v/journal.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
