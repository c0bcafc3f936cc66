//! `cse-kms`: data keys made and wrapped by AWS KMS.
//!
//! Each new file costs one `GenerateDataKey` (AES_256) under the configured KMS key, with the encryption context
//! `{"s3crypt-file-id": hex(file id)}`; the returned `CiphertextBlob` is the wrapped key kept in the object's
//! metadata. Unwrapping is `Decrypt` with the same context and with `KeyId` set to the configured key, so that
//! KMS refuses a wrapped key from another file (context mismatch) or from another KMS key (instead of silently
//! using whatever key the blob names). The plaintext goes straight into a [`DataKey`]; the intermediate buffer is
//! zeroized. Reads go through the [`super::DataKeyCache`], so a file's key costs one `Decrypt` while cached.
//!
//! Discovery (`old_kms_key_id=any`, for reading during a migration only): `Decrypt` without `KeyId`, so KMS uses
//! whichever key the blob names, if the caller's credentials may decrypt with it. The file id stays bound by the
//! encryption context; what is given up is the check that the key is one this volume named (the AWS Encryption
//! SDK's "discovery mode" makes the same trade). A discovery provider never makes or wraps keys.
use super::counters::KeyStats;
use super::{DataKeyProvider, KeyError, KeyMode};
use crate::format::{DataKey, FileId};
use async_trait::async_trait;
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use std::fmt;
use std::sync::Arc;
use zeroize::Zeroizing;

/// The encryption-context key that binds a wrapped key to its file.
pub const FILE_ID_CONTEXT_KEY: &str = "s3crypt-file-id";

/// The `cse-kms` provider.
pub struct KmsProvider {
    client: aws_sdk_kms::Client,
    key_id: String,
    /// Unwraps under whatever KMS key a blob names (see the module doc); `key_id` is then empty.
    discovery: bool,
    stats: Arc<KeyStats>,
}

/// The `old_kms_key_id` value that asks for discovery.
pub const ANY_KMS_KEY: &str = "any";

impl KmsProvider {
    /// A provider using `key_id` (a key id, alias or ARN) with a client built from `sdk`.
    pub fn new(sdk: &aws_config::SdkConfig, key_id: impl Into<String>, stats: Arc<KeyStats>) -> Self {
        Self::from_client(aws_sdk_kms::Client::new(sdk), key_id, stats)
    }

    pub fn from_client(client: aws_sdk_kms::Client, key_id: impl Into<String>, stats: Arc<KeyStats>) -> Self {
        KmsProvider {
            client,
            key_id: key_id.into(),
            discovery: false,
            stats,
        }
    }

    /// A read-only provider that unwraps under any KMS key the caller may use (see the module doc).
    pub fn discovery(sdk: &aws_config::SdkConfig, stats: Arc<KeyStats>) -> Self {
        KmsProvider {
            discovery: true,
            ..Self::new(sdk, "", stats)
        }
    }

    fn refuse_discovery(&self, op: &str) -> Result<(), KeyError> {
        match self.discovery {
            true => Err(KeyError::Config(format!(
                "{op}: old_kms_key_id={ANY_KMS_KEY} only reads; new keys are made under kms_key_id"
            ))),
            false => Ok(()),
        }
    }

    /// `Encrypt`: wraps a data key this process already holds under this provider's KMS key, bound to
    /// `file_id`. Used only where `ReEncrypt` cannot be (a source wrapped under an unnamed key).
    async fn wrap_existing(&self, file_id: &FileId, key: &DataKey) -> Result<Vec<u8>, KeyError> {
        self.refuse_discovery("Encrypt")?;
        self.stats.count_kms_reencrypt();
        let out = self
            .client
            .encrypt()
            .key_id(&self.key_id)
            .plaintext(Blob::new(key.as_bytes().to_vec()))
            .encryption_context(FILE_ID_CONTEXT_KEY, hex::encode(file_id))
            .send()
            .await
            .map_err(|e| kms_error(e, "Encrypt", &self.key_id))?;
        take_ciphertext(out.ciphertext_blob, "Encrypt")
    }

    /// The configured KMS key (not secret).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }
}

impl fmt::Debug for KmsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KmsProvider")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Turns an SDK error into a message that says what went wrong with which key and what to do.
fn kms_error<E, R>(err: SdkError<E, R>, op: &str, key_id: &str) -> KeyError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    let Some(service) = err.as_service_error() else {
        return KeyError::Kms(format!(
            "{op} with key {key_id}: could not reach KMS: {}",
            DisplayErrorContext(&err)
        ));
    };
    let code = service.code().unwrap_or("unknown");
    let detail = service.message().unwrap_or("");
    let what = match code {
        "DisabledException" => {
            format!("KMS key {key_id} is disabled; enable it (aws kms enable-key) to use this volume")
        }
        "NotFoundException" => format!("KMS key {key_id} was not found; check the key id, alias or region"),
        "AccessDeniedException" => {
            format!("access to KMS key {key_id} was denied; the credentials need kms:GenerateDataKey and kms:Decrypt")
        }
        "InvalidCiphertextException" => {
            format!("the wrapped key does not belong to this file or key (KMS key {key_id})")
        }
        "IncorrectKeyException" => format!("the wrapped key was made with another KMS key than {key_id}"),
        "KMSInvalidStateException" => {
            format!("KMS key {key_id} is not usable in its current state (pending deletion or import?)")
        }
        "InvalidKeyUsageException" => format!("KMS key {key_id} is not a symmetric encryption key"),
        _ => format!("KMS key {key_id}: {code}"),
    };
    if detail.is_empty() {
        KeyError::Kms(format!("{op}: {what}"))
    } else {
        KeyError::Kms(format!("{op}: {what} ({detail})"))
    }
}

/// The wrapped key a KMS response carries.
fn take_ciphertext(blob: Option<Blob>, op: &str) -> Result<Vec<u8>, KeyError> {
    blob.map(Blob::into_inner)
        .ok_or_else(|| KeyError::Kms(format!("{op}: KMS returned no CiphertextBlob")))
}

fn take_plaintext(blob: Option<Blob>, op: &str) -> Result<DataKey, KeyError> {
    let plain = Zeroizing::new(blob.map(Blob::into_inner).unwrap_or_default());
    DataKey::from_slice(&plain).ok_or_else(|| {
        KeyError::Kms(format!(
            "{op}: KMS returned a plaintext key of {} bytes, expected 32",
            plain.len()
        ))
    })
}

#[async_trait]
impl DataKeyProvider for KmsProvider {
    fn mode(&self) -> KeyMode {
        KeyMode::CseKms
    }

    async fn generate(&self, file_id: &FileId) -> Result<(DataKey, Vec<u8>), KeyError> {
        self.refuse_discovery("GenerateDataKey")?;
        self.stats.count_kms_generate();
        let mut out = self
            .client
            .generate_data_key()
            .key_id(&self.key_id)
            .key_spec(DataKeySpec::Aes256)
            .encryption_context(FILE_ID_CONTEXT_KEY, hex::encode(file_id))
            .send()
            .await
            .map_err(|e| {
                self.stats.count_kms_generate_failed();
                kms_error(e, "GenerateDataKey", &self.key_id)
            })?;
        let key = take_plaintext(out.plaintext.take(), "GenerateDataKey")?;
        let wrapped = take_ciphertext(out.ciphertext_blob.take(), "GenerateDataKey")?;
        Ok((key, wrapped))
    }

    fn kms_key_id(&self) -> Option<&str> {
        (!self.discovery).then_some(self.key_id.as_str())
    }

    /// ReEncrypt: KMS moves the wrapped key to this provider's KMS key; the plaintext key never leaves KMS. The
    /// file id stays bound as the encryption context on both sides.
    async fn rewrap(&self, file_id: &FileId, wrapped: &[u8], from: &dyn DataKeyProvider) -> Result<Vec<u8>, KeyError> {
        if from.mode() != KeyMode::CseKms {
            return Err(super::unsupported_rotation(from.mode(), KeyMode::CseKms));
        }
        self.refuse_discovery("ReEncrypt")?;
        if from.kms_key_id().is_none() {
            // A discovery source names no key for ReEncrypt's SourceKeyId.
            let key = from.unwrap(file_id, wrapped).await?;
            return self.wrap_existing(file_id, &key).await;
        }
        self.stats.count_kms_reencrypt();
        let fid = hex::encode(file_id);
        let out = self
            .client
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped))
            .set_source_key_id(from.kms_key_id().map(str::to_string))
            .source_encryption_context(FILE_ID_CONTEXT_KEY, fid.clone())
            .destination_key_id(&self.key_id)
            .destination_encryption_context(FILE_ID_CONTEXT_KEY, fid)
            .send()
            .await
            .map_err(|e| kms_error(e, "ReEncrypt", &self.key_id))?;
        take_ciphertext(out.ciphertext_blob, "ReEncrypt")
    }

    async fn unwrap(&self, file_id: &FileId, wrapped: &[u8]) -> Result<DataKey, KeyError> {
        self.stats.count_kms_decrypt();
        let mut out = self
            .client
            .decrypt()
            .set_key_id((!self.discovery).then(|| self.key_id.clone()))
            .ciphertext_blob(Blob::new(wrapped))
            .encryption_context(FILE_ID_CONTEXT_KEY, hex::encode(file_id))
            .send()
            .await
            .map_err(|e| {
                self.stats.count_kms_decrypt_failed();
                let named = if self.discovery {
                    "the key the wrapped key names"
                } else {
                    &self.key_id
                };
                kms_error(e, "Decrypt", named)
            })?;
        take_plaintext(out.plaintext.take(), "Decrypt")
    }
}
