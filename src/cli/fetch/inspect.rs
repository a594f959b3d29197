//! What is in an SDS response, read the way an operator needs it: each
//! certificate's names, serial, key type, issuer and validity, and whether
//! the served chain, key and roots fit together (checked with the same code
//! the agent uses before it serves anything).

use std::time::SystemTime;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use x509_parser::oid_registry;
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;
use zeroize::Zeroizing;

use crate::client::sds::{self, Served};
use crate::crypto::{split_pem_certs, verify_issued, IssuedChain, KeyType, PrivateKey};
use crate::identity::SpiffeId;

/// One certificate, as shown.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub subject: String,
    pub uri_sans: Vec<String>,
    /// Every other SAN (DNS, IP, email), as `kind:value`.
    pub other_sans: Vec<String>,
    pub serial: String,
    pub key_type: String,
    pub issuer: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    pub self_signed: bool,
    pub pem: String,
}

/// One resource of a response.
pub enum Resource {
    /// `default`: the workload's chain (leaf first) and key.
    Certificate {
        name: String,
        chain: Vec<CertInfo>,
        key_pem: Zeroizing<String>,
        key_type: String,
        /// Whether chain, key and roots fit, when the roots were fetched
        /// too: `Ok` says where the root it chains to was served.
        check: Option<Result<String, String>>,
    },
    /// `ROOTCA`: the trusted roots.
    Roots { name: String, roots: Vec<CertInfo> },
    /// `ALL`: every trust domain (sorted by name) and its roots.
    TrustDomains {
        name: String,
        domains: Vec<(String, Vec<CertInfo>)>,
    },
}

impl Resource {
    pub fn name(&self) -> &str {
        match self {
            Resource::Certificate { name, .. }
            | Resource::Roots { name, .. }
            | Resource::TrustDomains { name, .. } => name,
        }
    }
}

/// The trust domain of a chain's leaf, from its one URI SAN.
pub fn leaf_trust_domain(chain: &[CertInfo]) -> Option<String> {
    let id = crate::identity::SpiffeId(chain.first()?.uri_sans.first()?.clone());
    Some(id.trust_domain().to_string())
}

/// Reads every resource of `resp`.
pub fn decode(resp: &DiscoveryResponse) -> Result<Vec<Resource>, String> {
    let mut out = Vec::new();
    for any in &resp.resources {
        let s = sds::secret(any).map_err(|e| e.to_string())?;
        let what = |m: String| format!("secret {:?}: {m}", s.name);
        match sds::read(&s).map_err(|e| e.to_string())? {
            Served::Certificate(t) => {
                let chain = certs(&t.chain_pem).map_err(what)?;
                let key_type = chain
                    .first()
                    .map(|c| c.key_type.clone())
                    .unwrap_or_default();
                out.push(Resource::Certificate {
                    name: s.name.clone(),
                    chain,
                    key_pem: t.key_pem,
                    key_type,
                    check: None,
                });
            }
            Served::Roots(roots_pem) => {
                out.push(Resource::Roots {
                    name: s.name.clone(),
                    roots: certs(&roots_pem).map_err(what)?,
                });
            }
            Served::TrustDomains(domains) => {
                let domains = domains
                    .into_iter()
                    .map(|(td, pem)| {
                        certs(&pem)
                            .map(|roots| (td.clone(), roots))
                            .map_err(|e| what(format!("trust domain {td:?}: {e}")))
                    })
                    .collect::<Result<_, _>>()?;
                out.push(Resource::TrustDomains {
                    name: s.name.clone(),
                    domains,
                });
            }
        }
    }
    check_fit(&mut out, SystemTime::now());
    Ok(out)
}

/// Checks each certificate resource against the roots served alongside
/// (`ROOTCA`'s, else those `ALL` serves for the leaf's trust domain): the
/// agent's own check (our key, one SPIFFE ID, valid now, chain up to a
/// served root).
fn check_fit(resources: &mut [Resource], now: SystemTime) {
    let pems = |roots: &[CertInfo]| roots.iter().map(|c| c.pem.clone()).collect::<Vec<_>>();
    let rootca: Option<Vec<String>> = resources.iter().find_map(|r| match r {
        Resource::Roots { roots, .. } => Some(pems(roots)),
        _ => None,
    });
    let all: Option<Vec<(String, Vec<String>)>> = resources.iter().find_map(|r| match r {
        Resource::TrustDomains { domains, .. } => Some(
            domains
                .iter()
                .map(|(td, roots)| (td.clone(), pems(roots)))
                .collect(),
        ),
        _ => None,
    });
    for r in resources.iter_mut() {
        if let Resource::Certificate {
            chain,
            key_pem,
            check,
            ..
        } = r
        {
            let (roots, from) = match (&rootca, &all) {
                (Some(roots), _) => (roots.clone(), "ROOTCA".to_string()),
                (None, Some(domains)) => {
                    let td = leaf_trust_domain(chain).unwrap_or_default();
                    match domains.iter().find(|(name, _)| *name == td) {
                        Some((_, roots)) => (roots.clone(), format!("ALL for trust domain {td}")),
                        None => {
                            *check = Some(Err(format!(
                                "ALL serves no trust domain {td:?}, the leaf's"
                            )));
                            continue;
                        }
                    }
                }
                // Only the key can be checked.
                (None, None) => (Vec::new(), String::new()),
            };
            *check = Some(fit(chain, key_pem, &roots, now).map(|()| from));
        }
    }
}

fn fit(chain: &[CertInfo], key_pem: &str, roots: &[String], now: SystemTime) -> Result<(), String> {
    let leaf = chain.first().ok_or("the chain is empty")?;
    let key = PrivateKey::from_pem(key_pem)
        .map_err(|e| format!("the private key cannot be read: {e}"))?;
    let spki = key.public_key_der();
    let der = x509_parser::pem::Pem::iter_from_buffer(leaf.pem.as_bytes())
        .next()
        .and_then(|p| p.ok())
        .map(|p| p.contents)
        .ok_or("the leaf is not PEM")?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| e.to_string())?;
    if cert.public_key().raw != spki.as_slice() {
        return Err("the private key does not belong to the certificate".into());
    }
    if roots.is_empty() {
        return Ok(());
    }
    let [id] = leaf.uri_sans.as_slice() else {
        return Err(format!(
            "the leaf has {} URI SANs, not one SPIFFE ID",
            leaf.uri_sans.len()
        ));
    };
    let issued = IssuedChain {
        chain_pem: chain.iter().map(|c| c.pem.clone()).collect(),
        roots_pem: roots.to_vec(),
    };
    verify_issued(&issued, &spki, &SpiffeId(id.clone()), now)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Every certificate in PEM text.
pub fn certs(pem: &str) -> Result<Vec<CertInfo>, String> {
    split_pem_certs(pem)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|p| cert_info(&p))
        .collect()
}

fn cert_info(pem: &str) -> Result<CertInfo, String> {
    let block = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .ok_or("no PEM block")?
        .map_err(|e| e.to_string())?;
    let (_, c) = X509Certificate::from_der(&block.contents)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut uri_sans = Vec::new();
    let mut other_sans = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uri_sans.push(u.to_string()),
                GeneralName::DNSName(d) => other_sans.push(format!("DNS:{d}")),
                GeneralName::RFC822Name(e) => other_sans.push(format!("email:{e}")),
                GeneralName::IPAddress(ip) => other_sans.push(format!("IP:{}", show_ip(ip))),
                other => other_sans.push(format!("{other:?}")),
            }
        }
    }
    let to_time = |t: ASN1Time| {
        let secs = t.timestamp();
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64)
    };
    Ok(CertInfo {
        subject: c.subject().to_string(),
        uri_sans,
        other_sans,
        serial: c.raw_serial_as_string(),
        key_type: key_type(&c),
        issuer: c.issuer().to_string(),
        not_before: to_time(c.validity().not_before),
        not_after: to_time(c.validity().not_after),
        is_ca: c.is_ca(),
        self_signed: c.subject() == c.issuer() && c.verify_signature(None).is_ok(),
        pem: pem.to_string(),
    })
}

fn show_ip(b: &[u8]) -> String {
    match b.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(b).expect("4 bytes")).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes")).to_string(),
        _ => format!("{b:02x?}"),
    }
}

/// The key type in node-agent's `KEY_TYPE` spelling when it is one of them.
fn key_type(c: &X509Certificate<'_>) -> String {
    let spki = c.public_key();
    match spki.parsed() {
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(o) if o == oid_registry::OID_EC_P256 => KeyType::EcP256.to_string(),
                Some(o) if o == oid_registry::OID_NIST_EC_P384 => KeyType::EcP384.to_string(),
                Some(o) => format!("ec ({o})"),
                None => "ec".into(),
            }
        }
        Ok(PublicKey::RSA(rsa)) => match rsa.key_size() {
            2048 => KeyType::Rsa2048.to_string(),
            3072 => KeyType::Rsa3072.to_string(),
            4096 => KeyType::Rsa4096.to_string(),
            bits => format!("rsa-{bits}"),
        },
        _ if spki.algorithm.algorithm == oid_registry::OID_SIG_ED25519 => "ed25519".into(),
        _ => format!("unknown ({})", spki.algorithm.algorithm),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::local::LocalCa;
    use std::time::Duration;

    fn issued(kt: KeyType) -> (Vec<CertInfo>, PrivateKey, String) {
        let ca = LocalCa::new(None, "cluster.local").unwrap();
        let key = PrivateKey::generate(kt).unwrap();
        let id = SpiffeId("spiffe://cluster.local/ns/default/sa/httpbin".into());
        let leaf = ca
            .sign_csr(&key.csr_pem(&id).unwrap(), Duration::from_secs(3600))
            .unwrap();
        (certs(&leaf).unwrap(), key, ca.root_pem().to_string())
    }

    #[test]
    fn reads_names_key_type_and_validity() {
        for kt in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048] {
            let (chain, _, root) = issued(kt);
            let leaf = &chain[0];
            assert_eq!(
                leaf.uri_sans,
                ["spiffe://cluster.local/ns/default/sa/httpbin"]
            );
            assert_eq!(leaf.key_type, kt.to_string());
            assert!(!leaf.is_ca);
            let root = &certs(&root).unwrap()[0];
            assert!(root.self_signed && root.is_ca);
            assert_eq!(leaf.issuer, root.subject);
            let life = leaf.not_after.duration_since(leaf.not_before).unwrap();
            assert!(life >= Duration::from_secs(3600), "{life:?}");
        }
    }

    #[test]
    fn fit_names_what_does_not_fit() {
        let (chain, key, root) = issued(KeyType::EcP256);
        let now = SystemTime::now();
        assert_eq!(
            fit(&chain, key.pkcs8_pem(), std::slice::from_ref(&root), now),
            Ok(())
        );
        let other = PrivateKey::generate(KeyType::EcP256).unwrap();
        assert!(
            fit(&chain, other.pkcs8_pem(), std::slice::from_ref(&root), now)
                .unwrap_err()
                .contains("does not belong")
        );
        let (_, _, other_root) = issued(KeyType::EcP256);
        assert!(fit(&chain, key.pkcs8_pem(), &[other_root], now)
            .unwrap_err()
            .contains("root"));
        let later = now + Duration::from_secs(7 * 24 * 3600);
        assert!(fit(&chain, key.pkcs8_pem(), &[root], later)
            .unwrap_err()
            .contains("not valid now"));
    }
}
