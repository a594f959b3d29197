use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;

use super::*;
use crate::identity::SpiffeId;
use crate::secrets::test_support::secret_for;

/// The response as prost would encode it from its fields, as the agent
/// sent it before resources were encoded once.
fn as_prost(names: &ResourceNames, snap: &Snapshot<'_>, nonce: &str) -> Vec<u8> {
    DiscoveryResponse {
        version_info: names
            .as_slice()
            .iter()
            .map(|n| resources::resource_version(n, snap))
            .collect::<Vec<_>>()
            .join("-"),
        resources: names
            .as_slice()
            .iter()
            .map(|n| resources::encode(n, snap))
            .collect(),
        type_url: SECRET_TYPE_URL.to_string(),
        nonce: nonce.to_string(),
        ..Default::default()
    }
    .encode_to_vec()
}

#[tokio::test]
async fn the_bytes_are_prost_s_and_each_resource_is_encoded_once() {
    let secret = secret_for(&SpiffeId("spiffe://td/ns/a/sa/b".into())).await;
    let roots = RootBundle {
        pems: vec!["ROOT\n".into()],
        generation: 1,
        ..Default::default()
    };
    let snap = Snapshot {
        secret: &secret,
        roots: &roots,
    };
    let all = [DEFAULT, ROOTCA, ALL].map(String::from);
    for names in [&all[..1], &all[1..2], &all[2..], &all[..]] {
        let names = ResourceNames::parse(names, 8).unwrap();
        for nonce in ["", "n-1"] {
            let resp = SdsResponse::new(&names, &snap, nonce.to_string());
            let bytes = resp.encode_to_vec();
            assert_eq!(bytes, as_prost(&names, &snap, nonce), "{names}");
            assert_eq!(bytes.len(), resp.encoded_len());
            let read = DiscoveryResponse::decode(bytes.as_slice()).unwrap();
            assert_eq!(read.version_info, resp.version_info);
            assert_eq!(read.resources.len(), names.as_slice().len());
        }
    }
    // Shared, not made again.
    for name in [DEFAULT, ROOTCA, ALL] {
        assert!(Arc::ptr_eq(&resource(name, &snap), &resource(name, &snap)));
    }
    // A copy of the bundle starts without what the original made.
    let copy = roots.clone();
    let other = Snapshot {
        secret: &secret,
        roots: &copy,
    };
    assert!(!Arc::ptr_eq(
        &resource(ROOTCA, &snap),
        &resource(ROOTCA, &other)
    ));
}
