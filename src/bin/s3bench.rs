//! s3bench: the raw-client ceiling for `scripts/bench`.
//!
//! Every s3crypt figure in `docs/BENCHMARKS.md` is compared with what a plain aws-sdk-s3 client reaches against
//! the same server in the same run. This binary measures that client: single-stream and parallel ranged GET,
//! single and multipart PUT, and small-object PUT/HEAD rates. It also does the set-up chores the benchmark script
//! needs without an AWS CLI on the machine (create a bucket, create a KMS key, sum the bytes under a prefix).
//!
//! Two more time a mounted file system the way the raw client is timed, inside the process: `file-write` (open,
//! 1 MiB writes, fsync, close) and `file-read` (open, 1 MiB reads to the end, close), so that a benchmark tool's
//! own start-up and exit (about a quarter of a second for fio here) is not counted against the mount.
//!
//! Each measuring subcommand prints one JSON object on stdout, e.g.
//! `{"op":"get_ranged","bytes":268435456,"seconds":0.71,"mb_per_s":378.1,"requests":32}`; MB is 10^6 bytes.
//! The endpoint, region and credentials come from the usual AWS environment variables (`AWS_ENDPOINT_URL`,
//! `AWS_REGION`, ...); addressing is path-style because a loopback endpoint is an IP address.
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures::stream::{self, StreamExt, TryStreamExt};
use rand::RngCore;

const MIB: u64 = 1024 * 1024;

#[derive(Parser)]
#[command(about = "Raw aws-sdk-s3 throughput ceiling and set-up helpers for scripts/bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a bucket (succeeds if it already exists and is ours).
    CreateBucket { bucket: String },
    /// Create a symmetric KMS key and print its ARN.
    KmsCreateKey,
    /// Write SIZE_MIB to PATH (created or truncated) in BS_KIB writes of one random buffer, fsync and close it;
    /// timed from open to the end of close.
    FileWrite {
        path: std::path::PathBuf,
        #[arg(long)]
        size_mib: u64,
        #[arg(long, default_value_t = 1024)]
        bs_kib: usize,
    },
    /// Read PATH to its end in BS_KIB reads and close it; timed from open to the end of close.
    FileRead {
        path: std::path::PathBuf,
        #[arg(long, default_value_t = 1024)]
        bs_kib: usize,
    },
    /// Upload SIZE_MIB of random bytes with one PutObject.
    Put {
        bucket: String,
        key: String,
        #[arg(long)]
        size_mib: u64,
    },
    /// Upload SIZE_MIB of random bytes as a multipart upload.
    PutMultipart {
        bucket: String,
        key: String,
        #[arg(long)]
        size_mib: u64,
        #[arg(long, default_value_t = 16)]
        part_mib: u64,
        #[arg(long, default_value_t = 4)]
        in_flight: usize,
    },
    /// Download an object with one GetObject, streaming the body.
    Get { bucket: String, key: String },
    /// Download an object as ranged GETs of RANGE_MIB, IN_FLIGHT at a time.
    GetRanged {
        bucket: String,
        key: String,
        #[arg(long, default_value_t = 8)]
        range_mib: u64,
        #[arg(long, default_value_t = 8)]
        in_flight: usize,
    },
    /// PUT COUNT small objects of SIZE bytes under PREFIX, IN_FLIGHT at a time.
    SmallPut {
        bucket: String,
        prefix: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 4096)]
        size: usize,
        #[arg(long, default_value_t = 16)]
        in_flight: usize,
    },
    /// HEAD the COUNT objects written by small-put, IN_FLIGHT at a time.
    SmallHead {
        bucket: String,
        prefix: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value_t = 16)]
        in_flight: usize,
    },
    /// Print the number of objects and their total size under PREFIX as JSON.
    Du {
        bucket: String,
        #[arg(default_value = "")]
        prefix: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // The file timings touch no S3 client.
    match cli.cmd {
        Cmd::FileWrite { path, size_mib, bs_kib } => return file_write(&path, size_mib, bs_kib),
        Cmd::FileRead { path, bs_kib } => return file_read(&path, bs_kib),
        _ => {}
    }
    let shared = aws_config::load_from_env().await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .build(),
    );
    match cli.cmd {
        Cmd::CreateBucket { bucket } => create_bucket(&s3, &bucket).await,
        Cmd::KmsCreateKey => kms_create_key(&shared).await,
        Cmd::Put { bucket, key, size_mib } => put(&s3, &bucket, &key, size_mib).await,
        Cmd::PutMultipart {
            bucket,
            key,
            size_mib,
            part_mib,
            in_flight,
        } => put_multipart(&s3, &bucket, &key, size_mib, part_mib, in_flight).await,
        Cmd::Get { bucket, key } => get(&s3, &bucket, &key).await,
        Cmd::GetRanged {
            bucket,
            key,
            range_mib,
            in_flight,
        } => get_ranged(&s3, &bucket, &key, range_mib, in_flight).await,
        Cmd::SmallPut {
            bucket,
            prefix,
            count,
            size,
            in_flight,
        } => small_put(&s3, &bucket, &prefix, count, size, in_flight).await,
        Cmd::SmallHead {
            bucket,
            prefix,
            count,
            in_flight,
        } => small_head(&s3, &bucket, &prefix, count, in_flight).await,
        Cmd::Du { bucket, prefix } => du(&s3, &bucket, &prefix).await,
        Cmd::FileWrite { .. } | Cmd::FileRead { .. } => unreachable!("handled above"),
    }
}

/// close(2) with its result: a file system reports a failed save at close, which dropping a `File` ignores.
fn close_checked(f: std::fs::File, path: &std::path::Path) -> Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: `fd` is the descriptor `f` owned, closed exactly once here.
    if unsafe { libc::close(fd) } != 0 {
        bail!("close {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

fn file_write(path: &std::path::Path, size_mib: u64, bs_kib: usize) -> Result<()> {
    use std::io::Write;
    if size_mib == 0 || bs_kib == 0 {
        bail!("size and write size must be positive");
    }
    let buf = random_bytes(bs_kib * 1024);
    let total = size_mib * MIB;
    let start = Instant::now();
    let mut f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])
            .with_context(|| format!("write {}", path.display()))?;
        done += n as u64;
    }
    f.sync_all().with_context(|| format!("fsync {}", path.display()))?;
    close_checked(f, path)?;
    report("file_write", total, start.elapsed().as_secs_f64(), 0);
    Ok(())
}

fn file_read(path: &std::path::Path, bs_kib: usize) -> Result<()> {
    use std::io::Read;
    if bs_kib == 0 {
        bail!("read size must be positive");
    }
    let mut buf = vec![0u8; bs_kib * 1024];
    let start = Instant::now();
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    close_checked(f, path)?;
    report("file_read", total, start.elapsed().as_secs_f64(), 0);
    Ok(())
}

/// Prints one throughput record; `bytes` over `seconds` in MB/s (10^6).
fn report(op: &str, bytes: u64, seconds: f64, requests: usize) {
    println!(
        "{{\"op\":\"{op}\",\"bytes\":{bytes},\"seconds\":{seconds:.6},\"mb_per_s\":{:.3},\"requests\":{requests}}}",
        bytes as f64 / seconds / 1e6
    );
}

/// Prints one rate record for small-object operations.
fn report_ops(op: &str, count: usize, seconds: f64) {
    println!(
        "{{\"op\":\"{op}\",\"count\":{count},\"seconds\":{seconds:.6},\"ops_per_s\":{:.3}}}",
        count as f64 / seconds
    );
}

fn random_bytes(len: usize) -> Bytes {
    let mut buf = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut buf);
    Bytes::from(buf)
}

async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str) -> Result<()> {
    match s3.create_bucket().bucket(bucket).send().await {
        Ok(_) => Ok(()),
        Err(e) => {
            let service = e.as_service_error();
            if service.is_some_and(|s| s.is_bucket_already_owned_by_you()) {
                Ok(())
            } else {
                Err(e).with_context(|| format!("creating bucket {bucket}"))
            }
        }
    }
}

async fn kms_create_key(shared: &aws_config::SdkConfig) -> Result<()> {
    let kms = aws_sdk_kms::Client::new(shared);
    let out = kms
        .create_key()
        .description("s3crypt benchmark key")
        .send()
        .await
        .context("creating a KMS key")?;
    let arn = out
        .key_metadata()
        .and_then(|m| m.arn())
        .context("CreateKey returned no ARN")?;
    println!("{arn}");
    Ok(())
}

async fn put(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, size_mib: u64) -> Result<()> {
    let body = random_bytes((size_mib * MIB) as usize);
    let len = body.len() as u64;
    let start = Instant::now();
    s3.put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .with_context(|| format!("PUT {bucket}/{key}"))?;
    report("put", len, start.elapsed().as_secs_f64(), 1);
    Ok(())
}

async fn put_multipart(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    size_mib: u64,
    part_mib: u64,
    in_flight: usize,
) -> Result<()> {
    if part_mib == 0 || size_mib == 0 {
        bail!("size and part size must be positive");
    }
    let data = random_bytes((size_mib * MIB) as usize);
    let part_len = (part_mib * MIB) as usize;
    let start = Instant::now();
    let upload = s3.create_multipart_upload().bucket(bucket).key(key).send().await?;
    let upload_id = upload.upload_id().context("no upload id")?.to_string();
    let chunks: Vec<(i32, Bytes)> = (0..data.len())
        .step_by(part_len)
        .enumerate()
        .map(|(i, off)| (i as i32 + 1, data.slice(off..(off + part_len).min(data.len()))))
        .collect();
    let n_parts = chunks.len();
    let upload_id = Arc::new(upload_id);
    let mut parts: Vec<CompletedPart> = stream::iter(chunks)
        .map(|(number, chunk)| {
            let upload_id = Arc::clone(&upload_id);
            async move {
                let out = s3
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(upload_id.as_str())
                    .part_number(number)
                    .body(ByteStream::from(chunk))
                    .send()
                    .await?;
                Ok::<_, anyhow::Error>(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .build(),
                )
            }
        })
        .buffer_unordered(in_flight.max(1))
        .try_collect()
        .await?;
    parts.sort_by_key(|p| p.part_number());
    s3.complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id.as_str())
        .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
        .send()
        .await?;
    report(
        "put_multipart",
        data.len() as u64,
        start.elapsed().as_secs_f64(),
        n_parts + 2,
    );
    Ok(())
}

async fn get(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Result<()> {
    let start = Instant::now();
    let out = s3.get_object().bucket(bucket).key(key).send().await?;
    let mut body = out.body;
    let mut total = 0u64;
    while let Some(chunk) = body.try_next().await? {
        total += chunk.len() as u64;
    }
    report("get", total, start.elapsed().as_secs_f64(), 1);
    Ok(())
}

async fn get_ranged(s3: &aws_sdk_s3::Client, bucket: &str, key: &str, range_mib: u64, in_flight: usize) -> Result<()> {
    let start = Instant::now();
    let head = s3.head_object().bucket(bucket).key(key).send().await?;
    let size = head.content_length().unwrap_or(0).max(0) as u64;
    let range = (range_mib.max(1) * MIB) as usize;
    let offsets: Vec<u64> = (0..size).step_by(range).collect();
    let n = offsets.len();
    let total: u64 = stream::iter(offsets)
        .map(|off| async move {
            let end = (off + range as u64).min(size) - 1;
            let out = s3
                .get_object()
                .bucket(bucket)
                .key(key)
                .range(format!("bytes={off}-{end}"))
                .send()
                .await?;
            let mut body = out.body;
            let mut got = 0u64;
            while let Some(chunk) = body.try_next().await? {
                got += chunk.len() as u64;
            }
            Ok::<_, anyhow::Error>(got)
        })
        .buffer_unordered(in_flight.max(1))
        .try_fold(0u64, |acc, got| async move { Ok(acc + got) })
        .await?;
    if total != size {
        bail!("ranged GET read {total} bytes of {size}");
    }
    report("get_ranged", total, start.elapsed().as_secs_f64(), n + 1);
    Ok(())
}

async fn small_put(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    count: usize,
    size: usize,
    in_flight: usize,
) -> Result<()> {
    let body = random_bytes(size);
    let start = Instant::now();
    stream::iter(0..count)
        .map(|i| {
            let body = body.clone();
            async move {
                s3.put_object()
                    .bucket(bucket)
                    .key(format!("{prefix}{i:06}"))
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(in_flight.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    report_ops("small_put", count, start.elapsed().as_secs_f64());
    Ok(())
}

async fn small_head(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str, count: usize, in_flight: usize) -> Result<()> {
    let start = Instant::now();
    stream::iter(0..count)
        .map(|i| async move {
            s3.head_object()
                .bucket(bucket)
                .key(format!("{prefix}{i:06}"))
                .send()
                .await
                .map(|_| ())
        })
        .buffer_unordered(in_flight.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    report_ops("small_head", count, start.elapsed().as_secs_f64());
    Ok(())
}

async fn du(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Result<()> {
    let mut pages = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .into_paginator()
        .send();
    let (mut objects, mut bytes) = (0u64, 0u64);
    while let Some(page) = pages.next().await {
        for obj in page?.contents() {
            objects += 1;
            bytes += obj.size().unwrap_or(0).max(0) as u64;
        }
    }
    println!("{{\"objects\":{objects},\"bytes\":{bytes}}}");
    Ok(())
}
