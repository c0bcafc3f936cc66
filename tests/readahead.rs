//! The read path through real FUSE mounts against LocalStack: sequential streaks that grow the read-ahead window
//! over several chunks, seeks at block and chunk boundaries, concurrent readers of one file, and read-ahead GETs
//! whose connections are reset by a fault-injecting proxy. Each pattern compares every byte with what was
//! written; the page cache is dropped for the file before each pattern, so the bytes come from the daemon.
mod common;

use common::mount::{pattern, write_file, TestMount, Volume};
use common::proxy::{FaultProxy, Mode};
use common::same;
use s3crypt::fs::CHUNK_BYTES;
use s3crypt::keys::KeyMode;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// Over two read-ahead chunks (`CHUNK_BYTES`, 16 MiB) and a few MiB more, ending in a short block.
const SIZE: usize = 2 * CHUNK_BYTES as usize + 5 * 1024 * 1024 + 12_345;
const B: u64 = 64 * 1024;

/// Evicts the file's pages from the kernel's cache, so that the next reads go to the daemon.
fn uncache(path: &Path) {
    let f = File::open(path).unwrap();
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

fn read_sequential(path: &Path, buf_len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    let (mut out, mut buf) = (Vec::new(), vec![0u8; buf_len]);
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

#[track_caller]
fn check_at(f: &File, content: &[u8], offset: u64, len: usize) {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read_at(&mut buf[got..], offset + got as u64).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    let start = (offset as usize).min(content.len());
    let end = (start + len).min(content.len());
    same(&buf[..got], &content[start..end], &format!("{len} bytes at {offset}"));
}

/// Offsets around every interesting boundary: blocks, the read-ahead chunks, the end.
fn boundaries() -> Vec<u64> {
    let chunk = CHUNK_BYTES;
    let mut v = Vec::new();
    for base in [0, B, 2 * B, chunk, 2 * chunk, SIZE as u64 - 1, SIZE as u64] {
        for d in [-1i64, 0, 1] {
            if let Some(o) = base.checked_add_signed(d) {
                v.push(o);
            }
        }
    }
    v
}

fn patterns(mode: KeyMode, extra: &[&str]) {
    let vol = Volume::new(mode);
    let content = Arc::new(pattern(SIZE, 17));
    let m = TestMount::mount(&vol);
    write_file(&m.path("big"), &content).unwrap();
    m.unmount();
    let words: Vec<&str> = ["read_ahead_kib=32768"]
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect();
    let m = TestMount::mount_with(&vol, &words);
    let path = m.path("big");
    // Sequential, in the kernel's read sizes and in small reads.
    for buf_len in [1 << 20, 4096, 100_000] {
        uncache(&path);
        same(
            &read_sequential(&path, buf_len),
            &content,
            &format!("sequential in {buf_len}-byte reads"),
        );
    }
    // Seeks: every boundary, several sizes, then a jump back to the start.
    uncache(&path);
    let f = File::open(&path).unwrap();
    for o in boundaries() {
        for len in [1, 4096, B as usize + 1, 3 << 20] {
            check_at(&f, &content, o, len);
        }
    }
    // Concurrent readers of one file: sequential ones at different speeds, and random ones.
    uncache(&path);
    let readers: Vec<_> = (0..6u64)
        .map(|t| {
            let (path, content) = (path.clone(), content.clone());
            std::thread::spawn(move || {
                if t % 2 == 0 {
                    same(
                        &read_sequential(&path, 50_000 + t as usize * 7),
                        &content,
                        "concurrent sequential",
                    );
                } else {
                    let f = File::open(&path).unwrap();
                    let mut x = t.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    for _ in 0..60 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        check_at(&f, &content, x % (SIZE as u64 + 10), (x >> 40) as usize % 300_000 + 1);
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    m.unmount();
}

#[test]
fn read_patterns_return_the_written_bytes_cse_local() {
    patterns(KeyMode::CseLocal, &[]);
}

#[test]
fn read_patterns_return_the_written_bytes_sse_s3() {
    patterns(KeyMode::SseS3, &[]);
}

#[test]
fn read_ahead_gets_reset_by_the_network_are_retried_and_read_right() {
    let vol = Volume::new(KeyMode::CseKms);
    let content = pattern(SIZE, 5);
    let m = TestMount::mount(&vol);
    write_file(&m.path("big"), &content).unwrap();
    m.unmount();
    let proxy = FaultProxy::start(common::endpoint());
    let endpoint = format!("endpoint={}", proxy.endpoint());
    let m = TestMount::mount_with(&vol, &[endpoint.as_str(), "read_ahead_kib=32768"]);
    proxy.set_mode(Mode::ResetFraction(0.2));
    let path = m.path("big");
    uncache(&path);
    same(&read_sequential(&path, 1 << 20), &content, "sequential through resets");
    let gets = proxy.requests().iter().filter(|r| r.method == "GET").count();
    assert!(gets >= 3, "{gets} GETs: the read went through the proxy");
    proxy.set_mode(Mode::Pass);
    m.unmount();
}

/// A cold sequential read fetches each byte of the object once. The kernel sends its read-ahead requests
/// concurrently and they reach the daemon out of order; a request for the end of a chunk the reader has just
/// left must be served from that chunk, not by a second GET of it (a cold 1 GiB read used to download 1.4 GiB).
fn a_cold_sequential_read_downloads_each_byte_once(mode: KeyMode, extra: &[&str]) {
    let vol = Volume::new(mode);
    let size = 72 * 1024 * 1024 + 4321;
    let content = pattern(size, 9);
    let m = TestMount::mount(&vol);
    write_file(&m.path("big"), &content).unwrap();
    m.unmount();
    for round in 0..3 {
        let m = TestMount::mount_with(&vol, extra);
        let path = m.path("big");
        uncache(&path);
        m.counter.reset();
        same(&read_sequential(&path, 1 << 20), &content, "sequential read");
        let stats = m.counter.stats();
        let (gets, down) = (
            stats.count(s3crypt::store::failing::OpKind::Get),
            stats.bytes_down(s3crypt::store::failing::OpKind::Get),
        );
        // The object is a little larger than the plaintext (28 bytes per block in the client-side modes); the
        // first read, before the streak is seen, may fetch its 1 MiB once more.
        let object = size as u64 + size as u64 / B * 28 + 28;
        assert!(
            down <= object + (1 << 20) + 28 * 16,
            "round {round}: {down} bytes downloaded for a {object}-byte object in {gets} GETs"
        );
        m.unmount();
    }
}

#[test]
fn a_cold_sequential_read_downloads_each_byte_once_cse_local() {
    a_cold_sequential_read_downloads_each_byte_once(KeyMode::CseLocal, &[]);
}

#[test]
fn a_cold_sequential_read_downloads_each_byte_once_sse_s3_wide_window() {
    a_cold_sequential_read_downloads_each_byte_once(KeyMode::SseS3, &["read_ahead_kib=32768"]);
}
