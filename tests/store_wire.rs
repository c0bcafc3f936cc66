//! What `S3Store` puts on the wire, against the local S3 server: one request per write (no HEAD after
//! CompleteMultipartUpload or CopyObject, whose ETags come from their own responses), and timeouts that end a
//! request to a server that never answers without cutting off an upload that is merely slow.
mod common;

use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::BoxError;
use bytes::Bytes;
use s3crypt::store::s3::{s3_client_from, sdk_config, sdk_config_with, Timeouts};
use s3crypt::store::{Metadata, ObjectStore, PutCondition, S3Store, Sse, StoreError};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

/// One request as the client sent it, after signing: its method and headers (names lower-cased).
#[derive(Clone, Debug)]
struct SentRequest {
    method: String,
    headers: Vec<(String, String)>,
}

impl SentRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Records every request the client sends.
#[derive(Clone, Debug, Default)]
struct Sent(Arc<Mutex<Vec<SentRequest>>>);

impl Sent {
    fn methods(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().map(|r| r.method.clone()).collect()
    }

    fn with_method(&self, method: &str) -> Vec<SentRequest> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.method == method)
            .cloned()
            .collect()
    }
}

impl Intercept for Sent {
    fn name(&self) -> &'static str {
        "Sent"
    }

    fn read_before_transmit(
        &self,
        ctx: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = ctx.request();
        self.0.lock().unwrap().push(SentRequest {
            method: request.method().to_string(),
            headers: request
                .headers()
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .collect(),
        });
        Ok(())
    }
}

/// A client of the local server whose requests `seen` records as they are sent.
async fn watched_client(seen: &Sent) -> aws_sdk_s3::Client {
    let conf = sdk_config(None, Some(common::endpoint().to_string())).await;
    let s3 = aws_sdk_s3::config::Builder::from(&conf)
        .force_path_style(true)
        .interceptor(seen.clone())
        .build();
    aws_sdk_s3::Client::from_conf(s3)
}

/// Uploads (PutObject, UploadPart) are not hashed into the signature, which cost a sixth of the daemon's CPU
/// in a large write; the server checks each body against the CRC checksum sent with it instead, and stores it
/// intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_carry_a_checksum_instead_of_a_signed_payload_hash() {
    let bucket = common::create_bucket("wire").await;
    let seen = Sent::default();
    let store = S3Store::new(watched_client(&seen).await, bucket, Sse::None);
    let none = Metadata::new();
    let body: Vec<u8> = (0..3 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    store
        .put("whole", Bytes::from(body.clone()), &none, PutCondition::None)
        .await
        .unwrap();
    let id = store.create_multipart("parts", &none).await.unwrap();
    let part = store
        .upload_part("parts", &id, 1, Bytes::from(body.clone()))
        .await
        .unwrap();
    store
        .complete_multipart("parts", &id, vec![part], PutCondition::None)
        .await
        .unwrap();
    for key in ["whole", "parts"] {
        let got = store.get(key, None, None).await.unwrap();
        assert!(got.data[..] == body[..], "{key}: stored intact");
    }
    let puts = seen.with_method("PUT");
    assert_eq!(puts.len(), 2, "one PutObject, one UploadPart");
    for put in &puts {
        let hash = put.header("x-amz-content-sha256").unwrap_or_default();
        assert!(
            hash.contains("UNSIGNED-PAYLOAD"),
            "payload not hashed into the signature: {hash}"
        );
        let checksum = put.headers.iter().any(|(k, _)| k.starts_with("x-amz-checksum-"))
            || put
                .header("x-amz-trailer")
                .is_some_and(|t| t.starts_with("x-amz-checksum-"));
        assert!(checksum, "a checksum of the body goes with it: {:?}", put.headers);
        assert!(put.header("authorization").is_some(), "the request is still signed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compound_writes_take_their_etag_from_their_own_response() {
    let bucket = common::create_bucket("wire").await;
    let methods = Sent::default();
    let store = S3Store::new(watched_client(&methods).await, bucket, Sse::None);
    let none = Metadata::new();
    store
        .put("src", Bytes::from_static(b"source"), &none, PutCondition::None)
        .await
        .unwrap();
    let id = store.create_multipart("mp", &none).await.unwrap();
    let part = store
        .upload_part("mp", &id, 1, Bytes::from_static(b"part"))
        .await
        .unwrap();
    let mp = store
        .complete_multipart("mp", &id, vec![part], PutCondition::IfNoneMatch)
        .await
        .unwrap();
    let copy = store.copy("src", "copy", None, PutCondition::None).await.unwrap();
    assert_eq!(
        methods.methods(),
        ["PUT", "POST", "PUT", "POST", "PUT"],
        "one request per call, no HEAD"
    );
    assert_eq!(store.head("mp").await.unwrap().etag, mp);
    assert_eq!(store.head("copy").await.unwrap().etag, copy);
}

/// A server that accepts connections and never answers. Dropped with the test.
fn silent_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_times_out() {
    common::endpoint();
    let timeouts = Timeouts {
        connect: Duration::from_secs(1),
        read: Duration::from_secs(1),
        attempt: Duration::from_secs(3),
    };
    let endpoint = format!("http://{}", silent_server());
    let conf = sdk_config_with(Some("us-east-1".into()), Some(endpoint), timeouts).await;
    let store = S3Store::new(s3_client_from(&conf, true), "bucket", Sse::None);
    let t = Instant::now();
    let head = tokio::time::timeout(Duration::from_secs(15), store.head("k"))
        .await
        .expect("the request must end by itself, not hang");
    assert!(matches!(head, Err(StoreError::Transient(_))), "{head:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(Timeouts::default().read, Duration::from_secs(20));
}

/// A proxy to `upstream` that forwards what the client sends at `rate` bytes per second, and the answers at full
/// speed: a slow uplink.
fn slow_uplink(upstream: SocketAddr, rate: u64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = TcpStream::connect(upstream) else {
                return;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = c_in.read(&mut buf) {
                    if s_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
                }
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_in, &mut c_out);
                let _ = c_out.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// The SDK's read timeout runs from the start of the request, body upload included: a flat one cuts off any
/// upload that takes longer. `S3Store` extends it (and the attempt timeout) by the body's size at the minimum
/// upload rate; a raw client with the same settings shows what happens without that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_cut_off_by_the_read_timeout() {
    let bucket = common::create_bucket("slow").await;
    let upstream: SocketAddr = common::endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("the local endpoint is http://IP:PORT");
    // 4 MiB at 1 MiB/s: about 4 s on the wire, longer than the read (2 s) and attempt (3 s) timeouts.
    let endpoint = format!("http://{}", slow_uplink(upstream, MIB as u64));
    let timeouts = Timeouts {
        connect: Duration::from_secs(2),
        read: Duration::from_secs(2),
        attempt: Duration::from_secs(3),
    };
    let conf = sdk_config_with(None, Some(endpoint), timeouts).await;
    let client = s3_client_from(&conf, true);
    let body = Bytes::from(vec![7u8; 4 * MIB]);

    let raw = client
        .put_object()
        .bucket(&bucket)
        .key("raw")
        .body(body.clone().into())
        .send()
        .await;
    assert!(raw.is_err(), "a flat read timeout cuts the upload off");

    let store = S3Store::new(client, bucket, Sse::None);
    let t = Instant::now();
    let put = store.put("k", body.clone(), &Metadata::new(), PutCondition::None).await;
    let put = put.expect("the store's upload allowance lets a slow upload finish");
    assert!(
        t.elapsed() > Duration::from_secs(3),
        "the uplink was slow: {:?}",
        t.elapsed()
    );
    assert_eq!(store.head("k").await.unwrap().etag, put.etag);

    let id = store.create_multipart("mp", &Metadata::new()).await.unwrap();
    let part = store.upload_part("mp", &id, 1, body).await.unwrap();
    store
        .complete_multipart("mp", &id, vec![part], PutCondition::None)
        .await
        .unwrap();
}
