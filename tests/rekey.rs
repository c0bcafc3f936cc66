//! `s3crypt rekey` against LocalStack, in cse-local and cse-kms: after a rekey the new key reads every file byte
//! for byte and the old key reads nothing; the rekey uploads no data (every request body through a proxy is
//! counted); a rerun is idempotent; an interrupted rekey finishes when run again; and a mount holding the new
//! key with the old one as `old_master_key_file=` reads every file throughout a rotation.
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
    for (name, data) in files {
        common::same(&std::fs::read(m.path(name)).unwrap(), data, name);
    }
}

fn rotation_moves_every_key_and_no_data(mode: KeyMode) {
    let vol = Volume::new(mode);
    let files = fill(&vol, 40);
    let to = new_key_option(&vol);
    // Every request of the rekey goes through a proxy that records it.
    let proxy = FaultProxy::start(common::endpoint());
    let via = format!("endpoint={}", proxy.endpoint());
    let dry = rekey(&vol, &[&via], &to, &["--dry-run", "--json"]);
    assert_eq!(dry.status.code(), Some(0), "{}", common::describe(&dry));
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("\"rekeyed\":40"),
        "{}",
        common::describe(&dry)
    );
    let out = rekey(&vol, &[&via], &to, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        json.contains("\"rekeyed\":40") && json.contains("\"descriptor_resealed\":true"),
        "{json}"
    );
    // No data travelled: the only S3 request with a body is the new volume descriptor's PUT (KMS calls, which
    // carry a JSON body, are told apart by their X-Amz-Target header).
    let bodies: Vec<String> = proxy
        .requests()
        .iter()
        .filter(|r| r.header("x-amz-target").is_none())
        .filter(|r| r.header("content-length").is_some_and(|l| l != "0"))
        .map(|r| format!("{} {}", r.method, r.target))
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
        json.contains("\"rekeyed\":0") && json.contains("\"already\":40"),
        "{json}"
    );
}

fn an_interrupted_rotation_finishes_when_run_again(mode: KeyMode) {
    let vol = Volume::new(mode);
    let files = fill(&vol, 60);
    let to = new_key_option(&vol);
    let source = format!("s3://{}", vol.bucket);
    let old = vol.options.join(",");
    for signal in [libc::SIGINT, libc::SIGKILL] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_s3crypt"))
            .args(["rekey", &source, "-o", &old, "--to", &to])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(if signal == libc::SIGINT { 400 } else { 700 }));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        assert!(matches!(status.code(), Some(0) | Some(130) | None), "{status:?}");
    }
    let out = rekey(&vol, &[], &to, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    read_all_with(&vol, &[&to], &files);
}

in_both_modes!(
    rotation_moves_every_key_and_no_data,
    an_interrupted_rotation_finishes_when_run_again,
    a_mount_reads_and_writes_throughout_a_rotation
);

/// A mount with the new key and the old one as `old_master_key_file=` / `old_kms_key_id=` reads every file
/// before, during and after a rotation, and what it writes meanwhile survives.
fn a_mount_reads_and_writes_throughout_a_rotation(mode: KeyMode) {
    let vol = Volume::new(mode);
    let files = fill(&vol, 60);
    let old_opt = match mode {
        KeyMode::CseLocal => format!("old_master_key_file={}", vol.dir.path().join("master.key").display()),
        _ => format!("old_kms_key_id={}", vol.kms_arn),
    };
    let to = new_key_option(&vol);
    let m = TestMount::mount_with(&vol, &[&to, &old_opt]);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let root = m.mnt.path().to_path_buf();
        let files = files.clone();
        let done = done.clone();
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
    };
    write_file(&m.path("during-1"), b"written before the rotation ends").unwrap();
    let out = rekey(&vol, &[], &to, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    write_file(&m.path("during-2"), b"written after").unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = reader.join().expect("no read failed");
    assert!(rounds >= 1);
    m.unmount();
    // The new key alone now reads everything, including what the mount wrote.
    let m = TestMount::mount_with(&vol, &[&to]);
    assert_eq!(
        std::fs::read(m.path("during-1")).unwrap(),
        b"written before the rotation ends"
    );
    assert_eq!(std::fs::read(m.path("during-2")).unwrap(), b"written after");
}

/// SSE-C: every object is copied onto itself under the new customer key; the new key reads everything, the old
/// one nothing; a rerun changes nothing.
#[test]
fn an_sse_c_rotation_moves_every_object_to_the_new_customer_key() {
    let vol = Volume::new(KeyMode::SseC);
    let files = fill(&vol, 20);
    let new_key = write_key_file(vol.dir.path(), "sse-c-2.key");
    let to = format!("sse_c_key_file={}", new_key.display());
    let out = rekey(&vol, &[], &to, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    // 20 files and the marker of directory d.
    assert!(json.contains("\"rekeyed\":21"), "{json}");
    read_all_with(&vol, &[&to], &files);
    let old_cat = common::s3crypt_cli(&[
        "cat",
        &format!("s3://{}/{}", vol.bucket, files[1].0),
        "-o",
        &vol.options.join(","),
    ]);
    assert_ne!(old_cat.status.code(), Some(0), "the old SSE-C key still reads");
    let again = rekey(&vol, &[&to], &to, &["--json"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("\"already\":21"),
        "{}",
        common::describe(&again)
    );
}

/// SSE-S3 to SSE-KMS: afterwards verify with the new settings passes and with the old ones names every object.
#[test]
fn an_sse_s3_volume_moves_to_sse_kms() {
    let vol = Volume::new(KeyMode::SseS3);
    let files = fill(&vol, 12);
    let to = format!("key_mode=sse-kms,kms_key_id={}", vol.kms_arn);
    let out = rekey(&vol, &[], &to, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    let (source, old) = (format!("s3://{}", vol.bucket), vol.options.join(","));
    let new = format!("{old},{to}");
    let ok = common::s3crypt_cli(&["verify", &source, "-o", &new]);
    assert_eq!(ok.status.code(), Some(0), "{}", common::describe(&ok));
    let stale = common::s3crypt_cli(&["verify", &source, "-o", &old]);
    assert_eq!(stale.status.code(), Some(1), "{}", common::describe(&stale));
    read_all_with(&vol, &[&to], &files);
}
