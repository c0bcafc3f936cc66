//! The server-side modes: which encryption headers the store sends.
//!
//! - `sse-s3`: `AES256`, keys managed by S3;
//! - `sse-kms`: `aws:kms` with an optional key id, alias or ARN (none: the AWS-managed `aws/s3` key);
//! - `sse-c`: a customer key read from a key file, sent on every data request (S3 does not keep it). The file may
//!   list older keys after it (see [`super::keyfile`]): they are accepted for reading only.
//!
//! In the client-side modes s3crypt encrypts itself and sends no header ([`Sse::None`]); the bucket default then
//! applies on top.
use super::keyfile::read_key_list;
use super::{KeyError, KeyMode};
use crate::store::{Sse, SseCustomerKey};

/// Builds the store's [`Sse`] for `mode`, and the older SSE-C keys accepted for reading (none in the other
/// modes). Options that do not apply to the mode are ignored here; the caller ([`super::build_keys`]) validates
/// them.
pub fn sse_for_mode(
    mode: KeyMode,
    kms_key_id: Option<&str>,
    sse_c_key_file: Option<&str>,
) -> Result<(Sse, Vec<SseCustomerKey>), KeyError> {
    match mode {
        KeyMode::SseS3 => Ok((Sse::S3, Vec::new())),
        KeyMode::SseKms => Ok((
            Sse::Kms {
                key_id: kms_key_id.map(str::to_string),
            },
            Vec::new(),
        )),
        KeyMode::SseC => {
            let spec = sse_c_key_file
                .ok_or_else(|| KeyError::Config("key_mode=sse-c needs sse_c_key_file (a 256-bit key file)".into()))?;
            let mut keys = read_key_list(spec)?.into_iter().map(|k| SseCustomerKey::new(*k));
            let current = keys.next().expect("a key list is never empty");
            Ok((Sse::Customer(current), keys.collect()))
        }
        KeyMode::CseKms | KeyMode::CseLocal => Ok((Sse::None, Vec::new())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_side_modes() {
        assert!(matches!(sse_for_mode(KeyMode::SseS3, None, None), Ok((Sse::S3, _))));
        assert!(matches!(
            sse_for_mode(KeyMode::SseKms, None, None),
            Ok((Sse::Kms { key_id: None }, _))
        ));
        match sse_for_mode(KeyMode::SseKms, Some("alias/x"), None) {
            Ok((Sse::Kms { key_id: Some(id) }, _)) => assert_eq!(id, "alias/x"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            sse_for_mode(KeyMode::SseC, None, None),
            Err(KeyError::Config(_))
        ));
        assert!(matches!(
            sse_for_mode(KeyMode::CseLocal, None, None),
            Ok((Sse::None, _))
        ));
    }
}
