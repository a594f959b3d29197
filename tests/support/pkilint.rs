//! DigiCert's RFC 5280 linter, pkilint (PyPI `pkilint`, pinned in
//! peers.txt), on certificates the agent served: `lint_pkix_cert` on each
//! certificate, and `lint_pkix_signer_signee_cert_chain` on an issuer and
//! the certificate it signed. Both guess the kind of certificate (root,
//! end entity) from its extensions.
//!
//! A certificate passes with no finding of severity ERROR or FATAL, with one
//! exception: `pkix.invalid_uri_syntax` on the expected `spiffe://` ID.
//! pkilint checks a URI with the `validators` package's `url`, which accepts
//! only the schemes ftp, ftps, git, http, https, rtsp, sftp, ssh and telnet,
//! so it reports every SPIFFE ID, although a SPIFFE ID is a valid RFC 3986
//! URI. The exception covers exactly the SPIFFE ID the certificate must
//! carry, so a malformed or unexpected URI still fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::agent::Agent;

/// One finding of pkilint.
#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub validator: String,
    pub node: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}) {} @ {}: {}",
            self.code, self.severity, self.validator, self.node, self.message
        )
    }
}

/// Runs `tool lint -f JSON FILES...` and reads its findings (every severity).
/// pkilint exits non-zero when it finds anything, so the exit code is not
/// read; output that is not its JSON fails the test.
fn run(tool: &str, files: &[&Path]) -> Vec<Finding> {
    let out = Command::new(tool)
        .args(["lint", "-f", "JSON"])
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (pkilint, from peers.txt): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "{tool} {files:?} gave no JSON ({e}):\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut findings = Vec::new();
    for result in json["results"].as_array().expect("a results list") {
        for d in result["finding_descriptions"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            findings.push(Finding {
                severity: s(&d["severity"]),
                code: s(&d["code"]),
                message: s(&d["message"]),
                validator: s(&result["validator"]),
                node: s(&result["node_path"]),
            });
        }
    }
    findings
}

/// Whether `f` fails a certificate whose one URI SAN must be `spiffe_id`.
fn fails(f: &Finding, spiffe_id: &str) -> bool {
    let excepted = f.code == "pkix.invalid_uri_syntax"
        && f.message == format!("Invalid URI syntax: \"{spiffe_id}\"");
    matches!(f.severity.as_str(), "ERROR" | "FATAL") && !excepted
}

/// Lints `root` (a root's PEM), `leaf` (the first certificate of a chain's
/// PEM) and the pair, saving each into `dir`; panics, naming `what` and
/// listing every finding, on any that fails (see the module's doc).
pub fn assert_accepts(what: &str, dir: &Path, root: &str, leaf: &str, spiffe_id: &str) {
    let save = |name: &str, pem: &str| -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, first_cert(pem)).unwrap();
        path
    };
    let (root_path, leaf_path) = (save("root.pem", root), save("leaf.pem", leaf));
    let checks = [
        ("root", run("lint_pkix_cert", &[&root_path])),
        ("leaf", run("lint_pkix_cert", &[&leaf_path])),
        (
            "root -> leaf",
            run(
                "lint_pkix_signer_signee_cert_chain",
                &[&root_path, &leaf_path],
            ),
        ),
    ];
    let mut failed = Vec::new();
    let mut all = String::new();
    for (which, findings) in &checks {
        for f in findings {
            all.push_str(&format!("  {what} {which}: {f}\n"));
            if fails(f, spiffe_id) {
                failed.push(format!("{which}: {f}"));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "pkilint refuses the {what} certificates:\n  {}\nevery finding:\n{all}\nroot:\n{root}\nleaf:\n{leaf}",
        failed.join("\n  ")
    );
}

/// The chain and root the agent wrote into `out` (`OUTPUT_CERTS`), once
/// there; panics with the agent's log after 30 s.
pub fn served_files(agent: &Agent, out: &Path) -> (String, String) {
    let root = out.join("root-cert.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !root.exists() {
        assert!(
            Instant::now() < deadline,
            "no certificate files in {}; log:\n{}",
            out.display(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    (read("cert-chain.pem"), read("root-cert.pem"))
}

/// The first PEM certificate block of `pem`.
fn first_cert(pem: &str) -> String {
    const END: &str = "-----END CERTIFICATE-----";
    let end = pem.find(END).expect("a PEM certificate") + END.len();
    format!("{}\n", pem[..end].trim_start())
}
