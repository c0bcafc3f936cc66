//! Saving in the background: uploads that outlive a failed close, retries, shutdown, and recovery at mount.
//!
//! Every upload runs in a task of its own, one per file at a time ([`Fs::kick`]); `flush`, `fsync` and `close`
//! only ask for the file's current generation and wait for the task to report it saved, for at most
//! `upload_timeout`. When that time runs out they fail with EIO, and nothing else happens to the data: the file
//! keeps its state, stays listed and readable here with its new content, and its journal entry is synced to
//! disk; the task goes on retrying with capped exponential backoff for as long as the mount lives. A conflict
//! (someone else changed the object) ends the task: the data is in the recovery directory.
//!
//! At unmount the daemon keeps trying for [`Fs::shutdown_limit`] at most, then leaves what is still unsaved in
//! the journal, synced, and says so. The next mount of the same volume ([`Fs::recover`]) uploads what the journal
//! holds, conditional on the version the changes were made to (a conflict goes to the recovery directory), and
//! aborts the multipart uploads that the journal says were started and not finished.
use super::codec::{Codec, Version};
use super::inode::{Attr, Kind};
use super::journal::Manifest;
use super::write::{FileState, OpenFile};
use super::{lock, Fs, FsError, FsResult};
use crate::format::{BlockSize, ObjectHeader};
use crate::store::StoreError;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The first retry of a failed upload waits this long; the wait doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The wait before retry number `failures` (1-based), with jitter in its upper half.
fn backoff(failures: u32) -> Duration {
    let exp = RETRY_FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let cap = exp.min(RETRY_MAX);
    cap / 2 + rand::thread_rng().gen_range(Duration::ZERO..=cap / 2)
}

/// What [`Fs::recover`] did with the journal left by an earlier run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Files whose unsaved data is now in S3.
    pub saved: usize,
    /// Files still being retried in the background.
    pub pending: usize,
    /// Files that met a conflict (their data is in the recovery directory).
    pub conflicts: usize,
    /// Multipart uploads aborted.
    pub aborted: usize,
    /// Entries that could not be opened (left in place, named in the log).
    pub broken: usize,
}

impl Fs {
    /// Makes S3 hold what the file holds now, waiting at most `upload_timeout`.
    pub(super) async fn save(&self, file: &Arc<OpenFile>) -> FsResult<()> {
        self.save_gen(file, false).await
    }

    /// `settle`: also wait for the copy that settles a write-behind upload's attributes.
    async fn save_gen(&self, file: &Arc<OpenFile>, settle: bool) -> FsResult<()> {
        let (gen, key) = {
            let st = file.state.lock().await;
            if st.poisoned {
                return Err(FsError::Poisoned);
            }
            // Nothing to save, or only the settling copy of attributes after a write-behind upload: the data is
            // in S3 and the copy follows in the background.
            if !st.unsaved() || (!settle && st.generation == st.settling) {
                return Ok(());
            }
            (st.generation, st.key.clone())
        };
        self.wait_saved(file, gen, &key, self.cfg.upload_timeout).await
    }

    /// Saves until nothing is unsaved: also the round that follows a write-behind upload (its final attributes),
    /// for callers that act on the object itself next (a rename copies it).
    /// A writer that keeps writing keeps it unsaved: after a few rounds, what was saved is what was asked for.
    pub(super) async fn save_all(&self, file: &Arc<OpenFile>) -> FsResult<()> {
        for _ in 0..3 {
            self.save_gen(file, true).await?;
            if !file.state.lock().await.unsaved() {
                break;
            }
        }
        Ok(())
    }

    /// Asks for generation `gen` to be saved and waits for it, for at most `limit`.
    async fn wait_saved(&self, file: &Arc<OpenFile>, gen: u64, key: &str, limit: Duration) -> FsResult<()> {
        let mut rx = file.status.subscribe();
        let asked_at = rx.borrow().attempts;
        file.wanted.fetch_max(gen, Ordering::SeqCst);
        self.kick(file);
        file.wake.notify_one();
        let deadline = Instant::now() + limit;
        loop {
            {
                let s = rx.borrow_and_update();
                if s.saved_gen >= gen {
                    return Ok(());
                }
                if let (Some(e), true, true) = (&s.error, s.permanent, s.attempts > asked_at) {
                    return Err(FsError::Shared(e.clone()));
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(FsError::BadHandle),
                Err(_) => {
                    let cause = rx.borrow().error.as_ref().map(|e| e.to_string());
                    let journal = self.sync_journal(file).await;
                    let cause = cause.unwrap_or_else(|| "the upload is still running".into());
                    log::error!(
                        "{key}: not in S3 after {limit:?} ({cause}); the data is kept in {journal} and the upload is retried in the background"
                    );
                    return Err(FsError::NotSaved {
                        key: key.to_string(),
                        cause,
                    });
                }
            }
        }
    }

    /// Syncs the file's journal entry to disk; returns where it is, for messages.
    async fn sync_journal(&self, file: &OpenFile) -> String {
        let j = file.state.lock().await.journal.clone();
        let Some(j) = j else {
            return "memory (no journal entry)".into();
        };
        let shown = format!("the journal ({}/{}.*)", self.journal.dir().display(), j.id());
        match tokio::task::spawn_blocking(move || j.sync()).await {
            Ok(Ok(())) => shown,
            Ok(Err(e)) => format!("{shown}, which could not be synced: {e}"),
            Err(e) => format!("{shown}, which could not be synced: {e}"),
        }
    }

    /// Starts the file's upload task unless one is running.
    pub(super) fn kick(&self, file: &Arc<OpenFile>) {
        if file.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(fs) = self.me.upgrade() else {
            file.running.store(false, Ordering::SeqCst);
            return;
        };
        let file = file.clone();
        tokio::spawn(async move { fs.upload_loop(file).await });
    }

    /// Uploads until S3 holds the generation asked for, retrying with backoff; ends on a conflict.
    async fn upload_loop(self: Arc<Self>, file: Arc<OpenFile>) {
        let mut failures = 0u32;
        loop {
            let wanted = file.wanted.load(Ordering::SeqCst);
            {
                let st = file.state.lock().await;
                if !st.unsaved() || st.saved_gen >= wanted {
                    break;
                }
            }
            match self.upload_once(&file).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if self.report_failure(&file, e, failures).await {
                        break;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff(failures)) => {}
                        _ = file.wake.notified() => {}
                    }
                }
            }
        }
        file.running.store(false, Ordering::SeqCst);
        let (again, unlinked) = {
            let st = file.state.lock().await;
            (
                st.unsaved() && st.saved_gen < file.wanted.load(Ordering::SeqCst),
                st.unlinked,
            )
        };
        if again {
            self.kick(&file);
            return;
        }
        if unlinked && file.ino == 0 {
            self.drop_journal(&file).await;
        }
        // An unlinked file's journal goes with its last handle (its handles still read from it).
        self.forget_if_saved(&file).await;
    }

    /// Publishes an upload failure to waiters; true if it ends the task (a conflict).
    async fn report_failure(&self, file: &OpenFile, e: FsError, failures: u32) -> bool {
        let conflict = matches!(e, FsError::Conflict { .. });
        let key = file.state.lock().await.key.clone();
        if !conflict && (failures == 1 || failures.is_power_of_two()) {
            log::warn!("{key}: upload failed (attempt {failures}), retrying in the background: {e}");
        }
        let permanent = conflict || !e.is_retryable();
        file.status.send_modify(|s| {
            if !conflict {
                s.error = Some(Arc::new(e));
            }
            s.permanent = permanent;
            s.attempts += 1;
        });
        conflict
    }

    async fn drop_journal(&self, file: &OpenFile) {
        if let Some(j) = file.state.lock().await.journal.take() {
            j.remove();
        }
    }

    /// A saved state nobody holds is forgotten (recovered entries too).
    async fn forget_if_saved(&self, file: &Arc<OpenFile>) {
        if file.ino != 0 {
            self.remove_if_unused(file.ino, file).await;
            return;
        }
        if !file.state.lock().await.unsaved() {
            lock(&self.recovered).retain(|f| !Arc::ptr_eq(f, file));
        }
    }

    /// How long unmount keeps trying to save files before it leaves them in the journal.
    pub fn shutdown_limit(&self) -> Duration {
        self.cfg.upload_timeout.saturating_mul(3)
    }

    /// Saves every file with unsaved data (shutdown: SIGTERM, unmount), for at most [`Self::shutdown_limit`].
    /// Returns how many are left in the journal (or, after a conflict, in the recovery directory).
    pub async fn flush_all(&self) -> usize {
        let mut files: Vec<Arc<OpenFile>> = lock(&self.open_files).values().map(|e| e.file.clone()).collect();
        files.extend(lock(&self.recovered).iter().cloned());
        let deadline = Instant::now() + self.shutdown_limit();
        let mut failed = 0;
        for file in files {
            let (gen, key, unsaved, poisoned) = {
                let st = file.state.lock().await;
                (st.generation, st.key.clone(), st.unsaved(), st.poisoned)
            };
            if poisoned {
                continue;
            }
            if !unsaved {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = self.wait_saved(&file, gen, &key, left).await {
                log::error!("{key}: not saved to S3 at shutdown: {e}");
                failed += 1;
            }
        }
        // The directory indexes are a cache: a few seconds at most, and their failure is only logged.
        let indexes = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(10));
        if tokio::time::timeout(indexes, self.flush_dir_indexes()).await.is_err() {
            log::info!("directory indexes not all written at shutdown; the next long listings HEAD those files");
        }
        failed
    }

    /// Finishes what an earlier run left in the journal. Waits up to `upload_timeout` for the uploads; those
    /// still failing go on in the background.
    pub async fn recover(&self) -> Recovery {
        let mut report = Recovery::default();
        let mut files = Vec::new();
        let swept = self.journal.sweep_orphans();
        if swept > 0 {
            log::info!("journal: removed {swept} entries of files unlinked while open in an earlier run");
        }
        for (id, m) in self.journal.entries() {
            // Reopening takes the entry's lock: uploads are aborted only for entries no running daemon owns.
            match self.reopen_entry(&id, m.clone()).await {
                Ok(file) => {
                    report.aborted += self.abort_left_uploads(&m).await;
                    files.push(file);
                }
                Err(FsError::Local(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    log::info!("journal entry {id} belongs to a daemon that is still running; left to it");
                }
                Err(e) => {
                    log::error!("journal entry {id}: cannot be recovered now, left in place: {e}");
                    report.broken += 1;
                }
            }
        }
        if !files.is_empty() {
            log::info!("recovering {} file(s) with unsaved data from the journal", files.len());
        }
        let waits = files.iter().map(|f| async move {
            let key = f.state.lock().await.key.clone();
            (f, self.wait_saved(f, 1, &key, self.cfg.upload_timeout).await)
        });
        for (f, r) in futures::future::join_all(waits).await {
            let key = f.state.lock().await.key.clone();
            match r {
                Ok(()) => {
                    log::info!("{key}: unsaved data from an earlier run is now in S3");
                    report.saved += 1;
                }
                Err(FsError::Shared(e)) if matches!(*e, FsError::Conflict { .. }) => report.conflicts += 1,
                Err(e) => {
                    log::warn!("{key}: unsaved data from an earlier run is not in S3 yet ({e}); still retrying");
                    report.pending += 1;
                    lock(&self.recovered).push(f.clone());
                }
            }
        }
        report
    }

    /// Aborts the multipart uploads an earlier run left for this entry's key: the one its manifest records, and
    /// any other pending one for the same key (a crash can fall between CreateMultipartUpload and the record).
    /// Returns how many were aborted.
    async fn abort_left_uploads(&self, m: &Manifest) -> usize {
        let mut ids: Vec<String> = m.multipart.iter().cloned().collect();
        match self.store.list_multipart_uploads(&m.key).await {
            Ok(found) => ids.extend(found.into_iter().filter(|(k, _)| *k == m.key).map(|(_, id)| id)),
            Err(e) => log::warn!("{}: listing multipart uploads left by an earlier run: {e}", m.key),
        }
        ids.sort();
        ids.dedup();
        let mut aborted = 0;
        for upload_id in ids {
            match self.store.abort_multipart(&m.key, &upload_id).await {
                Ok(()) => aborted += 1,
                Err(StoreError::NotFound(_)) => {}
                Err(e) => log::warn!("{}: aborting the multipart upload left by an earlier run: {e}", m.key),
            }
        }
        aborted
    }

    /// Rebuilds a file's state from its journal entry.
    async fn reopen_entry(&self, id: &str, m: Manifest) -> FsResult<Arc<OpenFile>> {
        let header = ObjectHeader::from_metadata(&m.header).map_err(|source| FsError::Format {
            key: m.key.clone(),
            source,
        })?;
        let bs = BlockSize::new(m.block_size as u32).ok_or_else(|| {
            FsError::Local(std::io::Error::other(format!(
                "journal entry {id}: bad block size {} in its manifest",
                m.block_size
            )))
        })?;
        let codec = match (&header, &self.keys) {
            (Some(h), Some(keys)) => Arc::new(Codec::Sealed {
                bs: h.block_size,
                cipher: Box::new(keys.open_file(h).await?),
            }),
            (Some(_), None) => return Err(FsError::Plaintext(m.key.clone())),
            (None, _) => Arc::new(Codec::Plain { bs }),
        };
        let file_cipher = match codec.as_ref() {
            Codec::Sealed { cipher, .. } => Some((**cipher).clone()),
            Codec::Plain { .. } => None,
        };
        let journal = Arc::new(self.journal.reopen(id, &m, file_cipher)?);
        let size = journal.recorded_size(&m)?;
        let j = journal.clone();
        let n = codec.block_count(size);
        let dirty: BTreeSet<u64> = tokio::task::spawn_blocking(move || j.scan(n))
            .await
            .map_err(|e| FsError::Local(std::io::Error::other(e)))??
            .into_iter()
            .collect();
        let mut base = m.base.as_ref().map(|b| {
            Version::new(
                b.etag.clone(),
                b.object_size,
                b.plain_size,
                codec.clone(),
                header.clone(),
            )
        });
        let mut base_valid = m.base_valid.min(size);
        if let Some(adopted) = self.adopt_landed_upload(&m, &codec, &header).await? {
            base_valid = base_valid.min(adopted.plain_size);
            base = Some(adopted);
        }
        // The manifest is written when the entry starts, before the first write lands: content changed if any
        // block is dirty or the size moved off the base, whatever it says.
        let modified = m.modified
            || !dirty.is_empty()
            || base
                .as_ref()
                .is_none_or(|b| b.plain_size != size || base_valid < b.plain_size);
        let st = FileState {
            key: m.key.clone(),
            base,
            base_valid,
            size,
            bs,
            codec,
            header,
            dirty,
            cache: BTreeMap::new(),
            journal: Some(journal),
            generation: 1,
            content_gen: u64::from(modified),
            saved_gen: 0,
            min_cut: u64::MAX,
            attr: Attr {
                ino: 0,
                kind: Kind::File,
                size,
                perm: m.perm,
                uid: m.uid,
                gid: m.gid,
                mtime: m.mtime,
                atime: m.atime,
                ctime: m.ctime,
                unlinked: false,
            },
            xattr: m.xattr.clone(),
            upload_token: None,
            multipart: None,
            wb: None,
            unlinked: false,
            poisoned: false,
            settling: 0,
        };
        Ok(OpenFile::new(0, st))
    }

    /// If the upload recorded in the manifest reached S3 before the crash (the object carries its token), that
    /// object is the version the journal's changes now apply to.
    async fn adopt_landed_upload(
        &self,
        m: &Manifest,
        codec: &Arc<Codec>,
        header: &Option<ObjectHeader>,
    ) -> FsResult<Option<Version>> {
        let Some(token) = &m.upload_token else { return Ok(None) };
        match self.store.head(&m.key).await {
            Ok(info) if info.metadata.get(super::journal::META_UPLOAD_TOKEN) == Some(token) => {
                let plain = codec.plain_size(info.size).map_err(|source| FsError::Format {
                    key: m.key.clone(),
                    source,
                })?;
                log::info!("{}: the upload in flight at the crash had reached S3", m.key);
                Ok(Some(Version::new(
                    info.etag,
                    info.size,
                    plain,
                    codec.clone(),
                    header.clone(),
                )))
            }
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
