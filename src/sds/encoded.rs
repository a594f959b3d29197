//! Resources encoded once per version, and the `DiscoveryResponse` made of
//! them.
//!
//! A certificate's `default` resource, and the trust bundle's `ROOTCA` and
//! `ALL`, are encoded (an `Any` holding a `Secret`) the first time they are
//! served, kept beside the certificate or bundle they come from (see
//! [`crate::memo`]), and shared by every stream and request that serves
//! them; so is each one's version. A response ([`SdsResponse`]) holds the
//! encoded resources and only writes them out: the bytes on the wire are
//! those of the `DiscoveryResponse` prost would encode.

use std::sync::Arc;

use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};
use zeroize::Zeroizing;

use super::resources::{self, ResourceNames, Snapshot, ALL, DEFAULT, ROOTCA, SECRET_TYPE_URL};
use crate::secrets::WorkloadSecret;
use crate::trust::RootBundle;

/// One resource, encoded: the bytes of its `Any`, and its version. The
/// bytes of `default` hold the workload's private key: they are wiped when
/// the last response holding them is gone.
pub struct Encoded {
    pub version: String,
    any: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Encoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Encoded(version {}, {} bytes)",
            self.version,
            self.any.len()
        )
    }
}

impl Encoded {
    fn new(name: &str, snap: &Snapshot<'_>) -> Arc<Self> {
        Arc::new(Self {
            version: resources::resource_version(name, snap),
            any: Zeroizing::new(resources::encode(name, snap).encode_to_vec()),
        })
    }
}

/// The resource `name` (already checked by [`ResourceNames::parse`]),
/// encoded once per certificate (`default`) or bundle (`ROOTCA`, and `ALL`
/// for the trust domain it is first served in).
pub fn resource(name: &str, snap: &Snapshot<'_>) -> Arc<Encoded> {
    match name {
        ROOTCA => snap
            .roots
            .memo
            .rootca
            .get_or_init(|| Encoded::new(ROOTCA, snap))
            .clone(),
        ALL => {
            let own = snap.secret.identity.trust_domain();
            let (td, all) = snap
                .roots
                .memo
                .all
                .get_or_init(|| (own.to_string(), Encoded::new(ALL, snap)));
            if td == own {
                all.clone()
            } else {
                Encoded::new(ALL, snap)
            }
        }
        _ => secret_resource(snap.secret, snap.roots),
    }
}

fn secret_resource(secret: &WorkloadSecret, roots: &RootBundle) -> Arc<Encoded> {
    secret
        .memo
        .sds
        .get_or_init(|| Encoded::new(DEFAULT, &Snapshot { secret, roots }))
        .clone()
}

/// A `DiscoveryResponse` of `Secret`s, its resources encoded once (see the
/// module documentation). Only the agent encodes it: it is never decoded.
#[derive(Debug, Default)]
pub struct SdsResponse {
    /// The resources' versions, joined with `-`.
    pub version_info: String,
    resources: Vec<Arc<Encoded>>,
    pub nonce: String,
}

/// `DiscoveryResponse`'s fields.
const VERSION_INFO: u32 = 1;
const RESOURCES: u32 = 2;
const TYPE_URL: u32 = 4;
const NONCE: u32 = 5;

impl SdsResponse {
    /// The response for `names`; its version joins the resources' versions.
    pub fn new(names: &ResourceNames, snap: &Snapshot<'_>, nonce: String) -> Self {
        let resources: Vec<Arc<Encoded>> =
            names.as_slice().iter().map(|n| resource(n, snap)).collect();
        let mut version_info = String::new();
        for (i, r) in resources.iter().enumerate() {
            if i > 0 {
                version_info.push('-');
            }
            version_info.push_str(&r.version);
        }
        Self {
            version_info,
            resources,
            nonce,
        }
    }
}

impl Message for SdsResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.version_info.is_empty() {
            put_bytes(VERSION_INFO, self.version_info.as_bytes(), buf);
        }
        for r in &self.resources {
            put_bytes(RESOURCES, &r.any, buf);
        }
        put_bytes(TYPE_URL, SECRET_TYPE_URL.as_bytes(), buf);
        if !self.nonce.is_empty() {
            put_bytes(NONCE, self.nonce.as_bytes(), buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let mut len = bytes_len(TYPE_URL, SECRET_TYPE_URL.len());
        if !self.version_info.is_empty() {
            len += bytes_len(VERSION_INFO, self.version_info.len());
        }
        for r in &self.resources {
            len += bytes_len(RESOURCES, r.any.len());
        }
        if !self.nonce.is_empty() {
            len += bytes_len(NONCE, self.nonce.len());
        }
        len
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Writes a length-delimited field.
fn put_bytes(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(bytes.len() as u64, buf);
    buf.put_slice(bytes);
}

/// The encoded length of a length-delimited field of `len` bytes.
fn bytes_len(tag: u32, len: usize) -> usize {
    encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len
}

#[cfg(test)]
#[path = "encoded_tests.rs"]
mod tests;
