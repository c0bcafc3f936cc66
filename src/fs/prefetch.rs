//! Attributes for long listings, fetched ahead.
//!
//! A listing gives names, sizes and S3's times, but a file's mode, owner and own times live in its object's
//! metadata, which only a HEAD returns. `ls -l` reads a directory and then looks up every name in turn; one HEAD
//! at a time, that is N round trips in a row. So when the kernel looks up a name in a directory this mount has
//! just listed, that is taken as the sign of a long listing: the directory's other files are HEADed in the
//! background, [`PARALLELISM`] at a time, in listing order, and the lookups that follow find their answer ready
//! (or wait for the HEAD already in flight) instead of asking again. `ls` and `find -type f` never look names up,
//! so they cost only the listing (the entry types come from it).
//!
//! A directory of at least [`dirindex::MIN_FILES`] files first has its attribute index read (one GET, see
//! `dirindex.rs`): the files whose listing entry it still matches are answered from it, and only the others are
//! HEADed. Lookups wait for that GET rather than send HEADs of their own. What the HEADs see is noted for the
//! directory's next index. The kernel's first READDIRPLUS of a directory reads the index too (without HEADs), so
//! that reply can carry the attributes of the files it answers for ([`Fs::known_entry`]).
//!
//! Memory stays bounded whatever the directory holds: the names of at most [`RECENT_LISTINGS`] listings, at most
//! [`MAX_NAMES`] of each, and at most [`READY_CAP`] answers waiting for their lookup (an LRU: an answer nobody
//! takes is dropped, and its lookup asks S3 itself). Answers are used within the metadata TTL, and past it only
//! while a stream of their directory opened before them is being read, for at most [`STREAM_ANSWER_MAX`]: the
//! names of a long listing read for longer than the TTL come with attributes of the same moment (see
//! [`Fs::answer_fresh`]). Open streams are held by handle, one entry each, until releasedir.
//!
//! The marks that make lookups wait (an index being read, a HEAD in flight) are [`Mark`]s: dropped however the
//! work behind them ends, a panic in it (in the store's client, say) included, so none is left behind to keep
//! a name from being fetched ahead again.
use super::dirindex::{self, Listed};
use super::{lock, Fs};
use crate::store::{ObjectInfo, StoreError};
use futures::stream::{self, StreamExt};
use lru::LruCache;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// HEADs in flight for one directory's prefetch.
pub const PARALLELISM: usize = 32;
/// Directories whose listing is remembered for a prefetch.
const RECENT_LISTINGS: usize = 4;
/// Names remembered per listing.
const MAX_NAMES: usize = 65_536;
/// Answers waiting for their lookup.
const READY_CAP: usize = 65_536;
/// The oldest answer sent for a directory whose stream is still being read (see [`Fs::answer_fresh`]).
const STREAM_ANSWER_MAX: Duration = Duration::from_secs(60);

type Name = (u64, String);

/// What lookups wait on, by key (see [`Mark`]).
type Marks<K> = Mutex<HashMap<K, watch::Receiver<bool>>>;

struct Listing {
    dir: u64,
    at: Instant,
    files: Vec<Listed>,
    /// The directory's attribute index was read for this listing already (by a READDIRPLUS).
    index_read: bool,
    /// The names that index answered for: never HEADed by the prefetch, even once their answer is taken.
    indexed: HashSet<String>,
}

pub struct Prefetcher {
    listings: Mutex<VecDeque<Listing>>,
    ready: Mutex<LruCache<Name, (ObjectInfo, Instant)>>,
    /// Names whose HEAD is in flight: a lookup waits for it rather than sending its own.
    inflight: Arc<Marks<Name>>,
    /// Directories whose attribute index is being read: their lookups wait for it.
    loading: Arc<Marks<u64>>,
    /// Open directory streams (by handle): the directory and when the listing they read was made.
    streams: Mutex<HashMap<u64, (u64, Instant)>>,
}

impl Default for Prefetcher {
    fn default() -> Self {
        Prefetcher {
            listings: Mutex::new(VecDeque::new()),
            ready: Mutex::new(LruCache::new(NonZeroUsize::new(READY_CAP).expect("non-zero"))),
            inflight: Arc::default(),
            loading: Arc::default(),
            streams: Mutex::new(HashMap::new()),
        }
    }
}

impl Fs {
    /// Directory stream `fh` reads the listing of `dir` made at `listed` (see [`answer_fresh`](Self::answer_fresh)).
    pub(super) fn stream_opened(&self, fh: u64, dir: u64, listed: Instant) {
        lock(&self.prefetch.streams).insert(fh, (dir, listed));
    }

    /// Directory stream `fh` is closed (releasedir).
    pub fn stream_closed(&self, fh: u64) {
        lock(&self.prefetch.streams).remove(&fh);
    }

    /// Whether an answer about a file of `parent` obtained at `at` (from the directory's index, checked against a
    /// listing, or from a HEAD) may still be given. Within `metadata_ttl`, always. Past it, only while a stream of
    /// `parent` opened on a listing made no later than `at` is still open, and for at most
    /// [`STREAM_ANSWER_MAX`]: the stream's names are as old as that listing, and the answer is as new as they
    /// are, so a long listing that takes longer than the TTL to read (`ls -l` of 10,000 files takes seconds)
    /// gets names and attributes of one moment instead of a HEAD per file for the rest of it.
    fn answer_fresh(&self, parent: u64, at: Instant) -> bool {
        let (ttl, age) = (self.cfg.metadata_ttl, at.elapsed());
        if ttl.is_zero() {
            return false;
        }
        if age < ttl {
            return true;
        }
        age < STREAM_ANSWER_MAX
            && lock(&self.prefetch.streams)
                .values()
                .any(|(dir, listed)| *dir == parent && *listed <= at)
    }

    /// Remembers the files a listing of `dir`, made at `at`, showed (the candidates of a later prefetch).
    pub(super) fn note_listing(&self, dir: u64, mut files: Vec<Listed>, at: Instant) {
        if self.cfg.metadata_ttl.is_zero() {
            return;
        }
        files.truncate(MAX_NAMES);
        let mut l = lock(&self.prefetch.listings);
        l.retain(|x| x.dir != dir);
        if l.len() >= RECENT_LISTINGS {
            l.pop_front();
        }
        l.push_back(Listing {
            dir,
            at,
            files,
            index_read: false,
            indexed: HashSet::new(),
        });
    }

    /// What a prefetch learned about `name` in `parent`, waiting for its HEAD if one is in flight. `None`: ask S3.
    pub(super) async fn prefetched(&self, parent: u64, name: &str) -> Option<ObjectInfo> {
        let key = (parent, name.to_string());
        let loading = lock(&self.prefetch.loading).get(&parent).cloned();
        if let Some(mut rx) = loading {
            let _ = rx.wait_for(|done| *done).await;
        }
        let waiting = lock(&self.prefetch.inflight).get(&key).cloned();
        if let Some(mut rx) = waiting {
            let _ = rx.wait_for(|done| *done).await;
        }
        let (info, at) = lock(&self.prefetch.ready).pop(&key)?;
        let fresh = self.answer_fresh(parent, at);
        if fresh {
            self.counters.lookup_prefetched();
        }
        fresh.then_some(info)
    }

    /// `name` in `parent` is being looked up: if `parent` was listed within the metadata TTL and not prefetched
    /// since, HEAD its other files in the background (the lookup asks about `name` itself, unless the index
    /// answers it).
    pub(super) fn start_prefetch(&self, parent: u64, name: &str) {
        let (files, index_read, mut skip) = {
            let mut l = lock(&self.prefetch.listings);
            let Some(i) = l.iter().position(|x| x.dir == parent) else {
                return;
            };
            let listing = l.remove(i).expect("index from position");
            if listing.at.elapsed() >= self.cfg.metadata_ttl || listing.files.len() < 2 {
                return;
            }
            (listing.files, listing.index_read, listing.indexed)
        };
        let (Some(me), Ok(dir)) = (self.me.upgrade(), self.dir_path(parent)) else {
            return;
        };
        let loading = (files.len() >= dirindex::MIN_FILES && !index_read).then(|| self.loading(parent));
        let looked_up = name.to_string();
        tokio::spawn(async move {
            if let Some(mark) = loading {
                skip.extend(me.fill_from_index(parent, &dir, &files).await);
                drop(mark);
            }
            // The index's answers are waiting for their lookups; a HEAD of one whose answer a lookup has just
            // taken, and not yet put in the inode table, would ask again for nothing.
            let names = files.into_iter().map(|f| f.name);
            stream::iter(names.filter(|n| *n != looked_up && !skip.contains(n)))
                .for_each_concurrent(PARALLELISM, |name| {
                    let me = me.clone();
                    let dir = dir.clone();
                    async move { me.prefetch_one(parent, &dir, name).await }
                })
                .await;
        });
    }

    /// Reads the attribute index of `parent` into the answers waiting for lookups, if `parent` was listed within
    /// the metadata TTL, has enough files for an index, and its index was not read for that listing yet. Sends
    /// no HEAD. For READDIRPLUS, whose first reply of a directory the kernel always asks for: `find` and `ls`
    /// get one GET per large directory, and `ls -l` its entries' attributes with the listing.
    pub async fn read_listed_index(&self, parent: u64) {
        let files = {
            let mut l = lock(&self.prefetch.listings);
            let Some(x) = l.iter_mut().find(|x| x.dir == parent) else {
                return;
            };
            if x.index_read || x.at.elapsed() >= self.cfg.metadata_ttl || x.files.len() < dirindex::MIN_FILES {
                return;
            }
            x.index_read = true;
            x.files.clone()
        };
        let Ok(dir) = self.dir_path(parent) else { return };
        let mark = self.loading(parent);
        let found = self.fill_from_index(parent, &dir, &files).await;
        if let Some(x) = lock(&self.prefetch.listings).iter_mut().find(|x| x.dir == parent) {
            x.indexed = found.into_iter().collect();
        }
        drop(mark);
    }

    /// `name` in `parent` was removed or replaced here: an answer fetched ahead for it is out of date.
    pub(super) fn forget_prefetched(&self, parent: u64, name: &str) {
        lock(&self.prefetch.ready).pop(&(parent, name.to_string()));
    }

    /// Marks `parent`'s index as being read: its lookups wait until the mark is dropped.
    fn loading(&self, parent: u64) -> Mark<u64> {
        Mark::new(&self.prefetch.loading, parent)
    }

    /// Puts what the index of directory `parent` (at `dir`) still says about `files` among the waiting answers.
    /// Returns the names it answered for.
    async fn fill_from_index(&self, parent: u64, dir: &str, files: &[Listed]) -> Vec<String> {
        let found = self.indexed(&self.dir_prefix(dir), files).await;
        self.counters.lookups_indexed(found.len() as u64);
        let now = Instant::now();
        let mut names = Vec::with_capacity(found.len());
        let mut ready = lock(&self.prefetch.ready);
        for (name, info) in found {
            names.push(name.clone());
            ready.put((parent, name), (info, now));
        }
        names
    }

    /// The attributes of `name` in `parent` if they are known without asking S3 (fresh in the inode table, or a
    /// waiting prefetch answer), counting one kernel lookup reference to the inode (a READDIRPLUS entry is a
    /// lookup). `None` for an open file (its attributes come from its open state) and for anything unknown.
    pub fn known_entry(&self, parent: u64, name: &str) -> Option<super::Attr> {
        let child = {
            let t = lock(&self.inodes);
            t.child(parent, name).map(|c| {
                (
                    c.ino,
                    c.open_count > 0 || c.pending,
                    t.is_fresh(c.ino, self.cfg.metadata_ttl),
                )
            })
        };
        if let Some((ino, busy, fresh)) = child {
            // An open or unsaved file's attributes are in its open state, which may be ahead of the table.
            if busy || lock(&self.open_files).contains_key(&ino) {
                return None;
            }
            if fresh {
                let mut t = lock(&self.inodes);
                let n = t.get_mut(ino)?;
                n.lookups += 1;
                self.counters.entry_plus();
                return Some(n.attr.clone());
            }
        }
        // The answer stays for a later lookup: an entry that does not fit the reply is taken back (and its
        // inode dropped), and the kernel's next request starts with it.
        let key = (parent, name.to_string());
        let info = match lock(&self.prefetch.ready).peek(&key) {
            Some((info, at)) if self.answer_fresh(parent, *at) => info.clone(),
            _ => return None,
        };
        let attr = self.record_object(parent, name, info).ok()?;
        self.counters.entry_plus();
        Some(attr)
    }

    async fn prefetch_one(self: &Arc<Self>, parent: u64, dir: &str, name: String) {
        let key = (parent, name);
        let known = {
            let t = lock(&self.inodes);
            t.child(parent, &key.1)
                .is_some_and(|c| c.pending || c.open_count > 0 || t.is_fresh(c.ino, self.cfg.metadata_ttl))
        };
        if known || lock(&self.prefetch.ready).contains(&key) {
            return;
        }
        let Some(_mark) = Mark::unless_marked(&self.prefetch.inflight, key.clone()) else {
            return;
        };
        let object = self.key_of(&super::inode::join(dir, &key.1));
        match self.store.head(&object).await {
            Ok(info) => {
                self.index_note_head(&info);
                lock(&self.prefetch.ready).put(key.clone(), (info, Instant::now()));
            }
            Err(StoreError::NotFound(_)) => lock(&self.inodes).note_missing(parent, &key.1),
            // The lookup asks again and reports its own error.
            Err(e) => log::debug!("prefetching the attributes of {object}: {e}"),
        }
    }
}

/// A mark that lookups of `key` wait on (see [`Prefetcher`]'s `loading` and `inflight`): set when made, taken
/// away and its waiters woken when dropped, whether the work it marks finished, failed, panicked or was
/// cancelled. A mark set again for the same key meanwhile is left alone.
pub(super) struct Mark<K: Eq + Hash> {
    marks: Arc<Marks<K>>,
    key: K,
    tx: watch::Sender<bool>,
}

impl<K: Eq + Hash + Clone> Mark<K> {
    /// Sets the mark for `key`, in place of any set before.
    fn new(marks: &Arc<Marks<K>>, key: K) -> Self {
        let (tx, rx) = watch::channel(false);
        lock(marks).insert(key.clone(), rx);
        Mark {
            marks: marks.clone(),
            key,
            tx,
        }
    }

    /// Sets the mark for `key` unless one is set already (checked and set under one lock).
    fn unless_marked(marks: &Arc<Marks<K>>, key: K) -> Option<Self> {
        let (tx, rx) = watch::channel(false);
        match lock(marks).entry(key.clone()) {
            Entry::Occupied(_) => return None,
            Entry::Vacant(v) => v.insert(rx),
        };
        Some(Mark {
            marks: marks.clone(),
            key,
            tx,
        })
    }
}

impl<K: Eq + Hash> Drop for Mark<K> {
    fn drop(&mut self) {
        let mut marks = lock(&self.marks);
        if marks
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            marks.remove(&self.key);
        }
        drop(marks);
        let _ = self.tx.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{config, write_files};
    use super::super::*;
    use crate::store::failing::{Action, FailingStore, OpKind, Rule, When};
    use crate::store::memory::MemoryStore;
    use std::time::Duration;

    /// `files` files written (and their directory's index, if they are enough for one) by one mount of a
    /// volume, then the root listed by another mount, which knows nothing else yet: its next lookup starts a
    /// prefetch.
    async fn listed_by_another_mount(
        files: usize,
    ) -> (
        (tempfile::TempDir, tempfile::TempDir),
        Arc<FailingStore<MemoryStore>>,
        Arc<Fs>,
    ) {
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store = Arc::new(FailingStore::new(MemoryStore::new()));
        let first = Fs::new(store.clone(), None, config(dirs.0.path(), KeyMode::SseS3)).unwrap();
        write_files(&first, 0..files).await;
        first.flush_dir_indexes().await;
        drop(first);
        let fs = Fs::new(store.clone(), None, config(dirs.1.path(), KeyMode::SseS3)).unwrap();
        assert_eq!(fs.opendir(ROOT_INO, 1).await.unwrap().len(), files, "the listing");
        (dirs, store, fs)
    }

    /// The GET of a directory's index, made by the prefetch that a lookup after a listing starts, panics: the
    /// lookup is still answered (by its own HEAD), and the mark that made the directory's lookups wait for the
    /// index is taken away with the task, not left behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prefetch_that_panics_leaves_no_mark_behind() {
        let (_dirs, store, fs) = listed_by_another_mount(dirindex::MIN_FILES + 2).await;
        store.add_rule(Rule::new(Some(OpKind::Get), When::Nth(1), Action::Panic));
        let attr = fs.lookup(ROOT_INO, "f0").await.unwrap();
        assert_eq!(attr.size, 100);
        assert_eq!(store.stats().injected(OpKind::Get), 1, "the index's GET panicked");
        assert!(
            eventually(|| lock(&fs.prefetch.loading).is_empty()).await,
            "the directory is still marked as having its index read"
        );
    }

    /// Waits until `f` holds, for at most 5 s; whether it held.
    async fn eventually(f: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !f() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        f()
    }

    /// A HEAD sent ahead by the prefetch panics: the name is not left marked as in flight (which would keep it
    /// from being fetched ahead again), and its own lookup is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prefetch_head_that_panics_leaves_no_mark_behind() {
        // Too few files for an index: the lookup of f0 after the listing HEADs f1 and f2 ahead.
        let (_dirs, store, fs) = listed_by_another_mount(3).await;
        store.add_rule(Rule::new(Some(OpKind::Head), When::Nth(1), Action::Panic).key_contains("f1"));
        fs.lookup(ROOT_INO, "f0").await.unwrap();
        assert!(
            eventually(|| store.stats().injected(OpKind::Head) == 1).await,
            "the HEAD of f1 panicked"
        );
        assert!(
            eventually(|| lock(&fs.prefetch.inflight).is_empty()).await,
            "a HEAD is left marked as in flight: {:?}",
            lock(&fs.prefetch.inflight).keys().collect::<Vec<_>>()
        );
        assert_eq!(fs.lookup(ROOT_INO, "f1").await.unwrap().size, 100);
    }
}
