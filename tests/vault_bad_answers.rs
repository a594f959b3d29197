//! A Vault that answers garbage, or a real certificate for another key, is
//! refused with a clear log line and nothing is served. A small tampering
//! front sits between the agent and a real OpenBao: logins pass through, and
//! sign answers are replaced.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::agent::Agent;
use support::sds_client::*;
use support::vault_env::VaultEnv;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tonic::Code;

#[derive(Clone, Copy)]
enum Tamper {
    /// Sign answers are not JSON.
    Garbage,
    /// Sign answers carry a real certificate from the real PKI, for another key.
    OtherKey,
    /// Sign answers are JSON without a certificate.
    NoCertificate,
}

/// Serves plain HTTP on a free port; forwards to `bao` except sign requests.
async fn tamper_front(bao_addr: String, client: reqwest::Client, mode: Tamper) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ctx = Arc::new((bao_addr, client));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                    let (mut len, mut token) = (0usize, None);
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).await.unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap();
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => len = v.trim().parse().unwrap(),
                            "x-vault-token" => token = Some(v.trim().to_string()),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).await.unwrap();
                    let (bao, client) = (&ctx.0, &ctx.1);
                    let answer = if path.ends_with("/sign/istio-pki-role") {
                        match mode {
                            Tamper::Garbage => "{this is not json".to_string(),
                            Tamper::NoCertificate => {
                                json!({"data": {"serial_number": "01"}}).to_string()
                            }
                            Tamper::OtherKey => {
                                // A genuine sign at the real PKI, for a CSR of another key.
                                let req: Value = serde_json::from_slice(&body).unwrap();
                                let csr_params = rcgen::CertificateSigningRequestParams::from_pem(
                                    req["csr"].as_str().unwrap(),
                                )
                                .unwrap();
                                let other = rcgen::KeyPair::generate().unwrap();
                                let other_csr = csr_params
                                    .params
                                    .serialize_request(&other)
                                    .unwrap()
                                    .pem()
                                    .unwrap();
                                let mut forged = req.clone();
                                forged["csr"] = Value::String(other_csr);
                                client
                                    .post(format!("{bao}{path}"))
                                    .header("X-Vault-Token", token.clone().unwrap_or_default())
                                    .json(&forged)
                                    .send()
                                    .await
                                    .unwrap()
                                    .text()
                                    .await
                                    .unwrap()
                            }
                        }
                    } else {
                        client
                            .post(format!("{bao}{path}"))
                            .body(body)
                            .header("content-type", "application/json")
                            .send()
                            .await
                            .unwrap()
                            .text()
                            .await
                            .unwrap()
                    };
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if w.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

async fn refused(mode: Tamper, expect: &str) {
    let env = VaultEnv::start().await;
    let front = tamper_front(env.bao.addr(), env.bao.client().clone(), mode).await;
    let mut vars: Vec<(&str, String)> = env
        .agent_env()
        .into_iter()
        .filter(|(k, _)| !matches!(*k, "VAULT_ADDR" | "CA_ADDR" | "VAULT_TLS_ROOT_CERT"))
        .collect();
    vars.push(("VAULT_ADDR", front.clone()));
    let agent = Agent::start(&vars);
    let mut client = connect(&agent.socket).await;
    let err = client
        .fetch_secrets(with_jwt(
            request(&["default", "ROOTCA"], None),
            &env.jwt("default", "httpbin"),
        ))
        .await
        .expect_err("a bad answer must not be served");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains(expect), "{}", err.message());
    agent.wait_log(
        &format!("Failed to sign cert for \"default,ROOTCA\": "),
        Duration::from_secs(5),
    );
    agent.wait_log(expect, Duration::from_secs(5));
    assert!(
        agent.log().contains(&format!("Vault at {front}")),
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_vault_is_refused() {
    refused(Tamper::Garbage, "The answer is not JSON").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_a_certificate_is_refused() {
    refused(Tamper::NoCertificate, "no data.certificate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_key_is_refused() {
    refused(
        Tamper::OtherKey,
        "the certificate is not for the key this agent generated; not served",
    )
    .await;
}
