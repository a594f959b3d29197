//! `/debug/identities`: the cached identities as JSON. Built only from
//! [`IdentityReport`], which holds nothing secret: no key, JWT or token can
//! reach this page.

use serde_json::{json, Value};

use crate::metrics::{AgentReport, IdentityReport};
use crate::secrets::rfc3339;

/// The page: the cached identities sorted by SPIFFE ID, and the CA queue.
pub fn identities_json(report: &dyn AgentReport) -> String {
    let mut list = report.identities();
    list.sort_by(|a, b| a.identity.cmp(&b.identity));
    let doc = json!({
        "identities_cached": list.len(),
        "ca_queue_depth": report.ca_queue_depth(),
        "identities": list.iter().map(entry).collect::<Vec<_>>(),
    });
    format!("{doc:#}\n")
}

fn entry(i: &IdentityReport) -> Value {
    json!({
        "identity": i.identity,
        "key_type": i.key_type,
        "serial": i.serial,
        "not_after": i.not_after.map(rfc3339),
        "renew_at": i.renew_at.map(rfc3339),
        "streams_open": i.streams_open,
        "last_error": i.last_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    struct Two;

    impl AgentReport for Two {
        fn identities(&self) -> Vec<IdentityReport> {
            let at = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
            vec![
                IdentityReport {
                    identity: "spiffe://td/ns/b/sa/b".into(),
                    key_type: "ec-p256".into(),
                    last_error: Some("Vault unavailable".into()),
                    ..Default::default()
                },
                IdentityReport {
                    identity: "spiffe://td/ns/a/sa/a".into(),
                    key_type: "ec-p256".into(),
                    serial: Some("0a:1b".into()),
                    not_after: Some(at),
                    renew_at: Some(at - Duration::from_secs(60)),
                    renewal_due: Some(at - Duration::from_secs(60)),
                    streams_open: 2,
                    last_error: None,
                },
            ]
        }
        fn ca_queue_depth(&self) -> usize {
            4
        }
        fn now(&self) -> SystemTime {
            SystemTime::UNIX_EPOCH
        }
    }

    #[test]
    fn every_field_sorted_by_identity() {
        let doc: Value = serde_json::from_str(&identities_json(&Two)).unwrap();
        assert_eq!(doc["identities_cached"], 2);
        assert_eq!(doc["ca_queue_depth"], 4);
        let a = &doc["identities"][0];
        assert_eq!(a["identity"], "spiffe://td/ns/a/sa/a");
        assert_eq!(a["serial"], "0a:1b");
        assert_eq!(a["not_after"], "2033-05-18T03:33:20Z");
        assert_eq!(a["renew_at"], "2033-05-18T03:32:20Z");
        assert_eq!(a["streams_open"], 2);
        assert_eq!(a["key_type"], "ec-p256");
        assert_eq!(a["last_error"], Value::Null);
        let b = &doc["identities"][1];
        assert_eq!(b["serial"], Value::Null);
        assert_eq!(b["last_error"], "Vault unavailable");
    }
}
