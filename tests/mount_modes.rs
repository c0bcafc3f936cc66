//! The mount through real FUSE against the local S3 + KMS server: each test body runs in all five key modes.
mod common;

use common::mount::{close_checked, pattern, write_file, TestMount, Volume};
use s3crypt::keys::KeyMode;
use s3crypt::store::failing::OpKind;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

/// Plaintext bytes per multipart part at the default 64 KiB block size (parts are whole blocks of at least 8 MiB
/// of object bytes).
fn part_plain_bytes(mode: KeyMode, b: u64) -> u64 {
    let stored = if mode.is_client_side() { b + 28 } else { b };
    (8 * 1024 * 1024u64).div_ceil(stored) * b
}

macro_rules! in_all_modes {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use s3crypt::keys::KeyMode;
                #[test]
                fn sse_s3() { super::$name(KeyMode::SseS3) }
                #[test]
                fn sse_kms() { super::$name(KeyMode::SseKms) }
                #[test]
                fn sse_c() { super::$name(KeyMode::SseC) }
                #[test]
                fn cse_kms() { super::$name(KeyMode::CseKms) }
                #[test]
                fn cse_local() { super::$name(KeyMode::CseLocal) }
            }
        )*
    };
}

in_all_modes!(
    round_trip_sizes,
    random_io,
    overwrite_middle_of_large_file,
    namespace_survives_remount,
    two_writers_conflict
);

/// Write, read back, unmount, remount, read back, for sizes around block and part boundaries; then check what S3
/// holds for the mode.
fn round_trip_sizes(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let b = m.block_size;
    let sizes = [0, 1, b - 1, b, b + 1, 3 * part_plain_bytes(mode, b) + 1];
    let generated_before = m.key_stats.snapshot().kms_generate;
    for (i, &size) in sizes.iter().enumerate() {
        let data = pattern(size as usize, i as u64);
        write_file(&m.path(&format!("f{size}")), &data).unwrap();
        assert_eq!(
            fs::read(m.path(&format!("f{size}"))).unwrap(),
            data,
            "size {size} before remount"
        );
    }
    if mode == KeyMode::CseKms {
        let generated = m.key_stats.snapshot().kms_generate - generated_before;
        assert_eq!(generated, sizes.len() as u64, "one GenerateDataKey per file created");
    }
    m.unmount();
    let m = TestMount::mount(&vol);
    for (i, &size) in sizes.iter().enumerate() {
        let data = pattern(size as usize, i as u64);
        let got = fs::read(m.path(&format!("f{size}"))).unwrap();
        assert_eq!(got.len(), data.len(), "size {size} after remount");
        assert!(got == data, "content of size {size} after remount");
        assert_eq!(fs::metadata(m.path(&format!("f{size}"))).unwrap().len(), size);
    }
    check_what_s3_holds(&vol, b);
}

/// In SSE modes HEAD shows the mode's encryption; sse-c objects are refused without the key; in the client-side
/// modes the body holds no 16-byte window of the plaintext and the metadata holds the wrapped key.
fn check_what_s3_holds(vol: &Volume, b: u64) {
    let key = format!("f{}", b + 1);
    let plain = pattern((b + 1) as usize, 4);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::s3_client().await;
        let head = c.head_object().bucket(&vol.bucket).key(&key).send().await;
        match vol.mode {
            KeyMode::SseC => {
                let err = head.expect_err("HEAD of an sse-c object without the key must be refused");
                let got = c.get_object().bucket(&vol.bucket).key(&key).send().await;
                assert!(
                    got.is_err(),
                    "GET of an sse-c object without the key must be refused: {err:?}"
                );
            }
            KeyMode::SseS3 => {
                let head = head.unwrap();
                assert_eq!(head.server_side_encryption().map(|s| s.as_str()), Some("AES256"));
            }
            KeyMode::SseKms => {
                let head = head.unwrap();
                assert_eq!(head.server_side_encryption().map(|s| s.as_str()), Some("aws:kms"));
                let id = head.ssekms_key_id().unwrap_or_default();
                let key_id = vol.kms_arn.rsplit('/').next().unwrap();
                assert!(id.contains(key_id), "KMS key id {id} is not {}", vol.kms_arn);
            }
            KeyMode::CseKms | KeyMode::CseLocal => {
                let head = head.unwrap();
                let meta = head.metadata().cloned().unwrap_or_default();
                let wrapped = meta.get("s3crypt-key").cloned().unwrap_or_default();
                assert!(wrapped.len() > 40, "metadata holds the wrapped key: {meta:?}");
                let body = c.get_object().bucket(&vol.bucket).key(&key).send().await.unwrap();
                let body = body.body.collect().await.unwrap().into_bytes();
                assert_eq!(body.len() as u64, b + 1 + 2 * 28);
                let windows: std::collections::HashSet<&[u8]> = body.windows(16).collect();
                assert!(
                    plain.windows(16).all(|w| !windows.contains(w)),
                    "plaintext found in the object body"
                );
            }
        }
    });
}

/// Random writes and reads across block and part boundaries, append, truncate down and up, fsync; checked
/// against a model, again after reopen and after remount.
fn random_io(mode: KeyMode) {
    use rand::{Rng, SeedableRng};
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let b = m.block_size;
    let part = part_plain_bytes(mode, b);
    let mut model = pattern((2 * part + 3 * b) as usize, 9);
    write_file(&m.path("r"), &model).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(mode as u64);
    let mut f = OpenOptions::new().read(true).write(true).open(m.path("r")).unwrap();
    let boundaries = [
        0,
        1,
        b - 1,
        b,
        b + 1,
        part - 1,
        part,
        part + 1,
        2 * part - 3,
        2 * part + b,
    ];
    for (k, &at) in boundaries.iter().enumerate() {
        let len = rng.gen_range(1..3 * b as usize);
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        f.write_all_at(&data, at).unwrap();
        let end = at as usize + len;
        if end > model.len() {
            model.resize(end, 0);
        }
        model[at as usize..end].copy_from_slice(&data);
        if k % 3 == 0 {
            f.sync_all().unwrap();
        }
        let probe = rng.gen_range(0..model.len() as u64);
        let mut buf = vec![0u8; 2 * b as usize];
        let n = f.read_at(&mut buf, probe).unwrap();
        let want = &model[probe as usize..(probe as usize + 2 * b as usize).min(model.len())];
        assert_eq!(&buf[..n], want, "read at {probe} after write at {at}");
    }
    // Truncate into a block that is dirty (written, not yet saved), then extend: the cut bytes must read as zeros.
    let cut = 2 * b + 100;
    f.write_all_at(&[0x77; 300], cut - 50).unwrap();
    model[(cut - 50) as usize..(cut + 250) as usize].fill(0x77);
    f.set_len(cut).unwrap();
    model.truncate(cut as usize);
    f.set_len(cut + 4000).unwrap();
    model.resize((cut + 4000) as usize, 0);
    let mut buf = vec![0u8; 500];
    let n = f.read_at(&mut buf, cut - 100).unwrap();
    assert_eq!(
        &buf[..n],
        &model[(cut - 100) as usize..(cut + 400) as usize],
        "bytes cut from a dirty block"
    );
    // Append, truncate down into a block, truncate up past the old end.
    f.seek(SeekFrom::End(0)).unwrap();
    f.write_all(b"appended").unwrap();
    model.extend_from_slice(b"appended");
    let down = part + b / 2;
    f.set_len(down).unwrap();
    model.truncate(down as usize);
    let up = down + 3 * b + 7;
    f.set_len(up).unwrap();
    model.resize(up as usize, 0);
    f.sync_all().unwrap();
    let mut all = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut all).unwrap();
    assert!(all == model, "content after append and truncates");
    close_checked(f).unwrap();
    assert!(fs::read(m.path("r")).unwrap() == model, "after reopen");
    m.unmount();
    let m = TestMount::mount(&vol);
    assert!(fs::read(m.path("r")).unwrap() == model, "after remount");
}

/// 4 KiB written into the middle of a 64 MiB file sends at most two parts of new bytes; the rest is copied
/// inside S3.
fn overwrite_middle_of_large_file(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let b = m.block_size;
    let part = part_plain_bytes(mode, b);
    let size = 64 * 1024 * 1024 + 12_345u64;
    let mut model = pattern(size as usize, 77);
    write_file(&m.path("big"), &model).unwrap();
    m.counter.reset();
    let mid = size / 2 - 2048;
    let f = OpenOptions::new().write(true).open(m.path("big")).unwrap();
    f.write_all_at(&[0xAB; 4096], mid).unwrap();
    close_checked(f).unwrap();
    model[mid as usize..mid as usize + 4096].fill(0xAB);
    let s = m.counter.stats();
    let parts = size.div_ceil(part);
    let sent = s.bytes_up(OpKind::UploadPart) + s.bytes_up(OpKind::Put);
    let stored_part = if mode.is_client_side() {
        part / b * (b + 28)
    } else {
        part
    };
    assert!(
        s.count(OpKind::UploadPart) <= 2,
        "{} parts sent",
        s.count(OpKind::UploadPart)
    );
    assert!(
        sent <= 2 * stored_part,
        "{sent} bytes sent, more than two parts of {stored_part}"
    );
    assert!(
        s.count(OpKind::UploadPartCopy) >= parts - 2,
        "unchanged parts are copied inside S3"
    );
    assert_eq!(s.count(OpKind::Put), 0);
    m.unmount();
    let m = TestMount::mount(&vol);
    let got = fs::read(m.path("big")).unwrap();
    assert!(got == model, "content after the overwrite");
}

/// rename (file and directory), mkdir, rmdir, unlink, symlink, chmod, chown and utime survive a remount.
fn namespace_survives_remount(mode: KeyMode) {
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    fs::create_dir(m.path("d")).unwrap();
    fs::create_dir(m.path("d/sub")).unwrap();
    write_file(&m.path("d/sub/x"), b"x-data").unwrap();
    write_file(&m.path("d/y"), b"y-data").unwrap();
    write_file(&m.path("a"), b"a-data").unwrap();
    write_file(&m.path("gone"), b"bye").unwrap();
    fs::rename(m.path("a"), m.path("b")).unwrap();
    fs::rename(m.path("d"), m.path("e")).unwrap();
    let err = fs::remove_dir(m.path("e")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY));
    fs::create_dir(m.path("empty")).unwrap();
    fs::create_dir(m.path("rm-me")).unwrap();
    fs::remove_dir(m.path("rm-me")).unwrap();
    fs::remove_file(m.path("gone")).unwrap();
    std::os::unix::fs::symlink("e/y", m.path("link")).unwrap();
    fs::set_permissions(m.path("b"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(m.path("b"), Some(1234), Some(5678)).unwrap();
    fs::set_permissions(m.path("empty"), fs::Permissions::from_mode(0o700)).unwrap();
    // utime through an open handle, on another file: a later upload of `b` must not be what saves its chmod.
    write_file(&m.path("u"), b"u-data").unwrap();
    let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
    File::options()
        .write(true)
        .open(m.path("u"))
        .unwrap()
        .set_modified(when)
        .unwrap();
    m.unmount();

    let m = TestMount::mount(&vol);
    assert_eq!(fs::read(m.path("b")).unwrap(), b"a-data");
    assert!(!m.path("a").exists());
    assert_eq!(fs::read(m.path("e/sub/x")).unwrap(), b"x-data");
    assert_eq!(fs::read(m.path("e/y")).unwrap(), b"y-data");
    assert!(!m.path("d").exists());
    assert!(m.path("empty").is_dir());
    assert!(!m.path("rm-me").exists());
    assert!(!m.path("gone").exists());
    assert_eq!(fs::read_link(m.path("link")).unwrap(), std::path::Path::new("e/y"));
    assert_eq!(fs::read(m.path("link")).unwrap(), b"y-data");
    let md = fs::metadata(m.path("b")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o600);
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!(fs::metadata(m.path("u")).unwrap().mtime(), 1_600_000_000);
    assert_eq!(fs::metadata(m.path("empty")).unwrap().mode() & 0o7777, 0o700);
    let mut names: Vec<String> = fs::read_dir(m.mnt.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["b", "e", "empty", "link", "u"],
        "the volume descriptor is hidden"
    );
}

/// Two mounts of one bucket write the same file: the first close wins, the second fails and keeps its data in
/// its recovery directory. The same for a new file created by both.
fn two_writers_conflict(mode: KeyMode) {
    let vol = Volume::new(mode);
    let a = TestMount::mount(&vol);
    let b = TestMount::mount(&vol);
    write_file(&a.path("shared"), b"original").unwrap();
    let mut fa = OpenOptions::new().write(true).open(a.path("shared")).unwrap();
    let mut fb = OpenOptions::new().write(true).open(b.path("shared")).unwrap();
    fa.write_all(b"from A").unwrap();
    fb.write_all(b"from B, the loser").unwrap();
    close_checked(fa).expect("first close wins");
    let err = close_checked(fb).expect_err("second close must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let recovered = recovery_files(&vol);
    assert_eq!(recovered.len(), 1, "one recovery file: {recovered:?}");
    assert_eq!(fs::read(&recovered[0]).unwrap(), b"from B, the loser");
    assert_eq!(fs::metadata(&recovered[0]).unwrap().mode() & 0o777, 0o600);
    // A new file created by both mounts: If-None-Match lets only one create it.
    let fa = File::create(a.path("new")).unwrap();
    let mut fb = File::create(b.path("new")).unwrap();
    fb.write_all(b"B's new file").unwrap();
    close_checked(fa).expect("first creator wins");
    assert!(close_checked(fb).is_err(), "second creator must fail");
    assert_eq!(recovery_files(&vol).len(), 2);
    drop(b);
    drop(a);
    let c = TestMount::mount(&vol);
    assert_eq!(fs::read(c.path("shared")).unwrap(), b"from Aal");
}

fn recovery_files(vol: &Volume) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(vol.recovery_dir())
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    v.sort_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
    v
}

#[test]
fn mode_names_are_the_option_words() {
    let words: Vec<&str> = common::mount::ALL_MODES.iter().map(|m| m.as_str()).collect();
    assert_eq!(words, ["sse-s3", "sse-kms", "sse-c", "cse-kms", "cse-local"]);
}
