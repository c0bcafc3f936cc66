//! The inode table: a map from inode numbers to paths and cached attributes.
//!
//! S3 has keys, not inodes. Each name the kernel looks up gets an inode number that stays the same for as long as
//! the kernel remembers it (until `forget`) or a file is open, so that open files survive renames. An inode
//! records its path relative to the mount root; a rename rewrites the paths of the renamed inode and of every
//! inode below it. Attributes are cached for the metadata TTL; an open file's own state is always fresher than
//! S3's and wins.
//!
//! POSIX attributes live in object metadata under the keys s3fs uses (`mode`, `uid`, `gid`, `mtime`, `atime`,
//! `ctime`, `rdev`), so a bucket in an SSE mode reads the same through s3fs and through s3crypt. Special files
//! (FIFOs, sockets, devices) are empty objects whose `mode` carries the file type.
//!
//! The table also remembers names that a lookup did not find (a negative cache, valid for the metadata TTL):
//! shells, compilers and interpreters probe many names that do not exist, and each miss would otherwise cost a
//! HEAD and a LIST.
use crate::store::Metadata;
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const ROOT_INO: u64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    /// A character device with its device number in the kernel's encoding (`makedev`).
    CharDev(u32),
    /// A block device with its device number in the kernel's encoding (`makedev`).
    BlockDev(u32),
}

impl Kind {
    /// FIFOs, sockets and devices: stored as empty objects, never opened by the daemon (the kernel handles them).
    pub fn is_special(self) -> bool {
        matches!(self, Kind::Fifo | Kind::Socket | Kind::CharDev(_) | Kind::BlockDev(_))
    }

    /// The device number `stat` shows (0 for everything but devices).
    pub fn rdev(self) -> u32 {
        match self {
            Kind::CharDev(d) | Kind::BlockDev(d) => d,
            Kind::File | Kind::Dir | Kind::Symlink | Kind::Fifo | Kind::Socket => 0,
        }
    }

    /// The kind a `mknod(2)` of `mode` asks for, if it is a special file.
    pub fn special_from_mode(mode: u32, rdev: u32) -> Option<Kind> {
        match mode & libc::S_IFMT {
            t if t == libc::S_IFIFO => Some(Kind::Fifo),
            t if t == libc::S_IFSOCK => Some(Kind::Socket),
            t if t == libc::S_IFCHR => Some(Kind::CharDev(rdev)),
            t if t == libc::S_IFBLK => Some(Kind::BlockDev(rdev)),
            _ => None,
        }
    }

    /// Same kind of node, ignoring a device number (a lookup that finds a device keeps its inode).
    fn same_type(self, other: Kind) -> bool {
        std::mem::discriminant(&self) == std::mem::discriminant(&other)
    }
}

/// Attributes as the kernel sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    /// Plaintext size in bytes.
    pub size: u64,
    /// Permission bits only (no file-type bits).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    /// Changed only by utimensat(2): reads do not write to S3 (as with `noatime`).
    pub atime: SystemTime,
    /// The last change of content or attributes.
    pub ctime: SystemTime,
    /// An open file whose name is gone (unlinked, or replaced by a rename): its link count is 0.
    pub unlinked: bool,
}

impl Attr {
    /// Attributes of a node made here, now (the inode number is set when it enters the table).
    pub fn made_now(kind: Kind, size: u64, perm: u16, uid: u32, gid: u32) -> Attr {
        let now = SystemTime::now();
        Attr {
            ino: 0,
            kind,
            size,
            perm,
            uid,
            gid,
            mtime: now,
            atime: now,
            ctime: now,
            unlinked: false,
        }
    }
}

/// What S3 said about the object behind a file or symlink, from a HEAD or a completed upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub etag: String,
    /// Size of the object body (ciphertext in the client-side modes).
    pub object_size: u64,
    pub metadata: Metadata,
}

#[derive(Debug)]
pub struct Inode {
    pub ino: u64,
    pub parent: u64,
    pub name: String,
    /// Path relative to the mount root: "" for the root, "a/b" below it.
    pub path: String,
    pub attr: Attr,
    pub remote: Option<Remote>,
    /// When `attr` was last read from S3.
    pub refreshed: Instant,
    pub lookups: u64,
    /// Open handles on this inode.
    pub open_count: u64,
    /// Has data here that S3 does not have yet (created here, or changed and not yet uploaded): listings must
    /// show it, and the inode stays while the upload is retried.
    pub pending: bool,
}

/// Defaults for attributes that S3 objects do not carry.
#[derive(Clone, Copy, Debug)]
pub struct AttrDefaults {
    pub uid: u32,
    pub gid: u32,
    pub file_perm: u16,
    pub dir_perm: u16,
}

impl AttrDefaults {
    pub fn new(uid: u32, gid: u32, umask: u32) -> Self {
        AttrDefaults {
            uid,
            gid,
            file_perm: (0o666 & !umask) as u16,
            dir_perm: (0o777 & !umask) as u16,
        }
    }
}

pub const META_MODE: &str = "mode";
pub const META_UID: &str = "uid";
pub const META_GID: &str = "gid";
pub const META_MTIME: &str = "mtime";
pub const META_ATIME: &str = "atime";
pub const META_CTIME: &str = "ctime";
/// The device number of a device node, decimal, in the kernel's encoding (as s3fs stores it).
pub const META_RDEV: &str = "rdev";

/// The file-type bits s3fs stores in `mode`.
pub fn type_bits(kind: Kind) -> u32 {
    match kind {
        Kind::File => libc::S_IFREG,
        Kind::Dir => libc::S_IFDIR,
        Kind::Symlink => libc::S_IFLNK,
        Kind::Fifo => libc::S_IFIFO,
        Kind::Socket => libc::S_IFSOCK,
        Kind::CharDev(_) => libc::S_IFCHR,
        Kind::BlockDev(_) => libc::S_IFBLK,
    }
}

/// Reads kind and POSIX attributes from object metadata; `fallback_kind` and the defaults fill what is missing.
pub fn attr_from_metadata(
    ino: u64,
    fallback_kind: Kind,
    size: u64,
    last_modified: Option<SystemTime>,
    meta: &Metadata,
    d: &AttrDefaults,
) -> Attr {
    let mode: Option<u32> = meta.get(META_MODE).and_then(|m| m.trim().parse().ok());
    let rdev: u32 = meta.get(META_RDEV).and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let kind = match mode.map(|m| m & libc::S_IFMT) {
        Some(t) if t == libc::S_IFLNK => Kind::Symlink,
        Some(t) if t == libc::S_IFDIR => Kind::Dir,
        // A special file is an object like any file; only a name that is a file may turn out to be one.
        Some(_) if fallback_kind == Kind::File => {
            Kind::special_from_mode(mode.unwrap_or(0), rdev).unwrap_or(Kind::File)
        }
        _ => fallback_kind,
    };
    let perm = match (mode, kind) {
        (Some(m), _) => (m & 0o7777) as u16,
        (None, Kind::Dir) => d.dir_perm,
        (None, Kind::Symlink) => 0o777,
        (None, _) => d.file_perm,
    };
    let time = |k: &str| meta.get(k).and_then(|s| parse_time(s));
    let mtime = time(META_MTIME).or(last_modified).unwrap_or(UNIX_EPOCH);
    Attr {
        ino,
        kind,
        size,
        perm,
        uid: meta.get(META_UID).and_then(|s| s.trim().parse().ok()).unwrap_or(d.uid),
        gid: meta.get(META_GID).and_then(|s| s.trim().parse().ok()).unwrap_or(d.gid),
        mtime,
        atime: time(META_ATIME).unwrap_or(mtime),
        ctime: time(META_CTIME).unwrap_or(mtime),
        unlinked: false,
    }
}

/// A time as s3fs writes it: seconds since the epoch, optionally with a fraction.
fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: u64 = secs.parse().ok()?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        let scale = 10u32.pow(9 - digits.len() as u32);
        digits.parse::<u32>().ok()? * scale
    };
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Writes the POSIX attributes into object metadata (s3fs's keys).
pub fn attr_to_metadata(attr: &Attr, meta: &mut Metadata) {
    meta.insert(
        META_MODE.into(),
        (type_bits(attr.kind) | u32::from(attr.perm)).to_string(),
    );
    meta.insert(META_UID.into(), attr.uid.to_string());
    meta.insert(META_GID.into(), attr.gid.to_string());
    meta.insert(META_MTIME.into(), format_time(attr.mtime));
    meta.insert(META_ATIME.into(), format_time(attr.atime));
    meta.insert(META_CTIME.into(), format_time(attr.ctime));
    match attr.kind {
        Kind::CharDev(d) | Kind::BlockDev(d) => {
            meta.insert(META_RDEV.into(), d.to_string());
        }
        Kind::File | Kind::Dir | Kind::Symlink | Kind::Fifo | Kind::Socket => {
            meta.remove(META_RDEV);
        }
    }
}

/// Seconds since the epoch, with a 9-digit fraction when there is one (s3fs reads both; times before 1970 are
/// stored as 0).
pub fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
    }
}

/// Checks one path component.
pub fn check_name(name: &str) -> Result<(), super::FsError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(super::FsError::InvalidName);
    }
    if name.len() > 255 {
        return Err(super::FsError::NameTooLong);
    }
    Ok(())
}

pub fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

/// The most names the negative cache holds; past it the cache starts again empty, so its memory stays bounded
/// whatever a program probes.
const NEGATIVE_CAP: usize = 16_384;

pub struct InodeTable {
    inodes: HashMap<u64, Inode>,
    children: HashMap<(u64, String), u64>,
    /// Names a lookup did not find, and when.
    negative: HashMap<(u64, String), Instant>,
    next_ino: u64,
}

impl InodeTable {
    pub fn new(root_attr: Attr) -> Self {
        let mut inodes = HashMap::new();
        inodes.insert(
            ROOT_INO,
            Inode {
                ino: ROOT_INO,
                parent: ROOT_INO,
                name: String::new(),
                path: String::new(),
                attr: root_attr,
                remote: None,
                refreshed: Instant::now(),
                lookups: 1,
                open_count: 0,
                pending: false,
            },
        );
        InodeTable {
            inodes,
            children: HashMap::new(),
            negative: HashMap::new(),
            next_ino: ROOT_INO + 1,
        }
    }

    /// Records that `name` is not in `parent` (S3 and this mount have nothing by that name).
    pub fn note_missing(&mut self, parent: u64, name: &str) {
        if self.negative.len() >= NEGATIVE_CAP {
            self.negative.clear();
        }
        self.negative.insert((parent, name.to_string()), Instant::now());
    }

    /// Whether a lookup of `name` in `parent` found nothing less than `ttl` ago.
    pub fn known_missing(&self, parent: u64, name: &str, ttl: Duration) -> bool {
        self.negative
            .get(&(parent, name.to_string()))
            .is_some_and(|t| t.elapsed() < ttl)
    }

    /// Forgets a miss: the name exists now (or may, after a failed operation).
    pub fn forget_missing(&mut self, parent: u64, name: &str) {
        self.negative.remove(&(parent, name.to_string()));
    }

    /// An entry of directory `ino` was created, removed or renamed here: its mtime and ctime are now. Kept in
    /// memory only (persisting them would cost a PUT of the directory marker per change).
    pub fn touch_dir(&mut self, ino: u64) {
        if let Some(n) = self.inodes.get_mut(&ino) {
            let now = SystemTime::now();
            n.attr.mtime = now;
            n.attr.ctime = now;
        }
    }

    pub fn get(&self, ino: u64) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Inode> {
        self.inodes.get_mut(&ino)
    }

    pub fn child(&self, parent: u64, name: &str) -> Option<&Inode> {
        self.children
            .get(&(parent, name.to_string()))
            .and_then(|i| self.inodes.get(i))
    }

    /// Records what a lookup found: keeps the inode number if the kind is unchanged, else makes a new inode.
    /// Returns the inode number. `bump` counts one kernel lookup reference.
    pub fn upsert(
        &mut self,
        parent: u64,
        name: &str,
        mut attr: Attr,
        remote: Option<Remote>,
        bump: bool,
    ) -> Option<u64> {
        let parent_path = self.inodes.get(&parent)?.path.clone();
        let key = (parent, name.to_string());
        self.negative.remove(&key);
        if let Some(&ino) = self.children.get(&key) {
            let node = self.inodes.get_mut(&ino)?;
            if node.attr.kind.same_type(attr.kind) {
                if attr.kind == Kind::Dir {
                    // A directory's times from changes made here are newer than its marker's.
                    attr.mtime = attr.mtime.max(node.attr.mtime);
                    attr.ctime = attr.ctime.max(node.attr.ctime);
                }
                attr.ino = ino;
                node.attr = attr;
                node.remote = remote;
                node.refreshed = Instant::now();
                node.pending = false;
                if bump {
                    node.lookups += 1;
                }
                return Some(ino);
            }
            self.detach(ino);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        attr.ino = ino;
        self.inodes.insert(
            ino,
            Inode {
                ino,
                parent,
                name: name.to_string(),
                path: join(&parent_path, name),
                attr,
                remote,
                refreshed: Instant::now(),
                lookups: u64::from(bump),
                open_count: 0,
                pending: false,
            },
        );
        self.children.insert(key, ino);
        Some(ino)
    }

    /// Removes a name from its directory; the inode itself lives on while the kernel or an open handle holds it.
    pub fn detach(&mut self, ino: u64) {
        let Some(node) = self.inodes.get(&ino) else { return };
        let key = (node.parent, node.name.clone());
        if self.children.get(&key) == Some(&ino) {
            self.children.remove(&key);
        }
        self.maybe_drop(ino);
    }

    /// Forgets `n` kernel references.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        self.maybe_drop(ino);
    }

    fn maybe_drop(&mut self, ino: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(node) = self.inodes.get(&ino) else { return };
        if node.lookups > 0 || node.open_count > 0 || node.pending {
            return;
        }
        let key = (node.parent, node.name.clone());
        if self.children.get(&key) == Some(&ino) {
            // Still named and nobody holds it: keep the name mapping out of the table too.
            self.children.remove(&key);
        }
        self.inodes.remove(&ino);
    }

    /// Moves `ino` to (`new_parent`, `new_name`), replacing whatever had that name, and rewrites the paths of
    /// everything below it.
    pub fn rename(&mut self, ino: u64, new_parent: u64, new_name: &str) {
        let Some(parent_path) = self.inodes.get(&new_parent).map(|p| p.path.clone()) else {
            return;
        };
        self.negative.remove(&(new_parent, new_name.to_string()));
        if let Some(&old) = self.children.get(&(new_parent, new_name.to_string())) {
            if old != ino {
                self.detach(old);
            }
        }
        let Some(node) = self.inodes.get(&ino) else { return };
        let old_key = (node.parent, node.name.clone());
        let old_path = node.path.clone();
        if self.children.get(&old_key) == Some(&ino) {
            self.children.remove(&old_key);
        }
        let new_path = join(&parent_path, new_name);
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.parent = new_parent;
            node.name = new_name.to_string();
            node.path = new_path.clone();
        }
        self.children.insert((new_parent, new_name.to_string()), ino);
        let below = format!("{old_path}/");
        for n in self.inodes.values_mut() {
            if let Some(rest) = n.path.strip_prefix(&below) {
                n.path = format!("{new_path}/{rest}");
            }
        }
    }

    /// Every name this table knows directly in directory `parent` (what a listing can show when S3 cannot be
    /// reached).
    pub fn children_of(&self, parent: u64) -> Vec<(String, Kind)> {
        self.children
            .iter()
            .filter(|((p, _), _)| *p == parent)
            .filter_map(|((_, name), ino)| self.inodes.get(ino).map(|n| (name.clone(), n.attr.kind)))
            .collect()
    }

    /// Inodes created here and not yet uploaded, directly in directory `parent`.
    pub fn pending_children(&self, parent: u64) -> Vec<(String, Attr)> {
        self.inodes
            .values()
            .filter(|n| n.parent == parent && n.pending && n.ino != ROOT_INO)
            .filter(|n| self.children.get(&(n.parent, n.name.clone())) == Some(&n.ino))
            .map(|n| (n.name.clone(), n.attr.clone()))
            .collect()
    }

    pub fn is_fresh(&self, ino: u64, ttl: Duration) -> bool {
        self.inodes.get(&ino).is_some_and(|n| n.refreshed.elapsed() < ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: Kind) -> Attr {
        Attr {
            ino: 0,
            kind,
            size: 0,
            perm: 0o644,
            uid: 0,
            gid: 0,
            mtime: UNIX_EPOCH,
            atime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            unlinked: false,
        }
    }

    #[test]
    fn rename_rewrites_paths_below() {
        let mut t = InodeTable::new(attr(Kind::Dir));
        let a = t.upsert(ROOT_INO, "a", attr(Kind::Dir), None, true).unwrap();
        let b = t.upsert(a, "b", attr(Kind::Dir), None, true).unwrap();
        let c = t.upsert(b, "c", attr(Kind::File), None, true).unwrap();
        t.rename(a, ROOT_INO, "z");
        assert_eq!(t.get(c).unwrap().path, "z/b/c");
        assert_eq!(t.child(ROOT_INO, "z").unwrap().ino, a);
        assert!(t.child(ROOT_INO, "a").is_none());
    }

    #[test]
    fn same_kind_keeps_inode_number_and_kind_change_does_not() {
        let mut t = InodeTable::new(attr(Kind::Dir));
        let a = t.upsert(ROOT_INO, "a", attr(Kind::File), None, true).unwrap();
        assert_eq!(t.upsert(ROOT_INO, "a", attr(Kind::File), None, true), Some(a));
        let d = t.upsert(ROOT_INO, "a", attr(Kind::Dir), None, true).unwrap();
        assert_ne!(a, d);
    }

    #[test]
    fn metadata_round_trip_in_s3fs_keys() {
        let d = AttrDefaults::new(1, 2, 0o022);
        let a = Attr {
            ino: 5,
            kind: Kind::Symlink,
            size: 3,
            perm: 0o777,
            uid: 10,
            gid: 20,
            mtime: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            atime: UNIX_EPOCH + Duration::new(1_600_000_000, 5),
            ctime: UNIX_EPOCH + Duration::new(1_700_000_001, 123_456_789),
            unlinked: false,
        };
        let mut m = Metadata::new();
        attr_to_metadata(&a, &mut m);
        assert_eq!(m["mode"], (libc::S_IFLNK | 0o777).to_string());
        assert_eq!(m["mtime"], "1700000000");
        assert_eq!(m["atime"], "1600000000.000000005");
        assert_eq!(m["ctime"], "1700000001.123456789");
        let back = attr_from_metadata(5, Kind::File, 3, None, &m, &d);
        assert_eq!(back, a);
        let plain = attr_from_metadata(6, Kind::File, 0, None, &Metadata::new(), &d);
        assert_eq!((plain.perm, plain.uid, plain.gid), (0o644, 1, 2));
    }

    #[test]
    fn special_files_round_trip_with_type_and_rdev() {
        let d = AttrDefaults::new(0, 0, 0o022);
        for kind in [Kind::Fifo, Kind::Socket, Kind::CharDev(0x0103), Kind::BlockDev(0x0801)] {
            let mut a = attr(kind);
            a.perm = 0o640;
            let mut m = Metadata::new();
            attr_to_metadata(&a, &mut m);
            assert_eq!(m.contains_key("rdev"), kind.rdev() != 0, "{kind:?}");
            assert_eq!(attr_from_metadata(0, Kind::File, 0, None, &m, &d), a, "{kind:?}");
            // A directory marker never turns into a special file, whatever its metadata says.
            assert_eq!(attr_from_metadata(0, Kind::Dir, 0, None, &m, &d).kind, Kind::Dir);
        }
        // s3fs's encoding: mode with the type bits, rdev in decimal.
        let mut m = Metadata::new();
        m.insert("mode".into(), (libc::S_IFCHR | 0o600).to_string());
        m.insert("rdev".into(), "259".into());
        assert_eq!(
            attr_from_metadata(0, Kind::File, 0, None, &m, &d).kind,
            Kind::CharDev(259)
        );
    }

    #[test]
    fn times_without_atime_or_ctime_fall_back_to_mtime() {
        let d = AttrDefaults::new(0, 0, 0o022);
        let mut m = Metadata::new();
        m.insert("mtime".into(), "1700000000.5".into());
        let a = attr_from_metadata(0, Kind::File, 0, None, &m, &d);
        assert_eq!(a.mtime, UNIX_EPOCH + Duration::from_millis(1_700_000_000_500));
        assert_eq!((a.atime, a.ctime), (a.mtime, a.mtime));
    }

    #[test]
    fn negative_cache_expires_is_cleared_by_a_new_name_and_stays_bounded() {
        let mut t = InodeTable::new(attr(Kind::Dir));
        t.note_missing(ROOT_INO, "x");
        assert!(t.known_missing(ROOT_INO, "x", Duration::from_secs(1)));
        assert!(!t.known_missing(ROOT_INO, "x", Duration::ZERO));
        t.upsert(ROOT_INO, "x", attr(Kind::File), None, true);
        assert!(!t.known_missing(ROOT_INO, "x", Duration::from_secs(1)));
        for i in 0..NEGATIVE_CAP + 10 {
            t.note_missing(ROOT_INO, &i.to_string());
        }
        assert!(t.negative.len() <= NEGATIVE_CAP);
    }

    #[test]
    fn names() {
        assert!(check_name("ok").is_ok());
        for bad in ["", ".", "..", "a/b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            check_name(&"x".repeat(256)),
            Err(super::super::FsError::NameTooLong)
        ));
    }
}
