//! A cache whose misses load once: callers asking for a key while it loads wait for that
//! load rather than each making their own (the 500 deliveries of one claim would otherwise
//! read their group's signing secret 500 times at once; a worker's uploads, their group).
//! Keys not asked for a while are forgotten: a value may be large (a 10,000-image group
//! is about 550 KiB) and groups come and go.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Keys remembered at most: past it, all are forgotten (the next asks load again).
const MAX_KEYS: usize = 10_000;

/// A key not asked for this long is forgotten (looked for at most once per this long).
const IDLE: Duration = Duration::from_secs(120);

pub(crate) struct Cache<K, V> {
    entries: Mutex<Entries<K, V>>,
    idle: Duration,
}

struct Entries<K, V> {
    /// Each key's slot and when it was last asked for.
    slots: HashMap<K, (Instant, Slot<V>)>,
    /// When idle keys were last looked for.
    swept: Instant,
}

/// One key's value and when it was loaded; locked while it loads.
type Slot<V> = Arc<tokio::sync::Mutex<Option<(Instant, V)>>>;

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Self::forgetting_after(IDLE)
    }
}

impl<K, V> Cache<K, V> {
    fn forgetting_after(idle: Duration) -> Self {
        Self {
            entries: Mutex::new(Entries {
                slots: HashMap::new(),
                swept: Instant::now(),
            }),
            idle,
        }
    }
}

impl<K: Eq + std::hash::Hash + Clone, V: Clone> Cache<K, V> {
    /// The value of `key` if `fresh` says the one held still serves, else what `load` gives
    /// (kept, errors included: `fresh` decides how long each serves).
    pub(crate) async fn get_or_load<F, Fut>(
        &self,
        key: &K,
        fresh: impl Fn(&(Instant, V)) -> bool,
        load: F,
    ) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let loaded = self
            .try_get_or_load(key, fresh, || async { Ok::<V, Infallible>(load().await) })
            .await;
        match loaded {
            Ok(value) => value,
            Err(never) => match never {},
        }
    }

    /// As [`Cache::get_or_load`], but a failed load is handed back and not kept.
    pub(crate) async fn try_get_or_load<E, F, Fut>(
        &self,
        key: &K,
        fresh: impl Fn(&(Instant, V)) -> bool,
        load: F,
    ) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        self.try_get_or_refresh(key, fresh, |_| load()).await
    }

    /// Holds `value` for `key` from now on, as if just loaded (a caller that already has
    /// what a load would read).
    pub(crate) async fn put(&self, key: &K, value: V) {
        let Ok(_) = self
            .try_get_or_refresh(key, |_| false, |_| async { Ok::<V, Infallible>(value) })
            .await;
    }

    /// As [`Cache::try_get_or_load`], but `load` is given the value held, if any, when it
    /// is no longer fresh: it may confirm it with a cheaper question than a whole read
    /// (and hand it back, to serve anew) or load another.
    pub(crate) async fn try_get_or_refresh<E, F, Fut>(
        &self,
        key: &K,
        fresh: impl Fn(&(Instant, V)) -> bool,
        load: F,
    ) -> Result<V, E>
    where
        F: FnOnce(Option<V>) -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let slot = {
            let mut entries = crate::sync::lock(&self.entries);
            let now = Instant::now();
            if now.duration_since(entries.swept) >= self.idle {
                entries.swept = now;
                // A slot still loading was asked for moments ago, so it stays.
                entries
                    .slots
                    .retain(|_, (asked, _)| now.duration_since(*asked) < self.idle);
            }
            if entries.slots.len() > MAX_KEYS {
                entries.slots.clear();
            }
            let (asked, slot) = entries
                .slots
                .entry(key.clone())
                .or_insert_with(|| (now, Slot::default()));
            *asked = now;
            slot.clone()
        };
        let mut slot = slot.lock().await;
        if let Some(entry) = slot.as_ref().filter(|e| fresh(e)) {
            return Ok(entry.1.clone());
        }
        let value = load(slot.as_ref().map(|(_, held)| held.clone())).await?;
        *slot = Some((Instant::now(), value.clone()));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn callers_share_one_load_and_a_failed_load_is_not_kept() {
        let cache: Arc<Cache<&str, usize>> = Arc::default();
        let loads = Arc::new(AtomicUsize::new(0));
        let asks = (0..8).map(|_| {
            let (cache, loads) = (cache.clone(), loads.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load(
                        &"k",
                        |_| true,
                        || async {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            loads.fetch_add(1, Ordering::SeqCst) + 1
                        },
                    )
                    .await
            })
        });
        for ask in futures::future::join_all(asks).await {
            assert_eq!(
                ask.expect("ask"),
                1,
                "every caller got the one load's value"
            );
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);

        let failed: Result<usize, &str> = cache
            .try_get_or_load(&"e", |_| true, || async { Err("unreachable") })
            .await;
        assert_eq!(failed, Err("unreachable"));
        let next: Result<usize, &str> = cache
            .try_get_or_load(&"e", |_| true, || async { Ok(7) })
            .await;
        assert_eq!(next, Ok(7), "the failure was not kept");
        // Not fresh: loaded again.
        let again = cache.get_or_load(&"k", |_| false, || async { 2 }).await;
        assert_eq!(again, 2);
    }

    #[tokio::test]
    async fn a_value_put_is_served_without_a_load_and_replaces_the_one_held() {
        let cache: Cache<&str, u32> = Cache::default();
        let fresh = |_: &(Instant, u32)| true;
        assert_eq!(cache.get_or_load(&"k", fresh, || async { 1 }).await, 1);
        cache.put(&"k", 2).await;
        cache.put(&"other", 3).await;
        let never = || async { unreachable!("a value was put: no load") };
        assert_eq!(cache.get_or_load(&"k", fresh, never).await, 2);
        assert_eq!(cache.get_or_load(&"other", fresh, never).await, 3);
    }

    #[tokio::test]
    async fn keys_not_asked_for_a_while_are_forgotten_and_others_kept() {
        let idle = std::time::Duration::from_secs(1);
        let cache: Cache<&str, usize> = Cache::forgetting_after(idle);
        let loads = AtomicUsize::new(0);
        let ask = |key| {
            cache.get_or_load(
                key,
                |_| true,
                || async { loads.fetch_add(1, Ordering::SeqCst) + 1 },
            )
        };
        assert_eq!(ask(&"idle").await, 1);
        assert_eq!(ask(&"busy").await, 2);
        for _ in 0..5 {
            tokio::time::sleep(idle / 4).await;
            assert_eq!(ask(&"busy").await, 2, "asked for often: kept");
        }
        let held = cache.entries.lock().map(|e| e.slots.len()).ok();
        assert_eq!(held, Some(1), "only the key asked for lately is held");
        assert_eq!(ask(&"idle").await, 3, "not asked for a while: loaded again");
    }

    #[tokio::test]
    async fn a_refresh_sees_the_value_held_and_a_failed_one_keeps_it() {
        let cache: Cache<&str, usize> = Cache::default();
        let first: Result<usize, &str> = cache
            .try_get_or_refresh(
                &"k",
                |_| false,
                |held| async move {
                    assert_eq!(held, None, "nothing held yet");
                    Ok(1)
                },
            )
            .await;
        assert_eq!(first, Ok(1));
        let confirmed: Result<usize, &str> = cache
            .try_get_or_refresh(
                &"k",
                |_| false,
                |held| async move { held.ok_or("the value held was not offered") },
            )
            .await;
        assert_eq!(confirmed, Ok(1), "the held value, confirmed, serves anew");
        let failed: Result<usize, &str> = cache
            .try_get_or_refresh(&"k", |_| false, |_| async { Err("gone") })
            .await;
        assert_eq!(failed, Err("gone"));
        let held: Result<usize, &str> = cache
            .try_get_or_refresh(&"k", |_| true, |_| async { Ok(9) })
            .await;
        assert_eq!(
            held,
            Ok(1),
            "a failed refresh left the value held as it was"
        );
    }
}
