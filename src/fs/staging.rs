//! The local staging area for dirty blocks that do not fit in memory.
//!
//! An open file keeps its dirty blocks in memory up to a bound; beyond it, blocks spill to a staging file. Spilled
//! blocks are sealed with AES-256-GCM-SIV, so plaintext never reaches the local disk. In the client-side modes
//! they are sealed exactly as the object will hold them (the file's own data key and file id, block index,
//! non-final), so an upload copies them as they are instead of opening and sealing them again; only the final
//! block is sealed anew. In the SSE modes the key is a random one that lives only in this process, so a staging
//! file left behind by a crash is useless to anyone who finds it. Block `i` lives at offset `i * (B + 28)`; the
//! file is sparse.
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
    /// Sealed with the file's own key: the stored blocks are valid non-final blocks of the object.
    file_format: bool,
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
            file_format: false,
        })
    }

    /// A staging file whose blocks are sealed with the file's own cipher, in the object's format.
    pub fn for_file(dir: &Path, bs: BlockSize, cipher: &BlockCipher) -> io::Result<Self> {
        let file = tempfile::tempfile_in(dir)?;
        Ok(Staging {
            file,
            cipher: cipher.clone(),
            stored_len: format::sealed_block_len(bs),
            file_format: true,
        })
    }

    /// True when [`read_sealed`](Self::read_sealed) gives blocks in the object's format.
    pub fn is_file_format(&self) -> bool {
        self.file_format
    }

    /// The stored (sealed) bytes of a whole block.
    pub fn read_sealed(&self, index: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.stored_len as usize];
        self.file.read_exact_at(&mut buf, index * self.stored_len)?;
        Ok(buf)
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
