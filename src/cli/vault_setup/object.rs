//! One Vault object at one path (a role, a policy, an auth configuration):
//! read it, compare it with what it should hold, write it only when it is
//! missing or differs, and report which.

use super::client::{SetupError, VaultAdmin};
use super::desired::Desired;
use super::report::{Outcome, Report};

/// How to treat one object.
pub struct Object<'a> {
    /// What the report calls it, e.g. `PKI role istio_ca/roles/istio-pki-role`.
    pub what: String,
    pub path: String,
    pub desired: &'a Desired,
    /// Its mount was created by this run: it cannot exist yet (and with
    /// `--dry-run` the mount is not there to be read).
    pub fresh: bool,
    /// Write write-only fields even when Vault says one is set.
    pub rewrite_secrets: bool,
}

impl Object<'_> {
    /// Makes the object hold `desired`, returning what was done.
    pub async fn ensure(&self, v: &VaultAdmin, report: &mut Report) -> Result<Outcome, SetupError> {
        let current = if self.fresh && v.dry_run() {
            None
        } else {
            v.read(&self.path).await?
        };
        let data = current
            .as_ref()
            .map(|c| &c["data"])
            .filter(|d| d.is_object());
        let (outcome, detail) = match data {
            None => (Outcome::Created, String::new()),
            Some(_) if self.fresh => (Outcome::Created, String::new()),
            Some(data) => {
                let changes = self.desired.diff(data);
                let unverifiable = self.desired.unverifiable(data);
                if changes.is_empty() && (unverifiable.is_empty() || !self.rewrite_secrets) {
                    let note = if unverifiable.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "{} is write-only in Vault and was kept; pass --replace-{} to write it again",
                            unverifiable.join(", "),
                            unverifiable[0].replace('_', "-")
                        )
                    };
                    report.item(Outcome::Unchanged, &self.what, note);
                    return Ok(Outcome::Unchanged);
                }
                let mut detail: Vec<String> = changes
                    .iter()
                    .map(|c| format!("{}: {} -> {}", c.field, c.from, c.to))
                    .collect();
                if changes.is_empty() {
                    detail.extend(unverifiable.iter().map(|f| format!("{f}: replaced")));
                }
                (Outcome::Updated, detail.join("; "))
            }
        };
        v.write(&self.path, &self.desired.body(), &self.desired.shown())
            .await?;
        report.item(outcome, &self.what, detail);
        Ok(outcome)
    }
}
