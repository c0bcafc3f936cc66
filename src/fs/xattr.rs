//! Extended attributes, kept in the object's metadata.
//!
//! A file's attribute set is one metadata entry:
//! - SSE modes: `xattr`, in s3fs's form (the URL-encoded JSON object `{"name":"base64(value)",...}`), so a bucket
//!   reads the same through s3fs.
//! - Client-side modes: `s3crypt-xattr`, holding base64 of the same JSON sealed with the file's data key under
//!   its own associated data (docs/FORMAT.md §3.1): neither names nor values are in clear in S3, and a set copied
//!   to another object does not open there.
//!
//! S3 allows 2 KiB of user metadata per object (the UTF-8 bytes of every key and value), and the POSIX
//! attributes, the s3crypt header and the upload token share it. A change that would pass it fails before any
//! request: E2BIG when the one value could never fit, ENOSPC when the set as a whole no longer does (as on a
//! file system whose attribute block is full).
//!
//! A change goes through the file's open state like a chmod on an open file: it is journaled and uploaded (an
//! attribute-only change is a metadata copy in place, conditional on the ETag). Reading the set costs no request
//! while the attributes are fresh; a file with no set answers at once (the kernel asks for
//! `security.capability` before writes).
//!
//! A directory's set lives in its marker object's metadata under the same names; in the client-side modes the
//! marker carries a data key of its own (a header, as a file's object does) made when its first attribute is
//! set, which seals nothing but that set. A change rewrites the marker at once, conditional on its ETag. The
//! mount's root directory has no marker and takes no extended attributes (ENOTSUP), nor does anything take
//! `system.*` names (POSIX ACLs: the mount checks permissions from the mode bits only).
use super::codec::Codec;
use super::inode::{Kind, Remote, ROOT_INO};
use super::{Fs, FsError, FsResult};
use crate::format::ObjectHeader;
use crate::store::{Metadata, PutCondition, StoreError};
use base64::Engine;
use bytes::Bytes;
use std::collections::BTreeMap;

/// Name → value.
pub type Xattrs = BTreeMap<String, Vec<u8>>;

/// s3fs's metadata key for the attribute set (SSE modes).
pub const META_XATTR: &str = "xattr";
/// The sealed attribute set (client-side modes).
pub const META_XATTR_SEALED: &str = "s3crypt-xattr";
/// S3's limit on an object's user metadata, in bytes of keys and values.
pub const METADATA_LIMIT: usize = 2048;
/// Linux's limit on an attribute name (XATTR_NAME_MAX).
const NAME_MAX: usize = 255;

const XATTR_CREATE: i32 = libc::XATTR_CREATE;
const XATTR_REPLACE: i32 = libc::XATTR_REPLACE;

/// The metadata key of the attribute set for objects written with `codec`.
pub fn meta_key(codec: &Codec) -> &'static str {
    if codec.is_sealed() {
        META_XATTR_SEALED
    } else {
        META_XATTR
    }
}

/// The stored form of the attribute set (`None` for an empty set: no metadata entry).
pub fn encode(set: &Xattrs, codec: &Codec) -> Option<String> {
    if set.is_empty() {
        return None;
    }
    let json = to_json(set);
    Some(match codec {
        Codec::Plain { .. } => url_encode(&json),
        Codec::Sealed { cipher, .. } => {
            let sealed = cipher.seal_xattrs(json.as_bytes(), &mut rand::thread_rng());
            base64::engine::general_purpose::STANDARD.encode(sealed)
        }
    })
}

/// The attribute set from its stored form; `key` names the object in errors.
pub fn decode(stored: Option<&str>, codec: &Codec, key: &str) -> FsResult<Xattrs> {
    let Some(stored) = stored else {
        return Ok(Xattrs::new());
    };
    let bad = |why: &str| FsError::Format {
        key: key.to_string(),
        source: crate::format::FormatError::BadMetadata(format!("extended attributes: {why}")),
    };
    let json = match codec {
        Codec::Plain { .. } => url_decode(stored).ok_or_else(|| bad("bad URL encoding"))?,
        Codec::Sealed { cipher, .. } => {
            let sealed = base64::engine::general_purpose::STANDARD
                .decode(stored)
                .map_err(|_| bad("bad base64"))?;
            let plain = cipher.open_xattrs(&sealed).map_err(|source| {
                log::error!("{key}: extended attributes: {source}");
                FsError::Format {
                    key: key.to_string(),
                    source,
                }
            })?;
            String::from_utf8(plain).map_err(|_| bad("not UTF-8"))?
        }
    };
    from_json(&json).ok_or_else(|| bad("malformed set"))
}

/// `{"name":"base64(value)",...}`; `"` and `\` in names are escaped as in JSON.
fn to_json(set: &Xattrs) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut s = String::from("{");
    for (i, (name, value)) in set.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push('"');
        for c in name.chars() {
            if c == '"' || c == '\\' {
                s.push('\\');
            }
            s.push(c);
        }
        s.push_str("\":\"");
        s.push_str(&b64.encode(value));
        s.push('"');
    }
    s.push('}');
    s
}

fn from_json(s: &str) -> Option<Xattrs> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut chars = s.trim().strip_prefix('{')?.strip_suffix('}')?.chars().peekable();
    let mut set = Xattrs::new();
    let string = |chars: &mut std::iter::Peekable<std::str::Chars>| -> Option<String> {
        while chars.peek()?.is_whitespace() {
            chars.next();
        }
        if chars.next()? != '"' {
            return None;
        }
        let mut out = String::new();
        loop {
            match chars.next()? {
                '"' => return Some(out),
                '\\' => out.push(chars.next()?),
                c => out.push(c),
            }
        }
    };
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(set);
        }
        let name = string(&mut chars)?;
        while chars.peek()?.is_whitespace() {
            chars.next();
        }
        if chars.next()? != ':' {
            return None;
        }
        let value = string(&mut chars)?;
        set.insert(name, b64.decode(value.trim()).ok()?);
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn url_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Bytes of user metadata `meta` takes, as S3 counts them.
pub fn metadata_len(meta: &Metadata) -> usize {
    meta.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Checks a name a program asked to read: ERANGE for an empty or overlong one, before anything is fetched.
fn check_read_name(name: &str) -> FsResult<()> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(FsError::Range);
    }
    Ok(())
}

/// getxattr(2)'s answer for `name` from a file's attributes.
fn value_of(mut all: Xattrs, name: &str) -> FsResult<Vec<u8>> {
    all.remove(name).ok_or(FsError::NoAttribute)
}

impl super::write::FileState {
    /// The extended attributes of a file open here, from its state (which holds any change not yet in S3).
    fn xattrs(&self) -> FsResult<Xattrs> {
        decode(self.xattr.as_deref(), &self.codec, &self.key)
    }
}

/// Checks a name a program asked to set or remove.
fn check_name(name: &str) -> FsResult<()> {
    check_read_name(name)?;
    if name.starts_with("system.") {
        return Err(FsError::NotSupported("system.* extended attributes (POSIX ACLs)"));
    }
    Ok(())
}

/// What a setxattr or removexattr asks for.
pub enum XattrChange<'a> {
    Set { name: &'a str, value: &'a [u8], flags: i32 },
    Remove { name: &'a str },
}

impl XattrChange<'_> {
    /// Applies the change to `set`, with XATTR_CREATE / XATTR_REPLACE semantics.
    fn apply(&self, set: &mut Xattrs) -> FsResult<()> {
        match *self {
            XattrChange::Set { name, value, flags } => {
                let exists = set.contains_key(name);
                if flags & XATTR_CREATE != 0 && exists {
                    return Err(FsError::Exists);
                }
                if flags & XATTR_REPLACE != 0 && !exists {
                    return Err(FsError::NoAttribute);
                }
                set.insert(name.to_string(), value.to_vec());
            }
            XattrChange::Remove { name } => {
                set.remove(name).ok_or(FsError::NoAttribute)?;
            }
        }
        Ok(())
    }

    fn name(&self) -> &str {
        match self {
            XattrChange::Set { name, .. } | XattrChange::Remove { name } => name,
        }
    }
}

impl Fs {
    /// The value of one extended attribute.
    pub async fn getxattr(&self, ino: u64, name: &str) -> FsResult<Vec<u8>> {
        check_read_name(name)?;
        value_of(self.xattrs_of(ino).await?, name)
    }

    /// [`getxattr`](Self::getxattr) answered on the calling thread, without waiting, for a file open here whose
    /// state is free (`None` otherwise: take the async path). The kernel asks for `security.capability` before
    /// every write into a file (to drop file capabilities), so a write's cost is two requests; this keeps the
    /// second one as cheap as the write done inline (see [`write_inline`](Self::write_inline)).
    pub fn getxattr_inline(&self, ino: u64, name: &str) -> Option<FsResult<Vec<u8>>> {
        if let Err(e) = check_read_name(name) {
            return Some(Err(e));
        }
        let file = self.open_state(ino)?;
        let st = file.state.try_lock().ok()?;
        Some(st.xattrs().and_then(|all| value_of(all, name)))
    }

    /// The names of the extended attributes, each followed by a NUL (listxattr(2)'s form).
    pub async fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let mut out = Vec::new();
        for name in self.xattrs_of(ino).await?.keys() {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        }
        Ok(out)
    }

    /// setxattr(2) and removexattr(2): the change is journaled and uploaded before the reply.
    pub async fn change_xattr(&self, ino: u64, change: XattrChange<'_>) -> FsResult<()> {
        self.check_writable()?;
        check_name(change.name())?;
        if let XattrChange::Set { value, .. } = change {
            if value.len() > METADATA_LIMIT {
                return Err(FsError::TooBig(format!(
                    "an extended attribute value of {} bytes cannot fit S3's {METADATA_LIMIT} bytes of object metadata",
                    value.len()
                )));
            }
        }
        let attr = self.getattr(ino).await?;
        if attr.kind == Kind::Dir {
            return self.change_dir_xattr(ino, &change).await;
        }
        let file = self.acquire(ino).await?;
        let applied = self.apply_xattr_change(&file, &change).await;
        let saved = self.let_go(ino, &file, true).await;
        applied?;
        saved
    }

    async fn apply_xattr_change(&self, file: &super::write::OpenFile, change: &XattrChange<'_>) -> FsResult<()> {
        let mut st = file.state.lock().await;
        let mut set = st.xattrs()?;
        change.apply(&mut set)?;
        let stored = encode(&set, &st.codec);
        // What the next upload will send, with a token of the real length.
        let meta = st.object_metadata(stored.as_deref(), &super::journal::new_token());
        let len = metadata_len(&meta);
        if len > METADATA_LIMIT {
            return Err(FsError::NoSpace(format!(
                "{}: the extended attributes would take the object's metadata to {len} bytes; S3 allows \
                 {METADATA_LIMIT}",
                st.key
            )));
        }
        st.xattr = stored;
        st.attr.ctime = std::time::SystemTime::now();
        st.touch(false);
        self.ensure_journal(&mut st)?;
        st.save_manifest()
    }

    /// setxattr(2)/removexattr(2) on a directory: the set lives in the marker's metadata, sealed in the
    /// client-side modes with a data key of the marker's own (its header is in the marker, as a file's is). The
    /// marker is rewritten on the spot, conditional on the ETag it was read at (made if the directory had none:
    /// a directory can exist only as the prefix of its files), and read again if it changed meanwhile.
    async fn change_dir_xattr(&self, ino: u64, change: &XattrChange<'_>) -> FsResult<()> {
        if ino == ROOT_INO {
            return Err(FsError::NotSupported(
                "extended attributes on the mount's root directory",
            ));
        }
        let marker = self.dir_prefix(&self.path_of(ino)?);
        for _ in 0..3 {
            let head = match self.store.head(&marker).await {
                Ok(info) => Some(info),
                Err(StoreError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            };
            let mut attr = self.cached_attr(ino)?;
            attr.ctime = std::time::SystemTime::now();
            let mut meta = head.as_ref().map(|h| h.metadata.clone()).unwrap_or_default();
            super::inode::attr_to_metadata(&attr, &mut meta);
            let codec = match (&self.keys, ObjectHeader::from_metadata(&meta)) {
                (Some(_), Ok(None)) => {
                    let (codec, header) = self.new_codec().await?;
                    if let Some(h) = &header {
                        h.to_metadata(&mut meta);
                    }
                    codec
                }
                _ => self.codec_for(&marker, &meta).await?.0,
            };
            let name = meta_key(&codec);
            let mut set = decode(meta.get(name).map(String::as_str), &codec, &marker)?;
            change.apply(&mut set)?;
            match encode(&set, &codec) {
                Some(stored) => meta.insert(name.into(), stored),
                None => meta.remove(name),
            };
            let len = metadata_len(&meta);
            if len > METADATA_LIMIT {
                return Err(FsError::NoSpace(format!(
                    "{marker}: the extended attributes would take the directory marker's metadata to {len} \
                     bytes; S3 allows {METADATA_LIMIT}"
                )));
            }
            let cond = match &head {
                Some(h) => PutCondition::IfMatch(h.etag.clone()),
                None => PutCondition::IfNoneMatch,
            };
            match self.store.put(&marker, Bytes::new(), &meta, cond).await {
                Ok(info) => {
                    let mut t = super::lock(&self.inodes);
                    if let Some(n) = t.get_mut(ino) {
                        n.attr.ctime = attr.ctime;
                        n.remote = Some(Remote {
                            etag: info.etag,
                            object_size: 0,
                            metadata: meta,
                        });
                        n.refreshed = std::time::Instant::now();
                    }
                    return Ok(());
                }
                // Changed since the HEAD (a chmod, another client): read it again.
                Err(StoreError::PreconditionFailed(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(FsError::Store(StoreError::Transient(format!(
            "{marker}: the directory marker kept changing while its extended attributes were saved"
        ))))
    }

    /// The attribute set of an inode: an open file's own, else from the object's metadata as last seen (fresh
    /// within the metadata TTL).
    async fn xattrs_of(&self, ino: u64) -> FsResult<Xattrs> {
        if let Some(file) = self.open_state(ino) {
            return file.state.lock().await.xattrs();
        }
        let attr = self.getattr(ino).await?;
        let (key, meta) = {
            let t = super::lock(&self.inodes);
            let n = t.get(ino).ok_or(FsError::NotFound)?;
            let key = self.key_of(&n.path);
            (
                if attr.kind == Kind::Dir { format!("{key}/") } else { key },
                n.remote.as_ref().map(|r| r.metadata.clone()).unwrap_or_default(),
            )
        };
        if !meta.contains_key(META_XATTR) && !meta.contains_key(META_XATTR_SEALED) {
            return Ok(Xattrs::new());
        }
        let (codec, _) = self.codec_for(&key, &meta).await?;
        decode(meta.get(meta_key(&codec)).map(String::as_str), &codec, &key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{BlockCipher, BlockSize, DataKey};

    fn set() -> Xattrs {
        let mut s = Xattrs::new();
        s.insert("user.plain".into(), b"value".to_vec());
        s.insert("user.odd \"name\\".into(), vec![0, 1, 2, 255]);
        s.insert("security.selinux".into(), b"system_u:object_r:etc_t:s0\0".to_vec());
        s.insert("user.empty".into(), Vec::new());
        s
    }

    fn plain() -> Codec {
        Codec::Plain {
            bs: BlockSize::new(65536).unwrap(),
        }
    }

    fn sealed(key: u8, id: u8) -> Codec {
        Codec::Sealed {
            bs: BlockSize::new(65536).unwrap(),
            cipher: Box::new(BlockCipher::new(&DataKey::from_bytes([key; 32]), [id; 16])),
        }
    }

    #[test]
    fn round_trip_in_both_forms() {
        for codec in [plain(), sealed(1, 2)] {
            let stored = encode(&set(), &codec).unwrap();
            assert_eq!(decode(Some(&stored), &codec, "k").unwrap(), set());
        }
        assert_eq!(encode(&Xattrs::new(), &plain()), None);
        assert!(decode(None, &plain(), "k").unwrap().is_empty());
    }

    #[test]
    fn the_plain_form_is_s3fs_s() {
        let mut s = Xattrs::new();
        s.insert("user.a".into(), b"bar".to_vec());
        assert_eq!(encode(&s, &plain()).unwrap(), "%7B%22user.a%22%3A%22YmFy%22%7D");
        // What s3fs writes decodes, with its spacing and '+' for spaces.
        let from_s3fs = url_decode("%7B%22user.a%22%3A%22YmFy%22%2C%22user.b%22%3A%22%22%7D").unwrap();
        let got = from_json(&from_s3fs).unwrap();
        assert_eq!(got["user.a"], b"bar");
        assert_eq!(got["user.b"], b"");
    }

    #[test]
    fn the_sealed_form_hides_names_and_values_and_binds_the_file() {
        let stored = encode(&set(), &sealed(1, 2)).unwrap();
        for secret in ["user.plain", "selinux", "dmFsdWU", "value"] {
            assert!(!stored.contains(secret), "{secret} in clear");
        }
        // Another file id or another key does not open it.
        assert!(decode(Some(&stored), &sealed(1, 3), "k").is_err());
        assert!(decode(Some(&stored), &sealed(9, 2), "k").is_err());
        // A flipped character fails authentication, never a wrong set.
        let mut bad = stored.into_bytes();
        let mid = bad.len() / 2;
        bad[mid] = if bad[mid] == b'A' { b'B' } else { b'A' };
        assert!(decode(Some(std::str::from_utf8(&bad).unwrap()), &sealed(1, 2), "k").is_err());
    }

    #[test]
    fn create_and_replace_flags() {
        let mut s = Xattrs::new();
        let set = |name, flags| XattrChange::Set {
            name,
            value: b"v",
            flags,
        };
        assert!(matches!(
            set("user.a", XATTR_REPLACE).apply(&mut s),
            Err(FsError::NoAttribute)
        ));
        set("user.a", XATTR_CREATE).apply(&mut s).unwrap();
        assert!(matches!(
            set("user.a", XATTR_CREATE).apply(&mut s),
            Err(FsError::Exists)
        ));
        set("user.a", XATTR_REPLACE).apply(&mut s).unwrap();
        set("user.a", 0).apply(&mut s).unwrap();
        XattrChange::Remove { name: "user.a" }.apply(&mut s).unwrap();
        assert!(matches!(
            XattrChange::Remove { name: "user.a" }.apply(&mut s),
            Err(FsError::NoAttribute)
        ));
    }

    #[test]
    fn malformed_sets_are_errors_not_panics() {
        for bad in ["", "{", "{\"a\"}", "{\"a\":\"!!\"}", "{\"a\":1}", "%ZZ"] {
            assert!(decode(Some(bad), &plain(), "k").is_err(), "{bad}");
        }
    }
}
