//! The object header: the `s3crypt-*` user-metadata entries of an object in a client-side mode.
//!
//! Names are as S3 user metadata keys (`x-amz-meta-NAME`), lower case, without the prefix. Values are ASCII:
//! decimal numbers, lower-case hex and standard base64, so they survive S3's header handling unchanged. The whole
//! header stays far below S3's 2 KB user-metadata limit: the wrapped key is capped at [`MAX_WRAPPED_KEY_LEN`].
use super::{BlockSize, FileId, FormatError, FILE_ID_LEN, FORMAT_VERSION};
use base64::Engine;
use std::collections::BTreeMap;

/// Format version, decimal (`1`).
pub const META_VERSION: &str = "s3crypt-version";
/// Key mode: `cse-kms` or `cse-local`.
pub const META_MODE: &str = "s3crypt-mode";
/// Plaintext block size in bytes, decimal (`65536`).
pub const META_BLOCK_SIZE: &str = "s3crypt-block-size";
/// The file's random 128-bit id: 32 lower-case hex digits.
pub const META_FILE_ID: &str = "s3crypt-file-id";
/// The wrapped data key: standard base64 with padding.
pub const META_KEY: &str = "s3crypt-key";

/// Every name this module writes starts with this; an object with none of them is a plain (foreign) object.
const META_PREFIX: &str = "s3crypt-";
/// Largest wrapped key accepted, in bytes (before base64). A KMS CiphertextBlob for a 32-byte key is ~185 bytes and
/// a cse-local wrapped key 60; 1024 bytes (1368 in base64) keeps the header within S3's 2 KB limit.
pub const MAX_WRAPPED_KEY_LEN: usize = 1024;
/// The key modes whose objects carry this header.
const MODES: [&str; 2] = ["cse-kms", "cse-local"];

/// How to read one object: everything but the data key itself, which is unwrapped from `wrapped_key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectHeader {
    pub version: u8,
    /// `cse-kms` or `cse-local`.
    pub key_mode: String,
    pub block_size: BlockSize,
    pub file_id: FileId,
    /// The data key as the key mode wrapped it (KMS CiphertextBlob, or nonce || sealed key || tag).
    pub wrapped_key: Vec<u8>,
}

impl ObjectHeader {
    /// Inserts the five `s3crypt-*` entries into `meta`, replacing any there.
    pub fn to_metadata(&self, meta: &mut BTreeMap<String, String>) {
        meta.insert(META_VERSION.into(), self.version.to_string());
        meta.insert(META_MODE.into(), self.key_mode.clone());
        meta.insert(META_BLOCK_SIZE.into(), self.block_size.get().to_string());
        meta.insert(META_FILE_ID.into(), hex::encode(self.file_id));
        meta.insert(
            META_KEY.into(),
            base64::engine::general_purpose::STANDARD.encode(&self.wrapped_key),
        );
    }

    /// Reads the header back. `Ok(None)` when the object has no `s3crypt-*` metadata at all (a plain object);
    /// [`FormatError::UnsupportedVersion`] for a version other than 1; [`FormatError::BadMetadata`] for anything
    /// missing or malformed. Names are compared in lower case, as S3 reports them.
    pub fn from_metadata(meta: &BTreeMap<String, String>) -> Result<Option<ObjectHeader>, FormatError> {
        if !meta.keys().any(|k| k.to_ascii_lowercase().starts_with(META_PREFIX)) {
            return Ok(None);
        }
        let version: u8 = parse_decimal(meta, META_VERSION)?;
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let key_mode = get(meta, META_MODE)?;
        if !MODES.contains(&key_mode) {
            return Err(bad(format!(
                "{META_MODE} is '{key_mode}'; expected cse-kms or cse-local"
            )));
        }
        let bs: u32 = parse_decimal(meta, META_BLOCK_SIZE)?;
        let block_size = BlockSize::new(bs).ok_or_else(|| {
            bad(format!(
                "{META_BLOCK_SIZE} {bs} is not a power of two from 4096 to 1048576"
            ))
        })?;
        Ok(Some(ObjectHeader {
            version,
            key_mode: key_mode.to_string(),
            block_size,
            file_id: parse_file_id(get(meta, META_FILE_ID)?)?,
            wrapped_key: parse_wrapped_key(get(meta, META_KEY)?)?,
        }))
    }
}

fn bad(msg: String) -> FormatError {
    FormatError::BadMetadata(msg)
}

fn get<'a>(meta: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, FormatError> {
    meta.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .ok_or_else(|| bad(format!("{name} is missing")))
}

fn parse_decimal<T: std::str::FromStr>(meta: &BTreeMap<String, String>, name: &str) -> Result<T, FormatError> {
    let v = get(meta, name)?;
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(format!("{name} '{v}' is not a decimal number")));
    }
    v.parse().map_err(|_| bad(format!("{name} '{v}' is out of range")))
}

fn parse_file_id(v: &str) -> Result<FileId, FormatError> {
    let bytes = hex::decode(v).map_err(|_| bad(format!("{META_FILE_ID} '{v}' is not hex")))?;
    bytes
        .try_into()
        .map_err(|_| bad(format!("{META_FILE_ID} '{v}' is not {FILE_ID_LEN} bytes of hex")))
}

fn parse_wrapped_key(v: &str) -> Result<Vec<u8>, FormatError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v)
        .map_err(|_| bad(format!("{META_KEY} is not valid base64")))?;
    if bytes.is_empty() || bytes.len() > MAX_WRAPPED_KEY_LEN {
        return Err(bad(format!(
            "{META_KEY} is {} bytes; expected 1..={MAX_WRAPPED_KEY_LEN}",
            bytes.len()
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ObjectHeader {
        ObjectHeader {
            version: 1,
            key_mode: "cse-kms".into(),
            block_size: BlockSize::DEFAULT,
            file_id: [0x5a; 16],
            wrapped_key: vec![0xC3; 185],
        }
    }

    fn meta() -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        header().to_metadata(&mut m);
        m
    }

    #[test]
    fn round_trip_with_documented_names_and_encodings() {
        let mut m = meta();
        assert_eq!(m[META_VERSION], "1");
        assert_eq!(m[META_MODE], "cse-kms");
        assert_eq!(m[META_BLOCK_SIZE], "65536");
        assert_eq!(m[META_FILE_ID], "5a".repeat(16));
        assert_eq!(m.len(), 5);
        let total: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total < 400, "{total}");
        m.insert("mode".into(), "0644".into());
        assert_eq!(ObjectHeader::from_metadata(&m).unwrap(), Some(header()));
    }

    #[test]
    fn plain_object_has_no_header() {
        let mut m = BTreeMap::new();
        assert!(ObjectHeader::from_metadata(&m).unwrap().is_none());
        m.insert("mtime".into(), "1".into());
        assert!(ObjectHeader::from_metadata(&m).unwrap().is_none());
    }

    #[test]
    fn unsupported_version() {
        let mut m = meta();
        m.insert(META_VERSION.into(), "2".into());
        assert!(matches!(
            ObjectHeader::from_metadata(&m),
            Err(FormatError::UnsupportedVersion(2))
        ));
    }

    #[test]
    fn malformed_entries_are_refused() {
        let cases: [(&str, Option<&str>); 12] = [
            (META_VERSION, None),
            (META_VERSION, Some("x")),
            (META_VERSION, Some("300")),
            (META_MODE, Some("sse-s3")),
            (META_MODE, None),
            (META_BLOCK_SIZE, Some("5000")),
            (META_BLOCK_SIZE, Some("-4096")),
            (META_FILE_ID, Some("abcd")),
            (META_FILE_ID, Some(&"zz".repeat(16))),
            (META_KEY, Some("***")),
            (META_KEY, Some("")),
            (META_KEY, None),
        ];
        for (name, value) in cases {
            let mut m = meta();
            match value {
                Some(v) => m.insert(name.into(), v.into()),
                None => m.remove(name),
            };
            let r = ObjectHeader::from_metadata(&m);
            assert!(matches!(r, Err(FormatError::BadMetadata(_))), "{name}={value:?}: {r:?}");
        }
        let mut m = meta();
        m.insert(
            META_KEY.into(),
            base64::engine::general_purpose::STANDARD.encode([0u8; MAX_WRAPPED_KEY_LEN + 1]),
        );
        assert!(matches!(
            ObjectHeader::from_metadata(&m),
            Err(FormatError::BadMetadata(_))
        ));
    }
}
