//! The SDS resources node-agent serves and how they are encoded:
//! `default` (the workload's certificate and key), `ROOTCA` (this mesh's
//! roots, `trusted_ca`) and `ALL` (every trust domain's roots, for Envoy's
//! SPIFFE validator; [`super::all`]).

use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, CertificateValidationContext, Secret, TlsCertificate,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

pub use super::encoded::SdsResponse;
use crate::endpoint::warn::shorten;
use crate::secrets::WorkloadSecret;
use crate::trust::RootBundle;

/// Type URL of an SDS `Secret`.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The workload's certificate chain and key.
pub const DEFAULT: &str = "default";
/// The trusted root bundle.
pub const ROOTCA: &str = "ROOTCA";
pub use super::all::ALL;
/// Every resource name served, for error messages.
pub const SERVED: &[&str] = &[DEFAULT, ROOTCA, ALL];

/// The distinct resource names of a request, in the order first named.
/// Duplicates collapse (a request naming `default` 300 000 times is a
/// request for `default`), and the set is what counts: `[default, ROOTCA]`
/// and `[ROOTCA, default, ROOTCA]` are the same subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceNames(Vec<String>);

/// Why a request's resource names were refused (gRPC `INVALID_ARGUMENT`).
/// The messages are bounded whatever the request holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamesError {
    #[error("the request names no resource; this agent serves {}", SERVED.join(", "))]
    Empty,
    #[error(
        "the request names more than {max} distinct resources (SDS_MAX_RESOURCE_NAMES); \
         this agent serves {}",
        SERVED.join(", ")
    )]
    TooMany { max: usize },
    #[error("unknown resource name(s) {}; this agent serves {}", .0.join(", "), SERVED.join(", "))]
    Unknown(Vec<String>),
}

impl ResourceNames {
    /// Checks a request's names: at least one, at most `max` distinct, every
    /// one served. Stops reading at the first name past `max` distinct ones,
    /// so a huge request costs no more than a small one.
    pub fn parse(names: &[String], max: usize) -> Result<Self, NamesError> {
        let distinct: Vec<String> = distinct(names, max)?.into_iter().cloned().collect();
        if distinct.is_empty() {
            return Err(NamesError::Empty);
        }
        let unknown: Vec<String> = distinct
            .iter()
            .filter(|n| !SERVED.contains(&n.as_str()))
            .map(|n| format!("{:?}", shorten(n, 64)))
            .collect();
        if unknown.is_empty() {
            Ok(Self(distinct))
        } else {
            Err(NamesError::Unknown(unknown))
        }
    }

    /// True when `names` (duplicates and order aside) are exactly these.
    pub fn same_set(&self, names: &[String]) -> bool {
        names.iter().all(|n| self.0.contains(n)) && self.0.iter().all(|n| names.contains(n))
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Display for ResourceNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// The distinct names of `names`, in the order first named, or
/// [`NamesError::TooMany`] past `max` of them. Stops reading at the first
/// name past `max` distinct ones, so a huge list costs no more than a small
/// one.
pub fn distinct(names: &[String], max: usize) -> Result<Vec<&String>, NamesError> {
    let mut distinct: Vec<&String> = Vec::new();
    for n in names {
        if distinct.contains(&n) {
            continue;
        }
        if distinct.len() == max {
            return Err(NamesError::TooMany { max });
        }
        distinct.push(n);
    }
    Ok(distinct)
}

/// Names as a client sent them, for a log line: at most a few, each cut short.
pub fn names_for_log(names: &[String]) -> String {
    let mut shown: Vec<String> = names
        .iter()
        .take(4)
        .map(|n| format!("{:?}", shorten(n, 64)))
        .collect();
    if names.len() > 4 {
        shown.push(format!("... {} more", names.len() - 4));
    }
    format!("[{}]", shown.join(", "))
}

/// What one response is built from: the identity's secret and the trust bundle.
pub struct Snapshot<'a> {
    pub secret: &'a WorkloadSecret,
    pub roots: &'a RootBundle,
}

/// The version of one resource, so that a stream can tell which resources
/// changed: `ROOTCA`'s follows this mesh's roots only, so that a change of
/// the federated roots alone pushes nothing on its streams; `ALL`'s follows
/// every trust domain's.
pub fn resource_version(name: &str, snap: &Snapshot<'_>) -> String {
    match name {
        ROOTCA => snap.roots.version(),
        ALL => snap.roots.all_version(),
        _ => snap.secret.cert_version(),
    }
}

fn inline(data: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(data.as_bytes().to_vec())),
        ..Default::default()
    })
}

/// Encodes the named resource (already checked by [`ResourceNames::parse`]).
pub fn encode(name: &str, snap: &Snapshot<'_>) -> Any {
    let kind = match name {
        ROOTCA => secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(&snap.roots.pem()),
            ..Default::default()
        }),
        ALL => secret::Type::ValidationContext(super::all::validation_context(
            snap.secret.identity.trust_domain(),
            snap.roots,
        )),
        _ => secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&snap.secret.chain_pem),
            private_key: inline(snap.secret.key.pkcs8_pem()),
            ..Default::default()
        }),
    };
    let msg = Secret {
        name: name.to_string(),
        r#type: Some(kind),
    };
    Any {
        type_url: SECRET_TYPE_URL.to_string(),
        value: msg.encode_to_vec(),
    }
}

/// A full response for `names`; its version joins the resources' versions.
/// Each resource is encoded once per version and shared (see
/// [`super::encoded`]).
pub fn response(names: &ResourceNames, snap: &Snapshot<'_>, nonce: String) -> SdsResponse {
    SdsResponse::new(names, snap, nonce)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_collapse_and_are_checked() {
        let many = vec!["default".to_string(); 300_000];
        assert_eq!(
            ResourceNames::parse(&many, 8).unwrap().as_slice(),
            ["default"]
        );
        let n = ResourceNames::parse(&v(&["ROOTCA", "default", "ROOTCA"]), 8).unwrap();
        assert_eq!(n.as_slice(), ["ROOTCA", "default"]);
        assert!(n.same_set(&v(&["default", "ROOTCA", "default"])));
        assert!(!n.same_set(&v(&["default"])));
        assert_eq!(
            ResourceNames::parse(&v(&["ALL", "default"]), 8)
                .unwrap()
                .as_slice(),
            ["ALL", "default"]
        );
        assert_eq!(ResourceNames::parse(&[], 8), Err(NamesError::Empty));
        let nine: Vec<String> = (0..9).map(|i| format!("n{i}")).collect();
        assert_eq!(
            ResourceNames::parse(&nine, 8),
            Err(NamesError::TooMany { max: 8 })
        );
        let e = ResourceNames::parse(&v(&["default", &"x".repeat(100_000)]), 8).unwrap_err();
        assert!(matches!(e, NamesError::Unknown(_)));
        assert!(e.to_string().len() < 200, "{e}");
    }

    proptest! {
        /// Any list of names gets a result, never a panic; a success is a
        /// non-empty set of served names equal to the request's; a refusal
        /// says why in a bounded message.
        #[test]
        fn any_names_get_a_typed_answer(
            names in prop::collection::vec(
                prop_oneof![
                    Just("default".to_string()),
                    Just("ROOTCA".to_string()),
                    Just("ALL".to_string()),
                    ".{0,80}",
                ],
                0..200,
            ),
            max in 1usize..10,
        ) {
            match ResourceNames::parse(&names, max) {
                Ok(n) => {
                    prop_assert!(!n.is_empty() && n.as_slice().len() <= max);
                    prop_assert!(n.as_slice().iter().all(|x| SERVED.contains(&x.as_str())));
                    prop_assert!(n.same_set(&names));
                }
                Err(e) => prop_assert!(e.to_string().len() < 64 * 8 * 6 + 200),
            }
            prop_assert!(names_for_log(&names).len() < 4 * 300 + 40);
        }

        #[test]
        fn shorten_never_splits_a_character(s in "\\PC{0,50}", max in 0usize..60) {
            let out = shorten(&s, max);
            prop_assert!(out.chars().count() <= max + 3);
        }
    }
}
