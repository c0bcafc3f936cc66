//! The read path without FUSE: read-ahead chunks, growing windows, seeks, concurrent readers, the memory budget,
//! and a damaged block inside a read-ahead chunk, over the in-memory store (fault-injecting wrapper to count
//! requests). The same patterns run through a real mount against the local S3 server in tests/readahead.rs.
use super::tests::{config, cse_keys, data, same};
use super::*;
use crate::store::failing::{FailingStore, OpKind};
use crate::store::memory::MemoryStore;
use rand::{Rng, SeedableRng};

const B: u64 = 4096;
/// 37 blocks and a bit: the last block is short, and chunks of 4 blocks do not divide it.
const SIZE: usize = 37 * B as usize + 123;

/// A file system whose read-ahead works in chunks of 4 blocks, up to 4 chunks ahead.
fn small_chunks(dir: &std::path::Path, mode: KeyMode) -> FsConfig {
    FsConfig {
        read_ahead_bytes: 16 * B,
        read_ahead_chunk_bytes: 4 * B,
        ..config(dir, mode)
    }
}

async fn setup(mode: KeyMode) -> (tempfile::TempDir, Arc<FailingStore<MemoryStore>>, Arc<Fs>, u64, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let keys = matches!(mode, KeyMode::CseLocal).then(cse_keys);
    let fs = Fs::new(store.clone(), keys.clone(), config(dir.path(), mode)).unwrap();
    let (_attr, fh) = fs.create(ROOT_INO, "f", 0o644, 1, 1).await.unwrap();
    let content = data(SIZE, 9);
    fs.write(fh, 0, &content).await.unwrap();
    fs.release(fh).await.unwrap();
    // A fresh file system over the same store: nothing cached, every block comes through the read path.
    let fs = Fs::new(store.clone(), keys, small_chunks(dir.path(), mode)).unwrap();
    let ino = fs.lookup(ROOT_INO, "f").await.unwrap().ino;
    (dir, store, fs, ino, content)
}

async fn read_at(fs: &Fs, fh: u64, offset: u64, size: u32) -> Vec<u8> {
    fs.read(fh, offset, size).await.unwrap().to_vec()
}

#[track_caller]
fn expect(content: &[u8], offset: u64, size: u32, got: &[u8]) {
    let start = (offset as usize).min(content.len());
    let end = (start + size as usize).min(content.len());
    same(got, &content[start..end], &format!("read of {size} at {offset}"));
}

#[test]
fn the_window_doubles_with_the_streak_up_to_its_maximum() {
    let ra = read::ReadAhead::with_chunk(16 * B, BlockSize::new(4096).unwrap(), 4 * B);
    let windows: Vec<u64> = (0..6).map(|s| ra.window(s)).collect();
    assert_eq!(windows, vec![0, 1, 2, 4, 4, 4]);
    let none = read::ReadAhead::with_chunk(0, BlockSize::new(4096).unwrap(), 4 * B);
    assert_eq!(none.window(5), 0, "read_ahead_kib=0 turns read-ahead off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_block_boundary_and_seek_pattern_reads_the_right_bytes() {
    for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
        let (_dir, _store, fs, ino, content) = setup(mode).await;
        let fh = fs.open(ino, false, false).await.unwrap();
        // 0, 1, B-1, B, B+1 in the first, second, a chunk-boundary and the last blocks, and past the end.
        let mut offsets = Vec::new();
        for block in [0u64, 1, 3, 4, 5, 16, 36, 37] {
            for d in [-1i64, 0, 1] {
                if let Some(o) = (block * B).checked_add_signed(d) {
                    offsets.push(o);
                }
            }
        }
        offsets.extend([SIZE as u64 - 1, SIZE as u64, SIZE as u64 + 1, 1 << 30]);
        for &o in &offsets {
            for size in [1u32, B as u32 - 1, B as u32, B as u32 + 1, 3 * B as u32, 100_000] {
                expect(&content, o, size, &read_at(&fs, fh, o, size).await);
            }
        }
        // Sequential streaks of several read sizes, each from a different start, cut by seeks.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..60 {
            let mut offset = rng.gen_range(0..SIZE as u64 + 10);
            let size = [1u32, 512, 4096, 5000, 16_384, 70_000][rng.gen_range(0..6)];
            for _ in 0..rng.gen_range(1..12) {
                let got = read_at(&fs, fh, offset, size).await;
                expect(&content, offset, size, &got);
                offset += got.len() as u64;
            }
        }
        // Backwards, block by block.
        let mut o = SIZE as u64;
        while o > 0 {
            o = o.saturating_sub(B / 2 + 1);
            expect(&content, o, 3000, &read_at(&fs, fh, o, 3000).await);
        }
        fs.release(fh).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_one_file_all_get_the_right_bytes() {
    let (_dir, _store, fs, ino, content) = setup(KeyMode::CseLocal).await;
    let content = Arc::new(content);
    let shared = fs.open(ino, false, false).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (fs, content) = (fs.clone(), content.clone());
        tasks.push(tokio::spawn(async move {
            // Even tasks share one handle (as the kernel does for one open file); odd ones have their own.
            let fh = if t % 2 == 0 {
                shared
            } else {
                fs.open(ino, false, false).await.unwrap()
            };
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(t);
            for round in 0..3 {
                if (t + round) % 3 == 0 {
                    let mut offset = 0u64;
                    loop {
                        let got = fs.read(fh, offset, 7000 + t as u32).await.unwrap();
                        expect(&content, offset, 7000 + t as u32, &got);
                        if got.is_empty() {
                            break;
                        }
                        offset += got.len() as u64;
                    }
                } else {
                    for _ in 0..40 {
                        let (o, n) = (rng.gen_range(0..SIZE as u64), rng.gen_range(1..20_000u32));
                        expect(&content, o, n, &fs.read(fh, o, n).await.unwrap());
                    }
                }
            }
            if t % 2 == 1 {
                fs.release(fh).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    fs.release(shared).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_costs_only_the_blocks_it_touches_and_a_streak_reads_ahead() {
    let (_dir, store, fs, ino, content) = setup(KeyMode::CseLocal).await;
    let fh = fs.open(ino, false, false).await.unwrap();
    let gets = || store.stats().count(OpKind::Get);
    let before = gets();
    // A program that reads a header and jumps: one GET per read, no read-ahead.
    expect(&content, 0, 100, &read_at(&fs, fh, 0, 100).await);
    expect(&content, 30 * B, 100, &read_at(&fs, fh, 30 * B, 100).await);
    assert_eq!(gets() - before, 2);
    let sealed = crate::format::sealed_block_len(BlockSize::new(4096).unwrap());
    assert_eq!(
        store.stats().bytes_down(OpKind::Get),
        2 * sealed,
        "exactly the two blocks"
    );
    fs.release(fh).await.unwrap();
    // A sequential reader in 1 KiB reads: 37 blocks come in a handful of chunk GETs, not one GET per read.
    let fh = fs.open(ino, false, false).await.unwrap();
    let before = gets();
    let mut offset = 0u64;
    while offset < SIZE as u64 {
        let got = read_at(&fs, fh, offset, 1024).await;
        expect(&content, offset, 1024, &got);
        offset += got.len() as u64;
    }
    let n = gets() - before;
    assert!(n <= 12, "{n} GETs for a sequential read of 38 blocks in chunks of 4");
    fs.release(fh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_ahead_memory_stays_in_its_budget_and_is_given_back_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let fs = Fs::new(
        store.clone(),
        Some(cse_keys()),
        small_chunks(dir.path(), KeyMode::CseLocal),
    )
    .unwrap();
    let content = data(1 << 20, 4);
    let mut inos = Vec::new();
    for name in ["a", "b", "c"] {
        let (attr, fh) = fs.create(ROOT_INO, name, 0o644, 1, 1).await.unwrap();
        fs.write(fh, 0, &content).await.unwrap();
        fs.release(fh).await.unwrap();
        inos.push(attr.ino);
    }
    // Three sequential readers abandoned halfway, then read on: the map never holds more than its budget.
    // Twice the 16-block window, and the 4-block chunk behind a reader (see `ReadAhead::with_chunk`).
    let budget = 2 * 16 * B + 4 * B;
    let mut handles = Vec::new();
    for &ino in &inos {
        let fh = fs.open(ino, false, false).await.unwrap();
        for k in 0..64u64 {
            let got = read_at(&fs, fh, k * 8192, 8192).await;
            expect(&content, k * 8192, 8192, &got);
            assert!(fs.reader.held() <= budget, "{} bytes held", fs.reader.held());
        }
        handles.push(fh);
    }
    for fh in handles {
        fs.release(fh).await.unwrap();
    }
    assert_eq!(
        fs.reader.held(),
        0,
        "closing the last handle drops the file's read-ahead"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_block_in_a_read_ahead_chunk_fails_only_its_own_reads() {
    let (dir, store, fs, _ino, content) = setup(KeyMode::CseLocal).await;
    drop(fs);
    // Flip one bit in block 6 (inside the second chunk) and store the object again, metadata unchanged.
    let got = store.get("vol/f", None, None).await.unwrap();
    let mut bytes = got.data.to_vec();
    let sealed = crate::format::sealed_block_len(BlockSize::new(4096).unwrap()) as usize;
    bytes[6 * sealed + 40] ^= 0x10;
    store
        .put(
            "vol/f",
            bytes.into(),
            &got.info.metadata,
            crate::store::PutCondition::None,
        )
        .await
        .unwrap();
    let fs = Fs::new(
        store.clone(),
        Some(cse_keys()),
        small_chunks(dir.path(), KeyMode::CseLocal),
    )
    .unwrap();
    let ino = fs.lookup(ROOT_INO, "f").await.unwrap().ino;
    let fh = fs.open(ino, false, false).await.unwrap();
    let mut offset = 0u64;
    let mut failed = Vec::new();
    while offset < SIZE as u64 {
        match fs.read(fh, offset, 2048).await {
            Ok(got) => expect(&content, offset, 2048, &got),
            Err(e) => {
                assert_eq!(e.errno(), libc::EIO, "{e}");
                failed.push(offset / B);
            }
        }
        offset += 2048;
    }
    assert_eq!(failed, vec![6, 6], "both reads of block 6, and nothing else, fail");
    fs.release(fh).await.unwrap();
}

/// Writes `n` files of `len` bytes (named `f0`, `f1`, ...) in blocks of `bs`, and returns a fresh file system
/// over the same store with small read-ahead chunks (nothing cached) and their inode numbers.
async fn files_for_reading(
    dir: &std::path::Path,
    store: &Arc<FailingStore<MemoryStore>>,
    n: usize,
    len: usize,
    bs: u64,
) -> (Arc<Fs>, Vec<u64>, Vec<u8>) {
    let write_cfg = FsConfig {
        block_size: BlockSize::new(bs as u32).unwrap(),
        ..config(dir, KeyMode::CseLocal)
    };
    let fs = Fs::new(store.clone(), Some(cse_keys()), write_cfg).unwrap();
    let content = data(len, 5);
    for k in 0..n {
        let (_attr, fh) = fs.create(ROOT_INO, &format!("f{k}"), 0o644, 1, 1).await.unwrap();
        fs.write(fh, 0, &content).await.unwrap();
        fs.release(fh).await.unwrap();
    }
    drop(fs);
    let fs = Fs::new(store.clone(), Some(cse_keys()), small_chunks(dir, KeyMode::CseLocal)).unwrap();
    let mut inos = Vec::new();
    for k in 0..n {
        inos.push(fs.lookup(ROOT_INO, &format!("f{k}")).await.unwrap().ino);
    }
    (fs, inos, content)
}

/// The object bytes of every file named `f*` in the store.
async fn stored_bytes(store: &FailingStore<MemoryStore>) -> u64 {
    let listed = store.inner().list("vol/f", None, None, None).await.unwrap();
    listed.objects.iter().map(|o| o.size).sum()
}

/// Many files read sequentially at once, over a slow store: the chunks held (in flight or fetched) stay within
/// the mount's budget, and a chunk in flight is never pushed out and fetched again, so each byte comes down
/// about once, not once per reader that pushed it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streaming_readers_stay_in_the_budget_without_fetching_twice() {
    use crate::store::failing::{Action, Rule, When};
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let (fs, inos, content) = files_for_reading(dir.path(), &store, 32, 64 * B as usize, B).await;
    let budget = 2 * 16 * B + 4 * B;
    store.add_rule(Rule::new(
        Some(OpKind::Get),
        When::Always,
        Action::Delay(std::time::Duration::from_millis(20)),
    ));
    let content = Arc::new(content);
    let mut tasks = Vec::new();
    for ino in inos {
        let (fs, content) = (fs.clone(), content.clone());
        tasks.push(tokio::spawn(async move {
            let fh = fs.open(ino, false, false).await.unwrap();
            let mut offset = 0u64;
            loop {
                let got = read_at(&fs, fh, offset, 8192).await;
                expect(&content, offset, 8192, &got);
                assert!(fs.reader.held() <= budget, "{} bytes held", fs.reader.held());
                if got.is_empty() {
                    break;
                }
                offset += got.len() as u64;
            }
            fs.release(fh).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (down, stored) = (store.stats().bytes_down(OpKind::Get), stored_bytes(&store).await);
    assert!(
        down <= stored + stored / 4,
        "{down} bytes downloaded for {stored} stored ({} GETs)",
        store.stats().count(OpKind::Get)
    );
}

/// Two handles reading one file sequentially, one ahead of the other: the one ahead passing a chunk does not
/// drop it under the one behind, which reads it from the chunk instead of fetching it (and its window) again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_of_one_file_share_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let len = 256 * B as usize;
    let (fs, inos, content) = files_for_reading(dir.path(), &store, 1, len, B).await;
    let (a, b) = (
        fs.open(inos[0], false, false).await.unwrap(),
        fs.open(inos[0], false, false).await.unwrap(),
    );
    let half = (len / 2) as u64;
    let mut at = [0u64, half];
    while at[0] < half {
        for (k, fh) in [a, b].into_iter().enumerate() {
            let got = read_at(&fs, fh, at[k], 8192).await;
            expect(&content, at[k], 8192, &got);
            at[k] += got.len() as u64;
        }
    }
    // B, ahead, goes on to the end; A reads what B read first, from the chunks B left for it.
    let down = store.stats().bytes_down(OpKind::Get);
    let stored = stored_bytes(&store).await;
    assert!(
        down <= stored + stored / 4,
        "{down} bytes downloaded for {stored} stored ({} GETs)",
        store.stats().count(OpKind::Get)
    );
    fs.release(a).await.unwrap();
    fs.release(b).await.unwrap();
    assert_eq!(fs.reader.held(), 0);
}

/// A file whose header names larger blocks than the mount's (64 KiB against 4 KiB): its chunks are counted in
/// its own blocks, so a chunk's GET is not sixteen times the configured chunk and the budget holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_larger_blocks_than_the_mount_s_stays_in_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(FailingStore::new(MemoryStore::new()));
    let (fs, inos, content) = files_for_reading(dir.path(), &store, 1, 1 << 20, 65_536).await;
    let budget = 2 * 16 * B + 4 * B;
    let fh = fs.open(inos[0], false, false).await.unwrap();
    let mut offset = 0u64;
    while offset < content.len() as u64 {
        let got = read_at(&fs, fh, offset, 8192).await;
        expect(&content, offset, 8192, &got);
        assert!(fs.reader.held() <= budget, "{} bytes held", fs.reader.held());
        offset += got.len() as u64;
    }
    let down = store.stats().bytes_down(OpKind::Get);
    let stored = stored_bytes(&store).await;
    assert!(
        down <= stored + stored / 4,
        "{down} bytes downloaded for {stored} stored"
    );
    fs.release(fh).await.unwrap();
}

/// A metadata copy by this mount (a chmod, the attributes after a write-behind upload) gives the object a new
/// ETag but keeps its bytes, so the state keeps its version (same id) with the new ETag. A read-ahead chunk still
/// in flight under the old ETag will fail its If-Match: a read under the new ETag must fetch anew, not wait on it
/// and fail with it (which no retry can mend: the base has already moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_in_flight_under_an_old_etag_is_not_reused() {
    use crate::store::failing::{Action, Rule, When};
    for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
        let (_dir, store, fs, ino, content) = setup(mode).await;
        let fh = fs.open(ino, false, false).await.unwrap();
        let file = fs.open_state(ino).unwrap();
        let now = file.state.lock().await.base.clone().unwrap();
        let key = file.state.lock().await.key.clone();
        let n = now.codec.block_count(now.plain_size);
        let old = super::codec::Version {
            etag: "\"before-the-copy\"".into(),
            ..now.clone()
        };
        store.add_rule(Rule::new(
            Some(OpKind::Get),
            When::Always,
            Action::Delay(Duration::from_millis(200)),
        ));
        let read::Chunk::Held(stale) = fs.ensure_chunk(&key, &old, 1, n) else {
            panic!("{mode}: the old chunk starts")
        };
        let read::Chunk::Held(fresh) = fs.ensure_chunk(&key, &now, 1, n) else {
            panic!("{mode}: a chunk under the new ETag starts")
        };
        assert!(stale.await.is_err(), "{mode}: the old ETag fails its If-Match");
        let run = fresh
            .await
            .unwrap_or_else(|e| panic!("{mode}: the chunk under the new ETag: {e}"));
        drop(run);
        // And a read of those blocks now gets them.
        store.clear_rules();
        expect(
            &content,
            4 * B,
            4 * B as u32,
            &read_at(&fs, fh, 4 * B, 4 * B as u32).await,
        );
        fs.release(fh).await.unwrap();
    }
}

/// [`Fs::read_inline`] as a FUSE thread calls it: on a thread that may block, inside the runtime's context.
async fn inline_read(fs: &Arc<Fs>, fh: u64, offset: u64, size: u32) -> Option<Vec<u8>> {
    let fs = fs.clone();
    tokio::task::spawn_blocking(move || fs.read_inline(fh, offset, size))
        .await
        .unwrap()
        .map(|r| r.unwrap().to_vec())
}

/// A read is answered inline only from what is at hand: the block cache, or a read-ahead chunk already fetched.
/// Anything else (blocks not fetched yet, a busy state, unsaved changes) takes the async path with no request
/// sent and no read counted in the streak; what is answered inline is the right bytes, and keeps the
/// read-ahead going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_answered_inline_only_from_blocks_at_hand() {
    for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
        let (_dir, store, fs, ino, content) = setup(mode).await;
        let fh = fs.open(ino, false, false).await.unwrap();
        let gets = store.stats().count(OpKind::Get);
        assert!(
            inline_read(&fs, fh, 0, 2 * B as u32).await.is_none(),
            "{mode}: nothing fetched yet"
        );
        assert_eq!(
            store.stats().count(OpKind::Get),
            gets,
            "{mode}: the inline path sent no GET"
        );
        // The first read (not a streak) fetches its own blocks into the block cache: read inline again after.
        expect(&content, 0, 2 * B as u32, &read_at(&fs, fh, 0, 2 * B as u32).await);
        let again = inline_read(&fs, fh, 100, 1000)
            .await
            .expect("cached blocks are answered inline");
        expect(&content, 100, 1000, &again);
        // A sequential streak: the first read of it takes the async path, which starts the read-ahead; every
        // read after it finds its chunk started (each inline read keeps the read-ahead going), so it is
        // answered inline once the chunk's GET has ended, to the end of the file. Handed-back tries are not
        // counted in the streak, or the window would outrun the budget.
        let mut offset = 2 * B;
        let (mut waited, mut reads) = (0, 0);
        let (hits, misses, _) = fs.cache.stats();
        while offset < content.len() as u64 {
            let mut got = None;
            for _ in 0..250 {
                got = inline_read(&fs, fh, offset, B as u32).await;
                if got.is_some() || waited == 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            let got = match got {
                Some(got) => got,
                None => {
                    waited += 1;
                    read_at(&fs, fh, offset, B as u32).await
                }
            };
            expect(&content, offset, B as u32, &got);
            offset += B;
            reads += 1;
        }
        assert_eq!(waited, 1, "{mode}: reads that took the async path");
        // Each block looked up in the block cache counts once, however many tries it took: read-ahead blocks
        // are not cached, so one miss per read.
        let (hits_now, misses_now, _) = fs.cache.stats();
        assert_eq!(misses_now - misses, reads, "{mode}: block cache misses counted");
        assert_eq!(hits_now, hits, "{mode}: block cache hits counted");
        fs.release(fh).await.unwrap();
        // Unsaved changes, or a busy state: the async path.
        let fh = fs.open(ino, true, false).await.unwrap();
        {
            let file = fs.open_state(ino).unwrap();
            let _busy = file.state.lock().await;
            assert!(
                inline_read(&fs, fh, 0, 100).await.is_none(),
                "{mode}: the state was held"
            );
        }
        fs.write(fh, 10, b"changed").await.unwrap();
        assert!(inline_read(&fs, fh, 0, 100).await.is_none(), "{mode}: unsaved changes");
        fs.release(fh).await.unwrap();
    }
}

/// A GET that panics (a bug, perhaps in a client library below) fails the reads that need its blocks with EIO:
/// a reader waiting on the read-ahead chunk it was fetching neither hangs nor panics, and once the cause is gone
/// the same blocks are fetched again and read right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_that_panics_fails_its_reads_with_eio_and_the_next_read_fetches_again() {
    use crate::store::failing::{Action, Rule, When};
    let (_dir, store, fs, ino, content) = setup(KeyMode::CseLocal).await;
    let fh = fs.open(ino, false, false).await.unwrap();
    // A streak, so that the reads after it wait on read-ahead chunks.
    for k in 0..4 {
        expect(&content, k * B, B as u32, &read_at(&fs, fh, k * B, B as u32).await);
    }
    store.add_rule(Rule::new(
        Some(OpKind::Get),
        When::Always,
        Action::Delay(Duration::from_millis(50)),
    ));
    store.add_rule(Rule::new(Some(OpKind::Get), When::Always, Action::Panic));
    let panics_before = store.stats().injected(OpKind::Get);
    let mut readers = Vec::new();
    for _ in 0..3 {
        let fs = fs.clone();
        readers.push(tokio::spawn(async move {
            let mut failed = 0;
            for k in 4..SIZE as u64 / B {
                let read = tokio::time::timeout(Duration::from_secs(10), fs.read(fh, k * B, B as u32)).await;
                match read.expect("a read waiting on a GET that panicked returns") {
                    Ok(_) => {}
                    Err(e) => {
                        assert_eq!(e.errno(), libc::EIO, "{e}");
                        failed += 1;
                    }
                }
            }
            failed
        }));
    }
    for r in readers {
        assert!(
            r.await.expect("the reader did not panic") > 0,
            "the panicking GETs failed reads"
        );
    }
    assert!(store.stats().injected(OpKind::Get) > panics_before, "GETs panicked");
    store.clear_rules();
    let mut offset = 0u64;
    while offset < SIZE as u64 {
        let got = read_at(&fs, fh, offset, B as u32).await;
        expect(&content, offset, B as u32, &got);
        offset += got.len() as u64;
    }
    fs.release(fh).await.unwrap();
}
