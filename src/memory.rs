//! Gives back to the system the memory the allocator keeps after a burst.
//!
//! glibc's malloc keeps what a burst freed (the requests of a thousand
//! Envoys arriving at once, a storm's CSRs and answers) in its arenas, so the
//! agent's resident set stays near the burst's high-water mark long after,
//! by an amount that depends on how the burst interleaved. Once a second,
//! `malloc_trim(0)` returns the free pages of every arena: a walk of the
//! free lists, well under a millisecond for the agent's heap. With another
//! allocator (musl's, say) this does nothing.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

/// How often free memory is given back.
const INTERVAL: Duration = Duration::from_secs(1);

/// Gives free memory back every [`INTERVAL`] until `shutdown`.
pub fn give_back_free_memory(mut shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = tick.tick() => trim(),
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes no pointer and only releases pages the
    // allocator holds free; it is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
