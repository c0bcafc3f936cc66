//! The volume descriptor: one small hidden object at the mount root that fixes a client-side volume's key mode,
//! block size and format version, and lets a mount check its key before touching any file.
//!
//! It is made when a volume is first mounted, with a conditional PUT (`If-None-Match: *`) so that two first
//! mounts racing cannot both write one; the loser reads the winner's. Its key is `PREFIX` + [`VOLUME_OBJECT`],
//! where `PREFIX` is the mount's prefix (a `/` is added if the prefix is not empty and lacks one).
//!
//! # Body
//! UTF-8 text, one `key=value` per line, in this order, ending with a newline:
//!
//! ```text
//! s3crypt-volume=1
//! format_version=1
//! key_mode=cse-local              (or cse-kms)
//! block_size=65536                (plaintext bytes per block)
//! check_file_id=<32 hex digits>   (random, 16 bytes)
//! check_wrapped_key=<base64>      (provider.generate(check_file_id), as a file's wrapped key)
//! check_sealed=<base64>           (nonce 12 || AES-256-GCM-SIV(check key, CHECK_PLAINTEXT, AD))
//! ```
//!
//! with `AD = "s3crypt.volume-check" || check_file_id`. Verifying = unwrapping the check key with the configured
//! provider and opening `check_sealed`: a wrong master key fails the unwrap ([`KeyError::WrongKey`]); another KMS
//! key is refused by KMS ([`KeyError::Kms`]). Unknown lines are ignored so later versions can add fields.
use super::{DataKeyProvider, KeyError, KeyMode};
use crate::format::{BlockSize, DataKey, FileId, FILE_ID_LEN};
use crate::store::{ObjectStore, PutCondition, StoreError};
use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use base64::Engine;
use rand::RngCore;

/// Name of the descriptor object under the mount's prefix.
pub const VOLUME_OBJECT: &str = ".s3crypt-volume";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The constant sealed under the check key.
pub const CHECK_PLAINTEXT: &[u8] = b"s3crypt volume key check v1";
/// Start of the associated data of the sealed check value.
pub const CHECK_AD_LABEL: &[u8] = b"s3crypt.volume-check";
const MAGIC_LINE: &str = "s3crypt-volume=1";
const NONCE_LEN: usize = 12;

/// What a mount learns from the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub mode: KeyMode,
    pub block_size: BlockSize,
    pub format_version: u32,
}

/// A parsed descriptor (all fields public information).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeDescriptor {
    pub format_version: u32,
    pub mode: KeyMode,
    pub block_size: BlockSize,
    pub check_file_id: FileId,
    pub check_wrapped_key: Vec<u8>,
    pub check_sealed: Vec<u8>,
}

/// The descriptor's object key for a mount prefix.
pub fn volume_key(prefix: &str) -> String {
    if prefix.is_empty() || prefix.ends_with('/') {
        format!("{prefix}{VOLUME_OBJECT}")
    } else {
        format!("{prefix}/{VOLUME_OBJECT}")
    }
}

fn check_ad(file_id: &FileId) -> Vec<u8> {
    [CHECK_AD_LABEL, &file_id[..]].concat()
}

impl VolumeDescriptor {
    /// A new descriptor for `provider`'s mode: makes a check key and seals the check constant under it.
    pub async fn create(provider: &dyn DataKeyProvider, block_size: BlockSize) -> Result<Self, KeyError> {
        let mut check_file_id = [0u8; FILE_ID_LEN];
        rand::rngs::OsRng.fill_bytes(&mut check_file_id);
        let (key, check_wrapped_key) = provider.generate(&check_file_id).await?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = cipher(&key)
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: CHECK_PLAINTEXT,
                    aad: &check_ad(&check_file_id),
                },
            )
            .map_err(|_| KeyError::Volume("sealing the key check failed".into()))?;
        Ok(VolumeDescriptor {
            format_version: FORMAT_VERSION,
            mode: provider.mode(),
            block_size,
            check_file_id,
            check_wrapped_key,
            check_sealed: [&nonce[..], &sealed].concat(),
        })
    }

    /// The text body (see the module doc).
    pub fn encode(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        format!(
            "{MAGIC_LINE}\nformat_version={}\nkey_mode={}\nblock_size={}\ncheck_file_id={}\ncheck_wrapped_key={}\n\
             check_sealed={}\n",
            self.format_version,
            self.mode,
            self.block_size.get(),
            hex::encode(self.check_file_id),
            b64.encode(&self.check_wrapped_key),
            b64.encode(&self.check_sealed),
        )
    }

    /// Parses a body; the error names what is wrong (`where_` names the object).
    pub fn parse(body: &[u8], where_: &str) -> Result<Self, KeyError> {
        let bad = |what: &str| KeyError::Volume(format!("volume descriptor {where_} is damaged: {what}"));
        let text = std::str::from_utf8(body).map_err(|_| bad("not UTF-8 text"))?;
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(MAGIC_LINE) {
            return Err(bad("it does not start with s3crypt-volume=1"));
        }
        let fields: std::collections::HashMap<&str, &str> = lines
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let field = |name: &str| fields.get(name).copied().ok_or_else(|| bad(&format!("no {name}")));
        let format_version: u32 = field("format_version")?
            .parse()
            .map_err(|_| bad("bad format_version"))?;
        if format_version != FORMAT_VERSION {
            return Err(KeyError::Volume(format!(
                "volume {where_} has format_version={format_version}; this s3crypt reads version {FORMAT_VERSION} \
                 (upgrade s3crypt)"
            )));
        }
        let mode: KeyMode = field("key_mode")?.parse().map_err(|e: String| bad(&e))?;
        let block_size = field("block_size")?
            .parse::<u32>()
            .ok()
            .and_then(BlockSize::new)
            .ok_or_else(|| bad("bad block_size"))?;
        let mut check_file_id = [0u8; FILE_ID_LEN];
        hex::decode_to_slice(field("check_file_id")?, &mut check_file_id).map_err(|_| bad("bad check_file_id"))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let check_wrapped_key = b64
            .decode(field("check_wrapped_key")?)
            .map_err(|_| bad("bad check_wrapped_key"))?;
        let check_sealed = b64
            .decode(field("check_sealed")?)
            .map_err(|_| bad("bad check_sealed"))?;
        if check_sealed.len() <= NONCE_LEN {
            return Err(bad("check_sealed too short"));
        }
        Ok(VolumeDescriptor {
            format_version,
            mode,
            block_size,
            check_file_id,
            check_wrapped_key,
            check_sealed,
        })
    }

    /// Checks that `provider` is this volume's mode and holds its key. The key check never reports key bytes.
    pub async fn verify(&self, provider: &dyn DataKeyProvider) -> Result<(), KeyError> {
        if provider.mode() != self.mode {
            return Err(KeyError::VolumeKeyMode {
                volume: self.mode,
                requested: provider.mode(),
            });
        }
        let key = match provider.unwrap(&self.check_file_id, &self.check_wrapped_key).await {
            Ok(key) => key,
            Err(KeyError::Kms(msg)) => {
                return Err(KeyError::Kms(format!(
                    "this volume's key check could not be unwrapped: {msg}"
                )))
            }
            Err(e) => return Err(e),
        };
        let (nonce, sealed) = self.check_sealed.split_at(NONCE_LEN);
        match cipher(&key).decrypt(
            &Nonce::try_from(nonce).expect("nonce is 12 bytes"),
            Payload {
                msg: sealed,
                aad: &check_ad(&self.check_file_id),
            },
        ) {
            Ok(plain) if plain == CHECK_PLAINTEXT => Ok(()),
            _ => Err(KeyError::WrongKey(
                "the key check of this volume does not open with the configured key (the descriptor may have been \
                 altered)"
                    .into(),
            )),
        }
    }

    pub fn info(&self) -> VolumeInfo {
        VolumeInfo {
            mode: self.mode,
            block_size: self.block_size,
            format_version: self.format_version,
        }
    }
}

fn cipher(key: &DataKey) -> Aes256GcmSiv {
    Aes256GcmSiv::new_from_slice(key.as_bytes()).expect("data key is 32 bytes")
}

/// Opens the volume at `prefix`, creating its descriptor on first use.
///
/// Creating uses `requested_block_size` or [`BlockSize::DEFAULT`]. On an existing volume the key mode must match
/// ([`KeyError::VolumeKeyMode`]), an explicitly requested block size must equal the volume's
/// ([`KeyError::VolumeBlockSize`]; when none is requested the volume's is used), and the key check must pass
/// ([`KeyError::WrongKey`] for a wrong master key, [`KeyError::Kms`] when KMS refuses).
pub async fn open_or_create_volume(
    store: &dyn ObjectStore,
    prefix: &str,
    provider: &dyn DataKeyProvider,
    requested_block_size: Option<BlockSize>,
) -> Result<VolumeInfo, KeyError> {
    let key = volume_key(prefix);
    if let Some(existing) = read_descriptor(store, &key).await? {
        return check_existing(&existing, provider, requested_block_size).await;
    }
    let created = VolumeDescriptor::create(provider, requested_block_size.unwrap_or_default()).await?;
    let body = bytes::Bytes::from(created.encode());
    match store
        .put(&key, body, &Default::default(), PutCondition::IfNoneMatch)
        .await
    {
        Ok(_) => Ok(created.info()),
        Err(StoreError::PreconditionFailed(_)) => {
            // Another mount made it first: use theirs.
            let existing = read_descriptor(store, &key)
                .await?
                .ok_or_else(|| KeyError::Volume(format!("volume descriptor {key} vanished while being created")))?;
            check_existing(&existing, provider, requested_block_size).await
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens the volume descriptor under `prefix` and checks the key against it; never creates one (for commands
/// that only read, such as `verify`).
pub async fn open_existing_volume(
    store: &dyn ObjectStore,
    prefix: &str,
    provider: &dyn DataKeyProvider,
) -> Result<VolumeInfo, KeyError> {
    let key = volume_key(prefix);
    match read_descriptor(store, &key).await? {
        Some(existing) => check_existing(&existing, provider, None).await,
        None => Err(KeyError::Volume(format!(
            "no s3crypt volume here: {key} does not exist (a client-side volume is made by its first mount)"
        ))),
    }
}

async fn read_descriptor(store: &dyn ObjectStore, key: &str) -> Result<Option<VolumeDescriptor>, KeyError> {
    match store.get(key, None, None).await {
        Ok(out) => VolumeDescriptor::parse(&out.data, key).map(Some),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn check_existing(
    desc: &VolumeDescriptor,
    provider: &dyn DataKeyProvider,
    requested_block_size: Option<BlockSize>,
) -> Result<VolumeInfo, KeyError> {
    if provider.mode() != desc.mode {
        return Err(KeyError::VolumeKeyMode {
            volume: desc.mode,
            requested: provider.mode(),
        });
    }
    if let Some(requested) = requested_block_size.filter(|b| *b != desc.block_size) {
        return Err(KeyError::VolumeBlockSize {
            volume: desc.block_size.get(),
            requested: requested.get(),
        });
    }
    desc.verify(provider).await?;
    Ok(desc.info())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyStats, LocalProvider};
    use std::sync::Arc;

    fn provider(byte: u8) -> LocalProvider {
        LocalProvider::new(&[byte; 32], "/etc/s3crypt/master.key", Arc::new(KeyStats::new()))
    }

    #[tokio::test]
    async fn encode_parse_verify() {
        let p = provider(1);
        let d = VolumeDescriptor::create(&p, BlockSize::new(16384).unwrap())
            .await
            .unwrap();
        let text = d.encode();
        assert!(
            text.contains("key_mode=cse-local\n") && text.contains("block_size=16384\n"),
            "{text}"
        );
        let back = VolumeDescriptor::parse(text.as_bytes(), "x").unwrap();
        assert_eq!(back, d);
        back.verify(&p).await.unwrap();
        match back.verify(&provider(2)).await {
            Err(e @ KeyError::WrongKey(_)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("/etc/s3crypt/master.key") && msg.contains("does not match"),
                    "{msg}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parse_refuses_damage() {
        assert!(matches!(
            VolumeDescriptor::parse(b"hello", "k"),
            Err(KeyError::Volume(_))
        ));
        let v2 = "s3crypt-volume=1\nformat_version=2\n";
        match VolumeDescriptor::parse(v2.as_bytes(), "k") {
            Err(KeyError::Volume(m)) => assert!(m.contains("format_version=2"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn key_under_prefix() {
        assert_eq!(volume_key(""), ".s3crypt-volume");
        assert_eq!(volume_key("a/b/"), "a/b/.s3crypt-volume");
        assert_eq!(volume_key("a/b"), "a/b/.s3crypt-volume");
    }
}
