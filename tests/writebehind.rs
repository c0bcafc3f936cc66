//! Write-behind through real FUSE mounts against LocalStack, with the fault-injecting proxy between the mount and
//! the server: parts go up while the program is still writing, connections reset under the parts in flight lose
//! nothing, a header rewritten after parts went up ends up in the object, and no multipart upload is left
//! pending. (Kills of the daemon while parts are in flight are in tests/crash.rs, whose big files are written
//! with write-behind on.)
mod common;

use common::mount::{close_checked, pattern, TestMount, Volume};
use common::proxy::{FaultProxy, Mode, RequestHead};
use common::same;
use s3crypt::keys::KeyMode;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const SIZE: usize = 48 * MIB + 777;

fn is_part(r: &RequestHead) -> bool {
    r.method == "PUT" && r.target.contains("partNumber=")
}

fn parts_seen(proxy: &FaultProxy) -> usize {
    proxy.requests().iter().filter(|r| is_part(r)).count()
}

fn mount_via(vol: &Volume, proxy: &FaultProxy) -> TestMount {
    let endpoint = format!("endpoint={}", proxy.endpoint());
    TestMount::mount_with(vol, &[endpoint.as_str()])
}

fn read_fresh(vol: &Volume, name: &str) -> Vec<u8> {
    let m = TestMount::mount(vol);
    let data = fs::read(m.path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    m.unmount();
    data
}

fn no_upload_left(vol: &Volume) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = rt.block_on(common::pending_multipart_uploads(&vol.bucket));
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "multipart uploads left pending: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `content` in 1 MiB writes and returns the open file, not yet closed.
fn write_open(path: &std::path::Path, content: &[u8]) -> File {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    for chunk in content.chunks(MIB) {
        f.write_all(chunk).unwrap();
    }
    f
}

fn wait_for_parts(proxy: &FaultProxy, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while parts_seen(proxy) < n {
        assert!(
            Instant::now() < deadline,
            "only {} parts went up before close",
            parts_seen(proxy)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn parts_go_up_before_close(mode: KeyMode) {
    let vol = Volume::new(mode);
    let proxy = FaultProxy::start(common::endpoint());
    let m = mount_via(&vol, &proxy);
    let content = pattern(SIZE, 1);
    let f = write_open(&m.path("big"), &content);
    // The file is still open: the parts wholly behind its end are in S3 already.
    wait_for_parts(&proxy, 4);
    close_checked(f).unwrap();
    // 769 blocks of 64 KiB in parts of 128: 7 parts, each sent once (the ones before close were not sent again).
    assert_eq!(parts_seen(&proxy), 7);
    m.unmount();
    same(
        &read_fresh(&vol, "big"),
        &content,
        &format!("{mode:?} through write-behind"),
    );
    no_upload_left(&vol);
}

#[test]
fn parts_go_up_before_close_cse_kms() {
    parts_go_up_before_close(KeyMode::CseKms);
}

#[test]
fn parts_go_up_before_close_sse_c() {
    parts_go_up_before_close(KeyMode::SseC);
}

#[test]
fn resets_under_the_parts_in_flight_lose_nothing() {
    let vol = Volume::new(KeyMode::CseLocal);
    let proxy = FaultProxy::start(common::endpoint());
    let m = mount_via(&vol, &proxy);
    let content = pattern(SIZE, 2);
    proxy.set_mode(Mode::ResetFraction(0.3));
    let f = write_open(&m.path("big"), &content);
    proxy.set_mode(Mode::Pass);
    close_checked(f).unwrap();
    m.unmount();
    same(&read_fresh(&vol, "big"), &content, "through resets");
    no_upload_left(&vol);
}

#[test]
fn a_header_rewritten_after_parts_went_up_is_in_the_object() {
    let vol = Volume::new(KeyMode::CseLocal);
    let proxy = FaultProxy::start(common::endpoint());
    let m = mount_via(&vol, &proxy);
    let mut content = pattern(SIZE, 3);
    let f = write_open(&m.path("big"), &content);
    wait_for_parts(&proxy, 2);
    f.write_all_at(b"HEADER", 10).unwrap();
    content[10..16].copy_from_slice(b"HEADER");
    close_checked(f).unwrap();
    m.unmount();
    same(&read_fresh(&vol, "big"), &content, "header rewritten");
    no_upload_left(&vol);
}
