//! Key files, `cse-local`, the volume descriptor over an in-memory store, the key configuration, and that no
//! key-holding type shows key bytes in `Debug`.
mod common;

use async_trait::async_trait;
use common::MapStore;
use s3crypt::format::{BlockSize, DataKey, FileId};
use s3crypt::keys::*;
use s3crypt::store::{Sse, SseCustomerKey};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Distinctive key bytes, so their hex or decimal form is easy to look for.
const KNOWN: [u8; 32] = [
    0xC3, 0x7E, 0x91, 0x2B, 0xD4, 0x58, 0xEA, 0x17, 0x6F, 0xB0, 0x3C, 0xA9, 0x45, 0xF2, 0x8D, 0x1E, 0x77, 0xCB, 0x09,
    0x64, 0xBE, 0x3A, 0xD1, 0x5F, 0x82, 0xE6, 0x2D, 0x98, 0x4B, 0xF7, 0x13, 0xAC,
];

fn write_key(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn spec(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The key bytes must not appear in `text`, neither as hex nor as the decimal list `Debug` of an array prints.
fn assert_no_key_bytes(text: &str, key: &[u8; 32]) {
    let lower = text.to_lowercase();
    assert!(!lower.contains(&hex::encode(&key[..4])), "hex of key bytes in: {text}");
    let decimal = format!("{}, {}, {}", key[0], key[1], key[2]);
    assert!(!text.contains(&decimal), "decimal key bytes in: {text}");
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(key);
    assert!(!text.contains(&b64[..8]), "base64 of key in: {text}");
}

#[test]
fn key_file_readable_by_group_or_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o640, 0o604, 0o660, 0o644, 0o620] {
        let path = write_key(dir.path(), &format!("k{mode:o}"), &KNOWN, mode);
        match read_key_file(spec(&path)) {
            Err(e @ KeyError::KeyFilePermissions { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("chmod 600") && msg.contains("group or others"), "{msg}");
                assert!(msg.contains(spec(&path)), "{msg}");
            }
            other => panic!("mode {mode:o}: {other:?}"),
        }
    }
    let ok = write_key(dir.path(), "ok", &KNOWN, 0o600);
    assert_eq!(*read_key_file(spec(&ok)).unwrap(), KNOWN);
    let ro = write_key(dir.path(), "ro", &KNOWN, 0o400);
    assert_eq!(*read_key_file(spec(&ro)).unwrap(), KNOWN);
}

#[test]
fn key_file_encodings() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(KNOWN);
    let forms: [(&str, Vec<u8>); 5] = [
        ("raw", KNOWN.to_vec()),
        ("hex", format!("{}\n", hex::encode(KNOWN)).into_bytes()),
        ("hexupper", format!("  {}  \r\n", hex::encode_upper(KNOWN)).into_bytes()),
        ("b64", format!("{b64}\n").into_bytes()),
        ("b64bare", b64.clone().into_bytes()),
    ];
    for (name, content) in forms {
        let path = write_key(dir.path(), name, &content, 0o600);
        assert_eq!(*read_key_file(spec(&path)).unwrap(), KNOWN, "{name}");
    }
    let wrong: [(&str, Vec<u8>); 6] = [
        ("raw31", KNOWN[..31].to_vec()),
        ("raw33", [&KNOWN[..], &[0u8]].concat()),
        ("hex62", hex::encode(&KNOWN[..31]).into_bytes()),
        (
            "b64-16",
            base64::engine::general_purpose::STANDARD
                .encode(&KNOWN[..16])
                .into_bytes(),
        ),
        ("garbage", b"this is not a key at all\n".to_vec()),
        ("huge", vec![b'a'; 1 << 20]),
    ];
    for (name, content) in wrong {
        let path = write_key(dir.path(), name, &content, 0o600);
        match read_key_file(spec(&path)) {
            Err(e @ KeyError::KeyFile { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("32 raw bytes") && msg.contains("64 hex") && msg.contains("base64"),
                    "{msg}"
                );
                assert_no_key_bytes(&msg, &KNOWN);
                assert!(!msg.contains("not a key at all"), "content echoed: {msg}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn missing_key_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.key");
    match read_key_file(spec(&path)) {
        Err(e @ KeyError::KeyFile { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(spec(&path)) && msg.contains("no such file"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn keygen_writes_0600_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    keygen(&path).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    let first = read_key_file(spec(&path)).unwrap();
    match keygen(&path) {
        Err(e @ KeyError::KeyFile { .. }) => assert!(e.to_string().contains("refusing to overwrite"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        *read_key_file(spec(&path)).unwrap(),
        *first,
        "the existing key is untouched"
    );
    let other = dir.path().join("other.key");
    keygen(&other).unwrap();
    assert_ne!(*read_key_file(spec(&other)).unwrap(), *first, "keys are random");
}

/// All checks that touch `CREDENTIALS_DIRECTORY` are in one test: the environment is shared by the test threads.
#[test]
fn systemd_credentials() {
    let creds = tempfile::tempdir().unwrap();
    // systemd makes credential files group-readable in a private directory: allowed there.
    let path = write_key(creds.path(), "master", hex::encode(KNOWN).as_bytes(), 0o440);
    write_key(creds.path(), "world", &KNOWN, 0o444);
    unsafe { std::env::remove_var("CREDENTIALS_DIRECTORY") };
    match read_key_file("cred:master") {
        Err(e @ KeyError::KeyFile { .. }) => assert!(e.to_string().contains("CREDENTIALS_DIRECTORY"), "{e}"),
        other => panic!("{other:?}"),
    }
    unsafe { std::env::set_var("CREDENTIALS_DIRECTORY", creds.path()) };
    assert_eq!(*read_key_file("cred:master").unwrap(), KNOWN);
    assert_eq!(
        *read_key_file(spec(&path)).unwrap(),
        KNOWN,
        "a direct path into the credentials directory"
    );
    assert!(matches!(
        read_key_file("cred:world"),
        Err(KeyError::KeyFilePermissions { .. })
    ));
    assert!(matches!(
        read_key_file("cred:../etc/passwd"),
        Err(KeyError::KeyFile { .. })
    ));
    match read_key_file("cred:absent") {
        Err(e @ KeyError::KeyFile { .. }) => assert!(e.to_string().contains("absent"), "{e}"),
        other => panic!("{other:?}"),
    }
    unsafe { std::env::remove_var("CREDENTIALS_DIRECTORY") };
}

fn local(byte: u8, name: &str) -> LocalProvider {
    LocalProvider::new(&[byte; 32], name, Arc::new(KeyStats::new()))
}

#[tokio::test]
async fn volume_created_once_then_verified() {
    let store = MapStore::default();
    let p = local(1, "/keys/a");
    let info = open_or_create_volume(&store, "mnt/", &p, None).await.unwrap();
    assert_eq!(
        info,
        VolumeInfo {
            mode: KeyMode::CseLocal,
            block_size: BlockSize::DEFAULT,
            format_version: 1
        }
    );
    assert!(store.objects.lock().unwrap().contains_key("mnt/.s3crypt-volume"));
    let again = open_or_create_volume(&store, "mnt/", &p, Some(BlockSize::DEFAULT))
        .await
        .unwrap();
    assert_eq!(again, info);
    assert_eq!(store.puts.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn volume_refuses_wrong_master_key() {
    let store = MapStore::default();
    open_or_create_volume(&store, "v", &local(1, "/keys/right"), None)
        .await
        .unwrap();
    match open_or_create_volume(&store, "v", &local(2, "/keys/wrong.key"), None).await {
        Err(e @ KeyError::WrongKey(_)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("/keys/wrong.key") && msg.contains("does not match"),
                "{msg}"
            );
            assert!(msg.contains("this volume was made with"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn volume_refuses_other_block_size() {
    let store = MapStore::default();
    let p = local(1, "k");
    let b16k = BlockSize::new(16 * 1024).unwrap();
    open_or_create_volume(&store, "", &p, Some(b16k)).await.unwrap();
    match open_or_create_volume(&store, "", &p, Some(BlockSize::new(1 << 20).unwrap())).await {
        Err(
            e @ KeyError::VolumeBlockSize {
                volume: 16384,
                requested: 1048576,
            },
        ) => {
            assert!(
                e.to_string().contains("this volume was made with block_size=16384"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Not asking for a block size takes the volume's.
    assert_eq!(
        open_or_create_volume(&store, "", &p, None).await.unwrap().block_size,
        b16k
    );
}

/// A provider that claims another mode, to see the mode check.
struct OtherMode(LocalProvider);

#[async_trait]
impl DataKeyProvider for OtherMode {
    fn mode(&self) -> KeyMode {
        KeyMode::CseKms
    }
    async fn generate(&self, file_id: &FileId) -> Result<(DataKey, Vec<u8>), KeyError> {
        self.0.generate(file_id).await
    }
    async fn unwrap(&self, file_id: &FileId, wrapped: &[u8]) -> Result<DataKey, KeyError> {
        self.0.unwrap(file_id, wrapped).await
    }
}

#[tokio::test]
async fn volume_refuses_other_key_mode() {
    let store = MapStore::default();
    open_or_create_volume(&store, "v/", &local(1, "k"), None).await.unwrap();
    match open_or_create_volume(&store, "v/", &OtherMode(local(1, "k")), None).await {
        Err(
            e @ KeyError::VolumeKeyMode {
                volume: KeyMode::CseLocal,
                requested: KeyMode::CseKms,
            },
        ) => {
            assert!(
                e.to_string().contains("this volume was made with key_mode=cse-local"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_first_mounts_agree() {
    let store = Arc::new(MapStore::default());
    let p = Arc::new(local(1, "k"));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (store, p) = (store.clone(), p.clone());
            tokio::spawn(async move { open_or_create_volume(store.as_ref(), "r/", p.as_ref(), None).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().block_size, BlockSize::DEFAULT);
    }
    assert_eq!(store.puts.load(std::sync::atomic::Ordering::Relaxed), 1);
}

fn offline_sdk() -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build()
}

#[tokio::test]
async fn build_keys_validates_options() {
    let sdk = offline_sdk();
    let expect_config_error = |cfg: KeyConfig, words: &'static [&'static str]| {
        let sdk = sdk.clone();
        async move {
            match build_keys(&cfg, &sdk).await {
                Err(e @ KeyError::Config(_)) => {
                    let msg = e.to_string();
                    assert!(words.iter().all(|w| msg.contains(w)), "{msg}");
                }
                other => panic!("{cfg:?}: {other:?}"),
            }
        }
    };
    expect_config_error(KeyConfig::new(KeyMode::CseKms), &["cse-kms", "kms_key_id"]).await;
    expect_config_error(KeyConfig::new(KeyMode::SseC), &["sse-c", "sse_c_key_file"]).await;
    expect_config_error(KeyConfig::new(KeyMode::CseLocal), &["cse-local", "master_key_file"]).await;
    let cfg = KeyConfig {
        master_key_file: Some("/k".into()),
        ..KeyConfig::new(KeyMode::SseS3)
    };
    expect_config_error(cfg, &["master_key_file", "does not apply", "sse-s3"]).await;
    let cfg = KeyConfig {
        kms_key_id: Some("alias/x".into()),
        ..KeyConfig::new(KeyMode::CseLocal)
    };
    expect_config_error(cfg, &["kms_key_id", "does not apply", "cse-local"]).await;
    let cfg = KeyConfig {
        kms_key_id: Some("alias/k".into()),
        sse_c_key_file: Some("/k".into()),
        ..KeyConfig::new(KeyMode::CseKms)
    };
    expect_config_error(cfg, &["sse_c_key_file", "does not apply", "cse-kms"]).await;

    let keys = build_keys(&KeyConfig::new(KeyMode::SseS3), &sdk).await.unwrap();
    assert!(matches!(keys.sse, Sse::S3) && keys.provider.is_none());
    let cfg = KeyConfig {
        kms_key_id: Some("alias/k".into()),
        ..KeyConfig::new(KeyMode::SseKms)
    };
    let keys = build_keys(&cfg, &sdk).await.unwrap();
    assert!(matches!(keys.sse, Sse::Kms { key_id: Some(ref k) } if k == "alias/k"));
    let keys = build_keys(&KeyConfig::new(KeyMode::SseKms), &sdk).await.unwrap();
    assert!(matches!(keys.sse, Sse::Kms { key_id: None }));
}

#[tokio::test]
async fn no_key_bytes_in_debug_output() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = write_key(dir.path(), "k", &KNOWN, 0o600);
    let sdk = offline_sdk();

    let cfg = KeyConfig {
        master_key_file: Some(spec(&key_path).into()),
        ..KeyConfig::new(KeyMode::CseLocal)
    };
    let keys = build_keys(&cfg, &sdk).await.unwrap();
    let provider = keys.provider.clone().unwrap();
    assert_eq!(provider.mode(), KeyMode::CseLocal);
    let file_id = [7u8; 16];
    let (data_key, wrapped) = provider.generate(&file_id).await.unwrap();
    let data_bytes = *data_key.as_bytes();
    keys.cache.insert(&file_id, &wrapped, data_key);
    // A cached key under a known value too.
    keys.cache.insert(&[8u8; 16], b"w", DataKey::from_bytes(KNOWN));
    assert_eq!(keys.cache.len(), 2);

    let local_provider = LocalProvider::from_key_file(spec(&key_path), keys.stats.clone()).unwrap();
    let kms_provider = KmsProvider::new(&sdk, "alias/test", keys.stats.clone());
    let cfg = KeyConfig {
        sse_c_key_file: Some(spec(&key_path).into()),
        ..KeyConfig::new(KeyMode::SseC)
    };
    let sse_c_keys = build_keys(&cfg, &sdk).await.unwrap();
    let Sse::Customer(ref customer) = sse_c_keys.sse else {
        panic!("{:?}", sse_c_keys.sse)
    };
    assert_eq!(customer.key_md5_base64(), SseCustomerKey::new(KNOWN).key_md5_base64());

    let outputs = [
        format!("{keys:?}"),
        format!("{keys:#?}"),
        format!("{:?}", keys.cache),
        format!("{local_provider:?}"),
        format!("{kms_provider:?}"),
        format!("{sse_c_keys:?}"),
        format!("{sse_c_keys:#?}"),
        format!("{customer:?}"),
        format!("{:?}", SseCustomerKey::new(KNOWN)),
        format!("{:?}", DataKey::from_bytes(KNOWN)),
    ];
    for out in &outputs {
        assert_no_key_bytes(out, &KNOWN);
        assert_no_key_bytes(out, &data_bytes);
    }
    assert!(
        outputs[3].contains("LocalProvider") && outputs[4].contains("alias/test"),
        "{outputs:?}"
    );
}
