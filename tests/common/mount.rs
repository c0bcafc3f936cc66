//! Real FUSE mounts of s3crypt for integration tests, one per key mode, against the local S3 + KMS server.
//!
//! A [`Volume`] is a fresh bucket set up for one key mode: its default encryption differs from the mode under
//! test (so a HEAD proves the mount sent its own header), with a fresh KMS key and key files. A [`TestMount`]
//! mounts it in this process through the same code the daemon runs (`run::s3_stack`, `run::open_volume`,
//! `run::start_session`, `run::serve_metrics`), with the real S3 store wrapped in the request-counting store so
//! tests can assert requests and bytes.
#![allow(dead_code)]

use s3crypt::cli::MountOptions;
use s3crypt::fs::Fs;
use s3crypt::keys::{KeyMode, KeyStats};
use s3crypt::metrics::server::Server;
use s3crypt::metrics::Metrics;
use s3crypt::store::failing::FailingStore;
use s3crypt::store::s3::S3Store;
use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub type Counting = FailingStore<S3Store>;

/// A bucket prepared for one key mode.
pub struct Volume {
    pub mode: KeyMode,
    pub bucket: String,
    /// The KMS key of the sse-kms and cse-kms modes.
    pub kms_arn: String,
    pub dir: tempfile::TempDir,
    /// The `-o` words that mount this volume.
    pub options: Vec<String>,
}

impl Volume {
    pub fn new(mode: KeyMode) -> Volume {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (bucket, arn) = rt.block_on(async {
            let bucket = super::create_bucket(mode.as_str()).await;
            let arn = super::create_kms_key().await;
            match mode {
                // The default differs from what the mode sends: only the mode's own header explains the result.
                KeyMode::SseS3 => super::set_bucket_default_kms(&bucket, &arn).await,
                KeyMode::SseKms | KeyMode::SseC | KeyMode::CseKms | KeyMode::CseLocal => {
                    super::set_bucket_default_s3(&bucket).await
                }
            }
            (bucket, arn)
        });
        let dir = tempfile::Builder::new().prefix("s3crypt-vol").tempdir().unwrap();
        let mut options = vec![
            format!("key_mode={}", mode.as_str()),
            format!("endpoint={}", super::endpoint()),
            "region=us-east-1".to_string(),
            "path_style".to_string(),
            format!("recovery_dir={}", dir.path().join("recovery").display()),
            format!("staging_dir={}", dir.path().display()),
        ];
        match mode {
            KeyMode::SseS3 => {}
            KeyMode::SseKms | KeyMode::CseKms => options.push(format!("kms_key_id={arn}")),
            KeyMode::SseC => {
                let f = write_key_file(dir.path(), "sse-c.key");
                options.push(format!("sse_c_key_file={}", f.display()));
            }
            KeyMode::CseLocal => {
                let f = write_key_file(dir.path(), "master.key");
                options.push(format!("master_key_file={}", f.display()));
            }
        }
        Volume {
            mode,
            bucket,
            kms_arn: arn,
            dir,
            options,
        }
    }

    pub fn recovery_dir(&self) -> PathBuf {
        self.dir.path().join("recovery")
    }

    pub fn mount_options(&self, extra: &[&str]) -> MountOptions {
        let mut words = self.options.clone();
        words.extend(extra.iter().map(|s| s.to_string()));
        let opts = MountOptions::parse(&words).expect("options parse");
        opts.validate().expect("options valid");
        opts
    }
}

/// Writes 32 random bytes with mode 0600.
pub fn write_key_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let key: [u8; 32] = rand::random();
    std::fs::write(&path, key).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// One in-process FUSE mount.
pub struct TestMount {
    pub mnt: tempfile::TempDir,
    pub fs: Arc<Fs>,
    pub counter: Arc<Counting>,
    pub key_stats: Arc<KeyStats>,
    pub block_size: u64,
    session: Option<fuser::BackgroundSession>,
    pub metrics: Arc<Metrics>,
    /// The `metrics_addr=` endpoint, if the options asked for one.
    pub metrics_server: Option<Server>,
    rt: Option<tokio::runtime::Runtime>,
}

impl TestMount {
    pub fn mount(vol: &Volume) -> TestMount {
        Self::mount_with(vol, &[])
    }

    pub fn mount_with(vol: &Volume, extra: &[&str]) -> TestMount {
        Self::try_mount(vol, extra).expect("mount")
    }

    pub fn try_mount(vol: &Volume, extra: &[&str]) -> anyhow::Result<TestMount> {
        // The daemon's log lines, shown with a failing test's output: warnings too unless RUST_LOG says otherwise,
        // so that a failure under injected faults shows the retries and timeouts that led to it.
        let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("s3crypt=warn"))
            .is_test(true)
            .try_init();
        let opts = vol.mount_options(extra);
        let rt = s3crypt::run::runtime()?;
        let metrics = Metrics::new(&vol.bucket, "");
        let (counter, backend, key_stats, probe) = rt.block_on(async {
            let (sdk, keys) = s3crypt::run::load_keys(&opts).await?;
            // The daemon's store stack: retries above the counting store, so every attempt is counted.
            let (stack, counter) = s3crypt::run::s3_stack(&opts, &sdk, &vol.bucket, &keys, &metrics);
            let backend = s3crypt::run::open_volume(&opts, &vol.bucket, "", stack.store, &keys).await?;
            anyhow::Ok((counter, backend, keys.stats.clone(), stack.probe))
        })?;
        let block_size = backend.block_size.get();
        let cfg = s3crypt::run::fs_config(&opts, &vol.bucket, "", backend.block_size, backend.journal_key.clone());
        let fs = Fs::new(backend.store, backend.keys, cfg)?;
        rt.block_on(fs.recover());
        let mnt = tempfile::Builder::new().prefix("s3crypt-test").tempdir()?;
        let source = format!("s3://{}", vol.bucket);
        let session =
            s3crypt::run::start_session(fs.clone(), rt.handle().clone(), mnt.path(), &opts, &source, &metrics)?;
        let metrics_server = s3crypt::run::serve_metrics(&opts, &metrics, probe, "", mnt.path(), rt.handle())?;
        Ok(TestMount {
            mnt,
            fs,
            counter,
            key_stats,
            block_size,
            session: Some(session),
            metrics,
            metrics_server,
            rt: Some(rt),
        })
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.path().join(rel)
    }

    /// Unmounts (uploading anything still open first).
    pub fn unmount(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.metrics_server.take();
        if let (Some(session), Some(rt)) = (self.session.take(), self.rt.as_ref()) {
            rt.block_on(self.fs.flush_all());
            if let Err(e) = session.umount_and_join() {
                eprintln!("unmount: {e}");
                let _ = std::process::Command::new("fusermount3")
                    .arg("-uz")
                    .arg(self.mnt.path())
                    .status();
            }
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        }
    }
}

impl Drop for TestMount {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `close(2)` with its result: a FUSE close reports the upload's outcome, which `File`'s drop would ignore.
pub fn close_checked(f: File) -> io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: `fd` came from `into_raw_fd` and is closed exactly once here.
    if unsafe { libc::close(fd) } != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Creates or truncates `path`, writes `data` and closes, reporting the close's result.
pub fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = File::create(path)?;
    f.write_all(data)?;
    close_checked(f)
}

/// Deterministic, distinctive content (not random, so that a stored plaintext would be found by a search).
pub fn pattern(size: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 32);
    let mut i = 0u64;
    while out.len() < size {
        out.extend_from_slice(format!("<{seed:04}:{i:09}>").as_bytes());
        i += 1;
    }
    out.truncate(size);
    out
}

/// The key modes, for tests that run once per mode.
pub const ALL_MODES: [KeyMode; 5] = KeyMode::ALL;

/// Drops the kernel's cached pages of an open file, so that the next read asks the daemon.
pub fn drop_page_cache(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise on a descriptor the caller holds open; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

/// The immutable attribute (chattr +i) on a file or directory until dropped: ext4 then refuses every change to it
/// (EPERM), through descriptors already open too. How the tests make the staging disk fail. Set with the ioctl
/// itself rather than by running chattr: a process forked while a file of the mount is open closes its copy of
/// the descriptor when it execs, and that close is a flush which waits for the file's upload.
pub struct Immutable(PathBuf);

/// FS_IMMUTABLE_FL of linux/fs.h.
const FS_IMMUTABLE_FL: libc::c_long = 0x10;

fn set_immutable(p: &Path, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(p)?;
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS and FS_IOC_SETFLAGS read and write one long at the pointer given, which is valid;
    // the descriptor is open for the duration.
    unsafe {
        if libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) != 0 {
            return Err(io::Error::last_os_error());
        }
        flags = if on {
            flags | FS_IMMUTABLE_FL
        } else {
            flags & !FS_IMMUTABLE_FL
        };
        if libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl Immutable {
    pub fn set(p: &Path) -> Immutable {
        set_immutable(p, true).unwrap_or_else(|e| panic!("chattr +i {}: {e}", p.display()));
        Immutable(p.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = set_immutable(&self.0, false);
    }
}
