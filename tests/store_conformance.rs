//! The ObjectStore conformance suite: every test is written once as a function of `Arc<dyn ObjectStore>` and run
//! against the in-memory store and against S3Store on the local S3 server (a fresh bucket per test).
mod common;

use bytes::Bytes;
use futures::StreamExt;
use md5::{Digest, Md5};
use rand::{Rng, SeedableRng};
use s3crypt::store::s3::s3_client;
use s3crypt::store::{ByteRange, MemoryStore, Metadata, ObjectStore, PutCondition, S3Store, Sse, StoreError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

type Store = Arc<dyn ObjectStore>;

const MIB: usize = 1024 * 1024;

async fn memory_store() -> Store {
    Arc::new(MemoryStore::new())
}

async fn s3_store() -> Store {
    let endpoint = common::endpoint().to_string();
    let bucket = common::create_bucket("conf").await;
    Arc::new(S3Store::new(
        s3_client(None, Some(endpoint), true).await,
        bucket,
        Sse::None,
    ))
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::memory_store().await).await
            })*
        }
        mod s3 {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::s3_store().await).await
            })*
        }
    };
}

conformance!(
    not_found,
    ranged_get_edges,
    metadata_round_trip,
    conditional_put,
    multipart_with_part_copy,
    pieces_are_the_body,
    conditional_complete,
    abort_multipart,
    listing_across_pages,
    copy_with_metadata,
    batch_delete,
    part_from_file_and_pending_uploads,
);

fn random_bytes(seed: u64, len: usize) -> Bytes {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    Bytes::from(v)
}

fn md5_etag(data: &[u8]) -> String {
    format!("\"{}\"", hex::encode(Md5::digest(data)))
}

fn meta(pairs: &[(&str, &str)]) -> Metadata {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

async fn put(store: &Store, key: &str, data: Bytes) -> s3crypt::store::ObjectInfo {
    store
        .put(key, data, &Metadata::new(), PutCondition::None)
        .await
        .expect("put")
}

async fn not_found(store: Store) {
    assert!(matches!(store.head("no/such/key").await, Err(StoreError::NotFound(_))));
    assert!(matches!(
        store.get("no/such/key", None, None).await,
        Err(StoreError::NotFound(_))
    ));
    let range = Some(ByteRange::Range { start: 0, end: 10 });
    assert!(matches!(
        store.get("no/such/key", range, None).await,
        Err(StoreError::NotFound(_))
    ));
    store
        .delete("no/such/key")
        .await
        .expect("deleting a missing key succeeds");
}

async fn ranged_get_edges(store: Store) {
    let data = random_bytes(1, 1000);
    let info = put(&store, "r/obj", data.clone()).await;
    assert_eq!(info.etag, md5_etag(&data));
    let get = |r: ByteRange| {
        let store = store.clone();
        async move { store.get("r/obj", Some(r), None).await }
    };
    let first = get(ByteRange::Range { start: 0, end: 1 }).await.unwrap();
    assert_eq!((&first.data[..], first.info.size), (&data[..1], 1000));
    let last = get(ByteRange::Range { start: 999, end: 1000 }).await.unwrap();
    assert_eq!(&last.data[..], &data[999..]);
    let cut = get(ByteRange::Range { start: 990, end: 5000 }).await.unwrap();
    assert_eq!((&cut.data[..], cut.info.size), (&data[990..], 1000));
    let past = get(ByteRange::Range { start: 1000, end: 1010 }).await;
    assert!(matches!(past, Err(StoreError::InvalidRange(_))), "{past:?}");
    let suffix = get(ByteRange::Suffix(10)).await.unwrap();
    assert_eq!((&suffix.data[..], suffix.info.size), (&data[990..], 1000));
    let long_suffix = get(ByteRange::Suffix(5000)).await.unwrap();
    assert_eq!(long_suffix.data, data);
    let whole = store.get("r/obj", None, Some(&info.etag)).await.unwrap();
    assert_eq!((whole.data, whole.info.etag), (data, info.etag));
    let stale = store
        .get("r/obj", None, Some("\"0123456789abcdef0123456789abcdef\""))
        .await;
    assert!(matches!(stale, Err(StoreError::PreconditionFailed(_))), "{stale:?}");
    let no_suffix = get(ByteRange::Suffix(0)).await;
    assert!(matches!(no_suffix, Err(StoreError::InvalidRange(_))), "{no_suffix:?}");
    let empty = put(&store, "r/empty", Bytes::new()).await;
    for r in [
        ByteRange::Range { start: 0, end: 10 },
        ByteRange::Range { start: 5, end: 10 },
        ByteRange::Suffix(10),
    ] {
        let got = store
            .get("r/empty", Some(r), Some(&empty.etag))
            .await
            .expect("a range of an empty object");
        assert_eq!((got.data.len(), got.info.size), (0, 0), "{r:?}");
    }
}

async fn metadata_round_trip(store: Store) {
    let m = meta(&[("s3crypt-version", "1"), ("plain-size", "12345"), ("mode", "0100644")]);
    let before = SystemTime::now() - Duration::from_secs(60);
    let put = store
        .put("m/obj", Bytes::from_static(b"payload"), &m, PutCondition::None)
        .await
        .unwrap();
    assert_eq!(
        (put.size, put.etag.as_str(), &put.metadata),
        (7, md5_etag(b"payload").as_str(), &m)
    );
    assert_eq!(
        (put.last_modified, put.sse_algorithm.as_deref()),
        (None, Some("AES256"))
    );
    let head = store.head("m/obj").await.unwrap();
    assert_eq!(
        (head.metadata.clone(), head.size, head.key.as_str()),
        (m.clone(), 7, "m/obj")
    );
    let modified = head.last_modified.expect("last_modified");
    assert!(
        modified > before && modified < SystemTime::now() + Duration::from_secs(60),
        "{modified:?}"
    );
    let got = store.get("m/obj", None, None).await.unwrap();
    assert_eq!(got.info.metadata, m);
    assert_eq!(got.info.etag, head.etag);
}

async fn conditional_put(store: Store) {
    let none = Metadata::new();
    let v1 = store
        .put("c/obj", Bytes::from_static(b"v1"), &none, PutCondition::IfNoneMatch)
        .await
        .unwrap();
    let again = store
        .put("c/obj", Bytes::from_static(b"v2"), &none, PutCondition::IfNoneMatch)
        .await;
    assert!(matches!(again, Err(StoreError::PreconditionFailed(_))), "{again:?}");
    let v2 = store
        .put(
            "c/obj",
            Bytes::from_static(b"v2"),
            &none,
            PutCondition::IfMatch(v1.etag.clone()),
        )
        .await;
    let v2 = v2.unwrap();
    let stale = store
        .put(
            "c/obj",
            Bytes::from_static(b"v3"),
            &none,
            PutCondition::IfMatch(v1.etag),
        )
        .await;
    assert!(matches!(stale, Err(StoreError::PreconditionFailed(_))), "{stale:?}");
    let got = store.get("c/obj", None, None).await.unwrap();
    assert_eq!((&got.data[..], got.info.etag), (&b"v2"[..], v2.etag));
}

/// Where the source of [`upload_mixed`]'s copies is.
const SOURCE_KEY: &str = "mp/source";

/// Puts 11 MiB of bytes from `seed` at [`SOURCE_KEY`], for [`upload_mixed`] to copy from; returns them.
async fn put_source(store: &Store, seed: u64) -> Bytes {
    let source = random_bytes(seed, 11 * MIB);
    put(store, SOURCE_KEY, source.clone()).await;
    source
}

/// Uploads a 5 MiB + 5 MiB + 1 MiB object from an 11 MiB source: copy, upload, copy (the last part short).
async fn upload_mixed(store: &Store, key: &str, source: &Bytes, cond: PutCondition) -> Result<Bytes, StoreError> {
    let src_etag = md5_etag(source);
    let id = store.create_multipart(key, &meta(&[("kind", "multipart")])).await?;
    let p1 = store
        .upload_part_copy(key, &id, 1, SOURCE_KEY, 0..5 * MIB as u64, Some(&src_etag))
        .await?;
    let fresh = random_bytes(3, 5 * MIB);
    let p2 = store.upload_part(key, &id, 2, fresh.clone()).await?;
    let tail = (10 * MIB) as u64..source.len() as u64;
    let p3 = store
        .upload_part_copy(key, &id, 3, SOURCE_KEY, tail.clone(), None)
        .await?;
    let result = store.complete_multipart(key, &id, vec![p1, p2, p3], cond).await;
    if result.is_err() {
        store.abort_multipart(key, &id).await?;
    }
    let etag = result?;
    let expected = [&source[..5 * MIB], &fresh[..], &source[tail.start as usize..]].concat();
    assert!(etag.ends_with("-3\""), "multipart ETag: {etag}");
    let info = store.head(key).await?;
    assert_eq!(info.etag, etag, "the returned ETag is the new object's");
    assert_eq!(info.size, expected.len() as u64);
    assert_eq!(info.metadata, meta(&[("kind", "multipart")]));
    Ok(Bytes::from(expected))
}

async fn multipart_with_part_copy(store: Store) {
    let source = put_source(&store, 2).await;
    let expected = upload_mixed(&store, "mp/dest", &source, PutCondition::IfNoneMatch)
        .await
        .unwrap();
    let got = store.get("mp/dest", None, None).await.unwrap();
    assert!(got.data == expected, "multipart content differs");
    let ranged = store.get(
        "mp/dest",
        Some(ByteRange::Range {
            start: 5 * MIB as u64 - 1,
            end: 5 * MIB as u64 + 1,
        }),
        None,
    );
    assert_eq!(&ranged.await.unwrap().data[..], &expected[5 * MIB - 1..5 * MIB + 1]);

    let id = store.create_multipart("mp/stale", &Metadata::new()).await.unwrap();
    let stale = store.upload_part_copy(
        "mp/stale",
        &id,
        1,
        SOURCE_KEY,
        0..10,
        Some("\"00000000000000000000000000000000\""),
    );
    assert!(matches!(stale.await, Err(StoreError::PreconditionFailed(_))));
    let past_end = store
        .upload_part_copy("mp/stale", &id, 1, SOURCE_KEY, 0..11 * MIB as u64 + 1, None)
        .await;
    assert!(matches!(past_end, Err(StoreError::InvalidRequest(_))), "{past_end:?}");
    let small = store
        .upload_part("mp/stale", &id, 1, Bytes::from_static(b"small"))
        .await
        .unwrap();
    let last = store
        .upload_part("mp/stale", &id, 2, Bytes::from_static(b"last"))
        .await
        .unwrap();
    let too_small = store
        .complete_multipart("mp/stale", &id, vec![small, last], PutCondition::None)
        .await;
    assert!(matches!(too_small, Err(StoreError::InvalidRequest(_))), "{too_small:?}");
    store.abort_multipart("mp/stale", &id).await.unwrap();
}

/// A GET in the store's pieces is the GET's body, whatever parts the range crosses, with the same facts and errors.
async fn pieces_are_the_body(store: Store) {
    let source = put_source(&store, 3).await;
    let expected = upload_mixed(&store, "pc/dest", &source, PutCondition::IfNoneMatch)
        .await
        .unwrap();
    let len = expected.len() as u64;
    let m = 5 * MIB as u64;
    // Each range with the bytes it must return.
    let ranges = [
        (None, 0..len),
        (Some(ByteRange::Range { start: 0, end: 1 }), 0..1),
        (
            Some(ByteRange::Range {
                start: m - 3,
                end: m + 3,
            }),
            m - 3..m + 3,
        ),
        (Some(ByteRange::Range { start: 1, end: len - 1 }), 1..len - 1),
        (
            Some(ByteRange::Range {
                start: len - 10,
                end: len + 10,
            }),
            len - 10..len,
        ),
        (
            Some(ByteRange::Suffix(6 * MIB as u64 + 7)),
            len - 6 * MIB as u64 - 7..len,
        ),
    ];
    for (r, want) in ranges {
        let got = store.get_pieces("pc/dest", r, None).await.unwrap();
        let want = &expected[want.start as usize..want.end as usize];
        assert_eq!(got.len(), want.len(), "{r:?}");
        assert!(got.pieces.concat() == want, "{r:?}: the pieces are not the body");
        let one = store.get("pc/dest", r, None).await.unwrap();
        assert!(one.data == want, "{r:?}: get");
        assert_eq!((got.info.size, &got.info.etag), (len, &one.info.etag), "{r:?}");
    }
    let stale = store
        .get_pieces("pc/dest", None, Some("\"0123456789abcdef0123456789abcdef\""))
        .await;
    assert!(matches!(stale, Err(StoreError::PreconditionFailed(_))), "{stale:?}");
    let past = store
        .get_pieces(
            "pc/dest",
            Some(ByteRange::Range {
                start: len,
                end: len + 1,
            }),
            None,
        )
        .await;
    assert!(matches!(past, Err(StoreError::InvalidRange(_))), "{past:?}");
    let missing = store.get_pieces("pc/missing", None, None).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
}

async fn conditional_complete(store: Store) {
    let source = put_source(&store, 4).await;
    let old = put(&store, "cc/dest", Bytes::from_static(b"old")).await;
    let exists = upload_mixed(&store, "cc/dest", &source, PutCondition::IfNoneMatch).await;
    assert!(matches!(exists, Err(StoreError::PreconditionFailed(_))), "{exists:?}");
    let stale = upload_mixed(&store, "cc/dest", &source, PutCondition::IfMatch(md5_etag(b"other"))).await;
    assert!(matches!(stale, Err(StoreError::PreconditionFailed(_))), "{stale:?}");
    assert_eq!(&store.get("cc/dest", None, None).await.unwrap().data[..], b"old");
    let expected = upload_mixed(&store, "cc/dest", &source, PutCondition::IfMatch(old.etag))
        .await
        .unwrap();
    assert!(store.get("cc/dest", None, None).await.unwrap().data == expected);
}

async fn abort_multipart(store: Store) {
    let id = store.create_multipart("ab/obj", &Metadata::new()).await.unwrap();
    store
        .upload_part("ab/obj", &id, 1, Bytes::from_static(b"part"))
        .await
        .unwrap();
    store.abort_multipart("ab/obj", &id).await.unwrap();
    let late = store.upload_part("ab/obj", &id, 2, Bytes::from_static(b"late")).await;
    assert!(matches!(late, Err(StoreError::NotFound(_))), "{late:?}");
    assert!(matches!(store.head("ab/obj").await, Err(StoreError::NotFound(_))));
}

/// A part streamed from a file is the file's first `len` bytes; pending uploads are listed by prefix until they
/// complete or are aborted.
async fn part_from_file_and_pending_uploads(store: Store) {
    let first = random_bytes(11, 5 << 20);
    let last = random_bytes(12, 1000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("part");
    let mut on_disk = first.to_vec();
    on_disk.extend_from_slice(b"bytes past len are not sent");
    std::fs::write(&path, &on_disk).unwrap();
    let id = store.create_multipart("pf/obj", &Metadata::new()).await.unwrap();
    let other = store.create_multipart("pf/other", &Metadata::new()).await.unwrap();
    let mut pending = store.list_multipart_uploads("pf/obj").await.unwrap();
    pending.sort();
    assert_eq!(pending, vec![("pf/obj".to_string(), id.clone())]);
    assert_eq!(store.list_multipart_uploads("pf/").await.unwrap().len(), 2);
    let p1 = store
        .upload_part_file("pf/obj", &id, 1, &path, first.len() as u64)
        .await
        .unwrap();
    let p2 = store.upload_part("pf/obj", &id, 2, last.clone()).await.unwrap();
    store
        .complete_multipart("pf/obj", &id, vec![p1, p2], PutCondition::None)
        .await
        .unwrap();
    store.abort_multipart("pf/other", &other).await.unwrap();
    assert!(store.list_multipart_uploads("pf/").await.unwrap().is_empty());
    let got = store.get("pf/obj", None, None).await.unwrap().data;
    let mut want = first.to_vec();
    want.extend_from_slice(&last);
    assert!(got[..] == want[..], "{} bytes, want {}", got.len(), want.len());
}

/// All pages of a listing: (keys, common prefixes, number of pages).
async fn list_all(
    store: &Store,
    prefix: &str,
    delim: Option<&str>,
    max: Option<i32>,
) -> (Vec<String>, Vec<String>, usize) {
    let (mut keys, mut prefixes, mut pages, mut token) = (Vec::new(), Vec::new(), 0, None::<String>);
    loop {
        let page = store.list(prefix, delim, token.as_deref(), max).await.expect("list");
        pages += 1;
        keys.extend(page.objects.into_iter().map(|o| o.key));
        prefixes.extend(page.common_prefixes);
        match page.next_token {
            Some(t) => token = Some(t),
            None => return (keys, prefixes, pages),
        }
    }
}

/// 2,500 keys: 2,400 under `p/a/`, 90 in directories `p/bNN/`, 10 directly under `p/`.
fn listing_keys() -> Vec<String> {
    let mut keys: Vec<String> = (0..2400).map(|i| format!("p/a/{i:05}")).collect();
    keys.extend((0..90).map(|i| format!("p/b{i:02}/x")));
    keys.extend((0..10).map(|i| format!("p/f{i}")));
    keys
}

async fn listing_across_pages(store: Store) {
    let keys = listing_keys();
    let puts = futures::stream::iter(keys.iter().cloned()).map(|k| {
        let store = store.clone();
        async move {
            store
                .put(&k, Bytes::from_static(b"x"), &Metadata::new(), PutCondition::None)
                .await
        }
    });
    let results: Vec<_> = puts.buffer_unordered(32).collect().await;
    assert!(results.iter().all(Result::is_ok));
    put(&store, "q/outside", Bytes::from_static(b"y")).await;

    let mut sorted = keys.clone();
    sorted.sort();
    let (all, prefixes, pages) = list_all(&store, "p/", None, None).await;
    assert_eq!((all.len(), prefixes.len(), pages), (2500, 0, 3));
    assert!(all == sorted, "keys in lexicographic order");

    let (under_a, _, pages) = list_all(&store, "p/a/", Some("/"), None).await;
    assert_eq!((under_a.len(), pages), (2400, 3));

    let (files, dirs, pages) = list_all(&store, "p/", Some("/"), Some(7)).await;
    let expected_files: Vec<String> = (0..10).map(|i| format!("p/f{i}")).collect();
    let mut expected_dirs = vec!["p/a/".to_string()];
    expected_dirs.extend((0..90).map(|i| format!("p/b{i:02}/")));
    assert_eq!((files, dirs), (expected_files, expected_dirs));
    assert_eq!(pages, 101usize.div_ceil(7));

    let first = store.list("p/", Some("/"), None, Some(2)).await.unwrap();
    assert_eq!((first.objects.len(), first.common_prefixes.len()), (0, 2));
    assert!(first.next_token.is_some());
    let (empty, no_dirs, _) = list_all(&store, "nothing/", Some("/"), None).await;
    assert!(empty.is_empty() && no_dirs.is_empty());
}

async fn copy_with_metadata(store: Store) {
    let m = meta(&[("a", "1")]);
    let data = random_bytes(5, 4096);
    store.put("cp/src", data.clone(), &m, PutCondition::None).await.unwrap();
    let replaced_etag = store
        .copy("cp/src", "cp/replaced", Some(&meta(&[("b", "2")])), PutCondition::None)
        .await
        .unwrap();
    let replaced = store.head("cp/replaced").await.unwrap();
    assert_eq!(replaced.etag, replaced_etag, "the returned ETag is the copy's");
    assert_eq!((replaced.metadata, replaced.size), (meta(&[("b", "2")]), 4096));
    let kept_etag = store.copy("cp/src", "cp/kept", None, PutCondition::None).await.unwrap();
    let kept = store.get("cp/kept", None, None).await.unwrap();
    assert_eq!(
        (kept.info.etag, kept.info.metadata, kept.data),
        (kept_etag.clone(), m, data)
    );
    let onto_itself = store
        .copy(
            "cp/kept",
            "cp/kept",
            Some(&meta(&[("c", "3")])),
            PutCondition::IfMatch(kept_etag),
        )
        .await
        .unwrap();
    assert_eq!(store.head("cp/kept").await.unwrap().etag, onto_itself);
    let exists = store.copy("cp/src", "cp/kept", None, PutCondition::IfNoneMatch).await;
    assert!(matches!(exists, Err(StoreError::PreconditionFailed(_))), "{exists:?}");
    let missing = store.copy("cp/missing", "cp/x", None, PutCondition::None).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))), "{missing:?}");
}

async fn batch_delete(store: Store) {
    for i in 0..6 {
        put(&store, &format!("d/{i}"), Bytes::from_static(b"z")).await;
    }
    let doomed: Vec<String> = ["d/0", "d/2", "d/4", "d/never-existed"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    store.delete_many(&doomed).await.unwrap();
    store.delete("d/5").await.unwrap();
    let (left, _, _) = list_all(&store, "d/", None, None).await;
    assert_eq!(left, vec!["d/1".to_string(), "d/3".to_string()]);
    store.delete_many(&[]).await.unwrap();
}
