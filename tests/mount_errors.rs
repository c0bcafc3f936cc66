//! Bad input gets a clear message and loses nothing: wrong keys, a missing bucket, bad options, loose key-file
//! permissions, plaintext objects in a client-side mount, tampered objects; and the one-file commands.
mod common;

use common::mount::{write_file, TestMount, Volume};
use s3crypt::keys::KeyMode;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn s3crypt(args: &[&str]) -> Output {
    common::endpoint();
    Command::new(env!("CARGO_BIN_EXE_s3crypt"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run s3crypt")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `s3crypt mount -f` that must fail before mounting: returns its output, failing the test if it hangs.
fn mount_must_fail(vol: &Volume, extra: &[&str]) -> Output {
    let mnt = tempfile::tempdir().unwrap();
    let mut words = vol.options.clone();
    words.extend(extra.iter().map(|s| s.to_string()));
    common::endpoint();
    let started = Instant::now();
    // A foreground mount that wrongly succeeds would serve until unmounted: poll, and fail after a limit.
    let mut child = Command::new(env!("CARGO_BIN_EXE_s3crypt"))
        .args([
            "mount",
            &format!("s3://{}", vol.bucket),
            mnt.path().to_str().unwrap(),
            "-f",
            "-o",
            &words.join(","),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run s3crypt");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = Command::new("fusermount3").arg("-u").arg(mnt.path()).status();
            let _ = child.kill();
            panic!("mount should fail, but it was still running after 30 s (it mounted)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (mut stdout, mut stderr_bytes) = (Vec::new(), Vec::new());
    child.stdout.take().unwrap().read_to_end(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_end(&mut stderr_bytes).unwrap();
    let out = Output {
        status,
        stdout,
        stderr: stderr_bytes,
    };
    assert!(!out.status.success(), "mount should fail; stderr: {}", stderr(&out));
    out
}

#[test]
fn wrong_master_key_is_refused_at_mount_time() {
    let vol = Volume::new(KeyMode::CseLocal);
    let m = TestMount::mount(&vol);
    write_file(&m.path("kept"), b"precious").unwrap();
    m.unmount();
    let other = common::mount::write_key_file(vol.dir.path(), "other.key");
    let out = mount_must_fail(&vol, &[&format!("master_key_file={}", other.display())]);
    let msg = stderr(&out);
    assert!(msg.contains("master key"), "message names the problem: {msg}");
    assert!(!msg.contains("panicked"), "{msg}");
    // Nothing was lost: the right key still reads the file.
    let m = TestMount::mount(&vol);
    assert_eq!(fs::read(m.path("kept")).unwrap(), b"precious");
}

#[test]
fn another_block_size_is_refused_at_mount_time() {
    let vol = Volume::new(KeyMode::CseLocal);
    TestMount::mount(&vol).unmount();
    let out = mount_must_fail(&vol, &["block_size=4K"]);
    let msg = stderr(&out);
    assert!(
        msg.contains("block size") || msg.contains("block_size"),
        "message names the block size: {msg}"
    );
    assert!(
        msg.contains("65536") || msg.contains("64"),
        "message gives the volume's block size: {msg}"
    );
}

#[test]
fn wrong_kms_key_is_refused_at_mount_time() {
    let vol = Volume::new(KeyMode::CseKms);
    TestMount::mount(&vol).unmount();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let other = rt.block_on(common::create_kms_key());
    let out = mount_must_fail(&vol, &[&format!("kms_key_id={other}")]);
    let msg = stderr(&out);
    assert!(msg.to_lowercase().contains("kms"), "message names KMS: {msg}");
}

#[test]
fn bad_options_list_the_valid_ones() {
    let vol = Volume::new(KeyMode::SseS3);
    let out = mount_must_fail(&vol, &["no_such_option=1"]);
    let msg = stderr(&out);
    assert!(msg.contains("no_such_option"), "{msg}");
    assert!(
        msg.contains("key_mode") && msg.contains("master_key_file"),
        "lists the valid options: {msg}"
    );
    let out = mount_must_fail(&vol, &["key_mode=rot13"]);
    assert!(stderr(&out).contains("cse-kms"), "{}", stderr(&out));
}

#[test]
fn missing_bucket_is_named() {
    let mut vol = Volume::new(KeyMode::SseS3);
    vol.bucket = "no-such-bucket-s3crypt-test".into();
    let out = mount_must_fail(&vol, &[]);
    let msg = stderr(&out);
    assert!(
        msg.contains("no-such-bucket-s3crypt-test") && msg.contains("does not exist"),
        "{msg}"
    );
}

#[test]
fn loose_key_file_permissions_are_refused() {
    let vol = Volume::new(KeyMode::CseLocal);
    let key = vol.dir.path().join("master.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let out = mount_must_fail(&vol, &[]);
    let msg = stderr(&out);
    assert!(msg.contains("chmod 600") && msg.contains("master.key"), "{msg}");
}

#[test]
fn put_and_cat_round_trip_and_read_what_the_mount_wrote() {
    let vol = Volume::new(KeyMode::CseKms);
    let m = TestMount::mount(&vol);
    write_file(&m.path("from-mount"), b"written through the mount").unwrap();
    m.unmount();
    let opts = vol.options.join(",");
    let out = s3crypt(&["cat", &format!("s3://{}/from-mount", vol.bucket), "-o", &opts]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"written through the mount");
    let src = vol.dir.path().join("src.bin");
    let data = common::mount::pattern(300_000, 3);
    fs::write(&src, &data).unwrap();
    let out = s3crypt(&[
        "put",
        src.to_str().unwrap(),
        &format!("s3://{}/put.bin", vol.bucket),
        "-o",
        &opts,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s3crypt(&["cat", &format!("s3://{}/put.bin", vol.bucket), "-o", &opts]);
    assert_eq!(out.stdout, data);
    let m = TestMount::mount(&vol);
    assert_eq!(
        fs::read(m.path("put.bin")).unwrap(),
        data,
        "the mount reads what put wrote"
    );
}

#[test]
fn plaintext_objects_are_refused_unless_allowed() {
    let vol = Volume::new(KeyMode::CseLocal);
    TestMount::mount(&vol).unmount();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::s3_client().await;
        c.put_object()
            .bucket(&vol.bucket)
            .key("plain.txt")
            .body(b"not encrypted".to_vec().into())
            .send()
            .await
            .unwrap();
    });
    let m = TestMount::mount(&vol);
    let err = fs::read(m.path("plain.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    m.unmount();
    let m = TestMount::mount_with(&vol, &["allow_plaintext"]);
    assert_eq!(fs::read(m.path("plain.txt")).unwrap(), b"not encrypted");
}

#[test]
fn a_tampered_block_is_eio_and_the_other_blocks_still_read() {
    let vol = Volume::new(KeyMode::CseLocal);
    let m = TestMount::mount(&vol);
    let b = m.block_size as usize;
    let data = common::mount::pattern(3 * b + 10, 5);
    write_file(&m.path("t"), &data).unwrap();
    m.unmount();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = common::s3_client().await;
        let head = c.head_object().bucket(&vol.bucket).key("t").send().await.unwrap();
        let obj = c.get_object().bucket(&vol.bucket).key("t").send().await.unwrap();
        let mut body = obj.body.collect().await.unwrap().into_bytes().to_vec();
        body[(b + 28) + 100] ^= 1; // a bit in block 1
        let mut put = c.put_object().bucket(&vol.bucket).key("t").body(body.into());
        for (k, v) in head.metadata().cloned().unwrap_or_default() {
            put = put.metadata(k, v);
        }
        put.send().await.unwrap();
    });
    let m = TestMount::mount(&vol);
    let f = fs::File::open(m.path("t")).unwrap();
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 100];
    f.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, data[..100], "block 0 is intact");
    let err = f.read_at(&mut buf, b as u64 + 5).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    f.read_at(&mut buf, 2 * b as u64).unwrap();
    assert_eq!(buf, data[2 * b..2 * b + 100], "block 2 is intact");
}

#[test]
fn an_sse_mount_of_a_client_side_volume_is_refused() {
    let vol = Volume::new(KeyMode::CseLocal);
    TestMount::mount(&vol).unmount();
    let mnt = tempfile::tempdir().unwrap();
    let opts = format!("key_mode=sse-s3,endpoint={},path_style", common::endpoint());
    let out = s3crypt(&[
        "mount",
        &format!("s3://{}", vol.bucket),
        mnt.path().to_str().unwrap(),
        "-f",
        "-o",
        &opts,
    ]);
    assert!(!out.status.success());
    let msg = stderr(&out);
    assert!(
        msg.contains("client-side") && msg.contains("key_mode=cse-local"),
        "{msg}"
    );
}
