//! Wiring: runtime, store, keys, file system, FUSE session, readiness and signals; and the one-file commands.
use crate::cli::{self, MountOptions, StoreKind};
use crate::format::{self, BlockSize};
use crate::fs::{CseKeys, Fs, FsConfig};
use crate::keys::{self, KeyConfig};
use crate::metrics::Metrics;
use crate::notify::Readiness;
use crate::store::failing::FailingStore;
use crate::store::memory::MemoryStore;
use crate::store::retry::{RetryPolicy, Retrying};
use crate::store::s3::S3Store;
use crate::store::{ObjectStore, StoreError};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Everything a command needs to read and write objects of one volume.
pub struct Backend {
    pub store: Arc<dyn ObjectStore>,
    /// Request and byte counters of the store (for `stats_file`).
    pub counters: Option<Counters>,
    /// The store without retries or counting, for `/health` (set by [`backend`]).
    pub probe: Option<Arc<dyn ObjectStore>>,
    pub keys: Option<CseKeys>,
    pub key_stats: Arc<keys::KeyStats>,
    pub block_size: BlockSize,
    /// See [`journal_key`].
    pub journal_key: Option<crate::format::DataKey>,
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn key_config(opts: &MountOptions) -> KeyConfig {
    KeyConfig {
        mode: opts.key_mode,
        kms_key_id: opts.kms_key_id.clone(),
        sse_c_key_file: opts.sse_c_key_file.clone(),
        master_key_file: opts.master_key_file.clone(),
        old_master_key_file: opts.old_master_key_file.clone(),
        old_kms_key_id: opts.old_kms_key_id.clone(),
        key_cache_size: opts.key_cache_size,
        key_cache_ttl: opts.key_cache_ttl,
    }
}

/// Reads the request counters of a counting store.
pub type Counters = Arc<dyn Fn() -> crate::store::failing::Stats + Send + Sync>;

/// Loads the SDK configuration and the keys the options ask for.
pub async fn load_keys(opts: &MountOptions) -> Result<(aws_config::SdkConfig, keys::Keys)> {
    let sdk = crate::store::s3::sdk_config(opts.region.clone(), opts.endpoint.clone()).await;
    let keys = keys::build_keys(&key_config(opts), &sdk).await?;
    Ok((sdk, keys))
}

/// The store stack of a mount and what observes it.
pub struct StoreStack {
    /// What the file system uses: retries above a counting store.
    pub store: Arc<dyn ObjectStore>,
    pub counters: Counters,
    /// The same bucket with no retries and no counting, for `/health` probes.
    pub probe: Arc<dyn ObjectStore>,
}

/// The store the options ask for: S3 (with retries) or, for benchmarks, memory. Every attempt is counted (a few
/// atomic additions per request) for `stats_file` and `metrics`, which also reads the key counters of `keys`.
pub fn make_store(
    opts: &MountOptions,
    sdk: &aws_config::SdkConfig,
    bucket: &str,
    keys: &keys::Keys,
    metrics: &Arc<Metrics>,
) -> StoreStack {
    metrics.set_keys(keys.stats.clone());
    match opts.store {
        StoreKind::Memory => {
            log::warn!("store=memory: benchmark mode, nothing is written to S3 and all data is lost at unmount");
            let counted = Arc::new(FailingStore::new(MemoryStore::fast()));
            counted.set_observer(metrics.clone());
            let (c, c2) = (counted.clone(), counted.clone());
            metrics.set_store(move || c.stats(), || 0);
            StoreStack {
                store: counted.clone(),
                counters: Arc::new(move || c2.stats()),
                probe: counted,
            }
        }
        StoreKind::S3 => s3_stack(opts, sdk, bucket, keys, metrics).0,
    }
}

/// The S3 store stack `Retrying<FailingStore<S3Store>>`, observed by `metrics`; also returns the counting layer
/// (tests assert requests and bytes on it).
pub fn s3_stack(
    opts: &MountOptions,
    sdk: &aws_config::SdkConfig,
    bucket: &str,
    keys: &keys::Keys,
    metrics: &Arc<Metrics>,
) -> (StoreStack, Arc<FailingStore<S3Store>>) {
    metrics.set_keys(keys.stats.clone());
    let client = crate::store::s3::s3_client_from(sdk, opts.path_style);
    let store = S3Store::new(client, bucket.to_string(), keys.sse.clone())
        .with_older_customer_keys(keys.sse_c_previous.clone());
    let probe = Arc::new(store.clone());
    let counted = Arc::new(FailingStore::new(store));
    counted.set_observer(metrics.clone());
    let retrying = Arc::new(Retrying::new(counted.clone(), RetryPolicy::default()));
    let (c, c2, r) = (counted.clone(), counted.clone(), retrying.clone());
    metrics.set_store(move || c.stats(), move || r.retries());
    let stack = StoreStack {
        store: retrying,
        counters: Arc::new(move || c2.stats()),
        probe,
    };
    (stack, counted)
}

/// Starts the `metrics_addr=` endpoint, if asked for, once the mount at `mountpoint` answers.
pub fn serve_metrics(
    opts: &MountOptions,
    metrics: &Arc<Metrics>,
    probe: Arc<dyn ObjectStore>,
    prefix: &str,
    mountpoint: &Path,
    rt: &tokio::runtime::Handle,
) -> Result<Option<crate::metrics::server::Server>> {
    use std::os::unix::fs::MetadataExt;
    let Some(addr) = opts.metrics_addr else { return Ok(None) };
    let dev = std::fs::metadata(mountpoint)
        .with_context(|| format!("reading {}", mountpoint.display()))?
        .dev();
    let health = crate::metrics::server::Health {
        probe,
        prefix: prefix.to_string(),
        mountpoint: mountpoint.to_path_buf(),
        dev,
    };
    let server = crate::metrics::server::start(addr, metrics.clone(), Arc::new(health), rt)
        .with_context(|| format!("listening on metrics_addr={addr}"))?;
    Ok(Some(server))
}

/// Connects to the bucket, checks it is there, loads the keys and, in the client-side modes, opens (or makes)
/// the volume descriptor, which refuses a wrong key or block size here rather than as EIO later.
pub async fn backend(opts: &MountOptions, bucket: &str, prefix: &str, metrics: &Arc<Metrics>) -> Result<Backend> {
    let (sdk, keys) = load_keys(opts).await?;
    let stack = make_store(opts, &sdk, bucket, &keys, metrics);
    let mut b = open_volume(opts, bucket, prefix, stack.store, &keys).await?;
    b.counters = Some(stack.counters);
    b.probe = Some(stack.probe);
    Ok(b)
}

/// Checks the bucket and opens the volume on a given store.
pub async fn open_volume(
    opts: &MountOptions,
    bucket: &str,
    prefix: &str,
    store: Arc<dyn ObjectStore>,
    keys: &keys::Keys,
) -> Result<Backend> {
    check_bucket(store.as_ref(), bucket, prefix).await?;
    let mut block_size = opts.block_size.unwrap_or_default();
    let cse = match &keys.provider {
        Some(provider) => {
            let vol = keys::open_or_create_volume(store.as_ref(), prefix, provider.as_ref(), opts.block_size)
                .await
                .with_context(|| format!("opening the volume s3://{bucket}/{prefix}"))?;
            block_size = vol.block_size;
            Some(CseKeys {
                provider: provider.clone(),
                cache: keys.cache.clone(),
            })
        }
        None => {
            refuse_client_side_volume(store.as_ref(), opts, bucket, prefix).await?;
            None
        }
    };
    Ok(Backend {
        store,
        counters: None,
        probe: None,
        keys: cse,
        key_stats: keys.stats.clone(),
        block_size,
        journal_key: journal_key(keys),
    })
}

/// An SSE mount of a client-side volume would show ciphertext as file content: refuse it and name the mode.
async fn refuse_client_side_volume(
    store: &dyn ObjectStore,
    opts: &MountOptions,
    bucket: &str,
    prefix: &str,
) -> Result<()> {
    let key = keys::volume::volume_key(prefix);
    match store.get(&key, None, None).await {
        Ok(out) => {
            let mode = keys::volume::VolumeDescriptor::parse(&out.data, &key)
                .map(|d| d.mode.as_str().to_string())
                .unwrap_or_else(|_| "cse-kms or cse-local".to_string());
            bail!(
                "s3://{bucket}/{prefix} is a client-side encrypted volume (key_mode={mode}); mount it with \
                 key_mode={mode} and its key, not key_mode={}",
                opts.key_mode
            )
        }
        Err(StoreError::NotFound(_)) => Ok(()),
        Err(e) => Err(anyhow!("reading the volume descriptor {key}: {e}")),
    }
}

pub async fn check_bucket(store: &dyn ObjectStore, bucket: &str, prefix: &str) -> Result<()> {
    match store.list(prefix, Some("/"), None, Some(1)).await {
        Ok(_) => Ok(()),
        Err(StoreError::NoSuchBucket(_)) => {
            bail!("bucket '{bucket}' does not exist (or is in another region); create it or fix the name/region")
        }
        Err(StoreError::AccessDenied(m)) => {
            bail!("access to bucket '{bucket}' was denied: {m}; check the credentials and the bucket policy")
        }
        Err(e) => Err(anyhow!("cannot reach bucket '{bucket}': {e}")),
    }
}

/// Where s3crypt keeps state that must persist (the journal, recovery files): `$STATE_DIRECTORY` under systemd,
/// `/var/lib/s3crypt` as root, else `$XDG_STATE_HOME/s3crypt` (`~/.local/state/s3crypt`).
fn state_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("STATE_DIRECTORY")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            if nix_is_root() {
                PathBuf::from("/var/lib/s3crypt")
            } else if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
                PathBuf::from(x).join("s3crypt")
            } else if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
                PathBuf::from(h).join(".local/state/s3crypt")
            } else {
                std::env::temp_dir().join("s3crypt")
            }
        });
    base.join(name)
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The file-system settings of a mount. `journal_key`: see [`journal_key`].
pub fn fs_config(
    opts: &MountOptions,
    bucket: &str,
    prefix: &str,
    bs: BlockSize,
    journal_key: Option<crate::format::DataKey>,
) -> FsConfig {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    FsConfig {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        key_mode: opts.key_mode,
        block_size: bs,
        uid: opts.uid.unwrap_or(uid),
        gid: opts.gid.unwrap_or(gid),
        umask: opts.umask.unwrap_or(0o022),
        read_only: opts.read_only,
        allow_plaintext: opts.allow_plaintext,
        metadata_ttl: opts.metadata_ttl,
        block_cache_bytes: opts.block_cache_mib * 1024 * 1024,
        read_ahead_bytes: opts.read_ahead_kib * 1024,
        read_ahead_chunk_bytes: crate::fs::CHUNK_BYTES,
        max_dirty_bytes: opts.max_write_mib * 1024 * 1024,
        write_behind: opts.write_behind,
        staging_dir: opts.staging_dir.clone().unwrap_or_else(|| state_dir("staging")),
        recovery_dir: opts.recovery_dir.clone().unwrap_or_else(|| state_dir("recovery")),
        upload_timeout: opts.upload_timeout,
        max_parts: crate::fs::MAX_PARTS,
        volume_id: crate::fs::journal::volume_id(bucket, prefix),
        journal_key,
        copy_max: crate::store::COPY_MAX,
    }
}

/// The key that seals journal blocks of files without a key of their own. With SSE-C it is derived from the
/// customer key, so only the mount's configured key material opens a journal left behind; in the other modes
/// `None` (a random key kept next to the journal, see SECURITY.md).
pub fn journal_key(keys: &keys::Keys) -> Option<crate::format::DataKey> {
    match &keys.sse {
        crate::store::Sse::Customer(k) => Some(k.derive(b"s3crypt journal v1")),
        _ => None,
    }
}

/// Says what the journal of an earlier run held and what became of it.
fn report_recovery(r: &crate::fs::Recovery) {
    if r.aborted > 0 {
        log::info!("aborted {} multipart upload(s) left by an earlier run", r.aborted);
    }
    if r.pending + r.conflicts + r.broken > 0 {
        log::warn!(
            "journal of an earlier run: {} file(s) saved, {} still retrying, {} in the recovery directory, {} unreadable",
            r.saved,
            r.pending,
            r.conflicts,
            r.broken
        );
    }
}

/// Checks the mount point before mounting, and names a stale mount left by a killed daemon.
fn check_mountpoint(mnt: &Path) -> Result<()> {
    match std::fs::metadata(mnt) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("mount point {} is not a directory", mnt.display()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "mount point {0} is a stale mount left by a daemon that was killed; clear it with: fusermount3 -u {0} (or: umount -l {0})",
            mnt.display()
        ),
        Err(e) => bail!("mount point {}: {e}; create it with: mkdir -p {}", mnt.display(), mnt.display()),
    }
}

/// `s3crypt mount` in the foreground (the background start re-executes this with --foreground).
pub fn mount(source: &str, mountpoint: &Path, opts: MountOptions) -> Result<()> {
    let result = mount_inner(source, mountpoint, opts);
    if let Err(e) = &result {
        Readiness::failed(&format!("{e:#}"));
    }
    result
}

fn mount_inner(source: &str, mountpoint: &Path, opts: MountOptions) -> Result<()> {
    let (bucket, prefix) = cli::parse_volume_url(source)?;
    check_mountpoint(mountpoint)?;
    let rt = runtime()?;
    let metrics = Metrics::new(&bucket, &prefix);
    let backend = rt.block_on(backend(&opts, &bucket, &prefix, &metrics))?;
    let (backend_counters, key_stats) = (backend.counters.clone(), backend.key_stats.clone());
    let probe = backend.probe.clone().unwrap_or_else(|| backend.store.clone());
    let cfg = fs_config(&opts, &bucket, &prefix, backend.block_size, backend.journal_key.clone());
    let fs = Fs::new(backend.store, backend.keys, cfg).context("opening the write-back journal (staging_dir)")?;
    let journal_dir = fs.journal_dir().to_path_buf();
    report_recovery(&rt.block_on(fs.recover()));
    let (bg, own) = start_own_session(fs.clone(), rt.handle().clone(), mountpoint, &opts, source, &metrics)?;
    let _metrics_server = serve_metrics(&opts, &metrics, probe, &prefix, mountpoint, rt.handle())?;
    log::info!(
        "mounted s3://{bucket}/{prefix} at {} ({})",
        mountpoint.display(),
        opts.key_mode
    );
    Readiness::ready();
    let stats = StatsWriter {
        file: opts.stats_file.clone(),
        counters: backend_counters,
        keys: key_stats,
    };
    let signal = rt.block_on(wait_for_end(&bg, &stats));
    let _ = crate::notify::stopping();
    if let Some(sig) = signal {
        log::info!("{sig}: saving open files, then unmounting");
    }
    let left = rt.block_on(fs.flush_all());
    let unmounted = end_session(bg, &own);
    rt.shutdown_timeout(Duration::from_secs(5));
    if left.data > 0 {
        bail!(
            "{} file(s) could not be saved to S3 before exit; their data is kept in the journal under {} \
             and the next mount of this volume uploads it (see the log)",
            left.data,
            journal_dir.display()
        );
    }
    if left.attributes > 0 {
        bail!(
            "{} file(s) have their data in S3 but not yet their final attributes (mode, owner, times); those are \
             kept in the journal under {} and the next mount of this volume applies them (see the log)",
            left.attributes,
            journal_dir.display()
        );
    }
    unmounted.with_context(|| {
        format!(
            "unmounting {0}; if it is left stale, clear it with: fusermount3 -u {0}",
            mountpoint.display()
        )
    })
}

/// Ends the session once the files are saved: unmounts the mount point only if it still holds this daemon's mount
/// (after a signal it does; after an external umount it is gone, or is already a new daemon's), then waits for
/// the session threads, unless the mount is still in use, in which case they serve until the process exits.
fn end_session(bg: fuser::BackgroundSession, own: &OwnMount) -> Result<()> {
    let thread = session_thread(bg);
    let released = own.unmount_if_ours()?;
    if own.connected() {
        log::info!(
            "{} ({released:?}) is still in use; files open on it fail once the daemon exits",
            own.path.display()
        );
        return Ok(());
    }
    log::debug!("session ended ({released:?})");
    thread
        .join()
        .map_err(|_| anyhow!("the FUSE session thread panicked"))??;
    Ok(())
}

/// The session's thread, without the rest of `bg`. Joining or dropping a fuser 0.18 `BackgroundSession` drops its
/// `Mount`, whose `Drop` unmounts the mount point *by path*; its "still mounted?" test reads the POLLERR of a dead
/// connection as mounted (fixed upstream in cberner/fuser#703), so after an external umount it unmounts whatever
/// is mounted there now: a new daemon's mount. The rest is therefore forgotten, never dropped: a path and handles
/// on our /dev/fuse descriptor, which the exiting process closes.
fn session_thread(bg: fuser::BackgroundSession) -> std::thread::JoinHandle<std::io::Result<()>> {
    let bg = std::mem::ManuallyDrop::new(bg);
    // SAFETY: `guard` is moved out exactly once, and `bg` (ManuallyDrop) is neither used nor dropped afterwards,
    // so the handle keeps a single owner.
    unsafe { std::ptr::read(&bg.guard) }
}

/// How the exit left the mount point.
#[derive(Debug)]
enum Released {
    /// It no longer held this daemon's mount (unmounted by someone else, or another mount now): left alone.
    NotOurs,
    Unmounted,
    /// Busy (files still open): detached lazily; it disappears now, and open descriptors fail once we exit.
    Detached,
}

/// The mount this daemon made, told apart from any later mount on the same path.
///
/// The path alone says nothing: `umount; mount` puts a new daemon's mount there while this one is still exiting.
/// The device number alone is not enough either: the kernel frees a FUSE superblock's anonymous device number
/// when it is unmounted and gives the lowest free one to the next mount, so the new mount usually gets the very
/// same `st_dev`. The connection id under /sys/fs/fuse/connections is that same number, and the mount id in
/// /proc/self/mountinfo is recycled the same way (the never-reused `STATX_MNT_ID_UNIQUE` needs Linux 6.8).
/// What is sound on any kernel is the device number *plus the liveness of our own connection*, read from a
/// duplicate of our /dev/fuse descriptor: the kernel aborts the connection before it frees the device number,
/// so while our connection is up no other mount can have our number. Liveness is read after the stat, so a
/// match means the mount at the path was ours when stat looked. The only window left is between that check
/// and umount(2), which takes a path: microseconds, and someone would have to unmount our live mount and mount
/// another one inside it. A connection aborted through /sys/fs/fuse/connections leaves a dead mount whose number
/// a new mount may also have by now, so it is left alone too, as libfuse does (the next mount names it as stale).
struct OwnMount {
    path: PathBuf,
    /// `st_dev` of the mount point right after mounting.
    dev: u64,
    /// A duplicate of the session's /dev/fuse descriptor.
    conn: std::os::fd::OwnedFd,
}

impl OwnMount {
    /// Whether our FUSE connection is still up: /dev/fuse reports POLLERR once it is unmounted or aborted.
    fn connected(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: self.conn.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd for a descriptor we own; a zero timeout does not block.
            if unsafe { libc::poll(&mut p, 1, 0) } >= 0 {
                return p.revents & libc::POLLERR == 0;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return false; // unknown counts as gone: never unmount on a guess
            }
        }
    }

    /// Whether the mount point holds this daemon's mount (see the type's doc for why both checks, in this order).
    fn is_ours(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(&self.path).map(|m| m.dev());
        dev.is_ok_and(|d| d == self.dev) && self.connected()
    }

    /// Unmounts the mount point if it is ours; a busy one is detached lazily (the open files' data is saved).
    fn unmount_if_ours(&self) -> Result<Released> {
        if !self.is_ours() {
            return Ok(Released::NotOurs);
        }
        match umount2(&self.path, 0) {
            Ok(()) => Ok(Released::Unmounted),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.detach_if_ours(),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => fusermount_unmount(&self.path),
            Err(e) => Err(e.into()),
        }
    }

    /// The lazy detach of a busy mount, after the identity check again (the failed attempt took time).
    fn detach_if_ours(&self) -> Result<Released> {
        if !self.is_ours() {
            return Ok(Released::NotOurs);
        }
        log::warn!("{} is busy (files still open); detaching it", self.path.display());
        umount2(&self.path, libc::MNT_DETACH)?;
        Ok(Released::Detached)
    }
}

fn umount2(path: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path; umount2 has no other preconditions.
    if unsafe { libc::umount2(path.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Without CAP_SYS_ADMIN only the setuid fusermount3 may unmount (it is also what mounted it then); `-z` detaches
/// lazily, as files may be open.
fn fusermount_unmount(path: &Path) -> Result<Released> {
    let status = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "-q", "--"])
        .arg(path)
        .status()
        .context("running fusermount3 -u")?;
    if !status.success() {
        bail!("fusermount3 -u {} failed ({status})", path.display());
    }
    Ok(Released::Detached)
}

/// Mounts `fs` at `mountpoint` and serves it on background threads; returns once the mount answers. `metrics`
/// records each FUSE request and reads the file system's numbers from now on.
pub fn start_session(
    fs: Arc<Fs>,
    rt: tokio::runtime::Handle,
    mountpoint: &Path,
    opts: &MountOptions,
    source: &str,
    metrics: &Arc<Metrics>,
) -> Result<fuser::BackgroundSession> {
    Ok(start_own_session(fs, rt, mountpoint, opts, source, metrics)?.0)
}

/// [`start_session`], also returning what tells this mount apart from a later one on the same path, recorded
/// right after mounting (see [`OwnMount`]).
fn start_own_session(
    fs: Arc<Fs>,
    rt: tokio::runtime::Handle,
    mountpoint: &Path,
    opts: &MountOptions,
    source: &str,
    metrics: &Arc<Metrics>,
) -> Result<(fuser::BackgroundSession, OwnMount)> {
    use std::os::fd::AsFd;
    metrics.set_fs(&fs);
    let adapter = crate::fuse::FuseAdapter::new(fs.clone(), rt, metrics.clone(), opts.fuse_threads.max(1));
    let session = fuser::Session::new(adapter, mountpoint, &session_config(opts, source)).with_context(|| {
        format!(
            "mounting at {} (is FUSE available: /dev/fuse, fuse3?)",
            mountpoint.display()
        )
    })?;
    // Attributes only (a negative offset): the kernel asks for them again at the next stat, and keeps the pages.
    // It must stay negative: the hook is called during a write, and invalidating pages would wait for the page
    // that write holds locked.
    let notifier = session.notifier();
    fs.on_attr_changed(move |ino| {
        if let Err(e) = notifier.inval_inode(fuser::INodeNo(ino), -1, 0) {
            log::debug!("invalidating the kernel's attributes of inode {ino}: {e}");
        }
    });
    let conn = session
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating the /dev/fuse descriptor")?;
    let bg = session.spawn().context("starting the FUSE session")?;
    let dev = wait_until_answers(mountpoint)?;
    raise_kernel_read_ahead(mountpoint, opts.read_ahead_kib);
    let path = mountpoint.to_path_buf();
    Ok((bg, OwnMount { path, dev, conn }))
}

fn session_config(opts: &MountOptions, source: &str) -> fuser::Config {
    let mut mount_options = vec![
        fuser::MountOption::FSName(opts.fsname.clone().unwrap_or_else(|| source.to_string())),
        fuser::MountOption::Subtype("s3crypt".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if opts.read_only {
        mount_options.push(fuser::MountOption::RO);
    }
    let mut config = fuser::Config::default();
    config.mount_options = mount_options;
    config.acl = if opts.allow_other {
        fuser::SessionACL::All
    } else if opts.allow_root {
        fuser::SessionACL::RootAndOwner
    } else {
        fuser::SessionACL::Owner
    };
    config.n_threads = Some(opts.fuse_threads.max(1));
    config.clone_fd = true;
    config
}

/// The kernel reads ahead only 128 KiB on a FUSE mount whatever the file system negotiates, so sequential reads
/// arrive as 128 KiB requests. Raise the mount's read-ahead (up to the 1 MiB a request can carry, times the
/// configured window, at most 4 MiB) so they arrive as 1 MiB requests, several at a time. Needs root; without
/// it reads still work, in smaller requests.
fn raise_kernel_read_ahead(mountpoint: &Path, read_ahead_kib: u64) {
    use std::os::unix::fs::MetadataExt;
    if read_ahead_kib == 0 {
        return;
    }
    let Ok(md) = std::fs::metadata(mountpoint) else { return };
    let (major, minor) = (libc::major(md.dev()), libc::minor(md.dev()));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    let kib = read_ahead_kib.clamp(128, 4096);
    match std::fs::write(&path, kib.to_string()) {
        Ok(()) => log::debug!("kernel read-ahead of the mount set to {kib} KiB ({path})"),
        Err(e) => {
            log::info!("could not raise the kernel read-ahead ({path}: {e}); sequential reads use 128 KiB requests")
        }
    }
}

/// Waits until the mount point is served by this file system (its device differs from the parent's); returns
/// the mount's device number.
fn wait_until_answers(mnt: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let parent = mnt.parent().unwrap_or(Path::new("/"));
    let parent_dev = std::fs::metadata(parent).map(|m| m.dev()).unwrap_or(0);
    for _ in 0..200 {
        if let Ok(m) = std::fs::metadata(mnt) {
            if m.dev() != parent_dev {
                return Ok(m.dev());
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("the mount at {} did not answer within 5 s", mnt.display())
}

/// Waits for SIGTERM, SIGINT or the end of the session (an external unmount). Returns the signal's name.
async fn wait_for_end(bg: &fuser::BackgroundSession, stats: &StatsWriter) -> Option<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
    ) else {
        log::error!("cannot install signal handlers; the mount ends only by unmounting");
        while !bg.guard.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        return None;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return Some("SIGTERM"),
            _ = int.recv() => return Some("SIGINT"),
            _ = usr1.recv() => stats.write(),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if bg.guard.is_finished() {
                    return None;
                }
            }
        }
    }
}

/// Writes the counters to `stats_file` (on SIGUSR1): requests and bytes per S3 operation, KMS calls.
struct StatsWriter {
    file: Option<PathBuf>,
    counters: Option<Counters>,
    keys: Arc<keys::KeyStats>,
}

impl StatsWriter {
    fn write(&self) {
        let Some(path) = &self.file else {
            log::info!("SIGUSR1: no stats_file option; nothing written");
            return;
        };
        let mut fields = Vec::new();
        if let Some(c) = &self.counters {
            let s = c();
            for op in crate::store::failing::OpKind::ALL {
                let name = format!("{op:?}").to_lowercase();
                fields.push(format!("\"s3_{name}\": {}", s.count(op)));
                fields.push(format!("\"bytes_up_{name}\": {}", s.bytes_up(op)));
                fields.push(format!("\"bytes_down_{name}\": {}", s.bytes_down(op)));
            }
            fields.push(format!("\"bytes_uploaded\": {}", s.total_bytes_up()));
            fields.push(format!("\"bytes_downloaded\": {}", s.total_bytes_down()));
            fields.push(format!("\"s3_requests\": {}", s.total_count()));
        }
        let k = self.keys.snapshot();
        fields.push(format!("\"kms_generate\": {}", k.kms_generate));
        fields.push(format!("\"kms_decrypt\": {}", k.kms_decrypt));
        fields.push(format!("\"kms_calls\": {}", k.kms_generate + k.kms_decrypt));
        fields.push(format!("\"key_cache_hits\": {}", k.cache_hits));
        fields.push(format!("\"key_cache_misses\": {}", k.cache_misses));
        let json = format!("{{{}}}\n", fields.join(", "));
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, json).and_then(|_| std::fs::rename(&tmp, path)) {
            log::warn!("writing stats to {}: {e}", path.display());
        }
    }
}

/// `s3crypt cat s3://BUCKET/KEY`: writes one object's plaintext to stdout.
pub fn cat(source: &str, opts: MountOptions) -> Result<()> {
    use std::io::Write;
    let (bucket, key) = cli::parse_object_url(source)?;
    let rt = runtime()?;
    let data = rt.block_on(async {
        let (prefix, _) = split_key(&key);
        let b = backend(&opts, &bucket, prefix, &Metrics::new(&bucket, prefix)).await?;
        let out = b
            .store
            .get(&key, None, None)
            .await
            .with_context(|| format!("reading s3://{bucket}/{key}"))?;
        decode_object(&b, &opts, &key, &out.info.metadata, &out.data).await
    })?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&data)?;
    stdout.flush()?;
    Ok(())
}

/// The directory part (with its slash) and the name of a key.
fn split_key(key: &str) -> (&str, &str) {
    match key.rfind('/') {
        Some(i) => (&key[..=i], &key[i + 1..]),
        None => ("", key),
    }
}

async fn decode_object(
    b: &Backend,
    opts: &MountOptions,
    key: &str,
    meta: &crate::store::Metadata,
    body: &[u8],
) -> Result<Vec<u8>> {
    let Some(keys) = &b.keys else { return Ok(body.to_vec()) };
    match format::ObjectHeader::from_metadata(meta)? {
        Some(h) => {
            let cipher = keys.open_file(&h).await?;
            Ok(format::decrypt_object(&cipher, body, h.block_size).with_context(|| format!("decrypting {key}"))?)
        }
        None if opts.allow_plaintext => Ok(body.to_vec()),
        None => bail!("{key} has no s3crypt metadata (it was not written by s3crypt in a client-side mode); use -o allow_plaintext to read it as is"),
    }
}

/// `s3crypt put FILE s3://BUCKET/KEY`: writes one file as an object, encrypted as the mount would.
pub fn put(file: &Path, dest: &str, opts: MountOptions) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (bucket, key) = cli::parse_object_url(dest)?;
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let md = std::fs::metadata(file)?;
    let rt = runtime()?;
    rt.block_on(async {
        let (prefix, _) = split_key(&key);
        let b = backend(&opts, &bucket, prefix, &Metrics::new(&bucket, prefix)).await?;
        let mut meta = crate::store::Metadata::new();
        let attr = crate::fs::Attr {
            ino: 0,
            kind: crate::fs::Kind::File,
            size: data.len() as u64,
            perm: (md.mode() & 0o7777) as u16,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.modified().unwrap_or_else(|_| std::time::SystemTime::now()),
            atime: md.accessed().unwrap_or_else(|_| std::time::SystemTime::now()),
            ctime: std::time::UNIX_EPOCH + std::time::Duration::new(md.ctime().max(0) as u64, md.ctime_nsec() as u32),
            unlinked: false,
        };
        crate::fs::inode::attr_to_metadata(&attr, &mut meta);
        let body = match &b.keys {
            Some(keys) => {
                let (cipher, header) = keys.new_file(opts.key_mode, b.block_size).await?;
                header.to_metadata(&mut meta);
                format::encrypt_object(&cipher, &data, b.block_size, &mut rand::thread_rng())
            }
            None => data,
        };
        b.store
            .put(&key, bytes::Bytes::from(body), &meta, crate::store::PutCondition::None)
            .await
            .with_context(|| format!("writing s3://{bucket}/{key}"))?;
        anyhow::Ok(())
    })
}
