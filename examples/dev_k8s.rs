//! `dev_k8s`: a DEVELOPMENT STAND-IN for the Kubernetes pieces that node-agent
//! and Vault/OpenBao talk to. It is not part of the agent and is never needed
//! in a real cluster; `./quickstart.sh` uses it to run the Istio Vault CA
//! tutorial on one machine without a cluster.
//!
//! It plays two roles of the kube-apiserver:
//! * the service-account token issuer (the key behind
//!   `--service-account-key-file`), minting projected service-account JWTs
//!   like the kubelet mounts at
//!   `/var/run/secrets/kubernetes.io/serviceaccount/token`;
//! * the TokenReview API (`POST /apis/authentication.k8s.io/v1/tokenreviews`)
//!   that Vault's `kubernetes` auth method calls to check a login JWT. It
//!   really verifies the RS256 signature, expiry and audience.
//!
//! ```text
//! dev_k8s keygen KEY_PEM_OUT PUB_PEM_OUT          # new RSA-2048 issuer key
//! dev_k8s mint KEY_PEM NAMESPACE SA [TTL_SECONDS]  # prints a JWT (default 1h)
//! dev_k8s token-review PUB_PEM PORT               # serves until killed
//! ```
//!
//! The code is the integration tests' fake control plane, shared verbatim.

#[path = "../tests/support/k8s/mod.rs"]
#[allow(dead_code)]
mod k8s;

use std::time::Duration;

use anyhow::{bail, Context};

const USAGE: &str = "usage:
  dev_k8s keygen KEY_PEM_OUT PUB_PEM_OUT
  dev_k8s mint KEY_PEM NAMESPACE SA [TTL_SECONDS]
  dev_k8s token-review PUB_PEM PORT";

fn read(path: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {path}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["keygen", key_out, pub_out] => {
            // Same caching helper as the tests: writes the key with mode 0600.
            let issuer = k8s::TestIssuer::load_or_generate(key_out.as_ref())?;
            std::fs::write(pub_out, issuer.public_key_pem())
                .with_context(|| format!("write {pub_out}"))?;
        }
        ["mint", key, ns, sa, rest @ ..] if rest.len() <= 1 => {
            let ttl = match rest.first() {
                Some(s) => s.parse().context("TTL_SECONDS must be a number")?,
                None => 3600,
            };
            let issuer = k8s::TestIssuer::from_pem(&read(key)?)?;
            println!("{}", issuer.mint(ns, sa, Duration::from_secs(ttl)));
        }
        ["token-review", public, port] => {
            let port: u16 = port.parse().context("PORT must be a number")?;
            let pem = read(public)?;
            println!(
                "dev_k8s: TokenReview API (development stand-in for the kube-apiserver) \
                 listening on http://127.0.0.1:{port}{}",
                k8s::TOKEN_REVIEW_PATH
            );
            k8s::serve_forever(&pem, port).await?;
        }
        _ => bail!("{USAGE}"),
    }
    Ok(())
}
