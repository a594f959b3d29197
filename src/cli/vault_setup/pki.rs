//! The CA side: the PKI mount and its issuer (a generated root or an
//! imported intermediate). The role and policy are [`super::role`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use x509_parser::prelude::*;
use zeroize::Zeroizing;

use super::client::{SetupError, VaultAdmin, Written};
use super::desired::{Desired, Want};
use super::report::{Outcome, Report};
use crate::cli::show_duration;
use crate::crypto::KeyType;

/// Where the mount's CA comes from.
pub enum CaSource {
    /// A root generated inside Vault (its key never leaves it).
    Generate {
        common_name: String,
        ttl: Duration,
        key_type: KeyType,
    },
    /// An intermediate (or root) whose key and certificate the operator holds.
    Bundle(CaBundle),
}

/// A `--ca-bundle` file, checked.
pub struct CaBundle {
    path: PathBuf,
    pem: Zeroizing<String>,
    /// Serial of the issuing certificate (the first), as hex without separators.
    serial: String,
    subject: String,
    certs: usize,
}

/// Lowercase hex without separators or leading zeros, so that Vault's
/// `24:aa:...` and x509-parser's spelling compare equal.
fn norm_serial(s: &str) -> String {
    let hex: String = s
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

impl CaBundle {
    /// Reads and checks the bundle: one private key, then the issuing CA
    /// certificate and its chain, each signed by the next, ending with a
    /// self-signed root (agents serve that root as `ROOTCA`).
    pub fn load(path: &Path) -> Result<Self, SetupError> {
        let what = format!("--ca-bundle {}", path.display());
        let bad = |r: String| SetupError::usage(&what, r);
        let pem = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?,
        );
        let mut keys = 0;
        let mut ders = Vec::new();
        for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
            let block = block.map_err(|e| bad(format!("malformed PEM: {e}")))?;
            match block.label.as_str() {
                "CERTIFICATE" => ders.push(block.contents),
                l if l.ends_with("PRIVATE KEY") => keys += 1,
                other => return Err(bad(format!("unexpected PEM block {other:?}"))),
            }
        }
        if keys != 1 {
            return Err(bad(format!(
                "must hold exactly one private key (the CA's), found {keys}"
            )));
        }
        let certs: Vec<X509Certificate<'_>> = ders
            .iter()
            .map(|d| {
                X509Certificate::from_der(d)
                    .map(|(_, c)| c)
                    .map_err(|e| bad(format!("not an X.509 certificate: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let Some(first) = certs.first() else {
            return Err(bad("holds no certificate".into()));
        };
        if !first.is_ca() {
            return Err(bad(format!(
                "its first certificate ({}) is not a CA certificate",
                first.subject()
            )));
        }
        for pair in certs.windows(2) {
            if pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .is_err()
            {
                return Err(bad(format!(
                    "{} is not signed by the next certificate, {}; order them from the CA up to the root",
                    pair[0].subject(),
                    pair[1].subject()
                )));
            }
        }
        let last = certs.last().expect("at least one");
        if last.subject() != last.issuer() || last.verify_signature(None).is_err() {
            return Err(bad(format!(
                "the chain ends with {}, issued by {}; add the root certificate at the end, \
                 so that agents can serve it as ROOTCA",
                last.subject(),
                last.issuer()
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            serial: norm_serial(&first.raw_serial_as_string()),
            subject: first.subject().to_string(),
            certs: certs.len(),
            pem,
        })
    }
}

/// The mount at `path` in the `sys/mounts` table, checked to be a PKI
/// mount; `None` when there is none.
pub fn existing_mount(
    table: &serde_json::Value,
    path: &str,
) -> Result<Option<serde_json::Value>, SetupError> {
    let table = if table["data"].is_object() {
        &table["data"]
    } else {
        table
    };
    let Some(mount) = table.get(format!("{path}/")) else {
        return Ok(None);
    };
    let found = mount["type"].as_str().unwrap_or("unknown");
    if found != "pki" {
        return Err(SetupError::WrongType {
            what: "a secrets engine",
            path: path.into(),
            found: found.into(),
            wanted: "pki",
            flag: "--pki-path",
        });
    }
    Ok(Some(mount.clone()))
}

/// Makes the PKI mount exist with the max lease TTL; returns true when it
/// was created by this run.
pub async fn ensure_mount(
    v: &VaultAdmin,
    report: &mut Report,
    path: &str,
    existing: Option<&serde_json::Value>,
    max_lease_ttl: Duration,
) -> Result<bool, SetupError> {
    let what = format!("PKI mount {path}/");
    let ttl = show_duration(max_lease_ttl);
    let Some(mount) = existing else {
        let body = json!({
            "type": "pki",
            "description": "mesh workload CA (node-agent vault-setup)",
            "config": { "max_lease_ttl": format!("{}s", max_lease_ttl.as_secs()) },
        });
        v.write(&format!("sys/mounts/{path}"), &body, &body).await?;
        report.item(Outcome::Created, what, format!("max lease TTL {ttl}"));
        return Ok(true);
    };
    let desired = Desired::new().with("max_lease_ttl", Want::Duration(max_lease_ttl));
    let changes = desired.diff(&mount["config"]);
    if changes.is_empty() {
        report.item(Outcome::Unchanged, what, format!("max lease TTL {ttl}"));
    } else {
        let c = &changes[0];
        v.write(
            &format!("sys/mounts/{path}/tune"),
            &desired.body(),
            &desired.shown(),
        )
        .await?;
        report.item(
            Outcome::Updated,
            what,
            format!("max lease TTL {} -> {}", c.from, c.to),
        );
    }
    Ok(false)
}

/// One issuer of the mount, from `LIST <pki>/issuers`.
struct Issuer {
    id: String,
    /// Normalised (see [`norm_serial`]) and as Vault shows it.
    serial: String,
    shown_serial: String,
    has_key: bool,
    is_default: bool,
}

async fn issuers(v: &VaultAdmin, pki: &str) -> Result<Vec<Issuer>, SetupError> {
    let Some(list) = v.list(&format!("{pki}/issuers")).await? else {
        return Ok(Vec::new());
    };
    let info = &list["data"]["key_info"];
    Ok(list["data"]["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str())
        .map(|id| {
            let i = &info[id];
            Issuer {
                id: id.to_string(),
                serial: norm_serial(i["serial_number"].as_str().unwrap_or_default()),
                shown_serial: i["serial_number"].as_str().unwrap_or_default().to_string(),
                has_key: !i["key_id"].as_str().unwrap_or_default().is_empty(),
                is_default: i["is_default"].as_bool().unwrap_or(false),
            }
        })
        .collect())
}

/// Gives the mount its CA: generates a root in an empty mount (an existing
/// CA is never replaced), or imports the bundle and makes it the default
/// issuer (earlier issuers stay, so certificates they signed still verify).
pub async fn ensure_ca(
    v: &VaultAdmin,
    report: &mut Report,
    pki: &str,
    ca: &CaSource,
    mount_fresh: bool,
) -> Result<(), SetupError> {
    let existing = if mount_fresh && v.dry_run() {
        Vec::new()
    } else {
        issuers(v, pki).await?
    };
    match ca {
        CaSource::Generate {
            common_name,
            ttl,
            key_type,
        } => {
            let what = format!("root CA of {pki}/");
            if let Some(default) = existing.iter().find(|i| i.is_default).or(existing.first()) {
                report.item(
                    Outcome::Unchanged,
                    what,
                    format!(
                        "the mount has {} issuer(s), default serial {}; a root is generated only in an empty mount",
                        existing.len(),
                        default.shown_serial
                    ),
                );
                return Ok(());
            }
            let (kt, bits) = match key_type {
                KeyType::EcP256 => ("ec", 256),
                KeyType::EcP384 => ("ec", 384),
                KeyType::Rsa2048 => ("rsa", 2048),
                KeyType::Rsa3072 => ("rsa", 3072),
                KeyType::Rsa4096 => ("rsa", 4096),
            };
            let body = json!({
                "common_name": common_name,
                "ttl": format!("{}s", ttl.as_secs()),
                "key_type": kt,
                "key_bits": bits,
            });
            let answer = v
                .write(&format!("{pki}/root/generate/internal"), &body, &body)
                .await?;
            let serial = match answer {
                Written::Sent(a) => format!(
                    ", serial {}",
                    a["data"]["serial_number"].as_str().unwrap_or("?")
                ),
                Written::DryRun => String::new(),
            };
            report.item(
                Outcome::Created,
                what,
                format!(
                    "{common_name:?}, {key_type}, valid {}{serial}",
                    show_duration(*ttl)
                ),
            );
            Ok(())
        }
        CaSource::Bundle(b) => {
            let what = format!("CA of {pki}/ from {}", b.path.display());
            let detail = |s: &str| format!("{s}{}, serial {}", b.subject, b.serial);
            if let Some(i) = existing.iter().find(|i| i.serial == b.serial && i.has_key) {
                if i.is_default {
                    report.item(Outcome::Unchanged, what, detail("default issuer "));
                } else {
                    set_default(v, pki, &i.id).await?;
                    report.item(Outcome::Updated, what, detail("made the default issuer: "));
                }
                return Ok(());
            }
            let shown = json!({ "pem_bundle": format!(
                "<redacted: private key and {} certificate(s) from {}>",
                b.certs,
                b.path.display()
            ) });
            let body = json!({ "pem_bundle": b.pem.as_str() });
            let imported = v
                .write(&format!("{pki}/issuers/import/bundle"), &body, &shown)
                .await?;
            let id = match imported {
                Written::DryRun => "<id of the imported issuer>".to_string(),
                Written::Sent(_) => issuers(v, pki)
                    .await?
                    .into_iter()
                    .find(|i| i.serial == b.serial && i.has_key)
                    .map(|i| i.id)
                    .ok_or_else(|| {
                        SetupError::Conflict(format!(
                            "after importing {} into {pki}/, no issuer with serial {} has a key: \
                             the bundle's private key does not belong to its first certificate",
                            b.path.display(),
                            b.serial
                        ))
                    })?,
            };
            set_default(v, pki, &id).await?;
            let outcome = if existing.is_empty() {
                Outcome::Created
            } else {
                Outcome::Updated
            };
            let note = if existing.is_empty() {
                ""
            } else {
                "; the earlier issuers stay, so what they signed still verifies"
            };
            report.item(
                outcome,
                what,
                detail(&format!("imported as default issuer{note}: ")),
            );
            Ok(())
        }
    }
}

async fn set_default(v: &VaultAdmin, pki: &str, id: &str) -> Result<(), SetupError> {
    let body = json!({ "default": id });
    v.write(&format!("{pki}/config/issuers"), &body, &body)
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_across_spellings() {
        assert_eq!(norm_serial("04:5C:08"), norm_serial("45c08"));
        assert_eq!(norm_serial("00"), "0");
    }
}
