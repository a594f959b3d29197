//! `node-agent vault-setup`: from an empty Vault/OpenBao to a locked-down
//! mesh CA in one command, and the settings node-agent needs to use it.
//!
//! It makes, each only when missing or different (and says which):
//! 1. the PKI mount (`--pki-path`) and its max lease TTL;
//! 2. its CA: a generated root, or the intermediate in `--ca-bundle`;
//! 3. the auth method (`kubernetes` or `jwt`) and its configuration;
//! 4. the PKI role, whose only allowed SAN is the URI
//!    `spiffe://<trust-domain>/ns/<namespace>/sa/<name>` of the service
//!    account that logged in, filled in by Vault from the login's entity
//!    alias: even a compromised agent cannot have another identity signed;
//! 5. the policy: `update` on the sign path and `auth/token/revoke-self`,
//!    nothing else;
//! 6. the auth role, bound to the given namespaces and service accounts,
//!    its tokens without Vault's `default` policy.
//!
//! Progress goes to stderr; the settings (`KEY=value` lines) go to stdout, so
//! `node-agent vault-setup ... > node-agent.env` keeps them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, ValueEnum};

use crate::cli::parse_duration;
use crate::crypto::KeyType;

mod auth;
mod client;
mod desired;
mod object;
mod pki;
mod plan;
mod report;
mod role;

pub use client::SetupError;
use plan::{plan, settings};
use report::Report;

/// Token type of the auth role's logins (`--token-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TokenType {
    /// Not stored by Vault: no storage write per login, not revocable, expires with its TTL.
    Batch,
    /// Stored with a lease: revocable and renewable, one storage write per login.
    Service,
}

impl TokenType {
    fn as_str(self) -> &'static str {
        match self {
            TokenType::Batch => "batch",
            TokenType::Service => "service",
        }
    }
}

/// The auth method workloads log in with (`--auth-method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMethod {
    /// Vault asks the kube-apiserver's TokenReview API about each JWT.
    Kubernetes,
    /// Vault checks each JWT's signature itself (keys or OIDC discovery), for
    /// a Vault that cannot reach the kube-apiserver.
    Jwt,
}

impl AuthMethod {
    fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Kubernetes => "kubernetes",
            AuthMethod::Jwt => "jwt",
        }
    }
}

/// `node-agent vault-setup` flags. Vault is reached with the standard
/// variables VAULT_ADDR, VAULT_TOKEN, VAULT_CACERT and VAULT_NAMESPACE
/// (OpenBao's BAO_* spellings are read when those are unset), and
/// VAULT_TLS_SYSTEM_ROOTS as the agent reads it.
#[derive(ClapArgs, Debug)]
#[command(
    after_help = "Progress goes to stderr; the node-agent settings go to stdout:\n  \
    node-agent vault-setup --kubernetes-host https://10.0.0.1:443 --kubernetes-ca-cert ca.crt \\\n    \
    --bound-namespaces default --bound-service-accounts httpbin,sleep > node-agent.env\n\
    Running it again changes only what differs. See docs/vault-setup.md."
)]
pub struct Args {
    /// Print every request instead of changing anything (reads are still made)
    #[arg(long)]
    pub dry_run: bool,

    /// SPIFFE trust domain of the certificates' URI SANs
    #[arg(long, default_value = crate::config::DEFAULT_TRUST_DOMAIN, value_name = "DOMAIN")]
    pub trust_domain: String,

    /// Path of the PKI secrets engine
    #[arg(long, default_value = "istio_ca", value_name = "PATH")]
    pub pki_path: String,

    /// The PKI mount's max lease TTL: the longest any certificate from it,
    /// the generated root included, can live
    #[arg(long, default_value = "87600h", value_parser = parse_duration, value_name = "DURATION")]
    pub pki_max_lease_ttl: Duration,

    /// PEM file with an intermediate CA's private key and certificate, then
    /// its chain up to the root: imported as the mount's issuer instead of a
    /// generated root
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,

    /// Common name of the generated root (without --ca-bundle)
    #[arg(long, value_name = "NAME")]
    pub root_common_name: Option<String>,

    /// Key type of the generated root
    #[arg(long, default_value = "ec-p256", value_name = "TYPE")]
    pub root_key_type: KeyType,

    /// Name of the PKI role that signs workload CSRs
    #[arg(long, default_value = "istio-pki-role", value_name = "NAME")]
    pub pki_role: String,

    /// Longest lifetime of a workload certificate (the PKI role's max_ttl)
    #[arg(long, default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub max_ttl: Duration,

    /// Name of the ACL policy that allows signing
    #[arg(long, default_value = "istio-cert-policy", value_name = "NAME")]
    pub policy: String,

    /// How workloads log in
    #[arg(long, value_enum, default_value_t = AuthMethod::Kubernetes)]
    pub auth_method: AuthMethod,

    /// Path of the auth method [default: the method's name]
    #[arg(long, value_name = "PATH")]
    pub auth_path: Option<String>,

    /// Name of the auth role node-agent logs in with (VAULT_ROLE)
    #[arg(long, default_value = "istio-cert", value_name = "NAME")]
    pub auth_role: String,

    /// Namespaces whose service accounts may log in (comma list, `*` for any)
    #[arg(long, value_name = "LIST", required = true)]
    pub bound_namespaces: String,

    /// Service accounts that may log in (comma list, `*` for any)
    #[arg(long, value_name = "LIST", required = true)]
    pub bound_service_accounts: String,

    /// Lifetime of the Vault token a login gives
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    pub token_ttl: Duration,

    /// Type of the Vault token a login gives (see docs/vault-setup.md for the measurements behind the default)
    #[arg(long, value_enum, default_value_t = TokenType::Batch)]
    pub token_type: TokenType,

    /// Audience the workloads' JWTs carry: the kubernetes role's `audience`
    /// (optional), the jwt role's `bound_audiences` (required)
    #[arg(long, value_name = "AUD")]
    pub audience: Option<String>,

    /// kubernetes: URL of the kube-apiserver (TokenReview API)
    #[arg(long, value_name = "URL")]
    pub kubernetes_host: Option<String>,

    /// kubernetes: PEM file of the CA of the kube-apiserver's TLS certificate
    #[arg(long, value_name = "FILE")]
    pub kubernetes_ca_cert: Option<PathBuf>,

    /// kubernetes: file holding the JWT Vault presents to the TokenReview API
    /// (a service account with system:auth-delegator)
    #[arg(long, value_name = "FILE")]
    pub token_reviewer_jwt: Option<PathBuf>,

    /// kubernetes: write the token reviewer JWT even when Vault already has
    /// one (Vault never shows it, so a changed file cannot be detected)
    #[arg(long, requires = "token_reviewer_jwt")]
    pub replace_token_reviewer_jwt: bool,

    /// jwt: PEM file of the public key(s) that sign service-account tokens
    #[arg(long, value_name = "FILE", conflicts_with = "oidc_discovery_url")]
    pub jwt_validation_pubkeys: Option<PathBuf>,

    /// jwt: OIDC discovery URL of the service-account issuer
    #[arg(long, value_name = "URL")]
    pub oidc_discovery_url: Option<String>,

    /// jwt: PEM file of the CA of the OIDC discovery URL's TLS certificate
    #[arg(long, value_name = "FILE", requires = "oidc_discovery_url")]
    pub oidc_discovery_ca_cert: Option<PathBuf>,

    /// jwt: the `iss` the workloads' JWTs must carry (bound_issuer)
    #[arg(long, value_name = "ISS")]
    pub jwt_issuer: Option<String>,
}

/// Runs `vault-setup`; prints a one-line error and returns 1 (2 for unusable
/// input) when it fails.
pub async fn run(args: Args) -> ExitCode {
    match setup(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "node-agent vault-setup: error: {}",
                crate::cli::one_line(&e.to_string())
            );
            ExitCode::from(e.exit_code())
        }
    }
}

async fn setup(args: Args) -> Result<(), SetupError> {
    let plan = plan(args, &|k| std::env::var(k).ok())?;
    let v = &plan.admin;
    let mut report = Report::new(v.dry_run());
    if v.dry_run() {
        eprintln!(
            "dry run: reading from Vault at {}, changing nothing",
            v.addr()
        );
    } else {
        eprintln!("configuring Vault at {}", v.addr());
    }
    v.check_token().await?;
    // Mounts of the wrong type stop the run before anything is changed.
    let mounts = v.read("sys/mounts").await?.unwrap_or_default();
    let pki_mount = pki::existing_mount(&mounts, &plan.pki_path)?;
    let auths = v.read("sys/auth").await?.unwrap_or_default();
    let auth_mount = auth::existing_method(&auths, &plan.auth_path, &plan.auth)?;

    let mount_fresh = pki::ensure_mount(
        v,
        &mut report,
        &plan.pki_path,
        pki_mount.as_ref(),
        plan.pki_max_lease_ttl,
    )
    .await?;
    pki::ensure_ca(v, &mut report, &plan.pki_path, &plan.ca, mount_fresh).await?;
    let method = auth::ensure_method(
        v,
        &mut report,
        &plan.auth_path,
        auth_mount.as_ref(),
        &plan.auth,
    )
    .await?;
    auth::ensure_config(v, &mut report, &plan.auth_path, &plan.auth, method.fresh).await?;
    role::ensure_role(
        v,
        &mut report,
        &plan.pki_path,
        &plan.pki_role,
        &plan.trust_domain,
        method.accessor.as_deref(),
        plan.role.max_ttl,
        mount_fresh,
    )
    .await?;
    let sign_path = format!("{}/sign/{}", plan.pki_path, plan.pki_role);
    role::ensure_policy(v, &mut report, &plan.role.policy, &sign_path).await?;
    auth::ensure_role(
        v,
        &mut report,
        &plan.auth_path,
        &plan.auth,
        &plan.role,
        method.fresh,
    )
    .await?;
    report.summary();

    print!("{}", settings(&plan, &sign_path));
    Ok(())
}
