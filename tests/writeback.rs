//! Write-back through real FUSE mounts against LocalStack, with a fault-injecting TCP proxy between the mount and
//! the server: outages around close(), lost responses to conditional writes, connections reset at random during
//! mixed writes, a stat while an upload is held, hostile truncates, and empty-file truncates in every mode.
//!
//! The rule under test: data a program wrote is in S3, in the journal, or (after a real conflict) in the recovery
//! directory; close() reports success only when S3 has it; nothing is reported as a conflict that is not one.
mod common;

use common::mount::{close_checked, drop_page_cache, pattern, write_file, Immutable, TestMount, Volume, ALL_MODES};
use common::proxy::{FaultProxy, Mode, RequestHead};
use common::same;
use s3crypt::keys::KeyMode;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

fn through(proxy: &FaultProxy, extra: &[&str]) -> Vec<String> {
    let mut v = vec![format!("endpoint={}", proxy.endpoint())];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn mount_via(vol: &Volume, proxy: &FaultProxy, extra: &[&str]) -> TestMount {
    let words = through(proxy, extra);
    let refs: Vec<&str> = words.iter().map(String::as_str).collect();
    TestMount::mount_with(vol, &refs)
}

/// The object's plaintext as a fresh mount (straight to the server) reads it.
fn read_fresh(vol: &Volume, name: &str) -> Vec<u8> {
    let m = TestMount::mount(vol);
    let data = fs::read(m.path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    m.unmount();
    data
}

/// The size of the object as S3 has it, if it has it.
fn raw_size(bucket: &str, key: &str) -> Option<u64> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let out = common::s3_client()
            .await
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .ok()?;
        out.content_length().map(|n| n as u64)
    })
}

/// The object size a file of `len` bytes has in `mode` (the volumes use the default block size).
fn object_size(mode: KeyMode, len: usize) -> u64 {
    match mode.is_client_side() {
        true => s3crypt::format::ciphertext_size(len as u64, s3crypt::format::BlockSize::DEFAULT),
        false => len as u64,
    }
}

fn pending_multipart_uploads(bucket: &str) -> usize {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(common::pending_multipart_uploads(bucket)).len()
}

fn no_recovery_files(vol: &Volume) {
    let n = fs::read_dir(vol.recovery_dir()).map(|d| d.count()).unwrap_or(0);
    assert_eq!(n, 0, "no conflict, no recovery file");
}

/// Bytes of each file written once S3 is away.
const TAIL: usize = 4096;

/// One volume mounted through its own proxy, with the files written to it.
struct Case {
    vol: Volume,
    proxy: FaultProxy,
    mount: Option<TestMount>,
    files: Vec<(&'static str, Vec<u8>)>,
}

/// S3 unreachable for 30 s around close(): close reports the error, the mount lists and reads the new content
/// during the outage, and S3 has the data within 60 s of coming back, with nothing done by the program.
#[test]
fn an_outage_around_close_loses_nothing() {
    let plan: [(KeyMode, &[(&'static str, usize)]); 2] = [
        (KeyMode::CseLocal, &[("small", 3_000_000), ("big", 100 << 20)]),
        (KeyMode::SseS3, &[("small", 3_000_000)]),
    ];
    let mut cases = Vec::new();
    let mut open = Vec::new();
    for (mode, files) in plan {
        let vol = Volume::new(mode);
        let proxy = FaultProxy::start(common::endpoint());
        let m = mount_via(&vol, &proxy, &["upload_timeout=2s"]);
        let mut written = Vec::new();
        for (i, (name, size)) in files.iter().enumerate() {
            let data = pattern(*size, 100 + i as u64);
            let mut f = File::create(m.path(name)).unwrap();
            f.write_all(&data[..data.len() - TAIL]).unwrap();
            open.push((cases.len(), *name, f, data[data.len() - TAIL..].to_vec()));
            written.push((*name, data));
        }
        cases.push(Case {
            vol,
            proxy,
            mount: Some(m),
            files: written,
        });
    }
    let outage = Instant::now();
    for c in &cases {
        c.proxy.set_mode(Mode::Reset);
    }
    // The last bytes go in during the outage: a close of a copy of the descriptor in a process forked by another
    // test (it flushes too) may have saved what came before, but not this.
    for (_, name, mut f, tail) in open {
        f.write_all(&tail).unwrap();
        let err = close_checked(f).expect_err("close must report that S3 does not have the data");
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: {err}");
    }
    for c in &cases {
        let m = c.mount.as_ref().unwrap();
        let names: Vec<String> = fs::read_dir(m.mnt.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        for (name, data) in &c.files {
            assert!(
                names.contains(&name.to_string()),
                "{name} listed during the outage: {names:?}"
            );
            same(
                &fs::read(m.path(name)).unwrap(),
                data,
                &format!("{} {name} during the outage", c.vol.mode),
            );
        }
    }
    std::thread::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed()));
    for c in &cases {
        c.proxy.set_mode(Mode::Pass);
    }
    let back = Instant::now();
    for c in &cases {
        for (name, data) in &c.files {
            while raw_size(&c.vol.bucket, name) != Some(object_size(c.vol.mode, data.len())) {
                assert!(
                    back.elapsed() < Duration::from_secs(60),
                    "{name} not in S3 60 s after the outage"
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
    for mut c in cases {
        c.mount.take().unwrap().unmount();
        for (name, data) in &c.files {
            same(
                &read_fresh(&c.vol, name),
                data,
                &format!("{} {name} after the outage", c.vol.mode),
            );
        }
        no_recovery_files(&c.vol);
        assert_eq!(pending_multipart_uploads(&c.vol.bucket), 0);
    }
}

fn conditional_put(r: &RequestHead) -> bool {
    r.method == "PUT"
        && !r.target.contains("uploadId=")
        && (r.header("if-none-match").is_some() || r.header("if-match").is_some())
}

fn complete(r: &RequestHead) -> bool {
    r.method == "POST" && r.target.contains("uploadId=")
}

/// The server applies a conditional PUT or a CompleteMultipartUpload and the response is lost: the retry meets
/// its own write, which is recognised; no conflict, no recovery file, the file saved once.
#[test]
fn a_lost_response_after_the_server_applied_the_write_is_not_a_conflict() {
    for mode in [KeyMode::CseKms, KeyMode::SseC] {
        let vol = Volume::new(mode);
        let proxy = FaultProxy::start(common::endpoint());
        // Generous: a slow server under a parallel test run must not turn into an EIO here.
        let m = mount_via(&vol, &proxy, &["upload_timeout=120s"]);
        let small = pattern(70_000, 1);
        proxy.drop_response_once(conditional_put);
        write_file(&m.path("small"), &small).expect("close after a lost PUT response");
        assert_eq!(proxy.dropped(), 1);
        // A rewrite of the existing object: If-Match.
        let mut small2 = small.clone();
        small2[5..10].copy_from_slice(b"HELLO");
        proxy.drop_response_once(conditional_put);
        let f = OpenOptions::new().write(true).open(m.path("small")).unwrap();
        f.write_all_at(b"HELLO", 5).unwrap();
        close_checked(f).expect("close after a lost If-Match PUT response");
        assert_eq!(proxy.dropped(), 2);
        let big = pattern(20 << 20, 2);
        proxy.drop_response_once(complete);
        write_file(&m.path("big"), &big).expect("close after a lost Complete response");
        assert_eq!(proxy.dropped(), 3);
        m.unmount();
        same(&read_fresh(&vol, "small"), &small2, &format!("{mode} small"));
        same(&read_fresh(&vol, "big"), &big, &format!("{mode} big"));
        no_recovery_files(&vol);
        assert_eq!(pending_multipart_uploads(&vol.bucket), 0);
    }
}

/// 10% of requests reset during about 200 MiB of writes, appends, truncates and renames: every close() that
/// returned 0 has its data in S3 after a remount, and nothing is reported as a conflict.
#[test]
fn random_resets_during_mixed_writes_lose_nothing() {
    use rand::{Rng, SeedableRng};
    let vol = Volume::new(KeyMode::CseLocal);
    let proxy = FaultProxy::start(common::endpoint());
    let m = mount_via(&vol, &proxy, &["upload_timeout=60s"]);
    proxy.set_mode(Mode::ResetFraction(0.1));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut model: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    let mut sent = 0usize;
    let mut step = 0u64;
    while sent < 200 << 20 {
        step += 1;
        let name = format!("f{}", rng.gen_range(0..12));
        let op = rng.gen_range(0..10);
        let path = m.path(&name);
        let mut want = model.get(&name).cloned().unwrap_or_default();
        let result = match op {
            0..=3 => {
                let size = rng.gen_range(0..12 << 20);
                want = pattern(size, step);
                sent += size;
                write_file(&path, &want)
            }
            4..=5 => {
                let add = pattern(rng.gen_range(1..3 << 20), step);
                sent += add.len();
                want.extend_from_slice(&add);
                let mut f = OpenOptions::new().create(true).append(true).open(&path).unwrap();
                f.write_all(&add).unwrap();
                close_checked(f)
            }
            6..=7 if !want.is_empty() => {
                let at = rng.gen_range(0..want.len());
                let patch = pattern(rng.gen_range(1..200_000), step);
                sent += patch.len();
                let end = at + patch.len();
                if end > want.len() {
                    want.resize(end, 0);
                }
                want[at..end].copy_from_slice(&patch);
                let f = OpenOptions::new().write(true).open(&path).unwrap();
                f.write_all_at(&patch, at as u64).unwrap();
                close_checked(f)
            }
            8 if !want.is_empty() => {
                let size = rng.gen_range(0..want.len() * 2);
                want.resize(size, 0);
                let f = OpenOptions::new().write(true).open(&path).unwrap();
                f.set_len(size as u64).unwrap();
                close_checked(f)
            }
            9 if model.contains_key(&name) => {
                let to = format!("r{step}");
                match fs::rename(&path, m.path(&to)) {
                    Ok(()) => {
                        let data = model.remove(&name).unwrap();
                        model.insert(to, data);
                    }
                    Err(e) => panic!("rename {name}: {e}"),
                }
                continue;
            }
            _ => continue,
        };
        match result {
            Ok(()) => {
                model.insert(name, want);
            }
            Err(e) => panic!("close of {name} failed with upload_timeout=60s under 10% resets: {e}"),
        }
    }
    proxy.set_mode(Mode::Pass);
    assert!(proxy.requests().len() > 100, "traffic went through the proxy");
    m.unmount();
    let fresh = TestMount::mount(&vol);
    for (name, want) in &model {
        same(&fs::read(fresh.path(name)).unwrap(), want, name);
    }
    fresh.unmount();
    no_recovery_files(&vol);
}

/// A stat of a file whose upload is held (the server never answers) returns while the upload is still held, and
/// so does a read of its new content. (A listing asks S3 and waits for it like any request.)
#[test]
fn stat_does_not_wait_for_a_held_upload() {
    let vol = Volume::new(KeyMode::CseLocal);
    let proxy = FaultProxy::start(common::endpoint());
    let m = mount_via(&vol, &proxy, &["upload_timeout=20s"]);
    let path = m.path("held");
    let data = pattern(500_000, 3);
    let mut f = File::create(&path).unwrap();
    f.write_all(&data[..400_000]).unwrap();
    proxy.set_mode(Mode::Blackhole);
    // The rest once S3 is away, so that a flush from a process forked meanwhile cannot have saved it all.
    f.write_all(&data[400_000..]).unwrap();
    let closer = std::thread::spawn(move || close_checked(f));
    std::thread::sleep(Duration::from_millis(500));
    let st = fs::metadata(&path).expect("stat while the upload is held");
    assert_eq!(st.len(), 500_000);
    let mut head = [0u8; 16];
    File::open(&path).unwrap().read_exact(&mut head).unwrap();
    same(&head, &pattern(16, 3), "read while the upload is held");
    assert!(
        !closer.is_finished(),
        "the upload is still held after stat and read answered"
    );
    proxy.set_mode(Mode::Pass);
    let _ = closer.join().unwrap();
    m.unmount();
    same(&read_fresh(&vol, "held"), &pattern(500_000, 3), "held file");
}

/// A staging disk that fails for any reason but room fails the program's write and truncate with EIO (write(2): "A
/// low-level I/O error occurred while modifying the inode"), not with the disk's own errno, which would describe
/// the mount's file wrongly (EPERM here, from the immutable attribute). Both ways a write meets the disk: a new
/// journal entry refused (the journal's directory immutable), and a write into an entry refused (its blocks file
/// immutable, while S3 refuses connections so that the entry stays). Only those calls fail: the file is what was acknowledged,
/// and once the disk works again the mount writes and saves as before.
#[test]
fn a_failing_staging_disk_fails_the_call_with_eio_and_keeps_what_was_written() {
    const MIB: usize = 1024 * 1024;
    for mode in [KeyMode::CseLocal, KeyMode::SseS3] {
        let vol = Volume::new(mode);
        let proxy = FaultProxy::start(common::endpoint());
        let m = mount_via(&vol, &proxy, &["upload_timeout=20s"]);
        let want = pattern(3 * MIB, 9);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(m.path("f"))
            .unwrap();
        f.write_all_at(&want[..MIB], 0).unwrap();
        f.sync_all().unwrap();
        let dirs: Vec<_> = fs::read_dir(vol.dir.path().join("journal"))
            .unwrap()
            .flatten()
            .collect();
        assert_eq!(dirs.len(), 1, "{mode}: one volume, one journal directory");
        let journal = dirs[0].path();
        let entries = || -> Vec<std::path::PathBuf> {
            fs::read_dir(&journal)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "blocks"))
                .collect()
        };
        // Saved: the entry goes once the upload loop has nothing left (it may take one more round).
        let t0 = Instant::now();
        while !entries().is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{mode}: the saved file's entry stayed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let refused = |what: &str| {
            let err = f.write_all_at(&want[2 * MIB..], 2 * MIB as u64).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{mode}, {what}: the write: {err}");
            let err = f.set_len(7).unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(libc::EIO),
                "{mode}, {what}: the truncate: {err}"
            );
        };
        {
            let _failing = Immutable::set(&journal);
            refused("no new entry");
        }
        assert_eq!(
            f.metadata().unwrap().len(),
            MIB as u64,
            "{mode}: the failed calls changed nothing"
        );
        proxy.set_mode(Mode::Reset);
        f.write_all_at(&want[MIB..2 * MIB], MIB as u64).unwrap();
        let blocks = entries();
        assert_eq!(blocks.len(), 1, "{mode}: the file being written has its entry");
        {
            let _failing = Immutable::set(&blocks[0]);
            refused("a refused entry");
        }
        assert_eq!(
            f.metadata().unwrap().len(),
            2 * MIB as u64,
            "{mode}: the failed calls changed nothing"
        );
        drop_page_cache(&f);
        let mut got = vec![0u8; 2 * MIB];
        f.read_exact_at(&mut got, 0).unwrap();
        same(&got, &want[..2 * MIB], &format!("{mode}: the acknowledged writes"));
        proxy.set_mode(Mode::Pass);
        f.write_all_at(&want[2 * MIB..], 2 * MIB as u64).unwrap();
        f.sync_all().unwrap();
        drop(f);
        m.unmount();
        same(
            &read_fresh(&vol, "f"),
            &want,
            &format!("{mode}: saved once the disk worked again"),
        );
    }
}

/// A truncate to a size no S3 object can hold is refused (EFBIG) without the daemon allocating it, and the mount
/// goes on working; a sparse 3 GiB file keeps memory bounded (checked in tests/crash.rs against a daemon
/// process) and reads back as zeros here.
#[test]
fn hostile_truncates_are_refused_and_the_mount_goes_on() {
    let vol = Volume::new(KeyMode::CseLocal);
    let m = TestMount::mount(&vol);
    let path = m.path("t");
    write_file(&path, b"abc").unwrap();
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    let err = f.set_len(999_999_999_999_999).unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EFBIG) | Some(libc::EINVAL)),
        "{err}"
    );
    close_checked(f).unwrap();
    let err = fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.write_all_at(b"x", 6 << 40))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");
    same(&fs::read(&path).unwrap(), b"abc", "the file is untouched");
    let sparse = m.path("sparse");
    let f = File::create(&sparse).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(b"end", (64 << 20) - 3).unwrap();
    close_checked(f).unwrap();
    let mut g = File::open(&sparse).unwrap();
    g.seek(SeekFrom::Start(1 << 20)).unwrap();
    let mut buf = vec![1u8; 4096];
    g.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    m.unmount();
}

/// `truncate -s0` of an empty file, in every mode, and again after a remount.
#[test]
fn truncating_an_empty_file_to_zero_works_in_every_mode() {
    for mode in ALL_MODES {
        let vol = Volume::new(mode);
        let m = TestMount::mount(&vol);
        let path = m.path("empty");
        write_file(&path, b"").unwrap();
        let st = std::process::Command::new("truncate")
            .arg("-s0")
            .arg(&path)
            .status()
            .unwrap();
        assert!(st.success(), "{mode}: truncate -s0 of an empty file");
        let f = OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
        close_checked(f).unwrap_or_else(|e| panic!("{mode}: O_TRUNC of an empty file: {e}"));
        m.unmount();
        let m = TestMount::mount(&vol);
        let st = std::process::Command::new("truncate")
            .arg("-s0")
            .arg(m.path("empty"))
            .status()
            .unwrap();
        assert!(st.success(), "{mode}: truncate -s0 after a remount");
        assert_eq!(fs::metadata(m.path("empty")).unwrap().len(), 0);
        m.unmount();
    }
}
