//! The counting / fault-injecting and retrying wrappers over the real S3 store on the local server, and the
//! error mapping of failures that have no S3 response (connection refused) or name a missing bucket.
mod common;

use bytes::Bytes;
use s3crypt::store::failing::{Action, FailingStore, FaultKind, OpKind, Rule, When};
use s3crypt::store::retry::{RetryPolicy, Retrying};
use s3crypt::store::s3::s3_client;
use s3crypt::store::{ByteRange, Metadata, ObjectStore, PutCondition, S3Store, Sse, StoreError};
use std::time::Duration;

const MIB: usize = 1024 * 1024;

async fn s3(bucket: &str) -> S3Store {
    S3Store::new(
        s3_client(None, Some(common::endpoint().to_string()), true).await,
        bucket,
        Sse::None,
    )
}

fn fast_policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_requests_and_bytes_over_s3() {
    let store = FailingStore::new(s3(&common::create_bucket("count").await).await);
    let none = Metadata::new();
    store
        .put("src", Bytes::from(vec![1u8; 6 * MIB]), &none, PutCondition::None)
        .await
        .unwrap();
    let id = store.create_multipart("dst", &none).await.unwrap();
    let p1 = store
        .upload_part_copy("dst", &id, 1, "src", 0..5 * MIB as u64, None)
        .await
        .unwrap();
    let p2 = store
        .upload_part("dst", &id, 2, Bytes::from(vec![2u8; 4096]))
        .await
        .unwrap();
    store
        .complete_multipart("dst", &id, vec![p1, p2], PutCondition::None)
        .await
        .unwrap();
    let got = store.get("dst", Some(ByteRange::Suffix(4096)), None).await.unwrap();
    assert_eq!(&got.data[..], &[2u8; 4096][..]);
    store.head("missing").await.unwrap_err();

    let s = store.stats();
    assert_eq!((s.count(OpKind::Put), s.bytes_up(OpKind::Put)), (1, 6 * MIB as u64));
    assert_eq!((s.count(OpKind::CreateMultipart), s.count(OpKind::Complete)), (1, 1));
    assert_eq!(
        (s.count(OpKind::UploadPartCopy), s.bytes_copied(OpKind::UploadPartCopy)),
        (1, 5 * MIB as u64)
    );
    assert_eq!((s.count(OpKind::UploadPart), s.bytes_up(OpKind::UploadPart)), (1, 4096));
    assert_eq!((s.count(OpKind::Get), s.bytes_down(OpKind::Get)), (1, 4096));
    assert_eq!((s.count(OpKind::Head), s.errors(OpKind::Head)), (1, 1));
    assert_eq!(s.total_count(), 7);
    assert_eq!(s.total_bytes_up(), 6 * MIB as u64 + 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_transient_errors_are_retried_over_s3() {
    let failing = FailingStore::new(s3(&common::create_bucket("retry").await).await);
    let rule = Rule::new(
        None,
        When::Probability { p: 0.4, seed: 42 },
        Action::Fail(FaultKind::Transient),
    );
    failing.add_rule(rule);
    // Lost responses of unconditional PUTs are harmless to retry: the second PUT writes the same bytes.
    failing.add_rule(Rule::new(
        Some(OpKind::Put),
        When::Nth(3),
        Action::FailAfter(FaultKind::Transient),
    ));
    let store = Retrying::new(failing, fast_policy(10));
    for i in 0..20 {
        let key = format!("k{i}");
        let body = Bytes::from(format!("value {i}"));
        store
            .put(&key, body.clone(), &Metadata::new(), PutCondition::None)
            .await
            .unwrap();
        assert_eq!(store.get(&key, None, None).await.unwrap().data, body);
    }
    let s = store.inner().stats();
    assert!(s.injected(OpKind::Put) > 0 && s.injected(OpKind::Get) > 0, "{s:?}");
    assert_eq!(s.count(OpKind::Put), 20 + s.injected(OpKind::Put));
    assert_eq!(s.count(OpKind::Get), 20 + s.injected(OpKind::Get));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_surface_typed_without_retry() {
    let bucket = common::create_bucket("perm").await;
    let failing = FailingStore::new(s3(&bucket).await);
    failing.add_rule(Rule::fail(OpKind::Get, When::Nth(1), FaultKind::AccessDenied));
    let store = Retrying::new(failing, fast_policy(6));
    store
        .put("k", Bytes::from_static(b"v"), &Metadata::new(), PutCondition::None)
        .await
        .unwrap();
    assert!(matches!(
        store.get("k", None, None).await,
        Err(StoreError::AccessDenied(_))
    ));
    let stale = store
        .put(
            "k",
            Bytes::from_static(b"w"),
            &Metadata::new(),
            PutCondition::IfNoneMatch,
        )
        .await;
    assert!(matches!(stale, Err(StoreError::PreconditionFailed(_))), "{stale:?}");
    let s = store.inner().stats();
    assert_eq!(
        (s.count(OpKind::Get), s.count(OpKind::Put)),
        (1, 2),
        "no retries of permanent errors"
    );

    let no_bucket = S3Store::new(
        s3_client(None, Some(common::endpoint().to_string()), true).await,
        format!("{bucket}-missing"),
        Sse::None,
    );
    let err = no_bucket
        .put("k", Bytes::from_static(b"v"), &Metadata::new(), PutCondition::None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NoSuchBucket(m) if m.contains("-missing")),
        "{err:?}"
    );
    assert!(err.to_string().contains("check the bucket name and region"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_transient_and_bounded() {
    common::endpoint();
    // A port nobody listens on: every attempt is refused at once.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let client = s3_client(Some("us-east-1".into()), Some(dead), true).await;
    let store = Retrying::new(
        FailingStore::new(S3Store::new(client, "bucket", Sse::None)),
        fast_policy(3),
    );
    let err = store.head("k").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Transient(m) if m.contains("3 attempts")),
        "{err:?}"
    );
    assert_eq!(store.inner().stats().count(OpKind::Head), 3);
}
