//! `cse-kms` against the local KMS (LocalStack): one GenerateDataKey per new file, the file-id binding through
//! the encryption context, one Decrypt per file through the cache, disabled keys, and the volume descriptor
//! refusing another KMS key.
mod common;

use common::MapStore;
use s3crypt::keys::*;
use std::sync::Arc;

async fn provider(key_arn: &str) -> (KmsProvider, Arc<KeyStats>) {
    let stats = Arc::new(KeyStats::new());
    (
        KmsProvider::new(&common::sdk_config().await, key_arn, stats.clone()),
        stats,
    )
}

#[tokio::test]
async fn one_generate_per_new_file_and_round_trip() {
    let arn = common::create_kms_key().await;
    let (p, stats) = provider(&arn).await;
    let mut made = Vec::new();
    for i in 0..3u8 {
        let (key, wrapped) = p.generate(&[i; 16]).await.unwrap();
        assert!(!wrapped.is_empty());
        made.push((key, wrapped));
        assert_eq!(stats.snapshot().kms_generate, u64::from(i) + 1);
    }
    assert_ne!(made[0].0.as_bytes(), made[1].0.as_bytes());
    // A newly generated key put in the cache costs no Decrypt.
    let cache = DataKeyCache::with_defaults(stats.clone());
    let (key, wrapped) = &made[0];
    cache.insert(&[0; 16], wrapped, key.clone());
    assert_eq!(
        cache.get_or_unwrap(&p, &[0; 16], wrapped).await.unwrap().as_bytes(),
        key.as_bytes()
    );
    assert_eq!(stats.snapshot().kms_decrypt, 0);
    // Unwrapping directly gives the same key back.
    for (i, (key, wrapped)) in made.iter().enumerate() {
        assert_eq!(
            p.unwrap(&[i as u8; 16], wrapped).await.unwrap().as_bytes(),
            key.as_bytes()
        );
    }
    let s = stats.snapshot();
    assert_eq!((s.kms_generate, s.kms_decrypt), (3, 3));
}

#[tokio::test]
async fn wrapped_key_of_another_file_is_refused() {
    let arn = common::create_kms_key().await;
    let (p, _) = provider(&arn).await;
    let (_, wrapped_a) = p.generate(&[0xA; 16]).await.unwrap();
    match p.unwrap(&[0xB; 16], &wrapped_a).await {
        Err(e @ KeyError::Kms(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("does not belong to this file or key"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn hundred_reads_cost_one_decrypt() {
    let arn = common::create_kms_key().await;
    let (p, stats) = provider(&arn).await;
    let (key, wrapped) = p.generate(&[5; 16]).await.unwrap();
    let cache = DataKeyCache::with_defaults(stats.clone());
    for _ in 0..100 {
        let got = cache.get_or_unwrap(&p, &[5; 16], &wrapped).await.unwrap();
        assert_eq!(got.as_bytes(), key.as_bytes());
    }
    let s = stats.snapshot();
    assert_eq!(
        (s.kms_generate, s.kms_decrypt, s.cache_misses, s.cache_hits),
        (1, 1, 1, 99)
    );
}

#[tokio::test]
async fn disabled_key_gives_a_clear_error() {
    let arn = common::create_kms_key().await;
    let (p, _) = provider(&arn).await;
    let (_, wrapped) = p.generate(&[1; 16]).await.unwrap();
    common::kms_client()
        .await
        .disable_key()
        .key_id(&arn)
        .send()
        .await
        .expect("disable key");
    for result in [
        p.generate(&[2; 16]).await.map(|_| ()),
        p.unwrap(&[1; 16], &wrapped).await.map(|_| ()),
    ] {
        match result {
            Err(e @ KeyError::Kms(_)) => {
                let msg = e.to_string();
                assert!(msg.contains("is disabled") && msg.contains(&arn), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn missing_key_gives_a_clear_error() {
    let (p, _) = provider("alias/s3crypt-test-no-such-key").await;
    match p.generate(&[1; 16]).await {
        Err(e @ KeyError::Kms(_)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("was not found") && msg.contains("alias/s3crypt-test-no-such-key"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn volume_made_with_one_kms_key_refuses_another() {
    let (arn_a, arn_b) = (common::create_kms_key().await, common::create_kms_key().await);
    let store = MapStore::default();
    let (pa, _) = provider(&arn_a).await;
    let info = open_or_create_volume(&store, "vol/", &pa, None).await.unwrap();
    assert_eq!(info.mode, KeyMode::CseKms);
    open_or_create_volume(&store, "vol/", &pa, None).await.unwrap();
    let (pb, _) = provider(&arn_b).await;
    match open_or_create_volume(&store, "vol/", &pb, None).await {
        Err(e @ KeyError::Kms(_)) => {
            let msg = e.to_string();
            assert!(msg.contains(&arn_b) && msg.contains("another KMS key"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn build_keys_for_cse_kms() {
    let arn = common::create_kms_key().await;
    let cfg = KeyConfig {
        kms_key_id: Some(arn.clone()),
        ..KeyConfig::new(KeyMode::CseKms)
    };
    let keys = build_keys(&cfg, &common::sdk_config().await).await.unwrap();
    assert!(matches!(keys.sse, s3crypt::store::Sse::None));
    let provider = keys.provider.clone().unwrap();
    let (key, wrapped) = provider.generate(&[3; 16]).await.unwrap();
    let got = keys
        .cache
        .get_or_unwrap(provider.as_ref(), &[3; 16], &wrapped)
        .await
        .unwrap();
    assert_eq!(got.as_bytes(), key.as_bytes());
    let s = keys.stats.snapshot();
    assert_eq!((s.kms_generate, s.kms_decrypt, s.cache_misses), (1, 1, 1));
}
