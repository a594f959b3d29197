//! The `ALL` resource (SPIRE's name for it): every trust domain the
//! workload trusts, this mesh's and each federated one, each with its own
//! roots, as one validation context for Envoy's SPIFFE certificate
//! validator (`envoy.tls.cert_validator.spiffe`). Unlike `ROOTCA`, whose
//! roots vouch for any name, the validator accepts a peer's certificate only
//! when it chains to a root of the trust domain its SPIFFE ID names.

use envoy_types::pb::envoy::config::core::v3::{
    data_source::Specifier, DataSource, TypedExtensionConfig,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    spiffe_cert_validator_config::TrustDomain as ValidatorTrustDomain,
    CertificateValidationContext, SpiffeCertValidatorConfig,
};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

use crate::trust::RootBundle;

/// The resource's name.
pub const ALL: &str = "ALL";
/// The name of Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// Every trust domain served, sorted by name: this mesh's (`own`, the trust
/// domain of the workload's SPIFFE ID, with `ROOTCA`'s roots) and each
/// federated one. A federated entry named like this mesh's own trust domain
/// is left out (`ROOTCA`'s roots are this mesh's), and so is one without
/// roots (it would trust nothing, and Envoy refuses an empty bundle).
pub fn trust_domains<'a>(own: &'a str, roots: &'a RootBundle) -> Vec<(&'a str, &'a [String])> {
    let mut out: Vec<(&str, &[String])> = vec![(own, roots.pems.as_slice())];
    out.extend(
        roots
            .federated
            .iter()
            .filter(|(td, pems)| td.as_str() != own && !pems.is_empty())
            .map(|(td, pems)| (td.as_str(), pems.as_slice())),
    );
    out.sort_by(|a, b| a.0.cmp(b.0));
    out
}

/// The validation context of `ALL`: the SPIFFE validator, configured with
/// every trust domain of [`trust_domains`] and its roots inline.
pub fn validation_context(own: &str, roots: &RootBundle) -> CertificateValidationContext {
    let config = SpiffeCertValidatorConfig {
        trust_domains: trust_domains(own, roots)
            .into_iter()
            .map(|(name, pems)| ValidatorTrustDomain {
                name: name.to_string(),
                trust_bundle: Some(DataSource {
                    specifier: Some(Specifier::InlineBytes(pems.concat().into_bytes())),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    CertificateValidationContext {
        custom_validator_config: Some(TypedExtensionConfig {
            name: SPIFFE_VALIDATOR.to_string(),
            typed_config: Some(Any {
                type_url: SpiffeCertValidatorConfig::type_url(),
                value: config.encode_to_vec(),
            }),
        }),
        ..Default::default()
    }
}

/// The trust domains (name, roots PEM) of a validation context that
/// configures the SPIFFE validator with inline bundles; `Ok(None)` when it
/// configures no custom validator.
pub fn read(ctx: &CertificateValidationContext) -> Result<Option<Vec<(String, String)>>, String> {
    let Some(ext) = &ctx.custom_validator_config else {
        return Ok(None);
    };
    if ext.name != SPIFFE_VALIDATOR {
        return Err(format!(
            "a custom validator {:?}, not {SPIFFE_VALIDATOR}",
            ext.name
        ));
    }
    let any = ext
        .typed_config
        .as_ref()
        .ok_or("the SPIFFE validator has no typed_config")?;
    if any.type_url != SpiffeCertValidatorConfig::type_url() {
        return Err(format!(
            "the SPIFFE validator's config is a {}, not a SPIFFECertValidatorConfig",
            any.type_url
        ));
    }
    let config = SpiffeCertValidatorConfig::decode(any.value.as_slice())
        .map_err(|e| format!("the SPIFFE validator's config cannot be decoded: {e}"))?;
    config
        .trust_domains
        .into_iter()
        .map(|td| {
            let pem = match td.trust_bundle.and_then(|d| d.specifier) {
                Some(Specifier::InlineBytes(b)) => String::from_utf8(b).map_err(|_| {
                    format!("trust domain {:?}: a bundle that is not text", td.name)
                })?,
                Some(Specifier::InlineString(s)) => s,
                other => {
                    return Err(format!(
                        "trust domain {:?}: a bundle that is not inline: {other:?}",
                        td.name
                    ))
                }
            };
            Ok((td.name, pem))
        })
        .collect::<Result<Vec<_>, String>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::trust::spiffe_bundle::TrustDomain;
    use crate::trust::Federated;

    #[test]
    fn every_trust_domain_sorted_with_its_roots_and_read_back() {
        let own = RootBundle {
            pems: vec!["OWN1\n".into(), "OWN2\n".into()],
            generation: 3,
            federated: Arc::new(Federated::from([
                (TrustDomain::parse("b.example").unwrap(), vec!["B\n".into()]),
                (TrustDomain::parse("a.example").unwrap(), vec!["A\n".into()]),
                // This mesh's own name: ROOTCA's roots win.
                (TrustDomain::parse("m.local").unwrap(), vec!["X\n".into()]),
                // No roots: left out.
                (TrustDomain::parse("c.example").unwrap(), vec![]),
            ])),
            memo: Default::default(),
        };
        let ctx = validation_context("m.local", &own);
        assert!(ctx.trusted_ca.is_none(), "the validator holds the roots");
        let ext = ctx.custom_validator_config.as_ref().unwrap();
        assert_eq!(ext.name, "envoy.tls.cert_validator.spiffe");
        assert_eq!(
            ext.typed_config.as_ref().unwrap().type_url,
            "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
        );
        let got = read(&ctx).unwrap().unwrap();
        let want = [
            ("a.example", "A\n"),
            ("b.example", "B\n"),
            ("m.local", "OWN1\nOWN2\n"),
        ];
        assert_eq!(
            got,
            want.map(|(n, p)| (n.to_string(), p.to_string())).to_vec()
        );
        // Nothing federated: this mesh's domain alone.
        let alone = RootBundle {
            federated: Arc::default(),
            ..own.clone()
        };
        assert_eq!(
            read(&validation_context("m.local", &alone))
                .unwrap()
                .unwrap(),
            [("m.local".to_string(), "OWN1\nOWN2\n".to_string())]
        );
        assert_eq!(read(&CertificateValidationContext::default()), Ok(None));
    }
}
