//! `s3crypt rekey s3://BUCKET[/PREFIX] -o <old key options> --to <new key options>`: key rotation without moving data,
//! in every mode.
//!
//! The envelope design exists for this: each file's data key is small and wrapped on its own. For every object
//! the wrapped key is moved to the new key (cse-local: unwrapped with the old master key, wrapped with the new
//! one; cse-kms: KMS `ReEncrypt`, so the plaintext key never leaves KMS), still bound to the file id, and the
//! object is rewritten by a metadata-only CopyObject onto itself, conditional on the ETag it was read at: no
//! data is downloaded or uploaded, and a file changed meanwhile is read again rather than overwritten. The
//! volume descriptor is re-sealed last, and only when every object is done.
//!
//! Resumable and idempotent: an object whose key already opens with the new key is skipped, so a rerun after an
//! interruption (Ctrl-C, kill -9, an outage) finishes the job. Each object is switched by one atomic copy, so
//! at every moment it is readable under the old or the new key, never neither; a mount with the new key as
//! `master_key_file=` and the old one as `old_master_key_file=` reads both meanwhile.
//!
//! In the SSE modes S3 holds the key, and a rotation is S3's own: each object is copied onto itself with the new
//! server-side settings (another SSE-C key, another KMS key, or between SSE-S3 and SSE-KMS), the source read
//! with the old SSE-C key where there is one. S3 re-encrypts the data inside the service; nothing crosses the
//! network. An object whose HEAD already shows the new settings (for SSE-C: that the new key opens it) is skipped.
//!
//! Each copy carries `s3crypt-rekeyed-from: <the ETag it was copied from>` ([`keys::META_REKEYED_FROM`]): a
//! mount that opened the file before the copy and writes it afterwards sees its conditional write fail, finds
//! that mark naming its base, and writes over the rekeyed object (under the current key) instead of treating
//! the rotation as someone else's change.
use crate::cli::MountOptions;
use crate::format::ObjectHeader;
use crate::keys::{self, DataKeyProvider};
use crate::store::retry::{RetryPolicy, Retrying};
use crate::store::s3::S3Store;
use crate::store::{ObjectInfo, ObjectStore, PutCondition, Sse, StoreError, COPY_MAX};
use anyhow::{bail, Context, Result};
use base64::Engine;
use futures::stream::{self, StreamExt};

/// Objects rekeyed at once.
const PARALLEL_OBJECTS: usize = 16;

/// What a run did.
#[derive(Debug, Default)]
pub struct RekeyReport {
    pub objects: u64,
    /// Objects moved to the new key (or, with --dry-run, that would be).
    pub rekeyed: u64,
    /// Objects already under the new key.
    pub already: u64,
    /// Bytes of object bodies copied inside S3 (none travel over the network).
    pub bytes_copied: u64,
    pub kms_calls: u64,
    pub failed: Vec<(String, String)>,
    pub descriptor_resealed: bool,
    pub dry_run: bool,
    pub interrupted: bool,
}

impl RekeyReport {
    pub fn to_json(&self) -> String {
        let failed: Vec<String> = self
            .failed
            .iter()
            .map(|(k, why)| {
                format!(
                    "{{\"key\":{},\"reason\":{}}}",
                    crate::verify::json_str(k),
                    crate::verify::json_str(why)
                )
            })
            .collect();
        format!(
            "{{\"objects\":{},\"rekeyed\":{},\"already\":{},\"bytes_copied\":{},\"kms_calls\":{},\"failed\":[{}],\
             \"descriptor_resealed\":{},\"dry_run\":{},\"interrupted\":{}}}",
            self.objects,
            self.rekeyed,
            self.already,
            self.bytes_copied,
            self.kms_calls,
            failed.join(","),
            self.descriptor_resealed,
            self.dry_run,
            self.interrupted
        )
    }

    fn count(&mut self, bucket: &str, key: String, outcome: Outcome) {
        match outcome {
            Outcome::Rekeyed(bytes) => {
                self.objects += 1;
                self.rekeyed += 1;
                self.bytes_copied += bytes;
            }
            Outcome::Already => {
                self.objects += 1;
                self.already += 1;
            }
            Outcome::NotAFile => {}
            Outcome::Failed(why) => {
                self.objects += 1;
                println!("FAILED s3://{bucket}/{key}: {why}");
                self.failed.push((key, why));
            }
        }
    }

    /// 0 done, 1 an object failed, 130 interrupted.
    pub fn exit_code(&self) -> u8 {
        match (self.interrupted, self.failed.is_empty()) {
            (true, _) => 130,
            (false, true) => 0,
            (false, false) => 1,
        }
    }
}

enum Outcome {
    Rekeyed(u64),
    Already,
    NotAFile,
    Failed(String),
}

/// Runs the rotation; `Err` only when it could not start.
pub fn run(source: &str, old: MountOptions, new: MountOptions, dry_run: bool) -> Result<RekeyReport> {
    let (bucket, prefix) = crate::cli::parse_volume_url(source)?;
    let (a, b) = (old.key_mode, new.key_mode);
    if a.is_client_side() != b.is_client_side() || (a.is_client_side() && a != b) {
        bail!(
            "rekey moves a client-side volume to a new key of the same mode (cse-local or cse-kms), or an SSE \
             volume to other server-side settings; it cannot change key_mode={a} into key_mode={b} (copy the \
             files through two mounts instead)"
        );
    }
    let rt = crate::run::runtime()?;
    if a.is_client_side() {
        rt.block_on(rekey(&bucket, &prefix, &old, &new, dry_run))
    } else {
        rt.block_on(rekey_sse(&bucket, &prefix, &old, &new, dry_run))
    }
}

async fn rekey(
    bucket: &str,
    prefix: &str,
    old: &MountOptions,
    new: &MountOptions,
    dry_run: bool,
) -> Result<RekeyReport> {
    let metrics = crate::metrics::Metrics::new(bucket, prefix);
    let (sdk, old_keys) = crate::run::load_keys(old).await?;
    let (_, new_keys) = crate::run::load_keys(new).await?;
    let (Some(from), Some(to)) = (old_keys.provider.clone(), new_keys.provider.clone()) else {
        bail!("rekey needs the key options of a client-side mode on both sides");
    };
    let store = crate::run::make_store(old, &sdk, bucket, &old_keys, &metrics).store;
    crate::run::check_bucket(store.as_ref(), bucket, prefix).await?;
    let vol = match keys::open_existing_volume(store.as_ref(), prefix, from.as_ref()).await {
        Ok(v) => v,
        // A rerun after the descriptor was re-sealed: the volume is already under the new key.
        Err(e) => keys::open_existing_volume(store.as_ref(), prefix, to.as_ref())
            .await
            .map_err(|_| e)
            .with_context(|| format!("opening the volume s3://{bucket}/{prefix} with the old key"))?,
    };
    // Directory markers are listed too: one that holds extended attributes carries a data key of its own.
    let objects: Vec<(String, u64)> = crate::verify::list_volume(store.as_ref(), prefix).await?;
    drop_indexes(store.as_ref(), prefix, dry_run).await?;
    let (store_ref, from_ref, to_ref) = (&store, &from, &to);
    let mut report = drive(bucket, objects, dry_run, |key| async move {
        let outcome = rekey_one(store_ref.as_ref(), from_ref.as_ref(), to_ref.as_ref(), &key, dry_run).await;
        (key, outcome)
    })
    .await;
    if !report.interrupted {
        drop_indexes(store.as_ref(), prefix, dry_run).await?;
    }
    if !dry_run && !report.interrupted && report.failed.is_empty() {
        report.descriptor_resealed = reseal_descriptor(store.as_ref(), prefix, to.as_ref(), vol.block_size).await?;
    }
    let (a, b) = (old_keys.stats.snapshot(), new_keys.stats.snapshot());
    report.kms_calls = [a, b]
        .iter()
        .map(|s| s.kms_generate + s.kms_decrypt + s.kms_reencrypt)
        .sum();
    report.failed.sort();
    Ok(report)
}

/// Deletes the volume's directory indexes, before the objects are done and again after: they hold copies of
/// object metadata (wrapped data keys included) from before the rekey, and the mounts rebuild them.
async fn drop_indexes(store: &dyn ObjectStore, prefix: &str, dry_run: bool) -> Result<()> {
    if dry_run {
        return Ok(());
    }
    let n = crate::verify::delete_indexes(store, prefix).await?;
    if n > 0 {
        log::info!("deleted {n} directory index(es); mounts rebuild them as they list");
    }
    Ok(())
}

/// Runs `one` over `keys`, [`PARALLEL_OBJECTS`] at a time, until all are done or Ctrl-C stops new work.
async fn drive<F, Fut>(bucket: &str, objects: Vec<(String, u64)>, dry_run: bool, one: F) -> RekeyReport
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = (String, Outcome)>,
{
    let mut report = RekeyReport {
        dry_run,
        ..Default::default()
    };
    let progress = crate::progress::Progress::new("rekey", &objects);
    let _reporter = progress.start();
    let (one, progress_ref) = (&one, &progress);
    let work = stream::iter(objects)
        .map(|(key, size)| async move {
            let done = one(key).await;
            progress_ref.done(size);
            done
        })
        .buffer_unordered(PARALLEL_OBJECTS);
    tokio::pin!(work);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            next = work.next() => {
                let Some((key, outcome)) = next else { break };
                report.count(bucket, key, outcome);
            }
            _ = &mut stop => {
                report.interrupted = true;
                break;
            }
        }
    }
    report
}

/// Moves one object's data key to `to`; tries again once if the object changed under it.
async fn rekey_one(
    store: &dyn ObjectStore,
    from: &dyn DataKeyProvider,
    to: &dyn DataKeyProvider,
    key: &str,
    dry_run: bool,
) -> Outcome {
    for _ in 0..3 {
        let info = match store.head(key).await {
            Ok(info) => info,
            Err(StoreError::NotFound(_)) => return Outcome::NotAFile,
            Err(e) => return Outcome::Failed(format!("cannot be read: {e}")),
        };
        let header = match ObjectHeader::from_metadata(&info.metadata) {
            Ok(Some(h)) => h,
            // A directory marker with no extended attributes: nothing to move.
            Ok(None) if key.ends_with('/') => return Outcome::NotAFile,
            Ok(None) => return Outcome::Failed("no s3crypt metadata: not an object of this volume".into()),
            Err(e) => return Outcome::Failed(format!("s3crypt metadata: {e}")),
        };
        if to.unwrap(&header.file_id, &header.wrapped_key).await.is_ok() {
            return Outcome::Already;
        }
        if dry_run {
            return match from.unwrap(&header.file_id, &header.wrapped_key).await {
                Ok(_) => Outcome::Rekeyed(info.size),
                Err(e) => Outcome::Failed(format!("its data key does not open with the old key: {e}")),
            };
        }
        let wrapped = match to.rewrap(&header.file_id, &header.wrapped_key, from).await {
            Ok(w) => w,
            Err(e) => return Outcome::Failed(format!("moving its data key: {e}")),
        };
        let mut meta = info.metadata.clone();
        meta.insert(
            crate::format::META_KEY.into(),
            base64::engine::general_purpose::STANDARD.encode(&wrapped),
        );
        meta.insert(keys::META_REKEYED_FROM.into(), info.etag.clone());
        let cond = PutCondition::IfMatch(info.etag.clone());
        let etag = Some(info.etag.as_str());
        match crate::store::copy_object(store, key, key, Some(&meta), cond, info.size, etag, COPY_MAX).await {
            Ok(_) => return Outcome::Rekeyed(info.size),
            // Changed since the HEAD (a mount wrote it): read it again.
            Err(StoreError::PreconditionFailed(_)) => continue,
            Err(e) => return Outcome::Failed(format!("copying it onto itself: {e}")),
        }
    }
    Outcome::Failed("it kept changing while being rekeyed; run rekey again".into())
}

/// Seals a new volume descriptor under `to` (unless the current one already opens with it). Returns whether it
/// wrote one.
async fn reseal_descriptor(
    store: &dyn ObjectStore,
    prefix: &str,
    to: &dyn DataKeyProvider,
    block_size: crate::format::BlockSize,
) -> Result<bool> {
    if keys::open_existing_volume(store, prefix, to).await.is_ok() {
        return Ok(false);
    }
    let desc = keys::volume::VolumeDescriptor::create(to, block_size).await?;
    let key = keys::volume_key(prefix);
    store
        .put(
            &key,
            bytes::Bytes::from(desc.encode()),
            &Default::default(),
            PutCondition::None,
        )
        .await
        .with_context(|| format!("writing the new volume descriptor {key}"))?;
    Ok(true)
}

/// The SSE modes: every object copied onto itself under the new server-side settings.
async fn rekey_sse(
    bucket: &str,
    prefix: &str,
    old: &MountOptions,
    new: &MountOptions,
    dry_run: bool,
) -> Result<RekeyReport> {
    let (sdk, old_keys) = crate::run::load_keys(old).await?;
    let (_, new_keys) = crate::run::load_keys(new).await?;
    let client = crate::store::s3::s3_client_from(&sdk, old.path_style);
    // Both through the same retries as a mount's store: a transient error is retried, not reported as a failure.
    let retrying = |s: S3Store| Retrying::new(s, RetryPolicy::default());
    let from = retrying(
        S3Store::new(client.clone(), bucket, old_keys.sse.clone())
            .with_older_customer_keys(old_keys.sse_c_previous.clone()),
    );
    let to = retrying(
        S3Store::new(client, bucket, new_keys.sse.clone())
            .with_copy_source_sse(old_keys.sse.clone(), old_keys.sse_c_previous.clone()),
    );
    crate::run::check_bucket(&from, bucket, prefix).await?;
    let objects = crate::verify::list_volume(&from, prefix).await?;
    drop_indexes(&from, prefix, dry_run).await?;
    let (from_ref, to_ref, target) = (&from, &to, &new_keys.sse);
    let mut report = drive(bucket, objects, dry_run, |key| async move {
        let outcome = rekey_sse_one(from_ref, to_ref, target, &key, dry_run).await;
        (key, outcome)
    })
    .await;
    if !report.interrupted {
        drop_indexes(&from, prefix, dry_run).await?;
    }
    report.failed.sort();
    Ok(report)
}

/// Whether S3 reports `info` as encrypted the way `sse` asks (for SSE-C, the HEAD that found it carried the key).
fn under(info: &ObjectInfo, sse: &Sse) -> bool {
    let alg = info.sse_algorithm.as_deref();
    match sse {
        Sse::S3 => alg == Some("AES256") && info.sse_customer_algorithm.is_none(),
        Sse::Kms { key_id } => {
            alg == Some("aws:kms")
                && match (key_id, info.sse_kms_key_id.as_deref()) {
                    (Some(want), Some(got)) => crate::verify::same_kms_key(want, got),
                    (Some(_), None) => false,
                    (None, _) => true,
                }
        }
        Sse::Customer(_) => info.sse_customer_algorithm.as_deref() == Some("AES256"),
        Sse::None => false,
    }
}

async fn rekey_sse_one(
    from: &dyn ObjectStore,
    to: &dyn ObjectStore,
    target: &Sse,
    key: &str,
    dry_run: bool,
) -> Outcome {
    for _ in 0..3 {
        if let Ok(info) = to.head(key).await {
            if under(&info, target) {
                return Outcome::Already;
            }
        }
        let info = match from.head(key).await {
            Ok(info) => info,
            Err(StoreError::NotFound(_)) => return Outcome::NotAFile,
            Err(e) => return Outcome::Failed(format!("cannot be read with the old settings: {e}")),
        };
        if dry_run {
            return Outcome::Rekeyed(info.size);
        }
        // The same metadata, replaced (a copy onto itself must change something; here the encryption changes),
        // with the mark that tells a mount writing this file that only the key changed.
        let mut meta = info.metadata.clone();
        meta.insert(keys::META_REKEYED_FROM.into(), info.etag.clone());
        let cond = PutCondition::IfMatch(info.etag.clone());
        let etag = Some(info.etag.as_str());
        match crate::store::copy_object(to, key, key, Some(&meta), cond, info.size, etag, COPY_MAX).await {
            Ok(_) => return Outcome::Rekeyed(info.size),
            Err(StoreError::PreconditionFailed(_)) => continue,
            Err(e) => return Outcome::Failed(format!("copying it onto itself under the new settings: {e}")),
        }
    }
    Outcome::Failed("it kept changing while being rekeyed; run rekey again".into())
}
