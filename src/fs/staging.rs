//! The local staging area for dirty blocks that do not fit in memory.
//!
//! An open file keeps its dirty blocks in memory up to a bound; beyond it, blocks spill to a staging file. Spilled
//! blocks are sealed with AES-256-GCM-SIV under a random key that lives only in this process (one per staging
//! file), so plaintext never reaches the local disk, and a staging file left behind by a crash is useless to
//! anyone who finds it. Block `i` lives at offset `i * (B + 28)`; the file is sparse.
use crate::format::{self, BlockCipher, BlockSize, DataKey};
use rand::RngCore;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub struct Staging {
    file: File,
    cipher: BlockCipher,
    stored_len: u64,
}

impl Staging {
    /// Creates an anonymous (already unlinked) staging file in `dir`.
    pub fn new(dir: &Path, bs: BlockSize) -> io::Result<Self> {
        let file = tempfile::tempfile_in(dir)?;
        let mut key = [0u8; 32];
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut key);
        rand::rngs::OsRng.fill_bytes(&mut id);
        let key = DataKey::from_bytes(key);
        Ok(Staging {
            file,
            cipher: BlockCipher::new(&key, id),
            stored_len: format::sealed_block_len(bs),
        })
    }

    pub fn write_block(&self, index: u64, plain: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(plain.len() + 28);
        self.cipher
            .seal_into(index, false, plain, &mut rand::thread_rng(), &mut out);
        self.file.write_all_at(&out, index * self.stored_len)
    }

    pub fn read_block(&self, index: u64, plain_len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; plain_len + 28];
        self.file.read_exact_at(&mut buf, index * self.stored_len)?;
        self.cipher
            .open(index, false, &buf)
            .map_err(|e| io::Error::other(format!("staging block {index}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_and_are_not_plaintext_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let bs = BlockSize::new(4096).unwrap();
        let s = Staging::new(dir.path(), bs).unwrap();
        let block = vec![0x5a; 4096];
        s.write_block(3, &block).unwrap();
        assert_eq!(s.read_block(3, 4096).unwrap(), block);
        let mut raw = vec![0u8; 4096 + 28];
        s.file.read_exact_at(&mut raw, 3 * (4096 + 28)).unwrap();
        assert!(!raw.windows(16).any(|w| w == &block[..16]));
    }
}
