//! Sealing and opening single blocks with AES-256-GCM-SIV.
//!
//! A sealed block is `nonce (12) || ciphertext || tag (16)`, with a fresh random nonce per seal. The associated
//! data binds the block to its file, its position and whether it is the final block (see [`block_ad`]), so a block
//! only opens in the exact place it was sealed for. AES-GCM-SIV is nonce-misuse resistant: a repeated nonce (a
//! broken random source) reveals at most that two identical blocks were sealed for the same place, never the key.
//!
//! [`BlockCipher`] keeps the AES key schedule of the file's data key, so sealing a block costs only GCM-SIV's
//! per-nonce subkey derivation and one pass over the data; sealing and opening work in place in the output buffer.
use super::{DataKey, FileId, FormatError, FILE_ID_LEN, FORMAT_VERSION, NONCE_LEN, TAG_LEN};
use aes_gcm_siv::aead::inout::InOutBuf;
use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Key, Nonce, Tag};
use std::fmt;

/// Label at the start of every block's associated data (13 bytes, no terminator).
pub const BLOCK_AD_LABEL: &[u8; 13] = b"s3crypt.block";
/// Length of a block's associated data: label, version, file id, index, final flag.
pub const BLOCK_AD_LEN: usize = BLOCK_AD_LABEL.len() + 1 + FILE_ID_LEN + 8 + 1;

/// The associated data of block `index` of file `file_id`:
/// `"s3crypt.block" || version (u8) || file_id (16) || index (u64 big-endian) || final (u8: 1 or 0)`.
pub fn block_ad(file_id: &FileId, index: u64, is_final: bool) -> [u8; BLOCK_AD_LEN] {
    let mut ad = [0u8; BLOCK_AD_LEN];
    let (label, rest) = ad.split_at_mut(BLOCK_AD_LABEL.len());
    label.copy_from_slice(BLOCK_AD_LABEL);
    rest[0] = FORMAT_VERSION;
    rest[1..1 + FILE_ID_LEN].copy_from_slice(file_id);
    rest[1 + FILE_ID_LEN..1 + FILE_ID_LEN + 8].copy_from_slice(&index.to_be_bytes());
    rest[1 + FILE_ID_LEN + 8] = u8::from(is_final);
    ad
}

/// Label at the start of the associated data of a file's sealed extended attributes (13 bytes).
pub const XATTR_AD_LABEL: &[u8; 13] = b"s3crypt.xattr";
/// Length of the extended attributes' associated data: label, version, file id.
pub const XATTR_AD_LEN: usize = XATTR_AD_LABEL.len() + 1 + FILE_ID_LEN;

/// The associated data of the extended attributes of file `file_id`: `"s3crypt.xattr" || version (u8) ||
/// file_id (16)`. The label differs from every block's, so a sealed attribute set never opens as a block, nor a
/// block as an attribute set.
pub fn xattr_ad(file_id: &FileId) -> [u8; XATTR_AD_LEN] {
    let mut ad = [0u8; XATTR_AD_LEN];
    ad[..XATTR_AD_LABEL.len()].copy_from_slice(XATTR_AD_LABEL);
    ad[XATTR_AD_LABEL.len()] = FORMAT_VERSION;
    ad[XATTR_AD_LABEL.len() + 1..].copy_from_slice(file_id);
    ad
}

/// Seals and opens the blocks of one file: an initialized AES-256-GCM-SIV for the file's data key, plus its id.
/// Cheap to clone; `Debug` shows the file id, never key material. The AES key schedule is zeroized on drop.
#[derive(Clone)]
pub struct BlockCipher {
    aead: Aes256GcmSiv,
    file_id: FileId,
}

impl BlockCipher {
    pub fn new(key: &DataKey, file_id: FileId) -> Self {
        let key: &Key<Aes256GcmSiv> = key.as_bytes().into();
        BlockCipher {
            aead: Aes256GcmSiv::new(key),
            file_id,
        }
    }

    pub fn file_id(&self) -> &FileId {
        &self.file_id
    }

    /// Seals block `index` of this file and returns `nonce || ciphertext || tag`.
    pub fn seal(&self, index: u64, is_final: bool, plaintext: &[u8], rng: &mut dyn rand::RngCore) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + NONCE_LEN + TAG_LEN);
        self.seal_into(index, is_final, plaintext, rng, &mut out);
        out
    }

    /// Like [`seal`](Self::seal), but appends the sealed block to `out`, encrypting in place there (one copy of
    /// the plaintext, no temporary buffers).
    pub fn seal_into(
        &self,
        index: u64,
        is_final: bool,
        plaintext: &[u8],
        rng: &mut dyn rand::RngCore,
        out: &mut Vec<u8>,
    ) {
        let ad = block_ad(&self.file_id, index, is_final);
        self.seal_with(&ad, plaintext, rng, out);
    }

    /// Like [`seal_into`](Self::seal_into), but into `out`, which must be exactly `plaintext.len() + 28` bytes
    /// (one slot of a buffer of sealed blocks). The ciphertext is written from the plaintext straight into the
    /// slot (AES-GCM-SIV authenticates the plaintext, then encrypts it out of place): no copy of the plaintext
    /// first.
    pub fn seal_to_slice(
        &self,
        index: u64,
        is_final: bool,
        plaintext: &[u8],
        rng: &mut dyn rand::RngCore,
        out: &mut [u8],
    ) {
        assert_eq!(
            out.len(),
            plaintext.len() + NONCE_LEN + TAG_LEN,
            "a sealed block's slot"
        );
        let ad = block_ad(&self.file_id, index, is_final);
        let (nonce, rest) = out.split_at_mut(NONCE_LEN);
        rng.fill_bytes(nonce);
        let (body, tag_out) = rest.split_at_mut(plaintext.len());
        let nonce = Nonce::try_from(&nonce[..]).expect("NONCE_LEN bytes");
        let inout = InOutBuf::new(plaintext, body).expect("a slot's body is as long as its plaintext");
        let tag = self
            .aead
            .encrypt_inout_detached(&nonce, &ad, inout)
            // AES-GCM-SIV refuses only messages over 2^36 bytes; blocks are at most 1 MiB.
            .expect("block plaintext within AES-GCM-SIV's length limit");
        tag_out.copy_from_slice(&tag);
    }

    /// Seals the file's extended-attribute set (`nonce || ciphertext || tag`, like a block, under its own
    /// associated data).
    pub fn seal_xattrs(&self, plaintext: &[u8], rng: &mut dyn rand::RngCore) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + NONCE_LEN + TAG_LEN);
        self.seal_with(&xattr_ad(&self.file_id), plaintext, rng, &mut out);
        out
    }

    /// Opens what [`seal_xattrs`](Self::seal_xattrs) sealed for this file.
    pub fn open_xattrs(&self, sealed: &[u8]) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::new();
        self.open_with(&xattr_ad(&self.file_id), sealed, &mut out)
            .map_err(|_| FormatError::XattrAuth)?;
        Ok(out)
    }

    fn seal_with(&self, ad: &[u8], plaintext: &[u8], rng: &mut dyn rand::RngCore, out: &mut Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        out.reserve(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        let body_start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .aead
            .encrypt_inout_detached(&Nonce::from(nonce), ad, (&mut out[body_start..]).into())
            // AES-GCM-SIV refuses only messages over 2^36 bytes; blocks are at most 1 MiB.
            .expect("block plaintext within AES-GCM-SIV's length limit");
        out.extend_from_slice(&tag);
    }

    /// Opens sealed block `index`, which must have been sealed for this file, this index and this final flag.
    pub fn open(&self, index: u64, is_final: bool, sealed: &[u8]) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::new();
        self.open_into(index, is_final, sealed, &mut out)?;
        Ok(out)
    }

    /// Like [`open`](Self::open), but appends the plaintext to `out`, decrypting in place there. On failure `out`
    /// is left as it was.
    pub fn open_into(&self, index: u64, is_final: bool, sealed: &[u8], out: &mut Vec<u8>) -> Result<(), FormatError> {
        let ad = block_ad(&self.file_id, index, is_final);
        self.open_with(&ad, sealed, out)
            .map_err(|()| FormatError::Auth { block: index })
    }

    /// Opens sealed block `index` where it lies: `buf` holds `nonce || ciphertext || tag`, and on success the
    /// plaintext is `buf[NONCE_LEN..buf.len() - TAG_LEN]` (no allocation, no copy). On failure the body is
    /// zeroized, so unauthenticated plaintext is never left behind.
    pub fn open_in_place(&self, index: u64, is_final: bool, buf: &mut [u8]) -> Result<(), FormatError> {
        if buf.len() < NONCE_LEN + TAG_LEN {
            return Err(FormatError::Auth { block: index });
        }
        let (nonce, rest) = buf.split_at_mut(NONCE_LEN);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        self.open_body_in_place(index, is_final, nonce, body, tag)
    }

    /// [`open_in_place`](Self::open_in_place) for a sealed block whose ciphertext `body` lies apart from its
    /// `nonce` and `tag`; the same on failure.
    pub fn open_body_in_place(
        &self,
        index: u64,
        is_final: bool,
        nonce: &[u8],
        body: &mut [u8],
        tag: &[u8],
    ) -> Result<(), FormatError> {
        let fail = || FormatError::Auth { block: index };
        let ad = block_ad(&self.file_id, index, is_final);
        let nonce = Nonce::try_from(nonce).map_err(|_| fail())?;
        let tag = Tag::try_from(tag).map_err(|_| fail())?;
        match self.aead.decrypt_inout_detached(&nonce, &ad, body.into(), &tag) {
            Ok(()) => Ok(()),
            Err(_) => {
                zeroize::Zeroize::zeroize(body);
                Err(fail())
            }
        }
    }

    fn open_with(&self, ad: &[u8], sealed: &[u8], out: &mut Vec<u8>) -> Result<(), ()> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(());
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        let nonce = Nonce::try_from(nonce).map_err(|_| ())?;
        let tag = Tag::try_from(tag).map_err(|_| ())?;
        let start = out.len();
        out.extend_from_slice(body);
        match self
            .aead
            .decrypt_inout_detached(&nonce, ad, (&mut out[start..]).into(), &tag)
        {
            Ok(()) => Ok(()),
            Err(_) => {
                // Never hand out unauthenticated plaintext, not even in the spare capacity.
                zeroize::Zeroize::zeroize(&mut out[start..]);
                out.truncate(start);
                Err(())
            }
        }
    }
}

impl fmt::Debug for BlockCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockCipher")
            .field("file_id", &hex::encode(self.file_id))
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cipher(key_byte: u8, id_byte: u8) -> BlockCipher {
        BlockCipher::new(&DataKey::from_bytes([key_byte; 32]), [id_byte; 16])
    }

    #[test]
    fn ad_bytes_are_as_documented() {
        let ad = block_ad(&[0xAA; 16], 0x0102_0304_0506_0708, true);
        let mut expected = b"s3crypt.block".to_vec();
        expected.push(1);
        expected.extend_from_slice(&[0xAA; 16]);
        expected.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        expected.push(1);
        assert_eq!(ad.to_vec(), expected);
        assert_eq!(BLOCK_AD_LEN, 39);
        assert_eq!(block_ad(&[0; 16], 0, false)[38], 0);
    }

    #[test]
    fn sealing_into_a_slot_and_opening_in_place_match_the_allocating_forms() {
        let c = cipher(3, 4);
        // Empty, under one AES block, whole AES blocks, and many with a partial one at the end.
        for len in [0usize, 1, 4096, 65_541] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            // Whatever the slot held before is overwritten, every byte of it.
            let mut slot = vec![0xaau8; len + NONCE_LEN + TAG_LEN];
            c.seal_to_slice(
                9,
                true,
                &plain,
                &mut rand_chacha::ChaCha20Rng::seed_from_u64(5),
                &mut slot,
            );
            let sealed = c.seal(9, true, &plain, &mut rand_chacha::ChaCha20Rng::seed_from_u64(5));
            assert_eq!(slot, sealed);
            c.open_in_place(9, true, &mut slot).unwrap();
            assert_eq!(&slot[NONCE_LEN..NONCE_LEN + len], &plain[..]);
            let mut wrong = sealed.clone();
            assert!(matches!(
                c.open_in_place(9, false, &mut wrong),
                Err(FormatError::Auth { block: 9 })
            ));
            assert!(
                wrong[NONCE_LEN..NONCE_LEN + len].iter().all(|&b| b == 0),
                "nothing unauthenticated left"
            );
        }
    }

    #[test]
    fn seal_open_round_trip_and_layout() {
        let c = cipher(1, 2);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        for len in [0usize, 1, 15, 16, 17, 4096] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let sealed = c.seal(3, false, &plain, &mut rng);
            assert_eq!(sealed.len(), len + NONCE_LEN + TAG_LEN);
            assert_eq!(c.open(3, false, &sealed).unwrap(), plain);
        }
    }

    #[test]
    fn fresh_nonce_per_seal() {
        let c = cipher(1, 2);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let a = c.seal(0, true, b"same", &mut rng);
        let b = c.seal(0, true, b"same", &mut rng);
        assert_ne!(a, b);
        assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
    }

    #[test]
    fn wrong_place_key_or_file_fails_naming_the_block() {
        let c = cipher(1, 2);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let sealed = c.seal(5, false, b"hello", &mut rng);
        let auth =
            |r: Result<Vec<u8>, FormatError>, b: u64| matches!(r, Err(FormatError::Auth { block }) if block == b);
        assert!(auth(c.open(4, false, &sealed), 4));
        assert!(auth(c.open(5, true, &sealed), 5));
        assert!(auth(cipher(9, 2).open(5, false, &sealed), 5));
        assert!(auth(cipher(1, 3).open(5, false, &sealed), 5));
        assert!(auth(c.open(5, false, &sealed[..27]), 5));
        assert!(auth(c.open(5, false, &[]), 5));
    }

    #[test]
    fn open_into_appends_and_leaves_output_alone_on_failure() {
        let c = cipher(1, 2);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let sealed = c.seal(0, true, b"world", &mut rng);
        let mut out = b"hello ".to_vec();
        c.open_into(0, true, &sealed, &mut out).unwrap();
        assert_eq!(out, b"hello world");
        let mut bad = sealed.clone();
        bad[NONCE_LEN] ^= 1;
        assert!(c.open_into(0, true, &bad, &mut out).is_err());
        assert_eq!(out, b"hello world");
        let mut appended = b"x".to_vec();
        c.seal_into(0, true, b"world", &mut rng, &mut appended);
        assert_eq!(c.open(0, true, &appended[1..]).unwrap(), b"world");
    }

    #[test]
    fn debug_is_redacted() {
        let c = cipher(0xAB, 0x01);
        let s = format!("{c:?}");
        assert!(s.contains("redacted") && s.contains("0101"), "{s}");
        assert!(!s.to_lowercase().contains("abab"), "{s}");
    }

    #[test]
    fn block_cipher_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<BlockCipher>();
    }
}
