//! The client-side object format (docs/FORMAT.md is normative; this module implements it).
//!
//! In the client-side key modes a file is one S3 object: a sequence of fixed-size blocks, each sealed on its own
//! with AES-256-GCM-SIV under the file's data key, plus a few `s3crypt-*` user-metadata entries that say how to
//! read it (format version, key mode, block size, file id, wrapped data key).
//!
//! Why blocks: a read of a few bytes fetches and opens only the blocks it touches (one ranged GET), and a write
//! re-seals only the blocks it changes. Why each block binds the file id, its index and a final flag: so that a
//! block only opens in the one place it was sealed for. Moving, dropping, duplicating, splicing in from another
//! file, truncating or extending the object then fails authentication, and the error names the block.
//!
//! The module is pure and synchronous: no I/O, no async, no SDK types. Randomness comes in as `&mut dyn RngCore`,
//! so tests and golden fixtures get reproducible ciphertext from a seeded generator.
//!
//! - [`layout`]: offset math between plaintext bytes, blocks and object bytes (small pure `u64` functions).
//! - [`seal`]: [`BlockCipher`], sealing and opening one block; the associated-data bytes.
//! - [`object`]: whole objects and runs of blocks (one ranged GET's worth).
//! - [`header`]: [`ObjectHeader`], the object's `s3crypt-*` metadata.
//! - [`dirindex`]: the encoding of a directory's attribute index object.
pub mod dirindex;
pub mod error;
pub mod header;
pub mod layout;
pub mod object;
pub mod seal;
mod types;

pub use dirindex::{decode_dir_index, encode_dir_index, IndexEntry, DIR_INDEX_MAGIC};
pub use error::FormatError;
pub use header::{ObjectHeader, MAX_WRAPPED_KEY_LEN, META_BLOCK_SIZE, META_FILE_ID, META_KEY, META_MODE, META_VERSION};
pub use layout::{
    block_cipher_range, block_count, block_plain_range, blocks_touching, cipher_range_for_blocks, ciphertext_size,
    is_final_block, plaintext_size, sealed_block_len, write_pieces,
};
pub use object::{decrypt_blocks, decrypt_object, encrypt_object, open_blocks_from, open_blocks_in_place};
pub use seal::{block_ad, BlockCipher, BLOCK_AD_LABEL, BLOCK_AD_LEN};
pub use types::{BlockSize, DataKey, FileId, FILE_ID_LEN, KEY_LEN};

/// The version of the block format and metadata this build writes (and the only one it reads).
pub const FORMAT_VERSION: u8 = 1;
/// Bytes of the random nonce at the start of every sealed block.
pub const NONCE_LEN: usize = 12;
/// Bytes of the authentication tag at the end of every sealed block.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed block adds to its plaintext: nonce and tag.
pub const BLOCK_OVERHEAD: u64 = (NONCE_LEN + TAG_LEN) as u64;
