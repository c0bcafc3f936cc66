//! Property tests of the block format: round trips at every legal block size, the size function against the
//! encoder, and the offset math against a brute-force reference.
use proptest::prelude::*;
use rand::SeedableRng;
use s3crypt::format::*;

fn cipher() -> BlockCipher {
    BlockCipher::new(&DataKey::from_bytes([0x11; 32]), [0x22; 16])
}

fn rng(seed: u64) -> rand_chacha::ChaCha20Rng {
    rand_chacha::ChaCha20Rng::seed_from_u64(seed)
}

fn plaintext(len: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    rand::RngCore::fill_bytes(&mut rng(seed), &mut v);
    v
}

fn round_trip(bs: BlockSize, len: u64, seed: u64) {
    let c = cipher();
    let plain = plaintext(len, seed);
    let obj = encrypt_object(&c, &plain, bs, &mut rng(seed));
    assert_eq!(obj.len() as u64, ciphertext_size(len, bs), "B={} P={len}", bs.get());
    assert_eq!(plaintext_size(obj.len() as u64, bs).unwrap(), len);
    assert_eq!(decrypt_object(&c, &obj, bs).unwrap(), plain, "B={} P={len}", bs.get());
}

#[test]
fn round_trip_at_edge_sizes_for_every_block_size() {
    for bs in BlockSize::all() {
        let b = bs.get();
        for len in [0, 1, b - 1, b, b + 1, 2 * b, 3 * b + 1] {
            round_trip(bs, len, len ^ b);
        }
    }
}

fn any_block_size() -> impl Strategy<Value = BlockSize> {
    (12u32..=20).prop_map(|s| BlockSize::new(1 << s).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random sizes up to four blocks; big block sizes get few cases because each case scales with B.
    #[test]
    fn round_trip_random_sizes(bs in any_block_size(), frac in 0.0f64..4.0, seed in any::<u64>()) {
        round_trip(bs, (frac * bs.get() as f64) as u64, seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip_small_blocks_random_sizes(len in 0u64..5 * 4096, seed in any::<u64>()) {
        round_trip(BlockSize::new(4096).unwrap(), len, seed);
    }
}

/// The layout the encoder produces, computed the slow way: block after block.
fn reference_blocks(plain_size: u64, b: u64) -> Vec<(std::ops::Range<u64>, std::ops::Range<u64>)> {
    let mut out = Vec::new();
    let (mut p, mut c) = (0u64, 0u64);
    loop {
        let take = (plain_size - p).min(b);
        out.push((p..p + take, c..c + take + 28));
        p += take;
        c += take + 28;
        if p == plain_size {
            return out;
        }
    }
}

#[test]
fn size_function_agrees_with_the_encoder_for_every_small_size() {
    let c = cipher();
    for b in [4096u64, 8192] {
        let bs = BlockSize::new(b as u32).unwrap();
        let mut valid = std::collections::BTreeSet::new();
        let plain = plaintext(3 * b + 1, 5);
        for len in 0..=3 * b + 1 {
            let size = ciphertext_size(len, bs);
            if b == 4096 || len % 97 == 0 || len % b <= 1 || len % b == b - 1 {
                let obj = encrypt_object(&c, &plain[..len as usize], bs, &mut rng(len));
                assert_eq!(obj.len() as u64, size, "B={b} P={len}");
            }
            assert_eq!(plaintext_size(size, bs).unwrap(), len, "B={b} P={len}");
            valid.insert(size);
        }
        // Every object size up to the largest one above is either the image of exactly one plaintext size or
        // refused as impossible.
        for size in 0..=ciphertext_size(3 * b + 1, bs) {
            match plaintext_size(size, bs) {
                Ok(p) => assert!(
                    valid.contains(&size) && ciphertext_size(p, bs) == size,
                    "B={b} C={size}"
                ),
                Err(FormatError::BadSize { size: s }) => assert!(!valid.contains(&size) && s == size, "B={b} C={size}"),
                Err(e) => panic!("unexpected {e}"),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn size_function_inverts_for_large_sizes(bs in any_block_size(), p in 0u64..(1u64 << 50)) {
        let c = ciphertext_size(p, bs);
        prop_assert_eq!(plaintext_size(c, bs).unwrap(), p);
        prop_assert_eq!(c, p + 28 * block_count(p, bs));
        prop_assert!(plaintext_size(c - 1, bs).map_or(true, |q| q < p));
        prop_assert!(plaintext_size(c + 1, bs).map_or(true, |q| q > p));
    }

    #[test]
    fn offset_math_agrees_with_reference(
        b_shift in 12u32..=14,
        p in 0u64..70_000,
        offset in 0u64..80_000,
        len in 0u64..30_000,
        first in 0u64..20,
        count in 0u64..20,
    ) {
        let bs = BlockSize::new(1 << b_shift).unwrap();
        let b = bs.get();
        let blocks = reference_blocks(p, b);
        let n = blocks.len() as u64;
        prop_assert_eq!(block_count(p, bs), n);
        for (i, (pr, cr)) in blocks.iter().enumerate() {
            let i = i as u64;
            prop_assert_eq!(block_plain_range(i, p, bs), pr.clone());
            prop_assert_eq!(block_cipher_range(i, p, bs), cr.clone());
            prop_assert_eq!(is_final_block(i, p, bs), i + 1 == n);
        }
        let c = ciphertext_size(p, bs);
        prop_assert_eq!(block_cipher_range(n + first, p, bs), c..c);
        prop_assert_eq!(block_plain_range(n + first, p, bs), p..p);
        prop_assert!(!is_final_block(n + first, p, bs));

        // blocks_touching: exactly the blocks whose [i*B, (i+1)*B) meets [offset, offset + len).
        let touched: Vec<u64> =
            (0..(offset + len) / b + 2).filter(|i| len > 0 && i * b < offset + len && (i + 1) * b > offset).collect();
        let got = blocks_touching(offset, len, bs);
        prop_assert_eq!(got.clone().collect::<Vec<_>>(), touched);
        if len == 0 {
            prop_assert!(got.is_empty());
        }

        // cipher_range_for_blocks: the union of the existing blocks' sealed ranges, which is contiguous.
        let want: Vec<_> = (first..first + count).filter(|&i| i < n).map(|i| blocks[i as usize].1.clone()).collect();
        let got = cipher_range_for_blocks(first..first + count, p, bs);
        match (want.first(), want.last()) {
            (Some(a), Some(z)) => prop_assert_eq!(got, a.start..z.end),
            _ => prop_assert!(got.is_empty()),
        }
    }

    #[test]
    fn decrypt_blocks_of_any_run_matches_the_plaintext(
        p in 0u64..20_000,
        first_pick in any::<u64>(),
        count in 1u64..6,
        seed in any::<u64>(),
    ) {
        let bs = BlockSize::new(4096).unwrap();
        let n = block_count(p, bs);
        let first = first_pick % n;
        let c = cipher();
        let plain = plaintext(p, seed);
        let obj = encrypt_object(&c, &plain, bs, &mut rng(seed));
        let r = cipher_range_for_blocks(first..first + count, p, bs);
        let got = decrypt_blocks(&c, bs, p, first, &obj[r.start as usize..r.end as usize]).unwrap();
        let last = (first + count).min(n) - 1;
        let pr = block_plain_range(first, p, bs).start..block_plain_range(last, p, bs).end;
        prop_assert_eq!(&got[..], &plain[pr.start as usize..pr.end as usize]);
    }
}
