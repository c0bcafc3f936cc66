//! s3crypt: an encrypted S3 file system.
//!
//! # Layout
//! - [`format`]: the client-side object format: sealed blocks, offset math, object metadata. Pure and
//!   synchronous: no I/O, no async, no SDK types.
//! - [`keys`]: one file per key mode behind [`keys::DataKeyProvider`] (client-side modes) or SSE headers
//!   (server-side modes); key files; the per-file data-key cache; the volume descriptor.
//! - [`store`]: the [`store::ObjectStore`] trait and its implementations: `s3` (aws-sdk-s3), `memory`
//!   (fast tests) and `failing` (fault injection and request accounting).
//! - [`fs`]: the asynchronous file-system core: inodes, handles, the read path, the write path, directories.
//!   Testable without FUSE.
//! - [`fuse`]: the thin `fuser::Filesystem` adapter: each callback calls the core and maps its error to an errno.
//! - [`cli`] and [`run`]: argument parsing into a typed configuration, and the wiring of runtime, store, keys,
//!   file system and FUSE session.
pub mod cli;
pub mod daemon;
pub mod format;
pub mod fs;
pub mod fuse;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod progress;
pub mod rekey;
pub mod run;
pub mod store;
pub mod verify;
