//! One test per tamper class: every change an attacker with write access to the bucket can make to an object's
//! body is detected, and the error names the block where it shows.
use rand::SeedableRng;
use s3crypt::format::*;

const B: usize = 4096;
const SB: usize = B + 28;

fn bs() -> BlockSize {
    BlockSize::new(B as u32).unwrap()
}

fn key() -> DataKey {
    DataKey::from_bytes([0x42; 32])
}

fn cipher() -> BlockCipher {
    BlockCipher::new(&key(), [0x01; 16])
}

fn plain(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 253) as u8).collect()
}

/// An object of four blocks: three full ones and a final one of 100 bytes.
fn object() -> Vec<u8> {
    encrypt_object(
        &cipher(),
        &plain(3 * B + 100),
        bs(),
        &mut rand_chacha::ChaCha20Rng::seed_from_u64(3),
    )
}

fn sealed(obj: &[u8], index: usize) -> &[u8] {
    &obj[index * SB..((index + 1) * SB).min(obj.len())]
}

#[track_caller]
fn assert_auth(obj: &[u8], block: u64) {
    match decrypt_object(&cipher(), obj, bs()) {
        Err(FormatError::Auth { block: b }) => {
            assert_eq!(b, block, "wrong block named");
            let msg = FormatError::Auth { block: b }.to_string();
            assert!(msg.contains(&format!("block {block}")), "{msg}");
        }
        other => panic!("expected Auth for block {block}, got {other:?}"),
    }
}

#[test]
fn untouched_object_opens() {
    assert_eq!(decrypt_object(&cipher(), &object(), bs()).unwrap(), plain(3 * B + 100));
}

#[test]
fn flipped_bit_anywhere() {
    let obj = object();
    // Nonce, body and tag of each block, including the first and last byte of the object.
    for block in 0..4usize {
        let start = block * SB;
        let end = (start + SB).min(obj.len());
        for pos in [
            start,
            start + 11,
            start + 12,
            start + 500.min(end - start - 17),
            end - 16,
            end - 1,
        ] {
            for bit in [0u8, 7] {
                let mut t = obj.clone();
                t[pos] ^= 1 << bit;
                assert_auth(&t, block as u64);
            }
        }
    }
}

#[test]
fn two_blocks_swapped() {
    let obj = object();
    let mut t = obj[..SB].to_vec();
    t.extend_from_slice(sealed(&obj, 2));
    t.extend_from_slice(sealed(&obj, 1));
    t.extend_from_slice(sealed(&obj, 3));
    assert_auth(&t, 1);
    let mut t = sealed(&obj, 1).to_vec();
    t.extend_from_slice(sealed(&obj, 0));
    t.extend_from_slice(&obj[2 * SB..]);
    assert_auth(&t, 0);
}

#[test]
fn block_dropped() {
    let obj = object();
    let mut t = obj[..SB].to_vec();
    t.extend_from_slice(&obj[2 * SB..]);
    assert_auth(&t, 1);
    // Dropping the final block leaves a full block in the final place.
    assert_auth(&obj[..3 * SB], 2);
}

#[test]
fn block_duplicated() {
    let obj = object();
    let mut t = obj[..2 * SB].to_vec();
    t.extend_from_slice(sealed(&obj, 1));
    t.extend_from_slice(&obj[2 * SB..]);
    assert_auth(&t, 2);
}

#[test]
fn cut_at_a_block_boundary() {
    let obj = object();
    for keep in 1..=3 {
        assert_auth(&obj[..keep * SB], keep as u64 - 1);
    }
    assert!(matches!(
        decrypt_object(&cipher(), &[], bs()),
        Err(FormatError::BadSize { size: 0 })
    ));
}

#[test]
fn cut_elsewhere() {
    let obj = object();
    // A cut that leaves a possible size fails at the block it cuts into.
    for cut in [29, 100, SB - 1, SB + 29, 2 * SB + 1000, obj.len() - 1] {
        assert_auth(&obj[..cut], (cut / SB) as u64);
    }
    // A cut that leaves an impossible size is a size error.
    for cut in [1, 27, SB + 1, SB + 28, 3 * SB + 10] {
        match decrypt_object(&cipher(), &obj[..cut], bs()) {
            Err(FormatError::BadSize { size }) => assert_eq!(size, cut as u64),
            other => panic!("cut at {cut}: expected BadSize, got {other:?}"),
        }
    }
}

#[test]
fn block_appended() {
    let obj = object();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(9);
    // A copy of the final block, a block sealed as the next non-final one and one sealed as the next final one: in
    // each case the old final block is no longer where it was sealed for.
    let next_final = cipher().seal(4, true, &plain(50), &mut rng);
    let next_full = cipher().seal(4, false, &plain(B), &mut rng);
    for extra in [sealed(&obj, 3), &next_final, &next_full] {
        let mut t = obj.clone();
        t.extend_from_slice(extra);
        assert_auth(&t, 3);
    }
}

#[test]
fn block_spliced_from_another_file_with_the_same_key() {
    let obj = object();
    let other = BlockCipher::new(&key(), [0x02; 16]);
    let other_obj = encrypt_object(
        &other,
        &plain(3 * B + 100),
        bs(),
        &mut rand_chacha::ChaCha20Rng::seed_from_u64(4),
    );
    for block in 0..4 {
        let mut t = obj.clone();
        let r = block * SB..((block + 1) * SB).min(obj.len());
        t[r.clone()].copy_from_slice(&other_obj[r]);
        assert_auth(&t, block as u64);
    }
}

#[test]
fn block_of_the_right_file_under_the_wrong_final_flag() {
    let c = cipher();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
    // Block 1 of an earlier, longer version of the same file (sealed non-final) put in as the final block of a
    // two-block version: same file, same index, same size, wrong flag.
    let longer = encrypt_object(&c, &plain(3 * B), bs(), &mut rng);
    let mut t = encrypt_object(&c, &plain(2 * B), bs(), &mut rng);
    t[SB..].copy_from_slice(sealed(&longer, 1));
    assert_auth(&t, 1);
    // And the other way round: a final block sealed for index 1 put where a non-final block 1 belongs.
    let mut t = longer.clone();
    let short = encrypt_object(&c, &plain(2 * B), bs(), &mut rng);
    t[SB..2 * SB].copy_from_slice(sealed(&short, 1));
    assert_auth(&t, 1);
}

#[test]
fn ranged_reads_name_absolute_blocks() {
    let obj = object();
    let p = (3 * B + 100) as u64;
    let mut t = obj.clone();
    t[2 * SB + 40] ^= 0x80;
    let r = cipher_range_for_blocks(1..4, p, bs());
    match decrypt_blocks(&cipher(), bs(), p, 1, &t[r.start as usize..r.end as usize]) {
        Err(FormatError::Auth { block }) => assert_eq!(block, 2),
        other => panic!("expected Auth for block 2, got {other:?}"),
    }
    // A run fetched from the wrong offset fails at its first block.
    match decrypt_blocks(&cipher(), bs(), p, 2, sealed(&obj, 1)) {
        Err(FormatError::Auth { block }) => assert_eq!(block, 2),
        other => panic!("expected Auth for block 2, got {other:?}"),
    }
}
