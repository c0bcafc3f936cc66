//! Whole objects and runs of blocks: the encoder and the two decoders built on [`BlockCipher`] and the layout.
//!
//! The final flag of each block is derived from the plaintext size, which readers take from the object size (an
//! object cut or extended at any point either has an impossible size or ends in a block that was not sealed as
//! final at that index).
use super::layout::{
    block_count, block_plain_range, ciphertext_size, is_final_block, plaintext_size, sealed_block_len,
};
use super::{BlockCipher, BlockSize, FormatError, BLOCK_OVERHEAD};

/// Seals a whole file: block after block, each with a fresh nonce from `rng`, into one object body of exactly
/// [`ciphertext_size`] bytes.
pub fn encrypt_object(cipher: &BlockCipher, plaintext: &[u8], bs: BlockSize, rng: &mut dyn rand::RngCore) -> Vec<u8> {
    let plain_size = plaintext.len() as u64;
    let mut out = Vec::with_capacity(ciphertext_size(plain_size, bs) as usize);
    for index in 0..block_count(plain_size, bs) {
        let range = block_plain_range(index, plain_size, bs);
        let block = &plaintext[range.start as usize..range.end as usize];
        cipher.seal_into(index, is_final_block(index, plain_size, bs), block, rng, &mut out);
    }
    out
}

/// Opens a whole object. Its plaintext size is derived from its length: [`FormatError::BadSize`] for impossible
/// lengths, [`FormatError::Auth`] naming the first block that does not authenticate in its place.
pub fn decrypt_object(cipher: &BlockCipher, object: &[u8], bs: BlockSize) -> Result<Vec<u8>, FormatError> {
    let plain_size = plaintext_size(object.len() as u64, bs)?;
    decrypt_blocks(cipher, bs, plain_size, 0, object)
}

/// Opens `sealed`: the contiguous whole sealed blocks starting at block `first_block` of an object whose plaintext
/// size is `plain_size` (known from the object size), as fetched by one ranged GET. Returns their plaintext. The
/// final flag of each block is derived from `plain_size`. Errors name the absolute block index: a short last chunk
/// fails as the block it would have been, bytes past the file's final block fail as the block index they would
/// have had.
pub fn decrypt_blocks(
    cipher: &BlockCipher,
    bs: BlockSize,
    plain_size: u64,
    first_block: u64,
    sealed: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let n = block_count(plain_size, bs);
    let sealed_len = sealed_block_len(bs) as usize;
    let chunks = sealed.len().div_ceil(sealed_len) as u64;
    let mut out = Vec::with_capacity(sealed.len().saturating_sub((chunks * BLOCK_OVERHEAD) as usize));
    let mut rest = sealed;
    let mut index = first_block;
    while !rest.is_empty() {
        if index >= n {
            return Err(FormatError::Auth { block: index });
        }
        let plain = block_plain_range(index, plain_size, bs);
        let expected = (plain.end - plain.start + BLOCK_OVERHEAD) as usize;
        let (chunk, tail) = rest.split_at(expected.min(rest.len()));
        cipher.open_into(index, is_final_block(index, plain_size, bs), chunk, &mut out)?;
        rest = tail;
        index += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{block_cipher_range, blocks_touching, cipher_range_for_blocks, DataKey};
    use rand::SeedableRng;

    fn setup() -> (BlockCipher, BlockSize, rand_chacha::ChaCha20Rng) {
        let c = BlockCipher::new(&DataKey::from_bytes([7; 32]), [9; 16]);
        (
            c,
            BlockSize::new(4096).unwrap(),
            rand_chacha::ChaCha20Rng::seed_from_u64(1),
        )
    }

    #[test]
    fn empty_file_is_one_empty_final_block() {
        let (c, bs, mut rng) = setup();
        let obj = encrypt_object(&c, &[], bs, &mut rng);
        assert_eq!(obj.len(), 28);
        assert!(c.open(0, true, &obj).unwrap().is_empty());
        assert!(decrypt_object(&c, &obj, bs).unwrap().is_empty());
    }

    #[test]
    fn ranged_read_decrypts_only_the_blocks_it_fetched() {
        let (c, bs, mut rng) = setup();
        let plain: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
        let obj = encrypt_object(&c, &plain, bs, &mut rng);
        let p = plain.len() as u64;
        let (x, y) = (4000u64, 8200u64);
        let blocks = blocks_touching(x, y - x, bs);
        assert_eq!(blocks, 0..3);
        let r = cipher_range_for_blocks(blocks.clone(), p, bs);
        let got = decrypt_blocks(&c, bs, p, blocks.start, &obj[r.start as usize..r.end as usize]).unwrap();
        let base = blocks.start * 4096;
        assert_eq!(
            &got[(x - base) as usize..(y - base) as usize],
            &plain[x as usize..y as usize]
        );
        let last = block_cipher_range(3, p, bs);
        let tail = decrypt_blocks(&c, bs, p, 3, &obj[last.start as usize..]).unwrap();
        assert_eq!(tail, &plain[3 * 4096..]);
    }

    #[test]
    fn bytes_past_the_final_block_name_the_next_index() {
        let (c, bs, mut rng) = setup();
        let obj = encrypt_object(&c, b"abc", bs, &mut rng);
        let mut longer = obj.clone();
        longer.extend_from_slice(&obj);
        assert!(matches!(
            decrypt_blocks(&c, bs, 3, 0, &longer),
            Err(FormatError::Auth { block: 1 })
        ));
        assert!(decrypt_blocks(&c, bs, 3, 0, &[]).unwrap().is_empty());
    }
}
