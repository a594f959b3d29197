//! The socket and the settings around it, from the agent's process: a live
//! socket is not taken over, a stale one is replaced, shutdown removes it;
//! a socket directory others can write stops the agent; invalid settings stop
//! the agent naming them; Istio's socket flag wins over the environment.

use crate::support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
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

/// Spawns the agent on `socket` with `env` and asserts that it stops, its log
/// holding every one of `expect`, with nothing bound at `socket`.
fn refused(socket: &Path, env: &[(&str, String)], expect: &[String]) {
    let log_dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(socket, log_dir.path(), env);
    let st = agent.wait_exit(Duration::from_secs(20));
    let log = agent.log();
    assert!(!st.success(), "{st:?}: {log}");
    for part in expect {
        assert!(log.contains(part.as_str()), "{part:?} not in\n{log}");
    }
    assert!(!socket.exists(), "{log}");
}

#[test]
fn a_socket_directory_others_can_write_stops_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let sds = dir.path().join("sds");
    fs::create_dir(&sds).unwrap();
    let me = fs::metadata(&sds).unwrap().uid();
    let socket = sds.join("uds_path");
    let local = [("CA_PROVIDER", "LocalCA".to_string())];
    let set_mode = |mode| fs::set_permissions(&sds, fs::Permissions::from_mode(mode)).unwrap();
    let says = |mode: u32, why: &str| {
        vec![
            format!("refusing the socket directory {}", sds.display()),
            format!("of WORKLOAD_UDS_PATH (mode {mode:04o}, owner uid {me}): {why}"),
            format!("chown {me} {} && chmod 0755", sds.display()),
            "SOCKET_DIR_CHECK=pod".to_string(),
        ]
    };
    for (mode, why) in [
        (0o777, "every user can write it"),
        (0o1777, "every user can write it"),
        (0o775, "its group can write it"),
    ] {
        set_mode(mode);
        refused(&socket, &local, &says(mode, why));
    }
    // Owned by someone else: only root can make such a directory here.
    if me == 0 {
        set_mode(0o755);
        std::os::unix::fs::chown(&sds, Some(4321), None).unwrap();
        refused(
            &socket,
            &local,
            &["owned by uid 4321, neither the agent's uid nor root".to_string()],
        );
        std::os::unix::fs::chown(&sds, Some(me), None).unwrap();
    }
    // The Workload API's socket is held to the same rule.
    set_mode(0o755);
    let open = dir.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let api = (
        "WORKLOAD_API_SOCKET",
        open.join("api.sock").display().to_string(),
    );
    let log_dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::spawn(&socket, log_dir.path(), &[local[0].clone(), api]);
    assert!(!agent.wait_exit(Duration::from_secs(20)).success());
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "refusing the socket directory {} of WORKLOAD_API_SOCKET",
            open.display()
        )),
        "{log}"
    );
    assert!(!open.join("api.sock").exists());

    // The agent's own 0755 directory serves.
    let mut agent = Agent::start_at(&socket, dir.path(), &local);
    assert!(agent.terminate().success());
    // A pod's own emptyDir (0777), said to be one, serves too.
    set_mode(0o777);
    let pod = ("SOCKET_DIR_CHECK", "pod".to_string());
    let mut agent = Agent::start_at(&socket, dir.path(), &[local[0].clone(), pod]);
    assert!(agent.terminate().success());
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
        ("SOCKET_DIR_CHECK", "off", "SOCKET_DIR_CHECK=\"off\""),
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
