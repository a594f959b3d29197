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
//! 5. the policy: `update` on the sign path, nothing else;
//! 6. the auth role, bound to the given namespaces and service accounts.
//!
//! Progress goes to stderr; the settings (`KEY=value` lines) go to stdout, so
//! `node-agent vault-setup ... > node-agent.env` keeps them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args as ClapArgs, ValueEnum};
use zeroize::Zeroizing;

use crate::cli::parse_duration;
use crate::crypto::KeyType;

mod auth;
mod client;
mod desired;
mod object;
mod pki;
mod report;

pub use client::SetupError;
use client::VaultAdmin;
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
/// (OpenBao's BAO_* spellings are read when those are unset).
#[derive(ClapArgs, Debug)]
#[command(
    after_help = "Progress goes to stderr; the node-agent settings go to stdout:\n  \
    node-agent vault-setup --kubernetes-host https://10.0.0.1:443 --kubernetes-ca-cert ca.crt \\\n    \
    --bound-namespaces default --bound-service-accounts httpbin,sleep > node-agent.env\n\
    Running it again changes only what differs. See README.md."
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

    /// Type of the Vault token a login gives (see README for the measurements behind the default)
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

/// Everything read and checked before Vault is contacted.
struct Plan {
    admin: VaultAdmin,
    ca_cert_path: Option<PathBuf>,
    namespace: Option<String>,
    trust_domain: String,
    pki_path: String,
    pki_max_lease_ttl: Duration,
    pki_role: String,
    auth_path: String,
    ca: pki::CaSource,
    auth: auth::AuthSpec,
    role: auth::RoleSpec,
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
    pki::ensure_role(
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
    pki::ensure_policy(v, &mut report, &plan.role.policy, &sign_path).await?;
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

/// The node-agent settings, as `KEY=value` lines.
fn settings(plan: &Plan, sign_path: &str) -> String {
    let mut lines = vec![
        "# node-agent settings written by `node-agent vault-setup`".to_string(),
        "CA_PROVIDER=VaultCA".to_string(),
        format!("VAULT_ADDR={}", shell_word(plan.admin.addr())),
        format!("VAULT_AUTH_PATH=auth/{}/login", plan.auth_path),
        format!("VAULT_ROLE={}", shell_word(&plan.role.name)),
        format!("VAULT_SIGN_CSR_PATH={sign_path}"),
        format!("TRUST_DOMAIN={}", plan.trust_domain),
    ];
    if let Some(p) = &plan.ca_cert_path {
        lines.push(format!(
            "VAULT_TLS_ROOT_CERT={}",
            shell_word(&p.display().to_string())
        ));
    }
    if let Some(ns) = &plan.namespace {
        lines.push(format!("VAULT_NAMESPACE={}", shell_word(ns)));
    }
    // The agent asks for SECRET_TTL (24h by default); Vault would cut a
    // longer request down to the role's max_ttl with only a warning.
    if plan.role.max_ttl < crate::config::DEFAULT_SECRET_TTL {
        lines.push(format!("SECRET_TTL={}s", plan.role.max_ttl.as_secs()));
    }
    lines.join("\n") + "\n"
}

/// A value as one shell word: as is when safe, else single-quoted.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:@%+=,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Reads the environment and the files the flags name, and checks them all,
/// before anything is asked of Vault.
fn plan(args: Args, env: &dyn Fn(&str) -> Option<String>) -> Result<Plan, SetupError> {
    let var = |names: &[&'static str]| -> Option<(&'static str, String)> {
        names.iter().find_map(|n| {
            env(n)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (*n, v.trim().to_string()))
        })
    };
    let (addr_var, addr) = var(&["VAULT_ADDR", "BAO_ADDR"]).ok_or_else(|| {
        SetupError::usage(
            "VAULT_ADDR",
            "not set; export the Vault address, e.g. https://vault:8200",
        )
    })?;
    let addr = check_addr(&addr).map_err(|r| SetupError::usage(format!("{addr_var}={addr}"), r))?;
    let token = var(&["VAULT_TOKEN", "BAO_TOKEN"])
        .map(|(_, t)| Zeroizing::new(t))
        .ok_or_else(|| {
            SetupError::usage(
                "VAULT_TOKEN",
                "not set; export a token that may manage secrets engines, auth methods and policies",
            )
        })?;
    let ca_cert_path = var(&["VAULT_CACERT", "BAO_CACERT"]).map(|(_, p)| PathBuf::from(p));
    let ca_pem = match &ca_cert_path {
        Some(p) => Some(read_file("VAULT_CACERT", p)?),
        None => None,
    };
    let ca_cert_path = ca_cert_path.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    let namespace = var(&["VAULT_NAMESPACE", "BAO_NAMESPACE"]).map(|(_, n)| n);
    let admin = VaultAdmin::new(
        addr,
        token,
        namespace.clone(),
        ca_pem.as_deref(),
        args.dry_run,
    )?;

    crate::config::validate_trust_domain(&args.trust_domain)
        .map_err(|r| SetupError::usage(format!("--trust-domain {}", args.trust_domain), r))?;
    let pki_path = api_path("--pki-path", &args.pki_path)?;
    let pki_role = name("--pki-role", &args.pki_role)?;
    let auth_path = api_path(
        "--auth-path",
        args.auth_path
            .as_deref()
            .unwrap_or(args.auth_method.as_str()),
    )?;
    for (flag, d) in [("--max-ttl", args.max_ttl), ("--token-ttl", args.token_ttl)] {
        if d < Duration::from_secs(60) {
            return Err(SetupError::usage(flag, "must be at least 1m"));
        }
    }
    if args.max_ttl > args.pki_max_lease_ttl {
        return Err(SetupError::usage(
            "--max-ttl",
            format!(
                "{} is longer than --pki-max-lease-ttl {}",
                crate::cli::show_duration(args.max_ttl),
                crate::cli::show_duration(args.pki_max_lease_ttl)
            ),
        ));
    }

    let ca = match &args.ca_bundle {
        Some(path) => pki::CaSource::Bundle(pki::CaBundle::load(path)?),
        None => pki::CaSource::Generate {
            common_name: args
                .root_common_name
                .clone()
                .unwrap_or_else(|| format!("{} mesh root CA", args.trust_domain)),
            ttl: args.pki_max_lease_ttl,
            key_type: args.root_key_type,
        },
    };
    let auth = auth::AuthSpec::from_args(&args)?;
    let role = auth::RoleSpec {
        name: name("--auth-role", &args.auth_role)?,
        policy: name("--policy", &args.policy)?,
        namespaces: comma_list("--bound-namespaces", &args.bound_namespaces)?,
        service_accounts: comma_list("--bound-service-accounts", &args.bound_service_accounts)?,
        token_ttl: args.token_ttl,
        token_type: args.token_type.as_str(),
        max_ttl: args.max_ttl,
    };
    Ok(Plan {
        admin,
        ca_cert_path,
        namespace,
        trust_domain: args.trust_domain,
        pki_path,
        pki_max_lease_ttl: args.pki_max_lease_ttl,
        pki_role,
        auth_path,
        ca,
        auth,
        role,
    })
}

fn check_addr(v: &str) -> Result<String, String> {
    let v = v.trim_end_matches('/');
    let url = reqwest::Url::parse(v).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err("must be an http:// or https:// URL with a host".into());
    }
    Ok(v.to_string())
}

/// A mount path: no slashes at either end, no spaces.
fn api_path(flag: &str, v: &str) -> Result<String, SetupError> {
    let p = v.trim().trim_matches('/');
    if p.is_empty() || p.contains(|c: char| c.is_whitespace() || "?#{}\"".contains(c)) {
        return Err(SetupError::usage(
            format!("{flag} {v:?}"),
            "must be a Vault path such as istio_ca",
        ));
    }
    Ok(p.to_string())
}

/// A role or policy name: one path segment.
fn name(flag: &str, v: &str) -> Result<String, SetupError> {
    let n = v.trim();
    if n.is_empty() || n.contains(|c: char| c.is_whitespace() || "/?#{}\"".contains(c)) {
        return Err(SetupError::usage(
            format!("{flag} {v:?}"),
            "must be a plain name such as istio-cert",
        ));
    }
    Ok(n.to_string())
}

/// A comma list of Kubernetes names or `*` globs.
fn comma_list(flag: &str, v: &str) -> Result<Vec<String>, SetupError> {
    let items: Vec<String> = v
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if items.is_empty() {
        return Err(SetupError::usage(
            flag,
            "must name at least one (or `*` for any)",
        ));
    }
    for i in &items {
        if !i
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.*".contains(c))
        {
            return Err(SetupError::usage(
                format!("{flag} {i:?}"),
                "a Kubernetes name has only lowercase letters, digits, '-' and '.' (or `*`)",
            ));
        }
    }
    Ok(items)
}

/// Reads a file a flag names.
fn read_file(what: &str, path: &Path) -> Result<String, SetupError> {
    std::fs::read_to_string(path).map_err(|e| {
        SetupError::usage(
            format!("{what} {}", path.display()),
            format!("cannot read: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn plan_of(argv: &[&str], env: &[(&str, &str)]) -> Result<Plan, SetupError> {
        let mut full = vec!["vault-setup"];
        full.extend_from_slice(argv);
        let args = Cli::try_parse_from(full).expect("parses").args;
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        plan(args, &|k| env.get(k).cloned())
    }

    const K8S: &[&str] = &[
        "--kubernetes-host",
        "https://10.0.0.1",
        "--bound-namespaces",
        "default",
        "--bound-service-accounts",
        "httpbin, sleep",
    ];
    const ENV: &[(&str, &str)] = &[("VAULT_ADDR", "https://vault:8200/"), ("VAULT_TOKEN", "t")];

    #[test]
    fn settings_name_the_tutorials_paths() {
        let p = plan_of(K8S, ENV).unwrap();
        let s = settings(&p, "istio_ca/sign/istio-pki-role");
        for line in [
            "CA_PROVIDER=VaultCA",
            "VAULT_ADDR=https://vault:8200",
            "VAULT_AUTH_PATH=auth/kubernetes/login",
            "VAULT_ROLE=istio-cert",
            "VAULT_SIGN_CSR_PATH=istio_ca/sign/istio-pki-role",
            "TRUST_DOMAIN=cluster.local",
        ] {
            assert!(s.lines().any(|l| l == line), "{line} missing in\n{s}");
        }
        assert!(!s.contains("SECRET_TTL"), "{s}");
        assert_eq!(p.role.service_accounts, ["httpbin", "sleep"]);
        assert_eq!(shell_word("a b"), "'a b'");
    }

    #[test]
    fn bad_input_is_refused_before_vault_is_asked() {
        type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (K8S, &[("VAULT_TOKEN", "t")], "VAULT_ADDR"),
            (K8S, &[("VAULT_ADDR", "https://v")], "VAULT_TOKEN"),
            (
                K8S,
                &[("VAULT_ADDR", "vault:8200"), ("VAULT_TOKEN", "t")],
                "VAULT_ADDR",
            ),
            (
                &[K8S, &["--trust-domain", "Bad Domain"]].concat(),
                ENV,
                "--trust-domain",
            ),
            (&[K8S, &["--max-ttl", "30s"]].concat(), ENV, "--max-ttl"),
            (
                &[K8S, &["--max-ttl", "20000h", "--pki-max-lease-ttl", "24h"]].concat(),
                ENV,
                "--max-ttl",
            ),
            (
                &[
                    "--kubernetes-host",
                    "h",
                    "--bound-namespaces",
                    "Default",
                    "--bound-service-accounts",
                    "a",
                ],
                ENV,
                "--bound-namespaces",
            ),
            (
                &[K8S, &["--ca-bundle", "/nonexistent"]].concat(),
                ENV,
                "--ca-bundle",
            ),
            (
                &["--bound-namespaces", "a", "--bound-service-accounts", "b"],
                ENV,
                "--kubernetes-host",
            ),
            (
                &[
                    "--auth-method",
                    "jwt",
                    "--bound-namespaces",
                    "a",
                    "--bound-service-accounts",
                    "b",
                ],
                ENV,
                "--jwt-validation-pubkeys",
            ),
        ];
        for (argv, env, names) in cases {
            let err = plan_of(argv, env)
                .err()
                .unwrap_or_else(|| panic!("{argv:?} accepted"));
            assert_eq!(err.exit_code(), 2, "{err}");
            assert!(err.to_string().contains(names), "{argv:?}: {err}");
        }
    }

    #[test]
    fn short_max_ttl_is_passed_on_as_secret_ttl() {
        let p = plan_of(&[K8S, &["--max-ttl", "2h"]].concat(), ENV).unwrap();
        assert!(settings(&p, "x").contains("SECRET_TTL=7200s"));
    }
}
