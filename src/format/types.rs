//! Small value types shared by the format, the key providers and the file system.
use std::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length of an AES-256 key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a file id in bytes (random, 128 bits).
pub const FILE_ID_LEN: usize = 16;

/// A file's random 128-bit id. It is bound into every block's associated data and into the key wrapping, so a
/// block or a wrapped key cannot be moved to another file.
pub type FileId = [u8; FILE_ID_LEN];

/// A plaintext AES-256 data key. Zeroized on drop; `Debug` never shows the bytes.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; KEY_LEN]);

impl DataKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        DataKey(bytes)
    }

    /// Copies a key out of a slice; `None` if the slice is not exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(DataKey(arr))
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// The plaintext block size B of a volume: a power of two from 4 KiB to 1 MiB. Fixed per volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockSize(u32);

impl BlockSize {
    pub const MIN: u32 = 4 * 1024;
    pub const MAX: u32 = 1024 * 1024;
    pub const DEFAULT: BlockSize = BlockSize(64 * 1024);

    /// `None` unless `bytes` is a power of two in `MIN..=MAX`.
    pub fn new(bytes: u32) -> Option<Self> {
        (bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes)).then_some(BlockSize(bytes))
    }

    /// Plaintext bytes per block.
    pub fn get(self) -> u64 {
        u64::from(self.0)
    }

    /// Every legal block size, smallest first.
    pub fn all() -> impl Iterator<Item = BlockSize> {
        (12..=20).map(|shift| BlockSize(1 << shift))
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_key_debug_is_redacted() {
        let k = DataKey::from_bytes([0xAB; KEY_LEN]);
        let s = format!("{k:?}");
        assert!(!s.to_lowercase().contains("ab"), "{s}");
        assert!(!s.contains("171"), "{s}");
    }

    #[test]
    fn block_sizes() {
        assert_eq!(BlockSize::all().count(), 9);
        assert!(BlockSize::new(4096).is_some());
        assert!(BlockSize::new(2048).is_none());
        assert!(BlockSize::new(3 * 4096).is_none());
        assert!(BlockSize::new(2 * 1024 * 1024).is_none());
    }
}
