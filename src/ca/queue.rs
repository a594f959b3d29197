//! The bounded queue in front of the CA (`CA_MAX_CONCURRENCY`): at most N CA
//! requests in flight, first-time requests (a workload waiting for its first
//! certificate) served before background rotations, so that a node full of
//! starting pods is served first and a rotation storm cannot starve them.
//!
//! First fetches are asked for by whoever reaches the socket, and each
//! presented JWT, forged or not, costs a login. So they never starve
//! renewals and trust refreshes in turn:
//! - while any rotation waits, a freed permit goes to it until rotations
//!   hold [`rotation_reserve`] of the N (a quarter, rounded down);
//! - while a rotation waits, at most [`FIRST_FETCHES_PER_ROTATION`] first
//!   fetches are let in before it, whatever N is.
//!
//! The queue stays work-conserving: when no rotation waits, first fetches
//! may use every permit.

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
    /// Rotations among `in_flight`.
    rotations_in_flight: usize,
    /// Permits set aside for rotations while any waits.
    rotation_reserve: usize,
    max_seen: usize,
    first: VecDeque<oneshot::Sender<Permit>>,
    rotation: VecDeque<oneshot::Sender<Permit>>,
    /// First fetches let in while a rotation waited, since a rotation was.
    passed_over: usize,
}

/// One CA request's right to run; released on drop.
pub struct Permit {
    queue: Option<CaQueue>,
    priority: Priority,
}

/// How many of `max_concurrency` permits a waiting rotation is given ahead
/// of first fetches: a quarter, rounded down.
pub fn rotation_reserve(max_concurrency: usize) -> usize {
    max_concurrency / 4
}

/// How many first fetches are let in at most while a rotation waits: the
/// next permit is then the rotation's.
pub const FIRST_FETCHES_PER_ROTATION: usize = 3;

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
        let max = max_concurrency.max(1);
        Self {
            inner: Arc::new(Mutex::new(State {
                available: max,
                in_flight: 0,
                rotations_in_flight: 0,
                rotation_reserve: rotation_reserve(max),
                passed_over: 0,
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
                return st.grant(self, priority);
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

    fn release(&self, priority: Priority) {
        let mut st = self.inner.lock().expect("queue lock");
        st.in_flight -= 1;
        if priority == Priority::Rotation {
            st.rotations_in_flight -= 1;
        }
        loop {
            // A waiting rotation goes first while rotations hold less than
            // their reserve, or once enough first fetches went before it;
            // otherwise first fetches do.
            let rotation_first = st.rotations_in_flight < st.rotation_reserve
                || st.passed_over >= FIRST_FETCHES_PER_ROTATION;
            let rotation =
                |st: &mut State| st.rotation.pop_front().map(|tx| (tx, Priority::Rotation));
            let first = |st: &mut State| st.first.pop_front().map(|tx| (tx, Priority::FirstFetch));
            let next = if rotation_first {
                rotation(&mut st).or_else(|| first(&mut st))
            } else {
                first(&mut st).or_else(|| rotation(&mut st))
            };
            let Some((tx, priority)) = next else {
                st.available += 1;
                return;
            };
            let permit = st.grant(self, priority);
            match tx.send(permit) {
                Ok(()) => return,
                Err(mut p) => {
                    // The waiter gave up: take the permit back without recursion.
                    p.queue = None;
                    st.in_flight -= 1;
                    if priority == Priority::Rotation {
                        st.rotations_in_flight -= 1;
                    }
                }
            }
        }
    }
}

impl State {
    /// Counts a permit of `priority` in flight.
    fn grant(&mut self, queue: &CaQueue, priority: Priority) -> Permit {
        self.in_flight += 1;
        match priority {
            Priority::Rotation => {
                self.rotations_in_flight += 1;
                self.passed_over = 0;
            }
            Priority::FirstFetch if !self.rotation.is_empty() => self.passed_over += 1,
            Priority::FirstFetch => self.passed_over = 0,
        }
        self.max_seen = self.max_seen.max(self.in_flight);
        Permit {
            queue: Some(queue.clone()),
            priority,
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(q) = self.queue.take() {
            q.release(self.priority);
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

    /// Holds `n` permits of `p` until the returned senders are used.
    fn busy(q: &CaQueue, p: Priority, n: usize) -> Vec<oneshot::Sender<()>> {
        (0..n)
            .map(|_| {
                let (tx, rx) = oneshot::channel::<()>();
                let q = q.clone();
                tokio::spawn(async move {
                    let _permit = q.acquire(p).await;
                    let _ = rx.await;
                });
                tx
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_first_fetches_leaves_rotations_their_reserve() {
        let q = CaQueue::new(8);
        assert_eq!(rotation_reserve(8), 2);
        // First fetches hold every permit, and more keep coming.
        let mut first = busy(&q, Priority::FirstFetch, 8);
        tokio::task::yield_now().await;
        let mut waiting_first = busy(&q, Priority::FirstFetch, 100);
        let rotations = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let (q, rotations) = (q.clone(), rotations.clone());
            tokio::spawn(async move {
                let _p = q.acquire(Priority::Rotation).await;
                rotations.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            });
        }
        tokio::task::yield_now().await;
        // Two first fetches end: both permits go to rotations, not to the
        // 100 first fetches ahead of them.
        for tx in first.drain(..2) {
            tx.send(()).unwrap();
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(rotations.load(Ordering::SeqCst), 2);
        // The reserve is held: the next permit goes to a first fetch.
        first.pop().unwrap().send(()).unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            rotations.load(Ordering::SeqCst),
            2,
            "within its reserve only"
        );
        drop(waiting_first.drain(..));
    }

    #[tokio::test]
    async fn with_one_permit_a_rotation_is_let_in_after_a_few_first_fetches() {
        let q = CaQueue::new(1);
        assert_eq!(rotation_reserve(1), 0);
        let held = q.acquire(Priority::FirstFetch).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let spawn = |i: usize, p: Priority| {
            let (q, order) = (q.clone(), order.clone());
            tokio::spawn(async move {
                let _p = q.acquire(p).await;
                order.lock().unwrap().push(i);
            })
        };
        let mut tasks = vec![spawn(0, Priority::Rotation)];
        tokio::task::yield_now().await;
        for i in 1..=8 {
            tasks.push(spawn(i, Priority::FirstFetch));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            [1, 2, 3, 0, 4, 5, 6, 7, 8],
            "first fetches first, but the rotation after three of them"
        );
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
