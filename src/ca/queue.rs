//! The bounded queue in front of the CA (`CA_MAX_CONCURRENCY`): at most N CA
//! requests in flight, first-time requests (a workload waiting for its first
//! certificate) served before background rotations, so that a node full of
//! starting pods is served first and a rotation storm cannot starve them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Which line a request waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A workload is waiting for its first certificate.
    FirstFetch,
    /// A background renewal.
    Rotation,
}

/// A two-line, N-permit limiter. Permits are handed over in a oneshot, so a
/// waiter that gives up never leaks its permit: an unreceived permit is
/// dropped with the channel and released.
#[derive(Clone)]
pub struct CaQueue {
    inner: Arc<Mutex<State>>,
}

struct State {
    available: usize,
    in_flight: usize,
    max_seen: usize,
    first: VecDeque<oneshot::Sender<Permit>>,
    rotation: VecDeque<oneshot::Sender<Permit>>,
}

/// One CA request's right to run; released on drop.
pub struct Permit {
    queue: Option<CaQueue>,
}

impl std::fmt::Debug for CaQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.lock().expect("queue lock");
        f.debug_struct("CaQueue")
            .field("in_flight", &st.in_flight)
            .field("waiting", &(st.first.len() + st.rotation.len()))
            .finish()
    }
}

impl CaQueue {
    pub fn new(max_concurrency: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(State {
                available: max_concurrency.max(1),
                in_flight: 0,
                max_seen: 0,
                first: VecDeque::new(),
                rotation: VecDeque::new(),
            })),
        }
    }

    /// Waits for a permit in the line of `priority`.
    pub async fn acquire(&self, priority: Priority) -> Permit {
        let rx = {
            let mut st = self.inner.lock().expect("queue lock");
            if st.available > 0
                && st.first.is_empty()
                && (priority == Priority::FirstFetch || st.rotation.is_empty())
            {
                st.available -= 1;
                st.in_flight += 1;
                st.max_seen = st.max_seen.max(st.in_flight);
                return Permit {
                    queue: Some(self.clone()),
                };
            }
            let (tx, rx) = oneshot::channel();
            match priority {
                Priority::FirstFetch => st.first.push_back(tx),
                Priority::Rotation => st.rotation.push_back(tx),
            }
            rx
        };
        rx.await
            .expect("the queue never drops a waiter without a permit")
    }

    /// Requests waiting for a permit now (waiters that gave up are not counted).
    pub fn waiting(&self) -> usize {
        let st = self.inner.lock().expect("queue lock");
        st.first
            .iter()
            .chain(&st.rotation)
            .filter(|tx| !tx.is_closed())
            .count()
    }

    /// Most requests that were ever in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.inner.lock().expect("queue lock").max_seen
    }

    fn release(&self) {
        let mut st = self.inner.lock().expect("queue lock");
        st.in_flight -= 1;
        loop {
            let next = st.first.pop_front().or_else(|| st.rotation.pop_front());
            let Some(tx) = next else {
                st.available += 1;
                return;
            };
            st.in_flight += 1;
            st.max_seen = st.max_seen.max(st.in_flight);
            let permit = Permit {
                queue: Some(self.clone()),
            };
            match tx.send(permit) {
                Ok(()) => return,
                Err(mut p) => {
                    // The waiter gave up: take the permit back without recursion.
                    p.queue = None;
                    st.in_flight -= 1;
                }
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(q) = self.queue.take() {
            q.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn first_fetches_go_before_rotations_and_the_bound_holds() {
        let q = CaQueue::new(1);
        let held = q.acquire(Priority::Rotation).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, p) in [
            Priority::Rotation,
            Priority::FirstFetch,
            Priority::Rotation,
            Priority::FirstFetch,
        ]
        .into_iter()
        .enumerate()
        {
            let (q, order) = (q.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = q.acquire(p).await;
                order.lock().unwrap().push((i, p));
                tokio::task::yield_now().await;
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(q.waiting(), 4);
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(q.waiting(), 0);
        let order: Vec<usize> = order.lock().unwrap().iter().map(|(i, _)| *i).collect();
        assert_eq!(
            order,
            [1, 3, 0, 2],
            "first fetches first, each line in order"
        );
        assert_eq!(q.max_in_flight(), 1);
    }

    #[tokio::test]
    async fn never_more_than_n_in_flight_and_abandoned_waits_do_not_leak() {
        let q = CaQueue::new(3);
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..40 {
            let (q, now, peak) = (q.clone(), now.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                let p = if i % 2 == 0 {
                    Priority::FirstFetch
                } else {
                    Priority::Rotation
                };
                let _permit = q.acquire(p).await;
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                tokio::task::yield_now().await;
                now.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        // Waiters that give up.
        for _ in 0..10 {
            let q = q.clone();
            let _ = tokio::time::timeout(
                std::time::Duration::from_micros(1),
                q.acquire(Priority::Rotation),
            )
            .await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert!(q.max_in_flight() <= 3);
        // All permits came back.
        let a = q.acquire(Priority::Rotation).await;
        let b = q.acquire(Priority::Rotation).await;
        let c = q.acquire(Priority::Rotation).await;
        drop((a, b, c));
    }

    #[tokio::test]
    async fn waiting_counts_those_still_in_line() {
        let q = CaQueue::new(1);
        let held = q.acquire(Priority::FirstFetch).await;
        assert_eq!(q.waiting(), 0);
        let mut a = Box::pin(q.acquire(Priority::Rotation));
        let mut b = Box::pin(q.acquire(Priority::FirstFetch));
        assert!(futures::poll!(&mut a).is_pending());
        assert!(futures::poll!(&mut b).is_pending());
        assert_eq!(q.waiting(), 2);
        drop(b);
        assert_eq!(q.waiting(), 1, "a waiter that gave up is not counted");
        drop(held);
        let _permit = a.await;
        assert_eq!(q.waiting(), 0);
    }
}
