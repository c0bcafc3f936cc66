//! The directory attribute index: what HEADs of a directory's files said, in one object.
//!
//! A listing gives each file's name, size, ETag and modification second, but not the metadata that holds its
//! mode, owner and times, so a long listing costs a HEAD per file. The mount keeps, per directory it has written
//! to or long-listed, one object that records for each file the facts of a HEAD (ETag, object size, the second
//! of its last modification and its user metadata). An entry is used only while the listing still shows the
//! same ETag, size and second; anything else is asked of S3 again. The index is a cache: losing it, or a stale
//! entry, costs requests, never a wrong byte (see `fs/dirindex.rs` for the rules, docs/FORMAT.md for the bytes).
//!
//! Encoding (all integers little-endian):
//! ```text
//! magic "s3cdirx1" | u32 count | count x entry
//! entry: u16 len, name | u16 len, etag | u64 object size | i64 last-modified second (Unix time)
//!        | u16 count | count x (u16 len, metadata name | u32 len, metadata value)
//! ```
use super::FormatError;
use std::collections::BTreeMap;

/// The first 8 bytes of an index object; the last digit is the encoding's version.
pub const DIR_INDEX_MAGIC: &[u8; 8] = b"s3cdirx1";

/// One file as a HEAD saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    /// The ETag with its quotes, as S3 sends it.
    pub etag: String,
    /// Size of the object body in bytes (ciphertext in the client-side modes).
    pub object_size: u64,
    /// The object's last modification, in whole seconds since the Unix epoch (what listings show).
    pub modified_secs: i64,
    /// The object's user metadata.
    pub metadata: BTreeMap<String, String>,
}

/// Encodes `entries`. Names, ETags and metadata names longer than 65,535 bytes cannot occur in S3 (keys and
/// metadata are far smaller); an entry with one is left out rather than written wrongly.
pub fn encode_dir_index(entries: &[IndexEntry]) -> Vec<u8> {
    let fits = |e: &IndexEntry| {
        e.name.len() <= u16::MAX as usize
            && e.etag.len() <= u16::MAX as usize
            && e.metadata.len() <= u16::MAX as usize
            && e.metadata
                .iter()
                .all(|(k, v)| k.len() <= u16::MAX as usize && v.len() <= u32::MAX as usize)
    };
    let kept: Vec<&IndexEntry> = entries.iter().filter(|e| fits(e)).collect();
    let mut out = Vec::with_capacity(12 + kept.len() * 256);
    out.extend_from_slice(DIR_INDEX_MAGIC);
    out.extend_from_slice(&(kept.len() as u32).to_le_bytes());
    for e in kept {
        put_str16(&mut out, &e.name);
        put_str16(&mut out, &e.etag);
        out.extend_from_slice(&e.object_size.to_le_bytes());
        out.extend_from_slice(&e.modified_secs.to_le_bytes());
        out.extend_from_slice(&(e.metadata.len() as u16).to_le_bytes());
        for (k, v) in &e.metadata {
            put_str16(&mut out, k);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        }
    }
    out
}

/// Decodes an index object; any malformation (truncation, bad UTF-8, trailing bytes) is an error.
pub fn decode_dir_index(bytes: &[u8]) -> Result<Vec<IndexEntry>, FormatError> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(DIR_INDEX_MAGIC.len())? != DIR_INDEX_MAGIC {
        return Err(bad("not a directory index (wrong magic or version)"));
    }
    let count = u32::from_le_bytes(r.array()?) as usize;
    // Each entry takes at least 22 bytes: a count beyond what the bytes can hold is a lie, not an allocation.
    let mut entries = Vec::with_capacity(count.min(bytes.len() / 22));
    for _ in 0..count {
        let name = r.str16()?;
        let etag = r.str16()?;
        let object_size = u64::from_le_bytes(r.array()?);
        let modified_secs = i64::from_le_bytes(r.array()?);
        let n = u16::from_le_bytes(r.array()?);
        let mut metadata = BTreeMap::new();
        for _ in 0..n {
            let k = r.str16()?;
            let len = u32::from_le_bytes(r.array()?) as usize;
            let v = String::from_utf8(r.take(len)?.to_vec()).map_err(|_| bad("metadata value is not UTF-8"))?;
            metadata.insert(k, v);
        }
        entries.push(IndexEntry {
            name,
            etag,
            object_size,
            modified_secs,
            metadata,
        });
    }
    if r.at != bytes.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(entries)
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn bad(what: &str) -> FormatError {
    FormatError::BadMetadata(format!("directory index: {what}"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| bad("truncated"))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn str16(&mut self) -> Result<String, FormatError> {
        let len = u16::from_le_bytes(self.array()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| bad("a name is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(name: &str, meta: &[(&str, &str)]) -> IndexEntry {
        IndexEntry {
            name: name.into(),
            etag: "\"0123abcd\"".into(),
            object_size: 4_200_000_123,
            modified_secs: 1_900_000_000,
            metadata: meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    #[test]
    fn round_trips_and_has_the_documented_layout() {
        let e = entry("f", &[("mode", "33188")]);
        let bytes = encode_dir_index(std::slice::from_ref(&e));
        let mut want = b"s3cdirx1".to_vec();
        want.extend_from_slice(&1u32.to_le_bytes());
        want.extend_from_slice(&[1, 0, b'f', 10, 0]);
        want.extend_from_slice(b"\"0123abcd\"");
        want.extend_from_slice(&4_200_000_123u64.to_le_bytes());
        want.extend_from_slice(&1_900_000_000i64.to_le_bytes());
        want.extend_from_slice(&[1, 0, 4, 0]);
        want.extend_from_slice(b"mode");
        want.extend_from_slice(&5u32.to_le_bytes());
        want.extend_from_slice(b"33188");
        assert_eq!(bytes, want);
        assert_eq!(bytes.len(), 60, "the worked example in docs/FORMAT.md");
        assert_eq!(decode_dir_index(&bytes).unwrap(), vec![e]);
        assert_eq!(decode_dir_index(&encode_dir_index(&[])).unwrap(), vec![]);
    }

    #[test]
    fn every_truncation_and_a_trailing_byte_are_refused() {
        let bytes = encode_dir_index(&[entry("a", &[("uid", "0")]), entry("b", &[])]);
        for n in 0..bytes.len() {
            assert!(decode_dir_index(&bytes[..n]).is_err(), "truncated to {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_dir_index(&longer).is_err());
        let mut other = bytes;
        other[7] = b'2';
        assert!(decode_dir_index(&other).is_err(), "another version");
    }

    #[test]
    fn a_huge_count_does_not_allocate() {
        let mut bytes = DIR_INDEX_MAGIC.to_vec();
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_dir_index(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn any_entries_round_trip(
            raw in proptest::collection::vec(
                ("[^/\\x00]{1,40}", "[0-9a-f\"-]{0,40}", any::<u64>(), any::<i64>(),
                 proptest::collection::btree_map("[a-z-]{1,20}", ".{0,60}", 0..5)),
                0..20),
        ) {
            let entries: Vec<IndexEntry> = raw
                .into_iter()
                .map(|(name, etag, object_size, modified_secs, metadata)| IndexEntry {
                    name, etag, object_size, modified_secs, metadata,
                })
                .collect();
            prop_assert_eq!(decode_dir_index(&encode_dir_index(&entries)).unwrap(), entries);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_dir_index(&bytes);
        }
    }
}
