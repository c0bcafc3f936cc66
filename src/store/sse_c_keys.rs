//! SSE-C keys during a key rotation: the current key writes, older keys still read.
//!
//! S3 keeps no SSE-C key, only a salted hash to check the one a request sends, and answers a wrong key with 403.
//! While `s3crypt rekey` moves a volume from one customer key to the next, objects lie under either; a key file
//! listing both (current first, as s3fs's does) lets a mount read them all meanwhile. A read tries the key that
//! opened the object last (remembered in a bounded map), then the others in the file's order, and moves on only
//! after a 403; the same order picks the copy-source key of a CopyObject or UploadPartCopy whose source may still
//! be under an older key. Writes always carry the current key, so what a mount writes is never under an old one.
//!
//! Without older keys nothing here runs: a request goes out with the current key only, as it always did.
use super::{Sse, SseCustomerKey, StoreError, StoreResult};
use lru::LruCache;
use std::fmt;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Mutex;

/// Objects whose older key is remembered (a key name and an index each: a few MiB at most).
const REMEMBERED: usize = 16 * 1024;

/// Which key a candidate is: the current one, or the older one at this index.
pub(super) type Which = Option<usize>;

/// Older SSE-C keys and which of them opened each object lately.
pub(super) struct OlderKeys {
    keys: Vec<SseCustomerKey>,
    /// Object key → index in `keys` of the key that last opened it; objects under the current key are not kept.
    opened_by: Mutex<LruCache<String, usize>>,
}

impl fmt::Debug for OlderKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OlderKeys({} keys, <redacted>)", self.keys.len())
    }
}

impl OlderKeys {
    pub(super) fn new(keys: Vec<SseCustomerKey>) -> Self {
        OlderKeys {
            keys,
            opened_by: Mutex::new(LruCache::new(NonZeroUsize::new(REMEMBERED).expect("non-zero"))),
        }
    }

    /// The keys to try for `object`, in order: the one that opened it last, then the current one, then the rest.
    pub(super) fn candidates(&self, object: &str, current: &Sse) -> Vec<(Which, Sse)> {
        let last = self
            .opened_by
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(object)
            .copied();
        let older = |i: usize| (Some(i), Sse::Customer(self.keys[i].clone()));
        let mut order = Vec::with_capacity(self.keys.len() + 1);
        order.extend(last.map(older));
        order.push((None, current.clone()));
        order.extend((0..self.keys.len()).filter(|&i| Some(i) != last).map(older));
        order
    }

    /// Records which key opened `object`.
    pub(super) fn opened(&self, object: &str, which: Which) {
        let mut map = self.opened_by.lock().unwrap_or_else(|p| p.into_inner());
        match which {
            Some(i) => {
                map.put(object.to_string(), i);
            }
            None => {
                map.pop(object);
            }
        }
    }
}

/// Runs `attempt` with each candidate key for `object` until one is not refused (403); returns the first refusal
/// when every key is, twice over. Two rounds, because a rotation can copy the object from the key not yet tried
/// to the one just refused between two attempts; it moves an object once, so the second round finds it.
pub(super) async fn with_each_key<T, F, Fut>(
    older: Option<&OlderKeys>,
    object: &str,
    current: &Sse,
    attempt: F,
) -> StoreResult<T>
where
    F: Fn(Sse) -> Fut,
    Fut: Future<Output = StoreResult<T>>,
{
    let Some(older) = older else {
        return attempt(current.clone()).await;
    };
    let mut refused = None;
    let order = older.candidates(object, current);
    for (which, sse) in order.iter().chain(order.iter()).cloned() {
        match attempt(sse).await {
            Ok(v) => {
                older.opened(object, which);
                return Ok(v);
            }
            Err(e @ StoreError::AccessDenied(_)) => {
                refused.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(refused.expect("at least the current key was tried"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SseCustomerKey {
        SseCustomerKey::new([n; 32])
    }

    fn md5_of(sse: &Sse) -> String {
        match sse {
            Sse::Customer(k) => k.key_md5_base64(),
            _ => unreachable!(),
        }
    }

    #[tokio::test]
    async fn tries_each_key_on_403_and_remembers_the_one_that_opened() {
        let current = Sse::Customer(key(1));
        let older = OlderKeys::new(vec![key(2), key(3)]);
        let right = key(3).key_md5_base64();
        let tried = Mutex::new(Vec::new());
        let attempt = |sse: Sse| {
            let m = md5_of(&sse);
            tried.lock().unwrap().push(m.clone());
            let ok = m == right;
            async move {
                if ok {
                    Ok(())
                } else {
                    Err(StoreError::AccessDenied("wrong key".into()))
                }
            }
        };
        with_each_key(Some(&older), "obj", &current, attempt).await.unwrap();
        assert_eq!(tried.lock().unwrap().len(), 3, "current, then each older key in order");
        assert_eq!(tried.lock().unwrap()[0], md5_of(&current));
        tried.lock().unwrap().clear();
        with_each_key(Some(&older), "obj", &current, attempt).await.unwrap();
        assert_eq!(*tried.lock().unwrap(), vec![right.clone()], "the remembered key first");
        // Another object starts with the current key.
        tried.lock().unwrap().clear();
        let e = with_each_key(Some(&older), "other", &current, |_| {
            tried.lock().unwrap().push(String::new());
            async { Err::<(), _>(StoreError::AccessDenied("no".into())) }
        })
        .await;
        assert!(matches!(e, Err(StoreError::AccessDenied(_))));
        assert_eq!(tried.lock().unwrap().len(), 6, "every key, twice");
    }

    /// The object moves from the older key to the current one between the first two attempts: each key is
    /// refused once, and the second round opens it.
    #[tokio::test]
    async fn an_object_rekeyed_between_attempts_is_found_in_the_second_round() {
        let current = Sse::Customer(key(1));
        let older = OlderKeys::new(vec![key(2)]);
        let attempts = Mutex::new(0);
        let under_current_from = 2; // attempt 1 (current) and 2 (older) are both refused
        with_each_key(Some(&older), "obj", &current, |sse| {
            let n = {
                let mut a = attempts.lock().unwrap();
                *a += 1;
                *a
            };
            let is_current = md5_of(&sse) == md5_of(&current);
            async move {
                match is_current && n > under_current_from {
                    true => Ok(()),
                    false => Err(StoreError::AccessDenied("wrong key".into())),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(*attempts.lock().unwrap(), 3);
    }

    #[tokio::test]
    async fn other_errors_stop_at_once_and_no_older_keys_means_one_attempt() {
        let current = Sse::Customer(key(1));
        let older = OlderKeys::new(vec![key(2)]);
        let calls = Mutex::new(0);
        let e = with_each_key(Some(&older), "obj", &current, |_| {
            *calls.lock().unwrap() += 1;
            async { Err::<(), _>(StoreError::NotFound("gone".into())) }
        })
        .await;
        assert!(matches!(e, Err(StoreError::NotFound(_))));
        assert_eq!(*calls.lock().unwrap(), 1);
        *calls.lock().unwrap() = 0;
        let e = with_each_key(None, "obj", &current, |_| {
            *calls.lock().unwrap() += 1;
            async { Err::<(), _>(StoreError::AccessDenied("no".into())) }
        })
        .await;
        assert!(matches!(e, Err(StoreError::AccessDenied(_))));
        assert_eq!(*calls.lock().unwrap(), 1);
    }
}
