//! From a sign answer to the chain served to Envoy and the root it ends in.

use crate::crypto::{is_self_signed, split_pem_certs, IssuedChain};

/// Builds the chain Envoy is served from a sign answer: the certificate then
/// `ca_chain` (or `issuing_ca`), without duplicates, and the roots: the
/// self-signed certificates at its end. When Vault gave no self-signed
/// certificate (a mount holding only an intermediate), `roots_pem` is empty
/// and the caller must find the root elsewhere or refuse.
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
    // The roots leave the chain: Envoy gets them as ROOTCA.
    let mut roots = Vec::new();
    while all.len() > 1 && all.last().is_some_and(|c| is_self_signed(c)) {
        roots.push(all.pop().expect("checked"));
    }
    roots.reverse();
    Ok(IssuedChain {
        chain_pem: all,
        roots_pem: roots,
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
}
