//! Where a request's credential (the workload's JWT) comes from, and the
//! checks made on it before anything else: it must be a service-account JWT
//! that has not expired. An expired JWT is refused here, before any cache
//! lookup, whatever the CA said about it before.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::metadata::{Binary, MetadataMap, MetadataValue};
use tonic::Status;
use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::identity::Credential;

/// gRPC metadata carrying the workload's JWT (Istio 1.2+ spelling).
pub const CREDENTIAL_HEADER: &str = "istio_sds_credentials_header-bin";
/// Istio 1.1's misspelt header, still accepted.
pub const CREDENTIAL_HEADER_1_1: &str = "istio_sds_credentail_header-bin";

/// Where a stream's credential comes from.
#[derive(Clone, Debug)]
pub(crate) enum CredentialSource {
    /// Sent by Envoy in the stream's metadata.
    Header(Credential),
    /// Read from `WORKLOAD_TOKEN_PATH`, fresh on each use (kubelet rotates it).
    TokenFile(TokenFile),
    /// Nothing: the request is refused.
    Missing,
}

/// The last raw credential read from one place (a connection's header, a
/// token file) and the credential read from it. The same bytes come again
/// and again (an Envoy sends the same JWT in every request of a connection;
/// every stream of a pod reads the same token file), and decoding the
/// base64 and reading the claims again were a tenth of a cached
/// `FetchSecrets`: bytes that are the remembered ones get the remembered
/// credential, whose claims are already read and whose clones share one
/// copy. Its expiry is still checked at each use.
pub(crate) struct Remembered<R>(Mutex<Option<(R, Credential)>>);

impl<R> Default for Remembered<R> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<R> Remembered<R> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(R, Credential)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The remembered credential, if `same` says the bytes read now are the
    /// remembered ones.
    fn get(&self, same: impl FnOnce(&R) -> bool) -> Option<Credential> {
        match &*self.lock() {
            Some((raw, cred)) if same(raw) => Some(cred.clone()),
            _ => None,
        }
    }

    fn remember(&self, raw: R, cred: &Credential) {
        *self.lock() = Some((raw, cred.clone()));
    }
}

/// The last credential header a connection sent, as sent, and the
/// credential read from it.
pub(crate) type LastCredential = Remembered<MetadataValue<Binary>>;

/// `WORKLOAD_TOKEN_PATH`, shared by every stream served from it, with the
/// token it held last and the credential read from it.
#[derive(Clone, Debug)]
pub struct TokenFile(Arc<TokenFileInner>);

struct TokenFileInner {
    path: PathBuf,
    last: Remembered<Zeroizing<String>>,
}

impl std::fmt::Debug for TokenFileInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenFile({})", self.path.display())
    }
}

impl TokenFile {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self(Arc::new(TokenFileInner {
            path,
            last: Remembered::default(),
        }))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0.path
    }

    /// The credential in the file now: the one read last when its bytes are
    /// the same, else a new one (then remembered).
    fn read(&self) -> std::io::Result<Option<Credential>> {
        let token = Zeroizing::new(std::fs::read_to_string(&self.0.path)?);
        if token.trim().is_empty() {
            return Ok(None);
        }
        if let Some(cred) = self.0.last.get(|raw| *raw == token) {
            return Ok(Some(cred));
        }
        let cred = Credential::new(token.as_str());
        self.0.last.remember(token, &cred);
        Ok(Some(cred))
    }
}

impl CredentialSource {
    /// [`Self::from_metadata_on`] with nothing remembered.
    #[cfg(test)]
    pub(crate) fn from_metadata(md: &MetadataMap, token_file: Option<&TokenFile>) -> Self {
        Self::from_metadata_on(md, token_file, None)
    }

    /// [`Self::from_metadata`], reusing the credential `last` remembers when
    /// the request's header is the same (see [`LastCredential`]).
    pub(crate) fn from_metadata_on(
        md: &MetadataMap,
        token_file: Option<&TokenFile>,
        last: Option<&LastCredential>,
    ) -> Self {
        for key in [CREDENTIAL_HEADER, CREDENTIAL_HEADER_1_1] {
            if let Some(v) = md.get_bin(key) {
                if let Some(cred) =
                    last.and_then(|l| l.get(|raw| raw.as_encoded_bytes() == v.as_encoded_bytes()))
                {
                    return Self::Header(cred);
                }
                if let Ok(bytes) = v.to_bytes() {
                    if let Ok(s) = std::str::from_utf8(&bytes) {
                        if !s.trim().is_empty() {
                            let cred = Credential::new(s);
                            if let Some(last) = last {
                                last.remember(v.clone(), &cred);
                            }
                            return Self::Header(cred);
                        }
                    }
                }
            }
        }
        if let Some(v) = md.get("authorization").and_then(|v| v.to_str().ok()) {
            let v = v.trim();
            if v.len() > 7 && v.is_char_boundary(7) && v[..7].eq_ignore_ascii_case("bearer ") {
                return Self::Header(Credential::new(&v[7..]));
            }
        }
        match token_file {
            Some(f) => Self::TokenFile(f.clone()),
            None => Self::Missing,
        }
    }

    /// True when the credential is read from `WORKLOAD_TOKEN_PATH`.
    pub(crate) fn is_token_file(&self) -> bool {
        matches!(self, Self::TokenFile(_))
    }

    /// The credential, or `UNAUTHENTICATED` saying what is wrong with it:
    /// missing, not a service-account JWT, or expired by `clock`.
    pub(crate) fn get(&self, clock: &Clock) -> Result<Credential, Status> {
        let cred = match self {
            Self::Header(c) => c.clone(),
            Self::TokenFile(f) => match f.read() {
                Ok(Some(cred)) => cred,
                Ok(None) => {
                    return Err(Status::unauthenticated(format!(
                        "no credential: the request carries none and WORKLOAD_TOKEN_PATH {} is empty",
                        f.path().display()
                    )))
                }
                Err(e) => {
                    return Err(Status::unauthenticated(format!(
                        "no credential: the request carries none and WORKLOAD_TOKEN_PATH {} cannot be read: {e}",
                        f.path().display()
                    )))
                }
            },
            Self::Missing => {
                return Err(Status::unauthenticated(format!(
                    "no credential: send the workload's JWT in gRPC metadata {CREDENTIAL_HEADER} \
                     (or authorization: Bearer), or set WORKLOAD_TOKEN_PATH"
                )))
            }
        };
        if let Err(e) = cred.check_current(clock) {
            return Err(Status::unauthenticated(format!("invalid credential: {e}")));
        }
        Ok(cred)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    fn jwt(payload: &str) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    fn with_header(value: &str) -> MetadataMap {
        let mut md = MetadataMap::new();
        md.insert_bin(
            CREDENTIAL_HEADER,
            tonic::metadata::MetadataValue::from_bytes(value.as_bytes()),
        );
        md
    }

    #[test]
    fn streams_of_one_token_file_share_one_credential_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let first = jwt(r#"{"sub":"system:serviceaccount:a:b","exp":4000000000}"#);
        std::fs::write(&path, &first).unwrap();
        let file = TokenFile::new(path.clone());
        let clock = Clock::system();
        let get = || {
            CredentialSource::from_metadata(&MetadataMap::new(), Some(&file))
                .get(&clock)
                .unwrap()
        };
        let (a, b) = (get(), get());
        assert!(a.shares(&b), "two streams, one credential");
        let second = jwt(r#"{"sub":"system:serviceaccount:a:c","exp":4000000000}"#);
        std::fs::write(&path, &second).unwrap();
        let c = get();
        assert_eq!(c.expose(), second, "the file's new token");
        assert!(!c.shares(&a));
        assert!(c.shares(&get()));
    }

    #[test]
    fn an_expired_jwt_is_unauthenticated() {
        let expired = jwt(r#"{"sub":"system:serviceaccount:a:b","exp":1000}"#);
        let err = CredentialSource::from_metadata(&with_header(&expired), None)
            .get(&Clock::system())
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(
            err.message().contains("expired at 1000"),
            "{}",
            err.message()
        );
        let live = jwt(r#"{"sub":"system:serviceaccount:a:b","exp":99999999999}"#);
        assert!(CredentialSource::from_metadata(&with_header(&live), None)
            .get(&Clock::system())
            .is_ok());
    }

    #[test]
    fn a_remembered_header_is_still_checked_and_a_new_one_is_read_afresh() {
        let last = LastCredential::default();
        let get = |v: &str| CredentialSource::from_metadata_on(&with_header(v), None, Some(&last));
        let live = jwt(r#"{"sub":"system:serviceaccount:a:b","exp":99999999999}"#);
        let other = jwt(r#"{"sub":"system:serviceaccount:c:d","exp":99999999999}"#);
        let expired = jwt(r#"{"sub":"system:serviceaccount:a:b","exp":1000}"#);
        for _ in 0..2 {
            let c = get(&live).get(&Clock::system()).unwrap();
            assert_eq!(c.expose(), live);
            // Another header on the same connection is that header's credential.
            let c = get(&other).get(&Clock::system()).unwrap();
            assert_eq!(c.expose(), other);
            assert_eq!(c.claims().unwrap().service_account.namespace, "c");
            // Remembered or not, an expired JWT is refused at each request.
            let err = get(&expired).get(&Clock::system()).unwrap_err();
            assert!(
                err.message().contains("expired at 1000"),
                "{}",
                err.message()
            );
            assert!(matches!(&*last.lock(), Some((_, c)) if c.expose() == expired));
        }
    }

    #[test]
    fn a_short_or_odd_authorization_header_is_not_a_bearer_token() {
        for v in ["Bearer", "bearer x", "Bearerx y", "Basic abc"] {
            let mut md = MetadataMap::new();
            md.insert("authorization", v.parse().unwrap());
            let src = CredentialSource::from_metadata(&md, None);
            let is_header = matches!(src, CredentialSource::Header(_));
            assert_eq!(is_header, v == "bearer x", "{v}");
        }
    }
}
