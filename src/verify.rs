//! `s3crypt verify s3://BUCKET[/PREFIX] -o <key options>`: checks every object of a volume without a mount.
//!
//! In the client-side modes each object's header is checked against the volume (mode, a legal block size), its
//! data key is unwrapped (which checks the key's binding to the file id), its size must be one the block format
//! can produce, and every block is read (ranged GETs of whole blocks, several objects in parallel) and
//! authenticated in its place; sealed extended attributes must authenticate too. Plaintext is dropped as soon as
//! it is checked: it is never written anywhere. In the SSE modes each object must carry the server-side
//! encryption the options ask for (and, for SSE-C, be readable with the configured key).
//!
//! Nothing is written: a missing volume descriptor is an error, not created. Each bad object is reported on
//! standard output as `BAD s3://BUCKET/KEY: reason`; the exit status is 0 when every object is good, 1 when one
//! is not, 2 when the check could not run (no such bucket, wrong key: the message says which). Progress goes to
//! standard error: a status line on a terminal, a plain line every few seconds otherwise. Ctrl-C stops the check
//! and prints what was checked so far (exit 130).
use crate::cli::MountOptions;
use crate::format::{self, BlockCipher, ObjectHeader};
use crate::fs::CseKeys;
use crate::keys::{self, KeyMode};
use crate::store::{ByteRange, ObjectInfo, ObjectStore, StoreError};
use anyhow::{Context, Result};
use futures::stream::{self, StreamExt};

/// Objects checked at once.
const PARALLEL_OBJECTS: usize = 8;
/// Bytes of one ranged GET (whole blocks are fetched, so a GET is at most this plus one block).
const RANGE_BYTES: u64 = 8 * 1024 * 1024;

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub objects: u64,
    pub bytes: u64,
    pub bad: Vec<(String, String)>,
    pub interrupted: bool,
}

impl Report {
    pub fn to_json(&self, bucket: &str, prefix: &str) -> String {
        let bad: Vec<String> = self
            .bad
            .iter()
            .map(|(k, why)| format!("{{\"key\":{},\"reason\":{}}}", json_str(k), json_str(why)))
            .collect();
        format!(
            "{{\"bucket\":{},\"prefix\":{},\"objects\":{},\"bytes\":{},\"good\":{},\"bad\":[{}],\"interrupted\":{}}}",
            json_str(bucket),
            json_str(prefix),
            self.objects,
            self.bytes,
            self.objects - self.bad.len() as u64,
            bad.join(","),
            self.interrupted
        )
    }
}

/// `s` as a JSON string literal.
pub(crate) fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The exit status for a report.
pub fn exit_code(r: &Report) -> u8 {
    match (r.interrupted, r.bad.is_empty()) {
        (true, _) => 130,
        (false, true) => 0,
        (false, false) => 1,
    }
}

/// How one object is checked.
enum Check {
    Client { keys: CseKeys, mode: KeyMode },
    Server { mode: KeyMode, kms_key_id: Option<String> },
}

/// Runs the check; `Err` only when it could not run at all.
pub fn run(source: &str, opts: MountOptions) -> Result<Report> {
    let (bucket, prefix) = crate::cli::parse_volume_url(source)?;
    let rt = crate::run::runtime()?;
    rt.block_on(verify(&bucket, &prefix, &opts))
}

async fn verify(bucket: &str, prefix: &str, opts: &MountOptions) -> Result<Report> {
    let metrics = crate::metrics::Metrics::new(bucket, prefix);
    let (sdk, keys) = crate::run::load_keys(opts).await?;
    let stack = crate::run::make_store(opts, &sdk, bucket, &keys, &metrics);
    let store = stack.store;
    crate::run::check_bucket(store.as_ref(), bucket, prefix).await?;
    let check = match &keys.provider {
        Some(provider) => {
            let vol = keys::open_existing_volume(store.as_ref(), prefix, provider.as_ref())
                .await
                .with_context(|| format!("opening the volume s3://{bucket}/{prefix}"))?;
            Check::Client {
                keys: CseKeys {
                    provider: provider.clone(),
                    cache: keys.cache.clone(),
                },
                mode: vol.mode,
            }
        }
        None => Check::Server {
            mode: opts.key_mode,
            kms_key_id: opts.kms_key_id.clone(),
        },
    };
    let objects = list_volume(store.as_ref(), prefix).await?;
    let progress = crate::progress::Progress::new("verify", &objects);
    let reporter = progress.start();
    let stop = tokio::signal::ctrl_c();
    let check = &check;
    let store = &store;
    let progress_ref = &progress;
    let work = stream::iter(objects)
        .map(|(key, size)| async move {
            let verdict = check_object(store.as_ref(), check, &key, size).await;
            progress_ref.done(size);
            (key, size, verdict)
        })
        .buffer_unordered(PARALLEL_OBJECTS);
    let mut report = Report::default();
    tokio::pin!(work);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            next = work.next() => {
                let Some((key, size, verdict)) = next else { break };
                report.objects += 1;
                report.bytes += size;
                if let Err(why) = verdict {
                    println!("BAD s3://{bucket}/{key}: {why}");
                    log::debug!("{key}: {why}");
                    report.bad.push((key, why));
                }
            }
            _ = &mut stop => {
                report.interrupted = true;
                break;
            }
        }
    }
    drop(reporter);
    report.bad.sort();
    Ok(report)
}

/// Every object under `prefix` but the volume descriptor and the directory indexes (a cache the mounts rebuild;
/// see [`delete_indexes`]), with its size.
pub(crate) async fn list_volume(store: &dyn ObjectStore, prefix: &str) -> Result<Vec<(String, u64)>> {
    let descriptor = keys::volume_key(prefix);
    let indexes = crate::fs::index_prefix(prefix);
    let mut all = list_all(store, prefix).await?;
    all.retain(|(key, _)| *key != descriptor && !key.starts_with(&indexes));
    Ok(all)
}

/// Every object under `prefix`, with its size.
async fn list_all(store: &dyn ObjectStore, prefix: &str) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = store
            .list(prefix, None, token.as_deref(), None)
            .await
            .with_context(|| format!("listing {prefix}"))?;
        out.extend(page.objects.into_iter().map(|o| (o.key, o.size)));
        token = page.next_token;
        if token.is_none() {
            return Ok(out);
        }
    }
}

/// `Ok` for a good object, else the reason it is bad.
async fn check_object(store: &dyn ObjectStore, check: &Check, key: &str, size: u64) -> Result<(), String> {
    let info = match store.head(key).await {
        Ok(info) => info,
        Err(StoreError::NotFound(_)) => return Ok(()), // removed since the listing
        Err(e) => return Err(format!("cannot be read: {e}")),
    };
    if key.ends_with('/') {
        // A directory marker: no content.
        return if info.size == 0 {
            Ok(())
        } else {
            Err(format!("directory marker of {} bytes", info.size))
        };
    }
    match check {
        Check::Server { mode, kms_key_id } => check_server_side(&info, *mode, kms_key_id.as_deref()),
        Check::Client { keys, mode } => check_client_side(store, keys, *mode, &info, size).await,
    }
}

fn check_server_side(info: &ObjectInfo, mode: KeyMode, kms_key_id: Option<&str>) -> Result<(), String> {
    let alg = info.sse_algorithm.as_deref().unwrap_or("none");
    match mode {
        KeyMode::SseS3 if alg == "AES256" => Ok(()),
        KeyMode::SseS3 => Err(format!("server-side encryption is {alg}, not AES256 (sse-s3)")),
        KeyMode::SseKms if alg != "aws:kms" => Err(format!("server-side encryption is {alg}, not aws:kms (sse-kms)")),
        KeyMode::SseKms => match (kms_key_id, info.sse_kms_key_id.as_deref()) {
            (Some(want), Some(got)) if !same_kms_key(want, got) => {
                Err(format!("encrypted under KMS key {got}, not {want}"))
            }
            _ => Ok(()),
        },
        // The HEAD carried the configured key: S3 answered, so the object is under that key.
        KeyMode::SseC if info.sse_customer_algorithm.as_deref() == Some("AES256") => Ok(()),
        KeyMode::SseC => Err("not encrypted with a customer key (sse-c)".into()),
        KeyMode::CseKms | KeyMode::CseLocal => Err("client-side mode checked as server-side".into()),
    }
}

/// A key id, alias or ARN as configured against the ARN S3 reports.
pub(crate) fn same_kms_key(want: &str, got: &str) -> bool {
    got == want || got.ends_with(&format!("/{want}")) || got.ends_with(&format!(":{want}"))
}

async fn check_client_side(
    store: &dyn ObjectStore,
    keys: &CseKeys,
    mode: KeyMode,
    info: &ObjectInfo,
    listed_size: u64,
) -> Result<(), String> {
    let header = match ObjectHeader::from_metadata(&info.metadata) {
        Ok(Some(h)) => h,
        Ok(None) => return Err("no s3crypt metadata: a plaintext object in a client-side volume".into()),
        Err(e) => return Err(format!("s3crypt metadata: {e}")),
    };
    if header.key_mode != mode.as_str() {
        return Err(format!(
            "written in mode {}, but the volume is {}",
            header.key_mode,
            mode.as_str()
        ));
    }
    let cipher = keys
        .open_file(&header)
        .await
        .map_err(|e| format!("its data key does not open (another key, or a wrong file id): {e}"))?;
    let bs = header.block_size;
    let plain = format::plaintext_size(info.size, bs).map_err(|e| e.to_string())?;
    if info.size != listed_size {
        log::debug!("{}: size changed since the listing", info.key);
    }
    if let Some(sealed) = info.metadata.get(crate::fs::META_XATTR_SEALED) {
        let raw = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, sealed)
            .map_err(|_| "extended attributes: not base64".to_string())?;
        cipher.open_xattrs(&raw).map_err(|e| e.to_string())?;
    }
    check_blocks(store, &cipher, bs, info, plain).await
}

/// Reads the object in ranges of whole blocks and authenticates every block in its place.
async fn check_blocks(
    store: &dyn ObjectStore,
    cipher: &BlockCipher,
    bs: format::BlockSize,
    info: &ObjectInfo,
    plain: u64,
) -> Result<(), String> {
    let blocks = format::block_count(plain, bs);
    let per_get = (RANGE_BYTES / bs.get()).max(1);
    let mut first = 0;
    while first < blocks {
        let last = (first + per_get).min(blocks);
        let range = format::cipher_range_for_blocks(first..last, plain, bs);
        let out = store
            .get(
                &info.key,
                Some(ByteRange::Range {
                    start: range.start,
                    end: range.end,
                }),
                Some(&info.etag),
            )
            .await
            .map_err(|e| format!("reading blocks {first}..{last}: {e}"))?;
        let sealed = out.data;
        let opened = tokio::task::block_in_place(|| format::decrypt_blocks(cipher, bs, plain, first, &sealed));
        match opened {
            Ok(mut p) => zeroize::Zeroize::zeroize(&mut p),
            Err(format::FormatError::Auth { block }) => {
                log::error!("{}: block {block} failed authentication", info.key);
                return Err(format!(
                    "block {block} fails authentication (modified, moved, dropped or cut)"
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
        first = last;
    }
    Ok(())
}

/// Deletes the volume's directory indexes (after a rekey: they hold copies of object metadata, wrapped data keys
/// included, from before it). Returns how many there were.
pub(crate) async fn delete_indexes(store: &dyn ObjectStore, prefix: &str) -> Result<usize> {
    let indexes = crate::fs::index_prefix(prefix);
    let keys: Vec<String> = list_all(store, &indexes).await?.into_iter().map(|(k, _)| k).collect();
    for chunk in keys.chunks(1000) {
        store
            .delete_many(chunk)
            .await
            .with_context(|| format!("deleting the directory indexes under {indexes}"))?;
    }
    Ok(keys.len())
}
