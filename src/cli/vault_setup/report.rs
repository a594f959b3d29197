//! What `vault-setup` did (or, with `--dry-run`, would do) to each item, one
//! line each on stderr.

use std::fmt::Display;

/// What happened to one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Unchanged,
    Updated,
}

/// Prints item lines and counts them.
pub struct Report {
    dry_run: bool,
    counts: [usize; 3],
}

impl Report {
    pub fn new(dry_run: bool) -> Self {
        Self {
            dry_run,
            counts: [0; 3],
        }
    }

    /// One item: `created    PKI mount istio_ca/ (pki, max lease TTL 87600h)`.
    pub fn item(&mut self, outcome: Outcome, what: impl Display, detail: impl Display) {
        let label = match (outcome, self.dry_run) {
            (Outcome::Created, false) => "created",
            (Outcome::Created, true) => "would create",
            (Outcome::Updated, false) => "updated",
            (Outcome::Updated, true) => "would update",
            (Outcome::Unchanged, _) => "unchanged",
        };
        self.counts[outcome as usize] += 1;
        let detail = detail.to_string();
        if detail.is_empty() {
            eprintln!("{label:<13} {what}");
        } else {
            eprintln!("{label:<13} {what} ({detail})");
        }
    }

    pub fn summary(&self) {
        let [created, unchanged, updated] = self.counts;
        let verb = if self.dry_run { "would be " } else { "" };
        eprintln!(
            "{created} {verb}created, {updated} {verb}updated, {unchanged} unchanged{}",
            if self.dry_run {
                "; nothing was changed (dry run)"
            } else {
                ""
            }
        );
    }
}
