//! Errors of the format layer. Messages say what was wrong and, for authentication failures, which block.

/// Everything that can go wrong when reading an object in the client-side format.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A sealed block did not authenticate in its position: it was modified, moved, dropped, duplicated, cut, taken
    /// from another file, sealed under another key, or carries the wrong final flag. `block` is the absolute block
    /// index within the object.
    #[error(
        "authentication failed for block {block}: the object was modified, truncated, or sealed under another key"
    )]
    Auth { block: u64 },
    /// The sealed extended attributes did not authenticate for this file.
    #[error(
        "authentication failed for the extended attributes: they were modified, taken from another file, or sealed \
         under another key"
    )]
    XattrAuth,
    /// No plaintext size maps to this object size (see `plaintext_size`).
    #[error(
        "object size {size} is impossible in the block format: the object was truncated or is not an s3crypt object"
    )]
    BadSize { size: u64 },
    /// The object's s3crypt metadata is present but malformed.
    #[error("malformed s3crypt metadata: {0}")]
    BadMetadata(String),
    /// The object was written by a newer (or unknown) format version.
    #[error("unsupported s3crypt format version {0}; this build reads version 1")]
    UnsupportedVersion(u8),
}
