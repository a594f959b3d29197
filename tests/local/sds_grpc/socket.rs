//! The socket and the settings around it, from the agent's process: a live
//! socket is not taken over, a stale one is replaced, shutdown removes it;
//! invalid settings stop the agent naming them; Istio's socket flag wins over
//! the environment.

use crate::support;

use std::time::Duration;

use support::agent::Agent;

#[test]
fn socket_lifecycle_live_stale_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/sds/uds_path");
    let local = [("CA_PROVIDER", "LocalCA".to_string())];
    let mut first = Agent::start_at(&socket, dir.path(), &local);
    assert!(first.log().contains(&format!(
        "SDS gRPC server start, listen {:?}",
        socket.display().to_string()
    )));

    // A second agent on the same live socket refuses to start.
    let mut second = Agent::spawn(&socket, dir.path(), &local);
    let st = second.wait_exit(Duration::from_secs(20));
    assert!(!st.success());
    assert!(
        second.log().contains("another agent is already serving"),
        "{}",
        second.log()
    );

    // SIGTERM: clean exit, socket removed.
    let st = first.terminate();
    assert!(st.success(), "exit status {st:?}; log:\n{}", first.log());
    assert!(!socket.exists(), "socket removed on shutdown");

    // A stale socket file (a killed agent's) is replaced.
    let third = Agent::start_at(&socket, dir.path(), &local);
    drop(third); // SIGKILL leaves the file behind
    assert!(socket.exists());
    let _fourth = Agent::start_at(&socket, dir.path(), &local);
}

#[test]
fn invalid_settings_stop_the_agent_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value, expect) in [
        (
            "CA_PROVIDER",
            "GoogleCA",
            "accepted values are VaultCA, LocalCA",
        ),
        ("SECRET_TTL", "tomorrow", "SECRET_TTL=\"tomorrow\""),
        ("KEY_TYPE", "dsa-1024", "KEY_TYPE=\"dsa-1024\""),
        (
            "TRUST_DOMAIN",
            "Not A Domain",
            "TRUST_DOMAIN=\"Not A Domain\"",
        ),
    ] {
        let mut a = Agent::spawn(
            &dir.path().join("s"),
            dir.path(),
            &[(var, value.to_string())],
        );
        let st = a.wait_exit(Duration::from_secs(20));
        assert_eq!(st.code(), Some(2), "{var}: {}", a.log());
        assert!(a.log().contains(expect), "{var}: {}", a.log());
    }
}

#[test]
fn the_istio_socket_flag_wins_over_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let env_socket = dir.path().join("from-env");
    let flag_socket = dir.path().join("from-flag/uds_path");
    for flag in ["--workloadUDSPath", "--workload-uds-path"] {
        let mut agent = Agent::spawn_args(
            &env_socket,
            dir.path(),
            &[("CA_PROVIDER", "LocalCA".into())],
            &[flag, flag_socket.to_str().unwrap()],
        );
        agent.wait_log("SDS gRPC server start", Duration::from_secs(20));
        assert!(
            agent
                .log()
                .contains(&format!("listen {:?}", flag_socket.display().to_string())),
            "{}",
            agent.log()
        );
        assert!(flag_socket.exists() && !env_socket.exists(), "{flag}");
        assert!(agent.terminate().success());
    }
}
