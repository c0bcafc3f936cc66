//! The core without FUSE, over the in-memory store and the fault-injecting wrapper: fast checks of what the
//! FUSE tests cannot easily force (failed uploads, memory bounds, spilling).
use super::*;
use crate::keys::{KeyStats, LocalProvider};
use crate::store::failing::{Action, FailingStore, FaultKind, OpKind, Rule, When};
use crate::store::memory::MemoryStore;
use std::time::Duration;

pub(super) fn config(dir: &std::path::Path, mode: KeyMode) -> FsConfig {
    FsConfig {
        bucket: "b".into(),
        prefix: "vol/".into(),
        key_mode: mode,
        block_size: BlockSize::new(4096).unwrap(),
        uid: 1,
        gid: 1,
        umask: 0o022,
        read_only: false,
        allow_plaintext: false,
        metadata_ttl: Duration::from_secs(1),
        block_cache_bytes: 1 << 20,
        read_ahead_bytes: 64 << 10,
        read_ahead_chunk_bytes: read::CHUNK_BYTES,
        max_dirty_bytes: 64 << 10,
        write_behind: true,
        staging_dir: dir.to_path_buf(),
        recovery_dir: dir.join("recovery"),
        upload_timeout: Duration::from_secs(5),
        max_parts: MAX_PARTS,
        volume_id: "vol".into(),
        journal_key: None,
        copy_max: crate::store::COPY_MAX,
    }
}

pub(super) fn cse_keys() -> CseKeys {
    let stats = Arc::new(KeyStats::new());
    let provider = Arc::new(LocalProvider::new(&[7u8; 32], "test key", stats.clone()));
    CseKeys {
        provider,
        cache: Arc::new(DataKeyCache::new(16, Duration::from_secs(60), stats)),
    }
}

/// Compares contents without printing them: lengths and the first difference.
#[track_caller]
pub(super) fn same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: {} bytes, want {}; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

pub(super) fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// Files `f{k}` for `k` in `names` at the root, 100 bytes each, written and closed (so in the store).
pub(super) async fn write_files(fs: &Fs, names: std::ops::Range<usize>) {
    for k in names {
        let (_, fh) = fs.create(ROOT_INO, &format!("f{k}"), 0o644, 1, 1).await.unwrap();
        fs.write(fh, 0, &data(100, k as u8)).await.unwrap();
        fs.release(fh).await.unwrap();
    }
}

async fn read_all(fs: &Fs, ino: u64) -> Vec<u8> {
    let fh = fs.open(ino, false, false).await.unwrap();
    let mut out = Vec::new();
    loop {
        let chunk = fs.read(fh, out.len() as u64, 50_000).await.unwrap();
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    fs.release(fh).await.unwrap();
    out
}

/// A manifest save made on an async worker under a file's state lock (a chmod through an open handle) must not
/// hold up the worker: with one worker, a task that has to run before the save can finish still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_manifest_save_on_an_async_worker_does_not_hold_it_up() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::new(
        Arc::new(MemoryStore::new()),
        Some(cse_keys()),
        config(dir.path(), KeyMode::CseLocal),
    )
    .unwrap();
    let fs = Arc::new(fs);
    let (attr, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
    fs.write(fh, 0, &data(10_000, 3)).await.unwrap();
    super::journal::gate::close(dir.path());
    let chmod = {
        let fs = fs.clone();
        let change = AttrChange {
            perm: Some(0o600),
            ..AttrChange::default()
        };
        // Spawned: the test's own body does not run on the worker.
        tokio::spawn(async move { fs.setattr(attr.ino, None, change).await })
    };
    // This thread is not a worker: it may block.
    let waiting = super::journal::gate::await_waiter();
    let opener = tokio::spawn(async { super::journal::gate::open() });
    let saved = chmod.await.unwrap();
    let gave_up = super::journal::gate::remove();
    opener.await.unwrap();
    assert!(waiting, "the chmod's manifest save never reached the gate");
    assert_eq!(
        gave_up, 0,
        "the save held the only worker: the task that opens the gate could not run"
    );
    assert_eq!(saved.unwrap().perm, 0o600);
    fs.release(fh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_spill_within_the_memory_bound_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let fs = Fs::new(store.clone(), Some(cse_keys()), config(dir.path(), KeyMode::CseLocal)).unwrap();
    let (attr, fh) = fs.create(ROOT_INO, "big", 0o644, 1, 1).await.unwrap();
    let content = data(3 << 20, 1);
    for (k, piece) in content.chunks(100_000).enumerate() {
        fs.write(fh, (k * 100_000) as u64, piece).await.unwrap();
        let file = fs.open_state(attr.ino).unwrap();
        let st = file.state.lock().await;
        assert!(st.cached_bytes() <= (64 << 10), "cached bytes {}", st.cached_bytes());
    }
    fs.release(fh).await.unwrap();
    assert_eq!(store.stats().count(OpKind::Put), 1, "a 3 MiB file is one PUT");
    assert_eq!(
        store.stats().bytes_up(OpKind::Put),
        crate::format::ciphertext_size(3 << 20, config(dir.path(), KeyMode::CseLocal).block_size)
    );
    assert_eq!(read_all(&fs, attr.ino).await, content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upload_loses_nothing_and_the_next_flush_saves_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let fs = Fs::new(store.clone(), Some(cse_keys()), config(dir.path(), KeyMode::CseLocal)).unwrap();
    let (attr, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
    let content = data(20_000, 2);
    fs.write(fh, 0, &content).await.unwrap();
    store.add_rule(Rule::fail(OpKind::Put, When::Always, FaultKind::AccessDenied));
    let err = fs.flush(fh).await.unwrap_err();
    assert_eq!(err.errno(), libc::EACCES, "{err}");
    assert!(matches!(
        fs.store.head("vol/f").await,
        Err(crate::store::StoreError::NotFound(_))
    ));
    store.clear_rules();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(read_all(&fs, attr.ino).await, content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_keeps_the_losers_data_in_the_recovery_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let keys = cse_keys();
    let a = Fs::new(store.clone(), Some(keys.clone()), config(dir.path(), KeyMode::CseLocal)).unwrap();
    let b = Fs::new(store.clone(), Some(keys), config(dir.path(), KeyMode::CseLocal)).unwrap();
    let (_, fa) = a.create(ROOT_INO, "same", 0o644, 1, 1).await.unwrap();
    let (_, fb) = b.create(ROOT_INO, "same", 0o644, 1, 1).await.unwrap();
    a.write(fa, 0, b"winner").await.unwrap();
    b.write(fb, 0, b"the loser's bytes").await.unwrap();
    a.release(fa).await.unwrap();
    let err = b.flush(fb).await.unwrap_err();
    let FsError::Conflict { recovery, .. } = err.root() else {
        panic!("{err}")
    };
    assert_eq!(std::fs::read(recovery).unwrap(), b"the loser's bytes");
    assert_eq!(
        b.flush(fb).await.unwrap_err().errno(),
        libc::EIO,
        "poisoned until reopened"
    );
    let _ = b.release(fb).await;
    let got = store.get("vol/same", None, None).await.unwrap();
    assert_eq!(got.info.size, 6 + 28, "the winner's object is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_below_the_file_system() {
    use crate::store::retry::{RetryPolicy, Retrying};
    let dir = tempfile::tempdir().unwrap();
    let failing = Arc::new(FailingStore::new(MemoryStore::new()));
    failing.add_rule(Rule::new(
        None,
        When::Probability { p: 0.3, seed: 7 },
        Action::Fail(FaultKind::Transient),
    ));
    let policy = RetryPolicy {
        max_attempts: 20,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    };
    let store = Arc::new(Retrying::new(failing.clone(), policy));
    let fs = Fs::new(store, None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let (attr, fh) = fs.create(ROOT_INO, "t", 0o644, 1, 1).await.unwrap();
    let content = data(50_000, 3);
    fs.write(fh, 0, &content).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(read_all(&fs, attr.ino).await, content);
    let injected: u64 = crate::store::failing::OpKind::ALL
        .iter()
        .map(|op| failing.stats().injected(*op))
        .sum();
    assert!(injected > 0, "faults were injected and absorbed");
}

/// A file's upload task that panics (a bug below it, in a client library say) must not leave the file unsaved
/// for the rest of the mount: the upload is tried again, and close() waits for that as for any failed attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_task_that_panics_is_started_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    store.add_rule(Rule::new(Some(OpKind::Put), When::Nth(1), Action::Panic));
    let fs = Fs::new(store.clone(), None, quick(dir.path(), KeyMode::CseLocal)).unwrap();
    let (attr, fh) = fs.create(ROOT_INO, "p", 0o644, 1, 1).await.unwrap();
    let content = data(50_000, 4);
    fs.write(fh, 0, &content).await.unwrap();
    fs.release(fh).await.unwrap();
    assert_eq!(
        store.stats().injected(OpKind::Put),
        1,
        "the first upload's task panicked"
    );
    assert_eq!(read_all(&fs, attr.ino).await, content);
    assert!(lock(&fs.open_files).is_empty(), "the saved state is forgotten");
}

/// An upload task that panics every time fails close() with an error that says so, keeps the data in the journal,
/// and goes on trying: once the cause is gone, the data reaches S3 without anyone asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_task_that_keeps_panicking_fails_close_and_keeps_trying() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    store.add_rule(Rule::new(Some(OpKind::Put), When::Always, Action::Panic));
    let fs = Fs::new(store.clone(), None, quick(dir.path(), KeyMode::CseLocal)).unwrap();
    let (attr, fh) = fs.create(ROOT_INO, "p", 0o644, 1, 1).await.unwrap();
    let content = data(50_000, 5);
    fs.write(fh, 0, &content).await.unwrap();
    let err = fs.flush(fh).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(err.to_string().contains("panicked"), "{err}");
    assert!(
        store.stats().injected(OpKind::Put) >= 2,
        "tried again after the first panic"
    );
    assert_eq!(fs.journal.entries().len(), 1, "the data stays in the journal");
    store.clear_rules();
    // Nobody asks again: the retries alone save it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while store.head("vol/p").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the retries saved the file");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fs.release(fh).await.unwrap();
    assert!(lock(&fs.open_files).is_empty(), "the saved state is forgotten");
    assert!(fs.journal.entries().is_empty(), "its journal entry is gone");
    assert_eq!(read_all(&fs, attr.ino).await, content);
}

/// An upload attempt that reached S3 but failed on the way back (its answer lost after the store's own retries,
/// or its task panicked after the call) is this file's own earlier version, not someone else's: the next attempt
/// writes over it. Without a retrying store below, for a new file (If-None-Match), a rewrite (If-Match) and a
/// multipart completion, each failing after the store took it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_reached_s3_before_it_failed_is_not_a_conflict() {
    for (op, size, action) in [
        (OpKind::Put, 5000, Action::FailAfter(FaultKind::Transient)),
        (OpKind::Put, 7000, Action::PanicAfter),
        (OpKind::Complete, 20 << 20, Action::FailAfter(FaultKind::Transient)),
        (OpKind::Complete, 20 << 20, Action::PanicAfter),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingStore::new(MemoryStore::new()));
        let fs = Fs::new(store.clone(), Some(cse_keys()), config(dir.path(), KeyMode::CseLocal)).unwrap();
        let (attr, fh) = fs.create(ROOT_INO, "l", 0o644, 1, 1).await.unwrap();
        let content = data(size, 7);
        fs.write(fh, 0, &content).await.unwrap();
        store.add_rule(Rule::new(Some(op), When::Nth(1), action));
        fs.flush(fh).await.unwrap();
        fs.write(fh, 10, b"again").await.unwrap();
        store.add_rule(Rule::new(Some(op), When::Nth(1), action));
        fs.release(fh).await.unwrap();
        let mut want = content.clone();
        want[10..15].copy_from_slice(b"again");
        same(&read_all(&fs, attr.ino).await, &want, &format!("{op:?} {action:?}"));
        assert!(
            !dir.path().join("recovery").exists(),
            "{op:?} {action:?}: no recovery file"
        );
        assert_eq!(store.stats().injected(op), 2, "{op:?} {action:?}");
        assert!(store.list_multipart_uploads("").await.unwrap().is_empty());
    }
}

/// An attempt that lands only after the next attempt began (S3 still working on it when the client gave up) is
/// this file's own earlier version too: the next attempt's condition fails against it, and the file is saved over
/// it, not declared in conflict. The late landing is made by hand: the object of the first attempt's token is
/// put while the second attempt's PUT waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_lands_after_the_next_one_began_is_not_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let fs = Fs::new(store.clone(), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let (attr, fh) = fs.create(ROOT_INO, "late", 0o644, 1, 1).await.unwrap();
    let first = data(5000, 3);
    fs.write(fh, 0, &first).await.unwrap();
    store.add_rule(Rule::fail(OpKind::Put, When::Nth(1), FaultKind::Transient));
    store.add_rule(Rule::new(
        Some(OpKind::Put),
        When::Nth(2),
        Action::Delay(Duration::from_secs(3)),
    ));
    let saving = {
        let fs = fs.clone();
        tokio::spawn(async move { fs.flush(fh).await })
    };
    // The second attempt's PUT has begun (it waits 3 s before it reaches the store): the first one lands now,
    // straight into the store below, past the rules and the counts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.stats().count(OpKind::Put) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "a second attempt began");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let earlier = fs
        .journal
        .entries()
        .into_iter()
        .find_map(|(_, m)| m.earlier_tokens.first().cloned());
    let token = earlier.expect("the first attempt's token is remembered");
    let meta: crate::store::Metadata = [(journal::META_UPLOAD_TOKEN.to_string(), token)].into_iter().collect();
    let landing = bytes::Bytes::from(first.clone());
    store
        .inner()
        .put("vol/late", landing, &meta, crate::store::PutCondition::IfNoneMatch)
        .await
        .expect("the late landing");
    saving.await.unwrap().unwrap();
    fs.release(fh).await.unwrap();
    assert!(!dir.path().join("recovery").exists(), "no recovery file");
    same(&read_all(&fs, attr.ino).await, &first, "saved over the late landing");
    assert_eq!(
        store.stats().count(OpKind::Put),
        3,
        "two attempts, and the one over the landing"
    );
}

/// A multipart upload left by an attempt that panicked is aborted by the next attempt even when that one sends a
/// single PUT (the file was cut meanwhile): nothing is left pending in S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_left_by_a_failed_attempt_is_aborted_by_a_single_put() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    store.add_rule(Rule::new(Some(OpKind::Complete), When::Always, Action::Panic));
    let (fs, fh, content) = ten_parts(dir.path(), store.clone(), "c").await;
    assert_eq!(fs.flush(fh).await.unwrap_err().errno(), libc::EIO);
    let ino = fs.lookup(ROOT_INO, "c").await.unwrap().ino;
    fs.setattr(ino, Some(1 << 20), AttrChange::default()).await.unwrap();
    store.clear_rules();
    fs.release(fh).await.unwrap();
    assert!(
        store.list_multipart_uploads("").await.unwrap().is_empty(),
        "no upload left pending"
    );
    same(&read_all(&fs, ino).await, &content[..1 << 20], "cut to 1 MiB");
}

/// close() does not wait for FUSE's release, so a reopen can race it. Both must end on one shared state: the
/// new handle's writes show in getattr and are saved at its close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_racing_the_last_release_shares_one_state() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::new(Arc::new(MemoryStore::new()), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let (attr, mut fh) = fs.create(ROOT_INO, "r", 0o644, 1, 1).await.unwrap();
    fs.write(fh, 0, b"x").await.unwrap();
    for round in 1..=200u64 {
        let size = round * 10;
        fs.flush(fh).await.unwrap();
        let (a, b) = (fs.clone(), fs.clone());
        let old = fh;
        let (released, reopened) = tokio::join!(
            tokio::spawn(async move { a.release(old).await }),
            tokio::spawn(async move { b.open(attr.ino, true, false).await })
        );
        released.unwrap().unwrap();
        fh = reopened.unwrap().unwrap();
        fs.write(fh, size - 1, b"y").await.unwrap();
        assert_eq!(fs.getattr(attr.ino).await.unwrap().size, size, "round {round}");
        assert!(lock(&fs.open_files).len() <= 1);
    }
    fs.release(fh).await.unwrap();
    assert!(
        lock(&fs.open_files).is_empty(),
        "the state is forgotten after the last close"
    );
    assert_eq!(read_all(&fs, attr.ino).await.len(), 2000);
}

/// A store that answers like S3 over a flaky link: retries above a fault-injecting store, as the daemon runs it.
fn flaky() -> (Arc<FailingStore<MemoryStore>>, Arc<dyn ObjectStore>) {
    use crate::store::retry::{RetryPolicy, Retrying};
    let failing = Arc::new(FailingStore::new(MemoryStore::new()));
    let policy = RetryPolicy {
        max_attempts: 3,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(2),
    };
    (failing.clone(), Arc::new(Retrying::new(failing, policy)))
}

fn quick(dir: &std::path::Path, mode: KeyMode) -> FsConfig {
    FsConfig {
        upload_timeout: Duration::from_millis(700),
        ..config(dir, mode)
    }
}

/// Waits, touching nothing but the store, until the object appears (the background uploader saved it).
async fn wait_for_object(store: &dyn ObjectStore, key: &str) {
    for _ in 0..200 {
        if store.head(key).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{key} was not saved in the background");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_at_close_keeps_the_data_readable_and_saves_it_once_s3_is_back() {
    for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
        let dir = tempfile::tempdir().unwrap();
        let (failing, store) = flaky();
        let keys = mode.is_client_side().then(cse_keys);
        let fs = Fs::new(store.clone(), keys, quick(dir.path(), mode)).unwrap();
        let (attr, fh) = fs.create(ROOT_INO, "out", 0o644, 1, 1).await.unwrap();
        let content = data(300_000, 4);
        fs.write(fh, 0, &content).await.unwrap();
        failing.add_rule(Rule::new(None, When::Always, Action::Fail(FaultKind::Transient)));
        let err = fs.flush(fh).await.unwrap_err();
        assert_eq!(err.errno(), libc::EIO, "{err}");
        assert!(matches!(err.root(), FsError::NotSaved { .. }), "{err}");
        let _ = fs.release(fh).await;
        // S3 is still away: the file is listed and reads back its new content.
        let names: Vec<String> = fs
            .readdir(ROOT_INO)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert!(names.contains(&"out".to_string()), "{names:?}");
        assert_eq!(fs.lookup(ROOT_INO, "out").await.unwrap().size, content.len() as u64);
        same(&read_all(&fs, attr.ino).await, &content, "read during the outage");
        assert!(store.head("vol/out").await.is_err());
        failing.clear_rules();
        wait_for_object(store.as_ref(), "vol/out").await;
        same(&read_all(&fs, attr.ino).await, &content, "saved in the background");
        assert!(
            fs.journal.entries().is_empty(),
            "the journal entry is gone once S3 has the data"
        );
    }
}

/// A client-side mount with no write-behind (close sends every part) and a short `upload_timeout` (700 ms), with
/// a file of 80 MiB written (ten parts of 8 MiB and a small one) and not yet closed: the handle and the content.
async fn ten_parts(dir: &std::path::Path, store: Arc<dyn ObjectStore>, name: &str) -> (Arc<Fs>, u64, Vec<u8>) {
    let cfg = FsConfig {
        write_behind: false,
        ..quick(dir, KeyMode::CseLocal)
    };
    let fs = Fs::new(store, Some(cse_keys()), cfg).unwrap();
    let (_, fh) = fs.create(ROOT_INO, name, 0o644, 1, 1).await.unwrap();
    let content = data(80 << 20, 8);
    for (k, chunk) in content.chunks(1 << 20).enumerate() {
        fs.write(fh, (k << 20) as u64, chunk).await.unwrap();
    }
    (fs, fh, content)
}

/// A multipart upload whose task panics at the completion: the next round uploads the file again, and the
/// multipart upload the panicked round started (its id is in the journal) is aborted, not left behind in S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_that_panics_at_completion_leaves_no_upload_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    store.add_rule(Rule::new(Some(OpKind::Complete), When::Nth(1), Action::Panic));
    let (fs, fh, content) = ten_parts(dir.path(), store.clone(), "m").await;
    fs.release(fh).await.unwrap();
    assert_eq!(
        store.stats().injected(OpKind::Complete),
        1,
        "the first completion's task panicked"
    );
    assert_eq!(
        store.stats().count(OpKind::Abort),
        1,
        "the panicked round's upload was aborted"
    );
    assert!(store.list_multipart_uploads("").await.unwrap().is_empty());
    let ino = fs.lookup(ROOT_INO, "m").await.unwrap().ino;
    same(&read_all(&fs, ino).await, &content, "after a panicked completion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_waits_for_an_upload_that_keeps_going_past_upload_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let (fs, fh, content) = ten_parts(dir.path(), store.clone(), "slow").await;
    // A slow link: each part takes 400 ms (four at a time, so three rounds), and S3 takes 600 ms to assemble the
    // object, each shorter than upload_timeout (700 ms), all of it together twice as long.
    store.add_rule(Rule::new(
        Some(OpKind::UploadPart),
        When::Always,
        Action::Delay(Duration::from_millis(400)),
    ));
    store.add_rule(Rule::new(
        Some(OpKind::Complete),
        When::Always,
        Action::Delay(Duration::from_millis(600)),
    ));
    let started = std::time::Instant::now();
    fs.flush(fh).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited > Duration::from_millis(1400),
        "the upload took {waited:?}: the wait outlasted upload_timeout only while parts went up"
    );
    assert!(
        store.stats().count(OpKind::UploadPart) >= 10,
        "every part went up at close"
    );
    fs.release(fh).await.unwrap();
    assert!(store.head("vol/slow").await.is_ok(), "in S3 when close returned");
    let attr = fs.lookup(ROOT_INO, "slow").await.unwrap();
    same(&read_all(&fs, attr.ino).await, &content, "saved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stops_going_up_ends_the_wait_one_upload_timeout_later() {
    let dir = tempfile::tempdir().unwrap();
    let (failing, store) = flaky();
    let (fs, fh, content) = ten_parts(dir.path(), store.clone(), "stalls").await;
    // Three parts go up slowly, then the link is gone.
    failing.add_rule(Rule::new(
        Some(OpKind::UploadPart),
        When::Always,
        Action::Delay(Duration::from_millis(300)),
    ));
    failing.add_rule(Rule::fail(OpKind::UploadPart, When::From(4), FaultKind::Transient));
    let started = std::time::Instant::now();
    let err = fs.flush(fh).await.unwrap_err();
    let waited = started.elapsed();
    assert!(matches!(err.root(), FsError::NotSaved { .. }), "{err}");
    // The three parts went up after 300 ms, and upload_timeout (700 ms) runs from there.
    assert!(
        waited >= Duration::from_millis(1000) && waited < Duration::from_secs(20),
        "the wait ended {waited:?} after the request"
    );
    failing.clear_rules();
    fs.release(fh).await.ok();
    wait_for_object(store.as_ref(), "vol/stalls").await;
    let attr = fs.lookup(ROOT_INO, "stalls").await.unwrap();
    same(&read_all(&fs, attr.ino).await, &content, "saved in the background");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_returns_at_once_and_a_later_flush_tries_again() {
    let dir = tempfile::tempdir().unwrap();
    let (failing, store) = flaky();
    let fs = Fs::new(
        store,
        None,
        FsConfig {
            upload_timeout: Duration::from_secs(60),
            ..config(dir.path(), KeyMode::SseS3)
        },
    )
    .unwrap();
    let (_, fh) = fs.create(ROOT_INO, "p", 0o644, 1, 1).await.unwrap();
    fs.write(fh, 0, b"abc").await.unwrap();
    failing.add_rule(Rule::fail(OpKind::Put, When::Always, FaultKind::AccessDenied));
    let started = std::time::Instant::now();
    assert_eq!(fs.flush(fh).await.unwrap_err().errno(), libc::EACCES);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "no wait for upload_timeout"
    );
    failing.clear_rules();
    fs.flush(fh).await.unwrap();
    fs.release(fh).await.unwrap();
}

/// The write cache is the mount's, not each file's: many files written at once stay within `max_dirty_bytes`
/// together, and what an evicted block held still reads back (from the journal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_written_at_once_share_one_write_cache() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::new(Arc::new(MemoryStore::new()), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let limit = fs.cfg.max_dirty_bytes;
    let mut open = Vec::new();
    for k in 0..12u8 {
        let (attr, fh) = fs.create(ROOT_INO, &format!("f{k}"), 0o644, 1, 1).await.unwrap();
        let want = data(40_000, k);
        for (n, piece) in want.chunks(5000).enumerate() {
            fs.write(fh, n as u64 * 5000, piece).await.unwrap();
        }
        let cached = fs.write_cached.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            cached <= limit,
            "{cached} bytes cached after {} files, over {limit}",
            k + 1
        );
        open.push((attr.ino, fh, want));
    }
    for (ino, fh, want) in open {
        same(&read_all(&fs, ino).await, &want, "a file written next to eleven others");
        fs.release(fh).await.unwrap();
    }
    assert_eq!(
        fs.write_cached.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "all given back"
    );
}

/// A truncate cuts the journal's slots past the new size only once the manifest names that size: a kill right
/// after the cut must not leave a manifest of the old size, whose recovery would take the cut blocks from the
/// object again (older content than the program wrote).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_names_the_new_size_before_it_cuts() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::new(Arc::new(MemoryStore::new()), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let (attr, fh) = fs.create(ROOT_INO, "t", 0o644, 1, 1).await.unwrap();
    fs.write(fh, 0, &data(10 * 4096, 1)).await.unwrap();
    fs.release(fh).await.unwrap();
    let fh = fs.open(attr.ino, true, false).await.unwrap();
    fs.write(fh, 5 * 4096, &data(5 * 4096, 2)).await.unwrap();
    let size = 5 * 4096 + 2048;
    fs.setattr(attr.ino, Some(size), AttrChange::default()).await.unwrap();
    let file = fs.open_state(attr.ino).unwrap();
    let journal = file.state.lock().await.journal.clone().unwrap();
    assert_eq!(*journal.size_at_cut.lock().unwrap(), Some(size));
    fs.release(fh).await.unwrap();
}

/// Drops `fs` as a kill -9 would leave it: no flush, no release. A finished upload task may hold the Fs for a
/// moment longer (a killed process holds nothing); this waits until it is really gone and its journal locks are
/// released.
async fn killed(fs: Arc<Fs>) {
    let gone = Arc::downgrade(&fs);
    drop(fs);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gone.strong_count() > 0 {
        assert!(std::time::Instant::now() < deadline, "the killed Fs is still alive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A kill of the daemon leaves the journal; the next mount of the volume uploads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_mount_uploads_what_a_killed_one_left_in_the_journal() {
    for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
        let dir = tempfile::tempdir().unwrap();
        let memory = Arc::new(MemoryStore::new());
        let store: Arc<dyn ObjectStore> = memory.clone();
        let keys = mode.is_client_side().then(cse_keys);
        let first = Fs::new(store.clone(), keys.clone(), config(dir.path(), mode)).unwrap();
        // An existing 40-block file, rewritten in the middle, and a new file; then the daemon dies.
        let (old, fh) = first.create(ROOT_INO, "old", 0o644, 1, 1).await.unwrap();
        let mut want_old = data(40 * 4096 + 10, 5);
        first.write(fh, 0, &want_old).await.unwrap();
        first.release(fh).await.unwrap();
        let fh = first.open(old.ino, true, false).await.unwrap();
        first.write(fh, 20 * 4096 + 100, b"rewritten").await.unwrap();
        want_old[20 * 4096 + 100..20 * 4096 + 109].copy_from_slice(b"rewritten");
        let (_, fh2) = first.create(ROOT_INO, "new", 0o600, 1, 1).await.unwrap();
        let want_new = data(9000, 6);
        first.write(fh2, 0, &want_new).await.unwrap();
        let key_files = std::fs::read_dir(dir.path().join("journal/vol")).unwrap().count();
        assert!(key_files >= 6, "two journal entries on disk");
        // The kill fell just after a CreateMultipartUpload whose id the journal did not record yet.
        store.create_multipart("vol/old", &Metadata::new()).await.unwrap();
        // No flush, no release: as after kill -9.
        killed(first).await;
        let second = Fs::new(store.clone(), keys, config(dir.path(), mode)).unwrap();
        let r = second.recover().await;
        assert_eq!((r.saved, r.pending, r.conflicts, r.broken), (2, 0, 0, 0), "{r:?}");
        let new = second.lookup(ROOT_INO, "new").await.unwrap();
        assert_eq!(new.perm, 0o600);
        same(&read_all(&second, new.ino).await, &want_new, &format!("{mode} new"));
        let old = second.lookup(ROOT_INO, "old").await.unwrap();
        same(&read_all(&second, old.ino).await, &want_old, &format!("{mode} old"));
        assert!(second.journal.entries().is_empty());
        assert_eq!(r.aborted, 1);
        assert_eq!(memory.open_uploads(), 0, "no multipart upload left pending");
    }
}

/// A mount of a fresh volume whose open file "renamed" has unsaved data and, in its state and journal, a
/// multipart upload created under its old name: as a write-behind that started while a rename of the file ran
/// leaves it when its abort fails (S3 away). Returns the file's inode, handle and content.
async fn left_upload_under_an_old_name(fs: &Fs, seed: u8) -> (u64, u64, Vec<u8>) {
    let (attr, fh) = fs.create(ROOT_INO, "renamed", 0o644, 1, 1).await.unwrap();
    let want = data(9000, seed);
    fs.write(fh, 0, &want).await.unwrap();
    let created_under = "vol/old name";
    let id = fs
        .store
        .create_multipart(created_under, &Metadata::new())
        .await
        .unwrap();
    let file = lock(&fs.open_files).get(&attr.ino).unwrap().file.clone();
    let mut st = file.state.lock().await;
    st.multipart = Some(journal::MultipartRef {
        key: created_under.into(),
        id,
    });
    st.save_manifest().unwrap();
    (attr.ino, fh, want)
}

/// An upload an earlier attempt left under the file's old name is aborted under that name by the next round:
/// S3 knows an upload by key and id, and an abort under the new name would find nothing and leave it pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_left_under_the_old_name_of_a_renamed_file_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let memory = Arc::new(MemoryStore::new());
    let fs = Fs::new(memory.clone(), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let (ino, fh, want) = left_upload_under_an_old_name(&fs, 3).await;
    assert_eq!(memory.open_uploads(), 1);
    fs.release(fh).await.unwrap();
    assert_eq!(memory.open_uploads(), 0, "no multipart upload left pending");
    same(&read_all(&fs, ino).await, &want, "saved");
}

/// The same after a kill: the next mount aborts the recorded upload under the name it was created under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_mount_aborts_an_upload_left_under_the_old_name_of_a_renamed_file() {
    let dir = tempfile::tempdir().unwrap();
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let first = Fs::new(store.clone(), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let (_, _, want) = left_upload_under_an_old_name(&first, 4).await;
    killed(first).await;
    let second = Fs::new(store.clone(), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let r = second.recover().await;
    assert_eq!(
        (r.saved, r.pending, r.conflicts, r.broken, r.aborted),
        (1, 0, 0, 0, 1),
        "{r:?}"
    );
    assert_eq!(memory.open_uploads(), 0, "no multipart upload left pending");
    let f = second.lookup(ROOT_INO, "renamed").await.unwrap();
    same(&read_all(&second, f.ino).await, &want, "saved");
}

/// The next mount adopts an object that an earlier attempt of a killed daemon's file put there (its token among
/// the journal's earlier tokens) as that file's own version, and saves the journal over it: no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_mount_adopts_what_an_earlier_attempt_of_a_killed_one_landed() {
    let dir = tempfile::tempdir().unwrap();
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let first = Fs::new(store.clone(), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let (attr, fh) = first.create(ROOT_INO, "e", 0o644, 1, 1).await.unwrap();
    let want = data(9000, 2);
    first.write(fh, 0, &want).await.unwrap();
    // As after an attempt that failed and another that began: the journal remembers the first one's token, and
    // the first one's object reached S3 after all.
    let file = lock(&first.open_files).get(&attr.ino).unwrap().file.clone();
    {
        let mut st = file.state.lock().await;
        st.earlier_tokens = vec!["t-landed".into()];
        st.save_manifest().unwrap();
    }
    drop(file);
    let meta: Metadata = [(journal::META_UPLOAD_TOKEN.to_string(), "t-landed".to_string())]
        .into_iter()
        .collect();
    store
        .put(
            "vol/e",
            bytes::Bytes::from(want[..5000].to_vec()),
            &meta,
            crate::store::PutCondition::IfNoneMatch,
        )
        .await
        .unwrap();
    killed(first).await;
    let second = Fs::new(store.clone(), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let r = second.recover().await;
    assert_eq!((r.saved, r.pending, r.conflicts, r.broken), (1, 0, 0, 0), "{r:?}");
    let e = second.lookup(ROOT_INO, "e").await.unwrap();
    same(&read_all(&second, e.ino).await, &want, "saved over the landed attempt");
    assert!(!dir.path().join("recovery").exists(), "no recovery file");
}

/// The tokens the journal remembers stay the file's own after the next mount: an earlier attempt of the killed
/// daemon that lands only after the mount looked (while the mount's own upload of the file waits) is written over,
/// not taken for someone else's write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_attempt_that_lands_after_the_next_mount_looked_is_not_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let first = Fs::new(store.clone(), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let (attr, fh) = first.create(ROOT_INO, "e", 0o644, 1, 1).await.unwrap();
    let want = data(9000, 4);
    first.write(fh, 0, &want).await.unwrap();
    let file = lock(&first.open_files).get(&attr.ino).unwrap().file.clone();
    {
        let mut st = file.state.lock().await;
        st.upload_token = Some("t-in-flight".into());
        st.save_manifest().unwrap();
    }
    drop(file);
    killed(first).await;
    // The next mount's HEAD finds nothing; its PUT waits 3 s, and the killed run's attempt lands meanwhile.
    store.add_rule(Rule::new(
        Some(OpKind::Put),
        When::Nth(1),
        Action::Delay(Duration::from_secs(3)),
    ));
    let second = Fs::new(store.clone(), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let recovering = {
        let second = second.clone();
        tokio::spawn(async move { second.recover().await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.stats().count(OpKind::Put) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the next mount's upload began");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let meta: Metadata = [(journal::META_UPLOAD_TOKEN.to_string(), "t-in-flight".to_string())]
        .into_iter()
        .collect();
    let landing = bytes::Bytes::from(want[..5000].to_vec());
    store
        .inner()
        .put("vol/e", landing, &meta, crate::store::PutCondition::IfNoneMatch)
        .await
        .expect("the late landing");
    let r = recovering.await.unwrap();
    assert_eq!((r.saved, r.pending, r.conflicts, r.broken), (1, 0, 0, 0), "{r:?}");
    let e = second.lookup(ROOT_INO, "e").await.unwrap();
    same(&read_all(&second, e.ino).await, &want, "saved over the late landing");
    assert!(!dir.path().join("recovery").exists(), "no recovery file");
}

/// A kill inside the pwrite that rewrites a block already in the journal (here: the last block of a file written
/// in small pieces) tears that slot; what the earlier writes put there was acknowledged, and the next mount still
/// uploads all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_torn_while_it_was_rewritten_loses_nothing_acknowledged() {
    for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
        let (dir, keys) = (tempfile::tempdir().unwrap(), mode.is_client_side().then(cse_keys));
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let first = Fs::new(store.clone(), keys.clone(), config(dir.path(), mode)).unwrap();
        let (_, fh) = first.create(ROOT_INO, "grown", 0o644, 1, 1).await.unwrap();
        let want = data(10_000, 7);
        for (k, piece) in want.chunks(1000).enumerate() {
            first.write(fh, k as u64 * 1000, piece).await.unwrap();
        }
        killed(first).await;
        // The next write to block 2 died with only its first page in the blocks file.
        let jdir = dir.path().join("journal/vol");
        let blocks = std::fs::read_dir(&jdir)
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(".blocks"))
            .unwrap()
            .path();
        let stored = crate::format::sealed_block_len(BlockSize::new(4096).unwrap());
        let f = std::fs::OpenOptions::new().write(true).open(&blocks).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 28], 2 * stored + 4096).unwrap();
        let second = Fs::new(store.clone(), keys, config(dir.path(), mode)).unwrap();
        let r = second.recover().await;
        assert_eq!(
            (r.saved, r.pending, r.conflicts, r.broken),
            (1, 0, 0, 0),
            "{mode}: {r:?}"
        );
        let grown = second.lookup(ROOT_INO, "grown").await.unwrap();
        same(&read_all(&second, grown.ino).await, &want, &format!("{mode} grown"));
    }
}

/// A conditional write whose response is lost is retried; the retry fails its condition against our own first
/// write, which the upload token recognises: no conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_response_to_a_conditional_write_is_not_a_conflict() {
    for (op, size) in [(OpKind::Put, 5000), (OpKind::Complete, 20 << 20), (OpKind::Put, 7000)] {
        let dir = tempfile::tempdir().unwrap();
        let (failing, store) = flaky();
        let fs = Fs::new(store.clone(), Some(cse_keys()), config(dir.path(), KeyMode::CseLocal)).unwrap();
        let (attr, fh) = fs.create(ROOT_INO, "l", 0o644, 1, 1).await.unwrap();
        let content = data(size, 7);
        fs.write(fh, 0, &content).await.unwrap();
        failing.add_rule(Rule::new(
            Some(op),
            When::Nth(1),
            Action::FailAfter(FaultKind::Transient),
        ));
        fs.flush(fh).await.unwrap();
        // And an If-Match rewrite of the existing object.
        fs.write(fh, 10, b"again").await.unwrap();
        failing.add_rule(Rule::new(
            Some(op),
            When::Nth(2),
            Action::FailAfter(FaultKind::Transient),
        ));
        fs.release(fh).await.unwrap();
        let mut want = content.clone();
        want[10..15].copy_from_slice(b"again");
        assert_eq!(read_all(&fs, attr.ino).await, want);
        assert!(!dir.path().join("recovery").exists(), "no recovery file");
        assert!(failing.stats().injected(op) >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_and_reads_do_not_wait_for_an_upload() {
    let dir = tempfile::tempdir().unwrap();
    let failing = Arc::new(FailingStore::new(MemoryStore::new()));
    let fs = Fs::new(failing.clone(), None, config(dir.path(), KeyMode::SseS3)).unwrap();
    let (attr, fh) = fs.create(ROOT_INO, "s", 0o644, 1, 1).await.unwrap();
    fs.write(fh, 0, &data(100_000, 8)).await.unwrap();
    failing.add_rule(Rule::new(
        Some(OpKind::Put),
        When::Always,
        Action::Delay(Duration::from_secs(3)),
    ));
    let f2 = fs.clone();
    let upload = tokio::spawn(async move { f2.flush(fh).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fs.getattr(attr.ino).await.unwrap().size, 100_000);
    assert_eq!(fs.lookup(ROOT_INO, "s").await.unwrap().size, 100_000);
    let fh2 = fs.open(attr.ino, false, false).await.unwrap();
    assert_eq!(fs.read(fh2, 0, 10).await.unwrap(), data(10, 8));
    assert!(
        !upload.is_finished(),
        "the upload is still held while stat and read answered"
    );
    upload.await.unwrap().unwrap();
    fs.release(fh2).await.unwrap();
    fs.release(fh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sizes_are_refused_and_an_empty_file_truncates_to_zero() {
    for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
        let dir = tempfile::tempdir().unwrap();
        let keys = mode.is_client_side().then(cse_keys);
        let fs = Fs::new(Arc::new(MemoryStore::new()), keys, config(dir.path(), mode)).unwrap();
        let (attr, fh) = fs.create(ROOT_INO, "h", 0o644, 1, 1).await.unwrap();
        fs.release(fh).await.unwrap();
        let big = fs
            .setattr(attr.ino, Some(999_999_999_999_999), AttrChange::default())
            .await;
        assert_eq!(big.unwrap_err().errno(), libc::EFBIG);
        let fh = fs.open(attr.ino, true, false).await.unwrap();
        assert_eq!(
            fs.write(fh, (5 << 40) + 1, b"x").await.unwrap_err().errno(),
            libc::EFBIG
        );
        fs.release(fh).await.unwrap();
        // truncate -s0 of an empty file
        fs.setattr(attr.ino, Some(0), AttrChange::default()).await.unwrap();
        assert_eq!(read_all(&fs, attr.ino).await, Vec::<u8>::new());
    }
}

/// Parts above 8 MiB (objects over ~78 GiB at S3's 10,000 parts; here forced with a lower part limit) are
/// assembled in a file and streamed from it, a few MiB at a time in memory; the object is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_parts_are_streamed_from_a_file_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let cfg = FsConfig {
        max_parts: 2,
        ..config(dir.path(), KeyMode::CseLocal)
    };
    let fs = Fs::new(store.clone(), Some(cse_keys()), cfg).unwrap();
    let (attr, fh) = fs.create(ROOT_INO, "huge", 0o644, 1, 1).await.unwrap();
    let mut content = data(40 << 20, 9);
    for (k, piece) in content.chunks(1 << 20).enumerate() {
        fs.write(fh, (k << 20) as u64, piece).await.unwrap();
    }
    fs.release(fh).await.unwrap();
    assert_eq!(store.stats().count(OpKind::UploadPart), 2, "two parts of over 16 MiB");
    let fh = fs.open(attr.ino, true, false).await.unwrap();
    fs.write(fh, 30 << 20, b"middle").await.unwrap();
    content[30 << 20..(30 << 20) + 6].copy_from_slice(b"middle");
    fs.release(fh).await.unwrap();
    assert_eq!(
        store.stats().count(OpKind::UploadPartCopy),
        1,
        "untouched parts are copied in S3"
    );
    same(&read_all(&fs, attr.ino).await, &content, "streamed parts");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("journal/vol"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "journal.key" && n != super::journal::RESERVE_FILE)
        .collect();
    assert!(left.is_empty(), "staged parts and the journal entry are gone: {left:?}");
}

/// Waits up to `within` until the store has seen more than `n` calls of `op`, then a moment longer (the call
/// reaches the inner store).
pub(super) async fn call_started(store: &FailingStore<MemoryStore>, op: OpKind, n: u64, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if store.stats().count(op) > n {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("no {op:?} was sent within {within:?}");
}

/// S3 has the new ETag of this mount's own upload (a metadata copy for a chmod, or a new version) a moment before
/// the upload loop records it: a write or a read that needs a block of the base in that moment follows the new
/// ETag instead of failing (EIO) on the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_follow_the_etag_of_an_upload_in_flight() {
    for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
        let dir = tempfile::tempdir().unwrap();
        // Fast ETags: a metadata copy changes the ETag, as S3 does for a multipart object.
        let store = Arc::new(FailingStore::new(MemoryStore::fast()));
        let keys = || mode.is_client_side().then(cse_keys);
        let mut want = data(3 * 4096, 9);
        {
            let fs = Fs::new(store.clone(), keys(), config(dir.path(), mode)).unwrap();
            let (_, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
            fs.write(fh, 0, &want).await.unwrap();
            fs.release(fh).await.unwrap();
        }
        // A fresh mount: nothing of the file is cached, every base block is a GET conditional on the ETag.
        let dir2 = tempfile::tempdir().unwrap();
        let fs = Fs::new(store.clone(), keys(), config(dir2.path(), mode)).unwrap();
        let ino = fs.lookup(ROOT_INO, "f").await.unwrap().ino;
        let fh = fs.open(ino, true, false).await.unwrap();

        // A chmod through the open file: its flush is a metadata copy, whose answer is slow.
        let change = AttrChange {
            perm: Some(0o600),
            ..AttrChange::default()
        };
        fs.setattr(ino, None, change).await.unwrap();
        let copies = store.stats().count(OpKind::Copy);
        store.add_rule(
            Rule::new(
                Some(OpKind::Copy),
                When::Always,
                Action::DelayAfter(Duration::from_millis(500)),
            )
            .times(1),
        );
        let f2 = fs.clone();
        let flush = tokio::spawn(async move { f2.flush(fh).await });
        call_started(&store, OpKind::Copy, copies, Duration::from_millis(2500)).await;
        // A write into the middle of block 1 needs the base's block 1.
        fs.write(fh, 4096 + 10, b"abc")
            .await
            .expect("a write during the metadata copy");
        want[4106..4109].copy_from_slice(b"abc");
        flush.await.unwrap().unwrap();
        assert_eq!(
            store.stats().count(OpKind::Copy),
            copies + 1,
            "{mode}: one metadata copy"
        );

        // The write's upload, whose answer is slow: a read of block 2 (from the base) meanwhile.
        let puts = store.stats().count(OpKind::Put);
        store.add_rule(
            Rule::new(
                Some(OpKind::Put),
                When::Always,
                Action::DelayAfter(Duration::from_millis(500)),
            )
            .times(1),
        );
        let f2 = fs.clone();
        let flush = tokio::spawn(async move { f2.flush(fh).await });
        call_started(&store, OpKind::Put, puts, Duration::from_millis(2500)).await;
        let got = fs.read(fh, 2 * 4096 + 5, 100).await.expect("a read during the upload");
        same(&got, &want[2 * 4096 + 5..2 * 4096 + 105], "read during the upload");
        flush.await.unwrap().unwrap();
        fs.release(fh).await.unwrap();

        let dir3 = tempfile::tempdir().unwrap();
        let fresh = Fs::new(store.clone(), keys(), config(dir3.path(), mode)).unwrap();
        let seen = fresh.lookup(ROOT_INO, "f").await.unwrap();
        assert_eq!(seen.perm, 0o600, "{mode}");
        same(
            &read_all(&fresh, seen.ino).await,
            &want,
            &format!("{mode}: after a fresh mount"),
        );
    }
}

/// Objects over CopyObject's limit (S3: 5 GiB; here lowered to 5 MiB, with a store that enforces it) are still
/// renamed, chmod-ed with and without an open handle, and get their attributes settled after a write-behind
/// upload: each copy goes in parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_over_the_copy_limit_are_renamed_and_chmod_ed() {
    use crate::store::memory::MIN_PART_SIZE;
    for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingStore::new(MemoryStore::new().with_copy_limit(MIN_PART_SIZE)));
        let keys = || mode.is_client_side().then(cse_keys);
        let cfg = |d: &std::path::Path| FsConfig {
            copy_max: MIN_PART_SIZE,
            ..config(d, mode)
        };
        let fs = Fs::new(store.clone(), keys(), cfg(dir.path())).unwrap();
        let content = data(20 << 20, 4);
        let (attr, fh) = fs.create(ROOT_INO, "a", 0o644, 1, 1).await.unwrap();
        for (k, chunk) in content.chunks(1 << 20).enumerate() {
            fs.write(fh, (k << 20) as u64, chunk).await.unwrap();
        }
        // A chmod while open: the write-behind upload was created with 0644, the settle copy goes in parts.
        let perm = |p| AttrChange {
            perm: Some(p),
            ..AttrChange::default()
        };
        fs.setattr(attr.ino, None, perm(0o640)).await.unwrap();
        fs.release(fh).await.unwrap();
        // A chmod by name (no handle): a metadata copy of the object onto itself.
        let settled = |want: u32| {
            let store = store.clone();
            async move {
                for _ in 0..500 {
                    let info = store.head("vol/a").await.unwrap();
                    let mode = info.metadata.get("mode").and_then(|m| m.parse::<u32>().ok());
                    if mode.map(|m| m & 0o7777) == Some(want) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("{mode}: mode {want:o} not saved");
            }
        };
        settled(0o640).await;
        fs.setattr(attr.ino, None, perm(0o600)).await.unwrap();
        settled(0o600).await;
        // A rename: a copy to the new key, then a delete.
        fs.rename(ROOT_INO, "a", ROOT_INO, "b", false).await.unwrap();
        // A chmod through a handle: saved by the upload loop as a metadata copy.
        let ino = fs.lookup(ROOT_INO, "b").await.unwrap().ino;
        let fh = fs.open(ino, true, false).await.unwrap();
        fs.setattr(ino, None, perm(0o604)).await.unwrap();
        fs.release(fh).await.unwrap();
        assert_eq!(
            store.stats().errors(OpKind::Copy),
            0,
            "{mode}: no CopyObject over the limit"
        );
        // Four copies of a 20 MiB object, in parts of 5 MiB: the settle, the chmod by name, the rename, the chmod
        // through a handle.
        let object_size = store.head("vol/b").await.unwrap().size;
        assert_eq!(
            store.stats().count(OpKind::UploadPartCopy),
            4 * object_size.div_ceil(MIN_PART_SIZE),
            "{mode}: four copies in parts"
        );
        assert!(store.list_multipart_uploads("").await.unwrap().is_empty());

        let dir2 = tempfile::tempdir().unwrap();
        let fresh = Fs::new(store.clone(), keys(), cfg(dir2.path())).unwrap();
        assert!(matches!(fresh.lookup(ROOT_INO, "a").await, Err(FsError::NotFound)));
        let seen = fresh.lookup(ROOT_INO, "b").await.unwrap();
        assert_eq!(seen.perm, 0o604, "{mode}");
        same(
            &read_all(&fresh, seen.ino).await,
            &content,
            &format!("{mode}: after a fresh mount"),
        );
    }
}

/// [`Fs::write_inline`] as a FUSE thread calls it: on a thread that may block, inside the runtime's context.
pub(super) async fn inline(fs: &Arc<Fs>, fh: u64, offset: u64, bytes: &[u8]) -> Result<InlineWrite, WriteData> {
    let (fs, bytes) = (fs.clone(), bytes.to_vec());
    tokio::task::spawn_blocking(move || fs.write_inline(fh, offset, bytes[..].into()))
        .await
        .unwrap()
}

/// A write that waits for nothing but the journal is done on the calling thread; one whose partial end block
/// must come from S3, or whose file's state is busy, is handed back whole for the async path, without a request
/// sent. Either way the file ends as written. getxattr answers inline from an open file's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_done_inline_only_when_nothing_waits_for_s3() {
    for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FailingStore::new(MemoryStore::new()));
        let keys = mode.is_client_side().then(cse_keys);
        // The write cache holds one block: a write into an earlier block finds it in the journal.
        let cfg = FsConfig {
            max_dirty_bytes: 4096,
            ..config(dir.path(), mode)
        };
        let fs = Fs::new(store.clone(), keys, cfg).unwrap();
        let (attr, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
        let mut content = data(20_000, 4);
        // A new file: every write, aligned or not, is done inline.
        for (k, piece) in content.chunks(3000).enumerate() {
            match inline(&fs, fh, (k * 3000) as u64, piece).await {
                Ok(InlineWrite::Done(Ok(n))) => assert_eq!(n as usize, piece.len(), "{mode}"),
                _ => panic!("{mode}: piece {k} was not written inline"),
            }
        }
        // A piece of a block written before, which only the journal holds now: read back from it, inline.
        let first = fs.open_state(attr.ino).unwrap().state.lock().await.source(0);
        assert_eq!(
            first,
            super::content::Source::Journal,
            "{mode}: block 0 left the write cache"
        );
        match inline(&fs, fh, 10, b"from the journal").await {
            Ok(InlineWrite::Done(Ok(16))) => content[10..26].copy_from_slice(b"from the journal"),
            _ => panic!("{mode}: a block in the journal was not written inline"),
        }
        // While the file's state is held (by an upload taking its snapshot, say), the write is handed back whole,
        // and so is a getxattr.
        {
            let file = fs.open_state(attr.ino).unwrap();
            let _busy = file.state.lock().await;
            match inline(&fs, fh, 100, b"busy").await {
                Err(back) => assert_eq!(back.len(), 4, "{mode}"),
                Ok(_) => panic!("{mode}: written inline while the state was held"),
            }
            assert!(fs.getxattr_inline(attr.ino, "user.a").is_none(), "{mode}");
        }
        match fs.getxattr_inline(attr.ino, "security.capability") {
            Some(Err(e)) => assert_eq!(e.errno(), libc::ENODATA, "{mode}"),
            _ => panic!("{mode}: an open file without attributes is answered inline"),
        }
        let set = XattrChange::Set {
            name: "user.a",
            value: b"value",
            flags: 0,
        };
        fs.change_xattr(attr.ino, set).await.unwrap();
        match fs.getxattr_inline(attr.ino, "user.a") {
            Some(Ok(v)) => assert_eq!(v, b"value", "{mode}"),
            _ => panic!("{mode}: an open file's attribute is answered inline"),
        }
        assert!(
            fs.getxattr_inline(ROOT_INO, "user.a").is_none(),
            "{mode}: a directory takes the async path"
        );
        fs.release(fh).await.unwrap();
        // Saved and opened again: the blocks are the object's now.
        let fh = fs.open(attr.ino, true, false).await.unwrap();
        let gets = store.stats().count(OpKind::Get);
        // A partial block of the object needs a GET: handed back, and written by the async path.
        let back = match inline(&fs, fh, 5000, b"edge").await {
            Err(back) => back,
            Ok(_) => panic!("{mode}: a partial block of the object was written inline"),
        };
        assert_eq!(
            store.stats().count(OpKind::Get),
            gets,
            "{mode}: the inline path sent no GET"
        );
        fs.write_data(fh, 5000, back).await.unwrap();
        content[5000..5004].copy_from_slice(b"edge");
        // A whole block of the object needs no GET: inline.
        let whole = data(4096, 9);
        match inline(&fs, fh, 8192, &whole).await {
            Ok(InlineWrite::Done(Ok(4096))) => {}
            _ => panic!("{mode}: a whole block was not written inline"),
        }
        content[8192..12288].copy_from_slice(&whole);
        fs.release(fh).await.unwrap();
        same(&read_all(&fs, attr.ino).await, &content, &format!("{mode}"));
    }
}
