//! The read path: whole blocks by ranged GET, a block cache, and read-ahead that grows with a sequential streak.
//!
//! A random read asks for exactly the blocks it touches, in one ranged GET. A read that starts near where the
//! handle's last read ended (within twice its own length: the kernel's read-ahead arrives as several requests
//! served concurrently, not always in order) extends the handle's streak, and a streak works in chunks of blocks instead: the chunks the
//! read needs and a window of chunks after them are fetched, each chunk one GET of up to [`CHUNK_BYTES`] in its
//! own task. The window starts at one chunk and doubles with every sequential read up to `read_ahead_kib`; a seek
//! resets it, so a program that reads a header and jumps costs no more than the blocks it touched. Chunks are
//! kept, fetched or in flight, in a mount-wide map until every streaming handle of the file has passed them or
//! the file's last handle closes, bounded by a budget of twice the largest window: a new chunk pushes out the
//! oldest fetched ones (readers that went away) to fit. A chunk still in flight is never pushed out (its buffer
//! lives until the GET ends, so dropping it would free nothing and fetch it again), nor one an active streaming
//! handle has yet to read; when the budget holds nothing but such chunks, a read fetches just its own blocks
//! and the window waits. So the chunks' memory
//! stays within the budget however many files are read at once. Concurrent readers of one chunk share its
//! fetch. A chunk is [`CHUNK_BYTES`] of the file's own blocks (its header's block size, which need not be the
//! mount's). Every GET is conditional on the version's ETag, so a changed object is never mixed in.
//!
//! A GET's body is opened in place, on the blocking pool (so opening spreads over the cores and never stalls an
//! async worker): each block's plaintext is packed to the front of the body's own buffer, and the blocks are
//! slices of it. A read that lies in consecutive blocks of one buffer is answered with a slice of it, no copy.
//! An authentication failure is EIO for the reads of that block and a log line naming the object and block.
use super::blockcache::Block;
use super::codec::Version;
use super::stats::FsCounters;
use super::write::OpenFile;
use super::{lock, Fs, FsError, FsResult, Handle};
use crate::format::{self, BlockSize, FormatError};
use crate::store::{ByteRange, ObjectStore};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One fetched block, or why it could not be had (shared by every reader waiting on the fetch).
type BlockResult = Result<Block, Arc<FsError>>;
type ChunkFuture = Shared<BoxFuture<'static, Result<Arc<FetchedRun>, Arc<FsError>>>>;

/// Bytes per read-ahead chunk (one GET), at most: large enough that a GET's fixed cost is small against its
/// transfer, small enough that the first chunks of a streak arrive quickly. 16 MiB: on the local test server
/// cold 1 GiB reads went from 248-284 MB/s with 8 MiB chunks to 301-347 with 16 MiB (same 32 MiB window, peak
/// RSS 111 MiB against 103); the first read of a handle is not a streak and fetches only its own blocks.
pub const CHUNK_BYTES: u64 = 16 * 1024 * 1024;

/// Blocks `first..first + blocks.len()` of one version, as one GET returned them.
pub struct FetchedRun {
    first: u64,
    blocks: Vec<BlockResult>,
}

struct ChunkEntry {
    fut: ChunkFuture,
    bytes: u64,
    /// When it was started, in insertions: the oldest go first when the budget is exceeded.
    tick: u64,
    /// The ETag its GET is conditional on.
    etag: String,
}

impl ChunkEntry {
    fn in_flight(&self) -> bool {
        self.fut.peek().is_none()
    }

    /// Whether a read of version `etag` may take its blocks: fetched under that ETag, or fetched already. A
    /// metadata copy by this mount gives the object a new ETag but keeps its bytes and the version's id, so
    /// blocks fetched before it stay good; a GET still in flight under the old ETag fails its If-Match.
    fn serves(&self, etag: &str) -> bool {
        self.etag == etag || matches!(self.fut.peek(), Some(Ok(_)))
    }
}

#[derive(Default)]
struct Chunks {
    map: HashMap<(u64, u64), ChunkEntry>,
    bytes: u64,
    tick: u64,
    /// Each streaming handle's place, by handle: a chunk is passed once every streaming handle of its version is
    /// beyond it. One entry per open handle that read sequentially, gone at its release.
    readers: HashMap<u64, Reader>,
}

/// Where a streaming handle reads.
struct Reader {
    /// The version it reads.
    id: u64,
    /// The first chunk it may still read (the one before the chunk of its last read: see `passed`).
    chunk: u64,
    /// When it last read.
    at: Instant,
}

impl Reader {
    /// Whether it reads on: a handle idle for [`READER_IDLE`] no longer keeps chunks from being dropped.
    fn active(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.at) < READER_IDLE
    }
}

/// How long a streaming handle that stopped reading (but is still open) keeps the chunks ahead of it.
const READER_IDLE: Duration = Duration::from_secs(2);

impl Chunks {
    /// Drops the chunks of version `id` before chunk `c`.
    fn drop_before(&mut self, id: u64, c: u64) {
        let old: Vec<(u64, u64)> = self.map.keys().filter(|k| k.0 == id && k.1 < c).copied().collect();
        for k in old {
            self.remove(&k);
        }
    }

    fn remove(&mut self, k: &(u64, u64)) {
        if let Some(e) = self.map.remove(k) {
            self.bytes -= e.bytes;
        }
    }

    /// Whether an active streaming handle of chunk `k`'s version has yet to read it.
    fn wanted(&self, k: (u64, u64), now: Instant) -> bool {
        self.readers
            .values()
            .any(|r| r.id == k.0 && r.chunk <= k.1 && r.active(now))
    }

    /// Drops the oldest fetched chunks that no active reader has ahead of it until `more` bytes fit in `budget`;
    /// false if they do not fit even then (the rest is in flight, or still to be read). Dropping a chunk a reader
    /// is coming to would only fetch it again.
    fn make_room(&mut self, more: u64, budget: u64) -> bool {
        let now = Instant::now();
        while self.bytes + more > budget {
            let oldest = self
                .map
                .iter()
                .filter(|(k, e)| !e.in_flight() && !self.wanted(**k, now))
                .min_by_key(|(_, e)| e.tick)
                .map(|(k, _)| *k);
            let Some(oldest) = oldest else { return false };
            self.remove(&oldest);
        }
        true
    }
}

/// What [`Fs::ensure_chunk`] found or did.
pub(super) enum Chunk {
    /// Held in the map (fetched, or in flight): wait on it.
    Held(ChunkFuture),
    /// Every block of it is in the block cache.
    Cached,
    /// The budget holds only chunks in flight or still to be read: not started.
    NoRoom,
}

pub struct ReadAhead {
    /// Plaintext bytes per chunk: [`CHUNK_BYTES`] or less (see [`ReadAhead::chunk_blocks`]).
    chunk_bytes: u64,
    /// The largest window, in chunks (0: no read-ahead).
    max_window: u64,
    /// Bytes of chunks the map may hold, mount-wide.
    budget: u64,
    chunks: Arc<Mutex<Chunks>>,
}

impl ReadAhead {
    /// Read-ahead in chunks of `chunk_bytes` (rounded to whole blocks) and windows of up to `window_bytes`.
    pub fn with_chunk(window_bytes: u64, bs: BlockSize, chunk_bytes: u64) -> Self {
        let chunk_bytes = chunk_bytes.min(window_bytes).max(bs.get());
        let chunk_blocks = (chunk_bytes / bs.get()).max(1);
        let max_window = window_bytes / (chunk_blocks * bs.get());
        ReadAhead {
            chunk_bytes: chunk_blocks * bs.get(),
            max_window,
            // The window ahead twice over (a reader's next window starts while the last one is still held), and
            // the chunk behind the reader, whose last blocks the kernel's concurrent read-ahead requests may still
            // ask for: evicting it refetched the whole chunk.
            budget: (2 * max_window + 1) * chunk_blocks * bs.get(),
            chunks: Arc::new(Mutex::new(Chunks::default())),
        }
    }

    /// The window, in chunks, for a handle whose streak is `streak` sequential reads long.
    pub fn window(&self, streak: u32) -> u64 {
        match streak {
            0 => 0,
            s => (1u64 << (s - 1).min(32)).min(self.max_window),
        }
    }

    /// Blocks per chunk of a file in blocks of `bs` (its own block size: a chunk is at least one block).
    fn chunk_blocks(&self, bs: BlockSize) -> u64 {
        (self.chunk_bytes / bs.get()).max(1)
    }

    /// Handle `fh` streams version `id` from chunk `c` on: drops the chunks of `id` that every active streaming
    /// handle of it has passed.
    fn passed(&self, fh: u64, id: u64, c: u64) {
        let mut chunks = lock(&self.chunks);
        let now = Instant::now();
        chunks.readers.insert(fh, Reader { id, chunk: c, at: now });
        let lowest = chunks
            .readers
            .values()
            .filter(|r| r.id == id && r.active(now))
            .map(|r| r.chunk)
            .min()
            .unwrap_or(c);
        chunks.drop_before(id, lowest);
    }

    /// Handle `fh` is released: it no longer holds back the chunks it had not passed.
    pub fn gone(&self, fh: u64) {
        lock(&self.chunks).readers.remove(&fh);
    }

    /// Drops every chunk of version `id` (its file is no longer open).
    pub fn forget(&self, id: u64) {
        lock(&self.chunks).drop_before(id, u64::MAX);
    }

    /// Bytes held by fetched or fetching chunks.
    #[cfg(test)]
    pub fn held(&self) -> u64 {
        lock(&self.chunks).bytes
    }
}

/// Fetches `blocks` of `v` with one ranged GET, then opens them on the blocking pool, each on its own, so that a
/// block that fails authentication fails only the reads that need it. A panic below (in the store's client, say)
/// is an error of this fetch: every read waiting on it gets EIO, where a read-ahead chunk's shared future would
/// otherwise leave the readers waiting on it pending for ever, and panic any that polls it later.
async fn fetch_run(
    store: Arc<dyn ObjectStore>,
    counters: Arc<FsCounters>,
    key: String,
    v: Version,
    blocks: Range<u64>,
) -> FsResult<FetchedRun> {
    match std::panic::AssertUnwindSafe(fetch_run_here(store, counters, key.clone(), v, blocks.clone()))
        .catch_unwind()
        .await
    {
        Ok(fetched) => fetched,
        Err(_) => {
            let what = format!("{key}: the GET of blocks {}..{}", blocks.start, blocks.end);
            log::error!("{what} panicked; the reads that need those blocks fail with EIO");
            Err(FsError::Panicked(what))
        }
    }
}

async fn fetch_run_here(
    store: Arc<dyn ObjectStore>,
    counters: Arc<FsCounters>,
    key: String,
    v: Version,
    blocks: Range<u64>,
) -> FsResult<FetchedRun> {
    let r = v.codec.object_range(blocks.clone(), v.plain_size);
    log::trace!("{key}: GET blocks {}..{}", blocks.start, blocks.end);
    let out = store
        .get_pieces(
            &key,
            Some(ByteRange::Range {
                start: r.start,
                end: r.end,
            }),
            Some(&v.etag),
        )
        .await?;
    if out.len() as u64 != r.end - r.start {
        log::error!("{key}: short read of bytes {}..{} (got {})", r.start, r.end, out.len());
        return Err(FsError::Format {
            key,
            source: FormatError::BadSize { size: out.info.size },
        });
    }
    let (codec, plain_size, first) = (v.codec.clone(), v.plain_size, blocks.start);
    let pieces = out.pieces;
    let opened = tokio::task::spawn_blocking(move || codec.open_run(plain_size, first, pieces))
        .await
        .map_err(|e| FsError::Local(std::io::Error::other(e)))?;
    let blocks = opened
        .into_iter()
        .map(|b| {
            b.map_err(|source| {
                if let FormatError::Auth { block } = source {
                    counters.auth_failure();
                    log::error!(
                        "{key}: authentication failed for block {block}: the object was modified, truncated or sealed under another key"
                    );
                }
                Arc::new(FsError::Format {
                    key: key.clone(),
                    source,
                })
            })
        })
        .collect();
    Ok(FetchedRun { first, blocks })
}

impl Fs {
    /// Reads `size` bytes at `offset` through handle `fh`.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Bytes> {
        let h = self.handle(fh)?;
        let mut window = None;
        let mut attempts = 0;
        loop {
            let seen = base_mark(&h.file).await;
            match self.read_once(&h, fh, offset, size, &mut window).await {
                Err(e) if is_stale(&e) && attempts < STALE_RETRIES => {
                    attempts += 1;
                    self.await_base_move(&h.file, seen, e).await?;
                }
                r => return r,
            }
        }
    }

    /// One try of [`Self::read`]; `window`: the read-ahead for this read, worked out on the first try (the
    /// sequential streak counts each read once).
    async fn read_once(
        &self,
        h: &Handle,
        fh: u64,
        offset: u64,
        size: u32,
        window: &mut Option<u64>,
    ) -> FsResult<Bytes> {
        let st = h.file.state.lock().await;
        let Some(base) = st.clean_base().cloned() else {
            let (file_size, bs) = (st.size, st.bs);
            drop(st);
            return self.read_modified(&h.file, file_size, bs, offset, size).await;
        };
        let key = st.key.clone();
        drop(st);
        if offset >= base.plain_size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + u64::from(size)).min(base.plain_size);
        let window = *window.get_or_insert_with(|| self.reader.window(h.streak(offset, end)));
        let blocks = format::blocks_touching(offset, end - offset, base.codec.block_size());
        let got = self
            .blocks_of(&key, &base, blocks.clone(), (window > 0).then_some((fh, window)))
            .await?;
        Ok(assemble(&got, blocks.start, base.codec.block_len(), offset, end))
    }

    /// After a GET of the file's base failed its `If-Match` (`stale`): waits until the state no longer names the
    /// base it named before the GET (`seen`), so that the caller can start again from the state.
    ///
    /// This mount's own upload loop moves the ETag under readers and writers: a metadata copy (a chmod, xattrs,
    /// the attributes after a write-behind upload) keeps the bytes and changes the ETag, and a committed upload
    /// makes a new version; S3 has the new ETag a moment before the loop records it. `Err(stale)` when the state
    /// still names the same base and no upload of this file is running (someone else changed the object), or
    /// after `upload_timeout`.
    pub(super) async fn await_base_move(
        &self,
        file: &OpenFile,
        seen: Option<(u64, String)>,
        stale: FsError,
    ) -> FsResult<()> {
        let deadline = tokio::time::Instant::now() + self.cfg.upload_timeout;
        let mut status = file.status.subscribe();
        loop {
            status.borrow_and_update();
            if base_mark(file).await != seen {
                return Ok(());
            }
            if !file.running.load(std::sync::atomic::Ordering::SeqCst) || tokio::time::Instant::now() >= deadline {
                return Err(stale);
            }
            // The loop reports every round it ends (saved or failed); the tick covers a loop that stops between.
            let tick = (tokio::time::Instant::now() + std::time::Duration::from_millis(100)).min(deadline);
            let _ = tokio::time::timeout_at(tick, status.changed()).await;
        }
    }

    /// Reads an open file with unsaved changes: dirty blocks from memory or the journal, the rest from the base.
    async fn read_modified(
        &self,
        file: &super::write::OpenFile,
        file_size: u64,
        bs: BlockSize,
        offset: u64,
        size: u32,
    ) -> FsResult<Bytes> {
        if offset >= file_size || size == 0 {
            return Ok(Bytes::new());
        }
        let end = (offset + u64::from(size)).min(file_size);
        let blocks = format::blocks_touching(offset, end - offset, bs);
        let got: Vec<Block> = self
            .blocks_now(file, blocks.clone())
            .await?
            .into_iter()
            .map(Block::owned)
            .collect();
        Ok(assemble(&got, blocks.start, bs.get(), offset, end))
    }

    /// Blocks of the base version, from the cache or by GET (used by the write path).
    pub(super) async fn base_blocks(&self, key: &str, base: &Version, blocks: Range<u64>) -> FsResult<Vec<Block>> {
        self.blocks_of(key, base, blocks, None).await
    }

    /// Starts the read-ahead of a streaming read of `blocks` (handle `fh`, `window` chunks past the last one
    /// the read needs) and returns the chunks held for the read and its window.
    fn read_ahead(
        &self,
        key: &str,
        v: &Version,
        blocks: &Range<u64>,
        fh: u64,
        window: u64,
    ) -> HashMap<u64, ChunkFuture> {
        let cb = self.reader.chunk_blocks(v.codec.block_size());
        let (first, needed) = (blocks.start / cb, (blocks.end - 1) / cb);
        let mut chunks = HashMap::new();
        // In bytes too: a file of larger blocks than the mount's has larger chunks, so fewer of them.
        let window_bytes = self.reader.max_window * self.reader.chunk_bytes;
        let window = window.min(window_bytes / (cb * v.codec.block_size().get()));
        let n = v.codec.block_count(v.plain_size);
        // The kernel's read-ahead sends reads concurrently and they arrive out of order: one just behind this
        // read may still need the previous chunk, which would otherwise be fetched again.
        self.reader.passed(fh, v.id, first.saturating_sub(1));
        for c in first..=needed + window {
            if c * cb >= n {
                break;
            }
            match self.ensure_chunk(key, v, c, n) {
                Chunk::Held(f) => {
                    chunks.insert(c, f);
                }
                Chunk::Cached => {}
                // A chunk this read needs is fetched by the caller, just its blocks; the window waits for room.
                Chunk::NoRoom if c <= needed => {}
                Chunk::NoRoom => break,
            }
        }
        chunks
    }

    /// [`read`](Self::read) answered on the calling thread (a FUSE thread) when nothing in it waits: the file has
    /// no unsaved changes and its state is free, and every block asked for is in the block cache or in a
    /// read-ahead chunk already fetched. The read-ahead goes on as `read` keeps it going (the caller enters the
    /// runtime's context: chunks are fetched by tasks). `None`: take the async path, which then counts the read
    /// in the handle's streak (this counts it only when it answers).
    pub fn read_inline(&self, fh: u64, offset: u64, size: u32) -> Option<FsResult<Bytes>> {
        let h = self.handle(fh).ok()?;
        let (base, key) = {
            let st = h.file.state.try_lock().ok()?;
            (st.clean_base()?.clone(), st.key.clone())
        };
        if offset >= base.plain_size || size == 0 {
            return Some(Ok(Bytes::new()));
        }
        let end = (offset + u64::from(size)).min(base.plain_size);
        let blocks = format::blocks_touching(offset, end - offset, base.codec.block_size());
        let got = self.blocks_ready(&base, blocks.clone())?;
        let window = self.reader.window(h.streak(offset, end));
        if window > 0 {
            self.read_ahead(&key, &base, &blocks, fh, window);
        }
        Some(Ok(assemble(&got, blocks.start, base.codec.block_len(), offset, end)))
    }

    /// Blocks `blocks` of `v` if each one is at hand without waiting (block cache, or a chunk whose GET has
    /// ended and opened it), else `None` (a block that failed to open is left to the async path, which reports it).
    ///
    /// The block cache's hits and misses are counted only when every block is at hand: a read handed back is
    /// looked up again, and counted, by the async path.
    fn blocks_ready(&self, v: &Version, blocks: Range<u64>) -> Option<Vec<Block>> {
        let mut got: Vec<Option<Block>> = blocks.clone().map(|i| self.cache.find(v.id, i)).collect();
        let cached: Vec<bool> = got.iter().map(Option::is_some).collect();
        if cached.contains(&false) {
            let cb = self.reader.chunk_blocks(v.codec.block_size());
            let held = lock(&self.reader.chunks);
            for (i, slot) in blocks.zip(got.iter_mut()).filter(|(_, b)| b.is_none()) {
                let e = held.map.get(&(v.id, i / cb)).filter(|e| e.serves(&v.etag))?;
                let run = e.fut.peek()?.as_ref().ok()?;
                let k = i.checked_sub(run.first)?;
                *slot = Some(run.blocks.get(k as usize)?.clone().ok()?);
            }
        }
        cached.into_iter().for_each(|hit| self.cache.count(hit));
        got.into_iter().collect()
    }

    /// `blocks` of `v`: from the cache, from read-ahead chunks (for a `stream`, handle `fh` reading
    /// sequentially with a `window` of chunks ahead, started first), or by one GET per run of missing blocks.
    /// Blocks fetched for this read alone enter the cache; read-ahead chunks are held in their own map until the
    /// file's streaming handles pass them.
    async fn blocks_of(
        &self,
        key: &str,
        v: &Version,
        blocks: Range<u64>,
        stream: Option<(u64, u64)>,
    ) -> FsResult<Vec<Block>> {
        let mut got: Vec<Option<Block>> = blocks.clone().map(|i| self.cache.get(v.id, i)).collect();
        let cb = self.reader.chunk_blocks(v.codec.block_size());
        let mut chunks: HashMap<u64, ChunkFuture> = HashMap::new();
        let (first, needed) = (blocks.start / cb, (blocks.end - 1) / cb);
        if let Some((fh, window)) = stream {
            chunks = self.read_ahead(key, v, &blocks, fh, window);
        } else {
            // Not (yet, or any more) a sequential streak: no new chunks, but blocks a chunk already holds or is
            // fetching are taken from it rather than fetched a second time.
            let held = lock(&self.reader.chunks);
            for c in first..=needed {
                if let Some(e) = held.map.get(&(v.id, c)).filter(|e| e.serves(&v.etag)) {
                    chunks.insert(c, e.fut.clone());
                }
            }
        }
        let mut i = 0usize;
        while i < got.len() {
            let index = blocks.start + i as u64;
            if got[i].is_some() {
                i += 1;
                continue;
            }
            if let Some(f) = chunks.get(&(index / cb)) {
                let run = f.clone().await.map_err(FsError::Shared)?;
                if let Some(b) = index.checked_sub(run.first).and_then(|k| run.blocks.get(k as usize)) {
                    // Not cached: a streaming reader does not come back, and a cached slice would keep its
                    // whole chunk's buffer alive after the reader passed it.
                    got[i] = Some(b.clone().map_err(FsError::Shared)?);
                    i += 1;
                    continue;
                }
                if index >= run.first {
                    let source = FormatError::BadSize { size: v.object_size };
                    return Err(FsError::Format {
                        key: key.to_string(),
                        source,
                    });
                }
                // Cached when the chunk started, evicted since: fetched on its own below.
            }
            let mut j = i + 1;
            while j < got.len() && got[j].is_none() && !chunks.contains_key(&((blocks.start + j as u64) / cb)) {
                j += 1;
            }
            let run = index..blocks.start + j as u64;
            let fetched = fetch_run(
                self.store.clone(),
                self.counters.clone(),
                key.to_string(),
                v.clone(),
                run,
            )
            .await?;
            for (k, b) in fetched.blocks.into_iter().enumerate() {
                let block = b.map_err(FsError::Shared)?;
                self.cache.insert(v.id, index + k as u64, block.clone());
                got[i + k] = Some(block);
            }
            i = j;
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// Starts fetching chunk `c` (from its first block not cached) unless it is cached or already held, if the
    /// budget has room for it once fetched chunks are pushed out (see [`Chunks::make_room`]).
    pub(super) fn ensure_chunk(&self, key: &str, v: &Version, c: u64, n: u64) -> Chunk {
        let cb = self.reader.chunk_blocks(v.codec.block_size());
        let mut chunks = lock(&self.reader.chunks);
        match chunks.map.get(&(v.id, c)) {
            Some(e) if e.serves(&v.etag) => return Chunk::Held(e.fut.clone()),
            // Its GET fails or failed under an ETag the object no longer has: fetched anew below (the old one,
            // when it ends, leaves the new entry alone: its tick differs).
            Some(_) => chunks.remove(&(v.id, c)),
            None => {}
        }
        let end = ((c + 1) * cb).min(n);
        let Some(start) = (c * cb..end).find(|&i| !self.cache.contains(v.id, i)) else {
            return Chunk::Cached;
        };
        let bytes = (end - start) * v.codec.block_len();
        if !chunks.make_room(bytes, self.reader.budget) {
            return Chunk::NoRoom;
        }
        let (store, counters, key, v2) = (self.store.clone(), self.counters.clone(), key.to_string(), v.clone());
        let map = self.reader.chunks.clone();
        chunks.tick += 1;
        let tick = chunks.tick;
        let id = v.id;
        let fut: ChunkFuture = async move {
            let fetched = fetch_run(store, counters, key, v2, start..end).await;
            if fetched.is_err() {
                // A failed fetch is not kept: the next read of the chunk asks again.
                let mut chunks = lock(&map);
                if chunks.map.get(&(id, c)).is_some_and(|e| e.tick == tick) {
                    chunks.remove(&(id, c));
                }
            }
            fetched.map(Arc::new).map_err(Arc::new)
        }
        .boxed()
        .shared();
        chunks.bytes += bytes;
        chunks.map.insert(
            (v.id, c),
            ChunkEntry {
                fut: fut.clone(),
                bytes,
                tick,
                etag: v.etag.clone(),
            },
        );
        drop(chunks);
        tokio::spawn(fut.clone());
        Chunk::Held(fut)
    }
}

/// Tries of a read or write whose base's ETag went stale under it (see [`Fs::await_base_move`]).
pub(super) const STALE_RETRIES: u32 = 4;

/// What the file's state names as its base: the version and its ETag.
pub(super) async fn base_mark(file: &OpenFile) -> Option<(u64, String)> {
    file.state.lock().await.base.as_ref().map(|b| (b.id, b.etag.clone()))
}

/// A GET that failed its `If-Match`: the object's ETag is no longer the version's.
pub(super) fn is_stale(e: &FsError) -> bool {
    matches!(
        e.root(),
        FsError::Store(crate::store::StoreError::PreconditionFailed(_))
    )
}

/// Bytes `offset..end` out of consecutive blocks starting at block `first`: a slice of their buffer when they
/// lie next to each other in one, else a copy.
fn assemble(blocks: &[Block], first: u64, block_len: u64, offset: u64, end: u64) -> Bytes {
    let mut pieces: Vec<(usize, usize, usize)> = Vec::with_capacity(blocks.len());
    for (k, b) in blocks.iter().enumerate() {
        let start = (first + k as u64) * block_len;
        if start >= end {
            break;
        }
        let from = offset.max(start) - start;
        let to = (end.min(start + block_len) - start).min(b.len() as u64);
        if from < to {
            pieces.push((k, from as usize, to as usize));
        }
    }
    let (Some(&(k0, from, _)), Some(&(kn, _, to))) = (pieces.first(), pieces.last()) else {
        return Bytes::new();
    };
    let chained = blocks[k0..=kn].windows(2).all(|w| w[0].followed_by(&w[1]));
    if chained {
        if let Some(b) = blocks[k0].span_to(from, &blocks[kn], to) {
            return b;
        }
    }
    let mut out = Vec::with_capacity((end - offset) as usize);
    for (k, from, to) in pieces {
        out.extend_from_slice(&blocks[k][from..to]);
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assemble_cuts_the_requested_bytes() {
        let blocks: Vec<Block> = vec![
            Block::owned(vec![1; 4]),
            Block::owned(vec![2; 4]),
            Block::owned(vec![3; 2]),
        ];
        assert_eq!(assemble(&blocks, 5, 4, 22, 29), vec![1, 1, 2, 2, 2, 2, 3]);
        assert_eq!(assemble(&blocks, 5, 4, 20, 21), vec![1]);
        // Blocks packed in one buffer: the same bytes, as a slice of it.
        let buf = Bytes::from(vec![1, 1, 1, 1, 2, 2, 2, 2, 3, 3]);
        let packed: Vec<Block> = vec![
            Block::slice(&buf, 0..4),
            Block::slice(&buf, 4..8),
            Block::slice(&buf, 8..10),
        ];
        let got = assemble(&packed, 5, 4, 22, 29);
        assert_eq!(got, vec![1, 1, 2, 2, 2, 2, 3]);
        assert_eq!(got.as_ptr(), buf[2..].as_ptr(), "no copy");
    }
}
