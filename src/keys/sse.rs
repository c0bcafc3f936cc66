//! The server-side modes: which encryption headers the store sends.
//!
//! - `sse-s3`: `AES256`, keys managed by S3;
//! - `sse-kms`: `aws:kms` with an optional key id, alias or ARN (none: the AWS-managed `aws/s3` key);
//! - `sse-c`: a customer key read from a key file, sent on every data request (S3 does not keep it).
//!
//! In the client-side modes s3crypt encrypts itself and sends no header ([`Sse::None`]); the bucket default then
//! applies on top.
use super::keyfile::read_key_file;
use super::{KeyError, KeyMode};
use crate::store::{Sse, SseCustomerKey};

/// Builds the store's [`Sse`] for `mode`. Options that do not apply to the mode are ignored here; the caller
/// ([`super::build_keys`]) validates them.
pub fn sse_for_mode(mode: KeyMode, kms_key_id: Option<&str>, sse_c_key_file: Option<&str>) -> Result<Sse, KeyError> {
    match mode {
        KeyMode::SseS3 => Ok(Sse::S3),
        KeyMode::SseKms => Ok(Sse::Kms {
            key_id: kms_key_id.map(str::to_string),
        }),
        KeyMode::SseC => {
            let spec = sse_c_key_file
                .ok_or_else(|| KeyError::Config("key_mode=sse-c needs sse_c_key_file (a 256-bit key file)".into()))?;
            let key = read_key_file(spec)?;
            Ok(Sse::Customer(SseCustomerKey::new(*key)))
        }
        KeyMode::CseKms | KeyMode::CseLocal => Ok(Sse::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_modes() {
        assert!(matches!(sse_for_mode(KeyMode::SseS3, None, None), Ok(Sse::S3)));
        assert!(matches!(
            sse_for_mode(KeyMode::SseKms, None, None),
            Ok(Sse::Kms { key_id: None })
        ));
        match sse_for_mode(KeyMode::SseKms, Some("alias/x"), None) {
            Ok(Sse::Kms { key_id: Some(id) }) => assert_eq!(id, "alias/x"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            sse_for_mode(KeyMode::SseC, None, None),
            Err(KeyError::Config(_))
        ));
        assert!(matches!(sse_for_mode(KeyMode::CseLocal, None, None), Ok(Sse::None)));
    }
}
