//! The core without FUSE, over the in-memory store and the fault-injecting wrapper: fast checks of what the
//! FUSE tests cannot easily force (failed uploads, memory bounds, spilling).
use super::*;
use crate::keys::{KeyStats, LocalProvider};
use crate::store::failing::{Action, FailingStore, FaultKind, OpKind, Rule, When};
use crate::store::memory::MemoryStore;
use std::time::Duration;

fn config(dir: &std::path::Path, mode: KeyMode) -> FsConfig {
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
        max_dirty_bytes: 64 << 10,
        staging_dir: dir.to_path_buf(),
        recovery_dir: dir.join("recovery"),
    }
}

fn cse_keys() -> CseKeys {
    let stats = Arc::new(KeyStats::new());
    let provider = Arc::new(LocalProvider::new(&[7u8; 32], "test key", stats.clone()));
    CseKeys {
        provider,
        cache: Arc::new(DataKeyCache::new(16, Duration::from_secs(60), stats)),
    }
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_spill_within_the_memory_bound_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let fs = Fs::new(store.clone(), Some(cse_keys()), config(dir.path(), KeyMode::CseLocal));
    let (attr, fh) = fs.create(ROOT_INO, "big", 0o644, 1, 1).await.unwrap();
    let content = data(3 << 20, 1);
    for (k, piece) in content.chunks(100_000).enumerate() {
        fs.write(fh, (k * 100_000) as u64, piece).await.unwrap();
        let file = fs.open_state(attr.ino).unwrap();
        let st = file.state.lock().await;
        assert!(
            st.dirty_bytes() <= (64 << 10) + 2 * 4096 + 100_000,
            "dirty bytes {}",
            st.dirty_bytes()
        );
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
    let fs = Fs::new(store.clone(), Some(cse_keys()), config(dir.path(), KeyMode::CseLocal));
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
    let a = Fs::new(store.clone(), Some(keys.clone()), config(dir.path(), KeyMode::CseLocal));
    let b = Fs::new(store.clone(), Some(keys), config(dir.path(), KeyMode::CseLocal));
    let (_, fa) = a.create(ROOT_INO, "same", 0o644, 1, 1).await.unwrap();
    let (_, fb) = b.create(ROOT_INO, "same", 0o644, 1, 1).await.unwrap();
    a.write(fa, 0, b"winner").await.unwrap();
    b.write(fb, 0, b"the loser's bytes").await.unwrap();
    a.release(fa).await.unwrap();
    let err = b.flush(fb).await.unwrap_err();
    let FsError::Conflict { recovery, .. } = &err else {
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
    let fs = Fs::new(store, None, config(dir.path(), KeyMode::SseS3));
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

/// close() does not wait for FUSE's release, so a reopen can race it. Both must end on one shared state: the
/// new handle's writes show in getattr and are saved at its close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopen_racing_the_last_release_shares_one_state() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(Fs::new(
        Arc::new(MemoryStore::new()),
        None,
        config(dir.path(), KeyMode::SseS3),
    ));
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
