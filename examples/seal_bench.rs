//! Seal and open throughput of the block format on one core.
//!
//! For each block size (4 KiB, the default 64 KiB, 1 MiB) seals a fixed amount of data block by block into one
//! reused buffer (`seal`), opens as much again block by block into a reused buffer (`open`), and opens it in runs of
//! 16 blocks with `decrypt_blocks`, which allocates its output (`decrypt_blocks`). Reports the best of several runs
//! as one JSON object per line:
//! `{"bench":"seal","block_size":65536,"bytes":268435456,"seconds":0.08,"gb_per_s":3.2}` (GB = 10^9 bytes of
//! plaintext). Run with `cargo run --release --example seal_bench`; `S3CRYPT_BENCH_MIB` changes the data per run
//! (default 256 MiB).
use rand::SeedableRng;
use s3crypt::format::{block_count, decrypt_blocks, encrypt_object, BlockCipher, BlockSize, DataKey, BLOCK_OVERHEAD};
use std::hint::black_box;
use std::time::{Duration, Instant};

const RUNS: usize = 5;

fn main() {
    let mib: u64 = std::env::var("S3CRYPT_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let total = mib * 1024 * 1024;
    let cipher = BlockCipher::new(&DataKey::from_bytes([0x5a; 32]), [0x17; 16]);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    for bs in [4096u32, 65536, 1 << 20].map(|b| BlockSize::new(b).expect("legal block size")) {
        let b = bs.get() as usize;
        let plain = vec![0xA5u8; b];
        let blocks = block_count(total, bs);
        let mut sealed = Vec::with_capacity(b + BLOCK_OVERHEAD as usize);
        let seal = best_of(|| {
            for index in 0..blocks {
                sealed.clear();
                cipher.seal_into(index, false, &plain, &mut rng, &mut sealed);
                black_box(&sealed);
            }
        });
        report("seal", bs, total, seal);
        // One block, opened again and again into a reused buffer (as the read path does per block).
        let sealed = cipher.seal(0, false, &plain, &mut rng);

        let open = best_of(|| {
            let mut out = Vec::with_capacity(b);
            for _ in 0..blocks {
                out.clear();
                cipher.open_into(0, false, &sealed, &mut out).expect("own block opens");
                black_box(&out);
            }
        });
        report("open", bs, total, open);

        // The read path's helper: 16 blocks as one ranged GET would fetch them, into a fresh buffer each time.
        let run_blocks = 16u64;
        let object = encrypt_object(&cipher, &vec![0xA5u8; b * run_blocks as usize], bs, &mut rng);
        let plain_size = bs.get() * run_blocks;
        let runs = blocks.div_ceil(run_blocks);
        let decrypt = best_of(|| {
            for _ in 0..runs {
                let out = decrypt_blocks(&cipher, bs, plain_size, 0, &object).expect("own object opens");
                black_box(&out);
            }
        });
        report("decrypt_blocks", bs, runs * plain_size, decrypt);
    }
}

fn best_of(mut f: impl FnMut()) -> Duration {
    (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .expect("at least one run")
}

fn report(bench: &str, bs: BlockSize, bytes: u64, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    println!(
        "{{\"bench\":\"{bench}\",\"block_size\":{},\"bytes\":{bytes},\"seconds\":{seconds:.6},\"gb_per_s\":{:.3}}}",
        bs.get(),
        bytes as f64 / seconds / 1e9
    );
}
