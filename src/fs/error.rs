//! Errors of the file-system core and their one mapping to errno.
//!
//! [`FsError::errno`] is an exhaustive `match` with no catch-all arm, over this enum and over the store, key and
//! format errors it wraps, so that every new variant anywhere below forces a decision about what a program sees.
use crate::format::FormatError;
use crate::keys::KeyError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file exists")]
    Exists,
    #[error("invalid name")]
    InvalidName,
    #[error("name too long")]
    NameTooLong,
    /// A name at the mount's root that holds s3crypt's own objects.
    #[error("{0} is reserved for s3crypt's own objects at the root of a mount")]
    Reserved(String),
    #[error("read-only mount")]
    ReadOnly,
    #[error("bad file handle")]
    BadHandle,
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    /// An object without s3crypt metadata in a client-side mount (no silent downgrade to plaintext).
    #[error("{0} has no s3crypt metadata (not written by s3crypt in a client-side mode); mount with -o allow_plaintext to read it as is")]
    Plaintext(String),
    /// Someone else changed the object since it was opened; the local data was saved to `recovery`.
    #[error("{key} was changed by someone else since it was opened; this file's data was saved to {recovery}")]
    Conflict { key: String, recovery: String },
    /// An earlier upload of this open file failed; the file must be closed and opened again.
    #[error("an earlier upload of this file failed; close and reopen it")]
    Poisoned,
    /// Beyond the largest file S3 and the format can hold (5 TiB per object).
    #[error("file too large (S3 objects hold at most 5 TiB)")]
    FileTooBig,
    /// The data is not in S3 and its upload made no progress for `upload_timeout`; it is kept (journal) and
    /// retried in the background.
    #[error("{key} is not in S3 yet ({cause}); the data is kept in the journal and the upload is retried")]
    NotSaved { key: String, cause: String },
    /// getxattr/removexattr of a name the file does not have.
    #[error("no such extended attribute")]
    NoAttribute,
    /// A reply buffer too small for the value or list; or an attribute name over 255 bytes.
    #[error("result does not fit the buffer")]
    Range,
    /// The file's extended attributes would not fit S3's 2 KiB of object metadata.
    #[error("{0}")]
    NoSpace(String),
    /// One extended attribute value larger than an object's metadata can ever hold.
    #[error("{0}")]
    TooBig(String),
    #[error("local I/O: {0}")]
    Local(#[from] std::io::Error),
    /// A file's journal entry (on the disk of `staging_dir`; `at` names it) could not be made, written, read or cut.
    #[error("{key}: journal ({at}): {source}; check the disk that holds staging_dir")]
    Journal {
        key: String,
        at: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{key}: {source}")]
    Format { key: String, source: FormatError },
    /// The error of a fetch that several readers waited on.
    #[error("{0}")]
    Shared(std::sync::Arc<FsError>),
    /// A task or request (named) panicked: a bug, perhaps in a library below s3crypt. EIO for the call that met
    /// it; an upload is started again.
    #[error("{0} panicked (a bug; the panic is in the log)")]
    Panicked(String),
}

impl FsError {
    /// The errno a program sees.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Exists => libc::EEXIST,
            FsError::InvalidName => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Reserved(_) => libc::EPERM,
            FsError::NoAttribute => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::NoSpace(_) => libc::ENOSPC,
            FsError::TooBig(_) => libc::E2BIG,
            FsError::ReadOnly => libc::EROFS,
            FsError::BadHandle => libc::EBADF,
            FsError::NotSupported(_) => libc::ENOTSUP,
            FsError::Plaintext(_) => libc::EACCES,
            FsError::Conflict { .. } => libc::EIO,
            FsError::Poisoned => libc::EIO,
            FsError::FileTooBig => libc::EFBIG,
            FsError::NotSaved { .. } | FsError::Panicked(_) => libc::EIO,
            FsError::Local(e) | FsError::Journal { source: e, .. } => local_errno(e),
            FsError::Store(e) => store_errno(e),
            FsError::Key(e) => key_errno(e),
            FsError::Format { source, .. } => format_errno(source),
            FsError::Shared(inner) => inner.errno(),
        }
    }
}

impl FsError {
    /// A journal step's local error as a [`FsError::Journal`] of file `key` whose entry is at `at`; other errors
    /// as they are.
    pub(super) fn in_journal(self, key: &str, at: impl FnOnce() -> String) -> FsError {
        match self {
            FsError::Local(source) => FsError::Journal {
                key: key.to_string(),
                at: at(),
                source,
            },
            e => e,
        }
    }

    /// The error itself, through any [`FsError::Shared`] wrapping.
    pub fn root(&self) -> &FsError {
        match self {
            FsError::Shared(inner) => inner.root(),
            e => e,
        }
    }

    /// Whether waiting and trying again may help (an outage, a throttle, a KMS hiccup); a waiter for an upload
    /// gives up at once on the others.
    pub fn is_retryable(&self) -> bool {
        match self {
            FsError::Store(e) | FsError::Key(KeyError::Store(e)) => store_retryable(e),
            FsError::Key(KeyError::Kms(_)) => true,
            FsError::Shared(inner) => inner.is_retryable(),
            FsError::NotSaved { .. } | FsError::Panicked(_) => true,
            _ => false,
        }
    }
}

fn store_retryable(e: &StoreError) -> bool {
    match e {
        StoreError::Transient(_) | StoreError::Other(_) => true,
        StoreError::NotFound(_)
        | StoreError::NoSuchBucket(_)
        | StoreError::AccessDenied(_)
        | StoreError::PreconditionFailed(_)
        | StoreError::InvalidRange(_)
        | StoreError::InvalidRequest(_) => false,
    }
}

/// A local disk's error as the program's call reports it: no room (ENOSPC, EDQUOT) as it is, since write(2) names
/// both and the program can act on them; anything else EIO. The disk's own errno would describe
/// the mount's file wrongly: EROFS or EPERM from the staging disk does not mean the mount is read-only or the file
/// is not the program's to change, EMFILE not that the program is out of descriptors.
fn local_errno(e: &std::io::Error) -> i32 {
    match e.raw_os_error() {
        Some(n @ (libc::ENOSPC | libc::EDQUOT)) => n,
        _ => libc::EIO,
    }
}

fn store_errno(e: &StoreError) -> i32 {
    match e {
        StoreError::NotFound(_) => libc::ENOENT,
        StoreError::NoSuchBucket(_) => libc::EIO,
        StoreError::AccessDenied(_) => libc::EACCES,
        StoreError::PreconditionFailed(_) => libc::EIO,
        StoreError::InvalidRange(_) => libc::EIO,
        StoreError::Transient(_) => libc::EIO,
        StoreError::InvalidRequest(_) => libc::EIO,
        StoreError::Other(_) => libc::EIO,
    }
}

fn key_errno(e: &KeyError) -> i32 {
    match e {
        KeyError::KeyFile { .. } => libc::EIO,
        KeyError::KeyFilePermissions { .. } => libc::EIO,
        KeyError::Config(_) => libc::EIO,
        KeyError::WrongKey(_) => libc::EIO,
        KeyError::Kms(_) => libc::EIO,
        KeyError::Volume(_) => libc::EIO,
        KeyError::Store(s) => store_errno(s),
        KeyError::BadWrappedKey(_) => libc::EIO,
        KeyError::VolumeKeyMode { .. } => libc::EIO,
        KeyError::VolumeBlockSize { .. } => libc::EIO,
    }
}

fn format_errno(e: &FormatError) -> i32 {
    match e {
        FormatError::Auth { .. } => libc::EIO,
        FormatError::XattrAuth => libc::EIO,
        FormatError::BadSize { .. } => libc::EIO,
        FormatError::BadMetadata(_) => libc::EIO,
        FormatError::UnsupportedVersion(_) => libc::EIO,
    }
}

pub type FsResult<T> = Result<T, FsError>;

#[cfg(test)]
mod tests {
    use super::FsError;
    use std::io::Error;

    /// The staging disk's own errno reaches the program only when it says there is no room.
    #[test]
    fn a_local_disk_error_is_eio_unless_it_is_no_room() {
        for (os, want) in [
            (libc::ENOSPC, libc::ENOSPC),
            (libc::EDQUOT, libc::EDQUOT),
            (libc::EPERM, libc::EIO),
            (libc::EROFS, libc::EIO),
            (libc::EACCES, libc::EIO),
            (libc::EMFILE, libc::EIO),
            (libc::EIO, libc::EIO),
        ] {
            assert_eq!(
                FsError::Local(Error::from_raw_os_error(os)).errno(),
                want,
                "os error {os}"
            );
            let j = FsError::Local(Error::from_raw_os_error(os)).in_journal("k", || "entry dir/id".into());
            assert_eq!(j.errno(), want, "os error {os} in the journal");
            assert!(j.to_string().starts_with("k: journal (entry dir/id): "), "{j}");
        }
        assert_eq!(FsError::Local(Error::other("damaged")).errno(), libc::EIO);
    }
}
