//! Throttled warnings: a bound being hit is logged as one line per interval,
//! with a count of the refusals held back since, so that a client repeating
//! a mistake, or an attacker, cannot flood the log too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// At most one warning per bound per this interval.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// When each kind of line was last logged, and how many were held back.
#[derive(Default)]
pub struct Warnings(Mutex<HashMap<&'static str, Warned>>);

#[derive(Default)]
struct Warned {
    last: Option<Instant>,
    suppressed: u64,
}

impl Warnings {
    /// Logs `message` as a warning (with `limit=<bound>`) unless `bound` was
    /// warned about less than [`WARN_INTERVAL`] ago; then it is only counted,
    /// and the count is added to the next warning.
    pub fn warn(&self, bound: &'static str, message: String) {
        if let Some(held_back) = self.throttle(bound) {
            tracing::warn!(limit = %bound, "{message}{}", more(held_back));
        }
    }

    /// Whether a line about `key` may be logged now: `Some(n)`, with how many
    /// were held back since the last one, or `None` (and counted) when one
    /// was logged less than [`WARN_INTERVAL`] ago.
    pub fn throttle(&self, key: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut warned = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let w = warned.entry(key).or_default();
        if w.last
            .is_some_and(|t| now.duration_since(t) < WARN_INTERVAL)
        {
            w.suppressed += 1;
            return None;
        }
        w.last = Some(now);
        Some(std::mem::take(&mut w.suppressed))
    }
}

/// What a throttled line adds about the ones held back before it.
pub fn more(held_back: u64) -> String {
    if held_back == 0 {
        String::new()
    } else {
        format!(
            " ({held_back} more refused for this reason in the last {}s)",
            WARN_INTERVAL.as_secs()
        )
    }
}

/// `s` cut to `max` characters for a log line (a client chooses its length).
pub fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_string(),
        Some((i, _)) => format!("{}...", &s[..i]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_with_the_count_held_back() {
        let w = Warnings::default();
        assert_eq!(w.throttle("a"), Some(0));
        assert_eq!(w.throttle("a"), None);
        assert_eq!(w.throttle("a"), None);
        assert_eq!(w.throttle("b"), Some(0), "each key has its own interval");
        tokio::time::advance(WARN_INTERVAL).await;
        assert_eq!(w.throttle("a"), Some(2));
        assert_eq!(more(0), "");
        assert!(more(2).starts_with(" (2 more refused"));
    }

    #[test]
    fn shorten_cuts_on_characters() {
        assert_eq!(shorten("abc", 5), "abc");
        assert_eq!(shorten("ééé", 2), "éé...");
    }
}
