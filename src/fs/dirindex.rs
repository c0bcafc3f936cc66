//! Directory attribute indexes: a long listing of a cold directory without a HEAD per file.
//!
//! `ls -l` needs each file's mode, owner and times, which live in the object's metadata: a listing does not carry
//! them, so a cold long listing costs one HEAD per file, and a server answers HEADs only so fast. The mount
//! therefore keeps, for a directory with at least [`MIN_FILES`] files that it has written to or long-listed, one
//! index object (`<prefix>.s3crypt-index/<sha256 of the directory's path>`, format in `format/dirindex.rs` and
//! docs/FORMAT.md) recording what a HEAD of each file would say: ETag, object size, the second of its last
//! modification, and its user metadata. A cold long listing then costs its LISTs plus one GET.
//!
//! **The index is a cache, checked against the listing.** An entry answers a lookup only while the listing that
//! was just made shows the same ETag, size and modification second; a file written, copied, re-tagged or
//! replaced by anyone since has a new ETag or time and is HEADed as before. Files the index does not know are
//! HEADed too. Losing the index, or an index that is stale, malformed or unreadable, costs requests and nothing
//! else; nothing is ever read from it that the listing does not vouch for. What the check cannot see is a
//! metadata-only change (a chmod by another client) made within the same second as the version the index
//! recorded, since S3 keeps an object's time in whole seconds and a metadata copy keeps a single-part object's
//! ETag; such a change shows once the metadata TTL has passed, when the attributes are HEADed afresh.
//!
//! **Writing.** What this mount writes (uploads, metadata copies, renames) and what its long-listing HEADs see
//! is noted in memory per directory, and so is what single lookups' HEADs see. A background task, every
//! [`FLUSH_DELAY`], and the unmount, rewrite the index of each directory with at least [`MIN_FILES`] new notes,
//! or with any number if this mount has read or written that directory's index (so that an index does not decay
//! one changed file at a time): one LIST of the directory, a GET of the old index, a PUT of the new one. Other
//! small batches wait, up to [`MAX_AGE`], for more. The new index holds, for each file the
//! LIST shows, the newest note whose ETag and size match the listing (with the listing's time), or else the old
//! index's entry if it still matches; files with neither are left out. Read-only mounts read indexes and never
//! write them. One mount's rounds never overlap: the unmount waits for a background round in progress, so that
//! its GET of the old index sees that round's PUT. Two mounts writing one index: the last PUT wins, and either
//! one is correct by the rule above.
//!
//! Memory is bounded by constants: at most [`MAX_NOTED`] notes wait, an index holds at most [`MAX_ENTRIES`]
//! files, and an index object over [`MAX_INDEX_BYTES`] is not read.
use super::inode::check_name;
use super::{lock, Fs};
use crate::format::{decode_dir_index, encode_dir_index, IndexEntry};
use crate::store::{ByteRange, ListPage, Metadata, ObjectInfo, PutCondition, StoreError};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The folder, at the mount's root, that holds the index objects (hidden from the mount, reserved as a name).
pub const INDEX_DIR: &str = ".s3crypt-index";
/// A directory with fewer files is not worth an index: its long listing costs at most this many HEADs.
pub(super) const MIN_FILES: usize = 16;
/// How long notes gather before the background task writes the indexes that have enough.
const FLUSH_DELAY: Duration = Duration::from_secs(10);
/// Notes of a directory that never reaches [`MIN_FILES`] are dropped after this long.
const MAX_AGE: Duration = Duration::from_secs(60);
/// Notes waiting in memory, over all directories.
const MAX_NOTED: usize = 65_536;
/// Files one index holds (the first ones in listing order).
const MAX_ENTRIES: usize = 20_000;
/// An index object larger than this is ignored (about 800 bytes per file at [`MAX_ENTRIES`]).
const MAX_INDEX_BYTES: u64 = 16 << 20;

/// A file as a listing showed it.
#[derive(Clone, Debug)]
pub(super) struct Listed {
    pub name: String,
    pub etag: String,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

/// What this mount knows S3 holds for one file.
struct Noted {
    etag: String,
    object_size: u64,
    metadata: Metadata,
    /// The second a HEAD reported; `None` for what this mount wrote itself (its time comes from the listing).
    modified: Option<i64>,
}

struct PendingDir {
    since: Instant,
    files: HashMap<String, Noted>,
}

#[derive(Default)]
struct Pending {
    /// By the key prefix of the directory ("" or "a/b/").
    dirs: HashMap<String, PendingDir>,
    noted: usize,
    flusher: bool,
}

/// Notes waiting to be written into indexes.
#[derive(Default)]
pub struct DirIndexer {
    pending: Mutex<Pending>,
    /// Rounds of index writes in progress (the background task's, the unmount's). The unmount waits for the
    /// background round to end before it starts its own: two writes of one index at once would race, and the
    /// last PUT, the background one holding only the notes it took, would leave out the files noted since.
    rounds: tokio::sync::watch::Sender<usize>,
    /// The unmount has begun: the background task starts no more rounds.
    closing: std::sync::atomic::AtomicBool,
    /// Directories (key prefixes) this mount has read or written an index of: kept up to date with any number
    /// of notes, so that an index does not decay one changed file at a time. At most [`MAX_KNOWN`].
    known: Mutex<HashSet<String>>,
}

/// Directories remembered as having an index (forgotten all at once beyond this).
const MAX_KNOWN: usize = 4096;

/// The key prefix under which the directory indexes of the volume at `prefix` live ("" or "a/b", with or
/// without its trailing slash).
pub fn index_prefix(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        format!("{prefix}{INDEX_DIR}/")
    } else {
        format!("{prefix}/{INDEX_DIR}/")
    }
}

fn secs(t: SystemTime) -> Option<i64> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs() as i64)
}

/// The directory prefix and the name of a key.
fn split_key(key: &str) -> (&str, &str) {
    match key.rfind('/') {
        Some(i) => (&key[..=i], &key[i + 1..]),
        None => ("", key),
    }
}

impl Fs {
    /// The key of the index of the directory whose children have key prefix `dir`.
    pub(super) fn index_key(&self, dir: &str) -> String {
        let rel = dir.strip_prefix(self.cfg.prefix.as_str()).unwrap_or(dir);
        format!(
            "{}{}",
            index_prefix(&self.cfg.prefix),
            hex::encode(Sha256::digest(rel.as_bytes()))
        )
    }

    /// This mount has just written `key` (an upload, a metadata copy, a rename's copy).
    pub(super) fn index_note_written(&self, key: &str, etag: &str, object_size: u64, metadata: &Metadata) {
        self.index_note(key, etag, object_size, metadata, None);
    }

    /// A long listing's HEAD saw `info`.
    pub(super) fn index_note_head(&self, info: &ObjectInfo) {
        if let Some(m) = info.last_modified.and_then(secs) {
            self.index_note(&info.key, &info.etag, info.size, &info.metadata, Some(m));
        }
    }

    fn index_note(&self, key: &str, etag: &str, object_size: u64, metadata: &Metadata, modified: Option<i64>) {
        if self.cfg.read_only || self.cfg.metadata_ttl.is_zero() || !key.starts_with(self.cfg.prefix.as_str()) {
            return;
        }
        let (dir, name) = split_key(key);
        if name.is_empty() {
            return;
        }
        let start_flusher = {
            let mut p = lock(&self.dir_index.pending);
            let known = p.dirs.get(dir).and_then(|d| d.files.get(name));
            // What this mount wrote is newer than what a HEAD racing it saw.
            if known.is_some_and(|n| n.modified.is_none() && modified.is_some()) {
                return;
            }
            if known.is_none() && p.noted >= MAX_NOTED {
                return;
            }
            let d = p.dirs.entry(dir.to_string()).or_insert_with(|| PendingDir {
                since: Instant::now(),
                files: HashMap::new(),
            });
            let note = Noted {
                etag: etag.to_string(),
                object_size,
                metadata: metadata.clone(),
                modified,
            };
            let added = d.files.insert(name.to_string(), note).is_none();
            p.noted += added as usize;
            !std::mem::replace(&mut p.flusher, true)
        };
        if start_flusher {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    let _in_runtime = rt.enter();
                    Self::spawn_index_flusher(self.me.clone());
                }
                Err(_) => lock(&self.dir_index.pending).flusher = false,
            }
        }
    }

    /// Starts the background task, watched: if a round panics (a bug below it), the notes that round had taken
    /// are dropped (an index is only a cache; the next one is rebuilt from a listing), and the task starts again
    /// for the notes still waiting, or ends its turn, so that the next note starts it. Without the watcher the
    /// flag would stay set and no index would be written until the unmount.
    fn spawn_index_flusher(me: Weak<Self>) {
        let watcher = me.clone();
        super::spawn_watched(Self::index_flusher(me), move |panicked| async move {
            if panicked {
                Self::index_flusher_panicked(watcher);
            }
        });
    }

    fn index_flusher_panicked(me: Weak<Self>) {
        let Some(fs) = me.upgrade() else { return };
        let again = {
            let mut p = lock(&fs.dir_index.pending);
            let again = !p.dirs.is_empty() && !fs.dir_index.closing.load(std::sync::atomic::Ordering::SeqCst);
            p.flusher = again;
            again
        };
        log::error!(
            "directory indexes: the background writer panicked; the notes of its round are dropped (the indexes \
             are rebuilt from listings){}",
            if again {
                ", and it starts again for the rest"
            } else {
                ""
            }
        );
        if again {
            Self::spawn_index_flusher(me);
        }
    }

    /// Writes the indexes that are due every [`FLUSH_DELAY`] while notes wait. It holds the file system only
    /// while it writes, so that it never keeps a dropped one alive.
    async fn index_flusher(me: Weak<Self>) {
        loop {
            tokio::time::sleep(FLUSH_DELAY).await;
            let Some(fs) = me.upgrade() else { return };
            {
                // Counted before the closing flag is read: the unmount sets the flag, then waits for the count.
                let _round = fs.index_round();
                if fs.dir_index.closing.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                for (dir, files) in fs.take_due(false) {
                    fs.write_index(&dir, files).await;
                }
            }
            let mut p = lock(&fs.dir_index.pending);
            if p.dirs.is_empty() {
                p.flusher = false;
                return;
            }
        }
    }

    /// Writes the index of every directory with enough notes and drops the other notes (unmount), once a
    /// background round in progress has ended; the background task starts no more rounds after this.
    pub async fn flush_dir_indexes(&self) {
        self.dir_index.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut rounds = self.dir_index.rounds.subscribe();
        let _ = rounds.wait_for(|n| *n == 0).await;
        let _round = self.index_round();
        for (dir, files) in self.take_due(true) {
            self.write_index(&dir, files).await;
        }
    }

    /// Counts a round of index writes until dropped.
    fn index_round(&self) -> impl Drop + '_ {
        struct Round<'a>(&'a tokio::sync::watch::Sender<usize>);
        impl Drop for Round<'_> {
            fn drop(&mut self) {
                self.0.send_modify(|n| *n -= 1);
            }
        }
        self.dir_index.rounds.send_modify(|n| *n += 1);
        Round(&self.dir_index.rounds)
    }

    /// Takes the directories whose index is worth writing now; drops notes too old or (`all`) too few to be.
    fn take_due(&self, all: bool) -> Vec<(String, HashMap<String, Noted>)> {
        // The one place that holds both locks, always in this order.
        let known = lock(&self.dir_index.known);
        let worth = |dir: &str, d: &PendingDir| d.files.len() >= MIN_FILES || known.contains(dir);
        let mut p = lock(&self.dir_index.pending);
        let ready: Vec<String> = p
            .dirs
            .iter()
            .filter(|(k, d)| all || worth(k, d) || d.since.elapsed() >= MAX_AGE)
            .map(|(k, _)| k.clone())
            .collect();
        let mut due = Vec::new();
        for dir in ready {
            let d = p.dirs.remove(&dir).expect("key from the map");
            p.noted -= d.files.len();
            if worth(&dir, &d) {
                due.push((dir, d.files));
            }
        }
        due
    }

    /// Rebuilds the index of `dir` from a fresh listing, `noted` and the old index (see the module doc).
    async fn write_index(&self, dir: &str, noted: HashMap<String, Noted>) {
        let listed = match self.list_files(dir).await {
            Ok(l) => l,
            Err(e) => {
                log::debug!("directory index of {dir:?}: listing failed ({e}); not written");
                return;
            }
        };
        let mut old = self.read_index(dir).await;
        let mut entries = Vec::with_capacity(listed.len());
        for f in listed {
            let Some(second) = f.modified.and_then(secs) else {
                continue;
            };
            let entry = match noted.get(&f.name) {
                Some(n) if n.etag == f.etag && n.object_size == f.size && n.modified.unwrap_or(second) == second => {
                    IndexEntry {
                        name: f.name,
                        etag: f.etag,
                        object_size: f.size,
                        modified_secs: second,
                        metadata: n.metadata.clone(),
                    }
                }
                _ => match old.remove(&f.name) {
                    Some(o) if o.etag == f.etag && o.object_size == f.size && o.modified_secs == second => o,
                    _ => continue,
                },
            };
            entries.push(entry);
        }
        if entries.len() < MIN_FILES {
            return;
        }
        let body = Bytes::from(encode_dir_index(&entries));
        let key = self.index_key(dir);
        match self.store.put(&key, body, &Metadata::new(), PutCondition::None).await {
            Ok(_) => {
                self.known_indexed(dir);
                log::debug!("directory index of {dir:?}: {} files", entries.len())
            }
            Err(e) => log::debug!("directory index of {dir:?}: not written ({e})"),
        }
    }

    fn known_indexed(&self, dir: &str) {
        let mut known = lock(&self.dir_index.known);
        if known.len() >= MAX_KNOWN {
            known.clear();
        }
        known.insert(dir.to_string());
    }

    /// The files of one listing page of directory prefix `dir`, without the names the mount does not show (the
    /// directory itself, invalid names, and the reserved names at the mount's root).
    pub(super) fn page_files<'a>(&'a self, dir: &'a str, page: &'a ListPage) -> impl Iterator<Item = Listed> + 'a {
        let root = dir == self.cfg.prefix;
        page.objects.iter().filter_map(move |o| {
            let name = o.key.strip_prefix(dir)?;
            let hidden = name.is_empty() || (root && Self::is_reserved(name)) || check_name(name).is_err();
            (!hidden).then(|| Listed {
                name: name.to_string(),
                etag: o.etag.clone(),
                size: o.size,
                modified: o.last_modified,
            })
        })
    }

    /// The files of `dir` as S3 lists them (at most [`MAX_ENTRIES`]).
    async fn list_files(&self, dir: &str) -> Result<Vec<Listed>, StoreError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.store.list(dir, Some("/"), token.as_deref(), None).await?;
            for f in self.page_files(dir, &page) {
                out.push(f);
                if out.len() >= MAX_ENTRIES {
                    return Ok(out);
                }
            }
            token = page.next_token;
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    /// The entries of `dir`'s index by name; empty if there is none or it cannot be read (it is only a cache).
    async fn read_index(&self, dir: &str) -> HashMap<String, IndexEntry> {
        let key = self.index_key(dir);
        let range = ByteRange::Range {
            start: 0,
            end: MAX_INDEX_BYTES + 1,
        };
        let body = match self.store.get(&key, Some(range), None).await {
            Ok(out) if out.info.size <= MAX_INDEX_BYTES => out.data,
            Ok(out) => {
                log::warn!(
                    "{key}: directory index of {} bytes is too large; not used",
                    out.info.size
                );
                return HashMap::new();
            }
            Err(StoreError::NotFound(_)) => return HashMap::new(),
            Err(e) => {
                log::debug!("{key}: directory index not read ({e})");
                return HashMap::new();
            }
        };
        match decode_dir_index(&body) {
            Ok(entries) => {
                self.known_indexed(dir);
                entries.into_iter().map(|e| (e.name.clone(), e)).collect()
            }
            Err(e) => {
                log::warn!("{key}: {e}; not used (the mount rewrites it)");
                HashMap::new()
            }
        }
    }

    /// What `dir`'s index says about the files of a listing that it still matches, as a HEAD would say it.
    pub(super) async fn indexed(&self, dir: &str, listed: &[Listed]) -> Vec<(String, ObjectInfo)> {
        let mut index = self.read_index(dir).await;
        let mut out = Vec::new();
        for f in listed {
            let Some(second) = f.modified.and_then(secs) else {
                continue;
            };
            let Some(e) = index.remove(&f.name) else { continue };
            if e.etag != f.etag || e.object_size != f.size || e.modified_secs != second {
                continue;
            }
            let info = ObjectInfo {
                key: format!("{dir}{}", f.name),
                size: e.object_size,
                etag: e.etag,
                last_modified: f.modified,
                metadata: e.metadata,
                sse_algorithm: None,
                sse_kms_key_id: None,
                sse_customer_algorithm: None,
            };
            out.push((f.name.clone(), info));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{call_started, config, write_files};
    use super::super::*;
    use super::{split_key, FLUSH_DELAY, MIN_FILES};
    use crate::store::failing::{Action, FailingStore, OpKind, Rule, When};
    use crate::store::memory::MemoryStore;
    use std::time::Duration;

    /// A mount that has written `first` files, once the background round's LIST (FLUSH_DELAY after the first
    /// note) has started, with `action` done to it.
    async fn background_round_with(
        action: Action,
        first: usize,
    ) -> (tempfile::TempDir, Arc<FailingStore<MemoryStore>>, Arc<Fs>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingStore::new(MemoryStore::new()));
        let fs = Fs::new(store.clone(), None, config(dir.path(), KeyMode::SseS3)).unwrap();
        write_files(&fs, 0..first).await;
        let lists = store.stats().count(OpKind::List);
        store.add_rule(Rule::new(Some(OpKind::List), When::Nth(1), action));
        call_started(&store, OpKind::List, lists, FLUSH_DELAY * 2).await;
        (dir, store, fs)
    }

    /// The unmount's index write while the background task's is in progress (its LIST is slow): the index left
    /// holds the files of both, not only the background round's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_unmount_waits_for_a_background_index_write_and_keeps_its_files() {
        let first = MIN_FILES + 4;
        // The background round's LIST takes 3 s.
        let (_dir, _store, fs) = background_round_with(Action::Delay(Duration::from_secs(3)), first).await;
        // Files noted after the background round took its notes, then the unmount.
        write_files(&fs, first..first + 5).await;
        fs.flush_dir_indexes().await;
        let index = fs.read_index("vol/").await;
        assert_eq!(index.len(), first + 5, "every file is in the index: {:?}", index.keys());
    }

    /// A background round that panics (here in its LIST) must not leave the indexes unwritten until the
    /// unmount: the next notes start the task again, and their files are indexed in the background.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_background_round_that_panics_does_not_stop_the_next_ones() {
        let (_dir, store, fs) = background_round_with(Action::Panic, MIN_FILES + 4).await;
        assert_eq!(
            store.stats().injected(OpKind::List),
            1,
            "the background round's LIST panicked"
        );
        let second = 100..100 + MIN_FILES + 2;
        write_files(&fs, second.clone()).await;
        let deadline = std::time::Instant::now() + FLUSH_DELAY * 3;
        loop {
            let index = fs.read_index("vol/").await;
            if second.clone().all(|k| index.contains_key(&format!("f{k}"))) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the files written after the panic are indexed in the background: {:?}",
                index.keys()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[test]
    fn keys_split_into_directory_prefix_and_name() {
        assert_eq!(split_key("a/b/c"), ("a/b/", "c"));
        assert_eq!(split_key("c"), ("", "c"));
        assert_eq!(split_key("a/"), ("a/", ""));
    }
}
