//! Self-test of the fault-injecting proxy (`common::proxy`): every mode and the one-shot response drop, through a
//! raw aws-sdk-s3 client (one attempt, so that faults surface) against the local S3 server, plus the HTTP framing
//! cases the SDK does not send (chunked bodies, HEAD, 204, interim 1xx, close-delimited bodies) against a scripted
//! upstream. Each test asserts what the proxy did, so a proxy that passed everything, or nothing, fails it.
mod common;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use common::proxy::{FaultProxy, Mode};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

/// A raw S3 client whose endpoint is `proxy`, with a single attempt and an operation timeout (60 s by default).
async fn client_via(proxy: &FaultProxy, operation_timeout: Option<Duration>) -> Client {
    let conf = common::sdk_config().await;
    let mut s3 = aws_sdk_s3::config::Builder::from(&conf)
        .endpoint_url(proxy.endpoint())
        .force_path_style(true)
        .retry_config(RetryConfig::standard().with_max_attempts(1));
    // A bound even where the test sets none, so that a proxy that loses track of a response fails the test
    // instead of hanging it.
    let limit = operation_timeout.unwrap_or(Duration::from_secs(60));
    s3 = s3.timeout_config(TimeoutConfig::builder().operation_timeout(limit).build());
    Client::from_conf(s3.build())
}

/// A proxy in front of the local server, a client through it and a fresh bucket.
async fn setup(tag: &str) -> (FaultProxy, Client, String) {
    let proxy = FaultProxy::start(common::endpoint());
    let client = client_via(&proxy, None).await;
    let bucket = common::create_bucket(tag).await;
    (proxy, client, bucket)
}

/// `len` bytes of a pattern that no shift of itself matches (so a lost or repeated chunk shows).
fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + i / 251) as u8).wrapping_add(seed))
        .collect()
}

/// Asserts that an SDK call failed at the connection (DispatchFailure with an I/O cause), not with a response.
fn assert_io_failure<E: std::error::Error + 'static, R: std::fmt::Debug>(err: &SdkError<E, R>, what: &str) {
    let SdkError::DispatchFailure(failure) = err else {
        panic!("{what}: expected a dispatch failure, got {}", DisplayErrorContext(err));
    };
    assert!(
        failure.is_io(),
        "{what}: expected an I/O failure, got {}",
        DisplayErrorContext(err)
    );
}

async fn head_size(client: &Client, bucket: &str, key: &str) -> Result<i64, String> {
    match client.head_object().bucket(bucket).key(key).send().await {
        Ok(head) => Ok(head.content_length().expect("content length")),
        Err(e) => Err(DisplayErrorContext(e).to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_round_trips_objects_and_multipart_uploads() {
    let (proxy, client, bucket) = setup("px-pass").await;
    let body = data(3 * MIB, 1);
    client
        .put_object()
        .bucket(&bucket)
        .key("whole")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .expect("put through the proxy");
    let got = client
        .get_object()
        .bucket(&bucket)
        .key("whole")
        .send()
        .await
        .expect("get through the proxy");
    let got = got.body.collect().await.expect("read the body").into_bytes();
    assert!(got == body, "the 3 MiB body came back changed ({} bytes)", got.len());

    // A streamed body (not in memory) goes out aws-chunked: the proxy must frame that too.
    let file = tempfile::NamedTempFile::new().unwrap();
    let streamed = data(MIB + 3, 11);
    std::fs::write(file.path(), &streamed).unwrap();
    client
        .put_object()
        .bucket(&bucket)
        .key("streamed")
        .body(ByteStream::from_path(file.path()).await.unwrap())
        .send()
        .await
        .expect("put a streamed body through the proxy");
    let got = client
        .get_object()
        .bucket(&bucket)
        .key("streamed")
        .send()
        .await
        .expect("get the streamed object");
    let got = got.body.collect().await.expect("read the body").into_bytes();
    assert!(
        got == streamed,
        "the streamed body came back changed ({} bytes)",
        got.len()
    );

    let parts = [data(5 * MIB, 2), data(5 * MIB, 3)];
    let upload = client
        .create_multipart_upload()
        .bucket(&bucket)
        .key("multi")
        .send()
        .await
        .expect("create");
    let upload_id = upload.upload_id().expect("upload id");
    let mut completed = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let number = i as i32 + 1;
        let out = client
            .upload_part()
            .bucket(&bucket)
            .key("multi")
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(part.clone()))
            .send()
            .await
            .expect("upload part");
        completed.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag)
                .build(),
        );
    }
    client
        .complete_multipart_upload()
        .bucket(&bucket)
        .key("multi")
        .upload_id(upload_id)
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(completed)).build())
        .send()
        .await
        .expect("complete");
    let got = client
        .get_object()
        .bucket(&bucket)
        .key("multi")
        .send()
        .await
        .expect("get the multipart object");
    let got = got.body.collect().await.expect("read the body").into_bytes();
    assert!(
        got == parts.concat(),
        "the multipart object came back changed ({} bytes)",
        got.len()
    );

    // All of it went through the proxy, one logged head per request.
    let log = proxy.requests();
    let count = |method: &str| log.iter().filter(|h| h.method == method).count();
    assert_eq!((count("PUT"), count("GET"), count("POST")), (4, 3, 2), "{log:#?}");
    // What the SDK sends for bodies (seen with `--nocapture`): the framing the proxy has to follow.
    for put in log.iter().filter(|h| h.method == "PUT") {
        let framing = [
            "content-length",
            "transfer-encoding",
            "content-encoding",
            "x-amz-decoded-content-length",
        ]
        .map(|name| format!("{name}={:?}", put.header(name)));
        eprintln!("{}: {}", put.target.split('?').next().unwrap(), framing.join(" "));
    }
    assert_eq!(proxy.dropped(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_fails_requests_until_pass_again() {
    let (proxy, client, bucket) = setup("px-reset").await;
    client
        .put_object()
        .bucket(&bucket)
        .key("k")
        .body(ByteStream::from(data(100, 4)))
        .send()
        .await
        .unwrap();
    // The PUT's connection stays in the client's pool: the mode must reach it, not only new connections.
    proxy.set_mode(Mode::Reset);
    let err = client
        .head_object()
        .bucket(&bucket)
        .key("k")
        .send()
        .await
        .expect_err("a reset HEAD");
    assert_io_failure(&err, "HEAD while resetting");
    let err = client
        .head_object()
        .bucket(&bucket)
        .key("k")
        .send()
        .await
        .expect_err("a reset HEAD");
    assert_io_failure(&err, "HEAD on a new connection while resetting");
    proxy.set_mode(Mode::Pass);
    assert_eq!(
        head_size(&client, &bucket, "k").await,
        Ok(100),
        "HEAD after switching back to Pass"
    );
    assert_eq!(proxy.requests().iter().filter(|h| h.method == "HEAD").count(), 3);
}

/// Outcome (true: succeeded) of each of `n` HEADs through a fresh proxy resetting `fraction` of them.
async fn reset_fraction_outcomes(fraction: f64, n: usize) -> Vec<bool> {
    let (proxy, client, bucket) = setup("px-frac").await;
    client
        .put_object()
        .bucket(&bucket)
        .key("k")
        .body(ByteStream::from(data(10, 5)))
        .send()
        .await
        .unwrap();
    proxy.set_mode(Mode::ResetFraction(fraction));
    let mut outcomes = Vec::new();
    for _ in 0..n {
        match client.head_object().bucket(&bucket).key("k").send().await {
            Ok(_) => outcomes.push(true),
            Err(e) => {
                assert_io_failure(&e, "HEAD under ResetFraction");
                outcomes.push(false)
            }
        }
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_fraction_resets_some_requests_the_same_way_each_run() {
    let first = reset_fraction_outcomes(0.5, 24).await;
    let failed = first.iter().filter(|ok| !**ok).count();
    assert!(
        (4..=20).contains(&failed),
        "{failed} of 24 reset at fraction 0.5: {first:?}"
    );
    assert_eq!(reset_fraction_outcomes(0.5, 24).await, first, "the draws are seeded");
    assert!(reset_fraction_outcomes(0.0, 8).await.iter().all(|ok| *ok));
    assert!(reset_fraction_outcomes(1.0, 8).await.iter().all(|ok| !*ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_delays_each_request() {
    let (proxy, client, bucket) = setup("px-stall").await;
    client
        .put_object()
        .bucket(&bucket)
        .key("k")
        .body(ByteStream::from(data(10, 6)))
        .send()
        .await
        .unwrap();
    proxy.set_mode(Mode::Stall(Duration::from_millis(1500)));
    for _ in 0..2 {
        let started = Instant::now();
        assert_eq!(head_size(&client, &bucket, "k").await, Ok(10));
        assert!(
            started.elapsed() >= Duration::from_millis(1500),
            "not stalled: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_conditional_put_is_applied_but_not_answered() {
    let (proxy, client, bucket) = setup("px-dropput").await;
    proxy.drop_response_once(|h| h.method == "PUT" && h.header("If-None-Match") == Some("*"));
    // An unconditional PUT does not match, and is answered.
    client
        .put_object()
        .bucket(&bucket)
        .key("plain")
        .body(ByteStream::from(data(10, 7)))
        .send()
        .await
        .unwrap();
    assert_eq!(proxy.dropped(), 0);

    let body = data(MIB + 17, 8);
    let err = client
        .put_object()
        .bucket(&bucket)
        .key("cond")
        .if_none_match("*")
        .body(ByteStream::from(body.clone()))
        .send()
        .await
        .expect_err("the conditional PUT's response is dropped");
    assert_io_failure(&err, "conditional PUT with a dropped response");
    assert_eq!(proxy.dropped(), 1);
    assert_eq!(
        head_size(&client, &bucket, "cond").await,
        Ok(body.len() as i64),
        "the server applied the PUT"
    );

    // The drop was one-shot: the same PUT again passes the proxy and meets the first one's success.
    let err = client
        .put_object()
        .bucket(&bucket)
        .key("cond")
        .if_none_match("*")
        .body(ByteStream::from(body))
        .send()
        .await
        .expect_err("the object exists already");
    let status = err.raw_response().map(|r| r.status().as_u16());
    assert_eq!(status, Some(412), "{}", DisplayErrorContext(&err));
    assert_eq!(proxy.dropped(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_complete_multipart_is_applied_but_not_answered() {
    let (proxy, client, bucket) = setup("px-dropmpu").await;
    // CreateMultipartUpload (POST ?uploads) and UploadPart (PUT ?uploadId=) must not match.
    proxy.drop_response_once(|h| h.method == "POST" && h.target.contains("uploadId="));
    let upload = client
        .create_multipart_upload()
        .bucket(&bucket)
        .key("m")
        .send()
        .await
        .expect("create");
    let upload_id = upload.upload_id().expect("upload id");
    let part = data(2 * MIB, 9);
    let out = client
        .upload_part()
        .bucket(&bucket)
        .key("m")
        .upload_id(upload_id)
        .part_number(1)
        .body(ByteStream::from(part.clone()))
        .send()
        .await
        .expect("upload part");
    assert_eq!(proxy.dropped(), 0);
    let parts = vec![CompletedPart::builder().part_number(1).set_e_tag(out.e_tag).build()];
    let err = client
        .complete_multipart_upload()
        .bucket(&bucket)
        .key("m")
        .upload_id(upload_id)
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
        .send()
        .await
        .expect_err("the completion's response is dropped");
    assert_io_failure(&err, "CompleteMultipartUpload with a dropped response");
    assert_eq!(proxy.dropped(), 1);
    assert_eq!(
        head_size(&client, &bucket, "m").await,
        Ok(part.len() as i64),
        "the server completed the upload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_holds_requests_until_the_client_gives_up() {
    let proxy = FaultProxy::start(common::endpoint());
    let client = client_via(&proxy, Some(Duration::from_secs(1))).await;
    let bucket = common::create_bucket("px-hole").await;
    client
        .put_object()
        .bucket(&bucket)
        .key("k")
        .body(ByteStream::from(data(10, 10)))
        .send()
        .await
        .unwrap();
    proxy.set_mode(Mode::Blackhole);
    let started = Instant::now();
    let err = client
        .head_object()
        .bucket(&bucket)
        .key("k")
        .send()
        .await
        .expect_err("no answer");
    let waited = started.elapsed();
    assert!(
        matches!(err, SdkError::TimeoutError(_)),
        "expected a timeout, got {}",
        DisplayErrorContext(&err)
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );
    assert!(
        proxy.requests().iter().any(|h| h.method == "HEAD"),
        "the proxy read the HEAD it swallowed"
    );
    proxy.set_mode(Mode::Pass);
    assert_eq!(
        head_size(&client, &bucket, "k").await,
        Ok(10),
        "HEAD after switching back to Pass"
    );
}

/// An upstream that plays a script: for each connection it accepts, a list of (request expected byte for byte,
/// response sent); it closes the connection after the last. Returns the first mismatch as an error.
fn scripted_upstream(
    script: Vec<Vec<(&'static str, &'static str)>>,
) -> (String, std::thread::JoinHandle<Result<(), String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        for exchanges in script {
            let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for (request, response) in exchanges {
                let mut got = vec![0; request.len()];
                conn.read_exact(&mut got)
                    .map_err(|e| format!("reading {request:?}: {e}"))?;
                if got != request.as_bytes() {
                    return Err(format!("expected {request:?}, got {:?}", String::from_utf8_lossy(&got)));
                }
                conn.write_all(response.as_bytes()).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    });
    (addr, server)
}

fn raw_client(proxy: &FaultProxy) -> TcpStream {
    let conn = TcpStream::connect(proxy.endpoint().trim_start_matches("http://")).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn
}

/// Sends `request` and reads exactly `expected` back.
fn exchange(conn: &mut TcpStream, request: &str, expected: &str) {
    conn.write_all(request.as_bytes()).unwrap();
    let mut got = vec![0; expected.len()];
    conn.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("response to {request:?}: {e}"));
    assert_eq!(String::from_utf8_lossy(&got), expected);
}

fn read_to_end(conn: &mut TcpStream) -> String {
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).expect("a clean end of stream");
    String::from_utf8(rest).unwrap()
}

const CHUNKED_POST: &str = "POST /a HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n\
                            5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nx-trailer: t\r\n\r\n";
const CHUNKED_OK: &str = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
const HEAD: &str = "HEAD /b HTTP/1.1\r\nHost: x\r\n\r\n";
const HEAD_OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n";
const DELETE: &str = "DELETE /c HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
const NO_CONTENT: &str = "HTTP/1.1 204 No Content\r\n\r\n";
const PUT_CLOSE: &str =
    "PUT /d HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
const CONTINUE: &str = "HTTP/1.1 100 Continue\r\n\r\n";
const PUT_OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
const GET: &str = "GET /e HTTP/1.1\r\nHost: x\r\n\r\n";
const TO_CLOSE: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nbody until close";

#[test]
fn framing_of_chunked_bodiless_interim_and_close_delimited_messages() {
    let put_reply: &'static str = format!("{CONTINUE}{PUT_OK}").leak();
    let (upstream, server) = scripted_upstream(vec![
        vec![
            (CHUNKED_POST, CHUNKED_OK),
            (HEAD, HEAD_OK),
            (DELETE, NO_CONTENT),
            (PUT_CLOSE, put_reply),
        ],
        vec![(GET, TO_CLOSE)],
    ]);
    let proxy = FaultProxy::start(&upstream);
    // Keep-alive across four requests on one connection each side; the interim 100 is not passed on, and the
    // client's `Connection: close` closes the client connection after its response.
    let mut conn = raw_client(&proxy);
    exchange(&mut conn, CHUNKED_POST, CHUNKED_OK);
    exchange(&mut conn, HEAD, HEAD_OK);
    exchange(&mut conn, DELETE, NO_CONTENT);
    exchange(&mut conn, PUT_CLOSE, PUT_OK);
    assert_eq!(read_to_end(&mut conn), "", "the proxy closes after Connection: close");
    // A response without length or chunking runs to the server's close, and the proxy closes after it.
    let mut conn = raw_client(&proxy);
    conn.write_all(GET.as_bytes()).unwrap();
    assert_eq!(read_to_end(&mut conn), TO_CLOSE);
    server
        .join()
        .unwrap()
        .expect("the upstream saw exactly the requests sent");

    let log = proxy.requests();
    let targets: Vec<_> = log.iter().map(|h| format!("{} {}", h.method, h.target)).collect();
    assert_eq!(targets, ["POST /a", "HEAD /b", "DELETE /c", "PUT /d", "GET /e"]);
    assert_eq!(
        log[0].header("Transfer-Encoding"),
        Some("chunked"),
        "header lookup ignores case"
    );
    assert_eq!(log[0].header("x-trailer"), None, "trailers are not headers");
}

#[test]
fn drop_closes_every_connection_and_the_port() {
    let proxy = FaultProxy::start(common::endpoint());
    let endpoint = proxy.endpoint();
    proxy.set_mode(Mode::Blackhole);
    let mut held = raw_client(&proxy);
    held.write_all(HEAD.as_bytes()).unwrap();
    let idle = raw_client(&proxy);
    // The proxy has read the HEAD before it is dropped: the blackholed connection is live in its thread.
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.requests().is_empty() {
        assert!(Instant::now() < deadline, "the proxy never read the HEAD");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Dropped on another thread, so that a drop that hangs on a blocked connection fails instead of hanging.
    let (done, dropped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(proxy);
        done.send(()).unwrap();
    });
    dropped
        .recv_timeout(Duration::from_secs(3))
        .expect("the drop returns while connections are open");
    let mut buf = [0u8; 1];
    assert!(
        matches!(held.read(&mut buf), Ok(0) | Err(_)),
        "the held connection is closed"
    );
    drop(idle);
    let refused = TcpStream::connect(endpoint.trim_start_matches("http://"));
    assert!(refused.is_err(), "the port is closed");
}

#[test]
fn reset_is_a_tcp_reset() {
    // Nothing listens upstream: a reset request is never forwarded.
    let proxy = FaultProxy::start("127.0.0.1:9");
    proxy.set_mode(Mode::Reset);
    let mut conn = raw_client(&proxy);
    conn.write_all(HEAD.as_bytes()).unwrap();
    let mut buf = [0u8; 64];
    let got = conn.read(&mut buf);
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "expected ECONNRESET, got {got:?}"
    );
    assert_eq!(proxy.requests().len(), 1);
}
