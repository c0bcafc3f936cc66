//! Golden fixtures of format version 1 (tests/fixtures/format-v1/): objects written once, with a fixed seed, and
//! committed. Every later build must still read them. A format change gets a new version and a new directory beside
//! this one; these files are never regenerated.
//!
//! Each object `NAME.bin` comes with `NAME.txt`: its S3 user metadata (`meta NAME: VALUE` lines), the cse-local
//! master key that wraps its data key, and the size and SHA-256 of its plaintext, whose byte i is `i mod 251`.
//!
//! The fixtures were made by `S3CRYPT_WRITE_FIXTURES=1 cargo test --test format_golden write_fixtures`, which
//! refuses to overwrite an existing directory. Without that variable the same test only checks that the encoder
//! still produces the committed bytes from the committed seed (reproducible ciphertext).
use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Key, Nonce, Tag};
use rand::{RngCore, SeedableRng};
use s3crypt::format::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1")
}

/// The objects of this fixture set: name, block size, plaintext size.
const OBJECTS: [(&str, u32, u64); 4] = [
    ("empty-b4k", 4096, 0),
    ("one-byte-b4k", 4096, 1),
    ("two-blocks-b4k", 4096, 4097),
    ("four-blocks-b64k", 65536, 3 * 65536 + 1),
];
const SEED: u64 = 0x5333_6372_7970_7401;
/// The cse-local master key of the fixtures (test material only).
const MASTER_KEY: [u8; 32] = *b"s3crypt format-v1 fixture master";

fn fixture_plaintext(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// cse-local wrapping key: HKDF-SHA256(master, no salt, info "s3crypt v1 key wrapping"), 32 bytes.
fn wrapping_key(master: &[u8]) -> Aes256GcmSiv {
    let mut okm = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(None, master)
        .expand(b"s3crypt v1 key wrapping", &mut okm)
        .unwrap();
    let key: &Key<Aes256GcmSiv> = (&okm).into();
    Aes256GcmSiv::new(key)
}

fn wrap_ad(file_id: &FileId) -> Vec<u8> {
    let mut ad = b"s3crypt.wrap".to_vec();
    ad.push(FORMAT_VERSION);
    ad.extend_from_slice(file_id);
    ad
}

fn unwrap_key(master: &[u8], file_id: &FileId, wrapped: &[u8]) -> DataKey {
    assert_eq!(wrapped.len(), 12 + 32 + 16, "cse-local wrapped key length");
    let mut key = wrapped[12..44].to_vec();
    let nonce = Nonce::try_from(&wrapped[..12]).unwrap();
    let tag = Tag::try_from(&wrapped[44..]).unwrap();
    wrapping_key(master)
        .decrypt_inout_detached(&nonce, &wrap_ad(file_id), key.as_mut_slice().into(), &tag)
        .unwrap();
    DataKey::from_slice(&key).unwrap()
}

struct Fixture {
    name: String,
    object: Vec<u8>,
    meta: BTreeMap<String, String>,
    master_key: Vec<u8>,
    plain_size: u64,
    plain_sha256: String,
}

fn read_fixture(name: &str) -> Fixture {
    let object = std::fs::read(dir().join(format!("{name}.bin"))).unwrap();
    let text = std::fs::read_to_string(dir().join(format!("{name}.txt"))).unwrap();
    let (mut meta, mut master_key, mut plain_size, mut plain_sha256) = (BTreeMap::new(), None, None, None);
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (field, value) = line.split_once(' ').unwrap();
        match field {
            "meta" => {
                let (k, v) = value.split_once(": ").unwrap();
                meta.insert(k.to_string(), v.to_string());
            }
            "cse-local-master-key" => master_key = Some(hex::decode(value).unwrap()),
            "plain-size" => plain_size = Some(value.parse().unwrap()),
            "plain-sha256" => plain_sha256 = Some(value.to_string()),
            other => panic!("{name}.txt: unknown field {other}"),
        }
    }
    Fixture {
        name: name.to_string(),
        object,
        meta,
        master_key: master_key.unwrap(),
        plain_size: plain_size.unwrap(),
        plain_sha256: plain_sha256.unwrap(),
    }
}

#[test]
fn golden_objects_decrypt() {
    for (name, block_size, size) in OBJECTS {
        let f = read_fixture(name);
        let header = ObjectHeader::from_metadata(&f.meta)
            .unwrap()
            .expect("fixture has an s3crypt header");
        assert_eq!(
            (header.version, header.key_mode.as_str()),
            (1, "cse-local"),
            "{}",
            f.name
        );
        assert_eq!(header.block_size.get(), u64::from(block_size), "{}", f.name);
        let bs = header.block_size;
        assert_eq!(
            plaintext_size(f.object.len() as u64, bs).unwrap(),
            f.plain_size,
            "{}",
            f.name
        );
        assert_eq!(f.plain_size, size, "{}", f.name);

        let key = unwrap_key(&f.master_key, &header.file_id, &header.wrapped_key);
        let cipher = BlockCipher::new(&key, header.file_id);
        let plain = decrypt_object(&cipher, &f.object, bs).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&plain)), f.plain_sha256, "{}", f.name);
        assert_eq!(plain, fixture_plaintext(size), "{}", f.name);

        // The last block alone, as a ranged read of it would fetch it.
        let last = block_count(size, bs) - 1;
        let r = cipher_range_for_blocks(last..last + 1, size, bs);
        let tail = decrypt_blocks(&cipher, bs, size, last, &f.object[r.start as usize..r.end as usize]).unwrap();
        assert_eq!(
            tail,
            &plain[block_plain_range(last, size, bs).start as usize..],
            "{}",
            f.name
        );
    }
}

/// Builds the fixture set from [`SEED`]: per object a fresh file id and data key, the key wrapped under the
/// cse-local scheme, the body sealed block by block. Returns (file name, contents) pairs.
fn build_fixtures() -> Vec<(String, Vec<u8>)> {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(SEED);
    let mut files = Vec::new();
    for (name, block_size, size) in OBJECTS {
        let bs = BlockSize::new(block_size).unwrap();
        let mut file_id = [0u8; 16];
        rng.fill_bytes(&mut file_id);
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        let mut wrapped = vec![0u8; 12];
        rng.fill_bytes(&mut wrapped);
        let nonce = Nonce::try_from(&wrapped[..]).unwrap();
        let mut body = key.to_vec();
        let tag = wrapping_key(&MASTER_KEY)
            .encrypt_inout_detached(&nonce, &wrap_ad(&file_id), body.as_mut_slice().into())
            .unwrap();
        wrapped.extend_from_slice(&body);
        wrapped.extend_from_slice(&tag);

        let plain = fixture_plaintext(size);
        let cipher = BlockCipher::new(&DataKey::from_bytes(key), file_id);
        let object = encrypt_object(&cipher, &plain, bs, &mut rng);
        let header = ObjectHeader {
            version: FORMAT_VERSION,
            key_mode: "cse-local".into(),
            block_size: bs,
            file_id,
            wrapped_key: wrapped,
        };
        let mut meta = BTreeMap::new();
        header.to_metadata(&mut meta);
        let mut text = format!("# s3crypt format v1 golden fixture {name}.bin (test key material only)\n");
        for (k, v) in &meta {
            text.push_str(&format!("meta {k}: {v}\n"));
        }
        text.push_str(&format!("cse-local-master-key {}\n", hex::encode(MASTER_KEY)));
        text.push_str(&format!(
            "plain-size {size}\nplain-sha256 {}\n",
            hex::encode(Sha256::digest(&plain))
        ));
        files.push((format!("{name}.bin"), object));
        files.push((format!("{name}.txt"), text.into_bytes()));
    }
    files
}

#[test]
fn write_fixtures() {
    let files = build_fixtures();
    assert_eq!(files, build_fixtures(), "the same seed must give the same bytes");
    if std::env::var_os("S3CRYPT_WRITE_FIXTURES").is_some() {
        assert!(
            !dir().exists(),
            "{} exists: released fixtures are never regenerated",
            dir().display()
        );
        std::fs::create_dir_all(dir()).unwrap();
        for (name, contents) in &files {
            std::fs::write(dir().join(name), contents).unwrap();
        }
        return;
    }
    for (name, contents) in &files {
        let committed = std::fs::read(dir().join(name)).unwrap();
        assert!(
            committed == *contents,
            "{name}: the encoder no longer writes the committed format-v1 bytes"
        );
    }
}
