//! How `fetch` shows resources: text for people, PEM and JSON for scripts.
//! The private key is written only as PEM or JSON, and only with
//! `--include-key`.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use super::inspect::{CertInfo, Resource};

/// `2025-11-28 02:15:34 UTC`.
pub fn show_time(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `23h59m left`, `3d4h left`, `expired 5m12s ago`, `not valid for 30s yet`.
pub fn time_left(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> String {
    if now < not_before {
        let d = not_before.duration_since(now).unwrap_or_default();
        return format!("not valid for {} yet", span(d));
    }
    match not_after.duration_since(now) {
        Ok(d) => format!("{} left", span(d)),
        Err(e) => format!("expired {} ago", span(e.duration())),
    }
}

/// A span in the two largest units: `3d4h`, `23h59m`, `4m12s`, `9s`.
pub fn span(d: Duration) -> String {
    let s = d.as_secs();
    let (days, h, m, sec) = (s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60);
    if days > 0 {
        format!("{days}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{sec}s")
    } else {
        format!("{sec}s")
    }
}

fn show_subject(s: &str) -> &str {
    if s.is_empty() {
        "(empty)"
    } else {
        s
    }
}

fn cert_text(out: &mut String, c: &CertInfo, now: SystemTime, indent: &str) {
    let uris = if c.uri_sans.is_empty() {
        "(none)".to_string()
    } else {
        c.uri_sans.join(", ")
    };
    let mut kind = Vec::new();
    if c.is_ca {
        kind.push("CA");
    }
    if c.self_signed {
        kind.push("self-signed");
    }
    let mut line = |label: &str, value: &str| {
        let _ = writeln!(out, "{indent}{:<12}{value}", format!("{label}:"));
    };
    line("subject", show_subject(&c.subject));
    line("URI SANs", &uris);
    if !c.other_sans.is_empty() {
        line("other SANs", &c.other_sans.join(", "));
    }
    line("serial", &c.serial);
    let kind = if kind.is_empty() {
        String::new()
    } else {
        format!(" ({})", kind.join(", "))
    };
    line("key type", &format!("{}{kind}", c.key_type));
    line("issuer", show_subject(&c.issuer));
    line("not before", &show_time(c.not_before));
    line(
        "not after",
        &format!(
            "{} ({})",
            show_time(c.not_after),
            time_left(c.not_before, c.not_after, now)
        ),
    );
}

/// The human view of one response.
pub fn text(resources: &[Resource], version: &str, now: SystemTime) -> String {
    let mut out = String::new();
    for r in resources {
        match r {
            Resource::Certificate {
                name,
                chain,
                key_type,
                check,
                ..
            } => {
                let _ = writeln!(
                    out,
                    "{name}: certificate chain of {} (version {version})",
                    chain.len()
                );
                for (i, c) in chain.iter().enumerate() {
                    let role = match i {
                        0 => "certificate",
                        _ if c.self_signed => "root",
                        _ => "intermediate",
                    };
                    let _ = writeln!(out, "  [{i}] {role}");
                    cert_text(&mut out, c, now, "      ");
                }
                let _ = writeln!(out, "  chain:");
                for c in chain {
                    let name = c
                        .uri_sans
                        .first()
                        .cloned()
                        .unwrap_or_else(|| show_subject(&c.subject).to_string());
                    let by = if c.self_signed {
                        "(self-signed)".to_string()
                    } else {
                        format!("issued by  {}", show_subject(&c.issuer))
                    };
                    let _ = writeln!(out, "    {name}  {by}");
                }
                let _ = writeln!(
                    out,
                    "  private key: {key_type}, PKCS#8 (not shown; -o pem or -o json with --include-key writes it)"
                );
                match check {
                    Some(Ok(from)) if from.is_empty() => {
                        let _ = writeln!(out, "  check: the key matches the certificate (no roots asked for: the chain was not checked)");
                    }
                    Some(Ok(from)) => {
                        let _ = writeln!(out, "  check: the key matches the certificate, which is valid now and chains to a root served in {from}");
                    }
                    Some(Err(e)) => {
                        let _ = writeln!(out, "  check: FAILED: {e}");
                    }
                    None => {}
                }
            }
            Resource::Roots { name, roots } => {
                let _ = writeln!(
                    out,
                    "{name}: {} trusted root(s) (version {version})",
                    roots.len()
                );
                for (i, c) in roots.iter().enumerate() {
                    let _ = writeln!(out, "  [{i}] root");
                    cert_text(&mut out, c, now, "      ");
                }
            }
            Resource::TrustDomains { name, domains } => {
                let _ = writeln!(
                    out,
                    "{name}: {} trust domain(s), for Envoy's SPIFFE validator (version {version})",
                    domains.len()
                );
                let own = own_trust_domain(resources);
                for (td, roots) in domains {
                    let whose = match &own {
                        Some(o) if o == td => " (this mesh)",
                        Some(_) => " (federated)",
                        None => "",
                    };
                    let _ = writeln!(out, "  {td}{whose}: {} root(s)", roots.len());
                    for (i, c) in roots.iter().enumerate() {
                        let _ = writeln!(out, "    [{i}] root");
                        cert_text(&mut out, c, now, "        ");
                    }
                }
            }
        }
    }
    out
}

/// The trust domain of the certificate served beside, if one was asked for.
fn own_trust_domain(resources: &[Resource]) -> Option<String> {
    resources.iter().find_map(|r| match r {
        Resource::Certificate { chain, .. } => super::inspect::leaf_trust_domain(chain),
        _ => None,
    })
}

/// The PEM blocks of one response: chains (and keys, when asked) then roots,
/// in the order of the resources; a root `ALL` serves that `ROOTCA` already
/// wrote is not written again.
pub fn pem(resources: &[Resource], include_key: bool) -> String {
    let mut out = String::new();
    let mut roots_written: Vec<&str> = Vec::new();
    for r in resources {
        match r {
            Resource::Certificate { chain, key_pem, .. } => {
                for c in chain {
                    out.push_str(&c.pem);
                }
                if include_key {
                    out.push_str(key_pem.trim_end());
                    out.push('\n');
                }
            }
            Resource::Roots { roots, .. } => {
                for c in roots {
                    out.push_str(&c.pem);
                    roots_written.push(&c.pem);
                }
            }
            Resource::TrustDomains { domains, .. } => {
                for c in domains.iter().flat_map(|(_, roots)| roots) {
                    if !roots_written.contains(&c.pem.as_str()) {
                        out.push_str(&c.pem);
                        roots_written.push(&c.pem);
                    }
                }
            }
        }
    }
    out
}

fn cert_json(c: &CertInfo, now: SystemTime) -> Value {
    json!({
        "subject": c.subject,
        "uri_sans": c.uri_sans,
        "other_sans": c.other_sans,
        "serial": c.serial,
        "key_type": c.key_type,
        "issuer": c.issuer,
        "is_ca": c.is_ca,
        "self_signed": c.self_signed,
        "not_before": rfc3339(c.not_before),
        "not_after": rfc3339(c.not_after),
        "seconds_left": c.not_after.duration_since(now).map(|d| d.as_secs() as i64)
            .unwrap_or_else(|e| -(e.duration().as_secs() as i64)),
        "pem": c.pem,
    })
}

/// Everything `text` shows, as one JSON document.
pub fn json(resources: &[Resource], version: &str, include_key: bool, now: SystemTime) -> Value {
    let items: Vec<Value> = resources
        .iter()
        .map(|r| match r {
            Resource::Certificate {
                name,
                chain,
                key_pem,
                key_type,
                check,
            } => {
                let mut key = json!({ "key_type": key_type, "format": "PKCS#8" });
                if include_key {
                    key["pem"] = json!(key_pem.as_str());
                }
                json!({
                    "name": name,
                    "certificates": chain.iter().map(|c| cert_json(c, now)).collect::<Vec<_>>(),
                    "private_key": key,
                    "check": match check {
                        Some(Ok(from)) if from.is_empty() => json!({ "ok": true }),
                        Some(Ok(from)) => json!({ "ok": true, "roots_from": from }),
                        Some(Err(e)) => json!({ "ok": false, "error": e }),
                        None => Value::Null,
                    },
                })
            }
            Resource::Roots { name, roots } => json!({
                "name": name,
                "roots": roots.iter().map(|c| cert_json(c, now)).collect::<Vec<_>>(),
            }),
            Resource::TrustDomains { name, domains } => json!({
                "name": name,
                "trust_domains": domains.iter().map(|(td, roots)| json!({
                    "name": td,
                    "roots": roots.iter().map(|c| cert_json(c, now)).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
        })
        .collect();
    json!({
        "version": version,
        "received_at": rfc3339(now),
        "resources": items,
    })
}

/// What changed between two pushes, for `--watch`: `default: serial A -> B`.
pub fn changes(before: &[Resource], after: &[Resource]) -> Vec<String> {
    let mut out = Vec::new();
    for a in after {
        let Some(b) = before.iter().find(|b| b.name() == a.name()) else {
            continue;
        };
        match (b, a) {
            (Resource::Certificate { chain: cb, .. }, Resource::Certificate { chain: ca, .. }) => {
                let (sb, sa) = (
                    cb.first().map(|c| c.serial.as_str()).unwrap_or("-"),
                    ca.first().map(|c| c.serial.as_str()).unwrap_or("-"),
                );
                if sb != sa {
                    out.push(format!("{}: rotated, serial {sb} -> {sa}", a.name()));
                }
            }
            (Resource::Roots { roots: rb, .. }, Resource::Roots { roots: ra, .. }) => {
                let added = ra
                    .iter()
                    .filter(|r| !rb.iter().any(|o| o.pem == r.pem))
                    .count();
                let removed = rb
                    .iter()
                    .filter(|r| !ra.iter().any(|o| o.pem == r.pem))
                    .count();
                if added + removed > 0 {
                    out.push(format!(
                        "{}: {added} root(s) added, {removed} removed",
                        a.name()
                    ));
                }
            }
            (
                Resource::TrustDomains { domains: db, .. },
                Resource::TrustDomains { domains: da, .. },
            ) => out.extend(domain_changes(a.name(), db, da)),
            _ => {}
        }
    }
    out
}

/// What changed in `ALL`: trust domains added or removed, roots of one
/// added or removed.
fn domain_changes(
    name: &str,
    before: &[(String, Vec<CertInfo>)],
    after: &[(String, Vec<CertInfo>)],
) -> Vec<String> {
    let mut out = Vec::new();
    for (td, ra) in after {
        match before.iter().find(|(b, _)| b == td) {
            None => out.push(format!(
                "{name}: trust domain {td} added ({} root(s))",
                ra.len()
            )),
            Some((_, rb)) => {
                let added = ra.iter().filter(|r| !rb.iter().any(|o| o.pem == r.pem));
                let removed = rb.iter().filter(|r| !ra.iter().any(|o| o.pem == r.pem));
                let (added, removed) = (added.count(), removed.count());
                if added + removed > 0 {
                    out.push(format!(
                        "{name}: {td}: {added} root(s) added, {removed} removed"
                    ));
                }
            }
        }
    }
    for (td, _) in before {
        if !after.iter().any(|(a, _)| a == td) {
            out.push(format!("{name}: trust domain {td} removed"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_time_left() {
        assert_eq!(span(Duration::from_secs(3 * 86400 + 4 * 3600 + 5)), "3d4h");
        assert_eq!(span(Duration::from_secs(23 * 3600 + 59 * 60 + 1)), "23h59m");
        assert_eq!(span(Duration::from_secs(252)), "4m12s");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t1 = t0 + Duration::from_secs(3600);
        assert_eq!(
            time_left(t0, t1, t0 + Duration::from_secs(60)),
            "59m0s left"
        );
        assert_eq!(
            time_left(t0, t1, t1 + Duration::from_secs(9)),
            "expired 9s ago"
        );
        assert_eq!(
            time_left(t0, t1, t0 - Duration::from_secs(30)),
            "not valid for 30s yet"
        );
        assert_eq!(show_time(t0), "1970-01-12 13:46:40 UTC");
    }

    #[test]
    fn all_shows_each_trust_domain_and_its_roots() {
        use super::super::inspect::certs;
        let root =
            |td: &str| certs(crate::ca::local::LocalCa::new(None, td).unwrap().root_pem()).unwrap();
        let (own, other) = (root("td"), root("other.example"));
        let all = |domains: Vec<(String, Vec<CertInfo>)>| Resource::TrustDomains {
            name: "ALL".into(),
            domains,
        };
        let before = [
            Resource::Roots {
                name: "ROOTCA".into(),
                roots: own.clone(),
            },
            all(vec![("td".into(), own.clone())]),
        ];
        let after = [
            Resource::Roots {
                name: "ROOTCA".into(),
                roots: own.clone(),
            },
            all(vec![
                ("other.example".into(), other.clone()),
                ("td".into(), own.clone()),
            ]),
        ];
        let now = SystemTime::now();
        let t = text(&after, "v1", now);
        assert!(
            t.contains("ALL: 2 trust domain(s), for Envoy's SPIFFE validator (version v1)"),
            "{t}"
        );
        assert!(
            t.contains("  other.example: 1 root(s)\n    [0] root\n"),
            "{t}"
        );
        assert!(
            t.contains(&format!("subject:    {}", other[0].subject)),
            "{t}"
        );
        // Each root once: ROOTCA's, then the federated one.
        assert_eq!(
            pem(&after, false),
            format!("{}{}", own[0].pem, other[0].pem)
        );
        let j = json(&after, "v1", false, now);
        assert_eq!(
            j["resources"][1]["trust_domains"][0]["name"],
            "other.example"
        );
        assert_eq!(
            j["resources"][1]["trust_domains"][0]["roots"][0]["pem"],
            other[0].pem.as_str()
        );
        assert_eq!(
            changes(&before, &after),
            ["ALL: trust domain other.example added (1 root(s))"]
        );
        assert_eq!(
            changes(&after, &before),
            ["ALL: trust domain other.example removed"]
        );
    }
}
