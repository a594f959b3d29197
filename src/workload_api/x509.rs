//! The Workload API's X.509 messages, built from the secret SDS serves: the
//! same PEM, as DER.

use std::collections::HashMap;

use tonic::Status;
use zeroize::Zeroizing;

use super::pb::{X509BundlesResponse, X509svid, X509svidResponse};
use crate::secrets::WorkloadSecret;
use crate::trust::RootBundle;

/// What one message is built from.
pub(super) struct Snapshot<'a> {
    pub secret: &'a WorkloadSecret,
    pub roots: &'a RootBundle,
}

/// Changes whenever the certificate or the bundle does.
pub(super) fn svid_version(s: &Snapshot<'_>) -> String {
    format!("{}-{}", s.secret.cert_version(), s.roots.version())
}

/// Changes whenever the bundle does.
pub(super) fn bundles_version(s: &Snapshot<'_>) -> String {
    s.roots.version()
}

/// `spiffe://<trust domain>`, the key of a bundle, from the SVID's SPIFFE ID.
fn trust_domain_id(s: &Snapshot<'_>) -> String {
    let id = s.secret.identity.as_str();
    let rest = id.strip_prefix("spiffe://").unwrap_or(id);
    let td = rest.split('/').next().unwrap_or(rest);
    format!("spiffe://{td}")
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
    Ok(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: s.secret.identity.as_str().to_string(),
            x509_svid: certs_der(&s.secret.chain_pem, "certificate chain")?,
            x509_svid_key: key.to_vec(),
            bundle: certs_der(&s.roots.pem(), "trust bundle")?,
            hint: String::new(),
        }],
        ..Default::default()
    })
}

/// The bundle of the workload's trust domain.
pub(super) fn bundles_response(s: &Snapshot<'_>) -> Result<X509BundlesResponse, Status> {
    Ok(X509BundlesResponse {
        bundles: HashMap::from([(
            trust_domain_id(s),
            certs_der(&s.roots.pem(), "trust bundle")?,
        )]),
        ..Default::default()
    })
}
