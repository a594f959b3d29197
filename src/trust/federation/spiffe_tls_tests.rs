//! The `https_spiffe` profile against a real TLS server presenting an
//! X.509-SVID.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::source::{EndpointRoots, Source};
use crate::config::BundleSource;

struct Ca {
    pem: String,
    der: Vec<u8>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        der: cert.der().to_vec(),
        issuer: rcgen::Issuer::new(p, key),
    }
}

/// Serves `body` over TLS with an SVID for `id` issued by `by`, to every
/// connection; returns the URL.
async fn serve(by: &Ca, id: &str, body: &'static str) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    let cert = p.signed_by(&key, &by.issuer).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/",
        listener.local_addr().unwrap().port()
    );
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    url
}

fn source(url: &str, id: &str, bootstrap: &str, dir: &std::path::Path) -> (Source, EndpointRoots) {
    let path = dir.join(format!("bootstrap-{}.pem", rand::random::<u32>()));
    std::fs::write(&path, bootstrap).unwrap();
    let roots = EndpointRoots::default();
    let s = Source::new(
        &BundleSource::HttpsSpiffe {
            url: url.to_string(),
            endpoint_spiffe_id: id.to_string(),
            bootstrap_bundle: path,
        },
        1 << 16,
        &roots,
    )
    .unwrap();
    (s, roots)
}

#[tokio::test]
async fn the_endpoint_must_present_the_configured_id_from_the_domains_roots() {
    let dir = tempfile::tempdir().unwrap();
    let (root, other_root) = (ca("other.example root"), ca("someone else"));
    let id = "spiffe://other.example/bundle-server";
    let url = serve(&root, id, "the bundle").await;

    let (good, roots) = source(&url, id, &root.pem, dir.path());
    assert_eq!(good.read().await.unwrap(), b"the bundle");

    // The roots it checks against follow the bundles accepted from it.
    *roots.write().unwrap() = vec![CertificateDer::from(other_root.der.clone())];
    let e = good.read().await.unwrap_err().to_string();
    assert!(e.contains("UnknownIssuer"), "{e}");
    *roots.write().unwrap() = vec![CertificateDer::from(root.der.clone())];
    assert!(good.read().await.is_ok());

    let (wrong_id, _) = source(
        &url,
        "spiffe://other.example/someone",
        &root.pem,
        dir.path(),
    );
    let e = wrong_id.read().await.unwrap_err().to_string();
    assert!(
        e.contains("not the SPIFFE ID spiffe://other.example/someone"),
        "{e}"
    );

    let (wrong_root, _) = source(&url, id, &other_root.pem, dir.path());
    let e = wrong_root.read().await.unwrap_err().to_string();
    assert!(e.contains("UnknownIssuer"), "{e}");
}
