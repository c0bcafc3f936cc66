//! A differential random-operation test: the same seeded sequence of write / truncate / read / close / reopen /
//! rename runs on the mount and on a local directory, comparing size and content after every step. Run in all
//! five key modes; `S3CRYPT_DIFF_OPS` sets the number of operations (default 2,000).
mod common;

use common::mount::{close_checked, TestMount, Volume};
use rand::{Rng, SeedableRng};
use s3crypt::keys::KeyMode;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

struct Pair {
    mnt: File,
    local: File,
}

struct World {
    mnt: PathBuf,
    local: PathBuf,
    open: HashMap<&'static str, Pair>,
    block: u64,
}

impl World {
    fn open(&mut self, name: &'static str) {
        if self.open.contains_key(name) {
            return;
        }
        let o = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
        };
        let mnt = o(&self.mnt.join(name)).unwrap_or_else(|e| panic!("open {name} on the mount: {e}"));
        let local = o(&self.local.join(name)).unwrap();
        self.open.insert(name, Pair { mnt, local });
    }

    fn close(&mut self, name: &str) {
        if let Some(p) = self.open.remove(name) {
            close_checked(p.mnt).unwrap_or_else(|e| panic!("close {name} on the mount: {e}"));
        }
    }

    fn compare(&self, name: &str, step: usize, op: &str) {
        let local = fs::read(self.local.join(name)).ok();
        let mnt = match &self.open.get(name) {
            Some(p) => {
                let len = p.mnt.metadata().unwrap().len();
                let mut buf = vec![0u8; len as usize];
                let n = p.mnt.read_at(&mut buf, 0).unwrap();
                buf.truncate(n);
                Some(buf)
            }
            None => fs::read(self.mnt.join(name)).ok(),
        };
        match (&local, &mnt) {
            (Some(l), Some(m)) => {
                assert_eq!(l.len(), m.len(), "step {step} ({op}): size of {name}");
                assert!(l == m, "step {step} ({op}): content of {name}");
            }
            (None, None) => {}
            _ => panic!(
                "step {step} ({op}): {name} exists locally: {}, on the mount: {}",
                local.is_some(),
                mnt.is_some()
            ),
        }
    }
}

fn differential(mode: KeyMode) {
    let ops: usize = std::env::var("S3CRYPT_DIFF_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let vol = Volume::new(mode);
    let m = TestMount::mount(&vol);
    let local = tempfile::tempdir().unwrap();
    let mut w = World {
        mnt: m.mnt.path().to_path_buf(),
        local: local.path().to_path_buf(),
        open: HashMap::new(),
        block: m.block_size,
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed ^ mode as u64);
    let max_size = 4 * w.block;
    for step in 0..ops {
        let name = NAMES[rng.gen_range(0..NAMES.len())];
        let op = match rng.gen_range(0..100) {
            0..=39 => {
                w.open(name);
                let at = rng.gen_range(0..max_size);
                let len = rng.gen_range(1..(w.block as usize * 3 / 2));
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                let p = &w.open[name];
                p.mnt.write_all_at(&data, at).unwrap();
                p.local.write_all_at(&data, at).unwrap();
                "write"
            }
            40..=54 => {
                w.open(name);
                let size = rng.gen_range(0..max_size + w.block);
                let p = &w.open[name];
                p.mnt.set_len(size).unwrap();
                p.local.set_len(size).unwrap();
                "truncate"
            }
            55..=69 => {
                if let Some(p) = w.open.get(name) {
                    let at = rng.gen_range(0..max_size);
                    let len = rng.gen_range(1..2 * w.block as usize);
                    let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                    let na = p.mnt.read_at(&mut a, at).unwrap();
                    let nb = p.local.read_at(&mut b, at).unwrap();
                    assert_eq!(&a[..na], &b[..nb], "step {step}: read of {name} at {at}");
                }
                "read"
            }
            70..=79 => {
                w.close(name);
                "close"
            }
            80..=89 => {
                w.close(name);
                w.open(name);
                "reopen"
            }
            _ => {
                let to = NAMES[rng.gen_range(0..NAMES.len())];
                if to != name && w.local.join(name).exists() {
                    // The renamed file's handle stays open across the rename, as POSIX allows.
                    w.close(to);
                    fs::rename(w.local.join(name), w.local.join(to)).unwrap();
                    fs::rename(w.mnt.join(name), w.mnt.join(to))
                        .unwrap_or_else(|e| panic!("step {step}: rename {name} {to}: {e}"));
                    if let Some(p) = w.open.remove(name) {
                        w.open.insert(to, p);
                    }
                    w.compare(to, step, "rename");
                }
                "rename"
            }
        };
        w.compare(name, step, op);
        if step % 250 == 249 {
            for n in NAMES {
                w.compare(n, step, "sweep");
            }
        }
    }
    for n in NAMES {
        w.close(n);
    }
    m.unmount();
    let m = TestMount::mount(&vol);
    w.mnt = m.mnt.path().to_path_buf();
    for n in NAMES {
        w.compare(n, ops, "after remount");
    }
}

#[test]
fn differential_sse_s3() {
    differential(KeyMode::SseS3)
}
#[test]
fn differential_sse_kms() {
    differential(KeyMode::SseKms)
}
#[test]
fn differential_sse_c() {
    differential(KeyMode::SseC)
}
#[test]
fn differential_cse_kms() {
    differential(KeyMode::CseKms)
}
#[test]
fn differential_cse_local() {
    differential(KeyMode::CseLocal)
}
