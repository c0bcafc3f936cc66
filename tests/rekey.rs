//! `s3crypt rekey` against LocalStack, in every mode, on 500 files of mixed sizes (empty to 64 MiB): after a
//! rekey the new key reads every file byte for byte and the old key reads nothing; in cse-local and cse-kms the
//! rekey uploads no data (every request body through a proxy is counted); a rerun is idempotent; a rekey killed
//! (SIGINT, SIGKILL) at random moments finishes when run again while a reader finds every file readable
//! throughout; and a mount holding the new key with the old one for reading (`old_master_key_file=`,
//! `old_kms_key_id=`, a second line in the SSE-C key file) reads and rewrites files throughout a rotation
//! without an error, a conflict or a lost write.
mod common;

use common::mount::{pattern, write_file, write_key_file, TestMount, Volume};
use common::proxy::FaultProxy;
use s3crypt::keys::KeyMode;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use s3crypt::keys::KeyMode;
                #[test]
                fn cse_local() { super::$name(KeyMode::CseLocal) }
                #[test]
                fn cse_kms() { super::$name(KeyMode::CseKms) }
            }
        )*
    };
}

/// The new key's option, replacing the old one's.
fn new_key_option(vol: &Volume) -> String {
    match vol.mode {
        KeyMode::CseLocal => {
            let f = write_key_file(vol.dir.path(), "new-master.key");
            format!("master_key_file={}", f.display())
        }
        KeyMode::CseKms => {
            let rt = tokio::runtime::Runtime::new().unwrap();
            format!("kms_key_id={}", rt.block_on(common::create_kms_key()))
        }
        _ => unreachable!("client-side modes only"),
    }
}

/// Files of mixed sizes (empty to several blocks), returned with their contents.
fn fill(vol: &Volume, n: usize) -> Vec<(String, Vec<u8>)> {
    let m = TestMount::mount(vol);
    let bs = m.block_size as usize;
    std::fs::create_dir(m.path("d")).unwrap();
    let mut files = Vec::new();
    for i in 0..n {
        let size = match i % 5 {
            0 => 0,
            1 => 100 + i,
            2 => bs,
            3 => 3 * bs + i,
            _ => 7 * bs + 11,
        };
        let name = if i % 3 == 0 {
            format!("d/f{i:03}")
        } else {
            format!("f{i:03}")
        };
        let data = pattern(size, i as u64);
        write_file(&m.path(&name), &data).unwrap();
        files.push((name, data));
    }
    m.unmount();
    files
}

/// The acceptance set: 500 files from empty to 64 MiB (most small, a few large enough for multipart uploads),
/// written through a mount by eight writers at once.
fn fill_mixed(vol: &Volume) -> Vec<(String, Vec<u8>)> {
    const MIB: usize = 1024 * 1024;
    let sizes: Vec<usize> = (0..500)
        .map(|i| match i {
            0 => 64 * MIB,
            1 => 24 * MIB,
            2..=6 => (i - 1) * MIB + 17,
            _ if i % 50 == 0 => 0,
            _ => (i * 131) % (64 * 1024) + 1,
        })
        .collect();
    let files: Vec<(String, Vec<u8>)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("m{}/f{i:03}", i % 7), pattern(n, 5000 + i as u64)))
        .collect();
    // Eight writers on a loaded machine: give close() time for the 64 MiB file.
    let m = TestMount::mount_with(vol, &["upload_timeout=5m"]);
    for d in 0..7 {
        std::fs::create_dir(m.path(&format!("m{d}"))).unwrap();
    }
    let root = m.mnt.path().to_path_buf();
    in_parallel(&files, |(name, data)| {
        write_file(&root.join(name), data).unwrap_or_else(|e| panic!("writing {name}: {e}"))
    });
    m.unmount();
    files
}

/// The keys of the volume's directory attribute indexes.
fn index_objects(bucket: &str) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::s3_client().await;
        let out = c
            .list_objects_v2()
            .bucket(bucket)
            .prefix(format!("{}/", s3crypt::fs::INDEX_DIR))
            .send()
            .await
            .unwrap();
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect()
    })
}

/// Runs `each` over `items` on eight threads.
fn in_parallel<T: Sync>(items: &[T], each: impl Fn(&T) + Sync) {
    std::thread::scope(|s| {
        for t in 0..8 {
            let each = &each;
            s.spawn(move || items.iter().skip(t).step_by(8).for_each(each));
        }
    });
}

fn rekey(vol: &Volume, extra_old: &[&str], to: &str, args: &[&str]) -> Output {
    let mut old = vol.options.clone();
    old.extend(extra_old.iter().map(|s| s.to_string()));
    let source = format!("s3://{}", vol.bucket);
    let old = old.join(",");
    let mut all = vec!["rekey", &source, "-o", &old, "--to", to];
    all.extend_from_slice(args);
    common::s3crypt_cli(&all)
}

fn read_all_with(vol: &Volume, extra: &[&str], files: &[(String, Vec<u8>)]) {
    let m = TestMount::mount_with(vol, extra);
    let root = m.mnt.path().to_path_buf();
    in_parallel(files, |(name, data)| {
        let got = std::fs::read(root.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
        common::same(&got, data, name);
    });
}

fn rotation_moves_every_key_and_no_data(mode: KeyMode) {
    let vol = Volume::new(mode);
    let files = fill_mixed(&vol);
    // The mount left attribute indexes of its directories (70+ files each): copies of object metadata, wrapped
    // data keys included, that a rekey must not leave behind under the old key.
    assert_eq!(index_objects(&vol.bucket).len(), 7, "one index per directory");
    let to = new_key_option(&vol);
    // Every request of the rekey goes through a proxy that records it.
    let proxy = FaultProxy::start(common::endpoint());
    let via = format!("endpoint={}", proxy.endpoint());
    let dry = rekey(&vol, &[&via], &to, &["--dry-run", "--json"]);
    assert_eq!(dry.status.code(), Some(0), "{}", common::describe(&dry));
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("\"rekeyed\":500"),
        "{}",
        common::describe(&dry)
    );
    let out = rekey(&vol, &[&via], &to, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        json.contains("\"rekeyed\":500") && json.contains("\"descriptor_resealed\":true"),
        "{json}"
    );
    assert_eq!(
        index_objects(&vol.bucket),
        Vec::<String>::new(),
        "the indexes are deleted"
    );
    // No data travelled: the only S3 requests with a body are the new volume descriptor's PUT and the
    // DeleteObjects of the indexes (KMS calls, which carry a JSON body, are told apart by their X-Amz-Target
    // header).
    let bodies: Vec<String> = proxy
        .requests()
        .iter()
        .filter(|r| r.header("x-amz-target").is_none())
        .filter(|r| r.header("content-length").is_some_and(|l| l != "0"))
        .map(|r| format!("{} {}", r.method, r.target))
        .filter(|b| !(b.starts_with("POST") && b.ends_with("?delete")))
        .collect();
    assert!(
        bodies
            .iter()
            .all(|b| b.starts_with("PUT") && b.contains(s3crypt::keys::VOLUME_OBJECT)),
        "{bodies:?}"
    );
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    // The old key reads nothing (the volume refuses it), the new one everything.
    let refused = TestMount::try_mount(&vol, &[]);
    assert!(refused.is_err(), "the old key still opens the volume");
    read_all_with(&vol, &[&to], &files);
    // A rerun changes nothing.
    let again = rekey(&vol, &[&to], &to, &["--json"]);
    assert_eq!(again.status.code(), Some(0), "{}", common::describe(&again));
    let json = String::from_utf8_lossy(&again.stdout).to_string();
    assert!(
        json.contains("\"rekeyed\":0") && json.contains("\"already\":500"),
        "{json}"
    );
}

/// The option that lets a mount holding the new key (`to`) still read under the old one during the rotation.
/// SSE-C has no such option: the key file lists the new key first and the old one after it.
fn with_old_key_for_reading(vol: &Volume, to: &str) -> Vec<String> {
    match vol.mode {
        KeyMode::CseLocal => vec![
            to.to_string(),
            format!("old_master_key_file={}", vol.dir.path().join("master.key").display()),
        ],
        KeyMode::CseKms => vec![to.to_string(), format!("old_kms_key_id={}", vol.kms_arn)],
        KeyMode::SseC => {
            let new = std::fs::read(to.strip_prefix("sse_c_key_file=").unwrap()).unwrap();
            let old = std::fs::read(vol.dir.path().join("sse-c.key")).unwrap();
            let both = vol.dir.path().join("sse-c-both.key");
            std::fs::write(&both, format!("{}\n{}\n", hex::encode(new), hex::encode(old))).unwrap();
            std::fs::set_permissions(&both, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            vec![format!("sse_c_key_file={}", both.display())]
        }
        _ => unreachable!("modes with a key to rotate"),
    }
}

/// The new key's option in any rotatable mode.
fn new_key(vol: &Volume) -> String {
    match vol.mode {
        KeyMode::SseC => format!(
            "sse_c_key_file={}",
            write_key_file(vol.dir.path(), "sse-c-new.key").display()
        ),
        _ => new_key_option(vol),
    }
}

/// Reads every file in a loop through `m` until `done`; panics on the first error or wrong byte. Returns the
/// number of whole rounds.
fn reader_loop(
    m: &TestMount,
    files: &[(String, Vec<u8>)],
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    let root = m.mnt.path().to_path_buf();
    let files = files.to_vec();
    std::thread::spawn(move || {
        let mut rounds = 0;
        while !done.load(std::sync::atomic::Ordering::Relaxed) || rounds == 0 {
            for (name, data) in &files {
                let got = std::fs::read(root.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
                assert!(got == *data, "{name} read wrong bytes");
            }
            rounds += 1;
        }
        rounds
    })
}

/// A rekey killed at random moments (SIGINT, then SIGKILL, several times) and run again completes; a mount
/// with both keys reads every file the whole time, so each object was readable under one of the two keys at
/// every moment.
fn an_interrupted_rotation_finishes_when_run_again(mode: KeyMode) {
    let vol = Volume::new(mode);
    let files = fill(&vol, 120);
    let to = new_key(&vol);
    let both = with_old_key_for_reading(&vol, &to);
    let both: Vec<&str> = both.iter().map(String::as_str).collect();
    let m = TestMount::mount_with(&vol, &both);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = reader_loop(&m, &files, done.clone());
    let source = format!("s3://{}", vol.bucket);
    let old = vol.options.join(",");
    let seed: u64 = rand::random();
    eprintln!("kill moments from seed {seed}");
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    for round in 0..6 {
        let signal = if round % 2 == 0 { libc::SIGINT } else { libc::SIGKILL };
        let mut child = Command::new(env!("CARGO_BIN_EXE_s3crypt"))
            .args(["rekey", &source, "-o", &old, "--to", &to])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let at = rand::Rng::gen_range(&mut rng, 50..1500);
        std::thread::sleep(Duration::from_millis(at));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        assert!(matches!(status.code(), Some(0) | Some(130) | None), "{status:?}");
    }
    let out = rekey(&vol, &[], &to, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = reader.join().expect("no read failed during the interrupted rotation");
    assert!(rounds >= 1);
    m.unmount();
    read_all_with(&vol, &[&to], &files);
}

/// A mount with the new key and the old one for reading reads every file before, during and after a rotation,
/// and rewrites files meanwhile (in place, a block at a time, the large one by a multipart upload whose other
/// parts are copied inside S3): no read error, no conflict, no lost write, and afterwards the new key alone
/// reads everything, what the mount wrote included.
fn a_mount_reads_and_writes_throughout_a_rotation(mode: KeyMode) {
    let vol = Volume::new(mode);
    let files = fill(&vol, 60);
    let to = new_key(&vol);
    let both = with_old_key_for_reading(&vol, &to);
    let both: Vec<&str> = both.iter().map(String::as_str).collect();
    // Files the writer rewrites: small ones and one of 20 MiB (a multipart object, whose ETag a rekey's copy
    // changes, so the mount's conditional write meets a rekeyed base).
    let mut written: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("w{i}"),
                pattern(if i == 0 { 20 << 20 } else { 3 * 4096 + i }, 900 + i as u64),
            )
        })
        .collect();
    {
        let m = TestMount::mount(&vol);
        for (name, data) in &written {
            write_file(&m.path(name), data).unwrap();
        }
        m.unmount();
    }
    // close() of the 20 MiB file shares the server with a rotation (and, in a full run, with other tests): give it
    // time. What a close that times out does is tested in tests/writeback.rs.
    let mut options = both.clone();
    options.push("upload_timeout=2m");
    let m = TestMount::mount_with(&vol, &options);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = reader_loop(&m, &files, done.clone());
    let rekeyer = {
        let (vol_options, to, bucket) = (vol.options.join(","), to.clone(), vol.bucket.clone());
        std::thread::spawn(move || {
            let source = format!("s3://{bucket}");
            common::s3crypt_cli(&["rekey", &source, "-o", &vol_options, "--to", &to])
        })
    };
    let bs = m.block_size as usize;
    let mut round = 0u64;
    loop {
        let finished = rekeyer.is_finished();
        for (name, data) in written.iter_mut() {
            use std::io::{Seek, SeekFrom, Write};
            let at = (bs * (round as usize % 3)).min(data.len() - 1);
            let patch = pattern(100, round * 10 + 7);
            let mut f = std::fs::OpenOptions::new().write(true).open(m.path(name)).unwrap();
            f.seek(SeekFrom::Start(at as u64)).unwrap();
            f.write_all(&patch).unwrap();
            common::mount::close_checked(f).unwrap_or_else(|e| panic!("closing {name} in round {round}: {e}"));
            let end = (at + patch.len()).max(data.len());
            data.resize(end, 0);
            data[at..at + patch.len()].copy_from_slice(&patch);
        }
        round += 1;
        if finished {
            break;
        }
    }
    let out = rekeyer.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = reader.join().expect("no read failed");
    assert!(
        rounds >= 1 && round >= 2,
        "reader rounds {rounds}, writer rounds {round}"
    );
    m.unmount();
    let recovered: Vec<_> = std::fs::read_dir(vol.recovery_dir())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(recovered.is_empty(), "conflicts during the rotation: {recovered:?}");
    // The new key alone now reads everything, including what the mount wrote; a rerun finds nothing to do.
    written.extend(files);
    read_all_with(&vol, &[&to], &written);
    let again = rekey(&vol, &[&to], &to, &["--json"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("\"rekeyed\":0"),
        "{}",
        common::describe(&again)
    );
}

/// A directory marker that holds extended attributes carries a data key of its own: the rotation moves it too,
/// and markers without one are passed over.
fn directory_xattrs_follow_the_rotation(mode: KeyMode) {
    use std::os::unix::ffi::OsStrExt;
    let path = |p: &std::path::Path| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let vol = Volume::new(mode);
    {
        let m = TestMount::mount(&vol);
        std::fs::create_dir(m.path("labelled")).unwrap();
        std::fs::create_dir(m.path("plain")).unwrap();
        write_file(&m.path("labelled/f"), b"data").unwrap();
        let (p, v) = (path(&m.path("labelled")), b"secret");
        // SAFETY: valid NUL-terminated strings and a buffer of the given length.
        let r = unsafe { libc::setxattr(p.as_ptr(), c"user.label".as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
        m.unmount();
    }
    let to = new_key_option(&vol);
    let out = rekey(&vol, &[], &to, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        json.contains("\"rekeyed\":2") && json.contains("\"failed\":[]"),
        "{json}"
    );
    let m = TestMount::mount_with(&vol, &[&to]);
    let mut buf = [0u8; 64];
    let p = path(&m.path("labelled"));
    // SAFETY: as above.
    let n = unsafe { libc::getxattr(p.as_ptr(), c"user.label".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "getxattr with the new key: {}", std::io::Error::last_os_error());
    assert_eq!(&buf[..n as usize], b"secret");
    assert_eq!(std::fs::read(m.path("labelled/f")).unwrap(), b"data");
}

in_both_modes!(
    rotation_moves_every_key_and_no_data,
    an_interrupted_rotation_finishes_when_run_again,
    directory_xattrs_follow_the_rotation,
    a_mount_reads_and_writes_throughout_a_rotation
);

mod sse_c {
    use s3crypt::keys::KeyMode;
    #[test]
    fn an_interrupted_rotation_finishes_when_run_again() {
        super::an_interrupted_rotation_finishes_when_run_again(KeyMode::SseC)
    }
    #[test]
    fn a_mount_reads_and_writes_throughout_a_rotation() {
        super::a_mount_reads_and_writes_throughout_a_rotation(KeyMode::SseC)
    }
}

/// SSE-C: every object is copied onto itself under the new customer key; the new key reads everything, the old
/// one nothing; a rerun changes nothing.
#[test]
fn an_sse_c_rotation_moves_every_object_to_the_new_customer_key() {
    let vol = Volume::new(KeyMode::SseC);
    let files = fill_mixed(&vol);
    let to = new_key(&vol);
    let out = rekey(&vol, &[], &to, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    // 500 files and the markers of directories m0..m6.
    assert!(json.contains("\"rekeyed\":507"), "{json}");
    read_all_with(&vol, &[&to], &files);
    // The old key reads nothing: through a mount every file is refused, and `cat` says so too.
    {
        let m = TestMount::mount(&vol);
        let root = m.mnt.path().to_path_buf();
        in_parallel(&files, |(name, _)| {
            let e = std::fs::read(root.join(name)).expect_err("the old SSE-C key still reads");
            assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{name}: {e}");
        });
    }
    let name = &files[1].0;
    let cat = format!("s3://{}/{name}", vol.bucket);
    let old_cat = common::s3crypt_cli(&["cat", &cat, "-o", &vol.options.join(",")]);
    assert_ne!(old_cat.status.code(), Some(0), "the old SSE-C key still reads {name}");
    let again = rekey(&vol, &[&to], &to, &["--json"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("\"already\":507"),
        "{}",
        common::describe(&again)
    );
}

/// SSE-S3 to SSE-KMS: afterwards verify with the new settings passes and with the old ones names every object.
#[test]
fn an_sse_s3_volume_moves_to_sse_kms() {
    let vol = Volume::new(KeyMode::SseS3);
    let files = fill_mixed(&vol);
    let to = format!("key_mode=sse-kms,kms_key_id={}", vol.kms_arn);
    let out = rekey(&vol, &[], &to, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let (source, old) = (format!("s3://{}", vol.bucket), vol.options.join(","));
    let new = format!("{old},{to}");
    let ok = common::s3crypt_cli(&["verify", &source, "-o", &new]);
    assert_eq!(ok.status.code(), Some(0), "{}", common::describe(&ok));
    let stale = common::s3crypt_cli(&["verify", &source, "-o", &old, "--json"]);
    assert_eq!(stale.status.code(), Some(1), "{}", common::describe(&stale));
    let report = String::from_utf8_lossy(&stale.stdout).to_string();
    for (name, _) in &files {
        assert!(
            report.contains(&format!("\"{name}\"")),
            "verify with the old settings missed {name}"
        );
    }
    read_all_with(&vol, &[&to], &files);
}

/// SSE-KMS from one customer key to another: afterwards every object names the new key, verify with the old
/// key id names every object, and the files read the same.
#[test]
fn an_sse_kms_volume_moves_to_another_kms_key() {
    let vol = Volume::new(KeyMode::SseKms);
    let files = fill_mixed(&vol);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let to = format!("kms_key_id={}", rt.block_on(common::create_kms_key()));
    let out = rekey(&vol, &[], &to, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"rekeyed\":507"),
        "{}",
        common::describe(&out)
    );
    let (source, old) = (format!("s3://{}", vol.bucket), vol.options.join(","));
    let ok = common::s3crypt_cli(&["verify", &source, "-o", &format!("{old},{to}")]);
    assert_eq!(ok.status.code(), Some(0), "{}", common::describe(&ok));
    let stale = common::s3crypt_cli(&["verify", &source, "-o", &old]);
    assert_eq!(stale.status.code(), Some(1), "{}", common::describe(&stale));
    read_all_with(&vol, &[&to], &files);
}

/// `old_kms_key_id=any`: a cse-kms mount reads files whose data keys are wrapped under a KMS key it does not
/// name (any key its credentials may decrypt with). Here the volume and its first files are under key A; a
/// mount naming key B and `any` reads them all, and a file it rewrites is wrapped under B (checked with KMS
/// directly). A mount naming B alone does not open the volume at all (its descriptor is under A).
#[test]
fn a_cse_kms_mount_reads_under_any_kms_key_when_asked() {
    let vol = Volume::new(KeyMode::CseKms);
    let files = fill(&vol, 10);
    let b = new_key_option(&vol);
    let b_arn = b.strip_prefix("kms_key_id=").unwrap().to_string();
    assert!(
        TestMount::try_mount(&vol, &[&b]).is_err(),
        "key B alone opened a volume under A"
    );
    {
        let m = TestMount::mount_with(&vol, &[&b, "old_kms_key_id=any"]);
        let root = m.mnt.path().to_path_buf();
        in_parallel(&files, |(name, data)| {
            common::same(&std::fs::read(root.join(name)).unwrap(), data, name)
        });
        let name = &files[1].0;
        write_file(&m.path(name), b"rewritten under B").unwrap();
        write_file(&m.path("new-under-b"), b"new").unwrap();
        m.unmount();
    }
    // The rewritten and the new file unwrap under B, naming B; an untouched one does not.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s3 = common::s3_client().await;
        let kms = s3crypt::keys::KmsProvider::from_client(
            common::kms_client().await,
            b_arn,
            std::sync::Arc::new(s3crypt::keys::KeyStats::new()),
        );
        for (name, under_b) in [
            (files[1].0.as_str(), true),
            ("new-under-b", true),
            (files[2].0.as_str(), false),
        ] {
            let head = s3.head_object().bucket(&vol.bucket).key(name).send().await.unwrap();
            let meta: s3crypt::store::Metadata = head
                .metadata()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let h = s3crypt::format::ObjectHeader::from_metadata(&meta).unwrap().unwrap();
            let opened = s3crypt::keys::DataKeyProvider::unwrap(&kms, &h.file_id, &h.wrapped_key).await;
            assert_eq!(opened.is_ok(), under_b, "{name}");
        }
    });
}
