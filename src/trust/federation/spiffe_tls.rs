//! The `https_spiffe` profile's server check: the bundle endpoint presents
//! an X.509-SVID whose URI SAN is the configured SPIFFE ID and which chains
//! to the endpoint's trust domain's roots (the bootstrap bundle, then each
//! bundle accepted from it). No DNS name is checked: an SVID carries none.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, Error, RootCertStore, SignatureScheme};
use x509_parser::prelude::*;

use super::source::EndpointRoots;

#[derive(Debug)]
pub struct SpiffeServerVerifier {
    spiffe_id: String,
    roots: EndpointRoots,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(spiffe_id: String, roots: EndpointRoots) -> Self {
        Self {
            spiffe_id,
            roots,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

/// The URI SANs of a certificate.
pub(crate) fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                out.push(u.to_string());
            }
        }
    }
    Ok(out)
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let mut store = RootCertStore::empty();
        for root in self.roots.read().unwrap().iter() {
            let _ = store.add(root.clone());
        }
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &store,
            intermediates,
            now,
            self.algs.all,
        )?;
        let uris = uri_sans(end_entity).map_err(Error::General)?;
        if uris != [self.spiffe_id.as_str()] {
            return Err(Error::General(format!(
                "the bundle endpoint presented {uris:?}, not the SPIFFE ID {} (endpoint_spiffe_id)",
                self.spiffe_id
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
#[path = "spiffe_tls_tests.rs"]
mod tests;
