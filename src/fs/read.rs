//! The read path: whole blocks by ranged GET, a block cache, and read-ahead for sequential readers.
//!
//! A random read asks for exactly the blocks it touches, in one ranged GET. A sequential read (one that starts
//! where the handle's last read ended, or at 0) works in chunks of blocks instead: it makes sure the chunks it
//! needs and the chunks of the read-ahead window after them are cached or being fetched, each chunk one GET
//! running in its own task, so several GETs are in flight ahead of the reader. Concurrent readers of one chunk
//! share its fetch. Every GET is conditional on the version's ETag, so a changed object is never mixed in.
//! An authentication failure is EIO for that read and a log line naming the object and block.
use super::blockcache::{Block, BlockCache};
use super::codec::Version;
use super::stats::FsCounters;
use super::{lock, Fs, FsError, FsResult};
use crate::format::{self, BlockSize, FormatError};
use crate::store::{ByteRange, ObjectStore};
use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// One fetched block, or why it could not be had (shared by every reader waiting on the fetch).
type BlockResult = Result<Block, Arc<FsError>>;
type ChunkFuture = Shared<BoxFuture<'static, Result<Arc<Vec<BlockResult>>, Arc<FsError>>>>;

/// Target bytes per read-ahead chunk (one GET).
const CHUNK_BYTES: u64 = 2 * 1024 * 1024;

pub struct ReadAhead {
    chunk_blocks: u64,
    window_chunks: u64,
    inflight: Arc<Mutex<HashMap<(u64, u64), ChunkFuture>>>,
}

impl ReadAhead {
    pub fn new(window_bytes: u64, bs: BlockSize) -> Self {
        let chunk_blocks = (CHUNK_BYTES / bs.get()).max(1);
        let window_chunks = window_bytes.div_ceil(chunk_blocks * bs.get());
        ReadAhead {
            chunk_blocks,
            window_chunks,
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

/// Fetches `blocks` of `v` with one ranged GET, then opens and caches each block on its own, so that a block
/// that fails authentication fails only the reads that need it.
async fn fetch_run(
    store: Arc<dyn ObjectStore>,
    cache: Arc<BlockCache>,
    counters: Arc<FsCounters>,
    key: String,
    v: Version,
    blocks: Range<u64>,
) -> FsResult<Vec<BlockResult>> {
    let r = v.codec.object_range(blocks.clone(), v.plain_size);
    let out = store
        .get(
            &key,
            Some(ByteRange::Range {
                start: r.start,
                end: r.end,
            }),
            Some(&v.etag),
        )
        .await?;
    if out.data.len() as u64 != r.end - r.start {
        log::error!(
            "{key}: short read of bytes {}..{} (got {})",
            r.start,
            r.end,
            out.data.len()
        );
        return Err(FsError::Format {
            key,
            source: FormatError::BadSize { size: out.info.size },
        });
    }
    let mut result = Vec::with_capacity((blocks.end - blocks.start) as usize);
    for i in blocks {
        let br = v.codec.object_range(i..i + 1, v.plain_size);
        let stored = &out.data[(br.start - r.start) as usize..(br.end - r.start) as usize];
        match v.codec.decode(v.plain_size, i, stored) {
            Ok(plain) => {
                let block: Block = Arc::new(plain);
                cache.insert(v.id, i, block.clone());
                result.push(Ok(block));
            }
            Err(source) => {
                if let FormatError::Auth { block } = source {
                    counters.auth_failure();
                    log::error!(
                        "{key}: authentication failed for block {block}: the object was modified, truncated or sealed under another key"
                    );
                }
                result.push(Err(Arc::new(FsError::Format {
                    key: key.clone(),
                    source,
                })));
            }
        }
    }
    Ok(result)
}

impl Fs {
    /// Reads `size` bytes at `offset` through handle `fh`.
    pub async fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let h = self.handle(fh)?;
        let st = h.file.state.lock().await;
        let clean = st.dirty.is_empty()
            && st
                .base
                .as_ref()
                .is_some_and(|b| st.base_valid == b.plain_size && st.size == b.plain_size);
        if !clean {
            let (file_size, bs) = (st.size, st.bs);
            drop(st);
            return self.read_modified(&h.file, file_size, bs, offset, size).await;
        }
        let Some(base) = st.base.clone() else {
            return Ok(Vec::new());
        };
        let key = st.key.clone();
        drop(st);
        if offset >= base.plain_size || size == 0 {
            return Ok(Vec::new());
        }
        let end = (offset + u64::from(size)).min(base.plain_size);
        let prev = h.last_read_end.swap(end, std::sync::atomic::Ordering::Relaxed);
        let sequential = offset == 0 || prev == offset;
        let blocks = format::blocks_touching(offset, end - offset, base.codec.block_size());
        let got = self.blocks_of(&key, &base, blocks.clone(), sequential).await?;
        Ok(assemble(&got, blocks.start, base.codec.block_len(), offset, end))
    }

    /// Reads an open file with unsaved changes: dirty blocks from memory or the journal, the rest from the base.
    async fn read_modified(
        &self,
        file: &super::write::OpenFile,
        file_size: u64,
        bs: BlockSize,
        offset: u64,
        size: u32,
    ) -> FsResult<Vec<u8>> {
        if offset >= file_size || size == 0 {
            return Ok(Vec::new());
        }
        let end = (offset + u64::from(size)).min(file_size);
        let blocks = format::blocks_touching(offset, end - offset, bs);
        let got: Vec<Block> = self
            .blocks_now(file, blocks.clone())
            .await?
            .into_iter()
            .map(Arc::new)
            .collect();
        Ok(assemble(&got, blocks.start, bs.get(), offset, end))
    }

    /// Blocks of the base version, from the cache or by GET (used by the write path).
    pub(super) async fn base_blocks(&self, key: &str, base: &Version, blocks: Range<u64>) -> FsResult<Vec<Block>> {
        self.blocks_of(key, base, blocks, false).await
    }

    async fn blocks_of(&self, key: &str, v: &Version, blocks: Range<u64>, sequential: bool) -> FsResult<Vec<Block>> {
        let mut got: Vec<Option<Block>> = blocks.clone().map(|i| self.cache.get(v.id, i)).collect();
        let mut chunks: HashMap<u64, ChunkFuture> = HashMap::new();
        if sequential {
            let ra = &self.reader;
            let n = v.codec.block_count(v.plain_size);
            let first = blocks.start / ra.chunk_blocks;
            let last = (blocks.end - 1) / ra.chunk_blocks + ra.window_chunks;
            for c in first..=last {
                if c * ra.chunk_blocks >= n {
                    break;
                }
                if let Some(f) = self.ensure_chunk(key, v, c, n) {
                    chunks.insert(c, f);
                }
            }
        }
        let mut i = 0usize;
        while i < got.len() {
            if got[i].is_some() {
                i += 1;
                continue;
            }
            let index = blocks.start + i as u64;
            if let Some(f) = chunks.get(&(index / self.reader.chunk_blocks)) {
                let chunk = f.clone().await.map_err(FsError::Shared)?;
                let chunk_start = (index / self.reader.chunk_blocks) * self.reader.chunk_blocks;
                match chunk.get((index - chunk_start) as usize) {
                    Some(Ok(b)) => got[i] = Some(b.clone()),
                    Some(Err(e)) => return Err(FsError::Shared(e.clone())),
                    None => {
                        let source = FormatError::BadSize { size: v.object_size };
                        return Err(FsError::Format {
                            key: key.to_string(),
                            source,
                        });
                    }
                }
                i += 1;
                continue;
            }
            let mut j = i;
            while j < got.len() && got[j].is_none() {
                j += 1;
            }
            let run = index..blocks.start + j as u64;
            let fetched = fetch_run(
                self.store.clone(),
                self.cache.clone(),
                self.counters.clone(),
                key.to_string(),
                v.clone(),
                run,
            )
            .await?;
            for (k, b) in fetched.into_iter().enumerate() {
                got[i + k] = Some(b.map_err(FsError::Shared)?);
            }
            i = j;
        }
        Ok(got.into_iter().flatten().collect())
    }

    /// Starts fetching chunk `c` unless it is cached or already in flight; returns the fetch to wait on.
    fn ensure_chunk(&self, key: &str, v: &Version, c: u64, n: u64) -> Option<ChunkFuture> {
        let cb = self.reader.chunk_blocks;
        let range = c * cb..((c + 1) * cb).min(n);
        let mut inflight = lock(&self.reader.inflight);
        if let Some(f) = inflight.get(&(v.id, c)) {
            return Some(f.clone());
        }
        if range.clone().all(|i| self.cache.contains(v.id, i)) {
            return None;
        }
        let (store, cache, counters, key2, v2, map) = (
            self.store.clone(),
            self.cache.clone(),
            self.counters.clone(),
            key.to_string(),
            v.clone(),
            self.reader.inflight.clone(),
        );
        let id = v.id;
        let fut: ChunkFuture = async move {
            let r = fetch_run(store, cache, counters, key2, v2, range)
                .await
                .map(Arc::new)
                .map_err(Arc::new);
            lock(&map).remove(&(id, c));
            r
        }
        .boxed()
        .shared();
        inflight.insert((v.id, c), fut.clone());
        drop(inflight);
        tokio::spawn(fut.clone());
        Some(fut)
    }
}

/// Copies bytes `offset..end` out of consecutive blocks starting at block `first`.
fn assemble(blocks: &[Block], first: u64, block_len: u64, offset: u64, end: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((end - offset) as usize);
    for (k, b) in blocks.iter().enumerate() {
        let start = (first + k as u64) * block_len;
        if start >= end {
            break;
        }
        let from = offset.max(start) - start;
        let to = (end.min(start + block_len) - start).min(b.len() as u64);
        if from < to {
            out.extend_from_slice(&b[from as usize..to as usize]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assemble_cuts_the_requested_bytes() {
        let blocks: Vec<Block> = vec![Arc::new(vec![1; 4]), Arc::new(vec![2; 4]), Arc::new(vec![3; 2])];
        assert_eq!(assemble(&blocks, 5, 4, 22, 29), vec![1, 1, 2, 2, 2, 2, 3]);
        assert_eq!(assemble(&blocks, 5, 4, 20, 21), vec![1]);
    }
}
