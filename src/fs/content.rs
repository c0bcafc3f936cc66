//! What a block of an open file holds now: one answer for the read path, the write path and uploads.
//!
//! Block `i` of an open file is, in this order: its plaintext in the state's cache, its sealed copy in the journal,
//! the base version's block `i` cut at `base_valid`, or zeros. [`FileState::source`] says which; the functions
//! here produce the bytes. The state's lock is held only while memory and the journal (local disk) are read; base
//! blocks come from the block cache or S3 with no lock held, and a writer that needed one checks, once it has the
//! lock again, that the block's source did not change meanwhile.
use super::write::{FileState, OpenFile};
use super::{Fs, FsError, FsResult};
use crate::format::{self, BlockSize};
use std::ops::Range;
use std::sync::Arc;

/// How much of a file's object [`Fs::keep_for_handles`] fetches per GET.
const MATERIALIZE_BYTES: u64 = 8 << 20;

/// Where block `i`'s current content comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cached,
    Journal,
    /// The base's block, whose first `valid` bytes are still part of the file.
    Base {
        valid: usize,
    },
    Zeros,
}

impl FileState {
    pub fn source(&self, i: u64) -> Source {
        if self.cache.contains_key(&i) {
            return Source::Cached;
        }
        if self.dirty.contains(&i) {
            return Source::Journal;
        }
        let b = self.bs.get();
        let start = i.saturating_mul(b);
        match &self.base {
            Some(_) if start < self.base_valid => Source::Base {
                valid: (self.base_valid - start).min(b) as usize,
            },
            _ => Source::Zeros,
        }
    }
}

/// How a written block starts before the write's bytes go in.
enum Start {
    /// The write covers the whole block.
    Whole,
    Have(Vec<u8>),
    Journal,
}

fn journal_lost(key: &str, i: u64) -> FsError {
    log::error!("{key}: journal block {i} failed authentication (the local journal was damaged)");
    FsError::Local(std::io::Error::other(format!("block {i} is damaged")))
}

/// A whole block (`len` bytes) whose content is the base's block `src` up to `valid`, zeros after: a base block
/// cut where the file's valid part of the base ends.
fn base_block(src: &[u8], valid: usize, len: usize) -> Vec<u8> {
    let mut block = vec![0u8; len];
    let n = valid.min(src.len());
    block[..n].copy_from_slice(&src[..n]);
    block
}

/// A write's bytes, owned, in pieces cut at the file's block boundaries where the caller could: a piece that is
/// exactly one whole block of the write becomes that block's cached plaintext as it is, without a copy. Any other
/// cut (or none) is only slower: pieces are copied where they do not match a block.
#[derive(Debug, Default)]
pub struct WriteData {
    pieces: Vec<Vec<u8>>,
    /// Where each piece starts in the write.
    starts: Vec<usize>,
    len: usize,
    /// The inode written, when the writer lacks CAP_FSETID and the mount clears set-user-ID bits itself
    /// (`FUSE_WRITE_KILL_SUIDGID`).
    kill_set_id: Option<u64>,
}

impl WriteData {
    /// `data`, written at `offset`, copied in pieces that end at the boundaries of blocks of `bs`.
    pub fn cut(data: &[u8], offset: u64, bs: BlockSize) -> WriteData {
        let mut w = WriteData::default();
        for (_, _, bytes) in format::write_pieces(offset, data.len(), bs) {
            w.push(data[bytes].to_vec());
        }
        w
    }

    /// The same write, marked as one that drops the set-user-ID and set-group-ID bits of the inode it names, if
    /// any (see [`super::dir::without_set_id`]).
    pub fn killing_set_id(mut self, ino: Option<u64>) -> WriteData {
        self.kill_set_id = ino;
        self
    }

    fn push(&mut self, piece: Vec<u8>) {
        self.starts.push(self.len);
        self.len += piece.len();
        self.pieces.push(piece);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `pos..pos + n` of the write, owned: the piece itself when it is exactly that range (it is then empty
    /// in `self`, so each range may be taken once), otherwise a copy.
    fn take(&mut self, pos: usize, n: usize) -> Vec<u8> {
        let k = self.starts.partition_point(|s| *s <= pos).saturating_sub(1);
        if self.starts.get(k) == Some(&pos) && self.pieces[k].len() == n {
            return std::mem::take(&mut self.pieces[k]);
        }
        let mut out = Vec::with_capacity(n);
        let mut k = k;
        while out.len() < n {
            let (start, piece) = (self.starts[k], &self.pieces[k]);
            let from = pos + out.len() - start;
            let m = (piece.len() - from).min(n - out.len());
            out.extend_from_slice(&piece[from..from + m]);
            k += 1;
        }
        out
    }
}

impl From<&[u8]> for WriteData {
    fn from(data: &[u8]) -> WriteData {
        let mut w = WriteData::default();
        if !data.is_empty() {
            w.push(data.to_vec());
        }
        w
    }
}

/// Bytes an unprivileged writer may still use on the file system that holds `dir`.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) fills the zeroed struct it is given; the path is a valid C string.
    let mut sv: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut sv) } != 0 {
        return None;
    }
    Some((sv.f_bavail as u64).saturating_mul(sv.f_frsize as u64))
}

fn join_err(e: tokio::task::JoinError) -> FsError {
    FsError::Local(std::io::Error::other(e))
}

impl Fs {
    /// The current plaintext of `blocks` of an open file, whole blocks, zero-padded.
    pub(super) async fn blocks_now(&self, file: &OpenFile, blocks: Range<u64>) -> FsResult<Vec<Vec<u8>>> {
        let (mut out, needs, base, key, b) = {
            let st = file.state.lock().await;
            let b = st.bs.get() as usize;
            let mut out: Vec<Option<Vec<u8>>> = Vec::new();
            let (mut from_journal, mut needs) = (Vec::new(), Vec::new());
            for i in blocks.clone() {
                out.push(match st.source(i) {
                    Source::Cached => st.cache.get(&i).cloned(),
                    Source::Journal => {
                        from_journal.push(i);
                        None
                    }
                    Source::Base { valid } => {
                        needs.push((i, valid));
                        None
                    }
                    Source::Zeros => Some(vec![0u8; b]),
                });
            }
            if let (false, Some(j)) = (from_journal.is_empty(), st.journal.clone()) {
                let idx = from_journal.clone();
                let read = tokio::task::spawn_blocking(move || {
                    idx.iter()
                        .map(|i| j.read_block(*i))
                        .collect::<std::io::Result<Vec<_>>>()
                })
                .await
                .map_err(join_err)??;
                for (i, block) in from_journal.into_iter().zip(read) {
                    out[(i - blocks.start) as usize] = Some(block.ok_or_else(|| journal_lost(&st.key, i))?);
                }
            }
            (out, needs, st.base.clone(), st.key.clone(), b)
        };
        if let (Some(&(first, _)), Some(&(last, _)), Some(base)) = (needs.first(), needs.last(), base) {
            let got = self.base_blocks(&key, &base, first..last + 1).await?;
            for (i, valid) in needs {
                out[(i - blocks.start) as usize] = Some(base_block(&got[(i - first) as usize], valid, b));
            }
        }
        Ok(out.into_iter().map(|b| b.unwrap_or_default()).collect())
    }

    /// Copies every block an open file still reads from its object into the journal, so that its open handles
    /// keep reading (and writing) it once the object is gone: called before an unlink or a rename over it deletes
    /// the object. A file with no base, or all of whose blocks are local, costs nothing; otherwise the remote
    /// blocks come by ranged GETs of `MATERIALIZE_BYTES` at a time (memory is bounded by that, not by the file).
    /// On success the file no longer has a base, so nothing it reads comes from S3 again. When the copy would take
    /// more than half of the journal disk's free space it is skipped (and logged): the handles keep what the
    /// mount holds, and reads of anything else fail once the object is gone.
    pub(super) async fn keep_for_handles(&self, file: &Arc<OpenFile>) -> FsResult<()> {
        let (remote, key) = {
            let st = file.state.lock().await;
            let b = st.bs.get();
            let n = if st.base.is_some() {
                st.base_valid.div_ceil(b)
            } else {
                0
            };
            let remote = (0..n).filter(|i| matches!(st.source(*i), Source::Base { .. })).count() as u64;
            (remote * b, st.key.clone())
        };
        if remote == 0 {
            return Ok(());
        }
        // The copy must not fill the journal's disk: past half of its free space, the handles keep only what
        // this mount holds (its own changes, and blocks in the cache); other reads fail once the object is gone.
        let free = free_bytes(self.journal.dir()).unwrap_or(u64::MAX);
        if remote > free / 2 {
            log::warn!(
                "{key}: unlinked while open; its {} MiB in S3 are not copied to the journal ({} MiB free in \
                 staging_dir): its open handles can read only what this mount holds",
                remote >> 20,
                free >> 20
            );
            return Ok(());
        }
        let mut next = 0u64;
        let mut stale_tries = 0;
        loop {
            let (needs, base, key, journal) = {
                let mut st = file.state.lock().await;
                let Some(base) = st.base.clone() else {
                    return Ok(());
                };
                let b = st.bs.get();
                let n = st.base_valid.div_ceil(b);
                let per = (MATERIALIZE_BYTES / b).max(1);
                let mut needs = Vec::new();
                let mut i = next;
                while i < n && needs.len() < per as usize {
                    if let Source::Base { valid } = st.source(i) {
                        needs.push((i, valid));
                    }
                    i += 1;
                }
                if needs.is_empty() {
                    // Everything below the base's valid size is local now: the object is not needed any more.
                    st.base = None;
                    st.base_valid = 0;
                    return Ok(());
                }
                self.ensure_journal(&mut st)?;
                (needs, base, st.key.clone(), st.journal.clone())
            };
            let (first, last) = (needs[0].0, needs[needs.len() - 1].0);
            let got = match self.base_blocks(&key, &base, first..last + 1).await {
                Ok(got) => got,
                Err(e) if super::read::is_stale(&e) && stale_tries < super::read::STALE_RETRIES => {
                    stale_tries += 1;
                    self.await_base_move(file, Some((base.id, base.etag.clone())), e)
                        .await?;
                    next = 0;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut st = file.state.lock().await;
            if st.base.as_ref().map(|v| v.id) != Some(base.id) {
                // A new version became the base meanwhile (this mount's upload): start over from it.
                next = 0;
                continue;
            }
            let bl = st.bs.get() as usize;
            let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
            for (i, valid) in needs {
                if st.source(i) != (Source::Base { valid }) {
                    continue;
                }
                blocks.push((i, base_block(&got[(i - first) as usize], valid, bl)));
            }
            let journal = journal.ok_or(FsError::BadHandle)?;
            let written: Vec<u64> = blocks.iter().map(|(i, _)| *i).collect();
            tokio::task::spawn_blocking(move || {
                blocks.iter().try_for_each(|(i, block)| journal.write_block(*i, block))
            })
            .await
            .map_err(join_err)??;
            st.dirty.extend(written);
            next = last + 1;
        }
    }

    /// Writes `data` at `offset`: every touched block is sealed into the journal before this returns.
    pub(super) async fn write_at(&self, file: &Arc<OpenFile>, offset: u64, data: WriteData) -> FsResult<()> {
        let mut stale_tries = 0;
        loop {
            let (edges, base, key) = {
                let st = file.state.lock().await;
                let end = Self::write_end(&st, offset, data.len())?;
                (self.edge_needs(&st, offset, end), st.base.clone(), st.key.clone())
            };
            let base_id = base.as_ref().map(|b| b.id);
            let mut fetched = Vec::new();
            for &(i, valid) in &edges {
                let Some(base) = &base else {
                    fetched.push((i, valid, Vec::new()));
                    continue;
                };
                match self.base_blocks(&key, base, i..i + 1).await {
                    Ok(got) => fetched.push((i, valid, got.first().map(|b| b.to_vec()).unwrap_or_default())),
                    // The base's ETag moved under the GET (this mount's own upload loop, most likely): start
                    // again from what the state names once it has the new one.
                    Err(e) if super::read::is_stale(&e) && stale_tries < super::read::STALE_RETRIES => {
                        stale_tries += 1;
                        let seen = Some((base.id, base.etag.clone()));
                        self.await_base_move(file, seen, e).await?;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if fetched.len() < edges.len() {
                continue;
            }
            let mut st = file.state.lock().await;
            let unchanged = st.base.as_ref().map(|b| b.id) == base_id
                && fetched
                    .iter()
                    .all(|(i, valid, _)| st.source(*i) == super::content::Source::Base { valid: *valid });
            if !unchanged {
                continue;
            }
            self.apply_write(&mut st, offset, data, fetched).await?;
            self.write_behind(file, &mut st);
            // A writer far ahead of its uploads waits for them here (the data is in the journal already).
            let pace = st.wb.as_ref().and_then(|w| w.pace(st.whole_blocks()));
            drop(st);
            if let Some(part_ended) = pace {
                self.pace(file, part_ended).await;
            }
            return Ok(());
        }
    }

    /// The partial blocks at either end of a write whose current content is the base's.
    fn edge_needs(&self, st: &FileState, offset: u64, end: u64) -> Vec<(u64, usize)> {
        let b = st.bs.get();
        let mut edges = Vec::new();
        for (i, partial) in [
            (offset / b, !offset.is_multiple_of(b) || end - offset < b),
            ((end - 1) / b, !end.is_multiple_of(b)),
        ] {
            if let (true, Source::Base { valid }) = (partial, st.source(i)) {
                if !edges.iter().any(|(j, _)| *j == i) {
                    edges.push((i, valid));
                }
            }
        }
        edges
    }

    /// Seals the written blocks into the journal and records them, under the state's lock.
    async fn apply_write(
        &self,
        st: &mut FileState,
        offset: u64,
        data: WriteData,
        fetched: Vec<(u64, usize, Vec<u8>)>,
    ) -> FsResult<()> {
        let mut w = self.prepare_write(st, offset, data, fetched)?;
        let sealed = tokio::task::spawn_blocking(move || {
            let sealed = w.seal();
            (w, sealed)
        })
        .await
        .map_err(join_err)?;
        self.record_write(st, sealed.0, sealed.1)
    }

    /// Does a write on the calling thread, which may block on the journal's file I/O (a FUSE thread, never an
    /// async worker), when nothing in it waits for the network: the file's state is free and neither partial end
    /// block has to come from S3. A small write then costs one sealing and the journal's writes, without the
    /// hand-offs to the async workers and the blocking pool and back, which were most of its time. Gives `data`
    /// back when the write has to take the async path ([`write_data`](Self::write_data)). On success, the
    /// write may have to be answered later, when the writer is far ahead of its uploads ([`hold`](Self::hold)).
    /// The caller enters the runtime's context (the write-behind may start tasks).
    pub fn write_inline(&self, fh: u64, offset: u64, data: WriteData) -> Result<InlineWrite, WriteData> {
        // Anything the async path would refuse is handed back, for it to refuse with its own answer.
        let Ok(h) = self.write_handle(fh) else { return Err(data) };
        if data.is_empty() {
            return Err(data);
        }
        let Ok(mut st) = h.file.state.try_lock() else {
            return Err(data);
        };
        let n = data.len() as u32;
        let Ok(end) = Self::write_end(&st, offset, data.len()) else {
            return Err(data);
        };
        if !self.edge_needs(&st, offset, end).is_empty() {
            return Err(data);
        }
        let mut w = match self.prepare_write(&mut st, offset, data, Vec::new()) {
            Ok(w) => w,
            Err(e) => return Ok(InlineWrite::Done(Err(e))),
        };
        let sealed = w.seal();
        if let Err(e) = self.record_write(&mut st, w, sealed) {
            return Ok(InlineWrite::Done(Err(e)));
        }
        self.write_behind(&h.file, &mut st);
        let pace = st.wb.as_ref().and_then(|w| w.pace(st.whole_blocks()));
        drop(st);
        Ok(match pace {
            Some(part_ended) => InlineWrite::Held(HeldWrite {
                n,
                file: h.file.clone(),
                part_ended,
            }),
            None => InlineWrite::Done(Ok(n)),
        })
    }

    /// Answers a write done inline once the writer has been held as [`pace`](Self::pace) holds it.
    pub async fn hold(&self, w: HeldWrite) -> FsResult<u32> {
        self.pace(&w.file, w.part_ended).await;
        Ok(w.n)
    }

    /// Builds what sealing a write needs from the state (the blocks it touches and where each one's current
    /// content is), under the state's lock.
    fn prepare_write(
        &self,
        st: &mut FileState,
        offset: u64,
        mut data: WriteData,
        fetched: Vec<(u64, usize, Vec<u8>)>,
    ) -> FsResult<SealJob> {
        self.ensure_journal(st)?;
        if let Some(ino) = data.kill_set_id {
            let (was, perm) = (st.attr.perm, super::dir::without_set_id(st.attr.perm));
            if perm != was {
                // In the manifest before the data: a recovered file never carries the bits with the new content.
                // A failed save puts them back in the state, so that the next write drops them again.
                st.attr.perm = perm;
                if let Err(e) = st.save_manifest() {
                    st.attr.perm = was;
                    return Err(e);
                }
                st.touch(false);
                // A write's answer carries no attributes: the kernel would show the old mode until its TTL.
                self.attr_changed(ino);
            }
        }
        let b = st.bs.get();
        let end = offset + data.len() as u64;
        st.changing(offset / b, end.div_ceil(b));
        let bl = b as usize;
        let mut ops: Vec<(u64, Start, usize, Vec<u8>)> = Vec::new();
        for (i, from, bytes) in format::write_pieces(offset, data.len(), st.bs) {
            let start = if bytes.len() == bl {
                Start::Whole
            } else {
                match st.source(i) {
                    Source::Cached => Start::Have(st.cache.remove(&i).unwrap_or_else(|| vec![0u8; bl])),
                    Source::Journal => Start::Journal,
                    Source::Base { valid } => {
                        let src = fetched.iter().find(|f| f.0 == i).map(|f| &f.2[..]).unwrap_or(&[]);
                        Start::Have(base_block(src, valid, bl))
                    }
                    Source::Zeros => Start::Have(vec![0u8; bl]),
                }
            };
            ops.push((i, start, from, data.take(bytes.start, bytes.len())));
        }
        Ok(SealJob {
            journal: st.journal.clone().ok_or(FsError::BadHandle)?,
            ops,
            bl,
            grown: (end > st.size).then_some(end),
            end,
            key: st.key.clone(),
            // Taken for the sealing: a write that fails drops it (its blocks may be staged but not recorded), so
            // the parts it held are read from the journal.
            staging: st.wb.as_mut().and_then(|w| w.staging.take()),
        })
    }

    /// Records a sealed write in the state: its blocks are dirty and cached, the size and times move.
    fn record_write(&self, st: &mut FileState, job: SealJob, sealed: FsResult<Vec<(u64, Vec<u8>)>>) -> FsResult<()> {
        let written = sealed?;
        if let Some(w) = st.wb.as_mut() {
            w.staging = job.staging;
        }
        for (i, block) in written {
            st.dirty.insert(i);
            st.cache.insert(i, block);
        }
        st.trim_cache(self.cfg.max_dirty_bytes.max(st.bs.get()));
        st.size = st.size.max(job.end);
        st.touch(true);
        Ok(())
    }
}

/// What [`Fs::write_inline`] did.
pub enum InlineWrite {
    /// The write is done (or failed): answer at once.
    Done(FsResult<u32>),
    /// The write is done, and the writer is far ahead of its uploads: answer after [`Fs::hold`].
    Held(HeldWrite),
}

/// A write done inline whose answer waits for a write-behind part to end (see [`Fs::hold`]).
pub struct HeldWrite {
    n: u32,
    file: Arc<OpenFile>,
    part_ended: tokio::sync::watch::Receiver<usize>,
}

/// A write's blocks on their way into the journal: built under the state's lock, sealed on a thread that may
/// block, recorded under the lock again.
struct SealJob {
    journal: Arc<super::journal::Journal>,
    ops: Vec<(u64, Start, usize, Vec<u8>)>,
    bl: usize,
    grown: Option<u64>,
    end: u64,
    key: String,
    staging: Option<super::writebehind::Staging>,
}

impl SealJob {
    fn seal(&mut self) -> FsResult<Vec<(u64, Vec<u8>)>> {
        let ops = std::mem::take(&mut self.ops);
        seal_ops(
            &self.journal,
            ops,
            self.bl,
            self.grown,
            &self.key,
            self.staging.as_mut(),
        )
        .map_err(|e| e.in_journal(&self.key, || self.journal.at()))
    }
}

/// Seals the consecutive blocks `first..` into the journal, part by part: into the part being staged where it takes
/// them, into a buffer of their own otherwise.
fn seal_staged(
    journal: &super::journal::Journal,
    s: &mut super::writebehind::Staging,
    first: u64,
    plains: &[&[u8]],
) -> std::io::Result<()> {
    let pp = s.per_part();
    let mut j = 0;
    while j < plains.len() {
        let i = first + j as u64;
        let n = (pp - i % pp).min((plains.len() - j) as u64);
        let blocks = &plains[j..j + n as usize];
        match s.sink(i, n) {
            Some(part) => {
                journal.write_run_into(i, blocks, part)?;
                s.filled();
            }
            None => {
                journal.write_run(i, blocks)?;
            }
        }
        j += n as usize;
    }
    Ok(())
}

/// Builds each written block, seals them into the journal and records a new size; returns the plaintext blocks.
fn seal_ops(
    journal: &super::journal::Journal,
    ops: Vec<(u64, Start, usize, Vec<u8>)>,
    bl: usize,
    grown: Option<u64>,
    key: &str,
    mut staging: Option<&mut super::writebehind::Staging>,
) -> FsResult<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::with_capacity(ops.len());
    for (i, start, from, bytes) in ops {
        let block = match start {
            Start::Whole => bytes,
            Start::Have(mut block) => {
                block.resize(bl, 0);
                block[from..from + bytes.len()].copy_from_slice(&bytes);
                block
            }
            Start::Journal => {
                let mut block = journal.read_block(i)?.ok_or_else(|| journal_lost(key, i))?;
                block.resize(bl, 0);
                block[from..from + bytes.len()].copy_from_slice(&bytes);
                block
            }
        };
        out.push((i, block));
    }
    // The blocks of one write are consecutive: sealed together, written with one pwrite per run.
    let mut k = 0;
    while k < out.len() {
        let mut run = 1;
        while k + run < out.len() && out[k + run].0 == out[k].0 + run as u64 {
            run += 1;
        }
        let plains: Vec<&[u8]> = out[k..k + run].iter().map(|(_, b)| &b[..]).collect();
        match staging.as_deref_mut() {
            // The journal's slots are the object's bytes: sealed straight into the staged part where it takes them.
            Some(s) if journal.is_object_format() => seal_staged(journal, s, out[k].0, &plains)?,
            staging => {
                journal.write_run(out[k].0, &plains)?;
                // The SSE modes stage the plaintext: the object holds it.
                if let Some(s) = staging {
                    for (i, plain) in &out[k..k + run] {
                        s.push(*i, plain);
                    }
                }
            }
        }
        k += run;
    }
    if let Some(size) = grown {
        journal.record_size(size)?;
    }
    Ok(out)
}

#[cfg(test)]
mod write_data_tests {
    use super::WriteData;
    use crate::format::BlockSize;

    fn bs4k() -> BlockSize {
        BlockSize::new(4_096).unwrap()
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn cut_ends_pieces_at_block_boundaries() {
        let data = bytes(10_000);
        // Written at 1,000 in blocks of 4,096: 3,096 to the first boundary, one whole block, the rest.
        let w = WriteData::cut(&data, 1_000, bs4k());
        let lens: Vec<usize> = w.pieces.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![3_096, 4_096, 2_808]);
        assert_eq!(w.len(), 10_000);
        assert_eq!(w.pieces.concat(), data);
    }

    #[test]
    fn take_hands_over_a_matching_piece_and_copies_any_other_range() {
        let data = bytes(10_000);
        let mut w = WriteData::cut(&data, 1_000, bs4k());
        let whole = w.pieces[1].as_ptr();
        let block = w.take(3_096, 4_096);
        assert_eq!(block.as_ptr(), whole, "the whole block is the piece itself, not a copy");
        assert_eq!(block, data[3_096..7_192]);
        // Ranges that do not match a piece are copies, also across pieces.
        assert_eq!(w.take(0, 100), data[..100]);
        assert_eq!(w.take(100, 2_996), data[100..3_096]);
        assert_eq!(w.take(7_192, 2_808), data[7_192..]);
        let mut one: WriteData = data.as_slice().into();
        assert_eq!(one.take(5_000, 4_096), data[5_000..9_096]);
        let mut fresh = WriteData::cut(&data, 1_000, bs4k());
        assert_eq!(
            fresh.take(2_000, 7_000),
            data[2_000..9_000],
            "a range over three pieces"
        );
    }

    #[test]
    fn empty_writes_have_no_pieces() {
        assert!(WriteData::cut(&[], 5, bs4k()).is_empty());
        assert!(WriteData::from(&[][..]).is_empty());
    }
}
