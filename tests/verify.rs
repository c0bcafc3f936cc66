//! `s3crypt verify` against LocalStack: a clean volume passes; a tamper set planted in random objects of a
//! client-side volume of 500 files (bit flip, block swap, dropped block, truncation, wrong file id, metadata swapped between
//! objects, another mode, a plaintext object) is found, naming exactly the bad objects; in an SSE volume an
//! object under other server-side encryption is found; a wrong key stops the check with status 2.
mod common;

use common::mount::{pattern, write_file, write_key_file, TestMount, Volume};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use s3crypt::keys::KeyMode;
use std::collections::{BTreeSet, HashMap};
use std::process::Output;

fn verify(vol: &Volume, extra: &[&str]) -> Output {
    let (source, options) = (format!("s3://{}", vol.bucket), vol.options.join(","));
    let mut args = vec!["verify", &source, "-o", &options];
    args.extend_from_slice(extra);
    common::s3crypt_cli(&args)
}

/// The keys named on `BAD` lines.
fn bad_keys(out: &Output, bucket: &str) -> BTreeSet<String> {
    let prefix = format!("BAD s3://{bucket}/");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| rest.split_once(':').map_or(rest, |(k, _)| k).to_string())
        .collect()
}

type Meta = HashMap<String, String>;

fn get(rt: &tokio::runtime::Runtime, bucket: &str, key: &str) -> (Vec<u8>, Meta) {
    rt.block_on(async {
        let c = common::s3_client().await;
        let o = c.get_object().bucket(bucket).key(key).send().await.unwrap();
        let meta = o.metadata().cloned().unwrap_or_default();
        (o.body.collect().await.unwrap().into_bytes().to_vec(), meta)
    })
}

fn put(rt: &tokio::runtime::Runtime, bucket: &str, key: &str, body: Vec<u8>, meta: Meta) {
    rt.block_on(async {
        let c = common::s3_client().await;
        c.put_object()
            .bucket(bucket)
            .key(key)
            .body(body.into())
            .set_metadata(Some(meta))
            .send()
            .await
            .unwrap();
    })
}

#[test]
fn a_tamper_set_in_a_client_side_volume_is_found_exactly() {
    let vol = Volume::new(KeyMode::CseLocal);
    let m = TestMount::mount(&vol);
    let bs = m.block_size as usize;
    let sealed = bs + 28;
    // Files of mixed sizes: empty, under a block, exactly blocks, many blocks; in two directories.
    std::fs::create_dir(m.path("d")).unwrap();
    let mut names = Vec::new();
    for i in 0..500usize {
        let size = match i % 10 {
            0 => 0,
            7 => bs,
            8 => 3 * bs + 17 * (i % 5),
            9 => 5 * bs - i % 3,
            _ => 1 + (i * 997) % bs,
        };
        let name = if i % 2 == 0 {
            format!("f{i:02}")
        } else {
            format!("d/f{i:02}")
        };
        write_file(&m.path(&name), &pattern(size, i as u64)).unwrap();
        names.push((name, size));
    }
    // Extended attributes are checked too.
    let x = std::ffi::CString::new(m.path("f02").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path, name and value.
    let r = unsafe { libc::setxattr(x.as_ptr(), c"user.k".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
    assert_eq!(r, 0, "setxattr");
    m.unmount();

    let clean = verify(&vol, &[]);
    assert_eq!(clean.status.code(), Some(0), "{}", common::describe(&clean));
    assert!(bad_keys(&clean, &vol.bucket).is_empty());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Candidates with at least three blocks, in random order; each tamper takes its own.
    let mut big: Vec<String> = names
        .iter()
        .filter(|(_, s)| *s >= 3 * bs)
        .map(|(n, _)| n.clone())
        .collect();
    big.shuffle(&mut rng);
    let mut take = || big.pop().expect("enough multi-block files");
    let mut planted = BTreeSet::new();

    let k = take(); // a bit flip in block 1
    let (mut body, meta) = get(&rt, &vol.bucket, &k);
    body[sealed + 40] ^= 0x01;
    put(&rt, &vol.bucket, &k, body, meta);
    planted.insert(k);

    let k = take(); // blocks 0 and 1 swapped
    let (mut body, meta) = get(&rt, &vol.bucket, &k);
    let (a, b) = body.split_at_mut(sealed);
    a.swap_with_slice(&mut b[..sealed]);
    put(&rt, &vol.bucket, &k, body, meta);
    planted.insert(k);

    let k = take(); // block 1 dropped (the size stays a legal one)
    let (mut body, meta) = get(&rt, &vol.bucket, &k);
    body.drain(sealed..2 * sealed);
    put(&rt, &vol.bucket, &k, body, meta);
    planted.insert(k);

    let k = take(); // the tail cut
    let (mut body, meta) = get(&rt, &vol.bucket, &k);
    body.truncate(body.len() - 10);
    put(&rt, &vol.bucket, &k, body, meta);
    planted.insert(k);

    let k = take(); // another file id
    let (body, mut meta) = get(&rt, &vol.bucket, &k);
    meta.insert("s3crypt-file-id".into(), "00".repeat(16));
    put(&rt, &vol.bucket, &k, body, meta);
    planted.insert(k);

    let (k1, k2) = (take(), take()); // metadata swapped between two objects
    let ((b1, m1), (b2, m2)) = (get(&rt, &vol.bucket, &k1), get(&rt, &vol.bucket, &k2));
    put(&rt, &vol.bucket, &k1, b1, m2);
    put(&rt, &vol.bucket, &k2, b2, m1);
    planted.insert(k1);
    planted.insert(k2);

    let k = take(); // claims another mode
    let (body, mut meta) = get(&rt, &vol.bucket, &k);
    meta.insert("s3crypt-mode".into(), "cse-kms".into());
    put(&rt, &vol.bucket, &k, body, meta);
    planted.insert(k);

    let k = "d/plain.txt".to_string(); // a plaintext object
    put(&rt, &vol.bucket, &k, b"not encrypted".to_vec(), Meta::new());
    planted.insert(k);

    let k = "f02".to_string(); // its sealed extended attributes altered
    let (body, mut meta) = get(&rt, &vol.bucket, &k);
    let x = meta.get_mut("s3crypt-xattr").expect("sealed xattrs");
    let flipped = if x.starts_with('A') { "B" } else { "A" };
    x.replace_range(0..1, flipped);
    put(&rt, &vol.bucket, &k, body, meta);
    planted.insert(k);

    let out = verify(&vol, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", common::describe(&out));
    assert_eq!(bad_keys(&out, &vol.bucket), planted, "{}", common::describe(&out));

    let json = verify(&vol, &["--json"]);
    let line = String::from_utf8_lossy(&json.stdout)
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON summary")
        .to_string();
    // The files, the plaintext object and the marker of directory d.
    let objects = names.len() + 2;
    assert!(line.contains(&format!("\"objects\":{objects}")), "{line}");
    assert!(
        line.contains(&format!("\"good\":{}", objects - planted.len())),
        "{line}"
    );
}

#[test]
fn a_wrong_key_or_a_missing_volume_stops_the_check() {
    let vol = Volume::new(KeyMode::CseLocal);
    let m = TestMount::mount(&vol);
    write_file(&m.path("f"), b"x").unwrap();
    m.unmount();
    let other = write_key_file(vol.dir.path(), "other.key");
    let out = verify(&vol, &["-o", &format!("master_key_file={}", other.display())]);
    assert_eq!(out.status.code(), Some(2), "{}", common::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("volume"),
        "{}",
        common::describe(&out)
    );

    let empty = Volume::new(KeyMode::CseLocal);
    let out = verify(&empty, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", common::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no s3crypt volume here"),
        "{}",
        common::describe(&out)
    );
    // Nothing was written: still no descriptor.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let n = rt.block_on(async {
        let c = common::s3_client().await;
        c.list_objects_v2()
            .bucket(&empty.bucket)
            .send()
            .await
            .unwrap()
            .key_count()
    });
    assert_eq!(n, Some(0));
}

#[test]
fn an_object_under_other_server_side_encryption_is_found() {
    let vol = Volume::new(KeyMode::SseS3);
    let m = TestMount::mount(&vol);
    for i in 0..10 {
        write_file(&m.path(&format!("f{i}")), &pattern(1000 * i, i as u64)).unwrap();
    }
    m.unmount();
    let out = verify(&vol, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", common::describe(&out));
    // The bucket's default is SSE-KMS: an object put without s3crypt's header lands under KMS.
    let rt = tokio::runtime::Runtime::new().unwrap();
    put(&rt, &vol.bucket, "f3", b"put by something else".to_vec(), Meta::new());
    let out = verify(&vol, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", common::describe(&out));
    assert_eq!(
        bad_keys(&out, &vol.bucket),
        BTreeSet::from(["f3".to_string()]),
        "{}",
        common::describe(&out)
    );
}
