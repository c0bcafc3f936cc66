//! POSIX fidelity through real FUSE mounts, in a client-side and an SSE mode, written from the Linux man pages
//! (mknod(2), mkfifo(3), utimensat(2), rename(2), link(2), path_resolution(7)): special files, separate atime,
//! mtime and ctime, parent directory times, name limits, hard links, extended attributes (xattr(7),
//! setxattr(2), getxattr(2), listxattr(2), removexattr(2)) and what a lookup costs in requests.
mod common;

use common::mount::{drop_page_cache, write_file, Counting, TestMount, Volume};
use s3crypt::keys::KeyMode;
use s3crypt::store::failing::OpKind;
use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

macro_rules! in_two_modes {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use s3crypt::keys::KeyMode;
                #[test]
                fn sse_s3() { super::$name(KeyMode::SseS3) }
                #[test]
                fn cse_local() { super::$name(KeyMode::CseLocal) }
            }
        )*
    };
}

in_two_modes!(
    special_files_keep_type_mode_and_rdev_across_remount,
    a_fifo_carries_data_between_a_writer_and_a_reader,
    atime_mtime_and_ctime_are_kept_apart_with_nanoseconds,
    utime_now_and_omit,
    entry_changes_update_the_parent_directory_times,
    names_and_keys_over_the_limits_are_enametoolong,
    sizes_beyond_the_largest_file_are_efbig,
    hard_links_are_eperm_and_leave_nothing_behind,
    a_missing_name_is_asked_once_per_ttl,
    a_cold_file_lookup_is_one_head,
    a_directory_in_use_is_asked_again_with_one_head,
    xattrs_get_set_list_remove_with_flags_and_errors,
    xattrs_survive_remount_chmod_rename_and_writes,
    xattrs_beyond_the_metadata_limit_are_refused_and_nothing_is_lost,
    xattrs_are_stored_as_the_mode_requires,
    directory_xattrs_live_in_the_marker_and_survive_remount_chmod_and_rename,
    a_capability_query_costs_no_request,
    a_terminal_query_on_a_file_is_enotty,
    a_long_listing_costs_about_one_head_per_file,
    a_long_listing_is_answered_by_the_directory_index,
    a_long_listing_read_for_longer_than_the_ttl_is_still_answered_by_the_index,
    names_that_hold_s3crypt_objects_are_reserved_at_the_root,
    an_open_file_outlives_its_name,
    an_open_file_replaced_by_rename_keeps_its_content,
    an_unlink_that_would_fill_the_staging_disk_keeps_only_what_the_mount_holds,
    a_full_staging_disk_fails_the_write_with_enospc_and_keeps_what_was_written,
    set_group_id_directories_pass_their_group_down,
    set_id_bits_are_dropped_by_writes_truncates_and_chowns,
);

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    r.err().and_then(|e| e.raw_os_error()).expect("an OS error")
}

fn mknod(p: &Path, mode: u32, dev: u64) -> std::io::Result<()> {
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mknod(cpath(p).as_ptr(), mode, dev as libc::dev_t) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// utimensat(2) on a path, with raw timespecs (so UTIME_NOW and UTIME_OMIT can be passed).
fn utimensat(p: &Path, atime: libc::timespec, mtime: libc::timespec) -> std::io::Result<()> {
    let times = [atime, mtime];
    // SAFETY: a valid path and a two-element array, as utimensat(2) asks.
    if unsafe { libc::utimensat(libc::AT_FDCWD, cpath(p).as_ptr(), times.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn ts(secs: i64, nanos: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    }
}

fn special(nsec: i64) -> libc::timespec {
    ts(0, nsec)
}

/// (seconds, nanoseconds) of a stat time.
fn times(m: &fs::Metadata) -> [(i64, i64); 3] {
    [
        (m.atime(), m.atime_nsec()),
        (m.mtime(), m.mtime_nsec()),
        (m.ctime(), m.ctime_nsec()),
    ]
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn head_metadata(bucket: &str, key: &str) -> std::collections::HashMap<String, String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::s3_client().await;
        let head = c.head_object().bucket(bucket).key(key).send().await.unwrap();
        head.metadata().cloned().unwrap_or_default()
    })
}

fn object_exists(bucket: &str, key: &str) -> bool {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::s3_client().await;
        match c.head_object().bucket(bucket).key(key).send().await {
            Ok(_) => true,
            Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => false,
            Err(e) => panic!("HEAD {key}: {e:?}"),
        }
    })
}

/// Every file under the volume's journal directories.
fn journal_files(vol: &Volume) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(volumes) = fs::read_dir(vol.dir.path().join("journal")) {
        for d in volumes.flatten() {
            if let Ok(rd) = fs::read_dir(d.path()) {
                out.extend(
                    rd.flatten()
                        .map(|e| e.path())
                        .filter(|p| !p.ends_with("journal.key") && !p.ends_with("reserve")),
                );
            }
        }
    }
    out
}

fn read_all_at(f: &fs::File, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0).unwrap();
    buf
}

/// unlink(2): "If the name was the last link to a file but any processes still have the file open, the file will
/// remain in existence until the last file descriptor referring to it is closed." The handles read what the
/// file held (its S3 blocks included) and their own later writes, the name is gone at once (from the mount and
/// from S3), and the last close leaves nothing behind, not even across a remount.
fn an_open_file_outlives_its_name(mode: KeyMode) {
    use std::os::unix::fs::FileExt;
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    // Several read-ahead chunks and GETs of whole blocks, none of them cached by this (fresh) mount.
    let mut want = common::mount::pattern(19 * 1024 * 1024 + 4321, 7);
    write_file(&m.path("f"), &want).unwrap();
    m.unmount();
    let m = TestMount::mount(&vol);
    let f = fs::OpenOptions::new().read(true).write(true).open(m.path("f")).unwrap();
    // A change not yet in S3 when the name goes.
    f.write_all_at(b"before the unlink", 5 * 1024 * 1024 + 3).unwrap();
    want[5 * 1024 * 1024 + 3..5 * 1024 * 1024 + 20].copy_from_slice(b"before the unlink");
    fs::remove_file(m.path("f")).unwrap();
    assert_eq!(errno_of(fs::metadata(m.path("f"))), libc::ENOENT);
    assert!(
        fs::read_dir(m.mnt.path()).unwrap().next().is_none(),
        "the listing no longer shows it"
    );
    assert!(!object_exists(&vol.bucket, "f"), "the object is deleted at once");
    drop_page_cache(&f);
    let got = read_all_at(&f, want.len());
    assert!(got == want, "the open handle reads the file's content after the unlink");
    // Writes through the handle go on: into a block that was in S3, and past the end.
    f.write_all_at(b"after", 12 * 1024 * 1024 + 1).unwrap();
    want[12 * 1024 * 1024 + 1..12 * 1024 * 1024 + 6].copy_from_slice(b"after");
    f.write_all_at(b"tail", want.len() as u64).unwrap();
    want.extend_from_slice(b"tail");
    drop_page_cache(&f);
    assert!(read_all_at(&f, want.len()) == want);
    let md = f.metadata().unwrap();
    assert_eq!(
        (md.nlink(), md.len()),
        (0, want.len() as u64),
        "fstat: no link left, the size it has"
    );
    f.sync_all().unwrap();
    drop(f);
    // Nothing comes back: not the name, not the object, not a journal entry. The kernel sends the release that
    // ends the file after close(2) has returned, so its work is waited for, within a bound.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !journal_files(&vol).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        journal_files(&vol),
        Vec::<std::path::PathBuf>::new(),
        "the last close removes its journal"
    );
    assert_eq!(errno_of(fs::metadata(m.path("f"))), libc::ENOENT);
    assert!(!object_exists(&vol.bucket, "f"));
    m.unmount();
    let m = TestMount::mount(&vol);
    assert_eq!(errno_of(fs::metadata(m.path("f"))), libc::ENOENT);
    // A new file of the same name is a new file.
    write_file(&m.path("f"), b"new").unwrap();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"new");
}

/// Unmounts a tmpfs mounted by [`small_tmpfs`].
struct TmpfsGuard(tempfile::TempDir);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

fn small_tmpfs(size: &str) -> TmpfsGuard {
    let dir = tempfile::Builder::new().prefix("s3crypt-small").tempdir().unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success(), "mount a {size} tmpfs");
    TmpfsGuard(dir)
}

/// The copy an unlink makes for open handles must not fill the journal's disk: with too little room it is
/// skipped, the unlink still succeeds, and the handles read their own writes and what the mount has cached; any
/// other read fails. Never other bytes.
fn an_unlink_that_would_fill_the_staging_disk_keeps_only_what_the_mount_holds(mode: KeyMode) {
    use std::os::unix::fs::FileExt;
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let want = common::mount::pattern(6 * 1024 * 1024, 3);
    write_file(&m.path("big"), &want).unwrap();
    m.unmount();
    let small = small_tmpfs("4m");
    let staging = format!("staging_dir={}", small.0.path().display());
    let m = TestMount::mount_with(&vol, &[&staging]);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.path("big"))
        .unwrap();
    f.write_all_at(b"mine", 10).unwrap();
    let mut cached = vec![0u8; 4096];
    f.read_exact_at(&mut cached, 2 * 1024 * 1024).unwrap();
    assert!(cached[..] == want[2 * 1024 * 1024..2 * 1024 * 1024 + 4096]);
    fs::remove_file(m.path("big")).unwrap();
    assert!(!object_exists(&vol.bucket, "big"));
    drop_page_cache(&f);
    let mut head = vec![0u8; 14];
    f.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head[10..], b"mine", "its own write");
    assert_eq!(&head[..10], &want[..10]);
    f.read_exact_at(&mut cached, 2 * 1024 * 1024).unwrap();
    assert!(
        cached[..] == want[2 * 1024 * 1024..2 * 1024 * 1024 + 4096],
        "a cached block"
    );
    let mut far = vec![0u8; 4096];
    let r = f.read_exact_at(&mut far, 5 * 1024 * 1024);
    assert!(
        r.is_err(),
        "a block only S3 had cannot be read once the object is gone, and is not made up"
    );
    drop(f);
    m.unmount();
    let m = TestMount::mount(&vol);
    assert_eq!(errno_of(fs::metadata(m.path("big"))), libc::ENOENT);
}

/// A write the journal has no room for fails with ENOSPC (write(2): "The device containing the file referred to
/// by fd has no room for the data"), and only that write: the writes acknowledged before it are in the file,
/// close() saves them to S3, and once the journal's room is free again the mount writes as before.
fn a_full_staging_disk_fails_the_write_with_enospc_and_keeps_what_was_written(mode: KeyMode) {
    use std::os::unix::fs::FileExt;
    const MIB: usize = 1024 * 1024;
    let vol = Volume::new(mode);
    let small = small_tmpfs("4m");
    let staging = format!("staging_dir={}", small.0.path().display());
    let m = TestMount::mount_with(&vol, &[&staging]);
    let want = common::mount::pattern(8 * MIB, 5);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(m.path("f"))
        .unwrap();
    let mut written = 0;
    let err = loop {
        assert!(written < want.len(), "8 MiB fitted a 4 MiB journal");
        match f.write_all_at(&want[written..written + MIB], written as u64) {
            Ok(()) => written += MIB,
            Err(e) => break e,
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written >= MIB, "no write fitted");
    // The failed write left nothing of itself: the file is what was acknowledged.
    assert_eq!(f.metadata().unwrap().len(), written as u64);
    drop_page_cache(&f);
    assert!(
        read_all_at(&f, written) == want[..written],
        "the acknowledged writes read back"
    );
    f.sync_all().unwrap();
    drop(f);
    assert!(fs::read(m.path("f")).unwrap() == want[..written]);
    // Saved, the journal's room is free again: a write of the same size fits, and the reserve that let the
    // upload rewrite its manifest on the full disk is back.
    write_file(&m.path("g"), &want[..written]).unwrap();
    let reserve = fs::read_dir(small.0.path().join("journal"))
        .unwrap()
        .flatten()
        .map(|d| d.path().join("reserve"))
        .find(|p| p.exists())
        .expect("the journal's reserve is there again");
    assert_eq!(fs::metadata(reserve).unwrap().blocks() * 512, 1 << 20);
    m.unmount();
    let m = TestMount::mount(&vol);
    assert!(fs::read(m.path("f")).unwrap() == want[..written], "in S3");
    assert!(fs::read(m.path("g")).unwrap() == want[..written], "in S3");
}

/// rename(2): "If newpath already exists, it will be atomically replaced"; a process that has the replaced file
/// open keeps reading that file, and the name then holds the renamed one.
fn an_open_file_replaced_by_rename_keeps_its_content(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let old = common::mount::pattern(3 * 1024 * 1024 + 17, 1);
    let new = common::mount::pattern(2 * 1024 * 1024 + 5, 2);
    write_file(&m.path("target"), &old).unwrap();
    write_file(&m.path("incoming"), &new).unwrap();
    m.unmount();
    let m = TestMount::mount(&vol);
    let f = fs::File::open(m.path("target")).unwrap();
    fs::rename(m.path("incoming"), m.path("target")).unwrap();
    drop_page_cache(&f);
    assert!(
        read_all_at(&f, old.len()) == old,
        "the open handle still reads the replaced file"
    );
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    assert!(
        fs::read(m.path("target")).unwrap() == new,
        "the name holds the renamed file"
    );
    drop(f);
    m.unmount();
    let m = TestMount::mount(&vol);
    assert!(fs::read(m.path("target")).unwrap() == new);
    assert_eq!(errno_of(fs::metadata(m.path("incoming"))), libc::ENOENT);
}

/// mkdir(2), open(2): in a directory with the set-group-ID bit, a new entry takes the directory's group, and a
/// new directory inherits the bit (as on ext4, xfs and tmpfs); it holds across a remount.
fn set_group_id_directories_pass_their_group_down(mode: KeyMode) {
    use std::os::unix::fs::PermissionsExt;
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    fs::create_dir(m.path("shared")).unwrap();
    std::os::unix::fs::chown(m.path("shared"), Some(0), Some(4321)).unwrap();
    fs::set_permissions(m.path("shared"), fs::Permissions::from_mode(0o2775)).unwrap();
    write_file(&m.path("shared/file"), b"x").unwrap();
    fs::create_dir(m.path("shared/sub")).unwrap();
    std::os::unix::fs::symlink("file", m.path("shared/link")).unwrap();
    mknod(&m.path("shared/fifo"), libc::S_IFIFO | 0o644, 0).unwrap();
    // Outside it, the creator's group.
    write_file(&m.path("plain"), b"y").unwrap();
    let check = |m: &TestMount| {
        for name in ["shared/file", "shared/sub", "shared/link", "shared/fifo"] {
            assert_eq!(
                fs::symlink_metadata(m.path(name)).unwrap().gid(),
                4321,
                "{name} takes the group"
            );
        }
        assert_ne!(
            fs::metadata(m.path("shared/sub")).unwrap().mode() & 0o2000,
            0,
            "a directory keeps the bit"
        );
        assert_eq!(
            fs::metadata(m.path("shared/file")).unwrap().mode() & 0o2000,
            0,
            "files do not get the bit"
        );
        assert_eq!(fs::metadata(m.path("plain")).unwrap().gid(), 0);
    };
    check(&m);
    m.unmount();
    check(&TestMount::mount(&vol));
}

/// Runs `script` with `sh` as root without CAP_FSETID (dropped from the bounding and inheritable sets, so the
/// exec does not get it back), in `dir`; its standard output.
fn sh_without_fsetid(dir: &Path, script: &str) -> String {
    let out = std::process::Command::new("setpriv")
        .args([
            "--bounding-set=-fsetid",
            "--inh-caps=-fsetid",
            "--",
            "sh",
            "-ec",
            script,
        ])
        .current_dir(dir)
        .output()
        .expect("setpriv (util-linux) runs");
    assert!(out.status.success(), "{script}: {}", common::describe(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// What Linux does to set-user-ID and set-group-ID bits (chown(2), write(2) via `file_remove_privs`, truncate(2),
/// and FUSE's own rule for set-group-ID): a write or a truncate by a caller without CAP_FSETID drops set-user-ID,
/// and set-group-ID where group execute is set (without it the bit marks mandatory locking and stays); a chown of
/// a file drops them whoever asks; a directory keeps them; a caller with CAP_FSETID keeps them. The mount does
/// this itself (the kernel leaves it to the mount under `FUSE_HANDLE_KILLPRIV_V2`), so it must last: the
/// modes are checked again after a remount.
fn set_id_bits_are_dropped_by_writes_truncates_and_chowns(mode: KeyMode) {
    use std::os::unix::fs::PermissionsExt;
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let set = |name: &str, perm: u32| fs::set_permissions(m.path(name), fs::Permissions::from_mode(perm)).unwrap();
    for name in [
        "written",
        "truncated",
        "opened-truncated",
        "chowned",
        "by-root",
        "no-gx-written",
        "no-gx-truncated",
        "other-group",
    ] {
        write_file(&m.path(name), b"0123456789").unwrap();
    }
    for name in ["written", "truncated", "opened-truncated", "chowned", "by-root"] {
        set(name, 0o6775);
    }
    for name in ["no-gx-written", "no-gx-truncated", "other-group"] {
        set(name, 0o2765);
    }
    std::os::unix::fs::chown(m.path("other-group"), None, Some(4321)).unwrap();
    set("other-group", 0o2765);
    fs::create_dir(m.path("dir")).unwrap();
    set("dir", 0o6775);
    // Each mode as the writer sees it right after its call (the kernel's cached attributes must not keep the
    // bits the mount dropped).
    let seen = sh_without_fsetid(
        &m.path(""),
        "printf more >> written; stat -c %a written; truncate -s 4 truncated; stat -c %a truncated; \
         printf more >> no-gx-written; stat -c %a no-gx-written; truncate -s 4 no-gx-truncated; \
         stat -c %a no-gx-truncated; printf more >> other-group; stat -c %a other-group; \
         : > opened-truncated; stat -c %a opened-truncated",
    );
    assert_eq!(
        seen.split_whitespace().collect::<Vec<_>>(),
        ["775", "775", "2765", "2765", "2765", "775"]
    );
    std::os::unix::fs::chown(m.path("chowned"), Some(1), Some(1)).unwrap();
    std::os::unix::fs::chown(m.path("dir"), Some(1), Some(1)).unwrap();
    // This process has CAP_FSETID: its write and truncate keep the bits.
    fs::OpenOptions::new()
        .append(true)
        .open(m.path("by-root"))
        .unwrap()
        .write_all(b"more")
        .unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(m.path("by-root"))
        .unwrap()
        .set_len(12)
        .unwrap();
    let want = [
        ("written", 0o775, &b"0123456789more"[..]),
        ("truncated", 0o775, b"0123"),
        ("opened-truncated", 0o775, b""),
        ("chowned", 0o775, b"0123456789"),
        ("by-root", 0o6775, b"0123456789mo"),
        ("no-gx-written", 0o2765, b"0123456789more"),
        ("no-gx-truncated", 0o2765, b"0123"),
        ("other-group", 0o2765, b"0123456789more"),
    ];
    let check = |m: &TestMount, when: &str| {
        for (name, perm, content) in want {
            let md = fs::metadata(m.path(name)).unwrap();
            assert_eq!(md.mode() & 0o7777, perm, "{name} {when}: mode {:o}", md.mode() & 0o7777);
            assert_eq!(fs::read(m.path(name)).unwrap(), content, "{name} {when}");
        }
        assert_eq!(
            fs::metadata(m.path("dir")).unwrap().mode() & 0o7777,
            0o6775,
            "dir {when}"
        );
    };
    check(&m, "at once");
    m.unmount();
    check(&TestMount::mount(&vol), "after a remount");
}

fn special_files_keep_type_mode_and_rdev_across_remount(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let chr = libc::makedev(1, 3);
    let blk = libc::makedev(8, 1);
    mknod(&m.path("fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
    mknod(&m.path("chr"), libc::S_IFCHR | 0o600, chr).unwrap();
    mknod(&m.path("blk"), libc::S_IFBLK | 0o604, blk).unwrap();
    let sock = std::os::unix::net::UnixListener::bind(m.path("sock")).unwrap();
    drop(sock);
    // mknod(2) of a regular file makes an empty file.
    mknod(&m.path("reg"), libc::S_IFREG | 0o604, 0).unwrap();
    assert_eq!(errno_of(mknod(&m.path("fifo"), libc::S_IFIFO | 0o600, 0)), libc::EEXIST);
    let check = |m: &TestMount, when: &str| {
        let md = |n: &str| fs::symlink_metadata(m.path(n)).unwrap_or_else(|e| panic!("{when}: stat {n}: {e}"));
        let f = md("fifo");
        assert!(f.file_type().is_fifo(), "{when}");
        assert_eq!(f.mode() & 0o7777, 0o640, "{when}");
        let c = md("chr");
        assert!(c.file_type().is_char_device(), "{when}");
        assert_eq!((c.mode() & 0o7777, c.rdev()), (0o600, chr), "{when}");
        let b = md("blk");
        assert!(b.file_type().is_block_device(), "{when}");
        assert_eq!((b.mode() & 0o7777, b.rdev()), (0o604, blk), "{when}");
        assert!(md("sock").file_type().is_socket(), "{when}");
        let r = md("reg");
        assert!(r.file_type().is_file(), "{when}");
        assert_eq!((r.mode() & 0o7777, r.len()), (0o604, 0), "{when}");
        let mut names: Vec<String> = fs::read_dir(m.mnt.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["blk", "chr", "fifo", "reg", "sock"], "{when}");
    };
    check(&m, "before remount");
    m.unmount();
    // s3fs's convention: `mode` carries the type bits, `rdev` the device number in the kernel's encoding.
    let meta = head_metadata(&vol.bucket, "chr");
    assert_eq!(
        meta.get("mode").map(String::as_str),
        Some(&*(libc::S_IFCHR | 0o600).to_string())
    );
    assert_eq!(meta.get("rdev").map(String::as_str), Some(&*chr.to_string()));
    let meta = head_metadata(&vol.bucket, "fifo");
    assert_eq!(
        meta.get("mode").map(String::as_str),
        Some(&*(libc::S_IFIFO | 0o640).to_string())
    );
    let m = TestMount::mount(&vol);
    check(&m, "after remount");
    // Special files go away like files.
    for n in ["fifo", "chr", "blk", "sock"] {
        fs::remove_file(m.path(n)).unwrap();
    }
    fs::rename(m.path("reg"), m.path("reg2")).unwrap();
    assert_eq!(fs::read_dir(m.mnt.path()).unwrap().count(), 1);
}

fn a_fifo_carries_data_between_a_writer_and_a_reader(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let p = m.path("pipe");
    mknod(&p, libc::S_IFIFO | 0o600, 0).unwrap();
    let writer_path = p.clone();
    let writer = std::thread::spawn(move || {
        let mut w = fs::OpenOptions::new().write(true).open(&writer_path).unwrap();
        w.write_all(b"through the pipe").unwrap();
    });
    let mut got = String::new();
    fs::File::open(&p).unwrap().read_to_string(&mut got).unwrap();
    writer.join().unwrap();
    assert_eq!(got, "through the pipe");
    // The pipe's data never went to S3: the node is still an empty object.
    let md = fs::symlink_metadata(&p).unwrap();
    assert!(md.file_type().is_fifo());
    assert_eq!(md.len(), 0);
}

fn atime_mtime_and_ctime_are_kept_apart_with_nanoseconds(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let p = m.path("f");
    write_file(&p, b"data").unwrap();
    let before = now_secs();
    utimensat(&p, ts(1_900_000_000, 123_456_789), ts(1_800_000_000, 5)).unwrap();
    let md = fs::metadata(&p).unwrap();
    let [a, mt, c] = times(&md);
    assert_eq!(a, (1_900_000_000, 123_456_789));
    assert_eq!(mt, (1_800_000_000, 5));
    assert!(
        c.0 >= before && c.0 <= now_secs() + 1,
        "ctime is the time of the change: {c:?}"
    );
    // The same on a directory (its marker keeps them).
    fs::create_dir(m.path("d")).unwrap();
    utimensat(&m.path("d"), ts(1_500_000_000, 1), ts(1_400_000_000, 999_999_999)).unwrap();
    m.unmount();
    let m = TestMount::mount(&vol);
    let md = fs::metadata(m.path("f")).unwrap();
    let [a2, mt2, c2] = times(&md);
    assert_eq!((a2, mt2, c2), (a, mt, c), "after remount");
    assert_eq!(fs::read(m.path("f")).unwrap(), b"data");
    let d = fs::metadata(m.path("d")).unwrap();
    assert_eq!(times(&d)[..2], [(1_500_000_000, 1), (1_400_000_000, 999_999_999)]);
    // Reading does not change atime (noatime-like: a read never writes to S3).
    let mut buf = Vec::new();
    fs::File::open(m.path("f")).unwrap().read_to_end(&mut buf).unwrap();
    assert_eq!(times(&fs::metadata(m.path("f")).unwrap())[0], a);
    // Writing changes mtime and ctime, not atime.
    let t0 = now_secs();
    write_file(&m.path("f"), b"new data").unwrap();
    let [a3, mt3, c3] = times(&fs::metadata(m.path("f")).unwrap());
    assert_eq!(a3, a);
    assert!(mt3.0 >= t0 && c3.0 >= t0, "{mt3:?} {c3:?}");
}

fn utime_now_and_omit(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let p = m.path("f");
    write_file(&p, b"x").unwrap();
    utimensat(&p, ts(1_000_000_000, 0), ts(1_100_000_000, 0)).unwrap();
    // UTIME_OMIT leaves that time alone; UTIME_NOW sets it to the current time.
    let t0 = now_secs();
    utimensat(&p, special(libc::UTIME_OMIT), special(libc::UTIME_NOW)).unwrap();
    let [a, mt, _] = times(&fs::metadata(&p).unwrap());
    assert_eq!(a, (1_000_000_000, 0));
    assert!(mt.0 >= t0 && mt.0 <= now_secs() + 1, "{mt:?}");
    utimensat(&p, special(libc::UTIME_NOW), special(libc::UTIME_OMIT)).unwrap();
    let [a, mt2, _] = times(&fs::metadata(&p).unwrap());
    assert!(a.0 >= t0, "{a:?}");
    assert_eq!(mt2, mt);
    // Both omitted: nothing changes, not even ctime (utimensat(2)).
    let before = times(&fs::metadata(&p).unwrap());
    utimensat(&p, special(libc::UTIME_OMIT), special(libc::UTIME_OMIT)).unwrap();
    assert_eq!(times(&fs::metadata(&p).unwrap()), before);
    // touch -a -d: only atime.
    utimensat(&p, ts(1_900_000_000, 0), special(libc::UTIME_OMIT)).unwrap();
    m.unmount();
    let m = TestMount::mount(&vol);
    let [a, mt3, _] = times(&fs::metadata(m.path("f")).unwrap());
    assert_eq!((a, mt3), ((1_900_000_000, 0), mt));
}

fn entry_changes_update_the_parent_directory_times(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    fs::create_dir(m.path("d")).unwrap();
    fs::create_dir(m.path("e")).unwrap();
    let d = m.path("d");
    let stamp = |p: &Path| {
        let md = fs::metadata(p).unwrap();
        ((md.mtime(), md.mtime_nsec()), (md.ctime(), md.ctime_nsec()))
    };
    type Step<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let steps: Vec<Step> = vec![
        ("create", Box::new(|| write_file(&d.join("f"), b"1").unwrap())),
        ("mkdir", Box::new(|| fs::create_dir(d.join("sub")).unwrap())),
        (
            "symlink",
            Box::new(|| std::os::unix::fs::symlink("f", d.join("l")).unwrap()),
        ),
        (
            "mknod",
            Box::new(|| mknod(&d.join("p"), libc::S_IFIFO | 0o600, 0).unwrap()),
        ),
        (
            "rename within",
            Box::new(|| fs::rename(d.join("f"), d.join("g")).unwrap()),
        ),
        ("unlink", Box::new(|| fs::remove_file(d.join("l")).unwrap())),
        ("rmdir", Box::new(|| fs::remove_dir(d.join("sub")).unwrap())),
    ];
    for (what, step) in steps {
        let before = stamp(&d);
        std::thread::sleep(Duration::from_millis(20));
        step();
        let after = stamp(&d);
        assert!(
            after.0 > before.0 && after.1 > before.1,
            "{what}: {before:?} -> {after:?}"
        );
    }
    // A rename between directories changes both.
    let e = m.path("e");
    let (bd, be) = (stamp(&d), stamp(&e));
    std::thread::sleep(Duration::from_millis(20));
    fs::rename(d.join("g"), e.join("g")).unwrap();
    assert!(stamp(&d).0 > bd.0 && stamp(&e).0 > be.0);
    // The root too.
    let br = stamp(m.mnt.path());
    std::thread::sleep(Duration::from_millis(20));
    write_file(&m.path("top"), b"t").unwrap();
    assert!(stamp(m.mnt.path()).0 > br.0);
}

fn names_and_keys_over_the_limits_are_enametoolong(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let long = "n".repeat(256);
    let too_long = m.path(&long);
    assert_eq!(errno_of(fs::write(&too_long, b"x")), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::metadata(&too_long)), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::create_dir(&too_long)), libc::ENAMETOOLONG);
    write_file(&m.path(&"n".repeat(255)), b"255 is fine").unwrap();
    // Keys: four 250-byte directories make a 1,004-byte prefix ("a…/b…/c…/d…/"); a name of 20 bytes makes a
    // 1,024-byte key (the limit), 21 bytes one over it.
    let mut dir = m.mnt.path().to_path_buf();
    for c in ["a", "b", "c", "d"] {
        dir = dir.join(c.repeat(250));
        fs::create_dir(&dir).unwrap();
    }
    let exact = dir.join("x".repeat(20));
    let over = dir.join("y".repeat(21));
    write_file(&exact, b"at the limit").unwrap();
    assert_eq!(fs::read(&exact).unwrap(), b"at the limit");
    assert_eq!(errno_of(fs::write(&over, b"x")), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::create_dir(&over)), libc::ENAMETOOLONG);
    assert_eq!(errno_of(std::os::unix::fs::symlink("t", &over)), libc::ENAMETOOLONG);
    assert_eq!(errno_of(mknod(&over, libc::S_IFIFO | 0o600, 0)), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::rename(&exact, &over)), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::metadata(&over)), libc::ENAMETOOLONG);
    // A directory marker is the key plus "/": a 20-byte directory name is one over.
    assert_eq!(errno_of(fs::create_dir(dir.join("z".repeat(20)))), libc::ENAMETOOLONG);
    // Nothing was lost or half-made.
    assert_eq!(fs::read(&exact).unwrap(), b"at the limit");
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
}

/// truncate(2) and write(2): EFBIG for a length or a write beyond the largest file (an S3 object holds at most
/// 5 TiB); the file is untouched and the mount goes on.
fn sizes_beyond_the_largest_file_are_efbig(mode: KeyMode) {
    use std::os::unix::fs::FileExt;
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let p = m.path("f");
    write_file(&p, b"abc").unwrap();
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    assert_eq!(errno_of(f.set_len(6 << 40)), libc::EFBIG, "ftruncate to 6 TiB");
    assert_eq!(errno_of(f.write_all_at(b"x", 6 << 40)), libc::EFBIG, "pwrite at 6 TiB");
    common::mount::close_checked(f).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"abc");
    m.unmount();
    let m = TestMount::mount(&vol);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"abc");
}

fn hard_links_are_eperm_and_leave_nothing_behind(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    write_file(&m.path("f"), b"one name").unwrap();
    assert_eq!(errno_of(fs::hard_link(m.path("f"), m.path("g"))), libc::EPERM);
    assert_eq!(errno_of(fs::metadata(m.path("g"))), libc::ENOENT);
    assert_eq!(fs::metadata(m.path("f")).unwrap().nlink(), 1);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"one name");
}

fn count(c: &Counting, op: OpKind) -> u64 {
    c.stats().count(op)
}

fn a_missing_name_is_asked_once_per_ttl(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount_with(&vol, &["metadata_ttl=30s"]);
    fs::create_dir(m.path("d")).unwrap();
    let _ = fs::read_dir(m.path("d")).unwrap().count();
    m.counter.reset();
    for _ in 0..5 {
        assert_eq!(errno_of(fs::metadata(m.path("d/missing"))), libc::ENOENT);
        assert_eq!(errno_of(fs::File::open(m.path("d/missing"))), libc::ENOENT);
    }
    let (heads, lists) = (count(&m.counter, OpKind::Head), count(&m.counter, OpKind::List));
    assert_eq!(
        (heads, lists),
        (1, 1),
        "the first miss asks S3 once (HEAD, then LIST); the rest ask nothing"
    );
    // A name made here is found at once, despite the cached miss.
    write_file(&m.path("d/missing"), b"here now").unwrap();
    assert_eq!(fs::read(m.path("d/missing")).unwrap(), b"here now");
    // And after it is removed, it is missing again.
    fs::remove_file(m.path("d/missing")).unwrap();
    assert_eq!(errno_of(fs::metadata(m.path("d/missing"))), libc::ENOENT);
}

fn a_cold_file_lookup_is_one_head(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    write_file(&m.path("f"), b"x").unwrap();
    m.unmount();
    let m = TestMount::mount(&vol);
    m.counter.reset();
    let md = fs::metadata(m.path("f")).unwrap();
    assert_eq!(md.len(), 1);
    assert_eq!(
        (count(&m.counter, OpKind::Head), count(&m.counter, OpKind::List)),
        (1, 0),
        "a file is found with one HEAD and no LIST"
    );
}

/// A directory in use is asked about again each time the metadata TTL (1 s) runs out: every path walk through it
/// makes the kernel revalidate it (its entry, and its attributes for the search permission check). With a marker
/// that is one HEAD; a directory without one costs the HEAD of the name and a LIST, as a first lookup does; and
/// what another client made of the name meanwhile shows.
fn a_directory_in_use_is_asked_again_with_one_head(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let after_ttl = || std::thread::sleep(Duration::from_millis(1100));
    let costs = |what: &str, path: &str, want: (u64, u64)| {
        after_ttl();
        m.counter.reset();
        assert!(
            fs::metadata(m.path(path)).unwrap().is_dir(),
            "{what}: still a directory"
        );
        let got = (count(&m.counter, OpKind::Head), count(&m.counter, OpKind::List));
        assert_eq!(got, want, "{what}: (HEADs, LISTs) to ask about {path} again");
    };
    fs::create_dir(m.path("d")).unwrap();
    write_file(&m.path("d/f"), b"x").unwrap();
    costs("a directory made here", "d", (1, 0));
    costs("the same, one TTL later", "d", (1, 0));
    put_object(&vol.bucket, "e/x", b"x");
    assert!(fs::metadata(m.path("e")).unwrap().is_dir());
    costs("a directory without a marker", "e", (1, 1));
    // Another client removes the directory and puts a file in its place.
    delete_object(&vol.bucket, "d/f");
    delete_object(&vol.bucket, "d/");
    put_object(&vol.bucket, "d", b"now a file");
    after_ttl();
    let md = fs::metadata(m.path("d")).unwrap();
    assert!(
        md.is_file() && md.len() == 10,
        "d is the other client's file now: {md:?}"
    );
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid path and name; value pointer and length from a slice.
    let r = unsafe { libc::setxattr(cpath(p).as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// getxattr(2) with a buffer of `size` bytes (0: ask for the size).
fn getxattr_sized(p: &Path, name: &str, size: usize) -> std::io::Result<(usize, Vec<u8>)> {
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    // SAFETY: valid path and name; the buffer is `size` bytes.
    let r = unsafe { libc::getxattr(cpath(p).as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), size) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok((r as usize, buf))
}

fn getxattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let (len, _) = getxattr_sized(p, name, 0)?;
    Ok(getxattr_sized(p, name, len)?.1)
}

fn listxattr(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid path; the buffer is 4096 bytes.
    let r = unsafe { libc::listxattr(cpath(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "listxattr: {}", std::io::Error::last_os_error());
    buf.truncate(r as usize);
    let mut names: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8(s.to_vec()).unwrap())
        .collect();
    names.sort();
    names
}

fn removexattr(p: &Path, name: &str) -> std::io::Result<()> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid path and name.
    if unsafe { libc::removexattr(cpath(p).as_ptr(), n.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn xattrs_get_set_list_remove_with_flags_and_errors(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let p = m.path("f");
    write_file(&p, b"content").unwrap();
    assert_eq!(listxattr(&p), Vec::<String>::new());
    assert_eq!(errno_of(getxattr(&p, "user.a")), libc::ENODATA);
    setxattr(&p, "user.a", b"hello", 0).unwrap();
    let binary = [0u8, 1, 2, 0, 255, b'"', b'\\'];
    setxattr(&p, "user.bin", &binary, libc::XATTR_CREATE).unwrap();
    setxattr(&p, "user.empty", b"", 0).unwrap();
    assert_eq!(getxattr(&p, "user.a").unwrap(), b"hello");
    assert_eq!(getxattr(&p, "user.bin").unwrap(), binary);
    assert_eq!(getxattr(&p, "user.empty").unwrap(), b"");
    assert_eq!(listxattr(&p), ["user.a", "user.bin", "user.empty"]);
    // XATTR_CREATE on an existing name: EEXIST; XATTR_REPLACE on a missing one: ENODATA (xattr(7)).
    assert_eq!(errno_of(setxattr(&p, "user.a", b"x", libc::XATTR_CREATE)), libc::EEXIST);
    assert_eq!(
        errno_of(setxattr(&p, "user.nope", b"x", libc::XATTR_REPLACE)),
        libc::ENODATA
    );
    setxattr(&p, "user.a", b"replaced", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&p, "user.a").unwrap(), b"replaced");
    // A buffer too small: ERANGE; size 0 asks for the size.
    assert_eq!(getxattr_sized(&p, "user.a", 0).unwrap().0, 8);
    assert_eq!(errno_of(getxattr_sized(&p, "user.a", 3)), libc::ERANGE);
    removexattr(&p, "user.a").unwrap();
    assert_eq!(errno_of(getxattr(&p, "user.a")), libc::ENODATA);
    assert_eq!(errno_of(removexattr(&p, "user.a")), libc::ENODATA);
    assert_eq!(listxattr(&p), ["user.bin", "user.empty"]);
    // Other namespaces a backup tool restores are kept too.
    setxattr(&p, "trusted.t", b"root only", 0).unwrap();
    setxattr(&p, "security.selinux", b"system_u:object_r:etc_t:s0", 0).unwrap();
    assert_eq!(getxattr(&p, "security.selinux").unwrap(), b"system_u:object_r:etc_t:s0");
    assert_eq!(fs::read(&p).unwrap(), b"content");
}

fn xattrs_survive_remount_chmod_rename_and_writes(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let p = m.path("f");
    write_file(&p, b"one").unwrap();
    setxattr(&p, "user.a", b"1", 0).unwrap();
    // Set through an open file with unsaved data, then more writes: both reach S3.
    let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b" two").unwrap();
    setxattr(&p, "user.b", b"2", 0).unwrap();
    f.write_all(b" three").unwrap();
    common::mount::close_checked(f).unwrap();
    fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    fs::rename(&p, m.path("g")).unwrap();
    m.unmount();
    let m = TestMount::mount(&vol);
    let g = m.path("g");
    assert_eq!(fs::read(&g).unwrap(), b"one two three");
    assert_eq!(fs::metadata(&g).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(listxattr(&g), ["user.a", "user.b"]);
    assert_eq!(
        (getxattr(&g, "user.a").unwrap(), getxattr(&g, "user.b").unwrap()),
        (b"1".to_vec(), b"2".to_vec())
    );
    // A rewrite of the content keeps the attributes (O_TRUNC is a change of data, not of attributes).
    write_file(&g, b"new").unwrap();
    m.unmount();
    let m = TestMount::mount(&vol);
    assert_eq!(getxattr(&m.path("g"), "user.b").unwrap(), b"2");
    assert_eq!(fs::read(m.path("g")).unwrap(), b"new");
}

fn xattrs_beyond_the_metadata_limit_are_refused_and_nothing_is_lost(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let p = m.path("f");
    write_file(&p, b"kept").unwrap();
    setxattr(&p, "user.small", b"s", 0).unwrap();
    // One value larger than S3's 2 KiB of metadata can ever hold: E2BIG.
    assert_eq!(errno_of(setxattr(&p, "user.huge", &[b'x'; 3000], 0)), libc::E2BIG);
    // Values that fit one by one until the set no longer does: ENOSPC, and the earlier ones stay.
    let mut stored = vec!["user.small".to_string()];
    let mut refused = false;
    for i in 0..10 {
        let name = format!("user.v{i}");
        match setxattr(&p, &name, &[b'y'; 300], 0) {
            Ok(()) => stored.push(name),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "ten 300-byte values cannot fit 2 KiB of metadata");
    stored.sort();
    assert!(stored.len() >= 3, "{stored:?}");
    m.unmount();
    let m = TestMount::mount(&vol);
    assert_eq!(listxattr(&m.path("f")), stored);
    assert_eq!(fs::read(m.path("f")).unwrap(), b"kept");
    // A directory's marker has the same limit, and keeps what fitted.
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    assert_eq!(errno_of(setxattr(&d, "user.huge", &[b'x'; 3000], 0)), libc::E2BIG);
    let mut kept = Vec::new();
    let mut refused = false;
    for i in 0..10 {
        let name = format!("user.v{i}");
        match setxattr(&d, &name, &[b'y'; 300], 0) {
            Ok(()) => kept.push(name),
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                refused = true;
                break;
            }
        }
    }
    assert!(refused && kept.len() >= 3, "{kept:?}");
    m.unmount();
    let m = TestMount::mount(&vol);
    assert_eq!(listxattr(&m.path("d")), kept);
}

/// The metadata of an object whose only extended attribute is `user.secret-label` = `TOPSECRETVALUE`.
fn secret_label_stored_as_the_mode_requires(mode: KeyMode, meta: &std::collections::HashMap<String, String>) {
    let all: String = meta.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    if mode.is_client_side() {
        // Neither the name nor the value, in clear or in base64, is anywhere in the object's metadata.
        for secret in ["secret-label", "TOPSECRETVALUE", "VE9QU0VDUkVUVkFMVUU"] {
            assert!(!all.contains(secret), "{secret} in the metadata:\n{all}");
        }
        assert!(
            meta.contains_key("s3crypt-xattr") && !meta.contains_key("xattr"),
            "{all}"
        );
    } else {
        // s3fs's form: the URL-encoded JSON object of base64 values.
        assert_eq!(
            meta.get("xattr").map(String::as_str),
            Some("%7B%22user.secret-label%22%3A%22VE9QU0VDUkVUVkFMVUU%3D%22%7D"),
            "{all}"
        );
    }
}

fn xattrs_are_stored_as_the_mode_requires(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let p = m.path("f");
    write_file(&p, b"x").unwrap();
    setxattr(&p, "user.secret-label", b"TOPSECRETVALUE", 0).unwrap();
    m.unmount();
    secret_label_stored_as_the_mode_requires(mode, &head_metadata(&vol.bucket, "f"));
}

/// Extended attributes on directories (xattr(7) makes no exception for them): the same calls, flags and errors
/// as on files, kept in the directory's marker object (made for a directory that existed only as the prefix of
/// its files), across a chmod, a remount and a rename; sealed in the client-side modes.
fn directory_xattrs_live_in_the_marker_and_survive_remount_chmod_and_rename(mode: KeyMode) {
    use std::os::unix::fs::PermissionsExt;
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    write_file(&m.path("d/f"), b"x").unwrap();
    assert_eq!(listxattr(&d), Vec::<String>::new());
    assert_eq!(errno_of(getxattr(&d, "user.a")), libc::ENODATA);
    setxattr(&d, "user.secret-label", b"TOPSECRETVALUE", 0).unwrap();
    setxattr(&d, "user.b", b"2", libc::XATTR_CREATE).unwrap();
    assert_eq!(errno_of(setxattr(&d, "user.b", b"x", libc::XATTR_CREATE)), libc::EEXIST);
    assert_eq!(
        errno_of(setxattr(&d, "user.nope", b"x", libc::XATTR_REPLACE)),
        libc::ENODATA
    );
    assert_eq!(listxattr(&d), ["user.b", "user.secret-label"]);
    assert_eq!(getxattr_sized(&d, "user.secret-label", 0).unwrap().0, 14);
    assert_eq!(errno_of(getxattr_sized(&d, "user.secret-label", 3)), libc::ERANGE);
    removexattr(&d, "user.b").unwrap();
    assert_eq!(errno_of(removexattr(&d, "user.b")), libc::ENODATA);
    // A chmod rewrites the marker and keeps them.
    fs::set_permissions(&d, fs::Permissions::from_mode(0o750)).unwrap();
    // A directory with no marker (made by another client that wrote only a file below it) gets one.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::s3_client().await;
        c.put_object()
            .bucket(&vol.bucket)
            .key("implicit/g")
            .send()
            .await
            .unwrap();
    });
    let implicit = m.path("implicit");
    assert!(fs::metadata(&implicit).unwrap().is_dir());
    setxattr(&implicit, "user.made", b"1", 0).unwrap();
    // The mount's root has no marker: not supported.
    assert_eq!(errno_of(setxattr(m.mnt.path(), "user.a", b"1", 0)), libc::ENOTSUP);
    m.unmount();

    let m = TestMount::mount(&vol);
    let (d, implicit) = (m.path("d"), m.path("implicit"));
    assert_eq!(getxattr(&d, "user.secret-label").unwrap(), b"TOPSECRETVALUE");
    assert_eq!(listxattr(&d), ["user.secret-label"]);
    assert_eq!(fs::metadata(&d).unwrap().permissions().mode() & 0o7777, 0o750);
    assert_eq!(getxattr(&implicit, "user.made").unwrap(), b"1");
    fs::rename(&d, m.path("e")).unwrap();
    assert_eq!(getxattr(&m.path("e"), "user.secret-label").unwrap(), b"TOPSECRETVALUE");
    assert_eq!(fs::read(m.path("e/f")).unwrap(), b"x");
    m.unmount();

    secret_label_stored_as_the_mode_requires(mode, &head_metadata(&vol.bucket, "e/"));
}

fn a_capability_query_costs_no_request(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let p = m.path("f");
    write_file(&p, b"x").unwrap();
    let _ = fs::metadata(&p).unwrap();
    let asked = |what: &str| {
        let s = m.counter.stats();
        let asked: Vec<(OpKind, u64)> = OpKind::ALL
            .iter()
            .map(|op| (*op, s.count(*op)))
            .filter(|(_, n)| *n > 0)
            .collect();
        assert!(asked.is_empty(), "{what} asked S3: {asked:?}");
    };
    m.counter.reset();
    for _ in 0..20 {
        assert_eq!(errno_of(getxattr(&p, "security.capability")), libc::ENODATA);
    }
    asked("capability queries on a closed file");
    // The same through an open file (the kernel asks before each write).
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    m.counter.reset();
    for _ in 0..20 {
        assert_eq!(errno_of(getxattr(&p, "security.capability")), libc::ENODATA);
    }
    asked("capability queries on an open file");
    common::mount::close_checked(f).unwrap();
}

/// isatty(3) asks TCGETS; a file that is no terminal answers ENOTTY ("Inappropriate ioctl for device"), as on
/// any local file system, for a file and for a directory, open for reading or for writing.
fn a_terminal_query_on_a_file_is_enotty(mode: KeyMode) {
    use std::os::fd::AsRawFd;
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let p = m.path("f");
    write_file(&p, b"data").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    let tcgets = |f: &fs::File| {
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, t.as_mut_ptr()) };
        assert_eq!(r, -1, "TCGETS succeeded on a file of the mount");
        std::io::Error::last_os_error().raw_os_error().unwrap()
    };
    let f = fs::File::open(&p).unwrap();
    assert_eq!(tcgets(&f), libc::ENOTTY, "TCGETS on a file open for reading");
    let w = fs::OpenOptions::new().append(true).open(&p).unwrap();
    assert_eq!(tcgets(&w), libc::ENOTTY, "TCGETS on a file open for writing");
    assert_eq!(unsafe { libc::isatty(w.as_raw_fd()) }, 0);
    let d = fs::File::open(m.path("d")).unwrap();
    assert_eq!(tcgets(&d), libc::ENOTTY, "TCGETS on a directory");
    common::mount::close_checked(w).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"data");
}

/// s3fs on a bucket, in the foreground as a child process, unmounted on drop.
struct S3fs {
    mnt: tempfile::TempDir,
    child: std::process::Child,
    _passwd: tempfile::TempDir,
}

impl S3fs {
    fn mount(bucket: &str) -> S3fs {
        let endpoint = common::endpoint();
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        let id = std::env::var("AWS_ACCESS_KEY_ID").unwrap();
        let secret = std::env::var("AWS_SECRET_ACCESS_KEY").unwrap();
        fs::write(&passwd, format!("{id}:{secret}\n")).unwrap();
        fs::set_permissions(&passwd, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let mnt = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("s3fs")
            .arg(bucket)
            .arg(mnt.path())
            .args(["-f", "-o", &format!("passwd_file={}", passwd.display())])
            .args(["-o", &format!("url={endpoint}"), "-o", "use_path_request_style"])
            .args(["-o", "endpoint=us-east-1", "-o", "use_xattr"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("s3fs is installed (scripts/test installs it)");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let root_dev = fs::metadata(mnt.path().parent().unwrap()).unwrap().dev();
        while fs::metadata(mnt.path()).unwrap().dev() == root_dev {
            assert!(std::time::Instant::now() < deadline, "s3fs did not mount within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        S3fs {
            mnt,
            child,
            _passwd: dir,
        }
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.mnt.path().join(rel)
    }
}

impl Drop for S3fs {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg(self.mnt.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.mnt.path())
                .status();
        }
        // s3fs exits once unmounted; never wait forever on it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bucket in an SSE mode reads the same through s3fs: special files, modes, rdev, times and xattrs written by
/// either one are what the other shows.
#[test]
fn an_sse_bucket_reads_the_same_through_s3fs() {
    let vol = Volume::new(KeyMode::SseS3);
    let m = TestMount::mount(&vol);
    let chr = libc::makedev(1, 3);
    mknod(&m.path("fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
    mknod(&m.path("chr"), libc::S_IFCHR | 0o600, chr).unwrap();
    write_file(&m.path("f"), b"from s3crypt").unwrap();
    setxattr(&m.path("f"), "user.from", b"s3crypt", 0).unwrap();
    utimensat(&m.path("f"), ts(1_900_000_000, 0), ts(1_800_000_000, 0)).unwrap();
    m.unmount();

    let s = S3fs::mount(&vol.bucket);
    let md = |n: &str| fs::symlink_metadata(s.path(n)).unwrap_or_else(|e| panic!("s3fs: stat {n}: {e}"));
    assert!(md("fifo").file_type().is_fifo());
    assert_eq!(md("fifo").mode() & 0o7777, 0o640);
    // s3fs 1.90 keeps no device number (it shows 0); the type and mode are what it reads.
    assert!(md("chr").file_type().is_char_device());
    assert_eq!(md("chr").mode() & 0o7777, 0o600);
    assert_eq!(fs::read(s.path("f")).unwrap(), b"from s3crypt");
    assert_eq!(md("f").mtime(), 1_800_000_000);
    assert_eq!(getxattr(&s.path("f"), "user.from").unwrap(), b"s3crypt");
    // And the other way round.
    mknod(&s.path("fifo2"), libc::S_IFIFO | 0o604, 0).unwrap();
    write_file(&s.path("g"), b"from s3fs").unwrap();
    setxattr(&s.path("g"), "user.from", b"s3fs", 0).unwrap();
    drop(s);

    let m = TestMount::mount(&vol);
    let md = fs::symlink_metadata(m.path("fifo2")).unwrap();
    assert!(md.file_type().is_fifo());
    assert_eq!(md.mode() & 0o7777, 0o604);
    assert_eq!(fs::read(m.path("g")).unwrap(), b"from s3fs");
    assert_eq!(getxattr(&m.path("g"), "user.from").unwrap(), b"s3fs");
}

/// A mount of `vol` with directory `d` of `n` files `f0000`.. of 0, 1, 2, .. bytes, `f0007` in mode 0600.
fn listing_volume(vol: &Volume, n: usize) -> TestMount {
    let m = TestMount::mount_with(vol, &["metadata_ttl=60s"]);
    fs::create_dir(m.path("d")).unwrap();
    for i in 0..n {
        write_file(&m.path(&format!("d/f{i:04}")), &vec![b'x'; i]).unwrap();
    }
    fs::set_permissions(m.path("d/f0007"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    m
}

/// A [`listing_volume`] of `n` files whose mount has ended (its directory index written), mounted afresh with
/// `option`, the request counter at zero.
fn cold_listing(mode: KeyMode, n: usize, option: &str) -> (Volume, TestMount) {
    let vol = Volume::new(mode);
    listing_volume(&vol, n).unmount();
    let m = TestMount::mount_with(&vol, &[option]);
    m.counter.reset();
    (vol, m)
}

/// `ls -l` of a cold directory: one LIST per 1,000 names and about one HEAD per file (sent in parallel ahead of
/// the lookups); `find -type f` only the LISTs. The attributes shown are the files' own.
fn a_long_listing_costs_about_one_head_per_file(mode: KeyMode) {
    // Enough names for several READDIRPLUS replies (a reply holds about 400 here).
    const N: usize = 1000;
    let (vol, m) = cold_listing(mode, N, "metadata_ttl=60s");
    let out = std::process::Command::new("find")
        .arg(m.path("d"))
        .args(["-type", "f"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), N);
    let s = m.counter.stats();
    // The directory's own lookup: a HEAD of the name (nothing), a LIST, a HEAD of its marker.
    assert_eq!(s.count(OpKind::Head), 2, "find: no HEAD per file");
    assert!(s.count(OpKind::List) <= 3, "find: {} LISTs", s.count(OpKind::List));
    m.unmount();

    // Without the directory's attribute index (as for a directory another client wrote): HEADs.
    delete_object(&vol.bucket, &index_key("d/"));
    let m = TestMount::mount_with(&vol, &["metadata_ttl=60s"]);
    m.counter.reset();
    let rows = long_listing(&m.path("d"));
    assert_eq!(rows.len(), N);
    for (i, cols) in rows.iter().enumerate() {
        assert_eq!(cols[4], i.to_string(), "size of {cols:?}");
        let want = if i == 7 { "-rw-------" } else { "-rw-r--r--" };
        assert_eq!(cols[0], want, "mode of {cols:?}");
    }
    let s = m.counter.stats();
    let total: u64 = OpKind::ALL.iter().map(|op| s.count(*op)).sum();
    // After the first lookup, the others were answered by HEADs sent ahead, in parallel.
    let prefetched = m.fs.stats().lookups_prefetched;
    assert!(prefetched as usize >= N - 10, "{prefetched} of {N} lookups prefetched");
    assert!(
        total as f64 <= 1.05 * N as f64,
        "ls -l of {N} files sent {total} requests ({} HEAD, {} LIST)",
        s.count(OpKind::Head),
        s.count(OpKind::List)
    );
    assert_eq!(m.fs.stats().lookups_indexed, 0);
    // What those HEADs saw becomes the directory's index at unmount: the next cold long listing sends none.
    m.unmount();
    let m = TestMount::mount_with(&vol, &["metadata_ttl=60s"]);
    m.counter.reset();
    assert_eq!(long_listing(&m.path("d")).len(), N);
    assert_eq!(m.fs.stats().lookups_indexed, N as u64);
    // The directory's own lookup: a HEAD of the name (nothing), a LIST, a HEAD of its marker.
    assert_eq!(m.counter.stats().count(OpKind::Head), 2, "no HEAD per file");
}

/// The key of the attribute index of the directory whose children have key prefix `dir` (docs/FORMAT.md).
fn index_key(dir: &str) -> String {
    use sha2::Digest;
    format!(".s3crypt-index/{}", hex::encode(sha2::Sha256::digest(dir.as_bytes())))
}

fn delete_object(bucket: &str, key: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::s3_client().await;
        c.delete_object().bucket(bucket).key(key).send().await.unwrap();
    });
}

fn get_object(bucket: &str, key: &str) -> Vec<u8> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::s3_client().await;
        let out = c.get_object().bucket(bucket).key(key).send().await.unwrap();
        out.body.collect().await.unwrap().into_bytes().to_vec()
    })
}

fn put_object(bucket: &str, key: &str, body: &[u8]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::s3_client().await;
        let body = aws_sdk_s3::primitives::ByteStream::from(body.to_vec());
        c.put_object().bucket(bucket).key(key).body(body).send().await.unwrap();
    });
}

/// A metadata-only change by another client, as s3fs's chmod makes it: a copy of the object onto itself with
/// `mode` replaced and everything else kept.
fn foreign_chmod(bucket: &str, key: &str, mode: u32) {
    let mut meta = head_metadata(bucket, key);
    meta.insert("mode".into(), mode.to_string());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::s3_client().await;
        c.copy_object()
            .bucket(bucket)
            .key(key)
            .copy_source(format!("{bucket}/{key}"))
            .metadata_directive(aws_sdk_s3::types::MetadataDirective::Replace)
            .set_metadata(Some(meta))
            .send()
            .await
            .unwrap();
    });
}

/// `ls -l --time-style=+%s` of `dir`: the columns of each row (mode, links, owner, group, size, mtime, name).
fn long_listing(dir: &Path) -> Vec<Vec<String>> {
    let out = std::process::Command::new("ls")
        .args(["-l", "--time-style=+%s"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .skip(1)
        .map(|row| row.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// A directory this mount wrote to keeps an attribute index: a cold `ls -l` costs its LIST and one GET, and shows
/// the files' own modes, sizes and times. The index only answers for files whose listing entry it still matches:
/// a file another client changed, a file gone, a malformed index cost HEADs, never a wrong attribute. In the
/// client-side modes the index holds no extended attribute in clear.
fn a_long_listing_is_answered_by_the_directory_index(mode: KeyMode) {
    const N: usize = 64;
    let vol = Volume::new(mode);
    let m = listing_volume(&vol, N);
    utimensat(&m.path("d/f0005"), ts(1_800_000_000, 0), ts(1_800_000_000, 5)).unwrap();
    setxattr(&m.path("d/f0003"), "user.secret-label", b"TOPSECRETVALUE", 0).unwrap();
    m.unmount();

    let index = get_object(&vol.bucket, &index_key("d/"));
    assert!(index.starts_with(b"s3cdirx1"), "the index object is there");
    if mode.is_client_side() {
        let text = String::from_utf8_lossy(&index);
        for secret in ["secret-label", "TOPSECRETVALUE", "VE9QU0VDUkVUVkFMVUU"] {
            assert!(!text.contains(secret), "{secret} in the index");
        }
    }
    // `changed`: after the other client's chmod of f0010 and delete of f0012.
    let check = |rows: &[Vec<String>], changed: bool| {
        let want: Vec<usize> = (0..N).filter(|i| !(changed && *i == 12)).collect();
        assert_eq!(rows.len(), want.len());
        for (cols, i) in rows.iter().zip(want) {
            assert_eq!(cols[6], format!("f{i:04}"));
            assert_eq!(cols[4], i.to_string(), "size of {cols:?}");
            let perm = match i {
                7 => "-rw-------",
                10 if changed => "-rw-r-----",
                _ => "-rw-r--r--",
            };
            assert_eq!(cols[0], perm, "mode of {cols:?}");
            if i == 5 {
                assert_eq!(cols[5], "1800000000", "mtime of {cols:?}");
            }
        }
    };
    let m = TestMount::mount_with(&vol, &["metadata_ttl=60s"]);
    m.counter.reset();
    check(&long_listing(&m.path("d")), false);
    let s = m.counter.stats();
    // The directory's own lookup is a HEAD of the name, a LIST and a HEAD of its marker; then one LIST, one GET.
    assert_eq!(
        (s.count(OpKind::Head), s.count(OpKind::Get)),
        (2, 1),
        "no HEAD per file, one GET of the index"
    );
    let st = m.fs.stats();
    assert_eq!(st.lookups_indexed, N as u64);
    // The kernel's first READDIRPLUS reply carried attributes (each entry a lookup of its own inode).
    assert!(st.entries_plus > 0, "no entry was sent with its attributes");
    assert_eq!(
        getxattr(&m.path("d/f0003"), "user.secret-label").unwrap(),
        b"TOPSECRETVALUE"
    );
    // Names sent that way are ordinary inodes: globbing sees every one (no entry with inode 0), and one can be
    // removed, made again and read.
    let glob = std::process::Command::new("bash")
        .args(["-c", "cd \"$1\" && echo *", "-"])
        .arg(m.path("d"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&glob.stdout).split_whitespace().count(), N);
    fs::remove_file(m.path("d/f0001")).unwrap();
    assert_eq!(errno_of(fs::metadata(m.path("d/f0001"))), libc::ENOENT);
    write_file(&m.path("d/f0001"), b"x").unwrap();
    assert_eq!(fs::read(m.path("d/f0001")).unwrap(), b"x");
    m.unmount();

    // Another client changes one file's mode (a second later, so that S3's time of it changes) and deletes
    // another: the first is HEADed, the second is gone, the rest still come from the index.
    std::thread::sleep(Duration::from_millis(1100));
    foreign_chmod(&vol.bucket, "d/f0010", 0o100640);
    delete_object(&vol.bucket, "d/f0012");
    let m = TestMount::mount_with(&vol, &["metadata_ttl=60s"]);
    m.counter.reset();
    check(&long_listing(&m.path("d")), true);
    assert_eq!(
        m.counter.stats().count(OpKind::Head),
        2 + 1,
        "only the changed file is HEADed"
    );
    m.unmount();

    // A malformed index is not used: every file is HEADed, and the HEADs make a new index at unmount.
    put_object(&vol.bucket, &index_key("d/"), b"s3cdirx1 not an index");
    let m = TestMount::mount_with(&vol, &["metadata_ttl=60s"]);
    m.counter.reset();
    check(&long_listing(&m.path("d")), true);
    assert_eq!(m.counter.stats().count(OpKind::Head), 2 + (N as u64 - 1));
    assert_eq!(m.fs.stats().lookups_indexed, 0);
    m.unmount();
    let m = TestMount::mount_with(&vol, &["metadata_ttl=60s"]);
    m.counter.reset();
    check(&long_listing(&m.path("d")), true);
    assert_eq!(m.counter.stats().count(OpKind::Head), 2);
}

/// A long listing read for longer than `metadata_ttl` (`ls -l` of 10,000 files takes seconds) keeps the index's
/// answers while its directory stream is open: the names and the attributes are of one moment, and the rest of
/// the listing costs no HEAD per file. Once the stream is closed and the TTL has passed, a stat asks S3 again.
fn a_long_listing_read_for_longer_than_the_ttl_is_still_answered_by_the_index(mode: KeyMode) {
    // Enough names for several READDIRPLUS replies (a reply holds about 400 here).
    const N: usize = 1000;
    let (_vol, m) = cold_listing(mode, N, "metadata_ttl=500ms");
    let check = |name: &std::ffi::OsStr| {
        let md = fs::symlink_metadata(m.path("d").join(name)).unwrap();
        let i: usize = name.to_str().unwrap()[1..].parse().unwrap();
        assert_eq!(md.len(), i as u64, "size of {name:?}");
        let perm = if i == 7 { 0o600 } else { 0o644 };
        assert_eq!(md.mode() & 0o777, perm, "mode of {name:?}");
    };
    let mut stream = fs::read_dir(m.path("d")).unwrap();
    let first = stream.next().unwrap().unwrap().file_name();
    // The first reply is in; the rest of the listing is read after the TTL has passed, each name stat-ed as it
    // comes, as `ls -l` does: the first reply's names by lookups, the later ones sent with their attributes in
    // READDIRPLUS replies (the kernel asks for those once names of the directory are looked up). The last name
    // is left alone for the end.
    std::thread::sleep(Duration::from_millis(800));
    check(&first);
    let mut seen = 1;
    for entry in stream.by_ref() {
        let name = entry.unwrap().file_name();
        seen += 1;
        if name != "f0999" {
            check(&name);
        }
    }
    assert_eq!(seen, N);
    let heads = m.counter.stats().count(OpKind::Head);
    // The directory's own lookups (a HEAD of its name and of its marker each time its TTL runs out) and nothing
    // per file: without the stream's answers, a thousand.
    assert!(heads < 20, "{heads} HEADs for a listing the index answers");
    assert_eq!(m.fs.stats().lookups_indexed, N as u64);

    // Closed, and past the TTL: the index's answer for the last name is not used any more.
    drop(stream);
    std::thread::sleep(Duration::from_millis(800));
    fs::metadata(m.path("d")).unwrap();
    m.counter.reset();
    check(std::ffi::OsStr::new("f0999"));
    let heads = m.counter.stats().count(OpKind::Head);
    assert_eq!(heads, 1, "a stat past the TTL of a closed listing asks S3");
}

/// The volume descriptor and the directory indexes live at the mount's root under names no entry may take there:
/// creating, making or renaming onto them is EPERM, and they never show. Below the root the names are ordinary.
fn names_that_hold_s3crypt_objects_are_reserved_at_the_root(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    for i in 0..20 {
        write_file(&m.path(&format!("f{i}")), b"x").unwrap();
    }
    for name in [".s3crypt-volume", ".s3crypt-index"] {
        assert_eq!(errno_of(fs::File::create(m.path(name))), libc::EPERM, "create {name}");
        assert_eq!(errno_of(fs::create_dir(m.path(name))), libc::EPERM, "mkdir {name}");
        assert_eq!(
            errno_of(std::os::unix::fs::symlink("f0", m.path(name))),
            libc::EPERM,
            "symlink {name}"
        );
        assert_eq!(
            errno_of(mknod(&m.path(name), libc::S_IFIFO | 0o644, 0)),
            libc::EPERM,
            "mknod {name}"
        );
        assert_eq!(
            errno_of(fs::rename(m.path("f0"), m.path(name))),
            libc::EPERM,
            "rename onto {name}"
        );
        assert_eq!(errno_of(fs::metadata(m.path(name))), libc::ENOENT, "stat {name}");
    }
    m.unmount();
    assert!(
        object_exists(&vol.bucket, &index_key("")),
        "the root's index was written"
    );
    let m = TestMount::mount(&vol);
    let names: Vec<String> = fs::read_dir(m.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 20, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with('f')), "{names:?}");
    assert_eq!(errno_of(fs::remove_dir(m.path(".s3crypt-index"))), libc::ENOENT);
    assert_eq!(errno_of(fs::remove_file(m.path(".s3crypt-volume"))), libc::ENOENT);
    assert_eq!(fs::read(m.path("f0")).unwrap(), b"x");
    // Below the root they are names like any other.
    fs::create_dir(m.path("d")).unwrap();
    write_file(&m.path("d/.s3crypt-volume"), b"mine").unwrap();
    fs::create_dir(m.path("d/.s3crypt-index")).unwrap();
    m.unmount();
    let m = TestMount::mount(&vol);
    assert_eq!(fs::read(m.path("d/.s3crypt-volume")).unwrap(), b"mine");
    assert!(fs::metadata(m.path("d/.s3crypt-index")).unwrap().is_dir());
}
