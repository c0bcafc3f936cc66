//! Whole objects and runs of blocks: the encoder and the two decoders built on [`BlockCipher`] and the layout.
//!
//! The final flag of each block is derived from the plaintext size, which readers take from the object size (an
//! object cut or extended at any point either has an impossible size or ends in a block that was not sealed as
//! final at that index).
use super::layout::{
    block_cipher_range, block_count, block_plain_range, ciphertext_size, is_final_block, plaintext_size,
    sealed_block_len,
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

/// The stored length of block `index` of an object of `plain_size` bytes: its plaintext plus the overhead, or a
/// whole block's for an index past the last block (such bytes fail as that block).
fn stored_len(index: u64, plain_size: u64, bs: BlockSize) -> usize {
    let stored = block_cipher_range(index, plain_size, bs);
    // Empty only past the last block: a stored block always holds at least its overhead.
    if stored.is_empty() {
        sealed_block_len(bs) as usize
    } else {
        (stored.end - stored.start) as usize
    }
}

/// Opens, in place, the contiguous whole sealed blocks in `buf` starting at block `first_block` (as fetched by one
/// ranged GET), and packs their plaintext to the front of `buf`, block after block, with no allocation. Returns,
/// per block, the range of `buf` that now holds its plaintext, or why it did not open. A block that fails leaves
/// zeros in its range (never unauthenticated bytes), so its neighbours keep their places and still serve reads.
/// Block indexes and final flags follow [`decrypt_blocks`].
pub fn open_blocks_in_place(
    cipher: &BlockCipher,
    bs: BlockSize,
    plain_size: u64,
    first_block: u64,
    buf: &mut [u8],
) -> Vec<Result<std::ops::Range<usize>, FormatError>> {
    let n = block_count(plain_size, bs);
    let sealed_len = sealed_block_len(bs) as usize;
    let mut out = Vec::with_capacity(buf.len().div_ceil(sealed_len));
    let (mut read, mut write, mut index) = (0usize, 0usize, first_block);
    while read < buf.len() {
        let end = (read + stored_len(index, plain_size, bs)).min(buf.len());
        let body_len = (end - read).saturating_sub(BLOCK_OVERHEAD as usize);
        let opened = if index >= n {
            Err(FormatError::Auth { block: index })
        } else {
            cipher.open_in_place(index, is_final_block(index, plain_size, bs), &mut buf[read..end])
        };
        let nonce = super::NONCE_LEN;
        // The plaintext moves left by at least one nonce per block, so `write` never passes `read`.
        match opened {
            Ok(()) => buf.copy_within(read + nonce..read + nonce + body_len, write),
            Err(_) => buf[write..write + body_len].fill(0),
        }
        out.push(opened.map(|()| write..write + body_len));
        write += body_len;
        read = end;
        index += 1;
    }
    out
}

/// Opens the contiguous whole sealed blocks held in `pieces` (one ranged GET's body, in the pieces the store holds
/// it in, only read), starting at block `first_block`, appending their plaintext to `out` packed block after block
/// as [`open_blocks_in_place`] packs it, with the same result per block (ranges are of `out`). Each block's
/// ciphertext is copied to its place in `out` and opened there: one copy, where opening out of place would cost
/// the cipher's own copy and the zeroing of `out`. A block that spans two pieces is gathered first.
pub fn open_blocks_from(
    cipher: &BlockCipher,
    bs: BlockSize,
    plain_size: u64,
    first_block: u64,
    pieces: &[&[u8]],
    out: &mut Vec<u8>,
) -> Vec<Result<std::ops::Range<usize>, FormatError>> {
    let n = block_count(plain_size, bs);
    let sealed_len = sealed_block_len(bs) as usize;
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    let mut results = Vec::with_capacity(total.div_ceil(sealed_len));
    let mut gathered = Vec::new();
    let (mut piece, mut at) = (0usize, 0usize);
    let (mut read, mut index) = (0usize, first_block);
    while read < total {
        let len = stored_len(index, plain_size, bs).min(total - read);
        // The block's sealed bytes: a slice of the piece that holds them all, or gathered from several.
        while at == pieces[piece].len() {
            (piece, at) = (piece + 1, 0);
        }
        let sealed: &[u8] = if pieces[piece].len() - at >= len {
            at += len;
            &pieces[piece][at - len..at]
        } else {
            gathered.clear();
            while gathered.len() < len {
                while at == pieces[piece].len() {
                    (piece, at) = (piece + 1, 0);
                }
                let m = (pieces[piece].len() - at).min(len - gathered.len());
                gathered.extend_from_slice(&pieces[piece][at..at + m]);
                at += m;
            }
            &gathered
        };
        let start = out.len();
        let opened = if index < n && len >= BLOCK_OVERHEAD as usize {
            let (nonce, rest) = sealed.split_at(super::NONCE_LEN);
            let (body, tag) = rest.split_at(rest.len() - super::TAG_LEN);
            out.extend_from_slice(body);
            let is_final = is_final_block(index, plain_size, bs);
            cipher.open_body_in_place(index, is_final, nonce, &mut out[start..], tag)
        } else {
            out.resize(start + len.saturating_sub(BLOCK_OVERHEAD as usize), 0);
            Err(FormatError::Auth { block: index })
        };
        results.push(opened.map(|()| start..out.len()));
        read += len;
        index += 1;
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{block_cipher_range, blocks_touching, cipher_range_for_blocks, DataKey};
    use rand::SeedableRng;

    #[test]
    fn open_in_place_matches_decrypt_blocks_and_isolates_bad_blocks() {
        let (c, bs, mut rng) = setup();
        every_run(&c, bs, &mut rng, |size, object, first, last| {
            let r = cipher_range_for_blocks(first..last, size, bs);
            let mut buf = object[r.start as usize..r.end as usize].to_vec();
            let got = open_blocks_in_place(&c, bs, size, first, &mut buf);
            let want = decrypt_blocks(&c, bs, size, first, &object[r.start as usize..r.end as usize]).unwrap();
            let mut joined = Vec::new();
            for g in &got {
                joined.extend_from_slice(&buf[g.as_ref().unwrap().clone()]);
            }
            assert_eq!(joined, want, "size {size} blocks {first}..{last}");
            assert_eq!(got.len() as u64, last - first);
        });
        // A flipped bit fails only its block, which reads back as zeros; its neighbours still open.
        let plain = vec![7u8; 3 * 4096];
        let object = encrypt_object(&c, &plain, bs, &mut rng);
        let mut buf = object.clone();
        let second = sealed_block_len(bs) as usize + 100;
        buf[second] ^= 1;
        let got = open_blocks_in_place(&c, bs, plain.len() as u64, 0, &mut buf);
        assert!(matches!(got[1], Err(FormatError::Auth { block: 1 })));
        assert_eq!(&buf[got[0].as_ref().unwrap().clone()], &plain[..4096]);
        assert_eq!(&buf[got[2].as_ref().unwrap().clone()], &plain[..4096]);
        assert!(buf[4096..8192].iter().all(|&b| b == 0), "no unauthenticated bytes left");
        // A cut run fails the block it cuts, naming it.
        let mut cut = object[..object.len() - 1].to_vec();
        let got = open_blocks_in_place(&c, bs, plain.len() as u64, 0, &mut cut);
        assert!(matches!(got[2], Err(FormatError::Auth { block: 2 })));
    }

    /// Calls `f(size, object, first, last)` for every run of blocks `first..last` of objects of sizes around the
    /// block edges.
    fn every_run(
        c: &BlockCipher,
        bs: BlockSize,
        rng: &mut rand_chacha::ChaCha20Rng,
        mut f: impl FnMut(u64, &[u8], u64, u64),
    ) {
        for size in [0u64, 1, 4095, 4096, 4097, 3 * 4096, 3 * 4096 + 5] {
            let plain: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let object = encrypt_object(c, &plain, bs, rng);
            let n = block_count(size, bs);
            for first in 0..n {
                for last in first + 1..=n {
                    f(size, &object, first, last);
                }
            }
        }
    }

    /// `bytes` cut at `cuts` (offsets, in order), empty pieces included where two cuts meet.
    fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut pieces = Vec::new();
        let mut from = 0;
        for &c in cuts.iter().chain([bytes.len()].iter()) {
            let c = c.clamp(from, bytes.len());
            pieces.push(&bytes[from..c]);
            from = c;
        }
        pieces
    }

    #[test]
    fn opening_from_pieces_matches_opening_in_place_wherever_the_pieces_are_cut() {
        let (c, bs, mut rng) = setup();
        let slot = sealed_block_len(bs) as usize;
        let compare = |size: u64, object: &[u8], first: u64, last: u64| {
            let r = cipher_range_for_blocks(first..last, size, bs);
            let body = &object[r.start as usize..r.end.min(object.len() as u64) as usize];
            let mut in_place = body.to_vec();
            let want = open_blocks_in_place(&c, bs, size, first, &mut in_place);
            // Whole, cut inside a block, cut at a block's edge, cut twice in one place, one byte per piece.
            let cuts: Vec<Vec<usize>> = vec![
                vec![],
                vec![100],
                vec![slot],
                vec![slot - 1, slot - 1, slot + 7],
                (1..body.len().min(300)).collect(),
            ];
            for cut in cuts {
                let pieces = split(body, &cut);
                let mut out = b"before".to_vec();
                let got = open_blocks_from(&c, bs, size, first, &pieces, &mut out);
                assert_eq!(&out[..6], b"before", "appended");
                let out = &out[6..];
                let got: Vec<_> = got.into_iter().map(|r| r.map(|r| r.start - 6..r.end - 6)).collect();
                assert_eq!(got.len(), want.len(), "size {size} blocks {first}..{last} cut {cut:?}");
                for (g, w) in got.iter().zip(&want) {
                    match (g, w) {
                        (Ok(g), Ok(w)) => assert_eq!(out[g.clone()], in_place[w.clone()]),
                        (Err(g), Err(w)) => assert_eq!(g.to_string(), w.to_string()),
                        _ => panic!("size {size} blocks {first}..{last} cut {cut:?}: {g:?} against {w:?}"),
                    }
                }
                let packed = want.iter().flatten().map(|r| r.end).max().unwrap_or(0);
                assert!(out.len() >= packed);
                assert_eq!(out, &in_place[..out.len()], "same bytes, zeros included");
            }
        };
        every_run(&c, bs, &mut rng, compare);
        // A flipped bit fails its block only, which is zeros; a cut run fails the block it cuts.
        let plain = vec![7u8; 3 * 4096];
        let mut object = encrypt_object(&c, &plain, bs, &mut rng);
        object[slot + 100] ^= 1;
        compare(plain.len() as u64, &object, 0, 3);
        let cut = &object[..object.len() - 1];
        compare(plain.len() as u64, cut, 0, 3);
    }

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
