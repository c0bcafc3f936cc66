//! Keys: the five key modes behind one interface, key files, the data-key cache and the volume descriptor.
//!
//! Server-side modes (`sse-s3`, `sse-kms`, `sse-c`) only decide which headers the store sends: they produce a
//! [`crate::store::Sse`]. Client-side modes (`cse-kms`, `cse-local`) produce a [`DataKeyProvider`] that makes a
//! fresh data key per file and wraps it for the object's metadata, and unwraps it again on read. Unwrapped keys
//! are kept in the bounded [`DataKeyCache`] so that a file's key costs one KMS call however often it is read.
//!
//! # Layout
//! - [`keyfile`]: reading key files (path or systemd credential, raw/hex/base64) and `keygen`.
//! - [`sse`]: the server-side modes `sse-s3`, `sse-kms`, `sse-c` as a store [`Sse`].
//! - [`kms`]: `cse-kms`, data keys from AWS KMS ([`KmsProvider`]).
//! - [`local`]: `cse-local`, data keys wrapped under a local master key ([`LocalProvider`]).
//! - [`cache`]: the bounded cache of unwrapped data keys ([`DataKeyCache`]).
//! - [`counters`]: KMS-call and cache counters ([`KeyStats`]).
//! - [`volume`]: the volume descriptor that fixes a client-side volume's mode and block size and checks its key.
//!
//! [`build_keys`] turns a [`KeyConfig`] into the pieces the rest of s3crypt needs ([`Keys`]).
use crate::format::{DataKey, FileId};
use crate::store::Sse;
use async_trait::async_trait;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Object metadata set by `s3crypt rekey` on each object it copies onto itself: the ETag the copy was made from.
/// A mount whose conditional write fails against such an object knows its base was only rekeyed (same bytes)
/// and writes over it instead of calling it a conflict.
pub const META_REKEYED_FROM: &str = "s3crypt-rekeyed-from";

pub mod cache;
pub mod counters;
pub mod keyfile;
pub mod kms;
pub mod local;
pub mod sse;
pub mod volume;

pub use cache::DataKeyCache;
pub use counters::{KeyStats, KeyStatsSnapshot};
pub use keyfile::{keygen, read_key_file};
pub use kms::KmsProvider;
pub use local::LocalProvider;
pub use sse::sse_for_mode;
pub use volume::{open_existing_volume, open_or_create_volume, volume_key, VolumeInfo, VOLUME_OBJECT};

/// The five key modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyMode {
    SseS3,
    SseKms,
    SseC,
    CseKms,
    CseLocal,
}

impl KeyMode {
    pub const ALL: [KeyMode; 5] = [
        KeyMode::SseS3,
        KeyMode::SseKms,
        KeyMode::SseC,
        KeyMode::CseKms,
        KeyMode::CseLocal,
    ];

    /// The name used in options, metadata and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyMode::SseS3 => "sse-s3",
            KeyMode::SseKms => "sse-kms",
            KeyMode::SseC => "sse-c",
            KeyMode::CseKms => "cse-kms",
            KeyMode::CseLocal => "cse-local",
        }
    }

    /// True for the modes in which s3crypt itself encrypts (the object body is in the block format).
    pub fn is_client_side(self) -> bool {
        match self {
            KeyMode::CseKms | KeyMode::CseLocal => true,
            KeyMode::SseS3 | KeyMode::SseKms | KeyMode::SseC => false,
        }
    }
}

impl fmt::Display for KeyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown key_mode '{s}'; valid: sse-s3, sse-kms, sse-c, cse-kms, cse-local"))
    }
}

/// Makes and unwraps per-file data keys in a client-side mode.
#[async_trait]
pub trait DataKeyProvider: Send + Sync + 'static {
    fn mode(&self) -> KeyMode;

    /// A fresh data key for a new file, and its wrapped form to store in the object's metadata. The wrapping
    /// binds `file_id`.
    async fn generate(&self, file_id: &FileId) -> Result<(DataKey, Vec<u8>), KeyError>;

    /// Unwraps a key made by [`generate`](Self::generate) for the same `file_id`.
    async fn unwrap(&self, file_id: &FileId, wrapped: &[u8]) -> Result<DataKey, KeyError>;

    /// The KMS key this provider wraps with, if it is a KMS one.
    fn kms_key_id(&self) -> Option<&str> {
        None
    }

    /// Key rotation: the data key that `from` wrapped as `wrapped` for `file_id`, wrapped under this provider's
    /// key, still bound to `file_id`.
    async fn rewrap(&self, file_id: &FileId, wrapped: &[u8], from: &dyn DataKeyProvider) -> Result<Vec<u8>, KeyError> {
        let _ = (file_id, wrapped);
        Err(unsupported_rotation(from.mode(), self.mode()))
    }

    /// During a rotation: `wrapped` moved under the current key if it is under a previous one (`None`: it is
    /// under the current key already, or there is no previous key). A mount calls it before writing a file, so
    /// that what it writes never goes back under the old key.
    async fn to_current(&self, file_id: &FileId, wrapped: &[u8]) -> Result<Option<Vec<u8>>, KeyError> {
        let _ = (file_id, wrapped);
        Ok(None)
    }
}

/// A rotation between these modes cannot be done by re-wrapping data keys.
pub(crate) fn unsupported_rotation(from: KeyMode, to: KeyMode) -> KeyError {
    KeyError::Config(format!(
        "rotating keys from key_mode={from} to key_mode={to} is not supported"
    ))
}

/// The current key and the previous one, during a key rotation: new files are wrapped with the current key;
/// a file is unwrapped with the current key, or else with the previous one (`old_master_key_file=`,
/// `old_kms_key_id=`), so a volume
/// stays readable while `s3crypt rekey` runs.
pub struct WithPrevious {
    pub current: Arc<dyn DataKeyProvider>,
    pub previous: Arc<dyn DataKeyProvider>,
    /// Wrapped keys known to open under the current key, so that a file uploaded again and again during a
    /// rotation costs one unwrap (a KMS Decrypt in cse-kms), not one per upload. Wrapped keys are ciphertext,
    /// not secrets; the set is bounded.
    known_current: std::sync::Mutex<lru::LruCache<(FileId, Vec<u8>), ()>>,
}

/// Wrapped keys [`WithPrevious`] remembers as current (about 200 bytes each).
const KNOWN_CURRENT: usize = 4096;

impl WithPrevious {
    pub fn new(current: Arc<dyn DataKeyProvider>, previous: Arc<dyn DataKeyProvider>) -> Self {
        let cap = std::num::NonZeroUsize::new(KNOWN_CURRENT).expect("non-zero");
        WithPrevious {
            current,
            previous,
            known_current: std::sync::Mutex::new(lru::LruCache::new(cap)),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, lru::LruCache<(FileId, Vec<u8>), ()>> {
        self.known_current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl DataKeyProvider for WithPrevious {
    fn mode(&self) -> KeyMode {
        self.current.mode()
    }

    async fn generate(&self, file_id: &FileId) -> Result<(DataKey, Vec<u8>), KeyError> {
        self.current.generate(file_id).await
    }

    fn kms_key_id(&self) -> Option<&str> {
        self.current.kms_key_id()
    }

    async fn rewrap(&self, file_id: &FileId, wrapped: &[u8], from: &dyn DataKeyProvider) -> Result<Vec<u8>, KeyError> {
        self.current.rewrap(file_id, wrapped, from).await
    }

    async fn to_current(&self, file_id: &FileId, wrapped: &[u8]) -> Result<Option<Vec<u8>>, KeyError> {
        let id = (*file_id, wrapped.to_vec());
        if self.known().get(&id).is_some() {
            return Ok(None);
        }
        if self.current.unwrap(file_id, wrapped).await.is_ok() {
            self.known().put(id, ());
            return Ok(None);
        }
        let moved = self.current.rewrap(file_id, wrapped, self.previous.as_ref()).await?;
        self.known().put((*file_id, moved.clone()), ());
        Ok(Some(moved))
    }

    async fn unwrap(&self, file_id: &FileId, wrapped: &[u8]) -> Result<DataKey, KeyError> {
        match self.current.unwrap(file_id, wrapped).await {
            Ok(k) => Ok(k),
            Err(current) => self.previous.unwrap(file_id, wrapped).await.map_err(|_| current),
        }
    }
}

/// Errors of the key layer. Messages name the problem and what to do; they never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("key file {path} is readable by group or others (mode {mode:04o}); run: chmod 600 {path}")]
    KeyFilePermissions { path: String, mode: u32 },
    #[error("{0}")]
    Config(String),
    #[error("the master key does not match: {0}")]
    WrongKey(String),
    #[error("KMS: {0}")]
    Kms(String),
    #[error("volume: {0}")]
    Volume(String),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("wrapped key is unusable: {0}")]
    BadWrappedKey(String),
    #[error("this volume was made with key_mode={volume}, but key_mode={requested} was asked for")]
    VolumeKeyMode { volume: KeyMode, requested: KeyMode },
    #[error(
        "this volume was made with block_size={volume}, but block_size={requested} was asked for; omit block_size \
         to use the volume's"
    )]
    VolumeBlockSize { volume: u64, requested: u64 },
}

/// What [`build_keys`] needs: the key mode and the options of that mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyConfig {
    pub mode: KeyMode,
    /// KMS key id, alias or ARN: required for `cse-kms`, optional for `sse-kms`.
    pub kms_key_id: Option<String>,
    /// Key file (path or `cred:NAME`) of the SSE-C key: required for `sse-c`.
    pub sse_c_key_file: Option<String>,
    /// Key file (path or `cred:NAME`) of the master key: required for `cse-local`.
    pub master_key_file: Option<String>,
    /// The master key before a rotation (cse-local): still accepted for reading.
    pub old_master_key_file: Option<String>,
    /// The KMS key before a rotation (cse-kms): still accepted for reading.
    pub old_kms_key_id: Option<String>,
    /// Most data keys kept unwrapped.
    pub key_cache_size: usize,
    /// Longest time a data key stays cached.
    pub key_cache_ttl: Duration,
}

impl KeyConfig {
    /// A configuration for `mode` with no options and the default cache bounds.
    pub fn new(mode: KeyMode) -> Self {
        KeyConfig {
            mode,
            kms_key_id: None,
            sse_c_key_file: None,
            master_key_file: None,
            old_master_key_file: None,
            old_kms_key_id: None,
            key_cache_size: cache::DEFAULT_CAPACITY,
            key_cache_ttl: cache::DEFAULT_TTL,
        }
    }

    /// Refuses missing required options and options that do not apply to the mode.
    pub fn validate(&self) -> Result<(), KeyError> {
        let mode = self.mode;
        let (kms, sse_c, master) = match mode {
            KeyMode::SseS3 => (Need::No, Need::No, Need::No),
            KeyMode::SseKms => (Need::Optional, Need::No, Need::No),
            KeyMode::SseC => (Need::No, Need::Yes, Need::No),
            KeyMode::CseKms => (Need::Yes, Need::No, Need::No),
            KeyMode::CseLocal => (Need::No, Need::No, Need::Yes),
        };
        check_option(mode, "kms_key_id", self.kms_key_id.is_some(), kms)?;
        check_option(mode, "sse_c_key_file", self.sse_c_key_file.is_some(), sse_c)?;
        check_option(mode, "master_key_file", self.master_key_file.is_some(), master)
    }
}

#[derive(Clone, Copy)]
enum Need {
    Yes,
    Optional,
    No,
}

fn check_option(mode: KeyMode, name: &str, given: bool, need: Need) -> Result<(), KeyError> {
    match (need, given) {
        (Need::Yes, false) => Err(KeyError::Config(format!("key_mode={mode} needs {name}"))),
        (Need::No, true) => Err(KeyError::Config(format!(
            "{name} does not apply to key_mode={mode}; remove it"
        ))),
        _ => Ok(()),
    }
}

/// The key layer as the rest of s3crypt uses it.
pub struct Keys {
    /// Headers for the store (server-side modes); [`Sse::None`] in the client-side modes.
    pub sse: Sse,
    /// Older SSE-C keys listed after the current one in the key file: accepted for reading, never for writing.
    pub sse_c_previous: Vec<crate::store::SseCustomerKey>,
    /// The data-key provider of a client-side mode.
    pub provider: Option<Arc<dyn DataKeyProvider>>,
    pub cache: Arc<DataKeyCache>,
    pub stats: Arc<KeyStats>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("sse", &self.sse)
            .field("provider", &self.provider.as_ref().map(|p| p.mode()))
            .field("cache", &self.cache)
            .field("stats", &self.stats.snapshot())
            .finish()
    }
}

/// Validates `cfg` and builds the key layer: reads key files, makes the KMS client (`sdk` is used only in
/// `cse-kms`).
pub async fn build_keys(cfg: &KeyConfig, sdk: &aws_config::SdkConfig) -> Result<Keys, KeyError> {
    cfg.validate()?;
    let stats = Arc::new(KeyStats::new());
    let cache = Arc::new(DataKeyCache::new(cfg.key_cache_size, cfg.key_cache_ttl, stats.clone()));
    let (sse, sse_c_previous) = sse_for_mode(cfg.mode, cfg.kms_key_id.as_deref(), cfg.sse_c_key_file.as_deref())?;
    let provider: Option<Arc<dyn DataKeyProvider>> = match (cfg.mode, &cfg.kms_key_id, &cfg.master_key_file) {
        (KeyMode::CseKms, Some(key_id), _) => {
            let current: Arc<dyn DataKeyProvider> = Arc::new(KmsProvider::new(sdk, key_id.clone(), stats.clone()));
            match &cfg.old_kms_key_id {
                Some(old) => Some(Arc::new(WithPrevious::new(
                    current,
                    Arc::new(match old.as_str() {
                        kms::ANY_KMS_KEY => KmsProvider::discovery(sdk, stats.clone()),
                        _ => KmsProvider::new(sdk, old.clone(), stats.clone()),
                    }),
                ))),
                None => Some(current),
            }
        }
        (KeyMode::CseLocal, _, Some(file)) => {
            let current: Arc<dyn DataKeyProvider> = Arc::new(LocalProvider::from_key_file(file, stats.clone())?);
            match &cfg.old_master_key_file {
                Some(old) => Some(Arc::new(WithPrevious::new(
                    current,
                    Arc::new(LocalProvider::from_key_file(old, stats.clone())?),
                ))),
                None => Some(current),
            }
        }
        _ => None,
    };
    Ok(Keys {
        sse,
        sse_c_previous,
        provider,
        cache,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_moved_to_the_current_key_is_not_unwrapped_again() {
        let stats = Arc::new(KeyStats::new());
        let old = Arc::new(LocalProvider::new(&[1u8; 32], "old", stats.clone()));
        let new = Arc::new(LocalProvider::new(&[2u8; 32], "new", stats.clone()));
        let both = WithPrevious::new(new.clone(), old.clone());
        let id = [5u8; crate::format::FILE_ID_LEN];
        let (key, under_old) = old.generate(&id).await.unwrap();
        let moved = both.to_current(&id, &under_old).await.unwrap().expect("moved");
        assert_eq!(new.unwrap(&id, &moved).await.unwrap().as_bytes(), key.as_bytes());
        assert!(old.unwrap(&id, &moved).await.is_err());
        let before = stats.snapshot().local_unwrap;
        for _ in 0..10 {
            assert!(both.to_current(&id, &moved).await.unwrap().is_none());
        }
        assert_eq!(stats.snapshot().local_unwrap, before, "known to be current: no unwrap");
        // A key already under the current key when first seen: one unwrap, then none.
        let (_, under_new) = new.generate(&[6u8; crate::format::FILE_ID_LEN]).await.unwrap();
        let id6 = [6u8; crate::format::FILE_ID_LEN];
        for _ in 0..5 {
            assert!(both.to_current(&id6, &under_new).await.unwrap().is_none());
        }
        assert_eq!(stats.snapshot().local_unwrap, before + 1);
    }
}
