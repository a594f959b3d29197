//! The Workload API's X.509 messages, built from the secret SDS serves: the
//! same PEM, as DER. Beside the workload's own trust domain, every federated
//! one is served (`federated_bundles` of the SVID, and a bundle of its own
//! in `FetchX509Bundles`), keyed `spiffe://<trust domain>`.

use std::collections::HashMap;

use tonic::Status;
use zeroize::Zeroizing;

use super::pb::{X509BundlesResponse, X509svid, X509svidResponse};
use crate::sds::all::trust_domains;
use crate::secrets::WorkloadSecret;
use crate::trust::RootBundle;

/// What one message is built from.
pub(super) struct Snapshot<'a> {
    pub secret: &'a WorkloadSecret,
    pub roots: &'a RootBundle,
}

/// Changes whenever the certificate, this mesh's roots or a federated
/// trust domain's do.
pub(super) fn svid_version(s: &Snapshot<'_>) -> String {
    format!("{}-{}", s.secret.cert_version(), s.roots.all_version())
}

/// Changes whenever this mesh's roots or a federated trust domain's do.
pub(super) fn bundles_version(s: &Snapshot<'_>) -> String {
    s.roots.all_version()
}

/// Every trust domain's bundle, keyed `spiffe://<trust domain>`, as DER:
/// the workload's own (from its SPIFFE ID, with `ROOTCA`'s roots) and each
/// federated one.
fn bundles(s: &Snapshot<'_>) -> Result<HashMap<String, Vec<u8>>, Status> {
    let own = s.secret.identity.trust_domain();
    trust_domains(own, s.roots)
        .into_iter()
        .map(|(td, pems)| {
            let what = match td == own {
                true => "trust bundle".to_string(),
                false => format!("bundle of trust domain {td}"),
            };
            Ok((format!("spiffe://{td}"), certs_der(&pems.concat(), &what)?))
        })
        .collect()
}

/// The DER of every block labelled `label` in `pem`, in order.
fn der_blocks(pem: &str, label: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| format!("malformed PEM: {e}"))?;
        if block.label != label {
            return Err(format!(
                "expected {label} PEM blocks, found {:?}",
                block.label
            ));
        }
        out.push(block.contents);
    }
    if out.is_empty() {
        return Err(format!("no {label} PEM block"));
    }
    Ok(out)
}

fn certs_der(pem: &str, what: &str) -> Result<Vec<u8>, Status> {
    der_blocks(pem, "CERTIFICATE")
        .map(|v| v.concat())
        .map_err(|e| Status::internal(format!("cannot encode the {what}: {e}")))
}

/// The SVID: the chain (leaf first, without the root), the PKCS#8 key and
/// the bundle, ASN.1 DER.
pub(super) fn svid_response(s: &Snapshot<'_>) -> Result<X509svidResponse, Status> {
    let key = Zeroizing::new(
        der_blocks(s.secret.key.pkcs8_pem(), "PRIVATE KEY")
            .map_err(|_| Status::internal("cannot encode the private key as PKCS#8 DER"))?
            .concat(),
    );
    let mut federated = bundles(s)?;
    federated.remove(&format!("spiffe://{}", s.secret.identity.trust_domain()));
    Ok(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: s.secret.identity.as_str().to_string(),
            x509_svid: certs_der(&s.secret.chain_pem, "certificate chain")?,
            x509_svid_key: key.to_vec(),
            bundle: certs_der(&s.roots.pem(), "trust bundle")?,
            hint: String::new(),
        }],
        federated_bundles: federated,
        ..Default::default()
    })
}

/// The bundle of the workload's trust domain and of every federated one.
pub(super) fn bundles_response(s: &Snapshot<'_>) -> Result<X509BundlesResponse, Status> {
    Ok(X509BundlesResponse {
        bundles: bundles(s)?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ca::local::LocalCa;
    use crate::identity::SpiffeId;
    use crate::trust::spiffe_bundle::TrustDomain;
    use crate::trust::Federated;

    fn root(td: &str) -> String {
        LocalCa::new(None, td).unwrap().root_pem().to_string()
    }

    fn der(pems: &[&String]) -> Vec<u8> {
        pems.iter()
            .map(|p| der_blocks(p, "CERTIFICATE").unwrap().concat())
            .collect::<Vec<_>>()
            .concat()
    }

    #[tokio::test]
    async fn federated_domains_are_served_beside_the_own_one_and_change_the_versions() {
        let secret =
            crate::secrets::test_support::secret_for(&SpiffeId("spiffe://td/ns/a/sa/b".into()))
                .await;
        let (own, other, third) = (root("td"), root("other.example"), root("third.example"));
        let alone = RootBundle {
            pems: vec![own.clone()],
            generation: 1,
            federated: Arc::default(),
            memo: Default::default(),
        };
        let snap = Snapshot {
            secret: &secret,
            roots: &alone,
        };
        let svid = svid_response(&snap).unwrap();
        assert!(svid.federated_bundles.is_empty());
        assert_eq!(svid.svids[0].bundle, der(&[&own]));
        let b = bundles_response(&snap).unwrap().bundles;
        assert_eq!(
            b,
            HashMap::from([("spiffe://td".to_string(), der(&[&own]))])
        );

        let federated = RootBundle {
            generation: 2,
            federated: Arc::new(Federated::from([
                (
                    TrustDomain::parse("other.example").unwrap(),
                    vec![other.clone(), third.clone()],
                ),
                (
                    TrustDomain::parse("third.example").unwrap(),
                    vec![third.clone()],
                ),
            ])),
            ..alone.clone()
        };
        let fed = Snapshot {
            secret: &secret,
            roots: &federated,
        };
        let svid = svid_response(&fed).unwrap();
        assert_eq!(svid.svids[0].bundle, der(&[&own]), "the own bundle alone");
        assert_eq!(
            svid.federated_bundles,
            HashMap::from([
                ("spiffe://other.example".to_string(), der(&[&other, &third])),
                ("spiffe://third.example".to_string(), der(&[&third])),
            ])
        );
        let b = bundles_response(&fed).unwrap().bundles;
        assert_eq!(b.len(), 3, "{:?}", b.keys());
        assert_eq!(b["spiffe://td"], der(&[&own]));
        assert_eq!(b["spiffe://other.example"], der(&[&other, &third]));
        // A federated change alone is a new message on both methods.
        assert_ne!(svid_version(&fed), svid_version(&snap));
        assert_ne!(bundles_version(&fed), bundles_version(&snap));
    }
}
