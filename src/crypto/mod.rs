//! Keys, CSRs and the checks every issued certificate passes before it is served.
//!
//! The private key is made here and leaves the process only inside an SDS
//! response to Envoy. Its PEM is zeroed on drop and never printed.
//!
//! - [`key`]: the key types and the private key, its CSR.
//! - [`cert`]: reading certificates: PEM and DER, facts, who issued whom.
//! - [`verify`]: the checks of an issued chain.
//! - [`svid_rules`]: the X.509-SVID rules a leaf must keep.

mod cert;
mod key;
pub mod svid_rules;
mod verify;

pub use cert::{
    cert_not_after, cert_summary, der_to_pem, is_issued_by, is_self_signed, pem_to_der,
    split_pem_certs,
};
pub use key::{KeyType, PrivateKey};
pub use svid_rules::{Breach, SvidRule};
pub use verify::{verify_issued, IssuedChain, LeafInfo};

/// Errors from key generation, CSR creation and certificate checks.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key generation failed: {0}")]
    KeyGen(String),
    #[error("CSR creation failed: {0}")]
    Csr(String),
    #[error("invalid certificate from the CA: {0}")]
    BadCertificate(String),
    /// The leaf breaks X.509-SVID rules that refuse it.
    #[error(
        "a certificate that is not an X.509-SVID: {}",
        svid_rules::describe(.0)
    )]
    NotSvid(Vec<Breach>),
}

#[cfg(test)]
mod tests;
