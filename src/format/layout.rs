//! Offset math between plaintext bytes, block indexes and object bytes.
//!
//! A file of P plaintext bytes is stored as n = max(1, ceil(P / B)) sealed blocks. Every block but the last holds
//! exactly B plaintext bytes; the last holds P - (n-1)B bytes (in 1..=B, or 0 for the empty file). A sealed block
//! is its plaintext plus [`BLOCK_OVERHEAD`] (nonce and tag) bytes, so the object holds C = P + 28n bytes.
//!
//! All functions are pure, total and work in `u64`. Plaintext sizes are assumed to be below 2^62 bytes, far above
//! S3's 5 TiB object limit, so that no sum below overflows.
use super::{BlockSize, FormatError, BLOCK_OVERHEAD};
use std::ops::Range;

/// Bytes of one full sealed block in the object: B + 28.
pub fn sealed_block_len(bs: BlockSize) -> u64 {
    bs.get() + BLOCK_OVERHEAD
}

/// Number of sealed blocks of a file of `plain_size` bytes; at least 1 (the empty file has one empty final block).
pub fn block_count(plain_size: u64, bs: BlockSize) -> u64 {
    plain_size.div_ceil(bs.get()).max(1)
}

/// Object size of a file of `plain_size` plaintext bytes: P + 28n.
pub fn ciphertext_size(plain_size: u64, bs: BlockSize) -> u64 {
    plain_size + BLOCK_OVERHEAD * block_count(plain_size, bs)
}

/// The inverse of [`ciphertext_size`]. Fails with [`FormatError::BadSize`] for sizes no plaintext size maps to:
/// below 28 bytes, or a last chunk of at most 28 bytes after a full sealed block (a non-empty final block needs at
/// least 29 bytes, and only a lone block may be empty).
pub fn plaintext_size(cipher_size: u64, bs: BlockSize) -> Result<u64, FormatError> {
    let bad = FormatError::BadSize { size: cipher_size };
    if cipher_size < BLOCK_OVERHEAD {
        return Err(bad);
    }
    let sealed = sealed_block_len(bs);
    let n = cipher_size.div_ceil(sealed);
    let last_chunk = cipher_size - (n - 1) * sealed;
    if n > 1 && last_chunk <= BLOCK_OVERHEAD {
        return Err(bad);
    }
    Ok(cipher_size - BLOCK_OVERHEAD * n)
}

/// Plaintext bytes held by block `index` of a file of `plain_size` bytes. For an index past the last block the
/// range is empty, at `plain_size`.
pub fn block_plain_range(index: u64, plain_size: u64, bs: BlockSize) -> Range<u64> {
    let start = index.saturating_mul(bs.get()).min(plain_size);
    let end = start.saturating_add(bs.get()).min(plain_size);
    start..end
}

/// Object bytes of sealed block `index` (nonce, ciphertext and tag). For an index past the last block the range is
/// empty, at the object's end.
pub fn block_cipher_range(index: u64, plain_size: u64, bs: BlockSize) -> Range<u64> {
    if index >= block_count(plain_size, bs) {
        let end = ciphertext_size(plain_size, bs);
        return end..end;
    }
    let start = index * sealed_block_len(bs);
    let plain = block_plain_range(index, plain_size, bs);
    start..start + BLOCK_OVERHEAD + (plain.end - plain.start)
}

/// Indexes of the blocks that plaintext bytes `offset..offset + len` touch. Empty for `len == 0`. Not clamped to a
/// file size: callers reading near the end clamp with [`block_count`] (or use [`cipher_range_for_blocks`], which
/// does).
pub fn blocks_touching(offset: u64, len: u64, bs: BlockSize) -> Range<u64> {
    let first = offset / bs.get();
    if len == 0 {
        return first..first;
    }
    let last = offset.saturating_add(len - 1) / bs.get();
    first..last + 1
}

/// How a write of `len` bytes at plaintext offset `offset` falls on blocks: for each block it touches, in order,
/// the block's index, where in the block its piece starts, and which bytes of the write the piece is. A piece
/// that covers its whole block starts at 0 and is `bs` bytes long.
pub fn write_pieces(offset: u64, len: usize, bs: BlockSize) -> impl Iterator<Item = (u64, usize, Range<usize>)> {
    let b = bs.get();
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= len {
            return None;
        }
        let at = offset + pos as u64;
        let (index, from) = (at / b, (at % b) as usize);
        let n = (b as usize - from).min(len - pos);
        pos += n;
        Some((index, from, pos - n..pos))
    })
}

/// The object bytes one ranged GET must fetch to read the sealed blocks `blocks` of a file of `plain_size` bytes:
/// whole sealed blocks, contiguous. Block indexes past the last block are dropped; if none remain the range is empty.
pub fn cipher_range_for_blocks(blocks: Range<u64>, plain_size: u64, bs: BlockSize) -> Range<u64> {
    let end_block = blocks.end.min(block_count(plain_size, bs));
    if blocks.start >= end_block {
        let at = block_cipher_range(blocks.start, plain_size, bs).start;
        return at..at;
    }
    block_cipher_range(blocks.start, plain_size, bs).start..block_cipher_range(end_block - 1, plain_size, bs).end
}

/// True if block `index` is the final block of a file of `plain_size` bytes (the one sealed with the final flag).
pub fn is_final_block(index: u64, plain_size: u64, bs: BlockSize) -> bool {
    index + 1 == block_count(plain_size, bs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B4K: u64 = 4096;

    fn bs4k() -> BlockSize {
        BlockSize::new(4096).unwrap()
    }

    #[test]
    fn write_pieces_end_at_block_boundaries() {
        let pieces: Vec<_> = write_pieces(B4K - 10, 10 + 2 * 4096 + 5, bs4k()).collect();
        assert_eq!(
            pieces,
            vec![
                (0, 4086, 0..10),
                (1, 0, 10..4106),
                (2, 0, 4106..8202),
                (3, 0, 8202..8207)
            ]
        );
        assert_eq!(
            write_pieces(8192, 4096, bs4k()).collect::<Vec<_>>(),
            vec![(2, 0, 0..4096)]
        );
        assert_eq!(write_pieces(5, 0, bs4k()).count(), 0);
    }

    #[test]
    fn sizes_of_the_worked_examples() {
        let bs = BlockSize::DEFAULT;
        assert_eq!(ciphertext_size(0, bs), 28);
        assert_eq!(ciphertext_size(1, bs), 29);
        assert_eq!(ciphertext_size(65536, bs), 65564);
        assert_eq!(ciphertext_size(65537, bs), 65593);
        assert_eq!(ciphertext_size(1 << 30, bs), (1 << 30) + 28 * 16384);
        assert_eq!(block_count(0, bs), 1);
        assert_eq!(block_count(65536, bs), 1);
        assert_eq!(block_count(65537, bs), 2);
    }

    #[test]
    fn impossible_sizes_are_refused() {
        let bs = bs4k();
        let sealed = sealed_block_len(bs);
        for size in [0, 1, 27, sealed + 1, sealed + 28, 2 * sealed + 28] {
            assert!(
                matches!(plaintext_size(size, bs), Err(FormatError::BadSize { size: s }) if s == size),
                "{size}"
            );
        }
        assert_eq!(plaintext_size(28, bs).unwrap(), 0);
        assert_eq!(plaintext_size(sealed, bs).unwrap(), B4K);
        assert_eq!(plaintext_size(sealed + 29, bs).unwrap(), B4K + 1);
    }

    #[test]
    fn ranges_at_block_boundaries() {
        let bs = bs4k();
        let p = 2 * B4K + 1;
        assert_eq!(block_plain_range(0, p, bs), 0..B4K);
        assert_eq!(block_plain_range(2, p, bs), 2 * B4K..p);
        assert_eq!(block_plain_range(3, p, bs), p..p);
        assert_eq!(block_cipher_range(1, p, bs), 4124..8248);
        assert_eq!(block_cipher_range(2, p, bs), 8248..8277);
        assert_eq!(block_cipher_range(3, p, bs), 8277..8277);
        assert_eq!(block_cipher_range(0, 0, bs), 0..28);
        assert!(is_final_block(2, p, bs) && !is_final_block(1, p, bs));
        assert!(is_final_block(0, 0, bs));
    }

    #[test]
    fn touching_and_fetching() {
        let bs = bs4k();
        assert_eq!(blocks_touching(0, 0, bs), 0..0);
        assert_eq!(blocks_touching(4095, 0, bs), 0..0);
        assert_eq!(blocks_touching(0, 1, bs), 0..1);
        assert_eq!(blocks_touching(4095, 2, bs), 0..2);
        assert_eq!(blocks_touching(4096, 4096, bs), 1..2);
        assert_eq!(blocks_touching(4096, 4097, bs), 1..3);
        let p = 3 * B4K + 1;
        assert_eq!(cipher_range_for_blocks(1..3, p, bs), 4124..12372);
        assert_eq!(cipher_range_for_blocks(3..10, p, bs), 12372..12401);
        assert_eq!(cipher_range_for_blocks(5..10, p, bs), 12401..12401);
        assert_eq!(cipher_range_for_blocks(1..1, p, bs), 4124..4124);
    }
}
