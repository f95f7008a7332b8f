//! Coalescing the store's wake-ups of group reconciles. A write of results records its own
//! image events, and a running group's settled deliveries only move progress: what they
//! leave a reconcile is counting (written at most every 2 s anyway) and, with the last
//! images, the group's completion. Those wake-ups pass at most once per group per
//! [`RESULTS_EVERY`], the first at once and the rest at the end of the window, so a busy
//! group costs the API server a read a second, not one per batch. (A completed group's
//! settled deliveries wake it at once: an endpoint that drained may be due its group event.)

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::Hash;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A group is woken by writes of its results at most this often.
pub const RESULTS_EVERY: Duration = Duration::from_secs(1);

/// Wake-ups of `input`, at most one per key per `every`: a key not seen for `every` passes
/// at once; later ones within the window make one wake-up at its end.
pub fn coalesce<K>(
    input: impl Stream<Item = K> + Send + 'static,
    every: Duration,
) -> impl Stream<Item = K> + Send + 'static
where
    K: Clone + Eq + Hash + Send + Sync + 'static,
{
    let (tx, mut rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut input = std::pin::pin!(input);
        let mut windows = Windows::new(every);
        loop {
            let due = windows.next_due();
            let wait = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let out = tokio::select! {
                key = input.next() => match key {
                    Some(key) => windows.offer(key, Instant::now()).into_iter().collect(),
                    // Nothing more will come: what is held passes now.
                    None => {
                        for key in windows.take_all() {
                            let _ = tx.send(key).await;
                        }
                        return;
                    }
                },
                () = wait => windows.take_due(Instant::now()),
            };
            for key in out {
                if tx.send(key).await.is_err() {
                    return;
                }
            }
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// The bookkeeping of [`coalesce`], apart from the clock.
struct Windows<K> {
    every: Duration,
    /// When each key last passed.
    passed: HashMap<K, Instant>,
    /// Keys with a wake-up held back to the end of their window.
    held: HashSet<K>,
    /// Held wake-ups by when they are due (ties by arrival), and their keys.
    due: BinaryHeap<Reverse<(Instant, u64)>>,
    keys: HashMap<u64, K>,
    next_id: u64,
}

impl<K: Clone + Eq + Hash> Windows<K> {
    fn new(every: Duration) -> Self {
        Windows {
            every,
            passed: HashMap::new(),
            held: HashSet::new(),
            due: BinaryHeap::new(),
            keys: HashMap::new(),
            next_id: 0,
        }
    }

    /// `key` woke at `now`: it passes (`Some`) or waits for its window's end.
    fn offer(&mut self, key: K, now: Instant) -> Option<K> {
        if let Some(passed) = self.passed.get(&key) {
            let end = *passed + self.every;
            if now < end {
                if self.held.insert(key.clone()) {
                    self.due.push(Reverse((end, self.next_id)));
                    self.keys.insert(self.next_id, key);
                    self.next_id += 1;
                }
                return None;
            }
        }
        self.forget_idle(now);
        self.passed.insert(key.clone(), now);
        Some(key)
    }

    /// The held wake-ups due by `now`, which pass.
    fn take_due(&mut self, now: Instant) -> Vec<K> {
        let mut out = Vec::new();
        while let Some(Reverse((at, id))) = self.due.peek().copied() {
            if at > now {
                break;
            }
            self.due.pop();
            if let Some(key) = self.keys.remove(&id) {
                self.held.remove(&key);
                self.passed.insert(key.clone(), now);
                out.push(key);
            }
        }
        out
    }

    /// Every held wake-up, due or not.
    fn take_all(&mut self) -> Vec<K> {
        self.due.clear();
        self.held.clear();
        std::mem::take(&mut self.keys).into_values().collect()
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    /// Keys whose window is over and that hold nothing back are forgotten (groups come
    /// and go), once there are many.
    fn forget_idle(&mut self, now: Instant) {
        if self.passed.len() < 1024 {
            return;
        }
        let (every, held) = (self.every, &self.held);
        self.passed
            .retain(|key, passed| now < *passed + every || held.contains(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_passes_once_per_window_and_what_came_meanwhile_once_at_its_end() {
        let every = Duration::from_secs(1);
        let mut w = Windows::new(every);
        let t0 = Instant::now();
        assert_eq!(w.offer("a", t0), Some("a"));
        assert_eq!(
            w.offer("b", t0),
            Some("b"),
            "keys have windows of their own"
        );
        // More of a within its window: held, once.
        for ms in [10, 200, 900] {
            assert_eq!(w.offer("a", t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(w.next_due(), Some(t0 + every));
        assert!(w.take_due(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(w.take_due(t0 + every), vec!["a"]);
        assert_eq!(w.next_due(), None);
        // The held one passing opened a new window.
        assert_eq!(w.offer("a", t0 + Duration::from_millis(1500)), None);
        assert_eq!(w.take_due(t0 + Duration::from_secs(2)), vec!["a"]);
        // After a quiet window a key passes at once again.
        assert_eq!(w.offer("b", t0 + Duration::from_secs(5)), Some("b"));
    }

    #[tokio::test]
    async fn the_stream_passes_the_first_at_once_and_the_rest_at_the_windows_end() {
        let window = Duration::from_millis(200);
        let (tx, mut rx) = mpsc::unbounded_channel::<&'static str>();
        let input = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut out = Box::pin(coalesce(input, window));
        let started = Instant::now();
        for key in ["g", "g", "g"] {
            tx.send(key).expect("sent");
        }
        assert_eq!(out.next().await, Some("g"));
        assert_eq!(out.next().await, Some("g"), "the two held ones pass as one");
        assert!(started.elapsed() >= window, "at the window's end");
        // Held when the input ends: passes then.
        tx.send("g").expect("sent");
        drop(tx);
        assert_eq!(out.next().await, Some("g"));
        assert_eq!(out.next().await, None, "ends with its input");
    }
}
