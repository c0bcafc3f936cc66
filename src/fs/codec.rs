//! One block geometry for every key mode.
//!
//! In the client-side modes an object is a sequence of sealed blocks (docs/FORMAT.md). In the SSE modes the object
//! body is the plaintext, and the file system still thinks of it in blocks of the volume's block size: reads
//! fetch whole blocks, writes re-upload only the multipart parts they touched. [`Codec`] hides the difference so
//! the read and write paths have one implementation: `Plain` is the sealed layout with zero overhead.
use super::blockcache::Block;
use crate::format::{self, BlockCipher, BlockSize, FormatError, ObjectHeader};
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub enum Codec {
    Plain { bs: BlockSize },
    Sealed { bs: BlockSize, cipher: Box<BlockCipher> },
}

impl Codec {
    pub fn block_size(&self) -> BlockSize {
        match self {
            Codec::Plain { bs } | Codec::Sealed { bs, .. } => *bs,
        }
    }

    /// Plaintext bytes per block (B).
    pub fn block_len(&self) -> u64 {
        self.block_size().get()
    }

    /// Object bytes per whole block.
    pub fn stored_block_len(&self) -> u64 {
        match self {
            Codec::Plain { bs } => bs.get(),
            Codec::Sealed { bs, .. } => format::sealed_block_len(*bs),
        }
    }

    pub fn is_sealed(&self) -> bool {
        matches!(self, Codec::Sealed { .. })
    }

    pub fn block_count(&self, plain_size: u64) -> u64 {
        format::block_count(plain_size, self.block_size())
    }

    pub fn object_size(&self, plain_size: u64) -> u64 {
        match self {
            Codec::Plain { .. } => plain_size,
            Codec::Sealed { bs, .. } => format::ciphertext_size(plain_size, *bs),
        }
    }

    pub fn plain_size(&self, object_size: u64) -> Result<u64, FormatError> {
        match self {
            Codec::Plain { .. } => Ok(object_size),
            Codec::Sealed { bs, .. } => format::plaintext_size(object_size, *bs),
        }
    }

    /// Plaintext bytes of block `index` in a file of `plain_size` bytes.
    pub fn block_plain_range(&self, index: u64, plain_size: u64) -> Range<u64> {
        format::block_plain_range(index, plain_size, self.block_size())
    }

    /// The object bytes that hold `blocks`.
    pub fn object_range(&self, blocks: Range<u64>, plain_size: u64) -> Range<u64> {
        match self {
            Codec::Plain { bs } => {
                let b = bs.get();
                (blocks.start * b).min(plain_size)..(blocks.end * b).min(plain_size)
            }
            Codec::Sealed { bs, .. } => format::cipher_range_for_blocks(blocks, plain_size, *bs),
        }
    }

    /// Appends the stored form of block `index` (`plain` must be the whole block's plaintext).
    pub fn encode_into(&self, index: u64, is_final: bool, plain: &[u8], out: &mut Vec<u8>) {
        match self {
            Codec::Plain { .. } => out.extend_from_slice(plain),
            Codec::Sealed { cipher, .. } => cipher.seal_into(index, is_final, plain, &mut rand::thread_rng(), out),
        }
    }

    /// Plaintext of the whole blocks stored in `bytes`, starting at block `first`.
    pub fn decode(&self, plain_size: u64, first: u64, bytes: &[u8]) -> Result<Vec<u8>, FormatError> {
        match self {
            Codec::Plain { .. } => Ok(bytes.to_vec()),
            Codec::Sealed { bs, cipher } => format::decrypt_blocks(cipher, *bs, plain_size, first, bytes),
        }
    }

    /// The blocks stored in `pieces` (whole blocks from block `first`, as one ranged GET returned them, in the
    /// store's pieces), each a slice of one buffer: opened in place when the GET's body is one buffer this owns
    /// alone (S3's); otherwise each block's ciphertext is copied once, to its place in a new buffer, and opened
    /// there (the pieces are only read).
    pub fn open_run(&self, plain_size: u64, first: u64, pieces: Vec<Bytes>) -> Vec<Result<Block, FormatError>> {
        match self {
            Codec::Plain { bs } => {
                let data = crate::store::join(pieces);
                let b = bs.get() as usize;
                (0..data.len().div_ceil(b))
                    .map(|k| Ok(Block::slice(&data, k * b..((k + 1) * b).min(data.len()))))
                    .collect()
            }
            Codec::Sealed { bs, cipher } => {
                let (buf, ranges) = match sole_owner(pieces) {
                    Ok(mut own) => {
                        let ranges = format::open_blocks_in_place(cipher, *bs, plain_size, first, &mut own);
                        (own.freeze(), ranges)
                    }
                    Err(pieces) => {
                        let slices: Vec<&[u8]> = pieces.iter().map(|p| &p[..]).collect();
                        let mut out = Vec::with_capacity(slices.iter().map(|p| p.len()).sum());
                        let ranges = format::open_blocks_from(cipher, *bs, plain_size, first, &slices, &mut out);
                        (Bytes::from(out), ranges)
                    }
                };
                ranges.into_iter().map(|r| r.map(|r| Block::slice(&buf, r))).collect()
            }
        }
    }
}

/// The body as one buffer this owns alone, when it is one piece nobody else holds; else the pieces back.
fn sole_owner(mut pieces: Vec<Bytes>) -> Result<bytes::BytesMut, Vec<Bytes>> {
    if pieces.len() != 1 {
        return Err(pieces);
    }
    pieces.remove(0).try_into_mut().map_err(|shared| vec![shared])
}

static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

/// One version of one object as read from S3 (or just written): what the read path decodes and what the write
/// path copies unchanged blocks from.
#[derive(Debug, Clone)]
pub struct Version {
    /// Unique in this process; keys the block cache.
    pub id: u64,
    pub etag: String,
    pub object_size: u64,
    pub plain_size: u64,
    pub codec: Arc<Codec>,
    /// The s3crypt header in the client-side modes.
    pub header: Option<ObjectHeader>,
}

impl Version {
    pub fn new(
        etag: String,
        object_size: u64,
        plain_size: u64,
        codec: Arc<Codec>,
        header: Option<ObjectHeader>,
    ) -> Self {
        Version {
            id: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
            etag,
            object_size,
            plain_size,
            codec,
            header,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_codec_is_the_identity_layout() {
        let c = Codec::Plain {
            bs: BlockSize::new(4096).unwrap(),
        };
        assert_eq!(c.object_size(10_000), 10_000);
        assert_eq!(c.block_count(0), 1);
        assert_eq!(c.block_count(8192), 2);
        assert_eq!(c.object_range(1..3, 10_000), 4096..10_000);
        assert_eq!(c.block_plain_range(2, 10_000), 8192..10_000);
        let mut out = Vec::new();
        c.encode_into(0, true, b"abc", &mut out);
        assert_eq!(c.decode(3, 0, &out).unwrap(), b"abc");
    }
}
