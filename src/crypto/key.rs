//! The workload key algorithm (`KEY_TYPE`), and the private key: made here,
//! it leaves the process only inside an SDS response to Envoy; its PEM is
//! zeroed on drop and never printed.

use std::fmt;
use std::str::FromStr;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use zeroize::Zeroizing;

use super::CryptoError;
use crate::identity::SpiffeId;

/// The workload key algorithm (`KEY_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    EcP256,
    EcP384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl KeyType {
    pub const ACCEPTED: &'static str = "ec-p256, ec-p384, rsa-2048, rsa-3072, rsa-4096";

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
        }
    }

    fn rsa_bits(self) -> Option<usize> {
        match self {
            KeyType::Rsa2048 => Some(2048),
            KeyType::Rsa3072 => Some(3072),
            KeyType::Rsa4096 => Some(4096),
            _ => None,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ec-p256" | "ecdsa-p256" | "p256" => Ok(KeyType::EcP256),
            "ec-p384" | "ecdsa-p384" | "p384" => Ok(KeyType::EcP384),
            "rsa-2048" | "rsa2048" => Ok(KeyType::Rsa2048),
            "rsa-3072" | "rsa3072" => Ok(KeyType::Rsa3072),
            "rsa-4096" | "rsa4096" => Ok(KeyType::Rsa4096),
            _ => Err(format!(
                "unknown key type; accepted values are {}",
                Self::ACCEPTED
            )),
        }
    }
}

/// A private key whose PEM (PKCS#8) is zeroed on drop and never shown.
pub struct PrivateKey {
    key_type: KeyType,
    pkcs8_pem: Zeroizing<String>,
    key_pair: KeyPair,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey({}, redacted)", self.key_type)
    }
}

impl PrivateKey {
    /// Generates a fresh key. RSA keys are slow to make (hundreds of ms for
    /// 4096 bits): callers run this on a blocking thread.
    pub fn generate(key_type: KeyType) -> Result<Self, CryptoError> {
        let kg = |e: &dyn fmt::Display| CryptoError::KeyGen(e.to_string());
        let (pem, alg) = match key_type.rsa_bits() {
            Some(bits) => {
                use rsa::pkcs8::EncodePrivateKey;
                let key =
                    rsa::RsaPrivateKey::new(&mut rand::thread_rng(), bits).map_err(|e| kg(&e))?;
                let pem = key
                    .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                    .map_err(|e| kg(&e))?;
                (Zeroizing::new(pem.to_string()), &rcgen::PKCS_RSA_SHA256)
            }
            None => {
                let alg = match key_type {
                    KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
                    _ => &rcgen::PKCS_ECDSA_P256_SHA256,
                };
                let kp = KeyPair::generate_for(alg).map_err(|e| kg(&e))?;
                (Zeroizing::new(kp.serialize_pem()), alg)
            }
        };
        let key_pair = KeyPair::from_pkcs8_pem_and_sign_algo(&pem, alg).map_err(|e| kg(&e))?;
        Ok(Self {
            key_type,
            pkcs8_pem: pem,
            key_pair,
        })
    }

    /// Loads a PKCS#8 PEM key (the local CA's persisted key).
    pub fn from_pem(pem: &str) -> Result<Self, CryptoError> {
        let key_pair = KeyPair::from_pem(pem)
            .map_err(|e| CryptoError::KeyGen(format!("cannot load key: {e}")))?;
        let key_type = if key_pair.algorithm() == &rcgen::PKCS_ECDSA_P384_SHA384 {
            KeyType::EcP384
        } else if key_pair.algorithm() == &rcgen::PKCS_ECDSA_P256_SHA256 {
            KeyType::EcP256
        } else {
            KeyType::Rsa2048
        };
        Ok(Self {
            key_type,
            pkcs8_pem: Zeroizing::new(pem.to_string()),
            key_pair,
        })
    }

    /// The PKCS#8 PEM, for Envoy (over SDS) and the local CA's 0600 key file only.
    pub fn pkcs8_pem(&self) -> &str {
        &self.pkcs8_pem
    }

    /// DER SubjectPublicKeyInfo, to check that an issued certificate is for this key.
    pub fn public_key_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&self.key_pair)
    }

    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key_pair
    }

    /// A CSR with an empty subject and exactly one SAN, the URI `spiffe_id`.
    pub fn csr_pem(&self, spiffe_id: &SpiffeId) -> Result<String, CryptoError> {
        let csr_err = |e: &dyn fmt::Display| CryptoError::Csr(e.to_string());
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| csr_err(&e))?;
        params.distinguished_name = DistinguishedName::new();
        let uri = spiffe_id
            .as_str()
            .to_string()
            .try_into()
            .map_err(|e| csr_err(&e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params
            .serialize_request(&self.key_pair)
            .map_err(|e| csr_err(&e))?;
        csr.pem().map_err(|e| csr_err(&e))
    }
}
