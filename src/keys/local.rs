//! `cse-local`: data keys wrapped under a local 256-bit master key.
//!
//! The master key (from a key file) is never used directly: the wrapping key is
//! `HKDF-SHA256(ikm = master, salt = none, info = "s3crypt v1 key wrapping")`, so the master key could later feed
//! other derivations without key reuse. Each file gets 32 random bytes from the OS as its data key, wrapped as
//!
//! ```text
//! wrapped = nonce (12 random bytes) || AES-256-GCM-SIV(wrapping key, data key, AD) (32 + 16 tag) = 60 bytes
//! AD      = "s3crypt.wrap" || 0x01 (wrapping version) || file id (16 bytes)
//! ```
//!
//! Binding the file id into the AD means a wrapped key copied into another file's metadata fails to open.
//! GCM-SIV keeps a (very unlikely) nonce repeat from being catastrophic. A wrong master key and a tampered wrapped
//! key both show as an authentication failure: [`KeyError::WrongKey`].
use super::counters::KeyStats;
use super::keyfile::read_key_file;
use super::{DataKeyProvider, KeyError, KeyMode};
use crate::format::{DataKey, FileId, KEY_LEN};
use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use async_trait::async_trait;
use rand::RngCore;
use std::fmt;
use std::sync::Arc;
use zeroize::Zeroizing;

/// HKDF info string for the wrapping key.
pub const WRAP_KEY_INFO: &[u8] = b"s3crypt v1 key wrapping";
/// Start of the associated data of a wrapped key.
pub const WRAP_AD_LABEL: &[u8] = b"s3crypt.wrap";
/// Version byte of the wrapping, part of the AD.
pub const WRAP_VERSION: u8 = 1;
/// Nonce length of AES-GCM-SIV.
pub const WRAP_NONCE_LEN: usize = 12;
/// Length of a wrapped key: nonce, encrypted key, tag.
pub const WRAPPED_LEN: usize = WRAP_NONCE_LEN + KEY_LEN + 16;

/// The `cse-local` provider. Holds only the derived wrapping key (zeroized on drop); `Debug` shows where the
/// master key came from, never key bytes.
pub struct LocalProvider {
    wrapping_key: Zeroizing<[u8; KEY_LEN]>,
    source: String,
    stats: Arc<KeyStats>,
}

impl LocalProvider {
    /// Reads the master key from `spec` (a path or `cred:NAME`, see [`read_key_file`]).
    pub fn from_key_file(spec: &str, stats: Arc<KeyStats>) -> Result<Self, KeyError> {
        let master = read_key_file(spec)?;
        Ok(Self::new(&master, spec, stats))
    }

    /// A provider for a master key already in memory; `source` names it in error messages.
    pub fn new(master: &[u8; KEY_LEN], source: impl Into<String>, stats: Arc<KeyStats>) -> Self {
        let mut wrapping_key = Zeroizing::new([0u8; KEY_LEN]);
        hkdf::Hkdf::<sha2::Sha256>::new(None, master)
            .expand(WRAP_KEY_INFO, &mut wrapping_key[..])
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        LocalProvider {
            wrapping_key,
            source: source.into(),
            stats,
        }
    }

    fn cipher(&self) -> Aes256GcmSiv {
        Aes256GcmSiv::new_from_slice(&self.wrapping_key[..]).expect("wrapping key is 32 bytes")
    }
}

fn wrap_ad(file_id: &FileId) -> Vec<u8> {
    let mut ad = Vec::with_capacity(WRAP_AD_LABEL.len() + 1 + file_id.len());
    ad.extend_from_slice(WRAP_AD_LABEL);
    ad.push(WRAP_VERSION);
    ad.extend_from_slice(file_id);
    ad
}

impl fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalProvider")
            .field("master_key", &self.source)
            .finish_non_exhaustive()
    }
}

impl LocalProvider {
    /// `nonce || AES-256-GCM-SIV(wrapping key, key, AD = "s3crypt.wrap" || version || file id)`.
    fn wrap(&self, file_id: &FileId, key: &[u8; KEY_LEN]) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; WRAP_NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .cipher()
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &key[..],
                    aad: &wrap_ad(file_id),
                },
            )
            .map_err(|_| KeyError::Config("key wrapping failed".into()))?;
        let mut wrapped = Vec::with_capacity(WRAPPED_LEN);
        wrapped.extend_from_slice(&nonce);
        wrapped.extend_from_slice(&sealed);
        Ok(wrapped)
    }
}

#[async_trait]
impl DataKeyProvider for LocalProvider {
    fn mode(&self) -> KeyMode {
        KeyMode::CseLocal
    }

    async fn generate(&self, file_id: &FileId) -> Result<(DataKey, Vec<u8>), KeyError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(&mut key[..]);
        let wrapped = self.wrap(file_id, &key)?;
        Ok((DataKey::from_bytes(*key), wrapped))
    }

    async fn rewrap(&self, file_id: &FileId, wrapped: &[u8], from: &dyn DataKeyProvider) -> Result<Vec<u8>, KeyError> {
        if from.mode() != KeyMode::CseLocal {
            return Err(super::unsupported_rotation(from.mode(), KeyMode::CseLocal));
        }
        let key = from.unwrap(file_id, wrapped).await?;
        self.wrap(file_id, key.as_bytes())
    }

    async fn unwrap(&self, file_id: &FileId, wrapped: &[u8]) -> Result<DataKey, KeyError> {
        self.stats.count_local_unwrap();
        if wrapped.len() != WRAPPED_LEN {
            return Err(KeyError::BadWrappedKey(format!(
                "a cse-local wrapped key is {WRAPPED_LEN} bytes, this one is {}; the object's metadata is damaged \
                 or was not written in key_mode=cse-local",
                wrapped.len()
            )));
        }
        let (nonce, sealed) = wrapped.split_at(WRAP_NONCE_LEN);
        let plain = Zeroizing::new(
            self.cipher()
                .decrypt(
                    &Nonce::try_from(nonce).expect("nonce is 12 bytes"),
                    Payload {
                        msg: sealed,
                        aad: &wrap_ad(file_id),
                    },
                )
                .map_err(|_| {
                    KeyError::WrongKey(format!(
                        "the master key in {} does not match the one this volume was made with (or the wrapped key \
                         was altered or moved from another file)",
                        self.source
                    ))
                })?,
        );
        DataKey::from_slice(&plain).ok_or_else(|| KeyError::BadWrappedKey("unwrapped key has the wrong length".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(byte: u8) -> LocalProvider {
        LocalProvider::new(&[byte; KEY_LEN], "test-master", Arc::new(KeyStats::new()))
    }

    #[tokio::test]
    async fn round_trip_and_binding() {
        let p = provider(1);
        let (key, wrapped) = p.generate(&[9; 16]).await.unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        assert_eq!(p.unwrap(&[9; 16], &wrapped).await.unwrap().as_bytes(), key.as_bytes());
        assert!(matches!(p.unwrap(&[8; 16], &wrapped).await, Err(KeyError::WrongKey(_))));
        assert!(matches!(
            p.unwrap(&[9; 16], &wrapped[1..]).await,
            Err(KeyError::BadWrappedKey(_))
        ));
        let mut tampered = wrapped.clone();
        tampered[20] ^= 1;
        assert!(matches!(
            p.unwrap(&[9; 16], &tampered).await,
            Err(KeyError::WrongKey(_))
        ));
        assert_eq!(p.stats.snapshot().local_unwrap, 4);
    }

    #[tokio::test]
    async fn wrong_master_key_is_named() {
        let (_, wrapped) = provider(1).generate(&[3; 16]).await.unwrap();
        match provider(2).unwrap(&[3; 16], &wrapped).await {
            Err(e @ KeyError::WrongKey(_)) => assert!(e.to_string().contains("test-master"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrapping_key_is_derived_not_master() {
        let p = provider(5);
        assert_ne!(*p.wrapping_key, [5u8; KEY_LEN]);
    }
}
