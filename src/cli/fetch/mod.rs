//! `node-agent fetch`: asks the agent's SDS socket for a workload's
//! certificate (`default`) and trust bundle (`ROOTCA`) exactly as that
//! workload's Envoy does, and shows what came back: to see what Envoy sees
//! without its admin port.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args as ClapArgs, ValueEnum};
use tonic::Code;

use crate::cli::{one_line, parse_duration};
use crate::identity::Credential;
use crate::sds::resources::SERVED;

mod client;
mod inspect;
mod output;

use crate::client::sds::StreamEnd;
use inspect::Resource;

/// Output format (`-o`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// For people: each certificate's names, serial, key type, issuer and validity.
    Text,
    /// The PEM blocks: chain, then roots (the private key only with --include-key).
    Pem,
    /// Everything `text` shows, as JSON (one line per push with --watch).
    Json,
}

/// `node-agent fetch` flags.
#[derive(ClapArgs, Debug)]
#[command(after_help = "Examples:\n  \
    node-agent fetch --token /var/run/secrets/kubernetes.io/serviceaccount/token\n  \
    node-agent fetch --token token.jwt --resource ROOTCA -o pem > roots.pem\n  \
    node-agent fetch --token token.jwt --watch")]
pub struct Args {
    /// The agent's SDS socket
    #[arg(
        long = "workload-uds-path",
        alias = "workloadUDSPath",
        env = "WORKLOAD_UDS_PATH",
        default_value = crate::config::DEFAULT_UDS_PATH,
        value_name = "PATH"
    )]
    pub workload_uds_path: PathBuf,

    /// File holding the workload's JWT, sent in the header Envoy uses
    /// (istio_sds_credentials_header-bin); without it the agent uses its
    /// WORKLOAD_TOKEN_PATH, if it has one
    #[arg(long, value_name = "FILE")]
    pub token: Option<PathBuf>,

    /// Resource(s) to ask for (comma list or repeated)
    #[arg(
        long,
        value_delimiter = ',',
        default_values = SERVED,
        value_parser = clap::builder::PossibleValuesParser::new(SERVED)
    )]
    pub resource: Vec<String>,

    /// Output format
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// Also write the private key (with -o pem or -o json only)
    #[arg(long)]
    pub include_key: bool,

    /// Keep the stream open and print every push (rotations, root changes)
    /// until interrupted
    #[arg(long)]
    pub watch: bool,

    /// How long to wait for the agent's first answer
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
}

/// Why `fetch` failed; each one is a single line on stderr.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Usage(String),
    #[error("no agent socket at {0} (is node-agent running? pass --workload-uds-path or set WORKLOAD_UDS_PATH)")]
    NoSocket(PathBuf),
    #[error("permission denied connecting to {0}: {1} (run as a user that may use the socket and its directory)")]
    SocketDenied(PathBuf, std::io::Error),
    #[error(
        "nothing is listening on {0} (connection refused: the socket of an agent that stopped?)"
    )]
    NotListening(PathBuf),
    #[error("cannot connect to {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("{0} does not answer as an SDS server: {1}")]
    Transport(PathBuf, String),
    /// The agent ended the stream with a gRPC status: its message carries the
    /// reason, the CA's own error text included.
    #[error("{}: {message}{hint}", code_name(*code))]
    Status {
        code: Code,
        message: String,
        hint: &'static str,
    },
    #[error("no answer from the agent at {0} within {1} (it keeps the stream open while its CA is unreachable; see the agent's log)")]
    Timeout(PathBuf, String),
    #[error("the agent closed the stream without a status")]
    Closed,
    #[error("the agent's answer cannot be read: {0}")]
    BadAnswer(String),
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission denied",
        Code::Unavailable => "unavailable",
        Code::InvalidArgument => "invalid argument",
        Code::ResourceExhausted => "resource exhausted",
        Code::Unimplemented => "not implemented",
        Code::Internal => "internal error",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::Cancelled => "cancelled",
        _ => "error",
    }
}

impl FetchError {
    fn from_status(s: tonic::Status, socket: &std::path::Path, had_token: bool) -> Self {
        // A status made by the client's transport (it carries the error that
        // caused it), not one the agent sent.
        if let Some(cause) = std::error::Error::source(&s) {
            return FetchError::Transport(
                socket.to_path_buf(),
                one_line(&format!("{}: {}", s.message(), client::error_chain(cause))),
            );
        }
        let hint = if s.code() == Code::Unauthenticated && !had_token {
            " (pass the workload's JWT with --token FILE)"
        } else {
            ""
        };
        FetchError::Status {
            code: s.code(),
            message: one_line(s.message()),
            hint,
        }
    }

    /// 2 for unusable arguments, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            FetchError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Runs `fetch`; prints a one-line error and returns non-zero when it fails.
pub async fn run(args: Args) -> ExitCode {
    match fetch(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("node-agent fetch: error: {}", one_line(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

async fn fetch(args: Args) -> Result<(), FetchError> {
    if args.include_key && args.format == Format::Text {
        return Err(FetchError::Usage(
            "--include-key writes the private key only with -o pem or -o json".into(),
        ));
    }
    let credential = match &args.token {
        Some(p) => {
            let jwt = zeroize::Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
                FetchError::Usage(format!("cannot read --token {}: {e}", p.display()))
            })?);
            Some(Credential::new(jwt.as_str()))
        }
        None => None,
    };
    let mut names: Vec<String> = Vec::new();
    for n in args.resource {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let socket = args.workload_uds_path;
    let timed_out = || FetchError::Timeout(socket.clone(), crate::cli::show_duration(args.timeout));
    let had_token = credential.is_some();
    // The agent ending the stream cleanly, or with a status.
    let ended = |e: StreamEnd| match e {
        StreamEnd::Closed => FetchError::Closed,
        StreamEnd::Status(s) => FetchError::from_status(s, &socket, had_token),
    };

    let (mut stream, mut resp) = tokio::time::timeout(args.timeout, async {
        let mut stream = client::open(&socket, credential.as_ref(), &names).await?;
        let resp = stream.next().await.map_err(ended)?;
        Ok::<_, FetchError>((stream, resp))
    })
    .await
    .map_err(|_| timed_out())??;

    let mut previous: Option<Vec<Resource>> = None;
    let mut push = 0u64;
    loop {
        push += 1;
        let now = SystemTime::now();
        let resources = inspect::decode(&resp).map_err(FetchError::BadAnswer)?;
        let shown = match args.format {
            Format::Text => {
                let mut s = String::new();
                if args.watch {
                    let changed = previous
                        .as_ref()
                        .map(|p| output::changes(p, &resources))
                        .unwrap_or_default();
                    s.push_str(&format!(
                        "--- push {push} at {}{}\n",
                        output::show_time(now),
                        if changed.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", changed.join("; "))
                        }
                    ));
                }
                s + &output::text(&resources, &resp.version_info, now)
            }
            Format::Pem => output::pem(&resources, args.include_key),
            Format::Json => {
                let v = output::json(&resources, &resp.version_info, args.include_key, now);
                if args.watch {
                    v.to_string() + "\n"
                } else {
                    serde_json::to_string_pretty(&v).expect("JSON values serialise") + "\n"
                }
            }
        };
        let mut out = std::io::stdout().lock();
        // A closed stdout (e.g. `| head`) ends the command quietly.
        if out
            .write_all(shown.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return Ok(());
        }
        drop(out);
        if !args.watch {
            return Ok(());
        }
        stream.ack(&resp).await;
        previous = Some(resources);
        resp = tokio::select! {
            next = stream.next() => next.map_err(ended)?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
    }
}
