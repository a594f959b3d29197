use super::*;
use std::collections::HashMap;

fn cfg(vars: &[(&str, &str)], file: Option<&str>) -> Result<Option<FederationConfig>, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let mut map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Some(text) = file {
        let p = dir.path().join("federation.json");
        std::fs::write(&p, text).unwrap();
        map.insert("FEDERATION_CONFIG".into(), p.display().to_string());
    }
    federation_from_lookup(&|k: &str| map.get(k).cloned(), "cluster.local")
}

#[test]
fn off_unless_configured_with_bounds_by_default() {
    assert_eq!(cfg(&[], None).unwrap(), None);
    let c = cfg(&[], Some(r#"{"trust_domains": {}}"#)).unwrap().unwrap();
    assert!(c.domains.is_empty());
    assert_eq!(
        (c.refresh_min, c.refresh_max, c.max_bundle_bytes),
        (
            DEFAULT_REFRESH_MIN,
            DEFAULT_REFRESH_MAX,
            DEFAULT_MAX_BUNDLE_BYTES
        )
    );
}

#[test]
fn each_source_kind_is_read() {
    let c = cfg(
        &[
            ("FEDERATION_REFRESH_MIN", "2s"),
            ("FEDERATION_REFRESH_MAX", "10m"),
            ("FEDERATION_MAX_BUNDLE_BYTES", "65536"),
        ],
        Some(
            r#"{"trust_domains": {
                "other.example": {"bundle_endpoint_url": "https://b.other.example/",
                                  "bundle_endpoint_profile": "https_web",
                                  "ca_file": "/etc/ca.pem"},
                "web.example": {"bundle_endpoint_url": "https://b.web.example",
                                "bundle_endpoint_profile": "https_web"},
                "spire.example": {"bundle_endpoint_url": "https://spire.example:8443",
                                  "bundle_endpoint_profile": "https_spiffe",
                                  "endpoint_spiffe_id": "spiffe://spire.example/spire/server",
                                  "bootstrap_bundle": "/etc/spire.pem"},
                "static.example": {"bundle_file": "/etc/static.json"}
            }}"#,
        ),
    )
    .unwrap()
    .unwrap();
    assert_eq!(c.refresh_min, Duration::from_secs(2));
    assert_eq!(c.refresh_max, Duration::from_secs(600));
    assert_eq!(c.max_bundle_bytes, 65536);
    let by: BTreeMap<&str, &BundleSource> = c
        .domains
        .iter()
        .map(|d| (d.trust_domain.as_str(), &d.source))
        .collect();
    assert_eq!(
        by["other.example"],
        &BundleSource::HttpsWeb {
            url: "https://b.other.example/".into(),
            ca_file: Some("/etc/ca.pem".into())
        }
    );
    assert!(matches!(
        by["web.example"],
        BundleSource::HttpsWeb { ca_file: None, .. }
    ));
    assert_eq!(
        by["spire.example"],
        &BundleSource::HttpsSpiffe {
            url: "https://spire.example:8443".into(),
            endpoint_spiffe_id: "spiffe://spire.example/spire/server".into(),
            bootstrap_bundle: "/etc/spire.pem".into()
        }
    );
    assert_eq!(
        by["static.example"],
        &BundleSource::File {
            path: "/etc/static.json".into()
        }
    );
}

#[test]
fn mistakes_are_refused_naming_the_setting_and_the_domain() {
    let web = r#""bundle_endpoint_profile": "https_web""#;
    for (file, says) in [
        ("not json", "not a federation file"),
        (r#"{"domains": {}}"#, "unknown field"),
        (
            r#"{"trust_domains": {"Bad.Example": {"bundle_file": "/x"}}}"#,
            "not a trust domain",
        ),
        (
            r#"{"trust_domains": {"cluster.local": {"bundle_file": "/x"}}}"#,
            "own trust domain",
        ),
        (r#"{"trust_domains": {"o.example": {}}}"#, "o.example: give"),
        (
            &format!(
                r#"{{"trust_domains": {{"o.example": {{"bundle_endpoint_url": "http://x", {web}}}}}}}"#
            ),
            "must start with https://",
        ),
        (
            r#"{"trust_domains": {"o.example": {"bundle_endpoint_url": "https://x"}}}"#,
            "needs bundle_endpoint_profile",
        ),
        (
            r#"{"trust_domains": {"o.example": {"bundle_endpoint_url": "https://x", "bundle_endpoint_profile": "https_spiffe", "bootstrap_bundle": "/b"}}}"#,
            "needs endpoint_spiffe_id",
        ),
        (
            r#"{"trust_domains": {"o.example": {"bundle_endpoint_url": "https://x", "bundle_endpoint_profile": "https_spiffe", "endpoint_spiffe_id": "spiffe://o.example/s"}}}"#,
            "needs bootstrap_bundle",
        ),
        (
            r#"{"trust_domains": {"o.example": {"bundle_endpoint_url": "https://x", "bundle_endpoint_profile": "https_spiffe", "endpoint_spiffe_id": "o.example", "bootstrap_bundle": "/b"}}}"#,
            "not a SPIFFE ID",
        ),
        (
            r#"{"trust_domains": {"o.example": {"bundle_endpoint_url": "https://x", "bundle_endpoint_profile": "ftp"}}}"#,
            "not https_web or https_spiffe",
        ),
        (
            r#"{"trust_domains": {"o.example": {"bundle_file": "/x", "bundle_endpoint_url": "https://x"}}}"#,
            "not both",
        ),
        (
            r#"{"trust_domains": {"o.example": {"bundle_file": "/x", "ca_file": "/c"}}}"#,
            "takes no endpoint settings",
        ),
    ] {
        let e = cfg(&[], Some(file)).unwrap_err();
        assert_eq!(e.var, "FEDERATION_CONFIG");
        assert!(e.reason.contains(says), "{file}: {}", e.reason);
    }
    for (var, bad) in [
        ("FEDERATION_REFRESH_MIN", "0"),
        ("FEDERATION_REFRESH_MAX", "1s"),
        ("FEDERATION_MAX_BUNDLE_BYTES", "12"),
    ] {
        assert_eq!(
            cfg(&[(var, bad)], None).unwrap_err().var,
            var,
            "{var}={bad}"
        );
    }
    let mut map = HashMap::new();
    map.insert(
        "FEDERATION_CONFIG".to_string(),
        "/nonexistent/f.json".to_string(),
    );
    let e = federation_from_lookup(&|k: &str| map.get(k).cloned(), "cluster.local").unwrap_err();
    assert!(e.reason.contains("cannot read"), "{e:?}");
}
