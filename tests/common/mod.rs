//! Shared test-bed helpers for integration tests: the local S3 + KMS server (LocalStack, started by
//! `scripts/s3-local`), fresh buckets and fresh KMS keys.
//!
//! `scripts/test` starts the server and exports `AWS_ENDPOINT_URL`; a test run without it starts the server itself
//! through the same script, so `cargo test` works on its own too. There is no silent skip: if the server cannot be
//! had, the test fails with the script's message.
#![allow(dead_code)]

pub mod mount;
pub mod proxy;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Endpoint and credentials of the local server, exported into this process's environment.
pub fn endpoint() -> &'static str {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT.get_or_init(|| {
        if let Ok(e) = std::env::var("AWS_ENDPOINT_URL") {
            if e.starts_with("http://127.") || e.starts_with("http://localhost") {
                set_local_credentials();
                return e;
            }
            panic!("AWS_ENDPOINT_URL={e} is not a loopback address; tests only talk to the local server");
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/s3-local");
        let out = std::process::Command::new(script)
            .arg("start")
            .output()
            .expect("run scripts/s3-local start");
        assert!(
            out.status.success(),
            "scripts/s3-local start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf-8 exports");
        let mut endpoint = None;
        for line in text.lines() {
            if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
                // Safe: set once, before any test in this process reads the environment through the SDK.
                unsafe { std::env::set_var(k, v) };
                if k == "AWS_ENDPOINT_URL" {
                    endpoint = Some(v.to_string());
                }
            }
        }
        endpoint.expect("s3-local printed AWS_ENDPOINT_URL")
    })
}

fn set_local_credentials() {
    for (k, v) in [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
    ] {
        if std::env::var_os(k).is_none() {
            unsafe { std::env::set_var(k, v) };
        }
    }
}

/// Runs the `s3crypt` binary against the local server and returns its output.
pub fn s3crypt_cli(args: &[&str]) -> std::process::Output {
    endpoint();
    std::process::Command::new(env!("CARGO_BIN_EXE_s3crypt"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run s3crypt")
}

/// A command's status and output, for assertion messages.
pub fn describe(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An SDK configuration for the local server.
pub async fn sdk_config() -> aws_config::SdkConfig {
    let endpoint = endpoint().to_string();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .load()
        .await
}

/// A raw S3 client (path-style) for the local server, for setting up and for checking what S3 holds.
pub async fn s3_client() -> aws_sdk_s3::Client {
    let conf = sdk_config().await;
    let s3 = aws_sdk_s3::config::Builder::from(&conf).force_path_style(true).build();
    aws_sdk_s3::Client::from_conf(s3)
}

pub async fn kms_client() -> aws_sdk_kms::Client {
    aws_sdk_kms::Client::new(&sdk_config().await)
}

/// A name unique to this process and call, usable as a bucket name.
pub fn unique_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t-{tag}-{}-{n}-{nanos:x}", std::process::id()).to_lowercase()
}

/// Multipart uploads the bucket still has open, as `key upload-id` (a raw client, straight to the server).
pub async fn pending_multipart_uploads(bucket: &str) -> Vec<String> {
    let out = s3_client()
        .await
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .expect("list multipart uploads");
    out.uploads()
        .iter()
        .map(|u| format!("{} {}", u.key().unwrap_or("?"), u.upload_id().unwrap_or("?")))
        .collect()
}

/// Asserts equal contents without printing them: the lengths and the first difference.
#[track_caller]
pub fn same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: {} bytes, want {}; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

/// Creates a fresh bucket and returns its name.
pub async fn create_bucket(tag: &str) -> String {
    let name = unique_name(tag);
    s3_client()
        .await
        .create_bucket()
        .bucket(&name)
        .send()
        .await
        .expect("create bucket");
    name
}

/// Sets a bucket's default encryption to SSE-KMS with `key_arn` (so that objects written without headers are
/// reported as aws:kms, and an SSE-S3 header can be told apart from the default).
pub async fn set_bucket_default_kms(bucket: &str, key_arn: &str) {
    use aws_sdk_s3::types::{
        ServerSideEncryption, ServerSideEncryptionByDefault, ServerSideEncryptionConfiguration,
        ServerSideEncryptionRule,
    };
    let by_default = ServerSideEncryptionByDefault::builder()
        .sse_algorithm(ServerSideEncryption::AwsKms)
        .kms_master_key_id(key_arn)
        .build()
        .unwrap();
    let conf = ServerSideEncryptionConfiguration::builder()
        .rules(
            ServerSideEncryptionRule::builder()
                .apply_server_side_encryption_by_default(by_default)
                .build(),
        )
        .build()
        .unwrap();
    s3_client()
        .await
        .put_bucket_encryption()
        .bucket(bucket)
        .server_side_encryption_configuration(conf)
        .send()
        .await
        .expect("put bucket encryption");
}

/// Sets a bucket's default encryption to SSE-S3 (AES256).
pub async fn set_bucket_default_s3(bucket: &str) {
    use aws_sdk_s3::types::{
        ServerSideEncryption, ServerSideEncryptionByDefault, ServerSideEncryptionConfiguration,
        ServerSideEncryptionRule,
    };
    let by_default = ServerSideEncryptionByDefault::builder()
        .sse_algorithm(ServerSideEncryption::Aes256)
        .build()
        .unwrap();
    let conf = ServerSideEncryptionConfiguration::builder()
        .rules(
            ServerSideEncryptionRule::builder()
                .apply_server_side_encryption_by_default(by_default)
                .build(),
        )
        .build()
        .unwrap();
    s3_client()
        .await
        .put_bucket_encryption()
        .bucket(bucket)
        .server_side_encryption_configuration(conf)
        .send()
        .await
        .expect("put bucket encryption");
}

/// Creates a fresh symmetric KMS key and returns its ARN.
pub async fn create_kms_key() -> String {
    let out = kms_client()
        .await
        .create_key()
        .description("s3crypt test key")
        .send()
        .await
        .expect("create key");
    out.key_metadata()
        .expect("key metadata")
        .arn()
        .expect("arn")
        .to_string()
}

/// A minimal in-memory [`s3crypt::store::ObjectStore`] for key-layer tests: whole-object GET/PUT with
/// `If-None-Match: *`, HEAD and DELETE. Other operations answer `InvalidRequest`. It counts PUTs so a test can see
/// whether something was written.
#[derive(Default)]
pub struct MapStore {
    pub objects: std::sync::Mutex<std::collections::HashMap<String, bytes::Bytes>>,
    pub puts: AtomicU32,
}

mod map_store {
    use super::MapStore;
    use async_trait::async_trait;
    use bytes::Bytes;
    use s3crypt::store::*;
    use std::sync::atomic::Ordering;

    fn info(key: &str, data: &Bytes) -> ObjectInfo {
        ObjectInfo {
            key: key.to_string(),
            size: data.len() as u64,
            etag: format!("\"{}\"", data.len()),
            last_modified: None,
            metadata: Metadata::new(),
            sse_algorithm: None,
            sse_kms_key_id: None,
            sse_customer_algorithm: None,
        }
    }

    fn unsupported<T>() -> StoreResult<T> {
        Err(StoreError::InvalidRequest("not supported by the test MapStore".into()))
    }

    #[async_trait]
    impl ObjectStore for MapStore {
        async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
            let objects = self.objects.lock().unwrap();
            objects
                .get(key)
                .map(|d| info(key, d))
                .ok_or_else(|| StoreError::NotFound(key.into()))
        }
        async fn get(&self, key: &str, range: Option<ByteRange>, _if_match: Option<&str>) -> StoreResult<GetOutput> {
            if range.is_some() {
                return unsupported();
            }
            let objects = self.objects.lock().unwrap();
            let data = objects
                .get(key)
                .cloned()
                .ok_or_else(|| StoreError::NotFound(key.into()))?;
            Ok(GetOutput {
                info: info(key, &data),
                data,
            })
        }
        async fn put(&self, key: &str, body: Bytes, _m: &Metadata, cond: PutCondition) -> StoreResult<ObjectInfo> {
            let mut objects = self.objects.lock().unwrap();
            if cond == PutCondition::IfNoneMatch && objects.contains_key(key) {
                return Err(StoreError::PreconditionFailed(key.into()));
            }
            self.puts.fetch_add(1, Ordering::Relaxed);
            let i = info(key, &body);
            objects.insert(key.to_string(), body);
            Ok(i)
        }
        async fn create_multipart(&self, _key: &str, _m: &Metadata) -> StoreResult<String> {
            unsupported()
        }
        async fn upload_part(&self, _k: &str, _u: &str, _n: i32, _b: Bytes) -> StoreResult<CompletedPart> {
            unsupported()
        }
        async fn upload_part_copy(
            &self,
            _k: &str,
            _u: &str,
            _n: i32,
            _s: &str,
            _r: std::ops::Range<u64>,
            _m: Option<&str>,
        ) -> StoreResult<CompletedPart> {
            unsupported()
        }
        async fn complete_multipart(
            &self,
            _k: &str,
            _u: &str,
            _p: Vec<CompletedPart>,
            _c: PutCondition,
        ) -> StoreResult<String> {
            unsupported()
        }
        async fn abort_multipart(&self, _k: &str, _u: &str) -> StoreResult<()> {
            unsupported()
        }
        async fn copy(&self, _s: &str, _d: &str, _m: Option<&Metadata>, _c: PutCondition) -> StoreResult<String> {
            unsupported()
        }
        async fn delete(&self, key: &str) -> StoreResult<()> {
            self.objects.lock().unwrap().remove(key);
            Ok(())
        }
        async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
            let mut objects = self.objects.lock().unwrap();
            for k in keys {
                objects.remove(k);
            }
            Ok(())
        }
        async fn list(&self, _p: &str, _d: Option<&str>, _c: Option<&str>, _m: Option<i32>) -> StoreResult<ListPage> {
            unsupported()
        }
    }
}
