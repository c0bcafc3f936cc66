//! Keys: the five key modes behind one interface, key files, the data-key cache and the volume descriptor.
//!
//! Server-side modes (`sse-s3`, `sse-kms`, `sse-c`) only decide which headers the store sends: they produce a
//! [`crate::store::Sse`]. Client-side modes (`cse-kms`, `cse-local`) produce a [`DataKeyProvider`] that makes a
//! fresh data key per file and wraps it for the object's metadata, and unwraps it again on read. Unwrapped keys
//! are kept in the bounded [`DataKeyCache`] so that a file's key costs one KMS call however often it is read.
use crate::format::{DataKey, FileId};
use async_trait::async_trait;
use std::fmt;
use std::str::FromStr;

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
}
