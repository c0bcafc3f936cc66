//! Crash safety through a real daemon process (`s3crypt mount -f`): `kill -9` at random moments while a program
//! writes through the mount, then a fresh daemon on the same volume (same `staging_dir`), whose recovery of the
//! write-back journal runs before the mount answers; hostile truncates against the daemon's peak memory; and the
//! daemon's log under ordinary use (no warnings).
//!
//! The rules under test (the journal's promise, see `src/fs/journal.rs` and `src/fs/uploader.rs`):
//! - after the next mount each object is its previous complete version or the new one, never a mix (torn);
//! - every byte whose `write()` returned before the kill is in S3, or in the recovery directory;
//! - no multipart upload of the volume is left pending, and the journal holds no entry once recovery saved it.
//!
//! The kill moments come from a seeded generator (`CRASH_SEED`, default 1, printed); the test's output names
//! where each kill landed (which write, or the close) and what the next mount made of it.
mod common;

use common::mount::{close_checked, write_file, TestMount, Volume};
use common::proxy::FaultProxy;
use rand::{Rng, RngCore, SeedableRng};
use s3crypt::keys::KeyMode;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_s3crypt");
const MIB: usize = 1 << 20;
/// The small file: 200 KB in 4 KiB writes.
const SMALL: usize = 200_000;
const SMALL_WRITE: usize = 4096;
/// The big files: 100 MiB in 1 MiB writes (multipart: over 16 MiB).
const BIG: usize = 100 * MIB;
const BIG_WRITE: usize = MIB;
/// The rewrite in the middle of the existing big file.
const PATCH_AT: usize = 50 * MIB + 123;
const PATCH_LEN: usize = 4096;
/// The peak resident memory a daemon may reach in the truncate test, KiB.
const HWM_LIMIT_KIB: u64 = 256 * 1024;

/// The tests take turns: each moves hundreds of MiB (or 3 GiB) through the one local server, and a recovery slowed
/// down by another test's traffic would blur what is being checked.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------------------------
// The daemon process

fn is_mounted(mnt: &Path) -> bool {
    let parent = mnt.parent().unwrap();
    match (fs::metadata(mnt), fs::metadata(parent)) {
        (Ok(m), Ok(p)) => m.dev() != p.dev(),
        _ => false,
    }
}

/// A mount point left by a killed daemon: "Transport endpoint is not connected".
fn is_stale(mnt: &Path) -> bool {
    matches!(fs::metadata(mnt), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

/// Lazily detaches whatever is mounted on `mnt` (a live or a stale mount) and waits until it is gone.
fn detach(mnt: &Path) {
    if !is_mounted(mnt) && !is_stale(mnt) {
        return;
    }
    let ok = Command::new("umount")
        .arg("-l")
        .arg(mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("fusermount3").arg("-uz").arg(mnt).status();
    }
    let start = Instant::now();
    while is_mounted(mnt) || is_stale(mnt) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} stays mounted",
            mnt.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `s3crypt mount s3://BUCKET MNT -f -o ...` process, its standard error in `log`. Dropped while still
/// running (a failed test), it is killed and its mount point detached.
struct Daemon {
    child: Child,
    mnt: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon and waits until the mount answers (which is after its recovery of the journal).
    fn start(vol: &Volume, mnt: &Path, log: PathBuf, extra: &[&str]) -> Daemon {
        let mut words = vol.options.clone();
        words.extend(extra.iter().map(|s| s.to_string()));
        let stderr = File::create(&log).expect("daemon log file");
        let child = Command::new(BIN)
            .args(["mount", &format!("s3://{}", vol.bucket)])
            .arg(mnt)
            .args(["-f", "-o", &words.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn s3crypt mount -f");
        let mut d = Daemon {
            child,
            mnt: mnt.to_path_buf(),
            log,
        };
        let start = Instant::now();
        while !is_mounted(mnt) {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("the daemon exited ({st}) before mounting:\n{}", d.log_tail(40));
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "no mount after 180 s:\n{}",
                d.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child, which has not been reaped yet (only `wait`/`try_wait` reap it).
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "kill({}, {sig})", self.pid());
    }

    /// `kill -9`. The mount point stays stale (every call on it fails with ENOTCONN) until [`detach`]: a program
    /// still running cannot fall through to the bare directory underneath.
    fn kill9(mut self) {
        assert!(
            self.running() && is_mounted(&self.mnt),
            "the daemon to be killed had already stopped serving:\n{}",
            self.log_tail(30)
        );
        self.signal(libc::SIGKILL);
        self.child.wait().expect("reap the killed daemon");
        // Drop would detach the mount point; the caller does that once its writer has stopped.
        self.mnt = PathBuf::new();
    }

    /// SIGTERM and the exit status (the daemon saves open files and unmounts first).
    fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no exit 120 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The peak resident set size so far (VmHWM), KiB.
    fn vm_hwm_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc/PID/status");
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM line");
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("VmHWM in kB")
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if !self.mnt.as_os_str().is_empty() {
            detach(&self.mnt);
        }
        if std::thread::panicking() {
            eprintln!("--- {} (tail) ---\n{}", self.log.display(), self.log_tail(30));
        }
    }
}

/// On a failing test, copies the daemons' logs (`daemon-*.log` in `dir`, which is about to be deleted) to a
/// directory that stays, and says where.
struct KeepLogs<'a>(&'a Path);

impl Drop for KeepLogs<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let keep = std::env::temp_dir().join(format!("s3crypt-crash-logs-{}", std::process::id()));
        let _ = fs::create_dir_all(&keep);
        for e in fs::read_dir(self.0).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().ends_with(".log") {
                let _ = fs::copy(e.path(), keep.join(e.file_name()));
            }
        }
        eprintln!("daemon logs kept in {}", keep.display());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Content, S3 and journal probes

/// `len` bytes of a stream fixed by `seed` (fast enough for 100 MiB, and different for every seed).
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn patched(base: &[u8], seed: u64) -> Vec<u8> {
    let mut v = base.to_vec();
    v[PATCH_AT..PATCH_AT + PATCH_LEN].copy_from_slice(&content(seed, PATCH_LEN));
    v
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// The file as the mount reads it; `None` if it does not exist.
fn read_object(mnt: &Path, name: &str) -> Option<Vec<u8>> {
    match fs::read(mnt.join(name)) {
        Ok(v) => Some(v),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => panic!("reading {name} through the mount: {e}"),
    }
}

/// Every file in the volume's journal directories (`<staging_dir>/journal/<volume id>/`).
fn journal_files(vol: &Volume) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(volumes) = fs::read_dir(vol.dir.path().join("journal")) else {
        return out;
    };
    for dir in volumes.flatten() {
        if let Ok(entries) = fs::read_dir(dir.path()) {
            out.extend(entries.flatten().map(|e| e.path()));
        }
    }
    out
}

fn journal_manifests(vol: &Volume) -> Vec<PathBuf> {
    journal_files(vol)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "manifest"))
        .collect()
}

/// Entries of the journal without a manifest (blocks, sizes or redo files nothing refers to any more).
fn journal_orphans(vol: &Volume) -> Vec<PathBuf> {
    let files = journal_files(vol);
    files
        .iter()
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("blocks" | "sizes" | "redo")
            )
        })
        .filter(|p| !files.contains(&p.with_extension("manifest")))
        .cloned()
        .collect()
}

/// The recovery directory's files for `name` (named `<key>.<nanoseconds>`).
fn recovery_files(vol: &Volume, name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(rd) = fs::read_dir(vol.recovery_dir()) else {
        return Vec::new();
    };
    let prefix = format!("{name}.");
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| (e.path(), fs::read(e.path()).unwrap()))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// The writer: a program writing through the mount, recording what the file system acknowledged

const STARTING: u8 = 0;
const WRITING: u8 = 1;
const CLOSING: u8 = 2;
const CLOSED: u8 = 3;
const STOPPED: u8 = 4;

/// What the writer is doing now, for the main thread to aim its kill and to say where it landed.
#[derive(Default)]
struct Progress {
    phase: AtomicU8,
    /// Bytes of the current version acknowledged so far.
    acked: AtomicU64,
    /// Closes started (the small file has many versions).
    closes: AtomicU64,
    /// Versions started.
    versions: AtomicU64,
    /// The writer has its data and is about to open the file: the kill's clock starts.
    ready: std::sync::atomic::AtomicBool,
}

impl Progress {
    fn at(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    fn describe(&self) -> String {
        let acked = self.acked.load(Ordering::SeqCst);
        let v = self.versions.load(Ordering::SeqCst);
        match self.phase.load(Ordering::SeqCst) {
            STARTING => "before the first open".into(),
            WRITING => format!("writing version {v}, {acked} bytes acknowledged"),
            CLOSING => format!("in close() of version {v} (all {acked} bytes acknowledged)"),
            CLOSED => format!("after close() of version {v} returned 0"),
            _ => "after the writer stopped".into(),
        }
    }
}

/// What a writer was told by the file system before its first error.
#[derive(Debug, Default)]
struct Outcome {
    /// The seed of the last version whose close() returned 0.
    closed: Option<u64>,
    /// The version in progress when the writer stopped: its seed and the bytes acknowledged (a prefix for the
    /// sequential writers; the patch's length or 0 for the rewrite).
    open: Option<(u64, usize)>,
    error: Option<String>,
}

impl Outcome {
    fn fail(mut self, seed: u64, acked: usize, e: io::Error) -> Outcome {
        self.open = Some((seed, acked));
        self.error = Some(e.to_string());
        self
    }
}

/// Writes `data` from offset 0 of a freshly created (or truncated) file in `chunk`-sized writes, then closes.
/// `Err` carries the bytes acknowledged before the first error.
fn write_version(path: &Path, data: &[u8], chunk: usize, p: &Progress) -> Result<(), (usize, io::Error)> {
    p.acked.store(0, Ordering::SeqCst);
    p.versions.fetch_add(1, Ordering::SeqCst);
    p.at(WRITING);
    p.ready.store(true, Ordering::SeqCst);
    let mut f = File::create(path).map_err(|e| (0, e))?;
    let mut acked = 0;
    while acked < data.len() {
        let end = (acked + chunk).min(data.len());
        match f.write(&data[acked..end]) {
            Ok(0) => return Err((acked, io::ErrorKind::WriteZero.into())),
            Ok(n) => acked += n,
            Err(e) => return Err((acked, e)),
        }
        p.acked.store(acked as u64, Ordering::SeqCst);
    }
    p.closes.fetch_add(1, Ordering::SeqCst);
    p.at(CLOSING);
    close_checked(f).map_err(|e| (acked, e))?;
    p.at(CLOSED);
    Ok(())
}

/// Scenario 1: new versions of the small file, one after the other, until the first error.
fn write_small(path: &Path, first_seed: u64, p: &Progress) -> Outcome {
    let mut out = Outcome::default();
    for seed in first_seed..first_seed + 100_000 {
        match write_version(path, &content(seed, SMALL), SMALL_WRITE, p) {
            Ok(()) => out.closed = Some(seed),
            Err((acked, e)) => return out.fail(seed, acked, e),
        }
    }
    out
}

/// Scenario 2: one new 100 MiB file.
fn write_new(path: &Path, seed: u64, p: &Progress) -> Outcome {
    match write_version(path, &content(seed, BIG), BIG_WRITE, p) {
        Ok(()) => Outcome {
            closed: Some(seed),
            ..Outcome::default()
        },
        Err((acked, e)) => Outcome::default().fail(seed, acked, e),
    }
}

/// Scenario 3: a 4 KiB rewrite at 50 MiB + 123 of the existing big file, then close.
fn write_patch(path: &Path, seed: u64, p: &Progress) -> Outcome {
    let patch = content(seed, PATCH_LEN);
    p.versions.fetch_add(1, Ordering::SeqCst);
    p.at(WRITING);
    p.ready.store(true, Ordering::SeqCst);
    let f = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) => return Outcome::default().fail(seed, 0, e),
    };
    match f.write_at(&patch, PATCH_AT as u64) {
        Ok(n) => p.acked.store(n as u64, Ordering::SeqCst),
        Err(e) => return Outcome::default().fail(seed, 0, e),
    }
    let acked = p.acked.load(Ordering::SeqCst) as usize;
    if acked != PATCH_LEN {
        let e = io::Error::other(format!("short write: {acked} of {PATCH_LEN}"));
        return Outcome::default().fail(seed, acked, e);
    }
    p.closes.fetch_add(1, Ordering::SeqCst);
    p.at(CLOSING);
    if let Err(e) = close_checked(f) {
        return Outcome::default().fail(seed, acked, e);
    }
    p.at(CLOSED);
    Outcome {
        closed: Some(seed),
        ..Outcome::default()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Judging what the next mount shows

/// What a round did to one file, relative to its content before the round (`prev`).
enum Change {
    /// The file was created or truncated and written sequentially from 0: the new version is any prefix of `new`
    /// (the object may be shorter), and holds at least the first `acked` bytes.
    Rewritten { new: Vec<u8>, acked: usize },
    /// A patch of the existing content: the new version is exactly `new`; `acked`: its write() returned.
    Patched { new: Vec<u8>, acked: bool },
}

impl Change {
    fn is_new(&self, got: &[u8]) -> bool {
        match self {
            Change::Rewritten { new, .. } => got.len() <= new.len() && got == &new[..got.len()],
            Change::Patched { new, .. } => got == new.as_slice(),
        }
    }

    /// The new version with everything acknowledged in it.
    fn holds_acked(&self, got: &[u8]) -> bool {
        match self {
            Change::Rewritten { acked, .. } => self.is_new(got) && got.len() >= *acked,
            Change::Patched { .. } => self.is_new(got),
        }
    }

    fn acked_anything(&self) -> bool {
        match self {
            Change::Rewritten { acked, .. } => *acked > 0,
            Change::Patched { acked, .. } => *acked,
        }
    }

    fn new_version(&self) -> &[u8] {
        match self {
            Change::Rewritten { new, .. } | Change::Patched { new, .. } => new,
        }
    }
}

fn shape(v: &Option<Vec<u8>>) -> String {
    match v {
        Some(v) => format!("{} bytes", v.len()),
        None => "absent".into(),
    }
}

/// Checks `got` (the object after the next mount) against `prev` and `change`; returns a word on what it is.
fn judge(vol: &Volume, name: &str, got: &Option<Vec<u8>>, prev: &Option<Vec<u8>>, change: &Change) -> String {
    let is_new = got.as_ref().is_some_and(|g| change.is_new(g));
    let is_old = got == prev;
    let new_len = change.new_version().len();
    assert!(
        is_old || is_new,
        "{name} is torn: {}, neither the previous version ({}) nor the new one ({new_len} bytes, or a prefix of it); \
         first difference from the new version at {:?}, from the previous at {:?}",
        shape(got),
        shape(prev),
        got.as_ref()
            .and_then(|g| first_difference(g, &change.new_version()[..g.len().min(new_len)])),
        got.as_ref()
            .zip(prev.as_ref())
            .and_then(|(g, p)| first_difference(g, p)),
    );
    if !change.acked_anything() || got.as_ref().is_some_and(|g| change.holds_acked(g)) {
        return match (is_new, got) {
            (true, Some(g)) if g.len() == new_len => "new".into(),
            (true, Some(g)) => format!("new, {} of {new_len} bytes", g.len()),
            _ => "old".into(),
        };
    }
    let rescued = recovery_files(vol, name)
        .into_iter()
        .find(|(_, data)| change.holds_acked(data));
    match rescued {
        Some((path, _)) => format!("acknowledged data in {}", path.display()),
        None => panic!(
            "{name}: acknowledged data is gone: the object is {} ({}), the new version has {new_len} bytes of \
             which {} were acknowledged, and no recovery file holds them",
            if is_old {
                "the previous version"
            } else {
                "a shorter prefix of the new version"
            },
            shape(got),
            match change {
                Change::Rewritten { acked, .. } => acked.to_string(),
                Change::Patched { .. } => PATCH_LEN.to_string(),
            }
        ),
    }
}

/// The state of the volume after a mount: no pending multipart upload, no journal entry left.
#[track_caller]
fn assert_settled(rt: &tokio::runtime::Runtime, vol: &Volume, when: &str) {
    let pending = rt.block_on(common::pending_multipart_uploads(&vol.bucket));
    assert!(
        pending.is_empty(),
        "{when}: multipart uploads left pending: {pending:?}"
    );
    let manifests = journal_manifests(vol);
    let shown: Vec<String> = manifests
        .iter()
        .map(|p| format!("{}:\n{}", p.display(), fs::read_to_string(p).unwrap_or_default()))
        .collect();
    assert!(
        manifests.is_empty(),
        "{when}: journal entries left: {}",
        shown.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------------------------
// The crash test

#[derive(Clone, Copy, Debug)]
enum Scenario {
    Small,
    NewBig,
    Rewrite,
}

/// Where the kill is aimed: at a random moment from the start of the writes, or from the start of close().
#[derive(Clone, Copy, Debug)]
enum Aim {
    Writing,
    Closing,
}

/// Ten kills over the three scenarios, some aimed at the writes and some at the upload in close().
const PLAN: [(Scenario, Aim); 10] = [
    (Scenario::Small, Aim::Writing),
    (Scenario::NewBig, Aim::Writing),
    (Scenario::Rewrite, Aim::Closing),
    (Scenario::NewBig, Aim::Closing),
    (Scenario::Small, Aim::Closing),
    (Scenario::Rewrite, Aim::Writing),
    (Scenario::NewBig, Aim::Writing),
    (Scenario::NewBig, Aim::Closing),
    (Scenario::Small, Aim::Writing),
    (Scenario::Rewrite, Aim::Closing),
];

/// How long the clean setup took for each phase: the span a kill is aimed into.
struct Spans {
    small_version: Duration,
    small_close: Duration,
    big_write: Duration,
    big_close: Duration,
    patch_close: Duration,
}

impl Spans {
    fn of(&self, s: Scenario, aim: Aim) -> Duration {
        match (s, aim) {
            (Scenario::Small, Aim::Writing) => self.small_version * 3,
            (Scenario::Small, Aim::Closing) => self.small_close,
            (Scenario::NewBig, Aim::Writing) => self.big_write,
            (Scenario::NewBig, Aim::Closing) => self.big_close,
            // open + one 4 KiB pwrite: a few milliseconds at most.
            (Scenario::Rewrite, Aim::Writing) => Duration::from_millis(3),
            (Scenario::Rewrite, Aim::Closing) => self.patch_close,
        }
    }
}

/// Creates `path` with `data` in `chunk`-sized writes; returns how long the writes and the close took.
fn timed_write(path: &Path, data: &[u8], chunk: usize) -> (Duration, Duration) {
    let t = Instant::now();
    let mut f = File::create(path).unwrap();
    for c in data.chunks(chunk) {
        f.write_all(c).unwrap();
    }
    let writes = t.elapsed();
    let t = Instant::now();
    close_checked(f).unwrap_or_else(|e| panic!("setup: close of {}: {e}", path.display()));
    (writes, t.elapsed())
}

/// A timed, clean write of the files the rounds start from: the small file, the 100 MiB file and one rewrite of
/// it. Returns the contents and how long each phase took.
fn setup(mnt: &Path) -> (Vec<u8>, Vec<u8>, Spans) {
    let small = content(1, SMALL);
    let (small_write, small_close) = timed_write(&mnt.join("small"), &small, SMALL_WRITE);
    let big = content(2, BIG);
    let (big_write, big_close) = timed_write(&mnt.join("big"), &big, BIG_WRITE);
    let t = Instant::now();
    let f = OpenOptions::new().write(true).open(mnt.join("big")).unwrap();
    f.write_all_at(&content(3, PATCH_LEN), PATCH_AT as u64).unwrap();
    close_checked(f).expect("setup: close of the rewrite");
    let patch_close = t.elapsed();
    let spans = Spans {
        small_version: small_write + small_close,
        small_close,
        big_write,
        big_close,
        patch_close,
    };
    (small, patched(&big, 3), spans)
}

/// Waits until the writer is at `aim`: about to open the file, or in close() (or stopped), for at most a minute.
fn wait_for(p: &Progress, aim: Aim) {
    let start = Instant::now();
    let there = || match aim {
        Aim::Writing => p.ready.load(Ordering::SeqCst),
        Aim::Closing => p.closes.load(Ordering::SeqCst) > 0,
    };
    while !there() && p.phase.load(Ordering::SeqCst) != STOPPED {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the writer never got to {aim:?}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// What the daemon's log says about the journal it found at mount.
fn recovery_summary(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            ["earlier run", "recovering", "journal entry", "reached S3"]
                .iter()
                .any(|w| l.contains(w))
        })
        .map(|l| l.split_once("] ").map_or(l, |(_, m)| m))
        .collect();
    if lines.is_empty() {
        "nothing to recover".into()
    } else {
        lines.join(" | ")
    }
}

/// In the client-side modes the journal holds blocks sealed as the object holds them (the file's own key).
#[test]
fn kill_9_at_random_moments_loses_nothing_acknowledged_cse_local() {
    kill_9_rounds(KeyMode::CseLocal);
}

/// In the SSE modes the journal seals blocks under the volume's journal key, and an upload encodes them anew.
#[test]
fn kill_9_at_random_moments_loses_nothing_acknowledged_sse_s3() {
    kill_9_rounds(KeyMode::SseS3);
}

/// The [`PLAN`]'s ten kills on a fresh volume of `mode`.
fn kill_9_rounds(mode: KeyMode) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let began = Instant::now();
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    eprintln!("{mode}: CRASH_SEED={seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ mode as u64);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vol = Volume::new(mode);
    let mnt_dir = tempfile::Builder::new().prefix("s3crypt-crash").tempdir().unwrap();
    let mnt = mnt_dir.path().to_path_buf();
    // Recovery waits `upload_timeout` for the journal's uploads before the mount answers; the checks below read
    // S3 right after, so it must cover a 100 MiB upload even on a slow day.
    let extra = ["upload_timeout=60s"];
    let log = |n: usize| vol.dir.path().join(format!("daemon-{n}.log"));
    let _keep = KeepLogs(vol.dir.path());

    // An earlier, clean mount writes what the rounds start from.
    let d = Daemon::start(&vol, &mnt, log(0), &extra);
    let (small, big, spans) = setup(&mnt);
    let st = d.stop();
    assert!(st.success(), "clean exit of the setup daemon: {st}");
    assert_settled(&rt, &vol, "after the setup");
    eprintln!(
        "setup: small {:?} (close {:?}), big write {:?}, close {:?}, rewrite close {:?}",
        spans.small_version, spans.small_close, spans.big_write, spans.big_close, spans.patch_close
    );
    let mut model: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    model.insert("small".into(), Some(small));
    model.insert("big".into(), Some(big));

    let mut daemon = Daemon::start(&vol, &mnt, log(1), &extra);
    let mut rescued = 0;
    for (round, (scenario, aim)) in PLAN.iter().copied().enumerate() {
        let round = round + 1;
        let t_round = Instant::now();
        let (name, seed) = match scenario {
            Scenario::Small => ("small".to_string(), 1000 * round as u64),
            Scenario::NewBig => (format!("new-{round}"), 2000 + round as u64),
            Scenario::Rewrite => ("big".to_string(), 3000 + round as u64),
        };
        assert!(
            daemon.running() && is_mounted(&mnt),
            "round {round}: the daemon is serving"
        );
        let progress = Arc::new(Progress::default());
        let writer = {
            let (p, path) = (progress.clone(), mnt.join(&name));
            std::thread::spawn(move || {
                let out = match scenario {
                    Scenario::Small => write_small(&path, seed, &p),
                    Scenario::NewBig => write_new(&path, seed, &p),
                    Scenario::Rewrite => write_patch(&path, seed, &p),
                };
                p.at(STOPPED);
                out
            })
        };
        wait_for(&progress, aim);
        let span = spans.of(scenario, aim);
        std::thread::sleep(span.mul_f64(rng.gen_range(0.0..1.0)));
        let landed = progress.describe();
        daemon.kill9();
        let outcome = writer.join().expect("writer thread");
        detach(&mnt);
        eprintln!("round {round:2} {scenario:?}/{aim:?}: killed {landed}; the writer was told {outcome:?}");

        // What the program was told, as a change from what S3 held before the round.
        let before = model.get(&name).cloned().flatten();
        let (prev, change) = match scenario {
            Scenario::Small | Scenario::NewBig => {
                let len = if let Scenario::Small = scenario { SMALL } else { BIG };
                let prev = outcome.closed.map(|s| content(s, len)).or(before);
                let change = match outcome.open {
                    Some((s, acked)) => Change::Rewritten {
                        new: content(s, len),
                        acked,
                    },
                    None => Change::Rewritten {
                        new: prev.clone().expect("a closed version"),
                        acked: len,
                    },
                };
                (prev, change)
            }
            Scenario::Rewrite => {
                let base = before.expect("the big file");
                let new = patched(&base, seed);
                let acked = outcome.closed.is_some() || outcome.open.is_some_and(|(_, a)| a == PATCH_LEN);
                (Some(base), Change::Patched { new, acked })
            }
        };

        // The next mount of the volume recovers the journal before it answers.
        daemon = Daemon::start(&vol, &mnt, log(round + 1), &extra);
        assert_settled(&rt, &vol, &format!("round {round}, after the next mount"));
        let got = read_object(&mnt, &name);
        let verdict = judge(&vol, &name, &got, &prev, &change);
        if verdict.starts_with("acknowledged data in") {
            rescued += 1;
        }
        eprintln!(
            "round {round:2}: {name} is {verdict}; the next mount: {}; {:.1?}",
            recovery_summary(&daemon.log_text()),
            t_round.elapsed()
        );
        model.insert(name, got);
    }

    // Everything once more through the last mount, then a clean exit.
    for (name, want) in &model {
        assert!(read_object(&mnt, name) == *want, "{name} changed after its round");
    }
    let st = daemon.stop();
    assert!(st.success(), "clean exit of the last daemon: {st}");
    assert_settled(&rt, &vol, "at the end");
    let orphans = journal_orphans(&vol);
    eprintln!(
        "{mode}: {} kills in {:.1?}; {rescued} rescued through the recovery directory; journal files without a manifest: {}",
        PLAN.len(),
        began.elapsed(),
        orphans.len()
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Hostile truncates against a daemon's memory

fn truncate_path(path: &Path, len: u64) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `truncate(2)` to 999,999,999,999,999 bytes is refused (EFBIG or EINVAL) without the daemon allocating it; the
/// daemon goes on serving; `truncate -s 3G` of a new file uploads 3 GiB of sealed zeros at close with bounded
/// memory. Peak RSS (VmHWM) stays under 256 MiB throughout, and the object reads back its size and zeros.
#[test]
fn hostile_truncates_keep_the_daemon_up_and_small() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    const THREE_GIB: u64 = 3 << 30;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let vol = Volume::new(KeyMode::CseLocal);
    let mnt_dir = tempfile::Builder::new().prefix("s3crypt-trunc").tempdir().unwrap();
    let mnt = mnt_dir.path();
    // The 3 GiB upload happens inside close(): give it the time it needs on this server.
    let mut d = Daemon::start(&vol, mnt, vol.dir.path().join("daemon.log"), &["upload_timeout=600s"]);

    let t = mnt.join("t");
    write_file(&t, b"abc").unwrap();
    let err = truncate_path(&t, 999_999_999_999_999).expect_err("a truncate beyond S3's 5 TiB is refused");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EFBIG) | Some(libc::EINVAL)),
        "truncate to 999999999999999: {err}"
    );
    assert!(d.running(), "the daemon survives the hostile truncate");
    write_file(&mnt.join("after"), b"still here").expect("a write after the hostile truncate");
    assert_eq!(fs::read(mnt.join("after")).unwrap(), b"still here");
    assert_eq!(fs::read(&t).unwrap(), b"abc", "the truncated file is untouched");
    let hwm = d.vm_hwm_kib();
    eprintln!("VmHWM after the hostile truncate: {} MiB", hwm / 1024);
    assert!(hwm < HWM_LIMIT_KIB, "peak RSS {hwm} KiB after the hostile truncate");

    let zeros = mnt.join("zeros");
    let out = Command::new("truncate")
        .arg("-s")
        .arg("3G")
        .arg(&zeros)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "truncate -s 3G: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.running(), "the daemon survives the 3 GiB file");
    let hwm = d.vm_hwm_kib();
    eprintln!("VmHWM after uploading 3 GiB of zeros: {} MiB", hwm / 1024);
    assert!(hwm < HWM_LIMIT_KIB, "peak RSS {hwm} KiB after a 3 GiB sparse file");
    assert_eq!(fs::metadata(&zeros).unwrap().len(), THREE_GIB);
    let st = d.stop();
    assert!(st.success(), "clean exit: {st}");

    // S3 has it: the raw object is the sealed 3 GiB, and a fresh mount reads its size and zeros.
    let stored = rt.block_on(async {
        let c = common::s3_client().await;
        c.head_object()
            .bucket(&vol.bucket)
            .key("zeros")
            .send()
            .await
            .expect("HEAD zeros")
            .content_length()
    });
    assert!(
        stored.is_some_and(|n| n as u64 > THREE_GIB),
        "the object holds 3 GiB sealed: {stored:?} bytes"
    );
    let m = TestMount::mount(&vol);
    assert_eq!(fs::metadata(m.path("zeros")).unwrap().len(), THREE_GIB);
    let mut f = File::open(m.path("zeros")).unwrap();
    let mut buf = vec![1u8; 8192];
    for at in [0, THREE_GIB / 2 + 12345, THREE_GIB - 8192] {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "zeros at {at}");
    }
    drop(f);
    m.unmount();
    rt.block_on(async {
        let c = common::s3_client().await;
        let _ = c.delete_object().bucket(&vol.bucket).key("zeros").send().await;
    });
}

/// SIGTERM while S3 is unreachable: the daemon keeps trying for 3 x upload_timeout, then exits non-zero saying
/// where the data is (the journal), and the next mount of the volume uploads it.
#[test]
fn sigterm_during_an_outage_leaves_the_data_in_the_journal_for_the_next_mount() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let vol = Volume::new(KeyMode::CseLocal);
    let proxy = common::proxy::FaultProxy::start(common::endpoint());
    let mnt_dir = tempfile::Builder::new().prefix("s3crypt-term").tempdir().unwrap();
    let mnt = mnt_dir.path();
    let endpoint = format!("endpoint={}", proxy.endpoint());
    let d = Daemon::start(
        &vol,
        mnt,
        vol.dir.path().join("daemon.log"),
        &[&endpoint, "upload_timeout=2s"],
    );
    let data = content(77, 3 * MIB);
    let mut f = File::create(mnt.join("kept")).unwrap();
    f.write_all(&data).unwrap();
    proxy.set_mode(common::proxy::Mode::Reset);
    let started = Instant::now();
    let log = d.log.clone();
    let st = d.stop();
    drop(f);
    let text = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !st.success(),
        "the daemon says it could not save everything: {st}\n{text}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "it kept trying for 3 x upload_timeout first"
    );
    assert!(text.contains("journal"), "the message names the journal:\n{text}");
    assert_eq!(journal_manifests(&vol).len(), 1, "the data waits in the journal");
    proxy.set_mode(common::proxy::Mode::Pass);
    detach(mnt);
    let d = Daemon::start(&vol, mnt, vol.dir.path().join("daemon-2.log"), &[]);
    let got = read_object(mnt, "kept").expect("the next mount has the file");
    assert!(got == data, "kept: {} bytes, want {}", got.len(), data.len());
    assert!(
        journal_manifests(&vol).is_empty(),
        "the journal is empty once S3 has it"
    );
    assert!(d.stop().success());
}

/// unlink(2) of open files (one saved to S3 with a change on top, one never uploaded), then `kill -9` before their
/// last close: the handles' content was in the journal, but no later mount brings the names back or uploads it;
/// a mount removes those journal files once they are older than a minute and no daemon holds them.
#[test]
fn files_unlinked_while_open_stay_gone_after_kill_9() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let vol = Volume::new(KeyMode::CseLocal);
    let mnt_dir = tempfile::Builder::new().prefix("s3crypt-unlinked").tempdir().unwrap();
    let mnt = mnt_dir.path();
    let d = Daemon::start(&vol, mnt, vol.dir.path().join("daemon.log"), &[]);
    write_file(&mnt.join("saved"), &content(5, 3 * MIB)).unwrap();
    let saved = OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join("saved"))
        .unwrap();
    saved.write_all_at(b"a change only the journal has", 100).unwrap();
    let mut scratch = File::create(mnt.join("scratch")).unwrap();
    scratch.write_all(&content(6, MIB)).unwrap();
    fs::remove_file(mnt.join("saved")).unwrap();
    fs::remove_file(mnt.join("scratch")).unwrap();
    assert!(
        journal_manifests(&vol).is_empty(),
        "no journal entry a restart would upload"
    );
    assert!(
        !journal_orphans(&vol).is_empty(),
        "the open handles' content is in the journal"
    );
    d.kill9();
    drop(saved);
    drop(scratch);
    detach(mnt);
    let d = Daemon::start(&vol, mnt, vol.dir.path().join("daemon-2.log"), &[]);
    assert_eq!(read_object(mnt, "saved"), None, "the unlinked name does not come back");
    assert_eq!(read_object(mnt, "scratch"), None);
    assert_eq!(fs::read_dir(mnt).unwrap().count(), 0, "nothing is listed");
    assert!(journal_manifests(&vol).is_empty());
    let orphans = journal_orphans(&vol);
    assert!(
        !orphans.is_empty(),
        "entries younger than a minute are left (a daemon may be creating them)"
    );
    assert!(d.stop().success());
    for p in &orphans {
        let old = std::time::SystemTime::now() - Duration::from_secs(120);
        File::options().write(true).open(p).unwrap().set_modified(old).unwrap();
    }
    detach(mnt);
    let d = Daemon::start(&vol, mnt, vol.dir.path().join("daemon-3.log"), &[]);
    assert_eq!(
        journal_orphans(&vol),
        Vec::<PathBuf>::new(),
        "a later mount removes them:\n{}",
        d.log_tail(20)
    );
    assert_eq!(fs::read_dir(mnt).unwrap().count(), 0);
    assert!(d.stop().success());
}

/// A file written with write-behind gets its final attributes (here a chmod while it was written, and the last
/// write's mtime) from a metadata copy once its data is committed. fsync() and close() do not wait for that copy;
/// until it lands the attributes are in the journal, so a `kill -9` before it loses none of them.
#[test]
fn attributes_settled_after_a_write_behind_upload_survive_kill_9() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let vol = Volume::new(KeyMode::CseLocal);
    let mnt_dir = tempfile::Builder::new().prefix("s3crypt-settle").tempdir().unwrap();
    let mnt = mnt_dir.path();
    let _logs = KeepLogs(vol.dir.path());
    let proxy = FaultProxy::start(common::endpoint());
    let is_copy = |r: &common::proxy::RequestHead| r.method == "PUT" && r.header("x-amz-copy-source").is_some();
    // The copy that would settle the attributes never gets an answer.
    proxy.blackhole_matching(is_copy);
    let endpoint = format!("endpoint={}", proxy.endpoint());
    let d = Daemon::start(
        &vol,
        mnt,
        vol.dir.path().join("daemon.log"),
        &[endpoint.as_str(), "upload_timeout=3s"],
    );
    let data = content(8, 40 * MIB);
    let mut f = File::create(mnt.join("big")).unwrap();
    for chunk in data.chunks(MIB) {
        f.write_all(chunk).unwrap();
    }
    f.set_permissions(fs::Permissions::from_mode(0o600)).unwrap();
    f.sync_all().expect("fsync: the data is in S3");
    let mtime = f.metadata().unwrap().modified().unwrap();
    close_checked(f).expect("close does not wait for the attributes' copy");
    let start = Instant::now();
    while !proxy.requests().iter().any(is_copy) {
        assert!(start.elapsed() < Duration::from_secs(30), "no settling copy was sent");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(journal_manifests(&vol).len(), 1, "the attributes wait in the journal");
    d.kill9();
    detach(mnt);
    let d = Daemon::start(&vol, mnt, vol.dir.path().join("daemon-2.log"), &[]);
    let meta = fs::metadata(mnt.join("big")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "the chmod survived the kill");
    assert_eq!(meta.modified().unwrap(), mtime, "the final mtime survived the kill");
    assert!(read_object(mnt, "big") == Some(data), "the content is the one written");
    assert_eq!(
        journal_manifests(&vol),
        Vec::<PathBuf>::new(),
        "recovery saved the attributes"
    );
    assert!(d.stop().success());
}

/// The daemon's log at its default level stays free of warnings while programs do ordinary things: a warning
/// is for something an operator should look at. Programs ask isatty(3) of the files they open (Python does for
/// every `open`); each is an ioctl the kernel passes to the daemon, and a warning per file opened would bury
/// the ones that matter.
#[test]
fn ordinary_use_leaves_no_warning_in_the_log() {
    use std::os::fd::AsRawFd;
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let vol = Volume::new(KeyMode::CseLocal);
    let mnt_dir = tempfile::Builder::new().prefix("s3crypt-quiet").tempdir().unwrap();
    let mnt = mnt_dir.path();
    let d = Daemon::start(&vol, mnt, vol.dir.path().join("daemon.log"), &[]);
    fs::create_dir(mnt.join("d")).unwrap();
    for i in 0..20 {
        let p = mnt.join(format!("d/f{i}"));
        let mut f = File::create(&p).unwrap();
        assert_eq!(unsafe { libc::isatty(f.as_raw_fd()) }, 0);
        f.write_all(&content(i, 10_000)).unwrap();
        f.sync_all().unwrap();
        close_checked(f).unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(unsafe { libc::isatty(f.as_raw_fd()) }, 0);
        assert_eq!(fs::read(&p).unwrap(), content(i, 10_000));
    }
    let listed = fs::read_dir(mnt.join("d")).unwrap().count();
    assert_eq!(listed, 20);
    fs::set_permissions(mnt.join("d/f0"), fs::Permissions::from_mode(0o600)).unwrap();
    OpenOptions::new()
        .write(true)
        .open(mnt.join("d/f1"))
        .unwrap()
        .set_len(5)
        .unwrap();
    fs::rename(mnt.join("d/f2"), mnt.join("d/g2")).unwrap();
    fs::remove_file(mnt.join("d/f3")).unwrap();
    let log = d.log.clone();
    assert!(d.stop().success());
    let text = fs::read_to_string(&log).unwrap();
    // A retried transient error is worth a warning, but it comes from the server's state, not from the use.
    let loud: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .filter(|l| !l.contains("transient error"))
        .collect();
    assert!(
        loud.is_empty(),
        "{} warnings or errors in the log:\n{}",
        loud.len(),
        loud.join("\n")
    );
}
