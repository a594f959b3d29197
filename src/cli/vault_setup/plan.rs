//! What `vault-setup` will do, read from the flags, the environment and the
//! files they name, all checked before Vault is asked anything; and the
//! node-agent settings that result.

use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

use super::client::{SetupError, VaultAdmin};
use super::{auth, pki, Args};
use crate::ca::vault::http_client::{TlsRoots, SYSTEM_ROOTS_SETTING};

/// Everything read and checked before Vault is contacted.
pub(super) struct Plan {
    pub(super) admin: VaultAdmin,
    pub(super) ca_cert_path: Option<PathBuf>,
    /// `VAULT_TLS_SYSTEM_ROOTS=true` was given with `VAULT_CACERT`.
    pub(super) system_roots: bool,
    pub(super) namespace: Option<String>,
    pub(super) trust_domain: String,
    pub(super) pki_path: String,
    pub(super) pki_max_lease_ttl: Duration,
    pub(super) pki_role: String,
    pub(super) auth_path: String,
    pub(super) ca: pki::CaSource,
    pub(super) auth: auth::AuthSpec,
    pub(super) role: auth::RoleSpec,
}

/// The node-agent settings, as `KEY=value` lines.
pub(super) fn settings(plan: &Plan, sign_path: &str) -> String {
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
        if plan.system_roots {
            lines.push(format!("{SYSTEM_ROOTS_SETTING}=true"));
        }
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
pub(super) fn plan(args: Args, env: &dyn Fn(&str) -> Option<String>) -> Result<Plan, SetupError> {
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
    // As for the agent: VAULT_CACERT replaces the system roots unless they
    // are added back.
    let system_roots = match var(&[SYSTEM_ROOTS_SETTING]) {
        None => false,
        Some((_, v)) => crate::config::parse_bool(&v)
            .map_err(|r| SetupError::usage(format!("{SYSTEM_ROOTS_SETTING}={v}"), r))?,
    };
    let namespace = var(&["VAULT_NAMESPACE", "BAO_NAMESPACE"]).map(|(_, n)| n);
    let roots = TlsRoots {
        setting: "VAULT_CACERT",
        pem: ca_pem.as_deref(),
        system_roots,
    };
    let admin = VaultAdmin::new(addr, token, namespace.clone(), roots, args.dry_run)?;
    let system_roots = system_roots && ca_pem.is_some();

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
        system_roots,
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
pub(super) fn read_file(what: &str, path: &Path) -> Result<String, SetupError> {
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

    #[test]
    fn system_roots_added_back_to_vault_cacert_are_passed_on() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["vault".to_string()]).unwrap();
        let ca_file = dir.path().join("vault-ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let ca_file = ca_file.to_str().unwrap();
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut env = ENV.to_vec();
            env.push(("VAULT_CACERT", ca_file));
            env.extend_from_slice(extra);
            plan_of(K8S, &env)
        };
        let only_cacert = settings(&with(&[]).unwrap(), "x");
        assert!(
            only_cacert.contains("VAULT_TLS_ROOT_CERT="),
            "{only_cacert}"
        );
        assert!(
            !only_cacert.contains("VAULT_TLS_SYSTEM_ROOTS"),
            "{only_cacert}"
        );
        let added = settings(&with(&[("VAULT_TLS_SYSTEM_ROOTS", "true")]).unwrap(), "x");
        assert!(
            added.lines().any(|l| l == "VAULT_TLS_SYSTEM_ROOTS=true"),
            "{added}"
        );
        let err = with(&[("VAULT_TLS_SYSTEM_ROOTS", "maybe")])
            .err()
            .expect("refused");
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("VAULT_TLS_SYSTEM_ROOTS=maybe"),
            "{err}"
        );
    }
}
