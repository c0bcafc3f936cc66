//! Saving in the background: uploads that outlive a failed close, retries, shutdown, and recovery at mount.
//!
//! Every upload runs in a task of its own, one per file at a time ([`Fs::kick`]); `flush`, `fsync` and `close`
//! only ask for the file's current generation and wait for the task to report it saved, for as long as the upload
//! keeps going: `upload_timeout` from the request or from the last part that went up (a completion in flight gets
//! more, by its parts). A large file on a slow link is waited for; a stalled upload or an outage ends the wait
//! `upload_timeout` after the last progress. Then they fail with EIO, and nothing else happens to the data: the file
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
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The first retry of a failed upload waits this long; the wait doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What a waiter adds to `upload_timeout` for each part of a completion in flight: S3 assembles the object before
/// it answers (LocalStack here took about 0.9 s for 1 GiB and 22 s for 10 GiB, 17 ms per part of 8 MiB). A stalled
/// completion of 10 GiB then holds close() for about a minute before EIO.
pub const COMPLETE_WAIT_PER_PART: Duration = Duration::from_millis(40);

/// The wait before retry number `failures` (1-based), with jitter in its upper half.
fn backoff(failures: u32) -> Duration {
    let exp = RETRY_FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let cap = exp.min(RETRY_MAX);
    cap / 2 + rand::thread_rng().gen_range(Duration::ZERO..=cap / 2)
}

/// What [`Fs::flush_all`] left in the journal at shutdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unsaved {
    /// Files whose data is not in S3.
    pub data: usize,
    /// Files whose data is in S3 but whose final attributes are not (a metadata copy of the object).
    pub attributes: usize,
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
    /// Makes S3 hold what the file holds now, waiting while the upload keeps going (see [`Self::wait_saved`]).
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
            if !st.unsaved() || (!settle && st.generation == st.settling && !st.modified()) {
                return Ok(());
            }
            (st.generation, st.key.clone())
        };
        self.wait_saved(file, gen, &key, self.cfg.upload_timeout, None).await
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

    /// Asks for generation `gen` to be saved and waits for it while the upload keeps going: at most `limit` from
    /// the request or from the last part that went up, and while a completion is in flight, `limit` plus
    /// [`COMPLETE_WAIT_PER_PART`] for each of its parts from its start; never past `until`.
    async fn wait_saved(
        &self,
        file: &Arc<OpenFile>,
        gen: u64,
        key: &str,
        limit: Duration,
        until: Option<Instant>,
    ) -> FsResult<()> {
        let mut rx = file.status.subscribe();
        let (asked_at, mut parts_seen, mut completing) = {
            let s = rx.borrow();
            (s.attempts, s.parts_sent, s.completing)
        };
        file.wanted.fetch_max(gen, Ordering::SeqCst);
        self.kick(file);
        file.wake.notify_one();
        let cap = |t: Instant| until.map_or(t, |u| t.min(u));
        let mut deadline = cap(Instant::now() + limit + COMPLETE_WAIT_PER_PART * completing);
        loop {
            {
                let s = rx.borrow_and_update();
                if s.saved_gen >= gen {
                    return Ok(());
                }
                if let (Some(e), true, true) = (&s.error, s.permanent, s.attempts > asked_at) {
                    return Err(FsError::Shared(e.clone()));
                }
                // Progress: a part went up, or a completion started (S3 joins its parts before it answers).
                let started = s.completing > 0 && s.completing != completing;
                if s.parts_sent != parts_seen || started {
                    deadline = cap(Instant::now() + limit + COMPLETE_WAIT_PER_PART * s.completing);
                }
                (parts_seen, completing) = (s.parts_sent, s.completing);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(FsError::BadHandle),
                Err(_) => {
                    let cause = rx.borrow().error.as_ref().map(|e| e.to_string());
                    let journal = self.sync_journal(file).await;
                    let cause = cause.unwrap_or_else(|| "the upload is still running".into());
                    let waited = match until {
                        Some(u) if deadline >= u => "by the end of the wait".to_string(),
                        _ => format!("and no part of it went up for {limit:?}"),
                    };
                    if file.state.lock().await.modified() {
                        log::error!(
                            "{key}: not in S3 {waited} ({cause}); the data is kept in {journal} and the upload is retried in the background"
                        );
                    } else {
                        log::error!(
                            "{key}: the data is in S3, but its new attributes are not yet ({cause}); they are kept in {journal} and the metadata copy is retried in the background"
                        );
                    }
                    return Err(FsError::NotSaved {
                        key: key.to_string(),
                        cause,
                    });
                }
            }
        }
    }

    /// Where a file's journal entry is, for messages.
    fn journal_shown(&self, j: &super::journal::Journal) -> String {
        format!("the journal ({}/{}.*)", self.journal.dir().display(), j.id())
    }

    /// Syncs the file's journal entry to disk; returns where it is, for messages.
    async fn sync_journal(&self, file: &OpenFile) -> String {
        let j = file.state.lock().await.journal.clone();
        let Some(j) = j else {
            return "memory (no journal entry)".into();
        };
        let shown = self.journal_shown(&j);
        match tokio::task::spawn_blocking(move || j.sync()).await {
            Ok(Ok(())) => shown,
            Ok(Err(e)) => format!("{shown}, which could not be synced: {e}"),
            Err(e) => format!("{shown}, which could not be synced: {e}"),
        }
    }

    /// Starts the file's upload task unless one is running. The task is watched: if it panics (a bug, perhaps in
    /// a library below), its waiters see a failed attempt and it is started again after a backoff, as after a
    /// failed upload; otherwise `running` would stay set and no upload of the file would run for the rest of the
    /// mount.
    pub(super) fn kick(&self, file: &Arc<OpenFile>) {
        if file.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(fs) = self.me.upgrade() else {
            file.running.store(false, Ordering::SeqCst);
            return;
        };
        let file = file.clone();
        let upload = fs.clone().upload_loop(file.clone());
        // The watcher, not the loop, ends the task's turn (`running`), so a panic anywhere in the loop is seen
        // while `running` is still held for it, and two loops of one file never run at once.
        super::spawn_watched(upload, move |panicked| async move {
            if panicked {
                fs.upload_panicked(file).await
            } else {
                fs.upload_ended(file).await
            }
        });
    }

    /// After the file's upload task panicked: tells the waiters, waits out a backoff (or until someone asks for a
    /// save) and starts the task again. `running` stays set meanwhile, so nothing else starts it sooner.
    async fn upload_panicked(&self, file: Arc<OpenFile>) {
        let panics = file.panics.fetch_add(1, Ordering::SeqCst) + 1;
        let wait = backoff(panics);
        let (key, kept) = {
            let st = file.state.lock().await;
            let kept = st.journal.as_ref().map_or("memory".into(), |j| self.journal_shown(j));
            (st.key.clone(), kept)
        };
        log::error!(
            "{key}: the upload task panicked (time {panics} in a row); the data stays in {kept} and the upload starts again in {wait:?}"
        );
        file.status.send_modify(|s| {
            s.error = Some(Arc::new(FsError::Panicked("the upload task".into())));
            s.permanent = false;
            s.attempts += 1;
            s.completing = 0;
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = file.wake.notified() => {}
        }
        file.running.store(false, Ordering::SeqCst);
        self.kick(&file);
    }

    /// Uploads until S3 holds the generation asked for, retrying with backoff; ends on a conflict. Runs under
    /// [`Self::kick`]'s watch, which ends its turn.
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
    }

    /// After the file's upload loop ended: lets the next one start, starts it if a save was asked for meanwhile,
    /// and otherwise forgets what is saved.
    async fn upload_ended(&self, file: Arc<OpenFile>) {
        file.panics.store(0, Ordering::SeqCst);
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
        if unlinked {
            // Nothing more is uploaded for it: a multipart upload an earlier attempt left goes now.
            if let Err(e) = self.abort_stale_multipart(&file).await {
                log::warn!("aborting the multipart upload left by an earlier attempt (the next mount aborts it): {e}");
            }
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
    /// Returns what is left in the journal (or, after a conflict, in the recovery directory).
    pub async fn flush_all(&self) -> Unsaved {
        let mut files: Vec<Arc<OpenFile>> = lock(&self.open_files).values().map(|e| e.file.clone()).collect();
        files.extend(lock(&self.recovered).iter().cloned());
        let deadline = Instant::now() + self.shutdown_limit();
        let mut failed = Unsaved::default();
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
            if let Err(e) = self.wait_saved(&file, gen, &key, left, Some(deadline)).await {
                if file.state.lock().await.modified() {
                    log::error!("{key}: not saved to S3 at shutdown: {e}");
                    failed.data += 1;
                } else {
                    // The data is in S3; what is left is a metadata copy of the object (its final mode or times,
                    // e.g. after a write-behind upload), which takes a while for a large object.
                    log::error!(
                        "{key}: its data is in S3, but its final attributes (mode, owner, times) are not yet: they \
                         are kept in the journal and the next mount of this volume applies them"
                    );
                    failed.attributes += 1;
                }
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
        // The mount answers after this: a long upload goes on in the background.
        let until = Instant::now() + self.cfg.upload_timeout;
        let waits = files.iter().map(|f| async move {
            let key = f.state.lock().await.key.clone();
            (
                f,
                self.wait_saved(f, 1, &key, self.cfg.upload_timeout, Some(until)).await,
            )
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

    /// Aborts the multipart uploads an earlier run left for this entry: the one its manifest records (under the
    /// key it was created under, which a rename may have changed since), and any other pending one for the
    /// entry's key (a crash can fall between CreateMultipartUpload and the record). Returns how many were aborted.
    async fn abort_left_uploads(&self, m: &Manifest) -> usize {
        let mut uploads: Vec<(String, String)> = m.multipart.iter().map(|u| (u.key.clone(), u.id.clone())).collect();
        match self.store.list_multipart_uploads(&m.key).await {
            Ok(found) => uploads.extend(found.into_iter().filter(|(k, _)| *k == m.key)),
            Err(e) => log::warn!("{}: listing multipart uploads left by an earlier run: {e}", m.key),
        }
        uploads.sort();
        uploads.dedup();
        let mut aborted = 0;
        for (key, upload_id) in uploads {
            match self.store.abort_multipart(&key, &upload_id).await {
                Ok(()) => aborted += 1,
                Err(StoreError::NotFound(_)) => {}
                Err(e) => log::warn!("{key}: aborting the multipart upload left by an earlier run: {e}"),
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
        let shown = m.key.clone();
        let dirty: BTreeSet<u64> = tokio::task::spawn_blocking(move || j.scan(n, &shown))
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
            cache: self.write_cache(),
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
            // Attempts of the run before may still land after this mount's HEAD (`adopt_landed_upload`): they are
            // this file's own versions for the rounds to come too.
            earlier_tokens: {
                let mut t: Vec<String> = m.earlier_tokens.iter().chain(&m.upload_token).cloned().collect();
                super::journal::keep_newest(&mut t);
                t
            },
            multipart: None,
            wb: None,
            behind_off: false,
            unlinked: false,
            poisoned: false,
            settling: 0,
        };
        Ok(OpenFile::new(0, st))
    }

    /// If the upload recorded in the manifest, or an earlier attempt it remembers, reached S3 before the crash (the
    /// object carries its token), that object is the version the journal's changes now apply to.
    async fn adopt_landed_upload(
        &self,
        m: &Manifest,
        codec: &Arc<Codec>,
        header: &Option<ObjectHeader>,
    ) -> FsResult<Option<Version>> {
        if m.upload_token.is_none() && m.earlier_tokens.is_empty() {
            return Ok(None);
        }
        let ours = |t: &String| m.upload_token.as_ref() == Some(t) || m.earlier_tokens.contains(t);
        match self.store.head(&m.key).await {
            Ok(info) if info.metadata.get(super::journal::META_UPLOAD_TOKEN).is_some_and(ours) => {
                let v = super::version_with(&info, codec.clone(), header.clone())?;
                log::info!("{}: the upload in flight at the crash had reached S3", m.key);
                Ok(Some(v))
            }
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}
