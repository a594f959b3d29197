//! What has proven nothing holds its place only until someone needs it.
//!
//! A connection, and a stream, is unproven until the CA has accepted a
//! credential it carries (a first fetch on it succeeded). Until then its
//! place under `SDS_MAX_CONNECTIONS` or `SDS_MAX_STREAMS` is only lent: when
//! the bound is reached, the oldest unproven holder is evicted to make room
//! for the newcomer, instead of the newcomer being refused. A squatter that
//! holds places and proves nothing, however many it opens and however fast
//! it reopens them, therefore cannot keep a new Envoy out: the Envoy's
//! connection and stream would be evicted only after every unproven one
//! older than them, which is time enough to prove a JWT. Proven holders are
//! never evicted; the caps and the per-connection bounds bound them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Context;

use futures::task::AtomicWaker;

/// Whether one holder has proven a credential, or been evicted.
#[derive(Debug, Default)]
pub struct Proof {
    proven: AtomicBool,
    evicted: AtomicBool,
    waker: AtomicWaker,
}

impl Proof {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The CA accepted a credential of this holder: it is never evicted.
    pub fn prove(&self) {
        self.proven.store(true, Ordering::SeqCst);
    }

    pub fn is_proven(&self) -> bool {
        self.proven.load(Ordering::SeqCst)
    }

    /// Whether the holder was evicted; if not, `cx` is woken when it is.
    pub fn poll_evicted(&self, cx: &mut Context<'_>) -> bool {
        if self.evicted.load(Ordering::SeqCst) {
            return true;
        }
        self.waker.register(cx.waker());
        self.evicted.load(Ordering::SeqCst)
    }

    /// Evicts the holder unless it has proven a credential (or was
    /// evicted already); true when this call evicted it.
    fn evict(&self) -> bool {
        if self.is_proven() || self.evicted.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.waker.wake();
        true
    }

    fn is_unproven(&self) -> bool {
        !self.is_proven() && !self.evicted.load(Ordering::SeqCst)
    }
}

/// The unproven holders of one bound, oldest first.
#[derive(Debug, Default)]
pub struct Unproven {
    queue: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    holders: VecDeque<Weak<Proof>>,
    /// Past this length, holders gone, proven or evicted are dropped.
    prune_at: usize,
}

impl Unproven {
    /// A new holder, youngest of all.
    pub fn register(&self, proof: &Arc<Proof>) {
        let mut q = self.queue.lock().expect("unproven lock");
        q.holders.push_back(Arc::downgrade(proof));
        if q.holders.len() > q.prune_at {
            q.holders
                .retain(|h| h.upgrade().is_some_and(|p| p.is_unproven()));
            q.prune_at = (2 * q.holders.len()).max(64);
        }
    }

    /// Evicts the oldest holder that is still unproven; false when there is
    /// none.
    pub fn evict_oldest(&self) -> bool {
        let mut q = self.queue.lock().expect("unproven lock");
        while let Some(holder) = q.holders.pop_front() {
            if holder.upgrade().is_some_and(|p| p.evict()) {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_unproven_holder_is_evicted_first_and_proven_ones_never() {
        let u = Unproven::default();
        let (a, b, c) = (Proof::new(), Proof::new(), Proof::new());
        for p in [&a, &b, &c] {
            u.register(p);
        }
        a.prove();
        assert!(u.evict_oldest());
        assert!(!a.evicted.load(Ordering::SeqCst), "proven: kept");
        assert!(b.evicted.load(Ordering::SeqCst), "the oldest unproven");
        assert!(!c.evicted.load(Ordering::SeqCst));
        drop(c);
        assert!(!u.evict_oldest(), "none left: a proven, b evicted, c gone");
    }

    #[test]
    fn an_evicted_holder_is_woken() {
        let u = Unproven::default();
        let p = Proof::new();
        u.register(&p);
        let woken = Arc::new(AtomicBool::new(false));
        let waker = waker(woken.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(!p.poll_evicted(&mut cx));
        assert!(u.evict_oldest());
        assert!(woken.load(Ordering::SeqCst));
        assert!(p.poll_evicted(&mut cx));
    }

    #[test]
    fn the_queue_stays_as_long_as_its_unproven_holders() {
        let u = Unproven::default();
        let kept: Vec<_> = (0..10).map(|_| Proof::new()).collect();
        for p in &kept {
            u.register(p);
        }
        for _ in 0..10_000 {
            u.register(&Proof::new());
        }
        assert!(u.queue.lock().unwrap().holders.len() <= 128);
    }

    fn waker(flag: Arc<AtomicBool>) -> std::task::Waker {
        struct Flag(Arc<AtomicBool>);
        impl std::task::Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        std::task::Waker::from(Arc::new(Flag(flag)))
    }
}
