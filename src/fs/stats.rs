//! What the file-system core counts for metrics: events (authentication failures, conflicts, recovery files) as
//! counters updated where they happen, and state (block cache, pending uploads, open files, journal size) read
//! when asked, so nothing is kept twice. [`Fs::stats`] gives one snapshot; `crate::metrics` exports it.
use super::{lock, Fs};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Event counters of one file system, updated with relaxed atomics (each counter is independent).
#[derive(Debug, Default)]
pub struct FsCounters {
    auth_failures: AtomicU64,
    conflicts: AtomicU64,
    recovery_files: AtomicU64,
    lookups_prefetched: AtomicU64,
    lookups_indexed: AtomicU64,
    entries_plus: AtomicU64,
}

impl FsCounters {
    pub(super) fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn conflict(&self) {
        self.conflicts.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn recovery_file(&self) {
        self.recovery_files.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn lookup_prefetched(&self) {
        self.lookups_prefetched.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn entry_plus(&self) {
        self.entries_plus.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn lookups_indexed(&self, n: u64) {
        self.lookups_indexed.fetch_add(n, Ordering::Relaxed);
    }
}

/// The file system's numbers at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    /// Block lookups of the read path served from the block cache.
    pub block_cache_hits: u64,
    /// Block lookups that had to fetch from S3.
    pub block_cache_misses: u64,
    /// Plaintext bytes held in the block cache now.
    pub block_cache_bytes: u64,
    /// Blocks read from S3 that failed authentication (modified, truncated or sealed under another key).
    pub auth_failures: u64,
    /// Uploads refused because someone else changed the object first.
    pub conflicts: u64,
    /// Files written to the recovery directory.
    pub recovery_files: u64,
    /// Lookups answered by attributes fetched ahead for a long listing.
    pub lookups_prefetched: u64,
    /// Files of long listings whose attributes came from the directory's attribute index (no HEAD).
    pub lookups_indexed: u64,
    /// Directory entries sent with their attributes (READDIRPLUS), sparing the kernel a lookup each.
    pub entries_plus: u64,
    /// Files with data S3 does not have yet (being written, being saved, or waiting to retry).
    pub uploads_pending: u64,
    /// Open files (inodes with at least one open handle).
    pub open_files: u64,
    /// Bytes the volume's journal directory takes on disk now (allocated blocks: journal files are sparse).
    pub journal_bytes: u64,
}

impl Fs {
    /// A snapshot of the numbers. Reads the journal directory's size (one `readdir` and a `stat` per entry), so
    /// call it from a blocking context, as a metrics scrape does.
    pub fn stats(&self) -> FsStats {
        let (block_cache_hits, block_cache_misses, block_cache_bytes) = self.cache.stats();
        let open = lock(&self.open_files);
        let open_files = open.len() as u64;
        // A state locked right now is being changed or snapshotted: count it as unsaved rather than wait.
        let unsaved = |f: &super::write::OpenFile| f.state.try_lock().map_or(true, |st| st.unsaved()) as u64;
        let mut uploads_pending: u64 = open.values().map(|e| unsaved(&e.file)).sum();
        drop(open);
        uploads_pending += lock(&self.recovered).iter().map(|f| unsaved(f)).sum::<u64>();
        FsStats {
            block_cache_hits,
            block_cache_misses,
            block_cache_bytes,
            auth_failures: self.counters.auth_failures.load(Ordering::Relaxed),
            conflicts: self.counters.conflicts.load(Ordering::Relaxed),
            recovery_files: self.counters.recovery_files.load(Ordering::Relaxed),
            lookups_prefetched: self.counters.lookups_prefetched.load(Ordering::Relaxed),
            lookups_indexed: self.counters.lookups_indexed.load(Ordering::Relaxed),
            entries_plus: self.counters.entries_plus.load(Ordering::Relaxed),
            uploads_pending,
            open_files,
            journal_bytes: super::off_workers(|| dir_bytes(self.journal.dir())),
        }
    }
}

/// The total size of the files under `dir` (0 if it cannot be read), but for the journal's reserve, which holds
/// no data.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .filter(|e| e.file_name() != super::journal::RESERVE_FILE)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e
                .metadata()
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}
