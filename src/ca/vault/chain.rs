//! From a sign answer to the chain served to Envoy and the root it ends in.

use crate::crypto::{is_issued_by, is_self_signed, split_pem_certs, IssuedChain};

/// Builds the chain Envoy is served from a sign answer: the certificate then
/// `ca_chain` (or `issuing_ca`), without duplicates, and its root: of the
/// self-signed certificates at its end, the one that issued the last
/// certificate before them. Any other self-signed certificate there (a
/// mount's other roots, which `ca_chain` may carry) is neither served in the
/// chain nor trusted: ROOTCA holds only the root that anchors this chain, as
/// the mesh's other roots come from the trust bundle. When no root there
/// anchors the chain (a mount holding only an intermediate), `roots_pem` is
/// empty and the caller must find the root elsewhere or refuse.
pub fn chain_from_sign_answer(
    certificate: &str,
    issuing_ca: Option<&str>,
    ca_chain: Option<&[String]>,
) -> Result<IssuedChain, String> {
    let mut all = split_pem_certs(certificate).map_err(|e| format!("data.certificate: {e}"))?;
    all.truncate(1);
    let rest: Vec<String> = match (ca_chain, issuing_ca) {
        (Some(chain), _) if !chain.is_empty() => chain.to_vec(),
        (_, Some(ica)) => vec![ica.to_string()],
        _ => return Err("the answer has neither data.ca_chain nor data.issuing_ca".into()),
    };
    for pem in rest {
        for c in split_pem_certs(&pem).map_err(|e| format!("data.ca_chain: {e}"))? {
            if !all.contains(&c) {
                all.push(c);
            }
        }
    }
    // The roots leave the chain: Envoy gets the anchoring one as ROOTCA.
    let mut ends = Vec::new();
    while all.len() > 1 && all.last().is_some_and(|c| is_self_signed(c)) {
        ends.push(all.pop().expect("checked"));
    }
    let top = all.last().expect("the certificate");
    let roots = ends.into_iter().rev().find(|r| is_issued_by(top, r));
    Ok(IssuedChain {
        chain_pem: all,
        roots_pem: roots.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::local::LocalCa;
    use std::time::Duration;

    #[test]
    fn chain_dedupes_and_finds_the_root() {
        let root = LocalCa::new(None, "cluster.local").unwrap();
        let root_pem = root.root_pem().to_string();
        let key = crate::crypto::PrivateKey::generate(crate::crypto::KeyType::EcP256).unwrap();
        let id = crate::identity::SpiffeId("spiffe://cluster.local/ns/a/sa/b".into());
        let leaf = root
            .sign_csr(&key.csr_pem(&id).unwrap(), Duration::from_secs(60))
            .unwrap();

        // ca_chain holding the root (and the issuing_ca repeating it).
        let c = chain_from_sign_answer(
            &leaf,
            Some(&root_pem),
            Some(std::slice::from_ref(&root_pem)),
        )
        .unwrap();
        assert_eq!(
            c.chain_pem.len(),
            1,
            "the root is not part of the chain served"
        );
        assert_eq!(c.roots_pem, split_pem_certs(&root_pem).unwrap());
        // No ca_chain: issuing_ca is used.
        let c = chain_from_sign_answer(&leaf, Some(&root_pem), None).unwrap();
        assert_eq!(c.roots_pem.len(), 1);
        // Garbage is refused.
        assert!(chain_from_sign_answer("nope", Some(&root_pem), None).is_err());
        assert!(chain_from_sign_answer(&leaf, None, None).is_err());
        // A chain ending in a certificate that is not self-signed has no root.
        let c = chain_from_sign_answer(&leaf, Some(&leaf), None).unwrap();
        assert!(c.roots_pem.is_empty());
    }

    #[test]
    fn only_the_root_that_anchors_the_chain_is_its_root() {
        let root = LocalCa::new(None, "cluster.local").unwrap();
        let other = LocalCa::new(None, "cluster.local").unwrap();
        let key = crate::crypto::PrivateKey::generate(crate::crypto::KeyType::EcP256).unwrap();
        let id = crate::identity::SpiffeId("spiffe://cluster.local/ns/a/sa/b".into());
        let leaf = root
            .sign_csr(&key.csr_pem(&id).unwrap(), Duration::from_secs(60))
            .unwrap();
        let (root_pem, other_pem) = (root.root_pem().to_string(), other.root_pem().to_string());
        // Another root of the mount, before or after the one that issued the
        // leaf: not served, not trusted.
        for ca_chain in [
            vec![other_pem.clone(), root_pem.clone()],
            vec![root_pem.clone(), other_pem.clone()],
        ] {
            let c = chain_from_sign_answer(&leaf, None, Some(&ca_chain)).unwrap();
            assert_eq!(c.chain_pem.len(), 1, "no root in the chain served");
            assert_eq!(c.roots_pem, split_pem_certs(&root_pem).unwrap());
        }
        // Only roots that did not issue it: no root (the caller asks the mount).
        let c = chain_from_sign_answer(&leaf, Some(&other_pem), None).unwrap();
        assert_eq!(c.chain_pem.len(), 1);
        assert!(c.roots_pem.is_empty());
    }
}
