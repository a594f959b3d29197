//! What one Vault object should hold, field by field, compared with what it
//! holds: the basis of "created / unchanged / updated". Vault answers reads in
//! its own shapes (durations as seconds, empty lists as `null`, PEM without
//! its last newline), so each field is compared by its kind, not as text.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::cli::show_duration;

/// The wanted value of one field.
#[derive(Debug, Clone)]
pub enum Want {
    Str(String),
    Bool(bool),
    /// Sent as `"<n>s"`; Vault reads back seconds.
    Duration(Duration),
    /// Compared as a set.
    List(Vec<String>),
    /// Claim → list of allowed values (jwt `bound_claims`), lists compared as sets.
    ListMap(BTreeMap<String, Vec<String>>),
    /// Claim → metadata key (jwt `claim_mappings`).
    StrMap(BTreeMap<String, String>),
    /// A secret Vault never reads back; it reports only whether one is set
    /// (in field `set_flag`). `None` means: none should be set.
    WriteOnly {
        value: Option<String>,
        set_flag: &'static str,
    },
}

/// One field that differs: its name and both values, fit to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub field: &'static str,
    pub from: String,
    pub to: String,
}

/// The wanted fields of one Vault object, in the order they are sent.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    fields: Vec<(&'static str, Want)>,
}

impl Desired {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, field: &'static str, want: Want) -> Self {
        self.fields.push((field, want));
        self
    }

    pub fn str(self, field: &'static str, v: impl Into<String>) -> Self {
        self.with(field, Want::Str(v.into()))
    }

    pub fn bool(self, field: &'static str, v: bool) -> Self {
        self.with(field, Want::Bool(v))
    }

    pub fn list<S: AsRef<str>>(self, field: &'static str, v: &[S]) -> Self {
        self.with(
            field,
            Want::List(v.iter().map(|s| s.as_ref().to_string()).collect()),
        )
    }

    /// The JSON body to write; `redact` replaces secrets and shortens PEM
    /// (for `--dry-run` and messages).
    fn to_json(&self, redact: bool) -> Value {
        let mut m = Map::new();
        for (k, want) in &self.fields {
            let v = match want {
                Want::Str(s) if redact => json!(shorten(s)),
                Want::Str(s) => json!(s),
                Want::Bool(b) => json!(b),
                Want::Duration(d) => json!(format!("{}s", d.as_secs())),
                Want::List(l) if redact => json!(l.iter().map(|s| shorten(s)).collect::<Vec<_>>()),
                Want::List(l) => json!(l),
                Want::ListMap(m) => json!(m),
                Want::StrMap(m) => json!(m),
                Want::WriteOnly { value: None, .. } => continue,
                Want::WriteOnly { value: Some(_), .. } if redact => json!("<redacted>"),
                Want::WriteOnly { value: Some(s), .. } => json!(s),
            };
            m.insert(k.to_string(), v);
        }
        Value::Object(m)
    }

    pub fn body(&self) -> Value {
        self.to_json(false)
    }

    pub fn shown(&self) -> Value {
        self.to_json(true)
    }

    /// The fields whose value in `current` (Vault's `data`) differs.
    pub fn diff(&self, current: &Value) -> Vec<Change> {
        let mut out = Vec::new();
        for (field, want) in &self.fields {
            let have = &current[*field];
            let changed = match want {
                Want::Str(s) => {
                    let h = have.as_str().unwrap_or_default();
                    (h.trim() != s.trim()).then(|| (show_str(h), show_str(s)))
                }
                Want::Bool(b) => {
                    (have.as_bool() != Some(*b)).then(|| (have.to_string(), b.to_string()))
                }
                Want::Duration(d) => {
                    let h = seconds(have);
                    (h != Some(d.as_secs())).then(|| {
                        let from = h.map_or_else(
                            || have.to_string(),
                            |s| show_duration(Duration::from_secs(s)),
                        );
                        (from, show_duration(*d))
                    })
                }
                Want::List(l) => {
                    let h = string_list(have);
                    (sorted(&h) != sorted(l)).then(|| (show_list(&h), show_list(l)))
                }
                Want::ListMap(m) => {
                    let h: BTreeMap<String, Vec<String>> = have
                        .as_object()
                        .map(|o| {
                            o.iter()
                                .map(|(k, v)| (k.clone(), sorted(&string_list(v))))
                                .collect()
                        })
                        .unwrap_or_default();
                    let w: BTreeMap<String, Vec<String>> =
                        m.iter().map(|(k, v)| (k.clone(), sorted(v))).collect();
                    (h != w).then(|| (json!(h).to_string(), json!(w).to_string()))
                }
                Want::StrMap(m) => {
                    let h: BTreeMap<String, String> = have
                        .as_object()
                        .map(|o| {
                            o.iter()
                                .map(|(k, v)| {
                                    (k.clone(), v.as_str().unwrap_or_default().to_string())
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    (h != *m).then(|| (json!(h).to_string(), json!(m).to_string()))
                }
                Want::WriteOnly { value, set_flag } => {
                    let is_set = current[*set_flag].as_bool().unwrap_or(false);
                    match (is_set, value.is_some()) {
                        (false, true) => Some(("unset".into(), "set".into())),
                        (true, false) => Some(("set".into(), "unset".into())),
                        // Set on both sides: Vault never shows it, so it
                        // cannot be compared; the caller decides.
                        _ => None,
                    }
                }
            };
            if let Some((from, to)) = changed {
                out.push(Change { field, from, to });
            }
        }
        out
    }

    /// Write-only fields that are set on both sides and so could not be compared.
    pub fn unverifiable(&self, current: &Value) -> Vec<&'static str> {
        self.fields
            .iter()
            .filter_map(|(field, want)| match want {
                Want::WriteOnly {
                    value: Some(_),
                    set_flag,
                } if current[*set_flag].as_bool() == Some(true) => Some(*field),
                _ => None,
            })
            .collect()
    }
}

/// Seconds from Vault's answer: a number, or a duration string.
fn seconds(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse::<u64>().ok().or_else(|| {
            crate::duration::parse_go_duration(s)
                .ok()
                .map(|d| d.as_secs())
        }),
        _ => None,
    }
}

/// A list from Vault's answer: `null` is empty; a single string (Vault
/// accepts comma lists) is split.
fn string_list(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(|s| s.trim().to_string()))
            .collect(),
        Value::String(s) if !s.is_empty() => s.split(',').map(|p| p.trim().to_string()).collect(),
        _ => Vec::new(),
    }
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.trim().to_string()).collect();
    v.sort();
    v.dedup();
    v
}

fn show_list(v: &[String]) -> String {
    format!(
        "[{}]",
        v.iter().map(|s| shorten(s)).collect::<Vec<_>>().join(", ")
    )
}

fn show_str(s: &str) -> String {
    if s.is_empty() {
        return "\"\"".into();
    }
    let s = shorten(&crate::cli::one_line(s));
    if s.chars().count() > 80 {
        format!("{}...", s.chars().take(77).collect::<String>())
    } else {
        s
    }
}

/// PEM, shortened for printing (it is long and says little on one line).
pub fn shorten(s: &str) -> String {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix("-----BEGIN ") {
        let label = rest.split("-----").next().unwrap_or("PEM");
        let blocks = s.matches("-----BEGIN ").count();
        return format!("<PEM {label}, {blocks} block(s), {} bytes>", s.len());
    }
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role() -> Desired {
        Desired::new()
            .list("bound_service_account_names", &["sleep", "httpbin"])
            .with("token_ttl", Want::Duration(Duration::from_secs(3600)))
            .str("token_type", "batch")
            .bool("no_store", true)
            .with(
                "token_reviewer_jwt",
                Want::WriteOnly {
                    value: Some("eyJ.secret.jwt".into()),
                    set_flag: "token_reviewer_jwt_set",
                },
            )
    }

    #[test]
    fn equal_in_vaults_own_shapes() {
        let current = json!({
            "bound_service_account_names": ["httpbin", "sleep"],
            "token_ttl": 3600,
            "token_type": "batch",
            "no_store": true,
            "token_reviewer_jwt_set": true,
        });
        assert_eq!(role().diff(&current), vec![]);
        assert_eq!(role().unverifiable(&current), vec!["token_reviewer_jwt"]);
    }

    #[test]
    fn each_difference_is_named() {
        let current = json!({
            "bound_service_account_names": null,
            "token_ttl": 7200,
            "token_type": "service",
            "no_store": false,
        });
        let fields: Vec<_> = role().diff(&current).into_iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            [
                "bound_service_account_names",
                "token_ttl",
                "token_type",
                "no_store",
                "token_reviewer_jwt"
            ]
        );
        let ttl = &role().diff(&current)[1];
        assert_eq!((ttl.from.as_str(), ttl.to.as_str()), ("2h", "1h"));
    }

    #[test]
    fn secrets_never_shown() {
        let shown = role().shown().to_string();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(role().body().to_string().contains("eyJ.secret.jwt"));
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        assert_eq!(shorten(pem), "<PEM CERTIFICATE, 1 block(s), 58 bytes>");
    }

    #[test]
    fn maps_compare_as_sets() {
        let d = Desired::new().with(
            "bound_claims",
            Want::ListMap(BTreeMap::from([(
                "/a".to_string(),
                vec!["x".into(), "y".into()],
            )])),
        );
        assert!(d
            .diff(&json!({"bound_claims": {"/a": ["y", "x"]}}))
            .is_empty());
        assert_eq!(d.diff(&json!({"bound_claims": {"/a": ["y"]}})).len(), 1);
    }
}
