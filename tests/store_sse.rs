//! Server-side encryption per mode, against the local S3 server. Each mode is tested on a bucket whose default
//! encryption differs from it, so a header that was not sent would show up as the bucket default instead.
mod common;

use aws_sdk_s3::error::ProvideErrorMetadata;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use s3crypt::store::s3::s3_client;
use s3crypt::store::{Metadata, ObjectStore, PutCondition, S3Store, Sse, SseCustomerKey, StoreError};

const MIB: usize = 1024 * 1024;

async fn store(bucket: &str, sse: Sse) -> S3Store {
    S3Store::new(
        s3_client(None, Some(common::endpoint().to_string()), true).await,
        bucket,
        sse,
    )
}

fn random_bytes(seed: u64, len: usize) -> Bytes {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut v[..]);
    Bytes::from(v)
}

fn no_meta() -> Metadata {
    Metadata::new()
}

/// Writes `key` by PUT, `key.mp` by multipart and `key.copy` by CopyObject, all through `store`.
async fn write_three_ways(store: &S3Store, key: &str) {
    store
        .put(key, random_bytes(1, 1000), &no_meta(), PutCondition::None)
        .await
        .unwrap();
    let mp = format!("{key}.mp");
    let id = store.create_multipart(&mp, &no_meta()).await.unwrap();
    let part = store.upload_part(&mp, &id, 1, random_bytes(2, 100)).await.unwrap();
    let mp_etag = store
        .complete_multipart(&mp, &id, vec![part], PutCondition::None)
        .await
        .unwrap();
    assert_eq!(store.head(&mp).await.unwrap().etag, mp_etag);
    let copy = format!("{key}.copy");
    let copy_etag = store.copy(key, &copy, None, PutCondition::None).await.unwrap();
    assert_eq!(store.head(&copy).await.unwrap().etag, copy_etag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_s3_on_a_bucket_with_default_kms() {
    let bucket = common::create_bucket("sse-s3").await;
    let key_arn = common::create_kms_key().await;
    common::set_bucket_default_kms(&bucket, &key_arn).await;
    let plain = store(&bucket, Sse::None).await;
    plain
        .put("default", Bytes::from_static(b"x"), &no_meta(), PutCondition::None)
        .await
        .unwrap();
    assert_eq!(
        plain.head("default").await.unwrap().sse_algorithm.as_deref(),
        Some("aws:kms"),
        "bucket default"
    );

    let s3 = store(&bucket, Sse::S3).await;
    write_three_ways(&s3, "obj").await;
    for key in ["obj", "obj.mp", "obj.copy"] {
        let info = s3.head(key).await.unwrap();
        assert_eq!(info.sse_algorithm.as_deref(), Some("AES256"), "{key}");
        assert_eq!(info.sse_kms_key_id, None, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_kms_on_a_bucket_with_default_aes256() {
    let bucket = common::create_bucket("sse-kms").await;
    common::set_bucket_default_s3(&bucket).await;
    let key_arn = common::create_kms_key().await;
    let key_id = key_arn.rsplit('/').next().unwrap().to_string();
    let kms = store(
        &bucket,
        Sse::Kms {
            key_id: Some(key_arn.clone()),
        },
    )
    .await;
    write_three_ways(&kms, "obj").await;
    for key in ["obj", "obj.mp", "obj.copy"] {
        let info = kms.head(key).await.unwrap();
        assert_eq!(info.sse_algorithm.as_deref(), Some("aws:kms"), "{key}");
        let reported = info.sse_kms_key_id.expect("KMS key id reported");
        assert!(
            reported.ends_with(&key_id),
            "{key}: reported key {reported}, expected {key_arn}"
        );
    }
    let got = kms.get("obj", None, None).await.unwrap();
    assert_eq!(got.data, random_bytes(1, 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_kms_with_an_unknown_key_fails_naming_the_key() {
    let bucket = common::create_bucket("sse-kms-bad").await;
    let real = common::create_kms_key().await;
    let (arn_prefix, _) = real.rsplit_once('/').unwrap();
    let missing = format!("{arn_prefix}/0b5c3a4e-0000-4000-8000-00000000dead");
    let kms = store(
        &bucket,
        Sse::Kms {
            key_id: Some(missing.clone()),
        },
    )
    .await;
    let err = kms
        .put("obj", Bytes::from_static(b"x"), &no_meta(), PutCondition::None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest(_)), "{err:?}");
    assert!(err.to_string().contains(&missing), "the message names the key: {err}");
    assert!(matches!(kms.head("obj").await, Err(StoreError::NotFound(_))));
}

/// The status with which the server refused a raw request made without the customer key.
fn refusal_status<E: ProvideErrorMetadata>(
    result: Result<impl std::fmt::Debug, aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
) -> u16 {
    let err = result.expect_err("the server must refuse SSE-C data without the key");
    err.raw_response()
        .map(|r| r.status().as_u16())
        .expect("an HTTP refusal")
}

async fn assert_refused_without_key(bucket: &str, key: &str) {
    let raw = common::s3_client().await;
    let get = raw.get_object().bucket(bucket).key(key).send().await.map(|_| ());
    assert_eq!(refusal_status(get), 400, "GET {key} without the key");
    let head = raw.head_object().bucket(bucket).key(key).send().await.map(|_| ());
    assert_eq!(refusal_status(head), 400, "HEAD {key} without the key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_c_is_enforced_and_round_trips() {
    let bucket = common::create_bucket("sse-c").await;
    let ssec = store(&bucket, Sse::Customer(SseCustomerKey::new([7; 32]))).await;
    let data = random_bytes(3, 6 * MIB);
    ssec.put("src", data.clone(), &no_meta(), PutCondition::None)
        .await
        .unwrap();
    assert_refused_without_key(&bucket, "src").await;
    let info = ssec.head("src").await.unwrap();
    assert_eq!(
        (info.sse_customer_algorithm.as_deref(), info.size),
        (Some("AES256"), data.len() as u64)
    );
    assert_eq!(ssec.get("src", None, None).await.unwrap().data, data);

    let wrong = store(&bucket, Sse::Customer(SseCustomerKey::new([8; 32]))).await;
    let err = wrong.get("src", None, None).await.unwrap_err();
    assert!(
        matches!(err, StoreError::AccessDenied(_) | StoreError::InvalidRequest(_)),
        "{err:?}"
    );

    let id = ssec.create_multipart("mp", &no_meta()).await.unwrap();
    let p1 = ssec
        .upload_part_copy("mp", &id, 1, "src", 0..5 * MIB as u64, Some(&info.etag))
        .await
        .unwrap();
    let tail = Bytes::from_static(b"tail written by UploadPart");
    let p2 = ssec.upload_part("mp", &id, 2, tail.clone()).await.unwrap();
    let mp_etag = ssec
        .complete_multipart("mp", &id, vec![p1, p2], PutCondition::IfNoneMatch)
        .await
        .unwrap();
    let mp = ssec.head("mp").await.unwrap();
    assert_eq!(mp.etag, mp_etag);
    assert_eq!(mp.sse_customer_algorithm.as_deref(), Some("AES256"));
    assert_refused_without_key(&bucket, "mp").await;
    let got = ssec.get("mp", None, None).await.unwrap().data;
    assert!(
        got[..5 * MIB] == data[..5 * MIB] && got[5 * MIB..] == tail[..],
        "multipart content"
    );

    let copy_etag = ssec.copy("mp", "mp.copy", None, PutCondition::None).await.unwrap();
    assert_eq!(ssec.head("mp.copy").await.unwrap().etag, copy_etag);
    assert_refused_without_key(&bucket, "mp.copy").await;
    assert_eq!(ssec.get("mp.copy", None, None).await.unwrap().data, got);
}

/// A copy over the single-CopyObject limit goes in parts (UploadPartCopy with the source's customer key), and a
/// metadata copy onto itself stays conditional. The limit is lowered to reach the path with a 12 MiB object; S3's
/// is 5 GiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_over_the_limit_go_in_parts_under_sse_c() {
    use s3crypt::store::copy_object;
    let bucket = common::create_bucket("bigcopy").await;
    let ssec = store(&bucket, Sse::Customer(SseCustomerKey::new([9; 32]))).await;
    let data = random_bytes(5, 12 * MIB + 7);
    let mut meta = no_meta();
    meta.insert("mode".into(), "0644".into());
    let src = ssec.put("src", data.clone(), &meta, PutCondition::None).await.unwrap();
    let (size, limit) = (data.len() as u64, 5 * MIB as u64);

    let etag = copy_object(&ssec, "src", "dst", None, PutCondition::None, size, None, limit)
        .await
        .unwrap();
    let dst = ssec.get("dst", None, None).await.unwrap();
    assert_eq!(dst.data, data);
    assert_eq!(dst.info.etag, etag);
    assert!(etag.ends_with("-3\""), "three parts: {etag}");
    assert_eq!(dst.info.metadata, meta, "the source's metadata");
    assert_refused_without_key(&bucket, "dst").await;

    let mut chmod = meta.clone();
    chmod.insert("mode".into(), "0600".into());
    let stale = copy_object(
        &ssec,
        "dst",
        "dst",
        Some(&chmod),
        PutCondition::IfMatch(src.etag.clone()),
        size,
        Some(&src.etag),
        limit,
    )
    .await;
    assert!(matches!(stale, Err(StoreError::PreconditionFailed(_))), "{stale:?}");
    let cond = PutCondition::IfMatch(etag.clone());
    let moved = copy_object(&ssec, "dst", "dst", Some(&chmod), cond, size, Some(&etag), limit)
        .await
        .unwrap();
    let after = ssec.get("dst", None, None).await.unwrap();
    assert_eq!((after.data, after.info.metadata, after.info.etag), (data, chmod, moved));
    let left = ssec.list_multipart_uploads("").await.unwrap();
    assert!(left.is_empty(), "no upload left: {left:?}");
}
