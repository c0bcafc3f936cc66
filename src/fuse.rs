//! The thin `fuser::Filesystem` adapter.
//!
//! Each callback moves its `Reply*` into a task on the tokio runtime, calls the asynchronous core and answers
//! with the result or the error's errno: exactly one answer per request on every path, and no callback blocks
//! a FUSE thread on S3. A read, write or getxattr that waits for nothing but memory or the local journal is
//! answered on the FUSE thread itself (`Fs::read_inline`, `Fs::write_inline`, `Fs::getxattr_inline`). Directory listings are taken once at `opendir` and served by offset from the handle.
use crate::fs::{Attr, Fs, FsError, InlineWrite, Kind, WriteData};
use crate::metrics::Metrics;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Largest read and write request the kernel may send (the kernel's limit is 256 pages).
const MAX_IO: u32 = 1024 * 1024;

/// Directory listings taken at opendir, by directory handle: (inode, type, name) per entry.
type DirListings = Arc<Mutex<HashMap<u64, Vec<(u64, FileType, String)>>>>;

pub struct FuseAdapter {
    fs: Arc<Fs>,
    rt: tokio::runtime::Handle,
    ttl: Duration,
    dirs: DirListings,
    next_dir: AtomicU64,
    metrics: Arc<Metrics>,
    /// FUSE threads doing a write inline now, and how many may at once (see [`FuseAdapter::write`]).
    inline: AtomicUsize,
    max_inline: usize,
    /// The kernel left clearing set-user-ID and set-group-ID bits on write, truncate and chown to the mount
    /// (`FUSE_HANDLE_KILLPRIV_V2`, see [`FuseAdapter::init`]).
    kills_set_id: bool,
}

impl FuseAdapter {
    /// `threads`: how many threads serve the session's requests.
    pub fn new(fs: Arc<Fs>, rt: tokio::runtime::Handle, metrics: Arc<Metrics>, threads: usize) -> Self {
        let ttl = fs.metadata_ttl();
        FuseAdapter {
            fs,
            rt,
            ttl,
            metrics,
            dirs: Arc::new(Mutex::new(HashMap::new())),
            next_dir: AtomicU64::new(1),
            inline: AtomicUsize::new(0),
            // Half of them at most: a write inline may wait on the local disk (the kernel throttling its dirty
            // pages), and the other threads keep answering reads, lookups and writes of the async path meanwhile.
            max_inline: threads / 2,
            kills_set_id: false,
        }
    }

    /// Takes one of the slots for a write done on a FUSE thread, if one is free.
    fn inline_slot(&self) -> Option<InlineSlot<'_>> {
        let taken = self.inline.fetch_add(1, Ordering::AcqRel);
        let slot = InlineSlot(&self.inline);
        (taken < self.max_inline).then_some(slot)
    }
}

/// A slot of [`FuseAdapter::inline`], given back when dropped.
struct InlineSlot<'a>(&'a AtomicUsize);

impl Drop for InlineSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn errno(e: &FsError) -> Errno {
    let n = e.errno();
    match n {
        // What programs ask and expect to be told no (ENODATA: `ls -l` and writes query xattrs most files lack).
        libc::ENOENT
        | libc::EEXIST
        | libc::ENOTEMPTY
        | libc::ENOTDIR
        | libc::EISDIR
        | libc::ENODATA
        | libc::ERANGE
        | libc::ENOTSUP
        | libc::ENAMETOOLONG => {
            log::debug!("{e}")
        }
        _ => log::warn!("{e}"),
    }
    Errno::from_i32(n)
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev(_) => FileType::CharDevice,
        Kind::BlockDev(_) => FileType::BlockDevice,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: match (a.kind, a.unlinked) {
            (_, true) => 0,
            (Kind::Dir, false) => 2,
            _ => 1,
        },
        uid: a.uid,
        gid: a.gid,
        rdev: a.kind.rdev(),
        blksize: 64 * 1024,
        flags: 0,
    }
}

/// getxattr/listxattr's reply: the size when asked for it (`size` 0), the bytes when they fit, else ERANGE.
fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if value.len() <= size as usize {
        reply.data(value)
    } else {
        reply.error(Errno::ERANGE)
    }
}

fn name_str(name: &OsStr) -> Result<String, Errno> {
    name.to_str().map(str::to_string).ok_or(Errno::EINVAL)
}

/// Whether the thread `pid` (as the request names it) holds CAP_FSETID, and so keeps a file's set-user-ID bits
/// when it truncates it, read from its effective capabilities in /proc. The kernel asks `capable()`, in the
/// initial user namespace and with the credentials the caller acts with; /proc shows the thread's own, in its own
/// namespace. So a caller in another user namespace than the daemon's (root in a container) is taken as one
/// without it, as is one that cannot be read (gone, or in another PID namespace: pid 0): the bits are dropped,
/// the safe way to err. What remains: a kernel service acting for someone else with borrowed credentials is
/// judged by its own.
fn may_keep_set_id(pid: u32) -> bool {
    const CAP_FSETID: u32 = 4;
    if pid == 0 {
        return false;
    }
    let user_ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
    match (user_ns(&pid.to_string()), user_ns("self")) {
        (Some(theirs), Some(ours)) if theirs == ours => {}
        _ => return false,
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_FSETID) != 0)
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

/// Listing entries a READDIRPLUS reply looks at, at most (a reply of a few pages holds fewer).
const PLUS_WINDOW: usize = 512;

/// A stable, non-zero stand-in inode number for listed names the kernel has not looked up yet.
fn placeholder_ino(parent: u64, name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (parent, name).hash(&mut h);
    h.finish() | (1 << 63)
}

/// Answers a request with `$result` (the value through `$done`, or the errno) and records its operation name
/// `$op`, outcome and time since `$started` in the metrics.
macro_rules! answer {
    ($metrics:expr, $op:literal, $started:expr, $reply:ident, $result:expr, |$ok:ident| $done:expr) => {{
        let result = $result;
        $metrics.fuse_request($op, result.is_ok(), $started.elapsed());
        match result {
            Ok($ok) => $done,
            Err(e) => $reply.error(errno(&e)),
        }
    }};
}

/// Runs one request on tokio: calls the core and [`answer!`]s with its result.
macro_rules! run {
    ($self:ident, $op:literal, $reply:ident, |$fs:ident| $body:expr, |$ok:ident| $done:expr) => {{
        let $fs = $self.fs.clone();
        let metrics = $self.metrics.clone();
        let started = std::time::Instant::now();
        $self
            .rt
            .spawn(async move { answer!(metrics, $op, started, $reply, $body.await, |$ok| $done) });
    }};
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // READDIRPLUS where the kernel has it, in its adaptive form: the first reply of a directory, and the
        // replies of a directory whose entries are being looked up (`ls -l`), are READDIRPLUS; the rest plain.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO)
        {
            log::debug!("the kernel lacks {missing:?}: plain READDIR only");
        }
        // The mount clears set-user-ID and set-group-ID bits on write, truncate and chown itself (the kernel says
        // when, see `write` and `setattr`). Without it the kernel asks for `security.capability` before every
        // write, a round trip of its own: small writes are about a third slower. (FUSE_ATOMIC_O_TRUNC must stay
        // off with it: the kernel would then say so for an open with O_TRUNC in `open_flags`, which the FUSE
        // library does not pass on. Without it, O_TRUNC comes as a setattr with a size.)
        match config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2) {
            Ok(()) => self.kills_set_id = true,
            Err(missing) => log::debug!("the kernel lacks {missing:?}: it clears set-ID bits itself"),
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let ttl = self.ttl;
        run!(self, "lookup", reply, |fs| fs.lookup(parent.0, &name), |a| reply.entry(
            &ttl,
            &file_attr(&a),
            Generation(0)
        ))
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.ttl;
        run!(self, "getattr", reply, |fs| fs.getattr(ino.0), |a| reply
            .attr(&ttl, &file_attr(&a)))
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = crate::fs::AttrChange {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            mtime: mtime.map(time),
            atime: atime.map(time),
            // What the kernel's FATTR_KILL_SUIDGID would say (the FUSE library does not pass it on): every chown,
            // and a truncate by a caller without CAP_FSETID.
            kill_set_id: self.kills_set_id
                && (uid.is_some() || gid.is_some() || (size.is_some() && !may_keep_set_id(req.pid()))),
        };
        let ttl = self.ttl;
        run!(self, "setattr", reply, |fs| fs.setattr(ino.0, size, change), |a| reply
            .attr(&ttl, &file_attr(&a)))
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        run!(self, "readlink", reply, |fs| fs.readlink(ino.0), |d| reply.data(&d))
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let (uid, gid, ttl) = (req.uid(), req.gid(), self.ttl);
        let perm = (mode & !umask & 0o7777) as u16;
        run!(
            self,
            "mkdir",
            reply,
            |fs| fs.mkdir(parent.0, &name, perm, uid, gid),
            |a| reply.entry(&ttl, &file_attr(&a), Generation(0))
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        run!(self, "unlink", reply, |fs| fs.unlink(parent.0, &name), |_u| reply.ok())
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        run!(self, "rmdir", reply, |fs| fs.rmdir(parent.0, &name), |_u| reply.ok())
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (name, target) = match (name_str(link_name), target.to_str()) {
            (Ok(n), Some(t)) => (n, t.to_string()),
            _ => return reply.error(Errno::EINVAL),
        };
        let (uid, gid, ttl) = (req.uid(), req.gid(), self.ttl);
        run!(
            self,
            "symlink",
            reply,
            |fs| fs.symlink(parent.0, &name, &target, uid, gid),
            |a| { reply.entry(&ttl, &file_attr(&a), Generation(0)) }
        )
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let (uid, gid, ttl) = (req.uid(), req.gid(), self.ttl);
        let perm = (mode & !umask & 0o7777) as u16;
        if mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0 {
            // mknod(2) of a regular file: an empty file, uploaded before the reply.
            return run!(
                self,
                "mknod",
                reply,
                |fs| async {
                    let (a, fh) = fs.create(parent.0, &name, perm, uid, gid).await?;
                    fs.release(fh).await.map(|()| a)
                },
                |a| reply.entry(&ttl, &file_attr(&a), Generation(0))
            );
        }
        let Some(kind) = Kind::special_from_mode(mode, rdev) else {
            return reply.error(Errno::EINVAL);
        };
        run!(
            self,
            "mknod",
            reply,
            |fs| fs.mknod(parent.0, &name, kind, perm, uid, gid),
            |a| reply.entry(&ttl, &file_attr(&a), Generation(0))
        )
    }

    /// Hard links are not supported: an S3 object has exactly one key, so two names cannot share one file's
    /// content and changes. EPERM is what link(2) returns on file systems without hard links.
    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        log::debug!("link: hard links are not supported");
        self.metrics.fuse_request("link", false, std::time::Duration::ZERO);
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = match (name_str(name), name_str(newname)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return reply.error(Errno::EINVAL),
        };
        let bits = flags.bits();
        if bits & libc::RENAME_EXCHANGE != 0 || bits & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let no_replace = bits & libc::RENAME_NOREPLACE != 0;
        run!(
            self,
            "rename",
            reply,
            |fs| fs.rename(parent.0, &name, newparent.0, &newname, no_replace),
            |_u| reply.ok()
        )
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let acc = flags.0 & libc::O_ACCMODE;
        let writable = acc != libc::O_RDONLY;
        let truncate = flags.0 & libc::O_TRUNC != 0;
        run!(self, "open", reply, |fs| fs.open(ino.0, writable, truncate), |fh| reply
            .opened(FileHandle(fh), FopenFlags::empty()))
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Data at hand (cached, or read ahead and fetched) is answered here, on this FUSE thread: see
        // `Fs::read_inline`. The rest goes to the async workers.
        let started = std::time::Instant::now();
        let inline = {
            let _rt = self.rt.enter();
            self.fs.read_inline(fh.0, offset, size)
        };
        if let Some(result) = inline {
            return answer!(self.metrics, "read", started, reply, result, |d| reply.data(&d));
        }
        run!(self, "read", reply, |fs| fs.read(fh.0, offset, size), |d| reply
            .data(&d))
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The one copy of the request's bytes, cut at the mount's block boundaries (see `WriteData`).
        let kill = self.kills_set_id && write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let mut data = WriteData::cut(data, offset, self.fs.config().block_size).killing_set_id(kill.then_some(ino.0));
        // A write that waits for nothing but the local disk is done here, on this FUSE thread: see
        // `Fs::write_inline`. The rest (and a writer to be held) goes to the async workers.
        if let Some(_slot) = self.inline_slot() {
            let started = std::time::Instant::now();
            let _rt = self.rt.enter();
            match self.fs.write_inline(fh.0, offset, data) {
                Ok(InlineWrite::Done(result)) => {
                    return answer!(self.metrics, "write", started, reply, result, |n| reply.written(n));
                }
                Ok(InlineWrite::Held(held)) => {
                    return run!(self, "write", reply, |fs| fs.hold(held), |n| reply.written(n));
                }
                Err(back) => data = back,
            }
        }
        run!(self, "write", reply, |fs| fs.write_data(fh.0, offset, data), |n| reply
            .written(n))
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        run!(self, "flush", reply, |fs| fs.flush(fh.0), |_u| reply.ok())
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        run!(self, "release", reply, |fs| fs.release(fh.0), |_u| reply.ok())
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        run!(self, "fsync", reply, |fs| fs.flush(fh.0), |_u| reply.ok())
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let dirs = self.dirs.clone();
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        run!(self, "opendir", reply, |fs| fs.opendir(ino.0, fh), |entries| {
            let mut list = vec![
                (ino.0, FileType::Directory, ".".to_string()),
                (ino.0, FileType::Directory, "..".to_string()),
            ];
            list.extend(entries.into_iter().map(|e| {
                let n = if e.ino == 0 {
                    placeholder_ino(ino.0, &e.name)
                } else {
                    e.ino
                };
                (n, file_type(e.kind), e.name)
            }));
            dirs.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, list);
            reply.opened(FileHandle(fh), FopenFlags::empty())
        })
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = dirs.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, kind, name)) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    /// Entries with their attributes, for the names whose attributes are known without a request (fresh in the
    /// inode table, or from the directory's attribute index, read here for a directory's first reply). The reply
    /// stops before the first name that is not known (the kernel asks again from there, and looks that name up),
    /// so that `find` and plain `ls` never wait for a HEAD; only a reply that would otherwise be empty (which
    /// means the end of the directory) looks its first name up. An entry with inode 0 would spare that, but
    /// shows as d_ino 0, which some programs (bash's globbing) skip as a deleted entry.
    ///
    /// Each entry sent counts as a kernel lookup of its inode, except "." and "..", which the kernel does not
    /// link; an entry that does not fit the reply is not sent, and its count is taken back.
    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        // A reply holds a page or a few of entries: a bounded window of the listing is enough.
        let window: Vec<(u64, FileType, String)> = {
            let dirs = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
            let Some(list) = dirs.get(&fh.0) else {
                return reply.error(Errno::EBADF);
            };
            list.iter().skip(offset as usize).take(PLUS_WINDOW).cloned().collect()
        };
        let (fs, ttl) = (self.fs.clone(), self.ttl);
        self.rt.spawn(async move {
            if offset == 0 {
                fs.read_listed_index(ino.0).await;
            }
            let Ok(dir) = fs.cached_attr(ino.0) else {
                return reply.error(Errno::ENOENT);
            };
            let mut sent = 0;
            for (i, (entry_ino, _, name)) in window.into_iter().enumerate() {
                let next = offset + i as u64 + 1;
                let dot = name == "." || name == "..";
                let attr = if dot {
                    Attr {
                        ino: entry_ino,
                        ..dir.clone()
                    }
                } else if let Some(a) = fs.known_entry(ino.0, &name) {
                    a
                } else if sent == 0 {
                    match fs.lookup(ino.0, &name).await {
                        Ok(a) => a,
                        // Gone since the listing: leave it out.
                        Err(FsError::NotFound) => continue,
                        Err(e) => return reply.error(errno(&e)),
                    }
                } else {
                    break;
                };
                if reply.add(INodeNo(attr.ino), next, &name, &ttl, &file_attr(&attr), Generation(0)) {
                    if !dot {
                        fs.forget(attr.ino, 1);
                    }
                    break;
                }
                sent += 1;
            }
            reply.ok()
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        self.fs.stream_closed(fh.0);
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        )
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let value = value.to_vec();
        run!(
            self,
            "setxattr",
            reply,
            |fs| async {
                let change = crate::fs::XattrChange::Set {
                    name: &name,
                    value: &value,
                    flags,
                };
                fs.change_xattr(ino.0, change).await
            },
            |_u| reply.ok()
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(_) => return reply.error(Errno::from_i32(libc::ENODATA)),
        };
        let started = std::time::Instant::now();
        if let Some(result) = self.fs.getxattr_inline(ino.0, &name) {
            return answer!(self.metrics, "getxattr", started, reply, result, |v| xattr_reply(
                reply, size, &v
            ));
        }
        run!(
            self,
            "getxattr",
            reply,
            |fs| fs.getxattr(ino.0, &name),
            |v| xattr_reply(reply, size, &v)
        )
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        run!(self, "listxattr", reply, |fs| fs.listxattr(ino.0), |v| xattr_reply(
            reply, size, &v
        ))
    }

    /// No device controls here: every ioctl is ENOTTY, as on any regular file that has none (a program that
    /// opens a file often asks TCGETS first, to learn whether it is a terminal). The kernel sends each one, so
    /// this is answered without a log line.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        log::trace!("ioctl {cmd:#x}: not supported");
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(_) => return reply.error(Errno::from_i32(libc::ENODATA)),
        };
        run!(
            self,
            "removexattr",
            reply,
            |fs| fs.change_xattr(ino.0, crate::fs::XattrChange::Remove { name: &name }),
            |_u| reply.ok()
        )
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let name = match name_str(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let (uid, gid, ttl) = (req.uid(), req.gid(), self.ttl);
        let perm = (mode & !umask & 0o7777) as u16;
        run!(
            self,
            "create",
            reply,
            |fs| fs.create(parent.0, &name, perm, uid, gid),
            |r| {
                let (a, fh) = r;
                reply.created(&ttl, &file_attr(&a), Generation(0), FileHandle(fh), FopenFlags::empty())
            }
        )
    }
}
